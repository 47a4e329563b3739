//! virtio-blk request handling driven by virtio-queue's mock driver.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use iovirt_backend::{Inline, MemoryBackend};
use iovirt_bus::InterruptError;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::request::*;
use super::*;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const USED: u64 = 0x8000;

#[derive(Default)]
struct CountingIrq(AtomicU32);
impl VirtioInterrupt for CountingIrq {
    fn signal_used_queue(&self, _q: u16) -> Result<(), InterruptError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    disk: Arc<Inline<MemoryBackend>>,
    irq: Arc<CountingIrq>,
    next_desc: std::cell::Cell<u16>,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        MEM.with(|m| *m.borrow_mut() = Some(mem.clone()));
        Rig {
            mem,
            disk: Arc::new(Inline(MemoryBackend::new(1 << 20))),
            irq: Arc::new(CountingIrq::default()),
            next_desc: std::cell::Cell::new(0),
        }
    }

    fn handler(
        &self,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        event_idx: bool,
    ) -> QueueHandler<GuestMemoryMmap> {
        let blk = VirtioBlock::new(
            self.disk.clone(),
            BlockConfig {
                serial: b"serial-0123456789abcdef".to_vec(),
                seg_max: 4,
                ..Default::default()
            },
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        // The mock's used ring overlaps its avail ring's tail; keep ours apart.
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(event_idx);
        blk.queue_handler(
            0,
            q,
            GuestMemoryAtomic::new(self.mem.clone()),
            self.irq.clone(),
        )
        .unwrap()
    }

    /// Put a chain of (addr, len, device-writable) on the avail ring.
    fn push(&self, vq: &MockSplitQueue<GuestMemoryMmap>, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc.get();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, w))| {
                let mut flags = if w { F_WRITE } else { 0 };
                if i + 1 < descs.len() {
                    flags |= F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(a, l, flags, head + i as u16 + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, head).unwrap();
        self.next_desc.set(head + descs.len() as u16);
        head
    }

    fn header(&self, t: u32, sector: u64) {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&t.to_le_bytes());
        b[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&b, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
}

/// Element `i` of the used ring: (id, len).
fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let m = vq_mem(vq);
    let a = USED + 4 + 8 * i as u64;
    (
        m.read_obj(GuestAddress(a)).unwrap(),
        m.read_obj(GuestAddress(a + 4)).unwrap(),
    )
}

fn used_idx(vq: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    vq_mem(vq).read_obj(GuestAddress(USED + 2)).unwrap()
}

thread_local! {
    static MEM: std::cell::RefCell<Option<GuestMemoryMmap>> = const { std::cell::RefCell::new(None) };
}

fn vq_mem(_vq: &MockSplitQueue<GuestMemoryMmap>) -> GuestMemoryMmap {
    MEM.with(|m| m.borrow().clone().unwrap())
}

#[test]
fn write_read_flush_getid_round_trips() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, false);
    // Write 1 KiB at sector 4 from two descriptors.
    r.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();
    r.header(VIRTIO_BLK_T_OUT, 4);
    r.push(
        &vq,
        &[
            (HDR, 16, false),
            (DATA, 512, false),
            (DATA + 512, 512, false),
            (STATUS, 1, true),
        ],
    );
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 0), (0, 1));
    assert_eq!(&r.disk.0.contents()[2048..3072], &[0x5a; 1024][..]);
    // Read it back elsewhere.
    r.header(VIRTIO_BLK_T_IN, 4);
    let head = r.push(
        &vq,
        &[
            (HDR, 16, false),
            (DATA + 0x1000, 1024, true),
            (STATUS, 1, true),
        ],
    );
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 1), (u32::from(head), 1025));
    let mut back = [0u8; 1024];
    r.mem
        .read_slice(&mut back, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(back, [0x5a; 1024]);
    // Flush.
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 2).1, 1);
    // GET_ID: 20 bytes of the serial.
    r.header(VIRTIO_BLK_T_GET_ID, 0);
    r.push(
        &vq,
        &[
            (HDR, 16, false),
            (DATA + 0x2000, 20, true),
            (STATUS, 1, true),
        ],
    );
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 3).1, 21);
    let mut id = [0u8; 20];
    r.mem
        .read_slice(&mut id, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(&id, b"serial-0123456789abc");
    assert_eq!(used_idx(&vq), 4);
    assert_eq!(h.inflight(), 0);
    assert_eq!(r.irq.0.load(Ordering::SeqCst), 4);
}

fn segment(sector: u64, n: u32, flags: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..12].copy_from_slice(&n.to_le_bytes());
    b[12..16].copy_from_slice(&flags.to_le_bytes());
    b
}

