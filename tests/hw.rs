//! `popek` on the `hw` engine (KVM), through the command line: exit
//! statuses, reports, the refusal of guests this KVM cannot run, `popek
//! info`, and minios64.
//!
//! Each test needs `/dev/kvm`; without it the test says so and returns.

use std::process::{Command, Stdio};

mod support;
use support::*;

/// Runs a flat binary at 0x7c00 in 4 MiB on `hw`: (status, stdout,
/// stderr).
fn run_hw(name: &str, code: &[u8], format: &str) -> (i32, String, String) {
    let r = run_flat(
        name,
        code,
        format,
        0x7c00,
        &["--engine", "hw", "--memory", "4M"],
    );
    (r.status, r.stdout, r.stderr)
}

fn kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("skipped: /dev/kvm is absent or cannot be opened");
    }
    ok
}

/// `popek info` once: what this KVM can run.
fn info() -> String {
    let (code, out, err) = popek(&["info"]);
    assert_eq!(code, 0, "{err}");
    out
}

fn info_says(info: &str, item: &str) -> bool {
    info.lines()
        .find(|l| l.trim_start().starts_with(item))
        .is_some_and(|l| {
            l[l.find(item).unwrap() + item.len()..]
                .trim_start()
                .starts_with("yes")
        })
}

#[test]
fn info_prints_the_kvm_and_what_it_runs() {
    if !kvm() {
        return;
    }
    let out = info();
    assert!(out.starts_with("KVM: "), "{out}");
    for item in [
        "real mode",
        "32-bit paging",
        "long mode (entered by loader)",
        "port-I/O exit round trip",
        "cache: ",
        "engine auto for minios64: ",
    ] {
        assert!(out.contains(item), "{item} missing:\n{out}");
    }
}

#[test]
fn hw_real_mode_serial_and_debug_exit() {
    if !kvm() {
        return;
    }
    // mov dx, 0x3f8; mov al, 'H'; out dx, al; mov al, 'i'; out dx, al; mov al, 0x15; out 0xf4, al
    let code = [
        0xba, 0xf8, 0x03, 0xb0, b'H', 0xee, 0xb0, b'i', 0xee, 0xb0, 0x15, 0xe6, 0xf4,
    ];
    let (status, out, err) = run_hw("serial.bin", &code, "flat-real");
    assert_eq!(status, (0x15 << 1) | 1, "{err}");
    assert_eq!(out, "Hi");
}

#[test]
fn hw_unpaged_protected_mode_flat_binary() {
    if !kvm() {
        return;
    }
    // mov eax, 40; add eax, 2; out 0xf4, al
    let code = [0xb8, 40, 0, 0, 0, 0x83, 0xc0, 0x02, 0xe6, 0xf4];
    let (status, _, err) = run_hw("pm.bin", &code, "flat-protected");
    assert_eq!(status, (42 << 1) | 1, "{err}");
}

#[test]
fn hw_triple_fault_is_reported_with_registers() {
    if !kvm() {
        return;
    }
    // ud2 in protected mode: the IDT (base 0) holds no gates → #NP → #DF →
    // shutdown. (A real-mode zero-limit IDT would not do: kvm_pvm ignores
    // the IDT limit in real mode and runs off into the vector table.)
    let (status, _, err) = run_hw("triple.bin", &[0x0f, 0x0b], "flat-protected");
    assert_eq!(status, 4, "{err}");
    assert!(err.contains("the guest died on engine hw"), "{err}");
    assert!(err.contains("triple fault"), "{err}");
    assert!(
        err.contains("EIP=") && err.contains("instruction at"),
        "{err}"
    );
}

#[test]
fn hw_emulation_failure_is_reported_with_registers_and_bytes() {
    if !kvm() {
        return;
    }
    // fld1; mov al, 1; out 0xf4, al — kvm_pvm's emulator has no x87 (it
    // runs real mode through it), hardware VT runs it.
    let (status, _, err) = run_hw(
        "fld1.bin",
        &[0xd9, 0xe8, 0xb0, 0x01, 0xe6, 0xf4],
        "flat-real",
    );
    if status == 3 {
        eprintln!("skipped: this KVM runs x87 code in real mode, so it shows no emulation failure");
        return;
    }
    assert_eq!(status, 4, "{err}");
    assert!(err.contains("the guest died on engine hw"), "{err}");
    assert!(
        err.contains("KVM_EXIT_INTERNAL_ERROR, suberror 1 (emulation failure)"),
        "{err}"
    );
    assert!(err.contains("EIP=") && err.contains("EAX="), "{err}");
    assert!(err.contains("fld1 [d9 e8]"), "{err}");
    assert_eq!(err.matches("EIP=").count(), 1, "registers once:\n{err}");
}

