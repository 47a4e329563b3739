//! Helpers shared by the real-client tests: run the VMM, wait for a marker in a log file.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The VMM binary under test.
pub const VMM: &str = env!("CARGO_BIN_EXE_iovirt-vmm");

/// `/dev/kvm` usable? Otherwise the caller skips with a message.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The guest image directory built by tools/guest-image/build.sh, if set.
pub fn guest_dir() -> Option<PathBuf> {
    std::env::var_os("IOVIRT_GUEST_DIR").map(PathBuf::from)
}

/// SeaBIOS: from the guest image directory, else Debian's package.
pub fn firmware() -> Option<PathBuf> {
    let candidates = guest_dir()
        .map(|d| d.join("bios-256k.bin"))
        .into_iter()
        .chain(std::iter::once(PathBuf::from(
            "/usr/share/seabios/bios-256k.bin",
        )));
    candidates.into_iter().find(|p| p.is_file())
}

/// Print why a test is skipped (the test then returns early and passes).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("iovirt-vmm-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running VMM, killed on drop.
pub struct Vmm {
    pub child: Child,
    pub started: Instant,
}

impl Vmm {
    pub fn spawn(args: &[&str]) -> Vmm {
        let started = Instant::now();
        let child = Command::new(VMM)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start iovirt-vmm");
        Vmm { child, started }
    }

    /// Wait until `log` contains `marker`; returns the time since launch, or the log
    /// so far on timeout or early exit.
    pub fn wait_for(
        &mut self,
        log: &Path,
        marker: &str,
        timeout: Duration,
    ) -> Result<Duration, String> {
        loop {
            let text = std::fs::read(log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            if text.contains(marker) {
                return Ok(self.started.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "iovirt-vmm exited ({status}) before {marker:?}; log:\n{text}"
                ));
            }
            if self.started.elapsed() > timeout {
                return Err(format!("no {marker:?} within {timeout:?}; log:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
