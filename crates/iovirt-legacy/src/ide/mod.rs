//! The PIIX3 IDE controller (PCI 8086:7010, function 00:01.1): two channels
//! in compatibility mode with two drive slots each, ATA hard disks and ATAPI
//! CD-ROMs, PIO and bus-master DMA.
//!
//! # Wiring
//!
//! - The command blocks (0x1F0-0x1F7, 0x170-0x177) and control blocks (0x3F6,
//!   0x376) are fixed ISA-compatible ports: register them with
//!   [`Ide::register_ports`] (or individually with [`Ide::command_block`] and
//!   [`Ide::control_block`]).
//! - The PCI function ([`Ide::pci_function`]) goes on the PCI root at 00:01.1;
//!   its BAR4 (16 bytes of I/O) holds the bus-master registers and is served
//!   through [`iovirt_bus::pci::PciFunction::bar_read`]/`bar_write`, so the root
//!   registers it wherever firmware puts it.
//! - Each channel drives one [`InterruptLine`] with `set_level`: asserted when
//!   the selected device raises INTRQ (and nIEN is clear), deasserted when the
//!   guest reads the status register or issues a command. On a PC these lines
//!   are ISA IRQ 14 and 15, which the interrupt controller sees as edges: a VMM
//!   with an edge-only injection path delivers one edge on each rising level.
//! - DMA reaches guest memory only through [`DmaMemory`] (any
//!   `vm_memory::GuestMemory`, an IOMMU-backed one included): a PRD table or a
//!   buffer outside guest memory sets the bus-master error bit, never panics.
//!
//! # Asynchronous I/O
//!
//! Register accesses never wait for the disk: a command submits its request to
//! the [`BlockBackend`] and returns with BSY set (PIO) or the bus master active
//! (DMA). The completion, on whichever thread the back-end uses (possibly
//! inline inside `submit`), locks the channel, moves the protocol on and raises
//! the interrupt. Each channel has its own lock, and back-ends are only called
//! with no channel lock held, so an inline completion cannot deadlock. FLUSH
//! CACHE completes only when the back-end's [`iovirt_backend::Request::Flush`] has.
//!
//! # Snapshots
//!
//! [`Ide::state`] captures the guest-visible registers and succeeds only when
//! every drive is idle (no command in BSY, DRQ or DMA phase): the VMM pauses
//! the vCPUs and waits until [`Ide::is_idle`] before saving. Back-ends and
//! media are host configuration and are re-attached before [`Ide::restore`].
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_backend::{Inline, MemoryBackend};
//! use iovirt_bus::interrupt::test_doubles::RecordingLine;
//! use iovirt_bus::{AddressSpace, Bus};
//! use iovirt_legacy::ide::{Ide, Slot};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
//! let (irq14, irq15) = (Arc::new(RecordingLine::new()), Arc::new(RecordingLine::new()));
//! let ide = Ide::new(mem, irq14.clone(), irq15);
//! ide.attach_disk(Slot::PRIMARY_MASTER, Arc::new(Inline(MemoryBackend::new(1 << 20)))).unwrap();
//! let pio = Bus::new(AddressSpace::Pio);
//! ide.register_ports(&pio).unwrap();
//!
//! // IDENTIFY DEVICE by PIO, as a BIOS does it.
//! pio.write(0x1f6, &[0xa0]);
//! pio.write(0x1f7, &[0xec]);
//! assert!(irq14.level());
//! let mut status = [0u8];
//! pio.read(0x1f7, &mut status);
//! assert_eq!(status[0] & 0x08, 0x08); // DRQ
//! let mut words = vec![0u16; 256];
//! for w in words.iter_mut() {
//!     let mut b = [0u8; 2];
//!     pio.read(0x1f0, &mut b);
//!     *w = u16::from_le_bytes(b);
//! }
//! assert_eq!(u32::from(words[60]) | u32::from(words[61]) << 16, 2048); // sectors
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iovirt_backend::{BlockBackend, BlockError, Completion, Direction, IoBuffers};
use iovirt_bus::pci::{
    BarSpec, ClassCode, ConfigSpace, PciAddress, PciFunction, PciIdentity, COMMAND,
    COMMAND_BUS_MASTER,
};
use iovirt_bus::{Bus, BusDevice, BusError, InterruptLine};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

