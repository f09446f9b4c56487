//! Every vCPU on a host thread of its own (`--threads multi`, the default
//! for software engines under the host clock; QEMU's multi-threaded TCG).
//!
//! The VM's thread runs vCPU 0 on the VM's engine and serves the terminal;
//! each application processor gets a thread and an engine of the same kind
//! for the length of a *phase*. The engines share guest RAM, a
//! [`popek_cpu::CodeMap`] (code one vCPU rewrites reaches the others'
//! caches; LOCKed instructions are atomic on the host) and the machine
//! behind a lock ([`SharedMachine`]): a device access takes the lock, the
//! interrupt lines are read without it, and a vCPU whose line rises is
//! woken. A phase ends when the guest stops, when a vCPU dies, or when the
//! VMM needs every vCPU still (an API request, a snapshot): the threads
//! hand their states back to the VM's slots, where snapshots and the
//! round-robin loop find them, and the next phase starts afresh.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use popek_cpu::state::flags;
use popek_cpu::{CodeMap, CpuState};
use popek_engine::bus::SharedMachine;
use popek_engine::{Engine, EngineError, VmExit};
use popek_machine::{LINE_INTR, LINE_NMI, LINE_STARTUP};

use crate::checkpoint::FALLBACK_SLICE;
use crate::{
    ap_reset_state, report, sipi_state, ConsoleEvent, EngineKind, Outcome, VcpuSlot, Vm,
    LIMIT_REACHED, PANIC_GRACE, SLICE,
};

/// Longest sleep of a halted vCPU between checks of the phase's end.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// How the vCPUs of a VM with several share the host (`--threads`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Threads {
    /// `multi` where the engine and the clock allow it, else `single`.
    #[default]
    Auto,
    /// All vCPUs take turns on one host thread (deterministic under the
    /// virtual clock).
    Single,
    /// One host thread per vCPU.
    Multi,
}

/// What the threads of one phase share besides the machine.
struct Phase<'a> {
    shared: SharedMachine<'a>,
    /// End the phase.
    stop: AtomicBool,
    /// The first outcome a vCPU reached.
    outcome: Mutex<Option<Outcome>>,
    /// vCPUs neither halted nor waiting for a start-up IPI (a bit each).
    active: AtomicU32,
    /// The engine that runs a vCPU for a while where its own cannot.
    fallback: Option<EngineKind>,
}

impl Phase<'_> {
    fn finish(&self, o: Outcome) {
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(o);
        }
        drop(g);
        self.end();
    }

    fn end(&self) {
        self.stop.store(true, SeqCst);
        self.shared.wake(u32::MAX);
    }

    fn ended(&self) -> bool {
        self.stop.load(SeqCst)
    }

    fn set_active(&self, cpu: usize, on: bool) {
        if on {
            self.active.fetch_or(1 << cpu, SeqCst);
        } else {
            self.active.fetch_and(!(1 << cpu), SeqCst);
        }
    }
}

/// A vCPU's place in a phase.
struct Vcpu {
    index: usize,
    wait_for_sipi: bool,
    halted: Option<bool>,
}

impl Vcpu {
    /// Serves INIT and start-up IPIs that arrived for it.
    fn startup(&mut self, phase: &Phase<'_>, engine: &mut dyn Engine) -> Result<(), EngineError> {
        if phase.shared.lines(self.index) & LINE_STARTUP == 0 {
            return Ok(());
        }
        let i = self.index;
        let (init, sipi) = phase.shared.with(|m| (m.take_init(i), m.take_sipi(i)));
        if init && i != 0 {
            let vendor = engine.state().vendor;
            engine.set_state(ap_reset_state(i, vendor))?;
            self.wait_for_sipi = true;
            self.halted = None;
        }
        if let Some(v) = sipi {
            if self.wait_for_sipi {
                let s = sipi_state(engine.state(), v);
                engine.set_state(s)?;
                self.wait_for_sipi = false;
                self.halted = None;
                tracing::debug!("vCPU {i} started at {v:02x}00:0000 on its own thread");
            }
        }
        Ok(())
    }

