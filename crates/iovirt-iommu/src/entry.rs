//! Typed views of the VT-d remapping structures (legacy mode): root entries,
//! context entries and second-level paging entries.
//!
//! Each view wraps the raw little-endian words; `check` validates reserved
//! fields once, after which the accessors only name bit ranges. All bit
//! positions live in the private `field` module.

use crate::fault::FaultReason;
use crate::types::{PageSize, Perms};

mod field {
    /// Root entry, low qword: present.
    pub const ROOT_P: u64 = 1;
    /// Root entry, low qword: bits 11:1 reserved.
    pub const ROOT_RSVD_LO: u64 = 0xffe;
    /// Context entry, low qword: present.
    pub const CTX_P: u64 = 1;
    /// Context entry, low qword: fault processing disable.
    pub const CTX_FPD: u64 = 1 << 1;
    /// Context entry, low qword: translation type, bits 3:2.
    pub const CTX_TT_SHIFT: u32 = 2;
    /// Context entry, low qword: bits 11:4 reserved.
    pub const CTX_RSVD_LO: u64 = 0xff0;
    /// Context entry, high qword: address width, bits 2:0.
    pub const CTX_AW_MASK: u64 = 7;
    /// Context entry, high qword: bit 7 and bits 63:24 reserved.
    pub const CTX_RSVD_HI: u64 = (1 << 7) | !((1u64 << 24) - 1);
    /// Context entry, high qword: domain ID, bits 23:8.
    pub const CTX_DID_SHIFT: u32 = 8;
    /// Paging entry: read.
    pub const SL_R: u64 = 1;
    /// Paging entry: write.
    pub const SL_W: u64 = 1 << 1;
    /// Paging entry: page size (leaf at level 2 or 3).
    pub const SL_PS: u64 = 1 << 7;
    /// Paging entry, non-leaf: bits 6:3 reserved (memory type fields are leaf-only).
    pub const SL_RSVD_NONLEAF: u64 = 0x78;
    /// Address bits 51:12.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
}

/// Mask of the address bits below `haw` (host address width) from bit 12 up.
fn addr_mask(haw: u8) -> u64 {
    let haw = haw.clamp(32, 52);
    field::ADDR_MASK & ((1u64 << haw) - 1)
}

/// A root-table entry (one per bus): where that bus's context table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootEntry {
    lo: u64,
    hi: u64,
}

impl RootEntry {
    /// Size of an entry in bytes.
    pub const SIZE: u64 = 16;

    /// Wrap the two qwords read from the root table.
    pub fn new(lo: u64, hi: u64) -> Self {
        RootEntry { lo, hi }
    }
    /// Build a present entry pointing at `context_table` (4 KiB aligned).
    pub fn with_context_table(context_table: u64) -> Self {
        RootEntry {
            lo: (context_table & field::ADDR_MASK) | field::ROOT_P,
            hi: 0,
        }
    }
    /// The raw qwords (low, high).
    pub fn raw(&self) -> (u64, u64) {
        (self.lo, self.hi)
    }
    /// Whether the entry is present.
    pub fn present(&self) -> bool {
        self.lo & field::ROOT_P != 0
    }
    /// Check reserved fields against host address width `haw`.
    pub fn check(&self, haw: u8) -> Result<(), FaultReason> {
        let rsvd =
            field::ROOT_RSVD_LO | (field::ADDR_MASK & !addr_mask(haw)) | 0xfff0_0000_0000_0000;
        if self.lo & rsvd != 0 || self.hi != 0 {
            return Err(FaultReason::RootReserved);
        }
        Ok(())
    }
    /// The context table's address.
    pub fn context_table(&self) -> u64 {
        self.lo & field::ADDR_MASK
    }
}

/// How a context entry says a device's DMA is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslationType {
    /// Untranslated requests go through second-level translation (TT = 00).
    Translate,
    /// Device-TLB (ATS) requests allowed as well (TT = 01); needs ECAP.DT.
    TranslateWithDeviceTlb,
    /// Pass-through: IOVA = GPA (TT = 10); needs ECAP.PT.
    PassThrough,
    /// TT = 11, reserved.
    Reserved,
}

