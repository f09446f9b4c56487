//! Starting from firmware as a PC does (`--firmware`): a small ROM of the
//! project's own (assembled here with iced-x86) runs from the reset vector,
//! checks the architectural reset state and fw_cfg, and reports through the
//! POST port and the debug-exit port, on `interp`, `bt` and `hw`; Debian's
//! SeaBIOS reaches its boot menu on the serial console (two vCPUs on `bt`,
//! one on `hw`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::{
    al, ax, dword_ptr, dx, eax, ebx, ecx, edx, esp, CodeAssembler, IcedError,
};

mod support;
use support::*;

/// The debug-exit value of a ROM that passed every check.
const PASSED: u8 = 0x21;
const ROM_SIZE: usize = 64 << 10;
const RAM: u32 = 16 << 20;

type Asm = CodeAssembler;

/// Writes `stage` to the POST port; on failure the same value goes to
/// the debug-exit port.
fn post(a: &mut Asm, stage: u8) -> Result<(), IcedError> {
    a.mov(al, u32::from(stage))?;
    a.out(0x80, al)
}

fn fail(a: &mut Asm, stage: u8) -> Result<(), IcedError> {
    a.mov(al, u32::from(stage))?;
    a.out(0xf4, al)?;
    a.hlt()
}

/// Fails with `stage` unless EAX == `want`.
fn expect_eax(a: &mut Asm, want: u32, stage: u8) -> Result<(), IcedError> {
    let mut ok = a.create_label();
    a.cmp(eax, want)?;
    a.je(ok)?;
    fail(a, stage)?;
    a.set_label(&mut ok)?;
    a.nop()
}

/// Reads `n` (≤ 4) bytes of fw_cfg item `key` into EAX, little-endian.
fn fw_cfg_read(a: &mut Asm, key: u16, n: u32) -> Result<(), IcedError> {
    a.mov(ax, u32::from(key))?;
    a.mov(dx, 0x510u32)?;
    a.out(dx, ax)?;
    a.mov(dx, 0x511u32)?;
    a.xor(ebx, ebx)?;
    for i in 0..n {
        a.in_(al, dx)?;
        a.movzx(ecx, al)?;
        a.shl(ecx, 8 * i)?;
        a.or(ebx, ecx)?;
    }
    a.mov(eax, ebx)
}

/// The ROM's code, at F000:0000 (the start of its low alias, 0xF0000).
/// The reset vector's far jump got here from 0xFFFFFFF0, the high alias.
fn rom_code(a: &mut Asm) -> Result<(), IcedError> {
    // Keep the registers as RESET left them before anything clobbers them.
    a.mov(iced_x86::code_asm::ebp, edx)?;
    a.mov(iced_x86::code_asm::esi, eax)?;
    a.mov(iced_x86::code_asm::edi, esp)?;
    // 1: EAX 0 (no BIST), ESP 0.
    post(a, 1)?;
    a.mov(eax, iced_x86::code_asm::esi)?;
    expect_eax(a, 0, 1)?;
    a.mov(eax, iced_x86::code_asm::edi)?;
    expect_eax(a, 0, 1)?;
    // 2: EDX holds the processor signature CPUID leaf 1 reports.
    post(a, 2)?;
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.cmp(eax, iced_x86::code_asm::ebp)?;
    let mut sig = a.create_label();
    a.je(sig)?;
    fail(a, 2)?;
    a.set_label(&mut sig)?;
    a.nop()?;
    // 3: CR0 = 0x60000010 (CD, NW, ET); EFLAGS but the arithmetic flags
    // the compares set: 2; DS and SS 0.
    post(a, 3)?;
    a.mov(eax, iced_x86::code_asm::cr0)?;
    expect_eax(a, 0x6000_0010, 3)?;
    a.pushfd()?;
    a.pop(eax)?;
    a.and(eax, !0x8d5u32)?;
    expect_eax(a, 2, 3)?;
    a.xor(eax, eax)?;
    a.mov(ax, iced_x86::code_asm::ds)?;
    a.mov(ebx, eax)?;
    a.mov(ax, iced_x86::code_asm::ss)?;
    a.or(eax, ebx)?;
    expect_eax(a, 0, 3)?;
    // 4: the IDTR: base 0, limit 0xFFFF.
    post(a, 4)?;
    a.sidt(iced_x86::code_asm::ptr(0x500u32))?;
    a.movzx(eax, iced_x86::code_asm::word_ptr(0x500u32))?;
    expect_eax(a, 0xffff, 4)?;
    a.mov(eax, dword_ptr(0x502u32))?;
    expect_eax(a, 0, 4)?;
    // 5: IA32_APIC_BASE: the BSP's APIC, enabled, at 0xFEE00000.
    post(a, 5)?;
    a.mov(ecx, 0x1bu32)?;
    a.rdmsr()?;
    expect_eax(a, 0xfee0_0900, 5)?;
    // 6: fw_cfg: the signature, the RAM size, one vCPU.
    post(a, 6)?;
    fw_cfg_read(a, 0x00, 4)?;
    expect_eax(a, u32::from_le_bytes(*b"QEMU"), 6)?;
    fw_cfg_read(a, 0x03, 4)?;
    expect_eax(a, RAM, 6)?;
    fw_cfg_read(a, 0x05, 2)?;
    expect_eax(a, 1, 6)?;
    post(a, PASSED)?;
    fail(a, PASSED)
}

