//! The raw-file back-end and its engines against real files in a temporary
//! directory: cache modes, durability as far as one machine can show it,
//! O_DIRECT bouncing, discard, errors, and io_uring against the thread pool.

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use iovirt_backend::{
    open_async, open_image, submit_wait, AsyncEngine, BlockBackend, BlockError, CacheMode,
    Completion, Direction, Features, Inline, IoBuffers, RawFile, Request, SyncBackend, ThreadPool,
    UringFile,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MODES: [CacheMode; 4] = [
    CacheMode::None,
    CacheMode::Writethrough,
    CacheMode::Writeback,
    CacheMode::Unsafe,
];

fn disk(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

/// The io_uring engine over `raw`, or `None` (with a note) where the kernel refuses it.
fn uring(raw: RawFile) -> Option<UringFile> {
    match UringFile::new(raw) {
        Ok(u) => Some(u),
        Err(e) => {
            eprintln!("io_uring unavailable, skipping its half: {e}");
            None
        }
    }
}

/// Both engines over fresh opens of `path`.
fn engines(path: &Path, cache: CacheMode) -> Vec<(&'static str, Box<dyn BlockBackend>)> {
    let mut v: Vec<(&'static str, Box<dyn BlockBackend>)> = vec![(
        "threads",
        Box::new(ThreadPool::new(RawFile::open(path, cache, false).unwrap(), 3, "t").unwrap()),
    )];
    if let Some(u) = uring(RawFile::open(path, cache, false).unwrap()) {
        v.push(("io_uring", Box::new(u)));
    }
    v
}

fn open_flags(fd: i32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    let line = s.lines().find(|l| l.starts_with("flags:")).unwrap();
    i32::from_str_radix(line.trim_start_matches("flags:").trim(), 8).unwrap()
}

/// Read into a guest-memory buffer we can look at afterwards.
fn read_keep(b: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    let mem =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len.max(4096))]).unwrap());
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0), len)],
        Direction::DeviceWrites,
    )
    .unwrap();
    submit_wait(b, Request::Read { offset, buf }).unwrap();
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

fn write(b: &dyn BlockBackend, offset: u64, data: Vec<u8>, fua: bool) {
    submit_wait(
        b,
        Request::Write {
            offset,
            buf: IoBuffers::from_vec(data),
            fua,
        },
    )
    .unwrap();
}

#[test]
fn every_cache_mode_round_trips_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    for cache in MODES {
        let path = disk(dir.path(), &format!("{cache}.img"), 1 << 20);
        for (name, b) in engines(&path, cache) {
            let pat: Vec<u8> = (0..8192u32)
                .map(|i| (i * 7 + name.len() as u32) as u8)
                .collect();
            write(&*b, 65536, pat.clone(), false);
            submit_wait(&*b, Request::Flush).unwrap();
            assert_eq!(read_keep(&*b, 65536, 8192), pat, "{cache} {name}");
            drop(b);
            assert_eq!(std::fs::read(&path).unwrap()[65536..65536 + 8192], pat[..]);
        }
    }
}

#[test]
fn open_flags_and_features_follow_the_cache_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "f.img", 1 << 20);
    for cache in MODES {
        let raw = RawFile::open(&path, cache, false).unwrap();
        let flags = open_flags(raw.as_raw_fd());
        assert_eq!(
            flags & libc::O_DIRECT != 0,
            cache == CacheMode::None,
            "{cache}"
        );
        assert_eq!(
            flags & libc::O_DSYNC != 0,
            cache == CacheMode::Writethrough,
            "{cache}"
        );
        let f = raw.info().features;
        assert_eq!(
            f.contains(Features::VOLATILE_CACHE),
            cache != CacheMode::Writethrough,
            "{cache}"
        );
        assert!(f.contains(Features::DISCARD | Features::WRITE_ZEROES | Features::FUA));
        assert_eq!(raw.info().capacity, 1 << 20);
        assert_eq!(raw.direct_alignment().is_some(), cache == CacheMode::None);
    }
    // Capacity rounds down to whole sectors.
    let odd = disk(dir.path(), "odd.img", 10 * 512 + 100);
    assert_eq!(
        RawFile::open(&odd, CacheMode::Writeback, false)
            .unwrap()
            .info()
            .capacity,
        5120
    );
}

