//! The guest page walker: linear → guest-physical through the guest's own
//! paging structures, with the checks and the accessed/dirty updates the
//! SDM (chapter 4) gives, for every paging mode — 32-bit (with 4 MiB
//! pages), PAE and 4-level. One walker serves every engine: the software
//! CPU on a TLB miss, the `trap` monitor for its shadow tables and its
//! emulation, and the `hw` engine for reports and VMM services.
//!
//! The walk and the A/D update are separate steps: a report peeks without
//! changing what the guest sees; the CPU and the monitor set the bits as
//! silicon does.

use crate::state::{cr, CpuState};

/// EFER.LMA (long mode active) and EFER.NXE (no-execute enable).
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Paging-structure entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1;
    /// Writable.
    pub const W: u64 = 2;
    /// User.
    pub const U: u64 = 4;
    /// Accessed.
    pub const A: u64 = 0x20;
    /// Dirty.
    pub const D: u64 = 0x40;
    /// Page size (a large page at this level).
    pub const PS: u64 = 0x80;
    /// Global.
    pub const G: u64 = 0x100;
    /// Execute-disable (PAE and 4-level entries).
    pub const XD: u64 = 1 << 63;
}

/// Page-fault error-code bits.
pub mod error {
    /// The page was present (a protection or reserved-bit fault).
    pub const P: u32 = 1;
    /// A write.
    pub const W: u32 = 2;
    /// At CPL 3.
    pub const U: u32 = 4;
    /// A reserved bit was set in an entry.
    pub const RSVD: u32 = 8;
    /// An instruction fetch.
    pub const I: u32 = 16;
}

/// Physical-address bits of an 8-byte entry (MAXPHYADDR 52).
const ADDR64: u64 = 0x000f_ffff_ffff_f000;

/// How linear addresses are translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Paging off: linear is physical.
    Off,
    /// 32-bit paging; `pse`: CR4.PSE allows 4 MiB pages.
    Bits32 {
        /// CR4.PSE.
        pse: bool,
    },
    /// PAE paging (three levels, 8-byte entries).
    Pae,
    /// 4-level paging (long mode).
    Level4,
}

impl Mode {
    /// The mode the control registers select.
    pub fn of(cr0: u64, cr4: u64, efer: u64) -> Mode {
        if cr0 & cr::CR0_PG == 0 || cr0 & cr::CR0_PE == 0 {
            Mode::Off
        } else if efer & EFER_LMA != 0 {
            Mode::Level4
        } else if cr4 & cr::CR4_PAE != 0 {
            Mode::Pae
        } else {
            Mode::Bits32 {
                pse: cr4 & cr::CR4_PSE != 0,
            }
        }
    }

    /// The mode of a vCPU state.
    pub fn of_state(s: &CpuState) -> Mode {
        Mode::of(s.cr0, s.cr4, s.efer)
    }
}

/// Where the walker reads paging-structure entries, and writes the
/// accessed and dirty bits back (guest-physical addresses).
pub trait TableMemory {
    /// The entry of `size` bytes (4 or 8) at `addr`.
    fn read_entry(&mut self, addr: u64, size: u8) -> u64;
    /// Writes an entry back (only its A and D bits differ).
    fn write_entry(&mut self, addr: u64, size: u8, value: u64);
}

/// An access to translate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A write.
    pub write: bool,
    /// At CPL 3 (user privilege).
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
    /// CR0.WP: supervisor writes obey read-only pages.
    pub wp: bool,
    /// EFER.NXE: the execute-disable bit is in force (PAE and 4-level).
    pub nxe: bool,
}

impl Access {
    /// A supervisor read (reports, VMM services), checking nothing a
    /// supervisor read would not.
    pub const PEEK: Access = Access {
        write: false,
        user: false,
        fetch: false,
        wp: false,
        nxe: false,
    };

    /// A supervisor read under the control registers of `s` (EFER.NXE
    /// decides whether the XD bit is reserved): for reports and VMM
    /// services.
    pub fn peek(s: &CpuState) -> Access {
        Access::new(s, false, false, false)
    }

    /// An access of the given kind under the control registers of `s`.
    pub fn new(s: &CpuState, write: bool, user: bool, fetch: bool) -> Access {
        Access {
            write,
            user,
            fetch,
            wp: s.cr0 & cr::CR0_WP != 0,
            nxe: s.efer & EFER_NXE != 0,
        }
    }

