// Real client: Debian's SeaBIOS (bios-256k.bin) boots under iovirt-vmm and logs to the debug console.

mod common;

use std::time::Duration;

use common::{firmware, kvm_available, skip, TempDir, Vmm};

/// Boot SeaBIOS with `mem` and return its debug log once it gives up booting.
fn boot(test: &str, mem: &str) -> Option<String> {
    if !kvm_available() {
        skip(test, "/dev/kvm is missing or not accessible");
        return None;
    }
    let Some(fw) = firmware() else {
        skip(
            test,
            "no SeaBIOS: apt-get install seabios, or set IOVIRT_GUEST_DIR",
        );
        return None;
    };
    let dir = TempDir::new(test);
    let log = dir.path("debugcon.log");
    let fw = fw.to_string_lossy().into_owned();
    let debugcon = format!("file={}", log.display());
    let mut vmm = Vmm::spawn(&[
        "--firmware",
        &fw,
        "--mem",
        mem,
        "--serial",
        "null",
        "--debugcon",
        &debugcon,
    ]);
    match vmm.wait_for(&log, "No bootable device.", Duration::from_secs(60)) {
        Ok(t) => eprintln!(
            "{test}: SeaBIOS reached \"No bootable device.\" {:.2} s after launch",
            t.as_secs_f64()
        ),
        Err(e) => panic!("{e}"),
    }
    drop(vmm);
    Some(String::from_utf8_lossy(&std::fs::read(&log).expect("read log")).into_owned())
}

fn check_common(log: &str) {
    assert!(log.contains("Found QEMU fw_cfg"), "{log}");
    assert!(log.contains("PCI: init bdf=00:00.0 id=8086:1237"), "{log}");
    assert!(log.contains("PCI: init bdf=00:01.0 id=8086:7000"), "{log}");
    assert!(log.contains("PS2 keyboard initialized"), "{log}");
}

#[test]
fn seabios_256m() {
    let Some(log) = boot("seabios_256m", "256M") else {
        return;
    };
    check_common(&log);
    assert!(
        log.contains("qemu/e820: addr 0x0000000000000000 len 0x0000000010000000 [RAM]"),
        "{log}"
    );
    assert!(
        log.contains("0000000000100000 - 0000000010000000 = 1 RAM"),
        "{log}"
    );
}

#[test]
fn seabios_1g() {
    let Some(log) = boot("seabios_1g", "1G") else {
        return;
    };
    check_common(&log);
    assert!(
        log.contains("qemu/e820: addr 0x0000000000000000 len 0x0000000040000000 [RAM]"),
        "{log}"
    );
    assert!(
        log.contains("0000000000100000 - 0000000040000000 = 1 RAM"),
        "{log}"
    );
}

#[test]
fn seabios_4g_splits_around_pci_hole() {
    let Some(log) = boot("seabios_4g", "4G") else {
        return;
    };
    check_common(&log);
    assert!(
        log.contains("qemu/e820: addr 0x0000000000000000 len 0x00000000e0000000 [RAM]"),
        "{log}"
    );
    assert!(
        log.contains("qemu/e820: addr 0x0000000100000000 len 0x0000000020000000 [RAM]"),
        "{log}"
    );
}
