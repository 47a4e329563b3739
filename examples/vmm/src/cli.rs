//! Command-line parsing (Cloud Hypervisor style `--opt value` and `key=value,...` lists).
//!
//! Hand-written so the example VMM keeps its dependency list short; every error is a
//! [`CliError`] that prints as one line.

use std::path::PathBuf;

use iovirt_backend::CacheMode;

/// Default firmware: Debian's `seabios` package.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/seabios/bios-256k.bin";
/// Default kernel command line for direct boot.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";
/// Default guest memory size.
pub const DEFAULT_MEM: u64 = 512 << 20;
/// Default KVM device node.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Largest vCPU count accepted (the in-kernel irqchip's xAPIC IDs are 8 bits).
pub const MAX_CPUS: u32 = 254;

/// What went wrong on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An option the VMM does not know.
    #[error("unknown option {0:?} (see --help)")]
    UnknownOption(String),
    /// An option that needs a value was last on the line.
    #[error("option {0} needs a value")]
    MissingValue(&'static str),
    /// A size like `512M` that does not parse.
    #[error("bad size {0:?} for --mem: use a number with an optional K, M, G or T suffix, e.g. 512M or 2G")]
    BadSize(String),
    /// Memory size out of range.
    #[error("--mem {0:#x} is out of range: between 16M and 1T")]
    MemOutOfRange(u64),
    /// A CPU count that does not parse or is out of range.
    #[error("bad --cpus {0:?}: use a number from 1 to {MAX_CPUS}")]
    BadCpus(String),
    /// `--serial` with an unknown mode.
    #[error("bad --serial {0:?}: use stdio, null or file=PATH")]
    BadSerial(String),
    /// `--debugcon` with an unknown mode.
    #[error("bad --debugcon {0:?}: use file=PATH")]
    BadDebugcon(String),
    /// A `--disk` list that does not parse.
    #[error("bad --disk {value:?}: {reason}")]
    BadDisk {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--initrd` or `--cmdline` without `--kernel`.
    #[error("{0} needs --kernel")]
    NeedsKernel(&'static str),
    /// An option given twice that may appear only once.
    #[error("option {0} given more than once")]
    Repeated(&'static str),
    /// `--device` with an unknown kind.
    #[error("bad --device {0:?}: use vfio=SYSFS_PATH")]
    BadDevice(String),
    /// Two options that cannot be used together.
    #[error("{0} and {1} cannot be used together: {2}")]
    Conflict(&'static str, &'static str, &'static str),
    /// `--iommu` with an unknown model.
    #[error("bad --iommu {0:?}: use vtd or virtio")]
    BadIommu(String),
}

/// Which IOMMU the DMA-capable devices sit behind (`--iommu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuKind {
    /// An emulated Intel VT-d unit (MMIO registers, DMAR table).
    Vtd,
    /// A virtio-iommu-pci function (VIOT table).
    Virtio,
}

/// Where the UART's output (and input) goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// The VMM's stdin/stdout; stdin is put in raw mode when it is a terminal.
    Stdio,
    /// Append the output to a file; no input.
    File(PathBuf),
    /// Discard the output; no input.
    Null,
}

/// Which controller a `--disk` hangs off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskInterface {
    /// A virtio-blk-pci function (00:04.0 upward).
    #[default]
    Virtio,
    /// An ATA disk on the PIIX3 IDE primary channel (master, then slave).
    Ide,
}

/// One `--disk` option, parsed and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file, or with `stack` a filter-stack description (TOML).
    pub path: PathBuf,
    /// `path` is a filter-stack description (`stack=FILE.toml`), not an image.
    pub stack: bool,
    /// Whether the guest may not write.
    pub readonly: bool,
    /// How the host page cache is used (`direct=on` is an alias of `cache=none`).
    pub cache: CacheMode,
    /// Optional serial number shown to the guest (at most 20 bytes, as in virtio-blk).
    pub serial: Option<String>,
    /// The controller.
    pub interface: DiskInterface,
    /// Virtual interrupt coalescing for virtio-blk (`coalesce=on`).
    pub coalesce: bool,
    /// I/O scheduling options (`reservation=`, `limit=`, `weight=`), validated;
    /// when any disk has them, all disks share one mClock stage.
    pub sched: Option<String>,
}

