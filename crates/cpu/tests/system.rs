//! Directed tests of exception and interrupt delivery (SDM vol. 3 ch. 6):
//! gates, privilege checks, stack switches, IRET, fault vs trap, double and
//! triple faults, external interrupts with the interrupt shadows, HLT, and
//! the monitor's exception bitmap.

mod common;
use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::{flags, seg as sr};
use popek_cpu::RunExit;

const HANDLER: u64 = 0x18000;

fn handler(
    s: &Sys,
    at: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) {
    let code = asm(32, at, f);
    s.ram().write(at, &code).unwrap();
}

#[test]
fn interrupt_gate_clears_if_trap_gate_does_not() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    s.idt(0x40, gate(INT_GATE, KCODE, HANDLER as u32, 0, 0));
    s.idt(0x41, gate(TRAP_GATE, KCODE, HANDLER as u32 + 0x100, 0, 0));
    handler(&s, HANDLER, |a| {
        a.pushfd()?;
        a.pop(eax)?;
        a.iretd()
    });
    handler(&s, HANDLER + 0x100, |a| {
        a.pushfd()?;
        a.pop(ebx)?;
        a.iretd()
    });
    let code = kcode(|a| {
        a.int(0x40)?;
        a.int(0x41)?;
        a.pushfd()?;
        a.pop(ecx)?;
        a.cli()?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0) & flags::IF, 0, "interrupt gate cleared IF");
    assert_ne!(s.gpr(3) & flags::IF, 0, "trap gate kept IF");
    assert_ne!(s.gpr(1) & flags::IF, 0, "IRET restored IF");
    assert_eq!(s.gpr(4), KSTACK);
}

#[test]
fn delivery_clears_tf_nt_rf() {
    let mut s = Sys::new();
    s.eflags = flags::NT;
    s.idt(0x40, gate(TRAP_GATE, KCODE, HANDLER as u32, 0, 0));
    handler(&s, HANDLER, |a| {
        a.pushfd()?;
        a.pop(eax)?;
        a.hlt()
    });
    let code = kcode(|a| a.int(0x40));
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0) & (flags::NT | flags::TF | flags::RF), 0);
    let t = s.frame(0x40, false);
    assert_ne!(t.eflags & flags::NT, 0, "the pushed image keeps NT");
}

#[test]
fn int_n_from_cpl3_to_dpl0_gate_is_gp_vector() {
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.mov(eax, 1u32)?;
        a.int(0x40)?;
        a.hlt()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(0x40 * 8 + 2)));
    assert_eq!(t.eip, UCODE_AT as u32 + 5, "fault: EIP at the INT");
    assert_eq!(t.cs, UCODE);
}

#[test]
fn int3_and_into_check_gate_dpl_too() {
    for f in [
        (|a: &mut CodeAssembler| a.int3())
            as fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
        |a| {
            a.mov(al, 0x7f)?;
            a.add(al, 1)?;
            a.into()
        },
    ] {
        let mut s = Sys::new();
        let code = ucode(f);
        s.start_user(&code);
        let t = s.run_trap();
        assert_eq!(t.vector, 13, "{t:x?}");
        assert!(
            t.err == Some(3 * 8 + 2) || t.err == Some(4 * 8 + 2),
            "{t:x?}"
        );
    }
}

#[test]
fn hardware_exception_ignores_gate_dpl() {
    // #DE at CPL 3 reaches a DPL 0 gate (the DPL check is for INT n only).
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.xor(ecx, ecx)?;
        a.div(ecx)
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (0, None, UCODE_AT as u32 + 2));
}

