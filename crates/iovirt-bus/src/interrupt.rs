//! Interrupt outputs of device models, as small traits any hypervisor can implement.
//!
//! A device model never knows how an interrupt reaches the guest: the example VMM
//! implements these traits with KVM's `irq_line`/irqfd and MSI routing; tests use
//! the recording doubles in [`test_doubles`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Why an interrupt could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The hypervisor refused the request.
    #[error("interrupt delivery failed: {0}")]
    Io(#[from] std::io::Error),
    /// The interrupt is not routed anywhere (for example an MSI vector without a route).
    #[error("interrupt is not routed: {0}")]
    NotRouted(String),
}

/// A wired interrupt line (an ISA IRQ, a PCI INTx pin after routing).
pub trait InterruptLine: Send + Sync {
    /// Deliver one edge (for edge-triggered lines such as ISA IRQs).
    fn trigger(&self) -> Result<(), InterruptError>;
    /// Drive the line's level (for level-triggered lines such as PCI INTx).
    fn set_level(&self, asserted: bool) -> Result<(), InterruptError>;
}

/// A message-signalled interrupt: the address/data pair a device writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Message address (x86: 0xFEEx_xxxx with destination and mode bits).
    pub address: u64,
    /// Message data (x86: vector and delivery mode).
    pub data: u32,
}

/// Where a device's MSI/MSI-X messages go.
pub trait MsiSink: Send + Sync {
    /// Deliver `msg` to the interrupt controller.
    fn send(&self, msg: MsiMessage) -> Result<(), InterruptError>;
}

/// Recording implementations for tests.
pub mod test_doubles {
    use super::*;

    /// An [`InterruptLine`] that counts edges and remembers the level.
    #[derive(Debug, Default)]
    pub struct RecordingLine {
        edges: AtomicU64,
        level: AtomicBool,
        level_changes: AtomicU64,
    }

    impl RecordingLine {
        /// A line with no edges seen and the level deasserted.
        pub fn new() -> Self {
            Self::default()
        }
        /// Edges delivered so far.
        pub fn edges(&self) -> u64 {
            self.edges.load(Ordering::SeqCst)
        }
        /// Current level.
        pub fn level(&self) -> bool {
            self.level.load(Ordering::SeqCst)
        }
        /// Number of `set_level` calls that changed the level.
        pub fn level_changes(&self) -> u64 {
            self.level_changes.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for RecordingLine {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.edges.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
            if self.level.swap(asserted, Ordering::SeqCst) != asserted {
                self.level_changes.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    /// An [`MsiSink`] that records every message.
    #[derive(Debug, Default)]
    pub struct RecordingMsiSink {
        messages: Mutex<Vec<MsiMessage>>,
    }

    impl RecordingMsiSink {
        /// An empty recorder.
        pub fn new() -> Self {
            Self::default()
        }
        /// Messages delivered so far, oldest first.
        pub fn messages(&self) -> Vec<MsiMessage> {
            self.messages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }
    }

    impl MsiSink for RecordingMsiSink {
        fn send(&self, msg: MsiMessage) -> Result<(), InterruptError> {
            self.messages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(msg);
            Ok(())
        }
    }
}
