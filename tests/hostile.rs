//! Hostile guests: small flat binaries that attack popek's isolation or
//! its resources, run through the `popek` binary on the software engines.
//! Each run is a child process whose peak RSS is measured (`wait4`'s
//! `ru_maxrss`), so that a guest that makes popek grow is caught whatever
//! the engine reserves as address space.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, Instruction, MemoryOperand, Register};

mod support;
use support::*;

/// Runs a flat binary under the virtual clock (reproducible runs).
fn run_virtual(name: &str, code: &[u8], format: &str, load: u64, extra: &[&str]) -> Run {
    let extra = [&["--clock", "virtual"][..], extra].concat();
    run_flat(name, code, format, load, &extra)
}

/// popek's fixed allowance over guest RAM (docs/security.md).
const RSS_ALLOWANCE: u64 = 64 << 20;

/// No signal ended popek, and its peak RSS stayed within guest RAM plus
/// the allowance.
fn assert_bounded(r: &Run, what: &str, guest_ram: u64) {
    assert_eq!(
        r.signal, None,
        "{what}: popek killed by a signal\n{}",
        r.stderr
    );
    assert!(
        r.max_rss <= guest_ram + RSS_ALLOWANCE,
        "{what}: peak RSS {} MiB for {} MiB of guest RAM",
        r.max_rss >> 20,
        guest_ram >> 20
    );
}

const LOAD: u64 = 0x10_0000;
/// Scratch memory of the guests below (inside 4 MiB of RAM).
const DATA: i32 = 0x20_0000;

fn gdt_entry(base: u32, limit: u32, access: u8, flags: u8) -> u64 {
    (limit as u64 & 0xffff)
        | ((base as u64 & 0xff_ffff) << 16)
        | ((access as u64) << 40)
        | (((limit as u64 >> 16) & 0xf) << 48)
        | (((flags & 0xf) as u64) << 52)
        | (((base >> 24) as u64) << 56)
}

/// Where the guests below keep their tables: GDT, IDT, and the GDTR and
/// IDTR images.
const GDT: u64 = LOAD + 0x1000;
const IDT: u64 = LOAD + 0x2000;
const TABLE_REGS: u64 = LOAD + 0x3000;

