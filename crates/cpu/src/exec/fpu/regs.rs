//! The x87 register stack (TOP, tags, physical registers), stack faults,
//! and each instruction's prologue and epilogue (the last-instruction
//! pointers, unmasked exceptions, memory operands).

use super::*;

pub(crate) fn set_top(f: &mut FpuState, t: usize) {
    f.fsw = (f.fsw & !0x3800) | ((t as u16 & 7) << 11);
}

pub(crate) fn phys(f: &FpuState, i: usize) -> usize {
    (top(f) + i) & 7
}

pub(crate) fn tag(f: &FpuState, p: usize) -> u16 {
    (f.ftw >> (2 * p)) & 3
}

pub(crate) fn set_tag(f: &mut FpuState, p: usize, t: u16) {
    f.ftw = (f.ftw & !(3 << (2 * p))) | (t << (2 * p));
}

pub(crate) fn is_empty(f: &FpuState, i: usize) -> bool {
    tag(f, phys(f, i)) == 3
}

pub(crate) fn get(f: &FpuState, i: usize) -> F80 {
    f.regs[phys(f, i)]
}

pub(crate) fn put(f: &mut FpuState, i: usize, v: F80) {
    let p = phys(f, i);
    f.regs[p] = v;
    set_tag(f, p, soft::tag_of(v));
}

pub(crate) fn push(f: &mut FpuState, v: F80) {
    let t = (top(f) + 7) & 7;
    set_top(f, t);
    put(f, 0, v);
}

pub(crate) fn pop(f: &mut FpuState) {
    let p = phys(f, 0);
    set_tag(f, p, 3);
    set_top(f, top(f) + 1);
}

/// The tag word with the tags of non-empty registers computed from their
/// contents, as FNSTENV/FNSAVE store it.
pub(crate) fn full_tags(f: &FpuState) -> u16 {
    let mut t = 0;
    for p in 0..8 {
        let v = if tag(f, p) == 3 {
            3
        } else {
            soft::tag_of(f.regs[p])
        };
        t |= v << (2 * p);
    }
    t
}

/// ST(i) as a source: on an empty register, a stack underflow (the masked
/// response reads the QNaN indefinite).
pub(crate) fn src(f: &FpuState, env: &mut Env, i: usize) -> F80 {
    if is_empty(f, i) {
        underflow(env);
        INDEFINITE
    } else {
        get(f, i)
    }
}

pub(crate) fn underflow(env: &mut Env) {
    env.flags |= IE;
    if env.stack.is_none() {
        env.stack = Some(false);
    }
}

/// Checks that a push has room: the masked response to a stack overflow
/// pushes the QNaN indefinite instead of `v`.
pub(crate) fn push_value(f: &FpuState, env: &mut Env, v: F80) -> F80 {
    if tag(f, (top(f) + 7) & 7) != 3 {
        env.flags |= IE;
        env.stack = Some(true);
        INDEFINITE
    } else {
        v
    }
}

/// Index of the ST(i) register operand `n`.
pub(crate) fn st_op(d: &DecodedInsn, n: u32) -> usize {
    (d.insn.op_register(n) as u32).wrapping_sub(Register::ST0 as u32) as usize & 7
}

/// ST(i) of one-register forms: the last operand, ST(1) without operands.
pub(crate) fn st_last(d: &DecodedInsn) -> usize {
    match d.insn.op_count() {
        0 => 1,
        n => st_op(d, n - 1),
    }
}

pub(crate) fn has_mem(d: &DecodedInsn) -> bool {
    d.ops[0].kind == OpK::Mem
}

