//! Guest RAM as a file: the memory file of a snapshot.
//!
//! A memory file is guest RAM byte for byte (guest-physical address =
//! file offset), written sparse: a page that is all zeros is a hole and
//! takes no disk space. Because the layout is RAM's, the file can be
//! mapped copy-on-write as guest RAM itself ([`GuestRam::map_private`]),
//! which is how many clones share one snapshot's pages; or its data
//! extents (found with `SEEK_DATA`/`SEEK_HOLE`) can be read into RAM
//! ([`GuestRam::load_image`]), after which the VM owns its memory.
//!
//! Both directions compute a CRC-32 over the pages they move, page by page
//! in address order and holes counted as zero pages skipped, so a loader
//! can check the file against the state file that describes it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::{GuestRam, MemoryError, PAGE_SIZE};

/// What writing or loading an image moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Pages stored in (or read from) the file.
    pub pages: u64,
    /// CRC-32 of those pages' contents with their page numbers (see
    /// [`page_crc`]), combined in address order.
    pub crc: u32,
}

/// Adds one page to a running image checksum: its page number, then its
/// bytes, so that moving a page elsewhere changes the sum.
pub fn page_crc(h: &mut crc32fast::Hasher, page: u64, data: &[u8]) {
    h.update(&page.to_le_bytes());
    h.update(data);
}

fn io_err(size: u64, what: &str, e: std::io::Error) -> MemoryError {
    MemoryError::Map {
        size,
        reason: format!("{what}: {e}"),
    }
}

/// Pages moved per read when loading or comparing an image (1 MiB).
const CHUNK_PAGES: u64 = 256;

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorizes this.
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

