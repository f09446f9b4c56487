//! Translating a key (guest code at a physical address, in a CPU mode)
//! into a CCF in the translation cache, deciding its tier, and chaining
//! exits to it.

use super::*;

impl BtCore {
    /// Translates the code at `key` and caches the result (timed).
    pub(crate) fn translate(&mut self, key: Key) -> Option<Entry> {
        let t0 = std::time::Instant::now();
        let e = self.translate_untimed(key);
        self.stats.translate_ns += t0.elapsed().as_nanos() as u64;
        e
    }

    /// The guest code of `key` and where its TU starts in it: for 32-bit
    /// code the whole page (a trace may jump back in it) and the first
    /// bytes of the next page when mapped (for an instruction straddling
    /// the page end, which the interpreter runs: they only give its
    /// length); 16-bit code from EIP on. `None`: code outside RAM (MMIO),
    /// interpreted.
    fn code_of(&mut self, key: Key) -> Option<(Vec<u8>, usize)> {
        let (phys, eip, cpl) = key;
        let code16 = cpl & 0x20 != 0;
        let page_end = (phys | 0xfff) + 1;
        if page_end > self.cpu.ram().size() {
            return None;
        }
        let start = if code16 { 0 } else { (phys & 0xfff) as usize };
        if self.cpu.shares_code() {
            // Marked before its bytes are read, so that a store by another
            // CPU after the read invalidates (`popek_cpu::coherence`).
            self.cpu.mark_translated_page(phys >> 12);
        }
        let mut code = vec![0u8; (page_end - phys) as usize + start];
        self.cpu.ram().read(phys - start as u64, &mut code).ok()?;
        if !code16 {
            let next = (eip as u64 | 0xfff) + 1;
            let mut more = [0u8; 15];
            if next >> 32 == 0 && self.cpu.peek_linear(next, &mut more).is_some() {
                code.extend_from_slice(&more);
            }
        }
        Some((code, start))
    }

    /// Where the inline TLB probe finds the CPU's TLB (the user or the
    /// supervisor sets), and what else translated code calls.
    fn probe_for(&self, user: bool) -> translate::Probe {
        let l = self.cpu.tlb_layout();
        debug_assert!(l.entry_size.is_power_of_two() && l.entries.is_power_of_two());
        translate::Probe {
            set_base: l.base as u64 + if user { l.set_stride as u64 } else { 0 },
            entries: l.entries as u32,
            entry_shift: l.entry_size.trailing_zeros(),
            way_stride: l.way_stride as i32,
            read_tag: l.read_tag as i32,
            write_tag: l.write_tag as i32,
            host: l.host as i32,
            exit_info: self.exit_info.as_ptr() as u64,
            bmi2: self.bmi2,
            amd_div_flags: self.cpu.vendor() == popek_cpu::Vendor::Amd,
            interp1_fn: interp1 as *const () as u64,
            interp1_ctx: &*self.call as *const CallCtx as u64,
        }
    }

    /// Chaining: links the new CCF's exit sites (offsets from `at`) to
    /// the CCFs of the same page that exist, records the others for when
    /// they are translated, and links the sites waiting for `key` to
    /// `body`.
    fn chain(&mut self, key: Key, at: u64, sites: &[(u64, u32)], body: u64) {
        let (phys, _, cpl) = key;
        let cs_lo = cpl >> 8;
        for &(off, target) in sites {
            let site = at + off;
            let tkey = (
                (phys & !0xfff) | ((cs_lo + target) & 0xfff) as u64,
                target,
                cpl,
            );
            match self.map.get(&tkey) {
                Some(Entry::Ccf { body: tb, .. }) => {
                    let tb = *tb as u64;
                    self.link(site, tb);
                }
                _ => self.pending.entry(tkey).or_default().push(site),
            }
        }
        if let Some(waiting) = self.pending.remove(&key) {
            for site in waiting {
                self.link(site, body);
            }
        }
    }

