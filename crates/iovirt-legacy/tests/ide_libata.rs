//! Driver-level tests of the PIIX3 IDE controller: the register sequences
//! Linux's libata (ata_piix with ata_sff_*/ata_bmdma_*) issues for ATA disks,
//! replayed through the PIO bus and the PCI root, with a vm-memory guest.

use std::sync::{Arc, Mutex};

use iovirt_backend::{
    BlockBackend, BlockInfo, Completion, Inline, MemoryBackend, Request, SyncBackend, ThreadPool,
};
use iovirt_bus::interrupt::test_doubles::RecordingLine;
use iovirt_bus::pci::PciRoot;
use iovirt_bus::{AddressSpace, Bus};
use iovirt_legacy::ide::regs::*;
use iovirt_legacy::ide::wire::PrdRepr;
use iovirt_legacy::ide::{cmd, Ide, IdeError, IdeState, Slot, IDE_ADDRESS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CMD: u64 = PRIMARY_COMMAND_BASE;
const CTL: u64 = PRIMARY_CONTROL_BASE;
const BM: u64 = 0xc000;
const MEM_SIZE: usize = 4 << 20;
const DISK_SECTORS: u64 = 2048;

fn pattern(sector: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| (sector.wrapping_mul(7) ^ i) as u8)
        .collect()
}

struct Rig {
    pio: Arc<Bus>,
    ide: Ide,
    mem: Arc<GuestMemoryMmap<()>>,
    irq: Arc<RecordingLine>,
    _root: Arc<PciRoot>,
    _mmio: Arc<Bus>,
}

impl Rig {
    fn with_disk(disk: Arc<dyn BlockBackend>) -> Self {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let irq = Arc::new(RecordingLine::new());
        let ide = Ide::new(mem.clone(), irq.clone(), Arc::new(RecordingLine::new()));
        ide.attach_disk(Slot::PRIMARY_MASTER, disk).unwrap();
        let pio = Arc::new(Bus::new(AddressSpace::Pio));
        let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
        ide.register_ports(&pio).unwrap();
        let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
        root.register().unwrap();
        root.add_function(IDE_ADDRESS, ide.pci_function()).unwrap();
        let rig = Rig {
            pio,
            ide,
            mem,
            irq,
            _root: root,
            _mmio: mmio,
        };
        // Firmware: BAR4 at 0xC000, I/O decode and bus mastering on.
        rig.cfg_write(0x20, BM as u32 | 1);
        rig.cfg_write(0x04, 0x0005);
        rig
    }

    fn new() -> Self {
        let mut data = Vec::new();
        for s in 0..DISK_SECTORS {
            data.extend(pattern(s));
        }
        Self::with_disk(Arc::new(Inline(MemoryBackend::from_vec(data))))
    }

