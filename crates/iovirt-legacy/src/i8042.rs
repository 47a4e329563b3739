//! The i8042 keyboard controller with an attached AT keyboard and no mouse.
//!
//! Firmware and operating systems talk to the controller through two ports: the
//! data port 0x60 and the status/command port 0x64. Besides the keyboard it
//! carries two system functions: the A20 gate and the CPU reset line, both
//! reported through [`I8042Events`]. The keyboard answers the commands SeaBIOS's
//! `ps2port.c` and Linux's `atkbd`/`i8042` probes send (reset, get ID, enable,
//! disable, LEDs, typematic rate, echo, scancode set). The auxiliary (mouse)
//! port has no device: every byte sent to it through command 0xD4 is answered
//! with 0xFE, so guests decide at once that no mouse is present.
//!
//! Register the device at [`I8042_PORT`] with length [`I8042_LEN`]: offset
//! [`DATA_OFFSET`] is port 0x60, offset [`STATUS_OFFSET`] port 0x64; the other
//! offsets read 0xFF and ignore writes.
//!
//! Not modelled: scancode translation of host input (see
//! [`I8042::queue_scancodes`]), typematic repeat, and the aux interrupt (IRQ 12).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use iovirt_bus::{BusDeviceMut, InterruptLine};
use serde::{Deserialize, Serialize};

/// I/O port base of the controller (data port 0x60).
pub const I8042_PORT: u64 = 0x60;
/// Length of the registered range, covering 0x60..=0x64.
pub const I8042_LEN: u64 = 5;
/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
pub const STATUS_OFFSET: u64 = 4;

/// Status: output buffer full, a byte waits at port 0x60.
pub const STATUS_OBF: u8 = 0x01;
/// Status: input buffer full, the controller has not taken the last write yet (never here).
pub const STATUS_IBF: u8 = 0x02;
/// Status: system flag, set after a successful self test (or via the command byte).
pub const STATUS_SYS: u8 = 0x04;
/// Status: last write went to the command port (1) or the data port (0).
pub const STATUS_CMD: u8 = 0x08;
/// Status: keyboard not inhibited (the keylock switch is open).
pub const STATUS_UNLOCKED: u8 = 0x10;
/// Status: the byte in the output buffer comes from the aux (mouse) port.
pub const STATUS_AUX_OBF: u8 = 0x20;

/// Command byte: raise IRQ 1 when keyboard data fills the output buffer.
pub const CTR_KBDINT: u8 = 0x01;
/// Command byte: raise IRQ 12 when aux data fills the output buffer.
pub const CTR_AUXINT: u8 = 0x02;
/// Command byte: system flag.
pub const CTR_SYS: u8 = 0x04;
/// Command byte: keyboard interface disabled (clock held low).
pub const CTR_KBDDIS: u8 = 0x10;
/// Command byte: aux interface disabled.
pub const CTR_AUXDIS: u8 = 0x20;
/// Command byte: translate keyboard scancodes to set 1.
pub const CTR_XLATE: u8 = 0x40;

/// Output port: system reset line, active low (clearing it resets the CPU).
pub const OUTPORT_RESET: u8 = 0x01;
/// Output port: A20 gate.
pub const OUTPORT_A20: u8 = 0x02;
/// Output port: keyboard output buffer full (read-back only).
pub const OUTPORT_OBF: u8 = 0x10;
/// Output port: aux output buffer full (read-back only).
pub const OUTPORT_AUX_OBF: u8 = 0x20;

