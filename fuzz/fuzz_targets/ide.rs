//! Fuzz the PIIX3 IDE controller: arbitrary register accesses on both
//! channels' command and control blocks and the bus-master BAR, PRD tables
//! and data in guest memory, host media changes and snapshots, against a
//! memory-backed disk and CD. It must never panic, and DMA must stay inside
//! guest memory (vm-memory refuses the rest; the BM error bit reports it).
#![no_main]
use std::sync::Arc;

use arbitrary::Arbitrary;
use iovirt_backend::{
    BlockBackend, BlockInfo, BlockResult, Inline, IoBuffers, MemoryBackend, SyncBackend,
};
use iovirt_bus::interrupt::test_doubles::RecordingLine;
use iovirt_bus::pci::PciFunction;
use iovirt_legacy::ide::wire::PrdRepr;
use iovirt_legacy::ide::{Ide, Slot};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 256 * 1024;

/// A memory disc with 2048-byte blocks.
struct Disc(MemoryBackend);

impl SyncBackend for Disc {
    fn info(&self) -> BlockInfo {
        BlockInfo {
            logical_block_size: 2048,
            ..self.0.info()
        }
    }
    fn read_at(&self, offset: u64, buf: &IoBuffers) -> BlockResult {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &IoBuffers, fua: bool) -> BlockResult {
        self.0.write_at(offset, buf, fua)
    }
    fn flush(&self) -> BlockResult {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// IN from a command-block register (channel, offset 0..8, width 1/2/4).
    CmdRead {
        ch: bool,
        offset: u8,
        width: u8,
    },
    /// OUT to a command-block register.
    CmdWrite {
        ch: bool,
        offset: u8,
        value: u32,
        width: u8,
    },
    /// A run of data-register reads (a whole sector's worth, say).
    DataRead {
        ch: bool,
        words: u16,
    },
    /// A run of data-register writes.
    DataWrite {
        ch: bool,
        words: u16,
        value: u16,
    },
    /// Alternate status read / device control write.
    CtlRead {
        ch: bool,
    },
    CtlWrite {
        ch: bool,
        value: u8,
    },
    /// Bus-master BAR accesses.
    BmRead {
        offset: u8,
        width: u8,
    },
    BmWrite {
        offset: u8,
        value: u32,
        width: u8,
    },
    /// A PRD entry in guest memory.
    Prd {
        index: u8,
        address: u32,
        len: u32,
        last: bool,
    },
    /// PCI config write (command register: bus master on/off).
    Config {
        offset: u8,
        value: u16,
    },
    /// Host media changes.
    Insert,
    Eject,
    /// Snapshot and restore.
    Snapshot,
}

fn width(w: u8) -> usize {
    match w % 3 {
        0 => 1,
        1 => 2,
        _ => 4,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
    let ide = Ide::new(
        mem.clone(),
        Arc::new(RecordingLine::new()),
        Arc::new(RecordingLine::new()),
    );
    let disk: Arc<dyn BlockBackend> = Arc::new(Inline(MemoryBackend::new(64 * 1024)));
    let cd = || -> Arc<dyn BlockBackend> { Arc::new(Inline(Disc(MemoryBackend::new(16 * 2048)))) };
    ide.attach_disk(Slot::PRIMARY_MASTER, disk.clone()).unwrap();
    ide.attach_disk(Slot::PRIMARY_SLAVE, disk).unwrap();
    ide.attach_cdrom(Slot::SECONDARY_MASTER, Some(cd()))
        .unwrap();
    let mut pci = ide.pci_function();
    pci.config_write(4, &[0x05, 0]);
    let cmd = [ide.command_block(0).unwrap(), ide.command_block(1).unwrap()];
    let ctl = [ide.control_block(0).unwrap(), ide.control_block(1).unwrap()];
    let mut buf = [0u8; 4];
    for op in ops.into_iter().take(4096) {
        match op {
            Op::CmdRead {
                ch,
                offset,
                width: w,
            } => {
                let w = width(w);
                let off = u64::from(offset % 8);
                if off + w as u64 <= 8 {
                    cmd[usize::from(ch)].read(off, &mut buf[..w]);
                }
            }
            Op::CmdWrite {
                ch,
                offset,
                value,
                width: w,
            } => {
                let w = width(w);
                let off = u64::from(offset % 8);
                if off + w as u64 <= 8 {
                    cmd[usize::from(ch)].write(off, &value.to_le_bytes()[..w]);
                }
            }
            Op::DataRead { ch, words } => {
                for _ in 0..words % 2048 {
                    cmd[usize::from(ch)].read(0, &mut buf[..2]);
                }
            }
            Op::DataWrite { ch, words, value } => {
                for _ in 0..words % 2048 {
                    cmd[usize::from(ch)].write(0, &value.to_le_bytes());
                }
            }
            Op::CtlRead { ch } => ctl[usize::from(ch)].read(0, &mut buf[..1]),
            Op::CtlWrite { ch, value } => ctl[usize::from(ch)].write(0, &[value]),
            Op::BmRead { offset, width: w } => {
                let w = width(w);
                let off = u64::from(offset % 16);
                if off + w as u64 <= 16 {
                    pci.bar_read(4, off, &mut buf[..w]);
                }
            }
            Op::BmWrite {
                offset,
                value,
                width: w,
            } => {
                let w = width(w);
                let off = u64::from(offset % 16);
                if off + w as u64 <= 16 {
                    pci.bar_write(4, off, &value.to_le_bytes()[..w]);
                }
            }
            Op::Prd {
                index,
                address,
                len,
                last,
            } => {
                // Tables live in the first 4 KiB; addresses may point anywhere.
                let e = PrdRepr {
                    address,
                    len: len & 0x1_ffff,
                    last,
                };
                let _ = mem.write_slice(&e.emit(), GuestAddress(u64::from(index) * 8));
            }
            Op::Config { offset, value } => {
                let off = u16::from(offset & 0xfe);
                pci.config_write(off, &value.to_le_bytes());
            }
            Op::Insert => {
                let _ = ide.insert_media(Slot::SECONDARY_MASTER, cd());
            }
            Op::Eject => {
                let _ = ide.eject_media(Slot::SECONDARY_MASTER);
            }
            Op::Snapshot => {
                if let Ok(s) = ide.state() {
                    ide.restore(&s)
                        .expect("an idle controller's state must restore");
                    assert_eq!(ide.state().ok(), Some(s));
                }
            }
        }
    }
});
