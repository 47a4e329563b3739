//! MSI-X: the capability, the vector table and the pending-bit array in a BAR.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::{ConfigSpace, NUM_BARS};
use super::PciError;
use crate::interrupt::{InterruptError, MsiMessage, MsiSink};

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Message control bit 15: MSI-X is enabled (the function uses MSI-X instead of INTx).
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control bit 14: every vector is masked regardless of its own mask bit.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control bits 10:0: table size minus one (read-only).
pub const MSIX_CONTROL_TABLE_SIZE: u16 = 0x7ff;
/// Bytes per vector table entry (address low, address high, data, vector control).
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: this vector is masked.
pub const MSIX_VECTOR_MASKED: u32 = 1;
/// Most vectors a function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Length of the capability body after the ID and next pointer: control, table, PBA.
const MSIX_CAP_BODY_LEN: usize = 10;

/// One vector table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control mask bit.
    pub masked: bool,
}

impl Default for MsixEntry {
    /// Reset value: all zero, masked.
    fn default() -> Self {
        MsixEntry {
            address: 0,
            data: 0,
            masked: true,
        }
    }
}

/// Where a structure (vector table or PBA) lives: a BAR and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixLocation {
    /// BAR index (the BIR), 0..=5.
    pub bar: u8,
    /// Offset in the BAR, 8-byte aligned.
    pub offset: u32,
}

/// Guest-visible MSI-X state for snapshot and restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Vector table.
    pub entries: Vec<MsixEntry>,
    /// Pending bit of each vector.
    pub pending: Vec<bool>,
    /// Message control enable bit.
    pub enabled: bool,
    /// Message control function mask bit.
    pub function_masked: bool,
}

/// MSI-X state of one function: vector table, pending bits, enable and function mask.
///
/// The device model owns one, adds its capability to its [`ConfigSpace`] with
/// [`Msix::add_capability`], forwards BAR accesses with [`Msix::bar_read`] /
/// [`Msix::bar_write`], calls [`Msix::config_written`] after every config
/// write, and raises vectors with [`Msix::notify`].
///
/// ```
/// use std::sync::Arc;
/// use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
/// use iovirt_bus::pci::{BarSpec, ClassCode, ConfigSpace, Msix, MsixLocation, PciIdentity};
///
/// let sink = Arc::new(RecordingMsiSink::new());
/// let mut cfg = ConfigSpace::new(&PciIdentity::default());
/// cfg.add_bar(0, BarSpec::memory32(0x1000)).unwrap();
/// let mut msix = Msix::new(2, MsixLocation { bar: 0, offset: 0 },
///                          MsixLocation { bar: 0, offset: 0x800 }, sink.clone()).unwrap();
/// let cap = msix.add_capability(&mut cfg).unwrap();
/// // The guest programs vector 0 and unmasks it, then enables MSI-X.
/// msix.bar_write(0, 0x0, &0xfee0_0000u32.to_le_bytes());
/// msix.bar_write(0, 0x8, &0x41u32.to_le_bytes());
/// msix.bar_write(0, 0xc, &0u32.to_le_bytes());
/// cfg.write(u16::from(cap) + 3, &[0x80]);
/// msix.config_written(&cfg);
/// msix.notify(0).unwrap();
/// assert_eq!(sink.messages()[0].data, 0x41);
/// ```
pub struct Msix {
    table: MsixLocation,
    pba: MsixLocation,
    cap_offset: Option<u8>,
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    sink: Arc<dyn MsiSink>,
}

