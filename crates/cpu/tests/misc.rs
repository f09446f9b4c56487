//! Directed tests of SYSENTER/SYSEXIT, CPUID, RDTSC, MSRs, the x87/SSE
//! state instructions with #NM, self-modifying code, and virtual-8086 mode.

mod common;
use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::{cr, flags, seg as sr, F80};
use popek_cpu::{CpuidLeaf, RunExit, Vendor};

fn halted_clean(s: &mut Sys) {
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None, "unexpected exception");
}

#[test]
fn sysexit_to_ring3_and_sysenter_back() {
    let mut s = Sys::new();
    let kentry = 0x18000u32;
    let ram = s.c.ram().clone();
    ram.write(
        kentry as u64,
        &asm(32, kentry as u64, |a| {
            a.mov(eax, cs)?;
            a.mov(ebx, ss)?;
            a.mov(esi, esp)?;
            a.pushfd()?;
            a.pop(edi)?;
            a.hlt()
        }),
    )
    .unwrap();
    let user = ucode(|a| {
        a.mov(ebp, cs)?;
        a.sysenter()
    });
    ram.write(UCODE_AT, &user).unwrap();
    s.eflags = flags::IF;
    let code = kcode(|a| {
        a.mov(ecx, 0x174u32)?; // SYSENTER_CS
        a.mov(eax, KCODE as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0x175u32)?; // SYSENTER_ESP
        a.mov(eax, 0xa000u32)?;
        a.wrmsr()?;
        a.mov(ecx, 0x176u32)?; // SYSENTER_EIP
        a.mov(eax, kentry)?;
        a.wrmsr()?;
        a.mov(ecx, 0x174u32)?;
        a.rdmsr()?;
        a.mov(dword_ptr(0x30000), eax)?;
        a.mov(edx, UCODE_AT as u32)?;
        a.mov(ecx, USTACK)?;
        a.sysexit()
    });
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!(s.rd32(0x30000), KCODE as u32);
    assert_eq!(
        s.gpr(5),
        UCODE as u32,
        "SYSEXIT went to CS = SYSENTER_CS + 16 | 3"
    );
    assert_eq!(s.gpr(0), KCODE as u32);
    assert_eq!(s.gpr(3), KDATA as u32);
    assert_eq!(s.gpr(6), 0xa000);
    assert_eq!(s.gpr(7) & flags::IF, 0, "SYSENTER clears IF");
    let st = s.c.state();
    assert_eq!(st.seg[sr::SS].limit, 0xffff_ffff);
}

#[test]
fn sysenter_with_null_sysenter_cs_is_gp0() {
    let mut s = Sys::new();
    let code = ucode(|a| a.sysenter());
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (13, Some(0), UCODE_AT as u32));
}

#[test]
fn sysexit_at_cpl3_is_gp0() {
    let mut s = Sys::new();
    let code = ucode(|a| a.sysexit());
    s.start_user(&code);
    s.c.state_mut().msr.sysenter_cs = KCODE as u64;
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(0)));
}

#[test]
fn sysenter_in_real_mode_is_gp0() {
    let mut c = common::cpu(1);
    let mut st = popek_cpu::CpuState::reset();
    st.seg[sr::CS] = popek_cpu::Segment::real(0);
    st.rip = 0x1000;
    st.msr.sysenter_cs = 8;
    c.set_state(st);
    c.ram().write(0x1000, &[0x0f, 0x34]).unwrap();
    c.exception_bitmap = 1 << 13;
    let mut bus = common::TestBus::default();
    assert_eq!(
        c.run(&mut bus, 10),
        RunExit::Exception {
            vector: 13,
            error_code: Some(0),
            software: false
        }
    );
}

