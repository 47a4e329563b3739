//! Building stacks: nodes compose (fault over fault over memory, over files),
//! requests keep their meaning through the layers, and a stack is opened
//! completely or not at all.

use std::path::Path;

use iovirt_backend::{
    submit_wait, BlockBackend, BlockError, DeviceStatus, Features, IoBuffers, Request,
};
use iovirt_filter::fault::{InjectedError, Op, Rule, Selector};
use iovirt_filter::stack::{open_stack_file, StackError, StackSpec};

fn write(offset: u64, byte: u8, len: usize) -> Request {
    Request::Write {
        offset,
        buf: IoBuffers::from_vec(vec![byte; len]),
        fua: false,
    }
}

/// Read through `b` into scratch guest memory.
fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let mem =
        std::sync::Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        mem.clone(),
        &[(GuestAddress(0), len)],
        iovirt_backend::Direction::DeviceWrites,
    )
    .unwrap();
    submit_wait(b, Request::Read { offset, buf }).unwrap();
    let mut out = vec![0; len];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

fn build_err(spec: &StackSpec) -> StackError {
    match spec.build() {
        Ok(_) => panic!("the build succeeded"),
        Err(e) => e,
    }
}

/// Whether this process holds `path` open.
fn holds_open(path: &Path) -> bool {
    let want = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|p| p == want)
}

#[test]
fn three_deep_stack_over_memory() {
    let spec = StackSpec::from_toml_str(
        r#"
        [disk]
        filter = "fault"
        fail = [{ op = "discard", error = "unsupported" }]
        [disk.child]
        filter = "fault"
        seed = 3
        track-writes = true
        [disk.child.child]
        backend = "memory"
        size = "2M"
        "#,
    )
    .unwrap();
    let stack = spec.build_stack().unwrap();
    let disk = &stack.backend;
    let info = disk.info();
    assert_eq!(info.capacity, 2 << 20);
    // The tracking filter in the middle advertises a volatile cache; the top passes it on.
    assert!(info.features.contains(
        Features::VOLATILE_CACHE | Features::DISCARD | Features::WRITE_ZEROES | Features::FUA
    ));
    let names: Vec<&str> = stack.faults().map(|(p, _)| p).collect();
    assert_eq!(names, ["disk", "disk.child"]);
    let top = stack.fault("disk").unwrap();
    let mid = stack.fault("disk.child").unwrap();

    submit_wait(disk, write(0, 1, 4096)).unwrap();
    submit_wait(disk, Request::Flush).unwrap();
    submit_wait(
        disk,
        Request::Write {
            offset: 4096,
            buf: IoBuffers::from_vec(vec![2; 4096]),
            fua: true,
        },
    )
    .unwrap();
    submit_wait(
        disk,
        Request::WriteZeroes {
            offset: 0,
            len: 512,
            may_unmap: true,
        },
    )
    .unwrap();
    // The top fails discards with "unsupported", and the status survives.
    let e = submit_wait(
        disk,
        Request::Discard {
            offset: 0,
            len: 512,
        },
    )
    .unwrap_err();
    assert_eq!(e.status(), DeviceStatus::Unsupported);
    // An error from the middle layer passes the top untouched.
    mid.add_rule(Rule::fail(Selector::op(Op::Read), InjectedError::Io));
    let e = submit_wait(
        disk,
        Request::Read {
            offset: 0,
            buf: IoBuffers::zeroed(512),
        },
    )
    .unwrap_err();
    assert!(matches!(e, BlockError::Io(_)));
    assert_eq!(top.stats().op(Op::Read).failed, 1);
    assert_eq!(top.stats().op(Op::Read).injected, 0);
    assert_eq!(mid.stats().op(Op::Read).injected, 1);
    assert_eq!(top.stats().op(Op::Flush).completed, 1);
    assert_eq!(mid.stats().op(Op::Write).completed, 2);

    // Power cut in the middle: the flushed and FUA writes stay, the zeroes go.
    mid.clear_rules();
    let report = mid.power_cut().unwrap();
    assert_eq!(report.rolled_back_sectors, 1);
    assert!(submit_wait(disk, Request::Flush).is_err());
    mid.power_restore();
    top.clear_rules();
    let back = read(&**disk, 0, 8192);
    assert_eq!(back[..4096], [1; 4096]);
    assert_eq!(back[4096..], [2; 4096]);
}

