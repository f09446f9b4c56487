//! The capability probe: what can this host's KVM run?
//!
//! A KVM is not always hardware VT. `kvm_pvm` (a software KVM used inside
//! cloud VMs without nested VT) runs real mode, unpaged protected mode and
//! long mode, but refuses 32-bit and PAE paging and fails to emulate some
//! instructions at CPL 0. So before `hw` is chosen for a guest, popek boots
//! tiny test guests ([`crate::guests`]) in each CPU mode and records what
//! happened; the result is cached per boot (keyed by the kernel's boot id),
//! in `$XDG_RUNTIME_DIR/popek/kvm-probe.json`, else
//! `/run/popek/kvm-probe.json`, else the temporary directory.
//!
//! What kind of KVM it is comes from the loaded kernel modules
//! (`/sys/module/kvm_pvm`, `kvm_intel`, `kvm_amd`): hardware VT when
//! `kvm_intel`/`kvm_amd` is loaded and `kvm_pvm` is not, software otherwise.
//! The probe runs confirm it (PVM refuses 32-bit paging; VT never does).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use popek_engine::{Engine, VmExit};
use popek_machine::{ClockMode, Machine, MachineConfig, StopReason};
use popek_memory::GuestRam;
use serde::{Deserialize, Serialize};

use crate::guests::{self, TestGuest};
use crate::Hw;

/// Bump when the probe changes, so that cached results are redone.
pub const PROBE_VERSION: u32 = 6;

/// How a test guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// It wrote this value to the debug-exit port.
    DebugExit(u8),
    /// It powered off or reset.
    Stopped(StopReason),
    /// Triple fault.
    Shutdown(String),
    /// It halted with nothing to wake it.
    Halted,
    /// A hypercall (the caller did not expect one).
    Hypercall,
    /// The engine failed (the report).
    Error(String),
    /// It did not end in time.
    Timeout,
}

