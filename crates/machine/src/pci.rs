//! PCI configuration space through configuration mechanism #1 (ports
//! 0xCF8/0xCFC), with a host bridge at 00:00.0 — the first piece of the
//! modern PC (`docs/machine.md`).
//!
//! The 32-bit register at 0xCF8 selects bus, device, function and a
//! dword of configuration space (bit 31 enables); 0xCFC–0xCFF read and
//! write that dword's bytes, in any access size. A function that does not
//! exist reads all ones, as on a PC, and ignores writes. Byte port 0xCF9,
//! inside the address register's range, is the PC's reset control
//! register: writing it with bit 2 (reset CPU) set resets the machine
//! (Linux's `reboot=pci`).
//!
//! The same configuration space is memory-mapped (PCI Express's ECAM,
//! "MMCONFIG") at [`memmap::ECAM_START`](crate::memmap::ECAM_START): 4 KiB
//! per function at bus·1 MiB + device·32 KiB + function·4 KiB; the ACPI
//! MCFG table says where. Conventional functions' extended space
//! (0x100–0xFFF) reads 0 (no extended capabilities).
//!
//! The host bridge presents itself as Intel's 82441FX (440FX), the bridge
//! of the PC QEMU and most firmware know: vendor 8086h, device 1237h,
//! class 06 00 00. It has no BARs; its command register and its
//! device-specific registers (40h–FFh: PAM, SMRAM, …) hold what is
//! written, the rest is read-only.

use serde::{Deserialize, Serialize};

use crate::pci_function::ConfigSpace;
use crate::StopReason;

/// The configuration address register (dword) and, at +1, the reset
/// control register (byte).
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The configuration data window (0xCFC–0xCFF).
pub const CONFIG_DATA: u16 = 0xcfc;

const ENABLE: u32 = 1 << 31;

/// Size of a function's configuration space.
const CONFIG_SIZE: usize = 256;

/// The host bridge's identity.
const VENDOR_INTEL: u16 = 0x8086;
const DEVICE_82441FX: u16 = 0x1237;
const CLASS_HOST_BRIDGE: [u8; 3] = [0x06, 0x00, 0x00]; // class, subclass, prog-if

/// Reset control register: bit 2 resets the CPU (bit 1 chooses a hard
/// reset; popek stops at any reset).
const RCR_RESET_CPU: u8 = 0x04;

/// The host bridge's configuration space: no BARs; its command register
/// takes memory space, bus master, parity error response and SERR#, its
/// device-specific registers (40h–FFh) hold what is written.
fn host_bridge() -> ConfigSpace {
    let mut c = ConfigSpace::new(VENDOR_INTEL, DEVICE_82441FX, CLASS_HOST_BRIDGE, 0x02);
    c.set_command_mask(0x0146);
    // No interrupt line; PAM, SMRAM and the rest of 40h–FFh hold values.
    c.set_write_mask(0x3c..=0x3c, 0);
    c.set_write_mask(0x40..=0xff, 0xff);
    c
}

/// The PCI configuration mechanism and the functions behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pci {
    address: u32,
    reset_control: u8,
    bridge: ConfigSpace,
}

impl Default for Pci {
    fn default() -> Self {
        Self::new()
    }
}

impl Pci {
    /// The mechanism after reset, with the host bridge at 00:00.0.
    pub fn new() -> Self {
        Pci {
            address: 0,
            reset_control: 0,
            bridge: host_bridge(),
        }
    }

    /// The function on bus 0 the address register selects — device,
    /// function and dword offset — or `None` while it is disabled or
    /// selects another bus (none exists).
    pub fn target(&self) -> Option<(u8, u8, usize)> {
        if self.address & ENABLE == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        let dev = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        Some((dev, func, (self.address & 0xfc) as usize))
    }

    /// The function on bus 0 at ECAM offset `offset`: device, function and
    /// register offset in its 4 KiB.
    pub fn ecam_target(offset: u64) -> Option<(u8, u8, usize)> {
        let bus = (offset >> 20) & 0xff;
        let dev = ((offset >> 15) & 0x1f) as u8;
        let func = ((offset >> 12) & 0x7) as u8;
        (bus == 0).then_some((dev, func, (offset & 0xfff) as usize))
    }

    /// The configuration space of the function the address register
    /// selects, and the dword offset; `None` when it is disabled or no
    /// function is there.
    fn selected(&mut self) -> Option<(&mut ConfigSpace, usize)> {
        match self.target() {
            Some((0, 0, reg)) => Some((&mut self.bridge, reg)),
            _ => None,
        }
    }

    /// The function at ECAM offset `offset` and the register offset in its
    /// 4 KiB; `None` when no function is there.
    fn ecam(&mut self, offset: u64) -> Option<(&mut ConfigSpace, usize)> {
        match Self::ecam_target(offset) {
            Some((0, 0, reg)) => Some((&mut self.bridge, reg)),
            _ => None,
        }
    }

