//! LUKS interop with the real peer tools: qemu-img/qemu-io (LUKS1), cryptsetup
//! (LUKS2), and Python's `cryptography` (OpenSSL) as an independent AES-XTS.
//! Each test skips with a message when its tool is missing; CI installs them
//! with scripts/setup.sh.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use iovirt_backend::{
    submit_wait, BlockBackend, CacheMode, Direction, Inline, IoBuffers, RawFileOptions, Request,
};
use iovirt_filter::crypt::{
    create_luks2_file, open_luks, CreateKdf, CreateOptions, CryptError, CryptOptions,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PASS: &str = "correct horse battery staple";

fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: {tool} is not installed (scripts/setup.sh installs it)");
    }
    ok
}

fn have_python_cryptography() -> bool {
    have("python3", &["-c", "import cryptography"])
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn open_file(path: &Path) -> Arc<dyn BlockBackend> {
    Arc::new(Inline(
        RawFileOptions::new(CacheMode::Writeback)
            .open(path)
            .expect("open image"),
    ))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

fn write(be: &Arc<dyn BlockBackend>, offset: u64, data: &[u8]) {
    submit_wait(
        be.as_ref(),
        Request::Write {
            offset,
            buf: IoBuffers::from_vec(data.to_vec()),
            fua: false,
        },
    )
    .expect("write");
}

/// Read through the filter into "guest memory" we can look at afterwards.
fn read(be: &Arc<dyn BlockBackend>, offset: u64, len: usize) -> Vec<u8> {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0), len)],
        Direction::DeviceWrites,
    )
    .unwrap();
    submit_wait(be.as_ref(), Request::Read { offset, buf }).expect("read");
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

fn secret_arg(key_file: &Path) -> String {
    format!("secret,id=s0,file={}", key_file.display())
}

fn qemu_luks1_image(dir: &Path) -> (PathBuf, PathBuf) {
    qemu_luks1_image_with(dir, "")
}

/// A qemu-img LUKS1 image with extra `-o` options (`extra` starts with a comma).
fn qemu_luks1_image_with(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let img = dir.join("luks1.img");
    let key = dir.join("key");
    std::fs::write(&key, PASS).unwrap();
    // qemu-img: a LUKS1 image with a fast PBKDF2 (iter-time 10 ms). qemu calibrates the
    // iteration count by CPU time and gives up ("Unable to get accurate CPU usage") when the
    // machine is busy, so try a few times.
    for attempt in 0.. {
        let _ = std::fs::remove_file(&img);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "luks", "--object"])
            .arg(format!("secret,id=s0,data={PASS}"))
            .arg("-o")
            .arg(format!("key-secret=s0,iter-time=10{extra}"))
            .arg(&img)
            .arg("16M")
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            attempt < 10 && err.contains("accurate CPU usage"),
            "qemu-img create failed: {err}"
        );
    }
    (img, key)
}

// Peer: qemu-img convert reads back, as plaintext, what our filter wrote to a qemu-img LUKS1 image.
#[test]
fn luks1_qemu_img_reads_what_we_write() {
    if !have("qemu-img", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = qemu_luks1_image(dir.path());
    // Unwritten sectors of a fresh LUKS image decrypt to garbage: compare only what we wrote.
    let mut ranges = Vec::new();
    {
        let plain = open_luks(open_file(&img), &CryptOptions::with_passphrase(PASS)).unwrap();
        assert_eq!(plain.info().capacity, 16 << 20);
        for (off, seed, len) in [(0u64, 1u8, 1 << 20), (5 << 20, 2, 4096), (16 << 20, 3, 512)] {
            let off = off - if off == 16 << 20 { 512 } else { 0 };
            let data = pattern(seed, len);
            write(&plain, off, &data);
            ranges.push((off as usize, data));
        }
        submit_wait(plain.as_ref(), Request::Flush).unwrap();
    }
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "--object", &secret_arg(&key), "--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ))
        .args(["-O", "raw"])
        .arg(&out));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 16 << 20);
    for (off, data) in ranges {
        assert!(
            got[off..off + data.len()] == data[..],
            "qemu-img's plaintext at {off} differs from what we wrote"
        );
    }
    // And the raw image holds none of it in plaintext.
    let raw = std::fs::read(&img).unwrap();
    let needle = &pattern(1, 1 << 20)[..4096];
    assert!(!raw.windows(needle.len()).any(|w| w == needle));
}

