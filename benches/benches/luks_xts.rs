//! AES-XTS throughput of the LUKS encryption filter, on 4 KiB sectors.
//!
//! - `xts/ours`: iovirt-filter's XTS loop (`XtsCipher`, RustCrypto `aes` with
//!   runtime-detected AES-NI/VAES), 64 sectors of 4096 bytes per call.
//! - `xts/xts-mode`: the `xts-mode` crate over the same `aes` cipher, block by block.
//! - `filter/write`: a 256 KiB write through `CryptBackend` onto a memory disk
//!   (copy into the bounce buffer, encrypt, hand to the child).
//!
//! Compare with OpenSSL in the same run: `benches/scripts/xts-vs-openssl.sh`
//! (runs `openssl speed -evp aes-256-xts -bytes 4096` and this bench in rounds,
//! both by CPU time and by wall-clock time). With `XTS_CPU_SECONDS=N` set, the
//! bench skips criterion and prints GB per CPU-second, as `openssl speed` does.
//!
//! The `aes` crate picks AES-NI, VAES-256 or VAES-512 at run time (no
//! `RUSTFLAGS` needed); `perf report` on this bench shows its
//! `x86_vaes512` backend on CPUs with AVX-512 and VAES.

use std::hint::black_box;
use std::sync::Arc;

use aes::cipher::KeyInit;
use aes::Aes256;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
use iovirt_filter::crypt::{create_luks2, open_luks, CreateOptions, CryptOptions, XtsCipher};

const SECTOR: usize = 4096;

fn xts(c: &mut Criterion) {
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
    let ours = XtsCipher::new(&key, SECTOR).expect("key");
    let theirs = xts_mode::Xts128::new(
        Aes256::new_from_slice(&key[..32]).expect("key"),
        Aes256::new_from_slice(&key[32..]).expect("key"),
    );
    let mut g = c.benchmark_group("xts");
    // The ceiling: the `aes` crate alone (ECB) over the same bytes.
    {
        use aes::cipher::BlockCipherEncrypt;
        let aes = Aes256::new_from_slice(&key[..32]).expect("key");
        let mut blocks = vec![aes::Block::default(); 64 * SECTOR / 16];
        g.throughput(Throughput::Bytes((blocks.len() * 16) as u64));
        g.bench_function("aes-ecb-encrypt/64", |b| {
            b.iter(|| aes.encrypt_blocks(black_box(&mut blocks)))
        });
        g.bench_function("aes-ecb-encrypt-4k-calls/64", |b| {
            b.iter(|| {
                for chunk in blocks.chunks_mut(SECTOR / 16) {
                    aes.encrypt_blocks(black_box(chunk))
                }
            })
        });
    }
    for sectors in [1usize, 64] {
        let mut buf = vec![0x5au8; SECTOR * sectors];
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("ours-encrypt", sectors),
            &sectors,
            |b, _| b.iter(|| ours.encrypt_sectors(black_box(&mut buf), 1000)),
        );
        g.bench_with_input(
            BenchmarkId::new("ours-decrypt", sectors),
            &sectors,
            |b, _| b.iter(|| ours.decrypt_sectors(black_box(&mut buf), 1000)),
        );
        g.bench_with_input(
            BenchmarkId::new("xts-mode-encrypt", sectors),
            &sectors,
            |b, _| {
                b.iter(|| {
                    theirs.encrypt_area(
                        black_box(&mut buf),
                        SECTOR,
                        1000,
                        xts_mode::get_tweak_default,
                    )
                })
            },
        );
    }
    g.finish();
}

fn filter(c: &mut Criterion) {
    let disk: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(32 << 20)));
    create_luks2(disk.clone(), b"bench", &CreateOptions::fast_for_tests()).expect("create");
    let plain = open_luks(disk, &CryptOptions::with_passphrase("bench")).expect("open");
    let data = vec![0xa5u8; 64 * SECTOR];
    let mut g = c.benchmark_group("filter");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("write-256k", |b| {
        b.iter(|| {
            submit_wait(
                plain.as_ref(),
                Request::Write {
                    offset: 1 << 20,
                    buf: IoBuffers::from_vec(data.clone()),
                    fua: false,
                },
            )
            .expect("write")
        })
    });
    g.finish();
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// With `XTS_CPU_SECONDS=N`: encrypt and decrypt 64 x 4 KiB per call for N seconds
/// of CPU time each and print GB per CPU-second, the unit `openssl speed` reports
/// by default (it measures CPU time, so a busy machine does not lower it).
fn cpu_time_rates(secs: f64) {
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
    let ours = XtsCipher::new(&key, SECTOR).expect("key");
    let mut buf = vec![0x5au8; SECTOR * 64];
    for (name, encrypt) in [("encrypt", true), ("decrypt", false)] {
        let start = thread_cpu_seconds();
        let mut bytes = 0u64;
        while thread_cpu_seconds() - start < secs {
            for _ in 0..64 {
                if encrypt {
                    ours.encrypt_sectors(black_box(&mut buf), 1000);
                } else {
                    ours.decrypt_sectors(black_box(&mut buf), 1000);
                }
                bytes += buf.len() as u64;
            }
        }
        let rate = bytes as f64 / (thread_cpu_seconds() - start) / 1e9;
        println!("cpu-time {name} {rate:.2} GB/s");
    }
}

criterion_group!(benches, xts, filter);

fn main() {
    if let Some(secs) = std::env::var("XTS_CPU_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        return cpu_time_rates(secs);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
