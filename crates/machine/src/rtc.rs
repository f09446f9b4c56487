//! The MC146818 CMOS RTC and its RAM at ports 0x70 (index, bit 7 = NMI
//! disable) and 0x71 (data).
//!
//! The time of day comes from the machine's wall clock (the host clock,
//! or a fixed epoch plus virtual time, see [`ClockMode`](crate::ClockMode)),
//! plus an offset the guest sets by writing the time registers. Register B
//! selects BCD or binary and 24- or 12-hour format; register A's
//! update-in-progress bit is set during the last 244 µs of every second,
//! as on the real part. Register D reports valid RAM and time.
//!
//! Interrupts (IRQ 8): the periodic interrupt (rate from register A), the
//! update-ended interrupt and the alarm interrupt, flagged in register C
//! (cleared by reading it). The CMOS RAM holds the memory-size bytes a
//! BIOS would fill (0x15–0x18, 0x30–0x31, 0x34–0x35) and their checksum.

/// The index port; the data port is `RTC_PORT + 1`.
pub const RTC_PORT: u16 = 0x70;
/// The RTC's ISA interrupt line.
pub const RTC_IRQ: u8 = 8;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;

const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Update-in-progress window before each second boundary.
const UIP_NS: u64 = 244_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A broken-down date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct DateTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            min: rem / 60 % 60,
            sec: rem % 60,
        }
    }

    fn to_unix(self) -> i64 {
        days_from_civil(self.year, self.month.clamp(1, 12), self.day.clamp(1, 31)) * 86_400
            + i64::from(self.hour.min(23)) * 3600
            + i64::from(self.min.min(59)) * 60
            + i64::from(self.sec.min(59))
    }

    /// Day of week, 1 = Sunday.
    fn weekday(self) -> u32 {
        let days = days_from_civil(self.year, self.month, self.day);
        ((days + 4).rem_euclid(7) + 1) as u32
    }
}

/// The CMOS RTC and RAM.
#[derive(Debug, Clone)]
pub struct Rtc {
    ram: [u8; 128],
    index: u8,
    /// Seconds added to the wall clock by guest writes.
    offset: i64,
    /// The time as frozen while register B's SET bit is on.
    frozen: Option<DateTime>,
    /// Wall-clock ns up to which interrupts were evaluated.
    checked_ns: u64,
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
}

