//! The raw-file back-end: a disk image file or a host block device, read and
//! written in place with vectored system calls straight into guest memory.
//!
//! [`RawFile`] is a [`SyncBackend`]: wrap it in [`crate::ThreadPool`], or hand it
//! to the io_uring engine ([`crate::UringFile`]); [`open_async`] picks one.
//!
//! How each [`CacheMode`] opens the file and what a completed request promises:
//!
//! | mode           | open flags | write completes when   | flush            | advertised |
//! |----------------|------------|------------------------|------------------|------------|
//! | `none`         | `O_DIRECT` | the device has it      | `fdatasync`      | volatile cache |
//! | `writethrough` | `O_DSYNC`  | it is on stable storage| `fdatasync`      | no volatile cache |
//! | `writeback`    | —          | it is in the page cache| `fdatasync`      | volatile cache |
//! | `unsafe`       | —          | it is in the page cache| ignored          | volatile cache |
//!
//! FUA writes use `pwritev2(RWF_DSYNC)` (or a write then `fdatasync` where the
//! kernel lacks it); `unsafe` ignores FUA as it ignores flushes. Discard punches a
//! hole, write-zeroes uses `FALLOC_FL_ZERO_RANGE` (a hole when the guest allows
//! unmapping); where the file system refuses either, zeroes are written instead,
//! so both always leave the range reading as zeroes.
//!
//! With `O_DIRECT`, guest buffers whose segments are not aligned to the logical
//! block size are copied through an aligned host buffer instead of failing.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::{
    BlockBackend, BlockError, BlockInfo, BlockResult, CacheMode, Features, IoBuffers, SyncBackend,
};

/// Most segments one vectored system call accepts (`UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;
/// Bounce buffers and zero-writing fallbacks work in chunks of this many bytes.
const CHUNK: usize = 1 << 20;
/// Requests the io_uring engine keeps in flight per back-end.
const URING_DEPTH: u32 = 128;
/// Worker threads of the thread-pool engine.
const POOL_THREADS: usize = 4;

/// Why a file back-end could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `open(2)` failed (missing file, permissions, `O_DIRECT` not supported by the file system).
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path given.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: io::Error,
    },
    /// Querying the size or geometry of the opened file failed.
    #[error("cannot read the {what} of {path}: {source}")]
    Query {
        /// The path given.
        path: PathBuf,
        /// What was asked (size, sector size, ...).
        what: &'static str,
        /// What the host said.
        #[source]
        source: io::Error,
    },
    /// The path is a directory, socket or similar.
    #[error("{path} is neither a regular file nor a block device")]
    NotADisk {
        /// The path given.
        path: PathBuf,
    },
    /// The requested logical block size is not a power of two in 512..=65536,
    /// or is smaller than what `O_DIRECT` needs on this file.
    #[error(
        "logical block size {block_size} is not usable (O_DIRECT needs a multiple of {required})"
    )]
    BlockSize {
        /// The requested size.
        block_size: u32,
        /// The smallest size `O_DIRECT` accepts on this file (512 if not using it).
        required: u32,
    },
    /// The asynchronous engine could not be started (io_uring refused by the
    /// kernel, or a thread could not be spawned).
    #[error("cannot start the {engine} engine: {source}")]
    Engine {
        /// Which engine.
        engine: &'static str,
        /// What the host said.
        #[source]
        source: io::Error,
    },
}

/// How [`RawFile`] opens a file: cache mode, read-only, logical block size.
///
/// ```no_run
/// use iovirt_backend::{AsyncEngine, CacheMode, RawFileOptions};
/// let disk = RawFileOptions::new(CacheMode::None)
///     .read_only(true)
///     .open_async("/dev/sdb", AsyncEngine::Auto)?;
/// # Ok::<(), iovirt_backend::OpenError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFileOptions {
    cache: CacheMode,
    read_only: bool,
    logical_block_size: Option<u32>,
}

impl RawFileOptions {
    /// Options for a writable disk in cache mode `cache`, with the logical block
    /// size detected (512, or what the device or `O_DIRECT` needs).
    pub fn new(cache: CacheMode) -> Self {
        RawFileOptions {
            cache,
            read_only: false,
            logical_block_size: None,
        }
    }

