//! Minimal ACPI tables for direct Linux boot, written only when a table must
//! reach the kernel (the IOMMU's DMAR or VIOT with `--iommu`); firmware boots get
//! SeaBIOS's own tables and this module is not used.
//!
//! What is written, in the BIOS area Linux scans for the RSDP (0xE0000, reserved
//! in the e820 map of [`crate::layout::MemoryLayout::e820`]):
//!
//! | table | why                                                                    |
//! |-------|------------------------------------------------------------------------|
//! | RSDP  | revision 2, found by the kernel's scan of 0xE0000-0xFFFFF               |
//! | XSDT  | lists the others                                                        |
//! | FADT  | revision 6, `HW_REDUCED_ACPI` (no SCI, PM blocks or GPEs to emulate), i8042 present; without a FADT ACPICA refuses to load and Linux disables ACPI |
//! | DSDT  | without a PCI host bridge: empty (PCI is found by the legacy config-space scan); with one (`--iommu virtio`): `\_SB.PCI0` (`PNP0A03`, segment 0, bus 0, `_CRS` with bus 0-255, ports 0-0xCF7 and 0xD00-0xFFFF, memory 0xE000_0000-0xFEBF_FFFF), because Linux applies the VIOT only to PCI devices whose host bridge has an ACPI companion |
//! | MADT  | one LAPIC per vCPU (APIC ID = index) and the IOAPIC (ID = vCPU count), as the MP table says |
//! | extra | the caller's tables (DMAR or VIOT), checksummed by their builders        |
//!
//! Not provided: `_PRT` (INTx routing then comes from nowhere: virtio-pci uses
//! MSI-X, which needs none), `_OSC`, power button,
//! sleep states, an MCFG (no ECAM). A kernel wanting the IOMMU needs
//! `CONFIG_INTEL_IOMMU` (DMAR; `intel_iommu=on` unless it defaults on) or
//! `CONFIG_VIRTIO_IOMMU` with ACPI VIOT support (`CONFIG_ACPI_VIOT`, 5.14+).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout::IOAPIC_START;

/// Where the RSDP goes (16-byte aligned, inside the range Linux scans).
pub const RSDP_ADDR: u64 = 0xE_0000;
/// Where the other tables start (after the RSDP).
const TABLES_ADDR: u64 = RSDP_ADDR + 0x40;
/// End of the area the tables may use (the 64 KiB below 0xF0000).
const TABLES_END: u64 = 0xF_0000;
/// Local APIC base every vCPU uses.
const LAPIC_START: u32 = 0xFEE0_0000;
/// OEM ID in every header.
const OEM_ID: &[u8; 6] = b"IOVIRT";

/// Make the table's byte sum zero (checksum at offset 9).
fn checksum(t: &mut [u8], at: usize) {
    if let Some(c) = t.get_mut(at) {
        *c = 0;
    }
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    if let Some(c) = t.get_mut(at) {
        *c = sum.wrapping_neg();
    }
}

/// A table with its 36-byte header; `finish` patches length and checksum.
fn header(sig: &[u8; 4], revision: u8, table_id: &[u8; 8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(64);
    t.extend_from_slice(sig);
    t.extend_from_slice(&[0; 4]);
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(table_id);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"IOVR");
    t.extend_from_slice(&1u32.to_le_bytes());
    t
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(t.len()).unwrap_or(u32::MAX);
    t[4..8].copy_from_slice(&len.to_le_bytes());
    checksum(&mut t, 9);
    t
}

/// FADT revision 6, hardware-reduced, pointing at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    const LEN: usize = 276;
    const IAPC_BOOT_ARCH: usize = 109;
    const FLAGS: usize = 112;
    const MINOR: usize = 131;
    const X_DSDT: usize = 140;
    const HYPERVISOR_ID: usize = 268;
    /// IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
    const BOOT_ARCH_8042: u16 = 1 << 1;
    /// Flags: WBINVD works; hardware-reduced ACPI.
    const FLAG_WBINVD: u32 = 1;
    const FLAG_HW_REDUCED: u32 = 1 << 20;
    let mut t = header(b"FACP", 6, b"IOVIRTFA");
    t.resize(LEN, 0);
    t[40..44].copy_from_slice(&u32::try_from(dsdt).unwrap_or(0).to_le_bytes());
    t[IAPC_BOOT_ARCH..IAPC_BOOT_ARCH + 2].copy_from_slice(&BOOT_ARCH_8042.to_le_bytes());
    t[FLAGS..FLAGS + 4].copy_from_slice(&(FLAG_WBINVD | FLAG_HW_REDUCED).to_le_bytes());
    t[MINOR] = 0;
    t[X_DSDT..X_DSDT + 8].copy_from_slice(&dsdt.to_le_bytes());
    t[HYPERVISOR_ID..HYPERVISOR_ID + 8].copy_from_slice(b"IOVIRTVM");
    finish(t)
}

