//! Demand-populated guest memory under DMA: a [`DmaFaultHook`] that fills
//! pages of a guest-physical range from a backing store the first time a
//! device touches them.
//!
//! The range is mapped (so vm-memory can address it) but its contents are
//! not there until populated, as with memory restored lazily from a snapshot,
//! post-copy migration or pages swapped out by an overcommitting host. A DMA
//! that reaches a page not yet present faults into [`DemandPaging::on_fault`],
//! which reads the page from the [`PageSource`], writes it into guest memory
//! and marks it present; the [`crate::DmaView`] then retries the access.
//! The same hook point serves any "make it present" policy: a userfaultfd
//! `UFFDIO_COPY`, a remote page server, or a balloon that refuses (fails).
//! CPU accesses by the guest itself are not covered here: they need the
//! hypervisor's own fault path (userfaultfd or EPT violations).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::view::{DmaFault, DmaFaultHook, DmaFaultKind, HookAction};

const PAGE: u64 = 4096;

/// Where a demand-populated page's contents come from.
pub trait PageSource: Send + Sync {
    /// Fill `page` (4 KiB) with the contents of the page at guest-physical `gpa`.
    fn fill(&self, gpa: u64, page: &mut [u8]) -> std::io::Result<()>;
}

/// A [`DmaFaultHook`] that populates `base..base+len` page by page on first DMA.
pub struct DemandPaging<M: GuestMemoryBackend> {
    mem: M,
    base: u64,
    pages: u64,
    present: Vec<AtomicU64>,
    source: Arc<dyn PageSource>,
    fills: AtomicU64,
    filling: Mutex<()>,
}

impl<M: GuestMemoryBackend> std::fmt::Debug for DemandPaging<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemandPaging")
            .field("base", &self.base)
            .field("pages", &self.pages)
            .field("fills", &self.fills())
            .finish()
    }
}

impl<M: GuestMemoryBackend> DemandPaging<M> {
    /// Pages populated so far.
    pub fn fills(&self) -> u64 {
        self.fills.load(Ordering::Relaxed)
    }
}

impl<M: GuestMemoryBackend + Send + Sync> DemandPaging<M> {
    /// Nothing in `base..base+len` (4 KiB aligned, rounded out) is present yet;
    /// pages are filled from `source` into `mem`.
    pub fn new(mem: M, base: u64, len: u64, source: Arc<dyn PageSource>) -> Self {
        let base = base & !(PAGE - 1);
        let pages = len.div_ceil(PAGE);
        DemandPaging {
            mem,
            base,
            pages,
            present: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            source,
            fills: AtomicU64::new(0),
            filling: Mutex::new(()),
        }
    }

    fn page_index(&self, gpa: u64) -> Option<u64> {
        let i = gpa.checked_sub(self.base)? / PAGE;
        (i < self.pages).then_some(i)
    }

    fn is_page_present(&self, i: u64) -> bool {
        self.present
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Mark `gpa`'s page present without filling it (the guest's CPU wrote it).
    pub fn mark_present(&self, gpa: u64) {
        if let Some(i) = self.page_index(gpa) {
            if let Some(w) = self.present.get((i / 64) as usize) {
                w.fetch_or(1 << (i % 64), Ordering::Release);
            }
        }
    }

    /// Pages of `gpa..gpa+len` inside the range (as indices).
    fn pages_of(&self, gpa: u64, len: usize) -> impl Iterator<Item = u64> + '_ {
        let end = gpa.saturating_add(len as u64);
        let first = gpa & !(PAGE - 1);
        (0..)
            .map(move |k: u64| first.saturating_add(k * PAGE))
            .take_while(move |p| *p < end)
            .filter_map(|p| self.page_index(p))
    }

    fn populate(&self, i: u64) -> std::io::Result<()> {
        let _g = self.filling.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_page_present(i) {
            return Ok(());
        }
        let gpa = self.base + i * PAGE;
        let mut buf = vec![0u8; PAGE as usize];
        self.source.fill(gpa, &mut buf)?;
        self.mem
            .write_slice(&buf, GuestAddress(gpa))
            .map_err(std::io::Error::other)?;
        self.fills.fetch_add(1, Ordering::Relaxed);
        self.mark_present(gpa);
        Ok(())
    }
}

impl<M: GuestMemoryBackend + Send + Sync> DmaFaultHook for DemandPaging<M> {
    fn is_present(&self, gpa: u64, len: usize) -> bool {
        self.pages_of(gpa, len).all(|i| self.is_page_present(i))
    }

    fn on_fault(&self, fault: &DmaFault) -> HookAction {
        let DmaFaultKind::NotPresent { gpa } = fault.kind else {
            return HookAction::Fail;
        };
        let missing: Vec<u64> = self
            .pages_of(gpa, fault.len)
            .filter(|i| !self.is_page_present(*i))
            .collect();
        if missing.is_empty() {
            // Not ours: the address is simply not guest memory.
            return HookAction::Fail;
        }
        for i in missing {
            if let Err(e) = self.populate(i) {
                log::warn!("demand paging: page {:#x}: {e}", self.base + i * PAGE);
                return HookAction::Fail;
            }
        }
        HookAction::Retry
    }
}
