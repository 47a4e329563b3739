// Real client: a unix-socket client speaking the JSON-lines control protocol (docs/CONTROL.md)
// to a running iovirt-vmm whose firmware is a stub that halts with interrupts off.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{kvm_available, skip, TempDir, Vmm};
use serde_json::Value;

/// A 128 KiB firmware image whose reset vector runs `cli; hlt; jmp $-3` forever.
fn halting_firmware(dir: &TempDir) -> String {
    let mut image = vec![0xf4u8; 128 << 10];
    let at = image.len() - 16;
    image[at..at + 4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    let p = dir.path("fw.bin");
    std::fs::write(&p, image).unwrap();
    p.to_string_lossy().into_owned()
}

const STACK: &str = r#"
[vdb]
filter = "redolog"
log = "vdb.redo"

[vdb.child]
filter = "mirror"

[[vdb.child.children]]
backend = "memory"
size = "1M"

[[vdb.child.children]]
backend = "memory"
size = "1M"
"#;

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(vmm: &mut Vmm, path: &Path) -> Client {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return Client {
                    reader: BufReader::new(s.try_clone().unwrap()),
                    writer: s,
                };
            }
            if let Ok(Some(status)) = vmm.child.try_wait() {
                panic!("iovirt-vmm exited ({status}) before its control socket appeared");
            }
            assert!(Instant::now() < deadline, "no control socket within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send one raw line, read one answer.
    fn raw(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        self.reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }

    fn ok(&mut self, line: &str) -> Value {
        let v = self.raw(line);
        assert_eq!(v["ok"], true, "{line} -> {v}");
        v
    }

    fn err(&mut self, line: &str) -> String {
        let v = self.raw(line);
        assert_eq!(v["ok"], false, "{line} -> {v}");
        v["error"].as_str().unwrap().to_string()
    }
}

#[test]
fn control_socket_drives_scheduling_and_stack_filters() {
    if !kvm_available() {
        return skip("control_socket", "/dev/kvm is missing or not accessible");
    }
    let dir = TempDir::new("control");
    let fw = halting_firmware(&dir);
    let img = dir.path("vda.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let stack = dir.path("vdb.toml");
    std::fs::write(&stack, STACK).unwrap();
    let sock = dir.path("control.sock");
    let vda = format!(
        "path={},cache=writeback,reservation=10,limit=100,weight=2",
        img.display()
    );
    let vdb = format!("stack={}", stack.display());
    let mut vmm = Vmm::spawn(&[
        "--firmware",
        &fw,
        "--serial",
        "null",
        "--mem",
        "64M",
        "--disk",
        &vda,
        "--disk",
        &vdb,
        "--control",
        sock.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&mut vmm, &sock);

    // The disks, their scheduling and their stack nodes.
    let v = c.ok(r#"{"cmd":"disks","id":1}"#);
    assert_eq!(v["id"], 1);
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["stack"], false);
    assert_eq!(disks[0]["sched"]["reservation"], 10.0);
    assert_eq!(disks[0]["sched"]["limit"], 100.0);
    assert_eq!(disks[0]["sched"]["weight"], 2.0);
    assert_eq!(disks[1]["stack"], true);
    assert_eq!(disks[1]["sched"]["weight"], 1.0);
    let nodes: Vec<(&str, &str)> = disks[1]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["path"].as_str().unwrap(), n["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(nodes, [("vdb", "redolog"), ("vdb.child", "mirror")]);

    // Scheduling: statistics, then new parameters.
    let v = c.ok(r#"{"cmd":"sched-stats","disk":0}"#);
    assert_eq!(v["in_flight"], 0);
    assert!(v["iops"].is_number() && v["latency_ns"].is_object(), "{v}");
    let v = c.ok(r#"{"cmd":"sched-set","disk":0,"reservation":20,"limit":null,"weight":4}"#);
    assert_eq!(v["params"]["limit"], Value::Null);
    let v = c.ok(r#"{"cmd":"disks"}"#);
    assert_eq!(v["disks"][0]["sched"]["reservation"], 20.0);
    assert_eq!(v["disks"][0]["sched"]["weight"], 4.0);
    assert!(c
        .err(r#"{"cmd":"sched-set","disk":0,"weight":-1}"#)
        .contains("weight"));

    // A second client at the same time.
    let mut c2 = Client::connect(&mut vmm, &sock);
    c2.ok(r#"{"cmd":"help"}"#);

    // The mirror: fail a child, return it, verify.
    let v = c.ok(r#"{"cmd":"mirror-fail-child","disk":1,"child":0}"#);
    assert_eq!(v["node"], "vdb.child");
    assert_ne!(v["children"][0]["state"], v["children"][1]["state"], "{v}");
    c2.ok(r#"{"cmd":"mirror-status","disk":1,"node":"vdb.child"}"#);
    c.ok(r#"{"cmd":"mirror-return-child","disk":1,"child":0}"#);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = c.ok(r#"{"cmd":"mirror-status","disk":1}"#);
        if v["children"][0]["state"] == v["children"][1]["state"] {
            break;
        }
        assert!(Instant::now() < deadline, "child 0 not back: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.ok(r#"{"cmd":"mirror-verify","disk":1}"#)["equal"], true);

    // The redo log: a snapshot, then the list.
    c.ok(r#"{"cmd":"redolog-snapshot","disk":1,"name":"boot"}"#);
    let v = c2.ok(r#"{"cmd":"redolog-snapshots","disk":1}"#);
    assert_eq!(v["snapshots"][0]["name"], "boot");

    // Malformed and wrong requests: an error each, the connection goes on.
    assert!(c.err("hello").contains("malformed"));
    assert!(c.err(r#"{"cmd":"disks""#).contains("malformed"));
    assert!(c.err(r#"{"disk":0}"#).contains("cmd"));
    assert!(c.err(r#"{"cmd":"reboot"}"#).contains("unknown"));
    assert!(c
        .err(r#"{"cmd":"mirror-status","disk":0}"#)
        .contains("not a filter stack"));
    assert!(c
        .err(r#"{"cmd":"mirror-status","disk":9}"#)
        .contains("no disk"));
    assert!(c
        .err(r#"{"cmd":"mirror-fail-child","disk":1,"child":"x"}"#)
        .contains("child"));
    assert!(c.err(&"y".repeat(100_000)).contains("longer"));
    c.ok(r#"{"cmd":"disks"}"#);

    // The VM is still up.
    assert!(vmm.child.try_wait().unwrap().is_none(), "iovirt-vmm exited");
}
