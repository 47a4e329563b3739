//! The TOML form of a stack description, walked by hand so that every error
//! names the node it is about.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iovirt_backend::{AsyncEngine, CacheMode};
use toml::{Table, Value};

use super::{BackendSpec, FilterSpec, NodeKind, NodeSpec, StackError, StackSpec};
use crate::crypt::CryptOptions;
use crate::fault::{Action, FaultOptions, InjectedError, Op, Rule, Selector, TearThen};
use crate::migrate::MigrationOptions;
use crate::mirror::{MirrorOptions, ReadPolicy};
use crate::multipath::{MultipathOptions, PathPolicy};

/// The back-ends a node may name.
pub(super) const BACKENDS: &str = "file, memory, null or image";
/// The filters a node may name.
pub(super) const FILTERS: &str =
    "fault, crypt, mirror, redolog, concat, stripe, multipath or migrate";

pub(super) fn parse_document(text: &str, base: Option<&Path>) -> Result<StackSpec, StackError> {
    let doc: Table = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
    let mut tops = doc.iter();
    let (name, root) = match (tops.next(), tops.next()) {
        (Some(top), None) => top,
        (None, _) => {
            return Err(StackError::Shape(
                "expected one top-level table naming the disk, e.g. [disk]".into(),
            ))
        }
        (Some(_), Some(_)) => {
            let names: Vec<String> = doc.keys().map(|k| format!("{k:?}")).collect();
            return Err(StackError::Shape(format!(
                "expected one top-level table naming the disk, found {}",
                names.join(", ")
            )));
        }
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(StackError::Shape(format!(
            "the disk's name {name:?} must be letters, digits, '-' or '_'"
        )));
    }
    let Value::Table(t) = root else {
        return Err(StackError::Shape(format!(
            "{name:?} must be a table ([{name}]), not a {}",
            root.type_str()
        )));
    };
    Ok(StackSpec {
        name: name.clone(),
        root: parse_node(name, t, base)?,
    })
}

/// One line: where in the text, and what the parser said.
fn syntax_error(text: &str, e: &toml::de::Error) -> StackError {
    let (line, column) = match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column)
        }
        None => (0, 0),
    };
    StackError::Syntax {
        line,
        column,
        message: e.message().trim().replace(['\n', '\r'], "; "),
    }
}

/// The keys of one table, checked against what its kind accepts.
struct Keys<'a> {
    node: &'a str,
    t: &'a Table,
}

impl<'a> Keys<'a> {
    fn new(
        node: &'a str,
        kind: &str,
        t: &'a Table,
        allowed: &'static [&'static str],
    ) -> Result<Self, StackError> {
        if let Some(k) = t.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(StackError::UnknownOption {
                node: node.to_string(),
                key: k.clone(),
                kind: kind.to_string(),
                expected: allowed.join(", "),
            });
        }
        Ok(Keys { node, t })
    }

    fn bad(&self, key: &str, reason: impl Into<String>) -> StackError {
        StackError::BadValue {
            node: self.node.to_string(),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn missing(&self, key: &'static str) -> StackError {
        StackError::MissingOption {
            node: self.node.to_string(),
            key,
        }
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, StackError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(key, format!("expected a string, found a {}", v.type_str()))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, StackError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" => Ok(Some(true)),
                "off" | "no" | "false" => Ok(Some(false)),
                _ => Err(self.bad(key, format!("expected true or false, found {s:?}"))),
            },
            Some(v) => Err(self.bad(
                key,
                format!("expected true or false, found a {}", v.type_str()),
            )),
        }
    }

    fn u64(&self, key: &str) -> Result<Option<u64>, StackError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) => u64::try_from(*i)
                .map(Some)
                .map_err(|_| self.bad(key, format!("{i} is negative"))),
            Some(v) => Err(self.bad(
                key,
                format!("expected a whole number, found a {}", v.type_str()),
            )),
        }
    }

    /// A byte count: an integer or a string such as "64M".
    fn size(&self, key: &str) -> Result<Option<u64>, StackError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => parse_size(s).map(Some).ok_or_else(|| {
                self.bad(key, format!("{s:?} is not a size (e.g. 4096, 64K, 1M, 2G)"))
            }),
            Some(_) => self.u64(key),
        }
    }

    fn f64(&self, key: &str) -> Result<Option<f64>, StackError> {
        match self.t.get(key) {
            None => Ok(None),
            Some(Value::Float(f)) => Ok(Some(*f)),
            Some(Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(self.bad(key, format!("expected a number, found a {}", v.type_str()))),
        }
    }

    fn path(&self, key: &str, base: Option<&Path>) -> Result<Option<PathBuf>, StackError> {
        match self.str(key)? {
            None => Ok(None),
            Some("") => Err(self.bad(key, "empty path")),
            Some(p) => Ok(Some(match base {
                Some(b) if Path::new(p).is_relative() => b.join(p),
                _ => PathBuf::from(p),
            })),
        }
    }

    fn parsed<T: std::str::FromStr<Err = String>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StackError> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|e| self.bad(key, e)),
        }
    }
}