impl GuestRam {
    /// Maps `file` (at least `size` bytes) copy-on-write as guest RAM: the
    /// guest reads the file's pages, and a page it writes becomes this
    /// VM's own copy. Every VM mapping the same file shares the pages it
    /// has not written. The file must not be truncated while mapped (the
    /// snapshot writer replaces files by renaming, never in place).
    pub fn map_private(file: &File, size: u64) -> Result<Self, MemoryError> {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let len = file.metadata().map_err(|e| io_err(size, "stat", e))?.len();
        if len < size {
            return Err(MemoryError::Map {
                size,
                reason: format!("the file has {len} bytes, fewer than RAM's {size}"),
            });
        }
        // SAFETY: a private mapping of an open file at an address the kernel
        // chooses; checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_err(size, "mmap", std::io::Error::last_os_error()));
        }
        let mut ram = Self::from_mapping(ptr.cast(), size, None);
        ram.file_backed = true;
        Ok(ram)
    }

    /// Whether RAM is memfd-backed ([`GuestRam::new_shareable`]).
    pub fn is_shareable(&self) -> bool {
        self.fd.is_some()
    }

    /// Copies all of `src` (same size) into this RAM, skipping pages `src`
    /// has never backed (they read as zeros, as this RAM's do). Neither
    /// vCPU may run.
    pub fn copy_from(&self, src: &GuestRam) -> Result<(), MemoryError> {
        if src.size != self.size {
            return Err(MemoryError::OutOfRange {
                addr: 0,
                len: src.size,
                size: self.size,
            });
        }
        let resident = src.resident_pages();
        for p in 0..self.size / PAGE_SIZE {
            if resident.as_ref().is_some_and(|r| !r[p as usize]) {
                continue;
            }
            // SAFETY: p is in bounds; no vCPU runs.
            let d = unsafe { src.page_slice(p) };
            if !is_zero(d) {
                self.write_untracked(p * PAGE_SIZE, d)?;
            }
        }
        Ok(())
    }

    /// Whether each page is backed by host memory (`mincore(2)`): a page
    /// that is not has never been written and reads as zeros. `None` when
    /// that cannot be told: the kernel does not say, or RAM is mapped from
    /// a file (whose untouched pages hold the file's data).
    pub fn resident_pages(&self) -> Option<Vec<bool>> {
        if self.file_backed {
            return None;
        }
        let pages = (self.size / PAGE_SIZE) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: `ptr`/`size` describe our own live mapping and `vec` has
        // one byte per page, as mincore requires.
        let r = unsafe { libc::mincore(self.ptr.cast(), self.size as usize, vec.as_mut_ptr()) };
        (r == 0).then(|| vec.iter().map(|b| b & 1 != 0).collect())
    }

    /// One page of RAM, borrowed.
    ///
    /// # Safety
    /// Nothing may write guest RAM while the slice lives (the VM's vCPU is
    /// stopped: snapshots are taken between engine slices).
    pub unsafe fn page_slice(&self, page: u64) -> &[u8] {
        assert!(page < self.size / PAGE_SIZE);
        // SAFETY: in bounds (asserted); the caller guarantees no writer.
        unsafe {
            std::slice::from_raw_parts(
                self.ptr.add((page * PAGE_SIZE) as usize),
                PAGE_SIZE as usize,
            )
        }
    }

    /// Writes the pages `wanted` says (all when `None`) to `file` at their
    /// guest-physical offsets, skipping pages that are all zero (they stay
    /// holes), and sizes the file to RAM. Pages known not to be resident
    /// are skipped without being read. The vCPU must be stopped.
    pub fn write_image(
        &self,
        file: &File,
        wanted: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<ImageStats, MemoryError> {
        let size = self.size;
        file.set_len(size)
            .map_err(|e| io_err(size, "truncate", e))?;
        let resident = self.resident_pages();
        let pages = size / PAGE_SIZE;
        let mut h = crc32fast::Hasher::new();
        let mut stored = 0;
        let mut run: Option<(u64, u64)> = None; // first page, count
        let flush = |run: &mut Option<(u64, u64)>| -> Result<(), MemoryError> {
            if let Some((first, n)) = run.take() {
                // SAFETY: the run lies inside RAM (pages < size / PAGE_SIZE);
                // the vCPU is stopped, as this method requires.
                let data = unsafe {
                    std::slice::from_raw_parts(
                        self.ptr.add((first * PAGE_SIZE) as usize),
                        (n * PAGE_SIZE) as usize,
                    )
                };
                file.write_all_at(data, first * PAGE_SIZE)
                    .map_err(|e| io_err(size, "write", e))?;
            }
            Ok(())
        };
        for p in 0..pages {
            let skip =
                wanted.is_some_and(|w| !w(p)) || resident.as_ref().is_some_and(|r| !r[p as usize]);
            let data = if skip {
                None
            } else {
                // SAFETY: p is in bounds; the vCPU is stopped.
                Some(unsafe { self.page_slice(p) })
            };
            match data.filter(|d| !is_zero(d)) {
                Some(d) => {
                    page_crc(&mut h, p, d);
                    stored += 1;
                    match &mut run {
                        Some((first, n)) if *first + *n == p && *n < 256 => *n += 1,
                        _ => {
                            flush(&mut run)?;
                            run = Some((p, 1));
                        }
                    }
                }
                None => flush(&mut run)?,
            }
        }
        flush(&mut run)?;
        Ok(ImageStats {
            pages: stored,
            crc: h.finalize(),
        })
    }

    /// Reads the data extents of `file` (a memory file of this RAM's size)
    /// into RAM, leaving the pages of its holes as they are, restricted to
    /// the pages `wanted` says when given. Returns what it read, with the
    /// checksum of the non-zero pages among them. The vCPU must be stopped.
    pub fn load_image(
        &self,
        file: &File,
        wanted: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<ImageStats, MemoryError> {
        let size = self.size;
        let len = file.metadata().map_err(|e| io_err(size, "stat", e))?.len();
        if len != size {
            return Err(MemoryError::Map {
                size,
                reason: format!("the memory file has {len} bytes, RAM {size}"),
            });
        }
        let mut h = crc32fast::Hasher::new();
        let mut stored = 0;
        for (start, end) in data_extents(file, size)? {
            let (first, last) = (start / PAGE_SIZE, end / PAGE_SIZE);
            let mut p = first;
            while p < last {
                if !wanted.is_none_or(|w| w(p)) {
                    p += 1;
                    continue;
                }
                // A run of wanted pages, read straight into RAM.
                let mut n = 1;
                while p + n < last && n < CHUNK_PAGES && wanted.is_none_or(|w| w(p + n)) {
                    n += 1;
                }
                // SAFETY: p..p+n lies inside RAM (extents are clipped to its
                // size) and the vCPU is stopped, as this method requires: no
                // one else reads or writes these bytes meanwhile.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        self.ptr.add((p * PAGE_SIZE) as usize),
                        (n * PAGE_SIZE) as usize,
                    )
                };
                // Back the run in one call rather than a fault per page
                // (Linux 5.14+; elsewhere the read faults them in).
                // SAFETY: the range is inside our own writable mapping.
                unsafe {
                    libc::madvise(
                        dst.as_mut_ptr().cast(),
                        dst.len(),
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                file.read_exact_at(dst, p * PAGE_SIZE)
                    .map_err(|e| io_err(size, "read", e))?;
                for (i, page) in dst.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    if !is_zero(page) {
                        page_crc(&mut h, p + i as u64, page);
                        stored += 1;
                    }
                }
                p += n;
            }
        }
        Ok(ImageStats {
            pages: stored,
            crc: h.finalize(),
        })
    }

    /// Which pages of RAM differ from a reference image that `fill`
    /// produces chunk by chunk (`fill(first_page, buf)` fills `buf` with
    /// the reference from that page on). A page this RAM has never backed
    /// is compared as zeros without being touched. The vCPU must be
    /// stopped.
    pub fn pages_differing(
        &self,
        fill: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<Vec<bool>, MemoryError> {
        let size = self.size;
        let pages = size / PAGE_SIZE;
        let resident = self.resident_pages();
        let mut out = vec![false; pages as usize];
        let mut buf = vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize];
        let zero = [0u8; PAGE_SIZE as usize];
        let mut p = 0;
        while p < pages {
            let n = CHUNK_PAGES.min(pages - p);
            let b = &mut buf[..(n * PAGE_SIZE) as usize];
            fill(p, b).map_err(|e| io_err(size, "read", e))?;
            for (i, reference) in b.chunks_exact(PAGE_SIZE as usize).enumerate() {
                let q = p + i as u64;
                let ours: &[u8] = if resident.as_ref().is_some_and(|r| !r[q as usize]) {
                    &zero
                } else {
                    // SAFETY: q is in bounds; the vCPU is stopped.
                    unsafe { self.page_slice(q) }
                };
                out[q as usize] = ours != reference;
            }
            p += n;
        }
        Ok(out)
    }
}

