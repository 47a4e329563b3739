//! Creating LUKS2 volumes that cryptsetup accepts.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use iovirt_backend::{submit_wait, BlockBackend, IoBuffers, Request};
use zeroize::Zeroizing;

use super::kdf::{self, Argon2Kind, HashAlg};
use super::luks2::{self, BinaryHeader};
use super::unlock::{LuksInfo, LuksVersion};
use super::{random_bytes, CryptError, XtsCipher};

/// The header size (both copies: binary header + JSON area) of volumes we create.
const HDR_SIZE: u64 = 16 << 10;
/// Offset of the first keyslot area (after both header copies).
const AREA_OFFSET: u64 = 2 * HDR_SIZE;
/// Anti-forensic stripes (the format's standard 4000).
const STRIPES: u32 = 4000;

/// How a new keyslot derives its key from the passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateKdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The hash.
        hash: HashAlg,
        /// Iterations.
        iterations: u32,
    },
    /// Argon2id (cryptsetup's default).
    Argon2id {
        /// Passes.
        time: u32,
        /// Memory in KiB.
        memory_kib: u32,
        /// Lanes.
        cpus: u32,
    },
}

/// Parameters of a new LUKS2 volume.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Encryption sector size: 512, 1024, 2048 or 4096 (cryptsetup's default on files: 4096).
    pub sector_size: u32,
    /// Volume key length: 64 (AES-256-XTS, the default) or 32 (AES-128-XTS).
    pub key_size: usize,
    /// Key derivation of keyslot 0.
    pub kdf: CreateKdf,
    /// PBKDF2-SHA256 iterations of the volume-key digest.
    pub digest_iterations: u32,
    /// Byte offset of the data segment (a multiple of 4096 leaving room for
    /// the headers and the keyslot area; cryptsetup's default is 16 MiB).
    pub data_offset: u64,
    /// Label stored in the header (at most 47 bytes).
    pub label: String,
}

impl Default for CreateOptions {
    /// Argon2id with 4 passes over 1 GiB in 4 lanes, 4096-byte sectors,
    /// AES-256-XTS, data at 16 MiB: what cryptsetup picks on a fast machine.
    fn default() -> Self {
        CreateOptions {
            sector_size: 4096,
            key_size: 64,
            kdf: CreateKdf::Argon2id {
                time: 4,
                memory_kib: 1 << 20,
                cpus: 4,
            },
            digest_iterations: 100_000,
            data_offset: 16 << 20,
            label: String::new(),
        }
    }
}

