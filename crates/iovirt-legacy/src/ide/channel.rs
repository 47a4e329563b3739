//! One IDE channel: two drive slots sharing a task-file interface, the
//! BSY/DRQ protocol, INTRQ, and the channel's half of the bus master.
//!
//! The channel never calls a back-end while its lock is held: register
//! handlers queue [`Submit`]s in `out`, and the caller submits them after
//! unlocking (see `ChannelShared` in the parent module), so a completion that
//! runs inline inside `submit` can take the lock again.

use std::sync::Arc;

use iovirt_backend::{BlockBackend, BlockError, BlockResult, Direction, Request};
use iovirt_bus::InterruptLine;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::regs::*;
use super::wire::{PrdEntry, PrdRepr, PRD_ENTRY_LEN};
use super::DmaMemory;

/// ATA sector size.
pub(crate) const SECTOR: usize = 512;
/// CD-ROM block size.
pub(crate) const CD_BLOCK: usize = 2048;
/// Bytes read ahead from the back-end for one PIO chunk (and the bounce buffer size).
pub(crate) const CHUNK_BYTES: usize = 128 * 1024;
/// Largest PRD table the bus master walks (64 KiB of entries, as the PIIX's
/// table may not cross a 64 KiB boundary).
const MAX_PRD_ENTRIES: usize = 8192;

/// Previous/current pairs of the task-file registers (the two-deep FIFOs LBA48 uses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Taskfile {
    pub feature: u8,
    pub hob_feature: u8,
    pub nsector: u8,
    pub hob_nsector: u8,
    pub lbal: u8,
    pub hob_lbal: u8,
    pub lbam: u8,
    pub hob_lbam: u8,
    pub lbah: u8,
    pub hob_lbah: u8,
}

impl Taskfile {
    /// LBA28 address with bits 27:24 from the device register.
    pub fn lba28(&self, device: u8) -> u64 {
        (u64::from(device & 0x0f) << 24)
            | (u64::from(self.lbah) << 16)
            | (u64::from(self.lbam) << 8)
            | u64::from(self.lbal)
    }
    /// LBA48 address from both FIFO levels.
    pub fn lba48(&self) -> u64 {
        (u64::from(self.hob_lbah) << 40)
            | (u64::from(self.hob_lbam) << 32)
            | (u64::from(self.hob_lbal) << 24)
            | (u64::from(self.lbah) << 16)
            | (u64::from(self.lbam) << 8)
            | u64::from(self.lbal)
    }
    /// LBA28 sector count (0 means 256).
    pub fn count28(&self) -> u32 {
        match self.nsector {
            0 => 256,
            n => u32::from(n),
        }
    }
    /// LBA48 sector count (0 means 65536).
    pub fn count48(&self) -> u32 {
        match (u32::from(self.hob_nsector) << 8) | u32::from(self.nsector) {
            0 => 65536,
            n => n,
        }
    }
    /// ATAPI byte count limit from LBA mid/high.
    pub fn byte_count(&self) -> u16 {
        (u16::from(self.lbah) << 8) | u16::from(self.lbam)
    }
}

/// ATAPI sense data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// What sits in a drive slot.
pub(crate) enum Media {
    /// Nothing: the slot behaves as an absent device.
    None,
    /// An ATA hard disk with 512-byte sectors.
    Disk(Arc<dyn BlockBackend>),
    /// An ATAPI CD-ROM drive, with or without a disc.
    Cdrom(Option<Arc<dyn BlockBackend>>),
}

/// Read-ahead bookkeeping of a PIO data-in phase that still needs the back-end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DiskRead {
    /// Next block to fetch.
    pub lba: u64,
    /// Blocks still to fetch.
    pub remaining: u64,
    /// Block size in bytes.
    pub block: usize,
}

/// How a PIO data-in phase is cut into DRQ blocks and how it ends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum InMode {
    /// ATA: DRQ blocks of `block_bytes`, an interrupt before each.
    Ata { block_bytes: usize },
    /// ATAPI: DRQ blocks up to the byte count limit, interrupt reason IO.
    Atapi { limit: usize },
}

