//! Data buffers of block requests: guest memory (zero-copy) or host memory (filters' bounce
//! buffers), with the memory kept alive for the life of the request.

use std::any::Any;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, Permissions, VolatileSlice};

use crate::BlockError;

/// Which way data moves through a buffer: decides the guest-memory permission checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device writes the buffer (a disk read): the guest memory must be writable.
    DeviceWrites,
    /// The device reads the buffer (a disk write).
    DeviceReads,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    ptr: *mut u8,
    len: usize,
}

const EMPTY_SEGMENT: Segment = Segment {
    ptr: std::ptr::null_mut(),
    len: 0,
};

/// Segments kept inline before spilling to the heap: most requests have one or
/// two data descriptors, each within one guest memory region.
const INLINE_SEGMENTS: usize = 4;

/// A small vector of segments that needs no allocation up to [`INLINE_SEGMENTS`].
#[derive(Clone)]
enum SegList {
    Inline {
        len: usize,
        segs: [Segment; INLINE_SEGMENTS],
    },
    Heap(Vec<Segment>),
}

impl SegList {
    fn with_capacity(n: usize) -> Self {
        if n <= INLINE_SEGMENTS {
            SegList::Inline {
                len: 0,
                segs: [EMPTY_SEGMENT; INLINE_SEGMENTS],
            }
        } else {
            SegList::Heap(Vec::with_capacity(n))
        }
    }

    fn push(&mut self, s: Segment) {
        match self {
            SegList::Inline { len, segs } => {
                if let Some(slot) = segs.get_mut(*len) {
                    *slot = s;
                    *len += 1;
                } else {
                    let mut v = Vec::with_capacity(INLINE_SEGMENTS * 2);
                    v.extend_from_slice(segs);
                    v.push(s);
                    *self = SegList::Heap(v);
                }
            }
            SegList::Heap(v) => v.push(s),
        }
    }

    fn as_slice(&self) -> &[Segment] {
        match self {
            SegList::Inline { len, segs } => segs.get(..*len).unwrap_or(&[]),
            SegList::Heap(v) => v,
        }
    }
}

/// The scatter-gather data buffer of one request.
///
/// Built either from guest memory ([`IoBuffers::from_guest`]: the ranges are
/// resolved and bounds-checked once, and the memory object is held so the
/// mapping outlives the request) or from a host vector ([`IoBuffers::from_vec`]).
/// Access goes only through [`VolatileSlice`]s or the copy helpers: no `&mut [u8]`
/// alias of guest memory is ever made, because the guest may change it at any time.
///
/// `clone()` gives a second view of the same memory (it copies no data): a
/// filter keeps one to read back what a child's read put there after the
/// request, which owns the other, has completed.
#[derive(Clone)]
pub struct IoBuffers {
    segs: SegList,
    len: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the segments point into memory owned by `_owner` (a guest memory
// object or a host vector), which stays alive and mapped as long as `self`;
// all access is volatile, so sharing between threads is as safe as sharing
// the guest memory object itself.
unsafe impl Send for IoBuffers {}
// SAFETY: see above; `IoBuffers` has no interior state besides the pointers.
unsafe impl Sync for IoBuffers {}

impl std::fmt::Debug for IoBuffers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuffers")
            .field("segments", &self.segs.as_slice().len())
            .field("len", &self.len)
            .finish()
    }
}

