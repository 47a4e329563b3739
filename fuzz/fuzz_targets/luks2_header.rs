//! Fuzz LUKS2 header and JSON metadata parsing. The first input byte picks how
//! the rest is used: as a raw image (binary header checks, both copies), as the
//! JSON area of a primary header whose magic, size, offset and checksum are made
//! valid (so the JSON reaches the metadata validation), or as JSON text handed
//! straight to the metadata parser. Nothing may panic or allocate without bound.
#![no_main]
use std::sync::Arc;

use iovirt_backend::{BlockBackend, Inline, MemoryBackend};
use iovirt_filter::crypt::luks2::{header_checksum, BinaryHeader, Kdf, Luks2Metadata, BINARY_LEN};
use iovirt_filter::crypt::{inspect, open_luks, CryptOptions};
use libfuzzer_sys::fuzz_target;

const HDR: usize = 16 << 10;

fn disk(image: Vec<u8>) -> Arc<dyn BlockBackend> {
    Arc::new(Inline(MemoryBackend::from_vec(image)))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let mut image = rest.to_vec();
            image.resize(image.len().max(4096).next_multiple_of(512), 0);
            let _ = inspect(&disk(image));
        }
        1 => {
            // A valid-looking primary copy around the fuzzed JSON, a 1 MiB image.
            let mut image = vec![0u8; 1 << 20];
            let n = rest.len().min(HDR - BINARY_LEN);
            image[BINARY_LEN..BINARY_LEN + n].copy_from_slice(&rest[..n]);
            let mut h = BinaryHeader::new_unchecked(&mut image[..BINARY_LEN]);
            h.set_identity(true, HDR as u64, 1, 0);
            h.set_names("", "fuzz", "sha256");
            let csum = header_checksum(&image[..HDR]);
            BinaryHeader::new_unchecked(&mut image[..BINARY_LEN]).set_checksum(&csum);
            let d = disk(image);
            if inspect(&d).is_ok() {
                // Only cheap key derivations are worth running per input.
                let text = String::from_utf8_lossy(&rest[..n]);
                let text = text.split('\0').next().unwrap_or_default();
                if let Ok(md) = Luks2Metadata::parse(text, HDR as u64, Some(1 << 20)) {
                    let cheap = md.digest.iterations <= 16
                        && md.keyslots.iter().all(|k| match &k.kdf {
                            Kdf::Pbkdf2 { iterations, .. } => *iterations <= 16,
                            Kdf::Argon2 {
                                time, memory_kib, ..
                            } => *time <= 2 && *memory_kib <= 64,
                        });
                    if cheap {
                        let _ = open_luks(d, &CryptOptions::with_passphrase("fuzz"));
                    }
                }
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                let _ = Luks2Metadata::parse(text, HDR as u64, Some(1 << 30));
                let _ = Luks2Metadata::parse(text, HDR as u64, None);
            }
        }
    }
});