#[test]
fn file_null_and_image_nodes_build() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::write(dir.path().join("cd.iso"), vec![5u8; 3 * 2048 + 7]).unwrap();
    std::fs::write(
        dir.path().join("vda.toml"),
        "[vda]\nfilter = \"fault\"\n[vda.child]\nbackend = \"file\"\npath = \"disk.img\"\ncache = \"writeback\"\nengine = \"threads\"\n",
    )
    .unwrap();
    let disk = open_stack_file(dir.path().join("vda.toml")).unwrap();
    submit_wait(&disk, write(512, 0x5a, 512)).unwrap();
    submit_wait(&disk, Request::Flush).unwrap();
    assert_eq!(std::fs::read(&img).unwrap()[512..1024], [0x5a; 512]);
    drop(disk);

    let cd =
        StackSpec::from_toml_str_in("[cd]\nbackend = \"image\"\npath = \"cd.iso\"\n", dir.path())
            .unwrap()
            .build()
            .unwrap();
    assert_eq!(cd.info().capacity, 3 * 2048);
    assert_eq!(cd.info().logical_block_size, 2048);
    assert!(matches!(
        submit_wait(&cd, write(0, 1, 2048)),
        Err(BlockError::ReadOnly)
    ));

    let null =
        StackSpec::from_toml_str("[n]\nbackend = \"null\"\nsize = \"1G\"\nzero-reads = true\n")
            .unwrap()
            .build()
            .unwrap();
    assert_eq!(null.info().capacity, 1 << 30);

    let ro = StackSpec::from_toml_str_in(
        "[r]\nbackend = \"file\"\npath = \"disk.img\"\nreadonly = true\ncache = \"writeback\"\n",
        dir.path(),
    )
    .unwrap()
    .build()
    .unwrap();
    assert!(matches!(
        submit_wait(&ro, write(0, 1, 512)),
        Err(BlockError::ReadOnly)
    ));
}