#[test]
fn int_from_cpl3_switches_to_tss_stack() {
    let mut s = Sys::new();
    s.eflags = flags::IF | flags::CF;
    s.idt(
        0x80,
        gate(INT_GATE, KCODE, (STUBS + 0x80 * 16) as u32, 3, 0),
    );
    let code = ucode(|a| {
        a.mov(esp, 0xeff0u32)?;
        a.int(0x80)
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!(t.vector, 0x80);
    assert_eq!(t.eip, UCODE_AT as u32 + 7, "trap: EIP after the INT");
    assert_eq!(t.cs, UCODE);
    assert_eq!(t.eflags, 0x202 | flags::CF);
    assert_eq!(t.outer, Some((UDATA, 0xeff0)));
    let st = s.c.state();
    assert_eq!(st.gpr[4] as u32, ESP0 - 20);
    assert_eq!(st.seg[sr::SS].selector, KDATA);
    assert_eq!(st.seg[sr::CS].selector, KCODE);
    assert_eq!(st.rflags as u32 & flags::IF, 0);
    assert_eq!(st.seg[sr::DS].selector, UDATA, "data segments untouched");
}

#[test]
fn exception_from_cpl3_pushes_error_code_on_tss_stack() {
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.mov(eax, KDATA as u32)?;
        a.mov(ds, ax)
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!(
        t,
        Trap {
            vector: 13,
            err: Some(KDATA as u32),
            eip: UCODE_AT as u32 + 5,
            cs: UCODE,
            eflags: 0x2,
            outer: Some((UDATA, USTACK)),
        }
    );
    assert_eq!(s.c.state().gpr[4] as u32, ESP0 - 24);
}

#[test]
fn stack_switch_to_ring1_uses_ss1_esp1() {
    let mut s = Sys::new();
    s.gdt(FREE, code32(1));
    let r1code = (FREE as u16) << 3 | 1;
    s.idt(
        0x80,
        gate(INT_GATE, r1code & !3, (STUBS + 0x80 * 16) as u32, 3, 0),
    );
    let code = ucode(|a| a.int(0x80));
    s.start_user(&code);
    // HLT in the ring-1 stub is privileged: #GP with a second switch to ring 0.
    s.c.exception_bitmap = 1 << 13;
    let x = s.run();
    assert_eq!(
        x,
        RunExit::Exception {
            vector: 13,
            error_code: Some(0),
            software: false
        }
    );
    let st = s.c.state().clone();
    assert_eq!(st.seg[sr::CS].selector, r1code);
    assert_eq!(st.seg[sr::SS].selector, R1DATA);
    assert_eq!(st.gpr[4] as u32, ESP1 - 20);
    assert_eq!(s.rd32(ESP1 as u64 - 20), UCODE_AT as u32 + 2);
    assert_eq!(s.rd32(ESP1 as u64 - 4), UDATA as u32);
}

#[test]
fn iret_to_ring3_restores_stack_and_nulls_privileged_data_segments() {
    let mut s = Sys::new();
    s.idt(0x80, gate(TRAP_GATE, KCODE, HANDLER as u32, 3, 0));
    handler(&s, HANDLER, |a| {
        a.mov(eax, KDATA as u32)?;
        a.mov(ds, ax)?; // DPL 0: must not survive the return to ring 3
        a.mov(fs, ax)?;
        a.mov(eax, R2DATA as u32 & !3)?;
        a.mov(gs, ax)?; // DPL 2: nulled too
        a.mov(dword_ptr(esp + 8), 0x8d7u32)?; // EFLAGS image: arithmetic flags + IF
        a.iretd()
    });
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(esp, 0xefe0u32)?;
                a.int(0x80)
            }),
            Box::new(|a| {
                a.mov(ebx, ds)?;
                a.mov(ecx, es)?;
                a.mov(edx, fs)?;
                a.mov(esi, gs)?;
                a.mov(edi, ss)
            }),
            Box::new(|a| a.hlt()),
        ],
    );
    s.start_user(&code);
    s.c.exception_bitmap = 1 << 13;
    let x = s.run();
    assert_eq!(
        x,
        RunExit::Exception {
            vector: 13,
            error_code: Some(0),
            software: false
        }
    );
    let st = s.c.state().clone();
    assert_eq!(st.rip, at[2] as u64);
    assert_eq!(st.seg[sr::CS].selector, UCODE);
    assert_eq!((st.seg[sr::SS].selector, st.gpr[4] as u32), (UDATA, 0xefe0));
    assert_eq!(st.gpr[3] & 0xffff, 0, "DS nulled");
    assert_eq!(st.gpr[1] & 0xffff, UDATA as u64, "ES kept");
    assert_eq!(st.gpr[2] & 0xffff, 0, "FS nulled");
    assert_eq!(st.gpr[6] & 0xffff, 0, "GS nulled");
    assert_eq!(
        st.rflags as u32 & 0xfff,
        0x8d7 | 2,
        "IRET at CPL 0 restores IF and the arithmetic flags"
    );
}

#[test]
fn iret_to_same_ring() {
    let mut s = Sys::new();
    s.idt(0x40, gate(INT_GATE, KCODE, HANDLER as u32, 0, 0));
    handler(&s, HANDLER, |a| {
        a.mov(eax, 0x55u32)?;
        a.iretd()
    });
    let code = kcode(|a| {
        a.int(0x40)?;
        a.mov(ebx, 0x66u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!((s.gpr(0), s.gpr(3), s.gpr(4)), (0x55, 0x66, KSTACK));
}

#[test]
fn iret_to_more_privileged_ring_is_gp() {
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.push(0x202u32)?;
        a.push(KCODE as u32)?;
        a.push(0x1234u32)?;
        a.iretd()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(KCODE as u32)));
    assert_eq!(t.eip, UCODE_AT as u32 + 2 + 5 + 5);
}

#[test]
fn iret_at_cpl3_cannot_change_if_or_iopl() {
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.push(0x3202u32)?;
        a.push(UCODE as u32)?;
        a.push(UCODE_AT as u32 + 0x20)?;
        a.iretd()
    });
    s.start_user(&code);
    s.ram()
        .write(
            UCODE_AT + 0x20,
            &ucode(|a| {
                a.pushfd()?;
                a.pop(eax)?;
                a.hlt()
            })[..3],
        )
        .unwrap();
    let t = s.run_trap();
    assert_eq!(t.vector, 13);
    assert_eq!(s.gpr(0), 0x2);
}

#[test]
fn int3_and_into_are_traps_gp_is_a_fault() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.nop()?;
        a.int3()
    });
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (3, KCODE_AT as u32 + 2));

    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(al, 0x7f)?;
                a.add(al, 1)?;
                a.into()
            }),
            Box::new(|a| a.hlt()),
        ],
    );
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (4, at[1]));
    assert_ne!(t.eflags & flags::OF, 0);

    let mut s = Sys::new();
    let code = kcode(|a| {
        a.xor(eax, eax)?;
        a.into()?;
        a.mov(ebx, 1u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None, "INTO without OF does nothing");
    assert_eq!(s.gpr(3), 1);

    let mut s = Sys::new();
    let code = kcode(|a| {
        a.nop()?;
        a.mov(eax, 0x400u32)?;
        a.mov(ds, ax)
    });
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (13, Some(0x400), KCODE_AT as u32 + 6)
    );
}

