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
/// kernel runs at ring 1), confined below the monitor's area
/// ([`confine`]), system descriptors dropped (the monitor's TSS is the
/// real one; LDTs are not shadowed, so LDT descriptors are dropped too),
/// and DPL-3 segments not present unless `user_view`.
pub fn shadow_descriptor(d: Descriptor, user_view: bool) -> Descriptor {
    if !d.is_code_data() {
        return Descriptor { lo: 0, hi: 0 };
    }
    let mut hi = d.hi;
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
    confine(Descriptor { lo: d.lo, hi })
}

/// The linear addresses a code or data segment with this hidden-cache
/// value reaches, as inclusive intervals (offsets wrap at 4 GiB in linear
/// space): expand-up segments `base + [0, limit]`, expand-down ones
/// `base + (limit, 0xffff or 0xffff_ffff]`.
pub fn reach(s: &Segment) -> Vec<(u32, u32)> {
    let expand_down = s.attr & attr::CODE == 0 && s.attr & attr::DC != 0;
    let (lo, hi) = if expand_down {
        let top = if s.attr & attr::DB != 0 {
            0xffff_ffffu64
        } else {
            0xffff
        };
        if s.limit as u64 >= top {
            return Vec::new();
        }
        (s.limit as u64 + 1, top)
    } else {
        (0, s.limit as u64)
    };
    let base = s.base & 0xffff_ffff;
    let (a, b) = (base + lo, base + hi);
    if b < 1 << 32 {
        vec![(a as u32, b as u32)]
    } else if a >= 1 << 32 {
        vec![((a - (1 << 32)) as u32, (b - (1 << 32)) as u32)]
    } else {
        vec![(a as u32, u32::MAX), (0, (b - (1 << 32)) as u32)]
    }
}

/// True when no linear address the segment reaches is the monitor's.
pub fn confined(s: &Segment) -> bool {
    reach(s).iter().all(|&(_, end)| end <= SEG_TOP)
}

/// A segment (hidden-cache value) reaching no linear address at or above
/// [`VMM_LINEAR`]: the limit of an expand-up segment is cut to end below
/// it, the limit of an expand-down segment raised so that its offsets start
/// where they wrap to linear 0. A data segment that cannot keep any reach
/// below the cut (a base in the monitor's area; an expand-down segment
/// whose top lies there) becomes an expand-down segment without valid
/// offsets (every access faults); such a code segment has no safe form:
/// `None`. Guest accesses beyond a cut fault (#GP, #SS) as they would
/// beyond a limit: the price of sharing the linear space with the monitor.
pub fn confine_segment(s: Segment) -> Option<Segment> {
    let s = Segment {
        base: s.base & 0xffff_ffff,
        ..s
    };
    if confined(&s) {
        return Some(s);
    }
    let base = s.base as u32;
    let code = s.attr & attr::CODE != 0;
    let cut = if code || s.attr & attr::DC == 0 {
        (base <= SEG_TOP).then(|| Segment {
            limit: SEG_TOP - base,
            ..s
        })
    } else {
        // Raise the start to where offsets wrap to linear 0: the wrapped
        // part ends at base − 1.
        (base != 0).then(|| Segment {
            limit: ((1u64 << 32) - (base as u64 + 1)) as u32,
            ..s
        })
    };
    match cut.filter(confined) {
        Some(c) => Some(c),
        None if code => None,
        None => Some(Segment {
            attr: s.attr | attr::DC,
            limit: u32::MAX,
            ..s
        }),
    }
}

/// [`confine_segment`] for a code or data descriptor, with the limit
/// rounded to its granularity in the safe direction; code without a safe
/// form is made not present (a far transfer to it faults with #NP, and the
/// monitor refuses to install it).
pub fn confine(d: Descriptor) -> Descriptor {
    if !d.is_code_data() {
        return d;
    }
    let seg = d.to_segment(0);
    let d2 = match confine_segment(seg) {
        Some(c) if c == seg => d,
        Some(c) if c.attr & attr::DC == seg.attr & attr::DC => {
            let e = with_limit(
                d,
                c.limit,
                c.attr & attr::CODE == 0 && c.attr & attr::DC != 0,
            );
            if confined(&e.to_segment(0)) {
                e
            } else {
                unusable(d)
            }
        }
        _ => unusable(d),
    };
    debug_assert!(!d2.present() || confined(&d2.to_segment(0)));
    d2
}

/// `d` with a limit as close to `limit` as its granularity allows, never
/// reaching further: at most `limit` (expand-up, `up == false`) or at
/// least `limit` (expand-down, `up == true`). G changes where the value
/// needs it.
fn with_limit(d: Descriptor, limit: u32, up: bool) -> Descriptor {
    let (field, g) = if !up {
        if limit <= 0xfffff && (limit < 0xfff || d.hi & (1 << 23) == 0) {
            (limit, false)
        } else if limit >= 0xfff {
            (((limit as u64 + 1) >> 12) as u32 - 1, true)
        } else {
            (limit, false)
        }
    } else if limit <= 0xfffff && d.hi & (1 << 23) == 0 {
        (limit, false)
    } else {
        (limit >> 12, true)
    };
    let lo = (d.lo & 0xffff_0000) | (field & 0xffff);
    let mut hi = (d.hi & !0x000f_0000 & !(1 << 23)) | (field & 0xf_0000);
    if g {
        hi |= 1 << 23;
    }
    Descriptor { lo, hi }
}

