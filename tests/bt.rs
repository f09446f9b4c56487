//! The `bt` engine on the embedded guests, through the `popek` binary:
//! native minios (every x86-gap check) and paravirtual minios pass and
//! power off, and with `--clock virtual` their console output is
//! byte-identical to `interp`'s (the same instructions retire in the same
//! order, so every benchmark line matches too).

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

fn bt_matches_interp(guest: &str) {
    let (code, out, err) = popek(&[
        "run", "--engine", "bt", "--guest", guest, "--clock", "virtual", "--stats",
    ]);
    assert!(
        out.contains("minios: all checks passed"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(code, 0, "power-off exits 0; stderr:\n{err}");
    // The translator really ran: CCFs executed and ident code retired.
    let stat = |name: &str| -> u64 {
        err.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or_else(|| panic!("no `{name}` in --stats:\n{err}"))
    };
    assert!(stat("TUs translated") > 100, "{err}");
    assert!(stat("ident instructions (dynamic)") > 1_000_000, "{err}");
    let (icode, iout, ierr) = popek(&[
        "run", "--engine", "interp", "--guest", guest, "--clock", "virtual",
    ]);
    assert_eq!(icode, 0, "{ierr}");
    assert_eq!(
        out, iout,
        "bt and interp print the same with a virtual clock"
    );
}

#[test]
fn minios_passes_its_checks_on_bt_like_interp() {
    bt_matches_interp("minios");
}

#[test]
fn paravirtual_minios_passes_its_checks_on_bt_like_interp() {
    bt_matches_interp("minios-pv");
}

#[test]
fn dump_ccf_shows_the_tu_and_its_host_code() {
    // At 0x100000: mov ecx, 1000 ; l: add eax, ecx ; dec ecx ; jnz l ;
    // mov al, 0 ; out 0xf4, al
    let code = [
        0xb9, 0xe8, 0x03, 0x00, 0x00, 0x01, 0xc8, 0x49, 0x75, 0xfb, 0xb0, 0x00, 0xe6, 0xf4,
    ];
    let dir = std::env::temp_dir().join(format!("popek-dump-ccf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("loop.bin");
    std::fs::write(&path, code).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_popek"))
        .args([
            "run",
            "--engine",
            "bt",
            "--memory",
            "4M",
            "--format",
            "flat-protected",
        ])
        .args([
            "--load-addr",
            "0x100000",
            "--dump-ccf",
            "0x100005",
            "--kernel",
        ])
        .arg(&path)
        .env("POPEK_BT_HOT_AFTER", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TU at guest-physical 0x100005"), "{err}");
    assert!(
        err.contains("add eax,ecx") && err.contains("dec ecx"),
        "{err}"
    );
    assert!(err.contains("CCF at host"), "{err}");
}
