//! ATA command set of the hard-disk drives (and the ATA commands every
//! device, ATAPI included, must answer).

use iovirt_backend::Request;

use super::atapi::identify_packet;
use super::channel::{
    Channel, DiskRead, DmaJob, DmaOp, InMode, Phase, Submit, Tag, TagKind, SECTOR,
};
use super::regs::*;
use super::{FIRMWARE_REVISION, MAX_MULTIPLE};

/// ATA command opcodes.
pub mod cmd {
    /// NOP (always aborts).
    pub const NOP: u8 = 0x00;
    /// DEVICE RESET (PACKET devices).
    pub const DEVICE_RESET: u8 = 0x08;
    /// RECALIBRATE (obsolete, 10h..1Fh).
    pub const RECALIBRATE: u8 = 0x10;
    /// READ SECTORS.
    pub const READ_SECTORS: u8 = 0x20;
    /// READ SECTORS without retry (obsolete alias).
    pub const READ_SECTORS_NORETRY: u8 = 0x21;
    /// READ SECTORS EXT.
    pub const READ_SECTORS_EXT: u8 = 0x24;
    /// READ DMA EXT.
    pub const READ_DMA_EXT: u8 = 0x25;
    /// READ MULTIPLE EXT.
    pub const READ_MULTIPLE_EXT: u8 = 0x29;
    /// WRITE SECTORS.
    pub const WRITE_SECTORS: u8 = 0x30;
    /// WRITE SECTORS without retry (obsolete alias).
    pub const WRITE_SECTORS_NORETRY: u8 = 0x31;
    /// WRITE SECTORS EXT.
    pub const WRITE_SECTORS_EXT: u8 = 0x34;
    /// WRITE DMA EXT.
    pub const WRITE_DMA_EXT: u8 = 0x35;
    /// WRITE MULTIPLE EXT.
    pub const WRITE_MULTIPLE_EXT: u8 = 0x39;
    /// READ VERIFY SECTORS.
    pub const READ_VERIFY: u8 = 0x40;
    /// READ VERIFY SECTORS without retry.
    pub const READ_VERIFY_NORETRY: u8 = 0x41;
    /// READ VERIFY SECTORS EXT.
    pub const READ_VERIFY_EXT: u8 = 0x42;
    /// SEEK (obsolete).
    pub const SEEK: u8 = 0x70;
    /// EXECUTE DEVICE DIAGNOSTIC.
    pub const EXECUTE_DEVICE_DIAGNOSTIC: u8 = 0x90;
    /// INITIALIZE DEVICE PARAMETERS (CHS geometry).
    pub const INITIALIZE_DEVICE_PARAMETERS: u8 = 0x91;
    /// PACKET (ATAPI).
    pub const PACKET: u8 = 0xa0;
    /// IDENTIFY PACKET DEVICE.
    pub const IDENTIFY_PACKET_DEVICE: u8 = 0xa1;
    /// READ MULTIPLE.
    pub const READ_MULTIPLE: u8 = 0xc4;
    /// WRITE MULTIPLE.
    pub const WRITE_MULTIPLE: u8 = 0xc5;
    /// SET MULTIPLE MODE.
    pub const SET_MULTIPLE_MODE: u8 = 0xc6;
    /// READ DMA.
    pub const READ_DMA: u8 = 0xc8;
    /// READ DMA without retry.
    pub const READ_DMA_NORETRY: u8 = 0xc9;
    /// WRITE DMA.
    pub const WRITE_DMA: u8 = 0xca;
    /// WRITE DMA without retry.
    pub const WRITE_DMA_NORETRY: u8 = 0xcb;
    /// STANDBY IMMEDIATE.
    pub const STANDBY_IMMEDIATE: u8 = 0xe0;
    /// IDLE IMMEDIATE.
    pub const IDLE_IMMEDIATE: u8 = 0xe1;
    /// STANDBY.
    pub const STANDBY: u8 = 0xe2;
    /// IDLE.
    pub const IDLE: u8 = 0xe3;
    /// CHECK POWER MODE.
    pub const CHECK_POWER_MODE: u8 = 0xe5;
    /// SLEEP.
    pub const SLEEP: u8 = 0xe6;
    /// FLUSH CACHE.
    pub const FLUSH_CACHE: u8 = 0xe7;
    /// FLUSH CACHE EXT.
    pub const FLUSH_CACHE_EXT: u8 = 0xea;
    /// IDENTIFY DEVICE.
    pub const IDENTIFY_DEVICE: u8 = 0xec;
    /// SET FEATURES.
    pub const SET_FEATURES: u8 = 0xef;
}

