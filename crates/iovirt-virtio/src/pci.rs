//! The virtio-pci modern transport (virtio 1.2, section 4.1).
//!
//! One 32-bit memory BAR ([`VIRTIO_BAR`]) holds every structure:
//!
//! | offset   | structure |
//! |----------|-----------|
//! | `0x0000` | common configuration ([`COMMON_CFG_OFFSET`]) |
//! | `0x1000` | ISR status ([`ISR_OFFSET`]) |
//! | `0x2000` | device-specific configuration ([`DEVICE_CFG_OFFSET`]) |
//! | `0x3000` | notifications, queue `n` at `0x3000 + 4 n` ([`NOTIFY_OFFSET`]) |
//! | `0x4000` | MSI-X vector table ([`MSIX_TABLE_OFFSET`]) |
//! | `0x6000` | MSI-X pending bits ([`MSIX_PBA_OFFSET`]) |
//!
//! The vendor-specific capabilities that point at them (common, notify, ISR,
//! device, PCI-config access) are in config space after the MSI-X capability.
//! MSI-X has one vector per queue plus one for configuration changes; without
//! MSI-X the device raises INTA# and reports the cause in the ISR.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use iovirt_bus::pci::{
    BarSpec, ClassCode, ConfigSpace, Msix, MsixLocation, PciError, PciFunction, PciIdentity,
};
use iovirt_bus::{InterruptError, InterruptLine, MsiSink};
use vm_memory::{GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{VirtioDevice, VirtioInterrupt};
use crate::transport::{set_half, Common, StatusChange, NO_VECTOR};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR that holds every virtio structure and the MSI-X table.
pub const VIRTIO_BAR: u8 = 0;
/// Size of [`VIRTIO_BAR`].
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure in the BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure.
pub const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte in the BAR.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in the BAR.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device-specific configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in the BAR.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses (the capability's notify_off_multiplier).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Length of the notification area (room for 1024 queues).
pub const NOTIFY_LEN: u64 = 0x1000;
/// Offset of the MSI-X vector table in the BAR.
pub const MSIX_TABLE_OFFSET: u32 = 0x4000;
/// Offset of the MSI-X pending-bit array in the BAR.
pub const MSIX_PBA_OFFSET: u32 = 0x6000;

/// Capability ID of vendor-specific capabilities (the virtio ones).
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// cfg_type of the common configuration capability.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// cfg_type of the notification capability.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// cfg_type of the ISR capability.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// cfg_type of the device-specific configuration capability.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// cfg_type of the PCI configuration access capability.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// ISR bit 0: a queue has new used buffers.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit 1: the configuration changed.
pub const ISR_CONFIG: u8 = 2;

// Common configuration registers (offsets in the structure).
/// Which 32 device feature bits `DEVICE_FEATURE` shows (le32, RW).
pub const COMMON_DFSELECT: u64 = 0x00;
/// 32 device feature bits (le32, RO).
pub const COMMON_DF: u64 = 0x04;
/// Which 32 driver feature bits `DRIVER_FEATURE` shows (le32, RW).
pub const COMMON_GFSELECT: u64 = 0x08;
/// 32 driver feature bits (le32, RW).
pub const COMMON_GF: u64 = 0x0c;
/// MSI-X vector for configuration changes (le16, RW).
pub const COMMON_MSIX: u64 = 0x10;
/// Number of queues (le16, RO).
pub const COMMON_NUMQ: u64 = 0x12;
/// Device status (u8, RW; 0 resets).
pub const COMMON_STATUS: u64 = 0x14;
/// Configuration generation (u8, RO).
pub const COMMON_CFGGENERATION: u64 = 0x15;
/// Queue selector (le16, RW).
pub const COMMON_Q_SELECT: u64 = 0x16;
/// Selected queue's size (le16, RW; reads the maximum after reset).
pub const COMMON_Q_SIZE: u64 = 0x18;
/// Selected queue's MSI-X vector (le16, RW).
pub const COMMON_Q_MSIX: u64 = 0x1a;
/// Selected queue's enable (le16, RW).
pub const COMMON_Q_ENABLE: u64 = 0x1c;
/// Selected queue's notify offset in multiples of the multiplier (le16, RO).
pub const COMMON_Q_NOFF: u64 = 0x1e;
/// Selected queue's descriptor table address (le64, RW).
pub const COMMON_Q_DESC: u64 = 0x20;
/// Selected queue's driver (available) ring address (le64, RW).
pub const COMMON_Q_AVAIL: u64 = 0x28;
/// Selected queue's device (used) ring address (le64, RW).
pub const COMMON_Q_USED: u64 = 0x30;

/// Interrupt state shared between the transport (vCPU threads) and the
/// device's workers: MSI-X, the vectors the driver chose, the ISR and INTx.
struct PciInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    intx: Option<Arc<dyn InterruptLine>>,
    intx_asserted: AtomicBool,
}

impl PciInterrupt {
    fn raise(&self, vector: u16, isr_bit: u8) -> Result<(), InterruptError> {
        let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if msix.is_enabled() {
            if vector == NO_VECTOR {
                return Ok(());
            }
            return msix.notify(vector).map(|_| ());
        }
        drop(msix);
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if let Some(line) = &self.intx {
            if !self.intx_asserted.swap(true, Ordering::SeqCst) {
                line.set_level(true)?;
            }
        }
        Ok(())
    }

    /// The driver read the ISR: return and clear it, deassert INTx.
    fn read_isr(&self) -> u8 {
        let v = self.isr.swap(0, Ordering::SeqCst);
        if let Some(line) = &self.intx {
            if self.intx_asserted.swap(false, Ordering::SeqCst) {
                if let Err(e) = line.set_level(false) {
                    log::warn!("virtio-pci: deasserting INTx failed: {e}");
                }
            }
        }
        v
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_used_queue(&self, queue_index: u16) -> Result<(), InterruptError> {
        let v = self
            .queue_vectors
            .get(usize::from(queue_index))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire));
        self.raise(v, ISR_QUEUE)
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        self.raise(self.config_vector.load(Ordering::Acquire), ISR_CONFIG)
    }
}

