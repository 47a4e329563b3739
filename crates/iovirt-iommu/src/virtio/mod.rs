//! A virtio-iommu device (virtio device type 23) over the host-programmed
//! [`Iommu`]: the guest's driver attaches endpoints to domains and maps and
//! unmaps IOVA ranges with requests on the request queue; DMA from endpoints
//! behind it goes through [`crate::DmaView`]s on the same [`Iommu`]; faults
//! are reported on the event queue.
//!
//! Endpoint IDs are PCI requester IDs (the VIOT table from
//! [`acpi::viot_table`] says so); domain IDs are 0..=0xffff. Endpoints must be
//! registered with [`VirtioIommu::add_endpoint`]; until attached, their DMA is
//! blocked.

pub mod acpi;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use iovirt_virtio::{read_config_bytes, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::domain::DomainError;
use crate::fault::{Fault, FaultReason, FaultReporter};
use crate::types::{Access, Perms, RequesterId};
use crate::unit::{Attachment, Iommu, IommuError};
use crate::walk::WalkConfig;
use wire::*;

/// virtio device ID of an IOMMU.
pub const VIRTIO_ID_IOMMU: u32 = 23;
/// Feature: the config space says which IOVAs are valid.
pub const F_INPUT_RANGE: u32 = 0;
/// Feature: the config space says which domain IDs are valid.
pub const F_DOMAIN_RANGE: u32 = 1;
/// Feature: MAP and UNMAP requests.
pub const F_MAP_UNMAP: u32 = 2;
/// Feature: PROBE requests.
pub const F_PROBE: u32 = 4;
const F_VERSION_1: u32 = 32;
/// Size of the configuration space.
pub const CONFIG_LEN: usize = 40;
/// Largest device-readable request we look at (PROBE: 4 + 4 + 64).
const MAX_REQUEST: usize = 128;

/// Options of a virtio-iommu device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioIommuConfig {
    /// IOVA width (bits) of the input range: 39, 48 or 57.
    pub input_bits: u8,
    /// Bytes of the PROBE properties buffer.
    pub probe_size: u32,
    /// The MSI doorbell range reported as a reserved region by PROBE.
    pub msi_range: (u64, u64),
}

impl Default for VirtioIommuConfig {
    fn default() -> Self {
        VirtioIommuConfig {
            input_bits: 48,
            probe_size: 512,
            msi_range: (0xfee0_0000, 0xfeef_ffff),
        }
    }
}

#[derive(Debug, Default)]
struct Domain {
    endpoints: BTreeSet<u32>,
    /// start → (last, phys, flags)
    mappings: BTreeMap<u64, (u64, u64, u32)>,
}

/// The request semantics of virtio-iommu, without queues: what ATTACH,
/// DETACH, MAP, UNMAP and PROBE do to the [`Iommu`].
#[derive(Debug)]
pub struct Backend {
    iommu: Arc<Iommu>,
    cfg: VirtioIommuConfig,
    endpoints: BTreeSet<u32>,
    domains: HashMap<u32, Domain>,
    attached: HashMap<u32, u32>,
}

impl Backend {
    /// Requests served against `iommu`.
    pub fn new(iommu: Arc<Iommu>, cfg: VirtioIommuConfig) -> Self {
        Backend {
            iommu,
            cfg,
            endpoints: BTreeSet::new(),
            domains: HashMap::new(),
            attached: HashMap::new(),
        }
    }

    /// Make `rid` an endpoint the driver may attach.
    pub fn add_endpoint(&mut self, rid: RequesterId) {
        self.endpoints.insert(u32::from(rid.0));
    }

    fn input_last(&self) -> u64 {
        (1u64 << self.cfg.input_bits.clamp(39, 57)) - 1
    }

    fn detach(&mut self, endpoint: u32) {
        if let Some(d) = self.attached.remove(&endpoint) {
            self.iommu.detach(RequesterId(endpoint as u16));
            let empty = self.domains.get_mut(&d).is_some_and(|dom| {
                dom.endpoints.remove(&endpoint);
                dom.endpoints.is_empty()
            });
            if empty {
                // The last endpoint left: the domain and its mappings go.
                self.domains.remove(&d);
                let _ = self.iommu.destroy_domain(d as u16);
            }
        }
    }

