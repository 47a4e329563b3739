//! # iovirt-virtio: paravirtual devices and their transports
//!
//! In iovirt's I/O path (guest driver → trap → bus → **front-end device** →
//! filters → scheduler → back-end), this crate is the paravirtual front-end.
//! A guest's virtio driver reaches a device through a transport: the PCI
//! transport ([`pci::VirtioPciDevice`], a [`iovirt_bus::pci::PciFunction`] on a
//! `PciRoot`) or the MMIO transport ([`mmio::VirtioMmioDevice`], an
//! [`iovirt_bus::BusDevice`]). The transport runs the device-status state
//! machine, negotiates features and collects queue addresses; at DRIVER_OK it
//! activates the [`VirtioDevice`] with its queues, one notification
//! [`EventFd`](vmm_sys_util::eventfd::EventFd) per queue (which a VMM may register as
//! an ioeventfd) and a [`VirtioInterrupt`] (MSI-X vectors, or INTx and the ISR;
//! the MMIO interrupt-status register and a line). The device works on its
//! own threads: [`block::VirtioBlock`] parses each descriptor chain into a typed
//! request and submits it to an [`iovirt_backend::BlockBackend`], which may
//! be a filter stack, a scheduler or a remote disk.
//!
//! It must never trust the guest: every register value, descriptor and request
//! is checked, malformed requests complete with an error status, and nothing a
//! guest writes may panic, hang or corrupt the host. It never knows KVM.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{Inline, MemoryBackend};
//! use iovirt_bus::interrupt::test_doubles::RecordingLine;
//! use iovirt_bus::BusDeviceMut;
//! use iovirt_virtio::block::{BlockConfig, VirtioBlock};
//! use iovirt_virtio::mmio::{MmioInterruptMode, VirtioMmioDevice};
//! use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
//!
//! let mem = GuestMemoryAtomic::new(
//!     GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
//! );
//! let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let blk = VirtioBlock::new(disk, BlockConfig::default()).unwrap();
//! let line = Arc::new(RecordingLine::new());
//! let mut dev = VirtioMmioDevice::new(Box::new(blk), mem, line, MmioInterruptMode::Level).unwrap();
//! let mut r = [0u8; 4];
//! dev.read(0x000, &mut r);
//! assert_eq!(&r, b"virt");
//! dev.read(0x008, &mut r);
//! assert_eq!(u32::from_le_bytes(r), 2); // a block device
//! // The VMM registers each queue's event as an ioeventfd (or lets QueueNotify write it).
//! assert_eq!(dev.queue_eventfds().len(), 1);
//! ```
#![deny(missing_docs)]

pub mod block;
mod device;
pub mod mmio;
pub mod pci;
mod transport;

pub use device::{read_config_bytes, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
pub use transport::{QueueRegs, NO_VECTOR};

/// Device status bit 0: the guest found the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status bit 1: the guest has a driver for the device.
pub const STATUS_DRIVER: u8 = 2;
/// Device status bit 2: the driver is ready to drive the device.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status bit 3: the driver acked features and the device accepted them.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status bit 6: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// Device status bit 7: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// Feature bit 28: descriptors may point to indirect descriptor tables.
pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
/// Feature bit 29: used_event/avail_event fields suppress notifications.
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
/// Feature bit 32: a virtio 1.x (non-legacy) device; required by our transports.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