#[test]
fn cpuid_leaves_follow_the_vendor_profile() {
    for vendor in Vendor::ALL {
        let mut s = Sys::new();
        s.vendor = vendor;
        let code = ucode(|a| {
            a.xor(eax, eax)?;
            a.cpuid()?;
            a.mov(dword_ptr(0x30000), eax)?;
            a.mov(dword_ptr(0x30004), ebx)?;
            a.mov(dword_ptr(0x30008), edx)?;
            a.mov(dword_ptr(0x3000c), ecx)?;
            a.mov(eax, 1u32)?;
            a.cpuid()?;
            a.mov(dword_ptr(0x30010), eax)?;
            a.mov(dword_ptr(0x30014), edx)?;
            a.mov(eax, 0x8000_0000u32)?;
            a.cpuid()?;
            a.mov(dword_ptr(0x30018), eax)?;
            a.mov(eax, 0x8000_0002u32)?;
            a.cpuid()?;
            a.mov(dword_ptr(0x30020), eax)?;
            a.mov(dword_ptr(0x30024), ebx)?;
            a.mov(eax, 0x1000u32)?; // beyond the maximum basic leaf
            a.cpuid()?;
            a.mov(dword_ptr(0x30028), eax)?;
            a.hlt()
        });
        s.start_user(&code);
        s.c.report_sensitive = true;
        let t = s.run_trap();
        assert_eq!(t.vector, 13);
        let id = vendor.identity();
        let mut v = [0u8; 12];
        s.ram().read(0x30004, &mut v).unwrap();
        assert_eq!(&v, id.vendor);
        assert_eq!(s.rd32(0x30000), 1, "max basic leaf");
        let sig = s.rd32(0x30010);
        assert_eq!((sig >> 8 & 0xf, sig >> 4 & 0xf), (6, id.model as u32));
        let feat = s.rd32(0x30014);
        for bit in [0, 4, 5, 8, 11, 13, 15, 24] {
            assert_ne!(feat & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(feat & (1 << 25), 0, "no SSE advertised");
        let (max_ext, beyond) = match vendor {
            Vendor::Intel => (0x8000_0004, 1), // the highest basic leaf
            Vendor::Amd => (0x8000_0008, 0),   // zeros
        };
        assert_eq!(s.rd32(0x30018), max_ext);
        assert_eq!(s.rd32(0x30028) >> 8 & 0xf, beyond * 6, "{vendor}");
        let mut brand = [0u8; 8];
        s.ram().read(0x30020, &mut brand).unwrap();
        assert_eq!(&brand, b"popek vi");
        let cpuid_events = s
            .bus
            .events
            .iter()
            .filter(|e| e.kind == popek_cpu::SensitiveKind::Cpuid)
            .count();
        assert_eq!(cpuid_events, 5);
    }
}

#[test]
fn cpuid_model_is_configurable() {
    let mut s = Sys::new();
    s.vendor = Vendor::Intel;
    s.start_kernel(&[0xf4]);
    s.c.cpuid.basic[0].ebx = u32::from_le_bytes(*b"Auth");
    s.c.cpuid.basic.push(CpuidLeaf {
        eax: 0x42,
        ..Default::default()
    });
    s.c.cpuid.basic[0].eax = 2;
    let code = kcode(|a| {
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.mov(esi, ebx)?;
        a.mov(eax, 2u32)?;
        a.cpuid()?;
        a.mov(edi, eax)?;
        a.mov(eax, 0x1000u32)?; // beyond the max: the highest basic leaf
        a.cpuid()?;
        a.hlt()
    });
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!(s.gpr(6), u32::from_le_bytes(*b"Auth"));
    assert_eq!(s.gpr(7), 0x42);
    assert_eq!(s.gpr(0), 0x42);
}

#[test]
fn rdtsc_reads_the_bus_clock_plus_offset() {
    let mut s = Sys::new();
    s.bus.tsc = Some(0x1_2345_6789);
    let code = kcode(|a| {
        a.rdtsc()?;
        a.mov(esi, eax)?;
        a.mov(edi, edx)?;
        // WRMSR TSC = 0x10 → offset = 0x10 - clock.
        a.mov(ecx, 0x10u32)?;
        a.mov(eax, 0x10u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdtsc()?;
        a.hlt()
    });
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!((s.gpr(6), s.gpr(7)), (0x2345_6789, 1));
    assert_eq!((s.gpr(0), s.gpr(2)), (0x10, 0), "the clock did not move");
}

#[test]
fn rdtsc_at_cpl3_faults_with_cr4_tsd() {
    let mut s = Sys::new();
    s.bus.tsc = Some(77);
    s.start_user(&ucode(|a| {
        a.rdtsc()?;
        a.hlt()
    }));
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.eip),
        (13, UCODE_AT as u32 + 2),
        "allowed without TSD"
    );
    assert_eq!(s.gpr(0), 77);

    let mut s = Sys::new();
    s.cr4 |= cr::CR4_TSD;
    s.start_user(&ucode(|a| {
        a.rdtsc()?;
        a.hlt()
    }));
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (13, Some(0), UCODE_AT as u32));

    let mut s = Sys::new();
    s.cr4 |= cr::CR4_TSD;
    s.bus.tsc = Some(5);
    s.start_kernel(&kcode(|a| {
        a.rdtsc()?;
        a.hlt()
    }));
    halted_clean(&mut s);
    assert_eq!(s.gpr(0), 5, "CPL 0 may still read it");
}

