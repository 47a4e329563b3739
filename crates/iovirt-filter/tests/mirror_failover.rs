//! Mirror over fault-injection filters on memory disks: one child fails at a
//! seeded random point, no acknowledged write is lost, and after the child
//! returns (with writes going on during the resync) the children compare equal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, Direction, Inline, IoBuffers, MemoryBackend, Request,
};
use iovirt_filter::fault::{FaultFilter, FaultOptions, InjectedError, Rule, Selector};
use iovirt_filter::mirror::{ChildState, Mirror, MirrorEvent, MirrorOptions, ReadPolicy};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SECTOR: u64 = 512;
const DISK: u64 = 256 << 10;
const REGION: u64 = 16 << 10;

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

fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0), len)],
        Direction::DeviceWrites,
    )?;
    submit_wait(b, Request::Read { offset, buf })?;
    let mut out = vec![0; len];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    Ok(out)
}

/// A random write through `m`, recorded in `model` once acknowledged.
fn random_write(m: &dyn BlockBackend, rng: &mut Rng, model: &Mutex<Vec<u8>>) {
    let sectors = 1 + rng.below(40);
    let start = rng.below(DISK / SECTOR - sectors) * SECTOR;
    let len = (sectors * SECTOR) as usize;
    let seed = rng.next();
    // Each sector carries its own stamp, so misplaced data shows up.
    let mut data = vec![seed as u8 | 1; len];
    for (i, sector) in data.chunks_mut(SECTOR as usize).enumerate() {
        sector[..8].copy_from_slice(&(seed ^ i as u64).to_le_bytes());
    }
    let r = if rng.below(8) == 0 {
        Request::WriteZeroes {
            offset: start,
            len: len as u64,
            may_unmap: false,
        }
    } else {
        Request::Write {
            offset: start,
            buf: IoBuffers::from_vec(data.clone()),
            fua: rng.below(4) == 0,
        }
    };
    let zero = matches!(r, Request::WriteZeroes { .. });
    submit_wait(m, r).expect("the mirror must keep accepting writes");
    let mut model = model.lock().unwrap();
    let dst = &mut model[start as usize..start as usize + len];
    if zero {
        dst.fill(0);
    } else {
        dst.copy_from_slice(&data);
    }
}

struct Run {
    failed: bool,
    writes: u64,
    reads: u64,
    resynced_regions: u64,
}

fn one_run(seed: u64, dir: &std::path::Path) -> Run {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let disks = [
        Arc::new(Inline(MemoryBackend::new(DISK))),
        Arc::new(Inline(MemoryBackend::new(DISK))),
    ];
    let faults: Vec<FaultFilter> = disks
        .iter()
        .map(|d| {
            FaultFilter::with_options(
                d.clone(),
                FaultOptions {
                    seed,
                    track_writes: false,
                },
            )
        })
        .collect();
    let handles: Vec<_> = faults.iter().map(|f| f.handle()).collect();
    let children: Vec<Arc<dyn BlockBackend>> = faults
        .into_iter()
        .map(|f| Arc::new(f) as Arc<dyn BlockBackend>)
        .collect();
    let victim = (seed % 2) as usize;
    let after = rng.below(100);
    handles[victim].add_rule(Rule::fail(Selector::any().after(after), InjectedError::Io));
    let m = Mirror::new(
        children,
        MirrorOptions {
            region_size: REGION,
            bitmap: Some(dir.join(format!("bitmap-{seed}"))),
            read_policy: if seed % 3 == 0 {
                ReadPolicy::RoundRobin
            } else {
                ReadPolicy::LeastOutstanding
            },
            ..MirrorOptions::default()
        },
    )
    .unwrap();
    let ctl = m.handle();
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    ctl.set_event_hook(move |e| ev.lock().unwrap().push(e.clone()));
    let model = Mutex::new(vec![0u8; DISK as usize]);
    let (mut writes, mut reads) = (0u64, 0u64);

    for _ in 0..150 {
        match rng.below(10) {
            0..=5 => {
                random_write(&m, &mut rng, &model);
                writes += 1;
            }
            6..=8 => {
                reads += 1;
                let sectors = 1 + rng.below(64);
                let off = rng.below(DISK / SECTOR - sectors) * SECTOR;
                let got = read(&m, off, (sectors * SECTOR) as usize).expect("reads keep working");
                let model = model.lock().unwrap();
                assert_eq!(
                    got,
                    model[off as usize..(off + sectors * SECTOR) as usize],
                    "seed {seed}: read at {off} differs from the acknowledged writes"
                );
            }
            _ => submit_wait(&m, Request::Flush).expect("flushes keep working"),
        }
    }
    // No acknowledged write is lost on the survivor.
    let survivor = 1 - victim;
    assert_eq!(
        disks[survivor].0.contents(),
        *model.lock().unwrap(),
        "seed {seed}: the surviving child lacks acknowledged writes"
    );
    let failed = ctl.status()[victim].state == ChildState::Failed;
    handles[victim].clear_rules();
    let mut resynced_regions = 0;
    if failed {
        assert!(events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, MirrorEvent::ChildFailed { child, .. } if *child == victim)));
        ctl.return_child(victim).unwrap();
        // Writes go on while the resync copies.
        for _ in 0..40 {
            random_write(&m, &mut rng, &model);
            writes += 1;
        }
        assert!(
            ctl.wait_resync(Duration::from_secs(10)),
            "seed {seed}: resync hangs"
        );
        let p = ctl.resync_progress().unwrap();
        assert!(p.finished && p.error.is_none(), "seed {seed}: {p:?}");
        resynced_regions = p.copied_regions;
        assert_eq!(ctl.status()[victim].state, ChildState::Healthy);
        assert_eq!(ctl.status()[victim].dirty_regions, 0);
    }
    let model = model.lock().unwrap();
    assert_eq!(disks[0].0.contents(), *model, "seed {seed}: child 0");
    assert_eq!(disks[1].0.contents(), *model, "seed {seed}: child 1");
    assert!(ctl.verify().unwrap().is_empty());
    Run {
        failed,
        writes,
        reads,
        resynced_regions,
    }
}

