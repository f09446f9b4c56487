//! Snapshots: a whole VM as two files.
//!
//! The **state file** holds everything but RAM: the vCPU (`CpuState`, with
//! its vendor profile), every device ([`popek_machine::MachineState`]),
//! the machine's configuration, the instruction count, hypercall counts,
//! and a description of the memory file (size, pages stored, checksum,
//! for a diff the parent it applies to). It is one text line of header —
//! `POPEK-SNAPSHOT <version> <body length> <crc32 of the body>` — then the
//! body, JSON: versioned, self-describing, checksummed.
//!
//! The **memory file** is guest RAM byte for byte, sparse (zero pages are
//! holes): see [`popek_memory::image`]. A *full* snapshot's holds all of
//! RAM; a *diff* snapshot's holds only the pages that differ from the
//! snapshot before it (its parent), and its state file lists those pages.
//!
//! Files are written to a temporary name beside the target and renamed
//! into place, so a snapshot is either whole or absent, and a VM running
//! from an older memory file of the same name (a clone maps it) keeps its
//! pages. `docs/snapshots.md` is the user's description.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use popek_cpu::CpuState;
use popek_engine::hypercall::HypercallStats;
use popek_machine::MachineState;
use serde::{Deserialize, Serialize};

/// The state file format this popek writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The first word of every state file.
pub const MAGIC: &str = "POPEK-SNAPSHOT";

/// Longest state file body accepted (the real ones are a few KiB; a diff's
/// page list of 3 GiB of RAM stays far below).
const MAX_BODY: u64 = 64 << 20;

/// Longest chain of diff snapshots followed back to its full snapshot.
pub const MAX_CHAIN: usize = 64;

/// Full or diff.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// All of RAM.
    Full,
    /// Only the pages that differ from the parent snapshot.
    Diff,
}

/// The memory file, as the state file describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDesc {
    /// The memory file: a bare name is beside the state file.
    pub file: PathBuf,
    /// Guest RAM in bytes (the memory file's size).
    pub size: u64,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// Non-zero pages stored.
    pub pages_stored: u64,
    /// CRC-32 over the stored pages (`popek_memory::image::page_crc`).
    pub crc32: u32,
    /// Diff: the parent snapshot's state file (a bare name is beside this
    /// one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    /// Diff: the pages this file replaces, as `[first, count]` runs (a page
    /// listed but absent from the file became zero).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<(u64, u64)>,
}

/// The machine configuration a snapshot was taken with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDesc {
    /// Guest RAM, bytes.
    pub memory: u64,
    /// What was booted (for people: `embedded guest minios`, a path).
    pub guest: String,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs (absent from snapshots of one-vCPU days: 1).
    #[serde(default = "one")]
    pub cpus: u32,
    /// The virtio devices, disks with absolute paths (none in older
    /// snapshots): a restore opens the same images.
    #[serde(default)]
    pub devices: crate::Devices,
}

fn one() -> u32 {
    1
}

/// An application processor (vCPU 1 and up) in a state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApState {
    /// Its registers.
    pub vcpu: CpuState,
    /// Waiting for a start-up IPI.
    pub wait_for_sipi: bool,
}

/// The body of a state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// `popek-vm-state`.
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The popek that wrote it.
    pub popek: String,
    /// When, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The engine that ran the VM.
    pub engine: String,
    /// The vCPU's mode, in words.
    pub cpu_mode: String,
    /// Guest instructions retired.
    pub instructions: u64,
    /// The configuration.
    pub config: ConfigDesc,
    /// vCPU 0, the bootstrap processor.
    pub vcpu: CpuState,
    /// vCPUs 1 and up (absent with one vCPU).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aps: Vec<ApState>,
    /// Every device and the clock.
    pub devices: MachineState,
    /// Hypercall counts.
    pub hypercalls: HypercallStats,
    /// The memory file.
    pub memory: MemoryDesc,
}

/// Why a snapshot could not be written or loaded. popek exits 2 with it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a popek snapshot, or is damaged.
    #[error("{path}: {why}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The snapshot cannot run here (engine, CPU mode, size).
    #[error("{0}")]
    Refused(String),
    /// Saving the devices failed.
    #[error("cannot save the machine")]
    Machine(#[source] popek_machine::StateError),
}

