//! The `--disk` option: which back-end serves the device.

use std::path::PathBuf;
use std::sync::Arc;

use iovirt_backend::{
    AsyncEngine, BlockBackend, CacheMode, Inline, MemoryBackend, NullBackend, RawFileOptions,
};

use crate::Error;

/// A parsed `--disk` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSpec {
    /// `path=FILE[,readonly=on][,cache=MODE][,engine=auto|io_uring|threads]`: a raw file or block device.
    File {
        /// The image.
        path: PathBuf,
        /// Export read-only.
        read_only: bool,
        /// Cache mode.
        cache: CacheMode,
        /// Asynchronous engine.
        engine: AsyncEngine,
    },
    /// `null[,size=N]`: reads leave buffers as they are, writes vanish (benchmarks).
    Null {
        /// Capacity in bytes.
        size: u64,
    },
    /// `memory,size=N`: a zero-filled disk in host memory.
    Memory {
        /// Capacity in bytes.
        size: u64,
    },
    /// `stack=FILE.toml`: an `iovirt-filter` stack (docs/FILTERS.md), the same
    /// description `iovirt-vmm --disk stack=` takes. Read-only and cache modes
    /// belong in the description, so `readonly=` and `cache=` are refused here.
    Stack {
        /// The stack description.
        path: PathBuf,
    },
}

/// Parse `64M`, `1G`, `4096`, `2T` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

fn on_off(key: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(Error::Usage(format!(
            "--disk {key}={v}: expected on or off"
        ))),
    }
}

impl std::str::FromStr for DiskSpec {
    type Err = Error;
    fn from_str(spec: &str) -> Result<Self, Error> {
        let mut kind = None;
        let mut path = None;
        let mut stack = None;
        let mut size = None;
        let mut engine_set = false;
        let mut read_only_set = false;
        let mut read_only = false;
        let mut cache = None;
        let mut engine = AsyncEngine::Auto;
        for item in spec.split(',') {
            match item.split_once('=') {
                None if item == "null" || item == "memory" => kind = Some(item),
                None => return Err(Error::Usage(format!("--disk: unknown item {item:?}"))),
                Some(("path", p)) if !p.is_empty() => path = Some(PathBuf::from(p)),
                Some(("stack", p)) if !p.is_empty() => stack = Some(PathBuf::from(p)),
                Some(("stack", _)) => {
                    return Err(Error::Usage("--disk stack=: expected a file name".into()))
                }
                Some(("size", s)) => {
                    size = Some(parse_size(s).ok_or_else(|| {
                        Error::Usage(format!("--disk size={s}: not a size (e.g. 64M, 1G)"))
                    })?)
                }
                Some(("readonly", v)) => {
                    read_only = on_off("readonly", v)?;
                    read_only_set = true;
                }
                Some(("cache", v)) => cache = Some(v.parse::<CacheMode>().map_err(Error::Usage)?),
                Some(("engine", v)) => {
                    engine = v.parse::<AsyncEngine>().map_err(Error::Usage)?;
                    engine_set = true;
                }
                Some((k, v)) => {
                    return Err(Error::Usage(format!("--disk: unknown option {k}={v}")))
                }
            }
        }
        if let Some(stack) = stack {
            if kind.is_some() || path.is_some() {
                return Err(Error::Usage(
                    "--disk: give one of stack=FILE.toml, path=FILE, null or memory".into(),
                ));
            }
            if read_only_set || cache.is_some() || engine_set || size.is_some() {
                return Err(Error::Usage(format!(
                    "--disk stack={}: readonly/cache/engine/size belong in the stack description, not beside stack=",
                    stack.display()
                )));
            }
            return Ok(DiskSpec::Stack { path: stack });
        }
        match (kind, path) {
            (None, Some(path)) => {
                if size.is_some() {
                    return Err(Error::Usage("--disk: size= applies to null and memory disks only".into()));
                }
                Ok(DiskSpec::File {
                    path,
                    read_only,
                    cache: cache.unwrap_or(CacheMode::None),
                    engine,
                })
            }
            (Some(k), None) => {
                if cache.is_some() || read_only {
                    return Err(Error::Usage(format!("--disk {k}: cache= and readonly= apply to files only")));
                }
                match k {
                    "null" => Ok(DiskSpec::Null {
                        size: size.unwrap_or(1 << 30),
                    }),
                    _ => Ok(DiskSpec::Memory {
                        size: size.ok_or_else(|| Error::Usage("--disk memory needs size=".into()))?,
                    }),
                }
            }
            (Some(_), Some(_)) => Err(Error::Usage("--disk: give either path= or null/memory, not both".into())),
            (None, None) => Err(Error::Usage(
                "--disk: expected path=FILE[,readonly=on][,cache=MODE], stack=FILE.toml, null[,size=N] or memory,size=N".into(),
            )),
        }
    }
}

