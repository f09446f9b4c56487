//! A PCI function's configuration space as a device presents it (PCI Local
//! Bus Specification 3.0, ch. 6): the type-0 header, base address
//! registers (BARs) that firmware and the OS size and place, a capability
//! list, and MSI-X (PCI 3.0 §6.8.2) with its table and pending-bit array.
//!
//! Every register is bytes plus a per-byte write mask, so the rules come
//! out of the masks: read-only identity, the command register's enable
//! bits, and BAR sizing — a BAR of size S has its address bits below S
//! read-only zero, so writing all ones and reading back gives `!(S - 1)`
//! with the type bits, which is how software learns S. A BAR decodes only
//! while the command register enables its space and its address is not 0.
//!
//! [`MsixTable`] is the table and PBA a device keeps in one of its BARs:
//! a vector the device signals becomes a message (address, data) for
//! [`crate::Machine::msi`], or a pending bit while it or the whole
//! function is masked, delivered when unmasked.

use serde::{Deserialize, Serialize};

/// Bytes of a conventional function's configuration space.
pub const CONFIG_SIZE: usize = 256;

/// Command register: I/O space decoding.
pub const CMD_IO: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Command register: bus mastering (DMA, and MSI/MSI-X writes).
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx disabled.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u8 = 1 << 4;
const BAR0: usize = 0x10;
const SUBSYSTEM: usize = 0x2c;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
/// Where capabilities start (after the header).
const FIRST_CAP: usize = 0x40;

/// The MSI-X capability ID.
pub const CAP_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// What a BAR maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB.
    Memory32,
    /// Memory anywhere (the BAR and the next one hold the address).
    Memory64 {
        /// Reads have no side effects.
        prefetchable: bool,
    },
}

/// A base address register: what it maps and how large it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// I/O or memory.
    pub kind: BarKind,
    /// Bytes: a power of two, at least 4 (I/O) or 16 (memory).
    pub size: u64,
}

impl Bar {
    fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 => 0x0,
            BarKind::Memory64 { prefetchable } => 0x4 | if prefetchable { 0x8 } else { 0 },
        }
    }

    fn low_bits(&self) -> u32 {
        if self.kind == BarKind::Io {
            0x3
        } else {
            0xf
        }
    }
}

/// A function's configuration space (see the module docs). Saved as its
/// bytes; the masks and the BAR and capability layout are the device's
/// identity, made again by the device (and not part of equality: two
/// spaces are equal when their registers are).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigSpace {
    space: Vec<u8>,
    #[serde(skip)]
    wmask: Vec<u8>,
    #[serde(skip)]
    bars: [Option<Bar>; 6],
    #[serde(skip)]
    next_cap: usize,
    /// Offset of the MSI-X capability.
    #[serde(skip)]
    msix: Option<usize>,
}

impl PartialEq for ConfigSpace {
    fn eq(&self, other: &Self) -> bool {
        self.space == other.space
    }
}

impl Eq for ConfigSpace {}

impl ConfigSpace {
    /// A header-type-0 function: vendor and device ID, `class` as (base
    /// class, subclass, programming interface), revision. Its command
    /// register enables I/O, memory, bus mastering, parity and SERR#
    /// reporting and INTx disabling; the latency timer and the interrupt
    /// line hold what is written.
    pub fn new(vendor: u16, device: u16, class: [u8; 3], revision: u8) -> ConfigSpace {
        let mut c = ConfigSpace {
            space: vec![0; CONFIG_SIZE],
            wmask: vec![0; CONFIG_SIZE],
            bars: [None; 6],
            next_cap: FIRST_CAP,
            msix: None,
        };
        c.space[0..2].copy_from_slice(&vendor.to_le_bytes());
        c.space[2..4].copy_from_slice(&device.to_le_bytes());
        c.space[0x08] = revision;
        c.space[0x09] = class[2];
        c.space[0x0a] = class[1];
        c.space[0x0b] = class[0];
        c.set_command_mask(CMD_IO | CMD_MEMORY | CMD_BUS_MASTER | 0x40 | 0x100 | CMD_INTX_DISABLE);
        c.wmask[0x0d] = 0xff;
        c.wmask[INTERRUPT_LINE] = 0xff;
        c
    }

