//! String instructions with REP/REPE/REPNE. A repeated instruction runs a
//! bounded number of iterations per step and re-executes itself (RIP kept)
//! so interrupts and budgets are honoured, as hardware does.

use iced_x86::OpKind;

use crate::bus::{Bus, BusAction};
use crate::cpu::{Cpu, RunExit};
use crate::decode::{sreg, DecodedInsn};
use crate::exception::Res;
use crate::flags::{size_mask, FlagOp};
use crate::state::{flags::DF, seg};

type R = Res;

/// Iterations per step before yielding (keeps interrupt latency bounded).
const CHUNK: u32 = crate::REP_CHUNK;

struct Str {
    size: u8,
    asize: u8,
    src_seg: usize,
    rep: u8, // 0 none, 1 rep/repe, 2 repne
}

fn str_info(d: &DecodedInsn) -> Str {
    let size = d.insn.memory_size().size().max(1) as u8;
    let mut asize = 4;
    for i in 0..d.insn.op_count() {
        match d.insn.op_kind(i) {
            OpKind::MemorySegSI | OpKind::MemoryESDI | OpKind::MemorySegDI => asize = 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI => asize = 4,
            _ => {}
        }
    }
    let rep = if d.insn.has_repne_prefix() {
        2
    } else if d.insn.has_rep_prefix() || d.insn.has_repe_prefix() {
        1
    } else {
        0
    };
    Str {
        size,
        asize,
        src_seg: sreg(d.insn.memory_segment()).unwrap_or(3) as usize,
        rep,
    }
}

fn step(c: &Cpu, size: u8) -> u64 {
    if c.st.rflags & DF as u64 != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    }
}

/// Runs `body` once or under REP. `body` returns whether to continue (for
/// REPE/REPNE after comparing).
fn run_rep(
    c: &mut Cpu,
    s: &Str,
    bus: &mut dyn Bus,
    mut body: impl FnMut(&mut Cpu, &mut dyn Bus) -> Res<bool>,
) -> R {
    if s.rep == 0 {
        body(c, bus)?;
        return Ok(());
    }
    let m = size_mask(s.asize);
    let mut n = 0;
    loop {
        let cx = c.gr(1, s.asize);
        if cx == 0 {
            return Ok(());
        }
        let go_on = body(c, bus)?;
        c.sr(1, s.asize, cx.wrapping_sub(1) & m);
        if !go_on || cx - 1 == 0 {
            return Ok(());
        }
        n += 1;
        // A chunk ends after CHUNK iterations or at a device stop — not
        // when an iteration invalidated decoded code elsewhere: where a
        // REP pauses must not depend on the engine's caches.
        if n >= CHUNK || c.pending_exit.is_some() {
            // Re-execute this instruction: RIP stays.
            c.next_ip = c.st.rip;
            c.stop_block = true;
            return Ok(());
        }
    }
}

fn adv(c: &mut Cpu, reg: usize, s: &Str) {
    let v = c.gr(reg, s.asize).wrapping_add(step(c, s.size)) & size_mask(s.asize);
    c.sr(reg, s.asize, v);
}

/// Whether the REP fast path applies: forward, 32-bit addressing, flat
/// expand-up segments (base 0, 4 GiB limit) with the needed access.
fn flat_forward(c: &Cpu, s: &Str, src: Option<usize>) -> bool {
    use crate::seg::{SEG_R, SEG_W};
    let flat = |i: usize, need: u8| {
        let g = &c.st.seg[i];
        g.base == 0 && g.limit == u32::MAX && c.seg_ok[i] & need != 0
    };
    s.rep == 1
        && s.asize == 4
        && c.st.rflags & DF as u64 == 0
        && flat(seg::ES, SEG_W)
        && src.is_none_or(|i| flat(i, SEG_R))
}

/// Elements of `size` bytes from `addr` to the end of its page.
fn to_page_end(addr: u32, size: u8) -> u32 {
    (0x1000 - (addr & 0xfff)) / size as u32
}