#[test]
fn divide_errors() {
    // Divide by zero and quotient overflow, 8/16/32-bit, DIV and IDIV.
    type F = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;
    let cases: Vec<F> = vec![
        |a| {
            a.xor(ecx, ecx)?;
            a.div(ecx)
        },
        |a| {
            a.mov(cl, 0)?;
            a.div(cl)
        },
        |a| {
            a.mov(eax, 0x1000u32)?;
            a.mov(cl, 2)?;
            a.div(cl)
        }, // 0x800 > 0xff
        |a| {
            a.mov(edx, 1u32)?;
            a.mov(ecx, 1u32)?;
            a.div(ecx)
        },
        |a| {
            a.mov(eax, 0x8000_0000u32)?;
            a.cdq()?;
            a.mov(ecx, 0xffff_ffffu32)?;
            a.idiv(ecx)
        },
        |a| {
            a.mov(ax, 0x8000u32)?;
            a.cwd()?;
            a.mov(cx, 0xffffu32)?;
            a.idiv(cx)
        },
    ];
    for f in cases {
        let mut s = Sys::new();
        let pre = kcode(|a| {
            f(a)?;
            Ok(())
        });
        // The dividing instruction is the last one: find its start.
        let mut dec = iced_x86::Decoder::with_ip(32, &pre, KCODE_AT, 0);
        let last = dec.iter().last().unwrap().ip() as u32;
        s.start_kernel(&pre);
        let t = s.run_trap();
        assert_eq!((t.vector, t.err, t.eip), (0, None, last));
    }
}

#[test]
fn undefined_opcodes_raise_ud() {
    for bytes in [
        &[0x0f, 0x0b][..],
        &[0xfe, 0xf8],
        &[0xf0, 0x01, 0xd8],
        &[0x0f, 0x01, 0xc8 + 0x30],
    ] {
        let mut s = Sys::new();
        let mut code = kcode(|a| a.nop());
        code.extend_from_slice(bytes);
        s.start_kernel(&code);
        let t = s.run_trap();
        assert_eq!(
            (t.vector, t.err, t.eip),
            (6, None, KCODE_AT as u32 + 1),
            "{bytes:x?}"
        );
    }
}

#[test]
fn gp_while_delivering_np_is_a_double_fault() {
    let mut s = Sys::new();
    // #GP's gate points at a not-present code segment: #NP during delivery.
    s.gdt(FREE, not_present(code32(0)));
    s.idt(13, gate(INT_GATE, (FREE as u16) << 3, 0, 0, 0));
    let code = ucode(|a| a.hlt());
    s.start_user(&code);
    let x = s.run();
    assert_eq!(x, RunExit::Halted);
    let t = s.trap();
    assert_eq!((t.vector, t.err), (8, Some(0)));
    assert_eq!(t.outer, Some((UDATA, USTACK)));
}

#[test]
fn not_present_gate_for_a_benign_exception_is_np() {
    // #BP (benign) then #NP for its gate: handled serially, no double fault.
    let mut s = Sys::new();
    s.idt(3, not_present(gate(INT_GATE, KCODE, 0, 0, 0)));
    let code = kcode(|a| a.int3());
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (11, Some(3 * 8 + 2)));
    assert_eq!(t.eip, KCODE_AT as u32, "INT3 restarts");
}

#[test]
fn page_fault_while_delivering_page_fault_is_double_fault() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    // The ring-0 stack (ESP0) is not mapped: the #PF frame cannot be pushed.
    s.set_pte(ESP0 - 4, 0);
    // #DF through a task gate with its own stack (as Linux i386 does).
    let tss2 = 0x5100u32;
    let ram = s.ram();
    ram.write_u32(tss2 as u64 + 0x1c, PD as u32).unwrap();
    ram.write_u32(tss2 as u64 + 0x20, (STUBS + 8 * 16) as u32)
        .unwrap();
    ram.write_u32(tss2 as u64 + 0x24, 2).unwrap();
    ram.write_u32(tss2 as u64 + 0x38, 0xb000).unwrap();
    for (i, sel) in [KDATA, KCODE, KDATA, KDATA, KDATA, KDATA]
        .iter()
        .enumerate()
    {
        ram.write_u32(tss2 as u64 + 0x48 + 4 * i as u64, *sel as u32)
            .unwrap();
    }
    s.gdt(FREE, tss32(tss2, 0x67));
    let tsel = (FREE as u16) << 3;
    s.idt(8, gate(TASK_GATE, tsel, 0, 0, 0));
    s.set_pte(PD as u32, PD as u32 | P | W | U);
    let code = ucode(|a| {
        a.mov(eax, dword_ptr(0x31000).ss())?;
        a.hlt()
    });
    s.set_pte(0x31000, 0);
    s.start_user(&code);
    assert_eq!(s.run(), RunExit::Halted);
    let st = s.c.state().clone();
    assert_eq!(st.tr.selector, tsel);
    assert_eq!(st.rip, STUBS + 8 * 16 + 1);
    assert_eq!(
        st.gpr[4],
        0xb000 - 4,
        "error code pushed on the new task's stack"
    );
    assert_eq!(s.rd32(0xb000 - 4), 0);
    assert_ne!(st.rflags as u32 & flags::NT, 0);
    assert_ne!(st.cr0 & popek_cpu::state::cr::CR0_TS, 0);
    assert_eq!(s.ram().read_u16(tss2 as u64).unwrap(), TSS_SEL, "back link");
    // The first #PF (the user's load) had set CR2; the second too.
    assert_eq!(st.cr2, ESP0 as u64 - 4);
    // The outgoing task's state: EIP of the faulting user instruction.
    assert_eq!(s.rd32(TSS + 0x20), UCODE_AT as u32);
    assert_eq!(s.rd32(TSS + 0x4c) as u16, UCODE);
}

