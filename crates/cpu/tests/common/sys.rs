//! A small protected-mode "machine" for the directed system tests: GDT, IDT,
//! TSS, LDT and page tables built in guest RAM, a handler stub per vector
//! that HLTs, and a reader for the exception frame the CPU pushed.
//!
//! Memory map (4 MiB of RAM, identity):
//!
//! | range            | content                                        |
//! |------------------|------------------------------------------------|
//! | 0x1000           | GDT (128 entries)                              |
//! | 0x2000           | IDT (256 gates)                                |
//! | 0x3000           | TSS (0x68 bytes) + I/O bitmap 0x3068..0x5068   |
//! | 0x6000           | LDT                                            |
//! | 0x7000           | handler stubs, 16 bytes per vector: `hlt`      |
//! | 0x9000           | initial ring-0 ESP                             |
//! | 0xc000/0xd000/0xe000 | TSS ESP0 / ESP1 / ESP2                     |
//! | 0xf000           | user ESP                                       |
//! | 0x10000          | kernel code, 0x20000 user code, 0x30000 data   |
//! | 0x100000         | page directory, 0x101000 page table (0–4 MiB)  |
#![allow(dead_code)]

use popek_cpu::seg::Descriptor;
use popek_cpu::state::{cr, flags, seg as sr};
use popek_cpu::{Cpu, CpuState, RunExit, Segment, TableReg, Vendor};

use super::{cpu, TestBus};

pub const GDT: u64 = 0x1000;
pub const IDT: u64 = 0x2000;
pub const TSS: u64 = 0x3000;
pub const IOMAP: u64 = TSS + 0x68;
pub const LDT: u64 = 0x6000;
pub const STUBS: u64 = 0x7000;
pub const KSTACK: u32 = 0x9000;
pub const ESP0: u32 = 0xc000;
pub const ESP1: u32 = 0xd000;
pub const ESP2: u32 = 0xe000;
pub const USTACK: u32 = 0xf000;
pub const KCODE_AT: u64 = 0x10000;
pub const UCODE_AT: u64 = 0x20000;
pub const DATA: u64 = 0x30000;
pub const PD: u64 = 0x10_0000;
pub const PT: u64 = 0x10_1000;

pub const KCODE: u16 = 0x08;
pub const KDATA: u16 = 0x10;
pub const UCODE: u16 = 0x1b;
pub const UDATA: u16 = 0x23;
pub const TSS_SEL: u16 = 0x28;
pub const R1CODE: u16 = 0x31;
pub const R1DATA: u16 = 0x39;
pub const R2DATA: u16 = 0x42;
/// First GDT slot free for a test (selector 0x48).
pub const FREE: usize = 9;

/// Page-table entry bits.
pub const P: u32 = 1;
pub const W: u32 = 2;
pub const U: u32 = 4;
pub const A: u32 = 0x20;
pub const D: u32 = 0x40;
pub const PS: u32 = 0x80;
pub const G: u32 = 0x100;

/// A code/data/system descriptor. `access` = P | DPL | S | type;
/// `fl` = G (8) | D/B (4) | L (2) | AVL (1).
pub fn desc(base: u32, limit: u32, access: u8, fl: u8) -> u64 {
    (limit & 0xffff) as u64
        | ((base & 0xff_ffff) as u64) << 16
        | (access as u64) << 40
        | (((limit >> 16) & 0xf) as u64) << 48
        | ((fl & 0xf) as u64) << 52
        | ((base >> 24) as u64) << 56
}

/// Flat 4 GiB 32-bit execute/read code at `dpl`.
pub fn code32(dpl: u8) -> u64 {
    desc(0, 0xfffff, 0x9a | dpl << 5, 0xc)
}

/// Flat 4 GiB 32-bit read/write data at `dpl`.
pub fn data32(dpl: u8) -> u64 {
    desc(0, 0xfffff, 0x92 | dpl << 5, 0xc)
}

/// A 32-bit available TSS.
pub fn tss32(base: u32, limit: u32) -> u64 {
    desc(base, limit, 0x89, 0)
}

