//! The Linux/x86 boot protocol (Documentation/arch/x86/boot.rst) for bzImage
//! kernels, protocol 2.06 or later.
//!
//! [`load`] (32-bit entry) and [`load_64`] (64-bit entry) both:
//!
//! * parse the setup header at 0x1F1 (`0xAA55` at 0x1FE, `"HdrS"` at 0x202)
//!   and require a bzImage (`LOADED_HIGH`) with protocol ≥ 2.06;
//! * copy the protected-mode kernel (the file after the `setup_sects + 1`
//!   sectors of real-mode setup) to [`KERNEL_ADDR`] (1 MiB). The real-mode
//!   setup code is not loaded: popek enters the kernel after it.
//! * check that RAM holds what the kernel needs while it decompresses and
//!   initialises: up to `max(end of the loaded image, run address +
//!   init_size)`, where the run address is `pref_address` (the kernel's
//!   `LOAD_PHYSICAL_ADDR`), or 1 MiB rounded up to `kernel_alignment` for a
//!   relocatable kernel if that is higher — which is where the kernel's own
//!   decompressor puts itself;
//! * place the initrd as high as possible below `min(RAM size,
//!   initrd_addr_max + 1, 4 GiB)`, page aligned, above the kernel's region;
//! * write the command line at [`CMDLINE_ADDR`]
//!   (at most `cmdline_size` bytes, no NUL inside);
//! * fill the zero page (`struct boot_params`) at [`ZERO_PAGE_ADDR`]: all
//!   zero, then the file's setup header copied to 0x1F1 (up to its declared
//!   end, `0x202 + byte at 0x201`, at most to 0x290), then
//!   `type_of_loader` = 0xFF, `loadflags |= CAN_USE_HEAP`,
//!   `heap_end_ptr` = 0xFE00, `code32_start` = 1 MiB, `cmd_line_ptr`,
//!   `ramdisk_image`/`ramdisk_size`, `alt_mem_k`, `acpi_rsdp_addr` (0x070)
//!   when given, and the e820 map (count at 0x1E8, table at 0x2D0).
//!
//! **32-bit entry** ([`load`]): flat protected mode, paging off, IF = 0, GDT
//! with flat `__BOOT_CS` = 0x10 (code) and `__BOOT_DS` = 0x18 (data),
//! CS = 0x10, DS = ES = SS = FS = GS = 0x18, EIP = 0x100000 (`startup_32`),
//! ESI = zero page, EBP = EDI = EBX = 0; EAX, ECX, EDX and ESP (undefined
//! by the protocol) are 0.
//!
//! **64-bit entry** ([`load_64`], needs `XLF_KERNEL_64`): long mode with
//! identity-mapped page tables covering 0–4 GiB (2 MiB pages; PML4 at
//! [`PML4_ADDR`]), which covers the kernel with its `init_size`, the zero
//! page and the command line as the protocol demands; GDT with a 64-bit code
//! descriptor at 0x10 and flat data at 0x18; RIP = 0x100000 + 0x200
//! (`startup_64`), RSI = zero page, all other general registers 0, IF = 0.

use popek_memory::GuestRam;

use crate::e820::e820_map;
use crate::{
    check_ram, gdt, le16, le32, le64, write_gdt, write_strings, BootError, DescriptorTable,
    EntryMode, EntryState, BOOT_CS, BOOT_DS, CMDLINE_ADDR, KERNEL_MIN_ADDR, PAGE_SIZE,
};

/// Guest address of the zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Where the protected-mode kernel is loaded, and the 32-bit entry point.
pub const KERNEL_ADDR: u64 = KERNEL_MIN_ADDR;
/// Offset of `startup_64` from the load address.
pub const STARTUP_64_OFFSET: u64 = 0x200;
/// Oldest supported boot protocol version (2.06).
pub const MIN_PROTOCOL: u16 = 0x0206;
/// `heap_end_ptr` written to the zero page.
pub const HEAP_END_PTR: u16 = 0xFE00;
/// Guest address of the PML4 of the 64-bit entry's identity map.
pub const PML4_ADDR: u64 = 0xA000;
/// Guest address of its PDPT.
pub const PDPT_ADDR: u64 = 0xB000;
/// Guest address of its first page directory (four follow each other).
pub const PD_ADDR: u64 = 0xC000;