fn rom() -> Vec<u8> {
    let mut rom = vec![0xffu8; ROM_SIZE];
    let mut a = CodeAssembler::new(16).unwrap();
    rom_code(&mut a).unwrap();
    let code = a.assemble(0).unwrap();
    rom[..code.len()].copy_from_slice(&code);
    // The reset vector, 16 bytes below the top: JMP F000:0000.
    rom[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    rom
}

fn run_rom(engine: &str, extra: &[&str]) -> Run {
    let p = temp_file(&format!("rom-{engine}.bin"), &rom());
    let mut args = vec![
        "run",
        "--engine",
        engine,
        "--memory",
        "16M",
        "--firmware",
        p.to_str().unwrap(),
        "--stats",
    ];
    args.extend_from_slice(extra);
    popek_with(&args, &[])
}

/// The ROM passed every stage, and every stage's POST code came (the last
/// one the pass).
fn assert_rom_passed(engine: &str, r: &Run) {
    assert_eq!(
        r.status,
        (i32::from(PASSED) << 1) | 1,
        "{engine}: stage {} failed\n{}",
        (r.status - 1) / 2,
        r.stderr
    );
    assert!(
        r.stderr
            .contains("POST code (port 0x80)        0x21 (last of 7)"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("fw_cfg selector, data 0x510+2"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_rom_starts_at_the_reset_vector_and_finds_the_reset_state() {
    for engine in ["interp", "bt"] {
        assert_rom_passed(engine, &run_rom(engine, &["--clock", "virtual"]));
    }
}

/// On `hw` the ROM is a read-only KVM memory slot below 4 GiB; EDX holds
/// the host's signature, which KVM's CPUID reports.
#[test]
fn a_rom_starts_at_the_reset_vector_on_hw() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    assert_rom_passed("hw", &run_rom("hw", &[]));
}

#[test]
fn firmware_is_refused_where_it_cannot_run_and_when_malformed() {
    let r = run_rom("trap", &[]);
    assert_eq!(r.status, 2, "trap: {}", r.stderr);
    assert!(r.stderr.contains("cannot run this guest"), "{}", r.stderr);
    let p = temp_file("rom-odd.bin", &[0u8; 1000]);
    let r = popek_with(
        &["run", "--engine", "bt", "--firmware", p.to_str().unwrap()],
        &[],
    );
    assert_eq!(r.status, 2, "{}", r.stderr);
    assert!(r.stderr.contains("64 KiB units"), "{}", r.stderr);
}

/// Debian's SeaBIOS (`scripts/test.sh` installs the `seabios` package):
/// from the reset vector to its boot menu on the serial console, finding
/// both vCPUs through INIT/SIPI, on `bt`.
#[test]
fn seabios_reaches_its_boot_menu_on_the_serial_console() {
    seabios_boot_menu("bt", 2);
}

/// The same on `hw`, one vCPU (more are not run there yet).
#[test]
fn seabios_reaches_its_boot_menu_on_hw() {
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    seabios_boot_menu("hw", 1);
}

fn seabios_boot_menu(engine: &str, cpus: u32) {
    const BIOS: &str = "/usr/share/seabios/bios.bin";
    assert!(
        std::path::Path::new(BIOS).exists(),
        "{BIOS} is missing: install Debian's seabios package (scripts/test.sh does)"
    );
    let dir = std::env::temp_dir().join(format!("popek-seabios-{engine}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("debugcon.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_popek"))
        .args(["run", "--engine", engine, "--cpus", &cpus.to_string()])
        .args(["--memory", "64M"])
        .args(["--firmware", BIOS, "--debugcon", log.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let out = out.clone();
        let mut so = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut so, &mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let wait = |what: &str| {
        let t0 = Instant::now();
        while !text().contains(what) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "SeaBIOS never printed {what:?}:\n{}",
                text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("SeaBIOS (version");
    wait("Press ESC for boot menu.");
    stdin.write_all(b"\x1b").unwrap();
    stdin.flush().unwrap();
    wait("Select boot device:");
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let debug = std::fs::read_to_string(&log).unwrap();
    assert!(debug.contains("Found QEMU fw_cfg"), "{debug}");
    assert!(debug.contains(&format!("Found {cpus} cpu(s)")), "{debug}");
    assert!(debug.contains("id=8086:1237"), "{debug}");
    std::fs::remove_dir_all(dir).unwrap();
}
