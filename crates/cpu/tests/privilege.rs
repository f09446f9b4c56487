//! Directed privilege tests: privileged instructions outside ring 0, IOPL
//! and the TSS I/O bitmap, and the sensitive-but-unprivileged instructions
//! of the x86 gap at CPL 1 and 3 (with the reporting hook).

mod common;
use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::{cr, flags};
use popek_cpu::{RunExit, SensitiveKind};

fn gp0_at(s: &mut Sys, eip: u32) -> Trap {
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (13, Some(0), eip), "{t:x?}");
    t
}

type Insn = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;

fn privileged() -> Vec<(&'static str, Insn)> {
    vec![
        ("hlt", |a| a.hlt()),
        ("cli", |a| a.cli()),
        ("sti", |a| a.sti()),
        ("mov cr0, eax", |a| a.mov(cr0, eax)),
        ("mov eax, cr0", |a| a.mov(eax, cr0)),
        ("mov cr3, eax", |a| a.mov(cr3, eax)),
        ("mov eax, cr2", |a| a.mov(eax, cr2)),
        ("mov dr7, eax", |a| a.mov(dr7, eax)),
        ("lgdt", |a| a.lgdt(ptr(0x30000))),
        ("lidt", |a| a.lidt(ptr(0x30000))),
        ("lldt", |a| a.lldt(ax)),
        ("ltr", |a| a.ltr(ax)),
        ("lmsw", |a| a.lmsw(ax)),
        ("clts", |a| a.clts()),
        ("invlpg", |a| a.invlpg(ptr(0x30000))),
        ("wbinvd", |a| a.wbinvd()),
        ("invd", |a| a.invd()),
        ("rdmsr", |a| a.rdmsr()),
        ("wrmsr", |a| a.wrmsr()),
        ("sysexit", |a| a.sysexit()),
        ("in al, imm", |a| a.in_(al, 0x80)),
        ("out imm, al", |a| a.out(0x80, al)),
        ("in eax, dx", |a| a.in_(eax, dx)),
        ("out dx, al", |a| a.out(dx, al)),
        ("insb", |a| a.insb()),
        ("outsb", |a| a.outsb()),
    ]
}

#[test]
fn privileged_instructions_at_cpl3_raise_gp0() {
    for (name, f) in privileged() {
        let mut s = Sys::new();
        let code = ucode(|a| {
            a.mov(edx, 0x80u32)?;
            a.mov(esi, 0x30000u32)?;
            a.mov(edi, 0x30000u32)?;
            a.mov(ecx, 0x10u32)?;
            f(a)
        });
        s.start_user(&code);
        let t = s.run_trap();
        assert_eq!((t.vector, t.err), (13, Some(0)), "{name}: {t:x?}");
        assert_eq!(
            t.eip,
            UCODE_AT as u32 + 20,
            "{name}: saved EIP at the instruction"
        );
        assert_eq!(t.cs, UCODE, "{name}");
        assert_eq!(t.outer, Some((UDATA, USTACK)), "{name}");
        assert!(s.bus.outs.is_empty(), "{name}: no port access");
    }
}

#[test]
fn privileged_instructions_at_cpl1_raise_gp0() {
    for (name, f) in privileged() {
        let mut s = Sys::new();
        let code = ucode(|a| {
            a.mov(edx, 0x80u32)?;
            a.mov(esi, 0x30000u32)?;
            a.mov(edi, 0x30000u32)?;
            a.mov(ecx, 0x10u32)?;
            f(a)
        });
        s.start_ring1(&code);
        let t = s.run_trap();
        assert_eq!((t.vector, t.err), (13, Some(0)), "{name}: {t:x?}");
        assert_eq!(t.eip, UCODE_AT as u32 + 20, "{name}");
        assert_eq!(t.cs, R1CODE, "{name}");
    }
}

#[test]
fn iopl3_allows_cli_sti_and_io_at_cpl3() {
    let mut s = Sys::new();
    s.eflags = flags::IOPL;
    let code = ucode(|a| {
        a.cli()?;
        a.sti()?;
        a.mov(al, 0x42)?;
        a.out(0x99, al)?;
        a.in_(al, 0x98)?;
        a.hlt()
    });
    s.start_user(&code);
    let t = gp0_at(&mut s, UCODE_AT as u32 + 8);
    assert_ne!(t.eflags & flags::IF, 0);
    assert_eq!(s.bus.outs, vec![(0x99, 1, 0x42)]);
    assert_eq!(s.gpr(0) & 0xff, (0x98 ^ 0x5a5a) & 0xff);
}

