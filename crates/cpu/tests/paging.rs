//! Directed paging tests (SDM vol. 3 ch. 4): #PF error codes and CR2,
//! CR0.WP, U/S, 4 MiB pages, accessed/dirty bits, and TLB behaviour.

mod common;
use common::sys::*;
use iced_x86::code_asm::*;
use popek_cpu::state::cr;
use popek_cpu::RunExit;

const PAGE: u32 = 0x31000;

fn pf(s: &mut Sys, err: u32, fault_addr: u32, eip: u32) {
    let t = s.run_trap();
    assert_eq!(t.vector, 14, "{t:x?}");
    assert_eq!(t.err, Some(err), "error code {t:x?}");
    assert_eq!(s.c.state().cr2, fault_addr as u64, "CR2");
    assert_eq!(t.eip, eip, "saved EIP");
}

#[test]
fn not_present_pte_read_at_cpl0() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, 0);
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| a.mov(ebx, 7u32)),
            Box::new(|a| {
                a.mov(ebx, dword_ptr(PAGE + 0x10))?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    pf(&mut s, 0, PAGE + 0x10, at[1]);
    assert_eq!(s.gpr(3), 7, "the faulting load wrote nothing");
}

#[test]
fn not_present_pde_write_at_cpl0() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    // PDE 2 (0x800000..) is not present.
    let code = kcode(|a| {
        a.mov(dword_ptr(0x80_0123), eax)?;
        a.hlt()
    });
    s.start_kernel(&code);
    pf(&mut s, 2, 0x80_0123, KCODE_AT as u32);
}

#[test]
fn not_present_write_at_cpl3() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, 0);
    let code = ucode(|a| {
        a.mov(dword_ptr(PAGE + 4), eax)?;
        a.hlt()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (14, Some(6)));
    assert_eq!(t.eip, UCODE_AT as u32);
    assert_eq!(t.cs, UCODE);
    assert_eq!(t.outer, Some((UDATA, USTACK)));
    assert_eq!(s.c.state().cr2, PAGE as u64 + 4);
}

#[test]
fn user_read_of_supervisor_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | W);
    let code = ucode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_user(&code);
    pf(&mut s, 5, PAGE, UCODE_AT as u32);
}

#[test]
fn user_fetch_from_supervisor_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(UCODE_AT as u32, UCODE_AT as u32 | P | W);
    let code = ucode(|a| a.hlt());
    s.start_user(&code);
    pf(&mut s, 5, UCODE_AT as u32, UCODE_AT as u32);
}

#[test]
fn user_write_to_read_only_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | U);
    let code = ucode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(PAGE), eax)?;
        a.hlt()
    });
    s.start_user(&code);
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (14, Some(7)));
    assert_eq!(t.eip, UCODE_AT as u32 + 5);
}

#[test]
fn read_only_pde_restricts_writable_pte() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pde(0, PT as u32 | P | U);
    let code = ucode(|a| {
        a.mov(dword_ptr(PAGE), eax)?;
        a.hlt()
    });
    s.start_user(&code);
    pf(&mut s, 7, PAGE, UCODE_AT as u32);
}

#[test]
fn supervisor_pde_restricts_user_pte() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pde(0, PT as u32 | P | W);
    let code = ucode(|a| a.hlt());
    s.start_user(&code);
    pf(&mut s, 5, UCODE_AT as u32, UCODE_AT as u32);
}

