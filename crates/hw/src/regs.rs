//! Conversions between popek's engine-neutral [`CpuState`] and KVM's
//! register structures (`kvm_regs`, `kvm_sregs`, `kvm_fpu`, `kvm_debugregs`,
//! MSRs). Pure data: unit-tested without `/dev/kvm`.
//!
//! Segment caches: popek keeps the VMX access-rights layout in
//! [`Segment::attr`] and the expanded byte limit, which is also what
//! `kvm_segment` holds (split into fields). A not-present segment is marked
//! `unusable` for KVM (as VMX does for null selectors), and an unusable KVM
//! segment comes back with P = 0.

use kvm_bindings::{kvm_debugregs, kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use popek_cpu::state::{attr, FpuState, Msrs, Segment, TableReg, F80};
use popek_cpu::CpuState;

/// `kvm_segment` from a popek segment cache.
pub fn segment_to_kvm(s: &Segment) -> kvm_segment {
    let a = s.attr;
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: (a & 0xf) as u8,
        s: u8::from(a & attr::S != 0),
        dpl: ((a >> 5) & 3) as u8,
        present: u8::from(a & attr::P != 0),
        avl: u8::from(a & attr::AVL != 0),
        l: u8::from(a & attr::L != 0),
        db: u8::from(a & attr::DB != 0),
        g: u8::from(a & attr::G != 0),
        unusable: u8::from(a & attr::P == 0),
        padding: 0,
    }
}

/// A popek segment cache from a `kvm_segment`.
pub fn segment_from_kvm(k: &kvm_segment) -> Segment {
    let mut a = u16::from(k.type_ & 0xf) | (u16::from(k.dpl & 3) << 5);
    for (bit, on) in [
        (attr::S, k.s),
        (attr::P, k.present & !k.unusable),
        (attr::AVL, k.avl),
        (attr::L, k.l),
        (attr::DB, k.db),
        (attr::G, k.g),
    ] {
        if on != 0 {
            a |= bit;
        }
    }
    Segment {
        selector: k.selector,
        attr: a,
        limit: k.limit,
        base: k.base,
    }
}

fn dtable_to_kvm(t: &TableReg) -> kvm_dtable {
    kvm_dtable {
        base: t.base,
        limit: t.limit,
        padding: [0; 3],
    }
}

fn dtable_from_kvm(t: &kvm_dtable) -> TableReg {
    TableReg {
        base: t.base,
        limit: t.limit,
    }
}

/// General registers, RIP and RFLAGS.
pub fn regs_to_kvm(s: &CpuState) -> kvm_regs {
    let g = &s.gpr;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: s.rip,
        rflags: s.rflags,
    }
}

/// Stores `kvm_regs` into `s`.
pub fn regs_from_kvm(r: &kvm_regs, s: &mut CpuState) {
    s.gpr = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    s.rip = r.rip;
    s.rflags = r.rflags;
}

/// Segments, descriptor tables, control registers, EFER and the APIC base.
/// `base` supplies the fields popek does not model (the pending-interrupt
/// bitmap), normally what KVM last returned.
pub fn sregs_to_kvm(s: &CpuState, base: &kvm_sregs) -> kvm_sregs {
    use popek_cpu::state::seg;
    kvm_sregs {
        es: segment_to_kvm(&s.seg[seg::ES]),
        cs: segment_to_kvm(&s.seg[seg::CS]),
        ss: segment_to_kvm(&s.seg[seg::SS]),
        ds: segment_to_kvm(&s.seg[seg::DS]),
        fs: segment_to_kvm(&s.seg[seg::FS]),
        gs: segment_to_kvm(&s.seg[seg::GS]),
        tr: segment_to_kvm(&s.tr),
        ldt: segment_to_kvm(&s.ldtr),
        gdt: dtable_to_kvm(&s.gdtr),
        idt: dtable_to_kvm(&s.idtr),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.msr.apic_base,
        interrupt_bitmap: base.interrupt_bitmap,
    }
}