/// A bus-master transfer a command set up, waiting for (or running on) the bus master.
#[derive(Debug)]
pub(crate) enum DmaOp {
    /// Disk → memory at a byte offset.
    Read { offset: u64 },
    /// Memory → disk at a byte offset.
    Write { offset: u64 },
    /// Generated data → memory (ATAPI responses).
    Data(Vec<u8>),
}

/// A DMA transfer of `len` bytes.
#[derive(Debug)]
pub(crate) struct DmaJob {
    pub op: DmaOp,
    pub len: usize,
    /// Granularity the transfer is cut to when the PRD table is short.
    pub unit: usize,
    pub atapi: bool,
}

/// Where a drive is in the command protocol.
pub(crate) enum Phase {
    /// No command in progress.
    Idle,
    /// BSY: waiting for a back-end completion.
    Busy,
    /// DRQ, host reads `data[pos..end]`.
    PioIn {
        data: Vec<u8>,
        pos: usize,
        end: usize,
        mode: InMode,
        next: Option<DiskRead>,
    },
    /// DRQ, host writes a block of `data`; `lba`/`remaining` in sectors.
    PioOut {
        data: Vec<u8>,
        pos: usize,
        lba: u64,
        remaining: u64,
        block: u64,
    },
    /// ATAPI: DRQ, the host writes the 12-byte command packet.
    Packet {
        data: [u8; 12],
        pos: usize,
        dma: bool,
        limit: u16,
    },
    /// A DMA command waits for the bus master to start.
    DmaWait(DmaJob),
}

impl Phase {
    pub fn is_idle(&self) -> bool {
        matches!(self, Phase::Idle)
    }
}

/// One drive slot.
pub(crate) struct Drive {
    pub media: Media,
    pub regs: Taskfile,
    pub status: u8,
    pub error: u8,
    /// INTRQ pending (cleared by a status read or a new command).
    pub irq: bool,
    pub phase: Phase,
    /// Bumped on every reset/abort; completions of older requests are dropped.
    pub gen: u64,
    /// READ/WRITE MULTIPLE block size in sectors (0 = disabled).
    pub multiple: u8,
    /// Transfer mode set by SET FEATURES 03h (0 = PIO default).
    pub xfer_mode: u8,
    pub write_cache: bool,
    pub heads: u8,
    pub sectors: u8,
    pub sense: Sense,
    pub unit_attention: bool,
    pub locked: bool,
    /// Pending GET EVENT STATUS NOTIFICATION media event code (0 = none).
    pub media_event: u8,
    bounce: Option<Arc<GuestMemoryMmap<()>>>,
}

impl Drive {
    pub fn new(media: Media) -> Self {
        let mut d = Drive {
            media,
            regs: Taskfile::default(),
            status: 0,
            error: 0,
            irq: false,
            phase: Phase::Idle,
            gen: 0,
            multiple: 16,
            xfer_mode: 0,
            write_cache: true,
            heads: 16,
            sectors: 63,
            sense: Sense::default(),
            unit_attention: false,
            locked: false,
            media_event: 0,
            bounce: None,
        };
        d.reset();
        d
    }

    pub fn present(&self) -> bool {
        !matches!(self.media, Media::None)
    }

    pub fn is_atapi(&self) -> bool {
        matches!(self.media, Media::Cdrom(_))
    }

    /// Load the signature (ATA: 01/01/00/00, ATAPI: 01/01/14/EB).
    pub fn set_signature(&mut self) {
        self.regs.nsector = 1;
        self.regs.lbal = 1;
        if self.is_atapi() {
            self.regs.lbam = 0x14;
            self.regs.lbah = 0xeb;
        } else if self.present() {
            self.regs.lbam = 0;
            self.regs.lbah = 0;
        } else {
            self.regs.lbam = 0xff;
            self.regs.lbah = 0xff;
        }
    }

    /// The status a device shows when idle and ready.
    pub fn ready_status(&self) -> u8 {
        // ATA and ATAPI devices both report DRDY|DSC when done (as QEMU does).
        STATUS_DRDY | STATUS_DSC
    }

    /// Power-on/hardware/software reset of this device.
    pub fn reset(&mut self) {
        self.gen = self.gen.wrapping_add(1);
        self.phase = Phase::Idle;
        self.irq = false;
        self.set_signature();
        self.error = ERROR_DIAG_PASSED;
        self.status = if self.is_atapi() || !self.present() {
            0
        } else {
            STATUS_DRDY | STATUS_DSC
        };
    }

