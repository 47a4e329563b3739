//! # iovirt-control: run-time control of a VMM's or daemon's disks
//!
//! In iovirt's I/O path (guest driver → trap → bus → front-end device →
//! filters → scheduler → back-end), this crate sits beside the path, not on
//! it: it holds the *control handles* of the filters of each disk's stack
//! (mirror, redo log, multipath, live migration) and the disk's client in the
//! shared scheduling stage, and serves them to an operator as JSON lines on a
//! unix socket. `iovirt-vmm --control` and `iovirt-vhost-user-blk --control`
//! both serve it; the protocol and its commands are in docs/CONTROL.md.
//!
//! The embedder describes each disk generically with a [`DiskControl`] (a
//! name, the [`NodeControl`]s of its stack by node path, its optional
//! scheduler [`ClientId`], and descriptive fields of its own such as a path
//! or an interface), builds one [`Control`] over the list and the optional
//! [`SharedScheduler`], and calls [`start`] to serve it.
//!
//! The clients are hostile: malformed JSON, unknown commands, wrong types,
//! out-of-range indices and over-long lines get an `{"ok":false,"error":...}`
//! answer and a log line, and the connection goes on. Nothing a client sends
//! may panic the process or reach a filter unchecked.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_control::{Control, DiskControl};
//! use iovirt_filter::stack::StackSpec;
//!
//! let stack = StackSpec::from_toml_str(
//!     "[vda]\nfilter = \"mirror\"\n[[vda.children]]\nbackend = \"memory\"\nsize = \"1M\"\n\
//!      [[vda.children]]\nbackend = \"memory\"\nsize = \"1M\"\n",
//! )?
//! .build_stack()?;
//! let disk = DiskControl::new("vda").with_stack(&stack);
//! let control = Arc::new(Control::new(vec![disk], None));
//!
//! // What a client on the socket would send, answered directly.
//! let answer = control.handle_line(br#"{"cmd":"mirror-status","disk":"vda","id":1}"#);
//! assert_eq!(answer["ok"], true);
//! assert_eq!(answer["children"].as_array().map(Vec::len), Some(2));
//!
//! // Served on a unix socket (removed again when `server` drops).
//! let dir = tempfile::tempdir()?;
//! let server = iovirt_control::start(&dir.path().join("ctl.sock"), control)?;
//! assert!(server.path().exists());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

mod migrate;
mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use iovirt_filter::migrate::MigrationHandle;
use iovirt_filter::mirror::MirrorHandle;
use iovirt_filter::multipath::MultipathHandle;
use iovirt_filter::redolog::RedoLogHandle;
use iovirt_filter::stack::{NodeControl, Stack};
use iovirt_sched::{ClientId, ClientParams, ClientStats, SharedScheduler};
use serde_json::{json, Map, Value};

pub use server::{serve, start, ControlServer, MAX_CLIENTS, MAX_LINE};

/// The answer body of a command (merged into `{"ok":true,...}`), or the
/// one-line error sent as `{"ok":false,"error":...}`.
pub type Reply = Result<Map<String, Value>, String>;

/// The built-in commands, for `help`.
const COMMANDS: &[&str] = &[
    "help",
    "disks",
    "sched-stats",
    "sched-set",
    "mirror-status",
    "mirror-fail-child",
    "mirror-return-child",
    "mirror-verify",
    "redolog-snapshot",
    "redolog-snapshots",
    "multipath-status",
    "multipath-fail-path",
    "multipath-restore-path",
    "migrate-start",
    "migrate-status",
    "migrate-cancel",
];

/// Commands an embedder adds to the built-in set (e.g. a daemon's own
/// export management). Asked before the built-in commands.
pub trait Commands: Send + Sync {
    /// The command names, listed by `help`.
    fn names(&self) -> Vec<String>;
    /// Answer `cmd` (the request's `"cmd"`), or `None` if it is not one of
    /// these commands. `req` is the whole request object, untrusted.
    fn handle(&self, control: &Control, cmd: &str, req: &Map<String, Value>) -> Option<Reply>;
}

/// One disk as the control interface sees it.
#[derive(Debug)]
pub struct DiskControl {
    name: String,
    has_stack: bool,
    nodes: Vec<(String, NodeControl)>,
    client: Option<ClientId>,
    fields: Map<String, Value>,
    /// Files the disk's stack uses (canonical paths): a migration may not target them.
    files: Mutex<Vec<PathBuf>>,
    /// Per migration node: what it was last told to migrate to.
    migrations: Mutex<HashMap<String, migrate::Target>>,
}

