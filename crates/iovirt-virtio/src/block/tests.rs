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
fn a_broken_avail_index_is_nothing_to_poll() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut h = r.handler(&vq, false);
    // The driver claims 21 new chains on a 16-entry queue.
    r.mem
        .write_obj(21u16.to_le(), GuestAddress(vq.avail_addr().0 + 2))
        .unwrap();
    // A polling owner finds nothing to do and may sleep (it used to spin:
    // has_available said yes, and re-enabling kicks said more had arrived).
    assert!(!h.has_available());
    h.disable_notification();
    h.set_polling(true);
    assert_eq!(h.poll_queue(), 0);
    h.set_polling(false);
    assert!(!h.enable_notification());
    assert_eq!(used_idx(&vq), 0);
    // A sane index afterwards works again.
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    r.mem
        .write_obj(0u16.to_le(), GuestAddress(vq.avail_addr().0 + 2))
        .unwrap();
    r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    assert!(h.has_available());
    assert_eq!(h.poll_queue(), 1);
    assert_eq!(used_idx(&vq), 1);
}

#[test]
fn signal_min_publishes_every_chain_but_interrupts_per_k() {
    let r = Rig::new();
    let vq = MockSplitQueue::new(&r.mem, 32);
    let mut h = r.handler(&vq, false);
    h.set_signal_batch(1);
    h.set_signal_min(4);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    for _ in 0..7 {
        r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    h.process_queue();
    // Every chain is on the used ring; interrupts after the 4th chain and
    // at the end of the pass (3 left), not one per chain.
    assert_eq!(used_idx(&vq), 7);
    assert_eq!(r.irq.0.load(Ordering::SeqCst), 2);
    // A pass shorter than k still signals at its end.
    r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    h.process_queue();
    assert_eq!(used_idx(&vq), 8);
    assert_eq!(r.irq.0.load(Ordering::SeqCst), 3);
    // 0 acts as 1.
    h.set_signal_min(0);
    for _ in 0..2 {
        r.push(&vq, &[(HDR, 16, false), (STATUS, 1, true)]);
    }
    h.process_queue();
    assert_eq!(r.irq.0.load(Ordering::SeqCst), 5);
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

// ---------------------------------------------------------------------------
// Virtual interrupt coalescing (vIC).

/// A back-end that holds every request until the test completes it.
#[derive(Default)]
struct Held(std::sync::Mutex<std::collections::VecDeque<iovirt_backend::Completion>>);

impl iovirt_backend::BlockBackend for Held {
    fn info(&self) -> iovirt_backend::BlockInfo {
        iovirt_backend::BlockInfo {
            capacity: 1 << 20,
            logical_block_size: 512,
            physical_block_size: 512,
            features: iovirt_backend::Features::empty(),
        }
    }
    fn submit(&self, _req: iovirt_backend::Request, done: iovirt_backend::Completion) {
        self.0.lock().unwrap().push_back(done);
    }
}

impl Held {
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    /// Complete the `n` oldest requests on another thread.
    fn complete(&self, n: usize) {
        let done: Vec<_> = {
            let mut q = self.0.lock().unwrap();
            let n = n.min(q.len());
            q.drain(..n).collect()
        };
        std::thread::spawn(move || {
            for d in done {
                d.complete(Ok(()));
            }
        })
        .join()
        .unwrap();
    }
}

/// Records the used index at every interrupt.
struct RecordingIrq {
    mem: GuestMemoryMmap,
    seen: std::sync::Mutex<Vec<u16>>,
}
impl VirtioInterrupt for RecordingIrq {
    fn signal_used_queue(&self, _q: u16) -> Result<(), InterruptError> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        self.seen.lock().unwrap().push(idx);
        Ok(())
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}
impl RecordingIrq {
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    fn last(&self) -> Option<u16> {
        self.seen.lock().unwrap().last().copied()
    }
}

const VQ: u16 = 64;

/// A closed-loop guest on a 64-entry queue: flush requests in slots of two
/// descriptors, its own avail ring bookkeeping (the mock's does not wrap).
struct Guest {
    mem: GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    avail: u16,
    reaped: u16,
    event_idx: bool,
}

impl Guest {
    fn new(mem: &GuestMemoryMmap, event_idx: bool) -> Self {
        MEM.with(|m| *m.borrow_mut() = Some(mem.clone()));
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let g = Guest {
            mem: mem.clone(),
            vq: MockSplitQueue::new(leaked, VQ),
            avail: 0,
            reaped: 0,
            event_idx,
        };
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        mem.write_slice(&b, GuestAddress(HDR)).unwrap();
        if event_idx {
            g.set_used_event(0);
        }
        g
    }

    fn queue(&self) -> Queue {
        let mut q: Queue = self.vq.create_queue().unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_event_idx(self.event_idx);
        q
    }

    fn set_used_event(&self, v: u16) {
        let a = self.vq.avail_addr().0 + 4 + 2 * u64::from(VQ);
        self.mem.write_obj(v.to_le(), GuestAddress(a)).unwrap();
    }

    /// Post a flush request in `slot` (descriptors 2*slot and 2*slot+1).
    fn post(&mut self, slot: u16) {
        let d = slot * 2;
        let t = self.vq.desc_table();
        t.store(
            d,
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, d + 1)),
        )
        .unwrap();
        t.store(
            d + 1,
            RawDescriptor::from(SplitDescriptor::new(
                STATUS + u64::from(slot),
                1,
                F_WRITE,
                0,
            )),
        )
        .unwrap();
        let ring = self.vq.avail_addr().0 + 4 + 2 * u64::from(self.avail % VQ);
        self.mem.write_obj(d.to_le(), GuestAddress(ring)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail.to_le(), GuestAddress(self.vq.avail_addr().0 + 2))
            .unwrap();
    }

    /// Reap the used ring like an interrupt handler; returns the freed slots
    /// and re-arms used_event (EVENT_IDX) for the next completion.
    fn reap(&mut self) -> Vec<u16> {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let mut slots = Vec::new();
        while self.reaped != idx {
            let a = USED + 4 + 8 * u64::from(self.reaped % VQ);
            let id: u32 = self.mem.read_obj(GuestAddress(a)).unwrap();
            slots.push((id / 2) as u16);
            self.reaped = self.reaped.wrapping_add(1);
        }
        if self.event_idx {
            self.set_used_event(self.reaped);
        }
        slots
    }
}