#[test]
fn hundred_seeded_failures_lose_no_acknowledged_write_and_resync_equal() {
    // tmpfs when there is one: the test is about the logic, not about fsync speed.
    let dir = tempfile::Builder::new()
        .prefix("mirror-runs")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let t = Instant::now();
    let mut failed = 0;
    let (mut regions, mut writes, mut reads) = (0, 0, 0);
    for seed in 1..=100u64 {
        let r = one_run(seed, dir.path());
        failed += u64::from(r.failed);
        regions += r.resynced_regions;
        writes += r.writes;
        reads += r.reads;
    }
    eprintln!(
        "100 runs: {failed} with a failed child, {writes} acknowledged writes (0 lost), {reads} reads checked, {regions} regions resynced, {:?}",
        t.elapsed()
    );
    assert!(failed >= 80, "most runs must see the failure ({failed})");
}

#[test]
fn dirty_bitmap_survives_a_crash_and_drives_the_resync_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let bitmap = dir.path().join("bitmap");
    let a = Arc::new(Inline(MemoryBackend::new(DISK)));
    let b = Arc::new(Inline(MemoryBackend::new(DISK)));
    let opts = MirrorOptions {
        region_size: REGION,
        bitmap: Some(bitmap.clone()),
        ..MirrorOptions::default()
    };
    {
        let m = Mirror::new(vec![a.clone(), b.clone()], opts.clone()).unwrap();
        m.handle().fail_child(1).unwrap();
        for i in 0..3u64 {
            submit_wait(
                &m,
                Request::Write {
                    offset: i * 3 * REGION + 512,
                    buf: IoBuffers::from_vec(vec![i as u8 + 1; 1024]),
                    fua: false,
                },
            )
            .unwrap();
        }
        assert_eq!(m.handle().status()[1].dirty_regions, 3);
        // "Crash": the mirror goes away without any clean shutdown.
    }
    assert_ne!(a.0.contents(), b.0.contents());
    let m = Mirror::new(vec![a.clone(), b.clone()], opts).unwrap();
    let ctl = m.handle();
    assert!(ctl.wait_resync(Duration::from_secs(5)));
    let p = ctl.resync_progress().unwrap();
    assert_eq!((p.child, p.total_regions, p.copied_regions), (1, 3, 3));
    assert_eq!(a.0.contents(), b.0.contents());
    assert!(ctl.status().iter().all(|s| s.state == ChildState::Healthy));
    // A bitmap for another geometry is refused.
    let other = MirrorOptions {
        region_size: REGION * 2,
        bitmap: Some(bitmap),
        ..MirrorOptions::default()
    };
    assert!(Mirror::new(vec![a.clone(), b.clone()], other).is_err());
}

