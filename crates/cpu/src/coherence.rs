//! Code coherence between software CPUs on different host threads.
//!
//! Each [`crate::Cpu`] caches decoded code (and the binary translator its
//! translations) per physical page, and lets stores through its TLB straight
//! to host memory only on pages that hold none of its code. With one CPU per
//! host thread, a store by one CPU to a page another CPU has code from must
//! still reach that code: x86 promises cross-modifying code takes effect once
//! the executing processor serializes (SDM vol. 3 §8.1.3).
//!
//! [`CodeMap`] is what the CPUs of a VM share, per page: which CPUs have code
//! from it, and which may have a TLB entry granting fast stores to it. Two
//! rules keep them coherent:
//!
//! - **Marking a page as code** (a CPU decodes or translates from it) asks
//!   every other CPU that may store to it fast to drop that write access, and
//!   waits until each has (or is outside guest code, where it serves the
//!   request before running any). The set bits are read after publishing the
//!   mark, and a TLB fill publishes its write bit before reading the marks
//!   (both sequentially consistent), so no fast store escapes both sides.
//! - **A store to a page other CPUs have code from** (it always takes the
//!   slow path) is followed by an invalidation request to each of them; they
//!   serve it at their next block or dispatch boundary, which comes before
//!   any serializing instruction they run.
//!
//! Requests wait in per-CPU mailboxes; a CPU waiting for others serves its
//! own write-access requests meanwhile, so two CPUs marking pages at once
//! never wait for each other forever.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Mutex;

/// The most CPUs one map serves (a bit each in a page's masks).
pub const MAX_CPUS: usize = 32;

/// One CPU's requests from the others.
#[derive(Default)]
struct Mailbox {
    /// Something is in one of the lists.
    pending: AtomicBool,
    /// The CPU is executing guest code (inside its run loop or the
    /// translator's dispatcher): requests to it must be waited for.
    running: AtomicBool,
    /// Pages whose write access the CPU's TLB must drop.
    drop_write: Mutex<Vec<u64>>,
    /// Pages whose decoded code the CPU must throw away.
    invalidate: Mutex<Vec<u64>>,
}

/// What the CPUs of one VM share about code pages (see the module docs).
pub struct CodeMap {
    /// Per RAM page: the CPUs with code decoded or translated from it.
    code: Box<[AtomicU32]>,
    /// Per RAM page: the CPUs whose TLB may let stores through to it.
    writable: Box<[AtomicU32]>,
    boxes: Box<[Mailbox]>,
}

/// The requests a CPU took from its mailbox.
#[derive(Default, Debug)]
pub struct Requests {
    /// Pages to drop write access to.
    pub drop_write: Vec<u64>,
    /// Pages to invalidate.
    pub invalidate: Vec<u64>,
}

impl CodeMap {
    /// A map for `cpus` CPUs over `ram_bytes` of RAM.
    pub fn new(ram_bytes: u64, cpus: usize) -> CodeMap {
        assert!((1..=MAX_CPUS).contains(&cpus), "1 to {MAX_CPUS} CPUs");
        let pages = ram_bytes.div_ceil(4096) as usize;
        CodeMap {
            code: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            writable: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            boxes: (0..cpus).map(|_| Mailbox::default()).collect(),
        }
    }

    /// The number of CPUs.
    pub fn cpus(&self) -> usize {
        self.boxes.len()
    }

    /// The CPUs with code from `page` (none for a page beyond RAM).
    #[inline]
    pub fn code_mask(&self, page: u64) -> u32 {
        self.code.get(page as usize).map_or(0, |m| m.load(SeqCst))
    }

    /// Publishes that `cpu` may let stores through to `page`, then says
    /// whether any CPU has code from it (then it must not).
    pub fn note_writable(&self, cpu: usize, page: u64) -> bool {
        let Some(w) = self.writable.get(page as usize) else {
            return false;
        };
        w.fetch_or(1 << cpu, SeqCst);
        self.code_mask(page) != 0
    }

