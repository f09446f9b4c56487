//! System instructions: control/debug registers, descriptor tables, task
//! register, LAR/LSL/VERR/VERW, CPUID, TSC, MSRs, SYSENTER/SYSEXIT, HLT,
//! CLI/STI, port I/O with IOPL and the TSS I/O bitmap, far pointer loads.

use iced_x86::{Mnemonic, Register};

use crate::bus::{Bus, BusAction};
use crate::cpu::{Cpu, RunExit};
use crate::decode::{sreg, DecodedInsn, OpK};
use crate::exception::{Exc, Res, Vector};
use crate::flags::size_mask;
use crate::hooks::SensitiveKind;
use crate::state::{cr, flags::*, seg, Segment};

type R = Res;

/// Privileged instructions need CPL 0 (#GP(0) otherwise; in real mode CPL is 0).
fn require_cpl0(c: &Cpu) -> R {
    if c.cpl != 0 {
        Err(Exc::gp(0))
    } else {
        Ok(())
    }
}

pub(crate) fn mov_seg(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if d.insn.op0_register().is_segment_register() {
        let s = sreg(d.insn.op0_register()).unwrap_or(0) as usize;
        if s == seg::CS {
            return Err(Exc::ud());
        }
        let v = c.rd(bus, d, 1)? as u16;
        c.load_seg(bus, s, v)
    } else {
        let s = sreg(d.insn.op1_register()).unwrap_or(0) as usize;
        let sel = c.st.seg[s].selector as u64;
        if s == seg::CS || s == seg::SS {
            c.note_sensitive(bus, SensitiveKind::ReadSegment, s as u64, sel);
        }
        // To a register with 32-bit operand size the upper bits are zeroed
        // (Intel P6 and later); to memory, 16 bits are written.
        if d.ops[0].kind == OpK::Mem {
            let ea = c.ea(d);
            c.write_mem(bus, d.mseg as usize, ea, 2, sel)
        } else {
            c.reg_set(d.ops[0], sel);
            Ok(())
        }
    }
}

fn cr_num(r: Register) -> usize {
    (r as usize) - (Register::CR0 as usize)
}

pub(crate) fn mov_cr(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if c.v86() {
        return Err(Exc::gp(0));
    }
    require_cpl0(c)?;
    if d.insn.op0_register().is_cr() {
        let n = cr_num(d.insn.op0_register());
        let v = c.reg_get(d.ops[1]) & 0xffff_ffff;
        c.write_cr(bus, n, v)
    } else {
        let n = cr_num(d.insn.op1_register());
        let v = match n {
            0 => c.st.cr0,
            2 => c.st.cr2,
            3 => c.st.cr3,
            4 => c.st.cr4,
            _ => return Err(Exc::ud()),
        };
        c.reg_set(d.ops[0], v & 0xffff_ffff);
        Ok(())
    }
}

impl Cpu {
    /// Writes a control register with its checks and TLB effects.
    pub(crate) fn write_cr(&mut self, _bus: &mut dyn Bus, n: usize, v: u64) -> R {
        match n {
            0 => {
                if v & cr::CR0_PG != 0 && v & cr::CR0_PE == 0 {
                    return Err(Exc::gp(0));
                }
                if v & cr::CR0_NW != 0 && v & cr::CR0_CD == 0 {
                    return Err(Exc::gp(0));
                }
                let old = self.st.cr0;
                self.st.cr0 = (v & 0xe005_003f) | cr::CR0_ET;
                if (old ^ self.st.cr0) & (cr::CR0_PG | cr::CR0_WP | cr::CR0_PE) != 0 {
                    self.tlb.flush_all();
                }
                self.refresh_all_segs();
                self.stop_block = true;
            }
            2 => self.st.cr2 = v,
            3 => {
                // The register holds every bit written: 32-bit paging takes
                // the page directory from bits 31:12, PAE the PDPT from
                // bits 31:5 (so CR3 may be loaded before CR4.PAE is set).
                self.st.cr3 = v & 0xffff_ffff;
                self.tlb.flush_nonglobal();
                self.stop_block = true;
            }
            4 => {
                // VME/PVI are not modelled (and not in CPUID): refuse them
                // like a processor without the feature, rather than accept
                // a mode whose semantics would then be missing.
                let supported = cr::CR4_TSD
                    | cr::CR4_DE
                    | cr::CR4_PSE
                    | cr::CR4_PAE
                    | cr::CR4_MCE
                    | cr::CR4_PGE
                    | cr::CR4_PCE
                    | cr::CR4_OSFXSR
                    | cr::CR4_OSXMMEXCPT;
                if v & !supported != 0 {
                    return Err(Exc::gp(0));
                }
                self.st.cr4 = v;
                self.tlb.flush_all();
                self.stop_block = true;
            }
            _ => return Err(Exc::ud()),
        }
        Ok(())
    }
}

