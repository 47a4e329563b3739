//! The daemon's device behind a vhost-user IOTLB, driven in process: a test
//! plays the frontend (memory table, IOTLB updates, ring IOVAs, kicks) and the
//! guest driver (descriptor chains written into guest memory).
//!
//! A DMA outside the guest's mappings (an unmapped buffer, a disk read into a
//! read-only page) completes with VIRTIO_BLK_S_IOERR and is counted and logged
//! as refused; the next valid request works.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iovirt_iommu::Perms;
use iovirt_vhost_user_blk::device::BlkDevice;
use iovirt_vhost_user_blk::disk::DiskSpec;
use iovirt_vhost_user_blk::iotlb::{MemRegion, RingIovas, VhostIotlb, VIRTIO_F_ACCESS_PLATFORM};
use iovirt_virtio::block::BlockConfig;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Keeps the warnings the daemon logs, to check the refused DMA's line.
struct Capture(std::sync::Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line = format!("{} {}", r.level(), r.args());
            eprintln!("{line}");
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }
    fn flush(&self) {}
}

static LOG: Capture = Capture(std::sync::Mutex::new(Vec::new()));

fn logged(needle: &str) -> bool {
    LOG.0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|l| l.contains(needle))
}

/// The frontend's (made-up) virtual address of guest-physical 0.
const UADDR: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
/// IOVA → GPA layout: rings and request headers/status at IOVA 0x10000 (GPA
/// 0x4000, 16 KiB RW), data at IOVA 0x20000 (GPA 0x8000, 4 KiB RW), a
/// read-only page at IOVA 0x22000 (GPA 0xa000); nothing at IOVA 0x30000.
const RING_IOVA: u64 = 0x10000;
const RING_GPA: u64 = 0x4000;
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const HDR: u64 = 0x1000;
const STATUS: u64 = 0x1800;
const DATA_IOVA: u64 = 0x20000;
const DATA_GPA: u64 = 0x8000;
const RO_IOVA: u64 = 0x22000;
const UNMAPPED_IOVA: u64 = 0x30000;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Rig {
    mem: GuestMemoryMmap,
    dev: BlkDevice,
    vring: VringRwLock<Mem>,
    iotlb: Arc<VhostIotlb>,
    next_desc: u16,
    avail_idx: u16,
}

