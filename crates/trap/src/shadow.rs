//! Shadow page tables: the gvp → hpp tables the CPU really walks, built
//! lazily by the monitor from the guest's own gvp → gpp tables and its
//! physical map.
//!
//! The shadow is a virtual TLB: it starts empty at each guest CR3 load and
//! fills one PTE per hidden page fault. Guest page-table pages that the
//! shadow derives from are mapped read-only in it, so the guest's stores
//! to them trap and the derived shadow entries are dropped. The top 4 MiB
//! of linear space belong to the monitor (its GDT, IDT and TSS).

use std::collections::{HashMap, HashSet};

use popek_memory::GuestRam;

/// Linear base of the monitor's 4 MiB (the last page-directory entry).
pub const VMM_LINEAR: u32 = 0xffc0_0000;
/// Pool page: the shadow page directory.
pub const SPD: u64 = 0;
/// Pool page: the page table of the monitor's 4 MiB.
pub const VMM_PT: u64 = 1;
/// Pool page: first of the 16 pages of the shadow GDT.
pub const GDT_PAGE: u64 = 2;
/// Pool page: the shadow IDT.
pub const IDT_PAGE: u64 = 18;
/// Pool page: the monitor's TSS.
pub const TSS_PAGE: u64 = 19;
// Pool page 20 is spare (guest pages beyond RAM map to the void page just
// past host memory, see `Trap::host_page`).
/// Pool page: first shadow page table.
const PT_FIRST: u64 = 21;
/// Shadow page tables available (one per guest PDE at most).
const PT_COUNT: u64 = 1023;
/// Bytes of the monitor's pool.
pub const POOL_BYTES: u64 = (PT_FIRST + PT_COUNT) * 4096;

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u32 = 1;
    /// Writable.
    pub const W: u32 = 2;
    /// User.
    pub const U: u32 = 4;
    /// Accessed.
    pub const A: u32 = 0x20;
    /// Dirty.
    pub const D: u32 = 0x40;
    /// 4 MiB page.
    pub const PS: u32 = 0x80;
}

/// Zeroes monitor memory (never code: no CPU invalidation needed).
pub fn zero(hram: &GuestRam, addr: u64, len: u64) {
    let _ = hram.write_untracked(addr, &vec![0u8; len as usize]);
}

/// What a guest page-table page is used as by the current shadow.
#[derive(Default)]
struct Uses {
    /// It is the guest page directory.
    pd: bool,
    /// It is the page table of these guest PDE indices.
    pts: Vec<u16>,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShadowStats {
    /// Shadow PTEs filled.
    pub fills: u64,
    /// Whole-shadow rebuilds (CR3 loads, paging mode changes, PD writes).
    pub syncs: u64,
    /// Shadow PTEs or PDEs dropped because the guest wrote the entry they
    /// came from, or invalidated it.
    pub zaps: u64,
}

/// The shadow page tables of one address space.
pub struct Shadow {
    /// hpp of pool page 0.
    pool: u64,
    /// Per guest PDE index: the pool page of its shadow page table and the
    /// guest page-table page (gpp page number) it shadows, if any.
    pts: Vec<Option<(u64, Option<u64>)>>,
    free: Vec<u64>,
    tracked: HashMap<u64, Uses>,
    /// Guest pages some shadow PTE maps writable.
    writable: HashSet<u64>,
    /// Guest pages holding the guest's GDT (write-protected too, so the
    /// shadow GDT follows stores to it).
    gdt: HashSet<u64>,
    /// Counters.
    pub stats: ShadowStats,
}

impl Shadow {
    /// An empty shadow whose pool starts at hpp `pool`; writes the monitor's
    /// page table.
    pub fn new(hram: &GuestRam, pool: u64) -> Shadow {
        let s = Shadow {
            pool,
            pts: vec![None; 1023],
            free: (PT_FIRST..PT_FIRST + PT_COUNT).rev().collect(),
            tracked: HashMap::new(),
            writable: HashSet::new(),
            gdt: HashSet::new(),
            stats: ShadowStats::default(),
        };
        for k in 0..PT_FIRST {
            let e = (s.page(k) as u32) | pte::P | pte::W | pte::A | pte::D;
            let _ = hram.write_u32_untracked(s.page(VMM_PT) + k * 4, e);
        }
        let _ = hram.write_u32_untracked(
            s.page(SPD) + 1023 * 4,
            s.page(VMM_PT) as u32 | pte::P | pte::W | pte::A,
        );
        s
    }

