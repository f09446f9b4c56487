//! Boot loaders: put a guest kernel into guest RAM and describe the CPU state
//! it must be entered with.
//!
//! Three formats are supported:
//!
//! * [`multiboot`] — Multiboot v1 (spec 0.6.96) ELF32 kernels, or any image
//!   through the header's address fields (the "a.out kludge", flag 16);
//! * [`linux`] — the Linux/x86 boot protocol (≥ 2.06) for bzImage kernels,
//!   32-bit entry (and the 64-bit entry);
//! * [`flat`] — raw binaries at a given address, entered in real mode or flat
//!   32-bit protected mode.
//!
//! [`detect`] tells a Multiboot kernel from a bzImage; a flat binary cannot be
//! detected, so the caller asks for it explicitly.
//!
//! # Design
//!
//! A loader writes the kernel and its boot structures into a
//! [`GuestRam`] and returns an [`EntryState`]: plain
//! data saying which CPU mode to enter, where, with which general registers
//! and which GDT selectors. The crate knows no CPU engine: the software CPU
//! engines and the KVM engine each turn an `EntryState` into their own
//! register state (for protected and long mode they build flat 4 GiB
//! descriptor caches from the GDT the loader wrote, whose layout is given by
//! [`GDT_ADDR`] and [`gdt`]).
//!
//! Every input file is untrusted: truncated, huge or malformed headers and
//! overflowing offsets give a [`BootError`] naming the problem, never a panic.
//! The caller prefixes the file name. Nothing is written to guest RAM before
//! the image has been validated, except where noted.
//!
//! # Guest memory layout
//!
//! Boot structures live in conventional memory, above the real-mode IVT/BDA
//! (0x0–0x4FF) and below the EBDA (0x9FC00); they never touch the BIOS/ACPI
//! area 0xE0000–0xFFFFF, where the machine writes its ACPI tables.
//!
//! | guest physical      | content                                              | used by            |
//! |---------------------|------------------------------------------------------|--------------------|
//! | 0x00500–0x0051F     | GDT: null, null, code 0x10, data 0x18 ([`gdt`])      | all protected/long |
//! | 0x07000–0x07FFF     | Linux zero page (`struct boot_params`)               | linux              |
//! | 0x08000–0x0807F     | Multiboot information structure                      | multiboot          |
//! | 0x08100–0x081FF     | Multiboot memory map (e820 as mmap entries)          | multiboot          |
//! | 0x08200–0x0820F     | boot loader name `"popek"`                           | multiboot          |
//! | 0x09000–0x09FFF     | Multiboot module list (at most 256 modules)          | multiboot          |
//! | 0x0A000–0x0FFFF     | identity page tables: PML4 0xA000, PDPT 0xB000, four PDs 0xC000–0xFFFF (2 MiB pages, 0–4 GiB) | linux 64-bit |
//! | 0x20000–0x9EFFF     | command line; for Multiboot followed by the module strings | linux, multiboot |
//! | 0x9FC00–0x9FFFF     | EBDA (reserved in the e820 map)                      | —                  |
//! | 0xE0000–0xFFFFF     | BIOS/ACPI area, written by the machine (reserved)    | —                  |
//! | 0x100000–…          | kernel image (Linux: protected-mode part; Multiboot: its segments) | linux, multiboot |
//! | …, page aligned     | Multiboot modules, one after another above the kernel | multiboot         |
//! | top of RAM (or `initrd_addr_max`), page aligned, going down | Linux initrd | linux |
//!
//! Multiboot kernels and Linux kernels must load at or above 1 MiB; the
//! region below is reserved for the table above.

use popek_memory::{GuestRam, MemoryError};

pub mod e820;
pub mod flat;
pub mod linux;
pub mod multiboot;

/// Smallest guest RAM the loaders accept (the machine's `--memory` minimum).
pub const MIN_RAM: u64 = 2 << 20;

