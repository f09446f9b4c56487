//! The translator: guest instructions → a translation unit (TU) → a
//! compiled code fragment (CCF) of host x86-64 code.
//!
//! Each guest instruction is classified:
//!
//! * **ident** — safe, emitted as the same host instruction with the guest
//!   registers mapped onto host registers (see [`map_reg`]); the host's
//!   arithmetic flags are the guest's for the whole fragment;
//! * **inline** — a simple sensitive instruction emitted as a short sequence
//!   on the virtual CPU state (`CpuState` through `r15`);
//! * **call-out** — everything else: the dispatcher runs it on the
//!   interpreter (`Cpu::run(bus, n)`), counted as a designed call-out
//!   (system and sensitive instructions) or a fallback (ordinary
//!   instructions the translator does not cover yet).
//!
//! A TU is the longest run of ident/inline instructions from one guest
//! EIP, ending at a direct jump (JMP/Jcc rel, translated), STI, the first
//! call-out instruction (not included: the next dispatch runs it), the page
//! end or [`MAX_TU`] instructions.
//!
//! Layout: `plan` decodes a TU, `classify` and `operands` decide each
//! instruction's class and memory form, `compile` emits the CCF, `probe`
//! emits the inline TLB probe and memory accesses, `exits` the ways out of
//! translated code, `share` the out-of-line probes several CCFs share.

use iced_x86::code_asm::*;
use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Encoder, FlowControl, Instruction, Mnemonic,
    OpKind, Register,
};
use popek_cpu::{CpuState, Segment};

mod classify;
mod compile;
mod exits;
mod operands;
mod plan;
mod probe;
mod share;

pub use classify::*;
pub use compile::*;
pub use exits::*;
pub(crate) use operands::*;
pub use plan::*;
pub use probe::*;

/// Largest number of guest instructions in one TU.
pub const MAX_TU: usize = 64;
/// Largest number of instructions one call-out entry runs on the
/// interpreter.
pub const MAX_CALLOUT_RUN: usize = 16;

/// The guest arithmetic flags (CF, PF, AF, ZF, SF, OF).
const ARITH: i32 = 0x8d5;
const IF: i32 = 0x200;

const OFF_GPR: i32 = std::mem::offset_of!(CpuState, gpr) as i32;
const OFF_RIP: i32 = std::mem::offset_of!(CpuState, rip) as i32;
const OFF_RFLAGS: i32 = std::mem::offset_of!(CpuState, rflags) as i32;
const OFF_CR0: i32 = std::mem::offset_of!(CpuState, cr0) as i32;
const OFF_SEG_BASE: i32 =
    (std::mem::offset_of!(CpuState, seg) + std::mem::offset_of!(Segment, base)) as i32;
const SEG_SIZE: i32 = std::mem::size_of::<Segment>() as i32;
const OFF_SHADOW: i32 = std::mem::offset_of!(CpuState, interrupt_shadow) as i32;
const OFF_LDTR_SEL: i32 =
    (std::mem::offset_of!(CpuState, ldtr) + std::mem::offset_of!(Segment, selector)) as i32;
const OFF_TR_SEL: i32 =
    (std::mem::offset_of!(CpuState, tr) + std::mem::offset_of!(Segment, selector)) as i32;
const OFF_SEG_SEL: i32 =
    (std::mem::offset_of!(CpuState, seg) + std::mem::offset_of!(Segment, selector)) as i32;
