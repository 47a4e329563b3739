//! Mirror (RAID-1 style replication): every write goes to every healthy
//! child, reads are spread across them, a failing child is taken out while
//! the guest keeps running, and a durable dirty-region bitmap drives the
//! resync when it comes back.
//!
//! - **Writes** (and write-zeroes, discard) go to every child that is
//!   [`ChildState::Healthy`] or [`ChildState::Resyncing`], all with the same
//!   copy of the data. A write is acknowledged when every such child has
//!   answered and at least [`MirrorOptions::write_quorum`] healthy children
//!   (default 1) succeeded. A child that fails a write is taken out with a log
//!   line; the write's regions are marked dirty for it in the bitmap, and the
//!   bitmap is written and fsynced **before** the write is acknowledged.
//!   A write submitted while a child is out marks its regions dirty (durably)
//!   before it is passed on.
//! - **Reads** go to one healthy child, chosen round-robin or by fewest
//!   requests outstanding ([`ReadPolicy`]). With more than one healthy child
//!   a read goes through a scratch buffer, so that if the child fails it the
//!   read is retried on another (the guest never sees the failure).
//! - **Flush** goes to every healthy and resyncing child. A child that fails
//!   a flush is taken out with all its regions dirty (which of its writes are
//!   durable is unknown).
//! - **Resync** ([`MirrorHandle::return_child`]) puts a child back as
//!   resyncing: it receives new writes at once, and a thread copies each
//!   dirty region from a healthy child. A region under copy is locked: writes
//!   to it wait until the copy is written, and the copy starts only once the
//!   writes already in flight to the region are done, so stale copy data never
//!   overwrites a newer write. When every region is copied the child is
//!   flushed, becomes healthy, and the cleared bitmap is persisted.
//! - **Verify** ([`MirrorHandle::verify`]) compares the healthy children
//!   region by region (each region locked while it is read) and reports the
//!   regions that differ.
//!
//! The bitmap file ([`MirrorOptions::bitmap`]) holds a small header and one
//! bit per region per child. When a mirror opens an existing bitmap, children
//! with dirty regions start resyncing at once ([`MirrorOptions::resync_on_open`]).
//! Without a bitmap file the bitmap lives in memory only and a crash loses it.
//! Writes that were in flight (never acknowledged) when the host crashed may
//! have reached some children and not others; [`MirrorHandle::verify`]
//! finds such regions.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::mirror::{ChildState, Mirror, MirrorOptions};
//!
//! let a = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let b = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let m = Mirror::new(vec![a.clone(), b.clone()], MirrorOptions::default())?;
//! let ctl = m.handle();
//! ctl.fail_child(1)?; // b is out: the mirror keeps running on a
//! submit_wait(&m, Request::Write { offset: 4096, buf: IoBuffers::from_vec(vec![7; 512]), fua: false })?;
//! assert_eq!(ctl.status()[1].dirty_regions, 1);
//! ctl.return_child(1)?; // copy the dirty region back
//! assert!(ctl.wait_resync(std::time::Duration::from_secs(5)));
//! assert_eq!(ctl.status()[1].state, ChildState::Healthy);
//! assert_eq!(a.0.contents(), b.0.contents());
//! assert!(ctl.verify()?.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bitmap;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, BlockInfo, BlockResult, Completion, Features, IoBuffers,
    Request,
};
use serde::Serialize;

use crate::aggregate::parts::{clone_error, Scratch};
pub use bitmap::{BitmapError, BITMAP_MAGIC};
use bitmap::{BitmapFile, Bitmaps};

/// How reads choose a healthy child.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ReadPolicy {
    /// Take the healthy children in turn.
    RoundRobin,
    /// Take the healthy child with the fewest requests outstanding (ties in turn).
    #[default]
    LeastOutstanding,
}

impl std::str::FromStr for ReadPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "round-robin" => Ok(ReadPolicy::RoundRobin),
            "least-outstanding" => Ok(ReadPolicy::LeastOutstanding),
            other => Err(format!(
                "unknown read policy {other:?} (expected round-robin or least-outstanding)"
            )),
        }
    }
}

/// Options of a [`Mirror`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorOptions {
    /// Bytes per dirty-bitmap region (a positive multiple of the logical block size; default 64 KiB).
    pub region_size: u64,
    /// The bitmap file, created if missing; `None` keeps the bitmap in memory only.
    pub bitmap: Option<PathBuf>,
    /// How reads pick a child.
    pub read_policy: ReadPolicy,
    /// Least number of healthy children that must complete a write for it to
    /// succeed (default 1; every healthy child is always written).
    pub write_quorum: usize,
    /// Start resyncing children the bitmap file says are behind when the mirror opens (default true).
    pub resync_on_open: bool,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            region_size: 64 << 10,
            bitmap: None,
            read_policy: ReadPolicy::default(),
            write_quorum: 1,
            resync_on_open: true,
        }
    }
}

