//! An emulated Intel VT-d DMA-remapping unit for guests (legacy root/context
//! tables, second-level translation, register and queued invalidation, fault
//! recording with the fault event interrupt), served as a [`BusDevice`] at an
//! MMIO base, plus the DMAR ACPI table that announces it.
//!
//! The guest owns the root, context and page tables; the unit reads them from
//! guest memory through vm-memory with checked addresses, caches contexts and
//! translations until the guest invalidates them, and records a fault in its
//! fault recording registers (raising the fault event MSI) whenever a DMA
//! does not translate. Before the guest sets TE, DMA is not translated.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
//! use iovirt_bus::BusDevice;
//! use iovirt_iommu::vtd::{regs, Vtd, VtdConfig};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! let vtd = Vtd::new(VtdConfig::default(), ram, Arc::new(RecordingMsiSink::new()));
//! let mut v = [0u8; 4];
//! vtd.read(regs::VER, &mut v);
//! assert_eq!(u32::from_le_bytes(v), 0x10);
//! let dmar = vtd.dmar_table(0xfed9_0000);
//! assert_eq!(&dmar[..4], b"DMAR");
//! ```

pub mod acpi;
pub mod regs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use iovirt_bus::{BusDevice, MsiMessage, MsiSink};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::entry::{ContextEntry, LargePages, RootEntry, TranslationType};
use crate::fault::{Fault, FaultLog, FaultReason, FaultReporter};
use crate::iotlb::Iotlb;
use crate::types::{Access, Mapping, RequesterId};
use crate::unit::{identity, Translator};
use crate::walk::{walk, GuestTables, WalkConfig};
use regs::*;

/// How an emulated unit presents itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtdConfig {
    /// Deepest page table the unit walks: 4 (48-bit IOVAs) or 5 (57-bit); 3 is always allowed too.
    pub max_levels: u8,
    /// Host address width in bits (39..=52): table and page addresses above it are reserved.
    pub haw: u8,
    /// Number of fault recording registers (1..=256).
    pub fault_records: u16,
    /// Offer pass-through contexts (ECAP.PT).
    pub pass_through: bool,
}

impl Default for VtdConfig {
    fn default() -> Self {
        VtdConfig {
            max_levels: 4,
            haw: 46,
            fault_records: 8,
            pass_through: true,
        }
    }
}

/// The guest-visible register state of a unit: what snapshot and migration save.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtdState {
    /// Global status.
    pub gsts: u32,
    /// Root table address register.
    pub rtaddr: u64,
    /// Root table address latched by the last SRTP.
    pub root: u64,
    /// Context command register.
    pub ccmd: u64,
    /// IOTLB invalidate register.
    pub iotlb: u64,
    /// Invalidate address register.
    pub iva: u64,
    /// Fault status (W1C bits; PPF and FRI are computed).
    pub fsts: u32,
    /// Fault event control.
    pub fectl: u32,
    /// Fault event data.
    pub fedata: u32,
    /// Fault event address.
    pub feaddr: u32,
    /// Fault event upper address.
    pub feuaddr: u32,
    /// Fault recording registers (low, high qwords).
    pub frcd: Vec<(u64, u64)>,
    /// Next fault recording register to fill.
    pub frcd_next: u16,
    /// Protected memory enable.
    pub pmen: u32,
    /// Invalidation queue head.
    pub iqh: u64,
    /// Invalidation queue tail.
    pub iqt: u64,
    /// Invalidation queue address.
    pub iqa: u64,
    /// Invalidation completion status.
    pub ics: u32,
    /// Invalidation event control.
    pub iectl: u32,
    /// Invalidation event data.
    pub iedata: u32,
    /// Invalidation event address.
    pub ieaddr: u32,
    /// Invalidation event upper address.
    pub ieuaddr: u32,
}

