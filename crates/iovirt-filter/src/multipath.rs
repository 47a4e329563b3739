//! Multipath: several paths to the same storage, with active/passive
//! failover or round-robin, paths failed by errors or a timeout, and
//! requests retried on another path.
//!
//! - **Choosing a path.** [`PathPolicy::Failover`] sends everything down the
//!   first active path (the others are passive standbys);
//!   [`PathPolicy::RoundRobin`] takes the active paths in turn.
//! - **Failing a path.** A path is failed (with a log line) when a request on
//!   it fails with a path error (an I/O error; not `Unsupported`,
//!   `OutOfRange`, `Misaligned` or `ReadOnly`, which every path would give),
//!   or when a request on it takes longer than [`MultipathOptions::timeout`].
//!   The request is then retried on an active path it has not tried yet; it
//!   fails only when no path is left. A failed path comes back through
//!   [`MultipathHandle::restore_path`].
//! - **No lost or reordered writes.** Writes, write-zeroes and discards to
//!   overlapping sectors never run at once: a write waits until every earlier
//!   write overlapping it is *finished*, which means not only acknowledged
//!   but also that every attempt of it has come back, including one still in
//!   flight on a path that timed out. A late attempt of an old write can so
//!   never land on top of a newer write to the same sectors, and waiting
//!   writes start in the order they were submitted. The price: a path that
//!   never answers holds back later writes to the sectors it still has in
//!   flight (not other sectors, and not reads).
//! - **Data.** A retried write resends the same copy of the data, taken once
//!   at submission; reads go through a scratch buffer when there is more
//!   than one path, so a failed read can be retried.
//! - **Flush** goes down one path (all paths reach the same storage and its
//!   cache), retried like any request.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::fault::{FaultFilter, InjectedError, Rule, Selector};
//! use iovirt_filter::multipath::{Multipath, MultipathOptions, PathState};
//!
//! let storage = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let p0 = FaultFilter::new(storage.clone());
//! p0.handle().add_rule(Rule::fail(Selector::any(), InjectedError::Io)); // the cable is cut
//! let mp = Multipath::new(vec![Arc::new(p0), storage.clone()], MultipathOptions::default())?;
//! submit_wait(&mp, Request::Write { offset: 0, buf: IoBuffers::from_vec(vec![3; 512]), fua: false })?;
//! assert_eq!(storage.0.contents()[0], 3);
//! assert_eq!(mp.handle().status()[0].state, PathState::Failed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iovirt_backend::{
    BlockBackend, BlockError, BlockInfo, BlockResult, Completion, Features, IoBuffers, Request,
};
use serde::Serialize;

use crate::aggregate::parts::Scratch;

/// How requests choose among the active paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum PathPolicy {
    /// Active/passive: the first active path takes everything.
    #[default]
    Failover,
    /// The active paths in turn.
    RoundRobin,
}

impl std::str::FromStr for PathPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "failover" => Ok(PathPolicy::Failover),
            "round-robin" => Ok(PathPolicy::RoundRobin),
            other => Err(format!(
                "unknown path policy {other:?} (expected failover or round-robin)"
            )),
        }
    }
}

/// Options of a [`Multipath`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MultipathOptions {
    /// How requests choose a path.
    pub policy: PathPolicy,
    /// A request not answered within this time fails its path and is retried
    /// elsewhere; `None` waits for ever.
    pub timeout: Option<Duration>,
}

/// Where a path stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PathState {
    /// In use.
    Active,
    /// Failed by an error, a timeout, or by hand.
    Failed,
}

/// One path's status, for the control interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PathStatus {
    /// Where it stands.
    pub state: PathState,
    /// Requests on it not yet answered (including timed-out ones).
    pub outstanding: u64,
    /// Requests it completed successfully.
    pub completed: u64,
    /// Path errors it returned.
    pub errors: u64,
    /// Requests on it that timed out.
    pub timeouts: u64,
    /// Requests retried elsewhere after failing on it.
    pub retried: u64,
}

