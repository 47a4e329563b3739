//! What the PCI and MMIO transports share: the device-status state machine,
//! feature negotiation, the queue registers and one notification event per queue.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActiveQueue, VirtioDevice, VirtioInterrupt};
use crate::{
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// MSI-X "no vector" value of the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// The driver-programmed registers of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// Largest size the device allows (read-only to the driver).
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver enabled the queue.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available (driver) ring.
    pub avail: u64,
    /// Guest address of the used (device) ring.
    pub used: u64,
    /// MSI-X vector of the queue (PCI only; [`NO_VECTOR`] when none).
    pub vector: u16,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        QueueRegs {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            vector: NO_VECTOR,
        }
    }
}

/// What a status write did, so the transport can update its own registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusChange {
    /// Nothing the transport needs to know.
    None,
    /// The driver wrote 0: the device was reset.
    Reset,
}

/// Transport-independent state of a virtio device.
pub(crate) struct Common<M: GuestMemory> {
    pub(crate) device: Box<dyn VirtioDevice<M>>,
    pub(crate) mem: GuestMemoryAtomic<M>,
    pub(crate) status: u8,
    pub(crate) device_feature_select: u32,
    pub(crate) driver_feature_select: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_select: u16,
    pub(crate) queues: Vec<QueueRegs>,
    pub(crate) notify: Vec<Arc<EventFd>>,
    pub(crate) config_generation: u8,
    pub(crate) config_vector: u16,
    pub(crate) active: bool,
}