    fn cfg_write(&self, reg: u32, v: u32) {
        let addr = 0x8000_0000 | (u32::from(IDE_ADDRESS.devfn()) << 8) | reg;
        self.pio.write(0xcf8, &addr.to_le_bytes());
        self.pio.write(0xcfc, &v.to_le_bytes());
    }
    fn cfg_read(&self, reg: u32) -> u32 {
        let addr = 0x8000_0000 | (u32::from(IDE_ADDRESS.devfn()) << 8) | reg;
        self.pio.write(0xcf8, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        self.pio.read(0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    fn outb(&self, port: u64, v: u8) {
        assert!(self.pio.write(port, &[v]), "port {port:#x} unclaimed");
    }
    fn inb(&self, port: u64) -> u8 {
        let mut b = [0u8];
        self.pio.read(port, &mut b);
        b[0]
    }
    fn outl(&self, port: u64, v: u32) {
        self.pio.write(port, &v.to_le_bytes());
    }
    fn status(&self) -> u8 {
        self.inb(CMD + REG_STATUS_COMMAND)
    }
    fn altstatus(&self) -> u8 {
        self.inb(CTL)
    }

    /// ata_sff_dev_select + ata_sff_wait_ready (the timing-free version).
    fn select(&self, unit: u8, extra: u8) {
        self.outb(CMD + REG_DEVICE, 0xa0 | DEVICE_LBA | (unit << 4) | extra);
        for _ in 0..1000 {
            if self.altstatus() & STATUS_BSY == 0 {
                return;
            }
            std::thread::yield_now();
        }
        panic!("device stays busy");
    }

    /// ata_sff_tf_load for an LBA28 taskfile, then exec_command.
    fn lba28(&self, command: u8, lba: u32, count: u8) {
        self.outb(CMD + REG_NSECTOR, count);
        self.outb(CMD + REG_LBA_LOW, lba as u8);
        self.outb(CMD + REG_LBA_MID, (lba >> 8) as u8);
        self.outb(CMD + REG_LBA_HIGH, (lba >> 16) as u8);
        self.outb(CMD + REG_DEVICE, 0xe0 | ((lba >> 24) as u8 & 0x0f));
        self.outb(CMD + REG_STATUS_COMMAND, command);
        let _ = self.altstatus(); // ata_sff_pause
    }

    /// ata_sff_tf_load for an LBA48 taskfile (HOB bytes first), then exec_command.
    fn lba48(&self, command: u8, lba: u64, count: u16) {
        let b = lba.to_le_bytes();
        self.outb(CMD + REG_NSECTOR, (count >> 8) as u8);
        self.outb(CMD + REG_LBA_LOW, b[3]);
        self.outb(CMD + REG_LBA_MID, b[4]);
        self.outb(CMD + REG_LBA_HIGH, b[5]);
        self.outb(CMD + REG_NSECTOR, count as u8);
        self.outb(CMD + REG_LBA_LOW, b[0]);
        self.outb(CMD + REG_LBA_MID, b[1]);
        self.outb(CMD + REG_LBA_HIGH, b[2]);
        self.outb(CMD + REG_DEVICE, 0xe0);
        self.outb(CMD + REG_STATUS_COMMAND, command);
        let _ = self.altstatus();
    }

    /// Wait for INTRQ (the interrupt handler runs), like ata_sff_interrupt.
    fn wait_irq(&self) {
        for _ in 0..100_000 {
            if self.irq.level() {
                return;
            }
            std::thread::yield_now();
        }
        panic!("no interrupt");
    }

    /// ata_sff_data_xfer: read one 512-byte block with 16-bit accesses.
    fn read_block16(&self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        for _ in 0..len / 2 {
            let mut w = [0u8; 2];
            self.pio.read(CMD, &mut w);
            out.extend_from_slice(&w);
        }
        out
    }
    /// ata_sff_data_xfer32: the same with 32-bit accesses.
    fn read_block32(&self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        for _ in 0..len / 4 {
            let mut w = [0u8; 4];
            self.pio.read(CMD, &mut w);
            out.extend_from_slice(&w);
        }
        out
    }
    fn write_block16(&self, data: &[u8]) {
        for w in data.chunks(2) {
            self.pio.write(CMD, w);
        }
    }

    /// ata_bmdma_setup + exec_command + ata_bmdma_start, PRD table at 0x1000.
    fn dma(&self, command: u8, lba: u32, count: u8, prds: &[PrdRepr], to_memory: bool) {
        for (i, p) in prds.iter().enumerate() {
            self.mem
                .write_slice(&p.emit(), GuestAddress(0x1000 + 8 * i as u64))
                .unwrap();
        }
        self.outl(BM + BM_PRD_TABLE, 0x1000);
        let c = self.inb(BM + BM_COMMAND) & !(BM_CMD_START | BM_CMD_WRITE_MEMORY);
        let c = if to_memory {
            c | BM_CMD_WRITE_MEMORY
        } else {
            c
        };
        self.outb(BM + BM_COMMAND, c);
        self.lba28(command, lba, count);
        self.outb(BM + BM_COMMAND, c | BM_CMD_START);
    }

    /// ata_bmdma_port_intr: BM status, stop, ack. Returns (bm status, ata status).
    fn dma_intr(&self) -> (u8, u8) {
        let bm = self.inb(BM + BM_STATUS);
        let c = self.inb(BM + BM_COMMAND);
        self.outb(BM + BM_COMMAND, c & !BM_CMD_START);
        let _ = self.altstatus();
        let st = self.status();
        self.outb(BM + BM_STATUS, bm); // W1C of INTR/ERR
        (bm, st)
    }
}

fn identify(rig: &Rig) -> Vec<u16> {
    rig.select(0, 0);
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::IDENTIFY_DEVICE);
    rig.wait_irq();
    let st = rig.status();
    assert_eq!(st & (STATUS_BSY | STATUS_DRQ | STATUS_ERR), STATUS_DRQ);
    assert!(!rig.irq.level(), "status read clears INTRQ");
    let b = rig.read_block32(512);
    assert_eq!(rig.status() & (STATUS_DRQ | STATUS_BSY), 0);
    b.chunks(2)
        .map(|w| u16::from_le_bytes([w[0], w[1]]))
        .collect()
}

fn ata_string(words: &[u16]) -> String {
    words
        .iter()
        .flat_map(|w| [(w >> 8) as u8, *w as u8])
        .map(char::from)
        .collect::<String>()
        .trim_end()
        .to_string()
}

#[test]
fn pci_identity_and_bar4() {
    let rig = Rig::new();
    assert_eq!(rig.cfg_read(0x00), 0x7010_8086);
    assert_eq!(rig.cfg_read(0x08) >> 8, 0x01_01_80);
    assert_eq!(rig.cfg_read(0x20), BM as u32 | 1);
    // The bus-master block decodes at BAR4.
    rig.outl(BM + BM_PRD_TABLE, 0x1234_5677);
    let mut b = [0u8; 4];
    rig.pio.read(BM + BM_PRD_TABLE, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1234_5674);
    rig.outb(BM + BM_STATUS, BM_STATUS_DRIVE0_DMA);
    assert_eq!(rig.inb(BM + BM_STATUS), BM_STATUS_DRIVE0_DMA);
}

#[test]
fn identify_device_via_pio() {
    let rig = Rig::new();
    let id = identify(&rig);
    assert_eq!(id[0], 0x0040);
    assert_eq!(ata_string(&id[27..47]), "iovirt HARDDISK");
    assert!(!ata_string(&id[10..20]).is_empty());
    assert_eq!(id[47] & 0xff, 16);
    assert_eq!(id[49] & 0x0300, 0x0300, "LBA and DMA");
    assert_eq!(
        u32::from(id[60]) | u32::from(id[61]) << 16,
        DISK_SECTORS as u32
    );
    assert_eq!(id[64] & 3, 3, "PIO 3 and 4");
    assert_eq!(id[63] & 7, 7, "MWDMA 0-2");
    assert_eq!(id[88] & 0x3f, 0x3f, "UDMA 0-5");
    assert_ne!(id[83] & (1 << 10), 0, "LBA48");
    assert_ne!(id[83] & (1 << 13), 0, "FLUSH CACHE EXT");
    assert_ne!(id[82] & (1 << 5), 0, "write cache supported");
    assert_ne!(id[85] & (1 << 5), 0, "write cache enabled");
    let lba48 = id[100..104]
        .iter()
        .rev()
        .fold(0u64, |a, w| a << 16 | u64::from(*w));
    assert_eq!(lba48, DISK_SECTORS);
    // Integrity word: signature and checksum.
    assert_eq!(id[255] & 0xff, 0xa5);
    let sum = id
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .fold(0u8, |a, b| a.wrapping_add(b));
    assert_eq!(sum, 0);
}

#[test]
fn srst_signatures_and_absent_slave() {
    let rig = Rig::new();
    // ata_bus_softreset: SRST with nIEN, then release.
    rig.outb(CTL, CONTROL_NIEN | CONTROL_SRST);
    assert_ne!(rig.altstatus() & STATUS_BSY, 0);
    rig.outb(CTL, CONTROL_NIEN);
    rig.select(0, 0);
    assert_eq!(rig.status() & (STATUS_BSY | STATUS_DRDY), STATUS_DRDY);
    assert_eq!(rig.inb(CMD + REG_ERROR_FEATURES), ERROR_DIAG_PASSED);
    assert_eq!(rig.inb(CMD + REG_NSECTOR), 1);
    assert_eq!(rig.inb(CMD + REG_LBA_LOW), 1);
    assert_eq!(rig.inb(CMD + REG_LBA_MID), 0);
    assert_eq!(rig.inb(CMD + REG_LBA_HIGH), 0);
    // The absent slave: status 0, and commands to it are ignored.
    rig.outb(CMD + REG_DEVICE, 0xb0);
    assert_eq!(rig.status(), 0);
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::IDENTIFY_DEVICE);
    assert_eq!(rig.altstatus(), 0);
    // The secondary channel is empty: everything reads 0 ("no device").
    assert_eq!(rig.inb(SECONDARY_COMMAND_BASE + REG_STATUS_COMMAND), 0);
    rig.outb(SECONDARY_COMMAND_BASE + REG_NSECTOR, 0x55);
    assert_eq!(rig.inb(SECONDARY_COMMAND_BASE + REG_NSECTOR), 0);
    // EXECUTE DEVICE DIAGNOSTIC.
    rig.outb(CTL, 0);
    rig.select(0, 0);
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::EXECUTE_DEVICE_DIAGNOSTIC);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    assert_eq!(rig.inb(CMD + REG_ERROR_FEATURES), 0x01);
}

