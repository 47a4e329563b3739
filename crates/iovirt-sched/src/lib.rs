//! # iovirt-sched: whose I/O goes next
//!
//! In iovirt's I/O path (guest driver → trap → bus → front-end device →
//! filters → **scheduler** → back-end), this crate decides, when several VMs
//! (disks, vhost-user exports) share one device, whose request is issued
//! next. That decision is a product feature: a **reservation** (an IOPS
//! floor), a **limit** (an IOPS ceiling) and a **weight** (a share of what is
//! left) per client, changeable at run time.
//!
//! - [`MClock`]: mClock (Gulati, Merchant and Varman, OSDI 2010) over any
//!   queued item, on injected time (`now` in ns), O(log n) per decision, with
//!   a size-aware [`CostModel`].
//! - [`ServiceTracker`] and [`MClock::enqueue_with`]: dmClock, the same
//!   guarantees for clients served by several servers.
//! - [`Parda`]: PARDA (Gulati, Ahmad and Waldspurger, FAST 2009), a host's
//!   issue window from the latency it sees, for hosts sharing an array.
//! - [`SharedScheduler`] and [`SchedStage`]: the stage itself, a
//!   [`iovirt_backend::BlockBackend`] per client in front of shared or own
//!   back-ends, with per-client [`ClientStats`].
//! - [`sim`]: seeded discrete-event simulators that reproduce the papers'
//!   experiments; the tests assert on their numbers.
//!
//! The stage never looks inside a request beyond its size and never fails
//! one itself: a request it cannot queue completes with
//! `BlockError::Dropped`, and every value that comes from a client (the
//! dmClock `delta` and `rho`, costs, textual options) is checked or clamped.
//! It never blocks a submitting thread: `submit` queues and returns.
//!
//! ```
//! use iovirt_sched::{ClientParams, CostModel, MClock};
//!
//! // A 1000-IOPS device shared by a reserved, a capped and a weighted client.
//! let mut s = MClock::new();
//! let gold = s.add_client("reservation=500".parse().unwrap());
//! let capped = s.add_client(ClientParams::new(0.0, Some(100.0), 4.0).unwrap());
//! let plain = s.add_client(ClientParams::weight(1.0).unwrap());
//! let cost = CostModel::UNIT.cost(4096);
//! let mut served = [0u32; 3];
//! for c in [gold, capped, plain] {
//!     for _ in 0..8 {
//!         s.enqueue(c, (), cost, 0).unwrap();
//!     }
//! }
//! for ms in 0..2000u64 {
//!     let now = ms * 1_000_000;
//!     if let Some(d) = s.dispatch(now) {
//!         served[d.client.0 as usize] += 1;
//!         s.enqueue(d.client, (), cost, now).unwrap();
//!     }
//! }
//! // Two seconds: gold ≥ 1000, capped ≤ 200 (+1), plain takes the rest.
//! assert!(served[0] >= 1000 && served[1] <= 201, "{served:?}");
//! assert_eq!(served.iter().sum::<u32>(), 2000);
//! ```
#![deny(missing_docs)]

mod dmclock;
mod error;
mod heap;
mod mclock;
mod parda;
#[cfg(test)]
mod proptests;
pub mod sim;
mod stage;
mod stats;

pub use dmclock::{ReqParams, ServiceTracker};
pub use error::SchedError;
pub use mclock::{ClientId, ClientParams, CostModel, Dispatched, MClock, Phase};
pub use parda::{beta_for_shares, Parda, PardaConfig};
pub use stage::{
    Clock, ManualClock, MonotonicClock, SchedStage, SharedScheduler, StageConfig, TimerHandle,
};
pub use stats::{ClientStats, LatencyHistogram};
