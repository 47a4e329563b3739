//! Fuzz the run-time control protocol (iovirt-control): arbitrary bytes, split
//! into lines, answered by a `Control` over a disk whose stack has a migrate
//! node over a two-way mirror of memory disks, and a scheduling stage. Every
//! line must get a JSON object answer with `ok`; nothing may panic or hang.
//! `migrate-start` is refused by an embedder command registered in front of
//! the built-in ones (however the name is escaped in the JSON): it creates a
//! target file at a path the client names, which a fuzzer must not do.
#![no_main]
use std::sync::Arc;

use iovirt_control::{Commands, Control, DiskControl, Reply};
use iovirt_filter::stack::StackSpec;
use iovirt_sched::{ClientParams, ManualClock, SharedScheduler, StageConfig};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

/// Answers `migrate-start` with an error before the built-in command sees it.
struct NoMigrateStart;

impl Commands for NoMigrateStart {
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
    fn handle(&self, _: &Control, cmd: &str, _: &Map<String, Value>) -> Option<Reply> {
        (cmd == "migrate-start").then(|| Err("not while fuzzing".to_string()))
    }
}

const STACK: &str = r#"
[vda]
filter = "migrate"
chunk-size = "16K"

[vda.child]
filter = "mirror"

[[vda.child.children]]
backend = "memory"
size = "256K"

[[vda.child.children]]
backend = "memory"
size = "256K"
"#;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir();
    let stack = StackSpec::from_toml_str_in(STACK, &dir)
        .expect("the fixed stack parses")
        .build_stack()
        .expect("the fixed stack builds");
    let sched = Arc::new(SharedScheduler::new(
        StageConfig::default(),
        Arc::new(ManualClock::default()),
    ));
    let params = ClientParams::new(10.0, Some(100.0), 2.0).expect("valid parameters");
    let stage = sched.add_client(params, stack.backend.clone());
    let disk = DiskControl::new("vda")
        .with_stack(&stack)
        .with_client(Some(stage.client()));
    let control = Control::new(vec![disk], Some(sched)).with_commands(Arc::new(NoMigrateStart));
    for line in data.split(|&b| b == b'\n').take(64) {
        let answer = control.handle_line(line);
        assert!(answer.get("ok").is_some_and(|v| v.is_boolean()), "{answer}");
    }
    drop(stage);
});