#[test]
fn read_sectors_pio_drq_per_sector() {
    let rig = Rig::new();
    rig.select(0, 0);
    let edges_before = rig.irq.level_changes();
    rig.lba28(cmd::READ_SECTORS, 5, 3);
    for s in 5..8u64 {
        rig.wait_irq();
        let st = rig.status();
        assert_eq!(st & (STATUS_BSY | STATUS_DRQ | STATUS_ERR), STATUS_DRQ);
        assert_eq!(rig.read_block16(512), pattern(s));
    }
    // No interrupt after the last block of a PIO read.
    assert!(!rig.irq.level());
    assert_eq!(rig.altstatus() & (STATUS_DRQ | STATUS_BSY), 0);
    assert_eq!(rig.irq.level_changes() - edges_before, 6);
}

#[test]
fn write_sectors_pio() {
    let disk = Arc::new(Inline(MemoryBackend::new(DISK_SECTORS * 512)));
    let rig = Rig::with_disk(disk.clone());
    rig.select(0, 0);
    rig.lba28(cmd::WRITE_SECTORS, 9, 2);
    // First block: DRQ without an interrupt.
    assert!(!rig.irq.level());
    assert_eq!(rig.altstatus() & (STATUS_BSY | STATUS_DRQ), STATUS_DRQ);
    rig.write_block16(&pattern(100));
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_DRQ, STATUS_DRQ);
    rig.write_block16(&pattern(101));
    rig.wait_irq();
    assert_eq!(rig.status() & (STATUS_DRQ | STATUS_ERR | STATUS_BSY), 0);
    let c = disk.0.contents();
    assert_eq!(&c[9 * 512..10 * 512], &pattern(100)[..]);
    assert_eq!(&c[10 * 512..11 * 512], &pattern(101)[..]);
}