impl VtdState {
    /// The power-on state for `records` fault recording registers.
    pub fn power_on(records: u16) -> Self {
        VtdState {
            gsts: 0,
            rtaddr: 0,
            root: 0,
            ccmd: 0,
            iotlb: 0,
            iva: 0,
            fsts: 0,
            fectl: EV_IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            frcd: vec![(0, 0); usize::from(records.clamp(1, 256))],
            frcd_next: 0,
            pmen: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: EV_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
        }
    }
}

/// Why a saved state was refused.
#[derive(Debug, thiserror::Error)]
pub enum VtdStateError {
    /// The fault record count differs from the unit's configuration.
    #[error("state has {got} fault records, the unit has {want}")]
    FaultRecords {
        /// In the state.
        got: usize,
        /// Configured.
        want: usize,
    },
    /// A queue pointer has bits outside its field (18:4).
    #[error("invalidation queue pointer {0:#x} is malformed")]
    QueuePointer(u64),
}

#[derive(Clone, Copy, Debug)]
enum CtxKind {
    PassThrough,
    Translate { did: u16, table: u64, levels: u8 },
}

#[derive(Clone, Copy, Debug)]
struct Ctx {
    kind: CtxKind,
    fpd: bool,
}

/// An emulated VT-d remapping unit over guest-physical memory `M`.
pub struct Vtd<M: GuestMemoryBackend> {
    cfg: VtdConfig,
    cap: u64,
    ecap: u64,
    mem: ArcSwap<M>,
    msi: Arc<dyn MsiSink>,
    regs: Mutex<VtdState>,
    te: AtomicBool,
    contexts: RwLock<HashMap<u16, Ctx>>,
    /// Bumped by every context-cache invalidation (under the write lock).
    ctx_generation: AtomicU64,
    iotlb: Iotlb,
    log: FaultLog,
    reporter: Option<Arc<dyn FaultReporter>>,
}

