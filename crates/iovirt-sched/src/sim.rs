//! Deterministic discrete-event simulators on virtual time: the mClock and
//! dmClock experiments ([`ServerSim`]), the mClock paper's classic run
//! ([`mclock_paper`]) and PARDA hosts over a shared array ([`PardaSim`]).
//!
//! Everything is seeded ([`SimRng`]), so a run is a pure function of its
//! configuration: tests assert on the numbers and the example draws them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::{
    ClientId, ClientParams, MClock, Parda, PardaConfig, Phase, SchedError, ServiceTracker,
};

/// Nanoseconds per second.
pub const SEC: u64 = 1_000_000_000;

/// A small seeded generator (SplitMix64) so simulations are reproducible.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }
}

/// One client of a [`ServerSim`].
#[derive(Clone, Debug)]
pub struct SimClient {
    /// A label for plots and messages.
    pub name: String,
    /// Its QoS settings (the same at every server: dmClock makes them global).
    pub params: ClientParams,
    /// Indexes of the servers it sends to.
    pub servers: Vec<usize>,
    /// Requests it keeps outstanding at each of its servers while active.
    pub depth: usize,
    /// Cost of each of its requests.
    pub cost: f64,
    /// Periods `[start, end)` in ns during which it issues requests.
    pub active: Vec<(u64, u64)>,
}

impl SimClient {
    /// A client always active, depth 8, unit cost, on the given servers.
    pub fn new(name: &str, params: ClientParams, servers: Vec<usize>) -> Self {
        SimClient {
            name: name.to_string(),
            params,
            servers,
            depth: 8,
            cost: 1.0,
            active: vec![(0, u64::MAX)],
        }
    }
}

/// A [`ServerSim`] setup.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Per server: `(from ns, capacity in cost units per second)`, sorted by time.
    pub capacity: Vec<Vec<(u64, f64)>>,
    /// The clients.
    pub clients: Vec<SimClient>,
    /// How long to run (ns).
    pub duration: u64,
    /// Width of a throughput bucket (ns).
    pub bucket: u64,
    /// Service times are scaled by a uniform factor in `[1 − jitter, 1 + jitter)`.
    pub jitter: f64,
    /// Seed of the jitter.
    pub seed: u64,
    /// Send dmClock's `delta` and `rho` (false: every server runs plain mClock).
    pub distributed: bool,
}

/// What a [`ServerSim`] run measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// Bucket width (ns).
    pub bucket: u64,
    /// `completions[client][bucket]`: requests completed per bucket.
    pub completions: Vec<Vec<u64>>,
    /// Per client, requests served in the reservation phase.
    pub reservation_served: Vec<u64>,
    /// Client names.
    pub names: Vec<String>,
}

impl SimReport {
    /// Requests per second of `client` over `[from, to)` ns (bucket-aligned).
    pub fn rate(&self, client: usize, from: u64, to: u64) -> f64 {
        let (a, b) = ((from / self.bucket) as usize, (to / self.bucket) as usize);
        let Some(series) = self.completions.get(client) else {
            return 0.0;
        };
        let n: u64 = series.iter().take(b).skip(a).sum();
        n as f64 * SEC as f64 / (to - from).max(1) as f64
    }

