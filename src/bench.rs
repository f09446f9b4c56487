//! `popek bench`: the minios micro-benchmarks on every engine, as one table
//! (text, JSON and an SVG bar chart).
//!
//! Each engine runs the build of minios it can run correctly (`minios-pv`
//! under `trap`, `minios64` under `hw` on a KVM without 32-bit paging,
//! `minios` elsewhere). Figures are nanoseconds per operation: minios counts
//! TSC cycles (RDTSC at ring 3) and converts them with the TSC rate it
//! measured against the PIT at boot (`minios: tsc MHz=...`), printing
//! `ns_per_iter=` beside `cycles_per_iter=`. The TSC rate differs per engine
//! (the software engines' machine TSC is a nominal 1 GHz; under `hw` the
//! guest sees the host's TSC, e.g. 2.6 GHz, where the KVM does not apply
//! `KVM_SET_TSC_KHZ`), so only nanoseconds compare across columns; the raw
//! cycle counts are shown separately, with each column's TSC rate.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};

use popek_machine::ClockMode;

pub use popek_guests::BENCHES;
use popek_vmm::{EngineKind, KernelSource, Outcome, Vm, VmConfig};

/// The classic paper's figures (Adams & Agesen, ASPLOS 2006), CPU cycles
/// per operation on a 3.8 GHz Pentium 4: (benchmark, software VMM (BT),
/// hardware VMM (VT-x)).
pub const PAPER: [(&str, u64, u64); 3] = [
    ("in", 210, 15_826),
    ("ptemod", 391, 12_733),
    ("pagefault", 3_927, 11_242),
];

/// One engine's column.
#[derive(Clone, Debug, PartialEq)]
pub struct Column {
    /// Engine name.
    pub engine: &'static str,
    /// The guest build it ran, or why it did not run.
    pub guest: String,
    /// Guest TSC cycles per operation for each of [`BENCHES`], when
    /// measured (at this column's TSC rate, [`Column::tsc_mhz`]).
    pub cycles: Vec<Option<u64>>,
    /// Nanoseconds per operation for each of [`BENCHES`], as the guest
    /// converted them (its `ns_per_iter=`).
    pub ns: Vec<Option<f64>>,
    /// The guest's TSC rate as it measured it against the PIT, MHz.
    pub tsc_mhz: Option<f64>,
    /// Whether the engine exists and ran.
    pub ran: bool,
    /// Traps the engine handled per operation of each benchmark (`trap`
    /// only): the engine's trap count between the benchmark's result line
    /// and the previous one, over its iterations.
    pub traps_per_op: Vec<Option<f64>>,
    /// The engine's `--stats` at the end of the run (TUs, CCF bytes,
    /// ident/inline/call-out counts for `bt`; traps for `trap`; ...).
    pub stats: Vec<(String, u64)>,
}

impl Column {
    /// A column for an engine that did not run (`why`).
    fn missing(engine: EngineKind, why: String) -> Column {
        Column {
            engine: engine.name(),
            guest: why,
            cycles: vec![None; BENCHES.len()],
            ns: vec![None; BENCHES.len()],
            tsc_mhz: None,
            ran: false,
            traps_per_op: vec![None; BENCHES.len()],
            stats: Vec::new(),
        }
    }

    /// Nanoseconds per operation of benchmark `i`: the guest's own
    /// `ns_per_iter`, else its cycles at its measured TSC rate.
    pub fn time_ns(&self, i: usize) -> Option<f64> {
        self.ns[i].or_else(|| {
            let mhz = self.tsc_mhz.filter(|m| *m > 0.0)?;
            Some(self.cycles[i]? as f64 * 1000.0 / mhz)
        })
    }
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The value of `key=` in the `minios: bench NAME ...` line of each of
/// [`BENCHES`].
fn parse_field<T: std::str::FromStr>(output: &str, key: &str) -> Vec<Option<T>> {
    BENCHES
        .iter()
        .map(|b| {
            let prefix = format!("minios: bench {b} ");
            output.lines().find_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
            })
        })
        .collect()
}

/// Parses the `cycles_per_iter=C` of `minios: bench NAME iters=N
/// cycles_per_iter=C ns_per_iter=T` lines (TSC cycles).
pub fn parse(output: &str) -> Vec<Option<u64>> {
    parse_field(output, "cycles_per_iter")
}

