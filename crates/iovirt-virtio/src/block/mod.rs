//! virtio-blk (device ID 2) over an [`iovirt_backend::BlockBackend`].
//!
//! Each enabled queue gets a worker thread that waits (epoll) on the queue's
//! notification event, on a completion event and on a stop event. The worker
//! pops descriptor chains, parses them ([`request::parse_request`]), submits
//! the requests to the back-end and keeps going; completions are queued by
//! the back-end's threads (which then write the completion event) or, for
//! inline back-ends, collected right after submission without a system call,
//! and the worker writes the status, puts the chain on the used ring and
//! interrupts the guest when the notification-suppression rules say so.
//! [`QueueHandler`] is that logic without the thread, for tests, fuzzing,
//! benchmarks and event loops of their own (vhost-user daemons).
//!
//! # Virtual interrupt coalescing (vIC)
//!
//! With [`BlockConfig::coalescing`] (or [`QueueHandler::set_coalescing`]) a
//! queue coalesces completion interrupts the way vIC does (Ahmad, Gulati and
//! Mashtizadeh, USENIX ATC 2011): the rate of interrupts follows the number
//! of commands in flight (CIF). Finished requests still go on the used ring at
//! once; only the interrupt is held back. After each batch of completions,
//! with `cif` the requests still in flight:
//!
//! * `cif <= low_inflight`: signal now (queue depth 1 never waits);
//! * otherwise signal once `k = min(max_coalesce, ceil(cif / inflight_per_step))`
//!   completions are held, i.e. a delivery ratio of `1/k`;
//! * held completions are signalled at the latest `max_delay` after the first
//!   of them (the worker thread arms a timerfd; own event loops arm a timer to
//!   [`QueueHandler::coalesce_deadline`] and call
//!   [`QueueHandler::flush_interrupts`]).
//!
//! Whether an interrupt is sent at all is still decided by the driver's
//! suppression (EVENT_IDX `used_event` or `VRING_AVAIL_F_NO_INTERRUPT`),
//! judged over every used element since the last decision, so nothing the
//! driver asked for is lost.

pub mod request;

use std::sync::atomic::AtomicU64;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iovirt_backend::{
    BlockBackend, BlockError, BlockResult, Completion, Direction, Features, IoBuffers, Request,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{read_config_bytes, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::{VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK};
use request::{
    parse_request_into, BlockRequest, RequestError, RequestKind, RequestLimits, SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// Feature bit 1: `size_max` limits each data descriptor.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Feature bit 2: `seg_max` limits data descriptors per request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit 5: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit 6: `blk_size` holds the logical block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit 9: flush is supported (the disk has a volatile cache).
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit 10: `topology` holds physical block and I/O size hints.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// Feature bit 12: `num_queues` request queues.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// Feature bit 13: discard is supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature bit 14: write-zeroes is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Length of the configuration space we expose (through `write_zeroes_may_unmap`).
pub const CONFIG_LEN: usize = 0x3c;
/// Avail ring flag: the driver does not want interrupts (without EVENT_IDX).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Options of a virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Request queues (MQ is offered when more than one).
    pub num_queues: u16,
    /// Largest size of each queue (a power of two).
    pub queue_size: u16,
    /// The serial GET_ID returns (at most 20 bytes are used).
    pub serial: Vec<u8>,
    /// Most data descriptors per request.
    pub seg_max: u32,
    /// Largest data descriptor in bytes.
    pub size_max: u32,
    /// Most sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Most sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Virtual interrupt coalescing of completions (vIC); `None` (the
    /// default) interrupts for every batch of completions.
    pub coalescing: Option<CoalesceParams>,
}

/// Parameters of virtual interrupt coalescing (see the module documentation).
///
/// The delivery ratio is 1 while at most `low_inflight` requests are still in
/// flight, else `1/k` with `k = min(max_coalesce, ceil(inflight / inflight_per_step))`.
/// With the defaults (4, 4, 8, 100 µs): queue depth 1 to 5 interrupts for every
/// completion, depth 8 about every 2nd, depth 16 every 4th, depth 32 and above every 8th.
///
/// ```
/// use iovirt_virtio::block::CoalesceParams;
///
/// let p = CoalesceParams::default();
/// assert_eq!(p.ratio(1), 1);
/// assert_eq!(p.ratio(7), 2);
/// assert_eq!(p.ratio(31), 8);
/// assert_eq!(p.ratio(200), 8);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalesceParams {
    /// At or below this many requests in flight every completion interrupts.
    pub low_inflight: usize,
    /// Requests in flight per step of the coalescing factor (`R`); 0 acts as 1.
    pub inflight_per_step: usize,
    /// Largest number of completions one interrupt may stand for; 0 acts as 1.
    pub max_coalesce: usize,
    /// Longest a completion's interrupt may be held back.
    pub max_delay: Duration,
}

impl Default for CoalesceParams {
    fn default() -> Self {
        CoalesceParams {
            low_inflight: 4,
            inflight_per_step: 4,
            max_coalesce: 8,
            max_delay: Duration::from_micros(100),
        }
    }
}

impl CoalesceParams {
    /// How many completions one interrupt stands for when `inflight` requests
    /// are still in flight (the inverse of vIC's delivery ratio; at least 1).
    pub fn ratio(&self, inflight: usize) -> usize {
        if inflight <= self.low_inflight {
            return 1;
        }
        inflight
            .div_ceil(self.inflight_per_step.max(1))
            .clamp(1, self.max_coalesce.max(1))
    }
}

/// Counters of one virtio-blk device, shared by its queues.
#[derive(Debug, Default)]
struct BlockCounters {
    /// Interrupts (used-buffer notifications) sent to the driver.
    interrupts: AtomicU64,
    /// Chains put on the used ring.
    completions: AtomicU64,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            num_queues: 1,
            queue_size: 256,
            serial: Vec::new(),
            seg_max: 254,
            size_max: 1 << 20,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 16,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 16,
            coalescing: None,
        }
    }
}