/// Why a probe guest could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Its RAM could not be allocated or written.
    #[error("probe guest RAM")]
    Ram(#[from] popek_memory::MemoryError),
    /// Its machine could not be built.
    #[error("probe machine")]
    Machine(#[from] popek_machine::MachineError),
    /// The `hw` engine could not be created.
    #[error("probe engine")]
    Engine(#[from] crate::HwError),
    /// The engine refused the guest's entry state.
    #[error("probe guest state")]
    State(#[from] popek_engine::EngineError),
}

impl ProbeError {
    /// The message with its causes, on one line.
    pub fn chain(&self) -> String {
        popek_engine::error_chain(self)
    }
}

/// Boots `guest` on a fresh machine with `ram` bytes of RAM under `hw`,
/// until it ends or `timeout` passes.
pub fn run_guest(guest: &TestGuest, ram: u64, timeout: Duration) -> Result<GuestEnd, ProbeError> {
    run_guest_stats(guest, ram, timeout).map(|(end, _)| end)
}

/// As [`run_guest`], also returning the engine's exit counters.
pub fn run_guest_stats(
    guest: &TestGuest,
    ram: u64,
    timeout: Duration,
) -> Result<(GuestEnd, crate::HwStats), ProbeError> {
    run_guest_full(guest, ram, timeout).map(|(end, stats, _)| (end, stats))
}

/// As [`run_guest_stats`], also returning the guest RAM.
pub fn run_guest_full(
    guest: &TestGuest,
    ram: u64,
    timeout: Duration,
) -> Result<(GuestEnd, crate::HwStats, Arc<GuestRam>), ProbeError> {
    let ram = Arc::new(GuestRam::new(ram)?);
    let mut machine = Machine::new(
        MachineConfig {
            clock: ClockMode::Host,
            ..Default::default()
        },
        ram.clone(),
        Box::new(std::io::sink()),
    )?;
    guest.load(&ram)?;
    let mut hw = Hw::new(&machine)?;
    hw.set_state(guest.state.clone())?;
    let end = run_until_end(&mut hw, &mut machine, timeout);
    Ok((end, hw.hw_stats().clone(), ram))
}

/// The exit loop for test guests: like the VMM's, minus hypercalls and
/// terminal input.
pub fn run_until_end(hw: &mut dyn Engine, machine: &mut Machine, timeout: Duration) -> GuestEnd {
    let start = Instant::now();
    loop {
        if start.elapsed() > timeout {
            return GuestEnd::Timeout;
        }
        let exit = match hw.run(machine, 200_000) {
            Ok(x) => x,
            Err(e) => return GuestEnd::Error(e.to_string()),
        };
        machine.advance(hw.instructions());
        match exit {
            VmExit::Budget => {}
            VmExit::Halt => {
                let s = hw.state();
                if s.rflags & popek_cpu::state::flags::IF as u64 == 0 {
                    return GuestEnd::Halted;
                }
                if !machine.interrupt_pending() {
                    match machine.time_to_next_event(hw.instructions()) {
                        Some(d) => std::thread::sleep(d.min(Duration::from_millis(10))),
                        None => return GuestEnd::Halted,
                    }
                }
            }
            VmExit::Shutdown { reason } => return GuestEnd::Shutdown(reason),
            VmExit::Hypercall => return GuestEnd::Hypercall,
            VmExit::MachineStop => {}
            VmExit::IoIn { port, size } => {
                let v = machine.io_in(port, size);
                hw.complete_io_in(u64::from(v));
            }
            VmExit::IoOut { port, size, value } => machine.io_out(port, size, value),
            VmExit::MmioRead { addr, size } => {
                let v = machine.mmio_read(addr, size);
                hw.complete_io_in(v);
            }
            VmExit::MmioWrite { addr, size, value } => machine.mmio_write(addr, size, value),
        }
        match machine.take_stop() {
            Some(StopReason::DebugExit(v)) => return GuestEnd::DebugExit(v),
            Some(r) => return GuestEnd::Stopped(r),
            None => {}
        }
    }
}

/// The outcome of one probe guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The guest ran to its end as on hardware.
    pub ok: bool,
    /// What happened, in words.
    pub detail: String,
}

/// What kind of KVM the host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvmKind {
    /// No usable `/dev/kvm`.
    None,
    /// Hardware VT (`kvm_intel` or `kvm_amd`).
    Hardware,
    /// `kvm_pvm`: a software KVM (guest kernel code is emulated).
    Pvm,
    /// A KVM without a known hardware module.
    UnknownSoftware,
}

pub use popek_engine::GuestMode;

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// [`PROBE_VERSION`] of the code that probed.
    pub version: u32,
    /// `/proc/sys/kernel/random/boot_id` when probed.
    pub boot_id: String,
    /// The host kernel release.
    pub kernel: String,
    /// The KVM kind.
    pub kind: KvmKind,
    /// Why `/dev/kvm` is unusable, when it is.
    pub unavailable: Option<String>,
    /// KVM kernel modules loaded.
    pub modules: Vec<String>,
    /// Real mode.
    pub real_mode: Check,
    /// Unpaged 32-bit protected mode.
    pub protected32: Check,
    /// 32-bit paging (CR0.PG, 4 MiB pages).
    pub paging32: Check,
    /// PAE paging.
    pub pae: Check,
    /// 64-bit mode entered by the loader.
    pub long64: Check,
    /// Long mode entered from 32-bit code by the guest.
    pub long_from32: Check,
    /// `LAR` at CPL 0 (kvm_pvm fails to emulate it; the `hw` engine then
    /// finishes it itself, see [`crate::emulate`]).
    pub lar_cpl0: Check,
    /// `INT 0x80` from user mode reaches the guest's DPL-3 gate (kvm_pvm
    /// raises #UD instead).
    pub user_int: Check,
    /// `SYSCALL` from user mode reaches the guest's LSTAR at CPL 0.
    pub user_syscall: Check,
    /// `OUT` at CPL 3 with IOPL 0 and no I/O bitmap raises #GP (kvm_pvm
    /// performs the I/O instead).
    pub user_io_protection: Check,
    /// The guest TSC runs at the machine's 1 GHz (`KVM_SET_TSC_KHZ` took
    /// effect), measured against PIT ticks and host time.
    pub tsc_scaling: Check,
    /// Mean port-I/O exit round trip in ns (guest OUT → popek → guest).
    pub io_exit_ns: u64,
}

impl Capabilities {
    /// Whether this KVM is software (no hardware VT underneath).
    pub fn software(&self) -> bool {
        matches!(self.kind, KvmKind::Pvm | KvmKind::UnknownSoftware)
    }

    /// `Ok` when the KVM can run a guest needing `mode`, else why not.
    pub fn can_run(&self, mode: GuestMode) -> Result<(), String> {
        if let Some(why) = &self.unavailable {
            return Err(format!("no usable KVM: {why}"));
        }
        let (check, what) = match mode {
            GuestMode::Real => (&self.real_mode, "real mode"),
            GuestMode::Protected32 => (&self.protected32, "32-bit protected mode"),
            GuestMode::Paged32 => {
                if !self.paging32.ok {
                    (&self.paging32, "32-bit paging")
                } else {
                    (&self.pae, "PAE paging")
                }
            }
            GuestMode::Long64 => (&self.long64, "64-bit long mode"),
            GuestMode::LongFrom32 => (&self.long_from32, "entering long mode from 32-bit code"),
        };
        if check.ok {
            Ok(())
        } else {
            Err(format!(
                "the KVM here ({}) cannot run {what} (see `popek info`)",
                self.kind_name()
            ))
        }
    }