impl DiskControl {
    /// A disk called `name` (requests may address it by name or index) with
    /// no stack, no scheduling client and no extra fields.
    pub fn new(name: impl Into<String>) -> Self {
        DiskControl {
            name: name.into(),
            has_stack: false,
            nodes: Vec::new(),
            client: None,
            fields: Map::new(),
            files: Mutex::new(Vec::new()),
            migrations: Mutex::new(HashMap::new()),
        }
    }

    /// The disk is `stack`: take its nodes' controls and the files it uses.
    pub fn with_stack(mut self, stack: &Stack) -> Self {
        self.has_stack = true;
        self.nodes = stack
            .controls()
            .map(|(p, c)| (p.to_string(), c.clone()))
            .collect();
        self.files = Mutex::new(stack.files().to_vec());
        self
    }

    /// Controllable nodes given directly (path, control), top first.
    pub fn with_nodes(mut self, nodes: impl IntoIterator<Item = (String, NodeControl)>) -> Self {
        self.has_stack = true;
        self.nodes.extend(nodes);
        self
    }

    /// The disk's client in the scheduling stage given to [`Control::new`].
    pub fn with_client(mut self, client: Option<ClientId>) -> Self {
        self.client = client;
        self
    }

    /// A descriptive field shown by `disks` (e.g. `path`, `interface`).
    /// The built-in keys (`index`, `name`, `stack`, `sched`, `nodes`) win.
    pub fn with_field(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The disk's scheduling client, if any.
    pub fn client(&self) -> Option<ClientId> {
        self.client
    }

    /// The controllable nodes, top first.
    pub fn nodes(&self) -> impl Iterator<Item = (&str, &NodeControl)> {
        self.nodes.iter().map(|(p, c)| (p.as_str(), c))
    }
}

/// What the control interface reaches: the disks and the scheduling stage.
pub struct Control {
    disks: RwLock<Vec<Arc<DiskControl>>>,
    sched: Option<Arc<SharedScheduler>>,
    extra: Vec<Arc<dyn Commands>>,
    started: Instant,
    /// Per disk index: the statistics at the last `sched-stats`, and when.
    last: Mutex<HashMap<usize, (Instant, ClientStats)>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("disks", &self.disk_list().len())
            .field("sched", &self.sched.is_some())
            .finish()
    }
}

