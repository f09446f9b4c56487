//! The dispatcher: from the guest EIP to a translation (the fast table,
//! the key map), running it, reading its exit, and running on the
//! interpreter what is not translated; the indirect-branch table fills.

use super::*;

impl BtCore {
    /// One dispatch: one CCF (and the CCFs it chains into), or one
    /// interpreter run; at most `remaining` instructions. `Some(exit)` when
    /// the caller must see something.
    pub fn step(&mut self, bus: &mut dyn Bus, remaining: u64) -> Option<RunExit> {
        use popek_cpu::state::flags;
        // What other CPUs (on other threads) asked: code they rewrote.
        self.cpu.serve_requests();
        if self.cpu.has_invalidated_pages() {
            self.drain_invalidations();
        }
        let Some((code16, context)) = self.context() else {
            return self.interp(bus, remaining.min(INTERP_CHUNK), None);
        };
        let st = self.cpu.state();
        if st.halted
            || st.interrupt_shadow
            || (!st.nmi_blocked && bus.nmi_pending())
            || (st.rflags & flags::IF as u64 != 0 && bus.interrupt_pending())
        {
            // The interpreter delivers the interrupt (or wakes from HLT,
            // or runs the one instruction in the shadow).
            return self.interp(bus, 1, None);
        }
        let eip = st.rip as u32;
        let Some(phys) = self.cpu.fetch_phys(bus) else {
            return self.interp(bus, 1, None); // raises the fetch fault
        };
        let key = (phys, eip, self.cpu.cpl() as u32 | context);
        let entry = match self.lookup(key) {
            Lookup::Found(e) => e,
            Lookup::Cold => {
                self.stats.cold_runs += 1;
                return self.interp(bus, remaining.min(COLD_RUN), None);
            }
            Lookup::Untranslatable => return self.interp(bus, 1, None),
        };
        if let Entry::Ccf { body, .. } = entry {
            let gen = self.cpu.tlb_fetch_gen();
            if gen.wrapping_sub(self.ib_gen_epoch) >= 1 << 62 {
                self.ib.iter_mut().for_each(|r| r[6] = 0);
                self.ib_gen_epoch = gen;
            }
            if !code16 {
                self.ib_fill(key, body as u64);
            }
        }
        match entry {
            Entry::Ccf {
                code,
                insns,
                inline,
                ..
            } => self.run_ccf(bus, remaining, code, insns, inline),
            Entry::Interp {
                run,
                callout,
                first,
            } => {
                if let Some(p) = self.profile.as_mut() {
                    p[first as usize] += 1;
                }
                self.interp(bus, remaining.min(run as u64), Some(callout))
            }
        }
    }

    /// Whether the code at CS:EIP can run translated, and the context bits
    /// of its key but the CPL (see [`Key`]): 32-bit code in a flat CS, or
    /// 16-bit code whose limit every IP satisfies (the 16-bit probe needs
    /// BMI2); no VM86, no single-stepping. `None`: interpret.
    #[inline]
    fn context(&mut self) -> Option<(bool, u32)> {
        use popek_cpu::state::{cr, flags, seg};
        let bmi2 = self.bmi2;
        let st = self.cpu.state();
        let cs = &st.seg[seg::CS];
        let plain = st.rflags & (flags::VM | flags::TF) as u64 == 0;
        let code32 = plain
            && st.cr0 & cr::CR0_PE != 0
            && cs.big()
            && cs.limit == 0xffff_ffff
            && cs.base == 0;
        let code16 = !code32 && plain && bmi2 && !cs.big() && cs.limit >= 0xffff;
        if !code32 && !code16 {
            return None;
        }
        // Present, writable, expand-up data with at least this limit.
        let usable = |i: usize, limit: u32| {
            let s = &st.seg[i];
            s.limit >= limit
                && s.present()
                && s.attr & popek_cpu::state::attr::S != 0
                && s.typ() & 0b1110 == 0b0010
        };
        let (data_ok, fs_gs, cs_lo) = if code16 {
            let ok = [seg::DS, seg::ES, seg::SS]
                .iter()
                .all(|&i| usable(i, 0xffff))
                && !st.seg[seg::SS].big();
            let fs_gs = usable(seg::FS, 0xffff) as u32 | (usable(seg::GS, 0xffff) as u32) << 1;
            (ok, fs_gs, cs.base as u32 & 0xfff)
        } else {
            let ok = [seg::DS, seg::ES, seg::SS].iter().all(|&i| {
                let s = &st.seg[i];
                s.base == 0 && s.limit == 0xffff_ffff && s.present() && s.typ() & 0b1110 == 0b0010
            }) && st.seg[seg::SS].big();
            // FS and GS usable by the inline probe: a 4 GiB limit (their
            // base is read at run time).
            let fs_gs = if bmi2 {
                usable(seg::FS, 0xffff_ffff) as u32 | (usable(seg::GS, 0xffff_ffff) as u32) << 1
            } else {
                0
            };
            (ok, fs_gs, 0)
        };
        Some((
            code16,
            (data_ok as u32) << 2 | fs_gs << 3 | (code16 as u32) << 5 | cs_lo << 8,
        ))
    }

