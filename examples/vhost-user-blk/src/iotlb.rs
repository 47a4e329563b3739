//! The device IOTLB of a vhost-user connection with VIRTIO_F_ACCESS_PLATFORM.
//!
//! When the frontend (QEMU with `iommu_platform=on`) puts a vIOMMU between the
//! device and guest memory, every address the device sees — descriptor table,
//! rings, buffers — is an I/O virtual address (IOVA). The frontend tells the
//! daemon what an IOVA means with `VHOST_USER_IOTLB_MSG` updates (IOVA range →
//! its own virtual address, with R/W rights) and takes them back with
//! invalidations when the guest unmaps; when the daemon meets an IOVA it has no
//! entry for, it sends a miss on the backend channel (`SET_BACKEND_REQ_FD`) and
//! waits for the update.
//!
//! [`VhostIotlb`] holds those entries and the frontend's memory table (to turn
//! the frontend's virtual addresses into guest-physical ones), and plugs into
//! iovirt-iommu: it is the [`Translator`] of the [`DmaView`](iovirt_iommu::DmaView)
//! the queues use, and its [`DmaFaultHook`] sends the miss and waits. An access
//! outside the guest's mappings fails (the request completes with an I/O error
//! status) and is logged; nothing the frontend sends can make it panic.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use iovirt_iommu::{
    Access, DmaFault, DmaFaultHook, DmaFaultKind, Fault, FaultReason, HookAction, Mapping,
    PageSize, Perms, RequesterId, Translator,
};

/// Feature bit 33: the device accesses memory through the platform's IOMMU
/// (addresses are IOVAs); formerly VIRTIO_F_IOMMU_PLATFORM.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;

/// How long a queue waits for the frontend to answer a miss before the access fails.
pub const DEFAULT_MISS_TIMEOUT: Duration = Duration::from_secs(1);

/// Most entries kept; a frontend sending more loses the oldest-keyed ones (they miss again).
const MAX_ENTRIES: usize = 1 << 16;
/// Most memory regions a frontend may add (vhost-user's own slot limit).
pub const MAX_REGIONS: usize = 509;
/// Queues the daemon can have (`--queues` is at most 64).
pub const MAX_QUEUES: u32 = 64;
/// Refused DMAs logged individually; after that one line per this many.
const LOG_EVERY: u64 = 1000;

/// Backend-request code of an IOTLB message (`VHOST_USER_BACKEND_IOTLB_MSG`).
const BACKEND_IOTLB_MSG: u32 = 1;
/// Header flags: protocol version 1.
const HDR_VERSION: u32 = 0x1;

/// `type` of a `struct vhost_iotlb_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbMsgType {
    /// Backend → frontend: no entry for this IOVA (1).
    Miss,
    /// Frontend → backend: add a translation (2).
    Update,
    /// Frontend → backend: drop translations in a range (3).
    Invalidate,
    /// Backend → frontend: an access through a valid entry failed (4).
    AccessFail,
    /// Start of a batch of updates (5).
    BatchBegin,
    /// End of a batch (6).
    BatchEnd,
}

impl IotlbMsgType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Miss,
            2 => Self::Update,
            3 => Self::Invalidate,
            4 => Self::AccessFail,
            5 => Self::BatchBegin,
            6 => Self::BatchEnd,
            _ => return None,
        })
    }
    fn to_u8(self) -> u8 {
        match self {
            Self::Miss => 1,
            Self::Update => 2,
            Self::Invalidate => 3,
            Self::AccessFail => 4,
            Self::BatchBegin => 5,
            Self::BatchEnd => 6,
        }
    }
}

/// Byte ranges of `struct vhost_iotlb_msg` (little-endian, 32 bytes with padding).
mod field {
    use std::ops::Range;
    pub const IOVA: Range<usize> = 0..8;
    pub const SIZE: Range<usize> = 8..16;
    pub const UADDR: Range<usize> = 16..24;
    pub const PERM: usize = 24;
    pub const TYPE: usize = 25;
    /// Bytes that must be present.
    pub const MIN_LEN: usize = 26;
    /// `sizeof(struct vhost_iotlb_msg)`.
    pub const LEN: usize = 32;
}