/// SET FEATURES subcommands.
mod feature {
    /// Enable the volatile write cache.
    pub const ENABLE_WRITE_CACHE: u8 = 0x02;
    /// Set the transfer mode from the sector count register.
    pub const SET_TRANSFER_MODE: u8 = 0x03;
    /// Disable read look-ahead.
    pub const DISABLE_READ_LOOKAHEAD: u8 = 0x55;
    /// Disable reverting to power-on defaults.
    pub const DISABLE_REVERT: u8 = 0x66;
    /// Disable the volatile write cache.
    pub const DISABLE_WRITE_CACHE: u8 = 0x82;
    /// Enable read look-ahead.
    pub const ENABLE_READ_LOOKAHEAD: u8 = 0xaa;
    /// Enable reverting to power-on defaults.
    pub const ENABLE_REVERT: u8 = 0xcc;
}

/// Whether `mode` (the SET FEATURES 03h sector count) is a mode this drive offers.
pub(crate) fn valid_transfer_mode(mode: u8) -> bool {
    match mode >> 3 {
        0 => mode <= 1,     // PIO default (with or without IORDY)
        1 => mode & 7 <= 4, // PIO flow control mode 0..4
        4 => mode & 7 <= 2, // multiword DMA 0..2
        8 => mode & 7 <= 5, // Ultra DMA 0..5
        _ => false,
    }
}

/// How an access command moves its data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Verify,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Xfer {
    Pio { multiple: bool },
    Dma,
    None,
}