#[test]
fn read_write_multiple() {
    let rig = Rig::new();
    rig.select(0, 0);
    // READ MULTIPLE before SET MULTIPLE MODE 0 → ABRT.
    rig.lba28(cmd::SET_MULTIPLE_MODE, 0, 0);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    rig.lba28(cmd::READ_MULTIPLE, 0, 1);
    rig.wait_irq();
    assert_ne!(rig.status() & STATUS_ERR, 0);
    assert_eq!(rig.inb(CMD + REG_ERROR_FEATURES), ERROR_ABRT);
    // Not a power of two → ABRT.
    rig.lba28(cmd::SET_MULTIPLE_MODE, 0, 3);
    rig.wait_irq();
    assert_ne!(rig.status() & STATUS_ERR, 0);
    rig.lba28(cmd::SET_MULTIPLE_MODE, 0, 4);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    rig.lba28(cmd::READ_MULTIPLE, 20, 10);
    let mut sector = 20u64;
    for blocks in [4usize, 4, 2] {
        rig.wait_irq();
        assert_eq!(rig.status() & (STATUS_DRQ | STATUS_ERR), STATUS_DRQ);
        let data = rig.read_block16(blocks * 512);
        for chunk in data.chunks(512) {
            assert_eq!(chunk, &pattern(sector)[..]);
            sector += 1;
        }
    }
    assert_eq!(rig.altstatus() & STATUS_DRQ, 0);
    // WRITE MULTIPLE of 6 sectors: blocks of 4 and 2.
    rig.lba28(cmd::WRITE_MULTIPLE, 40, 6);
    assert_eq!(rig.altstatus() & STATUS_DRQ, STATUS_DRQ);
    rig.write_block16(&[0x11; 4 * 512]);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_DRQ, STATUS_DRQ);
    rig.write_block16(&[0x22; 2 * 512]);
    rig.wait_irq();
    assert_eq!(rig.status() & (STATUS_DRQ | STATUS_ERR), 0);
    rig.lba28(cmd::READ_SECTORS, 44, 1);
    rig.wait_irq();
    rig.status();
    assert_eq!(rig.read_block16(512), vec![0x22; 512]);
}

