//! The `trap` engine: classic trap-and-emulate on popek's software CPU.
//!
//! The guest kernel runs at ring 1, its user code at ring 3. The monitor
//! (this crate: host code standing in for a ring-0 VMM) receives every
//! exception the CPU raises before any IDT delivery (the CPU's exception
//! bitmap) and:
//!
//! - emulates privileged instructions on a virtual CPU ([`Virt`]): CR0/2/3/4,
//!   GDTR/IDTR/LDTR/TR, the interrupt flag, IOPL, port I/O, HLT, MSRs;
//! - reflects exceptions, `INT n` and external interrupts into the guest
//!   through the guest's own IDT at virtual ring 0;
//! - keeps shadow page tables (gvp → hpp, [`shadow`]) over a shuffled
//!   physical map ([`phys`]), resolving hidden faults and reflecting true
//!   ones;
//! - records every sensitive-unprivileged instruction the CPU reports
//!   ([`audit`]): the x86 gap, made visible.
//!
//! The return to user mode reaches the monitor by ordinary x86 means: while
//! the guest kernel runs, the shadow descriptors of the guest's DPL-3
//! segments are not present, so its `IRET` to ring 3 faults with #NP.
//! See `docs/trap-and-emulate.md`.

#![warn(missing_docs)]

pub mod audit;
pub mod desc;
pub mod phys;
pub mod shadow;

use std::collections::BTreeMap;
use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, Mnemonic, OpKind, Register};
use popek_cpu::seg::Descriptor;
use popek_cpu::state::{cr, flags, seg, Msrs, Segment, TableReg};
use popek_cpu::{Cpu, CpuState, RunExit, SensitiveEvent, SensitiveKind};
use popek_engine::bus::MachineBus;
use popek_engine::factory::software_cpu_can_run;
use popek_engine::hypercall::HYPERCALL_PORT;
use popek_engine::{AuditRow, Engine, EngineError, EngineFactory, GuestMode, Inspect, VmExit};
use popek_machine::Machine;
use popek_memory::GuestRam;
use popek_memory::MemoryError;

use audit::{Audit, IfLoss};
use desc::SEG_TOP;
use phys::PhysMap;
use shadow::{pte, Shadow, GDT_PAGE, IDT_PAGE, TSS_PAGE, VMM_LINEAR};

const NAME: &str = "trap";

/// The guest-visible CPU state the monitor keeps: what a ring-0 kernel
/// believes the privileged registers hold.
#[derive(Clone, Debug, Default)]
pub struct Virt {
    /// CR0.
    pub cr0: u64,
    /// CR2: the guest's last page-fault address.
    pub cr2: u64,
    /// CR3: the guest's page directory (guest-physical).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// GDTR (guest linear).
    pub gdtr: TableReg,
    /// IDTR (guest linear).
    pub idtr: TableReg,
    /// LDTR.
    pub ldtr: Segment,
    /// TR (the guest's TSS).
    pub tr: Segment,
    /// EFLAGS.IF.
    pub vif: bool,
    /// EFLAGS.IOPL.
    pub iopl: u8,
    /// HLT: waiting for an interrupt.
    pub halted: bool,
    /// DR0–DR7.
    pub dr: [u64; 8],
    /// MSRs.
    pub msr: Msrs,
}

/// Trap and memory-virtualization counters.
#[derive(Clone, Debug, Default)]
pub struct TrapStats {
    /// Traps handled, by kind.
    pub traps: BTreeMap<String, u64>,
    /// All traps.
    pub total: u64,
    /// Hidden page faults (shadow misses the guest never sees).
    pub hidden_pf: u64,
    /// True page faults reflected to the guest.
    pub true_pf: u64,
    /// Stores to write-protected guest page tables (and other stores the
    /// monitor completed).
    pub wp_traps: u64,
    /// Guest CR3 loads.
    pub cr3_switches: u64,
    /// Events (exceptions, INT n, interrupts) delivered into the guest.
    pub reflected: u64,
}

/// What a handler tells the run loop.
enum Flow {
    Continue,
    Exit(VmExit),
}

type Handled = Result<Flow, EngineError>;

/// An event to deliver through the guest's IDT.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// A CPU exception (RIP at the faulting instruction, or after it for
    /// traps).
    Exception(u8, Option<u32>),
    /// `INT n`/`INT3`/`INTO`: the return address follows the instruction.
    Soft(u8, u64),
    /// An external interrupt.
    External(u8),
}

/// The result of a guest page-table walk.
#[derive(Clone, Copy, Debug)]
struct Walk {
    /// Guest-physical page address.
    gpp: u64,
    user_ok: bool,
    writable: bool,
    /// Guest-physical addresses of the PDE and PTE used (PTE absent for
    /// 4 MiB pages; both absent with paging off).
    pde: Option<u64>,
    pte: Option<u64>,
    /// The dirty bit is already set.
    dirty: bool,
}

/// Why a `trap` engine could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrapError {
    /// The monitor shuffles guest RAM in chunks: RAM must be whole chunks.
    #[error("guest RAM ({size} bytes) must be a multiple of {} KiB", chunk / 1024)]
    RamSize {
        /// Guest RAM in bytes.
        size: u64,
        /// The chunk size in bytes.
        chunk: u64,
    },
    /// The second (host-physical) mapping of guest RAM failed.
    #[error("cannot build the host-physical view of guest RAM")]
    HostView(#[source] MemoryError),
}

/// What the VMM knows of `trap` before it builds one.
pub struct TrapFactory;

/// The `trap` engine's factory, for the VMM's list.
pub static FACTORY: TrapFactory = TrapFactory;

impl EngineFactory for TrapFactory {
    fn name(&self) -> &'static str {
        NAME
    }
    fn describe(&self) -> String {
        "trap, trap-and-emulate with ring deprivileging and shadow page tables".into()
    }
    fn available(&self) -> Result<(), String> {
        // memfd-backed RAM with a second, shuffled mapping.
        if cfg!(target_os = "linux") {
            Ok(())
        } else {
            Err("trap maps guest RAM twice through memfd: it needs a Linux host".into())
        }
    }
    fn can_run(&self, mode: GuestMode) -> Result<(), String> {
        software_cpu_can_run(mode)
    }
    fn needs_shareable_ram(&self) -> bool {
        // The CPU sees guest RAM through a second, shuffled mapping.
        true
    }
    fn auto_rank(&self) -> Option<u8> {
        // For seeing the classic technique at work, not for speed.
        None
    }
    fn create(&self, machine: &Machine) -> Result<Box<dyn Engine>, EngineError> {
        let t = Trap::new(machine).map_err(|e| EngineError::Setup {
            engine: NAME,
            source: Box::new(e),
        })?;
        Ok(Box::new(t))
    }
}

/// The `trap` engine.
pub struct Trap {
    cpu: Cpu,
    gram: Arc<GuestRam>,
    hram: Arc<GuestRam>,
    map: PhysMap,
    shadow: Shadow,
    v: Virt,
    /// The shadow GDT shows DPL-3 segments as present.
    user_view: bool,
    /// GDT indices of the guest's DPL-3 code/data descriptors.
    dpl3: Vec<u16>,
    /// The guest's state has been installed once.
    started: bool,
    /// The next instruction runs before any interrupt (STI's shadow).
    inhibit: bool,
    events: Vec<SensitiveEvent>,
    audit: Audit,
    /// Counters.
    pub stats: TrapStats,
    trace: bool,
    /// The guest is paravirtual (it asked for HC_VERSION) and promised to
    /// invalidate after PTE changes: its page tables need no write
    /// protection. Native guests keep it false.
    pv_mmu: bool,
    /// Where the virtual IF was last cleared by an emulated CLI.
    last_cli: Option<u64>,
    /// Nesting of handlers that run the CPU for one instruction.
    depth: u32,
    /// The CPU runs an instruction the monitor is emulating: its sensitive
    /// reports are not gap events (the instruction trapped).
    emulating: bool,
    /// The trapping instruction's text, for `--trace traps`.
    trace_text: Option<String>,
    /// Where the CPU was seen running at real ring 0 (an isolation break:
    /// ring 0 is the monitor's), for [`Trap::isolation_check`].
    ring0_seen: Option<u64>,
}

/// Exception names for traces and reports.
fn vector_name(v: u8) -> &'static str {
    const N: [&str; 20] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM",
    ];
    N.get(v as usize).copied().unwrap_or("exc")
}

impl Trap {
    /// An engine for `machine`, whose RAM must be shareable
    /// ([`GuestRam::new_shareable`]): the CPU sees it through a shuffled
    /// physical map, followed by the monitor's pool.
    pub fn new(machine: &Machine) -> Result<Trap, TrapError> {
        let gram = machine.ram().clone();
        let ram_size = gram.size().div_ceil(phys::CHUNK) * phys::CHUNK;
        if ram_size != gram.size() {
            return Err(TrapError::RamSize {
                size: gram.size(),
                chunk: phys::CHUNK,
            });
        }
        let map = PhysMap::shuffled(ram_size, 0x9e37_79b9_7f4a_7c15);
        let hram = map
            .host_view(&gram, shadow::POOL_BYTES)
            .map_err(TrapError::HostView)?;
        let shadow = Shadow::new(&hram, ram_size);
        let mut cpu = Cpu::new(hram.clone());
        cpu.exception_bitmap = u32::MAX;
        cpu.report_sensitive = true;
        cpu.hypercall_port = None;
        // SYSENTER would enter real ring 0: the guest gets INT 0x80 only.
        if let Some(l) = cpu.cpuid.basic.get_mut(1) {
            l.edx &= !(1 << 11);
        }
        let mut t = Trap {
            cpu,
            gram,
            hram,
            map,
            shadow,
            v: Virt::default(),
            user_view: false,
            dpl3: Vec::new(),
            started: false,
            inhibit: false,
            events: Vec::new(),
            audit: Audit::default(),
            stats: TrapStats::default(),
            trace: false,
            pv_mmu: false,
            last_cli: None,
            depth: 0,
            emulating: false,
            trace_text: None,
            ring0_seen: None,
        };
        t.write_idt_and_tss();
        Ok(t)
    }

