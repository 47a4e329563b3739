//! The fault-injection filter over in-memory and recording back-ends: rule
//! selection, pass-through of flush/FUA/discard/write-zeroes, error statuses,
//! stalls, delays, torn writes and seeded determinism.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, BlockInfo, Completion, DeviceStatus, Features, Inline,
    IoBuffers, MemoryBackend, Request,
};
use iovirt_filter::fault::{
    FaultControlError, FaultFilter, FaultOptions, InjectedError, Op, Rule, Selector, TearThen,
};

const MIB: u64 = 1 << 20;

fn mem(size: u64) -> Arc<Inline<MemoryBackend>> {
    Arc::new(Inline(MemoryBackend::new(size)))
}

fn write(offset: u64, byte: u8, len: usize) -> Request {
    Request::Write {
        offset,
        buf: IoBuffers::from_vec(vec![byte; len]),
        fua: false,
    }
}

/// Read through `b` into scratch guest memory and return the bytes.
fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0), len)],
        iovirt_backend::Direction::DeviceWrites,
    )?;
    submit_wait(b, Request::Read { offset, buf })?;
    let mut out = vec![0; len];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    Ok(out)
}

/// Records every request it sees, then hands it to a memory disk.
struct Recorder {
    inner: Inline<MemoryBackend>,
    log: Mutex<Vec<String>>,
}

impl Recorder {
    fn new(size: u64) -> Arc<Self> {
        Arc::new(Recorder {
            inner: Inline(MemoryBackend::new(size)),
            log: Mutex::new(Vec::new()),
        })
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.log.lock().unwrap())
    }
}

impl BlockBackend for Recorder {
    fn info(&self) -> BlockInfo {
        self.inner.info()
    }
    fn submit(&self, req: Request, done: Completion) {
        let s = match &req {
            Request::Read { offset, buf } => format!("read {offset}+{}", buf.len()),
            Request::Write { offset, buf, fua } => {
                format!("write {offset}+{} fua={fua}", buf.len())
            }
            Request::Flush => "flush".into(),
            Request::Discard { offset, len } => format!("discard {offset}+{len}"),
            Request::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => format!("write-zeroes {offset}+{len} unmap={may_unmap}"),
        };
        self.log.lock().unwrap().push(s);
        self.inner.submit(req, done)
    }
}

#[test]
fn passes_every_operation_with_its_meaning() {
    let rec = Recorder::new(MIB);
    let f = FaultFilter::new(rec.clone());
    assert_eq!(f.info(), rec.info());
    submit_wait(
        &f,
        Request::Write {
            offset: 4096,
            buf: IoBuffers::from_vec(vec![1; 4096]),
            fua: true,
        },
    )
    .unwrap();
    submit_wait(&f, write(8192, 2, 4096)).unwrap();
    submit_wait(&f, Request::Flush).unwrap();
    submit_wait(
        &f,
        Request::Discard {
            offset: 4096,
            len: 512,
        },
    )
    .unwrap();
    submit_wait(
        &f,
        Request::WriteZeroes {
            offset: 8192,
            len: 1024,
            may_unmap: true,
        },
    )
    .unwrap();
    submit_wait(
        &f,
        Request::Read {
            offset: 0,
            buf: IoBuffers::zeroed(512),
        },
    )
    .unwrap();
    assert_eq!(
        rec.take(),
        [
            "write 4096+4096 fua=true",
            "write 8192+4096 fua=false",
            "flush",
            "discard 4096+512",
            "write-zeroes 8192+1024 unmap=true",
            "read 0+512",
        ]
    );
    let c = rec.inner.0.contents();
    assert_eq!(c[4096..4608], [0; 512]);
    assert_eq!(c[4608..8192], [1; 3584]);
    assert_eq!(c[8192..9216], [0; 1024]);
    assert_eq!(c[9216..12288], [2; 3072]);

    // With tracking the filter reads before each write-like request, passes
    // the request on unchanged, and advertises a volatile cache.
    let rec = Recorder::new(MIB);
    let f = FaultFilter::with_options(
        rec.clone(),
        FaultOptions {
            seed: 0,
            track_writes: true,
        },
    );
    assert!(f
        .info()
        .features
        .contains(Features::VOLATILE_CACHE | Features::FUA));
    submit_wait(
        &f,
        Request::Write {
            offset: 0,
            buf: IoBuffers::from_vec(vec![3; 512]),
            fua: true,
        },
    )
    .unwrap();
    submit_wait(
        &f,
        Request::WriteZeroes {
            offset: 512,
            len: 512,
            may_unmap: false,
        },
    )
    .unwrap();
    submit_wait(&f, Request::Flush).unwrap();
    assert_eq!(
        rec.take(),
        [
            "read 0+512",
            "write 0+512 fua=true",
            "read 512+512",
            "write-zeroes 512+512 unmap=false",
            "flush"
        ]
    );
}