impl Channel {
    /// A command was written to the selected device.
    pub(crate) fn command(&mut self, op: u8) {
        let unit = self.selected();
        let d = &mut self.drives[unit];
        if !d.present() {
            // Commands to an absent device are ignored.
            return;
        }
        let busy = d.status & (STATUS_BSY | STATUS_DRQ) != 0 || !d.phase.is_idle();
        if busy && op != cmd::DEVICE_RESET {
            return;
        }
        d.irq = false;
        self.update_line();
        if self.drives[unit].is_atapi() {
            self.atapi_ata_command(unit, op);
            return;
        }
        use cmd::*;
        match op {
            IDENTIFY_DEVICE => {
                let data = self.identify(unit);
                self.start_pio_in(
                    unit,
                    data,
                    InMode::Ata {
                        block_bytes: SECTOR,
                    },
                    None,
                );
            }
            READ_SECTORS | READ_SECTORS_NORETRY => {
                self.access(unit, Access::Read, false, Xfer::Pio { multiple: false })
            }
            READ_SECTORS_EXT => {
                self.access(unit, Access::Read, true, Xfer::Pio { multiple: false })
            }
            READ_MULTIPLE => self.access(unit, Access::Read, false, Xfer::Pio { multiple: true }),
            READ_MULTIPLE_EXT => {
                self.access(unit, Access::Read, true, Xfer::Pio { multiple: true })
            }
            WRITE_SECTORS | WRITE_SECTORS_NORETRY => {
                self.access(unit, Access::Write, false, Xfer::Pio { multiple: false })
            }
            WRITE_SECTORS_EXT => {
                self.access(unit, Access::Write, true, Xfer::Pio { multiple: false })
            }
            WRITE_MULTIPLE => self.access(unit, Access::Write, false, Xfer::Pio { multiple: true }),
            WRITE_MULTIPLE_EXT => {
                self.access(unit, Access::Write, true, Xfer::Pio { multiple: true })
            }
            READ_DMA | READ_DMA_NORETRY => self.access(unit, Access::Read, false, Xfer::Dma),
            READ_DMA_EXT => self.access(unit, Access::Read, true, Xfer::Dma),
            WRITE_DMA | WRITE_DMA_NORETRY => self.access(unit, Access::Write, false, Xfer::Dma),
            WRITE_DMA_EXT => self.access(unit, Access::Write, true, Xfer::Dma),
            READ_VERIFY | READ_VERIFY_NORETRY => {
                self.access(unit, Access::Verify, false, Xfer::None)
            }
            READ_VERIFY_EXT => self.access(unit, Access::Verify, true, Xfer::None),
            SET_MULTIPLE_MODE => {
                let n = self.drives[unit].regs.nsector;
                if n > MAX_MULTIPLE || (n != 0 && !n.is_power_of_two()) {
                    self.complete_err(unit, ERROR_ABRT);
                } else {
                    self.drives[unit].multiple = n;
                    self.complete_ok(unit);
                }
            }
            FLUSH_CACHE | FLUSH_CACHE_EXT => {
                let d = &mut self.drives[unit];
                let Some(backend) = d.backend() else {
                    self.complete_err(unit, ERROR_ABRT);
                    return;
                };
                d.phase = Phase::Busy;
                d.status = STATUS_BSY;
                let tag = Tag {
                    unit,
                    gen: d.gen,
                    kind: TagKind::Flush,
                };
                self.out.push(Submit {
                    backend,
                    req: Request::Flush,
                    tag,
                });
            }
            SET_FEATURES => self.set_features(unit),
            INITIALIZE_DEVICE_PARAMETERS => {
                let d = &mut self.drives[unit];
                let sectors = d.regs.nsector;
                if sectors == 0 {
                    self.complete_err(unit, ERROR_ABRT);
                } else {
                    d.heads = (self.device & 0x0f) + 1;
                    d.sectors = sectors;
                    self.complete_ok(unit);
                }
            }
            CHECK_POWER_MODE => {
                self.drives[unit].regs.nsector = 0xff; // active or idle
                self.complete_ok(unit);
            }
            STANDBY_IMMEDIATE | IDLE_IMMEDIATE | STANDBY | IDLE | SLEEP | SEEK => {
                self.complete_ok(unit)
            }
            o if o & 0xf0 == RECALIBRATE => self.complete_ok(unit),
            EXECUTE_DEVICE_DIAGNOSTIC => self.execute_diagnostic(unit),
            IDENTIFY_PACKET_DEVICE | PACKET => {
                // Not a PACKET device: abort with the ATA signature in place.
                self.drives[unit].set_signature();
                self.complete_err(unit, ERROR_ABRT);
            }
            _ => self.complete_err(unit, ERROR_ABRT),
        }
    }

    /// EXECUTE DEVICE DIAGNOSTIC: signatures, "device 0 passed", interrupt.
    pub(crate) fn execute_diagnostic(&mut self, unit: usize) {
        for d in &mut self.drives {
            if d.present() {
                d.set_signature();
                d.error = ERROR_DIAG_PASSED;
            }
        }
        let d = &mut self.drives[unit];
        d.phase = Phase::Idle;
        d.status = if d.is_atapi() { 0 } else { d.ready_status() };
        self.raise_irq(unit);
    }

    fn set_features(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        match d.regs.feature {
            feature::ENABLE_WRITE_CACHE if !d.is_atapi() => d.write_cache = true,
            feature::DISABLE_WRITE_CACHE if !d.is_atapi() => d.write_cache = false,
            feature::SET_TRANSFER_MODE => {
                let mode = d.regs.nsector;
                if !valid_transfer_mode(mode) {
                    self.complete_err(unit, ERROR_ABRT);
                    return;
                }
                d.xfer_mode = mode;
            }
            feature::DISABLE_READ_LOOKAHEAD
            | feature::ENABLE_READ_LOOKAHEAD
            | feature::DISABLE_REVERT
            | feature::ENABLE_REVERT => {}
            _ => {
                self.complete_err(unit, ERROR_ABRT);
                return;
            }
        }
        self.complete_ok(unit);
    }

