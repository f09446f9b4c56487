//! The `trap` engine: classic trap-and-emulate on popek's software CPU.
//!
//! The guest kernel runs at ring 1, its user code at ring 3. The monitor
//! (this crate: host code standing in for a ring-0 VMM) receives every
//! exception the CPU raises before any IDT delivery (the CPU's exception
//! bitmap) and:
//!
//! - emulates privileged instructions on a virtual CPU ([`Virt`]): CR0/2/3/4,
//!   GDTR/IDTR/LDTR/TR, the interrupt flag, IOPL, port I/O, HLT, MSRs;
//! - reflects exceptions, `INT n` and external interrupts into the guest
//!   through the guest's own IDT at virtual ring 0;
//! - keeps shadow page tables (gvp → hpp, [`shadow`]) over a shuffled
//!   physical map ([`phys`]), resolving hidden faults and reflecting true
//!   ones;
//! - records every sensitive-unprivileged instruction the CPU reports
//!   ([`audit`]): the x86 gap, made visible.
//!
//! The return to user mode reaches the monitor by ordinary x86 means: while
//! the guest kernel runs, the shadow descriptors of the guest's DPL-3
//! segments are not present, so its `IRET` to ring 3 faults with #NP.
//! See `docs/trap-and-emulate.md`.
//!
//! Layout: this file holds the engine, its run loop and the dispatch of
//! each trap; `guest_mem` walks the guest's page tables (with the shared
//! walker), `page_faults` keeps the shadow, `segments` the shadow GDT,
//! `virt` composes the virtual CPU, `delivery` reflects events through the
//! guest's IDT, `gp` dispatches general-protection traps to `privileged`,
//! `io`, `segment_loads` and `monitor_area`, which emulate what faulted,
//! `gap_audit` classifies the x86 gap, `inspect` shows it all.

#![warn(missing_docs)]

pub mod audit;
mod delivery;
pub mod desc;
mod gap_audit;
mod gp;
mod guest_mem;
mod inspect;
mod io;
mod monitor_area;
mod page_faults;
pub mod phys;
mod privileged;
mod segment_loads;
mod segments;
pub mod shadow;
mod virt;

use std::collections::BTreeMap;
use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, Mnemonic, OpKind, Register};
use popek_cpu::paging;
use popek_cpu::seg::Descriptor;
use popek_cpu::state::{cr, flags, seg, Msrs, Segment, TableReg};
use popek_cpu::{Cpu, CpuState, RunExit, SensitiveEvent, SensitiveKind};
use popek_engine::bus::MachineBus;
use popek_engine::factory::software_cpu_can_run;
use popek_engine::hypercall::HYPERCALL_PORT;
use popek_engine::{AuditRow, Engine, EngineError, EngineFactory, GuestMode, Inspect, VmExit};
use popek_machine::Machine;
use popek_memory::GuestRam;
use popek_memory::MemoryError;

use audit::{Audit, IfLoss};
use desc::SEG_TOP;
use phys::PhysMap;
use shadow::{pte, Shadow, GDT_PAGE, IDT_PAGE, TSS_PAGE, VMM_LINEAR};

const NAME: &str = "trap";

/// The guest-visible CPU state the monitor keeps: what a ring-0 kernel
/// believes the privileged registers hold.
#[derive(Clone, Debug, Default)]
pub struct Virt {
    /// CR0.
    pub cr0: u64,
    /// CR2: the guest's last page-fault address.
    pub cr2: u64,
    /// CR3: the guest's page directory (guest-physical).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// GDTR (guest linear).
    pub gdtr: TableReg,
    /// IDTR (guest linear).
    pub idtr: TableReg,
    /// LDTR.
    pub ldtr: Segment,
    /// TR (the guest's TSS).
    pub tr: Segment,
    /// EFLAGS.IF.
    pub vif: bool,
    /// EFLAGS.IOPL.
    pub iopl: u8,
    /// HLT: waiting for an interrupt.
    pub halted: bool,
    /// DR0–DR7.
    pub dr: [u64; 8],
    /// MSRs.
    pub msr: Msrs,
}

