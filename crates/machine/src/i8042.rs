//! A minimal i8042 keyboard controller at ports 0x60 (data) and 0x64
//! (status / command), with no keyboard or mouse behind it.
//!
//! It exists for the reset line: command 0xFE (pulse output line 0), or
//! writing the output port (command 0xD1) with bit 0 clear, resets the
//! machine, which popek reports as [`StopReason::Reset`]. It also answers
//! the controller commands a driver probes with (read/write command byte,
//! self tests, enable/disable ports, output port read) and acknowledges
//! keyboard commands like an idle keyboard would, so that a probing driver
//! finds a sane controller rather than a floating bus. Responses raise
//! IRQ 1 (level while the output buffer is full and the command byte
//! enables the keyboard interrupt). The FADT tells Linux there is no 8042,
//! so Linux does not probe it but still uses 0x64/0xFE to reboot.

use std::collections::VecDeque;

use crate::StopReason;

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const COMMAND_PORT: u16 = 0x64;
/// The keyboard interrupt line.
pub const KBD_IRQ: u8 = 1;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

/// Command byte: keyboard interrupt enable.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;

/// The controller. Its saved state is itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042 {
    ctr: u8,
    out: VecDeque<u8>,
    last: u8,
    pending: Option<u8>,
    last_was_cmd: bool,
}

impl Default for I8042 {
    fn default() -> Self {
        Self::new()
    }
}

impl I8042 {
    /// A controller as a BIOS leaves it: keyboard interrupt on, system flag
    /// set, translation on.
    pub fn new() -> Self {
        I8042 {
            ctr: CTR_KBD_INT | CTR_SYS | 0x40,
            out: VecDeque::new(),
            last: 0,
            pending: None,
            last_was_cmd: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        // A real controller holds one byte; a short queue keeps multi-byte
        // replies (reset, identify) in order. Bounded so a guest cannot grow it.
        for &b in bytes {
            if self.out.len() < 16 {
                self.out.push_back(b);
            }
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard: the scan codes
    /// (set 1, as the controller's translation delivers them) enter the
    /// output buffer, as Firecracker's `SendCtrlAltDel` does.
    pub fn ctrl_alt_del(&mut self) {
        self.push(&[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
    }

    /// Reads the status register (port 0x64).
    pub fn read_status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.out.is_empty() {
            s |= STATUS_OBF;
        }
        if self.ctr & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_was_cmd {
            s |= STATUS_CMD;
        }
        s
    }

    /// Reads the output buffer (port 0x60); an empty buffer returns the
    /// last byte again.
    pub fn read_data(&mut self) -> u8 {
        if let Some(b) = self.out.pop_front() {
            self.last = b;
        }
        self.last
    }

    /// Writes a controller command (port 0x64).
    pub fn write_command(&mut self, cmd: u8) -> Option<StopReason> {
        self.last_was_cmd = true;
        match cmd {
            0x20 => self.push(&[self.ctr]),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(cmd),
            0xa7 => self.ctr |= 0x20,
            0xa8 => self.ctr &= !0x20,
            0xa9 | 0xab => self.push(&[0x00]), // port tests pass
            0xaa => self.push(&[0x55]),        // self test passes
            0xad => self.ctr |= 0x10,
            0xae => self.ctr &= !0x10,
            0xd0 => self.push(&[0x03]), // output port: A20 on, not in reset
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    return Some(StopReason::Reset);
                }
            }
            _ => tracing::debug!("i8042: ignored command {cmd:#04x}"),
        }
        None
    }

    /// Writes the data port (port 0x60): a command's parameter, or a byte
    /// for the (absent but polite) keyboard.
    pub fn write_data(&mut self, val: u8) -> Option<StopReason> {
        self.last_was_cmd = false;
        match self.pending.take() {
            Some(0x60) => self.ctr = val,
            Some(0xd1) => {
                if val & 1 == 0 {
                    return Some(StopReason::Reset);
                }
            }
            Some(0xd2) => self.push(&[val]),
            Some(0xd3) | Some(0xd4) => {} // no mouse
            _ => match val {
                0xff => self.push(&[0xfa, 0xaa]),       // reset, BAT passed
                0xf2 => self.push(&[0xfa, 0xab, 0x83]), // identify: MF2
                0xee => self.push(&[0xee]),             // echo
                _ => self.push(&[0xfa]),                // ACK
            },
        }
        None
    }

    /// Level of IRQ 1.
    pub fn irq_level(&self) -> bool {
        !self.out.is_empty() && self.ctr & CTR_KBD_INT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_stops_the_machine() {
        let mut k = I8042::new();
        assert_eq!(k.read_status() & 0x02, 0); // input buffer empty
        assert_eq!(k.write_command(0xfe), Some(StopReason::Reset));
        assert_eq!(k.write_command(0xff), None);
    }

    #[test]
    fn output_port_reset() {
        let mut k = I8042::new();
        assert_eq!(k.write_command(0xd1), None);
        assert_eq!(k.write_data(0x03), None); // A20 on, no reset
        assert_eq!(k.write_command(0xd1), None);
        assert_eq!(k.write_data(0x02), Some(StopReason::Reset));
    }

    #[test]
    fn probe_sequence() {
        let mut k = I8042::new();
        assert_eq!(k.read_status() & STATUS_OBF, 0);
        k.write_command(0xaa);
        assert_eq!(k.read_status() & STATUS_OBF, STATUS_OBF);
        assert!(k.irq_level());
        assert_eq!(k.read_data(), 0x55);
        assert!(!k.irq_level());
        k.write_command(0x60);
        k.write_data(0x00);
        k.write_command(0x20);
        assert_eq!(k.read_data(), 0x00);
        k.write_data(0xff);
        assert!(!k.irq_level()); // interrupts now disabled
        assert_eq!(k.read_data(), 0xfa);
        assert_eq!(k.read_data(), 0xaa);
        assert_eq!(k.read_status() & STATUS_OBF, 0);
    }
}

impl I8042 {
    /// Checks a saved state's invariants (see [`crate::persist`]).
    pub(crate) fn check(&self) -> Result<(), String> {
        // The controller never queues more than a reply or two.
        if self.out.len() > 16 {
            return Err("output queue too long".into());
        }
        Ok(())
    }
}