impl SnapshotError {
    /// The message with every cause after it, on one line.
    pub fn chain(&self) -> String {
        popek_engine::error_chain(self)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn bad(path: &Path, why: impl Into<String>) -> SnapshotError {
    SnapshotError::Bad {
        path: path.display().to_string(),
        why: why.into(),
    }
}

/// The memory file written beside state file `state` when none is named:
/// the state file's name with `.mem` appended (`vm.snap` → `vm.snap.mem`).
pub fn mem_path_for(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".mem");
    state.with_file_name(name)
}

/// `target` as stored in a file that lives in `dir`: a bare name when it is
/// in the same directory, else absolute.
pub fn stored_path(dir: &Path, target: &Path) -> PathBuf {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let t = abs(target);
    match (t.parent(), t.file_name()) {
        (Some(parent), Some(name)) if parent == abs(dir) => PathBuf::from(name),
        _ => t,
    }
}

/// `stored` (from a file in `dir`) as a path to open.
pub fn resolve_path(dir: &Path, stored: &Path) -> PathBuf {
    if stored.is_absolute() {
        stored.to_path_buf()
    } else {
        dir.join(stored)
    }
}

/// The directory a file lives in (`.` for a bare name).
pub fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary file beside `target`, renamed over it by [`commit`].
pub fn temp_beside(target: &Path) -> Result<(PathBuf, File), SnapshotError> {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = target.with_file_name(name);
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io(&tmp))?;
    Ok((tmp, f))
}

/// Makes a temporary file (see [`temp_beside`]) the target.
pub fn commit(tmp: &Path, target: &Path) -> Result<(), SnapshotError> {
    std::fs::rename(tmp, target).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        io(target)(e)
    })
}

/// Writes `state` to `path` (through a temporary file and a rename).
pub fn write_state(path: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let body = serde_json::to_vec_pretty(state).map_err(|e| bad(path, e.to_string()))?;
    let header = format!(
        "{MAGIC} {FORMAT_VERSION} {} {:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    );
    let (tmp, mut f) = temp_beside(path)?;
    f.write_all(header.as_bytes())
        .and_then(|_| f.write_all(&body))
        .map_err(io(&tmp))?;
    commit(&tmp, path)
}

/// Reads and checks a state file: header, length, checksum, version, body.
pub fn read_state(path: &Path) -> Result<VmState, SnapshotError> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(bad(path, "not a regular file"));
    }
    let mut data = Vec::new();
    File::open(path)
        .map_err(io(path))?
        .take(MAX_BODY + 256)
        .read_to_end(&mut data)
        .map_err(io(path))?;
    let nl = data
        .iter()
        .take(256)
        .position(|&b| b == b'\n')
        .ok_or_else(|| bad(path, "not a popek snapshot (no header line)"))?;
    let header = std::str::from_utf8(&data[..nl]).map_err(|_| bad(path, "not a popek snapshot"))?;
    let f: Vec<&str> = header.split(' ').collect();
    if f.len() != 4 || f[0] != MAGIC {
        return Err(bad(path, "not a popek snapshot (no POPEK-SNAPSHOT header)"));
    }
    let version: u32 = f[1].parse().map_err(|_| bad(path, "bad header: version"))?;
    if version != FORMAT_VERSION {
        return Err(bad(
            path,
            format!("snapshot format version {version}; this popek reads version {FORMAT_VERSION}"),
        ));
    }
    let len: u64 = f[2].parse().map_err(|_| bad(path, "bad header: length"))?;
    let crc = u32::from_str_radix(f[3], 16).map_err(|_| bad(path, "bad header: checksum"))?;
    let body = &data[nl + 1..];
    if len > MAX_BODY || body.len() as u64 != len {
        return Err(bad(
            path,
            format!(
                "truncated or extended: the header says {len} bytes of state, the file has {}",
                body.len()
            ),
        ));
    }
    let actual = crc32fast::hash(body);
    if actual != crc {
        return Err(bad(
            path,
            format!("corrupted: checksum {actual:08x}, the header says {crc:08x}"),
        ));
    }
    let state: VmState =
        serde_json::from_slice(body).map_err(|e| bad(path, format!("bad state: {e}")))?;
    if state.format != "popek-vm-state" || state.version != FORMAT_VERSION {
        return Err(bad(path, "bad state: format or version field"));
    }
    Ok(state)
}