/// Trap and memory-virtualization counters.
#[derive(Clone, Debug, Default)]
pub struct TrapStats {
    /// Traps handled, by kind.
    pub traps: BTreeMap<String, u64>,
    /// All traps.
    pub total: u64,
    /// Hidden page faults (shadow misses the guest never sees).
    pub hidden_pf: u64,
    /// True page faults reflected to the guest.
    pub true_pf: u64,
    /// Stores to write-protected guest page tables (and other stores the
    /// monitor completed).
    pub wp_traps: u64,
    /// Guest CR3 loads.
    pub cr3_switches: u64,
    /// Events (exceptions, INT n, interrupts) delivered into the guest.
    pub reflected: u64,
}

/// What a handler tells the run loop.
enum Flow {
    Continue,
    Exit(VmExit),
}

type Handled = Result<Flow, EngineError>;

/// An event to deliver through the guest's IDT.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// A CPU exception (RIP at the faulting instruction, or after it for
    /// traps).
    Exception(u8, Option<u32>),
    /// `INT n`/`INT3`/`INTO`: the return address follows the instruction.
    Soft(u8, u64),
    /// ICEBP (INT1): #DB delivered like INT n (return address past it,
    /// EXT clear) but without the gate's DPL check.
    Icebp(u64),
    /// An external interrupt.
    External(u8),
}

/// A guest page-table walk.
type Walk = paging::Walk;

/// Why a `trap` engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    /// The monitor shuffles guest RAM in chunks: RAM must be whole chunks.
    #[error("guest RAM ({size} bytes) must be a multiple of {} KiB", chunk / 1024)]
    RamSize {
        /// Guest RAM in bytes.
        size: u64,
        /// The chunk size in bytes.
        chunk: u64,
    },
    /// The second (host-physical) mapping of guest RAM failed.
    #[error("cannot build the host-physical view of guest RAM")]
    HostView(#[source] MemoryError),
}

/// What the VMM knows of `trap` before it builds one.
pub struct TrapFactory;

/// The `trap` engine's factory, for the VMM's list.
pub static FACTORY: TrapFactory = TrapFactory;

impl EngineFactory for TrapFactory {
    fn name(&self) -> &'static str {
        NAME
    }
    fn describe(&self) -> String {
        "trap, trap-and-emulate with ring deprivileging and shadow page tables".into()
    }
    fn available(&self) -> Result<(), String> {
        // memfd-backed RAM with a second, shuffled mapping.
        if cfg!(target_os = "linux") {
            Ok(())
        } else {
            Err("trap maps guest RAM twice through memfd: it needs a Linux host".into())
        }
    }
    fn can_run(&self, mode: GuestMode) -> Result<(), String> {
        if mode == GuestMode::Real {
            // A flat real-mode entry is refused the same way at run time.
            return Err(
                "a guest in real mode: trap-and-emulate runs protected-mode guests (ring deprivileging needs rings): use --engine bt or interp"
                    .into(),
            );
        }
        software_cpu_can_run(mode)
    }
    fn needs_shareable_ram(&self) -> bool {
        // The CPU sees guest RAM through a second, shuffled mapping.
        true
    }
    fn auto_rank(&self) -> Option<u8> {
        // For seeing the classic technique at work, not for speed.
        None
    }
    fn create(&self, machine: &Machine) -> Result<Box<dyn Engine>, EngineError> {
        let t = Trap::new(machine).map_err(|e| EngineError::Setup {
            engine: NAME,
            source: Box::new(e),
        })?;
        Ok(Box::new(t))
    }
}

