//! Fault injection: a filter that fails, stalls, slows, tears or rate-limits
//! chosen requests, and can cut the power.
//!
//! [`FaultFilter`] wraps any back-end. Its [`Rule`]s select requests by
//! operation, byte range, match count (`after`, `count`) and a seeded
//! probability, and [`Action`]s say what happens to them:
//!
//! - **fail**: complete with a chosen error (its [`iovirt_backend::DeviceStatus`] kept)
//!   without reaching the child;
//! - **stall**: reach the child, then hold the completion until the test
//!   releases it through the [`FaultHandle`], or for a duration;
//! - **slow**: reach the child only after a delay;
//! - **tear**: pass only a write's first N sectors to the child, then fail or
//!   crash (a power cut with those sectors on stable storage);
//! - **rate-limit**: pace requests to an IOPS and/or bytes-per-second cap.
//!
//! With [`FaultOptions::track_writes`], the filter keeps, for every sector
//! written since its last durable point, the content of that point and each
//! write since (it reads a range from the child before passing a write on,
//! and passes one write at a time). [`FaultHandle::power_cut`] then puts back
//! the content covered by completed flushes: a write survives if it completed
//! with FUA, or completed before a flush was submitted and that flush
//! completed. Writes still in flight, completed after the flush was submitted,
//! or whose completion is stalled are rolled back, sector by sector. Every
//! request fails from the cut until [`FaultHandle::power_restore`]. Because it
//! can lose completed writes, a tracking filter advertises
//! [`Features::VOLATILE_CACHE`], so front-ends above it send flushes.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{submit_wait, BlockError, DeviceStatus, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::fault::{FaultFilter, FaultOptions, InjectedError, Op, Rule, Selector};
//!
//! let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let filter = FaultFilter::with_options(disk.clone(), FaultOptions { seed: 1, track_writes: true });
//! let ctl = filter.handle();
//! // The second write to the first MiB fails with an I/O error.
//! ctl.add_rule(Rule::fail(Selector::op(Op::Write).range(0..1 << 20).after(1).count(1), InjectedError::Io));
//! let write = |b: u8| Request::Write { offset: 0, buf: IoBuffers::from_vec(vec![b; 512]), fua: false };
//! submit_wait(&filter, write(1))?;
//! let err = submit_wait(&filter, write(2)).unwrap_err();
//! assert_eq!(err.status(), DeviceStatus::IoError);
//! submit_wait(&filter, Request::Flush)?; // write(1) is now durable
//! submit_wait(&filter, write(3))?;       // not flushed
//! ctl.power_cut()?;
//! assert!(submit_wait(&filter, write(4)).is_err());
//! assert_eq!(disk.0.contents()[0], 1);   // back to the last flushed state
//! ctl.power_restore();
//! assert_eq!(ctl.stats().op(Op::Write).injected, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod rule;
mod timer;
mod track;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, BlockInfo, BlockResult, Completion, Features, IoBuffers,
    Request,
};

pub use rule::{Action, InjectedError, Op, Rule, RuleId, Selector, TearThen};

use rule::RuleState;
use timer::Timer;
use track::{Scratch, Tracker, WriteState};

/// Options of a [`FaultFilter`] fixed at creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultOptions {
    /// Seed of the probability coins: the same seed and the same request
    /// sequence select the same requests.
    pub seed: u64,
    /// Track writes so [`FaultHandle::power_cut`] can roll back what no
    /// completed flush covers. Costs a read of each written range and
    /// serialises writes; off by default.
    pub track_writes: bool,
}

/// Per-operation counters of a fault filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Requests submitted.
    pub seen: u64,
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests completed with an error (injected, from the child, or power cut).
    pub failed: u64,
    /// Errors injected by fail and tear rules.
    pub injected: u64,
    /// Completions held by stall rules.
    pub stalled: u64,
    /// Requests delayed by slow and rate-limit rules.
    pub delayed: u64,
    /// Writes torn.
    pub torn: u64,
}

impl OpStats {
    fn add(&mut self, o: &OpStats) {
        self.seen += o.seen;
        self.completed += o.completed;
        self.failed += o.failed;
        self.injected += o.injected;
        self.stalled += o.stalled;
        self.delayed += o.delayed;
        self.torn += o.torn;
    }
}

