//! The control API on a Unix socket, driven by a real HTTP client (curl,
//! as Firecracker's documentation does), and the commands built on it:
//! `popek snapshot`, `popek restore`, `--no-boot`, engine switching.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::Popek;

fn wait_socket(p: &Path) {
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `curl` on the socket: (status, body).
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(sock)
        .args(["-X", method])
        .arg(format!("http://localhost{path}"));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let o = c.output().expect("curl runs (scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn fault(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["fault_message"].as_str().unwrap_or("").to_string()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popek-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// minios on `bt` with 64 MiB, `extra` arguments and the API on `sock`,
/// once it waits for terminal input.
fn waiting_minios(sock: &Path, extra: &[&str]) -> Popek {
    let mut args = vec!["run", "--engine", "bt", "-m", "64M"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", "wait", "--api-sock", s(sock)]);
    let vm = Popek::start(&args);
    wait_socket(sock);
    vm.wait_for("waiting for input");
    vm
}

/// Pauses the VM behind `sock` (GET / says so; a line typed then waits),
/// writes a full snapshot to `dir`/vm.snap and vm.mem, resumes it and sees
/// the line echoed. Returns the snapshot's path.
fn pause_snapshot_resume(sock: &Path, vm: &mut Popek, dir: &Path) -> PathBuf {
    let (st, _) = curl(sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(st, 204);
    let (_, body) = curl(sock, "GET", "/", None);
    assert!(body.contains("\"Paused\""), "{body}");
    vm.type_line("while-paused");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !vm.out().contains("while-paused"),
        "a paused VM runs nothing"
    );
    let snap = dir.join("vm.snap");
    let (st, body) = curl(
        sock,
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_type":"Full","snapshot_path":"{}","mem_file_path":"{}"}}"#,
            s(&snap),
            s(&dir.join("vm.mem"))
        )),
    );
    assert_eq!(st, 200, "{body}");
    let (st, _) = curl(sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert_eq!(st, 204);
    vm.wait_for("minios: line: while-paused");
    snap
}

#[test]
fn a_running_vm_is_paused_snapshotted_and_restored_on_another_engine() {
    let d = dir("run");
    let sock = d.join("api.sock");
    let mut vm = waiting_minios(&sock, &[]);
    let (st, body) = curl(&sock, "GET", "/", None);
    assert_eq!(st, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Running");
    assert_eq!(info["engine"], "bt");
    let (st, body) = curl(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    let mc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(1), Some(64))
    );

    // Malformed and misplaced requests: 400 with a fault message.
    for (m, p, b) in [
        ("GET", "/nowhere", None),
        ("DELETE", "/vm", None),
        ("PATCH", "/vm", Some("{not json")),
        ("PATCH", "/vm", Some(r#"{"state":"Sleeping"}"#)),
        ("PATCH", "/vm", Some(r#"{"state":"Paused","colour":1}"#)),
        ("PATCH", "/vm", Some(r#"{"engine":"warp"}"#)),
        ("PUT", "/actions", Some(r#"{"action_type":"Explode"}"#)),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
        ),
        ("PUT", "/boot-source", Some(r#"{"kernel_image_path":"/x"}"#)),
        ("PUT", "/snapshot/load", Some(r#"{"snapshot_path":"/x"}"#)),
        // Firecracker's rule: only a paused VM is snapshotted.
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path":"/tmp/x"}"#),
        ),
        ("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#)),
    ] {
        let (st, body) = curl(&sock, m, p, b);
        assert_eq!(st, 400, "{m} {p} {b:?}: {body}");
        assert!(!fault(&body).is_empty(), "{m} {p}: {body}");
    }
    // The guest still answers.
    vm.type_line("before");
    vm.wait_for("minios: line: before");

    // Metrics, Ctrl-Alt-Del (the keyboard is not the guest's console: it
    // goes on).
    let metrics = d.join("metrics.json");
    let (st, _) = curl(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path":"{}"}}"#, s(&metrics))),
    );
    assert_eq!(st, 204);
    let (st, _) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
    );
    assert_eq!(st, 204);
    let line = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert!(m["instructions"].as_u64().unwrap() > 1_000_000, "{line}");
    let (st, _) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
    );
    assert_eq!(st, 204);

    // Paused: GET / says so, typed input waits.
    let snap = pause_snapshot_resume(&sock, &mut vm, &d);

    // popek snapshot: pause, write FILE and FILE.mem, end the VM.
    let snap2 = d.join("second.snap");
    let (st, _, err) = support::popek(&[
        "snapshot",
        "--api-sock",
        s(&sock),
        "-o",
        s(&snap2),
        "--stop",
    ]);
    assert_eq!(st, 0, "{err}");
    assert!(d.join("second.snap.mem").exists());
    let (st, _, err) = vm.finish();
    assert_eq!(st, 0, "{err}");
    assert!(err.contains("stopped through the API"), "{err}");
    assert!(!sock.exists(), "the socket is removed at exit");

    // Both snapshots go on under interp: the first has the paused line
    // queued, the second has already echoed it.
    for (file, expect) in [
        (&snap, "minios: line: while-paused"),
        (&snap2, "minios: line: after"),
    ] {
        let mut r = Popek::start(&["restore", s(file), "--engine", "interp"]);
        r.type_line("after");
        r.wait_for(expect);
        r.type_line("off");
        let (st, out, err) = r.finish();
        assert_eq!(st, 0, "{err}");
        assert!(err.contains("on engine interp"), "{err}");
        assert!(
            !out.contains("booting"),
            "a restored VM does not boot again:\n{out}"
        );
    }
    std::fs::remove_dir_all(d).unwrap();
}

/// With two vCPUs, each on its own host thread: a pause stops both (the
/// threads hand their states back), the snapshot holds both, and the VM
/// goes on after a resume and after a restore.
#[test]
fn a_vm_with_a_thread_per_vcpu_is_paused_snapshotted_and_resumed() {
    let d = dir("threads");
    let sock = d.join("api.sock");
    let mut vm = waiting_minios(&sock, &["--cpus", "2", "--threads", "multi"]);
    let (st, body) = curl(&sock, "GET", "/machine-config", None);
    assert_eq!(st, 200);
    let mc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(mc["vcpu_count"].as_u64(), Some(2), "{body}");
    let snap = pause_snapshot_resume(&sock, &mut vm, &d);
    vm.type_line("off");
    let (st, _, err) = vm.finish();
    assert_eq!(st, 0, "{err}");
    let mut r = Popek::start(&["restore", s(&snap), "--engine", "interp"]);
    r.wait_for("minios: line: while-paused");
    r.type_line("off");
    let (st, _, err) = r.finish();
    assert_eq!(st, 0, "{err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn no_boot_waits_for_the_api_to_configure_and_start_the_vm() {
    let d = dir("noboot");
    let sock = d.join("api.sock");
    let kernel = d.join("minios.elf");
    std::fs::write(&kernel, popek_guests::by_name("minios").unwrap()).unwrap();
    let mut vm = Popek::start(&["run", "--engine", "bt", "--api-sock", s(&sock), "--no-boot"]);
    wait_socket(&sock);
    let (st, body) = curl(&sock, "GET", "/", None);
    assert_eq!(st, 200);
    assert!(body.contains("Not started"), "{body}");
    let (st, body) = curl(&sock, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#));
    assert_eq!(st, 400, "runtime requests wait for the boot: {body}");
    let (st, _) = curl(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":33}"#),
    );
    assert_eq!(st, 400, "at most 32 vCPUs");
    let (st, _) = curl(&sock, "PUT", "/machine-config", Some(r#"{"vcpu_count":0}"#));
    assert_eq!(st, 400, "at least one vCPU");
    let (st, _) = curl(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":2,"mem_size_mib":48}"#),
    );
    assert_eq!(st, 204);
    let (st, _) = curl(
        &sock,
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path":"{}","boot_args":"wait"}}"#,
            s(&kernel)
        )),
    );
    assert_eq!(st, 204);
    assert!(vm.out().is_empty(), "nothing runs before InstanceStart");
    let (st, _) = curl(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    );
    assert_eq!(st, 204);
    vm.wait_for("waiting for input");
    let (_, body) = curl(&sock, "GET", "/machine-config", None);
    assert!(body.contains("\"mem_size_mib\":48"), "{body}");
    assert!(body.contains("\"vcpu_count\":2"), "{body}");

    // A live engine switch (popek's extension of PATCH /vm): the guest
    // goes on under interp and back under bt.
    let (st, body) = curl(&sock, "PATCH", "/vm", Some(r#"{"engine":"interp"}"#));
    assert_eq!(st, 204, "{body}");
    let (_, body) = curl(&sock, "GET", "/", None);
    assert!(body.contains("\"engine\":\"interp\""), "{body}");
    vm.type_line("on-interp");
    vm.wait_for("minios: line: on-interp");
    let (st, _) = curl(&sock, "PATCH", "/vm", Some(r#"{"engine":"bt"}"#));
    assert_eq!(st, 204);
    let (st, body) = curl(&sock, "PATCH", "/vm", Some(r#"{"engine":"hw"}"#));
    if st == 400 {
        // Only where the KVM here cannot run 32-bit paging (kvm_pvm): the
        // reason comes back.
        assert!(fault(&body).contains("cannot run"), "{body}");
        eprintln!("engine switch to hw refused here: {}", fault(&body));
    }
    let (_, body) = curl(&sock, "GET", "/", None);
    let switches = serde_json::from_str::<serde_json::Value>(&body).unwrap()["engine_switches"]
        .as_u64()
        .unwrap();
    assert!(switches >= 2, "{body}");
    vm.type_line("off");
    let (st, _, err) = vm.finish();
    assert_eq!(st, 0, "{err}");

    // Loading a snapshot into an empty popek, started paused, then resumed.
    let src = Popek::start(&[
        "run",
        "--engine",
        "bt",
        "-m",
        "32M",
        "--cmdline",
        "wait",
        "--api-sock",
        s(&sock),
    ]);
    wait_socket(&sock);
    src.wait_for("waiting for input");
    let snap = d.join("vm.snap");
    let (st, _, err) =
        support::popek(&["snapshot", "--api-sock", s(&sock), "-o", s(&snap), "--stop"]);
    assert_eq!(st, 0, "{err}");
    src.finish();
    let mut vm = Popek::start(&[
        "run",
        "--api-sock",
        s(&sock),
        "--no-boot",
        "--engine",
        "interp",
    ]);
    wait_socket(&sock);
    let (st, body) = curl(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":false}}"#,
            s(&snap),
            s(&d.join("elsewhere.mem"))
        )),
    );
    assert_eq!(st, 400, "a memory file other than the snapshot's: {body}");
    let (st, body) = curl(
        &sock,
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}.mem"}},"resume_vm":false}}"#,
            s(&snap),
            s(&snap)
        )),
    );
    assert_eq!(st, 204, "{body}");
    let (_, body) = curl(&sock, "GET", "/", None);
    assert!(
        body.contains("\"Paused\"") && body.contains("interp"),
        "{body}"
    );
    vm.type_line("loaded");
    let (st, _) = curl(&sock, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#));
    assert_eq!(st, 204);
    vm.wait_for("minios: line: loaded");
    vm.type_line("off");
    let (st, _, err) = vm.finish();
    assert_eq!(st, 0, "{err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn ctrl_a_s_on_the_console_writes_a_snapshot_that_restores() {
    let d = dir("ctrl-a-s");
    let mut vm = Popek::start(&[
        "run",
        "--engine",
        "bt",
        "-m",
        "32M",
        "--cmdline",
        "wait",
        "--snapshot-dir",
        s(&d),
    ]);
    vm.wait_for("waiting for input");
    vm.type_line("first");
    vm.wait_for("minios: line: first");
    vm.type_line("\u{1}s");
    let t = Instant::now();
    let snap = loop {
        let found = std::fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "snap"));
        if let Some(p) = found {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no snapshot in {}",
            d.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    vm.type_line("off");
    let (st, _, err) = vm.finish();
    assert_eq!(st, 0, "{err}");
    assert!(
        err.contains("snapshot written to") && err.contains(s(&snap)),
        "the path is printed:\n{err}"
    );
    let mut r = Popek::start(&["restore", s(&snap)]);
    r.type_line("second");
    r.wait_for("minios: line: second");
    r.type_line("off");
    let (st, out, err) = r.finish();
    assert_eq!(st, 0, "{err}");
    assert!(
        !out.contains("first"),
        "it goes on from the snapshot:\n{out}"
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn drives_put_through_the_api_become_virtio_disks_root_first() {
    let d = dir("drives");
    let sock = d.join("api.sock");
    let kernel = d.join("minios.elf");
    std::fs::write(&kernel, popek_guests::by_name("minios").unwrap()).unwrap();
    let data = d.join("data.img");
    let root = d.join("root.img");
    for img in [&data, &root] {
        std::fs::File::create(img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let vm = Popek::start(&["run", "--engine", "bt", "--api-sock", s(&sock), "--no-boot"]);
    wait_socket(&sock);
    let put = |path: &str, body: String| curl(&sock, "PUT", path, Some(&body));
    let drive = |id: &str, img: &Path, root: bool| {
        format!(
            r#"{{"drive_id":"{id}","path_on_host":"{}","is_root_device":{root},"is_read_only":false}}"#,
            s(img)
        )
    };
    assert_eq!(put("/drives/data", drive("data", &data, false)).0, 204);
    assert_eq!(put("/drives/rootfs", drive("rootfs", &root, true)).0, 204);
    let (st, body) = put("/drives/other", drive("other", &data, true));
    assert_eq!(st, 400, "one root device: {body}");
    let (st, body) = put("/drives/x", drive("y", &data, false));
    assert_eq!(st, 400, "the path's ID is the body's: {body}");
    let (st, body) = put(
        "/network-interfaces/eth0",
        r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"01:00:00:00:00:01"}"#.into(),
    );
    assert_eq!(st, 400, "a multicast MAC is refused: {body}");
    let (st, _) = put(
        "/boot-source",
        format!(
            r#"{{"kernel_image_path":"{}","boot_args":"wait"}}"#,
            s(&kernel)
        ),
    );
    assert_eq!(st, 204);
    assert_eq!(
        put("/actions", r#"{"action_type":"InstanceStart"}"#.into()).0,
        204
    );
    vm.wait_for("waiting for input");
    // The snapshot's configuration: the root drive first, root= added.
    let snap = d.join("vm.snap");
    support::snapshot_and_stop(&sock, &snap, vm);
    // A header line, then the JSON body.
    let text = std::fs::read_to_string(&snap).unwrap();
    let body = text.split_once('\n').unwrap().1;
    let state: serde_json::Value = serde_json::from_str(body).unwrap();
    let config = &state["config"];
    let disks: Vec<&str> = config["devices"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(disks, vec![s(&root), s(&data)]);
    assert_eq!(config["cmdline"], "wait root=/dev/vda rw");
    let slots: Vec<&str> = state["devices"]["pci_devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(slots, vec!["virtio-blk", "virtio-blk"]);
}
