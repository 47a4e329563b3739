//! Several exports of one daemon sharing one back-end through the mClock
//! stage: weights, reservations and limits hold with real vhost-user I/O.
//!
//! Real software: one `iovirt-blk-loadgen` (libblkio's virtio-blk-vhost-user
//! driver) per export, each at queue depth 64, against one daemon whose
//! exports all name the same filter stack: a null disk under a fault filter
//! with a 2000 IOPS rate limit. The capacity is pinned by that limit (far
//! below what the CPU could do on a busy 2-core machine), so what each export
//! gets is decided by the scheduler, not by who gets the CPU. The stage uses
//! the default cost model: a 4 KiB request costs 1.125 units, so
//! `--reservation 900` is 800 IOPS and `--limit 450` is 400 IOPS. The stage
//! keeps 16 requests at the back-end (`--sched-depth 16`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DAEMON: &str = env!("CARGO_BIN_EXE_iovirt-vhost-user-blk");
const LOADGEN: &str = env!("CARGO_BIN_EXE_iovirt-blk-loadgen");
/// The shared back-end's capacity.
const CAPACITY: f64 = 2000.0;
/// A 4 KiB request's cost under the default cost model.
const COST_4K: f64 = 1.125;

/// The tests measure rates: run them one at a time, not against each other.
static SERIAL: Mutex<()> = Mutex::new(());

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Start a daemon with one export per `(name, extra options)`, all on the
    /// same rate-limited stack.
    fn start(exports: &[(&str, &[&str])]) -> Daemon {
        Self::start_with(exports, &[])
    }

    /// [`Daemon::start`] with extra daemon-wide options.
    fn start_with(exports: &[(&str, &[&str])], daemon_opts: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let stack = dir.path().join("shared.toml");
        std::fs::write(
            &stack,
            format!(
                "[shared]\nfilter = \"fault\"\nrate-limit = [{{ iops = {CAPACITY} }}]\n\
                 [shared.child]\nbackend = \"null\"\nsize = \"64M\"\n"
            ),
        )
        .expect("write stack");
        let mut cmd = Command::new(DAEMON);
        // A back-end queue of 16 (8 ms at 2000 IOPS): most of each export's
        // 64 requests wait in the scheduler, where weights act.
        cmd.args(["--poll-us", "0", "--sched-depth", "16"]);
        for o in daemon_opts {
            cmd.arg(o.replace("{dir}", &dir.path().display().to_string()));
        }
        for (name, opts) in exports {
            cmd.args(["--export", name, "--socket"])
                .arg(dir.path().join(format!("{name}.sock")))
                .arg("--disk")
                .arg(format!("stack={}", stack.display()))
                .args(*opts);
        }
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start iovirt-vhost-user-blk");
        let mut d = Daemon { child, dir };
        let paths: Vec<_> = exports.iter().map(|(name, _)| d.socket(name)).collect();
        common::wait_for_paths(&mut d.child, &paths, Duration::from_secs(20));
        d
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one load generator measured.
#[derive(Debug)]
struct Load {
    iops: f64,
    /// IOPS in each 100 ms window.
    windows: Vec<f64>,
}

impl Load {
    /// The most requests completed in any 1-second run of ten 100 ms windows.
    fn max_per_second(&self) -> f64 {
        self.windows
            .windows(10)
            .map(|w| w.iter().sum::<f64>() / 10.0)
            .fold(0.0, f64::max)
    }

    /// The fewest requests completed in any whole second of the window.
    fn min_per_second(&self) -> f64 {
        self.windows
            .chunks_exact(10)
            .map(|w| w.iter().sum::<f64>() / 10.0)
            .fold(f64::INFINITY, f64::min)
    }
}

/// Milliseconds since the epoch, `delay` from now.
fn start_at(delay: Duration) -> u128 {
    (SystemTime::now() + delay)
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
}

/// Start a load generator on `socket` for `secs` seconds of random reads at depth 64.
fn loadgen(socket: &Path, secs: u32, at: u128, json: &Path) -> Child {
    Command::new(LOADGEN)
        .arg("--socket")
        .arg(socket)
        .args(["--duration", &secs.to_string(), "--depths", "64"])
        .args(["--ops", "randread", "--interval-ms", "100"])
        .args(["--start-at", &at.to_string(), "--json"])
        .arg(json)
        .stdout(Stdio::null())
        .spawn()
        .expect("start iovirt-blk-loadgen")
}

fn finish(mut child: Child, json: &Path) -> Load {
    let status = child.wait().expect("wait for loadgen");
    assert!(status.success(), "loadgen failed: {status}");
    let text = std::fs::read_to_string(json).expect("loadgen JSON");
    let v: serde_json::Value = serde_json::from_str(&text).expect("parse loadgen JSON");
    let job = &v[0];
    Load {
        iops: job["iops"].as_f64().expect("iops"),
        windows: job["interval_iops"]
            .as_array()
            .expect("interval_iops")
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect(),
    }
}

/// Drive every export of `d` at once for `secs` seconds.
fn drive(d: &Daemon, names: &[&str], secs: u32) -> Vec<Load> {
    let at = start_at(Duration::from_millis(1500));
    let runs: Vec<_> = names
        .iter()
        .map(|n| {
            let json = d.dir.path().join(format!("{n}.json"));
            (loadgen(&d.socket(n), secs, at, &json), json)
        })
        .collect();
    runs.into_iter().map(|(c, j)| finish(c, &j)).collect()
}

/// Each export's throughput is within 5 % of its weight's share.
fn assert_weight_shares(weights: &[f64]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let names: Vec<String> = (0..weights.len()).map(|i| format!("vm{i}")).collect();
    let w: Vec<String> = weights.iter().map(f64::to_string).collect();
    let exports: Vec<(&str, [&str; 2])> = names
        .iter()
        .zip(&w)
        .map(|(n, w)| (n.as_str(), ["--weight", w.as_str()]))
        .collect();
    let specs: Vec<(&str, &[&str])> = exports.iter().map(|(n, o)| (*n, &o[..])).collect();
    let d = Daemon::start(&specs);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let loads = drive(&d, &names, 5);
    let total: f64 = loads.iter().map(|l| l.iops).sum();
    let wsum: f64 = weights.iter().sum();
    eprintln!(
        "weights {weights:?}: IOPS {:?}, total {total:.0}",
        loads.iter().map(|l| l.iops.round()).collect::<Vec<_>>()
    );
    // Saturated: together they get the back-end's capacity.
    assert!(
        total > CAPACITY * 0.95 && total < CAPACITY * 1.02,
        "total {total:.0} IOPS, capacity {CAPACITY}"
    );
    for (l, wi) in loads.iter().zip(weights) {
        let want = total * wi / wsum;
        assert!(
            (l.iops - want).abs() <= want * 0.05,
            "weight {wi}: {:.0} IOPS, share {want:.0} (all: {loads:?})",
            l.iops
        );
    }
}

#[test]
fn two_exports_share_by_weight() {
    assert_weight_shares(&[1.0, 3.0]);
}

#[test]
fn three_exports_share_by_weight() {
    assert_weight_shares(&[1.0, 2.0, 3.0]);
}

#[test]
fn reservation_is_met_and_limit_never_exceeded_under_contention() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // By weight alone "gold" would get 1/9 of the capacity; its reservation is
    // 800 IOPS. "capped" would get 4/9 by weight; its limit is 400 IOPS.
    let reserved_iops = 800.0;
    let limit_iops = 400.0;
    let reservation = (reserved_iops * COST_4K).to_string();
    let limit = (limit_iops * COST_4K).to_string();
    let d = Daemon::start(&[
        ("gold", &["--weight", "1", "--reservation", &reservation]),
        ("plain", &["--weight", "4"]),
        ("capped", &["--weight", "4", "--limit", &limit]),
    ]);
    let loads = drive(&d, &["gold", "plain", "capped"], 6);
    let [gold, plain, capped] = &loads[..] else {
        panic!("{loads:?}")
    };
    eprintln!(
        "gold {:.0} (min/s {:.0}), plain {:.0}, capped {:.0} (max/s {:.0})",
        gold.iops,
        gold.min_per_second(),
        plain.iops,
        capped.iops,
        capped.max_per_second()
    );
    // The reservation holds over the run and in every whole second.
    assert!(gold.iops >= reserved_iops * 0.98, "gold {gold:?}");
    assert!(
        gold.min_per_second() >= reserved_iops * 0.95,
        "gold {gold:?}"
    );
    // The limit holds in every 1-second window (sliding by 100 ms), give or
    // take two requests at the window's edges, as the scheduler promises.
    assert!(
        capped.max_per_second() <= limit_iops + 2.0,
        "capped {capped:?}"
    );
    assert!(capped.iops >= limit_iops * 0.9, "capped {capped:?}");
    // The rest goes to "plain": the device stays saturated.
    let total = gold.iops + plain.iops + capped.iops;
    assert!(total > CAPACITY * 0.95, "total {total:.0}");
}

