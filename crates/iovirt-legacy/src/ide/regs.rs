//! Register offsets and bits of the ATA task file and the bus-master IDE
//! function, named as in ATA/ATAPI-8 and the PIIX3 datasheet.

/// Command block: data register (16-bit PIO; 32-bit accesses move two words).
pub const REG_DATA: u64 = 0;
/// Command block: error (read) / features (write).
pub const REG_ERROR_FEATURES: u64 = 1;
/// Command block: sector count; ATAPI interrupt reason on reads.
pub const REG_NSECTOR: u64 = 2;
/// Command block: LBA bits 7:0 (sector number in CHS mode).
pub const REG_LBA_LOW: u64 = 3;
/// Command block: LBA bits 15:8 (cylinder low; ATAPI byte count low).
pub const REG_LBA_MID: u64 = 4;
/// Command block: LBA bits 23:16 (cylinder high; ATAPI byte count high).
pub const REG_LBA_HIGH: u64 = 5;
/// Command block: device/head (DEV bit 4, LBA bit 6, LBA 27:24 or head).
pub const REG_DEVICE: u64 = 6;
/// Command block: status (read, clears INTRQ) / command (write).
pub const REG_STATUS_COMMAND: u64 = 7;
/// Number of command-block ports.
pub const COMMAND_BLOCK_LEN: u64 = 8;
/// Number of control-block ports claimed (alternate status / device control).
pub const CONTROL_BLOCK_LEN: u64 = 1;

/// Primary channel command block base (0x1F0-0x1F7).
pub const PRIMARY_COMMAND_BASE: u64 = 0x1f0;
/// Primary channel control block (alternate status / device control at 0x3F6).
pub const PRIMARY_CONTROL_BASE: u64 = 0x3f6;
/// Secondary channel command block base (0x170-0x177).
pub const SECONDARY_COMMAND_BASE: u64 = 0x170;
/// Secondary channel control block (0x376).
pub const SECONDARY_CONTROL_BASE: u64 = 0x376;
/// ISA IRQ of the primary channel in compatibility mode.
pub const PRIMARY_IRQ: u8 = 14;
/// ISA IRQ of the secondary channel in compatibility mode.
pub const SECONDARY_IRQ: u8 = 15;

/// Status: the device is busy; all other bits are invalid while set.
pub const STATUS_BSY: u8 = 0x80;
/// Status: device ready to accept commands.
pub const STATUS_DRDY: u8 = 0x40;
/// Status: device fault.
pub const STATUS_DF: u8 = 0x20;
/// Status: seek complete (obsolete, still set by drives and expected by old BIOSes).
pub const STATUS_DSC: u8 = 0x10;
/// Status: data request, the device is ready to transfer a word or byte of data.
pub const STATUS_DRQ: u8 = 0x08;
/// Status: the previous command ended in an error; see the error register.
pub const STATUS_ERR: u8 = 0x01;

/// Error: interface CRC error.
pub const ERROR_ICRC: u8 = 0x80;
/// Error: uncorrectable data error.
pub const ERROR_UNC: u8 = 0x40;
/// Error: the requested address was not found (out of range).
pub const ERROR_IDNF: u8 = 0x10;
/// Error: command aborted (unsupported command or parameter).
pub const ERROR_ABRT: u8 = 0x04;
/// Error: after EXECUTE DEVICE DIAGNOSTIC or reset, "device 0 passed".
pub const ERROR_DIAG_PASSED: u8 = 0x01;

/// Device register: the device select bit (0 = master, 1 = slave).
pub const DEVICE_DEV: u8 = 0x10;
/// Device register: LBA addressing (otherwise CHS).
pub const DEVICE_LBA: u8 = 0x40;
/// Device register: obsolete bits 7 and 5 that read as one.
pub const DEVICE_OBSOLETE: u8 = 0xa0;

/// Device control: nIEN, the device does not drive INTRQ.
pub const CONTROL_NIEN: u8 = 0x02;
/// Device control: SRST, software reset of both devices on the channel.
pub const CONTROL_SRST: u8 = 0x04;
/// Device control: HOB, reads return the previous ("high order byte") values.
pub const CONTROL_HOB: u8 = 0x80;

/// ATAPI interrupt reason (sector count register): command/data (1 = command packet).
pub const IREASON_COD: u8 = 0x01;
/// ATAPI interrupt reason: I/O direction (1 = to the host).
pub const IREASON_IO: u8 = 0x02;

/// Bus-master register block size per channel; BAR4 holds two of them.
pub const BM_CHANNEL_LEN: u64 = 8;
/// Size of BAR4, the bus-master I/O BAR.
pub const BM_BAR_SIZE: u64 = 16;
/// Index of the bus-master BAR.
pub const BM_BAR: u8 = 4;
/// Bus-master register: command (start/stop, read/write control).
pub const BM_COMMAND: u64 = 0;
/// Bus-master register: status (active, error, interrupt, DMA-capable bits).
pub const BM_STATUS: u64 = 2;
/// Bus-master register: PRD table pointer (dword aligned), bytes 4..8.
pub const BM_PRD_TABLE: u64 = 4;
/// Bus-master command: start bus-master operation.
pub const BM_CMD_START: u8 = 0x01;
/// Bus-master command: read/write control (1 = the bus master writes memory, a disk read).
pub const BM_CMD_WRITE_MEMORY: u8 = 0x08;
/// Bus-master command: bits that exist.
pub const BM_CMD_MASK: u8 = BM_CMD_START | BM_CMD_WRITE_MEMORY;
/// Bus-master status: bus-master IDE active (cleared at end of the PRD table or on stop).
pub const BM_STATUS_ACTIVE: u8 = 0x01;
/// Bus-master status: error while transferring (write one to clear).
pub const BM_STATUS_ERROR: u8 = 0x02;
/// Bus-master status: the IDE device asserted its interrupt (write one to clear).
pub const BM_STATUS_INTERRUPT: u8 = 0x04;
/// Bus-master status: drive 0 is DMA capable (software-set flag).
pub const BM_STATUS_DRIVE0_DMA: u8 = 0x20;
/// Bus-master status: drive 1 is DMA capable (software-set flag).
pub const BM_STATUS_DRIVE1_DMA: u8 = 0x40;
/// Bus-master status: bits a guest may set.
pub const BM_STATUS_RW: u8 = BM_STATUS_DRIVE0_DMA | BM_STATUS_DRIVE1_DMA;
/// Bus-master status: write-one-to-clear bits.
pub const BM_STATUS_W1C: u8 = BM_STATUS_ERROR | BM_STATUS_INTERRUPT;
