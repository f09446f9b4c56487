//! Tiny test guests, assembled at run time with iced-x86's `CodeAssembler`:
//! the capability probe boots them, and the tests use them too.
//!
//! Each guest is a few pieces of guest-physical memory (code, a GDT, page
//! tables) plus the vCPU state to start it with. Memory layout:
//!
//! ```text
//! 0x0500  GDT: null, 0x08 code32, 0x10 data, 0x18 code64 (all DPL 0, flat)
//! 0x7000  top of the stack
//! 0x8000  code (32-bit or 16-bit prologue)   0x9000  64-bit code (after a mode switch)
//! 0x10000 PML4 → 0x11000 PDPT → 0x12000 PD: identity, 2 MiB pages, first 1 GiB
//! 0x13000 32-bit page directory: identity, 4 MiB pages, first 1 GiB
//! 0x14000 PAE PDPT → 0x12000
//! ```

use iced_x86::code_asm::{CodeAssembler, IcedError};
use iced_x86::code_asm::{al, eax, ecx, edx, esp, rsp};
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
    ] {
        g.extend_from_slice(&d.to_le_bytes());
    }
    g
}

fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let le = |v: &[u64]| v.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>();
    let pd: Vec<u64> = (0..512u64).map(|i| (i << 21) | 0x83).collect();
    let pd32: Vec<u32> = (0..256u32).map(|i| (i << 22) | 0x83).collect();
    vec![
        (PML4, le(&[0x11000 | 3])),
        (0x11000, le(&[0x12000 | 3])),
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
        limit: 31,
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
    let code = assemble(32, CODE, &|a| {
        a.mov(eax, PD32 as u32)?;
        a.mov(iced_x86::code_asm::cr3, eax)?;
        a.mov(eax, iced_x86::code_asm::cr4)?;
        a.or(eax, cr::CR4_PSE as u32)?;
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

/// A 32-bit guest that first turns on PAE paging (2 MiB pages, identity).
pub fn pae32(body: Body<'_>) -> TestGuest {
    let code = assemble(32, CODE, &|a| {
        a.mov(eax, PDPT_PAE as u32)?;
        a.mov(iced_x86::code_asm::cr3, eax)?;
        a.mov(eax, iced_x86::code_asm::cr4)?;
        a.or(eax, cr::CR4_PAE as u32)?;
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
