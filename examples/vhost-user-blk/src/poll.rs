//! Adaptive polling: poll the ring after a kick only when it costs less CPU
//! per request than sleeping.
//!
//! Polling the avail ring (and the completions) for a while after each batch
//! saves the kick, the eventfd read and the sleep/wake of the worker; it pays
//! when the next request or completion comes soon (a null or memory disk, a
//! fast NVMe device, a driver that keeps the queue busy) and burns a core for
//! nothing when it does not (an O_DIRECT file whose requests take 100 µs).
//! Which one wins depends on the back-end, the queue depth and the host, so
//! [`PollTuner`] measures it: the worker's CPU time per completed request is
//! sampled over short epochs in the current mode, the other mode is tried for
//! one epoch every so often, and the cheaper one is kept. Polling keeps a
//! small advantage (it also cuts latency): it stays on unless it costs more
//! than [`POLL_BIAS`] times the CPU per request of sleeping.
//!
//! The tuner is plain state driven by [`PollTuner::observe`] with the clock
//! and the counters passed in, so it is tested on made-up numbers.

use std::time::{Duration, Instant};

/// How polling is chosen (`--poll-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PollMode {
    /// Measure and keep the cheaper of polling for the window and not polling.
    #[default]
    Adaptive,
    /// Always poll for the window after a kick.
    Fixed,
}

impl std::str::FromStr for PollMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "adaptive" => Ok(PollMode::Adaptive),
            "fixed" => Ok(PollMode::Fixed),
            _ => Err(format!("{s:?}: expected adaptive or fixed")),
        }
    }
}

/// Length of one measurement epoch.
pub const EPOCH: Duration = Duration::from_millis(50);
/// Fewer completed requests than this in an epoch: too little to judge.
pub const MIN_REQUESTS: u64 = 32;
/// After this many epochs in one mode, the other is measured for one epoch.
pub const EXPLORE_EVERY: u32 = 20;
/// Polling is kept while its CPU per request is at most this times sleeping's.
pub const POLL_BIAS: f64 = 1.15;

/// The adaptive polling decision of one queue worker.
#[derive(Clone, Debug)]
pub struct PollTuner {
    window: Duration,
    mode: PollMode,
    polling: bool,
    exploring: bool,
    epochs: u32,
    /// CPU ns per request: `[sleeping, polling]`, smoothed.
    cost: [Option<f64>; 2],
    epoch: Option<(Instant, u64, u64)>,
}

impl PollTuner {
    /// A tuner polling for at most `window` (zero: never poll).
    pub fn new(window: Duration, mode: PollMode) -> Self {
        PollTuner {
            window,
            mode,
            polling: !window.is_zero(),
            exploring: false,
            epochs: 0,
            cost: [None, None],
            epoch: None,
        }
    }

    /// How long to poll after the current batch (zero: do not poll).
    pub fn window(&self) -> Duration {
        if self.polling {
            self.window
        } else {
            Duration::ZERO
        }
    }

    /// The smoothed CPU nanoseconds per request measured `[sleeping, polling]`.
    pub fn costs(&self) -> [Option<f64>; 2] {
        self.cost
    }

    /// Whether `now` ends the current epoch (cheap: no counters needed yet).
    pub fn epoch_due(&self, now: Instant) -> bool {
        self.mode == PollMode::Adaptive
            && !self.window.is_zero()
            && self
                .epoch
                .is_none_or(|(start, _, _)| now.duration_since(start) >= EPOCH)
    }

    /// Feed the clock, the worker's CPU time (ns) and the requests it has
    /// completed so far; at the end of an epoch this may switch modes.
    pub fn observe(&mut self, now: Instant, cpu_ns: u64, completed: u64) {
        if !self.epoch_due(now) {
            return;
        }
        let Some((_, cpu0, done0)) = self.epoch.replace((now, cpu_ns, completed)) else {
            return;
        };
        let requests = completed.saturating_sub(done0);
        if requests < MIN_REQUESTS {
            // Idle or nearly: nothing to learn; an exploration starts over.
            if self.exploring {
                self.exploring = false;
                self.polling = !self.polling;
            }
            return;
        }
        let per_request = cpu_ns.saturating_sub(cpu0) as f64 / requests as f64;
        // The mode just explored gets its fresh sample (its old one may be
        // from another workload); the current mode is smoothed.
        let slot = &mut self.cost[usize::from(self.polling)];
        *slot = Some(match *slot {
            Some(c) if !self.exploring => 0.5 * c + 0.5 * per_request,
            _ => per_request,
        });
        if self.exploring {
            self.exploring = false;
            self.polling = match self.cost {
                [Some(sleep), Some(poll)] => poll <= POLL_BIAS * sleep,
                _ => self.polling,
            };
            self.epochs = 0;
            return;
        }
        self.epochs += 1;
        if self.cost[usize::from(!self.polling)].is_none() || self.epochs >= EXPLORE_EVERY {
            self.exploring = true;
            self.polling = !self.polling;
        }
    }
}

