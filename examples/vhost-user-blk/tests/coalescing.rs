//! Virtual interrupt coalescing (vIC) in the daemon: `--coalesce on` cuts
//! interrupts when many requests are in flight, delivers at once when few
//! are, and its deadline timer bounds how long an interrupt waits.
//!
//! Real software: `iovirt-blk-loadgen` (libblkio's virtio-blk-vhost-user
//! driver) against one daemon with four exports, driven one after the
//! other: with and without coalescing over a real file read with O_DIRECT
//! (requests really are in flight at the device), and with and without over
//! a device paced to 2000 IOPS (a null disk under the fault filter's rate
//! limit), where completions come 500 µs apart with 32 in flight, so vIC
//! holds each interrupt and only its deadline timer (100 µs) delivers it.
//! Interrupts are counted by the daemon and read through its control socket
//! (`export-stats`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_iovirt-vhost-user-blk");
const LOADGEN: &str = env!("CARGO_BIN_EXE_iovirt-blk-loadgen");

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        // A real file, written (not sparse), so O_DIRECT reads reach the disk.
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0x5a; 64 << 20]).expect("write image");
        let paced = dir.path().join("paced.toml");
        std::fs::write(
            &paced,
            "[paced]\nfilter = \"fault\"\nrate-limit = [{ iops = 2000 }]\n\
             [paced.child]\nbackend = \"null\"\nsize = \"64M\"\n",
        )
        .expect("write stack");
        let file = format!("path={},cache=none", img.display());
        let paced = format!("stack={}", paced.display());
        let mut cmd = Command::new(DAEMON);
        cmd.args(["--poll-us", "0", "--control"])
            .arg(dir.path().join("ctl.sock"));
        for (name, disk, co) in [
            ("file-off", &file, "off"),
            ("file-on", &file, "on"),
            ("paced-off", &paced, "off"),
            ("paced-on", &paced, "on"),
        ] {
            cmd.args(["--export", name, "--socket"])
                .arg(dir.path().join(format!("{name}.sock")))
                .args(["--disk", disk, "--coalesce", co]);
        }
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start iovirt-vhost-user-blk");
        let mut d = Daemon { child, dir };
        let paths = ["file-off.sock", "paced-on.sock", "ctl.sock"].map(|f| d.path(f));
        common::wait_for_paths(&mut d.child, &paths, Duration::from_secs(20));
        d
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }
}

/// One loadgen job's numbers.
#[derive(Clone, Copy, Debug)]
struct Job {
    iops: f64,
    p50_us: f64,
    irq_per_req: f64,
}

/// Run random reads on export `name` at each depth; kill the load generator
/// if it hangs (an interrupt that never comes).
fn run(d: &Daemon, name: &str, depths: &str, secs: u32) -> Vec<Job> {
    let json = d.path(&format!("{name}.json"));
    let mut child = Command::new(LOADGEN)
        .arg("--socket")
        .arg(d.path(&format!("{name}.sock")))
        .args(["--duration", &secs.to_string(), "--depths", depths])
        .args(["--ops", "randread", "--export", name, "--control"])
        .arg(d.path("ctl.sock"))
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .spawn()
        .expect("start iovirt-blk-loadgen");
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loadgen on {name} hung: an interrupt was never delivered");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "loadgen on {name}: {status}");
    parse(&json)
}

fn parse(json: &Path) -> Vec<Job> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("JSON")).expect("parse JSON");
    v.as_array()
        .expect("jobs")
        .iter()
        .map(|j| Job {
            iops: j["iops"].as_f64().expect("iops"),
            p50_us: j["lat_p50_us"].as_f64().expect("p50"),
            irq_per_req: j["interrupts_per_request"]
                .as_f64()
                .expect("interrupts_per_request"),
        })
        .collect()
}

#[test]
fn coalescing_cuts_interrupts_at_depth_and_never_delays_depth_one() {
    let d = Daemon::start();
    // Queue depth 1, off and on taking turns (the machine is shared and
    // noisy): every completion interrupts at once, and the median latency is
    // not worse than without coalescing.
    let mut p50 = (Vec::new(), Vec::new());
    let qd1 = |name| match &run(&d, name, "1", 1)[..] {
        [j] => *j,
        other => panic!("{other:?}"),
    };
    for round in 0..4 {
        // Each goes first in every other round.
        let (off1, on1) = if round % 2 == 0 {
            let off = qd1("file-off");
            (off, qd1("file-on"))
        } else {
            let on = qd1("file-on");
            (qd1("file-off"), on)
        };
        eprintln!("QD1 off: {off1:?}\nQD1 on:  {on1:?}");
        // As many interrupts as without coalescing (EVENT_IDX may spare a
        // few when the frontend polls on a loaded machine, on and off alike).
        assert!(
            on1.irq_per_req > 0.95 && on1.irq_per_req >= off1.irq_per_req - 0.01,
            "QD1 with vIC: {on1:?} against {off1:?}"
        );
        p50.0.push(off1.p50_us);
        p50.1.push(on1.p50_us);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let (off_p50, on_p50) = (median(&mut p50.0), median(&mut p50.1));
    assert!(
        on_p50 <= off_p50 * 1.2 + 20.0,
        "QD1 median p50 with vIC {on_p50} us against {off_p50} us"
    );

    // Queue depth 32 on the file: nothing is held for good (the load
    // generator would hang). How many interrupts vIC saves here depends on
    // timing: EVENT_IDX already spares a busy frontend most of them, so the
    // numbers are printed, not judged (scripts/vic.sh measures them).
    let [off32] = &run(&d, "file-off", "32", 2)[..] else {
        panic!("one job")
    };
    let [on32] = &run(&d, "file-on", "32", 2)[..] else {
        panic!("one job")
    };
    eprintln!("QD32 off: {off32:?}\nQD32 on:  {on32:?}");
    assert!(on32.irq_per_req <= 1.0 && on32.iops > 0.0, "{on32:?}");

    // Paced device, depth 32: completions 500 µs apart, so every held
    // interrupt is delivered by the deadline timer, not by the next
    // completion (which would give about 0.5 interrupts per request and add
    // up to 500 µs; measured without the timer: 0.40 and p99 +9 ms; with it
    // 0.70 to 0.95 on a loaded 2-core machine, where the timer wakes late).
    let off = run(&d, "paced-off", "32", 2);
    let on = run(&d, "paced-on", "32", 2);
    eprintln!("paced off: {off:?}\npaced on:  {on:?}");
    let ([off32], [on32]) = (&off[..], &on[..]) else {
        panic!("{off:?} {on:?}")
    };
    assert!(on32.irq_per_req > 0.6, "paced with vIC: {on32:?}");
    assert!(
        on32.p50_us <= off32.p50_us + 500.0,
        "paced: {on32:?} against {off32:?}"
    );
}
