//! "A guest must never crash popek": random guests — random bytes mixed with
//! port I/O to every device and the hypercall doorbell — run on the whole VM
//! (machine, devices, VMM loop) on each software engine. Each run is cut
//! after a bounded number of instructions; whatever the guest does must end
//! in an ordinary outcome, never a panic.
//!
//! `POPEK_VM_FUZZ_CASES` scales the case count (default 48 per engine and
//! mode).

use std::io::Write;

use popek_machine::ClockMode;
use popek_vmm::{EngineKind, FileFormat, KernelSource, Vm, VmConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Ports of the machine's devices, the POST port and the doorbell.
const PORTS: &[u16] = &[
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x60, 0x64, 0x3f8, 0x3f9,
    0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x600, 0x602, 0x604, 0x608, 0x4d0, 0x4d1, 0x80,
    0x5650,
];

#[derive(Clone, Debug)]
enum Piece {
    Bytes(Vec<u8>),
    /// mov dx, port; mov eax, value; out/in dx with size
    Io {
        port: u16,
        value: u32,
        size: u8,
        out: bool,
    },
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 1..24).prop_map(Piece::Bytes),
        (
            prop::sample::select(PORTS),
            any::<u32>(),
            prop::sample::select(&[1u8, 2, 4][..]),
            any::<bool>()
        )
            .prop_map(|(port, value, size, out)| Piece::Io {
                port,
                value,
                size,
                out
            }),
    ]
}

/// Encodes the pieces for 16-bit (real mode) or 32-bit code.
fn encode(pieces: &[Piece], bits32: bool) -> Vec<u8> {
    let mut code = Vec::new();
    // The operand-size prefix that reaches 16 bits in 32-bit code and the
    // other way round.
    let p16 = |c: &mut Vec<u8>| {
        if bits32 {
            c.push(0x66)
        }
    };
    let p32 = |c: &mut Vec<u8>| {
        if !bits32 {
            c.push(0x66)
        }
    };
    for p in pieces {
        match p {
            Piece::Bytes(b) => code.extend_from_slice(b),
            Piece::Io {
                port,
                value,
                size,
                out,
            } => {
                p16(&mut code);
                code.push(0xba); // mov dx, imm16
                code.extend_from_slice(&port.to_le_bytes());
                p32(&mut code);
                code.push(0xb8); // mov eax, imm32
                code.extend_from_slice(&value.to_le_bytes());
                match size {
                    1 => {}
                    2 => p16(&mut code),
                    _ => p32(&mut code),
                }
                code.push(match (size, out) {
                    (1, true) => 0xee,
                    (1, false) => 0xec,
                    (_, true) => 0xef,
                    (_, false) => 0xed,
                });
            }
        }
    }
    code
}

fn run_case(
    engine: EngineKind,
    code: &[u8],
    protected: bool,
    n: usize,
) -> Result<(), TestCaseError> {
    let dir = std::env::temp_dir().join(format!("popek-vm-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.join(format!("case-{}-{n}.bin", engine.name()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(code))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let format = if protected {
        FileFormat::FlatProtected {
            load_addr: 0x100000,
        }
    } else {
        FileFormat::FlatReal { load_addr: 0x7c00 }
    };
    let cfg = VmConfig {
        memory: 4 << 20,
        kernel: KernelSource::File {
            path: path.clone(),
            format: Some(format),
        },
        initrd: None,
        cmdline: String::new(),
        engine,
        clock: ClockMode::Virtual,
        vendor: None,
    };
    if std::env::var_os("POPEK_VM_FUZZ_TRACE").is_some() {
        eprintln!("case {n}: {}", path.display());
    }
    let mut vm =
        Vm::new(&cfg, Box::new(std::io::sink())).map_err(|e| TestCaseError::fail(e.to_string()))?;
    if let Some(outcome) = vm.run_limited(100_000) {
        let st = outcome.exit_status();
        prop_assert!(
            st == 0 || st % 2 == 1 || [2, 4, 6].contains(&st),
            "status {st} for {outcome:?}"
        );
    }
    if std::env::var_os("POPEK_VM_FUZZ_TRACE").is_none() {
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

fn fuzz(engine: EngineKind, protected: bool) {
    let cases = std::env::var("POPEK_VM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let n = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&prop::collection::vec(piece(), 1..40), |pieces| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            run_case(engine, &encode(&pieces, protected), protected, i)
        })
        .unwrap();
    eprintln!(
        "vm fuzz: {cases} cases on {} ({} mode)",
        engine.name(),
        if protected { "protected" } else { "real" }
    );
}

#[test]
fn random_guests_never_crash_popek_on_interp() {
    fuzz(EngineKind::Interp, false);
    fuzz(EngineKind::Interp, true);
}

#[test]
fn random_guests_never_crash_popek_on_bt() {
    if !EngineKind::Bt.available() {
        eprintln!("skipped: the bt engine is not available on this host");
        return;
    }
    fuzz(EngineKind::Bt, false);
    fuzz(EngineKind::Bt, true);
}

#[test]
fn random_guests_never_crash_popek_on_trap() {
    if !EngineKind::Trap.available() {
        eprintln!("skipped: the trap engine is not available on this host");
        return;
    }
    // Protected mode only: trap refuses real mode before the guest runs.
    fuzz(EngineKind::Trap, true);
}
