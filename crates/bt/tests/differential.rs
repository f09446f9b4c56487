//! `bt` held to `interp`: seeded random instruction sequences run on the
//! binary translator (`BtCore`) and on the reference interpreter (`Cpu::run`)
//! from the same state and memory; after every dispatch of the translator
//! (one CCF, or one interpreter run for call-outs) and after every
//! exception the whole `CpuState`, the instruction count and the data
//! pages are compared.
//!
//! Flat 32-bit protected mode, paging off, at CPL 0 (with the inline CLI,
//! STI, SMSW, SLDT, STR) and CPL 3 (where those are call-outs or #GP). Every
//! exception stops both CPUs (`exception_bitmap`), which ends a case, as
//! does the final HLT (Halted at CPL 0, #GP at CPL 3). The sequences mix
//! ident candidates (ALU register/immediate forms in all sizes, MOV,
//! MOVZX/MOVSX, LEA, shifts and rotates, XCHG, BSWAP, CBW…CDQ, flag ops,
//! SETcc, CMOVcc, forward Jcc/JMP, memory operands, PUSH/POP, CALL/RET and
//! RET imm16 — the memory ones through the inline TLB probe) with call-outs
//! (MUL/IMUL/DIV, PUSHFD/POPFD, stores into the code ahead: self-modifying
//! code, a wild ESP) and faults (#UD, #DE, #GP).
//!
//! `POPEK_BT_DIFF_CASES` (default 10 000) and `POPEK_BT_DIFF_SEED` scale it;
//! `POPEK_BT_DIFF_ONLY=i` runs case `i`, `POPEK_BT_DIFF_TRACE=1` prints each
//! dispatch and memory difference, `POPEK_BT_DIFF_SLOW=1` the slow cases.

use std::sync::Arc;

use iced_x86::code_asm::*;
use iced_x86::{Code, Instruction, MemoryOperand, Register};
use popek_bt::BtCore;
use popek_cpu::{Bus, BusAction, Cpu, CpuState, RunExit, Vendor};
use popek_memory::GuestRam;

const CODE: u64 = 0x10000;
const DATA: u64 = 0x30000;
const RAM: u64 = 1 << 20;

/// A bus with nothing on it (deterministic MMIO and ports).
struct Quiet;

