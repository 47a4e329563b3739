//! Declarative filter stacks: one description, shared by `iovirt-vmm --disk`
//! and the vhost-user-blk daemon, of which back-end sits under which filters.
//!
//! A stack is a small TOML file with one top-level table, named after the disk;
//! each node is a table with either `backend = "..."` (a leaf) or
//! `filter = "..."` and its child in `[<node>.child]` (filters with several
//! children list them as `[[<node>.children]]`). Relative paths are relative to
//! the description's directory. The full reference, with examples, is
//! `docs/FILTERS.md`.
//!
//! ```toml
//! [disk]                 # the top node: what the guest sees
//! filter = "crypt"
//! key-file = "disk.key"
//!
//! [disk.child]
//! filter = "fault"
//! fail = [{ op = "write", offset = "1M..2M", count = 3 }]
//!
//! [disk.child.child]
//! backend = "file"
//! path = "disk.img"
//! cache = "none"
//! ```
//!
//! [`StackSpec::from_file`] (or [`StackSpec::from_toml_str`]) parses a
//! description into a typed [`StackSpec`], rejecting unknown options and
//! malformed values; [`StackSpec::validate`] checks it against the host
//! (missing files, size mismatches) before anything is opened; and
//! [`StackSpec::build`] opens everything or nothing: on any error, whatever
//! was opened is dropped again and a [`StackError`] names the node, as in
//! `disk.child.child: file "x.img" does not exist`. Cycles cannot occur: a
//! TOML tree has no references, and two nodes opening the same file is an error.
//!
//! ```
//! use iovirt_backend::{submit_wait, BlockBackend, IoBuffers, Request};
//! use iovirt_filter::fault::Op;
//! use iovirt_filter::stack::StackSpec;
//!
//! let dir = tempfile::tempdir()?;
//! std::fs::File::create(dir.path().join("disk.img"))?.set_len(4 << 20)?;
//! let toml = r#"
//!     [vda]
//!     filter = "fault"
//!     fail = [{ op = "write", offset = "1M..2M", count = 1 }]
//!     [vda.child]
//!     backend = "file"
//!     path = "disk.img"
//!     cache = "writeback"
//! "#;
//! std::fs::write(dir.path().join("vda.toml"), toml)?;
//!
//! let spec = StackSpec::from_file(dir.path().join("vda.toml"))?;
//! let stack = spec.build_stack()?; // validates, then opens every node
//! assert_eq!(stack.backend.info().capacity, 4 << 20);
//! let write = |offset| Request::Write { offset, buf: IoBuffers::from_vec(vec![7; 4096]), fua: false };
//! assert!(submit_wait(&stack.backend, write(1 << 20)).is_err()); // the injected fault
//! submit_wait(&stack.backend, write(1 << 20))?;                 // count = 1: only once
//! assert_eq!(stack.fault("vda").unwrap().stats().op(Op::Write).injected, 1);
//!
//! // A mistake is one clear line naming the node.
//! let err = StackSpec::from_toml_str("[vda]\nbackend = \"file\"\npath = \"nope.img\"\n")?
//!     .validate()
//!     .unwrap_err();
//! assert_eq!(err.to_string(), r#"vda: file "nope.img" does not exist"#);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod parse;

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iovirt_backend::{
    open_image, AsyncEngine, BlockBackend, CacheMode, Inline, MemoryBackend, NullBackend,
    OpenError, RawFileOptions, CD_SECTOR_SIZE,
};

use crate::aggregate::{Aggregate, AggregateError};
use crate::crypt::{CryptError, CryptOptions};
use crate::fault::{FaultFilter, FaultHandle, FaultOptions, Rule};
use crate::migrate::{Migration, MigrationError, MigrationHandle, MigrationOptions};
use crate::mirror::{Mirror, MirrorError, MirrorHandle, MirrorOptions};
use crate::multipath::{Multipath, MultipathError, MultipathHandle, MultipathOptions};
use crate::redolog::{RedoLog, RedoLogError, RedoLogHandle, RedoLogOptions};

pub use parse::{parse_range, parse_size};