#[test]
fn unknown_msrs_raise_gp0() {
    for (ecx_v, write) in [
        (0x1234_5678u32, false),
        // STAR: no SYSCALL in the model (EFER exists, for NXE).
        (0xc000_0081, false),
        (0x1234_5678, true),
        (0x3a, true),
    ] {
        let mut s = Sys::new();
        let code = kcode(|a| {
            a.mov(ecx, ecx_v)?;
            if write {
                a.wrmsr()
            } else {
                a.rdmsr()
            }
        });
        s.start_kernel(&code);
        let t = s.run_trap();
        assert_eq!(
            (t.vector, t.err, t.eip),
            (13, Some(0), KCODE_AT as u32 + 5),
            "{ecx_v:#x} write={write}"
        );
    }
}

#[test]
fn known_msrs_round_trip() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.mov(ecx, 0x277u32)?; // PAT
        a.mov(eax, 0x0106_0406u32)?;
        a.mov(edx, 0x0007_0406u32)?;
        a.wrmsr()?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.rdmsr()?;
        a.hlt()
    });
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!((s.gpr(0), s.gpr(2)), (0x0106_0406, 0x0007_0406));
    assert_eq!(s.c.state().msr.pat, 0x0007_0406_0106_0406);
}

#[test]
fn fninit_fnstsw_fnstcw_fldcw() {
    let mut s = Sys::new();
    s.c.state_mut().fpu.fsw = 0x3801; // some garbage state
    let code = kcode(|a| {
        a.fninit()?;
        a.fnstsw(ax)?;
        a.mov(ebx, eax)?;
        a.fnstcw(word_ptr(0x30000))?;
        a.mov(word_ptr(0x30002), 0x027fu32)?;
        a.fldcw(word_ptr(0x30002))?;
        a.fnstcw(word_ptr(0x30004))?;
        a.fnstsw(word_ptr(0x30006))?;
        a.hlt()
    });
    s.start_kernel(&code);
    // start_kernel resets the state: set the garbage afterwards.
    s.c.state_mut().fpu.fsw = 0x3801;
    s.c.state_mut().fpu.ftw = 0;
    halted_clean(&mut s);
    assert_eq!(s.gpr(3) & 0xffff, 0);
    let r = s.ram();
    assert_eq!(r.read_u16(0x30000).unwrap(), 0x037f);
    assert_eq!(r.read_u16(0x30004).unwrap(), 0x027f);
    assert_eq!(r.read_u16(0x30006).unwrap(), 0);
    assert_eq!(s.c.state().fpu.ftw, 0xffff, "all empty");
}

