//! The PC memory map (BIOS INT 15h E820) for a given RAM size.
//!
//! | range                 | type     | why                                        |
//! |-----------------------|----------|--------------------------------------------|
//! | 0x0–0x9FBFF           | RAM      | conventional memory (640 KiB minus 1 KiB)  |
//! | 0x9FC00–0x9FFFF       | reserved | EBDA                                       |
//! | 0xA0000–0xDFFFF       | (absent) | VGA window and option ROMs                 |
//! | 0xE0000–0xFFFFF       | reserved | BIOS area with the machine's ACPI tables   |
//! | 0x100000–RAM end      | RAM      | extended memory                            |
//! | 0xE0000000–0xEFFFFFFF | reserved | PCI ECAM (MMCONFIG), as the MCFG says      |
//!
//! A RAM size that ends inside one of the low ranges cuts that range short
//! and leaves out the ranges above it; the loaders themselves refuse RAM
//! below [`MIN_RAM`](crate::MIN_RAM).

/// Start of the EBDA, end of usable conventional memory.
pub const EBDA_START: u64 = 0x9FC00;
/// End of conventional memory (start of the VGA window).
pub const LOW_MEM_END: u64 = 0xA0000;
/// Start of extended memory.
pub const HIGH_MEM_START: u64 = 0x100000;
/// The PCI ECAM window: reserved, so that Linux trusts the MCFG table.
pub const ECAM_START: u64 = 0xE000_0000;
/// Its size (buses 0–255).
pub const ECAM_SIZE: u64 = 0x1000_0000;

/// The type of an e820 range, with the BIOS's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM (1).
    Ram = 1,
    /// Reserved, not to be used by the OS (2).
    Reserved = 2,
    /// ACPI reclaimable memory (3).
    Acpi = 3,
    /// ACPI NVS memory (4).
    Nvs = 4,
}

/// One range of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The memory map for `ram_size` bytes of RAM starting at address 0, in
/// ascending address order, without empty ranges.
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let mut map = Vec::with_capacity(4);
    let mut push = |start: u64, end: u64, kind| {
        let end = end.min(ram_size);
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind,
            });
        }
    };
    push(0, EBDA_START, E820Type::Ram);
    push(EBDA_START, LOW_MEM_END, E820Type::Reserved);
    push(
        crate::BIOS_AREA_START,
        crate::BIOS_AREA_END,
        E820Type::Reserved,
    );
    push(HIGH_MEM_START, ram_size, E820Type::Ram);
    map.push(E820Entry {
        addr: ECAM_START,
        size: ECAM_SIZE,
        kind: E820Type::Reserved,
    });
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(addr: u64, size: u64, kind: E820Type) -> E820Entry {
        E820Entry { addr, size, kind }
    }

    #[test]
    fn map_for_256_mib() {
        assert_eq!(
            e820_map(256 << 20),
            vec![
                e(0, 0x9FC00, E820Type::Ram),
                e(0x9FC00, 0x400, E820Type::Reserved),
                e(0xE0000, 0x20000, E820Type::Reserved),
                e(0x100000, (256 << 20) - 0x100000, E820Type::Ram),
                e(0xE000_0000, 0x1000_0000, E820Type::Reserved),
            ]
        );
    }

    #[test]
    fn map_for_minimum_ram() {
        let m = e820_map(2 << 20);
        assert_eq!(m.len(), 5);
        assert_eq!(m[3], e(0x100000, 0x100000, E820Type::Ram));
    }

    #[test]
    fn map_for_exactly_one_mib_and_less() {
        let ecam = e(ECAM_START, ECAM_SIZE, E820Type::Reserved);
        assert_eq!(e820_map(0x100000).len(), 4);
        assert_eq!(e820_map(0x80000), vec![e(0, 0x80000, E820Type::Ram), ecam]);
        assert_eq!(e820_map(0), vec![ecam]);
    }

    #[test]
    fn map_above_4_gib() {
        let m = e820_map(6 << 30);
        assert_eq!(m[3].size, (6 << 30) - 0x100000);
    }
}