/// Why a virtio-blk device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    /// The configuration is not usable.
    #[error("invalid virtio-blk configuration: {0}")]
    Config(&'static str),
}

/// A finished request on its way back to the queue's owner.
#[derive(Debug)]
struct Done {
    head: u16,
    status: GuestAddress,
    /// Bytes written into device-writable data buffers on success.
    written: u32,
    result: BlockResult,
}

/// A number unique to the calling thread while it lives (the address of a
/// thread-local), cheaper than `std::thread::current().id()`.
fn thread_token() -> usize {
    thread_local!(static TOKEN: u8 = const { 0 });
    TOKEN.with(|t| t as *const u8 as usize)
}

/// Where back-end completions wait for the queue's owner.
struct DoneQueue {
    list: Mutex<Vec<Done>>,
    /// Written when a completion arrives on a thread other than the one
    /// submitting right now (the owner collects its own inline completions
    /// right after submitting, so those need no wake-up).
    evt: Arc<EventFd>,
    /// [`thread_token`] of the thread inside `process_queue`, or 0.
    submitter: AtomicUsize,
    /// The owner polls the list ([`QueueHandler::set_polling`]): no wake-ups.
    polling: AtomicBool,
}

impl DoneQueue {
    fn push(&self, done: Done) {
        self.list
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(done);
        if self.submitter.load(Ordering::Relaxed) == thread_token() {
            return;
        }
        // Pairs with the fence in `set_polling(false)`: either the owner sees
        // this entry after it stops polling, or we see it stopped and wake it.
        fence(Ordering::SeqCst);
        if !self.polling.load(Ordering::Relaxed) {
            let _ = self.evt.write(1);
        }
    }
}

/// Per-queue request processing, without a thread: pop chains, parse,
/// submit, collect completions, fill the used ring, signal.
///
/// Completions that back-ends finish on other threads are queued and the
/// completion event ([`QueueHandler::completion_event`]) is written; the
/// owner's event loop then calls [`QueueHandler::process_completions`].
/// Completions that finish inside `submit` (inline back-ends such as memory
/// and null) are collected without any system call.
pub struct QueueHandler<M: GuestMemory> {
    index: u16,
    queue: Queue,
    mem: GuestMemoryAtomic<M>,
    backend: Arc<dyn BlockBackend>,
    limits: RequestLimits,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    interrupt: Arc<dyn VirtioInterrupt>,
    done: Arc<DoneQueue>,
    /// Spare list swapped with `done.list` when collecting.
    collected: Vec<Done>,
    descs: Vec<Descriptor>,
    data: Vec<(GuestAddress, usize)>,
    inflight: usize,
    /// Chains put on the used ring since the last signalling decision.
    pending: usize,
    /// Interrupt coalescing, when on.
    coalesce: Option<CoalesceParams>,
    /// When held completions must be signalled at the latest.
    deadline: Option<Instant>,
    /// Interrupts this handler sent.
    interrupts: u64,
    /// Chains this handler put on the used ring.
    completions: u64,
    /// The device's counters.
    counters: Arc<BlockCounters>,
    /// Complete and signal after this many chains within one pass (0: only at the end).
    signal_batch: usize,
    /// Within a pass, signal only once this many used chains are unsignalled.
    signal_min: usize,
    /// Chains started since completions were last collected.
    since_collect: usize,
}