    /// Which command-register bits a guest may set.
    pub fn set_command_mask(&mut self, mask: u16) {
        self.wmask[COMMAND..COMMAND + 2].copy_from_slice(&mask.to_le_bytes());
    }

    /// Sets which bits of each byte in `range` a guest may write (e.g. all
    /// of the device-specific registers, or none of a register the device
    /// lacks).
    pub fn set_write_mask(&mut self, range: std::ops::RangeInclusive<usize>, mask: u8) {
        for i in range.filter(|&i| i < CONFIG_SIZE) {
            self.wmask[i] = mask;
        }
    }

    /// Subsystem vendor and ID.
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.space[SUBSYSTEM..SUBSYSTEM + 2].copy_from_slice(&vendor.to_le_bytes());
        self.space[SUBSYSTEM + 2..SUBSYSTEM + 4].copy_from_slice(&id.to_le_bytes());
    }

    /// The INTx pin the function uses (1 = INTA#…).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.space[INTERRUPT_PIN] = pin;
    }

    /// Declares BAR `index` (0–5; a 64-bit BAR also takes `index + 1`).
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), String> {
        let wide = matches!(bar.kind, BarKind::Memory64 { .. });
        let min = if bar.kind == BarKind::Io { 4 } else { 16 };
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(format!(
                "BAR {index}: size {:#x} is not a power of two ≥ {min}",
                bar.size
            ));
        }
        if bar.size > u64::from(u32::MAX) && !wide {
            return Err(format!(
                "BAR {index}: {:#x} bytes need a 64-bit BAR",
                bar.size
            ));
        }
        if index > 5 || (wide && index > 4) {
            return Err(format!("BAR {index}: no such register"));
        }
        if self.bars[index].is_some() || (wide && self.bars[index + 1].is_some()) {
            return Err(format!("BAR {index}: declared twice"));
        }
        let at = BAR0 + 4 * index;
        let addr_mask = !(bar.size - 1);
        let low = (addr_mask as u32) & !bar.low_bits();
        self.space[at..at + 4].copy_from_slice(&bar.type_bits().to_le_bytes());
        self.wmask[at..at + 4].copy_from_slice(&low.to_le_bytes());
        if wide {
            let high = (addr_mask >> 32) as u32;
            self.wmask[at + 4..at + 8].copy_from_slice(&high.to_le_bytes());
        }
        self.bars[index] = Some(bar);
        Ok(())
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.space[COMMAND], self.space[COMMAND + 1]])
    }

    fn dword(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.space[at..at + 4].try_into().expect("4 bytes"))
    }

    /// Where BAR `index` decodes now: its address while the command
    /// register enables its space and the address is not 0, else `None`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let at = BAR0 + 4 * index;
        let mut addr = u64::from(self.dword(at) & !bar.low_bits());
        if matches!(bar.kind, BarKind::Memory64 { .. }) {
            addr |= u64::from(self.dword(at + 4)) << 32;
        }
        let enable = if bar.kind == BarKind::Io {
            CMD_IO
        } else {
            CMD_MEMORY
        };
        (self.command() & enable != 0 && addr != 0).then_some(addr)
    }

    /// Every declared BAR: index, what it is, where it decodes now.
    pub fn bars(&self) -> impl Iterator<Item = (usize, Bar, Option<u64>)> + '_ {
        (0..6).filter_map(|i| self.bars[i].map(|b| (i, b, self.bar_address(i))))
    }

    /// Appends a capability (`id`, then `body` after the ID and next
    /// pointer; `wmask` covers `body`) to the list; returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Result<usize, String> {
        let at = self.next_cap;
        let len = (2 + body.len()).next_multiple_of(4);
        if at + len > CONFIG_SIZE || wmask.len() > body.len() {
            return Err(format!("capability {id:#x}: no room"));
        }
        self.space[at] = id;
        self.space[at + 1] = 0;
        self.space[at + 2..at + 2 + body.len()].copy_from_slice(body);
        self.wmask[at + 2..at + 2 + wmask.len()].copy_from_slice(wmask);
        // Link it after the last one.
        if self.space[CAP_PTR] == 0 {
            self.space[CAP_PTR] = at as u8;
        } else {
            let mut p = usize::from(self.space[CAP_PTR]);
            while self.space[p + 1] != 0 {
                p = usize::from(self.space[p + 1]);
            }
            self.space[p + 1] = at as u8;
        }
        self.space[STATUS] |= STATUS_CAP_LIST;
        self.next_cap = at + len;
        Ok(at)
    }

    /// Adds the MSI-X capability: `vectors` table entries at
    /// `table_offset` in BAR `table_bar`, the pending-bit array at
    /// `pba_offset` in BAR `pba_bar` (offsets 8-byte aligned).
    pub fn add_msix(
        &mut self,
        vectors: u16,
        (table_bar, table_offset): (u8, u32),
        (pba_bar, pba_offset): (u8, u32),
    ) -> Result<usize, String> {
        if !(1..=2048).contains(&vectors) || table_bar > 5 || pba_bar > 5 {
            return Err(format!(
                "MSI-X: {vectors} vectors, BIRs {table_bar}/{pba_bar}"
            ));
        }
        if table_offset % 8 != 0 || pba_offset % 8 != 0 {
            return Err("MSI-X: table and PBA offsets must be 8-byte aligned".into());
        }
        let control = vectors - 1;
        let mut body = Vec::new();
        body.extend_from_slice(&control.to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        // Only the enable and function-mask bits are writable.
        let wmask = [0x00, 0xc0];
        let at = self.add_capability(CAP_MSIX, &body, &wmask)?;
        self.msix = Some(at);
        Ok(at)
    }

    fn msix_control(&self) -> u16 {
        self.msix.map_or(0, |at| {
            u16::from_le_bytes([self.space[at + 2], self.space[at + 3]])
        })
    }

    /// MSI-X is on: the function signals through its table, not INTx.
    pub fn msix_enabled(&self) -> bool {
        self.msix_control() & MSIX_ENABLE != 0
    }

    /// MSI-X's function mask: every vector held pending.
    pub fn msix_function_masked(&self) -> bool {
        self.msix_control() & MSIX_FUNCTION_MASK != 0
    }

    /// Reads configuration bytes (beyond the space: all ones).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.space.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes configuration bytes through the write masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            let at = offset + i;
            if at < CONFIG_SIZE {
                let m = self.wmask[at];
                self.space[at] = (self.space[at] & !m) | (d & m);
            }
        }
    }

    /// Takes a saved state's bytes, refusing one whose read-only bytes are
    /// not this function's (another device, or a damaged file).
    pub fn restore_from(&mut self, saved: &ConfigSpace) -> Result<(), String> {
        self.check_against(saved)?;
        self.space.copy_from_slice(&saved.space);
        Ok(())
    }

    /// Whether `saved` could be this function's state.
    pub fn check_against(&self, saved: &ConfigSpace) -> Result<(), String> {
        if saved.space.len() != CONFIG_SIZE {
            return Err("configuration space is not 256 bytes".into());
        }
        let changed =
            (0..CONFIG_SIZE).find(|&i| (saved.space[i] ^ self.space[i]) & !self.wmask[i] != 0);
        match changed {
            Some(i) => Err(format!("read-only configuration byte {i:#x} differs")),
            None => Ok(()),
        }
    }
}