fn fpu_pattern(s: &mut Sys) {
    let f = &mut s.c.state_mut().fpu;
    f.fcw = 0x027f; // all exceptions masked (else FRSTOR would set ES/B)
    f.fsw = 0x2800 | 0x41; // TOP = 5, SF, IE
    f.ftw = 0x5a3c;
    f.fop = 0x123;
    f.fip = 0x1111_2222;
    f.fcs = 0x08;
    f.fdp = 0x3333_4444;
    f.fds = 0x10;
    f.mxcsr = 0x1fa0;
    for i in 0..8 {
        f.regs[i] = F80 {
            mantissa: 0x8000_0000_0000_0000 | (i as u64 * 0x0101_0101),
            sign_exp: 0x3fff + i as u16,
        };
    }
    for i in 0..8 {
        f.xmm[i] = 0x0123_4567_89ab_cdef_0000_0000_0000_0000u128 | i as u128;
    }
}

#[test]
fn fnsave_frstor_round_trip() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.fnsave(ptr(0x30000))?;
        a.fnstcw(word_ptr(0x30100))?; // FNSAVE reinitialized the FPU
        a.frstor(ptr(0x30000))?;
        a.hlt()
    });
    s.start_kernel(&code);
    fpu_pattern(&mut s);
    let before = s.c.state().fpu;
    halted_clean(&mut s);
    let r = s.ram();
    assert_eq!(r.read_u16(0x30100).unwrap(), 0x037f);
    // The 108-byte image: control, status, tag, FIP, FCS|FOP, FDP, FDS.
    assert_eq!(r.read_u16(0x30000).unwrap(), 0x027f);
    assert_eq!(r.read_u16(0x30004).unwrap(), 0x2841);
    // FNSAVE stores tags computed from the contents: the non-empty
    // registers all hold normal numbers (00), R1 and R2 are empty (11).
    assert_eq!(r.read_u16(0x30008).unwrap(), 0x003c);
    assert_eq!(r.read_u32(0x3000c).unwrap(), 0x1111_2222);
    assert_eq!(r.read_u32(0x30010).unwrap(), 0x08 | 0x123 << 16);
    assert_eq!(r.read_u32(0x30014).unwrap(), 0x3333_4444);
    assert_eq!(r.read_u16(0x30018).unwrap(), 0x10);
    // ST(0) = R[TOP] = R5.
    assert_eq!(r.read_u64(0x3001c).unwrap(), before.regs[5].mantissa);
    assert_eq!(r.read_u16(0x3001c + 8).unwrap(), before.regs[5].sign_exp);
    assert_eq!(
        r.read_u64(0x3001c + 70).unwrap(),
        before.regs[4].mantissa,
        "ST(7) = R4"
    );
    let after = s.c.state().fpu;
    assert_eq!(after.fcw, before.fcw);
    assert_eq!(after.fsw, before.fsw);
    assert_eq!(after.ftw, 0x003c, "FRSTOR loads the stored (computed) tags");
    assert_eq!(
        (after.fip, after.fcs, after.fdp, after.fds, after.fop),
        (before.fip, before.fcs, before.fdp, before.fds, before.fop)
    );
    assert_eq!(after.regs, before.regs);
}

#[test]
fn fxsave_fxrstor_round_trip() {
    let mut s = Sys::new();
    s.cr4 |= cr::CR4_OSFXSR;
    let code = kcode(|a| {
        a.fxsave(ptr(0x30000))?;
        a.fninit()?;
        a.fxrstor(ptr(0x30000))?;
        a.hlt()
    });
    s.start_kernel(&code);
    fpu_pattern(&mut s);
    let before = s.c.state().fpu;
    halted_clean(&mut s);
    let r = s.ram();
    assert_eq!(r.read_u16(0x30000).unwrap(), 0x027f);
    assert_eq!(r.read_u16(0x30002).unwrap(), 0x2841);
    // Abridged tag: 0x5a3c = R7..R0 tags 01 01 10 10 00 11 11 00: R1, R2 empty.
    assert_eq!(r.read_u8(0x30004).unwrap(), 0b1111_1001);
    assert_eq!(r.read_u16(0x30006).unwrap(), 0x123);
    assert_eq!(r.read_u32(0x30008).unwrap(), 0x1111_2222);
    assert_eq!(r.read_u32(0x30018).unwrap(), 0x1fa0, "MXCSR");
    assert_eq!(r.read_u64(0x30020).unwrap(), before.regs[5].mantissa, "ST0");
    assert_eq!(r.read_u64(0x300a0).unwrap(), 0, "XMM0 low");
    assert_eq!(r.read_u64(0x300a8).unwrap(), 0x0123_4567_89ab_cdef);
    let after = s.c.state().fpu;
    assert_eq!(after.fcw, before.fcw);
    assert_eq!(after.fsw, before.fsw);
    assert_eq!(after.regs, before.regs);
    assert_eq!(after.xmm[..8], before.xmm[..8]);
    assert_eq!(after.mxcsr, before.mxcsr);
    // The abridged tag word restores empty/non-empty, not the class.
    for i in 0..8 {
        let was_empty = (before.ftw >> (2 * i)) & 3 == 3;
        let is_empty = (after.ftw >> (2 * i)) & 3 == 3;
        assert_eq!(was_empty, is_empty, "R{i}");
    }
}

