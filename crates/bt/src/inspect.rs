//! What `bt` shows of itself: its statistics and CCF dumps
//! (`--dump-ccf`).

use super::*;

impl BtCore {
    /// The CCF compiled for guest-physical `phys` (any EIP/CPL), as host
    /// code bytes and their address, for dumps and documentation.
    pub fn ccf_at(&self, phys: u64) -> Option<(u64, &[u8])> {
        self.map.iter().find_map(|(k, e)| match *e {
            Entry::Ccf { code, bytes, .. } if k.0 == phys => {
                Some((code as u64, self.cache.bytes(code as u64, bytes as usize)))
            }
            _ => None,
        })
    }

    /// The CCF at guest-physical `addr` (or, when none starts there, the
    /// one for guest EIP `addr`: physical pages differ from run to run) as
    /// text: the guest instructions of its TU, then the host code, both
    /// disassembled.
    pub fn dump_ccf(&self, addr: u64) -> Option<String> {
        use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};
        use std::fmt::Write as _;
        let is_ccf = |e: &Entry| matches!(e, Entry::Ccf { .. });
        let phys = if self.map.iter().any(|(k, e)| k.0 == addr && is_ccf(e)) {
            addr
        } else {
            let (k, _) = self
                .map
                .iter()
                .find(|(k, e)| k.1 as u64 == addr && is_ccf(e))?;
            k.0
        };
        let (insns, guest_len, bits, key) = self.map.iter().find_map(|(k, e)| match *e {
            Entry::Ccf { insns, .. } if k.0 == phys => {
                let bits = if k.2 & 0x20 != 0 { 16 } else { 32 };
                Some((insns, 15 * insns as usize, bits, *k))
            }
            _ => None,
        })?;
        let eip = key.1;
        let (addr, host) = self.ccf_at(phys)?;
        let mut out = String::new();
        let mut fmt = IntelFormatter::new();
        let mut text = String::new();
        let mut guest = vec![0u8; guest_len.min(4096 - (phys as usize & 0xfff))];
        self.cpu.ram().read(phys, &mut guest).ok()?;
        let _ = writeln!(
            out,
            "TU at guest-physical {phys:#x} (EIP {eip:#x}, {bits}-bit code): {insns} guest instructions"
        );
        // Guest-physical addresses of the instructions: consecutive, or
        // where a trace went.
        let places: Vec<u64> = match self.traces.get(&key) {
            Some(eips) => eips
                .iter()
                .map(|&e| (phys & !0xfff) | (e & 0xfff) as u64)
                .collect(),
            None => {
                let mut dec = Decoder::with_ip(bits, &guest, phys, DecoderOptions::NONE);
                (0..insns)
                    .map_while(|_| dec.can_decode().then(|| dec.decode().ip()))
                    .collect()
            }
        };
        let mut insn = Instruction::default();
        for at in places {
            let mut bytes = [0u8; 15];
            let n = 15.min(0x1000 - (at as usize & 0xfff));
            self.cpu.ram().read(at, &mut bytes[..n]).ok()?;
            Decoder::with_ip(bits, &bytes[..n], at, DecoderOptions::NONE).decode_out(&mut insn);
            text.clear();
            fmt.format(&insn, &mut text);
            let _ = writeln!(out, "  {:08x}  {text}", insn.ip());
        }
        let _ = writeln!(out, "CCF at host {addr:#x}: {} bytes", host.len());
        let mut dec = Decoder::with_ip(64, host, addr, DecoderOptions::NONE);
        while dec.can_decode() {
            dec.decode_out(&mut insn);
            text.clear();
            fmt.format(&insn, &mut text);
            let _ = writeln!(out, "  {:016x}  {text}", insn.ip());
        }
        Some(out)
    }

    /// Statistics as `(name, value)` pairs.
    pub fn stats_list(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("instructions", self.cpu.icount),
            ("TUs translated", s.tus),
            ("CCF bytes", s.ccf_bytes),
            ("translation cache bytes in use", self.cache.used() as u64),
            ("dispatches", s.lookups),
            ("interpreter runs of code not yet hot", s.cold_runs),
            ("cache hits", s.hits),
            (
                "cache hit rate (per mille)",
                (s.hits * 1000).checked_div(s.lookups).unwrap_or(0),
            ),
            ("CCF executions", s.ccf_runs),
            ("ident instructions (static)", s.static_ident),
            ("inline instructions (static)", s.static_inline),
            ("call-out sites (static)", s.static_callout),
            ("fallback sites (static)", s.static_fallback),
            ("ident instructions (dynamic)", s.dyn_ident),
            ("inline instructions (dynamic)", s.dyn_inline),
            ("call-outs (dynamic)", s.callouts),
            ("fallbacks (dynamic)", s.fallbacks),
            ("instructions interpreted", s.dyn_interp),
            ("inline TLB misses", s.tlb_misses),
            ("adaptive retranslations", s.adapted),
            ("code pages invalidated", s.invalidations),
            ("cache flushes", s.flushes),
            ("TU map entries", self.map.len() as u64),
            ("heat counts reset", s.cold_resets),
            (
                "pages left to the interpreter (retranslated too often)",
                self.smc_pages
                    .values()
                    .filter(|&&(c, _)| c >= VOLATILE_AFTER)
                    .count() as u64,
            ),
            (
                "decoded-block cache, KiB",
                self.cpu.block_cache_bytes() as u64 >> 10,
            ),
            (
                "decoded-block cache flushes",
                self.cpu.stats.block_cache_flushes,
            ),
            ("compile errors", s.compile_errors),
            ("chained transfers", s.chains),
            (
                "chaining rate (per mille of CCF executions)",
                (s.chains * 1000).checked_div(s.ccf_runs).unwrap_or(0),
            ),
            ("chain links patched", s.links),
            ("indirect-branch table hits", self.ib_hits()),
            ("indirect-branch exits to the dispatcher", s.ib_exits),
            (
                "indirect-branch hit rate (per mille)",
                (self.ib_hits() * 1000)
                    .checked_div(self.ib_hits() + s.ib_exits)
                    .unwrap_or(0),
            ),
            ("indirect-branch records filled", s.ib_fills),
            (
                "memory instructions sharing a probe (static)",
                s.shared_probes,
            ),
            ("probe groups unshared after misses", s.unshared),
            ("translation time (µs)", s.translate_ns / 1000),
        ]
    }
}