/// The `trap` engine.
pub struct Trap {
    cpu: Cpu,
    gram: Arc<GuestRam>,
    hram: Arc<GuestRam>,
    map: PhysMap,
    shadow: Shadow,
    v: Virt,
    /// The shadow GDT shows DPL-3 segments as present.
    user_view: bool,
    /// GDT indices of the guest's DPL-3 code/data descriptors.
    dpl3: Vec<u16>,
    /// The guest's state has been installed once.
    started: bool,
    /// The next instruction runs before any interrupt (STI's shadow).
    inhibit: bool,
    events: Vec<SensitiveEvent>,
    audit: Audit,
    /// Counters.
    pub stats: TrapStats,
    trace: bool,
    /// The guest is paravirtual (it asked for HC_VERSION) and promised to
    /// invalidate after PTE changes: its page tables need no write
    /// protection. Native guests keep it false.
    pv_mmu: bool,
    /// Where the virtual IF was last cleared by an emulated CLI.
    last_cli: Option<u64>,
    /// Nesting of handlers that run the CPU for one instruction.
    depth: u32,
    /// The CPU runs an instruction the monitor is emulating: its sensitive
    /// reports are not gap events (the instruction trapped).
    emulating: bool,
    /// The trapping instruction's text, for `--trace traps`.
    trace_text: Option<String>,
    /// Where the CPU was seen running at real ring 0 (an isolation break:
    /// ring 0 is the monitor's), for [`Trap::isolation_check`].
    ring0_seen: Option<u64>,
}

/// Exception names for traces and reports.
fn vector_name(v: u8) -> &'static str {
    const N: [&str; 20] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM",
    ];
    N.get(v as usize).copied().unwrap_or("exc")
}

impl Trap {
    /// An engine for `machine`, whose RAM must be shareable
    /// ([`GuestRam::new_shareable`]): the CPU sees it through a shuffled
    /// physical map, followed by the monitor's pool.
    pub fn new(machine: &Machine) -> Result<Trap, TrapError> {
        let gram = machine.ram().clone();
        let ram_size = gram.size().div_ceil(phys::CHUNK) * phys::CHUNK;
        if ram_size != gram.size() {
            return Err(TrapError::RamSize {
                size: gram.size(),
                chunk: phys::CHUNK,
            });
        }
        let map = PhysMap::shuffled(ram_size, 0x9e37_79b9_7f4a_7c15);
        let hram = map
            .host_view(&gram, shadow::POOL_BYTES)
            .map_err(TrapError::HostView)?;
        let shadow = Shadow::new(&hram, ram_size);
        let mut cpu = Cpu::new(hram.clone());
        cpu.exception_bitmap = u32::MAX;
        cpu.report_sensitive = true;
        cpu.hypercall_port = None;
        // SYSENTER would enter real ring 0: the guest gets INT 0x80 only.
        if let Some(l) = cpu.cpuid.basic.get_mut(1) {
            l.edx &= !(1 << 11);
        }
        let mut t = Trap {
            cpu,
            gram,
            hram,
            map,
            shadow,
            v: Virt::default(),
            user_view: false,
            dpl3: Vec::new(),
            started: false,
            inhibit: false,
            events: Vec::new(),
            audit: Audit::default(),
            stats: TrapStats::default(),
            trace: false,
            pv_mmu: false,
            last_cli: None,
            depth: 0,
            emulating: false,
            trace_text: None,
            ring0_seen: None,
        };
        t.write_idt_and_tss();
        Ok(t)
    }

