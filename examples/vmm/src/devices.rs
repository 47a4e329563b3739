//! Device wiring: which iovirt model sits where on the PIO/MMIO buses, which IRQ it
//! raises, and where its host side (terminal, log file) goes.
//!
//! | device            | where             | IRQ | model                                |
//! |-------------------|-------------------|-----|--------------------------------------|
//! | i8042             | PIO 0x60, len 5   | 1   | `iovirt_legacy::i8042::I8042`        |
//! | CMOS RTC          | PIO 0x70, len 2   | 8   | `iovirt_legacy::rtc::Rtc` (+ timer)  |
//! | COM1 16550A       | PIO 0x3F8, len 8  | 4   | `iovirt_legacy::serial::Serial`      |
//! | debug console     | PIO 0x402, len 1  | -   | `iovirt_legacy::debugcon::DebugCon`  |
//! | fw_cfg            | PIO 0x510, len 2  | -   | `iovirt_legacy::fw_cfg::FwCfg`       |
//! | PCI config        | PIO 0xCF8, len 8  | -   | `iovirt_bus::pci::PciRoot`           |
//! | 00:00.0 host      | PCI               | -   | `iovirt_legacy::chipset::I440fx`     |
//! | 00:01.0 ISA       | PCI               | -   | `iovirt_legacy::chipset::Piix3`      |
//!
//! Disks (virtio-blk-pci at 00:04.0 upward, the IDE function at 00:01.1) are
//! wired afterwards by [`crate::disks`].
//!
//! The PIT, PIC, IOAPIC and LAPICs are KVM's in-kernel models. PAM changes are
//! logged; RAM below 1 MiB stays writable RAM whatever PAM says (SeaBIOS only
//! opens it for writing, which is what plain RAM already does).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iovirt_bus::pci::{PciError, PciRoot};
use iovirt_bus::{Bus, BusError, InterruptLine};
use iovirt_legacy::chipset::{
    I440fx, PamAccess, PamObserver, PamSegment, Piix3, I440FX_ADDRESS, PIIX3_ADDRESS,
};
use iovirt_legacy::debugcon::{DebugCon, DEBUGCON_LEN, DEBUGCON_PORT};
use iovirt_legacy::fw_cfg::{E820Entry, FwCfg, FwCfgError, FW_CFG_LEN, FW_CFG_PORT};
use iovirt_legacy::i8042::{I8042Events, I8042, I8042_LEN, I8042_PORT};
use iovirt_legacy::rtc::{Rtc, SystemClock, RTC_LEN, RTC_PORT};
use iovirt_legacy::serial::{Serial, COM1_PORT, SERIAL_LEN};
use kvm_ioctls::VmFd;

use crate::cli::SerialMode;
use crate::layout::MemoryLayout;
use crate::vcpu::{ExitHandle, ExitReason};
use crate::vm::KvmIrqLine;

/// Errors wiring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Two devices claim the same range (a wiring bug).
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    /// The PCI root refused a function.
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// A helper thread could not start.
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, io::Error),
    /// fw_cfg refused an item.
    #[error("fw_cfg: {0}")]
    FwCfg(#[from] FwCfgError),
    /// An output file could not be opened.
    #[error("cannot open {what} file {path}: {err}")]
    Open {
        /// Which output.
        what: &'static str,
        /// Its path.
        path: String,
        /// The error.
        err: io::Error,
    },
}

/// A `Write` for the UART's output.
pub enum SerialOut {
    /// The process's stdout, flushed on every write (guests print prompts without newlines).
    Stdout,
    /// A file.
    File(File),
    /// Nowhere.
    Null,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOut::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
                Ok(buf.len())
            }
            SerialOut::File(f) => f.write(buf),
            SerialOut::Null => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOut::Stdout => io::stdout().flush(),
            SerialOut::File(f) => f.flush(),
            SerialOut::Null => Ok(()),
        }
    }
}

/// The UART as wired (the terminal thread feeds its input).
pub type SerialDevice = Arc<Mutex<Serial<SerialOut>>>;

/// Devices the VMM keeps handles to after wiring.
pub struct Devices {
    /// COM1.
    pub serial: SerialDevice,
    /// The PCI root (disks add their functions to it).
    pub pci: Arc<PciRoot>,
    /// The PIIX3 ISA bridge (its PIRQ routes carry PCI INTx).
    pub piix3: Arc<Mutex<Piix3>>,
}

/// Turns the i8042's reset line into a VM exit.
struct ResetToExit(Arc<ExitHandle>);

impl I8042Events for ResetToExit {
    fn reset_requested(&mut self) {
        self.0
            .request(ExitReason::Reset("i8042 reset (command 0xFE)".into()));
    }
    fn a20_changed(&mut self, enabled: bool) {
        log::debug!("i8042: A20 {}", if enabled { "on" } else { "off" });
    }
}

/// Logs the chipset's PAM changes (RAM stays RAM: see the module doc).
struct PamLog;

impl PamObserver for PamLog {
    fn pam_changed(&self, segment: PamSegment, old: PamAccess, new: PamAccess) {
        log::debug!(
            "PAM segment {} [{:#x}, +{:#x}): {old:?} -> {new:?}",
            segment.index,
            segment.base,
            segment.len
        );
    }
}