/// Why a multipath disk could not be built or a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MultipathError {
    /// It needs at least one path.
    #[error("multipath needs at least one path")]
    NoPaths,
    /// The paths do not agree on the disk they lead to.
    #[error("path {path} leads to {capacity} bytes in {block_size}-byte blocks, path 0 to {expected_capacity} in {expected_block_size}")]
    Mismatch {
        /// The path.
        path: usize,
        /// Its capacity.
        capacity: u64,
        /// Its logical block size.
        block_size: u32,
        /// Path 0's capacity.
        expected_capacity: u64,
        /// Path 0's logical block size.
        expected_block_size: u32,
    },
    /// There is no such path.
    #[error("multipath has no path {0}")]
    NoSuchPath(usize),
}

type Job = Box<dyn FnOnce() + Send>;

struct TimerEntry {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for TimerEntry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for TimerEntry {
    // Earliest first out of the max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct TimerQueue {
    heap: BinaryHeap<TimerEntry>,
    seq: u64,
    running: bool,
}

/// Runs jobs at their deadlines on one lazily started thread, which exits
/// when the queue is empty.
#[derive(Default)]
struct Timer {
    q: Arc<(Mutex<TimerQueue>, Condvar)>,
}

impl Timer {
    fn schedule(&self, at: Instant, job: impl FnOnce() + Send + 'static) {
        let (m, cv) = &*self.q;
        let mut q = m.lock().unwrap_or_else(|e| e.into_inner());
        q.seq += 1;
        let seq = q.seq;
        q.heap.push(TimerEntry {
            at,
            seq,
            job: Box::new(job),
        });
        cv.notify_all();
        if q.running {
            return;
        }
        let shared = self.q.clone();
        let spawned = std::thread::Builder::new()
            .name("iovirt-multipath-timer".into())
            .spawn(move || run_timer(&shared));
        match spawned {
            Ok(_) => q.running = true,
            // No thread: the timeout is not enforced, the request still completes.
            Err(e) => log::warn!("multipath: cannot start the timeout thread: {e}"),
        }
    }
}

fn run_timer(shared: &(Mutex<TimerQueue>, Condvar)) {
    let (m, cv) = shared;
    let mut q = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        match q.heap.peek().map(|e| e.at) {
            None => {
                q.running = false;
                return;
            }
            Some(at) if at <= now => {
                if let Some(e) = q.heap.pop() {
                    drop(q);
                    (e.job)();
                    q = m.lock().unwrap_or_else(|e| e.into_inner());
                }
            }
            Some(at) => {
                q = cv
                    .wait_timeout(q, at - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }
}

struct Path {
    state: PathState,
    outstanding: u64,
    completed: u64,
    errors: u64,
    timeouts: u64,
    retried: u64,
}

/// A write-like request waiting for overlapping earlier ones.
struct Waiting {
    range: (u64, u64),
    req: Request,
    done: Completion,
}

struct State {
    paths: Vec<Path>,
    next: usize,
    next_id: u64,
    /// Write-like requests not finished: (id, start, end).
    writing: Vec<(u64, u64, u64)>,
    waiting: VecDeque<Waiting>,
}

struct Inner {
    paths: Vec<Arc<dyn BlockBackend>>,
    info: BlockInfo,
    opts: MultipathOptions,
    st: Mutex<State>,
    timer: Timer,
}

/// A multipath disk; see the [module docs](self).
pub struct Multipath {
    inner: Arc<Inner>,
}

/// The run-time control of a [`Multipath`]. Clones share it.
#[derive(Clone)]
pub struct MultipathHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Multipath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Multipath")
            .field("paths", &self.inner.paths.len())
            .field("options", &self.inner.opts)
            .finish()
    }
}

impl std::fmt::Debug for MultipathHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultipathHandle").finish_non_exhaustive()
    }
}

