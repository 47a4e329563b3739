//! PIO and MMIO address spaces: registration, O(log n) dispatch and trap counters.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// A device that claims a range of a [`Bus`].
///
/// Methods take `&self`: several vCPU threads may call into the same device at
/// once, and the device chooses its own locking. Devices that are simplest to
/// write with `&mut self` implement [`BusDeviceMut`] and are registered inside a
/// [`Mutex`], which implements this trait for them.
///
/// `offset` is relative to the base of the range the device was registered at,
/// and `offset + data.len()` never exceeds that range's length.
pub trait BusDevice: Send + Sync {
    /// Serve a guest read of `data.len()` bytes at `offset`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// Serve a guest write of `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A device with `&mut self` access methods; wrap it in a [`Mutex`] to put it on a bus.
pub trait BusDeviceMut: Send {
    /// Serve a guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Serve a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<T: BusDeviceMut> BusDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // A poisoned lock means another vCPU panicked inside the device; keep serving.
        let mut dev = self.lock().unwrap_or_else(|e| e.into_inner());
        dev.read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut dev = self.lock().unwrap_or_else(|e| e.into_inner());
        dev.write(offset, data)
    }
}

/// Which address space a bus models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressSpace {
    /// x86 port I/O (IN/OUT), 16-bit addresses.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Pio => "PIO",
            AddressSpace::Mmio => "MMIO",
        })
    }
}

/// Errors from changing a bus's registrations.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the end of the address space.
    #[error("{space} range at {base:#x} with length {len:#x} is empty or wraps")]
    InvalidRange {
        /// Address space of the bus.
        space: AddressSpace,
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The range overlaps one that is already registered.
    #[error("{space} range [{base:#x}, +{len:#x}) for {name:?} overlaps {other:?} at [{other_base:#x}, +{other_len:#x})")]
    Overlap {
        /// Address space of the bus.
        space: AddressSpace,
        /// Name of the device being inserted.
        name: String,
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// Name of the device already there.
        other: String,
        /// Base of the range already there.
        other_base: u64,
        /// Length of the range already there.
        other_len: u64,
    },
    /// No range starts at this address.
    #[error("no {space} range starts at {base:#x}")]
    NotFound {
        /// Address space of the bus.
        space: AddressSpace,
        /// The base that was looked up.
        base: u64,
    },
}

/// Live trap counters of one device (shared by every range registered under its name).
#[derive(Debug, Default)]
pub struct TrapCounters {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl TrapCounters {
    fn count_read(&self, len: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
    }
    fn count_write(&self, len: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
    }
    /// A consistent-enough snapshot of the counters (each field is read atomically).
    pub fn snapshot(&self) -> TrapStats {
        TrapStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of trap counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrapStats {
    /// Number of read traps.
    pub reads: u64,
    /// Number of write traps.
    pub writes: u64,
    /// Bytes read by those traps.
    pub bytes_read: u64,
    /// Bytes written by those traps.
    pub bytes_written: u64,
}

impl TrapStats {
    /// Total traps (reads plus writes).
    pub fn traps(&self) -> u64 {
        self.reads + self.writes
    }
    /// Counters accumulated since `earlier`.
    pub fn since(&self, earlier: &TrapStats) -> TrapStats {
        TrapStats {
            reads: self.reads.saturating_sub(earlier.reads),
            writes: self.writes.saturating_sub(earlier.writes),
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
        }
    }
}

/// One registered range, as listed by [`Bus::ranges`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeInfo {
    /// Device name given at registration.
    pub name: String,
    /// First address of the range.
    pub base: u64,
    /// Length of the range in bytes.
    pub len: u64,
}

#[derive(Clone)]
struct Entry {
    len: u64,
    name: Arc<str>,
    device: Arc<dyn BusDevice>,
    counters: Arc<TrapCounters>,
}

/// The result of a lookup: the device that claims an address and the offset into its range.
#[derive(Clone)]
pub struct Claim {
    /// The device.
    pub device: Arc<dyn BusDevice>,
    /// Offset of the address from the base of the device's range.
    pub offset: u64,
    /// Base of the range.
    pub base: u64,
}

/// A PIO or MMIO address space.
///
/// Dispatch is lock-free: the range map is an immutable snapshot swapped
/// atomically when a device is inserted, removed or relocated, so vCPU threads
/// never contend on a bus-wide lock. Changes are serialised among themselves.
pub struct Bus {
    space: AddressSpace,
    ranges: ArcSwap<BTreeMap<u64, Entry>>,
    update: Mutex<HashMap<Arc<str>, Arc<TrapCounters>>>,
    unclaimed: TrapCounters,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bus")
            .field("space", &self.space)
            .field("ranges", &self.ranges())
            .finish()
    }
}

impl Bus {
    /// An empty bus for `space`.
    pub fn new(space: AddressSpace) -> Self {
        Bus {
            space,
            ranges: ArcSwap::from_pointee(BTreeMap::new()),
            update: Mutex::new(HashMap::new()),
            unclaimed: TrapCounters::default(),
        }
    }

