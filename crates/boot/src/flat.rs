//! Raw flat binaries: the file's bytes copied to a given guest address and
//! entered at that address.
//!
//! A flat file has no header, so the caller names the load address and the
//! entry mode:
//!
//! * [`FlatEntry::Real`]: 16-bit real mode with CS = `load_addr >> 4` and
//!   IP = `load_addr & 0xF` (so the segment starts at or just below the
//!   image), DS = ES = SS = FS = GS = CS, SP = 0 (the first push lands at
//!   the top of the 64 KiB segment). The whole image must lie below 1 MiB.
//! * [`FlatEntry::Protected32`]: flat 32-bit protected mode, paging off,
//!   with the loaders' GDT at 0x500 (CS = 0x10, DS = ES = SS = FS = GS =
//!   0x18), EIP = `load_addr`; an image over 0x500 gets the GDT just above
//!   itself instead.
//!
//! In both modes RFLAGS = 0x2 (IF = 0), every general register is 0 (the
//! binary sets up its own stack), and the image must fit in RAM and not
//! overlap the BIOS/ACPI area 0xE0000–0xFFFFF that the machine fills.

use popek_memory::GuestRam;

use crate::{
    check_ram, gdt, write_gdt_at, BootError, EntryMode, EntryState, BIOS_AREA_END, BIOS_AREA_START,
    GDT_ADDR, GDT_LIMIT,
};

/// The CPU mode a flat binary is entered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlatEntry {
    /// 16-bit real mode, CS:IP derived from the load address.
    Real,
    /// Flat 32-bit protected mode.
    Protected32,
}

/// True when `a..a+alen` and `b..b+blen` share a byte (no overflow: the
/// callers' ranges are already known to lie in RAM).
fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

