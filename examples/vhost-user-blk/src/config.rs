//! The command line: one export (`--socket S --disk D`) or several
//! (`--export NAME --socket S --disk D ... --export NAME2 ...`).
//!
//! Disk specs contain commas (`path=FILE,cache=none`), so an export is not
//! one comma-separated value: `--export NAME` opens a group, and the options
//! after it, up to the next `--export`, describe that export. Options given
//! before the first `--export` (other than `--socket` and `--disk`) are
//! defaults for every export; `--connections` applies to the whole daemon.

use std::path::PathBuf;
use std::time::Duration;

use iovirt_sched::{ClientParams, StageConfig};

use crate::disk::DiskSpec;
use crate::poll::PollMode;
use crate::Error;

/// Help text, printed by `--help` and after a usage error.
pub const USAGE: &str = "usage: iovirt-vhost-user-blk --socket PATH --disk SPEC [EXPORT OPTIONS] [--connections N]
       iovirt-vhost-user-blk [DEFAULTS] --export NAME --socket PATH --disk SPEC [EXPORT OPTIONS]
                             [--export NAME --socket PATH --disk SPEC [EXPORT OPTIONS]]... [--connections N]
  --export NAME              start the options of another export (letters, digits, '-', '_', '.';
                             options before the first --export are defaults for all exports)
  --socket PATH              the export's vhost-user socket
  --disk path=FILE[,readonly=on][,cache=none|writethrough|writeback|unsafe][,engine=auto|io_uring|threads]
  --disk stack=FILE.toml     a filter stack (docs/FILTERS.md); readonly/cache go in the file
  --disk null[,size=1G]      a disk that stores nothing (benchmarks)
  --disk memory,size=64M     a zero-filled disk in memory
                             exports whose --disk is the same text share one opened back-end
EXPORT OPTIONS:
  --queues N                 request queues (default 1, at most 64)
  --queue-size N             largest queue size a frontend may use (default 1024)
  --serial ID                serial number (GET_ID, up to 20 bytes; default iovirt)
  --poll-us N                after a kick, poll the ring N microseconds before sleeping (default 50, 0: off)
  --poll-mode adaptive|fixed adaptive (default): keep polling only while it costs less CPU per
                             request than sleeping, measured as it runs; fixed: always poll
  --weight W                 share of the daemon's I/O (default 1)
  --reservation R            I/O floor in cost units per second (a 4 KiB request costs 1.125; default 0)
  --limit L|none             I/O ceiling in cost units per second (default none)
  --coalesce on|off          virtual interrupt coalescing (vIC): fewer interrupts at high queue depth
  --iommu-platform on|off    offer VIRTIO_F_ACCESS_PLATFORM: DMA through the frontend's vIOMMU
                             (a device IOTLB fed over the backend channel; docs/IOMMU.md)
DAEMON OPTIONS (anywhere on the line):
  --sched-depth N            requests in flight at the back-ends over all exports (default 32): small
                             enough that the device's own queue does not undo the schedule
  --connections N            each export exits after serving N frontends (default: serve forever)
  --control PATH             a JSON-lines control socket over all exports (docs/CONTROL.md): disks,
                             sched-set, sched-stats (without \"disk\": every export), the stacks'
                             filter commands, export-stats
With several exports, or any --weight/--reservation/--limit, all exports share one mClock
scheduling stage (docs/SCHEDULING.md).";

/// One export: a socket, a disk and how to present and schedule it.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportConfig {
    /// Its name (logs, the control socket).
    pub name: String,
    /// The vhost-user socket to listen on (a stale file is replaced).
    pub socket: PathBuf,
    /// The back-end.
    pub disk: DiskSpec,
    /// Number of request queues.
    pub queues: u16,
    /// Largest queue size a frontend may configure.
    pub queue_size: u16,
    /// Serial number returned by GET_ID.
    pub serial: String,
    /// How long a queue's worker polls for new requests after a kick.
    pub poll: Duration,
    /// Whether polling adapts to what it costs.
    pub poll_mode: PollMode,
    /// Scheduling parameters given on the command line (`None`: none given).
    pub sched: Option<ClientParams>,
    /// Virtual interrupt coalescing.
    pub coalesce: bool,
    /// Offer VIRTIO_F_ACCESS_PLATFORM with a device IOTLB.
    pub iommu_platform: bool,
}

/// The whole command line.
#[derive(Clone, Debug, PartialEq)]
pub struct DaemonConfig {
    /// The exports, in command-line order.
    pub exports: Vec<ExportConfig>,
    /// Each export serves this many connections, then stops (`None`: forever).
    pub connections: Option<u64>,
    /// Requests the scheduling stage keeps in flight at the back-ends.
    pub sched_depth: usize,
    /// The control socket, if any.
    pub control: Option<PathBuf>,
}

impl DaemonConfig {
    /// Whether the exports go through one shared scheduling stage: with more
    /// than one export, or when any has scheduling options.
    pub fn scheduled(&self) -> bool {
        self.exports.len() > 1 || self.exports.iter().any(|e| e.sched.is_some())
    }
}