/// A flat-protected guest image: `code` (assembled at [`LOAD`], which must
/// start by loading the tables and reloading the segments with
/// [`prologue`]) followed by its GDT (`entries` after a null, flat code
/// 0x08 and flat data 0x10) and an IDT whose every gate leads to the code
/// at label `handler`.
fn image(mut a: CodeAssembler, handler: CodeLabel, entries: &[u64]) -> Vec<u8> {
    let r = a
        .assemble_options(LOAD, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
        .unwrap();
    let h = r.label_ip(&handler).unwrap() as u32;
    let mut img = r.inner.code_buffer.clone();
    assert!(img.len() <= 0x1000, "guest code too large");
    img.resize(0x4000, 0);
    let mut gdt = vec![
        0,
        gdt_entry(0, 0xfffff, 0x9a, 0xc),
        gdt_entry(0, 0xfffff, 0x92, 0xc),
    ];
    gdt.extend_from_slice(entries);
    for (i, e) in gdt.iter().enumerate() {
        let o = (GDT - LOAD) as usize + i * 8;
        img[o..o + 8].copy_from_slice(&e.to_le_bytes());
    }
    for v in 0..32 {
        // 32-bit interrupt gate, DPL 0, to 0x08:handler.
        let gate =
            (h as u64 & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((h as u64 >> 16) << 48);
        let o = (IDT - LOAD) as usize + v * 8;
        img[o..o + 8].copy_from_slice(&gate.to_le_bytes());
    }
    let o = (TABLE_REGS - LOAD) as usize;
    img[o..o + 2].copy_from_slice(&((gdt.len() * 8 - 1) as u16).to_le_bytes());
    img[o + 2..o + 6].copy_from_slice(&(GDT as u32).to_le_bytes());
    img[o + 8..o + 10].copy_from_slice(&(32u16 * 8 - 1).to_le_bytes());
    img[o + 10..o + 14].copy_from_slice(&(IDT as u32).to_le_bytes());
    img
}

/// LGDT, LIDT, CS = 0x08 (through RETF), DS = ES = SS = 0x10, ESP.
fn prologue(a: &mut CodeAssembler) {
    a.mov(esp, 0x30_0000).unwrap();
    a.lgdt(dword_ptr(TABLE_REGS as i32)).unwrap();
    a.lidt(dword_ptr(TABLE_REGS as i32 + 8)).unwrap();
    let mut go = a.create_label();
    a.push(0x08).unwrap();
    a.call(go).unwrap(); // pushes the address of the RETF's target
    a.set_label(&mut go).unwrap();
    a.add(dword_ptr(esp), 5).unwrap(); // past this ADD (5 bytes) and the RETF
    a.retf().unwrap();
    a.mov(ax, 0x10).unwrap();
    a.mov(ds, ax).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(ss, ax).unwrap();
    a.mov(esp, 0x30_0000).unwrap();
}

/// Prints the string on COM1.
fn print(a: &mut CodeAssembler, s: &[u8]) {
    a.mov(edx, 0x3f8).unwrap();
    for &b in s {
        a.mov(al, b as i32).unwrap();
        a.out(dx, al).unwrap();
    }
}

/// Prints `[DATA]` as two decimal digits.
fn print_count(a: &mut CodeAssembler) {
    a.mov(eax, dword_ptr(DATA)).unwrap();
    a.mov(ecx, 10).unwrap();
    a.xor(edx, edx).unwrap();
    a.div(ecx).unwrap();
    a.mov(ecx, edx).unwrap();
    a.mov(edx, 0x3f8).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(al, cl).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.out(dx, al).unwrap();
}

/// The `trap` isolation attack: data segments that a deprivileged guest
/// kernel may load and that, as it wrote them, reach the monitor's top
/// 4 MiB of linear space (where its shadow page directory, GDT, IDT and
/// TSS live). Every access through them at an offset that lands there
/// must fault under `trap`; on `interp` (no monitor in the guest's linear
/// space) the same accesses succeed. A segment whose expand-down offsets
/// wrap to low memory must still read and write guest RAM.
///
/// Prints "faults NN" and "wrap ok" or "wrap bad"; exits with status 0x21.
fn segment_attack() -> (Vec<u8>, u32) {
    // (descriptor, offset, write); each access is one 6-byte instruction.
    let table: &[(u64, u32, bool)] = &[
        // Expand-down, base 0, limit 0, G = 1: offsets 0x1000..4 GiB.
        (gdt_entry(0, 0, 0x96, 0xc), 0xffc0_0000, false),
        (gdt_entry(0, 0, 0x96, 0xc), 0xffc1_2000, true),
        (gdt_entry(0, 0, 0x96, 0xc), 0xffff_fff0, false),
        // Expand-down with a 16-bit top, based just below the monitor.
        (gdt_entry(0xffbf_8000, 0, 0x96, 0x0), 0x8000, false),
        // A base at the monitor's area, limit 0, G = 1 (the 4 KiB window).
        (gdt_entry(0xffc0_0000, 0, 0x92, 0x8), 0, false),
        (gdt_entry(0xffc0_0000, 0, 0x92, 0x8), 0x10, true),
        // A base above it.
        (gdt_entry(0xffc1_3000, 0, 0x92, 0xc), 4, true),
        // A flat segment whose base is not page-aligned: its last bytes.
        (gdt_entry(0x10, 0xfffff, 0x92, 0xc), 0xffbf_fff0, false),
        (gdt_entry(0x10, 0xfffff, 0x92, 0xc), 0xffbf_fffc, true),
        // Plain flat data: the top 4 MiB itself (last: emulated by trap).
        (gdt_entry(0, 0xfffff, 0x92, 0xc), 0xffc0_0008, true),
    ];
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    a.mov(dword_ptr(DATA), 0).unwrap(); // faults counted
    for (i, &(_, off, write)) in table.iter().enumerate() {
        a.mov(ax, ((i + 3) * 8) as i32).unwrap();
        a.mov(es, ax).unwrap();
        let mem = MemoryOperand::with_displ(off as u64, 4);
        let mut ins = if write {
            Instruction::with2(Code::Mov_moffs32_EAX, mem, Register::EAX)
        } else {
            Instruction::with2(Code::Mov_EAX_moffs32, Register::EAX, mem)
        }
        .unwrap();
        ins.set_segment_prefix(Register::ES);
        a.add_instruction(ins).unwrap();
    }
    // The wrap case: base 4 MiB, expand-down (B = 1, G = 1) above
    // 0xffbf_ffff: offset 0xffc0_0000 + x is linear x.
    let wrap_sel = ((table.len() + 3) * 8) as i32;
    let wrapped = |x: i32| dword_ptr(0xffc0_0000u64 + x as u64).es();
    a.mov(dword_ptr(DATA + 8), 0x1234_5678).unwrap();
    a.mov(dword_ptr(DATA + 12), 0).unwrap();
    a.mov(ax, wrap_sel).unwrap();
    a.mov(es, ax).unwrap();
    a.mov(eax, wrapped(DATA + 8)).unwrap();
    a.add(wrapped(DATA + 12), 7).unwrap();
    a.mov(dword_ptr(DATA + 4), eax).unwrap();
    print(&mut a, b"faults ");
    print_count(&mut a);
    let (mut bad, mut end) = (a.create_label(), a.create_label());
    a.cmp(dword_ptr(DATA + 4), 0x1234_5678).unwrap();
    a.jne(bad).unwrap();
    a.cmp(dword_ptr(DATA + 12), 7).unwrap();
    a.jne(bad).unwrap();
    print(&mut a, b"\nwrap ok\n");
    a.jmp(end).unwrap();
    a.set_label(&mut bad).unwrap();
    print(&mut a, b"\nwrap bad\n");
    a.set_label(&mut end).unwrap();
    a.mov(al, 0x10).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    // Every vector: count, skip the 6-byte access, return (#GP and #SS
    // push an error code).
    let mut handler = a.create_label();
    a.set_label(&mut handler).unwrap();
    a.inc(dword_ptr(DATA)).unwrap();
    a.add(dword_ptr(esp + 4), 6).unwrap();
    a.add(esp, 4).unwrap();
    a.iretd().unwrap();
    let mut entries: Vec<u64> = table.iter().map(|t| t.0).collect();
    entries.push(gdt_entry(0x40_0000, 0xffbff, 0x96, 0xc));
    (image(a, handler, &entries), table.len() as u32)
}

#[test]
fn trap_confines_every_segment_below_the_monitor() {
    let (code, n) = segment_attack();
    let t = run_virtual(
        "segments.bin",
        &code,
        "flat-protected",
        LOAD,
        &["--engine", "trap", "--memory", "4M"],
    );
    assert_bounded(&t, "trap", 4 << 20);
    assert_eq!(t.status, 0x21, "{}\n{}", t.stdout, t.stderr);
    // Every access into the monitor's area faults, but the one through a
    // plain flat segment, which the monitor emulates against the guest's
    // own (here unassigned) memory at that address.
    assert!(
        t.stdout.contains(&format!("faults {:02}", n - 1)),
        "every access into the monitor's area faults under trap:\n{}",
        t.stdout
    );
    assert!(t.stdout.contains("wrap ok"), "{}", t.stdout);
    // The same accesses are fine on a CPU with no monitor in the way.
    let i = run_virtual(
        "segments.bin",
        &code,
        "flat-protected",
        LOAD,
        &["--engine", "interp", "--memory", "4M"],
    );
    assert_eq!(i.status, 0x21, "{}\n{}", i.stdout, i.stderr);
    assert!(i.stdout.contains("faults 00"), "{}", i.stdout);
    assert!(i.stdout.contains("wrap ok"), "{}", i.stdout);
}

/// Calls every byte offset of 64 pages of NOPs with a RET every 128 bytes:
/// 262,144 distinct entry points, each a new decoded block (and a new TU
/// key for `bt`). Before the caches were bounded this drove interp, bt
/// and trap past 1 GB. Exits with status 0x21.
fn every_entry_point() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let (mut fill, mut call) = (a.create_label(), a.create_label());
    a.mov(esp, 0x30_0000).unwrap();
    a.mov(edi, DATA).unwrap();
    a.mov(ecx, 64 * 4096).unwrap();
    a.mov(al, 0x90).unwrap();
    a.rep().stosb().unwrap();
    a.mov(edi, DATA + 127).unwrap();
    a.set_label(&mut fill).unwrap();
    a.mov(byte_ptr(edi), 0xc3).unwrap();
    a.add(edi, 128).unwrap();
    a.cmp(edi, DATA + 64 * 4096).unwrap();
    a.jb(fill).unwrap();
    a.mov(esi, DATA).unwrap();
    a.set_label(&mut call).unwrap();
    a.call(esi).unwrap();
    a.inc(esi).unwrap();
    a.cmp(esi, DATA + 64 * 4096).unwrap();
    a.jb(call).unwrap();
    a.mov(al, 0x10).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    a.assemble(LOAD).unwrap()
}

/// Jumps into zeroed RAM: `add [eax], al` all the way to the end of RAM
/// (and beyond, where the bytes read as all-ones: #UD, no IDT, triple
/// fault). Every block is new. At 512 MiB this reached 11.7 GB (interp),
/// 15.7 GB (bt) and 17.2 GB (trap) within a minute.
fn zeroed_ram() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(eax, 0x1000).unwrap();
    a.mov(ebx, DATA).unwrap();
    a.jmp(ebx).unwrap();
    a.assemble(LOAD).unwrap()
}

