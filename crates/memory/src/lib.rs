//! Guest physical RAM.
//!
//! One anonymous host mapping backs guest physical addresses `0..size`. The
//! software CPU reads and writes it directly through host pointers (its
//! software TLB caches `guest linear -> host pointer`), KVM maps the same
//! memory into the guest, and devices and boot loaders use the checked
//! accessors here.
//!
//! Writes that do not come from the software CPU (devices, loaders, DMA) are
//! recorded per 4 KiB page so that a CPU engine can throw away code it decoded
//! or translated from those pages before it runs again.

pub mod image;
pub mod vm;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use image::ImageStats;

/// Size of a guest page as the dirty-tracking granule.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of guest memory creation and access.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    /// An access touched guest physical addresses outside RAM.
    #[error("guest physical range {addr:#x}+{len:#x} is outside RAM (size {size:#x})")]
    OutOfRange {
        /// First address of the access.
        addr: u64,
        /// Length of the access in bytes.
        len: u64,
        /// Size of guest RAM.
        size: u64,
    },
    /// The host refused to map the requested amount of memory.
    #[error("cannot map {size} bytes of guest RAM: {reason}")]
    Map {
        /// Requested size.
        size: u64,
        /// The host's reason.
        reason: String,
    },
}

/// Guest physical RAM: a host mapping of `size` bytes starting at guest
/// physical address 0.
pub struct GuestRam {
    ptr: *mut u8,
    size: u64,
    /// One bit per page written by something other than a CPU engine.
    external_dirty: Box<[AtomicU64]>,
    any_external_dirty: AtomicBool,
    /// The memfd behind the mapping, when it was made shareable
    /// ([`GuestRam::new_shareable`]), so other views can map the same pages.
    fd: Option<std::os::fd::OwnedFd>,
    /// Mapped from a file ([`GuestRam::map_private`]): a page the process
    /// has not touched holds the file's data, not zeros.
    file_backed: bool,
}

