//! Linear-to-physical translation: 32-bit two-level paging (4 KiB pages,
//! 4 MiB pages with CR4.PSE, CR0.WP, accessed/dirty bits, global pages) and a
//! software TLB of `linear page -> host pointer` that behaves like a hardware
//! TLB (filled on walks, flushed by CR3 loads except global pages, INVLPG).
//!
//! Memory accessors here take linear addresses; segmentation is applied by
//! the callers in `seg.rs`.

use crate::bus::{Bus, BusAction};
use crate::cpu::{Cpu, RunExit};
use crate::exception::{Exc, Vector};
use crate::paging;
use crate::state::cr;

const TLB_SIZE: usize = 1024;
/// Ways of the data sets (fetch sets use way 0 only).
const WAYS: usize = 2;

/// Kind of memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    /// Data read.
    Read,
    /// Data write.
    Write,
    /// Instruction fetch.
    Fetch,
}

/// One TLB entry (per privilege class). `#[repr(C)]`: generated code probes
/// it at the offsets [`TlbLayout`] publishes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct TlbEntry {
    /// `linear page | 1` when this entry translates the page at all.
    vtag: u32,
    /// `linear page | 1` when reads may go straight to host memory.
    read_tag: u32,
    /// `linear page | 1` when writes may go straight to host memory.
    write_tag: u32,
    /// Writes allowed by the page tables at this privilege and D already set.
    writable: bool,
    global: bool,
    /// Part of a 4 MiB page (INVLPG must drop all of its pieces).
    big: bool,
    /// Physical page base.
    phys: u64,
    /// Host address of the physical page (RAM only).
    host: usize,
}

impl TlbEntry {
    /// Anything but [`INVALID`]: some tag is set.
    #[inline]
    fn live(&self) -> bool {
        self.vtag | self.read_tag | self.write_tag != 0
    }
}

const INVALID: TlbEntry = TlbEntry {
    vtag: 0,
    read_tag: 0,
    write_tag: 0,
    writable: false,
    global: false,
    big: false,
    phys: 0,
    host: 0,
};

/// The software TLB: two-way arrays for supervisor and user data accesses
/// (sets 0 and 1: a new entry goes to way 0 and moves way 0's to way 1,
/// so two pages that share an index — a decompressor's input and output,
/// a heap and a stack 4 MiB apart — stay cached together), and direct-mapped
/// ones for supervisor and user instruction fetches (sets 2 and 3, way 0: a
/// split TLB, so a loop's code page and the data page it walks never evict
/// each other). Each set is way-major: way 1 of index `i` is `TLB_SIZE`
/// entries after way 0.
#[repr(C)]
pub struct Tlb {
    e: [[TlbEntry; WAYS * TLB_SIZE]; 4],
    /// Some entry may be a piece of a 4 MiB page.
    has_big: bool,
    /// Grows by [`FETCH_GEN_STEP`] whenever an instruction-fetch entry may
    /// have changed (a fill of sets 2–3, any flush): generated code that
    /// cached what a fetch entry said may trust it while this is unchanged.
    fetch_gen: u64,
}

/// The step of [`TlbLayout::fetch_gen`]'s counter (it counts in bits 41
/// and up, so that generated code can add it to a key; it wraps after
/// 2^23 changes).
pub const FETCH_GEN_STEP: u64 = 1 << 41;