#[test]
fn errors_keep_their_device_status() {
    // Injected.
    let f = FaultFilter::new(mem(MIB));
    let h = f.handle();
    h.add_rule(Rule::fail(
        Selector::op(Op::Flush),
        InjectedError::Unsupported,
    ));
    h.add_rule(Rule::fail(Selector::op(Op::Read), InjectedError::Io));
    h.add_rule(Rule::fail(Selector::op(Op::Write), InjectedError::NoSpace));
    let e = submit_wait(&f, Request::Flush).unwrap_err();
    assert!(matches!(e, BlockError::Unsupported(_)));
    assert_eq!(e.status(), DeviceStatus::Unsupported);
    let e = submit_wait(
        &f,
        Request::Read {
            offset: 0,
            buf: IoBuffers::zeroed(512),
        },
    )
    .unwrap_err();
    assert_eq!(e.status(), DeviceStatus::IoError);
    let e = submit_wait(&f, write(0, 1, 512)).unwrap_err();
    assert!(matches!(&e, BlockError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull));
    let s = h.stats();
    assert_eq!(s.op(Op::Flush).injected, 1);
    assert_eq!(s.total().failed, 3);
    assert_eq!(s.total().completed, 0);

    // From the child, untouched.
    let ro = Arc::new(Inline(MemoryBackend::new(MIB).read_only()));
    let f = FaultFilter::new(ro);
    assert!(matches!(
        submit_wait(&f, write(0, 1, 512)),
        Err(BlockError::ReadOnly)
    ));
    let null = Arc::new(Inline(iovirt_backend::NullBackend::new(MIB, true)));
    let f = FaultFilter::new(null);
    let e = submit_wait(&f, write(MIB, 1, 512)).unwrap_err();
    assert!(matches!(e, BlockError::OutOfRange { .. }));
    assert_eq!(f.handle().stats().op(Op::Write).failed, 1);
}

#[test]
fn selects_by_offset_range_and_count() {
    let f = FaultFilter::new(mem(4 * MIB));
    let h = f.handle();
    let id = h.add_rule(Rule::fail(
        Selector::op(Op::Write)
            .range(MIB..2 * MIB)
            .after(1)
            .count(3),
        InjectedError::Io,
    ));
    let results: Vec<bool> = (0..6)
        .map(|_| submit_wait(&f, write(MIB + 4096, 1, 4096)).is_ok())
        .collect();
    assert_eq!(results, [true, false, false, false, true, true]);
    // Outside the range, or another operation: never.
    assert!(submit_wait(&f, write(0, 1, MIB as usize)).is_ok()); // ends where the range starts
    assert!(submit_wait(&f, write(2 * MIB, 1, 512)).is_ok());
    assert_eq!(h.rule_counts(id), Some((6, 3)));
    assert!(h.remove_rule(id));
    assert!(!h.remove_rule(id));
    assert!(h.rules().is_empty());
}

#[test]
fn seeded_probability_is_deterministic() {
    let pattern = |seed: u64| -> Vec<bool> {
        let f = FaultFilter::with_options(
            mem(MIB),
            FaultOptions {
                seed,
                track_writes: false,
            },
        );
        f.handle().add_rule(Rule::fail(
            Selector::op(Op::Read).probability(0.25),
            InjectedError::Io,
        ));
        (0..200)
            .map(|i| {
                submit_wait(
                    &f,
                    Request::Read {
                        offset: (i % 64) * 512,
                        buf: IoBuffers::zeroed(512),
                    },
                )
                .is_ok()
            })
            .collect()
    };
    let a = pattern(7);
    assert_eq!(a, pattern(7));
    assert_ne!(a, pattern(8));
    let failed = a.iter().filter(|ok| !**ok).count();
    assert!(
        (20..=80).contains(&failed),
        "{failed} of 200 failed at p = 0.25"
    );
}