/// A virtio device behind the modern PCI transport.
///
/// Put it on a `PciRoot` with `root.add(address, Box::new(dev))` (or however
/// the root takes functions); give the VMM [`Self::ioeventfds`] to register at
/// `BAR0 + offset` as ioeventfds whenever the BAR moves, and an [`MsiSink`]
/// that routes MSI-X messages (the VMM may map each vector to an irqfd).
///
/// ```
/// use std::sync::Arc;
/// use iovirt_backend::{Inline, NullBackend};
/// use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
/// use iovirt_bus::pci::PciFunction;
/// use iovirt_virtio::block::{BlockConfig, VirtioBlock};
/// use iovirt_virtio::pci::{VirtioPciDevice, NOTIFY_OFFSET};
/// use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
///
/// let mem = GuestMemoryAtomic::new(
///     GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
/// );
/// let disk = Arc::new(Inline(NullBackend::new(1 << 30, true)));
/// let blk = VirtioBlock::new(disk, BlockConfig { num_queues: 2, ..Default::default() }).unwrap();
/// let dev = VirtioPciDevice::new(Box::new(blk), mem, Arc::new(RecordingMsiSink::new()), None).unwrap();
/// assert_eq!(dev.config().read_u16(2), 0x1042);
/// let fds = dev.ioeventfds();
/// assert_eq!(fds.len(), 2);
/// assert_eq!(fds[1].0, NOTIFY_OFFSET + 4);
/// ```
pub struct VirtioPciDevice<M: GuestMemory> {
    config: ConfigSpace,
    common: Common<M>,
    interrupt: Arc<PciInterrupt>,
    dyn_interrupt: Arc<dyn VirtioInterrupt>,
    pci_cfg_cap: u16,
}