    /// Open read-only: writes, discards and write-zeroes fail with [`BlockError::ReadOnly`].
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Use this logical block size (a power of two, 512 to 65536; 2048 for CD images)
    /// instead of the detected one. The capacity is rounded down to it.
    pub fn logical_block_size(mut self, size: u32) -> Self {
        self.logical_block_size = Some(size);
        self
    }

    /// Open `path` as a synchronous [`RawFile`].
    pub fn open(&self, path: impl AsRef<Path>) -> Result<RawFile, OpenError> {
        RawFile::open_with(path.as_ref(), self)
    }

    /// Open `path` behind an asynchronous engine (see [`AsyncEngine`]).
    pub fn open_async(
        &self,
        path: impl AsRef<Path>,
        engine: AsyncEngine,
    ) -> Result<Arc<dyn BlockBackend>, OpenError> {
        let path = path.as_ref();
        let raw = self.open(path)?;
        let uring = match engine {
            AsyncEngine::ThreadPool => None,
            AsyncEngine::Uring => {
                Some(
                    crate::uring::Ring::new(URING_DEPTH).map_err(|e| OpenError::Engine {
                        engine: "io_uring",
                        source: e,
                    })?,
                )
            }
            AsyncEngine::Auto => match crate::uring::Ring::new(URING_DEPTH) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    log::info!(
                        "{}: io_uring unavailable ({e}), using the thread-pool engine",
                        path.display()
                    );
                    None
                }
            },
        };
        match uring {
            Some(ring) => {
                let file = crate::UringFile::with_ring(raw, ring)?;
                log::info!(
                    "{}: cache={}, io_uring engine, depth {URING_DEPTH}",
                    path.display(),
                    self.cache
                );
                Ok(Arc::new(file))
            }
            None => {
                let pool =
                    crate::ThreadPool::new(raw, POOL_THREADS, "iovirt-file").map_err(|e| {
                        OpenError::Engine {
                            engine: "thread-pool",
                            source: e,
                        }
                    })?;
                log::info!(
                    "{}: cache={}, thread-pool engine, {POOL_THREADS} threads",
                    path.display(),
                    self.cache
                );
                Ok(Arc::new(pool))
            }
        }
    }
}

/// Which asynchronous engine runs a [`RawFile`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AsyncEngine {
    /// io_uring where the kernel allows it (it may be disabled by seccomp or
    /// `kernel.io_uring_disabled`), the thread pool otherwise.
    #[default]
    Auto,
    /// io_uring, or fail to open.
    Uring,
    /// Blocking `preadv`/`pwritev` on a pool of worker threads.
    ThreadPool,
}

impl std::str::FromStr for AsyncEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AsyncEngine::Auto),
            "io_uring" | "uring" => Ok(AsyncEngine::Uring),
            "threads" | "thread-pool" => Ok(AsyncEngine::ThreadPool),
            other => Err(format!(
                "unknown I/O engine {other:?} (expected auto, io_uring or threads)"
            )),
        }
    }
}

/// Open `path` in cache mode `cache` behind an asynchronous engine; the chosen
/// engine is logged. The common case of [`RawFileOptions::open_async`].
pub fn open_async(
    path: impl AsRef<Path>,
    cache: CacheMode,
    read_only: bool,
    engine: AsyncEngine,
) -> Result<Arc<dyn BlockBackend>, OpenError> {
    RawFileOptions::new(cache)
        .read_only(read_only)
        .open_async(path, engine)
}

/// A host buffer aligned for `O_DIRECT`, built from an over-allocated vector.
pub(crate) struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes whose start is a multiple of `align` (a power of two).
    pub(crate) fn new(len: usize, align: usize) -> Self {
        let align = align.max(1);
        let mem = vec![0u8; len + align];
        let addr = mem.as_ptr() as usize;
        let start = (align - addr % align) % align;
        AlignedBuf { mem, start, len }
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }

    /// The buffer as one `iovec`; valid while `self` lives (moving `self` does not move the heap memory).
    pub(crate) fn iovec(&mut self) -> libc::iovec {
        let s = self.as_mut_slice();
        libc::iovec {
            iov_base: s.as_mut_ptr().cast(),
            iov_len: s.len(),
        }
    }
}

/// Drop the first `n` bytes of `iov`, in place (leading segments become empty).
pub(crate) fn advance_iovecs(iov: &mut [libc::iovec], mut n: usize) {
    for v in iov.iter_mut() {
        if n == 0 {
            break;
        }
        let k = n.min(v.iov_len);
        // Stays within the segment: k <= iov_len.
        v.iov_base = (v.iov_base as *mut u8).wrapping_add(k).cast();
        v.iov_len -= k;
        n -= k;
    }
}