/// Guest physical address of the GDT written by the loaders.
pub const GDT_ADDR: u64 = 0x500;
/// Number of descriptors in the loaders' GDT.
pub const GDT_ENTRIES: usize = 4;
/// GDT limit (size in bytes minus one) of the loaders' GDT.
pub const GDT_LIMIT: u16 = (GDT_ENTRIES * 8 - 1) as u16;
/// Code selector of the loaders' GDT (Linux's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Data selector of the loaders' GDT (Linux's `__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;

/// Start of the command-line and string area.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// End (exclusive) of the command-line and string area.
pub const CMDLINE_END: u64 = 0x9F000;
/// Lowest address a Multiboot or Linux kernel may occupy.
pub const KERNEL_MIN_ADDR: u64 = 0x100000;
/// Start of the BIOS/ACPI area the machine fills (reserved in e820).
pub const BIOS_AREA_START: u64 = 0xE0000;
/// End (exclusive) of the BIOS/ACPI area.
pub const BIOS_AREA_END: u64 = 0x100000;

/// Size of a page, the alignment of modules and the initrd.
pub const PAGE_SIZE: u64 = 4096;

/// GDT descriptors the loaders write at [`GDT_ADDR`].
pub mod gdt {
    /// Flat 4 GiB 32-bit code segment: base 0, limit 0xFFFFF pages, G=1,
    /// D=1, present, DPL 0, execute/read, accessed.
    pub const CODE32: u64 = 0x00CF_9B00_0000_FFFF;
    /// Flat 4 GiB data segment: base 0, limit 0xFFFFF pages, G=1, B=1,
    /// present, DPL 0, read/write, accessed.
    pub const DATA: u64 = 0x00CF_9300_0000_FFFF;
    /// 64-bit code segment: L=1, D=0, G=1, present, DPL 0, execute/read,
    /// accessed (base and limit ignored in long mode).
    pub const CODE64: u64 = 0x00AF_9B00_0000_FFFF;
}

/// Base and limit of a descriptor table in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Guest physical (= linear, paging off or identity-mapped) base.
    pub base: u64,
    /// Limit in bytes (size minus one).
    pub limit: u16,
}

/// The CPU mode a kernel is entered in, with what the mode needs beyond the
/// general registers of [`EntryState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 16-bit real mode. CS = DS = ES = SS = FS = GS = `cs` (segment base
    /// `cs << 4`, limit 0xFFFF); IP is the low 16 bits of
    /// [`EntryState::rip`]. CR0.PE = 0.
    Real {
        /// Real-mode code segment (also loaded into the data segments).
        cs: u16,
    },
    /// 32-bit protected mode: CR0.PE = 1, paging off (CR0.PG = 0), CR4 = 0,
    /// EFER = 0. GDTR = `gdt`; CS = `cs` and DS = ES = SS = FS = GS = `ds`,
    /// all flat (base 0, limit 4 GiB, 32-bit), CPL 0. No IDT (IDTR limit 0)
    /// and no TSS or LDT are set up.
    Protected32 {
        /// The GDT the loader wrote to guest memory.
        gdt: DescriptorTable,
        /// Code selector.
        cs: u16,
        /// Selector for DS, ES, SS, FS and GS.
        ds: u16,
    },
    /// 64-bit long mode: CR0.PE = CR0.PG = 1, CR4.PAE = 1, EFER.LME =
    /// EFER.LMA = 1, CR3 = `cr3` (identity map of 0–4 GiB with 2 MiB
    /// pages). GDTR = `gdt`; CS = `cs` (64-bit code), DS = ES = SS = FS = GS
    /// = `ds` (flat data), CPL 0.
    Long64 {
        /// The GDT the loader wrote to guest memory.
        gdt: DescriptorTable,
        /// Code selector (a 64-bit code descriptor).
        cs: u16,
        /// Selector for DS, ES, SS, FS and GS.
        ds: u16,
        /// Guest physical address of the PML4.
        cr3: u64,
    },
}

