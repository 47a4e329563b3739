//! Driver-level tests of the ATAPI CD-ROM on the PIIX3 IDE controller: the
//! PACKET sequences Linux's libata (atapi_* in libata-sff) and SeaBIOS's
//! cdrom code issue, through the PIO bus with a vm-memory guest.

use std::sync::Arc;

use iovirt_backend::{open_image, BlockBackend, Inline};
use iovirt_bus::interrupt::test_doubles::RecordingLine;
use iovirt_bus::pci::PciFunction;
use iovirt_bus::{AddressSpace, Bus};
use iovirt_legacy::ide::regs::*;
use iovirt_legacy::ide::wire::PrdRepr;
use iovirt_legacy::ide::{atapi_op as op, cmd, Ide, IdePci, Slot};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CMD: u64 = SECONDARY_COMMAND_BASE;
const CTL: u64 = SECONDARY_CONTROL_BASE;
const BLOCKS: u64 = 64;

struct Rig {
    pio: Bus,
    ide: Ide,
    pci: IdePci,
    mem: Arc<GuestMemoryMmap<()>>,
    irq: Arc<RecordingLine>,
    _dir: tempfile::TempDir,
    iso: std::path::PathBuf,
}

fn block(lba: u64) -> Vec<u8> {
    (0..2048u64).map(|i| (lba * 3 + i / 7) as u8).collect()
}

fn disc(rig: &Rig) -> Arc<dyn BlockBackend> {
    Arc::new(Inline(open_image(&rig.iso).unwrap()))
}

impl Rig {
    fn new(with_disc: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let iso = dir.path().join("cd.iso");
        let mut data = Vec::new();
        for l in 0..BLOCKS {
            data.extend(block(l));
        }
        std::fs::write(&iso, data).unwrap();
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let irq = Arc::new(RecordingLine::new());
        let ide = Ide::new(mem.clone(), Arc::new(RecordingLine::new()), irq.clone());
        let pio = Bus::new(AddressSpace::Pio);
        ide.register_ports(&pio).unwrap();
        let mut pci = ide.pci_function();
        pci.config_write(4, &[0x05, 0x00]);
        let mut rig = Rig {
            pio,
            ide,
            pci,
            mem,
            irq,
            _dir: dir,
            iso,
        };
        let d = if with_disc { Some(disc(&rig)) } else { None };
        rig.ide.attach_cdrom(Slot::SECONDARY_MASTER, d).unwrap();
        rig.pci.config_write(4, &[0x05, 0x00]);
        rig
    }

    fn outb(&self, port: u64, v: u8) {
        self.pio.write(port, &[v]);
    }
    fn inb(&self, port: u64) -> u8 {
        let mut b = [0u8];
        self.pio.read(port, &mut b);
        b[0]
    }
    fn status(&self) -> u8 {
        self.inb(CMD + REG_STATUS_COMMAND)
    }

    /// atapi_send_cdb after ata_sff_exec_command(PACKET); returns true when
    /// the command asks for data.
    fn packet(&self, cdb: &[u8], byte_limit: u16, dma: bool) {
        let mut p = [0u8; 12];
        p[..cdb.len()].copy_from_slice(cdb);
        self.outb(CMD + REG_DEVICE, 0xa0);
        self.outb(CMD + REG_ERROR_FEATURES, u8::from(dma));
        self.outb(CMD + REG_LBA_MID, byte_limit as u8);
        self.outb(CMD + REG_LBA_HIGH, (byte_limit >> 8) as u8);
        self.outb(CMD + REG_STATUS_COMMAND, cmd::PACKET);
        let st = self.inb(CTL);
        assert_eq!(st & (STATUS_BSY | STATUS_DRQ), STATUS_DRQ);
        assert_eq!(self.inb(CMD + REG_NSECTOR) & 3, IREASON_COD);
        for w in p.chunks(2) {
            self.pio.write(CMD, w);
        }
    }

