//! vtd