/// Whether an I/O error means "this file or kernel does not implement that".
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

/// A disk image file or host block device, read and written in place.
///
/// ```
/// use iovirt_backend::{submit_wait, CacheMode, IoBuffers, RawFile, Request, ThreadPool};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.img");
/// std::fs::File::create(&path)?.set_len(1 << 20)?;
///
/// let disk = ThreadPool::new(RawFile::open(&path, CacheMode::Writeback, false)?, 2, "disk")?;
/// let data = IoBuffers::from_vec(vec![0x5a; 4096]);
/// submit_wait(&disk, Request::Write { offset: 4096, buf: data, fua: false })?;
/// submit_wait(&disk, Request::Flush)?; // fdatasync: the write is now durable
///
/// // Reads normally land in guest memory (`IoBuffers::from_guest`); any
/// // reader of the file sees the data too.
/// submit_wait(&disk, Request::Read { offset: 4096, buf: IoBuffers::zeroed(4096) })?;
/// assert_eq!(std::fs::read(&path)?[4096..8192], [0x5a; 4096]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    cache: CacheMode,
    info: BlockInfo,
    /// Alignment of memory, offsets and lengths that `O_DIRECT` needs; 1 without it.
    align: usize,
    no_rwf_dsync: AtomicBool,
    no_punch: AtomicBool,
    no_zero_range: AtomicBool,
    syncs: AtomicU64,
    bounced: AtomicU64,
}

impl RawFile {
    /// Open `path` (a regular file or a block device) in cache mode `cache`.
    pub fn open(
        path: impl AsRef<Path>,
        cache: CacheMode,
        read_only: bool,
    ) -> Result<Self, OpenError> {
        RawFileOptions::new(cache).read_only(read_only).open(path)
    }

