//! The 8254 programmable interval timer at ports 0x40–0x43, plus the
//! counter-2 gate and output bits of system control port B (0x61).
//!
//! The timer runs at [`PIT_HZ`] (1.193182 MHz). It is not ticked: each
//! counter remembers the PIT tick at which it started counting, and its
//! count and OUT level are computed from the current time on demand, so a
//! read is exact whatever the engine's budget. Counter 0's OUT drives
//! IRQ 0 (the [`Machine`](crate::Machine) pulses IRQ 0 for each rising
//! edge found by [`Pit::advance`]); counter 2's gate is port 0x61 bit 0 and
//! its OUT is port 0x61 bit 5, which Linux uses to calibrate the TSC.
//!
//! Modes 0 (interrupt on terminal count), 2 (rate generator), 3 (square
//! wave) and 4 (software strobe) are modelled exactly enough for Linux and
//! for tick-based kernels; modes 1 and 5 start on a gate rising edge (only
//! counter 2 has a controllable gate). Counter latch, read-back (count and
//! status) and LSB / MSB / LSB-then-MSB access are supported. Simplifications:
//! the BCD flag is stored and reported in the status but counting is always
//! binary; a new count written to a running mode-2/3 counter restarts it at
//! once instead of at the end of the current period; mode 3 with an odd
//! count reports an even-stepping count; rising edges that happen while
//! time jumps over several periods are coalesced into one IRQ request (as
//! the PIC itself would coalesce them).

/// Input clock of the 8254, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// First port of the PIT (counter 0); 0x43 is the mode/command register.
pub const PIT_BASE: u16 = 0x40;

/// System control port B: speaker gate (bit 0), speaker data (bit 1),
/// refresh toggle (bit 4), counter 2 OUT (bit 5).
pub const PORT_B: u16 = 0x61;

/// Converts nanoseconds to PIT ticks (rounded down).
pub fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

/// Converts PIT ticks to nanoseconds (rounded up, so that the tick has
/// happened at the returned time).
pub fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Counter {
    mode: u8,
    /// Access mode: 1 LSB, 2 MSB, 3 LSB then MSB.
    rw: u8,
    bcd: bool,
    /// Initial count, 1..=65536.
    reload: u64,
    /// Tick at which counting from `reload` began.
    start: Option<u64>,
    /// Tick at which the gate went low (modes 0/4 pause).
    paused_at: Option<u64>,
    /// Count shown while not counting.
    frozen: u16,
    /// OUT while not counting.
    idle_out: bool,
    gate: bool,
    null_count: bool,
    write_lsb: Option<u8>,
    read_msb_next: bool,
    latched: Option<u16>,
    latched_msb_next: bool,
    status: Option<u8>,
}

impl Counter {
    fn new(gate: bool) -> Self {
        Counter {
            mode: 0,
            rw: 3,
            bcd: false,
            reload: 65536,
            start: None,
            paused_at: None,
            frozen: 0,
            idle_out: false,
            gate,
            null_count: true,
            write_lsb: None,
            read_msb_next: false,
            latched: None,
            latched_msb_next: false,
            status: None,
        }
    }

    fn elapsed(&self, now: u64) -> Option<u64> {
        let s = self.start?;
        let t = self.paused_at.unwrap_or(now);
        Some(t.saturating_sub(s))
    }

    fn count(&self, now: u64) -> u16 {
        let Some(e) = self.elapsed(now) else {
            return self.frozen;
        };
        let n = self.reload;
        match self.mode {
            2 => (n - e % n) as u16,
            3 => {
                let phase = e % n;
                let half = n.div_ceil(2);
                let p = if phase < half { phase } else { phase - half };
                (n.saturating_sub(2 * p) & 0xfffe) as u16
            }
            // 0, 1, 4, 5: count down and wrap.
            _ => (n.wrapping_sub(e) & 0xffff) as u16,
        }
    }

    fn out(&self, now: u64) -> bool {
        let Some(e) = self.elapsed(now) else {
            return self.idle_out;
        };
        let n = self.reload;
        match self.mode {
            0 | 1 => e >= n,
            2 => n < 2 || e % n != n - 1,
            3 => e % n < n.div_ceil(2),
            _ => e != n, // 4, 5: one-tick low strobe
        }
    }

    /// Number of rising OUT edges in `(from, to]`.
    fn rising_edges(&self, from: u64, to: u64) -> u64 {
        let Some(s) = self.start else { return 0 };
        let to = self.paused_at.map_or(to, |p| p.min(to));
        if to <= s || to <= from {
            return 0;
        }
        let n = self.reload;
        let from = from.max(s);
        match self.mode {
            2 | 3 => (to - s) / n - (from - s) / n,
            m => {
                let edge = s + n + u64::from(m >= 4);
                u64::from(from < edge && edge <= to)
            }
        }
    }