/// Controller command: read command byte (internal RAM 0); 0x21-0x3F read RAM 1-31.
pub const CMD_READ_CTR: u8 = 0x20;
/// Controller command: write command byte (next data byte); 0x61-0x7F write RAM 1-31.
pub const CMD_WRITE_CTR: u8 = 0x60;
/// Controller command: disable the aux interface.
pub const CMD_AUX_DISABLE: u8 = 0xa7;
/// Controller command: enable the aux interface.
pub const CMD_AUX_ENABLE: u8 = 0xa8;
/// Controller command: aux interface test (0x00 = OK).
pub const CMD_AUX_TEST: u8 = 0xa9;
/// Controller command: controller self test (0x55 = OK).
pub const CMD_SELF_TEST: u8 = 0xaa;
/// Controller command: keyboard interface test (0x00 = OK).
pub const CMD_KBD_TEST: u8 = 0xab;
/// Controller command: disable the keyboard interface.
pub const CMD_KBD_DISABLE: u8 = 0xad;
/// Controller command: enable the keyboard interface.
pub const CMD_KBD_ENABLE: u8 = 0xae;
/// Controller command: read the input port.
pub const CMD_READ_INPORT: u8 = 0xc0;
/// Controller command: read the output port.
pub const CMD_READ_OUTPORT: u8 = 0xd0;
/// Controller command: write the output port (next data byte).
pub const CMD_WRITE_OUTPORT: u8 = 0xd1;
/// Controller command: put the next data byte in the output buffer as keyboard data.
pub const CMD_WRITE_KBD_OBUF: u8 = 0xd2;
/// Controller command: put the next data byte in the output buffer as aux data.
pub const CMD_WRITE_AUX_OBUF: u8 = 0xd3;
/// Controller command: send the next data byte to the aux device.
pub const CMD_WRITE_AUX: u8 = 0xd4;
/// Controller command: disable A20 (HP/Compaq extension).
pub const CMD_A20_OFF: u8 = 0xdd;
/// Controller command: enable A20.
pub const CMD_A20_ON: u8 = 0xdf;
/// Controller command: pulse output port bit 0 (CPU reset); 0xF0-0xFF pulse the bits that are clear.
pub const CMD_PULSE_RESET: u8 = 0xfe;

/// Keyboard reply: command acknowledged.
pub const KBD_ACK: u8 = 0xfa;
/// Keyboard reply: resend / unknown command.
pub const KBD_RESEND: u8 = 0xfe;
/// Keyboard reply: basic assurance test passed (after reset).
pub const KBD_BAT_OK: u8 = 0xaa;
/// Keyboard reply: echo.
pub const KBD_ECHO: u8 = 0xee;

/// Keyboard command: set LEDs (argument follows).
pub const KBD_CMD_SET_LEDS: u8 = 0xed;
/// Keyboard command: echo.
pub const KBD_CMD_ECHO: u8 = 0xee;
/// Keyboard command: get/set scancode set (argument follows).
pub const KBD_CMD_SCANCODE_SET: u8 = 0xf0;
/// Keyboard command: identify (ACK, 0xAB, 0x83).
pub const KBD_CMD_GET_ID: u8 = 0xf2;
/// Keyboard command: set typematic rate/delay (argument follows).
pub const KBD_CMD_SET_RATE: u8 = 0xf3;
/// Keyboard command: enable scanning.
pub const KBD_CMD_ENABLE: u8 = 0xf4;
/// Keyboard command: disable scanning and restore defaults.
pub const KBD_CMD_DISABLE: u8 = 0xf5;
/// Keyboard command: restore defaults.
pub const KBD_CMD_DEFAULTS: u8 = 0xf6;
/// Keyboard command: resend the last byte.
pub const KBD_CMD_RESEND: u8 = 0xfe;
/// Keyboard command: reset and self test.
pub const KBD_CMD_RESET: u8 = 0xff;

/// Bytes the keyboard buffers before it refuses host input.
pub const KBD_QUEUE_SIZE: usize = 16;
/// Bytes of controller replies that can wait (more is a guest error; they are dropped).
const CTRL_QUEUE_SIZE: usize = 16;
/// Size of the controller's internal RAM (byte 0 is the command byte).
const RAM_SIZE: usize = 32;
/// Power-on command byte: keyboard and aux interrupts enabled (as QEMU).
const DEFAULT_CTR: u8 = CTR_KBDINT | CTR_AUXINT;
/// Power-on output port: reset line high, A20 enabled.
const DEFAULT_OUTPORT: u8 = OUTPORT_RESET | OUTPORT_A20;
/// Input port: keyboard not inhibited.
const INPORT: u8 = 0x80;

/// Side effects of the controller the VMM must act on.
pub trait I8042Events: Send {
    /// The guest pulsed or cleared the CPU reset line: reset the machine.
    fn reset_requested(&mut self);
    /// The guest changed the A20 gate.
    fn a20_changed(&mut self, _enabled: bool) {}
}

/// Events sink that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEvents;

impl I8042Events for NoEvents {
    fn reset_requested(&mut self) {}
}

/// Why an [`I8042State`] cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042StateError {
    /// A queue holds more bytes than it can.
    #[error("i8042 {queue} queue holds {len} bytes, capacity {capacity}")]
    QueueOverflow {
        /// Which queue.
        queue: &'static str,
        /// Bytes in the snapshot.
        len: usize,
        /// Its capacity.
        capacity: usize,
    },
    /// The controller waits for a data byte after a command that takes none.
    #[error("i8042 pending controller command {0:#04x} takes no data byte")]
    BadPendingCommand(u8),
    /// The keyboard waits for an argument of a command that takes none.
    #[error("i8042 keyboard pending command {0:#04x} takes no argument")]
    BadKeyboardCommand(u8),
    /// Scancode set other than 1, 2 or 3.
    #[error("i8042 keyboard scancode set {0} does not exist")]
    BadScancodeSet(u8),
    /// Internal RAM image of the wrong size.
    #[error("i8042 RAM image is {0} bytes, expected 32")]
    RamSize(usize),
}