/// Where generated code (the binary translator) finds the software TLB: the
/// entry for linear address `lin` at privilege set `s` (0 supervisor, 1
/// user, CPL 3) is at `base + s * set_stride + ((lin >> 12) % entries) *
/// entry_size`, or `way_stride` bytes after it (way 1 of the data sets); an access of `n` bytes may go straight to `host + (lin &
/// 0xfff)` when `(lin & 0xfff) + n <= 0x1000` and the 32-bit tag at
/// `read_tag` (reads) or `write_tag` (writes, read-modify-writes) equals
/// `(lin & !0xfff) | 1`. Anything else must take the CPU's slow path (it
/// walks the page tables, sets A/D bits, raises #PF, invalidates code).
#[derive(Clone, Copy, Debug)]
pub struct TlbLayout {
    /// Address of entry 0 of the supervisor set. Stable for the CPU's
    /// lifetime (the TLB is boxed and flushed in place).
    pub base: *const u8,
    /// Entries per set.
    pub entries: usize,
    /// Bytes per entry.
    pub entry_size: usize,
    /// Bytes from way 0 of an index to way 1 (data sets).
    pub way_stride: usize,
    /// Bytes from one set to the next.
    pub set_stride: usize,
    /// Offset of the read tag (u32) in an entry.
    pub read_tag: usize,
    /// Offset of the write tag (u32).
    pub write_tag: usize,
    /// Offset of the host address of the page (usize).
    pub host: usize,
    /// Bytes from `base` to the supervisor instruction-fetch set (the user
    /// one follows at `set_stride`): where a code page's translation lives.
    pub fetch_sets: usize,
    /// Bytes from `base` to the fetch-entry generation (u64): it changes
    /// (by [`FETCH_GEN_STEP`]) whenever an instruction-fetch entry may have.
    pub fetch_gen: usize,
}

impl Cpu {
    /// The software TLB's layout, for generated code.
    pub fn tlb_layout(&self) -> TlbLayout {
        TlbLayout {
            base: self.tlb.e.as_ptr() as *const u8,
            entries: TLB_SIZE,
            entry_size: std::mem::size_of::<TlbEntry>(),
            way_stride: std::mem::size_of::<[TlbEntry; TLB_SIZE]>(),
            set_stride: std::mem::size_of::<[TlbEntry; WAYS * TLB_SIZE]>(),
            read_tag: std::mem::offset_of!(TlbEntry, read_tag),
            write_tag: std::mem::offset_of!(TlbEntry, write_tag),
            host: std::mem::offset_of!(TlbEntry, host),
            fetch_sets: 2 * std::mem::size_of::<[TlbEntry; WAYS * TLB_SIZE]>(),
            fetch_gen: std::mem::offset_of!(Tlb, fetch_gen),
        }
    }

    /// The fetch-entry generation (see [`TlbLayout::fetch_gen`]).
    pub fn tlb_fetch_gen(&self) -> u64 {
        self.tlb.fetch_gen
    }
}

impl Tlb {
    pub(crate) fn new() -> Box<Tlb> {
        // Zeroed memory is untouched memory: a TLB costs host pages only
        // for the indices a guest uses (a clone of an idle VM stays small).
        // Every field of `Tlb` and `TlbEntry` is an integer or a bool, for
        // which all-zero bytes are valid, and an all-zero entry is
        // `INVALID` (the test `an_all_zero_entry_is_invalid`).
        let layout = std::alloc::Layout::new::<Tlb>();
        // SAFETY: `Tlb` is not zero-sized; the pointer is checked below.
        let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Tlb>();
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: allocated by the global allocator with `Tlb`'s layout, and
        // all-zero bytes are a valid `Tlb` (above).
        let mut t = unsafe { Box::from_raw(p) };
        t.fetch_gen = FETCH_GEN_STEP;
        t
    }

    fn fetch_changed(&mut self) {
        self.fetch_gen = self.fetch_gen.wrapping_add(FETCH_GEN_STEP);
    }

    /// Forgets everything, global pages included.
    pub(crate) fn flush_all(&mut self) {
        // Entry by entry, writing only live ones: a page of entries never
        // filled stays untouched host memory.
        for set in self.e.iter_mut() {
            for e in set.iter_mut().filter(|e| e.live()) {
                *e = INVALID;
            }
        }
        self.has_big = false;
        self.fetch_changed();
    }

    /// Forgets non-global entries (a CR3 load).
    pub(crate) fn flush_nonglobal(&mut self) {
        self.fetch_changed();
        for (i, set) in self.e.iter_mut().enumerate() {
            // Fetch sets use way 0 only.
            let used = if i < 2 { WAYS * TLB_SIZE } else { TLB_SIZE };
            for e in set[..used].iter_mut() {
                if !e.global && e.live() {
                    *e = INVALID;
                }
            }
        }
    }

