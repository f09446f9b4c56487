//! popek's VMM: builds a VM (guest RAM, the machine and its devices, a boot
//! loader's entry state, a CPU engine) and runs its exit loop until the
//! guest powers off, resets, writes the debug-exit port, dies or stops
//! making progress.
//!
//! The exit loop is the same for every engine: run a slice, advance the
//! machine's clocks, serve the exit (halt → wait for the next timer or
//! terminal input, hypercall → [`hypercall`], device stop → outcome), feed
//! terminal input to COM1.

pub mod boot;
mod checkpoint;
pub mod control;
pub use popek_engine::hypercall;
mod parallel;
pub mod report;
pub mod snapshot;

pub use checkpoint::{RestoreOptions, SnapshotReport};
pub use parallel::Threads;

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use popek_boot::{flat, linux, multiboot, BootError, KernelFormat};
use popek_engine::{Engine, EngineError, EngineFactory, VmExit};
use popek_machine::MachineError;
use popek_machine::{ClockMode, Machine, MachineConfig, StopReason};
use popek_memory::GuestRam;
use popek_memory::MemoryError;

/// Smallest `--memory`.
pub const MIN_MEMORY: u64 = 2 << 20;
/// Most vCPUs (`--cpus`).
pub const MAX_CPUS: u32 = popek_machine::MAX_CPUS;

/// Largest `--memory`.
pub const MAX_MEMORY: u64 = 3 << 30;

// `--memory` never reaches the machine's MMIO window.
const _: () = assert!(MAX_MEMORY <= popek_machine::memmap::MAX_RAM);

/// The internal marker of `run_limited` running out of instructions.
const LIMIT_REACHED: &str = "instruction limit reached";

/// Timer events a halted guest under the virtual clock may sleep through
/// without one of them raising an unmasked interrupt before it is taken
/// to be stuck (its timers fire only masked lines).
const MASKED_WARPS: u32 = 1000;

/// Instructions per engine slice between clock updates and input polls.
const SLICE: u64 = 200_000;

/// Instructions a vCPU runs before the next one takes the host thread,
/// when there are several (round-robin). As long as a single vCPU's slice:
/// a vCPU spinning for another gives way at its PAUSE anyway, and shorter
/// turns cost more than they save (two parallel jobs in Debian on `bt`:
/// 5.6–5.8 s at 200,000 against 5.9–6.3 s at 50,000 in one sitting, and
/// 8.0–8.2 s at 20,000 in another).
const SMP_SLICE: u64 = SLICE;

/// Which engine runs the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// Hardware-assisted (KVM).
    Hw,
    /// Binary translation.
    Bt,
    /// Trap-and-emulate.
    Trap,
    /// The reference software CPU.
    Interp,
}

/// Every engine's factory, in [`EngineKind`] order.
static ENGINES: [(EngineKind, &dyn EngineFactory); 4] = [
    (EngineKind::Hw, &popek_hw::FACTORY),
    (EngineKind::Bt, &popek_bt::FACTORY),
    (EngineKind::Trap, &popek_trap::FACTORY),
    (EngineKind::Interp, &popek_interp::FACTORY),
];

impl EngineKind {
    /// What the VMM knows of the engine before building it.
    pub fn factory(self) -> &'static dyn EngineFactory {
        ENGINES
            .iter()
            .find(|(k, _)| *k == self)
            .map(|(_, f)| *f)
            .expect("every kind is listed")
    }

    /// The engine's name on the command line.
    pub fn name(self) -> &'static str {
        self.factory().name()
    }

    /// Whether this build of popek has the engine on this host (`hw`:
    /// when `/dev/kvm` opens).
    pub fn available(self) -> bool {
        self.factory().available().is_ok()
    }

    /// The `--engine auto` rule for a guest whose needs are unknown
    /// (treated as a 32-bit guest).
    pub fn auto() -> (EngineKind, String) {
        Self::auto_for(&KernelSource::Embedded("minios".into()))
    }

    /// The `--engine auto` rule for this guest (`docs/architecture.md`): of the
    /// engines here, in the order their factories rank themselves (`hw` on
    /// a hardware-backed KVM, then `bt`, then `interp`, then `hw` on a
    /// software KVM such as kvm_pvm), the first that runs the guest's CPU
    /// mode. Returns the engine and the reason, in words.
    pub fn auto_for(kernel: &KernelSource) -> (EngineKind, String) {
        let factories: Vec<&dyn EngineFactory> = ENGINES.iter().map(|(_, f)| *f).collect();
        match popek_engine::factory::choose(&factories, guest_mode(kernel)) {
            Some((f, why)) => {
                let kind = ENGINES
                    .iter()
                    .find(|(_, g)| g.name() == f.name())
                    .map_or(EngineKind::Interp, |(k, _)| *k);
                (kind, why)
            }
            None => (
                EngineKind::Interp,
                "no engine takes part in the automatic choice here".into(),
            ),
        }
    }
}

pub use popek_cpu::Vendor;
pub use popek_engine::GuestMode;

/// The CPU mode a guest is known to need, where popek can tell before
/// running it: the embedded guests (minios pages with 32-bit paging,
/// minios64 switches to long mode itself), Linux (32-bit paging), flat
/// binaries (their entry mode; a flat-protected guest may still turn on
/// paging later — that is found at run time). `None`: unknown (a
/// Multiboot file).
pub fn guest_mode(kernel: &KernelSource) -> Option<GuestMode> {
    match kernel {
        KernelSource::Embedded(n) if n.starts_with("minios64") => Some(GuestMode::LongFrom32),
        KernelSource::Embedded(n) if n.starts_with("minios") => Some(GuestMode::Paged32),
        KernelSource::Embedded(_) => None,
        KernelSource::File { path, format } => match format {
            Some(FileFormat::FlatReal { .. }) => Some(GuestMode::Real),
            Some(FileFormat::FlatProtected { .. }) => Some(GuestMode::Protected32),
            Some(FileFormat::Linux) | None => {
                // Only a kernel that would load (see `read_input`): the
                // VM's own read reports what is wrong with the others.
                let image = read_input(path, MAX_MEMORY).ok()?;
                linux_64bit(&image).map(|long| {
                    if long {
                        GuestMode::Long64
                    } else {
                        GuestMode::Paged32
                    }
                })
            }
            Some(FileFormat::Multiboot) => None,
        },
    }
}

/// For a Linux bzImage: whether it is a 64-bit kernel (it has the 64-bit
/// boot entry, `XLF_KERNEL_64`). `None` for anything else.
pub fn linux_64bit(image: &[u8]) -> Option<bool> {
    if !linux::is_bzimage(image) {
        return None;
    }
    let h = linux::parse_header(image).ok()?;
    Some(h.xloadflags & linux::XLF_KERNEL_64 != 0)
}

