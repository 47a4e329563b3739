//! TEMPORARY stand-ins for device models that `iovirt-legacy` and `iovirt-bus::pci`
//! do not export yet (i8042, CMOS RTC, PCI root with the i440FX/PIIX3 functions).
//!
//! They follow the planned APIs closely enough for `devices.rs` to switch to the real
//! models by changing imports. Delete each one as soon as the real model lands.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use iovirt_bus::{Bus, BusDeviceMut, BusError, InterruptLine};

/// Side events of the i8042 (planned as `iovirt_legacy::i8042::I8042Events`).
pub trait I8042Events: Send {
    /// The guest pulsed the CPU reset line (command 0xFE, or output port bit 0 cleared).
    fn reset_requested(&mut self);
    /// The guest changed the A20 gate.
    fn a20_changed(&mut self, _enabled: bool) {}
}

/// A minimal i8042 with a keyboard that acknowledges commands (no mouse).
pub struct I8042 {
    irq: Arc<dyn InterruptLine>,
    events: Box<dyn I8042Events>,
    out: std::collections::VecDeque<u8>,
    ctr: u8,
    pending_cmd: Option<u8>,
    kbd_pending: Option<u8>,
}

impl I8042 {
    /// A controller raising `irq` (IRQ 1) for keyboard bytes.
    pub fn new(irq: Arc<dyn InterruptLine>, events: Box<dyn I8042Events>) -> Self {
        I8042 {
            irq,
            events,
            out: Default::default(),
            ctr: 0x61, // keyboard interrupt on, translation on, system flag set
            pending_cmd: None,
            kbd_pending: None,
        }
    }

    fn push(&mut self, bytes: &[u8], from_kbd: bool) {
        self.out.extend(bytes);
        if from_kbd && self.ctr & 1 != 0 {
            let _ = self.irq.trigger();
        }
    }

    fn controller_cmd(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.push(&[self.ctr], false),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending_cmd = Some(cmd),
            0xaa => self.push(&[0x55], false),
            0xab | 0xa9 => self.push(&[0x00], false),
            0xd0 => self.push(&[0x03], false), // output port: A20 on, no reset
            0xf0..=0xff if cmd & 1 == 0 => self.events.reset_requested(),
            _ => {}
        }
    }

    fn keyboard_cmd(&mut self, b: u8) {
        if let Some(c) = self.kbd_pending.take() {
            log::trace!("i8042 stand-in: keyboard command {c:#x} argument {b:#x}");
            self.push(&[0xfa], true);
            return;
        }
        match b {
            0xff => self.push(&[0xfa, 0xaa], true),
            0xf2 => self.push(&[0xfa, 0xab, 0x83], true),
            0xee => self.push(&[0xee], true),
            0xed | 0xf0 | 0xf3 => {
                self.kbd_pending = Some(b);
                self.push(&[0xfa], true)
            }
            _ => self.push(&[0xfa], true),
        }
    }
}

impl BusDeviceMut for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.out.pop_front().unwrap_or(0),
            // Status: output full, system flag, last write was a command.
            4 => u8::from(!self.out.is_empty()) | 0x04 | 0x08,
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            0 => match self.pending_cmd.take() {
                Some(0x60) => self.ctr = b,
                Some(0xd1) => {
                    self.events.a20_changed(b & 2 != 0);
                    if b & 1 == 0 {
                        self.events.reset_requested();
                    }
                }
                Some(0xd2) => self.push(&[b], true),
                Some(_) => {}
                None => self.keyboard_cmd(b),
            },
            4 => self.controller_cmd(b),
            _ => {}
        }
    }
}

/// A CMOS RTC/NVRAM that reports the memory layout and CPU count like QEMU's
/// `mc146818rtc` (registers 0x15-0x18, 0x30-0x35, 0x5b-0x5f) and the host's UTC time.
pub struct Rtc {
    index: u8,
    nvram: [u8; 128],
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl Rtc {
    /// Power-on state: status A 0x26, B 0x02 (24 h, BCD), D 0x80 (valid RAM and time).
    pub fn new() -> Self {
        let mut nvram = [0u8; 128];
        nvram[0x0a] = 0x26;
        nvram[0x0b] = 0x02;
        nvram[0x0d] = 0x80;
        // Base memory 640 KiB.
        nvram[0x15] = 0x80;
        nvram[0x16] = 0x02;
        Rtc { index: 0, nvram }
    }

    /// Publish RAM sizes in the registers SeaBIOS reads.
    pub fn set_memory_layout(&mut self, below_4g: u64, above_4g: u64) {
        let ext_kib = (below_4g.saturating_sub(1 << 20) >> 10).min(0xffff);
        self.nvram[0x17] = ext_kib as u8;
        self.nvram[0x18] = (ext_kib >> 8) as u8;
        self.nvram[0x30] = ext_kib as u8;
        self.nvram[0x31] = (ext_kib >> 8) as u8;
        let above_16m = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff);
        self.nvram[0x34] = above_16m as u8;
        self.nvram[0x35] = (above_16m >> 8) as u8;
        let high = above_4g >> 16;
        self.nvram[0x5b] = high as u8;
        self.nvram[0x5c] = (high >> 8) as u8;
        self.nvram[0x5d] = (high >> 16) as u8;
    }

