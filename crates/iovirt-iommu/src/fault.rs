//! Translation faults: why a DMA was refused, a bounded log of them, and the
//! hook a VMM uses to hear about them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::types::{Access, RequesterId};

/// Why a translation failed. Each reason has the VT-d fault reason code
/// ([`FaultReason::vtd_code`]) a guest's driver decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum FaultReason {
    /// The root entry for the requester's bus is not present (VT-d 0x1).
    #[error("root entry not present")]
    RootNotPresent,
    /// No context entry (VT-d 0x2), or on the host side: the device is not attached to a domain.
    #[error("context entry not present (device not attached)")]
    ContextNotPresent,
    /// The context entry is present but programmed with an unsupported value (VT-d 0x3).
    #[error("invalid context entry")]
    InvalidContext,
    /// The IOVA is wider than the domain's address width (VT-d 0x4).
    #[error("address beyond the domain's address width")]
    AddressBeyondWidth,
    /// No mapping, or a mapping without the write right, for a write (VT-d 0x5).
    #[error("write access denied")]
    WriteDenied,
    /// No mapping, or a mapping without the read right, for a read (VT-d 0x6).
    #[error("read access denied")]
    ReadDenied,
    /// A paging-structure entry could not be read from memory (VT-d 0x7).
    #[error("paging entry not readable from memory")]
    PagingEntryAccess,
    /// The root table address is not memory (VT-d 0x8).
    #[error("root table address invalid")]
    RootTableInvalid,
    /// The context table address is not memory (VT-d 0x9).
    #[error("context table address invalid")]
    ContextTableInvalid,
    /// A reserved field of a root entry is set (VT-d 0xA).
    #[error("reserved bit set in root entry")]
    RootReserved,
    /// A reserved field of a context entry is set (VT-d 0xB).
    #[error("reserved bit set in context entry")]
    ContextReserved,
    /// A reserved field of a second-level paging entry is set (VT-d 0xC).
    #[error("reserved bit set in paging entry")]
    PagingReserved,
}

impl FaultReason {
    /// The "no right" reason for `access`.
    pub fn denied(access: Access) -> Self {
        match access {
            Access::Read => FaultReason::ReadDenied,
            Access::Write => FaultReason::WriteDenied,
        }
    }

    /// The fault reason code of the VT-d fault recording register.
    pub fn vtd_code(self) -> u8 {
        match self {
            FaultReason::RootNotPresent => 0x1,
            FaultReason::ContextNotPresent => 0x2,
            FaultReason::InvalidContext => 0x3,
            FaultReason::AddressBeyondWidth => 0x4,
            FaultReason::WriteDenied => 0x5,
            FaultReason::ReadDenied => 0x6,
            FaultReason::PagingEntryAccess => 0x7,
            FaultReason::RootTableInvalid => 0x8,
            FaultReason::ContextTableInvalid => 0x9,
            FaultReason::RootReserved => 0xa,
            FaultReason::ContextReserved => 0xb,
            FaultReason::PagingReserved => 0xc,
        }
    }
}

/// One refused DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("DMA {access:?} by {rid} at IOVA {iova:#x} refused: {reason}")]
pub struct Fault {
    /// Who made the DMA.
    pub rid: RequesterId,
    /// The IOVA that failed to translate.
    pub iova: u64,
    /// Read or write.
    pub access: Access,
    /// Why.
    pub reason: FaultReason,
}

/// Told about every recorded fault (for example to log it or count it per device).
pub trait FaultReporter: Send + Sync {
    /// `fault` was recorded.
    fn report(&self, fault: &Fault);
}

/// A bounded log of faults, oldest first; when full, the oldest is dropped and counted.
#[derive(Debug)]
pub struct FaultLog {
    capacity: usize,
    entries: Mutex<VecDeque<Fault>>,
    total: AtomicU64,
    dropped: AtomicU64,
}

impl Default for FaultLog {
    fn default() -> Self {
        Self::new(256)
    }
}

impl FaultLog {
    /// A log keeping at most `capacity` faults (at least one).
    pub fn new(capacity: usize) -> Self {
        FaultLog {
            capacity: capacity.max(1),
            entries: Mutex::new(VecDeque::new()),
            total: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Append `fault`.
    pub fn record(&self, fault: Fault) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if e.len() >= self.capacity {
            e.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        e.push_back(fault);
    }

    /// The faults kept, oldest first.
    pub fn entries(&self) -> Vec<Fault> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().copied().collect()
    }

    /// Remove and return the faults kept.
    pub fn drain(&self) -> Vec<Fault> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.drain(..).collect()
    }

    /// Faults recorded since creation (including dropped ones).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Faults dropped because the log was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_bounded() {
        let log = FaultLog::new(2);
        for i in 0..5 {
            log.record(Fault {
                rid: RequesterId::new(0, 4, 0),
                iova: i << 12,
                access: Access::Read,
                reason: FaultReason::ReadDenied,
            });
        }
        let e = log.entries();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].iova, 3 << 12);
        assert_eq!(log.total(), 5);
        assert_eq!(log.dropped(), 3);
        assert_eq!(
            e[0].to_string(),
            "DMA Read by 00:04.0 at IOVA 0x3000 refused: read access denied"
        );
    }
}
