//! The VM as an object: snapshot it, restore it on any engine that runs
//! its CPU mode, move it between engines while it runs, and serve the
//! control requests that ask for these.
//!
//! Everything here happens between engine slices, with the vCPU stopped:
//! the engine's `state()` is then the whole vCPU, the machine's
//! `save_state()` every device, and RAM is still.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use popek_engine::GuestMode;
use popek_machine::{Machine, MachineConfig};
use popek_memory::{GuestRam, PAGE_SIZE};

use crate::control::{Call, Fault, Reply, Request};
use crate::snapshot::{
    self, dir_of, mem_path_for, memory_chain, page_set, runs, stored_path, Layer, MemoryDesc,
    SnapshotError, SnapshotKind, VmState,
};
use crate::{EngineKind, Outcome, PanicWatch, Vm, VmError, WatchedConsole, ENGINES};

/// Instructions the fallback engine runs before the VM returns to the
/// engine that could not go on: enough to get past the instruction and
/// its neighbours (a loop of them), few enough that the fast engine soon
/// runs again.
pub const FALLBACK_SLICE: u64 = 100_000;

/// What a diff snapshot is taken against: the memory chain of the last
/// snapshot this VM wrote or was restored from.
#[derive(Clone, Debug)]
pub(crate) struct LastSnapshot {
    /// Its state file.
    state: PathBuf,
    /// Its memory, full snapshot first.
    layers: Vec<Layer>,
}

/// What writing a snapshot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Non-zero pages written.
    pub pages: u64,
    /// Pages in the diff (changed since the parent), for a diff.
    pub changed: u64,
    /// How long it took.
    pub took: Duration,
}

/// How `popek restore` builds the VM.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The engine (`None`: the one that took the snapshot, if it is here
    /// and runs the vCPU's mode, else `--engine auto`'s choice for it).
    pub engine: Option<EngineKind>,
    /// Map the memory file copy-on-write, shared with every other clone,
    /// instead of reading it into the VM's own memory.
    pub clone: bool,
}

impl From<VmError> for SnapshotError {
    fn from(e: VmError) -> Self {
        SnapshotError::Refused(e.chain())
    }
}

