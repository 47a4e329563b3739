//! Direct Linux boot with linux-loader.
//!
//! * A vmlinux ELF with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`) starts at its PVH
//!   entry in 32-bit protected mode, paging off, flat segments, `EBX` pointing at an
//!   `hvm_start_info` with the memory map, the command line and the initrd module.
//! * A vmlinux ELF without the note, and a bzImage, start at their 64-bit entry with
//!   a zero page (`boot_params`), identity-mapped page tables for the low 4 GiB, a GDT
//!   and long mode enabled (the x86 64-bit boot protocol).
//!
//! Only the boot vCPU (0) gets these registers; the others wait for INIT/SIPI in
//! KVM's reset state. An MP table (see [`super::mptable`]) lists every vCPU and the
//! IOAPIC; ACPI tables ([`super::acpi`]) are written only with `--iommu` (for the DMAR or VIOT).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout::{MemoryLayout, HIGH_RAM_START};

/// GDT location.
const GDT_ADDR: u64 = 0x500;
/// IDT location (an empty IDT).
const IDT_ADDR: u64 = 0x520;
/// `hvm_start_info` (PVH).
const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// The zero page (64-bit boot protocol).
const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
const BOOT_STACK: u64 = 0x8ff0;
/// Page tables: PML4, PDPT and four page directories (identity map of 4 GiB).
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
const CMDLINE_ADDR: u64 = 0x2_0000;
/// Room for the command line (up to the EBDA).
const CMDLINE_MAX: usize = 0x1_0000;
/// Highest end of the initrd when the kernel does not say (the boot protocol's old default).
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;
/// `hvm_start_info` magic.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature in the setup header.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "Loader type: undefined" (we are not a registered boot loader).
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment Linux expects when the header does not give one.
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// How vCPU 0 must start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode at this address, EBX = `hvm_start_info`.
    Pvh(u64),
    /// 64-bit boot protocol: long mode at this address, RSI = zero page.
    Linux64(u64),
}

/// Everything direct boot needs.
pub struct LinuxBoot<'a> {
    /// Kernel image.
    pub kernel: &'a Path,
    /// Optional initrd.
    pub initrd: Option<&'a Path>,
    /// Command line.
    pub cmdline: &'a str,
    /// RAM layout.
    pub layout: MemoryLayout,
    /// vCPU count (for the MP table).
    pub cpus: u32,
}

fn mem_err<E: std::fmt::Display>(e: E) -> BootError {
    BootError::Memory(e.to_string())
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|err| BootError::Read {
        what,
        path: path.display().to_string(),
        err,
    })
}

#[derive(PartialEq)]
enum Format {
    Elf,
    BzImage,
}

fn detect(f: &mut File, path: &Path) -> Result<Format, BootError> {
    let mut head = [0u8; 0x206];
    let read_err = |err| BootError::Read {
        what: "kernel",
        path: path.display().to_string(),
        err,
    };
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let n = f.read(&mut head).map_err(read_err)?;
    f.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Format::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(Format::BzImage)
    } else {
        Err(BootError::KernelFormat(path.display().to_string()))
    }
}

