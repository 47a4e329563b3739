//! Typed errors of the schedulers.

use crate::ClientId;

/// What went wrong when configuring or feeding a scheduler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedError {
    /// The client id was never registered, or was removed.
    #[error("unknown scheduling client {0}")]
    UnknownClient(ClientId),
    /// A weight must be finite and greater than zero.
    #[error("weight {0} must be a finite number greater than zero")]
    InvalidWeight(f64),
    /// A reservation must be finite and not negative (0 means none).
    #[error("reservation {0} must be a finite number of IOPS, zero or more")]
    InvalidReservation(f64),
    /// A limit must be finite and greater than zero (use no limit for unlimited).
    #[error("limit {0} must be a finite number of IOPS greater than zero")]
    InvalidLimit(f64),
    /// A reservation above the limit can never be honoured.
    #[error("reservation {reservation} IOPS exceeds the limit of {limit} IOPS")]
    ReservationAboveLimit {
        /// The requested floor.
        reservation: f64,
        /// The requested ceiling.
        limit: f64,
    },
    /// A request's cost must be finite and greater than zero.
    #[error("request cost {0} must be a finite number greater than zero")]
    InvalidCost(f64),
    /// A textual option (`weight=2,limit=500`) could not be parsed.
    #[error("bad scheduling option {0:?} (expected reservation=IOPS, limit=IOPS|none, weight=N)")]
    BadOption(String),
    /// A PARDA controller parameter is out of range.
    #[error("PARDA parameter {name} = {value} is out of range")]
    InvalidParda {
        /// Which parameter.
        name: &'static str,
        /// Its value.
        value: f64,
    },
}