/// State of the keyboard behind the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyboardState {
    /// Bytes the keyboard is waiting to send, oldest first.
    pub queue: Vec<u8>,
    /// Scanning enabled (keys are reported).
    pub scanning: bool,
    /// A command waiting for its argument byte (0xED, 0xF0 or 0xF3).
    pub pending: Option<u8>,
    /// Scancode set, 1 to 3.
    pub scancode_set: u8,
    /// LED state from the last 0xED command.
    pub leds: u8,
    /// Typematic byte from the last 0xF3 command.
    pub typematic: u8,
    /// Last byte sent, for 0xFE (resend).
    pub last_sent: u8,
}

impl Default for KeyboardState {
    fn default() -> Self {
        KeyboardState {
            queue: Vec::new(),
            scanning: true,
            pending: None,
            scancode_set: 2,
            leds: 0,
            typematic: 0x2b,
            last_sent: 0,
        }
    }
}

/// Serialisable state of the [`I8042`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Internal RAM; byte 0 is the command byte.
    pub ram: Vec<u8>,
    /// Output port (reset and A20 bits).
    pub outport: u8,
    /// System flag in the status register.
    pub sys_flag: bool,
    /// Last write went to the command port.
    pub last_was_command: bool,
    /// Controller command waiting for its data byte.
    pub pending_command: Option<u8>,
    /// The output buffer: byte and whether it is aux data.
    pub obf: Option<(u8, bool)>,
    /// Last byte read from the data port (read again when the buffer is empty).
    pub last_read: u8,
    /// Controller replies waiting for the output buffer: byte and aux flag.
    pub controller_queue: Vec<(u8, bool)>,
    /// The keyboard.
    pub keyboard: KeyboardState,
}

impl Default for I8042State {
    fn default() -> Self {
        let mut ram = vec![0; RAM_SIZE];
        ram[0] = DEFAULT_CTR;
        I8042State {
            ram,
            outport: DEFAULT_OUTPORT,
            sys_flag: false,
            last_was_command: true,
            pending_command: None,
            obf: None,
            last_read: 0,
            controller_queue: Vec::new(),
            keyboard: KeyboardState::default(),
        }
    }
}

/// The i8042 controller with its keyboard.
///
/// ```
/// use std::sync::Arc;
/// use iovirt_bus::interrupt::test_doubles::RecordingLine;
/// use iovirt_bus::BusDeviceMut;
/// use iovirt_legacy::i8042::{I8042, I8042Events, STATUS_OBF};
///
/// struct Machine { resets: u32 }
/// impl I8042Events for Machine {
///     fn reset_requested(&mut self) { self.resets += 1 }
/// }
///
/// let irq = Arc::new(RecordingLine::new());
/// let mut kbc = I8042::new(irq.clone(), Box::new(Machine { resets: 0 }));
/// let mut b = [0u8];
///
/// // Controller self test.
/// kbc.write(4, &[0xaa]);
/// kbc.read(4, &mut b);
/// assert_ne!(b[0] & STATUS_OBF, 0);
/// kbc.read(0, &mut b);
/// assert_eq!(b[0], 0x55);
///
/// // A key press from the host raises IRQ 1.
/// let before = irq.edges();
/// assert_eq!(kbc.queue_scancodes(&[0x1e]), 1);
/// assert_eq!(irq.edges(), before + 1);
/// kbc.read(0, &mut b);
/// assert_eq!(b[0], 0x1e);
/// ```
pub struct I8042 {
    ram: [u8; RAM_SIZE],
    outport: u8,
    sys_flag: bool,
    last_was_command: bool,
    pending_command: Option<u8>,
    obf: Option<(u8, bool)>,
    last_read: u8,
    controller_queue: VecDeque<(u8, bool)>,
    kbd: KeyboardState,
    kbd_queue: VecDeque<u8>,
    irq: Arc<dyn InterruptLine>,
    events: Box<dyn I8042Events>,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn takes_data(cmd: u8) -> bool {
    matches!(cmd, 0x60..=0x7f | CMD_WRITE_OUTPORT..=CMD_WRITE_AUX)
}

impl I8042 {
    /// A controller in its power-on state raising `kbd_irq` (IRQ 1) and reporting to `events`.
    pub fn new(kbd_irq: Arc<dyn InterruptLine>, events: Box<dyn I8042Events>) -> Self {
        // The default state is valid by construction.
        let s = I8042State::default();
        let mut ram = [0; RAM_SIZE];
        ram[0] = DEFAULT_CTR;
        I8042 {
            ram,
            outport: s.outport,
            sys_flag: s.sys_flag,
            last_was_command: s.last_was_command,
            pending_command: None,
            obf: None,
            last_read: 0,
            controller_queue: VecDeque::new(),
            kbd: s.keyboard,
            kbd_queue: VecDeque::new(),
            irq: kbd_irq,
            events,
        }
    }