/// Stores `kvm_sregs` into `s`.
pub fn sregs_from_kvm(k: &kvm_sregs, s: &mut CpuState) {
    use popek_cpu::state::seg;
    s.seg[seg::ES] = segment_from_kvm(&k.es);
    s.seg[seg::CS] = segment_from_kvm(&k.cs);
    s.seg[seg::SS] = segment_from_kvm(&k.ss);
    s.seg[seg::DS] = segment_from_kvm(&k.ds);
    s.seg[seg::FS] = segment_from_kvm(&k.fs);
    s.seg[seg::GS] = segment_from_kvm(&k.gs);
    s.tr = segment_from_kvm(&k.tr);
    s.ldtr = segment_from_kvm(&k.ldt);
    s.gdtr = dtable_from_kvm(&k.gdt);
    s.idtr = dtable_from_kvm(&k.idt);
    s.cr0 = k.cr0;
    s.cr2 = k.cr2;
    s.cr3 = k.cr3;
    s.cr4 = k.cr4;
    s.cr8 = k.cr8;
    s.efer = k.efer;
    s.msr.apic_base = k.apic_base;
}

/// The full x87 tag of physical register `r` that FXSAVE abridges to
/// "not empty": valid (00), zero (01) or special (10), from its contents.
fn full_tag(r: &F80) -> u16 {
    let exp = r.sign_exp & 0x7fff;
    if exp == 0x7fff {
        2
    } else if exp == 0 {
        if r.mantissa == 0 {
            1
        } else {
            2
        }
    } else if r.mantissa >> 63 == 0 {
        2
    } else {
        0
    }
}

/// x87/SSE state in KVM's FXSAVE-like layout. The last instruction and
/// data pointers use the 32-bit FXSAVE format: offset in bits 0–31,
/// selector in bits 32–47.
pub fn fpu_to_kvm(f: &FpuState) -> kvm_fpu {
    let mut k = kvm_fpu {
        fcw: f.fcw,
        fsw: f.fsw,
        last_opcode: f.fop,
        last_ip: u64::from(f.fip) | (u64::from(f.fcs) << 32),
        last_dp: u64::from(f.fdp) | (u64::from(f.fds) << 32),
        mxcsr: f.mxcsr,
        ..kvm_fpu::default()
    };
    for (i, r) in f.regs.iter().enumerate() {
        k.fpr[i][..8].copy_from_slice(&r.mantissa.to_le_bytes());
        k.fpr[i][8..10].copy_from_slice(&r.sign_exp.to_le_bytes());
        if (f.ftw >> (2 * i)) & 3 != 3 {
            k.ftwx |= 1 << i;
        }
    }
    for (i, x) in f.xmm.iter().enumerate() {
        k.xmm[i] = x.to_le_bytes();
    }
    k
}

/// popek's x87/SSE state from KVM's.
pub fn fpu_from_kvm(k: &kvm_fpu) -> FpuState {
    let mut f = FpuState {
        fcw: k.fcw,
        fsw: k.fsw,
        fop: k.last_opcode & 0x7ff,
        fip: k.last_ip as u32,
        fcs: (k.last_ip >> 32) as u16,
        fdp: k.last_dp as u32,
        fds: (k.last_dp >> 32) as u16,
        mxcsr: k.mxcsr,
        ftw: 0,
        ..FpuState::default()
    };
    for i in 0..8 {
        let b = &k.fpr[i];
        f.regs[i] = F80 {
            mantissa: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            sign_exp: u16::from_le_bytes([b[8], b[9]]),
        };
        let tag = if k.ftwx & (1 << i) == 0 {
            3
        } else {
            full_tag(&f.regs[i])
        };
        f.ftw |= tag << (2 * i);
    }
    for (i, x) in k.xmm.iter().enumerate() {
        f.xmm[i] = u128::from_le_bytes(*x);
    }
    f
}

/// DR0–DR3, DR6, DR7.
pub fn debugregs_to_kvm(s: &CpuState) -> kvm_debugregs {
    kvm_debugregs {
        db: [s.dr[0], s.dr[1], s.dr[2], s.dr[3]],
        dr6: s.dr[6],
        dr7: s.dr[7],
        ..kvm_debugregs::default()
    }
}

/// Stores `kvm_debugregs` into `s` (DR4/DR5 alias DR6/DR7).
pub fn debugregs_from_kvm(k: &kvm_debugregs, s: &mut CpuState) {
    s.dr = [
        k.db[0], k.db[1], k.db[2], k.db[3], k.dr6, k.dr7, k.dr6, k.dr7,
    ];
}

