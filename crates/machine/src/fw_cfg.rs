//! QEMU's firmware configuration interface (fw_cfg), on the x86 ports:
//! what stock firmware (SeaBIOS, OVMF) reads to learn the machine — RAM
//! size, the e820 map, the number of CPUs, the boot order, files such as
//! `etc/e820` — as QEMU's `docs/specs/fw_cfg` describes it.
//!
//! - selector at port 0x510 (16 bits, little-endian): picks an item and
//!   rewinds its data offset; bit 14 would select writing, which this
//!   device refuses (items are read-only, as in QEMU 2.4–2.8);
//! - data at port 0x511 (8 bits): the item's next byte, 0 past its end;
//! - the DMA address at ports 0x514–0x51B (64 bits, big-endian; writing
//!   the low half starts the transfer): a `FWCfgDmaAccess` in guest RAM
//!   (control, length, address, all big-endian) asks to select, read or
//!   skip; the device clears the control word when done, or sets its
//!   error bit. Reading the DMA register gives the signature "QEMU CFG".
//!
//! Items: signature "QEMU" (0x00), ID (0x01: traditional interface and
//! DMA), UUID (0x02), RAM size (0x03), NB_CPUS (0x05), MAX_CPUS (0x0F),
//! boot menu (0x0E), the file directory (0x19) and the files from 0x20.

use std::collections::BTreeMap;

use popek_memory::GuestRam;

/// The selector port.
pub const SELECTOR_PORT: u16 = 0x510;
/// The data port.
pub const DATA_PORT: u16 = 0x511;
/// The first of the eight DMA address ports.
pub const DMA_PORT: u16 = 0x514;

/// Item keys.
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface features: bit 0 traditional, bit 1 DMA.
    pub const ID: u16 = 0x01;
    /// The VM's UUID (16 bytes).
    pub const UUID: u16 = 0x02;
    /// RAM size, 64-bit little-endian.
    pub const RAM_SIZE: u16 = 0x03;
    /// vCPUs present at boot, 16-bit.
    pub const NB_CPUS: u16 = 0x05;
    /// Boot menu enabled, 16-bit.
    pub const BOOT_MENU: u16 = 0x0e;
    /// Most vCPUs, 16-bit.
    pub const MAX_CPUS: u16 = 0x0f;
    /// Where the firmware's Linux loader puts the protected-mode kernel.
    pub const KERNEL_ADDR: u16 = 0x07;
    /// Its size.
    pub const KERNEL_SIZE: u16 = 0x08;
    /// Where the command line goes.
    pub const CMDLINE_ADDR: u16 = 0x13;
    /// Its size, NUL included.
    pub const CMDLINE_SIZE: u16 = 0x14;
    /// The command line.
    pub const CMDLINE_DATA: u16 = 0x15;
    /// Where the initrd goes.
    pub const INITRD_ADDR: u16 = 0x0a;
    /// Its size.
    pub const INITRD_SIZE: u16 = 0x0b;
    /// The kernel's protected-mode part.
    pub const KERNEL_DATA: u16 = 0x11;
    /// The initrd.
    pub const INITRD_DATA: u16 = 0x12;
    /// Where the real-mode setup goes.
    pub const SETUP_ADDR: u16 = 0x16;
    /// Its size.
    pub const SETUP_SIZE: u16 = 0x17;
    /// The real-mode setup, its header filled in for the loader.
    pub const SETUP_DATA: u16 = 0x18;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
    /// The first file's key.
    pub const FILE_FIRST: u16 = 0x20;
}

/// DMA control bits.
const DMA_ERROR: u32 = 0x01;
const DMA_READ: u32 = 0x02;
const DMA_SKIP: u32 = 0x04;
const DMA_SELECT: u32 = 0x08;
const DMA_WRITE: u32 = 0x10;

/// The longest file name, terminating NUL included.
const MAX_NAME: usize = 56;

/// The fw_cfg device: its items and the guest's read position.
#[derive(Debug, Clone, Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selector: u16,
    offset: usize,
    /// The DMA address register as written so far.
    dma_address: u64,
}

