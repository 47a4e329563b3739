//! The MC146818 real-time clock and its battery-backed CMOS RAM.
//!
//! Firmware reads the time and the memory size from here; operating systems
//! read the time at boot and may use its periodic, alarm and update-ended
//! interrupts on IRQ 8. Guest time is host time plus an offset the guest sets
//! by writing the time registers, so the model keeps no ticking counter: every
//! time register read is computed from an injected [`Clock`], and the interrupt
//! flags in register C are brought up to date lazily (on each register C read
//! and in [`Rtc::poll`]). A VMM arms a timer with [`Rtc::next_event`] and calls
//! [`Rtc::poll`] when it fires.
//!
//! Register the device at [`RTC_PORT`] with length [`RTC_LEN`]: offset 0 is the
//! index port (bit 7 = NMI disable), offset 1 the data port.
//!
//! Not modelled: the divider-chain reset (register A DV bits are stored only),
//! the square-wave output, and daylight-saving switching (register B DSE).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iovirt_bus::{BusDeviceMut, InterruptLine};
use serde::{Deserialize, Serialize};

/// I/O port base of the RTC (index at +0, data at +1).
pub const RTC_PORT: u64 = 0x70;
/// Length of the port range.
pub const RTC_LEN: u64 = 2;
/// Size of the CMOS address space, clock registers included.
pub const NVRAM_SIZE: usize = 128;

/// Index port bit: NMI disable (kept, reported by [`Rtc::nmi_disabled`]).
pub const INDEX_NMI_DISABLE: u8 = 0x80;

/// Register: seconds.
pub const REG_SECONDS: u8 = 0x00;
/// Register: seconds alarm.
pub const REG_SECONDS_ALARM: u8 = 0x01;
/// Register: minutes.
pub const REG_MINUTES: u8 = 0x02;
/// Register: minutes alarm.
pub const REG_MINUTES_ALARM: u8 = 0x03;
/// Register: hours (bit 7 = PM in 12-hour mode).
pub const REG_HOURS: u8 = 0x04;
/// Register: hours alarm.
pub const REG_HOURS_ALARM: u8 = 0x05;
/// Register: day of week, 1 = Sunday.
pub const REG_DAY_OF_WEEK: u8 = 0x06;
/// Register: day of month.
pub const REG_DAY_OF_MONTH: u8 = 0x07;
/// Register: month.
pub const REG_MONTH: u8 = 0x08;
/// Register: year within the century.
pub const REG_YEAR: u8 = 0x09;
/// Register A: UIP and rate/divider selection.
pub const REG_A: u8 = 0x0a;
/// Register B: interrupt enables, SET, data mode, 12/24 hours.
pub const REG_B: u8 = 0x0b;
/// Register C: interrupt flags, cleared by reading.
pub const REG_C: u8 = 0x0c;
/// Register D: valid RAM and time.
pub const REG_D: u8 = 0x0d;
/// CMOS byte holding the century, in the same format as the year (IBM PC convention).
pub const REG_CENTURY: u8 = 0x32;

/// Register A: update in progress, time registers are about to change.
pub const REG_A_UIP: u8 = 0x80;
/// Register A: divider bits (010 = 32.768 kHz time base, normal operation).
pub const REG_A_DV_MASK: u8 = 0x70;
/// Register A: periodic interrupt rate select (0 = off).
pub const REG_A_RS_MASK: u8 = 0x0f;
/// Register B: SET, freeze the time registers so the guest can write them.
pub const REG_B_SET: u8 = 0x80;
/// Register B: periodic interrupt enable.
pub const REG_B_PIE: u8 = 0x40;
/// Register B: alarm interrupt enable.
pub const REG_B_AIE: u8 = 0x20;
/// Register B: update-ended interrupt enable.
pub const REG_B_UIE: u8 = 0x10;
/// Register B: square-wave output enable (no effect here).
pub const REG_B_SQWE: u8 = 0x08;
/// Register B: data mode, set = binary, clear = BCD.
pub const REG_B_DM_BINARY: u8 = 0x04;
/// Register B: set = 24-hour mode, clear = 12-hour mode with the PM bit.
pub const REG_B_24H: u8 = 0x02;
/// Register B: daylight saving enable (stored, no effect here).
pub const REG_B_DSE: u8 = 0x01;
/// Register C: some enabled flag is set (the IRQ output).
pub const REG_C_IRQF: u8 = 0x80;
/// Register C: periodic interrupt flag.
pub const REG_C_PF: u8 = 0x40;
/// Register C: alarm flag.
pub const REG_C_AF: u8 = 0x20;
/// Register C: update-ended flag.
pub const REG_C_UF: u8 = 0x10;
/// Register D: valid RAM and time (the battery is good).
pub const REG_D_VRT: u8 = 0x80;
/// Hours register bit: PM in 12-hour mode.
pub const HOURS_PM: u8 = 0x80;
/// Alarm register values from here up match any value ("don't care").
pub const ALARM_DONT_CARE: u8 = 0xc0;

/// How long before each second boundary register A reports UIP (244 µs).
pub const UIP_WINDOW: Duration = Duration::from_micros(244);