pub(crate) fn mov_dr(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    require_cpl0(c)?;
    let dr = |r: Register| (r as usize) - (Register::DR0 as usize);
    if d.insn.op0_register().is_dr() {
        let mut n = dr(d.insn.op0_register());
        if n == 4 || n == 5 {
            if c.st.cr4 & cr::CR4_DE != 0 {
                return Err(Exc::ud());
            }
            n += 2;
        }
        if n > 7 {
            return Err(Exc::ud());
        }
        let v = c.reg_get(d.ops[1]) & 0xffff_ffff;
        c.st.dr[n] = match n {
            6 => v | 0xffff_0ff0,
            7 => (v | 0x400) & !0x1000,
            _ => v,
        };
    } else {
        let mut n = dr(d.insn.op1_register());
        if n == 4 || n == 5 {
            if c.st.cr4 & cr::CR4_DE != 0 {
                return Err(Exc::ud());
            }
            n += 2;
        }
        if n > 7 {
            return Err(Exc::ud());
        }
        c.reg_set(d.ops[0], c.st.dr[n] & 0xffff_ffff);
    }
    Ok(())
}

pub(crate) fn lgdt_lidt(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if d.ops[0].kind != OpK::Mem {
        return Err(Exc::ud());
    }
    if c.v86() {
        return Err(Exc::gp(0));
    }
    require_cpl0(c)?;
    let ea = c.ea(d);
    let limit = c.read_mem(bus, d.mseg as usize, ea, 2)? as u16;
    let mut base = c.read_mem(bus, d.mseg as usize, ea.wrapping_add(2), 4)?;
    if d.osize == 2 || c_osize16(d) {
        base &= 0x00ff_ffff;
    }
    let t = if d.insn.mnemonic() == Mnemonic::Lgdt {
        &mut c.st.gdtr
    } else {
        &mut c.st.idtr
    };
    t.base = base;
    t.limit = limit;
    Ok(())
}

/// True when the instruction's operand size is 16 bits (LGDT/SGDT forms).
fn c_osize16(d: &DecodedInsn) -> bool {
    matches!(
        d.insn.code(),
        iced_x86::Code::Lgdt_m1632_16
            | iced_x86::Code::Lidt_m1632_16
            | iced_x86::Code::Sgdt_m1632_16
            | iced_x86::Code::Sidt_m1632_16
    )
}

fn umip_check(c: &Cpu) -> R {
    if c.st.cr4 & cr::CR4_UMIP != 0 && c.cpl > 0 {
        return Err(Exc::gp(0));
    }
    Ok(())
}

pub(crate) fn sgdt_sidt(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if d.ops[0].kind != OpK::Mem {
        return Err(Exc::ud());
    }
    umip_check(c)?;
    let gdt = d.insn.mnemonic() == Mnemonic::Sgdt;
    let t = if gdt { c.st.gdtr } else { c.st.idtr };
    let ea = c.ea(d);
    // With a 16-bit operand size Intel processors store the full base
    // (the high byte undefined in the SDM; P6 stores it).
    c.write_mem(bus, d.mseg as usize, ea, 2, t.limit as u64)?;
    c.write_mem(
        bus,
        d.mseg as usize,
        ea.wrapping_add(2),
        4,
        t.base & 0xffff_ffff,
    )?;
    let kind = if gdt {
        SensitiveKind::Sgdt
    } else {
        SensitiveKind::Sidt
    };
    c.note_sensitive(bus, kind, 0, t.base);
    Ok(())
}

fn store_selector(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, v: u16) -> R {
    if d.ops[0].kind == OpK::Mem {
        let ea = c.ea(d);
        c.write_mem(bus, d.mseg as usize, ea, 2, v as u64)
    } else {
        c.reg_set(d.ops[0], v as u64);
        Ok(())
    }
}

fn pm_only(c: &Cpu) -> R {
    if !c.protected() || c.v86() {
        return Err(Exc::ud());
    }
    Ok(())
}