#[test]
fn fxsave_misaligned_is_gp0() {
    let mut s = Sys::new();
    let code = kcode(|a| a.fxsave(ptr(0x30008)));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (13, Some(0), KCODE_AT as u32));
}

#[test]
fn fxrstor_with_reserved_mxcsr_bits_is_gp0() {
    let mut s = Sys::new();
    s.ram().write_u32(0x30018, 0xffff_0000).unwrap();
    let code = kcode(|a| a.fxrstor(ptr(0x30000)));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(0)));
}

#[test]
fn nm_with_cr0_ts_and_em() {
    type F = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;
    let insns: Vec<(&str, F)> = vec![
        ("fninit", |a| a.fninit()),
        ("fnstsw", |a| a.fnstsw(ax)),
        ("fnsave", |a| a.fnsave(ptr(0x30000))),
        ("fxsave", |a| a.fxsave(ptr(0x30000))),
        ("fld1", |a| a.fld1()),
    ];
    for bit in [cr::CR0_TS, cr::CR0_EM] {
        for (name, f) in &insns {
            let mut s = Sys::new();
            s.cr0 |= bit;
            s.start_kernel(&kcode(f));
            let t = s.run_trap();
            assert_eq!(
                (t.vector, t.err, t.eip),
                (7, None, KCODE_AT as u32),
                "{name} with CR0 {bit:#x}"
            );
        }
    }
}

#[test]
fn clts_clears_ts_and_the_instruction_then_runs() {
    let mut s = Sys::new();
    s.cr0 |= cr::CR0_TS;
    // #NM handler: CLTS and retry.
    s.ram()
        .write(
            0x18000,
            &asm(32, 0x18000, |a| {
                a.clts()?;
                a.iretd()
            }),
        )
        .unwrap();
    s.idt(7, gate(INT_GATE, KCODE, 0x18000, 0, 0));
    s.start_kernel(&kcode(|a| {
        a.fninit()?;
        a.fnstcw(word_ptr(0x30000))?;
        a.hlt()
    }));
    halted_clean(&mut s);
    assert_eq!(s.ram().read_u16(0x30000).unwrap(), 0x037f);
    assert_eq!(s.c.state().cr0 & cr::CR0_TS, 0);
}

#[test]
fn wait_faults_only_with_mp_and_ts() {
    for (bits, nm) in [
        (cr::CR0_TS, false),
        (cr::CR0_MP, false),
        (cr::CR0_MP | cr::CR0_TS, true),
        (cr::CR0_EM | cr::CR0_TS, false),
    ] {
        let mut s = Sys::new();
        s.cr0 |= bits;
        s.start_kernel(&kcode(|a| {
            a.wait()?;
            a.hlt()
        }));
        assert_eq!(s.run(), RunExit::Halted);
        assert_eq!(s.stub_vector(), nm.then_some(7), "CR0 bits {bits:#x}");
    }
}

