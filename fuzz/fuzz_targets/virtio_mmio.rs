//! The virtio-mmio transport's register interface under arbitrary accesses.
#![no_main]

use std::sync::Arc;

use iovirt_backend::{Inline, MemoryBackend};
use iovirt_bus::interrupt::test_doubles::RecordingLine;
use iovirt_bus::BusDeviceMut;
use iovirt_virtio::block::{BlockConfig, VirtioBlock};
use iovirt_virtio::mmio::{MmioInterruptMode, VirtioMmioDevice, MMIO_WINDOW_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let disk = Arc::new(Inline(MemoryBackend::new(64 * 1024)));
    let blk = VirtioBlock::new(disk, BlockConfig::default()).unwrap();
    let mut dev = VirtioMmioDevice::new(
        Box::new(blk),
        GuestMemoryAtomic::new(mem),
        Arc::new(RecordingLine::new()),
        MmioInterruptMode::Level,
    )
    .unwrap();
    for op in data.chunks_exact(8) {
        let len = [1usize, 2, 4, 4][usize::from(op[1] & 3)];
        let off = u64::from(u16::from_le_bytes([op[2], op[3]])) % (MMIO_WINDOW_SIZE - len as u64);
        if op[0] & 1 == 0 {
            dev.write(off, &op[4..4 + len]);
        } else {
            let mut b = [0u8; 4];
            dev.read(off, &mut b[..len]);
        }
    }
});