/// Run the RTC's interrupts: sleep until its next event (re-checking at least every
/// 10 ms, as guest writes may arm a nearer one), then poll it.
fn spawn_rtc_timer(rtc: Arc<Mutex<Rtc>>, exit: Arc<ExitHandle>) -> io::Result<()> {
    const RECHECK: Duration = Duration::from_millis(10);
    std::thread::Builder::new()
        .name("rtc-timer".into())
        .spawn(move || {
            while !exit.stopping() {
                let next = rtc.lock().unwrap_or_else(|e| e.into_inner()).next_event();
                std::thread::sleep(next.map_or(RECHECK, |d| d.min(RECHECK)));
                rtc.lock().unwrap_or_else(|e| e.into_inner()).poll();
            }
        })
        .map(|_| ())
}

fn create(what: &'static str, path: &Path) -> Result<File, DeviceError> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|err| DeviceError::Open {
            what,
            path: path.display().to_string(),
            err,
        })
}

/// What the devices need to know about the machine.
pub struct MachineInfo<'a> {
    /// RAM layout.
    pub layout: MemoryLayout,
    /// vCPU count.
    pub cpus: u32,
    /// UART back-end.
    pub serial: &'a SerialMode,
    /// Debug console file.
    pub debugcon: Option<&'a Path>,
}

fn irq(vm: &Arc<VmFd>, gsi: u32) -> Arc<dyn InterruptLine> {
    Arc::new(KvmIrqLine::new(vm.clone(), gsi))
}

/// Create every device and put it on the buses.
pub fn wire(
    vm: &Arc<VmFd>,
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    info: &MachineInfo<'_>,
    exit: &Arc<ExitHandle>,
) -> Result<Devices, DeviceError> {
    // COM1.
    let out = match info.serial {
        SerialMode::Stdio => SerialOut::Stdout,
        SerialMode::File(p) => SerialOut::File(create("serial", p)?),
        SerialMode::Null => SerialOut::Null,
    };
    let serial = Arc::new(Mutex::new(Serial::new(irq(vm, 4), out)));
    pio.insert("serial", COM1_PORT, SERIAL_LEN, serial.clone())?;

    // Debug console: SeaBIOS's log.
    if let Some(path) = info.debugcon {
        let con = DebugCon::new(crate::stats::MarkWriter::new(create("debugcon", path)?));
        pio.insert(
            "debugcon",
            DEBUGCON_PORT,
            DEBUGCON_LEN,
            Arc::new(Mutex::new(con)),
        )?;
    }

    // i8042: keyboard controller, and the reset line SeaBIOS and Linux (reboot=k) use.
    let i8042 = I8042::new(irq(vm, 1), Box::new(ResetToExit(exit.clone())));
    pio.insert("i8042", I8042_PORT, I8042_LEN, Arc::new(Mutex::new(i8042)))?;

    // CMOS RTC/NVRAM: time, RAM sizes and CPU count for firmware; IRQ 8 from a timer thread.
    let mut rtc = Rtc::new(irq(vm, 8), Box::new(SystemClock));
    rtc.set_memory_layout(info.layout.below_4g, info.layout.above_4g);
    rtc.set_cpu_count(u16::try_from(info.cpus).unwrap_or(u16::MAX));
    let rtc = Arc::new(Mutex::new(rtc));
    pio.insert("rtc", RTC_PORT, RTC_LEN, rtc.clone())?;
    spawn_rtc_timer(rtc, exit.clone()).map_err(|e| DeviceError::Thread("rtc-timer", e))?;

    // fw_cfg: e820, CPU count, no boot menu (QEMU's defaults).
    let mut fw_cfg = FwCfg::new();
    let cpus = u16::try_from(info.cpus).unwrap_or(u16::MAX);
    fw_cfg.set_cpu_count(cpus);
    fw_cfg.set_max_cpus(cpus);
    fw_cfg.set_boot_menu(false);
    let mut e820 = vec![E820Entry {
        addr: 0,
        len: info.layout.below_4g,
        kind: iovirt_legacy::fw_cfg::E820_RAM,
    }];
    if info.layout.above_4g > 0 {
        e820.push(E820Entry {
            addr: crate::layout::FOUR_GIB,
            len: info.layout.above_4g,
            kind: iovirt_legacy::fw_cfg::E820_RAM,
        });
    }
    fw_cfg.add_e820(&e820)?;
    fw_cfg.add_int_file("etc/show-boot-menu", 0)?;
    pio.insert(
        "fw_cfg",
        FW_CFG_PORT,
        FW_CFG_LEN,
        Arc::new(Mutex::new(fw_cfg)),
    )?;

    // PCI: i440FX host bridge at 00:00.0, PIIX3 ISA bridge at 00:01.0.
    let pci = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
    pci.register()?;
    // The PIIX reset control register (0xCF9, Linux `reboot=pci`) ends the run like the i8042's.
    let reset_exit = exit.clone();
    pci.set_reset_handler(Arc::new(move || {
        reset_exit.request(ExitReason::Reset("PIIX reset control (port 0xCF9)".into()))
    }));
    pci.add_function(I440FX_ADDRESS, I440fx::with_observer(Arc::new(PamLog)))?;
    let piix3 = pci.add_function(PIIX3_ADDRESS, Piix3::new())?;

    Ok(Devices { serial, pci, piix3 })
}
