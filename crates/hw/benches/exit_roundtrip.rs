//! Port-I/O exit round trip: popek's `hw` engine against a raw `KVM_RUN`
//! loop, in the same run, on the same guest (a 64-bit loop of
//! `out 0x80, al`). The popek figure includes the whole exit path: KVM_RUN,
//! exit decoding, dispatch to the machine's port bus, the interrupt check,
//! the slice clock. Goal: popek ≤ 1.05 × raw.
//!
//! Also prints popek's memory overhead per VM: RSS growth per extra `hw`
//! VM minus the guest RAM it touched (goal ≤ 3 MiB).
//!
//! On kvm_pvm these figures describe PVM (a software KVM), not VT hardware.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use iced_x86::code_asm::*;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use popek_engine::Engine;
use popek_hw::guests::{self, TestGuest};
use popek_hw::Hw;
use popek_machine::{ClockMode, Machine, MachineConfig};
use popek_memory::GuestRam;

fn out_loop() -> TestGuest {
    guests::long64(&|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.out(0x80, al)?;
        a.jmp(top)
    })
}

fn can_run() -> bool {
    if !popek_hw::kvm_available() {
        eprintln!("exit_roundtrip: skipped: /dev/kvm is absent");
        return false;
    }
    if let Err(why) = popek_hw::probe().can_run(popek_hw::probe::GuestMode::Long64) {
        eprintln!("exit_roundtrip: skipped: {why}");
        return false;
    }
    true
}

struct PopekVm {
    hw: Hw,
    machine: Machine,
}

fn popek_vm(ram_size: u64) -> PopekVm {
    let ram = Arc::new(GuestRam::new(ram_size).unwrap());
    let machine = Machine::new(
        MachineConfig {
            clock: ClockMode::Host,
            ..Default::default()
        },
        ram.clone(),
        Box::new(std::io::sink()),
    )
    .unwrap();
    let g = out_loop();
    g.load(&ram).unwrap();
    let mut hw = Hw::new(&machine).unwrap();
    hw.set_state(g.state.clone()).unwrap();
    PopekVm { hw, machine }
}

/// Runs `n` port-I/O exits under popek; returns the time for exactly `n`
/// (scaled from whole slices).
fn popek_exits(vm: &mut PopekVm, n: u64) -> Duration {
    let (all, _, done) = popek_exits_raw(vm, n);
    all.mul_f64(n as f64 / done as f64)
}

/// Runs at least `n` exits (whole slices); returns the elapsed time, the
/// time spent inside KVM_RUN and the number of exits actually done.
fn popek_exits_raw(vm: &mut PopekVm, n: u64) -> (Duration, Duration, u64) {
    let start_io = vm.hw.hw_stats().io;
    let start_guest = vm.hw.instructions();
    let t = Instant::now();
    while vm.hw.hw_stats().io - start_io < n {
        vm.hw.run(&mut vm.machine, 20_000).unwrap();
    }
    (
        t.elapsed(),
        Duration::from_nanos(vm.hw.instructions() - start_guest),
        vm.hw.hw_stats().io - start_io,
    )
}

struct RawVm {
    vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    _ram: Arc<GuestRam>,
}

fn raw_vm() -> RawVm {
    let ram = Arc::new(GuestRam::new(guests::MIN_RAM).unwrap());
    let g = out_loop();
    g.load(&ram).unwrap();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    // SAFETY: the region is the whole RAM mapping, kept alive in RawVm
    // alongside the VM.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.host_ptr() as u64,
        })
        .unwrap()
    };
    let vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid2(
        &kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap(),
    )
    .unwrap();
    let base = vcpu.get_sregs().unwrap();
    vcpu.set_sregs(&popek_hw::regs::sregs_to_kvm(&g.state, &base))
        .unwrap();
    vcpu.set_regs(&popek_hw::regs::regs_to_kvm(&g.state))
        .unwrap();
    RawVm {
        vcpu,
        _vm: vm,
        _ram: ram,
    }
}