impl Bus for Quiet {
    fn io_in(&mut self, port: u16, _size: u8) -> u32 {
        port as u32 ^ 0x1234
    }
    fn io_out(&mut self, _port: u16, _size: u8, _value: u32) -> BusAction {
        BusAction::Continue
    }
    fn mmio_read(&mut self, addr: u64, _size: u8) -> u64 {
        addr ^ 0x5555_5555
    }
    fn mmio_write(&mut self, _addr: u64, _size: u8, _value: u64) -> BusAction {
        BusAction::Continue
    }
    fn interrupt_pending(&mut self) -> bool {
        false
    }
    fn acknowledge_interrupt(&mut self) -> u8 {
        0
    }
    fn clock(&mut self, instructions: u64) -> u64 {
        instructions
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn imm(&mut self) -> i32 {
        match self.below(4) {
            0 => self.below(4) as i32 - 1,
            1 => [0x7fff_ffff, i32::MIN, 0x80, 0x7f, 0xff, 0x8000][self.below(6) as usize],
            _ => self.next() as i32,
        }
    }
}

const R32: [AsmRegister32; 8] = [eax, ecx, edx, ebx, esp, ebp, esi, edi];
const R16: [AsmRegister16; 8] = [ax, cx, dx, bx, sp, bp, si, di];
const R8: [AsmRegister8; 8] = [al, cl, dl, bl, ah, ch, dh, bh];

/// Mostly not ESP (a wild ESP makes the PUSH/POP call-outs uninteresting).
fn reg(r: &mut Rng) -> usize {
    if r.below(16) == 0 {
        4
    } else {
        [0, 1, 2, 3, 5, 6, 7][r.below(7) as usize]
    }
}

macro_rules! alu {
    ($a:expr, $op:expr, $d:expr, $s:expr) => {
        match $op {
            0 => $a.add($d, $s),
            1 => $a.or($d, $s),
            2 => $a.adc($d, $s),
            3 => $a.sbb($d, $s),
            4 => $a.and($d, $s),
            5 => $a.sub($d, $s),
            6 => $a.xor($d, $s),
            7 => $a.cmp($d, $s),
            _ => $a.test($d, $s),
        }
        .unwrap()
    };
}

macro_rules! shift {
    ($a:expr, $op:expr, $d:expr, $s:expr) => {
        match $op {
            0 => $a.shl($d, $s),
            1 => $a.shr($d, $s),
            2 => $a.sar($d, $s),
            3 => $a.rol($d, $s),
            4 => $a.ror($d, $s),
            5 => $a.rcl($d, $s),
            _ => $a.rcr($d, $s),
        }
        .unwrap()
    };
}

macro_rules! cc {
    ($a:expr, $c:expr, $set:ident, $($name:ident),*) => {{
        let mut i = 0;
        $( if $c == i { $a.$name($set).unwrap(); } i += 1; )*
        let _ = i;
    }};
}

/// One random instruction (or a small group) at CPL `cpl`.
fn gen_one(a: &mut CodeAssembler, r: &mut Rng, cpl: u8) {
    let (d, s) = (reg(r), reg(r));
    match r.below(51) {
        0..=5 => {
            let op = r.below(9);
            match r.below(6) {
                0 => alu!(a, op, R32[d], R32[s]),
                1 => alu!(a, op, R16[d], R16[s]),
                2 => alu!(a, op, R8[r.below(8) as usize], R8[r.below(8) as usize]),
                3 => alu!(a, op, R32[d], r.imm()),
                4 => alu!(a, op, R16[d], r.imm() as i16 as i32),
                _ => alu!(a, op, R8[r.below(8) as usize], r.imm() as i8 as i32),
            }
        }
        6..=7 => {
            let w = r.below(3);
            match (r.below(4), w) {
                (0, 0) => a.inc(R32[d]),
                (0, 1) => a.inc(R16[d]),
                (0, _) => a.inc(R8[d]),
                (1, 0) => a.dec(R32[d]),
                (1, 1) => a.dec(R16[d]),
                (1, _) => a.dec(R8[d]),
                (2, 0) => a.neg(R32[d]),
                (2, 1) => a.neg(R16[d]),
                (2, _) => a.neg(R8[d]),
                (_, 0) => a.not(R32[d]),
                (_, 1) => a.not(R16[d]),
                (_, _) => a.not(R8[d]),
            }
            .unwrap()
        }
        8..=10 => match r.below(7) {
            0 => a.mov(R32[d], r.imm()).unwrap(),
            1 => a.mov(R32[d], R32[s]).unwrap(),
            2 => a.mov(R16[d], R16[s]).unwrap(),
            3 => a
                .mov(R8[r.below(8) as usize], R8[r.below(8) as usize])
                .unwrap(),
            4 => a.movzx(R32[d], R8[r.below(8) as usize]).unwrap(),
            5 => a.movsx(R32[d], R16[s]).unwrap(),
            _ => a.movsx(R16[d], R8[r.below(8) as usize]).unwrap(),
        },
        11..=12 => {
            let disp = r.imm();
            let ix = [0, 1, 2, 3, 5, 6, 7][r.below(7) as usize];
            let m = match r.below(4) {
                0 => R32[s] + disp,
                1 => R32[s] + R32[ix] * [1, 2, 4, 8][r.below(4) as usize] + disp,
                2 => R32[ix] * [1, 2, 4, 8][r.below(4) as usize] + disp,
                _ => R32[s] + 0,
            };
            if r.below(4) == 0 {
                a.lea(R16[d], dword_ptr(m)).unwrap()
            } else {
                a.lea(R32[d], dword_ptr(m)).unwrap()
            }
        }
        13..=15 => {
            let op = r.below(7);
            let count = match r.below(4) {
                0 => 1,
                1 => r.below(40) as i32,
                _ => r.below(256) as i32,
            };
            match (r.below(3), r.below(3)) {
                (0, 0) => shift!(a, op, R32[d], count),
                (0, 1) => shift!(a, op, R16[d], count),
                (0, _) => shift!(a, op, R8[d], count),
                (1, 0) => shift!(a, op, R32[d], cl),
                (1, 1) => shift!(a, op, R16[d], cl),
                (1, _) => shift!(a, op, R8[d], cl),
                (_, _) => shift!(a, op, R32[d], 1),
            }
        }
        16 => match r.below(4) {
            0 => a.xchg(R32[d], R32[s]).unwrap(),
            1 => a.xchg(R16[d], R16[s]).unwrap(),
            2 => a
                .xchg(R8[r.below(8) as usize], R8[r.below(8) as usize])
                .unwrap(),
            _ => a.bswap(R32[d]).unwrap(),
        },
        17 => match r.below(12) {
            0 => a.cbw().unwrap(),
            1 => a.cwde().unwrap(),
            2 => a.cwd().unwrap(),
            3 => a.cdq().unwrap(),
            4 => a.clc().unwrap(),
            5 => a.stc().unwrap(),
            6 => a.cmc().unwrap(),
            7 => a.lahf().unwrap(),
            8 => a.sahf().unwrap(),
            9 => a.cld().unwrap(),
            10 => a.std().unwrap(),
            _ => a.nop().unwrap(),
        },
        18..=19 => {
            let c = r.below(16);
            let x = R8[r.below(8) as usize];
            cc!(
                a, c, x, seto, setno, setb, setae, sete, setne, setbe, seta, sets, setns, setp,
                setnp, setl, setge, setle, setg
            );
        }
        20..=21 => {
            let c = r.below(16);
            let (x, y) = (R32[d], R32[s]);
            macro_rules! cm {
                ($($n:ident),*) => {{ let mut i = 0; $( if c == i { a.$n(x, y).unwrap(); } i += 1; )* let _ = i; }};
            }
            cm!(
                cmovo, cmovno, cmovb, cmovae, cmove, cmovne, cmovbe, cmova, cmovs, cmovns, cmovp,
                cmovnp, cmovl, cmovge, cmovle, cmovg
            );
        }
        22..=24 => {
            // Forward Jcc/JMP over one instruction.
            let mut l = a.create_label();
            let c = r.below(17);
            macro_rules! j {
                ($($n:ident),*) => {{ let mut i = 0; $( if c == i { a.$n(l).unwrap(); } i += 1; )* let _ = i; }};
            }
            j!(jo, jno, jb, jae, je, jne, jbe, ja, js, jns, jp, jnp, jl, jge, jle, jg, jmp);
            gen_plain(a, r);
            a.set_label(&mut l).unwrap();
            gen_plain(a, r);
        }
        25..=28 => {
            // Memory call-outs on the data page.
            let m = DATA as i32 + (r.below(0xff0) as i32);
            match r.below(5) {
                0 => a.mov(dword_ptr(m), R32[s]).unwrap(),
                1 => a.add(R32[d], dword_ptr(m)).unwrap(),
                2 => a.mov(R16[d], word_ptr(m)).unwrap(),
                3 => a.xor(byte_ptr(m), R8[s]).unwrap(),
                _ => a.inc(dword_ptr(m)).unwrap(),
            }
        }
        43 => {
            // A frame: PUSH EBP / MOV EBP,ESP / … / LEAVE.
            a.push(ebp).unwrap();
            a.mov(ebp, esp).unwrap();
            a.push(R32[s]).unwrap();
            gen_plain(a, r);
            a.leave().unwrap();
        }
        29..=30 => match r.below(5) {
            0 => {
                if r.below(2) == 0 {
                    a.push(R32[s]).unwrap();
                } else {
                    a.push(r.imm() as i8 as i32).unwrap(); // 6A ib, sign-extended
                }
                a.pop(R32[d]).unwrap();
            }
            1 => a.imul_2(R32[d], R32[s]).unwrap(),
            2 => a.mul(R32[s]).unwrap(),
            3 => {
                a.pushfd().unwrap();
                a.pop(R32[d]).unwrap();
            }
            _ => {
                a.push(R32[s]).unwrap();
                a.popfd().unwrap();
            }
        },
        36..=37 => {
            // CALL/RET: call over a return stub, or call into a POP.
            let mut l1 = a.create_label();
            let mut l2 = a.create_label();
            match r.below(3) {
                0 => {
                    a.call(l1).unwrap();
                    gen_plain(a, r);
                    a.set_label(&mut l1).unwrap();
                    a.pop(R32[reg(r)]).unwrap();
                }
                1 => {
                    a.call(l1).unwrap();
                    a.jmp(l2).unwrap();
                    a.set_label(&mut l1).unwrap();
                    a.ret().unwrap();
                    a.set_label(&mut l2).unwrap();
                    gen_plain(a, r);
                }
                _ => {
                    a.push(r.imm()).unwrap();
                    a.call(l1).unwrap();
                    a.jmp(l2).unwrap();
                    a.set_label(&mut l1).unwrap();
                    a.ret_1(4).unwrap();
                    a.set_label(&mut l2).unwrap();
                    gen_plain(a, r);
                }
            }
        }
        31 => {
            if r.below(4) == 0 {
                a.div(R32[s]).unwrap(); // #DE when it does not fit
            } else {
                a.nop().unwrap();
            }
        }
        32..=34 if cpl == 0 => match r.below(5) {
            0 => a.cli().unwrap(),
            1 => a.sti().unwrap(),
            2 => a.smsw(R32[d]).unwrap(),
            3 => a.sldt(R16[d]).unwrap(),
            _ => a.str(R32[d]).unwrap(),
        },
        35 => {
            if r.below(8) == 0 {
                match r.below(3) {
                    0 => a.ud2().unwrap(),
                    1 => a.cli().unwrap(), // #GP at CPL 3
                    _ => a.int3().unwrap(),
                }
            } else {
                a.nop().unwrap();
            }
        }
        39 => {
            // FS/GS operands: FS-relative to the data page (by its base),
            // GS-relative, and offsets whose last byte passes 4 GiB (#GP).
            let disp = match r.below(6) {
                0 => -(r.below(4) as i32) - 1,
                1 => 0x1000 + r.below(0xff0) as i32,
                2 => 0x2000 + r.below(0xff0) as i32, // FS base 0xffff_f000: wraps
                _ => r.below(0x7f0) as i32,
            };
            let seg_fs = r.below(2) == 0;
            let mut ins = match r.below(5) {
                0 => Instruction::with2(
                    Code::Mov_r32_rm32,
                    Register::EAX,
                    MemoryOperand::with_base_displ(Register::None, disp as u32 as i64),
                ),
                1 => Instruction::with2(
                    Code::Add_rm32_r32,
                    MemoryOperand::with_base_displ(Register::None, disp as u32 as i64),
                    Register::ECX,
                ),
                2 => Instruction::with2(
                    Code::Mov_rm8_r8,
                    MemoryOperand::with_base_displ(Register::None, disp as u32 as i64),
                    Register::DL,
                ),
                3 => Instruction::with2(
                    Code::Mov_EAX_moffs32,
                    Register::EAX,
                    MemoryOperand::with_base_displ(Register::None, disp as u32 as i64),
                ),
                _ => Instruction::with2(
                    Code::Sub_r32_rm32,
                    Register::EBX,
                    MemoryOperand::new(
                        Register::ESI,
                        Register::None,
                        1,
                        (disp & 0xff) as i64,
                        1,
                        false,
                        Register::None,
                    ),
                ),
            }
            .unwrap();
            ins.set_segment_prefix(if seg_fs { Register::FS } else { Register::GS });
            if ins.code() == Code::Mov_EAX_moffs32 {
                ins.set_memory_displ_size(4);
            }
            a.add_instruction(ins).unwrap();
        }
        40 => {
            // Indirect transfers: CALL/JMP r32 and m32 to the code just
            // after them (the address from call/pop), PUSH m32.
            let rr = [0usize, 1, 2, 3, 5, 6, 7][r.below(7) as usize];
            let m = DATA as i32 + (r.below(0xff0) as i32);
            let kind = r.below(5);
            let mid = |b: &mut CodeAssembler| match kind {
                0 => b.jmp(R32[rr]).unwrap(),
                1 => b.call(R32[rr]).unwrap(),
                2 => {
                    b.mov(dword_ptr(m), R32[rr]).unwrap();
                    b.jmp(dword_ptr(m)).unwrap();
                }
                3 => {
                    b.mov(dword_ptr(m), R32[rr]).unwrap();
                    b.call(dword_ptr(m)).unwrap();
                }
                _ => {
                    b.push(dword_ptr(m)).unwrap();
                    b.pop(R32[reg(&mut Rng(m as u64 | 1))]).unwrap();
                }
            };
            let mut b = CodeAssembler::new(32).unwrap();
            mid(&mut b);
            let len = b.assemble(0).unwrap().len() as i32;
            let mut n = a.create_label();
            a.call(n).unwrap();
            a.set_label(&mut n).unwrap();
            a.pop(R32[rr]).unwrap();
            a.lea(R32[rr], dword_ptr(R32[rr] + (1 + 3 + len))).unwrap();
            mid(a);
        }
        41 => {
            let m = DATA as i32 + (r.below(0xff0) as i32);
            let bit = r.below(40) as i32;
            if r.below(4) == 0 {
                // CMPXCHG8B, equal (EDX:EAX loaded from the operand) or not.
                if r.below(2) == 0 {
                    a.mov(eax, dword_ptr(m)).unwrap();
                    a.mov(edx, dword_ptr(m + 4)).unwrap();
                }
                if r.below(2) == 0 {
                    a.lock().cmpxchg8b(qword_ptr(m)).unwrap();
                } else {
                    a.cmpxchg8b(qword_ptr(m)).unwrap();
                }
                return;
            }
            match r.below(10) {
                0 => a.bt(R32[d], R32[s]).unwrap(),
                1 => a.bts(R32[d], bit).unwrap(),
                2 => a.btr(R16[d], R16[s]).unwrap(),
                3 => a.btc(R32[d], bit).unwrap(),
                4 => a.bt(dword_ptr(m), bit).unwrap(),
                5 => a.bts(dword_ptr(m), bit).unwrap(),
                6 => a.cmpxchg(R32[d], R32[s]).unwrap(),
                7 => a.lock().cmpxchg(dword_ptr(m), R32[s]).unwrap(),
                8 => a.xadd(dword_ptr(m), R32[s]).unwrap(),
                _ => a.lock().add(dword_ptr(m), R32[s]).unwrap(),
            }
        }
        42 => {
            // DIV/IDIV, mostly not faulting (EDX prepared), sometimes #DE.
            let m = DATA as i32 + (r.below(0xff0) as i32);
            match r.below(3) {
                0 => a.xor(edx, edx).unwrap(),
                1 => a.cdq().unwrap(),
                _ => {}
            }
            match r.below(4) {
                0 => a.div(R32[s]).unwrap(),
                1 => a.idiv(R32[s]).unwrap(),
                2 => a.div(dword_ptr(m)).unwrap(),
                _ => a.idiv(dword_ptr(m)).unwrap(),
            }
        }
        38 => {
            let m = DATA as i32 + (r.below(0xff0) as i32);
            match r.below(8) {
                0 => a.imul_3(R32[d], R32[s], r.imm()).unwrap(),
                1 => a.imul(R32[s]).unwrap(),
                2 => a.imul_2(R16[d], R16[s]).unwrap(),
                3 => a.mul(R8[r.below(8) as usize]).unwrap(),
                4 => a.imul(R8[r.below(8) as usize]).unwrap(),
                5 => a.imul_2(R32[d], dword_ptr(m)).unwrap(),
                6 => a.mul(dword_ptr(m)).unwrap(),
                _ => a.mul(R16[s]).unwrap(),
            }
        }
        46 => {
            // Reads of the virtual CPU: segment registers (to registers,
            // memory, the stack), and at CPL 0 the descriptor-table
            // registers, LDTR, TR and the MSW to memory.
            let m = DATA as i32 + (r.below(0xffc) as i32);
            let sr = [es, cs, ss, ds, fs, gs][r.below(6) as usize];
            match r.below(if cpl == 0 { 9 } else { 4 }) {
                0 => a.mov(R32[d], sr).unwrap(),
                1 => a.mov(R16[d], sr).unwrap(),
                2 => a.mov(word_ptr(m), sr).unwrap(),
                3 => {
                    a.push(sr).unwrap();
                    a.pop(R32[d]).unwrap();
                }
                4 => a.sgdt(ptr(m)).unwrap(),
                5 => a.sidt(ptr(m)).unwrap(),
                6 => a.sldt(word_ptr(m)).unwrap(),
                7 => a.str(word_ptr(m)).unwrap(),
                _ => a.smsw(word_ptr(m)).unwrap(),
            }
        }
        47 => {
            // PUSHFD/POPFD with IF turning on and off (and rarely TF,
            // which traps after the next instruction).
            let mut v = 2 | (r.next() as i32 & 0x8d5) | (r.next() as i32 & 0x200);
            if r.below(16) == 0 {
                v |= 0x100;
            }
            if r.below(8) == 0 {
                v |= (r.next() as i32) & 0x24_7400; // DF NT AC ID IOPL
            }
            match r.below(3) {
                0 => {
                    a.push(v).unwrap();
                    a.popfd().unwrap();
                }
                1 => {
                    a.pushfd().unwrap();
                    a.xor(dword_ptr(esp), 0x200).unwrap();
                    a.popfd().unwrap();
                }
                _ => {
                    a.pushfd().unwrap();
                    gen_plain(a, r);
                    a.popfd().unwrap();
                }
            }
        }
        48 => {
            // String instructions (run on the interpreter from inside the
            // CCF) over the data page, with and without REP, DF 0 or 1
            // (the counts stay small), IN/OUT (#GP at CPL 3) and RDTSC
            // (the clock reads the instruction count: it must be exact
            // there too).
            let off = r.below(0x800) as i32;
            a.mov(esi, DATA as i32 + off).unwrap();
            a.mov(edi, DATA as i32 + 0x800 + (r.below(0x700) as i32))
                .unwrap();
            a.mov(ecx, r.below(40) as i32).unwrap();
            if r.below(4) == 0 {
                a.std().unwrap();
            }
            match r.below(12) {
                0 => a.rep().movsb().unwrap(),
                1 => a.rep().stosd().unwrap(),
                2 => a.lodsb().unwrap(),
                3 => a.repe().cmpsb().unwrap(),
                4 => a.repne().scasb().unwrap(),
                5 => a.movsd().unwrap(),
                6 => a.rep().movsw().unwrap(),
                7 => a.stosb().unwrap(),
                8 => a.rep().lodsd().unwrap(),
                9 => a.in_(al, 0x60).unwrap(),
                10 => {
                    a.mov(dx, 0x3f8).unwrap();
                    a.out(dx, eax).unwrap();
                }
                _ => a.rdtsc().unwrap(),
            }
            a.cld().unwrap();
        }
        49 => {
            // SHLD/SHRD (32-bit: imm8 and CL, register and memory),
            // BSF/BSR and TZCNT/LZCNT (BSF/BSR with REP on the virtual
            // CPU), zero sources too (the destination stays).
            let m = DATA as i32 + (r.below(0xff0) as i32);
            let count = [0, 1, 7, 31, 32, 33, r.below(256) as i32][r.below(7) as usize];
            let src = R32[[0, 1, 2, 3, 5, 6, 7][r.below(7) as usize]];
            if r.below(3) == 0 {
                a.xor(src, src).unwrap();
            }
            match r.below(11) {
                0 => a.shld(R32[d], src, count).unwrap(),
                1 => a.shrd(R32[d], src, count).unwrap(),
                2 => a.shld(dword_ptr(m), src, cl).unwrap(),
                3 => a.shrd(R32[d], src, cl).unwrap(),
                4 => a.shrd(dword_ptr(m), src, count).unwrap(),
                5 => a.bsf(R32[d], src).unwrap(),
                6 => a.bsr(R32[d], src).unwrap(),
                7 => a.bsf(R16[d], word_ptr(m)).unwrap(),
                8 => a.bsr(R32[d], dword_ptr(m)).unwrap(),
                9 => a.tzcnt(R32[d], src).unwrap(),
                _ => a.lzcnt(R16[d], word_ptr(m)).unwrap(),
            }
        }
        _ => gen_plain(a, r),
    }
}

/// A plain ALU instruction (for jump shadows).
fn gen_plain(a: &mut CodeAssembler, r: &mut Rng) {
    let (d, s) = (reg(r), reg(r));
    alu!(a, r.below(9), R32[d], R32[s]);
}

/// The vendor profile of a case: every other case runs the profile that is
/// not the host's (the translator then hands the instructions whose
/// undefined results differ between vendors to the interpreter).
fn profile(case: u64) -> Vendor {
    if case % 2 == 0 {
        Vendor::host()
    } else {
        Vendor::ALL
            .into_iter()
            .find(|&v| v != Vendor::host())
            .unwrap()
    }
}

fn machine(code: &[u8], cpl: u8, r: &mut Rng, vendor: Vendor) -> (Cpu, Vec<u8>) {
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    ram.write(CODE, code).unwrap();
    let data: Vec<u8> = (0..4096).map(|_| r.next() as u8).collect();
    ram.write(DATA, &data).unwrap();
    let mut cpu = Cpu::new(ram);
    let mut s = if cpl == 0 {
        CpuState::flat_protected(0x08, 0x10)
    } else {
        CpuState::flat_protected(0x1b, 0x23)
    };
    s.rip = CODE;
    for (i, g) in s.gpr.iter_mut().take(8).enumerate() {
        *g = if i == 4 {
            0x8000
        } else {
            r.next() & 0xffff_ffff
        };
    }
    // FS: flat but based (DATA - 0x1000, 0 or near the top, so that
    // linear addresses wrap); GS: based, sometimes with a small limit (its
    // operands are then call-outs that may fault).
    s.seg[4].base = [DATA - 0x1000, 0, 0xffff_f000][r.below(3) as usize];
    s.seg[5].base = DATA + 0x800;
    if r.below(2) == 0 {
        s.seg[5].limit = 0x7ff;
    }
    s.rflags = 2 | (r.next() & 0x8d5) | if r.below(2) == 0 { 0x200 } else { 0 };
    s.ldtr.selector = r.next() as u16;
    s.tr.selector = r.next() as u16;
    s.vendor = vendor;
    cpu.set_state(s);
    cpu.exception_bitmap = !0;
    (cpu, data)
}

/// Runs `bt` and `cpu_i` in random budgets (1..=`max`, seeded) until the
/// guest stops, asserting the same exit, count and state at every stop.
fn lockstep(bt: &mut BtCore, cpu_i: &mut Cpu, seed: u64, max: u64) {
    let mut r = Rng(seed);
    loop {
        let budget = 1 + r.below(max);
        let eb = bt.run(&mut Quiet, budget);
        let ei = cpu_i.run(&mut Quiet, budget);
        assert_eq!(eb, ei);
        assert_eq!(bt.cpu().icount, cpu_i.icount);
        assert_eq!(bt.cpu().state(), cpu_i.state());
        if eb != RunExit::Budget {
            break;
        }
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| {
            v.strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(default)
}

#[derive(Default)]
struct Tally {
    cases: u64,
    dispatches: u64,
    exceptions: u64,
    ccf_runs: u64,
    ib_hits: u64,
    shared: u64,
    compile_errors: u64,
    mismatches: Vec<String>,
}

fn run_case(seed: u64, case: u64, t: &mut Tally) {
    let mut r = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let cpl = if r.below(2) == 0 { 0 } else { 3 };
    let mut a = CodeAssembler::new(32).unwrap();
    let n = 1 + r.below(40);
    // Half of the cases run their sequence three times (a counter at the
    // end of the data page, beyond the generated stores), so that chains,
    // the indirect-branch table (RET to a known CCF) and retranslations
    // after stores get exercised.
    let looped = Rng(case ^ 0x1009).below(2) == 0;
    let mut top = a.create_label();
    if looped {
        a.mov(dword_ptr(DATA as i32 + 0xffc), 3).unwrap();
        a.set_label(&mut top).unwrap();
    }
    for _ in 0..n {
        gen_one(&mut a, &mut r, cpl);
    }
    if looped {
        a.dec(dword_ptr(DATA as i32 + 0xffc)).unwrap();
        a.jne(top).unwrap();
    }
    // Self-modifying code: a store into the code ahead sometimes.
    a.hlt().unwrap();
    // A quarter of the cases start near the end of the code page, behind
    // a JMP: instructions straddle the page end.
    let shift = if Rng(case ^ 0x5ad).below(4) == 0 {
        0xfc0 + Rng(case ^ 0x5ae).below(0x3c)
    } else {
        0
    };
    let mut code = a.assemble(CODE + shift).unwrap();
    if shift != 0 {
        let mut j = vec![0xe9];
        j.extend_from_slice(&(shift as i32 - 5).to_le_bytes());
        j.resize(shift as usize, 0xcc);
        j.extend_from_slice(&code);
        code = j;
    }
    if shift == 0 && r.below(8) == 0 && code.len() > 16 {
        // Prepend nothing: overwrite a random later byte through a store
        // placed at the start (mov byte [CODE+k], imm8 is 7 bytes).
        let k = 7 + r.below(code.len() as u64 - 8) as i32;
        let mut b = CodeAssembler::new(32).unwrap();
        b.mov(byte_ptr(CODE as i32 + k), r.next() as u8 as i32)
            .unwrap();
        let mut pre = b.assemble(CODE).unwrap();
        if pre.len() == 7 {
            // Replace the first 7 bytes' worth by shifting: simply run the
            // store first and the sequence after it (addresses are absolute
            // only in memory operands, and jumps are relative).
            pre.extend_from_slice(&code);
            code = pre;
        }
    }
    let (cpu_b, data) = machine(&code, cpl, &mut Rng(case + 1), profile(case));
    let (cpu_i, _) = machine(&code, cpl, &mut Rng(case + 1), profile(case));
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    // A quarter of the cases cover the PUSHFQ/POPFQ probe of hosts
    // without BMI2.
    bt.bmi2 &= case % 4 != 0;
    let _ = data;
    let what = format!(
        "case {case} (seed {seed:#x}, cpl {cpl}, profile {})",
        profile(case)
    );
    compare(&what, &code, bt, cpu_i, &[DATA, 0x7000, CODE], t);
}

/// Runs `bt` and the interpreter `cpu_i` side by side, dispatch by
/// dispatch, comparing state, instruction count and the pages at
/// `regions` after each (and all of RAM at the end); records a mismatch.
fn compare(
    what: &str,
    code: &[u8],
    mut bt: BtCore,
    mut cpu_i: Cpu,
    regions: &[u64],
    t: &mut Tally,
) {
    let (mut bus_b, mut bus_i) = (Quiet, Quiet);
    t.cases += 1;
    for _ in 0..2_000 {
        let before = bt.cpu().icount;
        let runs = bt.stats.ccf_runs;
        let exit_b = bt.step(&mut bus_b, 10_000);
        let n = bt.cpu().icount - before;
        t.dispatches += 1;
        t.ccf_runs += bt.stats.ccf_runs - runs;
        let mut exit_i = if n > 0 {
            cpu_i.run(&mut bus_i, n)
        } else {
            RunExit::Budget
        };
        if exit_b.is_some() && exit_i == RunExit::Budget {
            exit_i = cpu_i.run(&mut bus_i, 1);
        }
        let exit_b = exit_b.unwrap_or(RunExit::Budget);
        let (st_b, st_i) = (bt.cpu().state().clone(), cpu_i.state().clone());
        let pages = regions.len();
        let mut mem_b = vec![0u8; pages * 4096];
        let mut mem_i = vec![0u8; pages * 4096];
        for (i, &at) in regions.iter().enumerate() {
            let r = i * 4096..(i + 1) * 4096;
            bt.cpu().ram().read(at, &mut mem_b[r.clone()]).unwrap();
            cpu_i.ram().read(at, &mut mem_i[r]).unwrap();
        }
        if exit_b != RunExit::Budget {
            // The end: all of RAM.
            mem_b = vec![0u8; RAM as usize];
            mem_i = vec![0u8; RAM as usize];
            bt.cpu().ram().read(0, &mut mem_b).unwrap();
            cpu_i.ram().read(0, &mut mem_i).unwrap();
        }
        if mem_b != mem_i && std::env::var("POPEK_BT_DIFF_TRACE").is_ok() {
            for (i, (x, y)) in mem_b.iter().zip(&mem_i).enumerate() {
                if x != y {
                    eprintln!(
                        "mem diff at region {} +{:#x}: bt {x:#x} interp {y:#x}",
                        i / 4096,
                        i % 4096
                    );
                }
            }
        }
        if exit_b != exit_i || st_b != st_i || mem_b != mem_i || bt.cpu().icount != cpu_i.icount {
            t.mismatches.push(format!(
                "{what} after {} instructions: exit bt {exit_b:?} interp {exit_i:?}\n  gpr bt {:x?}\n  gpr in {:x?}\n  rip {:#x}/{:#x} rflags {:#x}/{:#x} memory equal {}\n  code {:02x?}",
                bt.cpu().icount,
                &st_b.gpr[..8],
                &st_i.gpr[..8],
                st_b.rip,
                st_i.rip,
                st_b.rflags,
                st_i.rflags,
                mem_b == mem_i,
                // (Without a straddling case's JMP and padding.)
                &code[code.iter().rposition(|&b| b == 0xcc).map_or(0, |p| p + 1)..]
            ));
            return;
        }
        if std::env::var("POPEK_BT_DIFF_TRACE").is_ok() {
            eprintln!(
                "rip {:#x} n {n} exit {exit_b:?} stats {:?}",
                st_b.rip, bt.stats
            );
        }
        if exit_b != RunExit::Budget {
            t.ib_hits += bt
                .stats_list()
                .iter()
                .find(|(k, _)| *k == "indirect-branch table hits")
                .map_or(0, |x| x.1);
            t.shared += bt.stats.shared_probes;
            t.compile_errors += bt.stats.compile_errors;
            if matches!(exit_b, RunExit::Exception { .. }) {
                t.exceptions += 1;
            }
            return;
        }
    }
}

#[test]
fn bt_matches_interp_on_random_sequences() {
    let seed = env("POPEK_BT_DIFF_SEED", 0x005e_edb7);
    let cases = env("POPEK_BT_DIFF_CASES", 10_000);
    let mut t = Tally::default();
    let only = std::env::var("POPEK_BT_DIFF_ONLY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    for case in 0..cases {
        if only.is_some_and(|o| o != case) {
            continue;
        }
        let t0 = std::time::Instant::now();
        let d0 = t.dispatches;
        run_case(seed, case, &mut t);
        if std::env::var("POPEK_BT_DIFF_SLOW").is_ok() && t0.elapsed().as_millis() > 30 {
            eprintln!(
                "case {case}: {:?}, {} dispatches",
                t0.elapsed(),
                t.dispatches - d0
            );
        }
    }
    eprintln!(
        "bt vs interp: {} sequences, {} dispatches ({} CCF runs, {} indirect-branch table hits, {} memory instructions sharing a probe), {} ended in an exception, {} mismatches",
        t.cases,
        t.dispatches,
        t.ccf_runs,
        t.ib_hits,
        t.shared,
        t.exceptions,
        t.mismatches.len()
    );
    for m in t.mismatches.iter().take(5) {
        eprintln!("{m}");
    }
    assert!(t.ccf_runs > t.cases, "the translator ran: {}", t.ccf_runs);
    assert!(
        cases < 1000 || t.ib_hits > 0,
        "RETs found their CCF inline: {}",
        t.ib_hits
    );
    assert!(
        cases < 1000 || !std::arch::is_x86_feature_detected!("bmi2") || t.shared > 0,
        "memory instructions shared probes: {}",
        t.shared
    );
    assert_eq!(t.compile_errors, 0, "TUs the assembler refused");
    assert!(t.mismatches.is_empty(), "{} mismatches", t.mismatches.len());
}

/// A store into a translated instruction takes effect the next time it
/// runs: the CCF is dropped and retranslated.
#[test]
fn self_modifying_code_invalidates_the_ccf() {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut skip = a.create_label();
    a.mov(ecx, 40).unwrap(); // 5 bytes: the next instruction's imm32 is at +6
    a.set_label(&mut top).unwrap();
    a.mov(eax, 0x1111_1111).unwrap();
    a.add(ebx, eax).unwrap();
    a.cmp(ecx, 40).unwrap();
    a.jne(skip).unwrap();
    a.mov(dword_ptr(CODE as i32 + 6), 0x2222_2222).unwrap();
    a.set_label(&mut skip).unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (mut cpu, _) = machine(&code, 0, &mut Rng(7), Vendor::host());
    cpu.state_mut().gpr[3] = 0;
    let mut bt = BtCore::new(cpu).unwrap();
    bt.set_hot_after(1);
    assert_eq!(bt.run(&mut Quiet, 10_000), RunExit::Halted);
    let want = 0x1111_1111u32.wrapping_add(39u32.wrapping_mul(0x2222_2222));
    assert_eq!(bt.cpu().state().gpr[3] as u32, want);
    assert!(bt.stats.invalidations >= 1, "{:?}", bt.stats);
    assert!(bt.stats.tus >= 2, "{:?}", bt.stats);
    assert!(
        bt.stats.ccf_runs >= 20,
        "the new code ran translated: {:?}",
        bt.stats
    );
}

/// A loop whose TUs chain into each other stops exactly at every budget,
/// in the same state as the interpreter.
#[test]
fn chained_loops_stop_exactly_at_the_budget() {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut skip = a.create_label();
    a.mov(ecx, 700).unwrap();
    a.set_label(&mut top).unwrap();
    a.add(eax, dword_ptr(ecx * 4 + DATA as i32 - 0x800))
        .unwrap();
    a.inc(ebx).unwrap();
    a.test(ebx, 3).unwrap();
    a.jne(skip).unwrap();
    a.mov(dword_ptr(DATA as i32 + 8), ebx).unwrap();
    a.push(eax).unwrap();
    a.pop(edx).unwrap();
    a.set_label(&mut skip).unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (cpu_b, _) = machine(&code, 0, &mut Rng(3), Vendor::host());
    let (mut cpu_i, _) = machine(&code, 0, &mut Rng(3), Vendor::host());
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    lockstep(&mut bt, &mut cpu_i, 99, 400);
    assert!(bt.stats.chains > 100, "{:?}", bt.stats);
    // One budget for the whole loop (≈ 4,700 instructions in 1,400 TUs):
    // the chain allowance counts instructions, so the loop chains through
    // in a few dispatches (a budget of TUs assuming 64 instructions each
    // made the dispatches shrink geometrically: dozens).
    let (cpu_b, _) = machine(&code, 0, &mut Rng(3), Vendor::host());
    let (mut cpu_i, _) = machine(&code, 0, &mut Rng(3), Vendor::host());
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    let budget = 5_000;
    assert_eq!(bt.run(&mut Quiet, budget), cpu_i.run(&mut Quiet, budget));
    assert_eq!(bt.cpu().icount, cpu_i.icount);
    assert_eq!(bt.cpu().state(), cpu_i.state());
    assert!(bt.stats.lookups < 12, "{:?}", bt.stats);
    assert!(bt.stats.chains > 1000, "{:?}", bt.stats);
}

/// A loop calling a function: its RET finds the caller's CCF in the
/// indirect-branch table; every budget stops in the interpreter's state.
#[test]
fn returns_through_the_indirect_branch_table_stop_exactly() {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut f = a.create_label();
    let mut done = a.create_label();
    a.mov(ecx, 500).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(f).unwrap();
    a.inc(ebx).unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.jmp(done).unwrap();
    // In the next page: the caller's TU does not go into it.
    a.db(&[0xcc; 0x1000]).unwrap();
    a.set_label(&mut f).unwrap();
    a.add(eax, dword_ptr(ecx * 4 + DATA as i32 - 0x800))
        .unwrap();
    a.cmp(eax, ebx).unwrap(); // flags live across the RET
    a.ret().unwrap();
    a.set_label(&mut done).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (cpu_b, _) = machine(&code, 3, &mut Rng(5), Vendor::host());
    let (mut cpu_i, _) = machine(&code, 3, &mut Rng(5), Vendor::host());
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    lockstep(&mut bt, &mut cpu_i, 77, 600);
    let hits = bt
        .stats_list()
        .iter()
        .find(|(k, _)| *k == "indirect-branch table hits")
        .unwrap()
        .1;
    assert!(hits > 100, "{:?}", bt.stats);
}

/// A trace: the loop's TU goes into the leaf function it calls (same page)
/// and, at its RET, on after the CALL; every 8th call the function returns
/// elsewhere (it bumps its return address past the INC), which leaves the
/// TU through the indirect-branch table. Exact at random budgets; the
/// loop runs in one TU per iteration.
#[test]
fn traces_go_into_calls_in_the_same_page() {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut f = a.create_label();
    a.mov(ecx, 700).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(f).unwrap();
    a.inc(ebx).unwrap(); // skipped when f returns elsewhere
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut f).unwrap();
    a.add(eax, dword_ptr(ecx * 4 + DATA as i32 - 0x800))
        .unwrap();
    // Past the 1-byte INC EBX when ECX % 8 == 0 (no branch: the TU
    // would end at a Jcc).
    a.mov(edx, ecx).unwrap();
    a.and(edx, 7).unwrap();
    a.sete(dl).unwrap();
    a.add(dword_ptr(esp), edx).unwrap();
    a.cmp(eax, ebx).unwrap(); // flags live across the RET
    a.ret().unwrap();
    let code = a.assemble(CODE).unwrap();
    for cpl in [0, 3] {
        let (cpu_b, _) = machine(&code, cpl, &mut Rng(6), Vendor::host());
        let (mut cpu_i, _) = machine(&code, cpl, &mut Rng(6), Vendor::host());
        let mut bt = BtCore::new(cpu_b).unwrap();
        bt.set_hot_after(1);
        lockstep(&mut bt, &mut cpu_i, 78 + cpl as u64, 900);
        assert!(bt.stats.ib_exits + bt.stats.ib_hits > 50, "{:?}", bt.stats);
        // (The call-plain-return path needs no indirect-branch lookup.)
        assert!(bt.stats.ib_hits + bt.stats.ib_exits < 200, "{:?}", bt.stats);
    }
}

/// A memory operand with 16-bit addressing (`[bx+si+disp]` and the
/// other forms), through `seg` (`None`: the default).
fn mem16(r: &mut Rng, seg: Register) -> MemoryOperand {
    let (base, index) = [
        (Register::BX, Register::SI),
        (Register::BX, Register::DI),
        (Register::BP, Register::SI),
        (Register::BP, Register::DI),
        (Register::SI, Register::None),
        (Register::DI, Register::None),
        (Register::BP, Register::None),
        (Register::BX, Register::None),
        (Register::None, Register::None),
    ][r.below(9) as usize];
    let (disp, size) = match r.below(3) {
        0 if base != Register::None => (0, 0),
        1 if base != Register::None => (r.next() as i8 as i64, 1),
        _ => (r.below(0x1_0000) as i64, 2),
    };
    let disp = if size == 1 { disp as u16 as i64 } else { disp };
    MemoryOperand::new(base, index, 1, disp, size, false, seg)
}

/// One random instruction (or a small group) of 16-bit code.
fn gen16(a: &mut CodeAssembler, r: &mut Rng, cpl: u8) {
    let r16 = [
        Register::AX,
        Register::CX,
        Register::DX,
        Register::BX,
        Register::SP,
        Register::BP,
        Register::SI,
        Register::DI,
    ];
    let rb = [
        Register::AL,
        Register::CL,
        Register::DL,
        Register::BL,
        Register::AH,
        Register::CH,
        Register::DH,
        Register::BH,
    ];
    let (d, s) = (reg(r), reg(r));
    let seg = [
        Register::None,
        Register::None,
        Register::None,
        Register::ES,
        Register::SS,
        Register::DS,
        Register::FS,
        Register::GS,
        Register::CS,
    ][r.below(9) as usize];
    let op = r.below(9);
    let alu16 = [
        Code::Add_rm16_r16,
        Code::Or_rm16_r16,
        Code::Adc_rm16_r16,
        Code::Sbb_rm16_r16,
        Code::And_rm16_r16,
        Code::Sub_rm16_r16,
        Code::Xor_rm16_r16,
        Code::Cmp_rm16_r16,
        Code::Test_rm16_r16,
    ][op as usize];
    let ins = |i: Result<Instruction, IcedError>| i.unwrap();
    let add = |a: &mut CodeAssembler, i: Instruction| a.add_instruction(i).unwrap();
    match r.below(20) {
        0..=3 => match r.below(4) {
            0 => alu!(a, op, R16[d], R16[s]),
            1 => alu!(a, op, R8[r.below(8) as usize], R8[r.below(8) as usize]),
            2 => alu!(a, op, R16[d], r.imm() as i16 as i32),
            _ => alu!(a, op, R32[d], R32[s]), // o32
        },
        4..=6 => {
            // Memory operands, sometimes with the base prepared to stay
            // in the first page of the segment.
            if r.below(2) == 0 {
                let b =
                    [Register::BX, Register::BP, Register::SI, Register::DI][r.below(4) as usize];
                add(
                    a,
                    ins(Instruction::with2(
                        Code::Mov_r16_imm16,
                        b,
                        r.below(0x800) as u32,
                    )),
                );
            }
            let m = mem16(r, seg);
            let i = match r.below(8) {
                0 => Instruction::with2(alu16, m, r16[s]),
                1 => Instruction::with2(Code::Mov_r16_rm16, r16[d], m),
                2 => Instruction::with2(Code::Mov_rm8_r8, m, rb[r.below(8) as usize]),
                3 => Instruction::with2(
                    Code::Add_r32_rm32,
                    [Register::EAX, Register::ECX, Register::EDX, Register::EBX][d & 3],
                    m,
                ),
                4 => Instruction::with1(Code::Inc_rm16, m),
                5 => Instruction::with2(Code::Movzx_r16_rm8, r16[d], m),
                6 => Instruction::with2(Code::Mov_rm16_imm16, m, r.next() as u16 as u32),
                _ => Instruction::with2(Code::Lea_r16_m, r16[d], m),
            };
            add(a, ins(i));
        }
        7 => {
            let c = r.below(4) as i32;
            match r.below(3) {
                0 => shift!(a, op % 7, R16[d], c),
                1 => shift!(a, op % 7, R8[d], cl),
                _ => shift!(a, op % 7, R16[d], 1),
            }
        }
        8..=9 => {
            // The stack: PUSH/POP of both sizes, immediates, segment
            // registers; sometimes from an odd or tiny Register::SP (wraps, #Register::SS).
            if r.below(16) == 0 {
                add(
                    a,
                    ins(Instruction::with2(
                        Code::Mov_r16_imm16,
                        Register::SP,
                        r.below(6) as u32,
                    )),
                );
            }
            let sr = [es, cs, ss, ds, fs, gs][r.below(6) as usize];
            match r.below(6) {
                0 => {
                    a.push(R16[s]).unwrap();
                    a.pop(R16[d]).unwrap();
                }
                1 => {
                    a.push(R32[s]).unwrap();
                    a.pop(R32[d]).unwrap();
                }
                2 => {
                    a.push(r.imm() as i16 as i32).unwrap();
                    a.pop(R16[d]).unwrap();
                }
                3 => {
                    a.push(sr).unwrap();
                    a.pop(R16[d]).unwrap();
                }
                4 => a.mov(R16[d], sr).unwrap(),
                _ => {
                    // PUSHF/POPF, IF turning on and off, TF now and then.
                    if r.below(2) == 0 {
                        a.pushf().unwrap();
                    } else {
                        let v = 2
                            | (r.next() as i32 & 0x7ed5)
                            | if r.below(16) == 0 { 0x100 } else { 0 };
                        a.push(v).unwrap();
                    }
                    a.popf().unwrap();
                }
            }
        }
        10..=11 => {
            // CALL/RET (rel16, RET imm16).
            let mut l1 = a.create_label();
            let mut l2 = a.create_label();
            match r.below(2) {
                0 => {
                    a.call(l1).unwrap();
                    a.jmp(l2).unwrap();
                    a.set_label(&mut l1).unwrap();
                    a.ret().unwrap();
                    a.set_label(&mut l2).unwrap();
                    alu!(a, op, R16[d], R16[s]);
                }
                _ => {
                    a.push(r.imm() as i16 as i32).unwrap();
                    a.call(l1).unwrap();
                    a.jmp(l2).unwrap();
                    a.set_label(&mut l1).unwrap();
                    a.ret_1(2).unwrap();
                    a.set_label(&mut l2).unwrap();
                    alu!(a, op, R16[d], R16[s]);
                }
            }
        }
        12..=13 => {
            // A forward Jcc/JMP over one instruction.
            let mut l = a.create_label();
            match r.below(4) {
                0 => a.jmp(l).unwrap(),
                1 => a.je(l).unwrap(),
                2 => a.jb(l).unwrap(),
                _ => a.jg(l).unwrap(),
            }
            alu!(a, op, R16[d], R16[s]);
            a.set_label(&mut l).unwrap();
        }
        14 => match r.below(6) {
            0 => a.mov(R16[d], r.imm() as i16 as i32).unwrap(),
            1 => a.movsx(R16[d], R8[r.below(8) as usize]).unwrap(),
            2 => a.xchg(R16[d], R16[s]).unwrap(),
            3 => a.cbw().unwrap(),
            4 => a.cwd().unwrap(),
            _ => a.inc(R16[d]).unwrap(),
        },
        15 if cpl == 0 => match r.below(2) {
            0 => a.cli().unwrap(),
            _ => a.sti().unwrap(),
        },
        16 => {
            // Self-modifying code through Register::ES (= Register::CS in some cases).
            let m = MemoryOperand::new(
                Register::None,
                Register::None,
                1,
                r.below(0x1_0000) as i64,
                2,
                false,
                Register::ES,
            );
            add(
                a,
                ins(Instruction::with2(
                    Code::Mov_rm8_imm8,
                    m,
                    r.next() as u8 as u32,
                )),
            );
        }
        17 => match r.below(3) {
            0 => a.div(R16[s]).unwrap(),
            1 => a.mul(R16[s]).unwrap(),
            _ => a.imul_2(R16[d], R16[s]).unwrap(),
        },
        _ => alu!(a, op, R16[d], R16[s]),
    }
}

/// The 16-bit machine: real mode (`mode` 0) or a 16-bit code segment at
/// CPL 0 (1) or 3 (2), paging off. Register::CS's base puts IP 0 at `CODE - base`
/// (a random page offset); Register::DS's base is the data page's; Register::ES is Register::DS, Register::CS (for
/// stores into the code) or another base; Register::SS:SP tops at 0x8000; Register::FS and
/// Register::GS have other bases, Register::GS sometimes a small limit (its operands are then
/// call-outs).
fn machine16(code: &[u8], mode: u8, r: &mut Rng, vendor: Vendor) -> (Cpu, u64) {
    use popek_cpu::state::attr;
    use popek_cpu::Segment;
    let ram = Arc::new(GuestRam::new(RAM).unwrap());
    ram.write(CODE, code).unwrap();
    let data: Vec<u8> = (0..0x1_0000).map(|_| r.next() as u8).collect();
    ram.write(DATA, &data).unwrap();
    let mut cpu = Cpu::new(ram);
    let cs_sel = 0x1000 - r.below(0xf00) as u16;
    let cs_base = (cs_sel as u64) << 4;
    let mut s = if mode == 0 {
        let mut s = CpuState::reset();
        s.cr0 &= !1;
        s.seg = [Segment::real(0); 6];
        s.seg[1] = Segment::real(cs_sel);
        s.seg[1].attr |= attr::CODE;
        s
    } else {
        let rpl = if mode == 2 { 3 } else { 0 };
        let mut s = CpuState::flat_protected(0x08 | rpl, 0x10 | rpl);
        for g in s.seg.iter_mut() {
            g.attr &= !(attr::DB | attr::G);
            g.limit = 0xffff;
        }
        s.seg[1].base = cs_base;
        s
    };
    let es_base = [DATA, cs_base, DATA - 0x8000][r.below(3) as usize];
    s.seg[0].base = es_base;
    s.seg[2].base = 0;
    s.seg[3].base = DATA;
    s.seg[4].base = DATA + 0x100;
    s.seg[5].base = DATA + 0x800;
    if mode == 0 {
        for i in [0, 3, 4, 5] {
            s.seg[i].selector = (s.seg[i].base >> 4) as u16;
        }
    }
    if r.below(2) == 0 {
        s.seg[5].limit = 0x7ff;
    }
    s.rip = CODE - cs_base;
    for (i, g) in s.gpr.iter_mut().take(8).enumerate() {
        *g = if i == 4 {
            0x8000
        } else {
            r.next() & 0xffff_ffff
        };
    }
    s.rflags = 2 | (r.next() & 0x8d5) | if r.below(2) == 0 { 0x200 } else { 0 };
    s.vendor = vendor;
    let ip = s.rip;
    cpu.set_state(s);
    cpu.exception_bitmap = !0;
    (cpu, ip)
}

fn run_case16(seed: u64, case: u64, t: &mut Tally) {
    let mut r = Rng(seed ^ case.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mode = r.below(3) as u8;
    let cpl = if mode == 2 { 3 } else { 0 };
    let ip = machine16(&[], mode, &mut Rng(case + 1), profile(case)).1;
    let mut a = CodeAssembler::new(16).unwrap();
    let n = 1 + r.below(40);
    let looped = Rng(case ^ 0x1009).below(2) == 0;
    let mut top = a.create_label();
    let counter = MemoryOperand::new(
        Register::None,
        Register::None,
        1,
        0xffe,
        2,
        false,
        Register::DS,
    );
    if looped {
        a.add_instruction(Instruction::with2(Code::Mov_rm16_imm16, counter, 3).unwrap())
            .unwrap();
        a.set_label(&mut top).unwrap();
    }
    for _ in 0..n {
        gen16(&mut a, &mut r, cpl);
    }
    if looped {
        a.add_instruction(Instruction::with1(Code::Dec_rm16, counter).unwrap())
            .unwrap();
        a.jne(top).unwrap();
    }
    a.hlt().unwrap();
    let code = a.assemble(ip).unwrap();
    let (cpu_b, _) = machine16(&code, mode, &mut Rng(case + 1), profile(case));
    let (cpu_i, _) = machine16(&code, mode, &mut Rng(case + 1), profile(case));
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    let what = format!(
        "16-bit case {case} (seed {seed:#x}, mode {mode}, profile {})",
        profile(case)
    );
    compare(&what, &code, bt, cpu_i, &[DATA, 0x7000, CODE], t);
}

/// 16-bit code (real mode, 16-bit protected mode at CPL 0 and 3) on `bt`
/// and on the interpreter: memory operands with 16-bit addressing through
/// every segment, Register::SP wrapping, CALL/RET rel16, PUSH Sreg, segment bases
/// that are not page-aligned (chaining by linear page).
#[test]
fn bt_matches_interp_on_random_16bit_sequences() {
    let seed = env("POPEK_BT_DIFF_SEED", 0x005e_edb7);
    let cases = env("POPEK_BT_DIFF_CASES", 10_000) / 2;
    let mut t = Tally::default();
    let only = std::env::var("POPEK_BT_DIFF_ONLY")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let before = std::time::Instant::now();
    let mut ccf16 = 0;
    for case in 0..cases {
        if only.is_some_and(|o| o != case) {
            continue;
        }
        let runs = t.ccf_runs;
        run_case16(seed, case, &mut t);
        ccf16 += (t.ccf_runs > runs) as u64;
    }
    eprintln!(
        "bt vs interp, 16-bit code: {} sequences ({} ran translated code), {} dispatches ({} CCF runs), {} ended in an exception, {} mismatches, {:?}",
        t.cases,
        ccf16,
        t.dispatches,
        t.ccf_runs,
        t.exceptions,
        t.mismatches.len(),
        before.elapsed()
    );
    for m in t.mismatches.iter().take(5) {
        eprintln!("{m}");
    }
    if std::arch::is_x86_feature_detected!("bmi2") {
        assert!(t.ccf_runs > t.cases, "the translator ran: {}", t.ccf_runs);
    } else {
        eprintln!("no BMI2 on this host: 16-bit code is interpreted");
    }
    assert!(t.mismatches.is_empty(), "{} mismatches", t.mismatches.len());
}

/// A real-mode loop (CS base not page-aligned) with 16-bit memory
/// operands, PUSH/POP and CALL/RET runs translated, stopping exactly at
/// every budget in the interpreter's state.
#[test]
fn real_mode_loop_runs_translated() {
    if !std::arch::is_x86_feature_detected!("bmi2") {
        eprintln!("skipped: no BMI2 on this host (16-bit code is interpreted)");
        return;
    }
    let (probe, ip) = machine16(&[], 0, &mut Rng(11), Vendor::host());
    drop(probe);
    let mut a = CodeAssembler::new(16).unwrap();
    let mut top = a.create_label();
    let mut f = a.create_label();
    let mut done = a.create_label();
    a.mov(cx, 2000).unwrap();
    a.xor(si, si).unwrap();
    a.set_label(&mut top).unwrap();
    let m = MemoryOperand::new(Register::BX, Register::SI, 1, 0, 0, false, Register::None);
    a.add_instruction(Instruction::with2(Code::Add_r16_rm16, Register::AX, m).unwrap())
        .unwrap();
    a.add(si, 2).unwrap();
    a.and(si, 0x7fe).unwrap();
    a.push(ax).unwrap();
    a.call(f).unwrap();
    a.pop(dx).unwrap();
    a.dec(cx).unwrap();
    a.jne(top).unwrap();
    a.jmp(done).unwrap();
    a.set_label(&mut f).unwrap();
    let m = MemoryOperand::new(
        Register::BP,
        Register::None,
        1,
        0x40,
        1,
        false,
        Register::DS,
    );
    a.add_instruction(Instruction::with2(Code::Mov_rm16_r16, m, Register::AX).unwrap())
        .unwrap();
    a.ret().unwrap();
    a.set_label(&mut done).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(ip).unwrap();
    let (cpu_b, _) = machine16(&code, 0, &mut Rng(11), Vendor::host());
    let (mut cpu_i, _) = machine16(&code, 0, &mut Rng(11), Vendor::host());
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    lockstep(&mut bt, &mut cpu_i, 5, 500);
    assert_eq!(bt.cpu().state().gpr[1] & 0xffff, 0, "the loop ran out");
    let mut mb = vec![0u8; RAM as usize];
    let mut mi = vec![0u8; RAM as usize];
    bt.cpu().ram().read(0, &mut mb).unwrap();
    cpu_i.ram().read(0, &mut mi).unwrap();
    assert!(mb == mi, "memory differs");
    let total = bt.cpu().icount;
    let s = &bt.stats;
    assert!(
        s.dyn_interp * 20 < total,
        "mostly translated: {} of {total} interpreted ({s:?})",
        s.dyn_interp
    );
}

/// Two data pages 4 MiB apart (one TLB index) accessed in turn stay in the
/// two ways of the data TLB: after the first misses the inline probes hit
/// (way 0 or way 1), nothing becomes an adaptive call-out, and a third page
/// of the same index still runs exactly as on the interpreter.
#[test]
fn data_pages_sharing_a_tlb_index_both_hit_inline() {
    let run = |pages: u32| {
        let mut a = CodeAssembler::new(32).unwrap();
        let mut top = a.create_label();
        a.mov(ecx, 3000).unwrap();
        a.set_label(&mut top).unwrap();
        for p in 0..pages {
            let at = (DATA as u32 + p * 0x40_0000) as i32;
            a.add(eax, dword_ptr(at + 8)).unwrap();
            a.mov(dword_ptr(at + 16), ecx).unwrap();
        }
        a.dec(ecx).unwrap();
        a.jne(top).unwrap();
        a.hlt().unwrap();
        let code = a.assemble(CODE).unwrap();
        let mk = || {
            let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
            ram.write(CODE, &code).unwrap();
            let mut cpu = Cpu::new(ram);
            let mut s = CpuState::flat_protected(0x08, 0x10);
            s.rip = CODE;
            s.gpr[4] = 0x8000;
            cpu.set_state(s);
            cpu.exception_bitmap = !0;
            cpu
        };
        let mut bt = BtCore::new(mk()).unwrap();
        bt.set_hot_after(1);
        let mut cpu_i = mk();
        assert_eq!(bt.run(&mut Quiet, 1_000_000), RunExit::Halted);
        assert_eq!(cpu_i.run(&mut Quiet, 1_000_000), RunExit::Halted);
        assert_eq!(bt.cpu().state(), cpu_i.state());
        assert_eq!(bt.cpu().icount, cpu_i.icount);
        let (mut mb, mut mi) = (vec![0u8; 16 << 20], vec![0u8; 16 << 20]);
        bt.cpu().ram().read(0, &mut mb).unwrap();
        cpu_i.ram().read(0, &mut mi).unwrap();
        assert!(mb == mi, "memory differs ({pages} pages)");
        bt.stats.clone()
    };
    let two = run(2);
    assert!(
        two.tlb_misses <= 8 && two.adapted == 0,
        "two pages of one index hit inline: {two:?}"
    );
    let three = run(3);
    assert!(
        three.tlb_misses > two.tlb_misses,
        "three pages of one index do not all fit: {three:?}"
    );
}

/// Shared probes: a loop whose stack-frame accesses share one probe, with
/// the frame first inside a page, then across a page boundary (the span's
/// probe misses every time: the group is unshared and the accesses probe
/// one by one), then inside again; memory, state and counts match the
/// interpreter at random budgets.
#[test]
fn shared_probes_across_a_page_boundary_stay_exact() {
    if !std::arch::is_x86_feature_detected!("bmi2") {
        return;
    }
    let mut a = CodeAssembler::new(32).unwrap();
    let mut outer = a.create_label();
    let mut top = a.create_label();
    a.mov(ebp, DATA as u32 + 0xf00).unwrap();
    a.mov(esi, 3).unwrap();
    a.set_label(&mut outer).unwrap();
    a.mov(ecx, 300).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(eax, dword_ptr(ebp - 8)).unwrap();
    a.add(eax, dword_ptr(ebp + 4)).unwrap();
    a.mov(dword_ptr(ebp), eax).unwrap();
    a.push(eax).unwrap();
    a.xor(dword_ptr(esp), ecx).unwrap();
    a.pop(edx).unwrap();
    a.add(dword_ptr(ebp - 4), edx).unwrap();
    a.dec(ecx).unwrap();
    a.jne(top).unwrap();
    // Next frame position: 0x31000 - 4 (across), then 0x31100 (inside).
    a.add(ebp, 0xfc).unwrap();
    a.dec(esi).unwrap();
    a.jne(outer).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    for seed in 0..3 {
        let (cpu_b, _) = machine(&code, 0, &mut Rng(7), Vendor::host());
        let (mut cpu_i, _) = machine(&code, 0, &mut Rng(7), Vendor::host());
        let mut bt = BtCore::new(cpu_b).unwrap();
        bt.set_hot_after(1);
        let mut r = Rng(1234 + seed);
        loop {
            let budget = 1 + r.below(900);
            let eb = bt.run(&mut Quiet, budget);
            let ei = cpu_i.run(&mut Quiet, budget);
            assert_eq!(eb, ei);
            assert_eq!(bt.cpu().icount, cpu_i.icount);
            assert_eq!(bt.cpu().state(), cpu_i.state());
            let (mut mb, mut mi) = (vec![0u8; 0x3000], vec![0u8; 0x3000]);
            bt.cpu().ram().read(DATA, &mut mb).unwrap();
            cpu_i.ram().read(DATA, &mut mi).unwrap();
            assert!(mb == mi, "data differ");
            if eb != RunExit::Budget {
                break;
            }
        }
        assert!(bt.stats.shared_probes > 0, "{:?}", bt.stats);
        assert!(bt.stats.unshared > 0, "{:?}", bt.stats);
    }
}

/// An instruction straddling the end of the code page (`ADD EAX, imm32`
/// at 0x10ffe, its immediate's last three bytes in the next page) runs on
/// the interpreter from inside its CCF: exact at random budgets, no
/// dispatcher round trip per iteration, and a store that changes its bytes
/// in the next page only (no invalidation of its own page) is seen.
#[test]
fn instructions_straddling_a_page_end_run_inside_the_ccf() {
    let mut code = vec![0u8; 0x1016];
    let mut put = |at: usize, b: &[u8]| code[at..at + b.len()].copy_from_slice(b);
    put(0, &[0xb9, 0x2c, 0x01, 0, 0]); // mov ecx, 300
    put(5, &[0xbe, 0x03, 0, 0, 0]); // mov esi, 3
    put(10, &[0xe9]); // jmp 0x10ff0
    put(11, &(0xff0i32 - 15).to_le_bytes());
    put(0xff0, &[0x90; 14]); // nop × 14
    put(0xffe, &[0x05, 0x04, 0x03, 0x02, 0x01]); // add eax, 0x01020304
    put(0x1003, &[0x49, 0x75, 0xea]); // dec ecx; jnz 0x10ff0
                                      // mov [0x11001], si: the immediate's bytes 3 and 4 (next page only).
    put(0x1006, &[0x66, 0x89, 0x35, 0x01, 0x10, 0x01, 0x00]);
    put(0x100d, &[0xb9, 0x2c, 0x01, 0, 0]); // mov ecx, 300
    put(0x1012, &[0x4e, 0x75, 0xdb, 0xf4]); // dec esi; jnz 0x10ff0; hlt
    let run_all = |max: u64| {
        let (cpu_b, _) = machine(&code, 0, &mut Rng(9), Vendor::host());
        let (mut cpu_i, _) = machine(&code, 0, &mut Rng(9), Vendor::host());
        let mut bt = BtCore::new(cpu_b).unwrap();
        bt.set_hot_after(1);
        lockstep(&mut bt, &mut cpu_i, 77, max);
        bt
    };
    run_all(700);
    let bt = run_all(1 << 40);
    // 900 iterations of a 20-instruction loop: translated, with the
    // straddling ADD run in place (a dispatcher round trip each would
    // make 1,800 dispatches).
    assert!(bt.stats.callouts >= 850, "{:?}", bt.stats);
    assert!(bt.stats.lookups < 100, "{:?}", bt.stats);
    assert!(bt.stats.ccf_runs > 1700, "{:?}", bt.stats);
}

/// Two frames that lie across a page boundary (as stack frames do when
/// ASLR puts the stack there), used in turn by two loops of one code page,
/// 1.2 M instructions each time: each group is unshared once. (Sharing
/// again once a retry delay of 1 M instructions had passed, at the page's
/// next translation — which the other loop's unsharing caused — dropped
/// and retranslated the page at every turn, and made one benchmark run in
/// five 30 % slower.)
#[test]
fn frames_across_a_page_are_unshared_once() {
    if !std::arch::is_x86_feature_detected!("bmi2") {
        return;
    }
    let mut a = CodeAssembler::new(32).unwrap();
    let mut top = a.create_label();
    let mut first = a.create_label();
    let mut second = a.create_label();
    a.mov(ebp, DATA as u32 + 0xffc).unwrap(); // [ebp-8, ebp+8) crosses
    a.mov(edi, DATA as u32 + 0xffa).unwrap(); // [edi-4, edi+8) crosses
    a.mov(esi, 4).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(ecx, 300_000).unwrap();
    a.set_label(&mut first).unwrap();
    a.mov(eax, dword_ptr(ebp - 8)).unwrap();
    a.add(dword_ptr(ebp + 4), eax).unwrap();
    a.dec(ecx).unwrap();
    a.jne(first).unwrap();
    a.mov(ecx, 300_000).unwrap();
    a.set_label(&mut second).unwrap();
    a.mov(edx, dword_ptr(edi - 4)).unwrap();
    a.add(dword_ptr(edi + 4), edx).unwrap();
    a.dec(ecx).unwrap();
    a.jne(second).unwrap();
    a.dec(esi).unwrap();
    a.jne(top).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    let (cpu_b, _) = machine(&code, 0, &mut Rng(8), Vendor::host());
    let (mut cpu_i, _) = machine(&code, 0, &mut Rng(8), Vendor::host());
    let mut bt = BtCore::new(cpu_b).unwrap();
    bt.set_hot_after(1);
    lockstep(&mut bt, &mut cpu_i, 9, 1 << 20);
    assert!(bt.cpu().icount > 9_000_000, "{}", bt.cpu().icount);
    assert!(bt.stats.unshared >= 2, "{:?}", bt.stats);
    assert!(bt.stats.unshared <= 3, "{:?}", bt.stats);
}
