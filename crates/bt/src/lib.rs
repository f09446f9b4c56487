//! The `bt` engine: binary translation of guest code into a translation
//! cache of host x86-64 code (`docs/binary-translation.md`).
//!
//! The engine owns a [`popek_cpu::Cpu`]: its state is the virtual CPU, and
//! its TLB, page walker, exception delivery and interpreter serve the
//! translated code. Guest code in flat 32-bit protected mode is cut into
//! translation units (TUs, [`translate`]) compiled into fragments (CCFs) of
//! host code kept in a W^X translation cache ([`cache`]). The dispatcher
//! ([`BtCore::run`]) looks the CCF for the current EIP up and calls it;
//! CCFs chain directly into CCFs of the same page, and through an inline
//! indirect-branch table (RET, indirect and cross-page transfers) into any
//! CCF whose page the TLB still maps the same way, for a bounded number of
//! transfers; the dispatcher delivers interrupts between dispatches and
//! runs every call-out instruction on the interpreter. Anything the translator does not handle runs on the
//! interpreter, so correctness never depends on coverage.
//!
//! Layout: `cache` is the executable memory; `translate` plans and
//! compiles TUs; `dispatch` finds and runs CCFs; `translating` turns a key
//! into a CCF and chains it; `invalidate` drops translations; `inspect`
//! has the statistics and dumps; this file holds the engine's state, its
//! factory and the [`Engine`] implementation.

pub mod cache;
mod dispatch;
mod inspect;
mod invalidate;
pub mod translate;
mod translating;

pub use inspect::BtStats;

use std::collections::{HashMap, HashSet};

use popek_cpu::{Bus, Cpu, CpuState, RunExit};
use popek_engine::bus::{vm_exit, MachineBus};
use popek_engine::factory::software_cpu_can_run;
use popek_engine::hypercall::HYPERCALL_PORT;
use popek_engine::{Engine, EngineError, VmExit};
use popek_engine::{EngineFactory, GuestMode, Inspect};
use popek_machine::Machine;

use cache::CodeCache;
use translate::{Ctx, Translation};

/// Size of the translation cache.
pub const CACHE_SIZE: usize = 32 << 20;

/// Most TU keys the translator remembers (translations and interpreter
/// entries in the map, heat counts of cold code): past it the map or the
/// counts start again empty, so that a guest running code at every address
/// of its memory cannot grow popek without bound (≈ 100 bytes a key).
pub const MAX_KEYS: usize = 1 << 16;

/// Translations of a page dropped this often (the page was written, or its
/// probes kept missing) make `bt` stop translating it: code that keeps
/// rewriting itself, or touches memory no probe can predict, runs faster
/// on the interpreter than retranslated over and over.
pub const VOLATILE_AFTER: u32 = 32;

/// Drops count towards [`VOLATILE_AFTER`] only when less than this many
/// instructions apart, and a page left to the interpreter is translated
/// again this many instructions after its last drop.
pub const VOLATILE_WINDOW: u64 = 50_000_000;

/// The bound of the interpreter's decoded-block cache under `bt`: it holds
/// only code that is not translated (cold code, call-outs).
pub const BLOCK_CACHE_BYTES: usize = 8 << 20;

/// Slow-path exits of one inline memory instruction after which it is
/// retranslated as a call-out (adaptive BT).
const ADAPT_MISSES: u32 = 8;

/// The window (guest instructions from an access's first slow-path exit)
/// in which `ADAPT_MISSES` exits make it a call-out.
const ADAPT_WINDOW: u64 = 1 << 20;

/// Guest instructions after which an adaptive call-out is translated
/// again (what made it miss, e.g. a TLB conflict with the code page while
/// a loop streamed through memory, may be gone).
/// The delay doubles each time the same site is made a call-out again.
const ADAPT_RETRY: u64 = 1 << 20;

/// Instructions the interpreter runs after an inline TLB miss (the TLB
/// fill, a fault or MMIO; running on avoids translating a fresh TU at each
/// following EIP when misses repeat).
const MISS_RUN: u64 = 64;

