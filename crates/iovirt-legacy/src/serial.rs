//! A 16550A UART, as found at COM1 (I/O port 0x3F8, IRQ 4) on every PC.
//!
//! The model is a state machine driven by register accesses (through
//! [`BusDeviceMut`]) and by host input ([`Serial::enqueue_input`]). Bytes the
//! guest transmits go straight to a [`Write`] sink: transmission is instant, so
//! the transmit FIFO is always empty and THRE/TEMT always read as set. Received
//! bytes wait in a 16-byte FIFO (one byte with the FIFO disabled); when it is
//! full, host input is refused rather than lost, so the VMM applies
//! back-pressure with [`Serial::fifo_free`].
//!
//! Interrupts follow the ISA wiring of a PC: the UART's interrupt output reaches
//! the interrupt controller only while MCR.OUT2 is set (and not in loopback
//! mode), and it is edge-triggered: [`InterruptLine::trigger`] is called each
//! time an enabled interrupt condition becomes pending.
//!
//! Register the device at [`COM1_PORT`] with length [`SERIAL_LEN`]; the offset
//! into the range is the register number.

use std::collections::VecDeque;
use std::fmt;
use std::io::Write;
use std::sync::Arc;

use iovirt_bus::{BusDeviceMut, InterruptLine};
use serde::{Deserialize, Serialize};

/// I/O port base of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// I/O port base of COM2.
pub const COM2_PORT: u64 = 0x2f8;
/// Number of registers (ports) a UART occupies.
pub const SERIAL_LEN: u64 = 8;

/// Receiver buffer (read) / transmitter holding register (write); DLL when LCR.DLAB is set.
pub const DATA: u64 = 0;
/// Interrupt enable register; DLM when LCR.DLAB is set.
pub const IER: u64 = 1;
/// Interrupt identification register (read) / FIFO control register (write).
pub const IIR_FCR: u64 = 2;
/// Line control register: word format and the divisor latch access bit.
pub const LCR: u64 = 3;
/// Modem control register: DTR, RTS, OUT1, OUT2 and loopback.
pub const MCR: u64 = 4;
/// Line status register: data ready, errors, transmitter empty.
pub const LSR: u64 = 5;
/// Modem status register: CTS, DSR, RI, DCD and their change bits.
pub const MSR: u64 = 6;
/// Scratch register: a byte of storage with no effect.
pub const SCR: u64 = 7;

/// Size of the receive and transmit FIFOs of a 16550A.
pub const FIFO_SIZE: usize = 16;

/// IER: interrupt when received data is available (or the FIFO timeout fires).
pub const IER_RDA: u8 = 0x01;
/// IER: interrupt when the transmitter holding register is empty.
pub const IER_THRE: u8 = 0x02;
/// IER: interrupt on receiver line status errors (overrun, parity, framing, break).
pub const IER_RLS: u8 = 0x04;
/// IER: interrupt on modem status changes.
pub const IER_MS: u8 = 0x08;
/// IER bits that exist on a 16550A.
pub const IER_MASK: u8 = 0x0f;

/// IIR: no interrupt pending (bit 0 set means "none").
pub const IIR_NONE: u8 = 0x01;
/// IIR: receiver line status (highest priority).
pub const IIR_RLS: u8 = 0x06;
/// IIR: received data at or above the FIFO trigger level.
pub const IIR_RDA: u8 = 0x04;
/// IIR: character timeout, data below the trigger level waits in the FIFO.
pub const IIR_TIMEOUT: u8 = 0x0c;
/// IIR: transmitter holding register empty.
pub const IIR_THRE: u8 = 0x02;
/// IIR: modem status change (lowest priority).
pub const IIR_MS: u8 = 0x00;
/// IIR: both bits set when the FIFOs are enabled.
pub const IIR_FIFO_ENABLED: u8 = 0xc0;

