//! Real client: libblkio's virtio-blk-vhost-user driver (the `blkio` crate) plays the VMM against the daemon.
//!
//! Checks data integrity through the rings, that a frontend sending garbage or
//! vanishing mid-I/O cannot take the daemon down, and that the next frontend
//! gets a working device with the same disk contents.

mod common;

use std::io::Write;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, disk: &str) -> Daemon {
        Self::start_with(dir, disk, &[])
    }

    fn start_with(dir: &Path, disk: &str, extra: &[&str]) -> Daemon {
        let socket = dir.join("vhost.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_iovirt-vhost-user-blk"))
            .arg("--socket")
            .arg(&socket)
            .args(["--disk", disk, "--queues", "2"])
            .args(extra)
            .env("RUST_LOG", "error")
            .spawn()
            .expect("start iovirt-vhost-user-blk");
        let mut d = Daemon { child, socket };
        common::wait_for_paths(&mut d.child, &[&d.socket], Duration::from_secs(10));
        d
    }

    fn assert_running(&mut self) {
        assert!(matches!(self.child.try_wait(), Ok(None)), "daemon died");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for `n` completions on `q` and return their results.
fn wait_on(q: &mut Blkioq, n: usize) -> Vec<i32> {
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut got = Vec::new();
    while got.len() < n {
        let mut t = Duration::from_secs(10);
        let from = got.len();
        let k = q
            .do_io(&mut done[from..], 1, Some(&mut t), None)
            .expect("do_io");
        assert!(k > 0, "no completion within 10 s");
        for c in done.iter().skip(from).take(k) {
            // SAFETY: do_io initialised the first `k` entries of the slice it was given.
            got.push(unsafe { c.assume_init_ref() }.ret);
        }
    }
    got
}

/// A connected libblkio frontend with one queue and a 1 MiB buffer region.
struct Frontend {
    b: Blkio,
    q: Blkioq,
    region: MemoryRegion,
}

impl Frontend {
    fn connect(socket: &Path) -> Frontend {
        let (b, mut qs, region) = Self::connect_queues(socket, 1);
        let q = qs.pop().expect("a queue");
        Frontend { b, q, region }
    }

    /// Connect with `n` queues and a 1 MiB mapped buffer region.
    fn connect_queues(socket: &Path, n: i32) -> (Blkio, Vec<Blkioq>, MemoryRegion) {
        // The socket file exists from bind() on, a moment before listen(), and
        // the daemon accepts the next frontend only once the previous one's
        // device is dropped: on a loaded machine a first connect can be
        // refused, so it is retried for up to 5 s.
        let t = Instant::now();
        let mut b = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user").expect("driver");
            b.set_str("path", socket.to_str().expect("utf-8 path"))
                .expect("path");
            match b.connect() {
                Ok(()) => break b,
                Err(e) if t.elapsed() < Duration::from_secs(5) => {
                    eprintln!("connect: {e}; again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect: {e}"),
            }
        };
        b.set_i32("num-queues", n).expect("num-queues");
        let started = b.start().expect("start");
        let region = b.alloc_mem_region(1 << 20).expect("alloc");
        b.map_mem_region(&region).expect("map");
        (b, started.queues, region)
    }

    fn buf(&self) -> *mut u8 {
        self.region.addr as *mut u8
    }

    /// Wait for `n` completions and return their results.
    fn wait(&mut self, n: usize) -> Vec<i32> {
        wait_on(&mut self.q, n)
    }

    fn write_pattern(&mut self, offset: u64, seed: u8) {
        // SAFETY: the region is 1 MiB of our own shared memory.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf(), 1 << 20) };
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        // 16 writes of 64 KiB in flight at once.
        for i in 0..16usize {
            let p = self.buf().wrapping_add(i << 16);
            self.q.write(
                offset + ((i as u64) << 16),
                p,
                1 << 16,
                i,
                ReqFlags::empty(),
            );
        }
        assert!(self.wait(16).iter().all(|&r| r == 0), "write failed");
        self.q.flush(99, ReqFlags::empty());
        assert_eq!(self.wait(1), [0], "flush failed");
    }

    fn check_pattern(&mut self, offset: u64, seed: u8) {
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(self.buf(), 0, 1 << 20) };
        for i in 0..256usize {
            let p = self.buf().wrapping_add(i << 12);
            self.q
                .read(offset + ((i as u64) << 12), p, 4096, i, ReqFlags::empty());
        }
        assert!(self.wait(256).iter().all(|&r| r == 0), "read failed");
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts(self.buf(), 1 << 20) };
        for (i, b) in buf.iter().enumerate() {
            assert_eq!(
                *b,
                (i as u8).wrapping_mul(31).wrapping_add(seed),
                "byte {i} differs"
            );
        }
    }
}

