//! Planning a translation unit: decoding guest code from an entry point
//! until a block end, classifying each instruction, within the limits of
//! one TU.

use super::*;

/// A planned TU: what to emit, and the counts.
pub struct Plan {
    pub(crate) items: Vec<Item>,
    /// The EIP of each guest instruction, in the order the TU runs them.
    pub eips: Vec<u32>,
    /// The TU follows a JMP, CALL or RET (its instructions are not
    /// consecutive).
    pub traced: bool,
    /// EIP after the last instruction (for TUs that do not end in a jump).
    pub next_eip: u32,
    /// Guest instructions.
    pub insns: u32,
    /// Of which ident.
    pub ident: u32,
    /// Of which inline.
    pub inline: u32,
    /// Of which call-outs made from inside the CCF ([`Item::Interp1`]).
    pub callouts: u32,
    /// CS base & 0xfff (see [`Ctx::cs_lo`]).
    pub cs_lo: u32,
}

/// What the translator made of the code at one EIP.
pub enum Translation {
    /// A TU to compile.
    Tu(Plan),
    /// The first instruction is a call-out: run `run` instructions on the
    /// interpreter; `callouts` of the first `run` are designed call-outs,
    /// the rest fallbacks.
    Interp {
        /// Instructions to run.
        run: u32,
        /// How many of them are designed call-outs.
        callouts: u32,
        /// For the fallback profile: `(code * 4 + segment) * 4 + why`, the
        /// first instruction's form (`Code`), its segment prefix (0 none,
        /// 1 FS, 2 GS, 3 other) and why it is interpreted (0 not
        /// translated, 1 adaptive call-out, 2 non-flat data segments).
        first: u32,
    },
}

/// Translation context: what the TU key fixes.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// The CPL the TU runs at.
    pub cpl: u8,
    /// Inline sensitive instructions (off while the CPU reports them).
    pub inline_sensitive: bool,
    /// DS, ES and SS are flat (base 0, limit 4 GiB, present, writable,
    /// expand-up): memory operands through them are ident with an inline
    /// TLB probe.
    pub flat_data: bool,
    /// FS (bit 0) and GS (bit 1) are present writable expand-up data
    /// segments with a 4 GiB limit: memory operands through them are ident
    /// with the segment base (read from `CpuState` at run time) added and
    /// the limit checked in the inline probe (BMI2 hosts only).
    /// In 16-bit code: the same with a limit of at least 0xffff.
    pub fs_gs: u8,
    /// 16-bit code (CS.D = 0, real or protected mode; BMI2 hosts only).
    /// `flat_data` then means: DS, ES and SS are present writable
    /// expand-up data segments with limits of at least 0xffff and SS is a
    /// 16-bit stack; memory operands add the segment base (read at run
    /// time) to the 16-bit offset.
    pub code16: bool,
    /// CS base & 0xfff (16-bit code): which EIPs share a linear page.
    pub cs_lo: u32,
    /// String instructions, IN/OUT and RDTSC run on the interpreter from
    /// inside the CCF ([`Item::Interp1`]) instead of ending the TU.
    pub interp1: bool,
    /// The CPU's vendor profile is not the host's: instructions whose
    /// undefined results differ between vendors (`vendor_sensitive`) run on
    /// the interpreter, which follows the profile, instead of natively.
    pub foreign_vendor: bool,
    /// The vendor profile is AMD: inline PUSH Sreg writes the selector
    /// zero-extended to the whole 32-bit slot (Intel: 16 bits).
    pub amd: bool,
    /// PAUSE ends the TU and runs on the interpreter, which may stop the
    /// vCPU there (several vCPUs share the host thread).
    pub pause_exits: bool,
    /// Other CPUs run on other host threads: LOCKed instructions keep
    /// their LOCK prefix (XCHG with memory is locked anyway).
    pub atomic: bool,
}

/// Plans the TU for `code` (the guest bytes from `eip` to the end of its
/// page; flat 32-bit protected mode).
///
/// `forced(eip)` names instructions that must be call-outs even if they
/// could be translated (adaptive BT: inline accesses that keep missing).
pub fn plan(code: &[u8], eip: u32, ctx: Ctx, forced: &dyn Fn(u32) -> bool) -> Translation {
    plan_at(code, 0, eip, ctx, forced)
}

