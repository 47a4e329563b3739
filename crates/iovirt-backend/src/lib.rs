//! # iovirt-backend: where a block request meets storage
//!
//! In iovirt's I/O path (guest driver → trap → bus → front-end device →
//! filters → scheduler → **back-end**), this crate defines what every stage
//! below the front-end speaks: a [`Request`] (read, write, flush, discard,
//! write-zeroes) over [`IoBuffers`] that point into guest memory, submitted to a
//! [`BlockBackend`] and finished through a [`Completion`]. Filters (encryption,
//! replication, logs) are back-ends that wrap back-ends; the scheduler queues
//! requests before any back-end sees them; remote back-ends complete later, on
//! their own threads. Nothing here knows a hypervisor or a device model.
//!
//! Back-ends must never trust a request: [`BlockInfo::check`] rejects requests
//! out of range, misaligned, or writing to a read-only disk, with a typed
//! [`BlockError`] that maps to the status the guest sees ([`DeviceStatus`]).
//! Guest memory is reached only through `vm-memory` volatile slices.
//!
//! ## Where completions run
//!
//! By default a back-end completes inline (memory, null) or on its own
//! threads (the thread pool, io_uring's reaper). A device model with its own
//! event loop can do better with two optional hooks, both defaulted so that
//! simple back-ends and filters need not care:
//! [`BlockBackend::plug`]/[`BlockBackend::unplug`] bracket a burst of
//! submissions (io_uring enters them in a few system calls), and
//! [`BlockBackend::completion_fd`] hands completion delivery to the owner,
//! which watches that eventfd and calls [`BlockBackend::poll_completions`] on
//! its own thread: one thread wake-up per completion batch instead of two.
//! Single-child filters pass both through; filters over several children do
//! not offer `completion_fd`.
//!
//! ## The durability contract
//!
//! - A write completes only when the back-end's [`CacheMode`] promise holds:
//!   `none` and `writethrough` complete writes that are on stable storage
//!   (O_DIRECT plus a volatile-cache flag and flushes, or O_DSYNC);
//!   `writeback` completes writes that are in the host page cache and
//!   advertises [`Features::VOLATILE_CACHE`], so the guest must flush;
//!   `unsafe` ignores flushes and is only used when asked for by name.
//! - A [`Request::Flush`] completes only when every write that completed
//!   before the flush was submitted is on stable storage.
//! - A write with `fua` completes only when it is on stable storage.
//! - Filters pass flush, FUA, discard and write-zeroes on with their meaning.
//!
//! ```
//! use iovirt_backend::{submit_wait, BlockBackend, Completion, Inline, IoBuffers, MemoryBackend, Request};
//!
//! let disk = Inline(MemoryBackend::new(1 << 20));
//! let data = IoBuffers::from_vec(vec![0xab; 4096]);
//! submit_wait(&disk, Request::Write { offset: 8192, buf: data, fua: false }).unwrap();
//! submit_wait(&disk, Request::Flush).unwrap();
//!
//! // Completions may run on any thread, and before `submit` returns.
//! let (tx, rx) = std::sync::mpsc::channel();
//! disk.submit(
//!     Request::Read { offset: 8192, buf: IoBuffers::zeroed(4096) },
//!     Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
//! );
//! assert!(rx.recv().unwrap());
//! // Out of range: a typed error, never a panic.
//! let err = submit_wait(&disk, Request::Read { offset: 1 << 20, buf: IoBuffers::zeroed(512) });
//! assert!(err.is_err());
//! ```
#![deny(missing_docs)]

mod buffer;
mod error;
mod file;
mod image;
mod memory;
mod request;
mod sync;
mod uring;

pub use buffer::{Direction, IoBuffers};
pub use error::{BlockError, BlockResult, DeviceStatus};
pub use file::{open_async, AsyncEngine, OpenError, RawFile, RawFileOptions};
pub use image::{open_image, CD_SECTOR_SIZE};
pub use memory::{MemoryBackend, NullBackend};
pub use request::{
    clear_completion_fd, submit_wait, BlockBackend, BlockInfo, Completion, Features, Request,
};
pub use sync::{Inline, SyncBackend, ThreadPool};
pub use uring::{UringFile, DEFAULT_URING_DEPTH, PLUG_BATCH, URING_WATCHDOG};

