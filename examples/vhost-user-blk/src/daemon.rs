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
use iovirt_control::{Commands, Control, DiskControl, Reply};
use iovirt_filter::stack::Stack;
use iovirt_sched::{ClientId, MonotonicClock, SharedScheduler, StageConfig, TimerHandle};
use serde_json::{json, Map, Value};
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
    /// Its filter stack (shared with the exports that name the same one).
    stack: Option<Arc<Stack>>,
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
        type Opened = (DiskSpec, Arc<dyn BlockBackend>, Option<Arc<Stack>>, String);
        let mut opened: Vec<Opened> = Vec::new();
        let mut list = Vec::new();
        for e in &cfg.exports {
            let (disk, stack) = match opened.iter().find(|o| o.0 == e.disk) {
                Some((_, disk, stack, first)) => {
                    log::info!(
                        "export {}: shares its back-end with export {first} (same --disk)",
                        e.name
                    );
                    (disk.clone(), stack.clone())
                }
                None => {
                    let (disk, stack) = e.disk.open_with_stack()?;
                    let stack = stack.map(Arc::new);
                    opened.push((e.disk.clone(), disk.clone(), stack.clone(), e.name.clone()));
                    (disk, stack)
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
                stack,
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

    /// The control interface over every export (a "disk" each, by index or
    /// name), the shared stage, and the `export-stats` command.
    pub fn control(&self) -> Control {
        let disks = self
            .list
            .iter()
            .map(|e| {
                let mut d = DiskControl::new(e.config.name.clone());
                if let Some(stack) = &e.stack {
                    d = d.with_stack(stack);
                }
                d.with_client(e.client)
                    .with_field("socket", e.config.socket.display().to_string())
                    .with_field("disk", e.config.disk.describe())
                    .with_field("serial", e.config.serial.clone())
                    .with_field("queues", e.config.queues)
                    .with_field("coalesce", e.config.coalesce)
            })
            .collect();
        Control::new(disks, self.scheduler().cloned())
            .with_commands(Arc::new(ExportStats(self.list.clone())))
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

/// `{"cmd":"export-stats"[,"disk":N|NAME]}`: per export, frontends served,
/// whether one is connected, requests completed and interrupts sent (over all
/// connections), and interrupts per request.
///
/// Also `{"cmd":"sched-stats"}` without `"disk"`: the built-in per-disk
/// answer for every export, as `"clients": [...]`, so one request shows how
/// the exports share the stage.
struct ExportStats(Vec<Arc<Export>>);

impl ExportStats {
    fn one(index: usize, e: &Export) -> Value {
        let (requests, interrupts) = e.counters.totals();
        json!({
            "index": index,
            "name": e.config.name,
            "connections": e.counters.connections.load(std::sync::atomic::Ordering::Relaxed),
            "connected": e.counters.connected(),
            "requests": requests,
            "interrupts": interrupts,
            "interrupts_per_request": if requests == 0 {
                Value::Null
            } else {
                json!(interrupts as f64 / requests as f64)
            },
            "coalesce": e.config.coalesce,
        })
    }
}

impl Commands for ExportStats {
    fn names(&self) -> Vec<String> {
        vec!["export-stats".into()]
    }

    fn handle(&self, control: &Control, cmd: &str, req: &Map<String, Value>) -> Option<Reply> {
        if cmd == "sched-stats" && !req.contains_key("disk") {
            let clients = (0..self.0.len())
                .map(|i| {
                    let line = json!({"cmd": "sched-stats", "disk": i}).to_string();
                    let mut answer = control.handle_line(line.as_bytes());
                    if let Some(a) = answer.as_object_mut() {
                        a.remove("ok");
                        if let Some(name) = self.0.get(i).map(|e| e.config.name.clone()) {
                            a.insert("name".into(), Value::String(name));
                        }
                    }
                    answer
                })
                .collect();
            let mut out = Map::new();
            out.insert("clients".into(), Value::Array(clients));
            return Some(Ok(out));
        }
        if cmd != "export-stats" {
            return None;
        }
        let exports: Vec<Value> = if req.contains_key("disk") {
            match control.disk(req) {
                Ok((i, _)) => match self.0.get(i) {
                    Some(e) => vec![Self::one(i, e)],
                    None => return Some(Err(format!("no export {i}"))),
                },
                Err(e) => return Some(Err(e)),
            }
        } else {
            self.0
                .iter()
                .enumerate()
                .map(|(i, e)| Self::one(i, e))
                .collect()
        };
        let mut out = Map::new();
        out.insert("exports".into(), Value::Array(exports));
        Some(Ok(out))
    }
}
