//! Address buses: one for I/O ports, one for MMIO.
//!
//! A bus maps non-overlapping address ranges to devices, like rust-vmm's
//! `vm-device`. A device sees accesses as `read(offset, data)` /
//! `write(offset, data)` where `offset` is relative to the start of the
//! range it was inserted at and `data.len()` is the access size.

use std::collections::BTreeMap;

/// A device on a bus.
///
/// `offset` is relative to the base of the range the device was inserted
/// at; `data.len()` is the access width (1, 2, 4 or 8 bytes).
pub trait BusDevice: Send {
    /// Handles a read: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors of bus range insertion.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the range already present.
        other_base: u64,
        /// Length of the range already present.
        other_len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A set of non-overlapping address ranges, each owned by a `D`.
///
/// `D` is whatever identifies the device: a boxed [`BusDevice`] for the
/// MMIO bus, or a small `Copy` tag for the port bus, whose devices the
/// [`Machine`](crate::Machine) owns directly.
#[derive(Debug)]
pub struct Bus<D> {
    /// base -> (length, device)
    ranges: BTreeMap<u64, (u64, D)>,
}

impl<D> Default for Bus<D> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
        }
    }
}

impl<D> Bus<D> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base + len`. Fails if the range is empty,
    /// wraps, or overlaps a range already present.
    pub fn insert(&mut self, base: u64, len: u64, device: D) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::InvalidRange { base, len }),
        };
        // The closest range starting at or below the new one's last byte
        // is the only one that can overlap.
        if let Some((&other_base, &(other_len, _))) = self.ranges.range(..end).next_back() {
            if other_base + other_len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len,
                });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// Finds the range containing `addr`: `(base, len, device)`.
    pub fn resolve(&self, addr: u64) -> Option<(u64, u64, &D)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((base, *len, dev))
    }

    /// Like [`resolve`](Self::resolve), with mutable access to the device.
    pub fn resolve_mut(&mut self, addr: u64) -> Option<(u64, u64, &mut D)> {
        let (&base, (len, dev)) = self.ranges.range_mut(..=addr).next_back()?;
        (addr - base < *len).then_some((base, *len, dev))
    }

    /// Every range in address order: `(base, len, device)`.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64, &D)> {
        self.ranges.iter().map(|(&b, (l, d))| (b, *l, d))
    }

    /// Number of ranges on the bus.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when no range is on the bus.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

impl Bus<Box<dyn BusDevice>> {
    /// Reads `data.len()` bytes at `addr`. Returns false (and leaves
    /// `data` alone) when no device holds the whole access.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve_mut(addr) {
            Some((base, len, dev)) if addr - base + data.len() as u64 <= len => {
                dev.read(addr - base, data);
                true
            }
            _ => false,
        }
    }

    /// Writes `data` at `addr`. Returns false when no device holds the
    /// whole access.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.resolve_mut(addr) {
            Some((base, len, dev)) if addr - base + data.len() as u64 <= len => {
                dev.write(addr - base, data);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x20, 2, 'a').unwrap();
        bus.insert(0x40, 4, 'b').unwrap();
        bus.insert(0x22, 0x1e, 'c').unwrap(); // exactly fills the gap
        assert!(matches!(
            bus.insert(0x43, 1, 'd'),
            Err(BusError::Overlap {
                other_base: 0x40,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(0x10, 0x11, 'd'),
            Err(BusError::Overlap {
                other_base: 0x20,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(0x10, 0, 'd'),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, 'd'),
            Err(BusError::InvalidRange { .. })
        ));
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn resolve_finds_containing_range() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, 1u8).unwrap();
        assert_eq!(bus.resolve(0x3f8), Some((0x3f8, 8, &1)));
        assert_eq!(bus.resolve(0x3ff), Some((0x3f8, 8, &1)));
        assert_eq!(bus.resolve(0x400), None);
        assert_eq!(bus.resolve(0x3f7), None);
        assert_eq!(bus.resolve(0), None);
    }

    struct Regs([u8; 8]);
    impl BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn dyn_bus_dispatches_with_offsets() {
        let mut bus: Bus<Box<dyn BusDevice>> = Bus::new();
        bus.insert(0x1000, 8, Box::new(Regs([0; 8]))).unwrap();
        assert!(bus.write(0x1002, &[1, 2, 3, 4]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x1003, &mut b));
        assert_eq!(b, [2, 3]);
        // Straddling the end of the range is not claimed.
        assert!(!bus.read(0x1006, &mut [0u8; 4]));
        assert!(!bus.write(0x2000, &[0]));
    }
}
