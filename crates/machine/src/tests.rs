//! Machine-level tests: devices reached through the port bus, interrupts
//! through the PIC, time through the virtual clock.

use super::*;
use std::sync::Mutex;

#[derive(Clone, Default)]
struct SharedSink(Arc<Mutex<Vec<u8>>>);

impl Write for SharedSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn machine_with(clock: ClockMode, ram: u64) -> (Machine, SharedSink) {
    let sink = SharedSink::default();
    let ram = Arc::new(GuestRam::new(ram).unwrap());
    let m = Machine::new(
        MachineConfig {
            clock,
            ..Default::default()
        },
        ram,
        Box::new(sink.clone()),
    )
    .unwrap();
    (m, sink)
}

fn machine() -> (Machine, SharedSink) {
    machine_with(ClockMode::Virtual, 16 << 20)
}

/// Programs the PICs like Linux: vectors 0x30 / 0x38, everything unmasked.
fn init_pics(m: &mut Machine) {
    for (cmd, base, icw3) in [(0x20u16, 0x30u32, 4u32), (0xa0, 0x38, 2)] {
        m.io_out(cmd, 1, 0x11);
        m.io_out(cmd + 1, 1, base);
        m.io_out(cmd + 1, 1, icw3);
        m.io_out(cmd + 1, 1, 0x01);
        m.io_out(cmd + 1, 1, 0x00);
    }
}

#[test]
fn tiny_ram_is_refused() {
    let ram = Arc::new(GuestRam::new(512 << 10).unwrap());
    let r = Machine::new(MachineConfig::default(), ram, Box::new(std::io::sink()));
    assert!(matches!(r, Err(MachineError::RamSize { .. })));
}

#[test]
fn unclaimed_ports_read_all_ones_and_ignore_writes() {
    let (mut m, _) = machine();
    assert_eq!(m.io_in(0x80, 1), 0xff);
    m.io_out(0x80, 1, 0x12);
    assert_eq!(m.io_in(0x80, 1), 0xff);
    assert_eq!(m.io_in(0x1234, 2), 0xffff);
    assert_eq!(m.io_in(0x2f8, 4), 0xffff_ffff);
    assert_eq!(m.io_in(0xffff, 4), 0xffff_ffff); // wraps harmlessly
    assert_eq!(m.io_in(0x80, 0), 0xff); // odd sizes are clamped
    assert!(!m.stop_pending());
    assert!(!m.interrupt_pending());
}

#[test]
fn mmio_unmapped_is_all_ones_and_devices_can_be_added() {
    struct Reg(u64);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let b = self.0.to_le_bytes();
            let o = offset as usize;
            data.copy_from_slice(&b[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let mut b = self.0.to_le_bytes();
            let o = offset as usize;
            b[o..o + data.len()].copy_from_slice(data);
            self.0 = u64::from_le_bytes(b);
        }
    }
    let (mut m, _) = machine();
    assert_eq!(m.mmio_read(0xd000_0000, 4), 0xffff_ffff);
    assert_eq!(m.mmio_read(0xd000_0000, 8), u64::MAX);
    m.mmio_write(0xd000_0000, 4, 1);
    m.add_mmio_device(0xd000_0000, 8, Box::new(Reg(0))).unwrap();
    assert!(m.add_mmio_device(0xd000_0004, 8, Box::new(Reg(0))).is_err());
    m.mmio_write(0xd000_0000, 8, 0x1122_3344_5566_7788);
    assert_eq!(m.mmio_read(0xd000_0004, 2), 0x3344);
}

#[test]
fn debug_exit_reports_the_value() {
    let (mut m, _) = machine();
    m.io_out(0xf4, 1, 0x10);
    assert!(m.stop_pending());
    assert_eq!(m.take_stop(), Some(StopReason::DebugExit(0x10)));
    assert!(!m.stop_pending());
    m.io_out(0xf4, 4, 0x0000_0003);
    assert_eq!(m.take_stop(), Some(StopReason::DebugExit(3)));
    m.io_out(0xf4, 2, 0x0101);
    assert_eq!(m.take_stop(), Some(StopReason::DebugExit(1)));
}

#[test]
fn i8042_reset_stops_with_reset() {
    let (mut m, _) = machine();
    assert_eq!(m.io_in(0x64, 1) & 0x02, 0);
    m.io_out(0x64, 1, 0xfe);
    assert_eq!(m.take_stop(), Some(StopReason::Reset));
}