/// CMOS: base memory in KiB, low byte.
pub const CMOS_BASE_MEM_LOW: u8 = 0x15;
/// CMOS: base memory in KiB, high byte.
pub const CMOS_BASE_MEM_HIGH: u8 = 0x16;
/// CMOS: extended memory above 1 MiB in KiB, low byte (copy at 0x30).
pub const CMOS_EXT_MEM_LOW: u8 = 0x17;
/// CMOS: extended memory above 1 MiB in KiB, high byte (copy at 0x31).
pub const CMOS_EXT_MEM_HIGH: u8 = 0x18;
/// CMOS: extended memory above 1 MiB in KiB as POST counted it, low byte.
pub const CMOS_MEM_EXTMEM_LOW: u8 = 0x30;
/// CMOS: extended memory above 1 MiB in KiB as POST counted it, high byte.
pub const CMOS_MEM_EXTMEM_HIGH: u8 = 0x31;
/// CMOS: memory between 16 MiB and 4 GiB in 64 KiB units, low byte (SeaBIOS's RamSize).
pub const CMOS_MEM_EXTMEM2_LOW: u8 = 0x34;
/// CMOS: memory between 16 MiB and 4 GiB in 64 KiB units, high byte.
pub const CMOS_MEM_EXTMEM2_HIGH: u8 = 0x35;
/// CMOS: memory above 4 GiB in 64 KiB units, bits 0-7.
pub const CMOS_MEM_HIGHMEM_LOW: u8 = 0x5b;
/// CMOS: memory above 4 GiB in 64 KiB units, bits 8-15.
pub const CMOS_MEM_HIGHMEM_MID: u8 = 0x5c;
/// CMOS: memory above 4 GiB in 64 KiB units, bits 16-23.
pub const CMOS_MEM_HIGHMEM_HIGH: u8 = 0x5d;
/// CMOS: number of CPUs minus one (SeaBIOS's CMOS_BIOS_SMP_COUNT).
pub const CMOS_BIOS_SMP_COUNT: u8 = 0x5f;

/// Ticks of the 32.768 kHz time base per second.
const TICKS_PER_SEC: u128 = 32768;
const NANOS: i128 = 1_000_000_000;
/// Guest calendar limits: years 0..=9999 fit the century and year registers.
const MAX_YEAR: i64 = 9999;
/// Largest offset between guest and host time a snapshot may carry.
const MAX_OFFSET_SECS: i64 = 10_000 * 366 * 86_400;

/// Where the RTC reads host time.
pub trait Clock: Send {
    /// The current host wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The host's real wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Clone, Debug)]
pub struct TestClock(Arc<Mutex<SystemTime>>);

impl TestClock {
    /// A clock reading `start`.
    pub fn new(start: SystemTime) -> Self {
        TestClock(Arc::new(Mutex::new(start)))
    }
    /// A clock reading `secs` seconds after the UNIX epoch.
    pub fn at_unix(secs: u64) -> Self {
        Self::new(UNIX_EPOCH + Duration::from_secs(secs))
    }
    /// Move the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t = t.checked_add(d).unwrap_or(*t);
    }
    /// Set the clock to `t`.
    pub fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }
}

impl Clock for TestClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why an [`RtcState`] or a host request was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RtcError {
    /// The NVRAM image is not 128 bytes.
    #[error("RTC NVRAM image is {0} bytes, expected 128")]
    NvramSize(usize),
    /// An index beyond the CMOS address space, or a clock register the host may not set.
    #[error("CMOS index {0:#04x} is not a plain NVRAM byte")]
    BadIndex(u8),
    /// A register holds a bit that cannot be set.
    #[error("RTC register {register} has impossible value {value:#04x}")]
    BadRegister {
        /// Register name.
        register: &'static str,
        /// Its value.
        value: u8,
    },
    /// SET mode and the latched time disagree, or the latched time is not a valid date.
    #[error("RTC set-mode time is missing, spurious or invalid")]
    BadLatchedTime,
    /// The guest clock offset is beyond the calendar the registers can express.
    #[error("RTC clock offset {0} s is out of range")]
    BadOffset(i64),
}

/// A calendar time in binary fields, as the guest sees it in the registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalendarTime {
    /// Full year, 0..=9999.
    pub year: u16,
    /// Month, 1..=12.
    pub month: u8,
    /// Day of month, 1..=31.
    pub day: u8,
    /// Hour, 0..=23.
    pub hour: u8,
    /// Minute, 0..=59.
    pub minute: u8,
    /// Second, 0..=59.
    pub second: u8,
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u8) -> u8 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's method).
fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl CalendarTime {
    /// The calendar time `secs` seconds after the UNIX epoch, clamped to years 0..=9999.
    pub fn from_unix(secs: i64) -> Self {
        let lo = days_from_civil(0, 1, 1) * 86_400;
        let hi = days_from_civil(MAX_YEAR + 1, 1, 1) * 86_400 - 1;
        let secs = secs.clamp(lo, hi);
        let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
        let sod = secs.rem_euclid(86_400);
        CalendarTime {
            year: y as u16,
            month: m,
            day: d,
            hour: (sod / 3600) as u8,
            minute: (sod / 60 % 60) as u8,
            second: (sod % 60) as u8,
        }
    }

    /// Seconds since the UNIX epoch (fields are clamped into range first).
    pub fn to_unix(&self) -> i64 {
        let c = self.clamped();
        days_from_civil(i64::from(c.year), c.month, c.day) * 86_400
            + i64::from(c.hour) * 3600
            + i64::from(c.minute) * 60
            + i64::from(c.second)
    }

    /// Day of week as the RTC reports it, 1 = Sunday.
    pub fn day_of_week(&self) -> u8 {
        let c = self.clamped();
        let days = days_from_civil(i64::from(c.year), c.month, c.day);
        (days + 4).rem_euclid(7) as u8 + 1
    }

    /// What the registers can hold: any byte per field (the guest may write
    /// nonsense in SET mode, clamped when SET is cleared), years up to 9999.
    fn is_storable(&self) -> bool {
        i64::from(self.year) <= MAX_YEAR
    }

    fn clamped(&self) -> Self {
        let year = self.year.min(MAX_YEAR as u16);
        let month = self.month.clamp(1, 12);
        CalendarTime {
            year,
            month,
            day: self.day.clamp(1, days_in_month(i64::from(year), month)),
            hour: self.hour.min(23),
            minute: self.minute.min(59),
            second: self.second.min(59),
        }
    }
}