/// Gate types.
pub const TASK_GATE: u8 = 5;
pub const CALL_GATE16: u8 = 4;
pub const CALL_GATE: u8 = 0xc;
pub const INT_GATE: u8 = 0xe;
pub const TRAP_GATE: u8 = 0xf;

/// A gate descriptor (present).
pub fn gate(ty: u8, sel: u16, off: u32, dpl: u8, params: u8) -> u64 {
    let lo = (off & 0xffff) | (sel as u32) << 16;
    let hi = (off & 0xffff_0000)
        | 0x8000
        | (dpl as u32) << 13
        | (ty as u32) << 8
        | (params & 0x1f) as u32;
    lo as u64 | (hi as u64) << 32
}

/// Clears the present bit of a descriptor.
pub fn not_present(d: u64) -> u64 {
    d & !(1u64 << 47)
}

/// Does the exception push an error code?
pub fn has_err(v: u8) -> bool {
    matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17)
}

/// An exception frame as the handler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trap {
    pub vector: u8,
    pub err: Option<u32>,
    pub eip: u32,
    pub cs: u16,
    pub eflags: u32,
    /// Outer stack, when the delivery changed privilege.
    pub outer: Option<(u16, u32)>,
}

pub struct Sys {
    pub c: Cpu,
    pub bus: TestBus,
    /// Control registers and EFLAGS for the next `start`.
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub eflags: u32,
    /// The vendor profile for the next `start`.
    pub vendor: Vendor,
}

impl Default for Sys {
    fn default() -> Self {
        Self::new()
    }
}

impl Sys {
    pub fn new() -> Sys {
        let s = Sys {
            c: cpu(4),
            bus: TestBus::default(),
            cr0: cr::CR0_PE | cr::CR0_ET,
            cr3: 0,
            cr4: 0,
            eflags: flags::FIXED1,
            vendor: Vendor::host(),
        };
        s.gdt(1, code32(0));
        s.gdt(2, data32(0));
        s.gdt(3, code32(3));
        s.gdt(4, data32(3));
        // TSS with an I/O bitmap that denies every port (+ the 0xff tail).
        s.gdt(5, tss32(TSS as u32, 0x68 + 0x2000));
        s.gdt(6, code32(1));
        s.gdt(7, data32(1));
        s.gdt(8, data32(2));
        let ram = s.c.ram().clone();
        ram.write_u32(TSS + 4, ESP0).unwrap();
        ram.write_u32(TSS + 8, KDATA as u32).unwrap();
        ram.write_u32(TSS + 0xc, ESP1).unwrap();
        ram.write_u32(TSS + 0x10, R1DATA as u32).unwrap();
        ram.write_u32(TSS + 0x14, ESP2).unwrap();
        ram.write_u32(TSS + 0x18, R2DATA as u32).unwrap();
        ram.write_u16(TSS + 0x66, 0x68).unwrap();
        ram.fill(IOMAP, 0x2001, 0xff).unwrap();
        for v in 0..256u32 {
            let stub = STUBS + v as u64 * 16;
            ram.write_u8(stub, 0xf4).unwrap(); // hlt
            ram.write_u8(stub + 1, 0xeb).unwrap(); // jmp $-3 (back to hlt)
            ram.write_u8(stub + 2, 0xfd).unwrap();
            s.idt(v as u8, gate(INT_GATE, KCODE, stub as u32, 0, 0));
        }
        s
    }

    pub fn ram(&self) -> &popek_memory::GuestRam {
        self.c.ram()
    }

    pub fn gdt(&self, i: usize, d: u64) {
        self.ram().write_u64(GDT + 8 * i as u64, d).unwrap();
    }

    pub fn ldt(&self, i: usize, d: u64) {
        self.ram().write_u64(LDT + 8 * i as u64, d).unwrap();
    }

    pub fn idt(&self, v: u8, d: u64) {
        self.ram().write_u64(IDT + 8 * v as u64, d).unwrap();
    }

