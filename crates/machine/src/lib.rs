//! The virtual PC of popek: buses and devices shared by every CPU engine.
//!
//! A [`Machine`] owns guest RAM (shared with the engine), an I/O-port bus
//! and an MMIO bus, and the PC devices: the 8259A PIC pair ([`pic`]), the
//! 8254 PIT ([`pit`]), the CMOS RTC ([`rtc`]), COM1 ([`uart`]), a minimal
//! i8042 ([`i8042`]), the ACPI tables and PM1 block ([`acpi`]), QEMU's
//! isa-debug-exit ([`debug_exit`]), PCI configuration mechanism #1 with
//! a host bridge ([`pci`]), the POST code port 0x80 and the 0xE9 debug
//! console. Unclaimed ports read all ones and
//! ignore writes.
//!
//! The machine knows nothing about CPUs. An engine drives it through a
//! small seam:
//!
//! - port and MMIO accesses: [`Machine::io_in`], [`Machine::io_out`],
//!   [`Machine::mmio_read`], [`Machine::mmio_write`];
//! - the current vCPU ([`Machine::set_current_cpu`]), whose local APIC
//!   page and MSRs ([`Machine::read_msr`], [`Machine::write_msr`]) and
//!   interrupt inputs the accesses reach;
//! - the interrupt lines: [`Machine::interrupt_pending`] (the local APIC's
//!   request, or the 8259's INTR through LINT0) and
//!   [`Machine::acknowledge_interrupt`] (the INTA cycle);
//!   [`Machine::nmi_pending`] and [`Machine::acknowledge_nmi`];
//! - time: [`Machine::advance`] between CPU budgets, [`Machine::tsc`],
//!   and for a halted CPU [`Machine::time_to_next_event`] (host clock) or
//!   [`Machine::warp_to_next_event`] (virtual clock);
//! - the end of the run: [`Machine::stop_pending`] / [`Machine::take_stop`].
//!
//! The devices take the current time as an argument and are plain data,
//! so each is unit-tested on its own.

pub mod acpi;
pub mod bus;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod memmap;
pub mod pci;
pub mod pci_device;
pub mod pci_function;
pub mod persist;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod uart;

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use popek_memory::{GuestRam, MemoryError};

pub use bus::{Bus, BusDevice, BusError};
pub use persist::{MachineState, Persist, StateError};

/// How machine time advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    /// Time is the host's monotonic clock since the machine was created;
    /// the RTC starts at the host's time of day. A guest `sleep 1` takes a
    /// second.
    #[default]
    Host,
    /// Time advances by [`NS_PER_INSTRUCTION`] per executed guest
    /// instruction, by [`IO_ACCESS_NS`] per port access, and by the idle
    /// time skipped by [`Machine::warp_to_next_event`]; the RTC starts at
    /// [`VIRTUAL_EPOCH_UNIX_SECS`]. Runs are reproducible.
    Virtual,
}

/// A vCPU's maskable-interrupt line ([`Machine::lines_of`]).
pub const LINE_INTR: u8 = 1;
/// A vCPU's NMI line.
pub const LINE_NMI: u8 = 2;
/// An INIT or start-up IPI waits for the vCPU.
pub const LINE_STARTUP: u8 = 4;

/// Nanoseconds of machine time per guest instruction in
/// [`ClockMode::Virtual`] (a 1 GHz, one-instruction-per-cycle machine).
pub const NS_PER_INSTRUCTION: u64 = 1;

/// Nanoseconds of machine time each port access costs in
/// [`ClockMode::Virtual`]: about what an ISA access takes on a PC (which is
/// why `outb` to port 0x80 is a classic 1 µs delay). It makes polling loops
/// (PIT and PM-timer reads, RTC update-in-progress waits) see time move
/// within one CPU budget, deterministically.
pub const IO_ACCESS_NS: u64 = 1000;

/// Nominal frequency of the guest TSC: 1 GHz, so the TSC counts
/// nanoseconds of machine time in both clock modes.
pub const TSC_HZ: u64 = 1_000_000_000;

/// The RTC's time at machine start in [`ClockMode::Virtual`]:
/// 2025-01-01 00:00:00 UTC.
pub const VIRTUAL_EPOCH_UNIX_SECS: u64 = 1_735_689_600;

/// Guest RAM the machine needs at least: the ACPI tables live below 1 MiB.
pub const MIN_RAM: u64 = 1 << 20;

/// The POST code port firmware writes its progress to (and Linux its I/O
/// delays).
pub const POST_PORT: u16 = 0x80;

/// The debug console port (`--debugcon`).
pub const DEBUGCON_PORT: u16 = 0xe9;

/// The port SeaBIOS writes its debug log to on QEMU; `--debugcon` takes
/// it too.
pub const FIRMWARE_DEBUG_PORT: u16 = 0x402;

/// BIOS data area words the machine fills, as a BIOS would: COM1's base
/// port, the EBDA segment and the base memory size in KiB.
const BDA_COM1: u64 = 0x400;
const BDA_EBDA_SEGMENT: u64 = 0x40e;
const BDA_BASE_MEMORY_KIB: u64 = 0x413;

/// The most vCPUs a machine takes (xAPIC IDs are 8 bits; the MADT's
/// space in the BIOS area holds this many).
pub const MAX_CPUS: u32 = 32;

/// Machine configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineConfig {
    /// How time advances.
    pub clock: ClockMode,
    /// vCPUs: one local APIC each, described in the MADT (0 means 1).
    pub cpus: u32,
}

/// Why the machine wants the VMM to stop running the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    /// ACPI S5 through the PM1 control port. popek exits 0.
    PowerOff,
    /// A reset through the i8042 (0x64/0xFE) or its output port. popek
    /// exits 0, like `qemu -no-reboot`.
    Reset,
    /// The guest wrote v to the debug-exit port 0xf4. popek exits with
    /// status (v << 1) | 1.
    DebugExit(u8),
}

/// Errors of machine creation.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// RAM is too small to hold the firmware tables below 1 MiB, or so
    /// large it would reach the MMIO window.
    #[error(
        "guest RAM of {size:#x} bytes is out of range: the machine takes {min:#x} to {max:#x}"
    )]
    RamSize {
        /// Size of guest RAM.
        size: u64,
        /// The minimum.
        min: u64,
        /// The maximum.
        max: u64,
    },
    /// Writing the ACPI tables into RAM failed.
    #[error("cannot write the ACPI tables: {0}")]
    Memory(#[from] MemoryError),
    /// Two devices claim overlapping ranges.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A saved device state was refused.
    #[error("a saved device state was refused")]
    State(#[source] StateError),
    /// A device could not be attached.
    #[error("cannot attach a device: {0}")]
    Attach(String),
    /// PCI bus 0 has no free slot for another device.
    #[error("PCI bus 0 is full: 31 devices at most")]
    PciFull,
    /// The firmware image cannot be mapped.
    #[error("firmware: {0}")]
    Firmware(String),
}

/// Which device a port range belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    PicMaster,
    PicSlave,
    Elcr,
    Pit,
    PortB,
    I8042Data,
    I8042Command,
    Rtc,
    Uart,
    DebugExit,
    Pm,
    PciAddress,
    PciData,
    Post,
    DebugCon,
    FwCfg,
    FwCfgDma,
}

#[derive(Debug)]
struct Clock {
    mode: ClockMode,
    start: Instant,
    /// Host clock: machine time at `start` (non-zero after a restore).
    start_ns: u64,
    /// Unix time (ns) at machine time 0.
    wall_base_ns: u64,
    /// Virtual: idle time skipped while halted, plus port-access time.
    idle_ns: u64,
    /// Highest instruction count passed to `advance`.
    instructions: u64,
}