impl FwCfg {
    /// The device with the machine's basic items.
    pub fn new(ram_size: u64, cpus: u16) -> Self {
        let mut f = FwCfg::default();
        f.items.insert(key::SIGNATURE, b"QEMU".to_vec());
        f.items.insert(key::ID, 3u32.to_le_bytes().to_vec());
        f.items.insert(key::UUID, vec![0; 16]);
        f.items
            .insert(key::RAM_SIZE, ram_size.to_le_bytes().to_vec());
        f.items.insert(key::NB_CPUS, cpus.to_le_bytes().to_vec());
        f.items.insert(key::MAX_CPUS, cpus.to_le_bytes().to_vec());
        f.items.insert(key::BOOT_MENU, 0u16.to_le_bytes().to_vec());
        f.rebuild_dir();
        f
    }

    /// Adds (or replaces) a named file, e.g. `etc/e820`. Names longer than
    /// 55 bytes are refused.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), String> {
        if name.is_empty() || name.len() >= MAX_NAME {
            return Err(format!("fw_cfg file name {name:?}: 1 to 55 bytes"));
        }
        let key = match self.files.iter().find(|(n, _)| n == name) {
            Some(&(_, k)) => k,
            None => {
                let k = key::FILE_FIRST + self.files.len() as u16;
                self.files.push((name.to_string(), k));
                k
            }
        };
        self.items.insert(key, data);
        self.rebuild_dir();
        Ok(())
    }

    /// Sets a numbered item (the boot menu flag, say).
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// The directory: a big-endian count, then per file its big-endian
    /// size and key, two reserved bytes and a NUL-padded name, sorted by
    /// name as QEMU does.
    fn rebuild_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, k) in &files {
            let size = self.items.get(k).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&k.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; MAX_NAME];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(key::FILE_DIR, dir);
    }

    fn select(&mut self, selector: u16) {
        tracing::trace!("fw_cfg: select {selector:#x}");
        self.selector = selector;
        self.offset = 0;
    }

    fn item(&self) -> &[u8] {
        self.items.get(&self.selector).map_or(&[], Vec::as_slice)
    }

    /// The selector port was written.
    pub fn write_selector(&mut self, value: u16) {
        self.select(value);
    }

    /// The data port is read: the next byte of the selected item.
    pub fn read_data(&mut self) -> u8 {
        let b = self.item().get(self.offset).copied().unwrap_or(0);
        if self.offset < self.item().len() {
            self.offset += 1;
        }
        b
    }

    /// A read of DMA port `offset` (0–7): the signature "QEMU CFG".
    pub fn read_dma(&self, offset: u16) -> u8 {
        b"QEMU CFG".get(usize::from(offset)).copied().unwrap_or(0)
    }

    /// A byte written to DMA port `offset` (0–7): the big-endian address;
    /// the last byte of the low half starts the transfer in `ram`.
    pub fn write_dma(&mut self, offset: u16, value: u8, ram: &GuestRam) {
        let shift = 8 * (7 - u32::from(offset.min(7)));
        self.dma_address = (self.dma_address & !(0xff << shift)) | (u64::from(value) << shift);
        if offset == 7 {
            let addr = self.dma_address;
            self.dma_address = 0;
            self.dma(addr, ram);
        }
    }

    /// Runs one DMA request whose descriptor is at `addr`.
    fn dma(&mut self, addr: u64, ram: &GuestRam) {
        let mut d = [0u8; 16];
        if ram.read(addr, &mut d).is_err() {
            return;
        }
        let control = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        let length = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as usize;
        let target = u64::from_be_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
        tracing::trace!("fw_cfg: dma control {control:#x} length {length} to {target:#x}");
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let mut status = 0;
        if control & DMA_WRITE != 0 {
            // Items are read-only.
            status = DMA_ERROR;
        } else if control & (DMA_READ | DMA_SKIP) != 0 {
            let start = self.offset.min(self.item().len());
            let avail = self.item().len() - start;
            let n = length.min(avail);
            if control & DMA_READ != 0 {
                // Past the item's end the guest reads zeros.
                let mut buf = self.item()[start..start + n].to_vec();
                buf.resize(length, 0);
                if ram.write(target, &buf).is_err() {
                    status = DMA_ERROR;
                }
            }
            self.offset = start + n;
        }
        let _ = ram.write(addr, &status.to_be_bytes());
    }
}

