//! Multiboot kernels wherever they load: linked in low memory (where the
//! loader's own structures would go) and entering real mode and back from
//! their 32-bit entry.

mod support;
use support::*;

use iced_x86::code_asm::*;

/// Where the low kernel is linked (as the third-party kernel that found
/// the defect).
const BASE: u32 = 0x8000;

fn asm(bits: u32, at: u32, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(at as u64).unwrap()
}

fn print(a: &mut CodeAssembler, s: &[u8]) -> Result<(), IcedError> {
    a.mov(dx, 0x3f8)?;
    for &b in s {
        a.mov(al, b as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// 32-bit entry at BASE: checks the loader's magic, prints "pm", loads its
/// own GDT and goes through 16-bit protected mode to real mode at 0:0x8300
/// ("rm"), back to 32-bit protected mode at 0x8400 ("back"), and exits
/// with status 0x21 (debug-exit 0x10); a wrong magic exits 0x13.
fn round_trip_kernel() -> Vec<u8> {
    let mut image = vec![0u8; 0x700];
    let mut put = |at: u32, bytes: &[u8]| {
        let o = (at - BASE) as usize;
        image[o..o + bytes.len()].copy_from_slice(bytes);
    };
    put(
        BASE,
        &asm(32, BASE, |a| {
            let mut bad = a.create_label();
            a.cmp(eax, 0x2BAD_B002)?;
            a.jne(bad)?;
            print(a, b"pm\n")?;
            a.lgdt(dword_ptr(0x8640))?;
            // JMP FAR 0x18:0x8200 (16-bit code).
            a.db(&[0xEA, 0x00, 0x82, 0x00, 0x00, 0x18, 0x00])?;
            a.set_label(&mut bad)?;
            a.mov(al, 0x9)?;
            a.out(0xf4, al)
        }),
    );
    put(
        0x8200,
        &asm(16, 0x8200, |a| {
            a.mov(ax, 0x20)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(ss, ax)?;
            a.mov(eax, cr0)?;
            a.and(eax, 0xFFFF_FFFE_u32 as i32)?;
            a.mov(cr0, eax)?;
            // JMP FAR 0:0x8300 (real mode).
            a.db(&[0xEA, 0x00, 0x83, 0x00, 0x00])
        }),
    );
    put(
        0x8300,
        &asm(16, 0x8300, |a| {
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(ss, ax)?;
            a.mov(sp, 0x7000)?;
            print(a, b"rm\n")?;
            a.mov(eax, cr0)?;
            a.or(eax, 1)?;
            a.mov(cr0, eax)?;
            // O32 JMP FAR 0x08:0x8400 (32-bit code).
            a.db(&[0x66, 0xEA, 0x00, 0x84, 0x00, 0x00, 0x08, 0x00])
        }),
    );
    put(
        0x8400,
        &asm(32, 0x8400, |a| {
            a.mov(ax, 0x10)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(ss, ax)?;
            a.mov(esp, 0x7000)?;
            print(a, b"back\n")?;
            a.mov(al, 0x10)?;
            a.out(0xf4, al)
        }),
    );
    // GDT: null, flat code32 0x08, flat data32 0x10, code16 0x18, data16 0x20.
    let gdt: [u64; 5] = [
        0,
        0x00CF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x0000_9A00_0000_FFFF,
        0x0000_9200_0000_FFFF,
    ];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    put(0x8600, &gdt_bytes);
    let mut gdtr = (gdt_bytes.len() as u16 - 1).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&0x8600u32.to_le_bytes());
    put(0x8640, &gdtr);
    // memsz as the reported kernel: past where the loader kept its
    // information (0x8000) and module list (0x9000).
    multiboot_elf(BASE, &image, 0x284c, BASE)
}

#[test]
fn a_kernel_linked_at_0x8000_round_trips_through_real_mode() {
    let k = temp_file("low-kernel.elf", &round_trip_kernel());
    for engine in ["interp", "bt"] {
        let (status, out, err) = popek(&[
            "run",
            "--engine",
            engine,
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "8M",
            "--clock",
            "virtual",
        ]);
        assert_eq!(status, 0x21, "{engine}: {out}\n{err}");
        assert_eq!(out, "pm\nrm\nback\n", "{engine}");
    }
    // hw where a KVM is at hand and runs real and protected mode.
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("hw skipped: /dev/kvm does not open here");
    } else {
        let (status, out, err) = popek(&[
            "run",
            "--engine",
            "hw",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "8M",
        ]);
        if status == 2 && err.contains("cannot run") {
            eprintln!("hw skipped: {}", err.trim());
        } else {
            assert_eq!(status, 0x21, "hw: {out}\n{err}");
            assert_eq!(out, "pm\nrm\nback\n", "hw");
        }
    }
    // trap deprivileges protected-mode kernels only: it loads and enters
    // the kernel, then stops cleanly where it leaves protected mode.
    let (status, out, err) = popek(&[
        "run",
        "--engine",
        "trap",
        "--kernel",
        k.to_str().unwrap(),
        "--memory",
        "8M",
        "--clock",
        "virtual",
    ]);
    assert_eq!((status, out.as_str()), (2, "pm\n"), "{err}");
    assert!(err.contains("protected-mode guests only"), "{err}");
}

#[test]
fn a_segment_in_the_vga_hole_is_refused_in_one_line() {
    let k = temp_file(
        "vga-kernel.elf",
        &multiboot_elf(0xB8000, &[0xF4], 0x100, 0xB8000),
    );
    let (status, _, err) = popek(&["run", "--engine", "interp", "--kernel", k.to_str().unwrap()]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("0x9FC00-0xFFFFF"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
