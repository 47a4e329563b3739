//! # iovirt-legacy: the PC chipset devices firmware and old guests expect
//!
//! Front-end device models in iovirt's I/O path (guest driver → trap → bus →
//! **front-end device** → filters → scheduler → back-end) for the legacy PC:
//! a 16550A UART, the i8042 controller, the CMOS RTC with its NVRAM, the debug
//! console port, QEMU's fw_cfg interface, and the i440FX host bridge and PIIX3
//! ISA bridge PCI functions.
//!
//! Each model is a hypervisor-agnostic state machine in the style of rust-vmm's
//! vm-superio: inputs are register accesses (through [`iovirt_bus::BusDeviceMut`])
//! and host events, outputs go through [`iovirt_bus::InterruptLine`] and small
//! traits; each has a serialisable `State` for snapshot and restore. No model
//! may panic on anything a guest writes.
#![deny(missing_docs)]

pub mod chipset;
pub mod debugcon;
pub mod fw_cfg;
pub mod i8042;
pub mod ide;
pub mod rtc;
pub mod serial;
