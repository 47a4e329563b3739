//! Fault-injection filter (being written).