#[test]
fn idt_limit_too_small_for_pf_is_double_fault() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.lidt(ptr(0x30000))?;
        a.int(0x40)
    });
    s.ram().write_u16(0x30000, 8 * 9 - 1).unwrap(); // vectors 0..8 only
    s.ram().write_u32(0x30002, IDT as u32).unwrap();
    s.start_kernel(&code);
    let t = s.run_trap();
    // INT 0x40 → #GP(0x40*8+2) (software: EXT = 0), contributory; #GP's gate
    // is beyond the limit too → #DF.
    assert_eq!((t.vector, t.err), (8, Some(0)));
}

#[test]
fn triple_fault_is_shutdown() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.lidt(ptr(0x30000))?;
        a.int3()
    });
    // Empty IDT (limit 0).
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Shutdown);
}

#[test]
fn exception_bitmap_stops_before_delivery_with_fault_state() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(0x31000, 0);
    s.c.exception_bitmap = 1 << 14;
    let code = ucode(|a| {
        a.mov(eax, 0x11u32)?;
        a.push(eax)?;
        a.mov(dword_ptr(0x31008), eax)?;
        a.hlt()
    });
    s.start_user(&code);
    let before = s.rd32(ESP0 as u64 - 4);
    let x = s.run();
    assert_eq!(
        x,
        RunExit::Exception {
            vector: 14,
            error_code: Some(6),
            software: false
        }
    );
    let st = s.c.state().clone();
    assert_eq!(st.rip, UCODE_AT + 6);
    assert_eq!(st.cr2, 0x31008);
    assert_eq!(st.seg[sr::CS].selector, UCODE);
    assert_eq!(st.gpr[4] as u32, USTACK - 4);
    assert_eq!(
        s.rd32(ESP0 as u64 - 4),
        before,
        "nothing pushed on the ring-0 stack"
    );
    assert_eq!(s.c.stats.deliveries, 0);
    // The monitor fixes the page and resumes: the store retries.
    s.set_pte(0x31000, 0x31000 | P | W | U);
    s.c.exception_bitmap = 0;
    let t = s.run_trap();
    assert_eq!(t.vector, 13, "the HLT");
    assert_eq!(s.rd32(0x31008), 0x11);
}

#[test]
fn intercept_soft_int_stops_after_the_instruction() {
    let mut s = Sys::new();
    s.c.intercept_soft_int = true;
    let code = ucode(|a| a.int(0x80));
    s.start_user(&code);
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 0x80,
            error_code: None,
            software: true
        }
    );
    assert_eq!(s.c.state().rip, UCODE_AT + 2);
}

#[test]
fn external_interrupt_waits_for_if() {
    let mut s = Sys::new();
    s.bus.irq = Some(0x30);
    let code = kcode(|a| {
        a.mov(eax, 1u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.bus.irq, Some(0x30), "not acknowledged with IF = 0");
}

#[test]
fn sti_shadow_delays_the_interrupt_by_one_instruction() {
    let mut s = Sys::new();
    s.bus.irq = Some(0x30);
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.sti()?;
                a.mov(eax, 1u32)
            }),
            Box::new(|a| {
                a.mov(ebx, 2u32)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!(t.vector, 0x30);
    assert_eq!(
        t.eip, at[1],
        "delivered after the instruction following STI"
    );
    assert_eq!((s.gpr(0), s.gpr(3)), (1, 0));
    assert_eq!(t.err, None);
}

#[test]
fn sti_with_if_already_set_has_no_shadow() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    let code = kcode(|a| {
        a.sti()?;
        a.mov(eax, 1u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.c.run(&mut s.bus, 1), RunExit::Budget);
    s.bus.irq = Some(0x30);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (0x30, KCODE_AT as u32 + 1));
}

#[test]
fn mov_ss_shadow_delays_the_interrupt() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, KDATA as u32)),
            Box::new(|a| a.mov(ss, ax)),
            Box::new(|a| a.mov(esp, KSTACK - 0x100)),
            Box::new(|a| {
                a.nop()?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.c.run(&mut s.bus, 2), RunExit::Budget); // through MOV SS
    assert_eq!(s.c.state().rip, at[2] as u64);
    s.bus.irq = Some(0x31);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (0x31, at[3]), "taken after the MOV ESP");
    assert_eq!(s.c.state().gpr[4] as u32, KSTACK - 0x100 - 12);
}

#[test]
fn pop_ss_shadow_delays_the_interrupt() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.push(KDATA as u32)),
            Box::new(|a| a.pop(ss)),
            Box::new(|a| a.nop()),
            Box::new(|a| a.hlt()),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.c.run(&mut s.bus, 2), RunExit::Budget);
    s.bus.irq = Some(0x31);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (0x31, at[3]));
}

