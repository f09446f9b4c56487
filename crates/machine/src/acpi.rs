//! Minimal ACPI: the tables a BIOS would leave in the 0xE0000–0xFFFFF
//! area, and the PM1 register block that powers the machine off.
//!
//! Tables (built with rust-vmm's `acpi_tables`, checksums included), at
//! fixed guest-physical addresses:
//!
//! | table | address | notes |
//! |---|---|---|
//! | RSDP | 0xE0000 | revision 2: RSDT and XSDT addresses, both checksums |
//! | RSDT | 0xE0040 | → FADT |
//! | XSDT | 0xE0080 | → FADT |
//! | FACS | 0xE00C0 | 64-byte aligned, as required |
//! | FADT | 0xE0100 | revision 6.5; SCI on IRQ 9; PM1a event block 0x600 (4 bytes), PM1a control block 0x604 (2 bytes), PM timer 0x608 (24-bit); no SMI command port (always in ACPI mode); reset register: I/O port 0x64, value 0xFE; century at CMOS 0x32; boot flags: legacy devices, no 8042 |
//! | MADT | 0xE0240 | local APIC address 0xFEE00000, PC/AT-compatible 8259s present; one processor local APIC per vCPU (ACPI UID = APIC ID = vCPU index); the I/O APIC (ID 0) at 0xFEC00000 with GSIs 0–23; interrupt source overrides IRQ 0 → GSI 2 (the PIT on pin 2) and IRQ 9 → GSI 9 level, active high (the SCI); LINT1 of every processor is the NMI |
//! | MCFG | 0xE03A0 | the PCI ECAM window: 0xE0000000, segment 0, buses 0–255 |
//! | DSDT | 0xE0400 | `Name(\_S5_, Package(){5, 5, 0, 0})`; `\_SB.PCI0`, the PCI root bridge of bus 0 (PNP0A03) with its `_CRS` |
//!
//! RSDT and XSDT list the FADT, the MADT and the MCFG.
//!
//! The PM1 block at 0x600–0x60B (QEMU's PIIX4 layout): PM1 status
//! (write 1 to clear) and enable at 0x600/0x602, PM1 control at 0x604
//! (SCI_EN always reads 1), and the 3.579545 MHz PM timer at 0x608.
//! Writing PM1 control with SLP_EN (bit 13) and SLP_TYP (bits 10–12) equal
//! to [`SLP_TYP_S5`] (5, the DSDT's `_S5_`) powers the machine off; SLP_TYP
//! 0, QEMU's S5 value (the well-known `outw(0x604, 0x2000)`), does too.
//! Other sleep types are ignored (there is no S1–S4). No event ever raises
//! the SCI.