    pub(crate) fn translate_untimed(&mut self, key: Key) -> Option<Entry> {
        if self.translation_off {
            return None;
        }
        if self.map.len() >= MAX_KEYS {
            // As when the code cache is full (see `MAX_KEYS`).
            self.flush_all();
        }
        let (phys, eip, cpl) = key;
        let code16 = cpl & 0x20 != 0;
        let cs_lo = cpl >> 8;
        let (code, start) = self.code_of(key)?;
        let ctx = Ctx {
            cpl: (cpl & 3) as u8,
            inline_sensitive: !self.cpu.report_sensitive,
            flat_data: cpl & 4 != 0,
            fs_gs: ((cpl >> 3) & 3) as u8,
            code16,
            cs_lo,
            interp1: !code16,
            foreign_vendor: self.cpu.vendor() != popek_cpu::Vendor::host(),
            amd: self.cpu.vendor() == popek_cpu::Vendor::Amd,
            pause_exits: self.pause_exits,
            atomic: self.cpu.shares_code(),
        };
        let l = self.cpu.tlb_layout();
        let probe = self.probe_for(cpl & 3 == 3);
        let forced = |e: u32| {
            self.forced
                .contains_key(&(phys + e.wrapping_sub(eip) as u64))
        };
        let ng: Vec<u64> = (self.nogroup.keys())
            .filter(|&&a| a >> 12 == phys >> 12)
            .copied()
            .collect();
        let nogroup = |e: u32| ng.contains(&(phys + e.wrapping_sub(eip) as u64));
        let entry = match translate::plan_at(&code, start, eip, ctx, &forced) {
            Translation::Interp {
                run,
                callouts,
                first,
            } => {
                let callout = callouts > 0;
                if callout {
                    self.stats.static_callout += 1;
                } else {
                    self.stats.static_fallback += 1;
                }
                Entry::Interp {
                    run,
                    callout,
                    first,
                }
            }
            Translation::Tu(plan) => {
                let page = (cs_lo + eip) >> 12;
                let ib = translate::IbTable {
                    base: self.ib.as_ptr() as u64,
                    key_bits: (cpl as u64) << 32 | 1 << 40,
                    gen: l.base as u64 + l.fetch_gen as u64,
                };
                // 16-bit code: no indirect-branch table (its records know
                // EIPs, not CS bases).
                let ib = (!code16).then_some(&ib);
                let compiled = translate::compile_with(
                    &plan,
                    self.cache.next_addr(),
                    &probe,
                    page,
                    ib,
                    &nogroup,
                    Some(&self.runtime),
                );
                let Ok(mut host) = compiled else {
                    // Never expected (each instruction was test-encoded):
                    // interpret this code from now on.
                    if self.profile.is_some() {
                        eprintln!("popek-bt: compile error at {eip:#x}: {:?}", compiled.err());
                    }
                    self.stats.compile_errors += 1;
                    let e = Entry::Interp {
                        run: 1,
                        callout: false,
                        first: 0,
                    };
                    if self.map.insert(key, e).is_none() {
                        self.page_keys.entry(phys >> 12).or_default().push(key);
                    }
                    return Some(e);
                };
                let mut at = self.cache.push(&host.code);
                if at.is_none() {
                    self.flush_all();
                    host = translate::compile_with(
                        &plan,
                        self.cache.next_addr(),
                        &probe,
                        page,
                        ib,
                        &nogroup,
                        Some(&self.runtime),
                    )
                    .ok()?;
                    at = self.cache.push(&host.code);
                }
                let at = at?;
                self.stats.tus += 1;
                self.stats.shared_probes += host.shared as u64;
                self.stats.ccf_bytes += host.code.len() as u64;
                if let Some(f) = self.perf_map.as_mut() {
                    use std::io::Write as _;
                    let _ = writeln!(
                        f,
                        "{:x} {:x} tu_{eip:08x}_p{phys:x}_c{cpl}_n{}",
                        at as u64,
                        host.code.len(),
                        plan.insns
                    );
                }
                let body = at as u64 + host.body;
                self.chain(key, at as u64, &host.sites, body);
                if plan.traced {
                    self.traces.insert(key, plan.eips.clone());
                }
                self.stats.static_ident += plan.ident as u64;
                self.stats.static_callout += plan.callouts as u64;
                self.stats.static_inline += plan.inline as u64;
                Entry::Ccf {
                    code: at,
                    body: body as *const u8,
                    bytes: host.code.len() as u32,
                    insns: plan.insns,
                    inline: plan.inline,
                }
            }
        };
        // Stores to this page now take the CPU's slow path, which reports
        // the page through `take_invalidated_pages`.
        self.cpu.mark_translated_page(phys >> 12);
        if self.map.insert(key, entry).is_none() {
            self.page_keys.entry(phys >> 12).or_default().push(key);
        }
        Some(entry)
    }

    /// Points a chain site at a CCF body.
    pub(crate) fn link(&mut self, site: u64, body: u64) {
        let mut rel = [0u8; 4];
        translate::patch(&mut rel, site, body);
        if self.cache.write_at(site, &rel) {
            self.stats.links += 1;
        }
    }
}
