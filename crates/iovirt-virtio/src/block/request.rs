//! virtio-blk requests: the on-wire header and segment layouts as typed views,
//! and the parser that turns a descriptor chain into a [`BlockRequest`] or a
//! [`ParseFailure`] that says exactly what was wrong.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Request type: read sectors into device-writable buffers.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write sectors from device-readable buffers.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush the volatile write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: read the 20-byte device ID (serial).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: discard the ranges in the segment array.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: write zeroes to the ranges in the segment array.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status byte: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status byte: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status byte: the request type (or a flag) is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of the device ID returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Write-zeroes segment flag: the device may deallocate instead of writing zeroes.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The 16-byte request header (`struct virtio_blk_outhdr`): type, reserved, sector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader<T: AsRef<[u8]>> {
    buf: T,
}

mod field {
    use std::ops::Range;
    pub const TYPE: Range<usize> = 0..4;
    pub const SECTOR: Range<usize> = 8..16;
    pub const HEADER_LEN: usize = 16;
    pub const SEG_SECTOR: Range<usize> = 0..8;
    pub const SEG_NUM_SECTORS: Range<usize> = 8..12;
    pub const SEG_FLAGS: Range<usize> = 12..16;
    pub const SEGMENT_LEN: usize = 16;
}

/// Length of a request header in bytes.
pub const HEADER_LEN: usize = field::HEADER_LEN;
/// Length of a discard/write-zeroes segment in bytes.
pub const SEGMENT_LEN: usize = field::SEGMENT_LEN;

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

impl<T: AsRef<[u8]>> RequestHeader<T> {
    /// A view of `buf`, which must hold at least [`HEADER_LEN`] bytes.
    pub fn new_checked(buf: T) -> Option<Self> {
        (buf.as_ref().len() >= HEADER_LEN).then_some(RequestHeader { buf })
    }
    /// The request type.
    pub fn request_type(&self) -> u32 {
        le_u32(&self.buf.as_ref()[field::TYPE])
    }
    /// The first 512-byte sector.
    pub fn sector(&self) -> u64 {
        le_u64(&self.buf.as_ref()[field::SECTOR])
    }
}

/// A discard or write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (bit 0: unmap, write-zeroes only).
    pub flags: u32,
}

impl Segment {
    /// Parse a segment from [`SEGMENT_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        (b.len() >= SEGMENT_LEN).then(|| Segment {
            sector: le_u64(&b[field::SEG_SECTOR]),
            num_sectors: le_u32(&b[field::SEG_NUM_SECTORS]),
            flags: le_u32(&b[field::SEG_FLAGS]),
        })
    }
}

/// The limits a request is checked against: the device's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most data descriptors per request.
    pub seg_max: u32,
    /// Largest data descriptor in bytes.
    pub size_max: u32,
    /// Discard is offered.
    pub discard: bool,
    /// Most sectors per discard segment.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Write-zeroes is offered.
    pub write_zeroes: bool,
    /// Most sectors per write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
}

/// What a parsed request does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at `sector` into the data descriptors.
    Read,
    /// Write the data descriptors at `sector`.
    Write,
    /// Flush the volatile cache.
    Flush,
    /// Write the serial into the data descriptors.
    GetId,
    /// Discard these ranges.
    Discard(Vec<Segment>),
    /// Write zeroes to these ranges.
    WriteZeroes(Vec<Segment>),
}

