//! Fuzz the 16550A UART: arbitrary register reads/writes interleaved with host
//! input. It must never panic, and a snapshot taken at any point must restore.
#![no_main]
use std::sync::Arc;

use arbitrary::Arbitrary;
use iovirt_bus::interrupt::test_doubles::RecordingLine;
use iovirt_bus::BusDeviceMut;
use iovirt_legacy::serial::{Serial, FIFO_SIZE, SERIAL_LEN};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A guest IN of 1, 2 or 4 bytes (offsets beyond the range included).
    Read { offset: u8, wide: u8 },
    /// A guest OUT.
    Write { offset: u8, data: Vec<u8> },
    /// Host input.
    Input(Vec<u8>),
    /// Snapshot and restore in place.
    Snapshot,
}

fuzz_target!(|ops: Vec<Op>| {
    let irq = Arc::new(RecordingLine::new());
    let mut uart = Serial::new(irq.clone(), std::io::sink());
    for op in ops {
        match op {
            Op::Read { offset, wide } => {
                let mut buf = [0u8; 4];
                let len = [1, 2, 4][usize::from(wide % 3)];
                uart.read(u64::from(offset) % (SERIAL_LEN + 2), &mut buf[..len]);
            }
            Op::Write { offset, data } => {
                uart.write(
                    u64::from(offset) % (SERIAL_LEN + 2),
                    &data[..data.len().min(4)],
                );
            }
            Op::Input(bytes) => {
                let free = uart.fifo_free();
                let took = uart.enqueue_input(&bytes);
                assert!(took <= free && took <= bytes.len());
            }
            Op::Snapshot => {
                let s = uart.state();
                uart = Serial::from_state(&s, irq.clone(), std::io::sink())
                    .expect("a live UART's state must restore");
                assert_eq!(uart.state(), s);
            }
        }
        assert!(uart.fifo_free() <= FIFO_SIZE);
    }
});