#[test]
fn writeback_flush_is_fdatasync_and_visible_to_an_o_direct_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "wb.img", 1 << 20);
    let raw = RawFile::open(&path, CacheMode::Writeback, false).unwrap();
    let b = Inline(raw);
    write(&b, 4096, vec![0xc3; 4096], false);
    assert_eq!(b.0.sync_count(), 0);
    submit_wait(&b, Request::Flush).unwrap();
    assert_eq!(b.0.sync_count(), 1);

    // A separate descriptor bypassing the page cache sees the data.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let mut v = vec![0u8; 8192 + 4096];
    let start = (4096 - v.as_ptr() as usize % 4096) % 4096;
    let got = std::os::unix::fs::FileExt::read_at(&f, &mut v[start..start + 4096], 4096).unwrap();
    assert_eq!(got, 4096);
    assert!(v[start..start + 4096].iter().all(|&x| x == 0xc3));
}

#[test]
fn unsafe_ignores_flushes_and_fua() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "u.img", 1 << 20);
    let b = Inline(RawFile::open(&path, CacheMode::Unsafe, false).unwrap());
    write(&b, 0, vec![1; 512], true);
    submit_wait(&b, Request::Flush).unwrap();
    assert_eq!(b.0.sync_count(), 0);
    if let Some(u) = uring(RawFile::open(&path, CacheMode::Unsafe, false).unwrap()) {
        write(&u, 0, vec![2; 512], true);
        submit_wait(&u, Request::Flush).unwrap();
        assert_eq!(u.raw().sync_count(), 0);
    }
    // Writeback flushes on both engines.
    if let Some(u) = uring(RawFile::open(&path, CacheMode::Writeback, false).unwrap()) {
        submit_wait(&u, Request::Flush).unwrap();
        assert_eq!(u.raw().sync_count(), 1);
    }
}

#[test]
fn fua_writes_complete_durable() {
    let dir = tempfile::tempdir().unwrap();
    for cache in [
        CacheMode::None,
        CacheMode::Writeback,
        CacheMode::Writethrough,
    ] {
        let path = disk(dir.path(), &format!("fua-{cache}.img"), 1 << 20);
        for (name, b) in engines(&path, cache) {
            write(&*b, 8192, vec![0x42; 1024], true);
            assert_eq!(
                read_keep(&*b, 8192, 1024),
                vec![0x42; 1024],
                "{cache} {name}"
            );
        }
    }
}