#[test]
fn stalls_until_released_and_for_a_duration() {
    let disk = mem(MIB);
    let f = FaultFilter::new(disk.clone());
    let h = f.handle();
    let id = h.add_rule(Rule::stall(Selector::op(Op::Write)));
    let done = Arc::new(Mutex::new(Vec::new()));
    for i in 0..3u8 {
        let d = done.clone();
        f.submit(
            write(u64::from(i) * 512, i + 1, 512),
            Completion::new(move |r| d.lock().unwrap().push((i, r.is_ok()))),
        );
    }
    assert!(h.wait_stalled(3, Duration::from_secs(5)));
    // The child has the data; the completions wait.
    assert_eq!(disk.0.contents()[1024], 3);
    assert!(done.lock().unwrap().is_empty());
    assert!(h.release_nth(2));
    assert!(!h.release_nth(5));
    assert_eq!(*done.lock().unwrap(), [(2, true)]);
    assert_eq!(h.release_stalled(), 2);
    assert_eq!(*done.lock().unwrap(), [(2, true), (0, true), (1, true)]);
    assert_eq!(h.stats().op(Op::Write).stalled, 3);
    h.remove_rule(id);

    h.add_rule(Rule::stall_for(
        Selector::op(Op::Flush),
        Duration::from_millis(30),
    ));
    let t = Instant::now();
    submit_wait(&f, Request::Flush).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert_eq!(h.stalled(), 0);
}

#[test]
fn slows_and_rate_limits() {
    let f = FaultFilter::new(mem(MIB));
    let h = f.handle();
    let id = h.add_rule(Rule::slow(
        Selector::op(Op::Read),
        Duration::from_millis(20),
    ));
    let t = Instant::now();
    submit_wait(
        &f,
        Request::Read {
            offset: 0,
            buf: IoBuffers::zeroed(512),
        },
    )
    .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(20));
    h.remove_rule(id);

    // 200 IOPS: five requests take at least four intervals of 5 ms.
    h.add_rule(Rule::rate_limit(Selector::any(), Some(200), None));
    let t = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    for _ in 0..5 {
        let tx = tx.clone();
        f.submit(
            write(0, 1, 512),
            Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    assert!((0..5).all(|_| rx.recv().unwrap()));
    assert!(
        t.elapsed() >= Duration::from_millis(20),
        "{:?}",
        t.elapsed()
    );
    assert!(h.stats().op(Op::Write).delayed >= 4);
}

#[test]
fn tears_writes_at_a_sector_boundary() {
    let disk = mem(MIB);
    let f = FaultFilter::new(disk.clone());
    let h = f.handle();
    h.add_rule(Rule::tear(
        Selector::op(Op::Write).count(1),
        2,
        TearThen::Error(InjectedError::Io),
    ));
    let e = submit_wait(&f, write(4096, 9, 8 * 512)).unwrap_err();
    assert_eq!(e.status(), DeviceStatus::IoError);
    let c = disk.0.contents();
    assert_eq!(c[4096..5120], [9; 1024]);
    assert_eq!(c[5120..8192], [0; 3072]);
    assert_eq!(h.stats().op(Op::Write).torn, 1);
    // count = 1: the next write is whole.
    submit_wait(&f, write(4096, 8, 8 * 512)).unwrap();
    assert_eq!(disk.0.contents()[4096..8192], [8; 4096]);
}

#[test]
fn torn_write_then_crash_keeps_only_flushed_data_and_the_torn_sectors() {
    let disk = mem(MIB);
    let f = FaultFilter::with_options(
        disk.clone(),
        FaultOptions {
            seed: 0,
            track_writes: true,
        },
    );
    let h = f.handle();
    submit_wait(&f, write(0, 1, 4096)).unwrap();
    submit_wait(&f, Request::Flush).unwrap();
    submit_wait(&f, write(0, 2, 4096)).unwrap(); // never flushed
    h.add_rule(Rule::tear(
        Selector::op(Op::Write).range(8192..16384),
        3,
        TearThen::Crash,
    ));
    assert!(submit_wait(&f, write(8192, 3, 4096)).is_err());
    assert!(!h.powered());
    let c = disk.0.contents();
    assert_eq!(c[..4096], [1; 4096], "the unflushed write is rolled back");
    assert_eq!(
        c[8192..8192 + 1536],
        [3; 1536],
        "the torn sectors reached the disk"
    );
    assert_eq!(c[8192 + 1536..12288], [0; 2560]);
    assert!(submit_wait(&f, Request::Flush).is_err());
    h.power_restore();
    submit_wait(&f, Request::Flush).unwrap();
    assert_eq!(read(&f, 0, 4096).unwrap(), [1; 4096]);
}

#[test]
fn power_cut_needs_tracking() {
    let f = FaultFilter::new(mem(MIB));
    assert!(matches!(
        f.handle().power_cut(),
        Err(FaultControlError::NotTracking)
    ));
}