    /// Forgets one linear page (INVLPG): the 4 KiB page, or every cached
    /// piece of the 4 MiB page that contains `lin` (SDM 4.10.4.1).
    pub(crate) fn flush_page(&mut self, lin: u32) {
        self.fetch_changed();
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        for set in self.e.iter_mut() {
            for way in 0..WAYS {
                if set[idx + way * TLB_SIZE].vtag == tag {
                    set[idx + way * TLB_SIZE] = INVALID;
                }
            }
        }
        if self.has_big {
            for set in self.e.iter_mut() {
                for e in set.iter_mut() {
                    if e.big && e.vtag != 0 && (e.vtag ^ lin) >> 22 == 0 {
                        *e = INVALID;
                    }
                }
            }
        }
    }

    /// Points the data entry for linear page `lin` at host memory `host`
    /// (readable and writable, physical page `phys`) until
    /// [`Tlb::restore_data`]: a LOCKed instruction runs on a scratch copy.
    pub(crate) fn redirect_data(
        &mut self,
        user: bool,
        lin: u32,
        phys: u64,
        host: usize,
    ) -> TlbEntry {
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        let e = &mut self.e[user as usize][idx];
        let saved = *e;
        *e = TlbEntry {
            vtag: tag,
            read_tag: tag,
            write_tag: tag,
            writable: true,
            global: false,
            big: false,
            phys: phys & !0xfff,
            host,
        };
        saved
    }

    /// Undoes [`Tlb::redirect_data`].
    pub(crate) fn restore_data(&mut self, user: bool, lin: u32, saved: TlbEntry) {
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        self.e[user as usize][idx] = saved;
    }

    /// Stops direct stores to a physical page (it now holds decoded code).
    pub(crate) fn drop_write_access(&mut self, phys_page: u64) {
        for set in self.e.iter_mut() {
            for e in set.iter_mut() {
                if e.vtag != 0 && e.phys >> 12 == phys_page {
                    e.write_tag = 0;
                }
            }
        }
    }
}

/// The TLB set for an access: data (0 supervisor, 1 user) or instruction
/// fetch (2, 3).
#[inline(always)]
fn tlb_set(kind: AccessKind, user: bool) -> usize {
    user as usize + if kind == AccessKind::Fetch { 2 } else { 0 }
}

impl Cpu {
    /// Reads `size` (1, 2, 4 or 8) bytes at a linear address with the
    /// current privilege.
    #[inline(always)]
    pub(crate) fn read_lin(&mut self, bus: &mut dyn Bus, lin: u32, size: u8) -> Result<u64, Exc> {
        let user = self.cpl == 3;
        let set = &self.tlb.e[user as usize];
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        let mut e = &set[idx];
        if e.read_tag != tag {
            e = &set[idx + TLB_SIZE];
        }
        if e.read_tag == tag && (lin & 0xfff) + size as u32 <= 0x1000 {
            let p = e.host + (lin & 0xfff) as usize;
            // SAFETY: `host` is the host address of a RAM page inside the
            // guest mapping (installed by `fill`), and the access stays in
            // that page.
            return Ok(unsafe { read_host(p as *const u8, size) });
        }
        self.read_lin_slow(bus, lin, size, user)
    }

    /// Writes `size` bytes at a linear address with the current privilege.
    #[inline(always)]
    pub(crate) fn write_lin(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        size: u8,
        val: u64,
    ) -> Result<(), Exc> {
        let user = self.cpl == 3;
        let set = &self.tlb.e[user as usize];
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        let mut e = &set[idx];
        if e.write_tag != tag {
            e = &set[idx + TLB_SIZE];
        }
        if e.write_tag == tag && (lin & 0xfff) + size as u32 <= 0x1000 {
            let p = e.host + (lin & 0xfff) as usize;
            // SAFETY: as in `read_lin`; pages with decoded code never get a
            // write tag, so this store cannot modify cached code.
            unsafe { write_host(p as *mut u8, size, val) };
            return Ok(());
        }
        self.write_lin_slow(bus, lin, size, val, user)
    }

    /// Reads with supervisor privilege regardless of CPL (descriptor tables,
    /// TSS, IDT: "implicit supervisor" accesses).
    pub(crate) fn read_lin_sys(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        size: u8,
    ) -> Result<u64, Exc> {
        self.read_lin_slow(bus, lin, size, false)
    }