    /// The kind in words.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            KvmKind::None => "none",
            KvmKind::Hardware => "hardware VT",
            KvmKind::Pvm => "kvm_pvm, software",
            KvmKind::UnknownSoftware => "software, unknown",
        }
    }

    /// A human-readable summary, for `popek info`.
    pub fn report(&self) -> String {
        let mut s = format!(
            "KVM: {}\n  modules: {}\n  kernel: {}\n  boot id: {}\n",
            self.kind_name(),
            if self.modules.is_empty() {
                "(none)".to_string()
            } else {
                self.modules.join(", ")
            },
            self.kernel,
            self.boot_id
        );
        if let Some(u) = &self.unavailable {
            s.push_str(&format!("  unavailable: {u}\n"));
            return s;
        }
        for (name, c) in [
            ("real mode", &self.real_mode),
            ("32-bit protected mode (unpaged)", &self.protected32),
            ("32-bit paging", &self.paging32),
            ("PAE paging", &self.pae),
            ("long mode (entered by loader)", &self.long64),
            ("long mode (entered from 32-bit)", &self.long_from32),
            ("LAR at CPL 0", &self.lar_cpl0),
            ("INT 0x80 from user mode", &self.user_int),
            ("SYSCALL from user mode", &self.user_syscall),
            ("I/O protection at CPL 3", &self.user_io_protection),
            ("guest TSC at 1 GHz", &self.tsc_scaling),
        ] {
            s.push_str(&format!(
                "  {name:<34} {:<4} {}\n",
                if c.ok { "yes" } else { "no" },
                c.detail
            ));
        }
        s.push_str(&format!(
            "  port-I/O exit round trip          {:.1} µs\n",
            self.io_exit_ns as f64 / 1000.0
        ));
        s
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// KVM modules loaded on the host.
pub fn kvm_modules() -> Vec<String> {
    ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
        .map(|m| m.to_string())
        .collect()
}

/// The KVM kind the loaded modules tell.
pub fn kind_from_modules(modules: &[String]) -> KvmKind {
    let has = |m: &str| modules.iter().any(|x| x == m);
    if has("kvm_pvm") {
        KvmKind::Pvm
    } else if has("kvm_intel") || has("kvm_amd") {
        KvmKind::Hardware
    } else {
        KvmKind::UnknownSoftware
    }
}

fn check(guest: &TestGuest, marker: u8) -> Check {
    match run_guest(guest, guests::MIN_RAM, Duration::from_secs(2)) {
        Ok(GuestEnd::DebugExit(v)) if v == marker => Check {
            ok: true,
            detail: "ok".into(),
        },
        Ok(GuestEnd::Error(e)) => Check {
            ok: false,
            detail: e
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("engine hw cannot run this guest: ")
                .trim_start_matches("engine hw failed: ")
                .to_string(),
        },
        Ok(GuestEnd::Shutdown(_)) => Check {
            ok: false,
            detail: "the guest got an exception it should not (triple fault)".into(),
        },
        Ok(other) => Check {
            ok: false,
            detail: format!("unexpected end: {other:?}"),
        },
        Err(e) => Check {
            ok: false,
            detail: e.chain(),
        },
    }
}

/// LAR at CPL 0: kvm_pvm fails to emulate it and the engine finishes it
/// itself; say so.
fn lar_check() -> Check {
    use iced_x86::code_asm::*;
    let g = guests::long64(&|a| {
        a.mov(eax, guests::CS64 as u32)?;
        a.lar(ecx, eax)?;
        guests::debug_exit(a, 0x55)
    });
    match run_guest_stats(&g, guests::MIN_RAM, Duration::from_secs(2)) {
        Ok((GuestEnd::DebugExit(0x55), st)) if st.emulated == 0 => Check {
            ok: true,
            detail: "ok".into(),
        },
        Ok((GuestEnd::DebugExit(0x55), _)) => Check {
            ok: false,
            detail: "KVM emulation failure; popek finishes LAR/LSL itself".into(),
        },
        Ok((other, _)) => Check {
            ok: false,
            detail: format!("unexpected end: {other:?}"),
        },
        Err(e) => Check {
            ok: false,
            detail: e.chain(),
        },
    }
}

/// A user-mode probe: the guest ends with the vector its handler got.
fn vector_check(guest: &TestGuest, want: u8) -> Check {
    match run_guest(guest, guests::MIN_RAM, Duration::from_secs(2)) {
        Ok(GuestEnd::DebugExit(v)) if v == want => Check {
            ok: true,
            detail: "ok".into(),
        },
        Ok(GuestEnd::DebugExit(0x77)) => Check {
            ok: false,
            detail: "OUT 0xf4 at CPL 3 went through, no #GP".into(),
        },
        Ok(GuestEnd::DebugExit(0x5d)) => Check {
            ok: false,
            detail: "SYSCALL reached LSTAR but the CPU stayed at CPL 3".into(),
        },
        Ok(GuestEnd::DebugExit(v)) => Check {
            ok: false,
            detail: format!("the guest got vector {v:#x} instead"),
        },
        Ok(other) => Check {
            ok: false,
            detail: format!("unexpected end: {other:?}"),
        },
        Err(e) => Check {
            ok: false,
            detail: e.chain(),
        },
    }
}

/// RDTSC around 20 PIT ticks of 1 ms, against the host time of the run:
/// about one guest cycle per nanosecond when the TSC is scaled to 1 GHz.
fn tsc_check() -> Check {
    use iced_x86::code_asm::*;
    let store = |off: i32| {
        move |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.rdtsc()?;
            a.mov(rsi, 0x3100u64)?;
            a.mov(dword_ptr(rsi + off), eax)?;
            a.mov(dword_ptr(rsi + off + 4), edx)
        }
    };
    let (before, after) = (store(0), store(8));
    let g = guests::ticking(20, &before, &after);
    let start = Instant::now();
    let ram = match run_guest_full(&g, guests::MIN_RAM, Duration::from_secs(2)) {
        Ok((GuestEnd::DebugExit(0x70), _, ram)) => ram,
        Ok((other, _, _)) => {
            return Check {
                ok: false,
                detail: format!("unexpected end: {other:?}"),
            }
        }
        Err(e) => {
            return Check {
                ok: false,
                detail: e.chain(),
            }
        }
    };
    let wall_ns = start.elapsed().as_nanos() as f64;
    let mut q = [0u8; 16];
    let _ = ram.read(0x3100, &mut q);
    let t0 = u64::from_le_bytes(q[..8].try_into().expect("8 bytes"));
    let t1 = u64::from_le_bytes(q[8..].try_into().expect("8 bytes"));
    let rate = t1.wrapping_sub(t0) as f64 / wall_ns;
    Check {
        ok: (0.5..1.3).contains(&rate),
        detail: format!("guest TSC ≈ {rate:.2} GHz"),
    }
}

