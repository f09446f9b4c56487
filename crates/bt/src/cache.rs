//! The translation cache: executable memory under W^X.
//!
//! One `memfd_create` file, mapped once read + execute: the dispatcher
//! calls into the mapping, the translator writes code into the file with
//! `pwrite`. No mapping is ever writable and executable, and the cache's
//! pages count once in popek's resident set (a second, writable view of
//! them would count them twice). Code is appended (bump allocation); when
//! the cache is full the owner drops every translation and calls
//! [`CodeCache::reset`].

use std::io;

/// Alignment of each compiled code fragment.
const ALIGN: usize = 16;

/// Executable memory written through its file.
pub struct CodeCache {
    rx: *const u8,
    size: usize,
    used: usize,
    fd: libc::c_int,
}

impl CodeCache {
    /// A cache of `size` bytes (rounded up to a page).
    pub fn new(size: usize) -> io::Result<CodeCache> {
        let size = size.div_ceil(4096) * 4096;
        // SAFETY: the name is a NUL-terminated C string; the call has no
        // other memory effects.
        let fd = unsafe { libc::memfd_create(c"popek-bt".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fail = |fd| {
            let e = io::Error::last_os_error();
            // SAFETY: `fd` is our open descriptor, closed exactly once.
            unsafe { libc::close(fd) };
            e
        };
        // SAFETY: `fd` is a valid memfd we own.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            return Err(fail(fd));
        }
        // SAFETY: a fresh shared mapping of our memfd, read + execute; no
        // existing memory is affected.
        let rx = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if rx == libc::MAP_FAILED {
            return Err(fail(fd));
        }
        Ok(CodeCache {
            rx: rx as *const u8,
            size,
            used: 0,
            fd,
        })
    }

    /// Writes `data` at offset `off` of the file (all of it, or an error).
    fn write_file(&self, off: usize, mut data: &[u8]) -> io::Result<()> {
        let mut off = off as libc::off_t;
        while !data.is_empty() {
            // SAFETY: `data` is a valid buffer of `data.len()` bytes; `fd` is
            // our memfd.
            let n = unsafe {
                libc::pwrite(
                    self.fd,
                    data.as_ptr() as *const libc::c_void,
                    data.len(),
                    off,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n as usize..];
            off += n as libc::off_t;
        }
        Ok(())
    }

    /// The executable address the next fragment will get.
    pub fn next_addr(&self) -> u64 {
        self.rx as u64 + self.used.next_multiple_of(ALIGN) as u64
    }

    /// Copies `code` in; returns its executable address, or `None` when the
    /// cache is full (or the host refuses the write: the owner then treats
    /// the cache as full).
    pub fn push(&mut self, code: &[u8]) -> Option<*const u8> {
        let at = self.used.next_multiple_of(ALIGN);
        if at + code.len() > self.size {
            return None;
        }
        self.write_file(at, code).ok()?;
        self.used = at + code.len();
        // SAFETY: `at < size`: inside the mapping.
        Some(unsafe { self.rx.add(at) })
    }

    /// Overwrites code at an executable address (a chain link). The caller
    /// guarantees that no CCF is running (the dispatcher is
    /// single-threaded and patches only between calls). False if the host
    /// refused the write: the site then keeps its old target, which stays
    /// correct (an unlinked exit).
    pub fn write_at(&mut self, addr: u64, data: &[u8]) -> bool {
        let off = (addr as usize).wrapping_sub(self.rx as usize);
        assert!(off <= self.used && data.len() <= self.used - off);
        self.write_file(off, data).is_ok()
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Forgets every fragment (the caller has dropped all pointers to them).
    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// The executable bytes at `addr` (a fragment's address), for dumps.
    pub fn bytes(&self, addr: u64, len: usize) -> &[u8] {
        let off = (addr as usize).wrapping_sub(self.rx as usize);
        assert!(off <= self.used && len <= self.used - off);
        // SAFETY: checked above to lie within the used part of the mapping,
        // which is readable and only written (through the file) while no
        // `&self` borrow exists (`push` takes `&mut self`).
        unsafe { std::slice::from_raw_parts(self.rx.add(off), len) }
    }
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: the mapping and the descriptor were created in `new` and
        // are released exactly once here.
        unsafe {
            libc::munmap(self.rx as *mut libc::c_void, self.size);
            libc::close(self.fd);
        }
    }
}
