// Real client: Debian's cloud kernel (vmlinux from tools/guest-image/build.sh) booted directly via PVH.

mod common;

use std::time::Duration;

use common::{guest_dir, kvm_available, skip, TempDir, Vmm};

#[test]
fn vmlinux_prints_linux_version() {
    let test = "vmlinux_prints_linux_version";
    if !kvm_available() {
        return skip(test, "/dev/kvm is missing or not accessible");
    }
    let Some(kernel) = guest_dir()
        .map(|d| d.join("vmlinux"))
        .filter(|p| p.is_file())
    else {
        return skip(test, "set IOVIRT_GUEST_DIR to a directory built by tools/guest-image/build.sh (needs vmlinux)");
    };
    let dir = TempDir::new("linux");
    let log = dir.path("serial.log");
    let serial = format!("file={}", log.display());
    let kernel = kernel.to_string_lossy().into_owned();
    let mut vmm = Vmm::spawn(&[
        "--kernel",
        &kernel,
        "--cmdline",
        "console=ttyS0 earlyprintk=serial",
        "--serial",
        &serial,
    ]);
    match vmm.wait_for(&log, "Linux version", Duration::from_secs(60)) {
        Ok(t) => eprintln!(
            "{test}: \"Linux version\" on serial {:.2} s after launch",
            t.as_secs_f64()
        ),
        Err(e) => panic!("{e}"),
    }
}
