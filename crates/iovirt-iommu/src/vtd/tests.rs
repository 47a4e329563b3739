//! Replays of the register and invalidation-queue sequences Linux's
//! intel-iommu driver (drivers/iommu/intel/{iommu,dmar}.c) issues.

use std::sync::Arc;

use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
use iovirt_bus::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::*;
use super::*;
use crate::entry::SlEntry;
use crate::types::{PageSize, Perms};
use crate::view::DmaView;

const ROOT: u64 = 0x1_0000;
const CTX: u64 = 0x2_0000;
const QUEUE: u64 = 0x3_0000;
const STATUS: u64 = 0x4_0000;
const PT: u64 = 0x10_0000; // page tables from here
const BUF: u64 = 0x80_0000;
const FE_ADDR: u32 = 0xfee0_0000;

struct Rig {
    mem: GuestMemoryMmap,
    vtd: Arc<Vtd<GuestMemoryMmap>>,
    msi: Arc<RecordingMsiSink>,
    gcmd: u32,
    tail: u64,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let msi = Arc::new(RecordingMsiSink::new());
        let vtd = Arc::new(Vtd::new(VtdConfig::default(), mem.clone(), msi.clone()));
        Rig {
            mem,
            vtd,
            msi,
            gcmd: 0,
            tail: 0,
        }
    }
    fn r32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.vtd.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.vtd.read(off, &mut b);
        u64::from_le_bytes(b)
    }
    fn w32(&self, off: u64, v: u32) {
        self.vtd.write(off, &v.to_le_bytes());
    }
    fn w64(&self, off: u64, v: u64) {
        self.vtd.write(off, &v.to_le_bytes());
    }
    /// `iommu->gcmd |= bit; writel(iommu->gcmd, GCMD)` and wait for the status.
    fn gcmd_set(&mut self, bit: u32) {
        self.gcmd |= bit;
        self.w32(GCMD, self.gcmd);
        assert_ne!(self.r32(GSTS) & bit, 0, "GSTS did not follow GCMD {bit:#x}");
    }
    /// qi_submit_sync: descriptors plus a wait descriptor, IQT, poll the status.
    fn submit(&mut self, descs: &[InvDescriptor], irq: bool) {
        self.mem.write_obj(0u32, GuestAddress(STATUS)).unwrap(); // QI_IN_USE-ish
        let mut all = descs.to_vec();
        all.push(InvDescriptor::wait(1, STATUS, irq)); // QI_DONE
        for d in all {
            let (lo, hi) = d.raw();
            let a = QUEUE + self.tail * 16;
            self.mem.write_obj(lo, GuestAddress(a)).unwrap();
            self.mem.write_obj(hi, GuestAddress(a + 8)).unwrap();
            self.tail = (self.tail + 1) % 256;
        }
        self.w32(IQT, (self.tail << 4) as u32);
        let status: u32 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 1, "wait descriptor status not written");
        assert_eq!(self.r64(IQH), self.tail << 4, "queue not consumed");
    }
    fn put(&self, table: u64, index: u64, e: SlEntry) {
        self.mem
            .write_obj(e.0, GuestAddress(table + index * 8))
            .unwrap();
    }

    /// The boot sequence up to translation enabled (init_dmars and friends).
    fn boot(&mut self) {
        assert_eq!(self.r32(VER), 0x10);
        let cap = self.r64(CAP);
        let ecap = self.r64(ECAP);
        assert_ne!(cap & (1 << 10), 0, "SAGAW: 4-level");
        assert_eq!((cap >> 16) & 0x3f, 47, "MGAW");
        assert_eq!(((cap >> 24) & 0x3ff) * 16, FRCD, "FRO");
        assert_eq!((cap >> 34) & 3, 3, "SLLPS");
        assert_eq!(((cap >> 40) & 0xff) + 1, 8, "NFR");
        assert_eq!(((ecap >> 8) & 0x3ff) * 16, IVA, "IRO");
        assert_ne!(ecap & 2, 0, "QI");
        // dmar_set_interrupt → dmar_msi_write; then unmask; clear old faults.
        self.w32(FEDATA, 0x41);
        self.w32(FEADDR, FE_ADDR);
        self.w32(FEUADDR, 0);
        self.w32(FECTL, 0);
        let fsts = self.r32(FSTS);
        self.w32(FSTS, fsts | FS_PFO | FS_PPF);
        // __dmar_enable_qi
        self.w64(IQT, 0);
        self.w64(IQA, QUEUE);
        self.gcmd_set(G_QIE);
        // iommu_set_root_entry
        self.w64(RTADDR, ROOT);
        self.w32(GCMD, self.gcmd | G_SRTP);
        assert_ne!(self.r32(GSTS) & G_SRTP, 0, "RTPS");
        self.submit(
            &[
                InvDescriptor::context_cache(Granularity::Global, 0, 0, 0),
                InvDescriptor::iotlb(Granularity::Global, 0, 0, 0),
            ],
            false,
        );
        // iommu_enable_translation
        self.gcmd_set(G_TE);
        assert!(self.vtd.translation_enabled());
    }

    /// domain_context_mapping_one for 00:04.0, DID 1, 4-level table at PT.
    fn map_device(&mut self) {
        let rid = RequesterId::new(0, 4, 0);
        let (root_lo, root_hi) = RootEntry::with_context_table(CTX).raw();
        self.mem.write_obj(root_lo, GuestAddress(ROOT)).unwrap();
        self.mem.write_obj(root_hi, GuestAddress(ROOT + 8)).unwrap();
        let (lo, hi) = ContextEntry::translating(1, PT, 4).raw();
        let ca = CTX + u64::from(rid.devfn()) * 16;
        self.mem.write_obj(lo, GuestAddress(ca)).unwrap();
        self.mem.write_obj(hi, GuestAddress(ca + 8)).unwrap();
        // IOVA 0xffff_f000 → BUF (4 KiB, RW); IOVA 0x4000_0000.. → 0x60_0000 (2 MiB, R).
        let (l3, l2a, l1, l2b) = (PT + 0x1000, PT + 0x2000, PT + 0x3000, PT + 0x4000);
        self.put(PT, 0, SlEntry::table(l3));
        self.put(l3, 3, SlEntry::table(l2a));
        self.put(l2a, 511, SlEntry::table(l1));
        self.put(l1, 511, SlEntry::page(BUF, PageSize::Size4K, Perms::all()));
        self.put(l3, 1, SlEntry::table(l2b));
        self.put(
            l2b,
            0,
            SlEntry::page(0x60_0000, PageSize::Size2M, Perms::READ),
        );
        // Not-present → present needs no flush without caching mode, but Linux
        // flushes the context entry for the device anyway on attach.
        self.submit(
            &[InvDescriptor::context_cache(
                Granularity::Selective,
                1,
                rid.0,
                0,
            )],
            true,
        );
    }
}

