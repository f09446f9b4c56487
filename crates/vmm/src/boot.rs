//! Turning a boot loader's engine-neutral entry description into the
//! vCPU's architectural state.

use popek_boot::{EntryMode, EntryState};
use popek_cpu::state::{seg, Segment, TableReg};
use popek_cpu::CpuState;

/// The CPU state a boot path asks for.
pub fn entry_cpu_state(e: &EntryState) -> CpuState {
    let mut s = match e.mode {
        EntryMode::Real { cs } => {
            let mut s = CpuState::reset();
            s.seg = [Segment::real(cs); 6];
            s.seg[seg::CS].attr |= popek_cpu::state::attr::CODE;
            s.cr0 &= !(popek_cpu::state::cr::CR0_CD | popek_cpu::state::cr::CR0_NW);
            s
        }
        EntryMode::Protected32 { gdt, cs, ds } => {
            let mut s = CpuState::flat_protected(cs, ds);
            s.gdtr = TableReg {
                base: gdt.base,
                limit: gdt.limit,
            };
            s
        }
        EntryMode::Long64 { gdt, cs, ds, cr3 } => {
            let mut s = CpuState::flat_protected(cs, ds);
            s.gdtr = TableReg {
                base: gdt.base,
                limit: gdt.limit,
            };
            s.seg[seg::CS].attr =
                (s.seg[seg::CS].attr & !popek_cpu::state::attr::DB) | popek_cpu::state::attr::L;
            s.cr3 = cr3;
            s.cr4 |= popek_cpu::state::cr::CR4_PAE;
            s.cr0 |= popek_cpu::state::cr::CR0_PG;
            s.efer = (1 << 8) | (1 << 10);
            s
        }
    };
    s.rip = e.rip;
    s.rflags = e.rflags | 2;
    s.gpr[0] = e.rax;
    s.gpr[1] = e.rcx;
    s.gpr[2] = e.rdx;
    s.gpr[3] = e.rbx;
    s.gpr[4] = e.rsp;
    s.gpr[5] = e.rbp;
    s.gpr[6] = e.rsi;
    s.gpr[7] = e.rdi;
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use popek_boot::DescriptorTable;

    #[test]
    fn protected_entry_has_flat_segments_and_registers() {
        let mut e = EntryState::new(
            EntryMode::Protected32 {
                gdt: DescriptorTable {
                    base: 0x500,
                    limit: 31,
                },
                cs: 0x10,
                ds: 0x18,
            },
            0x100000,
        );
        e.rax = 0x2bad_b002;
        e.rbx = 0x8000;
        let s = entry_cpu_state(&e);
        assert_eq!(s.rip, 0x100000);
        assert_eq!(s.gpr[0], 0x2bad_b002);
        assert_eq!(s.gpr[3], 0x8000);
        assert_eq!(s.seg[seg::CS].selector, 0x10);
        assert_eq!(s.seg[seg::DS].limit, 0xffff_ffff);
        assert_eq!(s.gdtr.base, 0x500);
        assert_eq!(s.cpl(), 0);
    }

    #[test]
    fn loader_e820_map_agrees_with_the_machine_layout() {
        use popek_machine::memmap;
        let map = popek_boot::e820::e820_map(256 << 20);
        let ram: Vec<_> = map
            .iter()
            .filter(|e| e.kind == popek_boot::e820::E820Type::Ram)
            .map(|e| (e.addr, e.addr + e.size))
            .collect();
        assert_eq!(
            ram,
            vec![
                (0, memmap::LOW_RAM_END),
                (memmap::HIGH_RAM_START, 256 << 20)
            ]
        );
        // The ACPI tables' BIOS area is reserved, never usable RAM.
        assert!(map.iter().any(|e| e.addr <= memmap::BIOS_AREA_START
            && e.addr + e.size >= memmap::HIGH_RAM_START
            && e.kind != popek_boot::e820::E820Type::Ram));
        // So is the ECAM window the MCFG names.
        assert!(map.iter().any(|e| e.addr == memmap::ECAM_START
            && e.size == memmap::ECAM_SIZE
            && e.kind == popek_boot::e820::E820Type::Reserved));
    }

    #[test]
    fn real_entry_uses_segment_arithmetic() {
        let e = EntryState::new(EntryMode::Real { cs: 0x1000 }, 0x10);
        let s = entry_cpu_state(&e);
        assert_eq!(s.seg[seg::CS].base, 0x10000);
        assert_eq!(s.seg[seg::DS].selector, 0x1000);
        assert_eq!(s.cr0 & 1, 0);
    }
}

/// The architectural state after RESET for the bootstrap processor of
/// profile `vendor` (SDM 9.1.1): real mode at F000:FFF0 with CS's base at
/// 0xFFFF0000 (the first fetch is 16 bytes below 4 GiB), CR0 = 0x60000010,
/// and EDX holding the processor signature, as firmware expects.
pub fn reset_state(vendor: popek_cpu::Vendor) -> CpuState {
    let mut s = CpuState::reset();
    s.vendor = vendor;
    let id = vendor.identity();
    s.gpr[2] = (u64::from(id.family) << 8) | (u64::from(id.model) << 4) | u64::from(id.stepping);
    s
}