/// CPU time of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker on made-up time: epochs where polling costs `poll_ns` and
    /// sleeping `sleep_ns` per request, 1000 requests an epoch.
    struct Sim {
        now: Instant,
        cpu: u64,
        done: u64,
    }

    impl Sim {
        fn new(t: &mut PollTuner) -> Self {
            let s = Sim {
                now: Instant::now(),
                cpu: 0,
                done: 0,
            };
            t.observe(s.now, s.cpu, s.done);
            s
        }

        /// Run `epochs`; returns whether each polled.
        fn run(
            &mut self,
            t: &mut PollTuner,
            epochs: usize,
            sleep_ns: u64,
            poll_ns: u64,
        ) -> Vec<bool> {
            let mut modes = Vec::new();
            for _ in 0..epochs {
                let polling = !t.window().is_zero();
                modes.push(polling);
                self.now += EPOCH;
                self.cpu += 1000 * if polling { poll_ns } else { sleep_ns };
                self.done += 1000;
                t.observe(self.now, self.cpu, self.done);
            }
            modes
        }
    }

    fn run(t: &mut PollTuner, epochs: usize, sleep_ns: u64, poll_ns: u64) -> Vec<bool> {
        Sim::new(t).run(t, epochs, sleep_ns, poll_ns)
    }

    #[test]
    fn keeps_polling_when_it_is_cheaper() {
        let mut t = PollTuner::new(Duration::from_micros(50), PollMode::Adaptive);
        let modes = run(&mut t, 100, 18_000, 15_000);
        // One epoch in five-score tries sleeping; the rest polls.
        assert!(modes.iter().filter(|&&p| p).count() >= 94, "{modes:?}");
        assert!(!t.window().is_zero());
    }

    #[test]
    fn stops_polling_when_it_burns_cpu() {
        let mut t = PollTuner::new(Duration::from_micros(50), PollMode::Adaptive);
        let mut sim = Sim::new(&mut t);
        let modes = sim.run(&mut t, 100, 60_000, 92_000);
        assert!(modes.iter().filter(|&&p| !p).count() >= 94, "{modes:?}");
        assert!(t.window().is_zero());
        // And comes back (at the next exploration) when the workload changes.
        let modes = sim.run(&mut t, 50, 18_000, 15_000);
        assert!(!t.window().is_zero(), "{modes:?}");
    }

    #[test]
    fn slightly_dearer_polling_is_kept_for_its_latency() {
        let mut t = PollTuner::new(Duration::from_micros(50), PollMode::Adaptive);
        run(&mut t, 50, 10_000, 11_000);
        assert!(!t.window().is_zero());
    }

    #[test]
    fn idle_epochs_teach_nothing_and_fixed_mode_never_changes() {
        let mut t = PollTuner::new(Duration::from_micros(50), PollMode::Adaptive);
        let now = Instant::now();
        for i in 0..10u32 {
            t.observe(now + EPOCH * i, u64::from(i) * 1_000_000, u64::from(i));
        }
        assert_eq!(t.costs(), [None, None]);
        assert!(!t.window().is_zero());
        let mut f = PollTuner::new(Duration::from_micros(50), PollMode::Fixed);
        run(&mut f, 50, 10_000, 90_000);
        assert_eq!(f.window(), Duration::from_micros(50));
        let mut z = PollTuner::new(Duration::ZERO, PollMode::Adaptive);
        run(&mut z, 50, 90_000, 10_000);
        assert!(z.window().is_zero());
    }

    #[test]
    fn thread_cpu_time_advances() {
        let a = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_ns() > a);
    }
}