/// A request parsed from a descriptor chain and checked against the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    /// The operation.
    pub kind: RequestKind,
    /// First sector (reads and writes).
    pub sector: u64,
    /// The data descriptors (address, length), in order.
    pub data: Vec<(GuestAddress, usize)>,
    /// Total bytes of the data descriptors.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Every way a request can be malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptor at all.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain lacks the header, the data or the status descriptor.
    #[error("descriptor chain of {0} descriptors is too short for this request")]
    ChainTooShort(usize),
    /// The last descriptor is not device-writable, so it cannot hold the status.
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor has length 0")]
    StatusEmpty,
    /// The status descriptor's address overflows.
    #[error("status descriptor address {0:#x} overflows")]
    StatusAddress(u64),
    /// The header descriptor is device-writable.
    #[error("header descriptor is device-writable")]
    HeaderWritable,
    /// The header descriptor is shorter than 16 bytes.
    #[error("header descriptor has {0} bytes, 16 are needed")]
    HeaderTooSmall(u32),
    /// The header is not in guest memory.
    #[error("header at {0:#x} is not in guest memory")]
    HeaderUnreadable(u64),
    /// A data descriptor's direction does not match the request type.
    #[error("data descriptor {index} of a type-{request_type} request has the wrong direction")]
    DataDirection {
        /// The request type.
        request_type: u32,
        /// Index of the descriptor in the data part.
        index: usize,
    },
    /// A flush carries data.
    #[error("flush request carries {0} data bytes")]
    FlushWithData(u64),
    /// The data length is not a whole number of 512-byte sectors.
    #[error("data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// More data descriptors than seg_max.
    #[error("{count} data descriptors exceed seg_max {max}")]
    TooManySegments {
        /// Descriptors in the request.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// A data descriptor is larger than size_max.
    #[error("data descriptor of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge {
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The discard/write-zeroes payload is empty or not a whole number of segments.
    #[error(
        "discard/write-zeroes payload of {0} bytes is not a non-empty array of 16-byte segments"
    )]
    BadSegmentArray(u64),
    /// Too many discard/write-zeroes segments.
    #[error("{count} segments exceed the limit of {max}")]
    TooManySegmentRanges {
        /// Segments in the request.
        count: u64,
        /// The limit.
        max: u32,
    },
    /// A discard/write-zeroes segment covers more sectors than allowed.
    #[error("segment of {sectors} sectors exceeds the limit of {max}")]
    SegmentRangeTooLarge {
        /// Sectors in the segment.
        sectors: u32,
        /// The limit.
        max: u32,
    },
    /// A segment has flags the device does not support.
    #[error("segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    /// The data is not in guest memory.
    #[error("data at {0:#x} is not in guest memory")]
    DataUnreadable(u64),
    /// The request type is unknown or not offered.
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
}

impl RequestError {
    /// The status byte the guest sees.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP
            }
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A chain that could not be parsed: the error and, if the chain had a
/// usable status descriptor, where to write the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseFailure {
    /// What was wrong.
    pub error: RequestError,
    /// The status byte's address, when the status descriptor is valid.
    pub status: Option<GuestAddress>,
}