#[test]
fn a_failing_node_leaves_nothing_open() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.img");
    std::fs::write(&img, vec![0x11u8; 1 << 20]).unwrap();
    // The file opens, the fault filter over it builds, the crypt filter on top
    // cannot unlock a volume that is not LUKS: the whole build fails, and the
    // file is closed again before `build` returns.
    let spec = StackSpec::from_toml_str_in(
        r#"
        [disk]
        filter = "crypt"
        passphrase = "not this one"
        [disk.child]
        filter = "fault"
        [disk.child.child]
        backend = "file"
        path = "plain.img"
        cache = "writeback"
        engine = "threads"
        "#,
        dir.path(),
    )
    .unwrap();
    spec.validate().unwrap();
    let e = build_err(&spec);
    assert!(
        matches!(e, StackError::Crypt { ref node, .. } if node == "disk"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with("disk: cannot unlock the encrypted volume: "),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    // A completion may drop the last reference on a back-end thread a moment
    // after its result reached `build`; the file must be closed right after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while holds_open(&img) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(!holds_open(&img), "the file back-end was left open");
    assert_eq!(std::fs::read(&img).unwrap(), vec![0x11u8; 1 << 20]);

    // Validation failures open nothing at all.
    let spec = StackSpec::from_toml_str_in(
        "[disk]\nfilter = \"fault\"\nfail = [{ offset = \"4M..\" }]\n[disk.child]\nbackend = \"file\"\npath = \"plain.img\"\n",
        dir.path(),
    )
    .unwrap();
    let e = build_err(&spec);
    assert!(matches!(e, StackError::SizeMismatch { .. }), "{e}");
    assert!(!holds_open(&img));

    // A missing file fails at its node, before anything opens.
    let e = build_err(
        &StackSpec::from_toml_str_in(
            "[disk]\nbackend = \"image\"\npath = \"missing.iso\"\n",
            dir.path(),
        )
        .unwrap(),
    );
    assert_eq!(
        e.to_string(),
        format!(
            "disk: file {:?} does not exist",
            dir.path().join("missing.iso")
        )
    );
}

#[test]
fn a_migrate_node_exposes_its_handle_and_moves_the_disk() {
    use iovirt_backend::{Inline, MemoryBackend};
    use iovirt_filter::migrate::MigrationState;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("src.img"), vec![3u8; 1 << 20]).unwrap();
    let spec = StackSpec::from_toml_str_in(
        r#"
        [vdm]
        filter = "migrate"
        chunk-size = "128K"
        converge-bytes = "256K"
        max-passes = 5
        stall-passes = 2
        max-rate = "1G"
        drain-timeout-ms = 500
        [vdm.child]
        backend = "file"
        path = "src.img"
        cache = "writeback"
        "#,
        dir.path(),
    )
    .unwrap();
    let stack = spec.build_stack().unwrap();
    assert_eq!(
        stack.files(),
        &[std::fs::canonicalize(dir.path().join("src.img")).unwrap()]
    );
    let m = stack.migration("vdm").expect("a migration handle");
    assert_eq!(m.progress().state, MigrationState::Idle);
    submit_wait(&stack.backend, write(0, 9, 4096)).unwrap();
    let target = std::sync::Arc::new(Inline(MemoryBackend::new(1 << 20)));
    m.start(target.clone()).unwrap();
    let p = m.wait(std::time::Duration::from_secs(10));
    assert_eq!(p.state, MigrationState::Switched, "{p:?}");
    assert_eq!(target.0.contents()[..4096], [9; 4096][..]);
    assert_eq!(read(&*stack.backend, 4096, 4096), vec![3; 4096]);
}

/// Single-child filters pass completion polling and plugging through to an
/// io_uring file, so the device's owner can reap on its own thread; a
/// filter with several children does not offer it.
#[test]
fn completion_polling_passes_through_single_child_filters() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a.img", "b.img"] {
        std::fs::File::create(dir.path().join(name))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let one = StackSpec::from_toml_str_in(
        "[d]\nfilter = \"fault\"\n[d.child]\nbackend = \"file\"\npath = \"a.img\"\ncache = \"writeback\"\nengine = \"io_uring\"\n",
        dir.path(),
    )
    .unwrap()
    .build()
    .unwrap();
    let Some(fd) = one.completion_fd() else {
        panic!("the fault filter hides its io_uring child's completion eventfd");
    };
    one.plug();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..20u64 {
        let tx = tx.clone();
        one.submit(
            write(i * 4096, i as u8, 4096),
            iovirt_backend::Completion::new(move |r| tx.send(r.is_ok()).unwrap()),
        );
    }
    one.unplug();
    let mut got = 0;
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while got < 20 && std::time::Instant::now() < end {
        iovirt_backend::clear_completion_fd(fd);
        one.poll_completions();
        got += rx.try_iter().filter(|ok| *ok).count();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(got, 20);
    assert_eq!(read(&one, 19 * 4096, 4096), vec![19u8; 4096]);

    let two = StackSpec::from_toml_str_in(
        "[m]\nfilter = \"mirror\"\n[[m.children]]\nbackend = \"file\"\npath = \"a.img\"\ncache = \"writeback\"\n[[m.children]]\nbackend = \"file\"\npath = \"b.img\"\ncache = \"writeback\"\n",
        dir.path(),
    )
    .unwrap()
    .build()
    .unwrap();
    assert_eq!(two.completion_fd(), None);
}