/// A context-table entry (one per device and function): domain, page table and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextEntry {
    lo: u64,
    hi: u64,
}

impl ContextEntry {
    /// Size of an entry in bytes.
    pub const SIZE: u64 = 16;

    /// Wrap the two qwords read from the context table.
    pub fn new(lo: u64, hi: u64) -> Self {
        ContextEntry { lo, hi }
    }
    /// Build a present, translating entry for domain `did` with the page table at
    /// `table` walked with `levels` levels (3, 4 or 5).
    pub fn translating(did: u16, table: u64, levels: u8) -> Self {
        let aw = u64::from(levels.saturating_sub(2)) & field::CTX_AW_MASK;
        ContextEntry {
            lo: (table & field::ADDR_MASK) | field::CTX_P,
            hi: aw | (u64::from(did) << field::CTX_DID_SHIFT),
        }
    }
    /// Build a present pass-through entry for domain `did`.
    pub fn pass_through(did: u16) -> Self {
        ContextEntry {
            lo: field::CTX_P | (2 << field::CTX_TT_SHIFT),
            hi: 2 | (u64::from(did) << field::CTX_DID_SHIFT),
        }
    }
    /// The raw qwords (low, high).
    pub fn raw(&self) -> (u64, u64) {
        (self.lo, self.hi)
    }
    /// Whether the entry is present.
    pub fn present(&self) -> bool {
        self.lo & field::CTX_P != 0
    }
    /// Whether fault recording is disabled for this device (FPD).
    pub fn fault_processing_disabled(&self) -> bool {
        self.lo & field::CTX_FPD != 0
    }
    /// Check reserved fields against host address width `haw`.
    pub fn check(&self, haw: u8) -> Result<(), FaultReason> {
        let rsvd_lo =
            field::CTX_RSVD_LO | (field::ADDR_MASK & !addr_mask(haw)) | 0xfff0_0000_0000_0000;
        if self.lo & rsvd_lo != 0 || self.hi & field::CTX_RSVD_HI != 0 {
            return Err(FaultReason::ContextReserved);
        }
        Ok(())
    }
    /// The translation type (TT).
    pub fn translation_type(&self) -> TranslationType {
        match (self.lo >> field::CTX_TT_SHIFT) & 3 {
            0 => TranslationType::Translate,
            1 => TranslationType::TranslateWithDeviceTlb,
            2 => TranslationType::PassThrough,
            _ => TranslationType::Reserved,
        }
    }
    /// The second-level page table pointer (SLPTPTR).
    pub fn page_table(&self) -> u64 {
        self.lo & field::ADDR_MASK
    }
    /// The paging levels the address width field (AW) selects: 3, 4 or 5; `None` if reserved.
    pub fn levels(&self) -> Option<u8> {
        match self.hi & field::CTX_AW_MASK {
            1 => Some(3),
            2 => Some(4),
            3 => Some(5),
            _ => None,
        }
    }
    /// The domain ID (DID).
    pub fn domain_id(&self) -> u16 {
        (self.hi >> field::CTX_DID_SHIFT) as u16
    }
}

/// A second-level paging entry (any level): R/W rights, PS, and the address of
/// the next table or of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlEntry(pub u64);

/// What a paging entry means at its level, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlKind {
    /// Neither R nor W: nothing is mapped below.
    NotPresent,
    /// Points to the next-level table at this address.
    Table(u64),
    /// Maps a page of this size at this address.
    Page(u64, PageSize),
}

/// Which large pages a walk accepts (VT-d CAP.SLLPS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LargePages {
    /// 2 MiB pages (PS at level 2).
    pub size_2m: bool,
    /// 1 GiB pages (PS at level 3).
    pub size_1g: bool,
}

impl LargePages {
    /// Both large sizes.
    pub const ALL: LargePages = LargePages {
        size_2m: true,
        size_1g: true,
    };
    /// Whether `size` is allowed.
    pub fn allows(&self, size: PageSize) -> bool {
        match size {
            PageSize::Size4K => true,
            PageSize::Size2M => self.size_2m,
            PageSize::Size1G => self.size_1g,
        }
    }
}

