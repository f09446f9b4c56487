//! The VMM's physical map: guest-physical pages (gpp) to the host-physical
//! pages (hpp) the software CPU really addresses.
//!
//! The CPU's memory is a second view of guest RAM in which the guest's
//! 64 KiB chunks sit in a shuffled order, followed by the monitor's own
//! pool (shadow page tables, the shadow GDT/IDT, the monitor's TSS). So
//! gpp ≠ hpp: a shadow PTE that carried a guest-physical address would
//! point at the wrong memory.

use std::sync::Arc;

use popek_memory::{GuestRam, MemoryError};

/// Granule of the shuffle.
pub const CHUNK: u64 = 0x10000;

/// gpp ↔ hpp.
pub struct PhysMap {
    /// hpp chunk `i` holds gpp chunk `to_guest[i]`.
    to_guest: Vec<u32>,
    /// gpp chunk `g` lives in hpp chunk `to_host[g]`.
    to_host: Vec<u32>,
    /// Bytes of guest RAM.
    pub ram_size: u64,
}

impl PhysMap {
    /// A shuffled map of `ram_size` bytes (a multiple of [`CHUNK`]),
    /// deterministic for a given `seed`. Chunk 0 (real-mode memory, the
    /// BIOS data) moves too.
    pub fn shuffled(ram_size: u64, seed: u64) -> PhysMap {
        let n = (ram_size / CHUNK) as usize;
        let mut to_guest: Vec<u32> = (0..n as u32).collect();
        let mut x = seed | 1;
        for i in (1..n).rev() {
            // xorshift64: a fixed, reproducible shuffle.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (x % (i as u64 + 1)) as usize;
            to_guest.swap(i, j);
        }
        if n >= 2 && to_guest.iter().enumerate().all(|(i, &g)| i as u32 == g) {
            to_guest.swap(0, 1);
        }
        let mut to_host = vec![0u32; n];
        for (h, &g) in to_guest.iter().enumerate() {
            to_host[g as usize] = h as u32;
        }
        PhysMap {
            to_guest,
            to_host,
            ram_size,
        }
    }

    /// Builds the CPU's memory: guest RAM shuffled, then `pool` bytes.
    pub fn host_view(&self, guest: &GuestRam, pool: u64) -> Result<Arc<GuestRam>, MemoryError> {
        let chunks: Vec<u64> = self.to_guest.iter().map(|&g| g as u64).collect();
        GuestRam::new_view(guest, CHUNK, &chunks, pool).map(Arc::new)
    }

    /// The hpp of a gpp inside RAM.
    #[inline]
    pub fn to_host(&self, gpp: u64) -> Option<u64> {
        if gpp >= self.ram_size {
            return None;
        }
        let c = self.to_host[(gpp / CHUNK) as usize] as u64;
        Some(c * CHUNK + gpp % CHUNK)
    }

    /// The gpp of an hpp inside the guest part of the CPU's memory.
    #[inline]
    pub fn to_guest(&self, hpp: u64) -> Option<u64> {
        if hpp >= self.ram_size {
            return None;
        }
        let c = self.to_guest[(hpp / CHUNK) as usize] as u64;
        Some(c * CHUNK + hpp % CHUNK)
    }

    /// Chunks whose hpp differs from their gpp.
    pub fn moved_chunks(&self) -> usize {
        self.to_guest
            .iter()
            .enumerate()
            .filter(|(i, &g)| *i as u32 != g)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_is_a_shuffled_bijection() {
        let m = PhysMap::shuffled(64 * CHUNK, 7);
        assert!(m.moved_chunks() > 32, "moved {}", m.moved_chunks());
        for g in (0..64 * CHUNK).step_by(0x1234) {
            let h = m.to_host(g).unwrap();
            assert_eq!(m.to_guest(h), Some(g));
            assert_eq!(h % CHUNK, g % CHUNK);
        }
        assert_eq!(m.to_host(64 * CHUNK), None);
    }

    #[test]
    fn the_host_view_shows_guest_memory_at_shuffled_addresses() {
        let ram = GuestRam::new_shareable(16 * CHUNK).unwrap();
        let m = PhysMap::shuffled(16 * CHUNK, 3);
        let view = m.host_view(&ram, 0x5000).unwrap();
        for g in 0..16u64 {
            ram.write_u64(g * CHUNK + 0x40, 0xc0de_0000 + g).unwrap();
        }
        let mut moved = 0;
        for g in 0..16u64 {
            let h = m.to_host(g * CHUNK + 0x40).unwrap();
            assert_eq!(view.read_u64(h).unwrap(), 0xc0de_0000 + g);
            moved += (h != g * CHUNK + 0x40) as u32;
        }
        assert!(moved > 0);
        assert_eq!(view.size(), 16 * CHUNK + 0x5000);
    }
}
