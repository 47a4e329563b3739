//! Typed errors of block back-ends and the device status each maps to.

use serde::{Deserialize, Serialize};

/// The status a front-end device reports to the guest for a failed request.
///
/// Every [`BlockError`] maps to exactly one of these (see [`BlockError::status`]);
/// virtio-blk reports them as `VIRTIO_BLK_S_IOERR`/`VIRTIO_BLK_S_UNSUPP`, IDE as
/// the error bits of its status register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceStatus {
    /// The request was valid but failed (medium error, out of range, read-only).
    IoError,
    /// The device does not support the operation.
    Unsupported,
}

/// Why a block request failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the disk.
    #[error(
        "request at byte {offset} with length {len} is beyond the capacity of {capacity} bytes"
    )]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Capacity of the back-end in bytes.
        capacity: u64,
    },
    /// The request's offset or length is not a multiple of the logical block size.
    #[error("request at byte {offset} with length {len} is not aligned to the {block_size}-byte logical block")]
    Misaligned {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Logical block size in bytes.
        block_size: u32,
    },
    /// A write, discard or write-zeroes reached a read-only back-end.
    #[error("the back-end is read-only")]
    ReadOnly,
    /// The back-end does not implement this operation.
    #[error("operation {0} is not supported by this back-end")]
    Unsupported(&'static str),
    /// The host's I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A buffer could not be resolved in guest memory.
    #[error("guest buffer error: {0}")]
    Buffer(String),
    /// The request was dropped before it completed (a back-end bug or shutdown).
    #[error("the request was dropped before it completed")]
    Dropped,
    /// A back-end-specific failure (a filter's, a remote peer's).
    #[error("{0}")]
    Other(String),
}

impl BlockError {
    /// The status the guest sees for this error.
    pub fn status(&self) -> DeviceStatus {
        match self {
            BlockError::Unsupported(_) => DeviceStatus::Unsupported,
            _ => DeviceStatus::IoError,
        }
    }
}

/// Result of a block request.
pub type BlockResult = Result<(), BlockError>;