/// Dispatches to an untranslated key before it is translated (measured on
/// the Debian boot: 1 → 12.9 s, 4 → 9.5 s, 16 → 9.1 s, 64 → 8.9 s).
const HOT_AFTER: u32 = 64;

/// Dispatches to an untranslated key that suffice when its page has had
/// `HOT_AFTER` (a loop's EIPs share its dispatches: interpreter runs stop
/// anywhere in it, so each EIP alone would need `HOT_AFTER`).
const HOT_IN_HOT_PAGE: u32 = 4;

/// Instructions the interpreter runs for code not yet hot.
const COLD_RUN: u64 = 32;

/// Instructions the interpreter runs per dispatch in modes the translator
/// does not handle (real mode, V86, 16-bit or non-flat code).
const INTERP_CHUNK: u64 = 64;

/// A compiled code fragment: `extern "sysv64" fn(state) -> retired`
/// (see [`translate::compile`]).
type CcfFn = unsafe extern "sysv64" fn(*mut CpuState, u64, u64) -> CcfRet;

/// What a CCF returns (in RAX:RDX).
#[repr(C)]
struct CcfRet {
    /// Guest instructions retired, with the exit's marks and the chain
    /// counts (`translate::RETIRED_MASK`).
    retired: u64,
    /// The chain allowance left (unused).
    _allowance: u64,
}

// The chain allowance (`translate::ALLOWANCE_MAX`) bounds the time between
// the dispatcher's checks, not interrupt latency: a chain cannot make an
// interrupt deliverable without leaving. The interrupt line changes only
// between `run` budgets, when the machine advances time, or at I/O, which
// runs on the interpreter from inside the CCF (`interp1`), and the CCF
// leaves when an interrupt became due there; IF goes 0 → 1 only at STI or
// POPF, which leave too, or in the interpreter. The allowance counts
// instructions, not TUs: a budget of TUs had to assume `MAX_TU`
// instructions in each, so the dispatches of a 200,000-instruction slice
// shrank geometrically (≈ 260 per slice in Debian's shell loop).

/// What the dispatcher finds for one TU key.
#[derive(Clone, Copy)]
enum Entry {
    /// A CCF of `insns` guest instructions.
    Ccf {
        code: *const u8,
        /// Chained entry (registers already loaded).
        body: *const u8,
        bytes: u32,
        insns: u32,
        inline: u32,
    },
    /// Run `run` instructions on the interpreter (`first`: the first
    /// one's mnemonic, for the profile).
    Interp { run: u32, callout: bool, first: u32 },
}

/// TU key: guest-physical address, EIP (branch targets are absolute) and
/// the context bits: CPL (bits 0–1; inline sequences depend on it), data
/// segments usable inline (bit 2), FS/GS usable (bits 3–4), 16-bit code
/// (bit 5) and, for 16-bit code, CS base & 0xfff (bits 8–19: which EIPs
/// share a page). 32-bit code runs with a flat CS.
type Key = (u64, u32, u32);

/// Entries of the direct-mapped front of the TU map.
const FAST: usize = 4096;

/// The front-table slot of a key.
#[inline(always)]
fn fast_slot(k: &Key) -> usize {
    let x = k.0 ^ (k.0 >> 12) ^ ((k.1 as u64) << 7) ^ k.2 as u64;
    (x as usize) & (FAST - 1)
}