    /// A read of the ECAM window at `offset` (from its start).
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        match self.ecam(offset) {
            // Extended space (0x100–0xFFF) of a conventional function: 0.
            Some((_, reg)) if reg >= CONFIG_SIZE => data.fill(0),
            Some((f, reg)) => f.read(reg, data),
            None => data.fill(0xff),
        }
    }

    /// A write to the ECAM window at `offset`.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((f, reg)) = self.ecam(offset) {
            f.write(reg, data);
        }
    }

    /// Reads from the address register's ports (`offset` 0–3 from 0xCF8).
    pub fn read_address(&self, offset: u16, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if offset == 1 && data.len() == 1 {
            data[0] = self.reset_control;
        } else {
            data.fill(0xff);
        }
    }

    /// Writes to the address register's ports: a dword at 0xCF8 selects,
    /// a byte at 0xCF9 is the reset control register.
    pub fn write_address(&mut self, offset: u16, data: &[u8]) -> Option<StopReason> {
        if offset == 0 && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & !0x7f00_0003;
        } else if offset == 1 && data.len() == 1 {
            self.reset_control = data[0] & 0x0e;
            if data[0] & RCR_RESET_CPU != 0 {
                return Some(StopReason::Reset);
            }
        }
        None
    }

    /// Reads from the data window (`offset` 0–3 from 0xCFC).
    pub fn read_data(&mut self, offset: u16, data: &mut [u8]) {
        match self.selected() {
            Some((f, reg)) => f.read(reg + usize::from(offset), data),
            None => data.fill(0xff),
        }
    }

    /// Writes to the data window.
    pub fn write_data(&mut self, offset: u16, data: &[u8]) {
        if let Some((f, reg)) = self.selected() {
            f.write(reg + usize::from(offset), data);
        }
    }

    /// Takes a saved state (see [`crate::persist`]): the registers, and
    /// the host bridge's bytes, whose read-only part (its identity) must be
    /// the bridge's own.
    pub(crate) fn restore_from(&mut self, saved: &Pci) -> Result<(), String> {
        let mut bridge = host_bridge();
        bridge
            .restore_from(&saved.bridge)
            .map_err(|why| format!("the host bridge: {why}"))?;
        *self = Pci {
            address: saved.address,
            reset_control: saved.reset_control,
            bridge,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(p: &mut Pci, bus: u32, dev: u32, func: u32, reg: u32) -> u32 {
        let a = ENABLE | bus << 16 | dev << 11 | func << 8 | reg;
        p.write_address(0, &a.to_le_bytes());
        let mut d = [0u8; 4];
        p.read_data(0, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ecam_reaches_the_same_space_as_mechanism_one() {
        let mut p = Pci::new();
        let mut d = [0u8; 4];
        p.ecam_read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1237_8086);
        // Extended space of a conventional function: 0.
        p.ecam_read(0x100, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        // Device 1 and bus 1: nothing.
        p.ecam_read(1 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        p.ecam_read(1 << 20, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
        // A write through ECAM is seen through 0xCF8/0xCFC, masked.
        p.ecam_write(0x59, &[0x30]);
        p.ecam_write(0x00, &[0, 0]);
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0x58) >> 8 & 0xff, 0x30);
        assert_eq!(cfg_read(&mut p, 0, 0, 0, 0), 0x1237_8086);
    }

    #[test]
    fn mechanism_one_finds_exactly_the_host_bridge() {
        let mut p = Pci::new();
        let mut found = Vec::new();
        for dev in 0..32 {
            for func in 0..8 {
                let id = cfg_read(&mut p, 0, dev, func, 0);
                if id != 0xffff_ffff {
                    found.push((dev, func, id));
                }
            }
        }
        assert_eq!(found, vec![(0, 0, 0x1237_8086)]);
        assert_eq!(
            cfg_read(&mut p, 0, 0, 0, 8) >> 8,
            0x06_0000,
            "class: host bridge"
        );
        assert_eq!(cfg_read(&mut p, 1, 0, 0, 0), 0xffff_ffff, "no bus 1");
        // Disabled: all ones.
        p.write_address(0, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        p.read_data(0, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn byte_and_word_accesses_reach_the_selected_dword() {
        let mut p = Pci::new();
        p.write_address(0, &ENABLE.to_le_bytes());
        let mut w = [0u8; 2];
        p.read_data(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), DEVICE_82441FX);
        // The command register keeps only its writable bits.
        p.write_data(0, &[0xff, 0xff, 0xff, 0xff]);
        let mut d = [0u8; 4];
        p.read_data(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1237_8086, "the IDs are read-only");
        p.write_address(0, &(ENABLE | 4).to_le_bytes());
        p.write_data(0, &[0xff, 0xff]);
        p.read_data(0, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0146);
        // A PAM register holds what firmware writes.
        p.write_address(0, &(ENABLE | 0x58).to_le_bytes());
        p.write_data(1, &[0x33]);
        let mut b = [0u8];
        p.read_data(1, &mut b);
        assert_eq!(b, [0x33]);
        let mut q = Pci::new();
        assert!(q.restore_from(&p).is_ok());
        assert_eq!(q, p);
    }

    #[test]
    fn the_reset_control_register_resets() {
        let mut p = Pci::new();
        assert_eq!(
            p.write_address(1, &[0x02]),
            None,
            "bit 1 alone chooses the kind"
        );
        assert_eq!(p.write_address(1, &[0x06]), Some(StopReason::Reset));
        let mut a = [0u8; 4];
        p.read_address(0, &mut a);
        assert_eq!(a, [0; 4], "the reset register is not the address register");
    }
}
