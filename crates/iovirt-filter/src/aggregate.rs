//! Aggregation: concatenation and striping of several children into one disk.
//!
//! [`Aggregate::concat`] puts the children one after another: the disk is as
//! large as their sum. [`Aggregate::stripe`] interleaves them in chunks of
//! `chunk` bytes (RAID-0): chunk `k` of the disk is chunk `k / n` of child
//! `k % n`; every child contributes the same number of whole chunks (the
//! smallest child's), so the disk is `n` times that.
//!
//! A request is split at child boundaries and chunks. The pieces that land
//! on one child are contiguous there (consecutive stripe rows follow each
//! other on a child), so each child gets at most one request per guest
//! request, and the request completes when every part has: with the first
//! error a part reported (its device status kept), else success. A request
//! on a single child passes through with the guest's own buffer; one that
//! spans children copies its data through host buffers. Flush goes to every
//! child; discard and write-zeroes are split like writes. Each child may be
//! any back-end or stack.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::aggregate::Aggregate;
//!
//! let a = Arc::new(Inline(MemoryBackend::new(64 << 10)));
//! let b = Arc::new(Inline(MemoryBackend::new(64 << 10)));
//! let disk = Aggregate::stripe(vec![a.clone(), b.clone()], 4096)?;
//! assert_eq!(disk.info().capacity, 128 << 10);
//! // 8 KiB at byte 4096: chunk 1 (b's first) and chunk 2 (a's second).
//! submit_wait(&disk, Request::Write { offset: 4096, buf: IoBuffers::from_vec(vec![5; 8192]), fua: false })?;
//! assert_eq!(b.0.contents()[..4096], [5; 4096]);
//! assert_eq!(a.0.contents()[4096..8192], [5; 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod parts;

use std::sync::Arc;

use iovirt_backend::{BlockBackend, BlockInfo, Completion, Features, IoBuffers, Request};

use parts::{Join, Scratch};

/// How the children make up the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One after another.
    Concat,
    /// Interleaved in chunks of this many bytes.
    Stripe {
        /// Bytes per chunk.
        chunk: u64,
    },
}

/// Why an aggregate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// It needs at least one child.
    #[error("an aggregate needs at least one child")]
    NoChildren,
    /// The chunk size is zero or not whole logical blocks.
    #[error("stripe chunk size {chunk} is not a positive multiple of the {block_size}-byte block")]
    Chunk {
        /// The chunk size.
        chunk: u64,
        /// The logical block size.
        block_size: u32,
    },
    /// A child's size is not whole logical blocks of the aggregate.
    #[error("child {child} has {capacity} bytes, not whole {block_size}-byte blocks")]
    Alignment {
        /// The child.
        child: usize,
        /// Its capacity.
        capacity: u64,
        /// The aggregate's logical block size.
        block_size: u32,
    },
    /// The disk would be empty (a child smaller than one chunk) or overflow.
    #[error("the aggregate would have no usable capacity: {0}")]
    Capacity(String),
}

/// Concatenation or striping of several children; see the [module docs](self).
pub struct Aggregate {
    children: Vec<Arc<dyn BlockBackend>>,
    layout: Layout,
    /// Concat: the first disk byte of each child, and the end.
    starts: Vec<u64>,
    info: BlockInfo,
}

impl std::fmt::Debug for Aggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregate")
            .field("layout", &self.layout)
            .field("children", &self.children.len())
            .field("capacity", &self.info.capacity)
            .finish()
    }
}

/// One child's share of a request: a contiguous child range made of
/// pieces of the request (offset in the request, length), in order.
struct Part {
    child: usize,
    child_off: u64,
    len: u64,
    pieces: Vec<(u64, u64)>,
}

impl Aggregate {
    /// The children one after another.
    pub fn concat(children: Vec<Arc<dyn BlockBackend>>) -> Result<Self, AggregateError> {
        Self::new(children, Layout::Concat)
    }

    /// The children interleaved in chunks of `chunk` bytes.
    pub fn stripe(
        children: Vec<Arc<dyn BlockBackend>>,
        chunk: u64,
    ) -> Result<Self, AggregateError> {
        Self::new(children, Layout::Stripe { chunk })
    }

    /// An aggregate of `children` laid out as `layout`.
    pub fn new(
        children: Vec<Arc<dyn BlockBackend>>,
        layout: Layout,
    ) -> Result<Self, AggregateError> {
        let infos: Vec<BlockInfo> = children.iter().map(|c| c.info()).collect();
        let first = *infos.first().ok_or(AggregateError::NoChildren)?;
        let mut info = first;
        let mut all = Features::DISCARD | Features::WRITE_ZEROES | Features::FUA;
        let mut any = Features::empty();
        for i in &infos {
            info.logical_block_size = info.logical_block_size.max(i.logical_block_size);
            info.physical_block_size = info.physical_block_size.max(i.physical_block_size);
            all &= i.features;
            any |= i.features;
        }
        info.features = all | (any & (Features::READ_ONLY | Features::VOLATILE_CACHE));
        let bs = u64::from(info.logical_block_size.max(1));
        let mut starts = Vec::with_capacity(children.len() + 1);
        match layout {
            Layout::Concat => {
                let mut at = 0u64;
                for (c, i) in infos.iter().enumerate() {
                    if i.capacity % bs != 0 {
                        return Err(AggregateError::Alignment {
                            child: c,
                            capacity: i.capacity,
                            block_size: info.logical_block_size,
                        });
                    }
                    starts.push(at);
                    at = at
                        .checked_add(i.capacity)
                        .ok_or_else(|| AggregateError::Capacity("sizes overflow".into()))?;
                }
                starts.push(at);
                info.capacity = at;
            }
            Layout::Stripe { chunk } => {
                if chunk == 0 || chunk % bs != 0 {
                    return Err(AggregateError::Chunk {
                        chunk,
                        block_size: info.logical_block_size,
                    });
                }
                let min = infos.iter().map(|i| i.capacity).min().unwrap_or(0);
                let rows = min / chunk;
                info.capacity = rows
                    .checked_mul(chunk)
                    .and_then(|x| x.checked_mul(children.len() as u64))
                    .ok_or_else(|| AggregateError::Capacity("sizes overflow".into()))?;
            }
        }
        if info.capacity == 0 {
            return Err(AggregateError::Capacity(
                "the children are empty or smaller than one chunk".into(),
            ));
        }
        Ok(Aggregate {
            children,
            layout,
            starts,
            info,
        })
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Where disk byte `offset` is: (child, byte on the child).
    pub fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        if offset >= self.info.capacity {
            return None;
        }
        match self.layout {
            Layout::Concat => {
                let c = self
                    .starts
                    .partition_point(|&s| s <= offset)
                    .checked_sub(1)?;
                Some((c, offset - self.starts.get(c)?))
            }
            Layout::Stripe { chunk } => {
                let n = self.children.len() as u64;
                let k = offset / chunk;
                Some(((k % n) as usize, (k / n) * chunk + offset % chunk))
            }
        }
    }

