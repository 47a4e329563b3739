//! AES-XTS over whole sectors with the `plain64` IV: the tweak of a sector is
//! its 64-bit number, little-endian, zero-padded to 16 bytes (IEEE 1619 / dm-crypt).
//!
//! Hardware AES comes from RustCrypto's `aes` crate, which picks AES-NI, VAES-256
//! or VAES-512 at run time. Our own XTS loop batches the work so the cipher always
//! sees long runs of blocks: the initial tweaks of every sector of a call are
//! encrypted in one call, and each sector is whitened, encrypted and whitened again
//! as one run of blocks.

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes256, Block};
use zeroize::Zeroize;

/// Largest sector handled (LUKS2 allows 512..=4096).
pub const MAX_SECTOR_SIZE: usize = 4096;
const BLOCK: usize = 16;

/// The two AES keys of XTS, for 128- or 256-bit AES. Key schedules are zeroized
/// on drop (the `aes` crate's `zeroize` feature).
enum Keys {
    Aes128 {
        data: Box<Aes128>,
        tweak: Box<Aes128>,
    },
    Aes256 {
        data: Box<Aes256>,
        tweak: Box<Aes256>,
    },
}

/// An AES-XTS-plain64 cipher for sectors of a fixed size.
///
/// ```
/// use iovirt_filter::crypt::XtsCipher;
///
/// let key = [7u8; 64]; // AES-256-XTS: two 256-bit keys
/// let xts = XtsCipher::new(&key, 4096).unwrap();
/// let mut data = vec![0u8; 2 * 4096];
/// xts.encrypt_sectors(&mut data, 10);
/// assert_ne!(data, vec![0u8; 2 * 4096]);
/// xts.decrypt_sectors(&mut data, 10);
/// assert_eq!(data, vec![0u8; 2 * 4096]);
/// ```
pub struct XtsCipher {
    keys: Keys,
    sector_size: usize,
    /// AVX2 is available for computing tweaks (checked once at construction).
    avx2: bool,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XtsCipher")
            .field("key_bits", &(self.key_len() * 8))
            .field("sector_size", &self.sector_size)
            .field("keys", &"<redacted>")
            .finish()
    }
}

/// Why an XTS cipher could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XtsError {
    /// The key is not 32 or 64 bytes long.
    #[error("an AES-XTS key is 32 or 64 bytes, not {0}")]
    KeyLength(usize),
    /// The sector size is not a power of two in 512..=4096.
    #[error("sector size {0} is not a power of two between 512 and 4096")]
    SectorSize(usize),
}