#[test]
fn cpl0_write_to_read_only_page_without_wp_succeeds() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | U);
    let code = kcode(|a| {
        a.mov(dword_ptr(PAGE), 0x1234_5678u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.rd32(PAGE as u64), 0x1234_5678);
    assert_ne!(s.get_pte(PAGE) & D, 0, "dirty set");
}

#[test]
fn cpl0_write_to_read_only_page_with_wp_faults() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr0 |= cr::CR0_WP;
    s.set_pte(PAGE, PAGE | P);
    let code = kcode(|a| {
        a.mov(dword_ptr(PAGE), 0x1234_5678u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    pf(&mut s, 3, PAGE, KCODE_AT as u32);
    assert_eq!(s.rd32(PAGE as u64), 0);
}

#[test]
fn setting_wp_takes_effect_on_cached_translation() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | D | A);
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                a.mov(dword_ptr(PAGE), 1u32)?; // allowed (WP = 0), cached
                a.mov(eax, cr0)?;
                a.or(eax, 1u32 << 16)?;
                a.mov(cr0, eax)
            }),
            Box::new(|a| {
                a.mov(dword_ptr(PAGE), 2u32)?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    pf(&mut s, 3, PAGE, at[1]);
    assert_eq!(s.rd32(PAGE as u64), 1);
}

#[test]
fn big_pages_with_pse() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr4 |= cr::CR4_PSE;
    // 0x400000..0x800000 -> physical 0..4 MiB with one 4 MiB page.
    s.set_pde(0x40_0000, P | W | PS);
    s.ram().write_u32(0x30010, 0xfeed_beef).unwrap();
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(0x43_0010))?;
        a.mov(dword_ptr(0x43_0020), 0x55u32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(0), 0xfeed_beef);
    assert_eq!(s.rd32(0x30020), 0x55);
    assert_eq!(s.get_pde(0x40_0000), P | W | PS | A | D);
}

#[test]
fn big_page_user_bit_checked() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr4 |= cr::CR4_PSE;
    s.set_pde(0x40_0000, P | W | PS);
    let code = ucode(|a| {
        a.mov(eax, dword_ptr(0x43_0010))?;
        a.hlt()
    });
    s.start_user(&code);
    pf(&mut s, 5, 0x43_0010, UCODE_AT as u32);
}

#[test]
fn accessed_and_dirty_bits() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | W);
    s.set_pte(PAGE + 0x1000, (PAGE + 0x1000) | P | W);
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(PAGE + 0x1000), eax)?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.get_pte(PAGE), PAGE | P | W | A, "read sets A only");
    assert_eq!(
        s.get_pte(PAGE + 0x1000),
        (PAGE + 0x1000) | P | W | A | D,
        "write sets A and D"
    );
    assert_ne!(s.get_pde(0) & A, 0, "PDE accessed");
    assert_eq!(s.get_pde(0) & D, 0, "PDE has no dirty bit for 4 KiB tables");
}

#[test]
fn first_write_after_read_sets_dirty() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | W);
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?; // TLB filled, D clear
        a.mov(dword_ptr(PAGE), 9u32)?; // must set D
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.get_pte(PAGE), PAGE | P | W | A | D);
}

#[test]
fn page_crossing_access_faults_on_second_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE + 0x1000, 0);
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE + 0xffe))?;
        a.hlt()
    });
    s.start_kernel(&code);
    pf(&mut s, 0, PAGE + 0x1000, KCODE_AT as u32);
}

#[test]
fn page_crossing_write_changes_nothing_when_it_faults() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE + 0x1000, (PAGE + 0x1000) | P);
    s.cr0 |= cr::CR0_WP;
    let code = kcode(|a| {
        a.mov(dword_ptr(PAGE + 0xffe), 0xffff_ffffu32)?;
        a.hlt()
    });
    s.start_kernel(&code);
    pf(&mut s, 3, PAGE + 0x1000, KCODE_AT as u32);
    assert_eq!(s.ram().read_u16(PAGE as u64 + 0xffe).unwrap(), 0);
}

#[test]
fn fetch_from_not_present_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(0x12000, 0);
    let code = kcode(|a| {
        a.mov(eax, 0x12000u32)?;
        a.jmp(eax)
    });
    s.start_kernel(&code);
    pf(&mut s, 0, 0x12000, 0x12000);
}

