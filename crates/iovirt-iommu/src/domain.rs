//! Host-built page tables: a domain whose second-level tables the VMM (or a
//! virtio-iommu device) writes through `map`/`unmap`, in the same format the
//! walker reads from guest memory.

use crate::entry::{SlEntry, SlKind};
use crate::fault::FaultReason;
use crate::types::{Mapping, PageSize, Perms};
use crate::walk::{walk, TableSource, WalkConfig};

/// Why a host-side map or unmap was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// Address or length not 4 KiB aligned.
    #[error("{what} {value:#x} is not 4 KiB aligned")]
    Unaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// The range is empty, wraps, or reaches past the domain's IOVA width.
    #[error("range {iova:#x}+{len:#x} is outside the {bits}-bit IOVA space")]
    OutOfRange {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        len: u64,
        /// IOVA width of the domain.
        bits: u32,
    },
    /// A mapping must grant read, write or both.
    #[error("a mapping needs read or write permission")]
    NoPermission,
    /// The domain's page-table budget is exhausted (the range stays unmapped).
    #[error("page-table budget of {0} tables exhausted")]
    TooManyTables(usize),
    /// The guest-physical range wraps or exceeds the host address width.
    #[error("guest-physical range {gpa:#x}+{len:#x} is out of range")]
    GpaOutOfRange {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

const ENTRIES: usize = 512;

/// A page table in VT-d second-level format held in host memory.
///
/// Table "addresses" are arena indices shifted by 12, so the walker treats
/// them like guest-physical table pointers. Mapping a range picks the largest
/// page size that alignment allows; unmapping part of a large page splits it.
#[derive(Debug, Clone)]
pub struct HostDomain {
    cfg: WalkConfig,
    tables: Vec<Option<Box<[u64; ENTRIES]>>>,
    free: Vec<usize>,
    max_tables: usize,
}

/// Default page-table budget of a domain: 16384 tables (64 MiB), enough for
/// 32 GiB mapped in 4 KiB pages and far more with large pages.
pub const DEFAULT_MAX_TABLES: usize = 16384;

impl HostDomain {
    /// An empty domain with the given table shape (3, 4 or 5 levels).
    pub fn new(cfg: WalkConfig) -> Self {
        let cfg = WalkConfig {
            levels: cfg.levels.clamp(3, 5),
            ..cfg
        };
        HostDomain {
            cfg,
            tables: vec![Some(Box::new([0; ENTRIES]))],
            free: Vec::new(),
            max_tables: DEFAULT_MAX_TABLES,
        }
    }

    /// Limit the tables this domain may allocate (at least 5): a guest that
    /// programs the domain (virtio-iommu) cannot make the host allocate more.
    pub fn with_table_limit(mut self, max_tables: usize) -> Self {
        self.max_tables = max_tables.max(5);
        self
    }

    /// The table shape.
    pub fn config(&self) -> &WalkConfig {
        &self.cfg
    }

    /// Number of tables in use (for tests of reclamation and for statistics).
    pub fn table_count(&self) -> usize {
        self.tables.len() - self.free.len()
    }

    fn alloc(&mut self) -> Result<usize, DomainError> {
        if self.table_count() >= self.max_tables {
            return Err(DomainError::TooManyTables(self.max_tables));
        }
        if let Some(i) = self.free.pop() {
            if let Some(slot) = self.tables.get_mut(i) {
                *slot = Some(Box::new([0; ENTRIES]));
                return Ok(i);
            }
        }
        self.tables.push(Some(Box::new([0; ENTRIES])));
        Ok(self.tables.len() - 1)
    }

    fn release(&mut self, index: usize, level: u8) {
        let Some(Some(t)) = self.tables.get_mut(index).map(Option::take) else {
            return;
        };
        if level > 1 {
            for &e in t.iter() {
                if let Ok(SlKind::Table(next)) =
                    SlEntry(e).decode(level, self.cfg.haw, self.cfg.large)
                {
                    self.release((next >> 12) as usize, level - 1);
                }
            }
        }
        self.free.push(index);
    }

    fn entry(&self, table: usize, index: usize) -> u64 {
        self.tables
            .get(table)
            .and_then(|t| t.as_ref())
            .and_then(|t| t.get(index))
            .copied()
            .unwrap_or(0)
    }

    fn set(&mut self, table: usize, index: usize, value: u64) {
        if let Some(Some(t)) = self.tables.get_mut(table) {
            if let Some(e) = t.get_mut(index) {
                *e = value;
            }
        }
    }

    fn check_range(&self, iova: u64, len: u64) -> Result<u64, DomainError> {
        for (what, value) in [("IOVA", iova), ("length", len)] {
            if value & 0xfff != 0 {
                return Err(DomainError::Unaligned { what, value });
            }
        }
        let bits = self.cfg.iova_bits();
        match iova.checked_add(len) {
            Some(end) if len != 0 && end <= 1u64 << bits => Ok(end),
            _ => Err(DomainError::OutOfRange { iova, len, bits }),
        }
    }

    /// Map `len` bytes at `iova` to `gpa` with `perms`, replacing what was
    /// mapped there. Uses 1 GiB and 2 MiB pages where both addresses align.
    /// The caller invalidates IOTLBs when it replaces existing mappings.
    pub fn map(&mut self, iova: u64, gpa: u64, len: u64, perms: Perms) -> Result<(), DomainError> {
        let end = self.check_range(iova, len)?;
        if gpa & 0xfff != 0 {
            return Err(DomainError::Unaligned {
                what: "GPA",
                value: gpa,
            });
        }
        match gpa.checked_add(len) {
            Some(e) if e <= 1u64 << self.cfg.haw.min(63) => {}
            _ => return Err(DomainError::GpaOutOfRange { gpa, len }),
        }
        if perms.is_empty() {
            return Err(DomainError::NoPermission);
        }
        let mut a = iova;
        while a < end {
            let g = gpa + (a - iova);
            let left = end - a;
            let size = [PageSize::Size1G, PageSize::Size2M]
                .into_iter()
                .find(|s| {
                    self.cfg.large.allows(*s)
                        && a & (s.bytes() - 1) == 0
                        && g & (s.bytes() - 1) == 0
                        && left >= s.bytes()
                })
                .unwrap_or(PageSize::Size4K);
            if let Err(e) = self.set_leaf(a, SlEntry::page(g, size, perms), size) {
                // Leave nothing half-mapped.
                if a > iova {
                    let _ = self.unmap(iova, a - iova);
                }
                return Err(e);
            }
            a += size.bytes();
        }
        Ok(())
    }

    /// Write `leaf` for the page of `size` at `iova`, creating or splitting tables.
    fn set_leaf(&mut self, iova: u64, leaf: SlEntry, size: PageSize) -> Result<(), DomainError> {
        let mut table = 0usize;
        let target = size.level();
        let mut level = self.cfg.levels;
        loop {
            let shift = 12 + 9 * u32::from(level - 1);
            let index = ((iova >> shift) & 511) as usize;
            let e = SlEntry(self.entry(table, index));
            let kind = e.decode(level, self.cfg.haw, self.cfg.large);
            if level == target {
                if let Ok(SlKind::Table(next)) = kind {
                    self.release((next >> 12) as usize, level - 1);
                }
                self.set(table, index, leaf.0);
                return Ok(());
            }
            let next = match kind {
                Ok(SlKind::Table(next)) => (next >> 12) as usize,
                Ok(SlKind::Page(gpa, psize)) => {
                    self.split(table, index, level, gpa, psize, e.perms())?
                }
                _ => {
                    let n = self.alloc()?;
                    self.set(table, index, SlEntry::table((n as u64) << 12).0);
                    n
                }
            };
            table = next;
            level -= 1;
        }
    }

    /// Replace the large page at `table[index]` by a table of next-smaller pages.
    fn split(
        &mut self,
        table: usize,
        index: usize,
        level: u8,
        gpa: u64,
        size: PageSize,
        perms: Perms,
    ) -> Result<usize, DomainError> {
        let n = self.alloc()?;
        let small = PageSize::at_level(level - 1).unwrap_or(PageSize::Size4K);
        for i in 0..ENTRIES {
            let g = gpa + (i as u64) * small.bytes();
            self.set(n, i, SlEntry::page(g, small, perms).0);
        }
        debug_assert_eq!(size.level(), level);
        self.set(table, index, SlEntry::table((n as u64) << 12).0);
        Ok(n)
    }

    /// Remove mappings in `iova..iova+len` (splitting large pages that straddle
    /// the edges). Tables emptied entirely by the range are freed. The caller
    /// invalidates IOTLBs afterwards.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<(), DomainError> {
        let end = self.check_range(iova, len)?;
        self.unmap_in(0, self.cfg.levels, iova, end)
    }

    fn unmap_in(
        &mut self,
        table: usize,
        level: u8,
        start: u64,
        end: u64,
    ) -> Result<(), DomainError> {
        let shift = 12 + 9 * u32::from(level - 1);
        let span = 1u64 << shift;
        let mut a = start;
        while a < end {
            let index = ((a >> shift) & 511) as usize;
            let ebase = a & !(span - 1);
            let eend = ebase + span;
            let cut = end.min(eend);
            let e = SlEntry(self.entry(table, index));
            match e.decode(level, self.cfg.haw, self.cfg.large) {
                Ok(SlKind::NotPresent) | Err(_) => {}
                Ok(kind) if a == ebase && cut == eend => {
                    if let SlKind::Table(next) = kind {
                        self.release((next >> 12) as usize, level - 1);
                    }
                    self.set(table, index, 0);
                }
                Ok(SlKind::Page(gpa, size)) => {
                    let n = self.split(table, index, level, gpa, size, e.perms())?;
                    self.unmap_in(n, level - 1, a, cut)?;
                }
                Ok(SlKind::Table(next)) => {
                    self.unmap_in((next >> 12) as usize, level - 1, a, cut)?
                }
            }
            a = cut;
        }
        Ok(())
    }

    /// The page mapping `iova`, if any.
    pub fn translate(&self, iova: u64) -> Result<Mapping, FaultReason> {
        walk(self, 0, &self.cfg, iova)
    }
}

