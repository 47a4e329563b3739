//! Redo log with time travel: every write is appended to a log file over a
//! read-only base, so any past state of the disk can be viewed, reverted to,
//! or merged into the base.
//!
//! - **Writes** become [`record`]s appended to the log (magic, sequence
//!   number, timestamp from an injectable [`Clock`], disk offset and length,
//!   CRC-32 of header and data, the data). Write-zeroes and discards become
//!   data-less zero records. A write completes once its record is written to
//!   the log file (the page cache): the disk advertises a volatile cache, a
//!   flush is an `fdatasync` of the log, and a FUA write syncs before it completes.
//! - An in-memory **extent index** maps disk ranges to the log position of
//!   their newest data, splitting extents where writes overlap, so its size
//!   follows the number of distinct extents, not the number of writes.
//!   **Reads** assemble the log's extents over a read of the base.
//! - A **point** ([`LogPoint`]) is a sequence number: the disk as of the
//!   record with that number. A **snapshot** is a named point, stored in the
//!   log as a record. [`RedoLogHandle::view_at`] and
//!   [`RedoLogHandle::view_at_time`] open a read-only [`RedoView`] of any
//!   past point; [`RedoLogHandle::revert`] truncates the log back to a point;
//!   [`RedoLogHandle::merge`] writes the disk as of a point into a writable
//!   base and drops the records up to it from the log.
//! - **Opening after a crash** replays the log, checking each record; a torn
//!   or corrupt tail (short, bad magic, bad CRC, out of order) is cut off with
//!   a log line, and the disk is what the records before it say.
//!
//! The base is any back-end (a file, a stack); it must not change under the
//! log except through [`RedoLogHandle::merge`]. Appends happen under one lock,
//! in order: the log is a sequential write stream.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::redolog::{ManualClock, RedoLog, RedoLogOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let base = Arc::new(Inline(MemoryBackend::new(1 << 20)));
//! let clock = Arc::new(ManualClock::new(1_000));
//! let log = RedoLog::open(base.clone(), RedoLogOptions::new(dir.path().join("disk.log")).clock(clock.clone()))?;
//! let ctl = log.handle();
//! let w = |b: u8| Request::Write { offset: 0, buf: IoBuffers::from_vec(vec![b; 512]), fua: false };
//! submit_wait(&log, w(1))?;
//! let snap = ctl.snapshot("before")?;
//! clock.advance(1_000);
//! submit_wait(&log, w(2))?;
//! // The disk as it was at the snapshot.
//! let old = ctl.view_at(snap)?;
//! assert_eq!(old.read_vec(0, 512)?, vec![1; 512]);
//! assert_eq!(log.read_vec(0, 512)?, vec![2; 512]);
//! ctl.revert(snap)?; // back to the snapshot
//! assert_eq!(log.read_vec(0, 512)?, vec![1; 512]);
//! assert_eq!(base.0.contents()[0], 0); // the base was never written
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod index;
pub mod record;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, BlockInfo, BlockResult, Completion, Features, IoBuffers,
    Request,
};
use serde::Serialize;

use crate::aggregate::parts::Scratch;
use index::{ExtentMap, Src};
use record::{Record, RecordError, RecordKind, RecordRepr, HEADER_LEN};

/// Where the log gets its timestamps: nanoseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    /// Now.
    fn now_ns(&self) -> u64;
}

/// The host's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `ns`.
    pub fn new(ns: u64) -> Self {
        ManualClock(AtomicU64::new(ns))
    }
    /// Set the time.
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::SeqCst)
    }
    /// Move the time on by `ns`.
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A point in the log: the disk as of the record with this sequence number
/// (0 is the base alone, before any record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LogPoint(pub u64);

/// A named snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Its name.
    pub name: String,
    /// The point it names.
    pub point: LogPoint,
    /// When it was taken (ns since the Unix epoch).
    pub time: u64,
}

