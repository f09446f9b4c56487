//! The modern virtio-pci transport (virtio 1.2 §4.1).
//!
//! One function per device: vendor 1AF4h, device 1040h + the virtio
//! device ID, revision 1 (a modern-only device). One 64-bit memory BAR
//! (BAR 0, 32 KiB) holds every structure the vendor capabilities point
//! to:
//!
//! | offset | structure |
//! |---|---|
//! | 0x0000 | common configuration (`virtio_pci_common_cfg`, 0x40 bytes) |
//! | 0x1000 | ISR status (read clears) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notifications: queue *n* at 0x3000 + 4·*n* (`notify_off_multiplier` 4) |
//! | 0x4000 | MSI-X table (one vector per queue and one for configuration changes) |
//! | 0x5000 | MSI-X pending-bit array |
//!
//! The PCI configuration access capability (`VIRTIO_PCI_CAP_PCI_CFG`)
//! reaches the same BAR through configuration space. Interrupts are
//! MSI-X only: the function has no INTx pin (the machine routes none).

use std::sync::Arc;

use popek_machine::pci_device::{DeviceIo, PciDevice};
use popek_machine::pci_function::{
    Bar, BarKind, ConfigSpace, MsixTable, CMD_BUS_MASTER, CONFIG_SIZE,
};
use popek_memory::vm::VmMemory;
use popek_memory::GuestRam;
use virtio_queue::{Queue, QueueT};

use crate::{features, VirtioDevice};

/// virtio's PCI vendor ID.
pub const VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device ID.
pub const DEVICE_BASE: u16 = 0x1040;

/// BAR 0's size.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

/// The vendor-specific capability ID the virtio structures use.
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;

/// "No vector" in the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;
const STATUS_FAILED: u8 = 128;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// A virtio device on PCI (see the module docs).
pub struct VirtioPci {
    device: Box<dyn VirtioDevice>,
    config: ConfigSpace,
    msix: MsixTable,
    /// Offset of the PCI configuration access capability.
    pci_cfg_cap: usize,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    queue_select: u16,
    queues: Vec<Queue>,
    /// Each queue's MSI-X vector.
    vectors: Vec<u16>,
    isr: u8,
    /// The `vm-memory` view of the RAM the machine has now.
    mem: Option<(Arc<GuestRam>, VmMemory)>,
    notifications: u64,
    interrupts: u64,
}

impl std::fmt::Debug for VirtioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPci")
            .field("device", &self.device.kind())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// The transport's registers and rings in a snapshot (the device's own
/// state in `device`). Requests are never in flight then: the machine
/// waits for them before it saves.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct TransportState {
    config: ConfigSpace,
    msix: MsixTable,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    queue_select: u16,
    isr: u8,
    queues: Vec<SavedQueue>,
    vectors: Vec<u16>,
    device: serde_json::Value,
}

/// `virtio_queue::QueueState`, which has no serde.
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
struct SavedQueue {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl SavedQueue {
    fn of(q: &virtio_queue::QueueState) -> SavedQueue {
        SavedQueue {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }

    fn queue(&self) -> Result<Queue, String> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| e.to_string())
    }
}