/// FCR: enable both FIFOs (changing it clears them).
pub const FCR_ENABLE: u8 = 0x01;
/// FCR: clear the receive FIFO (self-clearing).
pub const FCR_CLEAR_RX: u8 = 0x02;
/// FCR: clear the transmit FIFO (self-clearing).
pub const FCR_CLEAR_TX: u8 = 0x04;
/// FCR: receive trigger level field (1, 4, 8 or 14 bytes).
pub const FCR_TRIGGER_MASK: u8 = 0xc0;

/// LCR: divisor latch access bit, maps DLL/DLM over offsets 0 and 1.
pub const LCR_DLAB: u8 = 0x80;

/// MCR: data terminal ready output.
pub const MCR_DTR: u8 = 0x01;
/// MCR: request to send output.
pub const MCR_RTS: u8 = 0x02;
/// MCR: auxiliary output 1.
pub const MCR_OUT1: u8 = 0x04;
/// MCR: auxiliary output 2, which gates the interrupt onto the ISA bus on a PC.
pub const MCR_OUT2: u8 = 0x08;
/// MCR: loopback mode, TX feeds RX and the outputs feed the modem status inputs.
pub const MCR_LOOP: u8 = 0x10;
/// MCR bits that exist on a 16550A.
pub const MCR_MASK: u8 = 0x1f;

/// LSR: data ready, at least one byte waits in the receiver.
pub const LSR_DR: u8 = 0x01;
/// LSR: overrun error, a received byte was lost (cleared by reading LSR).
pub const LSR_OE: u8 = 0x02;
/// LSR: transmitter holding register (or TX FIFO) empty.
pub const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty, holding and shift registers both idle.
pub const LSR_TEMT: u8 = 0x40;

/// MSR: CTS changed since the last MSR read.
pub const MSR_DCTS: u8 = 0x01;
/// MSR: DSR changed since the last MSR read.
pub const MSR_DDSR: u8 = 0x02;
/// MSR: RI went from asserted to deasserted (trailing edge).
pub const MSR_TERI: u8 = 0x04;
/// MSR: DCD changed since the last MSR read.
pub const MSR_DDCD: u8 = 0x08;
/// MSR: clear to send input.
pub const MSR_CTS: u8 = 0x10;
/// MSR: data set ready input.
pub const MSR_DSR: u8 = 0x20;
/// MSR: ring indicator input.
pub const MSR_RI: u8 = 0x40;
/// MSR: data carrier detect input.
pub const MSR_DCD: u8 = 0x80;
/// MSR: the four change bits.
pub const MSR_DELTA_MASK: u8 = 0x0f;

/// Modem inputs when not in loopback: a connected, ready peer (CTS, DSR, DCD).
const HOST_MODEM_INPUTS: u8 = MSR_CTS | MSR_DSR | MSR_DCD;
/// Divisor for 9600 baud from the 1.8432 MHz clock, the power-on value.
const DEFAULT_DIVISOR: u16 = 12;
/// Power-on LCR: 8 data bits, no parity, 1 stop bit.
const DEFAULT_LCR: u8 = 0x03;

// Interrupt sources as a bit set (for edge detection), not guest-visible.
const SRC_RLS: u8 = 1;
const SRC_RX: u8 = 2;
const SRC_THRE: u8 = 4;
const SRC_MS: u8 = 8;

/// Why a [`SerialState`] cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SerialStateError {
    /// A register holds bits that do not exist on a 16550A.
    #[error("serial register {register} has undefined bits set: {value:#04x}")]
    ReservedBits {
        /// Register name.
        register: &'static str,
        /// Its value.
        value: u8,
    },
    /// More bytes wait in the receiver than it can hold.
    #[error("serial receive buffer holds {len} bytes, capacity is {capacity}")]
    RxOverflow {
        /// Bytes in the snapshot.
        len: usize,
        /// Capacity in the snapshot's FIFO mode.
        capacity: usize,
    },
    /// The modem status inputs contradict the modem control outputs.
    #[error("serial MSR {msr:#04x} does not match MCR {mcr:#04x}")]
    ModemMismatch {
        /// Modem status register.
        msr: u8,
        /// Modem control register.
        mcr: u8,
    },
    /// A THRE interrupt is marked pending while it is disabled.
    #[error("serial THRE interrupt pending but not enabled in IER {ier:#04x}")]
    ThrePendingDisabled {
        /// Interrupt enable register.
        ier: u8,
    },
}

