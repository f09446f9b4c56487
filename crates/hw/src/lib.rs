//! The `hw` engine: hardware-assisted virtualization through Linux KVM.
//!
//! The guest runs natively in the CPU's guest ("root") mode; every sensitive
//! instruction traps in hardware and only what KVM does not handle itself
//! comes back here as a VM exit. popek supplies the memory (the same
//! [`GuestRam`] mapping the other engines use, registered as KVM memory slot
//! 0), the devices (the machine's own PIC, PIT, UART… — KVM's in-kernel
//! irqchip is not used, so devices behave identically on every engine) and
//! the exit loop in [`Hw::run`]. See `docs/hw.md`.
//!
//! ```text
//!   Vm::run ──► Hw::run ──► KVM_RUN ──► guest
//!                  ▲  │ IO/MMIO exit: machine.io_in/io_out/mmio_*  (in the engine)
//!                  │  │ IRQ window:   KVM_INTERRUPT ← machine.acknowledge_interrupt
//!                  │  └ HLT / shutdown / hypercall / stop / slice end ──► VmExit
//! ```
//!
//! [`probe`] finds out what the host's KVM can run (real mode, 32-bit
//! paging, long mode) by booting tiny guests, and whether it is a software
//! KVM such as `kvm_pvm`.

#![deny(missing_docs)]

pub mod emulate;
pub mod guests;
pub mod probe;
pub mod regs;
mod timer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use popek_cpu::state::{flags, seg};
use popek_cpu::{paging, CpuState};
use popek_cpu::{Bus, BusAction, Vendor};
use popek_engine::bus::MachineBus;
use popek_engine::hypercall::HYPERCALL_PORT;
use popek_engine::{Engine, EngineError, EngineFactory, GuestMode, Inspect, VmExit};
use popek_machine::Machine;
use popek_memory::GuestRam;

pub use probe::{probe, Capabilities};

/// Where KVM may put the real-mode TSS (three pages) on VMX hosts without
/// unrestricted guest: above the largest RAM popek allows, below 4 GiB.
const TSS_ADDR: usize = 0xfffb_d000;
/// The identity-map page KVM uses for the same purpose.
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// The guest TSC rate popek asks for: the machine's 1 GHz.
const TSC_KHZ: u32 = 1_000_000;

/// Longest time the vCPU stays in KVM without giving the VMM a turn.
const MAX_SLICE: Duration = Duration::from_millis(10);
/// Shortest slice.
const MIN_SLICE: Duration = Duration::from_micros(100);

