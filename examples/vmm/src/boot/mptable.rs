//! An Intel MultiProcessor Specification 1.4 table for direct boot, so that a kernel
//! without ACPI finds every vCPU and the IOAPIC (firmware boots get SeaBIOS's own).
//!
//! Layout: the 16-byte floating pointer at [`MPTABLE_START`] (the last KiB of base
//! memory, where Linux scans), the configuration table right after it. Entries:
//! one processor per vCPU (APIC ID = index, vCPU 0 the BSP), an ISA bus, the IOAPIC
//! (ID = number of vCPUs), ISA IRQs 0-15 to the IOAPIC pins of the same number (KVM's
//! default GSI routing), ExtINT on LINT0 and NMI on LINT1.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout::{IOAPIC_START, LOW_RAM_END};

/// Where the floating pointer goes (the last KiB below 640 KiB; the e820 map reserves it).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// Local APIC base address.
const LAPIC_DEFAULT: u32 = 0xfee0_0000;
/// Local APIC version (integrated xAPIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version.
const IOAPIC_VERSION: u8 = 0x11;
/// Processor entry flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Processor signature (family 6) and feature flags (FPU, APIC) in processor entries.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
/// Entry types.
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
/// Interrupt types.
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// ISA IRQs described.
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Build the configuration table (header and entries) for `cpus` vCPUs at `addr`.
fn config_table(cpus: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // type, irqtype, irqflag (conforming polarity/trigger), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT (the PIC) on LINT0, NMI on LINT1, for all local APICs (0xff).
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table.extend_from_slice(&len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"IOVIRT  ");
    table.extend_from_slice(b"iovirt-vmm  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_DEFAULT.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Write the floating pointer and the table for `cpus` vCPUs into `mem`.
pub fn write(mem: &GuestMemoryMmap, cpus: u32) -> Result<(), BootError> {
    // APIC IDs are 8 bits and the IOAPIC takes the ID after the last CPU.
    let cpus = u8::try_from(cpus)
        .ok()
        .filter(|n| *n < 255)
        .ok_or_else(|| BootError::BootParams(format!("MP table: {cpus} vCPUs do not fit")))?;
    let table_addr = MPTABLE_START + 16;
    let table = config_table(cpus);
    if table_addr + table.len() as u64 > LOW_RAM_END {
        return Err(BootError::BootParams(format!(
            "MP table for {cpus} vCPUs does not fit below 640 KiB"
        )));
    }
    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);
    mem.write_slice(&mpf, GuestAddress(MPTABLE_START))
        .and_then(|_| mem.write_slice(&table, GuestAddress(table_addr)))
        .map_err(|e| BootError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = config_table(4);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([t[4], t[5]]) as usize, t.len());
        // 4 processors + bus + ioapic + 16 intsrc + 2 lintsrc
        assert_eq!(u16::from_le_bytes([t[34], t[35]]), 24);
        assert_eq!(t.len(), 44 + 4 * 20 + 20 * 8);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write(&mem, 4).unwrap();
        let mut mpf = [0u8; 16];
        mem.read_slice(&mut mpf, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(mpf.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert!(write(&mem, 255).is_err());
    }
}
