//! The IOTLB: a cache of translated pages keyed by (domain, IOVA page), one
//! direct-mapped array per page size, readable without locks.
//!
//! Each slot is a small sequence lock: a reader loads the sequence, the tag,
//! the data and the sequence again, and trusts the pair only if the sequence
//! is even and unchanged. Writers (misses and invalidations) serialise on a
//! mutex. Like a hardware IOTLB it may hold stale entries until software
//! invalidates them; unlike hardware it never caches a fault.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::types::{Mapping, PageSize, Perms};

const VALID: u64 = 1 << 63;
const VPN_BITS: u32 = 45;
const VPN_MASK: u64 = (1 << VPN_BITS) - 1;

#[derive(Debug, Default)]
struct Slot {
    seq: AtomicU64,
    tag: AtomicU64,
    data: AtomicU64,
}

#[derive(Debug)]
struct Array {
    size: PageSize,
    bits: u32,
    slots: Box<[Slot]>,
}

impl Array {
    fn new(size: PageSize, bits: u32) -> Self {
        Array {
            size,
            bits,
            slots: (0..1usize << bits).map(|_| Slot::default()).collect(),
        }
    }

    fn tag(&self, did: u16, iova: u64) -> u64 {
        VALID | (u64::from(did) << VPN_BITS) | ((iova >> self.size.shift()) & VPN_MASK)
    }

    fn index(&self, tag: u64) -> usize {
        (tag.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.bits)) as usize
    }

    #[inline(always)]
    fn lookup(&self, did: u16, iova: u64) -> Option<u64> {
        let tag = self.tag(did, iova);
        let slot = self.slots.get(self.index(tag))?;
        loop {
            let s1 = slot.seq.load(Ordering::Acquire);
            let t = slot.tag.load(Ordering::Relaxed);
            let d = slot.data.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            let s2 = slot.seq.load(Ordering::Relaxed);
            if s1 == s2 && s1 & 1 == 0 {
                return (t == tag).then_some(d);
            }
            std::hint::spin_loop();
        }
    }

    /// Caller holds the writer mutex.
    fn store(slot: &Slot, tag: u64, data: u64) {
        let s = slot.seq.load(Ordering::Relaxed);
        slot.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        slot.tag.store(tag, Ordering::Relaxed);
        slot.data.store(data, Ordering::Relaxed);
        slot.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    fn slot_page(&self, tag: u64) -> (u16, u64) {
        (
            ((tag >> VPN_BITS) & 0xffff) as u16,
            (tag & VPN_MASK) << self.size.shift(),
        )
    }
}

/// Counters of an [`Iotlb`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbStats {
    /// Entries inserted (one per miss that walked successfully).
    pub fills: u64,
    /// Invalidation requests served.
    pub invalidations: u64,
}