    /// The software CPU (real state: ring 1, shadow tables).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    fn pool(&self, page: u64) -> u64 {
        self.shadow.page(page)
    }

    fn write_idt_and_tss(&mut self) {
        let gate = desc::idt_gate();
        for v in 0..256u64 {
            let a = self.pool(IDT_PAGE) + v * 8;
            let _ = self.hram.write_u32_untracked(a, gate.lo);
            let _ = self.hram.write_u32_untracked(a + 4, gate.hi);
        }
        let tss = self.pool(TSS_PAGE);
        shadow::zero(&self.hram, tss, 4096);
        let _ = self.hram.write_u32_untracked(tss + 8, desc::VMM_DS as u32);
        // I/O map base past the limit: no port is granted below ring 0.
        let _ = self.hram.write_untracked(tss + 0x66, &104u16.to_le_bytes());
        for (sel, d) in desc::vmm_descriptors() {
            let a = self.pool(GDT_PAGE) + sel as u64;
            let _ = self.hram.write_u32_untracked(a, d.lo);
            let _ = self.hram.write_u32_untracked(a + 4, d.hi);
        }
    }

    /// Checks that the guest has not broken out: the CPU never ran at real
    /// ring 0, and the monitor's IDT, TSS, GDT entries and page tables of
    /// its own 4 MiB hold what the monitor wrote. For fuzzers and tests
    /// (it reads a few pages).
    pub fn isolation_check(&self) -> Result<(), String> {
        if let Some(eip) = self.ring0_seen {
            return Err(format!("guest code ran at real ring 0 (EIP {eip:#x})"));
        }
        let gate = desc::idt_gate();
        for v in 0..256u64 {
            let a = self.pool(IDT_PAGE) + v * 8;
            let got = (self.hram.read_u32(a).ok(), self.hram.read_u32(a + 4).ok());
            if got != (Some(gate.lo), Some(gate.hi)) {
                return Err(format!("the monitor's IDT gate {v} changed: {got:x?}"));
            }
        }
        let mut tss = [0u8; 4096];
        let _ = self.hram.read(self.pool(TSS_PAGE), &mut tss);
        let mut want = [0u8; 4096];
        want[8..12].copy_from_slice(&(desc::VMM_DS as u32).to_le_bytes());
        want[0x66..0x68].copy_from_slice(&104u16.to_le_bytes());
        if tss != want {
            return Err("the monitor's TSS changed".into());
        }
        for (sel, d) in desc::vmm_descriptors() {
            let a = self.pool(GDT_PAGE) + sel as u64;
            let got = (self.hram.read_u32(a).ok(), self.hram.read_u32(a + 4).ok());
            // The TSS descriptor's busy bit is the CPU's to set.
            let busy = 2 << 8;
            if got.0 != Some(d.lo) || got.1.map(|h| h | busy) != Some(d.hi | busy) {
                return Err(format!(
                    "the monitor's GDT entry {sel:#x} changed: {got:x?}"
                ));
            }
        }
        self.shadow.check_monitor_tables(&self.hram)
    }

    fn count(&mut self, kind: impl Into<String>) {
        self.stats.total += 1;
        *self.stats.traps.entry(kind.into()).or_insert(0) += 1;
    }

    fn trace_line(&mut self, vector: &str, eip: u64, action: &str) {
        if !self.trace {
            return;
        }
        let text = match self.trace_text.take() {
            Some(t) => t,
            None => self.fetch_text(),
        };
        eprintln!("trap {vector:<4} eip={eip:08x}  {text:<28} -> {action}");
    }

    /// The instruction at CS:EIP, as text.
    fn fetch_text(&mut self) -> String {
        self.fetch()
            .map(|i| {
                let mut s = String::new();
                iced_x86::GasFormatter::new().format(&i, &mut s);
                s
            })
            .unwrap_or_else(|| "?".into())
    }

    // ----- the run loop -----

    fn run_cpu(&mut self, machine: &mut Machine, budget: u64) -> RunExit {
        let host_size = self.hram.size();
        // Host RAM the CPU reaches as MMIO, or the void page (guest pages
        // beyond guest RAM): nothing there, as on the bus. Interrupts are
        // the monitor's to deliver.
        let mut bus = MachineBus::new(machine)
            .with_events(&mut self.events)
            .void_below(host_size + 0x1000)
            .without_interrupts();
        let exit = self.cpu.run(&mut bus, budget);
        if !self.events.is_empty() && self.emulating {
            self.events.clear();
        }
        if let RunExit::Exception {
            software: false, ..
        } = exit
        {
            // A report from the instruction that then faulted (far JMP/CALL
            // report before their checks): it did not execute.
            let rip = self.cpu.state().rip;
            while self.events.last().is_some_and(|e| e.ip == rip) {
                self.events.pop();
            }
        }
        if !self.events.is_empty() {
            let events = std::mem::take(&mut self.events);
            for e in &events {
                self.audit_event(e);
            }
            self.events = events;
            self.events.clear();
        }
        exit
    }

    fn after_run(&mut self, machine: &mut Machine, exit: RunExit) -> Handled {
        match exit {
            RunExit::Budget => Ok(Flow::Continue),
            RunExit::Halted => {
                self.v.halted = true;
                Ok(Flow::Exit(VmExit::Halt))
            }
            RunExit::Shutdown => Ok(Flow::Exit(VmExit::Shutdown {
                reason: "triple fault".into(),
            })),
            RunExit::Hypercall => Ok(Flow::Exit(VmExit::Hypercall)),
            RunExit::BusStop => Ok(Flow::Exit(VmExit::MachineStop)),
            RunExit::Exception {
                vector,
                software: true,
                ..
            } => self.software_interrupt(vector),
            RunExit::Exception {
                vector, error_code, ..
            } => self.exception(machine, vector, error_code),
        }
    }

    /// INT3, INTO, ICEBP or INT n that the CPU stopped at (RIP past it, counted as
    /// retired): back to the instruction, then delivered as the CPU would,
    /// retiring only if the delivery succeeds.
    fn software_interrupt(&mut self, vector: u8) -> Handled {
        let next = self.cpu.state().rip;
        let at = self.cpu.exit_ip;
        self.cpu.set_rip(at);
        self.cpu.icount -= 1;
        self.count(format!("{} reflected", vector_name(vector)));
        if self.trace {
            self.trace_text = Some(self.fetch_text());
            self.trace_line(
                vector_name(vector),
                at,
                "software interrupt: reflected to the guest",
            );
        }
        self.deliver(if vector == 1 {
            Event::Icebp(next)
        } else {
            Event::Soft(vector, next)
        })
    }

    fn exception(&mut self, machine: &mut Machine, vector: u8, code: Option<u32>) -> Handled {
        if self.trace {
            // Decoded before the handler moves EIP (or CS).
            self.trace_text = Some(self.fetch_text());
        }
        match vector {
            14 => self.page_fault(machine, code.unwrap_or(0)),
            13 => self.general_protection(machine, code.unwrap_or(0)),
            11 => self.not_present(machine, code.unwrap_or(0)),
            _ => {
                let eip = self.cpu.state().rip;
                self.count(format!("{} reflected", vector_name(vector)));
                if self.trace {
                    self.trace_line(vector_name(vector), eip, "reflected to the guest");
                }
                self.deliver(Event::Exception(vector, code))
            }
        }
    }
}

