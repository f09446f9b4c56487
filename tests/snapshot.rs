//! Snapshots of whole VMs: taken mid-run on one engine, restored on
//! another, the guest goes on as if nothing happened; diff snapshots and
//! clones; bad snapshots refused before anything runs.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use popek_vmm::snapshot::SnapshotKind;
use popek_vmm::{EngineKind, KernelSource, Outcome, RestoreOptions, Vm, VmConfig};

/// A console tests can read.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popek-snap-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(guest: &str, engine: EngineKind, cmdline: &str) -> VmConfig {
    VmConfig {
        memory: 64 << 20,
        kernel: KernelSource::Embedded(guest.into()),
        initrd: None,
        cmdline: cmdline.into(),
        engine,
        clock: popek_machine::ClockMode::Virtual,
        vendor: None,
        cpus: 1,
        firmware: None,
        threads: popek_vmm::Threads::Auto,
        devices: Default::default(),
    }
}

/// The whole console output of `guest` on `engine`, uninterrupted, and
/// the instructions it took.
fn uninterrupted(guest: &str, engine: EngineKind) -> (Outcome, String, u64) {
    let sink = Sink::default();
    let mut vm = Vm::new(&config(guest, engine, ""), Box::new(sink.clone())).unwrap();
    let o = vm.run();
    (o, sink.text(), vm.engine.instructions())
}

/// Runs `guest` on `first` for `at` instructions, snapshots it into `d`,
/// and restores it on `then`: the console output before and after.
fn interrupted(
    d: &Path,
    guest: &str,
    first: EngineKind,
    at: u64,
    then: EngineKind,
) -> (Outcome, String, String) {
    let before = Sink::default();
    let mut vm = Vm::new(&config(guest, first, ""), Box::new(before.clone())).unwrap();
    assert_eq!(vm.run_limited(at), None, "the guest still runs at {at}");
    let state = d.join(format!("{guest}-{}-{at}.snap", first.name()));
    let r = vm.snapshot(&state, None, SnapshotKind::Full).unwrap();
    assert!(r.pages > 0);
    drop(vm);
    let after = Sink::default();
    let opts = RestoreOptions {
        engine: Some(then),
        clone: false,
    };
    let mut vm = Vm::restore(&state, &opts, Box::new(after.clone())).unwrap();
    assert_eq!(vm.engine_kind(), then);
    let o = vm.run();
    (o, before.text(), after.text())
}

#[test]
fn minios_snapshotted_under_bt_goes_on_under_every_software_engine() {
    let d = dir("minios");
    // Native minios fails its x86-gap checks under trap from boot (that is
    // the gap): trap takes the paravirtual flavour.
    for (guest, then) in [
        ("minios", EngineKind::Interp),
        ("minios", EngineKind::Bt),
        ("minios-pv", EngineKind::Trap),
    ] {
        let (o_ref, reference, total) = uninterrupted(guest, then);
        assert_eq!(
            o_ref,
            Outcome::PowerOff,
            "{guest} on {}:\n{reference}",
            then.name()
        );
        // Mid-boot (checks), in the scheduler demo, in the benchmarks.
        for at in [total / 40, total / 3, total * 4 / 5] {
            let (o, a, b) = interrupted(&d, guest, EngineKind::Bt, at, then);
            assert_eq!(o, Outcome::PowerOff, "{guest} at {at} on {}", then.name());
            assert!(
                !a.is_empty() && !b.is_empty(),
                "{guest} at {at}: both halves print"
            );
            assert!(b.contains("powering off"), "{guest} at {at}:\n{b}");
            let whole = format!("{a}{b}");
            assert_eq!(
                whole,
                reference,
                "{guest} snapshotted under bt at {at}, restored under {}: the output equals an uninterrupted run",
                then.name()
            );
        }
    }
    std::fs::remove_dir_all(d).unwrap();
}

/// A minios waiting for console input (`wait`), on `engine`.
fn waiting(engine: EngineKind, d: &Path) -> (Vm, Sink, PathBuf) {
    let sink = Sink::default();
    let mut vm = Vm::new(&config("minios", engine, "wait"), Box::new(sink.clone())).unwrap();
    run_until(&mut vm, &sink, "waiting for input");
    (vm, sink, d.to_path_buf())
}