#[test]
fn io_bitmap_allows_one_port_and_denies_others() {
    let mut s = Sys::new();
    s.allow_port(0x80);
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(al, 1)?;
                a.out(0x80, al)?;
                a.in_(al, 0x80)?;
                a.mov(dx, 0x80u32)?;
                a.out(dx, al)
            }),
            Box::new(|a| {
                a.out(0x81, al)?;
                a.hlt()
            }),
        ],
    );
    s.start_user(&code);
    gp0_at(&mut s, at[1]);
    assert_eq!(
        s.bus.outs,
        vec![(0x80, 1, 1), (0x80, 1, (0x80 ^ 0x5a5a) & 0xff)]
    );
}

#[test]
fn io_bitmap_checks_every_byte_of_a_wide_access() {
    let mut s = Sys::new();
    s.allow_port(0x80);
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| a.mov(dx, 0x80u32)),
            Box::new(|a| {
                a.out(dx, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_user(&code);
    gp0_at(&mut s, at[1]);
    assert!(s.bus.outs.is_empty());
}

#[test]
fn io_bitmap_beyond_tss_limit_denies() {
    let mut s = Sys::new();
    s.allow_port(0x80);
    s.gdt(5, tss32(TSS as u32, 0x68 + 0x10 - 1)); // bitmap only covers ports 0..0x7f
    let code = ucode(|a| {
        a.out(0x80, al)?;
        a.hlt()
    });
    s.start_user(&code);
    gp0_at(&mut s, UCODE_AT as u32);
}

#[test]
fn io_bitmap_allows_string_io() {
    let mut s = Sys::new();
    s.allow_port(0x80);
    s.ram().write(0x30000, &[1, 2, 3]).unwrap();
    let code = ucode(|a| {
        a.mov(dx, 0x80u32)?;
        a.mov(esi, 0x30000u32)?;
        a.mov(ecx, 3u32)?;
        a.rep().outsb()?;
        a.hlt()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!(t.vector, 13);
    assert_eq!(s.bus.outs, vec![(0x80, 1, 1), (0x80, 1, 2), (0x80, 1, 3)]);
}

/// POPF of an image with IF set and IOPL 3, then PUSHF into EAX.
fn popf_program() -> Vec<u8> {
    ucode(|a| {
        a.push(0x3202u32 | flags::CF)?; // IOPL 3, IF, CF
        a.popfd()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.push(0x0002u32)?; // all clear
        a.popfd()?;
        a.pushfd()?;
        a.pop(ebx)?;
        a.hlt()
    })
}

#[test]
fn popf_at_cpl3_silently_keeps_if_and_iopl() {
    let mut s = Sys::new();
    s.start_user(&popf_program());
    s.run_trap();
    // IF stays 0 (it was 0), IOPL stays 0; CF follows the image.
    assert_eq!(s.gpr(0), 0x0002 | flags::CF);
    assert_eq!(s.gpr(3), 0x0002);

    let mut s = Sys::new();
    s.eflags = flags::IF;
    s.start_user(&popf_program());
    s.run_trap();
    // IF stays 1 even when the popped image clears it.
    assert_eq!(s.gpr(0), 0x0202 | flags::CF);
    assert_eq!(s.gpr(3), 0x0202);
}

#[test]
fn popf_at_cpl1_silently_keeps_if() {
    let mut s = Sys::new();
    s.start_ring1(&popf_program());
    s.run_trap();
    assert_eq!(s.gpr(0), 0x0002 | flags::CF);
}

#[test]
fn popf_at_cpl3_with_iopl3_changes_if_but_not_iopl() {
    let mut s = Sys::new();
    s.eflags = flags::IOPL;
    s.start_user(&popf_program());
    s.run_trap();
    assert_eq!(s.gpr(0), 0x3202 | flags::CF);
    assert_eq!(s.gpr(3), 0x3002, "IF cleared, IOPL kept");
}

#[test]
fn popf_at_cpl0_changes_if_and_iopl() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.push(0x3202u32)?;
        a.popfd()?;
        a.pushfd()?;
        a.pop(eax)?;
        a.cli()?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0), 0x3202);
}

#[test]
fn pushf_at_cpl1_shows_real_if_and_iopl() {
    let mut s = Sys::new();
    s.eflags = flags::IF | (1 << 12);
    let code = ucode(|a| {
        a.pushfd()?;
        a.pop(eax)?;
        a.pushf()?;
        a.pop(bx)?;
        a.hlt()
    });
    s.start_ring1(&code);
    s.run_trap();
    assert_eq!(s.gpr(0), 0x1202);
    assert_eq!(s.gpr(3) & 0xffff, 0x1202);
}

#[test]
fn descriptor_table_stores_reveal_real_values_at_cpl3() {
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.sgdt(ptr(0x30000))?;
        a.sidt(ptr(0x30008))?;
        a.sldt(word_ptr(0x30010))?;
        a.str(word_ptr(0x30012))?;
        a.smsw(word_ptr(0x30014))?;
        a.str(eax)?;
        a.smsw(ebx)?;
        a.sldt(ecx)?;
        a.hlt()
    });
    s.start_user(&code);
    s.run_trap();
    let r = s.ram();
    assert_eq!(r.read_u16(0x30000).unwrap(), 128 * 8 - 1);
    assert_eq!(r.read_u32(0x30002).unwrap(), GDT as u32);
    assert_eq!(r.read_u16(0x30008).unwrap(), 256 * 8 - 1);
    assert_eq!(r.read_u32(0x3000a).unwrap(), IDT as u32);
    assert_eq!(r.read_u16(0x30010).unwrap(), 0);
    assert_eq!(r.read_u16(0x30012).unwrap(), TSS_SEL);
    assert_eq!(r.read_u16(0x30014).unwrap(), 0x11, "PE | ET");
    assert_eq!(s.gpr(0), TSS_SEL as u32);
    assert_eq!(s.gpr(3) & 0xffff, 0x11);
    assert_eq!(s.gpr(1), 0);
}

