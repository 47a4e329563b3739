//! virtio-blk (iovirt-virtio's QueueHandler driven by virtio-queue's mock
//! driver) doing its DMA through a DmaView: demand-populated guest memory
//! paged in by the fault hook, and translated DMA refused outside the
//! device's mappings.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use iovirt_backend::{Inline, MemoryBackend};
use iovirt_bus::InterruptError;
use iovirt_iommu::demand::{DemandPaging, PageSource};
use iovirt_iommu::{Attachment, DmaView, FaultReason, Iommu, Perms, RequesterId, WalkConfig};
use iovirt_virtio::block::{BlockConfig, VirtioBlock};
use iovirt_virtio::VirtioInterrupt;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const USED: u64 = 0x8000;
const DEMAND: u64 = 0x20_0000; // demand-populated: 0x20_0000..0x40_0000
const OUT: u32 = 1;
const IN: u32 = 0;

#[derive(Default)]
struct Irq(AtomicU32);
impl VirtioInterrupt for Irq {
    fn signal_used_queue(&self, _q: u16) -> Result<(), InterruptError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// The backing store: every byte of page p reads as p's low byte.
struct Pattern;
impl PageSource for Pattern {
    fn fill(&self, gpa: u64, page: &mut [u8]) -> std::io::Result<()> {
        page.fill((gpa >> 12) as u8);
        Ok(())
    }
}

fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&t.to_le_bytes());
    b[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&b, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn chain(
    vq: &MockSplitQueue<GuestMemoryMmap>,
    head: u16,
    data: u64,
    len: u32,
    device_writes: bool,
) {
    let descs = [
        (HDR, 16, false),
        (data, len, device_writes),
        (STATUS, 1, true),
    ];
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(a, l, w))| {
            let mut flags = if w { 2 } else { 0 };
            if i + 1 < descs.len() {
                flags |= 1;
            }
            RawDescriptor::from(SplitDescriptor::new(a, l, flags, head + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, head).unwrap();
}

fn queue(vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    q
}

#[test]
fn demand_populated_memory_under_virtio_blk() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let pager = Arc::new(DemandPaging::new(
        mem.clone(),
        DEMAND,
        0x20_0000,
        Arc::new(Pattern),
    ));
    let view =
        DmaView::untranslated(mem.clone(), RequesterId::new(0, 4, 0)).with_hook(pager.clone());
    let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
    let blk = VirtioBlock::new(disk.clone(), BlockConfig::default()).unwrap();
    let irq = Arc::new(Irq::default());
    let mut h = blk
        .queue_handler(0, queue(&vq), GuestMemoryAtomic::new(view), irq.clone())
        .unwrap();

    // A disk write from two pages the guest never populated: the device's
    // read of guest memory faults, the hook pages them in, the write proceeds.
    header(&mem, OUT, 0);
    chain(&vq, 0, DEMAND + 0x3000, 0x2000, false);
    h.process_queue();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
    assert_eq!(pager.fills(), 2);
    let d = disk.0.contents();
    assert!(d[..0x1000].iter().all(|b| *b == 0x03));
    assert!(d[0x1000..0x2000].iter().all(|b| *b == 0x04));

    // A disk read into a page not yet present: populated first (so the parts
    // the device does not overwrite hold the backing store), then written.
    header(&mem, IN, 0);
    chain(&vq, 3, DEMAND + 0x10_0000, 0x200, true);
    h.process_queue();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(pager.fills(), 3);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DEMAND + 0x10_0000))
            .unwrap(),
        0x03
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DEMAND + 0x10_0200))
            .unwrap(),
        0x00
    );

    // Present pages are not filled again.
    header(&mem, OUT, 8);
    chain(&vq, 6, DEMAND + 0x3000, 0x1000, false);
    h.process_queue();
    assert_eq!(pager.fills(), 3);
    assert!(irq.0.load(Ordering::SeqCst) >= 3);
}

#[test]
fn translated_virtio_blk_refuses_unmapped_buffers() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let iommu = Arc::new(Iommu::new());
    let rid = RequesterId::new(0, 4, 0);
    iommu.create_domain(1, WalkConfig::FOUR_LEVEL).unwrap();
    iommu.attach(rid, Attachment::Domain(1)).unwrap();
    // Identity-map the rings, header and status; map one data page.
    iommu.map(1, 0, 0, 0x10_2000, Perms::all()).unwrap();
    iommu
        .map(1, 0x20_0000, 0x20_0000, 0x1000, Perms::READ)
        .unwrap();
    let view = DmaView::new(mem.clone(), rid, iommu.clone());
    let disk = Arc::new(Inline(MemoryBackend::new(1 << 20)));
    let blk = VirtioBlock::new(disk.clone(), BlockConfig::default()).unwrap();
    let mut h = blk
        .queue_handler(
            0,
            queue(&vq),
            GuestMemoryAtomic::new(view),
            Arc::new(Irq::default()),
        )
        .unwrap();

    mem.write_slice(&[0xab; 0x1000], GuestAddress(0x20_0000))
        .unwrap();
    header(&mem, OUT, 0);
    chain(&vq, 0, 0x20_0000, 0x1000, false);
    h.process_queue();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(disk.0.contents()[0], 0xab);

    // A disk read into the read-only page: the device may not write it.
    header(&mem, IN, 0);
    chain(&vq, 3, 0x20_0000, 0x200, true);
    h.process_queue();
    assert_ne!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    // A buffer outside every mapping.
    header(&mem, OUT, 0);
    chain(&vq, 6, 0x30_0000, 0x200, false);
    h.process_queue();
    assert_ne!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let reasons: Vec<_> = iommu
        .faults()
        .entries()
        .iter()
        .map(|f| (f.reason, f.iova))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (FaultReason::WriteDenied, 0x20_0000),
            (FaultReason::ReadDenied, 0x30_0000)
        ]
    );
}
