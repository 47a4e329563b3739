//! The virtio device trait, the interrupt trait transports implement, and the
//! queues a transport hands to a device when the driver sets DRIVER_OK.

use std::sync::Arc;

use iovirt_bus::InterruptError;
use virtio_queue::Queue;
use vm_memory::{GuestMemory, GuestMemoryAtomic};
use vmm_sys_util::eventfd::EventFd;

/// How a device raises interrupts, implemented by each transport.
///
/// Device worker threads call these from their own threads: implementations
/// are cheap and never block on a vCPU.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers on the used ring of queue `queue_index`.
    fn signal_used_queue(&self, queue_index: u16) -> Result<(), InterruptError>;
    /// The device changed its configuration space (or needs a reset).
    fn signal_config_change(&self) -> Result<(), InterruptError>;
}

/// One queue the driver enabled, handed to [`VirtioDevice::activate`].
///
/// `notify` is the queue's notification event: the transport writes it when
/// the driver writes the queue's notify register, and a VMM may register the
/// same file descriptor as a KVM ioeventfd so that notifications reach the
/// device without an exit to user space. Either way the device's worker
/// thread waits on it.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Index of the queue in the device (0-based).
    pub index: u16,
    /// The queue, with size, ring addresses, ready and EVENT_IDX already set.
    pub queue: Queue,
    /// Readable when the driver notified this queue.
    pub notify: Arc<EventFd>,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled no queue, or a queue the device cannot use.
    #[error("invalid queue configuration: {0}")]
    BadQueues(String),
    /// A worker thread, epoll instance or event could not be created.
    #[error("could not start the device: {0}")]
    Io(#[from] std::io::Error),
    /// The device is already active.
    #[error("the device is already active")]
    AlreadyActive,
}

/// A virtio 1.x device model, independent of its transport.
///
/// The transport ([`crate::pci::VirtioPciDevice`], [`crate::mmio::VirtioMmioDevice`])
/// owns the device, serves its registers, negotiates features and, when the
/// driver sets DRIVER_OK, calls [`VirtioDevice::activate`] with the enabled
/// queues. The device then does its work on its own threads; the thread that
/// wrote the notify register never runs I/O. Writing 0 to the status register
/// calls [`VirtioDevice::reset`], which returns only once the device no longer
/// touches guest memory.
pub trait VirtioDevice<M: GuestMemory>: Send {
    /// Virtio device ID (1 = network, 2 = block, ...).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including transport bits such as VERSION_1).
    fn device_features(&self) -> u64;
    /// Guest read of the device-specific configuration space at `offset`;
    /// bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest write of the device-specific configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device with the negotiated `acked_features` and the queues the
    /// driver enabled.
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError>;
    /// Stop the device: worker threads stop, in-flight requests are waited for,
    /// the queues are dropped. Afterwards the device is as if newly created.
    fn reset(&mut self);
}

impl<M: GuestMemory, D: VirtioDevice<M> + ?Sized> VirtioDevice<M> for Box<D> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn device_features(&self) -> u64 {
        (**self).device_features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<M>,
        acked_features: u64,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        (**self).activate(mem, acked_features, queues, interrupt)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
}

/// Copy `data.len()` bytes of `src` starting at `offset` into `data`, zero past the end:
/// the usual way to serve a read of a configuration structure held as bytes.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}
