//! Bad input gets one clear line and exit status 2, never a panic.

mod support;
use support::*;

/// Runs popek: (exit status, stderr).
fn popek_err(args: &[&str]) -> (i32, String) {
    let (status, _, err) = popek(args);
    (status, err)
}

#[test]
fn missing_kernel_file() {
    let (code, err) = popek_err(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/vmlinuz"), "{err}");
}

#[test]
fn wrong_format_kernel() {
    let p = temp_file("notakernel", b"hello, I am not a kernel\n");
    let (code, err) = popek_err(&["run", "--kernel", p.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("not a Multiboot ELF or Linux bzImage"),
        "{err}"
    );
}

#[test]
fn truncated_bzimage() {
    let mut img = vec![0u8; 0x300];
    img[0x1fe] = 0x55;
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206] = 0x0f;
    img[0x207] = 0x02;
    let p = temp_file("truncated-bzimage", &img);
    let (code, err) = popek_err(&["run", "--kernel", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("truncated-bzimage"), "{err}");
}

#[test]
fn truncated_multiboot_elf() {
    // A Multiboot header, then an ELF that ends inside its header.
    let mut img = b"\x7fELF\x01\x01\x01".to_vec();
    img.resize(64, 0);
    let magic: u32 = 0x1bad_b002;
    let flags: u32 = 0;
    let sum = 0u32.wrapping_sub(magic).wrapping_sub(flags);
    img.extend_from_slice(&magic.to_le_bytes());
    img.extend_from_slice(&flags.to_le_bytes());
    img.extend_from_slice(&sum.to_le_bytes());
    let p = temp_file("truncated-elf", &img);
    let (code, err) = popek_err(&["run", "--kernel", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("truncated-elf"), "{err}");
}

#[test]
fn memory_out_of_range() {
    for m in ["1M", "4G", "0"] {
        let (code, err) = popek_err(&["run", "--memory", m]);
        assert_eq!(code, 2, "--memory {m}: {err}");
        assert!(err.contains("--memory"), "{err}");
    }
    let (code, err) = popek_err(&["run", "--memory", "lots"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn unknown_guest() {
    let (code, err) = popek_err(&["run", "--guest", "windows"]);
    assert_eq!(code, 2);
    assert!(err.contains("no such guest"), "{err}");
}

#[test]
fn trap_refuses_what_it_cannot_deprivilege() {
    // Real mode has no rings to deprivilege into: one clear line, exit 2.
    let p = temp_file("real.bin", &[0xf4]);
    let (code, err) = popek_err(&[
        "run",
        "--engine",
        "trap",
        "--kernel",
        p.to_str().unwrap(),
        "--format",
        "flat-real",
    ]);
    assert_eq!(code, 2, "trap: {err}");
    assert!(err.contains("real mode"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // The shuffled physical map moves 64 KiB chunks.
    let (code, err) = popek_err(&["run", "--engine", "trap", "--memory", "6500K"]);
    assert_eq!(code, 2, "trap: {err}");
    assert!(err.contains("multiple of 64 KiB"), "{err}");
}

#[test]
fn flat_binary_too_big_for_memory() {
    let p = temp_file("big.bin", &vec![0x90u8; 3 << 20]);
    let (code, err) = popek_err(&[
        "run",
        "--memory",
        "2M",
        "--kernel",
        p.to_str().unwrap(),
        "--format",
        "flat-protected",
        "--load-addr",
        "0x100000",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("big.bin"), "{err}");
}

#[test]
fn missing_initrd() {
    let (code, err) = popek_err(&["run", "--initrd", "/nonexistent/initrd.gz"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/initrd.gz"), "{err}");
}

/// Inputs are checked before they are read: a device would be read until
/// memory runs out, a FIFO waited on forever.
#[test]
fn a_device_or_a_fifo_as_kernel_or_initrd_is_refused_at_once() {
    let dir = std::env::temp_dir().join(format!("popek-bad-input-fifo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let kernel = temp_file("k-for-initrd", b"\x7fELF");
    for args in [
        vec!["run", "--kernel", "/dev/zero"],
        vec!["run", "--kernel", fifo.to_str().unwrap()],
        vec![
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            "/dev/zero",
        ],
        vec!["initramfs", "--busybox", "/dev/zero", "-o", "/dev/null"],
    ] {
        let t = std::time::Instant::now();
        let (code, err) = popek_err(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("not a regular file"), "{args:?}: {err}");
        assert!(t.elapsed().as_secs() < 10, "{args:?} answered at once");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_kernel_larger_than_guest_ram_is_refused_before_it_is_read() {
    let p = temp_file("big-kernel", &vec![0u8; 3 << 20]);
    let (code, err) = popek_err(&["run", "--kernel", p.to_str().unwrap(), "--memory", "2M"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("larger than guest RAM"), "{err}");
}

#[test]
fn the_embedded_guests_refuse_less_memory_than_they_need() {
    let (code, err) = popek_err(&["run", "--memory", "2M", "--engine", "interp"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs at least 6 MiB"), "{err}");
}
