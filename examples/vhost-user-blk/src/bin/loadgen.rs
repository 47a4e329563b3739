//! `iovirt-blk-loadgen`: a vhost-user-blk load generator that plays the VMM.
//!
//! It connects to a vhost-user-blk daemon's socket with libblkio's
//! `virtio-blk-vhost-user` driver (the `blkio` crate), which shares a memfd
//! buffer region as guest memory, sets up the virtqueue, kicks the daemon and
//! waits on the call eventfd, exactly as a VMM's device would. It then runs
//! 4 KiB (by default) random reads and writes at each queue depth for a fixed
//! time and reports IOPS and latency percentiles as text and JSON.
//!
//! With `--cpu-pid PID` (the daemon's process id) it also reads the daemon's
//! CPU time (utime + stime of all its threads, `/proc/PID/stat`) at the start
//! and end of each job's measured window and reports the daemon's CPU-seconds
//! and IOPS per daemon CPU-second ("IOPS per core").
//!
//! blkio keeps the call eventfd to itself, so interrupts are counted by the
//! daemon: with `--control SOCK` (an `iovirt-vhost-user-blk --control`
//! socket) and `--export NAME` it asks the daemon's `export-stats` at the
//! start and end of each measured window and reports interrupts per request.
//!
//! With `--interval-ms N` it also counts completions in every N ms of the
//! measured window and reports them as IOPS per interval (`interval_iops` in
//! the JSON), so a test can check a rate in every window, not only on
//! average. With `--start-at UNIX_MS` it connects at once but starts the
//! first job only at that wall-clock time, so several load generators
//! against one daemon measure the same window.
//!
//! ```text
//! iovirt-blk-loadgen --socket PATH [--duration 5] [--depths 1,32] [--ops randread,randwrite]
//!                    [--bs 4096] [--label NAME] [--json FILE] [--cpu-pid PID]
//!                    [--interval-ms N] [--start-at UNIX_MS] [--control SOCK --export NAME]
//! ```

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, ReqFlags};
use serde::Serialize;

const USAGE: &str = "usage: iovirt-blk-loadgen --socket PATH [--duration SECS] [--depths 1,32] [--ops randread,randwrite] [--bs 4096] [--label NAME] [--json FILE] [--cpu-pid PID] [--interval-ms N] [--start-at UNIX_MS] [--control SOCK --export NAME]";

/// Why a run failed; printed as one line.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Blkio {
        what: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("request failed: {0}")]
    Request(i32),
    #[error("cannot write {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn blk<T>(what: &'static str, r: blkio::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error::Blkio { what, source })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    RandRead,
    RandWrite,
}

impl std::str::FromStr for Op {
    type Err = Error;
    fn from_str(s: &str) -> Result<Op, Error> {
        match s {
            "randread" => Ok(Op::RandRead),
            "randwrite" => Ok(Op::RandWrite),
            _ => Err(Error::Usage(format!(
                "unknown op {s:?} (randread, randwrite)"
            ))),
        }
    }
}

struct Args {
    socket: String,
    duration: Duration,
    depths: Vec<usize>,
    ops: Vec<Op>,
    bs: usize,
    label: String,
    json: Option<String>,
    cpu_pid: Option<u32>,
    interval: Option<Duration>,
    start_at: Option<std::time::SystemTime>,
    control: Option<String>,
    export: Option<String>,
}

/// The daemon's request and interrupt counters of one export, through its
/// control socket (`export-stats`); `None` if it cannot tell.
fn export_counters(control: &str, export: &str) -> Option<(u64, u64)> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(control).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = serde_json::json!({"cmd": "export-stats", "disk": export});
    writeln!(s, "{req}").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    let e = v.get("exports")?.get(0)?;
    Some((e.get("requests")?.as_u64()?, e.get("interrupts")?.as_u64()?))
}