    /// Checks that the page table of the monitor's 4 MiB and its entry in
    /// the shadow page directory are as [`Shadow::new`] wrote them.
    pub fn check_monitor_tables(&self, hram: &GuestRam) -> Result<(), String> {
        for k in 0..PT_FIRST {
            let want = (self.page(k) as u32) | pte::P | pte::W | pte::A | pte::D;
            let got = hram.read_u32(self.page(VMM_PT) + k * 4).ok();
            // The CPU may set D on the monitor's own pages; nothing else.
            if got.map(|g| g | pte::D) != Some(want) {
                return Err(format!(
                    "the monitor's page-table entry {k} changed: {got:x?}"
                ));
            }
        }
        let pde = hram.read_u32(self.page(SPD) + 1023 * 4).ok();
        let want = self.page(VMM_PT) as u32 | pte::P | pte::W | pte::A;
        if pde.map(|p| p & !pte::D) != Some(want) {
            return Err(format!(
                "the monitor's page-directory entry changed: {pde:x?}"
            ));
        }
        Ok(())
    }

    /// hpp of a pool page.
    pub fn page(&self, k: u64) -> u64 {
        self.pool + k * 4096
    }

    /// hpp of the shadow page directory (the real CR3).
    pub fn root(&self) -> u64 {
        self.page(SPD)
    }

    /// Drops every shadow entry; tracks `pd` (a gpp page number) as the new
    /// guest page directory.
    pub fn reset(&mut self, hram: &GuestRam, pd: Option<u64>) {
        for i in 0..1023 {
            if let Some((k, _)) = self.pts[i].take() {
                self.free.push(k);
                let _ = hram.write_u32_untracked(self.page(SPD) + i as u64 * 4, 0);
            }
        }
        self.tracked.clear();
        self.writable.clear();
        if let Some(pd) = pd {
            self.tracked.entry(pd).or_default().pd = true;
        }
        self.stats.syncs += 1;
    }

    /// True when stores to this guest page must trap (it is a page table
    /// the shadow derives from).
    pub fn is_tracked(&self, gpp_page: u64) -> bool {
        self.tracked.contains_key(&gpp_page) || self.gdt.contains(&gpp_page)
    }

    /// True when the page holds part of the guest's GDT.
    pub fn is_gdt(&self, gpp_page: u64) -> bool {
        self.gdt.contains(&gpp_page)
    }

    /// Sets the guest pages holding its GDT, as (gpp page number, hpp
    /// address); shadow PTEs mapping them writable lose W.
    pub fn set_gdt_pages(&mut self, hram: &GuestRam, pages: &[(u64, u64)]) {
        self.gdt = pages.iter().map(|&(g, _)| g).collect();
        for &(g, h) in pages {
            if self.writable.remove(&g) {
                self.downgrade(hram, h);
            }
        }
    }

    /// The uses of a tracked page: (is the PD, PDE indices it is the PT of).
    pub fn uses(&self, gpp_page: u64) -> (bool, Vec<u16>) {
        self.tracked
            .get(&gpp_page)
            .map(|u| (u.pd, u.pts.clone()))
            .unwrap_or_default()
    }

