//! Aggregation: concatenation and striping of several children into one disk.

pub(crate) mod parts;
