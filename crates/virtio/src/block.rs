//! virtio-blk (virtio 1.2 §5.2) over a raw image file.
//!
//! One request queue of 256 descriptors. The vCPU thread only takes a
//! request apart (header, data pieces, status byte) and checks it; the
//! reads, writes, flushes and discards run on the device's worker thread,
//! which copies between the file and guest RAM with `pread`/`pwrite`
//! and rings the machine's doorbell when a request is done — so a slow
//! disk never stalls the guest's vCPU or its timer.
//!
//! | request | what the host does |
//! |---|---|
//! | `IN`, `OUT` | `pread`/`pwrite` at sector · 512 |
//! | `FLUSH` | `fdatasync` |
//! | `GET_ID` | the serial (the image's file name, 20 bytes at most) |
//! | `DISCARD` | `fallocate(PUNCH_HOLE)` (a file system without it: nothing) |
//! | `WRITE_ZEROES` | `fallocate(ZERO_RANGE)`, or `PUNCH_HOLE` when the driver allows unmapping; else written zeros |
//!
//! A read-only disk (`readonly=on`) offers `VIRTIO_BLK_F_RO` and fails
//! writes, discards and zeroing with `IOERR`. Requests beyond the disk's
//! end, data not in whole sectors, and malformed chains get `IOERR`
//! (or nothing at all, when the chain has no status byte to say it in).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use popek_machine::pci_device::Doorbell;
use popek_memory::vm::VmMemory;
use popek_memory::GuestRam;
use virtio_bindings::virtio_blk as vb;
use virtio_queue::{Queue, QueueT};

use crate::{drain_queue, read_stream, sub_range, write_stream, Buffers, VirtioDevice};

/// Bytes per sector, whatever the image's block size.
pub const SECTOR: u64 = 512;
/// Descriptors in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most segments of one discard or write-zeroes request.
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// The most sectors one discard or write-zeroes segment covers.
const MAX_DISCARD_SECTORS: u32 = u32::MAX / 512;

/// Why a disk cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened.
    #[error("cannot open the disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The host's reason.
        source: std::io::Error,
    },
    /// The image's size is not whole sectors.
    #[error("the disk image {path} is {size} bytes, not a multiple of 512: a virtio disk has whole sectors")]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process has the image open for writing.
    #[error("the disk image {path} is in use by another process (it holds a lock on it)")]
    Locked {
        /// The image.
        path: PathBuf,
    },
}

/// What a request asks.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    GetId,
    /// Segments: first sector, sectors, flags.
    Discard(Vec<(u64, u32, u32)>),
    WriteZeroes(Vec<(u64, u32, u32)>),
}

/// A checked request for the worker.
#[derive(Debug)]
struct Job {
    queue: usize,
    head: u16,
    op: Op,
    sector: u64,
    /// The data pieces (read from or written to guest RAM).
    data: Vec<(u64, u32)>,
    /// Where the status byte goes.
    status: u64,
    ram: Arc<GuestRam>,
}

/// What the worker hands back.
#[derive(Debug, Default)]
struct Done {
    /// Queue, head, bytes written to the guest.
    completions: Vec<(usize, u16, u32)>,
    in_flight: usize,
}

#[derive(Debug, Default)]
struct Shared {
    done: Mutex<Done>,
    cv: Condvar,
}

/// Counters (`--stats`).
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    reads: u64,
    writes: u64,
    read_bytes: u64,
    written_bytes: u64,
    flushes: u64,
    discards: u64,
    errors: u64,
}

/// The block device (see the module docs).
pub struct Block {
    path: PathBuf,
    file: Arc<File>,
    readonly: bool,
    sectors: u64,
    serial: Vec<u8>,
    bell: Arc<Doorbell>,
    shared: Arc<Shared>,
    worker: Option<(Sender<Job>, JoinHandle<()>)>,
    counters: Arc<Mutex<Counters>>,
    /// Requests refused on the vCPU thread.
    refused: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.path)
            .field("readonly", &self.readonly)
            .field("sectors", &self.sectors)
            .finish_non_exhaustive()
    }
}