/// Where a child stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ChildState {
    /// Has every acknowledged write: read from and written to.
    Healthy,
    /// Taken out (by an error or by hand): neither read nor written; its
    /// missed regions are dirty in the bitmap.
    Failed,
    /// Coming back: written to, not read from, while its dirty regions are copied.
    Resyncing,
}

/// One child's status, for the control interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChildStatus {
    /// Where it stands.
    pub state: ChildState,
    /// Requests submitted to it and not yet complete.
    pub outstanding: u64,
    /// Reads it served.
    pub reads: u64,
    /// Writes (and write-zeroes, discards) it completed.
    pub writes: u64,
    /// Errors it returned.
    pub errors: u64,
    /// Regions marked dirty for it (it may lack writes there).
    pub dirty_regions: u64,
}

/// Progress of the current or last resync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResyncProgress {
    /// The child being brought back.
    pub child: usize,
    /// Dirty regions when it started.
    pub total_regions: u64,
    /// Regions copied so far.
    pub copied_regions: u64,
    /// Bytes copied so far.
    pub copied_bytes: u64,
    /// Whether it has ended (successfully or not).
    pub finished: bool,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// A region where the children differ, found by [`MirrorHandle::verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyMismatch {
    /// First byte of the region.
    pub offset: u64,
    /// Bytes in the region.
    pub len: u64,
    /// The children whose content differs from the first healthy child's.
    pub differing: Vec<usize>,
}

/// Something that happened to a mirror, for the control interface's event stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum MirrorEvent {
    /// A child was taken out.
    ChildFailed {
        /// Which.
        child: usize,
        /// Why (the error, or "by request").
        reason: String,
    },
    /// A resync started.
    ResyncStarted {
        /// Which child.
        child: usize,
        /// Dirty regions to copy.
        regions: u64,
    },
    /// A resync finished: the child is healthy again.
    ResyncDone {
        /// Which child.
        child: usize,
    },
    /// A resync stopped early; the child is out again.
    ResyncFailed {
        /// Which child.
        child: usize,
        /// Why.
        reason: String,
    },
}

/// Why a mirror could not be built or a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// A mirror needs at least one child.
    #[error("a mirror needs at least one child")]
    NoChildren,
    /// The children differ in capacity.
    #[error("mirror child {child} has {capacity} bytes but child 0 has {expected}")]
    SizeMismatch {
        /// The child.
        child: usize,
        /// Its capacity.
        capacity: u64,
        /// Child 0's capacity.
        expected: u64,
    },
    /// The region size is zero or not whole logical blocks.
    #[error("mirror region size {region_size} is not a positive multiple of the {block_size}-byte block")]
    RegionSize {
        /// The size asked for.
        region_size: u64,
        /// The logical block size.
        block_size: u32,
    },
    /// The write quorum is zero or larger than the number of children.
    #[error("mirror write quorum {quorum} is not between 1 and the {children} children")]
    Quorum {
        /// The quorum asked for.
        quorum: usize,
        /// The number of children.
        children: usize,
    },
    /// The bitmap file could not be used.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// There is no child with this index.
    #[error("mirror has no child {0}")]
    NoSuchChild(usize),
    /// The child is not in the state the operation needs.
    #[error("mirror child {child} is {state:?}; {op} needs it {needs}")]
    WrongState {
        /// The child.
        child: usize,
        /// Its state.
        state: ChildState,
        /// The operation.
        op: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// Another resync is running.
    #[error("mirror child {0} is already being resynced")]
    ResyncRunning(usize),
    /// Taking the child out would leave no healthy child.
    #[error("mirror child {0} is the last healthy child")]
    LastHealthy(usize),
    /// A child failed while verifying.
    #[error("mirror verify: reading region at byte {offset} from child {child} failed: {source}")]
    Verify {
        /// The child.
        child: usize,
        /// The region.
        offset: u64,
        /// What the child said.
        #[source]
        source: BlockError,
    },
    /// The resync thread could not be started.
    #[error("mirror: cannot start the resync thread: {0}")]
    Thread(std::io::Error),
}

type EventHook = Arc<dyn Fn(&MirrorEvent) + Send + Sync>;

struct Child {
    state: ChildState,
    outstanding: u64,
    reads: u64,
    writes: u64,
    errors: u64,
}

struct State {
    children: Vec<Child>,
    dirty: Bitmaps,
    next: usize,
    /// Writes in flight per region.
    inflight: HashMap<u64, u32>,
    /// Regions locked by a resync copy or a verify.
    locked: HashSet<u64>,
    /// Writes waiting for a locked region.
    waiting: Vec<(Request, Completion)>,
    resync: Option<ResyncProgress>,
    resync_running: bool,
    /// Children found behind when the mirror opened, waiting for their resync.
    queued: Vec<usize>,
}