/// Guest memory of two regions; the buffers cross the boundary at odd addresses.
#[test]
fn o_direct_bounces_unaligned_guest_buffers_across_regions() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "direct.img", 1 << 20);
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap(),
    );
    let pat: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&pat[..1000], GuestAddress(0xfe03)).unwrap(); // crosses 0x10000
    mem.write_slice(&pat[1000..], GuestAddress(0x1_2001))
        .unwrap();
    for (name, b) in engines(&path, CacheMode::None) {
        let wbuf = IoBuffers::from_guest(
            mem.clone(),
            &[(GuestAddress(0xfe03), 1000), (GuestAddress(0x1_2001), 3096)],
            Direction::DeviceReads,
        )
        .unwrap();
        assert_eq!(wbuf.segments(), 3);
        submit_wait(
            &*b,
            Request::Write {
                offset: 512 * 9,
                buf: wbuf,
                fua: false,
            },
        )
        .unwrap();
        submit_wait(&*b, Request::Flush).unwrap();
        let rbuf = IoBuffers::from_guest(
            mem.clone(),
            &[
                (GuestAddress(0x1_8005), 333),
                (GuestAddress(0x3), 4096 - 333),
            ],
            Direction::DeviceWrites,
        )
        .unwrap();
        submit_wait(
            &*b,
            Request::Read {
                offset: 512 * 9,
                buf: rbuf,
            },
        )
        .unwrap();
        let mut back = vec![0u8; 4096];
        mem.read_slice(&mut back[..333], GuestAddress(0x1_8005))
            .unwrap();
        mem.read_slice(&mut back[333..], GuestAddress(0x3)).unwrap();
        assert_eq!(back, pat, "{name}");
        // Aligned guest buffers go straight to the file.
        let aligned = IoBuffers::from_guest(
            mem.clone(),
            &[(GuestAddress(0x4000), 8192)],
            Direction::DeviceWrites,
        )
        .unwrap();
        submit_wait(
            &*b,
            Request::Read {
                offset: 0,
                buf: aligned,
            },
        )
        .unwrap();
    }
    assert_eq!(&std::fs::read(&path).unwrap()[4608..4608 + 4096], &pat[..]);
    let raw = RawFile::open(&path, CacheMode::None, false).unwrap();
    let b = Inline(raw);
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0x1), 512)],
        Direction::DeviceWrites,
    )
    .unwrap();
    submit_wait(&b, Request::Read { offset: 0, buf }).unwrap();
    assert_eq!(b.0.bounce_count(), 1);
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    for cache in MODES {
        let path = disk(dir.path(), &format!("z-{cache}.img"), 1 << 20);
        for (name, b) in engines(&path, cache) {
            write(&*b, 0, vec![0xff; 256 << 10], false);
            submit_wait(
                &*b,
                Request::Discard {
                    offset: 4096,
                    len: 65536,
                },
            )
            .unwrap();
            submit_wait(
                &*b,
                Request::WriteZeroes {
                    offset: 131072,
                    len: 512,
                    may_unmap: false,
                },
            )
            .unwrap();
            submit_wait(
                &*b,
                Request::WriteZeroes {
                    offset: 196608,
                    len: 8192,
                    may_unmap: true,
                },
            )
            .unwrap();
            let all = read_keep(&*b, 0, 256 << 10);
            let zero = |r: std::ops::Range<usize>| all[r].iter().all(|&x| x == 0);
            let ff = |r: std::ops::Range<usize>| all[r].iter().all(|&x| x == 0xff);
            assert!(
                ff(0..4096) && zero(4096..69632) && ff(69632..131072),
                "{cache} {name}"
            );
            assert!(zero(131072..131584) && ff(131584..196608), "{cache} {name}");
            assert!(zero(196608..204800) && ff(204800..262144), "{cache} {name}");
        }
    }
}

#[test]
fn errors_out_of_range_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "e.img", 1 << 20);
    let ro = RawFile::open(&path, CacheMode::Writeback, true).unwrap();
    assert!(ro.info().features.contains(Features::READ_ONLY));
    let mut backends: Vec<Box<dyn BlockBackend>> = vec![Box::new(Inline(ro))];
    if let Some(u) = uring(RawFile::open(&path, CacheMode::None, true).unwrap()) {
        backends.push(Box::new(u));
    }
    for b in &backends {
        let w = submit_wait(
            b,
            Request::Write {
                offset: 0,
                buf: IoBuffers::zeroed(512),
                fua: false,
            },
        );
        assert!(matches!(w, Err(BlockError::ReadOnly)));
        let z = submit_wait(
            b,
            Request::WriteZeroes {
                offset: 0,
                len: 512,
                may_unmap: true,
            },
        );
        assert!(matches!(z, Err(BlockError::ReadOnly)));
        submit_wait(b, Request::Flush).unwrap();
        let r = submit_wait(
            b,
            Request::Read {
                offset: (1 << 20) - 512,
                buf: IoBuffers::zeroed(1024),
            },
        );
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
        let r = submit_wait(
            b,
            Request::Read {
                offset: 100,
                buf: IoBuffers::zeroed(512),
            },
        );
        assert!(matches!(r, Err(BlockError::Misaligned { .. })));
    }
    assert!(RawFile::open(dir.path().join("missing"), CacheMode::None, false).is_err());
    assert!(RawFile::open(dir.path(), CacheMode::Writeback, true).is_err());
}

