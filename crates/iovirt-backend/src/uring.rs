//! The io_uring engine: a [`RawFile`] with many requests in flight and no
//! thread per request.
//!
//! One ring per [`UringFile`] (open one per queue for more parallelism).
//! [`BlockBackend::submit`] validates the request, turns it into one SQE
//! (`READV`, `WRITEV` with `RWF_DSYNC` for FUA, `FSYNC` with `DATASYNC`,
//! `FALLOCATE`) and submits it at once (or, between [`BlockBackend::plug`] and
//! [`BlockBackend::unplug`], in one `io_uring_enter` per [`PLUG_BATCH`]); a
//! reaper thread sleeps on an eventfd registered with the ring, drains the
//! completion queue and calls the [`Completion`]s, outside any lock. Requests
//! beyond the ring's depth wait in a queue and start as earlier ones complete,
//! so `submit` never blocks on I/O.
//!
//! An owner with its own event loop can take completion delivery over
//! ([`BlockBackend::completion_fd`]): it watches the ring's eventfd and reaps
//! on its own thread ([`BlockBackend::poll_completions`]), which saves the
//! reaper's wake-up (and the owner's second one) per completion batch. The
//! reaper then only wakes every [`URING_WATCHDOG`] to reap what nobody reaped.
//!
//! ## Flush ordering
//!
//! io_uring starts SQEs in order but runs them in parallel, so a write submitted
//! together with an fsync may land after the fsync. The contract of
//! [`Request::Flush`] asks for less than strict ordering: every write that
//! *completed* before the flush was *submitted* must be durable. A completed
//! write has reached the page cache (or, with `O_DIRECT`, the device), and an
//! `fdatasync` started afterwards writes back all dirty data of the file and
//! flushes the device cache, so a plain `FSYNC(DATASYNC)` SQE keeps the promise
//! without `IOSQE_IO_DRAIN` (which would stall every request behind the flush)
//! or links. Writes still in flight when the flush is submitted may or may not
//! be covered, as on a real disk.
//!
//! Rare slow paths run synchronously on the reaper thread: the rest of a short
//! read or write, writing zeroes where the file system refuses `fallocate`,
//! the `fdatasync` after a discard in `writethrough` mode, and retrying an
//! operation the kernel's io_uring refused (`EOPNOTSUPP`, `EAGAIN`) with the
//! blocking system call.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use io_uring::{opcode, types, IoUring, Probe};

use crate::file::{is_unsupported, AlignedBuf, IOV_MAX};
use crate::{
    BlockBackend, BlockError, BlockInfo, BlockResult, Completion, OpenError, RawFile, Request,
    SyncBackend,
};

/// Requests in flight per ring when not told otherwise.
pub const DEFAULT_URING_DEPTH: u32 = 128;

/// While plugged, the held submissions are entered every this many SQEs, so
/// the device starts on the first of a long burst while the rest are being
/// prepared. Measured at queue depth 32 on an O_DIRECT file here (the
/// vhost-user daemon, interleaved runs): against entering each SQE at once,
/// 8 cut CPU per request by 15-30% and lost 6-11% of the IOPS (the first
/// requests wait for the rest); holding whole passes lost a quarter.
pub const PLUG_BATCH: usize = 8;

/// Once an owner polls completions ([`BlockBackend::completion_fd`]), the
/// reaper looks for completions nobody reaped this often.
pub const URING_WATCHDOG: Duration = Duration::from_millis(50);

/// An io_uring instance with the eventfd it signals completions on.
pub(crate) struct Ring {
    ring: IoUring,
    evfd: OwnedFd,
}

