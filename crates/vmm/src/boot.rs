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
/// serial console for SeaBIOS's text output (COM1, popek's console).
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
}
