//! Directed segmentation tests (SDM vol. 3 ch. 5): limits, expand-down
//! segments, types, null selectors, segment-register loads and the LDT.

mod common;
use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::seg as sr;
use popek_cpu::RunExit;

const S1: u16 = (FREE as u16) << 3; // 0x48

fn expect(s: &mut Sys, vector: u8, err: u32, eip: u32) -> Trap {
    let t = s.run_trap();
    assert_eq!((t.vector, t.err, t.eip), (vector, Some(err), eip), "{t:x?}");
    t
}

/// Kernel code that loads `sel` into DS, then runs `rest` (fragment 1).
fn with_ds(s: &mut Sys, sel: u16, rest: Frag<'static>) -> Vec<u32> {
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(move |a| {
                a.mov(ax, sel as u32)?;
                a.mov(ds, ax)
            }),
            rest,
        ],
    );
    s.start_kernel(&code);
    at
}

#[test]
fn data_limit_violation_is_gp0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(DATA as u32, 0xfff, 0x92, 0x4));
    let at = with_ds(
        &mut s,
        S1,
        Box::new(|a| {
            a.mov(eax, dword_ptr(0xffc))?; // last dword: fine
            a.mov(ebx, dword_ptr(0xffd))?; // crosses the limit
            a.hlt()
        }),
    );
    expect(&mut s, 13, 0, at[1] + 5);
}

#[test]
fn data_limit_is_byte_granular_or_page_granular() {
    let mut s = Sys::new();
    // G = 1: limit 0 means 0xfff.
    s.gdt(FREE, desc(DATA as u32, 0, 0x92, 0xc));
    let at = with_ds(
        &mut s,
        S1,
        Box::new(|a| {
            a.mov(eax, dword_ptr(0xffc))?;
            a.mov(eax, dword_ptr(0x1000))?;
            a.hlt()
        }),
    );
    expect(&mut s, 13, 0, at[1] + 5);
}

#[test]
fn stack_limit_violation_is_ss0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0x8fff, 0x92, 0x4)); // SS: 0..0x8fff
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(ax, S1 as u32)?;
                a.mov(ss, ax)?;
                a.mov(esp, 0x8000u32)?;
                a.mov(ebp, 0x9000u32)
            }),
            Box::new(|a| {
                a.mov(eax, dword_ptr(ebp))?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 12, 0, at[1]);
}

#[test]
fn push_past_stack_limit_at_cpl3_is_ss0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0x40000, 0xfff, 0xf2, 0x4)); // DPL 3 stack, 4 KiB
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(ax, (S1 | 3) as u32)?;
                a.mov(ss, ax)?;
                a.mov(esp, 2u32)
            }),
            Box::new(|a| {
                a.push(eax)?;
                a.hlt()
            }),
        ],
    );
    s.start_user(&code);
    let t = expect(&mut s, 12, 0, at[1]);
    assert_eq!(
        t.outer,
        Some((S1 | 3, 2)),
        "ESP unchanged by the failed push"
    );
}

#[test]
fn expand_down_data_segment() {
    let mut s = Sys::new();
    // Expand-down, B = 1, limit 0xfff: valid offsets 0x1000..=0xffffffff.
    s.gdt(FREE, desc(0, 0xfff, 0x96, 0x4));
    let at = with_ds(
        &mut s,
        S1,
        Box::new(|a| {
            a.mov(eax, dword_ptr(0x30000))?;
            a.mov(dword_ptr(0x1000), eax)?;
            a.mov(ebx, dword_ptr(0xffe))?; // crosses below the limit
            a.hlt()
        }),
    );
    expect(&mut s, 13, 0, at[1] + 5 + 5);
}

#[test]
fn expand_down_small_segment_upper_bound_is_64k() {
    let mut s = Sys::new();
    // Expand-down, B = 0: valid offsets limit+1..=0xffff.
    s.gdt(FREE, desc(0, 0xfff, 0x96, 0x0));
    let at = with_ds(
        &mut s,
        S1,
        Box::new(|a| {
            a.mov(eax, dword_ptr(0xfffc))?;
            a.mov(eax, dword_ptr(0xfffe))?;
            a.hlt()
        }),
    );
    expect(&mut s, 13, 0, at[1] + 5);
}

