//! Requests, completions and the asynchronous [`BlockBackend`] trait.

use std::sync::mpsc;

use bitflags::bitflags;
use serde::{Deserialize, Serialize};

use crate::{BlockError, BlockResult, IoBuffers};

bitflags! {
    /// What a back-end can do and promises.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Features: u32 {
        /// Writes, discards and write-zeroes fail with [`BlockError::ReadOnly`].
        const READ_ONLY = 1 << 0;
        /// Completed writes may sit in a volatile cache until a flush: the device
        /// must advertise a write cache and honour the guest's flushes.
        const VOLATILE_CACHE = 1 << 1;
        /// Discard (trim/unmap) is implemented.
        const DISCARD = 1 << 2;
        /// Write-zeroes is implemented efficiently.
        const WRITE_ZEROES = 1 << 3;
        /// Force-unit-access writes are honoured without a full flush.
        const FUA = 1 << 4;
    }
}

/// Geometry and capabilities of a back-end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// Capacity in bytes (a multiple of `logical_block_size`).
    pub capacity: u64,
    /// Smallest addressable unit in bytes (512 or 4096; 2048 for CD-ROM images).
    pub logical_block_size: u32,
    /// Preferred I/O granularity in bytes.
    pub physical_block_size: u32,
    /// Capabilities and promises.
    pub features: Features,
}

impl BlockInfo {
    /// Validate `req` against this geometry: range, alignment and read-only.
    /// Back-ends and filters call this before doing any I/O.
    pub fn check(&self, req: &Request) -> BlockResult {
        let (offset, len, writes) = match req {
            Request::Read { offset, buf } => (*offset, buf.len() as u64, false),
            Request::Write { offset, buf, .. } => (*offset, buf.len() as u64, true),
            Request::Flush => return Ok(()),
            Request::Discard { offset, len } => {
                if !self.features.contains(Features::DISCARD) {
                    return Err(BlockError::Unsupported("discard"));
                }
                (*offset, *len, true)
            }
            Request::WriteZeroes { offset, len, .. } => (*offset, *len, true),
        };
        if writes && self.features.contains(Features::READ_ONLY) {
            return Err(BlockError::ReadOnly);
        }
        let bs = u64::from(self.logical_block_size.max(1));
        if offset % bs != 0 || len % bs != 0 {
            return Err(BlockError::Misaligned {
                offset,
                len,
                block_size: self.logical_block_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                capacity: self.capacity,
            }),
        }
    }
}

/// One block request. Offsets and lengths are in bytes.
#[derive(Debug)]
pub enum Request {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read {
        /// First byte on the disk.
        offset: u64,
        /// Where the data goes.
        buf: IoBuffers,
    },
    /// Write `buf` at `offset`.
    Write {
        /// First byte on the disk.
        offset: u64,
        /// The data.
        buf: IoBuffers,
        /// Force unit access: complete only when this write is on stable storage.
        fua: bool,
    },
    /// Make every write completed before this request durable.
    Flush,
    /// The guest no longer needs `[offset, offset + len)`.
    Discard {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Make `[offset, offset + len)` read as zeroes.
    WriteZeroes {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The back-end may deallocate the range instead of writing zeroes.
        may_unmap: bool,
    },
}

impl Request {
    /// A short name of the operation, for logs and statistics.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Read { .. } => "read",
            Request::Write { .. } => "write",
            Request::Flush => "flush",
            Request::Discard { .. } => "discard",
            Request::WriteZeroes { .. } => "write-zeroes",
        }
    }

    /// Number of bytes the request covers on the disk (0 for a flush).
    pub fn disk_len(&self) -> u64 {
        match self {
            Request::Read { buf, .. } | Request::Write { buf, .. } => buf.len() as u64,
            Request::Discard { len, .. } | Request::WriteZeroes { len, .. } => *len,
            Request::Flush => 0,
        }
    }
}

/// The completion of a request: called exactly once with the result.
///
/// If a completion is dropped without being called (a back-end bug, or a
/// back-end shutting down), it completes with [`BlockError::Dropped`], so a
/// guest is never left waiting for a request that will not finish.
pub struct Completion {
    f: Option<Box<dyn FnOnce(BlockResult) + Send>>,
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

impl Completion {
    /// A completion that runs `f` with the result.
    pub fn new(f: impl FnOnce(BlockResult) + Send + 'static) -> Self {
        Completion {
            f: Some(Box::new(f)),
        }
    }