    /// Capacity in sectors of an ATA disk.
    pub fn disk_sectors(&self) -> u64 {
        match &self.media {
            Media::Disk(b) => b.info().capacity / SECTOR as u64,
            _ => 0,
        }
    }

    /// Capacity in 2048-byte blocks of the inserted disc.
    pub fn cd_blocks(&self) -> Option<u64> {
        match &self.media {
            Media::Cdrom(Some(b)) => Some(b.info().capacity / CD_BLOCK as u64),
            _ => None,
        }
    }

    pub fn backend(&self) -> Option<Arc<dyn BlockBackend>> {
        match &self.media {
            Media::Disk(b) | Media::Cdrom(Some(b)) => Some(b.clone()),
            _ => None,
        }
    }

    fn bounce(&mut self) -> Option<Arc<GuestMemoryMmap<()>>> {
        if self.bounce.is_none() {
            self.bounce = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), CHUNK_BYTES)])
                .ok()
                .map(Arc::new);
        }
        self.bounce.clone()
    }
}

/// What a completion continues with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TagKind {
    /// A PIO read-ahead chunk of `bytes` landed in the bounce buffer.
    PioRead {
        bytes: usize,
        mode: InMode,
        next: Option<DiskRead>,
    },
    /// A PIO write block of `sectors` finished.
    PioWrite {
        lba: u64,
        sectors: u64,
        remaining: u64,
        block: u64,
    },
    /// FLUSH CACHE finished.
    Flush,
    /// A bus-master transfer finished.
    Dma {
        short: bool,
        long: bool,
        atapi: bool,
    },
}

/// Identifies a request in flight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tag {
    pub unit: usize,
    pub gen: u64,
    pub kind: TagKind,
}

/// A request to hand to a back-end once the channel lock is released.
pub(crate) struct Submit {
    pub backend: Arc<dyn BlockBackend>,
    pub req: Request,
    pub tag: Tag,
}

/// The bus-master registers of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BusMaster {
    pub command: u8,
    pub status: u8,
    pub prd: u32,
}

/// One IDE channel.
pub(crate) struct Channel {
    pub index: usize,
    pub drives: [Drive; 2],
    /// Device register as last written (with the obsolete bits set).
    pub device: u8,
    pub control: u8,
    pub bm: BusMaster,
    irq_line: Arc<dyn InterruptLine>,
    line_level: bool,
    pub dma: Arc<dyn DmaMemory>,
    /// Mirror of the PCI command register's bus-master enable.
    pub bus_master_enabled: bool,
    pub out: Vec<Submit>,
}

impl Channel {
    pub fn new(index: usize, irq_line: Arc<dyn InterruptLine>, dma: Arc<dyn DmaMemory>) -> Self {
        Channel {
            index,
            drives: [Drive::new(Media::None), Drive::new(Media::None)],
            device: DEVICE_OBSOLETE,
            control: 0,
            bm: BusMaster::default(),
            irq_line,
            line_level: false,
            dma,
            bus_master_enabled: true,
            out: Vec::new(),
        }
    }

    pub fn selected(&self) -> usize {
        usize::from(self.device & DEVICE_DEV != 0)
    }

    fn any_present(&self) -> bool {
        self.drives.iter().any(Drive::present)
    }

    /// Drive INTRQ from the selected device's pending flag and nIEN.
    pub fn update_line(&mut self) {
        let level = self.drives[self.selected()].irq && self.control & CONTROL_NIEN == 0;
        if level != self.line_level {
            self.line_level = level;
            if let Err(e) = self.irq_line.set_level(level) {
                log::warn!("ide{}: interrupt delivery failed: {e}", self.index);
            }
        }
    }

    /// The line level last driven (for state checks and tests).
    pub fn line_level(&self) -> bool {
        self.line_level
    }

    /// Raise INTRQ for `unit`; the bus master latches its interrupt bit.
    pub fn raise_irq(&mut self, unit: usize) {
        self.drives[unit].irq = true;
        if self.control & CONTROL_NIEN == 0 {
            self.bm.status |= BM_STATUS_INTERRUPT;
        }
        self.update_line();
    }