/// [`plan`] with `code[start]` the byte at `eip`: for 32-bit code, `code`
/// may begin before it, at most at its page's start, so that the TU can
/// go into a function it calls in the page (a trace): a CALL rel32 to a
/// leaf function of the same page ([`LEAF_MAX`] instructions or fewer, all
/// translatable, then RET) pushes the return address and goes on in the
/// callee, whose RET compares the address it pops with that return
/// address and goes on after the CALL when they match. (Following every
/// CALL and JMP in the page made Debian's code 2.5 times as large and its
/// boot 10 % slower; leaves are where a CALL and RET cost most.)
pub fn plan_at(
    code: &[u8],
    start: usize,
    eip: u32,
    ctx: Ctx,
    forced: &dyn Fn(u32) -> bool,
) -> Translation {
    let bits = if ctx.code16 { 16 } else { 32 };
    let code = if ctx.code16 { &code[start..] } else { code };
    let start = if ctx.code16 { 0 } else { start };
    // 16-bit code: an instruction may not run past offset 0xffff (the
    // interpreter raises the #GP).
    let code = if ctx.code16 {
        &code[..code.len().min(0x1_0000 - eip as usize)]
    } else {
        code
    };
    // 32-bit code: `code` may hold a few bytes of the next page (when it
    // is mapped), so that an instruction straddling the page end decodes.
    let page_end = if ctx.code16 {
        u64::MAX
    } else {
        (eip as u64 | 0xfff) + 1
    };
    let mut dec = Decoder::with_ip(
        bits,
        code,
        (eip as usize - start) as u64,
        DecoderOptions::NONE,
    );
    if dec.set_position(start).is_err() {
        return Translation::Interp {
            run: 1,
            callouts: 0,
            first: 0,
        };
    }
    dec.set_ip(eip as u64);
    // The return addresses of the CALLs the trace went into.
    let mut calls: Vec<u32> = Vec::new();
    let mut p = Plan {
        items: Vec::new(),
        eips: Vec::new(),
        traced: false,
        next_eip: eip,
        insns: 0,
        ident: 0,
        inline: 0,
        callouts: 0,
        cs_lo: ctx.cs_lo,
    };
    while (p.insns as usize) < MAX_TU && dec.can_decode() && dec.ip() < page_end {
        let ins = dec.decode();
        if ins.is_invalid() {
            break; // undecodable (or straddling into an unmapped page): a call-out
        }
        if forced(ins.ip32()) {
            break;
        }
        // Under another vendor's profile, an instruction whose results
        // differ between vendors runs on the interpreter, unless only
        // flags differ and the next instructions overwrite them unseen.
        let foreign = ctx.foreign_vendor
            && vendor_difference(&ins).is_some_and(|mask| {
                let at = dec.position();
                mask == u32::MAX
                    || ctx.code16
                    || !flags_dead_after(
                        &code[at..],
                        ins.next_ip32(),
                        mask,
                        MAX_TU as u32 - p.insns - 1,
                        page_end,
                    )
            });
        let Some((mut item, mut class)) = classify(&ins, ctx, foreign) else {
            break;
        };
        if ins.next_ip() > page_end {
            // Straddles the page end: its bytes in the next page may
            // change (or be mapped elsewhere) without this page's TUs
            // being dropped, so the interpreter runs it from inside the CCF
            // (fetching it anew; the CCF leaves unless it ends at `next`),
            // ending the TU. Only ordinary instructions: inline ones may
            // change what the TU assumes (IF, TF, the shadow).
            let plain = class == Class::Ident || matches!(item, Item::Interp1 { .. });
            if !(ctx.interp1 && plain) {
                break;
            }
            item = Item::Interp1 {
                eip: ins.ip32(),
                next: next_ip(&ins, ctx),
                before: 0,
            };
            class = Class::Callout;
        }
        if let Item::Div(_, _, _, before) | Item::Interp1 { before, .. } = &mut item {
            *before = p.insns;
        }
        if let Item::Mem(m) = &mut item {
            m.before = p.insns;
            if let Some(pre) = &mut m.pre {
                pre.before = p.insns;
            }
        }
        p.insns += 1;
        match class {
            Class::Inline => p.inline += 1,
            Class::Callout => p.callouts += 1,
            _ => p.ident += 1,
        }
        p.next_eip = next_ip(&ins, ctx);
        p.eips.push(ins.ip32());
        // A trace goes into a leaf function called in this page, and on
        // after the CALL at the leaf's RET.
        let mut goto = None;
        let pos = |t: u32| start as i64 + t as i64 - eip as i64;
        let in_page = |t: u32| {
            !ctx.code16
                && (t ^ eip) >> 12 == 0
                && (0..code.len() as i64).contains(&pos(t))
                && p.insns < MAX_TU as u32
        };
        if let Item::Mem(m) = &mut item {
            match m.op {
                MemOp::Call { ret, target }
                    if in_page(target)
                        && in_page(ret)
                        && leaf(code, pos(target) as usize, target, ctx, forced) =>
                {
                    m.op = MemOp::CallIn { ret };
                    calls.push(ret);
                    goto = Some(target);
                }
                MemOp::Ret(imm) if calls.last().is_some_and(|&r| in_page(r)) => {
                    let expect = calls.pop().unwrap_or_default();
                    m.op = MemOp::RetIn { imm, expect };
                    goto = Some(expect);
                }
                _ => {}
            }
        }
        if let Some(t) = goto {
            p.next_eip = t;
            p.traced = true;
            p.items.push(item);
            // (In `code`: checked above.)
            let _ = dec.set_position(pos(t) as usize);
            dec.set_ip(t as u64);
            continue;
        }
        let ends = ends_tu(&item);
        p.items.push(item);
        if ends {
            break;
        }
    }
    if p.insns > 0 {
        flags_liveness(&mut p.items);
        return Translation::Tu(p);
    }
    plan_callout(code, start, eip, page_end, bits, ctx, forced)
}