/// Parses the `ns_per_iter=T` of the bench lines (nanoseconds, decimal).
pub fn parse_ns(output: &str) -> Vec<Option<f64>> {
    parse_field::<f64>(output, "ns_per_iter")
        .into_iter()
        .map(|v| v.filter(|x| x.is_finite() && *x >= 0.0))
        .collect()
}

/// Parses `minios: tsc MHz=F ...`: the TSC rate the guest measured.
pub fn parse_tsc_mhz(output: &str) -> Option<f64> {
    output.lines().find_map(|l| {
        l.strip_prefix("minios: tsc ")?
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("MHz="))?
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m > 0.0)
    })
}

/// A column from a run's console output.
fn measured(engine: EngineKind, guest: String, text: &str, ran: bool) -> Column {
    Column {
        engine: engine.name(),
        guest,
        cycles: parse(text),
        ns: parse_ns(text),
        tsc_mhz: parse_tsc_mhz(text),
        ran,
        traps_per_op: vec![None; BENCHES.len()],
        stats: Vec::new(),
    }
}

/// Instructions between trap-count samples while `trap` runs the suite.
const TRAP_SAMPLE: u64 = 20_000;

/// The guest build each engine runs.
pub fn guest_for(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::Trap => "minios-pv",
        EngineKind::Hw => "minios64",
        _ => "minios",
    }
}