/// What a CCF's in-place call-out ([`interp1`]) works on; the dispatcher
/// points it at the CPU and the bus around each CCF call.
struct CallCtx {
    cpu: *mut Cpu,
    bus: Option<*mut (dyn Bus + 'static)>,
    /// What the interpreter's run returned, when it was not `Budget`.
    exit: Option<RunExit>,
    /// Call-outs made, and those after which the CCF went on.
    runs: u64,
    done: u64,
}

/// Runs the one instruction at EIP on the interpreter for a CCF
/// (`translate::Item::Interp1`): `retired` instructions of the running
/// chain come first (the CPU's count, and so its clock, must include
/// them), and the instruction must retire and leave EIP at `next` for the
/// CCF to go on (1); anything else (a fault, an interrupt delivered first,
/// a stop, code invalidated) sends the CCF back to the dispatcher (0).
///
/// # Safety
///
/// `cx` is the engine's `CallCtx`, set up by `BtCore::step` for the CCF
/// running now: its CPU and bus pointers are live and nothing else uses
/// them until the CCF returns.
unsafe extern "sysv64" fn interp1(cx: *mut CallCtx, next: u64, retired: u64) -> u64 {
    // SAFETY: see the function's contract.
    let cx = unsafe { &mut *cx };
    let Some(bus) = cx.bus else { return 0 };
    // SAFETY: as above; the CCF calling this holds no reference into the
    // CPU (it stored its registers into `CpuState` before the call and
    // reloads them after).
    let (cpu, bus) = unsafe { (&mut *cx.cpu, &mut *bus) };
    cx.runs += 1;
    cpu.icount += retired;
    let start = cpu.icount;
    let exit = cpu.run(bus, 1);
    // An interrupt the instruction made due (an OUT to the PIC, a device
    // register) is taken at the next boundary, as the interpreter does:
    // by the dispatcher.
    let ok = exit == RunExit::Budget
        && cpu.icount == start + 1
        && cpu.state().rip == next
        && !cpu.has_invalidated_pages()
        && !(cpu.state().rflags & popek_cpu::state::flags::IF as u64 != 0
            && bus.interrupt_pending())
        && (cpu.state().nmi_blocked || !bus.nmi_pending());
    if exit != RunExit::Budget {
        cx.exit = Some(exit);
    }
    // The CCF counts the instruction with its TU when it goes on.
    cpu.icount -= retired + ok as u64;
    cx.done += ok as u64;
    let _ = cpu.state_ptr(); // flags materialized for the CCF
    ok as u64
}

/// The translator and dispatcher around one software CPU, independent of
/// the machine (tests drive it with any [`Bus`]).
pub struct BtCore {
    cpu: Cpu,
    cache: CodeCache,
    map: HashMap<Key, Entry>,
    /// Dispatches that found no CCF, per key: code is translated only once
    /// it has been reached [`HOT_AFTER`] times, so run-once code (most of a
    /// kernel's boot) stays in the interpreter: translating a TU costs as
    /// much as interpreting thousands of instructions.
    cold: HashMap<Key, u32>,
    /// The same per physical page.
    cold_pages: HashMap<u64, u32>,
    /// Per physical page: how often its translations were dropped (it was
    /// written: self-modifying code; or retranslated for probes that keep
    /// missing); at [`VOLATILE_AFTER`] the page is interpreted from then on.
    smc_pages: HashMap<u64, (u32, u64)>,
    /// [`HOT_AFTER`], or `POPEK_BT_HOT_AFTER` (1 translates at once).
    hot_after: u32,
    /// Direct-mapped front of `map`: most dispatches end here.
    fast: Box<[Option<(Key, Entry)>]>,
    page_keys: HashMap<u64, Vec<Key>>,
    /// The instructions' EIPs of TUs that are traces (for `dump_ccf`).
    traces: HashMap<Key, Vec<u32>>,
    /// Chain sites (RX addresses of `jmp rel32` displacements) waiting for
    /// the CCF of a key.
    pending: HashMap<Key, Vec<u64>>,
    /// Slow-path exits per guest-physical instruction address.
    misses: HashMap<u64, (u32, u64)>,
    /// Instructions (guest-physical) retranslated as call-outs
    /// (with the instruction count when it may be translated again).
    forced: HashMap<u64, u64>,
    /// Instructions (guest-physical) at which no shared-probe group may
    /// start (`translate::share`: the span's probe kept missing).
    /// (With the instruction count from which they may share again, at
    /// their page's next translation.)
    nogroup: HashMap<u64, u64>,
    /// How often each head was unshared (the retry delay doubles).
    nogroup_times: HashMap<u64, u32>,
    /// How often each site was made a call-out (the retry delay doubles).
    forced_times: HashMap<u64, u32>,
    /// When `forced` is next swept for sites to retry (instruction count).
    next_retry: u64,
    /// The indirect-branch table CCFs probe at RET (see
    /// `translate::IbTable`): records of 8 u64, filled by the dispatcher
    /// for each CCF it enters, cleared with the CCF.
    ib: Vec<[u64; 8]>,
    /// The translation cache could not take the runtime code after a
    /// flush (the host refused the write): interpret everything.
    translation_off: bool,
    /// The fetch-entry generation when the records' generation fields were
    /// last cleared (it wraps after 2^23 changes: they are cleared every
    /// 2^21, so a stale one never matches again).
    ib_gen_epoch: u64,
    /// The shared entry and exit tail at the start of the cache
    /// (`translate::compile_runtime`; pushed again after each flush).
    runtime: translate::Runtime,
    /// PAUSE is left to the interpreter, where the bus may stop the vCPU
    /// (set when the machine has several vCPUs).
    pub pause_exits: bool,
    /// Emit the flag-free BMI2 TLB probe (default: when the host has
    /// BMI2; tests turn it off to cover the PUSHFQ/POPFQ probe).
    pub bmi2: bool,
    /// The access of the last slow-path exit (`translate::Probe::exit_info`).
    exit_info: Box<[u64; 3]>,
    /// For CCFs' in-place call-outs (stable address).
    call: Box<CallCtx>,
    /// Interpreter entries per first mnemonic (`POPEK_BT_PROFILE` set:
    /// printed to stderr when the engine is dropped).
    profile: Option<Vec<u64>>,
    /// With `POPEK_BT_PROFILE`: CCF returns to the dispatcher per
    /// (EIP, kind: 0 plain exit, 1 slow path, 2 indirect exit).
    exits: HashMap<(u32, u8), u64>,
    /// With `POPEK_BT_PROFILE`: `/tmp/perf-PID.map`, naming each CCF for
    /// `perf report`.
    perf_map: Option<std::fs::File>,
    /// Counters.
    pub stats: BtStats,
}

impl BtCore {
    /// Translates code once it has been dispatched to `n` times (1: at
    /// once, as the tests that hold `bt` to `interp` need).
    pub fn set_hot_after(&mut self, n: u32) {
        self.hot_after = n.max(1);
    }

