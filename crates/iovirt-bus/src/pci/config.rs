//! A type-0 configuration space: 256 bytes with per-byte masks, BARs and a capability list.

use serde::{Deserialize, Serialize};

use super::PciError;
use crate::AddressSpace;

/// Size of the conventional configuration space in bytes.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of base address registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Vendor ID register (16 bits, read-only): who made the function.
pub const VENDOR_ID: u16 = 0x00;
/// Device ID register (16 bits, read-only): which device of that vendor.
pub const DEVICE_ID: u16 = 0x02;
/// Command register (16 bits): decode enables, bus mastering, INTx disable.
pub const COMMAND: u16 = 0x04;
/// Status register (16 bits): capability-list flag and write-1-to-clear error bits.
pub const STATUS: u16 = 0x06;
/// Revision ID register (8 bits, read-only).
pub const REVISION_ID: u16 = 0x08;
/// Programming interface byte of the class code (read-only).
pub const PROG_IF: u16 = 0x09;
/// Sub-class byte of the class code (read-only).
pub const SUBCLASS: u16 = 0x0a;
/// Base class byte of the class code (read-only).
pub const CLASS: u16 = 0x0b;
/// Cache line size register (8 bits, writable, no effect on emulated devices).
pub const CACHE_LINE_SIZE: u16 = 0x0c;
/// Latency timer register (8 bits, writable, no effect on emulated devices).
pub const LATENCY_TIMER: u16 = 0x0d;
/// Header type register: layout in bits 6:0 (0 = type 0), bit 7 = multi-function device.
pub const HEADER_TYPE: u16 = 0x0e;
/// Built-in self test register (read-only zero: no BIST).
pub const BIST: u16 = 0x0f;
/// First base address register; BAR n is at `BAR0 + 4 * n`.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID register (16 bits, read-only).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID register (16 bits, read-only).
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Expansion ROM base address register (read-only zero: no option ROM BAR).
pub const EXPANSION_ROM: u16 = 0x30;
/// Capabilities pointer: offset of the first capability (valid when the status bit is set).
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt line register: scratch byte where firmware records the IRQ it routed INTx to.
pub const INTERRUPT_LINE: u16 = 0x3c;
/// Interrupt pin register (read-only): 0 = none, 1..=4 = INTA#..INTD#.
pub const INTERRUPT_PIN: u16 = 0x3d;
/// First byte after the type-0 header; capabilities are placed from here on.
pub const FIRST_CAPABILITY_OFFSET: u16 = 0x40;

/// Command bit 0: the function responds to I/O space accesses (enables I/O BARs).
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command bit 1: the function responds to memory space accesses (enables memory BARs).
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command bit 2: the function may master the bus (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command bit 6: report parity errors.
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
/// Command bit 8: SERR# driver enable.
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command bit 10: INTx emulation disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits a guest may change on every function.
pub const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

/// Status bit 3: the function's INTx is asserted (read-only).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status bit 4: the capabilities pointer at 0x34 is valid (read-only).
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status error bits (parity, target/master abort, SERR) that are write-1-to-clear.
pub const STATUS_W1C: u16 = 0xf900;

/// Header type bit 7: the device has more than one function.
pub const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;

/// BAR bit 0: the BAR decodes I/O space.
pub const BAR_IO_SPACE: u32 = 0x1;
/// Memory BAR bits 2:1 = 0b10: a 64-bit BAR that also uses the next slot.
pub const BAR_MEM_TYPE_64: u32 = 0x4;
/// Memory BAR bit 3: prefetchable memory.
pub const BAR_MEM_PREFETCHABLE: u32 = 0x8;
/// Address bits of a memory BAR's low dword.
pub const BAR_MEM_ADDRESS_MASK: u32 = !0xf;
/// Address bits of an I/O BAR.
pub const BAR_IO_ADDRESS_MASK: u32 = !0x3;

/// Smallest memory BAR (the four type bits take the low address bits).
pub const MIN_MEMORY_BAR_SIZE: u64 = 16;
/// Smallest I/O BAR.
pub const MIN_IO_BAR_SIZE: u64 = 4;
/// Largest I/O BAR the PCI specification allows.
pub const MAX_IO_BAR_SIZE: u64 = 256;

/// The three bytes of a class code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCode {
    /// Base class (offset 0x0b), e.g. 0x06 for bridges.
    pub class: u8,
    /// Sub-class (offset 0x0a), e.g. 0x00 for a host bridge.
    pub subclass: u8,
    /// Programming interface (offset 0x09).
    pub prog_if: u8,
}

