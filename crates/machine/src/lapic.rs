//! The local APIC of one vCPU, in xAPIC (MMIO) and x2APIC (MSR) modes.
//!
//! Registers and behaviour follow the SDM, volume 3, chapter 11 ("Advanced
//! Programmable Interrupt Controller"):
//!
//! - `IA32_APIC_BASE` (MSR 0x1B): the page the registers appear at
//!   (default [`DEFAULT_BASE`]), the BSP flag, global enable and x2APIC
//!   mode, with the architectural transitions (x2APIC → xAPIC only through
//!   disabled; anything else is #GP);
//! - ID, version (max LVT entry 5: timer, thermal, performance counters,
//!   LINT0, LINT1, error), TPR, PPR, EOI, LDR, DFR, SVR, ISR/TMR/IRR, ESR
//!   (errors latched by a write), ICR (fixed, lowest priority, NMI, INIT,
//!   SIPI; physical and logical destinations; self, all and all-but-self
//!   shorthands), the LVT, and the timer in one-shot, periodic and
//!   TSC-deadline modes with its divide configuration;
//! - interrupt priority: the highest vector in IRR is delivered when its
//!   priority class is above the processor priority (PPR = max(TPR,
//!   highest ISR class)); EOI retires the highest ISR vector and, when it
//!   was level-triggered, broadcasts the EOI to the I/O APIC;
//! - software disable (SVR bit 8 clear) masks every LVT entry and refuses
//!   fixed interrupts.
//!
//! The APIC timer counts at [`TIMER_HZ`] (1 GHz: one count per ns of
//! machine time, before the divider). Time is passed in as machine ns, so
//! the device is plain data. What leaves the APIC (an IPI for the APIC
//! bus, an EOI for the I/O APIC) comes back from a register write as an
//! [`Event`] for the machine to route.
//!
//! Like QEMU's, the bootstrap processor's LINT0 leaves reset programmed for
//! ExtINT (the virtual-wire mode a BIOS sets up), so the 8259's interrupts
//! reach the CPU until the guest reprograms its APIC.

use serde::{Deserialize, Serialize};

/// The architectural default of `IA32_APIC_BASE`'s base address.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;
/// The size of the register page.
pub const PAGE: u64 = 0x1000;
/// The APIC timer's input clock before the divider.
pub const TIMER_HZ: u64 = 1_000_000_000;

/// `IA32_APIC_BASE`: this processor is the bootstrap processor.
pub const BASE_BSP: u64 = 1 << 8;
/// `IA32_APIC_BASE`: x2APIC mode.
pub const BASE_EXTD: u64 = 1 << 10;
/// `IA32_APIC_BASE`: the APIC is globally enabled.
pub const BASE_ENABLE: u64 = 1 << 11;
/// The physical-address bits `IA32_APIC_BASE` can hold (the model's
/// MAXPHYADDR is 36).
const BASE_ADDR_MASK: u64 = 0x0000_000f_ffff_f000;

/// The version register: version 0x14 (an integrated APIC), max LVT
/// entry 5.
pub const VERSION: u32 = 0x0005_0014;

/// Register offsets in the xAPIC page (the x2APIC MSR is 0x800 +
/// offset / 16).
pub mod reg {
    /// Local APIC ID.
    pub const ID: u32 = 0x20;
    /// Version.
    pub const VERSION: u32 = 0x30;
    /// Task priority.
    pub const TPR: u32 = 0x80;
    /// Arbitration priority.
    pub const APR: u32 = 0x90;
    /// Processor priority.
    pub const PPR: u32 = 0xa0;
    /// End of interrupt.
    pub const EOI: u32 = 0xb0;
    /// Remote read.
    pub const RRD: u32 = 0xc0;
    /// Logical destination.
    pub const LDR: u32 = 0xd0;
    /// Destination format.
    pub const DFR: u32 = 0xe0;
    /// Spurious interrupt vector.
    pub const SVR: u32 = 0xf0;
    /// In-service register (8 words).
    pub const ISR: u32 = 0x100;
    /// Trigger mode register (8 words).
    pub const TMR: u32 = 0x180;
    /// Interrupt request register (8 words).
    pub const IRR: u32 = 0x200;
    /// Error status.
    pub const ESR: u32 = 0x280;
    /// Interrupt command, low half.
    pub const ICR_LO: u32 = 0x300;
    /// Interrupt command, high half (xAPIC destination).
    pub const ICR_HI: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u32 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u32 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u32 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u32 = 0x3e0;
    /// x2APIC only: self IPI.
    pub const SELF_IPI: u32 = 0x3f0;
}

/// LVT and ICR fields.
const MASKED: u32 = 1 << 16;
const LEVEL: u32 = 1 << 15;
const TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_MODE: u32 = 3 << 17;
const TIMER_TSC_DEADLINE: u32 = 2 << 17;
const SVR_ENABLE: u32 = 1 << 8;

/// ESR bits.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// LVT slots, in register order.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;
/// Writable bits of each LVT entry (timer, thermal, perf, LINT0, LINT1,
/// error).
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00ff, // vector, mask, timer mode (bit 18: TSC deadline)
    0x0001_07ff, // vector, delivery mode, mask
    0x0001_07ff,
    0x0001_a7ff, // vector, delivery mode, polarity, trigger, mask
    0x0001_a7ff,
    0x0001_00ff, // vector, mask
];