    /// Wraps a CPU. Fails when the translation cache cannot be mapped.
    pub fn new(mut cpu: Cpu) -> std::io::Result<BtCore> {
        cpu.set_block_cache_limit(BLOCK_CACHE_BYTES);
        cpu.track_invalidations = true;
        let mut core = BtCore {
            cpu,
            cache: CodeCache::new(CACHE_SIZE)?,
            map: HashMap::new(),
            cold: HashMap::new(),
            cold_pages: HashMap::new(),
            smc_pages: HashMap::new(),
            hot_after: std::env::var("POPEK_BT_HOT_AFTER")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n >= 1)
                .unwrap_or(HOT_AFTER),
            fast: vec![None; FAST].into_boxed_slice(),
            page_keys: HashMap::new(),
            traces: HashMap::new(),
            pending: HashMap::new(),
            misses: HashMap::new(),
            forced: HashMap::new(),
            forced_times: HashMap::new(),
            nogroup: HashMap::new(),
            nogroup_times: HashMap::new(),
            next_retry: ADAPT_RETRY,
            ib: vec![[0u64; 8]; translate::IB_SLOTS],
            translation_off: false,
            ib_gen_epoch: 0,
            runtime: translate::Runtime { entry: 0, tail: 0 },
            bmi2: std::arch::is_x86_feature_detected!("bmi2"),
            pause_exits: false,
            exit_info: Box::new([0; 3]),
            call: Box::new(CallCtx {
                cpu: std::ptr::null_mut(),
                bus: None,
                exit: None,
                runs: 0,
                done: 0,
            }),
            perf_map: std::env::var_os("POPEK_BT_PROFILE").and_then(|_| {
                std::fs::File::create(format!("/tmp/perf-{}.map", std::process::id())).ok()
            }),
            exits: HashMap::new(),
            profile: std::env::var_os("POPEK_BT_PROFILE")
                .map(|_| vec![0; iced_x86::Code::values().len() * 16]),
            stats: BtStats::default(),
        };
        core.push_runtime();
        if core.translation_off {
            return Err(std::io::Error::other(
                "the translation cache refused its runtime code",
            ));
        }
        Ok(core)
    }

