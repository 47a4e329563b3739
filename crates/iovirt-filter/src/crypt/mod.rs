//! LUKS-compatible AES-XTS encryption filter (being written).

use std::path::PathBuf;
use std::sync::Arc;

use iovirt_backend::BlockBackend;

/// How to unlock a LUKS volume.
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
            .field("passphrase", &self.passphrase.as_ref().map(|_| "<redacted>"))
            .field("key_file", &self.key_file)
            .finish()
    }
}

/// Why a LUKS volume could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    /// Not implemented yet.
    #[error("LUKS support is not implemented yet")]
    Unimplemented,
}

/// Open the LUKS volume on `child` and return a back-end that shows its plaintext.
pub fn open_luks(
    _child: Arc<dyn BlockBackend>,
    _opts: &CryptOptions,
) -> Result<Arc<dyn BlockBackend>, CryptError> {
    Err(CryptError::Unimplemented)
}