#[test]
fn instruction_spanning_into_not_present_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(0x12000, 0);
    // A 5-byte MOV starting 2 bytes before the missing page.
    let at = 0x11ffe_u32;
    let code = asm(32, at as u64, |a| a.mov(eax, 0x1234_5678u32));
    s.ram().write(at as u64, &code).unwrap();
    let jump = kcode(|a| {
        a.mov(eax, at)?;
        a.jmp(eax)
    });
    s.start_kernel(&jump);
    pf(&mut s, 0, 0x12000, at);
}

#[test]
fn stale_translation_until_invlpg() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.ram().write_u32(PAGE as u64, 0x1111).unwrap();
    s.ram().write_u32(PAGE as u64 + 0x1000, 0x2222).unwrap();
    let pte = s.pte(PAGE) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(pte), (PAGE + 0x1000) | P | W)?;
        a.mov(ebx, dword_ptr(PAGE))?; // stale: still the old page
        a.invlpg(dword_ptr(PAGE))?;
        a.mov(ecx, dword_ptr(PAGE))?; // new page
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!((s.gpr(0), s.gpr(3), s.gpr(1)), (0x1111, 0x1111, 0x2222));
}

/// The data TLB is two-way: a page and another 4 MiB away (the same
/// index) stay cached together, a third one evicts the older of them
/// (seen through a stale translation, as in `stale_translation_until_invlpg`).
#[test]
fn data_tlb_keeps_two_pages_of_one_index() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    // 4–12 MiB alias 0–4 MiB through the same page table.
    let pde = (s.pte(0) & !0xfff) as u32 | P | W | U;
    s.set_pde(0x40_0000, pde);
    s.set_pde(0x80_0000, pde);
    s.ram().write_u32(PAGE as u64, 0x1111).unwrap();
    s.ram().write_u32(PAGE as u64 + 0x1000, 0x2222).unwrap();
    let pte = s.pte(PAGE) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(ebx, dword_ptr(PAGE + 0x40_0000))?; // same index: both cached
        a.mov(dword_ptr(pte), (PAGE + 0x1000) | P | W)?;
        a.mov(ecx, dword_ptr(PAGE))?; // stale: still cached
        a.mov(edx, dword_ptr(PAGE + 0x80_0000))?; // a third: PAGE evicted
        a.mov(esi, dword_ptr(PAGE))?; // walked again: the new page
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(
        (s.gpr(0), s.gpr(3), s.gpr(1), s.gpr(6)),
        (0x1111, 0x1111, 0x1111, 0x2222)
    );
}

#[test]
fn stale_translation_until_cr3_reload() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.ram().write_u32(PAGE as u64, 0x1111).unwrap();
    s.ram().write_u32(PAGE as u64 + 0x1000, 0x2222).unwrap();
    let pte = s.pte(PAGE) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(pte), (PAGE + 0x1000) | P | W)?;
        a.mov(ebx, dword_ptr(PAGE))?;
        a.mov(edx, cr3)?;
        a.mov(cr3, edx)?;
        a.mov(ecx, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!((s.gpr(0), s.gpr(3), s.gpr(1)), (0x1111, 0x1111, 0x2222));
}

#[test]
fn stale_not_present_is_not_cached() {
    // A not-present entry is never cached: making it present needs no flush.
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, 0);
    let pte = s.pte(PAGE) as u32;
    s.ram().write_u32(PAGE as u64, 0x77).unwrap();
    // Handler for #PF: map the page and return (retry the instruction).
    let handler = asm(32, 0x18000, |a| {
        a.mov(dword_ptr(pte), PAGE | P | W)?;
        a.add(esp, 4u32)?;
        a.iretd()
    });
    s.ram().write(0x18000, &handler).unwrap();
    s.idt(14, gate(INT_GATE, KCODE, 0x18000, 0, 0));
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0), 0x77);
}