/// The engine's counters (see [`BtCore::stats`]).
#[derive(Clone, Debug, Default)]
pub struct BtStats {
    /// TUs compiled into CCFs.
    pub tus: u64,
    /// Bytes of host code emitted.
    pub ccf_bytes: u64,
    /// Dispatcher lookups.
    pub lookups: u64,
    /// Interpreter runs of code not yet hot enough to translate.
    pub cold_runs: u64,
    /// Lookups that found a translation.
    pub hits: u64,
    /// CCF executions.
    pub ccf_runs: u64,
    /// Static counts: instructions translated ident / inline; call-out
    /// entries (designed / fallback).
    pub static_ident: u64,
    /// See `static_ident`.
    pub static_inline: u64,
    /// See `static_ident`.
    pub static_callout: u64,
    /// See `static_ident`.
    pub static_fallback: u64,
    /// Dynamic counts: guest instructions retired by ident / inline code.
    pub dyn_ident: u64,
    /// See `dyn_ident`.
    pub dyn_inline: u64,
    /// Interpreter runs started at a designed call-out / a fallback.
    pub callouts: u64,
    /// See `callouts`.
    pub fallbacks: u64,
    /// Guest instructions retired by the interpreter (call-outs, fallbacks,
    /// untranslated modes, interrupt windows).
    pub dyn_interp: u64,
    /// Inline TLB probes that missed (the instruction ran on the
    /// interpreter).
    pub tlb_misses: u64,
    /// Chained transfers between CCFs (no dispatcher in between).
    pub chains: u64,
    /// Chain links patched.
    pub links: u64,
    /// Instructions retranslated as call-outs because they kept missing.
    pub adapted: u64,
    /// TUs the assembler refused (interpreted instead; expected 0).
    pub compile_errors: u64,
    /// Code pages whose translations were dropped.
    pub invalidations: u64,
    /// Whole-cache flushes (cache full or code cache flushed).
    pub flushes: u64,
    /// Times the heat counts of cold code started again ([`MAX_KEYS`]).
    pub cold_resets: u64,
    /// Indirect transfers (RET) that found their target in the inline
    /// indirect-branch table (counted by the CCFs: `translate::IB_HIT`).
    pub ib_hits: u64,
    /// Indirect transfers that returned to the dispatcher (not in the
    /// table, TLB changed, or the chain budget ran out).
    pub ib_exits: u64,
    /// Indirect-branch table records written by the dispatcher.
    pub ib_fills: u64,
    /// Memory instructions translated without a probe of their own (they
    /// share an earlier one's: `translate::share`), static.
    pub shared_probes: u64,
    /// Host time spent translating (planning, compiling, linking), ns.
    pub translate_ns: u64,
    /// Shared probes' groups retranslated without sharing (their span kept
    /// missing).
    pub unshared: u64,
}

impl Inspect for Bt {
    fn dump_translation(&mut self, phys: u64) -> Option<String> {
        self.core.dump_ccf(phys)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.core.stats_list()
    }
}