    /// The next rising OUT edge strictly after `now`.
    fn next_edge(&self, now: u64) -> Option<u64> {
        let s = self.start?;
        if self.paused_at.is_some() {
            return None;
        }
        let n = self.reload;
        match self.mode {
            2 | 3 => Some(if now < s {
                s + n
            } else {
                s + ((now - s) / n + 1) * n
            }),
            m => {
                let edge = s + n + u64::from(m >= 4);
                (edge > now).then_some(edge)
            }
        }
    }

    fn stop(&mut self, now: u64, out: bool) {
        self.frozen = self.count(now);
        self.start = None;
        self.paused_at = None;
        self.idle_out = out;
    }

    fn set_control(&mut self, val: u8) {
        let mode = (val >> 1) & 7;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.rw = (val >> 4) & 3;
        self.bcd = val & 1 != 0;
        self.start = None;
        self.paused_at = None;
        self.idle_out = self.mode != 0;
        self.null_count = true;
        self.write_lsb = None;
        self.read_msb_next = false;
    }

    fn load(&mut self, value: u16, now: u64) {
        self.reload = if value == 0 { 65536 } else { u64::from(value) };
        self.null_count = false;
        self.frozen = value;
        match self.mode {
            0 | 4 => {
                self.idle_out = self.mode == 4;
                self.start = Some(now);
                self.paused_at = (!self.gate).then_some(now);
            }
            2 | 3 => {
                self.start = self.gate.then_some(now);
                self.paused_at = None;
                self.idle_out = true;
            }
            _ => {
                // 1, 5: wait for a gate trigger.
                self.start = None;
                self.idle_out = true;
            }
        }
    }

    fn write(&mut self, val: u8, now: u64) {
        match self.rw {
            1 => self.load(u16::from(val), now),
            2 => self.load(u16::from(val) << 8, now),
            _ => match self.write_lsb.take() {
                None => {
                    self.write_lsb = Some(val);
                    if self.mode == 0 {
                        // Writing the first byte stops a mode-0 count.
                        self.stop(now, false);
                    }
                }
                Some(lsb) => self.load(u16::from_le_bytes([lsb, val]), now),
            },
        }
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched.is_none() {
            self.latched = Some(self.count(now));
            self.latched_msb_next = false;
        }
    }

    fn latch_status(&mut self, now: u64) {
        if self.status.is_none() {
            self.status = Some(
                u8::from(self.out(now)) << 7
                    | u8::from(self.null_count) << 6
                    | self.rw << 4
                    | self.mode << 1
                    | u8::from(self.bcd),
            );
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        if let Some(v) = self.latched {
            let [lo, hi] = v.to_le_bytes();
            return match self.rw {
                1 => {
                    self.latched = None;
                    lo
                }
                2 => {
                    self.latched = None;
                    hi
                }
                _ if self.latched_msb_next => {
                    self.latched = None;
                    hi
                }
                _ => {
                    self.latched_msb_next = true;
                    lo
                }
            };
        }
        let [lo, hi] = self.count(now).to_le_bytes();
        match self.rw {
            1 => lo,
            2 => hi,
            _ => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    lo
                } else {
                    hi
                }
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        match self.mode {
            0 | 4 => {
                if self.start.is_some() {
                    if gate {
                        if let (Some(s), Some(p)) = (self.start, self.paused_at.take()) {
                            self.start = Some(s + now.saturating_sub(p));
                        }
                    } else {
                        self.paused_at = Some(now);
                    }
                }
            }
            2 | 3 => {
                if gate {
                    if !self.null_count {
                        self.start = Some(now);
                    }
                } else if self.start.is_some() {
                    self.stop(now, true);
                }
            }
            _ => {
                if gate && !self.null_count {
                    self.start = Some(now);
                }
            }
        }
    }
}

/// The 8254 with its three counters and port 0x61. Its saved state is
/// itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pit {
    counters: [Counter; 3],
    /// Port 0x61 bits 0–3 as written.
    port_b: u8,
    /// Tick up to which IRQ 0 edges were reported.
    irq_checked: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// A PIT as after reset: all counters idle in mode 0, counter 2 gate low.
    pub fn new() -> Self {
        Pit {
            counters: [Counter::new(true), Counter::new(true), Counter::new(false)],
            port_b: 0,
            irq_checked: 0,
        }
    }

    /// Reads port 0x40 + `offset` at PIT tick `now`.
    pub fn read(&mut self, offset: u16, now: u64) -> u8 {
        match offset {
            0..=2 => self.counters[usize::from(offset)].read(now),
            _ => 0xff, // the control register is write-only
        }
    }

