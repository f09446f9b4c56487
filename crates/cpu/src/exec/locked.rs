//! LOCKed instructions made atomic on the host, for a CPU that runs on its
//! own host thread beside others ([`crate::coherence`]).
//!
//! The instruction's own handler runs unchanged on a scratch copy of its
//! destination: the data TLB entry of the destination's page is pointed at
//! a scratch page holding the value read, the handler reads and writes
//! there, and the result goes to guest memory with one host compare-and-
//! swap of the aligned word that holds the destination. Another CPU's store
//! in between makes the swap fail; the registers are put back and the
//! instruction runs again on the new value — what a LOCKed read-modify-
//! write on silicon guarantees, with no instruction's semantics written
//! twice. XCHG with memory is locked whatever its prefixes (SDM vol. 3
//! §8.1.2.1).
//!
//! A destination that straddles an 8-byte boundary, or is not RAM, runs
//! under a process-wide lock instead: atomic against other interpreted
//! LOCKed instructions, not against translated ones (Linux never uses
//! split locks; the host kernel may refuse them too).

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

use iced_x86::{Instruction, Mnemonic, OpKind};

use crate::bus::Bus;
use crate::cpu::Cpu;
use crate::decode::{DecodedInsn, OpK};
use crate::exception::Res;
use crate::mmu::AccessKind;

/// Serializes the LOCKed instructions no host word can hold.
static SPLIT_LOCK: Mutex<()> = Mutex::new(());

/// Whether `insn` must be atomic on a CPU that shares memory with CPUs on
/// other threads.
pub(crate) fn needs_lock(insn: &Instruction) -> bool {
    insn.op0_kind() == OpKind::Memory
        && ((insn.has_lock_prefix() && crate::facts::lock_legal(insn.mnemonic()))
            || insn.mnemonic() == Mnemonic::Xchg)
}

/// The destination's offset and size, as the handler computes them.
fn destination(c: &Cpu, d: &DecodedInsn) -> (u32, u8) {
    let size = match d.insn.mnemonic() {
        Mnemonic::Cmpxchg8b => 8,
        _ => d.ops[0].size,
    };
    let mut ea = c.ea(d);
    if matches!(
        d.insn.mnemonic(),
        Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
    ) && d.ops[1].kind == OpK::Reg
    {
        // A register bit offset reaches beyond the operand.
        let off = c.reg_get(d.ops[1]);
        let sh = 64 - size as u32 * 8;
        let soff = ((off << sh) as i64) >> sh;
        let byte_off = (soff >> 3) & !((size as i64) - 1);
        ea = (ea as i64).wrapping_add(byte_off) as u32;
        if d.asize == 2 {
            ea &= 0xffff;
        }
    }
    (ea, size)
}

/// Runs a LOCKed instruction (or XCHG with memory) atomically.
pub(crate) fn locked(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> Res {
    let inner = super::handler_for(&d.insn);
    let (ea, size) = destination(c, d);
    let lin = c.seg_lin(d.mseg as usize, ea, size, true)?;
    let user = c.cpl == 3;
    let phys = c.translate(bus, lin, AccessKind::Write, user)?;
    let off = (phys & 7) as usize;
    if (lin & 0xfff) + size as u32 > 0x1000
        || off + size as usize > 8
        || phys + 8 > c.ram_size
        || c.shared.is_none()
    {
        let _g = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        return inner(c, d, bus);
    }
    let word_phys = phys & !7;
    // SAFETY: `word_phys + 8 <= ram_size` (checked above) and the RAM
    // mapping is 8-byte aligned, so this is an aligned word of guest RAM,
    // which lives as long as the CPU's `Arc<GuestRam>`; other threads
    // access it only through atomics or plain host accesses of the guest's
    // own instructions, as on silicon.
    let word = unsafe { AtomicU64::from_ptr(c.ram_ptr.add(word_phys as usize) as *mut u64) };
    let slot = ((phys & 0xfff) / 8) as usize;
    let scratch = c.lock_scratch.as_ptr() as usize;
    let gpr = c.st.gpr;
    let lazy = c.lazy;
    let rflags = c.st.rflags;
    loop {
        let old = word.load(SeqCst);
        c.lock_scratch[slot] = old;
        let saved = c.tlb.redirect_data(user, lin, phys, scratch);
        let r = inner(c, d, bus);
        c.tlb.restore_data(user, lin, saved);
        r?;
        let new = c.lock_scratch[slot];
        if word.compare_exchange(old, new, SeqCst, SeqCst).is_ok() {
            break;
        }
        c.st.gpr = gpr;
        c.lazy = lazy;
        c.st.rflags = rflags;
    }
    let page = phys >> 12;
    if c.is_code_page(page) {
        c.invalidate_code_page(page);
    }
    c.stored_to_code(page);
    Ok(())
}