// SAFETY: the mapping is owned by this value and lives until drop; all
// accesses go through raw pointers with bounds checks (or are the CPU
// engine's own responsibility), like vm-memory's `MmapRegion`, which is also
// Send + Sync. Concurrent access races are the guest's business, as on
// hardware.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send` above.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest RAM (rounded up to a page).
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        if size == 0 {
            return Err(MemoryError::Map {
                size,
                reason: "size is zero".into(),
            });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::Map {
            size,
            reason: "larger than the host address space".into(),
        })?;
        // SAFETY: an anonymous private mapping with no fixed address has no
        // preconditions; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                size,
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        Ok(Self::from_mapping(ptr.cast(), size, None))
    }

    fn from_mapping(ptr: *mut u8, size: u64, fd: Option<std::os::fd::OwnedFd>) -> GuestRam {
        let pages = size / PAGE_SIZE;
        let words = pages.div_ceil(64) as usize;
        GuestRam {
            ptr,
            size,
            external_dirty: (0..words).map(|_| AtomicU64::new(0)).collect(),
            any_external_dirty: AtomicBool::new(false),
            fd,
            file_backed: false,
        }
    }

    /// Maps `size` bytes of zeroed guest RAM backed by a memfd, so that
    /// [`GuestRam::new_view`] can map the same pages elsewhere (the `trap`
    /// engine's host-physical space, where guest frames sit shuffled).
    pub fn new_shareable(size: u64) -> Result<Self, MemoryError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let map_err = |reason: String| MemoryError::Map { size, reason };
        if size == 0 {
            return Err(map_err("size is zero".into()));
        }
        let len = usize::try_from(size).map_err(|_| map_err("too large".into()))?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // result is checked.
        let raw = unsafe { libc::memfd_create(c"popek-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(map_err(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(map_err(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: a shared mapping of the whole memfd at an address the
        // kernel chooses; checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error().to_string()));
        }
        Ok(Self::from_mapping(ptr.cast(), size, Some(fd)))
    }

    /// A second view of a shareable RAM (see [`GuestRam::new_shareable`]):
    /// `chunks.len()` chunks of `chunk` bytes, view chunk `i` showing source
    /// chunk `chunks[i]` (the same memory, not a copy), followed by `extra`
    /// bytes of private zeroed memory. `chunk` must be a multiple of the page
    /// size and `chunks` a permutation covering the whole source.
    pub fn new_view(
        src: &GuestRam,
        chunk: u64,
        chunks: &[u64],
        extra: u64,
    ) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        let extra = extra.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let size = src.size + extra;
        let map_err = |reason: String| MemoryError::Map { size, reason };
        let fd = src
            .fd
            .as_ref()
            .ok_or_else(|| map_err("the source RAM is not shareable".into()))?;
        let mut seen = vec![false; chunks.len()];
        let permutation = chunk % PAGE_SIZE == 0
            && chunk > 0
            && chunks.len() as u64 * chunk == src.size
            && chunks.iter().all(|&c| {
                (c as usize) < seen.len() && !std::mem::replace(&mut seen[c as usize], true)
            });
        if !permutation {
            return Err(map_err(
                "the chunk map is not a permutation of the source".into(),
            ));
        }
        // SAFETY: as in `new`: an anonymous private mapping for the whole
        // view, whose first part is then replaced chunk by chunk.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(map_err(std::io::Error::last_os_error().to_string()));
        }
        let view = Self::from_mapping(ptr.cast(), size, None);
        for (i, &c) in chunks.iter().enumerate() {
            // SAFETY: MAP_FIXED over a range inside the view's own mapping
            // (`i * chunk + chunk <= src.size <= size`), from the source's
            // memfd at an offset inside it.
            let r = unsafe {
                libc::mmap(
                    view.ptr.add((i as u64 * chunk) as usize).cast(),
                    chunk as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    fd.as_raw_fd(),
                    (c * chunk) as libc::off_t,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(map_err(std::io::Error::last_os_error().to_string()));
            }
        }
        Ok(view)
    }

    /// Size of RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest physical address 0. Valid for `size()` bytes
    /// for the lifetime of `self`.
    pub fn host_ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn check(&self, addr: u64, len: u64) -> Result<usize, MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => Ok(addr as usize),
            _ => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size,
            }),
        }
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.check(addr, buf.len() as u64)?;
        // SAFETY: `check` proved `off..off+len` lies inside the mapping, and
        // `buf` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`, recording the pages as
    /// externally written.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.check(addr, data.len() as u64)?;
        // SAFETY: `check` proved the destination range lies inside the
        // mapping; `data` is a distinct host buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        self.mark_external(addr, data.len() as u64);
        Ok(())
    }

    /// Copies `data` into guest memory at `addr` without recording the pages
    /// as externally written: for memory no engine decodes code from (a
    /// monitor's own tables), or when the caller tells its CPU itself.
    pub fn write_untracked(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.check(addr, data.len() as u64)?;
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }

    /// [`GuestRam::write_untracked`] of a little-endian 32-bit value.
    pub fn write_u32_untracked(&self, addr: u64, v: u32) -> Result<(), MemoryError> {
        self.write_untracked(addr, &v.to_le_bytes())
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: u64, len: u64, byte: u8) -> Result<(), MemoryError> {
        let off = self.check(addr, len)?;
        // SAFETY: `check` proved the range lies inside the mapping.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), byte, len as usize) };
        self.mark_external(addr, len);
        Ok(())
    }

    /// Reads a little-endian value of `N` bytes.
    fn read_le<const N: usize>(&self, addr: u64) -> Result<[u8; N], MemoryError> {
        let mut b = [0u8; N];
        self.read(addr, &mut b)?;
        Ok(b)
    }

    /// Reads a byte.
    pub fn read_u8(&self, addr: u64) -> Result<u8, MemoryError> {
        Ok(self.read_le::<1>(addr)?[0])
    }
    /// Reads a little-endian 16-bit value.
    pub fn read_u16(&self, addr: u64) -> Result<u16, MemoryError> {
        Ok(u16::from_le_bytes(self.read_le(addr)?))
    }
    /// Reads a little-endian 32-bit value.
    pub fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        Ok(u32::from_le_bytes(self.read_le(addr)?))
    }
    /// Reads a little-endian 64-bit value.
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        Ok(u64::from_le_bytes(self.read_le(addr)?))
    }
    /// Writes a byte.
    pub fn write_u8(&self, addr: u64, v: u8) -> Result<(), MemoryError> {
        self.write(addr, &[v])
    }
    /// Writes a little-endian 16-bit value.
    pub fn write_u16(&self, addr: u64, v: u16) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }
    /// Writes a little-endian 32-bit value.
    pub fn write_u32(&self, addr: u64, v: u32) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }
    /// Writes a little-endian 64-bit value.
    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), MemoryError> {
        self.write(addr, &v.to_le_bytes())
    }

    /// Records that something outside the CPU engines (a device's DMA)
    /// wrote `len` bytes at `addr`: engines drop code decoded from those
    /// pages before they run again.
    pub fn note_external_write(&self, addr: u64, len: u64) {
        if addr < self.size {
            self.mark_external(addr, len.min(self.size - addr));
        }
    }

    fn mark_external(&self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr / PAGE_SIZE;
        let last = (addr + len - 1) / PAGE_SIZE;
        for page in first..=last {
            self.external_dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::Relaxed);
        }
        self.any_external_dirty.store(true, Ordering::Release);
    }

    /// True when some page was written externally since the last
    /// [`take_external_writes`](Self::take_external_writes). Cheap: one load.
    pub fn has_external_writes(&self) -> bool {
        self.any_external_dirty.load(Ordering::Acquire)
    }

    /// Returns the page numbers written externally since the last call and
    /// clears the record.
    pub fn take_external_writes(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        if !self.any_external_dirty.swap(false, Ordering::AcqRel) {
            return pages;
        }
        for (i, word) in self.external_dirty.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                pages.push(i as u64 * 64 + b);
                bits &= bits - 1;
            }
        }
        pages
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`size` are exactly the mapping created in `new`, and
        // nothing can use it after drop.
        unsafe { libc::munmap(self.ptr.cast(), self.size as usize) };
    }
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .finish()
    }
}