pub(crate) fn sldt(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    umip_check(c)?;
    let v = c.st.ldtr.selector;
    store_selector(c, d, bus, v)?;
    c.note_sensitive(bus, SensitiveKind::Sldt, 0, v as u64);
    Ok(())
}

pub(crate) fn str_(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    umip_check(c)?;
    let v = c.st.tr.selector;
    store_selector(c, d, bus, v)?;
    c.note_sensitive(bus, SensitiveKind::Str, 0, v as u64);
    Ok(())
}

pub(crate) fn smsw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    umip_check(c)?;
    let v = c.st.cr0 & 0xffff_ffff;
    if d.ops[0].kind == OpK::Mem {
        let ea = c.ea(d);
        c.write_mem(bus, d.mseg as usize, ea, 2, v & 0xffff)?;
    } else {
        c.reg_set(d.ops[0], v);
    }
    c.note_sensitive(bus, SensitiveKind::Smsw, 0, v & 0xffff);
    Ok(())
}

pub(crate) fn lmsw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    require_cpl0(c)?;
    let v = c.rd(bus, d, 0)? & 0xf;
    // LMSW can set PE but never clear it.
    let new = (c.st.cr0 & !0xe) | v | (c.st.cr0 & 1);
    c.write_cr(bus, 0, new)
}

pub(crate) fn clts(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    require_cpl0(c)?;
    c.st.cr0 &= !cr::CR0_TS;
    Ok(())
}

pub(crate) fn invlpg(c: &mut Cpu, d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    if d.ops[0].kind != OpK::Mem {
        return Err(Exc::ud());
    }
    require_cpl0(c)?;
    let ea = c.ea(d);
    let lin = (c.st.seg[d.mseg as usize].base as u32).wrapping_add(ea);
    c.invlpg(lin);
    Ok(())
}

pub(crate) fn lldt(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    require_cpl0(c)?;
    let sel = c.rd(bus, d, 0)? as u16;
    if sel & !3 == 0 {
        c.st.ldtr = Segment {
            selector: sel,
            ..Segment::default()
        };
        return Ok(());
    }
    if sel & 4 != 0 {
        return Err(Exc::gp((sel & 0xfffc) as u32));
    }
    let desc = c.read_descriptor(bus, sel, Vector::GP)?;
    if desc.is_code_data() || desc.typ() != 2 {
        return Err(Exc::gp((sel & 0xfffc) as u32));
    }
    if !desc.present() {
        return Err(Exc::fault_code(Vector::NP, (sel & 0xfffc) as u32));
    }
    c.st.ldtr = desc.to_segment(sel);
    Ok(())
}

pub(crate) fn ltr(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    require_cpl0(c)?;
    let sel = c.rd(bus, d, 0)? as u16;
    let e = (sel & 0xfffc) as u32;
    if sel & !3 == 0 {
        return Err(Exc::gp(0));
    }
    if sel & 4 != 0 {
        return Err(Exc::gp(e));
    }
    let desc = c.read_descriptor(bus, sel, Vector::GP)?;
    if desc.is_code_data() || !matches!(desc.typ(), 1 | 9) {
        return Err(Exc::gp(e));
    }
    if !desc.present() {
        return Err(Exc::fault_code(Vector::NP, e));
    }
    // Mark busy in the GDT and in the loaded cache.
    let lin = (c.st.gdtr.base as u32).wrapping_add((sel & !7) as u32 + 4);
    c.write_lin_sys(bus, lin, 4, (desc.hi | (2 << 8)) as u64)?;
    c.st.tr = desc.to_segment(sel);
    c.st.tr.attr |= 2;
    Ok(())
}

