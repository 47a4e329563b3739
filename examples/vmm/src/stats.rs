//! `--trap-stats FILE`: the buses' per-device trap counters, KVM exits by kind
//! and interrupts by delivery path, written as JSON when the VM stops.
//!
//! Marks: each line `TRAP-MARK <label>` the guest writes to the debug console
//! (port 0x402) records a snapshot of the same counters under `marks`, so a
//! workload can be measured between two points of one run (firmware start-up
//! excluded) by subtracting one mark from the next. At most [`MAX_MARKS`] are kept.
//!
//! A *trap* is one device access the bus dispatched: a string instruction
//! (`rep insw`) that KVM hands over in one exit counts once per item, as the
//! device sees it; `exits` counts the `KVM_RUN` returns themselves. Virtio
//! queue notifications written to an address with an ioeventfd are handled by
//! KVM and appear in neither.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use iovirt_bus::{Bus, TrapStats};
use serde::Serialize;

use crate::irq::{IrqSnapshot, IRQ_COUNTERS};

/// `KVM_RUN` exits by kind, all vCPUs together.
pub struct ExitCounters {
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Every other exit (HLT, interrupted, system events...).
    pub other: AtomicU64,
}

/// The process's exit counters.
pub static EXITS: ExitCounters = ExitCounters {
    io: AtomicU64::new(0),
    mmio: AtomicU64::new(0),
    other: AtomicU64::new(0),
};

/// Exit counts in the JSON file.
#[derive(Clone, Debug, Serialize)]
pub struct ExitSnapshot {
    /// Port I/O exits.
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Other exits.
    pub other: u64,
}

/// One bus in the JSON file.
#[derive(Clone, Debug, Serialize)]
pub struct BusSnapshot {
    /// Per device name (BARs are named like `00:04.0-bar0`).
    pub devices: BTreeMap<String, TrapStats>,
    /// Accesses no device claimed.
    pub unclaimed: TrapStats,
}

impl BusSnapshot {
    fn of(bus: &Bus) -> Self {
        BusSnapshot {
            devices: bus.all_stats(),
            unclaimed: bus.unclaimed_stats(),
        }
    }
}

/// Every counter at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Port I/O traps.
    pub pio: BusSnapshot,
    /// MMIO traps.
    pub mmio: BusSnapshot,
    /// `KVM_RUN` exits.
    pub exits: ExitSnapshot,
    /// Interrupts delivered, by path.
    pub interrupts: IrqSnapshot,
}

/// A snapshot the guest asked for with a `TRAP-MARK <label>` line.
#[derive(Clone, Debug, Serialize)]
pub struct Mark {
    /// The text after `TRAP-MARK `.
    pub label: String,
    /// The counters when the line ended.
    #[serde(flatten)]
    pub at: Snapshot,
}

/// The whole file: the counters at exit, plus the guest's marks.
#[derive(Debug, Serialize)]
pub struct TrapReport {
    /// Counters when the VM stopped.
    #[serde(flatten)]
    pub at_exit: Snapshot,
    /// Snapshots at the guest's `TRAP-MARK` lines, in order.
    pub marks: Vec<Mark>,
    /// ioeventfds registered when the VM stopped (virtio queue notify addresses).
    pub ioeventfds: u64,
    /// The IOMMU's endpoints and DMA fault count (`--iommu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iommu: Option<crate::iommu::IommuSnapshot>,
    /// What the counters do not see.
    pub note: &'static str,
}

/// Most marks kept (the guest chooses how many it writes).
pub const MAX_MARKS: usize = 64;
/// Longest debug-console line inspected for a mark; longer lines are not marks.
const MAX_LINE: usize = 80;
/// The prefix of a mark line.
const MARK_PREFIX: &[u8] = b"TRAP-MARK ";

/// The buses marks snapshot, set by [`enable_marks`].
static BUSES: OnceLock<(Weak<Bus>, Weak<Bus>)> = OnceLock::new();
static MARKS: Mutex<Vec<Mark>> = Mutex::new(Vec::new());

/// Let `TRAP-MARK` lines snapshot `pio` and `mmio` (only with `--trap-stats`).
pub fn enable_marks(pio: &Arc<Bus>, mmio: &Arc<Bus>) {
    let _ = BUSES.set((Arc::downgrade(pio), Arc::downgrade(mmio)));
}

/// Collect the counters now.
pub fn snapshot(pio: &Bus, mmio: &Bus) -> Snapshot {
    Snapshot {
        pio: BusSnapshot::of(pio),
        mmio: BusSnapshot::of(mmio),
        exits: ExitSnapshot {
            io: EXITS.io.load(Ordering::Relaxed),
            mmio: EXITS.mmio.load(Ordering::Relaxed),
            other: EXITS.other.load(Ordering::Relaxed),
        },
        interrupts: IRQ_COUNTERS.snapshot(),
    }
}

/// Write the report to `path`.
pub fn write(path: &Path, pio: &Bus, mmio: &Bus) -> std::io::Result<()> {
    let report = TrapReport {
        at_exit: snapshot(pio, mmio),
        marks: MARKS.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        ioeventfds: crate::disks::IOEVENTFDS_REGISTERED.load(Ordering::Relaxed),
        iommu: crate::iommu::snapshot(),
        note: "virtio queue notifications to an ioeventfd address are handled by KVM and never \
               trap; a string I/O instruction counts one trap per item but one exit",
    };
    let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
    std::fs::write(path, json + "\n")
}

/// The debug console's output: passed through, and watched for `TRAP-MARK` lines.
pub struct MarkWriter<W: Write + Send> {
    out: W,
    line: Vec<u8>,
    too_long: bool,
}

impl<W: Write + Send> MarkWriter<W> {
    /// Watch what goes to `out`.
    pub fn new(out: W) -> Self {
        MarkWriter {
            out,
            line: Vec::with_capacity(MAX_LINE),
            too_long: false,
        }
    }

    fn end_of_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let too_long = std::mem::replace(&mut self.too_long, false);
        let Some(label) = line.strip_prefix(MARK_PREFIX).filter(|_| !too_long) else {
            return;
        };
        let Some((pio, mmio)) = BUSES
            .get()
            .and_then(|(p, m)| Some((p.upgrade()?, m.upgrade()?)))
        else {
            return;
        };
        let mut marks = MARKS.lock().unwrap_or_else(|e| e.into_inner());
        if marks.len() < MAX_MARKS {
            marks.push(Mark {
                label: String::from_utf8_lossy(label).trim().to_string(),
                at: snapshot(&pio, &mmio),
            });
        }
    }
}

impl<W: Write + Send> Write for MarkWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            match b {
                b'\n' => self.end_of_line(),
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => self.too_long = true,
            }
        }
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