/// Parse `4096`, `64K`, `1M`, `2G`, `1T` (binary units; `KiB`-style suffixes too).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s
        .strip_suffix("iB")
        .or_else(|| s.strip_suffix('B'))
        .unwrap_or(s);
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Parse `1M..2M`, `1M..`, `..2M` (half-open, bytes) or a single byte offset.
pub fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let size = |p: &str| parse_size(p).ok_or_else(|| format!("{p:?} is not a size"));
    let r = match s.split_once("..") {
        Some((a, b)) => {
            let start = if a.trim().is_empty() { 0 } else { size(a)? };
            let end = if b.trim().is_empty() {
                u64::MAX
            } else {
                size(b)?
            };
            start..end
        }
        None => {
            let at = size(s)?;
            at..at.saturating_add(1)
        }
    };
    if r.start >= r.end {
        return Err(format!("range {s:?} is empty"));
    }
    Ok(r)
}

const FILE_KEYS: &[&str] = &["backend", "path", "cache", "readonly", "engine", "size"];
const MEMORY_KEYS: &[&str] = &["backend", "size"];
const NULL_KEYS: &[&str] = &["backend", "size", "zero-reads"];
const IMAGE_KEYS: &[&str] = &["backend", "path"];
const FAULT_KEYS: &[&str] = &[
    "filter",
    "child",
    "children",
    "seed",
    "track-writes",
    "fail",
    "stall",
    "slow",
    "tear",
    "rate-limit",
];
const CRYPT_KEYS: &[&str] = &["filter", "child", "children", "passphrase", "key-file"];
const MIRROR_KEYS: &[&str] = &[
    "filter",
    "child",
    "children",
    "region-size",
    "bitmap",
    "read-policy",
    "write-quorum",
    "resync-on-open",
];
const REDOLOG_KEYS: &[&str] = &["filter", "child", "children", "log"];
const CONCAT_KEYS: &[&str] = &["filter", "child", "children"];
const STRIPE_KEYS: &[&str] = &["filter", "child", "children", "chunk"];
const MULTIPATH_KEYS: &[&str] = &["filter", "child", "children", "policy", "timeout-ms"];
const MIGRATE_KEYS: &[&str] = &[
    "filter",
    "child",
    "children",
    "chunk-size",
    "converge-bytes",
    "max-passes",
    "stall-passes",
    "max-rate",
    "drain-timeout-ms",
];
const SELECT_KEYS: [&str; 5] = ["op", "offset", "after", "count", "probability"];

fn parse_node(node: &str, t: &Table, base: Option<&Path>) -> Result<NodeSpec, StackError> {
    let kind = match (t.get("backend"), t.get("filter")) {
        (Some(_), Some(_)) => {
            return Err(StackError::NodeKind {
                node: node.to_string(),
                reason: "give either backend = ... or filter = ..., not both".into(),
            })
        }
        (None, None) => {
            return Err(StackError::NodeKind {
                node: node.to_string(),
                reason: format!("needs backend = ({BACKENDS}) or filter = ({FILTERS})"),
            })
        }
        (Some(b), None) => {
            let name = b.as_str().ok_or_else(|| StackError::BadValue {
                node: node.to_string(),
                key: "backend".into(),
                reason: format!("expected a string, found a {}", b.type_str()),
            })?;
            NodeKind::Backend(parse_backend(node, name, t, base)?)
        }
        (None, Some(f)) => {
            let name = f.as_str().ok_or_else(|| StackError::BadValue {
                node: node.to_string(),
                key: "filter".into(),
                reason: format!("expected a string, found a {}", f.type_str()),
            })?;
            parse_filter(node, name, t, base)?
        }
    };
    Ok(NodeSpec {
        path: node.to_string(),
        kind,
    })
}