impl Ring {
    /// Set up a ring of `depth` entries, check the kernel implements every
    /// opcode we use, and register an eventfd. Fails with `ENOSYS` or `EPERM`
    /// where io_uring is disabled (seccomp, `kernel.io_uring_disabled`).
    pub(crate) fn new(depth: u32) -> io::Result<Ring> {
        let ring = IoUring::new(depth.clamp(1, 4096))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Readv::CODE, "READV"),
            (opcode::Writev::CODE, "WRITEV"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
            (opcode::Nop::CODE, "NOP"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring lacks {name}"),
                ));
            }
        }
        let evfd = eventfd()?;
        ring.submitter().register_eventfd(evfd.as_raw_fd())?;
        Ok(Ring { ring, evfd })
    }
}

/// A new non-blocking eventfd.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; we check the result before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reset an eventfd (non-blocking: nothing happens when it is clear).
fn clear_eventfd(fd: &OwnedFd) {
    crate::clear_completion_fd(fd.as_raw_fd());
}

/// `iovec`s pointing into the buffers of the same [`Op`].
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers refer to memory owned by the same `Op` (its request's
// `IoBuffers`, which are `Send`, or its `AlignedBuf`); they are never
// dereferenced by us, only handed to the kernel.
unsafe impl Send for Iovecs {}

/// A request in flight: everything the kernel may touch stays here until its CQE arrives.
struct Op {
    req: Request,
    done: Completion,
    iov: Iovecs,
    bounce: Option<AlignedBuf>,
    /// Submitted as a NOP: write zeroes by hand when it completes.
    zero_fallback: bool,
}

#[derive(Default)]
struct State {
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    in_flight: usize,
    pending: VecDeque<(Request, Completion)>,
    /// SQEs are in the ring that `io_uring_enter` did not take yet.
    unsubmitted: bool,
    /// Open [`BlockBackend::plug`] calls: submissions wait for the last unplug.
    plugged: usize,
    /// SQEs queued since the last `io_uring_enter`.
    held: usize,
    shutdown: bool,
}

struct Shared {
    raw: RawFile,
    ring: Ring,
    depth: usize,
    state: Mutex<State>,
    /// Wakes the reaper (shutdown, a retry of refused submissions).
    wake: OwnedFd,
    /// An owner polls completions: the reaper only watches.
    driven: AtomicBool,
}

/// A [`RawFile`] driven through io_uring; see the module docs for the design.
///
/// ```
/// use iovirt_backend::{submit_wait, CacheMode, IoBuffers, RawFile, Request, UringFile};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.img");
/// std::fs::File::create(&path)?.set_len(1 << 20)?;
/// let raw = RawFile::open(&path, CacheMode::Writeback, false)?;
/// match UringFile::new(raw) {
///     Ok(disk) => {
///         submit_wait(&disk, Request::Write { offset: 0, buf: IoBuffers::zeroed(512), fua: true })?;
///         submit_wait(&disk, Request::Flush)?;
///     }
///     Err(e) => eprintln!("no io_uring here: {e}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct UringFile {
    shared: Arc<Shared>,
    reaper: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for UringFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringFile")
            .field("file", &self.shared.raw.path())
            .field("depth", &self.shared.depth)
            .finish()
    }
}

impl UringFile {
    /// Drive `raw` through a new ring of [`DEFAULT_URING_DEPTH`] entries.
    /// Fails with [`OpenError::Engine`] where the kernel refuses io_uring.
    pub fn new(raw: RawFile) -> Result<Self, OpenError> {
        Self::with_depth(raw, DEFAULT_URING_DEPTH)
    }

    /// Drive `raw` through a new ring keeping up to `depth` requests in flight.
    pub fn with_depth(raw: RawFile, depth: u32) -> Result<Self, OpenError> {
        let ring = Ring::new(depth).map_err(|source| OpenError::Engine {
            engine: "io_uring",
            source,
        })?;
        Self::with_ring(raw, ring)
    }