impl XtsCipher {
    /// A cipher over `key` (the data key followed by the tweak key: 32 bytes for
    /// AES-128-XTS, 64 for AES-256-XTS) for sectors of `sector_size` bytes.
    pub fn new(key: &[u8], sector_size: usize) -> Result<Self, XtsError> {
        if !(512..=MAX_SECTOR_SIZE).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(XtsError::SectorSize(sector_size));
        }
        let half = key.len() / 2;
        let keys = match key.len() {
            32 => Keys::Aes128 {
                data: Box::new(
                    Aes128::new_from_slice(&key[..half])
                        .map_err(|_| XtsError::KeyLength(key.len()))?,
                ),
                tweak: Box::new(
                    Aes128::new_from_slice(&key[half..])
                        .map_err(|_| XtsError::KeyLength(key.len()))?,
                ),
            },
            64 => Keys::Aes256 {
                data: Box::new(
                    Aes256::new_from_slice(&key[..half])
                        .map_err(|_| XtsError::KeyLength(key.len()))?,
                ),
                tweak: Box::new(
                    Aes256::new_from_slice(&key[half..])
                        .map_err(|_| XtsError::KeyLength(key.len()))?,
                ),
            },
            n => return Err(XtsError::KeyLength(n)),
        };
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Ok(XtsCipher {
            keys,
            sector_size,
            avx2,
        })
    }

    /// The sector size in bytes.
    pub fn sector_size(&self) -> usize {
        self.sector_size
    }

    /// Length of the XTS key in bytes (32 or 64).
    pub fn key_len(&self) -> usize {
        match self.keys {
            Keys::Aes128 { .. } => 32,
            Keys::Aes256 { .. } => 64,
        }
    }

    /// Encrypt `data` in place: whole sectors, the first numbered `first_sector`.
    /// A trailing part shorter than a sector is left as it is (callers pass whole sectors).
    pub fn encrypt_sectors(&self, data: &mut [u8], first_sector: u64) {
        self.run(data, first_sector, true)
    }

    /// Decrypt `data` in place: whole sectors, the first numbered `first_sector`.
    pub fn decrypt_sectors(&self, data: &mut [u8], first_sector: u64) {
        self.run(data, first_sector, false)
    }

    #[inline]
    fn xor_tweaks(&self, data: &mut [u8], tw: &Tweaks) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` was detected on this CPU in `new`.
            return unsafe { xor_tweaks_avx2(data, tw) };
        }
        xor_tweaks_plain(data, tw)
    }

    fn run(&self, data: &mut [u8], first_sector: u64, encrypt: bool) {
        // Up to 64 sectors' initial tweaks are encrypted in one call.
        const BATCH: usize = 64;
        let ss = self.sector_size;
        let mut tweaks = Tweaks::default();
        let mut initial = [Block::default(); BATCH];
        let mut sector = first_sector;
        for batch in data.chunks_mut(ss * BATCH) {
            let n = batch.len() / ss;
            for (i, t) in initial.iter_mut().take(n).enumerate() {
                let mut b = [0u8; BLOCK];
                b[..8].copy_from_slice(&sector.wrapping_add(i as u64).to_le_bytes());
                *t = b.into();
            }
            match &self.keys {
                Keys::Aes128 { tweak, .. } => tweak.encrypt_blocks(&mut initial[..n]),
                Keys::Aes256 { tweak, .. } => tweak.encrypt_blocks(&mut initial[..n]),
            }
            for (s, t0) in batch.chunks_exact_mut(ss).zip(initial.iter()) {
                let rows = ss / BLOCK / LANES;
                let t0 = u128::from_le_bytes((*t0).into());
                #[cfg(target_arch = "x86_64")]
                if self.avx2 {
                    // SAFETY: `avx2` was detected on this CPU in `new`.
                    unsafe { fill_tweaks_avx2(&mut tweaks, rows, t0) }
                } else {
                    fill_tweaks(&mut tweaks, rows, t0)
                }
                #[cfg(not(target_arch = "x86_64"))]
                fill_tweaks(&mut tweaks, rows, t0);
                self.xor_tweaks(s, &tweaks);
                let (blocks, _) = Block::slice_as_chunks_mut(s);
                match (&self.keys, encrypt) {
                    (Keys::Aes128 { data, .. }, true) => data.encrypt_blocks(blocks),
                    (Keys::Aes128 { data, .. }, false) => data.decrypt_blocks(blocks),
                    (Keys::Aes256 { data, .. }, true) => data.encrypt_blocks(blocks),
                    (Keys::Aes256 { data, .. }, false) => data.decrypt_blocks(blocks),
                }
                self.xor_tweaks(s, &tweaks);
            }
            sector = sector.wrapping_add(n as u64);
        }
        tweaks.lo.iter_mut().for_each(|r| r.zeroize());
        tweaks.hi.iter_mut().for_each(|r| r.zeroize());
        initial.iter_mut().for_each(|b| b.as_mut_slice().zeroize());
    }
}

/// Multiplication by x in GF(2^128) with XTS's little-endian convention.
#[inline(always)]
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Tweaks are computed in `LANES` independent chains.
const LANES: usize = 8;
const ROWS: usize = MAX_SECTOR_SIZE / BLOCK / LANES;

/// The tweaks of one sector, split in low and high 64-bit halves: the tweak of
/// block `r * LANES + j` is `hi[r][j] << 64 | lo[r][j]`. This layout lets the
/// compiler compute a row of lanes with vector instructions.
struct Tweaks {
    lo: [[u64; LANES]; ROWS],
    hi: [[u64; LANES]; ROWS],
}

impl Default for Tweaks {
    fn default() -> Self {
        Tweaks {
            lo: [[0; LANES]; ROWS],
            hi: [[0; LANES]; ROWS],
        }
    }
}

/// The first `rows` rows of tweaks of a sector whose first tweak is `t0`:
/// the first row serially (`t0 * x^j`), then each row from the one before it
/// times x^8. The 8 bits shifted out fold back as their carry-less product
/// with 0x87 (x^7 + x^2 + x + 1): `c ^ c<<1 ^ c<<2 ^ c<<7`.
#[inline(always)]
fn fill_tweaks_body(tw: &mut Tweaks, rows: usize, t0: u128) {
    let mut t = t0;
    for j in 0..LANES {
        tw.lo[0][j] = t as u64;
        tw.hi[0][j] = (t >> 64) as u64;
        t = mul_x(t);
    }
    for r in 1..rows.min(ROWS) {
        let (lo_prev, hi_prev) = (tw.lo[r - 1], tw.hi[r - 1]);
        let mut lo = [0u64; LANES];
        let mut hi = [0u64; LANES];
        for j in 0..LANES {
            let c = hi_prev[j] >> 56;
            hi[j] = (hi_prev[j] << 8) | (lo_prev[j] >> 56);
            lo[j] = (lo_prev[j] << 8) ^ c ^ (c << 1) ^ (c << 2) ^ (c << 7);
        }
        tw.lo[r] = lo;
        tw.hi[r] = hi;
    }
}

fn fill_tweaks(tw: &mut Tweaks, rows: usize, t0: u128) {
    fill_tweaks_body(tw, rows, t0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_tweaks_avx2(tw: &mut Tweaks, rows: usize, t0: u128) {
    fill_tweaks_body(tw, rows, t0)
}

/// XOR each 16-byte block of `data` with its tweak, a row of `LANES` blocks at a time.
#[inline(always)]
fn xor_tweaks_body(data: &mut [u8], tw: &Tweaks) {
    for (row, (lo, hi)) in data
        .chunks_exact_mut(BLOCK * LANES)
        .zip(tw.lo.iter().zip(tw.hi.iter()))
    {
        for (j, b) in row.chunks_exact_mut(BLOCK).enumerate() {
            let (a, c) = b.split_at_mut(8);
            if let (Ok(x), Ok(y)) = (<[u8; 8]>::try_from(&*a), <[u8; 8]>::try_from(&*c)) {
                a.copy_from_slice(&(u64::from_le_bytes(x) ^ lo[j % LANES]).to_le_bytes());
                c.copy_from_slice(&(u64::from_le_bytes(y) ^ hi[j % LANES]).to_le_bytes());
            }
        }
    }
}

fn xor_tweaks_plain(data: &mut [u8], tw: &Tweaks) {
    xor_tweaks_body(data, tw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_tweaks_avx2(data: &mut [u8], tw: &Tweaks) {
    xor_tweaks_body(data, tw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // IEEE 1619-2007 test vector 4 (AES-128-XTS, data unit 0, 512 bytes of 0..255 twice):
    // checked here through its first and last 16 bytes of ciphertext.
    #[test]
    fn ieee1619_vector_4() {
        let mut key = hex("2718281828459045235360287471352631415926535897932384626433832795");
        let xts = XtsCipher::new(&key, 512).unwrap();
        key.zeroize();
        let mut data: Vec<u8> = (0..512).map(|i| i as u8).collect();
        xts.encrypt_sectors(&mut data, 0);
        assert_eq!(data[..16], hex("27a7479befa1d476489f308cd4cfa6e2")[..]);
        assert_eq!(data[496..], hex("0a282df920147beabe421ee5319d0568")[..]);
        xts.decrypt_sectors(&mut data, 0);
        assert!(data.iter().enumerate().all(|(i, &b)| b == i as u8));
    }

    #[test]
    fn sector_numbers_change_the_ciphertext() {
        let xts = XtsCipher::new(&[3u8; 64], 512).unwrap();
        let mut a = vec![0u8; 512 * 3];
        xts.encrypt_sectors(&mut a, 5);
        let mut b = vec![0u8; 512];
        xts.encrypt_sectors(&mut b, 6);
        assert_eq!(a[512..1024], b[..]);
        assert_ne!(a[..512], b[..]);
    }

    #[test]
    fn tweak_chains_match_the_serial_definition() {
        let t0 = 0x8000_0000_0000_0000_0000_0000_0000_0001u128 | (0xfe << 112);
        let mut tw = Tweaks::default();
        fill_tweaks(&mut tw, ROWS, t0);
        let mut t = t0;
        for i in 0..ROWS * LANES {
            let (r, j) = (i / LANES, i % LANES);
            let got = (u128::from(tw.hi[r][j]) << 64) | u128::from(tw.lo[r][j]);
            assert_eq!(got, t, "tweak {i}");
            t = mul_x(t);
        }
    }

    #[test]
    fn bad_parameters() {
        assert_eq!(
            XtsCipher::new(&[0; 48], 512).unwrap_err(),
            XtsError::KeyLength(48)
        );
        assert_eq!(
            XtsCipher::new(&[0; 64], 1000).unwrap_err(),
            XtsError::SectorSize(1000)
        );
        assert!(format!("{:?}", XtsCipher::new(&[9; 64], 4096).unwrap()).contains("redacted"));
    }
}
