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
