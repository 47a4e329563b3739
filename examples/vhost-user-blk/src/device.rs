//! The vhost-user side: a [`VhostUserBackend`] that runs iovirt-virtio's
//! virtio-blk queue processing on the rings the frontend shares.
//!
//! Threads: one vring worker per queue (rust-vmm's event loop). When a queue
//! starts (its first kick), the worker builds an
//! [`iovirt_virtio::block::QueueHandler`] over a copy of the vring's queue
//! state; every kick then pops, parses and submits all available chains, and
//! completions (inline, or from the back-end's threads) are put on the used
//! ring in batches, with the call eventfd written as EVENT_IDX allows. When the
//! frontend stops the queue (GET_VRING_BASE), the worker's handler waits for
//! its in-flight requests, hands the ring indices back and is dropped.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use iovirt_backend::BlockBackend;
use iovirt_bus::InterruptError;
use iovirt_iommu::{DmaView, RequesterId};
use iovirt_virtio::block::{BlockConfig, QueueHandler, VirtioBlock};
use iovirt_virtio::{VirtioDevice, VirtioInterrupt};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::iotlb::{RingIovas, VhostIotlb, VIRTIO_F_ACCESS_PLATFORM};
use crate::poll::{thread_cpu_ns, PollMode, PollTuner};
use crate::Error;

/// Guest memory as the vhost-user frontend shares it.
pub type GuestMem = GuestMemoryMmap<()>;
/// The atomically replaceable guest memory (SET_MEM_TABLE swaps it).
pub type AtomicMem = GuestMemoryAtomic<GuestMem>;
type Vring = VringRwLock<AtomicMem>;
/// Guest memory as a device behind the frontend's vIOMMU sees it (IOVAs).
pub type DmaMem = DmaView<GuestMem>;

/// Bit 30 of the feature word: the frontend may negotiate protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Put finished requests on the used ring (and signal, as EVENT_IDX allows)
/// after this many chains of a pass, so the frontend reaps and refills while
/// the rest are processed. Measured at QD32 with libblkio on this 2-core host:
/// 1 gave the lowest median latency (about 21 us against 30 us with 4), and
/// signalling once per pass (32) clearly lowered IOPS.
const SIGNAL_BATCH: usize = 1;
/// ... but within a pass, write the call eventfd only once this many chains
/// wait for it (the end of the pass signals the rest). Measured at QD32 on a
/// null disk with libblkio here (4 rounds, 3 s each): 1 gave 1.06-1.55M IOPS
/// with 0.3-0.8 interrupts per request, 3 gave 1.40-2.22M, 4 gave 1.75-2.64M
/// with 0.10-0.23 (each eventfd write wakes the frontend's idle core, which
/// costs both sides far more than the microsecond the interrupt waits);
/// 6 and 8 held the frontend too long (1.6-2.7M, more spread).
const SIGNAL_MIN: usize = 4;
/// How long GET_VRING_BASE waits for in-flight requests before giving up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Signals the frontend through the vring's call eventfd.
struct CallInterrupt(Vring);