#[test]
fn lba48_ext_commands_and_hob() {
    let rig = Rig::new();
    rig.select(0, 0);
    // HOB readback of the two-deep FIFOs.
    rig.outb(CMD + REG_LBA_LOW, 0x12);
    rig.outb(CMD + REG_LBA_LOW, 0x34);
    assert_eq!(rig.inb(CMD + REG_LBA_LOW), 0x34);
    rig.outb(CTL, CONTROL_HOB);
    assert_eq!(rig.inb(CMD + REG_LBA_LOW), 0x12);
    rig.outb(CMD + REG_NSECTOR, 0); // any command-block write clears HOB
    assert_eq!(rig.inb(CMD + REG_LBA_LOW), 0x34);
    rig.outb(CTL, 0);
    // 258 sectors: only expressible with the HOB sector count.
    rig.lba48(cmd::READ_SECTORS_EXT, 3, 258);
    for s in 3..3 + 258u64 {
        rig.wait_irq();
        assert_eq!(
            rig.status() & (STATUS_DRQ | STATUS_ERR),
            STATUS_DRQ,
            "sector {s}"
        );
        assert_eq!(rig.read_block16(512), pattern(s));
    }
    assert_eq!(rig.altstatus() & STATUS_DRQ, 0);
    // An address above 2^28 (HOB LBA low) is out of range: IDNF.
    rig.lba48(cmd::READ_SECTORS_EXT, 1 << 28, 1);
    rig.wait_irq();
    assert_ne!(rig.status() & STATUS_ERR, 0);
    assert_ne!(rig.inb(CMD + REG_ERROR_FEATURES) & ERROR_IDNF, 0);
    // WRITE SECTORS EXT + READ VERIFY EXT + FLUSH CACHE EXT.
    rig.lba48(cmd::WRITE_SECTORS_EXT, 2047, 1);
    rig.write_block16(&[0x5a; 512]);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    rig.lba48(cmd::READ_VERIFY_EXT, 2000, 48);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    rig.lba48(cmd::FLUSH_CACHE_EXT, 0, 0);
    rig.wait_irq();
    assert_eq!(rig.status() & (STATUS_ERR | STATUS_BSY), 0);
}

#[test]
fn errors_idnf_abrt_and_nien() {
    let rig = Rig::new();
    rig.select(0, 0);
    rig.lba28(cmd::READ_SECTORS, DISK_SECTORS as u32 - 1, 2);
    rig.wait_irq();
    assert_eq!(rig.status() & (STATUS_ERR | STATUS_DRQ), STATUS_ERR);
    assert_ne!(rig.inb(CMD + REG_ERROR_FEATURES) & ERROR_IDNF, 0);
    // Unknown command → ABRT.
    rig.lba28(0xf0, 0, 0);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, STATUS_ERR);
    assert_eq!(rig.inb(CMD + REG_ERROR_FEATURES), ERROR_ABRT);
    // Bad SET FEATURES transfer mode → ABRT; a good one works.
    rig.outb(CMD + REG_ERROR_FEATURES, 0x03);
    rig.lba28(cmd::SET_FEATURES, 0, 0x20 | 7);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, STATUS_ERR);
    rig.outb(CMD + REG_ERROR_FEATURES, 0x03);
    rig.lba28(cmd::SET_FEATURES, 0, 0x20 | 2);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    assert_eq!(identify(&rig)[63] & 0x0700, 0x0400, "MWDMA2 selected");
    // nIEN: the command completes but INTRQ stays low.
    rig.outb(CTL, CONTROL_NIEN);
    let changes = rig.irq.level_changes();
    rig.lba28(cmd::CHECK_POWER_MODE, 0, 0);
    assert_eq!(rig.irq.level_changes(), changes);
    assert_eq!(rig.altstatus() & (STATUS_BSY | STATUS_ERR), 0);
    assert_eq!(rig.inb(CMD + REG_NSECTOR), 0xff);
    // Re-enabling shows the still-pending interrupt until the status read.
    rig.outb(CTL, 0);
    assert!(rig.irq.level());
    rig.status();
    assert!(!rig.irq.level());
    for c in [
        cmd::IDLE_IMMEDIATE,
        cmd::STANDBY_IMMEDIATE,
        cmd::IDLE,
        cmd::SLEEP,
    ] {
        rig.lba28(c, 0, 0);
        rig.wait_irq();
        assert_eq!(rig.status() & STATUS_ERR, 0);
    }
}