    /// Finish the command on `unit` successfully and interrupt.
    pub fn complete_ok(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        d.phase = Phase::Idle;
        d.status = d.ready_status();
        d.error = 0;
        self.raise_irq(unit);
    }

    /// Finish the command on `unit` with `error` bits and interrupt.
    pub fn complete_err(&mut self, unit: usize, error: u8) {
        let d = &mut self.drives[unit];
        d.phase = Phase::Idle;
        d.status = STATUS_DRDY | STATUS_ERR;
        d.error = error;
        self.raise_irq(unit);
    }

    // ---- register access ------------------------------------------------

    /// A guest read of the command block at `offset` (not the data register).
    pub fn read_reg(&mut self, offset: u64) -> u8 {
        if !self.any_present() {
            return 0;
        }
        let unit = self.selected();
        let hob = self.control & CONTROL_HOB != 0;
        let d = &self.drives[unit];
        let r = &d.regs;
        match offset {
            REG_ERROR_FEATURES => {
                if hob {
                    r.hob_feature
                } else {
                    d.error
                }
            }
            REG_NSECTOR => {
                if hob {
                    r.hob_nsector
                } else {
                    r.nsector
                }
            }
            REG_LBA_LOW => {
                if hob {
                    r.hob_lbal
                } else {
                    r.lbal
                }
            }
            REG_LBA_MID => {
                if hob {
                    r.hob_lbam
                } else {
                    r.lbam
                }
            }
            REG_LBA_HIGH => {
                if hob {
                    r.hob_lbah
                } else {
                    r.lbah
                }
            }
            REG_DEVICE => self.device,
            REG_STATUS_COMMAND => {
                if !d.present() {
                    return 0;
                }
                let s = d.status;
                self.drives[unit].irq = false;
                self.update_line();
                s
            }
            _ => 0xff,
        }
    }

    /// Alternate status: the status without side effects.
    pub fn alt_status(&self) -> u8 {
        if !self.any_present() {
            return 0;
        }
        let d = &self.drives[self.selected()];
        if d.present() {
            d.status
        } else {
            0
        }
    }

    /// A guest write of the command block at `offset` (not the data register).
    pub fn write_reg(&mut self, offset: u64, value: u8) {
        // Any command-block write clears HOB.
        self.control &= !CONTROL_HOB;
        match offset {
            REG_ERROR_FEATURES => self.each_regs(|r| {
                r.hob_feature = r.feature;
                r.feature = value;
            }),
            REG_NSECTOR => self.each_regs(|r| {
                r.hob_nsector = r.nsector;
                r.nsector = value;
            }),
            REG_LBA_LOW => self.each_regs(|r| {
                r.hob_lbal = r.lbal;
                r.lbal = value;
            }),
            REG_LBA_MID => self.each_regs(|r| {
                r.hob_lbam = r.lbam;
                r.lbam = value;
            }),
            REG_LBA_HIGH => self.each_regs(|r| {
                r.hob_lbah = r.lbah;
                r.lbah = value;
            }),
            REG_DEVICE => {
                self.device = value | DEVICE_OBSOLETE;
                self.update_line();
            }
            REG_STATUS_COMMAND => self.command(value),
            _ => {}
        }
    }

    fn each_regs(&mut self, f: impl Fn(&mut Taskfile)) {
        for d in &mut self.drives {
            f(&mut d.regs);
        }
    }

    /// A guest write of the device control register.
    pub fn write_control(&mut self, value: u8) {
        let old = self.control;
        self.control = value;
        if value & CONTROL_SRST != 0 && old & CONTROL_SRST == 0 {
            // Reset asserted: both devices go busy and drop what they were doing.
            for d in &mut self.drives {
                if d.present() {
                    d.reset();
                    d.status = STATUS_BSY;
                }
            }
            self.bm.status &= !BM_STATUS_ACTIVE;
        } else if value & CONTROL_SRST == 0 && old & CONTROL_SRST != 0 {
            // Reset released: signatures, diagnostics passed, device 0 selected.
            for d in &mut self.drives {
                if d.present() {
                    d.reset();
                }
            }
            self.device = DEVICE_OBSOLETE;
        }
        self.update_line();
    }