impl Control {
    /// Control over `disks` (numbered from 0 in this order) and the shared
    /// scheduling stage their clients belong to, if any.
    pub fn new(disks: Vec<DiskControl>, sched: Option<Arc<SharedScheduler>>) -> Self {
        Control {
            disks: RwLock::new(disks.into_iter().map(Arc::new).collect()),
            sched,
            extra: Vec::new(),
            started: Instant::now(),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Add an embedder's commands, asked before the built-in ones.
    pub fn with_commands(mut self, commands: Arc<dyn Commands>) -> Self {
        self.extra.push(commands);
        self
    }

    /// Add a disk while serving (e.g. a new export); returns its index.
    pub fn add_disk(&self, disk: DiskControl) -> usize {
        let mut disks = self.disks.write().unwrap_or_else(|e| e.into_inner());
        disks.push(Arc::new(disk));
        disks.len() - 1
    }

    /// The scheduling stage, if any.
    pub fn scheduler(&self) -> Option<&Arc<SharedScheduler>> {
        self.sched.as_ref()
    }

    fn disk_list(&self) -> Vec<Arc<DiskControl>> {
        self.disks.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Answer one request line (without its newline).
    pub fn handle_line(&self, line: &[u8]) -> Value {
        let req: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                log::info!("control: malformed request: {e}");
                return error_reply(None, format!("malformed JSON: {e}"));
            }
        };
        let Value::Object(req) = req else {
            log::info!("control: a request that is not a JSON object");
            return error_reply(None, "a request is a JSON object".into());
        };
        let id = req.get("id").cloned();
        match self.dispatch(&req) {
            Ok(mut body) => {
                let mut out = Map::new();
                out.insert("ok".into(), Value::Bool(true));
                if let Some(id) = id {
                    out.insert("id".into(), id);
                }
                out.append(&mut body);
                Value::Object(out)
            }
            Err(msg) => {
                let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("?");
                log::info!("control: {:.64}: {msg}", cmd);
                error_reply(id, msg)
            }
        }
    }

    fn dispatch(&self, req: &Map<String, Value>) -> Reply {
        let cmd = match req.get("cmd") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err("\"cmd\" must be a string".into()),
            None => return Err("missing \"cmd\"".into()),
        };
        for e in &self.extra {
            if let Some(reply) = e.handle(self, cmd, req) {
                return reply;
            }
        }
        match cmd {
            "help" => {
                let mut names: Vec<String> = COMMANDS.iter().map(|s| s.to_string()).collect();
                for e in &self.extra {
                    names.extend(e.names());
                }
                Ok(obj(json!({ "commands": names })))
            }
            "disks" => Ok(obj(json!({ "disks": self.list() }))),
            "sched-stats" => self.sched_stats(req),
            "sched-set" => self.sched_set(req),
            "mirror-status" => {
                let (node, m) = self.node(req, "mirror", mirror_of)?;
                Ok(obj(json!({
                    "node": node,
                    "region_size": m.region_size(),
                    "children": to_value(m.status())?,
                    "resync": to_value(m.resync_progress())?,
                })))
            }
            "mirror-fail-child" => {
                let (node, m) = self.node(req, "mirror", mirror_of)?;
                let child = index(req, "child")?;
                m.fail_child(child).map_err(|e| format!("{node}: {e}"))?;
                log::info!("control: {node}: child {child} failed by request");
                Ok(obj(
                    json!({ "node": node, "children": to_value(m.status())? }),
                ))
            }
            "mirror-return-child" => {
                let (node, m) = self.node(req, "mirror", mirror_of)?;
                let child = index(req, "child")?;
                m.return_child(child).map_err(|e| format!("{node}: {e}"))?;
                log::info!("control: {node}: child {child} returned by request");
                Ok(obj(json!({
                    "node": node,
                    "children": to_value(m.status())?,
                    "resync": to_value(m.resync_progress())?,
                })))
            }
            "mirror-verify" => {
                let (node, m) = self.node(req, "mirror", mirror_of)?;
                let mismatches = m.verify().map_err(|e| format!("{node}: {e}"))?;
                Ok(obj(json!({
                    "node": node,
                    "equal": mismatches.is_empty(),
                    "mismatches": to_value(mismatches)?,
                })))
            }
            "redolog-snapshot" => {
                let (node, r) = self.node(req, "redolog", redolog_of)?;
                let name = match req.get("name") {
                    Some(Value::String(s)) if !s.is_empty() => s.as_str(),
                    Some(_) => return Err("\"name\" must be a non-empty string".into()),
                    None => return Err("missing \"name\"".into()),
                };
                let point = r.snapshot(name).map_err(|e| format!("{node}: {e}"))?;
                Ok(obj(
                    json!({ "node": node, "name": name, "point": to_value(point)? }),
                ))
            }
            "redolog-snapshots" => {
                let (node, r) = self.node(req, "redolog", redolog_of)?;
                Ok(obj(json!({
                    "node": node,
                    "current": to_value(r.current())?,
                    "snapshots": to_value(r.snapshots())?,
                    "stats": to_value(r.stats())?,
                })))
            }
            "multipath-status" => {
                let (node, m) = self.node(req, "multipath", multipath_of)?;
                Ok(obj(json!({
                    "node": node,
                    "paths": to_value(m.status())?,
                    "waiting_writes": m.waiting_writes(),
                })))
            }
            "multipath-fail-path" | "multipath-restore-path" => {
                let (node, m) = self.node(req, "multipath", multipath_of)?;
                let path = index(req, "path")?;
                if cmd == "multipath-fail-path" {
                    m.fail_path(path)
                } else {
                    m.restore_path(path)
                }
                .map_err(|e| format!("{node}: {e}"))?;
                Ok(obj(json!({ "node": node, "paths": to_value(m.status())? })))
            }
            "migrate-start" => {
                let (d, node, m) = self.node_of_disk(req, "migrate", migration_of)?;
                migrate::start(&d, &node, &m, req)
            }
            "migrate-status" => {
                let (d, node, m) = self.node_of_disk(req, "migrate", migration_of)?;
                migrate::status(&d, &node, &m)
            }
            "migrate-cancel" => {
                let (d, node, m) = self.node_of_disk(req, "migrate", migration_of)?;
                let p = m.cancel();
                log::info!("control: {node}: migration cancelled by request");
                migrate::answer(&d, &node, &p)
            }
            other => Err(format!(
                "unknown command {:?} (try {{\"cmd\":\"help\"}})",
                truncate(other)
            )),
        }
    }