#[test]
fn reads_past_end_of_file_within_capacity_are_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let path = disk(dir.path(), &format!("eof-{cache}.img"), 1 << 20);
        std::fs::write(&path, vec![0x11u8; 1 << 20]).unwrap();
        let bs = engines(&path, cache);
        // The file shrinks under the open back-ends: capacity stays, data past EOF reads as zeroes.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(6144)
            .unwrap();
        for (name, b) in bs {
            let got = read_keep(&*b, 4096, 8192);
            assert!(got[..2048].iter().all(|&x| x == 0x11), "{cache} {name}");
            assert!(got[2048..].iter().all(|&x| x == 0), "{cache} {name}");
        }
    }
}

#[test]
fn cd_image_is_read_only_with_2048_byte_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cd.iso");
    let data: Vec<u8> = (0..20 * 2048u32).map(|i| (i / 2048) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let cd = open_image(&path).unwrap();
    let info = cd.info();
    assert_eq!((info.logical_block_size, info.capacity), (2048, 20 * 2048));
    assert!(info.features.contains(Features::READ_ONLY));
    let cd = ThreadPool::new(cd, 1, "cd").unwrap();
    assert_eq!(read_keep(&cd, 3 * 2048, 2048), vec![3u8; 2048]);
    let r = submit_wait(
        &cd,
        Request::Read {
            offset: 512,
            buf: IoBuffers::zeroed(2048),
        },
    );
    assert!(matches!(
        r,
        Err(BlockError::Misaligned {
            block_size: 2048,
            ..
        })
    ));
    let w = submit_wait(
        &cd,
        Request::Write {
            offset: 0,
            buf: IoBuffers::zeroed(2048),
            fua: false,
        },
    );
    assert!(matches!(w, Err(BlockError::ReadOnly)));
}

#[test]
fn open_async_picks_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "a.img", 1 << 20);
    for engine in [AsyncEngine::Auto, AsyncEngine::ThreadPool] {
        let b = open_async(&path, CacheMode::None, false, engine).unwrap();
        write(&b, 0, vec![9; 4096], true);
        assert_eq!(read_keep(&b, 0, 4096), vec![9; 4096]);
    }
    assert_eq!(
        "io_uring".parse::<AsyncEngine>().unwrap(),
        AsyncEngine::Uring
    );
    assert!("fast".parse::<AsyncEngine>().is_err());
}