    /// Restore from `state`, rejecting impossible states. Raises no interrupt.
    pub fn from_state(
        state: &I8042State,
        kbd_irq: Arc<dyn InterruptLine>,
        events: Box<dyn I8042Events>,
    ) -> Result<Self, I8042StateError> {
        let ram: [u8; RAM_SIZE] = state
            .ram
            .as_slice()
            .try_into()
            .map_err(|_| I8042StateError::RamSize(state.ram.len()))?;
        let cap = |queue, len, capacity| {
            if len > capacity {
                Err(I8042StateError::QueueOverflow {
                    queue,
                    len,
                    capacity,
                })
            } else {
                Ok(())
            }
        };
        cap("keyboard", state.keyboard.queue.len(), KBD_QUEUE_SIZE)?;
        cap("controller", state.controller_queue.len(), CTRL_QUEUE_SIZE)?;
        if let Some(c) = state.pending_command {
            if !takes_data(c) {
                return Err(I8042StateError::BadPendingCommand(c));
            }
        }
        if let Some(c) = state.keyboard.pending {
            if !matches!(
                c,
                KBD_CMD_SET_LEDS | KBD_CMD_SCANCODE_SET | KBD_CMD_SET_RATE
            ) {
                return Err(I8042StateError::BadKeyboardCommand(c));
            }
        }
        if !(1..=3).contains(&state.keyboard.scancode_set) {
            return Err(I8042StateError::BadScancodeSet(state.keyboard.scancode_set));
        }
        let mut kbd = state.keyboard.clone();
        let kbd_queue = std::mem::take(&mut kbd.queue).into();
        Ok(I8042 {
            ram,
            outport: state.outport,
            sys_flag: state.sys_flag,
            last_was_command: state.last_was_command,
            pending_command: state.pending_command,
            obf: state.obf,
            last_read: state.last_read,
            controller_queue: state.controller_queue.iter().copied().collect(),
            kbd,
            kbd_queue,
            irq: kbd_irq,
            events,
        })
    }

    /// The state to snapshot.
    pub fn state(&self) -> I8042State {
        let mut keyboard = self.kbd.clone();
        keyboard.queue = self.kbd_queue.iter().copied().collect();
        I8042State {
            ram: self.ram.to_vec(),
            outport: self.outport,
            sys_flag: self.sys_flag,
            last_was_command: self.last_was_command,
            pending_command: self.pending_command,
            obf: self.obf,
            last_read: self.last_read,
            controller_queue: self.controller_queue.iter().copied().collect(),
            keyboard,
        }
    }

    /// Queue bytes from the host keyboard; returns how many were accepted.
    ///
    /// The bytes must already be in the form the guest expects at port 0x60:
    /// set 1 codes when [`translating`](Self::translating) is on (the usual
    /// case after firmware set up the controller), otherwise codes of
    /// [`scancode_set`](Self::scancode_set). When the keyboard's scanning is
    /// disabled nothing is accepted (a real keyboard drops those keys); when its
    /// buffer is full the rest is refused so the caller can retry.
    pub fn queue_scancodes(&mut self, bytes: &[u8]) -> usize {
        if !self.kbd.scanning {
            return 0;
        }
        let n = bytes
            .len()
            .min(KBD_QUEUE_SIZE.saturating_sub(self.kbd_queue.len()));
        self.kbd_queue.extend(&bytes[..n]);
        self.refill();
        n
    }

    /// Whether the controller translates keyboard output to scancode set 1.
    pub fn translating(&self) -> bool {
        self.ctr() & CTR_XLATE != 0
    }

    /// The scancode set the guest selected on the keyboard (1 to 3).
    pub fn scancode_set(&self) -> u8 {
        self.kbd.scancode_set
    }

    /// Keyboard LED state (bit 0 scroll, 1 num, 2 caps lock).
    pub fn leds(&self) -> u8 {
        self.kbd.leds
    }