impl Clock {
    fn new(mode: ClockMode) -> Self {
        let wall_base_ns = match mode {
            ClockMode::Host => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            ClockMode::Virtual => VIRTUAL_EPOCH_UNIX_SECS * 1_000_000_000,
        };
        Clock {
            mode,
            start: Instant::now(),
            start_ns: 0,
            wall_base_ns,
            idle_ns: 0,
            instructions: 0,
        }
    }

    /// Machine time in ns for an instruction count.
    fn at(&self, guest_instructions: u64) -> u64 {
        match self.mode {
            ClockMode::Host => u64::try_from(self.start.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_add(self.start_ns),
            ClockMode::Virtual => guest_instructions
                .max(self.instructions)
                .saturating_mul(NS_PER_INSTRUCTION)
                .saturating_add(self.idle_ns),
        }
    }

    /// Machine time now (virtual: as of the last `advance`).
    fn now(&self) -> u64 {
        self.at(self.instructions)
    }

    fn wall(&self, ns: u64) -> u64 {
        self.wall_base_ns.saturating_add(ns)
    }

    /// Charges one port access (virtual clock only).
    fn io_access(&mut self) {
        if self.mode == ClockMode::Virtual {
            self.idle_ns = self.idle_ns.saturating_add(IO_ACCESS_NS);
        }
    }
}

/// The virtual PC. See the crate documentation for the engine seam.
pub struct Machine {
    ram: Arc<GuestRam>,
    clock: Clock,
    io: Bus<Port>,
    mmio: Bus<Box<dyn BusDevice>>,
    pic: pic::Pic,
    pit: pit::Pit,
    rtc: rtc::Rtc,
    uart: uart::Uart,
    i8042: i8042::I8042,
    pm: acpi::PmBlock,
    pci: pci::Pci,
    fw_cfg: fw_cfg::FwCfg,
    /// Devices on PCI bus 0 beside the host bridge, with their slots.
    pci_devices: Vec<(u8, Box<dyn pci_device::PciDevice>)>,
    /// Rung by device workers (see [`pci_device::Doorbell`]).
    doorbell: Arc<pci_device::Doorbell>,
    /// The slot of the device that takes terminal input instead of COM1
    /// (a virtio console).
    terminal: Option<u8>,
    /// The firmware ROM (`--firmware`), at the top of the 4 GiB.
    rom: Option<Arc<[u8]>>,
    /// One local APIC per vCPU.
    lapics: Vec<lapic::LocalApic>,
    ioapic: ioapic::IoApic,
    /// The vCPU whose accesses and interrupt cycles come now.
    cur: usize,
    /// Per vCPU: its local APIC has a fixed interrupt to deliver.
    apic_pending: Vec<bool>,
    /// Per vCPU: its LINT0 passes the 8259's INTR.
    extint: Vec<bool>,
    /// Cached for the current vCPU: `apic_pending[cur]`, `extint[cur]`,
    /// and whether its APIC holds an NMI (the CPUs poll these).
    apic_irq: bool,
    extint_open: bool,
    nmi_line: bool,
    /// Interrupts delivered, by vCPU and vector (statistics, not guest
    /// state).
    irq_counts: Vec<[u64; 256]>,
    /// The last POST code written to port 0x80, and how many were.
    post: (Option<u8>, u64),
    /// Where bytes written to port 0xE9 go (`--debugcon`).
    debugcon: Option<Box<dyn Write + Send>>,
    stop: Option<StopReason>,
    rsdp: u64,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("ram", &self.ram)
            .field("clock", &self.clock.mode)
            .field("stop", &self.stop)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Builds the machine on `ram`, with COM1's output going to `console`,
    /// and writes the ACPI tables into RAM (see [`acpi`]).
    pub fn new(
        config: MachineConfig,
        ram: Arc<GuestRam>,
        console: Box<dyn Write + Send>,
    ) -> Result<Machine, MachineError> {
        let m = Machine::build(config, ram, console)?;
        for (addr, bytes) in acpi::tables(m.lapics.len() as u32) {
            m.ram.write(addr, &bytes)?;
        }
        m.ram.write_u16(BDA_COM1, uart::COM1_PORT)?;
        m.ram
            .write_u16(BDA_EBDA_SEGMENT, (memmap::EBDA_START >> 4) as u16)?;
        m.ram
            .write_u16(BDA_BASE_MEMORY_KIB, (memmap::LOW_RAM_END >> 10) as u16)?;
        Ok(m)
    }

    fn build(
        config: MachineConfig,
        ram: Arc<GuestRam>,
        console: Box<dyn Write + Send>,
    ) -> Result<Machine, MachineError> {
        if ram.size() < MIN_RAM || ram.size() > memmap::MAX_RAM {
            return Err(MachineError::RamSize {
                size: ram.size(),
                min: MIN_RAM,
                max: memmap::MAX_RAM,
            });
        }
        let mut io = Bus::new();
        for (base, len, dev) in [
            (pic::MASTER_CMD, 2, Port::PicMaster),
            (pic::SLAVE_CMD, 2, Port::PicSlave),
            (pic::ELCR, 2, Port::Elcr),
            (pit::PIT_BASE, 4, Port::Pit),
            (pit::PORT_B, 1, Port::PortB),
            (i8042::DATA_PORT, 1, Port::I8042Data),
            (i8042::COMMAND_PORT, 1, Port::I8042Command),
            (rtc::RTC_PORT, 2, Port::Rtc),
            (uart::COM1_PORT, uart::COM1_LEN, Port::Uart),
            (
                debug_exit::DEBUG_EXIT_PORT,
                debug_exit::DEBUG_EXIT_LEN,
                Port::DebugExit,
            ),
            (acpi::PM_BASE, acpi::PM_LEN, Port::Pm),
            (pci::CONFIG_ADDRESS, 4, Port::PciAddress),
            (pci::CONFIG_DATA, 4, Port::PciData),
            (POST_PORT, 1, Port::Post),
            (DEBUGCON_PORT, 1, Port::DebugCon),
            (FIRMWARE_DEBUG_PORT, 1, Port::DebugCon),
            (fw_cfg::SELECTOR_PORT, 2, Port::FwCfg),
            (fw_cfg::DMA_PORT, 8, Port::FwCfgDma),
        ] {
            io.insert(u64::from(base), u64::from(len), dev)?;
        }
        let clock = Clock::new(config.clock);
        let rtc = rtc::Rtc::new(ram.size(), clock.wall(0));
        let cpus = config.cpus.clamp(1, MAX_CPUS) as usize;
        let ram_size = ram.size();
        Ok(Machine {
            ram,
            clock,
            io,
            mmio: Bus::new(),
            pic: pic::Pic::new(),
            pit: pit::Pit::new(),
            rtc,
            uart: uart::Uart::new(console),
            i8042: i8042::I8042::new(),
            pm: acpi::PmBlock::new(),
            pci: pci::Pci::new(),
            fw_cfg: {
                let mut f = fw_cfg::FwCfg::new(ram_size, cpus as u16);
                // RAM, and the ECAM window reserved (as the loaders' e820
                // map has it); firmware adds the legacy holes.
                let e820 = [(0, ram_size, 1), (memmap::ECAM_START, memmap::ECAM_SIZE, 2)];
                f.add_file("etc/e820", fw_cfg::e820_file(&e820))
                    .expect("a valid name");
                f
            },
            pci_devices: Vec::new(),
            doorbell: Arc::default(),
            terminal: None,
            rom: None,
            lapics: (0..cpus as u32).map(lapic::LocalApic::new).collect(),
            ioapic: ioapic::IoApic::new(),
            cur: 0,
            apic_pending: vec![false; cpus],
            extint: (0..cpus).map(|i| i == 0).collect(),
            apic_irq: false,
            extint_open: true,
            nmi_line: false,
            irq_counts: vec![[0; 256]; cpus],
            post: (None, 0),
            debugcon: None,
            stop: None,
            rsdp: acpi::RSDP_ADDR,
        })
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Guest-physical address of the ACPI RSDP, for a boot loader to pass
    /// to the kernel (it is also where a BIOS scan finds it).
    pub fn rsdp_address(&self) -> u64 {
        self.rsdp
    }

    /// The clock mode.
    pub fn clock_mode(&self) -> ClockMode {
        self.clock.mode
    }

    /// Puts an MMIO device at `base..base + len`.
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        len: u64,
        device: Box<dyn BusDevice>,
    ) -> Result<(), BusError> {
        self.mmio.insert(base, len, device)
    }