impl DiskSpec {
    /// Open the back-end.
    pub fn open(&self) -> Result<Arc<dyn BlockBackend>, Error> {
        Ok(self.open_with_stack()?.0)
    }

    /// Open the back-end; for `stack=` also return the built stack, whose
    /// filters' control handles the control socket serves.
    pub fn open_with_stack(
        &self,
    ) -> Result<(Arc<dyn BlockBackend>, Option<iovirt_filter::stack::Stack>), Error> {
        let disk: Arc<dyn BlockBackend> = match self {
            DiskSpec::File {
                path,
                read_only,
                cache,
                engine,
            } => RawFileOptions::new(*cache)
                .read_only(*read_only)
                .open_async(path, *engine)?,
            DiskSpec::Null { size } => Arc::new(Inline(NullBackend::new(*size, false))),
            DiskSpec::Memory { size } => {
                if *size > isize::MAX as u64 {
                    return Err(Error::Usage(format!(
                        "--disk memory,size={size}: too large"
                    )));
                }
                Arc::new(Inline(MemoryBackend::new(*size)))
            }
            DiskSpec::Stack { path } => {
                let stack = iovirt_filter::stack::StackSpec::from_file(path)
                    .and_then(|spec| spec.build_stack())
                    .map_err(|source| Error::Stack {
                        path: path.clone(),
                        source,
                    })?;
                return Ok((stack.backend.clone(), Some(stack)));
            }
        };
        Ok((disk, None))
    }

    /// The spec as it is written on the command line.
    pub fn describe(&self) -> String {
        match self {
            DiskSpec::File {
                path,
                read_only,
                cache,
                engine,
            } => format!(
                "path={},readonly={},cache={cache},engine={}",
                path.display(),
                if *read_only { "on" } else { "off" },
                match engine {
                    AsyncEngine::Auto => "auto",
                    AsyncEngine::Uring => "io_uring",
                    AsyncEngine::ThreadPool => "threads",
                }
            ),
            DiskSpec::Null { size } => format!("null,size={size}"),
            DiskSpec::Memory { size } => format!("memory,size={size}"),
            DiskSpec::Stack { path } => format!("stack={}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_disk_specs() {
        assert_eq!(
            "path=/x.img,readonly=on,cache=writeback"
                .parse::<DiskSpec>()
                .unwrap(),
            DiskSpec::File {
                path: "/x.img".into(),
                read_only: true,
                cache: CacheMode::Writeback,
                engine: AsyncEngine::Auto
            }
        );
        assert_eq!(
            "null,size=1G".parse::<DiskSpec>().unwrap(),
            DiskSpec::Null { size: 1 << 30 }
        );
        assert_eq!(
            "memory,size=64M".parse::<DiskSpec>().unwrap(),
            DiskSpec::Memory { size: 64 << 20 }
        );
        assert!("memory".parse::<DiskSpec>().is_err());
        assert!("path=/x,cache=fast".parse::<DiskSpec>().is_err());
        assert!("null,cache=none".parse::<DiskSpec>().is_err());
        assert!("null,size=1Z".parse::<DiskSpec>().is_err());
        assert_eq!(
            "stack=/s/vda.toml".parse::<DiskSpec>().unwrap(),
            DiskSpec::Stack {
                path: "/s/vda.toml".into()
            }
        );
        for bad in [
            "stack=",
            "stack=/a.toml,readonly=on",
            "stack=/a.toml,readonly=off",
            "stack=/a.toml,cache=none",
            "stack=/a.toml,engine=threads",
            "stack=/a.toml,size=1M",
            "stack=/a.toml,path=/b",
            "stack=/a.toml,null",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad} was accepted");
        }
        let e = "stack=/a.toml,cache=none"
            .parse::<DiskSpec>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("belong in the stack description"), "{e}");
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("20000000T"), None);
    }
}