/// Counters of a fault filter, per operation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    ops: [OpStats; 5],
    /// Power cuts so far.
    pub power_cuts: u64,
}

impl FaultStats {
    /// The counters of one operation.
    pub fn op(&self, op: Op) -> OpStats {
        self.ops[op.index()]
    }

    /// The counters summed over all operations.
    pub fn total(&self) -> OpStats {
        let mut t = OpStats::default();
        for o in &self.ops {
            t.add(o);
        }
        t
    }
}

/// What a power cut did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Sectors put back to an older content.
    pub rolled_back_sectors: u64,
    /// Bytes written back to the child (tracked sectors, rolled back or not).
    pub restored_bytes: u64,
    /// Requests that were queued, in flight or stalled and failed because of the cut.
    pub failed_requests: u64,
}

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FaultControlError {
    /// The filter was created without [`FaultOptions::track_writes`].
    #[error("power cut needs a fault filter that tracks writes (track-writes = true)")]
    NotTracking,
    /// Writing the last flushed state back to the child failed.
    #[error("power cut: restoring the last flushed state at byte {offset} failed: {source}")]
    Restore {
        /// First byte of the range being restored.
        offset: u64,
        /// The child's error.
        #[source]
        source: BlockError,
    },
}

/// The error of every request failed by a power cut.
fn power_cut_error() -> BlockError {
    BlockError::Io(std::io::Error::other("power cut (fault injection)"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hold {
    No,
    Release,
    For(Duration),
}

/// A request on its way: what its completion needs.
struct Ctx {
    op: Op,
    epoch: u64,
    write: Option<Arc<WriteState>>,
    flush_mark: Option<u64>,
    hold: Hold,
    done: Completion,
}

struct WriteJob {
    req: Request,
    ctx: Ctx,
    then: Option<TearThen>,
}

struct Held {
    ctx: Ctx,
    result: BlockResult,
}

struct State {
    seed: u64,
    rules: Vec<RuleState>,
    next_rule: u64,
    stats: FaultStats,
    stalled: VecDeque<Held>,
    cut: bool,
    epoch: u64,
    inflight: u64,
    tracker: Tracker,
    write_queue: VecDeque<WriteJob>,
    write_busy: bool,
}

struct Shared {
    child: Arc<dyn BlockBackend>,
    track: bool,
    st: Mutex<State>,
    cv: Condvar,
    timer: Timer,
}

/// A fault-injection filter over any back-end; see the [module docs](self).
///
/// Cheap to clone handles for control come from [`FaultFilter::handle`].
pub struct FaultFilter {
    shared: Arc<Shared>,
}

/// The runtime control of a [`FaultFilter`]: rules, stalls, statistics and the
/// power. Clones share the filter.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FaultFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultFilter")
            .field("track_writes", &self.shared.track)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FaultHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandle").finish_non_exhaustive()
    }
}

impl FaultFilter {
    /// A filter over `child` with no rules, seed 0, and no write tracking.
    pub fn new(child: Arc<dyn BlockBackend>) -> Self {
        Self::with_options(child, FaultOptions::default())
    }

    /// A filter over `child` with `options`.
    pub fn with_options(child: Arc<dyn BlockBackend>, options: FaultOptions) -> Self {
        let bs = child.info().logical_block_size;
        FaultFilter {
            shared: Arc::new(Shared {
                child,
                track: options.track_writes,
                st: Mutex::new(State {
                    seed: options.seed,
                    rules: Vec::new(),
                    next_rule: 0,
                    stats: FaultStats::default(),
                    stalled: VecDeque::new(),
                    cut: false,
                    epoch: 0,
                    inflight: 0,
                    tracker: Tracker::new(bs),
                    write_queue: VecDeque::new(),
                    write_busy: false,
                }),
                cv: Condvar::new(),
                timer: Timer::default(),
            }),
        }
    }

    /// A control handle.
    pub fn handle(&self) -> FaultHandle {
        FaultHandle {
            shared: self.shared.clone(),
        }
    }
}

impl BlockBackend for FaultFilter {
    fn info(&self) -> BlockInfo {
        self.shared.info()
    }

    fn submit(&self, req: Request, done: Completion) {
        self.shared.submit(req, done)
    }

    // One child: plugging and completion polling pass straight through (a
    // completion polled on the owner's thread runs this filter's part there).
    fn plug(&self) {
        self.shared.child.plug()
    }
    fn unplug(&self) {
        self.shared.child.unplug()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.shared.child.completion_fd()
    }
    fn poll_completions(&self) -> usize {
        self.shared.child.poll_completions()
    }
}

/// The byte range a request covers (none for a flush).
fn span(req: &Request) -> Option<std::ops::Range<u64>> {
    let offset = match req {
        Request::Read { offset, .. }
        | Request::Write { offset, .. }
        | Request::Discard { offset, .. }
        | Request::WriteZeroes { offset, .. } => *offset,
        Request::Flush => return None,
    };
    Some(offset..offset.saturating_add(req.disk_len()))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self) -> BlockInfo {
        let mut info = self.child.info();
        if self.track {
            info.features |= Features::VOLATILE_CACHE;
        }
        info
    }

    fn submit(self: &Arc<Self>, req: Request, done: Completion) {
        let op = Op::of(&req);
        let checked = self.info().check(&req);
        let now = Instant::now();
        let mut st = self.lock();
        st.stats.ops[op.index()].seen += 1;
        let early = if st.cut {
            Some(power_cut_error())
        } else {
            checked.err()
        };
        if let Some(e) = early {
            st.stats.ops[op.index()].failed += 1;
            drop(st);
            done.complete(Err(e));
            return;
        }
        let span = span(&req);
        let len = req.disk_len();
        let mut fail = None;
        let mut tear = None;
        let mut hold = Hold::No;
        let mut go = now;
        for r in st.rules.iter_mut() {
            if !r.select(op, span.clone()) {
                continue;
            }
            match &r.rule.action {
                Action::Fail(e) if fail.is_none() && tear.is_none() => {
                    fail = Some(e.to_block_error(op))
                }
                Action::Fail(_) => {}
                Action::Stall(None) => hold = Hold::Release,
                Action::Stall(Some(d)) => {
                    hold = match hold {
                        Hold::Release => Hold::Release,
                        Hold::For(t) => Hold::For(t.max(*d)),
                        Hold::No => Hold::For(*d),
                    }
                }
                Action::Slow(d) => go += *d,
                Action::Tear { sectors, then } => {
                    if op == Op::Write && fail.is_none() && tear.is_none() {
                        tear = Some((*sectors, then.clone()));
                    }
                }
                Action::RateLimit { .. } => go = go.max(r.pace(now, len)),
            }
        }
        let stats = &mut st.stats.ops[op.index()];
        if fail.is_some() {
            stats.injected += 1;
        }
        if tear.is_some() {
            stats.torn += 1;
        }
        if go > now {
            stats.delayed += 1;
        }
        let ctx = Ctx {
            op,
            epoch: st.epoch,
            write: None,
            flush_mark: None,
            hold,
            done,
        };
        drop(st);
        if go > now {
            let me = self.clone();
            self.timer
                .schedule(go, move || me.dispatch(req, ctx, fail, tear));
        } else {
            self.dispatch(req, ctx, fail, tear);
        }
    }

    /// Pass a request on (after any delay), failing or tearing it as decided.
    fn dispatch(
        self: &Arc<Self>,
        req: Request,
        mut ctx: Ctx,
        fail: Option<BlockError>,
        tear: Option<(u64, TearThen)>,
    ) {
        if let Some(e) = fail {
            self.finish(ctx, Err(e));
            return;
        }
        let (req, then) = match (req, tear) {
            (Request::Write { offset, buf, fua }, Some((sectors, then))) => {
                let bs = u64::from(self.child.info().logical_block_size.max(1));
                let keep = sectors.saturating_mul(bs).min(buf.len() as u64) as usize;
                let mut data = vec![0u8; keep];
                buf.copy_to_slice_at(0, &mut data);
                drop(buf);
                if keep == 0 {
                    self.after_write(ctx, Some(then), Ok(()));
                    return;
                }
                (
                    Request::Write {
                        offset,
                        buf: IoBuffers::from_vec(data),
                        fua,
                    },
                    Some(then),
                )
            }
            (req, _) => (req, None),
        };
        match Op::of(&req) {
            Op::Write | Op::Discard | Op::WriteZeroes if self.track => {
                self.enqueue_write(WriteJob { req, ctx, then })
            }
            Op::Flush => {
                if self.track {
                    ctx.flush_mark = Some(self.lock().tracker.flush_mark());
                }
                let me = self.clone();
                let epoch = ctx.epoch;
                self.child_submit(epoch, req, move |r| me.finish(ctx, r));
            }
            _ => {
                let me = self.clone();
                let epoch = ctx.epoch;
                self.child_submit(epoch, req, move |r| me.after_write(ctx, then, r));
            }
        }
    }

    /// Submit to the child unless the power is cut (or was, since `epoch`),
    /// counting the request in flight until `f` has run.
    fn child_submit(
        self: &Arc<Self>,
        epoch: u64,
        req: Request,
        f: impl FnOnce(BlockResult) + Send + 'static,
    ) {
        {
            let mut st = self.lock();
            if st.cut || st.epoch != epoch {
                drop(st);
                f(Err(power_cut_error()));
                return;
            }
            st.inflight += 1;
        }
        let me = self.clone();
        self.child.submit(
            req,
            Completion::new(move |r| {
                f(r);
                let mut st = me.lock();
                st.inflight -= 1;
                if st.inflight == 0 {
                    me.cv.notify_all();
                }
            }),
        );
    }

    /// Tracking: queue a write-like request; one runs at a time.
    fn enqueue_write(self: &Arc<Self>, job: WriteJob) {
        let mut st = self.lock();
        if st.write_busy {
            st.write_queue.push_back(job);
            return;
        }
        st.write_busy = true;
        drop(st);
        self.run_write(job);
    }

    /// Tracking: the running write is done with the child; start the next.
    fn write_done(self: &Arc<Self>) {
        let mut st = self.lock();
        let next = if st.cut {
            None
        } else {
            st.write_queue.pop_front()
        };
        st.write_busy = next.is_some();
        drop(st);
        if let Some(job) = next {
            self.run_write(job);
        }
    }

    /// Tracking: read the range's current content, record the write, pass it on.
    fn run_write(self: &Arc<Self>, job: WriteJob) {
        let (offset, len) = match &job.req {
            Request::Write { offset, buf, .. } => (*offset, buf.len()),
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                (*offset, usize::try_from(*len).unwrap_or(usize::MAX))
            }
            _ => (0, 0),
        };
        let scratch = match Scratch::new(len).and_then(|s| s.buffers().map(|b| (s, b))) {
            Ok(sb) => sb,
            Err(e) => {
                self.write_done();
                self.finish(job.ctx, Err(e));
                return;
            }
        };
        let (scratch, bufs) = scratch;
        let me = self.clone();
        let epoch = job.ctx.epoch;
        self.child_submit(epoch, Request::Read { offset, buf: bufs }, move |r| {
            me.after_preread(job, scratch, offset, r)
        });
    }

    fn after_preread(self: &Arc<Self>, job: WriteJob, base: Scratch, offset: u64, r: BlockResult) {
        let WriteJob { req, mut ctx, then } = job;
        if let Err(e) = r {
            self.write_done();
            self.finish(ctx, Err(e));
            return;
        }
        let base = base.to_arc();
        let (req, data, fua, discard) = match req {
            Request::Write { offset, buf, fua } => {
                let data: Arc<[u8]> = buf.to_vec().into();
                drop(buf);
                let copy = IoBuffers::from_vec(data.to_vec());
                (
                    Request::Write {
                        offset,
                        buf: copy,
                        fua,
                    },
                    data,
                    fua,
                    false,
                )
            }
            other => {
                let discard = matches!(other, Request::Discard { .. });
                (other, Arc::from(vec![0u8; base.len()]), false, discard)
            }
        };
        let w = WriteState::new(fua);
        let first = {
            let mut st = self.lock();
            let first = offset / st.tracker.block_size() as u64;
            st.tracker.set_base(first, &base);
            st.tracker.record(&w, first, &data);
            first
        };
        ctx.write = Some(w.clone());
        let me = self.clone();
        let epoch = ctx.epoch;
        let len = base.len();
        self.child_submit(epoch, req, move |r| {
            if !discard {
                me.write_done();
                me.after_write(ctx, then, r);
                return;
            }
            // What a discard leaves is the child's business: read it back.
            let me2 = me.clone();
            let read_back = Scratch::new(len).and_then(|s| s.buffers().map(|b| (s, b)));
            match read_back {
                Ok((scratch, bufs)) => {
                    me.child_submit(epoch, Request::Read { offset, buf: bufs }, move |rr| {
                        if rr.is_ok() {
                            me2.lock().tracker.record(&w, first, &scratch.to_arc());
                        }
                        me2.write_done();
                        me2.after_write(ctx, then, r);
                    })
                }
                Err(_) => {
                    me.write_done();
                    me.after_write(ctx, then, r);
                }
            }
        });
    }

    /// A (possibly torn) write came back from the child.
    fn after_write(self: &Arc<Self>, ctx: Ctx, then: Option<TearThen>, r: BlockResult) {
        match then {
            None => self.finish(ctx, r),
            Some(TearThen::Error(e)) => {
                let e = r.err().unwrap_or_else(|| e.to_block_error(Op::Write));
                self.finish(ctx, Err(e));
            }
            Some(TearThen::Crash) => {
                if let Some(w) = &ctx.write {
                    w.force_durable();
                }
                self.lock().stats.ops[ctx.op.index()].failed += 1;
                let me = self.clone();
                // The cut waits for requests in flight, this one included: not on this thread.
                let crash = move || {
                    if let Err(e) = me.power_cut() {
                        log::warn!("fault filter: crash after a torn write: {e}");
                    }
                    ctx.done.complete(Err(power_cut_error()));
                };
                let job = Arc::new(Mutex::new(Some(crash)));
                let job2 = job.clone();
                let spawned = std::thread::Builder::new()
                    .name("iovirt-fault-crash".into())
                    .spawn(move || {
                        if let Some(f) = job2.lock().unwrap_or_else(|e| e.into_inner()).take() {
                            f()
                        }
                    });
                if spawned.is_err() {
                    if let Some(f) = job.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        f()
                    }
                }
            }
        }
    }

    /// The child is done: hold the completion if a stall rule says so.
    fn finish(self: &Arc<Self>, ctx: Ctx, result: BlockResult) {
        match ctx.hold {
            Hold::No => self.complete(ctx, result),
            Hold::For(d) => {
                let me = self.clone();
                self.timer
                    .schedule(Instant::now() + d, move || me.complete(ctx, result));
            }
            Hold::Release => {
                let mut st = self.lock();
                if st.cut || st.epoch != ctx.epoch {
                    drop(st);
                    self.complete(ctx, result);
                    return;
                }
                st.stats.ops[ctx.op.index()].stalled += 1;
                st.stalled.push_back(Held { ctx, result });
                drop(st);
                self.cv.notify_all();
            }
        }
    }

    /// Complete to the layer above, with the durability bookkeeping.
    fn complete(&self, ctx: Ctx, result: BlockResult) {
        let mut st = self.lock();
        let result = if st.cut || st.epoch != ctx.epoch {
            Err(power_cut_error())
        } else {
            if let Some(w) = &ctx.write {
                st.tracker.completed(w);
            }
            if let (Some(mark), true) = (ctx.flush_mark, result.is_ok()) {
                st.tracker.flushed(mark);
            }
            result
        };
        let stats = &mut st.stats.ops[ctx.op.index()];
        if result.is_ok() {
            stats.completed += 1;
        } else {
            stats.failed += 1;
        }
        drop(st);
        ctx.done.complete(result);
    }

    fn power_cut(self: &Arc<Self>) -> Result<PowerCutReport, FaultControlError> {
        if !self.track {
            return Err(FaultControlError::NotTracking);
        }
        let mut st = self.lock();
        if st.cut {
            return Ok(PowerCutReport::default());
        }
        st.cut = true;
        st.epoch += 1;
        st.stats.power_cuts += 1;
        let mut queued: Vec<WriteJob> = st.write_queue.drain(..).collect();
        while st.inflight > 0 {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        queued.extend(st.write_queue.drain(..));
        st.write_busy = false;
        let held: Vec<Held> = st.stalled.drain(..).collect();
        let plan = st.tracker.take_restore_plan();
        drop(st);
        let mut report = PowerCutReport {
            rolled_back_sectors: plan.rolled_back,
            failed_requests: (queued.len() + held.len()) as u64,
            ..PowerCutReport::default()
        };
        for job in queued {
            self.complete(job.ctx, Err(power_cut_error()));
        }
        for h in held {
            self.complete(h.ctx, h.result);
        }
        for (offset, data) in plan.runs {
            report.restored_bytes += data.len() as u64;
            let req = Request::Write {
                offset,
                buf: IoBuffers::from_vec(data),
                fua: false,
            };
            submit_wait(&*self.child, req)
                .map_err(|source| FaultControlError::Restore { offset, source })?;
        }
        submit_wait(&*self.child, Request::Flush)
            .map_err(|source| FaultControlError::Restore { offset: 0, source })?;
        Ok(report)
    }
}