    /// Installs the shadow PTE for linear page `lin`: `host` (an hpp page
    /// address) with `flags`; `src_pt` is the guest page-table page the
    /// entry comes from, as (gpp page number, its hpp address) (None for
    /// 4 MiB guest pages and unpaged mode); `gpp_page` the guest page
    /// mapped, to remember writable mappings.
    /// Returns false when the pool is exhausted (the caller resets).
    pub fn install(
        &mut self,
        hram: &GuestRam,
        lin: u32,
        host: u64,
        flags: u32,
        src_pt: Option<(u64, u64)>,
        gpp_page: Option<u64>,
    ) -> bool {
        let src_host = src_pt.map(|(_, h)| h);
        let src_pt = src_pt.map(|(g, _)| g);
        let i = (lin >> 22) as usize;
        let j = ((lin >> 12) & 0x3ff) as u64;
        if i >= 1023 {
            return false;
        }
        let k = match self.pts[i] {
            Some((k, src)) if src == src_pt => k,
            other => {
                if let Some((k, src)) = other {
                    // The PDE now points elsewhere: start a fresh table.
                    self.untrack_pt(src, i);
                    self.free.push(k);
                }
                let Some(k) = self.free.pop() else {
                    return false;
                };
                zero(hram, self.page(k), 4096);
                self.pts[i] = Some((k, src_pt));
                let _ = hram.write_u32_untracked(
                    self.page(SPD) + i as u64 * 4,
                    self.page(k) as u32 | pte::P | pte::W | pte::U | pte::A,
                );
                if let (Some(src), Some(h)) = (src_pt, src_host) {
                    self.track_pt(hram, src, h, i as u16);
                }
                k
            }
        };
        let _ = hram.write_u32_untracked(self.page(k) + j * 4, host as u32 | flags);
        if flags & pte::W != 0 {
            if let Some(g) = gpp_page {
                self.writable.insert(g);
            }
        }
        self.stats.fills += 1;
        true
    }

    fn track_pt(&mut self, hram: &GuestRam, src: u64, src_host: u64, pde: u16) {
        let was = self.tracked.contains_key(&src);
        self.tracked.entry(src).or_default().pts.push(pde);
        if !was && self.writable.remove(&src) {
            // Some shadow PTE maps this new page table writable: find it.
            self.downgrade(hram, src_host);
        }
    }

    fn untrack_pt(&mut self, src: Option<u64>, pde: usize) {
        if let Some(src) = src {
            if let Some(u) = self.tracked.get_mut(&src) {
                u.pts.retain(|&p| p as usize != pde);
                if !u.pd && u.pts.is_empty() {
                    self.tracked.remove(&src);
                }
            }
        }
    }

    /// Clears W in every shadow PTE that maps the page at hpp `host`, found
    /// by scanning (rare: only when a page becomes a page table while some
    /// shadow PTE maps it writable).
    fn downgrade(&mut self, hram: &GuestRam, host: u64) {
        for (k, _) in self.pts.iter().flatten() {
            let base = self.pool + k * 4096;
            for j in 0..1024u64 {
                let Ok(e) = hram.read_u32(base + j * 4) else {
                    continue;
                };
                if e & pte::P != 0 && e & pte::W != 0 && (e & !0xfff) as u64 == host {
                    let _ = hram.write_u32_untracked(base + j * 4, e & !pte::W);
                }
            }
        }
    }

    /// Drops the shadow PTE of one linear page (INVLPG, a guest PTE write).
    pub fn zap_page(&mut self, hram: &GuestRam, lin: u32) {
        let i = (lin >> 22) as usize;
        if i >= 1023 {
            return;
        }
        if let Some((k, _)) = self.pts[i] {
            let a = self.page(k) + ((lin >> 12) & 0x3ff) as u64 * 4;
            if hram.read_u32(a).unwrap_or(0) != 0 {
                let _ = hram.write_u32_untracked(a, 0);
                self.stats.zaps += 1;
            }
        }
    }

    /// Drops a whole shadow page table (a guest PDE changed).
    pub fn zap_pde(&mut self, hram: &GuestRam, i: usize) {
        if i >= 1023 {
            return;
        }
        if let Some((k, src)) = self.pts[i].take() {
            self.untrack_pt(src, i);
            self.free.push(k);
            let _ = hram.write_u32_untracked(self.page(SPD) + i as u64 * 4, 0);
            self.stats.zaps += 1;
        }
    }
}