/// CPU time in seconds (user + system, all threads, live and exited) of process `pid`.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    // After ')': state is field 3, utime field 14, stime field 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (tick > 0).then(|| (utime + stime) as f64 / tick as f64)
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        socket: String::new(),
        duration: Duration::from_secs(5),
        depths: vec![1, 32],
        ops: vec![Op::RandRead, Op::RandWrite],
        bs: 4096,
        label: String::new(),
        json: None,
        cpu_pid: None,
        interval: None,
        start_at: None,
        control: None,
        export: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "-h" || k == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it
            .next()
            .ok_or_else(|| Error::Usage(format!("{k} needs a value\n{USAGE}")))?;
        let bad = || Error::Usage(format!("{k} {v}: bad value\n{USAGE}"));
        match k.as_str() {
            "--socket" => a.socket = v.clone(),
            "--duration" => {
                let s: f64 = v.parse().map_err(|_| bad())?;
                if !(s > 0.0 && s < 1e6) {
                    return Err(bad());
                }
                a.duration = Duration::from_secs_f64(s);
            }
            "--depths" => {
                a.depths = v
                    .split(',')
                    .map(|d| d.parse::<usize>().ok().filter(|d| (1..=1024).contains(d)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(bad)?
            }
            "--ops" => a.ops = v.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--bs" => {
                a.bs = v
                    .parse::<usize>()
                    .ok()
                    .filter(|b| *b >= 512 && b % 512 == 0 && *b <= 1 << 20)
                    .ok_or_else(bad)?
            }
            "--label" => a.label = v.clone(),
            "--json" => a.json = Some(v.clone()),
            "--cpu-pid" => {
                let pid = v.parse::<u32>().map_err(|_| bad())?;
                if process_cpu_seconds(pid).is_none() {
                    return Err(Error::Usage(format!(
                        "--cpu-pid {pid}: cannot read /proc/{pid}/stat"
                    )));
                }
                a.cpu_pid = Some(pid);
            }
            "--interval-ms" => {
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|m| (1..=3_600_000).contains(m))
                    .ok_or_else(bad)?;
                a.interval = Some(Duration::from_millis(ms));
            }
            "--control" => a.control = Some(v.clone()),
            "--export" => a.export = Some(v.clone()),
            "--start-at" => {
                let ms = v.parse::<u64>().map_err(|_| bad())?;
                a.start_at = Some(std::time::UNIX_EPOCH + Duration::from_millis(ms));
            }
            _ => return Err(Error::Usage(format!("unknown argument {k:?}\n{USAGE}"))),
        }
    }
    if a.socket.is_empty() {
        return Err(Error::Usage(format!("--socket is required\n{USAGE}")));
    }
    if a.control.is_some() != a.export.is_some() {
        return Err(Error::Usage(format!(
            "--control and --export go together\n{USAGE}"
        )));
    }
    Ok(a)
}

/// One measured job.
#[derive(Debug, Serialize)]
struct JobResult {
    label: String,
    op: Op,
    block_size: usize,
    queue_depth: usize,
    seconds: f64,
    ios: u64,
    iops: f64,
    mib_per_s: f64,
    lat_mean_us: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    lat_p999_us: f64,
    lat_max_us: f64,
    /// The daemon's CPU-seconds in the measured window (with `--cpu-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    daemon_cpu_s: Option<f64>,
    /// IOPS per daemon CPU-second: I/Os / daemon CPU-seconds (with `--cpu-pid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    iops_per_cpu_s: Option<f64>,
    /// Length of each `interval_iops` window, ms (with `--interval-ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_ms: Option<u64>,
    /// Completions per second in each window of the measured time, in order
    /// (the last, partial window left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interval_iops: Vec<f64>,
    /// Interrupts the daemon sent per request it completed in the measured
    /// window (with `--control`).
    #[serde(skip_serializing_if = "Option::is_none")]
    interrupts_per_request: Option<f64>,
}

/// xorshift64*: cheap, good enough to spread offsets.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

struct Rig {
    q: Blkioq,
    buf: usize,
    blocks: u64,
    rng: Rng,
}

impl Rig {
    fn submit(&mut self, op: Op, slot: usize, bs: usize) {
        let off = (self.rng.next() % self.blocks) * bs as u64;
        let p = self.buf + slot * bs;
        match op {
            Op::RandRead => self.q.read(off, p as *mut u8, bs, slot, ReqFlags::empty()),
            Op::RandWrite => self
                .q
                .write(off, p as *const u8, bs, slot, ReqFlags::empty()),
        }
    }

