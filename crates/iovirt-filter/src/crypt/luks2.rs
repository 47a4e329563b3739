//! The LUKS2 on-disk header (LUKS2 On-Disk Format Specification): a typed view
//! over the 4096-byte binary header, and the JSON metadata that follows it,
//! parsed into validated [`Luks2Metadata`].
//!
//! The image starts with two copies of the header (binary header + JSON area,
//! `hdr_size` bytes each); each copy carries a checksum over all its bytes with
//! the checksum field zeroed. Integers are big-endian; in the JSON, 64-bit
//! values are decimal strings and salts and digests are base64.

use std::collections::BTreeMap;

use base64::Engine;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::kdf::{Argon2Kind, HashAlg};
use super::CryptError;

/// Bytes of the binary header.
pub const BINARY_LEN: usize = 4096;
/// Magic of the primary header: `LUKS\xba\xbe`.
pub const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary header: `SKUL\xba\xbe`.
pub const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// The header sizes (binary header + JSON area) the format allows.
pub const HDR_SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];
/// Most anti-forensic stripes accepted.
pub const MAX_STRIPES: u32 = 65_536;
/// Longest salt accepted, in bytes.
pub const MAX_SALT: usize = 256;
/// Most Argon2 lanes accepted.
pub const MAX_ARGON2_LANES: u32 = 64;
/// Most Argon2 passes accepted.
pub const MAX_ARGON2_TIME: u32 = 1 << 16;

/// Byte ranges of the binary header's fields.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..6;
    pub const VERSION: Range<usize> = 6..8;
    pub const HDR_SIZE: Range<usize> = 8..16;
    pub const SEQID: Range<usize> = 16..24;
    pub const LABEL: Range<usize> = 24..72;
    pub const CSUM_ALG: Range<usize> = 72..104;
    pub const SALT: Range<usize> = 104..168;
    pub const UUID: Range<usize> = 168..208;
    pub const SUBSYSTEM: Range<usize> = 208..256;
    pub const HDR_OFFSET: Range<usize> = 256..264;
    pub const CSUM: Range<usize> = 448..512;
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

fn cstr(b: &[u8]) -> &[u8] {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..end]
}

/// A typed view over a LUKS2 binary header in a byte buffer.
#[derive(Debug, Clone)]
pub struct BinaryHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> BinaryHeader<T> {
    /// Wrap `buffer` without checking it.
    pub fn new_unchecked(buffer: T) -> Self {
        BinaryHeader { buffer }
    }