/// Runs until the console shows `what` (the clock is virtual: a halted
/// guest's timer ticks are skipped over, so this is quick).
fn run_until(vm: &mut Vm, sink: &Sink, what: &str) {
    for _ in 0..200 {
        if sink.text().contains(what) {
            return;
        }
        let n = vm.engine.instructions();
        assert_eq!(vm.run_limited(n + 2_000_000), None, "{}", sink.text());
    }
    panic!("no {what:?}:\n{}", sink.text());
}

/// Changes one byte of a memory file where it stores data.
fn flip_data_byte(mem: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mem)
        .unwrap();
    let at = popek_memory::image::data_extents(&f, f.metadata().unwrap().len()).unwrap()[0].0 + 7;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

fn restore(path: &Path, engine: EngineKind, clone: bool) -> (Vm, Sink) {
    let sink = Sink::default();
    let opts = RestoreOptions {
        engine: Some(engine),
        clone,
    };
    let vm = Vm::restore(path, &opts, Box::new(sink.clone()))
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), e.chain()));
    (vm, sink)
}

#[test]
fn diff_snapshots_hold_only_what_changed_and_restore_through_their_chain() {
    let d = dir("diff");
    let (mut vm, sink, _) = waiting(EngineKind::Bt, &d);
    let full = vm
        .snapshot(&d.join("a.snap"), None, SnapshotKind::Full)
        .unwrap();
    vm.machine.serial_input(b"one\r");
    run_until(&mut vm, &sink, "minios: line: one");
    let b = vm
        .snapshot(&d.join("b.snap"), None, SnapshotKind::Diff)
        .unwrap();
    assert!(
        b.changed > 0 && b.changed * 20 < full.pages,
        "diff {} pages of {}",
        b.changed,
        full.pages
    );
    // A diff may not replace what it builds on.
    let err = vm
        .snapshot(&d.join("b.snap"), None, SnapshotKind::Diff)
        .unwrap_err();
    assert!(err.chain().contains("new file names"), "{}", err.chain());
    vm.machine.serial_input(b"two\r");
    run_until(&mut vm, &sink, "minios: line: two");
    let c = vm
        .snapshot(&d.join("c.snap"), None, SnapshotKind::Diff)
        .unwrap();
    assert!(c.changed > 0);
    drop(vm);

    // The chain a <- b <- c restores, under interp, copied and mapped.
    for (engine, clone) in [(EngineKind::Interp, false), (EngineKind::Bt, true)] {
        let (mut vm, out) = restore(&d.join("c.snap"), engine, clone);
        vm.machine.serial_input(b"three\r");
        run_until(&mut vm, &out, "minios: line: three");
        assert!(!out.text().contains("one") && !out.text().contains("two"));
    }
    // b alone: "two" was not typed yet.
    let (mut vm, out) = restore(&d.join("b.snap"), EngineKind::Interp, false);
    vm.machine.serial_input(b"two-again\r");
    run_until(&mut vm, &out, "minios: line: two-again");
    drop(vm);

    // A diff on a fresh VM has nothing to build on.
    let (mut fresh, _, _) = waiting(EngineKind::Interp, &d);
    let err = fresh
        .snapshot(&d.join("x.snap"), None, SnapshotKind::Diff)
        .unwrap_err();
    assert!(
        err.chain().contains("take a full one first"),
        "{}",
        err.chain()
    );

    // A changed parent memory file breaks the chain, with the reason.
    flip_data_byte(&d.join("a.snap.mem"));
    let err = Vm::restore(
        &d.join("c.snap"),
        &RestoreOptions::default(),
        Box::new(std::io::sink()),
    )
    .err()
    .expect("refused");
    assert!(err.chain().contains("does not match"), "{}", err.chain());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn clones_share_one_snapshot_and_each_goes_its_own_way() {
    let d = dir("clones");
    let (mut vm, _, _) = waiting(EngineKind::Bt, &d);
    vm.snapshot(&d.join("base.snap"), None, SnapshotKind::Full)
        .unwrap();
    drop(vm);
    let mut clones: Vec<(Vm, Sink)> = (0..4)
        .map(|i| {
            let engine = if i % 2 == 0 {
                EngineKind::Bt
            } else {
                EngineKind::Interp
            };
            restore(&d.join("base.snap"), engine, true)
        })
        .collect();
    for (i, (vm, out)) in clones.iter_mut().enumerate() {
        vm.machine.serial_input(format!("clone-{i}\r").as_bytes());
        run_until(vm, out, &format!("minios: line: clone-{i}"));
    }
    for (i, (_, out)) in clones.iter().enumerate() {
        for j in 0..4 {
            assert_eq!(
                out.text().contains(&format!("clone-{j}")),
                i == j,
                "clone {i} saw only its own input"
            );
        }
    }
    // trap maps RAM twice: its clone is a copy, and runs the same.
    let (mut t, out) = restore(&d.join("base.snap"), EngineKind::Trap, true);
    t.machine.serial_input(b"trap\r");
    run_until(&mut t, &out, "minios: line: trap");
    std::fs::remove_dir_all(d).unwrap();
}

/// Writes `body` as a state file with a correct header.
fn write_state_file(path: &Path, body: &[u8]) {
    let mut f = format!(
        "POPEK-SNAPSHOT 1 {} {:08x}\n",
        body.len(),
        crc32fast::hash(body)
    )
    .into_bytes();
    f.extend_from_slice(body);
    std::fs::write(path, f).unwrap();
}

fn body_of(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    let nl = data.iter().position(|&b| b == b'\n').unwrap();
    data[nl + 1..].to_vec()
}

#[test]
fn bad_snapshots_are_refused_before_anything_runs() {
    let d = dir("bad");
    let (mut vm, _, _) = waiting(EngineKind::Bt, &d);
    let good = d.join("good.snap");
    vm.snapshot(&good, None, SnapshotKind::Full).unwrap();
    drop(vm);
    let data = std::fs::read(&good).unwrap();
    let body = body_of(&good);
    let mut cases: Vec<(&str, PathBuf, &str)> = Vec::new();
    let put = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        // Every state file finds the good memory file.
        std::fs::copy(d.join("good.snap.mem"), d.join(format!("{name}.mem"))).unwrap();
        p
    };
    cases.push((
        "truncated",
        put("truncated.snap", &data[..data.len() / 2]),
        "truncated",
    ));
    let mut flipped = data.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x20;
    cases.push(("corrupted", put("corrupted.snap", &flipped), "corrupted"));
    let mut v2 = b"POPEK-SNAPSHOT 2".to_vec();
    v2.extend_from_slice(&data[16..]);
    cases.push(("another version", put("v2.snap", &v2), "format version 2"));
    cases.push((
        "not a snapshot",
        put("text.snap", b"hello world\n"),
        "not a popek snapshot",
    ));
    cases.push(("empty", put("empty.snap", b""), "not a popek snapshot"));
    // Another RAM size: the state says 128 MiB, the memory file has 64.
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["memory"]["size"] = (128u64 << 20).into();
    v["config"]["memory"] = (128u64 << 20).into();
    let p = put("bigger.snap", b"");
    write_state_file(&p, &serde_json::to_vec(&v).unwrap());
    cases.push(("another RAM size", p, "memory file of 67108864 bytes"));
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["config"]["memory"] = (32u64 << 20).into();
    let p = put("disagree.snap", b"");
    write_state_file(&p, &serde_json::to_vec(&v).unwrap());
    cases.push(("sizes disagree", p, "disagree"));
    // The memory file changed under the state file.
    let p = put("memchanged.snap", &data);
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["memory"]["file"] = "memchanged.snap.mem".into();
    write_state_file(&p, &serde_json::to_vec(&v).unwrap());
    let mem = d.join("memchanged.snap.mem");
    flip_data_byte(&mem);
    cases.push(("memory changed", p, "does not match"));
    // The memory file is missing.
    let p = put("nomem.snap", &data);
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["memory"]["file"] = "no-such.mem".into();
    write_state_file(&p, &serde_json::to_vec(&v).unwrap());
    cases.push(("memory missing", p, "no-such.mem"));
    // A device state out of range (checksummed, so only the device check
    // stands in the way).
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["devices"]["pit"]["counters"][0]["reload"] = 0.into();
    let p = put("pit.snap", b"");
    write_state_file(&p, &serde_json::to_vec(&v).unwrap());
    cases.push(("bad device", p, "device pit"));

    for (what, path, reason) in &cases {
        let (st, out, err) =
            support::popek(&["restore", path.to_str().unwrap(), "--engine", "interp"]);
        assert_eq!(st, 2, "{what}: {err}");
        assert!(
            err.contains(reason),
            "{what}: expected {reason:?} in:\n{err}"
        );
        assert_eq!(err.lines().count(), 1, "{what}: one line:\n{err}");
        assert!(out.is_empty(), "{what}: nothing ran");
    }
    // The good one still restores after all that.
    assert!(Vm::restore(&good, &RestoreOptions::default(), Box::new(std::io::sink())).is_ok());

    // A CPU mode the engine cannot run: a real-mode guest under trap.
    let kernel = d.join("real.bin");
    std::fs::write(&kernel, [0xeb, 0xfe]).unwrap(); // jmp $
    let mut cfg = config("minios", EngineKind::Interp, "");
    cfg.kernel = KernelSource::File {
        path: kernel,
        format: Some(popek_vmm::FileFormat::FlatReal { load_addr: 0x7c00 }),
    };
    let mut vm = Vm::new(&cfg, Box::new(std::io::sink())).unwrap();
    assert_eq!(vm.run_limited(1000), None);
    let real = d.join("real.snap");
    vm.snapshot(&real, None, SnapshotKind::Full).unwrap();
    let (st, out, err) = support::popek(&["restore", real.to_str().unwrap(), "--engine", "trap"]);
    assert_eq!(st, 2, "{err}");
    assert!(
        err.contains("engine trap cannot run this VM (its vCPU is in real mode)"),
        "{err}"
    );
    assert!(out.is_empty());
    std::fs::remove_dir_all(d).unwrap();
}