/// The whole configuration of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Firmware image (ignored for direct kernel boot).
    pub firmware: PathBuf,
    /// Kernel for direct boot (vmlinux ELF or bzImage).
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for direct boot.
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct boot.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// UART back-end.
    pub serial: SerialMode,
    /// Debug console (port 0x402) log file.
    pub debugcon: Option<PathBuf>,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// ISO image for the ATAPI CD-ROM on the IDE secondary master.
    pub cdrom: Option<PathBuf>,
    /// Where to write the buses' trap counters (JSON) when the VM stops.
    pub trap_stats: Option<PathBuf>,
    /// KVM device node (tests point it at a missing path).
    pub kvm_device: PathBuf,
    /// Unix socket for the JSON-lines control interface (docs/CONTROL.md).
    pub control: Option<PathBuf>,
    /// The IOMMU every virtio-blk and IDE DMA goes through, if any.
    pub iommu: Option<IommuKind>,
    /// Host PCI devices passed through with VFIO (sysfs directories).
    pub vfio: Vec<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            firmware: PathBuf::from(DEFAULT_FIRMWARE),
            kernel: None,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            mem: DEFAULT_MEM,
            cpus: 1,
            serial: SerialMode::Stdio,
            debugcon: None,
            disks: Vec::new(),
            cdrom: None,
            trap_stats: None,
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            control: None,
            iommu: None,
            vfio: Vec::new(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// Run a VM.
    Run(Box<Config>),
    /// Print usage and exit 0.
    Help,
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
iovirt-vmm: example VMM wiring iovirt's device models to KVM

USAGE:
    iovirt-vmm [OPTIONS]

Boots firmware (SeaBIOS by default) or, with --kernel, a Linux kernel directly.

OPTIONS:
    --firmware FILE       firmware image mapped below 4 GiB [default: /usr/share/seabios/bios-256k.bin]
    --kernel FILE         direct boot: a vmlinux ELF (PVH entry preferred) or a bzImage
    --initrd FILE         initial ramdisk for --kernel
    --cmdline STR         kernel command line [default: \"console=ttyS0 reboot=k panic=1\"]
    --mem SIZE            guest memory, e.g. 512M, 2G [default: 512M]
    --cpus N              number of vCPUs [default: 1]
    --serial MODE         UART 0x3f8: stdio | null | file=PATH [default: stdio]
    --debugcon file=PATH  write the debug console (port 0x402, SeaBIOS's log) to PATH
    --disk path=FILE[,readonly=on][,cache=none|writethrough|writeback|unsafe][,serial=ID][,interface=virtio|ide]
    --disk stack=FILE.toml[,serial=ID][,interface=virtio|ide]   (a filter stack: docs/FILTERS.md)
           any --disk also takes [,reservation=IOPS][,limit=IOPS|none][,weight=W]: then every disk
           goes through one shared mClock scheduling stage (docs/SCHEDULING.md); virtio disks take
           [,coalesce=on] (virtual interrupt coalescing: fewer interrupts when many requests are in flight)
                          a disk (repeatable): virtio-blk-pci at 00:04.0 upward (default), or
                          an ATA disk on the IDE primary channel [default cache: none]
    --cdrom FILE          an ISO image in the ATAPI CD-ROM on the IDE secondary master
    --trap-stats FILE     write per-device PIO/MMIO trap counters, KVM exits and interrupt
                          counts as JSON to FILE when the VM stops
    --control PATH        serve the JSON-lines control interface on a unix socket at PATH:
                          disks, scheduling statistics and parameters, filter-stack controls
                          (docs/CONTROL.md)
    --iommu vtd|virtio    put the disks' DMA (virtio-blk, IDE bus master) behind an emulated
                          Intel VT-d unit (MMIO 0xfed90000) or a virtio-iommu-pci at 00:03.0;
                          DMA passes through until the guest enables translation (docs/IOMMU.md)
    --device vfio=PATH    pass a host PCI device bound to vfio-pci through to the guest
                          (PATH: its sysfs directory, e.g. /sys/bus/pci/devices/0000:01:00.0;
                          repeatable; placed after the virtio disks; not with --iommu)
    --kvm-device PATH     KVM device node [default: /dev/kvm]
    -h, --help            print this help

The VM exits with status 0 when the guest resets or shuts down (i8042 reset, triple
fault, KVM system event); with serial on a terminal, Ctrl-A x quits.
";

/// Parse a size: a decimal number with an optional K/M/G/T suffix (binary units, an
/// optional trailing `B` or `iB`).
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let bad = || CliError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn parse_on_off(key: &str, v: &str, value: &str) -> Result<bool, CliError> {
    match v {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(CliError::BadDisk {
            value: value.to_string(),
            reason: format!("{key}={v:?} must be on or off"),
        }),
    }
}

/// Parse one `--disk` value.
pub fn parse_disk(value: &str) -> Result<DiskConfig, CliError> {
    let bad = |reason: String| CliError::BadDisk {
        value: value.to_string(),
        reason,
    };
    let mut path = None;
    let mut stack = false;
    let mut set_cache_or_ro = false;
    let mut sched: Vec<String> = Vec::new();
    let mut coalesce = false;
    let mut readonly = false;
    let mut cache = CacheMode::None;
    let mut serial = None;
    let mut interface = DiskInterface::Virtio;
    for item in value.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("{item:?} is not key=value")))?;
        match k {
            "path" if v.is_empty() => return Err(bad("empty path".into())),
            "path" | "stack" if path.is_some() => {
                return Err(bad("give one of path=FILE or stack=FILE.toml".into()))
            }
            "path" => path = Some(PathBuf::from(v)),
            "stack" if v.is_empty() => return Err(bad("empty stack".into())),
            "stack" => {
                path = Some(PathBuf::from(v));
                stack = true;
            }
            "readonly" => {
                readonly = parse_on_off(k, v, value)?;
                set_cache_or_ro = true;
            }
            "direct" => {
                set_cache_or_ro = true;
                cache = if parse_on_off(k, v, value)? {
                    CacheMode::None
                } else {
                    CacheMode::Writeback
                }
            }
            "cache" => {
                cache = v.parse().map_err(bad)?;
                set_cache_or_ro = true;
            }
            "interface" | "if" => {
                interface = match v {
                    "virtio" => DiskInterface::Virtio,
                    "ide" => DiskInterface::Ide,
                    _ => return Err(bad(format!("interface={v:?} must be virtio or ide"))),
                }
            }
            "reservation" | "limit" | "weight" => sched.push(format!("{k}={v}")),
            "coalesce" => coalesce = parse_on_off(k, v, value)?,
            "serial" if v.len() > 20 => return Err(bad("serial is longer than 20 bytes".into())),
            "serial" => serial = Some(v.to_string()),
            _ => return Err(bad(format!("unknown key {k:?}"))),
        }
    }
    let path = path.ok_or_else(|| bad("missing path=FILE (or stack=FILE.toml)".into()))?;
    if stack && set_cache_or_ro {
        return Err(bad(
            "readonly/cache/direct belong in the stack description, not beside stack=".into(),
        ));
    }
    let sched = if sched.is_empty() {
        None
    } else {
        let joined = sched.join(",");
        joined
            .parse::<iovirt_sched::ClientParams>()
            .map_err(|e| bad(e.to_string()))?;
        Some(joined)
    };
    if coalesce && interface == DiskInterface::Ide {
        return Err(bad("coalesce=on is for virtio disks".into()));
    }
    Ok(DiskConfig {
        coalesce,
        sched,
        path,
        stack,
        readonly,
        cache,
        serial,
        interface,
    })
}