    /// The address space this bus models.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    fn overlap(map: &BTreeMap<u64, Entry>, base: u64, len: u64) -> Option<(u64, &Entry)> {
        let end = base + len - 1; // callers checked that this does not wrap
                                  // The only candidates are the last range starting at or before `end`.
        map.range(..=end)
            .next_back()
            .filter(|(b, e)| **b + (e.len - 1) >= base)
            .map(|(b, e)| (*b, e))
    }

    /// Register `device` under `name` at `[base, base + len)`.
    ///
    /// Ranges registered under the same name share one set of trap counters.
    pub fn insert(
        &self,
        name: &str,
        base: u64,
        len: u64,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange {
                space: self.space,
                base,
                len,
            });
        }
        let mut names = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.ranges.load();
        if let Some((other_base, other)) = Self::overlap(&current, base, len) {
            return Err(BusError::Overlap {
                space: self.space,
                name: name.to_string(),
                base,
                len,
                other: other.name.to_string(),
                other_base,
                other_len: other.len,
            });
        }
        let (name, counters) = match names.get_key_value(name) {
            Some((n, c)) => (n.clone(), c.clone()),
            None => {
                let n: Arc<str> = Arc::from(name);
                let c = Arc::new(TrapCounters::default());
                names.insert(n.clone(), c.clone());
                (n, c)
            }
        };
        let mut next = BTreeMap::clone(&current);
        next.insert(
            base,
            Entry {
                len,
                name,
                device,
                counters,
            },
        );
        self.ranges.store(Arc::new(next));
        Ok(())
    }

    /// Remove the range that starts at `base`, returning its device.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.ranges.load();
        let mut next = BTreeMap::clone(&current);
        let entry = next.remove(&base).ok_or(BusError::NotFound {
            space: self.space,
            base,
        })?;
        self.ranges.store(Arc::new(next));
        Ok(entry.device)
    }

    /// Move the range that starts at `old_base` to `new_base` in one atomic step
    /// (for example when a guest reprograms a PCI BAR). Counters are kept.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let _guard = self.update.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.ranges.load();
        let mut next = BTreeMap::clone(&current);
        let entry = next.remove(&old_base).ok_or(BusError::NotFound {
            space: self.space,
            base: old_base,
        })?;
        let len = entry.len;
        if new_base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange {
                space: self.space,
                base: new_base,
                len,
            });
        }
        if let Some((other_base, other)) = Self::overlap(&next, new_base, len) {
            return Err(BusError::Overlap {
                space: self.space,
                name: entry.name.to_string(),
                base: new_base,
                len,
                other: other.name.to_string(),
                other_base,
                other_len: other.len,
            });
        }
        next.insert(new_base, entry);
        self.ranges.store(Arc::new(next));
        Ok(())
    }

    /// The device claiming `addr`, if any. An access is claimed only when all of
    /// `[addr, addr + len)` lies inside one range.
    pub fn lookup(&self, addr: u64, len: usize) -> Option<Claim> {
        let map = self.ranges.load();
        Self::find(&map, addr, len).map(|(base, e)| Claim {
            device: e.device.clone(),
            offset: addr - base,
            base,
        })
    }

    fn find(map: &BTreeMap<u64, Entry>, addr: u64, len: usize) -> Option<(u64, &Entry)> {
        let (base, e) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        (end <= e.len).then_some((*base, e))
    }

    /// Dispatch a guest read. Returns whether a device claimed it; unclaimed
    /// reads fill `data` with all-ones and are counted.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let map = self.ranges.load();
        match Self::find(&map, addr, data.len()) {
            Some((base, e)) => {
                e.counters.count_read(data.len());
                e.device.read(addr - base, data);
                true
            }
            None => {
                self.unclaimed.count_read(data.len());
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a guest write. Returns whether a device claimed it; unclaimed
    /// writes are dropped and counted.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let map = self.ranges.load();
        match Self::find(&map, addr, data.len()) {
            Some((base, e)) => {
                e.counters.count_write(data.len());
                e.device.write(addr - base, data);
                true
            }
            None => {
                self.unclaimed.count_write(data.len());
                false
            }
        }
    }

    /// Trap counters of the device registered as `name`.
    pub fn stats(&self, name: &str) -> Option<TrapStats> {
        let names = self.update.lock().unwrap_or_else(|e| e.into_inner());
        names.get(name).map(|c| c.snapshot())
    }

    /// Trap counters of every device ever registered, by name.
    pub fn all_stats(&self) -> BTreeMap<String, TrapStats> {
        let names = self.update.lock().unwrap_or_else(|e| e.into_inner());
        names
            .iter()
            .map(|(n, c)| (n.to_string(), c.snapshot()))
            .collect()
    }

    /// Counters of accesses that no device claimed.
    pub fn unclaimed_stats(&self) -> TrapStats {
        self.unclaimed.snapshot()
    }

    /// The registered ranges, in address order.
    pub fn ranges(&self) -> Vec<RangeInfo> {
        self.ranges
            .load()
            .iter()
            .map(|(b, e)| RangeInfo {
                name: e.name.to_string(),
                base: *b,
                len: e.len,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Echoes the offset of the access, for checking dispatch.
    struct Probe;
    impl BusDevice for Probe {
        fn read(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn dispatch_overlap_and_unclaimed() {
        let bus = Bus::new(AddressSpace::Pio);
        bus.insert("uart", 0x3f8, 8, Arc::new(Probe)).unwrap();
        let err = bus.insert("other", 0x3fc, 8, Arc::new(Probe)).unwrap_err();
        assert!(matches!(err, BusError::Overlap { .. }), "{err}");
        assert!(bus.insert("zero", 0x10, 0, Arc::new(Probe)).is_err());
        assert!(bus
            .insert("wrap", u64::MAX - 1, 4, Arc::new(Probe))
            .is_err());

        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        let mut w = [0u8; 2];
        // Straddles the end of the range: unclaimed, all ones.
        assert!(!bus.read(0x3ff, &mut w));
        assert_eq!(w, [0xff, 0xff]);
        assert!(!bus.write(0x80, &[1]));
        assert_eq!(bus.unclaimed_stats().reads, 1);
        assert_eq!(bus.unclaimed_stats().writes, 1);
        let s = bus.stats("uart").unwrap();
        assert_eq!((s.reads, s.bytes_read), (1, 1));

        bus.relocate(0x3f8, 0x2f8).unwrap();
        assert!(bus.read(0x2f8, &mut b));
        assert_eq!(bus.stats("uart").unwrap().reads, 2);
        bus.remove(0x2f8).unwrap();
        assert!(bus.remove(0x2f8).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        Lookup(u64, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..256, 1u64..32).prop_map(|(b, l)| Op::Insert(b, l)),
            (0u64..256).prop_map(Op::Remove),
            (0u64..300, 1usize..9).prop_map(|(a, l)| Op::Lookup(a, l)),
        ]
    }

    proptest! {
        /// Random insert/remove/lookup sequences agree with a linear-scan model.
        #[test]
        fn agrees_with_model(ops in proptest::collection::vec(op(), 1..200)) {
            let bus = Bus::new(AddressSpace::Mmio);
            let mut model: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Insert(b, l) => {
                        let overlaps = model.iter().any(|&(mb, ml)| b < mb + ml && mb < b + l);
                        let r = bus.insert(&format!("d{b}"), b, l, Arc::new(Probe));
                        prop_assert_eq!(r.is_ok(), !overlaps);
                        if !overlaps { model.push((b, l)); }
                    }
                    Op::Remove(b) => {
                        let pos = model.iter().position(|&(mb, _)| mb == b);
                        prop_assert_eq!(bus.remove(b).is_ok(), pos.is_some());
                        if let Some(p) = pos { model.remove(p); }
                    }
                    Op::Lookup(a, l) => {
                        let want = model.iter().find(|&&(mb, ml)| a >= mb && a + l as u64 <= mb + ml);
                        let got = bus.lookup(a, l).map(|c| (c.base, c.offset));
                        prop_assert_eq!(got, want.map(|&(mb, _)| (mb, a - mb)));
                    }
                }
            }
            let mut listed: Vec<(u64, u64)> = bus.ranges().iter().map(|r| (r.base, r.len)).collect();
            model.sort();
            listed.sort();
            prop_assert_eq!(listed, model);
        }
    }
}
