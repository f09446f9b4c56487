//! Devices on PCI bus 0 beside the host bridge: the seam between the
//! machine and a device model (`popek-virtio`'s devices).
//!
//! A [`PciDevice`] presents a [`ConfigSpace`]; the machine routes
//! configuration accesses for its slot to it and memory or port accesses
//! inside its decoding BARs to [`PciDevice::bar_read`] /
//! [`PciDevice::bar_write`]. What a device signals comes back through
//! [`DeviceIo`]: MSI/MSI-X messages the machine delivers to the local
//! APICs.
//!
//! Devices that work off the vCPU thread (a disk's worker) ring the
//! machine's [`Doorbell`] when work is done; the machine then calls
//! [`PciDevice::poll`] at its next [`crate::Machine::advance`], and the
//! doorbell wakes whichever thread waits for a halted guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Thread;
use std::time::Duration;

use popek_memory::GuestRam;

use crate::pci_function::ConfigSpace;

/// What a device access may do beyond its own registers.
#[derive(Debug)]
pub struct DeviceIo<'a> {
    /// Guest RAM, for the device's DMA.
    pub ram: &'a Arc<GuestRam>,
    msis: Vec<(u64, u32)>,
}

impl<'a> DeviceIo<'a> {
    /// A context over `ram` with nothing signalled.
    pub fn new(ram: &'a Arc<GuestRam>) -> Self {
        DeviceIo {
            ram,
            msis: Vec::new(),
        }
    }

    /// Sends a message-signalled interrupt: `data` written to `address`.
    pub fn msi(&mut self, address: u64, data: u32) {
        self.msis.push((address, data));
    }

    /// The messages signalled so far.
    pub fn take_msis(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.msis)
    }
}

/// A function on PCI bus 0 (see the module docs). `Send`: the machine
/// moves between vCPU threads.
pub trait PciDevice: Send {
    /// What it is, for reports (`virtio-blk`).
    fn kind(&self) -> &'static str;

    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;

    /// A configuration read at `offset` (0–0xFFF; extended space beyond
    /// 0x100 reads 0 unless the device has some).
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if offset >= crate::pci_function::CONFIG_SIZE {
            data.fill(0);
        } else {
            self.config().read(offset, data);
        }
    }

    /// A configuration write at `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8], io: &mut DeviceIo<'_>);

    /// A read at `offset` into BAR `bar` (which decodes there).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8], io: &mut DeviceIo<'_>);

    /// A write at `offset` into BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8], io: &mut DeviceIo<'_>);

    /// Finishes work done off the vCPU thread (after the doorbell rang).
    fn poll(&mut self, _io: &mut DeviceIo<'_>) {}

    /// Requests still in flight off the vCPU thread.
    fn in_flight(&self) -> usize {
        0
    }

    /// Waits until nothing is in flight and finishes it (before a
    /// snapshot or at the end of the run).
    fn quiesce(&mut self, io: &mut DeviceIo<'_>) {
        self.poll(io);
    }

    /// The device's state for a snapshot (`Err`: it cannot be saved).
    fn save(&self) -> Result<serde_json::Value, String>;

    /// Whether `state` is one this device can take (nothing changes).
    fn check_state(&self, state: &serde_json::Value) -> Result<(), String>;

    /// Takes a saved state that [`check_state`](Self::check_state)
    /// accepted.
    fn restore(&mut self, state: serde_json::Value) -> Result<(), String>;

    /// Bytes from the terminal, for a device that is the VM's terminal
    /// (a console); others ignore them.
    fn terminal_input(&mut self, _bytes: &[u8], _io: &mut DeviceIo<'_>) {}

    /// Terminal bytes the guest has not taken yet.
    fn terminal_pending(&self) -> usize {
        0
    }

    /// Statistics for `--stats`: `(name, value)`.
    fn stats(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// Rung by device workers when they finished something (see the module
/// docs): wakes the threads that wait for a halted guest.
#[derive(Debug, Default)]
pub struct Doorbell {
    rung: AtomicBool,
    generation: Mutex<u64>,
    cv: Condvar,
    /// Threads parked while their vCPU is halted, by vCPU.
    threads: Mutex<Vec<Option<Thread>>>,
}

impl Doorbell {
    /// Rings: the machine polls its devices at its next advance, and every
    /// waiting thread wakes.
    pub fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        {
            let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
            *g = g.wrapping_add(1);
        }
        self.cv.notify_all();
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for t in threads.iter().flatten() {
            t.unpark();
        }
    }

    /// Whether it rang since the last call (and clears that).
    pub fn take(&self) -> bool {
        self.rung.swap(false, Ordering::AcqRel)
    }

    /// Whether it rang and nobody took that yet.
    pub fn rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }

    /// The calling thread runs vCPU `cpu` and parks when it is halted:
    /// a ring unparks it.
    pub fn watch(&self, cpu: usize) {
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        if threads.len() <= cpu {
            threads.resize(cpu + 1, None);
        }
        threads[cpu] = Some(std::thread::current());
    }

    /// Waits until it rings (returns at once if it rang since the last
    /// [`take`](Self::take)) or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        if self.rung() {
            return;
        }
        let seen = *g;
        let _ = self
            .cv
            .wait_timeout_while(g, timeout, |g| *g == seen)
            .unwrap_or_else(|e| e.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_ring_wakes_a_waiter_and_is_taken_once() {
        let bell = Arc::new(Doorbell::default());
        let b = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.ring();
        });
        let start = Instant::now();
        bell.wait(Duration::from_secs(10));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "woken by the ring"
        );
        t.join().unwrap();
        assert!(bell.take());
        assert!(!bell.take());
        // Rung before the wait: it returns at once.
        bell.ring();
        let start = Instant::now();
        bell.wait(Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_ring_unparks_the_watching_thread() {
        let bell = Arc::new(Doorbell::default());
        let b = bell.clone();
        let t = std::thread::spawn(move || {
            b.watch(1);
            let start = Instant::now();
            while !b.rung() && start.elapsed() < Duration::from_secs(10) {
                std::thread::park_timeout(Duration::from_secs(10));
            }
            start.elapsed()
        });
        while bell.threads.lock().unwrap().len() < 2 {
            std::thread::yield_now();
        }
        bell.ring();
        assert!(t.join().unwrap() < Duration::from_secs(5));
    }
}
