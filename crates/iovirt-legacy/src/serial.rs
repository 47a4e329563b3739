//! Placeholder for the serial model.