#[test]
fn a_guest_entering_code_everywhere_stays_within_its_memory_bound() {
    let code = every_entry_point();
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "entries.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "4M", "--stats"],
        );
        println!(
            "every entry point on {engine}: peak RSS {:.1} MiB",
            r.max_rss as f64 / 1048576.0
        );
        assert_bounded(&r, engine, 4 << 20);
        assert_eq!(r.status, 0x21, "{engine}: {}", r.stderr);
    }
}

#[test]
fn a_guest_running_through_zeroed_ram_stays_within_its_memory_bound() {
    let code = zeroed_ram();
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "zeroes.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "64M"],
        );
        println!(
            "zeroed RAM on {engine}: status {}, peak RSS {:.1} MiB",
            r.status,
            r.max_rss as f64 / 1048576.0
        );
        assert_bounded(&r, engine, 64 << 20);
        assert_eq!(
            r.status, 4,
            "{engine}: the guest dies at the end of RAM\n{}",
            r.stderr
        );
    }
}

/// Prints EAX as eight hex digits and a newline on COM1.
fn print_eax_hex(a: &mut CodeAssembler) {
    let (mut pr, mut digit) = (a.create_label(), a.create_label());
    a.mov(ebx, eax).unwrap();
    a.mov(ecx, 8).unwrap();
    a.mov(edx, 0x3f8).unwrap();
    a.set_label(&mut pr).unwrap();
    a.rol(ebx, 4).unwrap();
    a.mov(al, bl).unwrap();
    a.and(al, 0xf).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.cmp(al, b'9' as i32).unwrap();
    a.jbe(digit).unwrap();
    a.add(al, 7).unwrap();
    a.set_label(&mut digit).unwrap();
    a.out(dx, al).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(pr).unwrap();
    a.mov(al, 0x0a).unwrap();
    a.out(dx, al).unwrap();
}

