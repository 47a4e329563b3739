//! The i440FX host bridge (00:00.0) and PIIX3 ISA bridge (00:01.0) PCI functions.
//!
//! These are the two functions SeaBIOS and Linux look for on a QEMU-style PC:
//! SeaBIOS recognises "QEMU (i440fx)" by vendor 8086, device 1237 and the
//! Red Hat/QEMU subsystem IDs 1af4:1100 at 00:00.0, opens the BIOS shadow RAM
//! through the PAM registers, and programs the PIIX3 PIRQ route registers;
//! Linux's PCI IRQ router reads those routes back. Both functions only hold
//! register state and report changes: what the VMM does with a PAM change
//! (remapping 0xC0000-0xFFFFF) or a PIRQ route is its own business.
//!
//! ```
//! use std::sync::Arc;
//! use iovirt_bus::pci::{PciAddress, PciRoot};
//! use iovirt_bus::{AddressSpace, Bus};
//! use iovirt_legacy::chipset::{I440fx, Piix3, I440FX_ADDRESS, PIIX3_ADDRESS};
//!
//! let pio = Arc::new(Bus::new(AddressSpace::Pio));
//! let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
//! let root = Arc::new(PciRoot::new(pio.clone(), mmio));
//! root.register().unwrap();
//! let host = root.add_function(I440FX_ADDRESS, I440fx::new()).unwrap();
//! let isa = root.add_function(PIIX3_ADDRESS, Piix3::new()).unwrap();
//!
//! // Firmware routes PIRQA to IRQ 10 with a byte write to 00:01.0 register 0x60.
//! pio.write(0xcf8, &0x8000_0860u32.to_le_bytes());
//! pio.write(0xcfc, &[10]);
//! assert_eq!(isa.lock().unwrap().pirq_route(0), Some(10));
//! // ... and makes 0xF0000-0xFFFFF read/write RAM through PAM0 (0x59).
//! pio.write(0xcf8, &0x8000_0058u32.to_le_bytes());
//! pio.write(0xcfd, &[0x30]);
//! assert!(host.lock().unwrap().pam_access(0).unwrap().write);
//! ```

use std::fmt;
use std::sync::Arc;

use iovirt_bus::pci::{
    ClassCode, ConfigSpace, PciAddress, PciFunction, PciIdentity, COMMAND, COMMAND_WRITABLE,
    LATENCY_TIMER,
};
use serde::{Deserialize, Serialize};

/// Intel's PCI vendor ID.
pub const INTEL_VENDOR_ID: u16 = 0x8086;
/// Device ID of the 82441FX PMC (i440FX host bridge).
pub const I440FX_DEVICE_ID: u16 = 0x1237;
/// Device ID of the 82371SB PIIX3 PCI-to-ISA bridge (function 0).
pub const PIIX3_DEVICE_ID: u16 = 0x7000;
/// Subsystem vendor ID QEMU gives its devices (Red Hat); SeaBIOS requires it at 00:00.0.
pub const QEMU_SUBSYSTEM_VENDOR_ID: u16 = 0x1af4;
/// Subsystem ID QEMU gives its devices ("QEMU virtual machine"); SeaBIOS requires it at 00:00.0.
pub const QEMU_SUBSYSTEM_ID: u16 = 0x1100;
/// Revision ID of QEMU's i440FX.
pub const I440FX_REVISION: u8 = 0x02;

/// Where the host bridge lives.
pub const I440FX_ADDRESS: PciAddress = PciAddress {
    bus: 0,
    device: 0,
    function: 0,
};
/// Where the ISA bridge lives.
pub const PIIX3_ADDRESS: PciAddress = PciAddress {
    bus: 0,
    device: 1,
    function: 0,
};

/// First PAM register (PAM0 at 0x59, through PAM6 at 0x5F).
pub const PAM0: u16 = 0x59;
/// Number of PAM registers.
pub const PAM_REGISTERS: usize = 7;
/// Number of PAM-controlled segments: 0xF0000-0xFFFFF plus twelve 16 KiB segments.
pub const PAM_SEGMENTS: usize = 13;
/// PAM nibble bit 0: reads of the segment go to DRAM (otherwise to PCI, i.e. the ROM).
pub const PAM_READ_ENABLE: u8 = 0x1;
/// PAM nibble bit 1: writes to the segment go to DRAM (otherwise to PCI).
pub const PAM_WRITE_ENABLE: u8 = 0x2;
/// Writable bits of PAM0: only the high nibble (0xF0000-0xFFFFF) is implemented.
const PAM0_MASK: u8 = 0x30;
/// Writable bits of PAM1..PAM6: RE/WE of both nibbles.
const PAM_MASK: u8 = 0x33;