    /// Start address and sector count of a read/write command; None for a
    /// CHS address that does not exist.
    fn address(&self, unit: usize, ext: bool) -> Option<(u64, u64)> {
        let d = &self.drives[unit];
        let r = &d.regs;
        if ext {
            return Some((r.lba48(), u64::from(r.count48())));
        }
        let count = u64::from(r.count28());
        if self.device & DEVICE_LBA != 0 {
            return Some((r.lba28(self.device), count));
        }
        // CHS: sector numbers start at 1.
        let cyl = u64::from(r.lbah) << 8 | u64::from(r.lbam);
        let head = u64::from(self.device & 0x0f);
        let sector = u64::from(r.lbal);
        if sector == 0 || sector > u64::from(d.sectors) || head >= u64::from(d.heads) {
            return None;
        }
        Some((
            (cyl * u64::from(d.heads) + head) * u64::from(d.sectors) + sector - 1,
            count,
        ))
    }

    fn access(&mut self, unit: usize, access: Access, ext: bool, xfer: Xfer) {
        let block = match xfer {
            Xfer::Pio { multiple: true } => {
                let m = self.drives[unit].multiple;
                if m == 0 {
                    self.complete_err(unit, ERROR_ABRT);
                    return;
                }
                u64::from(m)
            }
            _ => 1,
        };
        let capacity = self.drives[unit].disk_sectors();
        let Some((lba, count)) = self.address(unit, ext) else {
            self.complete_err(unit, ERROR_IDNF);
            return;
        };
        if lba.checked_add(count).is_none_or(|end| end > capacity) {
            self.complete_err(unit, ERROR_IDNF);
            return;
        }
        match (access, xfer) {
            (Access::Verify, _) | (_, Xfer::None) => self.complete_ok(unit),
            (Access::Read, Xfer::Pio { .. }) => {
                let mode = InMode::Ata {
                    block_bytes: block as usize * SECTOR,
                };
                self.submit_pio_read(
                    unit,
                    mode,
                    DiskRead {
                        lba,
                        remaining: count,
                        block: SECTOR,
                    },
                );
            }
            (Access::Write, Xfer::Pio { .. }) => self.start_pio_out(unit, lba, count, block, false),
            (_, Xfer::Dma) => {
                let offset = lba * SECTOR as u64;
                let op = if access == Access::Read {
                    DmaOp::Read { offset }
                } else {
                    DmaOp::Write { offset }
                };
                let d = &mut self.drives[unit];
                d.phase = Phase::DmaWait(DmaJob {
                    op,
                    len: count as usize * SECTOR,
                    unit: SECTOR,
                    atapi: false,
                });
                d.status = d.ready_status() | STATUS_DRQ;
                self.try_start_dma();
            }
        }
    }

