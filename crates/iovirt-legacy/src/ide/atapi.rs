//! The ATAPI CD-ROM: PACKET protocol and the MMC commands firmware and the
//! Linux sr driver use, with SCSI sense data.

use super::ata::{cmd, selected_dma, valid_transfer_mode, Identify};
use super::channel::{Channel, DiskRead, DmaJob, DmaOp, InMode, Phase, Sense, CD_BLOCK};
use super::regs::*;
use super::wire::Cdb;
use super::FIRMWARE_REVISION;

/// MMC/SPC operation codes this drive implements.
pub mod op {
    /// TEST UNIT READY.
    pub const TEST_UNIT_READY: u8 = 0x00;
    /// REQUEST SENSE.
    pub const REQUEST_SENSE: u8 = 0x03;
    /// INQUIRY.
    pub const INQUIRY: u8 = 0x12;
    /// START STOP UNIT (load/eject).
    pub const START_STOP_UNIT: u8 = 0x1b;
    /// PREVENT ALLOW MEDIUM REMOVAL.
    pub const PREVENT_ALLOW: u8 = 0x1e;
    /// READ CAPACITY(10).
    pub const READ_CAPACITY: u8 = 0x25;
    /// READ(10).
    pub const READ_10: u8 = 0x28;
    /// READ TOC/PMA/ATIP.
    pub const READ_TOC: u8 = 0x43;
    /// GET CONFIGURATION.
    pub const GET_CONFIGURATION: u8 = 0x46;
    /// GET EVENT STATUS NOTIFICATION.
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    /// MODE SENSE(10).
    pub const MODE_SENSE_10: u8 = 0x5a;
    /// READ(12).
    pub const READ_12: u8 = 0xa8;
}

/// Sense key NOT READY.
pub const SENSE_NOT_READY: u8 = 0x02;
/// Sense key MEDIUM ERROR.
pub const SENSE_MEDIUM_ERROR: u8 = 0x03;
/// Sense key ILLEGAL REQUEST.
pub const SENSE_ILLEGAL_REQUEST: u8 = 0x05;
/// Sense key UNIT ATTENTION.
pub const SENSE_UNIT_ATTENTION: u8 = 0x06;
/// ASC: invalid command operation code.
pub const ASC_INVALID_OPCODE: u8 = 0x20;
/// ASC: logical block address out of range.
pub const ASC_LBA_OUT_OF_RANGE: u8 = 0x21;
/// ASC: invalid field in CDB.
pub const ASC_INVALID_FIELD: u8 = 0x24;
/// ASC: not ready to ready change, medium may have changed.
pub const ASC_MEDIUM_CHANGED: u8 = 0x28;
/// ASC: saving parameters not supported.
pub const ASC_SAVING_NOT_SUPPORTED: u8 = 0x39;
/// ASC: medium not present.
pub const ASC_MEDIUM_NOT_PRESENT: u8 = 0x3a;
/// ASC: medium removal prevented (ASCQ 02h).
pub const ASC_REMOVAL_PREVENTED: u8 = 0x53;

/// GET EVENT STATUS media event: new media.
pub(crate) const EVENT_NEW_MEDIA: u8 = 2;
/// GET EVENT STATUS media event: media removal.
pub(crate) const EVENT_MEDIA_REMOVAL: u8 = 3;
/// Largest capacity (in blocks) reported as a CD-ROM rather than a DVD-ROM.
const CD_MAX_BLOCKS: u64 = 333_000;
/// MMC profile: CD-ROM.
const PROFILE_CD_ROM: u16 = 0x0008;
/// MMC profile: DVD-ROM.
const PROFILE_DVD_ROM: u16 = 0x0010;

fn be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// LBA as the 4-byte MSF field of READ TOC (0, M, S, F), with the 2-second lead-in.
fn msf(lba: u64) -> [u8; 4] {
    let x = lba + 150;
    [
        0,
        (x / 4500).min(255) as u8,
        ((x / 75) % 60) as u8,
        (x % 75) as u8,
    ]
}

