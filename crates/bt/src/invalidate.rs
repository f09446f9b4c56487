//! Dropping translations: a guest page written (self-modifying code, a
//! reused page), one key, or the whole cache when it is full.

use super::*;

impl BtCore {
    /// Forgets every translation of a physical page (with the chain links
    /// between them: chains never leave a page).
    /// Counts the drop against the page (see [`VOLATILE_AFTER`]).
    pub(crate) fn drop_page(&mut self, page: u64) {
        if let Some(keys) = self.page_keys.remove(&page) {
            self.stats.invalidations += 1;
            for k in keys {
                self.drop_key(k);
            }
            if self.smc_pages.len() >= MAX_KEYS {
                self.smc_pages = HashMap::new();
            }
            let now = self.cpu.icount;
            let e = self.smc_pages.entry(page).or_insert((0, now));
            // Drops long apart (boot-time patching) do not add up.
            *e = if now - e.1 > VOLATILE_WINDOW {
                (1, now)
            } else {
                (e.0.saturating_add(1), now)
            };
        }
        self.pending.retain(|k, _| k.0 >> 12 != page);
    }

    /// Forgets one translation (only with its whole page: see `drop_page`).
    pub(crate) fn drop_key(&mut self, k: Key) {
        self.traces.remove(&k);
        if let Some(Entry::Ccf { body, .. }) = self.map.remove(&k) {
            let r = &mut self.ib[k.1 as usize & (translate::IB_SLOTS - 1)];
            if r[4] == body as u64 {
                *r = [0; 8];
            }
        }
        let slot = fast_slot(&k);
        if matches!(self.fast[slot], Some((fk, _)) if fk == k) {
            self.fast[slot] = None;
        }
    }

    /// Drops the translations of code pages the CPU saw written.
    pub(crate) fn drain_invalidations(&mut self) {
        for page in self.cpu.take_invalidated_pages() {
            if page == u64::MAX {
                self.flush_all();
                continue;
            }
            self.drop_page(page);
            self.forced.retain(|a, _| a >> 12 != page);
            self.misses.retain(|a, _| a >> 12 != page);
            self.nogroup.retain(|a, _| a >> 12 != page);
        }
    }

    /// Drops every translation and empties the cache.
    pub fn flush_all(&mut self) {
        self.map.clear();
        self.pending.clear();
        self.forced.clear();
        self.misses.clear();
        self.nogroup.clear();
        self.fast.iter_mut().for_each(|e| *e = None);
        self.page_keys.clear();
        self.traces.clear();
        self.smc_pages.clear();
        self.ib.iter_mut().for_each(|r| *r = [0; 8]);
        self.cache.reset();
        self.push_runtime();
        self.stats.flushes += 1;
    }
}