#[test]
fn store_into_the_running_block_takes_effect() {
    let mut s = Sys::new();
    // mov byte [patch+1], 0x42 ; patch: mov eax, 0x11 ; hlt — in one block.
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(byte_ptr(KCODE_AT as u32 + 7 + 1), 0x42u32)),
            Box::new(|a| {
                a.mov(eax, 0x11u32)?;
                a.hlt()
            }),
        ],
    );
    assert_eq!(at[1], KCODE_AT as u32 + 7);
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!(s.gpr(0), 0x42);
    assert!(s.c.stats.invalidations >= 1);
}

#[test]
fn store_into_code_after_it_ran_is_seen_on_the_next_pass() {
    let mut s = Sys::new();
    // A loop that runs its body twice, patching the body's immediate in
    // between; the second pass must see the new byte.
    let body = KCODE_AT as u32 + 0x40;
    let code = kcode(|a| {
        a.mov(ecx, 2u32)?;
        a.xor(ebx, ebx)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(eax, body)?;
        a.call(eax)?;
        a.add(ebx, eax)?;
        a.mov(byte_ptr(body + 1), 0x30u32)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    s.ram()
        .write(
            body as u64,
            &asm(32, body as u64, |a| {
                a.mov(eax, 0x01u32)?;
                a.ret()
            }),
        )
        .unwrap();
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!(s.gpr(3), 0x31);
}

#[test]
fn smc_through_a_different_linear_alias() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    // Linear 0x200000 aliases the code page at 0x10000.
    s.set_pte(0x20_0000, KCODE_AT as u32 | P | W);
    let (code, _) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(byte_ptr(0x20_0000 + 7 + 1), 0x42u32)),
            Box::new(|a| {
                a.mov(eax, 0x11u32)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!(s.gpr(0), 0x42);
}

#[test]
fn code_rewritten_by_guest_ram_write_between_runs_is_redecoded() {
    let mut s = Sys::new();
    s.start_kernel(&kcode(|a| {
        a.mov(eax, 1u32)?;
        a.hlt()
    }));
    halted_clean(&mut s);
    assert_eq!(s.gpr(0), 1);
    s.ram()
        .write(
            KCODE_AT,
            &kcode(|a| {
                a.mov(eax, 2u32)?;
                a.hlt()
            }),
        )
        .unwrap();
    s.c.state_mut().rip = KCODE_AT;
    s.c.state_mut().halted = false;
    halted_clean(&mut s);
    assert_eq!(s.gpr(0), 2);
}

#[test]
fn rep_stos_over_its_own_code() {
    let mut s = Sys::new();
    // REP STOSB overwrites the instructions after it with NOPs, then the
    // CPU must run the NOPs, not the stale decoded INC.
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![Box::new(|a| {
            a.mov(edi, KCODE_AT as u32 + 0x20)?;
            a.mov(ecx, 4u32)?;
            a.mov(al, 0x90)?;
            a.cld()?;
            a.rep().stosb()
        })],
    );
    let mut code = code;
    code.resize(0x20, 0x90);
    code.extend_from_slice(&[0x40, 0x40, 0x40, 0x40, 0xf4]); // inc eax ×4 ; hlt
    let _ = at;
    s.start_kernel(&code);
    halted_clean(&mut s);
    assert_eq!(s.gpr(0) & 0xff, 0x90, "INCs overwritten");
}

#[test]
fn v86_mode_runs_real_mode_code_and_int_goes_to_ring0() {
    let mut s = Sys::new();
    // IRET to V86 at 0x0100:0x0000 (linear 0x1000... use 0x2000:0) with IOPL 3.
    let v86_code = asm(16, 0, |a| {
        a.mov(ax, 0x3000u32)?;
        a.mov(ds, ax)?;
        a.mov(word_ptr(0x10), 0x5678u32)?; // linear 0x30010
        a.mov(bx, cs)?;
        a.int(0x80)
    });
    s.idt(
        0x80,
        gate(INT_GATE, KCODE, (STUBS + 0x80 * 16) as u32, 3, 0),
    );
    s.start_v86(&v86_code, 3);
    let x = s.run();
    assert_eq!(x, RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(0x80));
    assert_eq!(s.rd32(0x30010) & 0xffff, 0x5678);
    assert_eq!(s.gpr(3) & 0xffff, 0x2000);
    // The V86 frame: EIP CS EFLAGS ESP SS ES DS FS GS.
    let st = s.c.state().clone();
    let stk = st.gpr[4];
    let f: Vec<u32> = (0..9).map(|i| s.rd32(stk + 4 * i)).collect();
    assert_eq!(f[1], 0x2000);
    assert_ne!(f[2] & flags::VM, 0);
    assert_eq!((f[3], f[4]), (0x0ff0, 0x0900));
    assert_eq!(f[6], 0x3000, "DS pushed");
    assert_eq!(stk as u32, ESP0 - 36);
    assert_eq!(st.seg[sr::DS].selector, 0, "data segments nulled on entry");
    assert_eq!(st.rflags as u32 & flags::VM, 0);
}

#[test]
fn v86_int_with_iopl_below_3_is_gp0() {
    let mut s = Sys::new();
    s.start_v86(&asm(16, 0, |a| a.int(0x80)), 0);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(13));
    let stk = s.c.state().gpr[4];
    assert_eq!(s.rd32(stk), 0, "error code");
    assert_eq!(s.rd32(stk + 4), 0, "EIP of the INT");
    assert_eq!(s.rd32(stk + 8), 0x2000);
}