/// Why a virtio PCI function could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The PCI configuration (BAR, capabilities, MSI-X) could not be built.
    #[error("PCI setup failed: {0}")]
    Pci(#[from] PciError),
    /// The per-queue notification events could not be created.
    #[error("could not create queue notification events: {0}")]
    Io(#[from] std::io::Error),
    /// The device has more queues than the transport can serve.
    #[error("device has {0} queues; the PCI transport serves 1..=1024")]
    TooManyQueues(usize),
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // Body after the ID and next bytes: cap_len, cfg_type, bar, id, padding[2], offset, length.
    let cap_len = 16 + extra.len() as u8;
    let mut body = vec![cap_len, cfg_type, VIRTIO_BAR, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl<M: GuestMemory + Send + Sync + 'static> VirtioPciDevice<M> {
    /// Wrap `device` in the modern PCI transport. MSI-X messages go to `msi`;
    /// `intx`, when given, is INTA# after routing (the fallback without MSI-X).
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: GuestMemoryAtomic<M>,
        msi: Arc<dyn MsiSink>,
        intx: Option<Arc<dyn InterruptLine>>,
    ) -> Result<Self, VirtioPciError> {
        let common = Common::new(device, mem)?;
        let nq = common.queues.len();
        if nq == 0 || nq as u64 * u64::from(NOTIFY_OFF_MULTIPLIER) > NOTIFY_LEN {
            return Err(VirtioPciError::TooManyQueues(nq));
        }
        let dtype = common.device.device_type();
        let class = match dtype {
            1 => ClassCode {
                class: 0x02,
                subclass: 0x00,
                prog_if: 0,
            },
            2 => ClassCode {
                class: 0x01,
                subclass: 0x80,
                prog_if: 0,
            },
            _ => ClassCode {
                class: 0xff,
                subclass: 0x00,
                prog_if: 0,
            },
        };
        let id = PciIdentity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(dtype as u16),
            class,
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
            multi_function: false,
        };
        let mut config = ConfigSpace::new(&id);
        config.add_bar(VIRTIO_BAR, BarSpec::memory32(VIRTIO_BAR_SIZE))?;
        if intx.is_some() {
            config.set_interrupt_pin(1)?;
        }
        let vectors = u16::try_from(nq + 1).map_err(|_| VirtioPciError::TooManyQueues(nq))?;
        let mut msix = Msix::new(
            vectors,
            MsixLocation {
                bar: VIRTIO_BAR,
                offset: MSIX_TABLE_OFFSET,
            },
            MsixLocation {
                bar: VIRTIO_BAR,
                offset: MSIX_PBA_OFFSET,
            },
            msi,
        )?;
        msix.add_capability(&mut config)?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_LEN,
                &[],
            ),
            &[],
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                nq as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            &[],
        )?;
        config.add_capability(
            PCI_CAP_ID_VNDR,
            &virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_LEN,
                &[],
            ),
            &[],
        )?;
        // PCI configuration access: bar, offset, length and data are writable.
        let body = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut writable = vec![0u8; body.len()];
        writable[2] = 0xff;
        for b in &mut writable[6..18] {
            *b = 0xff;
        }
        let pci_cfg_cap = u16::from(config.add_capability(PCI_CAP_ID_VNDR, &body, &writable)?);
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(msix)),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..nq).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            intx,
            intx_asserted: AtomicBool::new(false),
        });
        Ok(VirtioPciDevice {
            config,
            common,
            dyn_interrupt: interrupt.clone(),
            interrupt,
            pci_cfg_cap,
        })
    }
}

impl<M: GuestMemory> VirtioPciDevice<M> {
    /// Offset in [`VIRTIO_BAR`] of queue `index`'s notify register.
    pub fn notify_offset(&self, index: u16) -> Option<u64> {
        (usize::from(index) < self.common.queues.len())
            .then(|| NOTIFY_OFFSET + u64::from(index) * u64::from(NOTIFY_OFF_MULTIPLIER))
    }