impl SlEntry {
    /// An entry pointing to the next-level table at `table`, with both rights.
    pub fn table(table: u64) -> Self {
        SlEntry((table & field::ADDR_MASK) | field::SL_R | field::SL_W)
    }
    /// A leaf entry mapping `gpa` as a page of `size` with `perms`.
    pub fn page(gpa: u64, size: PageSize, perms: Perms) -> Self {
        let ps = if size == PageSize::Size4K {
            0
        } else {
            field::SL_PS
        };
        SlEntry((gpa & field::ADDR_MASK & !(size.bytes() - 1)) | ps | u64::from(perms.bits()))
    }
    /// The rights this entry grants (R and W bits).
    pub fn perms(&self) -> Perms {
        Perms::from_bits_truncate((self.0 & (field::SL_R | field::SL_W)) as u8)
    }
    /// Interpret the entry at `level` (1 = SL-PTE ... 5 = SL-PML5E), checking
    /// reserved fields against host address width `haw` and the allowed large pages.
    pub fn decode(&self, level: u8, haw: u8, large: LargePages) -> Result<SlKind, FaultReason> {
        if self.perms().is_empty() {
            return Ok(SlKind::NotPresent);
        }
        let rsvd_addr = field::ADDR_MASK & !addr_mask(haw);
        if self.0 & rsvd_addr != 0 {
            return Err(FaultReason::PagingReserved);
        }
        let addr = self.0 & addr_mask(haw);
        let ps = self.0 & field::SL_PS != 0;
        if level == 1 {
            return Ok(SlKind::Page(addr, PageSize::Size4K));
        }
        if ps {
            let size = match PageSize::at_level(level) {
                Some(s) if large.allows(s) => s,
                _ => return Err(FaultReason::PagingReserved),
            };
            if addr & (size.bytes() - 1) != 0 {
                return Err(FaultReason::PagingReserved);
            }
            return Ok(SlKind::Page(addr, size));
        }
        if self.0 & field::SL_RSVD_NONLEAF != 0 {
            return Err(FaultReason::PagingReserved);
        }
        Ok(SlKind::Table(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let c = ContextEntry::translating(7, 0x12_3000, 4);
        assert!(c.present());
        assert_eq!(c.domain_id(), 7);
        assert_eq!(c.levels(), Some(4));
        assert_eq!(c.page_table(), 0x12_3000);
        assert_eq!(c.translation_type(), TranslationType::Translate);
        assert!(c.check(46).is_ok());
        assert!(ContextEntry::new(1 << 5 | 1, 2).check(46).is_err());
        let r = RootEntry::with_context_table(0x5000);
        assert!(r.present() && r.check(46).is_ok());
        assert_eq!(r.context_table(), 0x5000);
        assert_eq!(
            RootEntry::new(1, 1).check(46),
            Err(FaultReason::RootReserved)
        );

        let e = SlEntry::page(0x4000_0000, PageSize::Size1G, Perms::READ);
        assert_eq!(
            e.decode(3, 46, LargePages::ALL),
            Ok(SlKind::Page(0x4000_0000, PageSize::Size1G))
        );
        // PS at level 4 is reserved; a misaligned 2 MiB page is reserved.
        assert_eq!(
            e.decode(4, 46, LargePages::ALL),
            Err(FaultReason::PagingReserved)
        );
        assert_eq!(
            SlEntry(0x1000 | 0x80 | 1).decode(2, 46, LargePages::ALL),
            Err(FaultReason::PagingReserved)
        );
        // Address bits above the host address width are reserved.
        assert_eq!(
            SlEntry::table(1 << 47).decode(4, 46, LargePages::ALL),
            Err(FaultReason::PagingReserved)
        );
        assert_eq!(
            SlEntry(0).decode(4, 46, LargePages::ALL),
            Ok(SlKind::NotPresent)
        );
    }
}
