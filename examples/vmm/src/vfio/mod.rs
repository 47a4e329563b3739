//! VFIO pass-through: a host PCI function bound to `vfio-pci` shown to the guest
//! as one of its own (`--device vfio=SYSFS_PATH`).
//!
//! [`VfioPciDevice`] is the PCI function model. It knows neither KVM nor the VFIO
//! ioctls: it talks to the host device through [`VfioOps`] (region info, region
//! read/write, interrupt eventfds, DMA map/unmap) and asks for interrupt delivery
//! through [`IrqRoutes`]. [`host::HostVfio`] implements [`VfioOps`] with the
//! `vfio-ioctls` crate (container + group + device, the KVM VFIO pseudo-device);
//! [`crate::irq::KvmVfioRoutes`] implements [`IrqRoutes`] with KVM irqfds. The
//! tests drive the model against a test double.
//!
//! What the guest sees:
//!
//! - **Configuration space**: forwarded to the device's config region, except
//!   what the VMM must own: the BAR registers and expansion ROM (emulated: the
//!   guest sizes and places BARs in our [`ConfigSpace`], the PCI root moves the
//!   bus registrations; the host BARs never change), the MSI capability
//!   (shadowed; one vector), and the MSI-X capability's enable and function-mask
//!   bits (shadowed; the rest is the device's). The command register goes to both.
//! - **BARs**: every access traps and is forwarded with a region read/write at the
//!   same offset, except the MSI-X table, which is emulated (vfio-pci refuses writes
//!   to it). Mapping BARs straight into the guest (region mmap + a KVM memory slot)
//!   is not done: correct, but each register access costs an exit.
//! - **Interrupts**: MSI-X and MSI vectors each get an eventfd the host device
//!   signals; while a vector is enabled and unmasked its (address, data) is routed
//!   to it ([`IrqRoutes::set_msi_route`]; under KVM a GSI route plus irqfd, so
//!   no exit or thread runs per interrupt); a masked vector has no route. INTx
//!   gets a trigger and a resample eventfd ([`IrqRoutes::route_intx`]) the first
//!   time the guest enables memory, I/O or bus mastering, after firmware has
//!   programmed the PIRQ routes. VFIO's INTx is off while MSI or MSI-X is on
//!   (vfio-pci refuses them otherwise) and back on when both are off.
//! - **DMA**: at attach every guest RAM region is mapped into the device's IOMMU
//!   container at IOVA = guest-physical address. A vIOMMU's mappings are not
//!   followed: the VMM refuses `--iommu` together with a VFIO device.

pub mod host;
#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;

use iovirt_bus::pci::{
    BarSpec, ClassCode, ConfigSpace, PciError, PciFunction, PciIdentity, BAR0,
    CAPABILITIES_POINTER, COMMAND, COMMAND_BUS_MASTER, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
    EXPANSION_ROM, MSIX_CAPABILITY_ID, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK,
    MSIX_ENTRY_SIZE, MSIX_VECTOR_MASKED,
};
use iovirt_bus::MsiMessage;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// VFIO region index of BAR 0 (BARs are 0..=5; 6 is the expansion ROM, not shown).
pub const BAR0_REGION: u32 = 0;
/// VFIO region index of the configuration space.
pub const CONFIG_REGION: u32 = 7;
/// VFIO interrupt index of INTx.
pub const IRQ_INTX: u32 = 0;
/// VFIO interrupt index of MSI.
pub const IRQ_MSI: u32 = 1;
/// VFIO interrupt index of MSI-X.
pub const IRQ_MSIX: u32 = 2;

/// Bytes of standard configuration space forwarded (extended space is not shown).
const CONFIG_SIZE: u16 = 256;
/// Command bits that turn on I/O, memory and bus-master decoding.
const COMMAND_DECODE: u16 = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER;
/// End of the six BAR registers.
const BAR_END: u16 = BAR0 + 6 * 4;
/// The MSI capability's ID (the model intercepts it, and MSI-X).
const CAP_ID_MSI: u8 = 0x05;
/// MSI control bits: enable, 64-bit address capable, per-vector masking capable.
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u16 = 1 << 7;
const MSI_PVM: u16 = 1 << 8;