    /// Per-bucket rate series (requests per second) of `client`.
    pub fn series(&self, client: usize) -> Vec<f64> {
        let scale = SEC as f64 / self.bucket as f64;
        self.completions
            .get(client)
            .map(|s| s.iter().map(|&n| n as f64 * scale).collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// Server finished a request: (server, client, phase is reservation, cost in milli-units).
    Done(usize, usize, bool, u64),
    /// Try to dispatch at a server that was waiting for a tag to come due.
    Wake(usize),
    /// Client becomes active / inactive.
    On(usize),
    Off(usize),
}

struct Server {
    sched: MClock<()>,
    busy: bool,
    wake_at: Option<u64>,
}

/// Servers, each running an [`MClock`], shared by clients that keep a fixed
/// number of requests outstanding at each of their servers (closed loop).
/// One server reproduces mClock; several with `distributed` reproduce dmClock.
pub struct ServerSim {
    cfg: SimConfig,
    servers: Vec<Server>,
    ids: Vec<Vec<ClientId>>,
    trackers: Vec<ServiceTracker>,
    outstanding: Vec<Vec<usize>>,
    active: Vec<bool>,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    seq: u64,
    rng: SimRng,
    report: SimReport,
}

impl ServerSim {
    /// Check the setup and build the simulator.
    pub fn new(cfg: SimConfig) -> Result<Self, SchedError> {
        let n = cfg.capacity.len();
        let mut servers: Vec<Server> = (0..n)
            .map(|_| Server {
                sched: MClock::new(),
                busy: false,
                wake_at: None,
            })
            .collect();
        let mut ids = Vec::new();
        for c in &cfg.clients {
            c.params.validate()?;
            if !(c.cost.is_finite() && c.cost > 0.0) {
                return Err(SchedError::InvalidCost(c.cost));
            }
            ids.push(
                servers
                    .iter_mut()
                    .map(|s| s.sched.add_client(c.params))
                    .collect(),
            );
        }
        let buckets = (cfg.duration / cfg.bucket.max(1)) as usize + 1;
        let report = SimReport {
            bucket: cfg.bucket.max(1),
            completions: vec![vec![0; buckets]; cfg.clients.len()],
            reservation_served: vec![0; cfg.clients.len()],
            names: cfg.clients.iter().map(|c| c.name.clone()).collect(),
        };
        Ok(ServerSim {
            servers,
            ids,
            trackers: vec![ServiceTracker::new(n); cfg.clients.len()],
            outstanding: vec![vec![0; n]; cfg.clients.len()],
            active: vec![false; cfg.clients.len()],
            events: BinaryHeap::new(),
            seq: 0,
            rng: SimRng::new(cfg.seed),
            report,
            cfg,
        })
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, ev)));
    }

    fn capacity(&self, server: usize, t: u64) -> f64 {
        self.cfg.capacity[server]
            .iter()
            .take_while(|(from, _)| *from <= t)
            .last()
            .map_or(1.0, |&(_, c)| c.max(1e-9))
    }

    fn issue(&mut self, c: usize, s: usize, t: u64) {
        let req = if self.cfg.distributed {
            self.trackers[c].prepare(s)
        } else {
            Default::default()
        };
        let cost = self.cfg.clients[c].cost;
        // The client and cost were validated in `new`.
        let _ = self.servers[s]
            .sched
            .enqueue_with(self.ids[c][s], (), cost, req, t);
        self.outstanding[c][s] += 1;
        self.try_dispatch(s, t);
    }

    fn try_dispatch(&mut self, s: usize, t: u64) {
        if self.servers[s].busy {
            return;
        }
        match self.servers[s].sched.dispatch(t) {
            Some(d) => {
                self.servers[s].busy = true;
                let f = self
                    .rng
                    .uniform(1.0 - self.cfg.jitter, 1.0 + self.cfg.jitter);
                let service = (d.cost / self.capacity(s, t) * f * SEC as f64).max(1.0) as u64;
                let c = d.client.0 as usize;
                let resv = d.phase == Phase::Reservation;
                self.push(t + service, Ev::Done(s, c, resv, (d.cost * 1000.0) as u64));
            }
            None => {
                if let Some(at) = self.servers[s].sched.next_eligible() {
                    let at = at.max(t + 1);
                    if self.servers[s].wake_at.is_none_or(|w| w > at || w < t) {
                        self.servers[s].wake_at = Some(at);
                        self.push(at, Ev::Wake(s));
                    }
                }
            }
        }
    }

    /// Run to the end and report.
    pub fn run(mut self) -> SimReport {
        for c in 0..self.cfg.clients.len() {
            for &(from, to) in &self.cfg.clients[c].active.clone() {
                self.push(from, Ev::On(c));
                if to < self.cfg.duration {
                    self.push(to, Ev::Off(c));
                }
            }
        }
        while let Some(Reverse((t, _, ev))) = self.events.pop() {
            if t >= self.cfg.duration {
                break;
            }
            match ev {
                Ev::On(c) => {
                    self.active[c] = true;
                    for s in self.cfg.clients[c].servers.clone() {
                        if s >= self.servers.len() {
                            continue;
                        }
                        while self.outstanding[c][s] < self.cfg.clients[c].depth {
                            self.issue(c, s, t);
                        }
                    }
                }
                Ev::Off(c) => self.active[c] = false,
                Ev::Wake(s) => {
                    if self.servers[s].wake_at == Some(t) {
                        self.servers[s].wake_at = None;
                    }
                    self.try_dispatch(s, t);
                }
                Ev::Done(s, c, resv, milli) => {
                    let phase = if resv {
                        Phase::Reservation
                    } else {
                        Phase::Weight
                    };
                    self.trackers[c].completed(s, milli as f64 / 1000.0, phase);
                    self.report.completions[c][(t / self.report.bucket) as usize] += 1;
                    self.report.reservation_served[c] += u64::from(resv);
                    self.outstanding[c][s] -= 1;
                    self.servers[s].busy = false;
                    if self.active[c] {
                        self.issue(c, s, t);
                    }
                    self.try_dispatch(s, t);
                }
            }
        }
        self.report
    }
}

