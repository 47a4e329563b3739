//! `--iommu vtd|virtio`: one IOMMU in front of every disk's DMA.
//!
//! Each DMA-capable function (virtio-blk-pci at 00:04.0 upward, the PIIX3 IDE
//! function's bus master at 00:01.1) gets its own [`DmaView`] carrying its
//! PCI requester ID, so every ring, descriptor and data access is translated
//! and checked before it reaches guest RAM; a DMA that does not translate fails
//! with the device's error status, is logged, and is counted in the
//! `--trap-stats` file (`iommu`).
//!
//! - `vtd`: an emulated Intel VT-d unit ([`Vtd`]) whose 4 KiB register page sits
//!   on the MMIO bus at [`VTD_BASE`]; its fault and invalidation-completion
//!   events are MSIs through the VMM's [`MsiSink`] (irqfd routes). The guest owns
//!   the page tables; until it sets GCMD.TE, DMA passes through untranslated.
//! - `virtio`: a virtio-iommu-pci function at [`VIRTIO_IOMMU_SLOT`] over an
//!   [`Iommu`]. Every endpoint starts in bypass (like QEMU's `boot-bypass=on`), so
//!   firmware keeps working; the driver's ATTACH moves it into a domain, after
//!   which only what the guest MAPs is reachable.
//!
//! For direct Linux boot the VMM publishes the unit in ACPI ([`IommuWiring::acpi_table`]
//! gives the DMAR or VIOT table; see [`crate::boot::acpi`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use iovirt_bus::pci::{PciAddress, PciError, PciRoot};
use iovirt_bus::{Bus, BusError, MsiSink};
use iovirt_iommu::virtio::{acpi::viot_table, VirtioIommu, VirtioIommuConfig};
use iovirt_iommu::vtd::{regs::MMIO_SIZE, Vtd, VtdConfig};
use iovirt_iommu::{Attachment, DmaView, FaultLog, Iommu, RequesterId, Translator};
use iovirt_virtio::pci::{VirtioPciDevice, VirtioPciError};
use serde::Serialize;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::cli::IommuKind;

/// Guest-physical base of the VT-d register page (QEMU's q35 uses the same).
pub const VTD_BASE: u64 = 0xfed9_0000;
/// PCI slot of the virtio-iommu-pci function on bus 0.
pub const VIRTIO_IOMMU_SLOT: u8 = 3;

