//! Directed tests of far control transfers: far JMP/CALL/RET at the same
//! privilege, call gates to inner rings with parameter copying, far RET to
//! an outer ring, conforming code, and hardware task switches (JMP/CALL to
//! a TSS, task gates in the IDT, IRET with NT).

mod common;
use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::{cr, flags, seg as sr};
use popek_cpu::RunExit;

const S1: u16 = (FREE as u16) << 3; // 0x48
const S2: u16 = S1 + 8; // 0x50
const TARGET: u64 = 0x18000;

fn put(s: &Sys, at: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) {
    let code = asm(32, at, f);
    s.ram().write(at, &code).unwrap();
}

#[test]
fn far_call_and_ret_same_privilege() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0x10000, 0xfffff, 0x9a, 0xc)); // ring-0 code based at 0x10000
    put(&s, TARGET, |a| {
        a.mov(eax, cs)?;
        a.mov(ebx, dword_ptr(esp))?;
        a.mov(ecx, dword_ptr(esp + 4))?;
        a.retf()
    });
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.call_far(S1, (TARGET - 0x10000) as u32)),
            Box::new(|a| {
                a.mov(edx, cs)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(0), S1 as u32);
    assert_eq!(
        (s.gpr(3), s.gpr(1)),
        (at[1], KCODE as u32),
        "pushed EIP and CS"
    );
    assert_eq!(s.gpr(2), KCODE as u32);
    assert_eq!(s.gpr(4), KSTACK);
    assert_ne!(
        s.ram().read_u64(GDT + S1 as u64).unwrap() & (1 << 40),
        0,
        "accessed"
    );
}

#[test]
fn far_jmp_same_privilege_and_rpl_is_forced_to_cpl() {
    let mut s = Sys::new();
    put(&s, TARGET, |a| {
        a.mov(eax, cs)?;
        a.hlt()
    });
    // RPL 0 selector of the user code segment from CPL 3: RPL ≤ CPL is fine,
    // and CS.RPL becomes CPL.
    let code = ucode(|a| a.jmp_far(UCODE & !3, TARGET as u32));
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip, t.cs), (13, TARGET as u32 + 2, UCODE));
    assert_eq!(s.gpr(0), UCODE as u32);
}

#[test]
fn far_jmp_to_other_privilege_nonconforming_is_gp_sel() {
    let mut s = Sys::new();
    let code = kcode(|a| a.jmp_far(UCODE, TARGET as u32));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (13, Some(UCODE as u32 & !3), KCODE_AT as u32)
    );

    let mut s = Sys::new();
    let code = ucode(|a| a.call_far(KCODE | 3, TARGET as u32));
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (13, Some(KCODE as u32), UCODE_AT as u32)
    );
}

#[test]
fn far_call_to_data_segment_is_gp_sel_and_not_present_is_np() {
    let mut s = Sys::new();
    let code = kcode(|a| a.call_far(KDATA, TARGET as u32));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(KDATA as u32)));

    let mut s = Sys::new();
    s.gdt(FREE, not_present(code32(0)));
    let code = kcode(|a| a.call_far(S1, TARGET as u32));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (11, Some(S1 as u32)));
    assert_eq!(
        s.c.state().gpr[4] as u32,
        KSTACK - 16,
        "nothing pushed by the failed call"
    );
}

#[test]
fn far_jmp_beyond_target_limit_is_gp0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xffff, 0x9a, 0x4));
    let code = kcode(|a| a.jmp_far(S1, 0x10000));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (13, Some(0), KCODE_AT as u32));
}

#[test]
fn far_call_to_conforming_code_keeps_cpl() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xfffff, 0x9e, 0xc)); // conforming, DPL 0
    put(&s, TARGET, |a| {
        a.mov(eax, cs)?;
        a.mov(ebx, ss)?;
        a.retf()
    });
    let code = ucode(|a| {
        a.call_far(S1, TARGET as u32)?;
        a.hlt()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.eip, t.cs), (13, UCODE_AT as u32 + 7, UCODE));
    assert_eq!(s.gpr(0), (S1 | 3) as u32, "CS.RPL = CPL = 3");
    assert_eq!(s.gpr(3), UDATA as u32);
}

