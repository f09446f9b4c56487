//! Probe sharing: memory instructions of a TU that address memory through
//! the same base and index registers (unchanged in between) with nearby
//! displacements share one inline TLB probe. Through ESP (R8) the group
//! follows ESP's moves by constants (PUSH, POP, CALL, RET, ADD/SUB/LEA
//! ESP): stack operations join it like any access.
//!
//! The first of them (the *head*) probes the whole span of the group —
//! from the lowest displacement to the end of the highest access, as one
//! access of that size, with the write tag if any member writes — and
//! keeps the host address of the span's start in a slot of the host
//! stack's red zone (`[rsp - 8 * (slot + 2)]`: the System V ABI keeps
//! signal handlers out of those 128 bytes, and a CCF's only call, to the
//! interpreter for one instruction, moves RSP past them first). Every member
//! then addresses `slot + (displacement - low)` without a probe.
//!
//! Exact: a TU runs straight through (only exits leave it, and nothing
//! enters in the middle), no translated instruction changes the TLB (an
//! item this module does not know — e.g. one that runs the interpreter
//! from inside the CCF, which may refill the TLB — ends every group), and a
//! member's linear address is the head's plus a constant, so its bytes lie
//! in the page the head's probe checked, with a tag (the write tag implies
//! the read tag) that its own probe would have found. When the span's
//! probe misses, the CCF leaves before the head as for any miss; the
//! dispatcher, when the TLB does not hit for the span afterwards (it
//! crosses a page, a member's store goes to a code page, MMIO…),
//! retranslates the page without the group at that head (`nogroup`),
//! leaving the instructions to their own probes and adaptive BT.

use iced_x86::{InstructionInfoFactory, OpAccess, Register};

use super::{Item, MemInsn, MemOp};

/// Largest span (bytes) of one group: larger spans cross pages more often.
const SPAN: i64 = 256;

/// Red-zone slots for the host addresses of open groups.
pub(super) const SLOTS: usize = 8;

/// The slot's place below RSP (negated).
pub(super) fn slot_offset(slot: u8) -> i32 {
    8 * (slot as i32 + 2)
}

/// What a memory instruction does about its probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// Probes the span `[disp = low, low + size)` (through its own base and
    /// index), write tag if `write`; stores the host address of `low` in
    /// `slot`.
    Head {
        low: i32,
        size: u32,
        write: bool,
        slot: u8,
    },
    /// Its host address is `slot`'s + `off`.
    Member { off: i32, slot: u8 },
}

/// An open group.
struct Group {
    base: Register,
    index: Register,
    scale: u32,
    head: usize,
    low: i64,
    high: i64,
    write: bool,
    members: Vec<(usize, i64)>,
    slot: u8,
    /// How much the base (ESP: R8) moved since the head (PUSH, POP, ADD/SUB
    /// ESP,imm…): a stack group follows ESP by constants.
    delta: i64,
}

/// The memory instructions that may join a group: plain accesses through
/// flat DS/ES/SS (no segment base, no borrowed register, no second
/// access) with 32-bit address arithmetic (the span's addresses are then
/// consecutive).
fn eligible(m: &MemInsn) -> bool {
    let r32 = |r: Register| r == Register::None || r.size() == 4;
    let op_ok = match m.op {
        MemOp::Insn | MemOp::Leave => true,
        // Stack accesses through ESP (their own ESP update is tracked).
        MemOp::PushReg(_)
        | MemOp::PushImm(_)
        | MemOp::Pop(_)
        | MemOp::Call { .. }
        | MemOp::CallIn { .. }
        | MemOp::Ret(_)
        | MemOp::RetIn { .. } => m.base == Register::R8D,
        _ => false,
    };
    op_ok
        && m.via.is_none()
        && m.seg_base.is_none()
        && !m.addr16
        && m.pre.is_none()
        && r32(m.base)
        && r32(m.index)
}

