//! virtio-blk request handling from an arbitrary descriptor table, avail ring and guest memory.
#![no_main]

use std::sync::Arc;

use iovirt_backend::{Inline, MemoryBackend};
use iovirt_bus::InterruptError;
use iovirt_virtio::block::{BlockConfig, VirtioBlock};
use iovirt_virtio::VirtioInterrupt;
use libfuzzer_sys::fuzz_target;
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

const MEM_SIZE: usize = 0x10000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let flags = data[0];
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    // The input is guest memory: descriptor table at 0, avail ring at 0x100, used ring at 0x200.
    let n = (data.len() - 1).min(MEM_SIZE);
    mem.write_slice(&data[1..1 + n], GuestAddress(0)).unwrap();
    let disk = Arc::new(Inline(MemoryBackend::new(64 * 1024)));
    let blk = VirtioBlock::new(
        disk,
        BlockConfig {
            seg_max: 8,
            ..Default::default()
        },
    )
    .unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    let mut h = blk
        .queue_handler(0, q, GuestMemoryAtomic::new(mem), Arc::new(NoIrq))
        .unwrap();
    h.process_queue();
    h.process_completions();
});
