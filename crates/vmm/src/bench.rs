//! `popek bench`: the minios micro-benchmarks on every engine, as one table
//! (text, JSON and an SVG bar chart).
//!
//! Each engine runs the build of minios it can run correctly (`minios-pv`
//! under `trap`, `minios64` under `hw` on a KVM without 32-bit paging,
//! `minios` elsewhere). Figures are TSC cycles per operation as the guest
//! measures them; the machine's TSC runs at a nominal 1 GHz on the host
//! clock, so a cycle is a nanosecond of real time.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};

use popek_machine::ClockMode;

use crate::{EngineKind, KernelSource, Outcome, Vm, VmConfig};

/// The benchmarks, in minios's order.
pub const BENCHES: [&str; 8] = [
    "syscall",
    "in",
    "callret",
    "pagefault",
    "ptemod",
    "divzero",
    "forkwait",
    "compute",
];

/// The classic paper's figures (Adams & Agesen, ASPLOS 2006), cycles per
/// operation: (benchmark, software VMM (BT), hardware VMM (VT-x)).
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
    /// Cycles per operation for each of [`BENCHES`], when measured.
    pub cycles: Vec<Option<u64>>,
    /// Whether the engine exists and ran.
    pub ran: bool,
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

/// Parses `minios: bench NAME iters=N cycles_per_iter=C` lines.
pub fn parse(output: &str) -> Vec<Option<u64>> {
    BENCHES
        .iter()
        .map(|b| {
            let prefix = format!("minios: bench {b} ");
            output.lines().find_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("cycles_per_iter="))
                    .and_then(|v| v.parse().ok())
            })
        })
        .collect()
}

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
        return Column {
            engine: engine.name(),
            guest: "not built yet".into(),
            cycles: vec![None; BENCHES.len()],
            ran: false,
        };
    }
    let cfg = VmConfig {
        memory: 256 << 20,
        kernel: KernelSource::Embedded(guest.into()),
        initrd: None,
        cmdline: String::new(),
        engine,
        clock: ClockMode::Host,
    };
    let cap = Capture::default();
    let outcome = Vm::new(&cfg, Box::new(cap.clone())).map(|mut vm| vm.run());
    let text = cap
        .0
        .lock()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    match outcome {
        Ok(Outcome::PowerOff) => Column {
            engine: engine.name(),
            guest: guest.into(),
            cycles: parse(&text),
            ran: true,
        },
        Ok(o) => Column {
            engine: engine.name(),
            guest: format!("{guest}: ended with status {}", o.exit_status()),
            cycles: parse(&text),
            ran: false,
        },
        Err(e) => Column {
            engine: engine.name(),
            guest: format!("{guest}: {e}"),
            cycles: vec![None; BENCHES.len()],
            ran: false,
        },
    }
}

/// The table as text: cycles/op and the ratio to the fastest engine.
pub fn table(cols: &[Column]) -> String {
    let mut s = String::new();
    let _ = write!(s, "{:<10}", "benchmark");
    for c in cols {
        let _ = write!(
            s,
            " | {:>20}",
            format!("{} ({})", c.engine, short(&c.guest))
        );
    }
    let _ = writeln!(s, " | paper BT / VT-x");
    for (i, b) in BENCHES.iter().enumerate() {
        let best = cols.iter().filter_map(|c| c.cycles[i]).min();
        let _ = write!(s, "{b:<10}");
        for c in cols {
            let cell = match (c.cycles[i], best) {
                (Some(v), Some(m)) if m > 0 => format!("{v} ({:.1}x)", v as f64 / m as f64),
                (Some(v), _) => v.to_string(),
                (None, _) => "-".into(),
            };
            let _ = write!(s, " | {cell:>20}");
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

/// The table as JSON.
pub fn json(cols: &[Column]) -> String {
    let mut s = String::from(
        "{\n  \"unit\": \"TSC cycles per operation (1 GHz nominal TSC = ns)\",\n  \"engines\": [\n",
    );
    for (ci, c) in cols.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"engine\": {}, \"guest\": {}, \"ran\": {}, \"cycles\": {{",
            json_str(c.engine),
            json_str(&c.guest),
            c.ran
        );
        for (i, b) in BENCHES.iter().enumerate() {
            let v = c.cycles[i].map_or("null".to_string(), |v| v.to_string());
            let _ = write!(s, "{}\"{b}\": {v}", if i > 0 { ", " } else { "" });
        }
        let _ = writeln!(s, "}}}}{}", if ci + 1 < cols.len() { "," } else { "" });
    }
    s.push_str("  ]\n}\n");
    s
}

/// The table as an SVG bar chart (log scale, one group per benchmark).
pub fn svg(cols: &[Column]) -> String {
    let colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2"];
    let ran: Vec<&Column> = cols.iter().filter(|c| c.ran).collect();
    let (w, h, left, top, bottom) = (900.0, 420.0, 70.0, 40.0, 60.0);
    let plot_h = h - top - bottom;
    let max = ran
        .iter()
        .flat_map(|c| c.cycles.iter().flatten())
        .copied()
        .max()
        .unwrap_or(10)
        .max(10) as f64;
    let lmax = max.log10().ceil();
    let group_w = (w - left - 20.0) / BENCHES.len() as f64;
    let bar_w = (group_w - 10.0) / ran.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"15\">minios micro-benchmarks: cycles per operation (log scale)</text>\n"
    );
    for d in 0..=(lmax as i32) {
        let y = top + plot_h - plot_h * d as f64 / lmax;
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">1e{d}</text>",
            w - 20.0,
            left - 6.0,
            y + 4.0
        );
    }
    for (bi, b) in BENCHES.iter().enumerate() {
        let gx = left + bi as f64 * group_w + 5.0;
        for (ci, c) in ran.iter().enumerate() {
            if let Some(v) = c.cycles[bi] {
                let bh = plot_h * (v.max(1) as f64).log10() / lmax;
                let x = gx + ci as f64 * bar_w;
                let _ = writeln!(
                    s,
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{} {b}: {v}</title></rect>",
                    top + plot_h - bh,
                    bar_w - 2.0,
                    colors[ci % colors.len()],
                    c.engine
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

    #[test]
    fn parses_bench_lines() {
        let out = "minios: bench syscall iters=10 cycles_per_iter=718\nnoise\nminios: bench compute iters=2 cycles_per_iter=99\n";
        let v = parse(out);
        assert_eq!(v[0], Some(718));
        assert_eq!(v[1], None);
        assert_eq!(v[7], Some(99));
    }

    #[test]
    fn table_ratios_are_against_the_fastest() {
        let cols = vec![
            Column {
                engine: "interp",
                guest: "minios".into(),
                cycles: vec![Some(100); 8],
                ran: true,
            },
            Column {
                engine: "bt",
                guest: "minios".into(),
                cycles: vec![Some(50); 8],
                ran: true,
            },
        ];
        let t = table(&cols);
        assert!(t.contains("100 (2.0x)"), "{t}");
        assert!(t.contains("50 (1.0x)"), "{t}");
        assert!(t.contains("210 / 15826"), "{t}");
        let j = json(&cols);
        assert!(j.contains("\"syscall\": 100"), "{j}");
        let g = svg(&cols);
        assert!(g.starts_with("<svg") && g.contains("<rect"), "{g}");
    }
}