/// Dropping the engine with requests in flight completes all of them.
#[test]
fn dropping_an_engine_finishes_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "d.img", 4 << 20);
    let Some(u) = uring(RawFile::open(&path, CacheMode::Writeback, false).unwrap()) else {
        return;
    };
    let (tx, rx) = mpsc::channel();
    for i in 0..400u64 {
        let tx = tx.clone();
        u.submit(
            Request::Write {
                offset: (i % 1024) * 4096,
                buf: IoBuffers::from_vec(vec![i as u8; 4096]),
                fua: false,
            },
            Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    drop(u);
    drop(tx);
    let results: Vec<bool> = rx.iter().collect();
    assert_eq!(results.len(), 400);
    assert!(results.iter().all(|&ok| ok));
}

/// Tiny deterministic generator for the mixed workload.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Run a seeded mix of 1000 requests through `b` in batches of 50 in flight
/// (ranges within a batch are disjoint, so results do not depend on completion
/// order); return every read's data and the final disk.
fn run_mix(b: &dyn BlockBackend, seed: u64) -> (Vec<Vec<u8>>, Vec<u8>) {
    const SLOT: u64 = 64 << 10;
    const SLOTS: u64 = 64;
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 2 << 20),
            (GuestAddress(2 << 20), 2 << 20),
        ])
        .unwrap(),
    );
    let mut rng = Rng(seed);
    let mut reads = Vec::new();
    for _batch in 0..20 {
        let (tx, rx) = mpsc::channel();
        let mut order: Vec<u64> = (0..SLOTS).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut pending_reads = Vec::new();
        for (k, &slot) in order.iter().take(50).enumerate() {
            let offset = slot * SLOT + rng.below(SLOT / 512 / 2) * 512;
            let len = (1 + rng.below(SLOT / 512 / 2 - 1)) * 512;
            // Each request of the batch has its own guest area; the areas span the
            // boundary of the two regions, and some start unaligned.
            let area = (2 << 20) - (900 << 10) + k as u64 * (36 << 10);
            let gaddr = if rng.below(4) == 0 {
                area + 1 + rng.below(500)
            } else {
                area
            };
            let op = rng.below(10);
            let tx = tx.clone();
            let done = Completion::new(move |r| tx.send(r.is_ok()).unwrap());
            let req = match op {
                0..=3 => {
                    let buf = IoBuffers::from_guest(
                        mem.clone(),
                        &[(GuestAddress(gaddr), len as usize)],
                        Direction::DeviceWrites,
                    )
                    .unwrap();
                    pending_reads.push((gaddr, len));
                    Request::Read { offset, buf }
                }
                4..=7 => {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    let buf = IoBuffers::from_vec(data);
                    Request::Write {
                        offset,
                        buf,
                        fua: op == 7,
                    }
                }
                8 => Request::Discard { offset, len },
                _ => {
                    if rng.below(2) == 0 {
                        Request::Flush
                    } else {
                        Request::WriteZeroes {
                            offset,
                            len,
                            may_unmap: rng.below(2) == 0,
                        }
                    }
                }
            };
            b.submit(req, done);
        }
        drop(tx);
        assert!(rx.iter().all(|ok| ok));
        for (g, len) in pending_reads {
            let mut v = vec![0u8; len as usize];
            mem.read_slice(&mut v, GuestAddress(g)).unwrap();
            reads.push(v);
        }
    }
    let all = read_keep(b, 0, (SLOT * SLOTS) as usize);
    (reads, all)
}

#[test]
fn io_uring_and_thread_pool_agree_on_a_random_mix() {
    let dir = tempfile::tempdir().unwrap();
    for cache in [CacheMode::None, CacheMode::Writeback] {
        let a = disk(dir.path(), &format!("mix-a-{cache}.img"), 4 << 20);
        let bpath = disk(dir.path(), &format!("mix-b-{cache}.img"), 4 << 20);
        let pool = ThreadPool::new(RawFile::open(&a, cache, false).unwrap(), 4, "mix").unwrap();
        let Some(u) = uring(RawFile::open(&bpath, cache, false).unwrap()) else {
            return;
        };
        let (r1, d1) = run_mix(&pool, 0x9e37_79b9_7f4a_7c15);
        let (r2, d2) = run_mix(&u, 0x9e37_79b9_7f4a_7c15);
        assert_eq!(r1.len(), r2.len());
        assert!(r1 == r2, "{cache}: reads differ");
        assert!(d1 == d2, "{cache}: disks differ");
        assert!(d1.iter().any(|&x| x != 0));
        drop((pool, u));
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&bpath).unwrap());
    }
}

