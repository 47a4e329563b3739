//! Redo log over memory bases and a log file: time-travel views by point and
//! by time, revert, merge, replay after a crash that tore the last record
//! (a proptest cutting the log at random offsets), and an index bounded by
//! the number of distinct extents.

use std::sync::Arc;

use iovirt_backend::{submit_wait, BlockBackend, Inline, IoBuffers, MemoryBackend, Request};
use iovirt_filter::redolog::record::HEADER_LEN;
use iovirt_filter::redolog::{LogPoint, ManualClock, RedoLog, RedoLogError, RedoLogOptions};
use proptest::prelude::*;

const DISK: u64 = 64 << 10;

fn base() -> Arc<Inline<MemoryBackend>> {
    Arc::new(Inline(MemoryBackend::new(DISK)))
}

fn open(
    base: &Arc<Inline<MemoryBackend>>,
    path: &std::path::Path,
    clock: &Arc<ManualClock>,
) -> RedoLog {
    RedoLog::open(base.clone(), RedoLogOptions::new(path).clock(clock.clone())).unwrap()
}

/// Apply a write (or zeroes when `byte` is 0) to the log and the model.
fn write(log: &dyn BlockBackend, model: &mut [u8], offset: u64, len: usize, byte: u8) {
    let req = if byte == 0 {
        Request::WriteZeroes {
            offset,
            len: len as u64,
            may_unmap: false,
        }
    } else {
        Request::Write {
            offset,
            buf: IoBuffers::from_vec(vec![byte; len]),
            fua: false,
        }
    };
    submit_wait(log, req).unwrap();
    model[offset as usize..offset as usize + len].fill(byte);
}

#[test]
fn views_by_point_and_time_show_the_past() {
    let dir = tempfile::tempdir().unwrap();
    let b = base();
    // The base has content of its own.
    submit_wait(
        &*b,
        Request::Write {
            offset: 0,
            buf: IoBuffers::from_vec(vec![0xee; DISK as usize]),
            fua: false,
        },
    )
    .unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let log = open(&b, &dir.path().join("d.log"), &clock);
    let ctl = log.handle();
    let mut model = vec![0xee; DISK as usize];
    let mut states = vec![(ctl.current(), clock_now(&clock), model.clone())];
    for i in 1..=20u8 {
        clock.advance(1000);
        let off = u64::from(i % 7) * 4096 + 512 * u64::from(i % 3);
        write(
            &log,
            &mut model,
            off,
            512 * (1 + usize::from(i % 4)),
            if i % 5 == 0 { 0 } else { i },
        );
        states.push((ctl.current(), clock_now(&clock), model.clone()));
    }
    let snap = ctl.snapshot("mid").unwrap();
    assert_eq!(ctl.find_snapshot("mid"), Some(snap));
    assert!(ctl.snapshot("mid").is_err(), "names are unique");
    for (point, time, want) in &states {
        let v = ctl.view_at(*point).unwrap();
        assert_eq!(
            v.read_vec(0, DISK as usize).unwrap(),
            *want,
            "view at {point:?}"
        );
        let v = ctl.view_at_time(*time).unwrap();
        assert!(v.point() >= *point, "the newest point at that time");
        assert_eq!(
            v.read_vec(0, DISK as usize).unwrap(),
            *want,
            "view at time {time}"
        );
        // Views are read-only.
        assert!(submit_wait(
            &v,
            Request::Write {
                offset: 0,
                buf: IoBuffers::zeroed(512),
                fua: false
            }
        )
        .is_err());
    }
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), model);
    assert!(matches!(
        ctl.view_at(LogPoint(1000)),
        Err(RedoLogError::NoSuchPoint { .. })
    ));
    // Reopening replays to the same disk and the same snapshots.
    drop(log);
    let log = open(&b, &dir.path().join("d.log"), &clock);
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), model);
    assert_eq!(log.handle().snapshots()[0].name, "mid");
    assert_eq!(
        b.0.contents(),
        vec![0xee; DISK as usize],
        "the base is never written"
    );
}

fn clock_now(c: &ManualClock) -> u64 {
    use iovirt_filter::redolog::Clock;
    c.now_ns()
}

#[test]
fn revert_cuts_the_log_and_invalidates_later_views() {
    let dir = tempfile::tempdir().unwrap();
    let b = base();
    let clock = Arc::new(ManualClock::new(1));
    let path = dir.path().join("d.log");
    let log = open(&b, &path, &clock);
    let ctl = log.handle();
    let mut model = vec![0u8; DISK as usize];
    write(&log, &mut model, 0, 4096, 1);
    let snap = ctl.snapshot("good").unwrap();
    let at_snap = model.clone();
    write(&log, &mut model, 1024, 4096, 2);
    let later = ctl.view_at(ctl.current()).unwrap();
    let earlier = ctl.view_at(snap).unwrap();
    ctl.snapshot("bad").unwrap();
    ctl.revert(snap).unwrap();
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), at_snap);
    assert!(!later.is_valid() && later.read_vec(0, 512).is_err());
    assert!(earlier.is_valid());
    assert_eq!(earlier.read_vec(0, DISK as usize).unwrap(), at_snap);
    assert_eq!(ctl.snapshots().len(), 1);
    // Writing goes on from the reverted state, and survives a reopen.
    let mut model = at_snap;
    write(&log, &mut model, 8192, 512, 3);
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, ctl.stats().log_bytes);
    drop((log, later, earlier));
    let log = open(&b, &path, &clock);
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), model);
}