#[test]
fn global_page_survives_cr3_load_but_not_cr4_write() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr4 |= cr::CR4_PGE;
    s.set_pte(PAGE, PAGE | P | W | G);
    s.ram().write_u32(PAGE as u64, 0x1111).unwrap();
    s.ram().write_u32(PAGE as u64 + 0x1000, 0x2222).unwrap();
    let pte = s.pte(PAGE) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(pte), (PAGE + 0x1000) | P | W | G)?;
        a.mov(edx, cr3)?;
        a.mov(cr3, edx)?;
        a.mov(ebx, dword_ptr(PAGE))?; // global: survives the CR3 load
        a.mov(edx, cr4)?;
        a.mov(cr4, edx)?; // any CR4 write flushes (PGE written)
        a.mov(ecx, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!((s.gpr(0), s.gpr(3), s.gpr(1)), (0x1111, 0x1111, 0x2222));
}

#[test]
fn g_bit_ignored_without_pge() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | W | G);
    s.ram().write_u32(PAGE as u64, 0x1111).unwrap();
    s.ram().write_u32(PAGE as u64 + 0x1000, 0x2222).unwrap();
    let pte = s.pte(PAGE) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(pte), (PAGE + 0x1000) | P | W | G)?;
        a.mov(edx, cr3)?;
        a.mov(cr3, edx)?;
        a.mov(ebx, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!((s.gpr(0), s.gpr(3)), (0x1111, 0x2222));
}

#[test]
fn invlpg_flushes_a_global_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr4 |= cr::CR4_PGE;
    s.set_pte(PAGE, PAGE | P | W | G);
    s.ram().write_u32(PAGE as u64, 0x1111).unwrap();
    s.ram().write_u32(PAGE as u64 + 0x1000, 0x2222).unwrap();
    let pte = s.pte(PAGE) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.mov(dword_ptr(pte), (PAGE + 0x1000) | P | W | G)?;
        a.invlpg(dword_ptr(PAGE))?;
        a.mov(ebx, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!((s.gpr(0), s.gpr(3)), (0x1111, 0x2222));
}

#[test]
fn cpl3_access_uses_user_permissions_after_cpl0_cached_it() {
    // A supervisor-only page touched at CPL 0 must still fault at CPL 3.
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.set_pte(PAGE, PAGE | P | W);
    // Kernel touches the page, then IRETs to user code that reads it.
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.push(UDATA as u32)?;
        a.push(USTACK)?;
        a.push(0x202u32)?;
        a.push(UCODE as u32)?;
        a.push(UCODE_AT as u32)?;
        a.iretd()
    });
    // (DS was nulled by the IRET to ring 3: use SS.)
    let user = ucode(|a| {
        a.mov(eax, dword_ptr(PAGE).ss())?;
        a.hlt()
    });
    s.ram().write(UCODE_AT, &user).unwrap();
    s.start_kernel(&code);
    pf(&mut s, 5, PAGE, UCODE_AT as u32);
}

#[test]
fn paging_off_ignores_page_tables() {
    let mut s = Sys::new();
    s.paging(0); // every PTE not present, but CR0.PG off below
    s.cr0 &= !cr::CR0_PG;
    s.ram().write_u32(PAGE as u64, 0x99).unwrap();
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(PAGE))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0), 0x99);
}

#[test]
fn reserved_bits_in_a_4mib_pde_are_rsvd_page_faults() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr4 |= cr::CR4_PSE;
    // Bit 13 set: reserved without PSE-36.
    s.set_pde(0x40_0000, P | W | PS | 1 << 13);
    let code = kcode(|a| {
        a.mov(dword_ptr(0x43_0010), eax)?;
        a.hlt()
    });
    s.start_kernel(&code);
    pf(&mut s, 0x8 | 2 | 1, 0x43_0010, KCODE_AT as u32);
}

#[test]
fn ps_bit_is_ignored_without_cr4_pse() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    // PDE 1 with PS but CR4.PSE = 0: it points to a page table (the
    // identity table at PT), so 0x400000 + x maps like x.
    s.set_pde(0x40_0000, PT as u32 | P | W | PS);
    s.ram().write_u32(0x30010, 0x1357).unwrap();
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(0x43_0010))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.stub_vector(), None);
    assert_eq!(s.gpr(0), 0x1357);
}