#[test]
fn bus_stop_during_rep_outs_finishes_the_iteration_and_resumes() {
    let mut s = Sys::new();
    s.bus.stop_port = Some(0xe9);
    s.ram().write(0x30000, b"abc").unwrap();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.cld()?;
                a.mov(dx, 0xe9u32)?;
                a.mov(esi, 0x30000u32)?;
                a.mov(ecx, 3u32)
            }),
            Box::new(|a| a.rep().outsb()),
            Box::new(|a| a.hlt()),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::BusStop);
    assert_eq!(s.bus.outs.len(), 1);
    let st = s.c.state().clone();
    assert_eq!((st.gpr[1], st.gpr[6]), (2, 0x30001), "one iteration done");
    assert_eq!(
        st.rip, at[1] as u64,
        "the REP is not finished: EIP stays on it"
    );
    assert_eq!(s.run(), RunExit::BusStop);
    assert_eq!(s.run(), RunExit::BusStop);
    assert_eq!(
        s.c.state().rip,
        at[2] as u64,
        "last iteration done: after the REP"
    );
    assert_eq!(s.run(), RunExit::Halted);
    let bytes: Vec<u32> = s.bus.outs.iter().map(|o| o.2).collect();
    assert_eq!(bytes, vec![b'a' as u32, b'b' as u32, b'c' as u32]);
}

#[test]
fn bus_stop_on_mmio_write_finishes_the_instruction() {
    let mut s = Sys::new();
    s.bus.mmio_stop = true;
    let mmio = 0x8000_0000u32; // beyond the 4 MiB of RAM
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(move |a| {
                a.mov(esp, mmio + 0x100)?;
                a.mov(eax, 0x77u32)
            }),
            Box::new(|a| a.push(eax)),
            Box::new(move |a| {
                a.cld()?;
                a.mov(edi, mmio)?;
                a.mov(ecx, 2u32)
            }),
            Box::new(|a| a.rep().stosd()),
            Box::new(|a| {
                a.mov(esp, KSTACK)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::BusStop);
    let st = s.c.state().clone();
    assert_eq!(st.rip, at[2] as u64, "PUSH completed");
    assert_eq!(st.gpr[4] as u32, mmio + 0xfc, "…including its ESP update");
    assert_eq!(s.run(), RunExit::BusStop);
    let st = s.c.state().clone();
    assert_eq!(
        (st.rip, st.gpr[1], st.gpr[7] as u32),
        (at[3] as u64, 1, mmio + 4)
    );
    assert_eq!(s.run(), RunExit::BusStop);
    assert_eq!(s.c.state().rip, at[4] as u64);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(
        s.bus.mmio_writes,
        vec![
            (mmio as u64 + 0xfc, 4, 0x77),
            (mmio as u64, 4, 0x77),
            (mmio as u64 + 4, 4, 0x77)
        ]
    );
}

#[test]
fn v86_interrupt_to_a_nonzero_ring_is_gp_sel() {
    let mut s = Sys::new();
    s.gdt(FREE, code32(1));
    let r1 = (FREE as u16) << 3;
    s.idt(0x80, gate(INT_GATE, r1, 0x1234, 3, 0));
    s.start_v86(&asm(16, 0, |a| a.int(0x80)), 3);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(13));
    let stk = s.c.state().gpr[4];
    assert_eq!(s.rd32(stk), r1 as u32, "#GP(new CS selector)");
    assert_eq!(s.rd32(stk + 8), 0x2000, "from V86: the INT itself");
}