#[test]
fn data_survives_reconnects_and_hostile_frontends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start(dir.path(), "memory,size=16M");

    let mut f = Frontend::connect(&d.socket);
    let cap = f.b.get_u64("capacity").expect("capacity");
    assert_eq!(cap, 16 << 20);
    f.write_pattern(1 << 20, 7);
    f.check_pattern(1 << 20, 7);
    // Out of range: an error status, not a crash.
    f.q.read(cap, f.buf(), 4096, 1, ReqFlags::empty());
    assert_ne!(f.wait(1), [0], "read past the end succeeded");
    drop(f);
    d.assert_running();

    // Garbage instead of vhost-user messages, then an abrupt close.
    for junk in [
        &b"\xff\xff\xff\xff\x00\x00\x00\x00"[..],
        &[0x5a; 4096][..],
        &[1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0][..],
    ] {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        let _ = s.write_all(junk);
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
        d.assert_running();
    }

    // A frontend that vanishes with requests in flight.
    let mut f = Frontend::connect(&d.socket);
    for i in 0..32usize {
        let p = f.buf().wrapping_add(i << 12);
        f.q.read((i as u64) << 12, p, 4096, i, ReqFlags::empty());
    }
    let _ = f.q.do_io(&mut [], 0, None, None);
    drop(f);
    d.assert_running();

    // The next frontend sees the same disk.
    let mut f = Frontend::connect(&d.socket);
    f.check_pattern(1 << 20, 7);
    f.write_pattern(3 << 20, 9);
    f.check_pattern(3 << 20, 9);
    drop(f);
    d.assert_running();
}

/// An io_uring file: the queue workers reap its completions themselves (the
/// reaper thread only watches), on both queues of one frontend, across a
/// frontend that vanishes mid-I/O, and fast enough that no completion waits
/// for the reaper's watchdog.
#[test]
fn io_uring_completions_are_reaped_by_both_queue_workers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let spec = format!("path={},cache=writeback,engine=io_uring", img.display());
    // Without polling, only the eventfd registration brings completions in.
    let mut d = Daemon::start_with(dir.path(), &spec, &["--poll-us", "0"]);

    let wait = |q: &mut Blkioq, n: usize| {
        assert!(wait_on(q, n).iter().all(|&r| r == 0), "request failed");
    };

    // Block `block` (4 KiB) read into its place in the region at `base`.
    let read4k = |q: &mut Blkioq, base: *mut u8, block: usize, tag: usize| {
        let off = block << 12;
        q.read(
            off as u64,
            base.wrapping_add(off),
            4096,
            tag,
            ReqFlags::empty(),
        );
    };
    let pattern = |i: usize| (i as u8).wrapping_mul(13).wrapping_add(5);

    let (_b, mut qs, region) = Frontend::connect_queues(&d.socket, 2);
    assert_eq!(qs.len(), 2);
    let base = region.addr as *mut u8;
    // SAFETY: the region is 1 MiB of our own shared memory.
    let buf = unsafe { std::slice::from_raw_parts_mut(base, 1 << 20) };
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(i);
    }
    // 64 KiB writes, alternating queues, all in flight at once.
    for i in 0..16usize {
        let q = &mut qs[i % 2];
        q.write(
            (i as u64) << 16,
            base.wrapping_add(i << 16),
            1 << 16,
            i,
            ReqFlags::empty(),
        );
    }
    for q in qs.iter_mut() {
        wait(q, 8);
    }
    qs[0].flush(99, ReqFlags::empty());
    wait(&mut qs[0], 1);
    // 200 dependent 4 KiB reads on queue 1: each is reaped by the worker that
    // submitted it, so none waits for the 50 ms watchdog.
    let t = Instant::now();
    for i in 0..200usize {
        read4k(&mut qs[1], base, i % 256, i);
        wait(&mut qs[1], 1);
    }
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "200 reads took {took:?}");
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, pattern(i), "byte {i}");
    }
    // Vanish with reads in flight on both queues.
    for i in 0..32usize {
        read4k(&mut qs[i % 2], base, i, i);
    }
    for q in qs.iter_mut() {
        let _ = q.do_io(&mut [], 0, None, None);
    }
    drop(qs);
    drop(_b);
    d.assert_running();
    // The next frontend reads the same data.
    let (_b, mut qs, region) = Frontend::connect_queues(&d.socket, 2);
    let base = region.addr as *mut u8;
    // SAFETY: as above, the new frontend's own region.
    unsafe { std::ptr::write_bytes(base, 0, 1 << 20) };
    for i in 0..256usize {
        read4k(&mut qs[i % 2], base, i, i);
    }
    for q in qs.iter_mut() {
        wait(q, 128);
    }
    // SAFETY: as above.
    let buf = unsafe { std::slice::from_raw_parts(base, 1 << 20) };
    for (i, b) in buf.iter().enumerate() {
        assert_eq!(*b, pattern(i), "byte {i} after reconnect");
    }
    d.assert_running();
}