    /// Serve one request; PROBE fills `probe` with properties.
    pub fn handle(&mut self, req: &Request, probe: &mut [u8]) -> Status {
        match *req {
            Request::Attach {
                domain,
                endpoint,
                flags,
            } => {
                if flags != 0 {
                    return Status::Inval; // bypass domains are not offered
                }
                if !self.endpoints.contains(&endpoint) {
                    return Status::NoEnt;
                }
                if domain > 0xffff {
                    return Status::Range;
                }
                if self.attached.get(&endpoint) == Some(&domain) {
                    return Status::Ok;
                }
                self.detach(endpoint);
                if !self.domains.contains_key(&domain) {
                    let cfg = WalkConfig {
                        levels: if self.cfg.input_bits > 48 { 5 } else { 4 },
                        ..WalkConfig::FIVE_LEVEL
                    };
                    if self.iommu.create_domain(domain as u16, cfg).is_err() {
                        return Status::DevErr;
                    }
                    self.domains.insert(domain, Domain::default());
                }
                if self
                    .iommu
                    .attach(
                        RequesterId(endpoint as u16),
                        Attachment::Domain(domain as u16),
                    )
                    .is_err()
                {
                    return Status::DevErr;
                }
                if let Some(d) = self.domains.get_mut(&domain) {
                    d.endpoints.insert(endpoint);
                }
                self.attached.insert(endpoint, domain);
                Status::Ok
            }
            Request::Detach { domain, endpoint } => {
                if !self.endpoints.contains(&endpoint) {
                    return Status::NoEnt;
                }
                if self.attached.get(&endpoint) != Some(&domain) {
                    return Status::Inval;
                }
                self.detach(endpoint);
                Status::Ok
            }
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                let last = self.input_last();
                let Some(dom) = self.domains.get_mut(&domain) else {
                    return Status::NoEnt;
                };
                if flags & !(MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO) != 0 || flags & MAP_F_MMIO != 0
                {
                    return Status::Inval;
                }
                if virt_end < virt_start || virt_end > last {
                    return Status::Range;
                }
                let len = virt_end - virt_start + 1;
                if virt_start & 0xfff != 0 || len & 0xfff != 0 || phys_start & 0xfff != 0 {
                    return Status::Range;
                }
                if phys_start.checked_add(len - 1).is_none() {
                    return Status::Range;
                }
                let overlaps = dom
                    .mappings
                    .range(..=virt_end)
                    .next_back()
                    .is_some_and(|(_, &(end, _, _))| end >= virt_start);
                if overlaps {
                    return Status::Inval;
                }
                let perms = Perms::from_bits_truncate((flags & 3) as u8);
                if !perms.is_empty() {
                    match self
                        .iommu
                        .map(domain as u16, virt_start, phys_start, len, perms)
                    {
                        Ok(()) => {}
                        Err(IommuError::Domain(DomainError::TooManyTables(_))) => {
                            return Status::NoMem
                        }
                        Err(e) => {
                            log::debug!("virtio-iommu: MAP refused: {e}");
                            return Status::Range;
                        }
                    }
                }
                dom.mappings
                    .insert(virt_start, (virt_end, phys_start, flags));
                Status::Ok
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                let Some(dom) = self.domains.get_mut(&domain) else {
                    return Status::NoEnt;
                };
                if virt_end < virt_start {
                    return Status::Inval;
                }
                let hit: Vec<(u64, u64)> = dom
                    .mappings
                    .range(..=virt_end)
                    .filter(|(s, (e, _, _))| *e >= virt_start && **s <= virt_end)
                    .map(|(s, (e, _, _))| (*s, *e))
                    .collect();
                // A mapping only partly inside the range is not split.
                if hit.iter().any(|&(s, e)| s < virt_start || e > virt_end) {
                    return Status::Range;
                }
                for (s, e) in hit {
                    dom.mappings.remove(&s);
                    if let Err(err) = self.iommu.unmap(domain as u16, s, e - s + 1) {
                        log::debug!("virtio-iommu: UNMAP: {err}");
                    }
                }
                Status::Ok
            }
            Request::Probe { endpoint } => {
                if !self.endpoints.contains(&endpoint) {
                    return Status::NoEnt;
                }
                probe.fill(0);
                let p =
                    resv_mem_property(RESV_MEM_T_MSI, self.cfg.msi_range.0, self.cfg.msi_range.1);
                match probe.get_mut(..p.len()) {
                    Some(dst) => {
                        dst.copy_from_slice(&p);
                        Status::Ok
                    }
                    None => Status::Inval,
                }
            }
        }
    }
}