    /// Complete the request.
    pub fn complete(mut self, result: BlockResult) {
        if let Some(f) = self.f.take() {
            f(result)
        }
    }

    /// A completion that runs `then` on the result and then completes `self`
    /// with what `then` returns; filters use this to post-process results.
    pub fn map(self, then: impl FnOnce(BlockResult) -> BlockResult + Send + 'static) -> Self {
        Completion::new(move |r| self.complete(then(r)))
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            f(Err(BlockError::Dropped))
        }
    }
}

/// A block back-end: accepts requests and completes them, possibly out of
/// order and on another thread.
///
/// Implementations must validate requests (see [`BlockInfo::check`]), may keep
/// many requests in flight, and must honour the durability contract of the
/// crate docs: a write completes only when the back-end's cache mode says it is
/// safe, and a [`Request::Flush`] completes only when every write completed
/// before it was submitted is on stable storage.
pub trait BlockBackend: Send + Sync {
    /// Geometry and capabilities.
    fn info(&self) -> BlockInfo;

    /// Submit `req`; `done` is called exactly once when it completes (possibly
    /// before `submit` returns).
    fn submit(&self, req: Request, done: Completion);

    /// Hold submissions back until [`BlockBackend::unplug`], so that a burst
    /// of requests reaches the kernel in one system call (as Linux's block
    /// plugging does). Requests submitted while plugged still complete; the
    /// back-end may start them at any time before the matching `unplug`.
    /// Calls nest. The default does nothing.
    fn plug(&self) {}

    /// End a [`BlockBackend::plug`]: start everything held back.
    fn unplug(&self) {}

    /// Completion polling, for an owner with its own event loop: a
    /// back-end that can run its completions on the owner's thread returns
    /// an eventfd that becomes readable when completions are ready. The
    /// owner watches it (level-triggered), and when it fires clears it
    /// ([`clear_completion_fd`]) and then calls
    /// [`BlockBackend::poll_completions`]. Asking for the descriptor hands
    /// completion delivery to the caller: the back-end's own completion
    /// thread, if it has one, steps back to a slow watchdog that only reaps
    /// what the owner leaves for long. `None` (the default): completions
    /// arrive inline or on the back-end's threads, as before.
    ///
    /// This saves one thread wake-up per completion batch.
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Run the completions that are ready, on the calling thread; returns
    /// how many. No system call when nothing is ready. The default does
    /// nothing and returns 0.
    fn poll_completions(&self) -> usize {
        0
    }
}

/// A pointer to a back-end is that back-end: every method forwards.
macro_rules! forward_backend {
    ($($ptr:ident)::+) => {
        impl<T: BlockBackend + ?Sized> BlockBackend for $($ptr)::+<T> {
            fn info(&self) -> BlockInfo {
                (**self).info()
            }
            fn submit(&self, req: Request, done: Completion) {
                (**self).submit(req, done)
            }
            fn plug(&self) {
                (**self).plug()
            }
            fn unplug(&self) {
                (**self).unplug()
            }
            fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
                (**self).completion_fd()
            }
            fn poll_completions(&self) -> usize {
                (**self).poll_completions()
            }
        }
    };
}

forward_backend!(std::sync::Arc);
forward_backend!(Box);

/// Clear a [`BlockBackend::completion_fd`] after it fired (it is a
/// non-blocking eventfd: reading 8 bytes resets it; a clear one just fails),
/// before calling [`BlockBackend::poll_completions`].
pub fn clear_completion_fd(fd: std::os::fd::RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live local. `fd` is the back-end's
    // eventfd, open while the back-end lives; a stale or foreign descriptor
    // makes read fail or consume a counter, never touch other memory.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), std::mem::size_of::<u64>());
    }
}

/// Submit `req` and wait for its completion: for tools, tests and start-up code,
/// never for a vCPU thread.
pub fn submit_wait<B: BlockBackend + ?Sized>(backend: &B, req: Request) -> BlockResult {
    let (tx, rx) = mpsc::sync_channel(1);
    backend.submit(
        req,
        Completion::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    rx.recv().unwrap_or(Err(BlockError::Dropped))
}