fn io_exit_ns() -> u64 {
    use iced_x86::code_asm::*;
    const N: u32 = 2000;
    let g = guests::long64(&|a| {
        let mut top = a.create_label();
        a.mov(ecx, N)?;
        a.set_label(&mut top)?;
        a.out(0x80, al)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        guests::debug_exit(a, 0x7e)
    });
    let start = Instant::now();
    match run_guest(&g, guests::MIN_RAM, Duration::from_secs(5)) {
        Ok(GuestEnd::DebugExit(0x7e)) => (start.elapsed().as_nanos() / u128::from(N)) as u64,
        _ => 0,
    }
}

/// Probes the KVM now (about 10–50 ms), without the cache.
pub fn probe_now() -> Capabilities {
    use iced_x86::code_asm::*;
    let modules = kvm_modules();
    let mut caps = Capabilities {
        version: PROBE_VERSION,
        boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        kind: kind_from_modules(&modules),
        unavailable: None,
        modules,
        real_mode: Check {
            ok: false,
            detail: "not probed".into(),
        },
        protected32: Check {
            ok: false,
            detail: "not probed".into(),
        },
        paging32: Check {
            ok: false,
            detail: "not probed".into(),
        },
        pae: Check {
            ok: false,
            detail: "not probed".into(),
        },
        long64: Check {
            ok: false,
            detail: "not probed".into(),
        },
        long_from32: Check {
            ok: false,
            detail: "not probed".into(),
        },
        lar_cpl0: Check {
            ok: false,
            detail: "not probed".into(),
        },
        user_int: Check {
            ok: false,
            detail: "not probed".into(),
        },
        user_syscall: Check {
            ok: false,
            detail: "not probed".into(),
        },
        user_io_protection: Check {
            ok: false,
            detail: "not probed".into(),
        },
        tsc_scaling: Check {
            ok: false,
            detail: "not probed".into(),
        },
        io_exit_ns: 0,
    };
    if let Err(e) = kvm_ioctls::Kvm::new() {
        caps.kind = KvmKind::None;
        caps.unavailable = Some(format!("/dev/kvm: {e}"));
        return caps;
    }
    caps.real_mode = check(&guests::real_mode(&|a| guests::debug_exit(a, 0x11)), 0x11);
    caps.protected32 = check(&guests::protected32(&|a| guests::debug_exit(a, 0x22)), 0x22);
    caps.paging32 = check(&guests::paged32(&|a| guests::debug_exit(a, 0x33)), 0x33);
    caps.pae = check(&guests::pae32(&|a| guests::debug_exit(a, 0x34)), 0x34);
    caps.long64 = check(&guests::long64(&|a| guests::debug_exit(a, 0x44)), 0x44);
    caps.long_from32 = check(&guests::long_from32(&|a| guests::debug_exit(a, 0x45)), 0x45);
    caps.lar_cpl0 = lar_check();
    caps.user_int = vector_check(
        &guests::user_mode(&|a| {
            a.int(0x80)?;
            a.hlt()
        }),
        0x80,
    );
    caps.user_syscall = vector_check(
        &guests::user_mode(&|a| {
            a.syscall()?;
            a.hlt()
        }),
        0x5c,
    );
    caps.user_io_protection = vector_check(
        &guests::user_mode(&|a| {
            a.mov(al, 0x77u32)?;
            a.out(0xf4, al)?;
            a.hlt()
        }),
        13,
    );
    if caps.kind == KvmKind::UnknownSoftware && caps.paging32.ok && caps.pae.ok {
        // Every mode works: whatever the module is called, it behaves as VT.
        caps.kind = KvmKind::Hardware;
    }
    caps.tsc_scaling = tsc_check();
    caps.io_exit_ns = io_exit_ns();
    caps
}

