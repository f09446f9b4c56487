//! The `trap` engine on real guests, through the `popek` binary: the
//! paravirtual minios passes everything with zero gap events; the native
//! minios fails exactly the self-checks whose instructions the audit marks
//! as differing; a guest whose virtual IF is lost to a deprivileged POPF
//! stalls, and popek says why; `--trace traps` shows the traps.

use std::collections::BTreeSet;

mod support;
use support::*;

fn audit_json(guest: &str) -> (serde_json::Value, String) {
    let (code, out, err) = popek(&["audit", "--guest", guest, "--json"]);
    assert_eq!(
        code, 0,
        "popek audit exits 0 once it reported; stderr:\n{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("audit JSON ({e}):\n{out}\nstderr:\n{err}"));
    (v, err)
}

fn stat(v: &serde_json::Value, name: &str) -> u64 {
    v["stats"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no stat {name}: {v}"))
}

#[test]
fn paravirtual_minios_passes_with_zero_gap_events() {
    let (v, console) = audit_json("minios-pv");
    assert_eq!(
        v["guest_exit_status"], 0,
        "powered off; console:\n{console}"
    );
    assert!(console.contains("minios: all checks passed"), "{console}");
    assert!(!console.contains("FAILED"), "{console}");
    assert!(console.contains("minios: sched ok"), "{console}");
    for b in popek_guests::BENCHES {
        assert!(
            console.contains(&format!("minios: bench {b} ")),
            "bench {b} ran: {console}"
        );
    }
    assert_eq!(
        v["instructions"].as_array().map(|a| a.len()),
        Some(0),
        "no gap instruction: {v}"
    );
    assert_eq!(stat(&v, "gap instructions executed"), 0);
    // It really was trap-and-emulate with shadow paging: system calls came
    // through the monitor, shadow misses were hidden, CR3 loads trapped.
    assert!(stat(&v, "trap: #GP int 0x80 (reflected)") > 1000, "{v}");
    assert!(stat(&v, "trap: #NP iret to ring 3") > 1000, "{v}");
    assert!(stat(&v, "hidden page faults") > 1000, "{v}");
    assert!(stat(&v, "true page faults") > 100, "{v}");
    assert!(stat(&v, "CR3 switches") > 10, "{v}");
    assert!(stat(&v, "trap: #GP hypercall") > 1000, "{v}");
    assert!(stat(&v, "trap: irq 0x20 (reflected)") > 3, "{v}");
    // gpp != hpp: the shadow PTEs carried host-physical addresses of a
    // shuffled map, and the guest still saw its own memory.
    assert!(
        stat(
            &v,
            "64 KiB chunks of guest RAM at another host-physical address"
        ) > 1000,
        "{v}"
    );
}

/// The instruction whose result each native self-check observes.
fn instruction_of(check: &str) -> &'static str {
    match check {
        "cpl" => "MOV/PUSH from CS",
        "ss_rpl" => "MOV/PUSH from SS",
        "if_pushf_after_cli" | "if_pushf_after_sti" | "if_irq_save" | "if_cli_popf"
        | "if_popf_clear" | "pushf_iopl" => "PUSHF",
        "sgdt_base" | "sgdt_limit" => "SGDT",
        "sidt_base" | "sidt_limit" => "SIDT",
        "str" => "STR",
        "sldt" => "SLDT",
        "smsw" => "SMSW",
        "lar_kernel_cs" => "LAR",
        other => panic!("check {other} observes no gap instruction: a trap bug?"),
    }
}

#[test]
fn native_minios_fails_exactly_where_the_audit_differs() {
    let (v, console) = audit_json("minios");
    assert_eq!(v["guest_exit_status"], 3, "checks failed: {console}");
    let failed: Vec<&str> = console
        .lines()
        .find_map(|l| l.strip_prefix("minios: ")?.split_once("checks FAILED: "))
        .map(|(_, names)| names.split_whitespace().collect())
        .unwrap_or_else(|| panic!("no FAILED line:\n{console}"));
    let rows = v["instructions"].as_array().expect("rows");
    let differing: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r["differed"].as_u64().unwrap_or(0) > 0)
        .map(|r| r["instruction"].as_str().unwrap())
        .collect();
    let observed: BTreeSet<&str> = failed.iter().map(|c| instruction_of(c)).collect();
    // Every failed check saw an instruction the audit marks as differing...
    for c in &failed {
        assert!(
            differing.contains(instruction_of(c)),
            "check {c} failed but the audit has no differing {}: {v}",
            instruction_of(c)
        );
    }
    // ...and every differing instruction explains a failed check, except
    // POPF, whose lost IF the checks can only see through PUSHF (which the
    // deprivileged CPU answers with the real IF = 1).
    for d in &differing {
        assert!(
            observed.contains(d) || *d == "POPF",
            "{d} differed but no check failed on it: failed {failed:?}"
        );
    }
    for must in ["POPF", "PUSHF", "MOV/PUSH from CS"] {
        assert!(differing.contains(must), "{must} differs: {v}");
    }
    let popf = rows.iter().find(|r| r["instruction"] == "POPF").unwrap();
    assert!(
        popf["consequence"]
            .as_str()
            .unwrap()
            .contains("tried to set IF: ignored"),
        "{popf}"
    );
    // The checks that hold at ring 1 passed.
    for ok in ["pf_cr2", "pte_dirty", "user_getpid", "de_eip", "cr4_tsd"] {
        assert!(
            console.contains(&format!("minios: check {ok} ok")),
            "{ok}: {console}"
        );
    }
}