/// Looks up a selector for LAR/LSL/VERR/VERW: `None` means "ZF = 0".
fn probe(c: &mut Cpu, bus: &mut dyn Bus, sel: u16) -> Res<Option<crate::seg::Descriptor>> {
    if sel & !3 == 0 {
        return Ok(None);
    }
    match c.read_descriptor(bus, sel, Vector::GP) {
        Ok(d) => Ok(Some(d)),
        Err(Exc::Fault { vector: 13, .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The privilege rule of LAR/LSL/VERR/VERW: conforming code is always
/// visible, everything else needs DPL ≥ max(CPL, RPL).
fn visible(c: &Cpu, sel: u16, d: crate::seg::Descriptor) -> bool {
    if d.conforming() && d.is_code_data() {
        return true;
    }
    d.dpl() >= c.cpl.max((sel & 3) as u8)
}

fn set_zf(c: &mut Cpu, z: bool) {
    c.sync_flags();
    if z {
        c.st.rflags |= ZF as u64;
    } else {
        c.st.rflags &= !(ZF as u64);
    }
}

pub(crate) fn lar(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    let sel = c.rd(bus, d, 1)? as u16;
    let ok = probe(c, bus, sel)?.filter(|desc| {
        visible(c, sel, *desc)
            && (desc.is_code_data() || matches!(desc.typ(), 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc))
    });
    let res = ok.map(|desc| (desc.hi & 0x00f0_ff00) as u64);
    if let Some(v) = res {
        c.reg_set(d.ops[0], v & size_mask(d.osize));
    }
    set_zf(c, res.is_some());
    c.note_sensitive(bus, SensitiveKind::Lar, sel as u64, res.unwrap_or(0));
    Ok(())
}

pub(crate) fn lsl(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    let sel = c.rd(bus, d, 1)? as u16;
    let ok = probe(c, bus, sel)?.filter(|desc| {
        visible(c, sel, *desc) && (desc.is_code_data() || matches!(desc.typ(), 1 | 2 | 3 | 9 | 0xb))
    });
    let res = ok.map(|desc| desc.to_segment(sel).limit as u64);
    if let Some(v) = res {
        c.reg_set(d.ops[0], v & size_mask(d.osize));
    }
    set_zf(c, res.is_some());
    c.note_sensitive(bus, SensitiveKind::Lsl, sel as u64, res.unwrap_or(0));
    Ok(())
}

pub(crate) fn verr_verw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    let write = d.insn.mnemonic() == Mnemonic::Verw;
    let sel = c.rd(bus, d, 0)? as u16;
    let ok = probe(c, bus, sel)?.is_some_and(|desc| {
        desc.is_code_data()
            && visible(c, sel, desc)
            && if write {
                desc.writable_data()
            } else {
                desc.readable()
            }
    });
    set_zf(c, ok);
    let kind = if write {
        SensitiveKind::Verw
    } else {
        SensitiveKind::Verr
    };
    c.note_sensitive(bus, kind, sel as u64, ok as u64);
    Ok(())
}

pub(crate) fn arpl(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    pm_only(c)?;
    let dst = c.rd(bus, d, 0)?;
    let src = c.rd(bus, d, 1)?;
    let z = (dst & 3) < (src & 3);
    if z {
        c.wr(bus, d, 0, (dst & !3) | (src & 3))?;
    }
    set_zf(c, z);
    Ok(())
}

pub(crate) fn cpuid(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let leaf = c.gr(0, 4) as u32;
    let mut l = c.cpuid.query(leaf, c.gr(1, 4) as u32);
    if leaf == 1 {
        // Each vCPU reports its own initial APIC ID.
        l.ebx = (l.ebx & 0x00ff_ffff) | (c.st.apic_id << 24);
    }
    c.sr(0, 4, l.eax as u64);
    c.sr(3, 4, l.ebx as u64);
    c.sr(1, 4, l.ecx as u64);
    c.sr(2, 4, l.edx as u64);
    c.note_sensitive(bus, SensitiveKind::Cpuid, leaf as u64, l.eax as u64);
    Ok(())
}

pub(crate) fn rdtsc(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if c.st.cr4 & cr::CR4_TSD != 0 && c.cpl != 0 && c.protected() {
        return Err(Exc::gp(0));
    }
    let t = bus.clock(c.icount).wrapping_add(c.st.msr.tsc_offset);
    c.sr(0, 4, t & 0xffff_ffff);
    c.sr(2, 4, t >> 32);
    c.note_sensitive(bus, SensitiveKind::Rdtsc, 0, t);
    Ok(())
}

pub(crate) fn rdpmc(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    // No performance counters are modelled: #GP as for an invalid counter.
    let _ = c;
    Err(Exc::gp(0))
}

/// MSR numbers.
mod msr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1b;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const MTRRCAP: u32 = 0xfe;
    pub const MCG_CAP: u32 = 0x179;
    pub const MCG_STATUS: u32 = 0x17a;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const EFER: u32 = 0xc000_0080;
}

/// EFER.NXE: execute-disable in PAE paging (the only EFER bit of a CPU
/// without long mode or SYSCALL).
const EFER_NXE: u64 = 1 << 11;

pub(crate) fn rdmsr(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    require_cpl0(c)?;
    let n = c.gr(1, 4) as u32;
    if crate::is_platform_msr(n) {
        bus.device_time(c.icount);
        if let Some(r) = bus.msr_read(n) {
            let v = crate::msr_from_platform(n, r.ok_or(Exc::gp(0))?, c.st.msr.tsc_offset);
            c.sr(0, 4, v & 0xffff_ffff);
            c.sr(2, 4, v >> 32);
            return Ok(());
        }
    }
    let m = &c.st.msr;
    let v = match n {
        msr::TSC => bus.clock(c.icount).wrapping_add(m.tsc_offset),
        msr::APIC_BASE => m.apic_base,
        msr::SYSENTER_CS => m.sysenter_cs,
        msr::SYSENTER_ESP => m.sysenter_esp,
        msr::SYSENTER_EIP => m.sysenter_eip,
        msr::MISC_ENABLE => m.misc_enable,
        msr::PAT => m.pat,
        msr::EFER => c.st.efer,
        msr::MTRRCAP | msr::MCG_CAP | msr::MCG_STATUS | msr::PLATFORM_ID | msr::BIOS_SIGN_ID => 0,
        _ => return Err(Exc::gp(0)),
    };
    c.sr(0, 4, v & 0xffff_ffff);
    c.sr(2, 4, v >> 32);
    Ok(())
}

pub(crate) fn wrmsr(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    require_cpl0(c)?;
    let n = c.gr(1, 4) as u32;
    let v = c.gr(0, 4) | (c.gr(2, 4) << 32);
    if crate::is_platform_msr(n) {
        bus.device_time(c.icount);
        match bus.msr_write(n, crate::msr_to_platform(n, v, c.st.msr.tsc_offset)) {
            Some(false) => return Err(Exc::gp(0)),
            Some(true) => {
                if n == msr::APIC_BASE {
                    // The CPU's copy (what a hardware engine loads).
                    c.st.msr.apic_base = v;
                }
                // A write may make an interrupt deliverable (TPR, EOI,
                // self IPI): look again before the next instruction.
                c.stop_block = true;
                return Ok(());
            }
            None => {}
        }
    }
    match n {
        msr::TSC => c.st.msr.tsc_offset = v.wrapping_sub(bus.clock(c.icount)),
        msr::APIC_BASE => c.st.msr.apic_base = v,
        msr::SYSENTER_CS => c.st.msr.sysenter_cs = v & 0xffff,
        msr::SYSENTER_ESP => c.st.msr.sysenter_esp = v,
        msr::SYSENTER_EIP => c.st.msr.sysenter_eip = v,
        msr::MISC_ENABLE => c.st.msr.misc_enable = v,
        msr::PAT => c.st.msr.pat = v,
        msr::EFER => {
            if v & !EFER_NXE != 0 {
                return Err(Exc::gp(0));
            }
            if (c.st.efer ^ v) & EFER_NXE != 0 {
                // Pages' execute permissions change.
                c.tlb.flush_all();
                c.stop_block = true;
            }
            c.st.efer = v;
        }
        msr::MCG_STATUS | msr::BIOS_SIGN_ID => {}
        _ => return Err(Exc::gp(0)),
    }
    Ok(())
}

pub(crate) fn sysenter(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if !c.protected() {
        return Err(Exc::gp(0));
    }
    let cs = c.st.msr.sysenter_cs as u16;
    if cs & 0xfffc == 0 {
        return Err(Exc::gp(0));
    }
    c.note_sensitive(
        bus,
        SensitiveKind::Sysenter,
        cs as u64,
        c.st.msr.sysenter_eip,
    );
    c.sync_flags();
    c.st.rflags &= !((VM | IF | RF) as u64);
    c.st.seg[seg::CS] = Segment::flat32(cs & 0xfffc, true);
    c.st.seg[seg::SS] = Segment::flat32((cs & 0xfffc) + 8, false);
    c.st.gpr[4] = c.st.msr.sysenter_esp & 0xffff_ffff;
    c.refresh_all_segs();
    c.next_ip = c.st.msr.sysenter_eip & 0xffff_ffff;
    c.stop_block = true;
    Ok(())
}

pub(crate) fn sysexit(c: &mut Cpu, _d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let cs = c.st.msr.sysenter_cs as u16;
    if !c.protected() || c.v86() || c.cpl != 0 || cs & 0xfffc == 0 {
        return Err(Exc::gp(0));
    }
    c.note_sensitive(bus, SensitiveKind::Sysenter, cs as u64, c.gr(2, 4));
    c.st.seg[seg::CS] = Segment::flat32(((cs & 0xfffc) + 16) | 3, true);
    c.st.seg[seg::SS] = Segment::flat32(((cs & 0xfffc) + 24) | 3, false);
    c.st.gpr[4] = c.gr(1, 4);
    c.refresh_all_segs();
    c.next_ip = c.gr(2, 4);
    c.stop_block = true;
    Ok(())
}

pub(crate) fn hlt(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    require_cpl0(c)?;
    c.st.halted = true;
    Err(Exc::Exit(RunExit::Halted))
}

pub(crate) fn cli(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    if c.protected() && c.iopl() < c.cpl {
        return Err(Exc::gp(0));
    }
    c.st.rflags &= !(IF as u64);
    Ok(())
}

pub(crate) fn sti(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    if c.protected() && c.iopl() < c.cpl {
        return Err(Exc::gp(0));
    }
    if c.st.rflags & IF as u64 == 0 {
        c.st.rflags |= IF as u64;
        c.st.interrupt_shadow = true;
    }
    c.stop_block = true;
    Ok(())
}

impl Cpu {
    /// I/O permission: CPL ≤ IOPL, else the TSS I/O bitmap (SDM 19.5).
    pub(crate) fn check_io(&mut self, bus: &mut dyn Bus, port: u16, size: u8) -> R {
        if !self.protected() || (!self.v86() && self.cpl <= self.iopl()) {
            return Ok(());
        }
        let tr = self.st.tr;
        if tr.typ() & 8 == 0 || tr.limit < 0x67 {
            return Err(Exc::gp(0));
        }
        let base = tr.base as u32;
        let map = self.read_lin_sys(bus, base.wrapping_add(0x66), 2)? as u32;
        let byte = map + port as u32 / 8;
        if byte + 1 > tr.limit {
            return Err(Exc::gp(0));
        }
        let bits = self.read_lin_sys(bus, base.wrapping_add(byte), 2)? as u32;
        let mask = ((1u32 << size) - 1) << (port % 8);
        if bits & mask != 0 {
            return Err(Exc::gp(0));
        }
        Ok(())
    }
}

fn io_port(c: &Cpu, d: &DecodedInsn, which: usize) -> u16 {
    match d.ops[which].kind {
        OpK::Imm => (d.imm & 0xff) as u16,
        _ => c.gr(2, 2) as u16,
    }
}

pub(crate) fn in_(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.ops[0].size;
    let port = io_port(c, d, 1);
    c.check_io(bus, port, size)?;
    if Some(port) == c.hypercall_port && c.cpl == 0 && size == 4 {
        return Err(Exc::Exit(RunExit::Hypercall));
    }
    bus.device_time(c.icount);
    let v = bus.io_in(port, size) as u64;
    c.reg_set(d.ops[0], v);
    Ok(())
}

pub(crate) fn out(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let size = d.ops[1].size;
    let port = io_port(c, d, 0);
    c.check_io(bus, port, size)?;
    let v = c.reg_get(d.ops[1]) as u32;
    bus.device_time(c.icount);
    if bus.io_out(port, size, v) == BusAction::Stop {
        return Err(Exc::Exit(RunExit::BusStop));
    }
    Ok(())
}

pub(crate) fn wbinvd(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    require_cpl0(c)
}

pub(crate) fn lxs(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    if d.ops[1].kind != OpK::Mem {
        return Err(Exc::ud());
    }
    let size = d.osize;
    let ea = c.ea(d);
    let off = c.read_mem(bus, d.mseg as usize, ea, size)?;
    let sel = c.read_mem(bus, d.mseg as usize, ea.wrapping_add(size as u32), 2)? as u16;
    let s = match d.insn.mnemonic() {
        Mnemonic::Les => seg::ES,
        Mnemonic::Lds => seg::DS,
        Mnemonic::Lfs => seg::FS,
        Mnemonic::Lgs => seg::GS,
        _ => seg::SS,
    };
    c.load_seg(bus, s, sel)?;
    c.reg_set(d.ops[0], off);
    Ok(())
}
