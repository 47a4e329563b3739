//! A back-end in host memory: for tests, fuzzing and scratch disks.

use std::sync::RwLock;

use crate::{BlockInfo, BlockResult, Features, IoBuffers, SyncBackend};

/// A disk held in a host vector. Never blocks, so wrap it in [`crate::Inline`].
/// It has no volatile cache: every completed write is as durable as the process.
#[derive(Debug)]
pub struct MemoryBackend {
    data: RwLock<Vec<u8>>,
    info: BlockInfo,
}

impl MemoryBackend {
    /// A zero-filled disk of `capacity` bytes (rounded down to whole 512-byte sectors).
    pub fn new(capacity: u64) -> Self {
        Self::from_vec(vec![0; capacity as usize])
    }

    /// A disk with the given contents (rounded down to whole 512-byte sectors).
    pub fn from_vec(mut data: Vec<u8>) -> Self {
        data.truncate(data.len() / 512 * 512);
        let info = BlockInfo {
            capacity: data.len() as u64,
            logical_block_size: 512,
            physical_block_size: 512,
            features: Features::DISCARD | Features::WRITE_ZEROES | Features::FUA,
        };
        MemoryBackend {
            data: RwLock::new(data),
            info,
        }
    }

    /// The same disk, read-only.
    pub fn read_only(mut self) -> Self {
        self.info.features |= Features::READ_ONLY;
        self
    }

    /// A copy of the disk's contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl SyncBackend for MemoryBackend {
    fn info(&self) -> BlockInfo {
        self.info
    }
    // Offsets were validated by `execute` against the capacity, which equals the vector's length.
    fn read_at(&self, offset: u64, buf: &IoBuffers) -> BlockResult {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        if let Some(src) = data.get(start..start + buf.len()) {
            buf.copy_from_slice_at(0, src);
        }
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &IoBuffers, _fua: bool) -> BlockResult {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        if let Some(dst) = data.get_mut(start..start + buf.len()) {
            buf.copy_to_slice_at(0, dst);
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BlockResult {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if let Some(dst) = data.get_mut(offset as usize..(offset + len) as usize) {
            dst.fill(0);
        }
        Ok(())
    }
}

/// A back-end that stores nothing: writes vanish, reads leave the buffer as it
/// was (or zero it). For measuring the cost of everything above the back-end.
#[derive(Debug)]
pub struct NullBackend {
    info: BlockInfo,
    zero_reads: bool,
}

impl NullBackend {
    /// A null disk of `capacity` bytes; with `zero_reads`, reads return zeroes.
    pub fn new(capacity: u64, zero_reads: bool) -> Self {
        NullBackend {
            info: BlockInfo {
                capacity: capacity / 512 * 512,
                logical_block_size: 512,
                physical_block_size: 4096,
                features: Features::DISCARD | Features::WRITE_ZEROES | Features::FUA,
            },
            zero_reads,
        }
    }
}

impl SyncBackend for NullBackend {
    fn info(&self) -> BlockInfo {
        self.info
    }
    fn read_at(&self, _offset: u64, buf: &IoBuffers) -> BlockResult {
        if self.zero_reads {
            buf.fill_zero_at(0, buf.len());
        }
        Ok(())
    }
    fn write_at(&self, _offset: u64, _buf: &IoBuffers, _fua: bool) -> BlockResult {
        Ok(())
    }
    fn flush(&self) -> BlockResult {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> BlockResult {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> BlockResult {
        Ok(())
    }
}
