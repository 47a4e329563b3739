//! Fuzz the MC146818 RTC: arbitrary index/data port accesses, clock jumps,
//! polls and snapshots. It must never panic, and a snapshot taken at any point
//! must restore.
#![no_main]
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Arbitrary;
use iovirt_bus::interrupt::test_doubles::RecordingLine;
use iovirt_bus::BusDeviceMut;
use iovirt_legacy::rtc::{Rtc, TestClock};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A guest IN at offset 0..=2.
    Read { offset: u8, wide: bool },
    /// A guest OUT at offset 0..=2.
    Write { offset: u8, value: u8 },
    /// Select a register and write it, the common pair.
    Set { index: u8, value: u8 },
    /// Move host time forward.
    Advance { nanos: u64 },
    /// Jump host time anywhere (including before the epoch's end of range).
    Jump { secs: u64 },
    /// The VMM's timer fired.
    Poll,
    /// The VMM asks when to fire next.
    NextEvent,
    /// Host-side CMOS setup calls.
    Layout { below: u64, above: u64, cpus: u16 },
    /// Snapshot and restore in place.
    Snapshot,
}

fuzz_target!(|input: (u32, Vec<Op>)| {
    let (start, ops) = input;
    let clock = TestClock::at_unix(u64::from(start));
    let irq = Arc::new(RecordingLine::new());
    let mut rtc = Rtc::new(irq.clone(), Box::new(clock.clone()));
    for op in ops {
        match op {
            Op::Read { offset, wide } => {
                let mut buf = [0u8; 2];
                let len = if wide { 2 } else { 1 };
                rtc.read(u64::from(offset % 3), &mut buf[..len]);
            }
            Op::Write { offset, value } => rtc.write(u64::from(offset % 3), &[value]),
            Op::Set { index, value } => {
                rtc.write(0, &[index]);
                rtc.write(1, &[value]);
            }
            Op::Advance { nanos } => clock.advance(Duration::from_nanos(nanos)),
            Op::Jump { secs } => {
                if let Some(t) = UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
                    clock.set(t);
                }
            }
            Op::Poll => rtc.poll(),
            Op::NextEvent => {
                let _ = rtc.next_event();
            }
            Op::Layout { below, above, cpus } => {
                rtc.set_memory_layout(below, above);
                rtc.set_cpu_count(cpus);
            }
            Op::Snapshot => {
                let s = rtc.state();
                rtc = Rtc::from_state(&s, irq.clone(), Box::new(clock.clone()))
                    .expect("a live RTC's state must restore");
                assert_eq!(rtc.state(), s);
            }
        }
    }
});