    /// Whether it can run now (not waiting, not halted without a wake-up).
    fn runnable(&mut self, phase: &Phase<'_>) -> bool {
        if self.wait_for_sipi {
            return false;
        }
        match self.halted {
            None => true,
            Some(if_set) => {
                let l = phase.shared.lines(self.index);
                let woken = (if_set && l & LINE_INTR != 0) || l & LINE_NMI != 0;
                if woken {
                    self.halted = None;
                }
                woken
            }
        }
    }

    /// How long it may sleep: until the next timer event, at most
    /// [`IDLE_POLL`]. Advances the machine's timers first.
    fn idle_time(phase: &Phase<'_>) -> Duration {
        phase
            .shared
            .with(|m| {
                m.advance(0);
                m.time_to_next_event(0)
            })
            .map_or(IDLE_POLL, |t| t.min(IDLE_POLL))
    }

    /// Runs one slice and serves its exit. `Some` ends the phase.
    fn slice(
        &mut self,
        phase: &Phase<'_>,
        engine: &mut dyn Engine,
        hypercalls: &mut popek_engine::hypercall::HypercallStats,
    ) -> Option<Outcome> {
        let mut bus = phase.shared.bus(self.index);
        let exit = match engine.run_on(&mut bus, SLICE) {
            Some(Ok(x)) => x,
            Some(Err(EngineError::CannotContinue {
                engine: name,
                reason,
            })) if phase.fallback.is_some() => {
                match Self::fall_back(phase, self.index, engine, &reason) {
                    Ok(x) => x,
                    Err(why) => {
                        return Some(Outcome::Died(report::died(
                            engine,
                            &format!("engine {name} failed: {reason}; {why}"),
                        )))
                    }
                }
            }
            Some(Err(e)) => return Some(Outcome::Died(report::died(engine, &e.to_string()))),
            None => {
                return Some(Outcome::Died(format!(
                    "engine {} cannot run a vCPU on a thread of its own",
                    engine.name()
                )))
            }
        };
        phase.shared.with(|m| m.advance(0));
        match exit {
            VmExit::Budget => None,
            VmExit::Halt => {
                let if_set = engine.state().rflags & flags::IF as u64 != 0;
                self.halted = Some(if_set);
                None
            }
            VmExit::Shutdown { reason } => Some(Outcome::Died(report::died(engine, &reason))),
            VmExit::Hypercall => phase
                .shared
                .with(|m| popek_engine::hypercall::serve(engine, m, hypercalls))
                .map(Vm::stopped),
            VmExit::MachineStop => phase.shared.with(|m| m.take_stop()).map(Vm::stopped),
            x => Some(Outcome::Died(report::died(
                engine,
                &format!("unexpected exit {x:?} from a software engine"),
            ))),
        }
    }
}

impl Vcpu {
    /// The engine cannot execute the next instruction (a software KVM's
    /// emulator lacks it): the fallback engine, made on this thread, runs
    /// [`FALLBACK_SLICE`] instructions of the vCPU, then the state goes
    /// back. Its exit is the slice's.
    fn fall_back(
        phase: &Phase<'_>,
        index: usize,
        engine: &mut dyn Engine,
        reason: &str,
    ) -> Result<VmExit, String> {
        let kind = phase.fallback.ok_or("no fallback engine")?;
        tracing::debug!("vCPU {index}: {} for a while ({reason})", kind.name());
        let mut fb = phase
            .shared
            .with(|m| kind.factory().create(m))
            .map_err(|e| e.to_string())?;
        fb.set_state(engine.state()).map_err(|e| e.to_string())?;
        let mut bus = phase.shared.bus(index);
        let exit = match fb.run_on(&mut bus, FALLBACK_SLICE) {
            Some(r) => r.map_err(|e| e.to_string())?,
            None => return Err(format!("{} runs no vCPU on its own thread", kind.name())),
        };
        engine.set_state(fb.state()).map_err(|e| e.to_string())?;
        Ok(exit)
    }
}