    /// The software CPU (real state: ring 1, shadow tables).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    fn pool(&self, page: u64) -> u64 {
        self.shadow.page(page)
    }

    fn write_idt_and_tss(&mut self) {
        let gate = desc::idt_gate();
        for v in 0..256u64 {
            let a = self.pool(IDT_PAGE) + v * 8;
            let _ = self.hram.write_u32_untracked(a, gate.lo);
            let _ = self.hram.write_u32_untracked(a + 4, gate.hi);
        }
        let tss = self.pool(TSS_PAGE);
        shadow::zero(&self.hram, tss, 4096);
        let _ = self.hram.write_u32_untracked(tss + 8, desc::VMM_DS as u32);
        // I/O map base past the limit: no port is granted below ring 0.
        let _ = self.hram.write_untracked(tss + 0x66, &104u16.to_le_bytes());
        for (sel, d) in desc::vmm_descriptors() {
            let a = self.pool(GDT_PAGE) + sel as u64;
            let _ = self.hram.write_u32_untracked(a, d.lo);
            let _ = self.hram.write_u32_untracked(a + 4, d.hi);
        }
    }

    /// Checks that the guest has not broken out: the CPU never ran at real
    /// ring 0, and the monitor's IDT, TSS, GDT entries and page tables of
    /// its own 4 MiB hold what the monitor wrote. For fuzzers and tests
    /// (it reads a few pages).
    pub fn isolation_check(&self) -> Result<(), String> {
        if let Some(eip) = self.ring0_seen {
            return Err(format!("guest code ran at real ring 0 (EIP {eip:#x})"));
        }
        let gate = desc::idt_gate();
        for v in 0..256u64 {
            let a = self.pool(IDT_PAGE) + v * 8;
            let got = (self.hram.read_u32(a).ok(), self.hram.read_u32(a + 4).ok());
            if got != (Some(gate.lo), Some(gate.hi)) {
                return Err(format!("the monitor's IDT gate {v} changed: {got:x?}"));
            }
        }
        let mut tss = [0u8; 4096];
        let _ = self.hram.read(self.pool(TSS_PAGE), &mut tss);
        let mut want = [0u8; 4096];
        want[8..12].copy_from_slice(&(desc::VMM_DS as u32).to_le_bytes());
        want[0x66..0x68].copy_from_slice(&104u16.to_le_bytes());
        if tss != want {
            return Err("the monitor's TSS changed".into());
        }
        for (sel, d) in desc::vmm_descriptors() {
            let a = self.pool(GDT_PAGE) + sel as u64;
            let got = (self.hram.read_u32(a).ok(), self.hram.read_u32(a + 4).ok());
            // The TSS descriptor's busy bit is the CPU's to set.
            let busy = 2 << 8;
            if got.0 != Some(d.lo) || got.1.map(|h| h | busy) != Some(d.hi | busy) {
                return Err(format!(
                    "the monitor's GDT entry {sel:#x} changed: {got:x?}"
                ));
            }
        }
        self.shadow.check_monitor_tables(&self.hram)
    }

    fn count(&mut self, kind: impl Into<String>) {
        self.stats.total += 1;
        *self.stats.traps.entry(kind.into()).or_insert(0) += 1;
    }

    fn trace_line(&mut self, vector: &str, eip: u64, action: &str) {
        if !self.trace {
            return;
        }
        let text = match self.trace_text.take() {
            Some(t) => t,
            None => self.fetch_text(),
        };
        eprintln!("trap {vector:<4} eip={eip:08x}  {text:<28} -> {action}");
    }

    /// The instruction at CS:EIP, as text.
    fn fetch_text(&mut self) -> String {
        self.fetch()
            .map(|i| {
                let mut s = String::new();
                iced_x86::GasFormatter::new().format(&i, &mut s);
                s
            })
            .unwrap_or_else(|| "?".into())
    }

    // ----- guest memory, through the guest's own page tables -----

    fn paging(&self) -> bool {
        self.v.cr0 & cr::CR0_PG != 0
    }

    fn gread32(&self, gpp: u64) -> Option<u32> {
        self.gram.read_u32(gpp).ok()
    }

    fn gwrite32(&self, gpp: u64, v: u32) {
        if let Some(h) = self.map.to_host(gpp) {
            let _ = self.hram.write_u32_untracked(h, v);
        }
    }

    /// Walks the guest's page tables for `lin` (gvp → gpp) with the checks
    /// hardware makes; `Err` is the guest's #PF error code.
    fn walk(&self, lin: u32, write: bool, user: bool) -> Result<Walk, u32> {
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
    fn set_ad(&self, w: &Walk, write: bool) {
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
    fn guest_read(&self, lin: u32, buf: &mut [u8]) -> Result<(), (u32, u32)> {
        self.guest_read_as(lin, buf, true)
    }

    /// [`Trap::guest_read`], optionally without setting accessed bits (for
    /// reports, which must not change what the guest sees).
    fn guest_read_as(&self, lin: u32, buf: &mut [u8], accessed: bool) -> Result<(), (u32, u32)> {
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
    fn guest_write(&mut self, lin: u32, data: &[u8]) -> Result<(), (u32, u32)> {
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

    fn read_u32_lin(&self, lin: u32) -> Result<u32, (u32, u32)> {
        let mut b = [0u8; 4];
        self.guest_read(lin, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    // ----- shadow paging -----

    /// The host page behind guest-physical `gpp`: RAM through the
    /// physical map; the machine's own addresses above the host's memory
    /// (devices, unassigned space) as they are; the rest of the guest's
    /// space below them — beyond guest RAM but where host pages lie — the
    /// void page just past host memory, which the bus answers with
    /// all-ones and whose writes it drops, as it does for unassigned
    /// addresses.
    fn host_page(&self, gpp: u64) -> u64 {
        match self.map.to_host(gpp) {
            Some(h) => h,
            None if gpp >= self.hram.size() + 0x1000 => gpp & !0xfff,
            None => self.hram.size(),
        }
    }

    fn reset_shadow(&mut self) {
        let pd = self.paging().then_some(self.v.cr3 >> 12);
        self.shadow.reset(&self.hram, pd);
        self.cpu.flush_tlb();
    }

    /// Fills the shadow PTE for `lin` from a successful guest walk.
    fn fill(&mut self, lin: u32, w: &Walk, write: bool, force_writable: bool) {
        self.set_ad(w, write);
        let page = w.gpp >> 12;
        let mut flags = pte::P | pte::A;
        if w.user_ok {
            flags |= pte::U;
        }
        // Pages outside guest RAM reach the bus (devices, the void page):
        // stores to them need no tracking.
        let may_write = w.writable && (write || w.dirty);
        if force_writable || (may_write && (self.pv_mmu || !self.shadow.is_tracked(page))) {
            flags |= pte::W | pte::D;
        }
        let src = w.pte.map(|a| {
            let p = a >> 12;
            (p, self.host_page(p << 12))
        });
        let host = self.host_page(w.gpp);
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

    fn snapshot_if_tracked(&self, page: u64) -> Option<Vec<u8>> {
        if !self.shadow.is_tracked(page) {
            return None;
        }
        let mut b = vec![0u8; 4096];
        self.gram.read(page << 12, &mut b).ok()?;
        Some(b)
    }

    /// After a store to guest page-table page `page`: drops the shadow
    /// entries derived from the entries that changed.
    fn resync_table_page(&mut self, page: u64, before: &[u8]) {
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
    fn store_needs_emulation(&self, w: &Walk) -> bool {
        let page = w.gpp >> 12;
        let in_ram = self.map.to_host(w.gpp).is_some();
        let protected = self.shadow.is_tracked(page) && !self.pv_mmu;
        in_ram && (protected || !w.writable)
    }

    /// The page a single-stepped instruction faulted on, if the fault is
    /// another store that needs emulation (an instruction that writes two
    /// protected pages: a dword across a page boundary, ENTER's frame).
    fn second_protected_store(&mut self, exit: &RunExit) -> Option<(u32, Walk)> {
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
    fn emulate_store(&mut self, machine: &mut Machine, lin: u32, w: &Walk) -> Handled {
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
            let page = w.gpp >> 12;
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

    fn page_fault(&mut self, machine: &mut Machine, code: u32) -> Handled {
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
                            &format!("store to guest page table {:08x}: emulated", w.gpp),
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
                            w.gpp,
                            self.host_page(w.gpp)
                        ),
                    );
                }
                self.fill(lin, &w, write, false);
                Ok(Flow::Continue)
            }
        }
    }

    // ----- descriptor tables -----

    /// Reads the guest's descriptor for `sel` from its GDT (no LDT support).
    fn guest_descriptor(&self, sel: u16) -> Option<Descriptor> {
        if sel & 4 != 0 || sel & !7 == 0 {
            return None;
        }
        let off = (sel & !7) as u32;
        if off + 7 > self.v.gdtr.limit as u32 {
            return None;
        }
        let mut b = [0u8; 8];
        self.guest_read((self.v.gdtr.base as u32).wrapping_add(off), &mut b)
            .ok()?;
        Some(Descriptor {
            lo: u32::from_le_bytes(b[..4].try_into().unwrap()),
            hi: u32::from_le_bytes(b[4..].try_into().unwrap()),
        })
    }

    /// Rebuilds the shadow GDT from the guest's.
    fn sync_gdt(&mut self) {
        let base = self.pool(GDT_PAGE);
        shadow::zero(&self.hram, base, desc::GUEST_GDT_END as u64);
        self.dpl3.clear();
        let end = (self.v.gdtr.limit as u32 + 1).min(desc::GUEST_GDT_END);
        let mut raw = vec![0u8; end as usize];
        if self.guest_read(self.v.gdtr.base as u32, &mut raw).is_err() {
            return;
        }
        // Write-protect the guest's GDT pages: stores to them resync this.
        let mut pages = Vec::new();
        let first = self.v.gdtr.base as u32 & !0xfff;
        let last = (self.v.gdtr.base as u32).wrapping_add(end.saturating_sub(1)) & !0xfff;
        let mut lin = first;
        loop {
            if let Ok(w) = self.walk(lin, false, false) {
                let g = w.gpp >> 12;
                if !pages.iter().any(|&(p, _)| p == g) {
                    pages.push((g, self.host_page(w.gpp)));
                }
            }
            if lin == last {
                break;
            }
            lin = lin.wrapping_add(0x1000);
        }
        self.shadow.set_gdt_pages(&self.hram, &pages);
        self.cpu.flush_tlb();
        for i in 1..(end / 8) as usize {
            let d = Descriptor {
                lo: u32::from_le_bytes(raw[i * 8..i * 8 + 4].try_into().unwrap()),
                hi: u32::from_le_bytes(raw[i * 8 + 4..i * 8 + 8].try_into().unwrap()),
            };
            if d.is_code_data() && d.dpl() == 3 {
                self.dpl3.push(i as u16);
            }
            let s = desc::shadow_descriptor(d, self.user_view);
            let _ = self.hram.write_u32_untracked(base + i as u64 * 8, s.lo);
            let _ = self.hram.write_u32_untracked(base + i as u64 * 8 + 4, s.hi);
        }
    }

    /// Shows or hides the guest's DPL-3 segments in the shadow GDT.
    fn set_view(&mut self, user: bool) {
        if self.user_view == user {
            return;
        }
        self.user_view = user;
        let base = self.pool(GDT_PAGE);
        for &i in &self.dpl3 {
            let a = base + i as u64 * 8 + 4;
            if let Ok(hi) = self.hram.read_u32(a) {
                let hi = if user { hi | 1 << 15 } else { hi & !(1 << 15) };
                let _ = self.hram.write_u32_untracked(a, hi);
            }
        }
    }

    /// The hidden-cache value the CPU would load for guest selector `sel`
    /// from the shadow GDT, with the RPL the guest kernel gets at ring 1.
    fn shadow_segment(&self, sel: u16) -> Option<Segment> {
        let d = self.guest_descriptor(sel)?;
        let s = desc::shadow_descriptor(d, true);
        let rpl = if d.dpl() == 0 { 1 } else { sel & 3 };
        let mut sg = s.to_segment((sel & !3) | rpl);
        if d.present() {
            sg.attr |= popek_cpu::state::attr::P;
        }
        // A code segment `confine` could not cut has no safe form.
        desc::confined(&sg).then_some(sg)
    }

    // ----- virtual ↔ real state -----

    /// The guest-visible state: the real CPU's registers with the virtual
    /// privileged registers and ring 1 shown as ring 0.
    fn compose(&mut self) -> CpuState {
        let real_cpl = self.cpu.cpl();
        let mut s = self.cpu.state().clone();
        s.cr0 = self.v.cr0;
        s.cr2 = self.v.cr2;
        s.cr3 = self.v.cr3;
        s.cr4 = self.v.cr4;
        s.gdtr = self.v.gdtr;
        s.idtr = self.v.idtr;
        s.ldtr = self.v.ldtr;
        s.tr = self.v.tr;
        s.dr = self.v.dr;
        s.msr = self.v.msr;
        s.rflags = (s.rflags & !((flags::IF | flags::IOPL) as u64))
            | if self.v.vif { flags::IF as u64 } else { 0 }
            | ((self.v.iopl as u64) << 12);
        s.halted = self.v.halted;
        s.interrupt_shadow |= self.inhibit;
        for (i, sg) in s.seg.iter_mut().enumerate() {
            if sg.attr & popek_cpu::state::attr::S != 0 && sg.dpl() == 1 {
                sg.attr &= !(3 << 5);
            }
            if real_cpl == 1 && (i == seg::CS || i == seg::SS) {
                sg.selector &= !3;
            }
            if sg.limit == SEG_TOP && sg.base == 0 {
                sg.limit = u32::MAX;
            }
        }
        s
    }

    /// The real hidden cache for a guest-visible segment, confined below
    /// the monitor's area (`None`: a code segment that cannot be).
    fn real_segment(sg: Segment, i: usize, vcpl: u8) -> Option<Segment> {
        let mut r = sg;
        if r.attr & popek_cpu::state::attr::S != 0 && r.dpl() == 0 {
            r.attr |= 1 << 5;
        }
        if vcpl == 0 && (i == seg::CS || i == seg::SS) {
            r.selector |= 1;
        }
        if r.attr & popek_cpu::state::attr::S == 0 {
            return Some(r);
        }
        desc::confine_segment(r)
    }

    fn install(&mut self, s: CpuState) -> Result<(), EngineError> {
        let unsupported = |reason: &str| EngineError::Unsupported {
            engine: NAME,
            reason: reason.into(),
        };
        if s.cr0 & cr::CR0_PE == 0 {
            return Err(unsupported(
                "the guest is in real mode; trap-and-emulate runs protected-mode guests \
                 (ring deprivileging needs rings): use --engine bt or interp",
            ));
        }
        if s.rflags & flags::VM as u64 != 0 {
            return Err(unsupported("virtual-8086 mode is not virtualized by trap"));
        }
        if s.cr4 & cr::CR4_PAE != 0 || s.efer & (1 << 10) != 0 {
            return Err(unsupported(
                "PAE and long mode are not implemented by the software CPU yet",
            ));
        }
        let old = self.started.then(|| self.compose());
        let vcpl = s.cpl();
        if vcpl == 1 || vcpl == 2 {
            return Err(unsupported(
                "guest code at ring 1 or 2: the guest kernel's own ring is taken by ring compression",
            ));
        }
        let paging_changed = old.as_ref().is_none_or(|o| {
            o.cr3 != s.cr3
                || (o.cr0 ^ s.cr0) & (cr::CR0_PG | cr::CR0_WP) != 0
                || (o.cr4 ^ s.cr4) & (cr::CR4_PSE | cr::CR4_PGE) != 0
        });
        let gdt_changed = old.as_ref().is_none_or(|o| o.gdtr != s.gdtr);
        let segs_changed = old.as_ref().is_none_or(|o| o.seg != s.seg);
        self.v.cr0 = s.cr0 | cr::CR0_ET;
        self.v.cr2 = s.cr2;
        if old.as_ref().is_some_and(|o| o.cr3 != s.cr3) {
            self.stats.cr3_switches += 1;
        }
        self.v.cr3 = s.cr3;
        self.v.cr4 = s.cr4;
        self.v.gdtr = s.gdtr;
        self.v.idtr = s.idtr;
        self.v.ldtr = s.ldtr;
        self.v.tr = s.tr;
        self.v.vif = s.rflags & flags::IF as u64 != 0;
        self.v.iopl = ((s.rflags >> 12) & 3) as u8;
        self.v.halted = s.halted;
        self.v.dr = s.dr;
        self.v.msr = s.msr;
        self.inhibit = s.interrupt_shadow;
        let mut r = if segs_changed {
            let mut r = s.clone();
            for i in 0..6 {
                r.seg[i] = Self::real_segment(s.seg[i], i, vcpl).ok_or_else(|| {
                    unsupported(
                        "a code segment reaches the monitor's linear area (the top 4 MiB) \
                         and cannot be cut below it",
                    )
                })?;
            }
            r
        } else {
            let mut r = self.cpu.state().clone();
            r.gpr = s.gpr;
            r.rip = s.rip;
            r.fpu = s.fpu;
            r.rflags = s.rflags;
            r
        };
        let (gdtr, idtr, tr) = desc::real_tables();
        r.cr0 = cr::CR0_PE
            | cr::CR0_PG
            | cr::CR0_WP
            | cr::CR0_ET
            | (s.cr0 & (cr::CR0_MP | cr::CR0_EM | cr::CR0_TS | cr::CR0_NE));
        r.cr3 = self.shadow.root();
        r.cr4 = s.cr4 & (cr::CR4_TSD | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT);
        r.gdtr = gdtr;
        r.idtr = idtr;
        r.tr = tr;
        r.ldtr = Segment {
            attr: popek_cpu::state::attr::P | 2,
            ..Segment::default()
        };
        r.rflags = (s.rflags | flags::IF as u64 | flags::FIXED1 as u64)
            & !((flags::IOPL | flags::VM | flags::VIF | flags::VIP) as u64);
        r.efer = 0;
        r.dr = [0, 0, 0, 0, 0xffff_0ff0, 0x400, 0xffff_0ff0, 0x400];
        r.msr = Msrs::default();
        r.halted = false;
        r.interrupt_shadow = false;
        r.cr2 = self.cpu.state().cr2;
        if segs_changed {
            self.cpu.set_state(r);
        } else {
            // Registers only (a hypercall's result, IF): no TLB flush.
            *self.cpu.state_mut() = r;
        }
        self.started = true;
        self.user_view = vcpl == 3;
        if gdt_changed {
            self.sync_gdt();
        } else {
            let u = self.user_view;
            self.user_view = !u;
            self.set_view(u);
        }
        if paging_changed {
            self.reset_shadow();
        }
        Ok(())
    }

    // ----- delivery into the guest -----

    fn eflags_image(&mut self) -> u32 {
        let f = self.cpu.state().rflags as u32;
        (f & !(flags::IF | flags::IOPL))
            | if self.v.vif { flags::IF } else { 0 }
            | ((self.v.iopl as u32) << 12)
    }

    /// Delivers an event through the guest's IDT at virtual ring 0, as the
    /// CPU would at ring 0: gate checks, the stack switch through the
    /// guest's TSS, the frame (with the guest-visible EFLAGS), IF cleared
    /// by interrupt gates.
    fn deliver(&mut self, ev: Event) -> Handled {
        match self.try_deliver(ev) {
            Ok(()) => Ok(Flow::Continue),
            Err(e) => {
                let (vector, _) = match ev {
                    Event::Exception(v, c) => (v, c),
                    Event::Soft(v, _) | Event::External(v) => (v, None),
                };
                if vector == 8 {
                    return Ok(Flow::Exit(VmExit::Shutdown {
                        reason: format!(
                            "triple fault: the guest's double-fault handler cannot be delivered ({e})"
                        ),
                    }));
                }
                if let Some((next, code)) = self.nested(vector, &e) {
                    return self.deliver(Event::Exception(next, code));
                }
                Ok(Flow::Exit(VmExit::Shutdown {
                    reason: format!("cannot deliver vector {vector} to the guest: {e}"),
                }))
            }
        }
    }

    /// The exception that replaces an undeliverable one.
    fn nested(&mut self, vector: u8, e: &DeliveryError) -> Option<(u8, Option<u32>)> {
        let (v, code) = match *e {
            DeliveryError::Fault(v, code) => (v, code),
            DeliveryError::Unsupported(_) => return None,
        };
        // SDM table 6-5: which pairs make a double fault.
        let contributory = |x: u8| matches!(x, 0 | 10 | 11 | 12 | 13);
        let double = (contributory(vector) && contributory(v))
            || (vector == 14 && (v == 14 || contributory(v)));
        Some(if double { (8, Some(0)) } else { (v, code) })
    }

    fn try_deliver(&mut self, ev: Event) -> Result<(), DeliveryError> {
        let (vector, code, ext, soft_next) = match ev {
            // A fault while delivering an exception or an interrupt (not
            // INT n) has EXT set in its error code (SDM 6.13).
            Event::Exception(v, c) => (v, c, true, None),
            Event::Soft(v, next) => (v, None, false, Some(next)),
            Event::External(v) => (v, None, true, None),
        };
        let ext_bit = ext as u32;
        let idt_err = (vector as u32) * 8 + 2 + ext_bit;
        if (vector as u32) * 8 + 7 > self.v.idtr.limit as u32 {
            return Err(DeliveryError::Fault(13, Some(idt_err)));
        }
        let mut g = [0u8; 8];
        self.guest_read(
            (self.v.idtr.base as u32).wrapping_add(vector as u32 * 8),
            &mut g,
        )
        .map_err(|(lin, err)| self.pf(lin, err))?;
        let lo = u32::from_le_bytes(g[..4].try_into().unwrap());
        let hi = u32::from_le_bytes(g[4..].try_into().unwrap());
        let ty = (hi >> 8) & 0x1f;
        let gate_dpl = ((hi >> 13) & 3) as u8;
        let real_cpl = self.cpu.cpl();
        let vcpl = if real_cpl == 3 { 3 } else { 0 };
        if !matches!(ty, 0xe | 0xf) {
            if ty == 0x5 {
                return Err(DeliveryError::Unsupported(
                    "task gates are not virtualized by trap",
                ));
            }
            if matches!(ty, 0x6 | 0x7) {
                return Err(DeliveryError::Unsupported(
                    "16-bit gates are not virtualized by trap",
                ));
            }
            return Err(DeliveryError::Fault(13, Some(idt_err)));
        }
        if soft_next.is_some() && gate_dpl < vcpl {
            return Err(DeliveryError::Fault(13, Some(idt_err)));
        }
        if hi & (1 << 15) == 0 {
            return Err(DeliveryError::Fault(11, Some(idt_err)));
        }
        let sel = (lo >> 16) as u16;
        let offset = (lo & 0xffff) | (hi & 0xffff_0000);
        let d = self
            .guest_descriptor(sel)
            .filter(|d| d.is_code_data() && d.is_code())
            .ok_or(DeliveryError::Fault(13, Some((sel & !3) as u32 + ext_bit)))?;
        if !d.present() {
            return Err(DeliveryError::Fault(11, Some((sel & !3) as u32 + ext_bit)));
        }
        let target_dpl = if d.conforming() { vcpl } else { d.dpl() };
        if target_dpl != 0 && target_dpl != vcpl {
            return Err(DeliveryError::Unsupported(
                "a handler outside ring 0 and the interrupted ring",
            ));
        }
        let st = self.cpu.state().clone();
        let eip = soft_next.unwrap_or(st.rip) as u32;
        let image = self.eflags_image();
        // The guest sees its own CS in the frame (RPL 0 at virtual ring 0),
        // so its IRET back to ring 0 faults and is emulated, restoring IF.
        let cs_real = if real_cpl == 1 {
            st.seg[seg::CS].selector & !3
        } else {
            st.seg[seg::CS].selector
        };
        let (new_ss, new_esp, frame): (Option<u16>, u32, Vec<u32>) = if target_dpl < vcpl {
            // To ring 0 from ring 3: the stack from the guest's TSS.
            let tss = self.v.tr.base as u32;
            let esp0 = self
                .read_u32_lin(tss.wrapping_add(4))
                .map_err(|(l, e)| self.pf(l, e))?;
            let ss0 = self
                .read_u32_lin(tss.wrapping_add(8))
                .map_err(|(l, e)| self.pf(l, e))? as u16;
            let mut f = vec![
                st.seg[seg::SS].selector as u32,
                st.gpr[4] as u32,
                image,
                cs_real as u32,
                eip,
            ];
            if let Some(c) = code {
                f.push(c);
            }
            (Some(ss0), esp0, f)
        } else {
            let mut f = vec![image, cs_real as u32, eip];
            if let Some(c) = code {
                f.push(c);
            }
            (None, st.gpr[4] as u32, f)
        };
        let ss_seg = match new_ss {
            Some(s) => self
                .shadow_segment(s)
                .filter(|sg| sg.present())
                .ok_or(DeliveryError::Fault(10, Some((s & !3) as u32 + ext_bit)))?,
            None => st.seg[seg::SS],
        };
        let bytes: Vec<u8> = frame.iter().rev().flat_map(|w| w.to_le_bytes()).collect();
        // A 16-bit stack (B = 0) moves SP only, wrapping at 64 KiB.
        let sp_mask: u32 = if ss_seg.big() { u32::MAX } else { 0xffff };
        let esp = new_esp.wrapping_sub(bytes.len() as u32) & sp_mask;
        // The whole frame within the stack segment's limit (a frame that
        // wraps around the top of the stack does not fit either): #SS,
        // with the new SS selector when the stack was switched.
        let len = bytes.len() as u32;
        let fits = esp as u64 + len as u64 <= sp_mask as u64 + 1
            && popek_cpu::Cpu::seg_value_lin(&ss_seg, esp, 1).is_some()
            && popek_cpu::Cpu::seg_value_lin(&ss_seg, esp + (len - 1), 1).is_some();
        if !fits {
            let top = (ss_seg.base as u32 as u64) + esp as u64 + len as u64;
            if top > VMM_LINEAR as u64 {
                // Where the monitor's 4 MiB cut the guest's stack short.
                self.count("#SS monitor-area frame (reflected)");
            }
            let sel = new_ss.map_or(0, |s| (s & !3) as u32);
            return Err(DeliveryError::Fault(12, Some(sel + ext_bit)));
        }
        let lin = (ss_seg.base as u32).wrapping_add(esp);
        self.guest_write(lin, &bytes)
            .map_err(|(l, e)| self.pf(l, e))?;
        let cs_seg = self
            .shadow_segment(sel)
            .ok_or(DeliveryError::Fault(13, Some((sel & !3) as u32)))?;
        let s = self.cpu.state_mut();
        s.seg[seg::CS] = cs_seg;
        if new_ss.is_some() {
            s.seg[seg::SS] = ss_seg;
        }
        let upper = if new_ss.is_some() {
            new_esp as u64
        } else {
            s.gpr[4] & 0xffff_ffff
        } & !(sp_mask as u64);
        s.gpr[4] = upper | esp as u64;
        s.rip = offset as u64;
        s.rflags &= !((flags::TF | flags::NT | flags::RF | flags::VM) as u64);
        s.halted = false;
        if ty == 0xe {
            self.v.vif = false;
        }
        self.v.halted = false;
        self.stats.reflected += 1;
        self.set_view(false);
        Ok(())
    }

    fn pf(&mut self, lin: u32, err: u32) -> DeliveryError {
        self.v.cr2 = lin as u64;
        DeliveryError::Fault(14, Some(err))
    }

    // ----- the run loop -----

    fn run_cpu(&mut self, machine: &mut Machine, budget: u64) -> RunExit {
        let host_size = self.hram.size();
        // Host RAM the CPU reaches as MMIO, or the void page (guest pages
        // beyond guest RAM): nothing there, as on the bus. Interrupts are
        // the monitor's to deliver.
        let mut bus = MachineBus::new(machine)
            .with_events(&mut self.events)
            .void_below(host_size + 0x1000)
            .without_interrupts();
        let exit = self.cpu.run(&mut bus, budget);
        if !self.events.is_empty() && self.emulating {
            self.events.clear();
        }
        if let RunExit::Exception {
            software: false, ..
        } = exit
        {
            // A report from the instruction that then faulted (far JMP/CALL
            // report before their checks): it did not execute.
            let rip = self.cpu.state().rip;
            while self.events.last().is_some_and(|e| e.ip == rip) {
                self.events.pop();
            }
        }
        if !self.events.is_empty() {
            let events = std::mem::take(&mut self.events);
            for e in &events {
                self.audit_event(e);
            }
            self.events = events;
            self.events.clear();
        }
        exit
    }

    fn after_run(&mut self, machine: &mut Machine, exit: RunExit) -> Handled {
        match exit {
            RunExit::Budget => Ok(Flow::Continue),
            RunExit::Halted => {
                self.v.halted = true;
                Ok(Flow::Exit(VmExit::Halt))
            }
            RunExit::Shutdown => Ok(Flow::Exit(VmExit::Shutdown {
                reason: "triple fault".into(),
            })),
            RunExit::Hypercall => Ok(Flow::Exit(VmExit::Hypercall)),
            RunExit::BusStop => Ok(Flow::Exit(VmExit::MachineStop)),
            RunExit::Exception {
                vector, error_code, ..
            } => self.exception(machine, vector, error_code),
        }
    }

    fn exception(&mut self, machine: &mut Machine, vector: u8, code: Option<u32>) -> Handled {
        if self.trace {
            // Decoded before the handler moves EIP (or CS).
            self.trace_text = Some(self.fetch_text());
        }
        match vector {
            14 => self.page_fault(machine, code.unwrap_or(0)),
            13 => self.general_protection(machine, code.unwrap_or(0)),
            11 => self.not_present(machine, code.unwrap_or(0)),
            _ => {
                let eip = self.cpu.state().rip;
                self.count(format!("{} reflected", vector_name(vector)));
                if self.trace {
                    self.trace_line(vector_name(vector), eip, "reflected to the guest");
                }
                self.deliver(Event::Exception(vector, code))
            }
        }
    }

    /// Decodes the instruction at CS:EIP, read through the guest's own page
    /// tables (the shadow may not map it yet: an instruction-fetch fault).
    fn fetch(&mut self) -> Option<Instruction> {
        let st = self.cpu.state();
        let lin = st.seg[seg::CS].base.wrapping_add(st.rip) as u32;
        let bits = if st.seg[seg::CS].big() { 32 } else { 16 };
        let rip = st.rip;
        let mut bytes = [0u8; 15];
        let mut n = 0;
        // Byte by byte: the instruction may end where the next page is
        // unmapped.
        for (i, b) in bytes.iter_mut().enumerate() {
            let mut one = [0u8];
            if self
                .guest_read_as(lin.wrapping_add(i as u32), &mut one, false)
                .is_err()
            {
                break;
            }
            *b = one[0];
            n = i + 1;
        }
        if n == 0 {
            return None;
        }
        let mut dec = Decoder::with_ip(bits, &bytes[..n], rip, DecoderOptions::NONE);
        let i = dec.decode();
        (!i.is_invalid()).then_some(i)
    }

    fn reg(&mut self, r: Register) -> u64 {
        let st = self.cpu.state();
        if r.is_segment_register() {
            let i = match r {
                Register::ES => seg::ES,
                Register::CS => seg::CS,
                Register::SS => seg::SS,
                Register::DS => seg::DS,
                Register::FS => seg::FS,
                _ => seg::GS,
            };
            return st.seg[i].base;
        }
        let full = r.full_register32();
        let idx = (full as usize).wrapping_sub(Register::EAX as usize);
        let v = st.gpr.get(idx).copied().unwrap_or(0);
        match r.size() {
            1 if (r as usize) >= Register::AH as usize && (r as usize) <= Register::BH as usize => {
                let idx = r as usize - Register::AH as usize;
                (st.gpr[idx] >> 8) & 0xff
            }
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v & 0xffff_ffff,
        }
    }

    fn set_reg(&mut self, r: Register, v: u64) {
        let size = r.size();
        if size == 1
            && (r as usize) >= Register::AH as usize
            && (r as usize) <= Register::BH as usize
        {
            let idx = r as usize - Register::AH as usize;
            let old = self.cpu.state().gpr[idx];
            self.cpu.set_gpr(idx, (old & !0xff00) | ((v & 0xff) << 8));
            return;
        }
        let idx = (r.full_register32() as usize).wrapping_sub(Register::EAX as usize);
        let Some(&old) = self.cpu.state().gpr.get(idx) else {
            return;
        };
        let new = match size {
            1 => (old & !0xff) | (v & 0xff),
            2 => (old & !0xffff) | (v & 0xffff),
            _ => v & 0xffff_ffff,
        };
        self.cpu.set_gpr(idx, new);
    }

    /// The linear address of a memory operand.
    fn mem_linear(&mut self, i: &Instruction) -> Option<u32> {
        let regs: Vec<(Register, u64)> = [
            Register::EAX,
            Register::ECX,
            Register::EDX,
            Register::EBX,
            Register::ESP,
            Register::EBP,
            Register::ESI,
            Register::EDI,
            Register::AX,
            Register::CX,
            Register::DX,
            Register::BX,
            Register::SP,
            Register::BP,
            Register::SI,
            Register::DI,
            Register::ES,
            Register::CS,
            Register::SS,
            Register::DS,
            Register::FS,
            Register::GS,
        ]
        .into_iter()
        .map(|r| (r, self.reg(r)))
        .collect();
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        i.virtual_address(op, 0, |r, _, _| {
            regs.iter().find(|(x, _)| *x == r).map(|(_, v)| *v)
        })
        .map(|a| a as u32)
    }

    /// Completes an emulated instruction.
    fn skip(&mut self, i: &Instruction) {
        let mask = if self.cpu.state().seg[seg::CS].big() {
            0xffff_ffff
        } else {
            0xffff
        };
        self.cpu.set_rip(i.next_ip() & mask);
        // The emulated instruction retired, as on the CPU: the guest's
        // clock (TSC, virtual time) counts it.
        self.cpu.icount += 1;
    }

    fn general_protection(&mut self, machine: &mut Machine, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let real_cpl = self.cpu.cpl();
        let Some(i) = self.fetch() else {
            self.count("#GP reflected");
            return self.deliver(Event::Exception(13, Some(code)));
        };
        if code & 2 != 0 {
            // An IDT gate refused the INT n (every shadow gate has DPL 0).
            let vector = (code >> 3) as u8;
            let is_int = matches!(
                i.mnemonic(),
                Mnemonic::Int | Mnemonic::Int3 | Mnemonic::Into
            );
            if is_int {
                self.count(format!("#GP int {vector:#x} (reflected)"));
                if self.trace {
                    self.trace_line(
                        "#GP",
                        eip,
                        &format!("INT {vector:#x}: delivered through the guest's IDT"),
                    );
                }
                return self.deliver(Event::Soft(vector, i.next_ip()));
            }
        }
        if code == 0 {
            if let Some(h) = self.monitor_area_access(&i, real_cpl) {
                return h;
            }
        }
        if real_cpl == 3 {
            return self.user_gp(machine, &i, code);
        }
        self.kernel_gp(machine, &i, code)
    }

    /// A #GP(0) from an access that the guest's segment allows but that
    /// reaches the monitor's linear area (the top 4 MiB, which the shadow
    /// segments stop short of): the guest kernel's MOV loads and stores
    /// are emulated through its page tables (as the CPU would have done
    /// them at ring 0); anything else gets the #GP, counted as a trap of
    /// its own. `None`: not such an access.
    fn monitor_area_access(&mut self, i: &Instruction, real_cpl: u8) -> Option<Handled> {
        use iced_x86::Code::*;
        let op = (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        let size = i.memory_size().size() as u32;
        let lin = self.mem_linear(i)?;
        if size == 0 || (lin as u64 + size as u64 - 1) < VMM_LINEAR as u64 {
            return None;
        }
        let s = match i.memory_segment() {
            Register::ES => seg::ES,
            Register::CS => seg::CS,
            Register::SS => seg::SS,
            Register::FS => seg::FS,
            Register::GS => seg::GS,
            _ => seg::DS,
        };
        let guest = self.compose().seg[s];
        let off = lin.wrapping_sub(guest.base as u32);
        let write = op == 0 && i.mnemonic() != Mnemonic::Cmp && i.mnemonic() != Mnemonic::Test;
        let usable = guest.present()
            && (guest.attr & popek_cpu::state::attr::CODE == 0 || !write)
            && popek_cpu::Cpu::seg_value_lin(&guest, off, size as u8).is_some();
        if !usable {
            return None;
        }
        let eip = self.cpu.state().rip;
        let emulated = real_cpl != 3
            && matches!(
                i.code(),
                Mov_r8_rm8
                    | Mov_r16_rm16
                    | Mov_r32_rm32
                    | Mov_rm8_r8
                    | Mov_rm16_r16
                    | Mov_rm32_r32
                    | Mov_rm8_imm8
                    | Mov_rm16_imm16
                    | Mov_rm32_imm32
                    | Mov_AL_moffs8
                    | Mov_AX_moffs16
                    | Mov_EAX_moffs32
                    | Mov_moffs8_AL
                    | Mov_moffs16_AX
                    | Mov_moffs32_EAX
                    | Movzx_r16_rm8
                    | Movzx_r32_rm8
                    | Movzx_r32_rm16
                    | Movsx_r16_rm8
                    | Movsx_r32_rm8
                    | Movsx_r32_rm16
            );
        if !emulated {
            self.count("#GP monitor-area access (reflected)");
            if self.trace {
                self.trace_line(
                    "#GP",
                    eip,
                    &format!("{lin:#x}: the monitor's linear area; only kernel MOVs are emulated: #GP reflected"),
                );
            }
            return Some(self.deliver(Event::Exception(13, Some(0))));
        }
        let result = if op == 0 {
            let v = if i.op1_kind() == OpKind::Register {
                self.reg(i.op1_register())
            } else {
                i.immediate(1)
            };
            self.guest_write(lin, &v.to_le_bytes()[..size as usize])
                .map(|()| format!("{size}-byte store to {lin:#x} emulated"))
        } else {
            let mut b = [0u8; 8];
            self.guest_read(lin, &mut b[..size as usize]).map(|()| {
                let raw = u64::from_le_bytes(b);
                let v = match i.mnemonic() {
                    Mnemonic::Movsx => {
                        let sh = 64 - size * 8;
                        (((raw << sh) as i64) >> sh) as u64
                    }
                    _ => raw,
                };
                self.set_reg(i.op0_register(), v);
                format!("{size}-byte load from {lin:#x} emulated")
            })
        };
        Some(match result {
            Ok(what) => {
                self.count("#GP monitor-area access (emulated)");
                if self.trace {
                    self.trace_line("#GP", eip, &what);
                }
                self.skip(i);
                Ok(Flow::Continue)
            }
            Err((l, e)) => {
                self.v.cr2 = l as u64;
                self.deliver(Event::Exception(14, Some(e)))
            }
        })
    }

    fn reflect_gp(&mut self, code: u32, what: &str) -> Handled {
        let eip = self.cpu.state().rip;
        self.count("#GP reflected");
        if self.trace {
            self.trace_line("#GP", eip, &format!("{what}: #GP({code:#x}) reflected"));
        }
        self.deliver(Event::Exception(13, Some(code)))
    }

    fn user_gp(&mut self, machine: &mut Machine, i: &Instruction, code: u32) -> Handled {
        use Mnemonic::*;
        match i.mnemonic() {
            In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd => {
                let (port, size) = io_operands(self, i);
                if self.v.iopl == 3 || self.io_permitted(port, size) {
                    return self.port_io(machine, i, 3);
                }
                self.reflect_gp(code, "ring-3 port I/O the guest's TSS denies")
            }
            Cli | Sti if self.v.iopl == 3 => {
                self.v.vif = i.mnemonic() == Sti;
                self.count("#GP cli/sti at ring 3 (IOPL 3)");
                self.skip(i);
                Ok(Flow::Continue)
            }
            _ => self.reflect_gp(code, "ring 3"),
        }
    }

    /// The guest TSS's I/O permission bitmap (what ring 3 may access).
    fn io_permitted(&self, port: u16, size: u8) -> bool {
        let tss = self.v.tr.base as u32;
        let limit = self.v.tr.limit;
        let mut b = [0u8; 2];
        if limit < 0x67 || self.guest_read(tss.wrapping_add(0x66), &mut b).is_err() {
            return false;
        }
        let base = u16::from_le_bytes(b) as u32;
        let first = base + port as u32 / 8;
        if first + 1 > limit {
            return false;
        }
        let mut w = [0u8; 2];
        if self.guest_read(tss.wrapping_add(first), &mut w).is_err() {
            return false;
        }
        let bits = u16::from_le_bytes(w) >> (port % 8);
        bits & ((1 << size) - 1) == 0
    }

    fn kernel_gp(&mut self, machine: &mut Machine, i: &Instruction, code: u32) -> Handled {
        use Mnemonic::*;
        let eip = self.cpu.state().rip;
        let m = i.mnemonic();
        let action: String;
        match m {
            Cli => {
                self.v.vif = false;
                self.last_cli = Some(eip);
                action = "virtual IF := 0".into();
            }
            Sti => {
                self.v.vif = true;
                self.inhibit = true;
                action = "virtual IF := 1 (one-instruction shadow)".into();
            }
            Hlt => {
                self.count("#GP hlt");
                self.trace_line("#GP", eip, "HLT: wait for an interrupt");
                self.skip(i);
                self.v.halted = true;
                return Ok(Flow::Exit(VmExit::Halt));
            }
            In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd => {
                return self.port_io(machine, i, 0);
            }
            Mov if i.op0_kind() == OpKind::Register && i.op0_register().is_cr() => {
                let cr_n = i.op0_register() as u32 - Register::CR0 as u32;
                let v = self.reg(i.op1_register());
                self.skip(i);
                action = format!("virtual CR{cr_n} := {v:#x}");
                self.count(format!("#GP mov cr{cr_n}"));
                self.trace_line("#GP", eip, &action);
                self.write_cr(cr_n, v)?;
                return Ok(Flow::Continue);
            }
            Mov if i.op1_kind() == OpKind::Register && i.op1_register().is_cr() => {
                let cr_n = i.op1_register() as u32 - Register::CR0 as u32;
                let v = match cr_n {
                    0 => self.v.cr0,
                    2 => self.v.cr2,
                    3 => self.v.cr3,
                    4 => self.v.cr4,
                    _ => return self.reflect_gp(code, "MOV from a CR that does not exist"),
                };
                self.set_reg(i.op0_register(), v);
                action = format!("read virtual CR{cr_n} = {v:#x}");
            }
            Mov if i.op0_kind() == OpKind::Register && i.op0_register().is_dr() => {
                let n = (i.op0_register() as usize - Register::DR0 as usize) & 7;
                self.v.dr[n] = self.reg(i.op1_register());
                action = format!("virtual DR{n} written (breakpoints not armed)");
            }
            Mov if i.op1_kind() == OpKind::Register && i.op1_register().is_dr() => {
                let n = (i.op1_register() as usize - Register::DR0 as usize) & 7;
                let v = self.v.dr[n];
                self.set_reg(i.op0_register(), v);
                action = format!("read virtual DR{n}");
            }
            Mov | Pop if i.op0_kind() == OpKind::Register && i.op0_register() == Register::SS => {
                return self.load_ss(i, code);
            }
            Clts => {
                self.v.cr0 &= !cr::CR0_TS;
                self.cpu.state_mut().cr0 &= !cr::CR0_TS;
                action = "virtual CR0.TS := 0".into();
            }
            Lmsw => {
                let v = if i.op0_kind() == OpKind::Memory {
                    let Some(a) = self.mem_linear(i) else {
                        return self.reflect_gp(code, "LMSW");
                    };
                    let mut b = [0u8; 2];
                    if let Err((l, e)) = self.guest_read(a, &mut b) {
                        self.v.cr2 = l as u64;
                        return self.deliver(Event::Exception(14, Some(e)));
                    }
                    u16::from_le_bytes(b) as u64
                } else {
                    self.reg(i.op0_register())
                };
                let new = (self.v.cr0 & !0xe) | (v & 0xf) | (self.v.cr0 & 1);
                self.skip(i);
                self.count("#GP lmsw");
                self.write_cr(0, new)?;
                return Ok(Flow::Continue);
            }
            Lgdt | Lidt => {
                let Some(a) = self.mem_linear(i) else {
                    return self.reflect_gp(code, "LGDT/LIDT without memory");
                };
                let mut b = [0u8; 6];
                if let Err((l, e)) = self.guest_read(a, &mut b) {
                    self.v.cr2 = l as u64;
                    return self.deliver(Event::Exception(14, Some(e)));
                }
                let limit = u16::from_le_bytes([b[0], b[1]]);
                let mut base = u32::from_le_bytes([b[2], b[3], b[4], b[5]]) as u64;
                if i.op_code().operand_size() == 16 {
                    base &= 0x00ff_ffff;
                }
                let t = TableReg { base, limit };
                if m == Lgdt {
                    self.v.gdtr = t;
                    self.sync_gdt();
                    action = format!("virtual GDTR := {base:#x}/{limit:#x}; shadow GDT rebuilt");
                } else {
                    self.v.idtr = t;
                    action = format!("virtual IDTR := {base:#x}/{limit:#x}");
                }
            }
            Lldt | Ltr => {
                let sel = if i.op0_kind() == OpKind::Memory {
                    let Some(a) = self.mem_linear(i) else {
                        return self.reflect_gp(code, "LLDT/LTR");
                    };
                    let mut b = [0u8; 2];
                    if let Err((l, e)) = self.guest_read(a, &mut b) {
                        self.v.cr2 = l as u64;
                        return self.deliver(Event::Exception(14, Some(e)));
                    }
                    u16::from_le_bytes(b)
                } else {
                    self.reg(i.op0_register()) as u16
                };
                if m == Lldt {
                    if sel & !3 == 0 {
                        self.v.ldtr = Segment::default();
                    } else {
                        match self
                            .guest_descriptor(sel)
                            .filter(|d| !d.is_code_data() && d.typ() == 2)
                        {
                            Some(d) => self.v.ldtr = d.to_segment(sel),
                            None => return self.reflect_gp((sel & !3) as u32, "LLDT of a non-LDT"),
                        }
                    }
                    action = format!("virtual LDTR := {sel:#x} (LDT segments are not shadowed)");
                } else {
                    let Some(d) = self
                        .guest_descriptor(sel)
                        .filter(|d| !d.is_code_data() && matches!(d.typ(), 1 | 9))
                    else {
                        return self.reflect_gp((sel & !3) as u32, "LTR of a non-TSS");
                    };
                    let busy = d.hi | (2 << 8);
                    let at = (self.v.gdtr.base as u32).wrapping_add((sel & !7) as u32 + 4);
                    let _ = self.guest_write(at, &busy.to_le_bytes());
                    self.v.tr = Descriptor { lo: d.lo, hi: busy }.to_segment(sel);
                    action = format!("virtual TR := {sel:#x} (the guest's TSS)");
                }
            }
            Invlpg => {
                let Some(a) = self.mem_linear(i) else {
                    return self.reflect_gp(code, "INVLPG");
                };
                self.invlpg(a);
                action = format!("shadow PTE of {a:#x} dropped");
            }
            Wbinvd | Invd => action = "nothing to do".into(),
            Rdmsr | Wrmsr => return self.msr(machine, i, code),
            Iret | Iretd | Retf => return self.same_ring_return(i, code),
            _ => return self.reflect_gp(code, "not a privileged instruction the monitor emulates"),
        }
        self.count(format!("#GP {}", format!("{m:?}").to_lowercase()));
        if self.trace {
            self.trace_line("#GP", eip, &action);
        }
        self.skip(i);
        Ok(Flow::Continue)
    }

    fn invlpg(&mut self, lin: u32) {
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

    fn write_cr(&mut self, n: u32, v: u64) -> Result<(), EngineError> {
        let unsupported = |r: &str| EngineError::Unsupported {
            engine: NAME,
            reason: r.into(),
        };
        match n {
            0 => {
                if v & cr::CR0_PE == 0 {
                    return Err(unsupported(
                        "the guest left protected mode (CR0.PE := 0): trap runs protected-mode guests only",
                    ));
                }
                let old = self.v.cr0;
                self.v.cr0 = v | cr::CR0_ET;
                let keep = cr::CR0_MP | cr::CR0_EM | cr::CR0_TS | cr::CR0_NE;
                let s = self.cpu.state_mut();
                s.cr0 = (s.cr0 & !keep) | (v & keep);
                if (old ^ v) & (cr::CR0_PG | cr::CR0_WP) != 0 {
                    self.reset_shadow();
                }
            }
            2 => self.v.cr2 = v,
            3 => {
                self.v.cr3 = v;
                self.stats.cr3_switches += 1;
                self.reset_shadow();
            }
            4 => {
                if v & cr::CR4_PAE != 0 {
                    return Err(unsupported(
                        "the guest enabled PAE paging, which the software CPU does not implement yet",
                    ));
                }
                let old = self.v.cr4;
                self.v.cr4 = v;
                let keep = cr::CR4_TSD | cr::CR4_OSFXSR | cr::CR4_OSXMMEXCPT;
                let s = self.cpu.state_mut();
                s.cr4 = (s.cr4 & !keep) | (v & keep);
                if (old ^ v) & (cr::CR4_PSE | cr::CR4_PGE) != 0 {
                    self.reset_shadow();
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn load_ss(&mut self, i: &Instruction, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let mut pop_size = 0u64;
        let (sel, pop) = match (i.mnemonic(), i.op1_kind()) {
            (Mnemonic::Pop, _) => {
                let st = self.cpu.state();
                let lin = (st.seg[seg::SS].base + (st.gpr[4] & 0xffff_ffff)) as u32;
                pop_size = if i.code() == iced_x86::Code::Popw_SS {
                    2
                } else {
                    4
                };
                match self.read_u32_lin(lin) {
                    Ok(v) => (v as u16, true),
                    Err((l, e)) => {
                        self.v.cr2 = l as u64;
                        return self.deliver(Event::Exception(14, Some(e)));
                    }
                }
            }
            (_, OpKind::Register) => (self.reg(i.op1_register()) as u16, false),
            (Mnemonic::Mov, OpKind::Memory) => {
                let Some(a) = self.mem_linear(i) else {
                    return self.reflect_gp(code, "MOV SS");
                };
                let mut b = [0u8; 2];
                if let Err((l, e)) = self.guest_read(a, &mut b) {
                    self.v.cr2 = l as u64;
                    return self.deliver(Event::Exception(14, Some(e)));
                }
                (u16::from_le_bytes(b), false)
            }
            _ => return self.reflect_gp(code, "LSS is not emulated"),
        };
        // At virtual ring 0: RPL 0, a writable data segment with DPL 0.
        let ok = sel & 3 == 0
            && self
                .guest_descriptor(sel)
                .is_some_and(|d| d.is_code_data() && d.writable_data() && d.dpl() == 0);
        let Some(sg) = self.shadow_segment(sel).filter(|_| ok) else {
            return self.reflect_gp(
                (sel & !3) as u32,
                "MOV SS of a selector ring 0 may not load",
            );
        };
        if !sg.present() {
            self.count("#SS reflected");
            return self.deliver(Event::Exception(12, Some((sel & !3) as u32)));
        }
        self.skip(i);
        // The pop moves SP only on a 16-bit stack (the old SS's B bit).
        let sp_mask: u64 = if self.cpu.state().seg[seg::SS].big() {
            0xffff_ffff
        } else {
            0xffff
        };
        let s = self.cpu.state_mut();
        s.seg[seg::SS] = sg;
        if pop {
            s.gpr[4] = (s.gpr[4] & !sp_mask) | ((s.gpr[4] + pop_size) & sp_mask);
        }
        self.inhibit = true;
        self.count("#GP mov ss");
        if self.trace {
            self.trace_line(
                "#GP",
                eip,
                &format!("SS := {sel:#x}, loaded at ring 1 as {:#x}", sel | 1),
            );
        }
        Ok(Flow::Continue)
    }

    /// IRET/RETF at virtual ring 0 to a selector with RPL 0 (which the real
    /// ring 1 refuses): emulated, including IF from the popped EFLAGS.
    fn same_ring_return(&mut self, i: &Instruction, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let st = self.cpu.state().clone();
        use iced_x86::Code;
        let size: u32 = match i.code() {
            Code::Iretd | Code::Retfd | Code::Retfd_imm16 => 4,
            _ => 2,
        };
        let iret = i.mnemonic() != Mnemonic::Retf;
        // A 16-bit stack (B = 0) moves SP only, wrapping at 64 KiB.
        let sp_mask: u32 = if st.seg[seg::SS].big() {
            u32::MAX
        } else {
            0xffff
        };
        let esp = st.gpr[4] as u32 & sp_mask;
        let base = st.seg[seg::SS].base as u32;
        let mut frame = vec![0u8; (size * 3) as usize];
        if let Err((l, e)) = self.guest_read(base.wrapping_add(esp), &mut frame) {
            self.v.cr2 = l as u64;
            return self.deliver(Event::Exception(14, Some(e)));
        }
        let word = |k: usize| -> u32 {
            if size == 4 {
                u32::from_le_bytes(frame[k * 4..k * 4 + 4].try_into().unwrap())
            } else {
                u16::from_le_bytes(frame[k * 2..k * 2 + 2].try_into().unwrap()) as u32
            }
        };
        let (new_eip, sel) = (word(0), word(1) as u16);
        // RPL 1 is ring 0's selector as the real CPU showed it (PUSH CS).
        if sel & 3 > 1 {
            return self.reflect_gp(code, "far return to an outer ring");
        }
        let ok = self
            .guest_descriptor(sel)
            .is_some_and(|d| d.is_code_data() && d.is_code() && d.present() && d.dpl() == 0);
        let Some(cs) = self.shadow_segment(sel).filter(|_| ok) else {
            return self.reflect_gp((sel & !3) as u32, "far return to a bad code segment");
        };
        let mut pop = size * 2;
        let mut new_flags = None;
        if iret {
            let f = word(2);
            self.v.vif = f & flags::IF != 0;
            self.v.iopl = ((f >> 12) & 3) as u8;
            new_flags = Some(f);
            pop += size;
        } else if i.op_count() == 1 && i.op0_kind() == OpKind::Immediate16 {
            pop += i.immediate16() as u32;
        }
        let s = self.cpu.state_mut();
        s.seg[seg::CS] = cs;
        s.rip = new_eip as u64;
        s.gpr[4] = (s.gpr[4] & !(sp_mask as u64)) | (esp.wrapping_add(pop) & sp_mask) as u64;
        if let Some(f) = new_flags {
            let mask = if size == 4 { 0x0025_4fd5u32 } else { 0x4fd5 };
            let f = (f & mask & !(flags::IF | flags::IOPL)) | flags::IF | flags::FIXED1;
            s.rflags = (s.rflags & !(mask as u64)) | f as u64;
        }
        self.count(if iret {
            "#GP iret to ring 0 (emulated)"
        } else {
            "#GP retf to ring 0 (emulated)"
        });
        if self.trace {
            self.trace_line(
                "#GP",
                eip,
                &format!("return to {sel:#x}:{new_eip:#x} emulated"),
            );
        }
        Ok(Flow::Continue)
    }

    fn msr(&mut self, machine: &mut Machine, i: &Instruction, code: u32) -> Handled {
        let st = self.cpu.state().clone();
        let ecx = st.gpr[1] as u32;
        let value = (st.gpr[2] << 32) | (st.gpr[0] & 0xffff_ffff);
        let icount = self.cpu.icount;
        let m = &mut self.v.msr;
        let write = i.mnemonic() == Mnemonic::Wrmsr;
        let slot: Option<&mut u64> = match ecx {
            0x174 => Some(&mut m.sysenter_cs),
            0x175 => Some(&mut m.sysenter_esp),
            0x176 => Some(&mut m.sysenter_eip),
            0x1b => Some(&mut m.apic_base),
            0x277 => Some(&mut m.pat),
            0x1a0 => Some(&mut m.misc_enable),
            0x10 => Some(&mut m.tsc_offset),
            _ => None,
        };
        let Some(slot) = slot else {
            return self.reflect_gp(code, "RDMSR/WRMSR of an MSR the virtual CPU lacks");
        };
        if write {
            if ecx == 0x10 {
                *slot = value.wrapping_sub(machine.tsc(icount));
            } else {
                *slot = value;
            }
        } else {
            let v = if ecx == 0x10 {
                machine.tsc(icount).wrapping_add(*slot)
            } else {
                *slot
            };
            self.cpu.set_gpr(0, v & 0xffff_ffff);
            self.cpu.set_gpr(2, v >> 32);
        }
        self.count(if write { "#GP wrmsr" } else { "#GP rdmsr" });
        self.skip(i);
        Ok(Flow::Continue)
    }

    fn port_io(&mut self, machine: &mut Machine, i: &Instruction, vcpl: u8) -> Handled {
        use Mnemonic::*;
        let eip = self.cpu.state().rip;
        let (port, size) = io_operands(self, i);
        match i.mnemonic() {
            In => {
                if vcpl == 0
                    && port == HYPERCALL_PORT
                    && size == 4
                    && i.op1_register() == Register::DX
                {
                    let nr = self.cpu.state().gpr[0] as u32;
                    if nr == 0 {
                        // A guest that asks for the ABI is paravirtual and
                        // invalidates after its PTE changes.
                        self.pv_mmu = true;
                    }
                    self.count("#GP hypercall");
                    if self.trace {
                        const NAMES: [&str; 18] = [
                            "VERSION",
                            "CONSOLE_WRITE",
                            "EXIT",
                            "POWER_OFF",
                            "IRQ_DISABLE",
                            "IRQ_ENABLE",
                            "SAVE_FL",
                            "RESTORE_FL",
                            "HALT",
                            "WRITE_CR3",
                            "READ_CR3",
                            "READ_CR2",
                            "INVLPG",
                            "LOAD_GDT",
                            "LOAD_IDT",
                            "LOAD_TR",
                            "PORT_IN",
                            "PORT_OUT",
                        ];
                        let name = NAMES.get(nr as usize).copied().unwrap_or("unknown");
                        self.trace_line("#GP", eip, &format!("hypercall {nr} (HC_{name})"));
                    }
                    self.skip(i);
                    return Ok(Flow::Exit(VmExit::Hypercall));
                }
                machine.device_time(self.cpu.icount);
                let v = machine.io_in(port, size) as u64;
                self.set_reg(i.op0_register(), v);
                self.count("#GP in");
                if self.trace {
                    self.trace_line("#GP", eip, &format!("port {port:#x} read {v:#x}"));
                }
            }
            Out => {
                let v = self.reg(i.op1_register()) as u32;
                machine.device_time(self.cpu.icount);
                machine.io_out(port, size, v);
                self.count("#GP out");
                if self.trace {
                    self.trace_line("#GP", eip, &format!("port {port:#x} := {v:#x}"));
                }
            }
            _ => return self.string_io(machine, i, port, size),
        }
        self.skip(i);
        if machine.stop_pending() {
            return Ok(Flow::Exit(VmExit::MachineStop));
        }
        Ok(Flow::Continue)
    }

    fn string_io(
        &mut self,
        machine: &mut Machine,
        i: &Instruction,
        port: u16,
        size: u8,
    ) -> Handled {
        let input = matches!(
            i.mnemonic(),
            Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd
        );
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let a32 = (0..i.op_count())
            .any(|k| matches!(i.op_kind(k), OpKind::MemoryESEDI | OpKind::MemorySegESI));
        let amask: u64 = if a32 { 0xffff_ffff } else { 0xffff };
        let st = self.cpu.state().clone();
        let df = st.rflags & flags::DF as u64 != 0;
        let mut count = if rep { st.gpr[1] & amask } else { 1 };
        let (idx, sreg) = if input {
            (7usize, seg::ES)
        } else {
            let s = match i.memory_segment() {
                Register::ES => seg::ES,
                Register::CS => seg::CS,
                Register::SS => seg::SS,
                Register::FS => seg::FS,
                Register::GS => seg::GS,
                _ => seg::DS,
            };
            (6usize, s)
        };
        // The guest's view of the segment (limits as it wrote them, not
        // cut below the monitor's area: the accesses go through the guest's
        // page tables).
        let segment = self.compose().seg[sreg];
        let seg_base = segment.base;
        let mut ptr = st.gpr[idx] & amask;
        let mut done = 0u64;
        while count > 0 && done < 65536 {
            // What the CPU checks of the memory operand once the I/O is
            // allowed (ring 0): a usable segment and its limit (#SS for SS).
            use popek_cpu::state::attr::{CODE, RW};
            let code = segment.attr & CODE != 0;
            let rw = segment.attr & RW != 0;
            let usable = segment.present()
                && if input { !code && rw } else { !code || rw }
                && popek_cpu::Cpu::seg_value_lin(&segment, ptr as u32, size).is_some();
            if !usable {
                self.save_string(idx, ptr, rep, count, amask);
                let v = if sreg == seg::SS { 12 } else { 13 };
                return self.deliver(Event::Exception(v, Some(0)));
            }
            let lin = (seg_base + ptr) as u32;
            machine.device_time(self.cpu.icount);
            if input {
                let v = machine.io_in(port, size);
                if let Err((l, e)) = self.guest_write(lin, &v.to_le_bytes()[..size as usize]) {
                    self.v.cr2 = l as u64;
                    self.save_string(idx, ptr, rep, count, amask);
                    return self.deliver(Event::Exception(14, Some(e)));
                }
            } else {
                let mut b = [0u8; 4];
                if let Err((l, e)) = self.guest_read(lin, &mut b[..size as usize]) {
                    self.v.cr2 = l as u64;
                    self.save_string(idx, ptr, rep, count, amask);
                    return self.deliver(Event::Exception(14, Some(e)));
                }
                machine.io_out(port, size, u32::from_le_bytes(b));
            }
            ptr = if df {
                ptr.wrapping_sub(size as u64)
            } else {
                ptr + size as u64
            } & amask;
            count -= 1;
            done += 1;
        }
        self.save_string(idx, ptr, rep, count, amask);
        if count == 0 {
            self.skip(i);
        }
        self.count(if input { "#GP ins" } else { "#GP outs" });
        if machine.stop_pending() {
            return Ok(Flow::Exit(VmExit::MachineStop));
        }
        Ok(Flow::Continue)
    }

    fn save_string(&mut self, idx: usize, ptr: u64, rep: bool, count: u64, amask: u64) {
        let st = self.cpu.state();
        let p = (st.gpr[idx] & !amask) | ptr;
        let c = (st.gpr[1] & !amask) | count;
        self.cpu.set_gpr(idx, p);
        if rep {
            self.cpu.set_gpr(1, c);
        }
    }

    /// #NP: the guest kernel touched one of its DPL-3 segments, hidden while
    /// it runs. An `IRET` to ring 3 is the return to user mode: the monitor
    /// takes the virtual IF and IOPL from the frame, shows the user
    /// segments and lets the CPU execute the `IRET` again.
    fn not_present(&mut self, machine: &mut Machine, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let sel = (code & 0xfffc) as u16;
        let gd = self
            .guest_descriptor(sel)
            .filter(|d| d.is_code_data() && d.present());
        if code & 3 == 0 && gd.is_some_and(|d| d.is_code() && d.dpl() == 0) && self.cpu.cpl() == 1 {
            if let Some(i) = self.fetch().filter(|i| {
                matches!(
                    i.mnemonic(),
                    Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Retf
                )
            }) {
                return self.same_ring_return(&i, code);
            }
            return self.far_to_kernel(sel, code);
        }
        let user_seg = self.cpu.cpl() == 1
            && !self.user_view
            && code & 3 == 0
            && gd.is_some_and(|d| d.dpl() == 3);
        if !user_seg {
            self.count("#NP reflected");
            if self.trace {
                self.trace_line("#NP", eip, "reflected");
            }
            return self.deliver(Event::Exception(11, Some(code)));
        }
        let i = self.fetch();
        if let Some(i) = i.filter(|i| matches!(i.mnemonic(), Mnemonic::Iret | Mnemonic::Iretd)) {
            let size = if i.mnemonic() == Mnemonic::Iretd {
                4
            } else {
                2
            };
            let st = self.cpu.state().clone();
            let lin = (st.seg[seg::SS].base as u32)
                .wrapping_add((st.gpr[4] as u32).wrapping_add(2 * size));
            let f = match self.read_u32_lin(lin) {
                Ok(f) => f,
                Err((l, e)) => {
                    self.v.cr2 = l as u64;
                    return self.deliver(Event::Exception(14, Some(e)));
                }
            };
            self.v.vif = f & flags::IF != 0;
            self.v.iopl = ((f >> 12) & 3) as u8;
            self.count("#NP iret to ring 3");
            if self.trace {
                self.trace_line(
                    "#NP",
                    eip,
                    &format!(
                        "return to user mode: virtual IF := {}, user segments shown, IRET re-executed",
                        self.v.vif as u8
                    ),
                );
            }
            // The CPU executes the IRET itself, now that the user segments
            // are present: its checks are the hardware's.
            return self.step_shown(machine);
        }
        // Another load of a user segment (MOV DS, POP ES...): run it with
        // the user segments shown, then hide them again if still in ring 1.
        self.count("#NP user segment load");
        if self.trace {
            self.trace_line(
                "#NP",
                eip,
                "load of a user segment: run with user segments shown",
            );
        }
        self.step_shown(machine)
    }

    /// Runs one instruction with the user segments shown, then hides them
    /// again if the CPU is still in ring 1.
    fn step_shown(&mut self, machine: &mut Machine) -> Handled {
        if self.depth > 4 {
            // Nested single steps that keep faulting: retry from the run
            // loop (the watchdog ends a true livelock).
            return Ok(Flow::Continue);
        }
        self.set_view(true);
        let was = std::mem::replace(&mut self.emulating, true);
        self.depth += 1;
        let exit = self.run_cpu(machine, 1);
        self.emulating = was;
        let cpl = self.cpu.cpl();
        self.set_view(cpl == 3);
        // Held across `after_run`: nesting is bounded here.
        let flow = self.after_run(machine, exit);
        self.depth -= 1;
        flow
    }

    /// A far JMP or CALL at virtual ring 0 to guest ring-0 code (whose
    /// shadow descriptor is not present): emulated, CS loaded with RPL 1.
    /// MOV or POP of a data segment register with a readable guest
    /// ring-0 code segment: its shadow is marked not present (so that far
    /// transfers to it trap), and the CPU, having checked everything else,
    /// raised #NP. The monitor completes the load.
    fn kernel_code_as_data(&mut self, i: &Instruction, sel: u16, eip: u64, code: u32) -> Handled {
        let target = i.op0_register();
        let s = match target {
            Register::ES => seg::ES,
            Register::DS => seg::DS,
            Register::FS => seg::FS,
            Register::GS => seg::GS,
            _ => {
                self.count("#NP reflected");
                return self.deliver(Event::Exception(11, Some(code)));
            }
        };
        let Some(mut sg) = self.shadow_segment(sel) else {
            return self.reflect_gp(code, "a segment the monitor cannot load");
        };
        // A data segment register keeps the selector as loaded (the error
        // code lost its RPL: ring 0's is 0).
        sg.selector = sel;
        use iced_x86::Code::*;
        let pop = match i.code() {
            Popw_ES | Popw_DS | Popw_FS | Popw_GS => 2,
            Popd_ES | Popd_DS | Popd_FS | Popd_GS => 4,
            _ => 0,
        };
        self.skip(i);
        let st = self.cpu.state_mut();
        st.seg[s] = sg;
        if pop > 0 {
            let mask = if st.seg[seg::SS].big() {
                0xffff_ffff
            } else {
                0xffff
            };
            let sp = (st.gpr[4] & mask) + pop;
            st.gpr[4] = (st.gpr[4] & !mask) | (sp & mask);
        }
        self.count("#NP ring-0 code segment loaded as data (emulated)");
        if self.trace {
            self.trace_line(
                "#NP",
                eip,
                &format!("{target:?} := {sel:#x} (ring-0 code as data)"),
            );
        }
        Ok(Flow::Continue)
    }

    fn far_to_kernel(&mut self, sel: u16, code: u32) -> Handled {
        let eip = self.cpu.state().rip;
        let Some(i) = self.fetch() else {
            return self.deliver(Event::Exception(11, Some(code)));
        };
        let call = match i.mnemonic() {
            Mnemonic::Jmp => false,
            Mnemonic::Call => true,
            Mnemonic::Mov | Mnemonic::Pop => return self.kernel_code_as_data(&i, sel, eip, code),
            _ => {
                self.count("#NP reflected");
                return self.deliver(Event::Exception(11, Some(code)));
            }
        };
        let size: u32 = if i.op_code().operand_size() == 16 {
            2
        } else {
            4
        };
        let (target_sel, off) = match i.op0_kind() {
            OpKind::FarBranch16 => (i.far_branch_selector(), i.far_branch16() as u32),
            OpKind::FarBranch32 => (i.far_branch_selector(), i.far_branch32()),
            OpKind::Memory => {
                let Some(a) = self.mem_linear(&i) else {
                    return self.deliver(Event::Exception(11, Some(code)));
                };
                let mut b = [0u8; 6];
                if let Err((l, e)) = self.guest_read(a, &mut b[..size as usize + 2]) {
                    self.v.cr2 = l as u64;
                    return self.deliver(Event::Exception(14, Some(e)));
                }
                let off = if size == 4 {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                } else {
                    u16::from_le_bytes([b[0], b[1]]) as u32
                };
                let s = size as usize;
                (u16::from_le_bytes([b[s], b[s + 1]]), off)
            }
            _ => return self.deliver(Event::Exception(11, Some(code))),
        };
        if target_sel & !3 != sel {
            return self.deliver(Event::Exception(11, Some(code)));
        }
        let Some(cs) = self.shadow_segment(target_sel) else {
            return self.reflect_gp((sel & !3) as u32, "far transfer to a bad code segment");
        };
        if call {
            let st = self.cpu.state().clone();
            let ret = i.next_ip() as u32;
            let guest_cs = (st.seg[seg::CS].selector & !3) as u32;
            let frame: Vec<u8> = if size == 4 {
                [ret, guest_cs]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect()
            } else {
                [ret as u16, guest_cs as u16]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect()
            };
            let esp = (st.gpr[4] as u32).wrapping_sub(frame.len() as u32);
            let lin = (st.seg[seg::SS].base as u32).wrapping_add(esp);
            if let Err((l, e)) = self.guest_write(lin, &frame) {
                self.v.cr2 = l as u64;
                return self.deliver(Event::Exception(14, Some(e)));
            }
            self.cpu.set_gpr(4, (st.gpr[4] & !0xffff_ffff) | esp as u64);
        }
        let s = self.cpu.state_mut();
        s.seg[seg::CS] = cs;
        s.rip = off as u64;
        self.count(if call {
            "#NP far call to ring 0 (emulated)"
        } else {
            "#NP far jmp to ring 0 (emulated)"
        });
        if self.trace {
            self.trace_line(
                "#NP",
                eip,
                &format!(
                    "far transfer to {target_sel:#x}:{off:#x} emulated (CS := {:#x})",
                    cs.selector
                ),
            );
        }
        Ok(Flow::Continue)
    }

    // ----- the audit -----

    fn audit_event(&mut self, e: &SensitiveEvent) {
        use SensitiveKind as K;
        let vcpl = if e.cpl == 3 { 3 } else { 0 };
        let ring = e.cpl;
        let vif = self.v.vif;
        let viopl = self.v.iopl;
        let addr = e.linear_ip;
        let (name, differed, text): (&'static str, bool, String) = match e.kind {
            K::Pushf => {
                let rif = e.result as u32 & flags::IF != 0;
                let riopl = ((e.result >> 12) & 3) as u8;
                let d = rif != vif || riopl != viopl;
                (
                    "PUSHF",
                    d,
                    if d {
                        format!(
                            "PUSHF at CPL{ring} showed IF={} IOPL={} while the virtual IF was {} and IOPL {}",
                            rif as u8, riopl, vif as u8, viopl
                        )
                    } else {
                        format!("PUSHF at CPL{ring} showed the virtual IF and IOPL")
                    },
                )
            }
            K::Popf | K::Iret => {
                let popped = e.operand as u32;
                let pif = popped & flags::IF != 0;
                let piopl = ((popped >> 12) & 3) as u8;
                let name = if e.kind == K::Popf { "POPF" } else { "IRET" };
                let may_if = vcpl <= viopl;
                let if_lost = may_if && pif != vif && e.cpl != 3;
                let iopl_lost = vcpl == 0 && piopl != viopl && e.cpl != 3;
                let d = if_lost || iopl_lost;
                let text = if if_lost {
                    let what = if pif { "set" } else { "clear" };
                    format!(
                        "{name} at CPL{ring} tried to {what} IF: ignored (virtual IF stays {})",
                        vif as u8
                    )
                } else if iopl_lost {
                    format!("{name} at CPL{ring} tried to set IOPL {piopl}: ignored")
                } else {
                    format!("{name} at CPL{ring}: same effect as at the guest's ring")
                };
                if if_lost && pif {
                    self.audit.last_if_loss = Some(IfLoss {
                        instruction: name,
                        address: addr,
                        cpl: ring,
                        consequence: text.clone(),
                    });
                }
                (name, d, text)
            }
            K::Sgdt | K::Sidt => {
                let (gdtr, idtr, _) = desc::real_tables();
                let (name, v, lim, real_lim) = if e.kind == K::Sgdt {
                    ("SGDT", self.v.gdtr.base, self.v.gdtr.limit, gdtr.limit)
                } else {
                    ("SIDT", self.v.idtr.base, self.v.idtr.limit, idtr.limit)
                };
                let d = e.result != v || lim != real_lim;
                (
                    name,
                    d,
                    if d {
                        format!(
                            "{name} at CPL{ring} returned the monitor's table {:#x}/{real_lim:#x}, not the guest's {v:#x}/{lim:#x}",
                            e.result
                        )
                    } else {
                        format!("{name} at CPL{ring} returned the guest's table")
                    },
                )
            }
            K::Sldt | K::Str => {
                let (name, v) = if e.kind == K::Sldt {
                    ("SLDT", self.v.ldtr.selector as u64)
                } else {
                    ("STR", self.v.tr.selector as u64)
                };
                let d = e.result != v;
                (
                    name,
                    d,
                    if d {
                        format!("{name} at CPL{ring} returned {:#x}, the guest loaded {v:#x}", e.result)
                    } else {
                        format!("{name} at CPL{ring} returned the guest's selector")
                    },
                )
            }
            K::Smsw => {
                let v = self.v.cr0 & 0xffff;
                let d = e.result & 0xffff != v;
                (
                    "SMSW",
                    d,
                    if d {
                        format!("SMSW at CPL{ring} returned {:#x}, virtual CR0 has {v:#x}", e.result)
                    } else {
                        format!("SMSW at CPL{ring} returned the virtual CR0's low bits")
                    },
                )
            }
            K::ReadSegment => {
                let (name, which) = match e.operand as usize {
                    seg::CS => ("MOV/PUSH from CS", "CS"),
                    seg::SS => ("MOV/PUSH from SS", "SS"),
                    _ => ("MOV/PUSH from DS/ES/FS/GS", "a data segment"),
                };
                let rpl = (e.result & 3) as u8;
                let d = matches!(e.operand as usize, seg::CS | seg::SS) && rpl != vcpl;
                (
                    name,
                    d,
                    if d {
                        format!(
                            "reading {which} at CPL{ring} gave {:#x}: RPL {rpl} reveals the real ring, the guest expects RPL {vcpl}",
                            e.result
                        )
                    } else {
                        format!("reading {which} at CPL{ring} gave the guest's selector")
                    },
                )
            }
            K::Lar | K::Lsl | K::Verr | K::Verw => self.audit_descriptor_probe(e, vcpl),
            K::LoadSegment => (
                "MOV/POP to a segment register",
                false,
                format!("segment load at CPL{ring}: DPL-0 descriptors are shadowed with DPL 1, so it succeeds as at ring 0"),
            ),
            K::FarCall | K::FarJmp => {
                let name = if e.kind == K::FarCall { "far CALL" } else { "far JMP" };
                let sel = e.operand as u16;
                // Only a far CALL shows the real CS (it pushes it); a JMP's
                // RPL shows when CS is read, which is audited then.
                let d = e.kind == K::FarCall
                    && vcpl == 0
                    && self
                        .guest_descriptor(sel)
                        .is_some_and(|d| d.is_code_data() && d.is_code() && d.dpl() == 0);
                (
                    name,
                    d,
                    if d {
                        format!(
                            "{name} to {sel:#x} at CPL{ring}: CS is loaded as {:#x} (RPL 1), the guest expects {:#x}",
                            sel | 1,
                            sel & !3
                        )
                    } else {
                        format!("{name} to {sel:#x} at CPL{ring}")
                    },
                )
            }
            K::FarRet => (
                "far RET",
                false,
                format!("far RET to {:#x} at CPL{ring}", e.operand as u16),
            ),
            // Not gap instructions: RDTSC is governed by CR4.TSD (mirrored),
            // CPUID answers the same at every ring, INT n and SYSENTER
            // fault to the monitor (DPL-0 gates, SYSENTER_CS = 0).
            K::Rdtsc | K::Cpuid | K::SoftInt | K::Sysenter => return,
        };
        // The audit covers the deprivileged guest kernel (ring 1), and
        // user code only where ring compression shows through to it.
        if e.cpl == 3 && !differed {
            return;
        }
        self.audit.record(name, addr, differed, || text);
    }

    fn audit_descriptor_probe(
        &mut self,
        e: &SensitiveEvent,
        vcpl: u8,
    ) -> (&'static str, bool, String) {
        use SensitiveKind as K;
        let sel = e.operand as u16;
        let ring = e.cpl;
        let name = match e.kind {
            K::Lar => "LAR",
            K::Lsl => "LSL",
            K::Verr => "VERR",
            _ => "VERW",
        };
        let d = self.guest_descriptor(sel);
        let visible = d.is_some_and(|d| {
            (d.is_code() && d.conforming()) || d.dpl() >= vcpl.max((sel & 3) as u8)
        });
        let expected: u64 = match (e.kind, d) {
            (_, None) => 0,
            (_, Some(_)) if !visible => 0,
            (K::Lar, Some(d))
                if d.is_code_data() || matches!(d.typ(), 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc) =>
            {
                (d.hi & 0x00f0_ff00) as u64
            }
            (K::Lsl, Some(d)) if d.is_code_data() || matches!(d.typ(), 1 | 2 | 3 | 9 | 0xb) => {
                d.to_segment(sel).limit as u64
            }
            (K::Verr, Some(d)) => (d.is_code_data() && d.readable()) as u64,
            (K::Verw, Some(d)) => (d.is_code_data() && d.writable_data()) as u64,
            _ => 0,
        };
        let differed = e.result != expected;
        let text = if differed {
            format!(
                "{name} {sel:#x} at CPL{ring} gave {:#x}; the guest's descriptor at its ring gives {expected:#x} (the shadow's DPL or limit shows)",
                e.result
            )
        } else {
            format!("{name} {sel:#x} at CPL{ring} gave what the guest's descriptor gives")
        };
        (name, differed, text)
    }
}

/// Why an event could not be delivered.
#[derive(Debug)]
enum DeliveryError {
    /// Delivery raised this exception.
    Fault(u8, Option<u32>),
    /// The guest needs something trap does not virtualize.
    Unsupported(&'static str),
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Fault(v, c) => write!(f, "{} ({c:?})", vector_name(*v)),
            DeliveryError::Unsupported(s) => f.write_str(s),
        }
    }
}

/// The port and access size of an I/O instruction.
fn io_operands(t: &mut Trap, i: &Instruction) -> (u16, u8) {
    use Mnemonic::*;
    let dx = t.reg(Register::DX) as u16;
    match i.mnemonic() {
        In => {
            let size = i.op0_register().size() as u8;
            let port = if i.op1_kind() == OpKind::Immediate8 {
                i.immediate8() as u16
            } else {
                dx
            };
            (port, size)
        }
        Out => {
            let size = i.op1_register().size() as u8;
            let port = if i.op0_kind() == OpKind::Immediate8 {
                i.immediate8() as u16
            } else {
                dx
            };
            (port, size)
        }
        Insb | Outsb => (dx, 1),
        Insw | Outsw => (dx, 2),
        _ => (dx, 4),
    }
}

impl Engine for Trap {
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn run(&mut self, machine: &mut Machine, budget: u64) -> Result<VmExit, EngineError> {
        let start = self.cpu.icount;
        let mut handled = 0u64;
        loop {
            let done = self.cpu.icount - start + handled;
            if done >= budget {
                return Ok(VmExit::Budget);
            }
            if self.v.halted {
                if !(self.v.vif && machine.interrupt_pending()) {
                    return Ok(VmExit::Halt);
                }
                self.v.halted = false;
            }
            let mut slice = budget - done;
            if self.inhibit {
                self.inhibit = false;
                slice = 1;
            } else if self.v.vif && machine.interrupt_pending() {
                let vector = machine.acknowledge_interrupt();
                self.count(format!("irq {vector:#x} (reflected)"));
                if self.trace {
                    let eip = self.cpu.state().rip;
                    self.trace_line(
                        "IRQ",
                        eip,
                        &format!("external interrupt {vector:#x} delivered"),
                    );
                }
                handled += 1;
                if let Flow::Exit(x) = self.deliver(Event::External(vector))? {
                    return Ok(x);
                }
                continue;
            }
            let exit = self.run_cpu(machine, slice);
            if self.cpu.cpl() == 0 && self.ring0_seen.is_none() {
                self.ring0_seen = Some(self.cpu.state().rip);
            }
            if matches!(exit, RunExit::Exception { .. }) {
                handled += 1;
            }
            match self.after_run(machine, exit)? {
                Flow::Continue => {}
                Flow::Exit(x) => return Ok(x),
            }
            if machine.stop_pending() {
                return Ok(VmExit::MachineStop);
            }
        }
    }

    fn state(&mut self) -> CpuState {
        self.compose()
    }

    fn set_state(&mut self, state: CpuState) -> Result<(), EngineError> {
        self.install(state)
    }

    fn instructions(&self) -> u64 {
        self.cpu.icount
    }

    fn peek_linear(&mut self, addr: u64, buf: &mut [u8]) -> Option<()> {
        self.guest_read_as(addr as u32, buf, false).ok()
    }

    fn invalidate_page(&mut self, lin: u64) {
        self.invlpg(lin as u32);
    }

    fn poke_linear(&mut self, addr: u64, data: &[u8]) -> Option<()> {
        self.guest_write(addr as u32, data).ok()
    }

    fn inspect(&mut self) -> Option<&mut dyn Inspect> {
        Some(self)
    }
}

impl Inspect for Trap {
    fn audit(&self) -> Option<Vec<AuditRow>> {
        Some(self.audit.rows())
    }

    fn stall_hint(&mut self) -> Option<String> {
        let rows: Vec<AuditRow> = self
            .audit
            .rows()
            .into_iter()
            .filter(|r| r.differed > 0)
            .collect();
        // The gap explains a virtual IF stuck at 0 only if the guest really
        // tried to set IF where the CPU ignored it.
        let if_lost = self.audit.last_if_loss.is_some();
        if (self.v.vif || !if_lost) && rows.is_empty() {
            return None;
        }
        let mut s = if self.v.vif || !if_lost {
            String::from(
                "popek: the audit: the deprivileged guest kernel saw results that differ from ring 0",
            )
        } else {
            String::from(
                "popek: the audit explains it: the guest kernel runs at ring 1 with IOPL 0, so the \
                 CPU ignores its attempts to set IF with POPF or IRET (x86 gap), and the virtual IF \
                 stayed 0",
            )
        };
        if !self.v.vif && if_lost {
            if let Some(l) = &self.audit.last_if_loss {
                s.push_str(&format!(
                    ".\n  last lost attempt: {} at {:#010x} (CPL{}): {}",
                    l.instruction, l.address, l.cpl, l.consequence
                ));
            }
            if let Some(a) = self.last_cli {
                s.push_str(&format!(
                    "\n  IF was last cleared by the emulated CLI at {a:#010x}"
                ));
            }
        }
        for r in &rows {
            s.push_str(&format!(
                "\n  {:<28} ran {:>8}, differed {:>8}: {}",
                r.instruction, r.count, r.differed, r.consequence
            ));
        }
        Some(s)
    }

    fn detail_stats(&self) -> Vec<(String, u64)> {
        self.stats
            .traps
            .iter()
            .map(|(k, v)| (format!("trap: {k}"), *v))
            .collect()
    }

    fn set_trace_traps(&mut self, on: bool) {
        self.trace = on;
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        let sh = &self.shadow.stats;
        vec![
            ("instructions", self.cpu.icount),
            ("traps", s.total),
            ("events reflected into the guest", s.reflected),
            ("hidden page faults", s.hidden_pf),
            ("true page faults", s.true_pf),
            ("write-protect traps", s.wp_traps),
            ("CR3 switches", s.cr3_switches),
            ("shadow syncs (whole shadow rebuilt)", sh.syncs),
            ("shadow PTEs filled", sh.fills),
            ("shadow entries dropped", sh.zaps),
            (
                "64 KiB chunks of guest RAM at another host-physical address",
                self.map.moved_chunks() as u64,
            ),
            ("gap instructions executed", self.audit.events),
            ("gap instructions that differed", self.audit.differed),
            (
                "isolation breaks (monitor tables changed, real ring 0)",
                self.isolation_check().is_err() as u64,
            ),
            (
                "decoded-block cache, KiB",
                self.cpu.block_cache_bytes() as u64 >> 10,
            ),
            (
                "decoded-block cache flushes",
                self.cpu.stats.block_cache_flushes,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use popek_machine::{ClockMode, MachineConfig};

    const PD: u64 = 0x10000;
    const PT0: u64 = 0x11000;
    const PT1: u64 = 0x12000;
    const CODE: u64 = 0x100000;

    /// A machine with 4 MiB of RAM, identity-mapped (supervisor) by PT0,
    /// and PT1 behind PDE 1 (linear 4–8 MiB), empty.
    fn machine() -> Machine {
        let ram = Arc::new(GuestRam::new_shareable(4 << 20).unwrap());
        let m = Machine::new(
            MachineConfig {
                clock: ClockMode::Virtual,
            },
            ram.clone(),
            Box::new(std::io::sink()),
        )
        .unwrap();
        ram.write_u32(PD, PT0 as u32 | 3).unwrap();
        ram.write_u32(PD + 4, PT1 as u32 | 7).unwrap();
        for p in 0..1024u64 {
            ram.write_u32(PT0 + p * 4, (p << 12) as u32 | 3).unwrap();
        }
        ram.write_u32(0x20000, 0xaaaa_aaaa).unwrap();
        ram.write_u32(0x30000, 0xbbbb_bbbb).unwrap();
        m
    }

    /// Runs `code` at ring 0 (virtually) with paging on until HLT.
    fn run(m: &mut Machine, build: impl FnOnce(&mut CodeAssembler)) -> Trap {
        let mut a = CodeAssembler::new(32).unwrap();
        build(&mut a);
        a.hlt().unwrap();
        let bytes = a.assemble(CODE).unwrap();
        m.ram().write(CODE, &bytes).unwrap();
        let mut t = Trap::new(m).unwrap();
        let mut s = CpuState::flat_protected(0x08, 0x10);
        s.rip = CODE;
        s.cr0 |= cr::CR0_PG | cr::CR0_WP;
        s.cr3 = PD;
        s.gpr[4] = 0x90000;
        t.set_state(s).unwrap();
        let exit = t.run(m, 100_000).unwrap();
        assert_eq!(exit, VmExit::Halt, "{:?}", t.state());
        t
    }

    #[test]
    fn hidden_faults_fill_the_shadow_with_host_addresses_and_set_guest_a_d() {
        let mut m = machine();
        let ram = m.ram().clone();
        ram.write_u32(PT1, 0x20000 | 7).unwrap();
        let mut t = run(&mut m, |a| {
            a.mov(eax, dword_ptr(0x400000)).unwrap();
            a.mov(dword_ptr(0x400004), 5u32).unwrap();
        });
        assert_eq!(t.state().gpr[0] as u32, 0xaaaa_aaaa);
        assert_eq!(ram.read_u32(0x20004).unwrap(), 5);
        let pte = ram.read_u32(PT1).unwrap();
        assert_eq!(pte & (pte::A | pte::D), pte::A | pte::D, "{pte:#x}");
        assert!(t.stats.hidden_pf >= 2);
        assert_eq!(t.stats.true_pf, 0);
        // The CPU's page tables hold host-physical addresses.
        let spd = t.shadow.root();
        let hram = t.hram.clone();
        let spde = hram.read_u32(spd + 4).unwrap();
        let spte = hram.read_u32((spde & !0xfff) as u64).unwrap();
        let host = (spte & !0xfff) as u64;
        assert_eq!(host, t.map.to_host(0x20000).unwrap());
        assert_ne!(host, 0x20000, "the map moved this chunk");
    }

    #[test]
    fn stores_to_guest_page_tables_trap_and_resync_the_shadow() {
        let mut m = machine();
        let ram = m.ram().clone();
        ram.write_u32(PT1, 0x20000 | 7).unwrap();
        let t = run(&mut m, |a| {
            a.mov(eax, dword_ptr(0x400000)).unwrap();
            // Remap the page: PT1 is a page table the shadow uses.
            a.mov(dword_ptr(PT1 as u32), 0x30000u32 | 7).unwrap();
            a.mov(ebx, dword_ptr(0x400000)).unwrap();
        });
        let mut t = t;
        let st = t.state();
        assert_eq!(st.gpr[0] as u32, 0xaaaa_aaaa);
        assert_eq!(st.gpr[3] as u32, 0xbbbb_bbbb, "the new mapping is seen");
        assert!(t.stats.wp_traps >= 1);
    }

    #[test]
    fn true_faults_reach_the_guest_with_its_cr2_and_error_code() {
        let mut m = machine();
        let ram = m.ram().clone();
        // An IDT at 0x50000 whose #PF gate (vector 14) goes to a handler
        // that stores CR2 and the error code, then halts.
        let handler = 0x108000u32;
        let gate_lo = (0x08u32 << 16) | (handler & 0xffff);
        let gate_hi = (handler & 0xffff_0000) | 0x8e00;
        ram.write_u32(0x50000 + 14 * 8, gate_lo).unwrap();
        ram.write_u32(0x50000 + 14 * 8 + 4, gate_hi).unwrap();
        // A GDT: null, code 0x08, data 0x10.
        ram.write_u64(0x60008, 0x00cf_9a00_0000_ffff).unwrap();
        ram.write_u64(0x60010, 0x00cf_9200_0000_ffff).unwrap();
        let mut h = CodeAssembler::new(32).unwrap();
        h.pop(ecx).unwrap();
        h.mov(edx, cr2).unwrap();
        h.hlt().unwrap();
        let hb = h.assemble(handler as u64).unwrap();
        ram.write(handler as u64, &hb).unwrap();
        let desc_at = 0x70000u32;
        ram.write_u16(desc_at as u64, 0x7ff).unwrap();
        ram.write_u32(desc_at as u64 + 2, 0x50000).unwrap();
        ram.write_u16(desc_at as u64 + 8, 0x17).unwrap();
        ram.write_u32(desc_at as u64 + 10, 0x60000).unwrap();
        let mut t = run(&mut m, |a| {
            a.lgdt(ptr(desc_at + 8)).unwrap();
            a.lidt(ptr(desc_at)).unwrap();
            // PDE 1's table is empty: a true fault.
            a.mov(dword_ptr(0x401234), 1u32).unwrap();
        });
        let st = t.state();
        assert_eq!(st.gpr[2] as u32, 0x401234, "CR2");
        assert_eq!(st.gpr[1] as u32, 2, "not present, write, supervisor");
        assert_eq!(t.stats.true_pf, 1);
        assert_eq!(st.seg[seg::CS].selector, 0x08, "the guest sees ring 0");
    }
}
