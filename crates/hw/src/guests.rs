//! Tiny test guests, assembled at run time with iced-x86's `CodeAssembler`:
//! the capability probe boots them, and the tests use them too.
//!
//! Each guest is a few pieces of guest-physical memory (code, a GDT, page
//! tables) plus the vCPU state to start it with. Memory layout:
//!
//! ```text
//! 0x0500  GDT: null, 0x08 code32, 0x10 data, 0x18 code64, 0x20 data (DPL 0),
//!         0x28 data, 0x30 code64 (DPL 3), 0x38 64-bit TSS
//! 0x0600  TSS                    0x3000 IDT (user-mode guests)
//! 0x7000  top of the stack
//! 0x8000  code (32-bit or 16-bit prologue)   0x9000  64-bit code (after a mode switch)
//! 0x10000 PML4 → 0x11000 PDPT → 0x12000 PD: identity, 2 MiB pages, first 1 GiB
//! 0x13000 32-bit page directory: identity, 4 MiB pages, first 1 GiB
//! 0x14000 PAE PDPT → 0x12000
//! ```

use iced_x86::code_asm::{al, ax, eax, ecx, edx, esp, ptr, qword_ptr, rax, rdi, rsp};
use iced_x86::code_asm::{CodeAssembler, IcedError};
use popek_cpu::state::{attr, cr, seg, Segment, TableReg};
use popek_cpu::CpuState;
use popek_memory::{GuestRam, MemoryError};

/// Where guest code starts.
pub const CODE: u64 = 0x8000;
/// Where 64-bit code starts after a switch from 32-bit code.
pub const CODE64: u64 = 0x9000;
/// Top of the stack.
pub const STACK: u64 = 0x7000;
/// The GDT.
pub const GDT: u64 = 0x500;
/// Long-mode PML4.
pub const PML4: u64 = 0x10000;
/// 32-bit page directory.
pub const PD32: u64 = 0x13000;
/// PAE page-directory-pointer table.
pub const PDPT_PAE: u64 = 0x14000;
/// The 64-bit TSS (RSP0 at +4).
pub const TSS: u64 = 0x600;
/// The IDT [`user_mode`] guests use (256 16-byte gates).
pub const IDT: u64 = 0x3000;
/// User-mode selectors for 64-bit code and data (RPL 3).
pub const USER_CS: u16 = 0x33;
/// User data selector.
pub const USER_DS: u16 = 0x2b;
/// Smallest RAM the guests need.
pub const MIN_RAM: u64 = 2 << 20;

/// Flat 32-bit code selector.
pub const CS32: u16 = 0x08;
/// Flat data selector.
pub const DS: u16 = 0x10;
/// 64-bit code selector.
pub const CS64: u16 = 0x18;

/// A guest: memory contents and the entry state.
#[derive(Clone, Debug)]
pub struct TestGuest {
    /// `(guest-physical address, bytes)` to load.
    pub memory: Vec<(u64, Vec<u8>)>,
    /// The vCPU state to start it with.
    pub state: CpuState,
}

impl TestGuest {
    /// Writes the guest into RAM.
    pub fn load(&self, ram: &GuestRam) -> Result<(), MemoryError> {
        for (addr, bytes) in &self.memory {
            ram.write(*addr, bytes)?;
        }
        Ok(())
    }
}

/// The body of a guest: instructions appended to the assembler.
pub type Body<'a> = &'a dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>;

fn assemble(bitness: u32, ip: u64, body: Body<'_>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("valid bitness");
    body(&mut a).expect("test guest assembles");
    a.assemble(ip).expect("test guest assembles")
}

fn gdt() -> Vec<u8> {
    let mut g = Vec::new();
    for d in [
        0u64,
        0x00cf_9b00_0000_ffff, // 0x08: code32, DPL0, 4 GiB
        0x00cf_9300_0000_ffff, // 0x10: data, DPL0, 4 GiB
        0x00af_9b00_0000_ffff, // 0x18: code64, DPL0
        0x00cf_9300_0000_ffff, // 0x20: data, DPL0 (SYSCALL's SS)
        0x00cf_f300_0000_ffff, // 0x28: data, DPL3 (SYSRET's SS)
        0x00af_fb00_0000_ffff, // 0x30: code64, DPL3 (SYSRET's CS)
        // 0x38: 64-bit TSS (available) at TSS, 104 bytes
        0x0000_8900_0000_0067 | ((TSS & 0xffff) << 16) | (((TSS >> 16) & 0xff) << 32),
        0,
    ] {
        g.extend_from_slice(&d.to_le_bytes());
    }
    g
}

fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let le = |v: &[u64]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x87).collect();
    let pd32: Vec<u32> = (0..256u32).map(|i| (i << 22) | 0x87).collect();
    vec![
        (PML4, le(&[0x11000 | 7])),
        (0x11000, le(&[0x12000 | 7])),
        (0x12000, le(&pd)),
        (PD32, pd32.iter().flat_map(|e| e.to_le_bytes()).collect()),
        (PDPT_PAE, le(&[0x12000 | 1, 0, 0, 0])),
    ]
}

/// A real-mode guest at 0000:8000, stack at 0000:7000.
pub fn real_mode(body: Body<'_>) -> TestGuest {
    let mut s = CpuState::reset();
    s.seg = [Segment::real(0); 6];
    s.seg[seg::CS].attr |= attr::CODE;
    s.cr0 = cr::CR0_ET;
    s.rip = CODE;
    s.gpr[4] = STACK;
    TestGuest {
        memory: vec![(CODE, assemble(16, CODE, body))],
        state: s,
    }
}

fn protected_state() -> CpuState {
    let mut s = CpuState::flat_protected(CS32, DS);
    s.gdtr = TableReg {
        base: GDT,
        limit: 0x47,
    };
    s.rip = CODE;
    s.gpr[4] = STACK;
    s
}

/// An unpaged 32-bit protected-mode guest (flat segments, no IDT).
pub fn protected32(body: Body<'_>) -> TestGuest {
    TestGuest {
        memory: vec![(GDT, gdt()), (CODE, assemble(32, CODE, body))],
        state: protected_state(),
    }
}

/// A 32-bit guest that first turns on 32-bit paging (4 MiB pages,
/// identity) itself, then runs `body`.
pub fn paged32(body: Body<'_>) -> TestGuest {
    paging_on(PD32, cr::CR4_PSE, body)
}

/// A 32-bit guest that first turns on PAE paging (2 MiB pages, identity).
pub fn pae32(body: Body<'_>) -> TestGuest {
    paging_on(PDPT_PAE, cr::CR4_PAE, body)
}

/// A 32-bit guest that loads CR3 with `cr3`, sets `cr4_bit`, turns paging
/// on, then runs `body` (the tables are [`page_tables`]).
fn paging_on(cr3: u64, cr4_bit: u64, body: Body<'_>) -> TestGuest {
    let code = assemble(32, CODE, &|a| {
        a.mov(eax, cr3 as u32)?;
        a.mov(iced_x86::code_asm::cr3, eax)?;
        a.mov(eax, iced_x86::code_asm::cr4)?;
        a.or(eax, cr4_bit as u32 as i32)?;
        a.mov(iced_x86::code_asm::cr4, eax)?;
        a.mov(eax, iced_x86::code_asm::cr0)?;
        a.or(eax, cr::CR0_PG as u32 as i32)?;
        a.mov(iced_x86::code_asm::cr0, eax)?;
        body(a)
    });
    let mut memory = vec![(GDT, gdt()), (CODE, code)];
    memory.extend(page_tables());
    TestGuest {
        memory,
        state: protected_state(),
    }
}

/// The state of a vCPU already in 64-bit mode on the identity page tables.
pub fn long_state() -> CpuState {
    let mut s = protected_state();
    s.seg[seg::CS] = Segment {
        selector: CS64,
        attr: attr::CODE | attr::RW | attr::ACCESSED | attr::S | attr::P | attr::L | attr::G,
        limit: 0xffff_ffff,
        base: 0,
    };
    s.cr0 |= cr::CR0_PG | cr::CR0_NE | cr::CR0_MP;
    s.cr4 |= cr::CR4_PAE | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT;
    s.cr3 = PML4;
    s.efer = 0x500; // LME | LMA
    s
}

/// A guest entered directly in 64-bit long mode (as the Linux 64-bit boot
/// protocol enters a kernel).
pub fn long64(body: Body<'_>) -> TestGuest {
    let mut memory = vec![(GDT, gdt()), (CODE, assemble(64, CODE, body))];
    memory.extend(page_tables());
    let mut s = long_state();
    s.rip = CODE;
    s.gpr[4] = STACK;
    TestGuest { memory, state: s }
}