/// Why the `hw` engine could not be created.
#[derive(Debug, thiserror::Error)]
pub enum HwError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM set-up call failed.
    #[error("KVM set-up call {call} failed")]
    Setup {
        /// The failing call.
        call: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn setup(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HwError {
    move |e| HwError::Setup {
        call,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Whether `/dev/kvm` exists and opens.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// What the VMM knows of `hw` before it builds one: the KVM at hand and
/// what its probe found it can run.
pub struct HwFactory;

/// The `hw` engine's factory, for the VMM's list.
pub static FACTORY: HwFactory = HwFactory;

impl EngineFactory for HwFactory {
    fn name(&self) -> &'static str {
        "hw"
    }
    fn describe(&self) -> String {
        let kind = probe::kind_from_modules(&probe::kvm_modules());
        match kind {
            probe::KvmKind::Hardware => {
                "hw, hardware-assisted through the hardware-backed KVM here, runs this guest's CPU mode".into()
            }
            _ => "hw: no software engine runs this guest, and the KVM here (software, kvm_pvm) does".into(),
        }
    }
    fn available(&self) -> Result<(), String> {
        Kvm::new()
            .map(|_| ())
            .map_err(|e| format!("no usable KVM (/dev/kvm: {e})"))
    }
    fn can_run(&self, mode: GuestMode) -> Result<(), String> {
        // The probe (cached per boot) says what this KVM refuses; the
        // rest is found at run time.
        probe().can_run(mode)
    }
    fn accepts_vendor(&self, vendor: Vendor) -> Result<(), String> {
        // KVM runs guest code on the host's processor: its undefined
        // results are the host vendor's, whatever CPUID would claim.
        let host = Vendor::host();
        if vendor == host {
            Ok(())
        } else {
            Err(format!(
                "--cpu-vendor {vendor}: the hw engine runs guest code on this host's {host} processor; use the {host} profile or a software engine"
            ))
        }
    }
    fn auto_rank(&self) -> Option<u8> {
        // A software KVM (kvm_pvm) is ~30× slower than bt: only for the
        // guests no software engine runs.
        match probe::kind_from_modules(&probe::kvm_modules()) {
            probe::KvmKind::Hardware => Some(0),
            _ => Some(3),
        }
    }
    fn create(&self, machine: &Machine) -> Result<Box<dyn Engine>, EngineError> {
        let hw = Hw::new(machine).map_err(|e| EngineError::Setup {
            engine: "hw",
            source: Box::new(e),
        })?;
        Ok(Box::new(hw))
    }
}

/// Exit counters, for `--stats`.
#[derive(Clone, Debug, Default)]
pub struct HwStats {
    /// `KVM_RUN` calls.
    pub runs: u64,
    /// Port I/O exits.
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// Hypercalls.
    pub hypercalls: u64,
    /// Interrupts injected with `KVM_INTERRUPT`.
    pub interrupts: u64,
    /// Interrupt-window exits.
    pub irq_windows: u64,
    /// Slice ends (the timer signal got the vCPU out of KVM).
    pub slice_ends: u64,
    /// Instructions the KVM failed to emulate and popek finished (LAR/LSL
    /// on kvm_pvm).
    pub emulated: u64,
}

/// KVM's view of the vCPU registers, as last read or written, with popek's
/// state built from it.
struct Snapshot {
    state: CpuState,
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    debugregs: kvm_debugregs,
    events: kvm_vcpu_events,
    msrs: Vec<(u32, u64)>,
}

/// What a `KVM_RUN` returned, without the borrow of the run structure.
#[derive(Clone, Copy, Debug)]
enum Exit {
    Io,
    Mmio,
    Hlt,
    IrqWindow,
    Shutdown,
    FailEntry(u64),
    Internal,
    Intr,
    SystemEvent(u32),
    Other(&'static str),
    Interrupted,
}

fn classify(e: &VcpuExit<'_>) -> Exit {
    match e {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Exit::Io,
        VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..) => Exit::Mmio,
        VcpuExit::Hlt => Exit::Hlt,
        VcpuExit::IrqWindowOpen => Exit::IrqWindow,
        VcpuExit::Shutdown => Exit::Shutdown,
        VcpuExit::FailEntry(r, _) => Exit::FailEntry(*r),
        VcpuExit::InternalError => Exit::Internal,
        VcpuExit::Intr => Exit::Intr,
        VcpuExit::SystemEvent(t, _) => Exit::SystemEvent(*t),
        VcpuExit::Unknown => Exit::Other("KVM_EXIT_UNKNOWN"),
        VcpuExit::Exception => Exit::Other("KVM_EXIT_EXCEPTION"),
        VcpuExit::Debug(_) => Exit::Other("KVM_EXIT_DEBUG"),
        VcpuExit::Hypercall(_) => Exit::Other("KVM_EXIT_HYPERCALL"),
        VcpuExit::Nmi => Exit::Other("KVM_EXIT_NMI"),
        VcpuExit::X86Rdmsr(_) => Exit::Other("KVM_EXIT_X86_RDMSR"),
        VcpuExit::X86Wrmsr(_) => Exit::Other("KVM_EXIT_X86_WRMSR"),
        VcpuExit::MemoryFault { .. } => Exit::Other("KVM_EXIT_MEMORY_FAULT"),
        _ => Exit::Other("an unexpected KVM exit"),
    }
}

/// The `hw` engine: one KVM VM with one vCPU.
pub struct Hw {
    // Field order is drop order: the vCPU before the VM before /dev/kvm.
    vcpu: VcpuFd,
    vm: Arc<VmFd>,
    kvm: Arc<Kvm>,
    ram: Arc<GuestRam>,
    /// Valid while the vCPU has not run since it was read or written.
    snap: Option<Snapshot>,
    /// The vCPU executed HLT (or a halting hypercall) and waits for an
    /// interrupt; KVM itself has already moved RIP past the HLT.
    halted: bool,
    /// An I/O or MMIO exit whose completion KVM does on the next KVM_RUN.
    io_pending: bool,
    timer: timer::SliceTimer,
    guest_ns: u64,
    stats: HwStats,
    msr_indices: Vec<u32>,
    /// The KVM is software (kvm_pvm or unknown), from the loaded modules.
    software: bool,
    /// The firmware ROM's copy that KVM maps below 4 GiB (memory slot 1).
    rom: Option<GuestRam>,
}

impl std::fmt::Debug for Hw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hw")
            .field("halted", &self.halted)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn internal(reason: String) -> EngineError {
    EngineError::Internal {
        engine: "hw",
        reason,
    }
}

impl Hw {
    /// A VM and vCPU on the machine's RAM, with KVM's supported CPUID. The
    /// vCPU starts in KVM's reset state; the VMM sets the boot entry state
    /// with [`Engine::set_state`].
    pub fn new(machine: &Machine) -> Result<Hw, HwError> {
        let mut hw = Self::with_ram(machine.ram().clone())?;
        if let Some(rom) = machine.firmware_rom() {
            hw.map_rom(rom)?;
        }
        Ok(hw)
    }

    /// Maps a firmware ROM read-only at the top of the 4 GiB (memory slot
    /// 1), as the machine does; a write to it exits as MMIO, which the
    /// machine ignores. Where KVM lacks read-only slots the copy is
    /// writable, which only the guest's own ROM copy sees.
    fn map_rom(&mut self, rom: &[u8]) -> Result<(), HwError> {
        let mapping = |e: popek_memory::MemoryError| HwError::Setup {
            call: "mmap (the firmware ROM's copy)",
            source: std::io::Error::other(e.to_string()),
        };
        let copy = GuestRam::new(rom.len() as u64).map_err(mapping)?;
        copy.write(0, rom).map_err(mapping)?;
        let readonly = self.vm.check_extension(kvm_ioctls::Cap::ReadonlyMem);
        let region = kvm_userspace_memory_region {
            slot: 1,
            flags: if readonly {
                kvm_bindings::KVM_MEM_READONLY
            } else {
                0
            },
            guest_phys_addr: (1u64 << 32) - rom.len() as u64,
            memory_size: rom.len() as u64,
            userspace_addr: copy.host_ptr() as u64,
        };
        // SAFETY: the region is the whole mapping of `copy`, which `self.rom`
        // keeps alive for as long as the VM exists (the VM fd is dropped
        // first: field order).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(setup("KVM_SET_USER_MEMORY_REGION (firmware ROM)"))?;
        self.rom = Some(copy);
        Ok(())
    }

    /// As [`Hw::new`], on bare RAM (for the probe and tests).
    pub fn with_ram(ram: Arc<GuestRam>) -> Result<Hw, HwError> {
        let kvm = Kvm::new().map_err(HwError::NoKvm)?;
        let vm = kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?;
        // Needed by VMX without unrestricted guest for real mode; refused or
        // ignored elsewhere (AMD, kvm_pvm), which is fine.
        if let Err(e) = vm.set_identity_map_address(IDENTITY_MAP_ADDR) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
        }
        if let Err(e) = vm.set_tss_address(TSS_ADDR) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e}");
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_ptr() as u64,
        };
        // SAFETY: the region is the whole GuestRam mapping, which `self.ram`
        // keeps alive for as long as the VM exists (the VM fd is dropped
        // before the Arc).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(setup("KVM_SET_USER_MEMORY_REGION"))?;
        Self::vcpu_of(Arc::new(kvm), Arc::new(vm), ram, 0)
    }

    /// vCPU `index` of the KVM VM `vm`.
    fn vcpu_of(
        kvm: Arc<Kvm>,
        vm: Arc<VmFd>,
        ram: Arc<GuestRam>,
        index: usize,
    ) -> Result<Hw, HwError> {
        let vcpu = vm
            .create_vcpu(index as u64)
            .map_err(setup("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                // The local APIC is the machine's, reached through MMIO
                // exits: without KVM's in-kernel APIC neither the x2APIC
                // MSRs nor IA32_TSC_DEADLINE reach it.
                e.ecx &= !((1 << 21) | (1 << 24));
                // Each vCPU's initial APIC ID, as the machine numbers them.
                e.ebx = (e.ebx & 0x00ff_ffff) | ((index as u32) << 24);
            }
            if e.function == 0xb || e.function == 0x1f {
                e.edx = index as u32;
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
        // The machine's TSC runs at 1 GHz on every engine (a cycle is a
        // nanosecond, so guest benchmarks compare across engines): ask KVM
        // to scale the guest's to match. Whether it really does is for the
        // probe to find out (kvm_pvm accepts the call and keeps the host rate).
        if let Err(e) = vcpu.set_tsc_khz(TSC_KHZ) {
            tracing::debug!("KVM_SET_TSC_KHZ: {e}");
        }
        let timer = timer::SliceTimer::new().map_err(|source| HwError::Setup {
            call: "timer_create",
            source,
        })?;
        let mut hw = Hw {
            vcpu,
            vm,
            kvm,
            ram,
            snap: None,
            halted: false,
            io_pending: false,
            timer,
            guest_ns: 0,
            stats: HwStats::default(),
            msr_indices: regs::MSR_INDICES.to_vec(),
            software: probe::kind_from_modules(&probe::kvm_modules()) != probe::KvmKind::Hardware,
            rom: None,
        };
        // Keep only the MSRs this KVM lets us read (KVM_GET_MSRS stops at
        // the first it refuses).
        let n = hw.read_msrs().len();
        hw.msr_indices.truncate(n);
        Ok(hw)
    }

    /// The VM file descriptor (for tools and benchmarks).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Forgets the cached vCPU state, so the next [`Engine::state`] reads
    /// it from KVM again.
    pub fn refresh(&mut self) {
        self.snap = None;
    }

    /// Exit counters.
    pub fn hw_stats(&self) -> &HwStats {
        &self.stats
    }

    fn read_msrs(&self) -> Vec<(u32, u64)> {
        let entries: Vec<kvm_msr_entry> = self
            .msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            return Vec::new();
        };
        let n = self.vcpu.get_msrs(&mut msrs).unwrap_or(0);
        msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect()
    }

    fn fetch(&mut self) -> Result<&Snapshot, EngineError> {
        if self.snap.is_none() {
            let err = |what: &str, e: kvm_ioctls::Error| internal(format!("{what}: {e}"));
            let regs = self.vcpu.get_regs().map_err(|e| err("KVM_GET_REGS", e))?;
            let sregs = self.vcpu.get_sregs().map_err(|e| err("KVM_GET_SREGS", e))?;
            let fpu = self.vcpu.get_fpu().map_err(|e| err("KVM_GET_FPU", e))?;
            let debugregs = self.vcpu.get_debug_regs().unwrap_or_default();
            let events = self.vcpu.get_vcpu_events().unwrap_or_default();
            let msrs = self.read_msrs();
            let mut state = CpuState::reset();
            regs::regs_from_kvm(&regs, &mut state);
            regs::sregs_from_kvm(&sregs, &mut state);
            state.fpu = regs::fpu_from_kvm(&fpu);
            regs::debugregs_from_kvm(&debugregs, &mut state);
            for &(i, v) in &msrs {
                regs::msr_store(&mut state.msr, i, v);
            }
            state.interrupt_shadow = events.interrupt.shadow != 0;
            self.snap = Some(Snapshot {
                state,
                regs,
                sregs,
                fpu,
                debugregs,
                events,
                msrs,
            });
        }
        Ok(self.snap.as_ref().expect("just filled"))
    }

    /// Lets KVM finish an I/O or MMIO instruction whose exit was served
    /// (it copies IN data to RAX and advances RIP at the next `KVM_RUN`),
    /// without running the guest further: `KVM_RUN` with `immediate_exit`.
    fn complete_io(&mut self) -> Result<(), EngineError> {
        if !self.io_pending {
            return Ok(());
        }
        self.io_pending = false;
        self.vcpu.set_kvm_immediate_exit(1);
        let r = self.vcpu.run().map(|e| classify(&e));
        self.vcpu.set_kvm_immediate_exit(0);
        self.snap = None;
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(internal(format!("KVM_RUN (completing an I/O exit): {e}"))),
            Ok(x) => Err(internal(format!(
                "KVM_RUN with immediate_exit returned {x:?} instead of EINTR"
            ))),
        }
    }

    /// Offers the machine's pending interrupt (8259 INTR) to the vCPU:
    /// injects it when the guest can take it now, else asks KVM for an
    /// interrupt-window exit.
    fn offer_interrupt(&mut self, machine: &mut dyn Bus) -> Result<(), EngineError> {
        if machine.nmi_pending() {
            // KVM queues the NMI and delivers it when the guest's NMI
            // blocking allows.
            self.vcpu
                .nmi()
                .map_err(|e| internal(format!("KVM_NMI: {e}")))?;
            machine.acknowledge_nmi();
        }
        let pending = machine.interrupt_pending();
        // Whether the guest accepts an interrupt now: KVM says so at each
        // exit; once the VMM has read (and perhaps changed) the state, the
        // state decides — IF set and no STI/MOV SS shadow.
        let can = pending
            && match &self.snap {
                Some(s) => s.state.rflags & flags::IF as u64 != 0 && !s.state.interrupt_shadow,
                None => {
                    let run = self.vcpu.get_kvm_run();
                    run.ready_for_interrupt_injection != 0 && run.if_flag != 0
                }
            };
        if can {
            let vector = machine.acknowledge_interrupt();
            let irq = kvm_bindings::kvm_interrupt {
                irq: u32::from(vector),
            };
            // SAFETY: KVM_INTERRUPT on a vCPU fd reads one kvm_interrupt,
            // which `irq` is.
            let r = unsafe {
                vmm_sys_util::ioctl::ioctl_with_ref(&self.vcpu, kvm_interrupt_ioctl(), &irq)
            };
            if r < 0 {
                return Err(internal(format!(
                    "KVM_INTERRUPT (vector {vector:#x}): {}",
                    std::io::Error::last_os_error()
                )));
            }
            self.stats.interrupts += 1;
            self.halted = false;
            self.snap = None;
        }
        self.vcpu.get_kvm_run().request_interrupt_window = u8::from(pending && !can);
        Ok(())
    }

    /// Serves a `KVM_EXIT_IO`. Returns the VM exit to report, if any.
    fn port_io(&mut self, machine: &mut dyn Bus) -> Result<Option<VmExit>, EngineError> {
        self.stats.io += 1;
        let run_size = self.vm.run_size();
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO, so `io` is the live union member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let (port, size, count) = (io.port, io.size, io.count as usize);
        let len = usize::from(size) * count;
        if !(matches!(size, 1 | 2 | 4)) || io.data_offset as usize + len > run_size {
            return Err(internal(format!(
                "KVM_EXIT_IO with a malformed data area (port {port:#x}, size {size}, count {count})"
            )));
        }
        let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        // SAFETY: KVM puts the data area inside the kvm_run mapping (checked
        // against its size above); nothing else aliases it until the next run.
        let data =
            unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
        self.io_pending = true;
        if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
            if port == HYPERCALL_PORT && size == 4 && count == 1 && self.doorbell_cpl()? < 3 {
                // Complete the IN with EAX's own value, so that the VMM
                // finds the hypercall number in EAX and RIP past the IN —
                // the state the software engines stop with. (KVM writes the
                // data to EAX at the next KVM_RUN: see `complete_io`.)
                let rax = self
                    .vcpu
                    .get_regs()
                    .map_err(|e| internal(format!("KVM_GET_REGS: {e}")))?
                    .rax;
                data.copy_from_slice(&(rax as u32).to_le_bytes());
                self.complete_io()?;
                self.stats.hypercalls += 1;
                return Ok(Some(VmExit::Hypercall));
            }
            for chunk in data.chunks_mut(usize::from(size)) {
                let v = machine.io_in(port, size);
                chunk.copy_from_slice(&v.to_le_bytes()[..usize::from(size)]);
            }
        } else {
            let mut stop = false;
            for chunk in data.chunks(usize::from(size)) {
                let mut b = [0u8; 4];
                b[..chunk.len()].copy_from_slice(chunk);
                stop |= machine.io_out(port, size, u32::from_le_bytes(b)) == BusAction::Stop;
            }
            if stop {
                self.complete_io()?;
                return Ok(Some(VmExit::MachineStop));
            }
        }
        Ok(None)
    }

    /// The CPL of an IN at the doorbell port. The ABI accepts hypercalls
    /// from CPL < 3 only; from user mode the IN is an ordinary port read
    /// (on VT hardware it exits only when IOPL or the TSS bitmap allow it).
    fn doorbell_cpl(&mut self) -> Result<u8, EngineError> {
        let sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| internal(format!("KVM_GET_SREGS: {e}")))?;
        Ok(if sregs.cr0 & 1 == 0 {
            0
        } else {
            sregs.ss.dpl & 3
        })
    }

    /// Serves a `KVM_EXIT_MMIO`.
    fn mmio(&mut self, machine: &mut dyn Bus) -> Result<Option<VmExit>, EngineError> {
        self.stats.mmio += 1;
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_MMIO, so `mmio` is the live member.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(8);
        self.io_pending = true;
        if mmio.is_write != 0 {
            let mut b = [0u8; 8];
            b[..len].copy_from_slice(&mmio.data[..len]);
            let action = machine.mmio_write(mmio.phys_addr, len as u8, u64::from_le_bytes(b));
            if action == BusAction::Stop {
                self.complete_io()?;
                return Ok(Some(VmExit::MachineStop));
            }
        } else {
            let v = machine.mmio_read(mmio.phys_addr, len as u8);
            mmio.data[..len].copy_from_slice(&v.to_le_bytes()[..len]);
        }
        Ok(None)
    }

    /// A failure report: what KVM said, the registers (64-bit) and the
    /// instruction bytes (KVM's own copy when it gives one).
    fn failure(&mut self, what: String, kvm_insn: Option<Vec<u8>>) -> EngineError {
        let mut text = what;
        let state = match self.fetch() {
            Ok(s) => s.state.clone(),
            Err(e) => return internal(format!("{text} (and the registers are unreadable: {e})")),
        };
        text.push('\n');
        text.push_str(&state.to_string());
        let cs = state.seg[seg::CS];
        let bytes = match kvm_insn {
            Some(b) if !b.is_empty() => b,
            _ => {
                let mut b = Vec::new();
                for i in 0..15u64 {
                    let mut one = [0u8];
                    if self
                        .peek_linear(cs.base.wrapping_add(state.rip).wrapping_add(i), &mut one)
                        .is_none()
                    {
                        break;
                    }
                    b.push(one[0]);
                }
                b
            }
        };
        text.push_str("\n  ");
        text.push_str(&state.instruction_line(&bytes));
        internal(text)
    }

    /// On a software KVM that refuses 32-bit and PAE paging (kvm_pvm), a
    /// guest that turns paging on outside long mode gets #GP at its MOV to
    /// CR0 and, without a handler, triple-faults there. Recognizes that
    /// case, so popek can say "this KVM cannot run this guest" instead of
    /// "the guest died".
    fn refused_paging(&mut self) -> Option<String> {
        if !self.software {
            return None;
        }
        let s = self.fetch().ok()?.state.clone();
        if s.efer & (1 << 8) != 0 {
            return None;
        }
        let mut b = [0u8; 15];
        let lin = s.seg[seg::CS].base.wrapping_add(s.rip);
        let n = (0..15)
            .take_while(|&i| self.peek_linear(lin + i as u64, &mut b[i..i + 1]).is_some())
            .count();
        let mut dec = iced_x86::Decoder::with_ip(
            s.code_bits(),
            &b[..n],
            s.rip,
            iced_x86::DecoderOptions::NONE,
        );
        let insn = dec.decode();
        if insn.code() != iced_x86::Code::Mov_cr_r32
            || insn.op0_register() != iced_x86::Register::CR0
        {
            return None;
        }
        let src = insn.op1_register().full_register();
        let idx = src as usize - iced_x86::Register::RAX as usize;
        let value = *s.gpr.get(idx)?;
        (value & popek_cpu::state::cr::CR0_PG != 0).then(|| {
            format!(
                "the KVM here (software, e.g. kvm_pvm) refuses {} paging: the guest's MOV to CR0 turning paging on at {:#x} faulted",
                if s.cr4 & popek_cpu::state::cr::CR4_PAE != 0 { "PAE" } else { "32-bit" },
                s.rip
            )
        })
    }

    /// After an emulation failure: finishes the instruction in popek when
    /// it is one [`emulate`] knows (LAR, LSL on kvm_pvm). Returns whether
    /// it did (the vCPU state is then updated and the guest can resume).
    fn emulate_failed_instruction(&mut self) -> Result<bool, EngineError> {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, whose
        // emulation-failure layout overlays `internal`.
        let emu = unsafe { run.__bindgen_anon_1.emulation_failure };
        if emu.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return Ok(false);
        }
        let mut state = self.fetch()?.state.clone();
        let mut bytes = [0u8; 15];
        let lin = state.seg[seg::CS].base.wrapping_add(state.rip);
        let n = (0..15)
            .take_while(|&i| {
                self.peek_linear(lin + i as u64, &mut bytes[i..i + 1])
                    .is_some()
            })
            .count();
        struct Mem<'a>(&'a mut Hw);
        impl emulate::LinearRead for Mem<'_> {
            fn read_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
                self.0.peek_linear(addr, buf)
            }
            fn write_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
                self.0.poke_linear(addr, data)
            }
        }
        let bitness = state.code_bits();
        let Some(what) = emulate::emulate(&mut state, &bytes[..n], bitness, &mut Mem(self)) else {
            return Ok(false);
        };
        tracing::trace!("hw: emulated {what} at {:#x}", state.rip);
        self.stats.emulated += 1;
        state.halted = self.halted;
        self.set_state(state)?;
        Ok(true)
    }

    fn internal_error(&mut self) -> EngineError {
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR: `internal` is
        // live, and `emulation_failure` overlays it for the emulation suberror.
        let (internal_err, emu) = unsafe {
            (
                run.__bindgen_anon_1.internal,
                run.__bindgen_anon_1.emulation_failure,
            )
        };
        let sub = internal_err.suberror;
        let name = match sub {
            kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
            kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
            kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
            kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
            _ => "unknown suberror",
        };
        let mut insn = None;
        if sub == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION
            && emu.flags
                & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                != 0
        {
            // SAFETY: the flag says the instruction bytes are present.
            let b = unsafe { emu.__bindgen_anon_1.__bindgen_anon_1 };
            insn = Some(b.insn_bytes[..usize::from(b.insn_size).min(15)].to_vec());
        }
        let n = (internal_err.ndata as usize).min(16);
        let data: Vec<String> = internal_err.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        self.failure(
            format!(
                "KVM_EXIT_INTERNAL_ERROR, suberror {sub} ({name}); data [{}]",
                data.join(", ")
            ),
            insn,
        )
    }
}

