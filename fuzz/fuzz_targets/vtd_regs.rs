//! Fuzz the emulated VT-d register interface: arbitrary MMIO reads and writes
//! (root table pointer, GCMD, context and IOTLB invalidation registers, the
//! invalidation queue over arbitrary descriptors, fault registers) mixed with
//! DMAs from arbitrary requesters, over guest memory seeded by the input.
//! Nothing may panic or hang, and a saved state must restore.
#![no_main]
use std::sync::Arc;

use arbitrary::Arbitrary;
use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
use iovirt_bus::BusDevice;
use iovirt_iommu::vtd::{Vtd, VtdConfig};
use iovirt_iommu::{DmaView, RequesterId};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        wide: bool,
    },
    Write {
        offset: u16,
        value: u64,
        wide: bool,
    },
    Poke {
        addr: u32,
        value: u64,
    },
    Dma {
        rid: u16,
        iova: u64,
        len: u16,
        write: bool,
    },
    Snapshot,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
    image: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&input.image[..input.image.len().min(MEM)], GuestAddress(0))
        .unwrap();
    let msi = Arc::new(RecordingMsiSink::new());
    let vtd = Arc::new(Vtd::new(VtdConfig::default(), mem.clone(), msi.clone()));
    for op in input.ops.iter().take(512) {
        match *op {
            Op::Read { offset, wide } => {
                let mut b = [0u8; 8];
                let n = if wide { 8 } else { 4 };
                vtd.read(u64::from(offset), &mut b[..n]);
            }
            Op::Write {
                offset,
                value,
                wide,
            } => {
                let b = value.to_le_bytes();
                let n = if wide { 8 } else { 4 };
                vtd.write(u64::from(offset), &b[..n]);
            }
            Op::Poke { addr, value } => {
                let _ = mem.write_obj(value, GuestAddress(u64::from(addr) % MEM as u64));
            }
            Op::Dma {
                rid,
                iova,
                len,
                write,
            } => {
                let view = DmaView::new(mem.clone(), RequesterId(rid), vtd.clone());
                let mut buf = vec![0u8; usize::from(len % 8192)];
                if write {
                    let _ = view.write_slice(&buf, GuestAddress(iova));
                } else {
                    let _ = view.read_slice(&mut buf, GuestAddress(iova));
                }
            }
            Op::Snapshot => {
                let s = vtd.state();
                let other = Vtd::new(VtdConfig::default(), mem.clone(), msi.clone());
                other.restore(s.clone()).unwrap();
                assert_eq!(other.state(), s);
            }
        }
    }
});