#[test]
fn hlt_wakes_on_interrupt_and_returns_after_hlt() {
    let mut s = Sys::new();
    s.idt(0x30, gate(INT_GATE, KCODE, HANDLER as u32, 0, 0));
    handler(&s, HANDLER, |a| {
        a.inc(dword_ptr(0x30000))?;
        a.iretd()
    });
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.sti()?;
                a.hlt()
            }),
            Box::new(|a| {
                a.mov(eax, 5u32)?;
                a.cli()?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert!(s.c.state().halted);
    assert_eq!(s.c.state().rip, at[1] as u64);
    // Still halted with nothing pending.
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.rd32(0x30000), 0);
    s.bus.irq = Some(0x30);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.rd32(0x30000), 1);
    assert_eq!(s.gpr(0), 5);
    assert_eq!(s.c.state().rip, at[1] as u64 + 7);
}

#[test]
fn external_interrupt_from_ring3_switches_stack() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    s.bus.irq = Some(0x20);
    let code = ucode(|a| {
        a.nop()?;
        a.jmp(UCODE_AT)
    });
    s.start_user(&code);
    let t = s.run_trap();
    // DPL 0 gate: hardware interrupts ignore the gate DPL.
    assert_eq!(t.vector, 0x20);
    assert_eq!(t.outer, Some((UDATA, USTACK)));
    assert_eq!(t.cs, UCODE);
    assert!(t.eip == UCODE_AT as u32 || t.eip == UCODE_AT as u32 + 1);
}

#[test]
fn single_step_trap_after_each_instruction() {
    let mut s = Sys::new();
    s.eflags = flags::TF;
    s.idt(1, gate(INT_GATE, KCODE, HANDLER as u32, 0, 0));
    handler(&s, HANDLER, |a| {
        a.inc(dword_ptr(0x30000))?;
        a.iretd()
    });
    let code = kcode(|a| {
        a.nop()?;
        a.nop()?;
        a.nop()?;
        a.pushfd()?;
        a.and(dword_ptr(esp), !flags::TF)?;
        a.popfd()?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    // Traps after NOP, NOP, NOP, PUSHFD, AND, and after the POPFD that
    // cleared TF (TF was set when it began).
    assert_eq!(s.rd32(0x30000), 6);
    let debug6 = s.c.state().dr[6];
    assert_ne!(debug6 & (1 << 14), 0, "DR6.BS");
}

#[test]
fn real_mode_style_error_code_vectors_from_int_n_push_no_error_code() {
    // INT 13 (software) to the #GP gate pushes no error code.
    let mut s = Sys::new();
    let code = kcode(|a| a.int(13));
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(13));
    let t = s.frame(13, false);
    assert_eq!((t.eip, t.cs), (KCODE_AT as u32 + 2, KCODE));
    assert_eq!(s.c.state().gpr[4] as u32, KSTACK - 12);
}

#[test]
fn invalid_ss0_in_tss_is_ts_with_ext_for_exceptions() {
    // INT n (software): #TS(0) without EXT.
    let mut s = Sys::new();
    s.ram().write_u32(TSS + 8, 0).unwrap();
    s.idt(
        0x80,
        gate(INT_GATE, KCODE, (STUBS + 0x80 * 16) as u32, 3, 0),
    );
    s.c.exception_bitmap = 1 << 10;
    s.start_user(&ucode(|a| a.int(0x80)));
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 10,
            error_code: Some(0),
            software: false
        }
    );
    assert_eq!(s.c.state().rip, UCODE_AT);
    // A #UD (benign) being delivered: #TS(EXT = 1). (A contributory
    // exception such as #GP would turn the #TS into a double fault.)
    let mut s = Sys::new();
    s.ram().write_u32(TSS + 8, 0).unwrap();
    s.c.exception_bitmap = 1 << 10;
    s.start_user(&ucode(|a| a.ud2()));
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 10,
            error_code: Some(1),
            software: false
        }
    );
    // SS0 with the wrong DPL: #TS(SS0 selector + EXT).
    let mut s = Sys::new();
    s.ram().write_u32(TSS + 8, UDATA as u32 & !3).unwrap();
    s.c.exception_bitmap = 1 << 10;
    s.start_user(&ucode(|a| a.ud2()));
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 10,
            error_code: Some((UDATA as u32 & !3) | 1),
            software: false
        }
    );
}

#[test]
fn int_n_beyond_idt_limit_is_gp_vector() {
    let mut s = Sys::new();
    s.start_kernel(&kcode(|a| {
        a.lidt(ptr(0x30000))?;
        a.int(0x40)
    }));
    s.ram().write_u16(0x30000, 0x40 * 8 - 1).unwrap();
    s.ram().write_u32(0x30002, IDT as u32).unwrap();
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (13, Some(0x40 * 8 + 2), KCODE_AT as u32 + 7)
    );
}

#[test]
fn external_interrupt_through_not_present_gate_sets_ext() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    s.idt(0x30, not_present(gate(INT_GATE, KCODE, 0, 0, 0)));
    s.bus.irq = Some(0x30);
    s.start_kernel(&kcode(|a| a.hlt()));
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (11, Some(0x30 * 8 + 2 + 1), KCODE_AT as u32)
    );
}