/// Delivery modes (ICR and LVT bits 8–10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// To the vector, at its priority.
    Fixed,
    /// To the lowest-priority processor among the destinations.
    LowestPriority,
    /// System management interrupt (not modelled: dropped).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT.
    Init,
    /// Start-up IPI with a vector naming the real-mode start page.
    StartUp,
    /// External interrupt: the 8259's vector.
    ExtInt,
    /// A reserved encoding.
    Reserved,
}

impl DeliveryMode {
    /// Decodes bits 8–10.
    pub fn from_bits(v: u32) -> Self {
        match (v >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
}

/// Which APICs an interrupt message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Destination {
    /// The sending APIC only.
    SelfOnly,
    /// Every APIC.
    All,
    /// Every APIC but the sender.
    AllButSelf,
    /// By APIC ID (0xFF in xAPIC, 0xFFFF_FFFF in x2APIC: broadcast).
    Physical(u32),
    /// By logical destination (matched against LDR and DFR).
    Logical(u32),
}

/// An interrupt message on the APIC bus (an IPI, or an I/O APIC or MSI
/// message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The vector (the start page for a SIPI).
    pub vector: u8,
    /// How it is delivered.
    pub mode: DeliveryMode,
    /// To whom.
    pub dest: Destination,
    /// Level-triggered (fixed interrupts set TMR; an INIT with level 0 is
    /// the "INIT level de-assert" that does nothing on modern processors).
    pub level_triggered: bool,
    /// The level bit of the ICR (INIT de-assert when clear).
    pub assert: bool,
}

impl Message {
    /// Decodes a message-signalled interrupt (SDM 11.11): the address
    /// 0xFEExxxxx carries the destination ID (bits 19–12) and the
    /// destination mode (bit 2: logical); the data the vector (bits 7–0),
    /// the delivery mode (10–8), the level (14) and the trigger mode (15).
    /// `None` for an address outside the interrupt window.
    pub fn from_msi(address: u64, data: u32) -> Option<Message> {
        if address >> 20 != 0xfee {
            return None;
        }
        let dest = ((address >> 12) & 0xff) as u32;
        Some(Message {
            vector: data as u8,
            mode: DeliveryMode::from_bits(data),
            dest: if address & (1 << 2) != 0 {
                Destination::Logical(dest)
            } else {
                Destination::Physical(dest)
            },
            level_triggered: data & LEVEL != 0,
            assert: data & (1 << 14) != 0 || data & LEVEL == 0,
        })
    }
}

/// What a register access asks the rest of the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Send an interrupt message on the APIC bus.
    Ipi(Message),
    /// A level-triggered vector was retired: broadcast its EOI to the
    /// I/O APICs.
    Eoi(u8),
}

/// The outcome of an `IA32_APIC_BASE` or x2APIC MSR write the model
/// refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GeneralProtection;

/// What the timer is counting toward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Timer {
    /// Initial count register.
    initial: u32,
    /// Divide configuration register (bits 0, 1, 3).
    divide: u32,
    /// Machine time (ns) at which the current count was `initial`.
    start_ns: u64,
    /// One-shot or periodic: the count is running.
    running: bool,
    /// TSC-deadline mode: the deadline in machine ns (0: disarmed).
    deadline_ns: u64,
}

impl Timer {
    /// Counter ticks per count: the divide configuration's value.
    fn divisor(&self) -> u64 {
        let d = (self.divide & 3) | ((self.divide >> 1) & 4);
        if d == 7 {
            1
        } else {
            2 << d
        }
    }

    fn period_ns(&self) -> u64 {
        u64::from(self.initial) * self.divisor() * (1_000_000_000 / TIMER_HZ)
    }
}

/// One local APIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalApic {
    /// `IA32_APIC_BASE`.
    base: u64,
    /// The APIC ID (initial value: the vCPU's index).
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// Errors since the last ESR write, and what the last write latched.
    esr_pending: u32,
    esr: u32,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; 6],
    timer: Timer,
    /// An NMI is waiting for the CPU.
    nmi: bool,
    /// An INIT arrived (the VMM resets the vCPU and waits for a SIPI).
    init: bool,
    /// A start-up IPI's vector, for a vCPU waiting after INIT.
    sipi: Option<u8>,
}