/// A guest whose IDT entry for #UD is `bad` (the other gates lead to a
/// handler that prints the error code on the stack and exits), then UD2.
fn delivery_fault(bad_gate: Option<u64>, extra_gdt: &[u64]) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    a.ud2().unwrap();
    let mut handler = a.create_label();
    a.set_label(&mut handler).unwrap();
    a.mov(eax, dword_ptr(esp)).unwrap();
    print_eax_hex(&mut a);
    a.mov(al, 0x10).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    let mut img = image(a, handler, extra_gdt);
    if let Some(g) = bad_gate {
        let o = (IDT - LOAD) as usize + 6 * 8;
        img[o..o + 8].copy_from_slice(&g.to_le_bytes());
    }
    img
}

/// What `trap` does where the other engines agree with each other:
/// the error code of a #NP raised while delivering an exception carries
/// EXT (0x33 through a not-present gate for #UD, 0x29 through a gate to a
/// not-present code segment 0x28), and a push at ESP = 2 whose #SS cannot
/// be delivered either ends in a triple fault.
#[test]
fn trap_delivers_faults_during_delivery_as_the_cpu_does() {
    let gate = |sel: u64, present: bool| {
        let h = LOAD + 0x10; // any offset: the fault comes first
        (h & 0xffff) | (sel << 16) | ((0x0e00 | (present as u64) << 15) << 32) | ((h >> 16) << 48)
    };
    let cases: [(&str, Vec<u8>, &str); 2] = [
        (
            "gate.bin",
            delivery_fault(Some(gate(0x08, false)), &[]),
            "00000033",
        ),
        (
            "segment.bin",
            // GDT index 5 (0x28): code, not present.
            delivery_fault(
                Some(gate(0x28, true)),
                &[
                    gdt_entry(0, 0xfffff, 0x92, 0xc),
                    gdt_entry(0, 0xfffff, 0x92, 0xc),
                    gdt_entry(0, 0xfffff, 0x1a, 0xc),
                ],
            ),
            "00000029",
        ),
    ];
    for (name, code, want) in &cases {
        for engine in ["interp", "bt", "trap"] {
            let r = run_virtual(
                name,
                code,
                "flat-protected",
                LOAD,
                &["--engine", engine, "--memory", "8M"],
            );
            assert_eq!(
                r.status, 0x21,
                "{engine} {name}: {}\n{}",
                r.stdout, r.stderr
            );
            assert_eq!(r.stdout.trim(), *want, "{engine} {name}: #NP's error code");
        }
    }
    // push at ESP = 2: #SS, whose frame does not fit either: #DF, whose
    // frame does not fit: triple fault.
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    a.mov(esp, 2).unwrap();
    a.push(eax).unwrap();
    a.hlt().unwrap();
    let mut handler = a.create_label();
    a.set_label(&mut handler).unwrap();
    a.hlt().unwrap();
    let code = image(a, handler, &[]);
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "esp2.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "8M"],
        );
        assert_eq!(r.status, 4, "{engine}: triple fault\n{}", r.stderr);
        assert!(r.stderr.contains("triple fault"), "{engine}: {}", r.stderr);
    }
}