/// Load the kernel, initrd and boot parameters into `mem`; returns how to start vCPU 0.
pub fn load(cfg: &LinuxBoot<'_>, mem: &GuestMemoryMmap) -> Result<EntryPoint, BootError> {
    let kpath = cfg.kernel.display().to_string();
    let mut kf = open("kernel", cfg.kernel)?;
    let format = detect(&mut kf, cfg.kernel)?;
    let kerr = |err| BootError::Kernel {
        path: kpath.clone(),
        err,
    };
    let himem = Some(GuestAddress(HIGH_RAM_START));
    let result = match format {
        Format::Elf => Elf::load(mem, None, &mut kf, himem).map_err(kerr)?,
        Format::BzImage => BzImage::load(mem, None, &mut kf, himem).map_err(kerr)?,
    };
    log::info!(
        "kernel {kpath}: loaded at {:#x}..{:#x}, {}",
        result.kernel_load.raw_value(),
        result.kernel_end,
        result.pvh_boot_cap
    );

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(cfg.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cfg.cmdline.len() as u32 + 1;

    let initrd_max = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(INITRD_ADDR_MAX_DEFAULT);
    let initrd = match cfg.initrd {
        Some(p) => Some(load_initrd(
            p,
            mem,
            &cfg.layout,
            initrd_max,
            result.kernel_end,
        )?),
        None => None,
    };

    if let Err(e) = super::mptable::write(mem, cfg.cpus) {
        log::warn!("no MP table, the kernel will see one CPU: {e}");
    }
    let e820: Vec<(u64, u64, u32)> = cfg.layout.e820();
    match (format, result.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh(mem, &e820, initrd)?;
            Ok(EntryPoint::Pvh(entry.raw_value()))
        }
        (f, _) => {
            let mut params = boot_params::default();
            match result.setup_header {
                Some(h) if f == Format::BzImage => params.hdr = h,
                _ => {
                    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
                    params.hdr.header = KERNEL_HDR_MAGIC;
                    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
                }
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cmdline_len;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            if e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
                return Err(BootError::BootParams("e820 map too long".into()));
            }
            for (i, &(addr, size, kind)) in e820.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr,
                    size,
                    r#type: kind,
                };
            }
            params.e820_entries = e820.len() as u8;
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
                &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
                mem,
            )
            .map_err(|e| BootError::BootParams(e.to_string()))?;
            // vmlinux: e_entry; bzImage: the 64-bit entry is 0x200 past the load address.
            let entry = match f {
                Format::BzImage => result.kernel_load.raw_value() + 0x200,
                Format::Elf => result.kernel_load.raw_value(),
            };
            Ok(EntryPoint::Linux64(entry))
        }
    }
}

/// Place the initrd page-aligned as high as allowed; returns (address, size).
fn load_initrd(
    path: &Path,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    addr_max: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = open("initrd", path)?;
    let size = f
        .metadata()
        .map_err(|err| BootError::Read {
            what: "initrd",
            path: path.display().to_string(),
            err,
        })?
        .len();
    let limit = layout.below_4g.min(addr_max.saturating_add(1));
    let too_big = || BootError::InitrdTooBig {
        path: path.display().to_string(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(mem_err)?;
    log::info!("initrd {}: {size} bytes at {addr:#x}", path.display());
    Ok((addr, size))
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
        params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))
}

/// A GDT descriptor from flags, base and limit (the layout in the Intel SDM 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The KVM segment a GDT entry at `index` describes.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Set vCPU 0's registers for `entry` (memory already holds the boot structures).
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), BootError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(BootError::Registers)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    // Entries 0 and 1 null; code at 0x10 and data at 0x18 (the kernel's __BOOT_CS/__BOOT_DS);
    // a TSS at 0x20 so that TR is valid.
    let code_flags = match entry {
        EntryPoint::Pvh(_) => 0xc09b, // 32-bit, 4K granularity, execute/read, accessed
        EntryPoint::Linux64(_) => 0xa09b, // 64-bit (L), execute/read, accessed
    };
    let gdt = [
        0,
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err)?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(gdt[2], 2);
    let data = segment(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[4], 4);

    match entry {
        EntryPoint::Pvh(ip) => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = ip;
            regs.rbx = PVH_INFO_ADDR;
        }
        EntryPoint::Linux64(ip) => {
            // Identity map the low 4 GiB with 2 MiB pages.
            mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
                .map_err(mem_err)?;
            for d in 0..4u64 {
                let pd = PD_ADDR + d * 0x1000;
                mem.write_obj(pd | 0x03, GuestAddress(PDPT_ADDR + d * 8))
                    .map_err(mem_err)?;
                for i in 0..512u64 {
                    let page = ((d << 30) | (i << 21)) | 0x83; // present, writable, 2M
                    mem.write_obj(page, GuestAddress(pd + i * 8))
                        .map_err(mem_err)?;
                }
            }
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = ip;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_sregs(&sregs).map_err(BootError::Registers)?;
    vcpu.set_regs(&regs).map_err(BootError::Registers)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(e, 2);
        assert_eq!(
            (s.selector, s.type_, s.l, s.db, s.g, s.present),
            (16, 0xb, 1, 0, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let s = segment(gdt_entry(0xc093, 0x1234_5678, 0xfffff), 3);
        assert_eq!((s.base, s.db, s.type_), (0x1234_5678, 1, 3));
    }
}
