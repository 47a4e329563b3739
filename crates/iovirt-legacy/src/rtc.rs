//! Placeholder for the rtc model.