    /// The 512-byte IDENTIFY DEVICE data of an ATA disk.
    pub(crate) fn identify(&self, unit: usize) -> Vec<u8> {
        let d = &self.drives[unit];
        let sectors = d.disk_sectors();
        let mut id = Identify::new();
        let heads = 16u64;
        let spt = 63u64;
        let cyls = (sectors / (heads * spt)).clamp(1, 16383);
        id.set(0, 0x0040); // fixed device
        id.set(1, cyls as u16);
        id.set(3, heads as u16);
        id.set(6, spt as u16);
        id.string(10, 20, &self.serial(unit));
        id.string(23, 8, FIRMWARE_REVISION);
        id.string(27, 40, "iovirt HARDDISK");
        id.set(47, 0x8000 | u16::from(MAX_MULTIPLE));
        id.set(49, (1 << 11) | (1 << 9) | (1 << 8)); // IORDY, LBA, DMA
        id.set(50, 0x4000);
        id.set(51, 0x200);
        id.set(52, 0x200);
        id.set(53, 0x7); // words 54-58, 64-70 and 88 are valid
        let cur_cyls =
            (sectors / (u64::from(d.heads) * u64::from(d.sectors)).max(1)).clamp(1, 65535);
        let cur_cap =
            (cur_cyls * u64::from(d.heads) * u64::from(d.sectors)).min(u64::from(u32::MAX)) as u32;
        id.set(54, cur_cyls as u16);
        id.set(55, u16::from(d.heads));
        id.set(56, u16::from(d.sectors));
        id.set(57, cur_cap as u16);
        id.set(58, (cur_cap >> 16) as u16);
        if d.multiple != 0 {
            id.set(59, 0x100 | u16::from(d.multiple));
        }
        let lba28 = sectors.min(0x0fff_ffff) as u32;
        id.set(60, lba28 as u16);
        id.set(61, (lba28 >> 16) as u16);
        let (mw, udma) = selected_dma(d.xfer_mode);
        id.set(63, 0x07 | mw);
        id.set(64, 0x03); // PIO modes 3 and 4
        id.set(65, 120);
        id.set(66, 120);
        id.set(67, 120);
        id.set(68, 120);
        id.set(80, 0xf0); // ATA/ATAPI-4..7
        id.set(81, 0x16);
        id.set(82, (1 << 14) | (1 << 5)); // NOP, write cache
        id.set(83, (1 << 14) | (1 << 13) | (1 << 12) | (1 << 10)); // FLUSH EXT, FLUSH, LBA48
        id.set(84, 1 << 14);
        id.set(85, if d.write_cache { 1 << 5 } else { 0 });
        id.set(86, (1 << 13) | (1 << 12) | (1 << 10));
        id.set(87, 1 << 14);
        id.set(88, 0x3f | udma);
        id.set(93, 1 | (1 << 14) | 0x2000);
        id.set(100, sectors as u16);
        id.set(101, (sectors >> 16) as u16);
        id.set(102, (sectors >> 32) as u16);
        id.set(103, (sectors >> 48) as u16);
        id.finish()
    }

    pub(crate) fn serial(&self, unit: usize) -> String {
        format!("IOVIRT{:02}{}", self.index * 2 + unit, "0000")
    }

    /// IDENTIFY PACKET DEVICE data (used by the ATAPI module too).
    pub(crate) fn identify_packet_data(&self, unit: usize) -> Vec<u8> {
        identify_packet(self, unit)
    }
}

/// Selected-mode bits of words 63 (multiword DMA) and 88 (Ultra DMA).
pub(crate) fn selected_dma(mode: u8) -> (u16, u16) {
    match mode >> 3 {
        4 => (1 << (8 + (mode & 7)), 0),
        8 => (0, 1 << (8 + (mode & 7))),
        _ => (0, 0),
    }
}

/// An IDENTIFY data block under construction: 256 little-endian words.
pub(crate) struct Identify {
    words: [u16; 256],
}

impl Identify {
    pub fn new() -> Self {
        Identify { words: [0; 256] }
    }
    pub fn set(&mut self, word: usize, value: u16) {
        if let Some(w) = self.words.get_mut(word) {
            *w = value;
        }
    }
    /// An ATA string: space padded, two characters per word, first in the high byte.
    pub fn string(&mut self, word: usize, len: usize, s: &str) {
        let mut bytes = vec![b' '; len];
        for (dst, src) in bytes.iter_mut().zip(s.bytes()) {
            *dst = src;
        }
        for (i, pair) in bytes.chunks(2).enumerate() {
            let hi = pair.first().copied().unwrap_or(b' ');
            let lo = pair.get(1).copied().unwrap_or(b' ');
            self.set(word + i, (u16::from(hi) << 8) | u16::from(lo));
        }
    }
    /// The bytes, with the integrity word (signature A5h and checksum) in word 255.
    pub fn finish(mut self) -> Vec<u8> {
        self.words[255] = 0x00a5;
        let mut out = Vec::with_capacity(512);
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = out[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
        out[511] = sum.wrapping_neg();
        out
    }
}
