//! Placeholder for the fw_cfg model.
