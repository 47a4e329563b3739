//! The vhost-user side: a [`VhostUserBackend`] that pops virtio-blk requests from
//! the rings the frontend shares, submits them to the block back-end and puts
//! completions on the used ring.
//!
//! Threads: one vring worker per queue (rust-vmm's event loop). A kick makes
//! the worker pop every available chain, parse it and submit it; the back-end
//! completes on any thread (inline, a thread pool, io_uring's reaper) by writing
//! the status byte and pushing `(head, len)` onto the queue's completion list.
//! Completions from other threads wake the worker through the queue's
//! completion eventfd; the worker moves the list to the used ring in a batch and
//! signals the call eventfd once, as EVENT_IDX allows.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use iovirt_backend::{BlockBackend, Completion};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::{self, Action, BlkConfig, BlkRequest};

/// Guest memory as the vhost-user frontend shares it.
pub type GuestMem = GuestMemoryMmap<()>;
/// The atomically replaceable guest memory (SET_MEM_TABLE swaps it).
pub type AtomicMem = GuestMemoryAtomic<GuestMem>;

/// Bit 30 of the feature word: the frontend may negotiate protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// How long GET_VRING_BASE waits for in-flight requests before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

thread_local! {
    /// The queue whose worker is running on this thread (address of its `QueueCtx`).
    static CURRENT_QUEUE: Cell<usize> = const { Cell::new(0) };
}

/// Per-queue state shared with completions.
struct QueueCtx {
    /// Completed `(head, used_len)` pairs not yet on the used ring.
    done: Mutex<Vec<(u16, u32)>>,
    /// Written when a completion on another thread made `done` non-empty.
    done_evt: EventFd,
    /// Requests submitted and not completed.
    inflight: AtomicUsize,
    idle_lock: Mutex<()>,
    idle: Condvar,
    /// The vring, remembered for GET_VRING_BASE (which must drain completions).
    vring: OnceLock<VringRwLock<AtomicMem>>,
    /// Malformed requests seen (for rate-limited logging).
    bad: AtomicU64,
}

impl QueueCtx {
    fn new() -> io::Result<Self> {
        Ok(QueueCtx {
            done: Mutex::new(Vec::with_capacity(256)),
            done_evt: EventFd::new(EFD_NONBLOCK)?,
            inflight: AtomicUsize::new(0),
            idle_lock: Mutex::new(()),
            idle: Condvar::new(),
            vring: OnceLock::new(),
            bad: AtomicU64::new(0),
        })
    }

    fn id(&self) -> usize {
        self as *const _ as usize
    }

    /// Record a completion. Called on any thread.
    fn push(&self, head: u16, len: u32) {
        let was_empty = {
            let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
            d.push((head, len));
            d.len() == 1
        };
        // The worker drains after submitting; only wake it from other threads.
        if was_empty && CURRENT_QUEUE.with(|c| c.get()) != self.id() {
            let _ = self.done_evt.write(1);
        }
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
            self.idle.notify_all();
        }
    }

    /// Move completions to the used ring and signal the frontend if needed.
    fn drain(&self, vring: &VringRwLock<AtomicMem>) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if d.is_empty() {
            return;
        }
        let mut v = vring.get_mut();
        for &(head, len) in d.iter() {
            if let Err(e) = v.add_used(head, len) {
                self.log_bad(format_args!(
                    "cannot add descriptor {head} to the used ring: {e}"
                ));
            }
        }
        d.clear();
        drop(d);
        match v.needs_notification() {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                if let Err(e) = v.signal_used_queue() {
                    log::warn!("cannot signal the call eventfd: {e}");
                }
            }
        }
    }

    fn log_bad(&self, what: std::fmt::Arguments<'_>) {
        let n = self.bad.fetch_add(1, Ordering::Relaxed);
        if n < 10 || n % 10_000 == 0 {
            log::warn!("malformed request ({} so far): {what}", n + 1);
        }
    }
}

struct Inner {
    disk: Arc<dyn BlockBackend>,
    cfg: BlkConfig,
    queue_size: u16,
    mem: AtomicMem,
    queues: Vec<Arc<QueueCtx>>,
    event_idx: std::sync::atomic::AtomicBool,
}

/// A virtio-blk device for one vhost-user connection.
///
/// Cheap to clone (the event loop holds one clone per worker thread). A new one
/// is made for every connection, so a reconnecting frontend starts from reset.
#[derive(Clone)]
pub struct BlkDevice(Arc<Inner>);