/// Options of a [`RedoLog`].
#[derive(Clone)]
pub struct RedoLogOptions {
    /// The log file (created if missing).
    pub path: PathBuf,
    /// Where timestamps come from (default: the system clock).
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for RedoLogOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedoLogOptions")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedoLogOptions {
    /// A log at `path` with the system clock.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RedoLogOptions {
            path: path.into(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Use `clock` for timestamps.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// Why the redo log could not be opened or a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RedoLogError {
    /// The host's I/O on the log file failed.
    #[error("redo log {}: {source}", path.display())]
    Io {
        /// The log file.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with a redo-log record.
    #[error("redo log {}: not a redo log ({reason})", path.display())]
    NotALog {
        /// The log file.
        path: PathBuf,
        /// What is wrong.
        reason: RecordError,
    },
    /// The point is not in the log.
    #[error("redo log: point {point} is not in the log (it holds {first}..={last})")]
    NoSuchPoint {
        /// The point asked for.
        point: u64,
        /// The oldest point (merged into the base).
        first: u64,
        /// The newest point.
        last: u64,
    },
    /// No record is as old as the time asked for.
    #[error("redo log: nothing in the log is as old as time {0}")]
    NoSuchTime(u64),
    /// A snapshot name is empty, too long, or taken.
    #[error("redo log: bad snapshot name {name:?}: {reason}")]
    SnapshotName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Merging needs a writable base.
    #[error("redo log: the base is read-only; merge needs a writable base")]
    ReadOnlyBase,
    /// Writing to the base during a merge failed.
    #[error("redo log: merging into the base at byte {offset} failed: {source}")]
    Merge {
        /// Where.
        offset: u64,
        /// What the base said.
        #[source]
        source: BlockError,
    },
}

/// Counters and sizes for the control interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RedoLogStats {
    /// Bytes in the log file.
    pub log_bytes: u64,
    /// Entries in the extent index.
    pub extents: usize,
    /// The oldest point still in the log (merged into the base up to here).
    pub first_point: LogPoint,
    /// The newest point.
    pub last_point: LogPoint,
    /// Named snapshots.
    pub snapshots: usize,
}

struct LogState {
    file: Arc<File>,
    tail: u64,
    next_seq: u64,
    first_point: u64,
    last_time: u64,
    index: ExtentMap,
    snapshots: Vec<Snapshot>,
    views: Vec<(u64, Weak<AtomicBool>)>,
}

struct Inner {
    base: Arc<dyn BlockBackend>,
    info: BlockInfo,
    path: PathBuf,
    clock: Arc<dyn Clock>,
    st: Mutex<LogState>,
    /// Serialises revert and merge.
    admin: Mutex<()>,
}

/// A redo log over a base; see the [module docs](self).
pub struct RedoLog {
    inner: Arc<Inner>,
}

/// The control of a [`RedoLog`]: snapshots, views, revert, merge, statistics.
#[derive(Clone)]
pub struct RedoLogHandle {
    inner: Arc<Inner>,
}

/// A read-only view of the disk as of a past point. It stops working (reads
/// fail) if a revert or merge makes its point unreachable.
pub struct RedoView {
    base: Arc<dyn BlockBackend>,
    info: BlockInfo,
    file: Arc<File>,
    index: ExtentMap,
    point: LogPoint,
    valid: Arc<AtomicBool>,
}

impl std::fmt::Debug for RedoLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedoLog")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedoLogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedoLogHandle")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedoView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedoView")
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

/// One record found by a scan.
struct Found {
    pos: u64,
    repr: RecordRepr,
    name: Option<String>,
}

/// What a scan of a log file found.
struct Scan {
    /// Bytes of whole, valid records.
    valid_len: u64,
    /// The point of the start record.
    start_point: u64,
    /// Why the scan stopped before the end of the file, if it did.
    torn: Option<(u64, String)>,
}

