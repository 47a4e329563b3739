//! Live storage migration: move a disk the guest is using to a new back-end.
//!
//! [`Migration`] is a filter over the disk's current back-end (the *source*).
//! Until a migration starts it passes every request through. [`MigrationHandle::start`]
//! takes a *target* of the same capacity and starts a background thread that
//! copies the disk to it chunk by chunk while guest I/O keeps going to the source:
//!
//! - **Tracking.** A dirty bitmap has one bit per chunk, all set at the start.
//!   Every write, discard and write-zeroes that *completes* on the source while a
//!   migration runs sets the bits of its chunks again (before the guest sees the
//!   completion, whatever its result). The copier *clears* a chunk's bit before it
//!   reads the chunk from the source. So a guest write to a chunk under copy is
//!   either already on the source when the copier reads it (and copied), or
//!   completes after the bit was cleared (and sets it again, so the chunk is
//!   copied once more). No write is lost, and guest writes never wait for the
//!   copier: there is no region lock on the guest's path.
//! - **Passes.** Each pass copies the chunks dirty at that moment, in disk order.
//!   After a pass, if the dirty bytes are at most
//!   [`MigrationOptions::converge_bytes`], the migration switches. If the dirty
//!   set has not shrunk for [`MigrationOptions::stall_passes`] passes in a row,
//!   or [`MigrationOptions::max_passes`] were made, the guest writes faster than
//!   the copy: the migration ends as [`MigrationState::NotConverged`] and I/O
//!   stays on the source, intact (raise the copy rate, lower the guest's write
//!   rate, e.g. with the scheduler, or retry later).
//! - **Switch.** New requests are held; requests in flight on the source are
//!   waited for (up to [`MigrationOptions::drain_timeout`], else the hold is
//!   released and the copy goes on); the chunks still dirty are copied; the
//!   target is flushed; every request from then on, the held ones first, goes to
//!   the target. The time requests were held is the *pause*
//!   ([`MigrationProgress::pause_us`]); it is the copy of at most
//!   `converge_bytes` plus one flush of the target.
//! - **Cancel.** [`MigrationHandle::cancel`] stops the copy at any point before
//!   the switch completes (held requests are released to the source) and joins
//!   the thread. A failed copy or flush ends the same way, as
//!   [`MigrationState::Failed`]. The source is never written by the migration.
//!
//! Reads and flushes go to the source until the switch and to the target after
//! it (the switch itself flushes the target, so writes acknowledged before the
//! switch are durable there). After a switch the target is the filter's back-end,
//! and a later [`MigrationHandle::start`] migrates away from it.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use iovirt_backend::{submit_wait, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::migrate::{Migration, MigrationOptions, MigrationState};
//!
//! let source = Arc::new(Inline(MemoryBackend::from_vec(vec![7; 1 << 20])));
//! let target = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let disk = Migration::new(source, MigrationOptions::default())?;
//! let ctl = disk.handle();
//! ctl.start(target.clone())?;
//! // Guest I/O goes on meanwhile.
//! submit_wait(&disk, Request::Write { offset: 0, buf: IoBuffers::from_vec(vec![1; 512]), fua: false })?;
//! let p = ctl.wait(Duration::from_secs(10));
//! assert_eq!(p.state, MigrationState::Switched);
//! assert_eq!(target.0.contents()[0], 1);
//! assert_eq!(target.0.contents()[512], 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, BlockInfo, Completion, Direction, Features, IoBuffers,
    Request,
};
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Tuning of a migration.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Bytes per copy chunk and dirty-bitmap bit (a positive multiple of the
    /// logical block size; default 1 MiB).
    pub chunk_size: u64,
    /// Switch once a pass leaves at most this many dirty bytes (default 8 MiB).
    /// The switch pause is the time to copy this much plus one target flush.
    pub converge_bytes: u64,
    /// Give up (not converged) after this many passes (default 30).
    pub max_passes: u32,
    /// Give up (not converged) after this many passes in a row that did not
    /// shrink the dirty set (default 3).
    pub stall_passes: u32,
    /// Cap on the copy rate in bytes per second, to spare the guest's I/O
    /// (default: none).
    pub max_rate: Option<u64>,
    /// How long the switch waits for requests in flight on the source before it
    /// releases the held requests and goes on copying (default 1 s).
    pub drain_timeout: Duration,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            chunk_size: 1 << 20,
            converge_bytes: 8 << 20,
            max_passes: 30,
            stall_passes: 3,
            max_rate: None,
            drain_timeout: Duration::from_secs(1),
        }
    }
}

