//! Multiboot v1 (specification 0.6.96).
//!
//! [`load`] finds the Multiboot header in the first 8192 bytes, loads the
//! kernel and builds the Multiboot information structure:
//!
//! * **Image.** With header flag 16 (address fields) the image is loaded as
//!   the header's `load_addr`/`load_end_addr`/`bss_end_addr` say, whatever
//!   the file format (the "a.out kludge"; this is how GRUB 2 does it and
//!   also how an ELF64 kernel can be Multiboot-loaded). Otherwise the file
//!   must be an ELF32 i386 executable: each `PT_LOAD` segment is copied to
//!   its physical address `p_paddr` and its bss (`p_memsz - p_filesz`)
//!   zeroed; the entry point is `e_entry`, translated from virtual to
//!   physical through the segment containing it (for higher-half kernels,
//!   as GRUB 2 does). Every loaded byte must lie in RAM at or above 1 MiB.
//! * **Required header flags.** Bit 0 (page-aligned modules) and bit 1
//!   (memory information) are honoured; bit 2 (video mode) is accepted and
//!   ignored (no video information is passed). Any other bit in 0–15 is
//!   refused.
//! * **Information structure** at [`INFO_ADDR`], with flags
//!   [`INFO_MEMORY`], [`INFO_CMDLINE`], [`INFO_MODS`], [`INFO_MMAP`] and
//!   [`INFO_LOADER_NAME`]: `mem_lower` = 639 KiB, `mem_upper` = RAM above
//!   1 MiB in KiB (capped at 4 GiB), the command line, the module list at
//!   [`MODS_ADDR`], the e820 map as Multiboot mmap entries at [`MMAP_ADDR`]
//!   and the boot loader name `"popek"` at [`LOADER_NAME_ADDR`].
//! * **Modules** are placed one after another above the kernel's highest
//!   byte (including bss), each page aligned; `mod_end` is exclusive (the
//!   first byte after the module), as GRUB does. Module strings follow the
//!   command line in the string area.
//!
//! Entry ([`EntryState`]): flat 32-bit protected mode with the loaders' GDT
//! (CS = 0x10, DS = ES = SS = FS = GS = 0x18), paging off, IF = 0,
//! EAX = 0x2BADB002, EBX = [`INFO_ADDR`], EIP = the entry point, all other
//! general registers 0 (ESP is undefined by the specification; the kernel
//! must set up its own stack).

use popek_memory::GuestRam;

use crate::e820::e820_map;
use crate::{
    check_ram, gdt, le16, le32, page_align_up, slice, BootError, EntryState, KERNEL_MIN_ADDR,
};

/// Magic number of the Multiboot header.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie (32-bit aligned) within this many first bytes.
pub const SEARCH_LIMIT: u64 = 8192;

/// Header flag: align modules on page boundaries.
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: memory information required.
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: video mode information requested (ignored).
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag: the address fields at offsets 12–28 are valid.
pub const FLAG_ADDRESS: u32 = 1 << 16;

/// Info flag: `mem_lower`/`mem_upper` valid.
pub const INFO_MEMORY: u32 = 1 << 0;
/// Info flag: `cmdline` valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// Info flag: `mods_count`/`mods_addr` valid.
pub const INFO_MODS: u32 = 1 << 3;
/// Info flag: `mmap_length`/`mmap_addr` valid.
pub const INFO_MMAP: u32 = 1 << 6;
/// Info flag: `boot_loader_name` valid.
pub const INFO_LOADER_NAME: u32 = 1 << 9;

/// Guest address of the Multiboot information structure.
pub const INFO_ADDR: u64 = 0x8000;
/// Size reserved for (and zeroed of) the information structure.
pub const INFO_SIZE: u64 = 0x80;
/// Guest address of the memory map.
pub const MMAP_ADDR: u64 = 0x8100;
/// Guest address of the boot loader name.
pub const LOADER_NAME_ADDR: u64 = 0x8200;
/// Boot loader name passed to the kernel.
pub const LOADER_NAME: &str = "popek";
/// Guest address of the module list.
pub const MODS_ADDR: u64 = 0x9000;
/// Most modules the module list holds (16 bytes each, 4 KiB).
pub const MAX_MODULES: usize = 256;

/// The Multiboot address fields (header flag 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressFields {
    /// Physical address of the header itself.
    pub header_addr: u32,
    /// Physical address of the start of the image.
    pub load_addr: u32,
    /// End of the data to load (0: to the end of the file).
    pub load_end_addr: u32,
    /// End of the bss (0: no bss).
    pub bss_end_addr: u32,
    /// Entry point.
    pub entry_addr: u32,
}

/// A Multiboot header found in an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// File offset of the header.
    pub offset: u64,
    /// The header's flags.
    pub flags: u32,
    /// The address fields, when flag 16 is set.
    pub address: Option<AddressFields>,
}

/// A module (e.g. an initrd) passed to a Multiboot kernel.
#[derive(Debug, Clone, Copy)]
pub struct Module<'a> {
    /// The module's contents.
    pub data: &'a [u8],
    /// Its string (the module's command line, often its name).
    pub cmdline: &'a str,
}

