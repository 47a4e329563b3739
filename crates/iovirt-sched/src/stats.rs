//! Per-client statistics for a control interface: counts and a compact
//! latency histogram with bounded relative error.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two: values are kept within 1/8 (12.5 %).
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// A log-linear latency histogram (HDR-style): each power of two is split in
/// eight buckets, so a percentile is exact to within 12.5 %, in 4 KiB.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // ≥ SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = ((v >> shift) as usize) & (SUB - 1);
    ((shift as usize + 1) << SUB_BITS) + sub
}

fn bucket_high(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let shift = (b >> SUB_BITS) as u32 - 1;
    let sub = (b & (SUB - 1)) as u64;
    let low = (SUB as u64 + sub) << shift;
    low.saturating_add((1u64 << shift) - 1)
}

impl LatencyHistogram {
    /// Record one latency (ns).
    pub fn record(&mut self, ns: u64) {
        let b = bucket_of(ns).min(BUCKETS - 1);
        self.counts[b] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The largest recorded value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The `q`-quantile (`0.5`, `0.99`, …) in ns, rounded up to its bucket's
    /// upper bound; `None` before anything was recorded.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bucket_high(b).min(self.max));
            }
        }
        Some(self.max)
    }
}

/// What the scheduling stage knows about one client.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientStats {
    /// Requests waiting in the scheduler.
    pub queued: usize,
    /// Requests at the back-end.
    pub in_flight: usize,
    /// Requests completed successfully.
    pub completed: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Bytes moved by completed requests.
    pub bytes: u64,
    /// Cost units completed (see [`crate::CostModel`]).
    pub cost: f64,
    /// Dispatches chosen in the reservation phase.
    pub reservation_dispatches: u64,
    /// Latency from submission to completion (queueing included), ns.
    pub latency: LatencyHistogram,
}

impl ClientStats {
    /// Completions per second between an earlier snapshot and this one, `dt_ns` apart.
    pub fn iops_since(&self, earlier: &ClientStats, dt_ns: u64) -> f64 {
        let n = (self.completed + self.errors).saturating_sub(earlier.completed + earlier.errors);
        n as f64 * 1e9 / dt_ns.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_within_an_eighth() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.percentile(0.5), None);
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        for (q, want) in [
            (0.5, 5_000_000.0),
            (0.99, 9_900_000.0),
            (0.999, 9_990_000.0),
        ] {
            let got = h.percentile(q).unwrap() as f64;
            assert!(got >= want * 0.999 && got <= want * 1.126, "{q}: {got}");
        }
        assert_eq!(h.percentile(1.0), Some(10_000_000));
        h.record(u64::MAX);
        assert_eq!(h.max(), u64::MAX);
        for v in [0u64, 1, 7, 8, 9, 1 << 40] {
            assert!(bucket_high(bucket_of(v)) >= v);
        }
    }
}
