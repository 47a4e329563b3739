//! The LUKS1 on-disk header (LUKS1 On-Disk Format Specification 1.2.3): a typed
//! view over its 592 bytes and the validated [`Luks1Header`] parsed from it.
//!
//! All integers are big-endian; strings are NUL-padded ASCII; sector-valued
//! fields count 512-byte sectors.

use super::kdf::HashAlg;
use super::CryptError;

/// Bytes of the LUKS1 header proper (the phdr, keyslot descriptors included).
pub const HEADER_LEN: usize = 592;
/// The magic of a LUKS header: `LUKS\xba\xbe`.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// A keyslot in use.
pub const KEY_ENABLED: u32 = 0x00AC_71F3;
/// A keyslot not in use.
pub const KEY_DISABLED: u32 = 0x0000_DEAD;
/// Number of keyslots.
pub const NUM_KEYSLOTS: usize = 8;
/// Most anti-forensic stripes accepted (the spec's default is 4000).
pub const MAX_STRIPES: u32 = 65_536;
/// Sector unit of the header's offsets.
pub const SECTOR: u64 = 512;

/// Byte ranges of the header's fields.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..6;
    pub const VERSION: Range<usize> = 6..8;
    pub const CIPHER_NAME: Range<usize> = 8..40;
    pub const CIPHER_MODE: Range<usize> = 40..72;
    pub const HASH_SPEC: Range<usize> = 72..104;
    pub const PAYLOAD_OFFSET: Range<usize> = 104..108;
    pub const KEY_BYTES: Range<usize> = 108..112;
    pub const MK_DIGEST: Range<usize> = 112..132;
    pub const MK_DIGEST_SALT: Range<usize> = 132..164;
    pub const MK_DIGEST_ITER: Range<usize> = 164..168;
    pub const UUID: Range<usize> = 168..208;
    pub const KEYSLOTS: usize = 208;
    pub const KEYSLOT_LEN: usize = 48;
    // Within a keyslot descriptor:
    pub const KS_ACTIVE: Range<usize> = 0..4;
    pub const KS_ITERATIONS: Range<usize> = 4..8;
    pub const KS_SALT: Range<usize> = 8..40;
    pub const KS_KEY_OFFSET: Range<usize> = 40..44;
    pub const KS_STRIPES: Range<usize> = 44..48;
}

/// A typed view over a LUKS1 header in a byte buffer.
#[derive(Debug, Clone)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_be_bytes(a)
}