impl<M: GuestMemoryBackend> std::fmt::Debug for Vtd<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtd")
            .field("cfg", &self.cfg)
            .field("te", &self.te.load(Ordering::Relaxed))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<M: GuestMemoryBackend + Send + Sync> Vtd<M> {
    /// A unit in its power-on state reading tables from `mem` and signalling
    /// fault and invalidation events through `msi`.
    pub fn new(cfg: VtdConfig, mem: M, msi: Arc<dyn MsiSink>) -> Self {
        let cfg = VtdConfig {
            max_levels: cfg.max_levels.clamp(3, 5),
            haw: cfg.haw.clamp(39, 52),
            fault_records: cfg.fault_records.clamp(1, 256),
            ..cfg
        };
        let mgaw = 12 + 9 * u64::from(cfg.max_levels);
        let sagaw: u64 = (3..=cfg.max_levels).map(|l| 1u64 << (l - 2)).sum();
        let cap = 6 // ND: 16-bit domain IDs
            | (sagaw << 8)
            | ((mgaw - 1) << 16)
            | ((FRCD / 16) << 24)
            | (0b11 << 34) // SLLPS: 2 MiB and 1 GiB
            | (1 << 39) // PSI
            | (u64::from(cfg.fault_records - 1) << 40)
            | (18 << 48) // MAMV
            | (1 << 54) // DWD
            | (1 << 55); // DRD
        let ecap = 1 // C: coherent table walks
            | (1 << 1) // QI
            | (u64::from(cfg.pass_through) << 6)
            | ((IVA / 16) << 8); // IRO
        Vtd {
            cfg,
            cap,
            ecap,
            mem: ArcSwap::from_pointee(mem),
            msi,
            regs: Mutex::new(VtdState::power_on(cfg.fault_records)),
            te: AtomicBool::new(false),
            contexts: RwLock::new(HashMap::new()),
            ctx_generation: AtomicU64::new(0),
            iotlb: Iotlb::new(),
            log: FaultLog::default(),
            reporter: None,
        }
    }

    /// Also tell `reporter` about every fault.
    pub fn with_reporter(mut self, reporter: Arc<dyn FaultReporter>) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// Replace the guest memory (after hotplug).
    pub fn set_memory(&self, mem: M) {
        self.mem.store(Arc::new(mem));
    }

    /// The capability register value.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The extended capability register value.
    pub fn ecap(&self) -> u64 {
        self.ecap
    }

    /// Whether the guest enabled translation.
    pub fn translation_enabled(&self) -> bool {
        self.te.load(Ordering::Acquire)
    }

    /// The IOTLB (statistics).
    pub fn iotlb(&self) -> &Iotlb {
        &self.iotlb
    }

    /// The host-side fault log (every fault, including ones the guest's
    /// registers overflowed on or FPD suppressed).
    pub fn faults(&self) -> &FaultLog {
        &self.log
    }

    /// The DMAR table announcing this unit at `base`, covering all PCI devices.
    pub fn dmar_table(&self, base: u64) -> Vec<u8> {
        acpi::dmar_table(
            &[acpi::Drhd {
                base,
                segment: 0,
                include_pci_all: true,
                scopes: Vec::new(),
            }],
            self.cfg.haw,
        )
    }

    /// The guest-visible state.
    pub fn state(&self) -> VtdState {
        lock(&self.regs).clone()
    }

    /// Restore a saved state (caches start empty).
    pub fn restore(&self, state: VtdState) -> Result<(), VtdStateError> {
        let want = usize::from(self.cfg.fault_records);
        if state.frcd.len() != want {
            return Err(VtdStateError::FaultRecords {
                got: state.frcd.len(),
                want,
            });
        }
        for p in [state.iqh, state.iqt] {
            if p & !0x7fff0 != 0 {
                return Err(VtdStateError::QueuePointer(p));
            }
        }
        self.te.store(state.gsts & G_TE != 0, Ordering::Release);
        *lock(&self.regs) = state;
        self.flush_caches();
        Ok(())
    }

    fn flush_caches(&self) {
        let mut c = self.contexts.write().unwrap_or_else(|p| p.into_inner());
        self.ctx_generation.fetch_add(1, Ordering::Release);
        c.clear();
        drop(c);
        self.iotlb.invalidate_all();
    }

    fn read_pair(&self, addr: u64) -> Option<(u64, u64)> {
        let mem = self.mem.load();
        let hi_addr = addr.checked_add(8)?;
        let lo = mem.read_obj::<u64>(GuestAddress(addr)).ok()?;
        let hi = mem.read_obj::<u64>(GuestAddress(hi_addr)).ok()?;
        Some((u64::from_le(lo), u64::from_le(hi)))
    }

    /// Find (and cache) the context of `rid` from the guest's tables.
    fn context(&self, rid: RequesterId) -> Result<Ctx, FaultReason> {
        if let Some(c) = self
            .contexts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rid.0)
        {
            return Ok(*c);
        }
        let generation = self.ctx_generation.load(Ordering::Acquire);
        let root = lock(&self.regs).root;
        let raddr = root
            .checked_add(u64::from(rid.bus()) * RootEntry::SIZE)
            .ok_or(FaultReason::RootTableInvalid)?;
        let (lo, hi) = self.read_pair(raddr).ok_or(FaultReason::RootTableInvalid)?;
        let re = RootEntry::new(lo, hi);
        if !re.present() {
            return Err(FaultReason::RootNotPresent);
        }
        re.check(self.cfg.haw)?;
        let caddr = re
            .context_table()
            .checked_add(u64::from(rid.devfn()) * ContextEntry::SIZE)
            .ok_or(FaultReason::ContextTableInvalid)?;
        let (lo, hi) = self
            .read_pair(caddr)
            .ok_or(FaultReason::ContextTableInvalid)?;
        let ce = ContextEntry::new(lo, hi);
        if !ce.present() {
            return Err(FaultReason::ContextNotPresent);
        }
        ce.check(self.cfg.haw)?;
        let kind = match ce.translation_type() {
            TranslationType::PassThrough if self.cfg.pass_through => CtxKind::PassThrough,
            TranslationType::Translate => match ce.levels() {
                Some(l) if l <= self.cfg.max_levels => CtxKind::Translate {
                    did: ce.domain_id(),
                    table: ce.page_table(),
                    levels: l,
                },
                _ => return Err(FaultReason::InvalidContext),
            },
            _ => return Err(FaultReason::InvalidContext),
        };
        let ctx = Ctx {
            kind,
            fpd: ce.fault_processing_disabled(),
        };
        let mut cache = self.contexts.write().unwrap_or_else(|p| p.into_inner());
        // Not cached if an invalidation ran while the tables were read.
        if self.ctx_generation.load(Ordering::Relaxed) == generation {
            cache.insert(rid.0, ctx);
        }
        Ok(ctx)
    }

    fn walk_config(&self, levels: u8) -> WalkConfig {
        WalkConfig {
            levels,
            haw: self.cfg.haw,
            large: LargePages::ALL,
        }
    }

    // ---- fault recording -------------------------------------------------

    fn send(&self, data: u32, addr: u32, uaddr: u32) {
        let msg = MsiMessage {
            address: (u64::from(uaddr) << 32) | u64::from(addr),
            data,
        };
        if let Err(e) = self.msi.send(msg) {
            log::warn!("VT-d: event interrupt not delivered: {e}");
        }
    }

    /// Raise the fault event: an MSI unless masked, then it stays pending.
    fn fault_event(&self, st: &mut VtdState) {
        if st.fectl & EV_IM != 0 {
            st.fectl |= EV_IP;
        } else {
            st.fectl &= !EV_IP;
            self.send(st.fedata, st.feaddr, st.feuaddr);
        }
    }

    fn pending_fault(st: &VtdState) -> bool {
        st.frcd.iter().any(|r| r.1 & FRCD_F != 0)
    }

    fn record(&self, st: &mut VtdState, f: &Fault) {
        let n = st.frcd.len();
        let i = usize::from(st.frcd_next) % n.max(1);
        let was_pending = Self::pending_fault(st);
        let Some(slot) = st.frcd.get_mut(i) else {
            return;
        };
        if slot.1 & FRCD_F != 0 {
            st.fsts |= FS_PFO;
            return;
        }
        let t = if f.access == Access::Read {
            FRCD_T_READ
        } else {
            0
        };
        *slot = (
            f.iova & !0xfff,
            FRCD_F | t | (u64::from(f.reason.vtd_code()) << 32) | u64::from(f.rid.0),
        );
        st.frcd_next = ((i + 1) % n) as u16;
        if !was_pending {
            self.fault_event(st);
        }
    }

    fn fsts(st: &VtdState) -> u32 {
        let n = st.frcd.len();
        let start = usize::from(st.frcd_next);
        let fri = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| st.frcd.get(i).is_some_and(|r| r.1 & FRCD_F != 0));
        match fri {
            Some(i) => (st.fsts & FS_W1C) | FS_PPF | ((i as u32 & 0xff) << 8),
            None => st.fsts & FS_W1C,
        }
    }

    // ---- invalidation ----------------------------------------------------

    fn invalidate_contexts(&self, g: Granularity, did: u16, sid: u16, fm: u8) {
        let mut c = self.contexts.write().unwrap_or_else(|p| p.into_inner());
        self.ctx_generation.fetch_add(1, Ordering::Release);
        match g {
            Granularity::Domain => c.retain(|_, v| match v.kind {
                CtxKind::Translate { did: d, .. } => d != did,
                CtxKind::PassThrough => true,
            }),
            Granularity::Selective => {
                let mask: u16 = match fm {
                    0 => 0xffff,
                    1 => !4,
                    2 => !6,
                    _ => !7,
                };
                c.retain(|k, _| k & mask != sid & mask)
            }
            // Pass-through contexts carry no DID in the cache: drop them on
            // domain invalidations too would be harmless; keep it simple.
            _ => c.clear(),
        }
    }

    fn invalidate_iotlb(&self, g: Granularity, did: u16, addr: u64, am: u8) {
        match g {
            Granularity::Domain => self.iotlb.invalidate_domain(did),
            Granularity::Selective => self.iotlb.invalidate_pages(did, addr, am),
            _ => self.iotlb.invalidate_all(),
        }
    }

    /// Run the queue from head to tail. Stops at a bad descriptor with IQE set.
    fn run_queue(&self, st: &mut VtdState) {
        if st.gsts & G_QIE == 0 || st.fsts & FS_IQE != 0 {
            return;
        }
        if st.iqa & (1 << 11) != 0 {
            // 256-bit descriptors need scalable mode, which is not offered.
            st.fsts |= FS_IQE;
            self.fault_event(st);
            return;
        }
        let entries = queue_entries(st.iqa);
        let base = st.iqa & !0xfff & ((1u64 << self.cfg.haw) - 1);
        let tail = (st.iqt >> 4) % entries;
        let mut head = (st.iqh >> 4) % entries;
        let mem = self.mem.load_full();
        while head != tail {
            let addr = base.checked_add(head * InvDescriptor::SIZE);
            let mut raw = [0u8; 16];
            let ok = addr.is_some_and(|a| mem.read_slice(&mut raw, GuestAddress(a)).is_ok());
            let d = InvDescriptor::from_bytes(&raw);
            let good = ok
                && match d.kind() {
                    InvKind::ContextCache => {
                        let g = d.granularity();
                        g != Granularity::Reserved && {
                            self.invalidate_contexts(
                                g,
                                d.domain_id(),
                                d.source_id(),
                                d.function_mask(),
                            );
                            true
                        }
                    }
                    InvKind::Iotlb => {
                        let g = d.granularity();
                        g != Granularity::Reserved && {
                            self.invalidate_iotlb(g, d.domain_id(), d.address(), d.address_mask());
                            true
                        }
                    }
                    InvKind::DeviceTlb | InvKind::InterruptEntryCache => true,
                    InvKind::Wait => {
                        let mut ok = true;
                        if d.status_write() {
                            ok = mem
                                .write_obj(
                                    d.status_data().to_le(),
                                    GuestAddress(d.status_address()),
                                )
                                .is_ok();
                        }
                        if ok && d.interrupt_flag() && st.ics & ICS_IWC == 0 {
                            st.ics |= ICS_IWC;
                            if st.iectl & EV_IM != 0 {
                                st.iectl |= EV_IP;
                            } else {
                                self.send(st.iedata, st.ieaddr, st.ieuaddr);
                            }
                        }
                        ok
                    }
                    InvKind::Unsupported(_) => false,
                };
            if !good {
                st.fsts |= FS_IQE;
                st.iqh = head << 4;
                self.fault_event(st);
                return;
            }
            head = (head + 1) % entries;
        }
        st.iqh = head << 4;
    }

    // ---- registers -------------------------------------------------------

    fn read64(&self, st: &VtdState, off: u64) -> u64 {
        let lohi = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
        match off {
            0x00 => 0x10,
            CAP => self.cap,
            ECAP => self.ecap,
            0x18 => lohi(0, st.gsts),
            RTADDR => st.rtaddr,
            CCMD => st.ccmd,
            0x30 => lohi(0, Self::fsts(st)),
            FECTL => lohi(st.fectl, st.fedata),
            FEADDR => lohi(st.feaddr, st.feuaddr),
            0x60 => lohi(0, st.pmen | (st.pmen >> 31)),
            IQH => st.iqh,
            IQT => st.iqt,
            IQA => st.iqa,
            0x98 => lohi(0, st.ics),
            IECTL => lohi(st.iectl, st.iedata),
            IEADDR => lohi(st.ieaddr, st.ieuaddr),
            IVA => st.iva,
            IOTLB => st.iotlb,
            o if o >= FRCD => {
                let i = ((o - FRCD) / 16) as usize;
                match st.frcd.get(i) {
                    Some(r) if (o - FRCD) % 16 == 0 => r.0,
                    Some(r) => r.1,
                    None => 0,
                }
            }
            _ => 0,
        }
    }

    fn write32(&self, st: &mut VtdState, off: u64, v: u32) {
        let set_lo = |r: &mut u64, v: u32| *r = (*r & !0xffff_ffff) | u64::from(v);
        let set_hi = |r: &mut u64, v: u32| *r = (*r & 0xffff_ffff) | (u64::from(v) << 32);
        match off {
            GCMD => self.gcmd(st, v),
            RTADDR => set_lo(&mut st.rtaddr, v & !0x3ff),
            0x24 => set_hi(&mut st.rtaddr, v),
            CCMD => set_lo(&mut st.ccmd, v),
            0x2c => {
                set_hi(&mut st.ccmd, v);
                if st.ccmd & (1 << 63) != 0 {
                    let g = match (st.ccmd >> 61) & 3 {
                        1 => Granularity::Global,
                        2 => Granularity::Domain,
                        3 => Granularity::Selective,
                        _ => Granularity::Reserved,
                    };
                    let cirg = (st.ccmd >> 61) & 3;
                    if g != Granularity::Reserved {
                        self.invalidate_contexts(
                            g,
                            st.ccmd as u16,
                            (st.ccmd >> 16) as u16,
                            ((st.ccmd >> 32) & 3) as u8,
                        );
                    }
                    // Done: clear ICC, report the granularity performed in CAIG.
                    st.ccmd = (st.ccmd & !(1 << 63) & !(3 << 59)) | (cirg << 59);
                }
            }
            FSTS => st.fsts &= !(v & FS_W1C),
            FECTL => {
                st.fectl = (st.fectl & EV_IP) | (v & EV_IM);
                if st.fectl & EV_IM == 0 && st.fectl & EV_IP != 0 {
                    st.fectl &= !EV_IP;
                    self.send(st.fedata, st.feaddr, st.feuaddr);
                }
            }
            FEDATA => st.fedata = v,
            FEADDR => st.feaddr = v & !3,
            FEUADDR => st.feuaddr = v,
            PMEN => st.pmen = v & PMEN_EPM,
            IQT => {
                st.iqt = u64::from(v & 0x7fff0);
                self.run_queue(st);
            }
            IQA => set_lo(&mut st.iqa, v & !0x7f8),
            0x94 => set_hi(&mut st.iqa, v),
            ICS if v & ICS_IWC != 0 => {
                st.ics &= !ICS_IWC;
                st.iectl &= !EV_IP;
            }
            IECTL => {
                st.iectl = (st.iectl & EV_IP) | (v & EV_IM);
                if st.iectl & EV_IM == 0 && st.iectl & EV_IP != 0 {
                    st.iectl &= !EV_IP;
                    self.send(st.iedata, st.ieaddr, st.ieuaddr);
                }
            }
            IEDATA => st.iedata = v,
            IEADDR => st.ieaddr = v & !3,
            IEUADDR => st.ieuaddr = v,
            IVA => set_lo(&mut st.iva, v & !0xf80),
            0x204 => set_hi(&mut st.iva, v),
            IOTLB => set_lo(&mut st.iotlb, v),
            0x20c => {
                set_hi(&mut st.iotlb, v);
                if st.iotlb & (1 << 63) != 0 {
                    let iirg = (st.iotlb >> 60) & 3;
                    let g = match iirg {
                        1 => Granularity::Global,
                        2 => Granularity::Domain,
                        3 => Granularity::Selective,
                        _ => Granularity::Reserved,
                    };
                    let did = (st.iotlb >> 32) as u16;
                    if g != Granularity::Reserved {
                        self.invalidate_iotlb(g, did, st.iva & !0xfff, (st.iva & 0x3f) as u8);
                    }
                    st.iotlb = (st.iotlb & !(1 << 63) & !(3 << 57)) | (iirg << 57);
                }
            }
            o if o >= FRCD && (o - FRCD) % 16 == 12 => {
                let i = ((o - FRCD) / 16) as usize;
                if v & (1 << 31) != 0 {
                    if let Some(r) = st.frcd.get_mut(i) {
                        r.1 &= !FRCD_F;
                    }
                }
            }
            _ => {}
        }
    }

    fn gcmd(&self, st: &mut VtdState, v: u32) {
        if v & G_SRTP != 0 {
            st.root = st.rtaddr & !0xfff & ((1u64 << self.cfg.haw) - 1);
            st.gsts |= G_SRTP;
            // A new root table: nothing cached may survive.
            self.flush_caches();
        }
        if v & G_QIE != 0 && st.gsts & G_QIE == 0 {
            st.iqh = 0;
            st.gsts |= G_QIE;
        } else if v & G_QIE == 0 && st.gsts & G_QIE != 0 {
            st.gsts &= !G_QIE;
            st.iqh = 0;
        }
        if v & G_TE != 0 && st.gsts & G_TE == 0 {
            st.gsts |= G_TE;
            self.te.store(true, Ordering::Release);
        } else if v & G_TE == 0 && st.gsts & G_TE != 0 {
            st.gsts &= !G_TE;
            self.te.store(false, Ordering::Release);
        }
        // CFI is accepted as-is; WBF completes at once; SFL, EAFL, IRE, SIRTP are not offered.
        st.gsts = (st.gsts & !G_CFI) | (v & G_CFI);
    }
}