/// tmpfs punches holes but refuses `FALLOC_FL_ZERO_RANGE`: write-zeroes falls
/// back to writing zeroes, on both engines.
#[test]
fn write_zeroes_falls_back_where_the_file_system_refuses() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm, skipping");
        return;
    }
    let Ok(dir) = tempfile::tempdir_in(shm) else {
        return;
    };
    let path = disk(dir.path(), "tmpfs.img", 1 << 20);
    for (name, b) in engines(&path, CacheMode::Writeback) {
        write(&*b, 0, vec![0xee; 65536], false);
        for _ in 0..2 {
            submit_wait(
                &*b,
                Request::WriteZeroes {
                    offset: 4096,
                    len: 8192,
                    may_unmap: false,
                },
            )
            .unwrap();
        }
        let got = read_keep(&*b, 0, 65536);
        assert!(got[..4096].iter().all(|&x| x == 0xee), "{name}");
        assert!(got[4096..12288].iter().all(|&x| x == 0), "{name}");
        assert!(got[12288..].iter().all(|&x| x == 0xee), "{name}");
    }
}

/// Wait until `fd` is readable (or `ms` pass); returns whether it is.
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one live pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// Writes of `i as u8` to 4 KiB block `i`, reporting the completing thread.
fn submit_writes(b: &dyn BlockBackend, n: u64, tx: &mpsc::Sender<(std::thread::ThreadId, bool)>) {
    for i in 0..n {
        let tx = tx.clone();
        b.submit(
            Request::Write {
                offset: i * 4096,
                buf: IoBuffers::from_vec(vec![i as u8; 4096]),
                fua: false,
            },
            Completion::new(move |r| {
                let _ = tx.send((std::thread::current().id(), r.is_ok()));
            }),
        );
    }
}

#[test]
fn an_owner_polls_io_uring_completions_on_its_own_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "d.img", 4 << 20);
    let Some(u) = uring(RawFile::open(&path, CacheMode::None, false).unwrap()) else {
        return;
    };
    let fd = u
        .completion_fd()
        .expect("io_uring offers completion polling");
    assert_eq!(
        u.completion_fd(),
        Some(fd),
        "the same descriptor every time"
    );
    let (tx, rx) = mpsc::channel();
    // Plugged: the burst (more than one PLUG_BATCH) goes in a few system calls.
    u.plug();
    submit_writes(&u, 3 * iovirt_backend::PLUG_BATCH as u64 + 5, &tx);
    u.unplug();
    let want = 3 * iovirt_backend::PLUG_BATCH + 5;
    let me = std::thread::current().id();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while got.len() < want && std::time::Instant::now() < deadline {
        if readable(fd, 1000) {
            iovirt_backend::clear_completion_fd(fd);
        }
        u.poll_completions();
        got.extend(rx.try_iter());
    }
    assert_eq!(got.len(), want);
    // Nearly all ran here; the watchdog may have taken some if this thread was slow.
    let here = got.iter().filter(|(t, _)| *t == me).count();
    assert!(here * 2 > want, "{here} of {want} completed on the owner");
    assert!(got.iter().all(|(_, ok)| *ok));
    assert_eq!(u.poll_completions(), 0, "nothing left");
    for i in [0u64, 7, 28] {
        assert_eq!(read_keep(&u, i * 4096, 4096), vec![i as u8; 4096]);
    }
}

#[test]
fn the_watchdog_completes_what_an_owner_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = disk(dir.path(), "d.img", 1 << 20);
    let Some(u) = uring(RawFile::open(&path, CacheMode::Writeback, false).unwrap()) else {
        return;
    };
    let _ = u.completion_fd();
    let (tx, rx) = mpsc::channel();
    submit_writes(&u, 4, &tx);
    // Nobody polls: the reaper's watchdog runs them, within a few periods.
    let got: Vec<_> = (0..4)
        .map(|_| rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap())
        .collect();
    assert!(got
        .iter()
        .all(|(t, ok)| *ok && *t != std::thread::current().id()));
    // Dropping with requests in flight still completes them.
    submit_writes(&u, 50, &tx);
    drop(u);
    drop(tx);
    assert_eq!(rx.iter().count(), 50);
}