    /// The PIO data-in loop of ata_sff_hsm_move for ATAPI: per interrupt,
    /// read the byte count and that many bytes, until IO|CoD.
    fn data_in(&self) -> (Vec<u8>, usize, u8) {
        let mut out = Vec::new();
        let mut drqs = 0;
        loop {
            assert!(self.irq.level(), "interrupt expected");
            let st = self.status();
            let ireason = self.inb(CMD + REG_NSECTOR) & 3;
            if st & STATUS_DRQ == 0 {
                assert_eq!(ireason, IREASON_IO | IREASON_COD);
                return (out, drqs, st);
            }
            assert_eq!(ireason, IREASON_IO);
            let n = usize::from(self.inb(CMD + REG_LBA_MID))
                | usize::from(self.inb(CMD + REG_LBA_HIGH)) << 8;
            drqs += 1;
            for _ in 0..n / 2 {
                let mut w = [0u8; 2];
                self.pio.read(CMD, &mut w);
                out.extend_from_slice(&w);
            }
        }
    }

    fn request_sense(&self) -> (u8, u8, u8) {
        self.packet(&[op::REQUEST_SENSE, 0, 0, 0, 18], 18, false);
        let (s, _, st) = self.data_in();
        assert_eq!(st & STATUS_ERR, 0);
        (s[2] & 0x0f, s[12], s[13])
    }

    /// Run a no-data command; returns the sense of a CHECK CONDITION.
    fn check(&self, cdb: &[u8]) -> Option<(u8, u8, u8)> {
        self.packet(cdb, 0xfffe, false);
        let (_, _, st) = self.data_in();
        if st & STATUS_ERR != 0 {
            Some(self.request_sense())
        } else {
            None
        }
    }
}

#[test]
fn signature_and_identify_packet() {
    let rig = Rig::new(true);
    rig.outb(CTL, CONTROL_SRST);
    rig.outb(CTL, 0);
    rig.outb(CMD + REG_DEVICE, 0xa0);
    assert_eq!(
        (rig.inb(CMD + REG_LBA_MID), rig.inb(CMD + REG_LBA_HIGH)),
        (0x14, 0xeb)
    );
    // IDENTIFY DEVICE aborts, leaving the signature (what libata and SeaBIOS check).
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::IDENTIFY_DEVICE);
    assert!(rig.irq.level());
    assert_eq!(rig.status() & STATUS_ERR, STATUS_ERR);
    assert_eq!(rig.inb(CMD + REG_ERROR_FEATURES), ERROR_ABRT);
    assert_eq!(
        (rig.inb(CMD + REG_LBA_MID), rig.inb(CMD + REG_LBA_HIGH)),
        (0x14, 0xeb)
    );
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::IDENTIFY_PACKET_DEVICE);
    assert!(rig.irq.level());
    assert_eq!(rig.status() & STATUS_DRQ, STATUS_DRQ);
    let mut id = Vec::new();
    for _ in 0..256 {
        let mut w = [0u8; 2];
        rig.pio.read(CMD, &mut w);
        id.push(u16::from_le_bytes(w));
    }
    assert_eq!(id[0], 0x85c0);
    assert_eq!(id[49] & 0x0300, 0x0300);
    assert_eq!(rig.inb(CTL) & STATUS_DRQ, 0);
}