/// Why a stack description could not be read, validated or built. Each
/// message is one line and names the node (`disk.child.child: ...`).
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// The description file could not be read.
    #[error("{}: cannot read the stack description: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the host said.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("stack description, line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line (0 if unknown).
        line: usize,
        /// 1-based column (0 if unknown).
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// The document is not one top-level table.
    #[error("stack description: {0}")]
    Shape(String),
    /// A node names neither a back-end nor a filter, or both, or both `child` and `children`.
    #[error("{node}: {reason}")]
    NodeKind {
        /// The node.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// A node names a back-end or filter that does not exist.
    #[error("{node}: unknown {what} {name:?} (expected {expected})")]
    UnknownKind {
        /// The node.
        node: String,
        /// "back-end" or "filter".
        what: &'static str,
        /// The name given.
        name: String,
        /// The names there are.
        expected: &'static str,
    },
    /// A node has an option its kind does not take.
    #[error("{node}: unknown option {key:?} for {kind} (expected {expected})")]
    UnknownOption {
        /// The node.
        node: String,
        /// The option given.
        key: String,
        /// The node's kind.
        kind: String,
        /// The options the kind takes.
        expected: String,
    },
    /// A required option is missing.
    #[error("{node}: missing {key}")]
    MissingOption {
        /// The node.
        node: String,
        /// The option (or choice of options) needed.
        key: &'static str,
    },
    /// An option's value is malformed.
    #[error("{node}: {key}: {reason}")]
    BadValue {
        /// The node.
        node: String,
        /// The option.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A filter has the wrong number of children.
    #[error("{node}: filter {filter:?} takes {expected} child node(s), found {found}")]
    Children {
        /// The node.
        node: String,
        /// The filter.
        filter: &'static str,
        /// How many it takes.
        expected: String,
        /// How many there are.
        found: usize,
    },
    /// A file named by a node does not exist.
    #[error("{node}: file {path:?} does not exist")]
    FileMissing {
        /// The node.
        node: String,
        /// The path, as resolved.
        path: PathBuf,
    },
    /// A path names a directory, socket or similar, or cannot be examined.
    #[error("{node}: {path:?} is not usable as a disk: {reason}")]
    NotADisk {
        /// The node.
        node: String,
        /// The path, as resolved.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Sizes do not fit: a file of another size than stated, children of
    /// different sizes under a filter that needs equal ones, a fault rule
    /// beyond the disk, a size that is zero or not whole sectors.
    #[error("{node}: size mismatch: {detail}")]
    SizeMismatch {
        /// The node.
        node: String,
        /// What does not fit.
        detail: String,
    },
    /// Two nodes would open the same file (a loop in the stack, or a disk written twice).
    #[error("{node}: file {path:?} is already used by {other}")]
    SharedFile {
        /// The later node.
        node: String,
        /// The file.
        path: PathBuf,
        /// The node that uses it first.
        other: String,
    },
    /// A back-end could not be opened.
    #[error("{node}: {source}")]
    Open {
        /// The node.
        node: String,
        /// What the back-end said.
        #[source]
        source: OpenError,
    },
    /// A mirror, redo-log, aggregation, multipath or migration filter could not be built.
    #[error("{node}: {source}")]
    Filter {
        /// The node.
        node: String,
        /// What the filter said.
        #[source]
        source: FilterBuildError,
    },
    /// The encryption filter could not unlock its volume (wrong passphrase or key file, not LUKS, ...).
    #[error("{node}: cannot unlock the encrypted volume: {source}")]
    Crypt {
        /// The node.
        node: String,
        /// What the encryption filter said.
        #[source]
        source: CryptError,
    },
}

/// Why a mirror, redo-log, aggregation, multipath or migration node could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FilterBuildError {
    /// From [`crate::mirror::Mirror::new`].
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    /// From [`crate::redolog::RedoLog::open`].
    #[error(transparent)]
    RedoLog(#[from] RedoLogError),
    /// From [`crate::aggregate::Aggregate::new`].
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// From [`crate::multipath::Multipath::new`].
    #[error(transparent)]
    Multipath(#[from] MultipathError),
    /// From [`crate::migrate::Migration::new`].
    #[error(transparent)]
    Migration(#[from] MigrationError),
}

/// A parsed stack description: the disk's name and its top node.
#[derive(Clone, Debug)]
pub struct StackSpec {
    /// The name of the top-level table (`disk` for `[disk]`); node paths start with it.
    pub name: String,
    /// The top node: what the guest sees.
    pub root: NodeSpec,
}

/// One node of a stack.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Where the node is in the description (`disk.child.child`, `disk.children[1]`).
    pub path: String,
    /// What it is.
    pub kind: NodeKind,
}

/// A back-end (a leaf) or a filter over child nodes.
#[derive(Clone, Debug)]
pub enum NodeKind {
    /// A leaf: where the data is.
    Backend(BackendSpec),
    /// A filter and its children, in order.
    Filter {
        /// Which filter, with its options.
        filter: FilterSpec,
        /// The nodes it wraps.
        children: Vec<NodeSpec>,
    },
}

/// The back-ends a stack can end in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    /// `backend = "file"`: a raw image file or block device.
    File {
        /// `path`: the file.
        path: PathBuf,
        /// `cache`: none (default), writethrough, writeback or unsafe.
        cache: CacheMode,
        /// `readonly`: open read-only (default false).
        read_only: bool,
        /// `engine`: auto (default), io_uring or threads.
        engine: AsyncEngine,
        /// `size`: if given, the file must be exactly this many bytes.
        size: Option<u64>,
    },
    /// `backend = "memory"`: a zero-filled disk in host memory.
    Memory {
        /// `size`: capacity in bytes (required).
        size: u64,
    },
    /// `backend = "null"`: stores nothing (benchmarks).
    Null {
        /// `size`: capacity in bytes (default 1G).
        size: u64,
        /// `zero-reads`: reads return zeroes (default false: buffers are left as they are).
        zero_reads: bool,
    },
    /// `backend = "image"`: a read-only disc image (ISO) with 2048-byte sectors.
    Image {
        /// `path`: the image.
        path: PathBuf,
    },
}

/// The filters a stack can use.
#[derive(Clone, Debug)]
pub enum FilterSpec {
    /// `filter = "fault"`: [`crate::fault::FaultFilter`] with its rules.
    Fault {
        /// `seed`, `track-writes`.
        options: FaultOptions,
        /// `fail`, `stall`, `slow`, `tear` and `rate-limit` rules, in that order.
        rules: Vec<Rule>,
    },
    /// `filter = "crypt"`: LUKS encryption through [`crate::crypt::open_luks`]
    /// (`passphrase` or `key-file`).
    Crypt(CryptOptions),
    /// `filter = "mirror"`: [`crate::mirror::Mirror`] over 2 or more children
    /// (`region-size`, `bitmap`, `read-policy`, `write-quorum`, `resync-on-open`).
    Mirror(MirrorOptions),
    /// `filter = "redolog"`: [`crate::redolog::RedoLog`] over its child as the base.
    RedoLog {
        /// `log`: the log file (created if missing).
        log: PathBuf,
    },
    /// `filter = "concat"`: the children one after another ([`crate::aggregate::Aggregate::concat`]).
    Concat,
    /// `filter = "stripe"`: the children interleaved ([`crate::aggregate::Aggregate::stripe`]).
    Stripe {
        /// `chunk`: bytes per chunk (default 64K).
        chunk: u64,
    },
    /// `filter = "multipath"`: [`crate::multipath::Multipath`] over paths to one disk
    /// (`policy`, `timeout-ms`).
    Multipath(MultipathOptions),
    /// `filter = "migrate"`: [`crate::migrate::Migration`] over its child, the
    /// disk's current back-end, ready to move it elsewhere at run time
    /// (`chunk-size`, `converge-bytes`, `max-passes`, `stall-passes`,
    /// `max-rate`, `drain-timeout-ms`).
    Migrate(MigrationOptions),
}

impl FilterSpec {
    /// The name in descriptions.
    pub fn name(&self) -> &'static str {
        match self {
            FilterSpec::Fault { .. } => "fault",
            FilterSpec::Crypt(_) => "crypt",
            FilterSpec::Mirror(_) => "mirror",
            FilterSpec::RedoLog { .. } => "redolog",
            FilterSpec::Concat => "concat",
            FilterSpec::Stripe { .. } => "stripe",
            FilterSpec::Multipath(_) => "multipath",
            FilterSpec::Migrate(_) => "migrate",
        }
    }

    /// How many children the filter takes (least, most).
    pub fn children(&self) -> (usize, usize) {
        match self {
            FilterSpec::Fault { .. }
            | FilterSpec::Crypt(_)
            | FilterSpec::RedoLog { .. }
            | FilterSpec::Migrate(_) => (1, 1),
            FilterSpec::Mirror(_) => (2, MAX_CHILDREN),
            FilterSpec::Concat | FilterSpec::Stripe { .. } | FilterSpec::Multipath(_) => {
                (1, MAX_CHILDREN)
            }
        }
    }

    /// Whether all children must have the same capacity (mirrors, multipath).
    pub fn needs_equal_children(&self) -> bool {
        matches!(self, FilterSpec::Mirror(_) | FilterSpec::Multipath(_))
    }
}

/// The most children a mirror, aggregate or multipath node may have.
pub const MAX_CHILDREN: usize = 64;

/// The run-time control of one mirror, redo-log, multipath or migration
/// node, for a control interface that addresses nodes by path.
#[derive(Clone, Debug)]
pub enum NodeControl {
    /// A mirror: fail/return children, resync progress, verify.
    Mirror(MirrorHandle),
    /// A redo log: snapshots, views, revert, merge.
    RedoLog(RedoLogHandle),
    /// A multipath disk: path status, fail/restore paths.
    Multipath(MultipathHandle),
    /// A migration filter: start, watch and cancel a live migration.
    Migration(MigrationHandle),
}

/// A built stack: the top back-end, and the control handles of its fault,
/// mirror, redo-log and multipath filters.
pub struct Stack {
    /// What the guest's device submits to.
    pub backend: Arc<dyn BlockBackend>,
    faults: Vec<(String, FaultHandle)>,
    controls: Vec<(String, NodeControl)>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("info", &self.backend.info())
            .field(
                "faults",
                &self.faults.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Stack {
    /// The control handle of the fault filter at node `path` (`disk.child`).
    pub fn fault(&self, path: &str) -> Option<&FaultHandle> {
        self.faults.iter().find(|(p, _)| p == path).map(|(_, h)| h)
    }

    /// Every fault filter's node path and handle, top first.
    pub fn faults(&self) -> impl Iterator<Item = (&str, &FaultHandle)> {
        self.faults.iter().map(|(p, h)| (p.as_str(), h))
    }

    /// The control of the mirror, redo-log or multipath node at `path`.
    pub fn control(&self, path: &str) -> Option<&NodeControl> {
        self.controls
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, c)| c)
    }

    /// Every mirror, redo-log and multipath node's path and control, top first.
    pub fn controls(&self) -> impl Iterator<Item = (&str, &NodeControl)> {
        self.controls.iter().map(|(p, c)| (p.as_str(), c))
    }

    /// The mirror at node `path`.
    pub fn mirror(&self, path: &str) -> Option<&MirrorHandle> {
        match self.control(path)? {
            NodeControl::Mirror(h) => Some(h),
            _ => None,
        }
    }

    /// The redo log at node `path`.
    pub fn redolog(&self, path: &str) -> Option<&RedoLogHandle> {
        match self.control(path)? {
            NodeControl::RedoLog(h) => Some(h),
            _ => None,
        }
    }

    /// The migration filter at node `path`.
    pub fn migration(&self, path: &str) -> Option<&MigrationHandle> {
        match self.control(path)? {
            NodeControl::Migration(h) => Some(h),
            _ => None,
        }
    }

    /// Every file the stack uses (images, logs, bitmaps), as canonical paths:
    /// what a migration target must not be.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The multipath disk at node `path`.
    pub fn multipath(&self, path: &str) -> Option<&MultipathHandle> {
        match self.control(path)? {
            NodeControl::Multipath(h) => Some(h),
            _ => None,
        }
    }
}

/// Parse, validate and open the stack described in `path`: the one call a
/// VMM or daemon makes for `--disk stack=FILE`.
pub fn open_stack_file(path: impl AsRef<Path>) -> Result<Arc<dyn BlockBackend>, StackError> {
    StackSpec::from_file(path)?.build()
}

impl StackSpec {
    /// Parse a description; relative paths stay relative to the current directory.
    pub fn from_toml_str(text: &str) -> Result<Self, StackError> {
        parse::parse_document(text, None)
    }

    /// Parse a description whose relative paths are relative to `base`.
    pub fn from_toml_str_in(text: &str, base: &Path) -> Result<Self, StackError> {
        parse::parse_document(text, Some(base))
    }

    /// Read and parse the description in `path`; relative paths in it are
    /// relative to its directory.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, StackError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| StackError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        parse::parse_document(&text, Some(base))
    }

    /// Check the stack against the host before opening anything: files exist
    /// and are disks, stated sizes match, sizes are whole sectors, children of
    /// filters that need equal sizes have them, fault rules lie within their
    /// disk, key files exist, and no file is used twice. Whether a key opens
    /// the volume is only known when [`StackSpec::build`] opens it.
    pub fn validate(&self) -> Result<(), StackError> {
        self.validate_files().map(|_| ())
    }

    fn validate_files(&self) -> Result<Vec<PathBuf>, StackError> {
        let mut files = HashMap::new();
        validate_node(&self.root, &mut files)?;
        let mut files: Vec<PathBuf> = files.into_keys().collect();
        files.sort();
        Ok(files)
    }

    /// Validate, then open every node, bottom up. All or nothing: on an error
    /// everything opened so far is dropped before it returns.
    pub fn build(&self) -> Result<Arc<dyn BlockBackend>, StackError> {
        Ok(self.build_stack()?.backend)
    }

    /// [`StackSpec::build`], keeping the fault filters' control handles.
    pub fn build_stack(&self) -> Result<Stack, StackError> {
        let files = self.validate_files()?;
        let mut faults = Vec::new();
        let mut controls = Vec::new();
        let backend = build_node(&self.root, &mut faults, &mut controls)?;
        faults.reverse();
        controls.reverse();
        Ok(Stack {
            backend,
            faults,
            controls,
            files,
        })
    }
}