/// `loadflags` bit: protected-mode code loaded at 0x100000 (bzImage).
pub const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags` bit: `heap_end_ptr` is valid.
pub const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags` bit: the kernel has the 64-bit entry at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;

/// Offsets in the zero page (and, for the setup header, in the file).
mod off {
    pub const ACPI_RSDP_ADDR: u64 = 0x070;
    pub const ALT_MEM_K: u64 = 0x1E0;
    pub const E820_ENTRIES: u64 = 0x1E8;
    pub const SETUP_SECTS: u64 = 0x1F1;
    pub const BOOT_FLAG: u64 = 0x1FE;
    pub const JUMP_LEN: u64 = 0x201;
    pub const HEADER: u64 = 0x202;
    pub const VERSION: u64 = 0x206;
    pub const TYPE_OF_LOADER: u64 = 0x210;
    pub const LOADFLAGS: u64 = 0x211;
    pub const CODE32_START: u64 = 0x214;
    pub const RAMDISK_IMAGE: u64 = 0x218;
    pub const RAMDISK_SIZE: u64 = 0x21C;
    pub const HEAP_END_PTR: u64 = 0x224;
    pub const CMD_LINE_PTR: u64 = 0x228;
    pub const INITRD_ADDR_MAX: u64 = 0x22C;
    pub const KERNEL_ALIGNMENT: u64 = 0x230;
    pub const RELOCATABLE_KERNEL: u64 = 0x234;
    pub const XLOADFLAGS: u64 = 0x236;
    pub const CMDLINE_SIZE: u64 = 0x238;
    pub const PREF_ADDRESS: u64 = 0x258;
    pub const INIT_SIZE: u64 = 0x260;
    /// End of the setup header area of `struct boot_params`.
    pub const HEADER_AREA_END: u64 = 0x290;
    pub const E820_TABLE: u64 = 0x2D0;
}

/// Most e820 entries the zero page holds.
pub const E820_MAX: usize = 128;

const HDRS: u32 = 0x5372_6448; // "HdrS"

/// The setup-header fields the loader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version (0x020F is 2.15).
    pub version: u16,
    /// Number of 512-byte setup sectors after the boot sector (0 read as 4).
    pub setup_sects: u8,
    /// `loadflags`.
    pub loadflags: u8,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    /// Physical alignment a relocatable kernel needs.
    pub kernel_alignment: u32,
    /// Whether the kernel is relocatable.
    pub relocatable: bool,
    /// `xloadflags` (0 before protocol 2.12).
    pub xloadflags: u16,
    /// Longest command line without the NUL.
    pub cmdline_size: u32,
    /// Preferred load address (0 before protocol 2.10).
    pub pref_address: u64,
    /// Memory needed from the run address during initialisation (0 before
    /// protocol 2.10).
    pub init_size: u32,
    /// File offset of the end of the setup header (`0x202 + byte at 0x201`).
    pub header_end: u64,
}

impl SetupHeader {
    /// File offset of the protected-mode kernel.
    pub fn kernel_offset(&self) -> u64 {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (sects as u64 + 1) * 512
    }
}

/// True when `image` carries the bzImage magics (boot flag and `"HdrS"`).
pub fn is_bzimage(image: &[u8]) -> bool {
    le16(image, off::BOOT_FLAG) == Some(0xAA55) && le32(image, off::HEADER) == Some(HDRS)
}

