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
//!
//! The tables are built with the `acpi_tables` crate: its typed RSDP, XSDT and
//! FADT, its AML builder for the DSDT, and its MADT interrupt-controller
//! structures inside a generic [`Sdt`] (its typed MADT header cannot carry the
//! `PCAT_COMPAT` flag).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Path, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::byteorder::{LE, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::BootError;
use crate::layout::{IOAPIC_START, PCI_HOLE_START};

/// Where the RSDP goes (16-byte aligned, inside the range Linux scans).
pub const RSDP_ADDR: u64 = 0xE_0000;
/// Where the other tables start (after the RSDP).
const TABLES_ADDR: u64 = RSDP_ADDR + 0x40;
/// End of the area the tables may use (the 64 KiB below 0xF0000).
const TABLES_END: u64 = 0xF_0000;
/// Local APIC base every vCPU uses.
const LAPIC_START: u32 = 0xFEE0_0000;
/// OEM ID in every header.
const OEM_ID: [u8; 6] = *b"IOVIRT";
/// OEM revision in every header.
const OEM_REVISION: u32 = 1;
/// Highest vCPU count the MADT describes (8-bit APIC IDs; the IOAPIC takes the next).
const MAX_CPUS: u8 = 254;
/// DSDT revision (2: 64-bit AML integers).
const DSDT_REVISION: u8 = 2;
/// MADT revision written (ACPI 5.0 and later).
const MADT_REVISION: u8 = 4;
/// FADT minor version (the major is 6, from `FADTBuilder`): ACPI 6.0.
const FADT_MINOR_VERSION: u8 = 0;
/// FADT `IAPC_BOOT_ARCH`: an 8042 keyboard controller is present.
const BOOT_ARCH_8042: u16 = 1 << 1;
/// MADT flags: the platform also has dual 8259s (`PCAT_COMPAT`).
const MADT_PCAT_COMPAT: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_ID: [u8; 8] = *b"IOVIRTVM";
/// Size of a table's standard header (an empty DSDT is only this).
const HEADER_LEN: u32 = 36;
/// Config-space ports (0xCF8-0xCFF) the host bridge consumes.
const PCI_CONFIG_PORT: u16 = 0xCF8;
/// Number of config-space ports.
const PCI_CONFIG_PORTS: u8 = 8;

/// The MADT fields between the standard header and the interrupt controller
/// structures (ACPI 6.5, table 5.43).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable, FromBytes)]
struct MadtFields {
    /// Physical address of every vCPU's local APIC.
    local_apic_address: U32<LE>,
    /// Multiple APIC flags (`PCAT_COMPAT`).
    flags: U32<LE>,
}

/// Serialise an `acpi_tables` object.
fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// FADT revision 6, hardware-reduced, 8042 present, `X_DSDT` pointing at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"IOVIRTFA", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::HwReducedAcpi);
    f.fadt_minor_version = FADT_MINOR_VERSION;
    f.iapc_boot_arch = BOOT_ARCH_8042.into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    bytes(&f.finalize())
}