#[test]
fn umip_makes_descriptor_stores_fault_at_cpl3() {
    // CR4.UMIP is not in this model's supported CR4 bits (no CPUID bit):
    // setting it faults like on a CPU without UMIP.
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.mov(eax, cr4)?;
        a.or(eax, cr::CR4_UMIP as u32)?;
        a.mov(cr4, eax)?;
        a.hlt()
    });
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(0)));
}

#[test]
fn mov_from_cs_and_ss_shows_rpl_equal_to_cpl() {
    for (cpl, start) in [
        (3u16, Sys::start_user as fn(&mut Sys, &[u8])),
        (1, Sys::start_ring1),
    ] {
        let mut s = Sys::new();
        let code = ucode(|a| {
            a.mov(eax, cs)?;
            a.mov(ebx, ss)?;
            a.push(cs)?;
            a.pop(ecx)?;
            a.hlt()
        });
        start(&mut s, &code);
        s.run_trap();
        assert_eq!(s.gpr(0) & 3, cpl as u32);
        assert_eq!(s.gpr(3) & 3, cpl as u32);
        assert_eq!(s.gpr(1) & 0xffff, s.gpr(0));
    }
}

/// LAR/LSL/VERR/VERW of `sel` at the CPL of `start`: (ZF of LAR, EAX, ZF of
/// LSL, EBX, ZF of VERR, ZF of VERW).
fn probe(s: &mut Sys, start: fn(&mut Sys, &[u8]), sel: u16) -> (bool, u32, bool, u32, bool, bool) {
    let code = ucode(|a| {
        a.mov(ecx, sel as u32)?;
        a.mov(eax, 0xdeadu32)?;
        a.mov(ebx, 0xdeadu32)?;
        a.lar(eax, ecx)?;
        a.setz(byte_ptr(0x30000))?;
        a.lsl(ebx, ecx)?;
        a.setz(byte_ptr(0x30001))?;
        a.verr(cx)?;
        a.setz(byte_ptr(0x30002))?;
        a.verw(cx)?;
        a.setz(byte_ptr(0x30003))?;
        a.hlt()
    });
    start(s, &code);
    s.run_trap();
    let z = |i: u64| s.ram().read_u8(0x30000 + i).unwrap() != 0;
    let (a, b, c, d) = (z(0), z(1), z(2), z(3));
    // LAR: bits 19:16 are undefined (SDM: "masked by 00FxFF00H"). The
    // harness sets segment caches directly, so descriptors in the GDT are
    // not marked accessed.
    let lar = if a { s.gpr(0) & 0x00f0_ff00 } else { s.gpr(0) };
    (a, lar, b, s.gpr(3), c, d)
}

#[test]
fn lar_lsl_verr_verw_answer_by_real_dpl_at_cpl3() {
    let mut s = Sys::new();
    // Kernel data (DPL 0) is invisible at CPL 3.
    assert_eq!(
        probe(&mut s, Sys::start_user, KDATA),
        (false, 0xdead, false, 0xdead, false, false)
    );
    // User data (DPL 3): visible, readable, writable.
    let mut s = Sys::new();
    assert_eq!(
        probe(&mut s, Sys::start_user, UDATA),
        (true, 0x00c0_f200, true, 0xffff_ffff, true, true)
    );
    // User code: readable, not writable.
    let mut s = Sys::new();
    assert_eq!(
        probe(&mut s, Sys::start_user, UCODE),
        (true, 0x00c0_fa00, true, 0xffff_ffff, true, false)
    );
}