/// Options of one export group while parsing.
#[derive(Clone, Default)]
struct Group {
    name: Option<String>,
    socket: Option<PathBuf>,
    disk: Option<DiskSpec>,
    queues: Option<u16>,
    queue_size: Option<u16>,
    serial: Option<String>,
    poll: Option<Duration>,
    poll_mode: Option<PollMode>,
    sched: Vec<String>,
    coalesce: Option<bool>,
    iommu_platform: Option<bool>,
}

fn usage(msg: String) -> Error {
    Error::Usage(format!("{msg}\n{USAGE}"))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Group {
    /// This group's export, with `defaults` filling what it leaves out.
    fn finish(self, defaults: &Group) -> Result<ExportConfig, Error> {
        // Only the single-export form has no --export NAME: name it as the
        // control socket always has, after its stack file's stem or `disk`.
        let name = self.name.clone().unwrap_or_else(|| match &self.disk {
            Some(DiskSpec::Stack { path }) => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "disk".into()),
            _ => "disk".into(),
        });
        let socket = self
            .socket
            .ok_or_else(|| usage(format!("export {name}: --socket is required")))?;
        let disk = self
            .disk
            .ok_or_else(|| usage(format!("export {name}: --disk is required")))?;
        let mut sched = defaults.sched.clone();
        sched.extend(self.sched);
        let sched = if sched.is_empty() {
            None
        } else {
            Some(
                sched
                    .join(",")
                    .parse::<ClientParams>()
                    .map_err(|e| usage(format!("export {name}: {e}")))?,
            )
        };
        Ok(ExportConfig {
            name,
            socket,
            disk,
            queues: self.queues.or(defaults.queues).unwrap_or(1),
            queue_size: self.queue_size.or(defaults.queue_size).unwrap_or(1024),
            serial: self
                .serial
                .or_else(|| defaults.serial.clone())
                .unwrap_or_else(|| "iovirt".into()),
            poll: self
                .poll
                .or(defaults.poll)
                .unwrap_or(Duration::from_micros(50)),
            poll_mode: self.poll_mode.or(defaults.poll_mode).unwrap_or_default(),
            sched,
            coalesce: self.coalesce.or(defaults.coalesce).unwrap_or(false),
            iommu_platform: self
                .iommu_platform
                .or(defaults.iommu_platform)
                .unwrap_or(false),
        })
    }
}

/// What the command line asked for besides serving.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Serve these exports.
    Serve(DaemonConfig),
    /// Print the help text.
    Help,
    /// Print the version.
    Version,
}