#[test]
fn first_stop_wins() {
    let (mut m, _) = machine();
    m.io_out(0x64, 1, 0xfe);
    m.io_out(0xf4, 1, 7);
    assert_eq!(m.take_stop(), Some(StopReason::Reset));
    assert_eq!(m.take_stop(), None);
}

#[test]
fn acpi_s5_powers_off() {
    let (mut m, _) = machine();
    m.io_out(0x604, 2, 5 << 10); // SLP_TYP alone does nothing
    assert!(!m.stop_pending());
    m.io_out(0x604, 2, 5 << 10 | 1 << 13);
    assert_eq!(m.take_stop(), Some(StopReason::PowerOff));
    assert_eq!(m.io_in(0x604, 2) & 0x2001, 1); // SCI_EN set, SLP_EN reads 0
}

#[test]
fn pm_timer_runs_at_3_58_mhz() {
    let (mut m, _) = machine();
    let t0 = m.io_in(0x608, 4);
    let ns0 = m.tsc(0);
    m.advance(1_000_000_000);
    let t1 = m.io_in(0x608, 4);
    let ns1 = m.tsc(0);
    let ticks = |ns: u64| ns * acpi::PM_TIMER_HZ / 1_000_000_000;
    assert_eq!(
        u64::from(t1.wrapping_sub(t0) & 0xff_ffff),
        ticks(ns1) - ticks(ns0)
    );
    assert!((3_579_545..3_579_560).contains(&(ticks(ns1) - ticks(ns0))));
}

#[test]
fn port_accesses_cost_virtual_time() {
    let (mut m, _) = machine();
    // Linux's PM-timer sanity check reads it back to back and wants it to move.
    let a = m.io_in(0x608, 4);
    let b = m.io_in(0x608, 4);
    assert!(b > a, "{a} {b}");
    assert_eq!(m.tsc(0), 2 * IO_ACCESS_NS);
    // Deterministic: the same accesses give the same time.
    let (mut m2, _) = machine();
    m2.io_in(0x80, 1);
    m2.io_out(0x80, 1, 0);
    assert_eq!(m2.tsc(0), m.tsc(0));
}

#[test]
fn uart_output_and_rx_interrupt_through_the_pic() {
    let (mut m, sink) = machine();
    init_pics(&mut m);
    for &b in b"popek\n" {
        m.io_out(0x3f8, 1, u32::from(b));
    }
    assert_eq!(&*sink.0.lock().unwrap(), b"popek\n");
    // Enable RX interrupts the way Linux does: OUT2 in MCR, RDA in IER.
    m.io_out(0x3fc, 1, 0x0b);
    m.io_out(0x3f9, 1, 0x01);
    assert!(!m.interrupt_pending());
    m.serial_input(b"x");
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x34);
    assert!(!m.interrupt_pending());
    assert_eq!(m.io_in(0x3fa, 1) & 0x0f, 0x04); // IIR: received data
    assert_eq!(m.io_in(0x3fd, 1) & 1, 1);
    assert_eq!(m.io_in(0x3f8, 1), u32::from(b'x'));
    m.io_out(0x20, 1, 0x20); // EOI
    assert!(!m.interrupt_pending());
    // The line went low, so the next byte makes a new edge.
    m.serial_input(b"y");
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x34);
}

#[test]
fn pit_irq0_rate_with_the_virtual_clock() {
    let (mut m, _) = machine();
    init_pics(&mut m);
    // Linux's periodic tick: counter 0, mode 2, LATCH = 1193 (1000 Hz).
    m.io_out(0x43, 1, 0x34);
    m.io_out(0x40, 1, 1193 & 0xff);
    m.io_out(0x40, 1, 1193 >> 8);
    let mut ticks = 0;
    let mut insns = 0;
    // One second of guest time in 50 µs budgets.
    while insns < 1_000_000_000 {
        insns += 50_000;
        m.advance(insns);
        while m.interrupt_pending() {
            assert_eq!(m.acknowledge_interrupt(), 0x30);
            m.io_out(0x20, 1, 0x20);
            ticks += 1;
        }
    }
    assert!((999..=1001).contains(&ticks), "{ticks} ticks");
}