#[test]
fn invlpg_flushes_the_whole_4mib_page() {
    let mut s = Sys::new();
    s.paging(P | W | U);
    s.cr4 |= cr::CR4_PSE;
    // 0x400000..0x800000 -> physical 0..4 MiB, then remapped to 4..8 MiB
    // (beyond RAM: MMIO reads give all-ones).
    s.set_pde(0x40_0000, P | W | PS);
    s.ram().write_u32(0x1000, 0x1111).unwrap();
    let pde = (PD + 4) as u32;
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(0x40_0000))?;
        a.mov(eax, dword_ptr(0x40_1000))?; // cache a second 4 KiB piece
        a.mov(dword_ptr(pde), 0x40_0000 | P | W | PS)?;
        a.invlpg(dword_ptr(0x40_0000))?; // one INVLPG for the 4 MiB page
        a.mov(ebx, dword_ptr(0x40_1000))?;
        a.hlt()
    });
    s.start_kernel(&code);
    assert_eq!(s.run(), RunExit::Halted);
    assert_eq!(s.gpr(0), 0x1111);
    assert_eq!(
        s.gpr(3),
        0xffff_ffff,
        "the whole large page was invalidated"
    );
}

/// Loads CR3 with `cr3`, then turns on CR4.PAE and CR0.PG.
fn enable_pae(a: &mut CodeAssembler, cr3_value: u32) -> Result<(), IcedError> {
    a.mov(eax, cr3_value)?;
    a.mov(cr3, eax)?;
    a.mov(eax, cr4)?;
    a.or(eax, cr::CR4_PAE as u32)?;
    a.mov(cr4, eax)?;
    a.mov(eax, cr0)?;
    a.or(eax, cr::CR0_PG as u32)?;
    a.mov(cr0, eax)
}

/// PAE paging (SDM vol. 3 §4.4): a PDPT of four 8-byte entries, 4 KiB
/// pages through a page table and 2 MiB pages in the page directory,
/// accessed and dirty bits in 8-byte entries, #PF for a missing PDPTE and
/// a missing PDE, CR3 holding the 32-byte-aligned PDPT.
#[test]
fn pae_paging_with_4_kib_and_2_mib_pages() {
    const PDPT: u64 = 0x10_0020;
    const PD0: u64 = 0x10_1000;
    const PT0: u64 = 0x10_2000;
    let mut s = Sys::new();
    let ram = s.ram();
    let p = u64::from(P);
    let w = u64::from(W);
    // PDPTE 0 → PD0; PDPTEs 1–3 not present.
    ram.write_u64(PDPT, PD0 | p).unwrap();
    // PDE 0 → PT0 (identity 0–2 MiB); PDE 3 (6–8 MiB): the 2 MiB page at
    // physical 2 MiB.
    ram.write_u64(PD0, PT0 | p | w).unwrap();
    ram.write_u64(PD0 + 24, 0x20_0000 | 0x80 | p | w).unwrap();
    for i in 0..512u64 {
        ram.write_u64(PT0 + 8 * i, (i << 12) | p | w).unwrap();
    }
    ram.write_u32(0x20_0010, 0xdead_beef).unwrap();
    let (code, at) = frags(
        32,
        KCODE_AT,
        vec![
            Box::new(|a| {
                enable_pae(a, PDPT as u32 | 0x18)?;
                // Through the 2 MiB page: read, then write.
                a.mov(ebx, dword_ptr(0x60_0010))?;
                a.mov(dword_ptr(0x60_0020), 0x1234_5678u32)?;
                a.mov(esi, cr3)
            }),
            // PDE 2 (4–6 MiB) is not present.
            Box::new(|a| {
                a.mov(ecx, dword_ptr(0x40_0000))?;
                a.hlt()
            }),
        ],
    );
    s.start_kernel(&code);
    pf(&mut s, 0, 0x40_0000, at[1]);
    assert_eq!(s.gpr(3), 0xdead_beef, "read through the 2 MiB page");
    assert_eq!(s.rd32(0x20_0020), 0x1234_5678, "written through it");
    assert_eq!(s.gpr(6), PDPT as u32 | 0x18, "CR3: the PDPT, PWT, PCD");
    let pde3 = s.ram().read_u64(PD0 + 24).unwrap();
    assert_eq!(pde3 & 0x60, 0x60, "A and D set in the 8-byte PDE");
    let pte_code = s.ram().read_u64(PT0 + 8 * (KCODE_AT >> 12)).unwrap();
    assert_eq!(pte_code & 0x60, 0x20, "the code page accessed, not dirty");
    // A missing PDPTE: #PF too.
    let code = kcode(|a| {
        a.mov(eax, dword_ptr(0x4000_0000))?;
        a.hlt()
    });
    s.ram().write(KCODE_AT, &code).unwrap();
    let st = s.c.state_mut();
    st.rip = KCODE_AT;
    st.halted = false;
    pf(&mut s, 0, 0x4000_0000, KCODE_AT as u32);
    assert_eq!(s.c.state().cr4 & cr::CR4_PAE, cr::CR4_PAE);
}