    /// Each queue's notify register (offset in [`VIRTIO_BAR`]) and its event:
    /// a VMM registers the event as an ioeventfd at `BAR base + offset`
    /// (any length, no data match) and re-registers it when the BAR moves.
    pub fn ioeventfds(&self) -> Vec<(u64, Arc<EventFd>)> {
        self.common
            .notify
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    e.clone(),
                )
            })
            .collect()
    }

    /// The MSI-X state, shared with the device's workers; a VMM that maps
    /// vectors to irqfds reads the programmed messages from it.
    pub fn msix(&self) -> Arc<Mutex<Msix>> {
        self.interrupt.msix.clone()
    }

    /// The MSI-X vector the driver assigned to queue `index` ([`NO_VECTOR`] if none).
    pub fn queue_vector(&self, index: u16) -> u16 {
        self.common
            .queues
            .get(usize::from(index))
            .map_or(NO_VECTOR, |q| q.vector)
    }

    /// The MSI-X vector for configuration changes ([`NO_VECTOR`] if none).
    pub fn config_vector(&self) -> u16 {
        self.common.config_vector
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    /// The features the driver acked.
    pub fn acked_features(&self) -> u64 {
        self.common.driver_features
    }

    /// Reset the device, as a write of 0 to the status register does.
    pub fn reset(&mut self) {
        self.common.reset();
        self.after_reset();
    }

    fn after_reset(&mut self) {
        self.interrupt.read_isr();
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let c = &self.common;
        let q = c.selected();
        let v: u64 = match offset {
            COMMON_DFSELECT => u64::from(c.device_feature_select),
            COMMON_DF => u64::from(c.device_features_window()),
            COMMON_GFSELECT => u64::from(c.driver_feature_select),
            COMMON_GF => u64::from(c.driver_features_window()),
            COMMON_MSIX => u64::from(c.config_vector),
            COMMON_NUMQ => u64::from(c.num_queues()),
            COMMON_STATUS => u64::from(c.status),
            COMMON_CFGGENERATION => u64::from(c.config_generation),
            COMMON_Q_SELECT => u64::from(c.queue_select),
            COMMON_Q_SIZE => q.map_or(0, |q| u64::from(q.size)),
            COMMON_Q_MSIX => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            COMMON_Q_ENABLE => q.map_or(0, |q| u64::from(q.ready)),
            COMMON_Q_NOFF => u64::from(c.queue_select),
            COMMON_Q_DESC => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            COMMON_Q_AVAIL => q.map_or(0, |q| q.avail),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            COMMON_Q_USED => q.map_or(0, |q| q.used),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(bytes);
        // 64-bit writes of the address registers arrive whole or as two dwords.
        if n == 8 && matches!(offset, COMMON_Q_DESC | COMMON_Q_AVAIL | COMMON_Q_USED) {
            self.common_write(offset, &data[..4]);
            self.common_write(offset + 4, &data[4..8]);
            return;
        }
        let v32 = v as u32;
        let v16 = v as u16;
        let nvec = self.interrupt.queue_vectors.len() + 1;
        let valid_vector = |vec: u16| {
            if usize::from(vec) < nvec {
                vec
            } else {
                NO_VECTOR
            }
        };
        match offset {
            COMMON_DFSELECT => self.common.device_feature_select = v32,
            COMMON_GFSELECT => self.common.driver_feature_select = v32,
            COMMON_GF => self.common.write_driver_features(v32),
            COMMON_MSIX => {
                let vec = valid_vector(v16);
                self.common.config_vector = vec;
                self.interrupt.config_vector.store(vec, Ordering::Release);
            }
            COMMON_STATUS => {
                let irq = self.dyn_interrupt.clone();
                if self.common.write_status(v as u8, &irq) == StatusChange::Reset {
                    self.after_reset();
                }
            }
            COMMON_Q_SELECT => self.common.queue_select = v16,
            COMMON_Q_SIZE => {
                if let Some(q) = self.common.selected_mut() {
                    // Sizes are powers of two up to the maximum; others are refused at DRIVER_OK.
                    q.size = v16;
                }
            }
            COMMON_Q_MSIX => {
                let sel = usize::from(self.common.queue_select);
                let vec = valid_vector(v16);
                if let Some(q) = self.common.queues.get_mut(sel) {
                    q.vector = vec;
                    if let Some(a) = self.interrupt.queue_vectors.get(sel) {
                        a.store(vec, Ordering::Release);
                    }
                }
            }
            COMMON_Q_ENABLE => {
                // Only 1 may be written (virtio 1.2, 4.1.4.3.2); disabling is a reset.
                if v16 == 1 {
                    if let Some(q) = self.common.selected_mut() {
                        q.ready = true;
                    }
                }
            }
            COMMON_Q_DESC | 0x24 | COMMON_Q_AVAIL | 0x2c | COMMON_Q_USED | 0x34 => {
                let high = offset % 8 == 4;
                if let Some(q) = self.common.selected_mut() {
                    let reg = match offset & !7 {
                        COMMON_Q_DESC => &mut q.desc,
                        COMMON_Q_AVAIL => &mut q.avail,
                        _ => &mut q.used,
                    };
                    set_half(reg, high, v32);
                }
            }
            _ => log::debug!("virtio-pci: write of read-only common register {offset:#x}"),
        }
    }

    /// A guest access to the PCI-config-access capability's data window.
    fn pci_cfg_window(&mut self, offset: u16, len: usize) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let data_off = cap + 16;
        if offset != data_off || len == 0 {
            return None;
        }
        let bar = self.config.read_u8(cap + 4);
        let off = u64::from(self.config.read_u32(cap + 8));
        let length = self.config.read_u32(cap + 12) as usize;
        (bar == VIRTIO_BAR && matches!(length, 1 | 2 | 4) && length <= len).then_some((off, length))
    }
}

