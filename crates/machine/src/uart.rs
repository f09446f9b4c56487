//! COM1: a 16550A UART at ports 0x3f8–0x3ff, IRQ 4, built on rust-vmm's
//! `vm_superio::Serial`.
//!
//! Transmitted bytes go to the console sink (the serial model writes and
//! flushes each byte). Bytes from the terminal are queued with
//! [`Uart::enqueue_input`]; they enter the 64-byte receive FIFO as room
//! frees up, raising the received-data interrupt when IER enables it.
//!
//! The interrupt line is level-correct: [`Uart::irq_level`] is high while
//! the UART has an interrupt pending (IIR bit 0 clear) and MCR's OUT2 — the
//! PC's interrupt gate — is set, and it is re-evaluated after every access.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

/// Base port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports of the UART.
pub const COM1_LEN: u16 = 8;
/// COM1's interrupt line.
pub const COM1_IRQ: u8 = 4;

/// Terminal input held beyond the receive FIFO, at most this many bytes.
const BACKLOG_MAX: usize = 1 << 20;

/// Receive FIFO size of the serial model.
const FIFO_SIZE: usize = 64;

const IIR_NONE: u8 = 0x01;
const IIR_RDA: u8 = 0x04;
const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const LCR_DLAB: u8 = 0x80;
const MCR_OUT2: u8 = 0x08;

/// The interrupt "event" of the serial model. The level is recomputed from
/// the UART state after each access instead, so this does nothing.
#[derive(Debug)]
pub struct NoTrigger;

impl Trigger for NoTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The COM1 UART.
pub struct Uart {
    serial: Serial<NoTrigger, NoEvents, Box<dyn Write + Send>>,
    backlog: VecDeque<u8>,
    irq: bool,
}

impl std::fmt::Debug for Uart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uart")
            .field("backlog", &self.backlog.len())
            .field("irq", &self.irq)
            .finish()
    }
}

impl Uart {
    /// A UART whose output goes to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        Uart {
            serial: Serial::new(NoTrigger, sink),
            backlog: VecDeque::new(),
            irq: false,
        }
    }

    /// Reads register `offset` (0–7).
    pub fn read(&mut self, offset: u8) -> u8 {
        let v = self.serial.read(offset);
        if matches!(offset, 0 | 2) {
            // RBR (or the divisor latch, harmless) and IIR reads change
            // the interrupt state; an RBR read frees FIFO room.
            self.refill();
            self.reassert_rda();
            self.update_irq();
        }
        v
    }

    /// Writes register `offset` (0–7).
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.serial.write(offset, value) {
            tracing::debug!("uart: output error: {e:?}");
        }
        if matches!(offset, 0 | 1 | 4) {
            self.update_irq();
        }
    }

    /// Queues bytes typed on the terminal for the guest to receive. Beyond
    /// 1 MiB of unread input, further bytes are dropped.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        let room = BACKLOG_MAX.saturating_sub(self.backlog.len());
        if bytes.len() > room {
            tracing::debug!(
                "uart: input backlog full, dropping {} bytes",
                bytes.len() - room
            );
        }
        self.backlog.extend(&bytes[..bytes.len().min(room)]);
        self.refill();
        self.update_irq();
    }

    /// Bytes waiting in the backlog and the FIFO.
    pub fn pending_input(&self) -> usize {
        self.backlog.len() + FIFO_SIZE.saturating_sub(self.serial.fifo_capacity())
    }

    fn refill(&mut self) {
        while !self.backlog.is_empty() && self.serial.fifo_capacity() > 0 {
            let (front, _) = self.backlog.as_slices();
            let n = front.len().min(self.serial.fifo_capacity());
            match self.serial.enqueue_raw_bytes(&front[..n]) {
                // Loopback mode accepts nothing: keep the input for later.
                Ok(0) | Err(_) => break,
                Ok(done) => {
                    self.backlog.drain(..done);
                }
            }
        }
    }

    /// On a 16550 (trigger level 1) the received-data interrupt stays
    /// pending while the FIFO holds data; the serial model drops it on any
    /// RBR or IIR read. Re-arm it by rewriting IER, which makes the model
    /// re-check its FIFO. Only when the THR-empty interrupt is disabled,
    /// since the same write would also re-arm that one.
    fn reassert_rda(&mut self) {
        let st = self.serial.state();
        if !st.in_buffer.is_empty()
            && st.line_control & LCR_DLAB == 0
            && st.interrupt_enable & (IER_RDA | IER_THRE) == IER_RDA
            && st.interrupt_identification & IIR_RDA == 0
        {
            let _ = self.serial.write(1, st.interrupt_enable);
        }
    }

    fn update_irq(&mut self) {
        let state = self.serial.state();
        self.irq =
            state.interrupt_identification & IIR_NONE == 0 && state.modem_control & MCR_OUT2 != 0;
    }

    /// Level of IRQ 4.
    #[inline]
    pub fn irq_level(&self) -> bool {
        self.irq
    }
}