/// The fw_cfg files popek gives firmware beyond the machine's own: the
/// serial console for SeaBIOS's text output (COM1, popek's console), the
/// boot menu, IRQ 0's override, and the machine's ACPI tables with the
/// commands that install them (`popek_machine::acpi::loader_files`).
pub fn firmware_files(machine: &mut popek_machine::Machine) {
    let com1 = 0x3f8u16.to_le_bytes().to_vec();
    let f = machine.fw_cfg_mut();
    for name in ["etc/sercon-port", "opt/org.seabios/etc/sercon-port"] {
        f.add_file(name, com1.clone()).expect("a valid name");
    }
    f.set_item(
        popek_machine::fw_cfg::key::BOOT_MENU,
        1u16.to_le_bytes().to_vec(),
    );
    // IRQ 0 is on I/O APIC pin 2 (firmware's MP table says so).
    f.set_item(0x8002, 1u32.to_le_bytes().to_vec());
    // The machine's own ACPI tables, for the firmware to install.
    let cpus = machine.cpus() as u32;
    let (rsdp, tables, loader) = popek_machine::acpi::loader_files(cpus);
    let f = machine.fw_cfg_mut();
    for (name, data) in [
        ("etc/acpi/rsdp", rsdp),
        ("etc/acpi/tables", tables),
        ("etc/table-loader", loader),
    ] {
        f.add_file(name, data).expect("a valid name");
    }
}

/// Where QEMU's Linux option ROM (from Debian's `qemu-system-data`) is: it
/// loads a kernel given through fw_cfg when firmware boots.
pub const LINUXBOOT_ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";

/// Hands a Linux bzImage, its initrd and command line to firmware through
/// fw_cfg, as QEMU's `-kernel` does with SeaBIOS: the real-mode setup (its
/// header filled in as a boot loader would — loader type, command line
/// pointer, heap end, initrd address and size) for 0x10000, the
/// protected-mode kernel for 1 MiB, the command line for 0x20000, the
/// initrd at the top of RAM below what firmware keeps for its tables;
/// plus the option ROM that performs the boot (`genroms/linuxboot_dma.bin`).
pub fn firmware_linux(
    machine: &mut popek_machine::Machine,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    rom: Vec<u8>,
) -> Result<(), String> {
    use popek_machine::fw_cfg::key;
    const REAL_ADDR: u32 = 0x1_0000;
    const CMDLINE_ADDR: u32 = 0x2_0000;
    const PROT_ADDR: u32 = 0x10_0000;
    // Firmware's own tables live at the top of RAM: keep 1 MiB free there.
    const FIRMWARE_TOP: u64 = 1 << 20;
    if !popek_boot::linux::is_bzimage(image) {
        return Err("with --firmware, --kernel takes a Linux bzImage".into());
    }
    let h = popek_boot::linux::parse_header(image).map_err(|e| e.to_string())?;
    let setup_size = h.kernel_offset() as usize;
    if setup_size >= image.len() || cmdline.len() + 1 > 0xf000 {
        return Err("the kernel image or command line is too large for the setup area".into());
    }
    let mut setup = image[..setup_size].to_vec();
    let put32 =
        |s: &mut Vec<u8>, at: usize, v: u32| s[at..at + 4].copy_from_slice(&v.to_le_bytes());
    setup[0x210] = 0xb0; // type_of_loader: "undefined, version 0" as QEMU says
    setup[0x211] |= 0x80; // CAN_USE_HEAP
    setup[0x224..0x226].copy_from_slice(&((CMDLINE_ADDR - REAL_ADDR - 0x200) as u16).to_le_bytes());
    put32(&mut setup, 0x228, CMDLINE_ADDR);
    let ram = machine.ram().size();
    let f = machine.fw_cfg_mut();
    if let Some(initrd) = initrd {
        let max = u64::from(h.initrd_addr_max).min(ram.saturating_sub(FIRMWARE_TOP));
        let addr = max
            .checked_sub(initrd.len() as u64)
            .filter(|&a| a >= u64::from(PROT_ADDR) + (image.len() - setup_size) as u64)
            .ok_or("the initrd does not fit in RAM below the firmware's tables")?
            & !0xfff;
        put32(&mut setup, 0x218, addr as u32);
        put32(&mut setup, 0x21c, initrd.len() as u32);
        f.set_item(key::INITRD_ADDR, (addr as u32).to_le_bytes().to_vec());
        f.set_item(
            key::INITRD_SIZE,
            (initrd.len() as u32).to_le_bytes().to_vec(),
        );
        f.set_item(key::INITRD_DATA, initrd.to_vec());
    }
    let kernel = image[setup_size..].to_vec();
    f.set_item(key::KERNEL_ADDR, PROT_ADDR.to_le_bytes().to_vec());
    f.set_item(
        key::KERNEL_SIZE,
        (kernel.len() as u32).to_le_bytes().to_vec(),
    );
    f.set_item(key::KERNEL_DATA, kernel);
    f.set_item(key::SETUP_ADDR, REAL_ADDR.to_le_bytes().to_vec());
    f.set_item(key::SETUP_SIZE, (setup.len() as u32).to_le_bytes().to_vec());
    f.set_item(key::SETUP_DATA, setup);
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    f.set_item(key::CMDLINE_ADDR, CMDLINE_ADDR.to_le_bytes().to_vec());
    f.set_item(key::CMDLINE_SIZE, (cmd.len() as u32).to_le_bytes().to_vec());
    f.set_item(key::CMDLINE_DATA, cmd);
    f.add_file("genroms/linuxboot_dma.bin", rom)?;
    Ok(())
}
