//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2).
//!
//! Registers are 32 bits wide and accessed as aligned dwords; the
//! device-specific configuration starts at [`MMIO_CONFIG`] and may be accessed
//! with any width. Interrupts set bits in `InterruptStatus` and drive a line
//! that stays asserted until the driver acknowledges every bit (level mode)
//! or get one edge per interrupt (edge mode, for irqfds).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use iovirt_bus::{BusDeviceMut, InterruptError, InterruptLine};
use vm_memory::{GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{VirtioDevice, VirtioInterrupt};
use crate::transport::{set_half, Common};

/// "virt" in little-endian: the value of `MagicValue`.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Version of the modern (non-legacy) interface.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID we report ("QEMU" as most guests expect any value).
pub const MMIO_VENDOR_ID: u32 = 0x554d_4551;
/// Size of the register window, configuration space included.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

/// Magic value "virt" (RO).
pub const MMIO_MAGIC_VALUE: u64 = 0x000;
/// Interface version, 2 (RO).
pub const MMIO_VERSION_REG: u64 = 0x004;
/// Virtio device ID (RO).
pub const MMIO_DEVICE_ID: u64 = 0x008;
/// Vendor ID (RO).
pub const MMIO_VENDOR_ID_REG: u64 = 0x00c;
/// 32 device feature bits chosen by `DeviceFeaturesSel` (RO).
pub const MMIO_DEVICE_FEATURES: u64 = 0x010;
/// Selects the device feature word (WO).
pub const MMIO_DEVICE_FEATURES_SEL: u64 = 0x014;
/// 32 driver feature bits chosen by `DriverFeaturesSel` (WO).
pub const MMIO_DRIVER_FEATURES: u64 = 0x020;
/// Selects the driver feature word (WO).
pub const MMIO_DRIVER_FEATURES_SEL: u64 = 0x024;
/// Queue selector (WO).
pub const MMIO_QUEUE_SEL: u64 = 0x030;
/// Largest size of the selected queue, 0 if it does not exist (RO).
pub const MMIO_QUEUE_NUM_MAX: u64 = 0x034;
/// Size of the selected queue (WO).
pub const MMIO_QUEUE_NUM: u64 = 0x038;
/// Selected queue is ready (RW).
pub const MMIO_QUEUE_READY: u64 = 0x044;
/// Queue notification: the value is the queue index (WO).
pub const MMIO_QUEUE_NOTIFY: u64 = 0x050;
/// Pending interrupt causes: bit 0 used buffer, bit 1 configuration change (RO).
pub const MMIO_INTERRUPT_STATUS: u64 = 0x060;
/// Acknowledges interrupt causes (WO).
pub const MMIO_INTERRUPT_ACK: u64 = 0x064;
/// Device status (RW; 0 resets).
pub const MMIO_STATUS: u64 = 0x070;
/// Descriptor table address, low dword (WO).
pub const MMIO_QUEUE_DESC_LOW: u64 = 0x080;
/// Descriptor table address, high dword (WO).
pub const MMIO_QUEUE_DESC_HIGH: u64 = 0x084;
/// Driver (available) ring address, low dword (WO).
pub const MMIO_QUEUE_DRIVER_LOW: u64 = 0x090;
/// Driver ring address, high dword (WO).
pub const MMIO_QUEUE_DRIVER_HIGH: u64 = 0x094;
/// Device (used) ring address, low dword (WO).
pub const MMIO_QUEUE_DEVICE_LOW: u64 = 0x0a0;
/// Device ring address, high dword (WO).
pub const MMIO_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Configuration generation (RO).
pub const MMIO_CONFIG_GENERATION: u64 = 0x0fc;
/// First byte of the device-specific configuration.
pub const MMIO_CONFIG: u64 = 0x100;

/// InterruptStatus bit 0: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit 1: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// How the transport drives its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioInterruptMode {
    /// Assert while any InterruptStatus bit is set (a level-triggered pin).
    Level,
    /// One edge per interrupt (an edge-triggered pin or an irqfd).
    Edge,
}

struct MmioInterrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
    mode: MmioInterruptMode,
}

impl MmioInterrupt {
    fn raise(&self, bit: u32) -> Result<(), InterruptError> {
        let old = self.status.fetch_or(bit, Ordering::SeqCst);
        match self.mode {
            MmioInterruptMode::Edge => self.line.trigger(),
            MmioInterruptMode::Level if old == 0 => self.line.set_level(true),
            MmioInterruptMode::Level => Ok(()),
        }
    }