/// Serialisable state of the [`Rtc`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// Selected CMOS index (0..=127).
    pub index: u8,
    /// NMI disable bit from the last index write.
    pub nmi_disabled: bool,
    /// Register A without UIP (UIP is computed from the clock).
    pub reg_a: u8,
    /// Register B.
    pub reg_b: u8,
    /// Register C flags PF/AF/UF (IRQF is computed from them and register B).
    pub reg_c: u8,
    /// Alarm registers: seconds, minutes, hours, as the guest wrote them.
    pub alarm: [u8; 3],
    /// Guest time minus host time, in seconds.
    pub offset_secs: i64,
    /// Host time up to which the interrupt flags are up to date.
    pub last_update: Duration,
    /// The time registers while register B SET is on (frozen and guest-writable).
    pub latched: Option<CalendarTime>,
    /// The 128 CMOS bytes; clock registers 0x00-0x0D and the century byte are unused here.
    pub nvram: Vec<u8>,
}

impl Default for RtcState {
    fn default() -> Self {
        RtcState {
            index: 0,
            nmi_disabled: false,
            reg_a: 0x26,
            reg_b: REG_B_24H,
            reg_c: 0,
            alarm: [0; 3],
            offset_secs: 0,
            last_update: Duration::ZERO,
            latched: None,
            nvram: vec![0; NVRAM_SIZE],
        }
    }
}

/// The MC146818 RTC with 128 bytes of CMOS.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use iovirt_bus::interrupt::test_doubles::RecordingLine;
/// use iovirt_bus::BusDeviceMut;
/// use iovirt_legacy::rtc::{Rtc, TestClock, REG_B, REG_B_UIE, REG_B_24H, REG_C, REG_HOURS};
///
/// // 2024-03-01 13:45:10 UTC.
/// let clock = TestClock::at_unix(1_709_300_710);
/// let irq = Arc::new(RecordingLine::new());
/// let mut rtc = Rtc::new(irq.clone(), Box::new(clock.clone()));
/// rtc.set_memory_layout(512 << 20, 0);
/// assert_eq!(rtc.nvram(0x15), Some(0x80)); // 640 KiB base memory
///
/// let mut b = [0u8];
/// rtc.write(0, &[REG_HOURS]);
/// rtc.read(1, &mut b);
/// assert_eq!(b[0], 0x13); // BCD, 24-hour mode
///
/// // Update-ended interrupts: the VMM sleeps until next_event and polls.
/// rtc.write(0, &[REG_B]);
/// rtc.write(1, &[REG_B_24H | REG_B_UIE]);
/// let wait = rtc.next_event().unwrap();
/// clock.advance(wait);
/// rtc.poll();
/// assert_eq!(irq.edges(), 1);
/// rtc.write(0, &[REG_C]);
/// rtc.read(1, &mut b);
/// assert_eq!(b[0] & 0x90, 0x90); // IRQF | UF (PF ticks too, but is not enabled)
/// ```
pub struct Rtc {
    index: u8,
    nmi_disabled: bool,
    reg_a: u8,
    reg_b: u8,
    reg_c: u8,
    alarm: [u8; 3],
    offset_secs: i64,
    last_update: Duration,
    latched: Option<CalendarTime>,
    nvram: [u8; NVRAM_SIZE],
    irq: Arc<dyn InterruptLine>,
    clock: Box<dyn Clock>,
}

impl fmt::Debug for Rtc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rtc")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).saturating_mul(10).saturating_add(v & 0x0f)
}

/// Periodic interrupt period in 32.768 kHz ticks for rate select `rs` (1..=15).
fn period_ticks(rs: u8) -> Option<u128> {
    match rs {
        0 => None,
        1 | 2 => Some(1 << (rs + 6)),
        _ => Some(1 << (rs - 1)),
    }
}

impl Rtc {
    /// An RTC showing host UTC, raising `irq` (IRQ 8) and reading time from `clock`.
    pub fn new(irq: Arc<dyn InterruptLine>, clock: Box<dyn Clock>) -> Self {
        let s = RtcState::default();
        let mut rtc = Rtc {
            index: s.index,
            nmi_disabled: s.nmi_disabled,
            reg_a: s.reg_a,
            reg_b: s.reg_b,
            reg_c: s.reg_c,
            alarm: s.alarm,
            offset_secs: s.offset_secs,
            last_update: s.last_update,
            latched: None,
            nvram: [0; NVRAM_SIZE],
            irq,
            clock,
        };
        rtc.last_update = rtc.host_now();
        rtc
    }