    /// Wrap `buffer`, checking its length, a LUKS2 magic (primary or secondary),
    /// version 2 and an allowed header size.
    pub fn new_checked(buffer: T) -> Result<Self, CryptError> {
        let h = BinaryHeader { buffer };
        let b = h.buffer.as_ref();
        if b.len() < BINARY_LEN {
            return Err(CryptError::BadHeader(format!(
                "LUKS2 binary header needs {BINARY_LEN} bytes, got {}",
                b.len()
            )));
        }
        if b[field::MAGIC] != MAGIC_PRIMARY && b[field::MAGIC] != MAGIC_SECONDARY {
            return Err(CryptError::NotLuks);
        }
        if h.version() != 2 {
            return Err(CryptError::BadHeader(format!(
                "version {} is not LUKS2",
                h.version()
            )));
        }
        if !HDR_SIZES.contains(&h.hdr_size()) {
            return Err(CryptError::BadHeader(format!(
                "header size {} is not one LUKS2 allows",
                h.hdr_size()
            )));
        }
        Ok(h)
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    /// Whether this is the primary copy (magic `LUKS\xba\xbe`).
    pub fn is_primary(&self) -> bool {
        self.b()[field::MAGIC] == MAGIC_PRIMARY
    }
    /// Format version (2).
    pub fn version(&self) -> u16 {
        u16::from_be_bytes([self.b()[6], self.b()[7]])
    }
    /// Size of this header copy: binary header plus JSON area.
    pub fn hdr_size(&self) -> u64 {
        be64(&self.b()[field::HDR_SIZE])
    }
    /// Sequence number; the copy with the higher one is newer.
    pub fn seqid(&self) -> u64 {
        be64(&self.b()[field::SEQID])
    }
    /// Label (NUL-trimmed).
    pub fn label(&self) -> &[u8] {
        cstr(&self.b()[field::LABEL])
    }
    /// Checksum algorithm name (NUL-trimmed), e.g. `sha256`.
    pub fn checksum_alg(&self) -> &[u8] {
        cstr(&self.b()[field::CSUM_ALG])
    }
    /// Salt of this header copy.
    pub fn salt(&self) -> &[u8] {
        &self.b()[field::SALT]
    }
    /// UUID text (NUL-trimmed).
    pub fn uuid(&self) -> &[u8] {
        cstr(&self.b()[field::UUID])
    }
    /// Subsystem label (NUL-trimmed).
    pub fn subsystem(&self) -> &[u8] {
        cstr(&self.b()[field::SUBSYSTEM])
    }
    /// Byte offset of this copy in the image.
    pub fn hdr_offset(&self) -> u64 {
        be64(&self.b()[field::HDR_OFFSET])
    }
    /// The stored checksum (64 bytes, the digest left-aligned).
    pub fn checksum(&self) -> &[u8] {
        &self.b()[field::CSUM]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> BinaryHeader<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    fn set_str(&mut self, r: std::ops::Range<usize>, s: &str) {
        let dst = &mut self.bm()[r];
        dst.fill(0);
        let n = s.len().min(dst.len().saturating_sub(1));
        dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Set magic (primary or secondary), version 2, header size, sequence
    /// number and offset of this copy.
    pub fn set_identity(&mut self, primary: bool, hdr_size: u64, seqid: u64, hdr_offset: u64) {
        let magic = if primary {
            MAGIC_PRIMARY
        } else {
            MAGIC_SECONDARY
        };
        self.bm()[field::MAGIC].copy_from_slice(&magic);
        self.bm()[field::VERSION].copy_from_slice(&2u16.to_be_bytes());
        self.bm()[field::HDR_SIZE].copy_from_slice(&hdr_size.to_be_bytes());
        self.bm()[field::SEQID].copy_from_slice(&seqid.to_be_bytes());
        self.bm()[field::HDR_OFFSET].copy_from_slice(&hdr_offset.to_be_bytes());
    }
    /// Set the label, UUID and checksum algorithm.
    pub fn set_names(&mut self, label: &str, uuid: &str, checksum_alg: &str) {
        self.set_str(field::LABEL, label);
        self.set_str(field::UUID, uuid);
        self.set_str(field::CSUM_ALG, checksum_alg);
    }
    /// Set the per-copy salt.
    pub fn set_salt(&mut self, salt: &[u8; 64]) {
        self.bm()[field::SALT].copy_from_slice(salt);
    }
    /// Set the checksum field.
    pub fn set_checksum(&mut self, csum: &[u8]) {
        let dst = &mut self.bm()[field::CSUM];
        dst.fill(0);
        let n = csum.len().min(dst.len());
        dst[..n].copy_from_slice(&csum[..n]);
    }
}

/// SHA-256 over a whole header copy (`hdr_size` bytes) with the checksum field
/// read as zeroes.
pub fn header_checksum(copy: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    let csum = field::CSUM;
    h.update(&copy[..csum.start.min(copy.len())]);
    h.update([0u8; 64]);
    if copy.len() > csum.end {
        h.update(&copy[csum.end..]);
    }
    h.finalize().into()
}

/// Check one whole header copy (`copy.len() == hdr_size`) read from `offset`:
/// its binary header, its checksum and its JSON text. Returns the JSON text.
pub fn check_copy(copy: &[u8], offset: u64) -> Result<(u64, &str), CryptError> {
    let h = BinaryHeader::new_checked(copy)?;
    if copy.len() as u64 != h.hdr_size() {
        return Err(CryptError::BadHeader(format!(
            "header copy is {} bytes, its header says {}",
            copy.len(),
            h.hdr_size()
        )));
    }
    if h.hdr_offset() != offset {
        return Err(CryptError::BadHeader(format!(
            "header copy at {offset} says it is at {}",
            h.hdr_offset()
        )));
    }
    if h.checksum_alg() != b"sha256" {
        return Err(CryptError::Unsupported(format!(
            "header checksum {:?}",
            String::from_utf8_lossy(h.checksum_alg())
        )));
    }
    if h.checksum()[..32] != header_checksum(copy) {
        return Err(CryptError::BadHeader(format!(
            "checksum mismatch in the header copy at {offset}"
        )));
    }
    let area = copy.get(BINARY_LEN..).unwrap_or_default();
    let text = cstr(area);
    let text = std::str::from_utf8(text)
        .map_err(|_| CryptError::BadHeader("JSON area is not UTF-8".into()))?;
    Ok((h.seqid(), text))
}

// ---- JSON metadata --------------------------------------------------------

fn u64_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a decimal u64")))
}

#[derive(Deserialize)]
struct RawMetadata {
    keyslots: BTreeMap<String, serde_json::Value>,
    segments: BTreeMap<String, serde_json::Value>,
    digests: BTreeMap<String, serde_json::Value>,
    config: RawConfig,
    #[serde(default)]
    #[allow(dead_code)]
    tokens: serde_json::Value,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(deserialize_with = "u64_str")]
    json_size: u64,
    #[serde(deserialize_with = "u64_str")]
    keyslots_size: u64,
    #[serde(default)]
    requirements: Option<RawRequirements>,
}

#[derive(Deserialize)]
struct RawRequirements {
    #[serde(default)]
    mandatory: Vec<String>,
}

#[derive(Deserialize)]
struct RawKeyslot {
    #[serde(rename = "type")]
    kind: String,
    key_size: u32,
    area: RawArea,
    kdf: RawKdf,
    af: RawAf,
    #[serde(default)]
    priority: Option<u32>,
}

#[derive(Deserialize)]
struct RawArea {
    #[serde(rename = "type")]
    kind: String,
    #[serde(deserialize_with = "u64_str")]
    offset: u64,
    #[serde(deserialize_with = "u64_str")]
    size: u64,
    encryption: String,
    key_size: u32,
}

#[derive(Deserialize)]
struct RawKdf {
    #[serde(rename = "type")]
    kind: String,
    salt: String,
    hash: Option<String>,
    iterations: Option<u32>,
    time: Option<u32>,
    memory: Option<u32>,
    cpus: Option<u32>,
}

#[derive(Deserialize)]
struct RawAf {
    #[serde(rename = "type")]
    kind: String,
    stripes: u32,
    hash: String,
}

#[derive(Deserialize)]
struct RawSegment {
    #[serde(rename = "type")]
    kind: String,
    #[serde(deserialize_with = "u64_str")]
    offset: u64,
    size: String,
    #[serde(deserialize_with = "u64_str")]
    iv_tweak: u64,
    encryption: String,
    sector_size: u32,
    /// dm-integrity tags interleaved with the data: not supported.
    #[serde(default)]
    integrity: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawDigest {
    #[serde(rename = "type")]
    kind: String,
    keyslots: Vec<String>,
    segments: Vec<String>,
    hash: String,
    iterations: u32,
    salt: String,
    digest: String,
}

/// The key derivation of a keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The HMAC hash.
        hash: HashAlg,
        /// Iterations.
        iterations: u32,
        /// Salt.
        salt: Vec<u8>,
    },
    /// Argon2i or Argon2id.
    Argon2 {
        /// Which Argon2.
        kind: Argon2Kind,
        /// Passes.
        time: u32,
        /// Memory in KiB.
        memory_kib: u32,
        /// Lanes.
        cpus: u32,
        /// Salt.
        salt: Vec<u8>,
    },
}