/// What a request does, kept so it can be sent again.
enum Kind {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Arc<Vec<u8>>,
        fua: bool,
    },
    Zero {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// One guest request across its attempts.
struct Req {
    kind: Kind,
    /// The guest's read buffer.
    buf: Option<IoBuffers>,
    tried: Vec<usize>,
    attempts: u32,
    done: Option<Completion>,
    /// The write-range lock it holds, if any.
    lock: Option<u64>,
}

/// Errors every path would give: not the path's fault.
fn is_request_error(e: &BlockError) -> bool {
    matches!(
        e,
        BlockError::Unsupported(_)
            | BlockError::OutOfRange { .. }
            | BlockError::Misaligned { .. }
            | BlockError::ReadOnly
            | BlockError::Buffer(_)
    )
}

impl Multipath {
    /// A multipath disk over `paths` (all leading to the same disk: same
    /// capacity and block size).
    pub fn new(
        paths: Vec<Arc<dyn BlockBackend>>,
        opts: MultipathOptions,
    ) -> Result<Self, MultipathError> {
        let first = paths.first().ok_or(MultipathError::NoPaths)?.info();
        let mut info = first;
        let mut all = Features::DISCARD | Features::WRITE_ZEROES | Features::FUA;
        let mut any = Features::empty();
        for (i, p) in paths.iter().enumerate() {
            let pi = p.info();
            if pi.capacity != first.capacity || pi.logical_block_size != first.logical_block_size {
                return Err(MultipathError::Mismatch {
                    path: i,
                    capacity: pi.capacity,
                    block_size: pi.logical_block_size,
                    expected_capacity: first.capacity,
                    expected_block_size: first.logical_block_size,
                });
            }
            all &= pi.features;
            any |= pi.features;
        }
        info.features = all | (any & (Features::READ_ONLY | Features::VOLATILE_CACHE));
        let n = paths.len();
        Ok(Multipath {
            inner: Arc::new(Inner {
                paths,
                info,
                opts,
                st: Mutex::new(State {
                    paths: (0..n)
                        .map(|_| Path {
                            state: PathState::Active,
                            outstanding: 0,
                            completed: 0,
                            errors: 0,
                            timeouts: 0,
                            retried: 0,
                        })
                        .collect(),
                    next: 0,
                    next_id: 0,
                    writing: Vec::new(),
                    waiting: VecDeque::new(),
                }),
                timer: Timer::default(),
            }),
        })
    }

    /// A control handle.
    pub fn handle(&self) -> MultipathHandle {
        MultipathHandle {
            inner: self.inner.clone(),
        }
    }
}

impl BlockBackend for Multipath {
    fn info(&self) -> BlockInfo {
        self.inner.info
    }

    fn submit(&self, req: Request, done: Completion) {
        if let Err(e) = self.inner.info.check(&req) {
            done.complete(Err(e));
            return;
        }
        self.inner.admit(req, done)
    }
}

fn write_range(req: &Request) -> Option<(u64, u64)> {
    match req {
        Request::Write { offset, .. }
        | Request::Discard { offset, .. }
        | Request::WriteZeroes { offset, .. } => {
            Some((*offset, offset.saturating_add(req.disk_len())))
        }
        _ => None,
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn lock_req(r: &Mutex<Req>) -> MutexGuard<'_, Req> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start `req` now, or queue it behind overlapping unfinished writes.
    fn admit(self: &Arc<Self>, req: Request, done: Completion) {
        let lock = match write_range(&req) {
            None => None,
            Some(range) => {
                let mut st = self.lock();
                let busy = st.writing.iter().any(|&(_, s, e)| overlaps((s, e), range))
                    || st.waiting.iter().any(|w| overlaps(w.range, range));
                if busy {
                    st.waiting.push_back(Waiting { range, req, done });
                    return;
                }
                st.next_id += 1;
                let id = st.next_id;
                st.writing.push((id, range.0, range.1));
                Some(id)
            }
        };
        self.start(req, done, lock);
    }

    fn start(self: &Arc<Self>, req: Request, done: Completion, lock: Option<u64>) {
        let (kind, buf) = match req {
            Request::Read { offset, buf } => (
                Kind::Read {
                    offset,
                    len: buf.len(),
                },
                Some(buf),
            ),
            Request::Write { offset, buf, fua } => (
                Kind::Write {
                    offset,
                    data: Arc::new(buf.to_vec()),
                    fua,
                },
                None,
            ),
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => (
                Kind::Zero {
                    offset,
                    len,
                    may_unmap,
                },
                None,
            ),
            Request::Discard { offset, len } => (Kind::Discard { offset, len }, None),
            Request::Flush => (Kind::Flush, None),
        };
        let r = Arc::new(Mutex::new(Req {
            kind,
            buf,
            tried: Vec::new(),
            attempts: 0,
            done: Some(done),
            lock,
        }));
        self.attempt(&r, None);
    }

    /// Pick an active path `r` has not tried.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let mut st = self.lock();
        let n = st.paths.len();
        let start = match self.opts.policy {
            PathPolicy::Failover => 0,
            PathPolicy::RoundRobin => st.next,
        };
        let p = (0..n)
            .map(|k| (start + k) % n)
            .find(|&p| st.paths[p].state == PathState::Active && !tried.contains(&p))?;
        st.next = (p + 1) % n;
        st.paths[p].outstanding += 1;
        Some(p)
    }

    /// Send `r` down another path, or finish it with `last` if none is left.
    fn attempt(self: &Arc<Self>, r: &Arc<Mutex<Req>>, last: Option<BlockError>) {
        let tried = lock_req(r).tried.clone();
        let Some(path) = self.pick(&tried) else {
            let err = last.unwrap_or_else(|| {
                BlockError::Io(std::io::Error::other("multipath: no active path left"))
            });
            self.finish(r, Err(err));
            return;
        };
        let (req, scratch) = {
            let mut g = lock_req(r);
            g.tried.push(path);
            g.attempts += 1;
            let direct = self.paths.len() == 1;
            match &g.kind {
                Kind::Read { offset, len } => {
                    let (offset, len) = (*offset, *len);
                    if direct {
                        match g.buf.take() {
                            Some(buf) => (Request::Read { offset, buf }, None),
                            None => {
                                // One path and its one attempt used: nothing to retry with.
                                g.attempts -= 1;
                                drop(g);
                                self.lock().paths[path].outstanding -= 1;
                                self.finish(
                                    r,
                                    Err(BlockError::Other(
                                        "multipath: read buffer already used".into(),
                                    )),
                                );
                                return;
                            }
                        }
                    } else {
                        match Scratch::read_request(len, offset) {
                            Ok((s, req)) => (req, Some(s)),
                            Err(e) => {
                                g.attempts -= 1;
                                drop(g);
                                self.lock().paths[path].outstanding -= 1;
                                self.finish(r, Err(e));
                                return;
                            }
                        }
                    }
                }
                Kind::Write { offset, data, fua } => (
                    Request::Write {
                        offset: *offset,
                        buf: IoBuffers::from_vec(data.to_vec()),
                        fua: *fua,
                    },
                    None,
                ),
                Kind::Zero {
                    offset,
                    len,
                    may_unmap,
                } => (
                    Request::WriteZeroes {
                        offset: *offset,
                        len: *len,
                        may_unmap: *may_unmap,
                    },
                    None,
                ),
                Kind::Discard { offset, len } => (
                    Request::Discard {
                        offset: *offset,
                        len: *len,
                    },
                    None,
                ),
                Kind::Flush => (Request::Flush, None),
            }
        };
        let settled = Arc::new(AtomicBool::new(false));
        if let Some(t) = self.opts.timeout {
            let me = self.clone();
            let r2 = r.clone();
            let s2 = settled.clone();
            self.timer.schedule(Instant::now() + t, move || {
                if !s2.swap(true, Ordering::SeqCst) {
                    {
                        let mut st = me.lock();
                        st.paths[path].timeouts += 1;
                        st.paths[path].retried += 1;
                    }
                    me.fail_path(path, &format!("no answer within {t:?}"));
                    me.attempt(
                        &r2,
                        Some(BlockError::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("multipath: path {path} timed out"),
                        ))),
                    );
                }
            });
        }
        let me = self.clone();
        let r2 = r.clone();
        self.paths[path].submit(
            req,
            Completion::new(move |res| {
                let first = !settled.swap(true, Ordering::SeqCst);
                {
                    let mut st = me.lock();
                    let p = &mut st.paths[path];
                    p.outstanding = p.outstanding.saturating_sub(1);
                    match &res {
                        Ok(()) => p.completed += 1,
                        Err(e) if !is_request_error(e) => p.errors += 1,
                        Err(_) => {}
                    }
                }
                lock_req(&r2).attempts -= 1;
                if first {
                    match res {
                        Ok(()) => {
                            if let Some(s) = scratch {
                                if let Some(buf) = &lock_req(&r2).buf {
                                    buf.copy_from_slice_at(0, &s.to_vec());
                                }
                            }
                            me.finish(&r2, Ok(()));
                        }
                        Err(e) if is_request_error(&e) => me.finish(&r2, Err(e)),
                        Err(e) => {
                            me.lock().paths[path].retried += 1;
                            me.fail_path(path, &e.to_string());
                            me.attempt(&r2, Some(e));
                        }
                    }
                }
                me.maybe_release(&r2);
            }),
        );
    }

    fn fail_path(&self, path: usize, why: &str) {
        let mut st = self.lock();
        if let Some(p) = st.paths.get_mut(path) {
            if p.state == PathState::Active {
                p.state = PathState::Failed;
                log::warn!("multipath: path {path} failed: {why}");
            }
        }
    }

    /// Complete the guest's request (once).
    fn finish(self: &Arc<Self>, r: &Arc<Mutex<Req>>, res: BlockResult) {
        let done = r.lock().unwrap_or_else(|e| e.into_inner()).done.take();
        if let Some(done) = done {
            done.complete(res);
        }
        self.maybe_release(r);
    }

    /// Once a write is answered and every attempt is back, let the writes
    /// waiting behind it go.
    fn maybe_release(self: &Arc<Self>, r: &Arc<Mutex<Req>>) {
        let id = {
            let mut g = r.lock().unwrap_or_else(|e| e.into_inner());
            if g.done.is_some() || g.attempts > 0 {
                return;
            }
            match g.lock.take() {
                Some(id) => id,
                None => return,
            }
        };
        let ready = {
            let mut st = self.lock();
            st.writing.retain(|&(i, _, _)| i != id);
            let mut blocked: Vec<(u64, u64)> = st.writing.iter().map(|&(_, s, e)| (s, e)).collect();
            let mut keep = VecDeque::new();
            let mut ready = Vec::new();
            while let Some(w) = st.waiting.pop_front() {
                if blocked.iter().any(|&b| overlaps(b, w.range)) {
                    blocked.push(w.range);
                    keep.push_back(w);
                } else {
                    st.next_id += 1;
                    let nid = st.next_id;
                    st.writing.push((nid, w.range.0, w.range.1));
                    blocked.push(w.range);
                    ready.push((w, nid));
                }
            }
            st.waiting = keep;
            ready
        };
        for (w, nid) in ready {
            self.start(w.req, w.done, Some(nid));
        }
    }
}