fn parse_serial(v: &str) -> Result<SerialMode, CliError> {
    match v {
        "stdio" => Ok(SerialMode::Stdio),
        "null" | "off" => Ok(SerialMode::Null),
        _ => match v.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(CliError::BadSerial(v.to_string())),
        },
    }
}

/// Parse the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Command, CliError> {
    let mut cfg = Config::default();
    let mut args = args.into_iter();
    let mut seen_kernel_opts: Vec<&'static str> = Vec::new();
    let mut seen: Vec<&'static str> = Vec::new();
    while let Some(arg) = args.next() {
        // Accept --opt=value as well as --opt value.
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let opt: &'static str = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--firmware" => "--firmware",
            "--kernel" => "--kernel",
            "--initrd" => "--initrd",
            "--cmdline" => "--cmdline",
            "--mem" => "--mem",
            "--cpus" => "--cpus",
            "--serial" => "--serial",
            "--debugcon" => "--debugcon",
            "--disk" => "--disk",
            "--cdrom" => "--cdrom",
            "--trap-stats" => "--trap-stats",
            "--kvm-device" => "--kvm-device",
            "--control" => "--control",
            "--iommu" => "--iommu",
            "--device" => "--device",
            _ => return Err(CliError::UnknownOption(arg)),
        };
        let value = match inline {
            Some(v) => v,
            None => args.next().ok_or(CliError::MissingValue(opt))?,
        };
        if opt != "--disk" && opt != "--device" {
            if seen.contains(&opt) {
                return Err(CliError::Repeated(opt));
            }
            seen.push(opt);
        }
        match opt {
            "--firmware" => cfg.firmware = PathBuf::from(value),
            "--kernel" => cfg.kernel = Some(PathBuf::from(value)),
            "--initrd" => {
                cfg.initrd = Some(PathBuf::from(value));
                seen_kernel_opts.push(opt);
            }
            "--cmdline" => {
                cfg.cmdline = value;
                seen_kernel_opts.push(opt);
            }
            "--mem" => {
                let mem = parse_size(&value)?;
                if !(16 << 20..=1 << 40).contains(&mem) {
                    return Err(CliError::MemOutOfRange(mem));
                }
                cfg.mem = mem;
            }
            "--cpus" => {
                cfg.cpus = match value.parse::<u32>() {
                    Ok(n) if (1..=MAX_CPUS).contains(&n) => n,
                    _ => return Err(CliError::BadCpus(value)),
                }
            }
            "--serial" => cfg.serial = parse_serial(&value)?,
            "--debugcon" => match value.strip_prefix("file=") {
                Some(p) if !p.is_empty() => cfg.debugcon = Some(PathBuf::from(p)),
                _ => return Err(CliError::BadDebugcon(value)),
            },
            "--disk" => cfg.disks.push(parse_disk(&value)?),
            "--cdrom" if value.is_empty() => return Err(CliError::MissingValue("--cdrom")),
            "--cdrom" => cfg.cdrom = Some(PathBuf::from(value)),
            "--trap-stats" if value.is_empty() => {
                return Err(CliError::MissingValue("--trap-stats"))
            }
            "--trap-stats" => cfg.trap_stats = Some(PathBuf::from(value)),
            "--kvm-device" => cfg.kvm_device = PathBuf::from(value),
            "--control" if value.is_empty() => return Err(CliError::MissingValue("--control")),
            "--control" => cfg.control = Some(PathBuf::from(value)),
            "--device" => match value.strip_prefix("vfio=") {
                Some(p) if !p.is_empty() => cfg.vfio.push(PathBuf::from(p)),
                _ => return Err(CliError::BadDevice(value)),
            },
            "--iommu" => {
                cfg.iommu = Some(match value.as_str() {
                    "vtd" | "intel" => IommuKind::Vtd,
                    "virtio" => IommuKind::Virtio,
                    _ => return Err(CliError::BadIommu(value)),
                })
            }
            _ => unreachable!("every option name is matched above"),
        }
    }
    if cfg.iommu.is_some() && !cfg.vfio.is_empty() {
        return Err(CliError::Conflict(
            "--iommu",
            "--device vfio=",
            "pass-through devices do not follow a virtual IOMMU's mappings yet",
        ));
    }
    if cfg.kernel.is_none() {
        if let Some(opt) = seen_kernel_opts.first() {
            return Err(CliError::NeedsKernel(opt));
        }
    }
    Ok(Command::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, CliError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    fn cfg(args: &[&str]) -> Config {
        match p(args).unwrap() {
            Command::Run(c) => *c,
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1024k"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999T",
            "0x10M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_and_options() {
        assert_eq!(cfg(&[]), Config::default());
        let c = cfg(&[
            "--mem",
            "1G",
            "--cpus=2",
            "--serial",
            "file=/tmp/x",
            "--debugcon",
            "file=/tmp/d",
            "--kernel",
            "k",
            "--cmdline",
            "a b=c",
            "--disk",
            "path=/a,readonly=on",
            "--disk",
            "path=/b,serial=xyz,direct=off",
            "--disk",
            "path=/c,cache=writethrough,interface=ide",
            "--cdrom",
            "/cd.iso",
            "--trap-stats=/tmp/t.json",
            "--control",
            "/tmp/c.sock",
            "--iommu",
            "vtd",
        ]);
        assert_eq!(c.iommu, Some(IommuKind::Vtd));
        assert_eq!(cfg(&["--iommu=virtio"]).iommu, Some(IommuKind::Virtio));
        assert_eq!(
            cfg(&["--device", "vfio=/sys/x", "--device=vfio=/sys/y"]).vfio,
            vec![PathBuf::from("/sys/x"), PathBuf::from("/sys/y")]
        );
        assert!(matches!(
            p(&["--device", "vfio="]),
            Err(CliError::BadDevice(_))
        ));
        assert!(matches!(
            p(&["--device", "virtio-net"]),
            Err(CliError::BadDevice(_))
        ));
        assert!(matches!(
            p(&["--device", "vfio=/a", "--iommu", "vtd"]),
            Err(CliError::Conflict(..))
        ));
        assert_eq!(
            p(&["--iommu", "amd"]),
            Err(CliError::BadIommu("amd".into()))
        );
        assert_eq!(c.mem, 1 << 30);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.serial, SerialMode::File("/tmp/x".into()));
        assert_eq!(c.debugcon, Some("/tmp/d".into()));
        assert_eq!(c.cmdline, "a b=c");
        assert_eq!(c.disks.len(), 3);
        assert!(c.disks[0].readonly);
        assert_eq!(c.disks[0].cache, CacheMode::None);
        assert_eq!(c.disks[0].interface, DiskInterface::Virtio);
        assert_eq!(c.disks[1].serial.as_deref(), Some("xyz"));
        assert_eq!(c.disks[1].cache, CacheMode::Writeback);
        assert_eq!(c.disks[2].cache, CacheMode::Writethrough);
        assert_eq!(c.disks[2].interface, DiskInterface::Ide);
        assert_eq!(c.cdrom, Some("/cd.iso".into()));
        assert_eq!(c.trap_stats, Some("/tmp/t.json".into()));
        assert_eq!(c.control, Some("/tmp/c.sock".into()));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["--control="]), Err(CliError::MissingValue("--control")));
        assert_eq!(
            p(&["--control", "/a", "--control", "/b"]),
            Err(CliError::Repeated("--control"))
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(p(&["--mem", "lots"]), Err(CliError::BadSize(_))));
        assert!(matches!(
            p(&["--mem", "1M"]),
            Err(CliError::MemOutOfRange(_))
        ));
        assert!(matches!(p(&["--cpus", "0"]), Err(CliError::BadCpus(_))));
        assert!(matches!(p(&["--bogus"]), Err(CliError::UnknownOption(_))));
        assert!(matches!(p(&["--mem"]), Err(CliError::MissingValue(_))));
        assert!(matches!(
            p(&["--serial", "tcp"]),
            Err(CliError::BadSerial(_))
        ));
        assert!(matches!(
            p(&["--initrd", "x"]),
            Err(CliError::NeedsKernel(_))
        ));
        assert!(matches!(
            p(&["--cpus", "1", "--cpus", "2"]),
            Err(CliError::Repeated(_))
        ));
        for d in [
            "readonly=on",
            "path=",
            "path=/a,foo=1",
            "path=/a,readonly=maybe",
            "path=/a,cache=fast",
            "path=/a,interface=scsi",
            "stack=/a.toml,cache=none",
            "stack=/a.toml,path=/b",
            "stack=",
            "path=/a,weight=0",
            "path=/a,coalesce=maybe",
            "path=/a,interface=ide,coalesce=on",
            "path=/a,limit=fast",
            "x",
        ] {
            assert!(
                matches!(p(&["--disk", d]), Err(CliError::BadDisk { .. })),
                "{d}"
            );
        }
    }
}