impl Channel {
    /// ATA commands sent to the PACKET device.
    pub(crate) fn atapi_ata_command(&mut self, unit: usize, code: u8) {
        match code {
            cmd::PACKET => {
                let d = &mut self.drives[unit];
                let dma = d.regs.feature & 0x01 != 0;
                let limit = d.regs.byte_count();
                d.phase = Phase::Packet {
                    data: [0; 12],
                    pos: 0,
                    dma,
                    limit,
                };
                d.regs.nsector = (d.regs.nsector & !0x07) | IREASON_COD;
                d.status = d.ready_status() | STATUS_DRQ;
            }
            cmd::IDENTIFY_PACKET_DEVICE => {
                let data = self.identify_packet_data(unit);
                self.start_pio_in(unit, data, InMode::Ata { block_bytes: 512 }, None);
            }
            cmd::DEVICE_RESET => {
                let d = &mut self.drives[unit];
                d.reset();
            }
            cmd::EXECUTE_DEVICE_DIAGNOSTIC => self.execute_diagnostic(unit),
            cmd::SET_FEATURES => {
                let d = &mut self.drives[unit];
                if d.regs.feature == 0x03 && valid_transfer_mode(d.regs.nsector) {
                    d.xfer_mode = d.regs.nsector;
                    self.complete_ok(unit);
                } else {
                    self.complete_err(unit, ERROR_ABRT);
                }
            }
            cmd::CHECK_POWER_MODE => {
                self.drives[unit].regs.nsector = 0xff;
                self.complete_ok(unit);
            }
            cmd::STANDBY_IMMEDIATE
            | cmd::IDLE_IMMEDIATE
            | cmd::STANDBY
            | cmd::IDLE
            | cmd::SLEEP => self.complete_ok(unit),
            _ => {
                // IDENTIFY DEVICE and the rest: abort, leaving the PACKET signature.
                self.drives[unit].set_signature();
                self.complete_err(unit, ERROR_ABRT);
            }
        }
    }

    /// The ATAPI command completed without error.
    pub(crate) fn atapi_ok(&mut self, unit: usize) {
        let d = &mut self.drives[unit];
        d.phase = Phase::Idle;
        d.status = d.ready_status();
        d.error = 0;
        d.regs.nsector = (d.regs.nsector & !0x07) | IREASON_IO | IREASON_COD;
        self.raise_irq(unit);
    }

    /// CHECK CONDITION with the given sense.
    pub(crate) fn atapi_error(&mut self, unit: usize, key: u8, asc: u8, ascq: u8) {
        let d = &mut self.drives[unit];
        d.sense = Sense { key, asc, ascq };
        d.phase = Phase::Idle;
        d.status = STATUS_DRDY | STATUS_ERR;
        d.error = key << 4;
        d.regs.nsector = (d.regs.nsector & !0x07) | IREASON_IO | IREASON_COD;
        self.raise_irq(unit);
    }

    fn respond(&mut self, unit: usize, mut data: Vec<u8>, alloc: usize, dma: bool, limit: u16) {
        data.truncate(alloc);
        self.drives[unit].sense = Sense::default();
        if data.is_empty() {
            self.atapi_ok(unit);
        } else if dma {
            let len = data.len();
            self.wait_dma(unit, DmaOp::Data(data), len, 1);
        } else {
            self.start_pio_in(
                unit,
                data,
                InMode::Atapi {
                    limit: pio_limit(limit),
                },
                None,
            );
        }
    }

    fn wait_dma(&mut self, unit: usize, op: DmaOp, len: usize, unit_bytes: usize) {
        let d = &mut self.drives[unit];
        d.phase = Phase::DmaWait(DmaJob {
            op,
            len,
            unit: unit_bytes,
            atapi: true,
        });
        d.status = d.ready_status() | STATUS_DRQ;
        self.try_start_dma();
    }