fn bit(v: &[u32; 8], vector: u8) -> bool {
    v[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
}

fn set_bit(v: &mut [u32; 8], vector: u8, on: bool) {
    let w = &mut v[usize::from(vector >> 5)];
    if on {
        *w |= 1 << (vector & 31);
    } else {
        *w &= !(1 << (vector & 31));
    }
}

/// The highest vector set in a 256-bit register.
fn highest(v: &[u32; 8]) -> Option<u8> {
    (0..8)
        .rev()
        .find(|&i| v[i] != 0)
        .map(|i| (i * 32 + 31 - v[i].leading_zeros() as usize) as u8)
}

impl LocalApic {
    /// The APIC of vCPU `index` after power-up: globally enabled in xAPIC
    /// mode at [`DEFAULT_BASE`], software-disabled, every LVT masked but
    /// the bootstrap processor's LINT0 (ExtINT, see the module docs).
    pub fn new(index: u32) -> Self {
        let bsp = index == 0;
        let mut lvt = [MASKED; 6];
        if bsp {
            lvt[LVT_LINT0] = 0x700;
        }
        LocalApic {
            base: DEFAULT_BASE | BASE_ENABLE | if bsp { BASE_BSP } else { 0 },
            id: index,
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr_pending: 0,
            esr: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt,
            timer: Timer::default(),
            nmi: false,
            init: false,
            sipi: None,
        }
    }

    /// `IA32_APIC_BASE`.
    pub fn base_msr(&self) -> u64 {
        self.base
    }

    /// Where the register page is, when the APIC is enabled in xAPIC mode.
    #[inline]
    pub fn mmio_base(&self) -> Option<u64> {
        (self.base & (BASE_ENABLE | BASE_EXTD) == BASE_ENABLE).then_some(self.base & BASE_ADDR_MASK)
    }

    /// Globally enabled (either mode).
    #[inline]
    pub fn enabled(&self) -> bool {
        self.base & BASE_ENABLE != 0
    }

    /// In x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.base & (BASE_ENABLE | BASE_EXTD) == BASE_ENABLE | BASE_EXTD
    }

    fn sw_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Writes `IA32_APIC_BASE` (SDM 11.12.5: the valid mode transitions).
    /// Disabling resets the APIC to its power-up state but for the base.
    pub fn write_base_msr(&mut self, v: u64) -> Result<(), GeneralProtection> {
        let reserved = !(BASE_ADDR_MASK | BASE_BSP | BASE_ENABLE | BASE_EXTD);
        if v & reserved != 0 {
            return Err(GeneralProtection);
        }
        let old = self.base & (BASE_ENABLE | BASE_EXTD);
        let new = v & (BASE_ENABLE | BASE_EXTD);
        let ok = match (old, new) {
            (a, b) if a == b => true,
            // Invalid state: x2APIC without enable.
            (_, BASE_EXTD) => false,
            // x2APIC → xAPIC directly.
            (o, BASE_ENABLE) if o == BASE_ENABLE | BASE_EXTD => false,
            // Disabled → x2APIC directly.
            (0, n) if n == BASE_ENABLE | BASE_EXTD => false,
            _ => true,
        };
        if !ok {
            return Err(GeneralProtection);
        }
        // The BSP flag is read-only.
        let v = (v & !BASE_BSP) | (self.base & BASE_BSP);
        if new == 0 && old != 0 {
            // Disabling resets every register but the ID; the LVT is all
            // masked (LINT0's ExtINT default is the power-up BSP's only).
            *self = LocalApic {
                base: v,
                id: self.id,
                lvt: [MASKED; 6],
                ..LocalApic::new(self.id)
            };
        } else if new == BASE_ENABLE | BASE_EXTD && old == BASE_ENABLE {
            // Entering x2APIC mode: the logical ID is derived from the ID.
            self.ldr = ((self.id >> 4) << 16) | (1 << (self.id & 15));
        }
        self.base = v;
        Ok(())
    }

    /// The processor priority (SDM 11.8.3.1).
    pub fn ppr(&self) -> u32 {
        let isrv = highest(&self.isr).map_or(0, u32::from);
        if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        }
    }

    /// A fixed interrupt the CPU should take now: the highest IRR vector
    /// whose class is above the processor priority.
    #[inline]
    pub fn deliverable(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (u32::from(v) & 0xf0 > self.ppr() & 0xf0).then_some(v)
    }

    /// The INTA cycle for a fixed interrupt: the highest deliverable IRR
    /// vector moves to ISR. `None` when nothing is deliverable any more
    /// (the spurious vector is then the CPU's).
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.deliverable()?;
        set_bit(&mut self.irr, v, false);
        set_bit(&mut self.isr, v, true);
        Some(v)
    }

    /// The spurious-interrupt vector.
    pub fn spurious_vector(&self) -> u8 {
        self.svr as u8
    }

    /// Whether LINT0 passes the 8259's INTR to the CPU: the APIC is
    /// globally disabled (the pins are then INTR and NMI), or LINT0 is an
    /// unmasked ExtINT entry.
    #[inline]
    pub fn accepts_extint(&self) -> bool {
        !self.enabled()
            || (self.lvt[LVT_LINT0] & MASKED == 0
                && DeliveryMode::from_bits(self.lvt[LVT_LINT0]) == DeliveryMode::ExtInt)
    }

    /// Takes a pending NMI (from LINT1 or an NMI message).
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi)
    }

    /// An NMI is waiting.
    pub fn nmi_pending(&self) -> bool {
        self.nmi
    }

    /// Takes a pending INIT.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init)
    }

    /// Whether an INIT or a start-up IPI waits to be taken.
    pub fn startup_pending(&self) -> bool {
        self.init || self.sipi.is_some()
    }

    /// Takes a pending start-up IPI's vector.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.sipi.take()
    }

    fn error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if lvt & MASKED == 0 {
            let v = lvt as u8;
            if v >= 16 {
                set_bit(&mut self.irr, v, true);
                set_bit(&mut self.tmr, v, false);
            } else {
                // An illegal vector in the error entry: recorded, not
                // delivered (it would loop).
                self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
            }
        }
    }

    /// Accepts an interrupt message addressed to this APIC.
    pub fn accept(&mut self, mode: DeliveryMode, vector: u8, level_triggered: bool) {
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if !self.enabled() || !self.sw_enabled() {
                    return;
                }
                if vector < 16 {
                    self.error(ESR_RECEIVE_ILLEGAL_VECTOR);
                    return;
                }
                set_bit(&mut self.irr, vector, true);
                set_bit(&mut self.tmr, vector, level_triggered);
            }
            DeliveryMode::Nmi => self.nmi = true,
            DeliveryMode::Init => {
                self.init = true;
                self.sipi = None;
            }
            DeliveryMode::StartUp => self.sipi = Some(vector),
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => {}
        }
    }

    /// Whether a message with `dest` from `sender` is for this APIC.
    pub fn matches(&self, dest: Destination, is_sender: bool, x2apic: bool) -> bool {
        match dest {
            Destination::SelfOnly => is_sender,
            Destination::All => true,
            Destination::AllButSelf => !is_sender,
            Destination::Physical(id) => {
                let broadcast = if x2apic { 0xffff_ffff } else { 0xff };
                id == broadcast || id == self.id
            }
            Destination::Logical(d) => {
                if self.x2apic() {
                    // Cluster in bits 31:16, a bitmap of 16 in 15:0.
                    d == 0xffff_ffff
                        || ((d >> 16) == (self.ldr >> 16) && (d & self.ldr & 0xffff) != 0)
                } else {
                    let d = d & 0xff;
                    let ldr = self.ldr >> 24;
                    if d == 0xff {
                        true
                    } else if self.dfr >> 28 == 0xf {
                        // Flat model.
                        d & ldr != 0
                    } else {
                        // Cluster model.
                        (d >> 4) == (ldr >> 4) && (d & ldr & 0xf) != 0
                    }
                }
            }
        }
    }

    fn timer_mode(&self) -> u32 {
        self.lvt[LVT_TIMER] & TIMER_MODE
    }

    /// The timer's current count at `now`.
    fn current_count(&self, now: u64) -> u32 {
        let t = &self.timer;
        if !t.running || t.initial == 0 || self.timer_mode() == TIMER_TSC_DEADLINE {
            return 0;
        }
        let ticks = now.saturating_sub(t.start_ns) / t.divisor();
        let initial = u64::from(t.initial);
        if self.timer_mode() == TIMER_PERIODIC {
            (initial - ticks % initial) as u32
        } else if ticks >= initial {
            0
        } else {
            (initial - ticks) as u32
        }
    }

    /// When the timer next fires, in machine ns.
    pub fn next_timer_ns(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        let t = &self.timer;
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            return (t.deadline_ns != 0).then_some(t.deadline_ns);
        }
        if !t.running || t.initial == 0 {
            return None;
        }
        Some(t.start_ns.saturating_add(t.period_ns()))
    }

    /// Raises the timer interrupt if it became due by `now`. Returns
    /// whether it fired (masked or not).
    pub fn advance(&mut self, now: u64) -> bool {
        let Some(due) = self.next_timer_ns() else {
            return false;
        };
        if now < due {
            return false;
        }
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.timer.deadline_ns = 0;
        } else if self.timer_mode() == TIMER_PERIODIC {
            // Missed periods coalesce: IRR holds one request.
            let period = self.timer.period_ns().max(1);
            let periods = (now - self.timer.start_ns) / period;
            self.timer.start_ns += periods * period;
        } else {
            self.timer.running = false;
        }
        let lvt = self.lvt[LVT_TIMER];
        if lvt & MASKED == 0 && self.sw_enabled() {
            self.accept(DeliveryMode::Fixed, lvt as u8, false);
        }
        true
    }

    /// `IA32_TSC_DEADLINE` in machine ns (0: disarmed).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.timer.deadline_ns
        } else {
            0
        }
    }

    /// Writes `IA32_TSC_DEADLINE` (machine ns). Ignored outside
    /// TSC-deadline mode, as on silicon.
    pub fn set_tsc_deadline(&mut self, ns: u64, now: u64) {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.timer.deadline_ns = ns;
            // A deadline in the past fires at once.
            self.advance(now);
        }
    }

    /// Reads the 32-bit register at `offset` (xAPIC page offset, 16-byte
    /// aligned). `None` for an offset that names no register.
    pub fn read_register(&mut self, offset: u32, now: u64) -> Option<u32> {
        let x2 = self.x2apic();
        Some(match offset {
            reg::ID => {
                if x2 {
                    self.id
                } else {
                    self.id << 24
                }
            }
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::APR => 0,
            reg::PPR => self.ppr(),
            reg::RRD => 0,
            reg::LDR => self.ldr,
            reg::DFR if !x2 => self.dfr,
            reg::SVR => self.svr,
            o @ 0x100..=0x170 => self.isr[((o - 0x100) >> 4) as usize],
            o @ 0x180..=0x1f0 => self.tmr[((o - 0x180) >> 4) as usize],
            o @ 0x200..=0x270 => self.irr[((o - 0x200) >> 4) as usize],
            reg::ESR => self.esr,
            reg::ICR_LO => self.icr_lo,
            reg::ICR_HI if !x2 => self.icr_hi,
            o @ reg::LVT_TIMER..=reg::LVT_ERROR => self.lvt[((o - reg::LVT_TIMER) >> 4) as usize],
            reg::TIMER_INITIAL => self.timer.initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer.divide,
            _ => return None,
        })
    }

    /// Writes the 32-bit register at `offset`. Returns what the machine
    /// must route, or `Err` for an offset that names no writable register.
    pub fn write_register(
        &mut self,
        offset: u32,
        v: u32,
        now: u64,
    ) -> Result<Option<Event>, GeneralProtection> {
        let x2 = self.x2apic();
        match offset {
            reg::ID if !x2 => self.id = v >> 24,
            reg::TPR => self.tpr = v & 0xff,
            reg::EOI => return Ok(self.eoi()),
            reg::LDR if !x2 => self.ldr = v & 0xff00_0000,
            reg::DFR if !x2 => self.dfr = v | 0x0fff_ffff,
            reg::SVR => {
                self.svr = v & 0x3ff;
                if !self.sw_enabled() {
                    for l in &mut self.lvt {
                        *l |= MASKED;
                    }
                }
            }
            reg::ESR => {
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            reg::ICR_LO => {
                self.icr_lo = v & 0x000c_cfff;
                return Ok(self.send_ipi(u64::from(self.icr_hi) << 32 | u64::from(self.icr_lo)));
            }
            reg::ICR_HI if !x2 => self.icr_hi = v & 0xff00_0000,
            o @ reg::LVT_TIMER..=reg::LVT_ERROR => {
                let i = ((o - reg::LVT_TIMER) >> 4) as usize;
                let mut v = (v & LVT_WRITABLE[i]) | (self.lvt[i] & 0x4000);
                if !self.sw_enabled() {
                    v |= MASKED;
                }
                if i == LVT_TIMER {
                    if v & TIMER_MODE == TIMER_MODE {
                        // Reserved mode: treated as one-shot.
                        v &= !TIMER_MODE;
                    }
                    if (v & TIMER_MODE == TIMER_TSC_DEADLINE)
                        != (self.timer_mode() == TIMER_TSC_DEADLINE)
                    {
                        // Switching to or from TSC-deadline mode disarms.
                        self.timer.running = false;
                        self.timer.initial = 0;
                        self.timer.deadline_ns = 0;
                    }
                }
                self.lvt[i] = v;
            }
            reg::TIMER_INITIAL => {
                if self.timer_mode() != TIMER_TSC_DEADLINE {
                    self.timer.initial = v;
                    self.timer.start_ns = now;
                    self.timer.running = v != 0;
                }
            }
            reg::TIMER_DIVIDE => {
                // The current count carries on at the new rate.
                let current = u64::from(self.current_count(now));
                self.timer.divide = v & 0xb;
                if self.timer.running {
                    let elapsed = (u64::from(self.timer.initial) - current) * self.timer.divisor();
                    self.timer.start_ns = now.saturating_sub(elapsed);
                }
            }
            reg::SELF_IPI if x2 => {
                return Ok(self.send_ipi(u64::from(v & 0xff) | (1 << 18)));
            }
            reg::ID
            | reg::VERSION
            | reg::PPR
            | reg::APR
            | reg::RRD
            | reg::LDR
            | reg::TIMER_CURRENT
            | 0x100..=0x270 => {
                // Read-only registers ignore writes in xAPIC mode.
                if x2 {
                    return Err(GeneralProtection);
                }
            }
            _ => {
                if !x2 {
                    self.esr_pending |= ESR_ILLEGAL_REGISTER;
                }
                return Err(GeneralProtection);
            }
        }
        Ok(None)
    }

    fn eoi(&mut self) -> Option<Event> {
        let v = highest(&self.isr)?;
        set_bit(&mut self.isr, v, false);
        bit(&self.tmr, v).then_some(Event::Eoi(v))
    }

    /// Decodes an ICR value (xAPIC: destination in bits 63:56; x2APIC:
    /// 63:32) into a message.
    fn send_ipi(&mut self, icr: u64) -> Option<Event> {
        let lo = icr as u32;
        let mode = DeliveryMode::from_bits(lo);
        let vector = lo as u8;
        let dest_field = if self.x2apic() {
            (icr >> 32) as u32
        } else {
            (icr >> 56) as u32
        };
        let dest = match (lo >> 18) & 3 {
            1 => Destination::SelfOnly,
            2 => Destination::All,
            3 => Destination::AllButSelf,
            _ if lo & (1 << 11) != 0 => Destination::Logical(dest_field),
            _ => Destination::Physical(dest_field),
        };
        let assert = lo & (1 << 14) != 0;
        let level_triggered = lo & LEVEL != 0;
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.error(ESR_SEND_ILLEGAL_VECTOR);
            return None;
        }
        if mode == DeliveryMode::Init && level_triggered && !assert {
            // INIT level de-assert: no effect on P4 and later processors.
            return None;
        }
        Some(Event::Ipi(Message {
            vector,
            mode,
            dest,
            level_triggered,
            assert,
        }))
    }

    /// xAPIC MMIO read of `data.len()` bytes at `offset` in the page.
    /// Registers are 32 bits wide at 16-byte strides; other bytes read 0.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: u64) {
        let reg = (offset & 0xff0) as u32;
        let v = self.read_register(reg, now).unwrap_or_else(|| {
            self.esr_pending |= ESR_ILLEGAL_REGISTER;
            0
        });
        let bytes = u64::from(v).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let o = (offset & 0xf) as usize + i;
            *d = if o < 4 { bytes[o] } else { 0 };
        }
    }

    /// xAPIC MMIO write at `offset`: only aligned 32-bit writes reach a
    /// register (the SDM leaves others undefined; they are dropped).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now: u64) -> Option<Event> {
        if offset & 0xf != 0 || data.len() < 4 {
            return None;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register((offset & 0xff0) as u32, v, now)
            .ok()
            .flatten()
    }

    /// x2APIC MSR read (`msr` in 0x800..=0x8FF). `Err` is #GP: not in
    /// x2APIC mode, or no such register.
    pub fn msr_read(&mut self, msr: u32, now: u64) -> Result<u64, GeneralProtection> {
        if !self.x2apic() {
            return Err(GeneralProtection);
        }
        let offset = (msr - 0x800) << 4;
        if offset == reg::ICR_LO {
            return Ok(u64::from(self.icr_hi) << 32 | u64::from(self.icr_lo));
        }
        match offset {
            reg::EOI | reg::SELF_IPI | reg::DFR | reg::ICR_HI | reg::APR | reg::RRD => {
                Err(GeneralProtection)
            }
            _ => self
                .read_register(offset, now)
                .map(u64::from)
                .ok_or(GeneralProtection),
        }
    }

    /// x2APIC MSR write. `Err` is #GP (read-only or reserved registers,
    /// reserved bits set in EOI or SELF IPI, not in x2APIC mode).
    pub fn msr_write(
        &mut self,
        msr: u32,
        v: u64,
        now: u64,
    ) -> Result<Option<Event>, GeneralProtection> {
        if !self.x2apic() {
            return Err(GeneralProtection);
        }
        let offset = (msr - 0x800) << 4;
        if offset == reg::ICR_LO {
            self.icr_lo = (v as u32) & 0x000c_cfff;
            self.icr_hi = (v >> 32) as u32;
            return Ok(self.send_ipi(v & 0xffff_ffff_000c_cfff));
        }
        if v >> 32 != 0 || (offset == reg::EOI && v != 0) {
            return Err(GeneralProtection);
        }
        self.write_register(offset, v as u32, now)
    }

    /// Checks a state from a snapshot.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.base & !(BASE_ADDR_MASK | BASE_BSP | BASE_ENABLE | BASE_EXTD) != 0 {
            return Err(format!("IA32_APIC_BASE {:#x} has reserved bits", self.base));
        }
        if self.base & (BASE_ENABLE | BASE_EXTD) == BASE_EXTD {
            return Err("x2APIC mode without the enable bit".into());
        }
        if self.timer.divide & !0xb != 0 {
            return Err("timer divide configuration out of range".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> LocalApic {
        let mut a = LocalApic::new(0);
        a.write_register(reg::SVR, 0x1ff, 0).unwrap();
        a
    }

    #[test]
    fn reset_state() {
        let mut a = LocalApic::new(0);
        assert_eq!(a.base_msr(), 0xfee0_0900);
        assert_eq!(a.mmio_base(), Some(0xfee0_0000));
        assert_eq!(a.read_register(reg::VERSION, 0), Some(0x0005_0014));
        assert_eq!(a.read_register(reg::SVR, 0), Some(0xff));
        assert_eq!(a.read_register(reg::DFR, 0), Some(0xffff_ffff));
        assert_eq!(a.read_register(reg::LVT_LINT0, 0), Some(0x700));
        assert_eq!(a.read_register(reg::LVT_TIMER, 0), Some(0x1_0000));
        assert!(a.accepts_extint());
        let ap = LocalApic::new(1);
        assert_eq!(ap.base_msr(), 0xfee0_0800);
        assert!(!ap.accepts_extint());
    }

    #[test]
    fn software_disabled_refuses_fixed_and_masks_lvt() {
        let mut a = LocalApic::new(0);
        a.accept(DeliveryMode::Fixed, 0x40, false);
        assert_eq!(a.deliverable(), None);
        a.write_register(reg::LVT_TIMER, 0x30, 0).unwrap();
        assert_eq!(a.read_register(reg::LVT_TIMER, 0), Some(0x1_0030));
        let mut a = enabled();
        a.write_register(reg::LVT_TIMER, 0x30, 0).unwrap();
        assert_eq!(a.read_register(reg::LVT_TIMER, 0), Some(0x30));
        a.write_register(reg::SVR, 0xff, 0).unwrap();
        assert_eq!(a.read_register(reg::LVT_TIMER, 0), Some(0x1_0030));
    }

    #[test]
    fn priority_classes_tpr_and_ppr() {
        let mut a = enabled();
        a.accept(DeliveryMode::Fixed, 0x51, false);
        a.accept(DeliveryMode::Fixed, 0x62, false);
        assert_eq!(a.deliverable(), Some(0x62));
        assert_eq!(a.acknowledge(), Some(0x62));
        assert_eq!(a.ppr(), 0x60);
        // 0x51's class (5) is below the in-service class (6).
        assert_eq!(a.deliverable(), None);
        // Same class as in service: held too.
        a.accept(DeliveryMode::Fixed, 0x6f, false);
        assert_eq!(a.deliverable(), None);
        assert_eq!(a.write_register(reg::EOI, 0, 0), Ok(None));
        assert_eq!(a.ppr(), 0);
        assert_eq!(a.acknowledge(), Some(0x6f));
        a.write_register(reg::EOI, 0, 0).unwrap();
        // TPR holds back classes at or below it.
        a.write_register(reg::TPR, 0x55, 0).unwrap();
        assert_eq!(a.ppr(), 0x55);
        assert_eq!(a.deliverable(), None);
        a.write_register(reg::TPR, 0x40, 0).unwrap();
        assert_eq!(a.deliverable(), Some(0x51));
    }

    #[test]
    fn level_triggered_eoi_is_broadcast() {
        let mut a = enabled();
        a.accept(DeliveryMode::Fixed, 0x31, true);
        assert_eq!(a.read_register(reg::TMR + 0x10, 0), Some(1 << 17));
        assert_eq!(a.acknowledge(), Some(0x31));
        assert_eq!(a.read_register(reg::ISR + 0x10, 0), Some(1 << 17));
        assert_eq!(a.write_register(reg::EOI, 0, 0), Ok(Some(Event::Eoi(0x31))));
        assert_eq!(a.read_register(reg::ISR + 0x10, 0), Some(0));
    }

    #[test]
    fn illegal_vectors_set_esr_after_a_write() {
        let mut a = enabled();
        a.accept(DeliveryMode::Fixed, 3, false);
        assert_eq!(a.read_register(reg::ESR, 0), Some(0));
        a.write_register(reg::ESR, 0, 0).unwrap();
        assert_eq!(
            a.read_register(reg::ESR, 0),
            Some(ESR_RECEIVE_ILLEGAL_VECTOR)
        );
        a.write_register(reg::ESR, 0, 0).unwrap();
        assert_eq!(a.read_register(reg::ESR, 0), Some(0));
        // Sending one is an error too, with an interrupt through LVT error.
        a.write_register(reg::LVT_ERROR, 0xfe, 0).unwrap();
        assert_eq!(a.write_register(reg::ICR_LO, 0x4_0005, 0), Ok(None));
        a.write_register(reg::ESR, 0, 0).unwrap();
        assert_eq!(a.read_register(reg::ESR, 0), Some(ESR_SEND_ILLEGAL_VECTOR));
        assert_eq!(a.deliverable(), Some(0xfe));
    }

    #[test]
    fn icr_messages() {
        let mut a = enabled();
        a.write_register(reg::ICR_HI, 0x0300_0000, 0).unwrap();
        let e = a.write_register(reg::ICR_LO, 0x0000_4041, 0).unwrap();
        assert_eq!(
            e,
            Some(Event::Ipi(Message {
                vector: 0x41,
                mode: DeliveryMode::Fixed,
                dest: Destination::Physical(3),
                level_triggered: false,
                assert: true,
            }))
        );
        // INIT, level assert, all but self.
        let e = a.write_register(reg::ICR_LO, 0x000c_4500, 0).unwrap();
        assert!(matches!(
            e,
            Some(Event::Ipi(Message {
                mode: DeliveryMode::Init,
                dest: Destination::AllButSelf,
                ..
            }))
        ));
        // INIT level de-assert: nothing.
        assert_eq!(a.write_register(reg::ICR_LO, 0x0000_8500, 0), Ok(None));
        // SIPI, logical.
        let e = a.write_register(reg::ICR_LO, 0x0000_0e9a, 0).unwrap();
        assert!(matches!(
            e,
            Some(Event::Ipi(Message {
                mode: DeliveryMode::StartUp,
                vector: 0x9a,
                dest: Destination::Logical(3),
                ..
            }))
        ));
    }

    #[test]
    fn logical_destinations_flat_and_cluster() {
        let mut a = enabled();
        a.write_register(reg::LDR, 0x0400_0000, 0).unwrap();
        assert!(a.matches(Destination::Logical(0x06), false, false));
        assert!(!a.matches(Destination::Logical(0x03), false, false));
        a.write_register(reg::DFR, 0x0fff_ffff, 0).unwrap();
        a.write_register(reg::LDR, 0x2100_0000, 0).unwrap();
        assert!(a.matches(Destination::Logical(0x23), false, false));
        assert!(!a.matches(Destination::Logical(0x13), false, false));
        assert!(a.matches(Destination::Physical(0xff), false, false));
        assert!(a.matches(Destination::Physical(0), false, false));
        assert!(!a.matches(Destination::Physical(1), false, false));
        assert!(!a.matches(Destination::AllButSelf, true, false));
    }

    #[test]
    fn one_shot_timer_counts_down_and_fires_once() {
        let mut a = enabled();
        a.write_register(reg::TIMER_DIVIDE, 0x3, 0).unwrap(); // ÷16
        a.write_register(reg::LVT_TIMER, 0x40, 0).unwrap();
        a.write_register(reg::TIMER_INITIAL, 1000, 100).unwrap();
        assert_eq!(
            a.read_register(reg::TIMER_CURRENT, 100 + 16 * 250),
            Some(750)
        );
        assert_eq!(a.next_timer_ns(), Some(100 + 16_000));
        assert!(!a.advance(100 + 15_999));
        assert!(a.advance(100 + 16_000));
        assert_eq!(a.deliverable(), Some(0x40));
        assert_eq!(a.read_register(reg::TIMER_CURRENT, 20_000), Some(0));
        assert_eq!(a.next_timer_ns(), None);
    }

    #[test]
    fn periodic_timer_reloads_and_divide_changes_keep_the_count() {
        let mut a = enabled();
        a.write_register(reg::TIMER_DIVIDE, 0xb, 0).unwrap(); // ÷1
        a.write_register(reg::LVT_TIMER, 0x2_0041, 0).unwrap();
        a.write_register(reg::TIMER_INITIAL, 100, 0).unwrap();
        assert!(a.advance(250));
        assert_eq!(a.next_timer_ns(), Some(300));
        assert_eq!(a.read_register(reg::TIMER_CURRENT, 250), Some(50));
        a.write_register(reg::TIMER_DIVIDE, 0x0, 250).unwrap(); // ÷2
        assert_eq!(a.read_register(reg::TIMER_CURRENT, 250), Some(50));
        assert_eq!(a.read_register(reg::TIMER_CURRENT, 270), Some(40));
        // Masked: counts, reloads, no interrupt.
        let mut b = enabled();
        b.write_register(reg::LVT_TIMER, 0x3_0041, 0).unwrap();
        b.write_register(reg::TIMER_INITIAL, 10, 0).unwrap();
        assert!(b.advance(100));
        assert_eq!(b.deliverable(), None);
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut a = enabled();
        a.write_register(reg::LVT_TIMER, 0x4_0042, 0).unwrap();
        // The initial count is ignored in this mode.
        a.write_register(reg::TIMER_INITIAL, 5, 0).unwrap();
        assert_eq!(a.next_timer_ns(), None);
        a.set_tsc_deadline(1000, 10);
        assert_eq!(a.tsc_deadline(), 1000);
        assert!(a.advance(1000));
        assert_eq!(a.tsc_deadline(), 0);
        assert_eq!(a.deliverable(), Some(0x42));
        // Leaving the mode disarms.
        a.set_tsc_deadline(5000, 1000);
        a.write_register(reg::LVT_TIMER, 0x42, 1000).unwrap();
        assert_eq!(a.next_timer_ns(), None);
        // Outside the mode, writes are ignored.
        a.set_tsc_deadline(9000, 1000);
        assert_eq!(a.tsc_deadline(), 0);
    }

    #[test]
    fn base_msr_transitions() {
        let mut a = LocalApic::new(0);
        assert_eq!(a.write_base_msr(0xfee0_0d00), Ok(()));
        assert!(a.x2apic());
        assert_eq!(a.mmio_base(), None);
        assert_eq!(a.msr_read(0x802, 0), Ok(0));
        assert_eq!(a.msr_read(0x80d, 0), Ok(1));
        // x2APIC → xAPIC directly: #GP.
        assert_eq!(a.write_base_msr(0xfee0_0900), Err(GeneralProtection));
        assert_eq!(a.write_base_msr(0xfee0_0100), Ok(()));
        assert!(!a.enabled());
        assert!(a.accepts_extint());
        // Disabled → x2APIC directly: #GP; relocation works.
        assert_eq!(a.write_base_msr(0xfee0_0d00), Err(GeneralProtection));
        assert_eq!(a.write_base_msr(0x8000_0900), Ok(()));
        assert_eq!(a.mmio_base(), Some(0x8000_0000));
        // Reserved bits: #GP.
        assert_eq!(a.write_base_msr(0xfee0_0901), Err(GeneralProtection));
    }

    #[test]
    fn x2apic_msrs() {
        let mut a = enabled();
        a.write_base_msr(0xfee0_0d00).unwrap();
        assert_eq!(a.msr_write(0x808, 0x20, 0), Ok(None));
        assert_eq!(a.msr_read(0x808, 0), Ok(0x20));
        // EOI with a non-zero value and reads of EOI are #GP.
        assert_eq!(a.msr_write(0x80b, 1, 0), Err(GeneralProtection));
        assert_eq!(a.msr_read(0x80b, 0), Err(GeneralProtection));
        // SELF IPI.
        let e = a.msr_write(0x83f, 0x55, 0).unwrap();
        assert!(matches!(
            e,
            Some(Event::Ipi(Message {
                vector: 0x55,
                dest: Destination::SelfOnly,
                ..
            }))
        ));
        // A 64-bit ICR with a 32-bit destination.
        let e = a.msr_write(0x830, 0x0000_0007_0000_0031, 0).unwrap();
        assert!(matches!(
            e,
            Some(Event::Ipi(Message {
                vector: 0x31,
                dest: Destination::Physical(7),
                ..
            }))
        ));
        assert_eq!(a.msr_read(0x830, 0), Ok(0x0000_0007_0000_0031));
        // The ID is read-only.
        assert_eq!(a.msr_write(0x802, 5, 0), Err(GeneralProtection));
    }

    #[test]
    fn mmio_access_widths() {
        let mut a = enabled();
        let mut b = [0u8; 4];
        a.mmio_read(0x30, &mut b, 0);
        assert_eq!(u32::from_le_bytes(b), VERSION);
        let mut one = [0u8; 1];
        a.mmio_read(0x32, &mut one, 0);
        assert_eq!(one[0], 5);
        // A byte write does not reach the register.
        a.mmio_write(0x80, &[0x30], 0);
        assert_eq!(a.read_register(reg::TPR, 0), Some(0));
        a.mmio_write(0x80, &0x30u32.to_le_bytes(), 0);
        assert_eq!(a.read_register(reg::TPR, 0), Some(0x30));
    }
}
