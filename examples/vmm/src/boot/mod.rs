//! How the guest starts: firmware at the reset vector, or a Linux kernel loaded directly.

pub mod acpi;
pub mod firmware;
pub mod linux;
pub mod mptable;

/// Errors preparing the guest's boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The firmware file is missing.
    #[error("firmware {0} not found: install Debian's SeaBIOS with `apt-get install seabios`, or pass --firmware FILE")]
    FirmwareMissing(String),
    /// A file could not be read.
    #[error("cannot read {what} {path}: {err}")]
    Read {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// The firmware has an unusable size.
    #[error("firmware {path} is {size} bytes: it must be a multiple of 64 KiB between 128 KiB and 16 MiB")]
    FirmwareSize {
        /// Its path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Guest memory could not be allocated or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// linux-loader refused the kernel.
    #[error("cannot load kernel {path}: {err}")]
    Kernel {
        /// Its path.
        path: String,
        /// The loader's error.
        err: linux_loader::loader::Error,
    },
    /// The kernel is neither a vmlinux ELF nor a bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat(String),
    /// Boot parameters could not be written.
    #[error("writing boot parameters: {0}")]
    BootParams(String),
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig {
        /// Its path.
        path: String,
        /// Its size.
        size: u64,
        /// The highest address it could end at.
        limit: u64,
    },
    /// The command line is not acceptable.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Setting vCPU registers failed.
    #[error("setting up vCPU registers: {0}")]
    Registers(kvm_ioctls::Error),
}