/// Read the records of `file` in order, calling `each` for every record
/// after the start record, until `each` returns false. With `verify`, data
/// is read and checked against the CRC, and ranges against `capacity`.
fn scan(
    file: &File,
    capacity: u64,
    verify: bool,
    mut each: impl FnMut(&Found) -> bool,
) -> std::io::Result<Scan> {
    let len = file.metadata()?.len();
    let mut pos = 0u64;
    let mut last_seq: Option<u64> = None;
    let mut start_point = 0;
    let mut hb = [0u8; HEADER_LEN];
    let torn = loop {
        if pos == len {
            break None;
        }
        if len - pos < HEADER_LEN as u64 {
            break Some((
                pos,
                format!("{} bytes left, a header needs {HEADER_LEN}", len - pos),
            ));
        }
        file.read_exact_at(&mut hb, pos)?;
        let rec = match Record::new_checked(&hb[..]) {
            Ok(r) => r,
            Err(e) => break Some((pos, e.to_string())),
        };
        let repr = match RecordRepr::parse(&rec) {
            Ok(r) => r,
            Err(e) => break Some((pos, e.to_string())),
        };
        let end = pos + repr.record_len();
        if end > len {
            break Some((
                pos,
                format!("short record: its data ends at byte {end}, the file at {len}"),
            ));
        }
        let first = last_seq.is_none();
        if first != (repr.kind == RecordKind::Start) {
            break Some((pos, format!("unexpected {:?} record", repr.kind)));
        }
        if repr.seq == u64::MAX {
            break Some((pos, "sequence number at its limit".to_string()));
        }
        if last_seq.is_some_and(|l| repr.seq <= l) {
            break Some((pos, format!("sequence number {} out of order", repr.seq)));
        }
        if repr.offset.saturating_add(repr.disk_len) > capacity {
            break Some((
                pos,
                format!("range {}+{} is beyond the disk", repr.offset, repr.disk_len),
            ));
        }
        let needs_data = verify || repr.kind == RecordKind::Snapshot;
        let mut data = Vec::new();
        if needs_data {
            data = vec![0u8; repr.data_len as usize];
            file.read_exact_at(&mut data, pos + HEADER_LEN as u64)?;
        }
        if verify {
            if let Err(e) = RecordRepr::check_crc(&rec, &data) {
                break Some((pos, e.to_string()));
            }
        }
        let name = (repr.kind == RecordKind::Snapshot)
            .then(|| String::from_utf8_lossy(&data).into_owned());
        last_seq = Some(repr.seq);
        if repr.kind == RecordKind::Start {
            start_point = repr.seq;
        } else if !each(&Found { pos, repr, name }) {
            pos = end;
            break None;
        }
        pos = end;
    };
    Ok(Scan {
        valid_len: torn.as_ref().map_or(pos, |(p, _)| *p),
        start_point,
        torn,
    })
}

/// Apply one record to an index.
fn apply(index: &mut ExtentMap, f: &Found) {
    let (s, e) = (f.repr.offset, f.repr.offset + f.repr.disk_len);
    match f.repr.kind {
        RecordKind::Write => index.insert(s, e, Src::Log(f.pos + HEADER_LEN as u64)),
        RecordKind::Zero => index.insert(s, e, Src::Zero),
        RecordKind::Snapshot | RecordKind::Start => {}
    }
}

fn start_record(point: u64, time: u64) -> Vec<u8> {
    RecordRepr {
        kind: RecordKind::Start,
        seq: point,
        time,
        offset: 0,
        disk_len: 0,
        data_len: 0,
    }
    .emit(&[])
    .to_vec()
}

/// Read `[offset, offset + buf.len())` of the disk an index describes into `buf`.
/// The log's extents are read now (the caller holds whatever keeps `file` stable);
/// the base is read asynchronously.
fn assemble_read(
    index: &ExtentMap,
    file: &File,
    base: &Arc<dyn BlockBackend>,
    offset: u64,
    buf: IoBuffers,
    done: Completion,
) {
    let len = buf.len() as u64;
    let pieces = index.lookup(offset, offset + len);
    if pieces.iter().all(|p| p.src.is_none()) {
        base.submit(Request::Read { offset, buf }, done);
        return;
    }
    // (position in the buffer, data or `None` for zeroes, length)
    let mut overlays: Vec<(usize, Option<Vec<u8>>, usize)> = Vec::new();
    let mut need_base = false;
    for p in &pieces {
        let at = (p.start - offset) as usize;
        let n = (p.end - p.start) as usize;
        match p.src {
            None => need_base = true,
            Some(Src::Zero) => overlays.push((at, None, n)),
            Some(Src::Log(pos)) => {
                let mut v = vec![0u8; n];
                if let Err(e) = file.read_exact_at(&mut v, pos) {
                    done.complete(Err(BlockError::Io(e)));
                    return;
                }
                overlays.push((at, Some(v), n));
            }
        }
    }
    let finish = move |buf: &IoBuffers| {
        for (at, data, n) in &overlays {
            match data {
                Some(v) => buf.copy_from_slice_at(*at, v),
                None => buf.fill_zero_at(*at, *n),
            };
        }
    };
    if !need_base {
        finish(&buf);
        done.complete(Ok(()));
        return;
    }
    let (scratch, req) = match Scratch::read_request(len as usize, offset) {
        Ok(x) => x,
        Err(e) => {
            done.complete(Err(e));
            return;
        }
    };
    base.submit(
        req,
        Completion::new(move |r| {
            if r.is_ok() {
                buf.copy_from_slice_at(0, &scratch.to_vec());
                finish(&buf);
            }
            done.complete(r)
        }),
    );
}

