//! The guest-physical memory map of the machine.
//!
//! ```text
//! 0x0000_0000  RAM: IVT, BIOS data area (0x400: COM1 port, EBDA segment, base memory KiB)
//! 0x0009_fc00  reserved: EBDA (1 KiB, left empty)
//! 0x000a_0000  hole: not in the e820 map (backed by RAM nobody should use)
//! 0x000e_0000  reserved: BIOS area; the ACPI tables start at 0xE0000
//! 0x0010_0000  RAM up to the RAM size (at most 3 GiB)
//! 0xc000_0000  MMIO window up to 4 GiB (unassigned addresses read all ones):
//! 0xe000_0000    PCI ECAM (MMCONFIG), 256 MiB: buses 0–255 (reserved in e820)
//! 0xfec0_0000    I/O APIC
//! 0xfee0_0000    local APIC (each vCPU's own)
//!                with --firmware: the ROM at the top, below 4 GiB
//! ```
//!
//! Guest RAM is one contiguous block from 0; the "hole" exists in the e820
//! map only (the bytes are RAM the guest must not use), as on a PC. The e820
//! map itself is built by the boot loaders (`popek_boot::e820`), from the
//! same layout; `popek-vmm` tests that the two agree.

/// End of conventional memory usable by the guest (639 KiB).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// The EBDA, reserved (empty).
pub const EBDA_START: u64 = 0x9_fc00;
/// The legacy VGA / option ROM hole.
pub const HOLE_START: u64 = 0xa_0000;
/// The BIOS area, where the ACPI tables and RSDP live.
pub const BIOS_AREA_START: u64 = 0xe_0000;
/// First byte of high memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the MMIO window (devices such as virtio-mmio go here).
pub const MMIO_START: u64 = 0xc000_0000;
/// End (exclusive) of the MMIO window.
pub const MMIO_END: u64 = 0x1_0000_0000;
/// The PCI Express enhanced configuration space (ECAM): 4 KiB per
/// function, buses 0–255.
pub const ECAM_START: u64 = 0xe000_0000;
/// The size of the ECAM window.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// Most guest RAM the map allows (RAM must end below [`MMIO_START`]).
pub const MAX_RAM: u64 = MMIO_START;