/// An application processor's thread: its engine, created here, runs the
/// vCPU until the phase ends; returns its state.
fn ap_thread(
    phase: &Phase<'_>,
    kind: EngineKind,
    map: Arc<CodeMap>,
    index: usize,
    (slot, state, kept): (VcpuSlot, CpuState, Option<KeptEngine>),
) -> (VcpuSlot, Option<KeptEngine>) {
    phase.shared.register(index);
    let mut me = Vcpu {
        index,
        wait_for_sipi: slot.wait_for_sipi,
        halted: slot.halted,
    };
    let back = |me: &Vcpu, state: CpuState, ran: u64| VcpuSlot {
        state: Some(state),
        wait_for_sipi: me.wait_for_sipi,
        halted: me.halted,
        instructions: slot.instructions + ran,
    };
    let made: Result<Held, EngineError> = match kept {
        Some(e) => Ok(Held::Kept(e)),
        None => phase
            .shared
            .with(|m| kind.factory().create(m))
            .map(Held::Made),
    };
    let mut held = match made.and_then(|mut h| h.engine().set_state(state.clone()).map(|()| h)) {
        Ok(h) => h,
        Err(e) => {
            phase.finish(Outcome::Died(format!(
                "cannot run vCPU {index} on its own thread: {e}"
            )));
            return (back(&me, state, 0), None);
        }
    };
    let engine = held.engine();
    let first = engine.instructions();
    engine.share_code(map, index);
    phase.shared.set_kicker(index, engine.kicker());
    let mut hypercalls = popek_engine::hypercall::HypercallStats::default();
    while !phase.ended() {
        if let Err(e) = me.startup(phase, engine) {
            phase.finish(Outcome::Died(report::died(engine, &e.to_string())));
            break;
        }
        let run = me.runnable(phase);
        phase.set_active(index, run);
        if !run {
            std::thread::park_timeout(Vcpu::idle_time(phase));
            continue;
        }
        if let Some(o) = me.slice(phase, engine, &mut hypercalls) {
            phase.finish(o);
            break;
        }
    }
    phase.set_active(index, false);
    phase.shared.set_kicker(index, None);
    let state = engine.state();
    let ran = engine.instructions().saturating_sub(first);
    let kept = match held {
        Held::Kept(e) => Some(e),
        Held::Made(_) => None,
    };
    (back(&me, state, ran), kept)
}

/// An engine that outlives a phase (see [`Engine::vcpu_engine`]).
type KeptEngine = Box<dyn Engine + Send>;

/// An AP's engine: kept by the VM across phases, or made for this one.
enum Held {
    Kept(KeptEngine),
    Made(Box<dyn Engine>),
}

impl Held {
    fn engine(&mut self) -> &mut dyn Engine {
        match self {
            Held::Kept(e) => e.as_mut(),
            Held::Made(e) => e.as_mut(),
        }
    }
}

impl Vm {
    /// Whether the vCPUs run on host threads of their own now.
    pub(crate) fn threaded(&self) -> bool {
        self.vcpus.len() > 1 && self.threads
    }

    /// After a restore or an engine switch: a thread per vCPU where the
    /// engine and the clock allow it (`--threads auto`).
    pub(crate) fn refresh_threads(&mut self) {
        let cpus = self.vcpus.len() as u32;
        self.threads = Vm::threads_for(Threads::Auto, cpus, self.kind, self.machine.clock_mode())
            .unwrap_or(false);
    }