/// First PIRQ route control register (PIRQRC\[A\] at 0x60, through PIRQD at 0x63).
pub const PIRQ_ROUTE: u16 = 0x60;
/// Number of PIRQ lines.
pub const PIRQ_LINES: usize = 4;
/// PIRQ route bit 7: routing to ISA is disabled.
pub const PIRQ_ROUTE_DISABLED: u8 = 0x80;
/// PIRQ route bits 3:0: the ISA IRQ.
pub const PIRQ_ROUTE_IRQ: u8 = 0x0f;
/// Power-on value of each PIRQ route register.
pub const PIRQ_ROUTE_DEFAULT: u8 = PIRQ_ROUTE_DISABLED;
/// Writable bits of a PIRQ route register (bits 6:4 are reserved).
const PIRQ_ROUTE_MASK: u8 = PIRQ_ROUTE_DISABLED | PIRQ_ROUTE_IRQ;
/// ISA IRQs a PIRQ may be routed to (0, 1, 2, 8 and 13 are reserved).
const PIRQ_VALID_IRQS: u16 = 0b1101_1110_1111_1000;

/// Errors restoring chipset state.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ChipsetError {
    /// A register holds bits a guest cannot set.
    #[error("{register} value {value:#x} has reserved bits set (writable mask {mask:#x})")]
    ReservedBits {
        /// Register name.
        register: &'static str,
        /// Value found.
        value: u16,
        /// Bits that may be set.
        mask: u16,
    },
}

fn check(register: &'static str, value: u16, mask: u16) -> Result<(), ChipsetError> {
    if value & !mask != 0 {
        return Err(ChipsetError::ReservedBits {
            register,
            value,
            mask,
        });
    }
    Ok(())
}

/// A memory segment whose routing PAM controls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PamSegment {
    /// Segment index: 0 for 0xF0000-0xFFFFF, 1..=12 for 0xC0000 + 16 KiB × (index − 1).
    pub index: usize,
    /// First address.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl PamSegment {
    /// Segment `index` (0..=12).
    pub fn new(index: usize) -> Option<Self> {
        match index {
            0 => Some(PamSegment {
                index,
                base: 0xf_0000,
                len: 0x1_0000,
            }),
            1..=12 => Some(PamSegment {
                index,
                base: 0xc_0000 + 0x4000 * (index as u64 - 1),
                len: 0x4000,
            }),
            _ => None,
        }
    }

    /// Register offset and bit shift of this segment's nibble.
    fn nibble(index: usize) -> (usize, u32) {
        if index == 0 {
            (0, 4)
        } else {
            // Segments 1, 2 live in PAM1 low/high, 3, 4 in PAM2, ...
            (index.div_ceil(2), if index % 2 == 1 { 0 } else { 4 })
        }
    }
}

/// Where accesses to a PAM segment go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PamAccess {
    /// Reads go to DRAM (shadow RAM); otherwise to PCI (the BIOS ROM).
    pub read: bool,
    /// Writes go to DRAM; otherwise to PCI (dropped for a ROM).
    pub write: bool,
}

/// Told when the guest changes a PAM segment's routing.
pub trait PamObserver: Send + Sync {
    /// `segment` now routes as `new` (it routed as `old`).
    fn pam_changed(&self, segment: PamSegment, old: PamAccess, new: PamAccess);
}

/// Guest-visible state of the i440FX host bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I440fxState {
    /// Command register.
    pub command: u16,
    /// Latency timer.
    pub latency_timer: u8,
    /// PAM0..PAM6 (config 0x59..0x5F).
    pub pam: [u8; PAM_REGISTERS],
}

impl Default for I440fxState {
    /// Power-on: everything zero, all PAM segments routed to PCI (ROM).
    fn default() -> Self {
        I440fxState {
            command: 0,
            latency_timer: 0,
            pam: [0; PAM_REGISTERS],
        }
    }
}

/// The i440FX (82441FX PMC) host bridge function at 00:00.0.
pub struct I440fx {
    config: ConfigSpace,
    observer: Option<Arc<dyn PamObserver>>,
}