    /// Restore from `state`, rejecting impossible register values.
    pub fn from_state(
        state: &RtcState,
        irq: Arc<dyn InterruptLine>,
        clock: Box<dyn Clock>,
    ) -> Result<Self, RtcError> {
        let nvram: [u8; NVRAM_SIZE] = state
            .nvram
            .as_slice()
            .try_into()
            .map_err(|_| RtcError::NvramSize(state.nvram.len()))?;
        if usize::from(state.index) >= NVRAM_SIZE {
            return Err(RtcError::BadIndex(state.index));
        }
        if state.reg_a & REG_A_UIP != 0 {
            return Err(RtcError::BadRegister {
                register: "A",
                value: state.reg_a,
            });
        }
        if state.reg_c & !(REG_C_PF | REG_C_AF | REG_C_UF) != 0 {
            return Err(RtcError::BadRegister {
                register: "C",
                value: state.reg_c,
            });
        }
        let set = state.reg_b & REG_B_SET != 0;
        match state.latched {
            Some(t) if set && t.is_storable() => {}
            None if !set => {}
            _ => return Err(RtcError::BadLatchedTime),
        }
        if !(-MAX_OFFSET_SECS..=MAX_OFFSET_SECS).contains(&state.offset_secs) {
            return Err(RtcError::BadOffset(state.offset_secs));
        }
        Ok(Rtc {
            index: state.index,
            nmi_disabled: state.nmi_disabled,
            reg_a: state.reg_a,
            reg_b: state.reg_b,
            reg_c: state.reg_c,
            alarm: state.alarm,
            offset_secs: state.offset_secs,
            last_update: state.last_update,
            latched: state.latched,
            nvram,
            irq,
            clock,
        })
    }

    /// The state to snapshot.
    pub fn state(&self) -> RtcState {
        RtcState {
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            reg_a: self.reg_a,
            reg_b: self.reg_b,
            reg_c: self.reg_c,
            alarm: self.alarm,
            offset_secs: self.offset_secs,
            last_update: self.last_update,
            latched: self.latched,
            nvram: self.nvram.to_vec(),
        }
    }

    /// Whether the guest last wrote the index port with NMIs disabled.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// Shift guest time by `secs` from host UTC (for guests that keep local time).
    pub fn set_offset_secs(&mut self, secs: i64) {
        self.update_flags();
        self.offset_secs = secs.clamp(-MAX_OFFSET_SECS, MAX_OFFSET_SECS);
    }

    /// The time the guest would read now.
    pub fn guest_time(&self) -> CalendarTime {
        self.latched
            .unwrap_or_else(|| CalendarTime::from_unix(self.guest_secs(self.host_now())))
    }

    /// A CMOS RAM byte; `None` for indexes 128 and up. Clock registers read as stored (0).
    pub fn nvram(&self, index: u8) -> Option<u8> {
        self.nvram.get(usize::from(index)).copied()
    }

    /// Set a CMOS RAM byte (0x0E..=0x7F, except the century byte 0x32).
    pub fn set_nvram(&mut self, index: u8, value: u8) -> Result<(), RtcError> {
        if index <= REG_D || index == REG_CENTURY {
            return Err(RtcError::BadIndex(index));
        }
        let slot = self
            .nvram
            .get_mut(usize::from(index))
            .ok_or(RtcError::BadIndex(index))?;
        *slot = value;
        Ok(())
    }

    fn put16(&mut self, low: u8, v: u16) {
        let [lo, hi] = v.to_le_bytes();
        self.nvram[usize::from(low)] = lo;
        self.nvram[usize::from(low) + 1] = hi;
    }

    /// Fill the memory-size bytes firmware reads (QEMU's layout, which SeaBIOS expects).
    ///
    /// `ram_below_4g` is the RAM from address 0 up to the PCI hole, `ram_above_4g`
    /// the RAM relocated above 4 GiB, both in bytes.
    pub fn set_memory_layout(&mut self, ram_below_4g: u64, ram_above_4g: u64) {
        self.put16(CMOS_BASE_MEM_LOW, 640);
        let ext = (ram_below_4g / 1024).saturating_sub(1024).min(0xffff) as u16;
        self.put16(CMOS_EXT_MEM_LOW, ext);
        self.put16(CMOS_MEM_EXTMEM_LOW, ext);
        let above16 = if ram_below_4g > 16 << 20 {
            (ram_below_4g / 65536 - 256).min(0xffff) as u16
        } else {
            0
        };
        self.put16(CMOS_MEM_EXTMEM2_LOW, above16);
        let high = (ram_above_4g / 65536).min(0xff_ffff);
        self.nvram[usize::from(CMOS_MEM_HIGHMEM_LOW)] = high as u8;
        self.nvram[usize::from(CMOS_MEM_HIGHMEM_MID)] = (high >> 8) as u8;
        self.nvram[usize::from(CMOS_MEM_HIGHMEM_HIGH)] = (high >> 16) as u8;
    }

    /// Record the CPU count at 0x5F as `n - 1` (saturating to 0..=255).
    pub fn set_cpu_count(&mut self, n: u16) {
        self.nvram[usize::from(CMOS_BIOS_SMP_COUNT)] = n.saturating_sub(1).min(255) as u8;
    }

    fn host_now(&self) -> Duration {
        self.clock
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
    }

    fn guest_secs(&self, host: Duration) -> i64 {
        // Bounded well inside i64 so that calendar arithmetic cannot overflow.
        const LIMIT: i64 = 1 << 50;
        i64::try_from(host.as_secs())
            .unwrap_or(i64::MAX)
            .saturating_add(self.offset_secs)
            .clamp(-LIMIT, LIMIT)
    }

    fn binary(&self) -> bool {
        self.reg_b & REG_B_DM_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.reg_b & REG_B_24H != 0 {
            return self.encode(h);
        }
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | if h >= 12 { HOURS_PM } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !HOURS_PM) % 12;
        if v & HOURS_PM != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    fn irqf(&self) -> bool {
        self.reg_c & self.reg_b & (REG_C_PF | REG_C_AF | REG_C_UF) != 0
    }

