//! Reading LUKS headers from a child back-end and unlocking a keyslot.

use std::sync::Arc;

use iovirt_backend::{submit_wait, BlockBackend, IoBuffers, Request};
use zeroize::Zeroizing;

use super::kdf::{self, HashAlg};
use super::luks1::{self, Luks1Header};
use super::luks2::{self, Kdf, Luks2Metadata};
use super::{CryptError, XtsCipher, MAX_ARGON2_MEMORY_KIB};

/// The volume (master) key: zeroized on drop, redacted in `Debug`.
pub struct VolumeKey(pub(crate) Zeroizing<Vec<u8>>);

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeKey(<{} bytes redacted>)", self.0.len())
    }
}

impl VolumeKey {
    /// The key bytes (data key then tweak key).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Where the encrypted data lies and how it is tweaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Byte offset of the data segment in the child.
    pub data_offset: u64,
    /// Byte length of the segment (`None`: to the end of the child).
    pub size: Option<u64>,
    /// Encryption sector size.
    pub sector_size: u32,
    /// Tweak (sector number) of the segment's first sector.
    pub first_sector: u64,
}

/// The LUKS format version of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LuksVersion {
    /// LUKS1.
    Luks1,
    /// LUKS2.
    Luks2,
}

/// What can be learnt of a LUKS image without a passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// Format version.
    pub version: LuksVersion,
    /// UUID text.
    pub uuid: String,
    /// Byte offset of the encrypted data.
    pub data_offset: u64,
    /// Encryption sector size.
    pub sector_size: u32,
    /// Volume key length in bytes.
    pub key_size: usize,
    /// Number of usable keyslots.
    pub keyslots: usize,
}

