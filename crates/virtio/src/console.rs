//! virtio-console (virtio 1.2 §5.3): one port, the guest's `hvc0`.
//!
//! Two queues: receiveq (0), which the driver fills with empty buffers
//! the device puts terminal input in, and transmitq (1), whose buffers
//! carry the guest's output to the host. No feature bits (no multiport,
//! no console size): Linux's `virtio_console` makes port 0 `hvc0`.
//!
//! Input waits in the device ([`MAX_PENDING`] bytes at most; a VMM stops
//! reading its terminal while [`Console::pending`] is large) until the
//! driver offers buffers; output goes to the writer the device was made
//! with (the terminal, a file, nothing), on the vCPU thread that notified.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use popek_memory::vm::VmMemory;
use popek_memory::GuestRam;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::{drain_queue, read_stream, write_stream, Buffers, VirtioDevice};

/// Input bytes the device holds at most; more are dropped.
pub const MAX_PENDING: usize = 1 << 20;
/// Descriptors per queue.
const QUEUE_SIZE: u16 = 64;
const RECEIVEQ: usize = 0;
const TRANSMITQ: usize = 1;

/// The console device.
pub struct Console {
    out: Box<dyn Write + Send>,
    input: VecDeque<u8>,
    bytes_in: u64,
    bytes_out: u64,
    dropped: u64,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending", &self.input.len())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console whose output goes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Console {
        Console {
            out,
            input: VecDeque::new(),
            bytes_in: 0,
            bytes_out: 0,
            dropped: 0,
        }
    }

    /// Input bytes waiting for the driver's buffers.
    pub fn pending(&self) -> usize {
        self.input.len()
    }

    /// Takes terminal input (dropping what exceeds [`MAX_PENDING`]).
    pub fn push_input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING.saturating_sub(self.input.len());
        let take = bytes.len().min(room);
        self.input.extend(&bytes[..take]);
        self.dropped += (bytes.len() - take) as u64;
    }

    /// Puts waiting input in the receive queue's buffers; whether a used
    /// buffer was added.
    pub fn fill(&mut self, queue: &mut Queue, mem: &VmMemory) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        while !self.input.is_empty() {
            // One buffer at a time: input may run out before the ring does.
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let len = match Buffers::of_chain(chain, mem) {
                Ok(b) => {
                    let n = (b.writable_len() as usize).min(self.input.len());
                    let bytes: Vec<u8> = self.input.drain(..n).collect();
                    let w = write_stream(mem, &b.writable, 0, &bytes);
                    self.bytes_in += w as u64;
                    w as u32
                }
                Err(why) => {
                    tracing::debug!("virtio-console: receive buffer refused: {why}");
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Console {
    fn kind(&self) -> &'static str {
        "virtio-console"
    }

    fn device_type(&self) -> u16 {
        virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE as u16
    }

    fn pci_class(&self) -> [u8; 3] {
        // Simple communication controller, other.
        [0x07, 0x80, 0x00]
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &VmMemory,
        _ram: &Arc<GuestRam>,
    ) -> Result<bool, virtio_queue::Error> {
        match index {
            RECEIVEQ => self.fill(queue, mem),
            TRANSMITQ => {
                let r = drain_queue(queue, mem, |chain| {
                    match Buffers::of_chain(chain, mem) {
                        Ok(b) => {
                            let mut data = vec![0u8; b.readable_len() as usize];
                            if read_stream(mem, &b.readable, &mut data) {
                                self.bytes_out += data.len() as u64;
                                if self.out.write_all(&data).is_err() {
                                    tracing::debug!("virtio-console: output lost");
                                }
                            }
                        }
                        Err(why) => {
                            tracing::debug!("virtio-console: transmit buffer refused: {why}")
                        }
                    }
                    Some(0)
                });
                let _ = self.out.flush();
                r
            }
            _ => Ok(false),
        }
    }

    fn reset(&mut self) {}

    fn terminal_input(&mut self, bytes: &[u8], queues: &mut [Queue], mem: &VmMemory) -> u64 {
        self.push_input(bytes);
        match queues.get_mut(RECEIVEQ) {
            Some(q) if q.ready() => match self.fill(q, mem) {
                Ok(true) => 1 << RECEIVEQ,
                Ok(false) => 0,
                Err(e) => {
                    tracing::debug!("virtio-console: receive queue: {e}");
                    0
                }
            },
            _ => 0,
        }
    }

    fn terminal_pending(&self) -> usize {
        self.input.len()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "input": self.input.iter().copied().collect::<Vec<u8>>() })
    }

    fn check_state(&self, state: &serde_json::Value) -> Result<(), String> {
        match state.get("input").and_then(serde_json::Value::as_array) {
            Some(a)
                if a.len() <= MAX_PENDING
                    && a.iter().all(|v| v.as_u64().is_some_and(|b| b < 256)) =>
            {
                Ok(())
            }
            _ => Err("not a virtio-console state".into()),
        }
    }

    fn restore_device(&mut self, state: &serde_json::Value) {
        self.input = state
            .get("input")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|b| b as u8)
                    .collect()
            })
            .unwrap_or_default();
    }

    fn stats(&self) -> Vec<(String, u64)> {
        vec![
            ("bytes in".into(), self.bytes_in),
            ("bytes out".into(), self.bytes_out),
            ("input dropped".into(), self.dropped),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_driver::{Driver, AVAIL, DESC, Q1, WRITE};
    use popek_machine::pci_device::{DeviceIo, PciDevice};
    use std::sync::Mutex;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn input_waits_for_buffers_and_output_reaches_the_writer() {
        let out = Shared::default();
        let mut d = Driver::new(Box::new(Console::new(Box::new(out.clone()))));
        d.setup();
        // Input before the driver has buffers waits in the device.
        let ram = d.ram.clone();
        d.dev.terminal_input(b"hello", &mut DeviceIo::new(&ram));
        assert_eq!(d.dev.terminal_pending(), 5);
        d.submit(&[(0x8000, 3, WRITE)]);
        d.submit(&[(0x8100, 64, WRITE)]);
        let used = d.used();
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![3, 2]);
        let mut b = [0u8; 3];
        d.ram.read(0x8000, &mut b).unwrap();
        assert_eq!(&b, b"hel");
        assert_eq!(d.dev.terminal_pending(), 0);
        // Output: a chain on the transmit queue.
        d.ram.write(0x9000, b"from hvc0\n").unwrap();
        let (desc, avail) = (DESC + Q1, AVAIL + Q1);
        d.ram.write_u64(desc, 0x9000).unwrap();
        d.ram.write_u32(desc + 8, 10).unwrap();
        d.ram.write_u16(desc + 12, 0).unwrap();
        d.ram.write_u16(avail + 4, 0).unwrap();
        d.ram.write_u16(avail + 2, 1).unwrap();
        d.bar_write(0x3004, &1u16.to_le_bytes());
        assert_eq!(&out.0.lock().unwrap()[..], b"from hvc0\n");
        // Input beyond the cap is dropped, not kept.
        let big = vec![b'x'; MAX_PENDING + 10];
        d.dev.terminal_input(&big, &mut DeviceIo::new(&ram));
        assert!(d.dev.terminal_pending() <= MAX_PENDING);
    }
}
