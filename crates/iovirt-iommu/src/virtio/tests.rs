//! The request and event sequences Linux's virtio-iommu driver
//! (drivers/iommu/virtio-iommu.c) issues, over virtio-queue's mock driver.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use iovirt_bus::InterruptError;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::view::DmaView;

const REQQ: u64 = 0x1_0000;
const EVQ: u64 = 0x2_0000;
const REQ_BUF: u64 = 0x3_0000;
const TAIL_BUF: u64 = 0x3_1000;
const EV_BUF: u64 = 0x4_0000;
const DATA: u64 = 0x10_0000;

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

fn queue_of(vq: &MockSplitQueue<GuestMemoryMmap>, used: u64) -> Queue {
    let mut q: Queue = vq.create_queue().unwrap();
    q.try_set_used_ring_address(GuestAddress(used)).unwrap();
    q
}

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    next: u16,
    used: u64,
}

impl<'a> Driver<'a> {
    /// viommu_send_req_sync: request readable, tail (or properties + tail) writable.
    fn push(&mut self, req: &[u8], wlen: u32) {
        self.mem.write_slice(req, GuestAddress(REQ_BUF)).unwrap();
        self.mem
            .write_slice(&vec![0xee; wlen as usize], GuestAddress(TAIL_BUF))
            .unwrap();
        let head = self.next;
        let d = [
            SplitDescriptor::new(REQ_BUF, req.len() as u32, 1, head + 1),
            SplitDescriptor::new(TAIL_BUF, wlen, 2, 0),
        ];
        let raw: Vec<RawDescriptor> = d.iter().map(|d| RawDescriptor::from(*d)).collect();
        self.vq.add_desc_chains(&raw, head).unwrap();
        self.next = (self.next + 2) % 16;
    }
    fn status(&self, wlen: u32) -> u8 {
        self.mem
            .read_obj(GuestAddress(TAIL_BUF + u64::from(wlen) - 4))
            .unwrap()
    }
    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
}

fn send(d: &mut Driver, b: &Mutex<Backend>, q: &mut Queue, r: Request) -> u8 {
    d.push(&r.emit(), 4);
    assert_eq!(process_requests(b, 512, q, d.mem), 1);
    d.status(4)
}

#[test]
fn linux_probe_attach_map_unmap() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let dev = VirtioIommu::<GuestMemoryMmap>::new(VirtioIommuConfig::default());
    let ep = RequesterId::new(0, 4, 0);
    dev.add_endpoint(ep);
    let e = u32::from(ep.0);
    // viommu_probe: the config space.
    let mut c = [0u8; 8];
    VirtioDevice::<GuestMemoryMmap>::read_config(&dev, 0, &mut c);
    assert_eq!(u64::from_le_bytes(c), !0xfff);
    VirtioDevice::<GuestMemoryMmap>::read_config(&dev, 16, &mut c);
    assert_eq!(u64::from_le_bytes(c), (1 << 48) - 1);
    let mut p = [0u8; 4];
    VirtioDevice::<GuestMemoryMmap>::read_config(&dev, 32, &mut p);
    assert_eq!(u32::from_le_bytes(p), 512);

    let mut d = Driver {
        mem: &mem,
        vq: MockSplitQueue::create(&mem, GuestAddress(REQQ), 16),
        next: 0,
        used: REQQ + 0x800,
    };
    let mut q = queue_of(&d.vq, d.used);
    let b = &dev.backend;

    // viommu_probe_endpoint: PROBE with a 512-byte property buffer.
    d.push(&Request::Probe { endpoint: e }.emit(), 512 + 4);
    assert_eq!(process_requests(b, 512, &mut q, &mem), 1);
    assert_eq!(d.status(516), 0);
    let mut prop = [0u8; 24];
    mem.read_slice(&mut prop, GuestAddress(TAIL_BUF)).unwrap();
    assert_eq!(
        prop,
        resv_mem_property(RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff)
    );
    assert_eq!(d.used_idx(), 1);

    // viommu_attach_dev, viommu_map_pages, DMA, viommu_unmap_pages.
    assert_eq!(
        send(
            &mut d,
            b,
            &mut q,
            Request::Attach {
                domain: 1,
                endpoint: e,
                flags: 0
            }
        ),
        0
    );
    let map = Request::Map {
        domain: 1,
        virt_start: 0xffff_0000,
        virt_end: 0xffff_1fff,
        phys_start: DATA,
        flags: MAP_F_READ | MAP_F_WRITE,
    };
    assert_eq!(send(&mut d, b, &mut q, map), 0);
    let view = DmaView::new(mem.clone(), ep, dev.iommu().clone());
    view.write_obj(0x5au8, GuestAddress(0xffff_1001)).unwrap();
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 0x1001)).unwrap(),
        0x5a
    );
    // Overlapping map, misaligned map, unknown domain, unknown endpoint, bad type.
    assert_eq!(send(&mut d, b, &mut q, map), Status::Inval.code());
    let bad = Request::Map {
        domain: 1,
        virt_start: 0x1001,
        virt_end: 0x1fff,
        phys_start: 0,
        flags: 1,
    };
    assert_eq!(send(&mut d, b, &mut q, bad), Status::Range.code());
    let nodom = Request::Map {
        domain: 9,
        virt_start: 0,
        virt_end: 0xfff,
        phys_start: 0,
        flags: 1,
    };
    assert_eq!(send(&mut d, b, &mut q, nodom), Status::NoEnt.code());
    assert_eq!(
        send(
            &mut d,
            b,
            &mut q,
            Request::Attach {
                domain: 1,
                endpoint: 0x99,
                flags: 0
            }
        ),
        Status::NoEnt.code()
    );
    d.push(&[9, 0, 0, 0], 4);
    process_requests(b, 512, &mut q, &mem);
    assert_eq!(d.status(4), Status::Unsupp.code());
    // Unmapping half of a mapping is refused; the whole of it works.
    let half = Request::Unmap {
        domain: 1,
        virt_start: 0xffff_0000,
        virt_end: 0xffff_0fff,
    };
    assert_eq!(send(&mut d, b, &mut q, half), Status::Range.code());
    let all = Request::Unmap {
        domain: 1,
        virt_start: 0,
        virt_end: u64::MAX,
    };
    assert_eq!(send(&mut d, b, &mut q, all), 0);
    assert!(view.read_obj::<u8>(GuestAddress(0xffff_1001)).is_err());
    // Detach: the domain goes away with the last endpoint; DMA is blocked.
    assert_eq!(
        send(
            &mut d,
            b,
            &mut q,
            Request::Detach {
                domain: 1,
                endpoint: e
            }
        ),
        0
    );
    assert_eq!(send(&mut d, b, &mut q, nodom), Status::NoEnt.code());
    assert_eq!(dev.iommu().attachment(ep), None);
    // A tail buffer too small for the status gets nothing written.
    d.push(&Request::Probe { endpoint: e }.emit(), 2);
    process_requests(b, 512, &mut q, &mem);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(TAIL_BUF)).unwrap(), 0xee);
}