/// Status bytes.
const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

impl Block {
    /// Opens the raw image at `path` (read-only when `readonly`); its
    /// worker rings `bell`. The image is locked against other writers
    /// (`flock`: shared for read-only, exclusive otherwise).
    pub fn open(path: &Path, readonly: bool, bell: Arc<Doorbell>) -> Result<Block, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() && !meta.file_type().is_block_device_like() {
            return Err(open_err(std::io::Error::other(
                "not a regular file or block device",
            )));
        }
        let size = file_size(&file).map_err(open_err)?;
        if size % SECTOR != 0 {
            return Err(DiskError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        let how = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked {
                path: path.to_path_buf(),
            });
        }
        let mut serial: Vec<u8> = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned().into_bytes())
            .unwrap_or_default();
        serial.truncate(vb::VIRTIO_BLK_ID_BYTES as usize);
        Ok(Block {
            path: path.to_path_buf(),
            file: Arc::new(file),
            readonly,
            sectors: size / SECTOR,
            serial,
            bell,
            shared: Arc::default(),
            worker: None,
            counters: Arc::default(),
            refused: 0,
        })
    }

    /// The disk's size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn config_bytes(&self) -> [u8; 0x3c] {
        let mut c = [0u8; 0x3c];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0x00, &self.sectors.to_le_bytes());
        put(0x0c, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(0x14, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x28, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(0x2c, &1u32.to_le_bytes()); // discard_sector_alignment
        put(0x30, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x34, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[0x38] = 1; // write_zeroes_may_unmap
        c
    }

    /// The worker, started on first use.
    fn sender(&mut self) -> &Sender<Job> {
        if self.worker.is_none() {
            let (tx, rx) = channel::<Job>();
            let file = self.file.clone();
            let shared = self.shared.clone();
            let bell = self.bell.clone();
            let counters = self.counters.clone();
            let serial = self.serial.clone();
            let handle = std::thread::Builder::new()
                .name("popek-virtio-blk".into())
                .spawn(move || {
                    for job in rx {
                        let len = execute(&job, &file, &serial, &counters);
                        let mut d = shared.done.lock().unwrap_or_else(|e| e.into_inner());
                        d.completions.push((job.queue, job.head, len));
                        d.in_flight -= 1;
                        drop(d);
                        shared.cv.notify_all();
                        bell.ring();
                    }
                })
                .expect("a thread for the disk");
            self.worker = Some((tx, handle));
        }
        &self.worker.as_ref().expect("started").0
    }

    /// Takes one chain apart; `Err` carries the status to answer at once
    /// (with where it goes), `Ok` the job for the worker.
    fn parse(
        &self,
        index: usize,
        head: u16,
        b: &Buffers,
        mem: &VmMemory,
        ram: &Arc<GuestRam>,
    ) -> Result<Job, (Option<u64>, u8, u32)> {
        // The status byte is the last writable byte.
        let wlen = b.writable_len();
        let status = sub_range(&b.writable, wlen.saturating_sub(1), 1)
            .first()
            .map(|&(a, _)| a);
        let Some(status_addr) = status else {
            return Err((None, S_IOERR, 0));
        };
        let fail = |s: u8| Err((Some(status_addr), s, 1));
        let mut hdr = [0u8; 16];
        if !read_stream(mem, &b.readable, &mut hdr) {
            return fail(S_IOERR);
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        let rlen = b.readable_len();
        let (op, data) = match ty {
            vb::VIRTIO_BLK_T_IN => (Op::Read, sub_range(&b.writable, 0, wlen - 1)),
            vb::VIRTIO_BLK_T_OUT => (Op::Write, sub_range(&b.readable, 16, rlen - 16)),
            vb::VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new()),
            vb::VIRTIO_BLK_T_GET_ID => (Op::GetId, sub_range(&b.writable, 0, wlen - 1)),
            vb::VIRTIO_BLK_T_DISCARD | vb::VIRTIO_BLK_T_WRITE_ZEROES => {
                let n = (rlen - 16) / 16;
                if (rlen - 16) % 16 != 0 || n == 0 || n > u64::from(MAX_DISCARD_SEGMENTS) {
                    return fail(S_IOERR);
                }
                let mut raw = vec![0u8; (16 + n * 16) as usize];
                if !read_stream(mem, &b.readable, &mut raw) {
                    return fail(S_IOERR);
                }
                let mut segs = Vec::new();
                for s in raw[16..].chunks_exact(16) {
                    let first = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
                    let count = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
                    let inside = first
                        .checked_add(u64::from(count))
                        .is_some_and(|end| end <= self.sectors);
                    if !inside || count > MAX_DISCARD_SECTORS {
                        return fail(S_IOERR);
                    }
                    // Discard has no flags; write-zeroes has only UNMAP.
                    let allowed = if ty == vb::VIRTIO_BLK_T_DISCARD {
                        0
                    } else {
                        vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    if flags & !allowed != 0 {
                        return fail(S_UNSUPP);
                    }
                    segs.push((first, count, flags));
                }
                if ty == vb::VIRTIO_BLK_T_DISCARD {
                    (Op::Discard(segs), Vec::new())
                } else {
                    (Op::WriteZeroes(segs), Vec::new())
                }
            }
            _ => return fail(S_UNSUPP),
        };
        let writes = matches!(op, Op::Write | Op::Discard(_) | Op::WriteZeroes(_));
        if writes && self.readonly {
            return fail(S_IOERR);
        }
        if matches!(op, Op::Read | Op::Write) {
            let bytes: u64 = data.iter().map(|&(_, l)| u64::from(l)).sum();
            let inside = sector
                .checked_add(bytes / SECTOR)
                .is_some_and(|end| end <= self.sectors);
            if bytes % SECTOR != 0 || !inside {
                return fail(S_IOERR);
            }
        }
        Ok(Job {
            queue: index,
            head,
            op,
            sector,
            data,
            status: status_addr,
            ram: ram.clone(),
        })
    }
}

/// `is_block_device` for `Metadata` without the Unix trait in scope
/// everywhere.
trait BlockDeviceLike {
    fn is_block_device_like(&self) -> bool;
}

impl BlockDeviceLike for std::fs::FileType {
    fn is_block_device_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_block_device()
    }
}

/// The file's size (a block device's too).
fn file_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Runs one job on the worker thread; returns the bytes written to the
/// guest (data and the status byte).
fn execute(job: &Job, file: &File, serial: &[u8], counters: &Mutex<Counters>) -> u32 {
    let fd = file.as_raw_fd();
    let ram = &job.ram;
    let mut written_to_guest = 0u32;
    // Checked against the disk's size for reads and writes only: a
    // flush or get-id may carry any sector.
    let mut pos = job.sector.wrapping_mul(SECTOR);
    let status = match &job.op {
        Op::Read | Op::Write => {
            let read = job.op == Op::Read;
            let mut ok = true;
            for &(addr, len) in &job.data {
                // Checked on the vCPU thread against this RAM; checked
                // again here, where the pointer is made.
                if addr
                    .checked_add(u64::from(len))
                    .is_none_or(|e| e > ram.size())
                {
                    ok = false;
                    break;
                }
                // SAFETY: `addr + len` is inside the RAM's mapping, which
                // `job.ram` keeps alive; the guest may race with the
                // copy, as it may with a DMA engine.
                let ptr = unsafe { ram.host_ptr().add(addr as usize) };
                let r = if read {
                    pread_full(fd, ptr, len as usize, pos)
                } else {
                    pwrite_full(fd, ptr, len as usize, pos)
                };
                if read {
                    ram.note_external_write(addr, u64::from(len));
                }
                if r.is_err() {
                    ok = false;
                    break;
                }
                pos += u64::from(len);
                if read {
                    written_to_guest += len;
                }
            }
            let bytes = pos.wrapping_sub(job.sector.wrapping_mul(SECTOR));
            let mut c = counters.lock().unwrap_or_else(|e| e.into_inner());
            if read {
                c.reads += 1;
                c.read_bytes += bytes;
            } else {
                c.writes += 1;
                c.written_bytes += bytes;
            }
            if ok {
                S_OK
            } else {
                S_IOERR
            }
        }
        Op::Flush => {
            counters.lock().unwrap_or_else(|e| e.into_inner()).flushes += 1;
            if file.sync_data().is_ok() {
                S_OK
            } else {
                S_IOERR
            }
        }
        Op::GetId => {
            let mut id = [0u8; vb::VIRTIO_BLK_ID_BYTES as usize];
            id[..serial.len()].copy_from_slice(serial);
            let mut at = 0usize;
            for &(addr, len) in &job.data {
                let n = (len as usize).min(id.len() - at);
                if n == 0 || ram.write(addr, &id[at..at + n]).is_err() {
                    break;
                }
                at += n;
            }
            written_to_guest += at as u32;
            S_OK
        }
        Op::Discard(segs) | Op::WriteZeroes(segs) => {
            counters.lock().unwrap_or_else(|e| e.into_inner()).discards += 1;
            let zero = matches!(job.op, Op::WriteZeroes(_));
            let ok = segs.iter().all(|&(first, count, flags)| {
                let (off, len) = (first * SECTOR, u64::from(count) * SECTOR);
                if zero {
                    zero_range(
                        fd,
                        off,
                        len,
                        flags & vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    )
                } else {
                    // Advisory: a file system that cannot punch holes
                    // keeps the data, which discard allows.
                    let _ = fallocate(
                        fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off,
                        len,
                    );
                    true
                }
            });
            if ok {
                S_OK
            } else {
                S_IOERR
            }
        }
    };
    if status != S_OK {
        counters.lock().unwrap_or_else(|e| e.into_inner()).errors += 1;
    }
    if ram.write_u8(job.status, status).is_ok() {
        written_to_guest += 1;
    }
    written_to_guest
}

fn fallocate(fd: i32, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with plain integers.
    let r = unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Zeroes `len` bytes at `off`: the cheapest way the file system has.
fn zero_range(fd: i32, off: u64, len: u64, unmap: bool) -> bool {
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if unmap && fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len).is_ok() {
        return true;
    }
    if fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, off, len).is_ok() {
        return true;
    }
    let zeros = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        if pwrite_full(fd, zeros.as_ptr().cast_mut(), n, off + done).is_err() {
            return false;
        }
        done += n as u64;
    }
    true
}