#[test]
fn reprogramming_the_pit_keeps_an_expired_one_shot() {
    let (mut m, _) = machine();
    init_pics(&mut m);
    // Linux one-shot: mode 4, 100 ticks.
    m.io_out(0x43, 1, 0x38);
    m.io_out(0x40, 1, 100);
    m.io_out(0x40, 1, 0);
    // The CPU runs past the expiry and reprograms before the machine is
    // advanced (all within one budget).
    m.clock.instructions = 200_000;
    m.io_out(0x40, 1, 100);
    m.io_out(0x40, 1, 0);
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x30);
}

#[test]
fn halted_guest_warps_to_the_next_timer() {
    let (mut m, _) = machine();
    init_pics(&mut m);
    assert_eq!(m.time_to_next_event(0), None);
    assert!(!m.warp_to_next_event(0));
    // 10 ms one-shot in mode 0.
    m.io_out(0x43, 1, 0x30);
    m.io_out(0x40, 1, 11932 & 0xff);
    m.io_out(0x40, 1, 11932 >> 8);
    let d = m.time_to_next_event(1000).unwrap();
    assert!(
        d > Duration::from_micros(9_990) && d < Duration::from_micros(10_001),
        "{d:?}"
    );
    assert!(m.warp_to_next_event(1000));
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x30);
    // Time really moved: the TSC includes the skipped idle time.
    assert!(m.tsc(1000) >= 10_000_000);
    assert_eq!(m.time_to_next_event(1000), None);
}

#[test]
fn host_clock_moves_by_itself() {
    let (mut m, _) = machine_with(ClockMode::Host, 16 << 20);
    let a = m.tsc(0);
    std::thread::sleep(Duration::from_millis(2));
    let b = m.tsc(0);
    assert!(b - a >= 2_000_000);
    assert!(!m.warp_to_next_event(0));
    // The RTC shows the host's year.
    m.io_out(0x70, 1, 0x0b);
    m.io_out(0x71, 1, 0x06); // binary, 24 h
    m.io_out(0x70, 1, 0x32);
    let century = m.io_in(0x71, 1);
    assert!(century >= 20);
}

#[test]
fn rtc_through_ports_with_the_virtual_epoch() {
    let (mut m, _) = machine();
    let rd = |m: &mut Machine, r: u32| {
        m.io_out(0x70, 1, r);
        m.io_in(0x71, 1)
    };
    assert_eq!(rd(&mut m, 0x09), 0x25); // 2025, BCD
    assert_eq!(rd(&mut m, 0x08), 0x01);
    assert_eq!(rd(&mut m, 0x07), 0x01);
    assert_eq!(rd(&mut m, 0x00), 0x00);
    m.advance(61_000_000_000);
    assert_eq!(rd(&mut m, 0x02), 0x01);
    assert_eq!(rd(&mut m, 0x00), 0x01);
    // Extended memory size from RAM: 15 MiB above 1 MiB.
    let ext = rd(&mut m, 0x17) | rd(&mut m, 0x18) << 8;
    assert_eq!(ext, 15 * 1024);
}

#[test]
fn rtc_periodic_interrupt_reaches_irq8() {
    let (mut m, _) = machine();
    init_pics(&mut m);
    m.io_out(0x70, 1, 0x0b);
    m.io_out(0x71, 1, 0x42); // PIE, 24 h
    m.advance(2_000_000); // > 1/1024 s
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x38);
    m.io_out(0x70, 1, 0x0c);
    assert_eq!(m.io_in(0x71, 1) & 0xc0, 0xc0);
    m.io_out(0xa0, 1, 0x20);
    m.io_out(0x20, 1, 0x20);
    assert!(!m.interrupt_pending());
}

#[test]
fn pit_channel2_calibration_through_port_61() {
    let (mut m, _) = machine();
    // Linux pit_calibrate_tsc(): gate on, speaker off, mode 0, 30 ms.
    let v = m.io_in(0x61, 1);
    m.io_out(0x61, 1, (v & !0x02) | 0x01);
    m.io_out(0x43, 1, 0xb0);
    let latch = 1_193_182 / 33;
    m.io_out(0x42, 1, latch & 0xff);
    m.io_out(0x42, 1, latch >> 8);
    let start = m.tsc(0);
    let mut insns = 0u64;
    while m.io_in(0x61, 1) & 0x20 == 0 {
        insns += 1000;
        m.advance(insns);
        assert!(insns < 1_000_000_000);
    }
    // 1/33 s of machine time (instructions plus port accesses), within
    // one polling step and one PIT tick (838 ns) of quantisation.
    let expect = pit::ticks_to_ns(u64::from(latch));
    let t = m.tsc(insns) - start;
    assert!(t.abs_diff(expect) <= 2000 + IO_ACCESS_NS, "{t} vs {expect}");
}