/// A page-granular translation cache shared by all devices of an IOMMU unit.
#[derive(Debug)]
pub struct Iotlb {
    arrays: [Array; 3],
    writer: Mutex<IotlbStats>,
    /// Bumped by every invalidation, so a walk that raced with one is not cached.
    generation: AtomicU64,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Iotlb {
    /// An empty IOTLB with 4096 4 KiB entries, 512 2 MiB entries and 64 1 GiB entries.
    pub fn new() -> Self {
        Iotlb {
            arrays: [
                Array::new(PageSize::Size4K, 12),
                Array::new(PageSize::Size2M, 9),
                Array::new(PageSize::Size1G, 6),
            ],
            writer: Mutex::new(IotlbStats::default()),
            generation: AtomicU64::new(0),
        }
    }

    /// The cached page of domain `did` containing `iova`, if any.
    #[inline]
    pub fn lookup(&self, did: u16, iova: u64) -> Option<Mapping> {
        if iova >> 57 != 0 {
            return None;
        }
        let [a4k, a2m, a1g] = &self.arrays;
        if let Some(d) = a4k.lookup(did, iova) {
            return Some(Self::mapping(a4k.size, iova, d));
        }
        self.lookup_large(did, iova, a2m, a1g)
    }

    #[cold]
    fn lookup_large(&self, did: u16, iova: u64, a2m: &Array, a1g: &Array) -> Option<Mapping> {
        for a in [a2m, a1g] {
            if let Some(d) = a.lookup(did, iova) {
                return Some(Self::mapping(a.size, iova, d));
            }
        }
        None
    }

    #[inline(always)]
    fn mapping(size: PageSize, iova: u64, d: u64) -> Mapping {
        let mask = size.bytes() - 1;
        Mapping {
            iova: iova & !mask,
            gpa: d & !mask,
            size,
            perms: Perms::from_bits_truncate((d & 3) as u8),
        }
    }

    /// The invalidation generation: read it before a page walk and pass it to
    /// [`Iotlb::insert_if_current`], so that a walk which raced with an
    /// invalidation does not leave a stale entry behind.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Cache `m` for domain `did` (IOVAs wider than 57 bits are not cached).
    pub fn insert(&self, did: u16, m: &Mapping) {
        self.insert_if_current(did, m, None);
    }

    /// Cache `m` unless an invalidation happened since [`Iotlb::generation`]
    /// returned `generation`. Returns whether it was cached.
    pub fn insert_if_current(
        &self,
        did: u16,
        m: &Mapping,
        generation: impl Into<Option<u64>>,
    ) -> bool {
        if m.iova >> 57 != 0 {
            return false;
        }
        let a = &self.arrays[m.size.level() as usize - 1];
        let tag = a.tag(did, m.iova);
        let mut st = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = generation.into() {
            if self.generation.load(Ordering::Relaxed) != g {
                return false;
            }
        }
        st.fills += 1;
        if let Some(slot) = a.slots.get(a.index(tag)) {
            Array::store(
                slot,
                tag,
                (m.gpa & !(a.size.bytes() - 1)) | u64::from(m.perms.bits()),
            );
        }
        true
    }

    fn invalidate_where(&self, mut pred: impl FnMut(PageSize, u16, u64) -> bool) {
        let mut st = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        st.invalidations += 1;
        self.generation.fetch_add(1, Ordering::Release);
        for a in &self.arrays {
            for slot in a.slots.iter() {
                let tag = slot.tag.load(Ordering::Relaxed);
                if tag & VALID == 0 {
                    continue;
                }
                let (did, iova) = a.slot_page(tag);
                if pred(a.size, did, iova) {
                    Array::store(slot, 0, 0);
                }
            }
        }
    }

    /// Drop every entry (global invalidation).
    pub fn invalidate_all(&self) {
        self.invalidate_where(|_, _, _| true);
    }

    /// Drop the entries of domain `did` (domain-selective invalidation).
    pub fn invalidate_domain(&self, did: u16) {
        self.invalidate_where(|_, d, _| d == did);
    }

    /// Drop the entries of domain `did` overlapping `2^(12 + am)` bytes at
    /// `iova` (page-selective invalidation with address mask `am`, as in VT-d:
    /// the range is aligned down to its size).
    /// A mask of 52 or more covers the whole 64-bit IOVA space: the domain.
    pub fn invalidate_pages(&self, did: u16, iova: u64, am: u8) {
        let shift = 12 + u32::from(am);
        if shift >= 64 {
            self.invalidate_domain(did);
            return;
        }
        let start = iova & !((1u64 << shift) - 1);
        let end = start.saturating_add(1u64 << shift);
        self.invalidate_range(did, start, end);
    }

    /// Drop the entries of domain `did` overlapping `start..end`.
    pub fn invalidate_range(&self, did: u16, start: u64, end: u64) {
        // Small ranges: probe the slots the pages hash to; large ranges: scan.
        let pages = (end.saturating_sub(start)) >> 12;
        if pages <= 16 {
            let mut st = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            st.invalidations += 1;
            self.generation.fetch_add(1, Ordering::Release);
            for a in &self.arrays {
                let mask = a.size.bytes() - 1;
                let mut p = start & !mask;
                while p < end {
                    let tag = a.tag(did, p);
                    if let Some(slot) = a.slots.get(a.index(tag)) {
                        if slot.tag.load(Ordering::Relaxed) == tag {
                            Array::store(slot, 0, 0);
                        }
                    }
                    match p.checked_add(a.size.bytes()) {
                        Some(n) => p = n,
                        None => break,
                    }
                }
            }
        } else {
            self.invalidate_where(|size, d, iova| {
                d == did && iova < end && iova.saturating_add(size.bytes()) > start
            });
        }
    }

    /// Fill and invalidation counters.
    pub fn stats(&self) -> IotlbStats {
        *self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(iova: u64, gpa: u64, size: PageSize) -> Mapping {
        Mapping {
            iova,
            gpa,
            size,
            perms: Perms::READ,
        }
    }

    #[test]
    fn insert_lookup_invalidate() {
        let t = Iotlb::new();
        t.insert(1, &m(0x5000, 0x9000, PageSize::Size4K));
        t.insert(1, &m(0x20_0000, 0x40_0000, PageSize::Size2M));
        t.insert(2, &m(0x5000, 0xa000, PageSize::Size4K));
        assert_eq!(t.lookup(1, 0x5fff).unwrap().gpa_of(0x5fff), 0x9fff);
        assert_eq!(t.lookup(2, 0x5000).unwrap().gpa, 0xa000);
        assert_eq!(t.lookup(1, 0x21_2345).unwrap().gpa_of(0x21_2345), 0x41_2345);
        assert!(t.lookup(3, 0x5000).is_none());
        t.invalidate_pages(1, 0x21_0000, 0);
        assert!(
            t.lookup(1, 0x20_0000).is_none(),
            "a 4K invalidation drops the covering 2M page"
        );
        assert!(t.lookup(1, 0x5000).is_some());
        t.invalidate_domain(1);
        assert!(t.lookup(1, 0x5000).is_none());
        assert!(t.lookup(2, 0x5000).is_some());
        t.invalidate_range(2, 0, 1 << 40);
        assert!(t.lookup(2, 0x5000).is_none());
        t.insert(2, &m(0x5000, 0xa000, PageSize::Size4K));
        t.invalidate_all();
        assert!(t.lookup(2, 0x5000).is_none());
    }

    #[test]
    fn every_address_mask_is_accepted() {
        // VT-d's AM field has 6 bits; masks of 52 and more span all of the
        // IOVA space and must not overflow the shift (a fuzzer found this).
        let t = Iotlb::new();
        for am in 0..=63u8 {
            t.insert(1, &m(0x5000, 0x9000, PageSize::Size4K));
            t.insert(2, &m(0x5000, 0xa000, PageSize::Size4K));
            t.invalidate_pages(1, !0xfff_u64, am);
            let gone = t.lookup(1, 0x5000).is_none();
            assert_eq!(gone, am >= 52, "am {am}");
            assert!(t.lookup(2, 0x5000).is_some(), "am {am}");
        }
    }

    #[test]
    fn a_walk_racing_an_invalidation_is_not_cached() {
        let t = Iotlb::new();
        let g = t.generation();
        // The guest changes the tables and invalidates while the walk runs.
        t.invalidate_pages(1, 0x5000, 0);
        assert!(!t.insert_if_current(1, &m(0x5000, 0x9000, PageSize::Size4K), g));
        assert!(t.lookup(1, 0x5000).is_none());
        assert!(t.insert_if_current(1, &m(0x5000, 0x9000, PageSize::Size4K), t.generation()));
    }
}
