//! The CPU object: state plus the run loop, the decoded-block cache and the
//! configuration an engine sets (CPUID model, intercepts, hooks).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use popek_memory::GuestRam;

use crate::bus::Bus;
use crate::coherence::CodeMap;
use crate::cpuid::CpuidModel;
use crate::decode::{decode_block, Block, DecodedInsn};
use crate::exception::{Exc, Vector};
use crate::flags::{FlagOp, LazyFlags};
use crate::mmu::Tlb;
use crate::state::{cr, flags, seg, CpuState};
use crate::vendor::Vendor;

/// Why [`Cpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// The instruction budget is used up.
    Budget,
    /// HLT: the CPU waits for an interrupt (`state().halted` is set).
    Halted,
    /// Triple fault (or another shutdown condition): the CPU stopped.
    Shutdown,
    /// An exception whose vector is in [`Cpu::exception_bitmap`] was raised.
    /// RIP and the state are as at the faulting instruction (for faults) and
    /// nothing was delivered through the IDT.
    Exception {
        /// The vector.
        vector: u8,
        /// The error code, if the exception has one.
        error_code: Option<u32>,
        /// True for software interrupts (INT n/INT3/INTO): RIP already points
        /// after the instruction.
        software: bool,
    },
    /// `IN` from the hypercall port at CPL 0: RIP points after the `IN`; the
    /// monitor handles the call and puts the result in EAX.
    Hypercall,
    /// A device asked the CPU to stop (after the instruction completed).
    BusStop,
}

/// Configuration and statistics counters.
#[derive(Clone, Debug, Default)]
pub struct CpuStats {
    /// Blocks decoded.
    pub blocks_decoded: u64,
    /// Block cache invalidations (pages).
    pub invalidations: u64,
    /// Times the decoded-block cache was emptied because it reached its
    /// bound ([`Cpu::set_block_cache_limit`]).
    pub block_cache_flushes: u64,
    /// Exceptions and interrupts delivered.
    pub deliveries: u64,
}

