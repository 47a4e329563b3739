//! The run-time control interface (`--control PATH`): JSON lines on a unix
//! socket. Each request is one JSON object on one line; each answer is one
//! JSON object on one line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! The protocol and its commands are in docs/CONTROL.md.
//!
//! Input is untrusted: malformed JSON, unknown commands, wrong types and lines
//! longer than [`MAX_LINE`] get an error answer and the connection goes on.
//! Each client has its own thread, at most [`MAX_CLIENTS`] at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use iovirt_filter::mirror::MirrorHandle;
use iovirt_filter::multipath::MultipathHandle;
use iovirt_filter::redolog::RedoLogHandle;
use iovirt_filter::stack::NodeControl;
use iovirt_sched::{ClientId, ClientParams, ClientStats, SharedScheduler};
use serde_json::{json, Map, Value};

use crate::cli::DiskInterface;
use crate::disks::DiskEntry;

/// Longest request line accepted, in bytes (newline excluded).
pub const MAX_LINE: usize = 64 * 1024;
/// Most clients connected at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;

/// The commands, for `help`.
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
];

type Reply = Result<Map<String, Value>, String>;

/// What the control interface reaches: the disks and the scheduling stage.
pub struct Control {
    disks: Vec<DiskEntry>,
    sched: Option<Arc<SharedScheduler>>,
    started: Instant,
    /// Per disk: the statistics at the last `sched-stats`, and when.
    last: Mutex<Vec<Option<(Instant, ClientStats)>>>,
}

impl Control {
    /// Control over `disks` (in command-line order) and the shared stage, if any.
    pub fn new(disks: Vec<DiskEntry>, sched: Option<Arc<SharedScheduler>>) -> Self {
        let last = Mutex::new(disks.iter().map(|_| None).collect());
        Control {
            disks,
            sched,
            started: Instant::now(),
            last,
        }
    }