impl FaultHandle {
    /// Add a rule after the existing ones; rules act in the order added.
    pub fn add_rule(&self, rule: Rule) -> RuleId {
        let mut st = self.shared.lock();
        st.next_rule += 1;
        let id = RuleId(st.next_rule);
        let seed = st.seed;
        st.rules.push(RuleState::new(id, rule, seed));
        id
    }

    /// Remove a rule; false if there is none with this id.
    pub fn remove_rule(&self, id: RuleId) -> bool {
        let mut st = self.shared.lock();
        let before = st.rules.len();
        st.rules.retain(|r| r.id != id);
        st.rules.len() != before
    }

    /// Remove every rule.
    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// The rules, in order.
    pub fn rules(&self) -> Vec<(RuleId, Rule)> {
        self.shared
            .lock()
            .rules
            .iter()
            .map(|r| (r.id, r.rule.clone()))
            .collect()
    }

    /// How many requests a rule has matched and acted on: `(matched, fired)`.
    pub fn rule_counts(&self, id: RuleId) -> Option<(u64, u64)> {
        self.shared
            .lock()
            .rules
            .iter()
            .find(|r| r.id == id)
            .map(|r| (r.matched, r.fired))
    }

    /// Completions held by stall rules now.
    pub fn stalled(&self) -> usize {
        self.shared.lock().stalled.len()
    }