    /// The alarm as binary (second, minute, hour), `None` per field = don't care,
    /// `Some(None)` overall = a field that can never match.
    fn alarm_fields(&self) -> Option<[Option<u8>; 3]> {
        let mut out = [None; 3];
        let limits = [60u8, 60, 24];
        for (i, (&raw, lim)) in self.alarm.iter().zip(limits).enumerate() {
            if raw >= ALARM_DONT_CARE {
                continue;
            }
            let v = if i == 2 {
                self.decode_hour(raw)
            } else {
                self.decode(raw)
            };
            if v >= lim {
                return None;
            }
            out[i] = Some(v);
        }
        Some(out)
    }

    /// First guest second strictly after `t` whose time of day matches the alarm.
    fn next_alarm_after(&self, t: i64) -> Option<i64> {
        let [sa, ma, ha] = self.alarm_fields()?;
        let day = t.div_euclid(86_400);
        let sod = t.rem_euclid(86_400);
        for d in [day, day + 1] {
            let today = d == day;
            for h in 0..24i64 {
                if ha.is_some_and(|a| i64::from(a) != h) || (today && h * 3600 + 3599 <= sod) {
                    continue;
                }
                for m in 0..60i64 {
                    let hm = h * 3600 + m * 60;
                    if ma.is_some_and(|a| i64::from(a) != m) || (today && hm + 59 <= sod) {
                        continue;
                    }
                    for s in 0..60i64 {
                        if sa.is_some_and(|a| i64::from(a) != s) || (today && hm + s <= sod) {
                            continue;
                        }
                        return Some(d * 86_400 + hm + s);
                    }
                }
            }
        }
        None
    }

    /// Bring register C's flags up to the current host time.
    fn update_flags(&mut self) {
        let now = self.host_now();
        let last = self.last_update;
        self.last_update = now;
        if now <= last {
            return;
        }
        if let Some(p) = period_ticks(self.reg_a & REG_A_RS_MASK) {
            let ticks = |d: Duration| d.as_nanos() * TICKS_PER_SEC / NANOS as u128 / p;
            if ticks(now) > ticks(last) {
                self.reg_c |= REG_C_PF;
            }
        }
        if self.latched.is_none() {
            let (g0, g1) = (self.guest_secs(last), self.guest_secs(now));
            if g1 > g0 {
                self.reg_c |= REG_C_UF;
                if self.next_alarm_after(g0).is_some_and(|a| a <= g1) {
                    self.reg_c |= REG_C_AF;
                }
            }
        }
    }

    fn raise_if_new(&self, before: bool) {
        if !before && self.irqf() {
            if let Err(e) = self.irq.trigger() {
                log::warn!("rtc: interrupt delivery failed: {e}");
            }
        }
    }

    /// Raise the interrupt for whatever became due since the last call.
    pub fn poll(&mut self) {
        let before = self.irqf();
        self.update_flags();
        self.raise_if_new(before);
    }

    /// How long until an enabled interrupt may next become due, or `None` if
    /// none is enabled. Call again after every guest access and every [`poll`](Self::poll).
    pub fn next_event(&self) -> Option<Duration> {
        let now = self.host_now();
        let now_ns = now.as_nanos();
        let mut best: Option<u128> = None;
        let mut consider = |at_ns: u128| {
            let d = at_ns.saturating_sub(now_ns);
            best = Some(best.map_or(d, |b| b.min(d)));
        };
        if self.reg_b & REG_B_PIE != 0 {
            if let Some(p) = period_ticks(self.reg_a & REG_A_RS_MASK) {
                let k = now_ns * TICKS_PER_SEC / NANOS as u128 / p + 1;
                consider((k * p * NANOS as u128).div_ceil(TICKS_PER_SEC));
            }
        }
        if self.latched.is_none() {
            let next_sec = (u128::from(now.as_secs()) + 1) * NANOS as u128;
            if self.reg_b & REG_B_UIE != 0 {
                consider(next_sec);
            }
            if self.reg_b & REG_B_AIE != 0 {
                let g = self.guest_secs(now);
                if let Some(a) = self.next_alarm_after(g) {
                    let ahead = u128::try_from(a.saturating_sub(g)).unwrap_or(0);
                    consider(next_sec + (ahead.saturating_sub(1)) * NANOS as u128);
                }
            }
        }
        best.map(|ns| Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    fn time_reg(&self, t: &CalendarTime, reg: u8) -> u8 {
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_DAY_OF_WEEK => self.encode(t.day_of_week()),
            REG_DAY_OF_MONTH => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode((t.year % 100) as u8),
            REG_CENTURY => self.encode((t.year / 100) as u8),
            _ => 0,
        }
    }

    fn write_time_reg(&mut self, reg: u8, v: u8) {
        let mut t = self.guest_time();
        match reg {
            REG_SECONDS => t.second = self.decode(v & 0x7f),
            REG_MINUTES => t.minute = self.decode(v),
            REG_HOURS => t.hour = self.decode_hour(v),
            REG_DAY_OF_MONTH => t.day = self.decode(v),
            REG_MONTH => t.month = self.decode(v),
            REG_YEAR => t.year = t.year / 100 * 100 + u16::from(self.decode(v) % 100),
            REG_CENTURY => t.year = u16::from(self.decode(v) % 100) * 100 + t.year % 100,
            _ => return, // day of week is derived from the date
        }
        if self.latched.is_some() {
            // Keep what the guest wrote; it is validated when SET is cleared.
            self.latched = Some(t);
        } else {
            self.set_guest_time(t);
        }
    }

    fn set_guest_time(&mut self, t: CalendarTime) {
        let host = i64::try_from(self.host_now().as_secs()).unwrap_or(i64::MAX);
        self.offset_secs = t
            .to_unix()
            .saturating_sub(host)
            .clamp(-MAX_OFFSET_SECS, MAX_OFFSET_SECS);
        // The new time does not count as an update cycle.
        self.last_update = self.host_now();
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => {
                let t = self.guest_time();
                self.time_reg(&t, reg)
            }
            REG_SECONDS_ALARM => self.alarm[0],
            REG_MINUTES_ALARM => self.alarm[1],
            REG_HOURS_ALARM => self.alarm[2],
            REG_A => {
                let now = self.host_now();
                let sub = Duration::from_nanos(u64::from(now.subsec_nanos()));
                let uip = self.latched.is_none()
                    && sub >= Duration::from_secs(1).saturating_sub(UIP_WINDOW);
                self.reg_a | if uip { REG_A_UIP } else { 0 }
            }
            REG_B => self.reg_b,
            REG_C => {
                self.update_flags();
                let v = self.reg_c | if self.irqf() { REG_C_IRQF } else { 0 };
                self.reg_c = 0;
                v
            }
            REG_D => REG_D_VRT,
            _ => self.nvram.get(usize::from(reg)).copied().unwrap_or(0xff),
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY_OF_WEEK | REG_DAY_OF_MONTH
            | REG_MONTH | REG_YEAR | REG_CENTURY => self.write_time_reg(reg, v),
            REG_SECONDS_ALARM => self.alarm[0] = v,
            REG_MINUTES_ALARM => self.alarm[1] = v,
            REG_HOURS_ALARM => self.alarm[2] = v,
            REG_A => self.reg_a = v & !REG_A_UIP,
            REG_B => {
                let mut v = v;
                if v & REG_B_SET != 0 {
                    // Entering SET mode stops updates and clears UIE.
                    v &= !REG_B_UIE;
                    if self.latched.is_none() {
                        self.latched = Some(self.guest_time());
                    }
                } else if let Some(t) = self.latched.take() {
                    self.set_guest_time(t.clamped());
                }
                self.reg_b = v;
            }
            REG_C | REG_D => {} // read-only
            _ => {
                if let Some(slot) = self.nvram.get_mut(usize::from(reg)) {
                    *slot = v;
                }
            }
        }
    }
}

