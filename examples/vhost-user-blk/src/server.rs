//! Serving the socket: one connection at a time, a fresh device for each, forever.

use std::path::PathBuf;
use std::sync::Arc;

use iovirt_backend::BlockBackend;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::BlkDevice;
use crate::iotlb::VhostIotlb;
use crate::Error;
use iovirt_virtio::block::BlockConfig;

/// What the daemon serves, and where.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The vhost-user socket to listen on (a stale file is replaced).
    pub socket: PathBuf,
    /// Number of request queues.
    pub queues: u16,
    /// Largest queue size a frontend may configure.
    pub queue_size: u16,
    /// Serial number returned by GET_ID.
    pub serial: String,
    /// How long a queue's worker polls for new requests after a kick.
    pub poll: std::time::Duration,
    /// Serve this many connections, then return (`None`: forever).
    pub connections: Option<u64>,
    /// Offer VIRTIO_F_ACCESS_PLATFORM with a device IOTLB (`--iommu-platform on`).
    pub iommu_platform: bool,
}

/// Listen on the socket and serve `disk` to one frontend at a time. When a
/// frontend disconnects, its device is dropped (after its in-flight requests
/// completed or were abandoned with its memory) and the next frontend gets a
/// device in reset state.
pub fn serve(disk: Arc<dyn BlockBackend>, cfg: &ServerConfig) -> Result<(), Error> {
    let queues = cfg.queues.max(1);
    if queues > 64 {
        return Err(Error::Usage(format!("--queues {queues}: at most 64")));
    }
    let blk_cfg = BlockConfig {
        num_queues: queues,
        queue_size: cfg.queue_size,
        serial: cfg.serial.as_bytes().to_vec(),
        ..BlockConfig::default()
    };
    let mut listener = Listener::new(&cfg.socket, true).map_err(|e| Error::Listen {
        path: cfg.socket.clone(),
        source: e,
    })?;
    log::info!(
        "serving {} bytes ({} queues) on {}",
        disk.info().capacity,
        queues,
        cfg.socket.display()
    );
    let mut served = 0u64;
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let iotlb = cfg.iommu_platform.then(|| Arc::new(VhostIotlb::default()));
        let mut dev = BlkDevice::new(disk.clone(), blk_cfg.clone(), mem.clone(), cfg.poll)?;
        if let Some(t) = &iotlb {
            dev = dev.with_iotlb(t.clone());
        }
        let mut daemon = VhostUserDaemon::new("iovirt-vhost-user-blk".into(), dev.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        for (handler, fd) in daemon.get_epoll_handlers().iter().zip(dev.completion_fds()) {
            handler
                .register_listener(fd, EventSet::IN, dev.completion_event_id())
                .map_err(Error::Setup)?;
        }
        let relay = match iotlb {
            Some(t) => Some(crate::proxy::start_relayed(&mut daemon, &mut listener, t)?),
            None => daemon
                .start(&mut listener)
                .map(|()| None)
                .map_err(|e| Error::Daemon(e.to_string()))?,
        };
        log::info!("frontend connected");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("frontend connection ended: {e}"),
        }
        if let Some(r) = relay {
            r.finish();
        }
        drop(daemon);
        served += 1;
        if cfg.connections.is_some_and(|n| served >= n) {
            return Ok(());
        }
    }
}