fn open_mem(path: &Path, size: u64) -> Result<std::fs::File, SnapshotError> {
    let f = std::fs::File::open(path).map_err(|source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let len = f
        .metadata()
        .map_err(|source| SnapshotError::Io {
            path: path.display().to_string(),
            source,
        })?
        .len();
    if len != size {
        return Err(SnapshotError::Bad {
            path: path.display().to_string(),
            why: format!("a memory file of {len} bytes; the snapshot's RAM has {size}"),
        });
    }
    Ok(f)
}

fn mem_err(path: &Path, e: popek_memory::MemoryError) -> SnapshotError {
    SnapshotError::Bad {
        path: path.display().to_string(),
        why: e.to_string(),
    }
}

impl Layer {
    /// The pages this layer replaces, one flag per page of a RAM of `pages`
    /// pages: `None` for a full snapshot (all of them).
    fn page_set(&self, pages: u64) -> Result<Option<Vec<bool>>, SnapshotError> {
        match self.desc.kind {
            SnapshotKind::Full => Ok(None),
            SnapshotKind::Diff => {
                page_set(&self.desc.pages, pages)
                    .map(Some)
                    .ok_or_else(|| SnapshotError::Bad {
                        path: self.state.display().to_string(),
                        why: "a diff page list beyond RAM".into(),
                    })
            }
        }
    }
}

/// Fills `ram` from a memory chain: each layer's pages over the ones
/// before, each checked against its state file's checksum. With `mapped`,
/// the first (full) layer is already `ram`'s backing file: it is not read
/// at all (that is what makes a clone start in milliseconds), so only its
/// size was checked.
fn load_layers(ram: &GuestRam, layers: &[Layer], mapped: bool) -> Result<(), SnapshotError> {
    let pages = ram.size() / PAGE_SIZE;
    for (i, l) in layers.iter().enumerate() {
        if i == 0 && mapped {
            continue;
        }
        let f = open_mem(&l.mem, ram.size())?;
        let set = l.page_set(pages)?;
        let wanted = set.as_ref().map(|s| move |p: u64| s[p as usize]);
        let wanted_dyn: Option<&dyn Fn(u64) -> bool> = wanted.as_ref().map(|w| w as _);
        let got = ram
            .load_image(&f, wanted_dyn)
            .map_err(|e| mem_err(&l.mem, e))?;
        if got.pages != l.desc.pages_stored || got.crc != l.desc.crc32 {
            return Err(SnapshotError::Bad {
                path: l.mem.display().to_string(),
                why: format!(
                    "the memory file does not match its state file {} ({} pages, checksum {:08x}; expected {} pages, {:08x}): changed or corrupted",
                    l.state.display(),
                    got.pages,
                    got.crc,
                    l.desc.pages_stored,
                    l.desc.crc32
                ),
            });
        }
    }
    Ok(())
}

/// Which pages of `ram` differ from RAM as it was at the snapshot whose
/// memory chain is `layers`: the full memory file read chunk by chunk
/// (holes read as zeros), each diff's pages laid over it.
fn changed_since(ram: &GuestRam, layers: &[Layer]) -> Result<Vec<bool>, SnapshotError> {
    use std::os::unix::fs::FileExt;
    let pages = ram.size() / PAGE_SIZE;
    let mut files = Vec::new();
    for l in layers {
        let f = open_mem(&l.mem, ram.size())?;
        let set = l.page_set(pages)?;
        // Only the data extents are read: reading a hole would fill the
        // page cache with zeros.
        let extents =
            popek_memory::image::data_extents(&f, ram.size()).map_err(|e| mem_err(&l.mem, e))?;
        files.push((f, set, extents));
    }
    let mut fill = |first: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let (lo, hi) = (first * PAGE_SIZE, first * PAGE_SIZE + buf.len() as u64);
        for (f, set, extents) in &files {
            match set {
                None => {
                    buf.fill(0);
                    for &(s, e) in extents {
                        let (s, e) = (s.max(lo), e.min(hi));
                        if s < e {
                            f.read_exact_at(&mut buf[(s - lo) as usize..(e - lo) as usize], s)?;
                        }
                    }
                }
                Some(set) => {
                    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE as usize).enumerate() {
                        let p = first + i as u64;
                        if set[p as usize] {
                            f.read_exact_at(page, p * PAGE_SIZE)?;
                        }
                    }
                }
            }
        }
        Ok(())
    };
    ram.pages_differing(&mut fill)
        .map_err(|e| SnapshotError::Refused(format!("cannot compare with the last snapshot: {e}")))
}

