//! Fuzz LUKS1 header parsing: arbitrary bytes as the start of an image, through
//! the typed view, the validated header, and `inspect` on a memory disk. It must
//! never panic or allocate without bound, whatever the header says.
#![no_main]
use std::sync::Arc;

use iovirt_backend::{BlockBackend, Inline, MemoryBackend};
use iovirt_filter::crypt::luks1::{Header, Luks1Header, MAGIC};
use iovirt_filter::crypt::{inspect, open_luks, CryptOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Give the fuzzer the magic and version for free half of the time.
    let mut image = data.to_vec();
    if image.first().is_some_and(|b| b & 1 == 1) && image.len() >= 8 {
        image[..6].copy_from_slice(&MAGIC);
        image[6..8].copy_from_slice(&1u16.to_be_bytes());
    }
    image.resize(image.len().max(4096).next_multiple_of(512), 0);
    let mut cheap = false;
    if let Ok(h) = Header::new_checked(&image[..]) {
        let _ = Luks1Header::parse(&h, None);
        if let Ok(hdr) = Luks1Header::parse(&h, Some(image.len() as u64)) {
            // Unlocking runs the header's PBKDF2: only when its iteration counts are tiny.
            cheap = hdr.mk_digest_iter <= 16 && hdr.keyslots.iter().all(|k| k.iterations <= 16);
        }
    }
    let disk: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::from_vec(image)));
    let _ = inspect(&disk);
    if cheap {
        let _ = open_luks(disk, &CryptOptions::with_passphrase("fuzz"));
    }
});