/// Serve every request on the request `queue`; returns how many chains were used.
pub fn process_requests<M: GuestMemory>(
    backend: &Mutex<Backend>,
    probe_size: u32,
    queue: &mut Queue,
    mem: &M,
) -> usize {
    let mut n = 0;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        n += 1;
        let head = chain.head_index();
        let mut req = Vec::with_capacity(MAX_REQUEST);
        let mut writable: Vec<(GuestAddress, u32)> = Vec::new();
        let mut status = None;
        for d in chain {
            if d.is_write_only() {
                writable.push((d.addr(), d.len()));
            } else if !writable.is_empty() {
                status = Some(Status::Inval); // readable after writable
            } else {
                let room = MAX_REQUEST - req.len();
                let take = (d.len() as usize).min(room);
                let mut buf = vec![0u8; take];
                if mem.read_slice(&mut buf, d.addr()).is_err() {
                    status = Some(Status::Fault);
                }
                req.extend_from_slice(&buf);
            }
        }
        let parsed = Request::parse(&req);
        let is_probe = matches!(parsed, Ok(Request::Probe { .. }));
        let props_len = if is_probe { probe_size as usize } else { 0 };
        let wlen: usize = writable.iter().map(|w| w.1 as usize).sum();
        let mut props = vec![0u8; props_len];
        let status = match (status, parsed) {
            (Some(s), _) => s,
            (None, Err(s)) => s,
            (None, Ok(_)) if wlen < props_len + TAIL_LEN => Status::Inval,
            (None, Ok(r)) => backend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle(&r, &mut props),
        };
        let mut out = props;
        out.extend_from_slice(&[status.code(), 0, 0, 0]);
        let mut used = 0u32;
        if wlen >= out.len() {
            if write_scattered(mem, &writable, &out) {
                used = out.len() as u32;
            }
        } else if wlen >= TAIL_LEN {
            // No room for properties: only the tail, at the start.
            let tail = [status.code(), 0, 0, 0];
            if write_scattered(mem, &writable, &tail) {
                used = TAIL_LEN as u32;
            }
        }
        if let Err(e) = queue.add_used(mem, head, used) {
            log::warn!("virtio-iommu: add_used: {e}");
        }
    }
    n
}

fn write_scattered<M: GuestMemory>(mem: &M, bufs: &[(GuestAddress, u32)], mut data: &[u8]) -> bool {
    for &(addr, len) in bufs {
        if data.is_empty() {
            break;
        }
        let n = (len as usize).min(data.len());
        let (now, rest) = data.split_at(n);
        if mem.write_slice(now, addr).is_err() {
            return false;
        }
        data = rest;
    }
    data.is_empty()
}

struct EventState<M: GuestMemory> {
    queue: Queue,
    mem: GuestMemoryAtomic<M>,
    interrupt: Arc<dyn VirtioInterrupt>,
    index: u16,
}

/// The event queue as a [`FaultReporter`]: each fault becomes a
/// `virtio_iommu_fault` in the next buffer the driver provided (or is
/// counted as dropped when there is none).
pub struct EventQueue<M: GuestMemory> {
    state: Mutex<Option<EventState<M>>>,
    sent: AtomicU64,
    dropped: AtomicU64,
}

impl<M: GuestMemory> EventQueue<M> {
    fn new() -> Self {
        EventQueue {
            state: Mutex::new(None),
            sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }
    /// Fault events delivered.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Fault events dropped for want of a buffer (or before activation).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<M: GuestMemory + Send + Sync> FaultReporter for EventQueue<M> {
    fn report(&self, f: &Fault) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = st.as_mut() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let reason = match f.reason {
            FaultReason::ContextNotPresent => FAULT_R_DOMAIN,
            FaultReason::ReadDenied | FaultReason::WriteDenied => FAULT_R_MAPPING,
            _ => 0,
        };
        let flags = FAULT_F_ADDRESS
            | match f.access {
                Access::Read => FAULT_F_READ,
                Access::Write => FAULT_F_WRITE,
            };
        let ev = fault_event(reason, flags, u32::from(f.rid.0), f.iova);
        let mem = s.mem.memory();
        let Some(chain) = s.queue.pop_descriptor_chain(&*mem) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let head = chain.head_index();
        let bufs: Vec<(GuestAddress, u32)> = chain
            .filter(|d| d.is_write_only())
            .map(|d| (d.addr(), d.len()))
            .collect();
        let used = if write_scattered(&*mem, &bufs, &ev) {
            ev.len() as u32
        } else {
            0
        };
        if s.queue.add_used(&*mem, head, used).is_ok() {
            self.sent.fetch_add(1, Ordering::Relaxed);
            if s.queue.needs_notification(&*mem).unwrap_or(true) {
                let _ = s.interrupt.signal_used_queue(s.index);
            }
        }
    }
}

/// A virtio-iommu device.
///
/// ```
/// use iovirt_iommu::virtio::{VirtioIommu, VirtioIommuConfig};
/// use iovirt_iommu::{DmaView, RequesterId};
/// use iovirt_virtio::VirtioDevice;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
///
/// let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
/// let dev = VirtioIommu::<GuestMemoryMmap>::new(VirtioIommuConfig::default());
/// let blk = RequesterId::new(0, 4, 0);
/// dev.add_endpoint(blk);
/// // The block device's DMA goes through the IOMMU the guest programs.
/// let view = DmaView::new(ram, blk, dev.iommu().clone());
/// assert_eq!(VirtioDevice::<GuestMemoryMmap>::device_type(&dev), 23);
/// # let _ = view;
/// ```
pub struct VirtioIommu<M: GuestMemory> {
    cfg: VirtioIommuConfig,
    iommu: Arc<Iommu>,
    backend: Arc<Mutex<Backend>>,
    events: Arc<EventQueue<M>>,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    running: Option<(Arc<EventFd>, JoinHandle<()>)>,
}