fn coalescing_handler(
    g: &Guest,
    disk: Arc<Held>,
    irq: Arc<RecordingIrq>,
    params: Option<CoalesceParams>,
) -> (VirtioBlock, QueueHandler<GuestMemoryMmap>) {
    let blk = VirtioBlock::new(
        disk,
        BlockConfig {
            queue_size: VQ,
            coalescing: params,
            ..Default::default()
        },
    )
    .unwrap();
    let h = blk
        .queue_handler(0, g.queue(), GuestMemoryAtomic::new(g.mem.clone()), irq)
        .unwrap();
    (blk, h)
}

/// Run a closed loop at `depth` for `total` completions, the back-end
/// finishing `per_batch` requests at a time; the guest reaps only when
/// interrupted (plus a final reap). Returns (interrupts, completions).
fn closed_loop(
    depth: u16,
    per_batch: usize,
    total: usize,
    params: Option<CoalesceParams>,
    event_idx: bool,
) -> (usize, u64) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut g = Guest::new(&mem, event_idx);
    let disk = Arc::new(Held::default());
    let irq = Arc::new(RecordingIrq {
        mem: mem.clone(),
        seen: Default::default(),
    });
    let (blk, mut h) = coalescing_handler(&g, disk.clone(), irq.clone(), params);
    for slot in 0..depth {
        g.post(slot);
    }
    h.process_queue();
    let mut done = 0;
    let mut irqs_seen = 0;
    while done < total {
        assert!(disk.len() > 0 || h.inflight() > 0, "nothing in flight");
        disk.complete(per_batch);
        assert!(h.completion_event().read().is_ok());
        h.process_completions();
        done += per_batch;
        // Requests that completed without an interrupt stay unreaped until the
        // next one; the deadline then forces delivery.
        if irq.count() == irqs_seen && disk.len() == 0 {
            let d = h
                .coalesce_deadline()
                .expect("held completions have a deadline");
            while std::time::Instant::now() < d {
                std::hint::spin_loop();
            }
            h.process_completions();
        }
        if irq.count() > irqs_seen {
            irqs_seen = irq.count();
            for slot in g.reap() {
                g.post(slot);
            }
            h.process_queue();
        }
    }
    h.flush_interrupts();
    assert_eq!(h.coalesce_deadline(), None);
    assert_eq!(blk.completions(), h.completions());
    assert_eq!(blk.interrupts_signalled(), h.interrupts_signalled());
    assert_eq!(irq.count() as u64, h.interrupts_signalled());
    eprintln!(
        "depth {depth} event_idx {event_idx} vic {}: {} interrupts / {} completions",
        params.is_some(),
        irq.count(),
        h.completions()
    );
    (irq.count(), h.completions())
}