fn raw_exits(vm: &mut RawVm, n: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        match vm.vcpu.run().unwrap() {
            VcpuExit::IoOut(..) => {}
            e => panic!("unexpected exit {e:?}"),
        }
    }
    t.elapsed()
}

fn exit_roundtrip(c: &mut Criterion) {
    if !can_run() {
        return;
    }
    let mut popek = popek_vm(guests::MIN_RAM);
    let mut raw = raw_vm();
    let mut g = c.benchmark_group("port_io_exit");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("raw KVM_RUN", |b| b.iter_custom(|n| raw_exits(&mut raw, n)));
    g.bench_function("popek hw", |b| {
        b.iter_custom(|n| popek_exits(&mut popek, n))
    });
    g.finish();
    // The ratio, measured back to back in this run: rounds alternate
    // between the two loops (so host noise hits both alike); the median
    // of the per-round ratios is the figure.
    let n = 2000;
    let mut ratios = Vec::new();
    let (mut raw_total, mut popek_total) = (Duration::ZERO, Duration::ZERO);
    let (mut own_total, mut own_exits) = (Duration::ZERO, 0u64);
    for round in 0..30 {
        let mut popek_round = || {
            let (all, in_kvm, done) = popek_exits_raw(&mut popek, n);
            own_total += all.saturating_sub(in_kvm);
            own_exits += done;
            all.mul_f64(n as f64 / done as f64)
        };
        let (r, p) = if round % 2 == 0 {
            let r = raw_exits(&mut raw, n);
            (r, popek_round())
        } else {
            let p = popek_round();
            (raw_exits(&mut raw, n), p)
        };
        raw_total += r;
        popek_total += p;
        ratios.push(p.as_secs_f64() / r.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    eprintln!(
        "port_io_exit: raw {:.2} µs, popek {:.2} µs per exit; median ratio popek/raw {:.3} (goal <= 1.05), quartiles {:.3}..{:.3}; popek's own time outside KVM_RUN {:.0} ns per exit",
        raw_total.as_secs_f64() * 1e6 / (30.0 * n as f64),
        popek_total.as_secs_f64() * 1e6 / (30.0 * n as f64),
        ratios[ratios.len() / 2],
        ratios[ratios.len() / 4],
        ratios[3 * ratios.len() / 4],
        own_total.as_secs_f64() * 1e9 / own_exits as f64
    );
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Guest RAM pages that are resident (touched), from mincore(2).
fn touched(ram: &GuestRam) -> u64 {
    let pages = (ram.size() / 4096) as usize;
    let mut v = vec![0u8; pages];
    // SAFETY: the range is the RAM mapping; `v` has one byte per page.
    let r = unsafe { libc::mincore(ram.host_ptr().cast(), ram.size() as usize, v.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    v.iter().filter(|b| **b & 1 != 0).count() as u64 * 4096
}

fn memory_overhead(_c: &mut Criterion) {
    if !can_run() {
        return;
    }
    const N: usize = 16;
    // One VM first, so that one-time costs (the KVM module's first VM,
    // libraries, the probe) are not counted per VM.
    let mut first = popek_vm(16 << 20);
    popek_exits(&mut first, 100);
    let before = rss_bytes();
    let mut vms = Vec::new();
    for _ in 0..N {
        let mut vm = popek_vm(16 << 20);
        popek_exits(&mut vm, 100);
        vms.push(vm);
    }
    let after = rss_bytes();
    let ram_touched: u64 = vms.iter().map(|v| touched(v.machine.ram())).sum();
    let per_vm = (after.saturating_sub(before)).saturating_sub(ram_touched) as f64 / N as f64;
    eprintln!(
        "memory_overhead: {N} hw VMs: RSS +{:.1} MiB, guest RAM touched {:.1} MiB, popek overhead {:.0} KiB per VM (goal <= 3 MiB)",
        (after - before) as f64 / (1 << 20) as f64,
        ram_touched as f64 / (1 << 20) as f64,
        per_vm / 1024.0
    );
}

criterion_group!(benches, exit_roundtrip, memory_overhead);
criterion_main!(benches);