/// The snapshot loader, fuzzed: state files with random bytes changed
/// (caught by the checksum) and, more to the point, with random values
/// put into their checksummed JSON (vCPU registers, device fields, memory
/// description). Each is refused with a reason, or restores and runs a
/// little without bringing popek down. POPEK_SNAPSHOT_FUZZ_CASES sets the
/// number of cases (default 300).
#[test]
fn the_snapshot_loader_survives_random_state_files() {
    let cases: u64 = std::env::var("POPEK_SNAPSHOT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let d = dir("fuzz");
    let (mut vm, _, _) = waiting(EngineKind::Bt, &d);
    let good = d.join("good.snap");
    vm.snapshot(&good, None, SnapshotKind::Full).unwrap();
    drop(vm);
    let body = body_of(&good);
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // Every leaf's JSON pointer.
    fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    leaves(v, format!("{at}/{k}"), out)
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    leaves(v, format!("{at}/{i}"), out)
                }
            }
            _ => out.push(at),
        }
    }
    let mut all = Vec::new();
    leaves(&doc, String::new(), &mut all);
    let mut x: u64 = 0x5eed_5a4e ^ cases;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut refused, mut ran) = (0, 0);
    let path = d.join("case.snap");
    for i in 0..cases {
        if i % 8 == 0 {
            // Raw bytes: the header and checksum catch these.
            let mut data = std::fs::read(&good).unwrap();
            let at = (next() % data.len() as u64) as usize;
            data[at] = next() as u8;
            std::fs::write(&path, &data).unwrap();
        } else {
            let mut v = doc.clone();
            for _ in 0..1 + next() % 3 {
                let leaf = &all[(next() % all.len() as u64) as usize];
                let old = v.pointer(leaf).unwrap().clone();
                // Mostly values of the right type, to reach past parsing.
                let new: serde_json::Value = match (next() % 16, &old) {
                    (0, _) => "x".into(),
                    (1, _) => u64::MAX.into(),
                    (_, serde_json::Value::Bool(b)) => (!b).into(),
                    (_, serde_json::Value::String(_)) => "Diff".into(),
                    (k, _) if k < 6 => 0.into(),
                    (k, _) if k < 9 => (next() & 0xff).into(),
                    (k, _) if k < 12 => (next() & 0xffff).into(),
                    _ => (next() % 0x1_0000_0000).into(),
                };
                *v.pointer_mut(leaf).unwrap() = new;
            }
            write_state_file(&path, &serde_json::to_vec(&v).unwrap());
        }
        let engine = [EngineKind::Bt, EngineKind::Interp][(i % 2) as usize];
        let opts = RestoreOptions {
            engine: Some(engine),
            clone: i % 3 == 0,
        };
        if std::env::var_os("POPEK_SNAPSHOT_FUZZ_VERBOSE").is_some() {
            eprintln!("case {i}");
            std::fs::copy(&path, d.join("last.snap")).unwrap();
        }
        match Vm::restore(&path, &opts, Box::new(std::io::sink())) {
            Err(e) => {
                assert!(!e.chain().is_empty());
                refused += 1;
            }
            Ok(mut vm) => {
                let n = vm.engine.instructions();
                let _ = vm.run_limited(n.saturating_add(200_000));
                ran += 1;
            }
        }
    }
    println!("snapshot fuzz: {cases} state files, {refused} refused, {ran} restored and ran");
    assert!(refused > 0 && ran > 0);
    std::fs::remove_dir_all(d).unwrap();
}