/// The data extents of `file` below `size`, page-aligned outward, from
/// `SEEK_DATA`/`SEEK_HOLE` (a file system without them reports one extent:
/// the whole file).
pub fn data_extents(file: &File, size: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an open descriptor we borrow.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(io_err(size, "seek", e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io_err(size, "seek", std::io::Error::last_os_error()));
        }
        let start = (data as u64 / PAGE_SIZE) * PAGE_SIZE;
        let end = (hole as u64)
            .div_ceil(PAGE_SIZE)
            .saturating_mul(PAGE_SIZE)
            .min(size);
        if start >= size {
            break;
        }
        out.push((start, end));
        pos = end.max(pos + PAGE_SIZE);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("popek-image-{}-{name}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    #[test]
    fn an_image_stores_only_non_zero_pages_and_loads_back() {
        let ram = GuestRam::new(64 * PAGE_SIZE).unwrap();
        ram.write(3 * PAGE_SIZE + 5, b"hello").unwrap();
        ram.write(40 * PAGE_SIZE, &[0xaa; 4096]).unwrap();
        ram.write(10 * PAGE_SIZE, &[0; 8]).unwrap(); // touched, still zero
        let (path, f) = temp("a");
        let w = ram.write_image(&f, None).unwrap();
        assert_eq!(w.pages, 2);
        assert_eq!(f.metadata().unwrap().len(), 64 * PAGE_SIZE);
        let back = GuestRam::new(64 * PAGE_SIZE).unwrap();
        let r = back.load_image(&f, None).unwrap();
        assert_eq!(r, w, "what was read is what was written");
        let mut b = [0u8; 5];
        back.read(3 * PAGE_SIZE + 5, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(back.read_u8(40 * PAGE_SIZE + 4095).unwrap(), 0xaa);
        let mapped = GuestRam::map_private(&f, 64 * PAGE_SIZE).unwrap();
        assert_eq!(
            mapped.read_u8(40 * PAGE_SIZE).unwrap(),
            0xaa,
            "the file's pages"
        );
        mapped.write_u8(3 * PAGE_SIZE + 5, b'j').unwrap();
        let mut again = [0u8; 5];
        f.read_exact_at(&mut again, 3 * PAGE_SIZE + 5).unwrap();
        assert_eq!(&again, b"hello", "a private mapping never writes the file");
        assert_eq!(
            mapped.read_u8(3 * PAGE_SIZE + 5).unwrap(),
            b'j',
            "but the VM sees its write"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_wrong_sized_memory_file_is_refused() {
        let ram = GuestRam::new(16 * PAGE_SIZE).unwrap();
        let (path, f) = temp("b");
        f.set_len(8 * PAGE_SIZE).unwrap();
        assert!(ram.load_image(&f, None).is_err());
        assert!(GuestRam::map_private(&f, 16 * PAGE_SIZE).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