/// `KVM_INTERRUPT` = `_IOW(KVMIO, 0x86, struct kvm_interrupt)`.
fn kvm_interrupt_ioctl() -> libc::c_ulong {
    const IOC_WRITE: libc::c_ulong = 1;
    (IOC_WRITE << 30)
        | ((std::mem::size_of::<kvm_bindings::kvm_interrupt>() as libc::c_ulong) << 16)
        | (0xae << 8)
        | 0x86
}

impl Engine for Hw {
    fn name(&self) -> &'static str {
        "hw"
    }

    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError> {
        // The slice: the budget at one instruction per nanosecond, extended
        // up to the machine's next timer event (nothing else needs the VMM
        // while the guest computes), within [MIN_SLICE, MAX_SLICE].
        let mut slice = Duration::from_nanos(budget);
        if let Some(next) = machine.time_to_next_event(self.guest_ns) {
            slice = slice.max(next);
        } else {
            slice = MAX_SLICE;
        }
        let mut bus = MachineBus::new(machine);
        self.run_slice(&mut bus, slice)
    }

    fn share_code(&mut self, _map: Arc<popek_cpu::CodeMap>, _index: usize) -> bool {
        // KVM keeps the vCPUs' view of memory coherent itself.
        true
    }

    fn kicker(&self) -> Option<popek_engine::Kicker> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        Some(Box::new(move || timer::kick(me)))
    }

    fn run_on(&mut self, bus: &mut dyn Bus, budget: u64) -> Option<Result<VmExit, EngineError>> {
        Some(self.run_slice(bus, Duration::from_nanos(budget)))
    }

    fn vcpu_engine(&mut self, index: usize) -> Option<Result<Box<dyn Engine + Send>, EngineError>> {
        let made = Hw::vcpu_of(self.kvm.clone(), self.vm.clone(), self.ram.clone(), index);
        Some(
            made.map(|hw| Box::new(hw) as Box<dyn Engine + Send>)
                .map_err(|e| EngineError::Setup {
                    engine: "hw",
                    source: Box::new(e),
                }),
        )
    }

    fn state(&mut self) -> CpuState {
        let halted = self.halted;
        match self.fetch() {
            Ok(s) => {
                let mut st = s.state.clone();
                st.halted = halted;
                st
            }
            Err(e) => {
                tracing::error!("hw: cannot read the vCPU state: {e}");
                CpuState::reset()
            }
        }
    }

    fn set_state(&mut self, state: CpuState) -> Result<(), EngineError> {
        self.complete_io()?;
        self.fetch()?;
        let snap = self.snap.as_mut().expect("fetched");
        let err = |what: &str, e: kvm_ioctls::Error| EngineError::Unsupported {
            engine: "hw",
            reason: format!("{what} refused this vCPU state: {e}"),
        };
        // Write back only the groups that changed, compared in popek's
        // terms: a KVM structure popek cannot represent exactly (reserved
        // bits, KVM-only fields) is never rewritten by a no-op set_state.
        let old = &snap.state;
        if state.gpr != old.gpr || state.rip != old.rip || state.rflags != old.rflags {
            let r = regs::regs_to_kvm(&state);
            self.vcpu.set_regs(&r).map_err(|e| err("KVM_SET_REGS", e))?;
            snap.regs = r;
        }
        if state.seg != old.seg
            || state.ldtr != old.ldtr
            || state.tr != old.tr
            || state.gdtr != old.gdtr
            || state.idtr != old.idtr
            || (
                state.cr0, state.cr2, state.cr3, state.cr4, state.cr8, state.efer,
            ) != (old.cr0, old.cr2, old.cr3, old.cr4, old.cr8, old.efer)
            || state.msr.apic_base != old.msr.apic_base
        {
            let s = regs::sregs_to_kvm(&state, &snap.sregs);
            if let Err(e) = self.vcpu.set_sregs(&s) {
                self.snap = None;
                return Err(err("KVM_SET_SREGS", e));
            }
            snap.sregs = s;
        }
        if state.fpu != old.fpu {
            let f = regs::fpu_to_kvm(&state.fpu);
            self.vcpu.set_fpu(&f).map_err(|e| err("KVM_SET_FPU", e))?;
            snap.fpu = f;
        }
        if state.dr != old.dr {
            let d = regs::debugregs_to_kvm(&state);
            self.vcpu
                .set_debug_regs(&d)
                .map_err(|e| err("KVM_SET_DEBUGREGS", e))?;
            snap.debugregs = d;
        }
        let vals = regs::msrs_values(&state.msr);
        let want: Vec<(u32, u64)> = regs::MSR_INDICES
            .iter()
            .zip(vals)
            .filter(|(i, _)| self.msr_indices.contains(i))
            .map(|(i, v)| (*i, v))
            .collect();
        if want != snap.msrs {
            let entries: Vec<kvm_msr_entry> = want
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs =
                Msrs::from_entries(&entries).map_err(|e| internal(format!("MSR list: {e:?}")))?;
            self.vcpu
                .set_msrs(&msrs)
                .map_err(|e| err("KVM_SET_MSRS", e))?;
            snap.msrs = want;
        }
        if state.interrupt_shadow != (snap.events.interrupt.shadow != 0) {
            let mut ev = snap.events;
            ev.interrupt.shadow = u8::from(state.interrupt_shadow);
            ev.flags = 0;
            self.vcpu
                .set_vcpu_events(&ev)
                .map_err(|e| err("KVM_SET_VCPU_EVENTS", e))?;
            snap.events = ev;
        }
        self.halted = state.halted;
        snap.state = state;
        snap.state.halted = false;
        Ok(())
    }

    fn instructions(&self) -> u64 {
        self.guest_ns
    }

    fn set_instructions(&mut self, n: u64) {
        self.guest_ns = n;
    }

    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        let state = self.fetch().ok()?.state.clone();
        for (i, b) in buf.iter_mut().enumerate() {
            let pa = paging::peek(&self.ram, &state, addr.wrapping_add(i as u64))?;
            let mut one = [0u8];
            self.ram.read(pa, &mut one).ok()?;
            *b = one[0];
        }
        Some(())
    }

    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        let state = self.fetch().ok()?.state.clone();
        let mut pas = Vec::with_capacity(data.len());
        for i in 0..data.len() {
            pas.push(paging::peek(
                &self.ram,
                &state,
                addr.wrapping_add(i as u64),
            )?);
        }
        for (pa, b) in pas.into_iter().zip(data) {
            self.ram.write(pa, &[*b]).ok()?;
        }
        Some(())
    }

    fn inspect(&mut self) -> Option<&mut dyn Inspect> {
        Some(self)
    }
}