#[test]
fn hw_halt_with_interrupts_disabled_is_no_progress() {
    if !kvm() {
        return;
    }
    let (status, _, err) = run_hw("cli-hlt.bin", &[0xfa, 0xf4], "flat-real");
    assert_eq!(status, 6, "{err}");
    assert!(err.contains("no progress on engine hw"), "{err}");
    assert!(err.contains("interrupts disabled"), "{err}");
}

#[test]
fn hw_keyboard_controller_reset_exits_zero() {
    if !kvm() {
        return;
    }
    // mov al, 0xfe; out 0x64, al; jmp $
    let (status, _, err) = run_hw(
        "reset.bin",
        &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe],
        "flat-real",
    );
    assert_eq!(status, 0, "{err}");
}

#[test]
fn hw_refuses_what_this_kvm_cannot_run_in_one_line() {
    if !kvm() {
        return;
    }
    if info_says(&info(), "32-bit paging") {
        eprintln!("skipped: this KVM runs 32-bit paging, so it runs the i386 minios");
        return;
    }
    let (status, out, err) = popek(&["run", "--engine", "hw", "--guest", "minios"]);
    assert_eq!(status, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line:\n{err}");
    assert!(err.contains("cannot run 32-bit paging"), "{err}");
    assert!(out.is_empty(), "the guest must not start:\n{out}");
}

#[test]
fn hw_finds_refused_paging_at_run_time() {
    if !kvm() {
        return;
    }
    if info_says(&info(), "32-bit paging") {
        eprintln!("skipped: this KVM runs 32-bit paging");
        return;
    }
    // A flat protected-mode guest that turns paging on (its needs are not
    // known before it runs): mov eax, 0x80000011; mov cr0, eax.
    let code = [0xb8, 0x11, 0, 0, 0x80, 0x0f, 0x22, 0xc0, 0xe6, 0xf4];
    let (status, _, err) = run_hw("paging.bin", &code, "flat-protected");
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("refuses 32-bit paging"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line:\n{err}");
}

#[test]
fn auto_keeps_the_i386_minios_off_a_software_kvm() {
    if !kvm() {
        return;
    }
    let i = info();
    if !i.starts_with("KVM: kvm_pvm") {
        eprintln!("skipped: not a kvm_pvm host");
        return;
    }
    assert!(
        i.contains("engine auto for minios: bt"),
        "auto: bt (software) runs every 32-bit guest:\n{i}"
    );
    assert!(
        i.contains("engine auto for minios64: hw"),
        "auto: hw for guests no software engine runs:\n{i}"
    );
}

/// Runs a 64-bit minios under `hw` and checks what it reports. `needs`:
/// checks that must have run and passed whatever the KVM. Where the probe
/// says user-mode SYSCALL reaches the guest kernel's LSTAR (minios64's
/// system calls are SYSCALL), every check must pass, the scheduler demo and
/// all benchmarks must run and the guest must power off; on a KVM that
/// cannot, only the `user_*` checks may fail, and the test says why.
fn minios64_on_hw(guest: &str, needs: &[&str]) {
    if !kvm() {
        return;
    }
    let i = info();
    if !info_says(&i, "long mode (entered from 32-bit)") {
        eprintln!("skipped: this KVM cannot enter long mode from 32-bit code:\n{i}");
        return;
    }
    let user_syscall = info_says(&i, "SYSCALL from user mode");
    let (status, out, err) = popek(&["run", "--engine", "hw", "--guest", guest]);
    assert!(
        out.contains("minios: booting (x86-64"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    for n in needs {
        assert!(
            out.contains(&format!("minios: check {n} ok")),
            "{n}:\n{out}\n{err}"
        );
    }
    let failed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("minios: check "))
        .filter(|l| l.contains("FAILED"))
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    if failed.is_empty() || user_syscall {
        assert!(
            failed.is_empty(),
            "{guest} checks failed on hw: {failed:?}\n{out}\n{err}"
        );
        for n in [
            "user_ran",
            "user_exit",
            "user_cpl",
            "user_getpid",
            "user_de",
        ] {
            assert!(
                out.contains(&format!("minios: check {n} ok")),
                "{n}:\n{out}"
            );
        }
        assert!(out.contains("minios: all checks passed"), "{out}\n{err}");
        assert!(out.contains("minios: tsc MHz="), "TSC calibration:\n{out}");
        assert!(
            out.contains("minios: sched ok"),
            "scheduler demo:\n{out}\n{err}"
        );
        for b in popek_guests::BENCHES {
            // The paravirtual kernel maps no local APIC: it says so.
            let unavailable = guest.ends_with("-pv") && b == "irq_apic";
            assert!(
                out.lines()
                    .any(|l| l.starts_with(&format!("minios: bench {b} "))
                        && (unavailable && l.ends_with("unavailable")
                            || l.contains("cycles_per_iter=") && l.contains("ns_per_iter="))),
                "bench {b}:\n{out}"
            );
        }
        assert!(
            out.contains("minios: init exited 0, powering off"),
            "{out}\n{err}"
        );
        assert_eq!(status, 0, "{out}\n{err}");
        if out.contains("came through the #PF at LSTAR") {
            eprintln!(
                "note: on this KVM a user-mode SYSCALL reaches LSTAR still at CPL 3; {guest} completed its system calls from the #PF handler"
            );
        }
        return;
    }
    let user_only = failed.iter().all(|c| c.starts_with("user_"));
    if user_only {
        eprintln!(
            "skipped the user-mode checks of {guest}: this KVM does not deliver SYSCALL from user mode to the guest kernel (see popek info); failed: {failed:?}"
        );
        return;
    }
    panic!("{guest} checks failed on hw: {failed:?}\nstdout:\n{out}\nstderr:\n{err}");
}

#[test]
fn minios64_runs_its_checks_on_hw() {
    minios64_on_hw("minios64", &["cpl", "sgdt_base", "lar_kernel_cs"]);
}

#[test]
fn minios64_pv_hypercalls_work_on_hw() {
    minios64_on_hw(
        "minios64-pv",
        &[
            "hc_version",
            "hc_enosys",
            "hc_einval",
            "hc_efault",
            "hc_read_cr3",
            "pv_irq_disable",
            "pv_irq_enable",
            "pv_irq_restore",
        ],
    );
}

/// The manual check on real VT hardware (kvm_pvm emulates the Linux kernel
/// far too slowly and fails on CMPXCHG16B): a Debian amd64 kernel and a
/// busybox initramfs boot under `hw` through the 64-bit boot protocol entry
/// to a shell. Run with
///
/// ```text
/// POPEK_LINUX64_KERNEL=/boot/vmlinuz-… POPEK_LINUX64_INITRD=initrd.gz \
///     cargo test --test hw -- --ignored debian_amd64
/// ```
#[test]
#[ignore = "needs a hardware-backed KVM and a Debian amd64 kernel + initramfs (see the doc comment)"]
fn debian_amd64_boots_on_hw_with_real_vt() {
    let (Ok(kernel), Ok(initrd)) = (
        std::env::var("POPEK_LINUX64_KERNEL"),
        std::env::var("POPEK_LINUX64_INITRD"),
    ) else {
        eprintln!("skipped: set POPEK_LINUX64_KERNEL and POPEK_LINUX64_INITRD");
        return;
    };
    if !kvm() {
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_popek"))
        .args([
            "run",
            "--engine",
            "hw",
            "--memory",
            "512M",
            "--kernel",
            &kernel,
            "--initrd",
            &initrd,
            "--cmdline",
            "console=ttyS0 panic=-1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("popek runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Linux version"), "{text}");
    assert!(text.contains("x86_64") || text.contains("amd64"), "{text}");
    assert!(
        text.contains("Run /init") || text.contains("/ #"),
        "the initramfs started:\n{text}"
    );
}

/// VERR, VERW and RDRAND at CPL 0 end in an emulation failure on a
/// software KVM (kvm_pvm); popek finishes them itself, as it does LAR and
/// LSL, and the guest goes on. On hardware VT they never exit.
#[test]
fn hw_finishes_what_a_software_kvm_cannot_emulate() {
    if !kvm() {
        return;
    }
    // Flat protected mode, the loader's GDT (0x10 code, 0x18 data):
    //   mov ax, 0x18; verw ax; setz bl; verr ax; setz bh
    //   mov ax, 0x10; verw ax; setz cl; rdrand eax; setc ch
    //   result = bl | bh<<1 | (!cl)<<2 | ch<<3  (15 when all is right)
    let code = [
        0x66, 0xb8, 0x18, 0x00, // mov ax, 0x18
        0x0f, 0x00, 0xe8, // verw ax
        0x0f, 0x94, 0xc3, // setz bl
        0x0f, 0x00, 0xe0, // verr ax
        0x0f, 0x94, 0xc7, // setz bh
        0x66, 0xb8, 0x10, 0x00, // mov ax, 0x10
        0x0f, 0x00, 0xe8, // verw ax
        0x0f, 0x94, 0xc1, // setz cl
        0x0f, 0xc7, 0xf0, // rdrand eax
        0x0f, 0x92, 0xc5, // setc ch
        0x88, 0xd8, // mov al, bl
        0xd0, 0xe7, // shl bh, 1
        0x08, 0xf8, // or al, bh
        0x80, 0xf1, 0x01, // xor cl, 1
        0xc0, 0xe1, 0x02, // shl cl, 2
        0x08, 0xc8, // or al, cl
        0xc0, 0xe5, 0x03, // shl ch, 3
        0x08, 0xe8, // or al, ch
        0xe6, 0xf4, // out 0xf4, al
    ];
    let (status, _, err) = run_hw("verw.bin", &code, "flat-protected");
    assert_eq!(status, (15 << 1) | 1, "{err}");
}

/// A guest under an interrupt storm (the PIT at its highest rate, divisor
/// 1, in real mode) completes its loop on hw as on the software engines:
/// it once died with KVM_EXIT_INTERNAL_ERROR here.
#[test]
fn hw_survives_an_interrupt_storm() {
    if !kvm() {
        return;
    }
    // IVT[8] -> EOI + IRET; PIC base 8, only IRQ 0; PIT mode 2, divisor 1;
    // STI; 40 x 65536 iterations of DEC/JNZ; CLI; exit 0x2a.
    let code = [
        0x31, 0xc0, 0x8e, 0xc0, 0x26, 0xc7, 0x06, 0x20, 0x00, 0x46, 0x00, 0x26, 0xc7, 0x06, 0x22,
        0x00, 0xc0, 0x07, 0xbc, 0x00, 0x70, 0xb0, 0x11, 0xe6, 0x20, 0xb0, 0x08, 0xe6, 0x21, 0xb0,
        0x04, 0xe6, 0x21, 0xb0, 0x01, 0xe6, 0x21, 0xb0, 0xfe, 0xe6, 0x21, 0xb0, 0x34, 0xe6, 0x43,
        0xb0, 0x01, 0xe6, 0x40, 0xb0, 0x00, 0xe6, 0x40, 0x31, 0xc9, 0xba, 0x28, 0x00, 0xfb, 0x49,
        0x75, 0xfd, 0x4a, 0x75, 0xfa, 0xfa, 0xb0, 0x2a, 0xe6, 0xf4, 0x50, 0xb0, 0x20, 0xe6, 0x20,
        0x58, 0xcf,
    ];
    for engine in ["hw", "interp"] {
        let (status, _, err) = popek(&[
            "run",
            "--engine",
            engine,
            "--kernel",
            temp(&code).to_str().unwrap(),
            "--format",
            "flat-real",
        ]);
        assert_eq!(status, (0x2a << 1) | 1, "{engine}: {err}");
    }
}

fn temp(code: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("popek-hw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("storm.bin");
    std::fs::write(&p, code).unwrap();
    p
}

/// Where a software KVM cannot execute an instruction (kvm_pvm has no x87
/// in real mode), `--fallback-engine bt` runs it and the VM returns to hw
/// afterwards: the guest ends as on every engine, with the switches
/// counted. On hardware VT nothing needs to fall back.
#[test]
fn hw_falls_back_to_bt_where_it_cannot_go_on_and_returns() {
    if !kvm() {
        return;
    }
    // mov ecx, 300000; fld1; l: dec ecx; jnz l; mov al, 21; out 0xf4, al
    let code = [
        0x66, 0xb9, 0xe0, 0x93, 0x04, 0x00, 0xd9, 0xe8, 0x66, 0x49, 0x75, 0xfc, 0xb0, 0x15, 0xe6,
        0xf4,
    ];
    let r = run_flat(
        "fallback.bin",
        &code,
        "flat-real",
        0x7c00,
        &[
            "--engine",
            "hw",
            "--memory",
            "4M",
            "--fallback-engine",
            "bt",
            "--stats",
        ],
    );
    assert_eq!(r.status, (21 << 1) | 1, "{}", r.stderr);
    let switches: u64 = r
        .stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("engine switches"))
        .and_then(|v| v.trim().parse().ok())
        .expect("--stats counts engine switches");
    let plain = run_flat(
        "fallback.bin",
        &code,
        "flat-real",
        0x7c00,
        &["--engine", "hw", "--memory", "4M"],
    );
    if plain.status == r.status {
        assert_eq!(
            switches, 0,
            "this KVM runs x87 code in real mode: nothing fell back"
        );
        eprintln!("nothing to fall back from here: this KVM runs x87 code in real mode");
    } else {
        assert_eq!(
            plain.status, 4,
            "without a fallback the VM dies: {}",
            plain.stderr
        );
        assert_eq!(
            switches, 2,
            "to bt at the fld1, back to hw after it:\n{}",
            r.stderr
        );
    }
}