/// MADT: `cpus` LAPICs (IDs 0..cpus) and the IOAPIC with ID `cpus`, GSI base 0.
///
/// A generic [`Sdt`] because `acpi_tables::madt::MADT` always writes flags 0
/// (no `PCAT_COMPAT`); the entries are the crate's typed structures.
fn madt(cpus: u32) -> Vec<u8> {
    let cpus = u8::try_from(cpus).map_or(MAX_CPUS, |c| c.min(MAX_CPUS));
    let mut t = Sdt::new(
        *b"APIC",
        HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"IOVIRTAP",
        OEM_REVISION,
    );
    t.append(MadtFields {
        local_apic_address: LAPIC_START.into(),
        flags: MADT_PCAT_COMPAT.into(),
    });
    let mut entries = Vec::new();
    for i in 0..cpus {
        ProcessorLocalApic::new(i, i, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(cpus, IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    t.append_slice(&entries);
    bytes(&t)
}

/// AML for `Scope(\_SB) { Device(PCI0) { _HID PNP0A03, _SEG/_UID/_BBN 0, _CRS } }`.
fn pci_host_bridge_aml() -> Vec<u8> {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0xff);
    let config = IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS);
    let io_low = AddressSpace::<u16>::new_io(0, PCI_CONFIG_PORT - 1, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_HOLE_START as u32,
        IOAPIC_START as u32 - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &config, &io_low, &io_high, &mmio]);
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A03"));
    let seg = Name::new(Path::new("_SEG"), &aml::ZERO);
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    let bbn = Name::new(Path::new("_BBN"), &aml::ZERO);
    let crs = Name::new(Path::new("_CRS"), &crs);
    let pci0 = Device::new(Path::new("PCI0"), vec![&hid, &seg, &uid, &bbn, &crs]);
    bytes(&Scope::new(Path::new("\\_SB_"), vec![&pci0]))
}

/// The DSDT: a bare header, or the PCI host bridge when `pci_root`.
fn dsdt(pci_root: bool) -> Vec<u8> {
    let mut t = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"IOVIRTDS",
        OEM_REVISION,
    );
    if pci_root {
        t.append_slice(&pci_host_bridge_aml());
    }
    bytes(&t)
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
    let dsdt = place(dsdt(pci_root), &mut out)?;
    let mut listed = vec![place(fadt(dsdt), &mut out)?, place(madt(cpus), &mut out)?];
    for t in extra {
        listed.push(place(t.clone(), &mut out)?);
    }
    let mut xsdt = XSDT::new(OEM_ID, *b"IOVIRTXS", OEM_REVISION);
    for a in listed {
        xsdt.add_entry(a);
    }
    let xsdt_addr = place(bytes(&xsdt), &mut out)?;
    out.insert(0, (RSDP_ADDR, bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
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
        let extra = vec![Sdt::new(*b"DMAR", HEADER_LEN, 1, OEM_ID, *b"TESTTEST", 1)
            .as_slice()
            .to_vec()];
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
        assert_eq!(
            &madt[36..44],
            MadtFields {
                local_apic_address: LAPIC_START.into(),
                flags: MADT_PCAT_COMPAT.into(),
            }
            .as_bytes()
        );
        assert_eq!(&madt[44..48], &[0, 8, 0, 0]);
        assert_eq!(&madt[52..56], &[0, 8, 1, 1]);
        assert_eq!(&madt[60..63], &[1, 12, 2]);
        assert_eq!(
            u32::from_le_bytes(madt[64..68].try_into().unwrap()) as u64,
            IOAPIC_START
        );
        // FADT: 6.0 layout, 8042 present, X_DSDT only.
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6);
        assert_eq!(&fadt[109..111], &BOOT_ARCH_8042.to_le_bytes());
        assert_eq!(&fadt[40..44], &[0; 4]);
        for (a, t) in &tables {
            assert!(*a >= RSDP_ADDR && a + t.len() as u64 <= TABLES_END);
        }
    }

    #[test]
    fn madt_lists_one_lapic_per_vcpu_up_to_254() {
        // Walk the structures by their length bytes, counting local APICs.
        let entries = |t: &[u8]| {
            let (mut at, mut n) = (44, 0);
            while at < t.len() {
                n += usize::from(t[at] == 0);
                at += usize::from(t[at + 1]);
            }
            assert_eq!(at, t.len());
            n
        };
        assert_eq!(entries(&madt(1)), 1);
        assert_eq!(entries(&madt(8)), 8);
        let big = madt(300);
        assert_eq!(sum(&big), 0);
        assert_eq!(big.len(), 44 + 8 * 254 + 12);
        assert_eq!(&big[big.len() - 12..big.len() - 9], &[1, 12, 254]);
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