#[test]
fn call_gate_to_ring0_copies_parameters_and_far_ret_returns_to_ring3() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, TARGET as u32, 3, 2));
    // Ring-0 side: record the stack, then return popping the 2 parameters.
    put(&s, TARGET, |a| {
        a.mov(eax, esp)?;
        a.mov(ebx, ss)?;
        a.mov(ecx, cs)?;
        a.mov(esi, dword_ptr(esp + 8))?; // param 0 (the last pushed)
        a.mov(edi, dword_ptr(esp + 12))?; // param 1
        a.retf_1(8)
    });
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(esp, 0xef00u32)?;
                a.push(0x1111u32)?;
                a.push(0x2222u32)?;
                a.call_far(S1 | 3, 0xdead_beef)
            }),
            Box::new(|a| {
                a.mov(edx, cs)?;
                a.hlt()
            }),
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
    assert_eq!(s.gpr(0), ESP0 - 24, "SS, ESP, 2 params, CS, EIP");
    assert_eq!(s.gpr(3), KDATA as u32);
    assert_eq!(s.gpr(1), KCODE as u32);
    assert_eq!((s.gpr(6), s.gpr(7)), (0x2222, 0x1111));
    let frame: Vec<u32> = (0..6).map(|i| s.rd32(ESP0 as u64 - 24 + 4 * i)).collect();
    assert_eq!(
        frame,
        vec![
            at[1],
            UCODE as u32,
            0x2222,
            0x1111,
            0xef00 - 8,
            UDATA as u32
        ]
    );
    // Back at ring 3 after the far RET 8: ESP past the parameters.
    assert_eq!(st.rip, at[1] as u64 + 2);
    assert_eq!(st.seg[sr::CS].selector, UCODE);
    assert_eq!(st.seg[sr::SS].selector, UDATA);
    assert_eq!(st.gpr[4] as u32, 0xef00);
    assert_eq!(st.gpr[2] as u32, UCODE as u32);
}

#[test]
fn call_gate_dpl_below_cpl_is_gp_sel() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, TARGET as u32, 0, 0));
    let code = ucode(|a| a.call_far(S1 | 3, 0));
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.err, t.eip),
        (13, Some(S1 as u32), UCODE_AT as u32)
    );
}

#[test]
fn call_gate_rpl_above_gate_dpl_is_gp_sel() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, TARGET as u32, 1, 0));
    let code = ucode(|a| a.call_far(S1 | 3, 0));
    s.start_ring1(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(S1 as u32)));
}

#[test]
fn not_present_call_gate_is_np_sel() {
    let mut s = Sys::new();
    s.gdt(
        FREE,
        not_present(gate(CALL_GATE, KCODE, TARGET as u32, 3, 0)),
    );
    let code = ucode(|a| a.call_far(S1 | 3, 0));
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (11, Some(S1 as u32)));
}

#[test]
fn jmp_through_call_gate_to_inner_ring_is_gp() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, TARGET as u32, 3, 0));
    let code = ucode(|a| a.jmp_far(S1 | 3, 0));
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(KCODE as u32)));
}

#[test]
fn call_gate_same_privilege_no_stack_switch() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, TARGET as u32, 0, 3));
    put(&s, TARGET, |a| {
        a.mov(eax, esp)?;
        a.retf()
    });
    let code = kcode(|a| {
        a.call_far(S1, 0)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(
        s.gpr(0),
        KSTACK - 8,
        "no parameter copy without a privilege change"
    );
    assert_eq!(s.gpr(4), KSTACK);
}

#[test]
fn call_gate_to_ring1_from_ring3() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, R1CODE & !3, TARGET as u32, 3, 1));
    put(&s, TARGET, |a| {
        a.mov(eax, cs)?;
        a.mov(ebx, esp)?;
        a.retf_1(4)
    });
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| {
                a.push(0x77u32)?;
                a.call_far(S1 | 3, 0)
            }),
            Box::new(|a| a.hlt()),
        ],
    );
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.eip, t.cs, t.outer),
        (13, at[1], UCODE, Some((UDATA, USTACK)))
    );
    assert_eq!(s.gpr(0), R1CODE as u32);
    assert_eq!(s.gpr(3), ESP1 - 20);
    assert_eq!(s.rd32(ESP1 as u64 - 12), 0x77);
}