    fn error(&self, bits: u32) -> u32 {
        bits | if self.write { error::W } else { 0 }
            | if self.user { error::U } else { 0 }
            | if self.fetch && self.nxe { error::I } else { 0 }
    }
}

/// Guest RAM as paging-structure memory, for walks outside the CPU
/// (reports, VMM services): reads outside RAM give all-ones, as the bus
/// does; writes go to RAM like any guest-physical write.
pub struct RamTables<'a>(pub &'a popek_memory::GuestRam);

impl TableMemory for RamTables<'_> {
    fn read_entry(&mut self, addr: u64, size: u8) -> u64 {
        if size == 4 {
            self.0.read_u32(addr).map_or(u32::MAX as u64, u64::from)
        } else {
            self.0.read_u64(addr).unwrap_or(u64::MAX)
        }
    }
    fn write_entry(&mut self, addr: u64, size: u8, value: u64) {
        let _ = self.0.write(addr, &value.to_le_bytes()[..size as usize]);
    }
}

/// The guest-physical address of `lin` as the vCPU in state `s` would
/// translate it for a supervisor read, without setting any bit; `None`
/// where that read would fault.
pub fn peek(ram: &popek_memory::GuestRam, s: &CpuState, lin: u64) -> Option<u64> {
    let w = walk(
        &mut RamTables(ram),
        Mode::of_state(s),
        s.cr3,
        lin,
        Access::peek(s),
    )
    .ok()?;
    Some(w.phys(lin))
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Guest-physical address of the 4 KiB page holding the address.
    pub page: u64,
    /// Size of the page the leaf entry maps (4 KiB, 2 MiB, 4 MiB, 1 GiB).
    pub page_size: u64,
    /// User accesses allowed at every level.
    pub user: bool,
    /// Writes allowed at every level (before CR0.WP is considered).
    pub writable: bool,
    /// Execution allowed at every level (always, unless EFER.NXE).
    pub executable: bool,
    /// The leaf is global.
    pub global: bool,
    /// The leaf's dirty bit was set.
    pub dirty: bool,
    /// Guest-physical addresses of the entries used, top level first.
    entries: [u64; 4],
    /// Their values when read.
    values: [u64; 4],
    levels: u8,
    /// 8-byte entries.
    wide: bool,
}

impl Walk {
    /// The identity translation of paging off.
    pub fn unpaged(lin: u64) -> Walk {
        Walk {
            page: lin & !0xfff,
            page_size: 1 << 12,
            user: true,
            writable: true,
            executable: true,
            global: false,
            dirty: true,
            entries: [0; 4],
            values: [0; 4],
            levels: 0,
            wide: false,
        }
    }

    /// Guest-physical addresses of the entries used (4 bytes wide in 32-bit
    /// paging, 8 in PAE and 4-level paging), from the top level to the leaf
    /// (none with paging off).
    pub fn entries(&self) -> &[u64] {
        &self.entries[..self.levels as usize]
    }

    /// The guest-physical address of `lin`.
    pub fn phys(&self, lin: u64) -> u64 {
        self.page | (lin & 0xfff)
    }

    /// Whether a write of this privilege may go through (CR0.WP applies to
    /// supervisor writes).
    pub fn may_write(&self, user: bool, wp: bool) -> bool {
        if user {
            self.writable
        } else {
            self.writable || !wp
        }
    }
}

