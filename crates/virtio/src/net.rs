//! virtio-net (virtio 1.2 §5.1) over a host TAP device.
//!
//! Two queues: receiveq (0) and transmitq (1); no control queue, one
//! queue pair. The TAP is opened with `IFF_VNET_HDR` and a 12-byte
//! header, which is virtio-net's own header (`virtio_net_hdr_v1`), so a
//! frame crosses between the guest's buffers and the TAP as it is:
//!
//! - **transmit**: on the driver's notification, each chain's bytes (header
//!   and frame) are one `write` to the TAP, on the vCPU thread;
//! - **receive**: a thread of the device waits on the TAP (`poll`), reads
//!   frames (with their header) into a bounded queue and rings the
//!   machine's doorbell; the machine puts them into the driver's receive
//!   buffers at its next advance. While the guest has no buffers the frames
//!   wait ([`RX_PENDING`] at most; the reader then stops reading, and the
//!   host's TAP queue holds the rest, as its length allows).
//!
//! Features: `MAC` (the address from `mac=`, or a locally administered
//! 52:54:00:xx:xx:xx one), `STATUS` (the link is up). No offloads yet: the
//! guest computes checksums and segments itself.
//!
//! The TAP is made when popek may (root, `CAP_NET_ADMIN`) and the name is
//! free — a device that goes away with popek, down and without an
//! address — or it is an existing one (`ip tuntap add dev NAME mode tap`,
//! addressed and up, as Firecracker expects).

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use popek_machine::pci_device::Doorbell;
use popek_memory::vm::VmMemory;
use popek_memory::GuestRam;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::{drain_queue, read_stream, write_stream, Buffers, VirtioDevice};

/// Descriptors per queue.
const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Received frames held for the guest at most.
pub const RX_PENDING: usize = 256;
/// virtio-net's header with `VERSION_1`.
pub const HEADER: usize = 12;
/// The largest frame with its header the device takes (no offloads:
/// 1514 bytes of Ethernet frame, with room for a VLAN tag).
const MAX_FRAME: usize = HEADER + 1518;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;

const TUNSETIFF: u64 = 0x4004_54ca;
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

/// Why a TAP cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The name cannot be a network interface's.
    #[error("{0:?}: a TAP name is 1 to 15 bytes without '/', whitespace or NUL")]
    Name(String),
    /// /dev/net/tun or the TAP cannot be opened.
    #[error("cannot open the TAP {name}: {source} (run as root to create it, or create it first: ip tuntap add dev {name} mode tap user $USER)")]
    Open {
        /// The TAP's name.
        name: String,
        /// The host's reason.
        source: std::io::Error,
    },
}

/// A TAP device with virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or, with the rights, creates) the TAP `name`.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        if name.is_empty()
            || name.len() > 15
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(NetError::Name(name.to_string()));
        }
        let err = |source| NetError::Open {
            name: name.to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(err)?;
        // struct ifreq: the name, then the flags (a short).
        let mut ifr = [0u8; 40];
        ifr[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which
        // `ifr` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let size: libc::c_int = HEADER as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &size) } < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Frames read from the TAP for the guest.
#[derive(Debug, Default)]
struct Rx {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// Signalled when the guest took frames (the reader may read again).
    room: Condvar,
}

/// Counters (`--stats`).
#[derive(Debug, Default)]
struct Counters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    dropped: AtomicU64,
}

/// The network device (see the module docs).
pub struct Net {
    tap: Arc<File>,
    name: String,
    mac: [u8; 6],
    rx: Arc<Rx>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    /// Wakes the reader from its `poll` (an eventfd).
    wake: Arc<OwnedFd>,
    reader: Option<JoinHandle<()>>,
    bell: Arc<Doorbell>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.name)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

/// A locally administered unicast address, 52:54:00 and three bytes that
/// differ between popek processes and devices.
pub fn default_mac(index: u8) -> [u8; 6] {
    let pid = std::process::id();
    [0x52, 0x54, 0x00, (pid >> 8) as u8, pid as u8, index]
}

/// Parses `aa:bb:cc:dd:ee:ff` (a unicast address).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!(
            "{s:?}: a MAC address is six hex bytes: 52:54:00:12:34:56"
        ));
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{s:?}: a multicast address cannot be a NIC's"));
    }
    Ok(mac)
}

impl Net {
    /// The device on `tap` with address `mac`; its reader rings `bell`.
    pub fn new(tap: Tap, mac: [u8; 6], bell: Arc<Doorbell>) -> Result<Net, NetError> {
        // SAFETY: eventfd with plain flags; the result is checked and owned.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(NetError::Open {
                name: tap.name.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
        let mut n = Net {
            tap: Arc::new(tap.file),
            name: tap.name,
            mac,
            rx: Arc::default(),
            counters: Arc::default(),
            stop: Arc::default(),
            wake,
            reader: None,
            bell,
        };
        n.start_reader();
        Ok(n)
    }

