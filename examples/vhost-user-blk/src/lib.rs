//! # iovirt-vhost-user-blk: iovirt's virtio-blk device, out of process
//!
//! In iovirt's I/O path (guest driver → virtqueue notify → **front-end device**
//! → filters → scheduler → back-end), this daemon is the front-end device run
//! outside the VMM: the VMM (QEMU, Cloud Hypervisor, crosvm) shares guest
//! memory and the virtqueues over a vhost-user socket, kicks an eventfd when
//! the guest notifies a queue and injects the interrupt when the daemon writes
//! the call eventfd. rust-vmm's `vhost-user-backend` speaks the protocol; this
//! crate runs iovirt-virtio's virtio-blk queue processing on the shared rings,
//! which parses each request and submits it asynchronously to an
//! `iovirt-backend` [`BlockBackend`](iovirt_backend::BlockBackend) (raw file
//! with a cache mode, memory, null, or an `iovirt-filter` stack described in a
//! TOML file: `--disk stack=FILE.toml`), keeping many requests in flight.
//!
//! With `--iommu-platform on` the device offers VIRTIO_F_ACCESS_PLATFORM: when
//! the frontend (QEMU with a vIOMMU and `iommu_platform=on`) negotiates it,
//! rings and buffers are addressed by IOVAs, translated through a device IOTLB
//! ([`iotlb`]) that the frontend fills with vhost-user IOTLB messages, relayed
//! in front of rust-vmm's handler by [`proxy`] (docs/IOMMU.md).
//!
//! It must never trust the frontend or the guest: malformed rings and requests
//! complete with an error status and a log line, never a panic; a frontend that
//! disconnects leaves the daemon ready for the next one.
//!
//! One daemon can serve several exports (several VMs), each on its own socket
//! with its own disk, serial, queues and scheduling parameters
//! ([`config`]); all exports then share one `iovirt-sched` mClock stage, so
//! weights, reservations and limits divide the back-ends between them
//! ([`daemon`]).
//!
//! ```
//! use std::time::Duration;
//! use iovirt_vhost_user_blk::device::BlkDevice;
//! use iovirt_vhost_user_blk::disk::DiskSpec;
//! use iovirt_virtio::block::BlockConfig;
//! use vhost_user_backend::VhostUserBackend;
//! use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
//!
//! let disk = "memory,size=1M".parse::<DiskSpec>().unwrap().open().unwrap();
//! let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
//! let dev = BlkDevice::new(disk, BlockConfig::default(), mem, Duration::ZERO).unwrap();
//! // Capacity in 512-byte sectors, at offset 0 of the configuration space.
//! assert_eq!(dev.get_config(0, 8), 2048u64.to_le_bytes());
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod daemon;
pub mod device;
pub mod disk;
pub mod iotlb;
pub mod poll;
pub mod proxy;
pub mod server;

use std::path::PathBuf;

/// Why the daemon stopped or could not start; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad command line.
    #[error("{0}")]
    Usage(String),
    /// The disk could not be opened.
    #[error(transparent)]
    Open(#[from] iovirt_backend::OpenError),
    /// A filter stack description is invalid or could not be built; the
    /// message names the node (`vda.child: ...`).
    #[error("--disk stack={}: {source}", path.display())]
    Stack {
        /// The stack description file.
        path: PathBuf,
        /// What the stack builder said.
        #[source]
        source: iovirt_filter::stack::StackError,
    },
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What vhost said.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// Eventfds or epoll registration failed.
    #[error("cannot set up the device: {0}")]
    Setup(#[source] std::io::Error),
    /// The control socket (`--control`) could not be served.
    #[error("--control {}: {source}", path.display())]
    Control {
        /// The socket path.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
}
