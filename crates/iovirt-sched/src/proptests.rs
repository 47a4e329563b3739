//! Properties of the mClock scheduler on random workloads, on virtual time:
//! limits are never exceeded in any window, the scheduler is work conserving,
//! and reservations are met whenever the capacity allows them.

use proptest::prelude::*;

use crate::{ClientParams, CostModel, MClock, Phase};

const SEC: u64 = 1_000_000_000;

#[derive(Clone, Debug)]
struct Spec {
    params: ClientParams,
    /// Request size in KiB (cost grows with it).
    kib: u64,
    /// Requests kept queued while active.
    depth: usize,
    /// Active during [on, off) in ms.
    on: u64,
    off: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        0u32..3,
        0.0f64..300.0,
        prop::option::of(50.0f64..800.0),
        1.0f64..8.0,
        prop::sample::select(vec![4u64, 16, 64, 256]),
        1usize..6,
        0u64..1000,
        1000u64..3000,
    )
        .prop_map(|(kind, r, l, w, kib, depth, on, off)| {
            let (reservation, limit) = match kind {
                0 => (0.0, None),
                1 => (0.0, l),
                _ => (l.map_or(r, |l| r.min(l)), l),
            };
            Spec {
                params: ClientParams::new(reservation, limit, w).unwrap(),
                kib,
                depth,
                on,
                off,
            }
        })
}

struct Run {
    /// Per client: (dispatch time, cost).
    served: Vec<Vec<(u64, f64)>>,
}

/// One device of `capacity` cost units per second serving the clients until
/// `end`; checks at every step that the choice matches the brute-force rules
/// and that the device idles only when no client is eligible.
fn simulate(specs: &[Spec], capacity: f64, end: u64) -> Result<Run, TestCaseError> {
    let model = CostModel::default();
    let mut s = MClock::new();
    let ids: Vec<_> = specs.iter().map(|c| s.add_client(c.params)).collect();
    let mut served = vec![Vec::new(); specs.len()];
    let mut queued = vec![0usize; specs.len()];
    let mut now = 0u64;
    while now < end {
        for (i, c) in specs.iter().enumerate() {
            let active = now >= c.on * 1_000_000 && now < c.off * 1_000_000;
            while active && queued[i] < c.depth {
                let cost = model.cost(c.kib << 10);
                s.enqueue(ids[i], (), cost, now).unwrap();
                queued[i] += 1;
            }
        }
        let expected = s.expected_choice(now);
        match s.dispatch(now) {
            Some(d) => {
                let (want, phase) = expected
                    .ok_or_else(|| TestCaseError::fail("dispatched while nothing eligible"))?;
                prop_assert_eq!(d.phase, phase);
                if phase == Phase::Reservation {
                    prop_assert_eq!(d.client, want);
                }
                let i = d.client.0 as usize;
                queued[i] -= 1;
                served[i].push((now, d.cost));
                now += (d.cost / capacity * SEC as f64) as u64;
            }
            None => {
                // Work conserving: idle only when no client is eligible.
                prop_assert!(expected.is_none(), "idle while a client was eligible");
                let next_on = specs
                    .iter()
                    .map(|c| c.on * 1_000_000)
                    .filter(|&t| t > now)
                    .min();
                let wake = match (s.next_eligible(), next_on) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap_or(end),
                };
                prop_assert!(wake > now || s.is_eligible(now));
                now = wake.max(now + 1);
            }
        }
    }
    Ok(Run { served })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn limits_hold_in_every_window_and_work_is_conserved(
        specs in prop::collection::vec(spec(), 1..6),
        capacity in 200.0f64..3000.0,
    ) {
        let run = simulate(&specs, capacity, 3 * SEC)?;
        for (c, served) in specs.iter().zip(&run.served) {
            let Some(limit) = c.params.limit else { continue };
            let max_cost = CostModel::default().cost(c.kib << 10);
            // Every window between two dispatches: cost ≤ limit × length + slack.
            for i in 0..served.len() {
                let mut sum = 0.0;
                for &(t, cost) in &served[i..] {
                    sum += cost;
                    let len = (t - served[i].0) as f64 / SEC as f64;
                    prop_assert!(
                        sum <= limit * len + 2.0 * max_cost + 1e-6,
                        "{sum} cost in {len} s over limit {limit}"
                    );
                }
            }
        }
    }

    #[test]
    fn reservations_met_when_capacity_allows(
        specs in prop::collection::vec(spec(), 1..6),
        capacity in 500.0f64..3000.0,
    ) {
        // Everyone backlogged all along; scale reservations to fit 90 % of the device.
        let mut specs = specs;
        let total: f64 = specs.iter().map(|c| c.params.reservation).sum();
        let scale = if total > 0.9 * capacity { 0.9 * capacity / total } else { 1.0 };
        for c in &mut specs {
            c.params.reservation *= scale;
            // Backlogged: a client at queue depth 1 cannot have a request
            // waiting when its reservation tag comes due behind another's
            // long request, whatever the scheduler does.
            c.depth = c.depth.max(4);
            c.on = 0;
            c.off = u64::MAX / 2_000_000;
        }
        let secs = 3;
        let run = simulate(&specs, capacity, secs * SEC)?;
        for (c, served) in specs.iter().zip(&run.served) {
            // A client with a limit can fall short: on a device that serves
            // one request at a time, another client's long request delays it,
            // and its limit (spaced from its previous dispatch, so that no
            // window ever exceeds it) forbids the catch-up burst, while work
            // conservation hands the gaps to others. Limits win over
            // reservations by design (docs/SCHEDULING.md); the property is
            // asserted for clients without one.
            if c.params.limit.is_some() {
                continue;
            }
            let got: f64 = served.iter().map(|s| s.1).sum();
            let want = c.params.reservation * secs as f64;
            let max_cost = CostModel::default().cost(c.kib << 10);
            prop_assert!(got >= want * 0.98 - 2.0 * max_cost, "{got} < {want} for {:?}", c.params);
        }
    }
}