#[test]
fn gate_to_code_segment_less_privileged_than_cpl_is_gp_sel() {
    let mut s = Sys::new();
    s.idt(0x40, gate(INT_GATE, UCODE & !3, 0, 0, 0));
    s.start_kernel(&kcode(|a| a.int(0x40)));
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(UCODE as u32 & !3)));
}

#[test]
fn gate_to_non_code_segment_is_gp_sel_with_ext() {
    let mut s = Sys::new();
    // #UD is benign, so the #GP for its bad gate is delivered (after #DE,
    // which is contributory, it would be a double fault).
    s.idt(6, gate(INT_GATE, KDATA, 0, 0, 0));
    s.start_kernel(&kcode(|a| a.ud2()));
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(KDATA as u32 + 1)));
}

#[test]
fn sixteen_bit_interrupt_gate_pushes_a_16_bit_frame() {
    let mut s = Sys::new();
    let stub = (STUBS + 0x40 * 16) as u32;
    s.idt(0x40, gate(6, KCODE, stub & 0xffff, 0, 0)); // 286 interrupt gate
                                                      // The 16-bit gate can only reach offsets below 64 KiB: put a HLT there.
    s.ram().write_u8((stub & 0xffff) as u64, 0xf4).unwrap();
    s.eflags = flags::IF;
    s.start_kernel(&kcode(|a| {
        a.bus_lock_check_nop()?;
        a.int(0x40)
    }));
    assert_eq!(s.run(), RunExit::Halted);
    let st = s.c.state().clone();
    assert_eq!(st.gpr[4] as u32, KSTACK - 6);
    assert_eq!(
        s.ram().read_u16(KSTACK as u64 - 6).unwrap() as u32,
        (KCODE_AT as u32 + 3) & 0xffff
    );
    assert_eq!(s.ram().read_u16(KSTACK as u64 - 4).unwrap(), KCODE);
    assert_eq!(s.ram().read_u16(KSTACK as u64 - 2).unwrap() as u32, 0x202);
    assert_eq!(st.rflags as u32 & flags::IF, 0);
}

trait Nop1 {
    fn bus_lock_check_nop(&mut self) -> Result<(), iced_x86::IcedError>;
}
impl Nop1 for CodeAssembler {
    fn bus_lock_check_nop(&mut self) -> Result<(), iced_x86::IcedError> {
        self.nop()
    }
}

#[test]
fn interrupt_to_conforming_code_stays_at_cpl3() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xfffff, 0x9e, 0xc)); // conforming, DPL 0
    let csel = (FREE as u16) << 3;
    s.idt(0x80, gate(TRAP_GATE, csel, HANDLER as u32, 3, 0));
    handler(&s, HANDLER, |a| {
        a.mov(eax, cs)?;
        a.mov(ebx, esp)?;
        a.iretd()
    });
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![Box::new(|a| a.int(0x80)), Box::new(|a| a.hlt())],
    );
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip, t.cs), (13, at[1], UCODE));
    assert_eq!(s.gpr(0), (csel | 3) as u32, "CPL stays 3");
    assert_eq!(s.gpr(3), USTACK - 12, "no stack switch");
}

#[test]
fn pf_then_gp_during_delivery_is_double_fault() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(0x31000, 0);
    s.gdt(FREE, not_present(code32(0)));
    s.idt(14, gate(INT_GATE, (FREE as u16) << 3, 0, 0, 0));
    s.start_kernel(&kcode(|a| a.mov(eax, dword_ptr(0x31000))));
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (8, Some(0)));
    assert_eq!(s.c.state().cr2, 0x31000);
}

#[test]
fn gp_then_pf_during_delivery_is_handled_serially() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(ESP0 - 4, 0); // the ring-0 stack page
    s.c.exception_bitmap = 1 << 14;
    s.start_user(&ucode(|a| a.hlt()));
    // #GP (contributory) then #PF while pushing its frame: the #PF is
    // delivered, not a double fault.
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 14,
            error_code: Some(2),
            software: false
        }
    );
    let st = s.c.state().clone();
    assert_eq!(st.cr2, ESP0 as u64 - 4);
    assert_eq!(
        st.rip, UCODE_AT,
        "the state is still the faulting user instruction's"
    );
    assert_eq!(st.seg[sr::CS].selector, UCODE);
    assert_eq!(st.gpr[4] as u32, USTACK);
}

#[test]
fn cr2_is_untouched_by_other_faults() {
    let mut s = Sys::new();
    s.start_kernel(&kcode(|a| {
        a.mov(eax, 0x1234u32)?;
        a.mov(cr2, eax)?;
        a.ud2()
    }));
    let t = s.run_trap();
    assert_eq!(t.vector, 6);
    assert_eq!(s.c.state().cr2, 0x1234);
}

#[test]
fn rep_movs_faulting_midway_keeps_progress() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(0x32000, 0);
    s.ram().fill(0x20_0000, 0x100, 0xab).unwrap();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.cld()?;
                a.mov(esi, 0x20_0000u32)?;
                a.mov(edi, 0x31ff0u32)?;
                a.mov(ecx, 0x40u32)
            }),
            Box::new(|a| {
                a.rep().movsb()?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (14, Some(2), at[1]));
    assert_eq!(s.c.state().cr2, 0x32000);
    assert_eq!(
        (s.gpr(1), s.gpr(6), s.gpr(7)),
        (0x30, 0x20_0010, 0x32000),
        "ECX/ESI/EDI after 16 bytes"
    );
    assert_eq!(s.ram().read_u8(0x31fff).unwrap(), 0xab);
}

