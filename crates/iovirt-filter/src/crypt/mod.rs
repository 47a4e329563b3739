//! LUKS-compatible AES-XTS encryption filter.
//!
//! [`open_luks`] reads a LUKS1 (as made by `qemu-img create -f luks`) or LUKS2
//! (as made by `cryptsetup luksFormat --type luks2`) header from a child
//! back-end, unlocks a keyslot with a passphrase or key file, and returns a
//! [`CryptBackend`]: a back-end that shows the plaintext of the data segment.
//! [`create_luks2`] formats a new LUKS2 volume that cryptsetup accepts.
//!
//! On the I/O path the filter encrypts each write into a bounce buffer with
//! AES-XTS (`plain64`: the tweak is the little-endian 64-bit sector number,
//! counted from the data segment plus the segment's IV offset), and decrypts
//! each read after the child completes it. Flush and FUA pass through.
//! **Discard** passes through as it is (like dm-crypt with `allow_discards`):
//! a discarded range then reads back as the decryption of whatever the child
//! returns (garbage, not zeroes), and the discard pattern leaks which ranges
//! are unused. **Write-zeroes** becomes writes of encrypted zeroes, so the
//! range reads back as zeroes; it is never passed down, since zeroed
//! ciphertext would not decrypt to zeroes.
//!
//! Key material (passphrases, derived keys, the volume key, AES key schedules)
//! lives in zeroize-on-drop buffers, is redacted from every `Debug` output, is
//! never logged, and no type here is serialisable.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
//! use iovirt_filter::crypt::{create_luks2, open_luks, CreateOptions, CryptOptions};
//!
//! let disk: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(4 << 20)));
//! let opts = CreateOptions::fast_for_tests();
//! create_luks2(disk.clone(), b"secret", &opts)?;
//! let plain = open_luks(disk.clone(), &CryptOptions::with_passphrase("secret"))?;
//! submit_wait(&plain, Request::Write { offset: 0, buf: IoBuffers::from_vec(vec![7; 4096]), fua: false })?;
//! let back = IoBuffers::zeroed(4096);
//! submit_wait(&plain, Request::Read { offset: 0, buf: back })?;
//! let wrong = open_luks(disk, &CryptOptions::with_passphrase("nope"));
//! assert!(matches!(wrong, Err(iovirt_filter::crypt::CryptError::WrongPassphrase)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod create;
mod filter;
pub mod kdf;
pub mod luks1;
pub mod luks2;
mod unlock;
mod xts;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use iovirt_backend::{BlockBackend, BlockError};
use zeroize::Zeroizing;

pub use create::{create_luks2, create_luks2_file, CreateKdf, CreateOptions};
pub use filter::CryptBackend;
pub use unlock::{inspect, LuksInfo, LuksVersion, VolumeKey};
pub use xts::{XtsCipher, XtsError, MAX_SECTOR_SIZE};

/// Largest key file read (cryptsetup's default limit, 8 MiB).
pub const MAX_KEY_FILE: u64 = 8 << 20;
/// Most Argon2 memory a keyslot may ask for before we refuse to open it, in KiB
/// (1 GiB: the most cryptsetup ever chooses by itself).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 1 << 20;

/// How to unlock a LUKS volume. Build with [`CryptOptions::with_passphrase`],
/// [`CryptOptions::with_key_file`], or a struct literal.
#[derive(Clone, Default)]
pub struct CryptOptions {
    /// The passphrase.
    pub passphrase: Option<String>,
    /// A file whose whole contents are the passphrase (as `cryptsetup --key-file`).
    pub key_file: Option<PathBuf>,
}

impl std::fmt::Debug for CryptOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptOptions")
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "<redacted>"),
            )
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl Drop for CryptOptions {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(p) = self.passphrase.as_mut() {
            p.zeroize();
        }
    }
}

impl CryptOptions {
    /// Unlock with `passphrase`.
    pub fn with_passphrase(passphrase: impl Into<String>) -> Self {
        CryptOptions {
            passphrase: Some(passphrase.into()),
            key_file: None,
        }
    }

    /// Unlock with the contents of `path`.
    pub fn with_key_file(path: impl Into<PathBuf>) -> Self {
        CryptOptions {
            passphrase: None,
            key_file: Some(path.into()),
        }
    }

    /// The passphrase bytes: the key file's contents if one is given, else the passphrase.
    pub(crate) fn secret(&self) -> Result<Zeroizing<Vec<u8>>, CryptError> {
        if let Some(path) = &self.key_file {
            let f = std::fs::File::open(path).map_err(|e| CryptError::KeyFile {
                path: path.clone(),
                error: e,
            })?;
            let mut v = Zeroizing::new(Vec::new());
            f.take(MAX_KEY_FILE + 1)
                .read_to_end(&mut v)
                .map_err(|e| CryptError::KeyFile {
                    path: path.clone(),
                    error: e,
                })?;
            if v.len() as u64 > MAX_KEY_FILE {
                return Err(CryptError::KeyFile {
                    path: path.clone(),
                    error: std::io::Error::other("larger than 8 MiB"),
                });
            }
            return Ok(v);
        }
        match &self.passphrase {
            Some(p) => Ok(Zeroizing::new(p.as_bytes().to_vec())),
            None => Err(CryptError::NoPassphrase),
        }
    }
}

/// Why a LUKS volume could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// The image has no LUKS magic.
    #[error("not a LUKS image (no LUKS magic)")]
    NotLuks,
    /// No keyslot opens with the passphrase.
    #[error("no keyslot opens with this passphrase")]
    WrongPassphrase,
    /// Neither a passphrase nor a key file was given.
    #[error("a LUKS image needs a passphrase or a key file")]
    NoPassphrase,
    /// The key file could not be read.
    #[error("key file {path}: {error}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        error: std::io::Error,
    },
    /// The header is damaged or hostile.
    #[error("invalid LUKS header: {0}")]
    BadHeader(String),
    /// The header is valid but asks for something we do not implement.
    #[error("unsupported LUKS feature: {0}")]
    Unsupported(String),
    /// Reading or writing the child back-end failed.
    #[error("I/O on the LUKS image: {0}")]
    Io(#[from] BlockError),
    /// Creating a volume failed.
    #[error("cannot create the LUKS volume: {0}")]
    Create(String),
    /// A cipher could not be set up.
    #[error("cipher: {0}")]
    Cipher(#[from] XtsError),
}

/// Fill `buf` from the kernel's random number generator.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), CryptError> {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(|e| CryptError::Create(format!("reading /dev/urandom: {e}")))
}

/// Open the LUKS volume on `child` and return a back-end that shows its plaintext.
///
/// Reads and validates the header (LUKS1 or LUKS2, both copies for LUKS2),
/// derives each keyslot's key from the passphrase (or key file) until one
/// yields a volume key that matches the header's digest, and wraps `child` in
/// a [`CryptBackend`] over the data segment. A wrong passphrase gives
/// [`CryptError::WrongPassphrase`]. This blocks on the child's I/O and on the
/// key derivation (by design slow): call it at start-up, never on a vCPU thread.
pub fn open_luks(
    child: Arc<dyn BlockBackend>,
    opts: &CryptOptions,
) -> Result<Arc<dyn BlockBackend>, CryptError> {
    let secret = opts.secret()?;
    let (key, layout) = unlock::unlock(&child, &secret)?;
    Ok(Arc::new(CryptBackend::new(child, &key, layout)?))
}