/// The CPU state a boot path requires at the kernel's first instruction.
///
/// Registers not named here are 0 (apart from what [`EntryMode`] says about
/// segments and control registers). RFLAGS is given explicitly and always has
/// IF = 0. The values are what the protocol defines; where it leaves a
/// register undefined the loader sets 0 (documented per loader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryState {
    /// Mode, segments, descriptor tables and paging.
    pub mode: EntryMode,
    /// Instruction pointer (EIP/RIP; IP for real mode).
    pub rip: u64,
    /// RFLAGS: 0x2 (reserved bit 1 set, IF = 0).
    pub rflags: u64,
    /// RAX / EAX.
    pub rax: u64,
    /// RBX / EBX.
    pub rbx: u64,
    /// RCX / ECX.
    pub rcx: u64,
    /// RDX / EDX.
    pub rdx: u64,
    /// RSI / ESI.
    pub rsi: u64,
    /// RDI / EDI.
    pub rdi: u64,
    /// RBP / EBP.
    pub rbp: u64,
    /// RSP / ESP.
    pub rsp: u64,
}

impl EntryState {
    /// An entry state with the given mode and instruction pointer, RFLAGS =
    /// 0x2 and every general register 0.
    pub fn new(mode: EntryMode, rip: u64) -> Self {
        EntryState {
            mode,
            rip,
            rflags: 0x2,
            rax: 0,
            rbx: 0,
            rcx: 0,
            rdx: 0,
            rsi: 0,
            rdi: 0,
            rbp: 0,
            rsp: 0,
        }
    }

    /// Flat 32-bit protected mode with the loaders' GDT at [`GDT_ADDR`].
    pub fn protected32(rip: u64) -> Self {
        Self::new(
            EntryMode::Protected32 {
                gdt: DescriptorTable {
                    base: GDT_ADDR,
                    limit: GDT_LIMIT,
                },
                cs: BOOT_CS,
                ds: BOOT_DS,
            },
            rip,
        )
    }
}

/// What kind of kernel a file is, as far as its bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Multiboot v1 kernel (magic with a valid checksum in the first 8192
    /// bytes; the rest of the header is checked by the loader).
    Multiboot,
    /// A Linux bzImage (`0xAA55` at 0x1FE and `"HdrS"` at 0x202).
    LinuxBzImage,
    /// Neither; a flat binary cannot be recognised.
    Unknown,
}

/// Guesses the format of a kernel image. Linux is checked first, since its
/// magic sits at fixed offsets.
pub fn detect(image: &[u8]) -> KernelFormat {
    if linux::is_bzimage(image) {
        KernelFormat::LinuxBzImage
    } else if multiboot::scan(image).is_ok() {
        KernelFormat::Multiboot
    } else {
        KernelFormat::Unknown
    }
}