    /// Writes with supervisor privilege regardless of CPL.
    pub(crate) fn write_lin_sys(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        size: u8,
        val: u64,
    ) -> Result<(), Exc> {
        self.write_lin_slow(bus, lin, size, val, false)
    }

    #[cold]
    fn read_lin_slow(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        size: u8,
        user: bool,
    ) -> Result<u64, Exc> {
        let end = lin.wrapping_add(size as u32 - 1);
        if (lin ^ end) & !0xfff != 0 {
            // Crosses a page: translate both pages before touching either.
            let first = 0x1000 - (lin & 0xfff);
            let p0 = self.translate(bus, lin, AccessKind::Read, user)?;
            let p1 = self.translate(bus, lin.wrapping_add(first), AccessKind::Read, user)?;
            let mut v = 0u64;
            for i in 0..size as u32 {
                let p = if i < first {
                    p0 + i as u64
                } else {
                    p1 + (i - first) as u64
                };
                v |= (self.read_phys(bus, p, 1)?) << (8 * i);
            }
            return Ok(v);
        }
        let p = self.translate(bus, lin, AccessKind::Read, user)?;
        self.read_phys(bus, p, size)
    }

    #[cold]
    fn write_lin_slow(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        size: u8,
        val: u64,
        user: bool,
    ) -> Result<(), Exc> {
        let end = lin.wrapping_add(size as u32 - 1);
        if (lin ^ end) & !0xfff != 0 {
            let first = 0x1000 - (lin & 0xfff);
            let p0 = self.translate(bus, lin, AccessKind::Write, user)?;
            let p1 = self.translate(bus, lin.wrapping_add(first), AccessKind::Write, user)?;
            for i in 0..size as u32 {
                let p = if i < first {
                    p0 + i as u64
                } else {
                    p1 + (i - first) as u64
                };
                self.write_phys(bus, p, 1, (val >> (8 * i)) & 0xff)?;
            }
            return Ok(());
        }
        let p = self.translate(bus, lin, AccessKind::Write, user)?;
        self.write_phys(bus, p, size, val)
    }

    /// Reads guest-physical memory: RAM directly, anything else from the bus.
    pub(crate) fn read_phys(&mut self, bus: &mut dyn Bus, phys: u64, size: u8) -> Result<u64, Exc> {
        if phys + size as u64 <= self.ram_size {
            // SAFETY: bounds checked against the RAM mapping just above.
            Ok(unsafe { read_host(self.ram_ptr.add(phys as usize), size) })
        } else {
            bus.device_time(self.icount);
            Ok(bus.mmio_read(phys, size))
        }
    }

    /// Writes guest-physical memory, invalidating decoded code it overwrites.
    pub(crate) fn write_phys(
        &mut self,
        bus: &mut dyn Bus,
        phys: u64,
        size: u8,
        val: u64,
    ) -> Result<(), Exc> {
        if phys + size as u64 <= self.ram_size {
            let page = phys >> 12;
            if self.is_code_page(page) {
                self.invalidate_code_page(page);
            }
            // SAFETY: bounds checked against the RAM mapping just above.
            unsafe { write_host(self.ram_ptr.add(phys as usize), size, val) };
            // Other CPUs' code, after the store (see `coherence`).
            self.stored_to_code(page);
            Ok(())
        } else {
            bus.device_time(self.icount);
            if bus.mmio_write(phys, size, val) == BusAction::Stop {
                // Finish the instruction (e.g. a PUSH's ESP update, a REP
                // iteration's register updates), then stop.
                self.pending_exit = Some(RunExit::BusStop);
                self.stop_block = true;
            }
            Ok(())
        }
    }

    /// Translates an instruction fetch at the current privilege.
    pub(crate) fn translate_fetch(&mut self, bus: &mut dyn Bus, lin: u32) -> Result<u64, Exc> {
        let user = self.cpl == 3;
        self.translate(bus, lin, AccessKind::Fetch, user)
    }

    /// Translates a linear address, walking the page tables on a TLB miss.
    /// Raises #PF (setting CR2) when the access is not allowed.
    #[inline]
    pub(crate) fn translate(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        kind: AccessKind,
        user: bool,
    ) -> Result<u64, Exc> {
        let set = tlb_set(kind, user);
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        for way in 0..WAYS {
            let e = &self.tlb.e[set][idx + way * TLB_SIZE];
            if e.vtag == tag && (kind != AccessKind::Write || e.writable) {
                return Ok(e.phys | (lin & 0xfff) as u64);
            }
        }
        self.translate_miss(bus, lin, kind, user)
    }