/// `pread` until `len` bytes came (a read past the end is an error).
fn pread_full(fd: i32, ptr: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller vouches for `ptr..ptr + len` being writable
        // memory it may fill.
        let n = unsafe {
            libc::pread(
                fd,
                ptr.add(done).cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

/// `pwrite` until `len` bytes went.
fn pwrite_full(fd: i32, ptr: *mut u8, len: usize, off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: the caller vouches for `ptr..ptr + len` being readable.
        let n = unsafe {
            libc::pwrite(
                fd,
                ptr.add(done).cast_const().cast(),
                len - done,
                (off + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioDevice for Block {
    fn kind(&self) -> &'static str {
        "virtio-blk"
    }

    fn device_type(&self) -> u16 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK as u16
    }

    fn pci_class(&self) -> [u8; 3] {
        // Mass storage, SCSI: what QEMU's virtio-blk-pci says too.
        [0x01, 0x00, 0x00]
    }

    fn features(&self) -> u64 {
        let mut f = 1 << vb::VIRTIO_BLK_F_SEG_MAX
            | 1 << vb::VIRTIO_BLK_F_BLK_SIZE
            | 1 << vb::VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << vb::VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << vb::VIRTIO_BLK_F_DISCARD | 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        crate::read_config_bytes(&c, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &VmMemory,
        ram: &Arc<GuestRam>,
    ) -> Result<bool, virtio_queue::Error> {
        let mut jobs = Vec::new();
        let used = drain_queue(queue, mem, |chain| {
            let head = chain.head_index();
            let parsed = Buffers::of_chain(chain, mem)
                .map_err(|why| {
                    tracing::debug!("virtio-blk: chain {head} refused: {why}");
                    (None, S_IOERR, 0)
                })
                .and_then(|b| self.parse(index, head, &b, mem, ram));
            match parsed {
                Ok(job) => {
                    jobs.push(job);
                    None
                }
                Err((at, status, len)) => {
                    self.refused += 1;
                    if let Some(at) = at {
                        let _ = write_stream(mem, &[(at, 1)], 0, &[status]);
                    }
                    Some(len)
                }
            }
        })?;
        if !jobs.is_empty() {
            self.shared
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .in_flight += jobs.len();
            for job in jobs {
                if self.sender().send(job).is_err() {
                    tracing::error!("virtio-blk: the worker is gone");
                }
            }
        }
        Ok(used)
    }

    fn poll(&mut self, queues: &mut [Queue], mem: &VmMemory) -> u64 {
        let done = std::mem::take(
            &mut self
                .shared
                .done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .completions,
        );
        let mut mask = 0;
        for (q, head, len) in done {
            if let Some(queue) = queues.get_mut(q) {
                if queue.add_used(mem, head, len).is_ok() {
                    mask |= 1 << q;
                }
            }
        }
        mask
    }

    fn in_flight(&self) -> usize {
        self.shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_flight
    }

    fn drain(&mut self) {
        let d = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
        let _d = self
            .shared
            .cv
            .wait_while(d, |d| d.in_flight > 0)
            .unwrap_or_else(|e| e.into_inner());
    }

    fn reset(&mut self) {
        self.drain();
        self.shared
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .completions
            .clear();
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "sectors": self.sectors, "readonly": self.readonly })
    }

    fn check_state(&self, state: &serde_json::Value) -> Result<(), String> {
        let sectors = state.get("sectors").and_then(serde_json::Value::as_u64);
        let readonly = state.get("readonly").and_then(serde_json::Value::as_bool);
        match (sectors, readonly) {
            (Some(s), _) if s != self.sectors => Err(format!(
                "the disk {} has {} sectors; the snapshot's disk had {s}",
                self.path.display(),
                self.sectors
            )),
            (Some(_), Some(r)) if r != self.readonly => Err(format!(
                "the disk {} is {}; the snapshot's was {}",
                self.path.display(),
                if self.readonly {
                    "read-only"
                } else {
                    "writable"
                },
                if r { "read-only" } else { "writable" }
            )),
            (Some(_), Some(_)) => Ok(()),
            _ => Err("not a virtio-blk state".into()),
        }
    }

    fn stats(&self) -> Vec<(String, u64)> {
        let c = *self.counters.lock().unwrap_or_else(|e| e.into_inner());
        vec![
            ("reads".into(), c.reads),
            ("bytes read".into(), c.read_bytes),
            ("writes".into(), c.writes),
            ("bytes written".into(), c.written_bytes),
            ("flushes".into(), c.flushes),
            ("discards and zeroings".into(), c.discards),
            ("failed requests".into(), c.errors + self.refused),
        ]
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some((tx, handle)) = self.worker.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_driver::{Driver, VECTOR_BASE, WRITE};
    use popek_machine::pci_device::PciDevice;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A temporary image of `sectors` sectors, sector i filled with byte i.
    struct Image(PathBuf);

    impl Image {
        fn new(sectors: u64) -> Image {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "popek-blk-{}-{}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let mut data = Vec::new();
            for i in 0..sectors {
                data.extend(std::iter::repeat_n(i as u8, SECTOR as usize));
            }
            std::fs::write(&p, data).unwrap();
            Image(p)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn driver(img: &Image, readonly: bool) -> Driver {
        let bell = Arc::new(Doorbell::default());
        let b = Block::open(&img.0, readonly, bell).unwrap();
        let mut d = Driver::new(Box::new(b));
        d.setup();
        d
    }

    const HDR: u64 = 0x2_0000;
    const DATA: u64 = 0x3_0000;
    const STATUS: u64 = 0x4_0000;

    fn header(d: &Driver, ty: u32, sector: u64) {
        d.ram.write_u32(HDR, ty).unwrap();
        d.ram.write_u32(HDR + 4, 0).unwrap();
        d.ram.write_u64(HDR + 8, sector).unwrap();
        d.ram.write_u8(STATUS, 0xee).unwrap();
    }

    /// A request with `len` data bytes at DATA (written by the device
    /// when `device_writes`); returns (used len, status).
    fn request(d: &mut Driver, ty: u32, sector: u64, len: u32, device_writes: bool) -> (u32, u8) {
        header(d, ty, sector);
        let dflag = if device_writes { WRITE } else { 0 };
        let head = d.submit(&[(HDR, 16, 0), (DATA, len, dflag), (STATUS, 1, WRITE)]);
        let used = d.used();
        assert_eq!(used.len(), 1, "one request, one used entry");
        assert_eq!(used[0].0, u32::from(head));
        (used[0].1, d.ram.read_u8(STATUS).unwrap())
    }

    #[test]
    fn reads_and_writes_reach_the_image_and_interrupt_through_msix() {
        let img = Image::new(64);
        let mut d = driver(&img, false);
        // Capacity in the device configuration.
        assert_eq!(d.bar_read(0x2000, 8), 64);
        let (len, st) = request(&mut d, vb::VIRTIO_BLK_T_IN, 3, 1024, true);
        assert_eq!((len, st), (1025, S_OK));
        let mut buf = vec![0u8; 1024];
        d.ram.read(DATA, &mut buf).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
        assert_eq!(
            d.msis,
            vec![(0xfee0_0000, VECTOR_BASE + 1)],
            "queue 0 is vector 1"
        );
        // The DMA is recorded for the CPU engines.
        let pages = d.ram.take_external_writes();
        assert!(pages.contains(&(DATA / 4096)), "{pages:?}");
        d.ram.fill(DATA, 512, 0xab).unwrap();
        let (len, st) = request(&mut d, vb::VIRTIO_BLK_T_OUT, 10, 512, false);
        assert_eq!((len, st), (1, S_OK));
        let bytes = img.bytes();
        assert!(bytes[10 * 512..11 * 512].iter().all(|&b| b == 0xab));
        assert!(bytes[11 * 512..12 * 512].iter().all(|&b| b == 11));
        let (_, st) = request(&mut d, vb::VIRTIO_BLK_T_FLUSH, 0, 0, false);
        assert_eq!(st, S_OK);
        // Any sector in a flush (the worker must not overflow on it).
        let (_, st) = request(&mut d, vb::VIRTIO_BLK_T_FLUSH, u64::MAX, 0, false);
        assert_eq!(st, S_OK);
        let stats = d.dev.stats();
        let get = |k: &str| stats.iter().find(|(n, _)| n == k).unwrap().1;
        assert_eq!((get("reads"), get("writes"), get("flushes")), (1, 1, 2));
        assert_eq!(get("bytes read"), 1024);
    }

    #[test]
    fn requests_outside_the_disk_or_not_in_sectors_fail_with_ioerr() {
        let img = Image::new(8);
        let mut d = driver(&img, false);
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_IN, 8, 512, true).1,
            S_IOERR
        );
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_IN, 7, 1024, true).1,
            S_IOERR
        );
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_IN, u64::MAX, 512, true).1,
            S_IOERR
        );
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_OUT, 0, 100, false).1,
            S_IOERR
        );
        assert_eq!(request(&mut d, 0x77, 0, 512, true).1, S_UNSUPP);
        // Still working.
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 7, 512, true).1, S_OK);
        assert_eq!(img.bytes(), Image::new(8).bytes(), "nothing written");
    }

    #[test]
    fn a_read_only_disk_says_so_and_refuses_writes() {
        let img = Image::new(8);
        let mut d = driver(&img, true);
        assert_ne!(d.device_features() & 1 << vb::VIRTIO_BLK_F_RO, 0);
        d.ram.fill(DATA, 512, 0xcd).unwrap();
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_OUT, 1, 512, false).1,
            S_IOERR
        );
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 1, 512, true).1, S_OK);
        assert_eq!(img.bytes(), Image::new(8).bytes());
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let img = Image::new(16);
        let mut d = driver(&img, false);
        let (len, st) = request(&mut d, vb::VIRTIO_BLK_T_GET_ID, 0, 20, true);
        assert_eq!(st, S_OK);
        let name = img.0.file_name().unwrap().to_string_lossy().into_owned();
        let n = name.len().min(20);
        let mut id = vec![0u8; n];
        d.ram.read(DATA, &mut id).unwrap();
        assert_eq!(id, &name.as_bytes()[..n]);
        assert_eq!(len as usize, n + 1);
        // Zero sectors 2..4, discard 8..16 (the data may stay: advisory).
        d.ram.write_u64(DATA, 2).unwrap();
        d.ram.write_u32(DATA + 8, 2).unwrap();
        d.ram.write_u32(DATA + 12, 0).unwrap();
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_WRITE_ZEROES, 0, 16, false).1,
            S_OK
        );
        let bytes = img.bytes();
        assert!(bytes[2 * 512..4 * 512].iter().all(|&b| b == 0));
        assert!(bytes[4 * 512..5 * 512].iter().all(|&b| b == 4));
        d.ram.write_u64(DATA, 8).unwrap();
        d.ram.write_u32(DATA + 8, 8).unwrap();
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).1,
            S_OK
        );
        assert_eq!(img.bytes().len(), 16 * 512, "the size stays");
        // A segment beyond the end, and discard with a flag.
        d.ram.write_u64(DATA, 15).unwrap();
        d.ram.write_u32(DATA + 8, 2).unwrap();
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).1,
            S_IOERR
        );
        d.ram.write_u64(DATA, 0).unwrap();
        d.ram.write_u32(DATA + 12, 1).unwrap();
        assert_eq!(
            request(&mut d, vb::VIRTIO_BLK_T_DISCARD, 0, 16, false).1,
            S_UNSUPP
        );
    }

    #[test]
    fn malformed_chains_are_refused_without_touching_memory_outside_ram() {
        let img = Image::new(8);
        let mut d = driver(&img, false);
        header(&d, vb::VIRTIO_BLK_T_IN, 0);
        // A data buffer beyond RAM: nothing to say the error in, used
        // with length 0.
        d.submit(&[
            (HDR, 16, 0),
            (crate::test_driver::RAM - 256, 512, WRITE),
            (STATUS, 1, WRITE),
        ]);
        assert_eq!(d.used()[0].1, 0);
        // Readable after writable.
        d.submit(&[(HDR, 16, 0), (STATUS, 1, WRITE), (DATA, 512, 0)]);
        assert_eq!(d.used()[0].1, 0);
        // A header shorter than 16 bytes.
        d.submit(&[(HDR, 8, 0), (STATUS, 1, WRITE)]);
        assert_eq!(d.used()[0].1, 1);
        assert_eq!(d.ram.read_u8(STATUS).unwrap(), S_IOERR);
        // No status byte at all.
        d.submit(&[(HDR, 16, 0)]);
        assert_eq!(d.used()[0].1, 0);
        assert_eq!(request(&mut d, vb::VIRTIO_BLK_T_IN, 1, 512, true).1, S_OK);
    }

    #[test]
    fn images_not_in_whole_sectors_and_images_in_use_are_refused() {
        let img = Image::new(2);
        std::fs::write(&img.0, vec![0u8; 1000]).unwrap();
        let bell = Arc::new(Doorbell::default());
        let e = Block::open(&img.0, false, bell.clone()).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 512"), "{e}");
        std::fs::write(&img.0, vec![0u8; 1024]).unwrap();
        let first = Block::open(&img.0, false, bell.clone()).unwrap();
        let e = Block::open(&img.0, false, bell.clone()).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(
            Block::open(&img.0, true, bell.clone()).is_err(),
            "not even to read"
        );
        drop(first);
        let _r1 = Block::open(&img.0, true, bell.clone()).unwrap();
        let _r2 = Block::open(&img.0, true, bell.clone()).unwrap();
        let e = Block::open(Path::new("/nonexistent/x.img"), false, bell).unwrap_err();
        assert!(e.to_string().contains("cannot open"), "{e}");
    }
}