    /// Execute a received command packet.
    pub(crate) fn atapi_command(&mut self, unit: usize, packet: [u8; 12], dma: bool, limit: u16) {
        let Ok(cdb) = Cdb::new_checked(&packet[..]) else {
            return;
        };
        let code = cdb.opcode();
        let d = &mut self.drives[unit];
        if d.unit_attention
            && !matches!(
                code,
                op::INQUIRY | op::REQUEST_SENSE | op::GET_CONFIGURATION | op::GET_EVENT_STATUS
            )
        {
            d.unit_attention = false;
            self.atapi_error(unit, SENSE_UNIT_ATTENTION, ASC_MEDIUM_CHANGED, 0);
            return;
        }
        let blocks = d.cd_blocks();
        let needs_media = matches!(
            code,
            op::TEST_UNIT_READY | op::READ_CAPACITY | op::READ_10 | op::READ_12 | op::READ_TOC
        );
        if needs_media && blocks.is_none() {
            self.atapi_error(unit, SENSE_NOT_READY, ASC_MEDIUM_NOT_PRESENT, 0);
            return;
        }
        let blocks = blocks.unwrap_or(0);
        match code {
            op::TEST_UNIT_READY => {
                self.drives[unit].sense = Sense::default();
                self.atapi_ok(unit)
            }
            op::REQUEST_SENSE => {
                let s = self.drives[unit].sense;
                let mut b = vec![0u8; 18];
                b[0] = 0x70;
                b[2] = s.key;
                b[7] = 10;
                b[12] = s.asc;
                b[13] = s.ascq;
                self.respond(unit, b, usize::from(cdb.byte4()), dma, limit);
            }
            op::INQUIRY => {
                let mut b = vec![0u8; 36];
                b[0] = 0x05; // CD/DVD device
                b[1] = 0x80; // removable
                b[2] = 0x00;
                b[3] = 0x21; // ATAPI, response data format 1
                b[4] = 31;
                b[8..16].copy_from_slice(b"iovirt  ");
                b[16..32].copy_from_slice(b"CD-ROM          ");
                let fw = FIRMWARE_REVISION.as_bytes();
                for (dst, src) in b[32..36].iter_mut().zip(fw.iter().chain(b"    ".iter())) {
                    *dst = *src;
                }
                self.respond(unit, b, usize::from(cdb.alloc6()), dma, limit);
            }
            op::READ_CAPACITY => {
                let last = blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut b = Vec::with_capacity(8);
                b.extend_from_slice(&be32(last));
                b.extend_from_slice(&be32(CD_BLOCK as u32));
                self.respond(unit, b, 8, dma, limit);
            }
            op::READ_10 | op::READ_12 => {
                let lba = u64::from(cdb.lba());
                let count = if code == op::READ_10 {
                    u64::from(cdb.len10())
                } else {
                    u64::from(cdb.len12())
                };
                if lba.checked_add(count).is_none_or(|end| end > blocks) {
                    self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, 0);
                    return;
                }
                self.drives[unit].sense = Sense::default();
                if count == 0 {
                    self.atapi_ok(unit);
                } else if dma {
                    let len = usize::try_from(count * CD_BLOCK as u64).unwrap_or(usize::MAX);
                    self.wait_dma(
                        unit,
                        DmaOp::Read {
                            offset: lba * CD_BLOCK as u64,
                        },
                        len,
                        CD_BLOCK,
                    );
                } else {
                    self.submit_pio_read(
                        unit,
                        InMode::Atapi {
                            limit: pio_limit(limit),
                        },
                        DiskRead {
                            lba,
                            remaining: count,
                            block: CD_BLOCK,
                        },
                    );
                }
            }
            op::MODE_SENSE_10 => self.mode_sense(unit, &cdb, dma, limit),
            op::READ_TOC => self.read_toc(unit, &cdb, blocks, dma, limit),
            op::GET_CONFIGURATION => {
                let current = match self.drives[unit].cd_blocks() {
                    None => 0,
                    Some(n) if n > CD_MAX_BLOCKS => PROFILE_DVD_ROM,
                    Some(_) => PROFILE_CD_ROM,
                };
                let mut features: Vec<(u16, Vec<u8>)> = Vec::new();
                // Feature 0000h: profile list (persistent, current).
                let mut p = vec![0x00, 0x00, 0x03, 8];
                for prof in [PROFILE_DVD_ROM, PROFILE_CD_ROM] {
                    p.extend_from_slice(&be16(prof));
                    p.push(u8::from(prof == current));
                    p.push(0);
                }
                features.push((0, p));
                // Feature 0001h: core, physical interface ATAPI.
                let mut c = vec![0x00, 0x01, 0x07, 8];
                c.extend_from_slice(&be32(2));
                c.extend_from_slice(&[0, 0, 0, 0]);
                features.push((1, c));
                // Feature 0003h: removable medium, tray, eject, lock.
                let lock = if self.drives[unit].locked { 0x04 } else { 0 };
                features.push((3, vec![0x00, 0x03, 0x03, 4, 0x29 | lock, 0, 0, 0]));
                let rt = cdb.flags1() & 0x03;
                let start = cdb.feature();
                let mut b = vec![0u8; 8];
                b[6..8].copy_from_slice(&be16(current));
                for (num, body) in features {
                    let take = match rt {
                        2 => num == start,
                        _ => num >= start,
                    };
                    if take {
                        b.extend_from_slice(&body);
                    }
                }
                let len = (b.len() - 4) as u32;
                b[0..4].copy_from_slice(&be32(len));
                self.respond(unit, b, usize::from(cdb.len10()), dma, limit);
            }
            op::GET_EVENT_STATUS => {
                if cdb.flags1() & 0x01 == 0 {
                    // Only polled operation is supported.
                    self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD, 0);
                    return;
                }
                let mut b;
                if cdb.byte4() & 0x10 != 0 {
                    let d = &mut self.drives[unit];
                    let present = d.cd_blocks().is_some();
                    b = vec![0, 6, 0x04, 0x10];
                    b.extend_from_slice(&[d.media_event, if present { 0x02 } else { 0 }, 0, 0]);
                    d.media_event = 0;
                } else {
                    b = vec![0, 2, 0x80, 0x10];
                }
                self.respond(unit, b, usize::from(cdb.len10()), dma, limit);
            }
            op::START_STOP_UNIT => {
                let flags = cdb.byte4();
                let (loej, start) = (flags & 0x02 != 0, flags & 0x01 != 0);
                let d = &mut self.drives[unit];
                if loej && !start {
                    if d.locked {
                        self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_REMOVAL_PREVENTED, 0x02);
                        return;
                    }
                    if d.cd_blocks().is_some() {
                        d.media = super::channel::Media::Cdrom(None);
                        d.media_event = EVENT_MEDIA_REMOVAL;
                    }
                }
                d.sense = Sense::default();
                self.atapi_ok(unit);
            }
            op::PREVENT_ALLOW => {
                let d = &mut self.drives[unit];
                d.locked = cdb.byte4() & 0x01 != 0;
                d.sense = Sense::default();
                self.atapi_ok(unit);
            }
            _ => self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_INVALID_OPCODE, 0),
        }
    }

    fn mode_sense(&mut self, unit: usize, cdb: &Cdb<&[u8]>, dma: bool, limit: u16) {
        let page = cdb.byte2() & 0x3f;
        let control = cdb.byte2() >> 6;
        if control == 3 {
            self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_SAVING_NOT_SUPPORTED, 0);
            return;
        }
        let locked = self.drives[unit].locked;
        let error_recovery: [u8; 8] = [0x01, 0x06, 0x00, 0x05, 0, 0, 0, 0];
        let mut caps = vec![0u8; 22];
        caps[0] = 0x2a;
        caps[1] = 0x14;
        caps[2] = 0x3b; // reads CD-R, CD-RW, method 2, DVD-ROM, DVD-R
        caps[4] = 0x71; // audio play, multisession, mode 2 form 1 and 2
        caps[5] = 0xff; // CD-DA commands, accurate stream, ...
        caps[6] = 0x29 | if locked { 0x02 } else { 0 }; // lock, eject, tray loader
        caps[8..10].copy_from_slice(&be16(706)); // max speed (4x), KB/s
        caps[10..12].copy_from_slice(&be16(256)); // volume levels
        caps[12..14].copy_from_slice(&be16(512)); // buffer size, KiB
        caps[14..16].copy_from_slice(&be16(706)); // current speed
        let mut b = vec![0u8; 8];
        match page {
            0x01 => b.extend_from_slice(&error_recovery),
            0x2a => b.extend_from_slice(&caps),
            0x3f => {
                b.extend_from_slice(&error_recovery);
                b.extend_from_slice(&caps);
            }
            _ => {
                self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD, 0);
                return;
            }
        }
        let len = (b.len() - 2) as u16;
        b[0..2].copy_from_slice(&be16(len));
        b[2] = 0x70; // medium type: door closed (legacy value drivers ignore)
        self.respond(unit, b, usize::from(cdb.len10()), dma, limit);
    }

    fn read_toc(&mut self, unit: usize, cdb: &Cdb<&[u8]>, blocks: u64, dma: bool, limit: u16) {
        let use_msf = cdb.flags1() & 0x02 != 0;
        let mut format = cdb.byte2() & 0x0f;
        if format == 0 {
            format = cdb.byte9() >> 6;
        }
        let addr = |lba: u64| {
            if use_msf {
                msf(lba)
            } else {
                be32(lba.min(u64::from(u32::MAX)) as u32)
            }
        };
        let mut b = vec![0u8; 4];
        match format {
            0 => {
                let start = cdb.byte6();
                if start > 1 && start != 0xaa {
                    self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD, 0);
                    return;
                }
                b[2] = 1;
                b[3] = 1;
                if start <= 1 {
                    b.extend_from_slice(&[0, 0x14, 1, 0]);
                    b.extend_from_slice(&addr(0));
                }
                b.extend_from_slice(&[0, 0x16, 0xaa, 0]);
                b.extend_from_slice(&addr(blocks));
            }
            1 => {
                b[2] = 1;
                b[3] = 1;
                b.extend_from_slice(&[0, 0x14, 1, 0]);
                b.extend_from_slice(&addr(0));
            }
            _ => {
                self.atapi_error(unit, SENSE_ILLEGAL_REQUEST, ASC_INVALID_FIELD, 0);
                return;
            }
        }
        let len = (b.len() - 2) as u16;
        b[0..2].copy_from_slice(&be16(len));
        self.respond(unit, b, usize::from(cdb.len10()), dma, limit);
    }
}

