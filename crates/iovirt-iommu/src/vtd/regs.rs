//! Register offsets and bits of a VT-d remapping unit, and the typed view of
//! invalidation descriptors.

/// Version register (32-bit): major in bits 7:4, minor in 3:0.
pub const VER: u64 = 0x00;
/// Capability register (64-bit, read-only).
pub const CAP: u64 = 0x08;
/// Extended capability register (64-bit, read-only).
pub const ECAP: u64 = 0x10;
/// Global command register (32-bit, write-only).
pub const GCMD: u64 = 0x18;
/// Global status register (32-bit, read-only).
pub const GSTS: u64 = 0x1c;
/// Root table address register (64-bit).
pub const RTADDR: u64 = 0x20;
/// Context command register (64-bit): register-based context-cache invalidation.
pub const CCMD: u64 = 0x28;
/// Fault status register (32-bit).
pub const FSTS: u64 = 0x34;
/// Fault event control register (32-bit): IM (mask) and IP (pending).
pub const FECTL: u64 = 0x38;
/// Fault event data register (MSI data).
pub const FEDATA: u64 = 0x3c;
/// Fault event address register (MSI address, low).
pub const FEADDR: u64 = 0x40;
/// Fault event upper address register (MSI address, high).
pub const FEUADDR: u64 = 0x44;
/// Protected memory enable register (32-bit).
pub const PMEN: u64 = 0x64;
/// Invalidation queue head (64-bit, read-only): byte offset of the next descriptor.
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64-bit): byte offset past the last descriptor software queued.
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64-bit): base, descriptor width and size.
pub const IQA: u64 = 0x90;
/// Invalidation completion status (32-bit): IWC.
pub const ICS: u64 = 0x9c;
/// Invalidation event control (32-bit).
pub const IECTL: u64 = 0xa0;
/// Invalidation event data.
pub const IEDATA: u64 = 0xa4;
/// Invalidation event address.
pub const IEADDR: u64 = 0xa8;
/// Invalidation event upper address.
pub const IEUADDR: u64 = 0xac;
/// Offset of the IOTLB registers (ECAP.IRO × 16): IVA here, IOTLB at +8.
pub const IVA: u64 = 0x200;
/// IOTLB invalidate register (64-bit).
pub const IOTLB: u64 = 0x208;
/// First fault recording register (CAP.FRO × 16); 16 bytes each.
pub const FRCD: u64 = 0x220;
/// Size of the register set.
pub const MMIO_SIZE: u64 = 0x1000;

/// GCMD/GSTS: translation enable / status.
pub const G_TE: u32 = 1 << 31;
/// GCMD: set root table pointer; GSTS: root table pointer status.
pub const G_SRTP: u32 = 1 << 30;
/// GCMD: set fault log; GSTS: fault log status.
pub const G_SFL: u32 = 1 << 29;
/// GCMD/GSTS: advanced fault logging enable.
pub const G_EAFL: u32 = 1 << 28;
/// GCMD: write buffer flush; GSTS: its status.
pub const G_WBF: u32 = 1 << 27;
/// GCMD/GSTS: queued invalidation enable.
pub const G_QIE: u32 = 1 << 26;
/// GCMD/GSTS: interrupt remapping enable (not supported here).
pub const G_IRE: u32 = 1 << 25;
/// GCMD: set interrupt remap table pointer.
pub const G_SIRTP: u32 = 1 << 24;
/// GCMD/GSTS: compatibility format interrupts.
pub const G_CFI: u32 = 1 << 23;

/// FSTS: primary fault overflow (W1C).
pub const FS_PFO: u32 = 1 << 0;
/// FSTS: primary pending fault (read-only: some fault record has F set).
pub const FS_PPF: u32 = 1 << 1;
/// FSTS: invalidation queue error (W1C).
pub const FS_IQE: u32 = 1 << 4;
/// FSTS: the W1C bits (PFO, AFO, APF, IQE, ICE, ITE).
pub const FS_W1C: u32 = 0x7d;
/// FECTL/IECTL: interrupt mask.
pub const EV_IM: u32 = 1 << 31;
/// FECTL/IECTL: interrupt pending (read-only).
pub const EV_IP: u32 = 1 << 30;
/// ICS: invalidation wait descriptor complete.
pub const ICS_IWC: u32 = 1;
/// PMEN: enable protected memory (bit 31); PRS (bit 0) mirrors it.
pub const PMEN_EPM: u32 = 1 << 31;

/// Fault record, high qword: fault (F) bit.
pub const FRCD_F: u64 = 1 << 63;
/// Fault record, high qword: type bit (1 = read request).
pub const FRCD_T_READ: u64 = 1 << 62;