impl Inspect for Hw {
    fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("guest time (ns)", self.guest_ns),
            ("KVM_RUN calls", s.runs),
            ("port I/O exits", s.io),
            ("MMIO exits", s.mmio),
            ("HLT exits", s.hlt),
            ("hypercalls", s.hypercalls),
            ("interrupts injected", s.interrupts),
            ("interrupt-window exits", s.irq_windows),
            ("slice ends", s.slice_ends),
            ("instructions popek emulated", s.emulated),
        ]
    }
}

impl Hw {
    /// Runs the vCPU for about `slice` (within [MIN_SLICE, MAX_SLICE]), its
    /// exits served by `machine`.
    fn run_slice(&mut self, machine: &mut dyn Bus, slice: Duration) -> Result<VmExit, EngineError> {
        self.complete_io()?;
        let slice = slice.clamp(MIN_SLICE, MAX_SLICE);
        let start = Instant::now();
        let deadline = start + slice;
        self.timer
            .ensure_thread()
            .map_err(|e| internal(format!("timer_create: {e}")))?;
        let immediate_exit: *mut u8 = &mut self.vcpu.get_kvm_run().immediate_exit;
        // SAFETY: the kvm_run mapping lives as long as `self.vcpu`, which
        // outlives this guard (dropped at the end of this function).
        let _armed = unsafe { timer::Armed::new(immediate_exit) };
        self.timer.arm(slice);
        let result = self.run_loop(machine, deadline);
        self.timer.arm(Duration::ZERO);
        self.vcpu.set_kvm_immediate_exit(0);
        result
    }