/// The read-only identity of a function, written into a new [`ConfigSpace`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciIdentity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code.
    pub class: ClassCode,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Set bit 7 of the header type: the device has several functions. Guests only
    /// probe functions 1..=7 of a device whose function 0 sets this.
    pub multi_function: bool,
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    /// A memory BAR below 4 GiB.
    Memory32,
    /// A memory BAR anywhere in 64-bit space; it also occupies the next BAR slot.
    Memory64,
    /// An I/O port BAR.
    Io,
}

/// Declaration of a BAR: kind, power-of-two size, prefetchable flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarSpec {
    kind: BarKind,
    size: u64,
    prefetchable: bool,
}

impl BarSpec {
    /// A non-prefetchable 32-bit memory BAR of `size` bytes.
    pub fn memory32(size: u64) -> Self {
        BarSpec {
            kind: BarKind::Memory32,
            size,
            prefetchable: false,
        }
    }
    /// A non-prefetchable 64-bit memory BAR of `size` bytes.
    pub fn memory64(size: u64) -> Self {
        BarSpec {
            kind: BarKind::Memory64,
            size,
            prefetchable: false,
        }
    }
    /// An I/O BAR of `size` bytes.
    pub fn io(size: u64) -> Self {
        BarSpec {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        }
    }
    /// The same BAR marked prefetchable (memory BARs only).
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }
    /// What the BAR decodes.
    pub fn kind(&self) -> BarKind {
        self.kind
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Whether the BAR is prefetchable.
    pub fn is_prefetchable(&self) -> bool {
        self.prefetchable
    }
    /// The address space the BAR lives in.
    pub fn space(&self) -> AddressSpace {
        match self.kind {
            BarKind::Io => AddressSpace::Pio,
            BarKind::Memory32 | BarKind::Memory64 => AddressSpace::Mmio,
        }
    }

    fn check(&self, index: u8) -> Result<(), PciError> {
        let bad = |reason| Err(PciError::InvalidBar { index, reason });
        if !self.size.is_power_of_two() {
            return bad("size is not a power of two");
        }
        match self.kind {
            BarKind::Io => {
                if self.prefetchable {
                    return bad("I/O BARs cannot be prefetchable");
                }
                if !(MIN_IO_BAR_SIZE..=MAX_IO_BAR_SIZE).contains(&self.size) {
                    return bad("I/O BAR size must be 4..=256 bytes");
                }
            }
            BarKind::Memory32 => {
                if !(MIN_MEMORY_BAR_SIZE..=1 << 31).contains(&self.size) {
                    return bad("32-bit memory BAR size must be 16 bytes..=2 GiB");
                }
            }
            BarKind::Memory64 => {
                if !(MIN_MEMORY_BAR_SIZE..=1 << 62).contains(&self.size) {
                    return bad("64-bit memory BAR size must be 16 bytes..=4 EiB");
                }
                if usize::from(index) + 1 >= NUM_BARS {
                    return bad("a 64-bit BAR needs the next slot too");
                }
            }
        }
        Ok(())
    }

    /// Writable address bits of the BAR as one 64-bit mask (low dword, high dword).
    fn address_mask(&self) -> u64 {
        let mask = !(self.size - 1);
        match self.kind {
            BarKind::Io => mask & u64::from(BAR_IO_ADDRESS_MASK),
            BarKind::Memory32 => mask & u64::from(BAR_MEM_ADDRESS_MASK),
            BarKind::Memory64 => mask & !0xf,
        }
    }

    fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => BAR_IO_SPACE,
            BarKind::Memory32 => {
                if self.prefetchable {
                    BAR_MEM_PREFETCHABLE
                } else {
                    0
                }
            }
            BarKind::Memory64 => {
                BAR_MEM_TYPE_64
                    | if self.prefetchable {
                        BAR_MEM_PREFETCHABLE
                    } else {
                        0
                    }
            }
        }
    }
}

