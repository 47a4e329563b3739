//! The translation interface device views use, and the host-programmed IOMMU
//! (domains the VMM or a virtio-iommu device fills through `map`/`unmap`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use crate::domain::{DomainError, HostDomain};
use crate::fault::{Fault, FaultLog, FaultReason, FaultReporter};
use crate::iotlb::Iotlb;
use crate::types::{Access, Mapping, PageSize, Perms, RequesterId};
use crate::walk::WalkConfig;

/// Something that translates a device's IOVAs: an emulated VT-d unit, the
/// host-programmed [`Iommu`], or a test double.
pub trait Translator: Send + Sync {
    /// The page of `iova` for requester `rid`, checked for `access`.
    fn translate(
        &self,
        rid: RequesterId,
        iova: u64,
        access: Access,
    ) -> Result<Mapping, FaultReason>;
    /// A DMA failed for good with `fault`: record it (fault registers, log, interrupt).
    fn report_fault(&self, fault: Fault);
}

/// An identity mapping for pass-through devices: a 1 GiB "page" around `iova`.
pub fn identity(iova: u64) -> Mapping {
    let base = iova & !(PageSize::Size1G.bytes() - 1);
    Mapping {
        iova: base,
        gpa: base,
        size: PageSize::Size1G,
        perms: Perms::READ | Perms::WRITE,
    }
}

/// How the host-programmed IOMMU treats a requester.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// DMA is translated through the domain with this ID.
    Domain(u16),
    /// DMA goes straight to guest-physical memory (IOVA = GPA).
    Bypass,
}

const ATT_DOMAIN: u32 = 1 << 16;
const ATT_BYPASS: u32 = 2 << 16;

fn decode(word: u32) -> Option<Attachment> {
    match word & !0xffff {
        ATT_DOMAIN => Some(Attachment::Domain(word as u16)),
        ATT_BYPASS => Some(Attachment::Bypass),
        _ => None,
    }
}

/// Why a host-side IOMMU operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// No such domain.
    #[error("domain {0} does not exist")]
    NoDomain(u16),
    /// The domain exists already.
    #[error("domain {0} exists already")]
    DomainExists(u16),
    /// The domain still has devices attached.
    #[error("domain {0} still has devices attached")]
    DomainBusy(u16),
    /// A page-table update was refused.
    #[error(transparent)]
    Domain(#[from] DomainError),
}

/// An IOMMU programmed by the host: domains of host-built page tables, devices
/// attached to domains, one shared [`Iotlb`], a bounded fault log.
///
/// Unattached requesters are blocked (every DMA faults). `map` needs no
/// invalidation; `unmap` invalidates the range it removed before returning,
/// so the caller may reuse the memory at once.
pub struct Iommu {
    /// One word per requester ID: 0 blocked, `DOMAIN | did`, or `BYPASS`.
    devices: Box<[AtomicU32]>,
    domains: RwLock<HashMap<u16, HostDomain>>,
    iotlb: Iotlb,
    faults: FaultLog,
    reporter: Option<Arc<dyn FaultReporter>>,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu")
            .field(
                "domains",
                &self.domains.read().map(|d| d.len()).unwrap_or(0),
            )
            .field("faults", &self.faults.total())
            .finish()
    }
}

impl Default for Iommu {
    fn default() -> Self {
        Self::new()
    }
}

impl Iommu {
    /// An IOMMU with no domains, every device blocked, a 256-entry fault log.
    pub fn new() -> Self {
        Iommu {
            devices: (0..=u16::MAX).map(|_| AtomicU32::new(0)).collect(),
            domains: RwLock::new(HashMap::new()),
            iotlb: Iotlb::new(),
            faults: FaultLog::default(),
            reporter: None,
        }
    }

    /// Also tell `reporter` about every fault.
    pub fn with_reporter(mut self, reporter: Arc<dyn FaultReporter>) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// Create domain `did` with page tables of shape `cfg`.
    pub fn create_domain(&self, did: u16, cfg: WalkConfig) -> Result<(), IommuError> {
        let mut d = self.domains.write().unwrap_or_else(|p| p.into_inner());
        if d.contains_key(&did) {
            return Err(IommuError::DomainExists(did));
        }
        d.insert(did, HostDomain::new(cfg));
        Ok(())
    }

    /// Destroy domain `did` (no device may be attached to it).
    pub fn destroy_domain(&self, did: u16) -> Result<(), IommuError> {
        let word = ATT_DOMAIN | u32::from(did);
        if self
            .devices
            .iter()
            .any(|a| a.load(Ordering::Acquire) == word)
        {
            return Err(IommuError::DomainBusy(did));
        }
        let mut d = self.domains.write().unwrap_or_else(|p| p.into_inner());
        d.remove(&did).ok_or(IommuError::NoDomain(did))?;
        drop(d);
        self.iotlb.invalidate_domain(did);
        Ok(())
    }