    /// The hidden-cache form of the descriptor `sel` names (GDT or LDT).
    pub fn seg(&self, sel: u16) -> Segment {
        if sel & !3 == 0 {
            return Segment {
                selector: sel,
                ..Segment::default()
            };
        }
        let base = if sel & 4 != 0 { LDT } else { GDT };
        let raw = self.ram().read_u64(base + (sel & !7) as u64).unwrap();
        let mut s = Descriptor {
            lo: raw as u32,
            hi: (raw >> 32) as u32,
        }
        .to_segment(sel);
        s.attr |= 1; // accessed, as a load would set it
        s
    }

    /// Writes `code` at `eip` and makes the CPU start there with the given
    /// CS and SS (and DS = ES = FS = GS = SS).
    pub fn start_at(&mut self, cs: u16, ss: u16, eip: u32, esp: u32, code: &[u8]) {
        self.ram().write(eip as u64, code).unwrap();
        let mut st = CpuState::flat_protected(KCODE, KDATA);
        st.cr0 = self.cr0;
        st.cr3 = self.cr3;
        st.cr4 = self.cr4;
        st.rflags = (self.eflags | flags::FIXED1) as u64;
        st.gdtr = TableReg {
            base: GDT,
            limit: 128 * 8 - 1,
        };
        st.idtr = TableReg {
            base: IDT,
            limit: 256 * 8 - 1,
        };
        st.tr = self.seg(TSS_SEL);
        st.tr.attr = (st.tr.attr & !0xf) | 0xb; // busy
        let mut tss_hi = self.ram().read_u32(GDT + TSS_SEL as u64 + 4).unwrap();
        tss_hi |= 2 << 8;
        self.ram()
            .write_u32(GDT + TSS_SEL as u64 + 4, tss_hi)
            .unwrap();
        st.ldtr = Segment::default();
        for s in 0..6 {
            st.seg[s] = self.seg(ss);
        }
        st.seg[sr::CS] = self.seg(cs);
        st.rip = eip as u64;
        st.gpr[4] = esp as u64;
        st.vendor = self.vendor;
        self.c.set_state(st);
    }

    /// Kernel code at ring 0.
    pub fn start_kernel(&mut self, code: &[u8]) {
        self.start_at(KCODE, KDATA, KCODE_AT as u32, KSTACK, code);
    }

    /// Virtual-8086 code at 0x2000:0 (linear 0x20000, stack 0x0900:0x0ff0)
    /// with IOPL `iopl`, entered from ring 0 by IRETD with a V86 frame.
    pub fn start_v86(&mut self, code: &[u8], iopl: u32) {
        self.ram().write(0x20000, code).unwrap();
        let k = kcode(|a| {
            for _ in 0..4 {
                a.push(0u32)?; // GS, FS, DS, ES
            }
            a.push(0x0900u32)?; // SS
            a.push(0x0ff0u32)?; // ESP
            a.push(flags::VM | iopl << 12 | 2)?;
            a.push(0x2000u32)?; // CS
            a.push(0u32)?; // EIP
            a.iretd()
        });
        self.start_kernel(&k);
    }

    /// User code at ring 3.
    pub fn start_user(&mut self, code: &[u8]) {
        self.start_at(UCODE, UDATA, UCODE_AT as u32, USTACK, code);
    }

    /// Ring-1 code ("deprivileged kernel").
    pub fn start_ring1(&mut self, code: &[u8]) {
        self.start_at(R1CODE, R1DATA, UCODE_AT as u32, ESP1 - 0x100, code);
    }

    pub fn run(&mut self) -> RunExit {
        self.c.run(&mut self.bus, 100_000)
    }

    /// Runs and expects the CPU to stop in the stub of an exception.
    pub fn run_trap(&mut self) -> Trap {
        let x = self.run();
        assert_eq!(x, RunExit::Halted, "expected to halt in a handler stub");
        self.trap()
    }

    /// The vector whose stub the CPU halted in, if any.
    pub fn stub_vector(&mut self) -> Option<u8> {
        let st = self.c.state();
        let lin = st.seg[sr::CS].base + st.rip;
        if (STUBS..STUBS + 0x1000).contains(&lin) && st.halted {
            Some(((lin - 1 - STUBS) / 16) as u8)
        } else {
            None
        }
    }

