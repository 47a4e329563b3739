//! Simple synchronous back-ends, and the adapters that make them asynchronous.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use crate::{BlockBackend, BlockError, BlockInfo, BlockResult, Completion, IoBuffers, Request};

/// A back-end written as plain blocking calls. Wrap it in [`Inline`] when the
/// calls are quick and never block (memory, null), or in [`ThreadPool`] when
/// they may block (files, network).
pub trait SyncBackend: Send + Sync {
    /// Geometry and capabilities.
    fn info(&self) -> BlockInfo;
    /// Read `buf.len()` bytes at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &IoBuffers) -> BlockResult;
    /// Write `buf` at `offset`; with `fua`, return only once it is durable.
    fn write_at(&self, offset: u64, buf: &IoBuffers, fua: bool) -> BlockResult;
    /// Make every completed write durable.
    fn flush(&self) -> BlockResult;
    /// Deallocate a range. The default says it is unsupported.
    fn discard(&self, _offset: u64, _len: u64) -> BlockResult {
        Err(BlockError::Unsupported("discard"))
    }
    /// Make a range read as zeroes. The default writes zero-filled buffers.
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BlockResult {
        const CHUNK: u64 = 1 << 20;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write_at(offset + done, &IoBuffers::zeroed(n as usize), false)?;
            done += n;
        }
        Ok(())
    }

    /// Validate and execute one request.
    fn execute(&self, req: &Request) -> BlockResult {
        self.info().check(req)?;
        match req {
            Request::Read { offset, buf } => self.read_at(*offset, buf),
            Request::Write { offset, buf, fua } => self.write_at(*offset, buf, *fua),
            Request::Flush => self.flush(),
            Request::Discard { offset, len } => self.discard(*offset, *len),
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => self.write_zeroes(*offset, *len, *may_unmap),
        }
    }
}

/// Runs a [`SyncBackend`] on the submitting thread and completes before
/// `submit` returns. Only for back-ends whose calls never block.
#[derive(Debug)]
pub struct Inline<S>(pub S);

impl<S: SyncBackend> BlockBackend for Inline<S> {
    fn info(&self) -> BlockInfo {
        self.0.info()
    }
    fn submit(&self, req: Request, done: Completion) {
        let r = self.0.execute(&req);
        drop(req);
        done.complete(r)
    }
}

type Job = (Request, Completion);

/// Runs a [`SyncBackend`] on a small pool of worker threads, so one queue can
/// keep as many requests in flight as there are workers.
///
/// Requests are started in submission order; with more than one worker they
/// may complete out of order, as on real disks. Dropping the pool lets the
/// workers finish what was queued and exit.
pub struct ThreadPool<S> {
    inner: Arc<S>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl<S: SyncBackend + 'static> ThreadPool<S> {
    /// Start `threads` workers (at least one) named `name-N` over `backend`.
    pub fn new(backend: S, threads: usize, name: &str) -> std::io::Result<Self> {
        let inner = Arc::new(backend);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            // Workers hold the back-end only while they run a request, so
            // dropping the pool closes it at once, even when the last
            // reference goes away inside a completion on a worker.
            let be = Arc::downgrade(&inner);
            workers.push(
                thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let guard = rx.lock().unwrap_or_else(|e| e.into_inner());
                            guard.recv()
                        };
                        match job {
                            Ok((req, done)) => {
                                let r = match be.upgrade() {
                                    Some(be) => be.execute(&req),
                                    None => Err(BlockError::Dropped),
                                };
                                drop(req);
                                done.complete(r);
                            }
                            Err(_) => return,
                        }
                    })?,
            );
        }
        Ok(ThreadPool {
            inner,
            tx: Mutex::new(Some(tx)),
            workers,
        })
    }

    /// The wrapped back-end.
    pub fn backend(&self) -> &S {
        &self.inner
    }
}

impl<S: SyncBackend + 'static> BlockBackend for ThreadPool<S> {
    fn info(&self) -> BlockInfo {
        self.inner.info()
    }
    fn submit(&self, req: Request, done: Completion) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref() {
            // A send error hands the job back; dropping it completes with `Dropped`.
            Some(tx) => {
                let _ = tx.send((req, done));
            }
            None => done.complete(Err(BlockError::Dropped)),
        }
    }
}

impl<S> Drop for ThreadPool<S> {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The last reference may be dropped by a completion running on one of
        // our own workers: that worker exits by itself once the channel is
        // closed, and joining it from itself would fail.
        let me = thread::current().id();
        for w in self.workers.drain(..) {
            if w.thread().id() != me {
                let _ = w.join();
            }
        }
    }
}