/// An MSI-X table and pending-bit array (16 bytes and 1 bit per vector),
/// as a device keeps them in its BARs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTable {
    /// Per vector: message address low and high, data, vector control.
    entries: Vec<[u32; 4]>,
    pending: Vec<u64>,
}

impl MsixTable {
    /// `vectors` entries, each masked, as after reset.
    pub fn new(vectors: u16) -> MsixTable {
        MsixTable {
            entries: vec![[0, 0, 0, 1]; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
        }
    }

    /// Its vectors.
    pub fn vectors(&self) -> usize {
        self.entries.len()
    }

    /// Whether the pending-bit array fits the table (a saved table from a
    /// damaged file may not).
    pub fn well_formed(&self) -> bool {
        self.pending.len() == self.entries.len().div_ceil(64)
    }

    /// Reads the table (`offset` from its start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *d = self
                .entries
                .get(at / 16)
                .map_or(0, |e| e[(at % 16) / 4].to_le_bytes()[at % 4]);
        }
    }

    /// Writes the table; returns the messages a vector unmasked here had
    /// pending (deliver them unless `function_masked`: then they stay).
    pub fn table_write(
        &mut self,
        offset: u64,
        data: &[u8],
        function_masked: bool,
    ) -> Vec<(u64, u32)> {
        for (i, &d) in data.iter().enumerate() {
            let at = offset as usize + i;
            if let Some(e) = self.entries.get_mut(at / 16) {
                let word = &mut e[(at % 16) / 4];
                let mut b = word.to_le_bytes();
                b[at % 4] = d;
                *word = u32::from_le_bytes(b);
                // Vector control: only the mask bit exists.
                e[3] &= 1;
            }
        }
        self.flush(function_masked)
    }

    /// Reads the pending-bit array.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *d = self
                .pending
                .get(at / 8)
                .map_or(0, |q| q.to_le_bytes()[at % 8]);
        }
    }

    /// The device signals `vector`: the message to deliver now, or `None`
    /// (held pending while masked; dropped for a vector beyond the table).
    pub fn signal(&mut self, vector: u16, function_masked: bool) -> Option<(u64, u32)> {
        let v = usize::from(vector);
        let e = *self.entries.get(v)?;
        if function_masked || e[3] & 1 != 0 {
            self.pending[v / 64] |= 1 << (v % 64);
            return None;
        }
        Some((u64::from(e[0]) | u64::from(e[1]) << 32, e[2]))
    }

    /// The messages of pending vectors that are no longer masked (after a
    /// table write, or when the function mask is cleared); their pending
    /// bits clear.
    pub fn flush(&mut self, function_masked: bool) -> Vec<(u64, u32)> {
        if function_masked {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (v, e) in self.entries.iter().enumerate() {
            let bit = 1u64 << (v % 64);
            if self.pending[v / 64] & bit != 0 && e[3] & 1 == 0 {
                self.pending[v / 64] &= !bit;
                out.push((u64::from(e[0]) | u64::from(e[1]) << 32, e[2]));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &ConfigSpace, at: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(at, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(c: &mut ConfigSpace, at: usize, v: u32) {
        c.write(at, &v.to_le_bytes());
    }

    fn device() -> ConfigSpace {
        let mut c = ConfigSpace::new(0x1af4, 0x1041, [0x02, 0x00, 0x00], 1);
        c.add_bar(
            0,
            Bar {
                kind: BarKind::Io,
                size: 0x20,
            },
        )
        .unwrap();
        c.add_bar(
            1,
            Bar {
                kind: BarKind::Memory32,
                size: 0x1000,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            Bar {
                kind: BarKind::Memory64 { prefetchable: true },
                size: 0x4000,
            },
        )
        .unwrap();
        c
    }

    #[test]
    fn bars_size_as_the_pci_specification_says() {
        let mut c = device();
        for at in [0x10, 0x14, 0x18, 0x1c, 0x20] {
            write32(&mut c, at, 0xffff_ffff);
        }
        assert_eq!(read32(&c, 0x10), 0xffff_ffe1, "32 bytes of I/O");
        assert_eq!(read32(&c, 0x14), 0xffff_f000, "4 KiB of memory");
        assert_eq!(
            read32(&c, 0x18),
            0xffff_c00c,
            "16 KiB, 64-bit, prefetchable"
        );
        assert_eq!(read32(&c, 0x1c), 0xffff_ffff, "the upper half");
        assert_eq!(
            read32(&c, 0x20),
            0,
            "no BAR 4 (BAR 3 is BAR 2's upper half)"
        );
        // The identity does not move.
        write32(&mut c, 0, 0);
        assert_eq!(read32(&c, 0), 0x1041_1af4);
        assert_eq!(read32(&c, 8), 0x0200_0001);
    }

    #[test]
    fn a_bar_decodes_only_where_placed_and_enabled() {
        let mut c = device();
        write32(&mut c, 0x10, 0xc001);
        write32(&mut c, 0x14, 0xfebf_1234);
        write32(&mut c, 0x18, 0x0000_8000);
        write32(&mut c, 0x1c, 0x1);
        assert_eq!(c.bar_address(0), None, "I/O decoding is off");
        c.write(4, &[(CMD_IO | CMD_MEMORY) as u8]);
        assert_eq!(c.bar_address(0), Some(0xc000));
        assert_eq!(c.bar_address(1), Some(0xfebf_1000), "aligned to its size");
        assert_eq!(c.bar_address(2), Some(0x1_0000_8000));
        assert_eq!(c.bar_address(3), None, "no BAR 3 of its own");
        c.write(4, &[CMD_IO as u8]);
        assert_eq!(c.bar_address(1), None, "memory decoding off");
        assert_eq!(c.bars().count(), 3);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = device();
        let io = |size| Bar {
            kind: BarKind::Io,
            size,
        };
        assert!(c.add_bar(0, io(0x20)).is_err(), "twice");
        assert!(c.add_bar(4, io(0x30)).is_err(), "not a power of two");
        assert!(c.add_bar(4, io(2)).is_err(), "too small");
        assert!(c.add_bar(6, io(4)).is_err(), "no BAR 6");
        let wide = Bar {
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size: 16,
        };
        assert!(c.add_bar(5, wide).is_err(), "no room for the upper half");
        assert!(c.add_bar(4, io(4)).is_ok());
    }

    #[test]
    fn msix_capability_is_listed_and_only_its_control_bits_write() {
        let mut c = device();
        let at = c.add_msix(3, (1, 0), (1, 0x800)).unwrap();
        assert_eq!(at, 0x40);
        assert_ne!(read32(&c, 4) >> 16 & u32::from(STATUS_CAP_LIST), 0);
        assert_eq!(read32(&c, CAP_PTR) & 0xff, 0x40);
        assert_eq!(read32(&c, at), 0x0002_0011, "ID 0x11, last, 3 vectors");
        assert_eq!(read32(&c, at + 4), 1, "table in BAR 1 at 0");
        assert_eq!(read32(&c, at + 8), 0x801, "PBA in BAR 1 at 0x800");
        write32(&mut c, at, 0xffff_ffff);
        assert_eq!(read32(&c, at), 0xc002_0011);
        assert!(c.msix_enabled() && c.msix_function_masked());
        write32(&mut c, at + 4, 0);
        assert_eq!(read32(&c, at + 4), 1, "read-only");
    }

    #[test]
    fn msix_vectors_deliver_or_wait_while_masked() {
        let mut t = MsixTable::new(2);
        // Masked at reset: pending.
        assert_eq!(t.signal(1, false), None);
        let mut pba = [0u8; 8];
        t.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Program vector 1 (address 0xfee01000, data 0x41), unmask it.
        t.table_write(16, &0xfee0_1000u32.to_le_bytes(), false);
        t.table_write(24, &0x41u32.to_le_bytes(), false);
        let out = t.table_write(28, &0u32.to_le_bytes(), false);
        assert_eq!(out, vec![(0xfee0_1000, 0x41)], "the pending message goes");
        t.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert_eq!(t.signal(1, false), Some((0xfee0_1000, 0x41)));
        // The function mask holds it back until cleared.
        assert_eq!(t.signal(1, true), None);
        assert!(t.flush(true).is_empty());
        assert_eq!(t.flush(false), vec![(0xfee0_1000, 0x41)]);
        // Reading back, and a vector beyond the table.
        let mut d = [0u8; 4];
        t.table_read(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x41);
        t.table_read(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "unmasked");
        assert_eq!(t.signal(9, false), None);
    }

    #[test]
    fn a_saved_space_restores_only_onto_the_same_function() {
        let mut c = device();
        write32(&mut c, 0x14, 0xfebf_0000);
        let saved = c.clone();
        let mut fresh = device();
        fresh.restore_from(&saved).unwrap();
        assert_eq!(read32(&fresh, 0x14), 0xfebf_0000);
        let mut other = ConfigSpace::new(0x8086, 0x1237, [6, 0, 0], 2);
        assert!(other.restore_from(&saved).is_err());
    }
}