impl BlkDevice {
    /// A device over `disk` with `num_queues` queues of at most `queue_size` entries,
    /// whose guest memory is `mem` (the same object given to the daemon).
    pub fn new(
        disk: Arc<dyn BlockBackend>,
        cfg: BlkConfig,
        num_queues: u16,
        queue_size: u16,
        mem: AtomicMem,
    ) -> io::Result<Self> {
        let queues = (0..num_queues.max(1))
            .map(|_| QueueCtx::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkDevice(Arc::new(Inner {
            disk,
            cfg,
            queue_size,
            mem,
            queues,
            event_idx: false.into(),
        })))
    }

    /// The completion eventfd of each queue; the server registers queue `i`'s
    /// with worker `i` under event id [`BlkDevice::completion_event_id`].
    pub fn completion_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.0
            .queues
            .iter()
            .map(|q| q.done_evt.as_raw_fd())
            .collect()
    }

    /// The event id of completion wake-ups (the first one the event loop leaves to backends).
    pub fn completion_event_id(&self) -> u64 {
        self.0.queues.len() as u64 + 1
    }

    /// Pop and submit every available request of queue `q`.
    fn process_queue(&self, q: &Arc<QueueCtx>, vring: &VringRwLock<AtomicMem>) {
        let mem = self.0.mem.memory();
        let mem_arc = mem.clone().into_inner();
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        let mut chains = Vec::new();
        loop {
            {
                let mut v = vring.get_mut();
                let queue = v.get_queue_mut();
                if event_idx {
                    let _ = queue.disable_notification(&*mem);
                }
                while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
                    chains.push(chain);
                }
            }
            for chain in chains.drain(..) {
                let req = blk::parse(chain, &mem_arc, &self.0.cfg);
                self.submit(q, req, &mem_arc);
            }
            if !event_idx {
                break;
            }
            match vring.get_mut().get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    q.log_bad(format_args!("cannot re-enable notifications: {e}"));
                    break;
                }
            }
        }
    }

    fn submit(&self, q: &Arc<QueueCtx>, req: BlkRequest, mem: &Arc<GuestMem>) {
        let BlkRequest {
            head,
            status_addr,
            ok_len,
            action,
        } = req;
        q.inflight.fetch_add(1, Ordering::AcqRel);
        match action {
            Action::Submit(r) => {
                let q2 = q.clone();
                let mem = mem.clone();
                self.0.disk.submit(
                    r,
                    Completion::new(move |res| {
                        if let Err(e) = &res {
                            log::debug!("request failed: {e}");
                        }
                        let len =
                            BlkRequest::finish(&*mem, status_addr, blk::status_of(&res), ok_len);
                        q2.push(head, len);
                    }),
                );
            }
            Action::Done(status) => {
                let len = BlkRequest::finish(&**mem, status_addr, status, ok_len);
                q.push(head, len);
            }
            Action::Fail(status, why) => {
                if status == blk::VIRTIO_BLK_S_IOERR {
                    q.log_bad(format_args!("descriptor {head}: {why}"));
                }
                let len = BlkRequest::finish(&**mem, status_addr, status, ok_len);
                q.push(head, len);
            }
        }
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = VringRwLock<AtomicMem>;

    fn num_queues(&self) -> usize {
        self.0.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.queue_size)
    }

    fn features(&self) -> u64 {
        self.0.cfg.features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.0.cfg.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in our configuration is writable (no CONFIG_WCE): ignore, as a device does.
        Ok(())
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The handler replaced the contents of the atomic we share with it.
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
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut g = q.idle_lock.lock().unwrap_or_else(|e| e.into_inner());
        while q.inflight.load(Ordering::Acquire) != 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::error!(
                    "queue {queue_index}: {} requests still in flight after {STOP_TIMEOUT:?}",
                    q.inflight.load(Ordering::Acquire)
                );
                break;
            }
            g = q
                .idle
                .wait_timeout(g, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(g);
        if let Some(v) = q.vring.get() {
            q.drain(v);
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
        if u64::from(device_event) == self.completion_event_id() {
            let _ = q.done_evt.read();
        } else if device_event == 0 {
            CURRENT_QUEUE.with(|c| c.set(q.id()));
            self.process_queue(q, vring);
            CURRENT_QUEUE.with(|c| c.set(0));
        }
        q.drain(vring);
        // Errors are logged per request; returning one would stop this queue's worker.
        Ok(())
    }
}
