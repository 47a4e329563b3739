//! The encryption filter's semantics on memory and thread-pool disks, driven by
//! our own LUKS2 images: flush/FUA/discard/write-zeroes, a power cut injected
//! under the filter (the fault filter), asynchronous children, hostile headers,
//! and key material kept out of `Debug` output.

use std::sync::Arc;

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, Completion, Direction, Features, Inline, IoBuffers,
    MemoryBackend, Request, ThreadPool,
};
use iovirt_filter::crypt::luks2::{header_checksum, BinaryHeader};
use iovirt_filter::crypt::{
    create_luks2, inspect, open_luks, CreateOptions, CryptError, CryptOptions,
};
use iovirt_filter::fault::{FaultFilter, FaultOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PASS: &str = "hunter2";

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn write(be: &dyn BlockBackend, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
    submit_wait(
        be,
        Request::Write {
            offset,
            buf: IoBuffers::from_vec(data.to_vec()),
            fua,
        },
    )
}

fn read(be: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0), len)],
        Direction::DeviceWrites,
    )
    .unwrap();
    submit_wait(be, Request::Read { offset, buf }).expect("read");
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn fresh(sector_size: u32) -> (Arc<Inline<MemoryBackend>>, CreateOptions) {
    let disk = Arc::new(Inline(MemoryBackend::new(4 << 20)));
    let opts = CreateOptions {
        sector_size,
        ..CreateOptions::fast_for_tests()
    };
    create_luks2(disk.clone(), PASS.as_bytes(), &opts).unwrap();
    (disk, opts)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn geometry_and_request_checks() {
    let (disk, _) = fresh(4096);
    let plain = open_luks(disk, &CryptOptions::with_passphrase(PASS)).unwrap();
    let info = plain.info();
    assert_eq!(info.capacity, 3 << 20);
    assert_eq!(info.logical_block_size, 4096);
    assert!(!info.features.contains(Features::WRITE_ZEROES));
    assert!(info.features.contains(Features::DISCARD));
    assert!(matches!(
        write(plain.as_ref(), 512, &[0; 512], false),
        Err(BlockError::Misaligned { .. })
    ));
    assert!(matches!(
        write(plain.as_ref(), 3 << 20, &[0; 4096], false),
        Err(BlockError::OutOfRange { .. })
    ));
}

#[test]
fn ciphertext_only_on_the_child_and_write_zeroes_reads_zeroes() {
    for sector_size in [512, 4096] {
        let (disk, opts) = fresh(sector_size);
        let plain = open_luks(disk.clone(), &CryptOptions::with_passphrase(PASS)).unwrap();
        let data = pattern(3, 64 << 10);
        write(plain.as_ref(), 8192, &data, true).unwrap();
        submit_wait(plain.as_ref(), Request::Flush).unwrap();
        assert_eq!(read(plain.as_ref(), 8192, data.len()), data);
        let raw = disk.0.contents();
        assert!(!contains(&raw, &data[..512]), "plaintext on the child");

        // Write-zeroes: encrypted zeroes, so the child holds no zeroes there.
        submit_wait(
            plain.as_ref(),
            Request::WriteZeroes {
                offset: 8192,
                len: 16 << 10,
                may_unmap: true,
            },
        )
        .unwrap();
        let back = read(plain.as_ref(), 8192, data.len());
        assert!(back[..16 << 10].iter().all(|&b| b == 0));
        assert_eq!(back[16 << 10..], data[16 << 10..]);
        let raw = disk.0.contents();
        let at = (opts.data_offset + 8192) as usize;
        assert!(raw[at..at + 4096].iter().any(|&b| b != 0));

        // Discard passes through: the memory disk zeroes the ciphertext, so the
        // plaintext reads back as garbage, neither the data nor zeroes.
        submit_wait(
            plain.as_ref(),
            Request::Discard {
                offset: 32 << 10,
                len: 8192,
            },
        )
        .unwrap();
        let raw = disk.0.contents();
        let at = (opts.data_offset + (32 << 10)) as usize;
        assert!(raw[at..at + 8192].iter().all(|&b| b == 0));
        let back = read(plain.as_ref(), 32 << 10, 8192);
        assert_ne!(back[..], data[24 << 10..32 << 10]);
        assert!(back.iter().any(|&b| b != 0));
    }
}

#[test]
fn large_write_zeroes_on_inline_and_thread_pool_children() {
    let (disk, _) = fresh(4096);
    let image = disk.0.contents();
    let pool = Arc::new(ThreadPool::new(MemoryBackend::from_vec(image), 3, "crypt-test").unwrap());
    for child in [disk as Arc<dyn BlockBackend>, pool as Arc<dyn BlockBackend>] {
        let plain = open_luks(child, &CryptOptions::with_passphrase(PASS)).unwrap();
        let len = 3 << 20;
        write(plain.as_ref(), 0, &vec![0xee; len], false).unwrap();
        submit_wait(
            plain.as_ref(),
            Request::WriteZeroes {
                offset: 4096,
                len: (len - 8192) as u64,
                may_unmap: false,
            },
        )
        .unwrap();
        let back = read(plain.as_ref(), 0, len);
        assert!(back[..4096].iter().all(|&b| b == 0xee));
        assert!(back[4096..len - 4096].iter().all(|&b| b == 0));
        assert!(back[len - 4096..].iter().all(|&b| b == 0xee));
    }
}

#[test]
fn many_requests_in_flight_on_a_thread_pool() {
    let (disk, _) = fresh(512);
    let pool = Arc::new(
        ThreadPool::new(MemoryBackend::from_vec(disk.0.contents()), 4, "crypt-test").unwrap(),
    );
    let plain = open_luks(pool, &CryptOptions::with_passphrase(PASS)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..64u64 {
        let tx = tx.clone();
        plain.submit(
            Request::Write {
                offset: i * 8192,
                buf: IoBuffers::from_vec(pattern(i as u8, 8192)),
                fua: false,
            },
            Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    assert!((0..64).all(|_| rx.recv().unwrap()));
    for i in (0..64u64).rev() {
        assert_eq!(read(plain.as_ref(), i * 8192, 8192), pattern(i as u8, 8192));
    }
}

// Real client: the fault-injection filter's power cut, under the encryption filter.
#[test]
fn power_cut_under_encryption_keeps_flushed_writes() {
    let (disk, _) = fresh(4096);
    let fault = Arc::new(FaultFilter::with_options(
        disk.clone(),
        FaultOptions {
            seed: 7,
            track_writes: true,
        },
    ));
    let ctl = fault.handle();
    let plain = open_luks(fault.clone(), &CryptOptions::with_passphrase(PASS)).unwrap();
    assert!(plain.info().features.contains(Features::VOLATILE_CACHE));
    let a = pattern(1, 8192);
    let b = pattern(2, 8192);
    let c = pattern(3, 4096);
    let d = pattern(4, 4096);
    write(plain.as_ref(), 0, &a, false).unwrap();
    submit_wait(plain.as_ref(), Request::Flush).unwrap();
    write(plain.as_ref(), 0, &b, false).unwrap(); // not flushed: lost
    write(plain.as_ref(), 64 << 10, &c, true).unwrap(); // FUA: kept
    write(plain.as_ref(), 128 << 10, &d, false).unwrap(); // not flushed: lost
    ctl.power_cut().unwrap();
    assert!(write(plain.as_ref(), 0, &d, false).is_err());
    ctl.power_restore();
    drop(plain);

    let again = open_luks(disk, &CryptOptions::with_passphrase(PASS)).unwrap();
    assert_eq!(read(again.as_ref(), 0, 8192), a);
    assert_eq!(read(again.as_ref(), 64 << 10, 4096), c);
    assert_ne!(read(again.as_ref(), 128 << 10, 4096), d);
}

/// Overwrite 512 bytes of the JSON area of the header copy at `offset`.
fn corrupt(disk: &dyn BlockBackend, offset: u64) {
    write(disk, offset + 4608, &[b'x'; 512], false).unwrap();
}

#[test]
fn damaged_headers() {
    let (disk, _) = fresh(4096);
    let info = inspect(&(disk.clone() as Arc<dyn BlockBackend>)).unwrap();
    // A damaged primary: the secondary copy (at 16 KiB) still opens the volume.
    corrupt(disk.as_ref(), 0);
    assert_eq!(
        inspect(&(disk.clone() as Arc<dyn BlockBackend>)).unwrap(),
        info
    );
    assert!(open_luks(disk.clone(), &CryptOptions::with_passphrase(PASS)).is_ok());
    // Both damaged: a clear error, no panic.
    corrupt(disk.as_ref(), 16 << 10);
    let Err(err) = open_luks(disk.clone(), &CryptOptions::with_passphrase(PASS)) else {
        panic!("opened with both header copies damaged");
    };
    assert!(matches!(err, CryptError::BadHeader(_)), "{err}");

    // A header with a valid checksum around hostile JSON.
    let (disk, _) = fresh(4096);
    let mut image = disk.0.contents();
    let hostile = br#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000000000,"hash":"sha256"},"area":{"type":"raw","offset":"32768","size":"18446744073709551615","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1,"salt":"AAAA"}}},"tokens":{},"segments":{"0":{"type":"crypt","offset":"1048576","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}},"digests":{"0":{"type":"pbkdf2","keyslots":["0"],"segments":["0"],"hash":"sha256","iterations":1,"salt":"AAAA","digest":"AAAA"}},"config":{"json_size":"12288","keyslots_size":"1015808"}}"#;
    for copy in [0usize, 16 << 10] {
        let region = &mut image[copy..copy + (16 << 10)];
        region[4096..].fill(0);
        region[4096..4096 + hostile.len()].copy_from_slice(hostile);
        let csum = header_checksum(region);
        BinaryHeader::new_unchecked(&mut region[..4096]).set_checksum(&csum);
    }
    let disk: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::from_vec(image)));
    let Err(err) = open_luks(disk, &CryptOptions::with_passphrase(PASS)) else {
        panic!("opened a hostile header");
    };
    assert!(err.to_string().contains("stripes"), "{err}");

    let not_luks: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(1 << 20)));
    assert!(matches!(
        open_luks(not_luks, &CryptOptions::with_passphrase(PASS)),
        Err(CryptError::NotLuks)
    ));
}

#[test]
fn key_material_stays_out_of_debug_output() {
    let (disk, _) = fresh(512);
    let opts = CryptOptions::with_passphrase(PASS);
    assert!(!format!("{opts:?}").contains(PASS));
    let plain = open_luks(disk, &opts).unwrap();
    let shown = format!("{:?}", plain.info());
    assert!(!shown.contains(PASS));
    let missing = CryptOptions::default();
    let (disk, _) = fresh(512);
    assert!(matches!(
        open_luks(disk, &missing),
        Err(CryptError::NoPassphrase)
    ));
}