impl RedoLog {
    /// Open (or create) the log at `opts.path` over `base`, replaying it:
    /// a torn or corrupt tail is cut off with a log line.
    pub fn open(base: Arc<dyn BlockBackend>, opts: RedoLogOptions) -> Result<Self, RedoLogError> {
        let path = opts.path.clone();
        let io = |source| RedoLogError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let base_info = base.info();
        let mut index = ExtentMap::default();
        let mut snapshots = Vec::new();
        let mut last_seq = 0u64;
        let mut last_time = 0u64;
        let sc = scan(&file, base_info.capacity, true, |f| {
            apply(&mut index, f);
            last_seq = f.repr.seq;
            last_time = last_time.max(f.repr.time);
            if let Some(name) = &f.name {
                snapshots.push(Snapshot {
                    name: name.clone(),
                    point: LogPoint(f.repr.seq),
                    time: f.repr.time,
                });
            }
            true
        })
        .map_err(io)?;
        let mut tail = sc.valid_len;
        if let Some((at, why)) = &sc.torn {
            let flen = file.metadata().map_err(io)?.len();
            if *at == 0 && flen >= HEADER_LEN as u64 {
                // Not even the start record parses: refuse rather than wipe a foreign file.
                let mut hb = [0u8; HEADER_LEN];
                file.read_exact_at(&mut hb, 0).map_err(io)?;
                if hb[..4] != record::RECORD_MAGIC {
                    return Err(RedoLogError::NotALog {
                        path,
                        reason: RecordError::Magic([hb[0], hb[1], hb[2], hb[3]]),
                    });
                }
            }
            log::warn!(
                "redo log {}: dropping a torn or corrupt record at byte {at} ({why}); {} bytes cut",
                path.display(),
                flen - at
            );
            file.set_len(*at).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        if tail == 0 {
            let start = start_record(0, opts.clock.now_ns());
            file.write_all_at(&start, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            tail = start.len() as u64;
        }
        let first_point = sc.start_point;
        let next_seq = last_seq.max(first_point) + 1;
        let mut info = base_info;
        info.features = (info.features - Features::READ_ONLY)
            | Features::VOLATILE_CACHE
            | Features::FUA
            | Features::DISCARD
            | Features::WRITE_ZEROES;
        Ok(RedoLog {
            inner: Arc::new(Inner {
                base,
                info,
                path,
                clock: opts.clock,
                st: Mutex::new(LogState {
                    file: Arc::new(file),
                    tail,
                    next_seq,
                    first_point,
                    last_time,
                    index,
                    snapshots,
                    views: Vec::new(),
                }),
                admin: Mutex::new(()),
            }),
        })
    }

    /// A control handle.
    pub fn handle(&self) -> RedoLogHandle {
        RedoLogHandle {
            inner: self.inner.clone(),
        }
    }

    /// Read `len` bytes at `offset` into a vector (tools and tests).
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        read_vec(self, offset, len)
    }
}

/// Read through any back-end into a vector.
fn read_vec(b: &dyn BlockBackend, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let (s, req) = match Scratch::read_request(len, 0) {
        Ok((s, Request::Read { buf, .. })) => (s, Request::Read { offset, buf }),
        Ok(_) => return Err(BlockError::Other("scratch read".into())),
        Err(e) => return Err(e),
    };
    submit_wait(b, req)?;
    Ok(s.to_vec())
}

impl BlockBackend for RedoLog {
    fn info(&self) -> BlockInfo {
        self.inner.info
    }

