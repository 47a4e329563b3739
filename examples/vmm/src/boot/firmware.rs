//! Firmware boot: the image is mapped read-only so that it ends at 4 GiB, and its
//! last 128 KiB are copied into RAM at 0xE0000-0xFFFFF, the legacy BIOS area that
//! real-mode code runs from (what QEMU's `isa-bios` alias provides). The vCPUs start
//! at the reset vector 0xFFFFFFF0 with KVM's reset state.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout::{BIOS_SHADOW_SIZE, BIOS_SHADOW_START, FOUR_GIB};

/// The firmware mapping, to register read-only with KVM.
pub struct Firmware {
    /// One region ending at 4 GiB.
    pub mem: GuestMemoryMmap,
}

/// Read the firmware, build its read-only mapping and copy its tail into the BIOS shadow.
pub fn load(path: &Path, ram: &GuestMemoryMmap) -> Result<Firmware, BootError> {
    let shown = path.display().to_string();
    let image = std::fs::read(path).map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            BootError::FirmwareMissing(shown.clone())
        } else {
            BootError::Read {
                what: "firmware",
                path: shown.clone(),
                err,
            }
        }
    })?;
    let size = image.len() as u64;
    if !(BIOS_SHADOW_SIZE..=16 << 20).contains(&size) || size % 0x1_0000 != 0 {
        return Err(BootError::FirmwareSize { path: shown, size });
    }
    let base = GuestAddress(FOUR_GIB - size);
    let mem = GuestMemoryMmap::from_ranges(&[(base, image.len())])
        .map_err(|e| BootError::Memory(e.to_string()))?;
    mem.write_slice(&image, base)
        .map_err(|e| BootError::Memory(e.to_string()))?;
    let tail = &image[image.len() - BIOS_SHADOW_SIZE as usize..];
    ram.write_slice(tail, GuestAddress(BIOS_SHADOW_START))
        .map_err(|e| BootError::Memory(e.to_string()))?;
    log::info!(
        "firmware {shown}: {size:#x} bytes at {:#x}, last 128 KiB shadowed at {BIOS_SHADOW_START:#x}",
        base.0
    );
    Ok(Firmware { mem })
}
