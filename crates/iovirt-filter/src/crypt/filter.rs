//! The encryption filter: a back-end that encrypts writes and decrypts reads
//! of its child's data segment.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use iovirt_backend::{
    BlockBackend, BlockError, BlockInfo, BlockResult, Completion, Features, IoBuffers, Request,
};
use zeroize::Zeroize;

use super::unlock::{Layout, SharedRead, VolumeKey};
use super::{CryptError, XtsCipher};

/// Bytes decrypted per step of a read (the plaintext scratch stays in cache).
const READ_CHUNK: usize = 256 << 10;
/// Bytes per write of a write-zeroes request, and how many are kept in flight.
const ZERO_CHUNK: u64 = 256 << 10;
const ZERO_IN_FLIGHT: usize = 4;
/// Read bounce regions up to this size are pooled.
const POOL_MAX: usize = 4 << 20;
const POOL_PER_CLASS: usize = 4;

/// A back-end showing the plaintext of a LUKS data segment on its child.
///
/// Made by [`super::open_luks`]; its capacity is the segment's (the child's
/// capacity minus the data offset, for a `dynamic` segment), its logical block
/// is the larger of the encryption sector and the child's logical block.
pub struct CryptBackend {
    child: Arc<dyn BlockBackend>,
    cipher: Arc<XtsCipher>,
    layout: Layout,
    info: BlockInfo,
    pool: Arc<Mutex<Vec<SharedRead>>>,
}

impl std::fmt::Debug for CryptBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptBackend")
            .field("cipher", &self.cipher)
            .field("data_offset", &self.layout.data_offset)
            .field("first_sector", &self.layout.first_sector)
            .field("info", &self.info)
            .finish()
    }
}

