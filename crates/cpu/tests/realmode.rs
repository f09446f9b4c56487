//! Directed real-mode tests: IVT delivery, segment arithmetic, 16-bit
//! addressing forms with 64 KiB wrap-around, and switching to protected
//! mode and back.

mod common;
use common::sys::*;
use common::*;
use iced_x86::code_asm::*;
use popek_cpu::state::{cr, flags, seg as sr};
use popek_cpu::{CpuState, RunExit, Segment};

/// A CPU in real mode at 0000:7C00 with SS:SP = 0000:7000 and `code` there.
fn real(code: &[u8]) -> (popek_cpu::Cpu, TestBus) {
    let mut c = cpu(2);
    c.ram().write(0x7c00, code).unwrap();
    let mut st = CpuState::reset();
    for s in 0..6 {
        st.seg[s] = Segment::real(0);
    }
    st.seg[sr::CS].attr |= popek_cpu::state::attr::CODE;
    st.rip = 0x7c00;
    st.gpr[4] = 0x7000;
    c.set_state(st);
    (c, TestBus::default())
}

fn r16(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
    asm(16, 0x7c00, f)
}

#[test]
fn ivt_delivery() {
    let code = r16(|a| {
        a.sti()?;
        a.stc()?;
        a.int(0x21)?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u16(0x21 * 4, 0x0010).unwrap();
    c.ram().write_u16(0x21 * 4 + 2, 0x0800).unwrap();
    c.ram().write_u8(0x8010, 0xf4).unwrap(); // hlt at 0800:0010
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state().clone();
    assert_eq!(
        (st.seg[sr::CS].selector, st.seg[sr::CS].base, st.rip),
        (0x800, 0x8000, 0x11)
    );
    assert_eq!(st.gpr[4], 0x7000 - 6);
    assert_eq!(
        c.ram().read_u16(0x7000 - 6).unwrap(),
        0x7c00 + 4,
        "IP after INT"
    );
    assert_eq!(c.ram().read_u16(0x7000 - 4).unwrap(), 0);
    let fl = c.ram().read_u16(0x7000 - 2).unwrap() as u32;
    assert_eq!(fl & (flags::IF | flags::CF), flags::IF | flags::CF);
    assert_eq!(
        st.rflags as u32 & (flags::IF | flags::TF),
        0,
        "IF and TF cleared"
    );
}

#[test]
fn iret_returns_from_ivt_handler() {
    let code = r16(|a| {
        a.int(0x21)?;
        a.mov(bx, 7u32)?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u32(0x21 * 4, 0x0800_0010).unwrap();
    c.ram()
        .write(
            0x8010,
            &asm(16, 0x10, |a| {
                a.mov(ax, 5u32)?;
                a.iret()
            }),
        )
        .unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state();
    assert_eq!((st.gpr[0], st.gpr[3], st.gpr[4]), (5, 7, 0x7000));
    assert_eq!(st.seg[sr::CS].selector, 0);
}

#[test]
fn divide_error_in_real_mode_uses_ivt_with_ip_at_instruction() {
    let code = r16(|a| {
        a.xor(cx, cx)?;
        a.div(cx)
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u32(0, 0x0800_0000).unwrap();
    c.ram().write_u8(0x8000, 0xf4).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    assert_eq!(c.ram().read_u16(0x7000 - 6).unwrap(), 0x7c02);
    assert_eq!(c.state().gpr[4], 0x7000 - 6, "no error code in real mode");
}

#[test]
fn segment_arithmetic() {
    let code = r16(|a| {
        a.mov(ax, 0x1234u32)?;
        a.mov(ds, ax)?;
        a.mov(ax, word_ptr(0x10))?; // 0x12340 + 0x10
        a.mov(bx, 0xffffu32)?;
        a.mov(es, bx)?;
        a.mov(cx, word_ptr(0x20).es())?; // 0xffff0 + 0x20 = 0x100010 (no A20 wrap)
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u16(0x12350, 0xabcd).unwrap();
    c.ram().write_u16(0x10_0010, 0x1357).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state();
    assert_eq!(st.gpr[0] & 0xffff, 0xabcd);
    assert_eq!(st.gpr[1] & 0xffff, 0x1357);
    assert_eq!(st.seg[sr::DS].base, 0x12340);
}

#[test]
fn sixteen_bit_addressing_forms() {
    let code = r16(|a| {
        a.mov(bx, 0x100u32)?;
        a.mov(si, 0x20u32)?;
        a.mov(di, 0x30u32)?;
        a.mov(bp, 0x200u32)?;
        a.mov(ax, word_ptr(bx + si + 4))?; // 0x124
        a.mov(cx, word_ptr(bx + di))?; // 0x130
        a.mov(dx, word_ptr(bp + si + 2))?; // SS:0x222
        a.mov(word_ptr(bp + di - 2), 0x4444u32)?; // SS:0x22e
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u16(0x124, 0x1111).unwrap();
    c.ram().write_u16(0x130, 0x2222).unwrap();
    c.ram().write_u16(0x5222, 0x3333).unwrap(); // SS base 0x5000
    let mut st = c.state().clone();
    st.seg[sr::SS] = Segment::real(0x500);
    c.set_state(st);
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state().clone();
    assert_eq!(st.gpr[0] & 0xffff, 0x1111);
    assert_eq!(st.gpr[1] & 0xffff, 0x2222);
    assert_eq!(st.gpr[2] & 0xffff, 0x3333, "BP-based forms default to SS");
    assert_eq!(c.ram().read_u16(0x522e).unwrap(), 0x4444);
}

#[test]
fn sixteen_bit_effective_addresses_wrap_at_64k() {
    let code = r16(|a| {
        a.mov(bx, 0xfff0u32)?;
        a.mov(si, 0x0020u32)?;
        a.mov(ax, word_ptr(bx + si))?; // (0xfff0 + 0x20) & 0xffff = 0x10
        a.mov(di, 0xffffu32)?;
        a.mov(cx, word_ptr(di + 0x11))?; // 0x10
        a.mov(ebx, 0x1_0000u32)?; // upper bits of EBX ignored
        a.mov(dx, word_ptr(bx + 0x10))?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u16(0x10, 0x5678).unwrap();
    c.ram().write_u16(0x10010, 0x9999).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state();
    assert_eq!(st.gpr[0] & 0xffff, 0x5678);
    assert_eq!(st.gpr[1] & 0xffff, 0x5678);
    assert_eq!(st.gpr[2] & 0xffff, 0x5678);
}

#[test]
fn word_access_at_offset_ffff_is_gp() {
    // A word at DS:FFFF crosses the real-mode segment limit: #GP → IVT 13.
    let code = r16(|a| {
        a.mov(bx, 0xffffu32)?;
        a.mov(ax, word_ptr(bx))
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u32(13 * 4, 0x0800_0000).unwrap();
    c.ram().write_u8(0x8000, 0xf4).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    assert_eq!(c.state().seg[sr::CS].selector, 0x800);
    assert_eq!(c.ram().read_u16(0x7000 - 6).unwrap(), 0x7c03);
}

#[test]
fn operand_and_address_size_prefixes_in_real_mode() {
    let code = r16(|a| {
        a.mov(eax, 0x1234_5678u32)?; // 66 prefix
        a.mov(ebx, 0x2_0000u32)?;
        a.mov(dword_ptr(ebx + 0x10), eax)?; // 67 prefix: 32-bit address (within limit? no)
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u32(13 * 4, 0x0800_0000).unwrap();
    c.ram().write_u8(0x8000, 0xf4).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    // Offset 0x20010 exceeds the 64 KiB limit: #GP.
    assert_eq!(c.state().seg[sr::CS].selector, 0x800);
    assert_eq!(c.state().gpr[0], 0x1234_5678);
}

#[test]
fn switch_to_protected_mode_and_back() {
    let mut c = cpu(2);
    let gdt = 0x500u64;
    let r = c.ram().clone();
    r.write_u64(gdt + 8, code32(0)).unwrap();
    r.write_u64(gdt + 16, data32(0)).unwrap();
    r.write_u64(gdt + 24, desc(0, 0xffff, 0x9a, 0)).unwrap(); // 16-bit code
    r.write_u64(gdt + 32, desc(0, 0xffff, 0x92, 0)).unwrap(); // 16-bit data
    r.write_u16(0x600, 5 * 8 - 1).unwrap();
    r.write_u32(0x602, gdt as u32).unwrap();
    // Real mode: LGDT, set PE, far jump to 32-bit code.
    let real_part = asm(16, 0x7c00, |a| {
        a.cli()?;
        a.lgdt(ptr(0x600))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1u32)?;
        a.mov(cr0, eax)?;
        a.jmp_far(0x08, 0x8000)
    });
    let pm32 = asm(32, 0x8000, |a| {
        a.mov(ax, 0x10u32)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x9000u32)?;
        a.mov(dword_ptr(0x700), cs)?;
        a.mov(eax, 0x1234_5678u32)?;
        a.push(eax)?;
        a.pop(dword_ptr(0x704))?;
        a.jmp_far(0x18, 0x8100) // 16-bit protected-mode code
    });
    let pm16 = asm(16, 0x8100, |a| {
        a.mov(ax, 0x20u32)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(eax, cr0)?;
        a.and(eax, !1u32)?;
        a.mov(cr0, eax)?;
        a.jmp_far(0x0820, 0x0010) // real mode: 0x8200
    });
    let back = asm(16, 0x10, |a| {
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, 0x7000u32)?;
        a.mov(word_ptr(0x708), cs)?;
        a.hlt()
    });
    r.write(0x7c00, &real_part).unwrap();
    r.write(0x8000, &pm32).unwrap();
    r.write(0x8100, &pm16).unwrap();
    r.write(0x8210, &back).unwrap();
    let mut st = CpuState::reset();
    for s in 0..6 {
        st.seg[s] = Segment::real(0);
    }
    st.rip = 0x7c00;
    st.gpr[4] = 0x7000;
    c.set_state(st);
    let mut bus = TestBus::default();
    assert_eq!(c.run(&mut bus, 1000), RunExit::Halted);
    assert_eq!(r.read_u16(0x700).unwrap(), 0x08);
    assert_eq!(r.read_u32(0x704).unwrap(), 0x1234_5678);
    assert_eq!(r.read_u16(0x708).unwrap(), 0x0820);
    let st = c.state().clone();
    assert_eq!(st.cr0 & cr::CR0_PE, 0);
    assert_eq!(st.seg[sr::CS].base, 0x8200);
    assert_eq!(st.rip, 0x10 + back.len() as u64);
    assert_eq!(c.cpl(), 0);
}

#[test]
fn lmsw_sets_pe_but_cannot_clear_it() {
    let code = r16(|a| {
        a.mov(ax, 1u32)?;
        a.lmsw(ax)?;
        a.xor(ax, ax)?;
        a.lmsw(ax)?;
        a.smsw(bx)?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    // Still fetching with the real-mode CS cache after PE=1 (no far jump).
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    assert_eq!(c.state().gpr[3] & 1, 1);
}

#[test]
fn real_mode_far_call_and_retf() {
    let code = r16(|a| {
        a.call_far(0x0800, 0x0000)?;
        a.mov(cx, 3u32)?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram()
        .write(
            0x8000,
            &asm(16, 0, |a| {
                a.mov(ax, cs)?;
                a.retf()
            }),
        )
        .unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state();
    assert_eq!(
        (st.gpr[0] & 0xffff, st.gpr[1] & 0xffff, st.gpr[4]),
        (0x800, 3, 0x7000)
    );
}

#[test]
fn rep_movsw_with_16_bit_addresses_wraps_si_di() {
    let code = r16(|a| {
        a.cld()?;
        a.mov(si, 0xfffeu32)?;
        a.mov(di, 0x100u32)?;
        a.mov(cx, 2u32)?;
        a.rep().movsw()?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    c.ram().write_u16(0xfffe, 0xaaaa).unwrap();
    c.ram().write_u16(0x0000, 0xbbbb).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    assert_eq!(c.ram().read_u32(0x100).unwrap(), 0xbbbb_aaaa);
    assert_eq!(c.state().gpr[6] & 0xffff, 2);
}

#[test]
fn external_interrupt_in_real_mode() {
    let code = r16(|a| {
        a.sti()?;
        a.nop()?;
        a.hlt()
    });
    let (mut c, mut bus) = real(&code);
    bus.irq = Some(0x08);
    c.ram().write_u32(8 * 4, 0x0800_0000).unwrap();
    c.ram().write_u8(0x8000, 0xf4).unwrap();
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    assert_eq!(c.state().seg[sr::CS].selector, 0x800);
    assert_eq!(
        c.ram().read_u16(0x7000 - 6).unwrap(),
        0x7c02,
        "after the STI shadow"
    );
}

#[test]
fn protected_mode_only_instructions_are_ud_in_real_mode() {
    type F = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;
    let cases: Vec<(&str, F)> = vec![
        ("sldt", |a| a.sldt(ax)),
        ("str", |a| a.str(ax)),
        ("lldt", |a| a.lldt(ax)),
        ("ltr", |a| a.ltr(ax)),
        ("lar", |a| a.lar(ax, bx)),
        ("lsl", |a| a.lsl(ax, bx)),
        ("verr", |a| a.verr(ax)),
        ("verw", |a| a.verw(ax)),
        ("arpl", |a| a.arpl(ax, bx)),
    ];
    for (name, f) in cases {
        let (mut c, mut bus) = real(&r16(f));
        c.exception_bitmap = 1 << 6;
        assert_eq!(
            c.run(&mut bus, 10),
            RunExit::Exception {
                vector: 6,
                error_code: None,
                software: false
            },
            "{name}"
        );
        assert_eq!(c.state().rip, 0x7c00);
    }
}

/// IP wraps at 64 KiB: after an instruction ending at CS:FFFF the next one
/// is at CS:0000, not at the linear byte after it (a decoded block must
/// end there; it used to run on into the next 64 KiB).
#[test]
fn ip_wraps_to_the_start_of_the_code_segment() {
    // CS = 0x1000 (base 0x10000): at 1000:FFFE `inc ax` twice (40 40), at
    // 1000:0000 `hlt`; the linear bytes after 0x1FFFF are `inc bx` (43).
    let (mut c, mut bus) = real(&[]);
    c.ram().write(0x1fffe, &[0x40, 0x40]).unwrap();
    c.ram().write(0x20000, &[0x43; 16]).unwrap();
    c.ram().write_u8(0x10000, 0xf4).unwrap();
    let mut st = c.state().clone();
    st.seg[sr::CS] = Segment::real(0x1000);
    st.seg[sr::CS].attr |= popek_cpu::state::attr::CODE;
    st.rip = 0xfffe;
    c.set_state(st);
    assert_eq!(c.run(&mut bus, 100), RunExit::Halted);
    let st = c.state().clone();
    assert_eq!((st.gpr[0] & 0xffff, st.gpr[3] & 0xffff), (2, 0), "{st:x?}");
    assert_eq!(st.rip, 1, "halted at 1000:0000");
}

/// Events delivered count against `run`'s budget, and a block does not run
/// past it: in a loop of a fault (UD2) and a 5-instruction handler, every
/// budget ends with instructions + events = budget exactly (`bt` stops at
/// the same point; a block once ran up to its end after an event, and the
/// engines' slices then differed).
#[test]
fn a_run_never_goes_past_its_budget_counting_events() {
    let code = r16(|a| a.ud2());
    for budget in 1..=40u64 {
        let (mut c, mut bus) = real(&code);
        c.ram().write_u16(6 * 4, 0x0010).unwrap();
        c.ram().write_u16(6 * 4 + 2, 0x0800).unwrap();
        // inc ax ×4; iret — back to the UD2.
        c.ram()
            .write(0x8010, &[0x40, 0x40, 0x40, 0x40, 0xcf])
            .unwrap();
        assert_eq!(c.run(&mut bus, budget), RunExit::Budget);
        assert_eq!(c.icount + c.events_delivered, budget, "budget {budget}");
    }
}
