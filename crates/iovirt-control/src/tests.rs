use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;
use iovirt_backend::{submit_wait, IoBuffers, Request};
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
    dir: tempfile::TempDir,
    // What the guest's device would hold: the client lives as long as its stage.
    _stage: iovirt_sched::SchedStage,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let stack = StackSpec::from_toml_str_in(STACK, dir.path())
        .unwrap()
        .build_stack()
        .unwrap();
    let sched = Arc::new(SharedScheduler::new(
        StageConfig::default(),
        Arc::new(ManualClock::default()),
    ));
    let params = ClientParams::new(10.0, Some(100.0), 2.0).unwrap();
    let stage = sched.add_client(params, stack.backend.clone());
    let entry = DiskControl::new("vda")
        .with_stack(&stack)
        .with_client(Some(stage.client()))
        .with_field("path", dir.path().join("vda.toml").display().to_string())
        .with_field("interface", "virtio");
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
    let f = fixture();
    let v = ok(&f.control, r#"{"cmd":"disks","id":7}"#);
    assert_eq!(v["id"], 7);
    let d = &v["disks"][0];
    assert_eq!(d["index"], 0);
    assert_eq!(d["name"], "vda");
    assert_eq!(d["interface"], "virtio");
    assert_eq!(d["stack"], true);
    assert_eq!(d["sched"]["weight"], 2.0);
    assert_eq!(d["nodes"][0]["path"], "vda");
    assert_eq!(d["nodes"][0]["kind"], "redolog");
    assert_eq!(d["nodes"][1]["path"], "vda.child");
    assert_eq!(d["nodes"][1]["kind"], "mirror");
}

