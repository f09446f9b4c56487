//! virtio-rng (virtio 1.2 §5.4): the guest's `/dev/hwrng`, filled from
//! the host's `getrandom(2)`.
//!
//! One queue; every device-writable buffer the driver offers comes back
//! full of random bytes (at most [`MAX_REQUEST`] per request, so that a
//! request costs the vCPU thread little). No configuration space, no
//! feature bits.

use std::sync::Arc;

use popek_memory::vm::VmMemory;
use popek_memory::GuestRam;
use virtio_queue::Queue;

use crate::{drain_queue, write_stream, Buffers, VirtioDevice};

/// The most bytes one request gets.
pub const MAX_REQUEST: usize = 64 << 10;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    bytes: u64,
    requests: u64,
}

impl Rng {
    /// A new device.
    pub fn new() -> Rng {
        Rng::default()
    }
}

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of
        // `buf`, which we own mutably.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn kind(&self) -> &'static str {
        "virtio-rng"
    }

    fn device_type(&self) -> u16 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG as u16
    }

    fn pci_class(&self) -> [u8; 3] {
        [0xff, 0x00, 0x00]
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &VmMemory,
        _ram: &Arc<GuestRam>,
    ) -> Result<bool, virtio_queue::Error> {
        drain_queue(queue, mem, |chain| {
            self.requests += 1;
            let b = match Buffers::of_chain(chain, mem) {
                Ok(b) => b,
                Err(why) => {
                    tracing::debug!("virtio-rng: request refused: {why}");
                    return Some(0);
                }
            };
            let n = (b.writable_len() as usize).min(MAX_REQUEST);
            let mut buf = vec![0u8; n];
            if !getrandom(&mut buf) {
                return Some(0);
            }
            let written = write_stream(mem, &b.writable, 0, &buf);
            self.bytes += written as u64;
            Some(written as u32)
        })
    }

    fn reset(&mut self) {}

    fn stats(&self) -> Vec<(String, u64)> {
        vec![
            ("requests".into(), self.requests),
            ("random bytes".into(), self.bytes),
        ]
    }
}
