//! The DMAR ACPI table that tells a guest where its VT-d units are.

/// A device scope entry under a DRHD (an endpoint behind the unit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    /// Scope type: 1 = PCI endpoint, 2 = PCI sub-hierarchy, 3 = IOAPIC, 4 = HPET.
    pub kind: u8,
    /// Enumeration ID (IOAPIC or HPET ID; 0 for PCI).
    pub enumeration_id: u8,
    /// Bus the path starts on.
    pub start_bus: u8,
    /// (device, function) hops from `start_bus`.
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// A PCI endpoint at `bus:dev.func`.
    pub fn pci_endpoint(bus: u8, dev: u8, func: u8) -> Self {
        DeviceScope {
            kind: 1,
            enumeration_id: 0,
            start_bus: bus,
            path: vec![(dev, func)],
        }
    }

    fn emit(&self, out: &mut Vec<u8>) {
        let len = 6 + 2 * self.path.len();
        out.push(self.kind);
        out.push(len.min(255) as u8);
        out.extend_from_slice(&[0, 0]); // flags, reserved
        out.push(self.enumeration_id);
        out.push(self.start_bus);
        for &(d, f) in &self.path {
            out.push(d);
            out.push(f);
        }
    }
}

/// One DMA-remapping hardware unit definition (DRHD, remapping structure type 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drhd {
    /// Physical address of the unit's 4 KiB register set.
    pub base: u64,
    /// PCI segment.
    pub segment: u16,
    /// The unit covers every device of the segment not claimed by another unit.
    pub include_pci_all: bool,
    /// Devices the unit covers explicitly.
    pub scopes: Vec<DeviceScope>,
}

/// OEM fields of the ACPI header.
pub const OEM_ID: &[u8; 6] = b"IOVIRT";
/// OEM table ID of the ACPI header.
pub const OEM_TABLE_ID: &[u8; 8] = b"IOVIRTVT";

/// The DMAR table bytes for `units`, with host address width `haw` (bits)
/// and a correct checksum. No interrupt remapping is claimed.
pub fn dmar_table(units: &[Drhd], haw: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(48 + units.len() * 24);
    t.extend_from_slice(b"DMAR");
    t.extend_from_slice(&[0; 4]); // length, patched below
    t.push(1); // revision
    t.push(0); // checksum, patched below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"IOVR"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.push(haw.saturating_sub(1)); // host address width - 1
    t.push(0); // flags: no INTR_REMAP
    t.extend_from_slice(&[0; 10]);
    for u in units {
        let mut s = Vec::new();
        for sc in &u.scopes {
            sc.emit(&mut s);
        }
        let len = 16 + s.len();
        t.extend_from_slice(&0u16.to_le_bytes()); // type 0: DRHD
        t.extend_from_slice(&(len.min(0xffff) as u16).to_le_bytes());
        t.push(u8::from(u.include_pci_all));
        t.push(0); // size: 2^0 4 KiB pages of registers
        t.extend_from_slice(&u.segment.to_le_bytes());
        t.extend_from_slice(&u.base.to_le_bytes());
        t.extend_from_slice(&s);
    }
    let len = (t.len() as u32).to_le_bytes();
    t[4..8].copy_from_slice(&len);
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmar_layout_and_checksum() {
        let t = dmar_table(
            &[Drhd {
                base: 0xfed9_0000,
                segment: 0,
                include_pci_all: true,
                scopes: vec![DeviceScope::pci_endpoint(0, 4, 0)],
            }],
            46,
        );
        assert_eq!(&t[0..4], b"DMAR");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(t[36], 45);
        assert_eq!(&t[48..50], &[0, 0]); // DRHD
        assert_eq!(u16::from_le_bytes([t[50], t[51]]), 24);
        assert_eq!(t[52], 1);
        assert_eq!(
            u64::from_le_bytes(t[56..64].try_into().unwrap()),
            0xfed9_0000
        );
        assert_eq!(&t[64..72], &[1, 8, 0, 0, 0, 0, 4, 0]);
    }
}