/// Finds and checks the Multiboot header: the first 32-bit aligned magic in
/// the first [`SEARCH_LIMIT`] bytes with a valid checksum. A magic with a bad
/// checksum is skipped; if no valid header follows, the first bad checksum
/// is reported.
pub fn find_header(image: &[u8]) -> Result<Header, BootError> {
    let (off, flags) = scan(image)?;
    let address = if flags & FLAG_ADDRESS != 0 {
        let field = |i: u64| {
            le32(image, off + 12 + 4 * i).ok_or(BootError::Truncated {
                what: "Multiboot header address fields",
                need: off + 32,
                len: image.len() as u64,
            })
        };
        Some(AddressFields {
            header_addr: field(0)?,
            load_addr: field(1)?,
            load_end_addr: field(2)?,
            bss_end_addr: field(3)?,
            entry_addr: field(4)?,
        })
    } else {
        None
    };
    Ok(Header {
        offset: off,
        flags,
        address,
    })
}

/// File offset and flags of the first magic with a valid checksum.
pub(crate) fn scan(image: &[u8]) -> Result<(u64, u32), BootError> {
    let limit = (image.len() as u64).min(SEARCH_LIMIT);
    let mut bad_checksum = None;
    let mut off = 0;
    while off + 12 <= limit {
        if le32(image, off) == Some(HEADER_MAGIC) {
            let flags = le32(image, off + 4).unwrap_or(0);
            let checksum = le32(image, off + 8).unwrap_or(0);
            let sum = HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum);
            if sum == 0 {
                return Ok((off, flags));
            }
            bad_checksum.get_or_insert(BootError::BadMultibootChecksum { offset: off, sum });
        }
        off += 4;
    }
    Err(bad_checksum.unwrap_or(BootError::NoMultibootHeader))
}

/// A piece of the image to copy into guest memory.
struct Segment<'a> {
    addr: u64,
    data: &'a [u8],
    memsz: u64,
}

/// The legacy PC holes no segment may take: the EBDA, VGA memory, option
/// ROMs and the BIOS/ACPI area.
const LEGACY_HOLES: (u64, u64) = (crate::e820::EBDA_START, KERNEL_MIN_ADDR);

/// Checks that `addr..addr+len` lies in RAM outside the legacy holes
/// (anywhere else a kernel may load; the loader moves its own structures
/// out of the way).
fn check_segment(addr: u64, len: u64, ram: u64) -> Result<(), BootError> {
    let end = match addr.checked_add(len) {
        Some(end) if end <= ram => end,
        _ => return Err(BootError::SegmentOutsideRam { addr, len, ram }),
    };
    if addr < LEGACY_HOLES.1 && end > LEGACY_HOLES.0 {
        return Err(BootError::SegmentOverlapsBootArea {
            addr,
            len,
            what: "the EBDA, VGA memory and BIOS/ACPI area 0x9FC00-0xFFFFF",
        });
    }
    Ok(())
}

/// Where the loader puts its own structures: the GDT, the Multiboot
/// information, the memory map, the loader name, the module list and the
/// strings (command lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The GDT.
    pub gdt: u64,
    /// The Multiboot information structure.
    pub info: u64,
    /// The memory map.
    pub mmap: u64,
    /// The boot loader name.
    pub name: u64,
    /// The module list.
    pub mods: u64,
    /// The strings, up to `strings_end`.
    pub strings: u64,
    /// End of the room for the strings.
    pub strings_end: u64,
}

impl Layout {
    /// Low memory, below the EBDA: where the loader puts its structures
    /// when the kernel and its modules leave it free.
    pub const LOW: Layout = Layout {
        gdt: crate::GDT_ADDR,
        info: INFO_ADDR,
        mmap: MMAP_ADDR,
        name: LOADER_NAME_ADDR,
        mods: MODS_ADDR,
        strings: crate::CMDLINE_ADDR,
        strings_end: crate::CMDLINE_END,
    };

    /// The same structures from `base` (page aligned), above everything
    /// loaded, as QEMU does; the strings may take the rest of RAM.
    fn above(base: u64, ram: u64) -> Layout {
        Layout {
            gdt: base,
            info: base + 0x100,
            mmap: base + 0x200,
            name: base + 0x300,
            mods: base + 0x1000,
            strings: base + 0x2000,
            strings_end: ram.min(1 << 32),
        }
    }

    /// The ranges the structures take for `modules` modules, `strings`
    /// bytes of strings and `mmap` memory-map entries.
    fn used(&self, modules: usize, strings: u64, mmap: usize) -> [(u64, u64); 6] {
        [
            (self.gdt, crate::GDT_LIMIT as u64 + 1),
            (self.info, INFO_SIZE),
            (self.mmap, 24 * mmap as u64),
            (self.name, LOADER_NAME.len() as u64 + 1),
            (self.mods, 16 * modules.max(1) as u64),
            (self.strings, strings),
        ]
    }
}

/// Whether `a..a+alen` and `b..b+blen` overlap.
fn overlaps((a, alen): (u64, u64), (b, blen): (u64, u64)) -> bool {
    a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Segments and entry point from the address fields.
fn plan_address_fields<'a>(
    image: &'a [u8],
    header: &Header,
    a: &AddressFields,
) -> Result<(Vec<Segment<'a>>, u64), BootError> {
    let (header_addr, load_addr) = (a.header_addr as u64, a.load_addr as u64);
    if load_addr > header_addr {
        return Err(BootError::BadAddressFields(
            "load_addr is above header_addr",
        ));
    }
    let delta = header_addr - load_addr;
    if delta > header.offset {
        return Err(BootError::BadAddressFields(
            "header_addr - load_addr is larger than the header's file offset",
        ));
    }
    let file_off = header.offset - delta;
    let load_len = if a.load_end_addr == 0 {
        image.len() as u64 - file_off
    } else if (a.load_end_addr as u64) < load_addr {
        return Err(BootError::BadAddressFields(
            "load_end_addr is below load_addr",
        ));
    } else {
        a.load_end_addr as u64 - load_addr
    };
    let data = slice(
        image,
        file_off,
        load_len,
        "Multiboot image (load_addr..load_end_addr)",
    )?;
    let memsz = if a.bss_end_addr == 0 {
        load_len
    } else if (a.bss_end_addr as u64) < load_addr + load_len {
        return Err(BootError::BadAddressFields(
            "bss_end_addr is below the end of the loaded image",
        ));
    } else {
        a.bss_end_addr as u64 - load_addr
    };
    Ok((
        vec![Segment {
            addr: load_addr,
            data,
            memsz,
        }],
        a.entry_addr as u64,
    ))
}