    fn request_stop(&mut self, reason: Option<StopReason>) {
        if let Some(r) = reason {
            if self.stop.is_none() {
                tracing::debug!("machine stop requested: {r:?}");
                self.stop = Some(r);
            }
        }
    }

    fn sync_irqs(&mut self) {
        self.set_irq(i8042::KBD_IRQ, self.i8042.irq_level());
        self.set_irq(uart::COM1_IRQ, self.uart.irq_level());
        self.set_irq(rtc::RTC_IRQ, self.rtc.irq_level());
    }

    /// Drives ISA interrupt line `irq` to both interrupt controllers: the
    /// 8259 pair and the I/O APIC pin it is wired to.
    fn set_irq(&mut self, irq: u8, level: bool) {
        self.pic.set_irq(irq, level);
        let mut out = Vec::new();
        self.ioapic.set_irq(isa_gsi(irq), level, &mut out);
        self.deliver_messages(out, None);
    }

    /// An edge on ISA line `irq` (the PIT's output).
    fn pulse_irq(&mut self, irq: u8) {
        self.pic.pulse_irq(irq);
        let mut out = Vec::new();
        self.ioapic.pulse_irq(isa_gsi(irq), &mut out);
        self.deliver_messages(out, None);
    }

    /// Routes interrupt messages on the APIC bus to the local APICs they
    /// are addressed to (`sender`: the vCPU whose APIC sent them, for the
    /// self shorthands).
    fn deliver_messages(&mut self, msgs: Vec<lapic::Message>, sender: Option<usize>) {
        if msgs.is_empty() {
            return;
        }
        for m in msgs {
            let targets: Vec<usize> = (0..self.lapics.len())
                .filter(|&i| {
                    let a = &self.lapics[i];
                    a.enabled() && a.matches(m.dest, sender == Some(i), a.x2apic())
                })
                .collect();
            let targets = if m.mode == lapic::DeliveryMode::LowestPriority {
                // The matching APIC whose processor priority is lowest.
                targets
                    .into_iter()
                    .min_by_key(|&i| self.lapics[i].ppr())
                    .into_iter()
                    .collect()
            } else {
                targets
            };
            for i in targets {
                self.lapics[i].accept(m.mode, m.vector, m.level_triggered);
            }
        }
        self.sync_apic();
    }

    /// A message-signalled interrupt (a device's MSI or MSI-X write of
    /// `data` to `address`, SDM 11.11): delivered to the local APICs it
    /// names. Returns false, delivering nothing, for an address outside
    /// the 0xFEExxxxx interrupt window.
    pub fn msi(&mut self, address: u64, data: u32) -> bool {
        match lapic::Message::from_msi(address, data) {
            Some(m) => {
                self.deliver_messages(vec![m], None);
                true
            }
            None => false,
        }
    }

    /// Acts on what a local APIC register access asked for.
    fn apic_event(&mut self, cpu: usize, event: Option<lapic::Event>) {
        match event {
            Some(lapic::Event::Ipi(m)) => self.deliver_messages(vec![m], Some(cpu)),
            Some(lapic::Event::Eoi(vector)) => {
                let mut out = Vec::new();
                self.ioapic.eoi(vector, &mut out);
                self.deliver_messages(out, None);
            }
            None => {}
        }
        self.sync_apic();
    }

    /// Recomputes the cached interrupt inputs of every vCPU.
    fn sync_apic(&mut self) {
        for (i, a) in self.lapics.iter().enumerate() {
            self.apic_pending[i] = a.deliverable().is_some();
            self.extint[i] = a.accepts_extint();
        }
        self.apic_irq = self.apic_pending[self.cur];
        self.extint_open = self.extint[self.cur];
        self.nmi_line = self.lapics[self.cur].nmi_pending();
    }

    /// The number of vCPUs.
    pub fn cpus(&self) -> usize {
        self.lapics.len()
    }

    /// Makes vCPU `cpu` the one whose accesses (its local APIC page and
    /// MSRs) and interrupt cycles come next.
    pub fn set_current_cpu(&mut self, cpu: usize) {
        assert!(cpu < self.lapics.len(), "vCPU {cpu} exists");
        self.cur = cpu;
        self.sync_apic();
    }

    /// The vCPU whose accesses come now.
    pub fn current_cpu(&self) -> usize {
        self.cur
    }

    /// Whether vCPU `cpu` has a maskable interrupt waiting (for a VMM
    /// deciding whom to wake).
    pub fn interrupt_pending_for(&self, cpu: usize) -> bool {
        self.apic_pending.get(cpu).copied().unwrap_or(false)
            || (self.extint.get(cpu).copied().unwrap_or(false) && self.pic.interrupt_pending())
    }

    /// vCPU `cpu`'s input lines as [`LINE_INTR`], [`LINE_NMI`] and
    /// [`LINE_STARTUP`] bits: what a vCPU on its own host thread polls
    /// without taking the machine's lock (see [`Machine::publish_lines`]).
    pub fn lines_of(&self, cpu: usize) -> u8 {
        let mut l = 0;
        if self.interrupt_pending_for(cpu) {
            l |= LINE_INTR;
        }
        if self.nmi_pending_for(cpu) {
            l |= LINE_NMI;
        }
        if self
            .lapics
            .get(cpu)
            .is_some_and(lapic::LocalApic::startup_pending)
        {
            l |= LINE_STARTUP;
        }
        l
    }

    /// Stores every vCPU's [`Machine::lines_of`] in `lines`, and returns
    /// the vCPUs whose lines rose (a halted one must be woken).
    pub fn publish_lines(&self, lines: &[AtomicU8]) -> u32 {
        let mut rose = 0;
        for (i, l) in lines.iter().enumerate().take(self.lapics.len()) {
            let new = self.lines_of(i);
            let old = l.swap(new, Ordering::SeqCst);
            if new & !old != 0 {
                rose |= 1 << i;
            }
        }
        rose
    }

    /// Takes an INIT that arrived for vCPU `cpu` (the VMM puts it in the
    /// wait-for-SIPI state).
    pub fn take_init(&mut self, cpu: usize) -> bool {
        self.lapics
            .get_mut(cpu)
            .is_some_and(lapic::LocalApic::take_init)
    }

    /// Takes a start-up IPI's vector that arrived for vCPU `cpu`.
    pub fn take_sipi(&mut self, cpu: usize) -> Option<u8> {
        self.lapics
            .get_mut(cpu)
            .and_then(lapic::LocalApic::take_sipi)
    }

