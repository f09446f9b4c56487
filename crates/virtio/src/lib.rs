//! virtio devices for popek (virtio 1.2, OASIS): the PCI transport and
//! the devices behind it.
//!
//! - [`pci::VirtioPci`]: the modern virtio-pci transport (§4.1) — the
//!   vendor capabilities that point into one memory BAR (common, notify,
//!   ISR and device configuration), MSI-X for the queues and the
//!   configuration change, and the PCI configuration access capability.
//!   It is a [`popek_machine::pci_device::PciDevice`]: the machine routes
//!   configuration and BAR accesses to it.
//! - [`block::Block`]: virtio-blk (§5.2) over a raw image file, its I/O
//!   on a worker thread of its own.
//! - [`rng::Rng`]: virtio-rng (§5.4), the host's `getrandom`.
//!
//! The rings are rust-vmm's `virtio-queue` over a `vm-memory` view of
//! guest RAM ([`popek_memory::vm`]); descriptors a guest driver gets wrong
//! (out of RAM, loops, wrong direction, short headers) end in an error
//! status for that request or the device asking for a reset — never in
//! an access outside guest RAM.

pub mod block;
pub mod console;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
mod test_driver;

use std::sync::Arc;

use popek_memory::vm::VmMemory;
use popek_memory::GuestRam;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// Device-independent feature bits the transport offers.
pub mod features {
    /// Virtio 1.x (a modern device: little-endian, no legacy interface).
    pub const VERSION_1: u64 = 1 << 32;
    /// Descriptors may point to indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// The used and available event indexes suppress notifications.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// The device side of a virtio device: what it is, its configuration
/// space and its queues. The transport ([`pci::VirtioPci`]) does the rest.
pub trait VirtioDevice: Send {
    /// Its name in reports (`virtio-blk`).
    fn kind(&self) -> &'static str;

    /// Its virtio device ID (§5: 1 network, 2 block, 4 entropy…).
    fn device_type(&self) -> u16;

    /// PCI class code: base class, subclass, programming interface.
    fn pci_class(&self) -> [u8; 3];

    /// Device-specific feature bits it offers (the transport adds
    /// [`features::VERSION_1`] and the ring features).
    fn features(&self) -> u64;

    /// The most descriptors each of its queues takes.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Reads its configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes its configuration space (most fields are read-only).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver is ready (DRIVER_OK) with the features it accepted.
    fn activate(&mut self, _features: u64) -> Result<(), String> {
        Ok(())
    }

    /// The driver notified queue `index`: take what it made available.
    /// Returns whether used buffers were added (the transport then decides
    /// on an interrupt). `ram` is what `mem` views, for work done off the
    /// vCPU thread.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &VmMemory,
        ram: &Arc<GuestRam>,
    ) -> Result<bool, virtio_queue::Error>;

    /// Work finished off the vCPU thread: put it in the used rings.
    /// Returns a bit per queue that got used buffers.
    fn poll(&mut self, _queues: &mut [Queue], _mem: &VmMemory) -> u64 {
        0
    }

    /// Requests in flight off the vCPU thread.
    fn in_flight(&self) -> usize {
        0
    }

    /// Waits until nothing is in flight (the transport then polls).
    fn drain(&mut self) {}

    /// The device reset (status 0): forget the activation. Nothing is in
    /// flight (the transport drained first).
    fn reset(&mut self);