const ELF_MAGIC: [u8; 4] = [0x7F, b'E', b'L', b'F'];
const ELF_HEADER_SIZE: u64 = 52;
const PHDR_SIZE: u64 = 32;
const PT_LOAD: u32 = 1;
const EM_386: u16 = 3;

/// Segments and entry point of an ELF32 i386 executable.
fn plan_elf(image: &[u8]) -> Result<(Vec<Segment<'_>>, u64), BootError> {
    if image.get(..4) != Some(&ELF_MAGIC[..]) {
        return Err(BootError::NotElf);
    }
    let ident = slice(image, 0, 16, "ELF identification")?;
    match ident[4] {
        1 => {}
        2 => return Err(BootError::Elf64WithoutAddressFields),
        _ => return Err(BootError::BadElf("unknown ELF class")),
    }
    if ident[5] != 1 {
        return Err(BootError::BadElf("not little-endian"));
    }
    let eh = slice(image, 0, ELF_HEADER_SIZE, "ELF header")?;
    let h16 = |o| le16(eh, o).unwrap_or(0) as u64;
    let h32 = |o| le32(eh, o).unwrap_or(0) as u64;
    if h16(0x12) != EM_386 as u64 {
        return Err(BootError::BadElf("machine is not i386 (EM_386)"));
    }
    let (entry, phoff, phentsize, phnum) = (h32(0x18), h32(0x1C), h16(0x2A), h16(0x2C));
    if phnum == 0 {
        return Err(BootError::NoLoadableSegments);
    }
    if phentsize < PHDR_SIZE {
        return Err(BootError::BadElf(
            "program header entries are smaller than 32 bytes",
        ));
    }
    let table = slice(image, phoff, phentsize * phnum, "ELF program headers")?;
    let mut segments = Vec::new();
    let mut phys_entry = entry;
    for i in 0..phnum {
        let p = |o: u64| le32(table, i * phentsize + o).unwrap_or(0) as u64;
        if p(0) as u32 != PT_LOAD {
            continue;
        }
        let (offset, vaddr, paddr, filesz, memsz) = (p(4), p(8), p(12), p(16), p(20));
        if filesz > memsz {
            return Err(BootError::BadElf(
                "a segment's file size exceeds its memory size",
            ));
        }
        // A pure-bss segment may name any file offset.
        let data = if filesz == 0 {
            &[][..]
        } else {
            slice(image, offset, filesz, "ELF segment data")?
        };
        if memsz == 0 {
            continue;
        }
        if vaddr <= entry && entry - vaddr < memsz {
            phys_entry = paddr + (entry - vaddr);
        }
        segments.push(Segment {
            addr: paddr,
            data,
            memsz,
        });
    }
    if segments.is_empty() {
        return Err(BootError::NoLoadableSegments);
    }
    Ok((segments, phys_entry))
}

