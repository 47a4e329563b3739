//! `--disk stack=FILE.toml`: the daemon serves an iovirt-filter stack, refuses
//! options that belong in the description, and an invalid stack stops it with
//! one line naming the node before any frontend can connect.
//!
//! The I/O test uses libblkio's virtio-blk-vhost-user driver as the frontend.

mod common;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use blkio::{Blkio, ReqFlags};

const BIN: &str = env!("CARGO_BIN_EXE_iovirt-vhost-user-blk");

/// Run the daemon expecting it to fail at start-up; returns its output.
fn run_failing(socket: &Path, disk: &str) -> Output {
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .args(["--disk", disk])
        .env("RUST_LOG", "error")
        .output()
        .expect("run iovirt-vhost-user-blk");
    assert!(!out.status.success(), "daemon accepted --disk {disk}");
    assert!(!socket.exists(), "daemon listened despite a bad --disk");
    out
}

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    err.trim_end().to_string()
}

#[test]
fn invalid_stack_is_one_line_naming_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = dir.path().join("vda.toml");
    std::fs::write(
        &toml,
        "[vda]\nfilter = \"fault\"\n\n[vda.child]\nbackend = \"file\"\npath = \"missing.img\"\n",
    )
    .expect("write stack");
    let sock = dir.path().join("vhost.sock");
    let line = stderr_line(&run_failing(&sock, &format!("stack={}", toml.display())));
    assert!(
        line.starts_with("iovirt-vhost-user-blk: --disk stack="),
        "{line}"
    );
    assert!(
        line.contains("vda.child: "),
        "does not name the node: {line}"
    );
    assert!(line.contains("does not exist"), "{line}");

    // A filter that does not exist, and a description that is not there at all.
    std::fs::write(
        &toml,
        "[vda]\nfilter = \"nope\"\n[vda.child]\nbackend = \"null\"\n",
    )
    .expect("write stack");
    let line = stderr_line(&run_failing(&sock, &format!("stack={}", toml.display())));
    assert!(line.contains("vda: unknown filter \"nope\""), "{line}");
    let line = stderr_line(&run_failing(
        &sock,
        &format!("stack={}", dir.path().join("none.toml").display()),
    ));
    assert!(line.contains("cannot read the stack description"), "{line}");

    // Cache and read-only modes belong in the description.
    for extra in ["readonly=on", "cache=none"] {
        let line = stderr_line(&run_failing(
            &sock,
            &format!("stack={},{extra}", toml.display()),
        ));
        assert!(line.contains("belong in the stack description"), "{line}");
    }
}

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_all(q: &mut blkio::Blkioq, n: usize) -> Vec<i32> {
    let mut done: Vec<MaybeUninit<blkio::Completion>> =
        (0..n).map(|_| MaybeUninit::uninit()).collect();
    let mut got = Vec::new();
    while got.len() < n {
        let mut t = Duration::from_secs(10);
        let k = q
            .do_io(&mut done[got.len()..], 1, Some(&mut t), None)
            .expect("do_io");
        assert!(k > 0, "no completion within 10 s");
        for c in done.iter().take(k) {
            // SAFETY: do_io initialised the first `k` entries of the slice it was given.
            got.push(unsafe { c.assume_init_ref() }.ret);
        }
    }
    got
}

#[test]
fn serves_the_stack_it_describes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("vda.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 20))
        .expect("create image");
    // Writes to the second MiB fail; the rest reach the file. Relative path.
    let toml = dir.path().join("vda.toml");
    std::fs::write(
        &toml,
        "[vda]\nfilter = \"fault\"\nfail = [{ op = \"write\", offset = \"1M..2M\" }]\n\n\
         [vda.child]\nbackend = \"file\"\npath = \"vda.img\"\ncache = \"writeback\"\n",
    )
    .expect("write stack");
    let socket: PathBuf = dir.path().join("vhost.sock");
    let child = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .args(["--disk", &format!("stack={}", toml.display())])
        .env("RUST_LOG", "error")
        .spawn()
        .expect("start iovirt-vhost-user-blk");
    let mut d = Daemon { child };
    common::wait_for_paths(&mut d.child, &[&socket], Duration::from_secs(10));

    let mut b = Blkio::new("virtio-blk-vhost-user").expect("driver");
    b.set_str("path", socket.to_str().expect("utf-8 path"))
        .expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).expect("num-queues");
    assert_eq!(b.get_u64("capacity").expect("capacity"), 4 << 20);
    let mut started = b.start().expect("start");
    let mut q = started.queues.pop().expect("a queue");
    let region = b.alloc_mem_region(1 << 16).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let buf = region.addr as *mut u8;
    // SAFETY: the region is 64 KiB of our own shared memory.
    unsafe { std::ptr::write_bytes(buf, 0xa5, 4096) };

    q.write(0, buf, 4096, 0, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), [0], "write outside the fault range");
    q.write(1 << 20, buf, 4096, 1, ReqFlags::empty());
    let r = wait_all(&mut q, 1);
    assert!(r[0] < 0, "write in the fault range succeeded: {r:?}");
    q.flush(2, ReqFlags::empty());
    assert_eq!(wait_all(&mut q, 1), [0], "flush");
    drop(q);
    drop(started);
    drop(b);
    assert!(matches!(d.child.try_wait(), Ok(None)), "daemon died");
    drop(d);

    let data = std::fs::read(&img).expect("read image");
    assert!(
        data[..4096].iter().all(|&x| x == 0xa5),
        "write did not land"
    );
    assert!(
        data[1 << 20..(1 << 20) + 4096].iter().all(|&x| x == 0),
        "failed write landed"
    );
}