fn parse_backend(
    node: &str,
    name: &str,
    t: &Table,
    base: Option<&Path>,
) -> Result<BackendSpec, StackError> {
    match name {
        "file" => {
            let k = Keys::new(node, "backend \"file\"", t, FILE_KEYS)?;
            Ok(BackendSpec::File {
                path: k.path("path", base)?.ok_or_else(|| k.missing("path"))?,
                cache: k.parsed::<CacheMode>("cache")?.unwrap_or_default(),
                read_only: k.bool("readonly")?.unwrap_or(false),
                engine: k.parsed::<AsyncEngine>("engine")?.unwrap_or_default(),
                size: k.size("size")?,
            })
        }
        "memory" => {
            let k = Keys::new(node, "backend \"memory\"", t, MEMORY_KEYS)?;
            Ok(BackendSpec::Memory {
                size: k.size("size")?.ok_or_else(|| k.missing("size"))?,
            })
        }
        "null" => {
            let k = Keys::new(node, "backend \"null\"", t, NULL_KEYS)?;
            Ok(BackendSpec::Null {
                size: k.size("size")?.unwrap_or(1 << 30),
                zero_reads: k.bool("zero-reads")?.unwrap_or(false),
            })
        }
        "image" => {
            let k = Keys::new(node, "backend \"image\"", t, IMAGE_KEYS)?;
            Ok(BackendSpec::Image {
                path: k.path("path", base)?.ok_or_else(|| k.missing("path"))?,
            })
        }
        other => Err(StackError::UnknownKind {
            node: node.to_string(),
            what: "back-end",
            name: other.to_string(),
            expected: BACKENDS,
        }),
    }
}