/// A parsed `struct vhost_iotlb_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbMsg {
    /// First IOVA.
    pub iova: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// The frontend's virtual address of `iova` (updates only).
    pub uaddr: u64,
    /// Rights: read (`VHOST_ACCESS_RO` = 1), write (`WO` = 2) or both (3).
    pub perm: Perms,
    /// What the message asks.
    pub kind: IotlbMsgType,
}

/// Why an IOTLB message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IotlbError {
    /// Fewer bytes than a `vhost_iotlb_msg`.
    #[error("IOTLB message of {0} bytes is too short")]
    Short(usize),
    /// An unknown message type.
    #[error("unknown IOTLB message type {0}")]
    UnknownType(u8),
    /// An unknown or empty permission.
    #[error("bad IOTLB permission {0:#x}")]
    BadPerm(u8),
    /// An empty range or one that wraps around.
    #[error("bad IOTLB range: iova {iova:#x} size {size:#x}")]
    BadRange {
        /// First IOVA.
        iova: u64,
        /// Length.
        size: u64,
    },
}

impl IotlbMsg {
    /// Parse the payload of an IOTLB message.
    pub fn parse(buf: &[u8]) -> Result<Self, IotlbError> {
        if buf.len() < field::MIN_LEN {
            return Err(IotlbError::Short(buf.len()));
        }
        let u64_at = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[r]);
            u64::from_le_bytes(b)
        };
        let kind_raw = buf[field::TYPE];
        let kind = IotlbMsgType::from_u8(kind_raw).ok_or(IotlbError::UnknownType(kind_raw))?;
        // Only updates and misses carry rights; QEMU leaves the byte
        // uninitialised in invalidations, so it is ignored there.
        let perm_raw = buf[field::PERM];
        let perm = match kind {
            IotlbMsgType::Update | IotlbMsgType::Miss | IotlbMsgType::AccessFail => {
                Perms::from_bits(perm_raw).ok_or(IotlbError::BadPerm(perm_raw))?
            }
            _ => Perms::empty(),
        };
        Ok(IotlbMsg {
            iova: u64_at(field::IOVA),
            size: u64_at(field::SIZE),
            uaddr: u64_at(field::UADDR),
            perm,
            kind,
        })
    }

    /// The 32-byte wire form.
    pub fn emit(&self) -> [u8; field::LEN] {
        let mut b = [0u8; field::LEN];
        b[field::IOVA].copy_from_slice(&self.iova.to_le_bytes());
        b[field::SIZE].copy_from_slice(&self.size.to_le_bytes());
        b[field::UADDR].copy_from_slice(&self.uaddr.to_le_bytes());
        b[field::PERM] = self.perm.bits();
        b[field::TYPE] = self.kind.to_u8();
        b
    }
}

/// One IOTLB entry: `size` bytes from the key IOVA on are at frontend address `uaddr`.
#[derive(Clone, Copy, Debug)]
struct Entry {
    size: u64,
    uaddr: u64,
    perm: Perms,
}

/// A region of the frontend's memory table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical address of the region's first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// The frontend's virtual address of the region's first byte.
    pub uaddr: u64,
}

/// Ring addresses of one queue, as IOVAs (from SET_VRING_ADDR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingIovas {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// Counters of the IOTLB's life, for logs and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbCounters {
    /// Misses sent to the frontend.
    pub misses: u64,
    /// Updates received.
    pub updates: u64,
    /// Invalidations received.
    pub invalidations: u64,
    /// DMAs refused (outside the guest's mappings or lacking the right).
    pub refused: u64,
}