    /// Wait until at least `n` completions are held, or `timeout` passes; says which.
    pub fn wait_stalled(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.stalled.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    /// Release every held completion, oldest first; returns how many.
    pub fn release_stalled(&self) -> usize {
        let held: Vec<Held> = self.shared.lock().stalled.drain(..).collect();
        let n = held.len();
        for h in held {
            self.shared.complete(h.ctx, h.result);
        }
        n
    }

    /// Release the `i`-th held completion (0 = oldest); false if there are fewer.
    pub fn release_nth(&self, i: usize) -> bool {
        let held = self.shared.lock().stalled.remove(i);
        match held {
            Some(h) => {
                self.shared.complete(h.ctx, h.result);
                true
            }
            None => false,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> FaultStats {
        self.shared.lock().stats.clone()
    }

    /// Sectors whose pre-flush content is being kept for a power cut.
    pub fn tracked_sectors(&self) -> usize {
        self.shared.lock().tracker.tracked_sectors()
    }

    /// Cut the power: wait for the requests at the child, put every tracked
    /// sector back to its last flushed content, flush the child, and fail every
    /// request (queued, stalled or new) until [`FaultHandle::power_restore`].
    ///
    /// Blocks until the child has finished what it was given; do not call it
    /// from a completion of this filter's requests.
    pub fn power_cut(&self) -> Result<PowerCutReport, FaultControlError> {
        self.shared.power_cut()
    }

    /// Turn the power back on: requests pass again, and tracking starts afresh
    /// from the child's current (last flushed) content.
    pub fn power_restore(&self) {
        self.shared.lock().cut = false;
    }

    /// Whether the power is on.
    pub fn powered(&self) -> bool {
        !self.shared.lock().cut
    }
}
