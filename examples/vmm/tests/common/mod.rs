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
    /// A directory under Cargo's per-target scratch directory (a real file system, where
    /// O_DIRECT works; /tmp may be tmpfs).
    pub fn in_target(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("iovirt-vmm-{tag}-{}-{nanos}", std::process::id()));
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

/// KVM and SeaBIOS both present? Returns the firmware path, or prints why the test skips.
pub fn seabios_ready(test: &str) -> Option<String> {
    if !kvm_available() {
        skip(test, "/dev/kvm is missing or not accessible");
        return None;
    }
    match firmware() {
        Some(fw) => Some(fw.to_string_lossy().into_owned()),
        None => {
            skip(
                test,
                "no SeaBIOS: apt-get install seabios, or set IOVIRT_GUEST_DIR",
            );
            None
        }
    }
}

/// Source of the test boot sector.
pub fn boot_asm() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bootsector/boot.asm")
}

/// Assemble the boot sector with `defines` (`-D` arguments without the `-D`) into
/// `out`; `None` (after a SKIPPED line) when nasm is not installed.
pub fn assemble(test: &str, defines: &[&str], out: &Path) -> Option<Vec<u8>> {
    let mut cmd = Command::new("nasm");
    cmd.arg("-f").arg("bin");
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    cmd.arg("-o").arg(out).arg(boot_asm());
    match cmd.output() {
        Ok(o) if o.status.success() => {
            Some(std::fs::read(out).expect("read assembled boot sector"))
        }
        Ok(o) => panic!("nasm failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip(
                test,
                "nasm is missing: apt-get install nasm (scripts/setup.sh installs it)",
            );
            None
        }
        Err(e) => panic!("cannot run nasm: {e}"),
    }
}

/// Word `k` of the test image pattern (the boot sector overwrites sector 0).
pub fn pattern_word(k: usize) -> u16 {
    k as u16
}

/// A disk image of `size` bytes whose 16-bit word k is k mod 65536, with `boot` in sector 0.
pub fn pattern_image(path: &Path, size: usize, boot: &[u8]) {
    let mut img = Vec::with_capacity(size);
    for k in 0..size / 2 {
        img.extend_from_slice(&pattern_word(k).to_le_bytes());
    }
    img[..boot.len()].copy_from_slice(boot);
    std::fs::write(path, img).expect("write disk image");
}

/// Run the VMM until it exits (or `timeout`); returns whether it exited 0 and
/// the debug console log.
pub fn run_to_exit(args: &[&str], log: &Path, timeout: Duration) -> (bool, String) {
    let mut vmm = Vmm::spawn(args);
    let status = loop {
        if let Some(s) = vmm.child.try_wait().expect("wait for iovirt-vmm") {
            break Some(s);
        }
        if vmm.started.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    match status {
        Some(s) => (s.success(), text),
        None => panic!("iovirt-vmm did not exit within {timeout:?}; log:\n{text}"),
    }
}

/// Size of the pattern disks the boot-sector tests use.
pub const BOOT_IMAGE_SIZE: usize = 4 << 20;
/// How long a SeaBIOS boot-sector run may take.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Sectors the read-write boot sector writes (the inverted pattern).
pub const WRITTEN: std::ops::Range<usize> = 16..24;

/// Boot SeaBIOS from a pattern disk carrying the boot sector variant
/// `defines`, the `--disk` value made by `disk_for(image, dir)`, with `extra`
/// VMM arguments (made by `extra_for(dir)`); asserts the VMM exited 0 and
/// returns the debug log, the image afterwards, the boot sector and the test
/// directory (kept until the caller has read what else the run wrote there).
pub fn boot_pattern_disk(
    test: &str,
    defines: &[&str],
    disk_for: impl Fn(&Path, &TempDir) -> String,
    extra_for: impl Fn(&TempDir) -> Vec<String>,
) -> Option<(String, Vec<u8>, Vec<u8>, TempDir)> {
    let fw = seabios_ready(test)?;
    let dir = TempDir::in_target(test);
    let boot = assemble(test, defines, &dir.path("boot.bin"))?;
    let img = dir.path("disk.img");
    pattern_image(&img, BOOT_IMAGE_SIZE, &boot);
    let log = dir.path("debugcon.log");
    let disk = disk_for(&img, &dir);
    let debugcon = format!("file={}", log.display());
    let extra = extra_for(&dir);
    let mut args = vec![
        "--firmware",
        &fw,
        "--serial",
        "null",
        "--debugcon",
        &debugcon,
        "--disk",
        &disk,
    ];
    args.extend(extra.iter().map(String::as_str));
    let started = Instant::now();
    let (ok, text) = run_to_exit(&args, &log, BOOT_TIMEOUT);
    eprintln!(
        "{test}: guest done in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(ok, "iovirt-vmm did not exit 0; log:\n{text}");
    let img = std::fs::read(&img).expect("read image");
    Some((text, img, boot, dir))
}

/// Check every word of a pattern image: the boot sector in sector 0, the
/// inverted pattern in `inverted` sectors, the pattern elsewhere.
pub fn check_image(img: &[u8], boot: &[u8], inverted: std::ops::Range<usize>) {
    assert_eq!(&img[..512], boot);
    for (i, w) in img.chunks_exact(2).enumerate().skip(256) {
        let got = u16::from_le_bytes([w[0], w[1]]);
        let want = if inverted.contains(&(i / 256)) {
            !pattern_word(i)
        } else {
            pattern_word(i)
        };
        assert_eq!(got, want, "word {i} (sector {})", i / 256);
    }
}