/// The device IOTLB of one vhost-user connection (see the module documentation).
#[derive(Debug)]
pub struct VhostIotlb {
    entries: RwLock<BTreeMap<u64, Entry>>,
    regions: RwLock<Vec<MemRegion>>,
    rings: Mutex<BTreeMap<u32, RingIovas>>,
    features: AtomicU64,
    channel: Mutex<Option<UnixStream>>,
    generation: Mutex<u64>,
    changed: Condvar,
    closed: AtomicBool,
    miss_timeout: Duration,
    misses: AtomicU64,
    updates: AtomicU64,
    invalidations: AtomicU64,
    refused: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for VhostIotlb {
    fn default() -> Self {
        Self::new(DEFAULT_MISS_TIMEOUT)
    }
}

impl VhostIotlb {
    /// An empty IOTLB whose misses wait at most `miss_timeout` for the frontend.
    pub fn new(miss_timeout: Duration) -> Self {
        VhostIotlb {
            entries: RwLock::new(BTreeMap::new()),
            regions: RwLock::new(Vec::new()),
            rings: Mutex::new(BTreeMap::new()),
            features: AtomicU64::new(0),
            channel: Mutex::new(None),
            generation: Mutex::new(0),
            changed: Condvar::new(),
            closed: AtomicBool::new(false),
            miss_timeout,
            misses: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Wake every queue waiting for an update (after the entries changed).
    fn bump(&self) {
        let mut g = lock(&self.generation);
        *g = g.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Add a translation: IOVAs `iova..iova+size` are at frontend address `uaddr`.
    /// Entries it overlaps are dropped first.
    pub fn update(&self, iova: u64, size: u64, uaddr: u64, perm: Perms) -> Result<(), IotlbError> {
        let end = iova.checked_add(size).filter(|_| size > 0);
        if end.is_none() || uaddr.checked_add(size).is_none() {
            return Err(IotlbError::BadRange { iova, size });
        }
        if perm.is_empty() {
            return Err(IotlbError::BadPerm(0));
        }
        {
            let mut e = self.entries.write().unwrap_or_else(|e| e.into_inner());
            remove_overlapping(&mut e, iova, size);
            if e.len() >= MAX_ENTRIES {
                log::warn!("IOTLB full ({MAX_ENTRIES} entries): dropping all");
                e.clear();
            }
            e.insert(iova, Entry { size, uaddr, perm });
        }
        self.updates.fetch_add(1, Ordering::Relaxed);
        self.bump();
        Ok(())
    }

    /// Drop every translation overlapping `iova..iova+size` (a size of 0 or one
    /// that runs past the end drops everything from `iova` on).
    pub fn invalidate(&self, iova: u64, size: u64) {
        log::trace!("IOTLB invalidate {iova:#x}+{size:#x}");
        let size = if size == 0 { u64::MAX - iova } else { size };
        {
            let mut e = self.entries.write().unwrap_or_else(|e| e.into_inner());
            remove_overlapping(&mut e, iova, size);
        }
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        self.bump();
    }

    /// Apply an IOTLB message from the frontend (update or invalidate; batch
    /// markers are accepted and ignored).
    pub fn handle_msg(&self, msg: &IotlbMsg) -> Result<(), IotlbError> {
        match msg.kind {
            IotlbMsgType::Update => self.update(msg.iova, msg.size, msg.uaddr, msg.perm),
            IotlbMsgType::Invalidate => {
                self.invalidate(msg.iova, msg.size);
                Ok(())
            }
            IotlbMsgType::BatchBegin | IotlbMsgType::BatchEnd => Ok(()),
            IotlbMsgType::Miss | IotlbMsgType::AccessFail => {
                Err(IotlbError::UnknownType(msg.kind.to_u8()))
            }
        }
    }

    /// Replace the frontend's memory table (SET_MEM_TABLE).
    pub fn set_regions(&self, regions: Vec<MemRegion>) {
        *self.regions.write().unwrap_or_else(|e| e.into_inner()) = regions;
        self.bump();
    }

    /// Add one region (ADD_MEM_REG).
    /// A region already present (same guest address and size) is replaced;
    /// beyond [`MAX_REGIONS`] the region is ignored with a log line.
    pub fn add_region(&self, r: MemRegion) {
        {
            let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
            regions.retain(|o| !(o.gpa == r.gpa && o.size == r.size));
            if regions.len() >= MAX_REGIONS {
                log::warn!("IOTLB: more than {MAX_REGIONS} memory regions; {r:x?} ignored");
                return;
            }
            regions.push(r);
        }
        self.bump();
    }

    /// Remove a region (REM_MEM_REG), matched by guest address and size.
    pub fn remove_region(&self, gpa: u64, size: u64) {
        self.regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|r| !(r.gpa == gpa && r.size == size));
    }

    /// The frontend's virtual address of the first memory region, if any.
    pub fn first_region_uaddr(&self) -> Option<u64> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .map(|r| r.uaddr)
    }

    /// Remember queue `index`'s ring addresses (IOVAs).
    /// Indices past [`MAX_QUEUES`] are ignored (no device has them).
    pub fn set_ring(&self, index: u32, rings: RingIovas) {
        if index < MAX_QUEUES {
            lock(&self.rings).insert(index, rings);
        }
    }

    /// Queue `index`'s ring addresses, if the frontend set them.
    pub fn ring(&self, index: u32) -> Option<RingIovas> {
        lock(&self.rings).get(&index).copied()
    }

    /// Record the features the frontend acknowledged (SET_FEATURES).
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::Release);
    }