impl fmt::Debug for Msix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Msix")
            .field("table", &self.table)
            .field("pba", &self.pba)
            .field("cap_offset", &self.cap_offset)
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .finish()
    }
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Msix {
    /// MSI-X with `vectors` vectors (1..=2048), its table and PBA at the given
    /// BAR locations, delivering through `sink`. Every vector starts masked, MSI-X disabled.
    pub fn new(
        vectors: u16,
        table: MsixLocation,
        pba: MsixLocation,
        sink: Arc<dyn MsiSink>,
    ) -> Result<Self, PciError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(PciError::InvalidMsix("vector count must be 1..=2048"));
        }
        for loc in [table, pba] {
            if usize::from(loc.bar) >= NUM_BARS {
                return Err(PciError::InvalidMsix("BAR index must be 0..=5"));
            }
            if loc.offset % 8 != 0 {
                return Err(PciError::InvalidMsix("offsets must be 8-byte aligned"));
            }
        }
        let n = usize::from(vectors);
        let msix = Msix {
            table,
            pba,
            cap_offset: None,
            entries: vec![MsixEntry::default(); n],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            sink,
        };
        if table.bar == pba.bar
            && ranges_overlap(
                (u64::from(table.offset), msix.table_len()),
                (u64::from(pba.offset), msix.pba_len()),
            )
        {
            return Err(PciError::InvalidMsix("vector table and PBA overlap"));
        }
        Ok(msix)
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        // At most 2048 entries, checked in `new` and `from_state`.
        self.entries.len() as u16
    }
    /// Bytes the vector table occupies in its BAR.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }
    /// Bytes the PBA occupies in its BAR (whole qwords).
    pub fn pba_len(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }
    /// Location of the vector table.
    pub fn table_location(&self) -> MsixLocation {
        self.table
    }
    /// Location of the PBA.
    pub fn pba_location(&self) -> MsixLocation {
        self.pba
    }
    /// Offset of the capability in config space, once added.
    pub fn capability_offset(&self) -> Option<u8> {
        self.cap_offset
    }

    /// Add the MSI-X capability to `config` (only the enable and function-mask
    /// bits are writable) and return its offset.
    pub fn add_capability(&mut self, config: &mut ConfigSpace) -> Result<u8, PciError> {
        let mut body = [0u8; MSIX_CAP_BODY_LEN];
        let control = (self.vectors() - 1) & MSIX_CONTROL_TABLE_SIZE;
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&(self.table.offset | u32::from(self.table.bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(self.pba.offset | u32::from(self.pba.bar)).to_le_bytes());
        let mut writable = [0u8; MSIX_CAP_BODY_LEN];
        writable[1] = ((MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8) as u8;
        let off = config.add_capability(MSIX_CAPABILITY_ID, &body, &writable)?;
        self.cap_offset = Some(off);
        Ok(off)
    }

    /// Re-read the enable and function-mask bits from `config` after a guest
    /// config write; vectors that became deliverable and are pending are sent.
    pub fn config_written(&mut self, config: &ConfigSpace) {
        let Some(cap) = self.cap_offset else {
            return;
        };
        let control = config.read_u16(u16::from(cap) + 2);
        self.enabled = control & MSIX_CONTROL_ENABLE != 0;
        self.function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        for v in 0..self.entries.len() {
            self.deliver_if_pending(v);
        }
    }

    /// Whether MSI-X is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }
    /// Whether the function mask is set.
    pub fn is_function_masked(&self) -> bool {
        self.function_masked
    }
    /// The table entry of `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(vector)).copied()
    }
    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector))
            .copied()
            .unwrap_or(false)
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries.get(v).is_some_and(|e| !e.masked)
    }

    fn send(&self, v: usize) -> Result<(), InterruptError> {
        let e = self.entries.get(v).copied().unwrap_or_default();
        self.sink.send(MsiMessage {
            address: e.address,
            data: e.data,
        })
    }

    fn deliver_if_pending(&mut self, v: usize) {
        if self.pending.get(v) == Some(&true) && self.deliverable(v) {
            if let Some(p) = self.pending.get_mut(v) {
                *p = false;
            }
            if let Err(e) = self.send(v) {
                log::warn!("MSI-X vector {v}: delivery of pending message failed: {e}");
            }
        }
    }

    /// Raise `vector`: send its message when MSI-X is enabled and neither the
    /// function nor the vector is masked, otherwise set its pending bit.
    /// Returns whether the message was sent.
    pub fn notify(&mut self, vector: u16) -> Result<bool, InterruptError> {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            return Err(InterruptError::NotRouted(format!(
                "MSI-X vector {vector} of {}",
                self.entries.len()
            )));
        }
        if self.deliverable(v) {
            self.send(v)?;
            Ok(true)
        } else {
            if let Some(p) = self.pending.get_mut(v) {
                *p = true;
            }
            Ok(false)
        }
    }

    /// Whether a table or PBA access of `len` bytes at `offset` is well formed:
    /// an aligned dword or an aligned qword.
    fn access_ok(offset: u64, len: usize) -> bool {
        matches!(len, 4 | 8) && offset % len as u64 == 0
    }

    fn table_read_dword(&self, offset: u64) -> u32 {
        let Some(e) = usize::try_from(offset / MSIX_ENTRY_SIZE)
            .ok()
            .and_then(|i| self.entries.get(i))
        else {
            return u32::MAX;
        };
        match offset % MSIX_ENTRY_SIZE {
            0 => e.address as u32,
            4 => (e.address >> 32) as u32,
            8 => e.data,
            _ => u32::from(e.masked),
        }
    }

    fn table_write_dword(&mut self, offset: u64, value: u32) {
        let Ok(v) = usize::try_from(offset / MSIX_ENTRY_SIZE) else {
            return;
        };
        let Some(e) = self.entries.get_mut(v) else {
            return;
        };
        match offset % MSIX_ENTRY_SIZE {
            0 => e.address = (e.address & !0xffff_ffff) | u64::from(value),
            4 => e.address = (e.address & 0xffff_ffff) | (u64::from(value) << 32),
            8 => e.data = value,
            _ => {
                e.masked = value & MSIX_VECTOR_MASKED != 0;
                self.deliver_if_pending(v);
            }
        }
    }

    /// Guest read of the vector table at `offset` (relative to the table).
    /// Accesses that are not aligned dwords or qwords read all-ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        if !Self::access_ok(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let v = self.table_read_dword(offset + 4 * i as u64);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Guest write of the vector table at `offset` (relative to the table).
    /// Accesses that are not aligned dwords or qwords are ignored.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if !Self::access_ok(offset, data.len()) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(chunk);
            self.table_write_dword(offset + 4 * i as u64, u32::from_le_bytes(b));
        }
    }

    /// Guest read of the PBA at `offset` (relative to the PBA). Malformed accesses read all-ones.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        if !Self::access_ok(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let first = offset.checked_add(i as u64).and_then(|b| b.checked_mul(8));
            let mut byte = 0u8;
            for bit in 0..8u64 {
                let set = first
                    .and_then(|f| usize::try_from(f + bit).ok())
                    .and_then(|v| self.pending.get(v))
                    .copied()
                    .unwrap_or(false);
                byte |= u8::from(set) << bit;
            }
            *b = byte;
        }
    }

    /// Serve a read of BAR `bar` at `offset` if it falls in the table or PBA;
    /// returns whether it did.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        if let Some(o) = Self::within(self.table, self.table_len(), bar, offset, data.len()) {
            self.table_read(o, data);
            true
        } else if let Some(o) = Self::within(self.pba, self.pba_len(), bar, offset, data.len()) {
            self.pba_read(o, data);
            true
        } else {
            false
        }
    }

    /// Serve a write of BAR `bar` at `offset` if it falls in the table or PBA
    /// (PBA writes are ignored); returns whether it did.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> bool {
        if let Some(o) = Self::within(self.table, self.table_len(), bar, offset, data.len()) {
            self.table_write(o, data);
            true
        } else {
            Self::within(self.pba, self.pba_len(), bar, offset, data.len()).is_some()
        }
    }

    fn within(loc: MsixLocation, len: u64, bar: u8, offset: u64, n: usize) -> Option<u64> {
        if bar != loc.bar {
            return None;
        }
        let rel = offset.checked_sub(u64::from(loc.offset))?;
        (rel.checked_add(n as u64)? <= len).then_some(rel)
    }

    /// Guest-visible state for snapshot.
    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Restore `state` saved from an MSI-X with the same vector count. The
    /// enable and mask bits must agree with the restored config space; call
    /// [`Msix::config_written`] after restoring it.
    pub fn restore(&mut self, state: &MsixState) -> Result<(), PciError> {
        let n = self.entries.len();
        if state.entries.len() != n || state.pending.len() != n {
            return Err(PciError::StateLength {
                expected: n,
                actual: state.entries.len().max(state.pending.len()),
            });
        }
        self.entries.clone_from(&state.entries);
        self.pending.clone_from(&state.pending);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_doubles::RecordingMsiSink;
    use crate::pci::{BarSpec, PciIdentity};
    use proptest::prelude::*;

    fn setup(vectors: u16) -> (Arc<RecordingMsiSink>, ConfigSpace, Msix, u16) {
        let sink = Arc::new(RecordingMsiSink::new());
        let mut cfg = ConfigSpace::new(&PciIdentity::default());
        cfg.add_bar(2, BarSpec::memory32(0x2000)).unwrap();
        let mut m = Msix::new(
            vectors,
            MsixLocation { bar: 2, offset: 0 },
            MsixLocation {
                bar: 2,
                offset: 0x1000,
            },
            sink.clone(),
        )
        .unwrap();
        let cap = u16::from(m.add_capability(&mut cfg).unwrap());
        (sink, cfg, m, cap)
    }

    fn program(m: &mut Msix, v: u64, addr: u64, data: u32, masked: bool) {
        m.bar_write(2, v * 16, &addr.to_le_bytes());
        m.bar_write(2, v * 16 + 8, &data.to_le_bytes());
        m.bar_write(2, v * 16 + 12, &u32::from(masked).to_le_bytes());
    }

    fn control(cfg: &mut ConfigSpace, m: &mut Msix, cap: u16, value: u16) {
        cfg.write(cap + 2, &value.to_le_bytes());
        m.config_written(cfg);
    }

    #[test]
    fn capability_layout() {
        let (_s, mut cfg, _m, cap) = setup(5);
        assert_eq!(cfg.read_u8(cap), MSIX_CAPABILITY_ID);
        assert_eq!(cfg.read_u16(cap + 2), 4);
        assert_eq!(cfg.read_u32(cap + 4), 2);
        assert_eq!(cfg.read_u32(cap + 8), 0x1002);
        cfg.write(cap + 2, &0xffffu16.to_le_bytes());
        assert_eq!(cfg.read_u16(cap + 2), 0xc004);
        cfg.write(cap + 4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(cfg.read_u32(cap + 4), 2);
    }

    #[test]
    fn masking_pending_and_unmask_delivery() {
        let (sink, mut cfg, mut m, cap) = setup(3);
        // Disabled: pending.
        assert!(!m.notify(0).unwrap());
        assert!(m.is_pending(0));
        program(&mut m, 0, 0xfee0_0000, 0x30, false);
        program(&mut m, 1, 0xfee0_1000, 0x31, true);
        // Enable with the function mask set: still pending.
        control(
            &mut cfg,
            &mut m,
            cap,
            MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK,
        );
        assert!(sink.messages().is_empty());
        // Clearing the function mask delivers pending vector 0.
        control(&mut cfg, &mut m, cap, MSIX_CONTROL_ENABLE);
        assert_eq!(
            sink.messages(),
            vec![MsiMessage {
                address: 0xfee0_0000,
                data: 0x30
            }]
        );
        assert!(!m.is_pending(0));
        // Vector 1 is masked: pending, PBA shows bit 1.
        assert!(!m.notify(1).unwrap());
        let mut pba = [0u8; 8];
        m.bar_read(2, 0x1000, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        // Unmasking it delivers and clears the bit.
        m.bar_write(2, 16 + 12, &0u32.to_le_bytes());
        assert_eq!(sink.messages().len(), 2);
        assert_eq!(sink.messages()[1].data, 0x31);
        m.bar_read(2, 0x1000, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0);
        // Direct delivery when everything is open.
        assert!(m.notify(0).unwrap());
        assert_eq!(sink.messages().len(), 3);
        assert!(m.notify(3).is_err());
        // Reads back what was written.
        let mut e = [0u8; 16];
        m.bar_read(2, 0, &mut e[..8]);
        assert_eq!(u64::from_le_bytes(e[..8].try_into().unwrap()), 0xfee0_0000);
        let mut d = [0u8; 4];
        m.bar_read(2, 12, &mut d);
        assert_eq!(d, [0, 0, 0, 0]);
    }

    #[test]
    fn malformed_accesses_are_ignored() {
        let (_s, _cfg, mut m, _cap) = setup(1);
        m.bar_write(2, 1, &[1, 2, 3, 4]);
        m.bar_write(2, 0, &[1, 2]);
        m.bar_write(2, 4, &[0; 8]);
        m.bar_write(2, 0x1000, &[0xff; 8]);
        assert_eq!(m.entry(0), Some(MsixEntry::default()));
        let mut b = [0u8; 2];
        assert!(m.bar_read(2, 0, &mut b));
        assert_eq!(b, [0xff, 0xff]);
        let mut q = [0u8; 8];
        assert!(!m.bar_read(2, 16, &mut q), "past the table");
        assert!(!m.bar_read(1, 0, &mut q), "other BAR");
    }

    #[test]
    fn constructor_checks_and_state() {
        let sink: Arc<dyn MsiSink> = Arc::new(RecordingMsiSink::new());
        let loc = |bar, offset| MsixLocation { bar, offset };
        assert!(Msix::new(0, loc(0, 0), loc(0, 0x800), sink.clone()).is_err());
        assert!(Msix::new(2049, loc(0, 0), loc(1, 0), sink.clone()).is_err());
        assert!(Msix::new(4, loc(6, 0), loc(0, 0x800), sink.clone()).is_err());
        assert!(Msix::new(4, loc(0, 4), loc(0, 0x800), sink.clone()).is_err());
        assert!(Msix::new(4, loc(0, 0), loc(0, 0x30), sink.clone()).is_err());
        let mut m = Msix::new(4, loc(0, 0), loc(0, 0x40), sink.clone()).unwrap();
        m.notify(2).unwrap();
        let s = m.state();
        let mut n = Msix::new(4, loc(0, 0), loc(0, 0x40), sink.clone()).unwrap();
        n.restore(&s).unwrap();
        assert!(n.is_pending(2));
        let mut o = Msix::new(3, loc(0, 0), loc(0, 0x40), sink).unwrap();
        assert!(o.restore(&s).is_err());
    }

    proptest! {
        /// Arbitrary BAR traffic never panics, and a message is only ever sent for an unmasked vector.
        #[test]
        fn random_bar_traffic(ops in proptest::collection::vec((0u8..4, 0u64..0x1100, 0usize..10, any::<u64>()), 0..300)) {
            let (sink, mut cfg, mut m, cap) = setup(7);
            control(&mut cfg, &mut m, cap, MSIX_CONTROL_ENABLE);
            for (kind, off, len, val) in ops {
                let bytes = val.to_le_bytes();
                let len = len.min(8);
                match kind {
                    0 => { m.bar_write(2, off, &bytes[..len]); }
                    1 => { let mut b = vec![0u8; len]; m.bar_read(2, off, &mut b); }
                    2 => {
                        let v = (val % 8) as u16;
                        let before = sink.messages().len();
                        let sent = m.notify(v).unwrap_or(false);
                        if sent { prop_assert!(!m.entry(v).unwrap().masked); }
                        prop_assert_eq!(sink.messages().len(), before + usize::from(sent));
                    }
                    _ => control(&mut cfg, &mut m, cap, val as u16),
                }
            }
        }
    }
}