/// Scans like a kernel: 16-byte boundaries in 0xE0000–0xFFFFF.
fn find_rsdp(ram: &GuestRam) -> Option<u64> {
    (0xe0000u64..0x100000).step_by(16).find(|&a| {
        let mut sig = [0u8; 8];
        ram.read(a, &mut sig).is_ok() && &sig == b"RSD PTR "
    })
}

fn table(ram: &GuestRam, addr: u64) -> Vec<u8> {
    let len = ram.read_u32(addr + 4).unwrap() as usize;
    let mut t = vec![0u8; len];
    ram.read(addr, &mut t).unwrap();
    t
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

#[test]
fn acpi_tables_are_findable_and_valid_in_ram() {
    let (m, _) = machine();
    let ram = m.ram();
    let rsdp_addr = find_rsdp(ram).unwrap();
    assert_eq!(rsdp_addr, m.rsdp_address());
    let mut rsdp = [0u8; 36];
    ram.read(rsdp_addr, &mut rsdp).unwrap();
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(&rsdp), 0);
    assert_eq!(rsdp[15], 2);
    // RSDT -> FADT -> DSDT.
    let rsdt_addr = u64::from(u32::from_le_bytes(rsdp[16..20].try_into().unwrap()));
    let rsdt = table(ram, rsdt_addr);
    assert_eq!(&rsdt[..4], b"RSDT");
    assert_eq!(sum(&rsdt), 0);
    let fadt_addr = u64::from(u32::from_le_bytes(rsdt[36..40].try_into().unwrap()));
    // XSDT -> the same FADT.
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let xsdt = table(ram, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(sum(&xsdt), 0);
    assert_eq!(
        u64::from_le_bytes(xsdt[36..44].try_into().unwrap()),
        fadt_addr
    );
    let fadt = table(ram, fadt_addr);
    assert_eq!(&fadt[..4], b"FACP");
    assert_eq!(sum(&fadt), 0);
    let facs_addr = u64::from(u32::from_le_bytes(fadt[36..40].try_into().unwrap()));
    assert_eq!(&table(ram, facs_addr)[..4], b"FACS");
    let dsdt_addr = u64::from(u32::from_le_bytes(fadt[40..44].try_into().unwrap()));
    let dsdt = table(ram, dsdt_addr);
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(sum(&dsdt), 0);
    assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    // All of it sits in the BIOS area (reserved in e820).
    for a in [rsdt_addr, xsdt_addr, fadt_addr, facs_addr, dsdt_addr] {
        assert!((0xe0000..0x100000).contains(&a));
    }
}

#[test]
fn bios_data_area_is_filled() {
    let (m, _) = machine();
    assert_eq!(m.ram().read_u16(0x400).unwrap(), 0x3f8);
    assert_eq!(m.ram().read_u16(0x40e).unwrap(), 0x9fc0);
    assert_eq!(m.ram().read_u16(0x413).unwrap(), 639);
}

#[test]
fn spurious_interrupt_without_request() {
    let (mut m, _) = machine();
    init_pics(&mut m);
    assert_eq!(m.acknowledge_interrupt(), 0x37);
}

#[test]
fn machine_is_send() {
    fn is_send<T: Send>() {}
    is_send::<Machine>();
}

/// A guest hammering every device port with random accesses must never
/// panic the machine.
#[test]
fn random_port_traffic_never_panics() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ports: &[u16] = &[
        0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x60, 0x64, 0x70, 0x71,
        0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x600, 0x602, 0x604, 0x606, 0x608,
        0x60a, 0x60b, 0x80, 0xffff,
    ];
    for clock in [ClockMode::Virtual, ClockMode::Host] {
        let (mut m, _) = machine_with(clock, 2 << 20);
        let mut insns = 0u64;
        for _ in 0..200_000 {
            let r = next();
            let port = ports[(r % ports.len() as u64) as usize];
            let size = [1u8, 2, 4][((r >> 8) % 3) as usize];
            let value = (r >> 16) as u32;
            match (r >> 60) & 3 {
                0 => m.io_out(port, size, value),
                1 => {
                    m.io_in(port, size);
                }
                2 => {
                    insns += (r >> 40) & 0xfffff;
                    m.advance(insns);
                    let _ = m.time_to_next_event(insns);
                    m.warp_to_next_event(insns);
                }
                _ => {
                    if m.interrupt_pending() {
                        m.acknowledge_interrupt();
                    }
                    m.serial_input(&value.to_le_bytes());
                }
            }
            m.take_stop();
        }
    }
}