/// Host registers (full width) an item may write; `None`: any.
fn written(item: &Item, info: &mut InstructionInfoFactory) -> Option<Vec<Register>> {
    let writes = |i: &iced_x86::Instruction, info: &mut InstructionInfoFactory| {
        info.info(i)
            .used_registers()
            .iter()
            .filter(|u| {
                matches!(
                    u.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
            })
            .map(|u| u.register().full_register())
            .collect::<Vec<_>>()
    };
    Some(match item {
        Item::Ident(i) => writes(i, info),
        Item::Mem(m) => {
            let mut w = match m.op {
                MemOp::Insn => writes(&m.ins, info),
                MemOp::Pop(r) => vec![r.full_register(), Register::R8],
                MemOp::Leave => vec![Register::RBP, Register::R8],
                MemOp::Div(_) => vec![Register::RAX, Register::RDX],
                MemOp::ToScratch | MemOp::JmpMem => vec![],
                MemOp::PushReg(_)
                | MemOp::PushImm(_)
                | MemOp::PushScratch
                | MemOp::Ret(_)
                | MemOp::RetIn { .. }
                | MemOp::Call { .. }
                | MemOp::CallIn { .. }
                | MemOp::CallInd { .. } => vec![Register::R8],
                #[allow(unreachable_patterns)]
                _ => return None,
            };
            if let Some(v) = m.via {
                w.push(v.full_register());
            }
            w
        }
        Item::Div(..) => vec![Register::RAX, Register::RDX],
        Item::StoreReg(_, r, _) => vec![r.full_register()],
        Item::Nop | Item::Cli | Item::Sti | Item::Jmp(_) | Item::JmpReg(_) | Item::Jcc(..) => {
            vec![]
        }
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// How an item moves ESP (R8) when that is a known constant (`None`: it
/// does not write R8 or writes something else; see `written`).
fn esp_step(item: &Item) -> Option<i64> {
    use iced_x86::{Code, OpKind};
    match item {
        Item::Mem(m) => match m.op {
            MemOp::PushReg(_)
            | MemOp::PushImm(_)
            | MemOp::PushScratch
            | MemOp::Call { .. }
            | MemOp::CallIn { .. }
            | MemOp::CallInd { .. } => Some(-4),
            MemOp::Pop(_) => Some(4),
            MemOp::Ret(imm) | MemOp::RetIn { imm, .. } => Some(4 + imm as i64),
            _ => None,
        },
        Item::Ident(i) if i.op0_kind() == OpKind::Register && i.op0_register() == Register::R8D => {
            let imm = || match i.op1_kind() {
                OpKind::Immediate8to32 => Some(i.immediate8to32() as i64),
                OpKind::Immediate32 => Some(i.immediate32() as i32 as i64),
                _ => None,
            };
            match i.code() {
                Code::Add_rm32_imm8 | Code::Add_rm32_imm32 => imm(),
                Code::Sub_rm32_imm8 | Code::Sub_rm32_imm32 => imm().map(|v| -v),
                Code::Lea_r32_m
                    if i.memory_base().full_register() == Register::R8
                        && i.memory_index() == Register::None =>
                {
                    Some(i.memory_displacement32() as i32 as i64)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The sharing role of each item (`None`: its own probe, as usual).
/// `nogroup(eip)`: no group may start at this instruction, nor through
/// its base and index registers later in the TU.
pub(super) fn plan_sharing(items: &[Item], nogroup: &dyn Fn(u32) -> bool) -> Vec<Option<Share>> {
    let mut roles = vec![None; items.len()];
    let mut open: Vec<Group> = Vec::new();
    let mut info = InstructionInfoFactory::new();
    let mut blocked: Vec<(Register, Register, u32)> = Vec::new();
    let close = |g: Group, roles: &mut Vec<Option<Share>>| {
        if g.members.is_empty() {
            return;
        }
        roles[g.head] = Some(Share::Head {
            low: g.low as i32,
            size: (g.high - g.low) as u32,
            write: g.write,
            slot: g.slot,
        });
        for (i, d) in g.members {
            roles[i] = Some(Share::Member {
                off: (d - g.low) as i32,
                slot: g.slot,
            });
        }
    };
    for (i, item) in items.iter().enumerate() {
        if let Item::Mem(m) = item {
            if eligible(m) {
                let disp = m.disp as i32 as i64;
                let same = open.iter().position(|g| {
                    g.base == m.base
                        && g.index == m.index
                        && (g.index == Register::None || g.scale == m.scale)
                });
                let joined = match same {
                    Some(k) => {
                        let g = &mut open[k];
                        // Relative to the base at the head.
                        let d = disp + g.delta;
                        let (lo, hi) = (g.low.min(d), g.high.max(d + m.size as i64));
                        if hi - lo <= SPAN {
                            (g.low, g.high) = (lo, hi);
                            g.write |= m.write;
                            g.members.push((i, d));
                            true
                        } else {
                            close(open.remove(k), &mut roles);
                            false
                        }
                    }
                    None => false,
                };
                let key = (m.base, m.index, m.scale);
                if !joined && nogroup(m.eip) {
                    // Its group's span kept missing (a frame across a page
                    // boundary…): no group through these registers in the
                    // rest of this TU either (the next access would head
                    // the same span, shortened, and miss again).
                    blocked.push(key);
                }
                if !joined && !blocked.contains(&key) {
                    let used: Vec<u8> = open.iter().map(|g| g.slot).collect();
                    if let Some(slot) = (0..SLOTS as u8).find(|s| !used.contains(s)) {
                        open.push(Group {
                            base: m.base,
                            index: m.index,
                            scale: m.scale,
                            head: i,
                            low: disp,
                            high: disp + m.size as i64,
                            write: m.write,
                            members: Vec::new(),
                            slot,
                            delta: 0,
                        });
                    }
                }
            }
        }
        // Groups whose base or index this item changes end here (after
        // its own access).
        match written(item, &mut info) {
            None => {
                for g in open.drain(..) {
                    close(g, &mut roles);
                }
            }
            Some(mut w) => {
                // ESP moved by a constant: stack groups follow it.
                if let Some(step) = esp_step(item) {
                    w.retain(|&r| r != Register::R8);
                    for g in open.iter_mut().filter(|g| g.base == Register::R8D) {
                        g.delta += step;
                    }
                }
                let mut k = 0;
                while k < open.len() {
                    let g = &open[k];
                    let hit = |r: Register| r != Register::None && w.contains(&r.full_register());
                    if hit(g.base) || hit(g.index) {
                        close(open.remove(k), &mut roles);
                    } else {
                        k += 1;
                    }
                }
            }
        }
    }
    for g in open {
        close(g, &mut roles);
    }
    roles
}
