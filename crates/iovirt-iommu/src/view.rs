//! The IOMMU-aware guest-memory view a device model is given: a vm-memory
//! [`GuestMemory`] whose addresses are the device's IOVAs.
//!
//! Every access is translated page by page for the view's requester ID and
//! checked for the access it makes (vm-memory passes `Permissions::Read` for
//! reads and `Permissions::Write` for writes), then served from the
//! guest-physical memory underneath. A page that does not translate, or
//! translates to memory that is not present, goes to the [`DmaFaultHook`],
//! which may make it present; the access is then retried. A fault nobody
//! resolves is reported to the translator (fault registers, log, interrupt)
//! and the access fails with a vm-memory error, which device models turn
//! into an I/O error status.

use std::iter::FusedIterator;
use std::sync::Arc;

use vm_memory::bitmap::{self, BS};
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    Permissions, VolatileSlice,
};

use crate::fault::{Fault, FaultReason};
use crate::types::{Access, Perms, RequesterId};
use crate::unit::Translator;

/// Retries of one page after the hook said it made it present.
const MAX_RETRIES: usize = 4;

/// What kept a DMA from reaching memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFaultKind {
    /// The IOVA did not translate (or lacked the right).
    Translation(FaultReason),
    /// The IOVA translated to `gpa`, which is not present (not backed by a
    /// memory region, or a demand-populated page not yet populated).
    NotPresent {
        /// The guest-physical address reached.
        gpa: u64,
    },
}

/// A DMA that could not proceed, as the hook sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault {
    /// Who made the DMA.
    pub rid: RequesterId,
    /// The IOVA (equal to the GPA without an IOMMU).
    pub iova: u64,
    /// Bytes wanted from `iova` on (within one page when translated).
    pub len: usize,
    /// Read or write.
    pub access: Access,
    /// What went wrong.
    pub kind: DmaFaultKind,
}

/// What the hook did about a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// The page was made present (or mapped): retry the access.
    Retry,
    /// Leave it: the DMA fails (and a translation fault is reported).
    Fail,
}

/// Called when a DMA reaches a page that is not present; the route to
/// overcommitting memory under DMA (page-in, post-copy migration, balloon).
pub trait DmaFaultHook: Send + Sync {
    /// Whether guest-physical `gpa..gpa+len` is present. The default says yes:
    /// memory that is backed is present.
    fn is_present(&self, _gpa: u64, _len: usize) -> bool {
        true
    }
    /// Try to resolve `fault`; called from the device's thread, may block.
    fn on_fault(&self, fault: &DmaFault) -> HookAction;
}

/// A device's view of guest memory through an IOMMU (or none), with an
/// optional fault hook. Cheap to clone when `M` is (e.g. `GuestMemoryMmap`).
#[derive(Clone)]
pub struct DmaView<M: GuestMemoryBackend> {
    mem: M,
    rid: RequesterId,
    translator: Option<Arc<dyn Translator>>,
    hook: Option<Arc<dyn DmaFaultHook>>,
}

