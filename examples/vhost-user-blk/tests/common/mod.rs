//! Helpers shared by the daemon's integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// Wait until the daemon `child` has created every one of `paths` (its
/// sockets); panics if it exits first or `timeout` passes.
pub fn wait_for_paths<P: AsRef<Path>>(child: &mut Child, paths: &[P], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for p in paths {
        let p = p.as_ref();
        while !p.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited early ({st}) before creating {}", p.display());
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not create {} in {timeout:?}",
                p.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