#[test]
fn expand_down_stack_violation_is_ss0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0x8fff, 0x96, 0x4)); // valid 0x9000..
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(ax, S1 as u32)?;
                a.mov(ss, ax)?;
                a.mov(esp, 0x9008u32)
            }),
            Box::new(|a| {
                a.push(eax)?;
                a.push(eax)
            }),
            Box::new(|a| {
                a.push(eax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    // The third push would write 0x8ffc..0x8fff: below the bound. The
    // handler's frame cannot go on this stack either, so the #SS becomes a
    // double fault... unless the handler has its own stack: use the
    // exception bitmap to stop at the fault itself.
    s.c.exception_bitmap = 1 << 12;
    let x = s.run();
    assert_eq!(
        x,
        RunExit::Exception {
            vector: 12,
            error_code: Some(0),
            software: false
        }
    );
    let st = s.c.state();
    assert_eq!(st.rip, at[2] as u64);
    assert_eq!(st.gpr[4], 0x9000);
}

#[test]
fn write_to_read_only_data_is_gp0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xfffff, 0x90, 0xc)); // read-only data
    let at = with_ds(
        &mut s,
        S1,
        Box::new(|a| {
            a.mov(eax, dword_ptr(0x30000))?;
            a.mov(dword_ptr(0x30000), eax)?;
            a.hlt()
        }),
    );
    expect(&mut s, 13, 0, at[1] + 5);
}

#[test]
fn write_through_cs_override_is_gp0() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, dword_ptr(0x30000).cs())), // readable code: fine
            Box::new(|a| {
                a.mov(dword_ptr(0x30000).cs(), eax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, 0, at[1]);
}

#[test]
fn read_of_execute_only_code_is_gp0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xfffff, 0x98, 0xc)); // execute-only, DPL 0
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.jmp_far(S1, KCODE_AT as u32 + 7)),
            Box::new(|a| {
                a.mov(eax, dword_ptr(0x30000).cs())?;
                a.hlt()
            }),
        ],
    );
    assert_eq!(at[1], KCODE_AT as u32 + 7);
    s.start_kernel(&code);
    let t = expect(&mut s, 13, 0, at[1]);
    assert_eq!(t.cs, S1);
}

#[test]
fn null_selector_loads_but_faults_on_use() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.xor(eax, eax)?;
                a.mov(es, ax)?;
                a.mov(fs, ax)
            }),
            Box::new(|a| {
                a.mov(eax, dword_ptr(0x30000).es())?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, 0, at[1]);
}

#[test]
fn null_selector_with_rpl_in_ss_is_gp0() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.xor(eax, eax)),
            Box::new(|a| {
                a.mov(ss, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, 0, at[1]);
}

#[test]
fn ss_with_wrong_rpl_is_gp_sel() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, (KDATA | 1) as u32)),
            Box::new(|a| {
                a.mov(ss, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, KDATA as u32, at[1]);
}

#[test]
fn ss_with_wrong_dpl_is_gp_sel() {
    let mut s = Sys::new();
    // A ring-1 data segment with RPL 0, at CPL 0.
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, (R1DATA & !3) as u32)),
            Box::new(|a| {
                a.mov(ss, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, (R1DATA & !3) as u32, at[1]);
}

#[test]
fn ss_at_cpl1_with_rpl0_selector_faults() {
    // The x86-gap case: a deprivileged kernel loading its "ring 0" SS.
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, KDATA as u32)),
            Box::new(|a| {
                a.mov(ss, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_ring1(&code);
    let t = expect(&mut s, 13, KDATA as u32, at[1]);
    assert_eq!(t.outer, Some((R1DATA, ESP1 - 0x100)));
}

#[test]
fn ss_with_read_only_data_is_gp_sel() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0xfffff, 0x90, 0xc));
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, S1 as u32)),
            Box::new(|a| {
                a.mov(ss, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, S1 as u32, at[1]);
}

#[test]
fn ss_not_present_is_ss_sel() {
    let mut s = Sys::new();
    s.gdt(FREE, not_present(data32(0)));
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, S1 as u32)),
            Box::new(|a| {
                a.mov(ss, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 12, S1 as u32, at[1]);
}

#[test]
fn ds_not_present_is_np_sel() {
    let mut s = Sys::new();
    s.gdt(FREE, not_present(data32(0)));
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, S1 as u32)),
            Box::new(|a| {
                a.mov(ds, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 11, S1 as u32, at[1]);
}

#[test]
fn ds_with_more_privileged_dpl_at_cpl3_is_gp_sel() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        UCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, (KDATA | 3) as u32)),
            Box::new(|a| {
                a.mov(ds, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_user(&code);
    expect(&mut s, 13, KDATA as u32, at[1]);
}

#[test]
fn ds_with_rpl_above_dpl_is_gp_sel() {
    let mut s = Sys::new();
    // CPL 0 but RPL 3 against a DPL 0 segment.
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, (KDATA | 3) as u32)),
            Box::new(|a| {
                a.pop(ds)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    // POP DS needs the value on the stack:
    let (code, at2) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.push((KDATA | 3) as u32)?;
                a.nop()
            }),
            Box::new(|a| {
                a.pop(ds)?;
                a.hlt()
            }),
        ],
    );
    let _ = at;
    s.start_kernel(&code);
    let t = expect(&mut s, 13, KDATA as u32, at2[1]);
    assert_eq!(
        s.c.state().gpr[4] as u32 + 16,
        KSTACK - 4,
        "POP did not move ESP"
    );
    let _ = t;
}