/// Where the kernel comes from.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// A guest built into popek (`minios`, `minios-pv`).
    Embedded(String),
    /// A file, with an explicit format or `None` to detect it.
    File {
        /// Path.
        path: PathBuf,
        /// Format override (flat binaries cannot be detected).
        format: Option<FileFormat>,
    },
}

/// A kernel file format given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// Multiboot v1 ELF.
    Multiboot,
    /// Linux bzImage.
    Linux,
    /// A flat binary loaded at `load_addr`, entered in real mode.
    FlatReal {
        /// Load address.
        load_addr: u64,
    },
    /// A flat binary loaded at `load_addr`, entered in 32-bit protected mode.
    FlatProtected {
        /// Load address.
        load_addr: u64,
    },
}

/// Everything needed to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The kernel.
    pub kernel: KernelSource,
    /// An initrd (Linux) or first module (Multiboot).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Engine.
    pub engine: EngineKind,
    /// Machine clock.
    pub clock: ClockMode,
    /// The CPU vendor profile (what CPUID says, and how the results the
    /// manuals leave undefined come out); `None`: the host's.
    pub vendor: Option<popek_cpu::Vendor>,
    /// vCPUs (1 to [`popek_machine::MAX_CPUS`]).
    pub cpus: u32,
    /// A firmware image to start from, as a PC does (`--firmware`): the
    /// vCPU starts at the reset vector, the kernel is not loaded by popek.
    pub firmware: Option<PathBuf>,
    /// How several vCPUs share the host (`--threads`).
    pub threads: Threads,
    /// The virtio devices (`--disk`, `--rng`).
    pub devices: Devices,
}

/// A disk (`--disk path=FILE[,readonly=on]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The raw image.
    pub path: PathBuf,
    /// The guest may not write it.
    pub readonly: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;

    /// cloud-hypervisor's syntax: `path=FILE[,readonly=on|off]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = None;
        let mut readonly = false;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("readonly", "on" | "true")) => readonly = true,
                Some(("readonly", "off" | "false")) => readonly = false,
                _ => return Err(format!("{part:?}: a disk is path=FILE[,readonly=on|off]")),
            }
        }
        Ok(DiskConfig {
            path: path.ok_or("a disk needs path=FILE")?,
            readonly,
        })
    }
}

pub use popek_virtio::net::parse_mac;

/// A network interface (`--net tap=NAME[,mac=MAC]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The host TAP device.
    pub tap: String,
    /// The guest's MAC address (`None`: one is made up).
    pub mac: Option<[u8; 6]>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// cloud-hypervisor's syntax: `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !t.is_empty() => tap = Some(t.to_string()),
                Some(("mac", m)) => mac = Some(popek_virtio::net::parse_mac(m)?),
                _ => {
                    return Err(format!(
                        "{part:?}: a network interface is tap=NAME[,mac=MAC]"
                    ))
                }
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or("a network interface needs tap=NAME")?,
            mac,
        })
    }
}

/// The VM's virtio devices, on PCI bus 0 in this order: disks, network
/// interfaces, then the
/// entropy device, then the console; and where the consoles go.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Devices {
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Where COM1's output goes (`--serial`).
    #[serde(default)]
    pub serial: Output,
    /// A virtio console (`hvc0`) and where its output goes (`--console`;
    /// off: no device).
    #[serde(default = "Output::off")]
    pub console: Output,
}

impl Default for Devices {
    fn default() -> Self {
        Devices {
            disks: Vec::new(),
            nets: Vec::new(),
            rng: false,
            serial: Output::Tty,
            console: Output::Off,
        }
    }
}

/// Where a console's output goes and whether it takes terminal input
/// (cloud-hypervisor's `--serial` / `--console` values).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// The terminal: popek's stdout, and the keyboard's input.
    #[default]
    Tty,
    /// Nowhere (`off` or `null`).
    Off,
    /// Appended to a file.
    File(PathBuf),
}

impl Output {
    fn off() -> Output {
        Output::Off
    }
}

impl std::str::FromStr for Output {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tty" => Ok(Output::Tty),
            "off" | "null" => Ok(Output::Off),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(Output::File(PathBuf::from(p))),
                _ => Err(format!("{s:?}: tty, off, null or file=PATH")),
            },
        }
    }
}

/// Where a console's bytes go.
pub(crate) type Sink = Box<dyn Write + Send>;

/// The writers of COM1 and of the virtio console (`None`: no console
/// device) for `devices`, the terminal being `terminal`.
pub(crate) fn route_outputs(
    devices: &Devices,
    terminal: Sink,
) -> Result<(Sink, Option<Sink>), VmError> {
    if devices.serial == Output::Tty && devices.console == Output::Tty {
        return Err(VmError::Input {
            path: "--serial tty --console tty".into(),
            why: "one terminal: give the other off or file=PATH".into(),
        });
    }
    let mut terminal = Some(terminal);
    let mut open = |o: &Output| -> Result<Box<dyn Write + Send>, VmError> {
        Ok(match o {
            Output::Tty => terminal.take().expect("one terminal"),
            Output::Off => Box::new(std::io::sink()),
            Output::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| VmError::Input {
                        path: p.display().to_string(),
                        why: e.to_string(),
                    })?,
            ),
        })
    };
    let uart = open(&devices.serial)?;
    let hvc = match devices.console {
        Output::Off => None,
        ref o => Some(open(o)?),
    };
    Ok((uart, hvc))
}

impl Devices {
    /// The same devices with each disk's path made absolute (for a
    /// snapshot, which may be restored from another directory).
    pub fn absolute(&self) -> Devices {
        let mut d = self.clone();
        for disk in &mut d.disks {
            if let Ok(p) = std::path::absolute(&disk.path) {
                disk.path = p;
            }
        }
        // A made-up MAC address is fixed from here on (a restore must
        // give the guest the same one).
        for (i, n) in d.nets.iter_mut().enumerate() {
            n.mac
                .get_or_insert_with(|| popek_virtio::net::default_mac(i as u8));
        }
        for o in [&mut d.serial, &mut d.console] {
            if let Output::File(p) = o {
                if let Ok(a) = std::path::absolute(&*p) {
                    *p = a;
                }
            }
        }
        d
    }
}