    fn open_with(path: &Path, opts: &RawFileOptions) -> Result<Self, OpenError> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let flags = match opts.cache {
            CacheMode::None => libc::O_DIRECT,
            CacheMode::Writethrough => libc::O_DSYNC,
            CacheMode::Writeback | CacheMode::Unsafe => 0,
        };
        oo.custom_flags(flags);
        let file = oo.open(path).map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        let query = |what: &'static str| {
            let path = path.to_owned();
            move |source| OpenError::Query { path, what, source }
        };
        let meta = file.metadata().map_err(query("metadata"))?;
        let ft = meta.file_type();
        // (size in bytes, the device's logical sector size, physical block size)
        let (size, dev_sector, dev_physical) = if ft.is_file() {
            (meta.len(), 512u32, 4096u32)
        } else if ft.is_block_device() {
            let size = block_device_size(&file).map_err(query("size"))?;
            let sector = ioctl_u32(&file, libc::BLKSSZGET).map_err(query("sector size"))?;
            let phys = ioctl_u32(&file, libc::BLKPBSZGET).unwrap_or(sector);
            (size, sector.max(512), phys.max(sector).max(512))
        } else {
            return Err(OpenError::NotADisk {
                path: path.to_owned(),
            });
        };
        let direct_align = if opts.cache == CacheMode::None {
            if ft.is_block_device() {
                dev_sector
            } else {
                file_direct_alignment(&file, size)
            }
        } else {
            1
        };
        let required = direct_align.max(512);
        let lbs = opts
            .logical_block_size
            .unwrap_or(dev_sector.max(direct_align));
        if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) || lbs % required != 0 {
            return Err(OpenError::BlockSize {
                block_size: lbs,
                required,
            });
        }
        let mut features = Features::empty();
        if opts.read_only {
            features |= Features::READ_ONLY;
        } else {
            features |= Features::DISCARD | Features::WRITE_ZEROES | Features::FUA;
            if opts.cache != CacheMode::Writethrough {
                features |= Features::VOLATILE_CACHE;
            }
        }
        let info = BlockInfo {
            capacity: size / u64::from(lbs) * u64::from(lbs),
            logical_block_size: lbs,
            physical_block_size: if opts.logical_block_size.is_some() {
                lbs
            } else {
                dev_physical.max(lbs)
            },
            features,
        };
        log::debug!(
            "{}: {} bytes, {lbs}-byte blocks, cache={}, O_DIRECT alignment {direct_align}",
            path.display(),
            info.capacity,
            opts.cache
        );
        Ok(RawFile {
            file,
            path: path.to_owned(),
            cache: opts.cache,
            info,
            align: direct_align as usize,
            no_rwf_dsync: AtomicBool::new(false),
            no_punch: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
            syncs: AtomicU64::new(0),
            bounced: AtomicU64::new(0),
        })
    }

    /// The cache mode the file was opened with.
    pub fn cache_mode(&self) -> CacheMode {
        self.cache
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The memory, offset and length alignment `O_DIRECT` needs, or `None`
    /// when the file is not opened with `O_DIRECT`.
    pub fn direct_alignment(&self) -> Option<usize> {
        (self.cache == CacheMode::None).then_some(self.align)
    }

    /// How many `fdatasync`s (flushes, FUA fallbacks) this back-end has issued,
    /// including those made by the io_uring engine: for statistics and tests.
    pub fn sync_count(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// How many reads and writes went through an aligned bounce buffer because
    /// the guest's buffer did not suit `O_DIRECT`.
    pub fn bounce_count(&self) -> u64 {
        self.bounced.load(Ordering::Relaxed)
    }

    pub(crate) fn count_sync(&self) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_bounce(&self) {
        self.bounced.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `buf` has to go through an aligned bounce buffer for `O_DIRECT`,
    /// or has too many segments for one vectored call.
    pub(crate) fn needs_bounce(&self, buf: &IoBuffers) -> bool {
        let a = self.align;
        buf.segments() > IOV_MAX
            || (a > 1
                && buf
                    .iovecs()
                    .iter()
                    .any(|v| (v.iov_base as usize) % a != 0 || v.iov_len % a != 0))
    }

    pub(crate) fn align(&self) -> usize {
        self.align
    }

    /// Whether a flush does nothing (read-only, or `unsafe`).
    pub(crate) fn flush_is_noop(&self) -> bool {
        self.cache == CacheMode::Unsafe || self.info.features.contains(Features::READ_ONLY)
    }

    /// The `RWF_*` flags of a write: `RWF_DSYNC` for FUA where it matters.
    pub(crate) fn write_flags(&self, fua: bool) -> libc::c_int {
        if fua
            && matches!(self.cache, CacheMode::None | CacheMode::Writeback)
            && !self.no_rwf_dsync.load(Ordering::Relaxed)
        {
            libc::RWF_DSYNC
        } else {
            0
        }
    }

    /// Call fdatasync.
    pub(crate) fn datasync(&self) -> BlockResult {
        self.count_sync();
        self.file.sync_data().map_err(BlockError::Io)
    }

    /// After a discard or write-zeroes: in `writethrough` mode, make it durable now.
    pub(crate) fn after_metadata_change(&self) -> BlockResult {
        if self.cache == CacheMode::Writethrough {
            self.datasync()
        } else {
            Ok(())
        }
    }

    /// One `preadv` or `pwritev2` on at most [`IOV_MAX`] segments, retried on EINTR.
    fn rw_once(
        &self,
        write: bool,
        offset: u64,
        iov: &[libc::iovec],
        flags: i32,
    ) -> io::Result<usize> {
        let iov = &iov[..iov.len().min(IOV_MAX)];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        loop {
            let fd = self.file.as_raw_fd();
            // SAFETY: `iov` describes memory that the caller keeps alive (guest
            // memory held by an `IoBuffers`, or an `AlignedBuf`) for this call;
            // the count is at most IOV_MAX and matches the slice.
            let n = unsafe {
                if write {
                    libc::pwritev2(fd, iov.as_ptr(), iov.len() as libc::c_int, off, flags)
                } else {
                    libc::preadv(fd, iov.as_ptr(), iov.len() as libc::c_int, off)
                }
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Transfer all of `iov` at `offset`, going on after short transfers.
    /// Returns the bytes moved; reads stop early at end of file.
    fn rw_all(
        &self,
        write: bool,
        mut offset: u64,
        iov: &mut [libc::iovec],
        fua: bool,
    ) -> io::Result<usize> {
        let mut flags = if write { self.write_flags(fua) } else { 0 };
        let mut total = 0usize;
        let mut first = 0usize;
        loop {
            while first < iov.len() && iov[first].iov_len == 0 {
                first += 1;
            }
            if first == iov.len() {
                break;
            }
            let n = match self.rw_once(write, offset, &iov[first..], flags) {
                Ok(n) => n,
                Err(e) if flags != 0 && is_unsupported(&e) => {
                    // The kernel lacks RWF_DSYNC for this file: write, then fdatasync.
                    self.no_rwf_dsync.store(true, Ordering::Relaxed);
                    flags = 0;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if n == 0 {
                if write {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "pwritev wrote nothing",
                    ));
                }
                break;
            }
            total += n;
            offset += n as u64;
            advance_iovecs(&mut iov[first..], n);
        }
        if write && fua && flags == 0 && self.write_flags_wanted(fua) {
            self.count_sync();
            self.file.sync_data()?;
        }
        Ok(total)
    }

    /// Whether a FUA write needs more than the open flags give.
    fn write_flags_wanted(&self, fua: bool) -> bool {
        fua && matches!(self.cache, CacheMode::None | CacheMode::Writeback)
    }

    /// Read `buf` at `offset`, starting `skip` bytes into the request (the first
    /// `skip` bytes are already there). Reads past the end of the file give zeroes.
    pub(crate) fn read_from(&self, offset: u64, buf: &IoBuffers, skip: usize) -> BlockResult {
        let len = buf.len();
        if skip >= len {
            return Ok(());
        }
        if self.needs_bounce(buf) {
            self.count_bounce();
            return self.bounce_read(offset, buf, skip);
        }
        let mut iov = buf.iovecs();
        advance_iovecs(&mut iov, skip);
        let n = self.rw_all(false, offset + skip as u64, &mut iov, false)?;
        if skip + n < len {
            buf.fill_zero_at(skip + n, len - skip - n);
        }
        Ok(())
    }

    /// Write `buf` at `offset`, starting `skip` bytes into the request.
    pub(crate) fn write_from(
        &self,
        offset: u64,
        buf: &IoBuffers,
        skip: usize,
        fua: bool,
    ) -> BlockResult {
        if skip >= buf.len() {
            return if self.write_flags_wanted(fua) {
                self.datasync()
            } else {
                Ok(())
            };
        }
        if self.needs_bounce(buf) {
            self.count_bounce();
            return self.bounce_write(offset, buf, skip, fua);
        }
        let mut iov = buf.iovecs();
        advance_iovecs(&mut iov, skip);
        self.rw_all(true, offset + skip as u64, &mut iov, fua)?;
        Ok(())
    }

    fn bounce_read(&self, offset: u64, buf: &IoBuffers, skip: usize) -> BlockResult {
        let len = buf.len();
        // `skip` may be unaligned (after a short io_uring read): restart at the
        // aligned position below it, which re-reads a few bytes.
        let a = self.align.max(1);
        let mut pos = skip / a * a;
        let mut bounce = AlignedBuf::new(CHUNK.min(len - pos).next_multiple_of(a), a);
        while pos < len {
            let n = (len - pos).min(CHUNK);
            let want = n.next_multiple_of(a);
            let mut iov = [bounce.iovec()];
            iov[0].iov_len = want;
            let got = self.rw_all(false, offset + pos as u64, &mut iov, false)?;
            let got = got.min(n);
            buf.copy_from_slice_at(pos, &bounce.as_slice()[..got]);
            if got < n {
                buf.fill_zero_at(pos + got, len - pos - got);
                break;
            }
            pos += n;
        }
        Ok(())
    }

    fn bounce_write(&self, offset: u64, buf: &IoBuffers, skip: usize, fua: bool) -> BlockResult {
        let len = buf.len();
        let a = self.align.max(1);
        let mut pos = skip / a * a;
        let mut bounce = AlignedBuf::new(CHUNK.min(len - pos), a);
        while pos < len {
            let n = (len - pos).min(CHUNK);
            buf.copy_to_slice_at(pos, &mut bounce.as_mut_slice()[..n]);
            let mut iov = [bounce.iovec()];
            iov[0].iov_len = n;
            // FUA on the last chunk covers the earlier ones too (RWF_DSYNC and
            // fdatasync both make all of the file's written data durable).
            self.rw_all(true, offset + pos as u64, &mut iov, fua && pos + n == len)?;
            pos += n;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let l = libc::off_t::try_from(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        loop {
            // SAFETY: fallocate on a file descriptor we own; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Write real zeroes over the range (the fallback for file systems that refuse fallocate modes).
    pub(crate) fn write_zero_blocks(&self, offset: u64, len: u64) -> BlockResult {
        let a = self.align.max(1);
        let mut zero = AlignedBuf::new((len.min(CHUNK as u64)) as usize, a);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let mut iov = [zero.iovec()];
            iov[0].iov_len = n;
            self.rw_all(true, offset + done, &mut iov, false)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Record that the file system refused a fallocate `mode`, so later requests
    /// skip straight to writing zeroes. Returns whether `e` was such a refusal.
    pub(crate) fn note_fallocate_refusal(&self, mode: libc::c_int, e: &io::Error) -> bool {
        if !(is_unsupported(e) || e.raw_os_error() == Some(libc::EINVAL)) {
            return false;
        }
        if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            self.no_punch.store(true, Ordering::Relaxed);
        } else {
            self.no_zero_range.store(true, Ordering::Relaxed);
        }
        log::debug!(
            "{}: fallocate mode {mode:#x} refused ({e}); writing zeroes instead",
            self.path.display()
        );
        true
    }

    /// The fallocate mode for a discard (`unmap`) or write-zeroes, or `None` if
    /// the file system is known to refuse it.
    pub(crate) fn fallocate_mode(&self, unmap: bool) -> Option<libc::c_int> {
        if unmap {
            (!self.no_punch.load(Ordering::Relaxed))
                .then_some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
        } else {
            (!self.no_zero_range.load(Ordering::Relaxed))
                .then_some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
        }
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> BlockResult {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate_mode(unmap) {
            Some(mode) => match self.fallocate(mode, offset, len) {
                Ok(()) => {}
                Err(e) if self.note_fallocate_refusal(mode, &e) => {
                    self.write_zero_blocks(offset, len)?
                }
                Err(e) => return Err(BlockError::Io(e)),
            },
            None => self.write_zero_blocks(offset, len)?,
        }
        self.after_metadata_change()
    }
}

impl AsRawFd for RawFile {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl SyncBackend for RawFile {
    fn info(&self) -> BlockInfo {
        self.info
    }

    fn read_at(&self, offset: u64, buf: &IoBuffers) -> BlockResult {
        self.read_from(offset, buf, 0)
    }

    fn write_at(&self, offset: u64, buf: &IoBuffers, fua: bool) -> BlockResult {
        self.write_from(offset, buf, 0, fua)
    }

    fn flush(&self) -> BlockResult {
        if self.flush_is_noop() {
            return Ok(());
        }
        self.datasync()
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult {
        self.zero_range(offset, len, may_unmap)
    }
}

fn ioctl_u32(file: &File, req: libc::Ioctl) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET and BLKPBSZGET write one int through the pointer, which
    // points at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The size of a block device: `BLKGETSIZE64` where its number is known, else `lseek(SEEK_END)`.
fn block_device_size(file: &File) -> io::Result<u64> {
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    {
        // _IOR(0x12, 114, size_t) on these architectures.
        const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
        let mut v: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut v as *mut u64) };
        if r == 0 {
            return Ok(v);
        }
    }
    use std::io::Seek;
    let mut f = file;
    let end = f.seek(io::SeekFrom::End(0))?;
    f.seek(io::SeekFrom::Start(0))?;
    Ok(end)
}

/// The `O_DIRECT` alignment of a regular file opened with it: `statx`'s
/// `STATX_DIOALIGN` where the kernel reports it, else a probe read (512 works,
/// or 4096 is needed).
fn file_direct_alignment(file: &File, size: u64) -> u32 {
    // SAFETY: statx fills the zeroed struct we pass; the empty path with
    // AT_EMPTY_PATH names the descriptor itself.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the path is a valid NUL-terminated string.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        let a = stx.stx_dio_offset_align.max(stx.stx_dio_mem_align);
        return a.max(512);
    }
    // Probe: a 512-byte read at a 512-aligned (but not 4096-aligned) address.
    if size >= 512 {
        let mut buf = AlignedBuf::new(4096, 4096);
        let mut iov = [buf.iovec()];
        iov[0].iov_base = (iov[0].iov_base as *mut u8).wrapping_add(512).cast();
        iov[0].iov_len = 512;
        // SAFETY: the iovec lies inside `buf` (512..1024 of 4096 bytes), alive for the call.
        let n = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), 1, 0) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            return 4096;
        }
    }
    512
}
