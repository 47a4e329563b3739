//! Stack descriptions with the mirror, redo-log, concat, stripe and
//! multipath filters: parsing, validation messages, building, and the
//! control handles found by node path.

use std::time::Duration;

use iovirt_backend::{submit_wait, BlockBackend, IoBuffers, Request};
use iovirt_filter::mirror::ChildState;
use iovirt_filter::multipath::PathState;
use iovirt_filter::stack::{FilterSpec, NodeKind, StackSpec};

fn write(offset: u64, byte: u8, len: usize) -> Request {
    Request::Write {
        offset,
        buf: IoBuffers::from_vec(vec![byte; len]),
        fua: false,
    }
}

fn read(b: &dyn BlockBackend, offset: u64, len: usize) -> Vec<u8> {
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let m = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).unwrap());
    let buf = IoBuffers::from_guest(
        m.clone(),
        &[(GuestAddress(0), len)],
        iovirt_backend::Direction::DeviceWrites,
    )
    .unwrap();
    submit_wait(b, Request::Read { offset, buf }).unwrap();
    let mut out = vec![0; len];
    m.read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

const DOC: &str = r#"
# A redo log over a mirror of (a stripe of two memory disks) and (a
# multipath disk whose two paths lead to one file).
[vda]
filter = "redolog"
log = "vda.log"

[vda.child]
filter = "mirror"
region-size = "16K"
bitmap = "vda.bitmap"
read-policy = "round-robin"

[[vda.child.children]]
filter = "stripe"
chunk = "4K"
[[vda.child.children.children]]
backend = "memory"
size = "512K"
[[vda.child.children.children]]
backend = "memory"
size = "512K"

[[vda.child.children]]
filter = "multipath"
policy = "failover"
timeout-ms = 2000
[[vda.child.children.children]]
filter = "fault"
[vda.child.children.children.child]
backend = "file"
path = "disk.img"
cache = "writeback"
[[vda.child.children.children]]
backend = "file"
path = "disk.img"
cache = "writeback"
"#;

#[test]
fn a_deep_stack_of_the_new_filters_builds_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let spec = StackSpec::from_toml_str_in(DOC, dir.path()).unwrap();
    let NodeKind::Filter { filter, children } = &spec.root.kind else {
        panic!("the root is a filter")
    };
    assert!(matches!(filter, FilterSpec::RedoLog { .. }));
    let NodeKind::Filter { filter, children } = &children[0].kind else {
        panic!("a mirror")
    };
    assert_eq!(filter.name(), "mirror");
    assert_eq!(children.len(), 2);
    let stack = spec.build_stack().unwrap();
    assert_eq!(stack.backend.info().capacity, 1 << 20);
    submit_wait(&stack.backend, write(8192, 4, 16384)).unwrap();
    submit_wait(&stack.backend, Request::Flush).unwrap();
    let log = stack.redolog("vda").unwrap();
    let mirror = stack.mirror("vda.child").unwrap();
    let mp = stack.multipath("vda.child.children[1]").unwrap();
    assert!(stack.mirror("vda").is_none());
    assert_eq!(stack.controls().count(), 3);
    // Everything reached the log; merging it pushes it through the mirror,
    // the stripe and the multipath disk into the file.
    let p = log.current();
    log.merge(p).unwrap();
    let img = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(img[8192..8192 + 16384], [4; 16384]);
    assert!(mirror.verify().unwrap().is_empty());
    // The first path fails: the multipath disk fails over, the mirror keeps both children.
    stack
        .fault("vda.child.children[1].children[0]")
        .unwrap()
        .add_rule(iovirt_filter::fault::Rule::fail(
            iovirt_filter::fault::Selector::any(),
            iovirt_filter::fault::InjectedError::Io,
        ));
    let snap = log.snapshot("s").unwrap();
    submit_wait(&stack.backend, write(0, 9, 4096)).unwrap();
    log.merge(log.current()).unwrap();
    assert_eq!(mp.status()[0].state, PathState::Failed);
    assert!(mirror
        .status()
        .iter()
        .all(|c| c.state == ChildState::Healthy));
    assert_eq!(read(&*stack.backend, 0, 4096), vec![9; 4096]);
    assert!(log.view_at(snap).is_err(), "merged away");
    assert!(mirror.wait_resync(Duration::from_secs(1)));
}

#[test]
fn validation_names_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let err = |doc: &str| {
        StackSpec::from_toml_str_in(doc, dir.path())
            .and_then(|s| s.validate())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err("[d]\nfilter = \"mirror\"\n[[d.children]]\nbackend = \"memory\"\nsize = \"1M\"\n[[d.children]]\nbackend = \"memory\"\nsize = \"2M\"\n"),
        "d: size mismatch: d.children[1] has 2097152 bytes but d.children[0] has 1048576; mirror needs equal sizes"
    );
    assert_eq!(
        err("[d]\nfilter = \"mirror\"\n[d.child]\nbackend = \"memory\"\nsize = \"1M\"\n"),
        "d: filter \"mirror\" takes 2 to 64 child node(s), found 1"
    );
    assert_eq!(
        err("[d]\nfilter = \"stripe\"\nchunk = 1000\n[[d.children]]\nbackend = \"memory\"\nsize = \"1M\"\n"),
        "d: chunk: 1000 is not a positive multiple of 512 bytes"
    );
    assert_eq!(
        err("[d]\nfilter = \"stripe\"\nchunk = \"2M\"\n[[d.children]]\nbackend = \"memory\"\nsize = \"1M\"\n"),
        "d: size mismatch: a child has 1048576 bytes, less than one 2097152-byte chunk"
    );
    assert_eq!(
        err("[d]\nfilter = \"redolog\"\n[d.child]\nbackend = \"memory\"\nsize = \"1M\"\n"),
        "d: missing log"
    );
    assert_eq!(
        err("[d]\nfilter = \"multipath\"\npolicy = \"random\"\n[d.child]\nbackend = \"memory\"\nsize = \"1M\"\n"),
        "d: policy: unknown path policy \"random\" (expected failover or round-robin)"
    );
    assert_eq!(
        err("[d]\nfilter = \"mirror\"\nwrite-quorum = 3\n[[d.children]]\nbackend = \"memory\"\nsize = \"1M\"\n[[d.children]]\nbackend = \"memory\"\nsize = \"1M\"\n"),
        "d: write-quorum: 3 is not between 1 and the 2 children"
    );
    // A log cannot double as a bitmap.
    let e = err("[d]\nfilter = \"redolog\"\nlog = \"x\"\n[d.child]\nfilter = \"mirror\"\nbitmap = \"x\"\n[[d.child.children]]\nbackend = \"memory\"\nsize = \"1M\"\n[[d.child.children]]\nbackend = \"memory\"\nsize = \"1M\"\n");
    assert!(
        e.starts_with("d: file") && e.ends_with("is already used by d.child"),
        "{e}"
    );
    // Concat sizes add up; a known size flows into the parent's checks.
    let spec = StackSpec::from_toml_str("[d]\nfilter = \"concat\"\n[[d.children]]\nbackend = \"memory\"\nsize = \"1M\"\n[[d.children]]\nbackend = \"memory\"\nsize = \"3M\"\n").unwrap();
    let stack = spec.build_stack().unwrap();
    assert_eq!(stack.backend.info().capacity, 4 << 20);
}