/// Word `select` (0: bits 0–31, 1: bits 32–63, beyond: none) of a
/// feature set, as the common configuration shows it.
fn feature_word(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// A vendor capability's body (after its ID and next pointer).
fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![(4 + 12 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl VirtioPci {
    /// Puts `device` behind the transport.
    pub fn new(device: Box<dyn VirtioDevice>) -> Result<VirtioPci, String> {
        let ty = device.device_type();
        let mut config = ConfigSpace::new(VENDOR, DEVICE_BASE + ty, device.pci_class(), 1);
        config.set_subsystem(VENDOR, 0x40 + ty);
        config.add_bar(
            0,
            Bar {
                kind: BarKind::Memory64 {
                    prefetchable: false,
                },
                size: BAR_SIZE,
            },
        )?;
        let sizes = device.queue_max_sizes();
        let vectors = sizes.len() as u16 + 1;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CFG_COMMON, COMMON, COMMON_LEN, &[]),
            &[],
        )?;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(
                CFG_NOTIFY,
                NOTIFY,
                u64::from(NOTIFY_MULTIPLIER) * sizes.len() as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(CAP_VENDOR, &vendor_cap(CFG_ISR, ISR, 4, &[]), &[])?;
        config.add_capability(
            CAP_VENDOR,
            &vendor_cap(CFG_DEVICE, DEVICE_CFG, DEVICE_CFG_LEN, &[]),
            &[],
        )?;
        // The access window: BAR, offset and length are the driver's, and
        // the data bytes are the window.
        let mut wmask = vec![0u8; 18];
        wmask[2] = 0xff;
        wmask[6..18].fill(0xff);
        let pci_cfg_cap =
            config.add_capability(CAP_VENDOR, &vendor_cap(CFG_PCI, 0, 0, &[0; 4]), &wmask)?;
        config.add_msix(vectors, (0, MSIX_TABLE as u32), (0, MSIX_PBA as u32))?;
        let queues = sizes
            .iter()
            .map(|&s| Queue::new(s).map_err(|e| format!("queue of {s}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let offered = device.features()
            | features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX;
        Ok(VirtioPci {
            device,
            config,
            msix: MsixTable::new(vectors),
            pci_cfg_cap,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            queue_select: 0,
            vectors: vec![NO_VECTOR; queues.len()],
            queues,
            isr: 0,
            mem: None,
            notifications: 0,
            interrupts: 0,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The `vm-memory` view of `ram` (made again when the machine's RAM
    /// changed).
    fn memory(&mut self, ram: &Arc<GuestRam>) -> Option<VmMemory> {
        match &self.mem {
            Some((r, m)) if Arc::ptr_eq(r, ram) => Some(m.clone()),
            _ => match ram.vm_memory() {
                Ok(m) => {
                    self.mem = Some((ram.clone(), m.clone()));
                    Some(m)
                }
                Err(e) => {
                    tracing::warn!("{}: no view of guest RAM: {e}", self.device.kind());
                    None
                }
            },
        }
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The common configuration structure as bytes.
    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        let df = feature_word(self.offered, self.device_feature_select);
        put(&mut b, 0x04, &df.to_le_bytes());
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let drf = feature_word(self.driver_features, self.driver_feature_select);
        put(&mut b, 0x0c, &drf.to_le_bytes());
        put(&mut b, 0x10, &self.config_vector.to_le_bytes());
        put(&mut b, 0x12, &(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = 0; // config_generation: the configuration never changes
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        let sel = usize::from(self.queue_select);
        if let Some(q) = self.queues.get(sel) {
            put(&mut b, 0x18, &q.size().to_le_bytes());
            put(&mut b, 0x1a, &self.vectors[sel].to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.ready()).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc_table().to_le_bytes());
            put(&mut b, 0x28, &q.avail_ring().to_le_bytes());
            put(&mut b, 0x30, &q.used_ring().to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8], io: &mut DeviceIo<'_>) {
        let mut v = [0u8; 8];
        v[..data.len().min(8)].copy_from_slice(&data[..data.len().min(8)]);
        let val = u64::from_le_bytes(v);
        let w32 = val as u32;
        let w16 = val as u16;
        // Queue registers change only while the driver sets the device up.
        let setup = self.status & STATUS_DRIVER_OK == 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = w32,
            (0x08, 4) => self.driver_feature_select = w32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(w32)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | u64::from(w32) << 32
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self.config_vector = self.vector_or_none(w16),
            (0x14, 1) => self.write_status(data[0], io),
            (0x16, 2) => self.queue_select = w16,
            (0x18, 2) if setup => {
                if let Some(q) = self.selected() {
                    // A size the ring cannot have (0, not a power of
                    // two, beyond the maximum) is not taken: the driver
                    // reads back the size the queue kept.
                    q.set_size(w16);
                }
            }
            (0x1a, 2) => {
                let v = self.vector_or_none(w16);
                if let Some(slot) = self.vectors.get_mut(usize::from(self.queue_select)) {
                    *slot = v;
                }
            }
            (0x1c, 2) if setup && w16 == 1 => {
                let features = self.driver_features;
                if let Some(q) = self.selected() {
                    q.set_event_idx(features & features::RING_EVENT_IDX != 0);
                    q.set_ready(true);
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) | (0x20 | 0x28 | 0x30, 8) if setup => {
                let hi = offset % 8 == 4;
                let (lo, high) = if data.len() == 8 {
                    (Some(val as u32), Some((val >> 32) as u32))
                } else if hi {
                    (None, Some(w32))
                } else {
                    (Some(w32), None)
                };
                if let Some(q) = self.selected() {
                    match offset & !7 {
                        0x20 => q.set_desc_table_address(lo, high),
                        0x28 => q.set_avail_ring_address(lo, high),
                        _ => q.set_used_ring_address(lo, high),
                    }
                }
            }
            _ => tracing::debug!(
                "{}: common configuration write {offset:#x}/{} ignored",
                self.device.kind(),
                data.len()
            ),
        }
    }

    /// A vector the table has, else [`NO_VECTOR`] (what the driver reads
    /// back to learn the mapping failed).
    fn vector_or_none(&self, v: u16) -> u16 {
        let vectors = self.queues.len() as u16 + 1;
        if v < vectors {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, s: u8, io: &mut DeviceIo<'_>) {
        if s == 0 {
            self.reset(io);
            return;
        }
        let mut s = s;
        if s & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // §3.1.1: only features offered, and a modern driver.
            let ok = self.driver_features & !self.offered == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                tracing::debug!(
                    "{}: driver features {:#x} refused (offered {:#x})",
                    self.device.kind(),
                    self.driver_features,
                    self.offered
                );
                s &= !STATUS_FEATURES_OK;
            }
        }
        if s & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            let r = if s & STATUS_FEATURES_OK == 0 {
                Err("DRIVER_OK without FEATURES_OK".to_string())
            } else {
                self.device.activate(self.driver_features)
            };
            if let Err(why) = r {
                tracing::warn!("{}: cannot start: {why}", self.device.kind());
                s = (s & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
                self.status |= s;
                self.signal_config(io);
                return;
            }
        }
        // Bits stay set until a reset.
        self.status |= s
            & (STATUS_ACKNOWLEDGE
                | STATUS_DRIVER
                | STATUS_DRIVER_OK
                | STATUS_FEATURES_OK
                | STATUS_FAILED);
    }

    /// Device reset: nothing in flight, queues and registers as at power-on.
    fn reset(&mut self, io: &mut DeviceIo<'_>) {
        if self.device.in_flight() > 0 {
            self.device.drain();
        }
        // What finished is dropped: the driver gave the buffers up.
        if let Some(mem) = self.memory(io.ram) {
            self.device.poll(&mut self.queues, &mem);
        }
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.vectors.fill(NO_VECTOR);
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
    }

    /// Sends `vector`'s message (or leaves it pending while masked).
    fn signal(&mut self, vector: u16, io: &mut DeviceIo<'_>) {
        if vector == NO_VECTOR || !self.config.msix_enabled() {
            return;
        }
        if let Some((addr, data)) = self.msix.signal(vector, self.config.msix_function_masked()) {
            self.interrupts += 1;
            io.msi(addr, data);
        }
    }

    fn signal_config(&mut self, io: &mut DeviceIo<'_>) {
        self.isr |= ISR_CONFIG;
        self.signal(self.config_vector, io);
    }

    /// Interrupts for the queues in `mask` that got used buffers, where the
    /// driver wants one (§2.7.10).
    fn interrupt_queues(&mut self, mask: u64, mem: &VmMemory, io: &mut DeviceIo<'_>) {
        for i in 0..self.queues.len().min(64) {
            if mask & (1 << i) == 0 {
                continue;
            }
            let notify = match self.queues[i].needs_notification(mem) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(&format!("queue {i}: {e}"), io);
                    return;
                }
            };
            if notify {
                self.isr |= ISR_QUEUE;
                self.signal(self.vectors[i], io);
            }
        }
    }

    /// The driver broke the ring protocol: the device needs a reset.
    fn fail(&mut self, why: &str, io: &mut DeviceIo<'_>) {
        tracing::warn!("{}: {why}; the device needs a reset", self.device.kind());
        if self.status & STATUS_NEEDS_RESET == 0 {
            self.status |= STATUS_NEEDS_RESET;
            self.signal_config(io);
        }
    }

    fn notify(&mut self, index: usize, io: &mut DeviceIo<'_>) {
        self.notifications += 1;
        let live = self.status & STATUS_DRIVER_OK != 0
            && self.status & STATUS_NEEDS_RESET == 0
            && self.config.command() & CMD_BUS_MASTER != 0;
        if !live || index >= self.queues.len() || !self.queues[index].ready() {
            return;
        }
        let Some(mem) = self.memory(io.ram) else {
            return;
        };
        if !self.queues[index].is_valid(&mem) {
            self.fail(&format!("queue {index} is not in guest RAM"), io);
            return;
        }
        match self
            .device
            .process_queue(index, &mut self.queues[index], &mem, io.ram)
        {
            Ok(true) => self.interrupt_queues(1 << index, &mem, io),
            Ok(false) => {}
            Err(e) => self.fail(&format!("queue {index}: {e}"), io),
        }
    }

    /// A saved state, checked against this device: the same identity,
    /// queues this device has, registers in range.
    fn parse_state(
        &self,
        state: &serde_json::Value,
    ) -> Result<(TransportState, Vec<Queue>), String> {
        let st: TransportState =
            serde_json::from_value(state.clone()).map_err(|e| format!("unreadable: {e}"))?;
        self.config.check_against(&st.config)?;
        let vectors = self.queues.len() as u16 + 1;
        if st.msix.vectors() != usize::from(vectors) || !st.msix.well_formed() {
            return Err(format!(
                "an MSI-X table of {} vectors; the device has {vectors}",
                st.msix.vectors()
            ));
        }
        if st.queues.len() != self.queues.len() || st.vectors.len() != self.queues.len() {
            return Err(format!(
                "{} queues; the device has {}",
                st.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::new();
        for (i, (q, mine)) in st.queues.iter().zip(&self.queues).enumerate() {
            if q.max_size != mine.max_size() {
                return Err(format!(
                    "queue {i}: {} descriptors at most, not {}",
                    mine.max_size(),
                    q.max_size
                ));
            }
            queues.push(q.queue().map_err(|why| format!("queue {i}: {why}"))?);
        }
        let bad_vector = |v: u16| v != NO_VECTOR && v >= vectors;
        if bad_vector(st.config_vector) || st.vectors.iter().any(|&v| bad_vector(v)) {
            return Err("an MSI-X vector beyond the table".into());
        }
        if st.driver_features & !self.offered != 0 {
            return Err("driver features the device does not offer".into());
        }
        self.device.check_state(&st.device)?;
        Ok((st, queues))
    }

    fn bar_read_at(&mut self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if offset + len <= COMMON + COMMON_LEN {
            let b = self.common_bytes();
            data.copy_from_slice(&b[offset as usize..(offset + len) as usize]);
        } else if (ISR..ISR + 4).contains(&offset) {
            data.fill(0);
            if offset == ISR {
                data[0] = std::mem::take(&mut self.isr);
            }
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            self.device.read_config(offset - DEVICE_CFG, data);
        } else if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
            self.msix.table_read(offset - MSIX_TABLE, data);
        } else if (MSIX_PBA..BAR_SIZE).contains(&offset) {
            self.msix.pba_read(offset - MSIX_PBA, data);
        } else {
            data.fill(0);
        }
    }

    fn bar_write_at(&mut self, offset: u64, data: &[u8], io: &mut DeviceIo<'_>) {
        if offset + data.len() as u64 <= COMMON + COMMON_LEN {
            self.common_write(offset, data, io);
        } else if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&offset) {
            self.device.write_config(offset - DEVICE_CFG, data);
        } else if (NOTIFY..NOTIFY + 4 * self.queues.len() as u64).contains(&offset) {
            self.notify(((offset - NOTIFY) / 4) as usize, io);
        } else if (MSIX_TABLE..MSIX_PBA).contains(&offset) {
            let masked = self.config.msix_function_masked();
            for (a, d) in self.msix.table_write(offset - MSIX_TABLE, data, masked) {
                io.msi(a, d);
            }
        }
    }

    /// The window of the PCI configuration access capability: `(bar,
    /// offset, length)`.
    fn pci_cfg_window(&self) -> (u8, u32, u32) {
        let mut b = [0u8; 12];
        self.config.read(self.pci_cfg_cap + 4, &mut b);
        (
            b[0],
            u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        )
    }
}

impl PciDevice for VirtioPci {
    fn kind(&self) -> &'static str {
        self.device.kind()
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset >= CONFIG_SIZE {
            data.fill(0);
        } else if offset == window {
            // §4.1.4.9: an access of `length` bytes at `offset` in `bar`.
            let (bar, off, len) = self.pci_cfg_window();
            let len = len as usize;
            data.fill(0);
            if bar == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                self.bar_read_at(u64::from(off), &mut data[..len]);
            }
        } else {
            self.config.read(offset, data);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8], io: &mut DeviceIo<'_>) {
        let window = self.pci_cfg_cap + 16;
        if offset == window {
            let (bar, off, len) = self.pci_cfg_window();
            let len = len as usize;
            if bar == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                self.bar_write_at(u64::from(off), &data[..len], io);
            }
            return;
        }
        let was_masked = self.config.msix_function_masked() || !self.config.msix_enabled();
        self.config.write(offset, data);
        if was_masked && self.config.msix_enabled() && !self.config.msix_function_masked() {
            for (a, d) in self.msix.flush(false) {
                io.msi(a, d);
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8], _io: &mut DeviceIo<'_>) {
        if bar == 0 {
            self.bar_read_at(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8], io: &mut DeviceIo<'_>) {
        if bar == 0 {
            self.bar_write_at(offset, data, io);
        }
    }

    fn poll(&mut self, io: &mut DeviceIo<'_>) {
        let Some(mem) = self.memory(io.ram) else {
            return;
        };
        let mask = self.device.poll(&mut self.queues, &mem);
        if mask != 0 && self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt_queues(mask, &mem, io);
        }
    }

    fn in_flight(&self) -> usize {
        self.device.in_flight()
    }

    fn terminal_input(&mut self, bytes: &[u8], io: &mut DeviceIo<'_>) {
        let live = self.status & STATUS_DRIVER_OK != 0
            && self.status & STATUS_NEEDS_RESET == 0
            && self.config.command() & CMD_BUS_MASTER != 0;
        let Some(mem) = self.memory(io.ram) else {
            return;
        };
        let mut none: [Queue; 0] = [];
        let queues = if live {
            &mut self.queues[..]
        } else {
            &mut none[..]
        };
        let mask = self.device.terminal_input(bytes, queues, &mem);
        if mask != 0 {
            self.interrupt_queues(mask, &mem, io);
        }
    }

    fn terminal_pending(&self) -> usize {
        self.device.terminal_pending()
    }

    fn quiesce(&mut self, io: &mut DeviceIo<'_>) {
        self.device.drain();
        self.poll(io);
    }

    fn save(&self) -> Result<serde_json::Value, String> {
        if self.device.in_flight() > 0 {
            return Err("requests are in flight".into());
        }
        let st = TransportState {
            config: self.config.clone(),
            msix: self.msix.clone(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            config_vector: self.config_vector,
            status: self.status,
            queue_select: self.queue_select,
            isr: self.isr,
            queues: self
                .queues
                .iter()
                .map(|q| SavedQueue::of(&q.state()))
                .collect(),
            vectors: self.vectors.clone(),
            device: self.device.save(),
        };
        serde_json::to_value(st).map_err(|e| e.to_string())
    }

    fn check_state(&self, state: &serde_json::Value) -> Result<(), String> {
        self.parse_state(state).map(|_| ())
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), String> {
        let (st, queues) = self.parse_state(&state)?;
        self.config.restore_from(&st.config)?;
        self.msix = st.msix;
        self.device_feature_select = st.device_feature_select;
        self.driver_feature_select = st.driver_feature_select;
        self.driver_features = st.driver_features;
        self.config_vector = st.config_vector;
        self.status = st.status;
        self.queue_select = st.queue_select;
        self.isr = st.isr;
        self.queues = queues;
        self.vectors = st.vectors;
        self.mem = None;
        self.device.restore_device(&st.device);
        if self.status & STATUS_DRIVER_OK != 0 {
            self.device.activate(self.driver_features)?;
        }
        Ok(())
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let mut v = vec![
            ("notifications".to_string(), self.notifications),
            ("interrupts".to_string(), self.interrupts),
        ];
        v.extend(self.device.stats());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_driver::{Driver, AVAIL, DESC, QSIZE, RAM, USED, VECTOR_BASE, WRITE};
    use proptest::prelude::*;

    fn rng_driver() -> Driver {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.setup();
        d
    }

    #[test]
    fn identity_and_capabilities_are_what_linux_looks_for() {
        let mut d = Driver::new(Box::new(Rng::new()));
        assert_eq!(d.cfg_read(0, 4), 0x1044_1af4, "1AF4:1044, virtio-rng");
        assert!(d.cfg_read(8, 1) >= 1, "revision 1: modern only");
        assert_eq!(d.cfg_read(0x3d, 1), 0, "no INTx pin");
        // The vendor capabilities: common, notify, ISR, device, PCI cfg.
        let mut p = d.cfg_read(0x34, 1) as usize;
        let mut types = Vec::new();
        while p != 0 {
            if d.cfg_read(p, 1) == u64::from(CAP_VENDOR) {
                types.push(d.cfg_read(p + 3, 1) as u8);
                assert_eq!(d.cfg_read(p + 4, 1), 0, "all in BAR 0");
            }
            p = d.cfg_read(p + 1, 1) as usize;
        }
        assert_eq!(
            types,
            vec![CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI]
        );
        // BAR 0 sizes as 32 KiB, 64-bit.
        d.cfg_write(0x10, &[0xff; 4]);
        d.cfg_write(0x14, &[0xff; 4]);
        assert_eq!(d.cfg_read(0x10, 4), 0xffff_8004);
        assert_eq!(d.cfg_read(0x14, 4), 0xffff_ffff);
    }

    #[test]
    fn features_outside_the_offer_or_without_version_1_are_refused() {
        let mut d = Driver::new(Box::new(Rng::new()));
        let offered = d.device_features();
        assert_ne!(offered & features::VERSION_1, 0);
        assert!(!d.negotiate(offered | 1 << 40));
        d.bar_write(0x14, &[0]);
        assert_eq!(d.status(), 0, "reset");
        assert!(!d.negotiate(offered & !features::VERSION_1));
        d.bar_write(0x14, &[0]);
        assert!(d.negotiate(offered));
    }

    #[test]
    fn the_rng_fills_buffers_and_signals_its_vector() {
        let mut d = rng_driver();
        d.ram.fill(0x8000, 64, 0).unwrap();
        let head = d.submit(&[(0x8000, 32, WRITE), (0x9000, 32, WRITE)]);
        let used = d.used();
        assert_eq!(used, vec![(u32::from(head), 64)]);
        let mut b = [0u8; 32];
        d.ram.read(0x8000, &mut b).unwrap();
        assert_ne!(b, [0u8; 32], "random, not zeros");
        assert_eq!(d.msis, vec![(0xfee0_0000, VECTOR_BASE + 1)]);
        // The ISR says a queue interrupt, and reading clears it.
        assert_eq!(d.bar_read(ISR, 1), 1);
        assert_eq!(d.bar_read(ISR, 1), 0);
    }

    #[test]
    fn a_masked_vector_is_held_pending_and_sent_on_unmask() {
        let mut d = rng_driver();
        // Mask vector 1.
        d.bar_write(MSIX_TABLE + 16 + 12, &1u32.to_le_bytes());
        d.submit(&[(0x8000, 16, WRITE)]);
        assert_eq!(d.used().len(), 1);
        assert!(d.msis.is_empty());
        assert_eq!(d.bar_read(MSIX_PBA, 1), 0b10, "vector 1 pending");
        d.bar_write(MSIX_TABLE + 16 + 12, &0u32.to_le_bytes());
        assert_eq!(d.msis, vec![(0xfee0_0000, VECTOR_BASE + 1)]);
        assert_eq!(d.bar_read(MSIX_PBA, 1), 0);
    }

    #[test]
    fn bus_mastering_off_means_no_dma() {
        let mut d = rng_driver();
        d.cfg_write(0x04, &CMD_MEMORY_ONLY.to_le_bytes());
        d.submit(&[(0x8000, 16, WRITE)]);
        assert!(d.used().is_empty(), "the device may not touch memory");
        d.cfg_write(0x04, &(CMD_MEMORY_ONLY | CMD_BUS_MASTER).to_le_bytes());
        d.bar_write(NOTIFY, &0u16.to_le_bytes());
        assert_eq!(d.used().len(), 1);
    }

    const CMD_MEMORY_ONLY: u16 = popek_machine::pci_function::CMD_MEMORY;

    #[test]
    fn rings_outside_ram_make_the_device_ask_for_a_reset() {
        let mut d = Driver::new(Box::new(Rng::new()));
        d.setup();
        d.bar_write(0x14, &[0]);
        let f = d.device_features();
        assert!(d.negotiate(f & !features::RING_EVENT_IDX));
        d.setup_queue(0, QSIZE, (RAM - 16, AVAIL, USED));
        d.bar_write(0x14, &[1 | 2 | 8 | 4]);
        d.bar_write(NOTIFY, &0u16.to_le_bytes());
        assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
        assert_eq!(d.msis, vec![], "no configuration vector was set");
        // A reset brings it back.
        d.bar_write(0x14, &[0]);
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn the_pci_configuration_window_reaches_the_bar() {
        let mut d = Driver::new(Box::new(Rng::new()));
        let cap = d.dev.pci_cfg_cap;
        d.cfg_write(cap + 4, &[0]);
        d.cfg_write(cap + 8, &0x12u32.to_le_bytes());
        d.cfg_write(cap + 12, &2u32.to_le_bytes());
        assert_eq!(d.cfg_read(cap + 16, 4), 1, "num_queues through the window");
        d.cfg_write(cap + 8, &0x14u32.to_le_bytes());
        d.cfg_write(cap + 12, &1u32.to_le_bytes());
        d.cfg_write(cap + 16, &[1]);
        assert_eq!(d.status(), 1, "status written through the window");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("POPEK_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
        ))]

        /// A hostile driver: random descriptor tables, available rings,
        /// queue sizes and ring addresses. The device answers or asks for
        /// a reset, never panics or hangs, and a reset brings it back.
        #[test]
        fn hostile_rings_never_break_the_device(
            size in prop_oneof![Just(QSIZE), 0u16..300],
            desc_bytes in proptest::collection::vec(any::<u8>(), 256),
            avail in proptest::collection::vec(any::<u16>(), 1..20),
            avail_idx in any::<u16>(),
            ring_at in prop_oneof![Just(DESC), any::<u64>()],
            block in any::<bool>(),
        ) {
            let dev: Box<dyn VirtioDevice> = if block {
                let p = std::env::temp_dir().join(format!("popek-fuzz-{}.img", std::process::id()));
                std::fs::write(&p, vec![0x5a; 8 * 512]).unwrap();
                let b = crate::block::Block::open(&p, false, Default::default()).unwrap();
                let _ = std::fs::remove_file(&p);
                Box::new(b)
            } else {
                Box::new(Rng::new())
            };
            let mut d = Driver::new(dev);
            d.setup();
            d.bar_write(0x14, &[0]);
            let f = d.device_features();
            prop_assert!(d.negotiate(f));
            d.setup_queue(0, size, (ring_at, AVAIL, USED));
            d.bar_write(0x14, &[1 | 2 | 8 | 4]);
            // Descriptors point at random places, mostly inside RAM.
            d.ram.write(DESC, &desc_bytes).unwrap();
            for (i, a) in avail.iter().enumerate() {
                d.ram.write_u16(AVAIL + 4 + 2 * i as u64, *a).unwrap();
            }
            d.ram.write_u16(AVAIL + 2, avail_idx).unwrap();
            d.bar_write(NOTIFY, &0u16.to_le_bytes());
            let _ = d.used();
            let _ = d.status();
            d.bar_write(0x14, &[0]);
            prop_assert_eq!(d.status(), 0);
            prop_assert!(d.negotiate(f));
        }
    }
}