/// Where the per-boot cache lives.
pub fn cache_path() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("popek/kvm-probe.json");
    }
    let run = PathBuf::from("/run/popek");
    if std::fs::create_dir_all(&run).is_ok() {
        return run.join("kvm-probe.json");
    }
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("popek-{uid}/kvm-probe.json"))
}

/// The capabilities of this host's KVM: from the per-boot cache when it
/// is current, else probed now and cached.
pub fn probe() -> Capabilities {
    let path = cache_path();
    let boot_id = read_trim("/proc/sys/kernel/random/boot_id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(c) = serde_json::from_str::<Capabilities>(&text) {
            if c.version == PROBE_VERSION && c.boot_id == boot_id && !boot_id.is_empty() {
                return c;
            }
        }
    }
    let caps = probe_now();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_string_pretty(&caps) {
        // Write-then-rename, so a concurrent reader never sees half a file.
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_give_the_kind() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(kind_from_modules(&m(&["kvm", "kvm_pvm"])), KvmKind::Pvm);
        assert_eq!(
            kind_from_modules(&m(&["kvm", "kvm_intel"])),
            KvmKind::Hardware
        );
        assert_eq!(
            kind_from_modules(&m(&["kvm", "kvm_intel", "kvm_pvm"])),
            KvmKind::Pvm
        );
        assert_eq!(kind_from_modules(&m(&["kvm"])), KvmKind::UnknownSoftware);
    }

    #[test]
    fn can_run_names_the_missing_mode() {
        let ok = Check {
            ok: true,
            detail: "ok".into(),
        };
        let no = Check {
            ok: false,
            detail: "triple fault".into(),
        };
        let c = Capabilities {
            version: PROBE_VERSION,
            boot_id: "b".into(),
            kernel: "k".into(),
            kind: KvmKind::Pvm,
            unavailable: None,
            modules: vec![],
            real_mode: ok.clone(),
            protected32: ok.clone(),
            paging32: no.clone(),
            pae: no,
            long64: ok.clone(),
            long_from32: ok.clone(),
            lar_cpl0: ok.clone(),
            user_int: ok.clone(),
            user_syscall: ok.clone(),
            user_io_protection: ok.clone(),
            tsc_scaling: ok,
            io_exit_ns: 8000,
        };
        assert!(c.can_run(GuestMode::Long64).is_ok());
        let e = c.can_run(GuestMode::Paged32).unwrap_err();
        assert!(e.contains("32-bit paging") && e.contains("kvm_pvm"), "{e}");
        assert!(c.software());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Capabilities>(&json).unwrap(), c);
    }
}