fn parse_filter(
    node: &str,
    name: &str,
    t: &Table,
    base: Option<&Path>,
) -> Result<NodeKind, StackError> {
    let filter = match name {
        "fault" => {
            let k = Keys::new(node, "filter \"fault\"", t, FAULT_KEYS)?;
            let options = FaultOptions {
                seed: k.u64("seed")?.unwrap_or(0),
                track_writes: k.bool("track-writes")?.unwrap_or(false),
            };
            let mut rules = Vec::new();
            for action in ["fail", "stall", "slow", "tear", "rate-limit"] {
                let Some(v) = t.get(action) else { continue };
                let list: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    Value::Table(_) => vec![v],
                    other => {
                        return Err(k.bad(
                            action,
                            format!(
                                "expected a list of rule tables, found a {}",
                                other.type_str()
                            ),
                        ))
                    }
                };
                for (i, v) in list.into_iter().enumerate() {
                    let rnode = format!("{node}.{action}[{i}]");
                    let Value::Table(rt) = v else {
                        return Err(StackError::BadValue {
                            node: rnode,
                            key: action.into(),
                            reason: format!("expected a table, found a {}", v.type_str()),
                        });
                    };
                    rules.push(parse_rule(&rnode, action, rt, &options)?);
                }
            }
            FilterSpec::Fault { options, rules }
        }
        "crypt" => {
            let k = Keys::new(node, "filter \"crypt\"", t, CRYPT_KEYS)?;
            let mut options = CryptOptions::default();
            if let Some(p) = k.str("passphrase")? {
                options.passphrase = Some(p.to_string());
            }
            if let Some(f) = k.path("key-file", base)? {
                options.key_file = Some(f);
            }
            match (&options.passphrase, &options.key_file) {
                (Some(_), Some(_)) => {
                    return Err(k.bad("passphrase", "give either passphrase or key-file, not both"))
                }
                (None, None) => {
                    return Err(StackError::MissingOption {
                        node: node.to_string(),
                        key: "passphrase or key-file",
                    })
                }
                _ => {}
            }
            FilterSpec::Crypt(options)
        }
        "mirror" => {
            let k = Keys::new(node, "filter \"mirror\"", t, MIRROR_KEYS)?;
            let d = MirrorOptions::default();
            FilterSpec::Mirror(MirrorOptions {
                region_size: k.size("region-size")?.unwrap_or(d.region_size),
                bitmap: k.path("bitmap", base)?,
                read_policy: k.parsed::<ReadPolicy>("read-policy")?.unwrap_or_default(),
                write_quorum: match k.u64("write-quorum")? {
                    None => d.write_quorum,
                    Some(q) => {
                        usize::try_from(q).map_err(|_| k.bad("write-quorum", "too large"))?
                    }
                },
                resync_on_open: k.bool("resync-on-open")?.unwrap_or(d.resync_on_open),
            })
        }
        "redolog" => {
            let k = Keys::new(node, "filter \"redolog\"", t, REDOLOG_KEYS)?;
            FilterSpec::RedoLog {
                log: k.path("log", base)?.ok_or_else(|| k.missing("log"))?,
            }
        }
        "concat" => {
            Keys::new(node, "filter \"concat\"", t, CONCAT_KEYS)?;
            FilterSpec::Concat
        }
        "stripe" => {
            let k = Keys::new(node, "filter \"stripe\"", t, STRIPE_KEYS)?;
            FilterSpec::Stripe {
                chunk: k.size("chunk")?.unwrap_or(64 << 10),
            }
        }
        "multipath" => {
            let k = Keys::new(node, "filter \"multipath\"", t, MULTIPATH_KEYS)?;
            FilterSpec::Multipath(MultipathOptions {
                policy: k.parsed::<PathPolicy>("policy")?.unwrap_or_default(),
                timeout: k
                    .u64("timeout-ms")?
                    .filter(|&ms| ms > 0)
                    .map(Duration::from_millis),
            })
        }
        "migrate" => {
            let k = Keys::new(node, "filter \"migrate\"", t, MIGRATE_KEYS)?;
            let d = MigrationOptions::default();
            let count = |key: &str, default: u32| -> Result<u32, StackError> {
                match k.u64(key)? {
                    None => Ok(default),
                    Some(n) => {
                        u32::try_from(n).map_err(|_| k.bad(key, format!("{n} is too large")))
                    }
                }
            };
            FilterSpec::Migrate(MigrationOptions {
                chunk_size: k.size("chunk-size")?.unwrap_or(d.chunk_size),
                converge_bytes: k.size("converge-bytes")?.unwrap_or(d.converge_bytes),
                max_passes: count("max-passes", d.max_passes)?,
                stall_passes: count("stall-passes", d.stall_passes)?,
                max_rate: k.size("max-rate")?,
                drain_timeout: k
                    .u64("drain-timeout-ms")?
                    .map(Duration::from_millis)
                    .unwrap_or(d.drain_timeout),
            })
        }
        other => {
            return Err(StackError::UnknownKind {
                node: node.to_string(),
                what: "filter",
                name: other.to_string(),
                expected: FILTERS,
            })
        }
    };
    let children = match (t.get("child"), t.get("children")) {
        (Some(_), Some(_)) => {
            return Err(StackError::NodeKind {
                node: node.to_string(),
                reason: "give either child or children, not both".into(),
            })
        }
        (Some(Value::Table(c)), None) => vec![parse_node(&format!("{node}.child"), c, base)?],
        (Some(v), None) => {
            return Err(StackError::BadValue {
                node: node.to_string(),
                key: "child".into(),
                reason: format!(
                    "expected a table ([{node}.child]), found a {}",
                    v.type_str()
                ),
            })
        }
        (None, Some(Value::Array(list))) => {
            let mut children = Vec::with_capacity(list.len());
            for (i, v) in list.iter().enumerate() {
                let cnode = format!("{node}.children[{i}]");
                let Value::Table(c) = v else {
                    return Err(StackError::BadValue {
                        node: cnode,
                        key: "children".into(),
                        reason: format!("expected a table, found a {}", v.type_str()),
                    });
                };
                children.push(parse_node(&cnode, c, base)?);
            }
            children
        }
        (None, Some(v)) => {
            return Err(StackError::BadValue {
                node: node.to_string(),
                key: "children".into(),
                reason: format!(
                    "expected a list of tables ([[{node}.children]]), found a {}",
                    v.type_str()
                ),
            })
        }
        (None, None) => Vec::new(),
    };
    let (min, max) = filter.children();
    if children.len() < min || children.len() > max {
        return Err(StackError::Children {
            node: node.to_string(),
            filter: filter.name(),
            expected: if min == max {
                format!("{min}")
            } else {
                format!("{min} to {max}")
            },
            found: children.len(),
        });
    }
    Ok(NodeKind::Filter { filter, children })
}