#[test]
fn coalesce_ratio_follows_commands_in_flight() {
    let p = CoalesceParams::default();
    let ks: Vec<usize> = [0, 1, 4, 5, 8, 9, 16, 17, 31, 32, 1000]
        .iter()
        .map(|&c| p.ratio(c))
        .collect();
    assert_eq!(ks, [1, 1, 1, 2, 2, 3, 4, 5, 8, 8, 8]);
    let odd = CoalesceParams {
        low_inflight: 0,
        inflight_per_step: 0,
        max_coalesce: 0,
        max_delay: std::time::Duration::ZERO,
    };
    assert_eq!(odd.ratio(100), 1);
}

#[test]
fn coalescing_every_completion_interrupts_at_depth_one() {
    for event_idx in [false, true] {
        let on = closed_loop(1, 1, 200, Some(CoalesceParams::default()), event_idx);
        let off = closed_loop(1, 1, 200, None, event_idx);
        assert_eq!(on, (200, 200), "event_idx {event_idx}");
        assert_eq!(off, on);
    }
}

#[test]
fn coalescing_cuts_interrupts_at_high_depth() {
    // A long max delay: count what the delivery ratio does, not the timer
    // (spawning a completion thread per request is slower than 100 us).
    let slow = CoalesceParams {
        max_delay: std::time::Duration::from_secs(10),
        ..Default::default()
    };
    for event_idx in [false, true] {
        let (off, n) = closed_loop(32, 1, 640, None, event_idx);
        assert_eq!(
            (off, n),
            (640, 640),
            "one interrupt per completion without vIC"
        );
        let (on, n) = closed_loop(32, 1, 640, Some(slow), event_idx);
        assert_eq!(n, 640);
        // Depth 32: the p-th held completion leaves 32 - p in flight, so the
        // interrupt comes at p = 7 (k = ceil(25 / 4) = 7): 640 / 7 = 91.
        assert!(on <= 640 / 6, "event_idx {event_idx}: {on} interrupts");
        // Depth 8: the 2nd completion leaves 6 in flight, k = 2: 320.
        let (mid, _) = closed_loop(8, 1, 640, Some(slow), event_idx);
        assert!(mid <= 330 && mid > on, "depth 8: {mid} interrupts");
    }
}

#[test]
fn coalescing_max_delay_forces_delivery_and_nothing_is_lost() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut g = Guest::new(&mem, true);
    let disk = Arc::new(Held::default());
    let irq = Arc::new(RecordingIrq {
        mem: mem.clone(),
        seen: Default::default(),
    });
    let params = CoalesceParams {
        max_delay: std::time::Duration::from_millis(20),
        ..Default::default()
    };
    let (_blk, mut h) = coalescing_handler(&g, disk.clone(), irq.clone(), Some(params));
    for slot in 0..32 {
        g.post(slot);
    }
    h.process_queue();
    assert_eq!(h.inflight(), 32);
    // One completion with 31 still in flight: held.
    let t0 = std::time::Instant::now();
    disk.complete(1);
    h.process_completions();
    assert_eq!(irq.count(), 0);
    let d = h.coalesce_deadline().expect("deadline armed");
    assert!(d > t0 && d <= t0 + params.max_delay + std::time::Duration::from_millis(5));
    // Waking before the deadline changes nothing; after it, delivery is forced.
    h.process_completions();
    assert_eq!(irq.count(), 0);
    std::thread::sleep(d.saturating_duration_since(std::time::Instant::now()));
    h.process_completions();
    assert_eq!(irq.seen.lock().unwrap().clone(), [1]);
    assert_eq!(h.coalesce_deadline(), None);
    assert_eq!(g.reap(), [0]);
    // flush_interrupts delivers at once; the guest re-armed used_event 1.
    disk.complete(2);
    h.process_completions();
    assert_eq!(irq.count(), 1);
    h.flush_interrupts();
    assert_eq!(irq.seen.lock().unwrap().clone(), [1, 3]);
    g.reap();
    // Draining: the interrupt arrives once few remain in flight, the last
    // one covers every used element.
    for _ in 0..29 {
        let seen = irq.count();
        disk.complete(1);
        h.process_completions();
        if irq.count() > seen {
            g.reap();
        }
    }
    assert_eq!(h.inflight(), 0);
    assert_eq!(irq.last(), Some(32));
    assert_eq!(h.coalesce_deadline(), None);
    // Turning coalescing off flushes what is held.
    g.reap();
    for slot in 0..16 {
        g.post(slot);
    }
    h.process_queue();
    disk.complete(1);
    h.process_completions();
    let before = irq.count();
    assert!(h.coalesce_deadline().is_some());
    h.set_coalescing(None);
    assert_eq!(irq.count(), before + 1);
    assert_eq!(irq.last(), Some(33));
    assert_eq!(h.coalescing(), None);
}