/// Runs the suite on one engine.
pub fn run_engine(engine: EngineKind) -> Column {
    let guest = guest_for(engine);
    if !engine.available() {
        return Column::missing(engine, "not built yet".into());
    }
    let cfg = VmConfig {
        memory: 256 << 20,
        kernel: KernelSource::Embedded(guest.into()),
        initrd: None,
        cmdline: String::new(),
        engine,
        clock: ClockMode::Host,
        vendor: None,
        cpus: 1,
        firmware: None,
        threads: popek_vmm::Threads::Auto,
        devices: Default::default(),
    };
    let cap = Capture::default();
    let text_now = || {
        cap.0
            .lock()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    let mut marks: Vec<Option<u64>> = vec![None; BENCHES.len() + 1];
    let mut stats: Vec<(String, u64)> = Vec::new();
    let outcome = Vm::new(&cfg, Box::new(cap.clone())).map(|mut vm| {
        if engine != EngineKind::Trap {
            let o = vm.run();
            stats = vm.stats();
            return o;
        }
        // Snapshot the trap count as each result line appears (the line
        // before the first benchmark's is the scheduler's).
        loop {
            let limit = vm.engine.instructions() + TRAP_SAMPLE;
            let done = vm.run_limited(limit);
            let text = text_now();
            let traps = vm.stat("traps");
            for (i, m) in marks.iter_mut().enumerate() {
                let line = match i {
                    0 => "minios: sched ".to_string(),
                    i => format!("minios: bench {} ", BENCHES[i - 1]),
                };
                if m.is_none() && text.contains(&line) {
                    *m = traps;
                }
            }
            if let Some(o) = done {
                stats = vm.stats();
                return o;
            }
        }
    });
    let text = text_now();
    let iters: Vec<Option<u64>> = parse_field(&text, "iters");
    let traps_per_op: Vec<Option<f64>> = (0..BENCHES.len())
        .map(|i| {
            let (a, b, n) = (marks[i]?, marks[i + 1]?, iters[i]?);
            (n > 0 && b >= a).then(|| (b - a) as f64 / n as f64)
        })
        .collect();
    let with_traps = |mut c: Column| {
        c.traps_per_op = traps_per_op.clone();
        c.stats = stats.clone();
        c
    };
    match outcome {
        Ok(Outcome::PowerOff) => with_traps(measured(engine, guest.into(), &text, true)),
        Ok(o) => measured(
            engine,
            format!("{guest}: ended with status {}", o.exit_status()),
            &text,
            false,
        ),
        Err(e) => Column::missing(engine, format!("{guest}: {e}")),
    }
}

/// A time in ns with the precision that matters at its size.
fn fmt_ns(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// The table as text: nanoseconds per operation and the ratio to the
/// fastest engine (in ns), then each column's TSC rate and raw TSC cycles.
pub fn table(cols: &[Column]) -> String {
    const W: usize = 22;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "time per operation in ns (guest TSC calibrated against the PIT); (ratio to the fastest engine)"
    );
    let _ = write!(s, "{:<10}", "benchmark");
    for c in cols {
        let _ = write!(
            s,
            " | {:>W$}",
            format!("{} ({})", c.engine, short(&c.guest))
        );
    }
    let _ = writeln!(s, " | paper BT / VT-x (cycles)");
    for (i, b) in BENCHES.iter().enumerate() {
        let best = cols
            .iter()
            .filter_map(|c| c.time_ns(i))
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
        let _ = write!(s, "{b:<10}");
        for c in cols {
            let cell = match (c.time_ns(i), best) {
                (Some(v), Some(m)) if m > 0.0 => format!("{} ({:.1}x)", fmt_ns(v), v / m),
                (Some(v), _) => fmt_ns(v),
                (None, _) => "-".into(),
            };
            let _ = write!(s, " | {cell:>W$}");
        }
        match PAPER.iter().find(|p| p.0 == *b) {
            Some((_, bt, vt)) => {
                let _ = writeln!(s, " | {bt} / {vt}");
            }
            None => {
                let _ = writeln!(s, " |");
            }
        }
    }
    // Each engine's statistics for the whole run.
    for c in cols.iter().filter(|c| !c.stats.is_empty()) {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{} statistics (whole run of {}):",
            c.engine,
            short(&c.guest)
        );
        for (k, v) in &c.stats {
            let _ = writeln!(s, "  {k:<48} {v}");
        }
    }
    // Traps per operation, for the engines that trap.
    for c in cols
        .iter()
        .filter(|c| c.traps_per_op.iter().any(Option::is_some))
    {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{}: traps per operation (trap count between result lines / iterations)",
            c.engine
        );
        for (i, b) in BENCHES.iter().enumerate() {
            let cell = c.traps_per_op[i].map_or("-".into(), |v| format!("{v:.2}"));
            let _ = writeln!(s, "{b:<10} {cell:>10}");
        }
    }
    // The raw counts: TSC cycles at each column's own rate.
    if cols.iter().any(|c| c.cycles.iter().any(Option::is_some)) {
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "guest TSC cycles per operation (each column at its own TSC rate: not comparable across engines)"
        );
        let _ = write!(s, "{:<10}", "TSC MHz");
        for c in cols {
            let mhz = c.tsc_mhz.map_or("-".into(), |m| format!("{m:.1}"));
            let _ = write!(s, " | {mhz:>W$}");
        }
        let _ = writeln!(s);
        for (i, b) in BENCHES.iter().enumerate() {
            let _ = write!(s, "{b:<10}");
            for c in cols {
                let cell = c.cycles[i].map_or("-".into(), |v| v.to_string());
                let _ = write!(s, " | {cell:>W$}");
            }
            let _ = writeln!(s);
        }
    }
    s
}