#[test]
fn merge_moves_a_prefix_into_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let b = base();
    let clock = Arc::new(ManualClock::new(1));
    let path = dir.path().join("d.log");
    let log = open(&b, &path, &clock);
    let ctl = log.handle();
    let mut model = vec![0u8; DISK as usize];
    for i in 1..=10u8 {
        write(&log, &mut model, u64::from(i) * 2048, 4096, i);
    }
    write(&log, &mut model, 0, 1024, 0);
    let p = ctl.snapshot("merge-here").unwrap();
    let at_p = model.clone();
    let old_view = ctl.view_at(LogPoint(3)).unwrap();
    for i in 11..=15u8 {
        write(&log, &mut model, u64::from(i) * 1024, 1024, i);
    }
    let later = ctl.snapshot("after").unwrap();
    let before = ctl.stats();
    ctl.merge(p).unwrap();
    let after = ctl.stats();
    assert_eq!(
        b.0.contents(),
        at_p,
        "the base holds the disk as of the point"
    );
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), model);
    assert!(after.log_bytes < before.log_bytes);
    assert_eq!(after.first_point, p);
    assert!(matches!(
        ctl.view_at(LogPoint(3)),
        Err(RedoLogError::NoSuchPoint { .. })
    ));
    assert!(!old_view.is_valid());
    assert_eq!(
        ctl.view_at(p).unwrap().read_vec(0, DISK as usize).unwrap(),
        at_p
    );
    assert_eq!(ctl.find_snapshot("after"), Some(later));
    assert_eq!(ctl.find_snapshot("merge-here"), None);
    drop(log);
    let log = open(&b, &path, &clock);
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), model);
    assert_eq!(log.handle().stats().first_point, p);
    // A read-only base cannot take a merge.
    let ro: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(DISK).read_only()));
    let log2 = RedoLog::open(ro, RedoLogOptions::new(dir.path().join("ro.log"))).unwrap();
    assert!(matches!(
        log2.handle().merge(LogPoint(0)),
        Err(RedoLogError::ReadOnlyBase)
    ));
}

#[test]
fn memory_follows_distinct_extents_not_writes() {
    let dir = tempfile::tempdir().unwrap();
    let b = base();
    let clock = Arc::new(ManualClock::new(1));
    let log = open(&b, &dir.path().join("d.log"), &clock);
    let data = vec![7u8; 512];
    for i in 0..100_000u64 {
        let req = Request::Write {
            offset: (i % 10) * 4096,
            buf: IoBuffers::from_vec(data.clone()),
            fua: false,
        };
        submit_wait(&log, req).unwrap();
    }
    let s = log.handle().stats();
    assert_eq!(s.extents, 10);
    assert_eq!(s.last_point, LogPoint(100_000));
}

#[test]
fn a_corrupt_last_record_is_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let b = base();
    let clock = Arc::new(ManualClock::new(1));
    let log = open(&b, &path, &clock);
    let mut model = vec![0u8; DISK as usize];
    write(&log, &mut model, 0, 512, 1);
    let good = model.clone();
    write(&log, &mut model, 0, 512, 2);
    drop(log);
    // Flip a data byte of the last record: its CRC no longer matches.
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let log = open(&b, &path, &clock);
    assert_eq!(log.read_vec(0, DISK as usize).unwrap(), good);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        (n - HEADER_LEN - 512) as u64
    );
    // A file that is not a log is refused, not wiped.
    std::fs::write(dir.path().join("x"), vec![1u8; 4096]).unwrap();
    assert!(matches!(
        RedoLog::open(b.clone(), RedoLogOptions::new(dir.path().join("x"))),
        Err(RedoLogError::NotALog { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replay_after_a_cut_equals_the_prefix(
        ops in proptest::collection::vec((0u64..120, 1usize..9, 0u8..6, any::<bool>()), 1..40),
        cut_frac in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.log");
        let b = base();
        let clock = Arc::new(ManualClock::new(1));
        let log = open(&b, &path, &clock);
        let ctl = log.handle();
        let mut model = vec![0u8; DISK as usize];
        // (log length after the record, model after it)
        let mut prefixes = vec![(ctl.stats().log_bytes, model.clone())];
        for (sector, sectors, byte, flush) in ops {
            let len = sectors * 512;
            let off = (sector * 512).min(DISK - len as u64);
            write(&log, &mut model, off, len, byte);
            if flush {
                submit_wait(&log, Request::Flush).unwrap();
            }
            prefixes.push((ctl.stats().log_bytes, model.clone()));
        }
        let total = ctl.stats().log_bytes;
        drop(log);
        let cut = (total as f64 * cut_frac) as u64;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let log = open(&b, &path, &clock);
        let want = prefixes
            .iter()
            .rev()
            .find(|(end, _)| *end <= cut)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| vec![0u8; DISK as usize]);
        prop_assert_eq!(log.read_vec(0, DISK as usize).unwrap(), want);
        // What was cut is gone from the file, and new writes append cleanly.
        let mut m2 = vec![0u8; 512];
        write(&log, &mut m2, 0, 512, 9);
        drop(log);
        let log = open(&b, &path, &clock);
        prop_assert_eq!(log.read_vec(0, 512).unwrap(), vec![9u8; 512]);
    }
}
