//! `--trap-stats FILE`: the buses' per-device trap counters, KVM exits by kind
//! and interrupts by delivery path, written as JSON when the VM stops.
//!
//! A *trap* is one device access the bus dispatched: a string instruction
//! (`rep insw`) that KVM hands over in one exit counts once per item, as the
//! device sees it; `exits` counts the `KVM_RUN` returns themselves. Virtio
//! queue notifications written to an address with an ioeventfd are handled by
//! KVM and appear in neither.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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
#[derive(Debug, Serialize)]
pub struct ExitSnapshot {
    /// Port I/O exits.
    pub io: u64,
    /// MMIO exits.
    pub mmio: u64,
    /// Other exits.
    pub other: u64,
}

/// One bus in the JSON file.
#[derive(Debug, Serialize)]
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

/// The whole file.
#[derive(Debug, Serialize)]
pub struct TrapReport {
    /// Port I/O traps.
    pub pio: BusSnapshot,
    /// MMIO traps.
    pub mmio: BusSnapshot,
    /// `KVM_RUN` exits.
    pub exits: ExitSnapshot,
    /// Interrupts delivered, by path.
    pub interrupts: IrqSnapshot,
    /// ioeventfds registered when the VM stopped (virtio queue notify addresses).
    pub ioeventfds: u64,
    /// What the counters do not see.
    pub note: &'static str,
}

/// Collect the counters now.
pub fn report(pio: &Bus, mmio: &Bus) -> TrapReport {
    TrapReport {
        pio: BusSnapshot::of(pio),
        mmio: BusSnapshot::of(mmio),
        exits: ExitSnapshot {
            io: EXITS.io.load(Ordering::Relaxed),
            mmio: EXITS.mmio.load(Ordering::Relaxed),
            other: EXITS.other.load(Ordering::Relaxed),
        },
        interrupts: IRQ_COUNTERS.snapshot(),
        ioeventfds: crate::disks::IOEVENTFDS_REGISTERED.load(Ordering::Relaxed),
        note: "virtio queue notifications to an ioeventfd address are handled by KVM and never \
               trap; a string I/O instruction counts one trap per item but one exit",
    }
}

/// Write the report to `path`.
pub fn write(path: &Path, pio: &Bus, mmio: &Bus) -> std::io::Result<()> {
    let json = serde_json::to_string_pretty(&report(pio, mmio)).map_err(std::io::Error::other)?;
    std::fs::write(path, json + "\n")
}