/// Read `len` bytes at `offset` from `child`, widening the request to the
/// child's logical blocks. `len` is bounded by callers (at most a few MiB).
pub(crate) fn read_bytes(
    child: &Arc<dyn BlockBackend>,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, CryptError> {
    let info = child.info();
    let bs = u64::from(info.logical_block_size.max(1));
    let start = offset / bs * bs;
    let end = offset
        .checked_add(len as u64)
        .and_then(|e| e.checked_next_multiple_of(bs))
        .ok_or_else(|| CryptError::BadHeader(format!("read at {offset}+{len} overflows")))?;
    if end > info.capacity {
        return Err(CryptError::BadHeader(format!(
            "metadata at [{offset}, {}) is beyond the image's {} bytes",
            offset + len as u64,
            info.capacity
        )));
    }
    let n = usize::try_from(end - start)
        .map_err(|_| CryptError::BadHeader("metadata read too large".into()))?;
    let mut v = vec![0u8; n];
    // `submit_wait` consumes the buffer; read through a shared region instead.
    let region = SharedRead::new(n)?;
    submit_wait(
        child.as_ref(),
        Request::Read {
            offset: start,
            buf: region.buffers()?,
        },
    )?;
    region.copy_out(&mut v);
    let skip = (offset - start) as usize;
    v.drain(..skip);
    v.truncate(len);
    Ok(v)
}

/// A host buffer that a child reads into and we read back afterwards: an
/// anonymous mapping handed to the child as "guest memory", so it outlives the
/// child's copy of the request.
pub(crate) struct SharedRead {
    mem: Arc<vm_memory::GuestMemoryMmap>,
    len: usize,
}

impl SharedRead {
    pub(crate) fn new(len: usize) -> Result<Self, CryptError> {
        let mem =
            vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), len.max(1))])
                .map_err(|e| CryptError::Io(iovirt_backend::BlockError::Buffer(e.to_string())))?;
        Ok(SharedRead {
            mem: Arc::new(mem),
            len: len.max(1),
        })
    }
    /// Size of the region.
    pub(crate) fn capacity(&self) -> usize {
        self.len
    }
    /// Buffers over the whole region.
    pub(crate) fn buffers(&self) -> Result<IoBuffers, CryptError> {
        self.buffers_len(self.len)
    }
    /// Buffers over the first `len` bytes of the region.
    pub(crate) fn buffers_len(&self, len: usize) -> Result<IoBuffers, CryptError> {
        Ok(IoBuffers::from_guest(
            self.mem.clone(),
            &[(vm_memory::GuestAddress(0), len.min(self.len))],
            iovirt_backend::Direction::DeviceWrites,
        )?)
    }
    /// Copy from the start of the region into `dst`.
    pub(crate) fn copy_out(&self, dst: &mut [u8]) {
        self.copy_out_at(0, dst)
    }
    /// Copy from byte `pos` of the region into `dst` (what fits).
    pub(crate) fn copy_out_at(&self, pos: usize, dst: &mut [u8]) {
        use vm_memory::Bytes;
        let _ = self
            .mem
            .read_slice(dst, vm_memory::GuestAddress(pos as u64));
    }
    /// Whether no request holds the region any more.
    pub(crate) fn is_unshared(&self) -> bool {
        Arc::strong_count(&self.mem) == 1
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Decrypt anti-forensic key material (`key_len * stripes` bytes at `offset`,
/// encrypted with AES-XTS-plain64 under `area_key` in 512-byte sectors counted
/// from the area's start) and merge it into a candidate volume key.
fn open_material(
    child: &Arc<dyn BlockBackend>,
    offset: u64,
    area_key: &[u8],
    key_len: usize,
    stripes: u32,
    af_hash: HashAlg,
) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    let len = key_len * stripes as usize;
    let padded = len.next_multiple_of(512);
    let mut material = Zeroizing::new(read_bytes(child, offset, padded)?);
    XtsCipher::new(area_key, 512)?.decrypt_sectors(&mut material, 0);
    kdf::af_merge(af_hash, &material[..len], key_len, stripes as usize)
}

fn unlock_luks1(
    child: &Arc<dyn BlockBackend>,
    head: &[u8],
    secret: &[u8],
) -> Result<(VolumeKey, Layout), CryptError> {
    let h = luks1::Header::new_checked(head)?;
    let hdr = Luks1Header::parse(&h, Some(child.info().capacity))?;
    if hdr.cipher_name != "aes" || hdr.cipher_mode != "xts-plain64" {
        return Err(CryptError::Unsupported(format!(
            "cipher {}-{}",
            hdr.cipher_name, hdr.cipher_mode
        )));
    }
    for slot in &hdr.keyslots {
        let mut derived = Zeroizing::new(vec![0u8; hdr.key_bytes]);
        hdr.hash
            .pbkdf2(secret, &slot.salt, slot.iterations, &mut derived);
        let mk = open_material(
            child,
            slot.key_material_offset,
            &derived,
            hdr.key_bytes,
            slot.stripes,
            hdr.hash,
        )?;
        let mut digest = [0u8; 20];
        hdr.hash
            .pbkdf2(&mk, &hdr.mk_digest_salt, hdr.mk_digest_iter, &mut digest);
        if ct_eq(&digest, &hdr.mk_digest) {
            log::debug!("LUKS1 {}: keyslot {} opened", hdr.uuid, slot.index);
            return Ok((
                VolumeKey(mk),
                Layout {
                    data_offset: hdr.payload_offset,
                    size: None,
                    sector_size: 512,
                    first_sector: 0,
                },
            ));
        }
    }
    Err(CryptError::WrongPassphrase)
}

/// Read and check both LUKS2 header copies; return the newer valid one's
/// header size and validated metadata, plus its UUID.
fn read_luks2(
    child: &Arc<dyn BlockBackend>,
    head: &[u8],
) -> Result<(u64, Luks2Metadata, String), CryptError> {
    let capacity = child.info().capacity;
    let mut candidates: Vec<u64> = Vec::new();
    let mut first_err = None;
    match luks2::BinaryHeader::new_checked(head) {
        Ok(h) => {
            candidates.push(0);
            candidates.push(h.hdr_size());
        }
        Err(e) => first_err = Some(e),
    }
    for s in luks2::HDR_SIZES {
        if !candidates.contains(&s) {
            candidates.push(s);
        }
    }
    let mut best: Option<(u64, u64, String, String)> = None; // (seqid, hdr_size, json, uuid)
    for off in candidates {
        let bin = match read_bytes(child, off, luks2::BINARY_LEN) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let hdr_size = match luks2::BinaryHeader::new_checked(&bin[..]) {
            Ok(h) if (off == 0) == h.is_primary() => h.hdr_size(),
            Ok(_) => continue,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        let Ok(n) = usize::try_from(hdr_size) else {
            continue;
        };
        let copy = match read_bytes(child, off, n) {
            Ok(c) => c,
            Err(e) => {
                first_err.get_or_insert(e);
                continue;
            }
        };
        match luks2::check_copy(&copy, off) {
            Ok((seqid, json)) => {
                let uuid =
                    String::from_utf8_lossy(luks2::BinaryHeader::new_unchecked(&copy[..]).uuid())
                        .into_owned();
                if best.as_ref().is_none_or(|b| seqid > b.0) {
                    best = Some((seqid, hdr_size, json.to_string(), uuid));
                }
            }
            Err(e) => {
                log::warn!("LUKS2 header copy at {off}: {e}");
                first_err.get_or_insert(e);
            }
        }
        if off != 0 && best.is_some() {
            // A valid secondary found where the primary said: enough.
            break;
        }
    }
    let (_, hdr_size, json, uuid) = best.ok_or_else(|| {
        first_err.unwrap_or_else(|| CryptError::BadHeader("no valid LUKS2 header copy".into()))
    })?;
    let md = Luks2Metadata::parse(&json, hdr_size, Some(capacity))?;
    Ok((hdr_size, md, uuid))
}

fn unlock_luks2(
    child: &Arc<dyn BlockBackend>,
    head: &[u8],
    secret: &[u8],
) -> Result<(VolumeKey, Layout), CryptError> {
    let (_, md, uuid) = read_luks2(child, head)?;
    for slot in &md.keyslots {
        let mut area_key = Zeroizing::new(vec![0u8; slot.area_key_size]);
        match &slot.kdf {
            Kdf::Pbkdf2 {
                hash,
                iterations,
                salt,
            } => hash.pbkdf2(secret, salt, *iterations, &mut area_key),
            Kdf::Argon2 {
                kind,
                time,
                memory_kib,
                cpus,
                salt,
            } => {
                if *memory_kib > MAX_ARGON2_MEMORY_KIB {
                    log::warn!(
                        "LUKS2 {uuid}: keyslot {} wants {memory_kib} KiB of Argon2 memory, more than the {MAX_ARGON2_MEMORY_KIB} KiB allowed; skipped",
                        slot.id
                    );
                    continue;
                }
                kdf::argon2(
                    *kind,
                    *time,
                    *memory_kib,
                    *cpus,
                    secret,
                    salt,
                    &mut area_key,
                )?
            }
        }
        let mk = open_material(
            child,
            slot.area_offset,
            &area_key,
            slot.key_size,
            slot.stripes,
            slot.af_hash,
        )?;
        let mut digest = Zeroizing::new(vec![0u8; md.digest.digest.len()]);
        md.digest
            .hash
            .pbkdf2(&mk, &md.digest.salt, md.digest.iterations, &mut digest);
        if ct_eq(&digest, &md.digest.digest) {
            log::debug!("LUKS2 {uuid}: keyslot {} opened", slot.id);
            let seg = &md.segment;
            let per = u64::from(seg.sector_size / 512);
            return Ok((
                VolumeKey(mk),
                Layout {
                    data_offset: seg.offset,
                    size: seg.size,
                    sector_size: seg.sector_size,
                    first_sector: seg.iv_tweak / per,
                },
            ));
        }
    }
    Err(CryptError::WrongPassphrase)
}

fn read_head(child: &Arc<dyn BlockBackend>) -> Result<Vec<u8>, CryptError> {
    let head = read_bytes(child, 0, luks2::BINARY_LEN)?;
    if head.get(..6) != Some(&luks1::MAGIC[..])
        && head.get(..6) != Some(&luks2::MAGIC_SECONDARY[..])
    {
        // Only the primary magic is looked for here; a damaged primary of a
        // LUKS2 image whose magic survived is handled by `read_luks2`.
        return Err(CryptError::NotLuks);
    }
    Ok(head)
}

/// Unlock the volume on `child` with `secret`: the volume key and the data layout.
pub(crate) fn unlock(
    child: &Arc<dyn BlockBackend>,
    secret: &[u8],
) -> Result<(VolumeKey, Layout), CryptError> {
    let head = read_head(child)?;
    match u16::from_be_bytes([head[6], head[7]]) {
        1 => unlock_luks1(child, &head, secret),
        2 => unlock_luks2(child, &head, secret),
        v => Err(CryptError::Unsupported(format!("LUKS version {v}"))),
    }
}

/// Read and validate the header of the LUKS image on `child` without unlocking it.
pub fn inspect(child: &Arc<dyn BlockBackend>) -> Result<LuksInfo, CryptError> {
    let head = read_head(child)?;
    match u16::from_be_bytes([head[6], head[7]]) {
        1 => {
            let h = luks1::Header::new_checked(&head[..])?;
            let hdr = Luks1Header::parse(&h, Some(child.info().capacity))?;
            Ok(LuksInfo {
                version: LuksVersion::Luks1,
                uuid: hdr.uuid,
                data_offset: hdr.payload_offset,
                sector_size: 512,
                key_size: hdr.key_bytes,
                keyslots: hdr.keyslots.len(),
            })
        }
        2 => {
            let (_, md, uuid) = read_luks2(child, &head)?;
            Ok(LuksInfo {
                version: LuksVersion::Luks2,
                uuid,
                data_offset: md.segment.offset,
                sector_size: md.segment.sector_size,
                key_size: md.keyslots.first().map_or(0, |k| k.key_size),
                keyslots: md.keyslots.len(),
            })
        }
        v => Err(CryptError::Unsupported(format!("LUKS version {v}"))),
    }
}
