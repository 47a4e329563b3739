//! # iovirt-vmm: the example VMM
//!
//! Thin wiring of iovirt's device models to KVM; the only crate in the workspace
//! that knows KVM. A vCPU exit is dispatched to a PIO or MMIO [`iovirt_bus::Bus`],
//! which calls the device model; device interrupts reach KVM's in-kernel irqchip
//! through [`vm::KvmIrqLine`]. Embedders replace this binary with their own VMM.
//!
//! Exit status: 0 when the guest resets (i8042 0xFE, PIIX3 0xCF9, triple fault) or
//! powers off, or the user quits with Ctrl-A x; 1 on any error (one line on stderr);
//! 2 on a command-line error.

mod boot;
mod cli;
mod control;
mod devices;
mod disks;
mod iommu;
mod irq;
mod layout;
mod stats;
mod terminal;
mod vcpu;
mod vfio;
mod vm;

use std::sync::Arc;

use iovirt_bus::{AddressSpace, Bus};
use vm_memory::GuestMemoryMmap;

use boot::linux::{EntryPoint, LinuxBoot};
use boot::BootError;
use cli::{Command, Config, SerialMode};
use devices::{DeviceError, MachineInfo};
use layout::MemoryLayout;
use vcpu::{ExitHandle, ExitReason, VcpuContext};
use vm::{Vm, VmError};

/// Everything that can stop the VMM before or while the VM runs.
#[derive(Debug, thiserror::Error)]
enum VmmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error(transparent)]
    Disks(#[from] disks::DiskError),
    #[error("disk image {path}: {err}")]
    DiskImage { path: String, err: std::io::Error },
    #[error("cannot allocate {size:#x} bytes of guest memory: {err}")]
    Memory { size: u64, err: String },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Iommu(#[from] iommu::IommuError),
    #[error(transparent)]
    Vfio(#[from] vfio::host::OpenError),
    #[error("control socket {path}: {err}")]
    Control { path: String, err: std::io::Error },
    #[error("{0}")]
    Guest(String),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cmd = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("iovirt-vmm: {e}");
            std::process::exit(2);
        }
    };
    let cfg = match cmd {
        Command::Help => {
            print!("{}", cli::USAGE);
            return;
        }
        Command::Run(cfg) => cfg,
    };
    let code = match run(&cfg) {
        Ok(reason) => {
            log::info!("VM stopped: {reason:?}");
            reason.exit_code()
        }
        Err(e) => {
            eprintln!("iovirt-vmm: {e}");
            1
        }
    };
    // vCPU threads have been joined; other helper threads (stdin) are left to die with us.
    std::process::exit(code);
}

fn check_disks(cfg: &Config) -> Result<(), VmmError> {
    // Every image is checked before KVM is touched, so a typo shows up at once.
    let images = cfg.disks.iter().map(|d| &d.path).chain(cfg.cdrom.iter());
    for path in images {
        std::fs::metadata(path).map_err(|err| VmmError::DiskImage {
            path: path.display().to_string(),
            err,
        })?;
    }
    Ok(())
}