const OFF_GDTR: i32 = std::mem::offset_of!(CpuState, gdtr) as i32;
const OFF_IDTR: i32 = std::mem::offset_of!(CpuState, idtr) as i32;
const OFF_TABLE_BASE: i32 = std::mem::offset_of!(popek_cpu::state::TableReg, base) as i32;
const OFF_TABLE_LIMIT: i32 = std::mem::offset_of!(popek_cpu::state::TableReg, limit) as i32;
/// What POPF writes at CPL 0 (SDM: every flag but VM, RF, VIF, VIP).
const POPF_MASK: i32 = ARITH | 0x100 | IF | 0x400 | 0x3000 | 0x4000 | 0x4_0000 | 0x20_0000;
/// VM and RF: cleared in the image PUSHF stores.
const VM_RF: i32 = 0x3_0000;
const TF: i32 = 0x100;
const DF: i32 = 0x400;

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        Probe {
            set_base: 0x1000,
            entries: 1024,
            entry_shift: 5,
            way_stride: 1024 * 32,
            read_tag: 4,
            write_tag: 8,
            host: 24,
            exit_info: 0x2000,
            bmi2: std::arch::is_x86_feature_detected!("bmi2"),
            amd_div_flags: false,
            interp1_fn: 0,
            interp1_ctx: 0,
        }
    }

    fn compiles(code: &[u8]) -> usize {
        let ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: false,
            cs_lo: 0,
            interp1: false,
            foreign_vendor: false,
            amd: false,
            pause_exits: false,
            atomic: false,
        };
        plan_ctx(code, ctx).map_or(0, |p| p.insns as usize)
    }

    fn plan_ctx(code: &[u8], ctx: Ctx) -> Option<Plan> {
        match plan(code, 0x1000, ctx, &|_| false) {
            Translation::Tu(p) => {
                compile(&p, 0x10_0000, &probe(), 1, None).unwrap();
                Some(p)
            }
            Translation::Interp { .. } => None,
        }
    }

    /// PUSHFD, POPFD, SGDT/SIDT m, segment-register reads, SLDT/STR m are
    /// inline at CPL 0 in flat 32-bit code; at CPL 3 the segment reads,
    /// PUSHFD and POPFD are (POPF keeps IF unless IOPL = 3, decided at run
    /// time); all stay call-outs while the CPU reports sensitive
    /// instructions (the audit).
    #[test]
    fn sensitive_reads_are_inline() {
        let mut a = CodeAssembler::new(32).unwrap();
        a.pushfd().unwrap();
        a.mov(eax, ds).unwrap();
        a.mov(word_ptr(ebx + 4), fs).unwrap();
        a.push(es).unwrap();
        a.mov(cx, ss).unwrap();
        a.popfd().unwrap();
        a.sgdt(ptr(edi)).unwrap();
        a.sidt(ptr(edi + 8)).unwrap();
        a.sldt(word_ptr(edi)).unwrap();
        a.str(word_ptr(edi + 2)).unwrap();
        a.smsw(word_ptr(edi + 4)).unwrap();
        let code = a.assemble(0x1000).unwrap();
        let mut ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: false,
            cs_lo: 0,
            interp1: false,
            foreign_vendor: false,
            amd: false,
            pause_exits: false,
            atomic: false,
        };
        let p = plan_ctx(&code, ctx).unwrap();
        assert_eq!((p.insns, p.inline), (11, 11));
        ctx.cpl = 3;
        let p = plan_ctx(&code, ctx).unwrap();
        assert_eq!((p.insns, p.inline), (6, 6));
        ctx.cpl = 0;
        ctx.inline_sensitive = false;
        let p = plan_ctx(&code, ctx);
        assert!(p.is_none(), "PUSHFD is a call-out while the audit runs");
    }

    /// 16-bit code: ALU, 16-bit memory operands through segment bases,
    /// PUSH/POP, CALL rel16 translate; o32 jumps and 32-bit addressing do
    /// not.
    #[test]
    fn code16_translates() {
        let mut a = CodeAssembler::new(16).unwrap();
        a.add(ax, bx).unwrap();
        a.mov(cx, 5).unwrap();
        a.add_instruction(
            Instruction::with2(
                Code::Mov_r16_rm16,
                Register::DX,
                iced_x86::MemoryOperand::new(
                    Register::BX,
                    Register::SI,
                    1,
                    4,
                    1,
                    false,
                    Register::None,
                ),
            )
            .unwrap(),
        )
        .unwrap();
        a.push(dx).unwrap();
        a.pop(ax).unwrap();
        a.push(es).unwrap();
        a.lea(di, ptr(bp + di + 6)).unwrap();
        a.add(dword_ptr(ebx), eax).unwrap(); // 32-bit addressing: a call-out
        let code = a.assemble(0x1000).unwrap();
        let ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: true,
            cs_lo: 0x340,
            interp1: false,
            foreign_vendor: false,
            amd: false,
            pause_exits: false,
            atomic: false,
        };
        if !probe().bmi2 {
            return; // the 16-bit probe needs BMI2
        }
        let p = plan_ctx(&code, ctx).unwrap();
        assert_eq!(p.insns, 7);
        // Data segments not usable: register-only instructions still are.
        let p = plan_ctx(
            &code,
            Ctx {
                flat_data: false,
                ..ctx
            },
        )
        .unwrap();
        assert_eq!(p.insns, 2);
    }

    /// The worked example of `docs/binary-translation.md`: prints the CCF
    /// of a small loop (`cargo test -p popek-bt worked_example --
    /// --nocapture`).
    #[test]
    fn worked_example() {
        use iced_x86::{Formatter, IntelFormatter};
        // top: add eax,[ebx+ecx*4] / inc ecx / cmp ecx,edx / jne top
        let code = [0x03, 0x04, 0x8b, 0x41, 0x39, 0xd1, 0x75, 0xf8];
        let ctx = Ctx {
            cpl: 0,
            inline_sensitive: true,
            flat_data: true,
            fs_gs: 0,
            code16: false,
            cs_lo: 0,
            interp1: false,
            foreign_vendor: false,
            amd: false,
            pause_exits: false,
            atomic: false,
        };
        let Translation::Tu(p) = plan(&code, 0x1000, ctx, &|_| false) else {
            panic!("not translated")
        };
        assert_eq!((p.insns, p.ident), (4, 4));
        let c = compile(&p, 0x7f00_0000_0000, &probe(), 1, None).unwrap();
        assert_eq!(c.sites.len(), 2, "both Jcc exits chain");
        let host = c.code;
        let mut dec = Decoder::with_ip(64, &host, 0x7f00_0000_0000, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = String::new();
        for i in dec.iter() {
            out.push_str(&format!("{:5x}  ", i.ip() & 0xfff));
            f.format(&i, &mut out);
            out.push('\n');
        }
        println!("{} bytes\n{out}", host.len());
    }

    #[test]
    fn fs_gs_operands_compile_when_usable() {
        // mov eax, fs:[0x10]; add gs:[ebx+4], ecx; mov fs:[0x20], eax (moffs)
        let code = [
            0x64, 0x8b, 0x05, 0x10, 0, 0, 0, 0x65, 0x01, 0x4b, 0x04, 0x64, 0xa3, 0x20, 0, 0, 0,
        ];
        for (fs_gs, want) in [(3, 3), (0, 0)] {
            let ctx = Ctx {
                cpl: 0,
                inline_sensitive: true,
                flat_data: true,
                fs_gs,
                code16: false,
                cs_lo: 0,
                interp1: false,
                foreign_vendor: false,
                amd: false,
                pause_exits: false,
                atomic: false,
            };
            let n = match plan(&code, 0x1000, ctx, &|_| false) {
                Translation::Tu(p) => {
                    let mut t = probe();
                    t.bmi2 = true;
                    compile(&p, 0x10_0000, &t, 1, None).unwrap();
                    p.insns
                }
                Translation::Interp { .. } => 0,
            };
            assert_eq!(n, want);
        }
    }

    #[test]
    fn high_byte_registers_with_memory_compile() {
        // cmp [ebx], ah; mov dh, [esi+4]; hlt
        let code = [0x38, 0x23, 0x8a, 0x76, 0x04, 0xf4];
        assert_eq!(compiles(&code), 2);
    }

    #[test]
    fn memory_operands_compile() {
        // add [eax], al; mov ecx, [ebx+esi*4+0x10]; mov [esp+4], edx; hlt
        let code = [
            0x00, 0x00, 0x8b, 0x4c, 0xb3, 0x10, 0x89, 0x54, 0x24, 0x04, 0xf4,
        ];
        assert_eq!(compiles(&code), 3);
    }
}
