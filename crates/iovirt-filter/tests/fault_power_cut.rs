//! Power-cut semantics of the fault filter: what survives is exactly what
//! completed flushes (and FUA) cover, checked case by case and against a model
//! over random sequences of writes, flushes and out-of-order completions.

use std::sync::{Arc, Mutex};

use iovirt_backend::{
    submit_wait, BlockBackend, Completion, Inline, IoBuffers, MemoryBackend, Request, ThreadPool,
};
use iovirt_filter::fault::{FaultFilter, FaultHandle, FaultOptions, Op, Rule, Selector};
use proptest::prelude::*;

const SECTOR: usize = 512;

fn tracking(disk: Arc<dyn BlockBackend>) -> (FaultFilter, FaultHandle) {
    let f = FaultFilter::with_options(
        disk,
        FaultOptions {
            seed: 0,
            track_writes: true,
        },
    );
    let h = f.handle();
    (f, h)
}

fn write(sector: u64, byte: u8, sectors: usize, fua: bool) -> Request {
    Request::Write {
        offset: sector * SECTOR as u64,
        buf: IoBuffers::from_vec(vec![byte; sectors * SECTOR]),
        fua,
    }
}

type Results = Arc<Mutex<Vec<(usize, bool)>>>;

fn submit_logged(f: &FaultFilter, req: Request, id: usize, log: &Results) {
    let log = log.clone();
    f.submit(
        req,
        Completion::new(move |r| log.lock().unwrap().push((id, r.is_ok()))),
    );
}

#[test]
fn flush_covers_only_writes_completed_before_it_was_submitted() {
    let disk = Arc::new(Inline(MemoryBackend::new(64 * SECTOR as u64)));
    let (f, h) = tracking(disk.clone());
    let log: Results = Arc::default();
    let stall = h.add_rule(Rule::stall(Selector::any()));
    submit_logged(&f, write(0, 1, 1, false), 0, &log); // A: completes before the flush
    submit_logged(&f, write(1, 2, 1, false), 1, &log); // B: completes after the flush is submitted
    assert!(h.release_nth(0)); // A completes
    submit_logged(&f, Request::Flush, 2, &log);
    submit_logged(&f, write(2, 3, 1, true), 3, &log); // C: FUA
    submit_logged(&f, write(3, 4, 1, false), 4, &log); // D: completes, never flushed
    h.remove_rule(stall);
    assert_eq!(h.release_stalled(), 4); // B, flush, C, D complete in that order
    assert!(log.lock().unwrap().iter().all(|(_, ok)| *ok));
    submit_wait(&f, write(4, 5, 1, false)).unwrap(); // E: after the flush, not flushed
    assert_eq!(
        disk.0.contents()[..5 * SECTOR]
            .iter()
            .filter(|&&b| b == 0)
            .count(),
        0
    );

    let report = h.power_cut().unwrap();
    let c = disk.0.contents();
    assert_eq!(c[0], 1, "A was covered by the flush");
    assert_eq!(c[SECTOR], 0, "B completed after the flush was submitted");
    assert_eq!(c[2 * SECTOR], 3, "C was FUA");
    assert_eq!(c[3 * SECTOR], 0, "D was never flushed");
    assert_eq!(c[4 * SECTOR], 0, "E was never flushed");
    assert_eq!(report.rolled_back_sectors, 3);
    assert_eq!(h.stats().power_cuts, 1);
}

#[test]
fn a_flush_counts_only_once_it_completes() {
    let disk = Arc::new(Inline(MemoryBackend::new(64 * SECTOR as u64)));
    let (f, h) = tracking(disk.clone());
    let log: Results = Arc::default();
    submit_wait(&f, write(0, 1, 2, false)).unwrap();
    h.add_rule(Rule::stall(Selector::op(Op::Flush)));
    submit_logged(&f, Request::Flush, 0, &log);
    assert_eq!(h.stalled(), 1); // the child flushed, the guest does not know
    h.power_cut().unwrap();
    assert_eq!(disk.0.contents()[..2 * SECTOR], [0; 2 * SECTOR]);
    assert_eq!(*log.lock().unwrap(), [(0, false)], "the held flush fails");
}

#[test]
fn later_writes_to_a_flushed_sector_roll_back_to_the_flushed_data() {
    let disk = Arc::new(Inline(MemoryBackend::new(64 * SECTOR as u64)));
    let (f, h) = tracking(disk.clone());
    submit_wait(&f, write(0, 1, 4, false)).unwrap();
    submit_wait(&f, Request::Flush).unwrap();
    submit_wait(&f, write(1, 2, 2, false)).unwrap();
    submit_wait(
        &f,
        Request::WriteZeroes {
            offset: 3 * SECTOR as u64,
            len: SECTOR as u64,
            may_unmap: false,
        },
    )
    .unwrap();
    submit_wait(
        &f,
        Request::Discard {
            offset: 0,
            len: SECTOR as u64,
        },
    )
    .unwrap();
    assert_eq!(h.tracked_sectors(), 4);
    h.power_cut().unwrap();
    assert_eq!(disk.0.contents()[..4 * SECTOR], [1; 4 * SECTOR]);
    // Requests fail until the power is back; tracking starts afresh.
    assert!(submit_wait(&f, write(0, 9, 1, false)).is_err());
    h.power_restore();
    submit_wait(&f, write(0, 9, 1, false)).unwrap();
    h.power_cut().unwrap();
    assert_eq!(disk.0.contents()[0], 1);
}