/// Execute-disable (SDM vol. 3 §4.6): with EFER.NXE (CPUID 0x8000_0001
/// EDX[20]), a fetch from a PAE page whose entry has XD raises #PF with the
/// I/D bit; data reads of it are allowed. Without NXE the XD bit is
/// reserved (#PF with RSVD). EFER has no other writable bit here (no long
/// mode, no SYSCALL): setting LME is #GP(0).
#[test]
fn pae_execute_disable_and_efer() {
    const PDPT: u64 = 0x10_0000;
    const PD0: u64 = 0x10_1000;
    const PT0: u64 = 0x10_2000;
    const XD: u64 = 1 << 63;
    const NX_PAGE: u32 = 0x5_0000;
    for nxe in [true, false] {
        let mut s = Sys::new();
        let ram = s.ram();
        ram.write_u64(PDPT, PD0 | 1).unwrap();
        ram.write_u64(PD0, PT0 | 3).unwrap();
        for i in 0..512u64 {
            ram.write_u64(PT0 + 8 * i, (i << 12) | 3).unwrap();
        }
        ram.write_u64(
            PT0 + 8 * u64::from(NX_PAGE >> 12),
            u64::from(NX_PAGE) | 3 | XD,
        )
        .unwrap();
        // A RET at the start of the XD page, and a word to read there.
        ram.write(u64::from(NX_PAGE), &[0xc3, 0x90, 0x90, 0x90])
            .unwrap();
        let (code, at) = frags(
            32,
            KCODE_AT,
            vec![
                Box::new(move |a| {
                    a.mov(ecx, 0xc000_0080u32)?;
                    a.mov(eax, if nxe { 1u32 << 11 } else { 0 })?;
                    a.xor(edx, edx)?;
                    a.wrmsr()?;
                    enable_pae(a, PDPT as u32)
                }),
                Box::new(|a| a.mov(ebx, dword_ptr(NX_PAGE))),
                Box::new(|a| {
                    a.mov(eax, NX_PAGE)?;
                    a.call(eax)?;
                    a.hlt()
                }),
            ],
        );
        s.start_kernel(&code);
        if nxe {
            // The read went through; the fetch faults: P | I/D.
            pf(&mut s, 0x11, NX_PAGE, NX_PAGE);
            assert_eq!(s.gpr(3), 0x9090_90c3);
        } else {
            // XD is a reserved bit without NXE: the read faults, P | RSVD.
            pf(&mut s, 0x09, NX_PAGE, at[1]);
        }
    }
    // Setting EFER.LME: #GP(0).
    let mut s = Sys::new();
    s.start_kernel(&kcode(|a| {
        a.mov(ecx, 0xc000_0080u32)?;
        a.mov(eax, 1u32 << 8)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.hlt()
    }));
    let t = s.run_trap();
    assert_eq!((t.vector, t.err), (13, Some(0)));
}