    /// Whether the frontend negotiated VIRTIO_F_ACCESS_PLATFORM (addresses are IOVAs).
    pub fn access_platform(&self) -> bool {
        self.features.load(Ordering::Acquire) & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0
    }

    /// The backend channel (SET_BACKEND_REQ_FD) on which misses are sent.
    /// Misses are written with a timeout (the miss timeout): a frontend
    /// that stops reading the channel fails misses, it cannot block the
    /// queues (or [`close`](Self::close)) behind a full socket.
    pub fn set_backend_channel(&self, sock: UnixStream) {
        if let Err(e) =
            sock.set_write_timeout(Some(self.miss_timeout.max(Duration::from_millis(1))))
        {
            log::warn!("IOTLB: cannot set a write timeout on the backend channel: {e}");
        }
        *lock(&self.channel) = Some(sock);
    }

    /// Whether an entry covers `iova` (whatever its permissions).
    fn covers(&self, iova: u64) -> bool {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries
            .range(..=iova)
            .next_back()
            .is_some_and(|(k, e)| iova - k < e.size)
    }

    /// The connection is gone: no more misses; waiting queues give up.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        *lock(&self.channel) = None;
        self.bump();
    }

    /// What happened so far.
    pub fn counters(&self) -> IotlbCounters {
        IotlbCounters {
            misses: self.misses.load(Ordering::Relaxed),
            updates: self.updates.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Guest-physical address of frontend address `uaddr`, with the region around it.
    fn region_of(&self, uaddr: u64) -> Option<(u64, MemRegion)> {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        regions.iter().find_map(|r| {
            let off = uaddr.checked_sub(r.uaddr).filter(|off| *off < r.size)?;
            Some((r.gpa.checked_add(off)?, *r))
        })
    }

    /// Send a miss for `iova` on the backend channel; false without a channel.
    fn send_miss(&self, iova: u64, access: Access) -> bool {
        let mut ch = lock(&self.channel);
        let Some(sock) = ch.as_mut() else {
            return false;
        };
        let msg = IotlbMsg {
            iova,
            size: 0,
            uaddr: 0,
            perm: access.perm(),
            kind: IotlbMsgType::Miss,
        }
        .emit();
        let mut buf = Vec::with_capacity(12 + msg.len());
        buf.extend_from_slice(&BACKEND_IOTLB_MSG.to_le_bytes());
        buf.extend_from_slice(&HDR_VERSION.to_le_bytes());
        buf.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        buf.extend_from_slice(&msg);
        match sock.write_all(&buf) {
            Ok(()) => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                log::debug!("IOTLB miss sent: iova {iova:#x} {access:?}");
                true
            }
            Err(e) => {
                log::warn!("cannot send an IOTLB miss to the frontend: {e}");
                *ch = None;
                false
            }
        }
    }
}

/// Remove entries of `map` that overlap `iova..iova+size` (size > 0).
fn remove_overlapping(map: &mut BTreeMap<u64, Entry>, iova: u64, size: u64) {
    let end = iova.saturating_add(size);
    let mut doomed: Vec<u64> = map.range(iova..end).map(|(k, _)| *k).collect();
    if let Some((k, e)) = map.range(..iova).next_back() {
        if k.saturating_add(e.size) > iova {
            doomed.push(*k);
        }
    }
    for k in doomed {
        map.remove(&k);
    }
}