#[test]
fn chs_addressing_and_initialize_device_parameters() {
    let rig = Rig::new();
    rig.select(0, 0);
    // INITIALIZE DEVICE PARAMETERS: 4 heads (device reg head 3), 32 sectors.
    rig.outb(CMD + REG_NSECTOR, 32);
    rig.outb(CMD + REG_DEVICE, 0xa3);
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::INITIALIZE_DEVICE_PARAMETERS);
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_ERR, 0);
    // C/H/S 2/1/5 → LBA (2*4 + 1)*32 + 4 = 292.
    rig.outb(CMD + REG_NSECTOR, 1);
    rig.outb(CMD + REG_LBA_LOW, 5);
    rig.outb(CMD + REG_LBA_MID, 2);
    rig.outb(CMD + REG_LBA_HIGH, 0);
    rig.outb(CMD + REG_DEVICE, 0xa1);
    rig.outb(CMD + REG_STATUS_COMMAND, cmd::READ_SECTORS);
    rig.wait_irq();
    rig.status();
    assert_eq!(rig.read_block16(512), pattern(292));
}

#[test]
fn read_write_dma_with_prd_table() {
    let rig = Rig::new();
    rig.select(0, 0);
    // Read 3 sectors into two regions: 1024 bytes at 0x10000, 512 at 0x20000.
    let prds = [
        PrdRepr {
            address: 0x10000,
            len: 1024,
            last: false,
        },
        PrdRepr {
            address: 0x20000,
            len: 512,
            last: true,
        },
    ];
    rig.dma(cmd::READ_DMA, 100, 3, &prds, true);
    rig.wait_irq();
    let (bm, st) = rig.dma_intr();
    assert_eq!(
        bm & (BM_STATUS_ACTIVE | BM_STATUS_ERROR | BM_STATUS_INTERRUPT),
        BM_STATUS_INTERRUPT
    );
    assert_eq!(st & (STATUS_BSY | STATUS_DRQ | STATUS_ERR), 0);
    let mut buf = vec![0u8; 512];
    rig.mem.read_slice(&mut buf, GuestAddress(0x10200)).unwrap();
    assert_eq!(buf, pattern(101));
    rig.mem.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
    assert_eq!(buf, pattern(102));
    assert_eq!(rig.inb(BM + BM_STATUS) & BM_STATUS_INTERRUPT, 0, "W1C");
    // Write DMA from memory, then read it back by PIO.
    rig.mem
        .write_slice(&[0xc3; 512], GuestAddress(0x30000))
        .unwrap();
    let prds = [PrdRepr {
        address: 0x30000,
        len: 512,
        last: true,
    }];
    rig.dma(cmd::WRITE_DMA, 7, 1, &prds, false);
    rig.wait_irq();
    let (bm, st) = rig.dma_intr();
    assert_eq!(bm & (BM_STATUS_ACTIVE | BM_STATUS_ERROR), 0);
    assert_eq!(st & STATUS_ERR, 0);
    rig.lba28(cmd::READ_SECTORS, 7, 1);
    rig.wait_irq();
    rig.status();
    assert_eq!(rig.read_block16(512), vec![0xc3; 512]);
    // READ DMA EXT, bus master started before the command (SeaBIOS order).
    rig.mem
        .write_slice(
            &PrdRepr {
                address: 0x40000,
                len: 0,
                last: true,
            }
            .emit(),
            GuestAddress(0x1000),
        )
        .unwrap();
    rig.outl(BM + BM_PRD_TABLE, 0x1000);
    rig.outb(BM + BM_COMMAND, BM_CMD_WRITE_MEMORY | BM_CMD_START);
    rig.lba48(cmd::READ_DMA_EXT, 0, 128);
    rig.wait_irq();
    let (bm, _) = rig.dma_intr();
    assert_eq!(bm & (BM_STATUS_ACTIVE | BM_STATUS_ERROR), 0);
    rig.mem
        .read_slice(&mut buf, GuestAddress(0x40000 + 127 * 512))
        .unwrap();
    assert_eq!(buf, pattern(127));
}