/// A machine with every device in a non-reset state: PICs programmed, the
/// PIT running, an RTC index chosen, COM1 with input queued, a keyboard
/// command answered, time advanced.
fn busy_machine() -> (Machine, SharedSink) {
    let (mut m, sink) = machine();
    init_pics(&mut m);
    m.io_out(0x43, 1, 0x34); // counter 0, mode 2
    m.io_out(0x40, 1, 0x9c);
    m.io_out(0x40, 1, 0x2e);
    m.advance(5_000_000);
    m.io_out(0x70, 1, 0x0b);
    m.io_out(0x3fc, 1, 0x08); // MCR OUT2
    m.io_out(0x3f9, 1, 0x01); // IER RDA
    m.serial_input(&[b'x'; 100]);
    m.io_out(0x64, 1, 0x20); // read the command byte
    m.advance(7_000_000);
    (m, sink)
}

#[test]
fn a_saved_machine_restores_to_the_same_state_and_behaviour() {
    let (mut a, _) = busy_machine();
    let saved = a.save_state().unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let back: MachineState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved, "the state survives serialization");
    let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
    let sink = SharedSink::default();
    let mut b = Machine::restored(
        MachineConfig {
            clock: ClockMode::Virtual,
            ..Default::default()
        },
        ram,
        Box::new(sink.clone()),
        back,
    )
    .unwrap();
    assert_eq!(b.save_state().unwrap(), saved);
    // Both go on identically: timer edges, input, the keyboard's reply.
    for step in 1..20u64 {
        let t = 7_000_000 + step * 700_000;
        a.advance(t);
        b.advance(t);
        assert_eq!(a.interrupt_pending(), b.interrupt_pending(), "step {step}");
        if a.interrupt_pending() {
            assert_eq!(a.acknowledge_interrupt(), b.acknowledge_interrupt());
            a.io_out(0x20, 1, 0x20);
            b.io_out(0x20, 1, 0x20);
        }
        assert_eq!(a.io_in(0x3f8, 1), b.io_in(0x3f8, 1));
        assert_eq!(a.io_in(0x40, 1), b.io_in(0x40, 1));
    }
    assert_eq!(a.io_in(0x60, 1), b.io_in(0x60, 1));
    assert_eq!(a.serial_input_pending(), b.serial_input_pending());
    // Output goes to the new machine's console.
    b.io_out(0x3f8, 1, u32::from(b'!'));
    assert_eq!(&*sink.0.lock().unwrap(), b"!");
}

#[test]
fn a_bad_device_state_is_refused_and_changes_nothing() {
    let (mut m, _) = busy_machine();
    let good = m.save_state().unwrap();
    let json = serde_json::to_value(&good).unwrap();
    let cases: [(&str, serde_json::Value); 5] = [
        ("/pit/counters/0/reload", 0.into()),
        ("/pit/counters/1/mode", 9.into()),
        ("/rtc/index", 200.into()),
        ("/pic/chips/0/priority_add", 255.into()),
        ("/uart/fifo", serde_json::Value::Array(vec![0.into(); 65])),
    ];
    for (ptr, v) in cases {
        let mut bad = json.clone();
        *bad.pointer_mut(ptr).unwrap() = v;
        let bad: MachineState = serde_json::from_value(bad).unwrap();
        let err = m.restore_state(bad).unwrap_err();
        assert!(!err.why.is_empty(), "{ptr}");
        assert_eq!(m.save_state().unwrap(), good, "{ptr}: nothing changed");
    }
}