/// The guest-visible state of a [`Serial`], for snapshot and restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub dll: u8,
    /// Divisor latch, high byte.
    pub dlm: u8,
    /// Interrupt enable register.
    pub ier: u8,
    /// FIFO control: [`FCR_ENABLE`] and the trigger level bits.
    pub fcr: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// Sticky line status error bits (only [`LSR_OE`] in this model).
    pub lsr_errors: u8,
    /// Modem status register, inputs and change bits.
    pub msr: u8,
    /// Scratch register.
    pub scr: u8,
    /// Received bytes not yet read, oldest first.
    pub rx: Vec<u8>,
    /// A THRE interrupt is pending (cleared by reading IIR or writing THR).
    pub thre_pending: bool,
}

impl Default for SerialState {
    fn default() -> Self {
        let [dll, dlm] = DEFAULT_DIVISOR.to_le_bytes();
        SerialState {
            dll,
            dlm,
            ier: 0,
            fcr: 0,
            lcr: DEFAULT_LCR,
            mcr: 0,
            lsr_errors: 0,
            msr: HOST_MODEM_INPUTS,
            scr: 0,
            rx: Vec::new(),
            thre_pending: false,
        }
    }
}

/// A 16550A UART.
///
/// ```
/// use std::sync::Arc;
/// use iovirt_bus::interrupt::test_doubles::RecordingLine;
/// use iovirt_bus::BusDeviceMut;
/// use iovirt_legacy::serial::{Serial, DATA, IER, IER_RDA, LSR, LSR_DR, MCR, MCR_OUT2};
///
/// let irq = Arc::new(RecordingLine::new());
/// let mut uart = Serial::new(irq.clone(), Vec::new());
///
/// // The guest transmits.
/// for c in b"ok\n" {
///     uart.write(DATA, &[*c]);
/// }
/// assert_eq!(uart.output(), b"ok\n");
///
/// // The guest enables the receive interrupt; the host types a key.
/// uart.write(MCR, &[MCR_OUT2]);
/// uart.write(IER, &[IER_RDA]);
/// assert_eq!(uart.enqueue_input(b"y"), 1);
/// assert_eq!(irq.edges(), 1);
/// let mut b = [0u8];
/// uart.read(LSR, &mut b);
/// assert_ne!(b[0] & LSR_DR, 0);
/// uart.read(DATA, &mut b);
/// assert_eq!(b[0], b'y');
/// ```
pub struct Serial<W: Write + Send> {
    dll: u8,
    dlm: u8,
    ier: u8,
    fcr: u8,
    lcr: u8,
    mcr: u8,
    lsr_errors: u8,
    msr: u8,
    scr: u8,
    rx: VecDeque<u8>,
    thre_pending: bool,
    irq: Arc<dyn InterruptLine>,
    out: W,
}

impl<W: Write + Send> fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn modem_inputs(mcr: u8) -> u8 {
    if mcr & MCR_LOOP == 0 {
        return HOST_MODEM_INPUTS;
    }
    let mut v = 0;
    if mcr & MCR_RTS != 0 {
        v |= MSR_CTS;
    }
    if mcr & MCR_DTR != 0 {
        v |= MSR_DSR;
    }
    if mcr & MCR_OUT1 != 0 {
        v |= MSR_RI;
    }
    if mcr & MCR_OUT2 != 0 {
        v |= MSR_DCD;
    }
    v
}

fn rx_capacity(fcr: u8) -> usize {
    if fcr & FCR_ENABLE != 0 {
        FIFO_SIZE
    } else {
        1
    }
}

