//! Multipath over fault-injection filters that lead to one memory disk:
//! failover on errors and timeouts, round-robin, retried requests, and
//! writes to the same sectors kept in order when a timed-out attempt lands late.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, Completion, Inline, IoBuffers, MemoryBackend, Request,
};
use iovirt_filter::fault::{
    FaultFilter, FaultHandle, FaultOptions, InjectedError, Op, Rule, Selector,
};
use iovirt_filter::multipath::{Multipath, MultipathOptions, PathPolicy, PathState};

const DISK: u64 = 256 << 10;

fn paths(
    storage: &Arc<Inline<MemoryBackend>>,
    n: usize,
    seed: u64,
) -> (Vec<Arc<dyn BlockBackend>>, Vec<FaultHandle>) {
    let mut ps: Vec<Arc<dyn BlockBackend>> = Vec::new();
    let mut hs = Vec::new();
    for i in 0..n {
        let f = FaultFilter::with_options(
            storage.clone(),
            FaultOptions {
                seed: seed + i as u64,
                track_writes: false,
            },
        );
        hs.push(f.handle());
        ps.push(Arc::new(f));
    }
    (ps, hs)
}

fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let m = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        m.clone(),
        &[(GuestAddress(0), len)],
        iovirt_backend::Direction::DeviceWrites,
    )?;
    submit_wait(b, Request::Read { offset, buf })?;
    let mut out = vec![0; len];
    m.read_slice(&mut out, GuestAddress(0)).unwrap();
    Ok(out)
}

fn write(offset: u64, byte: u8, len: usize) -> Request {
    Request::Write {
        offset,
        buf: IoBuffers::from_vec(vec![byte; len]),
        fua: false,
    }
}

#[test]
fn errors_fail_over_to_the_passive_path_without_the_guest_noticing() {
    let storage = Arc::new(Inline(MemoryBackend::new(DISK)));
    let (ps, hs) = paths(&storage, 2, 1);
    let mp = Multipath::new(ps, MultipathOptions::default()).unwrap();
    let ctl = mp.handle();
    submit_wait(&mp, write(0, 1, 4096)).unwrap();
    assert_eq!(hs[1].stats().total().seen, 0, "the passive path is idle");
    hs[0].add_rule(Rule::fail(Selector::any(), InjectedError::Io));
    submit_wait(&mp, write(4096, 2, 4096)).unwrap();
    assert_eq!(read(&mp, 0, 8192).unwrap()[4095..4097], [1, 2]);
    submit_wait(&mp, Request::Flush).unwrap();
    let st = ctl.status();
    assert_eq!(
        (st[0].state, st[1].state),
        (PathState::Failed, PathState::Active)
    );
    assert_eq!((st[0].errors, st[0].retried), (1, 1));
    // Unsupported is the request's fault: no failover, the status is kept.
    hs[1].add_rule(Rule::fail(
        Selector::op(Op::Discard),
        InjectedError::Unsupported,
    ));
    let e = submit_wait(
        &mp,
        Request::Discard {
            offset: 0,
            len: 512,
        },
    )
    .unwrap_err();
    assert!(matches!(e, BlockError::Unsupported(_)));
    assert_eq!(ctl.status()[1].state, PathState::Active);
    // Every path gone: the last error reaches the guest; restoring brings it back.
    hs[1].add_rule(Rule::fail(Selector::op(Op::Write), InjectedError::Io));
    assert!(submit_wait(&mp, write(0, 3, 512)).is_err());
    hs[0].clear_rules();
    ctl.restore_path(0).unwrap();
    submit_wait(&mp, write(0, 3, 512)).unwrap();
    assert_eq!(storage.0.contents()[0], 3);
}

#[test]
fn round_robin_spreads_requests_over_active_paths() {
    let storage = Arc::new(Inline(MemoryBackend::new(DISK)));
    let (ps, hs) = paths(&storage, 3, 1);
    let mp = Multipath::new(
        ps,
        MultipathOptions {
            policy: PathPolicy::RoundRobin,
            timeout: None,
        },
    )
    .unwrap();
    for i in 0..30 {
        read(&mp, i * 512, 512).unwrap();
    }
    for h in &hs {
        assert_eq!(h.stats().op(Op::Read).seen, 10);
    }
    mp.handle().fail_path(1).unwrap();
    for i in 0..20 {
        read(&mp, i * 512, 512).unwrap();
    }
    assert_eq!(hs[1].stats().op(Op::Read).seen, 10);
    assert_eq!(
        hs[0].stats().op(Op::Read).seen + hs[2].stats().op(Op::Read).seen,
        40
    );
}

