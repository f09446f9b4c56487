//! The descriptor tables the CPU really uses while the guest runs
//! deprivileged: a shadow GDT derived from the guest's, an IDT whose gates
//! all have DPL 0 (so every `INT n` from ring 1 or 3 faults to the
//! monitor), and the monitor's TSS (no I/O bitmap, so every port access
//! from ring 1 or 3 faults too). They live in the monitor's top 4 MiB of
//! linear space; shadow segment limits stop short of it.

use popek_cpu::seg::Descriptor;
use popek_cpu::state::{attr, Segment, TableReg};

use crate::shadow::{GDT_PAGE, IDT_PAGE, TSS_PAGE, VMM_LINEAR};

/// The monitor's ring-0 code segment (the last GDT entries are its own).
pub const VMM_CS: u16 = 0xffe8;
/// The monitor's ring-0 data segment.
pub const VMM_DS: u16 = 0xfff0;
/// The monitor's TSS.
pub const VMM_TSS: u16 = 0xfff8;
/// First GDT byte offset the guest may not use.
pub const GUEST_GDT_END: u32 = VMM_CS as u32;
/// Linear address of the shadow GDT.
pub const GDT_LINEAR: u32 = VMM_LINEAR + GDT_PAGE as u32 * 4096;
/// Linear address of the shadow IDT.
pub const IDT_LINEAR: u32 = VMM_LINEAR + IDT_PAGE as u32 * 4096;
/// Linear address of the monitor's TSS.
pub const TSS_LINEAR: u32 = VMM_LINEAR + TSS_PAGE as u32 * 4096;
/// The highest linear address a guest segment reaches.
pub const SEG_TOP: u32 = VMM_LINEAR - 1;

/// Builds a descriptor from base, byte limit, type/S/DPL/P byte and flags.
pub fn make_descriptor(base: u32, limit: u32, access: u8, big: bool) -> Descriptor {
    let (lim, g) = if limit > 0xfffff {
        (limit >> 12, 1u32)
    } else {
        (limit, 0)
    };
    let lo = (base << 16) | (lim & 0xffff);
    let hi = ((base >> 16) & 0xff)
        | ((access as u32) << 8)
        | (lim & 0xf_0000)
        | ((big as u32) << 22)
        | (g << 23)
        | (base & 0xff00_0000);
    Descriptor { lo, hi }
}

/// The shadow of one guest GDT entry: DPL 0 compressed to 1 (the guest
/// kernel runs at ring 1), limits cut below the monitor's area, system
/// descriptors other than LDTs dropped (the monitor's TSS is the real
/// one), and DPL-3 segments not present unless `user_view`.
pub fn shadow_descriptor(d: Descriptor, user_view: bool) -> Descriptor {
    if !d.is_code_data() {
        return if d.typ() == 2 {
            d
        } else {
            Descriptor { lo: 0, hi: 0 }
        };
    }
    let mut hi = d.hi;
    let mut lo = d.lo;
    if d.dpl() == 0 {
        hi |= 1 << 13;
    }
    if d.dpl() == 3 && !user_view {
        hi &= !(1 << 15);
    }
    if d.dpl() == 0 && d.is_code() {
        // Every far transfer to guest ring-0 code faults (#NP) and is
        // emulated: the CPU would load it with RPL 1, the monitor knows
        // what the guest meant. (Event delivery sets CS itself.)
        hi &= !(1 << 15);
    }
    let seg = d.to_segment(0);
    let expand_down = !d.is_code() && d.typ() & 4 != 0;
    let base = seg.base as u32;
    if !expand_down && (base as u64 + seg.limit as u64) > SEG_TOP as u64 {
        let limit = SEG_TOP.saturating_sub(base);
        // The limit field in the descriptor's own granularity (a byte-granular
        // limit above 1 MiB cannot be expressed: 1 MiB is the closest below).
        let field = if hi & (1 << 23) != 0 {
            limit >> 12
        } else {
            limit.min(0xfffff)
        };
        lo = (lo & 0xffff_0000) | (field & 0xffff);
        hi = (hi & !0xf_0000) | (field & 0xf_0000);
    }
    Descriptor { lo, hi }
}

/// The monitor's three descriptors: ring-0 code, ring-0 data, its TSS
/// (busy: it is always loaded).
pub fn vmm_descriptors() -> [(u16, Descriptor); 3] {
    [
        (VMM_CS, make_descriptor(0, 0xffff_ffff, 0x9b, true)),
        (VMM_DS, make_descriptor(0, 0xffff_ffff, 0x93, true)),
        (VMM_TSS, make_descriptor(TSS_LINEAR, 103, 0x8b, false)),
    ]
}

/// The IDT gate every vector gets: a present 32-bit interrupt gate with
/// DPL 0 to the monitor's code segment. Exceptions never reach it (the
/// monitor intercepts them first); `INT n` at ring 1 or 3 fails its DPL
/// check and raises #GP(n × 8 + 2), which the monitor does intercept.
pub fn idt_gate() -> Descriptor {
    Descriptor {
        lo: (VMM_CS as u32) << 16,
        hi: 0x8e00,
    }
}

/// The real GDTR, IDTR and TR while the guest runs.
pub fn real_tables() -> (TableReg, TableReg, Segment) {
    (
        TableReg {
            base: GDT_LINEAR as u64,
            limit: 0xffff,
        },
        TableReg {
            base: IDT_LINEAR as u64,
            limit: 256 * 8 - 1,
        },
        Segment {
            selector: VMM_TSS,
            attr: attr::P | 0xb,
            limit: 103,
            base: TSS_LINEAR as u64,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_ring0_segments_move_to_ring1_and_stop_below_the_monitor() {
        let code = make_descriptor(0, 0xffff_ffff, 0x9a, true);
        let s = shadow_descriptor(code, false).to_segment(0x09);
        assert_eq!(s.dpl(), 1);
        assert_eq!(s.limit, SEG_TOP);
        assert!(!s.present(), "far transfers to ring-0 code trap");
        let data = make_descriptor(0, 0xffff_ffff, 0x92, true);
        let d = shadow_descriptor(data, false).to_segment(0x11);
        assert_eq!(d.dpl(), 1);
        assert!(d.present());
        let user = make_descriptor(0, 0xffff_ffff, 0xf2, true);
        assert!(!shadow_descriptor(user, false).present());
        let u = shadow_descriptor(user, true).to_segment(0x23);
        assert!(u.present());
        assert_eq!(u.dpl(), 3);
        let tss = make_descriptor(0x1000, 103, 0x89, false);
        assert_eq!(shadow_descriptor(tss, true), Descriptor { lo: 0, hi: 0 });
    }
}