impl<W: Write + Send> Serial<W> {
    /// A UART in its power-on state that raises `irq` and transmits into `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: W) -> Self {
        let s = SerialState::default();
        Serial {
            dll: s.dll,
            dlm: s.dlm,
            ier: s.ier,
            fcr: s.fcr,
            lcr: s.lcr,
            mcr: s.mcr,
            lsr_errors: s.lsr_errors,
            msr: s.msr,
            scr: s.scr,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            thre_pending: s.thre_pending,
            irq,
            out,
        }
    }

    /// Restore a UART from `state`, rejecting states no 16550A can be in.
    ///
    /// No interrupt is raised: an edge that was pending at snapshot time was
    /// already delivered to the interrupt controller, whose state is restored
    /// separately.
    pub fn from_state(
        state: &SerialState,
        irq: Arc<dyn InterruptLine>,
        out: W,
    ) -> Result<Self, SerialStateError> {
        let reserved = |register, value: u8, mask: u8| {
            if value & !mask != 0 {
                Err(SerialStateError::ReservedBits { register, value })
            } else {
                Ok(())
            }
        };
        reserved("IER", state.ier, IER_MASK)?;
        reserved("FCR", state.fcr, FCR_ENABLE | FCR_TRIGGER_MASK)?;
        reserved("MCR", state.mcr, MCR_MASK)?;
        reserved("LSR", state.lsr_errors, LSR_OE)?;
        let capacity = rx_capacity(state.fcr);
        if state.rx.len() > capacity {
            return Err(SerialStateError::RxOverflow {
                len: state.rx.len(),
                capacity,
            });
        }
        if state.msr & !MSR_DELTA_MASK != modem_inputs(state.mcr) {
            return Err(SerialStateError::ModemMismatch {
                msr: state.msr,
                mcr: state.mcr,
            });
        }
        if state.thre_pending && state.ier & IER_THRE == 0 {
            return Err(SerialStateError::ThrePendingDisabled { ier: state.ier });
        }
        Ok(Serial {
            dll: state.dll,
            dlm: state.dlm,
            ier: state.ier,
            fcr: state.fcr,
            lcr: state.lcr,
            mcr: state.mcr,
            lsr_errors: state.lsr_errors,
            msr: state.msr,
            scr: state.scr,
            rx: state.rx.iter().copied().collect(),
            thre_pending: state.thre_pending,
            irq,
            out,
        })
    }

    /// The guest-visible state, for snapshot.
    pub fn state(&self) -> SerialState {
        SerialState {
            dll: self.dll,
            dlm: self.dlm,
            ier: self.ier,
            fcr: self.fcr,
            lcr: self.lcr,
            mcr: self.mcr,
            lsr_errors: self.lsr_errors,
            msr: self.msr,
            scr: self.scr,
            rx: self.rx.iter().copied().collect(),
            thre_pending: self.thre_pending,
        }
    }

    /// The transmit sink.
    pub fn output(&self) -> &W {
        &self.out
    }

    /// The transmit sink, mutably.
    pub fn output_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Offer host input to the guest; returns how many bytes were accepted.
    ///
    /// Bytes beyond the free space in the receive FIFO are not taken (the
    /// caller keeps them and retries once [`fifo_free`](Self::fifo_free) grows).
    /// In loopback mode the serial input is disconnected and nothing is taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.fifo_free());
        if n == 0 {
            return 0;
        }
        let before = self.pending_sources();
        self.rx.extend(&bytes[..n]);
        self.raise_new(before);
        n
    }

    /// How many bytes [`enqueue_input`](Self::enqueue_input) would accept now.
    pub fn fifo_free(&self) -> usize {
        if self.mcr & MCR_LOOP != 0 {
            return 0;
        }
        rx_capacity(self.fcr).saturating_sub(self.rx.len())
    }

    fn fifo_enabled(&self) -> bool {
        self.fcr & FCR_ENABLE != 0
    }

    fn rx_trigger_level(&self) -> usize {
        match self.fcr & FCR_TRIGGER_MASK {
            0x00 => 1,
            0x40 => 4,
            0x80 => 8,
            _ => 14,
        }
    }

    /// Enabled interrupt conditions that are pending, as a bit set of `SRC_*`.
    fn pending_sources(&self) -> u8 {
        let mut s = 0;
        if self.ier & IER_RLS != 0 && self.lsr_errors != 0 {
            s |= SRC_RLS;
        }
        if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            s |= SRC_RX;
        }
        if self.ier & IER_THRE != 0 && self.thre_pending {
            s |= SRC_THRE;
        }
        if self.ier & IER_MS != 0 && self.msr & MSR_DELTA_MASK != 0 {
            s |= SRC_MS;
        }
        s
    }

    /// The interrupt identification, without the FIFO bits.
    fn interrupt_id(&self) -> u8 {
        let s = self.pending_sources();
        if s & SRC_RLS != 0 {
            IIR_RLS
        } else if s & SRC_RX != 0 {
            if self.fifo_enabled() && self.rx.len() < self.rx_trigger_level() {
                // Below the trigger level the 16550A reports a character timeout;
                // this model lets that timeout elapse at once.
                IIR_TIMEOUT
            } else {
                IIR_RDA
            }
        } else if s & SRC_THRE != 0 {
            IIR_THRE
        } else if s & SRC_MS != 0 {
            IIR_MS
        } else {
            IIR_NONE
        }
    }

    fn irq_gate_open(&self) -> bool {
        self.mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2
    }

    /// Deliver an edge if an interrupt condition appeared since `before`.
    fn raise_new(&mut self, before: u8) {
        let now = self.pending_sources();
        if now & !before != 0 && self.irq_gate_open() {
            if let Err(e) = self.irq.trigger() {
                log::warn!("serial: interrupt delivery failed: {e}");
            }
        }
    }

    fn receive(&mut self, byte: u8) {
        if self.rx.len() >= rx_capacity(self.fcr) {
            self.lsr_errors |= LSR_OE;
        } else {
            self.rx.push_back(byte);
        }
    }

    fn transmit(&mut self, byte: u8) {
        self.thre_pending = false;
        if self.mcr & MCR_LOOP != 0 {
            self.receive(byte);
        } else {
            let res = self.out.write_all(&[byte]).and_then(|()| {
                if byte == b'\n' {
                    self.out.flush()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res {
                log::debug!("serial: output failed, byte dropped: {e}");
            }
        }
        // Transmission is instant: the holding register is empty again.
        self.thre_pending = self.ier & IER_THRE != 0;
    }

    fn set_mcr(&mut self, value: u8) {
        let old_in = self.msr & !MSR_DELTA_MASK;
        self.mcr = value & MCR_MASK;
        let new_in = modem_inputs(self.mcr);
        let changed = old_in ^ new_in;
        let mut delta = 0;
        if changed & MSR_CTS != 0 {
            delta |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            delta |= MSR_DDSR;
        }
        if changed & MSR_DCD != 0 {
            delta |= MSR_DDCD;
        }
        if old_in & MSR_RI != 0 && new_in & MSR_RI == 0 {
            delta |= MSR_TERI;
        }
        self.msr = new_in | (self.msr & MSR_DELTA_MASK) | delta;
    }

    fn set_fcr(&mut self, value: u8) {
        let enable = value & FCR_ENABLE;
        if enable != self.fcr & FCR_ENABLE {
            // Switching FIFO mode resets both FIFOs.
            self.rx.clear();
        }
        if enable == 0 {
            self.fcr = 0;
            return;
        }
        if value & FCR_CLEAR_RX != 0 {
            self.rx.clear();
        }
        // FCR_CLEAR_TX: the transmit FIFO is always empty here.
        self.fcr = FCR_ENABLE | (value & FCR_TRIGGER_MASK);
    }

    fn read_reg(&mut self, reg: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            DATA if dlab => self.dll,
            DATA => self.rx.pop_front().unwrap_or(0),
            IER if dlab => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                if id == IIR_THRE {
                    // Reading IIR while it reports THRE clears that interrupt.
                    self.thre_pending = false;
                }
                let fifo = if self.fifo_enabled() {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                id | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let mut v = LSR_THRE | LSR_TEMT | self.lsr_errors;
                if !self.rx.is_empty() {
                    v |= LSR_DR;
                }
                self.lsr_errors = 0;
                v
            }
            MSR => {
                let v = self.msr;
                self.msr &= !MSR_DELTA_MASK;
                v
            }
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, reg: u64, value: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            DATA if dlab => self.dll = value,
            DATA => self.transmit(value),
            IER if dlab => self.dlm = value,
            IER => {
                let old = self.ier;
                self.ier = value & IER_MASK;
                if self.ier & IER_THRE == 0 {
                    self.thre_pending = false;
                } else if old & IER_THRE == 0 {
                    // Enabling THRE with an empty holding register interrupts at once.
                    self.thre_pending = true;
                }
            }
            IIR_FCR => self.set_fcr(value),
            LCR => self.lcr = value,
            MCR => self.set_mcr(value),
            LSR | MSR => {} // read-only on a 16550A (factory test writes are ignored)
            SCR => self.scr = value,
            _ => {}
        }
    }
}

impl<W: Write + Send> BusDeviceMut for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let before = self.pending_sources();
        // A wider access than a byte reads consecutive registers, like byte accesses.
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(offset.saturating_add(i as u64));
        }
        self.raise_new(before);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let before = self.pending_sources();
            let gate_before = self.irq_gate_open();
            self.write_reg(offset.saturating_add(i as u64), v);
            if !gate_before && self.irq_gate_open() {
                // Opening the OUT2 gate with a condition pending raises the line.
                self.raise_new(0);
            } else {
                self.raise_new(before);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_bus::interrupt::test_doubles::RecordingLine;

    fn uart() -> (Serial<Vec<u8>>, Arc<RecordingLine>) {
        let irq = Arc::new(RecordingLine::new());
        (Serial::new(irq.clone(), Vec::new()), irq)
    }

    fn rd(u: &mut Serial<Vec<u8>>, reg: u64) -> u8 {
        let mut b = [0u8];
        u.read(reg, &mut b);
        b[0]
    }

    fn wr(u: &mut Serial<Vec<u8>>, reg: u64, v: u8) {
        u.write(reg, &[v]);
    }

    #[test]
    fn power_on_registers() {
        let (mut u, irq) = uart();
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(rd(&mut u, LCR), 0x03);
        assert_eq!(rd(&mut u, MSR), MSR_CTS | MSR_DSR | MSR_DCD);
        wr(&mut u, LCR, 0x83);
        assert_eq!((rd(&mut u, DATA), rd(&mut u, IER)), (12, 0));
        wr(&mut u, DATA, 1);
        wr(&mut u, IER, 0);
        wr(&mut u, LCR, 0x03);
        assert_eq!(u.state().dll, 1);
        assert!(u.output().is_empty());
        wr(&mut u, SCR, 0x5a);
        assert_eq!(rd(&mut u, SCR), 0x5a);
        assert_eq!(irq.edges(), 0);
    }

    #[test]
    fn thre_interrupt_and_iir_clear() {
        let (mut u, irq) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER, IER_THRE);
        assert_eq!(irq.edges(), 1);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRE);
        // The read cleared it.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
        wr(&mut u, DATA, b'a');
        assert_eq!(irq.edges(), 2);
        wr(&mut u, DATA, b'b'); // still pending, no new edge
        assert_eq!(irq.edges(), 2);
        assert_eq!(u.output(), b"ab");
        wr(&mut u, IER, 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn out2_gates_the_line() {
        let (mut u, irq) = uart();
        wr(&mut u, IER, IER_RDA);
        u.enqueue_input(b"x");
        assert_eq!(irq.edges(), 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA);
        wr(&mut u, MCR, MCR_OUT2);
        assert_eq!(irq.edges(), 1);
    }

    #[test]
    fn fifo_trigger_levels_and_backpressure() {
        let (mut u, irq) = uart();
        wr(&mut u, MCR, MCR_OUT2);
        wr(&mut u, IER, IER_RDA);
        // Without FIFO: one byte of buffering.
        assert_eq!(u.fifo_free(), 1);
        assert_eq!(u.enqueue_input(b"ab"), 1);
        assert_eq!(u.fifo_free(), 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA);
        assert_eq!(rd(&mut u, DATA), b'a');
        // FIFO on, trigger level 8.
        wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX | 0x80);
        assert_eq!(u.fifo_free(), 16);
        let edges = irq.edges();
        assert_eq!(u.enqueue_input(b"1234"), 4);
        assert_eq!(irq.edges(), edges + 1);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_TIMEOUT);
        assert_eq!(u.enqueue_input(b"5678"), 4);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_RDA);
        assert_eq!(u.enqueue_input(&[0u8; 20]), 8);
        assert_eq!(u.fifo_free(), 0);
        assert_eq!(rd(&mut u, LSR) & (LSR_DR | LSR_OE), LSR_DR);
        let got: Vec<u8> = (0..16).map(|_| rd(&mut u, DATA)).collect();
        assert_eq!(&got[..8], b"12345678");
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_FIFO_ENABLED | IIR_NONE);
        // Clearing the receive FIFO drops what waits.
        u.enqueue_input(b"zz");
        wr(&mut u, IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
    }

    #[test]
    fn priorities() {
        let (mut u, _irq) = uart();
        wr(&mut u, MCR, MCR_OUT2 | MCR_LOOP);
        wr(&mut u, IER, IER_MASK);
        // Overrun in loopback without FIFO: second byte lost.
        wr(&mut u, DATA, 1);
        wr(&mut u, DATA, 2);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RLS);
        let lsr = rd(&mut u, LSR);
        assert_eq!(lsr & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDA);
        assert_eq!(rd(&mut u, DATA), 1);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRE);
        // Modem status changed on entering loopback: CTS and DSR dropped, DCD follows OUT2.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_MS);
        assert_eq!(rd(&mut u, MSR), MSR_DCD | MSR_DCTS | MSR_DDSR);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NONE);
    }

    #[test]
    fn loopback_modem_lines() {
        let (mut u, irq) = uart();
        wr(&mut u, MCR, MCR_LOOP | MCR_RTS | MCR_DTR | MCR_OUT1);
        let _ = rd(&mut u, MSR);
        assert_eq!(rd(&mut u, MSR), MSR_CTS | MSR_DSR | MSR_RI);
        wr(&mut u, MCR, MCR_LOOP);
        assert_eq!(rd(&mut u, MSR), MSR_DCTS | MSR_DDSR | MSR_TERI);
        // Loopback: host input disconnected, TX goes to RX, not to out.
        assert_eq!(u.enqueue_input(b"q"), 0);
        wr(&mut u, DATA, b'L');
        assert_eq!(rd(&mut u, DATA), b'L');
        assert!(u.output().is_empty());
        assert_eq!(irq.edges(), 0);
    }

    #[test]
    fn state_round_trip_and_rejects() {
        let (mut u, irq) = uart();
        wr(&mut u, IIR_FCR, FCR_ENABLE | 0xc0);
        wr(&mut u, IER, IER_THRE | IER_RDA);
        u.enqueue_input(b"abc");
        let s = u.state();
        let json = serde_json::to_string(&s).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        let mut u2 = Serial::from_state(&back, irq, Vec::new()).unwrap();
        assert_eq!(u2.state(), s);
        assert_eq!(rd(&mut u2, DATA), b'a');

        let bad = |f: fn(&mut SerialState)| {
            let mut s = SerialState::default();
            f(&mut s);
            Serial::from_state(&s, Arc::new(RecordingLine::new()), Vec::new()).is_err()
        };
        assert!(bad(|s| s.ier = 0x10));
        assert!(bad(|s| s.rx = vec![1, 2]));
        assert!(bad(|s| {
            s.fcr = 1;
            s.rx = vec![0; 17]
        }));
        assert!(bad(|s| s.msr = 0));
        assert!(bad(|s| s.thre_pending = true));
        assert!(bad(|s| s.mcr = 0x20));
        assert!(!bad(|_| {}));
    }

    #[test]
    fn unknown_offsets_and_wide_accesses_do_not_panic() {
        let (mut u, _irq) = uart();
        let mut b = [0u8; 4];
        u.read(6, &mut b);
        u.read(u64::MAX, &mut b);
        u.write(u64::MAX - 1, &[1, 2, 3]);
        u.write(0, &[]);
    }
}
