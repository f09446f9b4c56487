//! The guest kernels popek ships, built from source at compile time.
//!
//! `build.rs` runs `guests/minios/build.sh` with the host `gcc` and `ld` into
//! `OUT_DIR`; the images are embedded here. No prebuilt binary is committed.
//!
//! | name | what |
//! |---|---|
//! | `minios` | i386 Multiboot v1 ELF, native flavour: uses sensitive instructions like any OS |
//! | `minios-pv` | the same sources built with `-DPARAVIRT`: every sensitive operation is a hypercall (`docs/hypercalls.md`) |
//! | `minios64` | x86-64 (long mode, 4-level paging), native flavour; an ELF32 Multiboot v1 image whose 32-bit entry switches to long mode |
//! | `minios64-pv` | x86-64, paravirtual flavour |
//!
//! See `docs/minios.md` for the kernel's design, its self-checks and benchmarks.

static MINIOS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/minios"));
static MINIOS_PV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/minios-pv"));
static MINIOS64: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/minios64"));
static MINIOS64_PV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/minios64-pv"));

/// The names [`by_name`] knows, default guest first.
pub const NAMES: &[&str] = &["minios", "minios-pv", "minios64", "minios64-pv"];

/// minios's micro-benchmarks, in the order it runs them (each prints a
/// line `minios: bench NAME cycles_per_iter=… ns_per_iter=…`).
pub const BENCHES: [&str; 10] = [
    "syscall",
    "in",
    "callret",
    "pagefault",
    "ptemod",
    "divzero",
    "forkwait",
    "compute",
    "irq_pic",
    "irq_apic",
];

/// The least guest RAM the embedded guests need: below it their
/// benchmarks (the page-fault and fork ones allocate hundreds of pages)
/// fail. Measured: every flavour passes at 6 MiB and fails at 5 MiB.
pub const MIN_MEMORY: u64 = 6 << 20;

/// The i386 native minios: a Multiboot v1 ELF32 image (the default guest).
pub fn minios() -> &'static [u8] {
    MINIOS
}

/// The i386 paravirtual minios (`-DPARAVIRT`): a Multiboot v1 ELF32 image that
/// needs popek's hypercall interface.
pub fn minios_pv() -> &'static [u8] {
    MINIOS_PV
}

/// The x86-64 native minios: a Multiboot v1 image (ELF32 container) whose
/// 32-bit entry code switches to long mode itself (EFER.LME before CR0.PG).
pub fn minios64() -> &'static [u8] {
    MINIOS64
}

/// The x86-64 paravirtual minios (`-DPARAVIRT`); like [`minios64`], it enters
/// long mode itself before its first hypercall.
pub fn minios64_pv() -> &'static [u8] {
    MINIOS64_PV
}

/// The image called `name` (one of [`NAMES`]), or `None`.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "minios" => Some(minios()),
        "minios-pv" => Some(minios_pv()),
        "minios64" => Some(minios64()),
        "minios64-pv" => Some(minios64_pv()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn every_name_resolves_and_unknown_does_not() {
        for name in NAMES {
            assert!(by_name(name).is_some(), "{name}");
        }
        assert!(by_name("minios32").is_none());
        assert!(by_name("").is_none());
    }

    #[test]
    fn images_are_elf32_i386_executables() {
        for name in NAMES {
            let img = by_name(name).unwrap();
            assert_eq!(&img[..4], b"\x7fELF", "{name}");
            assert_eq!(img[4], 1, "{name}: ELFCLASS32");
            assert_eq!(img[5], 1, "{name}: little endian");
            assert_eq!(u16_at(img, 16), 2, "{name}: ET_EXEC");
            assert_eq!(u16_at(img, 18), 3, "{name}: EM_386");
            assert!(entry_of(img) >= 0x10_0000, "{name}: entry below 1 MiB");
        }
    }

    fn entry_of(img: &[u8]) -> u32 {
        u32_at(img, 24)
    }

    #[test]
    fn images_carry_a_multiboot_header_in_the_first_8k() {
        for name in NAMES {
            let img = by_name(name).unwrap();
            let end = img.len().min(8192);
            let found = (0..end.saturating_sub(12)).step_by(4).any(|off| {
                let (magic, flags, sum) =
                    (u32_at(img, off), u32_at(img, off + 4), u32_at(img, off + 8));
                magic == 0x1bad_b002 && magic.wrapping_add(flags).wrapping_add(sum) == 0
            });
            assert!(found, "{name}: no Multiboot v1 header");
        }
    }

    #[test]
    fn flavours_say_what_they_are() {
        let has = |img: &[u8], s: &str| img.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(has(minios(), "i386 native"));
        assert!(has(minios_pv(), "i386 paravirtual"));
        assert!(has(minios64(), "x86-64 native"));
        assert!(has(minios64_pv(), "x86-64 paravirtual"));
        assert_ne!(minios(), minios_pv());
        assert_ne!(minios64(), minios64_pv());
    }
}