impl Translator for VhostIotlb {
    fn translate(
        &self,
        _rid: RequesterId,
        iova: u64,
        access: Access,
    ) -> Result<Mapping, FaultReason> {
        let (start, e) = {
            let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
            let (k, e) = entries
                .range(..=iova)
                .next_back()
                .ok_or(FaultReason::denied(access))?;
            (*k, *e)
        };
        let off = iova - start;
        if off >= e.size || !e.perm.contains(access.perm()) {
            return Err(FaultReason::denied(access));
        }
        let uaddr = e
            .uaddr
            .checked_add(off)
            .ok_or(FaultReason::denied(access))?;
        let (gpa, region) = self.region_of(uaddr).ok_or(FaultReason::denied(access))?;
        let entry_end = start.saturating_add(e.size);
        let region_end = region.uaddr.saturating_add(region.size);
        // The largest page around `iova` that the entry and the region cover whole.
        for size in [PageSize::Size1G, PageSize::Size2M, PageSize::Size4K] {
            let mask = size.bytes() - 1;
            if iova & mask != gpa & mask {
                continue;
            }
            let page_iova = iova & !mask;
            // The frontend chose `uaddr`: it may be below the page's offset.
            let Some(page_uaddr) = uaddr.checked_sub(iova & mask) else {
                continue;
            };
            if page_iova >= start
                && page_iova.saturating_add(size.bytes()) <= entry_end
                && page_uaddr >= region.uaddr
                && page_uaddr.saturating_add(size.bytes()) <= region_end
            {
                return Ok(Mapping {
                    iova: page_iova,
                    gpa: gpa & !mask,
                    size,
                    perms: e.perm,
                });
            }
        }
        Err(FaultReason::denied(access))
    }

    fn report_fault(&self, fault: Fault) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 100 || n % LOG_EVERY == 0 {
            log::warn!(
                "DMA refused ({n} so far): {:?} of IOVA {:#x} is outside the guest's IOMMU mappings ({})",
                fault.access,
                fault.iova,
                fault.reason
            );
        }
    }
}