#[test]
fn far_ret_to_outer_ring_nulls_privileged_data_segments() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![Box::new(|a| {
            a.push(UDATA as u32)?;
            a.push(USTACK - 0x10)?;
            a.push(UCODE as u32)?;
            a.push(UCODE_AT as u32)?;
            a.retf()
        })],
    );
    let _ = at;
    let user = ucode(|a| {
        a.mov(eax, ds)?;
        a.mov(ebx, es)?;
        a.hlt()
    });
    s.ram().write(UCODE_AT, &user).unwrap();
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!(
        (t.vector, t.cs, t.outer),
        (13, UCODE, Some((UDATA, USTACK - 0x10)))
    );
    assert_eq!((s.gpr(0), s.gpr(3)), (0, 0), "DS and ES (DPL 0) nulled");
}

#[test]
fn far_ret_to_inner_ring_is_gp_sel() {
    let mut s = Sys::new();
    let code = ucode(|a| {
        a.push(KCODE as u32)?;
        a.push(TARGET as u32)?;
        a.retf()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(KCODE as u32)));
}

/// Builds a second 32-bit TSS at 0x5100 whose task starts at `eip` with
/// ring-0 flat segments and ESP 0xb000; GDT slot FREE + 1 (selector 0x50).
fn tss2(s: &Sys, eip: u32, eflags: u32) -> u16 {
    let base = 0x5100u64;
    let r = s.ram();
    r.fill(base, 0x68, 0).unwrap();
    r.write_u32(base + 0x1c, 0).unwrap();
    r.write_u32(base + 0x20, eip).unwrap();
    r.write_u32(base + 0x24, eflags).unwrap();
    r.write_u32(base + 0x28, 0xaaaa).unwrap(); // EAX
    r.write_u32(base + 0x38, 0xb000).unwrap(); // ESP
    for (i, sel) in [KDATA, KCODE, KDATA, KDATA, KDATA, KDATA]
        .iter()
        .enumerate()
    {
        r.write_u32(base + 0x48 + 4 * i as u64, *sel as u32)
            .unwrap();
    }
    s.gdt(FREE + 1, tss32(base as u32, 0x67));
    S2
}

fn busy(s: &Sys, sel: u16) -> bool {
    (s.ram().read_u64(GDT + sel as u64).unwrap() >> 40) & 0xf == 0xb
}

