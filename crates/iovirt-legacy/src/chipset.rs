//! Placeholder for the chipset model.
