//! Boots the embedded minios guests through the `popek` binary and checks
//! what they print and how popek exits.

mod support;
use support::*;

/// The guest measured its TSC against the PIT (the machine's TSC is a
/// nominal 1 GHz on the software engines) and every bench line carries
/// `ns_per_iter=`, which at 1 GHz equals `cycles_per_iter` to within the
/// calibration error.
fn assert_tsc_calibrated_and_ns(out: &str) {
    let mhz: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("minios: tsc MHz="))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `minios: tsc MHz=` line:\n{out}"));
    assert!(
        (990.0..=1010.0).contains(&mhz),
        "TSC {mhz} MHz, want ~1000:\n{out}"
    );
    let mut lines = 0;
    // The paravirtual kernel has no local APIC mapping: that benchmark
    // says it is unavailable.
    for l in out
        .lines()
        .filter(|l| l.starts_with("minios: bench ") && !l.ends_with("unavailable"))
    {
        let field = |k: &str| -> f64 {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{k} missing in {l}"))
        };
        let (cycles, ns) = (field("cycles_per_iter="), field("ns_per_iter="));
        assert!(
            (ns - cycles).abs() <= 1.0 + cycles * 0.02,
            "at ~1 GHz ns ≈ cycles: {l}"
        );
        lines += 1;
    }
    let unavailable = out.lines().filter(|l| l.ends_with("unavailable")).count();
    assert!(
        unavailable == 0 || out.contains("minios: booting (i386 paravirtual)") && unavailable == 1,
        "{out}"
    );
    assert_eq!(lines + unavailable, popek_guests::BENCHES.len(), "{out}");
}

#[test]
fn minios_passes_its_checks_on_interp_and_powers_off() {
    let (code, out, err) = popek(&["run", "--engine", "interp", "--clock", "virtual"]);
    assert!(
        out.contains("minios: all checks passed"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert!(
        out.contains("minios: sched ok"),
        "the timer-driven scheduler ran:\n{out}"
    );
    for bench in popek_guests::BENCHES {
        assert!(
            out.contains(&format!("minios: bench {bench} iters=")),
            "benchmark {bench} missing:\n{out}"
        );
    }
    assert_tsc_calibrated_and_ns(&out);
    assert_eq!(code, 0, "power-off exits 0; stderr:\n{err}");
}

#[test]
fn no_arguments_boots_minios_on_the_auto_engine() {
    let (code, out, err) = popek(&[]);
    // No hardware KVM here: the binary translator (x86-64 Linux hosts).
    assert!(err.contains("engine auto -> bt"), "{err}");
    assert!(out.contains("minios: all checks passed"), "{out}");
    assert_eq!(code, 0);
}

#[test]
fn paravirtual_minios_passes_its_checks_on_interp() {
    let (code, out, err) = popek(&["run", "--guest", "minios-pv", "--clock", "virtual"]);
    assert!(
        out.contains("minios: all checks passed"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    assert_tsc_calibrated_and_ns(&out);
    assert_eq!(code, 0, "stderr:\n{err}");
}
