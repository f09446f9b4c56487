//! The paragraphs popek prints when a guest dies or stops making progress:
//! the reason, the registers and the bytes of the last instruction.

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
use popek_cpu::state::seg;
use popek_engine::Engine;

/// Registers and the current instruction, as text.
pub fn cpu_dump(engine: &mut dyn Engine) -> String {
    let s = engine.state();
    let g = &s.gpr;
    let cs = s.seg[seg::CS];
    let lin = cs.base.wrapping_add(s.rip);
    let mut bytes = [0u8; 15];
    let mut n = 0;
    for (i, b) in bytes.iter_mut().enumerate() {
        let mut one = [0u8];
        if engine.peek_linear(lin + i as u64, &mut one).is_none() {
            break;
        }
        *b = one[0];
        n = i + 1;
    }
    let long = s.efer & (1 << 10) != 0 && cs.attr & popek_cpu::state::attr::L != 0;
    let bitness = if long {
        64
    } else if cs.big() {
        32
    } else {
        16
    };
    let mut text = String::from("(unreadable)");
    if n > 0 {
        let mut dec = Decoder::with_ip(bitness, &bytes[..n], s.rip, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        dec.decode_out(&mut insn);
        let mut out = String::new();
        IntelFormatter::new().format(&insn, &mut out);
        text = out;
    }
    let hex: Vec<String> = bytes[..n].iter().map(|b| format!("{b:02x}")).collect();
    if long {
        return format!(
            "  RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n  \
             RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n  \
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n  \
             R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n  \
             RIP={:016x} RFLAGS={:08x} CPL={} CS={:04x} SS={:04x} EFER={:x}\n  \
             CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} GDTR={:x}/{:04x} IDTR={:x}/{:04x} TR={:04x}\n  \
             instruction at {:04x}:{:016x}: {} [{}]",
            g[0],
            g[3],
            g[1],
            g[2],
            g[6],
            g[7],
            g[5],
            g[4],
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15],
            s.rip,
            s.rflags,
            s.cpl(),
            cs.selector,
            s.seg[seg::SS].selector,
            s.efer,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.gdtr.base,
            s.gdtr.limit,
            s.idtr.base,
            s.idtr.limit,
            s.tr.selector,
            cs.selector,
            s.rip,
            text,
            hex.join(" ")
        );
    }
    format!(
        "  EAX={:08x} EBX={:08x} ECX={:08x} EDX={:08x} ESI={:08x} EDI={:08x} EBP={:08x} ESP={:08x}\n  \
         EIP={:08x} EFLAGS={:08x} CPL={} CS={:04x} SS={:04x} DS={:04x} ES={:04x}\n  \
         CR0={:08x} CR2={:08x} CR3={:08x} CR4={:08x} GDTR={:08x}/{:04x} IDTR={:08x}/{:04x} TR={:04x}\n  \
         instruction at {:04x}:{:08x}: {} [{}]",
        g[0] as u32,
        g[3] as u32,
        g[1] as u32,
        g[2] as u32,
        g[6] as u32,
        g[7] as u32,
        g[5] as u32,
        g[4] as u32,
        s.rip as u32,
        s.rflags as u32,
        s.cpl(),
        cs.selector,
        s.seg[seg::SS].selector,
        s.seg[seg::DS].selector,
        s.seg[seg::ES].selector,
        s.cr0 as u32,
        s.cr2 as u32,
        s.cr3 as u32,
        s.cr4 as u32,
        s.gdtr.base as u32,
        s.gdtr.limit,
        s.idtr.base as u32,
        s.idtr.limit,
        s.tr.selector,
        cs.selector,
        s.rip as u32,
        text,
        hex.join(" ")
    )
}

/// The report for a guest that died.
pub fn died(engine: &mut dyn Engine, reason: &str) -> String {
    if reason.contains("RIP=") && reason.contains("instruction at") {
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