    fn run(&mut self, a: &Args, op: Op, depth: usize) -> Result<JobResult, Error> {
        let mut start = vec![Instant::now(); depth];
        let mut lats: Vec<u32> = Vec::with_capacity(1 << 20);
        let mut done: Vec<MaybeUninit<blkio::Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        // Warm-up: a short unmeasured phase fills the pipeline and the caches.
        let t0 = Instant::now();
        for (slot, s) in start.iter_mut().enumerate() {
            *s = Instant::now();
            self.submit(op, slot, a.bs);
        }
        let mut inflight = depth;
        let measure_from = t0 + Duration::from_millis(200);
        let mut windows: Vec<u64> = Vec::new();
        let end = measure_from + a.duration;
        let mut measured_start = None;
        let mut cpu_start = None;
        let mut irq_start = None;
        let counters = || match (&a.control, &a.export) {
            (Some(c), Some(e)) => export_counters(c, e),
            _ => None,
        };
        let (cpu_end, irq_end) = loop {
            let n = blk(
                "waiting for completions",
                self.q.do_io(&mut done, 1, None, None),
            )?;
            inflight = inflight.saturating_sub(n);
            let now = Instant::now();
            let measuring = now >= measure_from;
            if measuring && measured_start.is_none() {
                measured_start = Some(now);
                cpu_start = a.cpu_pid.and_then(process_cpu_seconds);
                irq_start = counters();
            }
            let stop = now >= end;
            for c in done.iter().take(n) {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                if c.ret != 0 {
                    return Err(Error::Request(c.ret));
                }
                let slot = c.user_data;
                if let Some(s) = start.get(slot) {
                    if measuring && !stop {
                        lats.push(now.duration_since(*s).as_nanos().min(u32::MAX as u128) as u32);
                        if let Some(iv) = a.interval {
                            let w = (now.duration_since(measure_from).as_nanos()
                                / iv.as_nanos().max(1))
                                as usize;
                            if windows.len() <= w {
                                windows.resize(w + 1, 0);
                            }
                            if let Some(c) = windows.get_mut(w) {
                                *c += 1;
                            }
                        }
                    }
                }
                if !stop {
                    if let Some(s) = start.get_mut(slot) {
                        *s = Instant::now();
                    }
                    self.submit(op, slot, a.bs);
                    inflight += 1;
                }
            }
            if stop {
                break (a.cpu_pid.and_then(process_cpu_seconds), counters());
            }
        };
        // Drain what is still in flight, so the next job starts from an idle queue.
        while inflight > 0 {
            let n = blk("draining", self.q.do_io(&mut done, 1, None, None))?;
            inflight = inflight.saturating_sub(n);
        }
        let secs = measured_start.map_or(0.0, |s| end.duration_since(s).as_secs_f64());
        let ios = lats.len() as u64;
        lats.sort_unstable();
        let mean = if lats.is_empty() {
            0.0
        } else {
            lats.iter().map(|&l| f64::from(l)).sum::<f64>() / lats.len() as f64 / 1000.0
        };
        let iops = if secs > 0.0 { ios as f64 / secs } else { 0.0 };
        let daemon_cpu_s = cpu_start.zip(cpu_end).map(|(s, e)| (e - s).max(0.0));
        let interrupts_per_request = irq_start.zip(irq_end).and_then(|((r0, i0), (r1, i1))| {
            let reqs = r1.saturating_sub(r0);
            (reqs > 0).then(|| i1.saturating_sub(i0) as f64 / reqs as f64)
        });
        let iops_per_cpu_s = daemon_cpu_s.filter(|c| *c > 0.0).map(|c| ios as f64 / c);
        // Whole windows only: the last one may be cut short by the end.
        let interval_iops = match a.interval {
            Some(iv) => {
                let whole = (a.duration.as_nanos() / iv.as_nanos().max(1)) as usize;
                windows.resize(whole, 0);
                windows
                    .iter()
                    .map(|&n| n as f64 / iv.as_secs_f64())
                    .collect()
            }
            None => Vec::new(),
        };
        Ok(JobResult {
            label: a.label.clone(),
            op,
            block_size: a.bs,
            queue_depth: depth,
            seconds: secs,
            ios,
            iops,
            mib_per_s: iops * a.bs as f64 / (1 << 20) as f64,
            lat_mean_us: mean,
            lat_p50_us: percentile(&lats, 0.50),
            lat_p99_us: percentile(&lats, 0.99),
            lat_p999_us: percentile(&lats, 0.999),
            lat_max_us: lats.last().map_or(0.0, |&l| f64::from(l) / 1000.0),
            daemon_cpu_s,
            iops_per_cpu_s,
            interval_ms: a.interval.map(|iv| iv.as_millis() as u64),
            interval_iops,
            interrupts_per_request,
        })
    }
}

