//! One CPU on every engine: a guest that computes with results the manuals
//! leave undefined (flags after multi-bit shifts, MUL, DIV and the BCD
//! adjusts, SHLD/SHRD beyond the operand size, the upper half of a 32-bit
//! PUSH of a segment register) gets the same answer on `interp`, on `bt`
//! with code cold (interpreted) and hot (translated), and on `trap`, under
//! each vendor profile; the profiles give different answers (they are
//! different processors), and CPUID names the profile's vendor.

use iced_x86::code_asm::*;

mod support;
use support::*;

const LOAD: u64 = 0x10_0000;

/// Appends code printing EAX as eight hex digits and a newline on COM1.
fn print_eax(a: &mut CodeAssembler) {
    let (mut pr, mut digit) = (a.create_label(), a.create_label());
    a.mov(ebx, eax).unwrap();
    a.mov(ecx, 8).unwrap();
    a.mov(edx, 0x3f8).unwrap();
    a.set_label(&mut pr).unwrap();
    a.rol(ebx, 4).unwrap();
    a.mov(al, bl).unwrap();
    a.and(al, 0xf).unwrap();
    a.add(al, b'0' as i32).unwrap();
    a.cmp(al, b'9' as i32).unwrap();
    a.jbe(digit).unwrap();
    a.add(al, 7).unwrap();
    a.set_label(&mut digit).unwrap();
    a.out(dx, al).unwrap();
    a.dec(ecx).unwrap();
    a.jnz(pr).unwrap();
    a.mov(al, 0x0a).unwrap();
    a.out(dx, al).unwrap();
}

/// The guest: CPUID's vendor string, then a block of vendor-dependent
/// instructions run 400 times (cold, then translated under `bt`), each
/// run's hash compared with the first's; prints the vendor and the hash
/// and exits through the debug-exit port (status 0x21), or prints
/// "unstable" and exits with status 7 if one run differed.
fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut block = a.create_label();
    let mut top = a.create_label();
    let mut bad = a.create_label();
    a.mov(esp, 0x30_0000).unwrap();
    // CPUID vendor string on COM1.
    a.xor(eax, eax).unwrap();
    a.cpuid().unwrap();
    a.mov(dword_ptr(0x20_0000), ebx).unwrap();
    a.mov(dword_ptr(0x20_0004), edx).unwrap();
    a.mov(dword_ptr(0x20_0008), ecx).unwrap();
    a.mov(esi, 0x20_0000).unwrap();
    a.mov(ecx, 12).unwrap();
    a.mov(edx, 0x3f8).unwrap();
    a.rep().outsb().unwrap();
    a.mov(al, 0x0a).unwrap();
    a.out(dx, al).unwrap();
    a.call(block).unwrap();
    a.mov(dword_ptr(0x20_0010), eax).unwrap();
    a.mov(dword_ptr(0x20_0014), 400).unwrap();
    a.set_label(&mut top).unwrap();
    a.call(block).unwrap();
    a.cmp(eax, dword_ptr(0x20_0010)).unwrap();
    a.jne(bad).unwrap();
    a.dec(dword_ptr(0x20_0014)).unwrap();
    a.jnz(top).unwrap();
    print_eax(&mut a);
    a.mov(al, 0x10).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut bad).unwrap();
    print_eax(&mut a);
    a.mov(al, 0x03).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();

    // The block: EDI accumulates EAX, ECX, EDX and EFLAGS after each
    // instruction, from fixed inputs and fixed incoming flags.
    a.set_label(&mut block).unwrap();
    a.xor(edi, edi).unwrap();
    type Op = fn(&mut CodeAssembler);
    let ops: &[(u32, u32, u32, Op)] = &[
        (0x8765_4321, 5, 0, |a| a.shl(eax, cl).unwrap()),
        (0x8765_4321, 3, 0, |a| a.shr(eax, 3).unwrap()),
        (0x8765_4321, 9, 0, |a| a.sar(eax, cl).unwrap()),
        (0x0000_00f1, 6, 0, |a| a.shl(al, cl).unwrap()),
        (0x8765_4321, 7, 0, |a| a.rol(eax, cl).unwrap()),
        (0x8765_4321, 7, 0, |a| a.ror(eax, 13).unwrap()),
        (0x8765_4321, 11, 0, |a| a.rcr(eax, cl).unwrap()),
        (0x0000_00c3, 18, 0, |a| a.rcl(al, cl).unwrap()),
        (0x8765_4321, 13, 0x1357_9bdf, |a| {
            a.shld(eax, edx, cl).unwrap()
        }),
        (0x0000_4321, 21, 0x0000_9bdf, |a| {
            a.shrd(ax, dx, cl).unwrap()
        }),
        (0x0000_4321, 19, 0x0000_9bdf, |a| {
            a.shld(ax, dx, cl).unwrap()
        }),
        (0x8765_4321, 0x1234, 0, |a| a.mul(ecx).unwrap()),
        (0x8765_4321, 0x1234, 0, |a| a.imul_2(eax, ecx).unwrap()),
        (0x8765_4321, 0x1234_5678, 0x11, |a| a.div(ecx).unwrap()),
        (0x0765_4321, 0xffff_fff3, 0, |a| {
            a.cdq().unwrap();
            a.idiv(ecx).unwrap()
        }),
        (0x0000_007b, 0, 0, |a| a.daa().unwrap()),
        (0x0000_008e, 0, 0, |a| a.das().unwrap()),
        (0x0000_00fb, 0, 0, |a| a.aaa().unwrap()),
        (0x0000_0006, 0, 0, |a| a.aas().unwrap()),
        (0x0000_0000, 0, 0, |a| {
            a.push(0x5a5a_5a5a).unwrap();
            a.pop(eax).unwrap();
            a.push(es).unwrap();
            a.pop(eax).unwrap()
        }),
    ];
    for (i, (eax_in, ecx_in, edx_in, op)) in ops.iter().enumerate() {
        a.mov(eax, *eax_in).unwrap();
        a.mov(ecx, *ecx_in).unwrap();
        a.mov(edx, *edx_in).unwrap();
        // Incoming flags: a different arithmetic pattern per instruction.
        a.push(0x202 | (0x8d5 & (0x3a7 * (i as u32 + 1)))).unwrap();
        a.popfd().unwrap();
        op(&mut a);
        a.pushfd().unwrap();
        a.pop(ebx).unwrap();
        a.xor(edi, eax).unwrap();
        a.add(edi, ebx).unwrap();
        a.xor(edi, ecx).unwrap();
        a.add(edi, edx).unwrap();
        a.imul_3(edi, edi, 0x0100_0193).unwrap();
    }
    a.mov(eax, edi).unwrap();
    a.ret().unwrap();
    a.assemble(LOAD).unwrap()
}

