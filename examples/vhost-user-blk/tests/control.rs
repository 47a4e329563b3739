//! `iovirt-vhost-user-blk --control SOCK`: a unix-socket client speaking the
//! JSON-lines control protocol (docs/CONTROL.md) to the running daemon, with
//! no frontend connected: the disk's stack nodes are listed and driven, a
//! live migration of the served disk runs to a new file, and bad requests and
//! a bad `--control` are answered with errors.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_iovirt-vhost-user-blk");

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(daemon: &mut Daemon, path: &Path) -> Client {
        let t = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                return Client {
                    reader: BufReader::new(s.try_clone().expect("clone")),
                    writer: s,
                };
            }
            if let Ok(Some(st)) = daemon.0.try_wait() {
                panic!("daemon exited ({st}) before its control socket appeared");
            }
            assert!(t.elapsed() < Duration::from_secs(20), "no control socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ask(&mut self, line: &str) -> Value {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("answer");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }

    fn ok(&mut self, line: &str) -> Value {
        let v = self.ask(line);
        assert_eq!(v["ok"], true, "{line} -> {v}");
        v
    }

    fn err(&mut self, line: &str) -> String {
        let v = self.ask(line);
        assert_eq!(v["ok"], false, "{line} -> {v}");
        v["error"].as_str().unwrap_or_default().to_string()
    }
}

fn start(dir: &Path, disk: &str, control: &Path) -> Daemon {
    let child = Command::new(BIN)
        .arg("--socket")
        .arg(dir.join("vhost.sock"))
        .args(["--disk", disk])
        .arg("--control")
        .arg(control)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start iovirt-vhost-user-blk");
    Daemon(child)
}

#[test]
fn control_socket_drives_the_served_stack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(d.join("src.img"), vec![0x6b; 4 << 20]).expect("source image");
    std::fs::write(d.join("src2.img"), vec![0x6b; 4 << 20]).expect("source image");
    std::fs::write(
        d.join("vdm.toml"),
        "[vdm]\nfilter = \"migrate\"\nchunk-size = \"256K\"\n\n\
         [vdm.child]\nfilter = \"mirror\"\n\n\
         [[vdm.child.children]]\nbackend = \"file\"\npath = \"src.img\"\ncache = \"writeback\"\n\n\
         [[vdm.child.children]]\nbackend = \"memory\"\nsize = \"4M\"\nresync = false\n",
    )
    .expect("stack");
    // (`resync` is not a memory option: the daemon must refuse the stack.)
    let ctl = d.join("ctl.sock");
    let stack = format!("stack={}", d.join("vdm.toml").display());
    let mut bad = start(d, &stack, &ctl);
    let st = bad.0.wait().expect("wait");
    assert!(!st.success(), "an invalid stack was served");
    assert!(!ctl.exists(), "a control socket without a disk");

    std::fs::write(
        d.join("vdm.toml"),
        "[vdm]\nfilter = \"migrate\"\nchunk-size = \"256K\"\n\n\
         [vdm.child]\nfilter = \"mirror\"\nresync-on-open = false\n\n\
         [[vdm.child.children]]\nbackend = \"file\"\npath = \"src.img\"\ncache = \"writeback\"\n\n\
         [[vdm.child.children]]\nbackend = \"file\"\npath = \"src2.img\"\ncache = \"writeback\"\n",
    )
    .expect("stack");
    let mut daemon = start(d, &stack, &ctl);
    let mut c = Client::connect(&mut daemon, &ctl);

    let v = c.ok(r#"{"cmd":"disks","id":"a"}"#);
    assert_eq!(v["id"], "a");
    let disk = &v["disks"][0];
    assert_eq!(disk["name"], "vdm");
    assert_eq!(disk["stack"], true);
    assert_eq!(disk["serial"], "iovirt");
    assert_eq!(disk["sched"], Value::Null);
    let kinds: Vec<(&str, &str)> = disk["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["path"].as_str().unwrap_or(""),
                n["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(kinds, [("vdm", "migrate"), ("vdm.child", "mirror")]);
    assert_eq!(
        c.ok(r#"{"cmd":"mirror-status","disk":"vdm"}"#)["node"],
        "vdm.child"
    );
    assert!(c
        .err(r#"{"cmd":"sched-stats","disk":0}"#)
        .contains("no scheduling"));
    assert!(c.err("{\"cmd\":").contains("malformed"));

    // Migrate the served disk (mirror and all) onto one new file.
    let dst: PathBuf = d.join("dst.img");
    let req = serde_json::json!({
        "cmd": "migrate-start", "disk": "vdm", "path": dst, "cache": "writeback",
    });
    let v = c.ok(&req.to_string());
    assert_eq!(v["target"]["path"], dst.to_str().expect("utf-8"));
    let t = Instant::now();
    let v = loop {
        let v = c.ok(r#"{"cmd":"migrate-status","disk":0}"#);
        if v["state"] != "copying" && v["state"] != "switching" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "not switched: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(v["state"], "switched", "{v}");
    assert_eq!(v["total_bytes"], 4 << 20);
    // Both mirror children hold 0x6b: so must the target.
    assert_eq!(
        std::fs::read(&dst).expect("target"),
        vec![0x6b; 4 << 20],
        "target differs from the source"
    );
    assert!(c.err(&req.to_string()).contains("in use"));
    let v = c.ok(r#"{"cmd":"migrate-cancel","disk":0}"#);
    assert_eq!(v["state"], "switched");
    drop(c);
    drop(daemon);
}

#[test]
fn control_path_that_is_a_file_stops_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ctl = dir.path().join("not-a-socket");
    std::fs::write(&ctl, b"keep me").expect("file");
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(dir.path().join("vhost.sock"))
        .args(["--disk", "memory,size=1M", "--control"])
        .arg(&ctl)
        .env("RUST_LOG", "error")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--control"), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&ctl).expect("file"), b"keep me");
    let out = Command::new(BIN)
        .args(["--socket", "/x", "--disk", "null", "--control="])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--control needs a path"));
}