/// Walks the paging structures from `cr3` for `lin`. `Err` is the #PF
/// error code (the caller sets CR2). Reads entries only: see
/// [`set_accessed_dirty`].
#[inline(always)]
pub fn walk(
    mem: &mut impl TableMemory,
    mode: Mode,
    cr3: u64,
    lin: u64,
    acc: Access,
) -> Result<Walk, u32> {
    let (levels, mut table, size, width, top_shift): (u8, u64, u8, u32, u32) = match mode {
        Mode::Off => return Ok(Walk::unpaged(lin & 0xffff_ffff)),
        // The mode every engine runs today: straight-line.
        Mode::Bits32 { pse } => return walk32(mem, pse, cr3, lin as u32, acc),
        Mode::Pae => (3, cr3 & 0xffff_ffe0, 8, 9, 30),
        Mode::Level4 => (4, cr3 & ADDR64, 8, 9, 39),
    };
    let mut w = Walk::unpaged(lin);
    w.dirty = false;
    w.wide = true;
    let lin = if mode == Mode::Level4 {
        lin
    } else {
        lin & 0xffff_ffff
    };
    let not_present = Err(acc.error(0));
    let reserved = Err(acc.error(error::P | error::RSVD));
    for level in 0..levels {
        let shift = top_shift - width * level as u32;
        // PAE's top level has 4 entries indexed by bits 31:30.
        let index = (lin >> shift) & ((1u64 << width) - 1);
        let addr = table + index * size as u64;
        let value = mem.read_entry(addr, size);
        w.entries[level as usize] = addr;
        w.values[level as usize] = value;
        w.levels = level + 1;
        if value & pte::P == 0 {
            return not_present;
        }
        if size == 8 && !acc.nxe && value & pte::XD != 0 {
            return reserved;
        }
        let pdpte = mode == Mode::Pae && level == 0;
        if pdpte {
            // PAE PDPTEs carry no permissions (and R/W, U/S are reserved).
            table = value & ADDR64;
            continue;
        }
        w.user = if level == 0 || (mode == Mode::Pae && level == 1) {
            value & pte::U != 0
        } else {
            w.user && value & pte::U != 0
        };
        w.writable = if level == 0 || (mode == Mode::Pae && level == 1) {
            value & pte::W != 0
        } else {
            w.writable && value & pte::W != 0
        };
        if size == 8 && value & pte::XD != 0 {
            w.executable = false;
        }
        let last = level + 1 == levels;
        let large = !last && value & pte::PS != 0 && shift <= 30;
        let large = large
            && match mode {
                Mode::Bits32 { pse } => pse,
                _ => true,
            };
        if last || large {
            let page_size = 1u64 << shift;
            let base = if size == 4 {
                value & 0xffff_f000
            } else {
                value & ADDR64
            };
            if large {
                // The frame bits below the page size are reserved (bit 12
                // is PAT): 32-bit 4 MiB pages without PSE-36 reserve 21:13.
                let rsvd = (page_size - 1) & !0x1fff;
                if base & rsvd != 0 {
                    return reserved;
                }
            }
            w.page = (base & !(page_size - 1)) | (lin & (page_size - 1) & !0xfff);
            w.page_size = page_size;
            w.global = value & pte::G != 0;
            w.dirty = value & pte::D != 0;
            break;
        }
        table = if size == 4 {
            value & 0xffff_f000
        } else {
            value & ADDR64
        };
    }
    check(w, acc)
}

/// The permission checks of a completed walk.
#[inline(always)]
fn check(w: Walk, acc: Access) -> Result<Walk, u32> {
    if acc.user && !w.user {
        return Err(acc.error(error::P));
    }
    if acc.write && !w.may_write(acc.user, acc.wp) {
        return Err(acc.error(error::P));
    }
    if acc.fetch && acc.nxe && !w.executable {
        return Err(acc.error(error::P));
    }
    Ok(w)
}

/// 32-bit paging: a directory entry, then a table entry or a 4 MiB page
/// (with CR4.PSE; bits 21:13 of its frame reserved without PSE-36).
#[inline(always)]
fn walk32(
    mem: &mut impl TableMemory,
    pse: bool,
    cr3: u64,
    lin: u32,
    acc: Access,
) -> Result<Walk, u32> {
    let pde_addr = (cr3 & 0xffff_f000) + ((lin >> 22) << 2) as u64;
    let pde = mem.read_entry(pde_addr, 4);
    if pde & pte::P == 0 {
        return Err(acc.error(0));
    }
    let mut w = Walk::unpaged(lin as u64);
    w.entries[0] = pde_addr;
    w.values[0] = pde;
    let (leaf, flags) = if pde & pte::PS != 0 && pse {
        if pde & 0x003f_e000 != 0 {
            return Err(acc.error(error::P | error::RSVD));
        }
        w.levels = 1;
        w.page = (pde & 0xffc0_0000) | (lin & 0x003f_f000) as u64;
        w.page_size = 4 << 20;
        (pde, pde)
    } else {
        let pte_addr = (pde & 0xffff_f000) + (((lin >> 12) & 0x3ff) << 2) as u64;
        let pte = mem.read_entry(pte_addr, 4);
        if pte & pte::P == 0 {
            return Err(acc.error(0));
        }
        w.entries[1] = pte_addr;
        w.values[1] = pte;
        w.levels = 2;
        w.page = pte & 0xffff_f000;
        (pte, pde & pte)
    };
    w.user = flags & pte::U != 0;
    w.writable = flags & pte::W != 0;
    w.global = leaf & pte::G != 0;
    w.dirty = leaf & pte::D != 0;
    check(w, acc)
}

