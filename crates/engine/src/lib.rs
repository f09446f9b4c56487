//! The engine seam: what the VMM knows of every way of running a vCPU.
//!
//! Three traits: [`EngineFactory`] (the engine before there is a VM: is it
//! here, what can it run, build it), [`Engine`] (the running vCPU) and
//! [`Inspect`] (statistics, traces, audits, dumps an engine may offer).
//! Below every engine also live the software engines' bus ([`bus`]) and the
//! hypercall ABI ([`hypercall`]). `docs/architecture.md` draws the whole.
//!
//! An engine runs the guest CPU for a bounded budget, or until the VMM is
//! needed, and says why it returned with a [`VmExit`]. Software engines may
//! dispatch port I/O and MMIO to the machine's devices themselves (they are
//! handed the [`Machine`]); a hardware engine returns them as exits for the
//! VMM to dispatch. Either way the devices are the same objects.
//!
//! Between budgets the VMM advances the machine's timers and polls the
//! terminal; the engine consults the machine's interrupt line itself
//! (software engines at instruction-block boundaries, KVM through its
//! interrupt-window exits).
//!
//! The vCPU state crosses the seam as the engine-neutral
//! [`popek_cpu::CpuState`], so a VM can move between engines.

pub mod bus;
pub mod factory;
pub mod hypercall;

pub use factory::{EngineFactory, GuestMode};

use popek_cpu::CpuState;
use popek_machine::Machine;

/// Makes a vCPU's engine return from the guest soon (see
/// [`Engine::kicker`]).
pub type Kicker = Box<dyn Fn() + Send + Sync>;

/// Why an engine returned to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The budget is used up; nothing else happened.
    Budget,
    /// Port input the engine could not complete itself. The VMM calls
    /// [`Engine::complete_io_in`] with the value.
    IoIn {
        /// Port.
        port: u16,
        /// Size in bytes.
        size: u8,
    },
    /// Port output the engine could not complete itself.
    IoOut {
        /// Port.
        port: u16,
        /// Size in bytes.
        size: u8,
        /// Value.
        value: u32,
    },
    /// MMIO read the engine could not complete itself.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Size in bytes.
        size: u8,
    },
    /// MMIO write the engine could not complete itself.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Size in bytes.
        size: u8,
        /// Value.
        value: u64,
    },
    /// The vCPU executed HLT and waits for an interrupt.
    Halt,
    /// The vCPU shut down (triple fault).
    Shutdown {
        /// What happened, in words.
        reason: String,
    },
    /// A hypercall: the guest's registers hold the call (see
    /// `docs/hypercalls.md`). The VMM serves it through
    /// [`Engine::state`]/[`Engine::set_state`] and resumes.
    Hypercall,
    /// A device asked to stop the machine (power-off, reset, debug exit):
    /// see [`Machine::take_stop`].
    MachineStop,
}

/// An engine failure: something inside popek or the host, not the guest.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot run this guest state (e.g. a CPU mode it lacks).
    #[error("engine {engine} cannot run this guest: {reason}")]
    Unsupported {
        /// Engine name.
        engine: &'static str,
        /// Why.
        reason: String,
    },
    /// The engine does not exist in this build or on this host, or refuses
    /// this configuration (e.g. `hw` without a usable `/dev/kvm`).
    #[error("engine {engine} is not available: {reason}")]
    Unavailable {
        /// Engine name.
        engine: &'static str,
        /// Why.
        reason: String,
    },
    /// Building the engine failed (a host resource it needs).
    #[error("cannot set up engine {engine}")]
    Setup {
        /// Engine name.
        engine: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The engine cannot execute the vCPU's next instruction (a software
    /// KVM's emulator lacks it), and stopped before it with the state
    /// intact: another engine can go on from there. Reported like
    /// [`EngineError::Internal`] when no other engine is asked to.
    #[error("engine {engine} failed: {reason}")]
    CannotContinue {
        /// Engine name.
        engine: &'static str,
        /// What it could not do, with the vCPU's registers.
        reason: String,
    },
    /// An internal error while running the guest.
    #[error("engine {engine} failed: {reason}")]
    Internal {
        /// Engine name.
        engine: &'static str,
        /// What failed.
        reason: String,
    },
}

/// One row of an x86-gap audit (the `trap` engine's `popek audit`): a
/// sensitive but unprivileged instruction the deprivileged guest executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// The instruction (e.g. `POPF`, `MOV r, CS`).
    pub instruction: String,
    /// How many times it ran.
    pub count: u64,
    /// How many of those runs gave a result other than virtual ring 0 (or
    /// the guest's virtual CPL) would have.
    pub differed: u64,
    /// Guest linear address of its first run.
    pub first_address: u64,
    /// Guest linear address of its first differing run.
    pub first_differed_address: Option<u64>,
    /// The consequence, in words (of the first differing run, else of the
    /// first run).
    pub consequence: String,
}

/// A way of running one vCPU.
pub trait Engine {
    /// Short name: `interp`, `trap`, `bt`, `hw`.
    fn name(&self) -> &'static str;

