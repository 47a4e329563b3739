//! `iovirt-vhost-user-blk`: serve a disk as a vhost-user-blk device.
//!
//! ```text
//! iovirt-vhost-user-blk --socket PATH --disk SPEC [--queues N] [--queue-size N] [--serial ID] [--control SOCK] [--iommu-platform on]
//! ```
//! SPEC is `path=FILE[,readonly=on][,cache=none|writethrough|writeback|unsafe][,engine=auto|io_uring|threads]`,
//! `stack=FILE.toml` (an iovirt-filter stack, docs/FILTERS.md), `null[,size=1G]` or `memory,size=64M`. `--control SOCK` serves the JSON-lines control interface
//! of docs/CONTROL.md (iovirt-control) for the disk. Log level: `RUST_LOG` (default `info`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use iovirt_control::{Control, DiskControl};
use iovirt_vhost_user_blk::disk::DiskSpec;
use iovirt_vhost_user_blk::server::{serve, ServerConfig};
use iovirt_vhost_user_blk::Error;

const USAGE: &str = "usage: iovirt-vhost-user-blk --socket PATH --disk SPEC [--queues N] [--queue-size N] [--serial ID] [--poll-us N] [--connections N] [--control SOCK] [--iommu-platform on|off]
  --disk path=FILE[,readonly=on][,cache=none|writethrough|writeback|unsafe][,engine=auto|io_uring|threads]
  --disk stack=FILE.toml     a filter stack (docs/FILTERS.md); readonly/cache go in the file
  --disk null[,size=1G]      a disk that stores nothing (benchmarks)
  --disk memory,size=64M     a zero-filled disk in memory
  --queues N                 request queues (default 1, at most 64)
  --queue-size N             largest queue size a frontend may use (default 1024)
  --serial ID                serial number (GET_ID, up to 20 bytes; default iovirt)
  --poll-us N                after a kick, poll the ring N microseconds before sleeping (default 50, 0: off)
  --connections N            exit after serving N frontends (default: serve forever)
  --control SOCK             serve the JSON-lines control interface (docs/CONTROL.md) on a unix socket

  --iommu-platform on|off    offer VIRTIO_F_ACCESS_PLATFORM: DMA through the frontend's vIOMMU
                             with vhost-user IOTLB messages (default off; docs/IOMMU.md)";

/// The command line: the disk, the server, and the control socket if any.
struct Args {
    disk: DiskSpec,
    cfg: ServerConfig,
    control: Option<PathBuf>,
}

fn parse_args() -> Result<Args, Error> {
    let mut socket = None;
    let mut disk = None;
    let mut control = None;
    let mut cfg = ServerConfig {
        socket: PathBuf::new(),
        queues: 1,
        queue_size: 1024,
        serial: "iovirt".into(),
        connections: None,
        poll: std::time::Duration::from_micros(50),
        iommu_platform: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if key == "-h" || key == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        if key == "--version" {
            println!("iovirt-vhost-user-blk {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| Error::Usage(format!("{key} needs a value\n{USAGE}")))
        };
        let num = |v: String, max: u64| -> Result<u64, Error> {
            v.parse::<u64>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    Error::Usage(format!("{key} {v}: expected a number from 1 to {max}"))
                })
        };
        match key.as_str() {
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--disk" => disk = Some(value()?.parse::<DiskSpec>()?),
            "--queues" => cfg.queues = num(value()?, 64)? as u16,
            "--queue-size" => {
                let n = num(value()?, 32768)?;
                if !n.is_power_of_two() {
                    return Err(Error::Usage(format!(
                        "--queue-size {n}: must be a power of two"
                    )));
                }
                cfg.queue_size = n as u16;
            }
            "--serial" => {
                let s = value()?;
                if s.len() > 20 {
                    return Err(Error::Usage(format!("--serial {s:?}: at most 20 bytes")));
                }
                cfg.serial = s;
            }
            "--poll-us" => {
                let v = value()?;
                let us = v
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= 1_000_000)
                    .ok_or_else(|| Error::Usage(format!("--poll-us {v}: expected 0 to 1000000")))?;
                cfg.poll = std::time::Duration::from_micros(us);
            }
            "--connections" => cfg.connections = Some(num(value()?, u64::MAX)?),
            "--control" => {
                let v = value()?;
                if v.is_empty() {
                    return Err(Error::Usage(format!("--control needs a path\n{USAGE}")));
                }
                control = Some(PathBuf::from(v));
            }
            "--iommu-platform" => {
                cfg.iommu_platform = match value()?.as_str() {
                    "on" => true,
                    "off" => false,
                    v => return Err(Error::Usage(format!("--iommu-platform {v}: on or off"))),
                }
            }
            _ => return Err(Error::Usage(format!("unknown argument {a:?}\n{USAGE}"))),
        }
    }
    cfg.socket = socket.ok_or_else(|| Error::Usage(format!("--socket is required\n{USAGE}")))?;
    let disk = disk.ok_or_else(|| Error::Usage(format!("--disk is required\n{USAGE}")))?;
    Ok(Args { disk, cfg, control })
}

fn run() -> Result<(), Error> {
    let args = parse_args()?;
    let (disk, stack) = args.disk.open_stack()?;
    // The control socket, removed again when `_control` drops.
    let _control = match &args.control {
        Some(path) => {
            let name = match &args.disk {
                DiskSpec::Stack { path } => path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                _ => "disk".into(),
            };
            let mut d = DiskControl::new(name)
                .with_field("socket", args.cfg.socket.display().to_string())
                .with_field("serial", args.cfg.serial.clone());
            if let Some(stack) = &stack {
                d = d.with_stack(stack);
            }
            let control = Arc::new(Control::new(vec![d], None));
            Some(
                iovirt_control::start(path, control).map_err(|source| Error::Control {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    serve(disk, &args.cfg)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iovirt-vhost-user-blk: {e}");
            ExitCode::FAILURE
        }
    }
}