/// A validated LUKS2 keyslot of type `luks2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Keyslot {
    /// Keyslot id.
    pub id: u32,
    /// Length of the volume key it holds.
    pub key_size: usize,
    /// Byte offset of its area in the image.
    pub area_offset: u64,
    /// Byte length of its area.
    pub area_size: u64,
    /// Length of the key that encrypts the area (the KDF's output).
    pub area_key_size: usize,
    /// How the passphrase becomes the area key.
    pub kdf: Kdf,
    /// Anti-forensic stripes.
    pub stripes: u32,
    /// Anti-forensic hash.
    pub af_hash: HashAlg,
    /// Priority (0 ignore, 1 normal, 2 high).
    pub priority: u32,
}

/// The validated data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Segment {
    /// Byte offset of the encrypted data.
    pub offset: u64,
    /// Byte length, or `None` for `dynamic` (up to the end of the device).
    pub size: Option<u64>,
    /// IV offset in 512-byte sectors.
    pub iv_tweak: u64,
    /// Encryption sector size.
    pub sector_size: u32,
}

/// The validated digest that checks a volume key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Digest {
    /// Keyslots it covers.
    pub keyslots: Vec<u32>,
    /// PBKDF2 hash.
    pub hash: HashAlg,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// Expected PBKDF2 output.
    pub digest: Vec<u8>,
}