/// One vhost-user message: request, flags, payload.
fn vu_msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// With `--iommu-platform on` the connection goes through the IOTLB relay:
/// libblkio (which does not negotiate ACCESS_PLATFORM) is served through it,
/// and hostile IOTLB messages and framing neither crash the daemon nor keep
/// the next frontend from working.
#[test]
fn iotlb_relay_serves_and_survives_hostile_frontends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = Daemon::start_with(dir.path(), "memory,size=16M", &["--iommu-platform", "on"]);

    let mut f = Frontend::connect(&d.socket);
    f.write_pattern(1 << 20, 3);
    f.check_pattern(1 << 20, 3);
    drop(f);
    d.assert_running();

    const IOTLB_MSG: u32 = 22;
    const NEED_REPLY: u32 = 0x1 | 0x8;
    let iotlb = |iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8| {
        let mut p = Vec::new();
        p.extend_from_slice(&iova.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&uaddr.to_le_bytes());
        p.extend_from_slice(&[perm, kind, 0, 0, 0, 0, 0, 0]);
        p
    };
    // Each message asks for a reply: the relay answers with a status (0 or not).
    let replied = [
        iotlb(0x1000, 0x1000, 0x7f00_0000_0000, 3, 2),
        iotlb(u64::MAX - 10, 100, 0, 3, 2),
        iotlb(0, 0, 0, 0xff, 2),
        iotlb(0, 0, 0, 0, 0x77),
        iotlb(0, u64::MAX, 0, 0x43, 3),
        vec![1, 2, 3],
    ];
    {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        for (i, p) in replied.iter().enumerate() {
            s.write_all(&vu_msg(IOTLB_MSG, NEED_REPLY, p))
                .expect("send");
            let mut reply = [0u8; 20];
            std::io::Read::read_exact(&mut s, &mut reply).expect("IOTLB reply");
            assert_eq!(&reply[0..4], &IOTLB_MSG.to_le_bytes());
            let status = u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"));
            assert_eq!(
                status == 0,
                i == 0 || i == 4,
                "status of message {i}: {status}"
            );
        }
        // Ring addresses before any memory table, then a header promising 4 GiB.
        let _ = s.write_all(&vu_msg(9, 1, &[0u8; 40]));
        let _ = s.write_all(&[5, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    }
    std::thread::sleep(Duration::from_millis(100));
    d.assert_running();
    // A truncated message, then an abrupt close.
    {
        let mut s = UnixStream::connect(&d.socket).expect("connect");
        let _ = s.write_all(&vu_msg(IOTLB_MSG, 1, &[0u8; 32])[..20]);
    }
    std::thread::sleep(Duration::from_millis(100));
    d.assert_running();

    let mut f = Frontend::connect(&d.socket);
    f.check_pattern(1 << 20, 3);
    drop(f);
    d.assert_running();
}