#[test]
fn lss_loads_ss_and_esp_with_shadow() {
    let mut s = Sys::new();
    s.ram().write_u32(0x30000, 0x7000).unwrap();
    s.ram().write_u16(0x30004, KDATA).unwrap();
    s.start_kernel(&kcode(|a| {
        a.lss(esp, ptr(0x30000))?;
        a.push(eax)?;
        a.hlt()
    }));
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(4), 0x7000 - 4);
}

#[test]
fn exception_bitmap_intercepts_int3_and_into_but_not_int_n() {
    let mut s = Sys::new();
    s.c.exception_bitmap = 1 << 3 | 1 << 4;
    s.start_user(&ucode(|a| {
        a.int3()?;
        a.mov(al, 0x7f)?;
        a.add(al, 1)?;
        a.into()?;
        a.int(3)
    }));
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 3,
            error_code: None,
            software: true
        }
    );
    assert_eq!(s.c.state().rip, UCODE_AT + 1, "after the INT3");
    assert_eq!(s.c.state().gpr[4] as u32, USTACK, "nothing delivered");
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 4,
            error_code: None,
            software: true
        }
    );
    assert_eq!(s.c.state().rip, UCODE_AT + 1 + 2 + 2 + 1);
    // INT 3 (CD 03) is a software interrupt: delivered (here #GP: DPL 0 gate).
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(3 * 8 + 2)));
}

#[test]
fn no_single_step_trap_after_a_fault_or_int_n() {
    // #UD with TF set: the #UD handler runs, no #DB is stacked on top.
    let mut s = Sys::new();
    s.eflags = flags::TF;
    s.start_kernel(&kcode(|a| a.ud2()));
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (6, KCODE_AT as u32));
    assert_eq!(s.c.state().gpr[4] as u32, KSTACK - 12);
    // INT n with TF set: the handler starts with TF clear and no #DB.
    let mut s = Sys::new();
    s.eflags = flags::TF;
    s.start_kernel(&kcode(|a| a.int(0x40)));
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (0x40, KCODE_AT as u32 + 2));
    assert_ne!(t.eflags & flags::TF, 0);
    assert_eq!(s.c.state().gpr[4] as u32, KSTACK - 12);
}

#[test]
fn rep_string_is_interruptible_and_resumes() {
    let mut s = Sys::new();
    s.eflags = flags::IF;
    s.idt(0x30, gate(INT_GATE, KCODE, HANDLER as u32, 0, 0));
    // The handler records ECX and returns to the REP, which resumes.
    handler(&s, HANDLER, |a| {
        a.mov(dword_ptr(0x30000), ecx)?;
        a.mov(eax, dword_ptr(esp))?;
        a.mov(dword_ptr(0x30004), eax)?;
        a.iretd()
    });
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.cld()?;
                a.mov(esi, 0x10_0000u32)?;
                a.mov(edi, 0x20_0000u32)?;
                a.mov(ecx, 100_000u32)
            }),
            Box::new(|a| {
                a.rep().movsb()?;
                a.hlt()
            }),
        ],
    );
    s.ram().fill(0x10_0000, 100_000, 0x5a).unwrap();
    s.start_kernel(&code);
    // Run until the REP has started, then raise the interrupt.
    assert_eq!(s.c.run(&mut s.bus, 6), RunExit::Budget);
    s.bus.irq = Some(0x30);
    assert_eq!(s.run(), RunExit::Halted);
    let ecx_seen = s.rd32(0x30000);
    assert!(
        ecx_seen > 0 && ecx_seen < 100_000,
        "interrupted mid-string: ECX = {ecx_seen}"
    );
    assert_eq!(
        s.rd32(0x30004),
        at[1],
        "return address is the REP instruction"
    );
    assert_eq!(s.gpr(1), 0);
    assert_eq!(s.ram().read_u8(0x20_0000 + 99_999).unwrap(), 0x5a);
}

#[test]
fn ltr_marks_the_tss_busy_and_refuses_a_busy_one() {
    let mut s = Sys::new();
    s.gdt(FREE, tss32(0x5100, 0x67));
    let sel = (FREE as u16) << 3;
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(eax, sel as u32)?;
                a.ltr(ax)?;
                a.str(ebx)
            }),
            Box::new(|a| {
                a.ltr(ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (13, Some(sel as u32), at[1]));
    assert_eq!(s.gpr(3), sel as u32);
    assert_eq!(
        (s.ram().read_u64(GDT + sel as u64).unwrap() >> 40) & 0xf,
        0xb
    );
    assert_eq!(s.c.state().tr.base, 0x5100);
}

#[test]
fn iret_from_ring0_back_to_v86() {
    let mut s = Sys::new();
    // V86 code: INT 0x80 (IOPL 3), then store DS-relative and INT again.
    let v86 = asm(16, 0, |a| {
        a.int(0x80)?;
        a.mov(word_ptr(0x20), 0x4321u32)?;
        a.int(0x81)
    });
    s.idt(0x80, gate(INT_GATE, KCODE, HANDLER as u32, 3, 0));
    s.idt(
        0x81,
        gate(INT_GATE, KCODE, (STUBS + 0x81 * 16) as u32, 3, 0),
    );
    // The handler changes the saved DS (frame slot 6) and returns.
    handler(&s, HANDLER, |a| {
        a.mov(dword_ptr(esp + 24), 0x3000u32)?;
        a.iretd()
    });
    s.start_v86(&v86, 3);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(0x81));
    assert_eq!(
        s.rd32(0x30020) & 0xffff,
        0x4321,
        "DS = 0x3000 restored from the frame"
    );
    let stk = s.c.state().gpr[4];
    assert_eq!(s.rd32(stk + 4), 0x2000, "CS");
    assert_eq!(s.rd32(stk + 16), 0x0900, "SS");
    assert_eq!(s.rd32(stk + 12), 0x0ff0, "ESP");
}