use acpi_tables::aml::{
    AddressSpace as AmlSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, Path,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::StopReason;

/// Guest-physical address of the RSDP.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// Guest-physical address of the RSDT.
pub const RSDT_ADDR: u64 = 0xe_0040;
/// Guest-physical address of the XSDT.
pub const XSDT_ADDR: u64 = 0xe_0080;
/// Guest-physical address of the FACS.
pub const FACS_ADDR: u64 = 0xe_00c0;
/// Guest-physical address of the FADT.
pub const FADT_ADDR: u64 = 0xe_0100;
/// Guest-physical address of the MADT.
pub const MADT_ADDR: u64 = 0xe_0240;
/// Guest-physical address of the MCFG.
pub const MCFG_ADDR: u64 = 0xe_03a0;
/// Guest-physical address of the DSDT.
pub const DSDT_ADDR: u64 = 0xe_0400;
/// End of the area the tables may use.
pub const ACPI_END: u64 = 0xe_1000;

/// First port of the PM register block.
pub const PM_BASE: u16 = 0x600;
/// Number of ports of the PM register block.
pub const PM_LEN: u16 = 12;
/// PM1a event block (status, enable).
pub const PM1A_EVT_BLK: u16 = 0x600;
/// PM1a control block.
pub const PM1A_CNT_BLK: u16 = 0x604;
/// PM timer.
pub const PM_TMR_BLK: u16 = 0x608;
/// The SCI interrupt line.
pub const SCI_IRQ: u8 = 9;
/// SLP_TYP value of S5 (soft off) in this machine's DSDT.
pub const SLP_TYP_S5: u16 = 5;
/// Frequency of the PM timer.
pub const PM_TIMER_HZ: u64 = 3_579_545;

const OEM_ID: [u8; 6] = *b"POPEK ";
const OEM_TABLE_ID: [u8; 8] = *b"POPEKVM ";
const SLP_EN: u16 = 1 << 13;
const SCI_EN: u16 = 1;

fn bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// `\_SB.PCI0`: the PCI root bridge (PNP0A03) of bus 0 behind
/// configuration mechanism #1, with the resources it decodes — the ports
/// but 0xCF8–0xCFF, the legacy VGA window and the MMIO window below 4 GiB.
/// Under ACPI, Linux scans a PCI bus only where the DSDT names its root.
fn pci_root() -> Vec<u8> {
    use crate::memmap::{ECAM_SIZE, ECAM_START, HOLE_START, MMIO_START};
    // Below the I/O APIC and local APIC pages a modern PC keeps at the top.
    const MMIO_TOP: u32 = 0xfebf_ffff;
    let hid = EISAName::new("PNP0A03");
    let buses = AmlSpace::<u16>::new_bus_number(0, 0xff);
    let config = IO::new(0xcf8, 0xcf8, 1, 8);
    let ports_low = AmlSpace::<u16>::new_io(0, 0xcf7, None);
    let ports_high = AmlSpace::<u16>::new_io(0xd00, 0xffff, None);
    let vga = AmlSpace::<u32>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        HOLE_START as u32,
        0xb_ffff,
        None,
    );
    // The MMIO window around the ECAM window, which is not the bridge's
    // to give to devices.
    let mmio = AmlSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO_START as u32,
        (ECAM_START - 1) as u32,
        None,
    );
    let mmio_high = AmlSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        (ECAM_START + ECAM_SIZE) as u32,
        MMIO_TOP,
        None,
    );
    let crs = ResourceTemplate::new(vec![
        &buses,
        &config,
        &ports_low,
        &ports_high,
        &vga,
        &mmio,
        &mmio_high,
    ]);
    let names = [
        Name::new(Path::new("_HID"), &hid),
        Name::new(Path::new("_ADR"), &0u8),
        Name::new(Path::new("_BBN"), &0u8),
        Name::new(Path::new("_UID"), &0u8),
        Name::new(Path::new("_CRS"), &crs),
    ];
    let pci0 = Device::new(
        Path::new("PCI0"),
        names.iter().map(|n| n as &dyn Aml).collect(),
    );
    bytes(&Scope::new(Path::new("\\_SB_"), vec![&pci0]))
}