impl BusDeviceMut for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 1 {
            data.fill(0xff); // the index port is write-only
            return;
        }
        let before = self.irqf();
        self.update_flags();
        for b in data.iter_mut() {
            *b = self.read_reg(self.index);
        }
        self.raise_if_new(before);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                self.index = v & !INDEX_NMI_DISABLE;
                self.nmi_disabled = v & INDEX_NMI_DISABLE != 0;
            }
            1 => {
                let before = self.irqf();
                self.update_flags();
                self.write_reg(self.index, v);
                self.raise_if_new(before);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_bus::interrupt::test_doubles::RecordingLine;

    /// 2024-03-01 13:45:10 UTC, a Friday.
    const T0: u64 = 1_709_300_710;

    fn rtc_at(secs: u64) -> (Rtc, TestClock, Arc<RecordingLine>) {
        let clock = TestClock::at_unix(secs);
        let irq = Arc::new(RecordingLine::new());
        let rtc = Rtc::new(irq.clone(), Box::new(clock.clone()));
        (rtc, clock, irq)
    }

    fn rd(r: &mut Rtc, reg: u8) -> u8 {
        r.write(0, &[reg]);
        let mut b = [0u8];
        r.read(1, &mut b);
        b[0]
    }

    fn wr(r: &mut Rtc, reg: u8, v: u8) {
        r.write(0, &[reg]);
        r.write(1, &[v]);
    }

    fn time_regs(r: &mut Rtc) -> [u8; 8] {
        [
            REG_SECONDS,
            REG_MINUTES,
            REG_HOURS,
            REG_DAY_OF_WEEK,
            REG_DAY_OF_MONTH,
            REG_MONTH,
            REG_YEAR,
            REG_CENTURY,
        ]
        .map(|reg| rd(r, reg))
    }

    #[test]
    fn calendar_round_trip() {
        for secs in [0i64, 951_782_400, T0 as i64, 4_102_444_799, -86_400] {
            assert_eq!(CalendarTime::from_unix(secs).to_unix(), secs);
        }
        let t = CalendarTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
        assert_eq!(CalendarTime::from_unix(T0 as i64).day_of_week(), 6);
    }

    #[test]
    fn bcd_and_binary() {
        let (mut r, _c, _i) = rtc_at(T0);
        assert_eq!(
            time_regs(&mut r),
            [0x10, 0x45, 0x13, 0x06, 0x01, 0x03, 0x24, 0x20]
        );
        wr(&mut r, REG_B, REG_B_24H | REG_B_DM_BINARY);
        assert_eq!(time_regs(&mut r), [10, 45, 13, 6, 1, 3, 24, 20]);
    }

    #[test]
    fn twelve_hour_mode() {
        let (mut r, c, _i) = rtc_at(T0);
        wr(&mut r, REG_B, 0); // 12 h, BCD
        assert_eq!(rd(&mut r, REG_HOURS), HOURS_PM | 0x01);
        c.set(UNIX_EPOCH + Duration::from_secs(T0 - 13 * 3600)); // 00:45
        assert_eq!(rd(&mut r, REG_HOURS), 0x12);
        c.set(UNIX_EPOCH + Duration::from_secs(T0 - 3600)); // 12:45
        assert_eq!(rd(&mut r, REG_HOURS), HOURS_PM | 0x12);
        wr(&mut r, REG_B, REG_B_DM_BINARY);
        assert_eq!(rd(&mut r, REG_HOURS), HOURS_PM | 12);
    }

    #[test]
    fn set_mode_moves_the_clock() {
        let (mut r, c, _i) = rtc_at(T0);
        wr(&mut r, REG_B, REG_B_24H | REG_B_SET);
        wr(&mut r, REG_YEAR, 0x99);
        wr(&mut r, REG_CENTURY, 0x19);
        wr(&mut r, REG_MONTH, 0x12);
        wr(&mut r, REG_DAY_OF_MONTH, 0x31);
        wr(&mut r, REG_HOURS, 0x23);
        wr(&mut r, REG_MINUTES, 0x59);
        wr(&mut r, REG_SECONDS, 0x58);
        c.advance(Duration::from_secs(5)); // frozen while SET
        assert_eq!(rd(&mut r, REG_SECONDS), 0x58);
        wr(&mut r, REG_B, REG_B_24H);
        c.advance(Duration::from_secs(3));
        assert_eq!(
            time_regs(&mut r),
            [0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
        // Snapshot round trip keeps the offset.
        let s = r.state();
        let back: RtcState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        let mut r2 =
            Rtc::from_state(&back, Arc::new(RecordingLine::new()), Box::new(c.clone())).unwrap();
        assert_eq!(r2.state(), s);
        assert_eq!(rd(&mut r2, REG_YEAR), 0x00);
    }

    #[test]
    fn uip_window() {
        let (mut r, c, _i) = rtc_at(T0);
        assert_eq!(rd(&mut r, REG_A), 0x26);
        c.advance(Duration::from_micros(1_000_000 - 245));
        assert_eq!(rd(&mut r, REG_A) & REG_A_UIP, 0);
        c.advance(Duration::from_micros(2));
        assert_eq!(rd(&mut r, REG_A), 0x26 | REG_A_UIP);
        c.advance(Duration::from_micros(243));
        assert_eq!(rd(&mut r, REG_A) & REG_A_UIP, 0);
        wr(&mut r, REG_A, 0xff);
        assert_eq!(rd(&mut r, REG_A) & 0x7f, 0x7f);
    }

    #[test]
    fn periodic_rate() {
        let (mut r, c, irq) = rtc_at(T0);
        wr(&mut r, REG_A, 0x26); // 1024 Hz
        wr(&mut r, REG_B, REG_B_24H | REG_B_PIE);
        let _ = rd(&mut r, REG_C);
        let d = r.next_event().unwrap();
        assert_eq!(d, Duration::from_nanos(976_563)); // ceil(1e9/1024)
        c.advance(d - Duration::from_nanos(1000));
        r.poll();
        assert_eq!(irq.edges(), 0);
        c.advance(Duration::from_nanos(1000));
        r.poll();
        assert_eq!(irq.edges(), 1);
        // No new edge until register C is read.
        c.advance(d);
        r.poll();
        assert_eq!(irq.edges(), 1);
        assert_eq!(rd(&mut r, REG_C), REG_C_IRQF | REG_C_PF);
        assert_eq!(rd(&mut r, REG_C), 0);
        // Slowest rate: 2 Hz.
        wr(&mut r, REG_A, 0x2f);
        assert!(r.next_event().unwrap() <= Duration::from_millis(500));
        // PF is set even without PIE, but does not interrupt.
        wr(&mut r, REG_B, REG_B_24H);
        c.advance(Duration::from_secs(1));
        r.poll();
        assert_eq!(irq.edges(), 1);
        assert_eq!(rd(&mut r, REG_C) & (REG_C_PF | REG_C_IRQF), REG_C_PF);
        wr(&mut r, REG_A, 0x20);
        assert_eq!(r.next_event(), None);
    }

    #[test]
    fn update_interrupt() {
        let (mut r, c, irq) = rtc_at(T0);
        wr(&mut r, REG_A, 0x20); // no periodic flag in the way
        c.advance(Duration::from_millis(300));
        wr(&mut r, REG_B, REG_B_24H | REG_B_UIE);
        assert_eq!(r.next_event(), Some(Duration::from_millis(700)));
        c.advance(Duration::from_millis(700));
        r.poll();
        assert_eq!(irq.edges(), 1);
        assert_eq!(rd(&mut r, REG_C), REG_C_IRQF | REG_C_UF);
        // SET clears UIE and stops updates.
        wr(&mut r, REG_B, REG_B_24H | REG_B_UIE | REG_B_SET);
        assert_eq!(rd(&mut r, REG_B) & REG_B_UIE, 0);
        c.advance(Duration::from_secs(2));
        assert_eq!(rd(&mut r, REG_C), 0);
    }

    #[test]
    fn alarm_with_dont_care() {
        let (mut r, c, irq) = rtc_at(T0); // 13:45:10
        wr(&mut r, REG_A, 0x20);
        wr(&mut r, REG_SECONDS_ALARM, 0x30);
        wr(&mut r, REG_MINUTES_ALARM, 0xc0); // any minute
        wr(&mut r, REG_HOURS_ALARM, 0xff); // any hour
        wr(&mut r, REG_B, REG_B_24H | REG_B_AIE);
        assert_eq!(r.next_event(), Some(Duration::from_secs(20)));
        c.advance(Duration::from_secs(19));
        r.poll();
        assert_eq!(irq.edges(), 0);
        c.advance(Duration::from_secs(1));
        r.poll();
        assert_eq!(irq.edges(), 1);
        assert_eq!(rd(&mut r, REG_C), REG_C_IRQF | REG_C_AF | REG_C_UF);
        // Exact alarm at 14:00:00 in 12-hour BCD mode (2 PM).
        wr(&mut r, REG_B, REG_B_AIE);
        wr(&mut r, REG_SECONDS_ALARM, 0x00);
        wr(&mut r, REG_MINUTES_ALARM, 0x00);
        wr(&mut r, REG_HOURS_ALARM, HOURS_PM | 0x02);
        assert_eq!(r.next_event(), Some(Duration::from_secs(14 * 60 + 30)));
        c.advance(Duration::from_secs(14 * 60 + 30));
        r.poll();
        assert_eq!(irq.edges(), 2);
        // An impossible alarm never fires.
        let _ = rd(&mut r, REG_C);
        wr(&mut r, REG_SECONDS_ALARM, 0x99);
        assert_eq!(r.next_event(), None);
    }

    #[test]
    fn nvram_and_memory_layout() {
        let (mut r, _c, _i) = rtc_at(T0);
        wr(&mut r, 0x40, 0xab);
        assert_eq!(rd(&mut r, 0x40), 0xab);
        assert_eq!(r.nvram(0x40), Some(0xab));
        assert_eq!(r.nvram(0x80), None);
        assert!(r.set_nvram(0x0b, 1).is_err());
        assert!(r.set_nvram(0x80, 1).is_err());
        r.set_nvram(0x7f, 7).unwrap();
        assert_eq!(rd(&mut r, 0x7f), 7);
        // Index port: bit 7 disables NMI and is not part of the index.
        r.write(0, &[0x80 | 0x7f]);
        assert!(r.nmi_disabled());
        let mut b = [0];
        r.read(1, &mut b);
        assert_eq!(b[0], 7);

        let mem = |r: &mut Rtc| -> Vec<u8> {
            [
                0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x5b, 0x5c, 0x5d,
            ]
            .iter()
            .map(|&i| r.nvram(i).unwrap())
            .collect()
        };
        // 16 MiB: 15 MiB extended, nothing above 16 MiB.
        r.set_memory_layout(16 << 20, 0);
        assert_eq!(
            mem(&mut r),
            [0x80, 0x02, 0x00, 0x3c, 0x00, 0x3c, 0, 0, 0, 0, 0]
        );
        // 512 MiB: extended capped, 496 MiB above 16 MiB = 0x1f00 units.
        r.set_memory_layout(512 << 20, 0);
        assert_eq!(
            mem(&mut r),
            [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0x1f, 0, 0, 0]
        );
        // 3 GiB below 4 GiB, 5 GiB above: 0x50000 units above 4 GiB.
        r.set_memory_layout(3 << 30, 5 << 30);
        assert_eq!(
            mem(&mut r),
            [0x80, 0x02, 0xff, 0xff, 0xff, 0xff, 0x00, 0xbf, 0x00, 0x40, 0x01]
        );
        // What SeaBIOS computes back from these bytes.
        let rs = ((u32::from(r.nvram(0x34).unwrap()) << 16)
            | (u32::from(r.nvram(0x35).unwrap()) << 24))
            + (16 << 20);
        assert_eq!(rs, 3 << 30);
        r.set_cpu_count(4);
        assert_eq!(r.nvram(CMOS_BIOS_SMP_COUNT), Some(3));
        r.set_cpu_count(0);
        assert_eq!(r.nvram(CMOS_BIOS_SMP_COUNT), Some(0));
    }

    #[test]
    fn set_mode_nonsense_is_kept_then_clamped() {
        let (mut r, c, _i) = rtc_at(T0);
        wr(&mut r, REG_B, REG_B_24H | REG_B_SET);
        wr(&mut r, REG_DAY_OF_MONTH, 0x31); // 31 February for a moment
        wr(&mut r, REG_MONTH, 0x02);
        wr(&mut r, REG_HOURS, 0x99);
        assert_eq!(rd(&mut r, REG_DAY_OF_MONTH), 0x31);
        let s = r.state();
        assert!(Rtc::from_state(&s, Arc::new(RecordingLine::new()), Box::new(c.clone())).is_ok());
        wr(&mut r, REG_B, REG_B_24H);
        // 2024 is a leap year: clamped to 29 February, 23 h.
        assert_eq!(rd(&mut r, REG_DAY_OF_MONTH), 0x29);
        assert_eq!(rd(&mut r, REG_HOURS), 0x23);
    }

    #[test]
    fn from_state_rejects() {
        let bad = |f: fn(&mut RtcState)| {
            let mut s = RtcState::default();
            f(&mut s);
            Rtc::from_state(
                &s,
                Arc::new(RecordingLine::new()),
                Box::new(TestClock::at_unix(T0)),
            )
            .is_err()
        };
        assert!(!bad(|_| {}));
        assert!(bad(|s| s.nvram.pop().map_or((), |_| ())));
        assert!(bad(|s| s.index = 0x80));
        assert!(bad(|s| s.reg_a = 0x80));
        assert!(bad(|s| s.reg_c = 0x81));
        assert!(bad(|s| s.reg_b = REG_B_SET));
        assert!(bad(|s| s.offset_secs = i64::MAX));
        assert!(bad(|s| {
            s.reg_b = REG_B_SET;
            s.latched = Some(CalendarTime {
                year: 10_000,
                month: 2,
                day: 30,
                hour: 0,
                minute: 0,
                second: 0,
            })
        }));
    }
}
