//! Controlling a running VM from another thread: the requests the API
//! socket (and the console's Ctrl-A keys) turn into, and their replies.
//!
//! The VM serves requests between engine slices, on its own thread, so a
//! request never races the vCPU: pausing stops the exit loop, a snapshot
//! sees a stopped vCPU, an engine switch happens between two instructions.

use std::path::PathBuf;
use std::sync::mpsc::Sender;

use crate::snapshot::SnapshotKind;
use crate::EngineKind;

/// What a caller asks of a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The VM's state and identity (`GET /`).
    Info,
    /// The machine configuration (`GET /machine-config`).
    MachineConfig,
    /// Stop running the vCPU (`PATCH /vm` `Paused`).
    Pause,
    /// Run it again (`PATCH /vm` `Resumed`).
    Resume,
    /// Write a snapshot (`PUT /snapshot/create`); the VM must be paused.
    Snapshot {
        /// The state file.
        state: PathBuf,
        /// The memory file (`None`: beside the state file, see
        /// [`crate::snapshot::mem_path_for`]).
        mem: Option<PathBuf>,
        /// Full or diff.
        kind: SnapshotKind,
    },
    /// Move the vCPU to another engine (`PATCH /vm` `engine`, a popek
    /// extension).
    SwitchEngine(EngineKind),
    /// Press Ctrl-Alt-Del on the keyboard (`PUT /actions`
    /// `SendCtrlAltDel`).
    CtrlAltDel,
    /// The VM's counters (`PUT /actions` `FlushMetrics`).
    Metrics,
    /// End the VM (`popek snapshot --stop`).
    Stop,
}

/// A failed request: an HTTP status and Firecracker's `fault_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// HTTP status (400 for a request the VM refuses).
    pub status: u16,
    /// Why.
    pub message: String,
}

impl Fault {
    /// A 400 fault.
    pub fn bad(message: impl Into<String>) -> Fault {
        Fault {
            status: 400,
            message: message.into(),
        }
    }
}

/// The answer: a JSON document (`null` for "204 No Content") or a fault.
pub type Reply = Result<serde_json::Value, Fault>;

/// A request with the channel its reply goes back on.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// Where the reply goes.
    pub reply: Sender<Reply>,
}