    /// Split `[offset, offset + len)` into one part per child touched.
    fn split(&self, offset: u64, len: u64) -> Vec<Part> {
        let mut parts: Vec<Part> = Vec::new();
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let Some((child, child_off)) = self.locate(at) else {
                break;
            };
            let room = match self.layout {
                Layout::Concat => self.starts.get(child + 1).map_or(0, |e| e - at),
                Layout::Stripe { chunk } => chunk - at % chunk,
            };
            let n = room.min(len - pos).max(1);
            match parts.iter_mut().find(|p| p.child == child) {
                // Stripe rows follow each other on a child: the part grows.
                Some(p) if p.child_off + p.len == child_off => {
                    p.len += n;
                    p.pieces.push((pos, n));
                }
                _ => parts.push(Part {
                    child,
                    child_off,
                    len: n,
                    pieces: vec![(pos, n)],
                }),
            }
            pos += n;
        }
        parts
    }

    fn data_parts(&self, offset: u64, buf: IoBuffers, write: Option<bool>, done: Completion) {
        let parts = self.split(offset, buf.len() as u64);
        if let [p] = parts.as_slice() {
            let req = match write {
                Some(fua) => Request::Write {
                    offset: p.child_off,
                    buf,
                    fua,
                },
                None => Request::Read {
                    offset: p.child_off,
                    buf,
                },
            };
            self.children[p.child].submit(req, done);
            return;
        }
        let join = Join::new(parts.len(), done);
        match write {
            Some(fua) => {
                let data = buf.to_vec();
                drop(buf);
                for p in parts {
                    let mut v = Vec::with_capacity(p.len as usize);
                    for (at, n) in &p.pieces {
                        if let Some(s) = data.get(*at as usize..(*at + *n) as usize) {
                            v.extend_from_slice(s);
                        }
                    }
                    self.children[p.child].submit(
                        Request::Write {
                            offset: p.child_off,
                            buf: IoBuffers::from_vec(v),
                            fua,
                        },
                        join.completion(),
                    );
                }
            }
            None => {
                let buf = Arc::new(buf);
                for p in parts {
                    let (scratch, req) = match Scratch::read_request(p.len as usize, p.child_off) {
                        Ok(x) => x,
                        Err(e) => {
                            join.part(Err(e));
                            continue;
                        }
                    };
                    let buf = buf.clone();
                    let join2 = join.clone();
                    self.children[p.child].submit(
                        req,
                        Completion::new(move |r| {
                            if r.is_ok() {
                                let data = scratch.to_vec();
                                let mut from = 0usize;
                                for (at, n) in &p.pieces {
                                    let n = *n as usize;
                                    if let Some(s) = data.get(from..from + n) {
                                        buf.copy_from_slice_at(*at as usize, s);
                                    }
                                    from += n;
                                }
                            }
                            drop(buf);
                            join2.part(r)
                        }),
                    );
                }
            }
        }
    }
}

impl BlockBackend for Aggregate {
    fn info(&self) -> BlockInfo {
        self.info
    }

    fn submit(&self, req: Request, done: Completion) {
        if let Err(e) = self.info.check(&req) {
            done.complete(Err(e));
            return;
        }
        if req.disk_len() == 0 && !matches!(req, Request::Flush) {
            done.complete(Ok(()));
            return;
        }
        match req {
            Request::Read { offset, buf } => self.data_parts(offset, buf, None, done),
            Request::Write { offset, buf, fua } => self.data_parts(offset, buf, Some(fua), done),
            Request::Flush => {
                let join = Join::new(self.children.len(), done);
                for c in &self.children {
                    c.submit(Request::Flush, join.completion());
                }
            }
            Request::Discard { offset, len } => {
                let parts = self.split(offset, len);
                let join = Join::new(parts.len(), done);
                for p in parts {
                    self.children[p.child].submit(
                        Request::Discard {
                            offset: p.child_off,
                            len: p.len,
                        },
                        join.completion(),
                    );
                }
            }
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => {
                let parts = self.split(offset, len);
                let join = Join::new(parts.len(), done);
                for p in parts {
                    self.children[p.child].submit(
                        Request::WriteZeroes {
                            offset: p.child_off,
                            len: p.len,
                            may_unmap,
                        },
                        join.completion(),
                    );
                }
            }
        }
    }
}