/// Sorted page numbers as `[first, count]` runs.
pub fn runs(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// A set of pages from runs, as one flag per page of a RAM of `pages`
/// pages; `None` when a run leaves RAM.
pub fn page_set(runs: &[(u64, u64)], pages: u64) -> Option<Vec<bool>> {
    let mut set = vec![false; usize::try_from(pages).ok()?];
    for &(first, n) in runs {
        let end = first.checked_add(n)?;
        if end > pages {
            return None;
        }
        for p in first..end {
            set[p as usize] = true;
        }
    }
    Some(set)
}

/// One memory file of a chain, oldest (the full snapshot) first.
#[derive(Clone, Debug)]
pub struct Layer {
    /// The state file that describes it.
    pub state: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
    /// Its description.
    pub desc: MemoryDesc,
}

/// The memory files a snapshot's RAM is built from: its full ancestor
/// first, then each diff up to itself. Every link is checked: kind, size,
/// depth, no cycle.
pub fn memory_chain(path: &Path, top: &VmState) -> Result<Vec<Layer>, SnapshotError> {
    let mut chain = Vec::new();
    let mut state_path = path.to_path_buf();
    let mut desc = top.memory.clone();
    loop {
        let dir = dir_of(&state_path);
        if desc.size != top.memory.size {
            return Err(bad(
                &state_path,
                format!(
                    "a diff chain of different RAM sizes ({} and {} bytes)",
                    desc.size, top.memory.size
                ),
            ));
        }
        let mem = resolve_path(&dir, &desc.file);
        let parent = desc.parent.clone();
        let kind = desc.kind;
        chain.push(Layer {
            state: state_path.clone(),
            mem,
            desc,
        });
        match (kind, parent) {
            (SnapshotKind::Full, _) => break,
            (SnapshotKind::Diff, None) => {
                return Err(bad(&state_path, "a diff snapshot without a parent"))
            }
            (SnapshotKind::Diff, Some(p)) => {
                if chain.len() >= MAX_CHAIN {
                    return Err(bad(
                        path,
                        format!("a diff chain longer than {MAX_CHAIN} snapshots"),
                    ));
                }
                state_path = resolve_path(&dir, &p);
                desc = read_state(&state_path)?.memory;
            }
        }
    }
    chain.reverse();
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_file_goes_beside_the_state_file() {
        assert_eq!(
            mem_path_for(Path::new("a/vm.snap")),
            Path::new("a/vm.snap.mem")
        );
        assert_eq!(mem_path_for(Path::new("vm")), Path::new("vm.mem"));
        assert_eq!(
            stored_path(Path::new("a"), Path::new("a/x.mem")),
            Path::new("x.mem")
        );
        assert!(stored_path(Path::new("a"), Path::new("b/x.mem")).is_absolute());
        assert_eq!(
            resolve_path(Path::new("a"), Path::new("x.mem")),
            Path::new("a/x.mem")
        );
        assert_eq!(dir_of(Path::new("vm.snap")), Path::new("."));
    }

    #[test]
    fn runs_and_page_sets_agree() {
        let r = runs([1, 2, 3, 7, 9, 10]);
        assert_eq!(r, vec![(1, 3), (7, 1), (9, 2)]);
        let set = page_set(&r, 12).unwrap();
        let back: Vec<u64> = (0..12).filter(|&p| set[p as usize]).collect();
        assert_eq!(back, vec![1, 2, 3, 7, 9, 10]);
        assert!(
            page_set(&[(10, 5)], 12).is_none(),
            "runs past RAM are refused"
        );
        assert!(page_set(&[(u64::MAX, 2)], 12).is_none());
    }
}
