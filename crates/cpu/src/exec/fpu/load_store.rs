//! x87 loads and stores: FLD/FILD/FBLD, the constants, FST/FIST/FBSTP,
//! FXCH, FFREE, FINCSTP/FDECSTP.

use super::*;

pub(crate) fn fld(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let v = if has_mem(d) {
        load_mem(c, d, bus, &mut env)?
    } else {
        src(&c.st.fpu, &mut env, st_last(d))
    };
    let v = push_value(&c.st.fpu, &mut env, v);
    // An unmasked denormal operand does not stop a load.
    finish(c, &env);
    if env.flags & IE & !env.masks == 0 {
        push(&mut c.st.fpu, v);
    }
    Ok(())
}

pub(crate) fn fild(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    fld(c, d, bus)
}

pub(crate) fn fbld(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    fld(c, d, bus)
}

pub(crate) fn fldconst(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    use Mnemonic::*;
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let rc = env.rc;
    let v = match d.insn.mnemonic() {
        Fld1 => F80 {
            mantissa: 1 << 63,
            sign_exp: 0x3fff,
        },
        Fldz => soft::zero(false),
        Fldpi => soft::constant(rc, 0x4000, 0xc90f_daa2_2168_c234, true),
        Fldl2e => soft::constant(rc, 0x3fff, 0xb8aa_3b29_5c17_f0bb, true),
        Fldl2t => soft::constant(rc, 0x4000, 0xd49a_784b_cd1b_8afe, false),
        Fldlg2 => soft::constant(rc, 0x3ffd, 0x9a20_9a84_fbcf_f798, true),
        _ => soft::constant(rc, 0x3ffe, 0xb172_17f7_d1cf_79ab, true),
    };
    let v = push_value(&c.st.fpu, &mut env, v);
    if finish(c, &env) {
        push(&mut c.st.fpu, v);
    }
    Ok(())
}

pub(crate) fn fst(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let popping = d.insn.mnemonic() != Mnemonic::Fst;
    let v = src(&c.st.fpu, &mut env, 0);
    if has_mem(d) {
        let ea = c.ea(d);
        let s = d.mseg as usize;
        let (bits, size) = match d.insn.memory_size() {
            MemorySize::Float32 => (soft::to_float(&mut env, v, false), 4),
            MemorySize::Float64 => (soft::to_float(&mut env, v, true), 8),
            _ => (0, 10),
        };
        let ok = store_ok(&env);
        if !ok {
            // No rounding happened for a store that does not take place.
            env.flags &= !PE;
            env.c1 = false;
        }
        if ok {
            if size == 10 {
                write_f80(c, bus, s, ea, v)?;
            } else {
                c.write_mem(bus, s, ea, size, bits)?;
            }
        }
        if finish(c, &env) && ok && popping {
            pop(&mut c.st.fpu);
        }
    } else {
        let i = st_last(d);
        if finish(c, &env) {
            put(&mut c.st.fpu, i, v);
            if popping {
                pop(&mut c.st.fpu);
            }
        }
    }
    Ok(())
}

pub(crate) fn fist(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    let m = d.insn.mnemonic();
    // FISTTP came with SSE3: #UD on a processor that does not report it.
    if m == Mnemonic::Fisttp && c.cpuid.query(1, 0).ecx & 1 == 0 {
        return Err(Exc::ud());
    }
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let v = src(&c.st.fpu, &mut env, 0);
    let size = match d.insn.memory_size() {
        MemorySize::Int16 => 2u8,
        MemorySize::Int32 => 4,
        _ => 8,
    };
    let r = soft::to_int(&mut env, v, size as u32 * 8, m == Mnemonic::Fisttp);
    let ok = store_ok(&env);
    if ok {
        let ea = c.ea(d);
        c.write_mem(bus, d.mseg as usize, ea, size, r)?;
    }
    if finish(c, &env) && ok && m != Mnemonic::Fist {
        pop(&mut c.st.fpu);
    }
    Ok(())
}

pub(crate) fn fbstp(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let v = src(&c.st.fpu, &mut env, 0);
    let bytes = soft::to_bcd(&mut env, v).unwrap_or([0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff]);
    let ok = store_ok(&env);
    if ok {
        let ea = c.ea(d);
        let s = d.mseg as usize;
        let lo = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        c.write_mem(bus, s, ea, 8, lo)?;
        c.write_mem(
            bus,
            s,
            ea.wrapping_add(8),
            2,
            u16::from_le_bytes([bytes[8], bytes[9]]) as u64,
        )?;
    }
    if finish(c, &env) && ok {
        pop(&mut c.st.fpu);
    }
    Ok(())
}

pub(crate) fn fxch(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let mut env = Env::full(c.st.fpu.fcw);
    let i = st_last(d);
    let a = src(&c.st.fpu, &mut env, 0);
    let b = src(&c.st.fpu, &mut env, i);
    if finish(c, &env) {
        put(&mut c.st.fpu, 0, b);
        put(&mut c.st.fpu, i, a);
    }
    Ok(())
}

pub(crate) fn ffree(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let i = st_last(d);
    let f = &mut c.st.fpu;
    let p = phys(f, i);
    set_tag(f, p, 3);
    if d.insn.mnemonic() == Mnemonic::Ffreep {
        pop(f);
    }
    Ok(())
}

pub(crate) fn fincdec(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    begin(c, d, bus)?;
    let f = &mut c.st.fpu;
    let t = if d.insn.mnemonic() == Mnemonic::Fincstp {
        top(f) + 1
    } else {
        top(f) + 7
    };
    set_top(f, t);
    f.fsw &= !C1;
    Ok(())
}