    fn read_byte(&mut self, dev: Port, offset: u16) -> u8 {
        let now = self.clock.now();
        match dev {
            Port::PicMaster => self.pic.read_port(pic::MASTER_CMD + offset),
            Port::PicSlave => self.pic.read_port(pic::SLAVE_CMD + offset),
            Port::Elcr => self.pic.read_port(pic::ELCR + offset),
            Port::Pit => self.pit.read(offset, pit::ns_to_ticks(now)),
            Port::PortB => self.pit.read_port_b(pit::ns_to_ticks(now), now),
            Port::I8042Data => self.i8042.read_data(),
            Port::I8042Command => self.i8042.read_status(),
            Port::Rtc if offset == 0 => self.rtc.read_index(),
            Port::Rtc => self.rtc.read_data(self.clock.wall(now)),
            Port::Uart => self.uart.read(offset as u8),
            // The Bochs/QEMU convention: 0xE9 reads 0xE9 where a debug
            // console is attached.
            Port::DebugCon if self.debugcon.is_some() => 0xe9,
            Port::FwCfg if offset == 1 => self.fw_cfg.read_data(),
            Port::FwCfgDma => self.fw_cfg.read_dma(offset),
            Port::DebugExit
            | Port::Pm
            | Port::PciAddress
            | Port::PciData
            | Port::Post
            | Port::DebugCon
            | Port::FwCfg => 0xff,
        }
    }

    fn write_byte(&mut self, dev: Port, offset: u16, val: u8) {
        let now = self.clock.now();
        match dev {
            Port::PicMaster => self.pic.write_port(pic::MASTER_CMD + offset, val),
            Port::PicSlave => self.pic.write_port(pic::SLAVE_CMD + offset, val),
            Port::Elcr => self.pic.write_port(pic::ELCR + offset, val),
            Port::Pit => {
                // Deliver an edge that is already due before reprogramming
                // can make it vanish (engines advance time only between
                // budgets).
                if self.pit.advance(pit::ns_to_ticks(now)) {
                    self.pulse_irq(0);
                }
                self.pit.write(offset, val, pit::ns_to_ticks(now));
            }
            Port::PortB => self.pit.write_port_b(val, pit::ns_to_ticks(now)),
            Port::I8042Data => {
                let r = self.i8042.write_data(val);
                self.request_stop(r);
            }
            Port::I8042Command => {
                let r = self.i8042.write_command(val);
                self.request_stop(r);
            }
            Port::Rtc if offset == 0 => self.rtc.write_index(val),
            Port::Rtc => {
                let wall = self.clock.wall(now);
                self.rtc.advance(wall);
                self.rtc.write_data(val, wall);
            }
            Port::Uart => self.uart.write(offset as u8, val),
            Port::Post => {
                self.post = (Some(val), self.post.1 + 1);
            }
            Port::DebugCon => {
                if let Some(out) = self.debugcon.as_mut() {
                    if out.write_all(&[val]).and_then(|_| out.flush()).is_err() {
                        tracing::debug!("debugcon: write failed");
                    }
                }
            }
            Port::FwCfgDma => {
                let ram = self.ram.clone();
                self.fw_cfg.write_dma(offset, val, &ram);
            }
            Port::DebugExit | Port::Pm | Port::PciAddress | Port::PciData | Port::FwCfg => {}
        }
    }

    fn dev_read(&mut self, dev: Port, offset: u16, data: &mut [u8]) {
        match dev {
            Port::Pm => self.pm.read(u64::from(offset), data, self.clock.now()),
            Port::PciAddress => self.pci.read_address(offset, data),
            Port::PciData => match self.pci.target() {
                Some((dev, func, reg)) if dev != 0 => {
                    self.device_config_read(dev, func, reg + usize::from(offset), data)
                }
                _ => self.pci.read_data(offset, data),
            },
            _ => {
                for (i, d) in data.iter_mut().enumerate() {
                    *d = self.read_byte(dev, offset + i as u16);
                }
            }
        }
    }

    fn dev_write(&mut self, dev: Port, offset: u16, data: &[u8]) {
        match dev {
            Port::Pm => {
                let r = self.pm.write(u64::from(offset), data);
                self.request_stop(r);
            }
            Port::DebugExit => {
                let r = debug_exit::write(data);
                self.request_stop(r);
            }
            Port::PciAddress => {
                let r = self.pci.write_address(offset, data);
                self.request_stop(r);
            }
            Port::PciData => match self.pci.target() {
                Some((dev, func, reg)) if dev != 0 => {
                    self.device_config_write(dev, func, reg + usize::from(offset), data)
                }
                _ => self.pci.write_data(offset, data),
            },
            // The selector is a 16-bit register; the data port (offset 1)
            // takes no writes.
            Port::FwCfg if offset == 0 && data.len() == 2 => {
                self.fw_cfg
                    .write_selector(u16::from_le_bytes([data[0], data[1]]));
            }
            Port::FwCfg => {}
            _ => {
                for (i, &d) in data.iter().enumerate() {
                    self.write_byte(dev, offset + i as u16, d);
                }
            }
        }
    }