/// Why a migration could not be set up or started.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The chunk size is zero or not whole logical blocks.
    #[error("migration chunk size {chunk_size} is not a positive multiple of the {block_size}-byte block")]
    ChunkSize {
        /// The configured chunk size.
        chunk_size: u64,
        /// The source's logical block size.
        block_size: u32,
    },
    /// The target cannot stand in for the source.
    #[error("migration target is incompatible with the source: {0}")]
    Incompatible(String),
    /// A migration is already running on this disk.
    #[error("a migration is already running")]
    AlreadyRunning,
    /// The copy thread could not be started.
    #[error("cannot start the migration thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// No migration was started.
    Idle,
    /// Copying passes run; guest I/O goes to the source.
    Copying,
    /// Guest requests are held while the last dirty chunks are copied.
    Switching,
    /// Done: all I/O goes to the target.
    Switched,
    /// Canceled: all I/O stays on the source.
    Cancelled,
    /// A copy or flush failed ([`MigrationProgress::error`]): I/O stays on the source.
    Failed,
    /// The guest wrote faster than the copy: I/O stays on the source.
    NotConverged,
}

impl MigrationState {
    /// Whether the migration has ended (or never started).
    pub fn is_final(self) -> bool {
        !matches!(self, MigrationState::Copying | MigrationState::Switching)
    }
}

/// A snapshot of a migration's progress: what a control socket reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrationProgress {
    /// Where the migration is.
    pub state: MigrationState,
    /// The current (or last) pass, from 1.
    pub pass: u32,
    /// Disk size in bytes.
    pub total_bytes: u64,
    /// Bytes copied so far, recopies included.
    pub copied_bytes: u64,
    /// Bytes marked dirty now (still to copy before the switch).
    pub dirty_bytes: u64,
    /// Bytes the current pass still has to copy (the first pass: the rest of the disk).
    pub remaining_bytes: u64,
    /// Average copy rate since the start, in bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Milliseconds since the start.
    pub elapsed_ms: u64,
    /// How long guest requests were held by the switch, in microseconds (once switched).
    pub pause_us: Option<u64>,
    /// Why the migration failed or did not converge.
    pub error: Option<String>,
}

/// One bit per chunk.
#[derive(Debug)]
struct Dirty {
    bits: Vec<u64>,
    count: u64,
    chunks: u64,
}

impl Dirty {
    fn full(chunks: u64) -> Self {
        let words = chunks.div_ceil(64) as usize;
        let mut d = Dirty {
            bits: vec![0; words],
            count: 0,
            chunks,
        };
        d.set_range(0..chunks);
        d
    }

    fn set_range(&mut self, r: Range<u64>) {
        for c in r.start..r.end.min(self.chunks) {
            if let Some(w) = self.bits.get_mut((c / 64) as usize) {
                let m = 1u64 << (c % 64);
                if *w & m == 0 {
                    *w |= m;
                    self.count += 1;
                }
            }
        }
    }

    fn is_set(&self, c: u64) -> bool {
        self.bits
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1u64 << (c % 64)) != 0)
    }

    /// The first dirty chunk at or after `from`, cleared.
    fn take_next(&mut self, from: u64) -> Option<u64> {
        let mut wi = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while let Some(w) = self.bits.get_mut(wi) {
            let hit = *w & mask;
            if hit != 0 {
                let bit = hit.trailing_zeros();
                *w &= !(1u64 << bit);
                self.count -= 1;
                return Some(wi as u64 * 64 + u64::from(bit));
            }
            wi += 1;
            mask = !0;
        }
        None
    }

    /// Dirty chunks at or after `from`.
    fn count_from(&self, from: u64) -> u64 {
        (from..self.chunks).filter(|&c| self.is_set(c)).count() as u64
    }
}

type Held = (Request, Completion);

