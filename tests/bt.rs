//! The `bt` engine on the embedded guests, through the `popek` binary:
//! native minios (every x86-gap check) and paravirtual minios pass and
//! power off, and with `--clock virtual` their console output is
//! byte-identical to `interp`'s (the same instructions retire in the same
//! order, so every benchmark line matches too).

mod support;
use support::*;

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
    // The machine's side of --stats: the timer's vector (minios puts the
    // master PIC at 0x20) and the port map.
    let irqs = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("interrupts by vector"))
        .unwrap_or_else(|| panic!("no interrupt counts:\n{err}"));
    let timer: u64 = irqs
        .split(',')
        .find_map(|e| e.trim().strip_prefix("0x20: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(timer > 10, "timer interrupts counted: {irqs}");
    assert!(
        err.contains("com1 0x3f8+8") && err.contains("pci config data 0xcfc+4"),
        "{err}"
    );
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

/// A real-mode flat binary (CS base 0x7c40: not page-aligned) with 16-bit
/// memory operands, PUSH/POP, CALL/RET and port output runs translated
/// under `bt` and prints and exits exactly as under `interp`.
#[test]
fn real_mode_flat_binary_runs_translated_like_interp() {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(16).unwrap();
    let (mut top, mut f, mut pr, mut digit) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.mov(ax, 0x3000).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(ax, 0x2000).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(sp, 0xfffe).unwrap();
    a.xor(bx, bx).unwrap();
    a.xor(si, si).unwrap();
    a.mov(cx, 30000).unwrap();
    a.set_label(&mut top).unwrap();
    a.mov(ax, si).unwrap();
    a.xor(ax, 0x5a5a).unwrap();
    a.mov(word_ptr(si), ax).unwrap();
    a.add(bx, word_ptr(si)).unwrap();
    a.rol(bx, 1).unwrap();
    a.push(bx).unwrap();
    a.call(f).unwrap();
    a.pop(dx).unwrap();
    a.add(si, 2).unwrap();
    a.and(si, 0x7fe).unwrap();
    a.dec(cx).unwrap();
    a.jnz(top).unwrap();
    // BX as four hex digits and a newline on COM1, then exit 0x21.
    a.mov(cx, 4).unwrap();
    a.mov(dx, 0x3f8).unwrap();
    a.set_label(&mut pr).unwrap();
    a.rol(bx, 4).unwrap();
    a.mov(al, bl).unwrap();
    a.and(al, 0xf).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.cmp(al, b'9' as i32).unwrap();
    a.jbe(digit).unwrap();
    a.add(al, 7).unwrap();
    a.set_label(&mut digit).unwrap();
    a.out(dx, al).unwrap();
    a.dec(cx).unwrap();
    a.jnz(pr).unwrap();
    a.mov(al, 0x0a).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, 0x21).unwrap();
    a.out(0xf4, al).unwrap();
    a.set_label(&mut f).unwrap();
    a.xor(bx, 0x1234).unwrap();
    a.ret().unwrap();
    let code = a.assemble(0).unwrap();
    let dir = std::env::temp_dir().join(format!("popek-bt-real-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("real.bin");
    std::fs::write(&path, code).unwrap();
    let run = |engine: &str| {
        popek(&[
            "run",
            "--engine",
            engine,
            "--memory",
            "4M",
            "--format",
            "flat-real",
            "--load-addr",
            "0x7c40",
            "--clock",
            "virtual",
            "--stats",
            "--kernel",
            path.to_str().unwrap(),
        ])
    };
    let (code_b, out_b, err_b) = run("bt");
    let (code_i, out_i, err_i) = run("interp");
    assert_eq!(code_b, (0x21 << 1) | 1, "{err_b}");
    assert_eq!(code_i, code_b, "{err_i}");
    assert_eq!(out_b.len(), 5, "four hex digits and a newline: {out_b:?}");
    assert_eq!(out_b, out_i, "bt and interp print the same");
    let stat = |name: &str| -> u64 {
        err_b
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(name)
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or_else(|| panic!("no `{name}` in --stats:\n{err_b}"))
    };
    assert!(stat("TUs translated") >= 2, "{err_b}");
    let total = stat("instructions");
    assert!(
        stat("instructions interpreted") * 5 < total,
        "the 16-bit loop ran translated:\n{err_b}"
    );
}