/// Parses and checks the setup header of a bzImage.
pub fn parse_header(image: &[u8]) -> Result<SetupHeader, BootError> {
    let len = image.len() as u64;
    let trunc = |need| BootError::Truncated {
        what: "Linux setup header",
        need,
        len,
    };
    if len < off::VERSION {
        return Err(trunc(off::VERSION));
    }
    if le16(image, off::BOOT_FLAG) != Some(0xAA55) {
        return Err(BootError::NotBzImage(
            "no boot sector signature 0xAA55 at 0x1FE",
        ));
    }
    if le32(image, off::HEADER) != Some(HDRS) {
        return Err(BootError::NotBzImage("no \"HdrS\" magic at 0x202"));
    }
    let r8 = |o: u64| image.get(o as usize).copied().ok_or(trunc(o + 1));
    let r16 = |o: u64| le16(image, o).ok_or(trunc(o + 2));
    let r32 = |o: u64| le32(image, o).ok_or(trunc(o + 4));
    let version = r16(off::VERSION)?;
    if version < MIN_PROTOCOL {
        return Err(BootError::ProtocolTooOld {
            major: (version >> 8) as u8,
            minor: version as u8,
        });
    }
    let loadflags = r8(off::LOADFLAGS)?;
    if loadflags & LOADED_HIGH == 0 {
        return Err(BootError::NotBzImage(
            "a zImage (LOADED_HIGH not set); only bzImage is supported",
        ));
    }
    let at_least = |v: u16| version >= v;
    let h = SetupHeader {
        version,
        setup_sects: r8(off::SETUP_SECTS)?,
        loadflags,
        initrd_addr_max: r32(off::INITRD_ADDR_MAX)?,
        kernel_alignment: r32(off::KERNEL_ALIGNMENT)?,
        relocatable: r8(off::RELOCATABLE_KERNEL)? != 0,
        xloadflags: if at_least(0x020C) {
            r16(off::XLOADFLAGS)?
        } else {
            0
        },
        cmdline_size: r32(off::CMDLINE_SIZE)?,
        pref_address: if at_least(0x020A) {
            le64(image, off::PREF_ADDRESS).ok_or(trunc(off::PREF_ADDRESS + 8))?
        } else {
            0
        },
        init_size: if at_least(0x020A) {
            r32(off::INIT_SIZE)?
        } else {
            0
        },
        header_end: off::HEADER + r8(off::JUMP_LEN)? as u64,
    };
    let koff = h.kernel_offset();
    if koff >= len {
        return Err(BootError::Truncated {
            what: "protected-mode kernel after the setup sectors",
            need: koff + 1,
            len,
        });
    }
    Ok(h)
}

/// Boot inputs besides the kernel image.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxParams<'a> {
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Initial ramdisk, if any.
    pub initrd: Option<&'a [u8]>,
    /// Guest address of the ACPI RSDP, passed in `acpi_rsdp_addr`.
    pub acpi_rsdp_addr: Option<u64>,
}