/// MSR indices carried in [`Msrs`], in the order popek asks KVM for them
/// (the ones every KVM has first: `KVM_GET_MSRS` stops at the first it
/// refuses).
pub const MSR_INDICES: [u32; 10] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0x277,       // IA32_PAT
    0xc000_0103, // IA32_TSC_AUX
];

/// The values of [`MSR_INDICES`] in `m`.
pub fn msrs_values(m: &Msrs) -> [u64; 10] {
    [
        m.sysenter_cs,
        m.sysenter_esp,
        m.sysenter_eip,
        m.star,
        m.lstar,
        m.cstar,
        m.sfmask,
        m.kernel_gs_base,
        m.pat,
        m.tsc_aux,
    ]
}

/// Stores an MSR read from KVM into `m` (unknown indices are ignored).
pub fn msr_store(m: &mut Msrs, index: u32, value: u64) {
    let slot = match index {
        0x174 => &mut m.sysenter_cs,
        0x175 => &mut m.sysenter_esp,
        0x176 => &mut m.sysenter_eip,
        0xc000_0081 => &mut m.star,
        0xc000_0082 => &mut m.lstar,
        0xc000_0083 => &mut m.cstar,
        0xc000_0084 => &mut m.sfmask,
        0xc000_0102 => &mut m.kernel_gs_base,
        0x277 => &mut m.pat,
        0xc000_0103 => &mut m.tsc_aux,
        _ => return,
    };
    *slot = value;
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_cpu::state::seg;

    fn sample() -> CpuState {
        let mut s = CpuState::flat_protected(0x08, 0x10);
        for (i, g) in s.gpr.iter_mut().enumerate() {
            *g = 0x0101_0101_0000_0000u64.wrapping_mul(i as u64 + 1) + i as u64;
        }
        s.rip = 0x0010_2030;
        s.rflags = 0x246;
        s.gdtr = TableReg {
            base: 0x1000,
            limit: 0x27,
        };
        s.idtr = TableReg {
            base: 0x2000,
            limit: 0x7ff,
        };
        s.cr0 = 0x8000_0011;
        s.cr2 = 0xdead_b000;
        s.cr3 = 0x0030_0000;
        s.cr4 = 0x20;
        s.cr8 = 3;
        s.efer = 0x500;
        s.tr = Segment {
            selector: 0x28,
            attr: attr::P | 0xb,
            limit: 0x67,
            base: 0x5000,
        };
        s.seg[seg::FS] = Segment {
            selector: 0,
            attr: 0,
            limit: 0,
            base: 0x7fff_0000_1000,
        };
        s.seg[seg::CS].attr = (s.seg[seg::CS].attr & !attr::DB) | attr::L;
        s.dr = [1, 2, 3, 4, 0xffff_0ff1, 0x401, 0xffff_0ff1, 0x401];
        s.msr.sysenter_cs = 8;
        s.msr.lstar = 0xffff_ffff_8100_0000;
        s.msr.kernel_gs_base = 0x1234;
        s.fpu.regs[0] = F80 {
            mantissa: 0x8000_0000_0000_0000,
            sign_exp: 0x3fff,
        };
        s.fpu.regs[1] = F80 {
            mantissa: 0,
            sign_exp: 0x8000,
        };
        s.fpu.regs[2] = F80 {
            mantissa: 1,
            sign_exp: 0x7fff,
        };
        // R0 valid, R1 zero, R2 special, the rest empty.
        s.fpu.ftw = 0b11_11_11_11_11_10_01_00;
        s.fpu.fsw = 5 << 11;
        s.fpu.fip = 0x1234_5678;
        s.fpu.fcs = 0x08;
        s.fpu.fdp = 0x9abc_def0;
        s.fpu.fds = 0x10;
        s.fpu.fop = 0x5d9;
        s.fpu.xmm[3] = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
        s.fpu.mxcsr = 0x1fa0;
        s
    }

    fn round_trip(s: &CpuState) -> CpuState {
        let mut back = CpuState::reset();
        regs_from_kvm(&regs_to_kvm(s), &mut back);
        sregs_from_kvm(&sregs_to_kvm(s, &kvm_sregs::default()), &mut back);
        back.fpu = fpu_from_kvm(&fpu_to_kvm(&s.fpu));
        debugregs_from_kvm(&debugregs_to_kvm(s), &mut back);
        let vals = msrs_values(&s.msr);
        for (i, v) in MSR_INDICES.iter().zip(vals) {
            msr_store(&mut back.msr, *i, v);
        }
        back.msr.misc_enable = s.msr.misc_enable;
        back.msr.tsc_offset = s.msr.tsc_offset;
        back
    }

    #[test]
    fn state_round_trips_through_kvm_structures() {
        let s = sample();
        assert_eq!(round_trip(&s), s);
        let r = CpuState::reset();
        assert_eq!(round_trip(&r), r);
    }

    #[test]
    fn gprs_map_to_kvm_names() {
        let s = sample();
        let k = regs_to_kvm(&s);
        assert_eq!(k.rax, s.gpr[0]);
        assert_eq!(k.rbx, s.gpr[3]);
        assert_eq!(k.rsp, s.gpr[4]);
        assert_eq!(k.r15, s.gpr[15]);
        assert_eq!(k.rip, 0x0010_2030);
    }

    #[test]
    fn segment_fields_split_from_vmx_access_rights() {
        let cs = Segment::flat32(0x08, true);
        let k = segment_to_kvm(&cs);
        assert_eq!(
            (k.type_, k.s, k.dpl, k.present, k.db, k.g, k.l, k.unusable),
            (0xb, 1, 0, 1, 1, 1, 0, 0)
        );
        assert_eq!(k.limit, 0xffff_ffff);
        let user = Segment::flat32(0x23, false);
        assert_eq!(segment_to_kvm(&user).dpl, 3);
        // A null (not-present) selector is unusable for KVM and stays not-present.
        let null = Segment::default();
        let k = segment_to_kvm(&null);
        assert_eq!(k.unusable, 1);
        assert_eq!(segment_from_kvm(&k), null);
        // KVM may report an unusable segment with P still set.
        let mut k = segment_to_kvm(&cs);
        k.unusable = 1;
        assert!(!segment_from_kvm(&k).present());
    }

    #[test]
    fn real_mode_segments_are_usable() {
        let s = Segment::real(0x1000);
        let k = segment_to_kvm(&s);
        assert_eq!(
            (k.base, k.limit, k.present, k.unusable),
            (0x10000, 0xffff, 1, 0)
        );
        assert_eq!(k.type_, 3);
    }

    #[test]
    fn fpu_tags_abridge_and_expand() {
        let s = sample();
        let k = fpu_to_kvm(&s.fpu);
        assert_eq!(k.ftwx, 0b0000_0111);
        assert_eq!(k.last_ip, 0x0008_1234_5678);
        assert_eq!(&k.fpr[0][..10], &[0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f]);
        let f = fpu_from_kvm(&k);
        assert_eq!(f.ftw, s.fpu.ftw);
        // An empty FPU (KVM's reset state) is all-empty for popek.
        let f = fpu_from_kvm(&kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..kvm_fpu::default()
        });
        assert_eq!(f.ftw, 0xffff);
        assert_eq!(f.fcw, 0x37f);
    }

    #[test]
    fn sregs_keep_kvm_only_fields() {
        let base = kvm_sregs {
            interrupt_bitmap: [0, 1 << 5, 0, 0],
            ..kvm_sregs::default()
        };
        let k = sregs_to_kvm(&sample(), &base);
        assert_eq!(k.interrupt_bitmap, base.interrupt_bitmap);
        assert_eq!(k.efer, 0x500);
        assert_eq!(k.apic_base, 0xfee0_0900);
        assert_eq!((k.gdt.base, k.gdt.limit), (0x1000, 0x27));
        assert_eq!(k.cs.l, 1);
    }

    #[test]
    fn unknown_msrs_are_ignored() {
        let mut m = Msrs::default();
        msr_store(&mut m, 0x10, 99);
        assert_eq!(m, Msrs::default());
        msr_store(&mut m, 0xc000_0082, 7);
        assert_eq!(m.lstar, 7);
    }
}