    fn start_reader(&mut self) {
        let (tap, rx, stop, wake, bell, counters) = (
            self.tap.clone(),
            self.rx.clone(),
            self.stop.clone(),
            self.wake.clone(),
            self.bell.clone(),
            self.counters.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("popek-virtio-net".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65_536 + HEADER];
                while !stop.load(Ordering::Acquire) {
                    // Room for a frame first: a guest that takes none
                    // leaves the rest in the host's TAP queue.
                    {
                        let g = rx.frames.lock().unwrap_or_else(|e| e.into_inner());
                        let _g = rx
                            .room
                            .wait_while(g, |f| {
                                f.len() >= RX_PENDING && !stop.load(Ordering::Acquire)
                            })
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    let mut fds = [
                        libc::pollfd {
                            fd: tap.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: wake.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: two valid pollfds.
                    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
                    if r <= 0 || fds[0].revents & libc::POLLIN == 0 {
                        continue;
                    }
                    // SAFETY: reading into our own buffer, within its length.
                    let n =
                        unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n <= HEADER as isize {
                        continue;
                    }
                    let frame = buf[..n as usize].to_vec();
                    counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    counters
                        .rx_bytes
                        .fetch_add((n as usize - HEADER) as u64, Ordering::Relaxed);
                    rx.frames
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(frame);
                    bell.ring();
                }
            })
            .expect("a thread for the network device");
        self.reader = Some(handle);
    }

    /// Puts waiting frames into the receive queue's buffers; whether a used
    /// buffer was added.
    fn deliver(&mut self, queue: &mut Queue, mem: &VmMemory) -> Result<bool, virtio_queue::Error> {
        let mut used = false;
        let mut frames = self.rx.frames.lock().unwrap_or_else(|e| e.into_inner());
        while !frames.is_empty() {
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let mut frame = frames.pop_front().expect("not empty");
            let len = match Buffers::of_chain(chain, mem) {
                Ok(b) if b.writable_len() >= frame.len() as u64 => {
                    // num_buffers: one buffer per frame (no MRG_RXBUF).
                    frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                    write_stream(mem, &b.writable, 0, &frame) as u32
                }
                _ => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        drop(frames);
        self.rx.room.notify_all();
        Ok(used)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.rx.room.notify_all();
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd wakes the reader's poll.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

impl VirtioDevice for Net {
    fn kind(&self) -> &'static str {
        "virtio-net"
    }

    fn device_type(&self) -> u16 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET as u16
    }

    fn pci_class(&self) -> [u8; 3] {
        [0x02, 0x00, 0x00]
    }

    fn features(&self) -> u64 {
        F_MAC | F_STATUS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status, max_virtqueue_pairs, mtu.
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&1500u16.to_le_bytes());
        crate::read_config_bytes(&c, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &VmMemory,
        _ram: &Arc<GuestRam>,
    ) -> Result<bool, virtio_queue::Error> {
        match index {
            RXQ => self.deliver(queue, mem),
            TXQ => {
                let tap = self.tap.clone();
                let counters = self.counters.clone();
                drain_queue(queue, mem, |chain| {
                    let sent = Buffers::of_chain(chain, mem).ok().and_then(|b| {
                        let n = b.readable_len() as usize;
                        if n <= HEADER || n > MAX_FRAME {
                            return None;
                        }
                        let mut data = vec![0u8; n];
                        read_stream(mem, &b.readable, &mut data).then_some(data)
                    });
                    match sent {
                        Some(data) if (&*tap).write_all(&data).is_ok() => {
                            counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                            counters
                                .tx_bytes
                                .fetch_add((data.len() - HEADER) as u64, Ordering::Relaxed);
                        }
                        _ => {
                            counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(0)
                })
            }
            _ => Ok(false),
        }
    }

    fn poll(&mut self, queues: &mut [Queue], mem: &VmMemory) -> u64 {
        match queues.get_mut(RXQ) {
            Some(q) if q.ready() => match self.deliver(q, mem) {
                Ok(true) => 1 << RXQ,
                _ => 0,
            },
            _ => 0,
        }
    }

    fn reset(&mut self) {
        // Frames for a driver that is gone.
        self.rx
            .frames
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.rx.room.notify_all();
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "mac": self.mac })
    }

    fn check_state(&self, state: &serde_json::Value) -> Result<(), String> {
        let mac: Option<[u8; 6]> = state
            .get("mac")
            .and_then(|m| serde_json::from_value(m.clone()).ok());
        match mac {
            Some(m) if m == self.mac => Ok(()),
            Some(_) => Err(
                "the snapshot's network device had another MAC address (give it with mac=)".into(),
            ),
            None => Err("not a virtio-net state".into()),
        }
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let c = &self.counters;
        vec![
            (
                "frames received".into(),
                c.rx_frames.load(Ordering::Relaxed),
            ),
            ("bytes received".into(), c.rx_bytes.load(Ordering::Relaxed)),
            ("frames sent".into(), c.tx_frames.load(Ordering::Relaxed)),
            ("bytes sent".into(), c.tx_bytes.load(Ordering::Relaxed)),
            ("frames dropped".into(), c.dropped.load(Ordering::Relaxed)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_driver::{Driver, AVAIL, DESC, Q1, WRITE};
    use popek_machine::pci_device::PciDevice;
    use std::time::{Duration, Instant};

    /// A device whose "TAP" is one end of a datagram socket pair: the
    /// test plays the host network on the other end.
    fn device() -> (Driver, std::os::unix::net::UnixDatagram) {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = File::from(OwnedFd::from(a));
        let tap = Tap {
            file,
            name: "test".into(),
        };
        let net = Net::new(tap, [0x52, 0x54, 0, 1, 2, 3], Arc::default()).unwrap();
        let mut d = Driver::new(Box::new(net));
        d.setup();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (d, b)
    }

    /// The used entries, once the reader thread has delivered something
    /// (or `limit` passed).
    fn used_within(d: &mut Driver, limit: Duration) -> Vec<(u32, u32)> {
        let t = Instant::now();
        loop {
            let u = d.used();
            if !u.is_empty() || t.elapsed() > limit {
                return u;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn frames_cross_in_both_directions_with_their_header() {
        let (mut d, host) = device();
        assert_eq!(
            d.bar_read(0x2000, 6).to_le_bytes()[..6],
            [0x52, 0x54, 0, 1, 2, 3]
        );
        // Receive: the guest offers a buffer, the host sends a frame.
        d.submit(&[(0x8000, 2048, WRITE)]);
        let mut frame = vec![0u8; HEADER];
        frame.extend((0..60).map(|i| i as u8));
        host.send(&frame).unwrap();
        let used = used_within(&mut d, Duration::from_secs(5));
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].1 as usize, frame.len());
        let mut got = vec![0u8; frame.len()];
        d.ram.read(0x8000, &mut got).unwrap();
        assert_eq!(&got[HEADER..], &frame[HEADER..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        // Transmit: a chain on queue 1 reaches the host whole.
        let out: Vec<u8> = (0..74u8).collect();
        d.ram.write(0x9000, &out).unwrap();
        let (desc, avail) = (DESC + Q1, AVAIL + Q1);
        d.ram.write_u64(desc, 0x9000).unwrap();
        d.ram.write_u32(desc + 8, out.len() as u32).unwrap();
        d.ram.write_u16(desc + 12, 0).unwrap();
        d.ram.write_u16(avail + 4, 0).unwrap();
        d.ram.write_u16(avail + 2, 1).unwrap();
        d.bar_write(0x3004, &1u16.to_le_bytes());
        let mut buf = [0u8; 2048];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &out[..]);
        let stats = d.dev.stats();
        let get = |k: &str| stats.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!((get("frames received"), get("frames sent")), (1, 1));
    }

    #[test]
    fn oversized_and_undersized_frames_are_dropped_not_delivered() {
        let (mut d, host) = device();
        // A receive buffer too small for the frame.
        d.submit(&[(0x8000, 32, WRITE)]);
        let mut frame = vec![0u8; HEADER + 100];
        frame[HEADER] = 0xaa;
        host.send(&frame).unwrap();
        let used = used_within(&mut d, Duration::from_secs(5));
        assert_eq!(used, vec![(0, 0)], "returned empty");
        // A transmit chain beyond the largest frame is not sent.
        let (desc, avail) = (DESC + Q1, AVAIL + Q1);
        d.ram.write_u64(desc, 0x9000).unwrap();
        d.ram.write_u32(desc + 8, 4000).unwrap();
        d.ram.write_u16(avail + 4, 0).unwrap();
        d.ram.write_u16(avail + 2, 1).unwrap();
        d.bar_write(0x3004, &1u16.to_le_bytes());
        host.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 8192];
        assert!(host.recv(&mut buf).is_err(), "nothing sent");
        let stats = d.dev.stats();
        assert_eq!(
            stats.iter().find(|(n, _)| n == "frames dropped").unwrap().1,
            2
        );
    }
}