    /// Answer one request line (without its newline).
    pub fn handle_line(&self, line: &[u8]) -> Value {
        let req: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return error_reply(None, format!("malformed JSON: {e}")),
        };
        let Value::Object(req) = req else {
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
            Err(msg) => error_reply(id, msg),
        }
    }

    fn dispatch(&self, req: &Map<String, Value>) -> Reply {
        let cmd = match req.get("cmd") {
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err("\"cmd\" must be a string".into()),
            None => return Err("missing \"cmd\"".into()),
        };
        match cmd {
            "help" => Ok(obj(json!({ "commands": COMMANDS }))),
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
                Ok(obj(
                    json!({ "node": node, "children": to_value(m.status())? }),
                ))
            }
            "mirror-return-child" => {
                let (node, m) = self.node(req, "mirror", mirror_of)?;
                let child = index(req, "child")?;
                m.return_child(child).map_err(|e| format!("{node}: {e}"))?;
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
            other => Err(format!(
                "unknown command {other:?} (try {{\"cmd\":\"help\"}})"
            )),
        }
    }

    fn list(&self) -> Vec<Value> {
        self.disks
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
                    .stack
                    .iter()
                    .flat_map(|s| s.controls())
                    .map(|(path, c)| {
                        let (kind, commands): (&str, &[&str]) = match c {
                            NodeControl::Mirror(_) => (
                                "mirror",
                                &[
                                    "mirror-status",
                                    "mirror-fail-child",
                                    "mirror-return-child",
                                    "mirror-verify",
                                ],
                            ),
                            NodeControl::RedoLog(_) => {
                                ("redolog", &["redolog-snapshot", "redolog-snapshots"])
                            }
                            NodeControl::Multipath(_) => (
                                "multipath",
                                &[
                                    "multipath-status",
                                    "multipath-fail-path",
                                    "multipath-restore-path",
                                ],
                            ),
                        };
                        json!({ "path": path, "kind": kind, "commands": commands })
                    })
                    .collect();
                json!({
                    "index": i,
                    "path": d.path.display().to_string(),
                    "interface": match d.interface {
                        DiskInterface::Virtio => "virtio",
                        DiskInterface::Ide => "ide",
                    },
                    "stack": d.stack.is_some(),
                    "sched": sched,
                    "nodes": nodes,
                })
            })
            .collect()
    }

    fn disk(&self, req: &Map<String, Value>) -> Result<(usize, &DiskEntry), String> {
        let i = index(req, "disk")?;
        self.disks
            .get(i)
            .map(|d| (i, d))
            .ok_or_else(|| format!("no disk {i} (there are {})", self.disks.len()))
    }

    fn client(
        &self,
        req: &Map<String, Value>,
    ) -> Result<(usize, &SharedScheduler, ClientId), String> {
        let (i, d) = self.disk(req)?;
        match (&self.sched, d.client) {
            (Some(s), Some(c)) => Ok((i, s, c)),
            _ => Err("no scheduling stage: give any --disk reservation=, limit= or weight=".into()),
        }
    }

    /// The node of `kind` named by `"node"`, or the disk's only node of that kind.
    fn node<'a, H>(
        &'a self,
        req: &Map<String, Value>,
        kind: &str,
        pick: fn(&'a NodeControl) -> Option<&'a H>,
    ) -> Result<(&'a str, &'a H), String> {
        let (i, d) = self.disk(req)?;
        let stack = d
            .stack
            .as_ref()
            .ok_or_else(|| format!("disk {i} is not a filter stack"))?;
        let mut of_kind = stack
            .controls()
            .filter_map(|(p, c)| pick(c).map(|h| (p, h)));
        match req.get("node") {
            Some(Value::String(want)) => of_kind
                .find(|(p, _)| p == want)
                .ok_or_else(|| format!("disk {i} has no {kind} node {want:?}")),
            Some(_) => Err("\"node\" must be a string".into()),
            None => {
                let all: Vec<(&str, &H)> = of_kind.collect();
                match all.as_slice() {
                    [one] => Ok(*one),
                    [] => Err(format!("disk {i} has no {kind} node")),
                    _ => Err(format!(
                        "disk {i} has several {kind} nodes: give \"node\", one of {:?}",
                        all.iter().map(|(p, _)| *p).collect::<Vec<_>>()
                    )),
                }
            }
        }
    }

    fn sched_stats(&self, req: &Map<String, Value>) -> Reply {
        let (i, s, c) = self.client(req)?;
        let st = s.stats(c).map_err(|e| e.to_string())?;
        let params = s.params(c).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let (since, earlier) = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let prev = last
                .get_mut(i)
                .and_then(|slot| slot.replace((now, st.clone())));
            match prev {
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

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("cannot encode the answer: {e}"))
}

fn error_reply(id: Option<Value>, msg: String) -> Value {
    let mut out = Map::new();
    out.insert("ok".into(), Value::Bool(false));
    if let Some(id) = id {
        out.insert("id".into(), id);
    }
    out.insert("error".into(), Value::String(msg));
    Value::Object(out)
}

/// A non-negative integer field.
fn index(req: &Map<String, Value>, key: &str) -> Result<usize, String> {
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

/// Serve one client until it hangs up.
pub fn serve(control: &Control, stream: UnixStream) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = MAX_LINE as u64 + 1;
        match (&mut reader).take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
            // Too long: answer once, then drop the rest of the line.
            loop {
                line.clear();
                match (&mut reader).take(limit).read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.last() == Some(&b'\n') => break,
                    Ok(_) => {}
                }
            }
            error_reply(None, format!("line longer than {MAX_LINE} bytes"))
        } else {
            let text = line.trim_ascii();
            if text.is_empty() {
                continue;
            }
            control.handle_line(text)
        };
        let mut out = answer.to_string().into_bytes();
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