#[test]
fn a_lost_virtual_if_stalls_the_guest_and_the_audit_explains_it() {
    // mov esp, 0x90000; cli; push 0x202; popf; hlt — at ring 0 the POPF
    // sets IF again and HLT waits for the timer; at ring 1 the POPF is
    // silently ignored.
    let img = [
        0xbc, 0x00, 0x00, 0x09, 0x00, 0xfa, 0x68, 0x02, 0x02, 0x00, 0x00, 0x9d, 0xf4,
    ];
    let p = temp_file("stall.bin", &img);
    let (code, _out, err) = popek(&[
        "run",
        "--engine",
        "trap",
        "--kernel",
        p.to_str().unwrap(),
        "--format",
        "flat-protected",
        "--load-addr",
        "0x100000",
    ]);
    assert_eq!(code, 6, "no progress: {err}");
    assert!(err.contains("interrupts disabled"), "{err}");
    assert!(err.contains("POPF at 0x0010000b"), "names the POPF: {err}");
    assert!(err.contains("tried to set IF: ignored"), "{err}");
    assert!(err.contains("CLI at 0x00100005"), "{err}");
    // The same guest on interp halts with IF set and nothing to wake it
    // (no timer): also status 6, but for another reason.
    let (code, _out, err) = popek(&[
        "run",
        "--engine",
        "interp",
        "--kernel",
        p.to_str().unwrap(),
        "--format",
        "flat-protected",
        "--load-addr",
        "0x100000",
        "--clock",
        "virtual",
    ]);
    assert_eq!(code, 6, "{err}");
    assert!(!err.contains("interrupts disabled"), "{err}");
}

#[test]
fn trace_traps_shows_vector_eip_instruction_and_action() {
    let (code, _out, err) = popek(&["run", "--engine", "trap", "--trace", "traps"]);
    assert_eq!(code, 3, "native minios fails its gap checks: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("trap ")).collect();
    assert!(lines.len() > 100, "{} trace lines", lines.len());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("#GP") && l.contains("cli") && l.contains("virtual IF := 0")),
        "a CLI trap: {}",
        lines[..20].join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("#PF") && l.contains("hidden") && l.contains("hpp")),
        "a hidden page fault"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("#GP") && l.contains("mov") && l.contains("virtual CR3")),
        "a CR3 load"
    );
}

#[test]
fn native_minios_runs_to_the_end_when_told_to_go_on() {
    // The gap breaks minios's self-checks, not the kernel: with
    // `checks=continue` it schedules, runs its benchmarks (CLI, port I/O,
    // CR3 loads and page-table stores all trapping) and powers off.
    let (code, out, err) = popek(&[
        "run",
        "--engine",
        "trap",
        "--cmdline",
        "checks=continue",
        "--stats",
    ]);
    assert!(out.contains("checks FAILED"), "{out}");
    assert!(out.contains("going on despite the failed checks"), "{out}");
    assert!(out.contains("minios: sched ok"), "{out}");
    assert!(out.contains("minios: bench forkwait "), "{out}");
    assert_eq!(code, 0, "powered off: {err}");
    let stat = |name: &str| -> u64 {
        err.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name}: {err}"))
    };
    assert!(stat("write-protect traps") > 0, "{err}");
    assert!(stat("trap: #GP cli") > 0, "{err}");
    assert!(stat("trap: #GP in") > 10_000, "{err}");
    assert!(stat("trap: #GP mov cr3") > 100, "{err}");
    assert!(stat("trap: #NP iret to ring 3") > 10_000, "{err}");
    assert!(stat("trap: #GP iret to ring 0 (emulated)") > 0, "{err}");
}