    /// Decides `--threads` for a new VM: whether it can have a thread per
    /// vCPU, or why not (for `multi`, a refusal).
    pub(crate) fn threads_for(
        threads: Threads,
        cpus: u32,
        kind: EngineKind,
        clock: popek_machine::ClockMode,
    ) -> Result<bool, String> {
        let software = matches!(kind, EngineKind::Bt | EngineKind::Interp);
        let hw = kind == EngineKind::Hw;
        let host_clock = clock == popek_machine::ClockMode::Host;
        match threads {
            Threads::Single if hw && cpus > 1 => Err(
                "--threads single: hw runs each vCPU on a thread of its own (a KVM vCPU each)"
                    .into(),
            ),
            Threads::Single => Ok(false),
            Threads::Auto => Ok(cpus > 1 && (hw || (software && host_clock))),
            Threads::Multi if !software && !hw => Err(format!(
                "--threads multi: engine {} does not run vCPUs on threads of their own (bt, interp and hw do)",
                kind.name()
            )),
            Threads::Multi if hw => Ok(cpus > 1),
            Threads::Multi if !host_clock => Err(
                "--threads multi needs the host clock: under --clock virtual the vCPUs take turns on one thread, so that runs repeat".into(),
            ),
            Threads::Multi => Ok(cpus > 1),
        }
    }