fn short(g: &str) -> &str {
    g.split(':').next().unwrap_or(g)
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The table as JSON: per engine, ns per operation (`ns`, the figure to
/// compare), the raw TSC cycles (`cycles`) and the TSC rate (`tsc_mhz`).
pub fn json(cols: &[Column]) -> String {
    let mut s = String::from(
        "{\n  \"unit\": \"ns per operation (guest TSC calibrated against the PIT); cycles: guest TSC cycles at tsc_mhz\",\n  \"engines\": [\n",
    );
    for (ci, c) in cols.iter().enumerate() {
        let mhz = c.tsc_mhz.map_or("null".to_string(), |m| format!("{m:.3}"));
        let _ = write!(
            s,
            "    {{\"engine\": {}, \"guest\": {}, \"ran\": {}, \"tsc_mhz\": {mhz}, \"ns\": {{",
            json_str(c.engine),
            json_str(&c.guest),
            c.ran
        );
        for (i, b) in BENCHES.iter().enumerate() {
            let v = c
                .time_ns(i)
                .map_or("null".to_string(), |v| format!("{v:.2}"));
            let _ = write!(s, "{}\"{b}\": {v}", if i > 0 { ", " } else { "" });
        }
        let _ = write!(s, "}}, \"cycles\": {{");
        for (i, b) in BENCHES.iter().enumerate() {
            let v = c.cycles[i].map_or("null".to_string(), |v| v.to_string());
            let _ = write!(s, "{}\"{b}\": {v}", if i > 0 { ", " } else { "" });
        }
        let _ = write!(s, "}}, \"stats\": {{");
        for (i, (k, v)) in c.stats.iter().enumerate() {
            let _ = write!(s, "{}{}: {v}", if i > 0 { ", " } else { "" }, json_str(k));
        }
        let _ = write!(s, "}}, \"traps_per_op\": {{");
        for (i, b) in BENCHES.iter().enumerate() {
            let v = c.traps_per_op[i].map_or("null".to_string(), |v| format!("{v:.3}"));
            let _ = write!(s, "{}\"{b}\": {v}", if i > 0 { ", " } else { "" });
        }
        let _ = writeln!(s, "}}}}{}", if ci + 1 < cols.len() { "," } else { "" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// The table as an SVG bar chart of ns per operation (log scale, one group
/// per benchmark).
pub fn svg(cols: &[Column]) -> String {
    let colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2"];
    let ran: Vec<&Column> = cols.iter().filter(|c| c.ran).collect();
    let (w, h, left, top, bottom) = (900.0, 420.0, 70.0, 40.0, 60.0);
    let plot_h = h - top - bottom;
    let values: Vec<f64> = ran
        .iter()
        .flat_map(|c| (0..BENCHES.len()).filter_map(|i| c.time_ns(i)))
        .filter(|v| *v > 0.0)
        .collect();
    let max = values.iter().copied().fold(10.0f64, f64::max);
    let min = values.iter().copied().fold(1.0f64, f64::min).max(1e-3);
    // Decades from lmin (≤ 1 ns) to lmax; a bar's height is its log.
    let (lmin, lmax) = (min.log10().floor(), max.log10().ceil());
    let span = (lmax - lmin).max(1.0);
    let group_w = (w - left - 20.0) / BENCHES.len() as f64;
    let bar_w = (group_w - 10.0) / ran.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"15\">minios micro-benchmarks: ns per operation (log scale; guest TSC calibrated against the PIT)</text>\n"
    );
    for d in (lmin as i32)..=(lmax as i32) {
        let y = top + plot_h - plot_h * (f64::from(d) - lmin) / span;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">1e{d} ns</text>",
            w - 20.0,
            left - 6.0,
            y + 4.0
        );
    }
    for (bi, b) in BENCHES.iter().enumerate() {
        let gx = left + bi as f64 * group_w + 5.0;
        for (ci, c) in ran.iter().enumerate() {
            if let Some(v) = c.time_ns(bi) {
                let bh = (plot_h * (v.max(min).log10() - lmin) / span).max(1.0);
                let x = gx + ci as f64 * bar_w;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {b}: {} ns</title></rect>",
                    top + plot_h - bh,
                    bar_w - 2.0,
                    colors[ci % colors.len()],
                    c.engine,
                    fmt_ns(v)
                );
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{b}</text>",
            gx + group_w / 2.0 - 5.0,
            h - bottom + 18.0
        );
    }
    for (ci, c) in ran.iter().enumerate() {
        let x = left + ci as f64 * 160.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{} ({})</text>",
            h - 22.0,
            colors[ci % colors.len()],
            x + 16.0,
            h - 12.0,
            c.engine,
            short(&c.guest)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(engine: &'static str, cycles: u64, ns: Option<f64>, mhz: Option<f64>) -> Column {
        Column {
            engine,
            guest: "minios".into(),
            cycles: vec![Some(cycles); BENCHES.len()],
            ns: vec![ns; BENCHES.len()],
            tsc_mhz: mhz,
            ran: true,
            traps_per_op: vec![None; BENCHES.len()],
            stats: Vec::new(),
        }
    }

    #[test]
    fn parses_bench_lines() {
        let out = "minios: bench syscall iters=10 cycles_per_iter=718\nnoise\nminios: bench compute iters=2 cycles_per_iter=99\n";
        let v = parse(out);
        assert_eq!(v[0], Some(718));
        assert_eq!(v[1], None);
        assert_eq!(v[7], Some(99));
        // Lines without ns_per_iter (older guests) have no ns.
        assert_eq!(parse_ns(out), vec![None; BENCHES.len()]);
        assert_eq!(parse_tsc_mhz(out), None);
    }

    #[test]
    fn parses_ns_and_the_tsc_rate() {
        let out = "minios: tsc MHz=2600.581 (against PIT counter 2: shortest of 3 runs of 10 ms)\n\
                   minios: bench syscall iters=10000 cycles_per_iter=248468 ns_per_iter=96029.57\n\
                   minios: bench callret iters=100000 cycles_per_iter=0 ns_per_iter=0.25\n\
                   minios: bench in iters=1 cycles_per_iter=5 ns_per_iter=nan\n";
        assert_eq!(parse(out)[0], Some(248_468));
        let ns = parse_ns(out);
        assert_eq!(ns[0], Some(96029.57));
        assert_eq!(ns[2], Some(0.25));
        assert_eq!(ns[1], None, "not a finite number");
        assert_eq!(
            parse(out)[2],
            Some(0),
            "cycles_per_iter is not confused with ns_per_iter"
        );
        assert_eq!(parse_tsc_mhz(out), Some(2600.581));
        assert_eq!(parse_tsc_mhz("minios: tsc calibration failed\n"), None);
    }

    #[test]
    fn time_ns_prefers_the_guests_ns_then_converts_cycles() {
        let c = col("hw", 2600, Some(1000.5), Some(2600.0));
        assert_eq!(c.time_ns(0), Some(1000.5));
        let c = col("hw", 2600, None, Some(2600.0));
        assert_eq!(c.time_ns(0), Some(1000.0));
        let c = col("hw", 2600, None, None);
        assert_eq!(c.time_ns(0), None, "cycles of an unknown rate are not ns");
    }

    #[test]
    fn table_ratios_are_against_the_fastest_in_ns() {
        // interp: 100 cycles at 1 GHz = 100 ns; hw: 130 cycles at 2.6 GHz =
        // 50 ns. In cycles interp would look faster; in ns hw is.
        let cols = vec![
            col("interp", 100, Some(100.0), Some(1000.0)),
            col("hw", 130, Some(50.0), Some(2600.0)),
        ];
        let t = table(&cols);
        assert!(t.contains("100.0 (2.0x)"), "{t}");
        assert!(t.contains("50.0 (1.0x)"), "{t}");
        assert!(t.contains("210 / 15826"), "{t}");
        assert!(t.contains("time per operation in ns"), "{t}");
        assert!(t.contains("guest TSC cycles per operation"), "{t}");
        assert!(
            t.contains("2600.0") && t.contains("1000.0"),
            "TSC rates:\n{t}"
        );
        let j = json(&cols);
        assert!(j.contains("\"ns\": {\"syscall\": 100.00"), "{j}");
        assert!(j.contains("\"cycles\": {\"syscall\": 130"), "{j}");
        assert!(j.contains("\"tsc_mhz\": 2600.000"), "{j}");
        assert!(j.contains("ns per operation"), "{j}");
        let g = svg(&cols);
        assert!(g.starts_with("<svg") && g.contains("<rect"), "{g}");
        assert!(
            g.contains("ns per operation") && g.contains("hw syscall: 50.0 ns"),
            "{g}"
        );
    }

    #[test]
    fn sub_nanosecond_times_and_missing_engines_render() {
        let mut fast = col("hw", 0, Some(0.25), Some(2600.0));
        fast.ns[1] = None;
        fast.cycles[1] = None;
        let missing = Column::missing(EngineKind::Bt, "not built yet".into());
        let cols = vec![fast, missing];
        let t = table(&cols);
        assert!(t.contains("0.25 (1.0x)"), "{t}");
        assert!(t.contains(" - "), "{t}");
        let g = svg(&cols);
        assert!(g.contains("1e-1 ns"), "an axis below 1 ns:\n{g}");
        assert!(!g.contains("NaN") && !g.contains("inf"), "{g}");
        let j = json(&cols);
        assert!(j.contains("\"tsc_mhz\": null"), "{j}");
        assert!(j.contains("\"in\": null"), "{j}");
    }
}