#[test]
fn short_and_long_prd_tables() {
    let rig = Rig::new();
    rig.select(0, 0);
    // Short: the table covers one sector of a two-sector read.
    let prds = [PrdRepr {
        address: 0x10000,
        len: 512,
        last: true,
    }];
    rig.dma(cmd::READ_DMA, 50, 2, &prds, true);
    let bm = rig.inb(BM + BM_STATUS);
    assert_eq!(
        bm & (BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT | BM_STATUS_ERROR),
        0
    );
    assert!(!rig.irq.level(), "no interrupt for a short table");
    let mut buf = vec![0u8; 512];
    rig.mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
    assert_eq!(buf, pattern(50), "what the table covers is transferred");
    rig.outb(BM + BM_COMMAND, BM_CMD_WRITE_MEMORY);
    assert_eq!(rig.altstatus() & STATUS_BSY, 0);
    // Long: a 64 KiB region for a one-sector read: interrupt with active still set.
    let prds = [PrdRepr {
        address: 0x20000,
        len: 0x10000,
        last: true,
    }];
    rig.dma(cmd::READ_DMA, 51, 1, &prds, true);
    rig.wait_irq();
    let (bm, st) = rig.dma_intr();
    assert_eq!(
        bm & (BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT),
        BM_STATUS_ACTIVE | BM_STATUS_INTERRUPT
    );
    assert_eq!(st & STATUS_ERR, 0);
    assert_eq!(
        rig.inb(BM + BM_STATUS) & BM_STATUS_ACTIVE,
        0,
        "stop clears active"
    );
    rig.mem.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
    assert_eq!(buf, pattern(51));
}

#[test]
fn dma_outside_guest_memory_sets_bm_error() {
    let rig = Rig::new();
    rig.select(0, 0);
    let prds = [PrdRepr {
        address: MEM_SIZE as u32 - 256,
        len: 512,
        last: true,
    }];
    rig.dma(cmd::READ_DMA, 0, 1, &prds, true);
    rig.wait_irq();
    let (bm, st) = rig.dma_intr();
    assert_eq!(bm & (BM_STATUS_ERROR | BM_STATUS_ACTIVE), BM_STATUS_ERROR);
    assert_ne!(st & STATUS_ERR, 0);
    assert_eq!(rig.inb(BM + BM_STATUS) & BM_STATUS_ERROR, 0, "W1C");
    // The PRD table itself outside guest memory.
    rig.outl(BM + BM_PRD_TABLE, 0xfff0_0000);
    rig.outb(BM + BM_COMMAND, BM_CMD_WRITE_MEMORY);
    rig.lba28(cmd::WRITE_DMA, 0, 1);
    rig.outb(BM + BM_COMMAND, BM_CMD_WRITE_MEMORY | BM_CMD_START);
    rig.wait_irq();
    let (bm, _) = rig.dma_intr();
    assert_ne!(bm & BM_STATUS_ERROR, 0);
    // Bus mastering disabled in PCI command: the transfer fails the same way.
    rig.cfg_write(0x04, 0x0001);
    let prds = [PrdRepr {
        address: 0x10000,
        len: 512,
        last: true,
    }];
    rig.dma(cmd::READ_DMA, 0, 1, &prds, true);
    rig.wait_irq();
    let (bm, _) = rig.dma_intr();
    assert_ne!(bm & BM_STATUS_ERROR, 0);
}

/// A back-end that holds requests until the test releases them.
struct Gate {
    inner: MemoryBackend,
    held: Mutex<Vec<(Request, Completion)>>,
}

impl Gate {
    fn release(&self) -> usize {
        let held: Vec<_> = std::mem::take(&mut *self.held.lock().unwrap());
        let n = held.len();
        for (req, done) in held {
            let r = self.inner.execute(&req);
            drop(req);
            done.complete(r);
        }
        n
    }
}

impl BlockBackend for Gate {
    fn info(&self) -> BlockInfo {
        self.inner.info()
    }
    fn submit(&self, req: Request, done: Completion) {
        self.held.lock().unwrap().push((req, done));
    }
}