/// One software x86 CPU attached to guest RAM.
pub struct Cpu {
    /// Architectural state. The arithmetic flags in `st.rflags` are stale
    /// while `lazy.op != Eager`: use [`Cpu::state`] / [`Cpu::state_mut`].
    pub(crate) st: CpuState,
    pub(crate) lazy: LazyFlags,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) ram_ptr: *mut u8,
    pub(crate) ram_size: u64,
    pub(crate) tlb: Box<Tlb>,
    pub(crate) blocks: HashMap<u64, Rc<Block>>,
    /// Direct-mapped front of `blocks`: most lookups end here.
    pub(crate) fast_blocks: Box<[FastSlot]>,
    pub(crate) page_blocks: HashMap<u64, Vec<u64>>,
    pub(crate) code_pages: Vec<u64>,
    /// RAM pages some TLB entry may have granted fast writes to since the
    /// page was last made code (a bit per page): marking a page as code
    /// scans the TLB only for these.
    writable_pages: Vec<u64>,
    /// Estimated bytes in `blocks` (see [`BLOCK_CACHE_BYTES`]).
    block_cache_bytes: usize,
    /// The bound of `block_cache_bytes`.
    block_cache_limit: usize,
    /// Per segment register: fast-path permission bits (see `seg.rs`).
    pub(crate) seg_ok: [u8; 6],
    /// CPL, cached.
    pub(crate) cpl: u8,
    /// Address of the instruction after the current one; jumps change it.
    pub(crate) next_ip: u64,
    /// End the current block after this instruction.
    pub(crate) stop_block: bool,
    /// An exit a device asked for in the middle of an instruction (a
    /// `BusAction::Stop` from an MMIO write or a REP OUTS iteration): the
    /// instruction (or the iteration) completes, then `run` returns it.
    pub(crate) pending_exit: Option<RunExit>,
    /// State was handed out mutably: re-derive caches before running.
    pub(crate) needs_refresh: bool,
    /// CR0, CR3, CR4 and EFER when [`Cpu::state_mut`] handed out the state.
    paging_key: (u64, u64, u64, u64),
    /// Instructions retired.
    pub icount: u64,
    /// Events (exceptions, interrupts) `run` delivered, each counted
    /// against its budget like an instruction: engines that call `run` in
    /// pieces count them the same way, so that a guest stuck in an
    /// exception loop gets the same number of deliveries on every engine.
    pub events_delivered: u64,
    /// RIP of the instruction that completed with the last exit from `run`
    /// (a software interrupt stopped by the exception bitmap, a hypercall,
    /// a device stop): RIP itself is already past it.
    pub exit_ip: u64,
    /// CPUID answers.
    pub cpuid: CpuidModel,
    /// Exceptions (bit per vector) that stop `run` instead of being
    /// delivered through the guest's IDT, like the VMX exception bitmap.
    pub exception_bitmap: u32,
    /// Also stop at software interrupts (INT n) with `RunExit::Exception`.
    pub intercept_soft_int: bool,
    /// Report sensitive-unprivileged instructions to [`Bus::sensitive`].
    pub report_sensitive: bool,
    /// `IN` from this port at CPL 0 stops with `RunExit::Hypercall`.
    pub hypercall_port: Option<u16>,
    /// Counters.
    pub stats: CpuStats,
    /// Physical pages whose decoded code was invalidated since the last
    /// [`Cpu::take_invalidated_pages`], recorded while
    /// `track_invalidations` is set (`u64::MAX` means "everything", after
    /// [`Cpu::flush_code_cache`]). The binary translator drops its
    /// translations of these pages.
    invalidated: Vec<u64>,
    /// Record invalidated code pages for [`Cpu::take_invalidated_pages`].
    pub track_invalidations: bool,
    /// The code map shared with CPUs on other host threads, and this CPU's
    /// index in it (see [`crate::coherence`]); `None` when this CPU is the
    /// only one running guest code at any time.
    pub(crate) shared: Option<(Arc<CodeMap>, usize)>,
    /// A page of scratch memory a LOCKed instruction works on while it is
    /// made atomic (see `exec::locked`).
    pub(crate) lock_scratch: Box<[u64; 512]>,
    /// Under the AMD profile, whether BSF/BSR keep the flags other than
    /// ZF; `None`: as the host's AMD generation does
    /// ([`crate::vendor::amd_bitscan_keeps_flags`]).
    pub(crate) amd_bitscan_keeps: Option<bool>,
}

/// One entry of the direct-mapped block cache: key and block.
type FastSlot = Option<(u64, Rc<Block>)>;

/// Entries of the direct-mapped block cache.
const FAST_BLOCKS: usize = 4096;

#[inline(always)]
fn fast_slot(key: u64) -> usize {
    ((key ^ (key >> 12) ^ (key >> 40)) as usize) & (FAST_BLOCKS - 1)
}

/// Largest number of instructions in one decoded block.
pub(crate) const MAX_BLOCK: usize = 64;

/// Default bound of the decoded-block cache (its instructions, blocks and
/// index entries, estimated): when a new block would pass it, the whole
/// cache is emptied and fills again with what runs (a guest that executes
/// every byte of its memory must not grow popek without bound). Debian's
/// boot on `interp` keeps about 34 MiB of blocks; a flush costs it the
/// decoding of what it runs next.
pub const BLOCK_CACHE_BYTES: usize = 16 << 20;

/// Estimated bytes a cached block of `n` instructions takes.
fn block_bytes(n: usize) -> usize {
    n * std::mem::size_of::<DecodedInsn>() + std::mem::size_of::<Block>() + 96
}

