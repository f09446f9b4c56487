//! popek's software x86 CPU.
//!
//! An IA-32 model — real mode, 16/32-bit protected mode, virtual-8086 mode,
//! two-level and PAE paging with large and global pages, rings 0–3 with every
//! privilege check, interrupts, exceptions, task switching — that the
//! `interp`, `trap` and `bt` engines share. See `docs/cpu.md`.
//!
//! Layout: [`state`] is the plain-data architectural state; [`cpu`] holds
//! the run loop and the decoded-block cache; `decode` resolves instructions
//! once; `exec/*` executes them; `mmu` translates addresses through a
//! software TLB, walking the guest's tables with [`paging`] (the one page
//! walker every engine uses); `seg` applies segmentation; `interrupt` and `task` deliver
//! events; [`bus`] is everything outside the CPU; [`hooks`] reports
//! sensitive instructions.

#![warn(missing_docs)]

pub mod bus;
pub mod coherence;
pub mod cpu;
pub mod cpuid;
pub mod decode;
pub mod dump;
pub mod exception;
mod exec;
pub mod facts;
pub mod flags;
pub mod hooks;
mod interrupt;
pub mod mmu;
pub mod paging;
pub mod seg;
pub mod state;
mod task;
pub mod vendor;

pub use bus::{is_platform_msr, msr_from_platform, msr_to_platform, Bus, BusAction, NullBus};
pub use coherence::CodeMap;
pub use cpu::{Cpu, CpuStats, RunExit};
pub use cpuid::{CpuidLeaf, CpuidModel};
pub use exception::{Exc, Vector};
pub use hooks::{SensitiveEvent, SensitiveKind};
pub use state::{CpuState, Segment, TableReg};
pub use vendor::Vendor;

/// Iterations a REP string instruction runs before it pauses (as at an
/// interrupt window: the instruction is fetched again when it resumes, so
/// bytes it wrote over itself take effect). Every engine pauses at the
/// same iteration.
pub const REP_CHUNK: u32 = 4096;
