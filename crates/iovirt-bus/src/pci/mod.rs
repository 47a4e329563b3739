//! The PCI root bus: configuration mechanism #1, configuration spaces, BARs and MSI-X.
//!
//! A device model implements [`PciFunction`]: it owns a [`ConfigSpace`]
//! (identity, BARs, capabilities) and serves accesses to its BAR regions.
//! A [`PciRoot`] sits on the PIO bus at 0xCF8..0xCFF, routes config cycles to
//! functions by [`PciAddress`], and keeps every decoding BAR registered on the
//! PIO or MMIO [`crate::Bus`] as the guest programs it. [`Msix`] implements the
//! MSI-X capability, vector table and pending bits for functions that want it.
//!
//! Nothing here knows a hypervisor; the VMM wires the buses to its exits and
//! may watch BAR moves through a [`BarObserver`] (for ioeventfds and the like).

use std::fmt;

use serde::{Deserialize, Serialize};

mod config;
mod msix;
mod root;

pub use config::*;
pub use msix::{
    Msix, MsixEntry, MsixLocation, MsixState, MSIX_CAPABILITY_ID, MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK, MSIX_CONTROL_TABLE_SIZE, MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS,
    MSIX_VECTOR_MASKED,
};
pub use root::{
    BarEvent, BarObserver, PciRoot, CONFIG_ADDRESS_ENABLE, CONFIG_PORT, CONFIG_PORT_LEN,
    RESET_CONTROL_RST_CPU, RESET_CONTROL_SYS_RST,
};

/// Errors from building PCI functions and adding them to a root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Device number above 31 or function number above 7.
    #[error("invalid PCI address {0}: device must be 0..=31 and function 0..=7")]
    InvalidAddress(PciAddress),
    /// The root only serves bus 0.
    #[error("PCI address {0} is not on bus 0, the only bus of this root")]
    UnsupportedBus(PciAddress),
    /// A function is already registered at this address.
    #[error("a PCI function is already registered at {0}")]
    AddressInUse(PciAddress),
    /// A BAR declaration is not valid.
    #[error("BAR {index}: {reason}")]
    InvalidBar {
        /// BAR index.
        index: u8,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The BAR slot (or the second slot a 64-bit BAR needs) is already declared.
    #[error("BAR slot {0} is already in use")]
    BarInUse(u8),
    /// The interrupt pin must be 0 (none) or 1..=4 (INTA#..INTD#).
    #[error("invalid interrupt pin {0}: must be 0..=4")]
    InvalidInterruptPin(u8),
    /// A capability's writable mask is not as long as its body.
    #[error("capability body is {body} bytes but its writable mask is {mask}")]
    CapabilityMaskLength {
        /// Body length.
        body: usize,
        /// Mask length.
        mask: usize,
    },
    /// No room left in config space for a capability.
    #[error("no room in config space for capability {id:#04x} of {len} bytes")]
    NoCapabilitySpace {
        /// Capability ID.
        id: u8,
        /// Bytes needed including the ID and next pointer.
        len: usize,
    },
    /// An MSI-X configuration is not valid.
    #[error("invalid MSI-X configuration: {0}")]
    InvalidMsix(&'static str),
    /// Saved state has the wrong length.
    #[error("saved state has {actual} entries, expected {expected}")]
    StateLength {
        /// Expected length.
        expected: usize,
        /// Length found.
        actual: usize,
    },
    /// Saved config space differs from this function in a read-only bit.
    #[error("saved config byte {offset:#x} is {actual:#04x} but its read-only bits must match {expected:#04x}")]
    ReadOnlyMismatch {
        /// Offset of the byte.
        offset: usize,
        /// This function's value.
        expected: u8,
        /// Saved value.
        actual: u8,
    },
    /// The PIO or MMIO bus the root was built with has been dropped.
    #[error("the PCI root's PIO or MMIO bus no longer exists")]
    BusGone,
    /// Registering on a bus failed.
    #[error(transparent)]
    Bus(#[from] crate::BusError),
    /// No function is registered at this address.
    #[error("no PCI function at {0}")]
    NoFunction(PciAddress),
}

/// Bus, device and function number of a PCI function.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct PciAddress {
    /// Bus number (this root serves bus 0 only).
    pub bus: u8,
    /// Device (slot) number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
}

impl PciAddress {
    /// The address `bus:device.function`; errors unless device ≤ 31 and function ≤ 7.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        let a = PciAddress {
            bus,
            device,
            function,
        };
        a.check()?;
        Ok(a)
    }

    fn check(&self) -> Result<(), PciError> {
        if self.device > 31 || self.function > 7 {
            return Err(PciError::InvalidAddress(*self));
        }
        Ok(())
    }

    /// Device and function packed as in config address bits 15:8 (`device << 3 | function`).
    pub fn devfn(&self) -> u8 {
        ((self.device & 0x1f) << 3) | (self.function & 0x7)
    }

    /// The address of `devfn` on `bus`.
    pub fn from_devfn(bus: u8, devfn: u8) -> Self {
        PciAddress {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// A PCI function a device model implements.
///
/// The root calls these methods with the function locked (it keeps every
/// function in a [`std::sync::Mutex`]), from whichever vCPU thread trapped.
/// Config offsets are below 256 and an access never crosses a dword; BAR
/// offsets are relative to the BAR's base and stay inside the BAR.
pub trait PciFunction: Send {
    /// The function's configuration space.
    fn config(&self) -> &ConfigSpace;
    /// The function's configuration space, mutably.
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// A guest config read. Override to compute device-specific registers;
    /// the default returns the config space bytes.
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config().read(offset, data)
    }

    /// A guest config write. Override to react to device-specific registers
    /// (call `self.config_mut().write(offset, data)` first to apply the
    /// masks); the default only applies the masks. The root re-evaluates the
    /// BARs after it returns.
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    /// A guest read of BAR `bar` at `offset`. Default: all-ones.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let _ = (bar, offset);
        data.fill(0xff)
    }

    /// A guest write of BAR `bar` at `offset`. Default: dropped.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let _ = (bar, offset, data);
    }
}
