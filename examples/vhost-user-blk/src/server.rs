//! Serving one export's socket: one connection at a time, a fresh device for
//! each, until the export has served its connections (or forever).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iovirt_backend::BlockBackend;
use iovirt_virtio::block::{BlockConfig, CoalesceParams};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::config::ExportConfig;
use crate::device::BlkDevice;
use crate::iotlb::VhostIotlb;
use crate::Error;

/// Device counters of one export over all its connections, readable while it
/// serves (the control socket, the log line at each disconnect).
#[derive(Default)]
pub struct ExportCounters {
    /// Frontends served (connected and gone).
    pub connections: AtomicU64,
    completions: AtomicU64,
    interrupts: AtomicU64,
    current: Mutex<Option<BlkDevice>>,
    connected: AtomicBool,
}

impl std::fmt::Debug for ExportCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (c, i) = self.totals();
        f.debug_struct("ExportCounters")
            .field("completions", &c)
            .field("interrupts", &i)
            .finish()
    }
}

impl ExportCounters {
    /// Requests completed and interrupts sent, over all connections so far
    /// (the current one included).
    pub fn totals(&self) -> (u64, u64) {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let (c, i) = cur
            .as_ref()
            .map_or((0, 0), |d| (d.completions(), d.interrupts()));
        (
            self.completions.load(Ordering::Relaxed) + c,
            self.interrupts.load(Ordering::Relaxed) + i,
        )
    }

    /// Whether a frontend is connected now (or its connection is being set up).
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn start(&self, dev: &BlkDevice) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(dev.clone());
    }

    /// Fold the finished connection's device into the totals; returns its own numbers.
    fn finish(&self) -> (u64, u64) {
        let dev = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (c, i) = dev.map_or((0, 0), |d| (d.completions(), d.interrupts()));
        self.completions.fetch_add(c, Ordering::Relaxed);
        self.interrupts.fetch_add(i, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
        (c, i)
    }
}

/// Create the export's socket (a stale file is replaced).
pub fn listen(socket: &Path) -> Result<Listener, Error> {
    Listener::new(socket, true).map_err(|e| Error::Listen {
        path: socket.to_path_buf(),
        source: e,
    })
}

/// The virtio-blk configuration of an export.
pub fn block_config(cfg: &ExportConfig) -> Result<BlockConfig, Error> {
    let queues = cfg.queues.max(1);
    if queues > 64 {
        return Err(Error::Usage(format!("--queues {queues}: at most 64")));
    }
    Ok(BlockConfig {
        num_queues: queues,
        queue_size: cfg.queue_size,
        serial: cfg.serial.as_bytes().to_vec(),
        coalescing: cfg.coalesce.then(CoalesceParams::default),
        ..BlockConfig::default()
    })
}

/// Serve `disk` on `listener` to one frontend at a time. When a frontend
/// disconnects, its device is dropped (after its in-flight requests
/// completed or were abandoned with its memory) and the next frontend gets a
/// device in reset state. Returns after `connections` frontends (`None`:
/// never).
pub fn serve(
    mut listener: Listener,
    disk: Arc<dyn BlockBackend>,
    cfg: &ExportConfig,
    connections: Option<u64>,
    counters: &ExportCounters,
) -> Result<(), Error> {
    let blk_cfg = block_config(cfg)?;
    log::info!(
        "export {}: serving {} bytes ({} queues{}{}) on {}",
        cfg.name,
        disk.info().capacity,
        blk_cfg.num_queues,
        if cfg.coalesce {
            ", interrupt coalescing"
        } else {
            ""
        },
        if cfg.iommu_platform {
            ", ACCESS_PLATFORM"
        } else {
            ""
        },
        cfg.socket.display()
    );
    let mut served = 0u64;
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let iotlb = cfg.iommu_platform.then(|| Arc::new(VhostIotlb::default()));
        let mut dev = BlkDevice::new(disk.clone(), blk_cfg.clone(), mem.clone(), cfg.poll)?
            .with_poll_mode(cfg.poll_mode);
        if let Some(t) = &iotlb {
            dev = dev.with_iotlb(t.clone());
        }
        let mut daemon = VhostUserDaemon::new("iovirt-vhost-user-blk".into(), dev.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        let handlers = daemon.get_epoll_handlers();
        for (handler, fd) in handlers.iter().zip(dev.completion_fds()) {
            handler
                .register_listener(fd, EventSet::IN, dev.completion_event_id())
                .map_err(Error::Setup)?;
        }
        if let Some(fd) = dev.take_backend_completions() {
            for handler in handlers.iter() {
                handler
                    .register_listener(fd, EventSet::IN, dev.backend_event_id())
                    .map_err(Error::Setup)?;
            }
        }
        for (handler, fd) in handlers.iter().zip(dev.timer_fds()) {
            handler
                .register_listener(fd, EventSet::IN, dev.timer_event_id())
                .map_err(Error::Setup)?;
        }
        counters.start(&dev);
        let relay = match iotlb {
            Some(t) => Some(crate::proxy::start_relayed(&mut daemon, &mut listener, t)?),
            None => daemon
                .start(&mut listener)
                .map(|()| None)
                .map_err(|e| Error::Daemon(e.to_string()))?,
        };
        counters.connected.store(true, Ordering::Relaxed);
        log::info!("export {}: frontend connected", cfg.name);
        let how = match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => "disconnected".to_string(),
            Err(e) => format!("connection ended: {e}"),
        };
        if let Some(r) = relay {
            r.finish();
        }
        drop(daemon);
        counters.connected.store(false, Ordering::Relaxed);
        let (reqs, irqs) = counters.finish();
        // One line per connection; scripts/vic.sh reads the interrupt count from it.
        log::info!(
            "export {}: frontend {how} after {reqs} requests, {irqs} interrupts ({:.3} per request)",
            cfg.name,
            irqs as f64 / reqs.max(1) as f64
        );
        served += 1;
        if connections.is_some_and(|n| served >= n) {
            return Ok(());
        }
    }
}