mod ata;
mod atapi;
mod channel;
pub mod regs;
pub mod wire;

pub use ata::cmd;
pub use atapi::op as atapi_op;
pub use atapi::{
    ASC_INVALID_FIELD, ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE, ASC_MEDIUM_CHANGED,
    ASC_MEDIUM_NOT_PRESENT, ASC_REMOVAL_PREVENTED, ASC_SAVING_NOT_SUPPORTED, SENSE_ILLEGAL_REQUEST,
    SENSE_MEDIUM_ERROR, SENSE_NOT_READY, SENSE_UNIT_ATTENTION,
};
use channel::{Channel, Drive, Media, Phase, Sense, Submit, Tag, CD_BLOCK, SECTOR};
use regs::*;

/// Intel's PCI vendor ID.
pub const IDE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the 82371SB PIIX3 IDE function.
pub const IDE_DEVICE_ID: u16 = 0x7010;
/// Class code: mass storage, IDE, prog-if 0x80 (both channels in fixed
/// compatibility mode, bus-master capable).
pub const IDE_CLASS: ClassCode = ClassCode {
    class: 0x01,
    subclass: 0x01,
    prog_if: 0x80,
};
/// Where the IDE function lives on a PIIX3 PC.
pub const IDE_ADDRESS: PciAddress = PciAddress {
    bus: 0,
    device: 1,
    function: 1,
};
/// IDE timing registers (IDETIM primary/secondary at 0x40/0x42, SIDETIM at 0x44):
/// plain storage, as timing means nothing to an emulated drive.
pub const IDETIM: u16 = 0x40;
/// Largest READ/WRITE MULTIPLE block in sectors (IDENTIFY word 47).
pub const MAX_MULTIPLE: u8 = 16;
/// Firmware revision reported in IDENTIFY and INQUIRY.
pub const FIRMWARE_REVISION: &str = "0.1";

/// Guest memory as the bus master sees it.
///
/// Implemented for every `Arc<M>` with `M: vm_memory::GuestMemory`; a VMM with
/// hot-pluggable memory or an IOMMU implements it over its own address space.
pub trait DmaMemory: Send + Sync {
    /// Resolve scatter-gather `ranges` for a transfer in direction `dir`.
    fn buffers(
        &self,
        ranges: &[(GuestAddress, usize)],
        dir: Direction,
    ) -> Result<IoBuffers, BlockError>;
    /// Read the 8-byte PRD entry at `addr`; `None` if it is not guest memory.
    fn read_prd(&self, addr: GuestAddress) -> Option<[u8; 8]>;
}

impl<M: GuestMemory + Send + Sync + 'static> DmaMemory for Arc<M> {
    fn buffers(
        &self,
        ranges: &[(GuestAddress, usize)],
        dir: Direction,
    ) -> Result<IoBuffers, BlockError> {
        IoBuffers::from_guest(self.clone(), ranges, dir)
    }
    fn read_prd(&self, addr: GuestAddress) -> Option<[u8; 8]> {
        let mut b = [0u8; 8];
        self.read_slice(&mut b, addr).ok().map(|_| b)
    }
}

/// A drive position: channel 0 (primary) or 1 (secondary), unit 0 (master) or 1 (slave).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Slot {
    /// Channel: 0 primary, 1 secondary.
    pub channel: usize,
    /// Unit: 0 master, 1 slave.
    pub unit: usize,
}

