//! Placeholder for the i8042 model.