#[test]
fn ds_with_system_or_execute_only_descriptor_is_gp_sel() {
    for d in [tss32(0x5000, 0x67), desc(0, 0xfffff, 0x98, 0xc)] {
        let mut s = Sys::new();
        s.gdt(FREE, d);
        let (code, at) = frags(
            32,
            KCODE_AT,
            vec![
                Box::new(|a| a.mov(eax, S1 as u32)),
                Box::new(|a| {
                    a.mov(ds, ax)?;
                    a.hlt()
                }),
            ],
        );
        s.start_kernel(&code);
        expect(&mut s, 13, S1 as u32, at[1]);
    }
}

#[test]
fn ds_with_readable_code_loads() {
    let mut s = Sys::new();
    let code = kcode(|a| {
        a.mov(eax, KCODE as u32)?;
        a.mov(ds, ax)?;
        a.mov(ebx, dword_ptr(KCODE_AT))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(3), u32::from_le_bytes(code[..4].try_into().unwrap()));
}

#[test]
fn selector_beyond_gdt_limit_is_gp_sel() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, 0x400u32)), // index 128: past the 128-entry GDT
            Box::new(|a| {
                a.mov(ds, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, 0x400, at[1]);
}

#[test]
fn load_sets_accessed_bit() {
    let mut s = Sys::new();
    s.gdt(FREE, data32(0) & !(1u64 << 40));
    let code = kcode(|a| {
        a.mov(eax, S1 as u32)?;
        a.mov(ds, ax)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_ne!(s.ram().read_u64(GDT + S1 as u64).unwrap() & (1 << 40), 0);
}

#[test]
fn ldt_selectors() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(LDT as u32, 0xf, 0x82, 0)); // LDT with 2 entries
    s.ldt(1, desc(DATA as u32, 0xffff, 0x92, 0)); // LDT selector 0x0c
    s.ram().write_u32(DATA + 0x10, 0xabcd).unwrap();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(eax, S1 as u32)?;
                a.lldt(ax)?;
                a.mov(eax, 0x0cu32)?;
                a.mov(ds, ax)?;
                a.mov(ebx, dword_ptr(0x10))?;
                a.mov(eax, 0x14u32) // LDT index 2: past its limit
            }),
            Box::new(|a| {
                a.mov(es, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    let t = expect(&mut s, 13, 0x14, at[1]);
    let _ = t;
    assert_eq!(s.gpr(3), 0xabcd);
    let st = s.c.state();
    assert_eq!(st.ldtr.selector, S1);
    assert_eq!(st.ldtr.base, LDT);
    assert_eq!(st.seg[sr::DS].selector, 0x0c);
    assert_eq!(st.seg[sr::DS].base, DATA);
}

#[test]
fn ldt_selector_with_null_ldtr_is_gp_sel() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, 0x0cu32)),
            Box::new(|a| {
                a.mov(ds, ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, 0x0c, at[1]);
}

#[test]
fn lldt_of_non_ldt_descriptor_is_gp_sel() {
    let mut s = Sys::new();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(eax, KDATA as u32)),
            Box::new(|a| {
                a.lldt(ax)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    expect(&mut s, 13, KDATA as u32, at[1]);
}

#[test]
fn execution_past_cs_limit_is_gp0() {
    let mut s = Sys::new();
    // A ring-0 code segment whose limit ends after two NOPs at 0x10000.
    s.gdt(FREE, desc(0, 0x10001, 0x9a, 0x4));
    let code = kcode(|a| {
        a.jmp_far(S1, KCODE_AT as u32 + 7)?;
        a.nop()?;
        a.nop()?;
        a.nop()
    });
    // jmp far is 7 bytes; NOPs at 0x10007.. but the limit is 0x10001:
    // the jump target itself is beyond the limit.
    s.start_kernel(&code);
    expect(&mut s, 13, 0, KCODE_AT as u32);

    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0x10008, 0x9a, 0x4));
    s.start_kernel(&code);
    // Target 0x10007 is in bounds; NOP at 0x10008 too; 0x10009 is not.
    let t = expect(&mut s, 13, 0, 0x10009);
    assert_eq!(t.cs, S1);
}

#[test]
fn instruction_straddling_cs_limit_is_gp0() {
    let mut s = Sys::new();
    s.gdt(FREE, desc(0, 0x1000a, 0x9a, 0x4));
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.jmp_far(S1, KCODE_AT as u32 + 7)),
            Box::new(|a| {
                a.mov(eax, 1u32)?;
                a.hlt()
            }), // 0x10007..0x1000b
        ],
    );
    s.start_kernel(&code);
    let t = expect(&mut s, 13, 0, at[1]);
    assert_eq!(s.gpr(0), 0);
    let _ = t;
}