    /// The translation for `key`: from the fast table, the map, or
    /// translated now once the code is hot (until then, interpreted).
    #[inline]
    fn lookup(&mut self, key: Key) -> Lookup {
        self.stats.lookups += 1;
        let slot = fast_slot(&key);
        if let Some((k, e)) = self.fast[slot] {
            if k == key {
                self.stats.hits += 1;
                return Lookup::Found(e);
            }
        }
        if let Some(&e) = self.map.get(&key) {
            self.stats.hits += 1;
            self.fast[slot] = Some((key, e));
            return Lookup::Found(e);
        }
        if self.still_cold(key) {
            return Lookup::Cold;
        }
        match self.translate(key) {
            Some(e) => {
                self.fast[slot] = Some((key, e));
                Lookup::Found(e)
            }
            None => Lookup::Untranslatable,
        }
    }

    /// Counts one more run of untranslated code at `key`: true while it
    /// (and its page) is not hot yet, or its page is rewritten too often
    /// to be worth translating.
    fn still_cold(&mut self, key: Key) -> bool {
        let phys = key.0;
        if self.cold.len() >= MAX_KEYS || self.cold_pages.len() >= MAX_KEYS {
            self.cold = HashMap::new();
            self.cold_pages = HashMap::new();
            self.stats.cold_resets += 1;
        }
        let n = self.cold.entry(key).or_insert(0);
        *n += 1;
        let n = *n;
        let p = self.cold_pages.entry(phys >> 12).or_insert(0);
        *p += 1;
        n < self.hot_after && (n < HOT_IN_HOT_PAGE || *p < self.hot_after)
            || self.smc_pages.get(&(phys >> 12)).is_some_and(|&(c, at)| {
                c >= VOLATILE_AFTER && self.cpu.icount - at < VOLATILE_WINDOW
            })
    }