/// Validated LUKS2 metadata: what opening the volume needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks2Metadata {
    /// Usable keyslots, highest priority first.
    pub keyslots: Vec<Luks2Keyslot>,
    /// The data segment.
    pub segment: Luks2Segment,
    /// The digest of the segment's volume key.
    pub digest: Luks2Digest,
    /// JSON area size.
    pub json_size: u64,
    /// Size of the keyslots area (which follows the two header copies).
    pub keyslots_size: u64,
}

fn b64(s: &str, what: &str, max: usize) -> Result<Vec<u8>, CryptError> {
    if s.len() > max.saturating_mul(2) {
        return Err(CryptError::BadHeader(format!("{what} is too long")));
    }
    let v = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| CryptError::BadHeader(format!("{what} is not base64: {e}")))?;
    if v.is_empty() || v.len() > max {
        return Err(CryptError::BadHeader(format!(
            "{what} has {} bytes",
            v.len()
        )));
    }
    Ok(v)
}

fn id(s: &str) -> Result<u32, CryptError> {
    s.parse()
        .map_err(|_| CryptError::BadHeader(format!("object id {s:?} is not a number")))
}

/// Only `aes-xts-plain64` is supported, for data and keyslots alike.
pub fn check_cipher(spec: &str) -> Result<(), CryptError> {
    if spec == "aes-xts-plain64" {
        Ok(())
    } else {
        Err(CryptError::Unsupported(format!("cipher {spec:?}")))
    }
}

impl Luks2Metadata {
    /// Parse and validate the JSON text of a header whose copies are
    /// `hdr_size` bytes. `image_len` (when known) bounds every area.
    pub fn parse(text: &str, hdr_size: u64, image_len: Option<u64>) -> Result<Self, CryptError> {
        let raw: RawMetadata = serde_json::from_str(text)
            .map_err(|e| CryptError::BadHeader(format!("JSON metadata: {e}")))?;
        if raw.config.json_size != hdr_size - BINARY_LEN as u64 {
            return Err(CryptError::BadHeader(format!(
                "json_size {} does not match the header size {hdr_size}",
                raw.config.json_size
            )));
        }
        if let Some(req) = &raw.config.requirements {
            if !req.mandatory.is_empty() {
                return Err(CryptError::Unsupported(format!(
                    "mandatory requirements {:?}",
                    req.mandatory
                )));
            }
        }
        let areas_start = 2 * hdr_size;
        let areas_end = areas_start
            .checked_add(raw.config.keyslots_size)
            .ok_or_else(|| CryptError::BadHeader("keyslots_size overflows".into()))?;
        if let Some(len) = image_len {
            if areas_end > len {
                return Err(CryptError::BadHeader(format!(
                    "keyslots area ends at {areas_end}, beyond the image's {len} bytes"
                )));
            }
        }

        // The segment: exactly one, of type crypt.
        if raw.segments.len() != 1 {
            return Err(CryptError::Unsupported(format!(
                "{} data segments (a reencryption in progress?)",
                raw.segments.len()
            )));
        }
        let (seg_id, seg_value) = raw
            .segments
            .iter()
            .next()
            .ok_or_else(|| CryptError::BadHeader("no data segment".into()))?;
        let seg: RawSegment = serde_json::from_value(seg_value.clone())
            .map_err(|e| CryptError::BadHeader(format!("segment {seg_id}: {e}")))?;
        if seg.kind != "crypt" {
            return Err(CryptError::Unsupported(format!(
                "segment type {:?}",
                seg.kind
            )));
        }
        check_cipher(&seg.encryption)?;
        if seg.integrity.is_some() {
            return Err(CryptError::Unsupported(
                "authenticated encryption (segment integrity)".into(),
            ));
        }
        if !matches!(seg.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(CryptError::BadHeader(format!(
                "sector size {}",
                seg.sector_size
            )));
        }
        if seg.offset < areas_end || seg.offset % u64::from(seg.sector_size) != 0 {
            return Err(CryptError::BadHeader(format!(
                "data offset {} overlaps the metadata (ends at {areas_end}) or is misaligned",
                seg.offset
            )));
        }
        let size = match seg.size.as_str() {
            "dynamic" => None,
            s => Some(
                s.parse::<u64>()
                    .map_err(|_| CryptError::BadHeader(format!("segment size {s:?}")))?,
            ),
        };
        if let Some(sz) = size {
            if sz % u64::from(seg.sector_size) != 0 || seg.offset.checked_add(sz).is_none() {
                return Err(CryptError::BadHeader(format!("segment size {sz}")));
            }
        }
        if seg.iv_tweak % (u64::from(seg.sector_size) / 512) != 0 {
            return Err(CryptError::BadHeader(format!(
                "iv_tweak {} is not a whole number of {}-byte sectors",
                seg.iv_tweak, seg.sector_size
            )));
        }
        let segment = Luks2Segment {
            offset: seg.offset,
            size,
            iv_tweak: seg.iv_tweak,
            sector_size: seg.sector_size,
        };

        // The digest covering that segment.
        let mut digest = None;
        for (did, v) in &raw.digests {
            let d: RawDigest = serde_json::from_value(v.clone())
                .map_err(|e| CryptError::BadHeader(format!("digest {did}: {e}")))?;
            if !d.segments.iter().any(|s| s == seg_id) {
                continue;
            }
            if d.kind != "pbkdf2" {
                return Err(CryptError::Unsupported(format!("digest type {:?}", d.kind)));
            }
            if d.iterations == 0 {
                return Err(CryptError::BadHeader(format!(
                    "digest {did} has 0 iterations"
                )));
            }
            let keyslots = d.keyslots.iter().map(|k| id(k)).collect::<Result<_, _>>()?;
            digest = Some(Luks2Digest {
                keyslots,
                hash: HashAlg::parse(&d.hash)?,
                iterations: d.iterations,
                salt: b64(&d.salt, "digest salt", MAX_SALT)?,
                digest: b64(&d.digest, "digest", 64)?,
            });
            break;
        }
        let digest = digest
            .ok_or_else(|| CryptError::BadHeader("no digest covers the data segment".into()))?;

        // The keyslots the digest covers.
        let mut keyslots = Vec::new();
        for (kid, v) in &raw.keyslots {
            let kid_n = id(kid)?;
            if !digest.keyslots.contains(&kid_n) {
                continue;
            }
            let k: RawKeyslot = serde_json::from_value(v.clone())
                .map_err(|e| CryptError::BadHeader(format!("keyslot {kid}: {e}")))?;
            if k.kind != "luks2" {
                continue;
            }
            keyslots.push(Self::keyslot(kid_n, k, areas_start, areas_end)?);
        }
        if keyslots.is_empty() {
            return Err(CryptError::BadHeader("no usable keyslot".into()));
        }
        // Priority 2 (high) first; 0 ("ignore") last, still tried.
        keyslots.sort_by_key(|k| (std::cmp::Reverse(k.priority), k.id));
        Ok(Luks2Metadata {
            keyslots,
            segment,
            digest,
            json_size: raw.config.json_size,
            keyslots_size: raw.config.keyslots_size,
        })
    }

