//! Virtio-blk request handling for the vhost-user daemon.
//!
//! STAND-IN: iovirt-virtio's `block` module (which owns virtio-blk request
//! parsing, the configuration space and the feature set) has not landed yet.
//! This module is the thin adapter the daemon codes against meanwhile; it keeps
//! the same split (typed parse of a descriptor chain, then completion writing the
//! status byte and computing the used length) so it can be replaced by calls
//! into `iovirt_virtio::block` without touching the vhost-user side.

use std::sync::Arc;

use iovirt_backend::{
    BlockError, BlockInfo, DeviceStatus, Direction, Features, IoBuffers, Request,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Virtio-blk request type: read sectors into device-writable buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Virtio-blk request type: write sectors from device-readable buffers.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Virtio-blk request type: flush the volatile write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Virtio-blk request type: return the 20-byte serial number.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Virtio-blk request type: discard ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Virtio-blk request type: write zeroes to ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status byte: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status byte: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status byte: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature bit: `seg_max` in the configuration is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: the disk is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: `blk_size` in the configuration is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: the flush command is supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit: `num_queues` in the configuration is valid.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// Feature bit: the discard command is supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature bit: the write-zeroes command is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// Feature bit 28: indirect descriptor tables.
pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
/// Feature bit 29: used_event/avail_event notification suppression.
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
/// Feature bit 32: a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial number returned by GET_ID.
pub const SERIAL_LEN: usize = 20;
/// Size of the configuration structure we serve (up to `unused1`).
pub const CONFIG_SIZE: usize = 60;
/// Largest data length of one request; longer chains complete with IOERR.
pub const MAX_REQUEST_BYTES: u64 = 128 << 20;
/// Sectors one discard or write-zeroes segment may cover (advertised limit).
const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// What the device offers and how its configuration space reads.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Feature bits offered to the driver.
    pub features: u64,
    /// The virtio_blk_config structure, little-endian.
    pub config: [u8; CONFIG_SIZE],
    /// Serial number returned by GET_ID (NUL-padded).
    pub serial: [u8; SERIAL_LEN],
    /// Geometry and capabilities of the back-end.
    pub info: BlockInfo,
}

