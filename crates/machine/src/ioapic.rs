//! The I/O APIC (an 82093AA as the ICH integrates it): 24 interrupt pins,
//! each with a 64-bit redirection entry, at [`BASE`].
//!
//! Two registers are visible in the MMIO page: IOREGSEL at offset 0 and
//! IOWIN at offset 0x10. Through them: the ID (index 0), the version
//! (index 1: version 0x20, 24 entries), the arbitration ID (index 2) and
//! the redirection table (index 0x10 + 2·pin, low then high half).
//!
//! An edge-triggered pin sends its message on a rising edge; a
//! level-triggered pin sends it while the line is asserted and sets its
//! remote IRR, which the local APIC's EOI broadcast for the entry's vector
//! clears (the line, if still asserted, then sends again). A masked pin
//! sends nothing; a level-triggered line still asserted when it is
//! unmasked sends then. Messages leave as [`lapic::Message`]s for the
//! machine to route.

use serde::{Deserialize, Serialize};

use crate::lapic::{DeliveryMode, Destination, Message};

/// Guest-physical address of the register page.
pub const BASE: u64 = 0xfec0_0000;
/// Size of the register window.
pub const LEN: u64 = 0x1000;
/// Number of pins.
pub const PINS: usize = 24;
/// The version register: version 0x20, max redirection entry 23.
pub const VERSION: u32 = 0x0017_0020;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const DELIVERY_STATUS: u64 = 1 << 12;
/// Writable bits of a redirection entry: vector, delivery mode,
/// destination mode, polarity, trigger mode, mask, destination.
const WRITABLE: u64 = 0xff00_0000_0001_afff;