/// The MADT ("APIC"): the interrupt controllers of a machine with `cpus`
/// vCPUs.
fn madt(cpus: u32) -> Vec<u8> {
    use crate::{ioapic, lapic};
    let mut madt = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE_ID, 1);
    madt.append_slice(&(lapic::DEFAULT_BASE as u32).to_le_bytes());
    // PCAT_COMPAT: the 8259s are there (and must be masked to use the APIC).
    madt.append_slice(&1u32.to_le_bytes());
    for i in 0..cpus {
        // Processor local APIC: UID, APIC ID, enabled.
        madt.append_slice(&[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
    }
    let mut io = vec![1, 12, 0, 0];
    io.extend_from_slice(&(ioapic::BASE as u32).to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    madt.append_slice(&io);
    // Interrupt source overrides: bus 0 (ISA), source, GSI, flags.
    for (irq, gsi, flags) in [(0u8, 2u32, 0u16), (SCI_IRQ, u32::from(SCI_IRQ), 0x000d)] {
        let mut iso = vec![2, 10, 0, irq];
        iso.extend_from_slice(&gsi.to_le_bytes());
        iso.extend_from_slice(&flags.to_le_bytes());
        madt.append_slice(&iso);
    }
    // Local APIC NMI: all processors (UID 0xFF), LINT1.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// The ACPI tables of a machine with `cpus` vCPUs: `(guest-physical
/// address, bytes)` for each.
pub fn tables(cpus: u32) -> Vec<(u64, Vec<u8>)> {
    let s5 = Package::new(vec![&5u8, &5u8, &0u8, &0u8]);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, 1);
    dsdt.append_slice(&bytes(&Name::new(Path::new("\\_S5_"), &s5)));
    dsdt.append_slice(&pci_root());

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .dsdt_32(DSDT_ADDR as u32)
        .firmware_ctrl_32(FACS_ADDR as u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.sci_int = u16::from(SCI_IRQ).into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_BLK).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_BLK).into();
    fadt.pm_tmr_blk = u32::from(PM_TMR_BLK).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.pm_tmr_len = 4;
    fadt.century = 0x32;
    // IA-PC boot architecture: legacy devices; no 8042 (nothing to probe).
    fadt.iapc_boot_arch = 0x0001.into();
    fadt.reset_reg = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, 0x64);
    fadt.reset_value = 0xfe;
    let fadt = bytes(&fadt.finalize());

    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE_ID, 1);
    rsdt.append_slice(&(FADT_ADDR as u32).to_le_bytes());
    rsdt.append_slice(&(MADT_ADDR as u32).to_le_bytes());
    rsdt.append_slice(&(MCFG_ADDR as u32).to_le_bytes());

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(FADT_ADDR);
    xsdt.add_entry(MADT_ADDR);
    xsdt.add_entry(MCFG_ADDR);

    // The crate's RSDP leaves the RSDT address zero; fill it in and
    // recompute both checksums.
    let mut rsdp = bytes(&Rsdp::new(OEM_ID, XSDT_ADDR));
    rsdp[16..20].copy_from_slice(&(RSDT_ADDR as u32).to_le_bytes());
    rsdp[8] = 0;
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = 0;
    rsdp[32] = checksum(&rsdp);

    vec![
        (RSDP_ADDR, rsdp),
        (RSDT_ADDR, rsdt.as_slice().to_vec()),
        (XSDT_ADDR, bytes(&xsdt)),
        (FACS_ADDR, bytes(&FACS::new())),
        (FADT_ADDR, fadt),
        (MADT_ADDR, madt(cpus)),
        (MCFG_ADDR, {
            let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
            m.add_ecam(crate::memmap::ECAM_START, 0, 0, 255);
            bytes(&m)
        }),
        (DSDT_ADDR, dsdt.as_slice().to_vec()),
    ]
}