/// A call-out: how far the interpreter may run from `eip` (up to the next
/// translatable instruction or control transfer), how many of those are
/// system instructions, and the first one's form (for the profile).
fn plan_callout(
    code: &[u8],
    start: usize,
    eip: u32,
    page_end: u64,
    bits: u32,
    ctx: Ctx,
    forced: &dyn Fn(u32) -> bool,
) -> Translation {
    let code = &code[start..code.len().min(start + (page_end - eip as u64) as usize)];
    let mut dec = Decoder::with_ip(bits, code, eip as u64, DecoderOptions::NONE);
    let (mut run, mut callouts) = (0, 0);
    let mut first = 0u32;
    while (run as usize) < MAX_CALLOUT_RUN && dec.can_decode() {
        let ins = dec.decode();
        let foreign = ctx.foreign_vendor && vendor_difference(&ins).is_some();
        if run > 0
            && (ins.is_invalid() || (classify(&ins, ctx, foreign).is_some() && !forced(ins.ip32())))
        {
            break;
        }
        if run == 0 {
            // Form and segment (for the profile).
            let seg = match ins.segment_prefix() {
                Register::FS => 1,
                Register::GS => 2,
                Register::None => 0,
                _ => 3,
            };
            let why = if forced(ins.ip32()) {
                1
            } else if !ctx.flat_data {
                2
            } else {
                0
            };
            first = (ins.code() as u32 * 4 + seg) * 4 + why;
        }
        run += 1;
        if !ins.is_invalid() && is_system(&ins) {
            callouts += 1;
        }
        if ins.is_invalid() || ins.flow_control() != FlowControl::Next {
            break;
        }
    }
    Translation::Interp {
        run: run.max(1),
        callouts,
        first,
    }
}

/// Items after which a TU ends: transfers out of it and STI (the
/// dispatcher must see its shadow).
fn ends_tu(item: &Item) -> bool {
    match item {
        Item::Sti | Item::Jmp(_) | Item::Jcc(..) | Item::JmpReg(_) => true,
        Item::Mem(m) => matches!(
            m.op,
            MemOp::Call { .. } | MemOp::Ret(_) | MemOp::CallInd { .. } | MemOp::JmpMem
        ),
        _ => false,
    }
}
