// Real client: Debian's SeaBIOS serving BIOS int 13h (virtio-blk, ATA, ATAPI/El Torito) to a nasm-built boot sector under iovirt-vmm.

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    assemble, boot_pattern_disk, check_image, run_to_exit, seabios_ready, skip, TempDir,
    BOOT_TIMEOUT, WRITTEN,
};

/// Boot `disk_opts` (appended to `path=IMAGE,`) with the boot sector variant
/// `defines`; returns the debug log and the image afterwards.
fn boot_disk(test: &str, defines: &[&str], disk_opts: &str) -> Option<(String, Vec<u8>, Vec<u8>)> {
    boot_disk_with(test, defines, |img, _| {
        format!("path={},{disk_opts}", img.display())
    })
}

/// As [`boot_disk`], with the `--disk` value made by `disk_for(image, dir)`.
fn boot_disk_with(
    test: &str,
    defines: &[&str],
    disk_for: impl Fn(&std::path::Path, &TempDir) -> String,
) -> Option<(String, Vec<u8>, Vec<u8>)> {
    boot_pattern_disk(test, defines, disk_for, |_| Vec::new())
        .map(|(log, img, boot, _dir)| (log, img, boot))
}

fn check_log(log: &str, found: &str, booting: &str) {
    assert!(log.contains(found), "no {found:?} in log:\n{log}");
    assert!(log.contains(booting), "no {booting:?} in log:\n{log}");
    assert!(log.contains("BOOT-OK"), "no BOOT-OK in log:\n{log}");
    assert!(!log.contains("BOOT-FAIL"), "{log}");
}

#[test]
fn virtio_blk_cache_none_int13_read_write() {
    let Some((log, img, boot)) = boot_disk("virtio_none", &[], "cache=none") else {
        return;
    };
    check_log(
        &log,
        "found virtio-blk at 00:04.0",
        "Booting from Hard Disk",
    );
    check_image(&img, &boot, WRITTEN);
}

#[test]
fn virtio_blk_on_a_filter_stack_int13_read_write() {
    // The disk is a stack description: a fault-injection filter (no rules) over the file.
    let Some((log, img, boot)) = boot_disk_with("virtio_stack", &[], |img, dir| {
        let toml = dir.path("disk.toml");
        std::fs::write(
            &toml,
            format!(
                "[disk]\nfilter = \"fault\"\n[disk.child]\nbackend = \"file\"\npath = \"{}\"\ncache = \"writeback\"\n",
                img.display()
            ),
        )
        .expect("write stack description");
        format!("stack={}", toml.display())
    }) else {
        return;
    };
    check_log(
        &log,
        "found virtio-blk at 00:04.0",
        "Booting from Hard Disk",
    );
    check_image(&img, &boot, WRITTEN);
}

#[test]
fn virtio_blk_through_the_mclock_stage_int13_read_write() {
    // Scheduling options put the disk behind the shared mClock stage.
    let Some((log, img, boot)) = boot_disk(
        "virtio_sched",
        &[],
        "cache=none,reservation=50,limit=5000,weight=2",
    ) else {
        return;
    };
    check_log(
        &log,
        "found virtio-blk at 00:04.0",
        "Booting from Hard Disk",
    );
    check_image(&img, &boot, WRITTEN);
}

#[test]
fn virtio_blk_cache_writeback_int13_read_write() {
    let Some((log, img, boot)) = boot_disk(
        "virtio_writeback",
        &[],
        "cache=writeback,serial=iovirt-test,coalesce=on",
    ) else {
        return;
    };
    check_log(
        &log,
        "found virtio-blk at 00:04.0",
        "Booting from Hard Disk",
    );
    check_image(&img, &boot, WRITTEN);
}

#[test]
fn ide_disk_int13_read_write() {
    let Some((log, img, boot)) = boot_disk("ide_rw", &[], "interface=ide,cache=writeback") else {
        return;
    };
    check_log(&log, "ata0-0:", "Booting from Hard Disk");
    check_image(&img, &boot, WRITTEN);
}

