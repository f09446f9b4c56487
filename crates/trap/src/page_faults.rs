//! Shadow paging at run time: hidden page faults fill the shadow, true
//! ones are reflected, stores to write-protected guest page tables are
//! emulated and resynchronized, INVLPG drops one entry.

use super::*;

impl Trap {
    /// The host page behind guest-physical `gpp`: RAM through the
    /// physical map; the machine's own addresses above the host's memory
    /// (devices, unassigned space) as they are; the rest of the guest's
    /// space below them — beyond guest RAM but where host pages lie — the
    /// void page just past host memory, which the bus answers with
    /// all-ones and whose writes it drops, as it does for unassigned
    /// addresses.
    pub(crate) fn host_page(&self, gpp: u64) -> u64 {
        match self.map.to_host(gpp) {
            Some(h) => h,
            None if gpp >= self.hram.size() + 0x1000 => gpp & !0xfff,
            None => self.hram.size(),
        }
    }

    pub(crate) fn reset_shadow(&mut self) {
        let pd = self.paging().then_some(self.v.cr3 >> 12);
        self.shadow.reset(&self.hram, pd);
        self.cpu.flush_tlb();
    }

    /// Fills the shadow PTE for `lin` from a successful guest walk.
    pub(crate) fn fill(&mut self, lin: u32, w: &Walk, write: bool, force_writable: bool) {
        self.set_ad(w, write);
        let page = w.page >> 12;
        let mut flags = pte::P | pte::A;
        if w.user {
            flags |= pte::U;
        }
        // Pages outside guest RAM reach the bus (devices, the void page):
        // stores to them need no tracking.
        let may_write = w.writable && (write || w.dirty);
        if force_writable || (may_write && (self.pv_mmu || !self.shadow.is_tracked(page))) {
            flags |= pte::W | pte::D;
        }
        // The guest page table the leaf entry came from (none for a
        // 4 MiB page, mapped by the directory itself).
        let src = (w.entries().len() == 2).then(|| {
            let p = w.entries()[1] >> 12;
            (p, self.host_page(p << 12))
        });
        let host = self.host_page(w.page);
        let gpage = (!force_writable).then_some(page);
        if !self
            .shadow
            .install(&self.hram, lin, host, flags, src, gpage)
        {
            self.reset_shadow();
            self.shadow
                .install(&self.hram, lin, host, flags, src, gpage);
        }
        if flags & pte::W != 0 && !force_writable && !self.pv_mmu && self.shadow.is_tracked(page) {
            // The page became a page table by this very fill (it maps
            // itself): keep it read-only.
            self.shadow
                .install(&self.hram, lin, host, flags & !pte::W, src, None);
        }
        self.cpu.flush_tlb_page(lin);
    }

    pub(crate) fn snapshot_if_tracked(&self, page: u64) -> Option<Vec<u8>> {
        if !self.shadow.is_tracked(page) {
            return None;
        }
        let mut b = vec![0u8; 4096];
        self.gram.read(page << 12, &mut b).ok()?;
        Some(b)
    }

    /// After a store to guest page-table page `page`: drops the shadow
    /// entries derived from the entries that changed.
    pub(crate) fn resync_table_page(&mut self, page: u64, before: &[u8]) {
        let mut after = vec![0u8; 4096];
        if self.gram.read(page << 12, &mut after).is_err() {
            return;
        }
        if self.shadow.is_gdt(page) && before != after.as_slice() {
            self.sync_gdt();
        }
        let (pd, pts) = self.shadow.uses(page);
        let mut flush_all = false;
        for e in 0..1024usize {
            let r = e * 4..e * 4 + 4;
            let (old, new) = (&before[r.clone()], &after[r]);
            if old == new {
                continue;
            }
            // A/D bits set by the monitor itself change nothing the
            // shadow derives from (it sets them before filling).
            let o = u32::from_le_bytes(old.try_into().unwrap());
            let n = u32::from_le_bytes(new.try_into().unwrap());
            let diff = o ^ n;
            if diff & !(pte::A | pte::D) == 0 && n & diff == diff {
                continue;
            }
            if pd {
                self.shadow.zap_pde(&self.hram, e);
                flush_all = true;
            }
            for &i in &pts {
                let lin = ((i as u32) << 22) | ((e as u32) << 12);
                self.shadow.zap_page(&self.hram, lin);
                self.cpu.flush_tlb_page(lin);
            }
        }
        if flush_all {
            self.cpu.flush_tlb();
        }
    }

    /// Whether a store through `w` must be emulated: its page is a
    /// tracked guest page table (or GDT) or read-only in the guest's
    /// tables, and lies in RAM.
    pub(crate) fn store_needs_emulation(&self, w: &Walk) -> bool {
        let page = w.page >> 12;
        let in_ram = self.map.to_host(w.page).is_some();
        let protected = self.shadow.is_tracked(page) && !self.pv_mmu;
        in_ram && (protected || !w.writable)
    }