    /// Writes port 0x40 + `offset` at PIT tick `now`.
    pub fn write(&mut self, offset: u16, val: u8, now: u64) {
        match offset {
            0..=2 => self.counters[usize::from(offset)].write(val, now),
            _ => {
                let sc = val >> 6;
                if sc == 3 {
                    // Read-back: bit 5 clear latches counts, bit 4 clear
                    // latches status, bits 1–3 select counters.
                    for (i, c) in self.counters.iter_mut().enumerate() {
                        if val & (2 << i) != 0 {
                            if val & 0x20 == 0 {
                                c.latch_count(now);
                            }
                            if val & 0x10 == 0 {
                                c.latch_status(now);
                            }
                        }
                    }
                } else {
                    let c = &mut self.counters[usize::from(sc)];
                    if val & 0x30 == 0 {
                        c.latch_count(now);
                    } else {
                        c.set_control(val);
                    }
                }
            }
        }
    }

    /// Reads port 0x61 at PIT tick `now` (and time `now_ns` for the
    /// refresh toggle, which flips every 15.085 µs).
    pub fn read_port_b(&self, now: u64, now_ns: u64) -> u8 {
        let refresh = (now_ns / 15_085) & 1 == 1;
        (self.port_b & 0x0f) | u8::from(refresh) << 4 | u8::from(self.counters[2].out(now)) << 5
    }

    /// Writes port 0x61 at PIT tick `now`: bit 0 is counter 2's gate.
    pub fn write_port_b(&mut self, val: u8, now: u64) {
        self.port_b = val & 0x0f;
        self.counters[2].set_gate(val & 1 != 0, now);
    }

    /// Current count of counter `i` (0–2), as a latch would read it.
    pub fn count(&self, i: usize, now: u64) -> u16 {
        self.counters[i % 3].count(now)
    }

    /// OUT level of counter `i` (0–2).
    pub fn out(&self, i: usize, now: u64) -> bool {
        self.counters[i % 3].out(now)
    }

    /// Moves time to `now` and returns true when counter 0's OUT had at
    /// least one rising edge since the last call (an IRQ 0 request).
    pub fn advance(&mut self, now: u64) -> bool {
        if now <= self.irq_checked {
            return false;
        }
        let edges = self.counters[0].rising_edges(self.irq_checked, now);
        self.irq_checked = now;
        edges > 0
    }