    /// Runs a phase: every vCPU on its own thread until the guest stops
    /// (`Some`), or until the VMM needs the vCPUs still (`None`: a request
    /// waits in `pending_call`, or a console snapshot was asked for).
    pub(crate) fn run_threads(&mut self, limit: u64) -> Option<Outcome> {
        if self.current != 0 {
            if let Err(e) = self.switch_vcpu(0) {
                return Some(Outcome::Died(report::died(
                    self.engine.as_mut(),
                    &e.to_string(),
                )));
            }
        }
        let n = self.vcpus.len();
        // Engines that make their APs' engines themselves (hw), once.
        self.ap_engines.resize_with(n - 1, || None);
        for i in 1..n {
            if self.ap_engines[i - 1].is_none() {
                match self.engine.vcpu_engine(i) {
                    Some(Ok(e)) => self.ap_engines[i - 1] = Some(e),
                    Some(Err(e)) => {
                        return Some(Outcome::Died(format!(
                            "cannot make vCPU {i}: {}",
                            popek_engine::error_chain(&e)
                        )))
                    }
                    None => {}
                }
            }
        }
        let map = Arc::new(CodeMap::new(self.machine.ram().size(), n));
        if !self.engine.share_code(map.clone(), 0) {
            self.threads = false;
            return None;
        }
        let kind = self.kind;
        let fallback = self.fallback;
        let Vm {
            machine,
            engine,
            hypercalls,
            input,
            control,
            panic,
            vcpus,
            pending_call,
            console_snapshot_asked,
            ap_engines,
            ..
        } = self;
        let phase = Phase {
            shared: SharedMachine::new(machine),
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            active: AtomicU32::new(0),
            fallback,
        };
        let phase = &phase;
        let slots: Vec<(VcpuSlot, CpuState, Option<KeptEngine>)> = vcpus[1..]
            .iter_mut()
            .zip(ap_engines.iter_mut())
            .map(|(s, e)| {
                let st = s.state.take().expect("an AP's state is in its slot");
                (s.clone(), st, e.take())
            })
            .collect();
        let mut panicked_at: Option<u64> = None;
        let back = std::thread::scope(|s| {
            let handles: Vec<_> = slots
                .into_iter()
                .enumerate()
                .map(|(k, ap)| {
                    let map = map.clone();
                    std::thread::Builder::new()
                        .name(format!("vcpu{}", k + 1))
                        .spawn_scoped(s, move || ap_thread(phase, kind, map, k + 1, ap))
                        .expect("a vCPU thread")
                })
                .collect();
            phase.shared.register(0);
            phase.shared.set_kicker(0, engine.kicker());
            let mut bsp = Vcpu {
                index: 0,
                wait_for_sipi: false,
                halted: vcpus[0].halted,
            };
            while !phase.ended() {
                if let Some(rx) = control.as_ref() {
                    match rx.try_recv() {
                        Ok(c) => {
                            *pending_call = Some(c);
                            break;
                        }
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => *control = None,
                    }
                }
                // Terminal input, without blocking.
                while let Some(rx) = input.as_ref() {
                    match rx.try_recv() {
                        Ok(ConsoleEvent::Input(b)) => phase.shared.with(|m| m.serial_input(&b)),
                        Ok(ConsoleEvent::Quit) => phase.finish(Outcome::Quit),
                        Ok(ConsoleEvent::Snapshot) => {
                            *console_snapshot_asked = true;
                            phase.end();
                        }
                        Ok(ConsoleEvent::Eof) | Err(TryRecvError::Disconnected) => *input = None,
                        Err(TryRecvError::Empty) => break,
                    }
                }
                if phase.ended() {
                    break;
                }
                if let Some(line) = panic.panicked() {
                    let at = *panicked_at.get_or_insert(engine.instructions());
                    if engine.instructions() - at >= PANIC_GRACE {
                        phase.finish(Outcome::NoProgress(report::no_progress(
                            engine.as_mut(),
                            &format!("the guest kernel panicked (\"{line}\"); it will not go on"),
                        )));
                        break;
                    }
                }
                if engine.instructions() >= limit {
                    phase.finish(Outcome::NoProgress(LIMIT_REACHED.into()));
                    break;
                }
                if let Err(e) = bsp.startup(phase, engine.as_mut()) {
                    phase.finish(Outcome::Died(report::died(engine.as_mut(), &e.to_string())));
                    break;
                }
                let run = bsp.runnable(phase);
                phase.set_active(0, run);
                if !run {
                    if bsp.halted == Some(false) && phase.active.load(SeqCst) == 0 {
                        phase.finish(Outcome::NoProgress(report::no_progress(
                            engine.as_mut(),
                            "the guest halted with interrupts disabled on every vCPU: nothing can wake it",
                        )));
                        break;
                    }
                    let t = Vcpu::idle_time(phase);
                    // While a device works, its doorbell unparks this
                    // thread; input is then looked at without waiting.
                    let io = phase.shared.with(|m| m.io_in_flight());
                    let waited = match input.as_ref() {
                        Some(rx) if io => {
                            std::thread::park_timeout(t);
                            rx.try_recv().map_err(|e| match e {
                                std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                                std::sync::mpsc::TryRecvError::Disconnected => {
                                    RecvTimeoutError::Disconnected
                                }
                            })
                        }
                        Some(rx) => rx.recv_timeout(t),
                        None => {
                            std::thread::park_timeout(t);
                            Err(RecvTimeoutError::Timeout)
                        }
                    };
                    match waited {
                        Ok(ConsoleEvent::Input(b)) => phase.shared.with(|m| m.serial_input(&b)),
                        Ok(ConsoleEvent::Quit) => phase.finish(Outcome::Quit),
                        Ok(ConsoleEvent::Snapshot) => {
                            *console_snapshot_asked = true;
                            phase.end();
                        }
                        Ok(ConsoleEvent::Eof) | Err(RecvTimeoutError::Disconnected) => {
                            *input = None
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                    }
                    continue;
                }
                if let Some(o) = bsp.slice(phase, engine.as_mut(), hypercalls) {
                    phase.finish(o);
                    break;
                }
            }
            vcpus[0].halted = bsp.halted;
            phase.shared.set_kicker(0, None);
            phase.end();
            handles
                .into_iter()
                .map(|h| h.join().expect("a vCPU thread ends"))
                .collect::<Vec<_>>()
        });
        for (k, (slot, kept)) in back.into_iter().enumerate() {
            vcpus[k + 1] = slot;
            ap_engines[k] = kept;
        }
        let outcome = phase
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        outcome
    }
}