#[test]
fn a_timed_out_write_landing_late_does_not_overwrite_a_later_write() {
    // Path 0 delays writes by 300 ms; the timeout is 40 ms. W1 times out on
    // path 0, is retried on path 1 and acknowledged; W2 to the same sectors
    // must wait until W1's late attempt on path 0 has landed.
    let storage = Arc::new(Inline(MemoryBackend::new(DISK)));
    let (ps, hs) = paths(&storage, 2, 1);
    hs[0].add_rule(Rule::slow(
        Selector::op(Op::Write).count(1),
        Duration::from_millis(300),
    ));
    let mp = Multipath::new(
        ps,
        MultipathOptions {
            policy: PathPolicy::Failover,
            timeout: Some(Duration::from_millis(40)),
        },
    )
    .unwrap();
    let ctl = mp.handle();
    let t = Instant::now();
    submit_wait(&mp, write(0, 1, 4096)).unwrap();
    let acked = t.elapsed();
    assert!(
        acked < Duration::from_millis(250),
        "W1 acknowledged through path 1 ({acked:?})"
    );
    assert_eq!(ctl.status()[0].state, PathState::Failed);
    assert_eq!(ctl.status()[0].timeouts, 1);
    // W2 overlaps W1, whose attempt on path 0 is still on its way.
    let (tx, rx) = std::sync::mpsc::channel();
    mp.submit(
        write(2048, 2, 4096),
        Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
    );
    // A write elsewhere is not held back.
    submit_wait(&mp, write(64 << 10, 3, 512)).unwrap();
    assert_eq!(ctl.waiting_writes(), 1);
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "W2 waited for W1's late attempt"
    );
    let c = storage.0.contents();
    assert_eq!(c[..2048], [1; 2048]);
    assert_eq!(c[2048..6144], [2; 4096], "the late W1 did not land over W2");
}

#[test]
fn seeded_runs_with_flaky_paths_lose_nothing() {
    let t = Instant::now();
    for seed in 0..20u64 {
        let storage = Arc::new(Inline(MemoryBackend::new(DISK)));
        let (ps, hs) = paths(&storage, 3, seed * 10);
        for h in &hs[..2] {
            h.add_rule(Rule::fail(
                Selector::any().probability(0.2),
                InjectedError::Io,
            ));
        }
        let mp = Arc::new(
            Multipath::new(
                ps,
                MultipathOptions {
                    policy: PathPolicy::RoundRobin,
                    timeout: Some(Duration::from_millis(500)),
                },
            )
            .unwrap(),
        );
        let ctl = mp.handle();
        let model = Arc::new(Mutex::new(vec![0u8; DISK as usize]));
        // Four writers on disjoint areas, and concurrent overlapping writes
        // within each writer's area keep their order by waiting.
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let mp = mp.clone();
                let model = model.clone();
                std::thread::spawn(move || {
                    let mut x = seed * 7919 + w * 104_729 + 1;
                    for i in 0..60u64 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = w * (DISK / 4) + (x % 100) * 512;
                        let byte = (i as u8).wrapping_mul(3).wrapping_add(w as u8 + 1);
                        submit_wait(&*mp, write(off, byte, 1024)).unwrap();
                        model.lock().unwrap()[off as usize..off as usize + 1024].fill(byte);
                    }
                })
            })
            .collect();
        for i in 0..40 {
            if i % 10 == 0 {
                for p in 0..3 {
                    ctl.restore_path(p).unwrap();
                }
            }
            read(&*mp, (i * 4096) % DISK, 4096).unwrap();
        }
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!(storage.0.contents(), *model.lock().unwrap(), "seed {seed}");
    }
    assert!(t.elapsed() < Duration::from_secs(10));
}