    #[cold]
    fn translate_miss(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        kind: AccessKind,
        user: bool,
    ) -> Result<u64, Exc> {
        let set = tlb_set(kind, user);
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        if self.st.cr0 & cr::CR0_PG == 0 {
            let phys = (lin & !0xfff) as u64;
            self.fill(set, idx, tag, phys, true, false);
            return Ok(phys | (lin & 0xfff) as u64);
        }
        self.walk(bus, lin, kind, user)
    }

    fn fill(&mut self, set: usize, idx: usize, tag: u32, phys: u64, writable: bool, global: bool) {
        let ram = phys + 0x1000 <= self.ram_size;
        let host = if ram {
            self.ram_ptr as usize + phys as usize
        } else {
            0
        };
        let code = self.is_code_page(phys >> 12);
        if set >= 2 {
            self.tlb.fetch_changed();
        }
        // Data sets: the newcomer takes way 0, way 0's entry moves to way 1
        // (unless it is an older translation of the same page).
        let ways = &mut self.tlb.e[set];
        if set < 2 && ways[idx].vtag != tag {
            ways[idx + TLB_SIZE] = ways[idx];
        }
        if ways[idx + TLB_SIZE].vtag == tag {
            ways[idx + TLB_SIZE] = INVALID;
        }
        let write_ok = ram && writable && !code && self.note_writable_page(phys >> 12);
        let ways = &mut self.tlb.e[set];
        ways[idx] = TlbEntry {
            vtag: tag,
            read_tag: if ram { tag } else { 0 },
            write_tag: if write_ok { tag } else { 0 },
            writable,
            global,
            big: false,
            phys,
            host,
        };
    }

    fn walk(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        kind: AccessKind,
        user: bool,
    ) -> Result<u64, Exc> {
        let write = kind == AccessKind::Write;
        let wp = self.st.cr0 & cr::CR0_WP != 0;
        // 32-bit or PAE paging (no long mode); EFER.NXE applies to PAE.
        let mode = if self.st.cr4 & cr::CR4_PAE != 0 {
            paging::Mode::Pae
        } else {
            paging::Mode::Bits32 {
                pse: self.st.cr4 & cr::CR4_PSE != 0,
            }
        };
        let acc = paging::Access {
            write,
            user,
            fetch: kind == AccessKind::Fetch,
            wp,
            nxe: self.st.efer & (1 << 11) != 0,
        };
        let cr3 = self.st.cr3;
        let mut tables = PhysTables { cpu: self, bus };
        let walked = paging::walk(&mut tables, mode, cr3, lin as u64, acc);
        if let Ok(w) = &walked {
            paging::set_accessed_dirty(&mut tables, w, mode, write);
        }
        let w = match walked {
            Ok(w) => w,
            Err(code) => {
                self.st.cr2 = lin as u64;
                return Err(Exc::fault_code(Vector::PF, code));
            }
        };
        let phys = w.page;
        let big = w.page_size > 0x1000;
        let may_write = w.may_write(user, wp);
        let global = w.global && self.st.cr4 & cr::CR4_PGE != 0;
        // Direct writes only once D is set, so that the first write sets it.
        let writable = may_write && (w.dirty || write);
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        self.fill(
            tlb_set(kind, user),
            idx,
            (lin & !0xfff) | 1,
            phys,
            writable,
            global,
        );
        if big {
            self.tlb.e[tlb_set(kind, user)][idx].big = true;
            self.tlb.has_big = true;
        }
        Ok(phys | (lin & 0xfff) as u64)
    }

