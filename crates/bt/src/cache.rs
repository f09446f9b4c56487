//! The translation cache: executable memory under W^X.
//!
//! One `memfd_create` file is mapped twice: a read-write view the
//! translator copies code into, and a read-execute view the dispatcher
//! calls. No mapping is ever both writable and executable. Code is
//! appended (bump allocation); when the cache is full the owner drops every
//! translation and calls [`CodeCache::reset`].

use std::io;

/// Alignment of each compiled code fragment.
const ALIGN: usize = 16;

/// Executable memory with a separate writable view of the same pages.
pub struct CodeCache {
    rw: *mut u8,
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
        // SAFETY: a fresh shared mapping of our memfd; no existing memory is
        // affected.
        let rw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if rw == libc::MAP_FAILED {
            return Err(fail(fd));
        }
        // SAFETY: as above, a second view of the same file, read + execute.
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
            let e = fail(fd);
            // SAFETY: `rw` is the mapping created above, of `size` bytes.
            unsafe { libc::munmap(rw, size) };
            return Err(e);
        }
        Ok(CodeCache {
            rw: rw as *mut u8,
            rx: rx as *const u8,
            size,
            used: 0,
            fd,
        })
    }

    /// The executable address the next fragment will get.
    pub fn next_addr(&self) -> u64 {
        self.rx as u64 + self.used.next_multiple_of(ALIGN) as u64
    }

    /// Copies `code` in; returns its executable address, or `None` when the
    /// cache is full.
    pub fn push(&mut self, code: &[u8]) -> Option<*const u8> {
        let at = self.used.next_multiple_of(ALIGN);
        if at + code.len() > self.size {
            return None;
        }
        // SAFETY: `at + code.len() <= size`, so the destination lies inside
        // the RW view, which no Rust reference aliases; `code` is a separate
        // heap buffer.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(at), code.len()) };
        self.used = at + code.len();
        // SAFETY: `at < size`: inside the RX view.
        Some(unsafe { self.rx.add(at) })
    }

    /// Overwrites code at an executable address (a chain link). The caller
    /// guarantees that no CCF is running (the dispatcher is
    /// single-threaded and patches only between calls).
    pub fn write_at(&mut self, addr: u64, data: &[u8]) {
        let off = (addr as usize).wrapping_sub(self.rx as usize);
        assert!(off <= self.used && data.len() <= self.used - off);
        // SAFETY: checked to lie inside the used part of the RW view.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.rw.add(off), data.len()) };
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
        // SAFETY: checked above to lie within the used part of the RX view,
        // which is readable and only written through the RW view while no
        // `&self` borrow exists (`push` takes `&mut self`).
        unsafe { std::slice::from_raw_parts(self.rx.add(off), len) }
    }
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: both mappings and the descriptor were created in `new`
        // and are released exactly once here.
        unsafe {
            libc::munmap(self.rw as *mut libc::c_void, self.size);
            libc::munmap(self.rx as *mut libc::c_void, self.size);
            libc::close(self.fd);
        }
    }
}