struct Inner {
    children: Vec<Arc<dyn BlockBackend>>,
    info: BlockInfo,
    opts: MirrorOptions,
    regions: u64,
    st: Mutex<State>,
    cv: Condvar,
    file: Option<Mutex<BitmapFile>>,
    hook: Mutex<Option<EventHook>>,
}

/// A mirror over N children; see the [module docs](self).
pub struct Mirror {
    inner: Arc<Inner>,
}

/// The run-time control of a [`Mirror`]: fail or return children, resync
/// progress, verify, status and events. Clones share the mirror.
#[derive(Clone)]
pub struct MirrorHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("children", &self.inner.children.len())
            .field("options", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for MirrorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorHandle").finish_non_exhaustive()
    }
}

fn mirror_info(children: &[Arc<dyn BlockBackend>]) -> Result<BlockInfo, MirrorError> {
    let first = children.first().ok_or(MirrorError::NoChildren)?.info();
    let mut info = first;
    let mut all = Features::DISCARD | Features::WRITE_ZEROES | Features::FUA;
    let mut any = Features::empty();
    for (i, c) in children.iter().enumerate() {
        let ci = c.info();
        if ci.capacity != first.capacity {
            return Err(MirrorError::SizeMismatch {
                child: i,
                capacity: ci.capacity,
                expected: first.capacity,
            });
        }
        info.logical_block_size = info.logical_block_size.max(ci.logical_block_size);
        info.physical_block_size = info.physical_block_size.max(ci.physical_block_size);
        all &= ci.features;
        any |= ci.features;
    }
    info.features = all | (any & (Features::READ_ONLY | Features::VOLATILE_CACHE));
    Ok(info)
}

/// The byte range a request covers (none for a flush).
fn span(req: &Request) -> Option<(u64, u64)> {
    match req {
        Request::Read { offset, .. }
        | Request::Write { offset, .. }
        | Request::Discard { offset, .. }
        | Request::WriteZeroes { offset, .. } => Some((*offset, req.disk_len())),
        Request::Flush => None,
    }
}

/// Same operation and range, with `buf` for the data.
fn with_data(req: &Request, data: Option<&Arc<Vec<u8>>>) -> Request {
    match (req, data) {
        (Request::Write { offset, fua, .. }, Some(d)) => Request::Write {
            offset: *offset,
            buf: IoBuffers::from_vec(d.to_vec()),
            fua: *fua,
        },
        (Request::Discard { offset, len }, _) => Request::Discard {
            offset: *offset,
            len: *len,
        },
        (
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            },
            _,
        ) => Request::WriteZeroes {
            offset: *offset,
            len: *len,
            may_unmap: *may_unmap,
        },
        _ => Request::Flush,
    }
}

fn no_child_error(op: &str) -> BlockError {
    BlockError::Io(std::io::Error::other(format!(
        "mirror: no healthy child left for a {op}"
    )))
}

impl Mirror {
    /// A mirror over `children` (at least one, all of one capacity).
    ///
    /// With a bitmap file that exists, its dirty bits are loaded and children
    /// behind start resyncing (see [`MirrorOptions::resync_on_open`]); a file
    /// made for another geometry is an error.
    pub fn new(
        children: Vec<Arc<dyn BlockBackend>>,
        opts: MirrorOptions,
    ) -> Result<Self, MirrorError> {
        let info = mirror_info(&children)?;
        let bs = u64::from(info.logical_block_size.max(1));
        if opts.region_size == 0 || opts.region_size % bs != 0 {
            return Err(MirrorError::RegionSize {
                region_size: opts.region_size,
                block_size: info.logical_block_size,
            });
        }
        if opts.write_quorum == 0 || opts.write_quorum > children.len() {
            return Err(MirrorError::Quorum {
                quorum: opts.write_quorum,
                children: children.len(),
            });
        }
        let regions = info.capacity.div_ceil(opts.region_size);
        let n = children.len();
        let (dirty, file) = match &opts.bitmap {
            Some(path) => {
                let (file, dirty) = BitmapFile::open(path, n, opts.region_size, regions)?;
                (dirty, Some(Mutex::new(file)))
            }
            None => (Bitmaps::new(n, regions), None),
        };
        let behind: Vec<usize> = (0..n).filter(|&c| dirty.count(c) > 0).collect();
        let mut kids: Vec<Child> = (0..n)
            .map(|_| Child {
                state: ChildState::Healthy,
                outstanding: 0,
                reads: 0,
                writes: 0,
                errors: 0,
            })
            .collect();
        for &c in &behind {
            if let Some(k) = kids.get_mut(c) {
                k.state = ChildState::Failed;
            }
        }
        if behind.len() == n {
            // Every child is behind somewhere (a crash mid-failover): trust
            // the child with the fewest dirty regions.
            if let Some(best) = (0..n).min_by_key(|&c| dirty.count(c)) {
                if let Some(k) = kids.get_mut(best) {
                    k.state = ChildState::Healthy;
                }
                log::warn!("mirror: every child has dirty regions; serving from child {best}");
            }
        }
        let inner = Arc::new(Inner {
            children,
            info,
            opts,
            regions,
            st: Mutex::new(State {
                children: kids,
                dirty,
                next: 0,
                inflight: HashMap::new(),
                locked: HashSet::new(),
                waiting: Vec::new(),
                resync: None,
                resync_running: false,
                queued: Vec::new(),
            }),
            cv: Condvar::new(),
            file,
            hook: Mutex::new(None),
        });
        let m = Mirror { inner };
        if m.inner.opts.resync_on_open {
            let h = m.handle();
            let mut failed: Vec<usize> = behind
                .into_iter()
                .filter(|&c| {
                    h.inner.lock().children.get(c).map(|k| k.state) == Some(ChildState::Failed)
                })
                .collect();
            if !failed.is_empty() {
                let first = failed.remove(0);
                h.inner.lock().queued = failed;
                log::info!("mirror: child {first} has dirty regions from before; resyncing it");
                h.return_child(first)?;
            }
        }
        Ok(m)
    }

