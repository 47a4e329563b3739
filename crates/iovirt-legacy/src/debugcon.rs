//! Placeholder for the debugcon model.
