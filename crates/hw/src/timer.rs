//! The slice timer: gets the vCPU out of `KVM_RUN` when its time slice is
//! over, so that the VMM can advance the machine's timers and poll input
//! even while the guest computes without exiting.
//!
//! A POSIX timer per vCPU thread (`SIGEV_THREAD_ID`) sends a real-time
//! signal to that thread. The handler sets `kvm_run.immediate_exit` of the
//! engine running on the thread (found through a thread-local pointer that
//! is only set while [`crate::Hw::run`] is inside its loop). If the signal
//! lands while the thread is in `KVM_RUN`, the ioctl returns `EINTR`; if it
//! lands just before, `immediate_exit` makes the next `KVM_RUN` return at
//! once — so no slice end is ever lost, and the guest is never stopped in
//! the middle of completing an I/O (KVM completes pending I/O before it
//! looks at `immediate_exit`).

use std::cell::Cell;
use std::sync::Once;
use std::time::Duration;

thread_local! {
    /// `&mut kvm_run.immediate_exit` of the engine running on this thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal the slice timer sends (a real-time signal, so it queues and
/// never collides with the standard signals the CLI uses).
fn slice_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_slice_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialized thread-local without
    // destructor and one volatile byte store.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by `Armed::new` to the kvm_run mapping
        // of the engine running on this thread and cleared by `Armed::drop`
        // before that engine's `run` returns; the mapping outlives both.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Ends `thread`'s `KVM_RUN` now (or its next one, if it is about to
/// enter it): a vCPU on another thread whose interrupt line rose.
///
/// The caller keeps `thread` alive (not yet joined) while it may call
/// this; the handler is installed (an engine made a [`SliceTimer`]).
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread of this process (the caller's
    // contract) and the signal has a handler that only sets a flag.
    unsafe { libc::pthread_kill(thread, slice_signal()) };
}

fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask
        // is a valid argument; SA_RESTART is deliberately absent so that
        // KVM_RUN returns EINTR.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_slice_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(slice_signal(), &sa, std::ptr::null_mut())
        };
        if r != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// A one-shot POSIX timer aimed at the thread that created it.
pub struct SliceTimer {
    timer: libc::timer_t,
    tid: libc::pid_t,
}

// SAFETY: timer_t is an opaque kernel id; the timer can be re-aimed from
// any thread (see `SliceTimer::ensure_thread`).
unsafe impl Send for SliceTimer {}

impl SliceTimer {
    /// A timer that signals the calling thread.
    pub fn new() -> std::io::Result<SliceTimer> {
        install_handler()?;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        Self::create(tid)
    }

    fn create(tid: libc::pid_t) -> std::io::Result<SliceTimer> {
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: a zeroed sigevent is valid; we fill the fields timer_create
        // reads for SIGEV_THREAD_ID, and the out-pointer is a valid local.
        let r = unsafe {
            let mut sev: libc::sigevent = std::mem::zeroed();
            sev.sigev_notify = libc::SIGEV_THREAD_ID;
            sev.sigev_signo = slice_signal();
            sev.sigev_notify_thread_id = tid;
            libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer)
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SliceTimer { timer, tid })
    }

    /// Re-creates the timer if the engine moved to another thread.
    pub fn ensure_thread(&mut self) -> std::io::Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if tid != self.tid {
            *self = Self::create(tid)?;
        }
        Ok(())
    }

    /// Arms the timer to fire once after `d` (zero disarms it).
    pub fn arm(&self, d: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `self.timer` is a live timer id; `spec` is a valid value.
        unsafe { libc::timer_settime(self.timer, 0, &spec, std::ptr::null_mut()) };
    }
}

impl Drop for SliceTimer {
    fn drop(&mut self) {
        // SAFETY: the id came from timer_create and is deleted once.
        unsafe { libc::timer_delete(self.timer) };
    }
}

/// While alive, slice signals on this thread set `*immediate_exit`.
pub struct Armed;

impl Armed {
    /// Points this thread's slice signal at `immediate_exit`.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid until the returned guard drops.
    pub unsafe fn new(immediate_exit: *mut u8) -> Armed {
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        Armed
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}