#[test]
fn every_child_behind_at_open_is_resynced_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let disks: Vec<_> = (0..3)
        .map(|_| Arc::new(Inline(MemoryBackend::new(DISK))))
        .collect();
    let children = || -> Vec<Arc<dyn BlockBackend>> {
        disks
            .iter()
            .map(|d| d.clone() as Arc<dyn BlockBackend>)
            .collect()
    };
    let opts = MirrorOptions {
        region_size: REGION,
        bitmap: Some(dir.path().join("bitmap")),
        ..MirrorOptions::default()
    };
    {
        let m = Mirror::new(children(), opts.clone()).unwrap();
        let ctl = m.handle();
        ctl.fail_child(1).unwrap();
        submit_wait(
            &m,
            Request::Write {
                offset: 0,
                buf: IoBuffers::from_vec(vec![1; 512]),
                fua: false,
            },
        )
        .unwrap();
        ctl.fail_child(2).unwrap();
        submit_wait(
            &m,
            Request::Write {
                offset: REGION,
                buf: IoBuffers::from_vec(vec![2; 512]),
                fua: false,
            },
        )
        .unwrap();
    }
    let m = Mirror::new(children(), opts).unwrap();
    let ctl = m.handle();
    assert!(ctl.wait_resync(Duration::from_secs(5)));
    assert!(ctl
        .status()
        .iter()
        .all(|s| s.state == ChildState::Healthy && s.dirty_regions == 0));
    assert_eq!(disks[1].0.contents(), disks[0].0.contents());
    assert_eq!(disks[2].0.contents(), disks[0].0.contents());
}

#[test]
fn reads_spread_and_verify_reports_differences() {
    let a = Arc::new(Inline(MemoryBackend::new(DISK)));
    let b = Arc::new(Inline(MemoryBackend::new(DISK)));
    let m = Mirror::new(
        vec![a.clone(), b.clone()],
        MirrorOptions {
            region_size: REGION,
            read_policy: ReadPolicy::RoundRobin,
            ..MirrorOptions::default()
        },
    )
    .unwrap();
    let ctl = m.handle();
    for _ in 0..10 {
        read(&m, 0, 4096).unwrap();
    }
    let st = ctl.status();
    assert_eq!((st[0].reads, st[1].reads), (5, 5));
    // Write behind the mirror's back to one child: verify finds that region.
    submit_wait(
        &*b,
        Request::Write {
            offset: 5 * REGION,
            buf: IoBuffers::from_vec(vec![9; 512]),
            fua: false,
        },
    )
    .unwrap();
    let diffs = ctl.verify().unwrap();
    assert_eq!(diffs.len(), 1);
    assert_eq!(
        (diffs[0].offset, diffs[0].differing.clone()),
        (5 * REGION, vec![1])
    );
    // The last healthy child cannot be failed by hand; quorum 2 refuses degraded writes.
    ctl.fail_child(0).unwrap();
    assert!(ctl.fail_child(1).is_err());
    let strict = Mirror::new(
        vec![a.clone(), b.clone()],
        MirrorOptions {
            region_size: REGION,
            write_quorum: 2,
            ..MirrorOptions::default()
        },
    )
    .unwrap();
    strict.handle().fail_child(0).unwrap();
    assert!(submit_wait(
        &strict,
        Request::Write {
            offset: 0,
            buf: IoBuffers::from_vec(vec![1; 512]),
            fua: false
        }
    )
    .is_err());
}

#[test]
fn a_write_to_a_region_under_copy_is_not_overwritten_by_the_copy() {
    use iovirt_filter::fault::Op;
    // The copy's read from the source is stalled; a guest write to the same
    // region meanwhile must wait, then land on top of the copy.
    let a = Arc::new(Inline(MemoryBackend::new(DISK)));
    let b = Arc::new(Inline(MemoryBackend::new(DISK)));
    let fa = FaultFilter::new(a.clone());
    let ha = fa.handle();
    let m = Arc::new(
        Mirror::new(
            vec![Arc::new(fa) as Arc<dyn BlockBackend>, b.clone()],
            MirrorOptions {
                region_size: REGION,
                read_policy: ReadPolicy::RoundRobin,
                ..MirrorOptions::default()
            },
        )
        .unwrap(),
    );
    let ctl = m.handle();
    ctl.fail_child(1).unwrap();
    let w = |byte: u8| Request::Write {
        offset: 0,
        buf: IoBuffers::from_vec(vec![byte; 1024]),
        fua: false,
    };
    submit_wait(&*m, w(1)).unwrap();
    ha.add_rule(Rule::stall(Selector::op(Op::Read)));
    ctl.return_child(1).unwrap();
    assert!(ha.wait_stalled(1, Duration::from_secs(5)));
    let m2 = m.clone();
    let writer = std::thread::spawn(move || submit_wait(&*m2, w(2)).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "the write waits for the copy");
    ha.clear_rules();
    ha.release_stalled();
    writer.join().unwrap();
    assert!(ctl.wait_resync(Duration::from_secs(5)));
    assert_eq!(a.0.contents()[..1024], [2; 1024]);
    assert_eq!(b.0.contents(), a.0.contents());
}