impl CreateOptions {
    /// Cheap key derivation (Argon2id, 4 passes over 1 MiB) and a 1 MiB data
    /// offset: for tests only, never for real secrets.
    pub fn fast_for_tests() -> Self {
        CreateOptions {
            kdf: CreateKdf::Argon2id {
                time: 4,
                memory_kib: 1024,
                cpus: 1,
            },
            digest_iterations: 1000,
            data_offset: 1 << 20,
            ..Default::default()
        }
    }
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn uuid_v4() -> Result<String, CryptError> {
    let mut r = [0u8; 16];
    random_bytes(&mut r)?;
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let h: String = r.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// Build the metadata of a new volume: the bytes from offset 0 to the end of
/// the keyslot area, and what the volume looks like.
fn build(passphrase: &[u8], o: &CreateOptions) -> Result<(Vec<u8>, LuksInfo), CryptError> {
    if !matches!(o.sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(CryptError::Create(format!("sector size {}", o.sector_size)));
    }
    if o.key_size != 32 && o.key_size != 64 {
        return Err(CryptError::Create(format!("key size {}", o.key_size)));
    }
    let material = o.key_size * STRIPES as usize;
    let area_size = (material as u64).next_multiple_of(4096);
    if o.data_offset % 4096 != 0 || o.data_offset < AREA_OFFSET + area_size {
        return Err(CryptError::Create(format!(
            "data offset {} must be a multiple of 4096 and at least {}",
            o.data_offset,
            AREA_OFFSET + area_size
        )));
    }
    if o.label.len() >= 48 {
        return Err(CryptError::Create("label longer than 47 bytes".into()));
    }

    let mut mk = Zeroizing::new(vec![0u8; o.key_size]);
    random_bytes(&mut mk)?;
    let mut ks_salt = [0u8; 32];
    random_bytes(&mut ks_salt)?;
    let mut d_salt = [0u8; 32];
    random_bytes(&mut d_salt)?;

    // Keyslot 0: the passphrase's derived key encrypts the split volume key.
    let mut area_key = Zeroizing::new(vec![0u8; o.key_size]);
    let kdf_json = match o.kdf {
        CreateKdf::Pbkdf2 { hash, iterations } => {
            hash.pbkdf2(passphrase, &ks_salt, iterations, &mut area_key);
            serde_json::json!({"type": "pbkdf2", "hash": hash.name(), "iterations": iterations, "salt": b64(&ks_salt)})
        }
        CreateKdf::Argon2id {
            time,
            memory_kib,
            cpus,
        } => {
            kdf::argon2(
                Argon2Kind::Id,
                time,
                memory_kib,
                cpus,
                passphrase,
                &ks_salt,
                &mut area_key,
            )
            .map_err(|e| CryptError::Create(e.to_string()))?;
            serde_json::json!({"type": "argon2id", "time": time, "memory": memory_kib, "cpus": cpus, "salt": b64(&ks_salt)})
        }
    };
    let mut split = kdf::af_split(HashAlg::Sha256, &mk, STRIPES as usize)?;
    XtsCipher::new(&area_key, 512)?.encrypt_sectors(&mut split, 0);

    let mut digest = [0u8; 32];
    HashAlg::Sha256.pbkdf2(&mk, &d_salt, o.digest_iterations, &mut digest);

    let json_size = HDR_SIZE - luks2::BINARY_LEN as u64;
    let metadata = serde_json::json!({
        "keyslots": {"0": {
            "type": "luks2",
            "key_size": o.key_size,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": "sha256"},
            "area": {"type": "raw", "offset": AREA_OFFSET.to_string(), "size": area_size.to_string(),
                     "encryption": "aes-xts-plain64", "key_size": o.key_size},
            "kdf": kdf_json,
        }},
        "tokens": {},
        "segments": {"0": {
            "type": "crypt", "offset": o.data_offset.to_string(), "size": "dynamic",
            "iv_tweak": "0", "encryption": "aes-xts-plain64", "sector_size": o.sector_size,
        }},
        "digests": {"0": {
            "type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
            "iterations": o.digest_iterations, "salt": b64(&d_salt), "digest": b64(&digest),
        }},
        "config": {"json_size": json_size.to_string(), "keyslots_size": (o.data_offset - AREA_OFFSET).to_string()},
    });
    let text = serde_json::to_string(&metadata).map_err(|e| CryptError::Create(e.to_string()))?;
    if text.len() as u64 >= json_size {
        return Err(CryptError::Create("JSON metadata too large".into()));
    }

    let uuid = uuid_v4()?;
    let hdr = HDR_SIZE as usize;
    let mut out = vec![0u8; (AREA_OFFSET + area_size) as usize];
    for (copy, primary) in [(0usize, true), (1usize, false)] {
        let region = &mut out[copy * hdr..(copy + 1) * hdr];
        region[luks2::BINARY_LEN..luks2::BINARY_LEN + text.len()].copy_from_slice(text.as_bytes());
        let mut salt = [0u8; 64];
        random_bytes(&mut salt)?;
        let mut h = BinaryHeader::new_unchecked(&mut region[..luks2::BINARY_LEN]);
        h.set_identity(primary, HDR_SIZE, 1, (copy * hdr) as u64);
        h.set_names(&o.label, &uuid, "sha256");
        h.set_salt(&salt);
        let csum = luks2::header_checksum(region);
        BinaryHeader::new_unchecked(&mut region[..luks2::BINARY_LEN]).set_checksum(&csum);
    }
    out[AREA_OFFSET as usize..AREA_OFFSET as usize + material].copy_from_slice(&split);
    Ok((
        out,
        LuksInfo {
            version: LuksVersion::Luks2,
            uuid,
            data_offset: o.data_offset,
            sector_size: o.sector_size,
            key_size: o.key_size,
            keyslots: 1,
        },
    ))
}

/// Format the LUKS2 volume on `child` (its whole capacity; the data segment
/// takes what follows `opts.data_offset`) with one keyslot opened by
/// `passphrase`. Overwrites the metadata area; the data area is left as it
/// is (it reads as garbage until written). Blocks on the child's I/O.
pub fn create_luks2(
    child: Arc<dyn BlockBackend>,
    passphrase: &[u8],
    opts: &CreateOptions,
) -> Result<LuksInfo, CryptError> {
    let ci = child.info();
    if ci.capacity < opts.data_offset.saturating_add(u64::from(opts.sector_size)) {
        return Err(CryptError::Create(format!(
            "{} bytes leave no room for data after offset {}",
            ci.capacity, opts.data_offset
        )));
    }
    let (mut meta, info) = build(passphrase, opts)?;
    let bs = ci.logical_block_size.max(1) as usize;
    meta.resize(meta.len().next_multiple_of(bs), 0);
    submit_wait(
        child.as_ref(),
        Request::Write {
            offset: 0,
            buf: IoBuffers::from_vec(meta),
            fua: false,
        },
    )?;
    submit_wait(child.as_ref(), Request::Flush)?;
    Ok(info)
}

/// Create the file `path` holding a LUKS2 volume with `size` bytes of data
/// (rounded up to whole sectors) after `opts.data_offset`, and one keyslot
/// opened by `passphrase`. The data area is sparse and reads as garbage until written.
pub fn create_luks2_file(
    path: impl AsRef<Path>,
    size: u64,
    passphrase: &[u8],
    opts: &CreateOptions,
) -> Result<LuksInfo, CryptError> {
    let path = path.as_ref();
    let (meta, info) = build(passphrase, opts)?;
    let total = opts
        .data_offset
        .checked_add(size.next_multiple_of(u64::from(opts.sector_size)))
        .ok_or_else(|| CryptError::Create(format!("size {size} overflows")))?;
    let io = |e: std::io::Error| CryptError::Create(format!("{}: {e}", path.display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    f.write_all(&meta).map_err(io)?;
    f.set_len(total).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypt::{inspect, open_luks, CryptOptions};
    use iovirt_backend::{Inline, MemoryBackend};

    #[test]
    fn created_volume_opens_and_round_trips() {
        for (sector_size, kdf) in [
            (4096, CreateOptions::fast_for_tests().kdf),
            (
                512,
                CreateKdf::Pbkdf2 {
                    hash: HashAlg::Sha256,
                    iterations: 1000,
                },
            ),
        ] {
            let disk: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(2 << 20)));
            let opts = CreateOptions {
                sector_size,
                kdf,
                ..CreateOptions::fast_for_tests()
            };
            let info = create_luks2(disk.clone(), b"pw", &opts).unwrap();
            assert_eq!(inspect(&disk).unwrap(), info);
            let plain = open_luks(disk.clone(), &CryptOptions::with_passphrase("pw")).unwrap();
            assert_eq!(plain.info().capacity, 1 << 20);
            assert_eq!(plain.info().logical_block_size, sector_size);
            let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
            submit_wait(
                &plain,
                Request::Write {
                    offset: 4096,
                    buf: IoBuffers::from_vec(data.clone()),
                    fua: false,
                },
            )
            .unwrap();
            let back = IoBuffers::zeroed(8192);
            let (tx, rx) = std::sync::mpsc::channel();
            plain.submit(
                Request::Read {
                    offset: 4096,
                    buf: back,
                },
                iovirt_backend::Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
            );
            assert!(rx.recv().unwrap());
            assert!(matches!(
                open_luks(disk, &CryptOptions::with_passphrase("wrong")),
                Err(CryptError::WrongPassphrase)
            ));
        }
    }
}