/// Validates everything, then writes the kernel, initrd, command line and
/// zero page. The GDT and entry state are the caller's.
fn prepare(
    ram: &GuestRam,
    image: &[u8],
    p: &LinuxParams<'_>,
    want_64: bool,
) -> Result<(), BootError> {
    check_ram(ram)?;
    let size = ram.size();
    let h = parse_header(image)?;
    if want_64 && h.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry);
    }
    let kernel = &image[h.kernel_offset() as usize..];
    let image_end = KERNEL_ADDR + kernel.len() as u64;
    let align = h.kernel_alignment as u64;
    let aligned_load = if h.relocatable && align.is_power_of_two() {
        KERNEL_ADDR.next_multiple_of(align)
    } else {
        KERNEL_ADDR
    };
    let run_start = if h.relocatable {
        aligned_load.max(h.pref_address)
    } else if h.pref_address != 0 {
        h.pref_address
    } else {
        KERNEL_ADDR
    };
    let kernel_end = image_end.max(run_start.saturating_add(h.init_size as u64));
    if kernel_end > size {
        return Err(BootError::KernelTooBig {
            needed: kernel_end,
            ram: size,
        });
    }

    let initrd = match p.initrd {
        Some(data) if !data.is_empty() => {
            let len = data.len() as u64;
            let top = size.min(h.initrd_addr_max as u64 + 1).min(1 << 32);
            let available = top.saturating_sub(kernel_end);
            let start = top.saturating_sub(len) & !(PAGE_SIZE - 1);
            if len > available || start < kernel_end {
                return Err(BootError::InitrdTooBig { len, available });
            }
            (start, len)
        }
        _ => (0, 0),
    };

    // Validates the command line before writing it; the last check.
    write_strings(ram, &[p.cmdline], h.cmdline_size as u64)?;

    ram.write(KERNEL_ADDR, kernel)?;
    if let (Some(data), (start, len)) = (p.initrd, initrd) {
        if len != 0 {
            ram.write(start, data)?;
        }
    }

    let zp = |o: u64| ZERO_PAGE_ADDR + o;
    ram.fill(ZERO_PAGE_ADDR, PAGE_SIZE, 0)?;
    let hdr_end = h
        .header_end
        .min(image.len() as u64)
        .min(off::HEADER_AREA_END);
    ram.write(
        zp(off::SETUP_SECTS),
        &image[off::SETUP_SECTS as usize..hdr_end as usize],
    )?;
    ram.write_u8(zp(off::TYPE_OF_LOADER), 0xFF)?;
    ram.write_u8(zp(off::LOADFLAGS), h.loadflags | CAN_USE_HEAP)?;
    ram.write_u32(zp(off::CODE32_START), KERNEL_ADDR as u32)?;
    ram.write_u16(zp(off::HEAP_END_PTR), HEAP_END_PTR)?;
    ram.write_u32(zp(off::CMD_LINE_PTR), CMDLINE_ADDR as u32)?;
    ram.write_u32(zp(off::RAMDISK_IMAGE), initrd.0 as u32)?;
    ram.write_u32(zp(off::RAMDISK_SIZE), initrd.1 as u32)?;
    let alt_mem_k = (size.min(1 << 32) - KERNEL_MIN_ADDR) / 1024;
    ram.write_u32(zp(off::ALT_MEM_K), alt_mem_k as u32)?;
    if let Some(rsdp) = p.acpi_rsdp_addr {
        ram.write_u64(zp(off::ACPI_RSDP_ADDR), rsdp)?;
    }
    let map = e820_map(size);
    for (i, e) in map.iter().take(E820_MAX).enumerate() {
        let a = zp(off::E820_TABLE) + 20 * i as u64;
        ram.write_u64(a, e.addr)?;
        ram.write_u64(a + 8, e.size)?;
        ram.write_u32(a + 16, e.kind as u32)?;
    }
    ram.write_u8(zp(off::E820_ENTRIES), map.len().min(E820_MAX) as u8)?;
    Ok(())
}

/// Loads a bzImage for the 32-bit boot protocol entry (see the module
/// documentation for what is written and the entry state).
///
/// Everything is validated before guest memory is written.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    params: &LinuxParams<'_>,
) -> Result<EntryState, BootError> {
    prepare(ram, image, params, false)?;
    write_gdt(ram, gdt::CODE32)?;
    let mut st = EntryState::protected32(KERNEL_ADDR);
    st.rsi = ZERO_PAGE_ADDR;
    Ok(st)
}