struct State {
    /// Where requests go (the source, or the target once switched).
    active: Arc<dyn BlockBackend>,
    /// Set while a migration copies: write completions mark chunks here.
    dirty: Option<Dirty>,
    /// Requests held by the switch.
    holding: bool,
    held: VecDeque<Held>,
    /// Guest requests submitted to `active` and not yet completed.
    in_flight: u64,
    cancel: bool,
    thread: Option<thread::JoinHandle<()>>,
    // Progress.
    state: MigrationState,
    pass: u32,
    copied: u64,
    pass_pos: u64,
    started: Option<Instant>,
    ended: Option<Instant>,
    pause: Option<Duration>,
    error: Option<String>,
}

struct Shared {
    info: BlockInfo,
    opts: MigrationOptions,
    state: Mutex<State>,
    cv: Condvar,
}

/// The migration filter: a block back-end over the disk's current back-end
/// that can move it to another one while in use (see the [module docs](self)).
pub struct Migration {
    shared: Arc<Shared>,
}

/// The run-time control of a [`Migration`]: start, watch, wait for and cancel.
/// `Clone + Send + Sync`.
#[derive(Clone)]
pub struct MigrationHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("info", &self.shared.info)
            .finish()
    }
}

impl std::fmt::Debug for MigrationHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationHandle").finish()
    }
}

/// The features a target must have because the filter advertises them.
const NEEDED: Features = Features::DISCARD
    .union(Features::WRITE_ZEROES)
    .union(Features::FUA);

impl Migration {
    /// A filter over `source`, passing everything through until a migration starts.
    pub fn new(
        source: Arc<dyn BlockBackend>,
        opts: MigrationOptions,
    ) -> Result<Self, MigrationError> {
        let info = source.info();
        let bs = u64::from(info.logical_block_size.max(1));
        if opts.chunk_size == 0 || opts.chunk_size % bs != 0 {
            return Err(MigrationError::ChunkSize {
                chunk_size: opts.chunk_size,
                block_size: info.logical_block_size,
            });
        }
        Ok(Migration {
            shared: Arc::new(Shared {
                info,
                opts,
                state: Mutex::new(State {
                    active: source,
                    dirty: None,
                    holding: false,
                    held: VecDeque::new(),
                    in_flight: 0,
                    cancel: false,
                    thread: None,
                    state: MigrationState::Idle,
                    pass: 0,
                    copied: 0,
                    pass_pos: 0,
                    started: None,
                    ended: None,
                    pause: None,
                    error: None,
                }),
                cv: Condvar::new(),
            }),
        })
    }

    /// The run-time control.
    pub fn handle(&self) -> MigrationHandle {
        MigrationHandle {
            shared: self.shared.clone(),
        }
    }

    /// The back-end requests go to now (the source, or the target once switched).
    pub fn active(&self) -> Arc<dyn BlockBackend> {
        self.shared.lock().active.clone()
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        self.handle().cancel();
    }
}

impl BlockBackend for Migration {
    fn info(&self) -> BlockInfo {
        self.shared.info
    }

    fn submit(&self, req: Request, done: Completion) {
        if let Err(e) = self.shared.info.check(&req) {
            return done.complete(Err(e));
        }
        Shared::route(&self.shared, req, done);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chunks(&self) -> u64 {
        self.info.capacity.div_ceil(self.opts.chunk_size)
    }

    /// Chunks a request changes (empty for reads and flushes).
    fn chunks_of(&self, req: &Request) -> Range<u64> {
        let (offset, len) = match req {
            Request::Write { offset, buf, .. } => (*offset, buf.len() as u64),
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                (*offset, *len)
            }
            Request::Read { .. } | Request::Flush => return 0..0,
        };
        if len == 0 {
            return 0..0;
        }
        let cs = self.opts.chunk_size;
        offset / cs..offset.saturating_add(len).div_ceil(cs)
    }

    /// Send a checked request where it goes now: held, or to the active back-end.
    fn route(me: &Arc<Self>, req: Request, done: Completion) {
        let mut st = me.lock();
        if st.holding {
            st.held.push_back((req, done));
            return;
        }
        let be = st.active.clone();
        st.in_flight += 1;
        drop(st);
        let chunks = me.chunks_of(&req);
        let sh = me.clone();
        be.submit(
            req,
            Completion::new(move |r| {
                {
                    let mut st = sh.lock();
                    // Whatever the result: a failed write may have changed the source.
                    if let Some(d) = st.dirty.as_mut() {
                        d.set_range(chunks);
                    }
                    st.in_flight -= 1;
                }
                sh.cv.notify_all();
                done.complete(r)
            }),
        );
    }