    /// Reads the frame the CPU pushed for the exception whose stub it
    /// halted in (error code per the exception's class).
    pub fn trap(&mut self) -> Trap {
        let v = self
            .stub_vector()
            .unwrap_or_else(|| panic!("not halted in a stub: {:x?}", self.c.state().rip));
        self.frame(v, has_err(v))
    }

    /// Decodes the 32-bit frame at SS:ESP.
    pub fn frame(&mut self, vector: u8, err: bool) -> Trap {
        let st = self.c.state().clone();
        let mut a = st.seg[sr::SS].base + (st.gpr[4] & 0xffff_ffff);
        let ram = self.c.ram().clone();
        let mut pop = || {
            let v = ram.read_u32(a).unwrap();
            a += 4;
            v
        };
        let err = if err { Some(pop()) } else { None };
        let eip = pop();
        let cs = pop() as u16;
        let eflags = pop();
        let outer = if cs & 3 != st.seg[sr::CS].selector & 3 {
            let esp = pop();
            let ss = pop() as u16;
            Some((ss, esp))
        } else {
            None
        };
        Trap {
            vector,
            err,
            eip,
            cs,
            eflags,
            outer,
        }
    }

    /// Identity-maps 0–4 MiB with 4 KiB pages (`flags` on every PTE, the
    /// PDE is P|W|U) and turns paging on for the next `start`.
    pub fn paging(&mut self, flags: u32) {
        let ram = self.ram();
        ram.write_u32(PD, PT as u32 | P | W | U).unwrap();
        for i in 0..1024u32 {
            ram.write_u32(PT + 4 * i as u64, (i << 12) | flags).unwrap();
        }
        self.cr3 = PD;
        self.cr0 |= cr::CR0_PG;
    }

    /// Address of the PTE for `lin` (first 4 MiB).
    pub fn pte(&self, lin: u32) -> u64 {
        assert!(lin < 0x40_0000);
        PT + 4 * (lin >> 12) as u64
    }

    pub fn set_pte(&self, lin: u32, v: u32) {
        self.ram().write_u32(self.pte(lin), v).unwrap();
    }

    pub fn get_pte(&self, lin: u32) -> u32 {
        self.ram().read_u32(self.pte(lin)).unwrap()
    }

    pub fn set_pde(&self, lin: u32, v: u32) {
        self.ram()
            .write_u32(PD + 4 * (lin >> 22) as u64, v)
            .unwrap();
    }

    pub fn get_pde(&self, lin: u32) -> u32 {
        self.ram().read_u32(PD + 4 * (lin >> 22) as u64).unwrap()
    }

    /// Allows port `port` in the TSS I/O bitmap.
    pub fn allow_port(&self, port: u16) {
        let a = IOMAP + port as u64 / 8;
        let b = self.ram().read_u8(a).unwrap() & !(1 << (port % 8));
        self.ram().write_u8(a, b).unwrap();
    }

    pub fn gpr(&mut self, n: usize) -> u32 {
        self.c.state().gpr[n] as u32
    }

    pub fn rd32(&self, a: u64) -> u32 {
        self.ram().read_u32(a).unwrap()
    }
}

/// Assembles code of `bits` (16 or 32) for address `ip`; the closure uses `?`.
pub fn asm(
    bits: u32,
    ip: u64,
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// Kernel code (32-bit, at `KCODE_AT`).
pub fn kcode(
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    asm(32, KCODE_AT, f)
}

/// User code (32-bit, at `UCODE_AT`).
pub fn ucode(
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    asm(32, UCODE_AT, f)
}

/// An assembly fragment.
pub type Frag<'a> =
    Box<dyn FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError> + 'a>;

/// Assembles fragments back to back from `ip`; returns the code and the
/// address where each fragment starts (so a test knows the EIP of the
/// instruction that faults).
pub fn frags(bits: u32, ip: u64, parts: Vec<Frag<'_>>) -> (Vec<u8>, Vec<u32>) {
    let mut code = Vec::new();
    let mut at = Vec::new();
    for f in parts {
        let here = ip + code.len() as u64;
        at.push(here as u32);
        let mut a = iced_x86::code_asm::CodeAssembler::new(bits).unwrap();
        f(&mut a).unwrap();
        code.extend(a.assemble(here).unwrap());
    }
    (code, at)
}