    /// Puts the shared entry and exit tail at the start of the (empty)
    /// cache. Should the host refuse the write, nothing is translated any
    /// more: the guest runs on the interpreter.
    fn push_runtime(&mut self) {
        let ip = self.cache.next_addr();
        let Ok((code, tail)) = translate::compile_runtime(ip, self.bmi2) else {
            self.translation_off = true;
            return;
        };
        let Some(at) = self.cache.push(&code) else {
            self.translation_off = true;
            return;
        };
        let at = at as u64;
        debug_assert_eq!(at, ip);
        self.runtime = translate::Runtime {
            entry: at,
            tail: at + tail,
        };
        if let Some(f) = self.perf_map.as_mut() {
            use std::io::Write as _;
            let _ = writeln!(f, "{at:x} {tail:x} bt_entry");
            let _ = writeln!(
                f,
                "{:x} {:x} bt_exit_tail",
                at + tail,
                code.len() as u64 - tail
            );
        }
    }

    /// The software CPU (state, configuration).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    /// Runs at most `budget` guest instructions, or until something needs
    /// the caller — the same contract and the same results as
    /// [`Cpu::run`].
    pub fn run(&mut self, bus: &mut dyn Bus, budget: u64) -> RunExit {
        self.cpu.set_running(true);
        let exit = self.run_slice(bus, budget);
        self.cpu.set_running(false);
        exit
    }

    fn run_slice(&mut self, bus: &mut dyn Bus, budget: u64) -> RunExit {
        self.cpu.prepare();
        self.drain_invalidations();
        if self.cpu.icount >= self.next_retry {
            self.retry_forced();
        }
        let end = self.cpu.icount.saturating_add(budget);
        // Dispatches that retire nothing (an exception loop, an interrupt
        // storm) count against the budget, as in `Cpu::run`, so `run`
        // always returns.
        // Events the interpreter delivers count as `Cpu::run` counts them
        // (so an exception loop gets as many deliveries as under interp);
        // a dispatch that neither retires nor delivers counts as one.
        let mut stalls = 0u64;
        loop {
            let now = self.cpu.icount;
            if now.saturating_add(stalls) >= end {
                return RunExit::Budget;
            }
            let events = self.cpu.events_delivered;
            let exit = self.step(bus, end - now - stalls);
            let delivered = self.cpu.events_delivered - events;
            stalls += delivered;
            if delivered == 0 && self.cpu.icount == now {
                stalls += 1;
            }
            if let Some(exit) = exit {
                return exit;
            }
        }
    }
}

impl Drop for BtCore {
    fn drop(&mut self) {
        if let Ok(list) = std::env::var("POPEK_BT_DUMP") {
            for a in list.split(',') {
                let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap_or(0);
                if let Some(d) = self.dump_ccf(a) {
                    eprintln!("{d}");
                }
            }
        }
        let Some(p) = &self.profile else { return };
        let mut x: Vec<_> = self.exits.iter().map(|(k, n)| (*n, *k)).collect();
        x.sort_by(|a, b| b.cmp(a));
        eprintln!(
            "popek-bt: CCF returns to the dispatcher by EIP (0 exit, 1 slow path, 2 indirect):"
        );
        for (n, (eip, kind)) in x.iter().take(30) {
            eprintln!("  {eip:#010x} {kind} {n}");
        }
        let mut v: Vec<(u64, usize)> = p
            .iter()
            .enumerate()
            .filter(|x| *x.1 > 0)
            .map(|(i, n)| (*n, i))
            .collect();
        v.sort_by(|a, b| b.cmp(a));
        eprintln!("popek-bt: interpreter entries by first instruction:");
        let codes: Vec<iced_x86::Code> = iced_x86::Code::values().collect();
        for (n, i) in v.iter().take(40) {
            let why = ["", " (adaptive)", " (non-flat data)", ""][i % 4];
            let seg = ["", " fs:", " gs:", " seg:"][i / 4 % 4];
            eprintln!("  {:?}{seg}{why} {n}", codes[i / 16]);
        }
    }
}