    /// The PIT tick of the next IRQ 0 request after `now`, if counter 0 is
    /// armed.
    pub fn next_irq(&self, now: u64) -> Option<u64> {
        self.counters[0].next_edge(now.max(self.irq_checked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_conversion_round_trips() {
        assert_eq!(ns_to_ticks(1_000_000_000), PIT_HZ);
        assert_eq!(ns_to_ticks(ticks_to_ns(12345)), 12345);
        assert_eq!(ticks_to_ns(PIT_HZ), 1_000_000_000);
    }

    #[test]
    fn mode2_rate_generator_counts_and_interrupts() {
        let mut pit = Pit::new();
        pit.write(3, 0x34, 0); // counter 0, lo/hi, mode 2
        pit.write(0, 100, 0);
        pit.write(0, 0, 10);
        assert_eq!(pit.count(0, 10), 100);
        assert_eq!(pit.count(0, 40), 70);
        assert!(pit.out(0, 40));
        assert!(!pit.out(0, 10 + 99));
        assert_eq!(pit.count(0, 110), 100); // reloaded
        assert!(!pit.advance(109));
        assert!(pit.advance(110));
        assert!(!pit.advance(150));
        assert_eq!(pit.next_irq(150), Some(210));
        // 10 periods elapse in one step: one (coalesced) request.
        assert!(pit.advance(1110));
        assert_eq!(pit.next_irq(1110), Some(1210));
    }

    #[test]
    fn mode3_square_wave() {
        let mut pit = Pit::new();
        pit.write(3, 0x36, 0); // counter 0, lo/hi, mode 3
        pit.write(0, 10, 0);
        pit.write(0, 0, 0);
        assert!(pit.out(0, 0));
        assert!(pit.out(0, 4));
        assert!(!pit.out(0, 5));
        assert!(!pit.out(0, 9));
        assert!(pit.out(0, 10));
        assert_eq!(pit.count(0, 1), 8);
        assert_eq!(pit.count(0, 6), 8);
        assert!(pit.advance(10));
        assert_eq!(pit.next_irq(10), Some(20));
    }

    #[test]
    fn mode0_one_shot_and_lsb_stop() {
        let mut pit = Pit::new();
        pit.write(3, 0x30, 0);
        assert!(!pit.out(0, 0));
        pit.write(0, 0x10, 5);
        pit.write(0, 0x00, 5); // count 16
        assert!(!pit.out(0, 20));
        assert!(pit.out(0, 21));
        assert_eq!(pit.count(0, 22), 0xffff); // wraps, keeps counting
        assert!(pit.advance(100));
        assert!(!pit.advance(1_000_000));
        assert_eq!(pit.next_irq(100), None);
    }

    #[test]
    fn mode4_strobe_fires_once() {
        let mut pit = Pit::new();
        pit.write(3, 0x38, 0);
        pit.write(0, 50, 0);
        pit.write(0, 0, 0);
        assert!(pit.out(0, 49));
        assert!(!pit.out(0, 50));
        assert!(pit.out(0, 51));
        assert_eq!(pit.next_irq(0), Some(51));
        assert!(pit.advance(51));
        assert_eq!(pit.next_irq(51), None);
    }

    #[test]
    fn latch_command_freezes_value() {
        let mut pit = Pit::new();
        pit.write(3, 0x34, 0);
        pit.write(0, 0x00, 0);
        pit.write(0, 0x10, 0); // 0x1000
        pit.write(3, 0x00, 0x100); // latch counter 0
        assert_eq!(pit.read(0, 0x500), 0x00);
        assert_eq!(pit.read(0, 0x600), 0x0f); // 0x1000 - 0x100 = 0x0f00
                                              // Unlatched reads follow the clock.
        assert_eq!(pit.read(0, 0x200), 0x00);
        assert_eq!(pit.read(0, 0x200), 0x0e);
    }

    #[test]
    fn read_back_status_and_count() {
        let mut pit = Pit::new();
        pit.write(3, 0xb0, 0); // counter 2, lo/hi, mode 0
        pit.write(2, 0xff, 0);
        pit.write(2, 0xff, 0);
        // Gate low: counter 2 does not count.
        assert_eq!(pit.count(2, 1000), 0xffff);
        pit.write(3, 0xc8, 0); // read-back count+status of counter 2
        let status = pit.read(2, 0);
        assert_eq!(status & 0x3f, 0x30);
        assert_eq!(status & 0x80, 0);
        assert_eq!(pit.read(2, 0), 0xff);
        assert_eq!(pit.read(2, 0), 0xff);
    }

    #[test]
    fn port61_gate_and_out2_for_calibration() {
        // Linux pit_calibrate_tsc: gate high, counter 2 mode 0, poll bit 5.
        let mut pit = Pit::new();
        pit.write_port_b(0x01, 0);
        assert_eq!(pit.read_port_b(0, 0) & 0x21, 0x01);
        pit.write(3, 0xb0, 0);
        pit.write(2, 0x2e, 0);
        pit.write(2, 0x9b, 0); // 0x9b2e = 39726 ticks, ~33 ms
        assert_eq!(pit.read_port_b(39_000, 0) & 0x20, 0);
        assert_eq!(pit.read_port_b(39_726, 0) & 0x20, 0x20);
        // MSB polling (quick_pit_calibrate) sees the count fall.
        pit.write(3, 0xb0, 50_000);
        pit.write(2, 0xff, 50_000);
        pit.write(2, 0xff, 50_000);
        let _lsb = pit.read(2, 50_000 + 256 * 3);
        assert_eq!(pit.read(2, 50_000 + 256 * 3), 0xfc);
        // Gate low pauses mode 0.
        pit.write_port_b(0x00, 60_000);
        let c = pit.count(2, 60_000);
        assert_eq!(pit.count(2, 70_000), c);
        pit.write_port_b(0x01, 70_000);
        assert_eq!(pit.count(2, 70_010), c.wrapping_sub(10));
    }

    #[test]
    fn idle_counter_never_interrupts() {
        let mut pit = Pit::new();
        assert!(!pit.advance(1 << 40));
        assert_eq!(pit.next_irq(0), None);
        assert_eq!(pit.read(3, 0), 0xff);
    }
}

/// Ticks no saved counter may reach: about 2^62 ns of machine time is far
/// beyond any run, and keeps tick arithmetic clear of overflow.
const TICK_LIMIT: u64 = 1 << 60;

impl Pit {
    /// Checks a saved state's invariants (see [`crate::persist`]).
    pub(crate) fn check(&self) -> Result<(), String> {
        for (i, c) in self.counters.iter().enumerate() {
            let ticks = [c.start, c.paused_at].into_iter().flatten();
            if c.mode > 5
                || c.rw > 3
                || !(1..=65536).contains(&c.reload)
                || ticks.chain([self.irq_checked]).any(|t| t >= TICK_LIMIT)
            {
                return Err(format!("counter {i} out of range"));
            }
        }
        Ok(())
    }
}