#[test]
fn one_frontend_leaving_does_not_disturb_the_others() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start(&[("stay", &["--weight", "1"]), ("go", &["--weight", "1"])]);
    let at = start_at(Duration::from_millis(1500));
    let stay_json = d.dir.path().join("stay.json");
    let stay = loadgen(&d.socket("stay"), 5, at, &stay_json);
    // "go" connects, runs 1 s, disconnects, and comes back for another second.
    for round in 0..2 {
        let json = d.dir.path().join(format!("go{round}.json"));
        let at = start_at(Duration::from_millis(if round == 0 { 1500 } else { 300 }));
        let go = finish(loadgen(&d.socket("go"), 1, at, &json), &json);
        assert!(go.iops > 0.0, "go, round {round}: {go:?}");
    }
    let stay = finish(stay, &stay_json);
    eprintln!("stay: {:?}", stay.windows);
    // "stay" never stopped, and took well over its half of the capacity once
    // "go" left for good (alone, its 64 requests are what limit it on a busy host).
    assert!(
        stay.windows.iter().all(|&w| w > 0.0),
        "stay stalled: {stay:?}"
    );
    let tail = &stay.windows[stay.windows.len() - 5..];
    let tail_iops = tail.iter().sum::<f64>() / tail.len() as f64;
    assert!(
        tail_iops > CAPACITY * 0.75,
        "stay alone: {tail_iops:.0} IOPS"
    );
    assert!(d.socket("go").exists() && d.socket("stay").exists());
}