    /// A guest read of the data register (`data.len()` of 1, 2 or 4 bytes).
    pub fn read_data(&mut self, data: &mut [u8]) {
        data.fill(0);
        let unit = self.selected();
        let Phase::PioIn {
            data: buf,
            pos,
            end,
            ..
        } = &mut self.drives[unit].phase
        else {
            return;
        };
        let n = data.len().min(end.saturating_sub(*pos));
        if let (Some(dst), Some(src)) = (data.get_mut(..n), buf.get(*pos..*pos + n)) {
            dst.copy_from_slice(src);
        }
        *pos += n;
        if *pos >= *end {
            self.pio_in_block_done(unit);
        }
    }

    /// A guest write of the data register.
    pub fn write_data(&mut self, data: &[u8]) {
        let unit = self.selected();
        match &mut self.drives[unit].phase {
            Phase::PioOut { data: buf, pos, .. } => {
                let n = data.len().min(buf.len().saturating_sub(*pos));
                if let (Some(dst), Some(src)) = (buf.get_mut(*pos..*pos + n), data.get(..n)) {
                    dst.copy_from_slice(src);
                }
                *pos += n;
                if *pos >= buf.len() {
                    self.pio_out_block_done(unit);
                }
            }
            Phase::Packet { data: buf, pos, .. } => {
                let n = data.len().min(buf.len().saturating_sub(*pos));
                if let (Some(dst), Some(src)) = (buf.get_mut(*pos..*pos + n), data.get(..n)) {
                    dst.copy_from_slice(src);
                }
                *pos += n;
                if *pos >= buf.len() {
                    let Phase::Packet {
                        data: cdb,
                        dma,
                        limit,
                        ..
                    } = std::mem::replace(&mut self.drives[unit].phase, Phase::Busy)
                    else {
                        return;
                    };
                    self.drives[unit].status = STATUS_BSY;
                    self.atapi_command(unit, cdb, dma, limit);
                }
            }
            _ => {}
        }
    }

    // ---- PIO data phases --------------------------------------------------

    /// Enter a data-in phase over `data` and interrupt for the first block.
    pub fn start_pio_in(
        &mut self,
        unit: usize,
        data: Vec<u8>,
        mode: InMode,
        next: Option<DiskRead>,
    ) {
        if data.is_empty() {
            // Nothing to transfer (ATAPI allocation length 0): done.
            if next.is_none() {
                self.finish_data_in(unit, mode);
                return;
            }
        }
        let end = self.block_end(0, data.len(), mode);
        if let InMode::Atapi { .. } = mode {
            self.set_atapi_byte_count(unit, end);
        }
        let d = &mut self.drives[unit];
        d.phase = Phase::PioIn {
            data,
            pos: 0,
            end,
            mode,
            next,
        };
        d.status = d.ready_status() | STATUS_DRQ;
        self.raise_irq(unit);
    }

    fn block_end(&self, pos: usize, len: usize, mode: InMode) -> usize {
        let step = match mode {
            InMode::Ata { block_bytes } => block_bytes,
            InMode::Atapi { limit } => limit,
        };
        pos.saturating_add(step.max(1)).min(len)
    }

    fn set_atapi_byte_count(&mut self, unit: usize, bytes: usize) {
        let r = &mut self.drives[unit].regs;
        let n = bytes.min(0xffff) as u16;
        r.lbam = n as u8;
        r.lbah = (n >> 8) as u8;
        r.nsector = (r.nsector & !0x07) | IREASON_IO;
    }

    fn finish_data_in(&mut self, unit: usize, mode: InMode) {
        match mode {
            InMode::Ata { .. } => {
                // PIO data-in commands end without a final interrupt.
                let d = &mut self.drives[unit];
                d.phase = Phase::Idle;
                d.status = d.ready_status();
            }
            InMode::Atapi { .. } => self.atapi_ok(unit),
        }
    }