impl Cpu {
    /// A CPU in the RESET state attached to `ram`.
    pub fn new(ram: Arc<GuestRam>) -> Cpu {
        let ram_ptr = ram.host_ptr();
        let ram_size = ram.size();
        let pages = ram_size.div_ceil(4096);
        let mut cpu = Cpu {
            st: CpuState::reset(),
            lazy: LazyFlags::default(),
            ram,
            ram_ptr,
            ram_size,
            tlb: Tlb::new(),
            blocks: HashMap::new(),
            fast_blocks: (0..FAST_BLOCKS).map(|_| None).collect(),
            page_blocks: HashMap::new(),
            code_pages: vec![0; pages.div_ceil(64) as usize],
            writable_pages: vec![0; pages.div_ceil(64) as usize],
            block_cache_bytes: 0,
            block_cache_limit: BLOCK_CACHE_BYTES,
            seg_ok: [0; 6],
            cpl: 0,
            next_ip: 0,
            stop_block: false,
            pending_exit: None,
            needs_refresh: false,
            paging_key: (0, 0, 0, 0),
            icount: 0,
            events_delivered: 0,
            exit_ip: 0,
            cpuid: CpuidModel::for_vendor(CpuState::reset().vendor),
            exception_bitmap: 0,
            intercept_soft_int: false,
            report_sensitive: false,
            hypercall_port: None,
            stats: CpuStats::default(),
            invalidated: Vec::new(),
            track_invalidations: false,
            shared: None,
            lock_scratch: Box::new([0; 512]),
            amd_bitscan_keeps: None,
        };
        cpu.refresh_all();
        cpu
    }

    /// Under the AMD profile, makes BSF/BSR keep the flags other than ZF
    /// (Zen 3) or not (Zen 4); `None`: as the host's AMD generation does.
    /// For replaying results recorded on another generation.
    pub fn set_amd_bitscan_keeps_flags(&mut self, keeps: Option<bool>) {
        self.amd_bitscan_keeps = keeps;
    }

    /// Whether BSF/BSR keep the flags other than ZF under the profile at
    /// hand.
    pub(crate) fn bitscan_keeps_flags(&self) -> bool {
        self.st.vendor == Vendor::Amd
            && self
                .amd_bitscan_keeps
                .unwrap_or_else(crate::vendor::amd_bitscan_keeps_flags)
    }

    /// The vendor profile the CPU follows.
    #[inline(always)]
    pub fn vendor(&self) -> Vendor {
        self.st.vendor
    }

    /// The architectural state, with the flags materialized.
    pub fn state(&mut self) -> &CpuState {
        self.sync_flags();
        &self.st
    }

    /// Mutable architectural state. Changing control registers, segments or
    /// mode through this is allowed; the CPU re-derives its caches, and
    /// flushes its TLB when CR0, CR3, CR4 or EFER changed (a monitor that
    /// changes the page tables the CPU walks flushes it itself, as MOV to
    /// CR3 or INVLPG would on hardware).
    pub fn state_mut(&mut self) -> &mut CpuState {
        self.sync_flags();
        if !self.needs_refresh {
            self.paging_key = (self.st.cr0, self.st.cr3, self.st.cr4, self.st.efer);
        }
        self.dirty_state_pending();
        &mut self.st
    }

    /// Replaces the whole architectural state (restore, boot entry).
    pub fn set_state(&mut self, state: CpuState) {
        self.st = state;
        self.lazy.op = FlagOp::Eager;
        self.refresh_all();
    }

    /// A pointer to the architectural state for code generated by a binary
    /// translator, with the arithmetic flags materialized (so `rflags` is
    /// authoritative while the pointer is used).
    ///
    /// Generated code may change only what no cache of the CPU derives
    /// from: the GPRs, RIP, the arithmetic flags and IF in `rflags`, and
    /// `interrupt_shadow`. Anything else must go through
    /// [`Cpu::state_mut`]. The pointer is valid while the `Cpu` is neither
    /// moved nor otherwise borrowed.
    pub fn state_ptr(&mut self) -> *mut CpuState {
        self.sync_flags();
        &mut self.st
    }

