//! The VIOT ACPI table: which endpoints sit behind a virtio-iommu.

/// OEM ID in the ACPI header.
const OEM_ID: &[u8; 6] = b"IOVIRT";
/// OEM table ID in the ACPI header.
const OEM_TABLE_ID: &[u8; 8] = b"IOVIRTVI";
/// Where the first node starts (after the header and the VIOT fields).
const NODE_OFFSET: u16 = 48;

/// The VIOT bytes for a virtio-iommu-pci at `iommu_bdf` (segment 0)
/// translating the PCI requester IDs in each `(first, last)` range; endpoint
/// IDs are the requester IDs themselves.
pub fn viot_table(iommu_bdf: u16, ranges: &[(u16, u16)]) -> Vec<u8> {
    let mut t = Vec::with_capacity(64 + 24 * ranges.len());
    t.extend_from_slice(b"VIOT");
    t.extend_from_slice(&[0; 4]); // length
    t.push(0); // revision
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"IOVR");
    t.extend_from_slice(&1u32.to_le_bytes());
    let count = u16::try_from(ranges.len().saturating_add(1)).unwrap_or(u16::MAX);
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&NODE_OFFSET.to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    // Node 0: the virtio-iommu-pci device itself.
    t.push(3);
    t.push(0);
    t.extend_from_slice(&16u16.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // segment
    t.extend_from_slice(&iommu_bdf.to_le_bytes());
    t.extend_from_slice(&[0; 8]);
    for &(first, last) in ranges.iter().take(usize::from(u16::MAX - 1)) {
        t.push(1); // PCI range
        t.push(0);
        t.extend_from_slice(&24u16.to_le_bytes());
        t.extend_from_slice(&u32::from(first).to_le_bytes()); // endpoint start
        t.extend_from_slice(&0u16.to_le_bytes()); // segment start
        t.extend_from_slice(&0u16.to_le_bytes()); // segment end
        t.extend_from_slice(&first.to_le_bytes());
        t.extend_from_slice(&last.to_le_bytes());
        t.extend_from_slice(&NODE_OFFSET.to_le_bytes()); // output node
        t.extend_from_slice(&[0; 6]);
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
    fn viot_layout() {
        let t = viot_table(0x08, &[(0x10, 0xff)]);
        assert_eq!(&t[..4], b"VIOT");
        assert_eq!(t.len(), 48 + 16 + 24);
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([t[36], t[37]]), 2);
        assert_eq!(t[48], 3);
        assert_eq!(u16::from_le_bytes([t[54], t[55]]), 0x08);
        assert_eq!(t[64], 1);
        assert_eq!(u16::from_le_bytes([t[80], t[81]]), 48);
    }
}