    fn pio_in_block_done(&mut self, unit: usize) {
        let Phase::PioIn {
            data,
            pos,
            end,
            mode,
            next,
        } = &mut self.drives[unit].phase
        else {
            return;
        };
        let (len, mode, next, p) = (data.len(), *mode, *next, *pos);
        if p < len {
            let new_end = self.block_end(p, len, mode);
            if let Phase::PioIn { end, .. } = &mut self.drives[unit].phase {
                *end = new_end;
            }
            if let InMode::Atapi { .. } = mode {
                self.set_atapi_byte_count(unit, new_end - p);
            }
            self.raise_irq(unit);
            return;
        }
        let _ = end;
        match next {
            Some(read) if read.remaining > 0 => self.submit_pio_read(unit, mode, read),
            _ => self.finish_data_in(unit, mode),
        }
    }

    /// Fetch the next read-ahead chunk of a PIO data-in command.
    pub fn submit_pio_read(&mut self, unit: usize, mode: InMode, read: DiskRead) {
        let per_chunk = (CHUNK_BYTES / read.block.max(1)) as u64;
        let blocks = read.remaining.min(per_chunk);
        let bytes = blocks as usize * read.block;
        let d = &mut self.drives[unit];
        let (Some(backend), Some(bounce)) = (d.backend(), d.bounce()) else {
            self.fail_io(unit, mode_is_atapi(mode), &BlockError::Dropped, true);
            return;
        };
        let buf = match iovirt_backend::IoBuffers::from_guest(
            bounce,
            &[(GuestAddress(0), bytes)],
            Direction::DeviceWrites,
        ) {
            Ok(b) => b,
            Err(e) => {
                self.fail_io(unit, mode_is_atapi(mode), &e, true);
                return;
            }
        };
        let next = DiskRead {
            lba: read.lba + blocks,
            remaining: read.remaining - blocks,
            block: read.block,
        };
        let d = &mut self.drives[unit];
        d.phase = Phase::Busy;
        d.status = STATUS_BSY;
        self.out.push(Submit {
            backend,
            req: Request::Read {
                offset: read.lba * read.block as u64,
                buf,
            },
            tag: Tag {
                unit,
                gen: d.gen,
                kind: TagKind::PioRead {
                    bytes,
                    mode,
                    next: Some(next),
                },
            },
        });
    }

    fn pio_out_block_done(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        let Phase::PioOut {
            data,
            lba,
            remaining,
            block,
            ..
        } = std::mem::replace(&mut d.phase, Phase::Busy)
        else {
            return;
        };
        let sectors = (data.len() / SECTOR) as u64;
        let Some(backend) = d.backend() else {
            self.complete_err(unit, ERROR_ABRT);
            return;
        };
        let fua = !d.write_cache;
        d.status = STATUS_BSY;
        self.out.push(Submit {
            backend,
            req: Request::Write {
                offset: lba * SECTOR as u64,
                buf: iovirt_backend::IoBuffers::from_vec(data),
                fua,
            },
            tag: Tag {
                unit,
                gen: d.gen,
                kind: TagKind::PioWrite {
                    lba,
                    sectors,
                    remaining,
                    block,
                },
            },
        });
    }

    /// Enter a data-out phase for the next block of a PIO write (no interrupt
    /// for the first block; `irq` for the following ones).
    pub fn start_pio_out(&mut self, unit: usize, lba: u64, remaining: u64, block: u64, irq: bool) {
        let n = remaining.min(block).max(1) as usize;
        let d = &mut self.drives[unit];
        d.phase = Phase::PioOut {
            data: vec![0; n * SECTOR],
            pos: 0,
            lba,
            remaining,
            block,
        };
        d.status = d.ready_status() | STATUS_DRQ;
        if irq {
            self.raise_irq(unit);
        }
    }

    /// Report a failed transfer: ATA UNC (reads) / ABRT, ATAPI MEDIUM ERROR.
    pub fn fail_io(&mut self, unit: usize, atapi: bool, err: &BlockError, read: bool) {
        log::debug!("ide{}.{unit}: I/O error: {err}", self.index);
        if atapi {
            self.atapi_error(unit, 0x03, 0x11, 0x00);
            return;
        }
        let bits = match err {
            BlockError::OutOfRange { .. } => ERROR_IDNF | ERROR_ABRT,
            BlockError::Unsupported(_) | BlockError::ReadOnly => ERROR_ABRT,
            _ if read => ERROR_UNC,
            _ => ERROR_ABRT,
        };
        self.complete_err(unit, bits);
    }

    // ---- completions ------------------------------------------------------