/// The listening socket; the socket file is removed on drop.
pub struct ControlServer {
    path: PathBuf,
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listen on `path` (a stale socket there is replaced; any other file is an
/// error) and serve clients from a thread, each client on its own thread.
pub fn start(path: &Path, control: Arc<Control>) -> std::io::Result<ControlServer> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let server = ControlServer {
        path: path.to_path_buf(),
    };
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    let msg = error_reply(None, format!("more than {MAX_CLIENTS} clients"));
                    let _ = stream.write_all(format!("{msg}\n").as_bytes());
                    continue;
                }
                let control = control.clone();
                let active2 = active.clone();
                let spawned = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || {
                        serve(&control, stream);
                        active2.fetch_sub(1, Ordering::SeqCst);
                    });
                if let Err(e) = spawned {
                    active.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("control: cannot start a client thread: {e}");
                }
            }
        })?;
    log::info!("control socket at {}", path.display());
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_filter::stack::StackSpec;
    use iovirt_sched::{ManualClock, StageConfig};

    const STACK: &str = r#"
[vda]
filter = "redolog"
log = "vda.redo"

[vda.child]
filter = "mirror"

[[vda.child.children]]
backend = "memory"
size = "1M"

[[vda.child.children]]
backend = "memory"
size = "1M"
"#;

    struct Fixture {
        control: Control,
        dir: PathBuf,
        // What the guest's device would hold: the client lives as long as its stage.
        _stage: iovirt_sched::SchedStage,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(tag: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("iovirt-vmm-control-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stack = StackSpec::from_toml_str_in(STACK, &dir)
            .unwrap()
            .build_stack()
            .unwrap();
        let sched = Arc::new(SharedScheduler::new(
            StageConfig::default(),
            Arc::new(ManualClock::default()),
        ));
        let params = ClientParams::new(10.0, Some(100.0), 2.0).unwrap();
        let stage = sched.add_client(params, stack.backend.clone());
        let entry = DiskEntry {
            path: dir.join("vda.toml"),
            interface: DiskInterface::Virtio,
            client: Some(stage.client()),
            stack: Some(stack),
        };
        Fixture {
            control: Control::new(vec![entry], Some(sched)),
            dir,
            _stage: stage,
        }
    }

    fn ask(c: &Control, line: &str) -> Value {
        c.handle_line(line.as_bytes())
    }

    fn ok(c: &Control, line: &str) -> Value {
        let v = ask(c, line);
        assert_eq!(v["ok"], true, "{line} -> {v}");
        v
    }

    fn err(c: &Control, line: &str) -> String {
        let v = ask(c, line);
        assert_eq!(v["ok"], false, "{line} -> {v}");
        v["error"].as_str().unwrap().to_string()
    }

    #[test]
    fn disks_lists_nodes_and_params() {
        let f = fixture("disks");
        let v = ok(&f.control, r#"{"cmd":"disks","id":7}"#);
        assert_eq!(v["id"], 7);
        let d = &v["disks"][0];
        assert_eq!(d["index"], 0);
        assert_eq!(d["interface"], "virtio");
        assert_eq!(d["sched"]["weight"], 2.0);
        assert_eq!(d["nodes"][0]["path"], "vda");
        assert_eq!(d["nodes"][0]["kind"], "redolog");
        assert_eq!(d["nodes"][1]["path"], "vda.child");
        assert_eq!(d["nodes"][1]["kind"], "mirror");
    }

    #[test]
    fn sched_set_and_stats() {
        let f = fixture("sched");
        let c = &f.control;
        let v = ok(c, r#"{"cmd":"sched-stats","disk":0}"#);
        assert_eq!(v["completed"], 0);
        assert_eq!(v["latency_ns"]["p50"], Value::Null);
        let v = ok(c, r#"{"cmd":"sched-set","disk":0,"limit":null,"weight":5}"#);
        assert_eq!(v["params"]["limit"], Value::Null);
        assert_eq!(v["params"]["weight"], 5.0);
        assert_eq!(v["params"]["reservation"], 10.0);
        let v = ok(c, r#"{"cmd":"sched-stats","disk":0}"#);
        assert_eq!(v["params"]["weight"], 5.0);
        assert!(err(c, r#"{"cmd":"sched-set","disk":0,"weight":0}"#).contains("weight"));
        assert!(err(c, r#"{"cmd":"sched-set","disk":0,"limit":"x"}"#).contains("limit"));
        assert!(
            err(
                c,
                r#"{"cmd":"sched-set","disk":0,"reservation":50,"limit":20}"#
            )
            .len()
                > 3
        );
        assert!(err(c, r#"{"cmd":"sched-stats","disk":3}"#).contains("no disk 3"));
        assert!(err(c, r#"{"cmd":"sched-stats","disk":-1}"#).contains("non-negative"));
    }

    #[test]
    fn mirror_and_redolog_controls() {
        let f = fixture("mirror");
        let c = &f.control;
        let v = ok(c, r#"{"cmd":"mirror-status","disk":0}"#);
        assert_eq!(v["node"], "vda.child");
        assert_eq!(v["children"].as_array().unwrap().len(), 2);
        ok(c, r#"{"cmd":"mirror-fail-child","disk":0,"child":1}"#);
        assert!(err(c, r#"{"cmd":"mirror-fail-child","disk":0,"child":9}"#).contains("vda.child"));
        ok(
            c,
            r#"{"cmd":"mirror-return-child","disk":0,"node":"vda.child","child":1}"#,
        );
        let v = ok(c, r#"{"cmd":"mirror-verify","disk":0}"#);
        assert_eq!(v["equal"], true);
        let v = ok(c, r#"{"cmd":"redolog-snapshot","disk":0,"name":"before"}"#);
        assert_eq!(v["node"], "vda");
        let v = ok(c, r#"{"cmd":"redolog-snapshots","disk":0}"#);
        assert_eq!(v["snapshots"][0]["name"], "before");
        assert!(err(c, r#"{"cmd":"redolog-snapshot","disk":0}"#).contains("name"));
        assert!(err(c, r#"{"cmd":"mirror-status","disk":0,"node":"vda"}"#).contains("no mirror"));
        assert!(err(c, r#"{"cmd":"multipath-status","disk":0}"#).contains("no multipath"));
    }

    #[test]
    fn malformed_requests_get_errors() {
        let f = fixture("malformed");
        let c = &f.control;
        assert!(err(c, "not json").contains("malformed"));
        assert!(err(c, "[1,2]").contains("object"));
        assert!(err(c, "{}").contains("cmd"));
        assert!(err(c, r#"{"cmd":5}"#).contains("string"));
        assert!(err(c, r#"{"cmd":"launch"}"#).contains("unknown"));
        let v = c.handle_line(&[0xff, 0xfe, b'{', b'}']);
        assert_eq!(v["ok"], false);
        let deep = "[".repeat(10_000);
        assert!(err(c, &deep).contains("malformed"));
        let v = ask(c, r#"{"cmd":"nope","id":"x"}"#);
        assert_eq!(v["id"], "x");
    }

    #[test]
    fn serve_answers_line_by_line() {
        let f = fixture("serve");
        let (mut client, server) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| serve(&f.control, server));
            let long = "x".repeat(MAX_LINE + 10);
            let input = format!(
                "{{\"cmd\":\"help\"}}\n\n\u{fffd}garbage\n{long}\n{{\"cmd\":\"disks\"}}\r\n"
            );
            client.write_all(input.as_bytes()).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = String::new();
            client.read_to_string(&mut out).unwrap();
            let answers: Vec<Value> = out
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(answers.len(), 4, "{out}");
            assert_eq!(answers[0]["ok"], true);
            assert_eq!(answers[1]["ok"], false);
            assert!(answers[2]["error"].as_str().unwrap().contains("longer"));
            assert_eq!(answers[3]["disks"][0]["index"], 0);
        });
    }
}