    /// `cpu` has code from `page`: every other CPU that may store to it
    /// fast is asked to stop, and waited for. `serve` runs the waiting
    /// CPU's own write-access requests meanwhile.
    pub fn mark_code(&self, cpu: usize, page: u64, mut serve: impl FnMut(Vec<u64>)) {
        let (Some(c), Some(w)) = (
            self.code.get(page as usize),
            self.writable.get(page as usize),
        ) else {
            return;
        };
        if c.fetch_or(1 << cpu, SeqCst) & (1 << cpu) != 0 {
            return;
        }
        let others = w.load(SeqCst) & !(1 << cpu);
        if others == 0 {
            return;
        }
        for other in bits(others) {
            self.post(other, |b| b.drop_write.lock().unwrap().push(page));
        }
        for other in bits(others) {
            let b = &self.boxes[other];
            let mut spins = 0u32;
            while w.load(SeqCst) & (1 << other) != 0 && b.running.load(SeqCst) {
                if self.boxes[cpu].pending.load(SeqCst) {
                    let mine = std::mem::take(&mut *self.boxes[cpu].drop_write.lock().unwrap());
                    if !mine.is_empty() {
                        serve(mine);
                    }
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    /// `cpu` stored to `page` (the store is done): the other CPUs with code
    /// from it are asked to throw it away.
    pub fn stored(&self, cpu: usize, page: u64) {
        // The store above must be visible before the marks are read (a CPU
        // marking the page now reads its bytes after its mark).
        std::sync::atomic::fence(SeqCst);
        let others = self.code_mask(page) & !(1 << cpu);
        for other in bits(others) {
            self.post(other, |b| b.invalidate.lock().unwrap().push(page));
        }
    }

    /// `cpu` no longer has code from `page`.
    pub fn unmark_code(&self, cpu: usize, page: u64) {
        if let Some(c) = self.code.get(page as usize) {
            c.fetch_and(!(1 << cpu), SeqCst);
        }
    }

    /// `cpu` has no code from any page.
    pub fn unmark_all(&self, cpu: usize) {
        for c in self.code.iter() {
            if c.load(SeqCst) & (1 << cpu) != 0 {
                c.fetch_and(!(1 << cpu), SeqCst);
            }
        }
    }

    /// `cpu`'s TLB no longer lets stores through to `page`.
    pub fn unmark_writable(&self, cpu: usize, page: u64) {
        if let Some(w) = self.writable.get(page as usize) {
            w.fetch_and(!(1 << cpu), SeqCst);
        }
    }

    /// `cpu`'s TLB lets stores through to no page (it was flushed).
    pub fn unmark_all_writable(&self, cpu: usize) {
        for w in self.writable.iter() {
            if w.load(SeqCst) & (1 << cpu) != 0 {
                w.fetch_and(!(1 << cpu), SeqCst);
            }
        }
    }

    /// Whether `cpu` has requests waiting (cheap: one load).
    #[inline]
    pub fn has_requests(&self, cpu: usize) -> bool {
        self.boxes[cpu].pending.load(SeqCst)
    }

    /// Takes `cpu`'s requests.
    pub fn take_requests(&self, cpu: usize) -> Requests {
        let b = &self.boxes[cpu];
        b.pending.store(false, SeqCst);
        Requests {
            drop_write: std::mem::take(&mut *b.drop_write.lock().unwrap()),
            invalidate: std::mem::take(&mut *b.invalidate.lock().unwrap()),
        }
    }

    /// `cpu` enters (true) or leaves (false) guest code. On entry it must
    /// take its requests after this call, before running guest code.
    pub fn set_running(&self, cpu: usize, running: bool) {
        self.boxes[cpu].running.store(running, SeqCst);
    }

    fn post(&self, cpu: usize, push: impl FnOnce(&Mailbox)) {
        let b = &self.boxes[cpu];
        push(b);
        b.pending.store(true, SeqCst);
    }
}

/// The set bits of a mask, lowest first.
fn bits(mut m: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (m != 0).then(|| {
            let i = m.trailing_zeros() as usize;
            m &= m - 1;
            i
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_store_to_another_cpus_code_page_asks_it_to_invalidate() {
        let m = CodeMap::new(1 << 20, 2);
        m.mark_code(1, 5, |_| {});
        assert_eq!(m.code_mask(5), 2);
        m.stored(0, 5);
        assert!(m.has_requests(1));
        assert!(!m.has_requests(0));
        let r = m.take_requests(1);
        assert_eq!(r.invalidate, vec![5]);
        assert!(!m.has_requests(1));
        // A store by the CPU that has the code asks nobody.
        m.stored(1, 5);
        assert!(!m.has_requests(0));
    }

    #[test]
    fn a_fill_sees_code_marked_before_it() {
        let m = CodeMap::new(1 << 20, 2);
        assert!(!m.note_writable(0, 3));
        m.unmark_writable(0, 3);
        m.mark_code(1, 3, |_| {});
        assert!(m.note_writable(0, 3));
        m.unmark_code(1, 3);
        assert!(!m.note_writable(0, 4));
    }

    #[test]
    fn marking_waits_for_a_running_writer_to_drop_its_access() {
        let m = Arc::new(CodeMap::new(1 << 20, 2));
        assert!(!m.note_writable(0, 7));
        m.set_running(0, true);
        let m2 = m.clone();
        let t = std::thread::spawn(move || m2.mark_code(1, 7, |_| {}));
        // CPU 0 serves the request at its next boundary.
        while !m.has_requests(0) {
            std::thread::yield_now();
        }
        let r = m.take_requests(0);
        assert_eq!(r.drop_write, vec![7]);
        assert!(!t.is_finished() || m.writable[7].load(SeqCst) & 1 == 0);
        m.unmark_writable(0, 7);
        t.join().unwrap();
        assert_eq!(m.code_mask(7), 2);
    }

    #[test]
    fn marking_does_not_wait_for_a_cpu_outside_guest_code() {
        let m = CodeMap::new(1 << 20, 2);
        assert!(!m.note_writable(0, 7));
        m.mark_code(1, 7, |_| {});
        // The request waits for CPU 0's next entry.
        assert_eq!(m.take_requests(0).drop_write, vec![7]);
    }

    #[test]
    fn two_cpus_marking_at_once_serve_each_other() {
        let m = Arc::new(CodeMap::new(1 << 20, 2));
        for cpu in 0..2 {
            for page in 0..64 {
                m.note_writable(cpu, page);
            }
            m.set_running(cpu, true);
        }
        let ts: Vec<_> = (0..2)
            .map(|cpu| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for page in 0..64 {
                        let mm = m.clone();
                        m.mark_code(cpu, page, |pages| {
                            for p in pages {
                                mm.unmark_writable(cpu, p);
                            }
                        });
                    }
                    m.set_running(cpu, false);
                })
            })
            .collect();
        for t in ts {
            t.join().unwrap();
        }
        for page in 0..64 {
            assert_eq!(m.code_mask(page), 3);
        }
    }
}