#[test]
fn inquiry_capacity_and_read10_pio_chunks() {
    let rig = Rig::new(true);
    // A fresh drive with a disc needs no unit attention.
    rig.packet(&[op::INQUIRY, 0, 0, 0, 36], 0xfffe, false);
    let (inq, _, _) = rig.data_in();
    assert_eq!(inq.len(), 36);
    assert_eq!(inq[0], 0x05);
    assert_eq!(inq[1], 0x80);
    assert_eq!(&inq[8..14], b"iovirt");
    rig.packet(&[op::READ_CAPACITY], 8, false);
    let (cap, _, _) = rig.data_in();
    assert_eq!(cap, [0, 0, 0, (BLOCKS - 1) as u8, 0, 0, 8, 0]);
    // READ(10) of 4 blocks with a 4096-byte limit: two DRQ blocks.
    rig.packet(&[op::READ_10, 0, 0, 0, 0, 3, 0, 0, 4], 4096, false);
    let (data, drqs, st) = rig.data_in();
    assert_eq!(st & STATUS_ERR, 0);
    assert_eq!(drqs, 2);
    assert_eq!(data.len(), 4 * 2048);
    for (i, chunk) in data.chunks(2048).enumerate() {
        assert_eq!(chunk, &block(3 + i as u64)[..]);
    }
    // READ(12) past the end: ILLEGAL REQUEST / LBA OUT OF RANGE.
    let sense = rig.check(&[op::READ_12, 0, 0, 0, 0, BLOCKS as u8, 0, 0, 0, 1]);
    assert_eq!(sense, Some((0x05, 0x21, 0x00)));
    // Unknown opcode: ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
    assert_eq!(rig.check(&[0xff]), Some((0x05, 0x20, 0x00)));
    // REQUEST SENSE cleared it.
    assert_eq!(rig.request_sense(), (0, 0, 0));
}

#[test]
fn read10_and_inquiry_via_dma() {
    let mut rig = Rig::new(true);
    let prd = PrdRepr {
        address: 0x10000,
        len: 3 * 2048,
        last: true,
    };
    rig.mem
        .write_slice(&prd.emit(), GuestAddress(0x1000))
        .unwrap();
    rig.pci
        .bar_write(4, BM_CHANNEL_LEN + BM_PRD_TABLE, &0x1000u32.to_le_bytes());
    rig.pci
        .bar_write(4, BM_CHANNEL_LEN + BM_COMMAND, &[BM_CMD_WRITE_MEMORY]);
    rig.packet(&[op::READ_10, 0, 0, 0, 0, 10, 0, 0, 3], 0, true);
    rig.pci.bar_write(
        4,
        BM_CHANNEL_LEN + BM_COMMAND,
        &[BM_CMD_WRITE_MEMORY | BM_CMD_START],
    );
    assert!(rig.irq.level());
    let mut bm = [0u8];
    rig.pci.bar_read(4, BM_CHANNEL_LEN + BM_STATUS, &mut bm);
    assert_eq!(
        bm[0] & (BM_STATUS_INTERRUPT | BM_STATUS_ACTIVE | BM_STATUS_ERROR),
        BM_STATUS_INTERRUPT
    );
    rig.pci
        .bar_write(4, BM_CHANNEL_LEN + BM_COMMAND, &[BM_CMD_WRITE_MEMORY]);
    rig.pci.bar_write(4, BM_CHANNEL_LEN + BM_STATUS, &bm);
    assert_eq!(rig.status() & (STATUS_ERR | STATUS_DRQ | STATUS_BSY), 0);
    assert_eq!(rig.inb(CMD + REG_NSECTOR) & 3, IREASON_IO | IREASON_COD);
    let mut buf = vec![0u8; 2048];
    rig.mem
        .read_slice(&mut buf, GuestAddress(0x10000 + 2 * 2048))
        .unwrap();
    assert_eq!(buf, block(12));
    // Generated data (INQUIRY) over DMA too.
    let prd = PrdRepr {
        address: 0x20000,
        len: 36,
        last: true,
    };
    rig.mem
        .write_slice(&prd.emit(), GuestAddress(0x1000))
        .unwrap();
    rig.packet(&[op::INQUIRY, 0, 0, 0, 36], 0, true);
    rig.pci.bar_write(
        4,
        BM_CHANNEL_LEN + BM_COMMAND,
        &[BM_CMD_WRITE_MEMORY | BM_CMD_START],
    );
    assert!(rig.irq.level());
    rig.status();
    let mut inq = [0u8; 36];
    rig.mem.read_slice(&mut inq, GuestAddress(0x20000)).unwrap();
    assert_eq!(inq[0], 0x05);
}

