//! Fuzz the redo log's record parsing and replay: arbitrary bytes are walked
//! as a sequence of records through the typed view, then written as a log
//! file and opened over a small memory base (replay with CRC checks and
//! torn-tail cutting), and the replayed disk, a view and a revert are read.
//! Nothing may panic; replay must always leave a log that opens again.
#![no_main]
use std::sync::Arc;

use iovirt_backend::{BlockBackend, Inline, MemoryBackend};
use iovirt_filter::redolog::{record, LogPoint, RedoLog, RedoLogOptions};
use libfuzzer_sys::fuzz_target;

fn scratch_path() -> std::path::PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("iovirt-fuzz-redolog-{}.log", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    // The typed view and parse over the raw bytes.
    let mut rest = data;
    while let Ok((repr, payload)) = record::parse_record(rest) {
        assert_eq!(payload.len(), repr.data_len as usize);
        let n = usize::try_from(repr.record_len()).unwrap_or(usize::MAX);
        rest = rest.get(n..).unwrap_or(&[]);
    }
    if let Ok(view) = record::Record::new_checked(data) {
        let _ = record::RecordRepr::parse(&view);
        let _ = view.compute_crc(view.data());
    }

    // Replay as a log file.
    let path = scratch_path();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let base: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(64 << 10)));
    match RedoLog::open(base.clone(), RedoLogOptions::new(&path)) {
        Ok(log) => {
            let disk = log.read_vec(0, 64 << 10).expect("a replayed log reads");
            let ctl = log.handle();
            let stats = ctl.stats();
            assert!(stats.first_point <= stats.last_point);
            if let Ok(v) = ctl.view_at(LogPoint(stats.last_point.0)) {
                assert_eq!(v.read_vec(0, 64 << 10).expect("a view reads"), disk);
            }
            let mid =
                LogPoint(stats.first_point.0 + (stats.last_point.0 - stats.first_point.0) / 2);
            let _ = ctl.revert(mid);
            let _ = log.read_vec(0, 64 << 10);
            drop(log);
            // What replay left behind opens again, cleanly.
            let again = RedoLog::open(base, RedoLogOptions::new(&path)).expect("reopens");
            let _ = again.read_vec(0, 4096);
        }
        Err(e) => assert!(!e.to_string().contains('\n')),
    }
    let _ = std::fs::remove_file(&path);
});
