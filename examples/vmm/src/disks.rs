//! Disks: virtio-blk-pci functions at 00:04.0 upward, and the PIIX3 IDE
//! function at 00:01.1 with ATA disks on the primary channel and an ATAPI
//! CD-ROM on the secondary master.
//!
//! # virtio-blk data path
//!
//! - Back-end: [`iovirt_backend::open_async`] with the disk's cache mode and
//!   the `auto` engine (io_uring where the kernel allows it, a thread pool
//!   otherwise). Requests run on the device's queue worker thread and the
//!   back-end's threads, never on a vCPU thread.
//! - Queue notifications: each queue's notification event is registered as a
//!   KVM ioeventfd (any access length, no data match) at `BAR0 +
//!   notify offset`. [`IoEventFds`] is the PCI root's [`BarObserver`]: every
//!   time firmware or the guest moves BAR0 it unregisters the old addresses and
//!   registers the new ones, so a notify write is handled inside KVM (no exit
//!   to user space, never counted on the MMIO bus). If KVM refuses, the write
//!   traps and the transport writes the same event.
//! - Interrupts: MSI-X through [`crate::irq::KvmMsiRouter`] (irqfd per
//!   message, `KVM_SIGNAL_MSI` fallback); INTA# through the PIIX3 PIRQ routes
//!   ([`crate::irq::PirqLine`]) while MSI-X is off, as under SeaBIOS (which
//!   polls the used ring and never enables interrupts).
//!
//! # IDE
//!
//! Only wired when a disk has `interface=ide` or `--cdrom` is given (SeaBIOS
//! then probes the channels). The compatibility ports are fixed; BAR4 (bus
//! master) goes wherever firmware puts it. IRQ 14/15 are ISA lines driven by
//! level with `KVM_IRQ_LINE`. ATA disks use the same back-ends as virtio-blk;
//! the CD-ROM's ISO is [`iovirt_backend::open_image`] on a small thread pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iovirt_backend::{open_async, open_image, AsyncEngine, BlockBackend, OpenError, ThreadPool};
use iovirt_bus::pci::{BarEvent, BarObserver, PciAddress, PciError, PciRoot};
use iovirt_bus::{AddressSpace, Bus, BusError, InterruptLine, MsiSink};
use iovirt_iommu::RequesterId;
use iovirt_legacy::chipset::Piix3;
use iovirt_legacy::ide::{Ide, IdeError, Slot, IDE_ADDRESS};
use iovirt_sched::{
    ClientId, ClientParams, MonotonicClock, SharedScheduler, StageConfig, TimerHandle,
};
use iovirt_virtio::block::{BlockConfig, BlockDeviceError, CoalesceParams, VirtioBlock};
use iovirt_virtio::pci::{VirtioPciDevice, VirtioPciError, VIRTIO_BAR};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{GuestMemory, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{DiskConfig, DiskInterface};
use crate::iommu::IommuWiring;
use crate::irq::{LevelMux, PirqLine};
use crate::vm::KvmIrqLine;

/// PCI slot of the first virtio-blk function.
pub const FIRST_VIRTIO_SLOT: u8 = 4;
/// Last usable slot on bus 0.
const LAST_SLOT: u8 = 31;

/// Errors attaching disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("disk {path}: {err}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        err: OpenError,
    },
    /// Scheduling options were refused.
    #[error("disk {path}: {err}")]
    Sched {
        /// The image.
        path: PathBuf,
        /// Why.
        err: iovirt_sched::SchedError,
    },
    /// The scheduler's timer thread could not start.
    #[error("cannot start the I/O scheduler's timer thread: {0}")]
    SchedTimer(std::io::Error),
    /// The filter stack could not be validated or built.
    #[error("disk stack {path}: {err}")]
    Stack {
        /// The stack description.
        path: PathBuf,
        /// Why.
        err: iovirt_filter::stack::StackError,
    },
    /// virtio-blk refused its configuration.
    #[error("virtio-blk for {path}: {err}")]
    Block {
        /// The image.
        path: PathBuf,
        /// Why.
        err: BlockDeviceError,
    },
    /// The virtio-pci transport could not be built.
    #[error("virtio-blk-pci for {path}: {err}")]
    Transport {
        /// The image.
        path: PathBuf,
        /// Why.
        err: VirtioPciError,
    },
    /// The PCI root refused a function.
    #[error("PCI: {0}")]
    Pci(#[from] PciError),
    /// The IDE controller refused a drive.
    #[error("IDE: {0}")]
    Ide(#[from] IdeError),
    /// The IDE ports could not be registered.
    #[error("IDE ports: {0}")]
    Bus(#[from] BusError),
    /// More disks than places for them.
    #[error("too many {0} disks: {1}")]
    TooMany(&'static str, &'static str),
}

/// Counters of the ioeventfd machinery, for the trap-stats file.
pub static IOEVENTFDS_REGISTERED: AtomicU64 = AtomicU64::new(0);

/// A function's queue notification events: (offset in BAR0, event).
type NotifyEvents = Vec<(u64, Arc<EventFd>)>;

/// Keeps every virtio queue's notification event registered as a KVM
/// ioeventfd at its function's current BAR0 address.
pub struct IoEventFds {
    vm: Arc<VmFd>,
    enabled: bool,
    functions: Mutex<HashMap<PciAddress, NotifyEvents>>,
}

impl IoEventFds {
    /// A registry for `vm`; with `enabled` false nothing is registered
    /// (notifications then trap and the transport signals the events).
    pub fn new(vm: Arc<VmFd>, enabled: bool) -> Self {
        IoEventFds {
            vm,
            enabled,
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// Watch `function`'s BAR0 for `events` (offset in the BAR, event).
    pub fn add(&self, function: PciAddress, events: NotifyEvents) {
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(function, events);
    }
}

fn ioevent_address(space: AddressSpace, addr: u64) -> IoEventAddress {
    match space {
        AddressSpace::Pio => IoEventAddress::Pio(addr),
        AddressSpace::Mmio => IoEventAddress::Mmio(addr),
    }
}

impl BarObserver for IoEventFds {
    fn bar_moved(&self, event: &BarEvent) {
        if !self.enabled || event.bar != VIRTIO_BAR {
            return;
        }
        let functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(events) = functions.get(&event.function) else {
            return;
        };
        for (offset, fd) in events {
            if let Some(old) = event.old.and_then(|b| b.checked_add(*offset)) {
                let a = ioevent_address(event.space, old);
                match self.vm.unregister_ioevent(fd, &a, NoDatamatch) {
                    Ok(()) => {
                        IOEVENTFDS_REGISTERED.fetch_sub(1, Ordering::Relaxed);
                    }
                    Err(e) => log::debug!("{}: ioeventfd at {old:#x}: {e}", event.function),
                }
            }
            if let Some(new) = event.new.and_then(|b| b.checked_add(*offset)) {
                let a = ioevent_address(event.space, new);
                match self.vm.register_ioevent(fd, &a, NoDatamatch) {
                    Ok(()) => {
                        IOEVENTFDS_REGISTERED.fetch_add(1, Ordering::Relaxed);
                        log::debug!("{}: queue notify ioeventfd at {new:#x}", event.function);
                    }
                    // The write then traps and the transport signals the event itself.
                    Err(e) => log::warn!(
                        "{}: cannot register an ioeventfd at {new:#x} ({e}); notifications will trap",
                        event.function
                    ),
                }
            }
        }
    }
}

/// What disk wiring needs from the rest of the VMM.
pub struct DiskWiring<'a> {
    /// The VM.
    pub vm: &'a Arc<VmFd>,
    /// Guest RAM (virtio rings and DMA).
    pub ram: &'a GuestMemoryMmap,
    /// The PIO bus (IDE ports).
    pub pio: &'a Arc<Bus>,
    /// The PCI root.
    pub pci: &'a Arc<PciRoot>,
    /// The PIIX3 (PIRQ routes).
    pub piix3: &'a Arc<Mutex<Piix3>>,
    /// Where MSI-X messages go.
    pub msi: Arc<dyn MsiSink>,
    /// Register ioeventfds for queue notifications.
    pub ioeventfd: bool,
    /// The IOMMU every disk's DMA goes through (`--iommu`), if any.
    pub iommu: Option<&'a Arc<IommuWiring>>,
}

/// Disks as wired (handles kept for the VM's lifetime).
pub struct Disks {
    /// The IDE controller, when wired.
    pub ide: Option<Ide>,
    /// The shared scheduling stage, when any disk has scheduling options.
    pub sched: Option<Scheduled>,
    /// Every `--disk`, in command-line order (the control socket's disk index).
    pub list: Vec<DiskEntry>,
}

/// One `--disk` as wired: what the control socket can reach of it.
pub struct DiskEntry {
    /// The image, or the stack description.
    pub path: PathBuf,
    /// The controller it hangs off.
    pub interface: DiskInterface,
    /// The filter stack with its control handles, for `stack=` disks.
    pub stack: Option<iovirt_filter::stack::Stack>,
    /// Its client in the shared scheduling stage, when there is one.
    pub client: Option<ClientId>,
}

/// The shared scheduling stage, its timer thread and its clients.
pub struct Scheduled {
    sched: Arc<SharedScheduler>,
    _timer: TimerHandle,
    clients: Mutex<Vec<(PathBuf, ClientId)>>,
}

impl Scheduled {
    /// The stage (run-time parameters and statistics).
    pub fn scheduler(&self) -> &Arc<SharedScheduler> {
        &self.sched
    }

    /// Log each disk's scheduling statistics (at exit).
    pub fn log_stats(&self) {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for (path, id) in clients.iter() {
            if let Ok(st) = self.sched.stats(*id) {
                log::info!(
                    "{}: {} requests ({} in the reservation phase), {} errors, p50 {} us, p99 {} us",
                    path.display(),
                    st.completed,
                    st.reservation_dispatches,
                    st.errors,
                    st.latency.percentile(0.5).unwrap_or(0) / 1000,
                    st.latency.percentile(0.99).unwrap_or(0) / 1000
                );
            }
        }
    }
}

/// One mClock stage shared by every disk when any `--disk` has `reservation=`,
/// `limit=` or `weight=`; disks without options get weight 1.
struct Scheduling(Option<Scheduled>);

impl Scheduling {
    fn new(disks: &[DiskConfig]) -> Result<Self, DiskError> {
        if disks.iter().all(|d| d.sched.is_none()) {
            return Ok(Scheduling(None));
        }
        let sched = Arc::new(SharedScheduler::new(
            StageConfig::default(),
            Arc::new(MonotonicClock::default()),
        ));
        let timer = sched.spawn_timer().map_err(DiskError::SchedTimer)?;
        Ok(Scheduling(Some(Scheduled {
            sched,
            _timer: timer,
            clients: Mutex::new(Vec::new()),
        })))
    }

    /// `backend`, behind the stage when there is one (with its client id).
    fn wrap(
        &self,
        d: &DiskConfig,
        backend: Arc<dyn BlockBackend>,
    ) -> Result<(Arc<dyn BlockBackend>, Option<ClientId>), DiskError> {
        let Some(scheduled) = &self.0 else {
            return Ok((backend, None));
        };
        let params = match &d.sched {
            Some(s) => s.parse::<ClientParams>().map_err(|err| DiskError::Sched {
                path: d.path.clone(),
                err,
            })?,
            None => ClientParams::default(),
        };
        log::info!(
            "{}: scheduled with reservation {} IOPS, limit {}, weight {}",
            d.path.display(),
            params.reservation,
            params
                .limit
                .map_or("none".to_string(), |l| format!("{l} IOPS")),
            params.weight
        );
        let stage = scheduled.sched.add_client(params, backend);
        let client = stage.client();
        scheduled
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((d.path.clone(), client));
        Ok((Arc::new(stage), Some(client)))
    }
}

/// Open `d` (its stack kept for run-time control), put it behind the
/// scheduling stage when there is one, and record it in `list`.
fn open_disk(
    d: &DiskConfig,
    scheduling: &Scheduling,
    list: &mut Vec<DiskEntry>,
) -> Result<Arc<dyn BlockBackend>, DiskError> {
    let (backend, stack) = if d.stack {
        let stack = iovirt_filter::stack::StackSpec::from_file(&d.path)
            .and_then(|spec| spec.build_stack())
            .map_err(|err| DiskError::Stack {
                path: d.path.clone(),
                err,
            })?;
        (stack.backend.clone(), Some(stack))
    } else {
        let backend =
            open_async(&d.path, d.cache, d.readonly, AsyncEngine::Auto).map_err(|err| {
                DiskError::Open {
                    path: d.path.clone(),
                    err,
                }
            })?;
        (backend, None)
    };
    let (backend, client) = scheduling.wrap(d, backend)?;
    list.push(DiskEntry {
        path: d.path.clone(),
        interface: d.interface,
        stack,
        client,
    });
    Ok(backend)
}

/// Why [`add_virtio_blk`] failed: the transport (the caller names the disk) or the PCI root.
enum AddError {
    Transport(VirtioPciError),
    Pci(PciError),
}

impl AddError {
    fn or(self, transport: impl FnOnce(VirtioPciError) -> DiskError) -> DiskError {
        match self {
            AddError::Transport(e) => transport(e),
            AddError::Pci(e) => DiskError::Pci(e),
        }
    }
}

/// Put `blk` on the PCI root at `addr` as virtio-blk-pci with DMA through `mem`.
fn add_virtio_blk<M: GuestMemory + Send + Sync + 'static>(
    w: &DiskWiring<'_>,
    ioeventfds: &IoEventFds,
    addr: PciAddress,
    blk: VirtioBlock,
    mem: M,
    intx: Arc<dyn InterruptLine>,
) -> Result<(), AddError>
where
    VirtioBlock: iovirt_virtio::VirtioDevice<M>,
{
    let dev = VirtioPciDevice::new(
        Box::new(blk),
        GuestMemoryAtomic::new(mem),
        w.msi.clone(),
        Some(intx),
    )
    .map_err(AddError::Transport)?;
    ioeventfds.add(addr, dev.ioeventfds());
    w.pci.add_function(addr, dev).map_err(AddError::Pci)?;
    Ok(())
}

/// Attach every `--disk` and the `--cdrom`.
pub fn attach(
    w: &DiskWiring<'_>,
    disks: &[DiskConfig],
    cdrom: Option<&Path>,
) -> Result<Disks, DiskError> {
    let ioeventfds = Arc::new(IoEventFds::new(w.vm.clone(), w.ioeventfd));
    w.pci.set_bar_observer(ioeventfds.clone());
    let mux = Arc::new(LevelMux::new(w.vm.clone()));
    let scheduling = Scheduling::new(disks)?;
    // Opened in command-line order, so a disk's index is its place on the command line.
    let mut list = Vec::new();
    let mut backends = Vec::new();
    for d in disks {
        backends.push(open_disk(d, &scheduling, &mut list)?);
    }
    let opened = |i: usize| backends[i].clone();

    // virtio-blk-pci, 00:04.0 upward.
    let virtio = disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.interface == DiskInterface::Virtio);
    for (slot, (i, d)) in (FIRST_VIRTIO_SLOT..).zip(virtio) {
        if slot > LAST_SLOT {
            return Err(DiskError::TooMany("virtio", "PCI slots 4..=31 are full"));
        }
        let backend = opened(i);
        let cfg = BlockConfig {
            serial: d.serial.clone().unwrap_or_default().into_bytes(),
            coalescing: d.coalesce.then(CoalesceParams::default),
            ..Default::default()
        };
        let blk = VirtioBlock::new(backend, cfg).map_err(|err| DiskError::Block {
            path: d.path.clone(),
            err,
        })?;
        let intx: Arc<dyn InterruptLine> =
            Arc::new(PirqLine::new(mux.clone(), w.piix3.clone(), slot, 1));
        let addr = PciAddress::new(0, slot, 0)?;
        // Rings and buffers through the IOMMU, by requester ID, when there is one.
        let transport = |err| DiskError::Transport {
            path: d.path.clone(),
            err,
        };
        match w.iommu {
            Some(iommu) => {
                let view = iommu.view(w.ram, RequesterId::new(0, slot, 0));
                add_virtio_blk(w, &ioeventfds, addr, blk, view, intx)
                    .map_err(|e| e.or(transport))?
            }
            None => add_virtio_blk(w, &ioeventfds, addr, blk, w.ram.clone(), intx)
                .map_err(|e| e.or(transport))?,
        }
        log::info!(
            "virtio-blk-pci at {addr}: {} (cache={}{})",
            d.path.display(),
            d.cache,
            if d.readonly { ", read-only" } else { "" }
        );
    }

    // PIIX3 IDE at 00:01.1: ATA disks on the primary channel, the CD-ROM on the secondary master.
    let ide_disks: Vec<(usize, &DiskConfig)> = disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.interface == DiskInterface::Ide)
        .collect();
    if ide_disks.len() > 2 {
        return Err(DiskError::TooMany(
            "IDE",
            "the primary channel holds a master and a slave",
        ));
    }
    let ide = if ide_disks.is_empty() && cdrom.is_none() {
        None
    } else {
        let line =
            |gsi: u32| -> Arc<dyn InterruptLine> { Arc::new(KvmIrqLine::new(w.vm.clone(), gsi)) };
        // Bus-master DMA through the IOMMU as 00:01.1 when there is one.
        let ide = match w.iommu {
            Some(iommu) => Ide::new(
                Arc::new(iommu.view(w.ram, RequesterId::new(0, 1, 1))),
                line(14),
                line(15),
            ),
            None => Ide::new(Arc::new(w.ram.clone()), line(14), line(15)),
        };
        for ((i, d), slot) in ide_disks
            .iter()
            .zip([Slot::PRIMARY_MASTER, Slot::PRIMARY_SLAVE])
        {
            ide.attach_disk(slot, opened(*i))?;
            log::info!("IDE {slot}: {}", d.path.display());
        }
        if let Some(iso) = cdrom {
            let raw = open_image(iso).map_err(|err| DiskError::Open {
                path: iso.to_path_buf(),
                err,
            })?;
            let disc = ThreadPool::new(raw, 2, "cdrom").map_err(|e| DiskError::Open {
                path: iso.to_path_buf(),
                err: OpenError::Engine {
                    engine: "thread-pool",
                    source: e,
                },
            })?;
            ide.attach_cdrom(Slot::SECONDARY_MASTER, Some(Arc::new(disc)))?;
            log::info!("IDE {}: CD-ROM {}", Slot::SECONDARY_MASTER, iso.display());
        }
        ide.register_ports(w.pio)?;
        w.pci.add_function(IDE_ADDRESS, ide.pci_function())?;
        Some(ide)
    };
    Ok(Disks {
        ide,
        sched: scheduling.0,
        list,
    })
}