impl MultipathHandle {
    /// The status of every path, in order.
    pub fn status(&self) -> Vec<PathStatus> {
        self.inner
            .lock()
            .paths
            .iter()
            .map(|p| PathStatus {
                state: p.state,
                outstanding: p.outstanding,
                completed: p.completed,
                errors: p.errors,
                timeouts: p.timeouts,
                retried: p.retried,
            })
            .collect()
    }

    /// Take a path out of use by hand.
    pub fn fail_path(&self, path: usize) -> Result<(), MultipathError> {
        if path >= self.inner.paths.len() {
            return Err(MultipathError::NoSuchPath(path));
        }
        self.inner.fail_path(path, "by request");
        Ok(())
    }

    /// Put a failed path back into use.
    pub fn restore_path(&self, path: usize) -> Result<(), MultipathError> {
        let mut st = self.inner.lock();
        let p = st
            .paths
            .get_mut(path)
            .ok_or(MultipathError::NoSuchPath(path))?;
        if p.state == PathState::Failed {
            log::info!("multipath: path {path} restored");
            p.state = PathState::Active;
        }
        Ok(())
    }

    /// Writes waiting behind overlapping unfinished writes.
    pub fn waiting_writes(&self) -> usize {
        self.inner.lock().waiting.len()
    }
}
