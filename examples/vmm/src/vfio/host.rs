//! [`VfioOps`] over a real host device with the `vfio-ioctls` crate: a VFIO
//! container (type-1 IOMMU) holding the device's group, the device itself, and
//! the KVM VFIO pseudo-device that tells KVM about the group (needed for
//! coherent DMA and, on some hosts, for interrupt posting).
//!
//! Not run on this machine (it has no VFIO-capable device and no /dev/vfio):
//! built, and the model above it tested with a double.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iovirt_bus::pci::{PciAddress, PciRoot};
use iovirt_legacy::chipset::Piix3;
use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{RegionInfo, VfioOps, VfioPciDevice, IRQ_INTX};
use crate::irq::{KvmMsiRouter, KvmVfioRoutes};

/// Why a host device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The sysfs path does not name a PCI device.
    #[error("VFIO device {path}: {why}")]
    Path {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// KVM refused the VFIO pseudo-device.
    #[error("VFIO device {path}: KVM_CREATE_DEVICE(VFIO): {err}")]
    Kvm {
        /// The path given.
        path: PathBuf,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// The pass-through model refused the device.
    #[error("VFIO device {path}: {err}")]
    Attach {
        /// The path given.
        path: PathBuf,
        /// Why.
        err: super::VfioError,
    },
    /// No PCI slot is left, or the root refused the function.
    #[error("VFIO device {path}: PCI: {err}")]
    Pci {
        /// The path given.
        path: PathBuf,
        /// Why.
        err: iovirt_bus::pci::PciError,
    },
    /// A VFIO step failed.
    #[error("VFIO device {path}: {err}")]
    Vfio {
        /// The path given.
        path: PathBuf,
        /// The error.
        err: vfio_ioctls::VfioError,
    },
}

/// Check that `path` is a PCI device's sysfs directory in an IOMMU group, before
/// anything else is set up; the message says what to do.
pub fn check_path(path: &Path) -> Result<(), OpenError> {
    let bad = |why: String| OpenError::Path {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "{e} (give the device's sysfs directory, e.g. /sys/bus/pci/devices/0000:01:00.0)"
        ))
    })?;
    if !meta.is_dir() {
        return Err(bad(
            "not a directory (give the device's sysfs directory, e.g. /sys/bus/pci/devices/0000:01:00.0)"
                .into(),
        ));
    }
    if std::fs::metadata(path.join("iommu_group")).is_err() {
        return Err(bad(
            "no iommu_group: the host IOMMU is off (intel_iommu=on / amd_iommu=on) or this is not a PCI device"
                .into(),
        ));
    }
    match std::fs::read_link(path.join("driver")) {
        Ok(d) if d.file_name().is_some_and(|n| n == "vfio-pci") => Ok(()),
        Ok(d) => Err(bad(format!(
            "bound to {}, not vfio-pci (echo the vendor/device IDs to /sys/bus/pci/drivers/vfio-pci/new_id)",
            d.display()
        ))),
        Err(_) => Err(bad("bound to no driver; bind it to vfio-pci".into())),
    }
}

/// Open every device in `paths` and put it on `pci`, from `first_slot` upward.
pub fn attach_all(
    paths: &[PathBuf],
    vm: &VmFd,
    ram: &GuestMemoryMmap,
    pci: &PciRoot,
    piix3: &Arc<std::sync::Mutex<Piix3>>,
    router: &Arc<KvmMsiRouter>,
    first_slot: u8,
) -> Result<(), OpenError> {
    for (path, slot) in paths.iter().zip(first_slot..) {
        let pci_err = |err| OpenError::Pci {
            path: path.clone(),
            err,
        };
        let addr = PciAddress::new(0, slot, 0).map_err(pci_err)?;
        let host = Arc::new(HostVfio::open(path, vm)?);
        let routes = Arc::new(KvmVfioRoutes::new(router.clone(), piix3.clone(), slot));
        let dev = VfioPciDevice::new(host, routes, ram).map_err(|err| OpenError::Attach {
            path: path.clone(),
            err,
        })?;
        let regions = dev.dma_ranges().len();
        pci.add_function(addr, dev).map_err(pci_err)?;
        log::info!(
            "VFIO pass-through at {addr}: {} ({regions} guest RAM regions DMA-mapped)",
            path.display()
        );
    }
    Ok(())
}

/// A host device opened through VFIO.
pub struct HostVfio {
    container: Arc<VfioContainer>,
    device: VfioDevice,
}

impl HostVfio {
    /// Open the device at `path` (a sysfs directory) for `vm`.
    pub fn open(path: &Path, vm: &VmFd) -> Result<Self, OpenError> {
        check_path(path)?;
        let mut create = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_dev = vm
            .create_device(&mut create)
            .map_err(|err| OpenError::Kvm {
                path: path.to_path_buf(),
                err,
            })?;
        let vfio = |err| OpenError::Vfio {
            path: path.to_path_buf(),
            err,
        };
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_dev));
        let container = Arc::new(VfioContainer::new(Some(handle)).map_err(vfio)?);
        let device = VfioDevice::new(path, container.clone(), false).map_err(vfio)?;
        device.reset();
        Ok(HostVfio { container, device })
    }
}

impl VfioOps for HostVfio {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let flags = self.device.get_region_flags(index);
        let size = self.device.get_region_size(index);
        (size > 0).then_some(RegionInfo {
            size,
            read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        // vfio-ioctls logs (and leaves `data` alone) on failure.
        data.fill(0xff);
        self.device.region_read(index, data, offset);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        self.device.region_write(index, data, offset);
        Ok(())
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |i| i.count)
    }

    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_irq(index, fds.to_vec())
            .map_err(io::Error::other)
    }

    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        self.device.disable_irq(index).map_err(io::Error::other)
    }

    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(IRQ_INTX, vec![fd])
            .map_err(io::Error::other)
    }

    fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        // SAFETY: `host_addr` is the start of a guest RAM mapping of `size` bytes
        // that the VMM keeps mapped for the VM's lifetime (it is never unmapped or
        // replaced while the device exists, and `VfioPciDevice` unmaps it on drop);
        // the VMM only touches guest RAM through vm-memory's volatile accessors,
        // never through Rust references, so device DMA into it is sound.
        unsafe {
            self.container
                .vfio_dma_map(iova, size, host_addr as *mut u8)
        }
        .map_err(io::Error::other)
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        self.container
            .vfio_dma_unmap(iova, size)
            .map_err(io::Error::other)
    }
}