impl<M: GuestMemory> Common<M> {
    pub(crate) fn new(
        device: Box<dyn VirtioDevice<M>>,
        mem: GuestMemoryAtomic<M>,
    ) -> std::io::Result<Self> {
        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueRegs::new(m))
            .collect();
        let notify = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Common {
            device,
            mem,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            notify,
            config_generation: 0,
            config_vector: NO_VECTOR,
            active: false,
        })
    }

    pub(crate) fn num_queues(&self) -> u16 {
        // Devices have far fewer than 65536 queues; clamp rather than wrap.
        u16::try_from(self.queues.len()).unwrap_or(u16::MAX)
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    /// The selected queue's registers, if the selector names a queue.
    pub(crate) fn selected(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The selected queue's registers for a driver write: only before DRIVER_OK.
    pub(crate) fn selected_mut(&mut self) -> Option<&mut QueueRegs> {
        if self.driver_ok() {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The 32 device feature bits the device-feature selector names.
    pub(crate) fn device_features_window(&self) -> u32 {
        let f = self.device.device_features();
        match self.device_feature_select {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 driver feature bits the driver-feature selector names.
    pub(crate) fn driver_features_window(&self) -> u32 {
        match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Driver write of 32 feature bits: only between DRIVER and FEATURES_OK.
    pub(crate) fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            log::debug!(
                "virtio: driver features written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        let v = u64::from(value);
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            _ => {}
        }
    }

    /// The driver's notification of queue `index`: wake the device's worker.
    pub(crate) fn queue_notify(&self, index: u16) {
        if let Some(e) = self.notify.get(usize::from(index)) {
            if let Err(err) = e.write(1) {
                log::warn!("virtio: notify of queue {index} failed: {err}");
            }
        }
    }

    /// A driver write of the device status register.
    pub(crate) fn write_status(
        &mut self,
        value: u8,
        interrupt: &Arc<dyn VirtioInterrupt>,
    ) -> StatusChange {
        if value == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        let old = self.status;
        if value & old != old {
            // Only a reset clears bits (virtio 1.2, 2.1.1); a driver must not do it otherwise.
            log::debug!("virtio: status {old:#x} -> {value:#x} clears bits; ignored");
            return StatusChange::None;
        }
        let new_bits = value & !old;
        let mut status = value & !STATUS_DEVICE_NEEDS_RESET | (old & STATUS_DEVICE_NEEDS_RESET);
        // Bits must be set in order: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK.
        if status & STATUS_DRIVER != 0 && status & STATUS_ACKNOWLEDGE == 0 {
            status &= !STATUS_DRIVER;
        }
        if new_bits & STATUS_FEATURES_OK != 0 && !self.features_acceptable(status) {
            status &= !STATUS_FEATURES_OK;
        }
        if new_bits & STATUS_DRIVER_OK != 0 {
            if status & STATUS_FEATURES_OK == 0 || status & STATUS_FAILED != 0 {
                status &= !STATUS_DRIVER_OK;
            } else {
                self.status = status;
                if let Err(e) = self.activate(interrupt) {
                    log::warn!("virtio: activation failed: {e}");
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    let _ = interrupt.signal_config_change();
                }
                return StatusChange::None;
            }
        }
        self.status = status;
        StatusChange::None
    }

    /// FEATURES_OK is accepted only with VERSION_1 acked, nothing acked that
    /// was not offered, and DRIVER set.
    fn features_acceptable(&self, status: u8) -> bool {
        let offered = self.device.device_features();
        let acked = self.driver_features;
        let ok = status & STATUS_DRIVER != 0
            && acked & !offered == 0
            && acked & (1 << VIRTIO_F_VERSION_1) != 0;
        if !ok {
            log::debug!("virtio: refusing features {acked:#x} (offered {offered:#x})");
        }
        ok
    }

    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) -> Result<(), String> {
        let event_idx = self.driver_features & (1 << VIRTIO_F_RING_EVENT_IDX) != 0;
        let mut active = Vec::new();
        let mem = self.mem.memory();
        for (i, regs) in self.queues.iter().enumerate() {
            if !regs.ready {
                continue;
            }
            let index = u16::try_from(i).map_err(|_| "too many queues".to_string())?;
            let queue = build_queue(regs, event_idx).map_err(|e| format!("queue {i}: {e}"))?;
            if !queue.is_valid(&*mem) {
                return Err(format!(
                    "queue {i}: rings are not in guest memory or misaligned"
                ));
            }
            let notify = self
                .notify
                .get(i)
                .cloned()
                .ok_or_else(|| format!("queue {i} has no notify event"))?;
            active.push(ActiveQueue {
                index,
                queue,
                notify,
            });
        }
        drop(mem);
        self.device
            .activate(
                self.mem.clone(),
                self.driver_features,
                active,
                interrupt.clone(),
            )
            .map_err(|e| e.to_string())?;
        self.active = true;
        // The driver may have notified before DRIVER_OK; make sure nothing is missed.
        for i in 0..self.num_queues() {
            if self.queues.get(usize::from(i)).is_some_and(|q| q.ready) {
                self.queue_notify(i);
            }
        }
        Ok(())
    }

    /// Reset the device and every register to its power-on value.
    pub(crate) fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        for e in &self.notify {
            // Drain stale notifications; EAGAIN when there were none.
            let _ = e.read();
        }
    }
}

/// A virtio-queue [`Queue`] from the registers the driver programmed.
pub(crate) fn build_queue(regs: &QueueRegs, event_idx: bool) -> Result<Queue, virtio_queue::Error> {
    let mut q = Queue::new(regs.max_size)?;
    q.try_set_size(regs.size)?;
    q.try_set_desc_table_address(GuestAddress(regs.desc))?;
    q.try_set_avail_ring_address(GuestAddress(regs.avail))?;
    q.try_set_used_ring_address(GuestAddress(regs.used))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    Ok(q)
}

/// Replace the low or high 32 bits of `reg`.
pub(crate) fn set_half(reg: &mut u64, high: bool, value: u32) {
    let v = u64::from(value);
    *reg = if high {
        (*reg & 0xffff_ffff) | (v << 32)
    } else {
        (*reg & !0xffff_ffff) | v
    };
}

impl<M: GuestMemory> Drop for Common<M> {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}