/// Where a BAR currently decodes, as computed from the BAR registers and the command register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarMapping {
    /// The bus the range belongs on.
    pub space: AddressSpace,
    /// Guest-programmed base address.
    pub base: u64,
    /// Size of the range.
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Unused,
    Used(BarSpec),
    /// Upper dword of the 64-bit BAR in the previous slot.
    Upper,
}

/// Which dword of a 64-bit BAR was written without the other one yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Half {
    Low,
    High,
}

/// A 256-byte type-0 configuration space with per-byte masks.
///
/// Every byte has a writable mask (bits a guest write replaces) and a
/// write-1-to-clear mask (bits a guest write of 1 clears); all other bits are
/// read-only. Device models change read-only bits with the `set_*` methods,
/// which bypass the masks.
///
/// BARs are declared with [`ConfigSpace::add_bar`]; their sizing protocol needs
/// no code (the writable mask of a BAR is its address mask, so writing all-ones
/// reads back the size mask with the type bits). [`ConfigSpace::bar_mapping`]
/// says where a BAR decodes now; [`super::PciRoot`] keeps the buses in step.
///
/// ```
/// use iovirt_bus::pci::{BarSpec, ConfigSpace, PciIdentity, BAR0, COMMAND, COMMAND_MEMORY_SPACE};
///
/// let mut cfg = ConfigSpace::new(&PciIdentity { vendor_id: 0x1af4, device_id: 0x1041, ..Default::default() });
/// cfg.add_bar(0, BarSpec::memory32(0x1000)).unwrap();
/// cfg.write(BAR0, &0xffff_ffffu32.to_le_bytes());
/// assert_eq!(cfg.read_u32(BAR0), 0xffff_f000); // size mask, type bits 0
/// cfg.write(BAR0, &0xfebf_0000u32.to_le_bytes());
/// cfg.write(COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
/// assert_eq!(cfg.bar_mapping(0).unwrap().base, 0xfebf_0000);
/// ```
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    w1c: [u8; CONFIG_SPACE_SIZE],
    bars: [BarSlot; NUM_BARS],
    half_written: [Option<Half>; NUM_BARS],
    next_capability: usize,
    last_capability: Option<usize>,
}