#[test]
fn read_only_disks_refuse_int13_writes() {
    // The READONLY variant checks the carry flag of the write and reads the sectors back.
    for (name, opts, found) in [
        (
            "virtio_ro",
            "readonly=on,cache=writeback",
            "found virtio-blk at 00:04.0",
        ),
        ("ide_ro", "readonly=on,interface=ide", "ata0-0:"),
    ] {
        let Some((log, img, boot)) = boot_disk(name, &["READONLY"], opts) else {
            return;
        };
        check_log(&log, found, "Booting from Hard Disk");
        check_image(&img, &boot, 0..0);
    }
}

/// Build an El Torito ISO (no emulation, 4 load sectors) with `boot` and a data
/// file holding words 0, 1, 2, ...; patch the data file's LBA into the boot image.
fn build_iso(dir: &TempDir, boot: &[u8]) -> Result<std::path::PathBuf, String> {
    let root = dir.path("iso");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let mut boot_img = boot.to_vec();
    boot_img.resize(2048, 0);
    std::fs::write(root.join("boot.img"), &boot_img).map_err(|e| e.to_string())?;
    let data: Vec<u8> = (0..4096u16).flat_map(|k| k.to_le_bytes()).collect();
    std::fs::write(root.join("data.bin"), &data).map_err(|e| e.to_string())?;
    let iso = dir.path("cd.iso");
    let args = |cmd: &mut Command| {
        cmd.args(["-quiet", "-o"])
            .arg(&iso)
            .args(["-b", "boot.img", "-no-emul-boot", "-boot-load-size", "4"])
            .arg(&root);
    };
    let mut xorriso = Command::new("xorriso");
    xorriso.args(["-as", "mkisofs"]);
    args(&mut xorriso);
    let out = match xorriso.output() {
        Ok(o) => o,
        Err(_) => {
            let mut geniso = Command::new("genisoimage");
            args(&mut geniso);
            geniso
                .output()
                .map_err(|_| "neither xorriso nor genisoimage is installed".to_string())?
        }
    };
    if !out.status.success() {
        return Err(format!(
            "ISO build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut bytes = std::fs::read(&iso).map_err(|e| e.to_string())?;
    let find = |needle: &[u8]| {
        (0..bytes.len() / 2048)
            .map(|b| b * 2048)
            .find(|&o| bytes[o..].starts_with(needle))
    };
    let boot_at = find(&boot_img).ok_or("boot image not found in the ISO")?;
    let data_at = find(&data).ok_or("data file not found in the ISO")?;
    let lba = u32::try_from(data_at / 2048).map_err(|e| e.to_string())?;
    bytes[boot_at + 0x1f0..boot_at + 0x1f4].copy_from_slice(&lba.to_le_bytes());
    bytes[boot_at + 0x1f4..boot_at + 0x1f6].copy_from_slice(&0u16.to_le_bytes());
    std::fs::write(&iso, bytes).map_err(|e| e.to_string())?;
    Ok(iso)
}

#[test]
fn cdrom_el_torito_boot_reads_through_atapi() {
    let test = "cdrom_el_torito";
    let Some(fw) = seabios_ready(test) else {
        return;
    };
    let dir = TempDir::in_target(test);
    let Some(boot) = assemble(test, &["CDROM"], &dir.path("boot.bin")) else {
        return;
    };
    let iso = match build_iso(&dir, &boot) {
        Ok(p) => p,
        Err(e) if e.contains("installed") => return skip(test, &e),
        Err(e) => panic!("{e}"),
    };
    let before = std::fs::read(&iso).unwrap();
    let log = dir.path("debugcon.log");
    let (ok, text) = run_to_exit(
        &[
            "--firmware",
            &fw,
            "--serial",
            "null",
            "--debugcon",
            &format!("file={}", log.display()),
            "--cdrom",
            &iso.to_string_lossy(),
        ],
        &log,
        BOOT_TIMEOUT,
    );
    assert!(ok, "iovirt-vmm did not exit 0; log:\n{text}");
    check_log(&text, "DVD/CD [ata1-0:", "Booting from DVD/CD");
    assert_eq!(std::fs::read(Path::new(&iso)).unwrap(), before);
}
