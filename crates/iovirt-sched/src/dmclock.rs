//! dmClock, the distributed form of mClock: several servers (back-ends) serve
//! the same clients, each running its own [`crate::MClock`]. A client's
//! [`ServiceTracker`] tells each server, with every request, how much service
//! the client got elsewhere since its previous request to that server:
//! `delta` (all completions) and `rho` (completions served in the
//! reservation phase). The server advances the client's limit and share tags
//! by `cost + delta` and its reservation tag by `cost + rho`, so reservations,
//! limits and weights hold for the client's total service across servers.
//!
//! Both are in cost units (see [`crate::CostModel`]); with unit costs they are
//! the paper's counts minus the request itself.

use serde::{Deserialize, Serialize};

use crate::Phase;

/// What a dmClock request carries to its server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReqParams {
    /// Cost completed for the client at other servers since its previous request here.
    pub delta: f64,
    /// The part of `delta` served in the reservation phase.
    pub rho: f64,
}

impl ReqParams {
    /// Clamp to `0 ≤ rho ≤ delta`, finite: the values come from the client.
    pub fn sanitized(self) -> Self {
        let fix = |x: f64| if x.is_finite() && x > 0.0 { x } else { 0.0 };
        let delta = fix(self.delta);
        ReqParams {
            delta,
            rho: fix(self.rho).min(delta),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct PerServer {
    /// Global totals when the client last sent a request to this server.
    total_at_last: f64,
    resv_at_last: f64,
    /// Completions at this server since then.
    own_since: f64,
    own_resv_since: f64,
}

/// The client side of dmClock: counts completions per server and computes the
/// `delta` and `rho` of the next request to a server, in O(1).
///
/// ```
/// use iovirt_sched::{Phase, ServiceTracker};
///
/// let mut t = ServiceTracker::new(2);
/// let first = t.prepare(0);
/// assert_eq!(first.delta, 0.0);
/// t.completed(1, 1.0, Phase::Reservation);
/// t.completed(1, 1.0, Phase::Weight);
/// t.completed(0, 1.0, Phase::Weight);
/// // Server 0 learns of the two completions at server 1, one of them a reservation.
/// let next = t.prepare(0);
/// assert_eq!((next.delta, next.rho), (2.0, 1.0));
/// ```
#[derive(Clone, Debug)]
pub struct ServiceTracker {
    total: f64,
    resv: f64,
    servers: Vec<PerServer>,
}

impl ServiceTracker {
    /// A tracker for a client of `servers` servers (more are added on demand).
    pub fn new(servers: usize) -> Self {
        ServiceTracker {
            total: 0.0,
            resv: 0.0,
            servers: vec![PerServer::default(); servers],
        }
    }

    fn server(&mut self, server: usize) -> &mut PerServer {
        if self.servers.len() <= server {
            let (total, resv) = (self.total, self.resv);
            self.servers.resize(
                server + 1,
                PerServer {
                    total_at_last: total,
                    resv_at_last: resv,
                    ..Default::default()
                },
            );
        }
        &mut self.servers[server]
    }

    /// The `delta` and `rho` to send with the next request to `server`.
    pub fn prepare(&mut self, server: usize) -> ReqParams {
        let (total, resv) = (self.total, self.resv);
        let s = self.server(server);
        let delta = (total - s.total_at_last - s.own_since).max(0.0);
        let rho = (resv - s.resv_at_last - s.own_resv_since).clamp(0.0, delta);
        *s = PerServer {
            total_at_last: total,
            resv_at_last: resv,
            own_since: 0.0,
            own_resv_since: 0.0,
        };
        ReqParams { delta, rho }
    }

    /// A request of `cost` completed at `server`, chosen in `phase`.
    pub fn completed(&mut self, server: usize, cost: f64, phase: Phase) {
        let cost = if cost.is_finite() && cost > 0.0 {
            cost
        } else {
            0.0
        };
        let resv = phase == Phase::Reservation;
        self.total += cost;
        if resv {
            self.resv += cost;
        }
        let s = self.server(server);
        s.own_since += cost;
        if resv {
            s.own_resv_since += cost;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_server_is_plain_mclock() {
        let mut t = ServiceTracker::new(1);
        for _ in 0..10 {
            assert_eq!(t.prepare(0), ReqParams::default());
            t.completed(0, 1.0, Phase::Reservation);
        }
    }

    #[test]
    fn hostile_values_are_clamped() {
        let r = ReqParams {
            delta: f64::NAN,
            rho: 5.0,
        }
        .sanitized();
        assert_eq!(r, ReqParams::default());
        let r = ReqParams {
            delta: 2.0,
            rho: 1e300,
        }
        .sanitized();
        assert_eq!(r.rho, 2.0);
    }
}