    /// The host address of linear `lin` for direct access by a string
    /// instruction's fast path: translates (raising #PF, setting A/D) like an
    /// access of the first byte, then answers only when the TLB entry allows
    /// direct host access for the whole page (RAM, and for writes: writable,
    /// dirty, no decoded code). `None` means "take the per-element path".
    pub(crate) fn direct_ptr(
        &mut self,
        bus: &mut dyn Bus,
        lin: u32,
        write: bool,
    ) -> Result<Option<*mut u8>, Exc> {
        let user = self.cpl == 3;
        let kind = if write {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        self.translate(bus, lin, kind, user)?;
        let idx = ((lin >> 12) as usize) % TLB_SIZE;
        let tag = (lin & !0xfff) | 1;
        let set = &self.tlb.e[user as usize];
        let e = if set[idx].vtag == tag {
            &set[idx]
        } else {
            &set[idx + TLB_SIZE]
        };
        let ok = if write {
            e.write_tag == tag
        } else {
            e.read_tag == tag
        };
        Ok(ok.then(|| (e.host + (lin & 0xfff) as usize) as *mut u8))
    }

    /// Invalidates the translation of one linear page (INVLPG).
    pub(crate) fn invlpg(&mut self, lin: u32) {
        self.tlb.flush_page(lin);
    }

    /// Reads guest-linear memory for a debugger or a report, with supervisor
    /// privilege and without setting accessed bits. `None` where unmapped.
    pub fn peek_linear(&mut self, lin: u64, buf: &mut [u8]) -> Option<()> {
        for (i, b) in buf.iter_mut().enumerate() {
            let l = lin.wrapping_add(i as u64) as u32;
            let phys = self.peek_translate(l)?;
            let mut one = [0u8];
            self.ram.read(phys, &mut one).ok()?;
            *b = one[0];
        }
        Some(())
    }

    /// Writes guest-linear memory on behalf of the VMM (supervisor
    /// privilege, no accessed/dirty bits). `None` where unmapped.
    pub fn poke_linear(&mut self, lin: u64, data: &[u8]) -> Option<()> {
        for (i, b) in data.iter().enumerate() {
            let l = lin.wrapping_add(i as u64) as u32;
            let phys = self.peek_translate(l)?;
            // `GuestRam::write` records the page so decoded code is dropped.
            self.ram.write(phys, &[*b]).ok()?;
        }
        Some(())
    }

    fn peek_translate(&self, lin: u32) -> Option<u64> {
        paging::peek(&self.ram, &self.st, lin as u64)
    }
}

/// The CPU's view of guest-physical memory for its page walks: RAM, and
/// the bus beyond it (a table in unassigned memory reads all-ones).
struct PhysTables<'a> {
    cpu: &'a mut Cpu,
    bus: &'a mut dyn Bus,
}

impl paging::TableMemory for PhysTables<'_> {
    fn read_entry(&mut self, addr: u64, size: u8) -> u64 {
        self.cpu.read_phys(self.bus, addr, size).unwrap_or(u64::MAX)
    }
    fn write_entry(&mut self, addr: u64, size: u8, value: u64) {
        let _ = self.cpu.write_phys(self.bus, addr, size, value);
    }
}

/// Reads `size` little-endian bytes from host memory.
///
/// # Safety
/// `p` must be valid for `size` bytes of reads.
#[inline(always)]
unsafe fn read_host(p: *const u8, size: u8) -> u64 {
    // SAFETY: the caller guarantees `p..p+size` is readable; unaligned reads
    // are allowed by `read_unaligned`.
    unsafe {
        match size {
            1 => *p as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Writes `size` little-endian bytes to host memory.
///
/// # Safety
/// `p` must be valid for `size` bytes of writes.
#[inline(always)]
unsafe fn write_host(p: *mut u8, size: u8, v: u64) {
    // SAFETY: the caller guarantees `p..p+size` is writable.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_all_zero_entry_is_invalid() {
        let t = Tlb::new();
        assert_eq!(t.fetch_gen, FETCH_GEN_STEP);
        assert!(!t.has_big);
        for set in t.e.iter() {
            for e in set.iter() {
                let fields = (
                    e.vtag,
                    e.read_tag,
                    e.write_tag,
                    e.writable,
                    e.global,
                    e.big,
                    e.phys,
                    e.host,
                );
                let invalid = (
                    INVALID.vtag,
                    INVALID.read_tag,
                    INVALID.write_tag,
                    INVALID.writable,
                    INVALID.global,
                    INVALID.big,
                    INVALID.phys,
                    INVALID.host,
                );
                assert_eq!(fields, invalid);
            }
        }
    }
}