/// Bad input: a file, a flag, or an engine that cannot run the guest.
/// popek exits 2 with this one-line message.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel or initrd is malformed or does not fit.
    #[error("{path}: {source}")]
    Boot {
        /// The file.
        path: String,
        /// Why.
        source: BootError,
    },
    /// A kernel or initrd that cannot be loaded as it is.
    #[error("{path}: {why}")]
    Input {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The kernel's format is not recognized.
    #[error("{path}: not a Multiboot ELF or Linux bzImage (for a flat binary give --format flat-real or flat-protected and --load-addr)")]
    UnknownFormat {
        /// The file.
        path: String,
    },
    /// The vCPU count is out of range.
    #[error("--cpus {0}: must be between 1 and {max}", max = popek_machine::MAX_CPUS)]
    Cpus(u32),
    /// The memory size is out of range.
    #[error("--memory {size}: must be between 2M and 3G")]
    Memory {
        /// The size asked for, in bytes.
        size: u64,
    },
    /// The named embedded guest does not exist.
    #[error("--guest {0}: no such guest (known: {1})")]
    NoGuest(String, String),
    /// The engine is not available here, cannot run the guest, or could
    /// not be built.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Guest RAM could not be allocated.
    #[error("cannot allocate {size} bytes of guest RAM")]
    Ram {
        /// Bytes asked for.
        size: u64,
        /// Why.
        #[source]
        source: MemoryError,
    },
    /// The machine could not be built.
    #[error("cannot build the machine")]
    Machine(#[source] MachineError),
    /// An embedded guest needs more memory than given.
    #[error("--memory {} KiB: guest {guest} needs at least {} MiB", size >> 10, min >> 20)]
    GuestMemory {
        /// The guest.
        guest: String,
        /// The memory given, bytes.
        size: u64,
        /// Its minimum, bytes.
        min: u64,
    },
}

impl VmError {
    /// The message with every cause after it (`a: b: c`), on one line.
    pub fn chain(&self) -> String {
        popek_engine::error_chain(self)
    }
}

/// How a VM run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// ACPI power-off.
    PowerOff,
    /// Guest reset.
    Reset,
    /// The guest wrote v to port 0xf4.
    DebugExit(u8),
    /// The user quit from the console (Ctrl-A x).
    Quit,
    /// The run was stopped after this many instructions, as asked
    /// (`--max-instructions`).
    Stopped(u64),
    /// Triple fault or an internal error: a paragraph with the reason,
    /// registers and instruction bytes.
    Died(String),
    /// The watchdog saw no progress.
    NoProgress(String),
    /// The VM was ended on request (the API, `popek snapshot --stop`):
    /// why, in words.
    Ended(String),
    /// The engine found at run time that it cannot run this guest (e.g.
    /// `hw` on a KVM that refuses 32-bit paging): one line, exit status 2.
    Unsupported(String),
}

impl Outcome {
    /// popek's exit status for this outcome (the README's table,
    /// `docs/architecture.md`).
    pub fn exit_status(&self) -> i32 {
        match self {
            Outcome::PowerOff
            | Outcome::Reset
            | Outcome::Quit
            | Outcome::Stopped(_)
            | Outcome::Ended(_) => 0,
            Outcome::DebugExit(v) => ((*v as i32) << 1) | 1,
            Outcome::Died(_) => 4,
            Outcome::NoProgress(_) => 6,
            Outcome::Unsupported(_) => 2,
        }
    }
}

/// Terminal input events from the console thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// Bytes typed.
    Input(Vec<u8>),
    /// The user asked to quit (Ctrl-A x).
    Quit,
    /// The user asked for a snapshot (Ctrl-A s).
    Snapshot,
    /// The input closed.
    Eof,
}

/// A built VM.
pub struct Vm {
    /// The machine and its devices.
    pub machine: Machine,
    /// The engine running the vCPU.
    pub engine: Box<dyn Engine>,
    /// Hypercall statistics.
    pub hypercalls: hypercall::HypercallStats,
    input: Option<Receiver<ConsoleEvent>>,
    /// Set when the guest's console printed a kernel panic.
    panic: Arc<PanicWatch>,
    /// The engine running the vCPU.
    kind: EngineKind,
    /// What the VM was built from, for snapshots.
    config: snapshot::ConfigDesc,
    /// The last snapshot written or restored from: what a diff snapshot
    /// is taken against.
    last_snapshot: Option<checkpoint::LastSnapshot>,
    /// Requests from the API socket.
    control: Option<Receiver<control::Call>>,
    /// The exit loop is paused (`PATCH /vm` `Paused`).
    paused: bool,
    /// Engine switches so far.
    switches: u64,
    /// Where Ctrl-A s writes, and how many it wrote.
    console_snapshots: (PathBuf, u32),
    /// The engine that goes on where the engine at hand cannot.
    fallback: Option<EngineKind>,
    /// After a fallback: the engine to return to, and from which
    /// instruction count.
    return_to: Option<(EngineKind, u64)>,
    /// Every vCPU; the engine runs `current`'s state, the others' wait in
    /// their slots (round-robin on one host thread).
    vcpus: Vec<VcpuSlot>,
    /// The vCPU the engine runs now.
    current: usize,
    /// The vCPUs run on host threads of their own (`parallel`).
    threads: bool,
    /// A request a threaded phase ended for, served next.
    pending_call: Option<control::Call>,
    /// Ctrl-A s ended a threaded phase: write the snapshot.
    console_snapshot_asked: bool,
    /// The engines of vCPUs 1.. that outlive a threaded phase (`hw`: KVM
    /// vCPUs cannot be made twice); software engines are made per phase.
    ap_engines: Vec<Option<Box<dyn Engine + Send>>>,
}

/// A vCPU of a VM with several.
#[derive(Clone, Debug, Default)]
struct VcpuSlot {
    /// Its state while another vCPU runs (`None` for the running one).
    state: Option<popek_cpu::CpuState>,
    /// Waiting for a start-up IPI (application processors after reset and
    /// after INIT).
    wait_for_sipi: bool,
    /// Halted, and whether its IF was set when it halted (only then can an
    /// interrupt wake it).
    halted: Option<bool>,
    /// Guest instructions it retired on a thread of its own (`parallel`).
    instructions: u64,
}

/// The state of application processor `index` after RESET or INIT.
fn ap_reset_state(index: usize, vendor: popek_cpu::Vendor) -> popek_cpu::CpuState {
    let mut s = popek_cpu::CpuState::reset();
    s.vendor = vendor;
    s.apic_id = index as u32;
    s
}

/// The state a start-up IPI with `vector` gives a vCPU waiting for it:
/// real mode at `vector`:0000 (SDM 9.4.4.1).
fn sipi_state(mut s: popek_cpu::CpuState, vector: u8) -> popek_cpu::CpuState {
    use popek_cpu::state::seg;
    let cs = &mut s.seg[seg::CS];
    cs.selector = u16::from(vector) << 8;
    cs.base = u64::from(vector) << 12;
    s.rip = 0;
    s.halted = false;
    s
}