    /// Port input of `size` bytes (1, 2 or 4; other sizes are clamped to
    /// 1..=4). An access that does not fit one device is split into byte
    /// accesses; unclaimed bytes read 0xff.
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        self.clock.io_access();
        let n = usize::from(size.clamp(1, 4));
        let mut buf = [0xffu8; 4];
        match self.io.resolve(u64::from(port)) {
            Some((base, len, &dev)) if u64::from(port) - base + n as u64 <= len => {
                self.dev_read(dev, (u64::from(port) - base) as u16, &mut buf[..n]);
            }
            _ => {
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    let p = port.wrapping_add(i as u16);
                    match self.io.resolve(u64::from(p)) {
                        Some((base, _, &dev)) => {
                            let mut one = [0xff];
                            self.dev_read(dev, (u64::from(p) - base) as u16, &mut one);
                            *b = one[0];
                        }
                        None => {
                            let mut one = [0xff];
                            if !self.bar_access(false, u64::from(p), Access::Read(&mut one)) {
                                tracing::debug!("unclaimed port read {p:#06x}");
                            }
                            *b = one[0];
                        }
                    }
                }
            }
        }
        self.sync_irqs();
        u32::from_le_bytes(buf) & size_mask(n)
    }

    /// Port output of the low `size` bytes of `value` (size 1, 2 or 4).
    /// Unclaimed ports ignore the write.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32) {
        self.clock.io_access();
        let n = usize::from(size.clamp(1, 4));
        let bytes = value.to_le_bytes();
        match self.io.resolve(u64::from(port)) {
            Some((base, len, &dev)) if u64::from(port) - base + n as u64 <= len => {
                self.dev_write(dev, (u64::from(port) - base) as u16, &bytes[..n]);
            }
            _ => {
                for (i, &b) in bytes[..n].iter().enumerate() {
                    let p = port.wrapping_add(i as u16);
                    match self.io.resolve(u64::from(p)) {
                        Some((base, _, &dev)) => {
                            self.dev_write(dev, (u64::from(p) - base) as u16, &[b]);
                        }
                        None => {
                            if !self.bar_access(false, u64::from(p), Access::Write(&[b])) {
                                tracing::debug!("unclaimed port write {p:#06x} <- {b:#04x}");
                            }
                        }
                    }
                }
            }
        }
        self.sync_irqs();
    }

    /// MMIO read of `size` bytes (1, 2, 4 or 8). Unmapped addresses read
    /// all ones.
    pub fn mmio_read(&mut self, addr: u64, size: u8) -> u64 {
        let n = usize::from(size.clamp(1, 8));
        let mut buf = [0xffu8; 8];
        let now = self.clock.now();
        if self.lapics[self.cur].mmio_base() == Some(addr & !(lapic::PAGE - 1)) {
            self.lapics[self.cur].mmio_read(addr & (lapic::PAGE - 1), &mut buf[..n], now);
        } else if (ioapic::BASE..ioapic::BASE + ioapic::LEN).contains(&addr) {
            self.ioapic.mmio_read(addr - ioapic::BASE, &mut buf[..n]);
        } else if (memmap::ECAM_START..memmap::ECAM_START + memmap::ECAM_SIZE).contains(&addr) {
            match pci::Pci::ecam_target(addr - memmap::ECAM_START) {
                Some((dev, func, reg)) if dev != 0 => {
                    self.device_config_read(dev, func, reg, &mut buf[..n])
                }
                _ => self.pci.ecam_read(addr - memmap::ECAM_START, &mut buf[..n]),
            }
        } else if let Some(rom) = self.rom_at(addr) {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = rom.get(i).copied().unwrap_or(0xff);
            }
        } else if !self.mmio.read(addr, &mut buf[..n])
            && !self.bar_access(true, addr, Access::Read(&mut buf[..n]))
        {
            tracing::debug!("unclaimed MMIO read {addr:#x}/{n}");
        }
        let v = u64::from_le_bytes(buf);
        if n == 8 {
            v
        } else {
            v & ((1u64 << (8 * n)) - 1)
        }
    }

    /// The firmware ROM's bytes from `addr` on, when `addr` is in it.
    fn rom_at(&self, addr: u64) -> Option<&[u8]> {
        let rom = self.rom.as_ref()?;
        let base = memmap::MMIO_END - rom.len() as u64;
        (base..memmap::MMIO_END)
            .contains(&addr)
            .then(|| &rom[(addr - base) as usize..])
    }

    /// Maps a firmware image as a PC does: read-only at the top of the
    /// 4 GiB, its last 128 KiB (or all of a smaller image) also below
    /// 1 MiB, ending at 0xFFFFF — there as RAM, as after firmware has
    /// enabled shadowing. The image is 64 KiB to 16 MiB in whole 64 KiB
    /// units (as QEMU requires). Nothing else is written to RAM: the
    /// firmware builds its own tables from what fw_cfg says.
    pub fn load_firmware(&mut self, image: Vec<u8>) -> Result<(), String> {
        let len = image.len();
        if len == 0 || len % (64 << 10) != 0 || len > 16 << 20 {
            return Err(format!(
                "{len} bytes: a firmware image is 64 KiB to 16 MiB in whole 64 KiB units"
            ));
        }
        let low = len.min(128 << 10);
        self.ram
            .write(memmap::HIGH_RAM_START - low as u64, &image[len - low..])
            .map_err(|e| format!("cannot copy the firmware below 1 MiB: {e}"))?;
        self.rom = Some(image.into());
        Ok(())
    }

    /// The firmware ROM (`--firmware`), mapped at the top of the 4 GiB.
    pub fn firmware_rom(&self) -> Option<&[u8]> {
        self.rom.as_deref()
    }

    /// The firmware configuration device, for the VMM to add files (boot
    /// order, the serial console for firmware).
    pub fn fw_cfg_mut(&mut self) -> &mut fw_cfg::FwCfg {
        &mut self.fw_cfg
    }

    /// Builds the machine for firmware (`--firmware`): as
    /// [`new`](Self::new) but writes no ACPI tables or BIOS data area —
    /// the firmware does that — and maps `image` (see
    /// [`load_firmware`](Self::load_firmware)).
    pub fn with_firmware(
        config: MachineConfig,
        ram: Arc<GuestRam>,
        console: Box<dyn Write + Send>,
        image: Vec<u8>,
    ) -> Result<Machine, MachineError> {
        let mut m = Machine::build(config, ram, console)?;
        m.load_firmware(image).map_err(MachineError::Firmware)?;
        Ok(m)
    }

    /// MMIO write of the low `size` bytes of `value`. Unmapped addresses
    /// ignore the write.
    pub fn mmio_write(&mut self, addr: u64, size: u8, value: u64) {
        let n = usize::from(size.clamp(1, 8));
        let bytes = value.to_le_bytes();
        if self.lapics[self.cur].mmio_base() == Some(addr & !(lapic::PAGE - 1)) {
            let now = self.clock.now();
            let cur = self.cur;
            let e = self.lapics[cur].mmio_write(addr & (lapic::PAGE - 1), &bytes[..n], now);
            self.apic_event(cur, e);
        } else if (ioapic::BASE..ioapic::BASE + ioapic::LEN).contains(&addr) {
            let mut out = Vec::new();
            self.ioapic
                .mmio_write(addr - ioapic::BASE, &bytes[..n], &mut out);
            self.deliver_messages(out, None);
        } else if (memmap::ECAM_START..memmap::ECAM_START + memmap::ECAM_SIZE).contains(&addr) {
            match pci::Pci::ecam_target(addr - memmap::ECAM_START) {
                Some((dev, func, reg)) if dev != 0 => {
                    self.device_config_write(dev, func, reg, &bytes[..n])
                }
                _ => self.pci.ecam_write(addr - memmap::ECAM_START, &bytes[..n]),
            }
        } else if !self.mmio.write(addr, &bytes[..n])
            && !self.bar_access(true, addr, Access::Write(&bytes[..n]))
        {
            tracing::debug!("unclaimed MMIO write {addr:#x}/{n} <- {value:#x}");
        }
    }

    /// True when a device asked to stop the guest. Cheap: engines check it
    /// after each I/O access.
    #[inline]
    pub fn stop_pending(&self) -> bool {
        self.stop.is_some()
    }

    /// Takes the pending stop request, if any.
    pub fn take_stop(&mut self) -> Option<StopReason> {
        self.stop.take()
    }

    /// The CPU's maskable-interrupt input: its local APIC has a fixed
    /// interrupt above the processor priority, or the master PIC's INTR
    /// reaches it through LINT0 (ExtINT). Cheap: a few loads.
    #[inline]
    pub fn interrupt_pending(&self) -> bool {
        self.apic_irq || (self.extint_open && self.pic.interrupt_pending())
    }

    /// The INTA cycle, when the CPU accepts the interrupt: returns the
    /// vector. ExtINT comes first (the 8259 answers the cycle), then the
    /// local APIC's highest deliverable vector; with neither any more, a
    /// spurious vector: the 8259's IRQ 7 while LINT0 passes it, else the
    /// APIC's.
    pub fn acknowledge_interrupt(&mut self) -> u8 {
        let v = if self.extint_open && self.pic.interrupt_pending() {
            self.pic.acknowledge()
        } else if let Some(v) = self.lapics[self.cur].acknowledge() {
            v
        } else if self.extint_open {
            // The request came through LINT0 and vanished: the 8259
            // answers with its spurious IRQ 7.
            self.pic.acknowledge()
        } else {
            self.lapics[self.cur].spurious_vector()
        };
        self.sync_apic();
        self.irq_counts[self.cur][usize::from(v)] += 1;
        v
    }

    /// The current vCPU's NMI input: its local APIC holds an NMI (from an
    /// NMI message or LINT1).
    #[inline]
    pub fn nmi_pending(&self) -> bool {
        self.nmi_line
    }

    /// The current vCPU takes its pending NMI.
    pub fn acknowledge_nmi(&mut self) {
        if self.lapics[self.cur].take_nmi() {
            self.irq_counts[self.cur][2] += 1;
        }
        self.nmi_line = false;
    }

    /// Whether vCPU `cpu` has an NMI waiting (it wakes a halted vCPU).
    pub fn nmi_pending_for(&self, cpu: usize) -> bool {
        self.lapics
            .get(cpu)
            .is_some_and(lapic::LocalApic::nmi_pending)
    }

    /// Reads a model-specific register the platform implements for vCPU
    /// `cpu`: `IA32_APIC_BASE` (0x1B), `IA32_TSC_DEADLINE` (0x6E0, in
    /// machine ns: the CPU adds its TSC offset) and the x2APIC registers
    /// (0x800–0x8FF). `None`: not a platform MSR; `Some(Err)`: #GP.
    pub fn read_msr(
        &mut self,
        cpu: usize,
        msr: u32,
    ) -> Option<Result<u64, lapic::GeneralProtection>> {
        let now = self.clock.now();
        let a = self.lapics.get_mut(cpu)?;
        match msr {
            MSR_APIC_BASE => Some(Ok(a.base_msr())),
            MSR_TSC_DEADLINE => Some(Ok(a.tsc_deadline())),
            0x800..=0x8ff => Some(a.msr_read(msr, now)),
            _ => None,
        }
    }

    /// Writes a platform MSR (see [`read_msr`](Self::read_msr)).
    pub fn write_msr(
        &mut self,
        cpu: usize,
        msr: u32,
        value: u64,
    ) -> Option<Result<(), lapic::GeneralProtection>> {
        let now = self.clock.now();
        let a = self.lapics.get_mut(cpu)?;
        let r = match msr {
            MSR_APIC_BASE => a.write_base_msr(value).map(|()| None),
            MSR_TSC_DEADLINE => {
                a.set_tsc_deadline(value, now);
                Ok(None)
            }
            0x800..=0x8ff => a.msr_write(msr, value, now),
            _ => return None,
        };
        Some(r.map(|event| self.apic_event(cpu, event)))
    }

    /// The devices in guest-physical address space outside RAM: `(name,
    /// base, length)` in address order (`--stats`). Each vCPU's local APIC
    /// is listed where its `IA32_APIC_BASE` puts it, with its mode.
    pub fn mmio_map(&mut self) -> Vec<(String, u64, u64)> {
        let now = self.clock.now();
        let mut v: Vec<(String, u64, u64)> = vec![("i/o apic".into(), ioapic::BASE, ioapic::LEN)];
        for (i, a) in self.lapics.iter_mut().enumerate() {
            let svr = a.read_register(lapic::reg::SVR, now).unwrap_or(0);
            let state = match (a.enabled(), a.x2apic(), svr & 0x100 != 0) {
                (false, _, _) => "disabled",
                (true, true, _) => "x2APIC (MSRs)",
                (true, false, true) => "xAPIC, enabled",
                (true, false, false) => "xAPIC, software-disabled",
            };
            v.push((
                format!("local apic of vCPU {i} (ID {}, {state})", a.id()),
                a.base_msr() & !0xfff,
                lapic::PAGE,
            ));
        }
        v.extend(
            self.mmio
                .ranges()
                .map(|(base, len, _)| ("mmio device".to_string(), base, len)),
        );
        for (slot, d) in &self.pci_devices {
            for (i, bar, at) in d.config().bars() {
                if let (Some(at), true) = (at, bar.kind != pci_function::BarKind::Io) {
                    v.push((
                        format!("{} (00:{slot:02x}.0) BAR {i}", d.kind()),
                        at,
                        bar.size,
                    ));
                }
            }
        }
        v.sort_by_key(|e| e.1);
        v
    }

    /// Interrupts the CPU has acknowledged so far, by vector: `(vector,
    /// count)` for each vector that came (`--stats`).
    pub fn interrupt_counts(&self) -> Vec<(u8, u64)> {
        (0..=255u8)
            .map(|v| {
                let n = self.irq_counts.iter().map(|c| c[usize::from(v)]).sum();
                (v, n)
            })
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// Interrupts vCPU `cpu` has acknowledged so far, by vector (`--stats`
    /// per vCPU).
    pub fn interrupt_counts_of(&self, cpu: usize) -> Vec<(u8, u64)> {
        let Some(c) = self.irq_counts.get(cpu) else {
            return Vec::new();
        };
        (0..=255u8)
            .map(|v| (v, c[usize::from(v)]))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// Attaches the debug console: bytes the guest writes to port 0xE9
    /// go to `out` (QEMU's `-debugcon`, Bochs's port E9 hack).
    pub fn set_debugcon(&mut self, out: Box<dyn Write + Send>) {
        self.debugcon = Some(out);
    }

    /// The last POST code the guest wrote to port 0x80, and how many it
    /// wrote (`--stats`).
    pub fn post_code(&self) -> (Option<u8>, u64) {
        self.post
    }

    /// The devices on the port bus: `(name, first port, number of ports)`
    /// in port order (`--stats`).
    pub fn port_map(&self) -> Vec<(&'static str, u16, u16)> {
        self.io
            .ranges()
            .map(|(base, len, dev)| {
                let name = match dev {
                    Port::PicMaster => "pic (master)",
                    Port::PicSlave => "pic (slave)",
                    Port::Elcr => "pic elcr",
                    Port::Pit => "pit",
                    Port::PortB => "port b (speaker, pit gate)",
                    Port::I8042Data => "i8042 data",
                    Port::I8042Command => "i8042 status/command",
                    Port::Rtc => "rtc/cmos",
                    Port::Uart => "com1",
                    Port::DebugExit => "debug-exit",
                    Port::Pm => "acpi pm1 block",
                    Port::PciAddress => "pci config address, reset control",
                    Port::PciData => "pci config data",
                    Port::Post => "post code",
                    Port::DebugCon => "debugcon",
                    Port::FwCfg => "fw_cfg selector, data",
                    Port::FwCfgDma => "fw_cfg dma",
                };
                (name, base as u16, len as u16)
            })
            .collect()
    }

    /// Advances machine time to `guest_instructions` (the total count of
    /// instructions the CPU has executed so far) and raises the timer
    /// interrupts that became due. Called between CPU budgets; calling it
    /// again with the same count is cheap, so an engine may also call it
    /// before an I/O access to give the devices an exact time.
    ///
    /// In [`ClockMode::Host`] time is the host clock and the count only
    /// matters for [`ClockMode::Virtual`].
    pub fn advance(&mut self, guest_instructions: u64) {
        if self.doorbell.take() {
            self.poll_devices();
        }
        self.clock.instructions = self.clock.instructions.max(guest_instructions);
        let now = self.clock.now();
        if self.pit.advance(pit::ns_to_ticks(now)) {
            self.pulse_irq(0);
        }
        self.rtc.advance(self.clock.wall(now));
        self.set_irq(rtc::RTC_IRQ, self.rtc.irq_level());
        if self
            .lapics
            .iter_mut()
            .fold(false, |f, a| a.advance(now) | f)
        {
            self.sync_apic();
        }
    }

    /// Sets machine time to `guest_instructions` for the device access the
    /// CPU is about to make (it reads the exact time), without raising the
    /// timer interrupts that became due: those come at
    /// [`advance`](Self::advance), where the VMM stops its CPU.
    pub fn device_time(&mut self, guest_instructions: u64) {
        self.clock.instructions = self.clock.instructions.max(guest_instructions);
    }

    /// Under [`ClockMode::Host`]: the host instant and the machine time (ns)
    /// at it, from which machine time runs with the host's monotonic clock
    /// — what [`Machine::tsc`] reads, for a reader that must not take the
    /// machine's lock. `None` under the virtual clock.
    pub fn host_clock_origin(&self) -> Option<(Instant, u64)> {
        (self.clock.mode == ClockMode::Host).then_some((self.clock.start, self.clock.start_ns))
    }

    /// The guest's time-stamp counter at `guest_instructions`: machine
    /// time in ns at [`TSC_HZ`] = 1 GHz.
    pub fn tsc(&self, guest_instructions: u64) -> u64 {
        self.clock.at(guest_instructions)
    }

    fn next_event_ns(&self, now: u64) -> Option<u64> {
        let pit = self
            .pit
            .next_irq(pit::ns_to_ticks(now))
            .map(pit::ticks_to_ns);
        let rtc = self
            .rtc
            .next_event(self.clock.wall(now))
            .map(|w| w.saturating_sub(self.clock.wall_base_ns));
        let apic = self.lapics.iter().filter_map(|a| a.next_timer_ns()).min();
        [pit, rtc, apic].into_iter().flatten().min()
    }

    /// How long, in machine time, until the next timer interrupt (PIT
    /// counter 0 or the RTC): how long a VMM whose CPU halted may sleep
    /// (host clock) before calling [`advance`](Self::advance). `None` when
    /// no timer is armed. Terminal input may of course arrive earlier.
    pub fn time_to_next_event(&self, guest_instructions: u64) -> Option<Duration> {
        let now = self.clock.at(guest_instructions);
        self.next_event_ns(now)
            .map(|t| Duration::from_nanos(t.saturating_sub(now)))
    }

    /// Under [`ClockMode::Virtual`]: how many more instructions until the
    /// next timer interrupt is due (at least 1), so that the VMM can stop
    /// its CPU exactly there and every engine takes the interrupt at the
    /// same instruction. `None` under the host clock or with no timer armed.
    pub fn instructions_to_next_event(&self, guest_instructions: u64) -> Option<u64> {
        if self.clock.mode != ClockMode::Virtual {
            return None;
        }
        let now = self.clock.at(guest_instructions);
        let next = self.next_event_ns(now)?;
        Some(next.saturating_sub(now).div_ceil(NS_PER_INSTRUCTION).max(1))
    }

    /// For a halted CPU under [`ClockMode::Virtual`]: skips idle machine
    /// time up to the next timer event and raises it. Returns false (and
    /// does nothing) when no timer is armed — the guest would sleep forever
    /// — or under [`ClockMode::Host`], where the VMM sleeps instead.
    pub fn warp_to_next_event(&mut self, guest_instructions: u64) -> bool {
        if self.clock.mode != ClockMode::Virtual {
            return false;
        }
        self.clock.instructions = self.clock.instructions.max(guest_instructions);
        let now = self.clock.now();
        let Some(next) = self.next_event_ns(now) else {
            return false;
        };
        self.clock.idle_ns = self.clock.idle_ns.saturating_add(next.saturating_sub(now));
        self.advance(guest_instructions);
        true
    }

    /// The state of every device and of the clock, for a snapshot (the
    /// vCPU must be stopped). Fails when a device that cannot be saved is
    /// attached (an MMIO device added with
    /// [`add_mmio_device`](Self::add_mmio_device)).
    pub fn save_state(&self) -> Result<MachineState, StateError> {
        if self.rom.is_some() {
            return Err(StateError::new(
                "firmware",
                "a VM started from firmware cannot be saved yet (its ROM is not part of the state)",
            ));
        }
        let mut pci_devices = Vec::new();
        for (slot, d) in &self.pci_devices {
            if d.in_flight() > 0 {
                return Err(StateError::new(
                    d.kind(),
                    "requests are in flight (quiesce the devices first)",
                ));
            }
            let state = d.save().map_err(|why| StateError::new(d.kind(), &why))?;
            pci_devices.push(persist::PciDeviceState {
                slot: *slot,
                kind: d.kind().to_string(),
                state,
            });
        }
        if !self.mmio.is_empty() {
            return Err(StateError::new(
                "mmio",
                "an MMIO device without saved state is attached",
            ));
        }
        Ok(MachineState {
            clock: persist::ClockState {
                mode: self.clock.mode,
                now_ns: self.clock.now(),
                wall_base_ns: self.clock.wall_base_ns,
                idle_ns: self.clock.idle_ns,
                instructions: self.clock.instructions,
            },
            pic: self.pic.save(),
            pit: self.pit.save(),
            rtc: self.rtc.save(),
            uart: self.uart.save(),
            i8042: self.i8042.save(),
            pm: self.pm.save(),
            pci: self.pci.save(),
            lapics: self.lapics.iter().map(Persist::save).collect(),
            ioapic: self.ioapic.save(),
            stop: self.stop,
            pci_devices,
        })
    }

    /// Takes back a saved state: every device's, and the clock's (machine
    /// time goes on from the snapshot's; the clock mode is the snapshot's).
    /// A state some device refuses leaves the machine unchanged.
    pub fn restore_state(&mut self, s: MachineState) -> Result<(), StateError> {
        // Restore into copies first, so that a refusal changes nothing.
        let mut pic = self.pic.clone();
        pic.restore(s.pic)?;
        let mut pit = self.pit.clone();
        pit.restore(s.pit)?;
        let mut rtc = self.rtc.clone();
        rtc.restore(s.rtc)?;
        let mut i8042 = self.i8042.clone();
        i8042.restore(s.i8042)?;
        let mut pm = self.pm.clone();
        pm.restore(s.pm)?;
        let mut pci = self.pci.clone();
        pci.restore(s.pci)?;
        if s.lapics.len() != self.lapics.len() {
            return Err(StateError::new(
                "lapic",
                &format!(
                    "{} local APICs for a machine with {} vCPUs",
                    s.lapics.len(),
                    self.lapics.len()
                ),
            ));
        }
        let mut lapics = self.lapics.clone();
        for (a, st) in lapics.iter_mut().zip(s.lapics) {
            a.restore(st)?;
        }
        let mut ioapic = self.ioapic.clone();
        ioapic.restore(s.ioapic)?;
        // The same devices in the same slots, each accepting its state.
        let attached: Vec<(u8, &str)> = self
            .pci_devices
            .iter()
            .map(|(slot, d)| (*slot, d.kind()))
            .collect();
        let saved: Vec<(u8, &str)> = s
            .pci_devices
            .iter()
            .map(|d| (d.slot, d.kind.as_str()))
            .collect();
        if attached != saved {
            return Err(StateError::new(
                "pci",
                &format!("the snapshot's PCI devices {saved:?} are not the machine's {attached:?}"),
            ));
        }
        for ((_, d), st) in self.pci_devices.iter().zip(&s.pci_devices) {
            d.check_state(&st.state)
                .map_err(|why| StateError::new(d.kind(), &why))?;
        }
        let c = &s.clock;
        // Far from overflow in every clock sum (about 36 years of ns).
        const LIMIT: u64 = 1 << 60;
        if [c.now_ns, c.idle_ns, c.instructions]
            .iter()
            .any(|&v| v >= LIMIT)
            || c.wall_base_ns >= 1 << 62
        {
            return Err(StateError::new("clock", "time out of range"));
        }
        self.uart.restore(s.uart)?;
        for ((_, d), st) in self.pci_devices.iter_mut().zip(s.pci_devices) {
            // Checked above: a refusal here is a device's bug.
            d.restore(st.state)
                .map_err(|why| StateError::new("pci", &why))?;
        }
        self.pic = pic;
        self.pit = pit;
        self.rtc = rtc;
        self.i8042 = i8042;
        self.pm = pm;
        self.pci = pci;
        self.lapics = lapics;
        self.ioapic = ioapic;
        self.stop = s.stop;
        self.clock = Clock {
            mode: c.mode,
            start: Instant::now(),
            start_ns: if c.mode == ClockMode::Host {
                c.now_ns
            } else {
                0
            },
            wall_base_ns: c.wall_base_ns,
            idle_ns: c.idle_ns,
            instructions: c.instructions,
        };
        self.sync_irqs();
        self.sync_apic();
        Ok(())
    }

    /// Replaces guest RAM with `ram` (same size), for an engine that needs
    /// another kind of mapping; the caller copies the contents.
    pub fn replace_ram(&mut self, ram: Arc<GuestRam>) {
        assert_eq!(ram.size(), self.ram.size(), "RAM keeps its size");
        self.ram = ram;
    }

    /// Builds the machine for a VM restored from a snapshot: as
    /// [`new`](Self::new), but RAM already holds the firmware tables, so
    /// nothing is written to it, and the devices take `state`.
    pub fn restored(
        config: MachineConfig,
        ram: Arc<GuestRam>,
        console: Box<dyn Write + Send>,
        state: MachineState,
    ) -> Result<Machine, MachineError> {
        Machine::restored_with(config, ram, console, state, |_| Ok(()))
    }

    /// As [`restored`](Self::restored), with `attach` plugging in the
    /// devices (the PCI devices the state names) before the state is
    /// taken.
    pub fn restored_with(
        config: MachineConfig,
        ram: Arc<GuestRam>,
        console: Box<dyn Write + Send>,
        state: MachineState,
        attach: impl FnOnce(&mut Machine) -> Result<(), MachineError>,
    ) -> Result<Machine, MachineError> {
        let mut m = Machine::build(config, ram, console)?;
        attach(&mut m)?;
        m.restore_state(state).map_err(MachineError::State)?;
        Ok(m)
    }

    /// Plugs `device` into the first free slot of PCI bus 0 (1–31; the
    /// host bridge is 0) and returns the slot.
    pub fn add_pci_device(
        &mut self,
        device: Box<dyn pci_device::PciDevice>,
    ) -> Result<u8, MachineError> {
        let slot = (1..32u8)
            .find(|s| self.pci_devices.iter().all(|(t, _)| t != s))
            .ok_or(MachineError::PciFull)?;
        self.pci_devices.push((slot, device));
        Ok(slot)
    }

    /// The devices on PCI bus 0 beside the host bridge: slot and device.
    pub fn pci_devices(&self) -> impl Iterator<Item = (u8, &dyn pci_device::PciDevice)> {
        self.pci_devices.iter().map(|(s, d)| (*s, d.as_ref()))
    }

    /// What device workers ring when their work is done (see
    /// [`pci_device::Doorbell`]); the VMM waits on it while the guest is
    /// halted with I/O in flight.
    pub fn doorbell(&self) -> &Arc<pci_device::Doorbell> {
        &self.doorbell
    }

    /// Whether a device has work in flight off the vCPU thread, or
    /// finished work the machine has not taken yet: a halted guest will
    /// be woken by it.
    pub fn io_in_flight(&self) -> bool {
        self.doorbell.rung() || self.pci_devices.iter().any(|(_, d)| d.in_flight() > 0)
    }

    /// Takes what device workers finished and delivers the interrupts
    /// it signals.
    pub fn poll_devices(&mut self) {
        let ram = self.ram.clone();
        for i in 0..self.pci_devices.len() {
            let mut io = pci_device::DeviceIo::new(&ram);
            self.pci_devices[i].1.poll(&mut io);
            self.deliver_msis(i, io.take_msis());
        }
    }

    /// Waits until no device has work in flight, taking what finished
    /// (before a snapshot, or when the VM stops).
    pub fn quiesce_devices(&mut self) {
        let ram = self.ram.clone();
        for i in 0..self.pci_devices.len() {
            let mut io = pci_device::DeviceIo::new(&ram);
            self.pci_devices[i].1.quiesce(&mut io);
            self.deliver_msis(i, io.take_msis());
        }
    }

    /// Delivers the messages device `i` signalled, if it may master the
    /// bus (an MSI is a memory write by the device).
    fn deliver_msis(&mut self, i: usize, msis: Vec<(u64, u32)>) {
        if msis.is_empty() {
            return;
        }
        let master = self.pci_devices[i].1.config().command() & pci_function::CMD_BUS_MASTER != 0;
        for (address, data) in msis {
            if !master || !self.msi(address, data) {
                tracing::debug!(
                    "device 00:{:02x}.0: interrupt message {address:#x} <- {data:#x} dropped",
                    self.pci_devices[i].0
                );
            }
        }
    }

    fn device_index(&self, dev: u8) -> Option<usize> {
        self.pci_devices.iter().position(|(s, _)| *s == dev)
    }

    /// A configuration read of device `dev`, function `func` (only
    /// function 0 exists).
    fn device_config_read(&mut self, dev: u8, func: u8, reg: usize, data: &mut [u8]) {
        match self.device_index(dev) {
            Some(i) if func == 0 => self.pci_devices[i].1.config_read(reg, data),
            _ => data.fill(0xff),
        }
    }

    fn device_config_write(&mut self, dev: u8, func: u8, reg: usize, data: &[u8]) {
        if let Some(i) = self.device_index(dev).filter(|_| func == 0) {
            let ram = self.ram.clone();
            let mut io = pci_device::DeviceIo::new(&ram);
            self.pci_devices[i].1.config_write(reg, data, &mut io);
            self.deliver_msis(i, io.take_msis());
        }
    }

    /// An access to whatever BAR decodes `addr` (memory space when
    /// `memory`, else I/O space). False when none does.
    fn bar_access(&mut self, memory: bool, addr: u64, access: Access<'_>) -> bool {
        let len = match &access {
            Access::Read(d) => d.len(),
            Access::Write(d) => d.len(),
        } as u64;
        let hit = self.pci_devices.iter().enumerate().find_map(|(i, (_, d))| {
            d.config().bars().find_map(|(bar, b, at)| {
                let at = at?;
                let is_memory = b.kind != pci_function::BarKind::Io;
                (is_memory == memory && addr >= at && addr - at + len <= b.size).then_some((
                    i,
                    bar,
                    addr - at,
                ))
            })
        });
        let Some((i, bar, offset)) = hit else {
            return false;
        };
        let ram = self.ram.clone();
        let mut io = pci_device::DeviceIo::new(&ram);
        match access {
            Access::Read(d) => self.pci_devices[i].1.bar_read(bar, offset, d, &mut io),
            Access::Write(d) => {
                self.pci_devices[i].1.bar_write(bar, offset, d, &mut io);
                // Under the virtual clock a request completes at the
                // instruction that submitted it, so runs repeat.
                if self.clock.mode == ClockMode::Virtual && self.pci_devices[i].1.in_flight() > 0 {
                    self.pci_devices[i].1.quiesce(&mut io);
                }
            }
        }
        self.deliver_msis(i, io.take_msis());
        true
    }

    /// Ctrl-Alt-Del on the keyboard (see [`i8042::I8042::ctrl_alt_del`]).
    pub fn send_ctrl_alt_del(&mut self) {
        self.i8042.ctrl_alt_del();
        self.sync_irqs();
    }

    /// Bytes from the terminal: for COM1's receiver, or for the device
    /// that is the terminal ([`Machine::set_terminal_device`]).
    pub fn serial_input(&mut self, bytes: &[u8]) {
        if let Some(i) = self.terminal.and_then(|slot| self.device_index(slot)) {
            let ram = self.ram.clone();
            let mut io = pci_device::DeviceIo::new(&ram);
            self.pci_devices[i].1.terminal_input(bytes, &mut io);
            self.deliver_msis(i, io.take_msis());
            return;
        }
        self.uart.enqueue_input(bytes);
        self.set_irq(uart::COM1_IRQ, self.uart.irq_level());
    }

    /// Terminal bytes not yet read by the guest (for flow control: a VMM
    /// may stop reading its terminal while this is large).
    pub fn serial_input_pending(&self) -> usize {
        match self.terminal.and_then(|slot| self.device_index(slot)) {
            Some(i) => self.pci_devices[i].1.terminal_pending(),
            None => self.uart.pending_input(),
        }
    }

    /// Makes the device in `slot` the terminal: terminal input goes to it
    /// instead of COM1.
    pub fn set_terminal_device(&mut self, slot: u8) {
        self.terminal = Some(slot);
    }
}

/// A device access: bytes to fill or bytes written.
enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// `IA32_APIC_BASE`.
const MSR_APIC_BASE: u32 = 0x1b;
/// `IA32_TSC_DEADLINE`.
const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// The I/O APIC pin an ISA interrupt line is wired to: as on a PC (and in
/// the MADT's interrupt source override), the PIT's IRQ 0 is pin 2; the
/// others are identity-mapped.
fn isa_gsi(irq: u8) -> usize {
    if irq == 0 {
        2
    } else {
        usize::from(irq)
    }
}

fn size_mask(n: usize) -> u32 {
    if n >= 4 {
        u32::MAX
    } else {
        (1u32 << (8 * n)) - 1
    }
}

#[cfg(test)]
mod tests;