/// A snapshot moves between hw and the software engines in both
/// directions (an unpaged protected-mode guest in the middle of a loop:
/// what every KVM here runs). Skipped, saying why, without a usable KVM.
#[test]
fn snapshots_move_between_hw_and_bt_both_ways() {
    if !EngineKind::Hw.available() {
        eprintln!("skipped: no usable /dev/kvm here");
        return;
    }
    let d = dir("hw");
    // mov ecx, 3000000; l: dec ecx; jnz l; mov eax, ecx; add al, 7; out 0xf4, al
    let code = [
        0xb9, 0xc0, 0xc6, 0x2d, 0x00, 0x49, 0x75, 0xfd, 0x89, 0xc8, 0x04, 0x07, 0xe6, 0xf4,
    ];
    let kernel = d.join("loop.bin");
    std::fs::write(&kernel, code).unwrap();
    for (first, then) in [
        (EngineKind::Hw, EngineKind::Bt),
        (EngineKind::Bt, EngineKind::Hw),
    ] {
        let mut cfg = config("minios", first, "");
        cfg.memory = 8 << 20;
        cfg.kernel = KernelSource::File {
            path: kernel.clone(),
            format: Some(popek_vmm::FileFormat::FlatProtected {
                load_addr: 0x100000,
            }),
        };
        let mut vm = Vm::new(&cfg, Box::new(std::io::sink())).unwrap();
        // A few slices in: the loop is under way (hw counts time, not
        // instructions, so stop after a few of its slices).
        assert_eq!(vm.run_limited(vm.engine.instructions() + 1_000_000), None);
        let ecx = vm.engine.state().gpr[1];
        assert!(
            ecx > 0 && ecx < 3_000_000,
            "{}: mid-loop, ecx {ecx}",
            first.name()
        );
        let snap = d.join(format!("{}.snap", first.name()));
        vm.snapshot(&snap, None, SnapshotKind::Full).unwrap();
        drop(vm);
        let (mut vm, _) = restore(&snap, then, false);
        assert_eq!(vm.engine.state().gpr[1], ecx, "the vCPU arrives as it left");
        assert_eq!(
            vm.run(),
            Outcome::DebugExit(7),
            "{} -> {}: the loop finishes",
            first.name(),
            then.name()
        );
    }
    std::fs::remove_dir_all(d).unwrap();
}

/// A running VM moves from bt to trap (whose RAM must be a memfd: it is
/// copied into one), to interp and back to bt, answering its console on
/// each; the instruction count carries on.
#[test]
fn a_running_vm_moves_between_the_software_engines() {
    let d = dir("switch");
    let (mut vm, sink, _) = waiting(EngineKind::Bt, &d);
    assert!(!vm.machine.ram().is_shareable());
    for (i, engine) in [EngineKind::Trap, EngineKind::Interp, EngineKind::Bt]
        .into_iter()
        .enumerate()
    {
        let before = vm.engine.instructions();
        vm.switch_engine(engine).unwrap();
        assert_eq!(vm.engine_kind(), engine);
        assert_eq!(vm.engine.instructions(), before, "the count carries on");
        vm.machine
            .serial_input(format!("on-{}\r", engine.name()).as_bytes());
        run_until(
            &mut vm,
            &sink,
            &format!("minios: line: on-{}", engine.name()),
        );
        assert_eq!(vm.engine_switches(), i as u64 + 1);
    }
    assert!(
        vm.machine.ram().is_shareable(),
        "trap left its memfd RAM behind"
    );
    std::fs::remove_dir_all(d).unwrap();
}