/// The I/O APIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApic {
    id: u32,
    select: u32,
    redirect: Vec<u64>,
    /// Pin levels as driven by the devices (after polarity: true means
    /// asserted).
    levels: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// After reset: every pin masked, ID 0.
    pub fn new() -> Self {
        IoApic {
            id: 0,
            select: 0,
            redirect: vec![MASKED; PINS],
            levels: 0,
        }
    }

    fn message(&self, pin: usize) -> Message {
        let e = self.redirect[pin];
        let dest = (e >> 56) as u32;
        Message {
            vector: e as u8,
            mode: DeliveryMode::from_bits(e as u32),
            dest: if e & (1 << 11) != 0 {
                Destination::Logical(dest)
            } else {
                Destination::Physical(dest)
            },
            level_triggered: e & LEVEL != 0,
            assert: true,
        }
    }

    /// Sends pin's message if it should go now: unmasked, asserted, and
    /// (level) no EOI outstanding.
    fn service(&mut self, pin: usize, out: &mut Vec<Message>) {
        let e = self.redirect[pin];
        if e & MASKED != 0 || self.levels & (1 << pin) == 0 {
            return;
        }
        if e & LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return;
            }
            self.redirect[pin] |= REMOTE_IRR;
        }
        out.push(self.message(pin));
    }

    /// A device drives `pin` to `level` (true: asserted, whatever the
    /// entry's polarity, as the devices' lines are active-high at the
    /// pin). Messages to deliver are appended to `out`.
    pub fn set_irq(&mut self, pin: usize, level: bool, out: &mut Vec<Message>) {
        if pin >= PINS {
            return;
        }
        let was = self.levels & (1 << pin) != 0;
        if level {
            self.levels |= 1 << pin;
        } else {
            self.levels &= !(1 << pin);
        }
        let level_triggered = self.redirect[pin] & LEVEL != 0;
        if level && (level_triggered || !was) {
            self.service(pin, out);
        }
    }

    /// An edge on `pin` (a pulse: asserted and released).
    pub fn pulse_irq(&mut self, pin: usize, out: &mut Vec<Message>) {
        if pin >= PINS {
            return;
        }
        let was = self.levels & (1 << pin) != 0;
        if !was {
            self.set_irq(pin, true, out);
            self.set_irq(pin, false, out);
        }
    }

    /// The local APICs' EOI broadcast for `vector`: clears the remote IRR
    /// of level-triggered entries with that vector; a line still asserted
    /// sends again.
    pub fn eoi(&mut self, vector: u8, out: &mut Vec<Message>) {
        for pin in 0..PINS {
            let e = self.redirect[pin];
            if e & REMOTE_IRR != 0 && e as u8 == vector {
                self.redirect[pin] &= !REMOTE_IRR;
                self.service(pin, out);
            }
        }
    }

    fn read_indirect(&self) -> u32 {
        match self.select {
            0 => self.id << 24,
            1 => VERSION,
            2 => self.id << 24,
            i @ 0x10..=0x3f => {
                let pin = ((i - 0x10) / 2) as usize;
                let e = self.redirect[pin];
                if i & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_indirect(&mut self, v: u32, out: &mut Vec<Message>) {
        match self.select {
            0 => self.id = (v >> 24) & 0xf,
            i @ 0x10..=0x3f => {
                let pin = ((i - 0x10) / 2) as usize;
                let old = self.redirect[pin];
                let new = if i & 1 == 0 {
                    (old & !0xffff_ffff) | u64::from(v)
                } else {
                    (old & 0xffff_ffff) | (u64::from(v) << 32)
                };
                let mut e = (new & WRITABLE) | (old & (REMOTE_IRR | DELIVERY_STATUS));
                if e & LEVEL == 0 {
                    // Remote IRR is meaningless for edge-triggered pins.
                    e &= !REMOTE_IRR;
                }
                self.redirect[pin] = e;
                if old & MASKED != 0 && e & MASKED == 0 && e & LEVEL != 0 {
                    self.service(pin, out);
                }
            }
            _ => {}
        }
    }

    /// MMIO read of the window.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset & !3 {
            0x00 => self.select,
            0x10 => self.read_indirect(),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let o = (offset & 3) as usize + i;
            *d = if o < 4 { bytes[o] } else { 0 };
        }
    }

    /// MMIO write of the window. Messages to deliver are appended to
    /// `out`.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], out: &mut Vec<Message>) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x00 => self.select = v & 0xff,
            0x10 if n == 4 => self.write_indirect(v, out),
            _ => {}
        }
    }

    /// Checks a state from a snapshot.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.redirect.len() != PINS {
            return Err(format!(
                "{} redirection entries, not {PINS}",
                self.redirect.len()
            ));
        }
        if self.levels >> PINS != 0 {
            return Err("line levels beyond the pins".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(io: &mut IoApic, index: u32, v: u32, out: &mut Vec<Message>) {
        io.mmio_write(0, &index.to_le_bytes(), out);
        io.mmio_write(0x10, &v.to_le_bytes(), out);
    }

    fn read(io: &mut IoApic, index: u32) -> u32 {
        let mut out = Vec::new();
        io.mmio_write(0, &index.to_le_bytes(), &mut out);
        let mut b = [0u8; 4];
        io.mmio_read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers_after_reset() {
        let mut io = IoApic::new();
        assert_eq!(read(&mut io, 1), 0x0017_0020);
        assert_eq!(read(&mut io, 0x10), 0x1_0000);
        assert_eq!(read(&mut io, 0x10 + 2 * 23), 0x1_0000);
        let mut out = Vec::new();
        write(&mut io, 0, 0x0a00_0000, &mut out);
        assert_eq!(read(&mut io, 0), 0x0a00_0000);
    }

    #[test]
    fn edge_pins_send_on_rising_edges_when_unmasked() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        io.pulse_irq(2, &mut out);
        assert!(out.is_empty(), "masked");
        write(&mut io, 0x10 + 4, 0x30, &mut out);
        write(&mut io, 0x10 + 5, 0x0100_0000, &mut out);
        io.pulse_irq(2, &mut out);
        assert_eq!(
            out,
            vec![Message {
                vector: 0x30,
                mode: DeliveryMode::Fixed,
                dest: Destination::Physical(1),
                level_triggered: false,
                assert: true
            }]
        );
        out.clear();
        io.set_irq(2, true, &mut out);
        io.set_irq(2, true, &mut out);
        assert_eq!(out.len(), 1, "one edge, one message");
    }

    #[test]
    fn level_pins_wait_for_the_eoi() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        // Pin 9, vector 0x39, level, logical destination 1.
        write(&mut io, 0x10 + 18, 0x39 | (1 << 15) | (1 << 11), &mut out);
        write(&mut io, 0x10 + 19, 0x0100_0000, &mut out);
        io.set_irq(9, true, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0].dest, Destination::Logical(1)));
        assert_ne!(read(&mut io, 0x10 + 18) & (1 << 14), 0, "remote IRR");
        io.set_irq(9, true, &mut out);
        assert_eq!(out.len(), 1, "held until the EOI");
        io.eoi(0x39, &mut out);
        assert_eq!(out.len(), 2, "still asserted: sent again");
        io.set_irq(9, false, &mut out);
        io.eoi(0x39, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(read(&mut io, 0x10 + 18) & (1 << 14), 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_sends() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        io.set_irq(4, true, &mut out);
        write(&mut io, 0x10 + 8, 0x34 | (1 << 15) | (1 << 16), &mut out);
        assert!(out.is_empty());
        write(&mut io, 0x10 + 8, 0x34 | (1 << 15), &mut out);
        assert_eq!(out.len(), 1);
    }
}
