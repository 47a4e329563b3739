//! The mirror's dirty-region bitmap, in memory and in its file.
//!
//! File layout (little-endian), read through [`Header`], a typed view:
//!
//! | bytes   | field                                   |
//! |---------|-----------------------------------------|
//! | 0..8    | magic [`BITMAP_MAGIC`]                  |
//! | 8..12   | version (1)                             |
//! | 12..16  | number of children                      |
//! | 16..24  | region size in bytes                    |
//! | 24..32  | number of regions                       |
//! | 32..40  | reserved (0)                            |
//! | 40..    | per child, `ceil(regions / 8)` bytes: bit `r % 8` of byte `r / 8` set = region `r` dirty |

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The first eight bytes of a mirror bitmap file.
pub const BITMAP_MAGIC: [u8; 8] = *b"IOVMBMP1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 40;

/// Why the bitmap file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The host's I/O failed.
    #[error("mirror bitmap {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a mirror bitmap, or is for another geometry.
    #[error("mirror bitmap {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
}

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const CHILDREN: Range<usize> = 12..16;
    pub const REGION_SIZE: Range<usize> = 16..24;
    pub const REGIONS: Range<usize> = 24..32;
}

/// A typed view of the header bytes.
struct Header<T: AsRef<[u8]>>(T);

impl<T: AsRef<[u8]>> Header<T> {
    fn new_checked(buf: T) -> Option<Self> {
        (buf.as_ref().len() >= HEADER_LEN).then_some(Header(buf))
    }
    fn bytes<const N: usize>(&self, r: std::ops::Range<usize>) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(s) = self.0.as_ref().get(r) {
            if s.len() == N {
                out.copy_from_slice(s);
            }
        }
        out
    }
    fn magic(&self) -> [u8; 8] {
        self.bytes(field::MAGIC)
    }
    fn version(&self) -> u32 {
        u32::from_le_bytes(self.bytes(field::VERSION))
    }
    fn children(&self) -> u32 {
        u32::from_le_bytes(self.bytes(field::CHILDREN))
    }
    fn region_size(&self) -> u64 {
        u64::from_le_bytes(self.bytes(field::REGION_SIZE))
    }
    fn regions(&self) -> u64 {
        u64::from_le_bytes(self.bytes(field::REGIONS))
    }
}

fn emit_header(children: usize, region_size: u64, regions: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[field::MAGIC].copy_from_slice(&BITMAP_MAGIC);
    h[field::VERSION].copy_from_slice(&VERSION.to_le_bytes());
    h[field::CHILDREN].copy_from_slice(&(children as u32).to_le_bytes());
    h[field::REGION_SIZE].copy_from_slice(&region_size.to_le_bytes());
    h[field::REGIONS].copy_from_slice(&regions.to_le_bytes());
    h
}

/// One bit per region per child, with counts.
pub(super) struct Bitmaps {
    regions: u64,
    words: Vec<Vec<u64>>,
    counts: Vec<u64>,
}

impl Bitmaps {
    pub(super) fn new(children: usize, regions: u64) -> Self {
        let n = regions.div_ceil(64) as usize;
        Bitmaps {
            regions,
            words: vec![vec![0; n]; children],
            counts: vec![0; children],
        }
    }

    fn bytes_per_child(&self) -> usize {
        self.regions.div_ceil(8) as usize
    }

    pub(super) fn count(&self, c: usize) -> u64 {
        self.counts.get(c).copied().unwrap_or(0)
    }