    /// Runs the vCPU for at most `budget` guest instructions (or an
    /// equivalent slice of time for hardware engines), or until the VMM is
    /// needed.
    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError>;

    /// The vCPU's architectural state.
    fn state(&mut self) -> CpuState;

    /// Replaces the vCPU's architectural state.
    fn set_state(&mut self, state: CpuState) -> Result<(), EngineError>;

    /// Guest instructions retired so far (an estimate for hardware engines).
    fn instructions(&self) -> u64;

    /// Sets the count of guest instructions retired so far: a VM restored
    /// from a snapshot, or moved from another engine, goes on counting
    /// from where it was (the virtual clock runs on this count).
    fn set_instructions(&mut self, n: u64);

    /// Completes an [`VmExit::IoIn`] or [`VmExit::MmioRead`] exit with its
    /// value. Engines that never return those exits ignore it.
    fn complete_io_in(&mut self, _value: u64) {}

    /// Reads guest memory at a linear address as the vCPU sees it (for
    /// reports), or `None` where it is unmapped.
    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()>;

    /// Writes guest memory at a linear address as the vCPU sees it (for
    /// VMM services such as hypercalls), or `None` where it is unmapped.
    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()>;

    /// Drops the engine's cached translation of one guest-linear page (the
    /// `HC_INVLPG` hypercall). Engines whose TLB is flushed by
    /// [`Engine::set_state`] anyway ignore it.
    fn invalidate_page(&mut self, _lin: u64) {}

    /// Shares guest code with engines running the VM's other vCPUs on
    /// other host threads, as CPU `index` of `map` (see
    /// `popek_cpu::coherence`). False for an engine that cannot run beside
    /// others on its own thread.
    fn share_code(&mut self, _map: std::sync::Arc<popek_cpu::CodeMap>, _index: usize) -> bool {
        false
    }

    /// Runs like [`Engine::run`] against `bus` (a vCPU on its own host
    /// thread reaching a machine shared with others), for engines that
    /// [`Engine::share_code`]; `None` for the others.
    fn run_on(
        &mut self,
        _bus: &mut dyn popek_cpu::Bus,
        _budget: u64,
    ) -> Option<Result<VmExit, EngineError>> {
        None
    }

    /// For an engine that blocks while the guest runs (`hw` in `KVM_RUN`):
    /// what makes it return now to take an interrupt another thread raised.
    /// Made on the vCPU's thread; `None` for engines that poll their lines.
    fn kicker(&self) -> Option<Kicker> {
        None
    }

    /// An engine for vCPU `index` of the same VM, to run on another host
    /// thread, for engines whose vCPUs must be made by the first (`hw`:
    /// another KVM vCPU of the same KVM VM); `None` where every vCPU's
    /// engine comes from the factory.
    fn vcpu_engine(
        &mut self,
        _index: usize,
    ) -> Option<Result<Box<dyn Engine + Send>, EngineError>> {
        None
    }

    /// What the engine offers for inspection (statistics, traces, audits,
    /// translation dumps), or `None`.
    fn inspect(&mut self) -> Option<&mut dyn Inspect> {
        None
    }

    /// The concrete engine, for tools that need what only it offers (the
    /// fuzzer's knobs and checks). `None` where nothing is offered.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// What an engine may offer to people looking inside it: statistics for
/// `--stats`, the trap trace, the x86-gap audit, translation dumps, and
/// the watchdog's hint. None of it changes what the guest sees.
pub trait Inspect {
    /// The translation the engine keeps for the guest code at guest-physical
    /// `phys`, disassembled (guest instructions, then the host code), for
    /// `popek run --dump-ccf`. Engines that translate nothing answer `None`.
    fn dump_translation(&mut self, _phys: u64) -> Option<String> {
        None
    }

    /// The x86-gap audit, for engines that deprivilege the guest (`trap`).
    fn audit(&self) -> Option<Vec<AuditRow>> {
        None
    }

    /// What the engine knows about why the guest stopped making progress
    /// (e.g. the gap instruction that left the virtual IF clear), for the
    /// watchdog's report.
    fn stall_hint(&mut self) -> Option<String> {
        None
    }

    /// Prints each trap as it is handled (`popek run --trace traps`).
    /// Engines without traps ignore it.
    fn set_trace_traps(&mut self, _on: bool) {}

    /// Counts keyed by names only known at run time (the `trap` engine's
    /// traps by kind), for `--stats`.
    fn detail_stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// Engine statistics as `(name, value)` pairs, for `--stats`.
    fn stats(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }

    /// [`Inspect::stats`] followed by [`Inspect::detail_stats`].
    fn all_stats(&self) -> Vec<(String, u64)> {
        self.stats()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(self.detail_stats())
            .collect()
    }
}

/// An error with every cause after it (`a: b: c`), on one line, as popek
/// prints bad input and set-up failures. A cause whose text the message
/// already ends with (a transparent wrapper) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s = format!("{s}: {text}");
        }
        cur = c.source();
    }
    s
}