/// Loads `image` at `load_addr` and returns the entry state for `entry`.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    load_addr: u64,
    entry: FlatEntry,
) -> Result<EntryState, BootError> {
    check_ram(ram)?;
    let len = image.len() as u64;
    if len == 0 {
        return Err(BootError::Truncated {
            what: "flat binary (empty file)",
            need: 1,
            len: 0,
        });
    }
    match load_addr.checked_add(len) {
        Some(end) if end <= ram.size() => {}
        _ => {
            return Err(BootError::FlatTooBig {
                len,
                addr: load_addr,
                ram: ram.size(),
            })
        }
    }
    if overlaps(
        load_addr,
        len,
        BIOS_AREA_START,
        BIOS_AREA_END - BIOS_AREA_START,
    ) {
        return Err(BootError::SegmentOverlapsBootArea {
            addr: load_addr,
            len,
            what: "the BIOS/ACPI area 0xE0000-0xFFFFF",
        });
    }
    let state = match entry {
        FlatEntry::Real => {
            if load_addr + len > BIOS_AREA_END {
                return Err(BootError::FlatNotReachable {
                    addr: load_addr,
                    len,
                });
            }
            EntryState::new(
                EntryMode::Real {
                    cs: (load_addr >> 4) as u16,
                },
                load_addr & 0xF,
            )
        }
        FlatEntry::Protected32 => {
            // The GDT goes at 0x500, or just above the image when the image
            // is there (the loader moves out of the way).
            let gdt_size = GDT_LIMIT as u64 + 1;
            let base = if overlaps(load_addr, len, GDT_ADDR, gdt_size) {
                let above = (load_addr + len + 15) & !15;
                if above + gdt_size > ram.size()
                    || overlaps(
                        above,
                        gdt_size,
                        BIOS_AREA_START,
                        BIOS_AREA_END - BIOS_AREA_START,
                    )
                {
                    return Err(BootError::SegmentOverlapsBootArea {
                        addr: load_addr,
                        len,
                        what: "the GDT at 0x500-0x51F, with no room for it above the image",
                    });
                }
                above
            } else {
                GDT_ADDR
            };
            let table = write_gdt_at(ram, base, gdt::CODE32)?;
            let mut st = EntryState::protected32(load_addr);
            if let EntryMode::Protected32 { gdt, .. } = &mut st.mode {
                *gdt = table;
            }
            st
        }
    };
    ram.write(load_addr, image)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::ram;

    #[test]
    fn real_mode_entry() {
        let ram = ram(2 << 20);
        let st = load(&ram, &[0xEA, 1, 2], 0x7C00, FlatEntry::Real).unwrap();
        assert_eq!(st.mode, EntryMode::Real { cs: 0x7C0 });
        assert_eq!(st.rip, 0);
        assert_eq!(st.rflags, 2);
        assert_eq!(ram.read_u8(0x7C00).unwrap(), 0xEA);
        assert_eq!(ram.read_u8(0x7C02).unwrap(), 2);
        assert_eq!(
            ram.read_u64(GDT_ADDR + 0x10).unwrap(),
            0,
            "no GDT in real mode"
        );

        let st = load(&ram, &[0x90], 0x10005, FlatEntry::Real).unwrap();
        assert_eq!((st.mode, st.rip), (EntryMode::Real { cs: 0x1000 }, 5));
    }

    #[test]
    fn protected_mode_entry() {
        let ram = ram(4 << 20);
        let img = vec![0xF4u8; 0x1234];
        let st = load(&ram, &img, 0x200000, FlatEntry::Protected32).unwrap();
        assert_eq!(st, EntryState::protected32(0x200000));
        assert_eq!(ram.read_u8(0x200000 + 0x1233).unwrap(), 0xF4);
        assert_eq!(ram.read_u64(GDT_ADDR + 0x10).unwrap(), gdt::CODE32);
        assert_eq!(ram.read_u64(GDT_ADDR + 0x18).unwrap(), gdt::DATA);
    }

    #[test]
    fn flat_file_too_big() {
        let ram = ram(2 << 20);
        let img = vec![0u8; 0x100001];
        assert_eq!(
            load(&ram, &img, 0x100000, FlatEntry::Protected32),
            Err(BootError::FlatTooBig {
                len: 0x100001,
                addr: 0x100000,
                ram: 2 << 20
            })
        );
        assert!(matches!(
            load(&ram, &[1], u64::MAX, FlatEntry::Protected32),
            Err(BootError::FlatTooBig { .. })
        ));
    }

    #[test]
    fn real_mode_beyond_one_mib() {
        let ram = ram(4 << 20);
        assert!(matches!(
            load(&ram, &[1, 2], 0x100000, FlatEntry::Real),
            Err(BootError::FlatNotReachable { .. })
        ));
    }

    #[test]
    fn overlaps_bios_area_or_gdt() {
        let ram = ram(4 << 20);
        assert!(matches!(
            load(&ram, &[0; 0x100], 0xDFF80, FlatEntry::Real),
            Err(BootError::SegmentOverlapsBootArea { .. })
        ));
        // A protected-mode image over 0x500 gets its GDT above itself.
        let st = load(&ram, &[0x90; 0x100], 0x480, FlatEntry::Protected32).unwrap();
        let EntryMode::Protected32 { gdt: table, .. } = st.mode else {
            panic!("protected mode");
        };
        assert_eq!(table.base, 0x580);
        assert_eq!(ram.read_u64(0x580 + 0x10).unwrap(), gdt::CODE32);
        assert_eq!(ram.read_u8(0x57F).unwrap(), 0x90, "the image intact");
        // Unless that would reach the BIOS area.
        assert!(matches!(
            load(&ram, &vec![0; 0xDFB70], 0x480, FlatEntry::Protected32),
            Err(BootError::SegmentOverlapsBootArea { .. })
        ));
        // A real-mode image may sit over 0x500: no GDT is written.
        assert!(load(&ram, &[0; 0x100], 0x480, FlatEntry::Real).is_ok());
    }

    #[test]
    fn empty_file() {
        let ram = ram(2 << 20);
        assert!(matches!(
            load(&ram, &[], 0x1000, FlatEntry::Real),
            Err(BootError::Truncated { .. })
        ));
    }
}
