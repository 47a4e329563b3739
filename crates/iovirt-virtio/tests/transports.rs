//! The PCI and MMIO transports driven register by register the way Linux's
//! virtio_pci_modern and virtio_mmio drivers do, with virtio-blk behind them
//! running on its own worker threads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iovirt_backend::{Inline, MemoryBackend};
use iovirt_bus::interrupt::test_doubles::{RecordingLine, RecordingMsiSink};
use iovirt_bus::pci::PciFunction;
use iovirt_bus::BusDeviceMut;
use iovirt_virtio::block::{BlockConfig, VirtioBlock};
use iovirt_virtio::mmio::*;
use iovirt_virtio::pci::*;
use iovirt_virtio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x11000;
const STATUS: u64 = 0x12000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn disk() -> Arc<Inline<MemoryBackend>> {
    Arc::new(Inline(MemoryBackend::new(1 << 20)))
}

/// Post a 512-byte write of `byte` at `sector` as avail entry `n` (descriptors 3n..3n+2).
fn post_write(m: &GuestMemoryMmap, n: u16, sector: u64, byte: u8) {
    let base = u64::from(n) * 3;
    let mut hdr = [0u8; 16];
    hdr[0] = 1;
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    let h = HDR + u64::from(n) * 16;
    let d = DATA + u64::from(n) * 512;
    let s = STATUS + u64::from(n);
    m.write_slice(&hdr, GuestAddress(h)).unwrap();
    m.write_slice(&[byte; 512], GuestAddress(d)).unwrap();
    m.write_obj(0xffu8, GuestAddress(s)).unwrap();
    let descs = [
        (h, 16u32, 1u16, base + 1),
        (d, 512, 1, base + 2),
        (s, 1, 2, 0),
    ];
    for (i, (a, l, f, next)) in descs.iter().enumerate() {
        let at = DESC + (base + i as u64) * 16;
        m.write_obj(*a, GuestAddress(at)).unwrap();
        m.write_obj(*l, GuestAddress(at + 8)).unwrap();
        m.write_obj(*f, GuestAddress(at + 12)).unwrap();
        m.write_obj(*next as u16, GuestAddress(at + 14)).unwrap();
    }
    m.write_obj(base as u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n)))
        .unwrap();
    m.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
}