/// A device over `disk` running its worker thread, whose guest posted
/// `slots` flush requests on queue 0 (size [`VQ`]) and kicked once.
fn started(
    disk: Arc<dyn iovirt_backend::BlockBackend>,
    cfg: BlockConfig,
    slots: u16,
) -> (VirtioBlock, Arc<RecordingIrq>) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut g = Guest::new(&mem, false);
    let irq = Arc::new(RecordingIrq {
        mem: mem.clone(),
        seen: Default::default(),
    });
    let mut blk = VirtioBlock::new(
        disk,
        BlockConfig {
            queue_size: VQ,
            ..cfg
        },
    )
    .unwrap();
    let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    for slot in 0..slots {
        g.post(slot);
    }
    VirtioDevice::<GuestMemoryMmap>::activate(
        &mut blk,
        GuestMemoryAtomic::new(mem.clone()),
        0,
        vec![ActiveQueue {
            index: 0,
            queue: g.queue(),
            notify: notify.clone(),
        }],
        irq.clone(),
    )
    .unwrap();
    notify.write(1).unwrap();
    (blk, irq)
}

/// Wait up to 10 s for `f` (the device's threads run on their own).
fn wait(what: &str, f: &dyn Fn() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < end, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[test]
fn coalescing_worker_thread_timer_delivers_stalled_completions() {
    let disk = Arc::new(Held::default());
    let (mut blk, irq) = started(
        disk.clone(),
        BlockConfig {
            coalescing: Some(CoalesceParams::default()),
            ..Default::default()
        },
        16,
    );
    wait("16 submitted", &|| disk.len() == 16);
    // One completion, 15 still in flight (k = 4): only the timer delivers it.
    disk.complete(1);
    wait("timer delivery", &|| irq.count() == 1);
    assert_eq!(irq.last(), Some(1));
    assert_eq!(blk.interrupts_signalled(), 1);
    // The rest: the last interrupt covers every used element.
    for _ in 0..15 {
        disk.complete(1);
    }
    wait("all signalled", &|| irq.last() == Some(16));
    assert_eq!(blk.completions(), 16);
    // How many depends on the threads' timing; never more than one per completion.
    assert!(blk.interrupts_signalled() <= 16);
    VirtioDevice::<GuestMemoryMmap>::reset(&mut blk);
}

// ---------------------------------------------------------------------------
// Owner-polled completions (BlockBackend::completion_fd).

/// A back-end whose completions run only when its owner polls them: it holds
/// requests, and `ready` makes them reapable and fires its eventfd.
struct Polled {
    held: Held,
    ready: std::sync::Mutex<Vec<iovirt_backend::Completion>>,
    evt: EventFd,
    /// Threads that ran `poll_completions` and completed something.
    pollers: std::sync::Mutex<Vec<std::thread::ThreadId>>,
}

impl iovirt_backend::BlockBackend for Polled {
    fn info(&self) -> iovirt_backend::BlockInfo {
        self.held.info()
    }
    fn submit(&self, req: iovirt_backend::Request, done: iovirt_backend::Completion) {
        self.held.submit(req, done)
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.evt.as_raw_fd())
    }
    fn poll_completions(&self) -> usize {
        let ready = std::mem::take(&mut *self.ready.lock().unwrap());
        let n = ready.len();
        if n > 0 {
            self.pollers
                .lock()
                .unwrap()
                .push(std::thread::current().id());
        }
        for d in ready {
            d.complete(Ok(()));
        }
        n
    }
}

impl Polled {
    fn ready(&self, n: usize) {
        let mut q = self.held.0.lock().unwrap();
        let n = n.min(q.len());
        self.ready.lock().unwrap().extend(q.drain(..n));
        self.evt.write(1).unwrap();
    }
}

#[test]
fn worker_threads_reap_owner_polled_back_ends() {
    let disk = Arc::new(Polled {
        held: Held::default(),
        ready: Default::default(),
        evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        pollers: Default::default(),
    });
    let (mut blk, irq) = started(disk.clone(), BlockConfig::default(), 8);
    wait("8 submitted", &|| disk.held.len() == 8);
    // Nothing completes by itself: only the worker, woken by the eventfd, polls.
    disk.ready(3);
    wait("3 used", &|| blk.completions() == 3);
    disk.ready(5);
    wait("8 used", &|| blk.completions() == 8);
    assert_eq!(irq.last(), Some(8));
    let pollers = disk.pollers.lock().unwrap().clone();
    assert!(!pollers.is_empty());
    assert!(pollers.iter().all(|t| *t != std::thread::current().id()));
    VirtioDevice::<GuestMemoryMmap>::reset(&mut blk);
}
