//! The serial console on the user's terminal: raw mode on a TTY (restored on
//! every exit path: normal return, panic, SIGTERM/SIGHUP/SIGQUIT), and a
//! reader thread that turns stdin into console events, with QEMU's
//! Ctrl-A x to quit, Ctrl-A s to write a snapshot (Ctrl-A Ctrl-A sends one
//! Ctrl-A).

use std::io::Read;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;

use popek_vmm::ConsoleEvent;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin in raw mode if it is a terminal. Returns whether it did.
pub fn enter_raw_mode() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(0) } != 1 {
        return false;
    }
    // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd 0 is a terminal and `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return false;
    }
    if let Ok(mut saved) = SAVED.lock() {
        *saved = Some(t);
    }
    let mut raw = t;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    // Keep output post-processing so the guest's "\n" still returns the
    // carriage on terminals where the guest sends bare newlines.
    raw.c_oflag |= libc::OPOST | libc::ONLCR;
    // SAFETY: fd 0 is a terminal; `raw` is a valid termios.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
    install_restore_hooks();
    true
}

/// Restores the terminal if raw mode was entered. Safe to call twice.
pub fn restore() {
    let saved = SAVED.lock().ok().and_then(|mut s| s.take());
    if let Some(t) = saved {
        // SAFETY: restoring attributes previously read from fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    restore();
    // SAFETY: resetting to the default action and re-raising is the
    // standard way to die of the signal after cleaning up.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_restore_hooks() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        prev(info);
    }));
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installing a plain C handler for a catchable signal.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Starts the stdin reader thread.
pub fn spawn_reader() -> Receiver<ConsoleEvent> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        let mut escape = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(ConsoleEvent::Eof);
                    return;
                }
                Ok(n) => n,
            };
            let mut out = Vec::with_capacity(n);
            for &b in &buf[..n] {
                if escape {
                    escape = false;
                    match b {
                        b'x' | b'X' => {
                            if !out.is_empty() {
                                let _ = tx.send(ConsoleEvent::Input(std::mem::take(&mut out)));
                            }
                            let _ = tx.send(ConsoleEvent::Quit);
                            return;
                        }
                        b's' | b'S' => {
                            if !out.is_empty() {
                                let _ = tx.send(ConsoleEvent::Input(std::mem::take(&mut out)));
                            }
                            let _ = tx.send(ConsoleEvent::Snapshot);
                        }
                        0x01 => out.push(0x01),
                        _ => out.push(b),
                    }
                } else if b == 0x01 {
                    escape = true;
                } else {
                    out.push(b);
                }
            }
            if !out.is_empty() && tx.send(ConsoleEvent::Input(out)).is_err() {
                return;
            }
        }
    });
    rx
}