impl Rig {
    fn new() -> Rig {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let iotlb = Arc::new(VhostIotlb::new(Duration::from_millis(50)));
        iotlb.set_regions(vec![MemRegion {
            gpa: 0,
            size: 0x10_0000,
            uaddr: UADDR,
        }]);
        iotlb.set_features(1 << VIRTIO_F_ACCESS_PLATFORM);
        let rw = Perms::READ | Perms::WRITE;
        iotlb
            .update(RING_IOVA, 0x4000, UADDR + RING_GPA, rw)
            .unwrap();
        iotlb
            .update(DATA_IOVA, 0x1000, UADDR + DATA_GPA, rw)
            .unwrap();
        iotlb
            .update(RO_IOVA, 0x1000, UADDR + 0xa000, Perms::READ)
            .unwrap();
        iotlb.set_ring(
            0,
            RingIovas {
                desc: RING_IOVA + DESC,
                avail: RING_IOVA + AVAIL,
                used: RING_IOVA + USED,
            },
        );
        let disk = "memory,size=1M"
            .parse::<DiskSpec>()
            .unwrap()
            .open()
            .unwrap();
        let dev = BlkDevice::new(disk, BlockConfig::default(), atomic.clone(), Duration::ZERO)
            .unwrap()
            .with_iotlb(iotlb.clone());
        assert_ne!(dev.features() & (1 << VIRTIO_F_ACCESS_PLATFORM), 0);
        let vring = VringRwLock::new(atomic, 256).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        Rig {
            mem,
            dev,
            vring,
            iotlb,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    fn desc(&mut self, addr: u64, len: u32, flags: u16) -> u16 {
        let i = self.next_desc;
        self.next_desc = (i + 1) % QSIZE;
        let at = GuestAddress(RING_GPA + DESC + u64::from(i) * 16);
        let next = if flags & F_NEXT != 0 {
            (i + 1) % QSIZE
        } else {
            0
        };
        self.mem.write_obj(addr.to_le(), at).unwrap();
        self.mem
            .write_obj(len.to_le(), at.unchecked_add(8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), at.unchecked_add(12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), at.unchecked_add(14))
            .unwrap();
        i
    }

    /// Post a request of `kind` at `sector` with one data buffer; returns the
    /// status byte the device wrote once the request is used.
    fn request(&mut self, n: u64, kind: u32, sector: u64, data: u64, len: u32) -> u8 {
        let hdr = HDR + n * 16;
        let status = STATUS + n;
        let hgpa = GuestAddress(RING_GPA + hdr);
        self.mem.write_obj(kind.to_le(), hgpa).unwrap();
        self.mem.write_obj(0u32, hgpa.unchecked_add(4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), hgpa.unchecked_add(8))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(RING_GPA + status))
            .unwrap();
        let head = self.desc(RING_IOVA + hdr, 16, F_NEXT);
        let dir = if kind == T_IN { F_WRITE } else { 0 };
        self.desc(data, len, F_NEXT | dir);
        self.desc(RING_IOVA + status, 1, F_WRITE);
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(RING_GPA + AVAIL + 4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(RING_GPA + AVAIL + 2))
            .unwrap();
        // The kick, then completions until the request is used.
        let vrings = [self.vring.clone()];
        self.dev.handle_event(0, EventSet::IN, &vrings, 0).unwrap();
        let t = Instant::now();
        loop {
            let used: u16 = self
                .mem
                .read_obj(GuestAddress(RING_GPA + USED + 2))
                .unwrap();
            if u16::from_le(used) == self.avail_idx {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "request not used");
            let ev = self.dev.completion_event_id() as u16;
            self.dev.handle_event(ev, EventSet::IN, &vrings, 0).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.mem.read_obj(GuestAddress(RING_GPA + status)).unwrap()
    }
}

#[test]
fn dma_outside_the_mappings_is_refused_and_the_device_goes_on() {
    if log::set_logger(&LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let mut r = Rig::new();

    // A disk read into an IOVA nobody mapped: refused, I/O error.
    assert_eq!(r.request(0, T_IN, 0, UNMAPPED_IOVA, 512), S_IOERR);
    let refused = r.iotlb.counters().refused;
    assert!(refused >= 1, "the refused DMA was not reported");
    assert!(logged("DMA refused"), "no log line for the refused DMA");
    assert!(
        logged("IOVA 0x30000"),
        "the log line does not name the IOVA"
    );

    // The next valid request works: write a pattern through translated DMA...
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    r.mem.write_slice(&pattern, GuestAddress(DATA_GPA)).unwrap();
    assert_eq!(r.request(1, T_OUT, 8, DATA_IOVA, 512), S_OK);
    // ... and read it back elsewhere in the mapped page.
    assert_eq!(r.request(2, T_IN, 8, DATA_IOVA + 0x200, 512), S_OK);
    let mut back = vec![0u8; 512];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA_GPA + 0x200))
        .unwrap();
    assert_eq!(back, pattern);

    // A disk read into a read-only mapping: refused too; the page is untouched.
    assert_eq!(r.request(3, T_IN, 8, RO_IOVA, 512), S_IOERR);
    let mut ro = vec![0u8; 512];
    r.mem.read_slice(&mut ro, GuestAddress(0xa000)).unwrap();
    assert!(ro.iter().all(|&b| b == 0));
    assert!(r.iotlb.counters().refused > refused);

    // Once the frontend invalidates the data page, a request using it fails...
    r.iotlb.invalidate(DATA_IOVA, 0x1000);
    assert_eq!(r.request(4, T_OUT, 8, DATA_IOVA, 512), S_IOERR);
    // ... and works again after the frontend maps it anew.
    r.iotlb
        .update(DATA_IOVA, 0x1000, UADDR + DATA_GPA, Perms::READ)
        .unwrap();
    assert_eq!(r.request(5, T_OUT, 8, DATA_IOVA, 512), S_OK);
}
