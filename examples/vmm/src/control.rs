//! The run-time control interface (`--control PATH`): iovirt-control's
//! JSON-lines server over this VMM's disks. The protocol and its commands are
//! in docs/CONTROL.md; this module only describes the disks to it.

use iovirt_control::DiskControl;

use crate::cli::DiskInterface;
use crate::disks::DiskEntry;

pub use iovirt_control::{start, Control};

/// Each `--disk`, in command-line order, as the control interface sees it:
/// named after its file's stem, with its `path` and `interface` as fields.
pub fn disks(list: Vec<DiskEntry>) -> Vec<DiskControl> {
    list.into_iter()
        .map(|d| {
            let name = d
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut c = DiskControl::new(name)
                .with_client(d.client)
                .with_field("path", d.path.display().to_string())
                .with_field(
                    "interface",
                    match d.interface {
                        DiskInterface::Virtio => "virtio",
                        DiskInterface::Ide => "ide",
                    },
                );
            if let Some(stack) = &d.stack {
                c = c.with_stack(stack);
            }
            c
        })
        .collect()
}