    /// The page a single-stepped instruction faulted on, if the fault is
    /// another store that needs emulation (an instruction that writes two
    /// protected pages: a dword across a page boundary, ENTER's frame).
    pub(crate) fn second_protected_store(&mut self, exit: &RunExit) -> Option<(u32, Walk)> {
        let RunExit::Exception {
            vector: 14,
            error_code: Some(code),
            software: false,
        } = *exit
        else {
            return None;
        };
        let lin = self.cpu.state().cr2 as u32;
        if code & 2 == 0 || lin >= VMM_LINEAR {
            return None;
        }
        let w = self.walk(lin, true, code & 4 != 0).ok()?;
        self.store_needs_emulation(&w).then_some((lin, w))
    }

    /// Runs the faulting instruction once with the page temporarily
    /// writable in the shadow, then re-protects it and resynchronizes what
    /// it changed. Every protected page the instruction stores to stays
    /// open until it completes: re-protecting one before the next store
    /// would fault on it again without end.
    pub(crate) fn emulate_store(&mut self, machine: &mut Machine, lin: u32, w: &Walk) -> Handled {
        /// Pages one instruction may need open at once (a task switch
        /// writes two TSSs; string moves one page each side).
        const MAX_OPEN: usize = 8;
        if self.depth > 4 {
            // A store that keeps faulting on tracked pages: let the next
            // run retry it (the watchdog ends a true livelock).
            return Ok(Flow::Continue);
        }
        // Held across `after_run` too: a handler that emulates again
        // nests, and the nesting is bounded here, not by the host stack.
        self.depth += 1;
        let was = std::mem::replace(&mut self.emulating, true);
        let mut opened: Vec<(u32, u64, Option<Vec<u8>>)> = Vec::new();
        let (mut lin, mut w) = (lin, *w);
        let exit = loop {
            let page = w.page >> 12;
            opened.push((lin, page, self.snapshot_if_tracked(page)));
            self.fill(lin, &w, true, true);
            let exit = self.run_cpu(machine, 1);
            match self.second_protected_store(&exit) {
                Some(next) if opened.len() < MAX_OPEN => {
                    self.stats.wp_traps += 1;
                    self.count("#PF write-protect (store emulated)");
                    (lin, w) = next;
                }
                _ => break exit,
            }
        };
        self.emulating = was;
        // Re-protect: the next fill decides the permissions again.
        for (lin, _, _) in &opened {
            self.shadow.zap_page(&self.hram, *lin);
            self.cpu.flush_tlb_page(*lin);
        }
        for (_, page, before) in opened {
            if let Some(before) = before {
                self.resync_table_page(page, &before);
            }
        }
        let flow = self.after_run(machine, exit);
        self.depth -= 1;
        flow
    }

    pub(crate) fn page_fault(&mut self, machine: &mut Machine, code: u32) -> Handled {
        let lin = self.cpu.state().cr2 as u32;
        let eip = self.cpu.state().rip;
        let write = code & 2 != 0;
        let user = code & 4 != 0;
        if lin >= VMM_LINEAR {
            // Guest segments end below the monitor: only a guest segment
            // with a non-zero base can get here. Its access is refused.
            self.count("#PF monitor area");
            self.trace_line("#PF", eip, "access to the monitor's 4 MiB: #PF reflected");
            self.v.cr2 = lin as u64;
            return self.deliver(Event::Exception(14, Some(code | 1)));
        }
        match self.walk(lin, write, user) {
            Err(gerr) => {
                self.stats.true_pf += 1;
                self.count("#PF true (reflected)");
                if self.trace {
                    self.trace_line(
                        "#PF",
                        eip,
                        &format!("true fault at {lin:08x} err={gerr:x}: reflected"),
                    );
                }
                self.v.cr2 = lin as u64;
                self.deliver(Event::Exception(14, Some(gerr)))
            }
            Ok(w) => {
                if write && self.store_needs_emulation(&w) {
                    self.stats.wp_traps += 1;
                    self.count("#PF write-protect (store emulated)");
                    if self.trace {
                        self.trace_line(
                            "#PF",
                            eip,
                            &format!("store to guest page table {:08x}: emulated", w.page),
                        );
                    }
                    return self.emulate_store(machine, lin, &w);
                }
                self.stats.hidden_pf += 1;
                self.count("#PF hidden (shadow filled)");
                if self.trace {
                    self.trace_line(
                        "#PF",
                        eip,
                        &format!(
                            "hidden: {lin:08x} -> gpp {:08x} -> hpp {:08x}",
                            w.page,
                            self.host_page(w.page)
                        ),
                    );
                }
                self.fill(lin, &w, write, false);
                Ok(Flow::Continue)
            }
        }
    }

    pub(crate) fn invlpg(&mut self, lin: u32) {
        self.shadow.zap_page(&self.hram, lin);
        self.cpu.flush_tlb_page(lin);
        if self.paging() && self.v.cr4 & cr::CR4_PSE != 0 {
            let pde = self
                .gread32((self.v.cr3 & 0xffff_f000) + (lin >> 22) as u64 * 4)
                .unwrap_or(0);
            if pde & pte::PS != 0 {
                self.shadow.zap_pde(&self.hram, (lin >> 22) as usize);
                self.cpu.flush_tlb();
            }
        }
    }
}