    /// Whether the A20 gate is enabled.
    pub fn a20_enabled(&self) -> bool {
        self.outport & OUTPORT_A20 != 0
    }

    fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if let Some((_, aux)) = self.obf {
            s |= STATUS_OBF;
            if aux {
                s |= STATUS_AUX_OBF;
            }
        }
        if self.sys_flag {
            s |= STATUS_SYS;
        }
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn raise_if_kbd_data(&self) {
        if let Some((_, false)) = self.obf {
            if self.ctr() & CTR_KBDINT != 0 {
                if let Err(e) = self.irq.trigger() {
                    log::warn!("i8042: IRQ 1 delivery failed: {e}");
                }
            }
        }
    }

    /// Move the next waiting byte into an empty output buffer.
    fn refill(&mut self) {
        if self.obf.is_some() {
            return;
        }
        let next = if let Some(b) = self.controller_queue.pop_front() {
            Some(b)
        } else if self.ctr() & CTR_KBDDIS == 0 {
            self.kbd_queue.pop_front().map(|b| (b, false))
        } else {
            None
        };
        if let Some(b) = next {
            self.obf = Some(b);
            self.raise_if_kbd_data();
        }
    }

    fn reply(&mut self, byte: u8, aux: bool) {
        if self.controller_queue.len() >= CTRL_QUEUE_SIZE {
            log::debug!("i8042: controller reply {byte:#04x} dropped, queue full");
            return;
        }
        self.controller_queue.push_back((byte, aux));
        self.refill();
    }

    fn kbd_send(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.kbd_queue.len() >= KBD_QUEUE_SIZE {
                log::debug!("i8042: keyboard reply {b:#04x} dropped, queue full");
                break;
            }
            self.kbd_queue.push_back(b);
            self.kbd.last_sent = b;
        }
        self.refill();
    }

    fn set_ctr(&mut self, v: u8) {
        self.ram[0] = v;
        self.sys_flag = v & CTR_SYS != 0;
        // A level-triggered output would now be asserted; deliver the edge.
        self.raise_if_kbd_data();
        self.refill();
    }

    fn set_ctr_bits(&mut self, set: u8, clear: u8) {
        let v = (self.ctr() | set) & !clear;
        self.ram[0] = v;
        self.refill();
    }

    fn write_outport(&mut self, v: u8) {
        let old = self.outport;
        self.outport = v & (OUTPORT_RESET | OUTPORT_A20);
        if (old ^ self.outport) & OUTPORT_A20 != 0 {
            self.events.a20_changed(self.a20_enabled());
        }
        if v & OUTPORT_RESET == 0 {
            // The reset line is held low: the CPU resets; the line comes back up.
            self.outport |= OUTPORT_RESET;
            self.events.reset_requested();
        }
    }

    fn set_a20(&mut self, on: bool) {
        let v = if on {
            self.outport | OUTPORT_A20
        } else {
            self.outport & !OUTPORT_A20
        };
        self.write_outport(v | OUTPORT_RESET);
    }

    fn controller_command(&mut self, cmd: u8) {
        self.pending_command = None;
        match cmd {
            0x20..=0x3f => self.reply(self.ram[usize::from(cmd & 0x1f)], false),
            c if takes_data(c) => self.pending_command = Some(c),
            CMD_AUX_DISABLE => self.set_ctr_bits(CTR_AUXDIS, 0),
            CMD_AUX_ENABLE => self.set_ctr_bits(0, CTR_AUXDIS),
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(0x00, false),
            CMD_SELF_TEST => {
                self.sys_flag = true;
                self.ram[0] |= CTR_SYS;
                self.reply(0x55, false);
            }
            CMD_KBD_DISABLE => self.set_ctr_bits(CTR_KBDDIS, 0),
            CMD_KBD_ENABLE => self.set_ctr_bits(0, CTR_KBDDIS),
            CMD_READ_INPORT => self.reply(INPORT, false),
            CMD_READ_OUTPORT => {
                let mut v = self.outport;
                match self.obf {
                    Some((_, false)) => v |= OUTPORT_OBF,
                    Some((_, true)) => v |= OUTPORT_AUX_OBF,
                    None => {}
                }
                self.reply(v, false);
            }
            CMD_A20_OFF => self.set_a20(false),
            CMD_A20_ON => self.set_a20(true),
            0xe0 => self.reply(0x00, false), // read test inputs
            0xf0..=0xff => {
                if cmd & OUTPORT_RESET == 0 {
                    self.events.reset_requested();
                }
            }
            _ => log::debug!("i8042: unknown controller command {cmd:#04x} ignored"),
        }
    }