/// The tables for firmware, as QEMU hands them to SeaBIOS through fw_cfg:
/// `etc/acpi/rsdp` (the RSDP, for the F segment), `etc/acpi/tables` (RSDT
/// to DSDT, for high memory) and `etc/table-loader`, the commands that
/// allocate both, patch each pointer with where its target landed, and
/// recompute each checksum. Pointers in the blobs are offsets into
/// `etc/acpi/tables`. Returns `(rsdp, tables, loader)`.
pub fn loader_files(cpus: u32) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    const RSDP_FILE: &str = "etc/acpi/rsdp";
    const TABLES_FILE: &str = "etc/acpi/tables";
    let t = tables(cpus);
    let base = RSDT_ADDR;
    let end = t
        .iter()
        .map(|(a, b)| a + b.len() as u64)
        .max()
        .unwrap_or(base);
    let mut blob = vec![0u8; (end - base) as usize];
    let mut rsdp = Vec::new();
    for (addr, bytes) in &t {
        if *addr == RSDP_ADDR {
            rsdp = bytes.clone();
        } else {
            let o = (addr - base) as usize;
            blob[o..o + bytes.len()].copy_from_slice(bytes);
        }
    }
    // Every pointer field: (in the RSDP?, offset, size).
    let mut pointers = vec![(true, 16usize, 4usize), (true, 24, 8)];
    let entries = |addr: u64, size: usize, blob: &[u8]| {
        let o = (addr - base) as usize;
        let len = u32::from_le_bytes(blob[o + 4..o + 8].try_into().unwrap()) as usize;
        (36..len).step_by(size).map(move |f| (false, o + f, size))
    };
    pointers.extend(entries(RSDT_ADDR, 4, &blob));
    pointers.extend(entries(XSDT_ADDR, 8, &blob));
    let fadt = (FADT_ADDR - base) as usize;
    pointers.extend([(false, fadt + 36, 4), (false, fadt + 40, 4)]);
    let mut cmds = Vec::new();
    let name = |n: &str| {
        let mut b = [0u8; 56];
        b[..n.len()].copy_from_slice(n.as_bytes());
        b
    };
    let cmd = |kind: u32, body: &[u8]| {
        let mut c = kind.to_le_bytes().to_vec();
        c.extend_from_slice(body);
        c.resize(128, 0);
        c
    };
    // ALLOCATE: file, alignment, zone (1: high memory, 2: F segment).
    for (file, align, zone) in [(RSDP_FILE, 16u32, 2u8), (TABLES_FILE, 64, 1)] {
        let mut b = name(file).to_vec();
        b.extend_from_slice(&align.to_le_bytes());
        b.push(zone);
        cmds.push(cmd(1, &b));
    }
    for (in_rsdp, at, size) in pointers {
        let target = if in_rsdp { &mut rsdp } else { &mut blob };
        let v = match size {
            4 => u64::from(u32::from_le_bytes(target[at..at + 4].try_into().unwrap())),
            _ => u64::from_le_bytes(target[at..at + 8].try_into().unwrap()),
        };
        if v == 0 {
            continue;
        }
        let rel = v - base;
        target[at..at + size].copy_from_slice(&rel.to_le_bytes()[..size]);
        // ADD_POINTER: destination file, source file, offset, size.
        let mut b = name(if in_rsdp { RSDP_FILE } else { TABLES_FILE }).to_vec();
        b.extend_from_slice(&name(TABLES_FILE));
        b.extend_from_slice(&(at as u32).to_le_bytes());
        b.push(size as u8);
        cmds.push(cmd(2, &b));
    }
    // ADD_CHECKSUM: file, checksum offset, start, length.
    let mut sum = |file: &str, offset: usize, start: usize, len: usize| {
        let mut b = name(file).to_vec();
        for v in [offset, start, len] {
            b.extend_from_slice(&(v as u32).to_le_bytes());
        }
        cmds.push(cmd(3, &b));
    };
    sum(RSDP_FILE, 8, 0, 20);
    sum(RSDP_FILE, 32, 0, rsdp.len());
    for (addr, bytes) in &t {
        if *addr != RSDP_ADDR && &bytes[..4] != b"FACS" {
            sum(
                TABLES_FILE,
                (addr - base) as usize + 9,
                (addr - base) as usize,
                bytes.len(),
            );
        }
    }
    (rsdp, blob, cmds.concat())
}

/// The PM1 event/control registers and the PM timer. Its saved state is
/// itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmBlock {
    status: u16,
    enable: u16,
    control: u16,
}

impl PmBlock {
    /// Registers as after reset (SCI_EN reads as set: ACPI mode).
    pub fn new() -> Self {
        Self::default()
    }