impl<M: GuestMemory + Send + Sync + 'static> VirtioIommu<M> {
    /// A device with its own [`Iommu`]; hand [`VirtioIommu::iommu`] to the
    /// endpoints' [`crate::DmaView`]s.
    pub fn new(cfg: VirtioIommuConfig) -> Self {
        let cfg = VirtioIommuConfig {
            input_bits: cfg.input_bits.clamp(39, 57),
            ..cfg
        };
        let events = Arc::new(EventQueue::new());
        let iommu = Arc::new(Iommu::new().with_reporter(events.clone()));
        let backend = Arc::new(Mutex::new(Backend::new(iommu.clone(), cfg)));
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(!0xfffu64).to_le_bytes()); // page_size_mask: 4 KiB granule
        c[8..16].copy_from_slice(&0u64.to_le_bytes()); // input_range.start
        c[16..24].copy_from_slice(&((1u64 << cfg.input_bits) - 1).to_le_bytes());
        c[24..28].copy_from_slice(&0u32.to_le_bytes()); // domain_range.start
        c[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        c[32..36].copy_from_slice(&cfg.probe_size.to_le_bytes());
        VirtioIommu {
            cfg,
            iommu,
            backend,
            events,
            config: c,
            queue_sizes: [64, 64],
            running: None,
        }
    }

    /// The IOMMU the guest programs through this device.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// The event queue (delivered and dropped fault reports).
    pub fn events(&self) -> &Arc<EventQueue<M>> {
        &self.events
    }

    /// Make `rid` an endpoint behind this IOMMU.
    pub fn add_endpoint(&self, rid: RequesterId) {
        self.backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_endpoint(rid);
    }
}

fn worker<M: GuestMemory + Send + Sync + 'static>(
    backend: Arc<Mutex<Backend>>,
    probe_size: u32,
    mut queue: Queue,
    mem: GuestMemoryAtomic<M>,
    interrupt: Arc<dyn VirtioInterrupt>,
    notify: Arc<EventFd>,
    stop: Arc<EventFd>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let epoll = Epoll::new()?;
    for (fd, token) in [(stop.as_raw_fd(), 0u64), (notify.as_raw_fd(), 1)] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in events.iter().take(n) {
            if ev.data() == 0 {
                return Ok(());
            }
            let _ = notify.read();
            let m = mem.memory();
            if process_requests(&backend, probe_size, &mut queue, &*m) > 0
                && queue.needs_notification(&*m).unwrap_or(true)
            {
                let _ = interrupt.signal_used_queue(0);
            }
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> VirtioDevice<M> for VirtioIommu<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_IOMMU
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn device_features(&self) -> u64 {
        [
            F_INPUT_RANGE,
            F_DOMAIN_RANGE,
            F_MAP_UNMAP,
            F_PROBE,
            F_VERSION_1,
        ]
        .iter()
        .fold(0, |f, b| f | (1u64 << b))
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-iommu: config write of {} bytes at {offset:#x} ignored",
            data.len()
        );
    }
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        _acked_features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        if self.running.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let mut req = None;
        for q in queues {
            match q.index {
                0 => req = Some(q),
                1 => {
                    *self.events.state.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(EventState {
                            queue: q.queue,
                            mem: mem.clone(),
                            interrupt: interrupt.clone(),
                            index: 1,
                        })
                }
                i => return Err(ActivateError::BadQueues(format!("no queue {i}"))),
            }
        }
        let req =
            req.ok_or_else(|| ActivateError::BadQueues("request queue not enabled".into()))?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let (backend, probe, s) = (self.backend.clone(), self.cfg.probe_size, stop.clone());
        let handle = std::thread::Builder::new()
            .name("virtio-iommu".into())
            .spawn(move || {
                if let Err(e) = worker(backend, probe, req.queue, mem, interrupt, req.notify, s) {
                    log::error!("virtio-iommu: worker failed: {e}");
                }
            })?;
        self.running = Some((stop, handle));
        Ok(())
    }
    fn reset(&mut self) {
        if let Some((stop, handle)) = self.running.take() {
            let _ = stop.write(1);
            let _ = handle.join();
        }
        *self.events.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Back to power-on: every endpoint detached, every domain gone.
        let mut b = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        let eps: Vec<u32> = b.attached.keys().copied().collect();
        for e in eps {
            b.detach(e);
        }
    }
}

impl<M: GuestMemory> Drop for VirtioIommu<M> {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.running.take() {
            let _ = stop.write(1);
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests;
