//! The path IDE bus-master DMA (and every block request) takes:
//! `IoBuffers::from_guest` over a DmaView resolves scatter-gather ranges
//! through the IOMMU, page by page, with the direction's right checked.

use std::sync::Arc;

use iovirt_backend::{Direction, IoBuffers};
use iovirt_iommu::{Attachment, DmaView, Iommu, Perms, RequesterId, WalkConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

#[test]
fn io_buffers_translate_and_check() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let iommu = Arc::new(Iommu::new());
    let ide = RequesterId::new(0, 1, 1); // PIIX IDE function
    iommu.create_domain(2, WalkConfig::FOUR_LEVEL).unwrap();
    iommu.attach(ide, Attachment::Domain(2)).unwrap();
    // Two IOVA-contiguous pages backed by GPA pages in reverse order.
    iommu
        .map(2, 0x10_0000, 0x5_0000, 0x1000, Perms::all())
        .unwrap();
    iommu
        .map(2, 0x10_1000, 0x3_0000, 0x1000, Perms::READ)
        .unwrap();
    mem.write_slice(&[1; 0x1000], GuestAddress(0x5_0000))
        .unwrap();
    mem.write_slice(&[2; 0x1000], GuestAddress(0x3_0000))
        .unwrap();
    let view = Arc::new(DmaView::new(mem.clone(), ide, iommu.clone()));

    // A disk write (device reads memory) across the page boundary.
    let b = IoBuffers::from_guest(
        view.clone(),
        &[(GuestAddress(0x10_0800), 0x1000)],
        Direction::DeviceReads,
    )
    .unwrap();
    assert_eq!(b.segments(), 2);
    let v = b.to_vec();
    assert!(v[..0x800].iter().all(|x| *x == 1) && v[0x800..].iter().all(|x| *x == 2));

    // A disk read (device writes memory) into the read-only page is refused.
    assert!(IoBuffers::from_guest(
        view.clone(),
        &[(GuestAddress(0x10_0800), 0x1000)],
        Direction::DeviceWrites
    )
    .is_err());
    // Into the writable page it lands at the translated address.
    let b = IoBuffers::from_guest(
        view.clone(),
        &[(GuestAddress(0x10_0000), 0x200)],
        Direction::DeviceWrites,
    )
    .unwrap();
    b.copy_from_slice_at(0, &[9; 0x200]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5_01ff)).unwrap(), 9);
    // Unmapped: refused and logged with the IDE function's requester ID.
    assert!(IoBuffers::from_guest(
        view,
        &[(GuestAddress(0x20_0000), 0x200)],
        Direction::DeviceReads
    )
    .is_err());
    let f = iommu.faults().entries();
    assert_eq!(f.len(), 2);
    assert!(f.iter().all(|f| f.rid == ide));
}