    /// Stop holding: the held requests go to the active back-end.
    fn release(me: &Arc<Self>, mut st: MutexGuard<'_, State>) {
        st.holding = false;
        let held: Vec<Held> = st.held.drain(..).collect();
        drop(st);
        me.cv.notify_all();
        for (req, done) in held {
            Shared::route(me, req, done);
        }
    }

    /// Copy chunk `c` from `source` to `target` through `scratch`; returns its length.
    fn copy_chunk(
        &self,
        scratch: &Scratch,
        source: &dyn BlockBackend,
        target: &dyn BlockBackend,
        c: u64,
    ) -> Result<u64, String> {
        let offset = c.saturating_mul(self.opts.chunk_size);
        let len = self
            .opts
            .chunk_size
            .min(self.info.capacity.saturating_sub(offset));
        let buf = scratch
            .buffers(len as usize, Direction::DeviceWrites)
            .map_err(|e| e.to_string())?;
        submit_wait(source, Request::Read { offset, buf })
            .map_err(|e| format!("reading the source at byte {offset}: {e}"))?;
        let buf = scratch
            .buffers(len as usize, Direction::DeviceReads)
            .map_err(|e| e.to_string())?;
        submit_wait(
            target,
            Request::Write {
                offset,
                buf,
                fua: false,
            },
        )
        .map_err(|e| format!("writing the target at byte {offset}: {e}"))?;
        Ok(len)
    }

    /// Bytes of the dirty chunks at or after chunk `from`.
    fn dirty_bytes(&self, d: &Dirty, from: u64) -> u64 {
        let n = d.count_from(from);
        let cs = self.opts.chunk_size;
        let mut bytes = n.saturating_mul(cs);
        let last = d.chunks.saturating_sub(1);
        if last >= from && d.is_set(last) {
            bytes = bytes.saturating_sub(
                cs.saturating_mul(d.chunks)
                    .saturating_sub(self.info.capacity),
            );
        }
        bytes
    }

    fn progress(&self) -> MigrationProgress {
        let st = self.lock();
        let (dirty_bytes, remaining_bytes) = match &st.dirty {
            Some(d) => (self.dirty_bytes(d, 0), self.dirty_bytes(d, st.pass_pos)),
            None => (0, 0),
        };
        let elapsed = match (st.started, st.ended) {
            (Some(s), Some(e)) => e.duration_since(s),
            (Some(s), None) => s.elapsed(),
            _ => Duration::ZERO,
        };
        let secs = elapsed.as_secs_f64();
        MigrationProgress {
            state: st.state,
            pass: st.pass,
            total_bytes: self.info.capacity,
            copied_bytes: st.copied,
            dirty_bytes,
            remaining_bytes,
            rate_bytes_per_sec: if secs > 0.0 {
                (st.copied as f64 / secs) as u64
            } else {
                0
            },
            elapsed_ms: elapsed.as_millis() as u64,
            pause_us: st.pause.map(|p| p.as_micros() as u64),
            error: st.error.clone(),
        }
    }