impl IoBuffers {
    /// Resolve `ranges` (guest address, length) in `mem`, checking that each lies in
    /// guest memory with the permission `dir` needs (an IOMMU-backed `mem` checks
    /// its mappings here).
    pub fn from_guest<M>(
        mem: Arc<M>,
        ranges: &[(GuestAddress, usize)],
        dir: Direction,
    ) -> Result<Self, BlockError>
    where
        M: GuestMemory + Send + Sync + 'static,
    {
        let access = match dir {
            Direction::DeviceWrites => Permissions::Write,
            Direction::DeviceReads => Permissions::Read,
        };
        let mut segs = SegList::with_capacity(ranges.len());
        let mut len = 0usize;
        // Plain guest memory (no IOMMU in between): a range inside one region
        // resolves to one slice with a single region lookup.
        let physical = mem.physical_memory();
        for &(addr, count) in ranges {
            if count == 0 {
                continue;
            }
            let fast = physical.and_then(|pm| pm.get_slice(addr, count).ok());
            if let Some(slice) = fast {
                if dir == Direction::DeviceWrites {
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                segs.push(Segment {
                    ptr: slice.ptr_guard_mut().as_ptr(),
                    len: slice.len(),
                });
            } else {
                Self::resolve_slow(&*mem, addr, count, access, dir, &mut segs)?;
            }
            len = len
                .checked_add(count)
                .ok_or_else(|| BlockError::Buffer("total length overflows".into()))?;
        }
        Ok(IoBuffers {
            segs,
            len,
            _owner: mem,
        })
    }

    /// Resolve one range that may cross regions or go through an IOMMU.
    fn resolve_slow<M: GuestMemory + ?Sized>(
        mem: &M,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
        dir: Direction,
        segs: &mut SegList,
    ) -> Result<(), BlockError> {
        let mut got = 0usize;
        let iter = mem
            .get_slices(addr, count, access)
            .map_err(|e| BlockError::Buffer(format!("{:#x}+{count:#x}: {e}", addr.0)))?;
        for slice in iter {
            let slice =
                slice.map_err(|e| BlockError::Buffer(format!("{:#x}+{count:#x}: {e}", addr.0)))?;
            // Writes by the device must show up in dirty tracking (migration).
            if dir == Direction::DeviceWrites {
                slice.bitmap().mark_dirty(0, slice.len());
            }
            got += slice.len();
            segs.push(Segment {
                ptr: slice.ptr_guard_mut().as_ptr(),
                len: slice.len(),
            });
        }
        if got != count {
            return Err(BlockError::Buffer(format!(
                "{:#x}+{count:#x}: only {got} bytes are guest memory",
                addr.0
            )));
        }
        Ok(())
    }

    /// A buffer over host memory, for filters and tests.
    pub fn from_vec(data: Vec<u8>) -> Self {
        let mut boxed = data.into_boxed_slice();
        let len = boxed.len();
        let mut segs = SegList::with_capacity(1);
        if len != 0 {
            segs.push(Segment {
                ptr: boxed.as_mut_ptr(),
                len,
            });
        }
        IoBuffers {
            segs,
            len,
            _owner: Arc::new(boxed),
        }
    }

    /// A zero-filled host buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        Self::from_vec(vec![0; len])
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of scatter-gather segments.
    pub fn segments(&self) -> usize {
        self.segs.as_slice().len()
    }

    /// The segments as volatile slices, in order.
    pub fn slices(&self) -> impl Iterator<Item = VolatileSlice<'_>> + '_ {
        self.segs.as_slice().iter().map(|s| {
            // SAFETY: the segment lies in memory kept alive by `_owner` for `'_`.
            unsafe { VolatileSlice::new(s.ptr, s.len) }
        })
    }

    /// The segments as `iovec`s for vectored system calls (`preadv`, io_uring).
    /// They stay valid as long as `self` does.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.segs
            .as_slice()
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.ptr.cast(),
                iov_len: s.len,
            })
            .collect()
    }

    /// Copy `src` into the buffer starting at byte `offset`; copies what fits and
    /// returns the number of bytes copied.
    pub fn copy_from_slice_at(&self, offset: usize, src: &[u8]) -> usize {
        self.walk(offset, src.len(), |slice, pos, n| {
            slice.copy_from(&src[pos..pos + n]);
        })
    }

    /// Copy from the buffer starting at byte `offset` into `dst`; returns bytes copied.
    pub fn copy_to_slice_at(&self, offset: usize, dst: &mut [u8]) -> usize {
        self.walk(offset, dst.len(), |slice, pos, n| {
            slice.copy_to(&mut dst[pos..pos + n]);
        })
    }

    /// Fill `len` bytes from `offset` with zeroes; returns bytes written.
    pub fn fill_zero_at(&self, offset: usize, len: usize) -> usize {
        const ZERO: [u8; 4096] = [0; 4096];
        self.walk(offset, len, |slice, _, n| {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(ZERO.len());
                if let Ok(sub) = slice.subslice(done, k) {
                    sub.copy_from(&ZERO[..k]);
                }
                done += k;
            }
        })
    }

    /// Copy the whole buffer into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.copy_to_slice_at(0, &mut v);
        v
    }

    /// Visit the part `[offset, offset + len)` (clamped to the buffer) as
    /// (sub-slice, position relative to `offset`, length) pieces.
    fn walk(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(VolatileSlice<'_>, usize, usize),
    ) -> usize {
        let end = offset.saturating_add(len).min(self.len);
        let mut seg_start = 0usize;
        let mut done = 0usize;
        for slice in self.slices() {
            let seg_end = seg_start + slice.len();
            let from = offset.max(seg_start);
            let to = end.min(seg_end);
            if from < to {
                if let Ok(sub) = slice.subslice(from - seg_start, to - from) {
                    f(sub, from - offset, to - from);
                    done += to - from;
                }
            }
            if seg_end >= end {
                break;
            }
            seg_start = seg_end;
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn guest_buffers_cross_segments_and_reject_holes() {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 0x1000),
                (GuestAddress(0x1000), 0x1000),
            ])
            .unwrap(),
        );
        mem.write_slice(&[7u8; 16], GuestAddress(0xff8)).unwrap();
        let b = IoBuffers::from_guest(
            mem.clone(),
            &[(GuestAddress(0xff8), 16), (GuestAddress(0x10), 4)],
            Direction::DeviceReads,
        )
        .unwrap();
        assert_eq!(b.len(), 20);
        assert_eq!(b.segments(), 3);
        assert_eq!(&b.to_vec()[..16], &[7u8; 16]);
        b.copy_from_slice_at(14, &[1, 2, 3, 4]);
        let mut out = [0u8; 4];
        mem.read_slice(&mut out, GuestAddress(0x1006)).unwrap();
        assert_eq!(out, [1, 2, 0, 0]);
        mem.read_slice(&mut out, GuestAddress(0x10)).unwrap();
        assert_eq!(out, [3, 4, 0, 0]);

        let err = IoBuffers::from_guest(
            mem.clone(),
            &[(GuestAddress(0x1ff0), 0x20)],
            Direction::DeviceWrites,
        );
        assert!(err.is_err());
        assert!(IoBuffers::from_guest(
            mem,
            &[(GuestAddress(u64::MAX - 1), 8)],
            Direction::DeviceWrites
        )
        .is_err());
    }

    #[test]
    fn many_guest_ranges_spill_past_the_inline_segments() {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap());
        let ranges: Vec<_> = (0..7u64)
            .map(|i| (GuestAddress(0x1000 * i + i), 3usize))
            .collect();
        for (i, &(a, _)) in ranges.iter().enumerate() {
            mem.write_slice(&[i as u8; 3], a).unwrap();
        }
        let b = IoBuffers::from_guest(mem.clone(), &ranges, Direction::DeviceWrites).unwrap();
        assert_eq!(b.segments(), 7);
        assert_eq!(b.len(), 21);
        let want: Vec<u8> = (0..7u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(b.to_vec(), want);
        assert_eq!(b.iovecs().len(), 7);
        // A range in one region takes the fast path; one past the end fails.
        assert!(IoBuffers::from_guest(
            mem.clone(),
            &[(GuestAddress(0xfff0), 0x20)],
            Direction::DeviceReads
        )
        .is_err());
        let empty =
            IoBuffers::from_guest(mem, &[(GuestAddress(0), 0)], Direction::DeviceReads).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.segments(), 0);
    }

    #[test]
    fn clones_share_the_memory() {
        let a = IoBuffers::zeroed(8);
        let b = a.clone();
        b.copy_from_slice_at(2, &[7, 7]);
        drop(b);
        assert_eq!(a.to_vec(), [0, 0, 7, 7, 0, 0, 0, 0]);
    }

    #[test]
    fn host_buffers_copy_and_zero() {
        let b = IoBuffers::from_vec(vec![9; 10]);
        assert_eq!(b.fill_zero_at(8, 100), 2);
        assert_eq!(b.copy_from_slice_at(20, &[1]), 0);
        assert_eq!(b.to_vec(), [9, 9, 9, 9, 9, 9, 9, 9, 0, 0]);
    }
}
