//! # iovirt-iommu: DMA remapping between device models and guest memory
//!
//! In iovirt's I/O path (guest driver → trap → bus → front-end device →
//! filters → scheduler → back-end → completion), a device model's DMA does
//! not touch guest memory directly: it passes the **IOMMU** on its way there.
//! Each device model is handed a [`DmaView`], a vm-memory
//! [`GuestMemory`](vm_memory::GuestMemory) whose addresses are that device's
//! I/O virtual addresses (IOVAs). The view translates every access page by
//! page for the device's requester ID through a [`Translator`] — the
//! host-programmed [`Iommu`] (domains the VMM or the virtio-iommu device
//! [`virtio::VirtioIommu`] fills with `map`/`unmap`) or an emulated Intel VT-d unit ([`vtd::Vtd`]) whose
//! page tables the guest owns — checks the read or write right, and only
//! then reaches guest-physical memory. virtio devices (through virtio-queue's
//! memory) and IDE bus-master DMA (through `IoBuffers::from_guest`) take the
//! view like any other guest memory, so DMA is translated and checked
//! whenever an IOMMU is configured, and costs nothing when it is not.
//!
//! Page tables use the VT-d second-level format (4 KiB, 2 MiB, 1 GiB pages;
//! 3, 4 or 5 levels) whether the guest or the host built them; translations
//! are cached in an [`Iotlb`] keyed by (domain, IOVA page) with global,
//! domain and page-selective invalidation. A DMA that fails to translate is a
//! [`Fault`] with reason, address and requester ID: recorded in a bounded
//! log (and, for VT-d, in the guest-visible fault recording registers with a
//! fault event interrupt), never a panic. A DMA that reaches a page that is
//! not present goes to a [`DmaFaultHook`] first, which may page it in.
//!
//! This crate must never trust the guest: every table entry is read once
//! through vm-memory with checked addresses, reserved bits fault, walks are
//! bounded by the level count, and no guest value is used as an unchecked
//! index. It knows no hypervisor.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_iommu::{Attachment, DmaView, Iommu, Perms, RequesterId, WalkConfig};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
//!
//! let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let iommu = Arc::new(Iommu::new());
//! iommu.create_domain(1, WalkConfig::FOUR_LEVEL).unwrap();
//! let nic = RequesterId::new(0, 3, 0);
//! iommu.attach(nic, Attachment::Domain(1)).unwrap();
//! // IOVA 0x1000_0000 → GPA 0x8000, read-only for the device.
//! iommu.map(1, 0x1000_0000, 0x8000, 0x1000, Perms::READ).unwrap();
//! ram.write_obj(0xdead_beef_u32, GuestAddress(0x8010)).unwrap();
//!
//! let view = DmaView::new(ram.clone(), nic, iommu.clone());
//! let v: u32 = view.read_obj(GuestAddress(0x1000_0010)).unwrap();
//! assert_eq!(v, 0xdead_beef);
//! // Writing is refused, and the fault is logged with who and where.
//! assert!(view.write_obj(1u32, GuestAddress(0x1000_0010)).is_err());
//! let f = iommu.faults().entries()[0];
//! assert_eq!((f.rid, f.iova), (nic, 0x1000_0010));
//! ```
#![deny(missing_docs)]

pub mod demand;
mod domain;
mod entry;
mod fault;
mod iotlb;
mod types;
mod unit;
mod view;
pub mod virtio;
pub mod vtd;
mod walk;

pub use domain::{DomainError, HostDomain, DEFAULT_MAX_TABLES};
pub use entry::{ContextEntry, LargePages, RootEntry, SlEntry, SlKind, TranslationType};
pub use fault::{Fault, FaultLog, FaultReason, FaultReporter};
pub use iotlb::{Iotlb, IotlbStats};
pub use types::{Access, Mapping, PageSize, Perms, RequesterId};
pub use unit::{identity, Attachment, Iommu, IommuError, Translator};
pub use view::{DmaFault, DmaFaultHook, DmaFaultKind, DmaView, HookAction};
pub use walk::{walk, GuestTables, TableSource, WalkConfig};
