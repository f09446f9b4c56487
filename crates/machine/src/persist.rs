//! Saving and restoring device state, after Firecracker's `Persist` model:
//! each device turns its state into a plain, serializable value and takes
//! it back, checking it, so that a snapshot holds every device and a
//! corrupt or hand-edited one is refused with the device's name instead of
//! running a device whose invariants do not hold.
//!
//! The machine's whole state is [`MachineState`]: one field per device
//! plus the clock. `docs/snapshots.md` describes the file around it.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// A device whose state can be saved and restored.
pub trait Persist {
    /// The saved state.
    type State: Serialize + DeserializeOwned;
    /// The device's name in a snapshot and in errors.
    const NAME: &'static str;

    /// The device's state now.
    fn save(&self) -> Self::State;

    /// Replaces the device's state with `state`, or refuses it (then the
    /// device is unchanged).
    fn restore(&mut self, state: Self::State) -> Result<(), StateError>;
}

/// A saved device state that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device}: {why}")]
pub struct StateError {
    /// The device.
    pub device: &'static str,
    /// What is wrong.
    pub why: String,
}

impl StateError {
    /// An error for `device`.
    pub fn new(device: &'static str, why: &str) -> Self {
        StateError {
            device,
            why: why.into(),
        }
    }
}

/// Devices whose saved state is the device itself: restoring checks it
/// and takes it.
macro_rules! persist_as_itself {
    ($ty:ty, $name:literal) => {
        impl Persist for $ty {
            type State = $ty;
            const NAME: &'static str = $name;
            fn save(&self) -> $ty {
                self.clone()
            }
            fn restore(&mut self, state: $ty) -> Result<(), StateError> {
                state
                    .check()
                    .map_err(|why| StateError::new(Self::NAME, &why))?;
                *self = state;
                Ok(())
            }
        }
    };
}

persist_as_itself!(crate::pic::Pic, "pic");
persist_as_itself!(crate::pit::Pit, "pit");
persist_as_itself!(crate::i8042::I8042, "i8042");
persist_as_itself!(crate::acpi::PmBlock, "acpi-pm");
impl Persist for crate::pci::Pci {
    type State = crate::pci::Pci;
    const NAME: &'static str = "pci";
    fn save(&self) -> crate::pci::Pci {
        self.clone()
    }
    fn restore(&mut self, state: crate::pci::Pci) -> Result<(), StateError> {
        self.restore_from(&state)
            .map_err(|why| StateError::new(Self::NAME, &why))
    }
}
persist_as_itself!(crate::ioapic::IoApic, "ioapic");
persist_as_itself!(crate::lapic::LocalApic, "lapic");

fn reset_lapics() -> Vec<crate::lapic::LocalApic> {
    vec![crate::lapic::LocalApic::new(0)]
}

/// The machine clock's saved state: machine time carries on from where it
/// was (under the host clock, from the machine time at the snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Host or virtual.
    pub mode: crate::ClockMode,
    /// Machine time at the snapshot, ns.
    pub now_ns: u64,
    /// Unix time (ns) at machine time 0.
    pub wall_base_ns: u64,
    /// Virtual clock: idle and port-access time, ns.
    pub idle_ns: u64,
    /// Virtual clock: the instruction count time was last advanced to.
    pub instructions: u64,
}

/// One device on PCI bus 0 in a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PciDeviceState {
    /// Its slot (device number).
    pub slot: u8,
    /// What it is ([`crate::pci_device::PciDevice::kind`]).
    pub kind: String,
    /// Its own state.
    pub state: serde_json::Value,
}

/// Every device of the machine and its clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineState {
    /// The clock.
    pub clock: ClockState,
    /// The 8259A pair.
    pub pic: crate::pic::Pic,
    /// The 8254.
    pub pit: crate::pit::Pit,
    /// The CMOS RTC.
    pub rtc: crate::rtc::RtcState,
    /// COM1.
    pub uart: crate::uart::UartState,
    /// The i8042.
    pub i8042: crate::i8042::I8042,
    /// The ACPI PM1 block.
    pub pm: crate::acpi::PmBlock,
    /// PCI configuration mechanism #1 and the host bridge (absent from
    /// snapshots taken before it existed: then as after reset).
    #[serde(default)]
    pub pci: crate::pci::Pci,
    /// The local APIC of each vCPU, in vCPU order (absent from snapshots
    /// taken before the APIC existed: one, as after reset).
    #[serde(default = "reset_lapics")]
    pub lapics: Vec<crate::lapic::LocalApic>,
    /// The I/O APIC (absent from older snapshots: as after reset).
    #[serde(default)]
    pub ioapic: crate::ioapic::IoApic,
    /// A stop a device asked for and the VMM has not yet served.
    pub stop: Option<crate::StopReason>,
    /// The devices on PCI bus 0 beside the host bridge (none in older
    /// snapshots).
    #[serde(default)]
    pub pci_devices: Vec<PciDeviceState>,
}