    /// Wait, for the copy-rate cap, until `copied` bytes may have been copied
    /// since `t0`. Returns false if canceled meanwhile.
    fn pace(&self, t0: Instant, copied: u64) -> bool {
        let Some(rate) = self.opts.max_rate.filter(|&r| r > 0) else {
            return !self.lock().cancel;
        };
        let due = t0 + Duration::from_secs_f64(copied as f64 / rate as f64);
        let mut st = self.lock();
        loop {
            if st.cancel {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            st = self
                .cv
                .wait_timeout(st, due - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// End the migration in `state`; I/O stays where it is (the source unless switched).
    fn finish(&self, mut st: MutexGuard<'_, State>, state: MigrationState, error: Option<String>) {
        if let Some(e) = &error {
            log::warn!("migration: {e}");
        }
        st.dirty = None;
        st.state = state;
        st.error = error;
        st.ended = Some(Instant::now());
        drop(st);
        self.cv.notify_all();
    }

    /// The copy thread.
    fn run(me: Arc<Self>, source: Arc<dyn BlockBackend>, target: Arc<dyn BlockBackend>) {
        let scratch = match Scratch::new(me.opts.chunk_size as usize) {
            Ok(s) => s,
            Err(e) => return me.finish(me.lock(), MigrationState::Failed, Some(e)),
        };
        let t0 = Instant::now();
        let mut copied_here = 0u64;
        let mut prev_dirty = u64::MAX;
        let mut stalls = 0u32;
        let mut pass = 0u32;
        loop {
            pass += 1;
            me.lock().pass = pass;
            let mut next = 0u64;
            loop {
                let c = {
                    let mut st = me.lock();
                    if st.cancel {
                        return me.finish(st, MigrationState::Cancelled, None);
                    }
                    let c = st.dirty.as_mut().and_then(|d| d.take_next(next));
                    if let Some(c) = c {
                        st.pass_pos = c + 1;
                    }
                    c
                };
                let Some(c) = c else { break };
                match me.copy_chunk(&scratch, &*source, &*target, c) {
                    Ok(n) => {
                        copied_here += n;
                        me.lock().copied += n;
                    }
                    Err(e) => return me.finish(me.lock(), MigrationState::Failed, Some(e)),
                }
                if !me.pace(t0, copied_here) {
                    return me.finish(me.lock(), MigrationState::Cancelled, None);
                }
                next = c + 1;
            }
            let dirty = {
                let mut st = me.lock();
                st.pass_pos = 0;
                st.dirty.as_ref().map_or(0, |d| me.dirty_bytes(d, 0))
            };
            if dirty <= me.opts.converge_bytes {
                match Shared::switch(&me, &scratch, &source, &target) {
                    Switch::Done => return,
                    Switch::Retry => {}
                }
            }
            stalls = if dirty >= prev_dirty { stalls + 1 } else { 0 };
            prev_dirty = dirty;
            if stalls >= me.opts.stall_passes.max(1) || pass >= me.opts.max_passes.max(1) {
                let why = format!(
                    "not converging: {dirty} bytes still dirty after pass {pass} (threshold {})",
                    me.opts.converge_bytes
                );
                return me.finish(me.lock(), MigrationState::NotConverged, Some(why));
            }
        }
    }

    /// Hold new requests, drain, copy the rest, flush the target and switch.
    fn switch(
        me: &Arc<Self>,
        scratch: &Scratch,
        source: &Arc<dyn BlockBackend>,
        target: &Arc<dyn BlockBackend>,
    ) -> Switch {
        let t0 = Instant::now();
        let mut st = me.lock();
        st.holding = true;
        st.state = MigrationState::Switching;
        let deadline = t0 + me.opts.drain_timeout;
        while st.in_flight > 0 && !st.cancel {
            let now = Instant::now();
            if now >= deadline {
                log::info!(
                    "migration: {} requests still in flight after {:?}; copying on",
                    st.in_flight,
                    me.opts.drain_timeout
                );
                st.state = MigrationState::Copying;
                Shared::release(me, st);
                return Switch::Retry;
            }
            st = me
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        // Nothing reaches the source now: the dirty set is final.
        loop {
            if st.cancel {
                Shared::release(me, st);
                me.finish(me.lock(), MigrationState::Cancelled, None);
                return Switch::Done;
            }
            let Some(c) = st.dirty.as_mut().and_then(|d| d.take_next(0)) else {
                break;
            };
            drop(st);
            let r = me.copy_chunk(scratch, &**source, &**target, c);
            st = me.lock();
            match r {
                Ok(n) => st.copied += n,
                Err(e) => {
                    Shared::release(me, st);
                    me.finish(me.lock(), MigrationState::Failed, Some(e));
                    return Switch::Done;
                }
            }
        }
        drop(st);
        let flushed = submit_wait(&**target, Request::Flush);
        let mut st = me.lock();
        if let Err(e) = flushed {
            Shared::release(me, st);
            let why = format!("flushing the target: {e}");
            me.finish(me.lock(), MigrationState::Failed, Some(why));
            return Switch::Done;
        }
        st.active = target.clone();
        st.dirty = None;
        st.state = MigrationState::Switched;
        st.ended = Some(Instant::now());
        let pause = t0.elapsed();
        st.pause = Some(pause);
        log::info!(
            "migration: switched to the target after pass {} ({} bytes copied), pause {pause:?}",
            st.pass,
            st.copied
        );
        Shared::release(me, st);
        Switch::Done
    }
}

enum Switch {
    Done,
    Retry,
}

/// A host buffer reachable as guest memory, reused for every chunk.
struct Scratch {
    mem: Arc<GuestMemoryMmap<()>>,
}

impl Scratch {
    fn new(len: usize) -> Result<Self, String> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len.max(1))])
            .map_err(|e| format!("migration scratch buffer: {e}"))?;
        Ok(Scratch { mem: Arc::new(mem) })
    }

    fn buffers(&self, len: usize, dir: Direction) -> Result<IoBuffers, BlockError> {
        IoBuffers::from_guest(self.mem.clone(), &[(GuestAddress(0), len)], dir)
    }
}

impl MigrationHandle {
    /// Start migrating to `target` (same capacity; a logical block no larger
    /// than the source's; the discard, write-zeroes and FUA support the filter
    /// advertises; no volatile cache unless the filter advertises one; writable).
    pub fn start(&self, target: Arc<dyn BlockBackend>) -> Result<(), MigrationError> {
        let me = &self.shared;
        let ti = target.info();
        let si = me.info;
        if ti.capacity != si.capacity {
            return Err(MigrationError::Incompatible(format!(
                "capacity {} bytes, the source has {}",
                ti.capacity, si.capacity
            )));
        }
        if ti.logical_block_size > si.logical_block_size {
            return Err(MigrationError::Incompatible(format!(
                "logical block of {} bytes, the source's is {}",
                ti.logical_block_size, si.logical_block_size
            )));
        }
        if ti.features.contains(Features::READ_ONLY) {
            return Err(MigrationError::Incompatible("read-only".into()));
        }
        let missing = (si.features & NEEDED).difference(ti.features);
        if !missing.is_empty() {
            return Err(MigrationError::Incompatible(format!("lacks {missing:?}")));
        }
        if ti.features.contains(Features::VOLATILE_CACHE)
            && !si.features.contains(Features::VOLATILE_CACHE)
        {
            return Err(MigrationError::Incompatible(
                "has a volatile cache, and the guest was told there is none".into(),
            ));
        }
        let mut st = me.lock();
        if !st.state.is_final() {
            return Err(MigrationError::AlreadyRunning);
        }
        // Join a previous copy thread (it has ended).
        if let Some(h) = st.thread.take() {
            drop(st);
            let _ = h.join();
            st = me.lock();
        }
        let source = st.active.clone();
        st.dirty = Some(Dirty::full(me.chunks()));
        st.cancel = false;
        st.state = MigrationState::Copying;
        st.pass = 0;
        st.copied = 0;
        st.pass_pos = 0;
        st.started = Some(Instant::now());
        st.ended = None;
        st.pause = None;
        st.error = None;
        let sh = me.clone();
        let spawned = thread::Builder::new()
            .name("iovirt-migrate".into())
            .spawn(move || Shared::run(sh, source, target));
        match spawned {
            Ok(h) => {
                st.thread = Some(h);
                Ok(())
            }
            Err(e) => {
                st.dirty = None;
                st.state = MigrationState::Failed;
                st.error = Some(format!("cannot start the migration thread: {e}"));
                Err(MigrationError::Spawn(e))
            }
        }
    }

    /// A snapshot of the progress.
    pub fn progress(&self) -> MigrationProgress {
        self.shared.progress()
    }

    /// Cancel a running migration (I/O stays on the source) and wait for its
    /// thread to exit; returns the final progress. A migration that has already
    /// ended is left as it is.
    pub fn cancel(&self) -> MigrationProgress {
        let h = {
            let mut st = self.shared.lock();
            if !st.state.is_final() {
                st.cancel = true;
            }
            st.thread.take()
        };
        self.shared.cv.notify_all();
        if let Some(h) = h {
            if h.thread().id() != thread::current().id() {
                let _ = h.join();
            }
        }
        self.progress()
    }

    /// Wait until the migration ends or `timeout` passes; returns the progress then.
    pub fn wait(&self, timeout: Duration) -> MigrationProgress {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while !st.state.is_final() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        drop(st);
        self.progress()
    }

    /// Whether the copy thread is still running.
    pub fn is_running(&self) -> bool {
        self.shared
            .lock()
            .thread
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }
}
