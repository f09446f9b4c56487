//! What the integration tests share: running the `popek` binary (its exit
//! status, output and peak memory) and writing guest images to temporary
//! files. Each test file includes it with `mod support;`.

// Each test binary uses a different part of it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A Multiboot ELF32 image whose one loadable segment (file bytes `code`,
/// `memsz` in memory) is linked at `addr`, entered at `entry`; the
/// Multiboot header sits in the first 8 KiB as the specification asks.
pub fn multiboot_elf(addr: u32, code: &[u8], memsz: u32, entry: u32) -> Vec<u8> {
    const DATA: usize = 0x1000;
    let mut f = vec![0u8; DATA + code.len()];
    // ELF header.
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // 32-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    let put16 =
        |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut f, 16, 2); // ET_EXEC
    put16(&mut f, 18, 3); // EM_386
    put32(&mut f, 20, 1);
    put32(&mut f, 24, entry);
    put32(&mut f, 28, 52); // program headers
    put16(&mut f, 40, 52);
    put16(&mut f, 42, 32);
    put16(&mut f, 44, 1);
    // The one PT_LOAD.
    let ph = 52;
    for (i, v) in [
        1,
        DATA as u32,
        addr,
        addr,
        code.len() as u32,
        memsz,
        7,
        0x1000,
    ]
    .iter()
    .enumerate()
    {
        put32(&mut f, ph + 4 * i, *v);
    }
    // Multiboot header: magic, flags (none), checksum.
    let magic: u32 = 0x1BAD_B002;
    put32(&mut f, 0x80, magic);
    put32(&mut f, 0x84, 0);
    put32(&mut f, 0x88, 0u32.wrapping_sub(magic));
    f[DATA..].copy_from_slice(code);
    f
}

/// The Debian i386 kernel and an initramfs whose /init is
/// `tests/debian/INIT`, built by `scripts/debian-guest.sh` with `flags`
/// (`--lspci`, `--pae`, `--modules`), fetched from Debian's archive and
/// cached; fails and says so when the archive cannot be reached.
pub fn debian_guest(init: &str, flags: &[&str]) -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let init = root.join("tests/debian").join(init);
    let mut args = vec!["--init", init.to_str().unwrap()];
    args.extend_from_slice(flags);
    let files = debian_files(&args);
    (files[0].clone(), files[1].clone())
}

/// What `scripts/debian-guest.sh ARGS` prints: the kernel, the initrd
/// and (with `--rootfs`) the root file system image.
pub fn debian_files(args: &[&str]) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/debian-guest.sh"))
        .args(args)
        .env("POPEK_BIN", env!("CARGO_BIN_EXE_popek"))
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs scripts/debian-guest.sh");
    assert!(
        out.status.success(),
        "scripts/debian-guest.sh failed (is Debian's archive reachable?): {}",
        out.status
    );
    let files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert!(files.len() >= 2, "kernel and initrd paths: {files:?}");
    files
}

/// Snapshots the VM behind the API socket `sock` into `snap` and stops
/// it (`popek snapshot --stop`); waits for `vm` to end with status 0.
pub fn snapshot_and_stop(sock: &std::path::Path, snap: &std::path::Path, vm: Popek) {
    let (st, _, err) = popek(&[
        "snapshot",
        "--api-sock",
        sock.to_str().unwrap(),
        "-o",
        snap.to_str().unwrap(),
        "--stop",
    ]);
    assert_eq!(st, 0, "{err}");
    let (st, _, err) = vm.finish();
    assert_eq!(st, 0, "{err}");
}

/// A `popek` running in the background with its console on pipes.
pub struct Popek {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

impl Popek {
    /// Starts `popek` with `args`.
    pub fn start(args: &[&str]) -> Popek {
        let mut child = Command::new(env!("CARGO_BIN_EXE_popek"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("popek starts");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        for (mut pipe, buf) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                out.clone(),
            ),
            (Box::new(child.stderr.take().unwrap()), err.clone()),
        ] {
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    buf.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&b[..n]));
                }
            });
        }
        Popek { child, out, err }
    }

    /// What it printed so far.
    pub fn out(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits until the console shows `what` (or fails after `secs` s).
    pub fn wait_for_within(&self, what: &str, secs: u64) {
        let t = Instant::now();
        while !self.out().contains(what) {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {what:?} on the console:\n{}\nstderr:\n{}",
                self.out(),
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the console shows `what` (or fails after 30 s).
    pub fn wait_for(&self, what: &str) {
        self.wait_for_within(what, 30);
    }

    /// Types `line` and Enter on its console.
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Kills it with SIGKILL (no chance to clean up) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What it reported so far.
    pub fn err(&self) -> String {
        self.err.lock().unwrap().clone()
    }

    /// Waits for the exit status (at most 60 s): (status, stdout, stderr).
    pub fn finish(self) -> (i32, String, String) {
        self.finish_within(60)
    }

    /// As [`Popek::finish`], waiting at most `secs` s.
    pub fn finish_within(mut self, secs: u64) -> (i32, String, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                let err = self.err.lock().unwrap().clone();
                assert!(!err.contains("panicked"), "popek panicked:\n{err}");
                return (st.code().unwrap_or(-1), self.out(), err);
            }
            if t.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!("popek did not end:\n{}", self.out());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