#[test]
fn bound_out_of_range_is_br_fault() {
    let mut s = Sys::new();
    s.ram().write_u32(0x30000, 10).unwrap();
    s.ram().write_u32(0x30004, 20).unwrap();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(eax, 15u32)?;
                a.bound(eax, ptr(0x30000))?;
                a.mov(eax, 21u32)
            }),
            Box::new(|a| a.bound(eax, ptr(0x30000))),
        ],
    );
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (5, None, at[1]));
}

#[test]
fn invalid_cr0_combinations_are_gp0() {
    for v in [
        popek_cpu::state::cr::CR0_PG as u32 | 0x10, // PG without PE
        popek_cpu::state::cr::CR0_NW as u32 | 0x11, // NW without CD
    ] {
        let mut s = Sys::new();
        s.start_kernel(&kcode(|a| {
            a.mov(eax, v)?;
            a.mov(cr0, eax)
        }));
        let t = s.run_trap();
        assert_eq!(
            (t.vector, t.err, t.eip),
            (13, Some(0), KCODE_AT as u32 + 5),
            "{v:#x}"
        );
    }
}

#[test]
fn mov_to_cr1_or_cr5_is_ud() {
    let mut s = Sys::new();
    // 0F 22 C8 = mov cr1, eax
    let mut code = kcode(|a| a.nop());
    code.extend_from_slice(&[0x0f, 0x22, 0xc8]);
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip), (6, KCODE_AT as u32 + 1));
}

#[test]
fn exception_bitmap_can_intercept_the_double_fault() {
    let mut s = Sys::new();
    s.gdt(FREE, not_present(code32(0)));
    s.idt(13, gate(INT_GATE, (FREE as u16) << 3, 0, 0, 0));
    s.c.exception_bitmap = 1 << 8;
    s.start_user(&ucode(|a| a.hlt()));
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 8,
            error_code: Some(0),
            software: false
        }
    );
    let st = s.c.state().clone();
    assert_eq!(
        (st.rip, st.seg[sr::CS].selector),
        (UCODE_AT, UCODE),
        "state as at the first fault"
    );
}

#[test]
fn jmp_through_task_gate_in_gdt() {
    let mut s = Sys::new();
    let tss2 = 0x5100u64;
    let r = s.c.ram().clone();
    r.fill(tss2, 0x68, 0).unwrap();
    r.write_u32(tss2 + 0x20, HANDLER as u32).unwrap();
    r.write_u32(tss2 + 0x24, 2).unwrap();
    r.write_u32(tss2 + 0x38, 0xb000).unwrap();
    for (i, sel) in [KDATA, KCODE, KDATA, KDATA, KDATA, KDATA]
        .iter()
        .enumerate()
    {
        r.write_u32(tss2 + 0x48 + 4 * i as u64, *sel as u32)
            .unwrap();
    }
    s.gdt(FREE, tss32(tss2 as u32, 0x67));
    s.gdt(FREE + 1, gate(TASK_GATE, (FREE as u16) << 3, 0, 3, 0));
    handler(&s, HANDLER, |a| {
        a.str(eax)?;
        a.hlt()
    });
    // From ring 3 through a DPL 3 task gate to a DPL 0 TSS.
    s.start_user(&ucode(|a| a.jmp_far(((FREE as u16 + 1) << 3) | 3, 0)));
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(0), (FREE as u32) << 3);
    assert_eq!(s.c.cpl(), 0);
}

#[test]
fn iret_with_nt_to_a_tss_that_is_not_busy_is_ts() {
    let mut s = Sys::new();
    s.gdt(FREE, tss32(0x5100, 0x67)); // available, not busy
    s.ram().write_u16(TSS, (FREE as u16) << 3).unwrap(); // back link
    s.eflags = flags::NT;
    s.start_kernel(&kcode(|a| a.iretd()));
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (10, Some((FREE as u32) << 3), KCODE_AT as u32)
    );
}

#[test]
fn page_fault_in_v86_mode_is_a_user_fault() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(0x30000, 0);
    let v86 = asm(16, 0, |a| {
        a.mov(ax, 0x3000u32)?;
        a.mov(ds, ax)?;
        a.mov(word_ptr(0x10), ax)
    });
    s.start_v86(&v86, 0);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(14));
    let stk = s.c.state().gpr[4];
    assert_eq!(s.rd32(stk), 6, "user write to a not-present page");
    assert_eq!(s.rd32(stk + 4), 5, "EIP of the faulting MOV");
    assert_eq!(s.c.state().cr2, 0x30010);
}