impl DmaFaultHook for VhostIotlb {
    fn on_fault(&self, fault: &DmaFault) -> HookAction {
        if !matches!(fault.kind, DmaFaultKind::Translation(_))
            || self.closed.load(Ordering::Acquire)
        {
            return HookAction::Fail;
        }
        let page = fault.iova & !(PageSize::Size4K.bytes() - 1);
        let g0 = *lock(&self.generation);
        // Another queue's miss may have brought the entry meanwhile.
        if self.translate(fault.rid, fault.iova, fault.access).is_ok() {
            return HookAction::Retry;
        }
        // Mapped, but not for this access (a device write to a read-only
        // page): a miss would only bring the same entry back; fail at once.
        if self.covers(fault.iova) {
            return HookAction::Fail;
        }
        if !self.send_miss(page, fault.access) {
            return HookAction::Fail;
        }
        let deadline = Instant::now() + self.miss_timeout;
        let mut g = lock(&self.generation);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return HookAction::Fail;
            }
            if *g != g0 && self.translate(fault.rid, fault.iova, fault.access).is_ok() {
                return HookAction::Retry;
            }
            let now = Instant::now();
            if now >= deadline {
                return HookAction::Fail;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RID: RequesterId = RequesterId(0);

    fn tlb_with(timeout: Duration) -> VhostIotlb {
        let t = VhostIotlb::new(timeout);
        t.set_regions(vec![MemRegion {
            gpa: 0,
            size: 1 << 30,
            uaddr: 0x7f00_0000_0000,
        }]);
        t
    }

    fn tlb() -> VhostIotlb {
        tlb_with(Duration::from_millis(10))
    }

    #[test]
    fn message_round_trip_and_malformed() {
        let m = IotlbMsg {
            iova: 0x1000,
            size: 0x2000,
            uaddr: 0x7f00_0000_3000,
            perm: Perms::READ | Perms::WRITE,
            kind: IotlbMsgType::Update,
        };
        assert_eq!(IotlbMsg::parse(&m.emit()), Ok(m));
        assert_eq!(IotlbMsg::parse(&[0; 25]), Err(IotlbError::Short(25)));
        let mut b = m.emit();
        b[25] = 9;
        assert_eq!(IotlbMsg::parse(&b), Err(IotlbError::UnknownType(9)));
        b[25] = 2;
        b[24] = 4;
        assert_eq!(IotlbMsg::parse(&b), Err(IotlbError::BadPerm(4)));
        // An invalidation's permission byte is garbage and ignored.
        b[24] = 0x43;
        b[25] = 3;
        let inv = IotlbMsg::parse(&b).unwrap();
        assert_eq!(
            (inv.kind, inv.perm),
            (IotlbMsgType::Invalidate, Perms::empty())
        );
    }

    #[test]
    fn hostile_addresses_regions_and_rings_are_refused_not_panicked() {
        // A region at user address 0 and an entry whose offsets line up at the
        // 1 GiB page size: the page's user address would be below zero.
        let t = VhostIotlb::new(Duration::from_millis(10));
        t.set_regions(vec![MemRegion {
            gpa: 0x3000_0000,
            size: 1 << 31,
            uaddr: 0,
        }]);
        t.update(0x3000_0000, 0x1000, 0, Perms::READ).unwrap();
        let m = t.translate(RID, 0x3000_0010, Access::Read).unwrap();
        assert_eq!((m.gpa, m.size), (0x3000_0000, PageSize::Size4K));
        // Regions are capped and deduplicated; ring indices past any queue ignored.
        for i in 0..(MAX_REGIONS as u64 + 10) {
            let r = MemRegion {
                gpa: i << 20,
                size: 1 << 20,
                uaddr: i << 20,
            };
            t.add_region(r);
            t.add_region(r);
        }
        assert_eq!(t.regions.read().unwrap().len(), MAX_REGIONS);
        let rings = RingIovas {
            desc: 0,
            avail: 0,
            used: 0,
        };
        t.set_ring(u32::MAX, rings);
        assert_eq!(t.ring(u32::MAX), None);
        // Mapped read-only, written: fails at once, without a miss.
        assert_eq!(
            t.on_fault(&DmaFault {
                rid: RID,
                iova: 0x3000_0010,
                len: 4,
                access: Access::Write,
                kind: DmaFaultKind::Translation(FaultReason::WriteDenied),
            }),
            HookAction::Fail
        );
        assert_eq!(t.misses.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn translate_update_invalidate() {
        let t = tlb();
        assert_eq!(
            t.translate(RID, 0x1000, Access::Read),
            Err(FaultReason::ReadDenied)
        );
        t.update(0x10_0000, 0x4000, 0x7f00_0000_8000, Perms::READ)
            .unwrap();
        let m = t.translate(RID, 0x10_1234, Access::Read).unwrap();
        assert_eq!(
            (m.iova, m.gpa, m.size),
            (0x10_1000, 0x9000, PageSize::Size4K)
        );
        assert_eq!(
            t.translate(RID, 0x10_1234, Access::Write),
            Err(FaultReason::WriteDenied)
        );
        assert!(t.translate(RID, 0x10_4000, Access::Read).is_err());
        // A 2 MiB-aligned entry gives 2 MiB pages.
        t.update(0x20_0000, 0x20_0000, 0x7f00_0040_0000, Perms::WRITE)
            .unwrap();
        let m = t.translate(RID, 0x20_0010, Access::Write).unwrap();
        assert_eq!(
            (m.iova, m.gpa, m.size),
            (0x20_0000, 0x40_0000, PageSize::Size2M)
        );
        // Invalidating part of an entry drops it whole.
        t.invalidate(0x10_2000, 0x1000);
        assert!(t.translate(RID, 0x10_0000, Access::Read).is_err());
        assert!(t.translate(RID, 0x20_0000, Access::Write).is_ok());
        let c = t.counters();
        assert_eq!((c.updates, c.invalidations), (2, 1));
    }

    #[test]
    fn hostile_updates_are_refused_or_harmless() {
        let t = tlb();
        assert!(t.update(u64::MAX - 10, 100, 0, Perms::READ).is_err());
        assert!(t.update(0, 0, 0, Perms::READ).is_err());
        assert!(t.update(0, 10, u64::MAX, Perms::READ).is_err());
        // An entry pointing outside every region translates to nothing.
        t.update(0x1000, 0x1000, 0x10, Perms::READ).unwrap();
        assert!(t.translate(RID, 0x1000, Access::Read).is_err());
        t.invalidate(u64::MAX, u64::MAX);
        t.invalidate(0, 0);
        assert!(t.translate(RID, 0x1000, Access::Read).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any bytes parse or fail cleanly, and what parses emits back the same.
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            if let Ok(m) = IotlbMsg::parse(&bytes) {
                let again = IotlbMsg::parse(&m.emit()).unwrap();
                proptest::prop_assert_eq!(again, m);
            }
        }

        /// Updates and invalidations against a list of ranges: a translation
        /// exists exactly when the model has an entry with the right, and
        /// points where the entry says.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(
            (0u8..3, 0u64..64, 1u64..16, 0u64..64, 1u8..4), 1..40),
            probes in proptest::collection::vec((0u64..80, proptest::prelude::any::<bool>()), 16)) {
            const P: u64 = 0x1000;
            let t = tlb();
            // (start, size, uaddr, perm)
            let mut model: Vec<(u64, u64, u64, Perms)> = Vec::new();
            for (op, page, pages, target, perm) in ops {
                let (iova, size) = (page * P, pages * P);
                let overlaps = |e: &(u64, u64, u64, Perms)| e.0 < iova + size && iova < e.0 + e.1;
                if op < 2 {
                    let perm = Perms::from_bits_truncate(perm);
                    let uaddr = 0x7f00_0000_0000 + target * P;
                    t.update(iova, size, uaddr, perm).unwrap();
                    model.retain(|e| !overlaps(e));
                    model.push((iova, size, uaddr, perm));
                } else {
                    t.invalidate(iova, size);
                    model.retain(|e| !overlaps(e));
                }
            }
            for (page, write) in probes {
                let iova = page * P + 0x10;
                let access = if write { Access::Write } else { Access::Read };
                let want = model
                    .iter()
                    .find(|e| e.0 <= iova && iova < e.0 + e.1 && e.3.contains(access.perm()))
                    .map(|e| e.2 - 0x7f00_0000_0000 + (iova - e.0));
                let got = t.translate(RID, iova, access).ok().map(|m| {
                    proptest::prop_assert!(m.contains(iova));
                    Ok(m.gpa_of(iova))
                });
                let got = match got {
                    Some(r) => Some(r?),
                    None => None,
                };
                proptest::prop_assert_eq!(got, want, "iova {:#x} {:?}", iova, access);
            }
        }
    }

    #[test]
    fn miss_without_channel_fails_at_once() {
        let t = tlb();
        let f = DmaFault {
            rid: RID,
            iova: 0x5000,
            len: 8,
            access: Access::Read,
            kind: DmaFaultKind::Translation(FaultReason::ReadDenied),
        };
        assert_eq!(t.on_fault(&f), HookAction::Fail);
    }

    #[test]
    fn miss_is_sent_and_answered() {
        let t = std::sync::Arc::new(tlb_with(Duration::from_secs(10)));
        let (ours, theirs) = UnixStream::pair().unwrap();
        t.set_backend_channel(ours);
        let t2 = t.clone();
        let frontend = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut buf = [0u8; 44];
            std::io::Read::read_exact(&mut theirs, &mut buf).unwrap();
            assert_eq!(&buf[0..4], &1u32.to_le_bytes());
            let m = IotlbMsg::parse(&buf[12..]).unwrap();
            assert_eq!(
                (m.kind, m.iova, m.perm),
                (IotlbMsgType::Miss, 0x5000, Perms::WRITE)
            );
            t2.update(0x5000, 0x1000, 0x7f00_0000_0000, Perms::READ | Perms::WRITE)
                .unwrap();
        });
        let f = DmaFault {
            rid: RID,
            iova: 0x5008,
            len: 8,
            access: Access::Write,
            kind: DmaFaultKind::Translation(FaultReason::WriteDenied),
        };
        assert_eq!(t.on_fault(&f), HookAction::Retry);
        frontend.join().unwrap();
        assert_eq!(t.counters().misses, 1);
    }
}