    pub(super) fn get(&self, c: usize, r: u64) -> bool {
        self.words
            .get(c)
            .and_then(|w| w.get((r / 64) as usize))
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// Set one bit; whether it changed.
    fn set(&mut self, c: usize, r: u64) -> bool {
        if r >= self.regions {
            return false;
        }
        let Some(w) = self
            .words
            .get_mut(c)
            .and_then(|w| w.get_mut((r / 64) as usize))
        else {
            return false;
        };
        let bit = 1u64 << (r % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.counts[c] += 1;
        true
    }

    pub(super) fn set_range(&mut self, c: usize, rs: std::ops::Range<u64>) -> bool {
        let mut changed = false;
        for r in rs {
            changed |= self.set(c, r);
        }
        changed
    }

    pub(super) fn set_all(&mut self, c: usize) -> bool {
        self.set_range(c, 0..self.regions)
    }

    pub(super) fn clear(&mut self, c: usize, r: u64) {
        let Some(w) = self
            .words
            .get_mut(c)
            .and_then(|w| w.get_mut((r / 64) as usize))
        else {
            return;
        };
        let bit = 1u64 << (r % 64);
        if *w & bit != 0 {
            *w &= !bit;
            self.counts[c] -= 1;
        }
    }

    pub(super) fn iter(&self, c: usize) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions).filter(move |&r| self.get(c, r))
    }

    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let per = self.bytes_per_child();
        let mut out = Vec::with_capacity(per * self.words.len());
        for w in &self.words {
            let mut b: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            b.resize(per, 0);
            out.extend_from_slice(&b);
        }
        out
    }

    fn load(&mut self, bytes: &[u8]) {
        let per = self.bytes_per_child();
        for c in 0..self.words.len() {
            let Some(chunk) = bytes.get(c * per..(c + 1) * per) else {
                continue;
            };
            for (i, byte) in chunk.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        self.set(c, i as u64 * 8 + bit);
                    }
                }
            }
        }
    }
}

/// The open bitmap file.
pub(super) struct BitmapFile {
    path: PathBuf,
    file: File,
}

impl BitmapFile {
    /// Open or create the file for this geometry; returns it and its bits.
    pub(super) fn open(
        path: &Path,
        children: usize,
        region_size: u64,
        regions: u64,
    ) -> Result<(Self, Bitmaps), BitmapError> {
        let io = |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |reason: String| BitmapError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bits = Bitmaps::new(children, regions);
        let len = file.metadata().map_err(io)?.len();
        let body = (bits.bytes_per_child() * children) as u64;
        if len == 0 {
            let mut all = emit_header(children, region_size, regions).to_vec();
            all.extend_from_slice(&bits.to_bytes());
            file.write_all_at(&all, 0).map_err(io)?;
            file.sync_all().map_err(io)?;
        } else {
            let mut hb = [0u8; HEADER_LEN];
            file.read_exact_at(&mut hb, 0)
                .map_err(|_| invalid(format!("{len} bytes: too short for the header")))?;
            let h = Header::new_checked(&hb[..])
                .ok_or_else(|| invalid("too short for the header".into()))?;
            if h.magic() != BITMAP_MAGIC {
                return Err(invalid("not a mirror bitmap (bad magic)".into()));
            }
            if h.version() != VERSION {
                return Err(invalid(format!("unknown version {}", h.version())));
            }
            if h.children() as usize != children
                || h.region_size() != region_size
                || h.regions() != regions
            {
                return Err(invalid(format!(
                    "made for {} children, {} regions of {} bytes; this mirror has {children}, {regions} of {region_size}",
                    h.children(),
                    h.regions(),
                    h.region_size()
                )));
            }
            if len < HEADER_LEN as u64 + body {
                return Err(invalid(format!(
                    "{len} bytes, the bitmap needs {}",
                    HEADER_LEN as u64 + body
                )));
            }
            let mut data = vec![0u8; body as usize];
            file.read_exact_at(&mut data, HEADER_LEN as u64)
                .map_err(io)?;
            bits.load(&data);
        }
        Ok((
            BitmapFile {
                path: path.to_path_buf(),
                file,
            },
            bits,
        ))
    }

    /// Write the bits and make them durable.
    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<(), BitmapError> {
        let io = |source| BitmapError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(bytes, HEADER_LEN as u64)
            .map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}