/// Why a host device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A VFIO operation failed.
    #[error("{what}: {err}")]
    Host {
        /// Which step.
        what: String,
        /// The error.
        err: io::Error,
    },
    /// The device's configuration space is unusable.
    #[error("configuration space: {0}")]
    Config(String),
    /// Our emulated configuration space refused a BAR.
    #[error("BAR: {0}")]
    Bar(#[from] PciError),
}

fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> VfioError {
    let what = what.into();
    move |err| VfioError::Host { what, err }
}

/// What a VFIO region offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Readable with [`VfioOps::region_read`].
    pub read: bool,
    /// Writable with [`VfioOps::region_write`].
    pub write: bool,
    /// Can be mmapped (a fast path the model does not use yet).
    pub mmap: bool,
}

/// The VFIO operations the pass-through model needs from the host.
pub trait VfioOps: Send + Sync {
    /// Region `index` (BARs 0-5, ROM 6, config 7), if the device has it.
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Read `data.len()` bytes of region `index` at `offset`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Write `data` to region `index` at `offset`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// How many vectors interrupt `index` (INTx 0, MSI 1, MSI-X 2) has.
    fn irq_count(&self, index: u32) -> u32;
    /// Signal `fds[i]` when vector `i` of interrupt `index` fires (enables it).
    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    /// Stop interrupt `index`.
    fn disable_irqs(&self, index: u32) -> io::Result<()>;
    /// Unmask INTx when `fd` is signalled (the guest's EOI).
    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()>;
    /// Let the device DMA to `size` bytes of host memory at `host_addr` as `iova`.
    /// The caller keeps that memory mapped until [`VfioOps::dma_unmap`].
    fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()>;
    /// Undo a [`VfioOps::dma_map`].
    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

/// Interrupt delivery the VMM provides for pass-through vectors.
pub trait IrqRoutes: Send + Sync {
    /// Deliver signals of `fd` as MSI `msg`; `None` stops delivery (vector
    /// masked or disabled; a signal that arrives meanwhile stays pending in the
    /// eventfd and is delivered once a route is set again).
    fn set_msi_route(&self, fd: &Arc<EventFd>, msg: Option<MsiMessage>) -> io::Result<()>;
    /// Deliver signals of `trigger` as the function's INTx (level), signalling
    /// `resample` when the guest acknowledges it.
    fn route_intx(&self, trigger: &Arc<EventFd>, resample: &Arc<EventFd>) -> io::Result<()>;
}

/// One MSI-X vector's emulated table entry and eventfd.
#[derive(Debug)]
struct MsixVector {
    address: u64,
    data: u32,
    control: u32,
    fd: Arc<EventFd>,
}

/// The intercepted MSI-X capability.
#[derive(Debug)]
struct MsixCap {
    offset: u16,
    control: u16,
    table_bar: u8,
    table_offset: u64,
    vectors: Vec<MsixVector>,
}

/// The shadowed MSI capability (one vector).
#[derive(Debug)]
struct MsiCap {
    offset: u16,
    /// Capability bytes after the ID and next pointer, as the guest sees them.
    regs: [u8; 22],
    len: u16,
    fd: Arc<EventFd>,
    enabled: bool,
}

/// A host PCI function passed through to the guest (see the module docs).
pub struct VfioPciDevice<O: VfioOps> {
    ops: Arc<O>,
    routes: Arc<dyn IrqRoutes>,
    config: ConfigSpace,
    msix: Option<MsixCap>,
    msi: Option<MsiCap>,
    intx: Option<(Arc<EventFd>, Arc<EventFd>)>,
    intx_routed: bool,
    /// VFIO's INTx is enabled (vfio-pci refuses MSI or MSI-X while it is).
    intx_active: bool,
    dma: Vec<(u64, u64)>,
}

impl<O: VfioOps> std::fmt::Debug for VfioPciDevice<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("msix", &self.msix.as_ref().map(|m| m.vectors.len()))
            .field("msi", &self.msi.is_some())
            .field("dma", &self.dma)
            .finish()
    }
}

