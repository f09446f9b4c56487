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

    /// Walks the guest's page tables for `lin` (gvp → gpp) with the checks
    /// hardware makes; `Err` is the guest's #PF error code.
    pub(crate) fn walk(&self, lin: u32, write: bool, user: bool) -> Result<Walk, u32> {
        if !self.paging() {
            return Ok(Walk {
                gpp: (lin & !0xfff) as u64,
                user_ok: true,
                writable: true,
                pde: None,
                pte: None,
                dirty: true,
            });
        }
        let err = |present: bool| (present as u32) | ((write as u32) << 1) | ((user as u32) << 2);
        let pde_a = (self.v.cr3 & 0xffff_f000) + ((lin >> 22) as u64) * 4;
        let pde = self.gread32(pde_a).unwrap_or(0);
        if pde & pte::P == 0 {
            return Err(err(false));
        }
        let (gpp, flags, pte_a) = if pde & pte::PS != 0 && self.v.cr4 & cr::CR4_PSE != 0 {
            (
                ((pde & 0xffc0_0000) | (lin & 0x003f_f000)) as u64,
                pde,
                None,
            )
        } else {
            let a = (pde & 0xffff_f000) as u64 + ((lin >> 12) & 0x3ff) as u64 * 4;
            let e = self.gread32(a).unwrap_or(0);
            if e & pte::P == 0 {
                return Err(err(false));
            }
            (
                (e & 0xffff_f000) as u64,
                e & (pde | !(pte::U | pte::W)),
                Some(a),
            )
        };
        let user_ok = flags & pte::U != 0;
        let writable = flags & pte::W != 0;
        if user && !user_ok {
            return Err(err(true));
        }
        if write && !writable && (user || self.v.cr0 & cr::CR0_WP != 0) {
            return Err(err(true));
        }
        let dirty = match pte_a {
            Some(a) => self.gread32(a).unwrap_or(0) & pte::D != 0,
            None => pde & pte::D != 0,
        };
        Ok(Walk {
            gpp,
            user_ok,
            writable,
            pde: Some(pde_a),
            pte: pte_a,
            dirty,
        })
    }

    /// Sets the accessed (and for writes the dirty) bits a hardware walk
    /// would set.
    pub(crate) fn set_ad(&self, w: &Walk, write: bool) {
        if let Some(a) = w.pde {
            let e = self.gread32(a).unwrap_or(0);
            let mut n = e | pte::A;
            if w.pte.is_none() && write {
                n |= pte::D;
            }
            if n != e {
                self.gwrite32(a, n);
            }
        }
        if let Some(a) = w.pte {
            let e = self.gread32(a).unwrap_or(0);
            let n = e | pte::A | if write { pte::D } else { 0 };
            if n != e {
                self.gwrite32(a, n);
            }
        }
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
            let g = w.gpp + (a & 0xfff) as u64;
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
            let g = w.gpp + (a & 0xfff) as u64;
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