/// What validation knows of a node's capacity (`None` where only opening tells).
fn validate_node(
    node: &NodeSpec,
    files: &mut HashMap<PathBuf, String>,
) -> Result<Option<u64>, StackError> {
    let size_err = |detail: String| StackError::SizeMismatch {
        node: node.path.clone(),
        detail,
    };
    match &node.kind {
        NodeKind::Backend(b) => match b {
            BackendSpec::File { path, size, .. } => {
                let meta = check_file(&node.path, path, files)?;
                if meta.file_type().is_file() {
                    if let Some(want) = size {
                        if meta.len() != *want {
                            return Err(size_err(format!(
                                "file {path:?} is {} bytes, the description says {want}",
                                meta.len()
                            )));
                        }
                    }
                    Ok(Some(meta.len() / 512 * 512))
                } else {
                    Ok(*size)
                }
            }
            BackendSpec::Image { path } => {
                let meta = check_file(&node.path, path, files)?;
                let cd = u64::from(CD_SECTOR_SIZE);
                Ok(meta.file_type().is_file().then(|| meta.len() / cd * cd))
            }
            BackendSpec::Memory { size } | BackendSpec::Null { size, .. } => {
                if *size == 0 || size % 512 != 0 {
                    return Err(size_err(format!(
                        "size {size} is not a positive multiple of 512 bytes"
                    )));
                }
                if matches!(b, BackendSpec::Memory { .. }) && *size > isize::MAX as u64 {
                    return Err(size_err(format!("size {size} does not fit in memory")));
                }
                Ok(Some(*size))
            }
        },
        NodeKind::Filter { filter, children } => {
            let mut sizes = Vec::with_capacity(children.len());
            // Multipath children are paths to one disk: they may name the same file.
            let paths_to_one = matches!(filter, FilterSpec::Multipath(_));
            let before = if paths_to_one {
                files.clone()
            } else {
                HashMap::new()
            };
            for c in children {
                if paths_to_one {
                    let mut own = before.clone();
                    sizes.push((c, validate_node(c, &mut own)?));
                    for (k, v) in own {
                        files.entry(k).or_insert(v);
                    }
                } else {
                    sizes.push((c, validate_node(c, files)?));
                }
            }
            if filter.needs_equal_children() {
                let known: Vec<_> = sizes
                    .iter()
                    .filter_map(|(c, s)| s.map(|s| (c, s)))
                    .collect();
                if let Some(((c0, s0), rest)) = known.split_first().map(|(a, r)| (*a, r)) {
                    if let Some((c, s)) = rest.iter().find(|(_, s)| *s != s0) {
                        return Err(size_err(format!(
                            "{} has {s} bytes but {} has {s0}; {} needs equal sizes",
                            c.path,
                            c0.path,
                            filter.name()
                        )));
                    }
                }
            }
            let child_size = sizes.first().and_then(|(_, s)| *s);
            match filter {
                FilterSpec::Fault { rules, .. } => {
                    if let Some(cap) = child_size {
                        for r in rules {
                            if let Some(Range { start, .. }) = &r.selector.range {
                                if *start >= cap {
                                    return Err(size_err(format!(
                                        "a {} rule starts at byte {start}, beyond the {cap} bytes of {}",
                                        action_name(r),
                                        sizes[0].0.path
                                    )));
                                }
                            }
                        }
                    }
                    Ok(child_size)
                }
                FilterSpec::Mirror(opts) => {
                    if let Some(b) = &opts.bitmap {
                        claim_side_file(&node.path, "bitmap", b, files)?;
                    }
                    if opts.region_size == 0 || opts.region_size % 512 != 0 {
                        return Err(StackError::BadValue {
                            node: node.path.clone(),
                            key: "region-size".into(),
                            reason: format!(
                                "{} is not a positive multiple of 512 bytes",
                                opts.region_size
                            ),
                        });
                    }
                    if opts.write_quorum == 0 || opts.write_quorum > children.len() {
                        return Err(StackError::BadValue {
                            node: node.path.clone(),
                            key: "write-quorum".into(),
                            reason: format!(
                                "{} is not between 1 and the {} children",
                                opts.write_quorum,
                                children.len()
                            ),
                        });
                    }
                    Ok(child_size)
                }
                FilterSpec::RedoLog { log } => {
                    claim_side_file(&node.path, "log", log, files)?;
                    Ok(child_size)
                }
                FilterSpec::Multipath(_) => Ok(child_size),
                FilterSpec::Migrate(opts) => {
                    let bad = |key: &str, reason: String| StackError::BadValue {
                        node: node.path.clone(),
                        key: key.into(),
                        reason,
                    };
                    if opts.chunk_size == 0 || opts.chunk_size % 512 != 0 {
                        return Err(bad(
                            "chunk-size",
                            format!(
                                "{} is not a positive multiple of 512 bytes",
                                opts.chunk_size
                            ),
                        ));
                    }
                    if let Some(cap) = child_size {
                        if opts.chunk_size > cap {
                            return Err(size_err(format!(
                                "chunk-size {} is larger than the {cap} bytes of {}",
                                opts.chunk_size, sizes[0].0.path
                            )));
                        }
                    }
                    if opts.max_passes == 0 {
                        return Err(bad("max-passes", "must be at least 1".into()));
                    }
                    if opts.stall_passes == 0 {
                        return Err(bad("stall-passes", "must be at least 1".into()));
                    }
                    if opts.max_rate == Some(0) {
                        return Err(bad(
                            "max-rate",
                            "0 bytes per second would never copy (leave it out for no cap)".into(),
                        ));
                    }
                    if opts.drain_timeout.is_zero() {
                        return Err(bad("drain-timeout-ms", "must be at least 1".into()));
                    }
                    Ok(child_size)
                }
                FilterSpec::Concat => Ok(sizes
                    .iter()
                    .try_fold(0u64, |acc, (_, s)| s.and_then(|s| acc.checked_add(s)))),
                FilterSpec::Stripe { chunk } => {
                    if *chunk == 0 || chunk % 512 != 0 {
                        return Err(StackError::BadValue {
                            node: node.path.clone(),
                            key: "chunk".into(),
                            reason: format!("{chunk} is not a positive multiple of 512 bytes"),
                        });
                    }
                    let known: Option<Vec<u64>> = sizes.iter().map(|(_, s)| *s).collect();
                    match known.and_then(|k| k.into_iter().min()) {
                        Some(min) if min < *chunk => Err(size_err(format!(
                            "a child has {min} bytes, less than one {chunk}-byte chunk"
                        ))),
                        Some(min) => Ok((min / chunk)
                            .checked_mul(*chunk)
                            .and_then(|x| x.checked_mul(sizes.len() as u64))),
                        None => Ok(None),
                    }
                }
                FilterSpec::Crypt(opts) => {
                    if let Some(kf) = &opts.key_file {
                        if !kf.exists() {
                            return Err(StackError::FileMissing {
                                node: node.path.clone(),
                                path: kf.clone(),
                            });
                        }
                    }
                    // The payload size is in the LUKS header: only opening tells.
                    Ok(None)
                }
            }
        }
    }
}