fn parse_rule(
    node: &str,
    action: &str,
    t: &Table,
    options: &FaultOptions,
) -> Result<Rule, StackError> {
    let own: &[&str] = match action {
        "fail" => &["error"],
        "stall" => &["ms"],
        "slow" => &["ms"],
        "tear" => &["sectors", "then", "error"],
        _ => &["iops", "bytes-per-second", "burst"],
    };
    let allowed: Vec<&'static str> = SELECT_KEYS.iter().chain(own).copied().collect();
    // `Keys::new` wants a static list: check here, then read through it.
    if let Some(key) = t.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(StackError::UnknownOption {
            node: node.to_string(),
            key: key.clone(),
            kind: format!("a {action} rule"),
            expected: allowed.join(", "),
        });
    }
    let k = Keys { node, t };
    let mut sel = Selector::any();
    match k.str("op")? {
        None | Some("any") => {}
        Some(op) => sel.op = Some(op.parse::<Op>().map_err(|e| k.bad("op", e))?),
    }
    match t.get("offset") {
        None => {}
        Some(Value::String(s)) => sel.range = Some(parse_range(s).map_err(|e| k.bad("offset", e))?),
        Some(Value::Integer(_)) => {
            let at = k.u64("offset")?.unwrap_or(0);
            sel.range = Some(at..at.saturating_add(1));
        }
        Some(v) => {
            return Err(k.bad(
                "offset",
                format!(
                    "expected a range such as \"1M..2M\", found a {}",
                    v.type_str()
                ),
            ))
        }
    }
    sel.after = k.u64("after")?.unwrap_or(0);
    sel.count = k.u64("count")?;
    if let Some(p) = k.f64("probability")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(k.bad("probability", format!("{p} is not between 0 and 1")));
        }
        sel.probability = Some(p);
    }
    let ms = |key: &str| -> Result<Option<Duration>, StackError> {
        Ok(k.u64(key)?.map(Duration::from_millis))
    };
    let error = || -> Result<InjectedError, StackError> {
        Ok(k.parsed::<InjectedError>("error")?
            .unwrap_or(InjectedError::Io))
    };
    let action = match action {
        "fail" => Action::Fail(error()?),
        "stall" => Action::Stall(ms("ms")?),
        "slow" => Action::Slow(ms("ms")?.ok_or_else(|| k.missing("ms"))?),
        "tear" => {
            if sel.op.is_some_and(|o| o != Op::Write) {
                return Err(k.bad("op", "only writes can be torn"));
            }
            let then = match k.str("then")? {
                None | Some("error") => TearThen::Error(error()?),
                Some("crash") if !options.track_writes => {
                    return Err(k.bad(
                        "then",
                        "a crash needs track-writes = true on the fault filter",
                    ))
                }
                Some("crash") => TearThen::Crash,
                Some(other) => {
                    return Err(k.bad("then", format!("{other:?}: expected error or crash")))
                }
            };
            Action::Tear {
                sectors: k.u64("sectors")?.ok_or_else(|| k.missing("sectors"))?,
                then,
            }
        }
        _ => {
            let iops = k.u64("iops")?;
            let bytes_per_second = k.size("bytes-per-second")?;
            if iops.unwrap_or(0) == 0 && bytes_per_second.unwrap_or(0) == 0 {
                return Err(k.missing("iops or bytes-per-second"));
            }
            Action::RateLimit {
                iops,
                bytes_per_second,
                burst: k.u64("burst")?.unwrap_or(1).max(1),
            }
        }
    };
    Ok(Rule {
        selector: sel,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ranges() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_range("1M..2M"), Ok((1 << 20)..(2 << 20)));
        assert_eq!(parse_range("1M.."), Ok((1 << 20)..u64::MAX));
        assert_eq!(parse_range("..4K"), Ok(0..4096));
        assert_eq!(parse_range("512"), Ok(512..513));
        assert!(parse_range("2M..1M").is_err());
        assert!(parse_range("a..b").is_err());
    }
}
