// Real client: the iovirt-vmm binary itself, run as a user would, checked for one-line errors.

mod common;

use std::process::Command;

use common::{TempDir, VMM};

/// Run the VMM, expect failure, return stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(VMM)
        .args(args)
        .output()
        .expect("run iovirt-vmm");
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    err
}

#[test]
fn bad_size() {
    let e = fails(&["--mem", "lots"]);
    assert!(e.contains("bad size \"lots\""), "{e}");
    let e = fails(&["--mem", "1M"]);
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn unknown_option_and_missing_value() {
    assert!(fails(&["--frobnicate"]).contains("unknown option"));
    assert!(fails(&["--cpus"]).contains("needs a value"));
    assert!(fails(&["--cpus", "0"]).contains("bad --cpus"));
}

#[test]
fn missing_kvm_device() {
    let e = fails(&["--kvm-device", "/nonexistent/kvm"]);
    assert!(e.contains("/nonexistent/kvm does not exist"), "{e}");
}

#[test]
fn missing_firmware() {
    if std::fs::metadata("/dev/kvm").is_err() {
        return common::skip(
            "missing_firmware",
            "/dev/kvm is missing (the firmware is read after KVM opens)",
        );
    }
    let e = fails(&["--firmware", "/nonexistent/bios.bin", "--serial", "null"]);
    assert!(e.contains("apt-get install seabios"), "{e}");
}

#[test]
fn missing_kernel() {
    if std::fs::metadata("/dev/kvm").is_err() {
        return common::skip("missing_kernel", "/dev/kvm is missing");
    }
    let e = fails(&["--kernel", "/nonexistent/vmlinux", "--serial", "null"]);
    assert!(e.contains("cannot read kernel /nonexistent/vmlinux"), "{e}");
}

#[test]
fn not_a_kernel() {
    if std::fs::metadata("/dev/kvm").is_err() {
        return common::skip("not_a_kernel", "/dev/kvm is missing");
    }
    let dir = TempDir::new("notkernel");
    let p = dir.path("junk");
    std::fs::write(&p, vec![0u8; 4096]).unwrap();
    let e = fails(&["--kernel", p.to_str().unwrap(), "--serial", "null"]);
    assert!(e.contains("neither an ELF vmlinux nor a bzImage"), "{e}");
}

#[test]
fn bad_disks_are_one_line_errors() {
    assert!(fails(&["--disk", "readonly=on"]).contains("missing path=FILE"));
    assert!(fails(&["--disk", "path=/x,cache=fast"]).contains("unknown cache mode"));
    assert!(fails(&["--disk", "path=/x,interface=scsi"]).contains("must be virtio or ide"));
    assert!(fails(&["--disk", "path=/nonexistent/disk.img"])
        .contains("disk image /nonexistent/disk.img"));
    assert!(fails(&["--cdrom", "/nonexistent/cd.iso"]).contains("disk image /nonexistent/cd.iso"));
}

#[test]
fn help_succeeds() {
    let out = Command::new(VMM).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--debugcon file=PATH"));
}

#[test]
fn vfio_device_that_does_not_exist_fails_before_the_guest_starts() {
    let started = std::time::Instant::now();
    let e = fails(&["--device", "vfio=/nonexistent"]);
    assert!(e.contains("VFIO device /nonexistent"), "{e}");
    assert!(e.contains("sysfs directory"), "{e}");
    // A directory that is not a PCI device in an IOMMU group.
    let dir = TempDir::new("vfio_not_pci");
    let path = dir.path("dev");
    std::fs::create_dir_all(&path).expect("mkdir");
    let arg = format!("vfio={}", path.display());
    let e = fails(&["--device", &arg]);
    assert!(e.contains("no iommu_group"), "{e}");
    assert!(fails(&["--device", "vfio="]).contains("bad --device"));
    assert!(fails(&["--device", "vfio=/x", "--iommu", "vtd"]).contains("cannot be used together"));
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}