/// Loads a bzImage for the 64-bit boot protocol entry: like [`load`], plus
/// identity-mapped page tables for 0–4 GiB and a GDT with a 64-bit code
/// descriptor; the entry is `startup_64` at 0x100000 + 0x200 in long mode.
/// Fails with [`BootError::No64BitEntry`] for a kernel without
/// `XLF_KERNEL_64`.
pub fn load_64(
    ram: &GuestRam,
    image: &[u8],
    params: &LinuxParams<'_>,
) -> Result<EntryState, BootError> {
    prepare(ram, image, params, true)?;
    ram.fill(PML4_ADDR, PD_ADDR + 4 * PAGE_SIZE - PML4_ADDR, 0)?;
    ram.write_u64(PML4_ADDR, PDPT_ADDR | 0x3)?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * PAGE_SIZE;
        ram.write_u64(PDPT_ADDR + 8 * i, pd | 0x3)?;
        for j in 0..512u64 {
            // Present, writable, 2 MiB page.
            ram.write_u64(pd + 8 * j, ((i * 512 + j) << 21) | 0x83)?;
        }
    }
    let gdt = write_gdt(ram, gdt::CODE64)?;
    let mut st = EntryState::new(
        EntryMode::Long64 {
            gdt: DescriptorTable {
                base: gdt.base,
                limit: gdt.limit,
            },
            cs: BOOT_CS,
            ds: BOOT_DS,
            cr3: PML4_ADDR,
        },
        KERNEL_ADDR + STARTUP_64_OFFSET,
    );
    st.rsi = ZERO_PAGE_ADDR;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{ram, read_cstr};
    use crate::{KernelFormat, GDT_ADDR};

    const MIB: u64 = 1 << 20;

    /// A fake bzImage: 4 setup sectors (kernel at file offset 0xA00), the
    /// setup area after the header filled with 0xCC, then `pm_len` kernel
    /// bytes counting up.
    fn bzimage(version: u16, pm_len: usize, init_size: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0xA00 + pm_len];
        f[0x26C..0xA00].fill(0xCC);
        let put = |f: &mut Vec<u8>, o: usize, b: &[u8]| f[o..o + b.len()].copy_from_slice(b);
        put(&mut f, 0x1F1, &[4]);
        put(&mut f, 0x1FE, &0xAA55u16.to_le_bytes());
        put(&mut f, 0x200, &[0xEB, 0x6A]);
        put(&mut f, 0x202, b"HdrS");
        put(&mut f, 0x206, &version.to_le_bytes());
        put(&mut f, 0x211, &[LOADED_HIGH]);
        put(&mut f, 0x214, &0x100000u32.to_le_bytes());
        put(&mut f, 0x22C, &0x7FFF_FFFFu32.to_le_bytes());
        put(&mut f, 0x230, &0x200000u32.to_le_bytes());
        put(&mut f, 0x234, &[1]);
        put(&mut f, 0x236, &3u16.to_le_bytes());
        put(&mut f, 0x238, &255u32.to_le_bytes());
        put(&mut f, 0x258, &0x1000000u64.to_le_bytes());
        put(&mut f, 0x260, &init_size.to_le_bytes());
        for (i, b) in f[0xA00..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    fn kernel() -> Vec<u8> {
        bzimage(0x020F, 0x3000, 0x100000)
    }

    #[test]
    fn loads_bzimage_for_32_bit_entry() {
        let ram = ram(32 * MIB);
        let k = kernel();
        assert_eq!(crate::detect(&k), KernelFormat::LinuxBzImage);
        let initrd = vec![0x77u8; 10000];
        let st = load(
            &ram,
            &k,
            &LinuxParams {
                cmdline: "console=ttyS0 root=/dev/ram0",
                initrd: Some(&initrd),
                acpi_rsdp_addr: Some(0xE0000),
            },
        )
        .unwrap();

        let mut want = EntryState::protected32(0x100000);
        want.rsi = 0x7000;
        assert_eq!(st, want);
        assert_eq!((st.rbp, st.rdi, st.rbx), (0, 0, 0));

        // Kernel bytes at 1 MiB.
        assert_eq!(ram.read_u8(0x100000).unwrap(), 0);
        assert_eq!(ram.read_u8(0x100001).unwrap(), 1);
        assert_eq!(ram.read_u8(0x100000 + 0x2FFF).unwrap(), 0xFF);

        let z = |o: u64| ZERO_PAGE_ADDR + o;
        // Setup header copied, loader fields set.
        assert_eq!(ram.read_u8(z(0x1F1)).unwrap(), 4);
        assert_eq!(ram.read_u16(z(0x1FE)).unwrap(), 0xAA55);
        assert_eq!(ram.read_u32(z(0x202)).unwrap(), HDRS);
        assert_eq!(ram.read_u16(z(0x206)).unwrap(), 0x020F);
        assert_eq!(ram.read_u32(z(0x238)).unwrap(), 255);
        assert_eq!(ram.read_u8(z(0x210)).unwrap(), 0xFF);
        assert_eq!(ram.read_u8(z(0x211)).unwrap(), 0x81);
        assert_eq!(ram.read_u32(z(0x214)).unwrap(), 0x100000);
        assert_eq!(ram.read_u16(z(0x224)).unwrap(), 0xFE00);
        assert_eq!(ram.read_u32(z(0x228)).unwrap(), 0x20000);
        assert_eq!(read_cstr(&ram, 0x20000), "console=ttyS0 root=/dev/ram0");
        assert_eq!(ram.read_u64(z(0x070)).unwrap(), 0xE0000);
        assert_eq!(ram.read_u32(z(0x1E0)).unwrap(), 31 * 1024);
        // Nothing past the header's end (0x26C) is copied.
        assert_eq!(ram.read_u32(z(0x26C)).unwrap(), 0);
        assert_eq!(ram.read_u8(z(0x28F)).unwrap(), 0);

        // Initrd: page aligned just below the top of RAM.
        let start = (32 * MIB - 10000) & !0xFFF;
        assert_eq!(start, 0x1FFD000);
        assert_eq!(ram.read_u32(z(0x218)).unwrap(), start as u32);
        assert_eq!(ram.read_u32(z(0x21C)).unwrap(), 10000);
        assert_eq!(ram.read_u8(start).unwrap(), 0x77);
        assert_eq!(ram.read_u8(start + 9999).unwrap(), 0x77);

        // e820.
        assert_eq!(ram.read_u8(z(0x1E8)).unwrap(), 5);
        let expect: [(u64, u64, u32); 5] = [
            (0, 0x9FC00, 1),
            (0x9FC00, 0x400, 2),
            (0xE0000, 0x20000, 2),
            (0x100000, 31 * MIB, 1),
            (0xE000_0000, 0x1000_0000, 2),
        ];
        for (i, (addr, size, kind)) in expect.iter().enumerate() {
            let a = z(0x2D0) + 20 * i as u64;
            assert_eq!(ram.read_u64(a).unwrap(), *addr);
            assert_eq!(ram.read_u64(a + 8).unwrap(), *size);
            assert_eq!(ram.read_u32(a + 16).unwrap(), *kind);
        }
        assert_eq!(ram.read_u64(z(0x2D0) + 100).unwrap(), 0);

        // GDT.
        assert_eq!(ram.read_u64(GDT_ADDR + 0x10).unwrap(), gdt::CODE32);
        assert_eq!(ram.read_u64(GDT_ADDR + 0x18).unwrap(), gdt::DATA);
    }

    #[test]
    fn no_initrd_and_no_rsdp_leave_fields_zero() {
        let ram = ram(32 * MIB);
        load(&ram, &kernel(), &LinuxParams::default()).unwrap();
        let z = |o: u64| ZERO_PAGE_ADDR + o;
        assert_eq!(ram.read_u32(z(0x218)).unwrap(), 0);
        assert_eq!(ram.read_u32(z(0x21C)).unwrap(), 0);
        assert_eq!(ram.read_u64(z(0x070)).unwrap(), 0);
        assert_eq!(ram.read_u8(0x20000).unwrap(), 0, "empty command line");
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let ram = ram(64 * MIB);
        let mut k = kernel();
        k[0x22C..0x230].copy_from_slice(&(24 * MIB as u32 - 1).to_le_bytes());
        let initrd = [1u8; 4096];
        load(
            &ram,
            &k,
            &LinuxParams {
                initrd: Some(&initrd),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            ram.read_u32(ZERO_PAGE_ADDR + 0x218).unwrap() as u64,
            24 * MIB - 4096
        );
    }

    #[test]
    fn loads_bzimage_for_64_bit_entry() {
        let ram = ram(32 * MIB);
        let st = load_64(&ram, &kernel(), &LinuxParams::default()).unwrap();
        assert_eq!(st.rip, 0x100200);
        assert_eq!(st.rsi, 0x7000);
        assert_eq!(
            st.mode,
            EntryMode::Long64 {
                gdt: DescriptorTable {
                    base: 0x500,
                    limit: 31
                },
                cs: 0x10,
                ds: 0x18,
                cr3: 0xA000
            }
        );
        assert_eq!(ram.read_u64(GDT_ADDR + 0x10).unwrap(), gdt::CODE64);
        assert_eq!(ram.read_u64(0xA000).unwrap(), 0xB003);
        assert_eq!(ram.read_u64(0xA008).unwrap(), 0);
        assert_eq!(ram.read_u64(0xB000).unwrap(), 0xC003);
        assert_eq!(ram.read_u64(0xB018).unwrap(), 0xF003);
        assert_eq!(ram.read_u64(0xC000).unwrap(), 0x83);
        assert_eq!(ram.read_u64(0xC008).unwrap(), 0x200083);
        assert_eq!(ram.read_u64(0xFFF8).unwrap(), 0xFFE0_0083);
        assert_eq!(ram.read_u32(ZERO_PAGE_ADDR + 0x228).unwrap(), 0x20000);
    }

    #[test]
    fn kernel_without_64_bit_entry() {
        let ram = ram(32 * MIB);
        let mut k = kernel();
        k[0x236] = 0;
        assert_eq!(
            load_64(&ram, &k, &LinuxParams::default()),
            Err(BootError::No64BitEntry)
        );
        // Protocol 2.10 has no xloadflags at all.
        let k = bzimage(0x020A, 0x1000, 0x1000);
        assert_eq!(
            load_64(&ram, &k, &LinuxParams::default()),
            Err(BootError::No64BitEntry)
        );
    }

    #[test]
    fn missing_hdrs() {
        let ram = ram(32 * MIB);
        let mut k = kernel();
        k[0x202] = b'X';
        assert!(matches!(
            load(&ram, &k, &LinuxParams::default()),
            Err(BootError::NotBzImage(_))
        ));
        assert_eq!(crate::detect(&k), KernelFormat::Unknown);
        let mut k = kernel();
        k[0x1FE] = 0;
        assert!(matches!(
            load(&ram, &k, &LinuxParams::default()),
            Err(BootError::NotBzImage(_))
        ));
    }

    #[test]
    fn zimage_is_refused() {
        let ram = ram(32 * MIB);
        let mut k = kernel();
        k[0x211] = 0;
        assert!(matches!(
            load(&ram, &k, &LinuxParams::default()),
            Err(BootError::NotBzImage(_))
        ));
    }

    #[test]
    fn old_protocol() {
        let ram = ram(32 * MIB);
        let k = bzimage(0x0205, 0x1000, 0);
        assert_eq!(
            load(&ram, &k, &LinuxParams::default()),
            Err(BootError::ProtocolTooOld { major: 2, minor: 5 })
        );
        assert_eq!(
            BootError::ProtocolTooOld { major: 2, minor: 5 }.to_string(),
            "Linux boot protocol 2.05 is too old (2.06 or later required)"
        );
    }

    #[test]
    fn truncated_images() {
        let ram = ram(32 * MIB);
        let k = kernel();
        // Cut inside the setup header.
        assert!(matches!(
            load(&ram, &k[..0x100], &LinuxParams::default()),
            Err(BootError::Truncated { .. })
        ));
        assert!(matches!(
            load(&ram, &k[..0x230], &LinuxParams::default()),
            Err(BootError::Truncated {
                what: "Linux setup header",
                ..
            })
        ));
        // Setup sectors present, no kernel after them.
        assert_eq!(
            load(&ram, &k[..0xA00], &LinuxParams::default()),
            Err(BootError::Truncated {
                what: "protected-mode kernel after the setup sectors",
                need: 0xA01,
                len: 0xA00
            })
        );
        // setup_sects = 255 claims far more than the file.
        let mut k2 = k.clone();
        k2[0x1F1] = 255;
        assert!(matches!(
            load(&ram, &k2, &LinuxParams::default()),
            Err(BootError::Truncated { .. })
        ));
    }

    #[test]
    fn kernel_too_big_for_ram() {
        // init_size from pref_address (16 MiB) needs 17 MiB.
        let ram = ram(16 * MIB);
        assert_eq!(
            load(&ram, &kernel(), &LinuxParams::default()),
            Err(BootError::KernelTooBig {
                needed: 17 * MIB,
                ram: 16 * MIB
            })
        );
        // The image itself larger than RAM.
        let ram = ram_small();
        let k = bzimage(0x020F, 3 * MIB as usize, 0);
        assert!(matches!(
            load(&ram, &k, &LinuxParams::default()),
            Err(BootError::KernelTooBig { .. })
        ));
        // Huge init_size near 4 GiB must not overflow.
        let ram = ram_small();
        let k = bzimage(0x020F, 0x1000, u32::MAX);
        assert!(matches!(
            load(&ram, &k, &LinuxParams::default()),
            Err(BootError::KernelTooBig { .. })
        ));
    }

    fn ram_small() -> GuestRam {
        ram(2 * MIB)
    }

    #[test]
    fn minimum_ram_with_small_kernel() {
        let ram = ram_small();
        let mut k = bzimage(0x020F, 0x1000, 0x80000);
        k[0x258..0x260].copy_from_slice(&0x100000u64.to_le_bytes());
        k[0x230..0x234].copy_from_slice(&0x1000u32.to_le_bytes());
        let initrd = [9u8; 0x1000];
        load(
            &ram,
            &k,
            &LinuxParams {
                initrd: Some(&initrd),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ram.read_u32(ZERO_PAGE_ADDR + 0x218).unwrap(), 0x1FF000);
    }

    #[test]
    fn initrd_too_big() {
        let ram = ram(32 * MIB);
        let initrd = vec![0u8; 16 * MIB as usize];
        assert_eq!(
            load(
                &ram,
                &kernel(),
                &LinuxParams {
                    initrd: Some(&initrd),
                    ..Default::default()
                }
            ),
            Err(BootError::InitrdTooBig {
                len: 16 * MIB,
                available: 15 * MIB
            })
        );
        // Nothing was written.
        assert_eq!(ram.read_u8(0x100001).unwrap(), 0);
        assert_eq!(ram.read_u16(ZERO_PAGE_ADDR + 0x1FE).unwrap(), 0);
    }

    #[test]
    fn cmdline_too_long() {
        let ram = ram(32 * MIB);
        let ok = "a".repeat(255);
        load(
            &ram,
            &kernel(),
            &LinuxParams {
                cmdline: &ok,
                ..Default::default()
            },
        )
        .unwrap();
        let long = "a".repeat(256);
        assert_eq!(
            load(
                &ram,
                &kernel(),
                &LinuxParams {
                    cmdline: &long,
                    ..Default::default()
                }
            ),
            Err(BootError::CmdlineTooLong { len: 256, max: 255 })
        );
    }

    #[test]
    fn ram_too_small() {
        let ram = ram(MIB);
        assert!(matches!(
            load(&ram, &kernel(), &LinuxParams::default()),
            Err(BootError::RamTooSmall { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let ram = ram(32 * MIB);
        let base = kernel();
        for i in 0x1F0..0x270 {
            for v in [0x00, 0xFF, 0x80, 0x01] {
                let mut k = base.clone();
                k[i] = v;
                let _ = load(&ram, &k, &LinuxParams::default());
                let _ = load_64(&ram, &k, &LinuxParams::default());
            }
        }
        for len in (0..0xA10).step_by(7) {
            let _ = load(&ram, &base[..len], &LinuxParams::default());
        }
    }
}