impl CryptBackend {
    pub(crate) fn new(
        child: Arc<dyn BlockBackend>,
        key: &VolumeKey,
        layout: Layout,
    ) -> Result<Self, CryptError> {
        let cipher = Arc::new(XtsCipher::new(key.as_bytes(), layout.sector_size as usize)?);
        let ci = child.info();
        let lbs = layout.sector_size.max(ci.logical_block_size);
        let avail = ci.capacity.checked_sub(layout.data_offset).ok_or_else(|| {
            CryptError::BadHeader(format!(
                "data offset {} is beyond the image's {} bytes",
                layout.data_offset, ci.capacity
            ))
        })?;
        let capacity =
            layout.size.map_or(avail, |s| s.min(avail)) / u64::from(lbs) * u64::from(lbs);
        if layout.data_offset % u64::from(ci.logical_block_size.max(1)) != 0 {
            return Err(CryptError::Unsupported(format!(
                "data offset {} is not aligned to the image's {}-byte blocks",
                layout.data_offset, ci.logical_block_size
            )));
        }
        // Write-zeroes is emulated (encrypted zeroes), so it is not advertised as efficient.
        let features = ci.features - Features::WRITE_ZEROES;
        let info = BlockInfo {
            capacity,
            logical_block_size: lbs,
            physical_block_size: ci.physical_block_size.max(lbs),
            features,
        };
        Ok(CryptBackend {
            child,
            cipher,
            layout,
            info,
            pool: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// The tweak of the sector at byte `offset` of the segment.
    fn sector(&self, offset: u64) -> u64 {
        self.layout
            .first_sector
            .wrapping_add(offset / u64::from(self.layout.sector_size))
    }

    fn read(&self, offset: u64, buf: IoBuffers, done: Completion) {
        let len = buf.len();
        let class = len.next_power_of_two().max(64 << 10);
        let region = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(|r| r.capacity() == class)
                .map(|i| pool.swap_remove(i))
        };
        let region = match region.map_or_else(|| SharedRead::new(class), Ok) {
            Ok(r) => r,
            Err(e) => return done.complete(Err(BlockError::Other(e.to_string()))),
        };
        let bounce = match region.buffers_len(len) {
            Ok(b) => b,
            Err(e) => return done.complete(Err(BlockError::Other(e.to_string()))),
        };
        let cipher = self.cipher.clone();
        let pool = self.pool.clone();
        let first = self.sector(offset);
        let ss = self.layout.sector_size as usize;
        let child_offset = self.layout.data_offset + offset;
        self.child.submit(
            Request::Read {
                offset: child_offset,
                buf: bounce,
            },
            done.map(move |r| {
                r?;
                let mut scratch = vec![0u8; len.min(READ_CHUNK)];
                let mut pos = 0usize;
                while pos < len {
                    let n = (len - pos).min(scratch.len());
                    let s = &mut scratch[..n];
                    region.copy_out_at(pos, s);
                    cipher.decrypt_sectors(s, first.wrapping_add((pos / ss) as u64));
                    buf.copy_from_slice_at(pos, s);
                    pos += n;
                }
                scratch.zeroize();
                if region.capacity() <= POOL_MAX && region.is_unshared() {
                    let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
                    if pool
                        .iter()
                        .filter(|r| r.capacity() == region.capacity())
                        .count()
                        < POOL_PER_CLASS
                    {
                        pool.push(region);
                    }
                }
                Ok(())
            }),
        );
    }

    fn write(&self, offset: u64, buf: &IoBuffers, fua: bool, done: Completion) {
        let mut v = vec![0u8; buf.len()];
        buf.copy_to_slice_at(0, &mut v);
        self.cipher.encrypt_sectors(&mut v, self.sector(offset));
        self.child.submit(
            Request::Write {
                offset: self.layout.data_offset + offset,
                buf: IoBuffers::from_vec(v),
                fua,
            },
            done,
        );
    }

    fn write_zeroes(&self, offset: u64, len: u64, done: Completion) {
        let job = Arc::new(ZeroJob {
            child: self.child.clone(),
            cipher: self.cipher.clone(),
            data_offset: self.layout.data_offset,
            first_sector: self.layout.first_sector,
            sector_size: u64::from(self.layout.sector_size),
            pumps: AtomicUsize::new(0),
            state: Mutex::new(ZeroState {
                next: offset,
                end: offset + len,
                in_flight: 0,
                error: None,
                done: Some(done),
            }),
        });
        job.pump();
    }
}

/// A write-zeroes request in progress: encrypted-zero chunks written with a
/// bounded number in flight. `pump` is re-entrant-safe: a completion that
/// arrives while another pump runs (on this thread or another) asks it to
/// loop again instead of recursing.
struct ZeroJob {
    child: Arc<dyn BlockBackend>,
    cipher: Arc<XtsCipher>,
    data_offset: u64,
    first_sector: u64,
    sector_size: u64,
    pumps: AtomicUsize,
    state: Mutex<ZeroState>,
}

struct ZeroState {
    next: u64,
    end: u64,
    in_flight: usize,
    error: Option<BlockError>,
    done: Option<Completion>,
}

impl ZeroJob {
    fn pump(self: &Arc<Self>) {
        if self.pumps.fetch_add(1, Ordering::AcqRel) != 0 {
            return;
        }
        loop {
            self.work();
            if self.pumps.fetch_sub(1, Ordering::AcqRel) == 1 {
                break;
            }
        }
    }

    fn work(self: &Arc<Self>) {
        loop {
            let (offset, n) = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.error.is_some() || st.next >= st.end {
                    if st.in_flight == 0 {
                        if let Some(done) = st.done.take() {
                            let r = st.error.take().map_or(Ok(()), Err);
                            drop(st);
                            done.complete(r);
                        }
                    }
                    return;
                }
                if st.in_flight >= ZERO_IN_FLIGHT {
                    return;
                }
                let n = (st.end - st.next).min(ZERO_CHUNK);
                let off = st.next;
                st.next += n;
                st.in_flight += 1;
                (off, n)
            };
            let mut v = vec![0u8; n as usize];
            self.cipher.encrypt_sectors(
                &mut v,
                self.first_sector.wrapping_add(offset / self.sector_size),
            );
            let me = self.clone();
            self.child.submit(
                Request::Write {
                    offset: self.data_offset + offset,
                    buf: IoBuffers::from_vec(v),
                    fua: false,
                },
                Completion::new(move |r: BlockResult| {
                    {
                        let mut st = me.state.lock().unwrap_or_else(|e| e.into_inner());
                        st.in_flight -= 1;
                        if let Err(e) = r {
                            st.error.get_or_insert(e);
                        }
                    }
                    me.pump();
                }),
            );
        }
    }
}

impl BlockBackend for CryptBackend {
    fn info(&self) -> BlockInfo {
        self.info
    }

    fn submit(&self, req: Request, done: Completion) {
        if let Err(e) = self.info.check(&req) {
            return done.complete(Err(e));
        }
        let base = self.layout.data_offset;
        match req {
            Request::Read { offset, buf } => self.read(offset, buf, done),
            Request::Write { offset, buf, fua } => self.write(offset, &buf, fua, done),
            Request::Flush => self.child.submit(Request::Flush, done),
            Request::Discard { offset, len } => self.child.submit(
                Request::Discard {
                    offset: base + offset,
                    len,
                },
                done,
            ),
            Request::WriteZeroes { offset, len, .. } => {
                if len == 0 {
                    done.complete(Ok(()))
                } else {
                    self.write_zeroes(offset, len, done)
                }
            }
        }
    }

    // One child: plugging and completion polling pass straight through (a
    // completion polled on the owner's thread runs this filter's part there).
    fn plug(&self) {
        self.child.plug()
    }
    fn unplug(&self) {
        self.child.unplug()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.child.completion_fd()
    }
    fn poll_completions(&self) -> usize {
        self.child.poll_completions()
    }
}