    fn run_loop(
        &mut self,
        machine: &mut dyn Bus,
        deadline: Instant,
    ) -> Result<VmExit, EngineError> {
        loop {
            self.offer_interrupt(machine)?;
            if self.halted {
                return Ok(VmExit::Halt);
            }
            if Instant::now() >= deadline {
                self.stats.slice_ends += 1;
                return Ok(VmExit::Budget);
            }
            self.snap = None;
            self.stats.runs += 1;
            let t0 = Instant::now();
            let exit = match self.vcpu.run() {
                Ok(e) => classify(&e),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Exit::Interrupted
                }
                Err(e) => {
                    return Err(self.failure(format!("KVM_RUN failed: {e}"), None));
                }
            };
            self.guest_ns += t0.elapsed().as_nanos() as u64;
            match exit {
                Exit::Io => {
                    if let Some(x) = self.port_io(machine)? {
                        return Ok(x);
                    }
                }
                Exit::Mmio => {
                    if let Some(x) = self.mmio(machine)? {
                        return Ok(x);
                    }
                }
                Exit::Hlt => {
                    self.stats.hlt += 1;
                    self.halted = true;
                }
                Exit::IrqWindow => self.stats.irq_windows += 1,
                Exit::Interrupted | Exit::Intr => {
                    self.vcpu.set_kvm_immediate_exit(0);
                }
                Exit::Shutdown => {
                    if let Some(why) = self.refused_paging() {
                        return Err(EngineError::Unsupported {
                            engine: "hw",
                            reason: why,
                        });
                    }
                    return Ok(VmExit::Shutdown {
                        reason: "triple fault (KVM_EXIT_SHUTDOWN)".into(),
                    });
                }
                Exit::SystemEvent(t) => {
                    return Ok(VmExit::Shutdown {
                        reason: format!("KVM_EXIT_SYSTEM_EVENT type {t}"),
                    })
                }
                Exit::FailEntry(r) => {
                    return Err(self.failure(
                        format!(
                            "KVM_EXIT_FAIL_ENTRY: the CPU refused to enter the guest, hardware entry failure reason {r:#x}"
                        ),
                        None,
                    ))
                }
                Exit::Internal => {
                    if self.emulate_failed_instruction()? {
                        continue;
                    }
                    let run = self.vcpu.get_kvm_run();
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR:
                    // `internal` is live.
                    let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Err(match self.internal_error() {
                        // The vCPU stopped before the instruction, its state
                        // intact: another engine can run it.
                        EngineError::Internal { engine, reason }
                            if sub == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION =>
                        {
                            EngineError::CannotContinue { engine, reason }
                        }
                        e => e,
                    });
                }
                Exit::Other(name) => {
                    return Err(self.failure(format!("{name}: an exit popek does not handle"), None))
                }
            }
        }
    }
}