#[test]
fn media_change_eject_and_lock() {
    let rig = Rig::new(false);
    // Empty drive: NOT READY / MEDIUM NOT PRESENT.
    assert_eq!(rig.check(&[op::TEST_UNIT_READY]), Some((0x02, 0x3a, 0x00)));
    // Host inserts a disc: UNIT ATTENTION once, then ready.
    rig.ide
        .insert_media(Slot::SECONDARY_MASTER, disc(&rig))
        .unwrap();
    assert!(rig.ide.has_media(Slot::SECONDARY_MASTER));
    // GET EVENT STATUS NOTIFICATION is allowed during unit attention and reports new media.
    rig.packet(&[op::GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8], 8, false);
    let (ev, _, _) = rig.data_in();
    assert_eq!(&ev[2..6], &[0x04, 0x10, 2, 0x02]);
    assert_eq!(rig.check(&[op::TEST_UNIT_READY]), Some((0x06, 0x28, 0x00)));
    assert_eq!(rig.check(&[op::TEST_UNIT_READY]), None);
    // READ TOC (LBA and MSF), MODE SENSE page 2A, GET CONFIGURATION.
    rig.packet(&[op::READ_TOC, 0, 0, 0, 0, 0, 1, 0, 20], 0xfffe, false);
    let (toc, _, _) = rig.data_in();
    assert_eq!(&toc[..4], &[0, 18, 1, 1]);
    assert_eq!(&toc[16..20], &(BLOCKS as u32).to_be_bytes());
    rig.packet(&[op::READ_TOC, 2, 0, 0, 0, 0, 0, 0, 20], 0xfffe, false);
    let (toc, _, _) = rig.data_in();
    assert_eq!(&toc[8..12], &[0, 0, 2, 0], "track 1 at 00:02:00");
    rig.packet(
        &[op::MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 64],
        0xfffe,
        false,
    );
    let (ms, _, _) = rig.data_in();
    assert_eq!(ms[8], 0x2a);
    assert_eq!(usize::from(ms[1]) + 2, ms.len());
    rig.packet(
        &[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 64],
        0xfffe,
        false,
    );
    let (cfg, _, _) = rig.data_in();
    assert_eq!(&cfg[6..8], &[0, 0x08], "CD-ROM profile current");
    // Guest locks the tray: eject refused, from guest and host.
    assert_eq!(rig.check(&[op::PREVENT_ALLOW, 0, 0, 0, 1]), None);
    assert_eq!(
        rig.check(&[op::START_STOP_UNIT, 0, 0, 0, 2]),
        Some((0x05, 0x53, 0x02))
    );
    assert!(rig.ide.eject_media(Slot::SECONDARY_MASTER).is_err());
    assert_eq!(rig.check(&[op::PREVENT_ALLOW, 0, 0, 0, 0]), None);
    // Guest ejects: no medium.
    assert_eq!(rig.check(&[op::START_STOP_UNIT, 0, 0, 0, 2]), None);
    assert!(!rig.ide.has_media(Slot::SECONDARY_MASTER));
    assert_eq!(rig.check(&[op::TEST_UNIT_READY]), Some((0x02, 0x3a, 0x00)));
    rig.packet(&[op::READ_CAPACITY], 8, false);
    let (_, _, st) = rig.data_in();
    assert_ne!(st & STATUS_ERR, 0);
    assert_eq!(rig.inb(CMD + REG_ERROR_FEATURES) >> 4, 0x02);
    // Host-side eject after a re-insert.
    rig.ide
        .insert_media(Slot::SECONDARY_MASTER, disc(&rig))
        .unwrap();
    rig.ide.eject_media(Slot::SECONDARY_MASTER).unwrap();
    assert_eq!(rig.check(&[op::TEST_UNIT_READY]), Some((0x06, 0x28, 0x00)));
    assert_eq!(rig.check(&[op::TEST_UNIT_READY]), Some((0x02, 0x3a, 0x00)));
    // A disc with the wrong block size is refused.
    let disk: Arc<dyn BlockBackend> = Arc::new(Inline(iovirt_backend::MemoryBackend::new(4096)));
    assert!(rig.ide.insert_media(Slot::SECONDARY_MASTER, disk).is_err());
}