/// The PIO DRQ block size from the guest's byte count limit: even, and 0/FFFFh
/// taken as the largest even count.
fn pio_limit(limit: u16) -> usize {
    match limit {
        0 | 0xffff => 0xfffe,
        n => usize::from(n & !1).max(2),
    }
}

/// The 512-byte IDENTIFY PACKET DEVICE data.
pub(crate) fn identify_packet(ch: &Channel, unit: usize) -> Vec<u8> {
    let d = &ch.drives[unit];
    let mut id = Identify::new();
    // ATAPI, CD-ROM, removable, accelerated DRQ, 12-byte packets.
    id.set(0, 0x85c0);
    id.string(10, 20, &ch.serial(unit));
    id.string(23, 8, FIRMWARE_REVISION);
    id.string(27, 40, "iovirt DVD-ROM");
    id.set(49, (1 << 9) | (1 << 8)); // LBA, DMA
    id.set(53, 0x7);
    let (mw, udma) = selected_dma(d.xfer_mode);
    id.set(62, 0x07);
    id.set(63, 0x07 | mw);
    id.set(64, 0x03);
    id.set(65, 0xb4);
    id.set(66, 0xb4);
    id.set(67, 0x12c);
    id.set(68, 0xb4);
    id.set(71, 30);
    id.set(72, 30);
    id.set(80, 0x1e); // ATAPI-1..4
    id.set(82, 1 << 4); // PACKET feature set
    id.set(83, 1 << 14);
    id.set(84, 1 << 14);
    id.set(85, 1 << 4);
    id.set(87, 1 << 14);
    id.set(88, 0x3f | udma);
    id.finish()
}