impl Engine for Trap {
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError> {
        let start = self.cpu.icount;
        let mut handled = 0u64;
        loop {
            let done = self.cpu.icount - start + handled;
            if done >= budget {
                return Ok(VmExit::Budget);
            }
            if self.v.halted {
                if !(self.v.vif && machine.interrupt_pending()) {
                    return Ok(VmExit::Halt);
                }
                self.v.halted = false;
            }
            let mut slice = budget - done;
            if self.inhibit {
                self.inhibit = false;
                slice = 1;
            } else if self.v.vif && machine.interrupt_pending() {
                let vector = machine.acknowledge_interrupt();
                self.count(format!("irq {vector:#x} (reflected)"));
                if self.trace {
                    let eip = self.cpu.state().rip;
                    self.trace_line(
                        "IRQ",
                        eip,
                        &format!("external interrupt {vector:#x} delivered"),
                    );
                }
                handled += 1;
                if let Flow::Exit(x) = self.deliver(Event::External(vector))? {
                    return Ok(x);
                }
                continue;
            }
            let exit = self.run_cpu(machine, slice);
            if self.cpu.cpl() == 0 && self.ring0_seen.is_none() {
                self.ring0_seen = Some(self.cpu.state().rip);
            }
            if matches!(exit, RunExit::Exception { .. }) {
                handled += 1;
            }
            match self.after_run(machine, exit)? {
                Flow::Continue => {}
                Flow::Exit(x) => return Ok(x),
            }
            if machine.stop_pending() {
                return Ok(VmExit::MachineStop);
            }
        }
    }