    /// A back-end request finished.
    pub fn complete(&mut self, tag: Tag, result: BlockResult) {
        let Some(d) = self.drives.get(tag.unit) else {
            return;
        };
        if d.gen != tag.gen || !matches!(d.phase, Phase::Busy) {
            return;
        }
        let unit = tag.unit;
        match tag.kind {
            TagKind::PioRead { bytes, mode, next } => {
                if let Err(e) = result {
                    self.fail_io(unit, mode_is_atapi(mode), &e, true);
                    return;
                }
                let mut data = vec![0u8; bytes];
                let ok = self.drives[unit].bounce.as_ref().is_some_and(|m| {
                    use vm_memory::Bytes;
                    m.read_slice(&mut data, GuestAddress(0)).is_ok()
                });
                if !ok {
                    self.fail_io(unit, mode_is_atapi(mode), &BlockError::Dropped, true);
                    return;
                }
                self.start_pio_in(unit, data, mode, next);
            }
            TagKind::PioWrite {
                lba,
                sectors,
                remaining,
                block,
            } => {
                if let Err(e) = result {
                    self.fail_io(unit, false, &e, false);
                    return;
                }
                let left = remaining.saturating_sub(sectors);
                if left == 0 {
                    self.complete_ok(unit);
                } else {
                    self.start_pio_out(unit, lba + sectors, left, block, true);
                }
            }
            TagKind::Flush => match result {
                Ok(()) => self.complete_ok(unit),
                Err(e) => self.fail_io(unit, false, &e, false),
            },
            TagKind::Dma { short, long, atapi } => self.dma_done(unit, result, short, long, atapi),
        }
    }

    // ---- bus master -------------------------------------------------------

    /// A guest read of bus-master register byte `reg` (0..8).
    pub fn bm_read(&self, reg: u64) -> u8 {
        match reg {
            0 => self.bm.command,
            2 => self.bm.status,
            4..=7 => self.bm.prd.to_le_bytes()[(reg - 4) as usize],
            _ => 0,
        }
    }

    /// A guest write of bus-master register byte `reg` (0..8).
    pub fn bm_write(&mut self, reg: u64, value: u8) {
        match reg {
            0 => {
                let old = self.bm.command;
                let value = value & BM_CMD_MASK;
                if old & BM_CMD_START != 0 {
                    // The direction may not change while started.
                    self.bm.command = (value & BM_CMD_START) | (old & BM_CMD_WRITE_MEMORY);
                } else {
                    self.bm.command = value;
                }
                if value & BM_CMD_START == 0 && old & BM_CMD_START != 0 {
                    // Stop: abort whatever the bus master was doing.
                    self.bm.status &= !BM_STATUS_ACTIVE;
                } else if value & BM_CMD_START != 0 && old & BM_CMD_START == 0 {
                    self.bm.status |= BM_STATUS_ACTIVE;
                    self.try_start_dma();
                }
            }
            2 => {
                self.bm.status = (self.bm.status & !BM_STATUS_RW & !(value & BM_STATUS_W1C))
                    | (value & BM_STATUS_RW);
            }
            4..=7 => {
                let mut b = self.bm.prd.to_le_bytes();
                b[(reg - 4) as usize] = value;
                self.bm.prd = u32::from_le_bytes(b) & !3;
            }
            _ => {}
        }
    }