impl BlkConfig {
    /// Features and configuration for a disk with geometry `info` served with
    /// `num_queues` queues of at most `queue_size` entries.
    pub fn new(info: BlockInfo, num_queues: u16, queue_size: u16, serial: &str) -> Self {
        let ro = info.features.contains(Features::READ_ONLY);
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_RING_EVENT_IDX)
            | (1 << VIRTIO_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ);
        if ro {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if info.features.contains(Features::DISCARD) {
                features |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        let mut c = [0u8; CONFIG_SIZE];
        let put = |c: &mut [u8; CONFIG_SIZE], off: usize, v: &[u8]| {
            c[off..off + v.len()].copy_from_slice(v);
        };
        put(&mut c, 0, &(info.capacity / SECTOR_SIZE).to_le_bytes());
        put(
            &mut c,
            12,
            &u32::from(queue_size.saturating_sub(2).max(1)).to_le_bytes(),
        );
        put(&mut c, 20, &info.logical_block_size.to_le_bytes());
        let align = (info.logical_block_size.max(512) / 512).max(1);
        put(&mut c, 34, &num_queues.to_le_bytes());
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 40, &1u32.to_le_bytes());
        put(&mut c, 44, &align.to_le_bytes());
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(&mut c, 52, &1u32.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        let mut s = [0u8; SERIAL_LEN];
        let n = serial.len().min(SERIAL_LEN);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        BlkConfig {
            features,
            config: c,
            serial: s,
            info,
        }
    }

    /// `size` bytes of the configuration space from `offset`; bytes past its end read as zero.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        (0..size as usize)
            .map(|i| {
                (offset as usize)
                    .checked_add(i)
                    .and_then(|o| self.config.get(o))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// The request header at the start of every chain.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    _reserved: u32,
    sector: u64,
}
// SAFETY: plain little-endian integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// One discard / write-zeroes segment.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: as above.
unsafe impl ByteValued for DiscardSegment {}

/// Why a chain could not be turned into a request.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The chain has no device-writable byte for the status.
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    /// The chain is malformed (the status can still be reported).
    #[error("{0}")]
    Bad(String),
    /// The request type is unknown.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A back-end-level error (buffer resolution).
    #[error("{0}")]
    Block(#[from] BlockError),
}

/// What to do with a parsed chain.
#[derive(Debug)]
pub enum Action {
    /// Submit to the back-end; on success `ok_len` bytes were written to the chain.
    Submit(Request),
    /// Already done (GET_ID): complete with this status.
    Done(u8),
    /// Reject: complete with this status (IOERR or UNSUPP).
    Fail(u8, ParseError),
}

/// A parsed virtio-blk request: where its status goes and what it asks for.
#[derive(Debug)]
pub struct BlkRequest {
    /// Head descriptor index, for the used ring.
    pub head: u16,
    /// Address of the status byte; `None` if the chain has none.
    pub status_addr: Option<GuestAddress>,
    /// Used length on success (device-written data plus the status byte).
    pub ok_len: u32,
    /// What to do.
    pub action: Action,
}

impl BlkRequest {
    /// Write `status` to the guest and return the used length.
    pub fn finish<M: GuestMemory>(
        mem: &M,
        status_addr: Option<GuestAddress>,
        status: u8,
        ok_len: u32,
    ) -> u32 {
        match status_addr {
            Some(a) => {
                if mem.write_obj(status, a).is_err() {
                    return 0;
                }
                if status == VIRTIO_BLK_S_OK {
                    ok_len
                } else {
                    1
                }
            }
            None => 0,
        }
    }
}

/// Map a back-end result to a status byte.
pub fn status_of(r: &Result<(), BlockError>) -> u8 {
    match r {
        Ok(()) => VIRTIO_BLK_S_OK,
        Err(e) => match e.status() {
            DeviceStatus::IoError => VIRTIO_BLK_S_IOERR,
            DeviceStatus::Unsupported => VIRTIO_BLK_S_UNSUPP,
        },
    }
}

type Segs = Vec<(GuestAddress, usize)>;

/// Drop the first `n` bytes of `segs`.
fn skip(segs: &[(GuestAddress, usize)], mut n: usize) -> Segs {
    let mut out = Vec::with_capacity(segs.len());
    for &(a, l) in segs {
        if n >= l {
            n -= l;
            continue;
        }
        // `n < l` and the range was checked to lie in guest memory, so no overflow.
        out.push((GuestAddress(a.0 + n as u64), l - n));
        n = 0;
    }
    out
}

/// Read `dst.len()` bytes from the start of `segs`.
fn read_prefix<M: GuestMemory>(mem: &M, segs: &[(GuestAddress, usize)], dst: &mut [u8]) -> bool {
    let mut done = 0;
    for &(a, l) in segs {
        if done == dst.len() {
            break;
        }
        let n = l.min(dst.len() - done);
        if mem.read_slice(&mut dst[done..done + n], a).is_err() {
            return false;
        }
        done += n;
    }
    done == dst.len()
}

/// Parse one descriptor chain into a [`BlkRequest`]. Never panics on guest data.
pub fn parse<B, M>(
    chain: DescriptorChain<M>,
    mem: &Arc<GuestMemoryMmap<B>>,
    cfg: &BlkConfig,
) -> BlkRequest
where
    B: vm_memory::bitmap::Bitmap + Send + Sync + 'static,
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut readable: Segs = Vec::new();
    let mut writable: Segs = Vec::new();
    let mut order_err = false;
    let mut total: u64 = 0;
    for d in chain {
        total = total.saturating_add(u64::from(d.len()));
        if d.len() == 0 {
            continue;
        }
        if d.is_write_only() {
            writable.push((d.addr(), d.len() as usize));
        } else {
            if !writable.is_empty() {
                order_err = true;
            }
            readable.push((d.addr(), d.len() as usize));
        }
    }
    // The status byte: the last byte of the last device-writable descriptor.
    let status_addr = match writable.last_mut() {
        Some((a, l)) => {
            let addr = a.checked_add(*l as u64 - 1);
            *l -= 1;
            if *l == 0 {
                writable.pop();
            }
            addr
        }
        None => None,
    };
    let mk = |ok_len: u32, action: Action| BlkRequest {
        head,
        status_addr,
        ok_len,
        action,
    };
    if status_addr.is_none() {
        return mk(0, Action::Fail(VIRTIO_BLK_S_IOERR, ParseError::NoStatus));
    }
    let fail = |msg: String| mk(1, Action::Fail(VIRTIO_BLK_S_IOERR, ParseError::Bad(msg)));
    if order_err {
        return fail("device-readable descriptor after a device-writable one".into());
    }
    if total > MAX_REQUEST_BYTES {
        return fail(format!(
            "request of {total} bytes exceeds the {MAX_REQUEST_BYTES}-byte limit"
        ));
    }
    let mut hdr = RequestHeader::default();
    if !read_prefix(&**mem, &readable, hdr.as_mut_slice()) {
        return fail("request header shorter than 16 bytes or outside guest memory".into());
    }
    let out = skip(&readable, std::mem::size_of::<RequestHeader>());
    let in_len: usize = writable.iter().map(|s| s.1).sum();
    let out_len: usize = out.iter().map(|s| s.1).sum();
    let offset = match u64::from_le(hdr.sector).checked_mul(SECTOR_SIZE) {
        Some(o) => o,
        None => return fail(format!("sector {} overflows", hdr.sector)),
    };
    let buffers = |segs: &Segs, dir| IoBuffers::from_guest(mem.clone(), segs, dir);
    match u32::from_le(hdr.request_type) {
        VIRTIO_BLK_T_IN => match buffers(&writable, Direction::DeviceWrites) {
            Ok(buf) => mk(
                in_len as u32 + 1,
                Action::Submit(Request::Read { offset, buf }),
            ),
            Err(e) => fail(e.to_string()),
        },
        VIRTIO_BLK_T_OUT => match buffers(&out, Direction::DeviceReads) {
            Ok(buf) => mk(
                1,
                Action::Submit(Request::Write {
                    offset,
                    buf,
                    fua: false,
                }),
            ),
            Err(e) => fail(e.to_string()),
        },
        VIRTIO_BLK_T_FLUSH => mk(1, Action::Submit(Request::Flush)),
        VIRTIO_BLK_T_GET_ID => {
            let n = in_len.min(SERIAL_LEN);
            match buffers(&writable, Direction::DeviceWrites) {
                Ok(buf) => {
                    buf.copy_from_slice_at(0, &cfg.serial[..n]);
                    mk(n as u32 + 1, Action::Done(VIRTIO_BLK_S_OK))
                }
                Err(e) => fail(e.to_string()),
            }
        }
        t @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            let bit = if t == VIRTIO_BLK_T_DISCARD {
                VIRTIO_BLK_F_DISCARD
            } else {
                VIRTIO_BLK_F_WRITE_ZEROES
            };
            if cfg.features & (1 << bit) == 0 {
                return mk(
                    1,
                    Action::Fail(VIRTIO_BLK_S_UNSUPP, ParseError::Unsupported(t)),
                );
            }
            if out_len != std::mem::size_of::<DiscardSegment>() {
                return fail(format!(
                    "{out_len} bytes of discard/write-zeroes segments (1 segment of 16 supported)"
                ));
            }
            let mut seg = DiscardSegment::default();
            if !read_prefix(&**mem, &out, seg.as_mut_slice()) {
                return fail("discard segment outside guest memory".into());
            }
            let flags = u32::from_le(seg.flags);
            let (Some(offset), len) = (
                u64::from_le(seg.sector).checked_mul(SECTOR_SIZE),
                u64::from(u32::from_le(seg.num_sectors)) * SECTOR_SIZE,
            ) else {
                return fail(format!("segment sector {} overflows", seg.sector));
            };
            if flags & !1 != 0 || (t == VIRTIO_BLK_T_DISCARD && flags != 0) {
                return mk(
                    1,
                    Action::Fail(
                        VIRTIO_BLK_S_UNSUPP,
                        ParseError::Bad(format!("segment flags {flags:#x}")),
                    ),
                );
            }
            let req = if t == VIRTIO_BLK_T_DISCARD {
                Request::Discard { offset, len }
            } else {
                Request::WriteZeroes {
                    offset,
                    len,
                    may_unmap: flags & 1 != 0,
                }
            };
            mk(1, Action::Submit(req))
        }
        t => mk(
            1,
            Action::Fail(VIRTIO_BLK_S_UNSUPP, ParseError::Unsupported(t)),
        ),
    }
}