/// The opcode (FOP): the low three bits of the D8–DF byte and the ModR/M.
pub(crate) fn opcode(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> u16 {
    let lin0 = c.st.seg[seg::CS].base.wrapping_add(c.st.rip) as u32;
    let mut byte = |c: &mut Cpu, k: u32| -> Option<u8> {
        let p = c.translate_fetch(bus, lin0.wrapping_add(k)).ok()?;
        c.read_phys(bus, p, 1).ok().map(|v| v as u8)
    };
    for k in 0..d.len as u32 {
        match byte(c, k) {
            Some(b @ 0xd8..=0xdf) => {
                let modrm = byte(c, k + 1).unwrap_or(0);
                return (((b & 7) as u16) << 8) | modrm as u16;
            }
            Some(_) => {}
            None => break,
        }
    }
    0
}

/// Common start of the non-control x87 instructions: #NM, pending #MF, and
/// the last instruction (and data) pointers.
pub(crate) fn begin(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus) -> R {
    nm_check(c)?;
    mf_check(c)?;
    let fop = opcode(c, d, bus);
    let f = &mut c.st.fpu;
    f.fip = c.st.rip as u32;
    f.fcs = c.st.seg[seg::CS].selector;
    f.fop = fop & 0x7ff;
    if has_mem(d) {
        c.st.fpu.fdp = c.ea(d);
        c.st.fpu.fds = c.st.seg[d.mseg as usize].selector;
    }
    Ok(())
}

/// Records the exceptions of an operation in the FSW. Returns false when an
/// unmasked invalid-operation, zero-divide or denormal exception means the
/// destination must not be written (nor the stack popped).
pub(crate) fn finish(c: &mut Cpu, env: &Env) -> bool {
    let f = &mut c.st.fpu;
    let mut fl = env.flags & 0x3f;
    if fl & DE != 0 && env.masks & DE == 0 {
        // An unmasked denormal stops the operation before it computes.
        fl &= IE | ZE | DE;
    }
    f.fsw |= fl;
    f.fsw &= !C1;
    if env.c1 {
        f.fsw |= C1;
    }
    if let Some(over) = env.stack {
        f.fsw |= SF;
        f.fsw = (f.fsw & !C1) | if over { C1 } else { 0 };
    }
    if fl & !env.masks != 0 {
        f.fsw |= ES | BUSY;
    }
    let ok = fl & (IE | ZE | DE) & !env.masks == 0;
    if !ok && env.stack.is_none() {
        f.fsw &= !C1;
    }
    ok
}

/// Whether a memory store may happen: unmasked IE, OE and UE suppress it.
pub(crate) fn store_ok(env: &Env) -> bool {
    env.flags & (IE | OE | UE) & !env.masks == 0
}

pub(crate) fn set_cc(c: &mut Cpu, bits: u16) {
    let f = &mut c.st.fpu;
    f.fsw = (f.fsw & !(C0 | C2 | C3)) | bits;
}

/// Reads a memory operand as an 80-bit value (FLD m32/m64/m80, FILD,
/// FBLD and the memory forms of the arithmetic and compares).
pub(crate) fn load_mem(c: &mut Cpu, d: &DecodedInsn, bus: &mut dyn Bus, env: &mut Env) -> Res<F80> {
    let ea = c.ea(d);
    let s = d.mseg as usize;
    Ok(match d.insn.memory_size() {
        MemorySize::Float32 => soft::from_float(env, c.read_mem(bus, s, ea, 4)?, false),
        MemorySize::Float64 => soft::from_float(env, c.read_mem(bus, s, ea, 8)?, true),
        MemorySize::Float80 => read_f80(c, bus, s, ea)?,
        MemorySize::Int16 => soft::from_i64(c.read_mem(bus, s, ea, 2)? as i16 as i64),
        MemorySize::Int32 => soft::from_i64(c.read_mem(bus, s, ea, 4)? as i32 as i64),
        MemorySize::Int64 => soft::from_i64(c.read_mem(bus, s, ea, 8)? as i64),
        MemorySize::Bcd => {
            let lo = c.read_mem(bus, s, ea, 8)?;
            let hi = c.read_mem(bus, s, ea.wrapping_add(8), 2)?;
            let mut b = [0u8; 10];
            b[..8].copy_from_slice(&lo.to_le_bytes());
            b[8..].copy_from_slice(&(hi as u16).to_le_bytes());
            soft::from_bcd(b)
        }
        _ => return Err(Exc::ud()),
    })
}

/// Reads the memory operand of an arithmetic or compare instruction. A
/// float source keeps a signaling NaN signaling (the operation's NaN rules
/// apply), and its denormal-operand exception is raised by `mem_denormal`
/// only when the operation gets as far as looking at operand values.
pub(crate) fn load_mem_op(
    c: &mut Cpu,
    d: &DecodedInsn,
    bus: &mut dyn Bus,
    env: &mut Env,
) -> Res<(F80, bool)> {
    let ea = c.ea(d);
    let s = d.mseg as usize;
    Ok(match d.insn.memory_size() {
        MemorySize::Float32 => soft::from_float_raw(c.read_mem(bus, s, ea, 4)?, false),
        MemorySize::Float64 => soft::from_float_raw(c.read_mem(bus, s, ea, 8)?, true),
        _ => (load_mem(c, d, bus, env)?, false),
    })
}

/// DE for a denormal memory source, unless NaN/unsupported operands or a
/// zero divide took precedence.
pub(crate) fn mem_denormal(env: &mut Env, denormal: bool, other: F80) {
    if denormal
        && env.flags & ZE == 0
        && !matches!(
            soft::classify(other),
            Class::QNaN | Class::SNaN | Class::Unsupported
        )
    {
        env.flags |= DE;
    }
}