#[test]
fn asynchronous_completion_and_flush() {
    let gate = Arc::new(Gate {
        inner: MemoryBackend::new(DISK_SECTORS * 512),
        held: Mutex::new(Vec::new()),
    });
    let rig = Rig::with_disk(gate.clone());
    rig.select(0, 0);
    // FLUSH CACHE stays busy until the back-end's flush completes.
    rig.lba28(cmd::FLUSH_CACHE, 0, 0);
    assert_eq!(rig.altstatus() & STATUS_BSY, STATUS_BSY);
    assert!(!rig.irq.level());
    assert!(matches!(rig.ide.state(), Err(IdeError::Busy(_))));
    assert_eq!(gate.release(), 1);
    assert!(rig.irq.level());
    assert_eq!(rig.status() & (STATUS_BSY | STATUS_ERR), 0);
    // A PIO read: BSY from the register write until the data arrives.
    rig.lba28(cmd::READ_SECTORS, 0, 1);
    assert_eq!(rig.altstatus() & STATUS_BSY, STATUS_BSY);
    gate.release();
    rig.wait_irq();
    assert_eq!(rig.status() & STATUS_DRQ, STATUS_DRQ);
    rig.read_block16(512);
    // A DMA write stays active until completion; SRST meanwhile drops the
    // stale completion.
    let prds = [PrdRepr {
        address: 0x10000,
        len: 512,
        last: true,
    }];
    rig.dma(cmd::WRITE_DMA, 0, 1, &prds, false);
    assert_eq!(rig.inb(BM + BM_STATUS) & BM_STATUS_ACTIVE, BM_STATUS_ACTIVE);
    rig.outb(CTL, CONTROL_SRST);
    rig.outb(CTL, 0);
    gate.release();
    assert!(!rig.irq.level());
    assert_eq!(rig.altstatus() & (STATUS_BSY | STATUS_DRQ), 0);
    assert!(rig.ide.is_idle());
}

#[test]
fn completions_on_another_thread() {
    let mut data = Vec::new();
    for s in 0..DISK_SECTORS {
        data.extend(pattern(s));
    }
    let pool = ThreadPool::new(MemoryBackend::from_vec(data), 2, "ide-test").unwrap();
    let rig = Rig::with_disk(Arc::new(pool));
    rig.select(0, 0);
    for round in 0..20u64 {
        rig.lba28(cmd::READ_SECTORS, round as u32, 2);
        for s in round..round + 2 {
            rig.wait_irq();
            assert_eq!(rig.status() & STATUS_DRQ, STATUS_DRQ);
            assert_eq!(rig.read_block16(512), pattern(s));
        }
        let prds = [PrdRepr {
            address: 0x10000,
            len: 1024,
            last: true,
        }];
        rig.dma(cmd::READ_DMA, round as u32, 2, &prds, true);
        rig.wait_irq();
        let (bm, st) = rig.dma_intr();
        assert_eq!(bm & (BM_STATUS_ERROR | BM_STATUS_ACTIVE), 0);
        assert_eq!(st & STATUS_ERR, 0);
    }
}

#[test]
fn snapshot_round_trip() {
    let rig = Rig::new();
    rig.select(0, 0);
    rig.lba28(cmd::SET_MULTIPLE_MODE, 0, 8);
    rig.wait_irq();
    rig.outb(BM + BM_STATUS, BM_STATUS_DRIVE0_DMA);
    rig.outl(BM + BM_PRD_TABLE, 0x2000);
    let s = rig.ide.state().unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: IdeState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let other = Rig::new();
    other.ide.restore(&back).unwrap();
    assert_eq!(other.ide.state().unwrap(), s);
    assert!(other.irq.level(), "the pending interrupt is restored");
    assert_eq!(identify(&other)[59], 0x108);
    // Impossible states are refused.
    let mut bad = s.clone();
    bad.channels[0].drives[0].status = STATUS_BSY;
    assert!(other.ide.restore(&bad).is_err());
    let mut bad = s.clone();
    bad.channels[0].drives[0].multiple = 3;
    assert!(other.ide.restore(&bad).is_err());
    let mut bad = s;
    bad.channels.pop();
    assert!(other.ide.restore(&bad).is_err());
    assert!(IdeState::default().channels.len() == 2);
}
