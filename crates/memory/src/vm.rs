//! Guest RAM as rust-vmm's `vm-memory` sees it, for the crates made for
//! this field that take a [`vm_memory::GuestMemory`] (`virtio-queue`).
//!
//! The view maps no memory of its own: it is one region over
//! [`GuestRam`]'s mapping, from guest-physical 0, and holds the RAM alive.
//! Its dirty bitmap is RAM's external-write record: every write through
//! `vm-memory` (a device's DMA, a used-ring update) is noted with
//! [`GuestRam::note_external_write`], so the CPU engines drop code they
//! decoded from those pages, as they do for the loaders' writes.

use std::sync::Arc;

use vm_memory::bitmap::{Bitmap, RefSlice, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

use crate::{GuestRam, MemoryError};

/// Guest RAM through `vm-memory`.
pub type VmMemory = vm_memory::GuestMemoryMmap<ExternalWrites>;

/// `vm-memory`'s dirty bitmap for a [`VmMemory`]: writes go to RAM's
/// external-write record.
#[derive(Clone)]
pub struct ExternalWrites(Arc<GuestRam>);

impl std::fmt::Debug for ExternalWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalWrites")
    }
}

impl<'a> WithBitmapSlice<'a> for ExternalWrites {
    type S = RefSlice<'a, ExternalWrites>;
}

impl Bitmap for ExternalWrites {
    fn mark_dirty(&self, offset: usize, len: usize) {
        // The one region starts at guest-physical 0.
        self.0.note_external_write(offset as u64, len as u64);
    }

    fn dirty_at(&self, _offset: usize) -> bool {
        // The record is for the engines to take; nobody asks it here.
        false
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, ExternalWrites> {
        RefSlice::new(self, offset)
    }
}

impl GuestRam {
    /// A `vm-memory` view of this RAM (see the module docs).
    pub fn vm_memory(self: &Arc<Self>) -> Result<VmMemory, MemoryError> {
        let map_err = |reason: String| MemoryError::Map {
            size: self.size,
            reason,
        };
        let len = usize::try_from(self.size).map_err(|_| map_err("too large".into()))?;
        // SAFETY: `ptr`/`size` are this RAM's own live mapping, readable and
        // writable, and the region's bitmap holds an `Arc` of the RAM, so the
        // mapping outlives every view (the region is not the mapping's owner
        // and never unmaps it).
        let builder = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, ExternalWrites(self.clone()))
                .with_raw_mmap_pointer(self.ptr)
        };
        let region = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| map_err("the region does not fit the address space".into()))?;
        vm_memory::GuestMemoryMmap::from_regions(vec![region]).map_err(|e| map_err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn writes_through_the_view_reach_ram_and_its_external_write_record() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mem = ram.vm_memory().unwrap();
        assert_eq!(mem.last_addr(), GuestAddress((1 << 20) - 1));
        assert!(!ram.has_external_writes());
        mem.write_obj(0x1234_5678u32, GuestAddress(0x3ffe)).unwrap();
        assert_eq!(ram.read_u32(0x3ffe).unwrap(), 0x1234_5678);
        // The write spans pages 3 and 4.
        assert_eq!(ram.take_external_writes(), vec![3, 4]);
        ram.write_u16(0x10, 0xbeef).unwrap();
        ram.take_external_writes();
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x10)).unwrap(), 0xbeef);
        assert!(!ram.has_external_writes(), "reads record nothing");
        // Beyond RAM: an error, nothing written.
        assert!(mem.write_obj(1u32, GuestAddress(1 << 20)).is_err());
        assert!(mem.write_obj(1u32, GuestAddress((1 << 20) - 2)).is_err());
        // The view keeps RAM alive.
        let weak = Arc::downgrade(&ram);
        drop(ram);
        assert!(weak.upgrade().is_some());
        mem.write_obj(7u8, GuestAddress(0)).unwrap();
        drop(mem);
        assert!(weak.upgrade().is_none());
    }
}