    fn submit(&self, req: Request, done: Completion) {
        if let Err(e) = self.inner.info.check(&req) {
            done.complete(Err(e));
            return;
        }
        match req {
            Request::Read { offset, buf } => {
                let st = self.inner.lock();
                let file = st.file.clone();
                assemble_read(&st.index, &file, &self.inner.base, offset, buf, done);
            }
            Request::Flush => done.complete(self.inner.sync()),
            Request::Write { offset, buf, fua } => {
                let data = buf.to_vec();
                drop(buf);
                let r = self
                    .inner
                    .append(RecordKind::Write, offset, data.len() as u64, &data)
                    .and_then(|_| if fua { self.inner.sync() } else { Ok(()) });
                done.complete(r)
            }
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => done
                .complete(
                    self.inner
                        .append(RecordKind::Zero, offset, len, &[])
                        .map(|_| ()),
                ),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io_err(&self, source: std::io::Error) -> RedoLogError {
        RedoLogError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn sync(&self) -> BlockResult {
        let file = self.lock().file.clone();
        file.sync_data().map_err(BlockError::Io)
    }

    /// Append a record; returns its sequence number.
    fn append(
        &self,
        kind: RecordKind,
        offset: u64,
        disk_len: u64,
        data: &[u8],
    ) -> Result<u64, BlockError> {
        let data_len = u32::try_from(data.len())
            .ok()
            .filter(|&n| n <= record::MAX_DATA_LEN)
            .ok_or_else(|| {
                BlockError::Other(format!(
                    "redo log: a write of {} bytes is over the record limit",
                    data.len()
                ))
            })?;
        let mut st = self.lock();
        let seq = st.next_seq;
        if seq == u64::MAX {
            return Err(BlockError::Other(
                "redo log: sequence numbers exhausted; merge or revert first".into(),
            ));
        }
        let time = self.clock.now_ns().max(st.last_time);
        let repr = RecordRepr {
            kind,
            seq,
            time,
            offset,
            disk_len,
            data_len,
        };
        let mut bytes = Vec::with_capacity(HEADER_LEN + data.len());
        bytes.extend_from_slice(&repr.emit(data));
        bytes.extend_from_slice(data);
        let pos = st.tail;
        st.file.write_all_at(&bytes, pos).map_err(BlockError::Io)?;
        st.tail = pos + bytes.len() as u64;
        st.next_seq += 1;
        st.last_time = time;
        let found = Found {
            pos,
            repr,
            name: None,
        };
        apply(&mut st.index, &found);
        Ok(seq)
    }

    /// Build the index (and find the file length) as of `point`.
    fn index_at(&self, file: &File, point: u64) -> Result<(ExtentMap, u64), RedoLogError> {
        let mut index = ExtentMap::default();
        let mut end = None;
        let sc = scan(file, self.info.capacity, false, |f| {
            if f.repr.seq > point {
                end = Some(f.pos);
                return false;
            }
            apply(&mut index, f);
            true
        })
        .map_err(|e| self.io_err(e))?;
        Ok((index, end.unwrap_or(sc.valid_len)))
    }

    fn check_point(&self, st: &LogState, point: LogPoint) -> Result<(), RedoLogError> {
        let last = st.next_seq - 1;
        if point.0 < st.first_point || point.0 > last {
            return Err(RedoLogError::NoSuchPoint {
                point: point.0,
                first: st.first_point,
                last,
            });
        }
        Ok(())
    }

    fn invalidate_views(st: &mut LogState, dead: impl Fn(u64) -> bool) {
        st.views.retain(|(p, w)| match w.upgrade() {
            Some(flag) => {
                if dead(*p) {
                    flag.store(false, Ordering::SeqCst);
                    false
                } else {
                    true
                }
            }
            None => false,
        });
    }
}

impl RedoLogHandle {
    /// Sizes and points.
    pub fn stats(&self) -> RedoLogStats {
        let st = self.inner.lock();
        RedoLogStats {
            log_bytes: st.tail,
            extents: st.index.len(),
            first_point: LogPoint(st.first_point),
            last_point: LogPoint(st.next_seq - 1),
            snapshots: st.snapshots.len(),
        }
    }

    /// The newest point: the disk as it is now.
    pub fn current(&self) -> LogPoint {
        LogPoint(self.inner.lock().next_seq - 1)
    }

    /// Name the current point; the snapshot is a record in the log, made durable before this returns.
    pub fn snapshot(&self, name: &str) -> Result<LogPoint, RedoLogError> {
        let bad = |reason| RedoLogError::SnapshotName {
            name: name.to_string(),
            reason,
        };
        if name.is_empty() || name.len() > 255 {
            return Err(bad("must be 1 to 255 bytes"));
        }
        if self.inner.lock().snapshots.iter().any(|s| s.name == name) {
            return Err(bad("already taken"));
        }
        let seq = self
            .inner
            .append(RecordKind::Snapshot, 0, 0, name.as_bytes())
            .map_err(|e| self.inner.io_err(std::io::Error::other(e.to_string())))?;
        self.inner
            .sync()
            .map_err(|e| self.inner.io_err(std::io::Error::other(e.to_string())))?;
        let mut st = self.inner.lock();
        let time = st.last_time;
        st.snapshots.push(Snapshot {
            name: name.to_string(),
            point: LogPoint(seq),
            time,
        });
        Ok(LogPoint(seq))
    }

    /// The snapshots still in the log, oldest first.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.inner.lock().snapshots.clone()
    }

    /// The point of the snapshot named `name`.
    pub fn find_snapshot(&self, name: &str) -> Option<LogPoint> {
        self.inner
            .lock()
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.point)
    }

    /// A read-only view of the disk as of `point`.
    pub fn view_at(&self, point: LogPoint) -> Result<RedoView, RedoLogError> {
        let file = {
            let st = self.inner.lock();
            self.inner.check_point(&st, point)?;
            st.file.clone()
        };
        let (index, _) = self.inner.index_at(&file, point.0)?;
        let valid = Arc::new(AtomicBool::new(true));
        let mut st = self.inner.lock();
        // A revert or merge between the scan and now: the file may have changed.
        if !Arc::ptr_eq(&st.file, &file) || self.inner.check_point(&st, point).is_err() {
            drop(st);
            return self.view_at(point);
        }
        st.views.push((point.0, Arc::downgrade(&valid)));
        let mut info = self.inner.base.info();
        info.features = (info.features | Features::READ_ONLY) - Features::VOLATILE_CACHE;
        Ok(RedoView {
            base: self.inner.base.clone(),
            info,
            file,
            index,
            point,
            valid,
        })
    }

    /// The newest point whose record is no later than `time_ns` (ns since the Unix epoch).
    pub fn point_at_time(&self, time_ns: u64) -> Result<LogPoint, RedoLogError> {
        let (file, first) = {
            let st = self.inner.lock();
            (st.file.clone(), st.first_point)
        };
        let mut best = None;
        scan(&file, self.inner.info.capacity, false, |f| {
            if f.repr.time > time_ns {
                return false;
            }
            best = Some(f.repr.seq);
            true
        })
        .map_err(|e| self.inner.io_err(e))?;
        match best {
            Some(p) => Ok(LogPoint(p)),
            None if first > 0 => Err(RedoLogError::NoSuchTime(time_ns)),
            None => Ok(LogPoint(0)),
        }
    }

    /// A read-only view of the disk as it was at wall-clock time `time_ns`.
    pub fn view_at_time(&self, time_ns: u64) -> Result<RedoView, RedoLogError> {
        self.view_at(self.point_at_time(time_ns)?)
    }

    /// Revert the disk to `point`: the log is cut after it (made durable), the
    /// index rebuilt, later snapshots dropped, and views of later points stop working.
    pub fn revert(&self, point: LogPoint) -> Result<(), RedoLogError> {
        let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = self.inner.lock();
        self.inner.check_point(&st, point)?;
        let file = st.file.clone();
        let (index, end) = self.inner.index_at(&file, point.0)?;
        file.set_len(end).map_err(|e| self.inner.io_err(e))?;
        file.sync_all().map_err(|e| self.inner.io_err(e))?;
        st.tail = end;
        st.index = index;
        st.next_seq = point.0 + 1;
        st.snapshots.retain(|s| s.point <= point);
        Inner::invalidate_views(&mut st, |p| p > point.0);
        log::info!(
            "redo log {}: reverted to point {}",
            self.inner.path.display(),
            point.0
        );
        Ok(())
    }

    /// Merge the log up to `point` into the base: the disk as of `point` is
    /// written into the base and flushed, then the log is rewritten without
    /// the records up to `point` (a new file renamed over the old one).
    /// Points before `point` are gone afterwards, and views of them stop working.
    pub fn merge(&self, point: LogPoint) -> Result<(), RedoLogError> {
        if self
            .inner
            .base
            .info()
            .features
            .contains(Features::READ_ONLY)
        {
            return Err(RedoLogError::ReadOnlyBase);
        }
        let _admin = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        let file = {
            let st = self.inner.lock();
            self.inner.check_point(&st, point)?;
            st.file.clone()
        };
        let (index, _) = self.inner.index_at(&file, point.0)?;
        const CHUNK: u64 = 1 << 20;
        for (s, e, src) in index.iter() {
            let mut at = s;
            while at < e {
                let n = (e - at).min(CHUNK);
                let req = match src {
                    Src::Zero => Request::WriteZeroes {
                        offset: at,
                        len: n,
                        may_unmap: false,
                    },
                    Src::Log(pos) => {
                        let mut v = vec![0u8; n as usize];
                        file.read_exact_at(&mut v, pos + (at - s))
                            .map_err(|e| self.inner.io_err(e))?;
                        Request::Write {
                            offset: at,
                            buf: IoBuffers::from_vec(v),
                            fua: false,
                        }
                    }
                };
                submit_wait(&*self.inner.base, req)
                    .map_err(|source| RedoLogError::Merge { offset: at, source })?;
                at += n;
            }
        }
        submit_wait(&*self.inner.base, Request::Flush)
            .map_err(|source| RedoLogError::Merge { offset: 0, source })?;
        // Rewrite the log without the merged records, with I/O held off.
        let mut st = self.inner.lock();
        let tmp = self.inner.path.with_extension("merge-tmp");
        let io = |e| self.inner.io_err(e);
        let new = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io)?;
        let mut out = start_record(point.0, st.last_time);
        let mut keep_from = None;
        scan(&st.file, self.inner.info.capacity, false, |f| {
            if f.repr.seq > point.0 {
                keep_from = Some(f.pos);
                return false;
            }
            true
        })
        .map_err(io)?;
        if let Some(from) = keep_from {
            let mut rest = vec![0u8; (st.tail - from) as usize];
            st.file.read_exact_at(&mut rest, from).map_err(io)?;
            out.extend_from_slice(&rest);
        }
        new.write_all_at(&out, 0).map_err(io)?;
        new.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.inner.path).map_err(io)?;
        if let Some(dir) = self
            .inner
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        let mut index = ExtentMap::default();
        let sc = scan(&new, self.inner.info.capacity, false, |f| {
            apply(&mut index, f);
            true
        })
        .map_err(io)?;
        st.file = Arc::new(new);
        st.tail = sc.valid_len;
        st.index = index;
        st.first_point = point.0;
        st.snapshots.retain(|s| s.point > point);
        Inner::invalidate_views(&mut st, |p| p < point.0);
        log::info!(
            "redo log {}: merged up to point {} into the base",
            self.inner.path.display(),
            point.0
        );
        Ok(())
    }