    /// A control handle.
    pub fn handle(&self) -> MirrorHandle {
        MirrorHandle {
            inner: self.inner.clone(),
        }
    }
}

impl BlockBackend for Mirror {
    fn info(&self) -> BlockInfo {
        self.inner.info
    }

    fn submit(&self, req: Request, done: Completion) {
        self.inner.submit(req, done)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, ev: MirrorEvent) {
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(&ev);
        }
    }

    fn regions_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let rs = self.opts.region_size;
        let first = offset / rs;
        let last = offset.saturating_add(len.max(1)).div_ceil(rs);
        first..last.min(self.regions).max(first)
    }

    /// Take `child` out (if it is in); returns whether it was in.
    fn take_out(&self, st: &mut State, child: usize, reason: &str) -> Option<MirrorEvent> {
        let k = st.children.get_mut(child)?;
        if k.state == ChildState::Failed {
            return None;
        }
        log::warn!("mirror: child {child} taken out: {reason}");
        k.state = ChildState::Failed;
        Some(MirrorEvent::ChildFailed {
            child,
            reason: reason.to_string(),
        })
    }

    /// Write the bitmap file if there is one.
    fn persist(&self) -> Result<(), BitmapError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
        // Snapshot after taking the file lock: the last writer writes the newest bits.
        let bytes = self.lock().dirty.to_bytes();
        f.write(&bytes)
    }

    fn submit(self: &Arc<Self>, req: Request, done: Completion) {
        if let Err(e) = self.info.check(&req) {
            done.complete(Err(e));
            return;
        }
        match req {
            Request::Read { offset, buf } => self.read(offset, buf, done, None),
            Request::Flush => self.flush(done),
            other => self.write(other, done),
        }
    }

    /// Pick a healthy child for a read, avoiding `not`.
    fn pick(&self, st: &mut State, not: &[usize]) -> Option<usize> {
        let n = st.children.len();
        let start = st.next;
        let mut best: Option<(u64, usize)> = None;
        for k in 0..n {
            let c = (start + k) % n;
            let child = &st.children[c];
            if child.state != ChildState::Healthy || not.contains(&c) {
                continue;
            }
            let key = match self.opts.read_policy {
                ReadPolicy::RoundRobin => 0,
                ReadPolicy::LeastOutstanding => child.outstanding,
            };
            if best.is_none_or(|(b, _)| key < b) {
                best = Some((key, c));
            }
        }
        let (_, c) = best?;
        st.next = (c + 1) % n.max(1);
        Some(c)
    }

    fn read(
        self: &Arc<Self>,
        offset: u64,
        buf: IoBuffers,
        done: Completion,
        tried: Option<Vec<usize>>,
    ) {
        let tried = tried.unwrap_or_default();
        let (child, others) = {
            let mut st = self.lock();
            let Some(c) = self.pick(&mut st, &tried) else {
                drop(st);
                done.complete(Err(no_child_error("read")));
                return;
            };
            st.children[c].outstanding += 1;
            let others = st
                .children
                .iter()
                .enumerate()
                .filter(|(i, k)| *i != c && k.state == ChildState::Healthy && !tried.contains(i))
                .count();
            (c, others)
        };
        let me = self.clone();
        if others == 0 {
            // Nobody to retry on: read straight into the guest's buffer.
            self.children[child].submit(
                Request::Read { offset, buf },
                Completion::new(move |r| {
                    me.read_done(child, &r);
                    done.complete(r)
                }),
            );
            return;
        }
        let len = buf.len();
        let (scratch, req) = match Scratch::read_request(len, offset) {
            Ok(x) => x,
            Err(e) => {
                self.lock().children[child].outstanding -= 1;
                done.complete(Err(e));
                return;
            }
        };
        self.children[child].submit(
            req,
            Completion::new(move |r| {
                me.read_done(child, &r);
                match r {
                    Ok(()) => {
                        buf.copy_from_slice_at(0, &scratch.to_vec());
                        done.complete(Ok(()))
                    }
                    Err(e) => {
                        let mut tried = tried;
                        tried.push(child);
                        log::debug!(
                            "mirror: read at {offset} failed on child {child} ({e}); retrying"
                        );
                        me.read(offset, buf, done, Some(tried))
                    }
                }
            }),
        );
    }

    fn read_done(&self, child: usize, r: &BlockResult) {
        let ev = {
            let mut st = self.lock();
            let k = &mut st.children[child];
            k.outstanding = k.outstanding.saturating_sub(1);
            match r {
                Ok(()) => {
                    k.reads += 1;
                    None
                }
                // A request the child refused as unsupported says nothing about its health.
                Err(BlockError::Unsupported(_)) => None,
                Err(e) => {
                    k.errors += 1;
                    self.take_out(&mut st, child, &format!("read failed: {e}"))
                }
            }
        };
        if let Some(ev) = ev {
            self.emit(ev);
        }
    }

    fn flush(self: &Arc<Self>, done: Completion) {
        let targets: Vec<usize> = {
            let mut st = self.lock();
            let t: Vec<usize> = (0..st.children.len())
                .filter(|&c| st.children[c].state != ChildState::Failed)
                .collect();
            for &c in &t {
                st.children[c].outstanding += 1;
            }
            t
        };
        if targets.is_empty() {
            done.complete(Err(no_child_error("flush")));
            return;
        }
        let agg = Arc::new(Mutex::new(Agg::new(targets.len(), done)));
        for c in targets {
            let me = self.clone();
            let agg = agg.clone();
            self.children[c].submit(
                Request::Flush,
                Completion::new(move |r| {
                    let (ev, healthy) = {
                        let mut st = me.lock();
                        let k = &mut st.children[c];
                        k.outstanding = k.outstanding.saturating_sub(1);
                        let was_healthy = k.state == ChildState::Healthy;
                        let ev = if let Err(e) = &r {
                            k.errors += 1;
                            // What the child made durable is unknown: all of it is suspect.
                            st.dirty.set_all(c);
                            me.take_out(&mut st, c, &format!("flush failed: {e}"))
                        } else {
                            None
                        };
                        (ev, was_healthy)
                    };
                    let failed = r.is_err();
                    if failed {
                        if let Err(e) = me.persist() {
                            log::error!("mirror: cannot persist the dirty bitmap: {e}");
                        }
                    }
                    if let Some(ev) = ev {
                        me.emit(ev);
                    }
                    let fin = agg
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .part(r, healthy);
                    if let Some((done, result)) = fin {
                        done.complete(result.and_then(|ok| {
                            if ok >= 1 {
                                Ok(())
                            } else {
                                Err(no_child_error("flush"))
                            }
                        }));
                    }
                }),
            );
        }
    }

    fn write(self: &Arc<Self>, req: Request, done: Completion) {
        let Some((offset, len)) = span(&req) else {
            return;
        };
        let regions = self.regions_of(offset, len);
        let (targets, marked) = {
            let mut st = self.lock();
            if regions.clone().any(|r| st.locked.contains(&r)) {
                st.waiting.push((req, done));
                return;
            }
            let mut marked = false;
            let mut targets = Vec::new();
            for c in 0..st.children.len() {
                if st.children[c].state == ChildState::Failed {
                    marked |= st.dirty.set_range(c, regions.clone());
                } else {
                    targets.push(c);
                }
            }
            if targets.is_empty() {
                drop(st);
                done.complete(Err(no_child_error(req.op_name())));
                return;
            }
            for r in regions.clone() {
                *st.inflight.entry(r).or_insert(0) += 1;
            }
            for &c in &targets {
                st.children[c].outstanding += 1;
            }
            (targets, marked)
        };
        if marked {
            if let Err(e) = self.persist() {
                log::error!("mirror: cannot persist the dirty bitmap: {e}");
                self.write_parts_done(&regions, &[]);
                for &c in &targets {
                    let mut st = self.lock();
                    st.children[c].outstanding -= 1;
                }
                done.complete(Err(BlockError::Io(std::io::Error::other(format!(
                    "mirror: degraded write refused, the dirty bitmap cannot be saved: {e}"
                )))));
                return;
            }
        }
        // One copy of the data for every child: a guest changing its buffer
        // meanwhile cannot make the children differ.
        let data = match &req {
            Request::Write { buf, .. } => Some(Arc::new(buf.to_vec())),
            _ => None,
        };
        let agg = Arc::new(Mutex::new(WriteAgg {
            left: targets.len(),
            results: Vec::with_capacity(targets.len()),
            done: Some(done),
        }));
        for &c in &targets {
            let sub = with_data(&req, data.as_ref());
            let me = self.clone();
            let agg = agg.clone();
            let regions = regions.clone();
            self.children[c].submit(
                sub,
                Completion::new(move |r| {
                    let fin = {
                        let mut a = agg.lock().unwrap_or_else(|e| e.into_inner());
                        a.results.push((c, r));
                        a.left -= 1;
                        if a.left == 0 {
                            a.done.take().map(|d| (d, std::mem::take(&mut a.results)))
                        } else {
                            None
                        }
                    };
                    if let Some((done, results)) = fin {
                        me.finish_write(&regions, results, done);
                    }
                }),
            );
        }
    }

    fn write_parts_done(&self, regions: &std::ops::Range<u64>, _results: &[(usize, BlockResult)]) {
        let mut st = self.lock();
        for r in regions.clone() {
            if let Some(n) = st.inflight.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    st.inflight.remove(&r);
                }
            }
        }
        drop(st);
        self.cv.notify_all();
    }

    fn finish_write(
        &self,
        regions: &std::ops::Range<u64>,
        results: Vec<(usize, BlockResult)>,
        done: Completion,
    ) {
        let mut events = Vec::new();
        let mut marked = false;
        let mut ok_healthy = 0usize;
        let mut first_err: Option<BlockError> = None;
        let mut unsupported = false;
        {
            let mut st = self.lock();
            for (c, r) in &results {
                let c = *c;
                let k = &mut st.children[c];
                k.outstanding = k.outstanding.saturating_sub(1);
                match r {
                    Ok(()) => {
                        k.writes += 1;
                        if k.state == ChildState::Healthy {
                            ok_healthy += 1;
                        }
                    }
                    Err(BlockError::Unsupported(_)) => unsupported = true,
                    Err(e) => {
                        k.errors += 1;
                        if let Some(ev) = self.take_out(&mut st, c, &format!("write failed: {e}")) {
                            events.push(ev);
                        }
                    }
                }
                if let Err(e) = r {
                    if first_err.is_none() {
                        first_err = Some(clone_error(e));
                    }
                }
                // A child out by now (this write's error, or another's) may
                // lack this write: its regions are dirty for it.
                if st.children[c].state == ChildState::Failed {
                    marked |= st.dirty.set_range(c, regions.clone());
                }
            }
            for r in regions.clone() {
                if let Some(n) = st.inflight.get_mut(&r) {
                    *n -= 1;
                    if *n == 0 {
                        st.inflight.remove(&r);
                    }
                }
            }
        }
        self.cv.notify_all();
        let persisted = if marked { self.persist() } else { Ok(()) };
        for ev in events {
            self.emit(ev);
        }
        let result = if unsupported {
            // Every child got the same request: an unsupported operation is the guest's answer.
            Err(first_err.unwrap_or(BlockError::Unsupported("write")))
        } else if let Err(e) = persisted {
            log::error!("mirror: cannot persist the dirty bitmap: {e}");
            Err(BlockError::Io(std::io::Error::other(format!(
                "mirror: the dirty bitmap cannot be saved: {e}"
            ))))
        } else if ok_healthy >= self.opts.write_quorum {
            Ok(())
        } else {
            Err(first_err.unwrap_or_else(|| no_child_error("write")))
        };
        done.complete(result);
    }

    /// Lock `region` against writes and wait for the writes in flight to it.
    fn lock_region(&self, region: u64) {
        let mut st = self.lock();
        while st.locked.contains(&region) {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.locked.insert(region);
        while st.inflight.get(&region).copied().unwrap_or(0) > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Unlock `region` and pass on the writes that waited.
    fn unlock_region(self: &Arc<Self>, region: u64) {
        let waiting = {
            let mut st = self.lock();
            st.locked.remove(&region);
            std::mem::take(&mut st.waiting)
        };
        self.cv.notify_all();
        for (req, done) in waiting {
            self.write(req, done);
        }
    }

    fn region_bounds(&self, region: u64) -> (u64, usize) {
        let start = region * self.opts.region_size;
        let len = self.opts.region_size.min(self.info.capacity - start);
        (start, len as usize)
    }

    /// Copy every dirty region of `target` from a healthy child.
    fn resync(self: &Arc<Self>, target: usize) {
        let regions: Vec<u64> = self.lock().dirty.iter(target).collect();
        let outcome = self.resync_regions(target, &regions);
        let outcome = outcome.and_then(|()| {
            submit_wait(&*self.children[target], Request::Flush)
                .map_err(|e| format!("flushing child {target} failed: {e}"))
        });
        let ev = {
            let mut st = self.lock();
            st.resync_running = false;
            let still = st.children[target].state == ChildState::Resyncing;
            let ev = match (&outcome, still) {
                (Ok(()), true) if st.dirty.count(target) == 0 => {
                    st.children[target].state = ChildState::Healthy;
                    log::info!("mirror: child {target} resynced and healthy again");
                    MirrorEvent::ResyncDone { child: target }
                }
                (Ok(()), _) => {
                    let reason = "child left the resync".to_string();
                    if let Some(e) = self.take_out(&mut st, target, &reason) {
                        drop(e);
                    }
                    MirrorEvent::ResyncFailed {
                        child: target,
                        reason,
                    }
                }
                (Err(e), _) => {
                    let _ = self.take_out(&mut st, target, e);
                    MirrorEvent::ResyncFailed {
                        child: target,
                        reason: e.clone(),
                    }
                }
            };
            if let Some(p) = st.resync.as_mut() {
                p.finished = true;
                p.error = outcome.err();
            }
            ev
        };
        if let Err(e) = self.persist() {
            log::error!("mirror: cannot persist the dirty bitmap after resync: {e}");
        }
        self.cv.notify_all();
        self.emit(ev);
        // Children found behind at open take their turn.
        let next = {
            let mut st = self.lock();
            if st.queued.is_empty() {
                None
            } else {
                Some(st.queued.remove(0))
            }
        };
        if let Some(c) = next {
            let h = MirrorHandle {
                inner: self.clone(),
            };
            log::info!("mirror: child {c} has dirty regions from before; resyncing it");
            if let Err(e) = h.return_child(c) {
                log::warn!("mirror: cannot resync child {c}: {e}");
            }
            self.cv.notify_all();
        }
    }

    fn resync_regions(self: &Arc<Self>, target: usize, regions: &[u64]) -> Result<(), String> {
        for &region in regions {
            let source = {
                let mut st = self.lock();
                if st.children[target].state != ChildState::Resyncing {
                    return Err(format!("child {target} was taken out during the resync"));
                }
                if !st.dirty.get(target, region) {
                    continue;
                }
                match self.pick(&mut st, &[target]) {
                    Some(s) => s,
                    None => return Err("no healthy child to copy from".into()),
                }
            };
            self.lock_region(region);
            let copied = self.copy_region(source, target, region);
            {
                let mut st = self.lock();
                match &copied {
                    Ok(n) => {
                        st.dirty.clear(target, region);
                        if let Some(p) = st.resync.as_mut() {
                            p.copied_regions += 1;
                            p.copied_bytes += *n as u64;
                        }
                    }
                    Err((c, e)) => {
                        let ev = self.take_out(&mut st, *c, e);
                        drop(st);
                        self.unlock_region(region);
                        if let Some(ev) = ev {
                            self.emit(ev);
                        }
                        return Err(e.clone());
                    }
                }
            }
            self.unlock_region(region);
        }
        Ok(())
    }

    /// Copy one region; on error, which child failed and why.
    fn copy_region(
        &self,
        source: usize,
        target: usize,
        region: u64,
    ) -> Result<usize, (usize, String)> {
        let (start, len) = self.region_bounds(region);
        let (scratch, req) =
            Scratch::read_request(len, start).map_err(|e| (target, e.to_string()))?;
        submit_wait(&*self.children[source], req)
            .map_err(|e| (source, format!("resync read at byte {start} failed: {e}")))?;
        let data = scratch.to_vec();
        submit_wait(
            &*self.children[target],
            Request::Write {
                offset: start,
                buf: IoBuffers::from_vec(data),
                fua: false,
            },
        )
        .map_err(|e| (target, format!("resync write at byte {start} failed: {e}")))?;
        Ok(len)
    }
}

/// Joins a flush's parts: the result and how many healthy children succeeded.
struct Agg {
    left: usize,
    ok_healthy: usize,
    err: Option<BlockError>,
    done: Option<Completion>,
}

impl Agg {
    fn new(n: usize, done: Completion) -> Self {
        Agg {
            left: n,
            ok_healthy: 0,
            err: None,
            done: Some(done),
        }
    }

    fn part(
        &mut self,
        r: BlockResult,
        healthy: bool,
    ) -> Option<(Completion, Result<usize, BlockError>)> {
        match r {
            Ok(()) if healthy => self.ok_healthy += 1,
            Ok(()) => {}
            Err(e) => {
                if self.err.is_none() {
                    self.err = Some(e)
                }
            }
        }
        self.left -= 1;
        if self.left > 0 {
            return None;
        }
        let done = self.done.take()?;
        let res = match (self.ok_healthy, self.err.take()) {
            (0, Some(e)) => Err(e),
            (n, _) => Ok(n),
        };
        Some((done, res))
    }
}

struct WriteAgg {
    left: usize,
    results: Vec<(usize, BlockResult)>,
    done: Option<Completion>,
}

impl MirrorHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Number of children.
    pub fn children(&self) -> usize {
        self.inner.children.len()
    }

    /// The status of every child, in order.
    pub fn status(&self) -> Vec<ChildStatus> {
        let st = self.lock();
        st.children
            .iter()
            .enumerate()
            .map(|(i, k)| ChildStatus {
                state: k.state,
                outstanding: k.outstanding,
                reads: k.reads,
                writes: k.writes,
                errors: k.errors,
                dirty_regions: st.dirty.count(i),
            })
            .collect()
    }

    /// Bytes per bitmap region.
    pub fn region_size(&self) -> u64 {
        self.inner.opts.region_size
    }

    /// Take child `child` out by hand: it gets no more reads or writes, and
    /// the regions written from now on are dirty for it.
    pub fn fail_child(&self, child: usize) -> Result<(), MirrorError> {
        let ev = {
            let mut st = self.lock();
            let state = st
                .children
                .get(child)
                .ok_or(MirrorError::NoSuchChild(child))?
                .state;
            if state == ChildState::Failed {
                return Ok(());
            }
            let healthy = st
                .children
                .iter()
                .filter(|k| k.state == ChildState::Healthy)
                .count();
            if state == ChildState::Healthy && healthy <= 1 {
                return Err(MirrorError::LastHealthy(child));
            }
            self.inner.take_out(&mut st, child, "by request")
        };
        if let Some(ev) = ev {
            self.inner.emit(ev);
        }
        Ok(())
    }

    /// Bring a failed child back: it receives writes at once and a resync
    /// thread copies its dirty regions from a healthy child; it becomes
    /// healthy when the copy is done. One resync runs at a time.
    pub fn return_child(&self, child: usize) -> Result<(), MirrorError> {
        let regions = {
            let mut st = self.lock();
            let state = st
                .children
                .get(child)
                .ok_or(MirrorError::NoSuchChild(child))?
                .state;
            if state != ChildState::Failed {
                return Err(MirrorError::WrongState {
                    child,
                    state,
                    op: "return",
                    needs: "failed",
                });
            }
            if st.resync_running {
                let running = st.resync.as_ref().map_or(child, |p| p.child);
                return Err(MirrorError::ResyncRunning(running));
            }
            st.children[child].state = ChildState::Resyncing;
            st.resync_running = true;
            let total = st.dirty.count(child);
            st.resync = Some(ResyncProgress {
                child,
                total_regions: total,
                copied_regions: 0,
                copied_bytes: 0,
                finished: false,
                error: None,
            });
            total
        };
        log::info!("mirror: child {child} returns; resyncing {regions} dirty regions");
        self.inner
            .emit(MirrorEvent::ResyncStarted { child, regions });
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("iovirt-mirror-resync".into())
            .spawn(move || inner.resync(child));
        if let Err(e) = spawned {
            let mut st = self.lock();
            st.children[child].state = ChildState::Failed;
            st.resync_running = false;
            return Err(MirrorError::Thread(e));
        }
        Ok(())
    }

    /// The current or last resync's progress.
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.lock().resync.clone()
    }

    /// Wait until no resync runs or is queued, or `timeout` passes; true if none is left.
    pub fn wait_resync(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.resync_running || !st.queued.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .inner
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    /// Compare the healthy children region by region and report the regions
    /// where any differs from the first. Each region is locked against
    /// writes while it is read, so concurrent guest writes cause no false reports.
    pub fn verify(&self) -> Result<Vec<VerifyMismatch>, MirrorError> {
        let inner = &self.inner;
        let mut out = Vec::new();
        for region in 0..inner.regions {
            let healthy: Vec<usize> = {
                let st = self.lock();
                (0..st.children.len())
                    .filter(|&c| st.children[c].state == ChildState::Healthy)
                    .collect()
            };
            if healthy.len() < 2 {
                break;
            }
            let (start, len) = inner.region_bounds(region);
            inner.lock_region(region);
            let mut contents = Vec::with_capacity(healthy.len());
            let mut failure = None;
            for &c in &healthy {
                let read = Scratch::read_request(len, start).and_then(|(s, req)| {
                    submit_wait(&*inner.children[c], req).map(|()| s.to_vec())
                });
                match read {
                    Ok(v) => contents.push((c, v)),
                    Err(source) => {
                        failure = Some(MirrorError::Verify {
                            child: c,
                            offset: start,
                            source,
                        });
                        break;
                    }
                }
            }
            inner.unlock_region(region);
            if let Some(e) = failure {
                return Err(e);
            }
            if let Some(((_, first), rest)) = contents.split_first() {
                let differing: Vec<usize> = rest
                    .iter()
                    .filter(|(_, v)| v != first)
                    .map(|(c, _)| *c)
                    .collect();
                if !differing.is_empty() {
                    log::warn!(
                        "mirror verify: region at byte {start} differs on children {differing:?}"
                    );
                    out.push(VerifyMismatch {
                        offset: start,
                        len: len as u64,
                        differing,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Call `hook` for every [`MirrorEvent`] from now on (replacing an
    /// earlier hook). It runs on whatever thread the event happens on and
    /// must not call back into the mirror's I/O path.
    pub fn set_event_hook(&self, hook: impl Fn(&MirrorEvent) + Send + Sync + 'static) {
        *self.inner.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(hook));
    }
}
