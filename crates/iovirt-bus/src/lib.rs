//! # iovirt-bus: where a trap becomes a device access
//!
//! In iovirt's I/O path (guest driver → trap → **bus** → front-end device →
//! filters → scheduler → back-end), this crate is the second step. A hypervisor
//! that catches a port I/O or MMIO exit hands the address and data to a [`Bus`],
//! which finds the device that claims the address in O(log n) and calls it with
//! the offset into the device's range. The crate also defines how device models
//! raise interrupts ([`interrupt`]) and the PCI root bus that firmware and
//! guest drivers enumerate ([`pci`]).
//!
//! It must never know about KVM or any other hypervisor, never take a bus-wide
//! lock on the dispatch path, and never panic on an address or value a guest
//! chose: unclaimed reads return all-ones, unclaimed writes are dropped, and
//! both are counted.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use iovirt_bus::{AddressSpace, Bus, BusDeviceMut};
//!
//! /// A one-byte scratch register.
//! struct Scratch(u8);
//! impl BusDeviceMut for Scratch {
//!     fn read(&mut self, _offset: u64, data: &mut [u8]) { data.fill(self.0) }
//!     fn write(&mut self, _offset: u64, data: &[u8]) { self.0 = data[0] }
//! }
//!
//! let pio = Bus::new(AddressSpace::Pio);
//! pio.insert("scratch", 0x80, 1, Arc::new(Mutex::new(Scratch(0)))).unwrap();
//! assert!(pio.write(0x80, &[0x42]));
//! let mut b = [0u8; 1];
//! pio.read(0x80, &mut b);
//! assert_eq!(b, [0x42]);
//! assert!(!pio.read(0x81, &mut b)); // nobody there
//! assert_eq!(b, [0xff]);
//! assert_eq!(pio.stats("scratch").unwrap().traps(), 2);
//! ```
#![deny(missing_docs)]

mod bus;
pub mod interrupt;
pub mod pci;

pub use bus::{
    AddressSpace, Bus, BusDevice, BusDeviceMut, BusError, Claim, RangeInfo, TrapCounters, TrapStats,
};
pub use interrupt::{InterruptError, InterruptLine, MsiMessage, MsiSink};