impl<M: GuestMemory + Send + Sync + 'static> QueueHandler<M> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        index: u16,
        queue: Queue,
        mem: GuestMemoryAtomic<M>,
        backend: Arc<dyn BlockBackend>,
        limits: RequestLimits,
        serial: [u8; VIRTIO_BLK_ID_BYTES],
        interrupt: Arc<dyn VirtioInterrupt>,
        evt: Option<Arc<EventFd>>,
        coalesce: Option<CoalesceParams>,
        counters: Arc<BlockCounters>,
    ) -> std::io::Result<Self> {
        let evt = match evt {
            Some(e) => e,
            None => Arc::new(EventFd::new(EFD_NONBLOCK)?),
        };
        Ok(QueueHandler {
            index,
            queue,
            mem,
            backend,
            limits,
            serial,
            interrupt,
            done: Arc::new(DoneQueue {
                list: Mutex::new(Vec::new()),
                evt,
                submitter: AtomicUsize::new(0),
                polling: AtomicBool::new(false),
            }),
            collected: Vec::new(),
            descs: Vec::new(),
            data: Vec::new(),
            inflight: 0,
            pending: 0,
            coalesce,
            deadline: None,
            interrupts: 0,
            completions: 0,
            counters,
            signal_batch: 0,
            signal_min: 1,
            since_collect: 0,
        })
    }

    /// Requests submitted to the back-end and not yet completed.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// The queue (for tests: next_avail, next_used).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Stop using the queue and hand it back (its `next_avail` and `next_used`
    /// say where the device stopped). Requests still in flight complete into
    /// nothing: call [`QueueHandler::process_completions`] until
    /// [`QueueHandler::inflight`] is 0 first, and
    /// [`QueueHandler::flush_interrupts`] if coalescing holds completions.
    pub fn into_queue(self) -> Queue {
        self.queue
    }

    /// The event written when a back-end completes a request on another
    /// thread: add it to the event loop and call
    /// [`QueueHandler::process_completions`] when it fires. Reading (resetting)
    /// it is the event loop's job. Inline completions never write it.
    pub fn completion_event(&self) -> &Arc<EventFd> {
        &self.done.evt
    }

    /// Within one pass over the avail ring, put finished requests on the used
    /// ring and signal (as the suppression rules allow) after every `n`
    /// chains, so the driver can reap and refill while the device works on the
    /// rest. 0 (the default) completes only at the end of the pass.
    pub fn set_signal_batch(&mut self, n: usize) {
        self.signal_batch = n;
    }

    /// With a signal batch set: inside a pass, put every finished chain on
    /// the used ring at once but send the interrupt only when `k` chains
    /// wait for one (the end of the pass always signals what is left). The
    /// driver sees completions as early as before, and a sleeping driver is
    /// woken once per `k` instead of per chain. 1 (the default) signals as
    /// soon as the suppression rules allow.
    pub fn set_signal_min(&mut self, k: usize) {
        self.signal_min = k.max(1);
    }

    /// Turn virtual interrupt coalescing on (`Some`) or off (`None`); see the
    /// module documentation. Turning it off signals held completions (as the
    /// suppression rules allow). A handler starts with
    /// [`BlockConfig::coalescing`].
    pub fn set_coalescing(&mut self, params: Option<CoalesceParams>) {
        self.coalesce = params;
        if params.is_none() {
            self.flush_interrupts();
        }
    }

    /// The coalescing parameters in use, if coalescing is on.
    pub fn coalescing(&self) -> Option<CoalesceParams> {
        self.coalesce
    }

    /// When completions held back by coalescing must be signalled at the
    /// latest, if any are held. An event loop arms a timer for this instant
    /// after every call into the handler and calls
    /// [`QueueHandler::flush_interrupts`] when it fires.
    pub fn coalesce_deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Signal completions held back by coalescing now (as the suppression
    /// rules allow), whatever the number in flight.
    pub fn flush_interrupts(&mut self) {
        let mem = self.mem.memory();
        self.signal_now(&mem);
    }

    /// Interrupts (used-buffer notifications) this handler has sent.
    pub fn interrupts_signalled(&self) -> u64 {
        self.interrupts
    }

    /// Chains this handler has put on the used ring.
    pub fn completions(&self) -> u64 {
        self.completions
    }

    /// Polling mode for completions: while on, back-ends completing on other
    /// threads do not write the completion event, and the caller must call
    /// [`QueueHandler::process_completions`] (or [`QueueHandler::poll_queue`])
    /// regularly. Turning it off collects what arrived meanwhile.
    pub fn set_polling(&mut self, on: bool) {
        self.done.polling.store(on, Ordering::Relaxed);
        if !on {
            fence(Ordering::SeqCst);
            self.process_completions();
        }
    }

    /// Whether the avail ring holds chains the device has not popped yet.
    /// An avail index more than a queue size ahead (a broken driver) holds
    /// none that can be popped: false, so a polling owner goes to sleep
    /// instead of spinning on it.
    pub fn has_available(&self) -> bool {
        let mem = self.mem.memory();
        self.available_chains(&*mem).is_some_and(|n| n > 0)
    }

    /// How many chains the avail index claims beyond `next_avail`; `None`
    /// when it cannot be read or claims more than the queue holds.
    fn available_chains(&self, mem: &M) -> Option<u16> {
        let idx = self.queue.avail_idx(mem, Ordering::Acquire).ok()?;
        let n = idx.0.wrapping_sub(self.queue.next_avail());
        (n <= self.queue.size()).then_some(n)
    }

    /// Ask the driver not to notify the queue (polling mode). With EVENT_IDX
    /// this is simply not moving `avail_event` forward.
    pub fn disable_notification(&mut self) {
        let mem = self.mem.memory();
        if let Err(e) = self.queue.disable_notification(&*mem) {
            log::warn!("virtio-blk: queue {}: {e}", self.index);
        }
    }

    /// Ask the driver to notify the queue again; returns whether chains
    /// arrived meanwhile (then poll once more before sleeping). A broken
    /// avail index counts as none (see [`QueueHandler::has_available`]).
    pub fn enable_notification(&mut self) -> bool {
        let mem = self.mem.memory();
        match self.queue.enable_notification(&*mem) {
            Ok(false) => false,
            Ok(true) => {
                let valid = self.available_chains(&*mem).is_some();
                if !valid {
                    log::warn!("virtio-blk: queue {}: invalid avail index", self.index);
                }
                valid
            }
            Err(e) => {
                log::warn!("virtio-blk: queue {}: {e}", self.index);
                false
            }
        }
    }

    /// Polling mode: start every available chain without touching the
    /// notification settings, then collect completions and signal. Returns
    /// the number of chains started.
    pub fn poll_queue(&mut self) -> usize {
        let mem = self.mem.memory();
        let n = self.pop_all(&mem);
        self.collect(&mem);
        self.signal_if_needed(&mem);
        n
    }

    /// The driver notified the queue: process every available chain, then
    /// every completion already back, and signal the guest if needed.
    pub fn process_queue(&mut self) {
        let mem = self.mem.memory();
        loop {
            if let Err(e) = self.queue.disable_notification(&*mem) {
                log::warn!("virtio-blk: queue {}: {e}", self.index);
                return;
            }
            let popped = self.pop_all(&mem) > 0;
            match self.queue.enable_notification(&*mem) {
                // More work arrived while notifications were off: go again.
                Ok(true) if popped => continue,
                // The avail index claims chains the queue cannot yield (an index
                // more than the queue size ahead): a broken driver; stop here
                // rather than spin.
                Ok(true) => {
                    log::warn!("virtio-blk: queue {}: invalid avail index", self.index);
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::warn!("virtio-blk: queue {}: {e}", self.index);
                    break;
                }
            }
        }
        self.collect(&mem);
        self.signal_if_needed(&mem);
    }

    /// Pop, parse and submit every available chain; returns how many.
    fn pop_all(&mut self, mem: &vm_memory::atomic::GuestMemoryLoadGuard<M>) -> usize {
        self.done.submitter.store(thread_token(), Ordering::Relaxed);
        // One submission system call for the whole pass, where the back-end batches.
        self.backend.plug();
        let mut n = 0;
        loop {
            // Up to POP_BATCH chain heads for one read of the avail index (the
            // cache line the driver keeps writing), then process them.
            let mut heads: [Option<DescriptorChain<&M>>; POP_BATCH] = Default::default();
            let mut got = 0;
            match self.queue.iter(&**mem) {
                Ok(mut avail) => {
                    for slot in heads.iter_mut() {
                        let Some(chain) = avail.next() else { break };
                        *slot = Some(chain);
                        got += 1;
                    }
                }
                Err(e) => log::debug!("virtio-blk: queue {}: {e}", self.index),
            }
            if got == 0 {
                break;
            }
            for chain in heads.iter_mut().take(got).filter_map(Option::take) {
                n += 1;
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain);
                self.start(mem, head);
                self.since_collect += 1;
                if self.signal_batch != 0 && self.since_collect >= self.signal_batch {
                    self.collect(mem);
                    if self.pending >= self.signal_min {
                        self.signal_if_needed(mem);
                    }
                }
            }
        }
        self.backend.unplug();
        self.done.submitter.store(0, Ordering::Relaxed);
        n
    }

    /// Collect completions from the back-end (first running those it lets
    /// the caller poll, see [`BlockBackend::completion_fd`]), put them on the
    /// used ring and signal the guest if the suppression rules allow.
    pub fn process_completions(&mut self) {
        if self.inflight > 0 {
            self.poll_backend();
        }
        let mem = self.mem.memory();
        self.collect(&mem);
        self.signal_if_needed(&mem);
    }

    /// The back-end's completion eventfd (`fd`, from
    /// [`BlockBackend::completion_fd`]) fired: clear it, run every ready
    /// completion (also when none is this queue's: a back-end shared by
    /// several queues may have woken this one for another, whose owner hears
    /// of it through its own completion event), then complete this queue's.
    pub fn process_backend_event(&mut self, fd: std::os::fd::RawFd) {
        iovirt_backend::clear_completion_fd(fd);
        self.poll_backend();
        let mem = self.mem.memory();
        self.collect(&mem);
        self.signal_if_needed(&mem);
    }

    /// Run the back-end's ready completions on this thread; ours need no wake-up.
    fn poll_backend(&mut self) {
        self.done.submitter.store(thread_token(), Ordering::Relaxed);
        self.backend.poll_completions();
        self.done.submitter.store(0, Ordering::Relaxed);
    }

    /// Move finished requests to the used ring.
    fn collect(&mut self, mem: &M) {
        self.since_collect = 0;
        {
            let mut list = self.done.list.lock().unwrap_or_else(|e| e.into_inner());
            if list.is_empty() {
                return;
            }
            std::mem::swap(&mut *list, &mut self.collected);
        }
        let mut collected = std::mem::take(&mut self.collected);
        for done in collected.drain(..) {
            self.inflight = self.inflight.saturating_sub(1);
            let (status, written) = match &done.result {
                Ok(()) => (VIRTIO_BLK_S_OK, done.written),
                Err(e) => {
                    log::debug!("virtio-blk: queue {}: request failed: {e}", self.index);
                    let s = match e.status() {
                        iovirt_backend::DeviceStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
                        iovirt_backend::DeviceStatus::IoError => VIRTIO_BLK_S_IOERR,
                    };
                    (s, 0)
                }
            };
            self.finish(mem, done.head, Some(done.status), status, written);
        }
        self.collected = collected;
    }

    /// Wait up to `timeout` for the requests in flight (reset), collecting
    /// them without touching the rings. Returns how many are still in flight.
    fn drain_without_rings(&mut self, timeout: Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            self.backend.poll_completions();
            {
                let mut list = self.done.list.lock().unwrap_or_else(|e| e.into_inner());
                self.inflight = self.inflight.saturating_sub(list.len());
                list.clear();
            }
            if self.inflight == 0 || std::time::Instant::now() >= deadline {
                return self.inflight;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn finish(&mut self, mem: &M, head: u16, status: Option<GuestAddress>, code: u8, written: u32) {
        let used_len = match status {
            Some(addr) => match mem.write_obj(code, addr) {
                Ok(()) => written.saturating_add(1),
                Err(_) => 0,
            },
            None => 0,
        };
        if let Err(e) = self.queue.add_used(mem, head, used_len) {
            log::warn!("virtio-blk: queue {}: add_used failed: {e}", self.index);
        }
        self.pending += 1;
        self.completions += 1;
        self.counters.completions.fetch_add(1, Ordering::Relaxed);
    }

    /// Signal now, or hold the completions back when coalescing says so.
    fn signal_if_needed(&mut self, mem: &M) {
        if self.pending == 0 {
            return;
        }
        if let Some(p) = &self.coalesce {
            if self.pending < p.ratio(self.inflight) {
                let now = Instant::now();
                match self.deadline {
                    None => {
                        self.deadline = Some(now + p.max_delay);
                        return;
                    }
                    Some(d) if now < d => return,
                    Some(_) => {}
                }
            }
        }
        self.signal_now(mem);
    }

    /// Decide on (and send) the interrupt for every chain used since the last decision.
    fn signal_now(&mut self, mem: &M) {
        self.deadline = None;
        if self.pending == 0 {
            return;
        }
        self.pending = 0;
        let needed = if self.queue.event_idx_enabled() {
            self.queue.needs_notification(mem).unwrap_or(true)
        } else {
            // Without EVENT_IDX the driver may set VRING_AVAIL_F_NO_INTERRUPT.
            fence(Ordering::SeqCst);
            let flags: u16 = mem
                .read_obj(GuestAddress(self.queue.avail_ring()))
                .map(u16::from_le)
                .unwrap_or(0);
            flags & VRING_AVAIL_F_NO_INTERRUPT == 0
        };
        if needed {
            self.interrupts += 1;
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.interrupt.signal_used_queue(self.index) {
                log::warn!("virtio-blk: queue {}: interrupt failed: {e}", self.index);
            }
        }
    }

    fn start(&mut self, mem: &vm_memory::atomic::GuestMemoryLoadGuard<M>, head: u16) {
        let parsed = parse_request_into(&self.descs, &**mem, &self.limits, &mut self.data);
        let req = match parsed {
            Ok(r) => r,
            Err(f) => {
                log::debug!(
                    "virtio-blk: queue {}: malformed request: {}",
                    self.index,
                    f.error
                );
                self.finish(mem, head, f.status, f.error.status(), 0);
                return;
            }
        };
        self.submit(mem, head, req);
    }

    fn completion(&mut self, head: u16, status: GuestAddress, written: u32) -> Completion {
        self.inflight += 1;
        let done = self.done.clone();
        Completion::new(move |result| {
            done.push(Done {
                head,
                status,
                written,
                result,
            })
        })
    }

    fn submit(
        &mut self,
        mem: &vm_memory::atomic::GuestMemoryLoadGuard<M>,
        head: u16,
        req: BlockRequest,
    ) {
        let offset = req.sector.saturating_mul(SECTOR_SIZE);
        match req.kind {
            RequestKind::Read | RequestKind::Write => {
                let read = req.kind == RequestKind::Read;
                let dir = if read {
                    Direction::DeviceWrites
                } else {
                    Direction::DeviceReads
                };
                let written = if read { req.data_len as u32 } else { 0 };
                let done = self.completion(head, req.status, written);
                match IoBuffers::from_guest(mem.clone().into_inner(), &self.data, dir) {
                    Ok(buf) => {
                        let r = if read {
                            Request::Read { offset, buf }
                        } else {
                            Request::Write {
                                offset,
                                buf,
                                fua: false,
                            }
                        };
                        self.backend.submit(r, done);
                    }
                    Err(e) => done.complete(Err(e)),
                }
            }
            RequestKind::Flush => {
                let done = self.completion(head, req.status, 0);
                self.backend.submit(Request::Flush, done);
            }
            RequestKind::GetId => {
                let mut written = 0usize;
                for &(addr, len) in &self.data {
                    let n = len.min(VIRTIO_BLK_ID_BYTES - written);
                    let src = self.serial.get(written..written + n).unwrap_or(&[]);
                    if mem.write_slice(src, addr).is_err() {
                        break;
                    }
                    written += n;
                    if written == VIRTIO_BLK_ID_BYTES {
                        break;
                    }
                }
                let code = if written == VIRTIO_BLK_ID_BYTES.min(req.data_len as usize) {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                };
                self.finish(mem, head, Some(req.status), code, written as u32);
            }
            RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) if segs.is_empty() => {
                self.finish(mem, head, Some(req.status), VIRTIO_BLK_S_IOERR, 0);
            }
            RequestKind::Discard(ref segs) | RequestKind::WriteZeroes(ref segs) => {
                let discard = matches!(req.kind, RequestKind::Discard(_));
                let done = self.completion(head, req.status, 0);
                let join = Arc::new(Mutex::new((segs.len(), None::<BlockError>, Some(done))));
                for s in segs {
                    let offset = s.sector.saturating_mul(SECTOR_SIZE);
                    let len = u64::from(s.num_sectors) * SECTOR_SIZE;
                    let r = if discard {
                        Request::Discard { offset, len }
                    } else {
                        Request::WriteZeroes {
                            offset,
                            len,
                            may_unmap: s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                        }
                    };
                    let join = join.clone();
                    self.backend.submit(
                        r,
                        Completion::new(move |res| {
                            let mut j = join.lock().unwrap_or_else(|e| e.into_inner());
                            if let Err(e) = res {
                                j.1.get_or_insert(e);
                            }
                            j.0 = j.0.saturating_sub(1);
                            if j.0 == 0 {
                                let err = j.1.take();
                                if let Some(done) = j.2.take() {
                                    drop(j);
                                    done.complete(err.map_or(Ok(()), Err));
                                }
                            }
                        }),
                    );
                }
            }
        }
    }
}

