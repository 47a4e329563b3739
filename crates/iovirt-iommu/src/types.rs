//! Small value types shared by every part of the crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A PCI requester ID (source ID): bus, device and function of the DMA's originator.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct RequesterId(pub u16);

impl RequesterId {
    /// The requester ID of `bus:dev.func` (`dev` and `func` are masked to 5 and 3 bits).
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        RequesterId(((bus as u16) << 8) | (((dev & 0x1f) as u16) << 3) | (func & 7) as u16)
    }
    /// The bus number.
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// The device number (0..32).
    pub const fn device(self) -> u8 {
        ((self.0 >> 3) & 0x1f) as u8
    }
    /// The function number (0..8).
    pub const fn function(self) -> u8 {
        (self.0 & 7) as u8
    }
    /// Device and function as one byte (`dev << 3 | func`): the context-table index.
    pub const fn devfn(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for RequesterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// Which way a DMA moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    /// The device reads guest memory (a disk write, a transmit).
    Read,
    /// The device writes guest memory (a disk read, a receive).
    Write,
}

impl Access {
    /// The permission bit this access needs.
    pub fn perm(self) -> Perms {
        match self {
            Access::Read => Perms::READ,
            Access::Write => Perms::WRITE,
        }
    }
}

bitflags::bitflags! {
    /// Access rights of a mapping, in the bit positions of a VT-d second-level entry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    pub struct Perms: u8 {
        /// The device may read (VT-d SL entry bit 0, R).
        const READ = 1;
        /// The device may write (VT-d SL entry bit 1, W).
        const WRITE = 2;
    }
}

impl Perms {
    /// The rights a vm-memory permission request needs (read-write needs both).
    pub fn from_permissions(p: vm_memory::Permissions) -> Perms {
        match p {
            vm_memory::Permissions::No => Perms::empty(),
            vm_memory::Permissions::Read => Perms::READ,
            vm_memory::Permissions::Write => Perms::WRITE,
            vm_memory::Permissions::ReadWrite => Perms::READ | Perms::WRITE,
        }
    }
}

/// Page sizes of the second-level format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry (SL-PTE).
    Size4K,
    /// 2 MiB, a level-2 entry with PS set (SL-PDE).
    Size2M,
    /// 1 GiB, a level-3 entry with PS set (SL-PDPE).
    Size1G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];
    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }
    /// The paging level whose leaf entries map pages of this size (1 = SL-PTE).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
    /// The size a leaf at `level` maps, if any.
    pub const fn at_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

/// One translated page: what the IOTLB caches and a page walk returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mapping {
    /// IOVA of the page's first byte (aligned to `size`).
    pub iova: u64,
    /// Guest-physical address of the page's first byte (aligned to `size`).
    pub gpa: u64,
    /// Page size.
    pub size: PageSize,
    /// Effective rights (the intersection along the walk).
    pub perms: Perms,
}

impl Mapping {
    /// Whether `iova` lies in this page.
    pub fn contains(&self, iova: u64) -> bool {
        iova & !(self.size.bytes() - 1) == self.iova
    }
    /// The guest-physical address of `iova` (which must lie in the page).
    pub fn gpa_of(&self, iova: u64) -> u64 {
        self.gpa | (iova & (self.size.bytes() - 1))
    }
    /// Bytes from `iova` to the end of the page.
    pub fn remaining(&self, iova: u64) -> u64 {
        self.size.bytes() - (iova & (self.size.bytes() - 1))
    }
}