/// The e820 map as the `etc/e820` file holds it: per entry a 64-bit
/// address, a 64-bit length and a 32-bit type, little-endian.
pub fn e820_file(entries: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(addr, len, kind) in entries {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(f: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.write_selector(key);
        (0..n).map(|_| f.read_data()).collect()
    }

    #[test]
    fn signature_id_and_numbers() {
        let mut f = FwCfg::new(256 << 20, 2);
        assert_eq!(read(&mut f, key::SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read(&mut f, key::ID, 4), [3, 0, 0, 0]);
        assert_eq!(read(&mut f, key::RAM_SIZE, 8), (256u64 << 20).to_le_bytes());
        assert_eq!(read(&mut f, key::NB_CPUS, 2), [2, 0]);
        assert_eq!(read(&mut f, 0x1234, 2), [0, 0], "no such item");
        assert_eq!(
            (0..8).map(|i| f.read_dma(i)).collect::<Vec<_>>(),
            b"QEMU CFG"
        );
    }

    #[test]
    fn the_directory_lists_files_sorted_by_name() {
        let mut f = FwCfg::new(1 << 20, 1);
        f.add_file("etc/e820", e820_file(&[(0, 0x9fc00, 1)]))
            .unwrap();
        f.add_file("bootorder", b"/rom@genroms/x\n".to_vec())
            .unwrap();
        assert!(f.add_file(&"x".repeat(56), vec![]).is_err());
        let dir = read(&mut f, key::FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &2u32.to_be_bytes());
        assert_eq!(&dir[4..8], &15u32.to_be_bytes());
        assert_eq!(&dir[8..10], &0x21u16.to_be_bytes());
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(&dir[68..72], &20u32.to_be_bytes());
        assert_eq!(&dir[72..74], &0x20u16.to_be_bytes());
        assert_eq!(&dir[76..84], b"etc/e820");
        assert_eq!(read(&mut f, 0x20, 20)[8..16], 0x9fc00u64.to_le_bytes());
    }

    #[test]
    fn dma_selects_reads_skips_and_refuses_writes() {
        let ram = GuestRam::new(1 << 20).unwrap();
        let mut f = FwCfg::new(1 << 20, 1);
        let desc = 0x1000u64;
        let go = |f: &mut FwCfg, control: u32, len: u32, target: u64| {
            let mut d = control.to_be_bytes().to_vec();
            d.extend_from_slice(&len.to_be_bytes());
            d.extend_from_slice(&target.to_be_bytes());
            ram.write(desc, &d).unwrap();
            for (i, b) in desc.to_be_bytes().iter().enumerate() {
                f.write_dma(i as u16, *b, &ram);
            }
            let mut c = [0u8; 4];
            ram.read(desc, &mut c).unwrap();
            u32::from_be_bytes(c)
        };
        // Select the signature, skip 1 byte, read 6 (3 real, 3 zeros).
        assert_eq!(go(&mut f, DMA_SELECT | DMA_SKIP, 1, 0), 0);
        assert_eq!(go(&mut f, DMA_READ, 6, 0x2000), 0);
        let mut b = [0xffu8; 6];
        ram.read(0x2000, &mut b).unwrap();
        assert_eq!(&b, b"EMU\0\0\0");
        assert_eq!(go(&mut f, DMA_WRITE, 1, 0x2000), DMA_ERROR);
        // A target outside RAM is an error, not a crash.
        assert_eq!(
            go(
                &mut f,
                (u32::from(key::ID) << 16) | DMA_SELECT | DMA_READ,
                4,
                1 << 40
            ),
            DMA_ERROR
        );
    }
}