    fn keyslot(
        kid: u32,
        k: RawKeyslot,
        areas_start: u64,
        areas_end: u64,
    ) -> Result<Luks2Keyslot, CryptError> {
        let bad = |what: String| CryptError::BadHeader(format!("keyslot {kid}: {what}"));
        if k.key_size != 32 && k.key_size != 64 {
            return Err(bad(format!("key size {}", k.key_size)));
        }
        if k.area.kind != "raw" {
            return Err(CryptError::Unsupported(format!(
                "keyslot area type {:?}",
                k.area.kind
            )));
        }
        check_cipher(&k.area.encryption)?;
        if k.area.key_size != 32 && k.area.key_size != 64 {
            return Err(bad(format!("area key size {}", k.area.key_size)));
        }
        if k.af.kind != "luks1" {
            return Err(CryptError::Unsupported(format!("AF type {:?}", k.af.kind)));
        }
        if k.af.stripes == 0 || k.af.stripes > MAX_STRIPES {
            return Err(bad(format!("{} stripes", k.af.stripes)));
        }
        let material = u64::from(k.key_size) * u64::from(k.af.stripes);
        let area_end = k.area.offset.checked_add(k.area.size);
        if k.area.offset < areas_start
            || area_end.is_none_or(|e| e > areas_end)
            || k.area.size < material
            || k.area.offset % 512 != 0
        {
            return Err(bad(format!(
                "area [{}, +{}) is outside the keyslots area [{areas_start}, {areas_end}) or smaller than its {material} bytes",
                k.area.offset, k.area.size
            )));
        }
        let salt = b64(&k.kdf.salt, "keyslot salt", MAX_SALT)?;
        let kdf = match k.kdf.kind.as_str() {
            "pbkdf2" => {
                let hash = HashAlg::parse(k.kdf.hash.as_deref().unwrap_or(""))?;
                let iterations = k
                    .kdf
                    .iterations
                    .filter(|&i| i > 0)
                    .ok_or_else(|| bad("pbkdf2 without iterations".into()))?;
                Kdf::Pbkdf2 {
                    hash,
                    iterations,
                    salt,
                }
            }
            "argon2i" | "argon2id" => {
                let kind = if k.kdf.kind == "argon2i" {
                    Argon2Kind::I
                } else {
                    Argon2Kind::Id
                };
                let time = k.kdf.time.unwrap_or(0);
                let memory_kib = k.kdf.memory.unwrap_or(0);
                let cpus = k.kdf.cpus.unwrap_or(0);
                if !(1..=MAX_ARGON2_TIME).contains(&time)
                    || !(1..=MAX_ARGON2_LANES).contains(&cpus)
                    || memory_kib < 8 * cpus
                {
                    return Err(bad(format!(
                        "argon2 time {time}, memory {memory_kib} KiB, cpus {cpus}"
                    )));
                }
                Kdf::Argon2 {
                    kind,
                    time,
                    memory_kib,
                    cpus,
                    salt,
                }
            }
            other => return Err(CryptError::Unsupported(format!("KDF {other:?}"))),
        };
        Ok(Luks2Keyslot {
            id: kid,
            key_size: k.key_size as usize,
            area_offset: k.area.offset,
            area_size: k.area.size,
            area_key_size: k.area.key_size as usize,
            kdf,
            stripes: k.af.stripes,
            af_hash: HashAlg::parse(&k.af.hash)?,
            priority: k.priority.unwrap_or(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},"area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"argon2id","time":4,"memory":1024,"cpus":1,"salt":"zbIKeEhIlwnIGRjpm/h6ncmnaIT5YVxxDG3oNfc6u2g="}}},"tokens":{},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}},"digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256","iterations":1000,"salt":"bzRHt2Sv71+RegN6QeK2CA==","digest":"bzRHt2Sv71+RegN6QeK2CA=="}},"config":{"json_size":"12288","keyslots_size":"16744448"}}"#;

    #[test]
    fn parses_cryptsetup_metadata() {
        let md = Luks2Metadata::parse(GOOD, 16384, Some(32 << 20)).unwrap();
        assert_eq!(md.segment.offset, 16 << 20);
        assert_eq!(md.segment.size, None);
        assert_eq!(md.segment.sector_size, 4096);
        assert_eq!(md.keyslots.len(), 1);
        assert_eq!(md.keyslots[0].stripes, 4000);
        assert!(matches!(
            md.keyslots[0].kdf,
            Kdf::Argon2 {
                kind: Argon2Kind::Id,
                time: 4,
                memory_kib: 1024,
                cpus: 1,
                ..
            }
        ));
    }

    #[test]
    fn rejects_what_it_cannot_honour() {
        let bad = [
            GOOD.replace(
                r#""sector_size":4096"#,
                r#""sector_size":4096,"integrity":{"type":"hmac(sha256)"}"#,
            ),
            GOOD.replace(r#""json_size":"12288""#, r#""json_size":"4096""#),
            GOOD.replace(r#""offset":"16777216""#, r#""offset":"4096""#),
            GOOD.replace(r#""stripes":4000"#, r#""stripes":0"#),
            GOOD.replace(r#""cpus":1"#, r#""cpus":100000"#),
            GOOD.replace(
                "aes-xts-plain64\",\"sector",
                "aes-cbc-essiv:sha256\",\"sector",
            ),
            GOOD.replace(
                r#""keyslots_size":"16744448""#,
                r#""keyslots_size":"18446744073709551615""#,
            ),
            GOOD.replace(r#""size":"258048""#, r#""size":"1""#),
            GOOD.replace(r#""iterations":1000"#, r#""iterations":0"#),
            GOOD.replace(
                r#""config":{"#,
                r#""config":{"requirements":{"mandatory":["online-reencrypt"]},"#,
            ),
        ];
        for (i, text) in bad.iter().enumerate() {
            assert_ne!(text, GOOD, "case {i} did not change the text");
            assert!(
                Luks2Metadata::parse(text, 16384, Some(32 << 20)).is_err(),
                "case {i} was accepted"
            );
        }
        assert!(Luks2Metadata::parse(GOOD, 16384, Some(1 << 20)).is_err());
        assert!(Luks2Metadata::parse("{", 16384, None).is_err());
    }
}
