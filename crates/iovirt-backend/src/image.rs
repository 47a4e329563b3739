//! Read-only disc images (ISO 9660 and friends) for CD-ROM front-ends.
//!
//! An image is a [`RawFile`] opened read-only with 2048-byte logical blocks,
//! the sector size of data CDs, through the page cache: nothing is written, so
//! no cache mode's promise is at stake. Writes, discards and write-zeroes fail
//! with [`crate::BlockError::ReadOnly`]; flushes succeed and do nothing.

use std::path::Path;

use crate::{CacheMode, OpenError, RawFile, RawFileOptions};

/// The sector size of a data CD (mode 1 / mode 2 form 1), in bytes.
pub const CD_SECTOR_SIZE: u32 = 2048;

/// Open a disc image read-only with [`CD_SECTOR_SIZE`] logical blocks; its
/// capacity is the file size rounded down to whole sectors.
///
/// ```
/// use iovirt_backend::{open_image, submit_wait, BlockError, Inline, IoBuffers, Request};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("cd.iso");
/// std::fs::write(&path, vec![1u8; 16 * 2048 + 100])?;
/// let cd = Inline(open_image(&path)?);
/// # use iovirt_backend::BlockBackend;
/// assert_eq!(cd.info().capacity, 16 * 2048);
/// submit_wait(&cd, Request::Read { offset: 2048, buf: IoBuffers::zeroed(2048) })?;
/// let w = submit_wait(&cd, Request::Write { offset: 0, buf: IoBuffers::zeroed(2048), fua: false });
/// assert!(matches!(w, Err(BlockError::ReadOnly)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open_image(path: impl AsRef<Path>) -> Result<RawFile, OpenError> {
    RawFileOptions::new(CacheMode::Writeback)
        .read_only(true)
        .logical_block_size(CD_SECTOR_SIZE)
        .open(path)
}