impl ConfigSpace {
    /// A configuration space with `id` in its read-only registers, the standard
    /// writable command bits, write-1-to-clear status error bits, writable cache
    /// line size, latency timer and interrupt line, no BARs, no interrupt pin and
    /// no capabilities.
    pub fn new(id: &PciIdentity) -> Self {
        let mut cfg = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            w1c: [0; CONFIG_SPACE_SIZE],
            bars: [BarSlot::Unused; NUM_BARS],
            half_written: [None; NUM_BARS],
            next_capability: usize::from(FIRST_CAPABILITY_OFFSET),
            last_capability: None,
        };
        cfg.set_u16(VENDOR_ID, id.vendor_id);
        cfg.set_u16(DEVICE_ID, id.device_id);
        cfg.set_u8(REVISION_ID, id.revision);
        cfg.set_u8(PROG_IF, id.class.prog_if);
        cfg.set_u8(SUBCLASS, id.class.subclass);
        cfg.set_u8(CLASS, id.class.class);
        cfg.set_u8(
            HEADER_TYPE,
            if id.multi_function {
                HEADER_TYPE_MULTI_FUNCTION
            } else {
                0
            },
        );
        cfg.set_u16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor_id);
        cfg.set_u16(SUBSYSTEM_ID, id.subsystem_id);
        cfg.set_writable_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        cfg.set_w1c_mask(STATUS, &STATUS_W1C.to_le_bytes());
        cfg.set_writable_mask(CACHE_LINE_SIZE, &[0xff, 0xff]);
        cfg.set_writable_mask(INTERRUPT_LINE, &[0xff]);
        cfg
    }

    /// Guest read of `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::from(offset)
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Guest write of `data` at `offset`, applying the writable and
    /// write-1-to-clear masks; bytes past the end are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        let mut bar_dwords = [false; NUM_BARS];
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = start.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else {
                break;
            };
            let (old, w, c) = (self.bytes[o], self.writable[o], self.w1c[o]);
            self.bytes[o] = ((old & !w) | (v & w)) & !(v & c);
            if let Some(d) = o
                .checked_sub(usize::from(BAR0))
                .map(|r| r / 4)
                .filter(|&d| d < NUM_BARS)
            {
                bar_dwords[d] = true;
            }
        }
        self.track_64bit_halves(&bar_dwords);
    }

    /// Remember 64-bit BARs of which only one dword has been written since the
    /// last complete update; such a BAR does not decode until the other half arrives.
    fn track_64bit_halves(&mut self, touched: &[bool; NUM_BARS]) {
        for i in 0..NUM_BARS - 1 {
            if !matches!(self.bars[i], BarSlot::Used(s) if s.kind == BarKind::Memory64) {
                continue;
            }
            let now = match (touched[i], touched[i + 1]) {
                (false, false) => continue,
                (true, true) => None,
                (true, false) => match self.half_written[i] {
                    Some(Half::High) => None,
                    _ => Some(Half::Low),
                },
                (false, true) => match self.half_written[i] {
                    Some(Half::Low) => None,
                    _ => Some(Half::High),
                },
            };
            self.half_written[i] = now;
        }
    }

    /// Little-endian byte at `offset` (0xff past the end).
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }
    /// Little-endian word at `offset` (all-ones past the end).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }
    /// Little-endian dword at `offset` (all-ones past the end).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn set_bytes(&mut self, offset: u16, data: &[u8], which: fn(&mut Self) -> &mut [u8; 256]) {
        let target = which(self);
        for (i, &v) in data.iter().enumerate() {
            if let Some(b) = usize::from(offset)
                .checked_add(i)
                .and_then(|o| target.get_mut(o))
            {
                *b = v;
            }
        }
    }

    /// Device-side store of `data` at `offset`, bypassing the masks (bytes past the end are dropped).
    pub fn set_bytes_raw(&mut self, offset: u16, data: &[u8]) {
        self.set_bytes(offset, data, |c| &mut c.bytes);
    }
    /// Device-side store of a byte.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.set_bytes_raw(offset, &[value]);
    }
    /// Device-side store of a little-endian word.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes_raw(offset, &value.to_le_bytes());
    }
    /// Device-side store of a little-endian dword.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes_raw(offset, &value.to_le_bytes());
    }
    /// Set which bits of the bytes at `offset..` a guest write replaces.
    pub fn set_writable_mask(&mut self, offset: u16, mask: &[u8]) {
        self.set_bytes(offset, mask, |c| &mut c.writable);
    }
    /// Set which bits of the bytes at `offset..` a guest write of 1 clears.
    pub fn set_w1c_mask(&mut self, offset: u16, mask: &[u8]) {
        self.set_bytes(offset, mask, |c| &mut c.w1c);
    }
    /// Writable mask of the byte at `offset` (0 past the end).
    pub fn writable_mask(&self, offset: u16) -> u8 {
        self.writable.get(usize::from(offset)).copied().unwrap_or(0)
    }
    /// Write-1-to-clear mask of the byte at `offset` (0 past the end).
    pub fn w1c_mask(&self, offset: u16) -> u8 {
        self.w1c.get(usize::from(offset)).copied().unwrap_or(0)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }
    /// The status register.
    pub fn status(&self) -> u16 {
        self.read_u16(STATUS)
    }
    /// Set the read-only interrupt pin register (0 = none, 1..=4 = INTA#..INTD#).
    pub fn set_interrupt_pin(&mut self, pin: u8) -> Result<(), PciError> {
        if pin > 4 {
            return Err(PciError::InvalidInterruptPin(pin));
        }
        self.set_u8(INTERRUPT_PIN, pin);
        Ok(())
    }

    /// Declare BAR `index` (a 64-bit BAR also takes `index + 1`).
    pub fn add_bar(&mut self, index: u8, spec: BarSpec) -> Result<(), PciError> {
        let i = usize::from(index);
        if i >= NUM_BARS {
            return Err(PciError::InvalidBar {
                index,
                reason: "index must be 0..=5",
            });
        }
        spec.check(index)?;
        let upper = spec.kind == BarKind::Memory64;
        let in_use = self.bars[i] != BarSlot::Unused
            || (upper && self.bars.get(i + 1) != Some(&BarSlot::Unused));
        if in_use {
            return Err(PciError::BarInUse(index));
        }
        let reg = BAR0 + 4 * u16::from(index);
        let mask = spec.address_mask();
        self.set_u32(reg, spec.type_bits());
        self.set_writable_mask(reg, &(mask as u32).to_le_bytes());
        self.bars[i] = BarSlot::Used(spec);
        if upper {
            self.set_u32(reg + 4, 0);
            self.set_writable_mask(reg + 4, &((mask >> 32) as u32).to_le_bytes());
            self.bars[i + 1] = BarSlot::Upper;
        }
        Ok(())
    }

    /// The declaration of BAR `index`, if it starts a declared BAR.
    pub fn bar(&self, index: u8) -> Option<BarSpec> {
        match self.bars.get(usize::from(index)) {
            Some(BarSlot::Used(s)) => Some(*s),
            _ => None,
        }
    }

    /// The address programmed into BAR `index` (without type bits), whether or not it decodes.
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let spec = self.bar(index)?;
        let reg = BAR0 + 4 * u16::from(index);
        let lo = u64::from(self.read_u32(reg));
        Some(match spec.kind {
            BarKind::Io => lo & u64::from(BAR_IO_ADDRESS_MASK),
            BarKind::Memory32 => lo & u64::from(BAR_MEM_ADDRESS_MASK),
            BarKind::Memory64 => {
                (u64::from(self.read_u32(reg + 4)) << 32) | (lo & u64::from(BAR_MEM_ADDRESS_MASK))
            }
        })
    }

    /// Where BAR `index` decodes now, or `None` when it must not be on a bus:
    /// not declared, decode disabled in the command register, address zero,
    /// being sized (address bits all ones, in either half of a 64-bit BAR),
    /// only one half of a 64-bit BAR rewritten, or an I/O range past 0xffff.
    pub fn bar_mapping(&self, index: u8) -> Option<BarMapping> {
        let spec = self.bar(index)?;
        if self.half_written[usize::from(index)].is_some() {
            return None;
        }
        let enable = match spec.kind {
            BarKind::Io => COMMAND_IO_SPACE,
            BarKind::Memory32 | BarKind::Memory64 => COMMAND_MEMORY_SPACE,
        };
        if self.command() & enable == 0 {
            return None;
        }
        let base = self.bar_address(index)?;
        let mask = spec.address_mask();
        let (lo_mask, hi_mask) = (mask & 0xffff_ffff, mask >> 32);
        let sizing_lo = lo_mask != 0 && base & lo_mask == lo_mask;
        let sizing_hi = hi_mask != 0 && (base >> 32) == hi_mask;
        if base == 0 || sizing_lo || sizing_hi {
            return None;
        }
        let end = base.checked_add(spec.size)?;
        if spec.kind == BarKind::Io && end > 0x1_0000 {
            return None;
        }
        Some(BarMapping {
            space: spec.space(),
            base,
            size: spec.size,
        })
    }

    /// Append a capability with `id` and `body` (the bytes after the ID and
    /// next-pointer bytes) to the capability list, returning its offset.
    ///
    /// `writable` is the guest-writable mask of `body`, either empty (all
    /// read-only) or as long as `body`. Capabilities are placed dword-aligned
    /// from 0x40 upward; device-specific registers must not live there.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> Result<u8, PciError> {
        if !writable.is_empty() && writable.len() != body.len() {
            return Err(PciError::CapabilityMaskLength {
                body: body.len(),
                mask: writable.len(),
            });
        }
        let offset = self.next_capability;
        let len = body.len() + 2;
        let end = offset + len;
        let (Ok(off8), true) = (u8::try_from(offset), end <= CONFIG_SPACE_SIZE) else {
            return Err(PciError::NoCapabilitySpace { id, len });
        };
        let off16 = u16::from(off8);
        self.set_u8(off16, id);
        self.set_u8(off16 + 1, 0);
        self.set_bytes_raw(off16 + 2, body);
        if !writable.is_empty() {
            self.set_writable_mask(off16 + 2, writable);
        }
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = off8,
            None => self.set_u8(CAPABILITIES_POINTER, off8),
        }
        let status = self.status() | STATUS_CAPABILITIES_LIST;
        self.set_u16(STATUS, status);
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(off8)
    }

    /// The capability list as (offset, id) pairs, following the next pointers
    /// (at most 48 entries, so a corrupt list cannot loop).
    pub fn capabilities(&self) -> Vec<(u8, u8)> {
        let mut out = Vec::new();
        if self.status() & STATUS_CAPABILITIES_LIST == 0 {
            return out;
        }
        let mut ptr = self.read_u8(CAPABILITIES_POINTER) & !0x3;
        while ptr >= 0x40 && out.len() < 48 {
            out.push((ptr, self.read_u8(u16::from(ptr))));
            ptr = self.read_u8(u16::from(ptr) + 1) & !0x3;
        }
        out
    }

    /// Offset of the first capability with `id`.
    pub fn find_capability(&self, id: u8) -> Option<u8> {
        self.capabilities()
            .into_iter()
            .find(|&(_, i)| i == id)
            .map(|(o, _)| o)
    }

    /// The raw 256 bytes, as a guest would read them.
    pub fn bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    /// Restore saved bytes (from [`ConfigSpace::bytes`] of an identical
    /// function). Rejects a wrong length and any read-only bit that differs
    /// from this function's; nothing changes on error.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), PciError> {
        if saved.len() != CONFIG_SPACE_SIZE {
            return Err(PciError::StateLength {
                expected: CONFIG_SPACE_SIZE,
                actual: saved.len(),
            });
        }
        for (o, &v) in saved.iter().enumerate() {
            let ro = !(self.writable[o] | self.w1c[o]);
            if (v ^ self.bytes[o]) & ro != 0 {
                return Err(PciError::ReadOnlyMismatch {
                    offset: o,
                    expected: self.bytes[o],
                    actual: v,
                });
            }
        }
        self.bytes.copy_from_slice(saved);
        self.half_written = [None; NUM_BARS];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> ConfigSpace {
        ConfigSpace::new(&PciIdentity {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class: ClassCode {
                class: 0x02,
                subclass: 0x00,
                prog_if: 0x01,
            },
            revision: 3,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            multi_function: true,
        })
    }

    fn w32(c: &mut ConfigSpace, off: u16, v: u32) {
        c.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_and_masks() {
        let mut c = cfg();
        assert_eq!(c.read_u32(0), 0x5678_1234);
        assert_eq!(c.read_u32(0x08), 0x0200_0103);
        assert_eq!(c.read_u8(HEADER_TYPE), 0x80);
        assert_eq!(c.read_u32(SUBSYSTEM_VENDOR_ID), 0x1100_1af4);
        // Read-only registers ignore writes.
        w32(&mut c, 0, 0xdead_beef);
        w32(&mut c, 0x08, 0xffff_ffff);
        assert_eq!(c.read_u32(0), 0x5678_1234);
        assert_eq!(c.read_u32(0x08), 0x0200_0103);
        // Command: only the writable bits stick.
        c.write(COMMAND, &[0xff, 0xff]);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        // Status: W1C error bits clear on 1, other bits untouched.
        c.set_u16(STATUS, 0x8000 | 0x0100 | STATUS_INTERRUPT);
        c.write(STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(c.status(), 0x0100 | STATUS_INTERRUPT);
        c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.status(), STATUS_INTERRUPT);
        // Interrupt line writable, pin read-only.
        c.set_interrupt_pin(1).unwrap();
        c.write(INTERRUPT_LINE, &[11, 4]);
        assert_eq!(c.read_u16(INTERRUPT_LINE), 0x010b);
        assert!(c.set_interrupt_pin(5).is_err());
        // Past the end: all ones, no panic.
        let mut b = [0u8; 4];
        c.read(254, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff]);
        c.write(255, &[1, 2, 3, 4]);
        c.write(u16::MAX, &[1, 2]);
    }

    #[test]
    fn bar_sizing_32_64_io() {
        let mut c = cfg();
        c.add_bar(0, BarSpec::memory32(0x1000).prefetchable())
            .unwrap();
        c.add_bar(1, BarSpec::memory64(0x1_0000_0000)).unwrap();
        c.add_bar(3, BarSpec::io(0x20)).unwrap();
        assert_eq!(c.read_u32(BAR0), 0x8);
        assert_eq!(c.read_u32(BAR0 + 4), 0x4);
        assert_eq!(c.read_u32(BAR0 + 12), 0x1);
        for i in 0..6u16 {
            w32(&mut c, BAR0 + 4 * i, 0xffff_ffff);
        }
        assert_eq!(c.read_u32(BAR0), 0xffff_f008);
        assert_eq!(c.read_u32(BAR0 + 4), 0x0000_0004);
        assert_eq!(c.read_u32(BAR0 + 8), 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_ffe1);
        // Undeclared BARs are read-only zero.
        assert_eq!(c.read_u32(BAR0 + 16), 0);
        assert_eq!(c.read_u32(BAR0 + 20), 0);
        // Decode on but BARs hold the sizing pattern: nothing maps.
        c.write(
            COMMAND,
            &(COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE).to_le_bytes(),
        );
        assert_eq!(c.bar_mapping(0), None);
        assert_eq!(c.bar_mapping(1), None);
        assert_eq!(c.bar_mapping(3), None);
        w32(&mut c, BAR0, 0xfebf_0000);
        w32(&mut c, BAR0 + 4, 0);
        assert_eq!(c.bar_mapping(1), None, "only the low half rewritten");
        w32(&mut c, BAR0 + 8, 0x8);
        w32(&mut c, BAR0 + 12, 0xc040);
        assert_eq!(
            c.bar_mapping(0),
            Some(BarMapping {
                space: AddressSpace::Mmio,
                base: 0xfebf_0000,
                size: 0x1000
            })
        );
        assert_eq!(c.bar_mapping(1).unwrap().base, 0x8_0000_0000);
        assert_eq!(c.bar_mapping(3).unwrap().base, 0xc040);
        assert_eq!(c.bar_mapping(2), None, "upper half is not a BAR");
        // Decode off unmaps.
        c.write(COMMAND, &[0, 0]);
        assert_eq!(c.bar_mapping(0), None);
        assert_eq!(c.bar_mapping(3), None);
    }

    #[test]
    fn bar_declaration_errors() {
        let mut c = cfg();
        assert!(c.add_bar(6, BarSpec::io(4)).is_err());
        assert!(c.add_bar(5, BarSpec::memory64(16)).is_err());
        assert!(c.add_bar(0, BarSpec::memory32(24)).is_err());
        assert!(c.add_bar(0, BarSpec::memory32(8)).is_err());
        assert!(c.add_bar(0, BarSpec::io(512)).is_err());
        assert!(c.add_bar(0, BarSpec::io(4).prefetchable()).is_err());
        c.add_bar(1, BarSpec::memory64(16)).unwrap();
        assert_eq!(c.add_bar(2, BarSpec::io(4)), Err(PciError::BarInUse(2)));
        assert_eq!(
            c.add_bar(0, BarSpec::memory64(16)),
            Err(PciError::BarInUse(0))
        );
        assert_eq!(c.add_bar(1, BarSpec::io(4)), Err(PciError::BarInUse(1)));
    }

    #[test]
    fn io_bar_above_64k_does_not_map() {
        let mut c = cfg();
        c.add_bar(0, BarSpec::io(0x100)).unwrap();
        c.write(COMMAND, &COMMAND_IO_SPACE.to_le_bytes());
        w32(&mut c, BAR0, 0x1_0000);
        assert_eq!(c.bar_mapping(0), None);
        w32(&mut c, BAR0, 0xff00);
        assert_eq!(c.bar_mapping(0).unwrap().base, 0xff00);
    }

    #[test]
    fn capability_chain() {
        let mut c = cfg();
        assert_eq!(c.status() & STATUS_CAPABILITIES_LIST, 0);
        assert!(c.capabilities().is_empty());
        let a = c.add_capability(0x09, &[0xaa, 0xbb, 0xcc], &[]).unwrap();
        let b = c.add_capability(0x05, &[0, 0], &[0xff, 0x00]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_ne!(c.status() & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.read_u16(0x40), 0x4809);
        assert_eq!(c.read_u16(0x48), 0x0005);
        assert_eq!(c.capabilities(), vec![(0x40, 0x09), (0x48, 0x05)]);
        assert_eq!(c.find_capability(0x05), Some(0x48));
        c.write(0x48, &[0xff, 0xff, 0x12, 0x34]);
        assert_eq!(c.read_u32(0x48), 0x0012_0005);
        assert!(c.add_capability(1, &[0; 3], &[0; 2]).is_err());
        assert!(matches!(
            c.add_capability(1, &[0; 250], &[]),
            Err(PciError::NoCapabilitySpace { .. })
        ));
    }

    #[test]
    fn restore_checks_read_only_bits() {
        let mut c = cfg();
        c.add_bar(0, BarSpec::memory32(0x1000)).unwrap();
        w32(&mut c, BAR0, 0xfe00_0000);
        let saved = c.bytes().to_vec();
        let mut d = cfg();
        d.add_bar(0, BarSpec::memory32(0x1000)).unwrap();
        d.restore(&saved).unwrap();
        assert_eq!(d.read_u32(BAR0), 0xfe00_0000);
        let mut bad = saved.clone();
        bad[0] ^= 1;
        assert!(matches!(
            d.restore(&bad),
            Err(PciError::ReadOnlyMismatch { offset: 0, .. })
        ));
        assert!(d.restore(&saved[..10]).is_err());
    }

    proptest! {
        /// Whatever a guest writes, read-only bits never change and writes past the end are harmless.
        #[test]
        fn read_only_bits_hold(ops in proptest::collection::vec((0u16..260, proptest::collection::vec(any::<u8>(), 1..5)), 0..200)) {
            let mut c = cfg();
            c.add_bar(0, BarSpec::memory64(0x4000)).unwrap();
            c.add_bar(2, BarSpec::io(0x10)).unwrap();
            c.add_capability(0x11, &[0; 10], &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
            let before = *c.bytes();
            for (off, data) in ops {
                c.write(off, &data);
                for (o, b) in before.iter().enumerate() {
                    let ro = !(c.writable[o] | c.w1c[o]);
                    prop_assert_eq!(c.bytes[o] & ro, b & ro, "offset {:#x}", o);
                }
                for i in 0..6 {
                    if let Some(m) = c.bar_mapping(i) {
                        prop_assert!(m.base != 0 && m.base % m.size == 0);
                    }
                }
            }
        }
    }
}
