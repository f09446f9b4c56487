//! Snapshot goals of `docs/snapshots.md`, measured on a 256 MiB minios
//! waiting for input (`--cmdline wait`) under `bt`:
//!
//! - restore: process start to the guest's first instruction (the VMM's
//!   "running the vCPU" line), reading the memory file and mapping it
//!   (`--clone`); goal ≤ 5 ms;
//! - a full snapshot of the running VM (the API's `took_ms`: pause to
//!   files written), and a diff after one typed line; goal ≤ 100 ms;
//! - N clones from one snapshot (default 100, `POPEK_BENCH_CLONES`):
//!   popek's private memory per clone, not counting the guest pages each
//!   clone dirtied (`Private_Dirty` of the process minus that of its RAM
//!   mapping); goal ≤ 2 MiB.
//!
//!     cargo bench --bench snapshot

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn popek() -> Command {
    Command::new(env!("CARGO_BIN_EXE_popek"))
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn api(sock: &Path, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let r = popek_api::client::request(sock, method, path, Some(&body)).expect("the API answers");
    assert!(r.ok(), "{method} {path}: {} {}", r.status, r.body);
    serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null)
}

/// Pauses the VM, writes a snapshot of `kind` (`Full`, `Diff`) to
/// `path`, resumes it: the API's answer.
fn paused_snapshot(sock: &Path, path: &Path, kind: &str) -> serde_json::Value {
    api(sock, "PATCH", "/vm", serde_json::json!({"state": "Paused"}));
    let r = api(
        sock,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_path": path, "snapshot_type": kind}),
    );
    api(
        sock,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Resumed"}),
    );
    r
}

/// A 256 MiB minios waiting for input under bt, with an API socket.
fn waiting_vm(dir: &Path) -> (Child, PathBuf) {
    let sock = dir.join("api.sock");
    let mut child = popek()
        .args([
            "run",
            "--engine",
            "bt",
            "-m",
            "256M",
            "--cmdline",
            "wait",
            "--api-sock",
        ])
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("popek starts");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("waiting for input") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "minios ended early");
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    (child, sock)
}

/// Spawns `popek restore` and returns it once the VMM runs the vCPU, with
/// the time that took.
fn restore(snap: &Path, clone: bool) -> (Child, Duration) {
    let t = Instant::now();
    let mut cmd = popek();
    cmd.args(["restore", "--engine", "bt"]).arg(snap);
    if clone {
        cmd.arg("--clone");
    }
    let mut child = cmd
        .env("POPEK_LOG", "popek_vmm=debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("popek starts");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "restore failed");
        if line.contains("running the vCPU") {
            break;
        }
    }
    let took = t.elapsed();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    (child, took)
}

fn off(mut c: Child) {
    if let Some(i) = c.stdin.as_mut() {
        let _ = i.write_all(b"off\r");
        let _ = i.flush();
    }
    let t = Instant::now();
    while c.try_wait().ok().flatten().is_none() {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = c.wait();
}

/// Private_Dirty (bytes) of the whole process, and of its mappings of
/// `mem` (the guest RAM a clone dirtied).
fn private_dirty(pid: u32, mem: &str) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut all, mut ram) = (0, 0);
    let mut in_ram = false;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            in_ram = l.ends_with(mem);
        } else if let Some(v) = l.strip_prefix("Private_Dirty:") {
            let kb: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            all += kb << 10;
            if in_ram {
                ram += kb << 10;
            }
        }
    }
    (all, ram)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too,
    // where a quick pass is enough.
    let quick = !std::env::args().any(|a| a == "--bench");
    let runs = if quick { 2 } else { 20 };
    let clones: usize = std::env::var("POPEK_BENCH_CLONES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 3 } else { 100 });
    let dir = std::env::temp_dir().join(format!("popek-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    println!(
        "snapshot benchmarks on {} (256 MiB minios, wait mode, bt)",
        cpu_name()
    );

    // Snapshot time, full and diff.
    let (mut vm, sock) = waiting_vm(&dir);
    let (mut full, mut diff, mut pages, mut changed) = (Vec::new(), Vec::new(), 0, 0);
    for i in 0..runs.min(5) {
        let r = paused_snapshot(&sock, &dir.join(format!("full{i}.snap")), "Full");
        full.push(r["took_ms"].as_f64().unwrap());
        pages = r["pages"].as_u64().unwrap();
        let stdin = vm.stdin.as_mut().unwrap();
        stdin.write_all(format!("line {i}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let r = paused_snapshot(&sock, &dir.join(format!("diff{i}.snap")), "Diff");
        diff.push(r["took_ms"].as_f64().unwrap());
        changed = r["changed_pages"].as_u64().unwrap();
    }
    let snap = dir.join("base.snap");
    api(
        &sock,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    );
    api(
        &sock,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_path": snap}),
    );
    api(
        &sock,
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "Stop"}),
    );
    let _ = vm.wait();
    println!(
        "full snapshot:  median {:.1} ms ({pages} non-zero pages = {:.0} MiB written; goal 100 ms)",
        median(full),
        pages as f64 / 256.0
    );
    println!(
        "diff snapshot:  median {:.1} ms ({changed} pages changed)",
        median(diff)
    );

    // Restore latency.
    for clone in [false, true] {
        let times: Vec<f64> = (0..runs)
            .map(|_| {
                let (c, t) = restore(&snap, clone);
                off(c);
                t.as_secs_f64() * 1000.0
            })
            .collect();
        let min = times.iter().copied().fold(f64::MAX, f64::min);
        println!(
            "restore{}: process start to the first instruction: median {:.2} ms, min {:.2} ms (goal 5 ms)",
            if clone { " --clone" } else { "        " },
            median(times),
            min
        );
    }

    // Clones. A binary just built is dirty in the page cache, and smaps
    // counts its mapped pages as the process's Private_Dirty until written
    // back: sync first.
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let children: Vec<Child> = (0..clones).map(|_| restore(&snap, true).0).collect();
    std::thread::sleep(Duration::from_secs(2));
    let mem_name = "base.snap.mem";
    let (mut own, mut guest) = (Vec::new(), Vec::new());
    for c in &children {
        let (all, ram) = private_dirty(c.id(), mem_name);
        own.push((all - ram) as f64 / 1048576.0);
        guest.push(ram as f64 / 1048576.0);
    }
    let max = own.iter().copied().fold(0.0, f64::max);
    println!(
        "{clones} clones: popek's private memory per clone median {:.2} MiB, max {:.2} MiB (goal 2 MiB); guest pages dirtied per clone median {:.2} MiB",
        median(own.clone()),
        max,
        median(guest)
    );
    for c in children {
        off(c);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::io::stdout().flush();
}