fn eventfd() -> Result<Arc<EventFd>, VfioError> {
    EventFd::new(EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(host("eventfd"))
}

impl<O: VfioOps> VfioPciDevice<O> {
    /// Attach the host device behind `ops`: map every region of `ram` for its
    /// DMA (IOVA = guest-physical address), read its configuration space and
    /// build the emulated BARs and interrupt capabilities.
    pub fn new(
        ops: Arc<O>,
        routes: Arc<dyn IrqRoutes>,
        ram: &GuestMemoryMmap,
    ) -> Result<Self, VfioError> {
        let mut cfg = [0u8; CONFIG_SIZE as usize];
        ops.region_read(CONFIG_REGION, 0, &mut cfg)
            .map_err(host("reading the configuration space"))?;
        let word = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
        if word(0) == 0xffff || word(0) == 0 {
            return Err(VfioError::Config(format!(
                "vendor ID {:#06x}: no device answers",
                word(0)
            )));
        }
        if cfg[0x0e] & 0x7f != 0 {
            return Err(VfioError::Config(format!(
                "header type {:#x}: only endpoints (type 0) can be passed through",
                cfg[0x0e]
            )));
        }
        let id = PciIdentity {
            vendor_id: word(0),
            device_id: word(2),
            class: ClassCode {
                class: cfg[0x0b],
                subclass: cfg[0x0a],
                prog_if: cfg[0x09],
            },
            revision: cfg[0x08],
            subsystem_vendor_id: word(0x2c),
            subsystem_id: word(0x2e),
            multi_function: false,
        };
        let mut config = ConfigSpace::new(&id);
        Self::add_bars(&*ops, &cfg, &mut config)?;

        let mut dev = VfioPciDevice {
            ops,
            routes,
            config,
            msix: None,
            msi: None,
            intx: None,
            intx_routed: false,
            intx_active: false,
            dma: Vec::new(),
        };
        dev.find_capabilities(&cfg)?;
        if cfg[0x3d] != 0 && dev.ops.irq_count(IRQ_INTX) > 0 {
            dev.intx = Some((eventfd()?, eventfd()?));
        }
        for region in ram.iter() {
            let (gpa, len) = (region.start_addr().raw_value(), region.len());
            let hva = ram
                .get_host_address(region.start_addr())
                .map_err(|e| VfioError::Config(format!("guest memory at {gpa:#x}: {e}")))?;
            dev.ops.dma_map(gpa, len, hva as u64).map_err(host(format!(
                "DMA map of guest memory [{gpa:#x}, +{len:#x})"
            )))?;
            dev.dma.push((gpa, len));
        }
        Ok(dev)
    }

    /// Declare in `config` a BAR for every BAR region the device has, with the
    /// kind and prefetchability of the device's own BAR register.
    fn add_bars(ops: &O, cfg: &[u8], config: &mut ConfigSpace) -> Result<(), VfioError> {
        let mut i = 0u8;
        while i < 6 {
            let reg = usize::from(BAR0) + 4 * usize::from(i);
            let raw = u32::from_le_bytes([cfg[reg], cfg[reg + 1], cfg[reg + 2], cfg[reg + 3]]);
            let size = ops
                .region_info(BAR0_REGION + u32::from(i))
                .map_or(0, |r| r.size);
            let is64 = raw & 1 == 0 && (raw >> 1) & 3 == 2;
            if size != 0 {
                let size = size.next_power_of_two().max(16);
                let spec = if raw & 1 == 1 {
                    BarSpec::io(size.max(4))
                } else if is64 {
                    BarSpec::memory64(size)
                } else {
                    BarSpec::memory32(size)
                };
                let spec = if raw & 1 == 0 && raw & 8 != 0 {
                    spec.prefetchable()
                } else {
                    spec
                };
                config.add_bar(i, spec)?;
            }
            i += if is64 { 2 } else { 1 };
        }
        Ok(())
    }

    /// Walk the device's capability list (bounded) and set up MSI and MSI-X interception.
    fn find_capabilities(&mut self, cfg: &[u8]) -> Result<(), VfioError> {
        if cfg[0x06] & 0x10 == 0 {
            return Ok(()); // no capability list
        }
        let mut p = usize::from(cfg[usize::from(CAPABILITIES_POINTER)] & 0xfc);
        for _ in 0..48 {
            if p < 0x40 || p + 4 > cfg.len() {
                break;
            }
            let (id, next) = (cfg[p], usize::from(cfg[p + 1] & 0xfc));
            let control = u16::from_le_bytes([cfg[p + 2], cfg[p + 3]]);
            let offset = p as u16;
            match id {
                MSIX_CAPABILITY_ID if p + 12 <= cfg.len() => {
                    let table =
                        u32::from_le_bytes([cfg[p + 4], cfg[p + 5], cfg[p + 6], cfg[p + 7]]);
                    let n = usize::from(control & 0x7ff) + 1;
                    let n = n.min(self.ops.irq_count(IRQ_MSIX) as usize);
                    let mut vectors = Vec::with_capacity(n);
                    for _ in 0..n {
                        vectors.push(MsixVector {
                            address: 0,
                            data: 0,
                            control: MSIX_VECTOR_MASKED,
                            fd: eventfd()?,
                        });
                    }
                    self.msix = Some(MsixCap {
                        offset,
                        control: control & !(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK),
                        table_bar: (table & 7) as u8,
                        table_offset: u64::from(table & !7),
                        vectors,
                    });
                }
                CAP_ID_MSI if self.ops.irq_count(IRQ_MSI) > 0 => {
                    let len = 10
                        + if control & MSI_64BIT != 0 { 4 } else { 0 }
                        + if control & MSI_PVM != 0 { 10 } else { 0 };
                    let mut regs = [0u8; 22];
                    // One vector: Multiple Message Capable reads as 0, disabled.
                    let shown = control & (MSI_64BIT | MSI_PVM);
                    regs[..2].copy_from_slice(&shown.to_le_bytes());
                    self.msi = Some(MsiCap {
                        offset,
                        regs,
                        len,
                        fd: eventfd()?,
                        enabled: false,
                    });
                }
                _ => {}
            }
            if next == 0 {
                break;
            }
            p = next;
        }
        Ok(())
    }

    /// Guest-physical ranges mapped for the device's DMA.
    pub fn dma_ranges(&self) -> &[(u64, u64)] {
        &self.dma
    }

    /// Where config byte `o` comes from.
    fn owner(&self, o: u16) -> Owner {
        if (BAR0..BAR_END).contains(&o) || (EXPANSION_ROM..EXPANSION_ROM + 4).contains(&o) {
            return Owner::Emulated;
        }
        if let Some(m) = &self.msi {
            if o >= m.offset + 2 && o < m.offset + m.len {
                return Owner::Msi(o - m.offset - 2);
            }
        }
        if let Some(m) = &self.msix {
            if o == m.offset + 2 || o == m.offset + 3 {
                return Owner::MsixControl(o - m.offset - 2);
            }
        }
        Owner::Device
    }

    /// The message vector 0 signals, or `None` while the guest masks it
    /// (per-vector masking: the mask bits follow the data and 2 reserved bytes).
    fn msi_message(m: &MsiCap) -> Option<MsiMessage> {
        let control = u16::from_le_bytes([m.regs[0], m.regs[1]]);
        let lo = u32::from_le_bytes([m.regs[2], m.regs[3], m.regs[4], m.regs[5]]);
        let (hi, data_at) = if control & MSI_64BIT != 0 {
            (
                u32::from_le_bytes([m.regs[6], m.regs[7], m.regs[8], m.regs[9]]),
                10,
            )
        } else {
            (0, 6)
        };
        let data = u16::from_le_bytes([m.regs[data_at], m.regs[data_at + 1]]);
        if control & MSI_PVM != 0 && m.regs[data_at + 4] & 1 != 0 {
            return None;
        }
        Some(MsiMessage {
            address: (u64::from(hi) << 32) | u64::from(lo),
            data: u32::from(data),
        })
    }

    /// Bring VFIO's MSI state and the route in line with the shadow after a write.
    fn msi_written(&mut self) {
        let Some(m) = &self.msi else { return };
        let control = u16::from_le_bytes([m.regs[0], m.regs[1]]);
        let want = control & MSI_ENABLE != 0;
        if want && !m.enabled {
            self.set_intx(false);
        }
        let Some(m) = &mut self.msi else { return };
        if want && !m.enabled {
            if let Err(e) = self.ops.enable_irqs(IRQ_MSI, &[&m.fd]) {
                log::warn!("VFIO: cannot enable MSI: {e}");
                return;
            }
            m.enabled = true;
        } else if !want && m.enabled {
            let _ = self.routes.set_msi_route(&m.fd, None);
            if let Err(e) = self.ops.disable_irqs(IRQ_MSI) {
                log::warn!("VFIO: cannot disable MSI: {e}");
            }
            m.enabled = false;
        }
        if m.enabled {
            let msg = Self::msi_message(m);
            if let Err(e) = self.routes.set_msi_route(&m.fd, msg) {
                log::warn!("VFIO: MSI route {msg:?}: {e}");
            }
        } else if !self.msi_or_msix_on() {
            self.set_intx(true);
        }
    }

    /// The route vector `v` should have now.
    fn msix_route(cap: &MsixCap, v: &MsixVector) -> Option<MsiMessage> {
        let live = cap.control & MSIX_CONTROL_ENABLE != 0
            && cap.control & MSIX_CONTROL_FUNCTION_MASK == 0
            && v.control & MSIX_VECTOR_MASKED == 0;
        live.then_some(MsiMessage {
            address: v.address,
            data: v.data,
        })
    }

    fn msix_control_written(&mut self, old: u16) {
        let Some(cap) = &self.msix else { return };
        let (was, now) = (
            old & MSIX_CONTROL_ENABLE != 0,
            cap.control & MSIX_CONTROL_ENABLE != 0,
        );
        if now && !was {
            self.set_intx(false);
        }
        let Some(cap) = &self.msix else { return };
        if now && !was {
            let fds: Vec<&EventFd> = cap.vectors.iter().map(|v| &*v.fd).collect();
            if let Err(e) = self.ops.enable_irqs(IRQ_MSIX, &fds) {
                log::warn!("VFIO: cannot enable MSI-X: {e}");
            }
        } else if was && !now {
            if let Err(e) = self.ops.disable_irqs(IRQ_MSIX) {
                log::warn!("VFIO: cannot disable MSI-X: {e}");
            }
        }
        // One line per control write, not one per vector: the guest picks how
        // often it writes, and a device may have 2048 vectors.
        let mut failed = None;
        let mut failures = 0usize;
        for v in &cap.vectors {
            if let Err(e) = self.routes.set_msi_route(&v.fd, Self::msix_route(cap, v)) {
                failures += 1;
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            log::warn!("VFIO: {failures} MSI-X route(s) not set: {e}");
        }
        if was && !now && !self.msi_or_msix_on() {
            self.set_intx(true);
        }
    }

    fn route_intx_once(&mut self) {
        if self.intx_routed || self.intx.is_none() {
            return;
        }
        if let Some((trigger, resample)) = &self.intx {
            // Not routable yet (e.g. the PIRQ is programmed after decoding is
            // turned on): tried again at the next configuration write.
            if let Err(e) = self.routes.route_intx(trigger, resample) {
                log::debug!("VFIO: INTx not routed yet: {e}");
                return;
            }
        }
        self.intx_routed = true;
        if !self.msi_or_msix_on() {
            self.set_intx(true);
        }
    }

    /// MSI or MSI-X is enabled in VFIO.
    fn msi_or_msix_on(&self) -> bool {
        self.msi.as_ref().is_some_and(|m| m.enabled)
            || self
                .msix
                .as_ref()
                .is_some_and(|m| m.control & MSIX_CONTROL_ENABLE != 0)
    }

    /// Turn VFIO's INTx on or off (it must be off while MSI or MSI-X is on,
    /// and comes back when both are off, as on real hardware).
    fn set_intx(&mut self, on: bool) {
        let Some((trigger, resample)) = &self.intx else {
            return;
        };
        if !self.intx_routed || on == self.intx_active {
            return;
        }
        let r = if on {
            self.ops
                .enable_irqs(IRQ_INTX, &[trigger])
                .and_then(|()| self.ops.set_intx_unmask_fd(resample))
        } else {
            self.ops.disable_irqs(IRQ_INTX)
        };
        match r {
            Ok(()) => self.intx_active = on,
            Err(e) => log::warn!(
                "VFIO: cannot turn INTx {}: {e}",
                if on { "on" } else { "off" }
            ),
        }
    }

    /// The MSI-X table entry `bar`/`offset` falls in: (vector, byte in entry).
    fn msix_entry(&self, bar: u8, offset: u64) -> Option<(usize, u64)> {
        let cap = self.msix.as_ref().filter(|c| c.table_bar == bar)?;
        let rel = offset.checked_sub(cap.table_offset)?;
        let v = usize::try_from(rel / MSIX_ENTRY_SIZE).ok()?;
        (v < cap.vectors.len()).then_some((v, rel % MSIX_ENTRY_SIZE))
    }
}

/// Which model part answers a config byte.
enum Owner {
    Emulated,
    Msi(u16),
    MsixControl(u16),
    Device,
}

impl<O: VfioOps + 'static> PciFunction for VfioPciDevice<O> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let mut dev = [0xffu8; 4];
        let base = offset & !3;
        if self
            .ops
            .region_read(CONFIG_REGION, u64::from(base), &mut dev)
            .is_err()
        {
            dev = [0xff; 4];
        }
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u16);
            *b = match self.owner(o) {
                Owner::Emulated => self.config.read_u8(o),
                Owner::Msi(r) => self
                    .msi
                    .as_ref()
                    .and_then(|m| m.regs.get(usize::from(r)).copied())
                    .unwrap_or(0),
                Owner::MsixControl(r) => self.msix.as_ref().map_or(0, |m| {
                    // Table size and the rest from the device, enable and mask bits ours.
                    let dev_word = u16::from_le_bytes([
                        dev[usize::from((m.offset + 2) & 3)],
                        dev[usize::from((m.offset + 3) & 3)],
                    ]);
                    let w = (dev_word & !(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK))
                        | m.control;
                    w.to_le_bytes()[usize::from(r)]
                }),
                Owner::Device => dev.get(usize::from(o - base)).copied().unwrap_or(0xff),
            };
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        // BAR and ROM registers are whole emulated dwords: one write, so a
        // 64-bit BAR's half tracking sees the access as the guest made it.
        if matches!(self.owner(offset), Owner::Emulated) {
            self.config.write(offset, data);
            return;
        }
        let mut msi_touched = false;
        let mut msix_old = None;
        let mut run: Option<(u16, Vec<u8>)> = None;
        let flush = |ops: &O, run: &mut Option<(u16, Vec<u8>)>| {
            if let Some((at, bytes)) = run.take() {
                if let Err(e) = ops.region_write(CONFIG_REGION, u64::from(at), &bytes) {
                    log::warn!("VFIO: config write at {at:#x}: {e}");
                }
            }
        };
        for (i, &b) in data.iter().enumerate() {
            let o = offset.saturating_add(i as u16);
            match self.owner(o) {
                Owner::Device => {
                    match &mut run {
                        Some((_, bytes)) => bytes.push(b),
                        None => run = Some((o, vec![b])),
                    }
                    continue;
                }
                Owner::Emulated => self.config.write(o, &[b]),
                Owner::Msi(r) => {
                    if let Some(m) = &mut self.msi {
                        // Control: only the enable bit is writable; the rest as shadowed.
                        let keep = match r {
                            0 => 0xfe,
                            1 => 0xff,
                            _ => 0,
                        };
                        if let Some(x) = m.regs.get_mut(usize::from(r)) {
                            *x = (*x & keep) | (b & !keep);
                        }
                        msi_touched = true;
                    }
                }
                Owner::MsixControl(r) => {
                    if let Some(m) = &mut self.msix {
                        msix_old.get_or_insert(m.control);
                        if r == 1 {
                            let bits = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8;
                            let hi = (m.control >> 8) as u8 & !(bits as u8) | (b & bits as u8);
                            m.control = (m.control & 0xff) | (u16::from(hi) << 8);
                        }
                    }
                }
            }
            flush(&self.ops, &mut run);
        }
        flush(&self.ops, &mut run);
        // The command register reaches the device (above) and our copy, which
        // the root's BAR decoding reads.
        let cmd = COMMAND..COMMAND + 2;
        let end = offset.saturating_add(data.len() as u16);
        if offset < cmd.end && end > cmd.start {
            self.config.write(offset, data);
            if self.config.read_u16(COMMAND) & COMMAND_DECODE != 0 {
                self.route_intx_once();
            }
        }
        if msi_touched {
            self.msi_written();
        }
        if let Some(old) = msix_old {
            self.msix_control_written(old);
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if let Some((v, at)) = self.msix_entry(bar, offset) {
            let Some(e) = self.msix.as_ref().and_then(|m| m.vectors.get(v)) else {
                data.fill(0xff);
                return;
            };
            let mut entry = [0u8; 16];
            entry[0..8].copy_from_slice(&e.address.to_le_bytes());
            entry[8..12].copy_from_slice(&e.data.to_le_bytes());
            entry[12..16].copy_from_slice(&e.control.to_le_bytes());
            for (i, b) in data.iter_mut().enumerate() {
                *b = entry.get(at as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        if let Err(e) = self
            .ops
            .region_read(BAR0_REGION + u32::from(bar), offset, data)
        {
            log::debug!("VFIO: BAR{bar} read at {offset:#x}: {e}");
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if let Some((v, at)) = self.msix_entry(bar, offset) {
            let Some(cap) = &mut self.msix else { return };
            let Some(e) = cap.vectors.get_mut(v) else {
                return;
            };
            let mut entry = [0u8; 16];
            entry[0..8].copy_from_slice(&e.address.to_le_bytes());
            entry[8..12].copy_from_slice(&e.data.to_le_bytes());
            entry[12..16].copy_from_slice(&e.control.to_le_bytes());
            for (i, b) in data.iter().enumerate() {
                if let Some(x) = entry.get_mut(at as usize + i) {
                    *x = *b;
                }
            }
            let w = |r: std::ops::Range<usize>| {
                let mut a = [0u8; 8];
                a[..r.len()].copy_from_slice(&entry[r]);
                u64::from_le_bytes(a)
            };
            e.address = w(0..8);
            e.data = w(8..12) as u32;
            e.control = w(12..16) as u32;
            let Some(e) = cap.vectors.get(v) else { return };
            if let Err(err) = self.routes.set_msi_route(&e.fd, Self::msix_route(cap, e)) {
                log::warn!("VFIO: MSI-X vector {v} route: {err}");
            }
            return;
        }
        if let Err(e) = self
            .ops
            .region_write(BAR0_REGION + u32::from(bar), offset, data)
        {
            log::debug!("VFIO: BAR{bar} write at {offset:#x}: {e}");
        }
    }
}

impl<O: VfioOps> Drop for VfioPciDevice<O> {
    fn drop(&mut self) {
        for &(iova, size) in &self.dma {
            let _ = self.ops.dma_unmap(iova, size);
        }
    }
}