/// Ends a guest with status 0x21 (debug-exit 0x10), and gives it an
/// exception handler that prints the dword on top of its stack (the error
/// code, or the return address of a vector without one) and exits with
/// status 0x23: the image, with `entries` in its GDT from 0x18.
fn exit_or_report(mut a: CodeAssembler, entries: &[u64]) -> Vec<u8> {
    a.mov(al, 0x10).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    let mut handler = a.create_label();
    a.set_label(&mut handler).unwrap();
    // Any exception: print the vector's return address and stop.
    a.mov(eax, dword_ptr(esp)).unwrap();
    print_eax_hex(&mut a);
    a.mov(al, 0x11).unwrap();
    a.out(0xf4, al).unwrap();
    image(a, handler, entries)
}

/// Memory outside RAM, paging off: reads give all-ones and writes are
/// dropped, at every address the PC leaves unassigned — just past RAM, in
/// the middle of the 4 GiB, two pages of the MMIO window no device holds, a
/// dword straddling the end of RAM, and the top dword of the 4 GiB (in
/// what `trap`'s monitor occupies of the linear space). Prints each value
/// read; `trap` must print what `interp` and `bt` print.
fn outside_ram(ram: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    // Writes first (each must be dropped), then reads.
    for addr in [
        ram + 0x1000,
        0xc000_0000,
        0xfd00_0000,
        0xfebf_f000,
        0xffff_fffc,
    ] {
        a.mov(dword_ptr(addr as u64), 0x1234_5678).unwrap();
    }
    a.mov(dword_ptr(ram as u64 - 4), 0x5566_7788).unwrap();
    for addr in [
        ram + 0x1000,
        ram + 0x10_0000,
        0xc000_0000,
        0xfd00_0000,
        0xfebf_f000,
        ram - 2,
        0xffff_fffc,
    ] {
        a.mov(eax, dword_ptr(addr as u64)).unwrap();
        print_eax_hex(&mut a);
    }
    exit_or_report(a, &[])
}

#[test]
fn memory_outside_ram_behaves_alike_on_every_engine() {
    let code = outside_ram(8 << 20);
    let want = "FFFFFFFF\nFFFFFFFF\nFFFFFFFF\nFFFFFFFF\nFFFFFFFF\nFFFF5566\nFFFFFFFF\n";
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "outside.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "8M", "--stats"],
        );
        assert_eq!(r.status, 0x21, "{engine}: {}\n{}", r.stdout, r.stderr);
        assert_eq!(r.stdout, want, "{engine}");
    }
}