fn abs(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Refuses a vCPU state no x86 CPU can be in outside long mode (the only
/// states popek's software CPU holds; a 64-bit state goes to an engine
/// that checks its own): what a hand-edited or damaged snapshot could
/// hold even with a good checksum.
fn check_vcpu(s: &popek_cpu::CpuState) -> Result<(), String> {
    use popek_cpu::state::cr;
    if GuestMode::of_state(s) == GuestMode::Long64 {
        return Ok(());
    }
    if s.rip > u64::from(u32::MAX) || s.gpr[..8].iter().any(|&r| r > u64::from(u32::MAX)) {
        return Err("a register wider than 32 bits outside long mode".into());
    }
    if s.cr0 & cr::CR0_PG != 0 && s.cr0 & cr::CR0_PE == 0 {
        return Err("paging without protected mode".into());
    }
    if s.cr0 > u64::from(u32::MAX) || s.cr3 > u64::from(u32::MAX) || s.cr4 > u64::from(u32::MAX) {
        return Err("a control register wider than 32 bits outside long mode".into());
    }
    let segs = s.seg.iter().chain([&s.ldtr, &s.tr]);
    if segs.clone().any(|g| g.base > u64::from(u32::MAX)) {
        return Err("a segment base beyond 4 GiB outside long mode".into());
    }
    if s.gdtr.base > u64::from(u32::MAX) || s.idtr.base > u64::from(u32::MAX) {
        return Err("a descriptor table beyond 4 GiB outside long mode".into());
    }
    Ok(())
}

/// Refuses an engine that is not here or cannot run `state`.
fn check_engine_for(kind: EngineKind, state: &popek_cpu::CpuState) -> Result<(), String> {
    let f = kind.factory();
    let mode = GuestMode::of_state(state);
    f.available()
        .and_then(|_| f.accepts_vendor(state.vendor))
        .and_then(|_| f.can_run(mode))
        .map_err(|why| {
            format!(
                "engine {} cannot run this VM (its vCPU is in {}): {why}",
                kind.name(),
                mode.describe()
            )
        })
}

impl Vm {
    /// Writes a snapshot: the state file `state`, the memory file `mem`
    /// (default: beside it, see [`mem_path_for`]). A diff holds only the
    /// pages that differ from the last snapshot this VM wrote or was
    /// restored from. Call it between runs (the vCPU stopped).
    pub fn snapshot(
        &mut self,
        state: &Path,
        mem: Option<&Path>,
        kind: SnapshotKind,
    ) -> Result<SnapshotReport, SnapshotError> {
        let t0 = Instant::now();
        let mem = mem.map_or_else(|| mem_path_for(state), Path::to_path_buf);
        let mut vcpus = self.vcpu_states().into_iter();
        let vcpu = vcpus
            .next()
            .map(|v| v.0)
            .unwrap_or_else(|| self.engine.state());
        let aps: Vec<snapshot::ApState> = vcpus
            .map(|(vcpu, wait_for_sipi)| snapshot::ApState {
                vcpu,
                wait_for_sipi,
            })
            .collect();
        // Requests in flight finish first: their buffers are in RAM.
        self.machine.quiesce_devices();
        let devices = self.machine.save_state().map_err(SnapshotError::Machine)?;
        let ram = self.machine.ram().clone();
        let pages = ram.size() / PAGE_SIZE;
        let (tmp, f) = snapshot::temp_beside(&mem)?;
        let result = (|| {
            let (parent, changed) = match kind {
                SnapshotKind::Full => (None, None),
                SnapshotKind::Diff => {
                    let last = self.last_snapshot.as_ref().ok_or_else(|| {
                        SnapshotError::Refused(
                            "a diff snapshot needs an earlier snapshot of this VM: take a full one first"
                                .into(),
                        )
                    })?;
                    if last.layers.iter().any(|l| abs(&l.mem) == abs(&mem))
                        || abs(&last.state) == abs(state)
                    {
                        return Err(SnapshotError::Refused(
                            "a diff snapshot cannot replace a snapshot it builds on: give it new file names"
                                .into(),
                        ));
                    }
                    let changed = changed_since(&ram, &last.layers)?;
                    (Some(last.clone()), Some(changed))
                }
            };
            let wanted = changed.as_ref().map(|c| move |p: u64| c[p as usize]);
            let wanted_dyn: Option<&dyn Fn(u64) -> bool> = wanted.as_ref().map(|w| w as _);
            // No fsync: a snapshot is for going on elsewhere, not for
            // surviving a host crash (Firecracker does not sync either), and
            // syncing 100 MiB would triple the time the guest is paused.
            let stats = ram
                .write_image(&f, wanted_dyn)
                .map_err(|e| mem_err(&tmp, e))?;
            Ok((parent, changed, stats))
        })();
        let (parent, changed, stats) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        snapshot::commit(&tmp, &mem)?;
        let dir = dir_of(state);
        let changed_pages: Vec<u64> = changed
            .as_ref()
            .map(|c| (0..pages).filter(|&p| c[p as usize]).collect())
            .unwrap_or_default();
        let desc = MemoryDesc {
            file: stored_path(&dir, &mem),
            size: ram.size(),
            kind,
            pages_stored: stats.pages,
            crc32: stats.crc,
            parent: parent.as_ref().map(|p| stored_path(&dir, &p.state)),
            pages: runs(changed_pages.iter().copied()),
        };
        let body = VmState {
            format: "popek-vm-state".into(),
            version: snapshot::FORMAT_VERSION,
            popek: env!("CARGO_PKG_VERSION").into(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            engine: self.kind.name().into(),
            cpu_mode: GuestMode::of_state(&vcpu).describe().into(),
            instructions: self.engine.instructions(),
            config: self.config.clone(),
            vcpu,
            aps,
            devices,
            hypercalls: self.hypercalls.clone(),
            memory: desc.clone(),
        };
        snapshot::write_state(state, &body)?;
        let layer = Layer {
            state: abs(state),
            mem: abs(&mem),
            desc,
        };
        let mut layers = parent.map(|p| p.layers).unwrap_or_default();
        layers.push(layer);
        self.last_snapshot = Some(LastSnapshot {
            state: abs(state),
            layers,
        });
        Ok(SnapshotReport {
            state: state.to_path_buf(),
            mem,
            kind,
            pages: stats.pages,
            changed: changed_pages.len() as u64,
            took: t0.elapsed(),
        })
    }

    /// Builds a VM from a snapshot: checks the state file, the engine
    /// against the vCPU's mode, the memory chain against its checksums —
    /// all before anything runs — and continues where the snapshot was.
    /// `console` receives the serial output from there on.
    pub fn restore(
        path: &Path,
        opts: &RestoreOptions,
        console: Box<dyn std::io::Write + Send>,
    ) -> Result<Vm, SnapshotError> {
        let st = snapshot::read_state(path)?;
        let size = st.memory.size;
        if !(crate::MIN_MEMORY..=crate::MAX_MEMORY).contains(&size) || size % PAGE_SIZE != 0 {
            return Err(SnapshotError::Bad {
                path: path.display().to_string(),
                why: format!("RAM of {size} bytes: popek runs 2 MiB to 3 GiB in whole pages"),
            });
        }
        // Far from overflow in any count or time sum (as the clock checks).
        if st.instructions >= 1 << 60 {
            return Err(SnapshotError::Bad {
                path: path.display().to_string(),
                why: format!("{} instructions retired: out of range", st.instructions),
            });
        }
        for (i, v) in std::iter::once(&st.vcpu)
            .chain(st.aps.iter().map(|a| &a.vcpu))
            .enumerate()
        {
            check_vcpu(v).map_err(|why| SnapshotError::Bad {
                path: path.display().to_string(),
                why: format!("vCPU {i} state: {why}"),
            })?;
        }
        let cpus = 1 + st.aps.len() as u32;
        if cpus != st.config.cpus || cpus != st.devices.lapics.len() as u32 {
            return Err(SnapshotError::Bad {
                path: path.display().to_string(),
                why: format!(
                    "{cpus} vCPU states, {} in the configuration, {} local APICs: they must agree",
                    st.config.cpus,
                    st.devices.lapics.len()
                ),
            });
        }
        if st.config.memory != size {
            return Err(SnapshotError::Bad {
                path: path.display().to_string(),
                why: "the configuration and the memory file disagree on RAM's size".into(),
            });
        }
        let kind = match opts.engine {
            Some(k) => {
                check_engine_for(k, &st.vcpu).map_err(SnapshotError::Refused)?;
                k
            }
            None => {
                let took = EngineKind::by_name(&st.engine)
                    .filter(|k| check_engine_for(*k, &st.vcpu).is_ok());
                match took {
                    Some(k) => k,
                    None => {
                        let k = EngineKind::auto_for_mode(GuestMode::of_state(&st.vcpu));
                        check_engine_for(k, &st.vcpu).map_err(SnapshotError::Refused)?;
                        k
                    }
                }
            }
        };
        if cpus > 1 {
            crate::smp_engine(kind).map_err(|e| SnapshotError::Refused(e.to_string()))?;
        }
        let layers = memory_chain(path, &st)?;
        let factory = kind.factory();
        let ram_err = |e| SnapshotError::Refused(format!("cannot allocate guest RAM: {e}"));
        let ram = if factory.needs_shareable_ram() {
            // `trap` maps RAM a second time: it needs its own memfd, so a
            // clone under it is a copy.
            let ram = GuestRam::new_shareable(size).map_err(ram_err)?;
            load_layers(&ram, &layers, false)?;
            ram
        } else if opts.clone {
            let f = open_mem(&layers[0].mem, size)?;
            let ram = GuestRam::map_private(&f, size).map_err(|e| mem_err(&layers[0].mem, e))?;
            load_layers(&ram, &layers, true)?;
            ram
        } else {
            let ram = GuestRam::new(size).map_err(ram_err)?;
            load_layers(&ram, &layers, false)?;
            ram
        };
        let ram = Arc::new(ram);
        let panic = Arc::new(PanicWatch::default());
        let (console, hvc) = crate::route_outputs(
            &st.config.devices,
            Box::new(WatchedConsole {
                inner: console,
                watch: panic.clone(),
            }),
        )
        .map_err(|e| SnapshotError::Refused(e.chain()))?;
        // The devices are opened again (the same disk images) before
        // they take their state.
        let machine = Machine::restored_with(
            MachineConfig {
                clock: st.devices.clock.mode,
                cpus,
            },
            ram,
            console,
            st.devices.clone(),
            |m| {
                crate::attach_devices(m, &st.config.devices, hvc)
                    .map_err(|e| popek_machine::MachineError::Attach(e.chain()))
            },
        )
        .map_err(|e| SnapshotError::Bad {
            path: path.display().to_string(),
            why: popek_engine::error_chain(&e),
        })?;
        let mut engine = factory.create(&machine).map_err(VmError::from)?;
        engine
            .set_state(st.vcpu.clone())
            .map_err(|e| SnapshotError::Refused(popek_engine::error_chain(&e)))?;
        engine.set_instructions(st.instructions);
        let mut vm = Vm::assemble(machine, engine, kind, st.config.clone(), panic);
        vm.set_ap_states(
            st.aps
                .iter()
                .map(|a| (a.vcpu.clone(), a.wait_for_sipi))
                .collect(),
        );
        vm.refresh_threads();
        vm.hypercalls = st.hypercalls.clone();
        vm.last_snapshot = Some(LastSnapshot {
            state: abs(path),
            layers,
        });
        Ok(vm)
    }

    /// Moves the vCPU to engine `kind` between two instructions: the same
    /// state, RAM, devices and instruction count (RAM is copied into a
    /// memfd for `trap`, which maps it twice). Refused, with the reason,
    /// when the engine is not here or cannot run the vCPU's mode now.
    pub fn switch_engine(&mut self, kind: EngineKind) -> Result<(), String> {
        if kind == self.kind {
            return Ok(());
        }
        if self.vcpus.len() > 1 {
            crate::smp_engine(kind).map_err(|e| e.to_string())?;
        }
        let state = self.engine.state();
        check_engine_for(kind, &state)?;
        let factory = kind.factory();
        if factory.needs_shareable_ram() && !self.machine.ram().is_shareable() {
            // No device may write the old RAM after the copy.
            self.machine.quiesce_devices();
            let ram = GuestRam::new_shareable(self.machine.ram().size())
                .map_err(|e| format!("cannot allocate guest RAM: {e}"))?;
            ram.copy_from(self.machine.ram())
                .map_err(|e| format!("cannot copy guest RAM: {e}"))?;
            self.machine.replace_ram(Arc::new(ram));
        }
        let n = self.engine.instructions();
        let mut engine = factory
            .create(&self.machine)
            .map_err(|e| popek_engine::error_chain(&e))?;
        engine
            .set_state(state)
            .map_err(|e| popek_engine::error_chain(&e))?;
        engine.set_instructions(n);
        tracing::debug!(
            "engine switch {} -> {} at {n}",
            self.kind.name(),
            kind.name()
        );
        self.engine = engine;
        self.kind = kind;
        self.switches += 1;
        // The other vCPUs' engines were the old engine's.
        self.ap_engines.clear();
        self.refresh_threads();
        Ok(())
    }

    /// The vCPU's CPU mode now.
    pub fn cpu_mode(&mut self) -> GuestMode {
        GuestMode::of_state(&self.engine.state())
    }

    /// Names the engine that takes over, for a while, where the engine at
    /// hand cannot execute an instruction (`--engine auto` on `hw`: a
    /// software KVM's emulator lacks it); `None`: such a failure ends the
    /// VM, reported with registers.
    pub fn set_fallback(&mut self, engine: Option<EngineKind>) {
        self.fallback = engine.filter(|&e| e != self.kind);
    }

    /// The engine at hand cannot go on: moves to the fallback engine for
    /// [`FALLBACK_SLICE`] instructions, then back. Without a fallback (or
    /// when it cannot take the vCPU) the VM dies with the report.
    pub(crate) fn fall_back(&mut self, engine: &str, reason: &str) -> Option<Outcome> {
        let died = |vm: &mut Vm, why: String| {
            Some(Outcome::Died(crate::report::died(
                vm.engine.as_mut(),
                &format!("engine {engine} failed: {why}"),
            )))
        };
        let Some(to) = self.fallback.filter(|&f| f != self.kind) else {
            return died(self, reason.to_string());
        };
        let from = self.kind;
        if let Err(why) = self.switch_engine(to) {
            return died(self, format!("{reason}\n(and the fallback failed: {why})"));
        }
        tracing::debug!(
            "{} cannot go on at {}: {} takes over",
            from.name(),
            self.engine.instructions(),
            to.name()
        );
        self.return_to = Some((from, self.engine.instructions() + FALLBACK_SLICE));
        None
    }

    /// Pauses the VM: its exit loop serves only control requests until a
    /// `Resume` (a snapshot loaded without `resume_vm`).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Ctrl-A s: a full snapshot to the next free name in the snapshot
    /// directory, reported on the terminal.
    pub(crate) fn console_snapshot(&mut self) {
        let (dir, n) = self.console_snapshots.clone();
        let path = dir.join(format!("popek-{}-{}.snap", std::process::id(), n + 1));
        self.console_snapshots.1 += 1;
        match self.snapshot(&path, None, SnapshotKind::Full) {
            Ok(r) => eprint!(
                "\r\npopek: snapshot written to {} (memory: {}, {} pages, {} ms); `popek restore {}` continues from here\r\n",
                r.state.display(),
                r.mem.display(),
                r.pages,
                r.took.as_millis(),
                r.state.display()
            ),
            Err(e) => eprint!(
                "\r\npopek: snapshot failed: {}\r\n",
                popek_engine::error_chain(&e)
            ),
        }
    }

    fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "id": format!("popek-{}", std::process::id()),
            "state": if self.paused { "Paused" } else { "Running" },
            "vmm_version": env!("CARGO_PKG_VERSION"),
            "app_name": "popek",
            "engine": self.kind.name(),
            "engine_switches": self.switches,
        })
    }

    /// The machine configuration as Firecracker's `GET /machine-config`
    /// shows it.
    pub fn machine_config(&self) -> serde_json::Value {
        serde_json::json!({
            "vcpu_count": self.vcpus.len(),
            "mem_size_mib": self.config.memory >> 20,
            "smt": false,
            "track_dirty_pages": false,
        })
    }

    fn metrics(&mut self) -> serde_json::Value {
        let stats: serde_json::Map<String, serde_json::Value> = self
            .stats()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::from(v)))
            .collect();
        serde_json::json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "engine": self.kind.name(),
            "instructions": self.engine.instructions(),
            "engine_switches": self.switches,
            "hypercalls": self.hypercalls.calls.iter().sum::<u64>(),
            "engine_stats": stats,
        })
    }

    fn serve(&mut self, request: Request) -> (Reply, Option<Outcome>) {
        let done = Ok(serde_json::Value::Null);
        match request {
            Request::Info => (Ok(self.info()), None),
            Request::MachineConfig => (Ok(self.machine_config()), None),
            Request::Pause => {
                self.paused = true;
                (done, None)
            }
            Request::Resume => {
                self.paused = false;
                (done, None)
            }
            Request::Snapshot { state, mem, kind } => {
                if !self.paused {
                    return (
                        Err(Fault::bad(
                            "the VM must be paused to take a snapshot (PATCH /vm {\"state\": \"Paused\"})",
                        )),
                        None,
                    );
                }
                match self.snapshot(&state, mem.as_deref(), kind) {
                    Ok(r) => (
                        Ok(serde_json::json!({
                            "snapshot_path": r.state,
                            "mem_file_path": r.mem,
                            "pages": r.pages,
                            "changed_pages": r.changed,
                            "took_ms": r.took.as_secs_f64() * 1000.0,
                        })),
                        None,
                    ),
                    Err(e) => (Err(Fault::bad(popek_engine::error_chain(&e))), None),
                }
            }
            Request::SwitchEngine(k) => match self.switch_engine(k) {
                Ok(()) => (done, None),
                Err(why) => (Err(Fault::bad(why)), None),
            },
            Request::CtrlAltDel => {
                self.machine.send_ctrl_alt_del();
                (done, None)
            }
            Request::Metrics => (Ok(self.metrics()), None),
            Request::Stop => (done, Some(Outcome::Ended("stopped through the API".into()))),
        }
    }

    /// Serves the pending control requests; while paused, waits for more
    /// (and for Ctrl-A x). Returns an outcome when a request ends the VM.
    pub(crate) fn serve_control(&mut self) -> Option<Outcome> {
        if std::mem::take(&mut self.console_snapshot_asked) {
            self.console_snapshot();
        }
        if let Some(Call { request, reply }) = self.pending_call.take() {
            let (r, outcome) = self.serve(request);
            let _ = reply.send(r);
            if outcome.is_some() {
                return outcome;
            }
        }
        loop {
            let call = match &self.control {
                None => return None,
                Some(rx) if self.paused => match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(c) => Some(c),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        self.control = None;
                        self.paused = false;
                        return None;
                    }
                },
                Some(rx) => match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(std::sync::mpsc::TryRecvError::Empty) => return None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.control = None;
                        return None;
                    }
                },
            };
            if let Some(Call { request, reply }) = call {
                let (r, outcome) = self.serve(request);
                let _ = reply.send(r);
                if outcome.is_some() {
                    return outcome;
                }
            } else if let Some(o) = self.poll_input() {
                return Some(o);
            }
        }
    }
}

impl EngineKind {
    /// The engine called `name` on the command line.
    pub fn by_name(name: &str) -> Option<EngineKind> {
        ENGINES
            .iter()
            .find(|(_, f)| f.name() == name)
            .map(|(k, _)| *k)
    }

    /// The software engine that takes over where `hw` cannot go on, for a
    /// vCPU in `mode`: `bt` where it runs the mode, else `interp`.
    pub fn fallback_for(mode: GuestMode) -> Option<EngineKind> {
        [EngineKind::Bt, EngineKind::Interp].into_iter().find(|k| {
            let f = k.factory();
            f.available().is_ok() && f.can_run(mode).is_ok()
        })
    }

    /// `--engine auto`'s choice for a vCPU in `mode`.
    pub fn auto_for_mode(mode: GuestMode) -> EngineKind {
        let factories: Vec<&dyn popek_engine::EngineFactory> =
            ENGINES.iter().map(|(_, f)| *f).collect();
        popek_engine::factory::choose(&factories, Some(mode))
            .and_then(|(f, _)| EngineKind::by_name(f.name()))
            .unwrap_or(EngineKind::Interp)
    }
}
