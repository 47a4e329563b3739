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

#[cfg(test)]
mod tests {
    //! The VMM's own wiring with a guest that turned VT-d translation on: a
    //! virtio-blk request whose data buffer the tables do not map fails with
    //! VIRTIO_BLK_S_IOERR, and the fault is in the log, the fault recording
    //! registers, a fault event MSI and the trap-stats counters.

    use std::time::{Duration, Instant};

    use iovirt_backend::{Inline, MemoryBackend};
    use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
    use iovirt_bus::pci::PciFunction;
    use iovirt_bus::AddressSpace;
    use iovirt_iommu::vtd::regs::{
        FEADDR, FECTL, FEDATA, FRCD, FSTS, GCMD, GSTS, G_SRTP, G_TE, RTADDR,
    };
    use iovirt_iommu::{ContextEntry, PageSize, Perms, RootEntry, SlEntry};
    use iovirt_virtio::block::{BlockConfig, VirtioBlock};
    use iovirt_virtio::pci::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x12000;
    const ROOT: u64 = 0x40000;
    const CONTEXT: u64 = 0x41000;
    /// Three-level second-level table: L3, L2, L1.
    const SL: [u64; 3] = [0x42000, 0x43000, 0x44000];

    fn bar_w<T: PciFunction>(d: &mut T, off: u64, v: u64, len: usize) {
        d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
    }
    fn bar_r<T: PciFunction>(d: &mut T, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(VIRTIO_BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn reg_w(mmio: &Bus, off: u64, v: u64, len: usize) {
        assert!(mmio.write(VTD_BASE + off, &v.to_le_bytes()[..len]));
    }
    fn reg_r(mmio: &Bus, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(mmio.read(VTD_BASE + off, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    /// What a guest's intel-iommu driver leaves behind: root and context
    /// tables for 00:04.0 in domain 1, a 3-level table mapping the rings, the
    /// request header and the status byte 1:1, but not the data buffer.
    fn guest_tables(ram: &GuestMemoryMmap) {
        let put = |addr: u64, (lo, hi): (u64, u64)| {
            ram.write_obj(lo, GuestAddress(addr)).unwrap();
            ram.write_obj(hi, GuestAddress(addr + 8)).unwrap();
        };
        put(ROOT, RootEntry::with_context_table(CONTEXT).raw());
        let devfn = u64::from(RequesterId::new(0, 4, 0).devfn());
        put(
            CONTEXT + devfn * 16,
            ContextEntry::translating(1, SL[0], 3).raw(),
        );
        ram.write_obj(SlEntry::table(SL[1]).0, GuestAddress(SL[0]))
            .unwrap();
        ram.write_obj(SlEntry::table(SL[2]).0, GuestAddress(SL[1]))
            .unwrap();
        for page in [DESC, AVAIL, USED, HDR, STATUS] {
            let e = SlEntry::page(page, PageSize::Size4K, Perms::READ | Perms::WRITE);
            ram.write_obj(e.0, GuestAddress(SL[2] + (page >> 12) * 8))
                .unwrap();
        }
    }

    /// One 512-byte write request (header, data, status) as avail entry 0.
    fn post_write(ram: &GuestMemoryMmap) {
        let mut hdr = [0u8; 16];
        hdr[0] = 1; // VIRTIO_BLK_T_OUT
        ram.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        ram.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        ram.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        for (i, (a, l, f, next)) in [
            (HDR, 16u32, 1u16, 1u16),
            (DATA, 512, 1, 2),
            (STATUS, 1, 2, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let at = DESC + i as u64 * 16;
            ram.write_obj(a, GuestAddress(at)).unwrap();
            ram.write_obj(l, GuestAddress(at + 8)).unwrap();
            ram.write_obj(f, GuestAddress(at + 12)).unwrap();
            ram.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        ram.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        ram.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn vtd_translation_on_unmapped_buffer_fails_the_request_and_records_a_fault() {
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mmio = Bus::new(AddressSpace::Mmio);
        let sink = Arc::new(RecordingMsiSink::new());
        let w = IommuWiring::new(IommuKind::Vtd, &ram, &mmio, sink.clone()).unwrap();
        let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
        let blk = VirtioBlock::new(disk.clone(), BlockConfig::default()).unwrap();
        let rid = RequesterId::new(0, 4, 0);
        let mut dev = VirtioPciDevice::new(
            Box::new(blk),
            GuestMemoryAtomic::new(w.view(&ram, rid)),
            sink.clone(),
            None,
        )
        .unwrap();

        // The guest programs the unit through its MMIO page, as intel-iommu does.
        guest_tables(&ram);
        reg_w(&mmio, FEDATA, 0x4e, 4);
        reg_w(&mmio, FEADDR, 0xfee0_0000, 4);
        reg_w(&mmio, FECTL, 0, 4); // unmask the fault event
        reg_w(&mmio, RTADDR, ROOT, 8);
        reg_w(&mmio, GCMD, u64::from(G_SRTP), 4);
        reg_w(&mmio, GCMD, u64::from(G_TE), 4);
        assert_ne!(reg_r(&mmio, GSTS, 4) & u64::from(G_TE), 0);

        // The driver sets up queue 0 (no MSI-X: we poll the used ring).
        bar_w(&mut dev, COMMON_STATUS, 0, 1);
        bar_w(&mut dev, COMMON_STATUS, 3, 1);
        bar_w(&mut dev, COMMON_GFSELECT, 1, 4);
        bar_w(&mut dev, COMMON_GF, 1, 4); // VERSION_1
        bar_w(&mut dev, COMMON_STATUS, 0xb, 1);
        assert_eq!(bar_r(&mut dev, COMMON_STATUS, 1), 0xb);
        bar_w(&mut dev, COMMON_Q_SELECT, 0, 2);
        bar_w(&mut dev, COMMON_Q_SIZE, 16, 2);
        bar_w(&mut dev, COMMON_Q_DESC, DESC, 8);
        bar_w(&mut dev, COMMON_Q_AVAIL, AVAIL, 8);
        bar_w(&mut dev, COMMON_Q_USED, USED, 8);
        let noff = bar_r(&mut dev, COMMON_Q_NOFF, 2);
        bar_w(&mut dev, COMMON_Q_ENABLE, 1, 2);
        bar_w(&mut dev, COMMON_STATUS, 0xf, 1);

        post_write(&ram);
        bar_w(
            &mut dev,
            NOTIFY_OFFSET + noff * u64::from(NOTIFY_OFF_MULTIPLIER),
            0,
            2,
        );
        let t = Instant::now();
        while ram.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 1 {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "request never completed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The device answered with an error status and wrote nothing to the disk.
        assert_eq!(
            ram.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            1,
            "VIRTIO_BLK_S_IOERR"
        );
        assert!(disk.0.contents()[..512].iter().all(|b| *b == 0));

        // The fault: in the log, in the registers, as an MSI, in the counters.
        let faults = w.faults().entries();
        assert!(!faults.is_empty());
        assert!(
            faults
                .iter()
                .all(|f| f.rid == rid && f.iova & !0xfff == DATA),
            "{faults:?}"
        );
        assert_ne!(reg_r(&mmio, FSTS, 4) & 2, 0, "FSTS.PPF");
        let frcd_hi = reg_r(&mmio, FRCD + 8, 8);
        assert_ne!(frcd_hi >> 63, 0, "FRCD.F");
        assert_eq!(frcd_hi & 0xffff, u64::from(rid.0), "source ID");
        assert_eq!(reg_r(&mmio, FRCD, 8) & !0xfff, DATA, "fault address");
        assert!(sink
            .messages()
            .iter()
            .any(|m| m.data == 0x4e && m.address == 0xfee0_0000));
        let snap = w.snapshot();
        assert_eq!(snap.faults, faults.len() as u64);
        assert_eq!(snap.translation_enabled, Some(true));
        assert_eq!(snap.endpoints, vec!["00:04.0".to_string()]);
        // The guest's DMAR table names the unit at VTD_BASE.
        let dmar = w.acpi_table();
        assert_eq!(&dmar[..4], b"DMAR");
        assert!(dmar.windows(8).any(|x| x == VTD_BASE.to_le_bytes()));
    }

    #[test]
    fn vtd_translation_on_unmapped_prd_buffer_fails_ide_bus_master_dma() {
        use iovirt_bus::interrupt::test_doubles::RecordingLine;
        use iovirt_legacy::ide::{Ide, Slot};
        const PRD: u64 = 0x5000;
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mmio = Bus::new(AddressSpace::Mmio);
        let pio = Bus::new(AddressSpace::Pio);
        let sink = Arc::new(RecordingMsiSink::new());
        let w = IommuWiring::new(IommuKind::Vtd, &ram, &mmio, sink).unwrap();
        let rid = RequesterId::new(0, 1, 1);
        let ide = Ide::new(
            Arc::new(w.view(&ram, rid)),
            Arc::new(RecordingLine::new()),
            Arc::new(RecordingLine::new()),
        );
        let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
        ide.attach_disk(Slot::PRIMARY_MASTER, disk).unwrap();
        ide.register_ports(&pio).unwrap();
        // Bus mastering on in the function's command register, as a driver does.
        let mut function = ide.pci_function();
        function.config_write(0x04, &[0x05, 0x00]);
        // Tables for 00:01.1 mapping only the PRD table's page.
        let put = |addr: u64, (lo, hi): (u64, u64)| {
            ram.write_obj(lo, GuestAddress(addr)).unwrap();
            ram.write_obj(hi, GuestAddress(addr + 8)).unwrap();
        };
        put(ROOT, RootEntry::with_context_table(CONTEXT).raw());
        put(
            CONTEXT + u64::from(rid.devfn()) * 16,
            ContextEntry::translating(2, SL[0], 3).raw(),
        );
        ram.write_obj(SlEntry::table(SL[1]).0, GuestAddress(SL[0]))
            .unwrap();
        ram.write_obj(SlEntry::table(SL[2]).0, GuestAddress(SL[1]))
            .unwrap();
        let prd_page = SlEntry::page(PRD, PageSize::Size4K, Perms::READ | Perms::WRITE);
        ram.write_obj(prd_page.0, GuestAddress(SL[2] + (PRD >> 12) * 8))
            .unwrap();
        reg_w(&mmio, RTADDR, ROOT, 8);
        reg_w(&mmio, GCMD, u64::from(G_SRTP), 4);
        reg_w(&mmio, GCMD, u64::from(G_TE), 4);
        // One PRD entry: 512 bytes at DATA (not mapped), end of table.
        ram.write_obj(DATA as u32, GuestAddress(PRD)).unwrap();
        ram.write_obj(512u16, GuestAddress(PRD + 4)).unwrap();
        ram.write_obj(0x8000u16, GuestAddress(PRD + 6)).unwrap();
        ide.bm_write(4, &(PRD as u32).to_le_bytes());
        // READ DMA of LBA 0, one sector, then start the bus master (to memory).
        for (port, v) in [
            (0x1f6u64, 0xe0u8),
            (0x1f2, 1),
            (0x1f3, 0),
            (0x1f4, 0),
            (0x1f5, 0),
        ] {
            assert!(pio.write(port, &[v]));
        }
        assert!(pio.write(0x1f7, &[0xc8]));
        ide.bm_write(0, &[0x09]);
        let t = Instant::now();
        let status = loop {
            let mut st = [0u8];
            ide.bm_read(2, &mut st);
            if st[0] & 0x06 != 0 {
                break st[0];
            }
            assert!(t.elapsed() < Duration::from_secs(5), "DMA never ended");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_ne!(
            status & 0x02,
            0,
            "bus-master error bit (status {status:#x})"
        );
        let faults = w.faults().entries();
        assert!(
            !faults.is_empty()
                && faults
                    .iter()
                    .all(|f| f.rid == rid && f.iova & !0xfff == DATA),
            "{faults:?}"
        );
        assert_eq!(
            reg_r(&mmio, FRCD + 8, 8) & 0xffff,
            u64::from(rid.0),
            "source ID"
        );
    }

    #[test]
    fn virtio_iommu_endpoints_bypass_until_attached() {
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mmio = Bus::new(AddressSpace::Mmio);
        let sink = Arc::new(RecordingMsiSink::new());
        let w = IommuWiring::new(IommuKind::Virtio, &ram, &mmio, sink).unwrap();
        let rid = RequesterId::new(0, 5, 0);
        let view = w.view(&ram, rid);
        ram.write_obj(0x1234_5678u32, GuestAddress(0x8000)).unwrap();
        assert_eq!(
            view.read_obj::<u32>(GuestAddress(0x8000)).unwrap(),
            0x1234_5678
        );
        // What a driver's ATTACH does: into an empty domain, where nothing is mapped.
        let Unit::Virtio { iommu, .. } = &w.unit else {
            panic!("virtio unit");
        };
        iommu
            .create_domain(7, iovirt_iommu::WalkConfig::FOUR_LEVEL)
            .unwrap();
        iommu.attach(rid, Attachment::Domain(7)).unwrap();
        assert!(view.read_obj::<u32>(GuestAddress(0x8000)).is_err());
        assert_eq!(w.snapshot().faults, 1);
        let viot = w.acpi_table();
        assert_eq!(&viot[..4], b"VIOT");
        assert!(
            mmio.ranges().is_empty(),
            "no MMIO registers for virtio-iommu"
        );
    }
}
