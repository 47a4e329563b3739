//! Concatenation and striping against a flat-disk model: random reads,
//! writes, write-zeroes, discards and flushes (a proptest), nested stacks,
//! and error propagation with the first error's status.

use std::sync::Arc;

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, DeviceStatus, Inline, IoBuffers, MemoryBackend, Request,
};
use iovirt_filter::aggregate::{Aggregate, AggregateError, Layout};
use iovirt_filter::fault::{FaultFilter, InjectedError, Op, Rule, Selector};
use proptest::prelude::*;

fn mem(size: u64) -> Arc<Inline<MemoryBackend>> {
    Arc::new(Inline(MemoryBackend::new(size)))
}

fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let m = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len.max(1))]).unwrap());
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

#[derive(Clone, Debug)]
enum Op2 {
    Write(u64, u64, u8),
    Zero(u64, u64),
    Discard(u64, u64),
    Read(u64, u64),
    Flush,
}

fn ops(sectors: u64) -> impl Strategy<Value = Vec<Op2>> {
    let range = (0..sectors).prop_flat_map(move |s| (Just(s), 1..=(sectors - s).min(64)));
    proptest::collection::vec(
        prop_oneof![
            (range.clone(), any::<u8>()).prop_map(|((s, n), b)| Op2::Write(s, n, b)),
            range.clone().prop_map(|(s, n)| Op2::Zero(s, n)),
            range.clone().prop_map(|(s, n)| Op2::Discard(s, n)),
            range.prop_map(|(s, n)| Op2::Read(s, n)),
            Just(Op2::Flush),
        ],
        1..40,
    )
}

fn run(disk: &dyn BlockBackend, ops: &[Op2]) -> Result<(), TestCaseError> {
    let cap = disk.info().capacity as usize;
    let mut model = vec![0u8; cap];
    for op in ops {
        match *op {
            Op2::Write(s, n, b) => {
                let (o, l) = ((s * 512) as usize, (n * 512) as usize);
                let data: Vec<u8> = (0..l).map(|i| b ^ (i / 512) as u8).collect();
                submit_wait(
                    disk,
                    Request::Write {
                        offset: o as u64,
                        buf: IoBuffers::from_vec(data.clone()),
                        fua: false,
                    },
                )
                .unwrap();
                model[o..o + l].copy_from_slice(&data);
            }
            Op2::Zero(s, n) | Op2::Discard(s, n) => {
                let (o, l) = (s * 512, n * 512);
                let req = if matches!(op, Op2::Zero(..)) {
                    Request::WriteZeroes {
                        offset: o,
                        len: l,
                        may_unmap: true,
                    }
                } else {
                    Request::Discard { offset: o, len: l }
                };
                submit_wait(disk, req).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            Op2::Read(s, n) => {
                let (o, l) = ((s * 512) as usize, (n * 512) as usize);
                prop_assert_eq!(read(disk, o as u64, l).unwrap(), &model[o..o + l]);
            }
            Op2::Flush => submit_wait(disk, Request::Flush).unwrap(),
        }
    }
    prop_assert_eq!(read(disk, 0, cap).unwrap(), model);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn concat_equals_a_flat_disk(ops in ops(96)) {
        // 16 + 48 + 32 sectors.
        let d = Aggregate::concat(vec![mem(16 * 512), mem(48 * 512), mem(32 * 512)]).unwrap();
        prop_assert_eq!(d.info().capacity, 96 * 512);
        run(&d, &ops)?;
    }

    #[test]
    fn stripe_equals_a_flat_disk(ops in ops(96)) {
        // 3 children of 32 sectors (one of 40: its tail is unused), 4-sector chunks.
        let d = Aggregate::stripe(vec![mem(32 * 512), mem(40 * 512), mem(32 * 512)], 2048).unwrap();
        prop_assert_eq!(d.info().capacity, 96 * 512);
        run(&d, &ops)?;
    }

    #[test]
    fn stripe_of_concats_equals_a_flat_disk(ops in ops(128)) {
        let c1: Arc<dyn BlockBackend> = Arc::new(Aggregate::concat(vec![mem(8192), mem(24576)]).unwrap());
        let c2: Arc<dyn BlockBackend> = Arc::new(Aggregate::concat(vec![mem(16384), mem(16384)]).unwrap());
        let d = Aggregate::stripe(vec![c1, c2], 4096).unwrap();
        run(&d, &ops)?;
    }
}

#[test]
fn layout_maps_chunks_round_robin() {
    let a = mem(64 << 10);
    let b = mem(64 << 10);
    let d = Aggregate::stripe(vec![a.clone(), b.clone()], 4096).unwrap();
    assert_eq!(d.locate(0), Some((0, 0)));
    assert_eq!(d.locate(4096), Some((1, 0)));
    assert_eq!(d.locate(8192 + 5), Some((0, 4096 + 5)));
    assert_eq!(d.locate(128 << 10), None);
    let c = Aggregate::concat(vec![a, b]).unwrap();
    assert_eq!(c.locate((64 << 10) + 512), Some((1, 512)));
    assert_eq!(c.layout(), Layout::Concat);
    assert!(matches!(
        Aggregate::stripe(vec![mem(4096)], 1000),
        Err(AggregateError::Chunk { .. })
    ));
    assert!(matches!(
        Aggregate::stripe(vec![mem(2048)], 4096),
        Err(AggregateError::Capacity(_))
    ));
    assert!(matches!(
        Aggregate::concat(vec![]),
        Err(AggregateError::NoChildren)
    ));
}

#[test]
fn a_failing_part_fails_the_request_with_its_status() {
    let a = mem(64 << 10);
    let fb = FaultFilter::new(mem(64 << 10));
    let hb = fb.handle();
    let d = Aggregate::stripe(vec![a.clone(), Arc::new(fb)], 4096).unwrap();
    hb.add_rule(Rule::fail(Selector::op(Op::Write), InjectedError::Io));
    let w = |off| Request::Write {
        offset: off,
        buf: IoBuffers::from_vec(vec![1; 8192]),
        fua: false,
    };
    let e = submit_wait(&d, w(0)).unwrap_err();
    assert_eq!(e.status(), DeviceStatus::IoError);
    // The part on the healthy child was written: a torn write, as on a real array.
    assert_eq!(a.0.contents()[..4096], [1; 4096]);
    hb.clear_rules();
    hb.add_rule(Rule::fail(
        Selector::op(Op::Flush),
        InjectedError::Unsupported,
    ));
    let e = submit_wait(&d, Request::Flush).unwrap_err();
    assert_eq!(e.status(), DeviceStatus::Unsupported);
    hb.clear_rules();
    hb.add_rule(Rule::fail(Selector::op(Op::Read), InjectedError::Io));
    assert!(read(&d, 0, 8192).is_err());
    assert!(
        read(&d, 0, 4096).is_ok(),
        "a read on the healthy child alone passes"
    );
}