#[test]
fn far_jmp_to_tss_switches_task() {
    let mut s = Sys::new();
    let t2 = tss2(&s, TARGET as u32, 2);
    put(&s, TARGET, |a| {
        a.mov(ebx, eax)?;
        a.hlt()
    });
    let code = kcode(|a| {
        a.mov(eax, 0x1234u32)?;
        a.mov(ecx, 0x99u32)?;
        a.jmp_far(t2, 0)
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    let st = s.c.state().clone();
    assert_eq!(st.tr.selector, t2);
    assert_eq!(s.gpr(3), 0xaaaa, "EAX from the new TSS");
    assert_eq!(st.gpr[4], 0xb000);
    assert_eq!(st.rflags as u32 & flags::NT, 0, "JMP does not nest");
    assert_ne!(st.cr0 & cr::CR0_TS, 0);
    assert!(busy(&s, t2));
    assert!(!busy(&s, TSS_SEL), "old task no longer busy");
    // Old state saved: EIP after the JMP, EAX, ECX.
    assert_eq!(s.rd32(TSS + 0x20), KCODE_AT as u32 + 5 + 5 + 7);
    assert_eq!(s.rd32(TSS + 0x28), 0x1234);
    assert_eq!(s.rd32(TSS + 0x2c), 0x99);
    assert_eq!(s.rd32(TSS + 0x4c), KCODE as u32);
}

#[test]
fn call_to_tss_nests_and_iret_returns() {
    let mut s = Sys::new();
    let t2 = tss2(&s, TARGET as u32, 2);
    put(&s, TARGET, |a| {
        a.mov(ebx, eax)?;
        a.pushfd()?;
        a.pop(edx)?;
        a.mov(dword_ptr(0x30000), edx)?;
        a.str(word_ptr(0x30004))?;
        a.iretd()?;
        a.mov(eax, 0x5555u32)?; // the task's next entry point
        a.iretd()
    });
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(eax, 0x1234u32)?;
                a.call_far(t2, 0)
            }),
            Box::new(|a| {
                a.mov(esi, eax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    let st = s.c.state().clone();
    assert_eq!(st.rip, at[1] as u64 + 3);
    assert_eq!(st.tr.selector, TSS_SEL, "back in the first task");
    assert_eq!(s.gpr(6), 0x1234, "its registers restored");
    assert_ne!(
        s.rd32(0x30000) & flags::NT,
        0,
        "the called task ran with NT"
    );
    assert_eq!(s.ram().read_u16(0x30004).unwrap(), t2);
    assert_eq!(s.ram().read_u16(0x5100).unwrap(), TSS_SEL, "back link");
    assert!(!busy(&s, t2), "IRET frees the nested task");
    assert!(busy(&s, TSS_SEL));
    assert_eq!(st.rflags as u32 & flags::NT, 0);
    // The nested task's EIP was saved after its IRET.
    let next = s.rd32(0x5100 + 0x20);
    assert!(next > TARGET as u32 && next < TARGET as u32 + 0x40);
}

#[test]
fn call_to_busy_tss_is_gp_sel() {
    let mut s = Sys::new();
    let code = kcode(|a| a.call_far(TSS_SEL, 0));
    s.start_kernel(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(TSS_SEL as u32)));
}

#[test]
fn task_gate_in_idt_for_software_interrupt() {
    let mut s = Sys::new();
    let t2 = tss2(&s, TARGET as u32, 2);
    s.idt(0x50, gate(TASK_GATE, t2, 0, 0, 0));
    put(&s, TARGET, |a| {
        a.mov(ebx, 0x42u32)?;
        a.iretd()
    });
    let code = kcode(|a| {
        a.int(0x50)?;
        a.mov(ecx, 1u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(1), 1);
    assert_eq!(s.gpr(3), 0, "EBX restored from the first task");
    assert_eq!(s.c.state().tr.selector, TSS_SEL);
    assert_eq!(
        s.rd32(0x5100 + 0x34),
        0x42,
        "EBX saved in the nested task's TSS"
    );
}

#[test]
fn double_fault_through_task_gate_like_linux() {
    let mut s = Sys::new();
    let t2 = tss2(&s, TARGET as u32, 2);
    s.idt(8, gate(TASK_GATE, t2, 0, 0, 0));
    put(&s, TARGET, |a| {
        a.pop(eax)?;
        a.hlt()
    });
    // #GP whose gate is not present (#NP) → #DF → task switch.
    s.idt(13, not_present(gate(INT_GATE, KCODE, 0, 0, 0)));
    let code = ucode(|a| a.hlt());
    s.start_user(&code);
    assert_eq!(s.run(), RunExit::Halted);
    let st = s.c.state().clone();
    assert_eq!(st.tr.selector, t2);
    assert_eq!(st.gpr[0], 0, "error code 0 on the new task's stack");
    assert_eq!(st.gpr[4], 0xb000);
    assert_eq!(
        s.rd32(TSS + 0x20),
        UCODE_AT as u32,
        "the faulting EIP in the old TSS"
    );
    assert_eq!(s.rd32(TSS + 0x4c), UCODE as u32);
    assert_eq!(s.rd32(TSS + 0x50), UDATA as u32);
}

#[test]
fn task_switch_loads_cr3_and_ldt() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    // A second page directory sharing the page table but mapping 0x31000
    // to 0x32000.
    let pd2 = 0x10_2000u64;
    let pt2 = 0x10_3000u64;
    let mut buf = vec![0u8; 4096];
    s.ram().read(PT, &mut buf).unwrap();
    s.ram().write(pt2, &buf).unwrap();
    s.ram().write_u32(pt2 + 4 * 0x31, 0x32000 | P | W).unwrap();
    s.ram().write_u32(pd2, pt2 as u32 | P | W | U).unwrap();
    s.ram().write_u32(0x32000, 0xbeef).unwrap();
    s.ram().write_u32(0x31000, 0xdead).unwrap();
    let t2 = tss2(&s, TARGET as u32, 2);
    s.ram().write_u32(0x5100 + 0x1c, pd2 as u32).unwrap();
    s.gdt(FREE, desc(LDT as u32, 0xf, 0x82, 0));
    s.ram().write_u16(0x5100 + 0x60, S1).unwrap();
    put(&s, TARGET, |a| {
        a.mov(eax, dword_ptr(0x31000))?;
        a.sldt(ebx)?;
        a.mov(ecx, cr3)?;
        a.hlt()
    });
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(0x31000))?;
        a.jmp_far(t2, 0)
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0), 0xbeef);
    assert_eq!(s.gpr(3), S1 as u32);
    assert_eq!(s.gpr(1), pd2 as u32);
    assert_eq!(s.rd32(TSS + 0x1c), 0, "CR3 is not saved in the old TSS");
}