/// REP STOS/MOVS a page at a time, straight on host memory, while the
/// pages are RAM the TLB allows direct access to (no MMIO, no decoded code,
/// D already set); anything else falls back to one element per iteration.
/// Registers are updated after each chunk, so a fault is precise. At most
/// `CHUNK` elements per step, as on the slow path.
fn rep_fast(c: &mut Cpu, s: &Str, bus: &mut dyn Bus, movs: bool) -> Res<bool> {
    let mut done = 0u32;
    while done < CHUNK {
        let ecx = c.st.gpr[1] as u32;
        if ecx == 0 {
            return Ok(true);
        }
        let edi = c.st.gpr[7] as u32;
        let esi = c.st.gpr[6] as u32;
        if edi % s.size as u32 != 0 || (movs && esi % s.size as u32 != 0) {
            return Ok(false); // elements would straddle pages
        }
        let mut n = ecx.min(to_page_end(edi, s.size)).min(CHUNK - done);
        if movs {
            n = n.min(to_page_end(esi, s.size));
        }
        let bytes = n as usize * s.size as usize;
        let Some(dst) = c.direct_ptr(bus, edi, true)? else {
            return Ok(false);
        };
        if movs {
            let Some(src) = c.direct_ptr(bus, esi, false)? else {
                return Ok(false);
            };
            if (src as usize).abs_diff(dst as usize) < bytes {
                return Ok(false); // overlapping: element order matters
            }
            // SAFETY: both ranges lie within one RAM page each (n is cut at
            // both page ends) of the guest mapping, and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(src, dst, bytes) };
            c.st.gpr[6] = esi.wrapping_add(bytes as u32) as u64;
        } else {
            let v = c.st.gpr[0];
            if s.size == 1 {
                // SAFETY: the range lies within one RAM page of the guest
                // mapping (n is cut at the page end).
                unsafe { std::ptr::write_bytes(dst, v as u8, bytes) };
            } else {
                let pat = v.to_le_bytes();
                for k in 0..n as usize {
                    // SAFETY: as above; element k ends inside the page.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            pat.as_ptr(),
                            dst.add(k * s.size as usize),
                            s.size as usize,
                        )
                    };
                }
            }
        }
        c.st.gpr[7] = edi.wrapping_add(bytes as u32) as u64;
        c.st.gpr[1] = (ecx - n) as u64;
        done += n;
    }
    if c.st.gpr[1] as u32 != 0 {
        // Re-execute this instruction: RIP stays (interrupts, budget).
        c.next_ip = c.st.rip;
        c.stop_block = true;
    }
    Ok(true)
}

pub(crate) fn movs(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    if flat_forward(c, &s, Some(s.src_seg)) && rep_fast(c, &s, bus, true)? {
        return Ok(());
    }
    run_rep(c, &s, bus, |c, bus| {
        let v = c.read_mem(bus, s.src_seg, c.gr(6, s.asize) as u32, s.size)?;
        c.write_mem(bus, seg::ES, c.gr(7, s.asize) as u32, s.size, v)?;
        adv(c, 6, &s);
        adv(c, 7, &s);
        Ok(true)
    })
}

pub(crate) fn stos(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    if flat_forward(c, &s, None) && rep_fast(c, &s, bus, false)? {
        return Ok(());
    }
    run_rep(c, &s, bus, |c, bus| {
        let v = c.gr(0, s.size);
        c.write_mem(bus, seg::ES, c.gr(7, s.asize) as u32, s.size, v)?;
        adv(c, 7, &s);
        Ok(true)
    })
}

pub(crate) fn lods(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    run_rep(c, &s, bus, |c, bus| {
        let v = c.read_mem(bus, s.src_seg, c.gr(6, s.asize) as u32, s.size)?;
        c.sr(0, s.size, v);
        adv(c, 6, &s);
        Ok(true)
    })
}

fn cmp_flags(c: &mut Cpu, size: u8, a: u64, b: u64) {
    let res = a.wrapping_sub(b) & size_mask(size);
    c.set_lazy(FlagOp::Sub, size, res, a, b, false);
}

fn rep_continue(c: &Cpu, rep: u8) -> bool {
    match rep {
        1 => c.zf(),
        2 => !c.zf(),
        _ => true,
    }
}

pub(crate) fn cmps(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    run_rep(c, &s, bus, |c, bus| {
        let a = c.read_mem(bus, s.src_seg, c.gr(6, s.asize) as u32, s.size)?;
        let b = c.read_mem(bus, seg::ES, c.gr(7, s.asize) as u32, s.size)?;
        cmp_flags(c, s.size, a, b);
        adv(c, 6, &s);
        adv(c, 7, &s);
        Ok(rep_continue(c, s.rep))
    })
}

pub(crate) fn scas(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    run_rep(c, &s, bus, |c, bus| {
        let b = c.read_mem(bus, seg::ES, c.gr(7, s.asize) as u32, s.size)?;
        let a = c.gr(0, s.size);
        cmp_flags(c, s.size, a, b);
        adv(c, 7, &s);
        Ok(rep_continue(c, s.rep))
    })
}

pub(crate) fn ins(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    let port = c.gr(2, 2) as u16;
    c.check_io(bus, port, s.size)?;
    run_rep(c, &s, bus, |c, bus| {
        // The destination is checked before the port is read.
        let di = c.gr(7, s.asize) as u32;
        c.seg_lin(seg::ES, di, s.size, true)?;
        bus.device_time(c.icount);
        let v = bus.io_in(port, s.size) as u64;
        c.write_mem(bus, seg::ES, di, s.size, v)?;
        adv(c, 7, &s);
        Ok(true)
    })
}

pub(crate) fn outs(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let s = str_info(d);
    let port = c.gr(2, 2) as u16;
    c.check_io(bus, port, s.size)?;
    run_rep(c, &s, bus, |c, bus| {
        let v = c.read_mem(bus, s.src_seg, c.gr(6, s.asize) as u32, s.size)?;
        adv(c, 6, &s);
        bus.device_time(c.icount);
        if bus.io_out(port, s.size, v as u32) == BusAction::Stop {
            // Stop after this iteration; `run_rep` leaves EIP on the REP
            // when iterations remain (it sees `pending_exit`).
            c.pending_exit = Some(RunExit::BusStop);
            c.stop_block = true;
        }
        Ok(true)
    })
}