/// What a guest kernel prints when it gives up; after it, a guest makes no
/// progress however many instructions it retires (Linux spins in `panic()`
/// unless booted with `panic=N`).
const PANIC_MARKERS: [&str; 2] = ["Kernel panic - not syncing", "minios: panic"];

/// Instructions a panicking guest may still run (to finish its report).
const PANIC_GRACE: u64 = 50_000_000;

/// Watches the console for [`PANIC_MARKERS`] (the serial console is the one
/// channel every guest has: a pvpanic device would need a guest driver).
#[derive(Default)]
struct PanicWatch {
    line: std::sync::Mutex<(Vec<u8>, Option<String>)>,
}

impl PanicWatch {
    fn feed(&self, bytes: &[u8]) {
        let Ok(mut g) = self.line.lock() else {
            return;
        };
        if g.1.is_some() {
            return;
        }
        for &b in bytes {
            if b == b'\n' {
                let text = String::from_utf8_lossy(&g.0).trim().to_string();
                if PANIC_MARKERS.iter().any(|m| text.contains(m)) {
                    g.1 = Some(text);
                    return;
                }
                g.0.clear();
            } else if g.0.len() < 512 {
                g.0.push(b);
            }
        }
    }

    fn panicked(&self) -> Option<String> {
        self.line.lock().ok().and_then(|g| g.1.clone())
    }
}

/// The console writer, teeing into the panic watch.
struct WatchedConsole {
    inner: Box<dyn Write + Send>,
    watch: Arc<PanicWatch>,
}