/// A descriptor of the same kind that reaches nothing: data becomes an
/// expand-down segment whose limit is its top (no valid offset), code is
/// not present.
fn unusable(d: Descriptor) -> Descriptor {
    if d.is_code() {
        return Descriptor {
            lo: d.lo,
            hi: d.hi & !(1 << 15),
        };
    }
    Descriptor {
        lo: d.lo | 0xffff,
        hi: d.hi | 0x000f_0000 | (1 << 23) | (4 << 8),
    }
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
    use proptest::prelude::*;

    /// Descriptor words biased towards the dangerous corners: bases at,
    /// near and above the monitor's area and near 0, limits near 0 and
    /// the maximum, every type, G, B and expand-down.
    fn descriptor() -> impl Strategy<Value = Descriptor> {
        let base = prop_oneof![
            any::<u32>(),
            Just(0u32),
            (0u32..0x2000),
            (VMM_LINEAR - 0x2000..VMM_LINEAR + 0x2000),
            (0xffff_0000u32..=u32::MAX),
        ];
        let limit = prop_oneof![any::<u32>(), (0u32..0x20), (0xf_ff00u32..=0xf_ffff)];
        (base, limit, any::<u8>(), any::<u8>()).prop_map(|(base, limit, access, flags)| {
            let lo = (base << 16) | (limit & 0xffff);
            let hi = ((base >> 16) & 0xff)
                | ((access as u32) << 8)
                | (limit & 0xf_0000)
                | (((flags & 0xd) as u32) << 20)
                | (base & 0xff00_0000);
            Descriptor { lo, hi }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Whatever descriptor the guest puts in its GDT, the segment the
        /// CPU can load from the shadow reaches no byte of the monitor's
        /// area, and system descriptors (gates, TSSs, LDTs) never reach the
        /// real GDT.
        #[test]
        fn no_shadow_descriptor_reaches_the_monitor(d in descriptor(), user in any::<bool>()) {
            let s = shadow_descriptor(d, user);
            if s.is_code_data() {
                let seg = s.to_segment(0);
                prop_assert!(
                    !s.present() || confined(&seg),
                    "{d:x?} -> {s:x?} reaches {:x?}",
                    reach(&seg)
                );
            } else {
                prop_assert_eq!(s, Descriptor { lo: 0, hi: 0 });
            }
        }

        /// The same for hidden-cache values installed from a guest state
        /// (boot, restore): confined, or refused (code only).
        #[test]
        fn installed_segments_are_confined(d in descriptor(), base_hi in any::<u32>()) {
            let d = Descriptor { lo: d.lo, hi: d.hi | 1 << 12 };
            let mut seg = d.to_segment(0);
            seg.base |= (base_hi as u64) << 32;
            match confine_segment(seg) {
                Some(c) => prop_assert!(confined(&c), "{seg:x?} -> {c:x?}"),
                None => prop_assert!(seg.attr & attr::CODE != 0),
            }
        }

        /// Confinement changes nothing a segment already confined reaches.
        #[test]
        fn confined_segments_are_left_alone(d in descriptor()) {
            let d = Descriptor { lo: d.lo, hi: d.hi | 1 << 12 };
            if confined(&d.to_segment(0)) {
                prop_assert_eq!(confine(d), d);
            } else {
                prop_assert!(confine(d) != d || !d.present());
            }
        }
    }

    /// The cases of the isolation break that was reported: an expand-down
    /// data segment with base 0 and limit 0 (G = 1), a base at the
    /// monitor's area, and a base that is not page-aligned.
    #[test]
    fn the_reported_escapes_are_closed() {
        let expand_down = make_descriptor(0, 0, 0x96, true);
        let mut ed = expand_down;
        ed.hi |= 1 << 23;
        let at_monitor = Descriptor {
            lo: 0,
            hi: 0xff00_0000 | 0xc0 << 16 | 0x92 << 8 | 0xc0,
        };
        let unaligned = make_descriptor(0x10, 0xffff_ffff, 0x92, true);
        for d in [expand_down, ed, at_monitor, unaligned] {
            let s = shadow_descriptor(d, false);
            let seg = s.to_segment(0);
            assert!(confined(&seg), "{d:x?} -> {s:x?}: {:x?}", reach(&seg));
        }
        // An expand-down segment whose offsets wrap below the monitor keeps
        // that part: base 4 MiB, offsets from 0xffc0_0000 reach 0..4 MiB.
        let wraps = make_descriptor(0x40_0000, 0xffbf_ffff, 0x96, true);
        let seg = shadow_descriptor(wraps, false).to_segment(0);
        assert_eq!(reach(&seg), vec![(0, 0x3f_ffff)]);
    }

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