/// The kinds of 128-bit invalidation descriptors (bits 3:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvKind {
    /// Context-cache invalidate (type 1).
    ContextCache,
    /// IOTLB invalidate (type 2).
    Iotlb,
    /// Device-TLB invalidate (type 3).
    DeviceTlb,
    /// Interrupt entry cache invalidate (type 4).
    InterruptEntryCache,
    /// Invalidation wait (type 5).
    Wait,
    /// Anything else (PASID types, reserved): an invalidation queue error.
    Unsupported(u8),
}

/// Invalidation granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// Everything.
    Global,
    /// One domain.
    Domain,
    /// One device (context cache) or some pages (IOTLB).
    Selective,
    /// Granularity 0, reserved.
    Reserved,
}

/// A typed view of one 128-bit invalidation descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvDescriptor {
    lo: u64,
    hi: u64,
}

impl InvDescriptor {
    /// Size in bytes.
    pub const SIZE: u64 = 16;

    /// Wrap the two qwords read from the queue.
    pub fn new(lo: u64, hi: u64) -> Self {
        InvDescriptor { lo, hi }
    }
    /// Parse from 16 little-endian bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&b[..8]);
        hi.copy_from_slice(&b[8..]);
        InvDescriptor {
            lo: u64::from_le_bytes(lo),
            hi: u64::from_le_bytes(hi),
        }
    }
    /// The raw qwords.
    pub fn raw(&self) -> (u64, u64) {
        (self.lo, self.hi)
    }
    /// Descriptor type (bits 3:0, with the extended type bits 11:9 required zero).
    pub fn kind(&self) -> InvKind {
        let t = (self.lo & 0xf) as u8;
        if (self.lo >> 9) & 7 != 0 {
            return InvKind::Unsupported(t | 0x80);
        }
        match t {
            1 => InvKind::ContextCache,
            2 => InvKind::Iotlb,
            3 => InvKind::DeviceTlb,
            4 => InvKind::InterruptEntryCache,
            5 => InvKind::Wait,
            t => InvKind::Unsupported(t),
        }
    }
    /// Granularity (bits 5:4) of context-cache and IOTLB descriptors.
    pub fn granularity(&self) -> Granularity {
        match (self.lo >> 4) & 3 {
            1 => Granularity::Global,
            2 => Granularity::Domain,
            3 => Granularity::Selective,
            _ => Granularity::Reserved,
        }
    }
    /// Domain ID (bits 31:16).
    pub fn domain_id(&self) -> u16 {
        (self.lo >> 16) as u16
    }
    /// Context-cache: source ID (bits 47:32).
    pub fn source_id(&self) -> u16 {
        (self.lo >> 32) as u16
    }
    /// Context-cache: function mask (bits 49:48).
    pub fn function_mask(&self) -> u8 {
        ((self.lo >> 48) & 3) as u8
    }
    /// IOTLB: page address (high qword bits 63:12).
    pub fn address(&self) -> u64 {
        self.hi & !0xfff
    }
    /// IOTLB: address mask (high qword bits 5:0): 2^am pages.
    pub fn address_mask(&self) -> u8 {
        (self.hi & 0x3f) as u8
    }
    /// Wait: raise the invalidation completion interrupt (IF, bit 4).
    pub fn interrupt_flag(&self) -> bool {
        self.lo & (1 << 4) != 0
    }
    /// Wait: write the status data (SW, bit 5).
    pub fn status_write(&self) -> bool {
        self.lo & (1 << 5) != 0
    }
    /// Wait: status data (bits 63:32).
    pub fn status_data(&self) -> u32 {
        (self.lo >> 32) as u32
    }
    /// Wait: status address (high qword bits 63:2).
    pub fn status_address(&self) -> u64 {
        self.hi & !3
    }

    /// A context-cache invalidation descriptor (for tests and drivers).
    pub fn context_cache(g: Granularity, did: u16, sid: u16, fm: u8) -> Self {
        InvDescriptor {
            lo: 1
                | (gran_bits(g) << 4)
                | (u64::from(did) << 16)
                | (u64::from(sid) << 32)
                | (u64::from(fm & 3) << 48),
            hi: 0,
        }
    }
    /// An IOTLB invalidation descriptor (drain reads and writes set, as Linux does).
    pub fn iotlb(g: Granularity, did: u16, addr: u64, am: u8) -> Self {
        InvDescriptor {
            lo: 2 | (gran_bits(g) << 4) | (3 << 6) | (u64::from(did) << 16),
            hi: (addr & !0xfff) | u64::from(am & 0x3f),
        }
    }
    /// A wait descriptor writing `data` to `addr` (and raising the interrupt if `irq`).
    pub fn wait(data: u32, addr: u64, irq: bool) -> Self {
        InvDescriptor {
            lo: 5 | (1 << 5) | (u64::from(irq) << 4) | (u64::from(data) << 32),
            hi: addr & !3,
        }
    }
}

fn gran_bits(g: Granularity) -> u64 {
    match g {
        Granularity::Global => 1,
        Granularity::Domain => 2,
        Granularity::Selective => 3,
        Granularity::Reserved => 0,
    }
}