use serde::{Deserialize, Serialize};

/// How a file back-end uses the host's page cache, and what a completed write promises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT: bypass the page cache. The disk's own cache may still hold
    /// writes, so the device advertises a volatile cache and flushes reach fdatasync.
    #[default]
    None,
    /// O_DSYNC: every completed write is on stable storage.
    Writethrough,
    /// Page cache: writes complete when cached; a flush runs fdatasync.
    Writeback,
    /// Page cache, flushes ignored: fast and unsafe, only when asked for by name.
    Unsafe,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CacheMode::None),
            "writethrough" => Ok(CacheMode::Writethrough),
            "writeback" => Ok(CacheMode::Writeback),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(format!(
                "unknown cache mode {other:?} (expected none, writethrough, writeback or unsafe)"
            )),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Writeback => "writeback",
            CacheMode::Unsafe => "unsafe",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn check_rejects_bad_requests() {
        let disk = Inline(MemoryBackend::new(4096).read_only());
        let r = submit_wait(
            &disk,
            Request::Write {
                offset: 0,
                buf: IoBuffers::zeroed(512),
                fua: false,
            },
        );
        assert!(matches!(r, Err(BlockError::ReadOnly)));
        let r = submit_wait(
            &disk,
            Request::Read {
                offset: 1,
                buf: IoBuffers::zeroed(512),
            },
        );
        assert!(matches!(r, Err(BlockError::Misaligned { .. })));
        let r = submit_wait(
            &disk,
            Request::Read {
                offset: u64::MAX - 511,
                buf: IoBuffers::zeroed(512),
            },
        );
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
        assert_eq!(
            BlockError::Unsupported("x").status(),
            DeviceStatus::Unsupported
        );
    }

    #[test]
    fn dropped_completion_reports_dropped() {
        let got = Arc::new(AtomicUsize::new(0));
        let g = got.clone();
        let c = Completion::new(move |r| {
            assert!(matches!(r, Err(BlockError::Dropped)));
            g.fetch_add(1, Ordering::SeqCst);
        });
        drop(c);
        assert_eq!(got.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn thread_pool_dropped_from_its_own_worker() {
        let pool = Arc::new(ThreadPool::new(MemoryBackend::new(4096), 2, "self-drop").unwrap());
        let keep = Arc::new(std::sync::Mutex::new(Some(pool.clone())));
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (tx, rx) = std::sync::mpsc::channel();
        let k = keep.clone();
        pool.submit(
            Request::Flush,
            Completion::new(move |r| {
                // Wait until the test has dropped its reference, then drop the
                // last one here, on the worker thread itself.
                go_rx.recv().unwrap();
                k.lock().unwrap().take();
                tx.send(r.is_ok()).unwrap();
            }),
        );
        drop(pool);
        go_tx.send(()).unwrap();
        assert!(rx.recv().unwrap());
    }

    #[test]
    fn thread_pool_keeps_many_in_flight() {
        let pool = ThreadPool::new(MemoryBackend::new(1 << 20), 4, "test-pool").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..64u64 {
            let tx = tx.clone();
            pool.submit(
                Request::Write {
                    offset: i * 4096,
                    buf: IoBuffers::from_vec(vec![i as u8; 4096]),
                    fua: false,
                },
                Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
            );
        }
        assert!((0..64).all(|_| rx.recv().unwrap()));
        let back = IoBuffers::zeroed(4096);
        let buf_view = back.to_vec();
        assert_eq!(buf_view, vec![0; 4096]);
        submit_wait(
            &pool,
            Request::Read {
                offset: 63 * 4096,
                buf: back,
            },
        )
        .unwrap();
        assert_eq!(pool.backend().contents()[63 * 4096], 63);
        assert_eq!(
            "writeback".parse::<CacheMode>().unwrap(),
            CacheMode::Writeback
        );
        assert!("fast".parse::<CacheMode>().is_err());
    }
}