    fn list(&self) -> Vec<Value> {
        self.disk_list()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let sched = match (&self.sched, d.client) {
                    (Some(s), Some(c)) => s
                        .params(c)
                        .ok()
                        .and_then(|p| serde_json::to_value(p).ok())
                        .unwrap_or(Value::Null),
                    _ => Value::Null,
                };
                let nodes: Vec<Value> = d
                    .nodes()
                    .map(|(path, c)| {
                        let (kind, commands) = kind_of(c);
                        json!({ "path": path, "kind": kind, "commands": commands })
                    })
                    .collect();
                let mut out = d.fields.clone();
                out.insert("index".into(), json!(i));
                out.insert("name".into(), json!(d.name));
                out.insert("stack".into(), json!(d.has_stack));
                out.insert("sched".into(), sched);
                out.insert("nodes".into(), Value::Array(nodes));
                Value::Object(out)
            })
            .collect()
    }

    /// The disk a request names in `"disk"`: its index, or its name.
    pub fn disk(&self, req: &Map<String, Value>) -> Result<(usize, Arc<DiskControl>), String> {
        let disks = self.disk_list();
        match req.get("disk") {
            None => Err("missing \"disk\"".into()),
            Some(Value::String(name)) => {
                let mut hits = disks.iter().enumerate().filter(|(_, d)| &d.name == name);
                match (hits.next(), hits.next()) {
                    (Some((i, d)), None) => Ok((i, d.clone())),
                    (Some(_), Some(_)) => Err(format!(
                        "several disks are called {:?}: give the index",
                        truncate(name)
                    )),
                    (None, _) => Err(format!("no disk called {:?}", truncate(name))),
                }
            }
            Some(v) => {
                let i = v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or("\"disk\" must be a non-negative integer (an index) or a disk name")?;
                disks
                    .get(i)
                    .map(|d| (i, d.clone()))
                    .ok_or_else(|| format!("no disk {i} (there are {})", disks.len()))
            }
        }
    }

    /// The scheduling stage and the client of the disk a request names.
    pub fn client(
        &self,
        req: &Map<String, Value>,
    ) -> Result<(usize, &SharedScheduler, ClientId), String> {
        let (i, d) = self.disk(req)?;
        match (&self.sched, d.client) {
            (Some(s), Some(c)) => Ok((i, s, c)),
            _ => Err(format!("disk {i} has no scheduling stage")),
        }
    }

    /// The node of `kind` named by `"node"`, or the disk's only node of that kind.
    fn node<H: Clone>(
        &self,
        req: &Map<String, Value>,
        kind: &str,
        pick: fn(&NodeControl) -> Option<&H>,
    ) -> Result<(String, H), String> {
        self.node_of_disk(req, kind, pick).map(|(_, n, h)| (n, h))
    }

    fn node_of_disk<H: Clone>(
        &self,
        req: &Map<String, Value>,
        kind: &str,
        pick: fn(&NodeControl) -> Option<&H>,
    ) -> Result<(Arc<DiskControl>, String, H), String> {
        let (i, d) = self.disk(req)?;
        if !d.has_stack {
            return Err(format!("disk {i} is not a filter stack"));
        }
        let found = {
            let mut of_kind = d.nodes().filter_map(|(p, c)| pick(c).map(|h| (p, h)));
            match req.get("node") {
                Some(Value::String(want)) => of_kind
                    .find(|(p, _)| p == want)
                    .map(|(p, h)| (p.to_string(), h.clone()))
                    .ok_or_else(|| format!("disk {i} has no {kind} node {:?}", truncate(want))),
                Some(_) => Err("\"node\" must be a string".into()),
                None => {
                    let all: Vec<(&str, &H)> = of_kind.collect();
                    match all.as_slice() {
                        [(p, h)] => Ok((p.to_string(), (*h).clone())),
                        [] => Err(format!("disk {i} has no {kind} node")),
                        _ => Err(format!(
                            "disk {i} has several {kind} nodes: give \"node\", one of {:?}",
                            all.iter().map(|(p, _)| *p).collect::<Vec<_>>()
                        )),
                    }
                }
            }
        };
        let (node, h) = found?;
        Ok((d, node, h))
    }

    fn sched_stats(&self, req: &Map<String, Value>) -> Reply {
        let (i, s, c) = self.client(req)?;
        let st = s.stats(c).map_err(|e| e.to_string())?;
        let params = s.params(c).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let (since, earlier) = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            match last.insert(i, (now, st.clone())) {
                Some((t, earlier)) => (t, earlier),
                None => (self.started, ClientStats::default()),
            }
        };
        let dt = now.duration_since(since);
        let dt_ns = u64::try_from(dt.as_nanos()).unwrap_or(u64::MAX);
        let total_ns =
            u64::try_from(now.duration_since(self.started).as_nanos()).unwrap_or(u64::MAX);
        let pct = |q: f64| st.latency.percentile(q);
        Ok(obj(json!({
            "disk": i,
            "params": to_value(params)?,
            "queued": st.queued,
            "in_flight": st.in_flight,
            "completed": st.completed,
            "errors": st.errors,
            "bytes": st.bytes,
            "reservation_dispatches": st.reservation_dispatches,
            "interval_s": dt.as_secs_f64(),
            "iops": st.iops_since(&earlier, dt_ns),
            "iops_total": st.iops_since(&ClientStats::default(), total_ns),
            "latency_ns": {
                "samples": st.latency.count(),
                "p50": pct(0.5),
                "p99": pct(0.99),
                "p99.9": pct(0.999),
                "max": st.latency.max(),
            },
        })))
    }

    fn sched_set(&self, req: &Map<String, Value>) -> Reply {
        let (i, s, c) = self.client(req)?;
        let mut p = s.params(c).map_err(|e| e.to_string())?;
        if let Some(v) = req.get("reservation") {
            p.reservation = number(v, "reservation")?;
        }
        if let Some(v) = req.get("limit") {
            p.limit = match v {
                Value::Null => None,
                v => Some(number(v, "limit")?),
            };
        }
        if let Some(v) = req.get("weight") {
            p.weight = number(v, "weight")?;
        }
        let p = ClientParams::new(p.reservation, p.limit, p.weight).map_err(|e| e.to_string())?;
        s.set_params(c, p).map_err(|e| e.to_string())?;
        log::info!(
            "control: disk {i} scheduling set to reservation {}, limit {:?}, weight {}",
            p.reservation,
            p.limit,
            p.weight
        );
        Ok(obj(json!({ "disk": i, "params": to_value(p)? })))
    }
}