    fn controller_data(&mut self, cmd: u8, v: u8) {
        match cmd {
            CMD_WRITE_CTR => self.set_ctr(v),
            0x61..=0x7f => self.ram[usize::from(cmd & 0x1f)] = v,
            CMD_WRITE_OUTPORT => self.write_outport(v),
            CMD_WRITE_KBD_OBUF => self.reply(v, false),
            CMD_WRITE_AUX_OBUF => self.reply(v, true),
            CMD_WRITE_AUX => {
                // No aux device: the controller reports the byte as not accepted.
                self.set_ctr_bits(0, CTR_AUXDIS);
                self.reply(KBD_RESEND, true);
            }
            _ => {}
        }
    }

    fn keyboard_byte(&mut self, v: u8) {
        if let Some(cmd) = self.kbd.pending.take() {
            match cmd {
                KBD_CMD_SET_LEDS => {
                    self.kbd.leds = v & 0x07;
                    self.kbd_send(&[KBD_ACK]);
                }
                KBD_CMD_SET_RATE => {
                    self.kbd.typematic = v & 0x7f;
                    self.kbd_send(&[KBD_ACK]);
                }
                _ => match v {
                    0 => {
                        let set = if self.translating() {
                            // The reply passes through translation like any byte.
                            match self.kbd.scancode_set {
                                1 => 0x43,
                                2 => 0x41,
                                _ => 0x3f,
                            }
                        } else {
                            self.kbd.scancode_set
                        };
                        self.kbd_send(&[KBD_ACK, set]);
                    }
                    1..=3 => {
                        self.kbd.scancode_set = v;
                        self.kbd_send(&[KBD_ACK]);
                    }
                    _ => self.kbd_send(&[KBD_RESEND]),
                },
            }
            return;
        }
        match v {
            KBD_CMD_SET_LEDS | KBD_CMD_SET_RATE | KBD_CMD_SCANCODE_SET => {
                self.kbd.pending = Some(v);
                self.kbd_send(&[KBD_ACK]);
            }
            KBD_CMD_ECHO => self.kbd_send(&[KBD_ECHO]),
            KBD_CMD_GET_ID => {
                let second = if self.translating() { 0x41 } else { 0x83 };
                self.kbd_send(&[KBD_ACK, 0xab, second]);
            }
            KBD_CMD_ENABLE => {
                self.kbd_queue.clear();
                self.kbd.scanning = true;
                self.kbd_send(&[KBD_ACK]);
            }
            KBD_CMD_DISABLE | KBD_CMD_DEFAULTS => {
                self.kbd.scanning = v == KBD_CMD_DEFAULTS && self.kbd.scanning;
                self.kbd.scancode_set = 2;
                self.kbd.typematic = KeyboardState::default().typematic;
                self.kbd_send(&[KBD_ACK]);
            }
            0xf7..=0xfd => self.kbd_send(&[KBD_ACK]), // set-3 key modes: accepted, no effect
            KBD_CMD_RESEND => {
                let last = self.kbd.last_sent;
                self.kbd_send(&[last]);
            }
            KBD_CMD_RESET => {
                self.kbd_queue.clear();
                self.kbd = KeyboardState::default();
                self.kbd_send(&[KBD_ACK, KBD_BAT_OK]);
            }
            _ => self.kbd_send(&[KBD_RESEND]),
        }
    }
}