/// Why a kernel, initrd, module or command line cannot be booted. Messages
/// are one line; the caller prefixes the file name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootError {
    /// Guest RAM is smaller than [`MIN_RAM`].
    #[error("guest RAM of {size:#x} bytes is too small (minimum {min:#x})")]
    RamTooSmall {
        /// RAM size.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// The file ends before a structure it declares.
    #[error("file is truncated: {what} needs bytes up to offset {need:#x}, the file has {len:#x}")]
    Truncated {
        /// The structure that is cut off.
        what: &'static str,
        /// File offset the structure extends to.
        need: u64,
        /// File length.
        len: u64,
    },
    /// No Multiboot magic in the first 8192 bytes.
    #[error("no Multiboot header (magic 0x1BADB002) in the first 8192 bytes")]
    NoMultibootHeader,
    /// A Multiboot magic was found but its checksum is wrong.
    #[error("Multiboot header at offset {offset:#x} has a bad checksum (magic + flags + checksum = {sum:#x}, must be 0)")]
    BadMultibootChecksum {
        /// File offset of the header.
        offset: u64,
        /// The wrong sum.
        sum: u32,
    },
    /// The Multiboot header requires features popek does not provide.
    #[error("Multiboot header requires unsupported features (flags {flags:#x}, unsupported bits {unsupported:#x})")]
    UnsupportedMultibootFlags {
        /// The header's flags.
        flags: u32,
        /// The required bits popek cannot honour.
        unsupported: u32,
    },
    /// The Multiboot address fields (flag 16) are inconsistent.
    #[error("bad Multiboot address fields: {0}")]
    BadAddressFields(&'static str),
    /// The image is not an ELF file and has no Multiboot address fields.
    #[error("not an ELF file, and the Multiboot header has no address fields (flag 16)")]
    NotElf,
    /// A 64-bit ELF without Multiboot address fields.
    #[error("64-bit ELF kernel without Multiboot address fields (flag 16); Multiboot v1 loads only ELF32")]
    Elf64WithoutAddressFields,
    /// The ELF headers are malformed or not for i386.
    #[error("bad ELF file: {0}")]
    BadElf(&'static str),
    /// The ELF file has no loadable segment.
    #[error("ELF file has no loadable (PT_LOAD) segment")]
    NoLoadableSegments,
    /// A kernel segment lies (partly) outside guest RAM.
    #[error("segment {addr:#x}+{len:#x} lies outside guest RAM (size {ram:#x})")]
    SegmentOutsideRam {
        /// Load address.
        addr: u64,
        /// Size in memory.
        len: u64,
        /// RAM size.
        ram: u64,
    },
    /// Nothing is left above the kernel and its modules for the loader's
    /// own structures.
    #[error("no room for the Multiboot information above the kernel and modules (they end at {base:#x}, RAM at {ram:#x})")]
    NoRoomForBootInfo {
        /// Where the structures would start.
        base: u64,
        /// RAM size.
        ram: u64,
    },
    /// A kernel segment overlaps the boot structures or the BIOS area.
    #[error("segment {addr:#x}+{len:#x} overlaps {what}")]
    SegmentOverlapsBootArea {
        /// Load address.
        addr: u64,
        /// Size in memory.
        len: u64,
        /// What it overlaps.
        what: &'static str,
    },
    /// The file is not a Linux bzImage.
    #[error("not a Linux bzImage: {0}")]
    NotBzImage(&'static str),
    /// The Linux boot protocol version is older than 2.06.
    #[error("Linux boot protocol {major}.{minor:02} is too old (2.06 or later required)")]
    ProtocolTooOld {
        /// Major version.
        major: u8,
        /// Minor version.
        minor: u8,
    },
    /// The kernel has no 64-bit entry point.
    #[error("kernel has no 64-bit entry point (xloadflags XLF_KERNEL_64 not set)")]
    No64BitEntry,
    /// The kernel needs more memory than guest RAM has.
    #[error("kernel needs guest memory up to {needed:#x}, but guest RAM is only {ram:#x} bytes")]
    KernelTooBig {
        /// End address the kernel needs.
        needed: u64,
        /// RAM size.
        ram: u64,
    },
    /// The initrd does not fit between the kernel and its highest address.
    #[error("initrd of {len:#x} bytes does not fit: only {available:#x} bytes are free between the kernel and the highest initrd address")]
    InitrdTooBig {
        /// Initrd size.
        len: u64,
        /// Free space.
        available: u64,
    },
    /// A Multiboot module does not fit into RAM above the kernel.
    #[error("module {index} of {len:#x} bytes does not fit into guest RAM above {start:#x} (size {ram:#x})")]
    ModuleTooBig {
        /// Index of the module (0-based).
        index: usize,
        /// Module size.
        len: u64,
        /// Where it would start.
        start: u64,
        /// RAM size.
        ram: u64,
    },
    /// More Multiboot modules than the module list holds.
    #[error("{count} modules given, at most {max} supported")]
    TooManyModules {
        /// Modules given.
        count: usize,
        /// The maximum.
        max: usize,
    },
    /// The command line (and module strings) are longer than allowed.
    #[error("command line is {len} bytes long, the maximum is {max}")]
    CmdlineTooLong {
        /// Length in bytes (without the terminating NUL).
        len: u64,
        /// Maximum length.
        max: u64,
    },
    /// The command line contains a NUL byte.
    #[error("command line contains a NUL byte")]
    CmdlineHasNul,
    /// A flat binary does not fit into guest RAM at its load address.
    #[error(
        "flat binary of {len:#x} bytes at {addr:#x} does not fit into guest RAM (size {ram:#x})"
    )]
    FlatTooBig {
        /// File size.
        len: u64,
        /// Load address.
        addr: u64,
        /// RAM size.
        ram: u64,
    },
    /// A flat binary for real mode extends beyond the first MiB.
    #[error("real-mode flat binary {addr:#x}+{len:#x} extends beyond 1 MiB, which real mode cannot reach")]
    FlatNotReachable {
        /// Load address.
        addr: u64,
        /// File size.
        len: u64,
    },
    /// A guest memory access failed (a loader bug, reported rather than
    /// panicking).
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// Reads a little-endian u16 at `off`, or `None` past the end.
pub(crate) fn le16(b: &[u8], off: u64) -> Option<u16> {
    let off = usize::try_from(off).ok()?;
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// Reads a little-endian u32 at `off`, or `None` past the end.
pub(crate) fn le32(b: &[u8], off: u64) -> Option<u32> {
    let off = usize::try_from(off).ok()?;
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Reads a little-endian u64 at `off`, or `None` past the end.
pub(crate) fn le64(b: &[u8], off: u64) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// `b[off..off+len]` with overflow and bounds checks, or `Truncated`.
pub(crate) fn slice<'a>(
    b: &'a [u8],
    off: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], BootError> {
    match off.checked_add(len) {
        Some(end) if end <= b.len() as u64 => Ok(&b[off as usize..end as usize]),
        _ => Err(BootError::Truncated {
            what,
            need: off.saturating_add(len),
            len: b.len() as u64,
        }),
    }
}

/// Fails with `RamTooSmall` below [`MIN_RAM`].
pub(crate) fn check_ram(ram: &GuestRam) -> Result<(), BootError> {
    if ram.size() < MIN_RAM {
        return Err(BootError::RamTooSmall {
            size: ram.size(),
            min: MIN_RAM,
        });
    }
    Ok(())
}

/// Writes the loaders' GDT at [`GDT_ADDR`] with `code` as the descriptor for
/// [`BOOT_CS`] and the flat data descriptor for [`BOOT_DS`].
pub(crate) fn write_gdt(ram: &GuestRam, code: u64) -> Result<DescriptorTable, BootError> {
    write_gdt_at(ram, GDT_ADDR, code)
}

/// [`write_gdt`] at `base`.
pub(crate) fn write_gdt_at(
    ram: &GuestRam,
    base: u64,
    code: u64,
) -> Result<DescriptorTable, BootError> {
    let entries = [0u64, 0, code, gdt::DATA];
    for (i, d) in entries.iter().enumerate() {
        ram.write_u64(base + 8 * i as u64, *d)?;
    }
    Ok(DescriptorTable {
        base,
        limit: GDT_LIMIT,
    })
}

/// Writes strings NUL-terminated one after another into the command-line
/// area, returning the guest address of each. Fails with `CmdlineTooLong`
/// when the area (or `max_first` for the first string) is too small.
pub(crate) fn write_strings(
    ram: &GuestRam,
    strings: &[&str],
    max_first: u64,
) -> Result<Vec<u64>, BootError> {
    check_strings(strings, max_first, CMDLINE_END - CMDLINE_ADDR)?;
    write_strings_at(ram, strings, CMDLINE_ADDR)
}

/// Checks strings for [`write_strings_at`]: no NUL inside, the first at
/// most `max_first` bytes, all of them (NUL-terminated) at most `area`.
pub(crate) fn check_strings(strings: &[&str], max_first: u64, area: u64) -> Result<(), BootError> {
    let mut total: u64 = 0;
    for (i, s) in strings.iter().enumerate() {
        if s.as_bytes().contains(&0) {
            return Err(BootError::CmdlineHasNul);
        }
        if i == 0 && s.len() as u64 > max_first {
            return Err(BootError::CmdlineTooLong {
                len: s.len() as u64,
                max: max_first.min(area - 1),
            });
        }
        total = total.saturating_add(s.len() as u64 + 1);
    }
    if total > area {
        return Err(BootError::CmdlineTooLong {
            len: total.saturating_sub(1),
            max: area - 1,
        });
    }
    Ok(())
}

/// The bytes [`write_strings_at`] writes for `strings`.
pub(crate) fn strings_len(strings: &[&str]) -> u64 {
    strings.iter().map(|s| s.len() as u64 + 1).sum()
}

/// Writes checked strings NUL-terminated one after another from `start`,
/// returning the guest address of each.
pub(crate) fn write_strings_at(
    ram: &GuestRam,
    strings: &[&str],
    start: u64,
) -> Result<Vec<u64>, BootError> {
    let mut addr = start;
    let mut out = Vec::with_capacity(strings.len());
    for s in strings {
        ram.write(addr, s.as_bytes())?;
        ram.write_u8(addr + s.len() as u64, 0)?;
        out.push(addr);
        addr += s.len() as u64 + 1;
    }
    Ok(out)
}

/// Rounds `v` up to a multiple of [`PAGE_SIZE`], or `None` on overflow.
pub(crate) fn page_align_up(v: u64) -> Option<u64> {
    v.checked_add(PAGE_SIZE - 1).map(|x| x & !(PAGE_SIZE - 1))
}

#[cfg(test)]
pub(crate) mod test_util {
    use popek_memory::GuestRam;

    /// Guest RAM of `size` bytes.
    pub fn ram(size: u64) -> GuestRam {
        GuestRam::new(size).unwrap()
    }

    /// Reads a NUL-terminated string from guest memory.
    pub fn read_cstr(ram: &GuestRam, addr: u64) -> String {
        let mut s = Vec::new();
        let mut a = addr;
        loop {
            let b = ram.read_u8(a).unwrap();
            if b == 0 {
                break;
            }
            s.push(b);
            a += 1;
        }
        String::from_utf8(s).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_descriptors_are_flat() {
        // base 0, limit 0xFFFFF with 4 KiB granularity, present, DPL 0.
        for d in [gdt::CODE32, gdt::DATA, gdt::CODE64] {
            assert_eq!(d & 0xFFFF, 0xFFFF, "limit 15:0");
            assert_eq!((d >> 48) & 0xF, 0xF, "limit 19:16");
            assert_eq!((d >> 16) & 0xFF_FFFF, 0, "base 23:0");
            assert_eq!(d >> 56, 0, "base 31:24");
            assert_eq!((d >> 47) & 1, 1, "present");
            assert_eq!((d >> 55) & 1, 1, "granularity");
        }
        assert_eq!((gdt::CODE32 >> 40) & 0xFF, 0x9B);
        assert_eq!((gdt::DATA >> 40) & 0xFF, 0x93);
        assert_eq!((gdt::CODE64 >> 53) & 3, 1, "L=1, D=0");
    }

    #[test]
    fn detect_unknown_for_junk_and_empty() {
        assert_eq!(detect(&[]), KernelFormat::Unknown);
        assert_eq!(detect(&[0x90; 10000]), KernelFormat::Unknown);
    }

    #[test]
    fn readers_never_panic() {
        assert_eq!(le32(&[1, 2, 3], 0), None);
        assert_eq!(le32(&[1, 2, 3, 4], u64::MAX), None);
        assert_eq!(le64(&[0; 8], 1), None);
        assert_eq!(le16(&[1, 2], 0), Some(0x0201));
        assert!(matches!(
            slice(&[0; 4], u64::MAX, 2, "x"),
            Err(BootError::Truncated { .. })
        ));
    }

    #[test]
    fn strings_too_long_for_area() {
        let ram = test_util::ram(MIN_RAM);
        let big = "a".repeat((CMDLINE_END - CMDLINE_ADDR) as usize);
        assert!(matches!(
            write_strings(&ram, &[&big], u64::MAX),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert_eq!(
            write_strings(&ram, &["a\0b"], u64::MAX),
            Err(BootError::CmdlineHasNul)
        );
    }
}
