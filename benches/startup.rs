//! Time from process start to the embedded guest's first serial line, and
//! the whole minios run, on the `interp` engine.
//!
//!     cargo bench --bench startup

#![allow(missing_docs)] // criterion_group! generates an undocumented function.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

fn first_line(args: &[&str]) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_popek"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("popek starts");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    BufReader::new(out).read_line(&mut line).expect("a line");
    let t = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("minios"), "unexpected first line {line:?}");
    t
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("startup");
    g.sample_size(20);
    g.bench_function("first serial line (interp, minios)", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| first_line(&["run", "--engine", "interp"]))
                .sum()
        })
    });
    g.bench_function("whole minios run (interp, virtual clock)", |b| {
        b.iter_custom(|n| {
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    let st = Command::new(env!("CARGO_BIN_EXE_popek"))
                        .args(["run", "--engine", "interp", "--clock", "virtual"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .expect("popek runs");
                    assert!(st.success());
                    t.elapsed()
                })
                .sum()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