#[test]
fn linux_boot_map_dma_and_fault() {
    let mut r = Rig::new();
    r.boot();
    // Invalidation event: IECTL is masked after reset, so IF left IP pending.
    r.map_device();
    assert_ne!(r.r32(ICS) & ICS_IWC, 0);
    assert_ne!(r.r32(IECTL) & EV_IP, 0);
    r.w32(ICS, ICS_IWC);
    assert_eq!(r.r32(IECTL) & EV_IP, 0);

    let rid = RequesterId::new(0, 4, 0);
    let view = DmaView::new(r.mem.clone(), rid, r.vtd.clone());
    view.write_obj(0x1122_3344_u32, GuestAddress(0xffff_f010))
        .unwrap();
    assert_eq!(
        r.mem.read_obj::<u32>(GuestAddress(BUF + 0x10)).unwrap(),
        0x1122_3344
    );
    r.mem.write_obj(0x55_u8, GuestAddress(0x61_2345)).unwrap();
    assert_eq!(
        view.read_obj::<u8>(GuestAddress(0x4001_2345)).unwrap(),
        0x55
    );
    assert!(r.msi.messages().is_empty());

    // A write to the read-only 2 MiB page: fault reason 5, a write (T = 0).
    assert!(view.write_obj(0u8, GuestAddress(0x4001_2345)).is_err());
    // A read of an unmapped IOVA: a second record, no second interrupt while one is pending.
    assert!(view.read_obj::<u64>(GuestAddress(0x1000_0000)).is_err());
    let msgs = r.msi.messages();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        msgs[0],
        MsiMessage {
            address: u64::from(FE_ADDR),
            data: 0x41
        }
    );

    // dmar_fault: FSTS, then each record from FRI while F is set.
    let fsts = r.r32(FSTS);
    assert_ne!(fsts & FS_PPF, 0);
    let mut index = ((fsts >> 8) & 0xff) as u64;
    let mut seen = Vec::new();
    loop {
        let reg = FRCD + index * 16;
        let d3 = r.r32(reg + 12);
        if d3 & (1 << 31) == 0 {
            break;
        }
        let reason = d3 & 0xff;
        let read = (d3 >> 30) & 1;
        let sid = r.r32(reg + 8) & 0xffff;
        let addr = r.r64(reg) & !0xfff;
        seen.push((reason, read, sid, addr));
        r.w32(reg + 12, 1 << 31);
        index = (index + 1) % 8;
    }
    r.w32(FSTS, FS_PFO | FS_PPF);
    assert_eq!(
        seen,
        vec![
            (5, 0, u32::from(rid.0), 0x4001_2000),
            (6, 1, u32::from(rid.0), 0x1000_0000)
        ]
    );
    assert_eq!(r.r32(FSTS) & FS_PPF, 0);
    assert_eq!(r.vtd.faults().total(), 2);

    // The next fault interrupts again.
    assert!(view.read_obj::<u8>(GuestAddress(0x2000_0000)).is_err());
    assert_eq!(r.msi.messages().len(), 2);
}