    fn state(&mut self) -> CpuState {
        self.compose()
    }

    fn set_state(&mut self, state: CpuState) -> Result<(), EngineError> {
        self.install(state)
    }

    fn instructions(&self) -> u64 {
        self.cpu.icount
    }

    fn set_instructions(&mut self, n: u64) {
        self.cpu.icount = n;
    }

    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        self.guest_read_as(addr as u32, buf, false).ok()
    }

    fn invalidate_page(&mut self, lin: u64) {
        self.invlpg(lin as u32);
    }

    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        self.guest_write(addr as u32, data).ok()
    }

    fn inspect(&mut self) -> Option<&mut dyn Inspect> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    // The CPU's control-register constants, not the assembler's CR names.
    use popek_cpu::state::cr;
    use popek_machine::{ClockMode, MachineConfig};

    const PD: u64 = 0x10000;
    const PT0: u64 = 0x11000;
    const PT1: u64 = 0x12000;
    const CODE: u64 = 0x100000;

    /// A machine with 4 MiB of RAM, identity-mapped (supervisor) by PT0,
    /// and PT1 behind PDE 1 (linear 4–8 MiB), empty.
    fn machine() -> Machine {
        let ram = Arc::new(GuestRam::new_shareable(4 << 20).unwrap());
        let m = Machine::new(
            MachineConfig {
                clock: ClockMode::Virtual,
                ..Default::default()
            },
            ram.clone(),
            Box::new(std::io::sink()),
        )
        .unwrap();
        ram.write_u32(PD, PT0 as u32 | 3).unwrap();
        ram.write_u32(PD + 4, PT1 as u32 | 7).unwrap();
        for p in 0..1024u64 {
            ram.write_u32(PT0 + p * 4, (p << 12) as u32 | 3).unwrap();
        }
        ram.write_u32(0x20000, 0xaaaa_aaaa).unwrap();
        ram.write_u32(0x30000, 0xbbbb_bbbb).unwrap();
        m
    }

    /// Runs `code` at ring 0 (virtually) with paging on until HLT.
    fn run(m: &mut Machine, build: impl FnOnce(&mut CodeAssembler)) -> Trap {
        let mut a = CodeAssembler::new(32).unwrap();
        build(&mut a);
        a.hlt().unwrap();
        let bytes = a.assemble(CODE).unwrap();
        m.ram().write(CODE, &bytes).unwrap();
        let mut t = Trap::new(m).unwrap();
        let mut s = CpuState::flat_protected(0x08, 0x10);
        s.rip = CODE;
        s.cr0 |= cr::CR0_PG | cr::CR0_WP;
        s.cr3 = PD;
        s.gpr[4] = 0x90000;
        t.set_state(s).unwrap();
        let exit = t.run(m, 100_000).unwrap();
        assert_eq!(exit, VmExit::Halt, "{:?}", t.state());
        t
    }

    #[test]
    fn hidden_faults_fill_the_shadow_with_host_addresses_and_set_guest_a_d() {
        let mut m = machine();
        let ram = m.ram().clone();
        ram.write_u32(PT1, 0x20000 | 7).unwrap();
        let mut t = run(&mut m, |a| {
            a.mov(eax, dword_ptr(0x400000)).unwrap();
            a.mov(dword_ptr(0x400004), 5u32).unwrap();
        });
        assert_eq!(t.state().gpr[0] as u32, 0xaaaa_aaaa);
        assert_eq!(ram.read_u32(0x20004).unwrap(), 5);
        let pte = ram.read_u32(PT1).unwrap();
        assert_eq!(pte & (pte::A | pte::D), pte::A | pte::D, "{pte:#x}");
        assert!(t.stats.hidden_pf >= 2);
        assert_eq!(t.stats.true_pf, 0);
        // The CPU's page tables hold host-physical addresses.
        let spd = t.shadow.root();
        let hram = t.hram.clone();
        let spde = hram.read_u32(spd + 4).unwrap();
        let spte = hram.read_u32((spde & !0xfff) as u64).unwrap();
        let host = (spte & !0xfff) as u64;
        assert_eq!(host, t.map.to_host(0x20000).unwrap());
        assert_ne!(host, 0x20000, "the map moved this chunk");
    }

    #[test]
    fn stores_to_guest_page_tables_trap_and_resync_the_shadow() {
        let mut m = machine();
        let ram = m.ram().clone();
        ram.write_u32(PT1, 0x20000 | 7).unwrap();
        let t = run(&mut m, |a| {
            a.mov(eax, dword_ptr(0x400000)).unwrap();
            // Remap the page: PT1 is a page table the shadow uses.
            a.mov(dword_ptr(PT1 as u32), 0x30000u32 | 7).unwrap();
            a.mov(ebx, dword_ptr(0x400000)).unwrap();
        });
        let mut t = t;
        let st = t.state();
        assert_eq!(st.gpr[0] as u32, 0xaaaa_aaaa);
        assert_eq!(st.gpr[3] as u32, 0xbbbb_bbbb, "the new mapping is seen");
        assert!(t.stats.wp_traps >= 1);
    }

    #[test]
    fn true_faults_reach_the_guest_with_its_cr2_and_error_code() {
        let mut m = machine();
        let ram = m.ram().clone();
        // An IDT at 0x50000 whose #PF gate (vector 14) goes to a handler
        // that stores CR2 and the error code, then halts.
        let handler = 0x108000u32;
        let gate_lo = (0x08u32 << 16) | (handler & 0xffff);
        let gate_hi = (handler & 0xffff_0000) | 0x8e00;
        ram.write_u32(0x50000 + 14 * 8, gate_lo).unwrap();
        ram.write_u32(0x50000 + 14 * 8 + 4, gate_hi).unwrap();
        // A GDT: null, code 0x08, data 0x10.
        ram.write_u64(0x60008, 0x00cf_9a00_0000_ffff).unwrap();
        ram.write_u64(0x60010, 0x00cf_9200_0000_ffff).unwrap();
        let mut h = CodeAssembler::new(32).unwrap();
        h.pop(ecx).unwrap();
        h.mov(edx, cr2).unwrap();
        h.hlt().unwrap();
        let hb = h.assemble(handler as u64).unwrap();
        ram.write(handler as u64, &hb).unwrap();
        let desc_at = 0x70000u32;
        ram.write_u16(desc_at as u64, 0x7ff).unwrap();
        ram.write_u32(desc_at as u64 + 2, 0x50000).unwrap();
        ram.write_u16(desc_at as u64 + 8, 0x17).unwrap();
        ram.write_u32(desc_at as u64 + 10, 0x60000).unwrap();
        let mut t = run(&mut m, |a| {
            a.lgdt(ptr(desc_at + 8)).unwrap();
            a.lidt(ptr(desc_at)).unwrap();
            // PDE 1's table is empty: a true fault.
            a.mov(dword_ptr(0x401234), 1u32).unwrap();
        });
        let st = t.state();
        assert_eq!(st.gpr[2] as u32, 0x401234, "CR2");
        assert_eq!(st.gpr[1] as u32, 2, "not present, write, supervisor");
        assert_eq!(t.stats.true_pf, 1);
        assert_eq!(st.seg[seg::CS].selector, 0x08, "the guest sees ring 0");
    }
}
