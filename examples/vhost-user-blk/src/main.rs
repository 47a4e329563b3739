//! `iovirt-vhost-user-blk`: serve disks as vhost-user-blk devices.
//!
//! ```text
//! iovirt-vhost-user-blk --socket PATH --disk SPEC [--queues N] [--queue-size N] [--serial ID] ...
//! iovirt-vhost-user-blk [DEFAULTS] --export NAME --socket PATH --disk SPEC [--weight W] ... --export NAME ...
//! ```
//! SPEC is `path=FILE[,readonly=on][,cache=none|writethrough|writeback|unsafe][,engine=auto|io_uring|threads]`,
//! `stack=FILE.toml` (an iovirt-filter stack, docs/FILTERS.md), `null[,size=1G]` or `memory,size=64M`.
//! The full syntax is in [`iovirt_vhost_user_blk::config::USAGE`]. Log level: `RUST_LOG` (default `info`).

use std::process::ExitCode;
use std::sync::Arc;

use iovirt_vhost_user_blk::config::{parse_args, Command, USAGE};
use iovirt_vhost_user_blk::daemon::Exports;
use iovirt_vhost_user_blk::Error;

fn run() -> Result<(), Error> {
    let cfg = match parse_args(std::env::args().skip(1))? {
        Command::Serve(cfg) => cfg,
        Command::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        Command::Version => {
            println!("iovirt-vhost-user-blk {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
    };
    let exports = Exports::open(&cfg)?;
    // Kept until the exports are done; dropping it removes the socket.
    let _control = match &cfg.control {
        Some(path) => Some(
            iovirt_control::start(path, Arc::new(exports.control())).map_err(|source| {
                Error::Control {
                    path: path.clone(),
                    source,
                }
            })?,
        ),
        None => None,
    };
    exports.serve()
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
