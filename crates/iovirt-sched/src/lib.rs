//! # iovirt-sched: whose I/O goes next
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
