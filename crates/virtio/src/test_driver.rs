//! A virtio driver for the unit tests: it sets a device up through the
//! PCI seam only (configuration space and BAR accesses), as Linux does,
//! and puts split-ring chains in a small guest RAM.

use std::sync::Arc;

use popek_machine::pci_device::{DeviceIo, PciDevice};
use popek_machine::pci_function::{CAP_MSIX, CMD_BUS_MASTER, CMD_MEMORY};
use popek_memory::GuestRam;

use crate::pci::VirtioPci;
use crate::{features, VirtioDevice};

/// Guest RAM of the tests.
pub const RAM: u64 = 1 << 20;
/// Where queue 0's rings go.
pub const DESC: u64 = 0x1_0000;
pub const AVAIL: u64 = 0x1_1000;
pub const USED: u64 = 0x1_2000;
/// Queue 1's rings are queue 0's this far up.
pub const Q1: u64 = 0x4000;
/// Descriptors in queue 0.
pub const QSIZE: u16 = 16;
/// MSI-X data of vector `v` is `VECTOR_BASE + v`.
pub const VECTOR_BASE: u32 = 0x40;

/// Descriptor flags.
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;

pub struct Driver {
    pub dev: VirtioPci,
    pub ram: Arc<GuestRam>,
    pub msis: Vec<(u64, u32)>,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Driver {
        Driver {
            dev: VirtioPci::new(device).expect("a transport"),
            ram: Arc::new(GuestRam::new(RAM).unwrap()),
            msis: Vec::new(),
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn io<R>(&mut self, f: impl FnOnce(&mut VirtioPci, &mut DeviceIo<'_>) -> R) -> R {
        let ram = self.ram.clone();
        let mut io = DeviceIo::new(&ram);
        let r = f(&mut self.dev, &mut io);
        self.msis.extend(io.take_msis());
        r
    }

    pub fn cfg_write(&mut self, off: usize, data: &[u8]) {
        self.io(|d, io| d.config_write(off, data, io));
    }

    pub fn cfg_read(&mut self, off: usize, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.config_read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    pub fn bar_write(&mut self, off: u64, data: &[u8]) {
        self.io(|d, io| d.bar_write(0, off, data, io));
    }

    pub fn bar_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.io(|d, io| d.bar_read(0, off, &mut b[..len], io));
        u64::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        self.bar_read(0x14, 1) as u8
    }

    /// The device's feature bits.
    pub fn device_features(&mut self) -> u64 {
        self.bar_write(0x00, &0u32.to_le_bytes());
        let lo = self.bar_read(0x04, 4);
        self.bar_write(0x00, &1u32.to_le_bytes());
        lo | self.bar_read(0x04, 4) << 32
    }

    /// Offers `f` as the driver's features; returns whether FEATURES_OK
    /// stuck.
    pub fn negotiate(&mut self, f: u64) -> bool {
        self.bar_write(0x14, &[1]);
        self.bar_write(0x14, &[1 | 2]);
        self.bar_write(0x08, &0u32.to_le_bytes());
        self.bar_write(0x0c, &(f as u32).to_le_bytes());
        self.bar_write(0x08, &1u32.to_le_bytes());
        self.bar_write(0x0c, &((f >> 32) as u32).to_le_bytes());
        self.bar_write(0x14, &[1 | 2 | 8]);
        self.status() & 8 != 0
    }

    fn msix_cap(&mut self) -> usize {
        let mut p = self.cfg_read(0x34, 1) as usize;
        while p != 0 {
            if self.cfg_read(p, 1) as u8 == CAP_MSIX {
                return p;
            }
            p = self.cfg_read(p + 1, 1) as usize;
        }
        panic!("no MSI-X capability");
    }

    /// Brings the device up as Linux does: the BAR placed, memory and
    /// bus mastering on, MSI-X on with vector v sending
    /// `VECTOR_BASE + v`, every feature but event indexes, queue 0 at the
    /// fixed rings with vector 1 (and queue 1, if there is one, at
    /// [`Q1`] above them with vector 2), DRIVER_OK.
    pub fn setup(&mut self) {
        self.cfg_write(0x10, &0xc000_0000u32.to_le_bytes());
        self.cfg_write(0x14, &0u32.to_le_bytes());
        self.cfg_write(0x04, &(CMD_MEMORY | CMD_BUS_MASTER).to_le_bytes());
        let cap = self.msix_cap();
        self.cfg_write(cap + 3, &[0x80]);
        let vectors = (self.cfg_read(cap + 2, 2) & 0x7ff) + 1;
        for v in 0..vectors {
            let e = 0x4000 + 16 * v;
            self.bar_write(e, &0xfee0_0000u32.to_le_bytes());
            self.bar_write(e + 4, &0u32.to_le_bytes());
            self.bar_write(e + 8, &(VECTOR_BASE + v as u32).to_le_bytes());
            self.bar_write(e + 12, &0u32.to_le_bytes());
        }
        let f = self.device_features() & !features::RING_EVENT_IDX;
        assert!(self.negotiate(f), "FEATURES_OK");
        self.bar_write(0x10, &0u16.to_le_bytes());
        self.setup_queue(0, QSIZE, (DESC, AVAIL, USED));
        if self.bar_read(0x12, 2) >= 2 {
            // Queue 1 (a transmit queue) beside queue 0's rings.
            self.setup_queue(1, QSIZE, (DESC + Q1, AVAIL + Q1, USED + Q1));
        }
        self.bar_write(0x14, &[1 | 2 | 8 | 4]);
        assert_eq!(self.status() & 4, 4, "DRIVER_OK");
    }

    pub fn setup_queue(&mut self, q: u16, size: u16, (desc, avail, used): (u64, u64, u64)) {
        self.bar_write(0x16, &q.to_le_bytes());
        self.bar_write(0x18, &size.to_le_bytes());
        self.bar_write(0x1a, &(q + 1).to_le_bytes());
        for (off, a) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            self.bar_write(off, &(a as u32).to_le_bytes());
            self.bar_write(off + 4, &((a >> 32) as u32).to_le_bytes());
        }
        self.bar_write(0x1c, &1u16.to_le_bytes());
    }

    /// Puts a chain of `(address, length, flags)` in the ring (NEXT is
    /// added between descriptors) and notifies queue 0; returns its head.
    pub fn submit(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % QSIZE;
            let last = i + 1 == chain.len();
            let flags = flags | if last { 0 } else { NEXT };
            let next = (idx + 1) % QSIZE;
            let d = DESC + 16 * u64::from(idx);
            self.ram.write_u64(d, addr).unwrap();
            self.ram.write_u32(d + 8, len).unwrap();
            self.ram.write_u16(d + 12, flags).unwrap();
            self.ram.write_u16(d + 14, next).unwrap();
        }
        self.next_desc = (self.next_desc + chain.len() as u16) % QSIZE;
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.ram.write_u16(slot, head).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.ram.write_u16(AVAIL + 2, self.avail_idx).unwrap();
        self.bar_write(0x3000, &0u16.to_le_bytes());
        head
    }

    /// Waits for the device and returns the new used entries (id, len).
    pub fn used(&mut self) -> Vec<(u32, u32)> {
        self.io(|d, io| d.quiesce(io));
        let idx = self.ram.read_u16(USED + 2).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            out.push((
                self.ram.read_u32(e).unwrap(),
                self.ram.read_u32(e + 4).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
