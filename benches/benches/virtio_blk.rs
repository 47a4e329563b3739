//! Per-request cost of virtio-blk queue processing: pop a chain, parse it,
//! build the guest-memory buffers, submit to the back-end, complete, fill the
//! used ring and decide on the interrupt — with the null and memory back-ends.
//!
//! `read4k`/`write4k` post one chain per notification (queue depth 1: the
//! fixed cost of a notification is in every request); `read4k_qd32`/
//! `write4k_qd32` post 32 distinct chains per notification, as a driver
//! with 32 requests in flight does, and report the time per request.
//! `*_vic` are the same with virtual interrupt coalescing on (default
//! parameters): inline back-ends leave nothing in flight, so every batch is
//! still signalled and these measure the cost of the coalescing decision.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use iovirt_backend::{BlockBackend, Inline, MemoryBackend, NullBackend};
use iovirt_bus::InterruptError;
use iovirt_virtio::block::{BlockConfig, CoalesceParams, VirtioBlock};
use iovirt_virtio::VirtioInterrupt;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

struct NoIrq;
impl VirtioInterrupt for NoIrq {
    fn signal_used_queue(&self, _: u16) -> Result<(), InterruptError> {
        Ok(())
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

/// Guest memory with `n` read (t = 0) or write (t = 1) chains of header, 4 KiB
/// data and status: chain `i` uses descriptors 3i..3i+2.
fn guest_with_chains(t: u32, n: u16) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 24)]).unwrap();
    let data_flags: u16 = if t == 0 { 1 | 2 } else { 1 };
    for c in 0..u64::from(n) {
        let hdr_at = 0x10000 + 16 * c;
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..].copy_from_slice(&(8 * (c + 1)).to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(hdr_at)).unwrap();
        let first = 3 * c as u16;
        for (i, (a, l, f, next)) in [
            (hdr_at, 16u32, 1u16, first + 1),
            (0x100000 + 4096 * c, 4096, data_flags, first + 2),
            (0x20000 + c, 1, 2, 0),
        ]
        .iter()
        .enumerate()
        {
            let at = DESC + 16 * (u64::from(first) + i as u64);
            mem.write_obj(*a, GuestAddress(at)).unwrap();
            mem.write_obj(*l, GuestAddress(at + 8)).unwrap();
            mem.write_obj(*f, GuestAddress(at + 12)).unwrap();
            mem.write_obj(*next, GuestAddress(at + 14)).unwrap();
        }
    }
    mem
}

fn bench_backend(c: &mut Criterion, name: &str, backend: Arc<dyn BlockBackend>) {
    let mut g = c.benchmark_group("virtio_blk");
    for (op, t, batch, vic) in [
        ("read4k", 0u32, 1u16, false),
        ("write4k", 1, 1, false),
        ("read4k_qd32", 0, 32, false),
        ("write4k_qd32", 1, 32, false),
        ("read4k_vic", 0, 1, true),
        ("read4k_qd32_vic", 0, 32, true),
    ] {
        let mem = guest_with_chains(t, batch);
        let cfg = BlockConfig {
            coalescing: vic.then(CoalesceParams::default),
            ..Default::default()
        };
        let blk = VirtioBlock::new(backend.clone(), cfg).unwrap();
        let mut q = Queue::new(256).unwrap();
        q.set_size(256);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(true);
        q.set_ready(true);
        let mut h = blk
            .queue_handler(0, q, GuestMemoryAtomic::new(mem.clone()), Arc::new(NoIrq))
            .unwrap();
        let mut idx = 0u16;
        g.throughput(Throughput::Elements(u64::from(batch)));
        g.bench_function(BenchmarkId::new(name, op), |b| {
            b.iter(|| {
                // The driver posts the chains again and notifies.
                for c in 0..batch {
                    mem.write_obj(3 * c, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 256)))
                        .unwrap();
                    idx = idx.wrapping_add(1);
                }
                mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
                h.process_queue();
                black_box(h.inflight());
            })
        });
    }
    g.finish();
}

fn virtio_blk(c: &mut Criterion) {
    bench_backend(
        c,
        "null",
        Arc::new(Inline(NullBackend::new(1 << 30, false))),
    );
    bench_backend(c, "memory", Arc::new(Inline(MemoryBackend::new(1 << 24))));
}

criterion_group!(benches, virtio_blk);
criterion_main!(benches);