#[test]
fn task_switch_to_tss_with_bad_cs_is_ts() {
    let mut s = Sys::new();
    let t2 = tss2(&s, TARGET as u32, 2);
    s.ram().write_u32(0x5100 + 0x4c, KDATA as u32).unwrap(); // CS = data
    let code = kcode(|a| a.jmp_far(t2, 0));
    s.start_kernel(&code);
    let x = s.run();
    // The #TS is raised in the context of the new task (SDM 7.3 step 13).
    assert_eq!(x, RunExit::Halted);
    assert_eq!(s.stub_vector(), Some(10));
    assert_eq!(s.c.state().tr.selector, t2);
}

#[test]
fn call_to_16_bit_tss_and_iret_back() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xffff, 0x9a, 0)); // 16-bit ring-0 code (0x48)
    let base = 0x5200u64;
    let r = s.c.ram().clone();
    r.fill(base, 0x2c, 0).unwrap();
    r.write_u16(base + 0x0e, 0x8000).unwrap(); // IP
    r.write_u16(base + 0x10, 0x0002).unwrap(); // FLAGS
    r.write_u16(base + 0x12, 0x1234).unwrap(); // AX
    r.write_u16(base + 0x1a, 0xa000).unwrap(); // SP
    for (i, sel) in [KDATA, S1, KDATA, KDATA].iter().enumerate() {
        r.write_u16(base + 0x22 + 2 * i as u64, *sel).unwrap();
    }
    s.gdt(FREE + 1, desc(base as u32, 0x2b, 0x81, 0)); // 286 TSS, available
    put(&s, 0x8000, |_| Ok(()));
    r.write(
        0x8000,
        &asm(16, 0x8000, |a| {
            a.mov(word_ptr(0x7f00), ax)?;
            a.str(word_ptr(0x7f02))?;
            a.pushf()?;
            a.pop(word_ptr(0x7f04))?;
            a.iret()
        }),
    )
    .unwrap();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(ebx, 0x5555u32)?;
                a.call_far(S2, 0)
            }),
            Box::new(|a| a.hlt()),
        ],
    );
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    let st = s.c.state().clone();
    assert_eq!(st.rip, at[1] as u64 + 1);
    assert_eq!(st.tr.selector, TSS_SEL);
    assert_eq!(st.gpr[3], 0x5555);
    assert_eq!(r.read_u16(0x7f00).unwrap(), 0x1234, "AX from the 286 TSS");
    assert_eq!(r.read_u16(0x7f02).unwrap(), S2);
    assert_ne!(r.read_u16(0x7f04).unwrap() as u32 & flags::NT, 0);
    assert_eq!(r.read_u16(base).unwrap(), TSS_SEL, "back link");
    assert!(
        r.read_u16(base + 0x0e).unwrap() > 0x8000,
        "IP saved after the IRET"
    );
    assert_eq!(
        (r.read_u64(GDT + S2 as u64).unwrap() >> 40) & 0xf,
        0x1,
        "available again"
    );
}