impl Write for WatchedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.watch.feed(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Refuses more than one vCPU on an engine that runs one: `trap`'s monitor
/// shadows one CPU's tables and `hw` does not yet create a KVM vCPU per
/// guest vCPU.
fn smp_engine(kind: EngineKind) -> Result<(), EngineError> {
    match kind {
        EngineKind::Bt | EngineKind::Interp | EngineKind::Hw => Ok(()),
        EngineKind::Trap => Err(EngineError::Unsupported {
            engine: "trap",
            reason: "more than one vCPU: the monitor shadows one CPU's descriptor and page tables"
                .into(),
        }),
    }
}

/// Refuses `--firmware` on an engine that cannot start at the reset
/// vector: `trap` runs no real mode (`hw` maps the ROM as a read-only KVM
/// memory slot).
fn firmware_engine(kind: EngineKind) -> Result<(), EngineError> {
    match kind {
        EngineKind::Bt | EngineKind::Interp | EngineKind::Hw => Ok(()),
        EngineKind::Trap => Err(EngineError::Unsupported {
            engine: "trap",
            reason: "firmware starts in real mode, which trap does not run".into(),
        }),
    }
}

/// Plugs the virtio devices into the machine's PCI bus.
pub(crate) fn attach_devices(
    machine: &mut Machine,
    devices: &Devices,
    console: Option<Box<dyn Write + Send>>,
) -> Result<(), VmError> {
    let mut made: Vec<(Box<dyn popek_virtio::VirtioDevice>, String)> = Vec::new();
    for d in &devices.disks {
        let bell = machine.doorbell().clone();
        let block = popek_virtio::block::Block::open(&d.path, d.readonly, bell).map_err(|e| {
            VmError::Input {
                path: d.path.display().to_string(),
                why: popek_engine::error_chain(&e),
            }
        })?;
        made.push((Box::new(block), d.path.display().to_string()));
    }
    for (i, n) in devices.nets.iter().enumerate() {
        let bell = machine.doorbell().clone();
        let mac = n
            .mac
            .unwrap_or_else(|| popek_virtio::net::default_mac(i as u8));
        let net = popek_virtio::net::Tap::open(&n.tap)
            .and_then(|tap| popek_virtio::net::Net::new(tap, mac, bell))
            .map_err(|e| VmError::Input {
                path: format!("--net tap={}", n.tap),
                why: popek_engine::error_chain(&e),
            })?;
        made.push((Box::new(net), format!("--net tap={}", n.tap)));
    }
    if devices.rng {
        made.push((Box::new(popek_virtio::rng::Rng::new()), "--rng".into()));
    }
    let console = console.map(popek_virtio::console::Console::new);
    if let Some(c) = console {
        made.push((Box::new(c), "--console".into()));
    }
    for (dev, what) in made {
        let is_console = what == "--console";
        let pci = popek_virtio::pci::VirtioPci::new(dev)
            .map_err(|why| VmError::Input { path: what, why })?;
        let slot = machine
            .add_pci_device(Box::new(pci))
            .map_err(VmError::Machine)?;
        if is_console && devices.console == Output::Tty {
            machine.set_terminal_device(slot);
        }
    }
    Ok(())
}

/// Reads a kernel or initrd: a regular file of at most `max` bytes (guest
/// RAM: nothing larger can be loaded), checked before reading so that a
/// device (`/dev/zero`) or a FIFO is refused at once instead of read
/// forever or waited on.
pub fn read_input(path: &std::path::Path, max: u64) -> Result<Vec<u8>, VmError> {
    use std::io::Read;
    let err = |source| VmError::Read {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(VmError::Input {
            path: path.display().to_string(),
            why: "not a regular file".into(),
        });
    }
    if meta.len() > max {
        return Err(VmError::Input {
            path: path.display().to_string(),
            why: format!(
                "{} bytes: larger than guest RAM ({} MiB), so it cannot be loaded",
                meta.len(),
                max >> 20
            ),
        });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .map_err(err)?
        .take(max + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > max {
        return Err(VmError::Input {
            path: path.display().to_string(),
            why: "grew beyond guest RAM while being read".into(),
        });
    }
    Ok(buf)
}

/// Refuses, before anything is built, an engine that is not here, cannot
/// present the vendor profile, or cannot run the guest's CPU mode (for
/// `hw` the probe, cached per boot; the rest is found at run time).
fn check_engine(
    cfg: &VmConfig,
    factory: &dyn EngineFactory,
    vendor: popek_cpu::Vendor,
) -> Result<(), VmError> {
    let engine_name = factory.name();
    factory
        .available()
        .map_err(|reason| EngineError::Unavailable {
            engine: engine_name,
            reason,
        })?;
    factory
        .accepts_vendor(vendor)
        .map_err(|reason| EngineError::Unsupported {
            engine: engine_name,
            reason,
        })?;
    let mode = if cfg.firmware.is_some() {
        Some(GuestMode::Real)
    } else {
        guest_mode(&cfg.kernel)
    };
    if let Some(mode) = mode {
        factory
            .can_run(mode)
            .map_err(|reason| EngineError::Unsupported {
                engine: engine_name,
                reason,
            })?;
    }
    Ok(())
}

/// Reads the kernel (and initrd), detects its format and loads it into
/// guest RAM: the CPU state the guest starts in.
fn load_kernel(
    cfg: &VmConfig,
    factory: &dyn EngineFactory,
    ram: &GuestRam,
    machine: &Machine,
) -> Result<popek_boot::EntryState, VmError> {
    let initrd = cfg
        .initrd
        .as_ref()
        .map(|p| read_input(p, cfg.memory))
        .transpose()?;
    let initrd_name = cfg
        .initrd
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let (image, name, format): (std::borrow::Cow<'static, [u8]>, String, Option<FileFormat>) =
        match &cfg.kernel {
            KernelSource::Embedded(n) => {
                let img = popek_guests::by_name(n)
                    .ok_or_else(|| VmError::NoGuest(n.clone(), popek_guests::NAMES.join(", ")))?;
                if cfg.memory < popek_guests::MIN_MEMORY {
                    return Err(VmError::GuestMemory {
                        guest: n.clone(),
                        size: cfg.memory,
                        min: popek_guests::MIN_MEMORY,
                    });
                }
                (
                    img.into(),
                    format!("embedded guest {n}"),
                    Some(FileFormat::Multiboot),
                )
            }
            KernelSource::File { path, format } => (
                read_input(path, cfg.memory)?.into(),
                path.display().to_string(),
                *format,
            ),
        };
    let boot_err = |source| VmError::Boot {
        path: name.clone(),
        source,
    };
    let format = match format {
        Some(f) => f,
        None => match popek_boot::detect(&image) {
            KernelFormat::Multiboot => FileFormat::Multiboot,
            KernelFormat::LinuxBzImage => FileFormat::Linux,
            KernelFormat::Unknown => {
                // A Multiboot header with a bad checksum gets its precise error.
                if let Err(e) = multiboot::find_header(&image) {
                    if !matches!(e, BootError::NoMultibootHeader) {
                        return Err(boot_err(e));
                    }
                }
                return Err(VmError::UnknownFormat { path: name });
            }
        },
    };
    Ok(match format {
        FileFormat::Multiboot => {
            let mods: Vec<multiboot::Module<'_>> = initrd
                .as_deref()
                .map(|d| multiboot::Module {
                    data: d,
                    cmdline: "initrd",
                })
                .into_iter()
                .collect();
            multiboot::load(ram, &image, &cfg.cmdline, &mods).map_err(boot_err)?
        }
        FileFormat::Linux => {
            let p = linux::LinuxParams {
                cmdline: &cfg.cmdline,
                initrd: initrd.as_deref(),
                acpi_rsdp_addr: Some(machine.rsdp_address()),
            };
            // A 64-bit kernel takes the 64-bit entry (long mode,
            // identity page tables) on an engine that runs long mode:
            // the only way in on a KVM without 32-bit paging, and the
            // direct one on VT.
            let long = factory.can_run(GuestMode::Long64).is_ok();
            let load = if long && linux_64bit(&image) == Some(true) {
                linux::load_64
            } else {
                linux::load
            };
            load(ram, &image, &p).map_err(|e| match e {
                BootError::InitrdTooBig { .. } => VmError::Boot {
                    path: initrd_name.clone(),
                    source: e,
                },
                e => boot_err(e),
            })?
        }
        FileFormat::FlatReal { load_addr } => {
            flat::load(ram, &image, load_addr, flat::FlatEntry::Real).map_err(boot_err)?
        }
        FileFormat::FlatProtected { load_addr } => {
            flat::load(ram, &image, load_addr, flat::FlatEntry::Protected32).map_err(boot_err)?
        }
    })
}

impl Vm {
    /// Builds a VM: RAM, machine, kernel loaded, engine with its entry
    /// state. `console` receives the serial output.
    pub fn new(cfg: &VmConfig, console: Box<dyn Write + Send>) -> Result<Vm, VmError> {
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&cfg.memory) {
            return Err(VmError::Memory { size: cfg.memory });
        }
        if !(1..=popek_machine::MAX_CPUS).contains(&cfg.cpus) {
            return Err(VmError::Cpus(cfg.cpus));
        }
        if cfg.cpus > 1 {
            smp_engine(cfg.engine).map_err(VmError::Engine)?;
        }
        if cfg.firmware.is_some() {
            firmware_engine(cfg.engine).map_err(VmError::Engine)?;
        }
        let vendor = cfg.vendor.unwrap_or_else(popek_cpu::Vendor::host);
        let factory = cfg.engine.factory();
        check_engine(cfg, factory, vendor)?;
        let ram = if factory.needs_shareable_ram() {
            GuestRam::new_shareable(cfg.memory)
        } else {
            GuestRam::new(cfg.memory)
        };
        let ram = Arc::new(ram.map_err(|source| VmError::Ram {
            size: cfg.memory,
            source,
        })?);
        let panic = Arc::new(PanicWatch::default());
        let (console, hvc) = route_outputs(
            &cfg.devices,
            Box::new(WatchedConsole {
                inner: console,
                watch: panic.clone(),
            }),
        )?;
        let mc = MachineConfig {
            clock: cfg.clock,
            cpus: cfg.cpus,
        };
        let (machine, mut state) = match &cfg.firmware {
            None => {
                let machine = Machine::new(mc, ram.clone(), console).map_err(VmError::Machine)?;
                let entry = load_kernel(cfg, factory, &ram, &machine)?;
                (machine, boot::entry_cpu_state(&entry))
            }
            Some(path) => {
                let image = read_input(path, 16 << 20)?;
                let mut machine =
                    Machine::with_firmware(mc, ram.clone(), console, image).map_err(|e| {
                        VmError::Input {
                            path: path.display().to_string(),
                            why: popek_engine::error_chain(&e),
                        }
                    })?;
                boot::firmware_files(&mut machine);
                if let KernelSource::File { path: kpath, .. } = &cfg.kernel {
                    // The firmware boots it, through QEMU's option ROM.
                    let image = read_input(kpath, cfg.memory)?;
                    let initrd = cfg
                        .initrd
                        .as_ref()
                        .map(|p| read_input(p, cfg.memory))
                        .transpose()?;
                    let rom = std::fs::read(boot::LINUXBOOT_ROM).map_err(|e| VmError::Input {
                        path: boot::LINUXBOOT_ROM.into(),
                        why: format!(
                            "{e}: firmware boots a kernel through QEMU's option ROM (Debian package qemu-system-data)"
                        ),
                    })?;
                    boot::firmware_linux(
                        &mut machine,
                        &image,
                        initrd.as_deref(),
                        &cfg.cmdline,
                        rom,
                    )
                    .map_err(|why| VmError::Input {
                        path: kpath.display().to_string(),
                        why,
                    })?;
                }
                let mut state = boot::reset_state(vendor);
                if cfg.engine == EngineKind::Hw {
                    // KVM's vCPU reports the host's CPUID: so does EDX.
                    state.gpr[2] = u64::from(popek_cpu::vendor::host_signature());
                }
                (machine, state)
            }
        };
        let mut machine = machine;
        attach_devices(&mut machine, &cfg.devices.absolute(), hvc)?;
        let mut engine = factory.create(&machine)?;
        state.vendor = vendor;
        engine.set_state(state)?;
        let config = snapshot::ConfigDesc {
            memory: cfg.memory,
            guest: match &cfg.kernel {
                KernelSource::Embedded(n) => format!("embedded guest {n}"),
                KernelSource::File { path, .. } => path.display().to_string(),
            },
            cmdline: cfg.cmdline.clone(),
            cpus: cfg.cpus,
            devices: cfg.devices.absolute(),
        };
        let mut vm = Vm::assemble(machine, engine, cfg.engine, config, panic);
        vm.threads =
            Vm::threads_for(cfg.threads, cfg.cpus, cfg.engine, cfg.clock).map_err(|reason| {
                VmError::Engine(EngineError::Unsupported {
                    engine: cfg.engine.name(),
                    reason,
                })
            })?;
        for i in 1..cfg.cpus as usize {
            vm.vcpus.push(VcpuSlot {
                state: Some(ap_reset_state(i, vendor)),
                wait_for_sipi: true,
                halted: None,
                instructions: 0,
            });
        }
        Ok(vm)
    }

    fn assemble(
        machine: Machine,
        engine: Box<dyn Engine>,
        kind: EngineKind,
        config: snapshot::ConfigDesc,
        panic: Arc<PanicWatch>,
    ) -> Vm {
        Vm {
            machine,
            engine,
            hypercalls: hypercall::HypercallStats::default(),
            input: None,
            panic,
            kind,
            config,
            last_snapshot: None,
            control: None,
            paused: false,
            switches: 0,
            console_snapshots: (PathBuf::from("."), 0),
            fallback: None,
            return_to: None,
            vcpus: vec![VcpuSlot::default()],
            current: 0,
            threads: false,
            pending_call: None,
            console_snapshot_asked: false,
            ap_engines: Vec::new(),
        }
    }

    /// The number of vCPUs.
    pub fn cpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Guest instructions each vCPU retired, when each runs on its own
    /// host thread (vCPU 0's is the engine's count); `None` while the
    /// vCPUs take turns on one engine, whose count is their total.
    pub fn vcpu_instructions(&self) -> Option<Vec<u64>> {
        self.threaded().then(|| {
            std::iter::once(self.engine.instructions())
                .chain(self.vcpus[1..].iter().map(|v| v.instructions))
                .collect()
        })
    }

    /// Every vCPU's state, in vCPU order, and whether it waits for a
    /// start-up IPI.
    pub fn vcpu_states(&mut self) -> Vec<(popek_cpu::CpuState, bool)> {
        let current = self.engine.state();
        self.vcpus
            .iter()
            .map(|v| {
                (
                    v.state.clone().unwrap_or_else(|| current.clone()),
                    v.wait_for_sipi,
                )
            })
            .collect()
    }

    /// Gives the VM the states of vCPUs 1.. (after a restore), the engine
    /// holding vCPU 0's.
    pub(crate) fn set_ap_states(&mut self, aps: Vec<(popek_cpu::CpuState, bool)>) {
        self.vcpus.truncate(1);
        self.current = 0;
        self.machine.set_current_cpu(0);
        for (state, wait_for_sipi) in aps {
            self.vcpus.push(VcpuSlot {
                state: Some(state),
                wait_for_sipi,
                halted: None,
                instructions: 0,
            });
        }
    }

    /// Loads vCPU `next` into the engine, keeping the running one's state
    /// in its slot.
    fn switch_vcpu(&mut self, next: usize) -> Result<(), EngineError> {
        let Some(state) = self.vcpus[next].state.take() else {
            return Ok(());
        };
        let old = self.engine.state();
        self.vcpus[self.current].state = Some(old);
        if let Err(e) = self.engine.set_state(state.clone()) {
            // Put everything back as it was.
            let old = self.vcpus[self.current].state.take();
            self.vcpus[next].state = Some(state);
            if let Some(o) = old {
                let _ = self.engine.set_state(o);
            }
            return Err(e);
        }
        self.current = next;
        self.machine.set_current_cpu(next);
        Ok(())
    }

    /// Sets vCPU `i`'s state, wherever it is held.
    fn put_vcpu_state(&mut self, i: usize, state: popek_cpu::CpuState) -> Result<(), EngineError> {
        if i == self.current {
            self.engine.set_state(state)
        } else {
            self.vcpus[i].state = Some(state);
            Ok(())
        }
    }

    fn vcpu_state(&mut self, i: usize) -> popek_cpu::CpuState {
        match &self.vcpus[i].state {
            Some(s) => s.clone(),
            None => self.engine.state(),
        }
    }

    /// Serves the INIT and start-up IPIs that arrived for the
    /// application processors.
    fn serve_init_sipi(&mut self) -> Result<(), EngineError> {
        for i in 1..self.vcpus.len() {
            if self.machine.take_init(i) {
                let vendor = self.vcpu_state(i).vendor;
                self.put_vcpu_state(i, ap_reset_state(i, vendor))?;
                self.vcpus[i].wait_for_sipi = true;
                self.vcpus[i].halted = None;
            }
            if let Some(v) = self.machine.take_sipi(i) {
                if self.vcpus[i].wait_for_sipi {
                    let s = sipi_state(self.vcpu_state(i), v);
                    self.put_vcpu_state(i, s)?;
                    self.vcpus[i].wait_for_sipi = false;
                    self.vcpus[i].halted = None;
                    tracing::debug!("vCPU {i} started at {v:02x}00:0000");
                }
            }
        }
        // INIT to the BSP would restart the firmware; there is none.
        if self.machine.take_init(0) {
            tracing::debug!("INIT to the bootstrap processor ignored");
        }
        let _ = self.machine.take_sipi(0);
        Ok(())
    }

    fn runnable(&self, i: usize) -> bool {
        let v = &self.vcpus[i];
        !v.wait_for_sipi
            && match v.halted {
                None => true,
                Some(if_set) => {
                    (if_set && self.machine.interrupt_pending_for(i))
                        || self.machine.nmi_pending_for(i)
                }
            }
    }

    /// Round-robin: moves to the next runnable vCPU after the current one
    /// (or stays). Returns false when none is runnable (all halted or
    /// waiting).
    fn pick_vcpu(&mut self) -> Result<bool, EngineError> {
        let n = self.vcpus.len();
        for k in 1..=n {
            let i = (self.current + k) % n;
            if self.runnable(i) {
                if i != self.current {
                    self.switch_vcpu(i)?;
                }
                self.vcpus[i].halted = None;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The engine running the vCPU now.
    pub fn engine_kind(&self) -> EngineKind {
        self.kind
    }

    /// How many times the vCPU moved between engines.
    pub fn engine_switches(&self) -> u64 {
        self.switches
    }

    /// Serves API requests from `rx` while the VM runs.
    pub fn set_control(&mut self, rx: Receiver<control::Call>) {
        self.control = Some(rx);
    }

    /// Where Ctrl-A s writes its snapshots (default: the current
    /// directory).
    pub fn set_snapshot_dir(&mut self, dir: PathBuf) {
        self.console_snapshots.0 = dir;
    }

    /// The engine's statistics (`--stats`), empty when it offers none.
    pub fn stats(&mut self) -> Vec<(String, u64)> {
        self.engine
            .inspect()
            .map(|i| i.all_stats())
            .unwrap_or_default()
    }

    /// One of the engine's statistics by name.
    pub fn stat(&mut self, name: &str) -> Option<u64> {
        self.stats()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|x| x.1)
    }

    /// Connects terminal input.
    pub fn set_input(&mut self, rx: Receiver<ConsoleEvent>) {
        self.input = Some(rx);
    }

    fn take_input(&mut self, ev: ConsoleEvent) -> Option<Outcome> {
        match ev {
            ConsoleEvent::Input(b) => {
                self.machine.serial_input(&b);
                None
            }
            ConsoleEvent::Quit => Some(Outcome::Quit),
            ConsoleEvent::Snapshot => {
                self.console_snapshot();
                None
            }
            ConsoleEvent::Eof => {
                self.input = None;
                None
            }
        }
    }

    fn poll_input(&mut self) -> Option<Outcome> {
        while let Some(rx) = &self.input {
            match rx.try_recv() {
                Ok(ev) => {
                    if let Some(o) = self.take_input(ev) {
                        return Some(o);
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => self.input = None,
            }
        }
        None
    }

    fn stopped(reason: StopReason) -> Outcome {
        match reason {
            StopReason::PowerOff => Outcome::PowerOff,
            StopReason::Reset => Outcome::Reset,
            StopReason::DebugExit(v) => Outcome::DebugExit(v),
        }
    }

    /// Waits while the vCPU is halted: until a timer is due, input arrives,
    /// or (no timer, no input) forever — which the watchdog reports.
    fn wait_halted(&mut self) -> Option<Outcome> {
        let icount = self.engine.instructions();
        // An NMI wakes a vCPU whatever its IF.
        if (0..self.vcpus.len()).any(|i| self.machine.nmi_pending_for(i)) {
            return None;
        }
        let can_wake = if self.vcpus.len() == 1 {
            self.engine.state().rflags & popek_cpu::state::flags::IF as u64 != 0
        } else {
            self.vcpus.iter().any(|v| v.halted == Some(true))
        };
        if !can_wake {
            return Some(Outcome::NoProgress(report::no_progress(
                self.engine.as_mut(),
                "the guest halted with interrupts disabled: nothing can wake it",
            )));
        }
        if self.woken() {
            return None;
        }
        if self.machine.clock_mode() == ClockMode::Virtual {
            // Skip idle time to the next timer event; a timer whose
            // interrupt is masked wakes nothing, however often it fires.
            let mut fired = false;
            for _ in 0..MASKED_WARPS {
                if !self.machine.warp_to_next_event(icount) {
                    break;
                }
                fired = true;
                if self.woken() {
                    return None;
                }
            }
            if self.input.is_none() && self.control.is_none() {
                return Some(Outcome::NoProgress(report::no_progress(
                    self.engine.as_mut(),
                    if fired {
                        "the guest halted and its timers raise only masked interrupts: nothing can wake it"
                    } else {
                        "the guest halted with no timer armed and no terminal input: nothing can wake it"
                    },
                )));
            }
        }
        let timeout = self.machine.time_to_next_event(icount);
        let io = self.machine.io_in_flight();
        if timeout.is_none() && self.input.is_none() && !io {
            return Some(Outcome::NoProgress(report::no_progress(
                self.engine.as_mut(),
                "the guest halted with no timer armed and no terminal input: nothing can wake it",
            )));
        }
        let timeout = timeout
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        match &self.input {
            // A device finishing its I/O wakes the guest as input does.
            Some(rx) if io => {
                self.machine.doorbell().wait(timeout);
                match rx.try_recv() {
                    Ok(ev) => return self.take_input(ev),
                    Err(std::sync::mpsc::TryRecvError::Empty) => {}
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => self.input = None,
                }
            }
            Some(rx) => match rx.recv_timeout(timeout) {
                Ok(ev) => return self.take_input(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.input = None,
            },
            None => self.machine.doorbell().wait(timeout),
        }
        self.machine.advance(icount);
        None
    }

    /// Whether a halted VM has a vCPU to run again.
    fn woken(&self) -> bool {
        if self.vcpus.len() == 1 {
            self.machine.interrupt_pending() || self.machine.nmi_pending()
        } else {
            (0..self.vcpus.len()).any(|i| self.runnable(i))
        }
    }

    /// Runs the guest until it ends.
    pub fn run(&mut self) -> Outcome {
        match self.run_limited(u64::MAX) {
            Some(o) => o,
            None => Outcome::NoProgress("the instruction limit was reached".into()),
        }
    }

    /// Runs the guest until it ends or has retired about `limit`
    /// instructions in all (then `None`): for tests and fuzzing, where a
    /// guest that spins forever is legitimate and must be cut short.
    pub fn run_limited(&mut self, limit: u64) -> Option<Outcome> {
        Some(self.run_loop(limit))
            .filter(|o| !matches!(o, Outcome::NoProgress(r) if r == LIMIT_REACHED))
    }

    fn run_loop(&mut self, limit: u64) -> Outcome {
        // Watchdog: whole slices in which not one instruction retired.
        let mut stuck_slices = 0;
        let mut panicked_at: Option<u64> = None;
        // The restore benchmark times process start to this line.
        tracing::debug!(
            "running the vCPU on {} from instruction {}",
            self.kind.name(),
            self.engine.instructions()
        );
        loop {
            if let Some(o) = self.serve_control() {
                return o;
            }
            if let Some(line) = self.panic.panicked() {
                let at = *panicked_at.get_or_insert(self.engine.instructions());
                if self.engine.instructions() - at >= PANIC_GRACE {
                    return Outcome::NoProgress(report::no_progress(
                        self.engine.as_mut(),
                        &format!("the guest kernel panicked (\"{line}\"); it will not go on"),
                    ));
                }
            }
            if self.engine.instructions() >= limit {
                return Outcome::NoProgress(LIMIT_REACHED.into());
            }
            if self.threaded() {
                if let Some(o) = self.run_threads(limit) {
                    return o;
                }
                continue;
            }
            let smp = self.vcpus.len() > 1;
            if smp {
                let picked = self.serve_init_sipi().and_then(|()| self.pick_vcpu());
                match picked {
                    Ok(true) => {}
                    Ok(false) => {
                        if let Some(o) = self.wait_halted() {
                            return o;
                        }
                        continue;
                    }
                    Err(e) => {
                        return Outcome::Died(report::died(self.engine.as_mut(), &e.to_string()))
                    }
                }
            }
            let before = self.engine.instructions();
            let mut budget = if smp { SMP_SLICE } else { SLICE }.min(limit - before);
            // Virtual clock: stop where the next timer interrupt is due, so
            // that it comes at the same instruction on every engine.
            if let Some(n) = self.machine.instructions_to_next_event(before) {
                budget = budget.min(n);
            }
            if let Some((back, at)) = self.return_to {
                if before >= at {
                    self.return_to = None;
                    if let Err(why) = self.switch_engine(back) {
                        tracing::debug!("staying on {}: {why}", self.kind.name());
                    }
                }
            }
            let exit = match self.engine.run(&mut self.machine, budget) {
                Ok(x) => x,
                Err(EngineError::CannotContinue { engine, reason }) => {
                    if let Some(o) = self.fall_back(engine, &reason) {
                        return o;
                    }
                    continue;
                }
                Err(EngineError::Unsupported { engine, reason }) => {
                    return Outcome::Unsupported(format!(
                        "engine {engine} cannot run this guest: {reason}"
                    ))
                }
                Err(e) => return Outcome::Died(report::died(self.engine.as_mut(), &e.to_string())),
            };
            self.machine.advance(self.engine.instructions());
            if tracing::enabled!(tracing::Level::TRACE) {
                let st = self.engine.state();
                tracing::trace!(
                    "icount={} cs:eip={:04x}:{:08x} exit={:?}",
                    self.engine.instructions(),
                    st.seg[popek_cpu::state::seg::CS].selector,
                    st.rip,
                    exit
                );
            }
            match exit {
                VmExit::Budget => {
                    if self.engine.instructions() == before {
                        stuck_slices += 1;
                        if stuck_slices >= 3 {
                            return Outcome::NoProgress(report::no_progress(
                                self.engine.as_mut(),
                                "the guest retires no instructions: every attempt to run one raises \
                                 another exception or interrupt (an exception loop)",
                            ));
                        }
                    } else {
                        stuck_slices = 0;
                    }
                }
                VmExit::Halt if smp => {
                    let if_set =
                        self.engine.state().rflags & popek_cpu::state::flags::IF as u64 != 0;
                    self.vcpus[self.current].halted = Some(if_set);
                }
                VmExit::Halt => {
                    if let Some(o) = self.wait_halted() {
                        return o;
                    }
                }
                VmExit::Shutdown { reason } => {
                    return Outcome::Died(report::died(self.engine.as_mut(), &reason));
                }
                VmExit::Hypercall => {
                    if let Some(r) = hypercall::serve(
                        self.engine.as_mut(),
                        &mut self.machine,
                        &mut self.hypercalls,
                    ) {
                        return Self::stopped(r);
                    }
                }
                VmExit::MachineStop => {
                    if let Some(r) = self.machine.take_stop() {
                        return Self::stopped(r);
                    }
                }
                VmExit::IoIn { port, size } => {
                    let v = self.machine.io_in(port, size);
                    self.engine.complete_io_in(v as u64);
                }
                VmExit::IoOut { port, size, value } => self.machine.io_out(port, size, value),
                VmExit::MmioRead { addr, size } => {
                    let v = self.machine.mmio_read(addr, size);
                    self.engine.complete_io_in(v);
                }
                VmExit::MmioWrite { addr, size, value } => {
                    self.machine.mmio_write(addr, size, value)
                }
            }
            if let Some(r) = self.machine.take_stop() {
                return Self::stopped(r);
            }
            if let Some(o) = self.poll_input() {
                return o;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_mode_is_known_for_embedded_guests_and_flat_binaries() {
        let emb = |n: &str| guest_mode(&KernelSource::Embedded(n.into()));
        assert_eq!(emb("minios"), Some(GuestMode::Paged32));
        assert_eq!(emb("minios-pv"), Some(GuestMode::Paged32));
        assert_eq!(emb("minios64"), Some(GuestMode::LongFrom32));
        assert_eq!(emb("minios64-pv"), Some(GuestMode::LongFrom32));
        let file = |format| {
            guest_mode(&KernelSource::File {
                path: "k".into(),
                format,
            })
        };
        assert_eq!(
            file(Some(FileFormat::FlatReal { load_addr: 0x7c00 })),
            Some(GuestMode::Real)
        );
        assert_eq!(
            file(Some(FileFormat::FlatProtected { load_addr: 0x1000 })),
            Some(GuestMode::Protected32)
        );
        assert_eq!(
            file(Some(FileFormat::Linux)),
            None,
            "unreadable: found out at run time"
        );
        assert_eq!(file(None), None);
        assert_eq!(file(Some(FileFormat::Multiboot)), None);
    }

    #[test]
    fn linux_kernels_say_whether_they_are_64_bit() {
        assert_eq!(linux_64bit(b"\x7fELF not a bzImage"), None);
        let mut img = vec![0u8; 0x4000];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        if linux::is_bzimage(&img) && linux::parse_header(&img).is_ok() {
            assert_eq!(linux_64bit(&img), Some(false));
            img[0x236] = 1; // xloadflags: XLF_KERNEL_64
            assert_eq!(linux_64bit(&img), Some(true));
        }
    }

    #[test]
    fn unsupported_at_run_time_exits_2() {
        assert_eq!(Outcome::Unsupported("x".into()).exit_status(), 2);
    }
}