impl fmt::Debug for I440fx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I440fx")
            .field("state", &self.state())
            .finish()
    }
}

impl Default for I440fx {
    fn default() -> Self {
        Self::new()
    }
}

impl I440fx {
    /// A host bridge in its power-on state, without a PAM observer.
    pub fn new() -> Self {
        let mut config = ConfigSpace::new(&PciIdentity {
            vendor_id: INTEL_VENDOR_ID,
            device_id: I440FX_DEVICE_ID,
            class: ClassCode {
                class: 0x06,
                subclass: 0x00,
                prog_if: 0x00,
            },
            revision: I440FX_REVISION,
            subsystem_vendor_id: QEMU_SUBSYSTEM_VENDOR_ID,
            subsystem_id: QEMU_SUBSYSTEM_ID,
            multi_function: false,
        });
        let mut masks = [PAM_MASK; PAM_REGISTERS];
        masks[0] = PAM0_MASK;
        config.set_writable_mask(PAM0, &masks);
        I440fx {
            config,
            observer: None,
        }
    }

    /// A host bridge that reports PAM changes to `observer`.
    pub fn with_observer(observer: Arc<dyn PamObserver>) -> Self {
        let mut d = Self::new();
        d.observer = Some(observer);
        d
    }

    /// Set (or replace) the PAM observer.
    pub fn set_observer(&mut self, observer: Arc<dyn PamObserver>) {
        self.observer = Some(observer);
    }

    fn pam_registers(&self) -> [u8; PAM_REGISTERS] {
        let mut pam = [0u8; PAM_REGISTERS];
        self.config.read(PAM0, &mut pam);
        pam
    }

    fn access_in(pam: &[u8; PAM_REGISTERS], index: usize) -> PamAccess {
        let (reg, shift) = PamSegment::nibble(index);
        let nib = pam.get(reg).map_or(0, |v| v >> shift);
        PamAccess {
            read: nib & PAM_READ_ENABLE != 0,
            write: nib & PAM_WRITE_ENABLE != 0,
        }
    }

    /// Routing of PAM segment `index` (0..=12), see [`PamSegment`].
    pub fn pam_access(&self, index: usize) -> Option<PamAccess> {
        PamSegment::new(index)?;
        Some(Self::access_in(&self.pam_registers(), index))
    }

    /// Routing of every PAM segment.
    pub fn pam_segments(&self) -> Vec<(PamSegment, PamAccess)> {
        let pam = self.pam_registers();
        (0..PAM_SEGMENTS)
            .filter_map(|i| Some((PamSegment::new(i)?, Self::access_in(&pam, i))))
            .collect()
    }

    fn notify_changes(&self, old: &[u8; PAM_REGISTERS]) {
        let Some(obs) = &self.observer else {
            return;
        };
        let new = self.pam_registers();
        for i in 0..PAM_SEGMENTS {
            let (a, b) = (Self::access_in(old, i), Self::access_in(&new, i));
            if let (true, Some(seg)) = (a != b, PamSegment::new(i)) {
                obs.pam_changed(seg, a, b);
            }
        }
    }

    /// Guest-visible state.
    pub fn state(&self) -> I440fxState {
        I440fxState {
            command: self.config.command(),
            latency_timer: self.config.read_u8(LATENCY_TIMER),
            pam: self.pam_registers(),
        }
    }

    /// A host bridge restored from `state` (without an observer); rejects
    /// values with bits a guest could not have set.
    pub fn from_state(state: &I440fxState) -> Result<Self, ChipsetError> {
        check("command", state.command, COMMAND_WRITABLE)?;
        check("PAM0", u16::from(state.pam[0]), u16::from(PAM0_MASK))?;
        for &p in &state.pam[1..] {
            check("PAM", u16::from(p), u16::from(PAM_MASK))?;
        }
        let mut d = Self::new();
        d.config.set_u16(COMMAND, state.command);
        d.config.set_u8(LATENCY_TIMER, state.latency_timer);
        d.config.set_bytes_raw(PAM0, &state.pam);
        Ok(d)
    }
}

impl PciFunction for I440fx {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let old = self.pam_registers();
        self.config.write(offset, data);
        self.notify_changes(&old);
    }
}