/// The `bt` engine.
pub struct Bt {
    core: BtCore,
}

/// What the VMM knows of `bt` before it builds one.
pub struct BtFactory;

/// The `bt` engine's factory, for the VMM's list.
pub static FACTORY: BtFactory = BtFactory;

impl EngineFactory for BtFactory {
    fn name(&self) -> &'static str {
        "bt"
    }
    fn describe(&self) -> String {
        "bt, the binary translator, runs every 32-bit guest (5–9× interp on Debian, ≈ 10× on compute loops)".into()
    }
    fn available(&self) -> Result<(), String> {
        if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
            Ok(())
        } else {
            Err("bt emits x86-64 host code: it needs an x86-64 Linux host".into())
        }
    }
    fn can_run(&self, mode: GuestMode) -> Result<(), String> {
        software_cpu_can_run(mode)
    }
    fn auto_rank(&self) -> Option<u8> {
        Some(1)
    }
    fn create(&self, machine: &Machine) -> Result<Box<dyn Engine>, EngineError> {
        Ok(Box::new(Bt::new(machine)?))
    }
}

impl Bt {
    /// An engine whose CPU uses the machine's RAM.
    pub fn new(machine: &Machine) -> Result<Bt, EngineError> {
        let mut cpu = Cpu::new(machine.ram().clone());
        cpu.hypercall_port = Some(HYPERCALL_PORT);
        let mut core = BtCore::new(cpu).map_err(|e| EngineError::Setup {
            engine: "bt",
            source: format!("cannot map the translation cache: {e}").into(),
        })?;
        core.pause_exits = machine.cpus() > 1;
        Ok(Bt { core })
    }

    /// The translator core, for tests and tools.
    pub fn core(&mut self) -> &mut BtCore {
        &mut self.core
    }
}

impl Engine for Bt {
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        "bt"
    }

    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError> {
        let mut bus = MachineBus::new(machine);
        Ok(vm_exit(self.core.run(&mut bus, budget)))
    }

    fn share_code(&mut self, map: std::sync::Arc<popek_cpu::CodeMap>, index: usize) -> bool {
        self.core.cpu.share_code_map(map, index);
        // PAUSE runs on the interpreter, where the bus may yield the host
        // CPU (pause-loop exiting in software).
        self.core.pause_exits = true;
        self.core.flush_all();
        true
    }

    fn run_on(&mut self, bus: &mut dyn Bus, budget: u64) -> Option<Result<VmExit, EngineError>> {
        Some(Ok(vm_exit(self.core.run(bus, budget))))
    }

    fn state(&mut self) -> CpuState {
        self.core.cpu.state().clone()
    }

    fn set_state(&mut self, state: CpuState) -> Result<(), EngineError> {
        if state.efer & (1 << 10) != 0 {
            return Err(EngineError::Unsupported {
                engine: "bt",
                reason: "long mode is not implemented by the software CPU yet".into(),
            });
        }
        // Translations follow the vendor profile (`Ctx::foreign_vendor`).
        let vendor_changed = state.vendor != self.core.cpu.vendor();
        self.core.cpu.set_state(state);
        if vendor_changed {
            self.core.flush_all();
        }
        Ok(())
    }

    fn instructions(&self) -> u64 {
        self.core.cpu.icount
    }

    fn set_instructions(&mut self, n: u64) {
        self.core.cpu.icount = n;
    }

    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        self.core.cpu.peek_linear(addr, buf)
    }

    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        self.core.cpu.poke_linear(addr, data)
    }

    fn inspect(&mut self) -> Option<&mut dyn Inspect> {
        Some(self)
    }
}
