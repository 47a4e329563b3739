//! Building blocks shared by the multi-child filters (aggregation, mirror,
//! multipath, redo log): a scratch buffer a filter can read back after its
//! own read completed, and a join that completes a request once all of its
//! parts have.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use iovirt_backend::{BlockError, BlockResult, Completion, IoBuffers};

/// Host memory a child reads into and the filter reads back after the
/// completion: the request owns one view of the buffer, the filter keeps
/// another ([`IoBuffers`] clones share their memory).
pub(crate) struct Scratch {
    buf: IoBuffers,
}

impl Scratch {
    /// A zero-filled scratch area of `len` bytes.
    pub(crate) fn new(len: usize) -> Result<Self, BlockError> {
        Ok(Scratch {
            buf: IoBuffers::zeroed(len),
        })
    }

    /// A buffer over the whole area for a child's read.
    pub(crate) fn buffers(&self) -> Result<IoBuffers, BlockError> {
        Ok(self.buf.clone())
    }

    /// The area's bytes.
    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.buf.to_vec()
    }

    /// The area's bytes, shared.
    pub(crate) fn to_arc(&self) -> Arc<[u8]> {
        self.buf.to_vec().into()
    }

    /// Read `len` bytes from the child at `offset` of the disk.
    pub(crate) fn read_request(
        len: usize,
        offset: u64,
    ) -> Result<(Self, iovirt_backend::Request), BlockError> {
        let s = Scratch::new(len)?;
        let buf = s.buffers()?;
        Ok((s, iovirt_backend::Request::Read { offset, buf }))
    }
}

/// Completes `done` once `n` parts have completed: with the first error
/// reported by a part (its status kept), else success.
pub(crate) struct Join {
    left: AtomicUsize,
    first_err: Mutex<Option<BlockError>>,
    done: Mutex<Option<Completion>>,
}

impl Join {
    /// A join of `n` parts (at least one) completing `done`.
    pub(crate) fn new(n: usize, done: Completion) -> Arc<Self> {
        Arc::new(Join {
            left: AtomicUsize::new(n.max(1)),
            first_err: Mutex::new(None),
            done: Mutex::new(Some(done)),
        })
    }

    /// One part is done with `r`.
    pub(crate) fn part(&self, r: BlockResult) {
        if let Err(e) = r {
            let mut first = self.first_err.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                *first = Some(e);
            }
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let err = self
                .first_err
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(done) = done {
                done.complete(err.map_or(Ok(()), Err));
            }
        }
    }

    /// A completion for one part.
    pub(crate) fn completion(self: &Arc<Self>) -> Completion {
        let me = self.clone();
        Completion::new(move |r| me.part(r))
    }
}

/// A copy of an error for a second reporter ([`BlockError`] is not `Clone`):
/// the same variant where it carries no host object, else an I/O error with
/// the same kind and message, so the device status is kept.
pub(crate) fn clone_error(e: &BlockError) -> BlockError {
    match e {
        BlockError::OutOfRange {
            offset,
            len,
            capacity,
        } => BlockError::OutOfRange {
            offset: *offset,
            len: *len,
            capacity: *capacity,
        },
        BlockError::Misaligned {
            offset,
            len,
            block_size,
        } => BlockError::Misaligned {
            offset: *offset,
            len: *len,
            block_size: *block_size,
        },
        BlockError::ReadOnly => BlockError::ReadOnly,
        BlockError::Unsupported(op) => BlockError::Unsupported(op),
        BlockError::Io(io) => BlockError::Io(std::io::Error::new(io.kind(), io.to_string())),
        BlockError::Buffer(s) => BlockError::Buffer(s.clone()),
        BlockError::Dropped => BlockError::Dropped,
        BlockError::Other(s) => BlockError::Other(s.clone()),
    }
}