fn queue_entries(iqa: u64) -> u64 {
    256u64 << (iqa & 7)
}

impl<M: GuestMemoryBackend + Send + Sync> Translator for Vtd<M> {
    fn translate(
        &self,
        rid: RequesterId,
        iova: u64,
        access: Access,
    ) -> Result<Mapping, FaultReason> {
        if !self.te.load(Ordering::Acquire) {
            return Ok(identity(iova));
        }
        let (did, table, levels) = match self.context(rid)?.kind {
            CtxKind::PassThrough => return Ok(identity(iova)),
            CtxKind::Translate { did, table, levels } => (did, table, levels),
        };
        if let Some(m) = self.iotlb.lookup(did, iova) {
            if m.perms.contains(access.perm()) {
                return Ok(m);
            }
        }
        let generation = self.iotlb.generation();
        let mem = self.mem.load();
        let m = walk(&GuestTables(&**mem), table, &self.walk_config(levels), iova).map_err(
            |r| match r {
                FaultReason::ReadDenied => FaultReason::denied(access),
                r => r,
            },
        )?;
        self.iotlb.insert_if_current(did, &m, generation);
        if m.perms.contains(access.perm()) {
            Ok(m)
        } else {
            Err(FaultReason::denied(access))
        }
    }

    fn report_fault(&self, fault: Fault) {
        log::debug!("VT-d: {fault}");
        self.log.record(fault);
        if let Some(r) = &self.reporter {
            r.report(&fault);
        }
        let fpd = self
            .contexts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fault.rid.0)
            .is_some_and(|c| c.fpd);
        if !fpd {
            self.record(&mut lock(&self.regs), &fault);
        }
    }
}

impl<M: GuestMemoryBackend + Send + Sync> BusDevice for Vtd<M> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let st = lock(&self.regs);
        let len = data.len() as u64;
        let ok = (len == 4 || len == 8) && offset % len == 0 && offset < MMIO_SIZE;
        let v = if ok {
            let q = self.read64(&st, offset & !7);
            if len == 4 && offset & 4 != 0 {
                q >> 32
            } else {
                q
            }
        } else {
            0
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.checked_shr(8 * i as u32).unwrap_or(0) as u8;
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !((len == 4 || len == 8) && offset % len == 0 && offset < MMIO_SIZE) {
            return;
        }
        let mut b = [0u8; 8];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let v = u64::from_le_bytes(b);
        let mut st = lock(&self.regs);
        self.write32(&mut st, offset, v as u32);
        if len == 8 {
            self.write32(&mut st, offset + 4, (v >> 32) as u32);
        }
    }
}

#[cfg(test)]
mod tests;