    /// Start a waiting DMA command if the bus master is started and active.
    pub fn try_start_dma(&mut self) {
        if self.bm.command & BM_CMD_START == 0 || self.bm.status & BM_STATUS_ACTIVE == 0 {
            return;
        }
        let unit = self.selected();
        if !matches!(self.drives[unit].phase, Phase::DmaWait(_)) {
            return;
        }
        let Phase::DmaWait(job) = std::mem::replace(&mut self.drives[unit].phase, Phase::Busy)
        else {
            return;
        };
        self.drives[unit].status = STATUS_BSY | STATUS_DRDY;
        if !self.bus_master_enabled {
            self.bm_error(unit, job.atapi);
            return;
        }
        // Walk the PRD table.
        let mut ranges: Vec<(GuestAddress, usize)> = Vec::new();
        let mut total = 0usize;
        let mut addr = u64::from(self.bm.prd);
        let mut eot_at_end = false;
        for _ in 0..MAX_PRD_ENTRIES {
            let Some(raw) = self.dma.read_prd(GuestAddress(addr)) else {
                self.bm_error(unit, job.atapi);
                return;
            };
            let Ok(entry) = PrdEntry::new_checked(&raw[..]) else {
                self.bm_error(unit, job.atapi);
                return;
            };
            let prd = PrdRepr::parse(&entry);
            let want = job.len - total;
            let take = (prd.len as usize).min(want);
            ranges.push((GuestAddress(u64::from(prd.address)), take));
            total += take;
            if total >= job.len {
                eot_at_end = prd.last && take == prd.len as usize;
                break;
            }
            if prd.last {
                break;
            }
            addr += PRD_ENTRY_LEN as u64;
            // The PIIX's table pointer wraps inside its 64 KiB page.
            if addr & 0xffff == 0 {
                addr -= 0x1_0000;
            }
        }
        let short = total < job.len;
        let long = !short && !eot_at_end;
        let mut len = total;
        if short {
            // Transfer only whole units of what the table covers.
            len -= total % job.unit.max(1);
            trim_ranges(&mut ranges, len);
        }
        let to_memory = !matches!(job.op, DmaOp::Write { .. });
        let dir = if to_memory {
            Direction::DeviceWrites
        } else {
            Direction::DeviceReads
        };
        let buf = match self.dma.buffers(&ranges, dir) {
            Ok(b) => b,
            Err(e) => {
                log::debug!("ide{}.{unit}: DMA outside guest memory: {e}", self.index);
                self.bm_error(unit, job.atapi);
                return;
            }
        };
        let d = &mut self.drives[unit];
        let tag = Tag {
            unit,
            gen: d.gen,
            kind: TagKind::Dma {
                short,
                long,
                atapi: job.atapi,
            },
        };
        let req = match job.op {
            DmaOp::Data(bytes) => {
                buf.copy_from_slice_at(0, &bytes[..len.min(bytes.len())]);
                self.complete(tag, Ok(()));
                return;
            }
            _ if len == 0 => {
                self.complete(tag, Ok(()));
                return;
            }
            DmaOp::Read { offset } => Request::Read { offset, buf },
            DmaOp::Write { offset } => Request::Write {
                offset,
                buf,
                fua: !d.write_cache,
            },
        };
        let Some(backend) = d.backend() else {
            self.fail_io(unit, job.atapi, &BlockError::Dropped, true);
            return;
        };
        self.out.push(Submit { backend, req, tag });
    }

    /// The bus master could not reach guest memory: BM error and interrupt,
    /// the command ends with ABRT.
    fn bm_error(&mut self, unit: usize, atapi: bool) {
        self.bm.status = (self.bm.status & !BM_STATUS_ACTIVE) | BM_STATUS_ERROR;
        if atapi {
            self.atapi_error(unit, 0x04, 0x08, 0x00);
        } else {
            self.complete_err(unit, ERROR_ABRT);
        }
    }

    fn dma_done(&mut self, unit: usize, result: BlockResult, short: bool, long: bool, atapi: bool) {
        if short {
            // PRD table exhausted before the device finished: active and interrupt
            // clear, no INTRQ, the command is left hanging for the driver's timeout.
            self.bm.status &= !(BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT);
            let d = &mut self.drives[unit];
            d.phase = Phase::Idle;
            d.status = d.ready_status();
            return;
        }
        if !long {
            self.bm.status &= !BM_STATUS_ACTIVE;
        }
        match result {
            Ok(()) if atapi => self.atapi_ok(unit),
            Ok(()) => self.complete_ok(unit),
            Err(e) => {
                self.bm.status &= !BM_STATUS_ACTIVE;
                self.fail_io(unit, atapi, &e, true)
            }
        }
    }
}

fn mode_is_atapi(mode: InMode) -> bool {
    matches!(mode, InMode::Atapi { .. })
}

/// Cut `ranges` down to `len` bytes in total.
fn trim_ranges(ranges: &mut Vec<(GuestAddress, usize)>, len: usize) {
    let mut left = len;
    ranges.retain_mut(|r| {
        let take = r.1.min(left);
        r.1 = take;
        left -= take;
        take > 0
    });
}