#[test]
fn pci_configuration_mechanism_one_is_on_the_port_bus() {
    let (mut m, _) = machine();
    m.io_out(0xcf8, 4, 0x8000_0000);
    assert_eq!(m.io_in(0xcf8, 4), 0x8000_0000);
    assert_eq!(
        m.io_in(0xcfc, 4),
        0x1237_8086,
        "the 440FX host bridge at 00:00.0"
    );
    assert_eq!(m.io_in(0xcfe, 2), 0x1237);
    m.io_out(0xcf8, 4, 0x8000_0800); // device 1: nothing there
    assert_eq!(m.io_in(0xcfc, 4), 0xffff_ffff);
    // The state is saved with the machine.
    m.io_out(0xcf8, 4, 0x8000_0004);
    let saved = m.save_state().unwrap();
    let (mut n, _) = machine();
    n.restore_state(saved).unwrap();
    assert_eq!(n.io_in(0xcf8, 4), 0x8000_0004);
    // 0xCF9 resets.
    assert!(!m.stop_pending());
    m.io_out(0xcf9, 1, 0x06);
    assert_eq!(m.take_stop(), Some(StopReason::Reset));
}

#[test]
fn acknowledged_interrupts_are_counted_by_vector() {
    let (mut m, _) = machine();
    init_pics(&mut m);
    m.io_out(0x43, 1, 0x34);
    m.io_out(0x40, 1, 0x9c);
    m.io_out(0x40, 1, 0x2e);
    for t in 1..=3u64 {
        m.advance(t * 10_000_000);
        assert!(m.interrupt_pending());
        assert_eq!(m.acknowledge_interrupt(), 0x30);
        m.io_out(0x20, 1, 0x20);
    }
    assert_eq!(m.interrupt_counts(), vec![(0x30, 3)]);
    let ports = m.port_map();
    assert!(ports.contains(&("com1", 0x3f8, 8)));
    assert!(ports.windows(2).all(|w| w[0].1 < w[1].1), "in port order");
}

fn apic_write(m: &mut Machine, reg: u64, v: u32) {
    m.mmio_write(lapic::DEFAULT_BASE + reg, 4, u64::from(v));
}

fn ioapic_write(m: &mut Machine, index: u32, v: u32) {
    m.mmio_write(ioapic::BASE, 4, u64::from(index));
    m.mmio_write(ioapic::BASE + 0x10, 4, u64::from(v));
}

/// Linux's symmetric I/O mode: the 8259s masked, LINT0 masked, the APIC
/// software-enabled, ISA lines through the I/O APIC.
fn symmetric_io(m: &mut Machine) {
    init_pics(m);
    m.io_out(0x21, 1, 0xff);
    m.io_out(0xa1, 1, 0xff);
    apic_write(m, 0xf0, 0x1ff);
    apic_write(m, 0x350, 0x1_0700);
}

#[test]
fn the_pit_reaches_the_local_apic_through_ioapic_pin_2() {
    let (mut m, _) = machine();
    // Through the 8259 and LINT0 (ExtINT) after reset.
    init_pics(&mut m);
    m.io_out(0x43, 1, 0x34);
    m.io_out(0x40, 1, 0xa9);
    m.io_out(0x40, 1, 0x04); // 1193: 1 ms
    m.advance(1_100_000);
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x30);
    m.io_out(0x20, 1, 0x20);
    // Symmetric I/O: pin 2 to vector 0x61.
    symmetric_io(&mut m);
    ioapic_write(&mut m, 0x14, 0x61);
    ioapic_write(&mut m, 0x15, 0);
    m.advance(2_100_000);
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x61);
    assert!(!m.interrupt_pending());
    // In service until EOI: the next tick's 0x61 waits in IRR.
    m.advance(3_100_000);
    assert!(!m.interrupt_pending(), "same class as the one in service");
    apic_write(&mut m, 0xb0, 0);
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x61);
    assert_eq!(m.interrupt_counts(), vec![(0x30, 1), (0x61, 2)]);
}

#[test]
fn a_level_triggered_line_is_resent_after_the_eoi_while_asserted() {
    let (mut m, _) = machine();
    symmetric_io(&mut m);
    // COM1 (IRQ 4) level-triggered to vector 0x44.
    ioapic_write(&mut m, 0x18, 0x44 | (1 << 15));
    ioapic_write(&mut m, 0x19, 0);
    m.io_out(0x3f9, 1, 0x01); // receive-data interrupt
    m.serial_input(b"ab");
    assert_eq!(m.acknowledge_interrupt(), 0x44);
    // The line stays up (data pending): after the EOI it comes again.
    apic_write(&mut m, 0xb0, 0);
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x44);
    // Reading the data drops the line: the EOI then brings nothing.
    m.io_in(0x3f8, 1);
    m.io_in(0x3f8, 1);
    apic_write(&mut m, 0xb0, 0);
    assert!(!m.interrupt_pending());
}