/// Errors wiring the IOMMU.
#[derive(Debug, thiserror::Error)]
pub enum IommuError {
    /// The VT-d registers could not be put on the MMIO bus.
    #[error("VT-d registers at {VTD_BASE:#x}: {0}")]
    Bus(#[from] BusError),
    /// The virtio-pci transport refused the virtio-iommu device.
    #[error("virtio-iommu-pci: {0}")]
    Transport(#[from] VirtioPciError),
    /// The PCI root refused the virtio-iommu function.
    #[error("virtio-iommu-pci: {0}")]
    Pci(#[from] PciError),
}

enum Unit {
    Vtd(Arc<Vtd<GuestMemoryMmap>>),
    Virtio {
        /// Until [`IommuWiring::finish`] puts it on the PCI root.
        device: Mutex<Option<VirtioIommu<GuestMemoryMmap>>>,
        iommu: Arc<Iommu>,
    },
}

/// The VM's IOMMU and the endpoints behind it.
pub struct IommuWiring {
    unit: Unit,
    translator: Arc<dyn Translator>,
    endpoints: Mutex<Vec<RequesterId>>,
}

/// What `--trap-stats` shows of the IOMMU.
#[derive(Clone, Debug, Serialize)]
pub struct IommuSnapshot {
    /// `vtd` or `virtio`.
    pub kind: &'static str,
    /// Requester IDs behind it (`bb:dd.f`).
    pub endpoints: Vec<String>,
    /// DMA faults reported (translation or permission), all endpoints.
    pub faults: u64,
    /// Faults that did not fit in the bounded log.
    pub faults_dropped: u64,
    /// Whether the guest has turned translation on (VT-d GSTS.TE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub translation_enabled: Option<bool>,
}

/// The process's IOMMU, for the trap-stats file (one VM per process).
static WIRED: OnceLock<Arc<IommuWiring>> = OnceLock::new();
/// Views handed out (one per endpoint and memory user).
pub static VIEWS: AtomicU64 = AtomicU64::new(0);

impl IommuWiring {
    /// Build the IOMMU `kind` over `ram`. For VT-d the register page goes on
    /// `mmio` at [`VTD_BASE`] and events go to `msi`.
    pub fn new(
        kind: IommuKind,
        ram: &GuestMemoryMmap,
        mmio: &Bus,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Arc<Self>, IommuError> {
        let (unit, translator): (Unit, Arc<dyn Translator>) = match kind {
            IommuKind::Vtd => {
                let vtd = Arc::new(Vtd::new(VtdConfig::default(), ram.clone(), msi));
                mmio.insert("vtd", VTD_BASE, MMIO_SIZE, vtd.clone())?;
                log::info!("VT-d unit at {VTD_BASE:#x}");
                (Unit::Vtd(vtd.clone()), vtd)
            }
            IommuKind::Virtio => {
                let dev = VirtioIommu::<GuestMemoryMmap>::new(VirtioIommuConfig::default());
                let iommu = dev.iommu().clone();
                (
                    Unit::Virtio {
                        device: Mutex::new(Some(dev)),
                        iommu: iommu.clone(),
                    },
                    iommu,
                )
            }
        };
        let w = Arc::new(IommuWiring {
            unit,
            translator,
            endpoints: Mutex::new(Vec::new()),
        });
        let _ = WIRED.set(w.clone());
        Ok(w)
    }

    /// The IOMMU's model.
    pub fn kind(&self) -> IommuKind {
        match self.unit {
            Unit::Vtd(_) => IommuKind::Vtd,
            Unit::Virtio { .. } => IommuKind::Virtio,
        }
    }

    /// Requester `rid`'s view of `ram`: every access is translated for `rid`.
    /// The first call for a `rid` makes it an endpoint (virtio-iommu: in bypass
    /// until the driver attaches it).
    pub fn view(&self, ram: &GuestMemoryMmap, rid: RequesterId) -> DmaView<GuestMemoryMmap> {
        let mut eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if !eps.contains(&rid) {
            eps.push(rid);
            if let Unit::Virtio { device, iommu } = &self.unit {
                if let Some(dev) = device.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    dev.add_endpoint(rid);
                }
                // Boot bypass: firmware DMAs untranslated until the driver attaches.
                if let Err(e) = iommu.attach(rid, Attachment::Bypass) {
                    log::warn!("virtio-iommu: cannot put {rid} in bypass: {e}");
                }
            }
        }
        VIEWS.fetch_add(1, Ordering::Relaxed);
        DmaView::new(ram.clone(), rid, self.translator.clone())
    }

    /// Put the virtio-iommu-pci function on `pci` (a no-op for VT-d). Call after
    /// every endpoint has its view. Its own rings are not translated.
    pub fn finish(
        &self,
        ram: &GuestMemoryMmap,
        pci: &PciRoot,
        msi: Arc<dyn MsiSink>,
    ) -> Result<(), IommuError> {
        let Unit::Virtio { device, .. } = &self.unit else {
            return Ok(());
        };
        let Some(dev) = device.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let f = VirtioPciDevice::new(
            Box::new(dev),
            GuestMemoryAtomic::new(ram.clone()),
            msi,
            None,
        )?;
        let addr = PciAddress::new(0, VIRTIO_IOMMU_SLOT, 0)?;
        pci.add_function(addr, f)?;
        log::info!("virtio-iommu-pci at {addr}");
        Ok(())
    }

    /// The ACPI table announcing the IOMMU: DMAR (VT-d, all PCI devices) or
    /// VIOT (virtio-iommu, one PCI range per endpoint).
    pub fn acpi_table(&self) -> Vec<u8> {
        match &self.unit {
            Unit::Vtd(vtd) => vtd.dmar_table(VTD_BASE),
            Unit::Virtio { .. } => {
                let eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
                let ranges: Vec<(u16, u16)> = eps.iter().map(|r| (r.0, r.0)).collect();
                // bus 0, device VIRTIO_IOMMU_SLOT, function 0.
                viot_table(u16::from(VIRTIO_IOMMU_SLOT) << 3, &ranges)
            }
        }
    }

    /// The log every unresolved DMA fault lands in.
    pub fn faults(&self) -> &FaultLog {
        match &self.unit {
            Unit::Vtd(v) => v.faults(),
            Unit::Virtio { iommu, .. } => iommu.faults(),
        }
    }

    /// The counters for `--trap-stats`.
    pub fn snapshot(&self) -> IommuSnapshot {
        let eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        IommuSnapshot {
            kind: match self.kind() {
                IommuKind::Vtd => "vtd",
                IommuKind::Virtio => "virtio",
            },
            endpoints: eps.iter().map(|r| r.to_string()).collect(),
            faults: self.faults().total(),
            faults_dropped: self.faults().dropped(),
            translation_enabled: match &self.unit {
                Unit::Vtd(v) => Some(v.translation_enabled()),
                Unit::Virtio { .. } => None,
            },
        }
    }
}

/// The process's IOMMU counters, when `--iommu` is given.
pub fn snapshot() -> Option<IommuSnapshot> {
    WIRED.get().map(|w| w.snapshot())
}