    /// Make every record durable (as a flush does).
    pub fn sync(&self) -> Result<(), RedoLogError> {
        self.inner
            .sync()
            .map_err(|e| self.inner.io_err(std::io::Error::other(e.to_string())))
    }
}

impl RedoView {
    /// The point it shows.
    pub fn point(&self) -> LogPoint {
        self.point
    }

    /// Entries in its extent index.
    pub fn extents(&self) -> usize {
        self.index.len()
    }

    /// Whether it still works (no revert or merge took its point away).
    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::SeqCst)
    }

    /// Read `len` bytes at `offset` into a vector.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        read_vec(self, offset, len)
    }
}

impl BlockBackend for RedoView {
    fn info(&self) -> BlockInfo {
        self.info
    }

    fn submit(&self, req: Request, done: Completion) {
        if let Err(e) = self.info.check(&req) {
            done.complete(Err(e));
            return;
        }
        if !self.is_valid() {
            done.complete(Err(BlockError::Other(format!(
                "redo log view of point {} is gone (reverted or merged)",
                self.point.0
            ))));
            return;
        }
        match req {
            Request::Read { offset, buf } => {
                assemble_read(&self.index, &self.file, &self.base, offset, buf, done)
            }
            Request::Flush => done.complete(Ok(())),
            _ => done.complete(Err(BlockError::ReadOnly)),
        }
    }
}

/// Open `path` as a log over `base` and report what replay found, without
/// keeping it open: for tools and fuzzing. Returns the stats.
pub fn replay(base: Arc<dyn BlockBackend>, path: &Path) -> Result<RedoLogStats, RedoLogError> {
    Ok(RedoLog::open(base, RedoLogOptions::new(path))?
        .handle()
        .stats())
}