#[test]
fn the_apic_timer_is_saved_with_the_machine() {
    let (mut a, _) = machine();
    symmetric_io(&mut a);
    apic_write(&mut a, 0x3e0, 0xb);
    apic_write(&mut a, 0x320, 0x2_0050); // periodic, vector 0x50
    apic_write(&mut a, 0x380, 250_000);
    a.advance(100_000);
    let saved = a.save_state().unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let (mut b, _) = machine();
    b.restore_state(serde_json::from_str(&json).unwrap())
        .unwrap();
    for t in (200_000..2_000_000).step_by(50_000) {
        a.advance(t);
        b.advance(t);
        assert_eq!(a.interrupt_pending(), b.interrupt_pending(), "{t}");
        assert_eq!(
            a.instructions_to_next_event(t),
            b.instructions_to_next_event(t)
        );
        if a.interrupt_pending() {
            assert_eq!(a.acknowledge_interrupt(), 0x50);
            assert_eq!(b.acknowledge_interrupt(), 0x50);
            apic_write(&mut a, 0xb0, 0);
            apic_write(&mut b, 0xb0, 0);
        }
    }
    assert_eq!(a.interrupt_counts(), vec![(0x50, 7)]);
    // Bad APIC states are refused and change nothing.
    let good = a.save_state().unwrap();
    let json = serde_json::to_value(&good).unwrap();
    for (ptr, v) in [
        ("/lapics/0/base", serde_json::Value::from(0xfee0_0401u64)),
        ("/lapics/0/timer/divide", 0xff.into()),
        (
            "/ioapic/redirect",
            serde_json::Value::Array(vec![0.into(); 3]),
        ),
        ("/lapics", serde_json::Value::Array(vec![])),
    ] {
        let mut bad = json.clone();
        *bad.pointer_mut(ptr).unwrap() = v;
        let bad: MachineState = serde_json::from_value(bad).unwrap();
        assert!(a.restore_state(bad).is_err(), "{ptr}");
        assert_eq!(a.save_state().unwrap(), good, "{ptr}: nothing changed");
    }
}

#[test]
fn apic_msrs_relocate_and_disable_the_apic() {
    let (mut m, _) = machine();
    assert_eq!(m.read_msr(0, 0x1b), Some(Ok(0xfee0_0900)));
    assert_eq!(m.read_msr(0, 0x10), None, "not a platform MSR");
    assert!(m.read_msr(0, 0x802).unwrap().is_err(), "xAPIC mode");
    // Relocated: the old page is unassigned, the new one answers.
    assert_eq!(m.write_msr(0, 0x1b, 0x8000_0900), Some(Ok(())));
    assert_eq!(m.mmio_read(0xfee0_0030, 4), 0xffff_ffff);
    assert_eq!(m.mmio_read(0x8000_0030, 4), 0x5_0014);
    // Globally disabled: the 8259 reaches the CPU directly.
    assert_eq!(m.write_msr(0, 0x1b, 0x8000_0100), Some(Ok(())));
    init_pics(&mut m);
    m.serial_input(b"x");
    m.io_out(0x3f9, 1, 0x01);
    assert!(m.interrupt_pending());
    // x2APIC needs the enable bit.
    assert!(m.write_msr(0, 0x1b, 0xfee0_0500).unwrap().is_err());
}

/// A machine with two vCPUs on the virtual clock.
fn two_vcpu_machine() -> Machine {
    let ram = Arc::new(GuestRam::new(16 << 20).unwrap());
    Machine::new(
        MachineConfig {
            clock: ClockMode::Virtual,
            cpus: 2,
        },
        ram,
        Box::new(std::io::sink()),
    )
    .unwrap()
}