/// The device's workers while it is active.
struct Running {
    stop: Arc<EventFd>,
    workers: Vec<JoinHandle<()>>,
}

/// A virtio-blk device (device ID 2).
///
/// ```
/// use std::sync::Arc;
/// use iovirt_backend::{Inline, MemoryBackend};
/// use iovirt_virtio::block::{BlockConfig, VirtioBlock};
/// use iovirt_virtio::VirtioDevice;
/// use vm_memory::GuestMemoryMmap;
///
/// let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
/// let blk = VirtioBlock::new(disk, BlockConfig { serial: b"disk0".to_vec(), ..Default::default() }).unwrap();
/// let dev: &dyn VirtioDevice<GuestMemoryMmap> = &blk;
/// let mut cap = [0u8; 8];
/// dev.read_config(0, &mut cap);
/// assert_eq!(u64::from_le_bytes(cap), 2048); // sectors
/// ```
pub struct VirtioBlock {
    backend: Arc<dyn BlockBackend>,
    cfg: BlockConfig,
    features: u64,
    config_space: [u8; CONFIG_LEN],
    queue_sizes: Vec<u16>,
    limits: RequestLimits,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    running: Option<Running>,
    counters: Arc<BlockCounters>,
}

impl VirtioBlock {
    /// A virtio-blk device over `backend`.
    pub fn new(backend: Arc<dyn BlockBackend>, cfg: BlockConfig) -> Result<Self, BlockDeviceError> {
        if cfg.num_queues == 0 || cfg.num_queues > 256 {
            return Err(BlockDeviceError::Config("num_queues must be 1..=256"));
        }
        if !cfg.queue_size.is_power_of_two() {
            return Err(BlockDeviceError::Config(
                "queue_size must be a power of two",
            ));
        }
        if cfg.seg_max == 0 || cfg.size_max < 512 {
            return Err(BlockDeviceError::Config(
                "seg_max must be > 0 and size_max >= 512",
            ));
        }
        let info = backend.info();
        let ro = info.features.contains(Features::READ_ONLY);
        let discard = info.features.contains(Features::DISCARD) && !ro;
        let write_zeroes = info.features.contains(Features::WRITE_ZEROES) && !ro;
        let mut features = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_RING_EVENT_IDX
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY;
        if info.features.contains(Features::VOLATILE_CACHE) {
            features |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if ro {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if discard {
            features |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if write_zeroes {
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if cfg.num_queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        let capacity_sectors = info.capacity / SECTOR_SIZE;
        let lbs = info.logical_block_size.max(512);
        let pbs = info.physical_block_size.max(lbs);
        let phys_exp = (pbs / lbs).max(1).trailing_zeros() as u8;
        let mut c = [0u8; CONFIG_LEN];
        c[0x00..0x08].copy_from_slice(&capacity_sectors.to_le_bytes());
        c[0x08..0x0c].copy_from_slice(&cfg.size_max.to_le_bytes());
        c[0x0c..0x10].copy_from_slice(&cfg.seg_max.to_le_bytes());
        c[0x14..0x18].copy_from_slice(&lbs.to_le_bytes());
        c[0x18] = phys_exp;
        c[0x1a..0x1c].copy_from_slice(&((lbs / 512) as u16).to_le_bytes());
        c[0x1c..0x20].copy_from_slice(&(pbs / 512).to_le_bytes());
        c[0x20] = u8::from(info.features.contains(Features::VOLATILE_CACHE));
        c[0x22..0x24].copy_from_slice(&cfg.num_queues.to_le_bytes());
        c[0x24..0x28].copy_from_slice(&cfg.max_discard_sectors.to_le_bytes());
        c[0x28..0x2c].copy_from_slice(&cfg.max_discard_seg.to_le_bytes());
        c[0x2c..0x30].copy_from_slice(&(lbs / 512).to_le_bytes());
        c[0x30..0x34].copy_from_slice(&cfg.max_write_zeroes_sectors.to_le_bytes());
        c[0x34..0x38].copy_from_slice(&cfg.max_write_zeroes_seg.to_le_bytes());
        c[0x38] = 1;
        let limits = RequestLimits {
            capacity_sectors,
            seg_max: cfg.seg_max,
            size_max: cfg.size_max,
            discard,
            max_discard_sectors: cfg.max_discard_sectors,
            max_discard_seg: cfg.max_discard_seg,
            write_zeroes,
            max_write_zeroes_sectors: cfg.max_write_zeroes_sectors,
            max_write_zeroes_seg: cfg.max_write_zeroes_seg,
        };
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = cfg.serial.len().min(VIRTIO_BLK_ID_BYTES);
        serial[..n].copy_from_slice(&cfg.serial[..n]);
        Ok(VirtioBlock {
            backend,
            queue_sizes: vec![cfg.queue_size; usize::from(cfg.num_queues)],
            cfg,
            features,
            config_space: c,
            limits,
            serial,
            running: None,
            counters: Arc::new(BlockCounters::default()),
        })
    }

    /// The options the device was created with.
    pub fn block_config(&self) -> &BlockConfig {
        &self.cfg
    }

    /// A [`QueueHandler`] for `queue`, for driving the device without threads
    /// (tests, fuzzing, benchmarks, or a VMM with its own event loop).
    pub fn queue_handler<M: GuestMemory + Send + Sync + 'static>(
        &self,
        index: u16,
        queue: Queue,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<QueueHandler<M>> {
        QueueHandler::new(
            index,
            queue,
            mem,
            self.backend.clone(),
            self.limits.clone(),
            self.serial,
            interrupt,
            None,
            self.cfg.coalescing,
            self.counters.clone(),
        )
    }

    /// [`VirtioBlock::queue_handler`] whose completion event is `evt` (one the
    /// caller's event loop already watches, e.g. across queue restarts).
    pub fn queue_handler_with_event<M: GuestMemory + Send + Sync + 'static>(
        &self,
        index: u16,
        queue: Queue,
        mem: GuestMemoryAtomic<M>,
        interrupt: Arc<dyn VirtioInterrupt>,
        evt: Arc<EventFd>,
    ) -> std::io::Result<QueueHandler<M>> {
        QueueHandler::new(
            index,
            queue,
            mem,
            self.backend.clone(),
            self.limits.clone(),
            self.serial,
            interrupt,
            Some(evt),
            self.cfg.coalescing,
            self.counters.clone(),
        )
    }

    /// Interrupts (used-buffer notifications) all queues of this device have
    /// sent, through its worker threads or its [`QueueHandler`]s.
    pub fn interrupts_signalled(&self) -> u64 {
        self.counters.interrupts.load(Ordering::Relaxed)
    }

    /// Chains all queues of this device have put on the used ring; with
    /// [`VirtioBlock::interrupts_signalled`] this gives interrupts per request.
    pub fn completions(&self) -> u64 {
        self.counters.completions.load(Ordering::Relaxed)
    }

    /// Whether worker threads are running.
    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_NOTIFY: u64 = 1;
const TOKEN_DONE: u64 = 2;
const TOKEN_TIMER: u64 = 3;
const TOKEN_BACKEND: u64 = 4;
/// Chain heads taken from the avail ring per read of its index.
const POP_BATCH: usize = 16;
/// How long a reset waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn worker_loop<M: GuestMemory + Send + Sync + 'static>(
    mut h: QueueHandler<M>,
    notify: Arc<EventFd>,
    stop: Arc<EventFd>,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let epoll = Epoll::new()?;
    for (fd, token) in [
        (stop.as_raw_fd(), TOKEN_STOP),
        (notify.as_raw_fd(), TOKEN_NOTIFY),
        (h.done.evt.as_raw_fd(), TOKEN_DONE),
    ] {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    // Back-ends that let their owner reap (io_uring) complete on this thread.
    let backend_fd = h.backend.completion_fd();
    if let Some(fd) = backend_fd {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_BACKEND),
        )?;
    }
    // The coalescing deadline timer, only for queues that coalesce.
    let mut timer = match h.coalesce {
        Some(_) => {
            let t = TimerFd::new()?;
            epoll.ctl(
                ControlOperation::Add,
                t.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )?;
            Some(t)
        }
        None => None,
    };
    // The deadline the timer is armed for.
    let mut armed: Option<Instant> = None;
    let mut events = [EpollEvent::default(); 5];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in events.iter().take(n) {
            match ev.data() {
                TOKEN_STOP => {
                    // Reset: wait for in-flight requests so nothing writes guest
                    // memory after the reset, but never touch the rings again.
                    let left = h.drain_without_rings(DRAIN_TIMEOUT);
                    if left > 0 {
                        log::warn!(
                            "virtio-blk: queue {}: {left} requests still in flight at reset",
                            h.index
                        );
                    }
                    return Ok(());
                }
                TOKEN_NOTIFY => {
                    let _ = notify.read();
                    h.process_queue();
                }
                TOKEN_BACKEND => {
                    if let Some(fd) = backend_fd {
                        h.process_backend_event(fd);
                    }
                }
                TOKEN_TIMER => {
                    if let Some(t) = timer.as_mut() {
                        // A timer re-armed earlier in this batch is not readable
                        // any more (reading would block until it expires).
                        if !t.is_armed().unwrap_or(true) {
                            let _ = t.wait();
                            armed = None;
                            h.flush_interrupts();
                        }
                    }
                }
                _ => {
                    let _ = h.done.evt.read();
                    h.process_completions();
                }
            }
        }
        if let (Some(t), Some(d)) = (timer.as_mut(), h.coalesce_deadline()) {
            if armed != Some(d) {
                // A zero duration would disarm the timer: wait at least 1 ns.
                let wait = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1));
                t.reset(wait, None)?;
                armed = Some(d);
            }
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> VirtioDevice<M> for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // CONFIG_WCE is not offered: the whole space is read-only.
        log::debug!(
            "virtio-blk: config write of {} bytes at {offset:#x} ignored",
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
        if queues.is_empty() {
            return Err(ActivateError::BadQueues("no queue is enabled".into()));
        }
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut running = Running {
            stop: stop.clone(),
            workers: Vec::new(),
        };
        for q in queues {
            let h = self.queue_handler(q.index, q.queue, mem.clone(), interrupt.clone())?;
            let stop = stop.clone();
            let notify = q.notify;
            let spawned = std::thread::Builder::new()
                .name(format!("virtio-blk-q{}", q.index))
                .spawn(move || {
                    if let Err(e) = worker_loop(h, notify, stop) {
                        log::error!("virtio-blk: worker failed: {e}");
                    }
                });
            match spawned {
                Ok(j) => running.workers.push(j),
                Err(e) => {
                    stop_running(running);
                    return Err(e.into());
                }
            }
        }
        self.running = Some(running);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(r) = self.running.take() {
            stop_running(r);
        }
    }
}

fn stop_running(r: Running) {
    let _ = r.stop.write(1);
    for w in r.workers {
        let _ = w.join();
    }
}

impl Drop for VirtioBlock {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            stop_running(r);
        }
    }
}

/// Map a parse error to its status byte (re-exported for tests and tools).
pub fn error_status(e: &RequestError) -> u8 {
    e.status()
}

#[cfg(test)]
mod tests;