    pub(crate) fn with_ring(raw: RawFile, ring: Ring) -> Result<Self, OpenError> {
        let depth = ring.ring.params().sq_entries() as usize;
        let wake = eventfd().map_err(|source| OpenError::Engine {
            engine: "io_uring",
            source,
        })?;
        let shared = Arc::new(Shared {
            raw,
            ring,
            depth,
            state: Mutex::new(State::default()),
            wake,
            driven: AtomicBool::new(false),
        });
        let s = shared.clone();
        let reaper = thread::Builder::new()
            .name("iovirt-uring".into())
            .spawn(move || s.reap())
            .map_err(|source| OpenError::Engine {
                engine: "io_uring",
                source,
            })?;
        Ok(UringFile {
            shared,
            reaper: Some(reaper),
        })
    }

    /// The file underneath (for its statistics and mode).
    pub fn raw(&self) -> &RawFile {
        &self.shared.raw
    }

    /// How many requests the ring keeps in flight; more wait in a queue.
    pub fn depth(&self) -> usize {
        self.shared.depth
    }
}

impl BlockBackend for UringFile {
    fn info(&self) -> BlockInfo {
        self.shared.raw.info()
    }

    fn submit(&self, req: Request, done: Completion) {
        let sh = &self.shared;
        if let Err(e) = sh.raw.info().check(&req) {
            return done.complete(Err(e));
        }
        let trivial = match &req {
            Request::Flush => sh.raw.flush_is_noop(),
            Request::Read { buf, .. } => buf.is_empty(),
            Request::Write { buf, fua, .. } => buf.is_empty() && !fua,
            Request::Discard { len, .. } | Request::WriteZeroes { len, .. } => *len == 0,
        };
        if trivial {
            drop(req);
            return done.complete(Ok(()));
        }
        let failed = {
            let mut st = sh.lock();
            if st.shutdown {
                Some((done, BlockError::Dropped))
            } else if st.in_flight >= sh.depth {
                st.pending.push_back((req, done));
                None
            } else {
                let r = sh.queue(&mut st, req, done).err();
                if r.is_none() {
                    st.held += 1;
                    if st.plugged > 0 && st.held < PLUG_BATCH {
                        st.unsubmitted = true;
                    } else {
                        sh.enter(&mut st);
                    }
                }
                r
            }
        };
        if let Some((done, e)) = failed {
            done.complete(Err(e));
        }
    }

    fn plug(&self) {
        self.shared.lock().plugged += 1;
    }

