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
//! | DSDT  | empty AML: no ACPI devices; PCI is found by the legacy config-space scan |
//! | MADT  | one LAPIC per vCPU (APIC ID = index) and the IOAPIC (ID = vCPU count), as the MP table says |
//! | extra | the caller's tables (DMAR or VIOT), checksummed by their builders        |
//!
//! Not provided: a PCI host bridge (`PNP0A03`) with `_PRT` (INTx routing then
//! comes from nowhere: virtio-pci uses MSI-X, which needs none), power button,
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

/// Lay out every table from `TABLES_ADDR`: (address, bytes) pairs, RSDP first.
fn layout(cpus: u32, extra: &[Vec<u8>]) -> Result<Vec<(u64, Vec<u8>)>, BootError> {
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
    let dsdt = place(finish(header(b"DSDT", 2, b"IOVIRTDS")), &mut out)?;
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

/// Write the RSDP, XSDT, FADT, DSDT, MADT and `extra` tables into guest memory.
pub fn write(mem: &GuestMemoryMmap, cpus: u32, extra: &[Vec<u8>]) -> Result<(), BootError> {
    for (addr, t) in layout(cpus, extra)? {
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
        let tables = layout(2, &extra).unwrap();
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
        assert!(layout(1, &big).is_err());
    }
}