/// Sets the accessed bit of every entry the walk used and, for a write,
/// the leaf's dirty bit, as the processor does (SDM 4.8): each entry
/// written only where a bit changes. (PAE PDPTEs have no accessed bit.)
#[inline]
pub fn set_accessed_dirty(mem: &mut impl TableMemory, w: &Walk, mode: Mode, write: bool) {
    let n = w.entries().len();
    let size = if w.wide { 8 } else { 4 };
    for (i, &addr) in w.entries().iter().enumerate() {
        if mode == Mode::Pae && i == 0 {
            continue;
        }
        let old = w.values[i];
        let mut v = old | pte::A;
        if write && i + 1 == n {
            v |= pte::D;
        }
        if v != old {
            mem.write_entry(addr, size, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Mem(HashMap<u64, u64>);

    impl TableMemory for Mem {
        fn read_entry(&mut self, addr: u64, size: u8) -> u64 {
            let v = self.0.get(&addr).copied().unwrap_or(0);
            if size == 4 {
                v & 0xffff_ffff
            } else {
                v
            }
        }
        fn write_entry(&mut self, addr: u64, _size: u8, value: u64) {
            self.0.insert(addr, value);
        }
    }

    const RW: u64 = pte::P | pte::W;
    const URW: u64 = pte::P | pte::W | pte::U;

    fn bits32() -> Mode {
        Mode::Bits32 { pse: true }
    }

    #[test]
    fn bits32_4k_and_4m_pages() {
        let mut m = Mem::default();
        m.0.insert(0x10000 + 4, 0x11000 | URW);
        m.0.insert(0x11000 + 3 * 4, 0x20000 | URW);
        m.0.insert(0x10000 + 8, 0x0080_0000 | URW | pte::PS | pte::G | pte::D);
        let w = walk(&mut m, bits32(), 0x10000, 0x0040_3123, Access::PEEK).unwrap();
        assert_eq!((w.phys(0x0040_3123), w.page_size), (0x20123, 4096));
        assert_eq!(w.entries().len(), 2);
        let w = walk(&mut m, bits32(), 0x10000, 0x0089_a123, Access::PEEK).unwrap();
        assert_eq!((w.phys(0x0089_a123), w.page_size), (0x0089_a123, 4 << 20));
        assert!(w.global && w.dirty);
        // Without PSE the PS bit is ignored: the PDE points to a table.
        let r = walk(
            &mut m,
            Mode::Bits32 { pse: false },
            0x10000,
            0x0089_a123,
            Access::PEEK,
        );
        assert_eq!(r, Err(0), "a zero PTE in the 'table' at 0x800000");
        assert_eq!(
            walk(&mut m, bits32(), 0x10000, 0x00c0_0000, Access::PEEK),
            Err(0)
        );
    }

    #[test]
    fn permissions_and_error_codes() {
        let mut m = Mem::default();
        m.0.insert(0x10000, 0x11000 | URW);
        m.0.insert(0x11000, 0x20000 | pte::P | pte::U); // read-only user page
        m.0.insert(0x11004, 0x21000 | RW); // supervisor page
        let user_write = Access {
            write: true,
            user: true,
            ..Access::PEEK
        };
        assert_eq!(walk(&mut m, bits32(), 0x10000, 0, user_write), Err(7));
        let sup_write = Access {
            write: true,
            ..Access::PEEK
        };
        assert!(
            walk(&mut m, bits32(), 0x10000, 0, sup_write).is_ok(),
            "WP=0"
        );
        let wp = Access {
            wp: true,
            ..sup_write
        };
        assert_eq!(walk(&mut m, bits32(), 0x10000, 0, wp), Err(3));
        let user_read = Access {
            user: true,
            ..Access::PEEK
        };
        assert_eq!(walk(&mut m, bits32(), 0x10000, 0x1000, user_read), Err(5));
        assert_eq!(
            walk(&mut m, bits32(), 0x10000, 0x2000, user_write),
            Err(6),
            "not present"
        );
        // A 4 MiB page with bits 21:13 set: reserved.
        m.0.insert(0x10004, 0x0040_2000 | RW | pte::PS);
        assert_eq!(
            walk(&mut m, bits32(), 0x10000, 0x0040_0000, Access::PEEK),
            Err(9)
        );
    }

    #[test]
    fn accessed_and_dirty_are_set_as_the_cpu_does() {
        let mut m = Mem::default();
        m.0.insert(0x10000, 0x11000 | URW);
        m.0.insert(0x11000, 0x20000 | URW);
        let w = walk(&mut m, bits32(), 0x10000, 0x123, Access::PEEK).unwrap();
        set_accessed_dirty(&mut m, &w, bits32(), false);
        assert_eq!(m.0[&0x10000], 0x11000 | URW | pte::A);
        assert_eq!(m.0[&0x11000], 0x20000 | URW | pte::A);
        let w = walk(&mut m, bits32(), 0x10000, 0x123, Access::PEEK).unwrap();
        set_accessed_dirty(&mut m, &w, bits32(), true);
        assert_eq!(m.0[&0x10000], 0x11000 | URW | pte::A, "no D in a PDE");
        assert_eq!(m.0[&0x11000], 0x20000 | URW | pte::A | pte::D);
    }

    #[test]
    fn pae_and_4_level() {
        let mut m = Mem::default();
        // PAE: PDPT at 0x10020 (32-byte aligned), entry 1 → PD 0x11000.
        m.0.insert(0x10020 + 8, 0x11000 | pte::P);
        m.0.insert(0x11000 + 2 * 8, 0x12000 | URW);
        m.0.insert(0x12000 + 5 * 8, 0x3_0000_0000 | URW | pte::XD);
        m.0.insert(0x11000 + 3 * 8, 0x0060_0000 | URW | pte::PS);
        let lin = (1 << 30) | (2 << 21) | (5 << 12) | 0x10;
        let nx = Access {
            nxe: true,
            ..Access::PEEK
        };
        let w = walk(&mut m, Mode::Pae, 0x10020, lin, nx).unwrap();
        assert_eq!(w.phys(lin), 0x3_0000_0010);
        assert!(!w.executable);
        let fetch = Access { fetch: true, ..nx };
        assert_eq!(walk(&mut m, Mode::Pae, 0x10020, lin, fetch), Err(0x11));
        assert_eq!(
            walk(&mut m, Mode::Pae, 0x10020, lin, Access::PEEK),
            Err(9),
            "XD is reserved without NXE"
        );
        let big = (1 << 30) | (3 << 21) | 0x4567;
        let w = walk(&mut m, Mode::Pae, 0x10020, big, Access::PEEK).unwrap();
        assert_eq!((w.phys(big), w.page_size), (0x0060_4567, 2 << 20));
        // 4-level: PML4 0x30000 → PDPT 0x31000 → PD 0x32000, 2 MiB page.
        m.0.insert(0x30000, 0x31000 | URW);
        m.0.insert(0x31000, 0x32000 | URW);
        m.0.insert(0x32008, 0x20_0000 | URW | pte::PS);
        let w = walk(&mut m, Mode::Level4, 0x30000, 0x20_1234, Access::PEEK).unwrap();
        assert_eq!(w.phys(0x20_1234), 0x20_1234);
        assert_eq!(w.entries().len(), 3);
        // A 1 GiB page at the PDPT level.
        m.0.insert(0x31008, 0x4000_0000 | URW | pte::PS);
        let w = walk(&mut m, Mode::Level4, 0x30000, 0x7654_3210, Access::PEEK).unwrap();
        assert_eq!((w.phys(0x7654_3210), w.page_size), (0x7654_3210, 1 << 30));
    }

    #[test]
    fn modes_from_control_registers() {
        let pg = cr::CR0_PG | cr::CR0_PE;
        assert_eq!(Mode::of(cr::CR0_PE, 0, 0), Mode::Off);
        let mut m = Mem::default();
        let w = walk(&mut m, Mode::Off, 0, 0x1_0000_1234, Access::PEEK).unwrap();
        assert_eq!(
            w.phys(0x1_0000_1234),
            0x1234,
            "4 GiB wrap outside long mode"
        );
        assert_eq!(Mode::of(pg, 0, 0), Mode::Bits32 { pse: false });
        assert_eq!(Mode::of(pg, cr::CR4_PAE, 0), Mode::Pae);
        assert_eq!(Mode::of(pg, cr::CR4_PAE, EFER_LMA), Mode::Level4);
    }
}
