//! The guest-physical memory map of a PC, as QEMU's `-M pc` lays it out.
//!
//! ```text
//! 0                 RAM (below-4G RAM: min(mem, 0xE000_0000))
//! 0xE0000-0xFFFFF   inside RAM: the BIOS shadow (the firmware's last 128 KiB, copied)
//! 0xE000_0000       PCI MMIO hole up to 4 GiB
//! 4G - fw size      firmware, read-only
//! 4 GiB             the rest of RAM (above-4G RAM)
//! ```

use vm_memory::GuestAddress;

/// Where below-4G RAM ends at the latest (start of the PCI hole).
pub const PCI_HOLE_START: u64 = 0xE000_0000;
/// 4 GiB: end of the 32-bit space, start of above-4G RAM.
pub const FOUR_GIB: u64 = 1 << 32;
/// Start of the BIOS shadow in RAM.
pub const BIOS_SHADOW_START: u64 = 0xE_0000;
/// Size of the BIOS shadow.
pub const BIOS_SHADOW_SIZE: u64 = 0x2_0000;
/// End of conventional memory (640 KiB).
pub const LOW_RAM_END: u64 = 0xA_0000;
/// Start of the last KiB of base memory, reserved for the MP table in direct boot.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of extended memory (1 MiB).
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// IOAPIC MMIO page.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Three pages for KVM's TSS (must be below 4 GiB and outside RAM).
pub const KVM_TSS_ADDRESS: u64 = 0xFEFF_C000;
/// One page for KVM's identity map (right below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xFEFF_B000;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// e820 reserved type.
pub const E820_RESERVED: u32 = 2;

/// How `mem` bytes of RAM are split around the PCI hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// RAM from address 0.
    pub below_4g: u64,
    /// RAM from 4 GiB.
    pub above_4g: u64,
}

impl MemoryLayout {
    /// Split `mem` bytes.
    pub fn new(mem: u64) -> Self {
        let below_4g = mem.min(PCI_HOLE_START);
        MemoryLayout {
            below_4g,
            above_4g: mem - below_4g,
        }
    }

    /// The RAM ranges, for `GuestMemoryMmap::from_ranges`.
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut r = vec![(GuestAddress(0), self.below_4g as usize)];
        if self.above_4g > 0 {
            r.push((GuestAddress(FOUR_GIB), self.above_4g as usize));
        }
        r
    }

    /// The e820 map a direct-booted kernel gets: RAM below 639K (the last KiB below
    /// 640K holds the MP table), RAM from 1 MiB, RAM above 4G; the legacy hole and the
    /// 32-bit device area reserved.
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let mut map = vec![
            (0, EBDA_START, E820_RAM),
            (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
            (
                HIGH_RAM_START,
                self.below_4g.saturating_sub(HIGH_RAM_START),
                E820_RAM,
            ),
            // IOAPIC, LAPIC, KVM's TSS and the firmware: reserved up to 4 GiB.
            (IOAPIC_START, FOUR_GIB - IOAPIC_START, E820_RESERVED),
        ];
        if self.above_4g > 0 {
            map.push((FOUR_GIB, self.above_4g, E820_RAM));
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split() {
        let l = MemoryLayout::new(512 << 20);
        assert_eq!((l.below_4g, l.above_4g), (512 << 20, 0));
        assert_eq!(l.ram_ranges().len(), 1);
        let l = MemoryLayout::new(4 << 30);
        assert_eq!(l.below_4g, PCI_HOLE_START);
        assert_eq!(l.above_4g, (4 << 30) - PCI_HOLE_START);
        assert_eq!(l.ram_ranges()[1].0, GuestAddress(FOUR_GIB));
        let ram: u64 = l
            .e820()
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum();
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
    }
}
