//! Exit statuses for the guest's ways of ending: debug-exit, triple fault,
//! halting forever, reset — with flat binaries built here.

mod support;
use support::*;

/// Runs a flat real-mode binary at 0x7c00 in 4 MiB: (status, stdout,
/// stderr).
fn run_real(name: &str, code: &[u8], extra: &[&str]) -> (i32, String, String) {
    let extra = [&["--memory", "4M"][..], extra].concat();
    let r = run_flat(name, code, "flat-real", 0x7c00, &extra);
    (r.status, r.stdout, r.stderr)
}

#[test]
fn debug_exit_port_gives_odd_status() {
    // mov al, 0x2a; out 0xf4, al
    let (code, _, err) = run_real("debug-exit.bin", &[0xb0, 0x2a, 0xe6, 0xf4], &[]);
    assert_eq!(code, (0x2a << 1) | 1, "{err}");
}

#[test]
fn serial_output_reaches_stdout() {
    // mov dx, 0x3f8; mov al, 'H'; out dx, al; mov al, 'i'; out dx, al; mov al,0; out 0xf4, al
    let code = [
        0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, 0x00, 0xe6, 0xf4,
    ];
    let (status, out, _) = run_real("serial.bin", &code, &[]);
    assert_eq!(status, 1);
    assert_eq!(out, "Hi");
}

#[test]
fn triple_fault_is_reported_with_registers() {
    // lidt [zero-limit IDT]; int 0x10 → #GP → #DF → shutdown.
    // 0f 01 1e 0c 7c : lidt [0x7c0c]; cd 10 : int 0x10; then the IDT descriptor.
    let code = [
        0x0f, 0x01, 0x1e, 0x0c, 0x7c, 0xcd, 0x10, 0xf4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let (status, _, err) = run_real("triple.bin", &code, &[]);
    assert_eq!(status, 4, "{err}");
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("EIP="), "{err}");
    assert!(err.contains("instruction at"), "{err}");
}

#[test]
fn halt_with_interrupts_disabled_is_no_progress() {
    // cli; hlt
    let (status, _, err) = run_real("cli-hlt.bin", &[0xfa, 0xf4], &[]);
    assert_eq!(status, 6, "{err}");
    assert!(err.contains("interrupts disabled"), "{err}");
}

#[test]
fn halt_with_only_masked_timers_is_no_progress_under_the_virtual_clock() {
    // The PIT runs (counter 0, mode 2), its IRQ is masked; sti; hlt. The
    // timer fires for ever and wakes nothing: a real machine hangs, popek
    // says so instead of skipping idle time for ever.
    let code = [
        0xb0, 0x34, 0xe6, 0x43, 0xb0, 0x9c, 0xe6, 0x40, 0xb0, 0x2e, 0xe6, 0x40, // PIT
        0xb0, 0xff, 0xe6, 0x21, // mask every master line
        0xfb, 0xf4, 0xeb, 0xfd, // sti; hlt; jmp back
    ];
    for engine in ["interp", "bt"] {
        let (status, _, err) = run_real(
            "masked-timer.bin",
            &code,
            &["--clock", "virtual", "--engine", engine],
        );
        assert_eq!(status, 6, "{engine}: {err}");
        assert!(err.contains("only masked interrupts"), "{engine}: {err}");
    }
}

#[test]
fn keyboard_controller_reset_exits_zero() {
    // mov al, 0xfe; out 0x64, al; jmp $
    let (status, _, err) = run_real("reset.bin", &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe], &[]);
    assert_eq!(status, 0, "{err}");
}

#[test]
fn invalid_opcode_without_handler_dies_cleanly() {
    // ud2 with an empty IVT at 0: #UD → vector 6 → IVT points at 0000:0000
    // (zeroed memory: add [bx+si], al ...) — instead use a zero-limit IDT.
    let code = [
        0x0f, 0x01, 0x1e, 0x08, 0x7c, 0x0f, 0x0b, 0x90, 0, 0, 0, 0, 0, 0,
    ];
    let (status, _, err) = run_real("ud2.bin", &code, &[]);
    assert_eq!(status, 4, "{err}");
    assert!(
        err.contains("ud2"),
        "the report names the instruction: {err}"
    );
}

#[test]
fn exception_loop_is_no_progress() {
    // The #UD vector points at 0000:0000, which holds an invalid opcode:
    // every delivery faults again and no instruction ever retires.
    // xor ax,ax; mov ds,ax; mov word [0x18],0; mov word [0x1a],0;
    // mov word [0],0xffff; ud2
    let code = [
        0x31, 0xc0, 0x8e, 0xd8, 0xc7, 0x06, 0x18, 0x00, 0x00, 0x00, 0xc7, 0x06, 0x1a, 0x00, 0x00,
        0x00, 0xc7, 0x06, 0x00, 0x00, 0xff, 0xff, 0x0f, 0x0b,
    ];
    for engine in ["interp", "bt"] {
        let (status, _, err) = run_real(
            "ud-loop.bin",
            &code,
            &["--engine", engine, "--clock", "virtual"],
        );
        assert_eq!(status, 6, "{engine}: {err}");
        assert!(err.contains("retires no instructions"), "{engine}: {err}");
    }
}

#[test]
fn max_instructions_stops_the_guest_and_prints_its_state() {
    // jmp $ (forever)
    let (code, _, err) = run_real(
        "spin.bin",
        &[0xeb, 0xfe],
        &["--max-instructions", "1000", "--clock", "virtual"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stopped after 1000 instructions"), "{err}");
    assert!(
        err.contains("EIP=00000000") && err.contains("jmp short"),
        "{err}"
    );
}

#[test]
fn the_debug_console_and_the_post_port_reach_the_user() {
    // mov al, 0x42; out 0x80, al; mov al, 'o'; out 0xe9, al; mov al, 'k';
    // out 0xe9, al; in al, 0xe9; out 0xf4, al (exit with what 0xE9 reads)
    let code = [
        0xb0, 0x42, 0xe6, 0x80, 0xb0, b'o', 0xe6, 0xe9, 0xb0, b'k', 0xe6, 0xe9, 0xe4, 0xe9, 0xe6,
        0xf4,
    ];
    let log = std::env::temp_dir().join(format!("popek-debugcon-{}", std::process::id()));
    let (status, _, err) = run_real(
        "debugcon.bin",
        &code,
        &["--debugcon", log.to_str().unwrap(), "--stats"],
    );
    assert_eq!(
        status,
        ((0xe9 << 1) | 1) & 0xff,
        "0xE9 reads 0xE9 with a console attached: {err}"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "ok");
    assert!(
        err.contains("POST code (port 0x80)") && err.contains("0x42 (last of 1)"),
        "{err}"
    );
    std::fs::remove_file(log).unwrap();
    // Without one, the port is not there.
    let (status, _, err) = run_real("debugcon.bin", &code, &[]);
    assert_eq!(status, ((0xff << 1) | 1) & 0xff, "{err}");
}
