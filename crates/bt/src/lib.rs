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
//! Layout: `cache.rs` is the executable memory; `translate.rs` classifies
//! and compiles; this file is the dispatcher, invalidation, statistics and
//! the [`Engine`] implementation.

pub mod cache;
pub mod translate;

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
        ident: u32,
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

/// The engine's counters (see [`BtCore::stats`]).
#[derive(Clone, Debug, Default)]
pub struct BtStats {
    /// TUs compiled into CCFs.
    pub tus: u64,
    /// Bytes of host code emitted.
    pub ccf_bytes: u64,
    /// Dispatcher lookups.
    pub lookups: u64,
    /// Interpreter runs of code not yet hot enough to translate.
    pub cold_runs: u64,
    /// Lookups that found a translation.
    pub hits: u64,
    /// CCF executions.
    pub ccf_runs: u64,
    /// Static counts: instructions translated ident / inline; call-out
    /// entries (designed / fallback).
    pub static_ident: u64,
    /// See `static_ident`.
    pub static_inline: u64,
    /// See `static_ident`.
    pub static_callout: u64,
    /// See `static_ident`.
    pub static_fallback: u64,
    /// Dynamic counts: guest instructions retired by ident / inline code.
    pub dyn_ident: u64,
    /// See `dyn_ident`.
    pub dyn_inline: u64,
    /// Interpreter runs started at a designed call-out / a fallback.
    pub callouts: u64,
    /// See `callouts`.
    pub fallbacks: u64,
    /// Guest instructions retired by the interpreter (call-outs, fallbacks,
    /// untranslated modes, interrupt windows).
    pub dyn_interp: u64,
    /// Inline TLB probes that missed (the instruction ran on the
    /// interpreter).
    pub tlb_misses: u64,
    /// Chained transfers between CCFs (no dispatcher in between).
    pub chains: u64,
    /// Chain links patched.
    pub links: u64,
    /// Instructions retranslated as call-outs because they kept missing.
    pub adapted: u64,
    /// TUs the assembler refused (interpreted instead; expected 0).
    pub compile_errors: u64,
    /// Code pages whose translations were dropped.
    pub invalidations: u64,
    /// Whole-cache flushes (cache full or code cache flushed).
    pub flushes: u64,
    /// Times the heat counts of cold code started again ([`MAX_KEYS`]).
    pub cold_resets: u64,
    /// Indirect transfers (RET) that found their target in the inline
    /// indirect-branch table (counted by the CCFs: `translate::IB_HIT`).
    pub ib_hits: u64,
    /// Indirect transfers that returned to the dispatcher (not in the
    /// table, TLB changed, or the chain budget ran out).
    pub ib_exits: u64,
    /// Indirect-branch table records written by the dispatcher.
    pub ib_fills: u64,
    /// Memory instructions translated without a probe of their own (they
    /// share an earlier one's: `translate::share`), static.
    pub shared_probes: u64,
    /// Host time spent translating (planning, compiling, linking), ns.
    pub translate_ns: u64,
    /// Shared probes' groups retranslated without sharing (their span kept
    /// missing).
    pub unshared: u64,
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
            && bus.interrupt_pending());
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

    /// One dispatch: one CCF (and the CCFs it chains into), or one
    /// interpreter run; at most `remaining` instructions. `Some(exit)` when
    /// the caller must see something.
    pub fn step(&mut self, bus: &mut dyn Bus, remaining: u64) -> Option<RunExit> {
        use popek_cpu::state::{cr, flags, seg};
        let st = self.cpu.state();
        let cs = &st.seg[seg::CS];
        let plain = st.rflags & (flags::VM | flags::TF) as u64 == 0;
        let code32 = plain
            && st.cr0 & cr::CR0_PE != 0
            && cs.big()
            && cs.limit == 0xffff_ffff
            && cs.base == 0;
        // 16-bit code (real mode or a 16-bit code segment) whose limit
        // every IP satisfies; the 16-bit probe needs BMI2.
        let code16 = !code32 && plain && self.bmi2 && !cs.big() && cs.limit >= 0xffff;
        if !code32 && !code16 {
            return self.interp(bus, remaining.min(INTERP_CHUNK), None);
        }
        // Present, writable, expand-up data with at least this limit.
        let usable = |i: usize, limit: u32| {
            let s = &st.seg[i];
            s.limit >= limit
                && s.present()
                && s.attr & popek_cpu::state::attr::S != 0
                && s.typ() & 0b1110 == 0b0010
        };
        let (data_ok, fs_gs, cs_lo) = if code16 {
            let ok = [seg::DS, seg::ES, seg::SS]
                .iter()
                .all(|&i| usable(i, 0xffff))
                && !st.seg[seg::SS].big();
            let fs_gs = usable(seg::FS, 0xffff) as u32 | (usable(seg::GS, 0xffff) as u32) << 1;
            (ok, fs_gs, cs.base as u32 & 0xfff)
        } else {
            let ok = [seg::DS, seg::ES, seg::SS].iter().all(|&i| {
                let s = &st.seg[i];
                s.base == 0 && s.limit == 0xffff_ffff && s.present() && s.typ() & 0b1110 == 0b0010
            }) && st.seg[seg::SS].big();
            // FS and GS usable by the inline probe: a 4 GiB limit (their
            // base is read at run time).
            let fs_gs = if self.bmi2 {
                usable(seg::FS, 0xffff_ffff) as u32 | (usable(seg::GS, 0xffff_ffff) as u32) << 1
            } else {
                0
            };
            (ok, fs_gs, 0)
        };
        if st.halted
            || st.interrupt_shadow
            || (st.rflags & flags::IF as u64 != 0 && bus.interrupt_pending())
        {
            // The interpreter delivers the interrupt (or wakes from HLT,
            // or runs the one instruction in the shadow).
            return self.interp(bus, 1, None);
        }
        let eip = st.rip as u32;
        let Some(phys) = self.cpu.fetch_phys(bus) else {
            return self.interp(bus, 1, None); // raises the fetch fault
        };
        let key = (
            phys,
            eip,
            self.cpu.cpl() as u32
                | (data_ok as u32) << 2
                | fs_gs << 3
                | (code16 as u32) << 5
                | cs_lo << 8,
        );
        self.stats.lookups += 1;
        let slot = fast_slot(&key);
        let entry = match self.fast[slot] {
            Some((k, e)) if k == key => {
                self.stats.hits += 1;
                e
            }
            _ => match self.map.get(&key) {
                Some(e) => {
                    self.stats.hits += 1;
                    let e = *e;
                    self.fast[slot] = Some((key, e));
                    e
                }
                None if {
                    if self.cold.len() >= MAX_KEYS || self.cold_pages.len() >= MAX_KEYS {
                        self.cold = HashMap::new();
                        self.cold_pages = HashMap::new();
                        self.stats.cold_resets += 1;
                    }
                    let n = self.cold.entry(key).or_insert(0);
                    *n += 1;
                    let n = *n;
                    let p = self.cold_pages.entry(phys >> 12).or_insert(0);
                    *p += 1;
                    n < self.hot_after && (n < HOT_IN_HOT_PAGE || *p < self.hot_after)
                        || self.smc_pages.get(&(phys >> 12)).is_some_and(|&(c, at)| {
                            c >= VOLATILE_AFTER && self.cpu.icount - at < VOLATILE_WINDOW
                        })
                } =>
                {
                    self.stats.cold_runs += 1;
                    return self.interp(bus, remaining.min(COLD_RUN), None);
                }
                None => match self.translate(key) {
                    Some(e) => {
                        self.fast[slot] = Some((key, e));
                        e
                    }
                    None => return self.interp(bus, 1, None),
                },
            },
        };
        if let Entry::Ccf { body, .. } = entry {
            let gen = self.cpu.tlb_fetch_gen();
            if gen.wrapping_sub(self.ib_gen_epoch) >= 1 << 62 {
                self.ib.iter_mut().for_each(|r| r[6] = 0);
                self.ib_gen_epoch = gen;
            }
            if !code16 {
                self.ib_fill(key, body as u64);
            }
        }
        match entry {
            Entry::Ccf {
                code,
                insns,
                ident,
                inline,
                ..
            } => {
                if insns as u64 > remaining {
                    return self.interp(bus, remaining, None);
                }
                let st = self.cpu.state_ptr();
                let allowance = remaining.min(translate::ALLOWANCE_MAX);
                // In-place call-outs reach the CPU and the bus through
                // `call` (stored here, before the CCF runs).
                self.call.cpu = &mut self.cpu;
                let bus_ptr: *mut (dyn Bus + '_) = &mut *bus;
                // SAFETY: only the lifetime is erased; the pointer is
                // cleared when the CCF returns, before `bus` goes away.
                self.call.bus = Some(unsafe {
                    std::mem::transmute::<*mut (dyn Bus + '_), *mut (dyn Bus + 'static)>(bus_ptr)
                });
                let (runs0, done0) = (self.call.runs, self.call.done);
                // SAFETY: `runtime.entry` is the shared entry compiled by
                // `translate::compile_runtime` at the start of the cache
                // (pushed again after every reset); it saves the
                // callee-saved registers, loads the guest state and jumps
                // to `code`, the body of a CCF compiled by
                // `translate::compile_with` into the live part of the RX cache
                // (entries are dropped before the cache is reset, and chain
                // sites only point at CCFs of the same page, dropped
                // together). It follows the sysv64 ABI (saves RBX, RBP and
                // R12–R15, leaves RSP and DF as found, calls only
                // `interp1` with `call`, set up above) and accesses only
                // the `CpuState` behind `st`, which
                // `state_ptr` hands out with the flags materialized, the
                // fields it permits, and guest RAM through the CPU's TLB
                // entries (host pointers into the live guest mapping).
                // `insns` ≤ `allowance` ≤ `remaining`; a CCF chains only
                // while the allowance covers `MAX_TU` more instructions, so
                // the chain retires at most `remaining`.
                let ret = unsafe {
                    let f = std::mem::transmute::<u64, CcfFn>(self.runtime.entry);
                    f(st, allowance, code as u64)
                };
                self.call.bus = None;
                let chains = (ret.retired & translate::CHAIN_MASK) / translate::CHAIN_ONE;
                self.stats.ccf_runs += 1 + chains;
                self.stats.chains += chains;
                let n = ret.retired & translate::RETIRED_MASK;
                self.stats.ib_hits += ret.retired >> translate::IB_HIT_SHIFT;
                self.cpu.icount += n;
                let slow = ret.retired & translate::SLOW_PATH != 0;
                let inl = if !slow || chains > 0 {
                    inline as u64
                } else {
                    0
                };
                self.stats.dyn_inline += inl;
                // In-place call-outs: counted as call-outs (those that went
                // on are in `n`; the others the interpreter counted).
                let (runs, done) = (self.call.runs - runs0, self.call.done - done0);
                self.stats.callouts += runs;
                self.stats.dyn_interp += runs;
                self.stats.dyn_ident += n - (inl + done).min(n);
                let _ = (insns, ident);
                if let Some(x) = self.call.exit.take() {
                    return Some(x);
                }
                if self.cpu.has_invalidated_pages() {
                    self.drain_invalidations();
                }
                if ret.retired & translate::IB_EXIT != 0 {
                    self.stats.ib_exits += 1;
                }
                if self.profile.is_some() {
                    let kind = if slow {
                        1
                    } else {
                        (ret.retired & translate::IB_EXIT != 0) as u8 * 2
                    };
                    *self
                        .exits
                        .entry((self.cpu.state().rip as u32, kind))
                        .or_default() += 1;
                }
                if !slow {
                    return None;
                }
                // Left early: an inline TLB probe missed before the
                // instruction at EIP (maybe in another CCF reached through
                // a chain), which the interpreter now runs.
                self.stats.tlb_misses += 1;
                let Some(at) = self.cpu.fetch_phys(bus) else {
                    return self.interp(bus, 1, None);
                };
                let info = [self.exit_info[0], self.exit_info[1]];
                let set = (self.cpu.cpl() == 3) as usize;
                let exit = self.interp(bus, (remaining - n).min(MISS_RUN), None);
                if self.tlb_would_hit(set, info) {
                    // A plain TLB miss (after a CR3 load, a conflict),
                    // filled now: no reason to interpret the access.
                    return exit;
                }
                // Misses count within a window of instructions.
                let now = self.cpu.icount;
                let (count, since) = self.misses.entry(at).or_insert((0, now));
                if now - *since > ADAPT_WINDOW {
                    (*count, *since) = (0, now);
                }
                *count += 1;
                if info[1] & translate::SHARED != 0 {
                    // A shared probe's span that does not hit even now:
                    // when it crosses a page (the same stack frame will
                    // again), or after `ADAPT_MISSES` such misses (one
                    // access keeps missing), retranslate without that
                    // group; its instructions then probe (and adapt) one
                    // by one. (Unsharing at the first miss dropped pages
                    // thousands of times in a Debian boot.)
                    let (lin, size) = (info[0], info[1] >> 16);
                    let crosses = lin >> 32 != 0 || (lin & 0xfff) + size > 0x1000;
                    if crosses || *count >= ADAPT_MISSES {
                        self.misses.remove(&at);
                        // A span that crossed a page stays unshared: where
                        // a frame lies depends on the stack's alignment
                        // (ASLR) and the call depth, which repeat; sharing
                        // again after a delay made some runs drop and
                        // retranslate pages thousands of times (the
                        // benchmark's shell loop 16.5 → 21–24 s). Other
                        // misses retry after a delay that doubles.
                        let until = if crosses {
                            u64::MAX
                        } else {
                            let times = self.nogroup_times.entry(at).or_insert(0);
                            *times += 1;
                            now + (ADAPT_RETRY << (*times - 1).min(10))
                        };
                        self.nogroup.insert(at, until);
                        self.stats.unshared += 1;
                        self.drop_page(at >> 12);
                    }
                    return exit;
                }
                if *count >= ADAPT_MISSES {
                    // Adaptive BT: this access keeps missing (MMIO, a code
                    // page, page-crossing): retranslate the page with it as
                    // a call-out.
                    if self.profile.is_some() {
                        eprintln!(
                            "popek-bt: adaptive call-out at phys {at:#x} eip {:#x}: lin {:#x} size/write {:#x} cpl {}",
                            self.cpu.state().rip, info[0], info[1], set
                        );
                    }
                    let times = self.forced_times.entry(at).or_insert(0);
                    let delay = ADAPT_RETRY << (*times).min(10);
                    *times += 1;
                    self.forced.insert(at, self.cpu.icount + delay);
                    self.misses.remove(&at);
                    self.drop_page(at >> 12);
                    self.stats.adapted += 1;
                }
                exit
            }
            Entry::Interp {
                run,
                callout,
                first,
            } => {
                if let Some(p) = self.profile.as_mut() {
                    p[first as usize] += 1;
                }
                self.interp(bus, remaining.min(run as u64), Some(callout))
            }
        }
    }

    /// Translates adaptive call-outs whose delay is over again (their
    /// pages are dropped; those that keep missing come back, later).
    fn retry_forced(&mut self) {
        let now = self.cpu.icount;
        self.next_retry = now + ADAPT_RETRY;
        let old: Vec<u64> = self
            .forced
            .iter()
            .filter(|&(_, &t)| now >= t)
            .map(|(&a, _)| a)
            .collect();
        self.nogroup.retain(|_, t| now < *t);
        let mut pages = HashSet::new();
        for a in old {
            self.forced.remove(&a);
            pages.insert(a >> 12);
        }
        for p in pages {
            self.drop_page(p);
        }
    }

    /// Records the CCF body of `key` in the indirect-branch table, with
    /// what a CCF must check before entering it: the TLB entry of the
    /// EIP's page (in the key's privilege set) must still map it, readable,
    /// to the key's physical page.
    fn ib_fill(&mut self, key: Key, body: u64) {
        let (phys, eip, ctx) = key;
        let r = &mut self.ib[eip as usize & (translate::IB_SLOTS - 1)];
        // Only 32-bit code uses the table: its context fits in bits 32–39
        // (the generation is added in bits 41 and up).
        debug_assert!(ctx < 1 << 8);
        let k = eip as u64 | (ctx as u64) << 32 | 1 << 40;
        // (`fetch_phys` just checked the TLB: the record holds at this
        // fetch-entry generation.)
        let gen = self.cpu.tlb_fetch_gen();
        if r[0] == k && r[4] == body {
            r[6] = k.wrapping_add(gen);
            return;
        }
        let l = self.cpu.tlb_layout();
        // The target must still be fetchable: check the instruction-fetch
        // entry of its page.
        let set = l.fetch_sets + if ctx & 3 == 3 { l.set_stride } else { 0 };
        let idx = (eip as usize >> 12) & (l.entries - 1);
        *r = [
            k,
            (l.base as usize + set + idx * l.entry_size) as u64,
            (eip & !0xfff) as u64 | 1,
            self.cpu.ram().host_ptr() as u64 + (phys & !0xfff),
            body,
            translate::IB_HIT,
            k.wrapping_add(gen),
            0,
        ];
        self.stats.ib_fills += 1;
    }

    /// True when the TLB (privilege set `set`) now lets the access of a
    /// slow-path exit (`exit_info`) go to host memory: the miss was a
    /// plain TLB miss.
    fn tlb_would_hit(&self, set: usize, info: [u64; 2]) -> bool {
        let size = if info[1] & translate::SHARED != 0 {
            info[1] >> 16
        } else {
            info[1] & 0xff
        };
        let (lin, write) = (info[0], info[1] & 0x100 != 0);
        if lin >> 32 != 0 || (lin & 0xfff) + size > 0x1000 {
            return false;
        }
        let l = self.cpu.tlb_layout();
        let idx = (lin as usize >> 12) & (l.entries - 1);
        let off =
            set * l.set_stride + idx * l.entry_size + if write { l.write_tag } else { l.read_tag };
        [0, l.way_stride].iter().any(|&way| {
            // SAFETY: `tlb_layout` describes the CPU's live, boxed TLB; the
            // offset stays inside it (set < 2, way 0 or 1, idx < entries, a
            // u32 tag field of an entry), and nothing writes it during this
            // read.
            let tag = unsafe { std::ptr::read_unaligned(l.base.add(off + way) as *const u32) };
            tag == (lin as u32 & !0xfff) | 1
        })
    }

    /// Indirect-branch table hits so far.
    fn ib_hits(&self) -> u64 {
        self.stats.ib_hits
    }

    /// Runs `n` instructions on the interpreter.
    fn interp(&mut self, bus: &mut dyn Bus, n: u64, callout: Option<bool>) -> Option<RunExit> {
        match callout {
            Some(true) => self.stats.callouts += 1,
            Some(false) => self.stats.fallbacks += 1,
            None => {}
        }
        let before = self.cpu.icount;
        let exit = self.cpu.run(bus, n);
        self.stats.dyn_interp += self.cpu.icount - before;
        if self.cpu.has_invalidated_pages() {
            self.drain_invalidations();
        }
        (exit != RunExit::Budget).then_some(exit)
    }

    /// Translates the code at `key` and caches the result (timed).
    fn translate(&mut self, key: Key) -> Option<Entry> {
        let t0 = std::time::Instant::now();
        let e = self.translate_untimed(key);
        self.stats.translate_ns += t0.elapsed().as_nanos() as u64;
        e
    }

    fn translate_untimed(&mut self, key: Key) -> Option<Entry> {
        if self.translation_off {
            return None;
        }
        if self.map.len() >= MAX_KEYS {
            // As when the code cache is full (see `MAX_KEYS`).
            self.flush_all();
        }
        let (phys, eip, cpl) = key;
        let code16 = cpl & 0x20 != 0;
        let cs_lo = cpl >> 8;
        let page_end = (phys | 0xfff) + 1;
        if page_end > self.cpu.ram().size() {
            return None; // code outside RAM (MMIO): interpret
        }
        // 32-bit code: the whole page (a trace may jump back in it), the TU
        // at `start`; 16-bit code from EIP on.
        let start = if code16 { 0 } else { (phys & 0xfff) as usize };
        let mut code = vec![0u8; (page_end - phys) as usize + start];
        self.cpu.ram().read(phys - start as u64, &mut code).ok()?;
        if !code16 {
            // The first bytes of the next page, when mapped, for an
            // instruction straddling the page end (`translate::plan` has
            // the interpreter run it: these bytes only give its length).
            let next = (eip as u64 | 0xfff) + 1;
            let mut more = [0u8; 15];
            if next >> 32 == 0 && self.cpu.peek_linear(next, &mut more).is_some() {
                code.extend_from_slice(&more);
            }
        }
        let ctx = Ctx {
            cpl: (cpl & 3) as u8,
            inline_sensitive: !self.cpu.report_sensitive,
            flat_data: cpl & 4 != 0,
            fs_gs: ((cpl >> 3) & 3) as u8,
            code16,
            cs_lo,
            interp1: !code16,
            foreign_vendor: self.cpu.vendor() != popek_cpu::Vendor::host(),
            amd: self.cpu.vendor() == popek_cpu::Vendor::Amd,
        };
        let l = self.cpu.tlb_layout();
        let probe = translate::Probe {
            set_base: l.base as u64 + if cpl & 3 == 3 { l.set_stride as u64 } else { 0 },
            entries: l.entries as u32,
            entry_shift: l.entry_size.trailing_zeros(),
            way_stride: l.way_stride as i32,
            read_tag: l.read_tag as i32,
            write_tag: l.write_tag as i32,
            host: l.host as i32,
            exit_info: self.exit_info.as_ptr() as u64,
            bmi2: self.bmi2,
            amd_div_flags: self.cpu.vendor() == popek_cpu::Vendor::Amd,
            interp1_fn: interp1 as *const () as u64,
            interp1_ctx: &*self.call as *const CallCtx as u64,
        };
        debug_assert!(l.entry_size.is_power_of_two() && l.entries.is_power_of_two());
        let forced = |e: u32| {
            self.forced
                .contains_key(&(phys + e.wrapping_sub(eip) as u64))
        };
        let ng: Vec<u64> = (self.nogroup.keys())
            .filter(|&&a| a >> 12 == phys >> 12)
            .copied()
            .collect();
        let nogroup = |e: u32| ng.contains(&(phys + e.wrapping_sub(eip) as u64));
        let entry = match translate::plan_at(&code, start, eip, ctx, &forced) {
            Translation::Interp {
                run,
                callouts,
                first,
            } => {
                let callout = callouts > 0;
                if callout {
                    self.stats.static_callout += 1;
                } else {
                    self.stats.static_fallback += 1;
                }
                Entry::Interp {
                    run,
                    callout,
                    first,
                }
            }
            Translation::Tu(plan) => {
                let page = (cs_lo + eip) >> 12;
                let ib = translate::IbTable {
                    base: self.ib.as_ptr() as u64,
                    key_bits: (cpl as u64) << 32 | 1 << 40,
                    gen: l.base as u64 + l.fetch_gen as u64,
                };
                // 16-bit code: no indirect-branch table (its records know
                // EIPs, not CS bases).
                let ib = (!code16).then_some(&ib);
                let compiled = translate::compile_with(
                    &plan,
                    self.cache.next_addr(),
                    &probe,
                    page,
                    ib,
                    &nogroup,
                    Some(&self.runtime),
                );
                let Ok(mut host) = compiled else {
                    // Never expected (each instruction was test-encoded):
                    // interpret this code from now on.
                    if self.profile.is_some() {
                        eprintln!("popek-bt: compile error at {eip:#x}: {:?}", compiled.err());
                    }
                    self.stats.compile_errors += 1;
                    let e = Entry::Interp {
                        run: 1,
                        callout: false,
                        first: 0,
                    };
                    if self.map.insert(key, e).is_none() {
                        self.page_keys.entry(phys >> 12).or_default().push(key);
                    }
                    return Some(e);
                };
                let mut at = self.cache.push(&host.code);
                if at.is_none() {
                    self.flush_all();
                    host = translate::compile_with(
                        &plan,
                        self.cache.next_addr(),
                        &probe,
                        page,
                        ib,
                        &nogroup,
                        Some(&self.runtime),
                    )
                    .ok()?;
                    at = self.cache.push(&host.code);
                }
                let at = at?;
                self.stats.tus += 1;
                self.stats.shared_probes += host.shared as u64;
                self.stats.ccf_bytes += host.code.len() as u64;
                if let Some(f) = self.perf_map.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(
                        f,
                        "{:x} {:x} tu_{eip:08x}_p{phys:x}_c{cpl}_n{}",
                        at as u64,
                        host.code.len(),
                        plan.insns
                    );
                }
                // Chaining: link this CCF's exits to CCFs of the same page
                // that exist, and have future ones link them.
                let body = at as u64 + host.body;
                for &(off, target) in &host.sites {
                    let site = at as u64 + off;
                    let tkey = (
                        (phys & !0xfff) | ((cs_lo + target) & 0xfff) as u64,
                        target,
                        cpl,
                    );
                    match self.map.get(&tkey) {
                        Some(Entry::Ccf { body: tb, .. }) => {
                            let tb = *tb as u64;
                            self.link(site, tb);
                        }
                        _ => self.pending.entry(tkey).or_default().push(site),
                    }
                }
                if let Some(sites) = self.pending.remove(&key) {
                    for site in sites {
                        self.link(site, body);
                    }
                }
                if plan.traced {
                    self.traces.insert(key, plan.eips.clone());
                }
                self.stats.static_ident += plan.ident as u64;
                self.stats.static_callout += plan.callouts as u64;
                self.stats.static_inline += plan.inline as u64;
                Entry::Ccf {
                    code: at,
                    body: body as *const u8,
                    bytes: host.code.len() as u32,
                    insns: plan.insns,
                    ident: plan.ident,
                    inline: plan.inline,
                }
            }
        };
        // Stores to this page now take the CPU's slow path, which reports
        // the page through `take_invalidated_pages`.
        self.cpu.mark_translated_page(phys >> 12);
        if self.map.insert(key, entry).is_none() {
            self.page_keys.entry(phys >> 12).or_default().push(key);
        }
        Some(entry)
    }

    /// Points a chain site at a CCF body.
    fn link(&mut self, site: u64, body: u64) {
        let mut rel = [0u8; 4];
        translate::patch(&mut rel, site, body);
        if self.cache.write_at(site, &rel) {
            self.stats.links += 1;
        }
    }

    /// Forgets every translation of a physical page (with the chain links
    /// between them: chains never leave a page).
    /// Counts the drop against the page (see [`VOLATILE_AFTER`]).
    fn drop_page(&mut self, page: u64) {
        if let Some(keys) = self.page_keys.remove(&page) {
            self.stats.invalidations += 1;
            for k in keys {
                self.drop_key(k);
            }
            if self.smc_pages.len() >= MAX_KEYS {
                self.smc_pages = HashMap::new();
            }
            let now = self.cpu.icount;
            let e = self.smc_pages.entry(page).or_insert((0, now));
            // Drops long apart (boot-time patching) do not add up.
            *e = if now - e.1 > VOLATILE_WINDOW {
                (1, now)
            } else {
                (e.0.saturating_add(1), now)
            };
        }
        self.pending.retain(|k, _| k.0 >> 12 != page);
    }

    /// Forgets one translation (only with its whole page: see `drop_page`).
    fn drop_key(&mut self, k: Key) {
        self.traces.remove(&k);
        if let Some(Entry::Ccf { body, .. }) = self.map.remove(&k) {
            let r = &mut self.ib[k.1 as usize & (translate::IB_SLOTS - 1)];
            if r[4] == body as u64 {
                *r = [0; 8];
            }
        }
        let slot = fast_slot(&k);
        if matches!(self.fast[slot], Some((fk, _)) if fk == k) {
            self.fast[slot] = None;
        }
    }

    /// Drops the translations of code pages the CPU saw written.
    fn drain_invalidations(&mut self) {
        for page in self.cpu.take_invalidated_pages() {
            if page == u64::MAX {
                self.flush_all();
                continue;
            }
            self.drop_page(page);
            self.forced.retain(|a, _| a >> 12 != page);
            self.misses.retain(|a, _| a >> 12 != page);
            self.nogroup.retain(|a, _| a >> 12 != page);
        }
    }

    /// Drops every translation and empties the cache.
    pub fn flush_all(&mut self) {
        self.map.clear();
        self.pending.clear();
        self.forced.clear();
        self.misses.clear();
        self.nogroup.clear();
        self.fast.iter_mut().for_each(|e| *e = None);
        self.page_keys.clear();
        self.traces.clear();
        self.smc_pages.clear();
        self.ib.iter_mut().for_each(|r| *r = [0; 8]);
        self.cache.reset();
        self.push_runtime();
        self.stats.flushes += 1;
    }

    /// The CCF compiled for guest-physical `phys` (any EIP/CPL), as host
    /// code bytes and their address, for dumps and documentation.
    pub fn ccf_at(&self, phys: u64) -> Option<(u64, &[u8])> {
        self.map.iter().find_map(|(k, e)| match *e {
            Entry::Ccf { code, bytes, .. } if k.0 == phys => {
                Some((code as u64, self.cache.bytes(code as u64, bytes as usize)))
            }
            _ => None,
        })
    }

    /// The CCF at guest-physical `addr` (or, when none starts there, the
    /// one for guest EIP `addr`: physical pages differ from run to run) as
    /// text: the guest instructions of its TU, then the host code, both
    /// disassembled.
    pub fn dump_ccf(&self, addr: u64) -> Option<String> {
        use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
        use std::fmt::Write as _;
        let is_ccf = |e: &Entry| matches!(e, Entry::Ccf { .. });
        let phys = if self.map.iter().any(|(k, e)| k.0 == addr && is_ccf(e)) {
            addr
        } else {
            let (k, _) = self
                .map
                .iter()
                .find(|(k, e)| k.1 as u64 == addr && is_ccf(e))?;
            k.0
        };
        let (insns, guest_len, bits, key) = self.map.iter().find_map(|(k, e)| match *e {
            Entry::Ccf { insns, .. } if k.0 == phys => {
                let bits = if k.2 & 0x20 != 0 { 16 } else { 32 };
                Some((insns, 15 * insns as usize, bits, *k))
            }
            _ => None,
        })?;
        let eip = key.1;
        let (addr, host) = self.ccf_at(phys)?;
        let mut out = String::new();
        let mut fmt = IntelFormatter::new();
        let mut text = String::new();
        let mut guest = vec![0u8; guest_len.min(4096 - (phys as usize & 0xfff))];
        self.cpu.ram().read(phys, &mut guest).ok()?;
        let _ = writeln!(
            out,
            "TU at guest-physical {phys:#x} (EIP {eip:#x}, {bits}-bit code): {insns} guest instructions"
        );
        // Guest-physical addresses of the instructions: consecutive, or
        // where a trace went.
        let places: Vec<u64> = match self.traces.get(&key) {
            Some(eips) => eips
                .iter()
                .map(|&e| (phys & !0xfff) | (e & 0xfff) as u64)
                .collect(),
            None => {
                let mut dec = Decoder::with_ip(bits, &guest, phys, DecoderOptions::NONE);
                (0..insns)
                    .map_while(|_| dec.can_decode().then(|| dec.decode().ip()))
                    .collect()
            }
        };
        let mut insn = Instruction::default();
        for at in places {
            let mut bytes = [0u8; 15];
            let n = 15.min(0x1000 - (at as usize & 0xfff));
            self.cpu.ram().read(at, &mut bytes[..n]).ok()?;
            Decoder::with_ip(bits, &bytes[..n], at, DecoderOptions::NONE).decode_out(&mut insn);
            text.clear();
            fmt.format(&insn, &mut text);
            let _ = writeln!(out, "  {:08x}  {text}", insn.ip());
        }
        let _ = writeln!(out, "CCF at host {addr:#x}: {} bytes", host.len());
        let mut dec = Decoder::with_ip(64, host, addr, DecoderOptions::NONE);
        while dec.can_decode() {
            dec.decode_out(&mut insn);
            text.clear();
            fmt.format(&insn, &mut text);
            let _ = writeln!(out, "  {:016x}  {text}", insn.ip());
        }
        Some(out)
    }

    /// Statistics as `(name, value)` pairs.
    pub fn stats_list(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("instructions", self.cpu.icount),
            ("TUs translated", s.tus),
            ("CCF bytes", s.ccf_bytes),
            ("translation cache bytes in use", self.cache.used() as u64),
            ("dispatches", s.lookups),
            ("interpreter runs of code not yet hot", s.cold_runs),
            ("cache hits", s.hits),
            (
                "cache hit rate (per mille)",
                (s.hits * 1000).checked_div(s.lookups).unwrap_or(0),
            ),
            ("CCF executions", s.ccf_runs),
            ("ident instructions (static)", s.static_ident),
            ("inline instructions (static)", s.static_inline),
            ("call-out sites (static)", s.static_callout),
            ("fallback sites (static)", s.static_fallback),
            ("ident instructions (dynamic)", s.dyn_ident),
            ("inline instructions (dynamic)", s.dyn_inline),
            ("call-outs (dynamic)", s.callouts),
            ("fallbacks (dynamic)", s.fallbacks),
            ("instructions interpreted", s.dyn_interp),
            ("inline TLB misses", s.tlb_misses),
            ("adaptive retranslations", s.adapted),
            ("code pages invalidated", s.invalidations),
            ("cache flushes", s.flushes),
            ("TU map entries", self.map.len() as u64),
            ("heat counts reset", s.cold_resets),
            (
                "pages left to the interpreter (retranslated too often)",
                self.smc_pages
                    .values()
                    .filter(|&&(c, _)| c >= VOLATILE_AFTER)
                    .count() as u64,
            ),
            (
                "decoded-block cache, KiB",
                self.cpu.block_cache_bytes() as u64 >> 10,
            ),
            (
                "decoded-block cache flushes",
                self.cpu.stats.block_cache_flushes,
            ),
            ("compile errors", s.compile_errors),
            ("chained transfers", s.chains),
            (
                "chaining rate (per mille of CCF executions)",
                (s.chains * 1000).checked_div(s.ccf_runs).unwrap_or(0),
            ),
            ("chain links patched", s.links),
            ("indirect-branch table hits", self.ib_hits()),
            ("indirect-branch exits to the dispatcher", s.ib_exits),
            (
                "indirect-branch hit rate (per mille)",
                (self.ib_hits() * 1000)
                    .checked_div(self.ib_hits() + s.ib_exits)
                    .unwrap_or(0),
            ),
            ("indirect-branch records filled", s.ib_fills),
            (
                "memory instructions sharing a probe (static)",
                s.shared_probes,
            ),
            ("probe groups unshared after misses", s.unshared),
            ("translation time (µs)", s.translate_ns / 1000),
        ]
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
        let core = BtCore::new(cpu).map_err(|e| EngineError::Setup {
            engine: "bt",
            source: format!("cannot map the translation cache: {e}").into(),
        })?;
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

impl Inspect for Bt {
    fn dump_translation(&mut self, phys: u64) -> Option<String> {
        self.core.dump_ccf(phys)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.core.stats_list()
    }
}