    /// Its own state for a snapshot, beyond the transport's (nothing is
    /// in flight then).
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    /// Whether a saved [`save`](Self::save) fits this device (the same
    /// disk size, say).
    fn check_state(&self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    /// Takes back what [`save`](Self::save) kept (after
    /// [`check_state`](Self::check_state) accepted it).
    fn restore_device(&mut self, _state: &serde_json::Value) {}

    /// Terminal input for a device that is the VM's terminal (a console):
    /// returns a bit per queue that got used buffers. Others ignore it.
    fn terminal_input(&mut self, _bytes: &[u8], _queues: &mut [Queue], _mem: &VmMemory) -> u64 {
        0
    }

    /// Terminal input not yet taken by the guest.
    fn terminal_pending(&self) -> usize {
        0
    }

    /// Counters for `--stats`.
    fn stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// A descriptor chain's buffers: what the device reads, then what it
/// writes, as guest-physical `(address, length)` pieces, each inside RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Buffers {
    /// Device-readable pieces, in order.
    pub readable: Vec<(u64, u32)>,
    /// Device-writable pieces, in order.
    pub writable: Vec<(u64, u32)>,
}

/// The most bytes one chain may describe (a guest cannot make the device
/// hold more than this for one request).
pub const MAX_CHAIN_BYTES: u64 = 64 << 20;

impl Buffers {
    /// Collects `chain`'s descriptors (indirect tables followed by
    /// `virtio-queue`, loops cut by it). Refused: a piece outside guest
    /// RAM, a readable piece after a writable one (§2.7.4.2), more than
    /// [`MAX_CHAIN_BYTES`].
    pub fn of_chain(
        chain: virtio_queue::DescriptorChain<&VmMemory>,
        mem: &VmMemory,
    ) -> Result<Buffers, String> {
        use vm_memory::{GuestAddress, GuestMemoryBackend};
        let mut b = Buffers::default();
        let mut total = 0u64;
        for d in chain {
            let (addr, len) = (d.addr().0, d.len());
            if len == 0 {
                continue;
            }
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(format!("buffer {addr:#x}+{len:#x} is outside guest RAM"));
            }
            total += u64::from(len);
            if total > MAX_CHAIN_BYTES {
                return Err(format!(
                    "the chain describes more than {MAX_CHAIN_BYTES} bytes"
                ));
            }
            if d.is_write_only() {
                b.writable.push((addr, len));
            } else if b.writable.is_empty() {
                b.readable.push((addr, len));
            } else {
                return Err("a device-readable buffer follows a device-writable one".into());
            }
        }
        Ok(b)
    }

    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|&(_, l)| u64::from(l)).sum()
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|&(_, l)| u64::from(l)).sum()
    }
}

/// The pieces of `pieces` covering bytes `from..from + len` of the
/// stream they make (shorter where the stream ends first).
pub fn sub_range(pieces: &[(u64, u32)], from: u64, len: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = from.saturating_add(len);
    for &(addr, l) in pieces {
        let (start, stop) = (pos, pos + u64::from(l));
        pos = stop;
        let a = start.max(from);
        let b = stop.min(end);
        if a < b {
            out.push((addr + (a - start), (b - a) as u32));
        }
        if pos >= end {
            break;
        }
    }
    out
}

/// Reads `buf.len()` bytes from the stream `pieces` make, from its
/// start; false when it is shorter.
pub fn read_stream(mem: &VmMemory, pieces: &[(u64, u32)], buf: &mut [u8]) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let mut at = 0usize;
    for (addr, l) in sub_range(pieces, 0, buf.len() as u64) {
        if mem
            .read_slice(&mut buf[at..at + l as usize], GuestAddress(addr))
            .is_err()
        {
            return false;
        }
        at += l as usize;
    }
    at == buf.len()
}

/// Writes `data` into the stream `pieces` make, from byte `from`;
/// returns the bytes written.
pub fn write_stream(mem: &VmMemory, pieces: &[(u64, u32)], from: u64, data: &[u8]) -> usize {
    use vm_memory::{Bytes, GuestAddress};
    let mut at = 0usize;
    for (addr, l) in sub_range(pieces, from, data.len() as u64) {
        if mem
            .write_slice(&data[at..at + l as usize], GuestAddress(addr))
            .is_err()
        {
            break;
        }
        at += l as usize;
    }
    at
}

/// Copies `config[offset..]` into `data` (a device's configuration
/// space; beyond its end: zeros).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// Takes every available chain of `queue`, handing each to `serve`
/// (which returns the bytes it wrote, or `None` when it finishes the chain
/// later, off this thread), with notifications suppressed meanwhile and
/// re-checked at the end, as §2.7.10 asks. Returns whether a used buffer
/// was added.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &VmMemory,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&VmMemory>) -> Option<u32>,
) -> Result<bool, virtio_queue::Error> {
    let mut used = false;
    loop {
        queue.disable_notification(mem)?;
        // `iter` refuses an available index more than a ring ahead.
        let chains: Vec<_> = queue.iter(mem)?.collect();
        if chains.is_empty() {
            // Nothing could be taken: whatever the index says, stop here
            // (a loop on a ring the driver corrupted would never end).
            queue.enable_notification(mem)?;
            return Ok(used);
        }
        for chain in chains {
            let head = chain.head_index();
            if let Some(len) = serve(chain) {
                queue.add_used(mem, head, len)?;
                used = true;
            }
        }
        if !queue.enable_notification(mem)? {
            return Ok(used);
        }
    }
}
