//! x87 control: FNINIT, the status and control words, exceptions
//! pending (FWAIT), the environment and the whole state (FNSTENV/FLDENV,
//! FNSAVE/FRSTOR, FXSAVE/FXRSTOR).

use super::*;

pub(crate) fn x87_unimplemented(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    Err(Exc::ud())
}

/// The WAIT-prefixed forms (FINIT, FSTSW, FSTCW, FCLEX, FSAVE, FSTENV) when
/// the decoder joins them: the WAIT part first, then the no-wait part.
pub(crate) fn waiting_control(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    fwait(c, d, bus)?;
    match d.insn.mnemonic() {
        Finit => fninit(c, d, bus),
        Fstsw => fnstsw(c, d, bus),
        Fstcw => fnstcw(c, d, bus),
        Fclex => fnclex(c, d, bus),
        Fsave => fnsave(c, d, bus),
        _ => fnstenv(c, d, bus),
    }
}

pub(crate) fn fnop(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)
}

pub(crate) fn fninit(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let f = &mut c.st.fpu;
    f.fcw = 0x37f;
    f.fsw = 0;
    f.ftw = 0xffff;
    f.fip = 0;
    f.fcs = 0;
    f.fdp = 0;
    f.fds = 0;
    f.fop = 0;
    Ok(())
}

pub(crate) fn fnstsw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let v = c.st.fpu.fsw as u64;
    if d.ops[0].kind == OpK::Mem {
        let ea = c.ea(d);
        c.write_mem(bus, d.mseg as usize, ea, 2, v)
    } else {
        c.sr(0, 2, v);
        Ok(())
    }
}

pub(crate) fn fnstcw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let ea = c.ea(d);
    c.write_mem(bus, d.mseg as usize, ea, 2, c.st.fpu.fcw as u64)
}

pub(crate) fn fldcw(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let ea = c.ea(d);
    mf_check(c)?;
    let v = c.read_mem(bus, d.mseg as usize, ea, 2)? as u16;
    c.st.fpu.fcw = (v & 0x1f3f) | 0x40;
    update_es(&mut c.st.fpu);
    Ok(())
}

pub(crate) fn fnclex(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    c.st.fpu.fsw &= 0x7f00;
    Ok(())
}

pub(crate) fn fwait(c: &mut Cpu, _d: &DecodedInsn, _bus: &mut dyn Bus) -> R {
    if c.st.cr0 & (cr::CR0_MP | cr::CR0_TS) == (cr::CR0_MP | cr::CR0_TS) {
        return Err(Exc::fault(Vector::NM));
    }
    mf_check(c)
}

/// Writes the FNSTENV image (28 bytes in 32-bit form, 14 in 16-bit form).
pub(crate) fn store_env(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32, o32: bool) -> Res<u32> {
    let f = c.st.fpu;
    let vals: [u32; 7] = [
        f.fcw as u32 | 0xffff_0000,
        f.fsw as u32 | 0xffff_0000,
        full_tags(&f) as u32 | 0xffff_0000,
        f.fip,
        f.fcs as u32 | ((f.fop as u32 & 0x7ff) << 16),
        f.fdp,
        f.fds as u32 | 0xffff_0000,
    ];
    let w = if o32 { 4 } else { 2 };
    for (i, v) in vals.iter().enumerate() {
        c.write_mem(bus, s, ea.wrapping_add(i as u32 * w), w as u8, *v as u64)?;
    }
    Ok(7 * w)
}

pub(crate) fn load_env(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32, o32: bool) -> Res<u32> {
    let w = if o32 { 4 } else { 2 };
    let mut v = [0u32; 7];
    for (i, x) in v.iter_mut().enumerate() {
        *x = c.read_mem(bus, s, ea.wrapping_add(i as u32 * w), w as u8)? as u32;
    }
    let f = &mut c.st.fpu;
    f.fcw = (v[0] as u16 & 0x1f3f) | 0x40;
    f.fsw = v[1] as u16;
    f.ftw = v[2] as u16;
    f.fip = v[3];
    f.fcs = v[4] as u16;
    f.fop = ((v[4] >> 16) & 0x7ff) as u16;
    f.fdp = v[5];
    f.fds = v[6] as u16;
    Ok(7 * w)
}

pub(crate) fn fnstenv(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let ea = c.ea(d);
    store_env(
        c,
        bus,
        d.mseg as usize,
        ea,
        d.insn.code_size() != iced_x86::CodeSize::Code16 || d.osize == 4,
    )?;
    c.st.fpu.fcw |= 0x3f;
    Ok(())
}

pub(crate) fn fldenv(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    mf_check(c)?;
    let ea = c.ea(d);
    load_env(c, bus, d.mseg as usize, ea, env32(d))?;
    update_es(&mut c.st.fpu);
    Ok(())
}

pub(crate) fn env32(d: &DecodedInsn) -> bool {
    let size = d.insn.memory_size().size();
    !matches!(size, 14 | 94)
}

pub(crate) fn top(f: &FpuState) -> usize {
    ((f.fsw >> 11) & 7) as usize
}

pub(crate) fn write_f80(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32, v: F80) -> R {
    c.write_mem(bus, s, ea, 8, v.mantissa)?;
    c.write_mem(bus, s, ea.wrapping_add(8), 2, v.sign_exp as u64)
}

