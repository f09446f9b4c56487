//! Guest memory as the guest kernel sees it: its own page tables walked in
//! software (accessed and dirty bits set as the CPU would), for the
//! monitor's emulation and delivery.

use super::*;

impl Trap {
    pub(crate) fn paging(&self) -> bool {
        self.v.cr0 & cr::CR0_PG != 0
    }

    pub(crate) fn gread32(&self, gpp: u64) -> Option<u32> {
        self.gram.read_u32(gpp).ok()
    }

    pub(crate) fn gwrite32(&self, gpp: u64, v: u32) {
        if let Some(h) = self.map.to_host(gpp) {
            let _ = self.hram.write_u32_untracked(h, v);
        }
    }

    /// The guest's paging mode (the virtual CR0/CR4: 32-bit paging only,
    /// PAE is refused at MOV CR0).
    pub(crate) fn paging_mode(&self) -> paging::Mode {
        if self.paging() {
            paging::Mode::Bits32 {
                pse: self.v.cr4 & cr::CR4_PSE != 0,
            }
        } else {
            paging::Mode::Off
        }
    }

    /// Walks the guest's page tables for `lin` (gvp → gpp) with the checks
    /// hardware makes; `Err` is the guest's #PF error code.
    #[inline]
    pub(crate) fn walk(&self, lin: u32, write: bool, user: bool) -> Result<Walk, u32> {
        let acc = paging::Access {
            write,
            user,
            fetch: false,
            wp: self.v.cr0 & cr::CR0_WP != 0,
            nxe: false,
        };
        paging::walk(
            &mut GuestTables(self),
            self.paging_mode(),
            self.v.cr3,
            lin as u64,
            acc,
        )
    }

    /// Sets the accessed (and for writes the dirty) bits a hardware walk
    /// would set.
    #[inline]
    pub(crate) fn set_ad(&self, w: &Walk, write: bool) {
        paging::set_accessed_dirty(&mut GuestTables(self), w, self.paging_mode(), write);
    }

    /// Reads guest-linear memory as the guest kernel would (supervisor).
    /// `Err((lin, error code))` where a page fault would occur.
    pub(crate) fn guest_read(&self, lin: u32, buf: &mut [u8]) -> Result<(), (u32, u32)> {
        self.guest_read_as(lin, buf, true)
    }

    /// [`Trap::guest_read`], optionally without setting accessed bits (for
    /// reports, which must not change what the guest sees).
    pub(crate) fn guest_read_as(
        &self,
        lin: u32,
        buf: &mut [u8],
        accessed: bool,
    ) -> Result<(), (u32, u32)> {
        let mut done = 0usize;
        while done < buf.len() {
            let a = lin.wrapping_add(done as u32);
            let w = self.walk(a, false, false).map_err(|e| (a, e))?;
            if accessed {
                self.set_ad(&w, false);
            }
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            let g = w.page + (a & 0xfff) as u64;
            if self.gram.read(g, &mut buf[done..done + n]).is_err() {
                buf[done..done + n].fill(0xff);
            }
            done += n;
        }
        Ok(())
    }

    /// Writes guest-linear memory as the guest kernel would (supervisor),
    /// keeping the shadow coherent when the page is a guest page table.
    pub(crate) fn guest_write(&mut self, lin: u32, data: &[u8]) -> Result<(), (u32, u32)> {
        // Check every page first: a fault leaves memory untouched.
        let mut walks = Vec::new();
        let mut done = 0usize;
        while done < data.len() {
            let a = lin.wrapping_add(done as u32);
            let w = self.walk(a, true, false).map_err(|e| (a, e))?;
            let n = ((0x1000 - (a & 0xfff)) as usize).min(data.len() - done);
            walks.push((a, w, done, n));
            done += n;
        }
        for (a, w, off, n) in walks {
            self.set_ad(&w, true);
            let g = w.page + (a & 0xfff) as u64;
            let page = g >> 12;
            let before = self.snapshot_if_tracked(page);
            if let Some(h) = self.map.to_host(g) {
                let _ = self.hram.write_untracked(h, &data[off..off + n]);
                self.cpu.note_phys_write(h, n as u64);
            }
            if let Some(before) = before {
                self.resync_table_page(page, &before);
            }
        }
        Ok(())
    }

    pub(crate) fn read_u32_lin(&self, lin: u32) -> Result<u32, (u32, u32)> {
        let mut b = [0u8; 4];
        self.guest_read(lin, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// The guest's page tables as the monitor reads and updates them: guest
/// RAM read directly (all-ones outside it, as on the bus), A/D updates
/// written without invalidating decoded code (a page table is not code).
struct GuestTables<'a>(&'a Trap);

impl paging::TableMemory for GuestTables<'_> {
    fn read_entry(&mut self, addr: u64, _size: u8) -> u64 {
        self.0.gread32(addr).unwrap_or(u32::MAX) as u64
    }
    fn write_entry(&mut self, addr: u64, _size: u8, value: u64) {
        self.0.gwrite32(addr, value as u32);
    }
}