/// COM1's saved state: the serial model's registers and receive FIFO
/// (vm-superio's `SerialState`), the terminal input not yet in the FIFO,
/// and the interrupt line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    dll: u8,
    dlm: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    fifo: Vec<u8>,
    backlog: Vec<u8>,
    irq: bool,
}

impl crate::persist::Persist for Uart {
    type State = UartState;
    const NAME: &'static str = "uart";

    fn save(&self) -> UartState {
        let s = self.serial.state();
        UartState {
            dll: s.baud_divisor_low,
            dlm: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            fifo: s.in_buffer,
            backlog: self.backlog.iter().copied().collect(),
            irq: self.irq,
        }
    }

    fn restore(&mut self, s: UartState) -> Result<(), crate::persist::StateError> {
        let bad = |why: &str| crate::persist::StateError::new(Self::NAME, why);
        if s.fifo.len() > FIFO_SIZE {
            return Err(bad("receive FIFO longer than 64 bytes"));
        }
        if s.backlog.len() > BACKLOG_MAX {
            return Err(bad("input backlog longer than 1 MiB"));
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.dll,
            baud_divisor_high: s.dlm,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.fifo,
        };
        // The console sink stays: only the registers come from the snapshot.
        let old = std::mem::replace(
            &mut self.serial,
            Serial::new(NoTrigger, Box::new(std::io::sink())),
        );
        let sink = old.into_writer();
        self.serial = Serial::from_state(&state, NoTrigger, NoEvents, sink)
            .map_err(|e| bad(&format!("{e:?}")))?;
        self.backlog = s.backlog.into();
        self.irq = s.irq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A sink tests can look into.
    #[derive(Clone, Default)]
    pub(crate) struct SharedSink(pub Arc<Mutex<Vec<u8>>>);
    impl Write for SharedSink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_output_reaches_the_sink() {
        let sink = SharedSink::default();
        let mut u = Uart::new(Box::new(sink.clone()));
        assert_eq!(u.read(5) & 0x60, 0x60); // THRE | TEMT
        for &b in b"hi\n" {
            u.write(0, b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert!(!u.irq_level()); // IER is 0
    }

    #[test]
    fn rx_interrupt_is_level() {
        let mut u = Uart::new(Box::new(std::io::sink()));
        u.write(4, MCR_OUT2);
        u.enqueue_input(b"ab");
        assert!(!u.irq_level()); // RDA not enabled
        u.write(1, 0x01); // IER: RDA
        assert!(u.irq_level());
        assert_eq!(u.read(5) & 1, 1);
        assert_eq!(u.read(0), b'a');
        assert_eq!(u.read(0), b'b');
        assert!(!u.irq_level());
        assert_eq!(u.read(5) & 1, 0);
        // OUT2 gates the line.
        u.write(4, 0);
        u.enqueue_input(b"c");
        assert!(!u.irq_level());
        u.write(4, MCR_OUT2);
        assert!(u.irq_level());
    }

    #[test]
    fn rx_interrupt_stays_pending_while_data_remains() {
        let mut u = Uart::new(Box::new(std::io::sink()));
        u.write(4, MCR_OUT2);
        u.write(1, IER_RDA);
        u.enqueue_input(b"abc");
        assert!(u.irq_level());
        assert_eq!(u.read(2) & 0x0f, 0x04); // IIR: RDA
        assert!(u.irq_level()); // data still there
        assert_eq!(u.read(2) & 0x0f, 0x04);
        assert_eq!(u.read(0), b'a');
        assert!(u.irq_level());
        assert_eq!(u.read(0), b'b');
        assert_eq!(u.read(0), b'c');
        assert!(!u.irq_level());
        assert_eq!(u.read(2) & 0x0f, 0x01); // no interrupt
    }

    #[test]
    fn long_input_flows_through_the_fifo() {
        let mut u = Uart::new(Box::new(std::io::sink()));
        let input: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        u.enqueue_input(&input);
        assert_eq!(u.pending_input(), 200);
        let got: Vec<u8> = (0..200).map(|_| u.read(0)).collect();
        assert_eq!(got, input);
        assert_eq!(u.pending_input(), 0);
        assert_eq!(u.read(5) & 1, 0);
    }

    #[test]
    fn thr_empty_interrupt() {
        let mut u = Uart::new(Box::new(std::io::sink()));
        u.write(4, MCR_OUT2);
        u.write(1, 0x02); // IER: THRE
        assert!(u.irq_level());
        assert_eq!(u.read(2) & 0x0f, 0x02); // IIR: THR empty
        assert!(!u.irq_level());
    }
}
