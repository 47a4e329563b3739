//! `migrate-start`, `migrate-status` and `migrate-cancel`: live migration of
//! a disk through the `migrate` node of its stack.
//!
//! A target is either a raw file (`path`, absolute, with `cache`): created and
//! sized to the disk's capacity when missing, else it must already have exactly
//! that capacity; or a stack description (`stack`, an absolute path to a TOML
//! file) whose top node becomes the disk's back-end. A target may not use a
//! file the disk's stack uses, nor one another migration of the disk targets.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iovirt_backend::{AsyncEngine, BlockBackend, CacheMode, RawFileOptions};
use iovirt_filter::migrate::{MigrationHandle, MigrationProgress, MigrationState};
use iovirt_filter::stack::{Stack, StackSpec};
use serde_json::{json, Map, Value};

use crate::{canonical, obj, to_value, DiskControl, Reply};

/// What a migration node was last told to migrate to.
pub(crate) struct Target {
    /// For `migrate-status`: `{"path":..,"cache":..}` or `{"stack":..}`.
    desc: Value,
    /// The files the target uses (canonical).
    files: Vec<PathBuf>,
    /// A stack target's handles, kept with it.
    _stack: Option<Stack>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("desc", &self.desc).finish()
    }
}

fn abs_path(req: &Map<String, Value>, key: &str) -> Result<Option<PathBuf>, String> {
    match req.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if Path::new(s).is_absolute() && !s.contains('\0') => {
            Ok(Some(PathBuf::from(s)))
        }
        Some(Value::String(_)) => Err(format!("\"{key}\" must be an absolute path")),
        Some(_) => Err(format!("\"{key}\" must be a string")),
    }
}

/// Open (creating if missing) the raw file target of `capacity` bytes.
/// Returns the back-end and whether the file was created here.
fn open_file(
    path: &Path,
    cache: CacheMode,
    capacity: u64,
) -> Result<(Arc<dyn BlockBackend>, bool), String> {
    let created = match std::fs::metadata(path) {
        Ok(meta) => {
            let ft = meta.file_type();
            if ft.is_file() {
                if meta.len() != capacity {
                    return Err(format!(
                        "{} is {} bytes, the disk has {capacity}: give a missing file (it is created) or one of the same size",
                        path.display(),
                        meta.len()
                    ));
                }
            } else if !ft.is_block_device() {
                return Err(format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ));
            }
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            if let Err(e) = f.set_len(capacity) {
                let _ = std::fs::remove_file(path);
                return Err(format!(
                    "cannot size {} to {capacity} bytes: {e}",
                    path.display()
                ));
            }
            true
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    match RawFileOptions::new(cache).open_async(path, AsyncEngine::Auto) {
        Ok(b) => Ok((b, created)),
        Err(e) => {
            if created {
                let _ = std::fs::remove_file(path);
            }
            Err(format!("cannot open {}: {e}", path.display()))
        }
    }
}

pub(crate) fn start(
    d: &DiskControl,
    node: &str,
    m: &MigrationHandle,
    req: &Map<String, Value>,
) -> Reply {
    let path = abs_path(req, "path")?;
    let stack = abs_path(req, "stack")?;
    let cache = match req.get("cache") {
        None => None,
        Some(Value::String(s)) => Some(
            s.parse::<CacheMode>()
                .map_err(|e| format!("\"cache\": {e}"))?,
        ),
        Some(_) => return Err("\"cache\" must be a string".into()),
    };
    // One start at a time per disk: the file checks and the start go together.
    let mut migrations = d.migrations.lock().unwrap_or_else(|e| e.into_inner());
    let now = m.progress();
    if !now.state.is_final() {
        return Err(format!("{node}: a migration is already running"));
    }
    // In use: the disk's files, other nodes' targets, and this node's last
    // target if it was switched to (it is the disk's back-end now).
    let switched = now.state == MigrationState::Switched;
    let mut in_use: Vec<PathBuf> = d.files.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (n, t) in migrations.iter() {
        if n != node || switched {
            in_use.extend(t.files.iter().cloned());
        }
    }
    let check = |files: &[PathBuf]| -> Result<(), String> {
        match files.iter().find(|f| in_use.contains(f)) {
            Some(f) => Err(format!(
                "{node}: {} is in use by the disk: a target needs files of its own",
                f.display()
            )),
            None => Ok(()),
        }
    };
    let capacity = now.total_bytes;
    let (backend, target, created) = match (path, stack) {
        (Some(_), Some(_)) => return Err("give either \"path\" or \"stack\", not both".into()),
        (None, None) => {
            return Err(
                "missing the target: \"path\" (a raw file) or \"stack\" (a TOML file)".into(),
            )
        }
        (Some(path), None) => {
            let cache = cache.unwrap_or_default();
            let key = canonical(&path);
            check(std::slice::from_ref(&key))?;
            let (backend, created) =
                open_file(&path, cache, capacity).map_err(|e| format!("{node}: {e}"))?;
            let desc = json!({ "path": path.display().to_string(), "cache": cache.to_string() });
            let target = Target {
                desc,
                files: vec![canonical(&path)],
                _stack: None,
            };
            (backend, target, created.then_some(path))
        }
        (None, Some(file)) => {
            if cache.is_some() {
                return Err("\"cache\" goes with \"path\"; a stack sets it in its file".into());
            }
            let built = StackSpec::from_file(&file)
                .and_then(|s| s.build_stack())
                .map_err(|e| format!("{node}: target stack {}: {e}", file.display()))?;
            check(built.files())?;
            let desc = json!({ "stack": file.display().to_string() });
            let target = Target {
                desc,
                files: built.files().to_vec(),
                _stack: None,
            };
            let backend = built.backend.clone();
            (
                backend,
                Target {
                    _stack: Some(built),
                    ..target
                },
                None,
            )
        }
    };
    if let Err(e) = m.start(backend) {
        if let Some(p) = created {
            let _ = std::fs::remove_file(p);
        }
        return Err(format!("{node}: {e}"));
    }
    log::info!("control: {node}: migration to {} started", target.desc);
    if let Some(old) = migrations.insert(node.to_string(), target) {
        if switched {
            d.files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(old.files);
        }
    }
    drop(migrations);
    answer(d, node, &m.progress())
}

pub(crate) fn status(d: &DiskControl, node: &str, m: &MigrationHandle) -> Reply {
    answer(d, node, &m.progress())
}

/// `node`, `target` and the progress fields.
pub(crate) fn answer(d: &DiskControl, node: &str, p: &MigrationProgress) -> Reply {
    let target = d
        .migrations
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(node)
        .map(|t| t.desc.clone())
        .unwrap_or(Value::Null);
    let mut out = obj(to_value(p)?);
    out.insert("node".into(), json!(node));
    out.insert("target".into(), target);
    Ok(out)
}
