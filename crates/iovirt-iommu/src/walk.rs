//! The second-level page walk, over guest-owned tables in guest memory or
//! host-built tables: one walker, two sources of table entries.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::entry::{LargePages, SlEntry, SlKind};
use crate::fault::FaultReason;
use crate::types::{Mapping, Perms};

/// Where a walk reads paging entries from.
pub trait TableSource {
    /// Read entry `index` (0..512) of the table at `table` (4 KiB aligned).
    /// A table that is not readable is [`FaultReason::PagingEntryAccess`].
    fn read_entry(&self, table: u64, index: u64) -> Result<u64, FaultReason>;
}

/// Tables that live in guest memory, read through `Bytes` with checked addresses.
#[derive(Debug)]
pub struct GuestTables<'a, M: GuestMemoryBackend>(pub &'a M);

impl<M: GuestMemoryBackend> TableSource for GuestTables<'_, M> {
    fn read_entry(&self, table: u64, index: u64) -> Result<u64, FaultReason> {
        let addr = index
            .checked_mul(8)
            .and_then(|o| table.checked_add(o))
            .ok_or(FaultReason::PagingEntryAccess)?;
        self.0
            .read_obj::<u64>(GuestAddress(addr))
            .map(u64::from_le)
            .map_err(|_| FaultReason::PagingEntryAccess)
    }
}

/// The shape of a page table: how many levels and which large pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkConfig {
    /// Paging levels: 3 (39-bit IOVAs), 4 (48-bit) or 5 (57-bit).
    pub levels: u8,
    /// Host address width: address bits at and above it are reserved in entries.
    pub haw: u8,
    /// Large pages accepted in leaf entries.
    pub large: LargePages,
}

impl WalkConfig {
    /// A 4-level table, 46-bit host addresses, 2 MiB and 1 GiB pages.
    pub const FOUR_LEVEL: WalkConfig = WalkConfig {
        levels: 4,
        haw: 46,
        large: LargePages::ALL,
    };
    /// A 5-level table, 52-bit host addresses, 2 MiB and 1 GiB pages.
    pub const FIVE_LEVEL: WalkConfig = WalkConfig {
        levels: 5,
        haw: 52,
        large: LargePages::ALL,
    };

    /// Width of IOVAs the table translates (39, 48 or 57 bits).
    pub fn iova_bits(&self) -> u32 {
        12 + 9 * u32::from(self.levels.clamp(1, 5))
    }
}

/// Translate `iova` through the table rooted at `root`. Returns the page and
/// its effective rights (which may lack the right the caller needs: check
/// [`Mapping::perms`]); an unmapped IOVA is [`FaultReason::ReadDenied`] (the
/// caller turns it into the denial for its access). Reads at most `levels`
/// entries, so a table pointing at itself cannot loop.
pub fn walk<T: TableSource + ?Sized>(
    src: &T,
    root: u64,
    cfg: &WalkConfig,
    iova: u64,
) -> Result<Mapping, FaultReason> {
    let levels = cfg.levels.clamp(3, 5);
    let bits = 12 + 9 * u32::from(levels);
    if iova >> bits != 0 {
        return Err(FaultReason::AddressBeyondWidth);
    }
    let mut table = root;
    let mut perms = Perms::READ | Perms::WRITE;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (iova >> shift) & 511;
        let entry = SlEntry(src.read_entry(table, index)?);
        match entry.decode(level, cfg.haw, cfg.large)? {
            SlKind::NotPresent => return Err(FaultReason::ReadDenied),
            SlKind::Table(next) => {
                perms &= entry.perms();
                table = next;
            }
            SlKind::Page(gpa, size) => {
                perms &= entry.perms();
                if perms.is_empty() {
                    return Err(FaultReason::ReadDenied);
                }
                return Ok(Mapping {
                    iova: iova & !(size.bytes() - 1),
                    gpa,
                    size,
                    perms,
                });
            }
        }
    }
    // Level 1 always decodes to a page or not-present; unreachable in practice.
    Err(FaultReason::PagingReserved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::PageSize;
    use vm_memory::GuestMemoryMmap;

    fn put(m: &GuestMemoryMmap, table: u64, index: u64, e: SlEntry) {
        m.write_obj(e.0, GuestAddress(table + index * 8)).unwrap();
    }

    #[test]
    fn guest_tables_4k_2m_1g_and_faults() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (l4, l3, l2, l1) = (0x1000, 0x2000, 0x3000, 0x4000);
        put(&m, l4, 0, SlEntry::table(l3));
        put(&m, l3, 0, SlEntry::table(l2));
        put(
            &m,
            l3,
            1,
            SlEntry::page(0x8000_0000, PageSize::Size1G, Perms::READ),
        );
        put(&m, l2, 0, SlEntry::table(l1));
        put(
            &m,
            l2,
            1,
            SlEntry::page(0x60_0000, PageSize::Size2M, Perms::all()),
        );
        put(
            &m,
            l1,
            5,
            SlEntry::page(0x9000, PageSize::Size4K, Perms::WRITE),
        );
        // Out-of-memory table pointer.
        put(&m, l2, 2, SlEntry::table(0x7fff_f000));
        // A table that points at itself.
        put(&m, l3, 2, SlEntry::table(l3));
        let g = GuestTables(&m);
        let cfg = WalkConfig::FOUR_LEVEL;
        let t = walk(&g, l4, &cfg, 0x5123).unwrap();
        assert_eq!(
            (t.gpa_of(0x5123), t.size, t.perms),
            (0x9123, PageSize::Size4K, Perms::WRITE)
        );
        let t = walk(&g, l4, &cfg, 0x23_4567).unwrap();
        assert_eq!((t.gpa_of(0x23_4567), t.size), (0x63_4567, PageSize::Size2M));
        let t = walk(&g, l4, &cfg, 0x4000_1000).unwrap();
        assert_eq!(
            (t.gpa_of(0x4000_1000), t.size),
            (0x8000_1000, PageSize::Size1G)
        );
        assert_eq!(walk(&g, l4, &cfg, 0x6000), Err(FaultReason::ReadDenied));
        assert_eq!(
            walk(&g, l4, &cfg, 0x40_0000),
            Err(FaultReason::PagingEntryAccess)
        );
        assert_eq!(
            walk(&g, l4, &cfg, 1 << 48),
            Err(FaultReason::AddressBeyondWidth)
        );
        // The self-loop ends after four reads, whatever it finds.
        let _ = walk(&g, l4, &cfg, 0x8000_0000);
        // Root outside memory.
        assert_eq!(
            walk(&g, !0xfff_u64, &cfg, 0),
            Err(FaultReason::PagingEntryAccess)
        );
    }
}
