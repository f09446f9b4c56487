//! What the integration tests share: running the `popek` binary (its exit
//! status, output and peak memory) and writing guest images to temporary
//! files. Each test file includes it with `mod support;`.

// Each test binary uses a different part of it.
#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// How a `popek` process ended.
pub struct Run {
    /// Exit status (-1 when a signal ended it).
    pub status: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// What it printed (the guest's console).
    pub stdout: String,
    /// Its reports.
    pub stderr: String,
    /// Peak resident set, bytes.
    pub max_rss: u64,
}

/// Runs `popek` with `args` and the extra environment `env`, stdin closed;
/// waits for it itself (wait4 gives the peak RSS). Asserts that it did not
/// panic: whatever the guest or the input, popek ends with a status.
// The child is reaped by wait4, which clippy does not see.
#[allow(clippy::zombie_processes)]
pub fn popek_with(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_popek"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("popek starts");
    let pid = child.id() as libc::pid_t;
    // Read the pipes on threads while waiting for the child.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let mut wstatus = 0;
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet reaped; the pointers are valid
    // for the call.
    let r = unsafe { libc::wait4(pid, &mut wstatus, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    let st = std::process::ExitStatus::from_raw(wstatus);
    let run = Run {
        status: st.code().unwrap_or(-1),
        signal: st.signal(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        max_rss: ru.ru_maxrss as u64 * 1024,
    };
    assert!(
        !run.stderr.contains("panicked"),
        "popek panicked:\n{}",
        run.stderr
    );
    run
}

/// Runs `popek` with `args`: (exit status, stdout, stderr).
pub fn popek(args: &[&str]) -> (i32, String, String) {
    let r = popek_with(args, &[]);
    (r.status, r.stdout, r.stderr)
}

/// Writes `bytes` to a file named `name` in this test process's own
/// temporary directory.
pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs `popek run` on the flat binary `code` (`format`: flat-real or
/// flat-protected, loaded at `load`) with `extra` options.
pub fn run_flat(name: &str, code: &[u8], format: &str, load: u64, extra: &[&str]) -> Run {
    let p = temp_file(name, code);
    let load = format!("{load:#x}");
    let mut args = vec![
        "run",
        "--kernel",
        p.to_str().unwrap(),
        "--format",
        format,
        "--load-addr",
        &load,
    ];
    args.extend_from_slice(extra);
    popek_with(&args, &[])
}