impl<M: GuestMemoryBackend> std::fmt::Debug for DmaView<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaView")
            .field("rid", &self.rid)
            .field("translated", &self.translator.is_some())
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl<M: GuestMemoryBackend> DmaView<M> {
    /// Requester `rid`'s view of `mem` through `translator`.
    pub fn new(mem: M, rid: RequesterId, translator: Arc<dyn Translator>) -> Self {
        DmaView {
            mem,
            rid,
            translator: Some(translator),
            hook: None,
        }
    }

    /// A view without an IOMMU (IOVA = GPA), useful with a fault hook.
    pub fn untranslated(mem: M, rid: RequesterId) -> Self {
        DmaView {
            mem,
            rid,
            translator: None,
            hook: None,
        }
    }

    /// Send not-present pages to `hook`.
    pub fn with_hook(mut self, hook: Arc<dyn DmaFaultHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The requester ID DMA through this view carries.
    pub fn requester_id(&self) -> RequesterId {
        self.rid
    }

    /// The guest-physical memory underneath.
    pub fn backend(&self) -> &M {
        &self.mem
    }

    /// Translate and check the first piece of `iova..iova+len`: returns the
    /// guest-physical address and how many bytes are contiguous there.
    fn resolve(
        &self,
        iova: u64,
        len: usize,
        need: Perms,
    ) -> Result<(u64, usize), GuestMemoryError> {
        let access = if need.contains(Perms::WRITE) {
            Access::Write
        } else {
            Access::Read
        };
        let mut tries = 0;
        loop {
            let step = match &self.translator {
                None => Ok((iova, len)),
                Some(t) => {
                    let mut r = t.translate(self.rid, iova, access);
                    if need == (Perms::READ | Perms::WRITE) {
                        r = r.and_then(|_| t.translate(self.rid, iova, Access::Read));
                    }
                    r.map(|m| {
                        let n = usize::try_from(m.remaining(iova)).unwrap_or(usize::MAX);
                        (m.gpa_of(iova), n.min(len))
                    })
                }
            };
            let (kind, flen) = match step {
                Ok((gpa, n)) => {
                    let backed = self.mem.check_range(GuestAddress(gpa), n);
                    let present = backed && self.hook.as_ref().is_none_or(|h| h.is_present(gpa, n));
                    if present {
                        return Ok((gpa, n));
                    }
                    (DmaFaultKind::NotPresent { gpa }, n)
                }
                Err(reason) => (DmaFaultKind::Translation(reason), len),
            };
            let fault = DmaFault {
                rid: self.rid,
                iova,
                len: flen,
                access,
                kind,
            };
            let retry = tries < MAX_RETRIES
                && self
                    .hook
                    .as_ref()
                    .is_some_and(|h| h.on_fault(&fault) == HookAction::Retry);
            if retry {
                tries += 1;
                continue;
            }
            return Err(match kind {
                DmaFaultKind::Translation(reason) => {
                    if let Some(t) = &self.translator {
                        t.report_fault(Fault {
                            rid: self.rid,
                            iova,
                            access,
                            reason,
                        });
                    }
                    // The fault itself (reason, requester) went to the translator's log.
                    GuestMemoryError::InvalidGuestAddress(GuestAddress(iova))
                }
                DmaFaultKind::NotPresent { gpa } => {
                    GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa))
                }
            });
        }
    }
}

impl<M: GuestMemoryBackend> GuestMemory for DmaView<M> {
    type PhysicalMemory = M;
    type Bitmap = <M::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        let need = Perms::from_permissions(access);
        let mut iova = addr.0;
        let mut left = count;
        while left > 0 {
            match self.resolve(iova, left, need) {
                Ok((_, n)) if n > 0 => {
                    left -= n;
                    match iova.checked_add(n as u64) {
                        Some(next) => iova = next,
                        None => return left == 0,
                    }
                }
                _ => return false,
            }
        }
        true
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        if addr.0.checked_add(count as u64).is_none() && count != 0 {
            return Err(GuestMemoryError::GuestAddressOverflow);
        }
        Ok(DmaSlices {
            view: self,
            iova: addr.0,
            left: count,
            need: Perms::from_permissions(access),
            current: None,
            done: false,
        })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        // Only a view with nothing in between may be bypassed.
        if self.translator.is_none() && self.hook.is_none() {
            Some(&self.mem)
        } else {
            None
        }
    }
}

/// Iterator over the slices of one DMA through a [`DmaView`]: translates a
/// page (or an untranslated run) at a time.
struct DmaSlices<'a, M: GuestMemoryBackend> {
    view: &'a DmaView<M>,
    iova: u64,
    left: usize,
    need: Perms,
    current: Option<GuestMemoryBackendSliceIterator<'a, M>>,
    done: bool,
}

impl<'a, M: GuestMemoryBackend> Iterator for DmaSlices<'a, M> {
    type Item = vm_memory::GuestMemoryResult<VolatileSlice<'a, bitmap::MS<'a, M>>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        loop {
            if let Some(cur) = self.current.as_mut() {
                match cur.next() {
                    Some(Ok(s)) => return Some(Ok(s)),
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    None => self.current = None,
                }
            }
            if self.left == 0 {
                self.done = true;
                return None;
            }
            match self.view.resolve(self.iova, self.left, self.need) {
                Ok((gpa, n)) if n > 0 => {
                    self.current = Some(self.view.mem.get_slices(GuestAddress(gpa), n));
                    self.left -= n;
                    self.iova = self.iova.wrapping_add(n as u64);
                }
                Ok(_) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl<M: GuestMemoryBackend> FusedIterator for DmaSlices<'_, M> {}

impl<'a, M: GuestMemoryBackend> GuestMemorySliceIterator<'a, bitmap::MS<'a, M>>
    for DmaSlices<'a, M>
{
}