/// The mClock paper's classic experiment, scaled to one simulated device:
/// three clients on a server of 1200 IOPS that drops to 600 IOPS at 60 s.
///
/// - `reserved`: reservation 300, weight 1, no limit, active all along;
/// - `limited`: limit 400, weight 2, active all along;
/// - `weighted`: weight 2 only, active from 20 s.
///
/// Expected: 0–20 s `reserved` 800 (work conserving) and `limited` 400 (its
/// cap); 20–60 s 300 / 400 / 500 (the reservation beats its 1/5 share, the
/// limit caps `limited` and `weighted` takes the rest); 60–100 s 300 / 150 /
/// 150 (the reservation holds on the halved device, the rest is split 2:2).
pub fn mclock_paper(seed: u64) -> SimConfig {
    let c = |name: &str, r: f64, l: Option<f64>, w: f64, start: u64| SimClient {
        name: name.to_string(),
        params: ClientParams {
            reservation: r,
            limit: l,
            weight: w,
        },
        servers: vec![0],
        depth: 16,
        cost: 1.0,
        active: vec![(start, u64::MAX)],
    };
    SimConfig {
        capacity: vec![vec![(0, 1200.0), (60 * SEC, 600.0)]],
        clients: vec![
            c("reserved (R=300, w=1)", 300.0, None, 1.0, 0),
            c("limited (L=400, w=2)", 0.0, Some(400.0), 2.0, 0),
            c("weighted (w=2, from 20 s)", 0.0, None, 2.0, 20 * SEC),
        ],
        duration: 100 * SEC,
        bucket: SEC,
        jitter: 0.2,
        seed,
        distributed: false,
    }
}

/// A completion at the array: (time, sequence, host, VM, issued at).
type ArrayDone = (u64, u64, usize, u32, u64);

/// One host of a [`PardaSim`].
#[derive(Clone, Debug)]
pub struct SimHost {
    /// The weights of its VMs (each always has requests to issue).
    pub vm_weights: Vec<f64>,
}

/// A [`PardaSim`] setup.
#[derive(Clone, Debug)]
pub struct PardaSimConfig {
    /// The hosts; each gets `β = per_share · Σ weights`.
    pub hosts: Vec<SimHost>,
    /// `β` per unit of VM share.
    pub per_share: f64,
    /// Controller settings (its `beta` is replaced per host).
    pub controller: PardaConfig,
    /// Requests the array serves in parallel.
    pub array_parallelism: usize,
    /// Mean service time of one request at the array (ns), exponentially distributed.
    pub array_service_ns: f64,
    /// Control period (ns).
    pub period: u64,
    /// How long to run (ns); measurements cover the second half.
    pub duration: u64,
    /// Seed.
    pub seed: u64,
}

/// What a [`PardaSim`] run measured over the second half of the run.
#[derive(Clone, Debug)]
pub struct PardaReport {
    /// Per host: completions per second.
    pub host_iops: Vec<f64>,
    /// Per host, per VM: completions per second.
    pub vm_iops: Vec<Vec<f64>>,
    /// Mean latency of all completions (ns).
    pub mean_latency_ns: f64,
    /// Per host: window at the end.
    pub windows: Vec<f64>,
}

/// Hosts running PARDA windows over one shared array: a FIFO in front of
/// `array_parallelism` servers, so the latency grows with the total number of
/// outstanding requests. Inside a host an [`MClock`] shares the window among
/// the VMs by weight.
pub struct PardaSim;