/// A node's kind and the commands that drive it, for `disks`.
fn kind_of(c: &NodeControl) -> (&'static str, &'static [&'static str]) {
    match c {
        NodeControl::Mirror(_) => (
            "mirror",
            &[
                "mirror-status",
                "mirror-fail-child",
                "mirror-return-child",
                "mirror-verify",
            ],
        ),
        NodeControl::RedoLog(_) => ("redolog", &["redolog-snapshot", "redolog-snapshots"]),
        NodeControl::Multipath(_) => (
            "multipath",
            &[
                "multipath-status",
                "multipath-fail-path",
                "multipath-restore-path",
            ],
        ),
        NodeControl::Migration(_) => (
            "migrate",
            &["migrate-start", "migrate-status", "migrate-cancel"],
        ),
    }
}

fn mirror_of(c: &NodeControl) -> Option<&MirrorHandle> {
    match c {
        NodeControl::Mirror(h) => Some(h),
        _ => None,
    }
}

fn redolog_of(c: &NodeControl) -> Option<&RedoLogHandle> {
    match c {
        NodeControl::RedoLog(h) => Some(h),
        _ => None,
    }
}

fn multipath_of(c: &NodeControl) -> Option<&MultipathHandle> {
    match c {
        NodeControl::Multipath(h) => Some(h),
        _ => None,
    }
}

fn migration_of(c: &NodeControl) -> Option<&MigrationHandle> {
    match c {
        NodeControl::Migration(h) => Some(h),
        _ => None,
    }
}

/// A JSON object's map (an empty one for anything else).
pub fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Encode an answer field.
pub fn to_value<T: serde::Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode the answer: {e}"))
}

/// `{"ok":false,"error":msg}`, with the request's `id` if it had one.
pub fn error_reply(id: Option<Value>, msg: String) -> Value {
    let mut out = Map::new();
    out.insert("ok".into(), Value::Bool(false));
    if let Some(id) = id {
        out.insert("id".into(), id);
    }
    out.insert("error".into(), Value::String(msg));
    Value::Object(out)
}

/// A required non-negative integer field of a request.
pub fn index(req: &Map<String, Value>, key: &str) -> Result<usize, String> {
    match req.get(key) {
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("\"{key}\" must be a non-negative integer")),
        None => Err(format!("missing \"{key}\"")),
    }
}

fn number(v: &Value, key: &str) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("\"{key}\" must be a number"))
}

/// A client's string cut to a length fit for a one-line error.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// `path` made absolute and free of symlinks where it exists (its directory
/// where only that exists), for comparing files.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .map(|d| d.join(name))
        .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests;