/// MADT: `cpus` LAPICs (IDs 0..cpus) and the IOAPIC with ID `cpus`, GSI base 0.
fn madt(cpus: u32) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut t = header(b"APIC", 4, b"IOVIRTAP");
    t.extend_from_slice(&LAPIC_START.to_le_bytes());
    t.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    let cpus = u8::try_from(cpus.min(254)).unwrap_or(254);
    for i in 0..cpus {
        t.extend_from_slice(&[0, 8, i, i]); // processor local APIC: UID, APIC ID
        t.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    t.extend_from_slice(&[1, 12, cpus, 0]); // I/O APIC, ID
    t.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    finish(t)
}

/// The RSDP (revision 2) pointing at `xsdt`.
fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    checksum(&mut r[..20], 8);
    checksum(&mut r, 32);
    r
}

/// An AML PkgLength for `body`, followed by `body` (one or two length bytes).
fn pkg(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 2);
    if body.len() + 1 < 0x40 {
        out.push((body.len() + 1) as u8);
    } else {
        let total = body.len() + 2; // < 4096: the DSDT is small
        out.push(0x40 | (total & 0xf) as u8);
        out.push((total >> 4) as u8);
    }
    out.extend_from_slice(body);
    out
}

/// AML `Name(seg, Zero)`.
fn name_zero(seg: &[u8; 4]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(seg);
    v.push(0x00);
    v
}

/// A Word Address Space descriptor (bus or I/O window, producer, min/max fixed).
fn word_space(kind: u8, specific: u8, min: u16, max: u16) -> Vec<u8> {
    let mut d = vec![0x88, 0x0d, 0x00, kind, 0x0c, specific, 0, 0];
    d.extend_from_slice(&min.to_le_bytes());
    d.extend_from_slice(&max.to_le_bytes());
    d.extend_from_slice(&0u16.to_le_bytes());
    d.extend_from_slice(&(max.wrapping_sub(min).wrapping_add(1)).to_le_bytes());
    d
}

/// AML for `Scope(\_SB) { Device(PCI0) { _HID PNP0A03, _SEG/_UID/_BBN 0, _CRS } }`.
fn pci_host_bridge_aml() -> Vec<u8> {
    let mut crs = Vec::new();
    crs.extend(word_space(2, 0, 0, 0xff)); // bus numbers
    crs.extend_from_slice(&[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]); // config ports
    crs.extend(word_space(1, 0x03, 0, 0x0cf7));
    crs.extend(word_space(1, 0x03, 0x0d00, 0xffff));
    let (min, max) = (
        crate::layout::PCI_HOLE_START as u32,
        IOAPIC_START as u32 - 1,
    );
    crs.extend_from_slice(&[0x87, 0x17, 0x00, 0, 0x0c, 0x01]); // memory, read-write
    for v in [0, min, max, 0, max - min + 1] {
        crs.extend_from_slice(&v.to_le_bytes());
    }
    crs.extend_from_slice(&[0x79, 0x00]); // end tag
    let mut buffer = vec![0x0a, u8::try_from(crs.len()).unwrap_or(u8::MAX)];
    buffer.extend(crs);
    let mut dev = b"PCI0".to_vec();
    dev.push(0x08);
    dev.extend_from_slice(b"_HID");
    dev.push(0x0c);
    dev.extend_from_slice(&0x030a_d041u32.to_le_bytes()); // EISAID("PNP0A03")
    for n in [b"_SEG", b"_UID", b"_BBN"] {
        dev.extend(name_zero(n));
    }
    dev.push(0x08);
    dev.extend_from_slice(b"_CRS");
    dev.push(0x11); // Buffer
    dev.extend(pkg(&buffer));
    let mut device = vec![0x5b, 0x82];
    device.extend(pkg(&dev));
    let mut scope_body = b"\\_SB_".to_vec();
    scope_body.extend(device);
    let mut scope = vec![0x10];
    scope.extend(pkg(&scope_body));
    scope
}