impl BusDeviceMut for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DATA_OFFSET => {
                if let Some((b, _)) = self.obf.take() {
                    self.last_read = b;
                }
                let v = self.last_read;
                self.refill();
                v
            }
            STATUS_OFFSET => self.status(),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            DATA_OFFSET => {
                self.last_was_command = false;
                match self.pending_command.take() {
                    Some(cmd) => self.controller_data(cmd, v),
                    None => self.keyboard_byte(v),
                }
            }
            STATUS_OFFSET => {
                self.last_was_command = true;
                self.controller_command(v);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_bus::interrupt::test_doubles::RecordingLine;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log {
        resets: u32,
        a20: Vec<bool>,
    }
    struct Ev(Arc<Mutex<Log>>);
    impl I8042Events for Ev {
        fn reset_requested(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn a20_changed(&mut self, enabled: bool) {
            self.0.lock().unwrap().a20.push(enabled);
        }
    }

    fn kbc() -> (I8042, Arc<RecordingLine>, Arc<Mutex<Log>>) {
        let irq = Arc::new(RecordingLine::new());
        let log = Arc::new(Mutex::new(Log::default()));
        (I8042::new(irq.clone(), Box::new(Ev(log.clone()))), irq, log)
    }

    fn status(k: &mut I8042) -> u8 {
        let mut b = [0];
        k.read(STATUS_OFFSET, &mut b);
        b[0]
    }

    /// Read every byte waiting, as a polling driver does.
    fn drain(k: &mut I8042) -> Vec<(u8, bool)> {
        let mut out = Vec::new();
        for _ in 0..64 {
            let s = status(k);
            if s & STATUS_OBF == 0 {
                break;
            }
            let mut b = [0];
            k.read(DATA_OFFSET, &mut b);
            out.push((b[0], s & STATUS_AUX_OBF != 0));
        }
        out
    }

    fn bytes(v: Vec<(u8, bool)>) -> Vec<u8> {
        v.into_iter().map(|(b, _)| b).collect()
    }

    fn cmd(k: &mut I8042, c: u8) {
        k.write(STATUS_OFFSET, &[c]);
    }

    fn data(k: &mut I8042, d: u8) {
        k.write(DATA_OFFSET, &[d]);
    }

    /// The sequence of SeaBIOS's ps2_keyboard_setup, with its CTR juggling.
    #[test]
    fn seabios_keyboard_setup() {
        let (mut k, irq, _log) = kbc();
        assert!(drain(&mut k).is_empty());
        cmd(&mut k, CMD_SELF_TEST);
        assert_eq!(bytes(drain(&mut k)), [0x55]);
        assert_ne!(status(&mut k) & STATUS_SYS, 0);
        cmd(&mut k, CMD_KBD_TEST);
        assert_eq!(bytes(drain(&mut k)), [0x00]);
        // Those replies interrupted (power-on CTR has KBDINT); the rest must not.
        let e0 = irq.edges();
        let base = CTR_KBDDIS | CTR_AUXDIS;
        let ps2_command = |k: &mut I8042, ctr: u8, send: &[u8]| -> Vec<u8> {
            let quiet = (ctr | CTR_AUXDIS | CTR_KBDDIS) & !(CTR_KBDINT | CTR_AUXINT);
            cmd(k, CMD_WRITE_CTR);
            data(k, quiet);
            cmd(k, CMD_WRITE_CTR);
            data(k, quiet & !CTR_KBDDIS);
            let mut got = Vec::new();
            for &b in send {
                data(k, b);
                got.extend(bytes(drain(k)));
            }
            cmd(k, CMD_WRITE_CTR);
            data(k, ctr);
            got
        };
        assert_eq!(ps2_command(&mut k, base, &[0xff]), [KBD_ACK, KBD_BAT_OK]);
        assert_eq!(ps2_command(&mut k, base, &[0xf5]), [KBD_ACK]);
        assert_eq!(ps2_command(&mut k, base, &[0xf0, 0x02]), [KBD_ACK, KBD_ACK]);
        let run = CTR_AUXDIS | CTR_XLATE | CTR_KBDINT;
        assert_eq!(ps2_command(&mut k, run, &[0xf4]), [KBD_ACK]);
        assert_eq!(irq.edges(), e0);
        // A key now interrupts.
        assert_eq!(k.queue_scancodes(&[0x1e, 0x9e]), 2);
        assert_eq!(irq.edges(), e0 + 1);
        assert_eq!(drain(&mut k), [(0x1e, false), (0x9e, false)]);
        assert_eq!(irq.edges(), e0 + 2);
        // Command byte reads back.
        cmd(&mut k, CMD_READ_CTR);
        assert_eq!(bytes(drain(&mut k)), [run]);
    }

    #[test]
    fn keyboard_commands() {
        let (mut k, _irq, _log) = kbc();
        data(&mut k, KBD_CMD_GET_ID);
        assert_eq!(bytes(drain(&mut k)), [KBD_ACK, 0xab, 0x83]);
        cmd(&mut k, CMD_WRITE_CTR);
        data(&mut k, CTR_XLATE);
        data(&mut k, KBD_CMD_GET_ID);
        assert_eq!(bytes(drain(&mut k)), [KBD_ACK, 0xab, 0x41]);
        data(&mut k, KBD_CMD_SET_LEDS);
        data(&mut k, 0x07);
        assert_eq!(k.leds(), 7);
        data(&mut k, KBD_CMD_SET_RATE);
        data(&mut k, 0x20);
        data(&mut k, KBD_CMD_ECHO);
        data(&mut k, 0x12); // unknown
        assert_eq!(
            bytes(drain(&mut k)),
            [KBD_ACK, KBD_ACK, KBD_ACK, KBD_ACK, KBD_ECHO, KBD_RESEND]
        );
        data(&mut k, KBD_CMD_SCANCODE_SET);
        data(&mut k, 0);
        assert_eq!(bytes(drain(&mut k)), [KBD_ACK, KBD_ACK, 0x41]);
        data(&mut k, KBD_CMD_SCANCODE_SET);
        data(&mut k, 9);
        assert_eq!(bytes(drain(&mut k)), [KBD_ACK, KBD_RESEND]);
        // Disabled scanning takes no keys.
        data(&mut k, KBD_CMD_DISABLE);
        assert_eq!(k.queue_scancodes(b"a"), 0);
        data(&mut k, KBD_CMD_ENABLE);
        assert_eq!(bytes(drain(&mut k)), [KBD_ACK, KBD_ACK]);
        // Back-pressure at 16 bytes; the interface disabled holds them back.
        cmd(&mut k, CMD_KBD_DISABLE);
        assert_eq!(k.queue_scancodes(&[1; 20]), 16);
        assert!(drain(&mut k).is_empty());
        cmd(&mut k, CMD_KBD_ENABLE);
        assert_eq!(drain(&mut k).len(), 16);
    }

    #[test]
    fn aux_is_absent() {
        let (mut k, _irq, _log) = kbc();
        cmd(&mut k, CMD_AUX_TEST);
        assert_eq!(drain(&mut k), [(0x00, false)]);
        cmd(&mut k, CMD_WRITE_AUX);
        data(&mut k, 0xf2);
        assert_eq!(drain(&mut k), [(KBD_RESEND, true)]);
        // Loopback through the aux output buffer (Linux's AUX_LOOP probe).
        cmd(&mut k, CMD_WRITE_AUX_OBUF);
        data(&mut k, 0x5a);
        assert_eq!(drain(&mut k), [(0x5a, true)]);
        cmd(&mut k, CMD_WRITE_KBD_OBUF);
        data(&mut k, 0x33);
        assert_eq!(drain(&mut k), [(0x33, false)]);
    }

    #[test]
    fn reset_and_a20() {
        let (mut k, _irq, log) = kbc();
        cmd(&mut k, CMD_READ_OUTPORT);
        assert_eq!(bytes(drain(&mut k)), [OUTPORT_RESET | OUTPORT_A20]);
        cmd(&mut k, CMD_A20_OFF);
        assert!(!k.a20_enabled());
        cmd(&mut k, CMD_A20_ON);
        cmd(&mut k, CMD_WRITE_OUTPORT);
        data(&mut k, OUTPORT_RESET); // A20 off via the output port
        assert_eq!(log.lock().unwrap().a20, [false, true, false]);
        assert_eq!(log.lock().unwrap().resets, 0);
        cmd(&mut k, CMD_PULSE_RESET);
        assert_eq!(log.lock().unwrap().resets, 1);
        cmd(&mut k, 0xff); // pulses nothing
        cmd(&mut k, CMD_WRITE_OUTPORT);
        data(&mut k, 0x02); // reset bit clear
        assert_eq!(log.lock().unwrap().resets, 2);
        cmd(&mut k, CMD_KBD_ENABLE);
        assert_ne!(status(&mut k) & STATUS_CMD, 0);
        data(&mut k, 0xf4);
        assert_eq!(status(&mut k) & STATUS_CMD, 0);
    }

    #[test]
    fn other_offsets_and_state() {
        let (mut k, irq, _log) = kbc();
        let mut b = [0u8; 2];
        k.read(2, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        k.write(1, &[0xfe]);
        k.write(0, &[]);
        data(&mut k, KBD_CMD_SET_LEDS);
        k.queue_scancodes(&[5, 6]);
        let s = k.state();
        let back: I8042State = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        let k2 = I8042::from_state(&back, irq.clone(), Box::new(NoEvents)).unwrap();
        assert_eq!(k2.state(), s);
        let bad = |f: fn(&mut I8042State)| {
            let mut s = I8042State::default();
            f(&mut s);
            I8042::from_state(&s, Arc::new(RecordingLine::new()), Box::new(NoEvents)).is_err()
        };
        assert!(!bad(|_| {}));
        assert!(bad(|s| s.ram.push(0)));
        assert!(bad(|s| s.keyboard.queue = vec![0; 17]));
        assert!(bad(|s| s.pending_command = Some(0xaa)));
        assert!(bad(|s| s.keyboard.pending = Some(0xf4)));
        assert!(bad(|s| s.keyboard.scancode_set = 0));
    }
}