    /// Sets a general-purpose register (index as in [`CpuState::gpr`])
    /// without the cache re-derivation [`Cpu::state_mut`] implies: for a
    /// monitor completing an instruction it emulated.
    pub fn set_gpr(&mut self, index: usize, value: u64) {
        self.st.gpr[index & 15] = value;
    }

    /// Sets EIP without re-deriving caches (see [`Cpu::set_gpr`]).
    pub fn set_rip(&mut self, rip: u64) {
        self.st.rip = rip;
    }

    /// Tells the CPU that something outside it wrote physical memory: code
    /// it decoded from those pages is dropped (cheaper than
    /// `GuestRam::write`'s page record when the writer holds the CPU).
    pub fn note_phys_write(&mut self, phys: u64, len: u64) {
        if len == 0 {
            return;
        }
        for page in (phys >> 12)..=((phys + len - 1) >> 12) {
            self.invalidate_code_page(page);
        }
    }

    /// Flushes the whole TLB, as a monitor does after changing page tables
    /// the CPU walks (MOV to CR3 on the real CPU).
    pub fn flush_tlb(&mut self) {
        self.tlb.flush_all();
    }

    /// Flushes the TLB entries of one linear page (INVLPG on the real CPU).
    pub fn flush_tlb_page(&mut self, lin: u32) {
        self.invlpg(lin);
    }

    /// What [`Cpu::run`] does on entry, for engines that execute guest code
    /// themselves between runs: re-derives the caches after
    /// [`Cpu::state_mut`]/[`Cpu::set_state`] and drops decoded code from
    /// pages written from outside the CPU (`GuestRam::take_external_writes`).
    pub fn prepare(&mut self) {
        if self.needs_refresh {
            let key = (self.st.cr0, self.st.cr3, self.st.cr4, self.st.efer);
            if key == self.paging_key {
                self.refresh_segments();
            } else {
                self.refresh_all();
            }
        }
        self.serve_requests();
        if self.ram.has_external_writes() {
            for page in self.ram.take_external_writes() {
                self.invalidate_code_page(page);
                // Other CPUs' code too (whichever CPU takes them).
                self.stored_to_code(page);
            }
        }
    }

    /// The physical address of the instruction at CS:EIP, as a fetch at the
    /// current privilege would translate it (setting accessed bits). `None`
    /// when the fetch would fault: [`Cpu::run`] then raises the fault (CR2
    /// may already hold the faulting address, as it will after the fault).
    pub fn fetch_phys(&mut self, bus: &mut dyn Bus) -> Option<u64> {
        if self.st.rip > self.st.seg[seg::CS].limit as u64 {
            return None;
        }
        let lin = self.st.seg[seg::CS].base.wrapping_add(self.st.rip) as u32;
        self.translate_fetch(bus, lin).ok()
    }

    /// Marks a physical page as holding code translated by an engine: stores
    /// to it take the slow path and invalidate it (see
    /// [`Cpu::take_invalidated_pages`]).
    pub fn mark_translated_page(&mut self, page: u64) {
        self.mark_code_page(page);
    }

    /// True when [`Cpu::take_invalidated_pages`] has something.
    #[inline]
    pub fn has_invalidated_pages(&self) -> bool {
        !self.invalidated.is_empty()
    }