#[test]
fn lar_lsl_at_cpl1_see_real_dpl_of_ring0_descriptors() {
    // A deprivileged kernel probing "its own" ring-0 segments gets ZF = 0.
    let mut s = Sys::new();
    assert_eq!(
        probe(&mut s, Sys::start_ring1, KCODE),
        (false, 0xdead, false, 0xdead, false, false)
    );
    let mut s = Sys::new();
    assert_eq!(
        probe(&mut s, Sys::start_ring1, R1DATA),
        (true, 0x00c0_b200, true, 0xffff_ffff, true, true)
    );
}

#[test]
fn lar_of_conforming_code_ignores_dpl_and_rpl_matters() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xfffff, 0x9e, 0xc)); // conforming readable code, DPL 0
    let sel = (FREE as u16) << 3;
    let r = probe(&mut s, Sys::start_user, sel | 3);
    assert_eq!((r.0, r.1, r.4, r.5), (true, 0x00c0_9e00, true, false));
    // RPL 3 hides a DPL 2 data segment even at CPL 1.
    let mut s = Sys::new();
    assert!(!probe(&mut s, Sys::start_ring1, R2DATA | 3).0);
    let mut s = Sys::new();
    assert!(probe(&mut s, Sys::start_ring1, R2DATA).0);
}

#[test]
fn lar_lsl_of_system_descriptors() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, 0x1234, 3, 0));
    let sel = (FREE as u16) << 3;
    // Call gate: LAR yes, LSL no (no limit), VERR/VERW no.
    assert_eq!(
        probe(&mut s, Sys::start_user, sel),
        (true, 0x0000_ec00, false, 0xdead, false, false)
    );
    // TSS (DPL 0) at CPL 0 via ring-0 start: LSL gives its limit.
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.mov(ecx, TSS_SEL as u32)?;
        a.lsl(ebx, ecx)?;
        a.lar(eax, ecx)?;
        a.hlt()
    });
    s.start_at(KCODE, KDATA, UCODE_AT as u32, KSTACK, &code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(3), 0x2068);
    assert_eq!(s.gpr(0), 0x0000_8b00, "busy TSS");
}

#[test]
fn lar_of_null_and_out_of_range_selectors_clears_zf() {
    let mut s = Sys::new();
    assert!(!probe(&mut s, Sys::start_user, 0).0);
    let mut s = Sys::new();
    assert!(!probe(&mut s, Sys::start_user, 0x7fff).0);
}

/// A ring-1 "guest kernel" running every reported gap instruction.
fn gap_program() -> Vec<u8> {
    ucode(|a| {
        a.pushfd()?; // Pushf
        a.pop(eax)?;
        a.push(0x0002u32)?;
        a.popfd()?; // Popf: IF kept
        a.sgdt(ptr(0x30000))?;
        a.sidt(ptr(0x30008))?;
        a.sldt(word_ptr(0x30010))?;
        a.str(word_ptr(0x30012))?;
        a.smsw(word_ptr(0x30014))?;
        a.mov(ebx, cs)?;
        a.push(ss)?;
        a.pop(ecx)?;
        a.mov(edx, KCODE as u32)?;
        a.lar(esi, edx)?;
        a.lsl(edi, edx)?;
        a.verr(dx)?;
        a.verw(dx)?;
        a.hlt()
    })
}

