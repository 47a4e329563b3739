//! Key derivation (PBKDF2, Argon2) and the anti-forensic splitter of LUKS.

use sha1::Sha1;
use sha2::digest::Digest;
use sha2::{Sha256, Sha512};
use zeroize::{Zeroize, Zeroizing};

use super::CryptError;

/// A hash LUKS names in its headers (`hash-spec`, `af.hash`, `digest.hash`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashAlg {
    /// SHA-1 (old LUKS1 images).
    Sha1,
    /// SHA-256 (the default of qemu-img and cryptsetup).
    Sha256,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Parse a LUKS hash name (case-insensitive: `sha1`, `sha256`, `sha512`).
    pub fn parse(name: &str) -> Result<Self, CryptError> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(HashAlg::Sha1),
            "sha256" => Ok(HashAlg::Sha256),
            "sha512" => Ok(HashAlg::Sha512),
            _ => Err(CryptError::Unsupported(format!("hash {name:?}"))),
        }
    }

    /// The LUKS name of the hash.
    pub fn name(self) -> &'static str {
        match self {
            HashAlg::Sha1 => "sha1",
            HashAlg::Sha256 => "sha256",
            HashAlg::Sha512 => "sha512",
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }

    /// PBKDF2-HMAC with this hash, filling `out`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
        }
    }

    /// Hash of `parts` concatenated, written into `out` (truncated to `out`'s length).
    fn hash_into(self, parts: &[&[u8]], out: &mut [u8]) {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            let mut d = h.finalize();
            let n = out.len().min(d.len());
            out[..n].copy_from_slice(&d[..n]);
            d.as_mut_slice().zeroize();
        }
        match self {
            HashAlg::Sha1 => run::<Sha1>(parts, out),
            HashAlg::Sha256 => run::<Sha256>(parts, out),
            HashAlg::Sha512 => run::<Sha512>(parts, out),
        }
    }
}

/// Argon2 variants LUKS2 keyslots use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Argon2Kind {
    /// `argon2i`.
    I,
    /// `argon2id` (cryptsetup's default).
    Id,
}

/// Argon2 with LUKS2's parameters: `time` passes over `memory_kib` KiB in
/// `lanes` lanes (version 0x13, no secret, no associated data).
pub fn argon2(
    kind: Argon2Kind,
    time: u32,
    memory_kib: u32,
    lanes: u32,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), CryptError> {
    let alg = match kind {
        Argon2Kind::I => argon2::Algorithm::Argon2i,
        Argon2Kind::Id => argon2::Algorithm::Argon2id,
    };
    let params = argon2::Params::new(memory_kib, time, lanes, Some(out.len()))
        .map_err(|e| CryptError::BadHeader(format!("argon2 parameters: {e}")))?;
    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
        .hash_password_into(password, salt, out)
        .map_err(|e| CryptError::BadHeader(format!("argon2: {e}")))
}

/// The anti-forensic "diffuse" step: each digest-sized piece `i` of `buf` becomes
/// `H(be32(i) || piece)`, the last piece truncated to what is left.
fn diffuse(hash: HashAlg, buf: &mut [u8]) {
    let ds = hash.digest_len();
    let mut out = Zeroizing::new([0u8; 64]);
    for (i, piece) in buf.chunks_mut(ds).enumerate() {
        let iv = (i as u32).to_be_bytes();
        let n = piece.len();
        hash.hash_into(&[&iv, piece], &mut out[..n]);
        piece.copy_from_slice(&out[..n]);
    }
}

/// Merge `stripes` stripes of `key_len` bytes each (the anti-forensic splitter's
/// output, `split.len() == key_len * stripes`) back into the key.
pub fn af_merge(
    hash: HashAlg,
    split: &[u8],
    key_len: usize,
    stripes: usize,
) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    if stripes == 0 || key_len.checked_mul(stripes) != Some(split.len()) {
        return Err(CryptError::BadHeader(format!(
            "anti-forensic material of {} bytes is not {stripes} stripes of {key_len} bytes",
            split.len()
        )));
    }
    let mut d = Zeroizing::new(vec![0u8; key_len]);
    let mut stripes_iter = split.chunks_exact(key_len);
    for _ in 0..stripes - 1 {
        if let Some(s) = stripes_iter.next() {
            d.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
            diffuse(hash, &mut d);
        }
    }
    if let Some(last) = stripes_iter.next() {
        d.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    }
    Ok(d)
}

/// Split `key` into `stripes` stripes: all but the last random, the last chosen
/// so that [`af_merge`] gives `key` back.
pub fn af_split(
    hash: HashAlg,
    key: &[u8],
    stripes: usize,
) -> Result<Zeroizing<Vec<u8>>, CryptError> {
    let len = key.len();
    let total = len
        .checked_mul(stripes)
        .filter(|_| stripes > 0)
        .ok_or_else(|| CryptError::Create(format!("{stripes} stripes")))?;
    let mut out = Zeroizing::new(vec![0u8; total]);
    super::random_bytes(&mut out[..total - len])?;
    let mut d = Zeroizing::new(vec![0u8; len]);
    for s in out[..total - len].chunks_exact(len) {
        d.iter_mut().zip(s).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut d);
    }
    for ((o, a), b) in out[total - len..].iter_mut().zip(d.iter()).zip(key) {
        *o = a ^ b;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_merge_round_trip() {
        for hash in [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512] {
            let key: Vec<u8> = (0..64u8).collect();
            let split = af_split(hash, &key, 40).unwrap();
            assert_eq!(split.len(), 64 * 40);
            let merged = af_merge(hash, &split, 64, 40).unwrap();
            assert_eq!(&merged[..], &key[..]);
        }
        assert!(af_merge(HashAlg::Sha256, &[0; 10], 4, 3).is_err());
        assert!(af_merge(HashAlg::Sha256, &[], 4, 0).is_err());
    }

    #[test]
    fn pbkdf2_known_answer() {
        // RFC 6070, test 2 (PBKDF2-HMAC-SHA1, 2 iterations).
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(out[..4], [0xea, 0x6c, 0x01, 0x4d]);
    }
}