#[test]
fn sixteen_bit_call_gate_pushes_16_bit_frame_and_copies_words() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE16, KCODE, 0x8000, 3, 2));
    put(&s, 0x8000, |a| {
        a.mov(eax, esp)?;
        a.hlt()
    });
    let code = ucode(|a| {
        a.mov(esp, 0xef00u32)?;
        a.push(0x1111u32)?;
        a.call_far(S1 | 3, 0)
    });
    s.start_user(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    // SS, SP, two 16-bit parameters, CS, IP: 6 words.
    assert_eq!(s.gpr(0), ESP0 - 12);
    let w: Vec<u16> = (0..6)
        .map(|i| s.ram().read_u16(ESP0 as u64 - 12 + 2 * i).unwrap())
        .collect();
    assert_eq!(
        w,
        vec![
            (UCODE_AT as u16).wrapping_add(5 + 5 + 7),
            UCODE,
            0x1111,
            0x0000,
            0xeefc,
            UDATA
        ]
    );
}

#[test]
fn sixteen_bit_trap_gate_from_ring3_pushes_16_bit_frame() {
    let mut s = Sys::new();
    s.idt(0x80, gate(7, KCODE, 0x8000, 3, 0)); // 286 trap gate
    put(&s, 0x8000, |a| a.hlt());
    let code = ucode(|a| {
        a.mov(esp, 0xef00u32)?;
        a.int(0x80)
    });
    s.start_user(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.c.state().gpr[4] as u32, ESP0 - 10);
    let w: Vec<u16> = (0..5)
        .map(|i| s.ram().read_u16(ESP0 as u64 - 10 + 2 * i).unwrap())
        .collect();
    assert_eq!(
        w,
        vec![
            (UCODE_AT as u16).wrapping_add(7),
            UCODE,
            0x0002,
            0xef00,
            UDATA
        ]
    );
}

#[test]
fn call_gate_with_no_room_on_the_inner_stack_is_ss_new_ss() {
    let mut s = Sys::new();
    s.gdt(FREE, gate(CALL_GATE, KCODE, TARGET as u32, 3, 0));
    s.gdt(FREE + 1, desc(0x40000, 0xfff, 0x92, 0x4)); // small ring-0 stack
    s.ram().write_u32(TSS + 4, 8).unwrap(); // ESP0 = 8: room for 2 dwords
    s.ram().write_u32(TSS + 8, S2 as u32).unwrap();
    s.c.exception_bitmap = 1 << 12;
    s.start_user(&ucode(|a| a.call_far(S1 | 3, 0)));
    assert_eq!(
        s.run(),
        RunExit::Exception {
            vector: 12,
            error_code: Some(S2 as u32),
            software: false
        }
    );
    let st = s.c.state().clone();
    assert_eq!(
        (st.rip, st.seg[sr::CS].selector, st.gpr[4] as u32),
        (UCODE_AT, UCODE, USTACK)
    );
}

#[test]
fn far_call_and_ret_through_ldt_code_segment() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(LDT as u32, 0xf, 0x82, 0));
    s.ldt(1, code32(0)); // LDT selector 0x0c
    put(&s, TARGET, |a| {
        a.mov(eax, cs)?;
        a.retf()
    });
    let code = kcode(|a| {
        a.mov(eax, S1 as u32)?;
        a.lldt(ax)?;
        a.call_far(0x0c, TARGET as u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(0), 0x0c);
    assert_eq!(s.c.state().seg[sr::CS].selector, KCODE);
}