pub(crate) fn read_f80(c: &mut Cpu, bus: &mut dyn Bus, s: usize, ea: u32) -> Res<F80> {
    Ok(F80 {
        mantissa: c.read_mem(bus, s, ea, 8)?,
        sign_exp: c.read_mem(bus, s, ea.wrapping_add(8), 2)? as u16,
    })
}

pub(crate) fn fnsave(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    let s = d.mseg as usize;
    let ea = c.ea(d);
    let o32 = env32(d);
    let n = store_env(c, bus, s, ea, o32)?;
    let t = top(&c.st.fpu);
    for i in 0..8 {
        let r = c.st.fpu.regs[(t + i) & 7];
        write_f80(c, bus, s, ea.wrapping_add(n + 10 * i as u32), r)?;
    }
    fninit(c, d, bus)
}

pub(crate) fn frstor(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    mf_check(c)?;
    let s = d.mseg as usize;
    let ea = c.ea(d);
    let n = load_env(c, bus, s, ea, env32(d))?;
    let t = top(&c.st.fpu);
    for i in 0..8 {
        let r = read_f80(c, bus, s, ea.wrapping_add(n + 10 * i as u32))?;
        c.st.fpu.regs[(t + i) & 7] = r;
    }
    update_es(&mut c.st.fpu);
    Ok(())
}

pub(crate) fn fx_check(c: &Cpu, d: &DecodedInsn, ea: u32) -> R {
    if c.cpuid.query(1, 0).edx & crate::cpuid::edx1::FXSR == 0 {
        return Err(Exc::ud());
    }
    if c.st.cr0 & (cr::CR0_EM | cr::CR0_TS) != 0 {
        return Err(Exc::fault(Vector::NM));
    }
    let lin = (c.st.seg[d.mseg as usize].base as u32).wrapping_add(ea);
    if lin & 15 != 0 {
        return Err(Exc::gp(0));
    }
    Ok(())
}

pub(crate) fn fxsave(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let ea = c.ea(d);
    fx_check(c, d, ea)?;
    let s = d.mseg as usize;
    let f = c.st.fpu;
    let mut img = [0u8; 512];
    img[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    img[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    let mut abridged = 0u8;
    for i in 0..8 {
        if (f.ftw >> (2 * i)) & 3 != 3 {
            abridged |= 1 << i;
        }
    }
    img[4] = abridged;
    img[6..8].copy_from_slice(&f.fop.to_le_bytes());
    img[8..12].copy_from_slice(&f.fip.to_le_bytes());
    img[12..14].copy_from_slice(&f.fcs.to_le_bytes());
    img[16..20].copy_from_slice(&f.fdp.to_le_bytes());
    img[20..22].copy_from_slice(&f.fds.to_le_bytes());
    img[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    img[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    let t = top(&f);
    for i in 0..8 {
        let r = f.regs[(t + i) & 7];
        let o = 32 + 16 * i;
        img[o..o + 8].copy_from_slice(&r.mantissa.to_le_bytes());
        img[o + 8..o + 10].copy_from_slice(&r.sign_exp.to_le_bytes());
    }
    for i in 0..8 {
        let o = 160 + 16 * i;
        img[o..o + 16].copy_from_slice(&f.xmm[i].to_le_bytes());
    }
    // Check the whole area is writable before storing any of it.
    c.seg_lin(s, ea, 1, true)?;
    c.seg_lin(s, ea.wrapping_add(511), 1, true)?;
    for (i, ch) in img.chunks(8).enumerate() {
        let v = u64::from_le_bytes(ch.try_into().unwrap_or([0; 8]));
        c.write_mem(bus, s, ea.wrapping_add(8 * i as u32), 8, v)?;
    }
    Ok(())
}

pub(crate) fn fxrstor(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let ea = c.ea(d);
    fx_check(c, d, ea)?;
    let s = d.mseg as usize;
    let mut img = [0u8; 512];
    for i in 0..64 {
        let v = c.read_mem(bus, s, ea.wrapping_add(8 * i as u32), 8)?;
        img[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
    }
    let rd16 = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let rd32 = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
    let mxcsr = rd32(24);
    if mxcsr & 0xffff_0000 != 0 {
        return Err(Exc::gp(0));
    }
    let f = &mut c.st.fpu;
    f.fcw = rd16(0);
    f.fsw = rd16(2);
    let abridged = img[4];
    let mut ftw = 0u16;
    for i in 0..8 {
        // Non-empty registers get "valid" (00) here; FNSAVE/FNSTENV
        // compute the full tags from the contents.
        if abridged & (1 << i) == 0 {
            ftw |= 3 << (2 * i);
        }
    }
    f.ftw = ftw;
    f.fop = rd16(6) & 0x7ff;
    f.fip = rd32(8);
    f.fcs = rd16(12);
    f.fdp = rd32(16);
    f.fds = rd16(20);
    f.mxcsr = mxcsr;
    let t = ((f.fsw >> 11) & 7) as usize;
    for i in 0..8 {
        let o = 32 + 16 * i;
        let mut m = [0u8; 8];
        m.copy_from_slice(&img[o..o + 8]);
        f.regs[(t + i) & 7] = F80 {
            mantissa: u64::from_le_bytes(m),
            sign_exp: rd16(o + 8),
        };
    }
    for i in 0..8 {
        let o = 160 + 16 * i;
        let mut x = [0u8; 16];
        x.copy_from_slice(&img[o..o + 16]);
        f.xmm[i] = u128::from_le_bytes(x);
    }
    update_es(f);
    Ok(())
}
