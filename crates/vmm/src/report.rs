//! The paragraphs popek prints when a guest dies or stops making progress:
//! the reason, the registers and the bytes of the last instruction.

use popek_cpu::state::seg;
use popek_engine::Engine;

/// Registers and the current instruction, as text.
pub fn cpu_dump(engine: &mut dyn Engine) -> String {
    let s = engine.state();
    let lin = s.seg[seg::CS].base.wrapping_add(s.rip);
    let mut bytes = Vec::with_capacity(15);
    for i in 0..15u64 {
        let mut one = [0u8];
        if engine.peek_linear(lin.wrapping_add(i), &mut one).is_none() {
            break;
        }
        bytes.push(one[0]);
    }
    format!("{s}\n  {}", s.instruction_line(&bytes))
}

/// The report for a guest that died.
pub fn died(engine: &mut dyn Engine, reason: &str) -> String {
    if reason.contains("instruction at") {
        // The engine's report already has the registers and the
        // instruction (the hw engine's KVM failure reports do).
        return format!(
            "popek: the guest died on engine {}: {reason}",
            engine.name()
        );
    }
    let hint = engine
        .inspect()
        .and_then(|i| i.stall_hint())
        .map(|h| format!("\n{h}"))
        .unwrap_or_default();
    format!(
        "popek: the guest died on engine {}: {reason}{hint}\n{}",
        engine.name(),
        cpu_dump(engine)
    )
}

/// The report for a guest that stopped making progress.
pub fn no_progress(engine: &mut dyn Engine, reason: &str) -> String {
    let hint = engine
        .inspect()
        .and_then(|i| i.stall_hint())
        .map(|h| format!("\n{h}"))
        .unwrap_or_default();
    format!(
        "popek: no progress on engine {}: {reason}{hint}\n{}",
        engine.name(),
        cpu_dump(engine)
    )
}