    /// Attach requester `rid` to `att` (a domain, or bypass).
    pub fn attach(&self, rid: RequesterId, att: Attachment) -> Result<(), IommuError> {
        if let Attachment::Domain(did) = att {
            if !self
                .domains
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&did)
            {
                return Err(IommuError::NoDomain(did));
            }
        }
        let word = match att {
            Attachment::Domain(did) => ATT_DOMAIN | u32::from(did),
            Attachment::Bypass => ATT_BYPASS,
        };
        if let Some(slot) = self.devices.get(usize::from(rid.0)) {
            slot.store(word, Ordering::Release);
        }
        Ok(())
    }

    /// Detach `rid`: its DMA faults from now on.
    pub fn detach(&self, rid: RequesterId) {
        if let Some(slot) = self.devices.get(usize::from(rid.0)) {
            slot.store(0, Ordering::Release);
        }
    }

    /// What `rid` is attached to.
    pub fn attachment(&self, rid: RequesterId) -> Option<Attachment> {
        decode(
            self.devices
                .get(usize::from(rid.0))?
                .load(Ordering::Acquire),
        )
    }

    /// Map `len` bytes at `iova` in domain `did` to `gpa` with `perms`.
    /// Replacing an existing mapping invalidates its IOTLB entries.
    pub fn map(
        &self,
        did: u16,
        iova: u64,
        gpa: u64,
        len: u64,
        perms: Perms,
    ) -> Result<(), IommuError> {
        let mut d = self.domains.write().unwrap_or_else(|p| p.into_inner());
        let dom = d.get_mut(&did).ok_or(IommuError::NoDomain(did))?;
        dom.map(iova, gpa, len, perms)?;
        drop(d);
        self.iotlb
            .invalidate_range(did, iova, iova.saturating_add(len));
        Ok(())
    }

    /// Unmap `len` bytes at `iova` in domain `did` and invalidate them.
    pub fn unmap(&self, did: u16, iova: u64, len: u64) -> Result<(), IommuError> {
        let mut d = self.domains.write().unwrap_or_else(|p| p.into_inner());
        let dom = d.get_mut(&did).ok_or(IommuError::NoDomain(did))?;
        dom.unmap(iova, len)?;
        drop(d);
        self.iotlb
            .invalidate_range(did, iova, iova.saturating_add(len));
        Ok(())
    }

    /// Change domain `did`'s tables with `f` without invalidating anything
    /// (as a guest does before it queues invalidations); pair with the
    /// `iotlb().invalidate_*` calls.
    pub fn with_domain<R>(
        &self,
        did: u16,
        f: impl FnOnce(&mut HostDomain) -> R,
    ) -> Result<R, IommuError> {
        let mut d = self.domains.write().unwrap_or_else(|p| p.into_inner());
        let dom = d.get_mut(&did).ok_or(IommuError::NoDomain(did))?;
        Ok(f(dom))
    }

    /// The shared IOTLB (for explicit invalidation and statistics).
    pub fn iotlb(&self) -> &Iotlb {
        &self.iotlb
    }

    /// The fault log.
    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    /// Translate for domain `did` (IOTLB, then a walk of its tables).
    pub fn translate_in(
        &self,
        did: u16,
        iova: u64,
        access: Access,
    ) -> Result<Mapping, FaultReason> {
        if let Some(m) = self.iotlb.lookup(did, iova) {
            if m.perms.contains(access.perm()) {
                return Ok(m);
            }
        }
        let generation = self.iotlb.generation();
        let d = self.domains.read().unwrap_or_else(|p| p.into_inner());
        let dom = d.get(&did).ok_or(FaultReason::ContextNotPresent)?;
        let m = dom.translate(iova).map_err(|r| match r {
            FaultReason::ReadDenied => FaultReason::denied(access),
            r => r,
        })?;
        drop(d);
        self.iotlb.insert_if_current(did, &m, generation);
        if m.perms.contains(access.perm()) {
            Ok(m)
        } else {
            Err(FaultReason::denied(access))
        }
    }
}

impl Translator for Iommu {
    #[inline]
    fn translate(
        &self,
        rid: RequesterId,
        iova: u64,
        access: Access,
    ) -> Result<Mapping, FaultReason> {
        let word = self
            .devices
            .get(usize::from(rid.0))
            .map_or(0, |w| w.load(Ordering::Acquire));
        match decode(word) {
            Some(Attachment::Domain(did)) => self.translate_in(did, iova, access),
            Some(Attachment::Bypass) => Ok(identity(iova)),
            None => Err(FaultReason::ContextNotPresent),
        }
    }

    fn report_fault(&self, fault: Fault) {
        log::debug!("{fault}");
        self.faults.record(fault);
        if let Some(r) = &self.reporter {
            r.report(&fault);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_map_translate_unmap() {
        let io = Iommu::new();
        let rid = RequesterId::new(0, 3, 0);
        assert_eq!(
            io.translate(rid, 0, Access::Read),
            Err(FaultReason::ContextNotPresent)
        );
        io.create_domain(1, WalkConfig::FOUR_LEVEL).unwrap();
        io.attach(rid, Attachment::Domain(1)).unwrap();
        io.map(1, 0x10_0000, 0x20_0000, 0x2000, Perms::READ)
            .unwrap();
        let m = io.translate(rid, 0x10_1234, Access::Read).unwrap();
        assert_eq!(m.gpa_of(0x10_1234), 0x20_1234);
        assert_eq!(
            io.translate(rid, 0x10_1234, Access::Write),
            Err(FaultReason::WriteDenied)
        );
        assert_eq!(
            io.translate(rid, 0x10_2000, Access::Read),
            Err(FaultReason::ReadDenied)
        );
        io.unmap(1, 0x10_0000, 0x1000).unwrap();
        assert_eq!(
            io.translate(rid, 0x10_0000, Access::Read),
            Err(FaultReason::ReadDenied)
        );
        assert_eq!(io.destroy_domain(1), Err(IommuError::DomainBusy(1)));
        io.attach(rid, Attachment::Bypass).unwrap();
        assert_eq!(
            io.translate(rid, 0x1234_5678, Access::Write)
                .unwrap()
                .gpa_of(0x1234_5678),
            0x1234_5678
        );
        io.destroy_domain(1).unwrap();
    }
}
