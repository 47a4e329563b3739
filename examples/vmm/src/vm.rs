//! The KVM VM: open `/dev/kvm`, create the VM with its in-kernel irqchip and PIT,
//! register guest memory, and implement iovirt's interrupt traits on top of KVM.

use std::io;
use std::path::Path;
use std::sync::Arc;

use iovirt_bus::{InterruptError, InterruptLine};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` does not exist.
    #[error("{0} does not exist: KVM is not available on this host (load kvm_intel/kvm_amd, or run where /dev/kvm exists)")]
    NoKvm(String),
    /// No permission on `/dev/kvm`.
    #[error("no permission to open {0}: add yourself to the 'kvm' group or run as root")]
    KvmPermission(String),
    /// Opening `/dev/kvm` failed otherwise.
    #[error("cannot open {path}: {err}")]
    OpenKvm {
        /// Device path.
        path: String,
        /// The error.
        err: io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {err}")]
    Kvm {
        /// Which step.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// A capability the VMM needs is missing.
    #[error("KVM lacks {0}, which iovirt-vmm needs")]
    MissingCap(&'static str),
}

/// Shorthand for mapping a KVM error to [`VmError::Kvm`].
pub fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { what, err }
}

/// Open the KVM device node with a clear message for the usual failures.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let shown = path.display().to_string();
    // Check first so the message names the path instead of a bare errno.
    if let Err(e) = std::fs::metadata(path) {
        return Err(match e.kind() {
            io::ErrorKind::NotFound => VmError::NoKvm(shown),
            io::ErrorKind::PermissionDenied => VmError::KvmPermission(shown),
            _ => VmError::OpenKvm {
                path: shown,
                err: e,
            },
        });
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::NoKvm(shown.clone()))?;
    Kvm::new_with_path(cpath).map_err(|e| match e.errno() {
        libc::ENOENT => VmError::NoKvm(shown.clone()),
        libc::EACCES | libc::EPERM => VmError::KvmPermission(shown.clone()),
        _ => VmError::OpenKvm {
            path: shown.clone(),
            err: io::Error::from_raw_os_error(e.errno()),
        },
    })
}

/// A VM with its irqchip and PIT.
pub struct Vm {
    /// The VM file descriptor, shared with interrupt lines and vCPU threads.
    pub fd: Arc<VmFd>,
    next_slot: u32,
    readonly_mem: bool,
    /// KVM can signal eventfds on guest writes (`KVM_CAP_IOEVENTFD`).
    pub ioeventfd: bool,
    /// KVM can route MSIs to irqfds (`KVM_CAP_IRQFD` and `KVM_CAP_IRQ_ROUTING`).
    pub msi_routing: bool,
}

impl Vm {
    /// Create the VM: TSS and identity map addresses, in-kernel irqchip (PIC, IOAPIC,
    /// LAPICs) and PIT with its speaker port as a dummy.
    pub fn new(kvm: &Kvm) -> Result<Vm, VmError> {
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let readonly_mem = kvm.check_extension(Cap::ReadonlyMem);
        let ioeventfd = kvm.check_extension(Cap::Ioeventfd);
        let msi_routing = kvm.check_extension(Cap::Irqfd) && kvm.check_extension(Cap::IrqRouting);
        log::debug!("KVM: ioeventfd {ioeventfd}, irqfd + GSI routing {msi_routing}");
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Vm {
            fd: Arc::new(fd),
            next_slot: 0,
            readonly_mem,
            ioeventfd,
            msi_routing,
        })
    }

    /// Register every region of `mem` as a KVM memory slot; `readonly` asks for
    /// `KVM_MEM_READONLY` (writes then exit as MMIO writes). Without the capability,
    /// the region is mapped writable and a warning is logged.
    pub fn add_memory(&mut self, mem: &GuestMemoryMmap, readonly: bool) -> Result<(), VmError> {
        let flags = if readonly && self.readonly_mem {
            KVM_MEM_READONLY
        } else {
            if readonly {
                log::warn!("KVM has no read-only memory slots; mapping the firmware writable");
            }
            0
        };
        for region in mem.iter() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::MissingCap("a host mapping for guest memory"))?;
            let slot = kvm_userspace_memory_region {
                slot: self.next_slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            log::debug!(
                "memory slot {}: [{:#x}, +{:#x}){}",
                self.next_slot,
                slot.guest_phys_addr,
                slot.memory_size,
                if flags != 0 { " read-only" } else { "" }
            );
            // SAFETY: `host` maps `region.len()` bytes owned by `mem`, which the caller
            // keeps alive for as long as the VM exists (both live until process exit).
            unsafe { self.fd.set_user_memory_region(slot) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            self.next_slot += 1;
        }
        Ok(())
    }
}

/// An ISA IRQ pin of the in-kernel PIC/IOAPIC, driven with `KVM_IRQ_LINE`.
pub struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    /// The line for GSI `gsi` (ISA IRQ n is GSI n).
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        KvmIrqLine { vm, gsi }
    }
}

fn io_err(e: kvm_ioctls::Error) -> InterruptError {
    InterruptError::Io(io::Error::from_raw_os_error(e.errno()))
}

impl InterruptLine for KvmIrqLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        // An edge: pulse the pin high then low.
        crate::irq::count_line_assert(self.gsi);
        self.vm.set_irq_line(self.gsi, true).map_err(io_err)?;
        self.vm.set_irq_line(self.gsi, false).map_err(io_err)
    }

    fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
        if asserted {
            crate::irq::count_line_assert(self.gsi);
        }
        self.vm.set_irq_line(self.gsi, asserted).map_err(io_err)
    }
}