fn range_check(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Parse the descriptors of one chain (in chain order) into a request.
pub fn parse_request<M: GuestMemory>(
    descs: &[Descriptor],
    mem: &M,
    limits: &RequestLimits,
) -> Result<BlockRequest, ParseFailure> {
    let mut data = Vec::new();
    let mut req = parse_request_into(descs, mem, limits, &mut data)?;
    req.data = data;
    Ok(req)
}

/// [`parse_request`] without allocating: the data descriptors of reads, writes
/// and GET_ID go into `data` (cleared first; reuse it across requests) and the
/// returned request's own `data` is left empty. For flush, discard and
/// write-zeroes `data` ends up empty, as `parse_request` leaves it.
pub fn parse_request_into<M: GuestMemory>(
    descs: &[Descriptor],
    mem: &M,
    limits: &RequestLimits,
    data: &mut Vec<(GuestAddress, usize)>,
) -> Result<BlockRequest, ParseFailure> {
    data.clear();
    let r = parse_checked(descs, mem, limits, data);
    if !matches!(
        r,
        Ok(BlockRequest {
            kind: RequestKind::Read | RequestKind::Write | RequestKind::GetId,
            ..
        })
    ) {
        data.clear();
    }
    r
}

fn parse_checked<M: GuestMemory>(
    descs: &[Descriptor],
    mem: &M,
    limits: &RequestLimits,
    data: &mut Vec<(GuestAddress, usize)>,
) -> Result<BlockRequest, ParseFailure> {
    let no_status = |error| ParseFailure {
        error,
        status: None,
    };
    let Some(last) = descs.last() else {
        return Err(no_status(RequestError::EmptyChain));
    };
    if !last.is_write_only() {
        return Err(no_status(RequestError::StatusNotWritable));
    }
    if last.len() == 0 {
        return Err(no_status(RequestError::StatusEmpty));
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .ok_or_else(|| no_status(RequestError::StatusAddress(last.addr().0)))?;
    parse_body(descs, mem, limits, status, data).map_err(|error| ParseFailure {
        error,
        status: Some(status),
    })
}

fn parse_body<M: GuestMemory>(
    descs: &[Descriptor],
    mem: &M,
    limits: &RequestLimits,
    status: GuestAddress,
    data: &mut Vec<(GuestAddress, usize)>,
) -> Result<BlockRequest, RequestError> {
    let n = descs.len();
    let (Some(head), Some(data_descs)) = (descs.first(), descs.get(1..n.saturating_sub(1))) else {
        return Err(RequestError::ChainTooShort(n));
    };
    if n < 2 {
        return Err(RequestError::ChainTooShort(n));
    }
    if head.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if (head.len() as usize) < HEADER_LEN {
        return Err(RequestError::HeaderTooSmall(head.len()));
    }
    let mut hbuf = [0u8; HEADER_LEN];
    mem.read_slice(&mut hbuf, head.addr())
        .map_err(|_| RequestError::HeaderUnreadable(head.addr().0))?;
    let header = RequestHeader::new_checked(&hbuf[..]).ok_or(RequestError::HeaderTooSmall(0))?;
    let rtype = header.request_type();
    let sector = header.sector();

    let device_writes = match rtype {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH => false,
        VIRTIO_BLK_T_DISCARD if limits.discard => false,
        VIRTIO_BLK_T_WRITE_ZEROES if limits.write_zeroes => false,
        other => return Err(RequestError::UnsupportedType(other)),
    };
    data.reserve(data_descs.len());
    let mut data_len = 0u64;
    for (index, d) in data_descs.iter().enumerate() {
        if d.is_write_only() != device_writes {
            return Err(RequestError::DataDirection {
                request_type: rtype,
                index,
            });
        }
        data.push((d.addr(), d.len() as usize));
        data_len += u64::from(d.len());
    }
    let req = |kind| BlockRequest {
        kind,
        sector,
        data: Vec::new(),
        data_len: 0,
        status,
    };
    match rtype {
        VIRTIO_BLK_T_FLUSH => {
            if data_len != 0 {
                return Err(RequestError::FlushWithData(data_len));
            }
            return Ok(req(RequestKind::Flush));
        }
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_GET_ID if data.is_empty() => {
            return Err(RequestError::ChainTooShort(n));
        }
        _ => {}
    }
    if data.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments {
            count: data.len(),
            max: limits.seg_max,
        });
    }
    if let Some(d) = data_descs.iter().find(|d| d.len() > limits.size_max) {
        return Err(RequestError::SegmentTooLarge {
            len: d.len(),
            max: limits.size_max,
        });
    }
    let kind = match rtype {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if data_len % SECTOR_SIZE != 0 {
                return Err(RequestError::NotSectorMultiple(data_len));
            }
            range_check(sector, data_len / SECTOR_SIZE, limits.capacity_sectors)?;
            if rtype == VIRTIO_BLK_T_IN {
                RequestKind::Read
            } else {
                RequestKind::Write
            }
        }
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        _ => {
            let discard = rtype == VIRTIO_BLK_T_DISCARD;
            let (max_seg, max_sectors) = if discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            let seg_len = SEGMENT_LEN as u64;
            if data_len == 0 || data_len % seg_len != 0 {
                return Err(RequestError::BadSegmentArray(data_len));
            }
            let count = data_len / seg_len;
            if count > u64::from(max_seg) {
                return Err(RequestError::TooManySegmentRanges {
                    count,
                    max: max_seg,
                });
            }
            // At most `max_seg` segments: a bounded copy out of guest memory.
            let mut bytes = Vec::with_capacity(data_len as usize);
            for &(addr, len) in data.iter() {
                let start = bytes.len();
                bytes.resize(start + len, 0);
                mem.read_slice(&mut bytes[start..], addr)
                    .map_err(|_| RequestError::DataUnreadable(addr.0))?;
            }
            let mut segs = Vec::with_capacity(count as usize);
            for chunk in bytes.chunks_exact(SEGMENT_LEN) {
                let Some(s) = Segment::parse(chunk) else {
                    return Err(RequestError::BadSegmentArray(data_len));
                };
                let allowed = if discard {
                    0
                } else {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if s.flags & !allowed != 0 {
                    return Err(RequestError::UnsupportedFlags(s.flags));
                }
                if s.num_sectors > max_sectors {
                    return Err(RequestError::SegmentRangeTooLarge {
                        sectors: s.num_sectors,
                        max: max_sectors,
                    });
                }
                range_check(s.sector, u64::from(s.num_sectors), limits.capacity_sectors)?;
                segs.push(s);
            }
            return Ok(if discard {
                req(RequestKind::Discard(segs))
            } else {
                req(RequestKind::WriteZeroes(segs))
            });
        }
    };
    Ok(BlockRequest {
        kind,
        sector,
        data: Vec::new(),
        data_len,
        status,
    })
}