    fn image(&self, now_ns: u64) -> [u8; 12] {
        let timer =
            (u128::from(now_ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u32 & 0xff_ffff;
        let mut r = [0u8; 12];
        r[0..2].copy_from_slice(&self.status.to_le_bytes());
        r[2..4].copy_from_slice(&self.enable.to_le_bytes());
        r[4..6].copy_from_slice(&(self.control | SCI_EN).to_le_bytes());
        r[8..12].copy_from_slice(&timer.to_le_bytes());
        r
    }

    /// Reads `data.len()` bytes at `offset` from 0x600, the PM timer
    /// reading machine time `now_ns`.
    pub fn read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        let img = self.image(now_ns);
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| img.get(o + i))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Writes `data` at `offset` from 0x600. Returns
    /// [`StopReason::PowerOff`] for an S5 sleep request.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<StopReason> {
        let mut control_written = false;
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i as u64;
            let shift = 8 * (o & 1);
            let byte = u16::from(b) << shift;
            let keep = !(0xffu16 << shift);
            match o {
                0 | 1 => self.status &= !byte,
                2 | 3 => self.enable = self.enable & keep | byte,
                4 | 5 => {
                    self.control = self.control & keep | byte;
                    control_written = true;
                }
                _ => {}
            }
        }
        if control_written && self.control & SLP_EN != 0 {
            self.control &= !SLP_EN;
            let typ = (self.control >> 10) & 7;
            if typ == SLP_TYP_S5 || typ == 0 {
                return Some(StopReason::PowerOff);
            }
            tracing::debug!("acpi: sleep type {typ} requested; only S5 is supported");
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_lengths_are_valid() {
        let t = tables(1);
        let (_, rsdp) = &t[0];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (addr, table) in &t[1..] {
            let len = u32::from_le_bytes([table[4], table[5], table[6], table[7]]) as usize;
            assert_eq!(len, table.len(), "{addr:#x}");
            if &table[..4] != b"FACS" {
                assert_eq!(sum(table), 0, "{:?}", std::str::from_utf8(&table[..4]));
            }
        }
        // Tables do not overlap and stay in their area.
        for w in t.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
        }
        let (last, b) = t.last().unwrap();
        assert!(last + b.len() as u64 <= ACPI_END);
        // With the most vCPUs the MADT still ends before the MCFG.
        let t = tables(crate::MAX_CPUS);
        for w in t.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0, "{:#x}", w[0].0);
        }
        assert_eq!(FACS_ADDR % 64, 0);
    }

    #[test]
    fn madt_describes_the_apics() {
        for cpus in [1u32, 4] {
            let t = tables(cpus);
            let (_, m) = t.iter().find(|(a, _)| *a == MADT_ADDR).unwrap();
            assert_eq!(&m[..4], b"APIC");
            assert_eq!(
                u32::from_le_bytes(m[36..40].try_into().unwrap()),
                0xfee0_0000
            );
            assert_eq!(u32::from_le_bytes(m[40..44].try_into().unwrap()), 1);
            // Walk the structures.
            let mut seen = Vec::new();
            let mut i = 44;
            while i < m.len() {
                seen.push((m[i], m[i + 2], m[i + 3]));
                i += usize::from(m[i + 1]);
            }
            assert_eq!(i, m.len());
            let cpus_seen: Vec<_> = seen.iter().filter(|s| s.0 == 0).collect();
            assert_eq!(cpus_seen.len(), cpus as usize);
            assert!(seen.contains(&(1, 0, 0)), "I/O APIC");
            assert!(seen.contains(&(2, 0, 0)), "IRQ 0 override");
            assert!(seen.contains(&(2, 0, 9)), "SCI override");
            assert!(seen.contains(&(4, 0xff, 0)), "LINT1 NMI");
        }
        // RSDT and XSDT list it.
        let t = tables(1);
        let rsdt = &t.iter().find(|(a, _)| *a == RSDT_ADDR).unwrap().1;
        assert!(rsdt[36..]
            .chunks(4)
            .any(|c| c == (MADT_ADDR as u32).to_le_bytes()));
        let xsdt = &t.iter().find(|(a, _)| *a == XSDT_ADDR).unwrap().1;
        assert!(xsdt[36..].chunks(8).any(|c| c == MADT_ADDR.to_le_bytes()));
    }

    #[test]
    fn fadt_points_at_pm_block_and_dsdt() {
        let t = tables(1);
        let fadt = &t.iter().find(|(a, _)| *a == FADT_ADDR).unwrap().1;
        let u16_at = |o: usize| u16::from_le_bytes([fadt[o], fadt[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([fadt[o], fadt[o + 1], fadt[o + 2], fadt[o + 3]]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(u32_at(36), FACS_ADDR as u32);
        assert_eq!(u32_at(40), DSDT_ADDR as u32);
        assert_eq!(u16_at(46), 9);
        assert_eq!(u32_at(56), 0x600);
        assert_eq!(u32_at(64), 0x604);
        assert_eq!(u32_at(76), 0x608);
        assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 4));
        assert_eq!(u32_at(112) & (1 << 20), 0, "hardware-reduced must be off");
        assert_eq!(fadt[128], 0xfe); // reset value
    }

    #[test]
    fn dsdt_names_the_pci_root_bridge() {
        let t = tables(1);
        let dsdt = &t.iter().find(|(a, _)| *a == DSDT_ADDR).unwrap().1;
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_SB_") && has(b"PCI0") && has(b"_CRS") && has(b"_BBN"));
        // EISAID("PNP0A03") compressed: 41 D0 0A 03.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x0a, 0x03]), "_HID PNP0A03");
        assert_eq!(
            dsdt.iter().fold(0u8, |a, &b| a.wrapping_add(b)),
            0,
            "checksum"
        );
        assert!(DSDT_ADDR + dsdt.len() as u64 <= ACPI_END);
    }

    #[test]
    fn dsdt_has_s5() {
        let t = tables(1);
        let dsdt = &t.iter().find(|(a, _)| *a == DSDT_ADDR).unwrap().1;
        assert_eq!(&dsdt[..4], b"DSDT");
        let aml = &dsdt[36..];
        // NameOp '\' "_S5_" PackageOp len 4 BytePrefix 5 BytePrefix 5 Zero Zero
        assert_eq!(
            &aml[..15],
            &[
                0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05,
                0x00, 0x00
            ]
        );
    }

    #[test]
    fn s5_powers_off_and_other_writes_do_not() {
        let mut pm = PmBlock::new();
        let mut b = [0u8; 2];
        pm.read(4, &mut b, 0);
        assert_eq!(u16::from_le_bytes(b) & 1, 1); // SCI_EN
        assert_eq!(pm.write(4, &(3u16 << 10).to_le_bytes()), None); // type only
        assert_eq!(pm.write(4, &(3u16 << 10 | SLP_EN).to_le_bytes()), None); // S3: ignored
        assert_eq!(
            pm.write(4, &(5u16 << 10 | SLP_EN).to_le_bytes()),
            Some(StopReason::PowerOff)
        );
        // QEMU's outw(0x604, 0x2000), and byte-wise writes.
        assert_eq!(
            pm.write(4, &0x2000u16.to_le_bytes()),
            Some(StopReason::PowerOff)
        );
        assert_eq!(pm.write(4, &[0x00]), None);
        assert_eq!(pm.write(5, &[0x34]), Some(StopReason::PowerOff)); // 5<<10|SLP_EN = 0x3400
    }

    #[test]
    fn status_write_one_to_clear_and_timer() {
        let mut pm = PmBlock {
            status: 0x8001,
            ..Default::default()
        };
        pm.write(0, &0x8000u16.to_le_bytes());
        assert_eq!(pm.status, 0x0001);
        pm.write(2, &[0x20, 0x01]);
        assert_eq!(pm.enable, 0x0120);
        let mut t = [0u8; 4];
        pm.read(8, &mut t, 1_000_000_000);
        assert_eq!(u32::from_le_bytes(t), (PM_TIMER_HZ & 0xff_ffff) as u32);
    }
}

impl PmBlock {
    /// Checks a saved state's invariants (see [`crate::persist`]): any
    /// register values are possible.
    pub(crate) fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod loader_tests {
    use super::*;

    /// Runs the table-loader as firmware does, placing the RSDP at `r` and
    /// the tables at `t`; returns (rsdp, tables) as they end up.
    fn run_loader(r: u64, t: u64) -> (Vec<u8>, Vec<u8>) {
        let (mut rsdp, mut tables, loader) = loader_files(2);
        let file = |b: &[u8]| {
            String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap()]).into_owned()
        };
        assert_eq!(loader.len() % 128, 0);
        for c in loader.chunks(128) {
            let kind = u32::from_le_bytes(c[..4].try_into().unwrap());
            let b = &c[4..];
            match kind {
                1 => assert!(matches!(
                    file(&b[..56]).as_str(),
                    "etc/acpi/rsdp" | "etc/acpi/tables"
                )),
                2 => {
                    let dest = file(&b[..56]);
                    assert_eq!(file(&b[56..112]), "etc/acpi/tables");
                    let off = u32::from_le_bytes(b[112..116].try_into().unwrap()) as usize;
                    let size = b[116] as usize;
                    let d = if dest == "etc/acpi/rsdp" {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&d[off..off + size]);
                    let nv = u64::from_le_bytes(v) + t;
                    d[off..off + size].copy_from_slice(&nv.to_le_bytes()[..size]);
                }
                3 => {
                    let f = file(&b[..56]);
                    let w = |i: usize| {
                        u32::from_le_bytes(b[56 + 4 * i..60 + 4 * i].try_into().unwrap()) as usize
                    };
                    let d = if f == "etc/acpi/rsdp" {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let s = d[w(1)..w(1) + w(2)]
                        .iter()
                        .fold(0u8, |a, &x| a.wrapping_add(x));
                    d[w(0)] = d[w(0)].wrapping_sub(s);
                }
                k => panic!("command {k}"),
            }
        }
        let _ = r;
        (rsdp, tables)
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn the_table_loader_relocates_every_pointer_and_checksum() {
        let t = 0x0eff_0000u64;
        let (rsdp, tables) = run_loader(0xf_5000, t);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        let at = |a: u64| (a - t) as usize;
        let rsdt = u32::from_le_bytes(rsdp[16..20].try_into().unwrap()) as u64;
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        assert_eq!(&tables[at(rsdt)..at(rsdt) + 4], b"RSDT");
        assert_eq!(&tables[at(xsdt)..at(xsdt) + 4], b"XSDT");
        let len = |o: usize| u32::from_le_bytes(tables[o + 4..o + 8].try_into().unwrap()) as usize;
        let mut sigs = Vec::new();
        for e in (36..len(at(rsdt))).step_by(4) {
            let a = u32::from_le_bytes(tables[at(rsdt) + e..at(rsdt) + e + 4].try_into().unwrap());
            let o = at(u64::from(a));
            assert_eq!(sum(&tables[o..o + len(o)]), 0);
            sigs.push(String::from_utf8_lossy(&tables[o..o + 4]).into_owned());
        }
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
        let fadt = at(u64::from(u32::from_le_bytes(
            tables[at(rsdt) + 36..at(rsdt) + 40].try_into().unwrap(),
        )));
        let dsdt = u32::from_le_bytes(tables[fadt + 40..fadt + 44].try_into().unwrap());
        assert_eq!(
            &tables[at(u64::from(dsdt))..at(u64::from(dsdt)) + 4],
            b"DSDT"
        );
        let facs = u32::from_le_bytes(tables[fadt + 36..fadt + 40].try_into().unwrap());
        assert_eq!(
            &tables[at(u64::from(facs))..at(u64::from(facs)) + 4],
            b"FACS"
        );
        assert_eq!(facs % 64, 0, "FACS stays 64-byte aligned");
    }
}