fn run() -> Result<(), Error> {
    let a = parse_args()?;
    let max_depth = a.depths.iter().copied().max().unwrap_or(1);
    let mut b = blk(
        "creating the virtio-blk-vhost-user driver",
        Blkio::new("virtio-blk-vhost-user"),
    )?;
    blk("setting path", b.set_str("path", &a.socket))?;
    blk("connecting", b.connect())?;
    blk("setting num-queues", b.set_i32("num-queues", 1))?;
    let qsize = max_depth.next_power_of_two().max(64) as i32;
    let max_qsize = b.get_i32("max-queue-size").unwrap_or(qsize);
    blk(
        "setting queue-size",
        b.set_i32("queue-size", qsize.min(max_qsize)),
    )?;
    let mut started = blk("starting", b.start())?;
    let q = started
        .queues
        .pop()
        .ok_or_else(|| Error::Usage("the driver returned no queue".into()))?;
    let capacity = blk("reading capacity", b.get_u64("capacity"))?;
    let align = blk(
        "reading mem-region-alignment",
        b.get_u64("mem-region-alignment"),
    )? as usize;
    let len = (max_depth * a.bs).div_ceil(align.max(1)) * align.max(1);
    let region = blk("allocating buffers", b.alloc_mem_region(len))?;
    blk("mapping buffers", b.map_mem_region(&region))?;
    // SAFETY: the region is `len` bytes of fresh read-write shared memory we own.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xa5, len) };
    let blocks = capacity / a.bs as u64;
    if blocks == 0 {
        return Err(Error::Usage(format!(
            "disk of {capacity} bytes is smaller than one block"
        )));
    }
    let mut rig = Rig {
        q,
        buf: region.addr,
        blocks,
        rng: Rng(0x9e37_79b9_7f4a_7c15),
    };
    if let Some(at) = a.start_at {
        if let Ok(wait) = at.duration_since(std::time::SystemTime::now()) {
            std::thread::sleep(wait);
        }
    }
    let mut results = Vec::new();
    for &op in &a.ops {
        for &d in &a.depths {
            let r = rig.run(&a, op, d)?;
            println!(
                "{:<12} {:<9} bs={:<5} qd={:<3} {:>10.0} IOPS {:>8.1} MiB/s  lat us: mean {:>7.1} p50 {:>7.1} p99 {:>7.1} p99.9 {:>8.1} max {:>8.1}",
                r.label, format!("{:?}", r.op).to_lowercase(), r.block_size, r.queue_depth, r.iops, r.mib_per_s,
                r.lat_mean_us, r.lat_p50_us, r.lat_p99_us, r.lat_p999_us, r.lat_max_us
            );
            if let (Some(c), Some(k)) = (r.daemon_cpu_s, r.iops_per_cpu_s) {
                println!(
                    "{:<12} daemon CPU {c:.2} s, {k:.0} IOPS per daemon CPU-second",
                    r.label
                );
            }
            if let Some(ipr) = r.interrupts_per_request {
                println!("{:<12} {ipr:.3} interrupts per request", r.label);
            }
            if !r.interval_iops.is_empty() {
                let list: Vec<String> = r.interval_iops.iter().map(|v| format!("{v:.0}")).collect();
                println!(
                    "{:<12} IOPS per {} ms: {}",
                    r.label,
                    r.interval_ms.unwrap_or(0),
                    list.join(" ")
                );
            }
            results.push(r);
        }
    }
    let json = serde_json::to_string_pretty(&results).unwrap_or_default();
    match &a.json {
        Some(p) if p == "-" => println!("{json}"),
        Some(p) => std::fs::write(p, json + "\n").map_err(|source| Error::Json {
            path: p.clone(),
            source,
        })?,
        None => {}
    }
    drop(rig);
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iovirt-blk-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