impl PardaSim {
    /// Run the simulation.
    pub fn run(cfg: &PardaSimConfig) -> Result<PardaReport, SchedError> {
        struct Host {
            parda: Parda,
            sched: MClock<u64>,
            vms: Vec<ClientId>,
            outstanding: usize,
        }
        let mut hosts = Vec::new();
        for h in &cfg.hosts {
            let shares: f64 = h.vm_weights.iter().sum();
            let parda = Parda::new(PardaConfig {
                beta: crate::parda::beta_for_shares(shares, cfg.per_share),
                ..cfg.controller
            })?;
            let mut sched = MClock::new();
            let mut vms = Vec::new();
            for &w in &h.vm_weights {
                let id = sched.add_client(ClientParams::weight(w)?);
                // Backlogged VMs: keep a couple of requests queued at all times.
                sched.enqueue(id, 0, 1.0, 0)?;
                sched.enqueue(id, 0, 1.0, 0)?;
                vms.push(id);
            }
            hosts.push(Host {
                parda,
                sched,
                vms,
                outstanding: 0,
            });
        }
        let mut rng = SimRng::new(cfg.seed);
        // Array: FIFO of (host, vm, issued at) and the completion events.
        let mut fifo = std::collections::VecDeque::new();
        let mut busy = 0usize;
        // Events: (time, seq, host, vm, issued) completions; control ticks are periodic.
        let mut done: BinaryHeap<Reverse<ArrayDone>> = BinaryHeap::new();
        let mut seq = 0u64;
        let half = cfg.duration / 2;
        let mut host_n = vec![0u64; hosts.len()];
        let mut vm_n: Vec<Vec<u64>> = hosts.iter().map(|h| vec![0; h.vms.len()]).collect();
        let (mut lat_sum, mut lat_n) = (0f64, 0u64);
        let mut now = 0u64;
        let mut next_tick = cfg.period;
        let mean = cfg.array_service_ns.max(1.0);
        let service = |rng: &mut SimRng| (-(1.0 - rng.next_f64()).ln() * mean).max(1.0) as u64;

        loop {
            // Fill host windows.
            for (hi, h) in hosts.iter_mut().enumerate() {
                while h.outstanding < h.parda.window() {
                    let Some(d) = h.sched.dispatch(now) else {
                        break;
                    };
                    h.sched.enqueue(d.client, 0, 1.0, now)?;
                    h.outstanding += 1;
                    fifo.push_back((hi, d.client.0, now));
                }
            }
            while busy < cfg.array_parallelism {
                let Some((hi, vm, issued)) = fifo.pop_front() else {
                    break;
                };
                busy += 1;
                seq += 1;
                done.push(Reverse((now + service(&mut rng), seq, hi, vm, issued)));
            }
            let next_done = done.peek().map(|Reverse(e)| e.0).unwrap_or(u64::MAX);
            if next_tick.min(next_done) >= cfg.duration {
                break;
            }
            if next_tick <= next_done {
                now = next_tick;
                next_tick += cfg.period;
                for h in hosts.iter_mut() {
                    h.parda.update();
                }
                continue;
            }
            let Some(Reverse((t, _, hi, vm, issued))) = done.pop() else {
                break;
            };
            now = t;
            busy -= 1;
            let h = &mut hosts[hi];
            h.outstanding -= 1;
            h.parda.observe(t - issued);
            if t >= half {
                host_n[hi] += 1;
                vm_n[hi][vm as usize] += 1;
                lat_sum += (t - issued) as f64;
                lat_n += 1;
            }
        }
        let secs = (cfg.duration - half) as f64 / SEC as f64;
        Ok(PardaReport {
            host_iops: host_n.iter().map(|&n| n as f64 / secs).collect(),
            vm_iops: vm_n
                .iter()
                .map(|v| v.iter().map(|&n| n as f64 / secs).collect())
                .collect(),
            mean_latency_ns: if lat_n > 0 {
                lat_sum / lat_n as f64
            } else {
                0.0
            },
            windows: hosts.iter().map(|h| h.parda.window_f64()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near(got: f64, want: f64, tol: f64) -> bool {
        (got - want).abs() <= want * tol
    }

    #[test]
    fn mclock_paper_experiment() {
        let r = ServerSim::new(mclock_paper(7)).unwrap().run();
        let phase = |from: u64, to: u64| -> Vec<f64> {
            (0..3)
                .map(|c| r.rate(c, (from + 2) * SEC, to * SEC))
                .collect()
        };
        let (a, b, c) = (phase(0, 20), phase(20, 60), phase(60, 100));
        assert!(near(a[0], 800.0, 0.05) && near(a[1], 400.0, 0.03), "{a:?}");
        assert!(near(b[0], 300.0, 0.05) && near(b[1], 400.0, 0.03), "{b:?}");
        assert!(near(b[2], 500.0, 0.05), "{b:?}");
        assert!(near(c[0], 300.0, 0.05) && near(c[1], 150.0, 0.08), "{c:?}");
        assert!(near(c[2], 150.0, 0.08), "{c:?}");
    }

    /// Five clients over three servers of 1000 IOPS that drop to 600 at 20 s:
    /// `a`, `c`, `d` each use one server, `b` and `e` all three; `e` has a
    /// reservation of 900. `f` is bursty (on 2 s, off 2 s) on all servers.
    fn dm_config(distributed: bool) -> SimConfig {
        let w = |n: &str, servers: Vec<usize>| {
            SimClient::new(n, ClientParams::weight(1.0).unwrap(), servers)
        };
        let mut e = SimClient::new(
            "e",
            ClientParams::new(900.0, None, 1.0).unwrap(),
            vec![0, 1, 2],
        );
        e.depth = 8;
        SimConfig {
            capacity: vec![vec![(0, 1000.0), (20 * SEC, 600.0)]; 3],
            clients: vec![
                w("a", vec![0]),
                w("b", vec![0, 1, 2]),
                w("c", vec![1]),
                w("d", vec![2]),
                e,
            ],
            duration: 40 * SEC,
            bucket: SEC,
            jitter: 0.2,
            seed: 11,
            distributed,
        }
    }

    #[test]
    fn dmclock_global_reservation_and_shares() {
        let r = ServerSim::new(dm_config(true)).unwrap().run();
        // 0-20 s: 3000 IOPS; e reserves 900, the others share 2100 equally (525).
        let first: Vec<f64> = (0..5).map(|c| r.rate(c, 2 * SEC, 20 * SEC)).collect();
        assert!(first[4] >= 900.0 * 0.97, "{first:?}");
        for (c, &got) in first.iter().enumerate().take(4) {
            assert!(near(got, 525.0, 0.10), "client {c}: {first:?}");
        }
        // 20-40 s: 1800 IOPS; e keeps 900, the others share 900 (225 each).
        let second: Vec<f64> = (0..5).map(|c| r.rate(c, 22 * SEC, 40 * SEC)).collect();
        assert!(second[4] >= 900.0 * 0.97, "{second:?}");
        for (c, &got) in second.iter().enumerate().take(4) {
            assert!(near(got, 225.0, 0.12), "client {c}: {second:?}");
        }
        // Without delta/rho every server applies e's reservation on its own
        // (2700 instead of 900) and b gets a share at each server.
        let plain = ServerSim::new(dm_config(false)).unwrap().run();
        let plain_e = plain.rate(4, 2 * SEC, 20 * SEC);
        assert!(plain_e > 2000.0 && first[4] < 1000.0, "{plain_e} {first:?}");
    }

    #[test]
    fn dmclock_bursty_client_banks_no_credit() {
        let mut cfg = dm_config(true);
        cfg.capacity = vec![vec![(0, 1000.0)]; 3];
        cfg.clients.truncate(4);
        let mut f = SimClient::new("f", ClientParams::weight(1.0).unwrap(), vec![0, 1, 2]);
        f.active = (0..10)
            .map(|k| (k * 4 * SEC, k * 4 * SEC + 2 * SEC))
            .collect();
        cfg.clients.push(f);
        let r = ServerSim::new(cfg).unwrap().run();
        // While f is on, five equal clients share 3000 IOPS: 600 each, and the
        // first second of each burst is no better than the second.
        for k in 1..9u64 {
            let on = r.rate(4, k * 4 * SEC, k * 4 * SEC + 2 * SEC);
            assert!(near(on, 600.0, 0.12), "burst {k}: {on}");
            let first = r.rate(4, k * 4 * SEC, k * 4 * SEC + SEC);
            assert!(first < 600.0 * 1.15, "burst {k}: first second {first}");
        }
    }

    #[test]
    fn parda_shares_follow_beta_and_latency_sits_at_threshold() {
        let cfg = PardaSimConfig {
            hosts: vec![
                SimHost {
                    vm_weights: vec![1.0],
                },
                SimHost {
                    vm_weights: vec![1.0, 1.0],
                },
                SimHost {
                    vm_weights: vec![1.0, 2.0],
                },
            ],
            per_share: 2.0,
            controller: PardaConfig {
                latency_threshold_ns: 25e6,
                gamma: 0.2,
                latency_ewma: 0.5,
                ..Default::default()
            },
            array_parallelism: 8,
            array_service_ns: 1.6e6,
            period: 100_000_000,
            duration: 30 * SEC,
            seed: 3,
        };
        let r = PardaSim::run(&cfg).unwrap();
        let h = &r.host_iops;
        assert!(near(h[1] / h[0], 2.0, 0.10), "{r:?}");
        assert!(near(h[2] / h[0], 3.0, 0.10), "{r:?}");
        assert!(near(r.vm_iops[2][1] / r.vm_iops[2][0], 2.0, 0.10), "{r:?}");
        // Equilibrium latency is L + Σβ/C = 25 ms + 12/5000 s = 27.4 ms.
        assert!(near(r.mean_latency_ns, 25e6, 0.15), "{r:?}");
        assert!(near(h.iter().sum::<f64>(), 5000.0, 0.05), "{r:?}");
    }
}