    fn unplug(&self) {
        let sh = &self.shared;
        let mut st = sh.lock();
        st.plugged = st.plugged.saturating_sub(1);
        if st.plugged == 0 && st.unsubmitted {
            sh.enter(&mut st);
        }
    }

    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        let sh = &self.shared;
        if !sh.driven.swap(true, Ordering::SeqCst) {
            // The reaper stops watching the ring's eventfd at its next pass.
            sh.kick();
        }
        Some(sh.ring.evfd.as_raw_fd())
    }

    fn poll_completions(&self) -> usize {
        self.shared.reap_ready().0
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.kick();
        if let Some(h) = self.reaper.take() {
            // The last reference may go away inside a completion, on the reaper
            // itself: then it finishes the queued work and exits on its own.
            if h.thread().id() != thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

type Failed = (Completion, BlockError);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the reaper.
    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to our eventfd.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Sleep until the reaper is kicked, the ring signals a completion (unless
    /// an owner polls them) or `timeout_ms` passes (-1: forever); reset what fired.
    fn wait(&self, timeout_ms: i32) {
        let driven = self.driven.load(Ordering::SeqCst);
        let mut pfds = [
            libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.ring.evfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let n: libc::nfds_t = if driven { 1 } else { 2 };
        // SAFETY: polls `n` live pollfds of the array.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), n, timeout_ms) };
        if r > 0 {
            if pfds[0].revents != 0 {
                clear_eventfd(&self.wake);
            }
            if pfds[1].revents != 0 {
                clear_eventfd(&self.ring.evfd);
            }
        }
    }

    /// Build the SQE for `req` and put it in the submission queue (not yet entered).
    fn queue(&self, st: &mut State, req: Request, done: Completion) -> Result<(), Failed> {
        let raw = &self.raw;
        let fd = types::Fd(raw.as_raw_fd());
        let mut op = Op {
            req,
            done,
            iov: Iovecs(Vec::new()),
            bounce: None,
            zero_fallback: false,
        };
        let entry = match &op.req {
            Request::Read { offset, buf } | Request::Write { offset, buf, .. } => {
                let write = matches!(op.req, Request::Write { .. });
                if raw.needs_bounce(buf) || buf.segments() > IOV_MAX {
                    raw.count_bounce();
                    let mut b = AlignedBuf::new(buf.len(), raw.align());
                    if write {
                        buf.copy_to_slice_at(0, b.as_mut_slice());
                    }
                    op.iov.0 = vec![b.iovec()];
                    op.bounce = Some(b);
                } else {
                    op.iov.0 = buf.iovecs();
                }
                let (ptr, n) = (op.iov.0.as_ptr(), op.iov.0.len() as u32);
                match &op.req {
                    Request::Write { fua, .. } => opcode::Writev::new(fd, ptr, n)
                        .offset(*offset)
                        .rw_flags(raw.write_flags(*fua))
                        .build(),
                    _ => opcode::Readv::new(fd, ptr, n).offset(*offset).build(),
                }
            }
            Request::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Request::Discard { offset, len } => {
                fallocate_entry(raw, fd, *offset, *len, true, &mut op.zero_fallback)
            }
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => fallocate_entry(raw, fd, *offset, *len, *may_unmap, &mut op.zero_fallback),
        };
        let idx = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(None);
                st.slots.len() - 1
            }
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: only code holding the state lock touches the submission queue,
        // and we hold it (`st`). The SQE points at `op`'s iovecs and buffers,
        // which stay in `st.slots[idx]` until the reaper takes its CQE.
        let pushed = unsafe {
            let mut sq = self.ring.ring.submission_shared();
            let r = sq.push(&entry);
            sq.sync();
            r
        };
        if pushed.is_err() {
            st.free.push(idx);
            return Err((
                op.done,
                BlockError::Other("io_uring submission queue full".into()),
            ));
        }
        if let Some(slot) = st.slots.get_mut(idx) {
            *slot = Some(op);
        }
        st.in_flight += 1;
        Ok(())
    }

    /// Hand queued SQEs to the kernel. If it cannot take them now (EAGAIN,
    /// EBUSY), the reaper retries shortly.
    fn enter(&self, st: &mut State) {
        st.held = 0;
        loop {
            match self.ring.ring.submit() {
                Ok(_) => {
                    // SAFETY: we hold the state lock, the only user of the submission queue.
                    let left = unsafe { self.ring.ring.submission_shared().len() };
                    st.unsubmitted = left > 0;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                        log::warn!("{}: io_uring_enter: {e}", self.raw.path().display());
                    }
                    st.unsubmitted = true;
                }
            }
            break;
        }
        if st.unsubmitted {
            self.kick();
        }
    }

    /// The reaper thread: collect completions, start queued requests, complete.
    fn reap(self: Arc<Self>) {
        let mut timeout = -1;
        loop {
            self.wait(timeout);
            let (_, exit, unsubmitted) = self.reap_ready();
            if exit {
                return;
            }
            timeout = if unsubmitted {
                10
            } else if self.driven.load(Ordering::SeqCst) {
                URING_WATCHDOG.as_millis() as i32
            } else {
                -1
            };
        }
    }

    /// Drain the completion queue, start queued requests, and run the
    /// completions (outside the lock). Returns how many completed, whether
    /// the ring is shut down and idle, and whether submissions wait for a retry.
    fn reap_ready(&self) -> (usize, bool, bool) {
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        let (exit, unsubmitted) = {
            let mut st = self.lock();
            // SAFETY: the completion queue is only read under the state lock, which we hold.
            let mut cq = unsafe { self.ring.ring.completion_shared() };
            cq.sync();
            for cqe in &mut cq {
                let idx = cqe.user_data() as usize;
                if let Some(op) = st.slots.get_mut(idx).and_then(Option::take) {
                    st.free.push(idx);
                    st.in_flight -= 1;
                    finished.push((op, cqe.result()));
                }
            }
            drop(cq);
            if finished.is_empty() && !st.unsubmitted && !st.shutdown {
                return (0, false, false);
            }
            let mut queued = st.unsubmitted && st.plugged == 0;
            while st.in_flight < self.depth {
                let Some((req, done)) = st.pending.pop_front() else {
                    break;
                };
                match self.queue(&mut st, req, done) {
                    Ok(()) => queued = true,
                    Err(f) => failed.push(f),
                }
            }
            if queued {
                self.enter(&mut st);
            }
            (
                st.shutdown && st.in_flight == 0 && st.pending.is_empty(),
                st.unsubmitted,
            )
        };
        let n = finished.len();
        for (done, e) in failed {
            done.complete(Err(e));
        }
        for (op, res) in finished {
            let Op {
                req,
                done,
                iov,
                bounce,
                zero_fallback,
            } = op;
            drop(iov);
            let r = self.finish(&req, bounce, zero_fallback, res);
            drop(req);
            done.complete(r);
        }
        (n, exit, unsubmitted)
    }

    /// Turn a CQE result into the request's result, finishing short transfers
    /// and fallbacks synchronously.
    fn finish(
        &self,
        req: &Request,
        bounce: Option<AlignedBuf>,
        zero_fallback: bool,
        res: i32,
    ) -> BlockResult {
        let raw = &self.raw;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return match req {
                Request::Discard { offset, len } => {
                    if raw.note_fallocate_refusal(punch_mode(true), &e) {
                        raw.write_zero_blocks(*offset, *len)?;
                        raw.after_metadata_change()
                    } else {
                        Err(BlockError::Io(e))
                    }
                }
                Request::WriteZeroes {
                    offset,
                    len,
                    may_unmap,
                } => {
                    if raw.note_fallocate_refusal(punch_mode(*may_unmap), &e) {
                        raw.write_zero_blocks(*offset, *len)?;
                        raw.after_metadata_change()
                    } else {
                        Err(BlockError::Io(e))
                    }
                }
                // The kernel's io_uring refused what the system call does (say,
                // RWF_DSYNC on an old kernel), or asked to retry: do it blocking.
                _ if is_unsupported(&e) || e.raw_os_error() == Some(libc::EAGAIN) => {
                    raw.execute(req)
                }
                _ => Err(BlockError::Io(e)),
            };
        }
        let n = res as usize;
        match req {
            Request::Read { offset, buf } => {
                if let Some(b) = &bounce {
                    let got = n.min(buf.len()).min(b.as_slice().len());
                    buf.copy_from_slice_at(0, &b.as_slice()[..got]);
                }
                if n < buf.len() {
                    raw.read_from(*offset, buf, n)
                } else {
                    Ok(())
                }
            }
            Request::Write { offset, buf, fua } => {
                if n < buf.len() {
                    raw.write_from(*offset, buf, n, *fua)
                } else {
                    Ok(())
                }
            }
            Request::Flush => {
                raw.count_sync();
                Ok(())
            }
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                if zero_fallback {
                    raw.write_zero_blocks(*offset, *len)?;
                }
                raw.after_metadata_change()
            }
        }
    }
}

fn punch_mode(unmap: bool) -> libc::c_int {
    if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// A FALLOCATE SQE, or a NOP marking "write zeroes by hand" where the file
/// system is known to refuse the mode.
fn fallocate_entry(
    raw: &RawFile,
    fd: types::Fd,
    offset: u64,
    len: u64,
    unmap: bool,
    zero_fallback: &mut bool,
) -> io_uring::squeue::Entry {
    match raw.fallocate_mode(unmap) {
        Some(mode) => opcode::Fallocate::new(fd, len)
            .offset(offset)
            .mode(mode)
            .build(),
        None => {
            *zero_fallback = true;
            opcode::Nop::new().build()
        }
    }
}