/// The INTx swizzle of a device on the root bus: which PIRQ (0 = PIRQA ..
/// 3 = PIRQD) the interrupt pin `pin` (1 = INTA# .. 4 = INTD#) of device
/// `slot` drives. `None` for pin 0 (no interrupt) or a pin above 4.
///
/// This is the wiring QEMU's PIIX machine has and SeaBIOS assumes when it
/// fills in the interrupt line registers: `(slot + pin − 2) mod 4`.
pub fn intx_to_pirq(slot: u8, pin: u8) -> Option<usize> {
    if !(1..=4).contains(&pin) {
        return None;
    }
    Some((usize::from(slot) + usize::from(pin) + 2) % 4)
}

/// Guest-visible state of the PIIX3 ISA bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piix3State {
    /// Command register.
    pub command: u16,
    /// PIRQA..PIRQD route control registers (config 0x60..0x63).
    pub pirq: [u8; PIRQ_LINES],
}

impl Default for Piix3State {
    /// Power-on: command zero, every PIRQ route disabled (0x80).
    fn default() -> Self {
        Piix3State {
            command: 0,
            pirq: [PIRQ_ROUTE_DEFAULT; PIRQ_LINES],
        }
    }
}

/// The PIIX3 (82371SB) PCI-to-ISA bridge, function 0 of the multi-function device at 00:01.
#[derive(Debug, Clone)]
pub struct Piix3 {
    config: ConfigSpace,
}

impl Default for Piix3 {
    fn default() -> Self {
        Self::new()
    }
}

impl Piix3 {
    /// An ISA bridge in its power-on state.
    pub fn new() -> Self {
        let mut config = ConfigSpace::new(&PciIdentity {
            vendor_id: INTEL_VENDOR_ID,
            device_id: PIIX3_DEVICE_ID,
            class: ClassCode {
                class: 0x06,
                subclass: 0x01,
                prog_if: 0x00,
            },
            revision: 0,
            subsystem_vendor_id: QEMU_SUBSYSTEM_VENDOR_ID,
            subsystem_id: QEMU_SUBSYSTEM_ID,
            multi_function: true,
        });
        config.set_bytes_raw(PIRQ_ROUTE, &[PIRQ_ROUTE_DEFAULT; PIRQ_LINES]);
        config.set_writable_mask(PIRQ_ROUTE, &[PIRQ_ROUTE_MASK; PIRQ_LINES]);
        Piix3 { config }
    }

    /// The ISA IRQ PIRQ `n` (0 = PIRQA .. 3 = PIRQD) is routed to, or `None`
    /// if `n` is out of range, routing is disabled, or the IRQ is reserved
    /// (0, 1, 2, 8, 13).
    pub fn pirq_route(&self, n: usize) -> Option<u8> {
        let reg = PIRQ_ROUTE + u16::try_from(n).ok().filter(|&n| n < 4)?;
        let v = self.config.read_u8(reg);
        let irq = v & PIRQ_ROUTE_IRQ;
        (v & PIRQ_ROUTE_DISABLED == 0 && PIRQ_VALID_IRQS & (1 << irq) != 0).then_some(irq)
    }

    /// The ISA IRQ the interrupt pin `pin` (1..=4) of the device in `slot` reaches,
    /// following [`intx_to_pirq`] and the current routes.
    pub fn intx_route(&self, slot: u8, pin: u8) -> Option<u8> {
        self.pirq_route(intx_to_pirq(slot, pin)?)
    }

    /// Guest-visible state.
    pub fn state(&self) -> Piix3State {
        let mut pirq = [0u8; PIRQ_LINES];
        self.config.read(PIRQ_ROUTE, &mut pirq);
        Piix3State {
            command: self.config.command(),
            pirq,
        }
    }

    /// An ISA bridge restored from `state`; rejects values with bits a guest could not have set.
    pub fn from_state(state: &Piix3State) -> Result<Self, ChipsetError> {
        check("command", state.command, COMMAND_WRITABLE)?;
        for &p in &state.pirq {
            check("PIRQ route", u16::from(p), u16::from(PIRQ_ROUTE_MASK))?;
        }
        let mut d = Self::new();
        d.config.set_u16(COMMAND, state.command);
        d.config.set_bytes_raw(PIRQ_ROUTE, &state.pirq);
        Ok(d)
    }
}