#[test]
fn ipis_reach_the_other_vcpu_and_init_sipi_are_handed_to_the_vmm() {
    let mut m = two_vcpu_machine();
    assert_eq!(m.cpus(), 2);
    // The MADT lists both.
    let mut madt = [0u8; 0x62];
    m.ram().read(acpi::MADT_ADDR, &mut madt).unwrap();
    assert_eq!(&madt[..4], b"APIC");
    // Each vCPU sees its own APIC at the same address.
    m.set_current_cpu(1);
    assert_eq!(m.mmio_read(0xfee0_0020, 4), 1 << 24);
    assert_eq!(m.read_msr(1, 0x1b), Some(Ok(0xfee0_0800)), "not the BSP");
    apic_write(&mut m, 0xf0, 0x1ff);
    m.set_current_cpu(0);
    assert_eq!(m.mmio_read(0xfee0_0020, 4), 0);
    apic_write(&mut m, 0xf0, 0x1ff);
    // INIT and SIPI to APIC 1.
    apic_write(&mut m, 0x310, 1 << 24);
    apic_write(&mut m, 0x300, 0x4500);
    assert!(m.take_init(1));
    assert!(!m.take_init(0));
    apic_write(&mut m, 0x300, 0x4608);
    assert_eq!(m.take_sipi(1), Some(8));
    // A fixed IPI to APIC 1: pending for vCPU 1 only.
    apic_write(&mut m, 0x300, 0x4051);
    assert!(m.interrupt_pending_for(1));
    assert!(!m.interrupt_pending());
    m.set_current_cpu(1);
    assert!(m.interrupt_pending());
    assert_eq!(m.acknowledge_interrupt(), 0x51);
    // All including self, logical flat with LDRs: both get it.
    apic_write(&mut m, 0xb0, 0);
    apic_write(&mut m, 0x300, 0x8_4052);
    assert!(m.interrupt_pending_for(0) && m.interrupt_pending_for(1));
    assert_eq!(m.interrupt_counts_of(1), vec![(0x51, 1)]);
    // A snapshot holds both APICs; a one-vCPU machine refuses it.
    let saved = m.save_state().unwrap();
    assert_eq!(saved.lapics.len(), 2);
    let (mut one, _) = machine();
    assert!(one.restore_state(saved).is_err());
}

#[test]
fn published_lines_say_what_each_vcpu_waits_for_and_whose_rose() {
    use std::sync::atomic::{AtomicU8, Ordering};
    let mut m = two_vcpu_machine();
    let lines = [AtomicU8::new(0), AtomicU8::new(0)];
    for cpu in [1, 0] {
        m.set_current_cpu(cpu);
        apic_write(&mut m, 0xf0, 0x1ff);
    }
    // Reset: the BSP's LINT0 passes the (idle) 8259; nothing waits.
    assert_eq!(m.publish_lines(&lines), 0);
    // INIT to APIC 1: its start-up line rises.
    apic_write(&mut m, 0x310, 1 << 24);
    apic_write(&mut m, 0x300, 0x4500);
    assert_eq!(m.publish_lines(&lines), 0b10);
    assert_eq!(lines[1].load(Ordering::SeqCst), LINE_STARTUP);
    assert!(m.take_init(1));
    // A fixed IPI to vCPU 1 and an NMI to vCPU 0.
    apic_write(&mut m, 0x300, 0x4051);
    assert!(m.msi(0xfee0_0000, 0x0400));
    assert_eq!(m.publish_lines(&lines), 0b11);
    assert_eq!(lines[1].load(Ordering::SeqCst), LINE_INTR);
    assert_eq!(lines[0].load(Ordering::SeqCst), LINE_NMI);
    // Unchanged lines rise for nobody; taken ones fall.
    assert_eq!(m.publish_lines(&lines), 0);
    m.acknowledge_nmi();
    m.set_current_cpu(1);
    assert_eq!(m.acknowledge_interrupt(), 0x51);
    assert_eq!(m.publish_lines(&lines), 0);
    assert_eq!(lines.each_ref().map(|l| l.load(Ordering::SeqCst)), [0, 0]);
}

#[test]
fn msi_writes_reach_the_local_apics_they_name() {
    let mut m = two_vcpu_machine();
    for cpu in [1, 0] {
        m.set_current_cpu(cpu);
        apic_write(&mut m, 0xf0, 0x1ff);
        apic_write(&mut m, 0xd0, (1 << cpu) << 24); // flat logical ID
    }
    // Physical destination 1, fixed, vector 0x61, edge.
    assert!(m.msi(0xfee0_1000, 0x0061));
    assert!(m.interrupt_pending_for(1) && !m.interrupt_pending_for(0));
    // Logical destination 0b01 (vCPU 0), vector 0x62.
    assert!(m.msi(0xfee0_1004, 0x0062));
    assert!(m.interrupt_pending_for(0));
    assert_eq!(m.acknowledge_interrupt(), 0x62);
    // An NMI message.
    assert!(m.msi(0xfee0_0000, 0x0400));
    assert!(m.nmi_pending_for(0));
    // Not the interrupt window: nothing.
    assert!(!m.msi(0xfed0_0000, 0x0063));
}
