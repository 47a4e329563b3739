//! # iovirt-filter: interposition on every I/O
//!
//! In iovirt's I/O path (guest driver → trap → bus → front-end device →
//! **filters** → scheduler → back-end), a filter is a [`iovirt_backend::BlockBackend`]
//! that wraps one or more back-ends and transforms, observes or redirects the
//! requests on their way: fault injection for tests, LUKS-compatible encryption,
//! and (later) replication, logging and aggregation. Because a filter is just a
//! back-end, stacks nest freely, and the same stack serves an in-process device
//! and the vhost-user-blk daemon.
//!
//! A filter must keep the meaning of flush, FUA, discard and write-zeroes, and
//! must keep the device status an error maps to.
#![deny(missing_docs)]

pub mod aggregate;
pub mod crypt;
pub mod fault;
pub mod migrate;
pub mod mirror;
pub mod multipath;
pub mod redolog;
pub mod stack;
