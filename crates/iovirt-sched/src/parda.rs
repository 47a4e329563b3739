//! PARDA (Gulati, Ahmad and Waldspurger, FAST 2009): each host sharing a
//! storage array sizes its issue queue (its window of outstanding requests)
//! from the latency it observes, with no central scheduler:
//!
//! `w(t+1) = (1 − γ)·w(t) + γ·(L / Lat(t) · w(t) + β)`
//!
//! where `L` is the latency threshold, `Lat(t)` the averaged latency and `β`
//! proportional to the aggregate shares of the host's VMs. At the fixed point
//! every host sees the same latency, so each host's throughput `w/Lat` is
//! proportional to its `β`, and the latency settles a little above `L`. Inside
//! a host, an [`crate::MClock`] with the VMs' weights picks whose request fills
//! the window (see [`crate::sim::PardaSim`]).

use serde::{Deserialize, Serialize};

use crate::SchedError;

/// Settings of one host's PARDA controller.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PardaConfig {
    /// Latency threshold `L` in nanoseconds: the latency the array should run at.
    pub latency_threshold_ns: f64,
    /// Smoothing `γ` of the window update, in (0, 1].
    pub gamma: f64,
    /// `β`: this host's aggregate VM shares times a per-share constant (see [`beta_for_shares`]).
    pub beta: f64,
    /// Weight of the newest period's mean latency in the latency average, in (0, 1].
    pub latency_ewma: f64,
    /// Smallest window.
    pub min_window: f64,
    /// Largest window.
    pub max_window: f64,
}

impl Default for PardaConfig {
    fn default() -> Self {
        PardaConfig {
            latency_threshold_ns: 25e6,
            gamma: 0.2,
            beta: 1.0,
            latency_ewma: 0.5,
            min_window: 1.0,
            max_window: 1024.0,
        }
    }
}

/// `β` for a host whose VMs' shares add up to `shares`: `per_share · shares`.
/// The same `per_share` on every host makes throughput proportional to shares.
pub fn beta_for_shares(shares: f64, per_share: f64) -> f64 {
    shares * per_share
}

/// One host's window controller.
///
/// ```
/// use iovirt_sched::{Parda, PardaConfig};
///
/// let mut p = Parda::new(PardaConfig { beta: 2.0, ..Default::default() }).unwrap();
/// let w0 = p.window();
/// // Latency under the 25 ms threshold: the window grows.
/// p.observe(5_000_000);
/// p.update();
/// assert!(p.window() > w0);
/// ```
#[derive(Clone, Debug)]
pub struct Parda {
    cfg: PardaConfig,
    window: f64,
    avg_latency: Option<f64>,
    period_sum: f64,
    period_count: u64,
}

impl Parda {
    /// A controller starting at the smallest window.
    pub fn new(cfg: PardaConfig) -> Result<Self, SchedError> {
        let bad = |name, value| Err(SchedError::InvalidParda { name, value });
        if !(cfg.latency_threshold_ns.is_finite() && cfg.latency_threshold_ns > 0.0) {
            return bad("latency_threshold_ns", cfg.latency_threshold_ns);
        }
        if !(cfg.gamma > 0.0 && cfg.gamma <= 1.0) {
            return bad("gamma", cfg.gamma);
        }
        if !(cfg.beta.is_finite() && cfg.beta >= 0.0) {
            return bad("beta", cfg.beta);
        }
        if !(cfg.latency_ewma > 0.0 && cfg.latency_ewma <= 1.0) {
            return bad("latency_ewma", cfg.latency_ewma);
        }
        if !(cfg.min_window >= 1.0
            && cfg.max_window >= cfg.min_window
            && cfg.max_window.is_finite())
        {
            return bad("max_window", cfg.max_window);
        }
        Ok(Parda {
            cfg,
            window: cfg.min_window,
            avg_latency: None,
            period_sum: 0.0,
            period_count: 0,
        })
    }

    /// A request completed after `latency_ns`.
    pub fn observe(&mut self, latency_ns: u64) {
        self.period_sum += latency_ns as f64;
        self.period_count += 1;
    }

    /// End of a control period: fold the period's mean latency into the
    /// average and compute the next window. A period without completions
    /// leaves everything as it was.
    pub fn update(&mut self) -> f64 {
        if self.period_count > 0 {
            let mean = self.period_sum / self.period_count as f64;
            let a = self.cfg.latency_ewma;
            let avg = match self.avg_latency {
                Some(prev) => a * mean + (1.0 - a) * prev,
                None => mean,
            };
            self.avg_latency = Some(avg);
            self.period_sum = 0.0;
            self.period_count = 0;
            let g = self.cfg.gamma;
            let target = self.cfg.latency_threshold_ns / avg.max(1.0) * self.window + self.cfg.beta;
            self.window = ((1.0 - g) * self.window + g * target)
                .clamp(self.cfg.min_window, self.cfg.max_window);
        }
        self.window
    }

    /// The current window as a whole number of requests (at least one).
    pub fn window(&self) -> usize {
        self.window.floor().max(1.0) as usize
    }

    /// The current window, unrounded.
    pub fn window_f64(&self) -> f64 {
        self.window
    }

    /// The averaged latency in nanoseconds, once a period has completed.
    pub fn avg_latency_ns(&self) -> Option<f64> {
        self.avg_latency
    }

    /// Change `β` when the host's VMs or their shares change.
    pub fn set_beta(&mut self, beta: f64) -> Result<(), SchedError> {
        if !(beta.is_finite() && beta >= 0.0) {
            return Err(SchedError::InvalidParda {
                name: "beta",
                value: beta,
            });
        }
        self.cfg.beta = beta;
        Ok(())
    }

    /// The settings.
    pub fn config(&self) -> &PardaConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_shrinks_above_threshold_and_rejects_nonsense() {
        let mut p = Parda::new(PardaConfig {
            beta: 1.0,
            min_window: 1.0,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..50 {
            p.observe(1_000_000);
            p.update();
        }
        let big = p.window_f64();
        for _ in 0..50 {
            p.observe(100_000_000);
            p.update();
        }
        assert!(p.window_f64() < big / 2.0);
        assert!(Parda::new(PardaConfig {
            gamma: 0.0,
            ..Default::default()
        })
        .is_err());
        assert!(p.set_beta(f64::NAN).is_err());
    }
}