fn wait_used(m: &GuestMemoryMmap, want: u16) {
    let t = Instant::now();
    while m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != want {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "used idx never reached {want}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn bar_w<T: PciFunction>(d: &mut T, off: u64, v: u64, len: usize) {
    d.bar_write(VIRTIO_BAR, off, &v.to_le_bytes()[..len]);
}
fn bar_r<T: PciFunction>(d: &mut T, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(VIRTIO_BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

/// Walk the capability list and return (cfg_type, offset) of the virtio capabilities.
fn virtio_caps<T: PciFunction>(d: &mut T) -> Vec<(u8, u32, u32)> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    d.config_read(0x34, &mut b);
    let mut p = b[0];
    while p != 0 {
        let mut cap = [0u8; 16];
        d.config_read(u16::from(p), &mut cap);
        if cap[0] == PCI_CAP_ID_VNDR {
            out.push((
                cap[3],
                u32::from_le_bytes(cap[8..12].try_into().unwrap()),
                u32::from_le_bytes(cap[12..16].try_into().unwrap()),
            ));
        }
        p = cap[1];
    }
    out
}

#[test]
fn pci_modern_driver_sequence() {
    let m = mem();
    let d = disk();
    let sink = Arc::new(RecordingMsiSink::new());
    let blk = VirtioBlock::new(d.clone(), BlockConfig::default()).unwrap();
    let mut dev = VirtioPciDevice::new(
        Box::new(blk),
        GuestMemoryAtomic::new(m.clone()),
        sink.clone(),
        None,
    )
    .unwrap();
    // Probe: IDs and capabilities.
    assert_eq!(dev.config().read_u16(0), 0x1af4);
    assert_eq!(dev.config().read_u16(2), 0x1042);
    let caps = virtio_caps(&mut dev);
    let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(types, vec![1, 2, 3, 4, 5]);
    assert_eq!(caps[1].1 as u64, NOTIFY_OFFSET);
    // Enable MSI-X (control register of the first capability) and program vectors 0 and 1.
    let msix_cap = dev.msix().lock().unwrap().capability_offset().unwrap();
    for v in 0..2u64 {
        let e = u64::from(MSIX_TABLE_OFFSET) + v * 16;
        bar_w(&mut dev, e, 0xfee0_0000, 4);
        bar_w(&mut dev, e + 4, 0, 4);
        bar_w(&mut dev, e + 8, 0x40 + v, 4);
        bar_w(&mut dev, e + 12, 0, 4);
    }
    dev.config_write(u16::from(msix_cap) + 2, &0x8000u16.to_le_bytes());
    // Reset, ACKNOWLEDGE, DRIVER.
    bar_w(&mut dev, COMMON_STATUS, 0, 1);
    assert_eq!(bar_r(&mut dev, COMMON_STATUS, 1), 0);
    bar_w(&mut dev, COMMON_STATUS, 1, 1);
    bar_w(&mut dev, COMMON_STATUS, 3, 1);
    // Features: read both words, ack VERSION_1 | EVENT_IDX... first try something not offered.
    bar_w(&mut dev, COMMON_DFSELECT, 1, 4);
    let hi = bar_r(&mut dev, COMMON_DF, 4);
    assert_eq!(hi & 1, 1, "VERSION_1 offered");
    bar_w(&mut dev, COMMON_GFSELECT, 1, 4);
    bar_w(&mut dev, COMMON_GF, 1 | 0x8000_0000, 4);
    bar_w(&mut dev, COMMON_STATUS, 0xb, 1);
    assert_eq!(
        bar_r(&mut dev, COMMON_STATUS, 1) & 8,
        0,
        "FEATURES_OK refused"
    );
    bar_w(&mut dev, COMMON_GF, 1, 4);
    bar_w(&mut dev, COMMON_GFSELECT, 0, 4);
    bar_w(&mut dev, COMMON_GF, 1 << VIRTIO_F_INDIRECT_DESC, 4);
    bar_w(&mut dev, COMMON_STATUS, 0xb, 1);
    assert_eq!(
        bar_r(&mut dev, COMMON_STATUS, 1),
        0xb,
        "FEATURES_OK accepted"
    );
    // Config vector, then queue 0.
    bar_w(&mut dev, COMMON_MSIX, 0, 2);
    assert_eq!(bar_r(&mut dev, COMMON_MSIX, 2), 0);
    assert_eq!(bar_r(&mut dev, COMMON_NUMQ, 2), 1);
    bar_w(&mut dev, COMMON_Q_SELECT, 0, 2);
    assert_eq!(bar_r(&mut dev, COMMON_Q_SIZE, 2), 256);
    bar_w(&mut dev, COMMON_Q_SIZE, 16, 2);
    bar_w(&mut dev, COMMON_Q_DESC, DESC, 4);
    bar_w(&mut dev, COMMON_Q_DESC + 4, 0, 4);
    bar_w(&mut dev, COMMON_Q_AVAIL, AVAIL, 8);
    bar_w(&mut dev, COMMON_Q_USED, USED, 4);
    bar_w(&mut dev, COMMON_Q_USED + 4, 0, 4);
    bar_w(&mut dev, COMMON_Q_MSIX, 1, 2);
    assert_eq!(bar_r(&mut dev, COMMON_Q_MSIX, 2), 1);
    bar_w(&mut dev, COMMON_Q_MSIX, 99, 2);
    assert_eq!(
        bar_r(&mut dev, COMMON_Q_MSIX, 2),
        u64::from(NO_VECTOR),
        "no such vector"
    );
    bar_w(&mut dev, COMMON_Q_MSIX, 1, 2);
    let noff = bar_r(&mut dev, COMMON_Q_NOFF, 2);
    bar_w(&mut dev, COMMON_Q_ENABLE, 1, 2);
    bar_w(&mut dev, COMMON_STATUS, 0xf, 1);
    assert_eq!(bar_r(&mut dev, COMMON_STATUS, 1), 0xf);
    // Device config: capacity in sectors.
    assert_eq!(bar_r(&mut dev, DEVICE_CFG_OFFSET, 8), 2048);
    // I/O through the notify register.
    post_write(&m, 0, 3, 0x77);
    bar_w(
        &mut dev,
        NOTIFY_OFFSET + noff * u64::from(NOTIFY_OFF_MULTIPLIER),
        0,
        2,
    );
    wait_used(&m, 1);
    assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert_eq!(&d.0.contents()[1536..2048], &[0x77; 512][..]);
    let t = Instant::now();
    while sink.messages().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(sink.messages()[0].data, 0x41, "queue 0 uses vector 1");
    // I/O through the eventfd, as an ioeventfd would deliver it.
    post_write(&m, 1, 4, 0x78);
    dev.ioeventfds()[0].1.write(1).unwrap();
    wait_used(&m, 2);
    // Reset stops everything; registers are back to their defaults.
    bar_w(&mut dev, COMMON_STATUS, 0, 1);
    assert_eq!(bar_r(&mut dev, COMMON_STATUS, 1), 0);
    assert_eq!(bar_r(&mut dev, COMMON_Q_ENABLE, 2), 0);
    assert_eq!(bar_r(&mut dev, COMMON_Q_MSIX, 2), u64::from(NO_VECTOR));
    // Features may not be written before DRIVER; DRIVER_OK without FEATURES_OK is refused.
    bar_w(&mut dev, COMMON_STATUS, 1, 1);
    bar_w(&mut dev, COMMON_STATUS, 3, 1);
    bar_w(&mut dev, COMMON_STATUS, 7, 1);
    assert_eq!(bar_r(&mut dev, COMMON_STATUS, 1), 3);
}

#[test]
fn pci_intx_and_isr_without_msix() {
    let m = mem();
    let line = Arc::new(RecordingLine::new());
    let blk = VirtioBlock::new(disk(), BlockConfig::default()).unwrap();
    let mut dev = VirtioPciDevice::new(
        Box::new(blk),
        GuestMemoryAtomic::new(m.clone()),
        Arc::new(RecordingMsiSink::new()),
        Some(line.clone()),
    )
    .unwrap();
    for s in [1u64, 3] {
        bar_w(&mut dev, COMMON_STATUS, s, 1);
    }
    bar_w(&mut dev, COMMON_GFSELECT, 1, 4);
    bar_w(&mut dev, COMMON_GF, 1, 4);
    bar_w(&mut dev, COMMON_STATUS, 0xb, 1);
    bar_w(&mut dev, COMMON_Q_SIZE, 16, 2);
    bar_w(&mut dev, COMMON_Q_DESC, DESC, 8);
    bar_w(&mut dev, COMMON_Q_AVAIL, AVAIL, 8);
    bar_w(&mut dev, COMMON_Q_USED, USED, 8);
    bar_w(&mut dev, COMMON_Q_ENABLE, 1, 2);
    bar_w(&mut dev, COMMON_STATUS, 0xf, 1);
    post_write(&m, 0, 0, 1);
    bar_w(&mut dev, NOTIFY_OFFSET, 0, 2);
    wait_used(&m, 1);
    let t = Instant::now();
    while !line.level() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(bar_r(&mut dev, ISR_OFFSET, 1), u64::from(ISR_QUEUE));
    assert!(!line.level(), "reading the ISR deasserts INTx");
    assert_eq!(bar_r(&mut dev, ISR_OFFSET, 1), 0);
}

fn mmio_w(d: &mut VirtioMmioDevice<GuestMemoryMmap>, off: u64, v: u32) {
    d.write(off, &v.to_le_bytes());
}
fn mmio_r(d: &mut VirtioMmioDevice<GuestMemoryMmap>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn mmio_driver_sequence_and_reset_mid_io() {
    let m = mem();
    let d = disk();
    let line = Arc::new(RecordingLine::new());
    let blk = VirtioBlock::new(d.clone(), BlockConfig::default()).unwrap();
    let mut dev = VirtioMmioDevice::new(
        Box::new(blk),
        GuestMemoryAtomic::new(m.clone()),
        line.clone(),
        MmioInterruptMode::Level,
    )
    .unwrap();
    assert_eq!(mmio_r(&mut dev, MMIO_MAGIC_VALUE), MMIO_MAGIC);
    assert_eq!(mmio_r(&mut dev, MMIO_VERSION_REG), 2);
    assert_eq!(mmio_r(&mut dev, MMIO_DEVICE_ID), 2);
    mmio_w(&mut dev, MMIO_STATUS, 0);
    mmio_w(&mut dev, MMIO_STATUS, 1);
    mmio_w(&mut dev, MMIO_STATUS, 3);
    mmio_w(&mut dev, MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(mmio_r(&mut dev, MMIO_DEVICE_FEATURES) & 1, 1);
    mmio_w(&mut dev, MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_w(&mut dev, MMIO_DRIVER_FEATURES, 1);
    mmio_w(&mut dev, MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_w(&mut dev, MMIO_DRIVER_FEATURES, 1 << VIRTIO_F_RING_EVENT_IDX);
    mmio_w(&mut dev, MMIO_STATUS, 0xb);
    assert_eq!(mmio_r(&mut dev, MMIO_STATUS), 0xb);
    mmio_w(&mut dev, MMIO_QUEUE_SEL, 0);
    assert_eq!(mmio_r(&mut dev, MMIO_QUEUE_READY), 0);
    assert_eq!(mmio_r(&mut dev, MMIO_QUEUE_NUM_MAX), 256);
    mmio_w(&mut dev, MMIO_QUEUE_NUM, 16);
    mmio_w(&mut dev, MMIO_QUEUE_DESC_LOW, DESC as u32);
    mmio_w(&mut dev, MMIO_QUEUE_DESC_HIGH, 0);
    mmio_w(&mut dev, MMIO_QUEUE_DRIVER_LOW, AVAIL as u32);
    mmio_w(&mut dev, MMIO_QUEUE_DRIVER_HIGH, 0);
    mmio_w(&mut dev, MMIO_QUEUE_DEVICE_LOW, USED as u32);
    mmio_w(&mut dev, MMIO_QUEUE_DEVICE_HIGH, 0);
    mmio_w(&mut dev, MMIO_QUEUE_READY, 1);
    mmio_w(&mut dev, MMIO_STATUS, 0xf);
    assert_eq!(mmio_r(&mut dev, MMIO_STATUS), 0xf);
    // Config space at 0x100: capacity.
    let mut cap = [0u8; 8];
    dev.read(MMIO_CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    // used_event = 0: interrupt after the first completion.
    post_write(&m, 0, 1, 0x33);
    mmio_w(&mut dev, MMIO_QUEUE_NOTIFY, 0);
    wait_used(&m, 1);
    let t = Instant::now();
    while !line.level() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(mmio_r(&mut dev, MMIO_INTERRUPT_STATUS), INT_VRING);
    mmio_w(&mut dev, MMIO_INTERRUPT_ACK, INT_VRING);
    assert!(!line.level());
    assert_eq!(&d.0.contents()[512..1024], &[0x33; 512][..]);
    // Reset in the middle of I/O: post requests, notify and reset at once.
    for n in 1..8 {
        post_write(&m, n, u64::from(n) + 8, n as u8);
    }
    mmio_w(&mut dev, MMIO_QUEUE_NOTIFY, 0);
    mmio_w(&mut dev, MMIO_STATUS, 0);
    assert_eq!(mmio_r(&mut dev, MMIO_STATUS), 0);
    assert_eq!(mmio_r(&mut dev, MMIO_QUEUE_READY), 0);
    assert_eq!(mmio_r(&mut dev, MMIO_INTERRUPT_STATUS), 0);
    // After reset the device never touches the rings again.
    let idx = m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), idx);
    // Re-initialising works.
    for s in [1, 3] {
        mmio_w(&mut dev, MMIO_STATUS, s);
    }
    mmio_w(&mut dev, MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_w(&mut dev, MMIO_DRIVER_FEATURES, 1);
    mmio_w(&mut dev, MMIO_STATUS, 0xb);
    assert_eq!(mmio_r(&mut dev, MMIO_STATUS), 0xb);
    // Odd-sized register accesses are ignored / read as zero.
    let mut b = [0u8; 2];
    dev.read(MMIO_MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    dev.write(MMIO_STATUS, &[0]);
    assert_eq!(mmio_r(&mut dev, MMIO_STATUS), 0xb);
}
