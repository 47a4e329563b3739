//! Several exports in one daemon, one scheduling stage between them.
//!
//! [`Exports::open`] opens every export's back-end (exports whose `--disk` is
//! the same text share one opened back-end: one file handle, one filter
//! stack, so one capacity), puts each behind its own client of one
//! [`SharedScheduler`] when the daemon schedules, and creates every socket
//! before any frontend can connect, so a mistake stops the daemon at once
//! with one line. [`Exports::serve`] then runs one listener thread per
//! export; a frontend that connects to or leaves one export does not touch
//! the others (their devices, sockets and threads are their own; only the
//! stage is shared, and a client's requests stay queued there across its
//! frontend's reconnects).

use std::path::PathBuf;
use std::sync::Arc;

use iovirt_backend::BlockBackend;
use iovirt_sched::{ClientId, MonotonicClock, SharedScheduler, StageConfig, TimerHandle};
use vhost::vhost_user::Listener;

use crate::config::{DaemonConfig, ExportConfig};
use crate::disk::DiskSpec;
use crate::server::{listen, serve, ExportCounters};
use crate::Error;

/// One export as opened: what the control socket and the logs can reach of it.
pub struct Export {
    /// Its configuration.
    pub config: ExportConfig,
    /// Its client in the shared scheduling stage, when the daemon schedules.
    pub client: Option<ClientId>,
    /// Its device counters (requests, interrupts), over all connections.
    pub counters: Arc<ExportCounters>,
    /// The back-end its devices submit to (the stage client, or the disk).
    backend: Arc<dyn BlockBackend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("config", &self.config)
            .field("client", &self.client)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// The shared stage and the timer thread that releases requests held by limits.
pub struct Scheduled {
    sched: Arc<SharedScheduler>,
    _timer: TimerHandle,
}

impl std::fmt::Debug for Scheduled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduled")
            .field("sched", &self.sched)
            .finish()
    }
}

/// Every export of the daemon, opened, with their listeners ready.
pub struct Exports {
    /// The exports, in command-line order (the control socket's index).
    pub list: Vec<Arc<Export>>,
    sched: Option<Scheduled>,
    listeners: Vec<Listener>,
    connections: Option<u64>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports")
            .field("list", &self.list)
            .field("sched", &self.sched)
            .finish_non_exhaustive()
    }
}

impl Exports {
    /// Open every back-end, build the stage and create every socket.
    pub fn open(cfg: &DaemonConfig) -> Result<Exports, Error> {
        let sched = if cfg.scheduled() {
            let sched = Arc::new(SharedScheduler::new(
                StageConfig {
                    max_outstanding: cfg.sched_depth,
                    ..StageConfig::default()
                },
                Arc::new(MonotonicClock::default()),
            ));
            let timer = sched.spawn_timer().map_err(Error::Setup)?;
            Some(Scheduled {
                sched,
                _timer: timer,
            })
        } else {
            None
        };
        let mut opened: Vec<(DiskSpec, Arc<dyn BlockBackend>, String)> = Vec::new();
        let mut list = Vec::new();
        for e in &cfg.exports {
            let disk = match opened.iter().find(|(spec, _, _)| *spec == e.disk) {
                Some((_, disk, first)) => {
                    log::info!(
                        "export {}: shares its back-end with export {first} (same --disk)",
                        e.name
                    );
                    disk.clone()
                }
                None => {
                    let disk = e.disk.open()?;
                    opened.push((e.disk.clone(), disk.clone(), e.name.clone()));
                    disk
                }
            };
            let (backend, client): (Arc<dyn BlockBackend>, _) = match &sched {
                Some(s) => {
                    let params = e.sched.unwrap_or_default();
                    log::info!(
                        "export {}: scheduled with reservation {}, limit {}, weight {}",
                        e.name,
                        params.reservation,
                        params.limit.map_or("none".to_string(), |l| l.to_string()),
                        params.weight
                    );
                    let stage = s.sched.add_client(params, disk);
                    let client = stage.client();
                    (Arc::new(stage), Some(client))
                }
                None => (disk, None),
            };
            list.push(Arc::new(Export {
                config: e.clone(),
                client,
                counters: Arc::new(ExportCounters::default()),
                backend,
            }));
        }
        let listeners = cfg
            .exports
            .iter()
            .map(|e| listen(&e.socket))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Exports {
            list,
            sched,
            listeners,
            connections: cfg.connections,
        })
    }

    /// The shared scheduling stage, when the daemon schedules.
    pub fn scheduler(&self) -> Option<&Arc<SharedScheduler>> {
        self.sched.as_ref().map(|s| &s.sched)
    }

    /// The sockets, in export order.
    pub fn sockets(&self) -> Vec<PathBuf> {
        self.list.iter().map(|e| e.config.socket.clone()).collect()
    }

    /// Serve every export on its own thread until each has served its
    /// connections (forever without `--connections`). An export that fails
    /// logs one line and stops; the others go on. Returns the first failure.
    pub fn serve(mut self) -> Result<(), Error> {
        let connections = self.connections;
        let mut threads = Vec::new();
        for (export, listener) in self.list.iter().zip(std::mem::take(&mut self.listeners)) {
            let export = export.clone();
            let t = std::thread::Builder::new()
                .name(format!("export-{}", export.config.name))
                .spawn(move || {
                    let r = serve(
                        listener,
                        export.backend.clone(),
                        &export.config,
                        connections,
                        &export.counters,
                    );
                    if let Err(e) = &r {
                        log::error!("export {}: stopped: {e}", export.config.name);
                    }
                    r
                })
                .map_err(Error::Setup)?;
            threads.push(t);
        }
        let mut first = Ok(());
        for t in threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(Error::Daemon("an export thread panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        self.log_stats();
        first
    }

    /// Log each export's scheduling statistics and interrupt counts.
    pub fn log_stats(&self) {
        for e in &self.list {
            let (reqs, irqs) = e.counters.totals();
            let sched = match (self.scheduler(), e.client) {
                (Some(s), Some(c)) => s.stats(c).ok(),
                _ => None,
            };
            match sched {
                Some(st) => log::info!(
                    "export {}: {} requests ({} in the reservation phase), {} errors, p50 {} us, p99 {} us; {irqs} interrupts",
                    e.config.name,
                    st.completed,
                    st.reservation_dispatches,
                    st.errors,
                    st.latency.percentile(0.5).unwrap_or(0) / 1000,
                    st.latency.percentile(0.99).unwrap_or(0) / 1000
                ),
                None => log::info!("export {}: {reqs} requests, {irqs} interrupts", e.config.name),
            }
        }
    }
}