/// Random programs (random bytes after CLI, in real and in 32-bit
/// protected mode) in child `popek` processes: whatever they do, popek
/// ends with one of its statuses — never a signal — within its memory
/// bound. `POPEK_HOSTILE_RANDOM` sets the number per engine and mode
/// (default 12); the in-process fuzzer (`crates/vmm/tests/fuzz_vm.rs`)
/// runs many more and compares the engines' states.
#[test]
fn random_programs_end_cleanly_in_child_processes() {
    let n: u64 = std::env::var("POPEK_HOSTILE_RANDOM")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut x: u64 = 0x686f_7374_696c_6521;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut peak = 0u64;
    for i in 0..n {
        let mut code = vec![0xfa];
        code.extend((0..4096).map(|_| next() as u8));
        for (mode, load) in [("flat-real", 0x7c00), ("flat-protected", LOAD)] {
            for engine in ["interp", "bt", "trap", "hw"] {
                if engine == "trap" && mode == "flat-real" {
                    continue;
                }
                if engine == "hw" && std::fs::File::open("/dev/kvm").is_err() {
                    if i == 0 {
                        println!("hw: no /dev/kvm here, its random programs are skipped");
                    }
                    continue;
                }
                let r = run_virtual(
                    &format!("random-{i}.bin"),
                    &code,
                    mode,
                    load,
                    &[
                        "--engine",
                        engine,
                        "--memory",
                        "8M",
                        "--max-instructions",
                        "300000",
                    ],
                );
                assert_bounded(&r, engine, 8 << 20);
                assert!(
                    r.status == 0 || r.status % 2 == 1 || [2, 4, 6].contains(&r.status),
                    "random program {i} ({mode}) on {engine}: status {}\n{}",
                    r.status,
                    r.stderr
                );
                assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
                peak = peak.max(r.max_rss);
            }
        }
    }
    println!(
        "{n} random programs per engine and mode: peak RSS {:.1} MiB",
        peak as f64 / 1048576.0
    );
}

/// One instruction that stores to two guest page-table pages at once: a
/// dword across the boundary between the page directory and the page
/// table after it (the directory's last entry and the table's first).
/// `trap` write-protects both; its store emulation must keep both open
/// until the instruction completes (re-protecting the first before the
/// second ended in endless nested emulation and a host stack overflow),
/// then resynchronize: the table's new entry maps linear page 0 to
/// [`DATA`]. Prints the dword read through that page and the directory's
/// last entry; exits with status 0x21.
fn store_across_page_tables() -> Vec<u8> {
    const PDIR: i32 = 0x11_0000;
    const PT: i32 = PDIR + 0x1000;
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    a.mov(dword_ptr(DATA), 0x600d_cafe_u32 as i32).unwrap();
    // Identity map of the first 4 MiB but page 0: not present, frame DATA.
    a.mov(ecx, 1).unwrap();
    let mut fill = a.create_label();
    a.set_label(&mut fill).unwrap();
    a.mov(eax, ecx).unwrap();
    a.shl(eax, 12).unwrap();
    a.or(eax, 3).unwrap();
    a.mov(dword_ptr(ecx * 4 + PT), eax).unwrap();
    a.inc(ecx).unwrap();
    a.cmp(ecx, 1024).unwrap();
    a.jne(fill).unwrap();
    a.mov(dword_ptr(PT), DATA).unwrap();
    a.mov(dword_ptr(PDIR), PT | 3).unwrap();
    a.mov(eax, PDIR).unwrap();
    a.mov(cr3, eax).unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(eax, 0x8000_0000_u32 as i32).unwrap();
    a.mov(cr0, eax).unwrap();
    // Bytes 21 43 to the directory's last entry, 03 00 to the table's
    // first (present, writable).
    a.mov(dword_ptr(PDIR + 0xffe), 0x0003_4321).unwrap();
    a.mov(eax, dword_ptr(0)).unwrap();
    print_eax_hex(&mut a);
    a.mov(eax, dword_ptr(PDIR + 0xffc)).unwrap();
    print_eax_hex(&mut a);
    exit_or_report(a, &[])
}

