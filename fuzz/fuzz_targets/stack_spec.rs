//! Fuzz the stack description parser: arbitrary text through TOML parsing,
//! the typed-spec walk and validation (which only examines paths, never opens
//! them). It must never panic, and every error must be one line.
#![no_main]
use iovirt_filter::stack::{parse_range, parse_size, StackSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_size(text);
    if let Ok(r) = parse_range(text) {
        assert!(r.start < r.end);
    }
    match StackSpec::from_toml_str(text) {
        Ok(spec) => {
            let _ = format!("{spec:?}");
            if let Err(e) = spec.validate() {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        }
    }
});