    /// The code pages invalidated since the last call (see
    /// `track_invalidations`).
    pub fn take_invalidated_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.invalidated)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    fn dirty_state_pending(&mut self) {
        // The caller may change anything: rederive at the next run.
        self.needs_refresh = true;
    }

    /// Re-derives cached state (CPL, segment fast paths) and flushes the TLB.
    pub(crate) fn refresh_all(&mut self) {
        self.refresh_segments();
        self.tlb.flush_all();
    }

    /// Re-derives the CPL and the segment fast paths.
    fn refresh_segments(&mut self) {
        self.needs_refresh = false;
        if self.cpuid.vendor != self.st.vendor {
            // A new profile (restored state, `--cpu-vendor`): CPUID follows.
            self.cpuid = CpuidModel::for_vendor(self.st.vendor);
        }
        self.cpl = self.st.cpl();
        for s in 0..6 {
            self.refresh_seg(s);
        }
    }

    /// Writes the lazily held arithmetic flags into `st.rflags`.
    #[inline]
    pub(crate) fn sync_flags(&mut self) {
        if self.lazy.op != FlagOp::Eager {
            let f = self.lazy.materialize();
            self.st.rflags = (self.st.rflags & !(flags::ARITH as u64)) | f as u64;
            self.lazy.op = FlagOp::Eager;
        }
    }

    /// EFLAGS with the arithmetic flags materialized (does not change state).
    #[inline]
    pub(crate) fn eflags(&self) -> u32 {
        if self.lazy.op == FlagOp::Eager {
            self.st.rflags as u32
        } else {
            (self.st.rflags as u32 & !flags::ARITH) | self.lazy.materialize()
        }
    }

    /// Sets the six arithmetic flags eagerly.
    #[inline]
    pub(crate) fn set_arith_flags(&mut self, f: u32) {
        self.lazy.op = FlagOp::Eager;
        self.st.rflags = (self.st.rflags & !(flags::ARITH as u64)) | (f & flags::ARITH) as u64;
    }

    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        self.cpl
    }

    /// True in protected mode (including virtual-8086 mode).
    #[inline]
    pub(crate) fn protected(&self) -> bool {
        self.st.cr0 & cr::CR0_PE != 0
    }

    /// True in virtual-8086 mode.
    #[inline]
    pub(crate) fn v86(&self) -> bool {
        self.st.rflags & flags::VM as u64 != 0
    }

    /// Default code size of CS: 2 or 4 bytes.
    #[inline]
    pub(crate) fn code_size(&self) -> u8 {
        if self.st.seg[seg::CS].big() && !self.v86() {
            4
        } else {
            2
        }
    }

    /// Runs until `budget` instructions have retired or something needs the
    /// caller. Never panics on guest behaviour.
    pub fn run(&mut self, bus: &mut dyn Bus, budget: u64) -> RunExit {
        self.prepare();
        // A block end asked for outside the loop (a state change by the
        // monitor) has nothing to end: the loop looks the block up anyway,
        // and left set it would cut the first REP chunk short.
        self.stop_block = false;
        let end = self.icount.saturating_add(budget);
        // Events delivered without an instruction retiring (an exception
        // whose handler faults again, an interrupt storm) count against the
        // budget too, so `run` always returns to its caller even when the
        // guest makes no progress at all.
        let mut stalls = 0u64;
        loop {
            if let Some(x) = self.pending_exit.take() {
                return x;
            }
            if self.icount.saturating_add(stalls) >= end {
                return RunExit::Budget;
            }
            self.serve_requests();
            let mut single = false;
            if self.st.interrupt_shadow {
                // The shadow covers exactly the next instruction.
                self.st.interrupt_shadow = false;
                single = true;
            } else if !self.st.nmi_blocked && bus.nmi_pending() {
                // NMI comes before INTR and ignores IF; it blocks further
                // NMIs until the next IRET.
                bus.acknowledge_nmi();
                self.st.halted = false;
                if let Err(exit) = self.deliver_external(bus, 2) {
                    return exit;
                }
                self.st.nmi_blocked = true;
                stalls += 1;
                self.events_delivered += 1;
                continue;
            } else if self.st.rflags & flags::IF as u64 != 0 && bus.interrupt_pending() {
                let vector = bus.acknowledge_interrupt();
                self.st.halted = false;
                if let Err(exit) = self.deliver_external(bus, vector) {
                    return exit;
                }
                stalls += 1;
                self.events_delivered += 1;
                continue;
            }
            if self.st.halted {
                return RunExit::Halted;
            }
            let tf = self.st.rflags & flags::TF as u64 != 0;
            let block = match self.lookup_block(bus) {
                Ok(b) => b,
                Err(Exc::Fault { vector, code }) => {
                    stalls += 1;
                    self.events_delivered += 1;
                    if let Err(exit) = self.fault(bus, vector, code) {
                        return exit;
                    }
                    continue;
                }
                Err(Exc::Exit(x)) => return x,
            };
            // Events delivered in this run count against the budget too: a
            // block does not run past it (as `bt`'s dispatcher does not).
            let mut n = block.insns.len().min((end - self.icount - stalls) as usize);
            if single || tf {
                n = 1;
            }
            let ip_mask = if self.code_size() == 4 {
                0xffff_ffff
            } else {
                0xffff
            };
            // Fetches past the CS limit raise #GP(0) (SDM 5.3); check each
            // instruction only when the block reaches beyond the limit.
            let cs_limit = self.st.seg[seg::CS].limit as u64;
            let check_limit = self.st.rip + block.len as u64 > cs_limit + 1;
            let deliveries = self.stats.deliveries;
            let mut completed = false;
            for d in &block.insns[..n] {
                if check_limit && self.st.rip + d.len as u64 > cs_limit + 1 {
                    stalls += 1;
                    self.events_delivered += 1;
                    if let Err(exit) = self.fault(bus, Vector::GP as u8, Some(0)) {
                        return exit;
                    }
                    break;
                }
                self.next_ip = (self.st.rip + d.len as u64) & ip_mask;
                match (d.handler)(self, d, bus) {
                    Ok(()) => {
                        self.st.rip = self.next_ip;
                        self.icount += 1;
                        completed = true;
                    }
                    Err(Exc::Fault { vector, code }) => {
                        self.stop_block = false;
                        stalls += 1;
                        self.events_delivered += 1;
                        if let Err(exit) = self.fault(bus, vector, code) {
                            return exit;
                        }
                        break;
                    }
                    Err(Exc::Exit(x)) => {
                        self.exit_ip = self.st.rip;
                        self.st.rip = self.next_ip;
                        self.icount += 1;
                        self.stop_block = false;
                        return x;
                    }
                }
                if self.stop_block {
                    self.stop_block = false;
                    break;
                }
            }
            if tf && n == 1 && completed && self.stats.deliveries == deliveries {
                // Single-step trap after the instruction (SDM 17.3.1.4);
                // not after one that faulted or was INT n/INT3/INTO (the
                // delivery cleared TF before the handler's first
                // instruction).
                self.st.dr[6] |= 1 << 14;
                if let Err(exit) = self.deliver_trap(bus, Vector::DB as u8) {
                    return exit;
                }
            }
        }
    }

    /// Handles a fault raised by an instruction: either stops for the
    /// monitor or delivers it through the IDT.
    fn fault(&mut self, bus: &mut dyn Bus, vector: u8, code: Option<u32>) -> Result<(), RunExit> {
        if self.exception_bitmap & (1 << vector) != 0 {
            self.sync_flags();
            return Err(RunExit::Exception {
                vector,
                error_code: code,
                software: false,
            });
        }
        self.deliver_exception(bus, vector, code)
    }

    /// Finds or decodes the block at CS:EIP.
    fn lookup_block(&mut self, bus: &mut dyn Bus) -> Result<Rc<Block>, Exc> {
        if self.st.rip > self.st.seg[seg::CS].limit as u64 {
            // The limit check comes before paging (SDM 5.3).
            return Err(Exc::gp(0));
        }
        let lin = self.st.seg[seg::CS].base.wrapping_add(self.st.rip) as u32;
        let phys = self.translate_fetch(bus, lin)?;
        let key = phys | ((self.code_size() as u64) << 40);
        let slot = fast_slot(key);
        if let Some((k, b)) = &self.fast_blocks[slot] {
            if *k == key && b.ip == self.st.rip {
                return Ok(b.clone());
            }
        }
        if let Some(b) = self.blocks.get(&key) {
            // The same physical code reached at another EIP (an alias)
            // has other branch targets: decode it again.
            if b.ip == self.st.rip {
                let b = b.clone();
                self.fast_blocks[slot] = Some((key, b.clone()));
                return Ok(b);
            }
        }
        if self.shared.is_some() {
            // Marked before its bytes are read: a store by another CPU
            // after the read then sees the mark and invalidates.
            self.mark_code_page(phys >> 12);
        }
        let block = decode_block(self, bus, lin, phys)?;
        self.stats.blocks_decoded += 1;
        let block = Rc::new(block);
        if block.cacheable {
            let bytes = block_bytes(block.insns.len());
            if self.block_cache_bytes + bytes > self.block_cache_limit {
                self.drop_blocks();
                self.stats.block_cache_flushes += 1;
            }
            let page = phys >> 12;
            self.mark_code_page(page);
            self.block_cache_bytes += bytes;
            match self.blocks.insert(key, block.clone()) {
                // An alias (same code, another EIP) replaced its block.
                Some(old) => self.block_cache_bytes -= block_bytes(old.insns.len()),
                None => self.page_blocks.entry(page).or_default().push(key),
            }
            self.fast_blocks[slot] = Some((key, block.clone()));
        }
        Ok(block)
    }

    pub(crate) fn is_code_page(&self, page: u64) -> bool {
        self.code_pages
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    pub(crate) fn mark_code_page(&mut self, page: u64) {
        if let Some((map, me)) = self.shared.clone() {
            // The other CPUs first stop storing to it fast (they may wait
            // for this one to do the same for a page of theirs).
            map.mark_code(me, page, |pages| {
                for p in pages {
                    self.drop_fast_writes(p);
                }
            });
        }
        if let Some(w) = self.code_pages.get_mut((page / 64) as usize) {
            if *w & (1 << (page % 64)) == 0 {
                *w |= 1 << (page % 64);
                // Stores to this page must now take the slow path (a scan
                // of the whole TLB, only if it may hold a write entry).
                if let Some(x) = self.writable_pages.get_mut((page / 64) as usize) {
                    if *x & (1 << (page % 64)) != 0 {
                        *x &= !(1 << (page % 64));
                        self.tlb.drop_write_access(page);
                    }
                }
            }
        }
    }

    /// A TLB entry is about to grant fast writes to RAM page `page`, which
    /// holds none of this CPU's code: false when it must not, because
    /// another CPU has code there.
    #[inline]
    pub(crate) fn note_writable_page(&mut self, page: u64) -> bool {
        if let Some(x) = self.writable_pages.get_mut((page / 64) as usize) {
            let bit = 1 << (page % 64);
            let new = *x & bit == 0;
            *x |= bit;
            if let Some((map, me)) = &self.shared {
                return if new {
                    !map.note_writable(*me, page)
                } else {
                    map.code_mask(page) == 0
                };
            }
        }
        true
    }

    /// No TLB entry lets stores through to `page` any more (another CPU
    /// has code there).
    fn drop_fast_writes(&mut self, page: u64) {
        if let Some(x) = self.writable_pages.get_mut((page / 64) as usize) {
            *x &= !(1 << (page % 64));
        }
        self.tlb.drop_write_access(page);
        if let Some((map, me)) = &self.shared {
            map.unmark_writable(*me, page);
        }
    }

    /// After a store to RAM page `page`: the other CPUs with code there
    /// throw it away.
    #[inline]
    pub(crate) fn stored_to_code(&self, page: u64) {
        if let Some((map, me)) = &self.shared {
            map.stored(*me, page);
        }
    }

    /// Runs on host threads alongside other CPUs: shares `map` with them as
    /// CPU `index`. Makes LOCKed instructions atomic on the host, and
    /// forgets decoded code and TLB entries (they were made unshared).
    pub fn share_code_map(&mut self, map: Arc<CodeMap>, index: usize) {
        assert!(index < map.cpus());
        self.shared = Some((map, index));
        self.tlb.flush_all();
        self.writable_pages.iter_mut().for_each(|w| *w = 0);
        self.code_pages.iter_mut().for_each(|w| *w = 0);
        self.flush_code_cache();
    }

    /// Whether this CPU shares a code map with CPUs on other threads.
    pub fn shares_code(&self) -> bool {
        self.shared.is_some()
    }

    /// Enters (true) or leaves (false) guest code, for the CPUs sharing its
    /// code map: an engine calls it around its run. On entry it serves
    /// what the others asked for meanwhile.
    pub fn set_running(&mut self, running: bool) {
        if let Some((map, me)) = &self.shared {
            map.set_running(*me, running);
            if running {
                self.serve_requests();
            }
        }
    }

    /// Serves the other CPUs' requests (drop write access, throw code away),
    /// if any: at block and dispatch boundaries.
    #[inline]
    pub fn serve_requests(&mut self) {
        let Some((map, me)) = &self.shared else {
            return;
        };
        if !map.has_requests(*me) {
            return;
        }
        let r = map.take_requests(*me);
        for p in r.drop_write {
            self.drop_fast_writes(p);
        }
        for p in r.invalidate {
            self.invalidate_code_page(p);
        }
    }

    /// Throws away decoded code from a physical page (self-modifying code,
    /// DMA, loaders).
    pub(crate) fn invalidate_code_page(&mut self, page: u64) {
        if !self.is_code_page(page) {
            return;
        }
        if let Some(w) = self.code_pages.get_mut((page / 64) as usize) {
            *w &= !(1 << (page % 64));
        }
        if let Some((map, me)) = &self.shared {
            map.unmark_code(*me, page);
        }
        if let Some(keys) = self.page_blocks.remove(&page) {
            for k in keys {
                if let Some(b) = self.blocks.remove(&k) {
                    self.block_cache_bytes -= block_bytes(b.insns.len());
                }
                let slot = fast_slot(k);
                if matches!(&self.fast_blocks[slot], Some((fk, _)) if *fk == k) {
                    self.fast_blocks[slot] = None;
                }
            }
        }
        self.stats.invalidations += 1;
        if self.track_invalidations {
            self.invalidated.push(page);
        }
        self.stop_block = true;
    }

    /// Drops every decoded block (e.g. after restoring memory).
    pub fn flush_code_cache(&mut self) {
        self.drop_blocks();
        if self.track_invalidations {
            self.invalidated.push(u64::MAX);
        }
    }

    /// Empties the decoded-block cache. Pages stay marked as code (their
    /// stores keep taking the slow path): the binary translator's
    /// translations of them live on and need their invalidations.
    fn drop_blocks(&mut self) {
        self.fast_blocks.iter_mut().for_each(|b| *b = None);
        self.blocks = HashMap::new();
        self.page_blocks = HashMap::new();
        self.block_cache_bytes = 0;
        if !self.track_invalidations {
            self.code_pages.iter_mut().for_each(|w| *w = 0);
            if let Some((map, me)) = &self.shared {
                map.unmark_all(*me);
            }
        }
    }

    /// Estimated bytes held by the decoded-block cache.
    pub fn block_cache_bytes(&self) -> usize {
        self.block_cache_bytes
    }

    /// Sets the bound of the decoded-block cache (default
    /// [`BLOCK_CACHE_BYTES`]; the binary translator, whose CPU decodes
    /// only cold code, keeps it smaller).
    pub fn set_block_cache_limit(&mut self, bytes: usize) {
        self.block_cache_limit = bytes;
    }
}