impl TableSource for HostDomain {
    fn read_entry(&self, table: u64, index: u64) -> Result<u64, FaultReason> {
        self.tables
            .get((table >> 12) as usize)
            .and_then(|t| t.as_ref())
            .and_then(|t| t.get(index as usize))
            .copied()
            .ok_or(FaultReason::PagingEntryAccess)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_picks_large_pages_and_unmap_splits() {
        let mut d = HostDomain::new(WalkConfig::FOUR_LEVEL);
        d.map(0x4000_0000, 0x8000_0000, 1 << 30, Perms::all())
            .unwrap();
        assert_eq!(d.translate(0x4000_0000).unwrap().size, PageSize::Size1G);
        d.unmap(0x4020_0000, 0x1000).unwrap();
        assert!(d.translate(0x4020_0000).is_err());
        let m = d.translate(0x4020_1000).unwrap();
        assert_eq!(
            (m.size, m.gpa_of(0x4020_1234)),
            (PageSize::Size4K, 0x8020_1234)
        );
        assert_eq!(d.translate(0x4040_0000).unwrap().size, PageSize::Size2M);
        d.unmap(0x4000_0000, 1 << 30).unwrap();
        assert!(d.translate(0x4040_0000).is_err());
        assert_eq!(d.table_count(), 2, "root and the level-3 table stay");
        assert!(d.map(0x1001, 0, 0x1000, Perms::READ).is_err());
        assert!(d.map(0, 0, 0x1000, Perms::empty()).is_err());
        assert!(d.map(!0xfff_u64, 0, 0x2000, Perms::READ).is_err());
        d.map(0x1000, 0x20_1000, 0x3000, Perms::READ).unwrap();
        assert_eq!(d.translate(0x3fff).unwrap().gpa_of(0x3fff), 0x20_3fff);
    }

    #[test]
    fn table_budget_bounds_a_hostile_map() {
        // 1 TiB in 4 KiB pages (GPA misaligned for large pages) would need
        // half a million tables: refused, and nothing stays mapped.
        let mut d = HostDomain::new(WalkConfig::FOUR_LEVEL).with_table_limit(64);
        let r = d.map(0, 0x1000, 1 << 40, Perms::READ);
        assert_eq!(r, Err(DomainError::TooManyTables(64)));
        assert!(d.translate(0).is_err());
        assert!(d.map(0, 0x1000, 0x10_0000, Perms::READ).is_ok());
    }

    #[test]
    fn five_levels() {
        let mut d = HostDomain::new(WalkConfig::FIVE_LEVEL);
        d.map(1 << 55, 0x1000, 0x1000, Perms::WRITE).unwrap();
        assert_eq!(
            d.translate((1 << 55) | 8).unwrap().gpa_of((1 << 55) | 8),
            0x1008
        );
        assert_eq!(d.translate(1 << 57), Err(FaultReason::AddressBeyondWidth));
    }
}