    fn ack(&self, bits: u32) {
        let old = self.status.fetch_and(!bits, Ordering::SeqCst);
        if self.mode == MmioInterruptMode::Level && old != 0 && old & !bits == 0 {
            if let Err(e) = self.line.set_level(false) {
                log::warn!("virtio-mmio: deasserting the interrupt failed: {e}");
            }
        }
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal_used_queue(&self, _queue_index: u16) -> Result<(), InterruptError> {
        self.raise(INT_VRING)
    }
    fn signal_config_change(&self) -> Result<(), InterruptError> {
        self.raise(INT_CONFIG)
    }
}

/// A virtio device behind the MMIO transport (version 2).
///
/// Register it on the MMIO [`iovirt_bus::Bus`] inside a `Mutex` (which makes it a
/// [`iovirt_bus::BusDevice`]) with a window of [`MMIO_WINDOW_SIZE`] bytes, and tell the
/// guest where it is (kernel command line `virtio_mmio.device=512@0xd0000000:5`
/// or a device-tree node). [`Self::queue_eventfds`] may be registered as
/// ioeventfds on `base + MMIO_QUEUE_NOTIFY` with the queue index as data match.
pub struct VirtioMmioDevice<M: GuestMemory> {
    common: Common<M>,
    interrupt: Arc<MmioInterrupt>,
    dyn_interrupt: Arc<dyn VirtioInterrupt>,
}

impl<M: GuestMemory + Send + Sync + 'static> VirtioMmioDevice<M> {
    /// Wrap `device` in the MMIO transport; interrupts go to `line` in `mode`.
    pub fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: GuestMemoryAtomic<M>,
        line: Arc<dyn InterruptLine>,
        mode: MmioInterruptMode,
    ) -> std::io::Result<Self> {
        let interrupt = Arc::new(MmioInterrupt {
            status: AtomicU32::new(0),
            line,
            mode,
        });
        Ok(VirtioMmioDevice {
            common: Common::new(device, mem)?,
            dyn_interrupt: interrupt.clone(),
            interrupt,
        })
    }
}

impl<M: GuestMemory> VirtioMmioDevice<M> {
    /// Each queue's notification event, in queue order: register queue `i`'s
    /// as an ioeventfd at `base + MMIO_QUEUE_NOTIFY`, 4 bytes, data match `i`.
    pub fn queue_eventfds(&self) -> Vec<Arc<EventFd>> {
        self.common.notify.clone()
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status.load(Ordering::SeqCst)
    }

    /// Reset the device, as a write of 0 to the status register does.
    pub fn reset(&mut self) {
        self.common.reset();
        self.interrupt.ack(u32::MAX);
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let c = &self.common;
        let q = c.selected();
        match offset {
            MMIO_MAGIC_VALUE => MMIO_MAGIC,
            MMIO_VERSION_REG => MMIO_VERSION,
            MMIO_DEVICE_ID => c.device.device_type(),
            MMIO_VENDOR_ID_REG => MMIO_VENDOR_ID,
            MMIO_DEVICE_FEATURES => c.device_features_window(),
            MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size)),
            MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            MMIO_INTERRUPT_STATUS => self.interrupt.status.load(Ordering::SeqCst),
            MMIO_STATUS => u32::from(c.status),
            MMIO_CONFIG_GENERATION => u32::from(c.config_generation),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            MMIO_DEVICE_FEATURES_SEL => self.common.device_feature_select = v,
            MMIO_DRIVER_FEATURES => self.common.write_driver_features(v),
            MMIO_DRIVER_FEATURES_SEL => self.common.driver_feature_select = v,
            MMIO_QUEUE_SEL => self.common.queue_select = v as u16,
            MMIO_QUEUE_NUM => {
                if let Some(q) = self.common.selected_mut() {
                    q.size = v as u16;
                }
            }
            MMIO_QUEUE_READY => {
                if let Some(q) = self.common.selected_mut() {
                    q.ready = v == 1;
                }
            }
            MMIO_QUEUE_NOTIFY => {
                if let Ok(q) = u16::try_from(v) {
                    self.common.queue_notify(q);
                }
            }
            MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            MMIO_STATUS => {
                let irq = self.dyn_interrupt.clone();
                if self.common.write_status(v as u8, &irq) == crate::transport::StatusChange::Reset
                {
                    self.interrupt.ack(u32::MAX);
                }
            }
            MMIO_QUEUE_DESC_LOW
            | MMIO_QUEUE_DESC_HIGH
            | MMIO_QUEUE_DRIVER_LOW
            | MMIO_QUEUE_DRIVER_HIGH
            | MMIO_QUEUE_DEVICE_LOW
            | MMIO_QUEUE_DEVICE_HIGH => {
                let high = offset % 8 == 4;
                if let Some(q) = self.common.selected_mut() {
                    let reg = match offset & !7 {
                        MMIO_QUEUE_DESC_LOW => &mut q.desc,
                        MMIO_QUEUE_DRIVER_LOW => &mut q.avail,
                        _ => &mut q.used,
                    };
                    set_half(reg, high, v);
                }
            }
            _ => log::debug!("virtio-mmio: write of {v:#x} to {offset:#x} ignored"),
        }
    }
}

impl<M: GuestMemory + Send + Sync + 'static> BusDeviceMut for VirtioMmioDevice<M> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG {
            self.common.device.read_config(offset - MMIO_CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG {
            self.common.device.write_config(offset - MMIO_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 == 0 {
            self.write_reg(offset, u32::from_le_bytes(bytes));
        }
    }
}