    /// Publish the CPU count (register 0x5f holds count - 1).
    pub fn set_cpu_count(&mut self, n: u32) {
        self.nvram[0x5f] = n.saturating_sub(1).min(255) as u8;
    }

    fn time_reg(&self, reg: u8) -> Option<u8> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = secs / 86_400;
        let t = secs % 86_400;
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u64;
        Some(match reg {
            0x00 => bcd(t % 60),
            0x02 => bcd(t / 60 % 60),
            0x04 => bcd(t / 3600),
            0x06 => bcd((days + 4) % 7 + 1),
            0x07 => bcd(day),
            0x08 => bcd(month),
            0x09 => bcd(year % 100),
            0x32 => bcd(year / 100),
            _ => return None,
        })
    }
}

impl BusDeviceMut for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            1 => {
                let reg = self.index & 0x7f;
                let v = self.time_reg(reg).unwrap_or(self.nvram[usize::from(reg)]);
                if reg == 0x0c {
                    self.nvram[0x0c] = 0;
                }
                v
            }
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            0 => self.index = b,
            1 => {
                let reg = usize::from(self.index & 0x7f);
                if reg != 0x0c && reg != 0x0d && reg >= 0x0a {
                    self.nvram[reg] = b;
                }
            }
            _ => {}
        }
    }
}

/// One PCI function's configuration space.
pub struct PciFunction {
    /// 256 bytes of configuration space.
    pub config: [u8; 256],
    /// Name for logs.
    pub name: &'static str,
}

impl PciFunction {
    fn new(name: &'static str, vendor: u16, device: u16, class: u32, header: u8) -> Self {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&vendor.to_le_bytes());
        config[2..4].copy_from_slice(&device.to_le_bytes());
        config[8..12].copy_from_slice(&(class << 8).to_le_bytes());
        config[0x0e] = header;
        PciFunction { config, name }
    }

    /// The i440FX host bridge (00:00.0), with its PAM registers at 0x59-0x5f.
    pub fn i440fx() -> Self {
        Self::new("i440FX", 0x8086, 0x1237, 0x06_00_00, 0x00)
    }

    /// The PIIX3 PCI-to-ISA bridge (00:01.0), multi-function.
    pub fn piix3() -> Self {
        let mut f = Self::new("PIIX3", 0x8086, 0x7000, 0x06_01_00, 0x80);
        // PIRQ routing registers: disabled.
        f.config[0x60..0x64].fill(0x80);
        f
    }

    fn write(&mut self, reg: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let r = reg + i;
            // IDs, class, header type are read-only; these functions have no BARs
            // (0x10-0x27) and no expansion ROM (0x30-0x33), so those read as zero.
            if r < 4
                || (8..0x10).contains(&r) && r != 0x0c && r != 0x0d
                || (0x10..0x28).contains(&r)
                || (0x30..0x34).contains(&r)
            {
                continue;
            }
            if let Some(slot) = self.config.get_mut(r) {
                if self.name == "i440FX" && (0x59..=0x5f).contains(&r) && *slot != b {
                    log::debug!("i440FX PAM{} = {b:#04x} (RAM stays writable)", r - 0x59);
                }
                *slot = b;
            }
        }
    }
}

/// PCI configuration mechanism #1 (0xCF8 address, 0xCFC data) on bus 0, plus the
/// PIIX3 reset control register at 0xCF9.
pub struct PciRoot {
    address: u32,
    functions: Vec<(u8, PciFunction)>,
    reset: Box<dyn FnMut() + Send>,
}

impl PciRoot {
    /// A root bus; `reset` is called when the guest writes a reset to 0xCF9.
    pub fn new(reset: Box<dyn FnMut() + Send>) -> Self {
        PciRoot {
            address: 0,
            functions: Vec::new(),
            reset,
        }
    }

    /// Add a function at `devfn` (device << 3 | function) on bus 0.
    pub fn add_function(&mut self, devfn: u8, f: PciFunction) {
        self.functions.push((devfn, f));
    }

    /// Register on the PIO bus at 0xCF8 len 8.
    pub fn register(self, pio: &Bus) -> Result<(), BusError> {
        pio.insert("pci-root", 0xcf8, 8, Arc::new(Mutex::new(self)))
    }

    fn target(&mut self) -> Option<(&mut PciFunction, usize)> {
        if self.address & 0x8000_0000 == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = ((self.address >> 8) & 0xff) as u8;
        let reg = (self.address & 0xfc) as usize;
        self.functions
            .iter_mut()
            .find(|(d, _)| *d == devfn)
            .map(|(_, f)| (f, reg))
    }
}

impl BusDeviceMut for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let sub = (offset - 4) as usize;
                match self.target() {
                    Some((f, reg)) => {
                        for (i, b) in data.iter_mut().enumerate() {
                            *b = f.config.get(reg + sub + i).copied().unwrap_or(0xff);
                        }
                    }
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            // PIIX3 reset control: bit 2 starts the reset.
            1 if data.len() == 1 && data[0] & 0x04 != 0 => (self.reset)(),
            4..=7 => {
                let sub = (offset - 4) as usize;
                if let Some((f, reg)) = self.target() {
                    f.write(reg + sub, data);
                }
            }
            _ => {}
        }
    }
}