#[test]
fn v86_privileged_and_iopl_sensitive_instructions_fault() {
    type F = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;
    let cases: Vec<(&str, u32, F)> = vec![
        ("lgdt", 3, |a| a.lgdt(ptr(0x100))),
        ("mov cr0", 3, |a| a.mov(eax, cr0)),
        ("hlt", 3, |a| a.hlt()),
        ("cli iopl0", 0, |a| a.cli()),
        ("pushf iopl0", 0, |a| a.pushf()),
        ("popf iopl0", 0, |a| a.popf()),
        ("iret iopl0", 0, |a| a.iret()),
        ("in al,dx (bitmap denies)", 3, |a| a.in_(al, dx)),
    ];
    for (name, iopl, f) in cases {
        let mut s = Sys::new();
        s.start_v86(&asm(16, 0, f), iopl);
        assert_eq!(s.run(), RunExit::Halted, "{name}");
        assert_eq!(s.stub_vector(), Some(13), "{name}");
        let stk = s.c.state().gpr[4];
        assert_eq!(
            (s.rd32(stk), s.rd32(stk + 4)),
            (0, 0),
            "{name}: #GP(0) at the instruction"
        );
    }
}

#[test]
fn v86_io_follows_the_bitmap_even_with_iopl3() {
    let mut s = Sys::new();
    s.allow_port(0x80);
    s.start_v86(
        &asm(16, 0, |a| {
            a.out(0x80, al)?;
            a.out(0x81, al)
        }),
        3,
    );
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(13));
    assert_eq!(s.bus.outs.len(), 1);
}

/// The decoded-block cache stays within its bound however many distinct
/// blocks a guest enters: it is emptied when full, and the code still runs.
#[test]
fn the_decoded_block_cache_is_bounded() {
    let mut s = Sys::new();
    // 16 KiB of NOPs at 0x40000 with a RET every 64 bytes; call each byte.
    let mut sled = vec![0x90u8; 0x4000];
    for i in (63..sled.len()).step_by(64) {
        sled[i] = 0xc3;
    }
    s.ram().write(0x40000, &sled).unwrap();
    let code = kcode(|a| {
        let mut top = a.create_label();
        a.mov(esi, 0x40000u32)?;
        a.set_label(&mut top)?;
        a.call(esi)?;
        a.inc(esi)?;
        a.cmp(esi, 0x44000u32)?;
        a.jb(top)?;
        a.hlt()
    });
    s.c.set_block_cache_limit(256 << 10);
    s.start_kernel(&code);
    let mut peak = 0;
    loop {
        let x = s.c.run(&mut s.bus, 10_000);
        peak = peak.max(s.c.block_cache_bytes());
        if x != RunExit::Budget {
            assert_eq!(x, RunExit::Halted);
            break;
        }
    }
    assert_eq!(s.gpr(6), 0x44000, "every entry point ran");
    assert!(peak <= 256 << 10, "peak {peak}");
    assert!(
        s.c.stats.block_cache_flushes > 0,
        "the cache was emptied when full"
    );
}
