//! How the VMM learns what an engine needs and can do, and builds one,
//! without knowing which engine it is.
//!
//! Each engine crate implements [`EngineFactory`] for its engine (as
//! cloud-hypervisor separates a hypervisor's creation and capabilities
//! from the vCPU it runs). The VMM keeps a list of factories and asks
//! them: is the engine here, can it run a guest entered in this CPU mode,
//! under this vendor profile, what RAM does it need, and — for
//! `--engine auto` — how much it should be preferred.

use popek_cpu::Vendor;
use popek_machine::Machine;

use crate::{Engine, EngineError};

/// A CPU mode a guest needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// Real mode.
    Real,
    /// Unpaged 32-bit protected mode.
    Protected32,
    /// 32-bit (or PAE) paging.
    Paged32,
    /// 64-bit long mode, entered by the loader.
    Long64,
    /// Long mode, entered by the guest itself from 32-bit code.
    LongFrom32,
}

impl GuestMode {
    /// The mode a vCPU in `state` runs in now (a restored snapshot, an
    /// engine switch).
    pub fn of_state(state: &popek_cpu::CpuState) -> GuestMode {
        use popek_cpu::state::cr;
        const EFER_LMA: u64 = 1 << 10;
        if state.efer & EFER_LMA != 0 {
            GuestMode::Long64
        } else if state.cr0 & cr::CR0_PG != 0 {
            GuestMode::Paged32
        } else if state.cr0 & cr::CR0_PE != 0 {
            GuestMode::Protected32
        } else {
            GuestMode::Real
        }
    }

    /// The mode's name in messages.
    pub fn describe(self) -> &'static str {
        match self {
            GuestMode::Real => "real mode",
            GuestMode::Protected32 => "unpaged protected mode",
            GuestMode::Paged32 => "paged 32-bit protected mode",
            GuestMode::Long64 => "long mode",
            GuestMode::LongFrom32 => "32-bit code that enters long mode",
        }
    }

    /// Whether the mode is (or leads to) long mode.
    pub fn is_long(self) -> bool {
        matches!(self, GuestMode::Long64 | GuestMode::LongFrom32)
    }
}

/// The modes popek's software CPU runs (the `interp`, `bt` and `trap`
/// engines run on it): everything but long mode, for now.
pub fn software_cpu_can_run(mode: GuestMode) -> Result<(), String> {
    if mode.is_long() {
        Err("a 64-bit guest: the software CPU has no long mode yet".into())
    } else {
        Ok(())
    }
}

/// One engine as the VMM sees it before there is a VM: what it is, what it
/// needs, what it can run, and how to build it.
pub trait EngineFactory: Sync {
    /// The engine's name on the command line (`interp`, `bt`, `trap`,
    /// `hw`).
    fn name(&self) -> &'static str;

    /// One line on what the engine does, for `--engine auto`'s reason.
    fn describe(&self) -> String;

    /// `Ok` when this build has the engine on this host, else why not.
    fn available(&self) -> Result<(), String>;

    /// `Ok` when the engine can run a guest that needs `mode`, else why
    /// not. May be costly the first time (`hw` probes its KVM).
    fn can_run(&self, mode: GuestMode) -> Result<(), String>;

    /// `Ok` when the engine can present the CPU vendor profile `vendor`.
    fn accepts_vendor(&self, _vendor: Vendor) -> Result<(), String> {
        Ok(())
    }

    /// Guest RAM must be shareable (memfd-backed), because the engine maps
    /// it a second time.
    fn needs_shareable_ram(&self) -> bool {
        false
    }

    /// Place in `--engine auto`'s order (lower first), or `None` when the
    /// engine is only run when asked for. Called only when
    /// [`EngineFactory::available`] is `Ok`.
    fn auto_rank(&self) -> Option<u8>;

    /// Builds the engine for `machine` (its RAM as
    /// [`EngineFactory::needs_shareable_ram`] asked).
    fn create(&self, machine: &Machine) -> Result<Box<dyn Engine>, EngineError>;
}

/// `--engine auto`: of the available `engines` that take part, the first in
/// rank order that can run `mode` (`None`: unknown, taken as a 32-bit
/// guest), with the reason in words. When none can, the first one, whose
/// run will say what it lacks.
pub fn choose<'a>(
    engines: &[&'a dyn EngineFactory],
    mode: Option<GuestMode>,
) -> Option<(&'a dyn EngineFactory, String)> {
    let mut ranked: Vec<(u8, &'a dyn EngineFactory)> = engines
        .iter()
        .filter(|f| f.available().is_ok())
        .filter_map(|f| f.auto_rank().map(|r| (r, *f)))
        .collect();
    ranked.sort_by_key(|(r, _)| *r);
    let mut passed = Vec::new();
    for (_, f) in &ranked {
        match mode.map_or(Ok(()), |m| f.can_run(m)) {
            Ok(()) => {
                let mut why = f.describe();
                if !passed.is_empty() {
                    why = format!("{why} (not {})", passed.join("; "));
                }
                return Some((*f, why));
            }
            Err(e) => passed.push(format!("{}: {e}", f.name())),
        }
    }
    let (_, first) = ranked.first()?;
    Some((
        *first,
        format!(
            "no engine here runs this guest's CPU mode ({}); trying {}",
            passed.join("; "),
            first.name()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        name: &'static str,
        rank: Option<u8>,
        here: bool,
        long: bool,
    }

    impl EngineFactory for Fake {
        fn name(&self) -> &'static str {
            self.name
        }
        fn describe(&self) -> String {
            format!("{} runs it", self.name)
        }
        fn available(&self) -> Result<(), String> {
            if self.here {
                Ok(())
            } else {
                Err("absent".into())
            }
        }
        fn can_run(&self, mode: GuestMode) -> Result<(), String> {
            if mode.is_long() && !self.long {
                Err("no long mode".into())
            } else {
                Ok(())
            }
        }
        fn auto_rank(&self) -> Option<u8> {
            self.rank
        }
        fn create(&self, _: &Machine) -> Result<Box<dyn Engine>, EngineError> {
            Err(EngineError::Unavailable {
                engine: self.name,
                reason: "a fake".into(),
            })
        }
    }

    fn fake(name: &'static str, rank: Option<u8>, here: bool, long: bool) -> Fake {
        Fake {
            name,
            rank,
            here,
            long,
        }
    }

    #[test]
    fn auto_takes_the_first_ranked_engine_that_runs_the_mode() {
        let fast = fake("fast", Some(0), false, true);
        let soft = fake("soft", Some(1), true, false);
        let never = fake("never", None, true, true);
        let last = fake("last", Some(3), true, true);
        let all: [&dyn EngineFactory; 4] = [&last, &never, &soft, &fast];
        let (f, why) = choose(&all, Some(GuestMode::Paged32)).unwrap();
        assert_eq!((f.name(), why.as_str()), ("soft", "soft runs it"));
        let (f, why) = choose(&all, Some(GuestMode::Long64)).unwrap();
        assert_eq!(f.name(), "last");
        assert!(why.contains("not soft: no long mode"), "{why}");
        assert_eq!(choose(&all, None).unwrap().0.name(), "soft");
    }

    #[test]
    fn when_no_engine_runs_the_mode_auto_tries_the_first() {
        let soft = fake("soft", Some(1), true, false);
        let all: [&dyn EngineFactory; 1] = [&soft];
        let (f, why) = choose(&all, Some(GuestMode::LongFrom32)).unwrap();
        assert_eq!(f.name(), "soft");
        assert!(why.starts_with("no engine here runs"), "{why}");
        assert!(choose(&[], None).is_none());
    }
}