/// Parse the arguments (without the program name).
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Command, Error> {
    let mut defaults = Group::default();
    let mut groups: Vec<Group> = Vec::new();
    let mut connections = None;
    let mut sched_depth = StageConfig::default().max_outstanding;
    let mut control = None;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        match key.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--version" => return Ok(Command::Version),
            _ => {}
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| usage(format!("{key} needs a value")))
        };
        let num = |v: String, max: u64| -> Result<u64, Error> {
            v.parse::<u64>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| usage(format!("{key} {v}: expected a number from 1 to {max}")))
        };
        if key == "--export" {
            let name = value()?;
            if !valid_name(&name) {
                return Err(usage(format!(
                    "--export {name:?}: a name is 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
            if groups
                .iter()
                .any(|g| g.name.as_deref() == Some(name.as_str()))
            {
                return Err(usage(format!("--export {name}: given twice")));
            }
            groups.push(Group {
                name: Some(name),
                ..Group::default()
            });
            continue;
        }
        if key == "--connections" {
            connections = Some(num(value()?, u64::MAX)?);
            continue;
        }
        if key == "--control" {
            let v = value()?;
            if v.is_empty() {
                return Err(usage("--control needs a path".into()));
            }
            control = Some(PathBuf::from(v));
            continue;
        }
        if key == "--sched-depth" {
            sched_depth = num(value()?, 4096)? as usize;
            continue;
        }
        let g = groups.last_mut().unwrap_or(&mut defaults);
        match key.as_str() {
            "--socket" => g.socket = Some(PathBuf::from(value()?)),
            "--disk" => g.disk = Some(value()?.parse::<DiskSpec>()?),
            "--queues" => g.queues = Some(num(value()?, 64)? as u16),
            "--queue-size" => {
                let n = num(value()?, 32768)?;
                if !n.is_power_of_two() {
                    return Err(usage(format!("--queue-size {n}: must be a power of two")));
                }
                g.queue_size = Some(n as u16);
            }
            "--serial" => {
                let s = value()?;
                if s.len() > 20 {
                    return Err(usage(format!("--serial {s:?}: at most 20 bytes")));
                }
                g.serial = Some(s);
            }
            "--poll-us" => {
                let v = value()?;
                let us = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= 1_000_000)
                    .ok_or_else(|| usage(format!("--poll-us {v}: expected 0 to 1000000")))?;
                g.poll = Some(Duration::from_micros(us));
            }
            "--poll-mode" => {
                let v = value()?;
                g.poll_mode = Some(
                    v.parse::<PollMode>()
                        .map_err(|e| usage(format!("--poll-mode {e}")))?,
                );
            }
            "--weight" | "--reservation" | "--limit" => {
                let v = value()?;
                if v.contains(',') || v.contains('=') {
                    return Err(usage(format!("{key} {v:?}: expected one number")));
                }
                g.sched.push(format!("{}={v}", &key[2..]));
            }
            "--coalesce" | "--iommu-platform" => {
                let v = value()?;
                let on = match v.as_str() {
                    "on" | "true" | "yes" | "1" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => return Err(usage(format!("{key} {v}: expected on or off"))),
                };
                if key == "--coalesce" {
                    g.coalesce = Some(on);
                } else {
                    g.iommu_platform = Some(on);
                }
            }
            _ => return Err(usage(format!("unknown argument {a:?}"))),
        }
    }
    let exports = if groups.is_empty() {
        // The single-export form: everything given is that export's.
        let g = std::mem::take(&mut defaults);
        vec![g.finish(&Group::default())?]
    } else {
        if defaults.socket.is_some() || defaults.disk.is_some() {
            return Err(usage(
                "--socket and --disk belong after an --export when there are several exports"
                    .into(),
            ));
        }
        groups
            .into_iter()
            .map(|g| g.finish(&defaults))
            .collect::<Result<Vec<_>, _>>()?
    };
    for (i, e) in exports.iter().enumerate() {
        if control.as_ref() == Some(&e.socket) || exports[..i].iter().any(|o| o.socket == e.socket)
        {
            return Err(usage(format!(
                "export {}: socket {} is already used by another export",
                e.name,
                e.socket.display()
            )));
        }
    }
    Ok(Command::Serve(DaemonConfig {
        exports,
        connections,
        sched_depth,
        control,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<DaemonConfig, Error> {
        match parse_args(s.split_whitespace().map(String::from))? {
            Command::Serve(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn single_export_form_still_works() {
        let c =
            parse("--socket /s --disk null,size=1M --queues 2 --serial abc --poll-us=0").unwrap();
        assert_eq!(c.exports.len(), 1);
        let e = &c.exports[0];
        assert_eq!(e.name, "disk");
        let c = parse("--socket /s --disk stack=/x/vda.toml").unwrap();
        assert_eq!(c.exports[0].name, "vda");
        assert_eq!(e.socket, PathBuf::from("/s"));
        assert_eq!(e.disk, DiskSpec::Null { size: 1 << 20 });
        assert_eq!((e.queues, e.serial.as_str()), (2, "abc"));
        assert_eq!(e.poll, Duration::ZERO);
        assert_eq!(e.sched, None);
        assert!(!c.scheduled());
        let c = parse("--socket /s --disk null --weight 2").unwrap();
        assert!(c.scheduled());
    }

    #[test]
    fn several_exports_with_defaults() {
        let c = parse(
            "--poll-us 0 --coalesce on --connections 3 --sched-depth 8 --control /c \
             --export a --socket /a --disk path=/a.img,cache=none --weight 2 --reservation 100 \
             --export b --socket /b --disk null --limit 500 --coalesce off --serial vm-b \
             --iommu-platform on",
        )
        .unwrap();
        assert_eq!((c.connections, c.sched_depth), (Some(3), 8));
        assert_eq!(c.control, Some(PathBuf::from("/c")));
        assert!(c.scheduled());
        let [a, b] = &c.exports[..] else {
            panic!("{c:?}")
        };
        assert_eq!((a.name.as_str(), b.name.as_str()), ("a", "b"));
        assert_eq!(a.poll, Duration::ZERO);
        assert!(a.coalesce && !b.coalesce);
        let pa = a.sched.unwrap();
        assert_eq!((pa.weight, pa.reservation, pa.limit), (2.0, 100.0, None));
        let pb = b.sched.unwrap();
        assert_eq!((pb.weight, pb.limit), (1.0, Some(500.0)));
        assert_eq!(b.serial, "vm-b");
        assert!(b.iommu_platform && !a.iommu_platform);
        assert_eq!(a.serial, "iovirt");
    }

    #[test]
    fn refuses_ambiguous_or_bad_lines() {
        for bad in [
            "--disk null",
            "--socket /s",
            "--socket /s --disk null --export a --socket /a --disk null",
            "--export a --socket /a --disk null --export a --socket /b --disk null",
            "--export a --socket /a --disk null --export b --socket /a --disk null",
            "--export a --socket /a",
            "--export a/b --socket /a --disk null",
            "--export a --socket /a --disk null --weight 0",
            "--export a --socket /a --disk null --weight 2,limit=3",
            "--export a --socket /a --disk null --limit -1",
            "--export a --socket /a --disk null --coalesce maybe",
            "--export a --socket /a --disk null --queue-size 1000",
            "--socket /s --disk null --bogus 1",
            "--control /s --socket /s --disk null",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad}");
        }
        let e = parse("--export a --socket /a").unwrap_err().to_string();
        assert!(e.starts_with("export a: --disk is required"), "{e}");
    }
}