#[test]
fn unmap_needs_invalidation() {
    let mut r = Rig::new();
    r.boot();
    r.map_device();
    let rid = RequesterId::new(0, 4, 0);
    let view = DmaView::new(r.mem.clone(), rid, r.vtd.clone());
    view.write_obj(1u8, GuestAddress(0xffff_f000)).unwrap();
    // dma_pte_clear_range then a page-selective flush: the stale entry may be
    // used until the flush, never after.
    r.put(PT + 0x3000, 511, SlEntry(0));
    assert!(
        view.write_obj(2u8, GuestAddress(0xffff_f000)).is_ok(),
        "stale IOTLB entry allowed"
    );
    r.submit(
        &[InvDescriptor::iotlb(
            Granularity::Selective,
            1,
            0xffff_f000,
            0,
        )],
        false,
    );
    assert!(view.write_obj(3u8, GuestAddress(0xffff_f000)).is_err());
    assert_eq!(r.vtd.faults().entries()[0].reason, FaultReason::WriteDenied);
    // Register-based invalidation works as well (IVA, then IOTLB with IVT).
    r.put(
        PT + 0x3000,
        511,
        SlEntry::page(BUF, PageSize::Size4K, Perms::READ),
    );
    assert!(view.read_obj::<u8>(GuestAddress(0xffff_f000)).is_ok());
    r.put(PT + 0x3000, 511, SlEntry(0));
    r.w64(IVA, 0xffff_f000);
    r.w64(IOTLB, (1 << 63) | (3 << 60) | (1 << 32));
    assert_eq!(r.r64(IOTLB) >> 63, 0, "IVT clears when done");
    assert_eq!((r.r64(IOTLB) >> 57) & 3, 3, "IAIG reports page granularity");
    assert!(view.read_obj::<u8>(GuestAddress(0xffff_f000)).is_err());
    r.w64(CCMD, (1 << 63) | (1 << 61));
    assert_eq!(r.r64(CCMD) >> 63, 0);
}

#[test]
fn hostile_tables_fault_without_panicking() {
    let mut r = Rig::new();
    r.boot();
    // No root entry for bus 0 yet: reason 1; unknown device after mapping: reason 2.
    let view = DmaView::new(r.mem.clone(), RequesterId::new(0, 4, 0), r.vtd.clone());
    assert!(view.read_obj::<u8>(GuestAddress(0)).is_err());
    r.map_device();
    let other = DmaView::new(r.mem.clone(), RequesterId::new(0, 5, 0), r.vtd.clone());
    assert!(other.read_obj::<u8>(GuestAddress(0)).is_err());
    // Root table outside guest memory: reason 8.
    r.w64(RTADDR, 0xfff_0000_0000);
    r.w32(GCMD, r.gcmd | G_SRTP);
    assert!(view.read_obj::<u8>(GuestAddress(0)).is_err());
    let reasons: Vec<u8> = r
        .vtd
        .faults()
        .entries()
        .iter()
        .map(|f| f.reason.vtd_code())
        .collect();
    assert_eq!(reasons, vec![1, 2, 8]);
    // A bad descriptor stops the queue with IQE and IQH on it.
    let head = r.r64(IQH);
    let a = QUEUE + r.tail * 16;
    r.mem.write_obj(0x7u64, GuestAddress(a)).unwrap();
    r.tail += 1;
    r.w32(IQT, (r.tail << 4) as u32);
    assert_ne!(r.r32(FSTS) & FS_IQE, 0);
    assert_eq!(r.r64(IQH), head);
    // Odd sizes and offsets are ignored.
    r.vtd.write(0x3, &[1, 2, 3]);
    let mut b = [0u8; 2];
    r.vtd.read(0xfff, &mut b);
    r.vtd.write(0xffff_ffff_ffff_fff8, &[0; 8]);
}

#[test]
fn state_round_trip() {
    let mut r = Rig::new();
    r.boot();
    let s = r.vtd.state();
    let other = Vtd::new(VtdConfig::default(), r.mem.clone(), r.msi.clone());
    other.restore(s.clone()).unwrap();
    assert_eq!(other.state(), s);
    assert!(other.translation_enabled());
    let mut bad = s;
    bad.frcd.pop();
    assert!(other.restore(bad).is_err());
}