impl Slot {
    /// Primary master (hda).
    pub const PRIMARY_MASTER: Slot = Slot {
        channel: 0,
        unit: 0,
    };
    /// Primary slave (hdb).
    pub const PRIMARY_SLAVE: Slot = Slot {
        channel: 0,
        unit: 1,
    };
    /// Secondary master (hdc, where PCs usually have the CD-ROM).
    pub const SECONDARY_MASTER: Slot = Slot {
        channel: 1,
        unit: 0,
    };
    /// Secondary slave (hdd).
    pub const SECONDARY_SLAVE: Slot = Slot {
        channel: 1,
        unit: 1,
    };
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ide{}.{}", self.channel, self.unit)
    }
}

/// Errors attaching drives, changing media and restoring state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdeError {
    /// The slot does not exist.
    #[error("no IDE slot {0}: channel and unit must be 0 or 1")]
    NoSlot(Slot),
    /// The back-end's logical block size does not suit the drive.
    #[error("{slot}: back-end has {actual}-byte blocks, the drive needs {expected}")]
    BlockSize {
        /// The slot.
        slot: Slot,
        /// Block size the drive needs.
        expected: u32,
        /// Block size of the back-end.
        actual: u32,
    },
    /// Media change on a slot without a CD-ROM drive.
    #[error("{0} is not a CD-ROM drive")]
    NotCdrom(Slot),
    /// The guest has locked the tray (PREVENT MEDIUM REMOVAL).
    #[error("{0}: the guest prevents medium removal")]
    Locked(Slot),
    /// A command is in progress, so the state is not a register snapshot.
    #[error("{0} has a command in progress; snapshot only when idle")]
    Busy(Slot),
    /// Saved state holds a value the hardware cannot.
    #[error("invalid IDE state: {0}")]
    InvalidState(String),
}

/// One channel's shared core: the lock, and what completions need.
struct ChannelShared {
    ch: Mutex<Channel>,
}