#[test]
fn discard_and_write_zeroes() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, false);
    r.mem
        .write_slice(&[0xee; 4096], GuestAddress(DATA))
        .unwrap();
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.push(
        &vq,
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
    );
    h.process_queue();
    // Two discard segments: sectors 0..1 and 2..3.
    let mut segs = segment(0, 1, 0).to_vec();
    segs.extend_from_slice(&segment(2, 1, 0));
    r.mem
        .write_slice(&segs, GuestAddress(DATA + 0x4000))
        .unwrap();
    r.header(VIRTIO_BLK_T_DISCARD, 0);
    r.push(
        &vq,
        &[
            (HDR, 16, false),
            (DATA + 0x4000, 32, false),
            (STATUS, 1, true),
        ],
    );
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 1).1, 1);
    let c = r.disk.0.contents();
    assert_eq!(&c[0..512], &[0; 512][..]);
    assert_eq!(&c[512..1024], &[0xee; 512][..]);
    assert_eq!(&c[1024..1536], &[0; 512][..]);
    // Write zeroes with UNMAP on sector 7.
    r.mem
        .write_slice(&segment(7, 1, 1), GuestAddress(DATA + 0x4000))
        .unwrap();
    r.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    r.push(
        &vq,
        &[
            (HDR, 16, false),
            (DATA + 0x4000, 16, false),
            (STATUS, 1, true),
        ],
    );
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(&r.disk.0.contents()[3584..4096], &[0; 512][..]);
    // Discard with the unmap flag: UNSUPP.
    r.mem
        .write_slice(&segment(0, 1, 1), GuestAddress(DATA + 0x4000))
        .unwrap();
    r.header(VIRTIO_BLK_T_DISCARD, 0);
    r.push(
        &vq,
        &[
            (HDR, 16, false),
            (DATA + 0x4000, 16, false),
            (STATUS, 1, true),
        ],
    );
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_UNSUPP);
}

/// Each malformed form: (chain, expected status or None when it cannot be written, used len).
#[test]
fn malformed_requests_get_status_and_used_len() {
    let cap = (1u64 << 20) / 512;
    type Case = (
        &'static str,
        u32,
        u64,
        Vec<(u64, u32, bool)>,
        Option<u8>,
        u32,
    );
    let cases: Vec<Case> = vec![
        (
            "header only, readable",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false)],
            None,
            0,
        ),
        (
            "status only",
            VIRTIO_BLK_T_IN,
            0,
            vec![(STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "read without data",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "header too small",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "header writable",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "header unreadable",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (0x1000_0000, 16, false),
                (DATA, 512, true),
                (STATUS, 1, true),
            ],
            Some(1),
            1,
        ),
        (
            "status not writable",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)],
            None,
            0,
        ),
        (
            "status empty",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)],
            None,
            0,
        ),
        (
            "read into readable",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "write from writable",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "get-id into readable",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![(HDR, 16, false), (DATA, 20, false), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "odd length",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 500, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "past the end",
            VIRTIO_BLK_T_IN,
            cap,
            vec![(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_OUT,
            u64::MAX,
            vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "too many segments",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                (HDR, 16, false),
                (DATA, 512, true),
                (DATA, 512, true),
                (DATA, 512, true),
                (DATA, 512, true),
                (DATA, 512, true),
                (STATUS, 1, true),
            ],
            Some(1),
            1,
        ),
        (
            "segment too large",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (DATA, 2 << 20, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![(HDR, 16, false), (0x3f_ff00, 512, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "flush with data",
            VIRTIO_BLK_T_FLUSH,
            0,
            vec![(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "unknown type",
            99,
            0,
            vec![(HDR, 16, false), (STATUS, 1, true)],
            Some(2),
            1,
        ),
        (
            "discard bad array",
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "discard into writable",
            VIRTIO_BLK_T_DISCARD,
            0,
            vec![(HDR, 16, false), (DATA, 16, true), (STATUS, 1, true)],
            Some(1),
            1,
        ),
        (
            "write-zeroes out of range",
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            vec![
                (HDR, 16, false),
                (DATA + 0x8000, 16, false),
                (STATUS, 1, true),
            ],
            Some(1),
            1,
        ),
    ];
    for (name, t, sector, chain, want_status, want_len) in cases {
        let r = Rig::new();
        let vq = MockSplitQueue::new(&r.mem, 16);
        let mut h = r.handler(&vq, false);
        r.header(t, sector);
        r.mem
            .write_slice(&segment(cap, 1, 0), GuestAddress(DATA + 0x8000))
            .unwrap();
        r.push(&vq, &chain);
        h.process_queue();
        assert_eq!(used_idx(&vq), 1, "{name}: chain must be used");
        assert_eq!(used(&vq, 0), (0, want_len), "{name}: used len");
        match want_status {
            Some(s) if chain.last().is_some_and(|d| d.0 == STATUS) => {
                assert_eq!(r.status(), s, "{name}: status")
            }
            Some(s) => {
                let got: u8 = r
                    .mem
                    .read_obj(GuestAddress(chain.last().unwrap().0))
                    .unwrap();
                assert_eq!(got, s, "{name}: status")
            }
            None => assert_eq!(r.status(), 0xff, "{name}: no status written"),
        }
    }
}

#[test]
fn parse_errors_are_typed() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let limits = RequestLimits {
        capacity_sectors: 8,
        seg_max: 2,
        size_max: 4096,
        discard: false,
        max_discard_sectors: 0,
        max_discard_seg: 0,
        write_zeroes: false,
        max_write_zeroes_sectors: 0,
        max_write_zeroes_seg: 0,
    };
    let d = |a, l, f| SplitDescriptor::new(a, l, f, 0);
    assert_eq!(
        parse_request(&[], &mem, &limits).unwrap_err().error,
        RequestError::EmptyChain
    );
    mem.write_slice(&VIRTIO_BLK_T_DISCARD.to_le_bytes(), GuestAddress(HDR))
        .unwrap();
    let e = parse_request(
        &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, F_WRITE)],
        &mem,
        &limits,
    )
    .unwrap_err();
    assert_eq!(
        e.error,
        RequestError::UnsupportedType(VIRTIO_BLK_T_DISCARD),
        "discard not offered"
    );
    assert_eq!(e.status, Some(GuestAddress(STATUS)));
    let e = parse_request(&[d(HDR, 16, 0), d(u64::MAX, 2, F_WRITE)], &mem, &limits).unwrap_err();
    assert_eq!(e.error, RequestError::StatusAddress(u64::MAX));
}

#[test]
fn event_idx_suppresses_interrupts() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, true);
    // used_event lives after the avail ring: avail + 4 + 2 * size.
    let used_event = vq.avail_addr().0 + 4 + 2 * 16;
    r.mem
        .write_obj(5u16.to_le(), GuestAddress(used_event))
        .unwrap();
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..3 {
        r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
        h.process_queue();
    }
    assert_eq!(used_idx(&vq), 3);
    assert_eq!(
        r.irq.0.load(Ordering::SeqCst),
        0,
        "used_event 5 not crossed"
    );
    for _ in 0..3 {
        r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
        h.process_queue();
    }
    assert_eq!(
        r.irq.0.load(Ordering::SeqCst),
        1,
        "crossing used_event 5 signals once"
    );
    // Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses.
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, false);
    r.mem.write_obj(1u16.to_le(), vq.avail_addr()).unwrap();
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    h.process_queue();
    assert_eq!(used_idx(&vq), 1);
    assert_eq!(r.irq.0.load(Ordering::SeqCst), 0);
}