/// Runs the guest; returns (status, stdout, stderr).
fn run(engine: &str, vendor: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let p = temp_file("vendor.bin", &guest());
    let r = popek_with(
        &[
            "run",
            "--engine",
            engine,
            "--cpu-vendor",
            vendor,
            "--kernel",
            p.to_str().unwrap(),
            "--format",
            "flat-protected",
            "--load-addr",
            "0x100000",
            "--memory",
            "4M",
            "--clock",
            "virtual",
        ],
        env,
    );
    (r.status, r.stdout, r.stderr)
}

#[test]
fn every_engine_is_one_cpu_under_each_vendor_profile() {
    let mut answers = Vec::new();
    for (vendor, cpuid) in [("intel", "GenuineIntel"), ("amd", "AuthenticAMD")] {
        let mut seen: Vec<(String, String)> = Vec::new();
        for (name, engine, env) in [
            ("interp", "interp", vec![]),
            ("bt", "bt", vec![]),
            (
                "bt, translated at once",
                "bt",
                vec![("POPEK_BT_HOT_AFTER", "1")],
            ),
            ("trap", "trap", vec![]),
        ] {
            let (status, out, err) = run(engine, vendor, &env);
            assert_eq!(
                status, 0x21,
                "{name} under {vendor}: the block gave the same hash every time\n{out}\n{err}"
            );
            let mut lines = out.lines();
            assert_eq!(lines.next(), Some(cpuid), "{name} under {vendor}: CPUID");
            let hash = lines.next().unwrap_or_default().to_string();
            println!("{vendor:5} {name:24} {hash}");
            seen.push((name.to_string(), hash));
        }
        for (name, hash) in &seen {
            assert_eq!(
                hash, &seen[0].1,
                "{name} and {} disagree under the {vendor} profile",
                seen[0].0
            );
        }
        answers.push(seen[0].1.clone());
    }
    assert_ne!(
        answers[0], answers[1],
        "the intel and amd profiles are different processors"
    );
}

#[test]
fn hw_refuses_a_profile_other_than_the_hosts() {
    let host = popek_vmm::Vendor::host();
    let other = if host == popek_vmm::Vendor::Intel {
        "amd"
    } else {
        "intel"
    };
    let (status, _, err) = run("hw", other, &[]);
    assert_eq!(status, 2, "{err}");
    assert!(
        err.contains("--cpu-vendor"),
        "one line naming the problem: {err}"
    );
}