#[test]
fn power_cut_waits_for_a_thread_pool_child() {
    let pool =
        Arc::new(ThreadPool::new(MemoryBackend::new(256 * SECTOR as u64), 3, "cut").unwrap());
    let (f, h) = tracking(pool.clone());
    let log: Results = Arc::default();
    for i in 0..32usize {
        submit_logged(&f, write(i as u64, 1, 1, false), i, &log);
    }
    // Wait until all 32 have completed, so the flush covers them.
    while log.lock().unwrap().len() < 32 {
        std::thread::yield_now();
    }
    submit_wait(&f, Request::Flush).unwrap();
    for i in 0..32usize {
        submit_logged(&f, write(i as u64, 2, 1, false), 100 + i, &log);
    }
    // The cut waits for what the pool's threads are doing, then rolls back.
    h.power_cut().unwrap();
    assert_eq!(pool.backend().contents()[..32 * SECTOR], [1; 32 * SECTOR]);
    assert!(log.lock().unwrap()[..32].iter().all(|(_, ok)| *ok));
}

#[derive(Clone, Debug)]
enum Step {
    Write {
        sector: u64,
        sectors: usize,
        fua: bool,
    },
    Zero {
        sector: u64,
        sectors: usize,
    },
    Flush,
    Release(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..16, 1usize..4, proptest::bool::weighted(0.2))
            .prop_map(|(sector, sectors, fua)| Step::Write { sector, sectors, fua }),
        1 => (0u64..16, 1usize..3).prop_map(|(sector, sectors)| Step::Zero { sector, sectors }),
        2 => Just(Step::Flush),
        4 => (0usize..8).prop_map(Step::Release),
    ]
}

/// A request as the model sees it.
struct Model {
    /// (first sector, sectors, byte, fua) per write-like request, in submission order.
    writes: Vec<(u64, usize, u8, bool)>,
    /// Completion order of each write (index into `writes`), if completed.
    acked: Vec<Option<u64>>,
    acks: u64,
    durable_upto: u64,
}

impl Model {
    fn durable(&self, w: usize) -> bool {
        match self.acked[w] {
            Some(a) => self.writes[w].3 || a <= self.durable_upto,
            None => false,
        }
    }
}

#[derive(Clone, Copy)]
enum Held {
    Write(usize),
    Flush(u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn power_cut_restores_the_last_flushed_state(steps in proptest::collection::vec(step(), 1..40)) {
        const SECTORS: u64 = 20;
        let disk = Arc::new(Inline(MemoryBackend::new(SECTORS * SECTOR as u64)));
        let (f, h) = tracking(disk.clone());
        h.add_rule(Rule::stall(Selector::any()));
        let log: Results = Arc::default();
        let mut m = Model { writes: Vec::new(), acked: Vec::new(), acks: 0, durable_upto: 0 };
        let mut held: Vec<Held> = Vec::new();
        let mut id = 0usize;
        for s in steps {
            match s.clone() {
                Step::Write { sector, sectors, fua } => {
                    let byte = (m.writes.len() % 250 + 1) as u8;
                    submit_logged(&f, write(sector, byte, sectors, fua), id, &log);
                    held.push(Held::Write(m.writes.len()));
                    m.writes.push((sector, sectors, byte, fua));
                    m.acked.push(None);
                }
                Step::Zero { sector, sectors } => {
                    let req = Request::WriteZeroes {
                        offset: sector * SECTOR as u64,
                        len: (sectors * SECTOR) as u64,
                        may_unmap: false,
                    };
                    submit_logged(&f, req, id, &log);
                    held.push(Held::Write(m.writes.len()));
                    m.writes.push((sector, sectors, 0, false));
                    m.acked.push(None);
                }
                Step::Flush => {
                    submit_logged(&f, Request::Flush, id, &log);
                    held.push(Held::Flush(m.acks));
                }
                Step::Release(i) => {
                    if held.is_empty() {
                        continue;
                    }
                    let i = i % held.len();
                    prop_assert!(h.release_nth(i));
                    match held.remove(i) {
                        Held::Write(w) => {
                            m.acks += 1;
                            m.acked[w] = Some(m.acks);
                        }
                        Held::Flush(mark) => m.durable_upto = m.durable_upto.max(mark),
                    }
                }
            }
            if !matches!(s, Step::Release(_)) {
                id += 1;
            }
            prop_assert_eq!(h.stalled(), held.len());
        }
        h.power_cut().unwrap();
        let mut want = vec![0u8; SECTORS as usize * SECTOR];
        for (w, &(sector, sectors, byte, _)) in m.writes.iter().enumerate() {
            if m.durable(w) {
                let start = sector as usize * SECTOR;
                want[start..start + sectors * SECTOR].fill(byte);
            }
        }
        prop_assert_eq!(disk.0.contents(), want);
        // Released requests succeeded; the ones still held failed at the cut.
        let results = log.lock().unwrap().clone();
        prop_assert_eq!(results.len(), id);
        let failed = results.iter().filter(|(_, ok)| !ok).count();
        prop_assert_eq!(failed, held.len());
        prop_assert!(submit_wait(&f, write(0, 1, 1, false)).is_err());
    }
}