fn cstr(b: &[u8]) -> Result<&str, CryptError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map_err(|_| CryptError::BadHeader("a header string is not ASCII".into()))
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wrap `buffer` without checking it.
    pub fn new_unchecked(buffer: T) -> Self {
        Header { buffer }
    }

    /// Wrap `buffer`, checking it is long enough and carries the LUKS magic and version 1.
    pub fn new_checked(buffer: T) -> Result<Self, CryptError> {
        let h = Header { buffer };
        let b = h.buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(CryptError::BadHeader(format!(
                "LUKS1 header needs {HEADER_LEN} bytes, got {}",
                b.len()
            )));
        }
        if b[field::MAGIC] != MAGIC {
            return Err(CryptError::NotLuks);
        }
        if h.version() != 1 {
            return Err(CryptError::BadHeader(format!(
                "version {} is not LUKS1",
                h.version()
            )));
        }
        Ok(h)
    }

    fn b(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    /// The format version (1).
    pub fn version(&self) -> u16 {
        u16::from_be_bytes([self.b()[6], self.b()[7]])
    }
    /// Cipher name, e.g. `aes`.
    pub fn cipher_name(&self) -> &[u8] {
        &self.b()[field::CIPHER_NAME]
    }
    /// Cipher mode, e.g. `xts-plain64`.
    pub fn cipher_mode(&self) -> &[u8] {
        &self.b()[field::CIPHER_MODE]
    }
    /// Hash of PBKDF2 and the AF splitter, e.g. `sha256`.
    pub fn hash_spec(&self) -> &[u8] {
        &self.b()[field::HASH_SPEC]
    }
    /// Start of the encrypted payload, in 512-byte sectors.
    pub fn payload_offset(&self) -> u32 {
        be32(&self.b()[field::PAYLOAD_OFFSET])
    }
    /// Length of the master key in bytes.
    pub fn key_bytes(&self) -> u32 {
        be32(&self.b()[field::KEY_BYTES])
    }
    /// PBKDF2 digest of the master key.
    pub fn mk_digest(&self) -> &[u8] {
        &self.b()[field::MK_DIGEST]
    }
    /// Salt of the master-key digest.
    pub fn mk_digest_salt(&self) -> &[u8] {
        &self.b()[field::MK_DIGEST_SALT]
    }
    /// Iterations of the master-key digest.
    pub fn mk_digest_iter(&self) -> u32 {
        be32(&self.b()[field::MK_DIGEST_ITER])
    }
    /// The UUID as text.
    pub fn uuid(&self) -> &[u8] {
        &self.b()[field::UUID]
    }
    /// The raw descriptor of keyslot `i` (`i < 8`).
    fn slot(&self, i: usize) -> &[u8] {
        let start = field::KEYSLOTS + (i % NUM_KEYSLOTS) * field::KEYSLOT_LEN;
        &self.b()[start..start + field::KEYSLOT_LEN]
    }
    /// Whether keyslot `i` is active (raw value).
    pub fn slot_active(&self, i: usize) -> u32 {
        be32(&self.slot(i)[field::KS_ACTIVE])
    }
    /// PBKDF2 iterations of keyslot `i`.
    pub fn slot_iterations(&self, i: usize) -> u32 {
        be32(&self.slot(i)[field::KS_ITERATIONS])
    }
    /// Salt of keyslot `i`.
    pub fn slot_salt(&self, i: usize) -> &[u8] {
        &self.slot(i)[field::KS_SALT]
    }
    /// Start of keyslot `i`'s key material, in 512-byte sectors.
    pub fn slot_key_offset(&self, i: usize) -> u32 {
        be32(&self.slot(i)[field::KS_KEY_OFFSET])
    }
    /// Anti-forensic stripes of keyslot `i`.
    pub fn slot_stripes(&self, i: usize) -> u32 {
        be32(&self.slot(i)[field::KS_STRIPES])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    fn bm(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }
    /// Set the magic and version 1.
    pub fn set_magic_and_version(&mut self) {
        self.bm()[field::MAGIC].copy_from_slice(&MAGIC);
        self.bm()[field::VERSION].copy_from_slice(&1u16.to_be_bytes());
    }
    fn set_str(&mut self, r: std::ops::Range<usize>, s: &str) {
        let dst = &mut self.bm()[r];
        dst.fill(0);
        let n = s.len().min(dst.len().saturating_sub(1));
        dst[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    /// Set cipher name, mode and hash.
    pub fn set_cipher(&mut self, name: &str, mode: &str, hash: &str) {
        self.set_str(field::CIPHER_NAME, name);
        self.set_str(field::CIPHER_MODE, mode);
        self.set_str(field::HASH_SPEC, hash);
    }
    /// Set the payload offset (sectors) and key length (bytes).
    pub fn set_layout(&mut self, payload_offset: u32, key_bytes: u32) {
        self.bm()[field::PAYLOAD_OFFSET].copy_from_slice(&payload_offset.to_be_bytes());
        self.bm()[field::KEY_BYTES].copy_from_slice(&key_bytes.to_be_bytes());
    }
    /// Set the master-key digest, its salt and iterations.
    pub fn set_mk_digest(&mut self, digest: &[u8; 20], salt: &[u8; 32], iter: u32) {
        self.bm()[field::MK_DIGEST].copy_from_slice(digest);
        self.bm()[field::MK_DIGEST_SALT].copy_from_slice(salt);
        self.bm()[field::MK_DIGEST_ITER].copy_from_slice(&iter.to_be_bytes());
    }
    /// Set the UUID text.
    pub fn set_uuid(&mut self, uuid: &str) {
        self.set_str(field::UUID, uuid);
    }
    /// Set keyslot `i` (`i < 8`).
    pub fn set_slot(
        &mut self,
        i: usize,
        active: u32,
        iterations: u32,
        salt: &[u8; 32],
        key_offset: u32,
        stripes: u32,
    ) {
        let start = field::KEYSLOTS + (i % NUM_KEYSLOTS) * field::KEYSLOT_LEN;
        let s = &mut self.bm()[start..start + field::KEYSLOT_LEN];
        s[field::KS_ACTIVE].copy_from_slice(&active.to_be_bytes());
        s[field::KS_ITERATIONS].copy_from_slice(&iterations.to_be_bytes());
        s[field::KS_SALT].copy_from_slice(salt);
        s[field::KS_KEY_OFFSET].copy_from_slice(&key_offset.to_be_bytes());
        s[field::KS_STRIPES].copy_from_slice(&stripes.to_be_bytes());
    }
}

/// A validated keyslot of a LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks1Keyslot {
    /// Keyslot number (0..8).
    pub index: usize,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; 32],
    /// Byte offset of the key material in the image.
    pub key_material_offset: u64,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A validated LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Luks1Header {
    /// Cipher name (`aes`).
    pub cipher_name: String,
    /// Cipher mode (`xts-plain64`).
    pub cipher_mode: String,
    /// Hash of the KDF, AF splitter and digest.
    pub hash: HashAlg,
    /// Byte offset of the encrypted payload.
    pub payload_offset: u64,
    /// Master key length in bytes.
    pub key_bytes: usize,
    /// Master-key digest.
    pub mk_digest: [u8; 20],
    /// Salt of the master-key digest.
    pub mk_digest_salt: [u8; 32],
    /// Iterations of the master-key digest.
    pub mk_digest_iter: u32,
    /// UUID text.
    pub uuid: String,
    /// The active keyslots.
    pub keyslots: Vec<Luks1Keyslot>,
}

impl Luks1Header {
    /// Parse and validate a checked header: every field is checked before use.
    /// `image_len` (the image size in bytes, when known) bounds the offsets.
    pub fn parse<T: AsRef<[u8]>>(
        h: &Header<T>,
        image_len: Option<u64>,
    ) -> Result<Self, CryptError> {
        let cipher_name = cstr(h.cipher_name())?.to_string();
        let cipher_mode = cstr(h.cipher_mode())?.to_string();
        let hash = HashAlg::parse(cstr(h.hash_spec())?)?;
        let key_bytes = h.key_bytes() as usize;
        if key_bytes != 32 && key_bytes != 64 {
            return Err(CryptError::Unsupported(format!(
                "LUKS1 key of {key_bytes} bytes (AES-XTS takes 32 or 64)"
            )));
        }
        if h.mk_digest_iter() == 0 {
            return Err(CryptError::BadHeader(
                "master-key digest with 0 iterations".into(),
            ));
        }
        let payload_offset = u64::from(h.payload_offset()) * SECTOR;
        if payload_offset == 0 {
            return Err(CryptError::BadHeader(
                "payload offset 0 overlaps the header".into(),
            ));
        }
        if let Some(len) = image_len {
            if payload_offset > len {
                return Err(CryptError::BadHeader(format!(
                    "payload offset {payload_offset} is beyond the image's {len} bytes"
                )));
            }
        }
        let mut keyslots = Vec::new();
        for i in 0..NUM_KEYSLOTS {
            match h.slot_active(i) {
                KEY_DISABLED => continue,
                KEY_ENABLED => {}
                other => {
                    return Err(CryptError::BadHeader(format!(
                        "keyslot {i} has state {other:#x}"
                    )))
                }
            }
            let stripes = h.slot_stripes(i);
            if stripes == 0 || stripes > MAX_STRIPES {
                return Err(CryptError::BadHeader(format!(
                    "keyslot {i} has {stripes} stripes"
                )));
            }
            if h.slot_iterations(i) == 0 {
                return Err(CryptError::BadHeader(format!(
                    "keyslot {i} has 0 iterations"
                )));
            }
            let key_material_offset = u64::from(h.slot_key_offset(i)) * SECTOR;
            let material_len = key_bytes as u64 * u64::from(stripes);
            let end = key_material_offset + material_len;
            if key_material_offset < HEADER_LEN as u64 || end > payload_offset {
                return Err(CryptError::BadHeader(format!(
                    "keyslot {i}'s key material [{key_material_offset}, {end}) is not between the header and the payload at {payload_offset}"
                )));
            }
            let mut salt = [0u8; 32];
            salt.copy_from_slice(h.slot_salt(i));
            keyslots.push(Luks1Keyslot {
                index: i,
                iterations: h.slot_iterations(i),
                salt,
                key_material_offset,
                stripes,
            });
        }
        let mut mk_digest = [0u8; 20];
        mk_digest.copy_from_slice(h.mk_digest());
        let mut mk_digest_salt = [0u8; 32];
        mk_digest_salt.copy_from_slice(h.mk_digest_salt());
        Ok(Luks1Header {
            cipher_name,
            cipher_mode,
            hash,
            payload_offset,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter: h.mk_digest_iter(),
            uuid: cstr(h.uuid())?.to_string(),
            keyslots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut h = Header::new_unchecked(vec![0u8; HEADER_LEN]);
        h.set_magic_and_version();
        h.set_cipher("aes", "xts-plain64", "sha256");
        h.set_layout(4096, 64);
        h.set_mk_digest(&[1; 20], &[2; 32], 1000);
        h.set_uuid("0a5e0d6a-3b1f-4b8e-9f5c-000000000000");
        for i in 0..NUM_KEYSLOTS {
            h.set_slot(i, KEY_DISABLED, 0, &[0; 32], 8 + 512 * i as u32, 4000);
        }
        h.set_slot(0, KEY_ENABLED, 2000, &[3; 32], 8, 4000);
        h.buffer
    }

    #[test]
    fn parse_round_trip() {
        let buf = sample();
        let h = Header::new_checked(&buf[..]).unwrap();
        let r = Luks1Header::parse(&h, None).unwrap();
        assert_eq!(r.cipher_name, "aes");
        assert_eq!(r.cipher_mode, "xts-plain64");
        assert_eq!(r.hash, HashAlg::Sha256);
        assert_eq!(r.payload_offset, 4096 * 512);
        assert_eq!(r.keyslots.len(), 1);
        assert_eq!(r.keyslots[0].key_material_offset, 4096);
    }

    #[test]
    fn hostile_fields_are_errors() {
        let mut buf = sample();
        buf[0] = b'X';
        assert!(matches!(
            Header::new_checked(&buf[..]),
            Err(CryptError::NotLuks)
        ));
        assert!(Header::new_checked(&buf[..100]).is_err());
        let mut buf = sample();
        // Key material past the payload.
        Header::new_unchecked(&mut buf[..]).set_slot(0, KEY_ENABLED, 1, &[0; 32], 4090, 4000);
        let h = Header::new_checked(&buf[..]).unwrap();
        assert!(Luks1Header::parse(&h, None).is_err());
        let mut buf = sample();
        Header::new_unchecked(&mut buf[..]).set_layout(4096, 17);
        let h = Header::new_checked(&buf[..]).unwrap();
        assert!(Luks1Header::parse(&h, None).is_err());
        let buf = sample();
        let h = Header::new_checked(&buf[..]).unwrap();
        assert!(Luks1Header::parse(&h, Some(1000)).is_err());
    }
}
