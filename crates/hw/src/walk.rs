//! Linear → guest-physical translation by walking the guest's page tables
//! in guest RAM, as the vCPU would (for reports and VMM services; the vCPU
//! itself runs on the real MMU). Handles no paging, 32-bit paging (with
//! 4 MiB pages), PAE and 4-level long-mode paging. Read-only: accessed and
//! dirty bits are left alone.

use popek_cpu::state::cr;
use popek_cpu::CpuState;
use popek_memory::GuestRam;

const EFER_LMA: u64 = 1 << 10;
const P: u64 = 1;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

fn read_u64(ram: &GuestRam, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    ram.read(addr, &mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

fn read_u32(ram: &GuestRam, addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    ram.read(addr, &mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

/// The guest-physical address of `linear`, or `None` where it is unmapped.
pub fn translate(ram: &GuestRam, s: &CpuState, linear: u64) -> Option<u64> {
    if s.cr0 & cr::CR0_PG == 0 || s.cr0 & cr::CR0_PE == 0 {
        return Some(linear & 0xffff_ffff);
    }
    if s.efer & EFER_LMA != 0 {
        let mut table = s.cr3 & ADDR;
        for level in (0..4).rev() {
            let shift = 12 + 9 * level;
            let e = read_u64(ram, table + ((linear >> shift) & 0x1ff) * 8)?;
            if e & P == 0 {
                return None;
            }
            if level == 0 || (level <= 2 && e & PS != 0) {
                let mask = (1u64 << shift) - 1;
                return Some((e & ADDR & !mask) | (linear & mask));
            }
            table = e & ADDR;
        }
        None
    } else if s.cr4 & cr::CR4_PAE != 0 {
        let linear = linear & 0xffff_ffff;
        let pdpte = read_u64(ram, (s.cr3 & 0xffff_ffe0) + (linear >> 30) * 8)?;
        if pdpte & P == 0 {
            return None;
        }
        let pde = read_u64(ram, (pdpte & ADDR) + ((linear >> 21) & 0x1ff) * 8)?;
        if pde & P == 0 {
            return None;
        }
        if pde & PS != 0 {
            return Some((pde & ADDR & !0x1f_ffff) | (linear & 0x1f_ffff));
        }
        let pte = read_u64(ram, (pde & ADDR) + ((linear >> 12) & 0x1ff) * 8)?;
        (pte & P != 0).then_some((pte & ADDR) | (linear & 0xfff))
    } else {
        let linear = linear & 0xffff_ffff;
        let pde = u64::from(read_u32(ram, (s.cr3 & 0xffff_f000) + (linear >> 22) * 4)?);
        if pde & P == 0 {
            return None;
        }
        if pde & PS != 0 && s.cr4 & cr::CR4_PSE != 0 {
            return Some((pde & 0xffc0_0000) | (linear & 0x3f_ffff));
        }
        let pte = u64::from(read_u32(
            ram,
            (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4,
        )?);
        (pte & P != 0).then_some((pte & 0xffff_f000) | (linear & 0xfff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaged_is_identity() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let s = CpuState::flat_protected(8, 16);
        assert_eq!(translate(&ram, &s, 0x1234), Some(0x1234));
    }

    #[test]
    fn walks_32bit_and_long_mode_tables() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // 32-bit: PD at 0x10000, PT at 0x11000 maps 0x0040_0000 → 0x20000.
        ram.write(0x10000 + 4, &(0x11000u32 | 3).to_le_bytes())
            .unwrap();
        ram.write(0x11000, &(0x20000u32 | 3).to_le_bytes()).unwrap();
        let mut s = CpuState::flat_protected(8, 16);
        s.cr0 |= cr::CR0_PG;
        s.cr3 = 0x10000;
        assert_eq!(translate(&ram, &s, 0x0040_0123), Some(0x20123));
        assert_eq!(translate(&ram, &s, 0x0080_0000), None);
        // Long mode: PML4 0x30000 → PDPT 0x31000 → PD 0x32000 with a 2 MiB page at 0.
        ram.write(0x30000, &(0x31000u64 | 3).to_le_bytes()).unwrap();
        ram.write(0x31000, &(0x32000u64 | 3).to_le_bytes()).unwrap();
        ram.write(0x32008, &(0x20_0000u64 | 0x83).to_le_bytes())
            .unwrap();
        s.cr3 = 0x30000;
        s.cr4 |= cr::CR4_PAE;
        s.efer = 0x500;
        assert_eq!(translate(&ram, &s, 0x20_1234), Some(0x20_1234));
        assert_eq!(translate(&ram, &s, 0x1234), None);
    }
}