impl<M: GuestMemory + Send + Sync + 'static> PciFunction for VirtioPciDevice<M> {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some((off, len)) = self.pci_cfg_window(offset, data.len()) {
            let mut buf = [0u8; 4];
            self.bar_read(VIRTIO_BAR, off, &mut buf[..len]);
            self.config.set_bytes_raw(self.pci_cfg_cap + 16, &buf);
        }
        self.config.read(offset, data)
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_written(&self.config);
        if let Some((off, len)) = self.pci_cfg_window(offset, data.len()) {
            let mut buf = [0u8; 4];
            buf[..len].copy_from_slice(&data[..len]);
            self.bar_write(VIRTIO_BAR, off, &buf[..len]);
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_BAR {
            data.fill(0xff);
            return;
        }
        let len = data.len() as u64;
        if self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(bar, offset, data)
        {
            return;
        }
        if offset.saturating_add(len) <= COMMON_CFG_LEN {
            self.common_read(offset - COMMON_CFG_OFFSET, data);
        } else if offset == ISR_OFFSET && len == 1 {
            data[0] = self.interrupt.read_isr();
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset) {
            self.common
                .device
                .read_config(offset - DEVICE_CFG_OFFSET, data);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != VIRTIO_BAR {
            return;
        }
        let len = data.len() as u64;
        if self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(bar, offset, data)
        {
            return;
        }
        if offset.saturating_add(len) <= COMMON_CFG_LEN {
            self.common_write(offset - COMMON_CFG_OFFSET, data);
        } else if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&offset) {
            let q = (offset - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
            if let Ok(q) = u16::try_from(q) {
                self.common.queue_notify(q);
            }
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset) {
            self.common
                .device
                .write_config(offset - DEVICE_CFG_OFFSET, data);
        }
    }
}