fn action_name(r: &Rule) -> &'static str {
    use crate::fault::Action;
    match r.action {
        Action::Fail(_) => "fail",
        Action::Stall(_) => "stall",
        Action::Slow(_) => "slow",
        Action::Tear { .. } => "tear",
        Action::RateLimit { .. } => "rate-limit",
    }
}

/// Register a file a filter keeps beside the disk (a bitmap, a log): it
/// may not exist yet, but must not be a directory nor used by another node.
fn claim_side_file(
    node: &str,
    what: &str,
    path: &Path,
    files: &mut HashMap<PathBuf, String>,
) -> Result<(), StackError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.file_type().is_file() {
            return Err(StackError::NotADisk {
                node: node.to_string(),
                path: path.to_path_buf(),
                reason: format!("the {what} must be a regular file"),
            });
        }
    }
    let key = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .map(|d| d.join(name))
        .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    };
    if let Some(other) = files.get(&key) {
        return Err(StackError::SharedFile {
            node: node.to_string(),
            path: path.to_path_buf(),
            other: other.clone(),
        });
    }
    files.insert(key, node.to_string());
    Ok(())
}

fn check_file(
    node: &str,
    path: &Path,
    files: &mut HashMap<PathBuf, String>,
) -> Result<std::fs::Metadata, StackError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StackError::FileMissing {
                node: node.to_string(),
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(StackError::NotADisk {
                node: node.to_string(),
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(StackError::NotADisk {
            node: node.to_string(),
            path: path.to_path_buf(),
            reason: "neither a regular file nor a block device".into(),
        });
    }
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if let Some(other) = files.get(&key) {
        return Err(StackError::SharedFile {
            node: node.to_string(),
            path: path.to_path_buf(),
            other: other.clone(),
        });
    }
    files.insert(key, node.to_string());
    Ok(meta)
}

/// Open `node` and everything under it; what was opened is dropped on error.
fn build_node(
    node: &NodeSpec,
    faults: &mut Vec<(String, FaultHandle)>,
    controls: &mut Vec<(String, NodeControl)>,
) -> Result<Arc<dyn BlockBackend>, StackError> {
    let open_err = |source| StackError::Open {
        node: node.path.clone(),
        source,
    };
    match &node.kind {
        NodeKind::Backend(b) => Ok(match b {
            BackendSpec::File {
                path,
                cache,
                read_only,
                engine,
                ..
            } => RawFileOptions::new(*cache)
                .read_only(*read_only)
                .open_async(path, *engine)
                .map_err(open_err)?,
            BackendSpec::Image { path } => {
                let raw = open_image(path).map_err(open_err)?;
                let pool =
                    iovirt_backend::ThreadPool::new(raw, 2, "iovirt-image").map_err(|e| {
                        open_err(OpenError::Engine {
                            engine: "thread-pool",
                            source: e,
                        })
                    })?;
                Arc::new(pool)
            }
            BackendSpec::Memory { size } => Arc::new(Inline(MemoryBackend::new(*size))),
            BackendSpec::Null { size, zero_reads } => {
                Arc::new(Inline(NullBackend::new(*size, *zero_reads)))
            }
        }),
        NodeKind::Filter { filter, children } => {
            let mut opened = Vec::with_capacity(children.len());
            let mut own_faults = Vec::new();
            let mut own_controls = Vec::new();
            for c in children {
                opened.push(build_node(c, &mut own_faults, &mut own_controls)?);
            }
            let filter_err = |source: FilterBuildError| StackError::Filter {
                node: node.path.clone(),
                source,
            };
            let multi: Option<Arc<dyn BlockBackend>> = match filter {
                FilterSpec::Mirror(opts) => {
                    let m = Mirror::new(opened.clone(), opts.clone())
                        .map_err(|e| filter_err(e.into()))?;
                    own_controls.push((node.path.clone(), NodeControl::Mirror(m.handle())));
                    Some(Arc::new(m))
                }
                FilterSpec::Concat => Some(Arc::new(
                    Aggregate::concat(opened.clone()).map_err(|e| filter_err(e.into()))?,
                )),
                FilterSpec::Stripe { chunk } => Some(Arc::new(
                    Aggregate::stripe(opened.clone(), *chunk).map_err(|e| filter_err(e.into()))?,
                )),
                FilterSpec::Multipath(opts) => {
                    let m =
                        Multipath::new(opened.clone(), *opts).map_err(|e| filter_err(e.into()))?;
                    own_controls.push((node.path.clone(), NodeControl::Multipath(m.handle())));
                    Some(Arc::new(m))
                }
                _ => None,
            };
            if let Some(backend) = multi {
                faults.extend(own_faults);
                controls.extend(own_controls);
                return Ok(backend);
            }
            let mut opened = opened.into_iter();
            let Some(child) = opened.next() else {
                return Err(StackError::Children {
                    node: node.path.clone(),
                    filter: filter.name(),
                    expected: "1".into(),
                    found: 0,
                });
            };
            let backend: Arc<dyn BlockBackend> = match filter {
                FilterSpec::Fault { options, rules } => {
                    let f = FaultFilter::with_options(child, *options);
                    let h = f.handle();
                    for r in rules {
                        h.add_rule(r.clone());
                    }
                    own_faults.push((node.path.clone(), h));
                    Arc::new(f)
                }
                FilterSpec::RedoLog { log } => {
                    let r = RedoLog::open(child, RedoLogOptions::new(log))
                        .map_err(|e| filter_err(e.into()))?;
                    own_controls.push((node.path.clone(), NodeControl::RedoLog(r.handle())));
                    Arc::new(r)
                }
                FilterSpec::Migrate(opts) => {
                    let m =
                        Migration::new(child, opts.clone()).map_err(|e| filter_err(e.into()))?;
                    own_controls.push((node.path.clone(), NodeControl::Migration(m.handle())));
                    Arc::new(m)
                }
                FilterSpec::Mirror(_)
                | FilterSpec::Concat
                | FilterSpec::Stripe { .. }
                | FilterSpec::Multipath(_) => {
                    return Err(StackError::Children {
                        node: node.path.clone(),
                        filter: filter.name(),
                        expected: "several".into(),
                        found: 1,
                    })
                }
                FilterSpec::Crypt(opts) => {
                    crate::crypt::open_luks(child, opts).map_err(|source| StackError::Crypt {
                        node: node.path.clone(),
                        source,
                    })?
                }
            };
            faults.extend(own_faults);
            controls.extend(own_controls);
            Ok(backend)
        }
    }
}
