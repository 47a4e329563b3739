//! The virtio-pci transport's config space and BAR register interface under arbitrary accesses.
#![no_main]

use std::sync::Arc;

use iovirt_backend::{Inline, MemoryBackend};
use iovirt_bus::interrupt::test_doubles::{RecordingLine, RecordingMsiSink};
use iovirt_bus::pci::PciFunction;
use iovirt_virtio::block::{BlockConfig, VirtioBlock};
use iovirt_virtio::pci::{VirtioPciDevice, VIRTIO_BAR_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let disk = Arc::new(Inline(MemoryBackend::new(64 * 1024)));
    let blk = VirtioBlock::new(
        disk,
        BlockConfig {
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let mut dev = VirtioPciDevice::new(
        Box::new(blk),
        GuestMemoryAtomic::new(mem),
        Arc::new(RecordingMsiSink::new()),
        Some(Arc::new(RecordingLine::new())),
    )
    .unwrap();
    // Each access: kind, size, offset (2 bytes), value (8 bytes).
    for op in data.chunks_exact(12) {
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let off = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let val = &op[4..4 + len];
        match op[0] % 4 {
            0 => dev.bar_write(0, off % VIRTIO_BAR_SIZE.saturating_sub(len as u64), val),
            1 => {
                let mut b = [0u8; 8];
                dev.bar_read(
                    0,
                    off % VIRTIO_BAR_SIZE.saturating_sub(len as u64),
                    &mut b[..len],
                );
            }
            2 => {
                let l = len.min(4);
                dev.config_write(((off % 256) as u16) & !(l as u16 - 1), &val[..l]);
            }
            _ => {
                let l = len.min(4);
                let mut b = [0u8; 4];
                dev.config_read(((off % 256) as u16) & !(l as u16 - 1), &mut b[..l]);
            }
        }
    }
});
