// Real client: none but the CPU itself: a hand-assembled reset-vector stub that resets the PC through the i8042 (0xFE), as SeaBIOS and Linux reboot=k do.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{kvm_available, skip, TempDir, VMM};

/// A 128 KiB firmware image with `code` at the reset vector (4 GiB - 16).
fn stub_firmware(dir: &TempDir, name: &str, code: &[u8]) -> String {
    let mut image = vec![0xf4u8; 128 << 10]; // hlt everywhere else
    let at = image.len() - 16;
    image[at..at + code.len()].copy_from_slice(code);
    let p = dir.path(name);
    std::fs::write(&p, image).unwrap();
    p.to_string_lossy().into_owned()
}

/// Run the VMM with `fw` and `cpus`, expect it to exit 0 within 20 s.
fn exits_cleanly(fw: &str, cpus: &str) {
    let started = Instant::now();
    let mut child = Command::new(VMM)
        .args([
            "--firmware",
            fw,
            "--cpus",
            cpus,
            "--serial",
            "null",
            "--mem",
            "64M",
        ])
        .spawn()
        .expect("start iovirt-vmm");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            eprintln!("exited 0 after {:.2} s", started.elapsed().as_secs_f64());
            return;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("iovirt-vmm did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn i8042_reset_exits_zero_and_stops_every_vcpu() {
    if !kvm_available() {
        return skip("i8042_reset", "/dev/kvm is missing or not accessible");
    }
    let dir = TempDir::new("i8042-reset");
    // mov al, 0xfe; out 0x64, al; hlt; jmp $-1
    let fw = stub_firmware(&dir, "fw.bin", &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    exits_cleanly(&fw, "1");
    // The application processors sit in KVM_RUN waiting for SIPI: they must be kicked out.
    exits_cleanly(&fw, "4");
}

#[test]
fn piix_reset_control_exits_zero() {
    if !kvm_available() {
        return skip("piix_reset", "/dev/kvm is missing or not accessible");
    }
    let dir = TempDir::new("cf9-reset");
    // mov dx, 0xcf9; mov al, 0x06; out dx, al; hlt; jmp $-1  (Linux reboot=pci's last write)
    let fw = stub_firmware(
        &dir,
        "fw.bin",
        &[0xba, 0xf9, 0x0c, 0xb0, 0x06, 0xee, 0xf4, 0xeb, 0xfd],
    );
    exits_cleanly(&fw, "1");
}