#[test]
fn faults_reach_the_event_queue() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut dev = VirtioIommu::<GuestMemoryMmap>::new(VirtioIommuConfig::default());
    let ep = RequesterId::new(0, 4, 0);
    dev.add_endpoint(ep);
    let reqq = MockSplitQueue::create(&mem, GuestAddress(REQQ), 16);
    let evq = MockSplitQueue::create(&mem, GuestAddress(EVQ), 16);
    // viommu_fill_evtq: writable 24-byte buffers.
    let raw: Vec<RawDescriptor> = (0..4u16)
        .map(|i| RawDescriptor::from(SplitDescriptor::new(EV_BUF + u64::from(i) * 32, 24, 2, 0)))
        .collect();
    for (i, r) in raw.iter().enumerate() {
        evq.add_desc_chains(std::slice::from_ref(r), i as u16)
            .unwrap();
    }
    let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = Arc::new(Irq::default());
    dev.activate(
        GuestMemoryAtomic::new(mem.clone()),
        0,
        vec![
            ActiveQueue {
                index: 0,
                queue: queue_of(&reqq, REQQ + 0x800),
                notify: notify.clone(),
            },
            ActiveQueue {
                index: 1,
                queue: queue_of(&evq, EVQ + 0x800),
                notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            },
        ],
        irq.clone(),
    )
    .unwrap();
    // ATTACH through the worker thread.
    let mut d = Driver {
        mem: &mem,
        vq: reqq,
        next: 0,
        used: REQQ + 0x800,
    };
    d.push(
        &Request::Attach {
            domain: 3,
            endpoint: u32::from(ep.0),
            flags: 0,
        }
        .emit(),
        4,
    );
    notify.write(1).unwrap();
    let t = Instant::now();
    while d.used_idx() != 1 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.status(4), 0);
    // A DMA to an unmapped IOVA: refused, and reported on the event queue.
    let view = DmaView::new(mem.clone(), ep, dev.iommu().clone());
    assert!(view.write_obj(1u32, GuestAddress(0x1234_5678)).is_err());
    let mut ev = [0u8; 24];
    mem.read_slice(&mut ev, GuestAddress(EV_BUF)).unwrap();
    assert_eq!(
        ev,
        fault_event(
            FAULT_R_MAPPING,
            FAULT_F_WRITE | FAULT_F_ADDRESS,
            u32::from(ep.0),
            0x1234_5678
        )
    );
    assert_eq!(dev.events().sent(), 1);
    assert!(irq.0.load(Ordering::SeqCst) >= 2);
    dev.reset();
    assert_eq!(dev.iommu().attachment(ep), None);
}