impl ChannelShared {
    fn lock(&self) -> MutexGuard<'_, Channel> {
        self.ch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` under the lock, then hand queued requests to the back-ends
    /// with the lock released.
    fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut Channel) -> R) -> R {
        let (r, out) = {
            let mut ch = self.lock();
            let r = f(&mut ch);
            (r, std::mem::take(&mut ch.out))
        };
        self.dispatch(out);
        r
    }

    fn dispatch(self: &Arc<Self>, out: Vec<Submit>) {
        for s in out {
            let me = Arc::downgrade(self);
            let tag: Tag = s.tag;
            s.backend.submit(
                s.req,
                Completion::new(move |r| {
                    if let Some(me) = me.upgrade() {
                        me.with(|ch| ch.complete(tag, r));
                    }
                }),
            );
        }
    }
}

/// Which register block of a channel a port device serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Command,
    Control,
}

/// A channel's command or control block as a bus device.
struct Ports {
    shared: Arc<ChannelShared>,
    block: Block,
}

impl BusDevice for Ports {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.shared.with(|ch| match self.block {
            Block::Control => {
                let s = ch.alt_status();
                data.fill(s);
            }
            Block::Command if offset == REG_DATA => ch.read_data(data),
            Block::Command => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = ch.read_reg(offset + i as u64);
                }
            }
        })
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.shared.with(|ch| match self.block {
            Block::Control => {
                if let Some(v) = data.first() {
                    ch.write_control(*v);
                }
            }
            Block::Command if offset == REG_DATA => ch.write_data(data),
            Block::Command => {
                for (i, v) in data.iter().enumerate() {
                    ch.write_reg(offset + i as u64, *v);
                }
            }
        })
    }
}

struct Shared {
    channels: [Arc<ChannelShared>; 2],
    bus_master: AtomicBool,
}

/// The IDE controller: a cheap handle shared by the port devices, the PCI
/// function and the VMM (for media changes and snapshots).
#[derive(Clone)]
pub struct Ide {
    shared: Arc<Shared>,
}

impl fmt::Debug for Ide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ide")
            .field("idle", &self.is_idle())
            .finish()
    }
}

impl Ide {
    /// A controller with empty slots whose bus master reaches `mem`, raising
    /// `irq14` for the primary and `irq15` for the secondary channel.
    pub fn new<M: GuestMemory + Send + Sync + 'static>(
        mem: Arc<M>,
        irq14: Arc<dyn InterruptLine>,
        irq15: Arc<dyn InterruptLine>,
    ) -> Self {
        Self::with_dma_memory(Arc::new(mem), irq14, irq15)
    }

    /// Like [`Ide::new`] with a custom view of guest memory.
    pub fn with_dma_memory(
        dma: Arc<dyn DmaMemory>,
        irq14: Arc<dyn InterruptLine>,
        irq15: Arc<dyn InterruptLine>,
    ) -> Self {
        let mk = |i, irq| {
            Arc::new(ChannelShared {
                ch: Mutex::new(Channel::new(i, irq, dma.clone())),
            })
        };
        Ide {
            shared: Arc::new(Shared {
                channels: [mk(0, irq14), mk(1, irq15)],
                bus_master: AtomicBool::new(false),
            }),
        }
    }

    fn channel(&self, slot: Slot) -> Result<&Arc<ChannelShared>, IdeError> {
        if slot.unit > 1 {
            return Err(IdeError::NoSlot(slot));
        }
        self.shared
            .channels
            .get(slot.channel)
            .ok_or(IdeError::NoSlot(slot))
    }

    /// Attach an ATA hard disk (the back-end needs 512-byte logical blocks).
    /// Call before the guest runs; the drive comes up as after power-on.
    pub fn attach_disk(&self, slot: Slot, backend: Arc<dyn BlockBackend>) -> Result<(), IdeError> {
        check_block(slot, &*backend, SECTOR as u32)?;
        self.channel(slot)?.with(|ch| {
            ch.drives[slot.unit] = Drive::new(Media::Disk(backend));
            ch.update_line();
        });
        Ok(())
    }

    /// Attach an ATAPI CD-ROM drive, with a disc (2048-byte blocks, e.g. from
    /// [`iovirt_backend::open_image`]) or empty.
    pub fn attach_cdrom(
        &self,
        slot: Slot,
        disc: Option<Arc<dyn BlockBackend>>,
    ) -> Result<(), IdeError> {
        if let Some(b) = &disc {
            check_block(slot, &**b, CD_BLOCK as u32)?;
        }
        self.channel(slot)?.with(|ch| {
            ch.drives[slot.unit] = Drive::new(Media::Cdrom(disc));
            ch.update_line();
        });
        Ok(())
    }

    /// Host-side disc change: insert `disc` into the CD-ROM at `slot`. The guest
    /// sees UNIT ATTENTION / MEDIUM MAY HAVE CHANGED (06/28/00) on its next
    /// command and a new-media event in GET EVENT STATUS NOTIFICATION.
    pub fn insert_media(&self, slot: Slot, disc: Arc<dyn BlockBackend>) -> Result<(), IdeError> {
        check_block(slot, &*disc, CD_BLOCK as u32)?;
        self.channel(slot)?.with(|ch| {
            let d = &mut ch.drives[slot.unit];
            if !d.is_atapi() {
                return Err(IdeError::NotCdrom(slot));
            }
            d.media = Media::Cdrom(Some(disc));
            d.unit_attention = true;
            d.media_event = atapi::EVENT_NEW_MEDIA;
            Ok(())
        })
    }

    /// Host-side eject: remove the disc from the CD-ROM at `slot`, unless the
    /// guest locked the tray. A command in flight finishes on the old disc.
    pub fn eject_media(&self, slot: Slot) -> Result<(), IdeError> {
        self.channel(slot)?.with(|ch| {
            let d = &mut ch.drives[slot.unit];
            if !d.is_atapi() {
                return Err(IdeError::NotCdrom(slot));
            }
            if d.locked {
                return Err(IdeError::Locked(slot));
            }
            if d.cd_blocks().is_some() {
                d.media = Media::Cdrom(None);
                d.unit_attention = true;
                d.media_event = atapi::EVENT_MEDIA_REMOVAL;
            }
            Ok(())
        })
    }

    /// Whether a disc is in the CD-ROM at `slot` (false for other drives).
    pub fn has_media(&self, slot: Slot) -> bool {
        self.channel(slot)
            .map(|c| c.lock().drives[slot.unit].cd_blocks().is_some())
            .unwrap_or(false)
    }

    /// The command block of `channel` (8 ports) as a bus device.
    pub fn command_block(&self, channel: usize) -> Option<Arc<dyn BusDevice>> {
        let shared = self.shared.channels.get(channel)?.clone();
        Some(Arc::new(Ports {
            shared,
            block: Block::Command,
        }))
    }

    /// The control block of `channel` (alternate status / device control, 1 port).
    pub fn control_block(&self, channel: usize) -> Option<Arc<dyn BusDevice>> {
        let shared = self.shared.channels.get(channel)?.clone();
        Some(Arc::new(Ports {
            shared,
            block: Block::Control,
        }))
    }

    /// Register both channels' compatibility ports on `pio` as `ide0-cmd`,
    /// `ide0-ctl`, `ide1-cmd` and `ide1-ctl`.
    pub fn register_ports(&self, pio: &Bus) -> Result<(), BusError> {
        let ranges = [
            (
                "ide0-cmd",
                PRIMARY_COMMAND_BASE,
                COMMAND_BLOCK_LEN,
                0,
                Block::Command,
            ),
            (
                "ide0-ctl",
                PRIMARY_CONTROL_BASE,
                CONTROL_BLOCK_LEN,
                0,
                Block::Control,
            ),
            (
                "ide1-cmd",
                SECONDARY_COMMAND_BASE,
                COMMAND_BLOCK_LEN,
                1,
                Block::Command,
            ),
            (
                "ide1-ctl",
                SECONDARY_CONTROL_BASE,
                CONTROL_BLOCK_LEN,
                1,
                Block::Control,
            ),
        ];
        for (name, base, len, ch, block) in ranges {
            let dev = Arc::new(Ports {
                shared: self.shared.channels[ch].clone(),
                block,
            });
            pio.insert(name, base, len, dev)?;
        }
        Ok(())
    }

    /// The PCI function (00:01.1) with BAR4, sharing this controller.
    pub fn pci_function(&self) -> IdePci {
        IdePci::new(self.clone())
    }

    /// Read bus-master register bytes at `offset` into BAR4 (what the PCI
    /// function's `bar_read` does).
    pub fn bm_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let reg = offset + i as u64;
            *b = match self.shared.channels.get((reg / BM_CHANNEL_LEN) as usize) {
                Some(c) => c.lock().bm_read(reg % BM_CHANNEL_LEN),
                None => 0xff,
            };
        }
    }

    /// Write bus-master register bytes at `offset` into BAR4. Setting the
    /// start bit starts a waiting DMA command.
    pub fn bm_write(&self, offset: u64, data: &[u8]) {
        let enabled = self.shared.bus_master.load(Ordering::SeqCst);
        for (i, v) in data.iter().enumerate() {
            let reg = offset + i as u64;
            if let Some(c) = self.shared.channels.get((reg / BM_CHANNEL_LEN) as usize) {
                c.with(|ch| {
                    ch.bus_master_enabled = enabled;
                    ch.bm_write(reg % BM_CHANNEL_LEN, *v)
                });
            }
        }
    }

    /// Whether every drive is idle (no command between issue and completion).
    pub fn is_idle(&self) -> bool {
        self.shared
            .channels
            .iter()
            .all(|c| c.lock().drives.iter().all(|d| d.phase.is_idle()))
    }

    /// Whether channel `channel`'s interrupt line is asserted.
    pub fn irq_level(&self, channel: usize) -> bool {
        self.shared
            .channels
            .get(channel)
            .is_some_and(|c| c.lock().line_level())
    }

    /// The guest-visible state; fails with [`IdeError::Busy`] unless idle.
    pub fn state(&self) -> Result<IdeState, IdeError> {
        let mut channels = Vec::with_capacity(2);
        for (ci, c) in self.shared.channels.iter().enumerate() {
            let ch = c.lock();
            let mut drives = Vec::with_capacity(2);
            for (ui, d) in ch.drives.iter().enumerate() {
                if !d.phase.is_idle() {
                    return Err(IdeError::Busy(Slot {
                        channel: ci,
                        unit: ui,
                    }));
                }
                drives.push(DriveState::of(d));
            }
            channels.push(ChannelState {
                device: ch.device,
                control: ch.control,
                bm_command: ch.bm.command,
                bm_status: ch.bm.status,
                bm_prd: ch.bm.prd,
                drives,
            });
        }
        Ok(IdeState { channels })
    }

    /// Restore registers saved by [`Ide::state`] onto this controller, whose
    /// drives must already be attached as when the state was taken.
    pub fn restore(&self, state: &IdeState) -> Result<(), IdeError> {
        state.validate()?;
        for (c, cs) in self.shared.channels.iter().zip(&state.channels) {
            let mut ch = c.lock();
            ch.device = cs.device;
            ch.control = cs.control;
            ch.bm.command = cs.bm_command;
            ch.bm.status = cs.bm_status;
            ch.bm.prd = cs.bm_prd;
            for (d, ds) in ch.drives.iter_mut().zip(&cs.drives) {
                ds.apply(d);
            }
            ch.update_line();
        }
        Ok(())
    }
}

fn check_block(slot: Slot, b: &dyn BlockBackend, expected: u32) -> Result<(), IdeError> {
    let actual = b.info().logical_block_size;
    if actual != expected {
        return Err(IdeError::BlockSize {
            slot,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Guest-visible task-file registers of one drive (both FIFO levels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskfileState {
    /// Features (current, previous).
    pub feature: [u8; 2],
    /// Sector count (current, previous).
    pub nsector: [u8; 2],
    /// LBA low (current, previous).
    pub lba_low: [u8; 2],
    /// LBA mid (current, previous).
    pub lba_mid: [u8; 2],
    /// LBA high (current, previous).
    pub lba_high: [u8; 2],
}

/// Guest-visible state of one drive slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveState {
    /// Task-file registers.
    pub taskfile: TaskfileState,
    /// Status register.
    pub status: u8,
    /// Error register.
    pub error: u8,
    /// INTRQ pending.
    pub irq_pending: bool,
    /// READ/WRITE MULTIPLE block size (0 = disabled).
    pub multiple: u8,
    /// Transfer mode from SET FEATURES 03h.
    pub transfer_mode: u8,
    /// Volatile write cache enabled.
    pub write_cache: bool,
    /// CHS heads (INITIALIZE DEVICE PARAMETERS).
    pub heads: u8,
    /// CHS sectors per track.
    pub sectors_per_track: u8,
    /// ATAPI sense key, ASC, ASCQ.
    pub sense: [u8; 3],
    /// ATAPI unit attention pending.
    pub unit_attention: bool,
    /// ATAPI tray locked by PREVENT MEDIUM REMOVAL.
    pub locked: bool,
    /// ATAPI media event not yet reported.
    pub media_event: u8,
}

impl DriveState {
    fn of(d: &Drive) -> Self {
        let r = &d.regs;
        DriveState {
            taskfile: TaskfileState {
                feature: [r.feature, r.hob_feature],
                nsector: [r.nsector, r.hob_nsector],
                lba_low: [r.lbal, r.hob_lbal],
                lba_mid: [r.lbam, r.hob_lbam],
                lba_high: [r.lbah, r.hob_lbah],
            },
            status: d.status,
            error: d.error,
            irq_pending: d.irq,
            multiple: d.multiple,
            transfer_mode: d.xfer_mode,
            write_cache: d.write_cache,
            heads: d.heads,
            sectors_per_track: d.sectors,
            sense: [d.sense.key, d.sense.asc, d.sense.ascq],
            unit_attention: d.unit_attention,
            locked: d.locked,
            media_event: d.media_event,
        }
    }

    fn apply(&self, d: &mut Drive) {
        let t = &self.taskfile;
        d.regs = channel::Taskfile {
            feature: t.feature[0],
            hob_feature: t.feature[1],
            nsector: t.nsector[0],
            hob_nsector: t.nsector[1],
            lbal: t.lba_low[0],
            hob_lbal: t.lba_low[1],
            lbam: t.lba_mid[0],
            hob_lbam: t.lba_mid[1],
            lbah: t.lba_high[0],
            hob_lbah: t.lba_high[1],
        };
        d.gen = d.gen.wrapping_add(1);
        d.phase = Phase::Idle;
        d.status = self.status;
        d.error = self.error;
        d.irq = self.irq_pending;
        d.multiple = self.multiple;
        d.xfer_mode = self.transfer_mode;
        d.write_cache = self.write_cache;
        d.heads = self.heads;
        d.sectors = self.sectors_per_track;
        d.sense = Sense {
            key: self.sense[0],
            asc: self.sense[1],
            ascq: self.sense[2],
        };
        d.unit_attention = self.unit_attention;
        d.locked = self.locked;
        d.media_event = self.media_event;
    }
}

/// Guest-visible state of one channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// Device register.
    pub device: u8,
    /// Device control register.
    pub control: u8,
    /// Bus-master command register.
    pub bm_command: u8,
    /// Bus-master status register.
    pub bm_status: u8,
    /// Bus-master PRD table pointer.
    pub bm_prd: u32,
    /// Master and slave.
    pub drives: Vec<DriveState>,
}

/// Guest-visible state of the controller (both channels), taken when idle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdeState {
    /// Primary and secondary channel.
    pub channels: Vec<ChannelState>,
}

impl Default for IdeState {
    /// Power-on state with no drives attached.
    fn default() -> Self {
        let d = |_| DriveState::of(&Drive::new(Media::None));
        let c = |_| ChannelState {
            device: DEVICE_OBSOLETE,
            control: 0,
            bm_command: 0,
            bm_status: 0,
            bm_prd: 0,
            drives: (0..2).map(d).collect(),
        };
        IdeState {
            channels: (0..2).map(c).collect(),
        }
    }
}

impl IdeState {
    fn validate(&self) -> Result<(), IdeError> {
        let bad = |s: String| Err(IdeError::InvalidState(s));
        if self.channels.len() != 2 {
            return bad(format!("{} channels, expected 2", self.channels.len()));
        }
        for (ci, c) in self.channels.iter().enumerate() {
            if c.drives.len() != 2 {
                return bad(format!(
                    "channel {ci} has {} drives, expected 2",
                    c.drives.len()
                ));
            }
            if c.device & DEVICE_OBSOLETE != DEVICE_OBSOLETE {
                return bad(format!("channel {ci} device register {:#04x}", c.device));
            }
            if c.bm_command & !BM_CMD_MASK != 0 {
                return bad(format!(
                    "channel {ci} bus-master command {:#04x}",
                    c.bm_command
                ));
            }
            if c.bm_status & !(BM_STATUS_RW | BM_STATUS_W1C | BM_STATUS_ACTIVE) != 0 {
                return bad(format!(
                    "channel {ci} bus-master status {:#04x}",
                    c.bm_status
                ));
            }
            if c.bm_status & BM_STATUS_ACTIVE != 0 && c.bm_command & BM_CMD_START == 0 {
                return bad(format!("channel {ci} bus master active while stopped"));
            }
            if c.bm_prd & 3 != 0 {
                return bad(format!(
                    "channel {ci} PRD pointer {:#x} not dword aligned",
                    c.bm_prd
                ));
            }
            for (ui, d) in c.drives.iter().enumerate() {
                // BSY alone is what a device shows while SRST is held.
                let in_reset = c.control & CONTROL_SRST != 0 && d.status == STATUS_BSY;
                if d.status & (STATUS_BSY | STATUS_DRQ) != 0 && !in_reset {
                    return bad(format!(
                        "drive {ci}.{ui} status {:#04x} shows a command in progress",
                        d.status
                    ));
                }
                if d.multiple > MAX_MULTIPLE || (d.multiple != 0 && !d.multiple.is_power_of_two()) {
                    return bad(format!("drive {ci}.{ui} multiple count {}", d.multiple));
                }
                if !ata::valid_transfer_mode(d.transfer_mode) {
                    return bad(format!(
                        "drive {ci}.{ui} transfer mode {:#04x}",
                        d.transfer_mode
                    ));
                }
                if d.heads == 0 || d.heads > 16 || d.sectors_per_track == 0 {
                    return bad(format!(
                        "drive {ci}.{ui} geometry {}/{}",
                        d.heads, d.sectors_per_track
                    ));
                }
                if d.sense[0] > 0x0f {
                    return bad(format!("drive {ci}.{ui} sense key {:#x}", d.sense[0]));
                }
            }
        }
        Ok(())
    }
}

/// The PIIX3 IDE PCI function: identity, IDETIM registers and BAR4.
pub struct IdePci {
    config: ConfigSpace,
    ide: Ide,
}

impl fmt::Debug for IdePci {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdePci").field("ide", &self.ide).finish()
    }
}

impl IdePci {
    fn new(ide: Ide) -> Self {
        let mut config = ConfigSpace::new(&PciIdentity {
            vendor_id: IDE_VENDOR_ID,
            device_id: IDE_DEVICE_ID,
            class: IDE_CLASS,
            revision: 0,
            subsystem_vendor_id: crate::chipset::QEMU_SUBSYSTEM_VENDOR_ID,
            subsystem_id: crate::chipset::QEMU_SUBSYSTEM_ID,
            multi_function: false,
        });
        // BAR4 is the only BAR in compatibility mode; a 16-byte I/O BAR is always valid.
        if let Err(e) = config.add_bar(BM_BAR, BarSpec::io(BM_BAR_SIZE)) {
            log::error!("ide: BAR4: {e}");
        }
        config.set_writable_mask(IDETIM, &[0xff; 5]);
        IdePci { config, ide }
    }

    /// The controller this function belongs to.
    pub fn ide(&self) -> &Ide {
        &self.ide
    }

    fn sync_bus_master(&self) {
        let on = self.config.read_u16(COMMAND) & COMMAND_BUS_MASTER != 0;
        self.ide.shared.bus_master.store(on, Ordering::SeqCst);
    }

    /// The config space bytes, for snapshots.
    pub fn config_state(&self) -> Vec<u8> {
        self.config.bytes().to_vec()
    }

    /// Restore config space bytes saved by [`IdePci::config_state`]; the VMM
    /// then calls `PciRoot::refresh_bars`.
    pub fn restore_config(&mut self, saved: &[u8]) -> Result<(), IdeError> {
        self.config
            .restore(saved)
            .map_err(|e| IdeError::InvalidState(e.to_string()))?;
        self.sync_bus_master();
        Ok(())
    }
}

impl PciFunction for IdePci {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.sync_bus_master();
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == BM_BAR {
            self.ide.bm_read(offset, data)
        } else {
            data.fill(0xff)
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == BM_BAR {
            self.ide.bm_write(offset, data)
        }
    }
}