/// A control-socket client: one JSON request line, one answer line.
struct Ctl(BufReader<UnixStream>);

impl Ctl {
    fn connect(path: &Path) -> Ctl {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Ctl(BufReader::new(s)),
                Err(e) => {
                    assert!(Instant::now() < deadline, "control socket: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn ask(&mut self, req: serde_json::Value) -> serde_json::Value {
        let s = self.0.get_mut();
        writeln!(s, "{req}").expect("send request");
        let mut line = String::new();
        self.0.read_line(&mut line).expect("read answer");
        serde_json::from_str(&line).expect("answer is JSON")
    }
}

#[test]
fn control_socket_covers_every_export() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Daemon::start_with(
        &[
            ("a", &["--weight", "1"]),
            ("b", &["--weight", "1", "--coalesce", "on"]),
        ],
        &["--control", "{dir}/ctl.sock"],
    );
    let mut ctl = Ctl::connect(&d.dir.path().join("ctl.sock"));
    let disks = ctl.ask(serde_json::json!({"cmd": "disks"}));
    assert_eq!(disks["ok"], true, "{disks}");
    let list = disks["disks"].as_array().expect("disks");
    assert_eq!(list.len(), 2, "{disks}");
    assert_eq!(
        (list[0]["name"].as_str(), list[1]["name"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(list[1]["coalesce"], true, "{disks}");
    assert!(list[0]["sched"].is_object(), "{disks}");
    // Hostile and mistaken requests get an error answer; the connection goes on.
    for bad in [
        serde_json::json!({"cmd": "sched-set", "disk": "zzz", "weight": 2}),
        serde_json::json!({"cmd": "sched-set", "disk": 7, "weight": 2}),
        serde_json::json!({"cmd": "sched-set", "disk": "a", "weight": -1}),
        serde_json::json!({"cmd": "export-stats", "disk": [1]}),
    ] {
        let a = ctl.ask(bad.clone());
        assert_eq!(a["ok"], false, "{bad} -> {a}");
    }
    // Re-weight b at run time to 3: the split follows.
    let a = ctl.ask(serde_json::json!({"cmd": "sched-set", "disk": "b", "weight": 3}));
    assert_eq!(a["ok"], true, "{a}");
    let loads = drive(&d, &["a", "b"], 4);
    let total = loads[0].iops + loads[1].iops;
    assert!(
        (loads[1].iops - total * 0.75).abs() <= total * 0.75 * 0.05,
        "after sched-set weight 3: {loads:?}"
    );
    for (name, want) in [("a", loads[0].iops), ("b", loads[1].iops)] {
        let st = ctl.ask(serde_json::json!({"cmd": "sched-stats", "disk": name}));
        assert_eq!(st["ok"], true, "{st}");
        assert!(
            st["completed"].as_u64().unwrap_or(0) as f64 >= want * 4.0 * 0.9,
            "{st}"
        );
        assert!(st["latency_ns"]["p99"].as_u64().unwrap_or(0) > 0, "{st}");
        assert!(st["queued"].is_u64(), "{st}");
        assert!(st["iops_total"].as_f64().unwrap_or(0.0) > 0.0, "{st}");
    }
    // Without "disk", sched-stats answers for every export.
    let all = ctl.ask(serde_json::json!({"cmd": "sched-stats"}));
    let clients = all["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 2, "{all}");
    assert_eq!(clients[1]["name"], "b", "{all}");
    assert_eq!(clients[1]["params"]["weight"], 3.0, "{all}");
    // The load generators are gone; the daemon notices their disconnects.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ex = loop {
        let ex = ctl.ask(serde_json::json!({"cmd": "export-stats"}));
        assert_eq!(ex["ok"], true, "{ex}");
        let ex = ex["exports"].as_array().expect("exports").clone();
        if ex.iter().all(|e| e["connections"] == 1) || Instant::now() > deadline {
            break ex;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for e in &ex {
        assert!(e["requests"].as_u64().unwrap_or(0) > 1000, "{e}");
        assert!(e["interrupts"].as_u64().unwrap_or(0) > 0, "{e}");
        assert_eq!(e["connections"], 1, "{e}");
        assert_eq!(e["connected"], false, "{e}");
    }
    assert_eq!(
        (&ex[0]["coalesce"], &ex[1]["coalesce"]),
        (&false.into(), &true.into())
    );
}