/// Lay out every table from `TABLES_ADDR`: (address, bytes) pairs, RSDP first.
fn layout(cpus: u32, extra: &[Vec<u8>], pci_root: bool) -> Result<Vec<(u64, Vec<u8>)>, BootError> {
    let mut out = Vec::new();
    let mut at = TABLES_ADDR;
    let mut place = |t: Vec<u8>, out: &mut Vec<(u64, Vec<u8>)>| -> Result<u64, BootError> {
        let here = at;
        let end = here
            .checked_add(t.len() as u64)
            .filter(|e| *e <= TABLES_END)
            .ok_or_else(|| BootError::BootParams("ACPI tables do not fit below 0xF0000".into()))?;
        at = (end + 15) & !15;
        out.push((here, t));
        Ok(here)
    };
    let mut dsdt = header(b"DSDT", 2, b"IOVIRTDS");
    if pci_root {
        dsdt.extend(pci_host_bridge_aml());
    }
    let dsdt = place(finish(dsdt), &mut out)?;
    let mut listed = vec![place(fadt(dsdt), &mut out)?, place(madt(cpus), &mut out)?];
    for t in extra {
        listed.push(place(t.clone(), &mut out)?);
    }
    let mut xsdt = header(b"XSDT", 1, b"IOVIRTXS");
    for a in &listed {
        xsdt.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt_addr = place(finish(xsdt), &mut out)?;
    out.insert(0, (RSDP_ADDR, rsdp(xsdt_addr)));
    Ok(out)
}

/// Write the RSDP, XSDT, FADT, DSDT (with the PCI host bridge when
/// `pci_root`), MADT and `extra` tables into guest memory.
pub fn write(
    mem: &GuestMemoryMmap,
    cpus: u32,
    extra: &[Vec<u8>],
    pci_root: bool,
) -> Result<(), BootError> {
    for (addr, t) in layout(cpus, extra, pci_root)? {
        mem.write_slice(&t, GuestAddress(addr))
            .map_err(|e| BootError::Memory(format!("ACPI table at {addr:#x}: {e}")))?;
    }
    log::info!("ACPI: RSDP at {RSDP_ADDR:#x}, {} extra tables", extra.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn rsdp_xsdt_and_tables_are_consistent() {
        let extra = vec![finish(header(b"DMAR", 1, b"TESTTEST"))];
        let tables = layout(2, &extra, false).unwrap();
        let find = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
        let (addr, rsdp) = &tables[0];
        assert_eq!(*addr, RSDP_ADDR);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = find(xsdt_addr).unwrap();
        assert_eq!(&xsdt[..4], b"XSDT");
        let sigs: Vec<[u8; 4]> = xsdt[36..]
            .chunks(8)
            .map(|c| {
                let t = find(u64::from_le_bytes(c.try_into().unwrap())).unwrap();
                assert_eq!(sum(t), 0, "checksum");
                assert_eq!(
                    u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                    t.len()
                );
                t[..4].try_into().unwrap()
            })
            .collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC", *b"DMAR"]);
        let fadt = find(u64::from_le_bytes(xsdt[36..44].try_into().unwrap())).unwrap();
        let dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&find(dsdt).unwrap()[..4], b"DSDT");
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        // MADT: 2 LAPICs + IOAPIC with ID 2.
        let madt = find(u64::from_le_bytes(xsdt[44..52].try_into().unwrap())).unwrap();
        assert_eq!(madt.len(), 44 + 8 * 2 + 12);
        assert_eq!(&madt[60..63], &[1, 12, 2]);
        for (a, t) in &tables {
            assert!(*a >= RSDP_ADDR && a + t.len() as u64 <= TABLES_END);
        }
    }

    #[test]
    fn too_many_tables_are_refused() {
        let big = vec![vec![0u8; 0x8000]; 3];
        assert!(layout(1, &big, false).is_err());
    }

    #[test]
    fn dsdt_with_the_pci_host_bridge_is_well_formed_aml() {
        let tables = layout(1, &[], true).unwrap();
        let dsdt = &tables.iter().find(|(_, t)| &t[..4] == b"DSDT").unwrap().1;
        assert_eq!(sum(dsdt), 0);
        let aml = &dsdt[36..];
        // ScopeOp, a two-byte PkgLength covering exactly the rest.
        assert_eq!(aml[0], 0x10);
        assert_eq!(aml[1] >> 6, 1, "two-byte PkgLength");
        let len = usize::from(aml[1] & 0xf) | (usize::from(aml[2]) << 4);
        assert_eq!(len, aml.len() - 1);
        assert_eq!(&aml[3..8], b"\\_SB_");
        // DeviceOp PCI0 whose PkgLength also ends at the end of the table.
        assert_eq!(&aml[8..10], &[0x5b, 0x82]);
        let dlen = usize::from(aml[10] & 0xf) | (usize::from(aml[11]) << 4);
        assert_eq!(10 + dlen, aml.len());
        assert_eq!(&aml[12..16], b"PCI0");
        assert!(aml
            .windows(9)
            .any(|w| w == [b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        // _CRS: the buffer size matches its bytes and ends with the end tag.
        let crs = aml.windows(4).position(|w| w == b"_CRS").unwrap() + 4;
        assert_eq!(aml[crs], 0x11);
        // Two-byte PkgLength, then BufferSize as a ByteConst.
        assert_eq!(aml[crs + 1] >> 6, 1);
        let blen = usize::from(aml[crs + 1] & 0xf) | (usize::from(aml[crs + 2]) << 4);
        assert_eq!(crs + 1 + blen, aml.len());
        assert_eq!(aml[crs + 3], 0x0a);
        let n = usize::from(aml[crs + 4]);
        assert_eq!(crs + 5 + n, aml.len());
        assert_eq!(&aml[aml.len() - 2..], &[0x79, 0]);
        // The memory window is the PCI hole below the IOAPIC.
        let min = 0xe000_0000u32.to_le_bytes();
        assert!(aml.windows(4).any(|w| w == min));
        // Without the bridge, the DSDT is a bare header.
        let bare = layout(1, &[], false).unwrap();
        assert!(bare
            .iter()
            .any(|(_, t)| &t[..4] == b"DSDT" && t.len() == 36));
    }
}
