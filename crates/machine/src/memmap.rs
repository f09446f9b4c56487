//! The guest-physical memory map of the machine.
//!
//! ```text
//! 0x0000_0000  RAM: IVT, BIOS data area (0x400: COM1 port, EBDA segment, base memory KiB)
//! 0x0009_fc00  reserved: EBDA (1 KiB, left empty)
//! 0x000a_0000  hole: not in the e820 map (backed by RAM nobody should use)
//! 0x000e_0000  reserved: BIOS area; the ACPI tables start at 0xE0000
//! 0x0010_0000  RAM up to the RAM size (at most 3 GiB)
//! 0xc000_0000  MMIO window up to 4 GiB (nothing mapped yet; reads all ones)
//! ```
//!
//! Guest RAM is one contiguous block from 0; the "hole" exists in the e820
//! map only (the bytes are RAM the guest must not use), as on a PC.

/// End of conventional memory usable by the guest (639 KiB).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The EBDA, reserved (empty).
pub const EBDA_START: u64 = 0x9_fc00;
/// The legacy VGA / option ROM hole.
pub const HOLE_START: u64 = 0xa_0000;
/// The BIOS area, where the ACPI tables and RSDP live.
pub const BIOS_AREA_START: u64 = 0xe_0000;
/// First byte of high memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the MMIO window (devices such as virtio-mmio go here).
pub const MMIO_START: u64 = 0xc000_0000;
/// End (exclusive) of the MMIO window.
pub const MMIO_END: u64 = 0x1_0000_0000;
/// Most guest RAM the map allows (RAM must end below [`MMIO_START`]).
pub const MAX_RAM: u64 = MMIO_START;

/// Kind of an e820 region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Usable RAM (e820 type 1).
    Ram,
    /// Reserved (e820 type 2).
    Reserved,
}

impl RegionKind {
    /// The e820 type number.
    pub fn e820_type(self) -> u32 {
        match self {
            RegionKind::Ram => 1,
            RegionKind::Reserved => 2,
        }
    }
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the guest may do with it.
    pub kind: RegionKind,
}

/// The e820 map for `ram_size` bytes of RAM (at least 1 MiB): low RAM,
/// the reserved EBDA, the reserved BIOS area holding the ACPI tables, and
/// high RAM. 0xA0000–0xDFFFF is left out (a hole).
pub fn e820_map(ram_size: u64) -> Vec<Region> {
    let mut map = vec![
        Region {
            start: 0,
            len: LOW_RAM_END,
            kind: RegionKind::Ram,
        },
        Region {
            start: EBDA_START,
            len: HOLE_START - EBDA_START,
            kind: RegionKind::Reserved,
        },
        Region {
            start: BIOS_AREA_START,
            len: HIGH_RAM_START - BIOS_AREA_START,
            kind: RegionKind::Reserved,
        },
    ];
    if ram_size > HIGH_RAM_START {
        map.push(Region {
            start: HIGH_RAM_START,
            len: ram_size - HIGH_RAM_START,
            kind: RegionKind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_has_the_pc_hole_and_covers_ram() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 4);
        assert_eq!(map[0].start + map[0].len, 0x9fc00);
        assert!(map
            .iter()
            .all(|r| r.start + r.len <= HOLE_START || r.start >= BIOS_AREA_START));
        let high = map[3];
        assert_eq!((high.start, high.start + high.len), (0x100000, 256 << 20));
        assert!(map.windows(2).all(|w| w[0].start + w[0].len <= w[1].start));
        assert_eq!(e820_map(1 << 20).len(), 3);
        assert_eq!(RegionKind::Reserved.e820_type(), 2);
    }
}