fn run(cfg: &Config) -> Result<ExitReason, VmmError> {
    check_disks(cfg)?;
    for path in &cfg.vfio {
        vfio::host::check_path(path)?;
    }
    let kvm = vm::open_kvm(&cfg.kvm_device)?;
    let mut vm = Vm::new(&kvm)?;

    // Guest RAM around the PCI hole.
    let layout = MemoryLayout::new(cfg.mem);
    let ram = GuestMemoryMmap::from_ranges(&layout.ram_ranges()).map_err(|e| VmmError::Memory {
        size: cfg.mem,
        err: e.to_string(),
    })?;
    vm.add_memory(&ram, false)?;

    // What runs first: the kernel (direct boot) or the firmware at the reset vector.
    let entry = match &cfg.kernel {
        Some(kernel) => Some(boot::linux::load(
            &LinuxBoot {
                kernel,
                initrd: cfg.initrd.as_deref(),
                cmdline: &cfg.cmdline,
                layout,
                cpus: cfg.cpus,
            },
            &ram,
        )?),
        None => None,
    };
    // Firmware only when it runs: a direct-booted kernel must not find stale ROM
    // contents in 0xE0000-0xFFFFF when it scans for MP/SMBIOS tables.
    let _firmware = match entry {
        None => {
            let fw = boot::firmware::load(&cfg.firmware, &ram)?;
            vm.add_memory(&fw.mem, true)?;
            Some(fw)
        }
        Some(_) => None,
    };

    let pio = Arc::new(Bus::new(AddressSpace::Pio));
    let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
    let exit = ExitHandle::new();
    if cfg.trap_stats.is_some() {
        stats::enable_marks(&pio, &mmio);
    }
    let devices = devices::wire(
        &vm.fd,
        &pio,
        &mmio,
        &MachineInfo {
            layout,
            cpus: cfg.cpus,
            serial: &cfg.serial,
            debugcon: cfg.debugcon.as_deref(),
        },
        &exit,
    )?;
    let router = Arc::new(irq::KvmMsiRouter::new(vm.fd.clone(), vm.msi_routing));
    let msi: Arc<dyn iovirt_bus::MsiSink> = router.clone();
    let iommu = match cfg.iommu {
        Some(kind) => Some(iommu::IommuWiring::new(kind, &ram, &mmio, msi.clone())?),
        None => None,
    };
    let mut disks = disks::attach(
        &disks::DiskWiring {
            vm: &vm.fd,
            ram: &ram,
            pio: &pio,
            pci: &devices.pci,
            piix3: &devices.piix3,
            msi: msi.clone(),
            ioeventfd: vm.ioeventfd,
            iommu: iommu.as_ref(),
        },
        &cfg.disks,
        cfg.cdrom.as_deref(),
    )?;
    if let Some(iommu) = &iommu {
        iommu.finish(&ram, &devices.pci, msi)?;
        if entry.is_some() {
            // VIOT applies to PCI devices under an ACPI host bridge only.
            let pci_root = cfg.iommu == Some(cli::IommuKind::Virtio);
            boot::acpi::write(&ram, cfg.cpus, &[iommu.acpi_table()], pci_root)?;
        }
    }

    // Pass-through devices, in the slots after the virtio disks.
    let virtio_disks = cfg
        .disks
        .iter()
        .filter(|d| d.interface == cli::DiskInterface::Virtio);
    let first_slot = disks::FIRST_VIRTIO_SLOT.saturating_add(virtio_disks.count() as u8);
    vfio::host::attach_all(
        &cfg.vfio,
        &vm.fd,
        &ram,
        &devices.pci,
        &devices.piix3,
        &router,
        first_slot,
    )?;

    // The control socket (removed again when `_control` drops).
    let _control = match &cfg.control {
        Some(path) => {
            let control = control::Control::new(
                control::disks(std::mem::take(&mut disks.list)),
                disks.sched.as_ref().map(|s| s.scheduler().clone()),
            );
            let server =
                control::start(path, Arc::new(control)).map_err(|err| VmmError::Control {
                    path: path.display().to_string(),
                    err,
                })?;
            Some(server)
        }
        None => None,
    };

    // vCPUs.
    vcpu::install_kick_handler()?;
    let mut contexts = Vec::new();
    for i in 0..cfg.cpus {
        let fd = vm
            .fd
            .create_vcpu(u64::from(i))
            .map_err(vm::kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = vcpu::cpuid_for(&kvm, i, cfg.cpus)?;
        fd.set_cpuid2(&cpuid)
            .map_err(vm::kvm_err("KVM_SET_CPUID2"))?;
        if i == 0 {
            if let Some(entry) = entry {
                boot::linux::setup_boot_vcpu(&fd, &ram, entry)?;
                match entry {
                    EntryPoint::Pvh(a) => log::info!("vcpu0: PVH entry at {a:#x}"),
                    EntryPoint::Linux64(a) => log::info!("vcpu0: 64-bit entry at {a:#x}"),
                }
            }
        }
        contexts.push(VcpuContext {
            index: i,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            exit: exit.clone(),
        });
    }

    // Serial input from a terminal (raw mode, restored when `_raw` drops).
    let _raw = match cfg.serial {
        SerialMode::Stdio => {
            let raw = terminal::RawMode::enable();
            terminal::spawn_input(devices.serial.clone(), exit.clone(), raw.is_some())
                .map_err(VmmError::Thread)?;
            raw
        }
        _ => None,
    };

    let mut threads = Vec::new();
    for ctx in contexts {
        match vcpu::spawn(ctx) {
            Ok(t) => threads.push(t),
            Err(e) => {
                exit.request(ExitReason::Error(format!(
                    "cannot start a vCPU thread: {e}"
                )));
                break;
            }
        }
    }
    let reason = exit.wait();
    vcpu::stop_all(threads);
    log::debug!("PIO trap counters: {:?}", pio.all_stats());
    if let Some(ide) = &disks.ide {
        log::debug!("IDE idle at exit: {}", ide.is_idle());
    }
    if let Some(sched) = &disks.sched {
        sched.log_stats();
    }
    if let Some(path) = &cfg.trap_stats {
        if let Err(e) = stats::write(path, &pio, &mmio) {
            eprintln!(
                "iovirt-vmm: cannot write trap stats to {}: {e}",
                path.display()
            );
        }
    }
    match reason {
        ExitReason::Error(msg) => Err(VmmError::Guest(msg)),
        r => Ok(r),
    }
}