// Peer: qemu-io writes into a qemu-img LUKS1 image; our filter (unlocked with a key file) reads it back.
#[test]
fn luks1_we_read_what_qemu_io_writes() {
    if !have("qemu-io", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = qemu_luks1_image(dir.path());
    run(Command::new("qemu-io")
        .args(["--object", &secret_arg(&key), "--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ))
        .args(["-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 7M 64k"]));
    let plain = open_luks(open_file(&img), &CryptOptions::with_key_file(&key)).unwrap();
    assert_eq!(read(&plain, 0, 1 << 20), vec![0xab; 1 << 20]);
    assert_eq!(read(&plain, 7 << 20, 64 << 10), vec![0xcd; 64 << 10]);
    // Write-zeroes becomes encrypted zeroes that qemu also reads as zeroes.
    submit_wait(
        plain.as_ref(),
        Request::WriteZeroes {
            offset: 0,
            len: 512 << 10,
            may_unmap: true,
        },
    )
    .unwrap();
    assert_eq!(
        read(&plain, 0, 1 << 20)[..512 << 10],
        vec![0; 512 << 10][..]
    );
    drop(plain);
    let out = run(Command::new("qemu-io")
        .args(["--object", &secret_arg(&key), "--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ))
        .args(["-c", "read -P 0 0 512k", "-c", "read -P 0xab 512k 512k"]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

// Peer: qemu-img's LUKS1 image refuses a wrong passphrase with a clear error.
#[test]
fn luks1_wrong_passphrase() {
    if !have("qemu-img", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qemu_luks1_image(dir.path());
    let Err(err) = open_luks(open_file(&img), &CryptOptions::with_passphrase("wrong")) else {
        panic!("a wrong passphrase opened the image");
    };
    assert!(matches!(err, CryptError::WrongPassphrase));
    assert_eq!(err.to_string(), "no keyslot opens with this passphrase");
}

/// The volume key and data offset that cryptsetup reports for `img`.
fn cryptsetup_volume_key(img: &Path, key: &Path) -> (String, u64) {
    let out = run(Command::new("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
        ])
        .arg(key)
        .arg(img));
    let mut hex = String::new();
    let mut in_key = false;
    let mut payload = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("MK dump:") {
            in_key = true;
            hex.extend(rest.split_whitespace());
        } else if in_key && line.starts_with(char::is_whitespace) {
            hex.extend(line.split_whitespace());
        } else {
            in_key = false;
        }
        if let Some(rest) = line.strip_prefix("Payload offset:") {
            payload = rest.trim().parse::<u64>().ok();
        }
    }
    assert!(
        hex.len() == 64 || hex.len() == 128,
        "no volume key in {out}"
    );
    (hex, payload.expect("payload offset") * 512)
}

/// A LUKS data segment as the independent decryptor sees it.
struct Segment<'a> {
    img: &'a Path,
    key_hex: &'a str,
    data_offset: u64,
    sector_size: u32,
}

fn python_xts(op: &str, seg: &Segment<'_>, start: u64, len: usize, file: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crypt_xts.py");
    run(Command::new("python3")
        .arg(script)
        .arg(op)
        .arg(seg.img)
        .arg(seg.key_hex)
        .arg(seg.data_offset.to_string())
        .arg(seg.sector_size.to_string())
        .arg("0")
        .arg(start.to_string())
        .arg(len.to_string())
        .arg(file));
}

/// Peer: cryptsetup formats a LUKS2 image; we open it with a key file, write,
/// and Python's AES-XTS (with the volume key cryptsetup dumps) decrypts our
/// sectors to the same plaintext; what Python encrypts, we read.
fn luks2_cryptsetup_case(sector_size: u32, pbkdf: &str) {
    if !have("cryptsetup", &["--version"]) || !have_python_cryptography() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("luks2.img");
    let key = dir.path().join("key");
    std::fs::write(&key, PASS).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let mut cmd = Command::new("cryptsetup");
    cmd.args([
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--key-file",
    ])
    .arg(&key)
    .args(["--sector-size", &sector_size.to_string(), "--pbkdf", pbkdf]);
    if pbkdf == "pbkdf2" {
        cmd.args(["--pbkdf-force-iterations", "1000", "--hash", "sha256"]);
    } else {
        cmd.args([
            "--pbkdf-memory",
            "1024",
            "--pbkdf-force-iterations",
            "4",
            "--pbkdf-parallel",
            "2",
        ]);
    }
    run(cmd.arg(&img));
    let (key_hex, data_offset) = cryptsetup_volume_key(&img, &key);

    let plain = open_luks(open_file(&img), &CryptOptions::with_key_file(&key)).unwrap();
    assert_eq!(plain.info().capacity, (20 << 20) - data_offset);
    assert_eq!(plain.info().logical_block_size, sector_size.max(512));
    let data = pattern(sector_size as u8, 256 << 10);
    let at = 1 << 20;
    write(&plain, at, &data);
    submit_wait(plain.as_ref(), Request::Flush).unwrap();
    assert_eq!(read(&plain, at, data.len()), data);

    let out = dir.path().join("pt");
    python_xts(
        "decrypt",
        &Segment {
            img: &img,
            key_hex: &key_hex,
            data_offset,
            sector_size,
        },
        at,
        data.len(),
        &out,
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "the independent AES-XTS disagrees with our ciphertext"
    );

    let theirs = pattern(0x5a, 64 << 10);
    let src = dir.path().join("theirs");
    std::fs::write(&src, &theirs).unwrap();
    python_xts(
        "encrypt",
        &Segment {
            img: &img,
            key_hex: &key_hex,
            data_offset,
            sector_size,
        },
        3 << 20,
        theirs.len(),
        &src,
    );
    assert_eq!(read(&plain, 3 << 20, theirs.len()), theirs);

    let wrong = open_luks(open_file(&img), &CryptOptions::with_passphrase("wrong"));
    assert!(matches!(wrong, Err(CryptError::WrongPassphrase)));
}

// Peer: cryptsetup luksFormat (512-byte sectors, PBKDF2) + Python cryptography.
#[test]
fn luks2_cryptsetup_512_pbkdf2() {
    luks2_cryptsetup_case(512, "pbkdf2");
}

// Peer: cryptsetup luksFormat (4096-byte sectors, Argon2id) + Python cryptography.
#[test]
fn luks2_cryptsetup_4096_argon2id() {
    luks2_cryptsetup_case(4096, "argon2id");
}

// Peer: cryptsetup luksFormat (4096-byte sectors, PBKDF2) + Python cryptography.
#[test]
fn luks2_cryptsetup_4096_pbkdf2() {
    luks2_cryptsetup_case(4096, "pbkdf2");
}

// Peer: cryptsetup luksFormat (512-byte sectors, Argon2i) + Python cryptography.
#[test]
fn luks2_cryptsetup_512_argon2i() {
    luks2_cryptsetup_case(512, "argon2i");
}

// Peer: cryptsetup luksDump shows, and `open --test-passphrase` accepts, the LUKS2 images we create;
// Python decrypts our data with the volume key cryptsetup dumps from them.
#[test]
fn luks2_we_create_cryptsetup_accepts() {
    if !have("cryptsetup", &["--version"]) || !have_python_cryptography() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PASS).unwrap();
    let cases = [
        (4096, CreateOptions::fast_for_tests().kdf),
        (
            512,
            CreateKdf::Pbkdf2 {
                hash: iovirt_filter::crypt::kdf::HashAlg::Sha256,
                iterations: 1000,
            },
        ),
    ];
    for (i, (sector_size, kdf)) in cases.into_iter().enumerate() {
        let img = dir.path().join(format!("ours{i}.img"));
        let opts = CreateOptions {
            sector_size,
            kdf,
            label: "iovirt".into(),
            ..CreateOptions::fast_for_tests()
        };
        let info = create_luks2_file(&img, 8 << 20, PASS.as_bytes(), &opts).unwrap();
        let dump = run(Command::new("cryptsetup").arg("luksDump").arg(&img));
        assert!(dump.contains("Version:       \t2"), "{dump}");
        assert!(dump.contains(&info.uuid), "{dump}");
        assert!(
            dump.contains(&format!("sector: {sector_size} [bytes]")),
            "{dump}"
        );
        run(Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--batch-mode", "--key-file"])
            .arg(&key)
            .arg(&img));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "wrong").unwrap();
        let st = Command::new("cryptsetup")
            .args(["open", "--test-passphrase", "--batch-mode", "--key-file"])
            .arg(&bad)
            .arg(&img)
            .status()
            .unwrap();
        assert!(!st.success());

        let plain = open_luks(open_file(&img), &CryptOptions::with_key_file(&key)).unwrap();
        assert_eq!(plain.info().capacity, 8 << 20);
        let data = pattern(9, 128 << 10);
        write(&plain, 4 << 20, &data);
        drop(plain);
        let (key_hex, data_offset) = cryptsetup_volume_key(&img, &key);
        assert_eq!(data_offset, info.data_offset);
        let out = dir.path().join("pt");
        python_xts(
            "decrypt",
            &Segment {
                img: &img,
                key_hex: &key_hex,
                data_offset,
                sector_size,
            },
            4 << 20,
            data.len(),
            &out,
        );
        assert!(std::fs::read(&out).unwrap() == data);
    }
}

// Peer: cryptsetup (volume key and layout) + Python cryptography decrypt a whole LUKS2 image we
// wrote through the filter, as the host-side check of the Linux guest test does.
#[test]
fn luks2_host_side_decryptor_finds_our_data() {
    if !have("cryptsetup", &["--version"]) || !have_python_cryptography() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, PASS).unwrap();
    let img = dir.path().join("guest.img");
    create_luks2_file(
        &img,
        4 << 20,
        PASS.as_bytes(),
        &CreateOptions::fast_for_tests(),
    )
    .unwrap();
    let data = pattern(0x77, 256 << 10);
    {
        let plain = open_luks(open_file(&img), &CryptOptions::with_key_file(&key)).unwrap();
        write(&plain, 1 << 20, &data);
        submit_wait(plain.as_ref(), Request::Flush).unwrap();
    }
    let out = dir.path().join("plain.raw");
    run(Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crypt_xts.py"))
        .arg("luks2-image")
        .arg(&img)
        .arg(&key)
        .arg(&out));
    let plain = std::fs::read(&out).unwrap();
    assert_eq!(plain.len(), 4 << 20);
    assert!(plain[1 << 20..(1 << 20) + data.len()] == data[..]);
    let raw = std::fs::read(&img).unwrap();
    assert!(!raw.windows(4096).any(|w| w == &data[..4096]));
}

// Peer: qemu-io writes into a qemu-img LUKS1 image with AES-128-XTS and SHA-1; we read it back.
#[test]
fn luks1_aes128_sha1_from_qemu_io() {
    if !have("qemu-io", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, key) = qemu_luks1_image_with(dir.path(), ",cipher-alg=aes-128,hash-alg=sha1");
    run(Command::new("qemu-io")
        .args(["--object", &secret_arg(&key), "--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            img.display()
        ))
        .args(["-c", "write -P 0x3c 12M 128k"]));
    let be = open_file(&img);
    let info = iovirt_filter::crypt::inspect(&be).unwrap();
    assert_eq!(info.key_size, 32);
    let plain = open_luks(be, &CryptOptions::with_passphrase(PASS)).unwrap();
    assert_eq!(read(&plain, 12 << 20, 128 << 10), vec![0x3c; 128 << 10]);
}