#[test]
fn indirect_chain_is_followed() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, false);
    // A read through an indirect table of three descriptors.
    let table = 0x38_0000u64;
    let descs = [
        SplitDescriptor::new(HDR, 16, F_NEXT, 1),
        SplitDescriptor::new(DATA, 512, F_NEXT | F_WRITE, 2),
        SplitDescriptor::new(STATUS, 1, F_WRITE, 0),
    ];
    for (i, d) in descs.iter().enumerate() {
        r.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    r.header(VIRTIO_BLK_T_IN, 0);
    let head = RawDescriptor::from(SplitDescriptor::new(table, 48, 4, 0));
    vq.add_desc_chains(&[head], 0).unwrap();
    h.process_queue();
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 0), (0, 513));
    // An indirect table outside guest memory: completed with used length 0.
    let bad = RawDescriptor::from(SplitDescriptor::new(0x1000_0000, 48, 4, 0));
    vq.add_desc_chains(&[bad], 1).unwrap();
    h.process_queue();
    assert_eq!(used_idx(&vq), 2);
    assert_eq!(used(&vq, 1), (1, 0));
}

#[test]
fn inline_completions_skip_the_event_and_signal_batches_signal_early() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, false);
    h.set_signal_batch(1);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..3 {
        r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    h.process_queue();
    assert_eq!(used_idx(&vq), 3);
    assert_eq!(
        (0..3).map(|i| used(&vq, i).1).collect::<Vec<_>>(),
        [1, 1, 1]
    );
    // No EVENT_IDX and no NO_INTERRUPT flag: one interrupt per chain.
    assert_eq!(r.irq.0.load(Ordering::SeqCst), 3);
    // The inline back-end completed inside submit: no wake-up was written.
    assert!(h.completion_event().read().is_err());

    // Polling mode: chains are started without re-enabling notifications.
    r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    h.disable_notification();
    h.set_polling(true);
    assert!(h.has_available());
    assert_eq!(h.poll_queue(), 1);
    assert!(!h.has_available());
    h.set_polling(false);
    assert!(!h.enable_notification());
    assert_eq!(used_idx(&vq), 4);
    assert_eq!(h.inflight(), 0);
    assert_eq!(h.into_queue().next_used(), 4);
}

#[test]
fn completions_on_other_threads_write_the_event() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let pool = iovirt_backend::ThreadPool::new(MemoryBackend::new(1 << 20), 2, "blk-test").unwrap();
    let blk = VirtioBlock::new(Arc::new(pool), BlockConfig::default()).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
    let mut h = blk
        .queue_handler(0, q, GuestMemoryAtomic::new(r.mem.clone()), r.irq.clone())
        .unwrap();
    r.mem.write_slice(&[7; 512], GuestAddress(DATA)).unwrap();
    r.header(VIRTIO_BLK_T_OUT, 1);
    r.push(
        &vq,
        &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    h.process_queue();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.completion_event().read().is_err() {
        assert!(std::time::Instant::now() < deadline, "no completion event");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    h.process_completions();
    assert_eq!(h.inflight(), 0);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK);
    assert_eq!(used(&vq, 0), (0, 1));
}