    /// Runs the CCF at `code` (and whatever it chains to) for at most
    /// `remaining` instructions, then accounts for what it did.
    fn run_ccf(
        &mut self,
        bus: &mut dyn Bus,
        remaining: u64,
        code: *const u8,
        insns: u32,
        inline: u32,
    ) -> Option<RunExit> {
        if insns as u64 > remaining {
            return self.interp(bus, remaining, None);
        }
        let st = self.cpu.state_ptr();
        let allowance = remaining.min(translate::ALLOWANCE_MAX);
        // In-place call-outs reach the CPU and the bus through
        // `call` (stored here, before the CCF runs).
        self.call.cpu = &mut self.cpu;
        let bus_ptr: *mut (dyn Bus + '_) = &mut *bus;
        // SAFETY: only the lifetime is erased; the pointer is
        // cleared when the CCF returns, before `bus` goes away.
        self.call.bus = Some(unsafe {
            std::mem::transmute::<*mut (dyn Bus + '_), *mut (dyn Bus + 'static)>(bus_ptr)
        });
        let (runs0, done0) = (self.call.runs, self.call.done);
        // SAFETY: `runtime.entry` is the shared entry compiled by
        // `translate::compile_runtime` at the start of the cache
        // (pushed again after every reset); it saves the
        // callee-saved registers, loads the guest state and jumps
        // to `code`, the body of a CCF compiled by
        // `translate::compile_with` into the live part of the RX cache
        // (entries are dropped before the cache is reset, and chain
        // sites only point at CCFs of the same page, dropped
        // together). It follows the sysv64 ABI (saves RBX, RBP and
        // R12–R15, leaves RSP and DF as found, calls only
        // `interp1` with `call`, set up above) and accesses only
        // the `CpuState` behind `st`, which
        // `state_ptr` hands out with the flags materialized, the
        // fields it permits, and guest RAM through the CPU's TLB
        // entries (host pointers into the live guest mapping).
        // `insns` ≤ `allowance` ≤ `remaining`; a CCF chains only
        // while the allowance covers `MAX_TU` more instructions, so
        // the chain retires at most `remaining`.
        let ret = unsafe {
            let f = std::mem::transmute::<u64, CcfFn>(self.runtime.entry);
            f(st, allowance, code as u64)
        };
        self.call.bus = None;
        let chains = (ret.retired & translate::CHAIN_MASK) / translate::CHAIN_ONE;
        self.stats.ccf_runs += 1 + chains;
        self.stats.chains += chains;
        let n = ret.retired & translate::RETIRED_MASK;
        self.stats.ib_hits += ret.retired >> translate::IB_HIT_SHIFT;
        self.cpu.icount += n;
        let slow = ret.retired & translate::SLOW_PATH != 0;
        let inl = if !slow || chains > 0 {
            inline as u64
        } else {
            0
        };
        self.stats.dyn_inline += inl;
        // In-place call-outs: counted as call-outs (those that went
        // on are in `n`; the others the interpreter counted).
        let (runs, done) = (self.call.runs - runs0, self.call.done - done0);
        self.stats.callouts += runs;
        self.stats.dyn_interp += runs;
        self.stats.dyn_ident += n - (inl + done).min(n);
        if let Some(x) = self.call.exit.take() {
            return Some(x);
        }
        if self.cpu.has_invalidated_pages() {
            self.drain_invalidations();
        }
        if ret.retired & translate::IB_EXIT != 0 {
            self.stats.ib_exits += 1;
        }
        if self.profile.is_some() {
            let kind = if slow {
                1
            } else {
                (ret.retired & translate::IB_EXIT != 0) as u8 * 2
            };
            *self
                .exits
                .entry((self.cpu.state().rip as u32, kind))
                .or_default() += 1;
        }
        if !slow {
            return None;
        }
        self.after_tlb_miss(bus, remaining - n)
    }

    /// A CCF left early: an inline TLB probe missed before the instruction
    /// at EIP (maybe in another CCF reached through a chain), which the
    /// interpreter now runs; an access that keeps missing adapts the
    /// translation.
    fn after_tlb_miss(&mut self, bus: &mut dyn Bus, remaining: u64) -> Option<RunExit> {
        self.stats.tlb_misses += 1;
        let Some(at) = self.cpu.fetch_phys(bus) else {
            return self.interp(bus, 1, None);
        };
        let info = [self.exit_info[0], self.exit_info[1]];
        let set = (self.cpu.cpl() == 3) as usize;
        let exit = self.interp(bus, remaining.min(MISS_RUN), None);
        if self.tlb_would_hit(set, info) {
            // A plain TLB miss (after a CR3 load, a conflict),
            // filled now: no reason to interpret the access.
            return exit;
        }
        // Misses count within a window of instructions.
        let now = self.cpu.icount;
        let (count, since) = self.misses.entry(at).or_insert((0, now));
        if now - *since > ADAPT_WINDOW {
            (*count, *since) = (0, now);
        }
        *count += 1;
        if info[1] & translate::SHARED != 0 {
            // A shared probe's span that does not hit even now:
            // when it crosses a page (the same stack frame will
            // again), or after `ADAPT_MISSES` such misses (one
            // access keeps missing), retranslate without that
            // group; its instructions then probe (and adapt) one
            // by one. (Unsharing at the first miss dropped pages
            // thousands of times in a Debian boot.)
            let (lin, size) = (info[0], info[1] >> 16);
            let crosses = lin >> 32 != 0 || (lin & 0xfff) + size > 0x1000;
            if crosses || *count >= ADAPT_MISSES {
                self.misses.remove(&at);
                // A span that crossed a page stays unshared: where
                // a frame lies depends on the stack's alignment
                // (ASLR) and the call depth, which repeat; sharing
                // again after a delay made some runs drop and
                // retranslate pages thousands of times (the
                // benchmark's shell loop 16.5 → 21–24 s). Other
                // misses retry after a delay that doubles.
                let until = if crosses {
                    u64::MAX
                } else {
                    let times = self.nogroup_times.entry(at).or_insert(0);
                    *times += 1;
                    now + (ADAPT_RETRY << (*times - 1).min(10))
                };
                self.nogroup.insert(at, until);
                self.stats.unshared += 1;
                self.drop_page(at >> 12);
            }
            return exit;
        }
        if *count >= ADAPT_MISSES {
            // Adaptive BT: this access keeps missing (MMIO, a code
            // page, page-crossing): retranslate the page with it as
            // a call-out.
            if self.profile.is_some() {
                eprintln!(
                    "popek-bt: adaptive call-out at phys {at:#x} eip {:#x}: lin {:#x} size/write {:#x} cpl {}",
                    self.cpu.state().rip, info[0], info[1], set
                );
            }
            let times = self.forced_times.entry(at).or_insert(0);
            let delay = ADAPT_RETRY << (*times).min(10);
            *times += 1;
            self.forced.insert(at, self.cpu.icount + delay);
            self.misses.remove(&at);
            self.drop_page(at >> 12);
            self.stats.adapted += 1;
        }
        exit
    }

    /// Translates adaptive call-outs whose delay is over again (their
    /// pages are dropped; those that keep missing come back, later).
    pub(crate) fn retry_forced(&mut self) {
        let now = self.cpu.icount;
        self.next_retry = now + ADAPT_RETRY;
        let old: Vec<u64> = self
            .forced
            .iter()
            .filter(|&(_, &t)| now >= t)
            .map(|(&a, _)| a)
            .collect();
        self.nogroup.retain(|_, t| now < *t);
        let mut pages = HashSet::new();
        for a in old {
            self.forced.remove(&a);
            pages.insert(a >> 12);
        }
        for p in pages {
            self.drop_page(p);
        }
    }

    /// Records the CCF body of `key` in the indirect-branch table, with
    /// what a CCF must check before entering it: the TLB entry of the
    /// EIP's page (in the key's privilege set) must still map it, readable,
    /// to the key's physical page.
    pub(crate) fn ib_fill(&mut self, key: Key, body: u64) {
        let (phys, eip, ctx) = key;
        let r = &mut self.ib[eip as usize & (translate::IB_SLOTS - 1)];
        // Only 32-bit code uses the table: its context fits in bits 32–39
        // (the generation is added in bits 41 and up).
        debug_assert!(ctx < 1 << 8);
        let k = eip as u64 | (ctx as u64) << 32 | 1 << 40;
        // (`fetch_phys` just checked the TLB: the record holds at this
        // fetch-entry generation.)
        let gen = self.cpu.tlb_fetch_gen();
        if r[0] == k && r[4] == body {
            r[6] = k.wrapping_add(gen);
            return;
        }
        let l = self.cpu.tlb_layout();
        // The target must still be fetchable: check the instruction-fetch
        // entry of its page.
        let set = l.fetch_sets + if ctx & 3 == 3 { l.set_stride } else { 0 };
        let idx = (eip as usize >> 12) & (l.entries - 1);
        *r = [
            k,
            (l.base as usize + set + idx * l.entry_size) as u64,
            (eip & !0xfff) as u64 | 1,
            self.cpu.ram().host_ptr() as u64 + (phys & !0xfff),
            body,
            translate::IB_HIT,
            k.wrapping_add(gen),
            0,
        ];
        self.stats.ib_fills += 1;
    }

    /// True when the TLB (privilege set `set`) now lets the access of a
    /// slow-path exit (`exit_info`) go to host memory: the miss was a
    /// plain TLB miss.
    pub(crate) fn tlb_would_hit(&self, set: usize, info: [u64; 2]) -> bool {
        let size = if info[1] & translate::SHARED != 0 {
            info[1] >> 16
        } else {
            info[1] & 0xff
        };
        let (lin, write) = (info[0], info[1] & 0x100 != 0);
        if lin >> 32 != 0 || (lin & 0xfff) + size > 0x1000 {
            return false;
        }
        let l = self.cpu.tlb_layout();
        let idx = (lin as usize >> 12) & (l.entries - 1);
        let off =
            set * l.set_stride + idx * l.entry_size + if write { l.write_tag } else { l.read_tag };
        [0, l.way_stride].iter().any(|&way| {
            // SAFETY: `tlb_layout` describes the CPU's live, boxed TLB; the
            // offset stays inside it (set < 2, way 0 or 1, idx < entries, a
            // u32 tag field of an entry), and nothing writes it during this
            // read.
            let tag = unsafe { std::ptr::read_unaligned(l.base.add(off + way) as *const u32) };
            tag == (lin as u32 & !0xfff) | 1
        })
    }

    /// Indirect-branch table hits so far.
    pub(crate) fn ib_hits(&self) -> u64 {
        self.stats.ib_hits
    }

    /// Runs `n` instructions on the interpreter.
    pub(crate) fn interp(
        &mut self,
        bus: &mut dyn Bus,
        n: u64,
        callout: Option<bool>,
    ) -> Option<RunExit> {
        match callout {
            Some(true) => self.stats.callouts += 1,
            Some(false) => self.stats.fallbacks += 1,
            None => {}
        }
        let before = self.cpu.icount;
        let exit = self.cpu.run(bus, n);
        self.stats.dyn_interp += self.cpu.icount - before;
        if self.cpu.has_invalidated_pages() {
            self.drain_invalidations();
        }
        (exit != RunExit::Budget).then_some(exit)
    }
}

/// What the dispatcher found for a key.
enum Lookup {
    /// A translation (or an interpreter run) to take.
    Found(Entry),
    /// Not hot yet: interpret a little.
    Cold,
    /// Cannot be translated now: interpret one instruction.
    Untranslatable,
}