#[test]
fn disks_by_name_and_added_disks() {
    let f = fixture();
    let c = &f.control;
    assert_eq!(
        ok(c, r#"{"cmd":"mirror-status","disk":"vda"}"#)["node"],
        "vda.child"
    );
    assert!(err(c, r#"{"cmd":"mirror-status","disk":"vdz"}"#).contains("no disk called"));
    assert_eq!(c.add_disk(DiskControl::new("plain")), 1);
    let v = ok(c, r#"{"cmd":"disks"}"#);
    assert_eq!(v["disks"][1]["name"], "plain");
    assert_eq!(v["disks"][1]["stack"], false);
    assert_eq!(v["disks"][1]["sched"], Value::Null);
    assert!(err(c, r#"{"cmd":"mirror-status","disk":1}"#).contains("not a filter stack"));
    assert!(err(c, r#"{"cmd":"sched-stats","disk":1}"#).contains("no scheduling"));
    c.add_disk(DiskControl::new("plain"));
    assert!(err(c, r#"{"cmd":"sched-stats","disk":"plain"}"#).contains("several"));
}

#[test]
fn sched_set_and_stats() {
    let f = fixture();
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
    assert!(err(c, r#"{"cmd":"sched-stats"}"#).contains("missing \"disk\""));
}

#[test]
fn mirror_and_redolog_controls() {
    let f = fixture();
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
    assert!(err(c, r#"{"cmd":"migrate-status","disk":0}"#).contains("no migrate"));
}

#[test]
fn malformed_requests_get_errors() {
    let f = fixture();
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
    let long = format!(r#"{{"cmd":"{}"}}"#, "y".repeat(5000));
    assert!(err(c, &long).len() < 200);
    assert!(err(c, r#"{"cmd":"mirror-status","disk":0,"node":7}"#).contains("string"));
    assert!(err(c, r#"{"cmd":"mirror-status","disk":[0]}"#).contains("disk"));
}

#[test]
fn serve_answers_line_by_line() {
    let f = fixture();
    let (mut client, server) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| serve(&f.control, server));
        let long = "x".repeat(MAX_LINE + 10);
        let input =
            format!("{{\"cmd\":\"help\"}}\n\n\u{fffd}garbage\n{long}\n{{\"cmd\":\"disks\"}}\r\n");
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
    drop(f.dir);
}

#[test]
fn start_serves_on_a_socket() {
    let f = fixture();
    let path = f.dir.path().join("ctl.sock");
    let server = start(&path, Arc::new(f.control)).unwrap();
    // A second server on a live socket is refused; a regular file is never replaced.
    let again = Control::new(Vec::new(), None);
    assert!(start(&path, Arc::new(again)).is_err());
    let file = f.dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(start(&file, Arc::new(Control::new(Vec::new(), None))).is_err());
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"{\"cmd\":\"help\",\"id\":1}\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let v: Value = serde_json::from_slice(buf[..n].trim_ascii()).unwrap();
    assert_eq!(v["id"], 1);
    assert!(v["commands"]
        .as_array()
        .unwrap()
        .contains(&json!("migrate-start")));
    drop(server);
    assert!(!path.exists());
}

struct Extra;

impl Commands for Extra {
    fn names(&self) -> Vec<String> {
        vec!["export-count".into()]
    }
    fn handle(&self, control: &Control, cmd: &str, _req: &Map<String, Value>) -> Option<Reply> {
        (cmd == "export-count").then(|| Ok(obj(json!({ "count": control.disk_list().len() }))))
    }
}

#[test]
fn embedder_commands() {
    let c = Control::new(vec![DiskControl::new("a")], None).with_commands(Arc::new(Extra));
    assert_eq!(ok(&c, r#"{"cmd":"export-count"}"#)["count"], 1);
    let help = ok(&c, r#"{"cmd":"help"}"#);
    assert!(help["commands"]
        .as_array()
        .unwrap()
        .contains(&json!("export-count")));
    assert!(err(&c, r#"{"cmd":"export-counts"}"#).contains("unknown"));
}

// ---- migration ----

/// A disk `vdm` = migrate over a 1 MiB raw file filled with 0x5a.
fn migrating(dir: &Path, extra: &str) -> (Control, Stack) {
    std::fs::write(dir.join("src.img"), vec![0x5a; 1 << 20]).unwrap();
    let toml = format!(
        "[vdm]\nfilter = \"migrate\"\nchunk-size = \"64K\"\nconverge-bytes = \"128K\"\n{extra}\n\
         [vdm.child]\nbackend = \"file\"\npath = \"src.img\"\ncache = \"writeback\"\n"
    );
    let stack = StackSpec::from_toml_str_in(&toml, dir)
        .unwrap()
        .build_stack()
        .unwrap();
    let c = Control::new(vec![DiskControl::new("vdm").with_stack(&stack)], None);
    (c, stack)
}

fn wait_final(c: &Control) -> Value {
    for _ in 0..500 {
        let v = ok(c, r#"{"cmd":"migrate-status","disk":0}"#);
        if v["state"] != "copying" && v["state"] != "switching" {
            return v;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("migration did not end in 5 s");
}

fn req(cmd: &str, fields: Value) -> String {
    let mut m = obj(fields);
    m.insert("cmd".into(), json!(cmd));
    m.insert("disk".into(), json!(0));
    Value::Object(m).to_string()
}

#[test]
fn migrate_to_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let (c, stack) = migrating(dir.path(), "");
    let v = ok(&c, r#"{"cmd":"migrate-status","disk":0}"#);
    assert_eq!(v["state"], "idle");
    assert_eq!(v["node"], "vdm");
    assert_eq!(v["target"], Value::Null);
    let d = ok(&c, r#"{"cmd":"disks"}"#);
    assert_eq!(d["disks"][0]["nodes"][0]["kind"], "migrate");

    let dst = dir.path().join("dst.img");
    let v = ok(
        &c,
        &req(
            "migrate-start",
            json!({ "path": dst.to_str().unwrap(), "cache": "writeback" }),
        ),
    );
    assert_eq!(v["target"]["path"], dst.to_str().unwrap());
    assert_eq!(v["target"]["cache"], "writeback");
    assert_eq!(v["total_bytes"], 1 << 20);
    let v = wait_final(&c);
    assert_eq!(v["state"], "switched", "{v}");
    assert!(v["copied_bytes"].as_u64().unwrap() >= 1 << 20);
    assert!(v["pause_us"].is_u64());
    assert_eq!(v["pass"].as_u64().map(|p| p >= 1), Some(true));
    // Writes now reach the target only.
    let w = Request::Write {
        offset: 0,
        buf: IoBuffers::from_vec(vec![1; 4096]),
        fua: true,
    };
    submit_wait(&stack.backend, w).unwrap();
    let data = std::fs::read(&dst).unwrap();
    assert_eq!(data.len(), 1 << 20);
    assert_eq!(&data[..4096], &[1; 4096][..]);
    assert!(data[4096..].iter().all(|&b| b == 0x5a));
    assert_eq!(std::fs::read(dir.path().join("src.img")).unwrap()[0], 0x5a);

    // The new back-end's file, and the old one, cannot be targets now.
    let e = err(
        &c,
        &req("migrate-start", json!({ "path": dst.to_str().unwrap() })),
    );
    assert!(e.contains("in use"), "{e}");
    let src = dir.path().join("src.img");
    let e = err(
        &c,
        &req("migrate-start", json!({ "path": src.to_str().unwrap() })),
    );
    assert!(e.contains("in use"), "{e}");
    // Onwards to a stack target.
    std::fs::write(
        dir.path().join("next.toml"),
        "[next]\nbackend = \"file\"\npath = \"next.img\"\ncache = \"writeback\"\n",
    )
    .unwrap();
    std::fs::File::create(dir.path().join("next.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let next = dir.path().join("next.toml");
    let v = ok(
        &c,
        &req("migrate-start", json!({ "stack": next.to_str().unwrap() })),
    );
    assert_eq!(v["target"]["stack"], next.to_str().unwrap());
    assert_eq!(wait_final(&c)["state"], "switched");
    assert_eq!(
        &std::fs::read(dir.path().join("next.img")).unwrap()[..4096],
        &[1; 4096][..]
    );
}

#[test]
fn migrate_start_refuses_bad_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (c, _stack) = migrating(dir.path(), "max-rate = \"64K\"");
    let p = |name: &str| dir.path().join(name).display().to_string();
    let e = err(&c, &req("migrate-start", json!({})));
    assert!(e.contains("missing the target"), "{e}");
    let e = err(&c, &req("migrate-start", json!({ "path": "rel.img" })));
    assert!(e.contains("absolute"), "{e}");
    let e = err(&c, &req("migrate-start", json!({ "path": 5 })));
    assert!(e.contains("string"), "{e}");
    let e = err(
        &c,
        &req(
            "migrate-start",
            json!({ "path": p("a.img"), "stack": p("a.toml") }),
        ),
    );
    assert!(e.contains("not both"), "{e}");
    let e = err(
        &c,
        &req(
            "migrate-start",
            json!({ "path": p("a.img"), "cache": "fast" }),
        ),
    );
    assert!(e.contains("cache"), "{e}");
    assert!(!dir.path().join("a.img").exists());
    // The source itself.
    let e = err(&c, &req("migrate-start", json!({ "path": p("src.img") })));
    assert!(e.contains("in use"), "{e}");
    // An existing file of another size is left alone.
    std::fs::write(dir.path().join("small.img"), vec![9; 4096]).unwrap();
    let e = err(&c, &req("migrate-start", json!({ "path": p("small.img") })));
    assert!(e.contains("4096 bytes"), "{e}");
    assert_eq!(
        std::fs::read(dir.path().join("small.img")).unwrap(),
        vec![9; 4096]
    );
    // A directory.
    let e = err(&c, &req("migrate-start", json!({ "path": p("") })));
    assert!(e.contains("neither"), "{e}");
    // A missing stack, and one of the wrong size.
    let e = err(
        &c,
        &req("migrate-start", json!({ "stack": p("none.toml") })),
    );
    assert!(e.contains("none.toml"), "{e}");
    std::fs::write(
        dir.path().join("big.toml"),
        "[big]\nbackend = \"memory\"\nsize = \"2M\"\n",
    )
    .unwrap();
    let e = err(&c, &req("migrate-start", json!({ "stack": p("big.toml") })));
    assert!(e.contains("capacity"), "{e}");
    // A target with a volatile cache when the source (writeback) has one is fine;
    // a slow copy (max-rate 64K/s) can be watched and cancelled.
    let v = ok(&c, &req("migrate-start", json!({ "path": p("slow.img") })));
    assert_eq!(v["state"], "copying");
    let e = err(&c, &req("migrate-start", json!({ "path": p("other.img") })));
    assert!(e.contains("already running"), "{e}");
    assert!(!dir.path().join("other.img").exists());
    let v = ok(&c, &req("migrate-status", json!({})));
    assert_eq!(v["target"]["path"], p("slow.img"));
    assert!(v["remaining_bytes"].as_u64().unwrap() > 0);
    let v = ok(&c, &req("migrate-cancel", json!({})));
    assert_eq!(v["state"], "cancelled");
    // After a cancel the same file may be targeted again.
    let v = ok(&c, &req("migrate-start", json!({ "path": p("slow.img") })));
    assert_eq!(v["state"], "copying");
    ok(&c, &req("migrate-cancel", json!({})));
}
