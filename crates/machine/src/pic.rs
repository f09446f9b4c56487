//! The 8259A programmable interrupt controller pair.
//!
//! Master at ports 0x20/0x21, slave at 0xa0/0xa1 cascaded on the master's
//! IRQ 2; the edge/level control registers (ELCR) at 0x4d0/0x4d1. The model
//! follows QEMU's `i8259.c`: ICW1–ICW4 initialisation, OCW1 mask, OCW2 EOI
//! (non-specific, specific, rotations), OCW3 (IRR/ISR read select, poll,
//! special mask), auto-EOI, special fully nested mode, rotating priority,
//! spurious IRQ 7 / IRQ 15.
//!
//! Edge mode latches a rising edge into IRR, which stays set until the
//! interrupt is acknowledged (real silicon forgets a request that drops
//! before INTA and delivers IRQ 7 instead; like QEMU we keep it). Level
//! mode (selected per line through the ELCR) tracks the line.
//!
//! The CPU's INTR input is [`Pic::interrupt_pending`], recomputed after
//! every change so that reading it is a single load.

/// Master PIC command port.
pub const MASTER_CMD: u16 = 0x20;
/// Slave PIC command port.
pub const SLAVE_CMD: u16 = 0xa0;
/// ELCR ports 0x4d0 (master) and 0x4d1 (slave).
pub const ELCR: u16 = 0x4d0;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Chip {
    /// Line levels as last seen (edge detection).
    last_irr: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    priority_add: u8,
    irq_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init_state: u8,
    init4: bool,
    single_mode: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    elcr: u8,
    elcr_mask: u8,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Chip {
            elcr_mask,
            ..Default::default()
        }
    }

    fn reset(&mut self) {
        let (elcr, elcr_mask) = (self.elcr, self.elcr_mask);
        *self = Chip {
            elcr,
            elcr_mask,
            // Level-triggered requests survive a re-init.
            irr: self.irr & elcr,
            ..Default::default()
        };
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`, 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The IRQ this chip would deliver now, if any.
    fn get_irq(&self, is_master: bool) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && is_master {
            // A slave in service does not block higher slave requests.
            in_service &= !(1 << 2);
        }
        let cur = self.priority(in_service);
        (p < cur).then_some((p + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    /// Handles a write to the command (`a0 == false`) or data port.
    fn write(&mut self, a0: bool, val: u8) {
        if !a0 {
            if val & 0x10 != 0 {
                // ICW1
                self.reset();
                self.init_state = 1;
                self.init4 = val & 1 != 0;
                self.single_mode = val & 2 != 0;
                if val & 0x08 != 0 {
                    tracing::debug!("pic: ICW1 level-triggered mode ignored (use ELCR)");
                }
            } else if val & 0x08 != 0 {
                // OCW3
                if val & 0x04 != 0 {
                    self.poll = true;
                }
                if val & 0x02 != 0 {
                    self.read_isr = val & 1 != 0;
                }
                if val & 0x40 != 0 {
                    self.special_mask = val & 0x20 != 0;
                }
            } else {
                // OCW2
                let cmd = val >> 5;
                match cmd {
                    0 | 4 => self.rotate_on_auto_eoi = cmd == 4,
                    1 | 5 => {
                        let p = self.priority(self.isr);
                        if p != 8 {
                            let irq = (p + self.priority_add) & 7;
                            self.isr &= !(1 << irq);
                            if cmd == 5 {
                                self.priority_add = (irq + 1) & 7;
                            }
                        }
                    }
                    3 => self.isr &= !(1 << (val & 7)),
                    6 => self.priority_add = (val + 1) & 7,
                    7 => {
                        let irq = val & 7;
                        self.isr &= !(1 << irq);
                        self.priority_add = (irq + 1) & 7;
                    }
                    _ => {} // 2: no operation
                }
            }
        } else {
            match self.init_state {
                0 => self.imr = val, // OCW1
                1 => {
                    // ICW2
                    self.irq_base = val & 0xf8;
                    self.init_state = match (self.single_mode, self.init4) {
                        (true, true) => 3,
                        (true, false) => 0,
                        (false, _) => 2,
                    };
                }
                2 => self.init_state = if self.init4 { 3 } else { 0 }, // ICW3
                _ => {
                    // ICW4
                    self.special_fully_nested = val & 0x10 != 0;
                    self.auto_eoi = val & 0x02 != 0;
                    self.init_state = 0;
                }
            }
        }
    }
}

/// The cascaded 8259A pair. Its saved state is itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pic {
    chips: [Chip; 2],
    intr: bool,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A PIC pair as after power-on: all lines unmasked, vector base 0,
    /// waiting for the guest's ICW sequence.
    pub fn new() -> Self {
        Pic {
            // IRQ 0, 1, 2 (master) and 8, 13 (slave) cannot be level-triggered.
            chips: [Chip::new(0xf8), Chip::new(0xde)],
            intr: false,
        }
    }

    /// Sets the level of ISA interrupt line `line` (0–15). Lines above 15
    /// are ignored.
    pub fn set_irq(&mut self, line: u8, level: bool) {
        if line >= 16 {
            return;
        }
        self.chips[usize::from(line >> 3)].set_irq(line & 7, level);
        self.update();
    }

    /// Raises and lowers `line`: one edge-triggered interrupt request.
    pub fn pulse_irq(&mut self, line: u8) {
        self.set_irq(line, true);
        self.set_irq(line, false);
    }

    /// The INTR output of the master: an interrupt awaits acknowledgement.
    #[inline]
    pub fn interrupt_pending(&self) -> bool {
        self.intr
    }

    fn update(&mut self) {
        let slave = self.chips[1].get_irq(false).is_some();
        self.chips[0].set_irq(2, slave);
        self.intr = self.chips[0].get_irq(true).is_some();
    }

    /// The INTA cycle: returns the vector to deliver and moves the request
    /// from IRR to ISR (unless auto-EOI). With nothing deliverable it
    /// returns the spurious vector (IRQ 7 of the master, or IRQ 15 when the
    /// cascade line had nothing behind it).
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.chips[0].get_irq(true) {
            Some(2) => {
                let irq2 = match self.chips[1].get_irq(false) {
                    Some(i) => {
                        self.chips[1].intack(i);
                        i
                    }
                    None => 7,
                };
                self.chips[0].intack(2);
                self.chips[1].irq_base.wrapping_add(irq2)
            }
            Some(irq) => {
                self.chips[0].intack(irq);
                self.chips[0].irq_base.wrapping_add(irq)
            }
            None => self.chips[0].irq_base.wrapping_add(7),
        };
        self.update();
        vector
    }

    fn poll_read(&mut self, chip: usize) -> u8 {
        let v = match self.chips[chip].get_irq(chip == 0) {
            Some(irq) => {
                self.chips[chip].intack(irq);
                if chip == 1 {
                    // The slave's request reached the master through IRQ 2.
                    self.chips[0].intack(2);
                }
                irq | 0x80
            }
            None => 0,
        };
        self.chips[chip].poll = false;
        self.update();
        v
    }

    /// Reads PIC port `port` (0x20/0x21, 0xa0/0xa1, 0x4d0/0x4d1).
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x4d0 | 0x4d1 => self.chips[usize::from(port & 1)].elcr,
            _ => {
                let chip = usize::from(port >= 0xa0);
                let c = &self.chips[chip];
                if c.poll {
                    self.poll_read(chip)
                } else if port & 1 == 0 {
                    if c.read_isr {
                        c.isr
                    } else {
                        c.irr
                    }
                } else {
                    c.imr
                }
            }
        }
    }

    /// Writes PIC port `port`.
    pub fn write_port(&mut self, port: u16, val: u8) {
        match port {
            0x4d0 | 0x4d1 => {
                let c = &mut self.chips[usize::from(port & 1)];
                c.elcr = val & c.elcr_mask;
            }
            _ => {
                let chip = usize::from(port >= 0xa0);
                self.chips[chip].write(port & 1 != 0, val);
            }
        }
        self.update();
    }

    /// Interrupt request register of the master (`chip == 0`) or slave.
    pub fn irr(&self, chip: usize) -> u8 {
        self.chips[chip & 1].irr
    }

    /// In-service register of the master (`chip == 0`) or slave.
    pub fn isr(&self, chip: usize) -> u8 {
        self.chips[chip & 1].isr
    }

    /// Mask register of the master (`chip == 0`) or slave.
    pub fn imr(&self, chip: usize) -> u8 {
        self.chips[chip & 1].imr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The usual BIOS/Linux programming: master at 0x20, slave at 0x28.
    fn init(pic: &mut Pic, auto_eoi: bool) {
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        for (cmd, base, icw3) in [(0x20, 0x20, 0x04), (0xa0, 0x28, 0x02)] {
            pic.write_port(cmd, 0x11);
            pic.write_port(cmd + 1, base);
            pic.write_port(cmd + 1, icw3);
            pic.write_port(cmd + 1, icw4);
        }
        pic.write_port(0x21, 0);
        pic.write_port(0xa1, 0);
    }

    #[test]
    fn init_and_acknowledge_master_irq() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        assert!(!pic.interrupt_pending());
        pic.set_irq(4, true);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.read_port(0x20), 0x10); // IRR
        assert_eq!(pic.acknowledge(), 0x24);
        assert!(!pic.interrupt_pending());
        pic.write_port(0x20, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read_port(0x20), 0x10);
        pic.write_port(0x20, 0x20); // non-specific EOI
        assert_eq!(pic.read_port(0x20), 0);
        // Level still high: no new edge, no new interrupt.
        assert!(!pic.interrupt_pending());
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert!(pic.interrupt_pending());
    }

    #[test]
    fn mask_blocks_and_unmask_delivers() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.write_port(0x21, 0x01);
        pic.pulse_irq(0);
        assert!(!pic.interrupt_pending());
        assert_eq!(pic.read_port(0x21), 0x01);
        pic.write_port(0x21, 0x00);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), 0x20);
    }

    #[test]
    fn priority_and_nesting() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.pulse_irq(3);
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), 0x21);
        // IRQ 3 is lower priority than IRQ 1 in service: held back.
        assert!(!pic.interrupt_pending());
        // IRQ 0 is higher: nests.
        pic.pulse_irq(0);
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), 0x20);
        pic.write_port(0x20, 0x60); // specific EOI IRQ 0
        assert!(!pic.interrupt_pending());
        pic.write_port(0x20, 0x20); // non-specific: clears IRQ 1
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), 0x23);
    }

    #[test]
    fn slave_cascade_and_eoi() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.pulse_irq(8 + 4); // IRQ 12
        assert!(pic.interrupt_pending());
        assert_eq!(pic.acknowledge(), 0x2c);
        assert_eq!(pic.isr(0), 0x04);
        assert_eq!(pic.isr(1), 0x10);
        pic.write_port(0xa0, 0x20);
        pic.write_port(0x20, 0x20);
        assert_eq!(pic.isr(0), 0);
        assert_eq!(pic.isr(1), 0);
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = Pic::new();
        init(&mut pic, true);
        pic.pulse_irq(5);
        assert_eq!(pic.acknowledge(), 0x25);
        assert_eq!(pic.isr(0), 0);
        pic.pulse_irq(6);
        assert!(pic.interrupt_pending());
    }

    #[test]
    fn spurious_vectors() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        assert_eq!(pic.acknowledge(), 0x27);
        assert_eq!(pic.isr(0), 0);
    }

    #[test]
    fn poll_mode_and_elcr_harmless() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.pulse_irq(3);
        pic.write_port(0x20, 0x0c); // OCW3 poll
        assert_eq!(pic.read_port(0x20), 0x83);
        assert_eq!(pic.isr(0), 0x08);
        pic.write_port(0x4d0, 0xff);
        assert_eq!(pic.read_port(0x4d0), 0xf8);
        pic.write_port(0x4d1, 0xff);
        assert_eq!(pic.read_port(0x4d1), 0xde);
    }

    #[test]
    fn level_triggered_line_follows_level() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.write_port(0x20, 0x20); // clear ISR of IRQ 3 from nothing: no-op
        pic.write_port(0x4d1, 0x02); // IRQ 9 level
        pic.set_irq(9, true);
        assert_eq!(pic.acknowledge(), 0x29);
        pic.write_port(0xa0, 0x20);
        pic.write_port(0x20, 0x20);
        // Still asserted: delivered again.
        assert!(pic.interrupt_pending());
        // Dropped before INTA: the master's latched cascade request turns
        // into the slave's spurious IRQ 15, as on the real pair.
        pic.set_irq(9, false);
        assert_eq!(pic.acknowledge(), 0x2f);
        assert_eq!(pic.isr(1), 0);
        pic.write_port(0x20, 0x20);
        assert!(!pic.interrupt_pending());
    }

    #[test]
    fn out_of_range_line_ignored() {
        let mut pic = Pic::new();
        pic.set_irq(200, true);
        assert!(!pic.interrupt_pending());
    }
}

impl Pic {
    /// Checks a saved state's invariants (see [`crate::persist`]).
    pub(crate) fn check(&self) -> Result<(), String> {
        for c in &self.chips {
            if c.priority_add > 7 || c.init_state > 3 {
                return Err("ICW sequence or rotation state out of range".into());
            }
        }
        Ok(())
    }
}