impl Rtc {
    /// A CMOS with the memory-size bytes for `ram_size` bytes of RAM, 24-hour
    /// BCD mode, and its interrupts evaluated from wall-clock time `now_ns`
    /// (ns since the Unix epoch).
    pub fn new(ram_size: u64, now_ns: u64) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz divider, 1024 Hz periodic rate
        ram[REG_B] = B_24H;
        ram[REG_D] = 0x80; // valid RAM and time
        ram[0x14] = 0x02; // equipment: FPU present
        let kib = |v: u64| v.min(0xffff) as u16;
        let base = kib(ram_size.min(640 * 1024) / 1024).to_le_bytes();
        ram[0x15..0x17].copy_from_slice(&base);
        let ext = kib(ram_size.saturating_sub(1 << 20) / 1024).to_le_bytes();
        ram[0x17..0x19].copy_from_slice(&ext);
        ram[0x30..0x32].copy_from_slice(&ext);
        let above16 = kib(ram_size.saturating_sub(16 << 20) / (64 * 1024)).to_le_bytes();
        ram[0x34..0x36].copy_from_slice(&above16);
        let sum: u16 = ram[0x10..0x2e].iter().map(|&b| u16::from(b)).sum();
        ram[0x2e..0x30].copy_from_slice(&sum.to_be_bytes());
        Rtc {
            ram,
            index: 0,
            offset: 0,
            frozen: None,
            checked_ns: now_ns,
        }
    }

    fn now(&self, wall_ns: u64) -> DateTime {
        self.frozen
            .unwrap_or_else(|| DateTime::from_unix((wall_ns / NS_PER_SEC) as i64 + self.offset))
    }

    fn encode(&self, v: u32) -> u8 {
        if self.ram[REG_B] & B_BINARY != 0 {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u32 {
        if self.ram[REG_B] & B_BINARY != 0 {
            u32::from(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u32) -> u8 {
        if self.ram[REG_B] & B_24H != 0 {
            self.encode(h)
        } else {
            let h12 = if h % 12 == 0 { 12 } else { h % 12 };
            self.encode(h12) | if h >= 12 { 0x80 } else { 0 }
        }
    }

    fn decode_hour(&self, v: u8) -> u32 {
        if self.ram[REG_B] & B_24H != 0 {
            self.decode(v)
        } else {
            let h = self.decode(v & 0x7f) % 12;
            if v & 0x80 != 0 {
                h + 12
            } else {
                h
            }
        }
    }

    /// Reads the index port (write-only on a PC: all ones).
    pub fn read_index(&self) -> u8 {
        0xff
    }

    /// Writes the index port (bit 7, NMI disable, is ignored).
    pub fn write_index(&mut self, val: u8) {
        self.index = val & 0x7f;
    }

    /// Reads the data port at wall-clock time `wall_ns`. Reading
    /// register C clears it; [`irq_level`](Self::irq_level) then drops.
    pub fn read_data(&mut self, wall_ns: u64) -> u8 {
        let t = self.now(wall_ns);
        let i = usize::from(self.index);
        match i {
            0x00 => self.encode(t.sec),
            0x02 => self.encode(t.min),
            0x04 => self.encode_hour(t.hour),
            0x06 => self.encode(t.weekday()),
            0x07 => self.encode(t.day),
            0x08 => self.encode(t.month),
            0x09 => self.encode(t.year.rem_euclid(100) as u32),
            CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32),
            REG_A => {
                let uip = self.frozen.is_none() && wall_ns % NS_PER_SEC >= NS_PER_SEC - UIP_NS;
                self.ram[REG_A] & 0x7f | if uip { 0x80 } else { 0 }
            }
            REG_C => std::mem::take(&mut self.ram[REG_C]),
            _ => self.ram[i],
        }
    }

    /// Writes the data port at wall-clock time `wall_ns`.
    pub fn write_data(&mut self, val: u8, wall_ns: u64) {
        let i = usize::from(self.index);
        match i {
            0x00 | 0x02 | 0x04 | 0x07 | 0x08 | 0x09 | CENTURY => {
                let mut t = self.now(wall_ns);
                match i {
                    0x00 => t.sec = self.decode(val),
                    0x02 => t.min = self.decode(val),
                    0x04 => t.hour = self.decode_hour(val),
                    0x07 => t.day = self.decode(val),
                    0x08 => t.month = self.decode(val),
                    0x09 => {
                        t.year = t.year.div_euclid(100) * 100 + i64::from(self.decode(val) % 100)
                    }
                    _ => t.year = i64::from(self.decode(val)) * 100 + t.year.rem_euclid(100),
                }
                self.set_time(t, wall_ns);
            }
            0x06 => {} // day of week: derived from the date
            REG_A => self.ram[REG_A] = val & 0x7f,
            REG_B => {
                let was_set = self.ram[REG_B] & B_SET != 0;
                let mut val = val;
                if val & B_SET != 0 {
                    val &= !B_UIE;
                    if !was_set {
                        self.frozen = Some(self.now(wall_ns));
                    }
                } else if let Some(t) = self.frozen.take() {
                    self.offset = t.to_unix() - (wall_ns / NS_PER_SEC) as i64;
                }
                self.ram[REG_B] = val;
                self.update_irqf();
            }
            REG_C | REG_D => {} // read-only
            _ => self.ram[i] = val,
        }
    }

    fn set_time(&mut self, t: DateTime, wall_ns: u64) {
        if self.frozen.is_some() {
            self.frozen = Some(t);
        } else {
            self.offset = t.to_unix() - (wall_ns / NS_PER_SEC) as i64;
        }
    }

    fn update_irqf(&mut self) {
        let enabled = self.ram[REG_B] & (B_PIE | B_AIE | B_UIE);
        let flags = self.ram[REG_C] & (C_PF | C_AF | C_UF);
        if enabled & flags != 0 {
            self.ram[REG_C] |= C_IRQF;
        }
    }

    /// Level of IRQ 8: high while register C has IRQF set.
    pub fn irq_level(&self) -> bool {
        self.ram[REG_C] & C_IRQF != 0
    }

    /// Periodic-interrupt period in ns, if the rate select is non-zero.
    fn period_ns(&self) -> Option<u64> {
        let rate = u32::from(self.ram[REG_A] & 0x0f);
        match rate {
            0 => None,
            1 | 2 => Some(NS_PER_SEC << (rate + 6) >> 15),
            r => Some(NS_PER_SEC << (r - 1) >> 15),
        }
    }

    /// Evaluates the interrupt flags up to wall-clock time `wall_ns`.
    pub fn advance(&mut self, wall_ns: u64) {
        let from = self.checked_ns;
        if wall_ns <= from {
            return;
        }
        self.checked_ns = wall_ns;
        if let Some(p) = self.period_ns() {
            if wall_ns / p != from / p {
                self.ram[REG_C] |= C_PF;
            }
        }
        if self.frozen.is_none() && wall_ns / NS_PER_SEC != from / NS_PER_SEC {
            self.ram[REG_C] |= C_UF;
            let t = self.now(wall_ns);
            let matches = |alarm: u8, v: u8| alarm & 0xc0 == 0xc0 || alarm == v;
            if matches(self.ram[0x01], self.encode(t.sec))
                && matches(self.ram[0x03], self.encode(t.min))
                && matches(self.ram[0x05], self.encode_hour(t.hour))
            {
                self.ram[REG_C] |= C_AF;
            }
        }
        self.update_irqf();
    }

    /// Wall-clock time of the next enabled interrupt after `wall_ns`.
    pub fn next_event(&self, wall_ns: u64) -> Option<u64> {
        let b = self.ram[REG_B];
        let periodic = if b & B_PIE != 0 {
            self.period_ns().map(|p| (wall_ns / p + 1) * p)
        } else {
            None
        };
        let second = if b & (B_UIE | B_AIE) != 0 && self.frozen.is_none() {
            Some((wall_ns / NS_PER_SEC + 1) * NS_PER_SEC)
        } else {
            None
        };
        match (periodic, second) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2024-02-29 13:45:56 UTC, a Thursday.
    const T: u64 = 1_709_214_356 * NS_PER_SEC;

    fn read(rtc: &mut Rtc, reg: u8, now: u64) -> u8 {
        rtc.write_index(reg);
        rtc.read_data(now)
    }

    fn write(rtc: &mut Rtc, reg: u8, val: u8, now: u64) {
        rtc.write_index(reg);
        rtc.write_data(val, now);
    }

    #[test]
    fn calendar_round_trip() {
        let t = DateTime::from_unix(1_709_214_356);
        assert_eq!(
            t,
            DateTime {
                year: 2024,
                month: 2,
                day: 29,
                hour: 13,
                min: 45,
                sec: 56
            }
        );
        assert_eq!(t.to_unix(), 1_709_214_356);
        assert_eq!(t.weekday(), 5);
        assert_eq!(DateTime::from_unix(0).weekday(), 5); // 1970-01-01 Thursday
    }

    #[test]
    fn bcd_24h_default() {
        let mut rtc = Rtc::new(256 << 20, T);
        assert_eq!(read(&mut rtc, 0x00, T), 0x56);
        assert_eq!(read(&mut rtc, 0x02, T), 0x45);
        assert_eq!(read(&mut rtc, 0x04, T), 0x13);
        assert_eq!(read(&mut rtc, 0x06, T), 0x05);
        assert_eq!(read(&mut rtc, 0x07, T), 0x29);
        assert_eq!(read(&mut rtc, 0x08, T), 0x02);
        assert_eq!(read(&mut rtc, 0x09, T), 0x24);
        assert_eq!(read(&mut rtc, 0x32, T), 0x20);
        assert_eq!(read(&mut rtc, 0x0d, T), 0x80);
    }

    #[test]
    fn binary_and_12h() {
        let mut rtc = Rtc::new(256 << 20, T);
        write(&mut rtc, 0x0b, B_BINARY, T); // binary, 12-hour
        assert_eq!(read(&mut rtc, 0x00, T), 56);
        assert_eq!(read(&mut rtc, 0x04, T), 0x80 | 1); // 1 PM
        write(&mut rtc, 0x0b, B_BINARY | B_24H, T);
        assert_eq!(read(&mut rtc, 0x04, T), 13);
        assert_eq!(read(&mut rtc, 0x09, T), 24);
    }

    #[test]
    fn time_advances_and_uip_window() {
        let mut rtc = Rtc::new(256 << 20, T);
        assert_eq!(read(&mut rtc, 0x00, T + 3 * NS_PER_SEC), 0x59);
        assert_eq!(read(&mut rtc, 0x00, T + 4 * NS_PER_SEC), 0x00);
        assert_eq!(read(&mut rtc, 0x0a, T) & 0x80, 0);
        assert_eq!(read(&mut rtc, 0x0a, T + NS_PER_SEC - 1000) & 0x80, 0x80);
        assert_eq!(read(&mut rtc, 0x0a, T) & 0x7f, 0x26);
    }

    #[test]
    fn guest_sets_the_time() {
        let mut rtc = Rtc::new(256 << 20, T);
        write(&mut rtc, 0x0b, B_SET | B_24H, T);
        write(&mut rtc, 0x04, 0x08, T);
        write(&mut rtc, 0x02, 0x30, T);
        write(&mut rtc, 0x00, 0x00, T);
        // Frozen while SET.
        assert_eq!(read(&mut rtc, 0x00, T + 5 * NS_PER_SEC), 0x00);
        write(&mut rtc, 0x0b, B_24H, T + 5 * NS_PER_SEC);
        assert_eq!(read(&mut rtc, 0x04, T + 7 * NS_PER_SEC), 0x08);
        assert_eq!(read(&mut rtc, 0x00, T + 7 * NS_PER_SEC), 0x02);
        assert_eq!(read(&mut rtc, 0x07, T + 7 * NS_PER_SEC), 0x29);
    }

    #[test]
    fn memory_size_bytes_and_checksum() {
        let mut rtc = Rtc::new(256 << 20, T);
        let r16 = |rtc: &mut Rtc, lo: u8| {
            u16::from(read(rtc, lo, T)) | u16::from(read(rtc, lo + 1, T)) << 8
        };
        assert_eq!(r16(&mut rtc, 0x15), 640);
        assert_eq!(r16(&mut rtc, 0x17), 0xffff); // 255 MiB saturates
        assert_eq!(r16(&mut rtc, 0x30), 0xffff);
        assert_eq!(r16(&mut rtc, 0x34), 3840); // 240 MiB in 64 KiB units
        let mut small = Rtc::new(8 << 20, T);
        assert_eq!(r16(&mut small, 0x17), 7 * 1024);
        assert_eq!(r16(&mut small, 0x34), 0);
        let sum: u16 = (0x10..0x2e).map(|i| u16::from(read(&mut rtc, i, T))).sum();
        assert_eq!(
            u16::from(read(&mut rtc, 0x2e, T)) << 8 | u16::from(read(&mut rtc, 0x2f, T)),
            sum
        );
        // CMOS RAM is read/write; the index ignores the NMI bit.
        write(&mut rtc, 0x80 | 0x40, 0x5a, T);
        assert_eq!(read(&mut rtc, 0x40, T), 0x5a);
    }

    #[test]
    fn periodic_and_update_interrupts() {
        let mut rtc = Rtc::new(256 << 20, T);
        rtc.advance(T + 10_000_000);
        assert!(!rtc.irq_level()); // nothing enabled
        write(&mut rtc, 0x0b, B_24H | B_PIE, T);
        assert!(rtc.irq_level()); // PF was already flagged
        assert_eq!(read(&mut rtc, 0x0c, T) & 0xc0, 0xc0);
        assert!(!rtc.irq_level());
        let next = rtc.next_event(T + 10_000_000).unwrap();
        let p = 976_562; // 1024 Hz
        assert_eq!(next, ((T + 10_000_000) / p + 1) * p);
        rtc.advance(next);
        assert!(rtc.irq_level());
        assert_eq!(read(&mut rtc, 0x0c, next), C_IRQF | C_PF);
        write(&mut rtc, 0x0b, B_24H | B_UIE, T);
        rtc.advance(T + NS_PER_SEC);
        assert_eq!(read(&mut rtc, 0x0c, T) & 0x90, 0x90);
        assert_eq!(rtc.next_event(T + NS_PER_SEC), Some(T + 2 * NS_PER_SEC));
    }
}

/// The RTC's saved state: CMOS RAM, the index register, the guest's
/// offset from the wall clock and where interrupts were evaluated up to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    ram: Vec<u8>,
    index: u8,
    offset: i64,
    frozen: Option<DateTime>,
    checked_ns: u64,
}

impl crate::persist::Persist for Rtc {
    type State = RtcState;
    const NAME: &'static str = "rtc";

    fn save(&self) -> RtcState {
        RtcState {
            ram: self.ram.to_vec(),
            index: self.index,
            offset: self.offset,
            frozen: self.frozen,
            checked_ns: self.checked_ns,
        }
    }

    fn restore(&mut self, s: RtcState) -> Result<(), crate::persist::StateError> {
        let bad = |why: &str| crate::persist::StateError::new(Self::NAME, why);
        let ram: [u8; 128] = s
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| bad("CMOS RAM is not 128 bytes"))?;
        if usize::from(s.index) >= ram.len() {
            return Err(bad("index register beyond CMOS RAM"));
        }
        // Far enough from overflow for any date arithmetic.
        if s.offset.unsigned_abs() > 1 << 40 {
            return Err(bad("clock offset out of range"));
        }
        if let Some(d) = s.frozen {
            let ok = (1..=12).contains(&d.month)
                && (1..=31).contains(&d.day)
                && d.hour < 24
                && d.min < 60
                && d.sec < 60
                && (0..=9999).contains(&d.year);
            if !ok {
                return Err(bad("frozen date out of range"));
            }
        }
        *self = Rtc {
            ram,
            index: s.index,
            offset: s.offset,
            frozen: s.frozen,
            checked_ns: s.checked_ns,
        };
        Ok(())
    }
}