impl VirtioInterrupt for CallInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> Result<(), InterruptError> {
        self.0.signal_used_queue().map_err(InterruptError::Io)
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// Per-queue state.
struct QueueCtx {
    index: u16,
    /// The running queue and its coalescing timer.
    run: Mutex<QueueRun>,
    /// Written when a completion on another thread is waiting; in the worker's epoll.
    wake: Arc<EventFd>,
    /// The vring (remembered at the first event, for GET_VRING_BASE).
    vring: OnceLock<Vring>,
}

/// A running queue: on guest-physical memory, or on IOVAs through the IOTLB.
enum Running {
    Plain(QueueHandler<GuestMem>),
    Dma(QueueHandler<DmaMem>),
}

impl Running {
    fn process_completions(&mut self) {
        match self {
            Running::Plain(h) => h.process_completions(),
            Running::Dma(h) => h.process_completions(),
        }
    }
    fn process_backend_event(&mut self, fd: RawFd) {
        match self {
            Running::Plain(h) => h.process_backend_event(fd),
            Running::Dma(h) => h.process_backend_event(fd),
        }
    }
    fn inflight(&self) -> usize {
        match self {
            Running::Plain(h) => h.inflight(),
            Running::Dma(h) => h.inflight(),
        }
    }
    fn queue(&self) -> &Queue {
        match self {
            Running::Plain(h) => h.queue(),
            Running::Dma(h) => h.queue(),
        }
    }
    fn coalesce_deadline(&self) -> Option<Instant> {
        match self {
            Running::Plain(h) => h.coalesce_deadline(),
            Running::Dma(h) => h.coalesce_deadline(),
        }
    }
    fn flush_interrupts(&mut self) {
        match self {
            Running::Plain(h) => h.flush_interrupts(),
            Running::Dma(h) => h.flush_interrupts(),
        }
    }
}

/// The running queue, between its first kick and GET_VRING_BASE, and its
/// coalescing deadline timer.
struct QueueRun {
    handler: Option<Running>,
    /// With coalescing: fires at the handler's `coalesce_deadline()`; in the
    /// worker's epoll. Non-blocking (see `handle_event`).
    timer: Option<TimerFd>,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    /// Whether (and how long) to poll after a batch.
    tuner: PollTuner,
}

impl QueueRun {
    /// Arm the timer for the handler's coalescing deadline, if it moved.
    fn arm(&mut self, queue: u16) {
        let (Some(t), Some(h)) = (self.timer.as_mut(), self.handler.as_ref()) else {
            return;
        };
        let Some(d) = h.coalesce_deadline() else {
            return;
        };
        if self.armed == Some(d) {
            return;
        }
        // A zero duration would disarm the timer: wait at least 1 ns.
        let wait = d
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        match t.reset(wait, None) {
            Ok(()) => self.armed = Some(d),
            Err(e) => {
                // Without the timer the interrupt must not wait: deliver now.
                log::warn!("queue {queue}: cannot arm the coalescing timer: {e}");
                if let Some(h) = self.handler.as_mut() {
                    h.flush_interrupts();
                }
            }
        }
    }
}

/// A timerfd whose reads fail with `WouldBlock` instead of waiting when it
/// has not expired.
fn nonblocking_timer() -> io::Result<TimerFd> {
    let t = TimerFd::new()?;
    let fd = t.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with plain integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

/// A copy of a configured queue: the vring keeps its own for the vhost-user
/// handler, the running [`QueueHandler`] owns this one. With `iovas`, the
/// ring addresses are those IOVAs (the vring holds a placeholder, see `proxy`).
fn copy_queue(q: &Queue, iovas: Option<RingIovas>) -> Result<Queue, virtio_queue::Error> {
    let mut c = Queue::new(q.max_size())?;
    c.set_size(q.size());
    let r = iovas.unwrap_or(RingIovas {
        desc: q.desc_table(),
        avail: q.avail_ring(),
        used: q.used_ring(),
    });
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (l, h) = split(r.desc);
    c.set_desc_table_address(l, h);
    let (l, h) = split(r.avail);
    c.set_avail_ring_address(l, h);
    let (l, h) = split(r.used);
    c.set_used_ring_address(l, h);
    c.set_event_idx(q.event_idx_enabled());
    c.set_next_avail(q.next_avail());
    c.set_next_used(q.next_used());
    c.set_ready(true);
    Ok(c)
}

struct Inner {
    blk: VirtioBlock,
    /// The back-end, for polling its completions when no queue runs.
    disk: Arc<dyn BlockBackend>,
    /// The back-end's completion eventfd, once the workers watch it.
    backend_fd: OnceLock<Option<RawFd>>,
    poll: Duration,
    queue_size: u16,
    mem: AtomicMem,
    queues: Vec<QueueCtx>,
    /// With `--iommu-platform on`: the connection's IOTLB and the IOVA view
    /// of guest memory the queues use once ACCESS_PLATFORM is negotiated.
    iommu: Option<(Arc<VhostIotlb>, GuestMemoryAtomic<DmaMem>)>,
}

/// A virtio-blk device for one vhost-user connection.
///
/// Cheap to clone (the event loop holds one clone per worker thread). A new one
/// is made for every connection, so a reconnecting frontend starts from reset.
#[derive(Clone)]
pub struct BlkDevice(Arc<Inner>);

impl BlkDevice {
    /// A device over `disk` with `cfg.num_queues` queues, whose guest memory is
    /// `mem` (the same object given to the daemon).
    ///
    /// After a kick the queue's worker polls the avail ring for `poll` before
    /// sleeping again (zero: never poll).
    pub fn new(
        disk: Arc<dyn BlockBackend>,
        cfg: BlockConfig,
        mem: AtomicMem,
        poll: Duration,
    ) -> Result<Self, Error> {
        let num_queues = cfg.num_queues;
        let queue_size = cfg.queue_size;
        let coalescing = cfg.coalescing.is_some();
        let blk = VirtioBlock::new(disk.clone(), cfg).map_err(|e| Error::Usage(e.to_string()))?;
        let queues = (0..num_queues)
            .map(|index| {
                let timer = if coalescing {
                    Some(nonblocking_timer()?)
                } else {
                    None
                };
                Ok(QueueCtx {
                    index,
                    run: Mutex::new(QueueRun {
                        handler: None,
                        timer,
                        armed: None,
                        tuner: PollTuner::new(poll, PollMode::default()),
                    }),
                    wake: Arc::new(EventFd::new(EFD_NONBLOCK)?),
                    vring: OnceLock::new(),
                })
            })
            .collect::<io::Result<Vec<_>>>()
            .map_err(Error::Setup)?;
        Ok(BlkDevice(Arc::new(Inner {
            blk,
            disk,
            backend_fd: OnceLock::new(),
            poll,
            queue_size,
            mem,
            queues,
            iommu: None,
        })))
    }

    /// The same device offering VIRTIO_F_ACCESS_PLATFORM (and the backend
    /// channel) with `iotlb` as its device IOTLB: when the frontend negotiates
    /// it, every ring and buffer address is an IOVA translated through `iotlb`.
    /// Call before the device is shared (it is a no-op on a clone).
    pub fn with_iotlb(mut self, iotlb: Arc<VhostIotlb>) -> Self {
        let view = dma_view(&self.0.mem, &iotlb);
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.iommu = Some((iotlb, GuestMemoryAtomic::new(view)));
        }
        self
    }

    /// How the queues decide to poll (default: [`PollMode::Adaptive`]); call
    /// before the device is shared.
    pub fn with_poll_mode(mut self, mode: PollMode) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            let window = inner.poll;
            for q in &mut inner.queues {
                q.run.get_mut().unwrap_or_else(|e| e.into_inner()).tuner =
                    PollTuner::new(window, mode);
            }
        }
        self
    }

    /// The device IOTLB, when ACCESS_PLATFORM is offered.
    pub fn iotlb(&self) -> Option<&Arc<VhostIotlb>> {
        self.0.iommu.as_ref().map(|(t, _)| t)
    }

    /// The wake-up eventfd of each queue; the server registers queue `i`'s
    /// with worker `i` under event id [`BlkDevice::completion_event_id`].
    pub fn completion_fds(&self) -> Vec<RawFd> {
        self.0.queues.iter().map(|q| q.wake.as_raw_fd()).collect()
    }

    /// The event id of completion wake-ups (the first one the event loop leaves to back-ends).
    pub fn completion_event_id(&self) -> u64 {
        self.0.queues.len() as u64 + 1
    }

    /// With coalescing on, each queue's deadline timer (timerfd); the server
    /// registers queue `i`'s with worker `i` under [`BlkDevice::timer_event_id`].
    /// Empty when coalescing is off.
    pub fn timer_fds(&self) -> Vec<RawFd> {
        self.0
            .queues
            .iter()
            .filter_map(|q| {
                let run = q.run.lock().unwrap_or_else(|e| e.into_inner());
                run.timer.as_ref().map(|t| t.as_raw_fd())
            })
            .collect()
    }

    /// The event id of coalescing deadline timers.
    pub fn timer_event_id(&self) -> u64 {
        self.0.queues.len() as u64 + 2
    }

    /// Take completion delivery over from the back-end, where it allows
    /// ([`BlockBackend::completion_fd`]): the server registers the returned
    /// eventfd with every worker under [`BlkDevice::backend_event_id`], and
    /// the queue workers reap completions themselves instead of being woken
    /// by the back-end's thread. Call only when it will be registered.
    pub fn take_backend_completions(&self) -> Option<RawFd> {
        *self
            .0
            .backend_fd
            .get_or_init(|| self.0.disk.completion_fd())
    }

    /// The event id of the back-end's completion eventfd.
    pub fn backend_event_id(&self) -> u64 {
        self.0.queues.len() as u64 + 3
    }

    /// Requests this device put on its used rings, over all queues.
    pub fn completions(&self) -> u64 {
        self.0.blk.completions()
    }

    /// Interrupts (call eventfd writes) this device sent, over all queues.
    pub fn interrupts(&self) -> u64 {
        self.0.blk.interrupts_signalled()
    }

    fn virtio(&self) -> &dyn VirtioDevice<GuestMem> {
        &self.0.blk
    }

    /// The IOVA view, when the frontend negotiated ACCESS_PLATFORM.
    fn translated(&self) -> Option<(&Arc<VhostIotlb>, &GuestMemoryAtomic<DmaMem>)> {
        self.0
            .iommu
            .as_ref()
            .filter(|(t, _)| t.access_platform())
            .map(|(t, m)| (t, m))
    }

    /// Adaptive polling: after a kick, keep the driver's notifications off
    /// and watch the avail ring for up to the poll window, processing new
    /// requests without waiting for (or costing the driver) another kick.
    /// Notifications are turned back on only when the window passes idle.
    fn poll<M: GuestMemory + Send + Sync + 'static>(
        h: &mut QueueHandler<M>,
        tuner: &mut PollTuner,
    ) {
        let now = Instant::now();
        if tuner.epoch_due(now) {
            tuner.observe(now, thread_cpu_ns(), h.completions());
        }
        let window = tuner.window();
        if window.is_zero() {
            h.process_queue();
            return;
        }
        h.disable_notification();
        h.set_polling(true);
        h.poll_queue();
        let mut deadline = Instant::now() + window;
        let mut spins = 0u32;
        loop {
            if h.has_available() {
                h.poll_queue();
                spins = 0;
                deadline = Instant::now() + tuner.window();
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                if h.inflight() > 0 {
                    h.process_completions();
                }
                let now = Instant::now();
                if h.coalesce_deadline().is_some_and(|d| now >= d) {
                    h.flush_interrupts();
                }
                if tuner.epoch_due(now) {
                    tuner.observe(now, thread_cpu_ns(), h.completions());
                    if tuner.window().is_zero() {
                        // Polling costs more than sleeping here: stop now.
                        deadline = now;
                    }
                }
                if now >= deadline {
                    // Re-arm the driver's kicks; if it posted meanwhile, go on polling.
                    if !h.enable_notification() {
                        h.set_polling(false);
                        return;
                    }
                    h.disable_notification();
                    deadline = Instant::now() + tuner.window();
                }
            }
            std::hint::spin_loop();
        }
    }

    fn start_queue(&self, q: &QueueCtx, vring: &Vring) -> Option<Running> {
        let translated = self.translated();
        let iovas = match translated {
            Some((t, _)) => match t.ring(u32::from(q.index)) {
                Some(r) => Some(r),
                None => {
                    log::warn!("queue {}: no ring addresses (IOVAs) yet", q.index);
                    return None;
                }
            },
            None => None,
        };
        let queue = {
            let v = vring.get_ref();
            if !v.get_queue().ready() {
                return None;
            }
            copy_queue(v.get_queue(), iovas)
        };
        let mut queue = match queue {
            Ok(queue) => queue,
            Err(e) => {
                log::warn!("queue {}: unusable queue configuration: {e}", q.index);
                return None;
            }
        };
        let irq = Arc::new(CallInterrupt(vring.clone()));
        let started = match (translated, iovas) {
            (Some((_, dma)), Some(r)) => {
                // The handler read the used index through a placeholder address;
                // read it where the ring really is (as it does without an IOMMU).
                let used_idx = r
                    .used
                    .checked_add(2)
                    .map(GuestAddress)
                    .and_then(|a| dma.memory().read_obj::<u16>(a).ok());
                let Some(used_idx) = used_idx else {
                    log::warn!(
                        "queue {}: used ring at IOVA {:#x} is not mapped for the device",
                        q.index,
                        r.used
                    );
                    return None;
                };
                queue.set_next_used(u16::from_le(used_idx));
                self.0
                    .blk
                    .queue_handler_with_event(q.index, queue, dma.clone(), irq, q.wake.clone())
                    .map(|mut h| {
                        h.set_signal_batch(SIGNAL_BATCH);
                        h.set_signal_min(SIGNAL_MIN);
                        Running::Dma(h)
                    })
            }
            _ => self
                .0
                .blk
                .queue_handler_with_event(q.index, queue, self.0.mem.clone(), irq, q.wake.clone())
                .map(|mut h| {
                    h.set_signal_batch(SIGNAL_BATCH);
                    h.set_signal_min(SIGNAL_MIN);
                    Running::Plain(h)
                }),
        };
        match started {
            Ok(h) => Some(h),
            Err(e) => {
                log::error!("queue {}: cannot start: {e}", q.index);
                None
            }
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.queue_size)
    }

    fn features(&self) -> u64 {
        let platform = if self.0.iommu.is_some() {
            1 << VIRTIO_F_ACCESS_PLATFORM
        } else {
            0
        };
        self.virtio().device_features() | (1 << VHOST_USER_F_PROTOCOL_FEATURES) | platform
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        if self.0.iommu.is_some() {
            // IOTLB misses go to the frontend on the backend channel (QEMU
            // requires it, with REPLY_ACK, for iommu_platform=on).
            base | VhostUserProtocolFeatures::BACKEND_REQ
        } else {
            base
        }
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queue carries the flag (the vhost-user handler sets it on the vring's queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        self.virtio().read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the configuration is writable (no CONFIG_WCE): ignore, as the device does.
        Ok(())
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The handler replaced the contents of the atomic we share with it;
        // the IOVA view wraps a snapshot, so rebuild it.
        if let Some((t, dma)) = &self.0.iommu {
            dma.lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(dma_view(&self.0.mem, t));
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(q) = self.0.queues.get(queue_index as usize) else {
            return Ok(());
        };
        let mut run = q.run.lock().unwrap_or_else(|e| e.into_inner());
        run.armed = None;
        if let Some(t) = run.timer.as_mut() {
            let _ = t.clear();
        }
        let Some(mut h) = run.handler.take() else {
            return Ok(());
        };
        drop(run);
        // Finish what is in flight, so the used ring is complete when the frontend reads it.
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            h.process_completions();
            if h.inflight() == 0 {
                break;
            }
            if Instant::now() >= deadline {
                log::error!(
                    "queue {queue_index}: {} requests still in flight after {STOP_TIMEOUT:?}; abandoning them",
                    h.inflight()
                );
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        h.flush_interrupts();
        if let Some(v) = q.vring.get() {
            let mut v = v.get_mut();
            let queue = v.get_queue_mut();
            queue.set_next_avail(h.queue().next_avail());
            queue.set_next_used(h.queue().next_used());
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per worker thread: the thread's only vring is queue `thread_id`.
        let (Some(q), Some(vring)) = (self.0.queues.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        let _ = q.vring.set(vring.clone());
        let mut run = q.run.lock().unwrap_or_else(|e| e.into_inner());
        let id = u64::from(device_event);
        if id == self.completion_event_id() {
            let _ = q.wake.read();
            if let Some(h) = run.handler.as_mut() {
                h.process_completions();
            }
        } else if id == self.backend_event_id() {
            if let Some(Some(fd)) = self.0.backend_fd.get() {
                match run.handler.as_mut() {
                    Some(h) => h.process_backend_event(*fd),
                    None => {
                        // No queue running here: reap for the others.
                        iovirt_backend::clear_completion_fd(*fd);
                        self.0.disk.poll_completions();
                    }
                }
            }
        } else if id == self.timer_event_id() {
            // The timerfd is non-blocking: GET_VRING_BASE (on another thread)
            // may have disarmed it after epoll reported it, and an old
            // expiry may be reported after it was re-armed for later.
            if let Some(t) = run.timer.as_mut() {
                let _ = t.wait();
            }
            run.armed = None;
            if let Some(h) = run.handler.as_mut() {
                if h.coalesce_deadline().is_some_and(|d| Instant::now() >= d) {
                    h.flush_interrupts();
                }
            }
        } else if device_event == 0 {
            if run.handler.is_none() {
                run.handler = self.start_queue(q, vring);
            }
            let run = &mut *run;
            match run.handler.as_mut() {
                Some(Running::Plain(h)) => Self::poll(h, &mut run.tuner),
                Some(Running::Dma(h)) => Self::poll(h, &mut run.tuner),
                None => {}
            }
        }
        run.arm(q.index);
        // Errors are logged by the queue handler; returning one would stop this worker.
        Ok(())
    }
}

/// The IOVA view of the frontend's current memory through `iotlb` (misses go to the frontend).
fn dma_view(mem: &AtomicMem, iotlb: &Arc<VhostIotlb>) -> DmaMem {
    let snapshot: GuestMem = mem.memory().deref().clone();
    DmaView::new(snapshot, RequesterId(0), iotlb.clone()).with_hook(iotlb.clone())
}