#[test]
fn a_store_across_two_page_tables_completes_on_every_engine() {
    let code = store_across_page_tables();
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "two-tables.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "4M"],
        );
        assert_eq!(r.signal, None, "{engine}: {}", r.stderr);
        assert_eq!(r.status, 0x21, "{engine}: {}\n{}", r.stdout, r.stderr);
        assert_eq!(r.stdout, "600DCAFE\n43210000\n", "{engine}");
    }
}

/// LGDT whose 6-byte operand runs past its data segment's limit: #GP(0)
/// at ring 0, before any table is loaded. `trap` emulates LGDT (it traps
/// at the guest kernel's ring 1) and must check the operand's segment as
/// the CPU does; it once read past the limit and loaded the GDTR. Exits
/// through the exception handler with status 0x23 after printing the
/// error code.
fn lgdt_past_the_limit() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    a.mov(ax, 0x18).unwrap();
    a.mov(ds, ax).unwrap();
    a.lgdt(dword_ptr(0xffc)).unwrap();
    exit_or_report(a, &[gdt_entry(0, 0xfff, 0x92, 0x4)])
}

#[test]
fn an_emulated_lgdt_checks_its_operand_segment() {
    let code = lgdt_past_the_limit();
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "lgdt-limit.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "4M"],
        );
        assert_eq!(r.status, 0x23, "{engine}: {}\n{}", r.stdout, r.stderr);
        assert_eq!(r.stdout, "00000000\n", "{engine}: #GP(0)");
    }
}

/// A REP INSW that overwrites its own bytes (all-ones from an unassigned
/// port: an invalid opcode) with its first store.
/// Every engine pauses a REP string instruction after the same number of
/// iterations and fetches it again ([`popek_cpu::REP_CHUNK`]), so every
/// engine then meets the overwritten bytes at the same point; `trap`, which
/// emulates the port I/O, once ran all iterations at once and went on past
/// it. Exits through the exception handler (status 0x23).
fn rep_ins_over_itself() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    prologue(&mut a);
    // EDI := the REP INSW itself, DF = 1: the first store overwrites it,
    // the rest go down over the code already run (the handler, GDT and IDT
    // above it stay). CALL/POP gives the address of the POP, 15 bytes
    // before it (POP 1, ADD with imm8 3, MOV 5, MOV 5, STD 1).
    let mut here = a.create_label();
    a.call(here).unwrap();
    a.set_label(&mut here).unwrap();
    a.pop(edi).unwrap();
    a.add(edi, 15).unwrap();
    a.mov(ecx, 0x2000).unwrap();
    a.mov(edx, 0x3000).unwrap();
    a.std().unwrap();
    a.rep().insw().unwrap();
    exit_or_report(a, &[])
}

#[test]
fn a_rep_ins_over_its_own_code_ends_alike_on_every_engine() {
    let code = rep_ins_over_itself();
    let mut outputs = Vec::new();
    for engine in ["interp", "bt", "trap"] {
        let r = run_virtual(
            "rep-ins.bin",
            &code,
            "flat-protected",
            LOAD,
            &["--engine", engine, "--memory", "4M"],
        );
        assert_eq!(r.status, 0x23, "{engine}: {}\n{}", r.stdout, r.stderr);
        outputs.push(r.stdout);
    }
    assert_eq!(outputs[0], outputs[1], "bt");
    assert_eq!(outputs[0], outputs[2], "trap");
    // Stopped after each count around the REP (a paused chunk retires as
    // an instruction on every engine): the same state everywhere.
    for n in 14..24u32 {
        let n = n.to_string();
        let dumps: Vec<String> = ["interp", "bt", "trap"]
            .iter()
            .map(|engine| {
                let r = run_virtual(
                    "rep-ins.bin",
                    &code,
                    "flat-protected",
                    LOAD,
                    &[
                        "--engine",
                        engine,
                        "--memory",
                        "4M",
                        "--max-instructions",
                        &n,
                    ],
                );
                r.stderr
                    .lines()
                    .filter(|l| l.contains("EAX=") || l.contains("EIP="))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        assert_eq!(dumps[0], dumps[1], "bt after {n} instructions");
        assert_eq!(dumps[0], dumps[2], "trap after {n} instructions");
    }
}