impl PciFunction for Piix3 {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iovirt_bus::pci::{PciRoot, HEADER_TYPE};
    use iovirt_bus::{AddressSpace, Bus};
    use proptest::prelude::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Changes(Mutex<Vec<(usize, PamAccess, PamAccess)>>);
    impl PamObserver for Changes {
        fn pam_changed(&self, segment: PamSegment, old: PamAccess, new: PamAccess) {
            self.0.lock().unwrap().push((segment.index, old, new));
        }
    }

    fn rw(read: bool, write: bool) -> PamAccess {
        PamAccess { read, write }
    }

    #[test]
    fn i440fx_identity() {
        let d = I440fx::new();
        let c = d.config();
        assert_eq!(c.read_u32(0), 0x1237_8086);
        assert_eq!(c.read_u32(0x08), 0x0600_0002);
        assert_eq!(c.read_u8(HEADER_TYPE), 0);
        assert_eq!(c.read_u32(0x2c), 0x1100_1af4);
    }

    #[test]
    fn pam_segments_and_observer() {
        let changes = Arc::new(Changes::default());
        let mut d = I440fx::with_observer(changes.clone());
        assert_eq!(PamSegment::new(0).unwrap().base, 0xf_0000);
        assert_eq!(PamSegment::new(1).unwrap().base, 0xc_0000);
        assert_eq!(PamSegment::new(2).unwrap().base, 0xc_4000);
        assert_eq!(PamSegment::new(12).unwrap().base, 0xe_c000);
        assert_eq!(PamSegment::new(13), None);
        assert_eq!(d.pam_access(0), Some(rw(false, false)));
        // SeaBIOS-style dword writes at 0x58 and 0x5C make everything read/write.
        d.config_write(0x58, &[0xff, 0x30, 0x33, 0x33]);
        d.config_write(0x5c, &[0x33, 0x33, 0x33, 0x33]);
        assert_eq!(d.config().read_u8(0x58), 0, "0x58 is not a PAM register");
        assert!(d.pam_segments().iter().all(|(_, a)| *a == rw(true, true)));
        assert_eq!(changes.0.lock().unwrap().len(), 13);
        // Reserved bits are not writable; PAM1 high nibble = read-only shadow of 0xC4000.
        changes.0.lock().unwrap().clear();
        d.config_write(0x5a, &[0xd7]);
        assert_eq!(d.config().read_u8(0x5a), 0x13);
        assert_eq!(d.pam_access(1), Some(rw(true, true)));
        assert_eq!(d.pam_access(2), Some(rw(true, false)));
        assert_eq!(
            *changes.0.lock().unwrap(),
            vec![(2, rw(true, true), rw(true, false))]
        );
        // A write that changes nothing reports nothing.
        d.config_write(0x5a, &[0x13]);
        assert_eq!(changes.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn i440fx_state_round_trip() {
        let mut d = I440fx::new();
        assert_eq!(d.state(), I440fxState::default());
        d.config_write(0x04, &[0x06, 0x00]);
        d.config_write(0x59, &[0x10, 0x31]);
        let s = d.state();
        let json = serde_json::to_string(&s).unwrap();
        let back: I440fxState = serde_json::from_str(&json).unwrap();
        let e = I440fx::from_state(&back).unwrap();
        assert_eq!(e.state(), s);
        assert_eq!(e.pam_access(0), Some(rw(true, false)));
        let mut bad = s;
        bad.pam[0] = 0x01;
        assert!(I440fx::from_state(&bad).is_err());
        let mut bad = s;
        bad.pam[3] = 0x44;
        assert!(I440fx::from_state(&bad).is_err());
        let mut bad = s;
        bad.command = 0x8000;
        assert!(I440fx::from_state(&bad).is_err());
    }

    #[test]
    fn piix3_identity_and_pirq() {
        let mut d = Piix3::new();
        let c = d.config();
        assert_eq!(c.read_u32(0), 0x7000_8086);
        assert_eq!(c.read_u32(0x08) >> 8, 0x06_0100);
        assert_eq!(c.read_u8(HEADER_TYPE), 0x80);
        assert_eq!(c.read_u32(0x60), 0x8080_8080);
        assert_eq!(d.pirq_route(0), None);
        // SeaBIOS routes A..D to 10, 10, 11, 11.
        for (i, irq) in [10u8, 10, 11, 11].into_iter().enumerate() {
            d.config_write(0x60 + i as u16, &[irq]);
        }
        assert_eq!(
            (0..4).map(|n| d.pirq_route(n)).collect::<Vec<_>>(),
            vec![Some(10), Some(10), Some(11), Some(11)]
        );
        assert_eq!(d.pirq_route(4), None);
        assert_eq!(d.pirq_route(usize::MAX), None);
        // Reserved bits 6:4 do not stick; disabled bit hides the route; reserved IRQs hide it.
        d.config_write(0x60, &[0x7b]);
        assert_eq!(d.config().read_u8(0x60), 0x0b);
        d.config_write(0x61, &[0x8b]);
        assert_eq!(d.pirq_route(1), None);
        d.config_write(0x62, &[0x02]);
        assert_eq!(d.pirq_route(2), None);
        // Slot 3 INTA# -> PIRQC (now the reserved IRQ 2), INTB# -> PIRQD (IRQ 11).
        assert_eq!(intx_to_pirq(3, 1), Some(2));
        assert_eq!(d.intx_route(3, 1), None);
        assert_eq!(d.intx_route(3, 2), Some(11));
    }

    #[test]
    fn swizzle() {
        assert_eq!(intx_to_pirq(1, 1), Some(0));
        assert_eq!(intx_to_pirq(0, 1), Some(3));
        assert_eq!(intx_to_pirq(4, 1), Some(3));
        assert_eq!(intx_to_pirq(4, 2), Some(0));
        assert_eq!(intx_to_pirq(31, 4), Some(1));
        assert_eq!(intx_to_pirq(5, 0), None);
        assert_eq!(intx_to_pirq(5, 5), None);
    }

    #[test]
    fn piix3_state_round_trip() {
        let mut d = Piix3::new();
        assert_eq!(d.state(), Piix3State::default());
        d.config_write(0x60, &[0x0a, 0x0b, 0x85, 0x0e]);
        let s = d.state();
        let json = serde_json::to_string(&s).unwrap();
        let e = Piix3::from_state(&serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(e.state(), s);
        assert_eq!(e.pirq_route(3), Some(14));
        let mut bad = s;
        bad.pirq[2] = 0x10;
        assert!(Piix3::from_state(&bad).is_err());
    }

    #[test]
    fn seabios_detection_through_the_root() {
        let pio = Arc::new(Bus::new(AddressSpace::Pio));
        let root = Arc::new(PciRoot::new(
            pio.clone(),
            Arc::new(Bus::new(AddressSpace::Mmio)),
        ));
        root.register().unwrap();
        root.add_function(I440FX_ADDRESS, I440fx::new()).unwrap();
        root.add_function(PIIX3_ADDRESS, Piix3::new()).unwrap();
        // SeaBIOS reads words at PORT_PCI_DATA + (reg & 2).
        let readw = |bdf: u32, reg: u32| {
            pio.write(
                0xcf8,
                &(0x8000_0000 | (bdf << 8) | (reg & 0xfc)).to_le_bytes(),
            );
            let mut b = [0u8; 2];
            pio.read(0xcfc + u64::from(reg & 2), &mut b);
            u16::from_le_bytes(b)
        };
        assert_eq!(readw(0, 0x00), 0x8086);
        assert_eq!(readw(0, 0x02), 0x1237);
        assert_eq!(readw(0, 0x2c), 0x1af4);
        assert_eq!(readw(0, 0x2e), 0x1100);
        assert_eq!(readw(0x08, 0x02), 0x7000);
        assert_eq!(readw(0x08, 0x0a), 0x0601);
        assert_eq!(readw(0x09, 0x00), 0xffff, "00:01.1 absent");
    }

    proptest! {
        /// Any byte sequence written to the PAM/PIRQ area leaves state that from_state accepts.
        #[test]
        fn any_guest_writes_give_restorable_state(writes in proptest::collection::vec((0u16..0x100, any::<u32>(), 1usize..5), 0..100)) {
            let mut h = I440fx::new();
            let mut p = Piix3::new();
            for (off, val, len) in writes {
                let b = val.to_le_bytes();
                h.config_write(off, &b[..len]);
                p.config_write(off, &b[..len]);
            }
            prop_assert_eq!(I440fx::from_state(&h.state()).unwrap().state(), h.state());
            prop_assert_eq!(Piix3::from_state(&p.state()).unwrap().state(), p.state());
        }
    }
}