/// A guest that starts in unpaged 32-bit protected mode and switches to
/// long mode itself (CR4.PAE, CR3, EFER.LME, CR0.PG, far jump), as
/// Multiboot kernels such as minios64 do; then runs `body` in 64-bit mode.
pub fn long_from32(body: Body<'_>) -> TestGuest {
    let mut code = assemble(32, CODE, &|a| {
        a.mov(eax, iced_x86::code_asm::cr4)?;
        a.or(eax, cr::CR4_PAE as u32)?;
        a.mov(iced_x86::code_asm::cr4, eax)?;
        a.mov(eax, PML4 as u32)?;
        a.mov(iced_x86::code_asm::cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        a.mov(eax, iced_x86::code_asm::cr0)?;
        a.or(eax, cr::CR0_PG as u32 as i32)?;
        a.mov(iced_x86::code_asm::cr0, eax)?;
        a.mov(edx, 0)?;
        a.mov(esp, STACK as u32)?;
        Ok(())
    });
    // jmp far CS64:CODE64
    code.push(0xea);
    code.extend_from_slice(&(CODE64 as u32).to_le_bytes());
    code.extend_from_slice(&CS64.to_le_bytes());
    let code64 = assemble(64, CODE64, &|a| {
        a.mov(rsp, STACK)?;
        body(a)
    });
    let mut memory = vec![(GDT, gdt()), (CODE, code), (CODE64, code64)];
    memory.extend(page_tables());
    TestGuest {
        memory,
        state: protected_state(),
    }
}

/// A long-mode guest that drops to user mode (CPL 3, IRETQ) and runs
/// `user` there. Its IDT sends every exception and `INT n` (gates DPL 3) to
/// a handler that ends the guest with debug-exit value = the vector;
/// SYSCALL (EFER.SCE set, LSTAR) ends it with 0x5c at CPL 0 (0x5d if the
/// CPU reached LSTAR but stayed at CPL 3). The kernel stack for
/// events from user mode is TSS.RSP0 = 0x6800.
pub fn user_mode(user: Body<'_>) -> TestGuest {
    const HANDLERS: u64 = 0xa000;
    const USER_CODE: u64 = 0xc000;
    let mut g = long64(&|a| {
        a.mov(ax, 0x38u32)?;
        a.ltr(ax)?;
        a.mov(rax, 0x1ff0u64)?;
        a.lidt(ptr(rax))?;
        // STAR: kernel CS 0x18 (SS 0x20), user base 0x23 (SS 0x2b, CS 0x33)
        a.mov(ecx, 0xc000_0081u32)?;
        a.mov(eax, 0u32)?;
        a.mov(edx, 0x0023_0018u32)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0082u32)?;
        a.mov(eax, (HANDLERS + 256 * 16) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.push(i32::from(USER_DS))?;
        a.push(0x5000i32)?;
        a.push(2i32)?;
        a.push(i32::from(USER_CS))?;
        a.push(USER_CODE as i32)?;
        a.iretq()
    });
    g.state.efer |= 1; // SCE
                       // Handler i: mov al, i; out 0xf4, al; hlt (16 bytes each); then SYSCALL's.
    let mut handlers = Vec::new();
    for v in 0..=256u32 {
        let code = assemble(64, HANDLERS + u64::from(v) * 16, &|a| {
            if v < 256 {
                return debug_exit(a, v as u8);
            }
            // SYSCALL's handler: 0x5c at CPL 0 as the architecture says; 0x5d
            // if the CPU jumped to LSTAR but stayed at CPL 3 (kvm_pvm does).
            let mut at_cpl3 = a.create_label();
            a.mov(eax, iced_x86::code_asm::cs)?;
            a.test(al, 3)?;
            a.jnz(at_cpl3)?;
            debug_exit(a, 0x5c)?;
            a.set_label(&mut at_cpl3)?;
            debug_exit(a, 0x5d)
        });
        let mut slot = code;
        slot.resize(16, 0x90);
        handlers.extend(slot);
    }
    let mut idt = Vec::new();
    for v in 0..256u64 {
        let off = HANDLERS + v * 16;
        let mut gate = [0u8; 16];
        gate[0..2].copy_from_slice(&(off as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&CS64.to_le_bytes());
        gate[5] = 0xee; // present, DPL 3, 64-bit interrupt gate
        gate[6..8].copy_from_slice(&((off >> 16) as u16).to_le_bytes());
        idt.extend_from_slice(&gate);
    }
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT.to_le_bytes());
    let mut tss = [0u8; 104];
    tss[4..12].copy_from_slice(&0x6800u64.to_le_bytes());
    g.memory.push((HANDLERS, handlers));
    g.memory.push((IDT, idt));
    g.memory.push((0x1ff0, idtr.to_vec()));
    g.memory.push((TSS, tss.to_vec()));
    g.memory.push((USER_CODE, assemble(64, USER_CODE, user)));
    g
}

/// A long-mode guest whose PIT ticks at 1 kHz (IRQ 0 → vector 0x20, a
/// handler counting ticks at [0x3000]); it halts until `ticks` ticks came,
/// with `before`/`after` run around the wait, then exits with 0x70.
pub fn ticking(ticks: i32, before: Body<'_>, after: Body<'_>) -> TestGuest {
    let handler = {
        let mut a = CodeAssembler::new(64).expect("test guest assembles");
        a.push(rax).expect("test guest assembles");
        a.push(rdi).expect("test guest assembles");
        a.mov(rdi, 0x3000u64).expect("test guest assembles");
        a.inc(qword_ptr(rdi)).expect("test guest assembles");
        a.mov(al, 0x20u32).expect("test guest assembles");
        a.out(0x20, al).expect("test guest assembles");
        a.pop(rdi).expect("test guest assembles");
        a.pop(rax).expect("test guest assembles");
        a.iretq().expect("test guest assembles");
        a.assemble(0xa000).expect("test guest assembles")
    };
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&0xa000u16.to_le_bytes());
    gate[2..4].copy_from_slice(&CS64.to_le_bytes());
    gate[5] = 0x8e;
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(0x21u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&0x2000u64.to_le_bytes());
    let mut g = long64(&|a| {
        let outb = |a: &mut CodeAssembler, port: u32, v: u32| -> Result<(), IcedError> {
            a.mov(al, v)?;
            a.out(port, al)
        };
        for (p, v) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xfe),
            (0xa0, 0x11),
            (0xa1, 0x28),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0xa1, 0xff),
        ] {
            outb(a, p, v)?;
        }
        a.mov(rax, 0x1ff0u64)?;
        a.lidt(ptr(rax))?;
        before(a)?;
        for (p, v) in [(0x43, 0x34), (0x40, 1193 & 0xff), (0x40, 1193 >> 8)] {
            outb(a, p, v)?;
        }
        a.mov(rdi, 0x3000u64)?;
        a.sti()?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.hlt()?;
        a.cmp(qword_ptr(rdi), ticks)?;
        a.jb(top)?;
        a.cli()?;
        after(a)?;
        debug_exit(a, 0x70)
    });
    g.memory.push((0xa000, handler));
    g.memory.push((0x2000 + 0x20 * 16, gate.to_vec()));
    g.memory.push((0x1ff0, idtr.to_vec()));
    g
}

/// `mov al, v; out 0xf4, al`: end the guest through the debug-exit port.
pub fn debug_exit(a: &mut CodeAssembler, v: u8) -> Result<(), IcedError> {
    a.mov(al, v as u32)?;
    a.out(0xf4, al)?;
    a.hlt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_assemble_and_load() {
        let ram = GuestRam::new(MIN_RAM).unwrap();
        for g in [
            real_mode(&|a| debug_exit(a, 1)),
            protected32(&|a| debug_exit(a, 2)),
            paged32(&|a| debug_exit(a, 3)),
            pae32(&|a| debug_exit(a, 4)),
            long64(&|a| debug_exit(a, 5)),
            long_from32(&|a| debug_exit(a, 6)),
        ] {
            g.load(&ram).unwrap();
            assert!(g.memory.iter().any(|(a, b)| *a == CODE && !b.is_empty()));
        }
        // The real-mode guest is 16-bit code: mov al, 1 = b0 01.
        let g = real_mode(&|a| debug_exit(a, 1));
        assert_eq!(&g.memory[0].1[..4], &[0xb0, 0x01, 0xe6, 0xf4]);
    }
}