#[test]
fn sensitive_hook_reports_and_changes_nothing() {
    let run = |report: bool| {
        let mut s = Sys::new();
        s.eflags = flags::IF;
        s.c.report_sensitive = report;
        s.start_ring1(&gap_program());
        let t = s.run_trap();
        let st = s.c.state().clone();
        let mut mem = vec![0u8; 0x20];
        s.ram().read(0x30000, &mut mem).unwrap();
        let mut stack = vec![0u8; 0x100];
        s.ram().read(ESP0 as u64 - 0x100, &mut stack).unwrap();
        (t, st, mem, stack, s.bus.events.clone())
    };
    let (t_off, st_off, mem_off, stack_off, ev_off) = run(false);
    let (t_on, st_on, mem_on, stack_on, ev_on) = run(true);
    assert!(ev_off.is_empty());
    assert_eq!(t_off, t_on);
    assert_eq!(
        st_off, st_on,
        "guest-visible state identical with the hook on or off"
    );
    assert_eq!(mem_off, mem_on);
    assert_eq!(stack_off, stack_on);
    assert_eq!(t_on.vector, 13, "the final HLT at CPL 1");

    use SensitiveKind::*;
    let kinds: Vec<_> = ev_on.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Pushf,
            Popf,
            Sgdt,
            Sidt,
            Sldt,
            Str,
            Smsw,
            ReadSegment,
            ReadSegment,
            Lar,
            Lsl,
            Verr,
            Verw
        ]
    );
    for e in &ev_on {
        assert_eq!(e.cpl, 1, "{e:?}");
        assert_eq!(e.iopl, 0, "{e:?}");
        assert_eq!(e.linear_ip, e.ip);
    }
    assert_eq!(ev_on[0].result, 0x202, "PUSHF shows the real IF");
    assert_eq!(ev_on[0].ip, UCODE_AT);
    assert_eq!(ev_on[1].operand, 0x2, "POPF popped IF = 0");
    assert_ne!(ev_on[1].result & flags::IF as u64, 0, "…and IF stayed 1");
    assert_eq!(ev_on[2].result, GDT);
    assert_eq!(ev_on[3].result, IDT);
    assert_eq!(ev_on[4].result, 0);
    assert_eq!(ev_on[5].result, TSS_SEL as u64);
    assert_eq!(ev_on[6].result, 0x11);
    assert_eq!(ev_on[7].result, R1CODE as u64);
    assert_eq!(ev_on[8].result, R1DATA as u64);
    assert_eq!(ev_on[9].operand, KCODE as u64);
    assert_eq!(
        ev_on[11].result, 0,
        "VERR of a ring-0 segment fails at CPL 1"
    );
}

#[test]
fn cr4_bits_the_model_lacks_fault() {
    // CPUID does not advertise VME or UMIP: setting them is #GP(0), as on
    // a processor without the feature.
    for bit in [cr::CR4_VME, cr::CR4_PVI, cr::CR4_UMIP] {
        let mut s = Sys::new();
        s.start_kernel(&kcode(|a| {
            a.mov(eax, bit as u32)?;
            a.mov(cr4, eax)?;
            a.hlt()
        }));
        let t = s.run_trap();
        assert_eq!(
            (t.vector, t.err, t.eip),
            (13, Some(0), KCODE_AT as u32 + 5),
            "CR4 bit {bit:#x}"
        );
    }
}

#[test]
fn sensitive_hook_reports_far_transfers_segment_loads_and_events() {
    use common::sys::gate;
    let run = |report: bool| {
        let mut s = Sys::new();
        s.c.report_sensitive = report;
        s.bus.tsc = Some(0x42);
        let sel = (FREE as u16) << 3;
        s.gdt(
            FREE,
            gate(CALL_GATE, UCODE & !3, UCODE_AT as u32 + 0x100, 3, 0),
        );
        s.idt(0x80, gate(TRAP_GATE, KCODE, 0x18000, 3, 0));
        // Ring 0 handler for INT 0x80: IRET straight back.
        s.ram()
            .write(0x18000, &asm(32, 0x18000, |a| a.iretd()))
            .unwrap();
        s.ram()
            .write(UCODE_AT + 0x100, &asm(32, UCODE_AT + 0x100, |a| a.retf()))
            .unwrap();
        let code = ucode(|a| {
            a.mov(eax, UDATA as u32)?;
            a.mov(ds, ax)?; // LoadSegment
            a.call_far(sel | 3, 0)?; // FarCall through a gate, FarRet back
            a.int(0x80)?; // SoftInt, then Iret at CPL 0
            a.rdtsc()?; // Rdtsc
            a.hlt()
        });
        s.start_user(&code);
        let t = s.run_trap();
        (t, s.c.state().clone(), s.bus.events.clone())
    };
    let (t_off, st_off, ev_off) = run(false);
    let (t_on, st_on, ev) = run(true);
    assert!(ev_off.is_empty());
    assert_eq!((t_off, st_off), (t_on, st_on));
    use SensitiveKind::*;
    let kinds: Vec<_> = ev.iter().map(|e| (e.kind, e.cpl)).collect();
    assert_eq!(
        kinds,
        vec![
            (LoadSegment, 3),
            (FarCall, 3),
            (FarRet, 3),
            (SoftInt, 3),
            (Iret, 0),
            (Rdtsc, 3)
        ]
    );
    assert_eq!(ev[3].operand, 0x80);
    assert_eq!(ev[4].ip, 0x18000, "IRET reported at its own address");
    assert_eq!(ev[4].linear_ip, 0x18000);
    assert_eq!(ev[5].result, 0x42);
}