impl GuestRam {
    /// Bytes of guest RAM the host has actually backed with memory (pages
    /// the guest, a loader or a device touched), from `mincore(2)`.
    pub fn resident_bytes(&self) -> u64 {
        let page = 4096usize;
        let pages = (self.size as usize).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `ptr`/`size` describe our own live mapping and `vec` has
        // one byte per page, as mincore requires.
        let r = unsafe { libc::mincore(self.ptr.cast(), self.size as usize, vec.as_mut_ptr()) };
        if r != 0 {
            return 0;
        }
        vec.iter().filter(|b| *b & 1 != 0).count() as u64 * page as u64
    }
}

/// This process's resident set size in bytes, from `/proc/self/statm`.
pub fn process_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_round_trip_and_bounds() {
        let ram = GuestRam::new(0x10000).unwrap();
        ram.write_u32(0x1000, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u32(0x1000).unwrap(), 0xdead_beef);
        assert_eq!(ram.read_u8(0x1003).unwrap(), 0xde);
        assert!(matches!(
            ram.write_u32(0xfffe, 1),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(ram.read_u8(u64::MAX).is_err());
    }

    #[test]
    fn external_writes_are_recorded_per_page() {
        let ram = GuestRam::new(0x100000).unwrap();
        assert!(!ram.has_external_writes());
        ram.write(0x1ffe, &[1, 2, 3, 4]).unwrap();
        ram.write_u8(0x80000, 9).unwrap();
        assert!(ram.has_external_writes());
        assert_eq!(ram.take_external_writes(), vec![1, 2, 0x80]);
        assert!(!ram.has_external_writes());
        assert!(ram.take_external_writes().is_empty());
    }

    #[test]
    fn a_view_shows_the_same_memory_shuffled() {
        let ram = GuestRam::new_shareable(4 * 0x10000).unwrap();
        let view = GuestRam::new_view(&ram, 0x10000, &[2, 0, 3, 1], 0x3000).unwrap();
        assert_eq!(view.size(), 4 * 0x10000 + 0x3000);
        ram.write_u32(2 * 0x10000 + 8, 0x1234_5678).unwrap();
        assert_eq!(view.read_u32(8).unwrap(), 0x1234_5678);
        view.write_u32(3 * 0x10000 + 4, 0xabcd).unwrap();
        assert_eq!(ram.read_u32(0x10000 + 4).unwrap(), 0xabcd);
        // The extra part is private memory.
        view.write_u32(4 * 0x10000, 7).unwrap();
        assert_eq!(view.read_u32(4 * 0x10000).unwrap(), 7);
        assert!(GuestRam::new_view(&ram, 0x10000, &[0, 0, 1, 2], 0).is_err());
        assert!(GuestRam::new_view(&GuestRam::new(0x10000).unwrap(), 0x10000, &[0], 0).is_err());
    }

    #[test]
    fn size_rounds_up_and_zero_is_refused() {
        assert_eq!(GuestRam::new(1).unwrap().size(), PAGE_SIZE);
        assert!(GuestRam::new(0).is_err());
    }
}