/// Loads a Multiboot kernel with its command line and modules into `ram` and
/// returns the entry state (see the module documentation).
///
/// Everything is validated before guest memory is written.
pub fn load(
    ram: &GuestRam,
    image: &[u8],
    cmdline: &str,
    modules: &[Module<'_>],
) -> Result<EntryState, BootError> {
    check_ram(ram)?;
    let size = ram.size();
    let header = find_header(image)?;
    let unsupported =
        header.flags & 0xFFFF & !(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE);
    if unsupported != 0 {
        return Err(BootError::UnsupportedMultibootFlags {
            flags: header.flags,
            unsupported,
        });
    }
    let (segments, entry) = match &header.address {
        Some(a) => plan_address_fields(image, &header, a)?,
        None => plan_elf(image)?,
    };
    let mut kernel_end = 0;
    for s in &segments {
        check_segment(s.addr, s.memsz, size)?;
        kernel_end = kernel_end.max(s.addr + s.memsz);
    }

    // Module placement: page aligned, one after another above the kernel
    // and above 1 MiB (clear of the legacy holes).
    if modules.len() > MAX_MODULES {
        return Err(BootError::TooManyModules {
            count: modules.len(),
            max: MAX_MODULES,
        });
    }
    let mut placed = Vec::with_capacity(modules.len());
    let mut cursor = page_align_up(kernel_end.max(KERNEL_MIN_ADDR)).unwrap_or(u64::MAX);
    for (index, m) in modules.iter().enumerate() {
        let len = m.data.len() as u64;
        let end = match cursor.checked_add(len) {
            Some(end) if end <= size => end,
            _ => {
                return Err(BootError::ModuleTooBig {
                    index,
                    len,
                    start: cursor,
                    ram: size,
                })
            }
        };
        placed.push((cursor, end));
        cursor = page_align_up(end).unwrap_or(u64::MAX);
    }

    // The loader's structures: in low memory unless something loaded
    // there, else above everything loaded.
    let mut strings = Vec::with_capacity(1 + modules.len());
    strings.push(cmdline);
    strings.extend(modules.iter().map(|m| m.cmdline));
    let strings_len = crate::strings_len(&strings);
    let map = e820_map(size);
    let loaded: Vec<(u64, u64)> = segments
        .iter()
        .map(|s| (s.addr, s.memsz))
        .chain(placed.iter().map(|&(start, end)| (start, end - start)))
        .collect();
    let clash = |l: &Layout| {
        l.used(modules.len(), strings_len, map.len())
            .iter()
            .any(|&u| loaded.iter().any(|&x| overlaps(u, x)))
    };
    let layout = if clash(&Layout::LOW) {
        let top = loaded.iter().map(|&(a, l)| a + l).max().unwrap_or(0);
        let base = page_align_up(top.max(KERNEL_MIN_ADDR)).unwrap_or(u64::MAX);
        let l = Layout::above(base, size);
        if base.saturating_add(0x2000) > l.strings_end {
            return Err(BootError::NoRoomForBootInfo { base, ram: size });
        }
        l
    } else {
        Layout::LOW
    };
    // Strings are validated before anything is written.
    crate::check_strings(&strings, u64::MAX, layout.strings_end - layout.strings)?;

    for s in &segments {
        ram.write(s.addr, s.data)?;
        let filesz = s.data.len() as u64;
        ram.fill(s.addr + filesz, s.memsz - filesz, 0)?;
    }
    let string_addrs = crate::write_strings_at(ram, &strings, layout.strings)?;
    for (i, (m, &(start, end))) in modules.iter().zip(&placed).enumerate() {
        ram.write(start, m.data)?;
        let entry_addr = layout.mods + 16 * i as u64;
        ram.write_u32(entry_addr, start as u32)?;
        ram.write_u32(entry_addr + 4, end as u32)?;
        ram.write_u32(entry_addr + 8, string_addrs[i + 1] as u32)?;
        ram.write_u32(entry_addr + 12, 0)?;
    }

    for (i, e) in map.iter().enumerate() {
        let a = layout.mmap + 24 * i as u64;
        ram.write_u32(a, 20)?;
        ram.write_u64(a + 4, e.addr)?;
        ram.write_u64(a + 12, e.size)?;
        ram.write_u32(a + 20, e.kind as u32)?;
    }
    ram.write(layout.name, LOADER_NAME.as_bytes())?;
    ram.write_u8(layout.name + LOADER_NAME.len() as u64, 0)?;

    let info = layout.info;
    let mem_lower = size.min(crate::e820::EBDA_START) / 1024;
    let mem_upper = (size.min(1 << 32) - KERNEL_MIN_ADDR) / 1024;
    ram.fill(info, INFO_SIZE, 0)?;
    let flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    ram.write_u32(info, flags)?;
    ram.write_u32(info + 4, mem_lower as u32)?;
    ram.write_u32(info + 8, mem_upper as u32)?;
    ram.write_u32(info + 16, string_addrs[0] as u32)?;
    ram.write_u32(info + 20, modules.len() as u32)?;
    ram.write_u32(info + 24, layout.mods as u32)?;
    ram.write_u32(info + 44, 24 * map.len() as u32)?;
    ram.write_u32(info + 48, layout.mmap as u32)?;
    ram.write_u32(info + 64, layout.name as u32)?;

    let gdt = crate::write_gdt_at(ram, layout.gdt, gdt::CODE32)?;
    let mut state = EntryState::protected32(entry);
    if let crate::EntryMode::Protected32 { gdt: g, .. } = &mut state.mode {
        *g = gdt;
    }
    state.rax = BOOTLOADER_MAGIC as u64;
    state.rbx = info;
    Ok(state)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_util::{ram, read_cstr};
    use crate::{DescriptorTable, EntryMode, KernelFormat, BOOT_CS, BOOT_DS, GDT_ADDR};

    /// A Multiboot header with a correct checksum.
    pub fn mb_header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(HEADER_MAGIC.to_le_bytes());
        h.extend(flags.to_le_bytes());
        h.extend(
            0u32.wrapping_sub(HEADER_MAGIC)
                .wrapping_sub(flags)
                .to_le_bytes(),
        );
        h
    }

    /// One segment of a synthetic ELF: (paddr, vaddr, data, memsz).
    pub type Seg<'a> = (u32, u32, &'a [u8], u32);

    /// Builds an ELF32 i386 executable with a Multiboot header at 0x80 and
    /// each segment's data at 0x1000 * (i + 1).
    pub fn elf32(segs: &[Seg<'_>], entry: u32, mb_flags: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000 * (segs.len() + 1)];
        f[..4].copy_from_slice(&ELF_MAGIC);
        f[4] = 1; // ELFCLASS32
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[0x12..0x14].copy_from_slice(&EM_386.to_le_bytes());
        f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        f[0x18..0x1C].copy_from_slice(&entry.to_le_bytes());
        f[0x1C..0x20].copy_from_slice(&52u32.to_le_bytes()); // e_phoff
        f[0x28..0x2A].copy_from_slice(&52u16.to_le_bytes()); // e_ehsize
        f[0x2A..0x2C].copy_from_slice(&32u16.to_le_bytes());
        f[0x2C..0x2E].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, (paddr, vaddr, data, memsz)) in segs.iter().enumerate() {
            let ph = 52 + 32 * i;
            let off = 0x1000 * (i + 1);
            let words = [
                PT_LOAD,
                off as u32,
                *vaddr,
                *paddr,
                data.len() as u32,
                *memsz,
                5,
                0x1000,
            ];
            for (j, w) in words.iter().enumerate() {
                f[ph + 4 * j..ph + 4 * j + 4].copy_from_slice(&w.to_le_bytes());
            }
            f[off..off + data.len()].copy_from_slice(data);
        }
        let h = mb_header(mb_flags);
        f[0x80..0x80 + h.len()].copy_from_slice(&h);
        f
    }

    fn simple_kernel() -> Vec<u8> {
        elf32(
            &[
                (0x100000, 0x100000, &[0xF4, 0xEB, 0xFE], 0x10),
                (0x200000, 0x200000, b"data", 0x3000),
            ],
            0x100000,
            FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO,
        )
    }

    #[test]
    fn loads_elf_and_builds_info() {
        let ram = ram(16 << 20);
        // Garbage where the bss goes, to see it zeroed.
        ram.fill(0x200000, 0x4000, 0xAA).unwrap();
        let k = simple_kernel();
        assert_eq!(crate::detect(&k), KernelFormat::Multiboot);
        let st = load(&ram, &k, "console=ttyS0 quiet", &[]).unwrap();

        assert_eq!(
            st.mode,
            EntryMode::Protected32 {
                gdt: DescriptorTable {
                    base: GDT_ADDR,
                    limit: 31
                },
                cs: BOOT_CS,
                ds: BOOT_DS
            }
        );
        assert_eq!(st.rip, 0x100000);
        assert_eq!(st.rax, 0x2BAD_B002);
        assert_eq!(st.rbx, 0x8000);
        assert_eq!(
            (st.rcx, st.rdx, st.rsi, st.rdi, st.rbp, st.rsp),
            (0, 0, 0, 0, 0, 0)
        );
        assert_eq!(st.rflags, 2);

        // Segments and bss.
        let mut b = [0u8; 4];
        ram.read(0x100000, &mut b).unwrap();
        assert_eq!(b, [0xF4, 0xEB, 0xFE, 0]);
        ram.read(0x200000, &mut b).unwrap();
        assert_eq!(&b, b"data");
        assert_eq!(ram.read_u64(0x200004).unwrap(), 0);
        assert_eq!(ram.read_u8(0x202FFF).unwrap(), 0);
        assert_eq!(
            ram.read_u8(0x203000).unwrap(),
            0xAA,
            "beyond memsz untouched"
        );

        // Information structure.
        let info = |o| ram.read_u32(INFO_ADDR + o).unwrap();
        assert_eq!(info(0), 0x24D); // mem, cmdline, mods, mmap, loader name
        assert_eq!(info(4), 639);
        assert_eq!(info(8), 15 * 1024);
        assert_eq!(info(12), 0, "no boot device");
        assert_eq!(read_cstr(&ram, info(16) as u64), "console=ttyS0 quiet");
        assert_eq!(info(16), 0x20000);
        assert_eq!(info(20), 0);
        assert_eq!(info(24), 0x9000);
        assert_eq!(info(44), 5 * 24);
        assert_eq!(info(48), 0x8100);
        assert_eq!(read_cstr(&ram, info(64) as u64), "popek");

        // mmap entries: size, base, length, type.
        let expect: [(u64, u64, u32); 5] = [
            (0, 0x9FC00, 1),
            (0x9FC00, 0x400, 2),
            (0xE0000, 0x20000, 2),
            (0x100000, 15 << 20, 1),
            (0xE000_0000, 0x1000_0000, 2),
        ];
        for (i, (base, len, kind)) in expect.iter().enumerate() {
            let a = MMAP_ADDR + 24 * i as u64;
            assert_eq!(ram.read_u32(a).unwrap(), 20);
            assert_eq!(ram.read_u64(a + 4).unwrap(), *base);
            assert_eq!(ram.read_u64(a + 12).unwrap(), *len);
            assert_eq!(ram.read_u32(a + 20).unwrap(), *kind);
        }

        // GDT.
        assert_eq!(ram.read_u64(GDT_ADDR).unwrap(), 0);
        assert_eq!(ram.read_u64(GDT_ADDR + 8).unwrap(), 0);
        assert_eq!(
            ram.read_u64(GDT_ADDR + 0x10).unwrap(),
            0x00CF_9B00_0000_FFFF
        );
        assert_eq!(
            ram.read_u64(GDT_ADDR + 0x18).unwrap(),
            0x00CF_9300_0000_FFFF
        );
    }

    #[test]
    fn modules_are_page_aligned_above_the_kernel() {
        let ram = ram(16 << 20);
        let k = simple_kernel();
        let initrd = vec![0x5A; 5000];
        let mods = [
            Module {
                data: &initrd,
                cmdline: "initrd.img",
            },
            Module {
                data: b"xyz",
                cmdline: "second arg=1",
            },
        ];
        load(&ram, &k, "root=/dev/ram0", &mods).unwrap();
        assert_eq!(ram.read_u32(INFO_ADDR + 20).unwrap(), 2);
        let m = |i: u64, o: u64| ram.read_u32(MODS_ADDR + 16 * i + o).unwrap();
        // Kernel ends at 0x203000 (bss included).
        assert_eq!((m(0, 0), m(0, 4)), (0x203000, 0x203000 + 5000));
        assert_eq!((m(1, 0), m(1, 4)), (0x205000, 0x205003));
        assert_eq!(m(0, 12), 0);
        assert_eq!(read_cstr(&ram, 0x20000), "root=/dev/ram0");
        assert_eq!(read_cstr(&ram, m(0, 8) as u64), "initrd.img");
        assert_eq!(read_cstr(&ram, m(1, 8) as u64), "second arg=1");
        assert_eq!(ram.read_u8(0x203000 + 4999).unwrap(), 0x5A);
        let mut b = [0u8; 3];
        ram.read(0x205000, &mut b).unwrap();
        assert_eq!(&b, b"xyz");
    }

    #[test]
    fn higher_half_entry_is_translated_to_physical() {
        let ram = ram(16 << 20);
        let k = elf32(&[(0x100000, 0xC010_0000, &[0x90; 16], 16)], 0xC010_0008, 0);
        let st = load(&ram, &k, "", &[]).unwrap();
        assert_eq!(st.rip, 0x100008);
        assert_eq!(ram.read_u8(0x10000F).unwrap(), 0x90);
    }

    /// A flat image with a Multiboot header using the address fields.
    fn kludge_image(prefix: &[u8], bss_end: u32) -> Vec<u8> {
        let mut f = prefix.to_vec();
        let header_off = f.len() as u32;
        f.extend(mb_header(FLAG_ADDRESS | FLAG_PAGE_ALIGN));
        for w in [0x100000 + header_off, 0x100000, 0, bss_end, 0x100040] {
            f.extend(w.to_le_bytes());
        }
        f.extend([0xF4; 0x40]);
        f
    }

    #[test]
    fn address_fields_load_any_image() {
        let ram = ram(4 << 20);
        ram.fill(0x100000, 0x2000, 0xAA).unwrap();
        // An ELF64 file loads through the address fields too.
        let mut prefix = vec![0u8; 64];
        prefix[..4].copy_from_slice(&ELF_MAGIC);
        prefix[4] = 2;
        let img = kludge_image(&prefix, 0x101000);
        let st = load(&ram, &img, "", &[]).unwrap();
        assert_eq!(st.rip, 0x100040);
        assert_eq!(ram.read_u8(0x100000).unwrap(), 0x7F);
        assert_eq!(ram.read_u32(0x100040).unwrap(), HEADER_MAGIC);
        assert_eq!(ram.read_u8(0x100000 + img.len() as u64).unwrap(), 0, "bss");
        assert_eq!(ram.read_u8(0x100FFF).unwrap(), 0, "bss");
        assert_eq!(ram.read_u8(0x101000).unwrap(), 0xAA);
        assert_eq!(ram.read_u32(INFO_ADDR + 8).unwrap(), 3 * 1024);
    }

    #[test]
    fn no_header() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k[0x80..0x8C].fill(0);
        assert_eq!(load(&ram, &k, "", &[]), Err(BootError::NoMultibootHeader));
        assert_eq!(crate::detect(&k), KernelFormat::Unknown);
    }

    #[test]
    fn header_beyond_8192_bytes_is_not_found() {
        let mut img = vec![0u8; 8192];
        img.extend(mb_header(0));
        assert_eq!(find_header(&img), Err(BootError::NoMultibootHeader));
    }

    #[test]
    fn bad_checksum() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k[0x88] ^= 1;
        assert!(matches!(
            load(&ram, &k, "", &[]),
            Err(BootError::BadMultibootChecksum { offset: 0x80, .. })
        ));
    }

    #[test]
    fn unsupported_required_flags() {
        let ram = ram(4 << 20);
        let k = elf32(&[(0x100000, 0x100000, &[0], 1)], 0x100000, 0x4 | 0x8);
        assert_eq!(
            load(&ram, &k, "", &[]),
            Err(BootError::UnsupportedMultibootFlags {
                flags: 0xC,
                unsupported: 0x8
            })
        );
    }

    #[test]
    fn truncated_elf_header() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        // Keep the header but move it to the start of a cut-short file.
        let h = k[0x80..0x8C].to_vec();
        k.truncate(36);
        k.extend(h);
        assert!(matches!(
            load(&ram, &k, "", &[]),
            Err(BootError::Truncated {
                what: "ELF header",
                ..
            })
        ));
    }

    #[test]
    fn truncated_segment_data() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k.truncate(0x2002); // second segment's 4 data bytes cut short
        assert_eq!(
            load(&ram, &k, "", &[]),
            Err(BootError::Truncated {
                what: "ELF segment data",
                need: 0x2004,
                len: 0x2002
            })
        );
    }

    #[test]
    fn overflowing_program_header_offset() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k[0x1C..0x20].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(matches!(
            load(&ram, &k, "", &[]),
            Err(BootError::Truncated {
                what: "ELF program headers",
                ..
            })
        ));
        let mut k = simple_kernel();
        // p_offset of segment 0 near 4 GiB.
        k[52 + 4..52 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            load(&ram, &k, "", &[]),
            Err(BootError::Truncated { .. })
        ));
    }

    #[test]
    fn elf64_without_address_fields() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k[4] = 2;
        assert_eq!(
            load(&ram, &k, "", &[]),
            Err(BootError::Elf64WithoutAddressFields)
        );
    }

    #[test]
    fn not_elf_and_not_i386() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k[0] = 0;
        assert_eq!(load(&ram, &k, "", &[]), Err(BootError::NotElf));
        let mut k = simple_kernel();
        k[0x12] = 0x3E; // EM_X86_64
        assert!(matches!(load(&ram, &k, "", &[]), Err(BootError::BadElf(_))));
    }

    #[test]
    fn segment_beyond_ram() {
        let ram = ram(4 << 20);
        let k = elf32(&[(0x3FF000, 0x3FF000, &[1], 0x2000)], 0x3FF000, 0);
        assert_eq!(
            load(&ram, &k, "", &[]),
            Err(BootError::SegmentOutsideRam {
                addr: 0x3FF000,
                len: 0x2000,
                ram: 4 << 20
            })
        );
        // Address + size overflowing 32 bits.
        let k = elf32(&[(0xFFFF_F000, 0xFFFF_F000, &[1], 0x2000)], 0, 0);
        assert!(matches!(
            load(&ram, &k, "", &[]),
            Err(BootError::SegmentOutsideRam { .. })
        ));
    }

    #[test]
    fn segment_in_the_legacy_holes_is_refused() {
        let ram = ram(4 << 20);
        for at in [0x9FC00u32, 0xA0000, 0xB8000, 0xF0000] {
            let k = elf32(&[(at, at, &[1], 0x100)], at, 0);
            assert!(
                matches!(
                    load(&ram, &k, "", &[]),
                    Err(BootError::SegmentOverlapsBootArea { what, .. }) if what.contains("0x9FC00")
                ),
                "{at:#x}"
            );
        }
    }

    /// Reads the Multiboot information at `info`: (mods_count, mods_addr,
    /// mmap_addr, loader name address, cmdline address).
    fn info_fields(ram: &GuestRam, info: u64) -> (u32, u32, u32, u32, u32) {
        let r = |o: u64| ram.read_u32(info + o).unwrap();
        (r(20), r(24), r(48), r(64), r(16))
    }

    #[test]
    fn a_kernel_in_low_memory_moves_the_boot_structures_above_it() {
        let ram = ram(4 << 20);
        // Linked at 0x8000, where the information would go, with a module.
        let code = [0xF4u8; 0x800];
        let k = elf32(&[(0x8000, 0x8000, &code, 0x284c)], 0x8000, 0);
        let module = [0x5Au8; 0x3000];
        let m = [Module {
            data: &module,
            cmdline: "initrd",
        }];
        let st = load(&ram, &k, "console=ttyS0", &m).unwrap();
        // The kernel is intact.
        assert_eq!(ram.read_u8(0x8000).unwrap(), 0xF4);
        assert_eq!(ram.read_u8(0x87FF).unwrap(), 0xF4);
        // The module above 1 MiB; the structures above the module.
        let (count, mods, mmap, name, cmd) = info_fields(&ram, st.rbx);
        assert_eq!(count, 1);
        let mod_start = ram.read_u32(mods as u64).unwrap() as u64;
        let mod_end = ram.read_u32(mods as u64 + 4).unwrap() as u64;
        assert_eq!((mod_start, mod_end), (0x100000, 0x103000));
        assert_eq!(ram.read_u8(mod_start).unwrap(), 0x5A);
        for a in [st.rbx, mods as u64, mmap as u64, name as u64, cmd as u64] {
            assert!(a >= mod_end, "{a:#x} above the module");
        }
        assert_eq!(read_cstr(&ram, cmd as u64), "console=ttyS0");
        assert_eq!(read_cstr(&ram, name as u64), "popek");
        let EntryMode::Protected32 { gdt, .. } = st.mode else {
            panic!("protected mode entry");
        };
        assert!(gdt.base >= mod_end);
        assert_eq!(ram.read_u64(gdt.base + 16).unwrap(), gdt::CODE32);
    }

    #[test]
    fn a_kernel_at_the_top_of_ram_keeps_the_low_structures() {
        let ram = ram(4 << 20);
        let k = elf32(&[(0x3FF000, 0x3FF000, &[0xF4], 0x1000)], 0x3FF000, 0);
        let st = load(&ram, &k, "x", &[]).unwrap();
        assert_eq!(st.rbx, INFO_ADDR);
        assert_eq!(ram.read_u8(0x3FF000).unwrap(), 0xF4);
        // And with a module there is no room above: the module does not fit.
        let module = [0u8; 16];
        let m = [Module {
            data: &module,
            cmdline: "",
        }];
        assert!(matches!(
            load(&ram, &k, "", &m),
            Err(BootError::ModuleTooBig { .. })
        ));
    }

    #[test]
    fn no_loadable_segment() {
        let ram = ram(4 << 20);
        let mut k = simple_kernel();
        k[52] = 4; // PT_NOTE
        k[52 + 32] = 4;
        assert_eq!(load(&ram, &k, "", &[]), Err(BootError::NoLoadableSegments));
    }

    #[test]
    fn pure_bss_segment_with_offset_past_the_end() {
        let ram = ram(4 << 20);
        let mut k = elf32(
            &[
                (0x100000, 0x100000, &[0xF4], 1),
                (0x200000, 0x200000, &[], 0x1000),
            ],
            0x100000,
            0,
        );
        k[52 + 32 + 4..52 + 32 + 8].copy_from_slice(&0xFFFF_FFFFu32.to_le_bytes());
        ram.fill(0x200000, 0x1000, 0xAA).unwrap();
        load(&ram, &k, "", &[]).unwrap();
        assert_eq!(ram.read_u8(0x200FFF).unwrap(), 0);
    }

    #[test]
    fn filesz_above_memsz() {
        let ram = ram(4 << 20);
        let k = elf32(&[(0x100000, 0x100000, &[1, 2, 3], 1)], 0x100000, 0);
        assert!(matches!(load(&ram, &k, "", &[]), Err(BootError::BadElf(_))));
    }

    #[test]
    fn bad_address_fields() {
        let ram = ram(4 << 20);
        let mut img = kludge_image(&[], 0);
        // load_addr above header_addr.
        img[16..20].copy_from_slice(&0x200000u32.to_le_bytes());
        assert!(matches!(
            load(&ram, &img, "", &[]),
            Err(BootError::BadAddressFields(_))
        ));
        // bss_end below the loaded data.
        let img = kludge_image(&[], 0x100001);
        assert!(matches!(
            load(&ram, &img, "", &[]),
            Err(BootError::BadAddressFields(_))
        ));
        // load_end beyond the file.
        let mut img = kludge_image(&[], 0);
        img[20..24].copy_from_slice(&0x180000u32.to_le_bytes());
        assert!(matches!(
            load(&ram, &img, "", &[]),
            Err(BootError::Truncated { .. })
        ));
        // Address fields cut off by the end of the file: still detected as
        // Multiboot, so the load reports the truncation.
        let img = &kludge_image(&[], 0)[..20];
        assert_eq!(crate::detect(img), KernelFormat::Multiboot);
        assert!(matches!(
            load(&ram, img, "", &[]),
            Err(BootError::Truncated { .. })
        ));
    }

    #[test]
    fn module_too_big() {
        let ram = ram(4 << 20);
        let big = vec![0u8; 2 << 20];
        let err = load(
            &ram,
            &simple_kernel(),
            "",
            &[Module {
                data: &big,
                cmdline: "",
            }],
        );
        assert_eq!(
            err,
            Err(BootError::ModuleTooBig {
                index: 0,
                len: 2 << 20,
                start: 0x203000,
                ram: 4 << 20
            })
        );
        // Nothing was written.
        assert_eq!(ram.read_u32(INFO_ADDR).unwrap(), 0);
        assert_eq!(ram.read_u8(0x100000).unwrap(), 0);
    }

    #[test]
    fn too_many_modules() {
        let ram = ram(4 << 20);
        let m = Module {
            data: &[],
            cmdline: "",
        };
        let mods = vec![m; MAX_MODULES + 1];
        assert!(matches!(
            load(&ram, &simple_kernel(), "", &mods),
            Err(BootError::TooManyModules { count: 257, .. })
        ));
    }

    #[test]
    fn cmdline_too_long() {
        let ram = ram(4 << 20);
        let long = "x".repeat(0x80000);
        assert!(matches!(
            load(&ram, &simple_kernel(), &long, &[]),
            Err(BootError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn ram_too_small() {
        let ram = ram(1 << 20);
        assert!(matches!(
            load(&ram, &simple_kernel(), "", &[]),
            Err(BootError::RamTooSmall { .. })
        ));
    }

    /// Builds a real Multiboot kernel with the host toolchain (`gcc -m32`,
    /// `ld -m elf_i386`) and loads it. Skipped when the tools are missing.
    #[test]
    fn real_toolchain_kernel() {
        use std::process::Command;
        let dir = std::env::temp_dir().join(format!("popek-boot-mb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = ".section .multiboot, \"a\"\n.align 4\n.long 0x1BADB002\n.long 3\n\
                   .long -(0x1BADB002 + 3)\n.text\n.globl _start\n_start:\n\
                   mov $0x2badb002, %ecx\nhlt\n.bss\n.space 0x2000\n";
        let script = "ENTRY(_start)\nSECTIONS {\n . = 0x100000;\n\
                      .text : { *(.multiboot) *(.text) }\n .bss : { *(.bss) }\n}\n";
        std::fs::write(dir.join("k.S"), src).unwrap();
        std::fs::write(dir.join("k.ld"), script).unwrap();
        let built = Command::new("gcc")
            .args(["-m32", "-c", "k.S", "-o", "k.o"])
            .current_dir(&dir)
            .output()
            .is_ok_and(|o| o.status.success())
            && Command::new("ld")
                .args(["-m", "elf_i386", "-T", "k.ld", "k.o", "-o", "k.elf"])
                .current_dir(&dir)
                .output()
                .is_ok_and(|o| o.status.success());
        if !built {
            eprintln!("skipped: gcc -m32 / ld -m elf_i386 not available");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let k = std::fs::read(dir.join("k.elf")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(crate::detect(&k), KernelFormat::Multiboot);
        let ram = ram(8 << 20);
        let st = load(&ram, &k, "hello", &[]).unwrap();
        // Header (12 bytes) first, then _start: mov ecx, imm32; hlt.
        assert_eq!(st.rip, 0x10000C);
        assert_eq!(ram.read_u32(0x100000).unwrap(), HEADER_MAGIC);
        assert_eq!(ram.read_u8(0x10000C).unwrap(), 0xB9);
        assert_eq!(ram.read_u32(0x10000D).unwrap(), 0x2BAD_B002);
        assert_eq!(ram.read_u8(0x100011).unwrap(), 0xF4);
        assert_eq!(st.rax, 0x2BAD_B002);
        assert_eq!(
            read_cstr(&ram, ram.read_u32(INFO_ADDR + 16).unwrap() as u64),
            "hello"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let ram = ram(4 << 20);
        let base = simple_kernel();
        // Corrupt each header byte in turn; every outcome must be Ok or Err.
        for i in 0..0xA0 {
            for v in [0x00, 0xFF, 0x80] {
                let mut k = base.clone();
                k[i] = v;
                let _ = load(&ram, &k, "", &[]);
            }
        }
        for len in 0..0x100 {
            let _ = load(&ram, &base[..len], "", &[]);
        }
    }
}
