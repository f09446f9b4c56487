//! Boots the embedded minios guests through the `popek` binary and checks
//! what they print and how popek exits.

use std::process::{Command, Stdio};

fn popek(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_popek"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("popek runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn minios_passes_its_checks_on_interp_and_powers_off() {
    let (code, out, err) = popek(&["run", "--engine", "interp", "--clock", "virtual"]);
    assert!(
        out.contains("minios: all checks passed"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert!(
        out.contains("minios: sched ok"),
        "the timer-driven scheduler ran:\n{out}"
    );
    for bench in [
        "syscall",
        "in",
        "callret",
        "pagefault",
        "ptemod",
        "divzero",
        "forkwait",
        "compute",
    ] {
        assert!(
            out.contains(&format!("minios: bench {bench} iters=")),
            "benchmark {bench} missing:\n{out}"
        );
    }
    assert_eq!(code, 0, "power-off exits 0; stderr:\n{err}");
}

#[test]
fn no_arguments_boots_minios_on_the_auto_engine() {
    let (code, out, err) = popek(&[]);
    assert!(err.contains("engine auto -> interp"), "{err}");
    assert!(out.contains("minios: all checks passed"), "{out}");
    assert_eq!(code, 0);
}

#[test]
fn paravirtual_minios_passes_its_checks_on_interp() {
    let (code, out, err) = popek(&["run", "--guest", "minios-pv", "--clock", "virtual"]);
    assert!(
        out.contains("minios: all checks passed"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(code, 0, "stderr:\n{err}");
}
