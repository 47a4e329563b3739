//! The PCI root: configuration mechanism #1 on ports 0xCF8..0xCFF and BAR registration.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::config::{BarMapping, NUM_BARS};
use super::{PciAddress, PciError, PciFunction};
use crate::{AddressSpace, Bus, BusDevice};

/// First port of configuration mechanism #1 (the address register at 0xCF8, data at 0xCFC).
pub const CONFIG_PORT: u64 = 0xcf8;
/// Ports the root claims: the address dword and the data dword.
pub const CONFIG_PORT_LEN: u64 = 8;
/// Address register bit 31: the next data-port access is a config cycle.
pub const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of the address register that are stored: enable, bus, device, function, dword register.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

/// A BAR moved: it was registered at `old` (if anywhere) and is now registered at `new` (if anywhere).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarEvent {
    /// The function owning the BAR.
    pub function: PciAddress,
    /// BAR index.
    pub bar: u8,
    /// Bus the BAR lives on.
    pub space: AddressSpace,
    /// Size of the BAR.
    pub size: u64,
    /// Previous base, `None` if it was not registered.
    pub old: Option<u64>,
    /// New base, `None` if it is no longer registered.
    pub new: Option<u64>,
}

/// Told about every BAR registration change (for example to move ioeventfds).
///
/// Called with the root's lock held: it must not call back into the [`PciRoot`].
pub trait BarObserver: Send + Sync {
    /// A BAR was registered, moved or unregistered.
    fn bar_moved(&self, event: &BarEvent);
}

type SharedFunction = Arc<Mutex<dyn PciFunction>>;

fn lock<'a>(f: &'a Mutex<dyn PciFunction>) -> MutexGuard<'a, dyn PciFunction + 'static> {
    // A poisoned lock means another vCPU panicked inside the device; keep serving.
    f.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bus device registered for one BAR: forwards to the function's `bar_read`/`bar_write`.
struct BarRegion {
    function: SharedFunction,
    bar: u8,
}

impl BusDevice for BarRegion {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.function).bar_read(self.bar, offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        lock(&self.function).bar_write(self.bar, offset, data)
    }
}

struct Slot {
    function: SharedFunction,
    mapped: [Option<BarMapping>; NUM_BARS],
}

struct Inner {
    address: u32,
    slots: BTreeMap<u8, Slot>,
    observer: Option<Arc<dyn BarObserver>>,
    reset_control: u8,
    reset_handler: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// Offset of the PIIX reset control register (port 0xCF9) inside the 0xCF8 window.
const RESET_CONTROL: u64 = 1;
/// Reset control: bit 1 selects a full system reset (rather than a soft CPU reset).
pub const RESET_CONTROL_SYS_RST: u8 = 1 << 1;
/// Reset control: a 0 → 1 transition of bit 2 resets the machine.
pub const RESET_CONTROL_RST_CPU: u8 = 1 << 2;

/// A PCI root bus (bus 0) reached through configuration mechanism #1.
///
/// Register it on the PIO bus at [`CONFIG_PORT`] with length
/// [`CONFIG_PORT_LEN`] (or call [`PciRoot::register`]). Port 0xCF8 is the
/// dword address register (bit 31 enable, bus 23:16, device 15:11, function
/// 10:8, register 7:2); ports 0xCFC..=0xCFF carry byte, word or dword config
/// data at the matching byte offset. Missing functions read all-ones.
///
/// Whenever a config write changes where a BAR decodes, the root inserts,
/// relocates or removes a range named like `"00:04.0-bar0"` on the PIO or
/// MMIO bus and tells the [`BarObserver`], if one is set.
///
/// The root holds its buses weakly (the PIO bus holds the root), so there is
/// no reference cycle: the VMM keeps the buses alive, and BAR changes after
/// the buses are dropped are ignored.
///
/// ```
/// use std::sync::Arc;
/// use iovirt_bus::pci::{BarSpec, ConfigSpace, PciAddress, PciFunction, PciIdentity, PciRoot};
/// use iovirt_bus::{AddressSpace, Bus};
///
/// /// A function with one 4 KiB memory BAR that reads back 0x5a.
/// struct Dev(ConfigSpace);
/// impl PciFunction for Dev {
///     fn config(&self) -> &ConfigSpace { &self.0 }
///     fn config_mut(&mut self) -> &mut ConfigSpace { &mut self.0 }
///     fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) { data.fill(0x5a) }
/// }
///
/// let pio = Arc::new(Bus::new(AddressSpace::Pio));
/// let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
/// let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
/// root.register().unwrap(); // pio.insert("pci-root", 0xcf8, 8, root.clone())
///
/// let mut cfg = ConfigSpace::new(&PciIdentity { vendor_id: 0x1af4, device_id: 0x1000, ..Default::default() });
/// cfg.add_bar(0, BarSpec::memory32(0x1000)).unwrap();
/// let dev = root.add_function(PciAddress::new(0, 4, 0).unwrap(), Dev(cfg)).unwrap();
///
/// // The guest: read the vendor ID, program BAR0, enable memory decode.
/// let config = |reg: u32| (0x8000_0000u32 | (4 << 11) | reg).to_le_bytes();
/// pio.write(0xcf8, &config(0x00));
/// let mut id = [0u8; 2];
/// pio.read(0xcfc, &mut id);
/// assert_eq!(u16::from_le_bytes(id), 0x1af4);
/// pio.write(0xcf8, &config(0x10));
/// pio.write(0xcfc, &0xfebf_0000u32.to_le_bytes());
/// pio.write(0xcf8, &config(0x04));
/// pio.write(0xcfc, &[0x02, 0x00]);
///
/// let mut b = [0u8; 4];
/// assert!(mmio.read(0xfebf_0010, &mut b));
/// assert_eq!(b, [0x5a; 4]);
/// assert_eq!(mmio.ranges()[0].name, "00:04.0-bar0");
/// # let _ = dev;
/// ```
pub struct PciRoot {
    pio: Weak<Bus>,
    mmio: Weak<Bus>,
    inner: Mutex<Inner>,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        let functions: Vec<String> = inner
            .slots
            .keys()
            .map(|d| PciAddress::from_devfn(0, *d).to_string())
            .collect();
        f.debug_struct("PciRoot")
            .field("address", &format_args!("{:#010x}", inner.address))
            .field("functions", &functions)
            .finish()
    }
}

impl PciRoot {
    /// An empty root that registers BARs on `pio` and `mmio`.
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        PciRoot {
            pio: Arc::downgrade(&pio),
            mmio: Arc::downgrade(&mmio),
            inner: Mutex::new(Inner {
                address: 0,
                slots: BTreeMap::new(),
                observer: None,
                reset_control: 0,
                reset_handler: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register the root on its PIO bus at 0xCF8..=0xCFF as `"pci-root"`.
    pub fn register(self: &Arc<Self>) -> Result<(), PciError> {
        let pio = self.bus(AddressSpace::Pio).ok_or(PciError::BusGone)?;
        pio.insert("pci-root", CONFIG_PORT, CONFIG_PORT_LEN, self.clone())?;
        Ok(())
    }

    /// Set the handler called when the guest resets the machine through the
    /// PIIX reset control register at port 0xCF9 (Linux `reboot=pci`): a
    /// byte write that sets bit 2 ([`RESET_CONTROL_RST_CPU`]).
    pub fn set_reset_handler(&self, handler: Arc<dyn Fn() + Send + Sync>) {
        self.lock().reset_handler = Some(handler);
    }

    /// Set the observer told about every BAR registration change.
    pub fn set_bar_observer(&self, observer: Arc<dyn BarObserver>) {
        self.lock().observer = Some(observer);
    }

    /// Add `function` at `addr` and return a handle to it for the VMM (for
    /// device-side work such as raising MSI-X vectors). BARs that already
    /// decode are registered right away.
    pub fn add_function<F: PciFunction + 'static>(
        &self,
        addr: PciAddress,
        function: F,
    ) -> Result<Arc<Mutex<F>>, PciError> {
        let f = Arc::new(Mutex::new(function));
        self.add_shared_function(addr, f.clone())?;
        Ok(f)
    }

    /// Add a function the caller already shares, at `addr`.
    pub fn add_shared_function(
        &self,
        addr: PciAddress,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<(), PciError> {
        addr.check()?;
        if addr.bus != 0 {
            return Err(PciError::UnsupportedBus(addr));
        }
        let mut inner = self.lock();
        let devfn = addr.devfn();
        if inner.slots.contains_key(&devfn) {
            return Err(PciError::AddressInUse(addr));
        }
        inner.slots.insert(
            devfn,
            Slot {
                function,
                mapped: [None; NUM_BARS],
            },
        );
        self.sync_slot(&mut inner, devfn);
        Ok(())
    }

    /// Re-evaluate the BARs of the function at `addr` (after the VMM changed
    /// its config space directly, for example when restoring a snapshot).
    pub fn refresh_bars(&self, addr: PciAddress) -> Result<(), PciError> {
        let mut inner = self.lock();
        let devfn = addr.devfn();
        if addr.bus != 0 || !inner.slots.contains_key(&devfn) {
            return Err(PciError::NoFunction(addr));
        }
        self.sync_slot(&mut inner, devfn);
        Ok(())
    }

    /// Addresses of the registered functions, in order.
    pub fn functions(&self) -> Vec<PciAddress> {
        self.lock()
            .slots
            .keys()
            .map(|d| PciAddress::from_devfn(0, *d))
            .collect()
    }

    /// The current contents of the config address register.
    pub fn config_address(&self) -> u32 {
        self.lock().address
    }

    fn bus(&self, space: AddressSpace) -> Option<Arc<Bus>> {
        match space {
            AddressSpace::Pio => self.pio.upgrade(),
            AddressSpace::Mmio => self.mmio.upgrade(),
        }
    }

    /// Bring the bus registrations of the function at `devfn` in line with its BARs.
    fn sync_slot(&self, inner: &mut Inner, devfn: u8) {
        let Some(slot) = inner.slots.get_mut(&devfn) else {
            return;
        };
        let addr = PciAddress::from_devfn(0, devfn);
        let wanted: [Option<BarMapping>; NUM_BARS] = {
            let f = lock(&slot.function);
            let mut w = [None; NUM_BARS];
            for (i, m) in w.iter_mut().enumerate() {
                *m = f.config().bar_mapping(i as u8);
            }
            w
        };
        let (Some(pio), Some(mmio)) = (self.bus(AddressSpace::Pio), self.bus(AddressSpace::Mmio))
        else {
            return; // the VM is being torn down
        };
        let bus = |space| match space {
            AddressSpace::Pio => &pio,
            AddressSpace::Mmio => &mmio,
        };
        let mut events = Vec::new();
        for (i, want) in wanted.into_iter().enumerate() {
            let bar = i as u8;
            let old = slot.mapped[i];
            if old == want {
                continue;
            }
            let mut now = None;
            match (old, want) {
                (Some(o), Some(n)) if o.space == n.space && o.size == n.size => {
                    match bus(n.space).relocate(o.base, n.base) {
                        Ok(()) => now = Some(n),
                        Err(e) => {
                            log::warn!("PCI {addr} BAR{bar}: cannot move to {:#x}: {e}", n.base);
                            let _ = bus(o.space).remove(o.base);
                        }
                    }
                }
                _ => {
                    if let Some(o) = old {
                        let _ = bus(o.space).remove(o.base);
                    }
                    if let Some(n) = want {
                        let region = Arc::new(BarRegion {
                            function: slot.function.clone(),
                            bar,
                        });
                        let name = format!("{addr}-bar{bar}");
                        match bus(n.space).insert(&name, n.base, n.size, region) {
                            Ok(()) => now = Some(n),
                            Err(e) => {
                                log::warn!("PCI {addr} BAR{bar}: cannot map at {:#x}: {e}", n.base)
                            }
                        }
                    }
                }
            }
            slot.mapped[i] = now;
            if let (Some(m), true) = (now.or(old), now != old) {
                events.push(BarEvent {
                    function: addr,
                    bar,
                    space: m.space,
                    size: m.size,
                    old: old.map(|o| o.base),
                    new: now.map(|n| n.base),
                });
            }
        }
        if let Some(obs) = &inner.observer {
            for e in &events {
                obs.bar_moved(e);
            }
        }
    }

    /// The function and config offset the data port at byte `k` addresses, if enabled and present.
    fn target(inner: &Inner, k: u64, len: usize) -> Option<(u8, u16)> {
        let a = inner.address;
        if a & CONFIG_ADDRESS_ENABLE == 0 || k + len as u64 > 4 {
            return None;
        }
        if (a >> 16) & 0xff != 0 {
            return None; // only bus 0 exists
        }
        let devfn = ((a >> 8) & 0xff) as u8;
        if !inner.slots.contains_key(&devfn) {
            return None;
        }
        Some((devfn, (a & 0xfc) as u16 + k as u16))
    }
}

impl BusDevice for PciRoot {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let inner = self.lock();
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&inner.address.to_le_bytes()),
            RESET_CONTROL if data.len() == 1 => data[0] = inner.reset_control,
            4..=7 => {
                let Some((devfn, reg)) = Self::target(&inner, offset - 4, data.len()) else {
                    data.fill(0xff);
                    return;
                };
                match inner.slots.get(&devfn) {
                    Some(slot) => lock(&slot.function).config_read(reg, data),
                    None => data.fill(0xff),
                }
            }
            // Byte and word accesses to 0xCF8..0xCFB are not config cycles.
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut inner = self.lock();
        match offset {
            0 if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                inner.address = u32::from_le_bytes(b) & CONFIG_ADDRESS_MASK;
            }
            RESET_CONTROL if data.len() == 1 => {
                let old = inner.reset_control;
                let new = data[0] & (RESET_CONTROL_SYS_RST | RESET_CONTROL_RST_CPU);
                inner.reset_control = new & RESET_CONTROL_SYS_RST;
                if old & RESET_CONTROL_RST_CPU == 0 && new & RESET_CONTROL_RST_CPU != 0 {
                    let handler = inner.reset_handler.clone();
                    drop(inner);
                    log::info!("guest reset through port 0xCF9 ({new:#04x})");
                    if let Some(h) = handler {
                        h();
                    }
                }
            }
            4..=7 => {
                let Some((devfn, reg)) = Self::target(&inner, offset - 4, data.len()) else {
                    return;
                };
                if let Some(slot) = inner.slots.get(&devfn) {
                    lock(&slot.function).config_write(reg, data);
                }
                self.sync_slot(&mut inner, devfn);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_control_port_calls_the_handler() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let pio = Arc::new(Bus::new(crate::AddressSpace::Pio));
        let mmio = Arc::new(Bus::new(crate::AddressSpace::Mmio));
        let root = Arc::new(PciRoot::new(pio.clone(), mmio));
        root.register().unwrap();
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        root.set_reset_handler(Arc::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        // Linux's reboot=pci: 0x02 (select hard reset), then 0x06 (go).
        pio.write(0xcf9, &[0x02]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        let mut b = [0u8; 1];
        pio.read(0xcf9, &mut b);
        assert_eq!(b, [0x02]);
        pio.write(0xcf9, &[0x06]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        // A dword write to 0xCF8 is still the config address, not a reset.
        pio.write(0xcf8, &0x8000_0000u32.to_le_bytes());
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
    use crate::interrupt::test_doubles::RecordingMsiSink;
    use crate::pci::*;
    use proptest::prelude::*;

    #[derive(Debug)]
    struct Dev {
        cfg: ConfigSpace,
        msix: Msix,
        last_write: Option<(u8, u64, Vec<u8>)>,
    }

    impl PciFunction for Dev {
        fn config(&self) -> &ConfigSpace {
            &self.cfg
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.cfg
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) {
            self.cfg.write(offset, data);
            self.msix.config_written(&self.cfg);
        }
        fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            if !self.msix.bar_read(bar, offset, data) {
                data.fill(bar);
            }
        }
        fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
            if !self.msix.bar_write(bar, offset, data) {
                self.last_write = Some((bar, offset, data.to_vec()));
            }
        }
    }

    fn dev(sink: Arc<RecordingMsiSink>) -> Dev {
        let mut cfg = ConfigSpace::new(&PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            class: ClassCode {
                class: 2,
                subclass: 0,
                prog_if: 0,
            },
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            multi_function: false,
        });
        cfg.add_bar(0, BarSpec::memory32(0x1000)).unwrap();
        cfg.add_bar(1, BarSpec::io(0x20)).unwrap();
        cfg.add_bar(2, BarSpec::memory64(0x4000).prefetchable())
            .unwrap();
        let mut msix = Msix::new(
            4,
            MsixLocation { bar: 2, offset: 0 },
            MsixLocation {
                bar: 2,
                offset: 0x2000,
            },
            sink,
        )
        .unwrap();
        msix.add_capability(&mut cfg).unwrap();
        Dev {
            cfg,
            msix,
            last_write: None,
        }
    }

    #[derive(Default)]
    struct Events(Mutex<Vec<BarEvent>>);
    impl BarObserver for Events {
        fn bar_moved(&self, event: &BarEvent) {
            self.0.lock().unwrap().push(*event);
        }
    }

    struct Vm {
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        root: Arc<PciRoot>,
        events: Arc<Events>,
        sink: Arc<RecordingMsiSink>,
        dev: Arc<Mutex<Dev>>,
    }

    fn vm() -> Vm {
        let pio = Arc::new(Bus::new(AddressSpace::Pio));
        let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
        let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
        root.register().unwrap();
        let events = Arc::new(Events::default());
        root.set_bar_observer(events.clone());
        let sink = Arc::new(RecordingMsiSink::new());
        let dev = root
            .add_function(PciAddress::new(0, 4, 0).unwrap(), dev(sink.clone()))
            .unwrap();
        Vm {
            pio,
            mmio,
            root,
            events,
            sink,
            dev,
        }
    }

    fn select(pio: &Bus, dev: u32, reg: u32) {
        pio.write(0xcf8, &(0x8000_0000 | (dev << 11) | reg).to_le_bytes());
    }
    fn cfg_write32(pio: &Bus, dev: u32, reg: u32, v: u32) {
        select(pio, dev, reg);
        pio.write(0xcfc, &v.to_le_bytes());
    }
    fn cfg_read32(pio: &Bus, dev: u32, reg: u32) -> u32 {
        select(pio, dev, reg);
        let mut b = [0u8; 4];
        pio.read(0xcfc, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mechanism1_byte_word_dword() {
        let v = vm();
        let pio = &v.pio;
        // Address register reads back (reserved and low bits dropped).
        pio.write(0xcf8, &0xffff_ffffu32.to_le_bytes());
        let mut a = [0u8; 4];
        pio.read(0xcf8, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x80ff_fffc);
        assert_eq!(cfg_read32(pio, 4, 0), 0x1041_1af4);
        // Word at 0xCFE is the device ID, bytes at each offset.
        select(pio, 4, 0);
        let mut w = [0u8; 2];
        pio.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1041);
        let mut b = [0u8; 1];
        for (port, want) in [(0xcfc, 0xf4), (0xcfd, 0x1a), (0xcfe, 0x41), (0xcff, 0x10)] {
            pio.read(port, &mut b);
            assert_eq!(b[0], want, "port {port:#x}");
        }
        // Header type via a byte read of register 0x0c + 2.
        select(pio, 4, 0x0c);
        pio.read(0xcfe, &mut b);
        assert_eq!(b[0], 0);
        // Byte write to the interrupt line at 0xCFC + 0.
        select(pio, 4, 0x3c);
        pio.write(0xcfc, &[11]);
        assert_eq!(cfg_read32(pio, 4, 0x3c) & 0xff, 11);
        // Word write to the command register through 0xCFC, status W1C at 0xCFE.
        select(pio, 4, 0x04);
        pio.write(0xcfc, &0x0507u16.to_le_bytes());
        assert_eq!(cfg_read32(pio, 4, 4) & 0xffff, 0x0507);
        // Missing function, other bus, disabled address: all ones, writes dropped.
        assert_eq!(cfg_read32(pio, 5, 0), 0xffff_ffff);
        pio.write(0xcf8, &(0x8001_0000u32 | (4 << 11)).to_le_bytes());
        pio.read(0xcfc, &mut a);
        assert_eq!(a, [0xff; 4]);
        pio.write(0xcf8, &(4u32 << 11).to_le_bytes());
        pio.read(0xcfc, &mut a);
        assert_eq!(a, [0xff; 4]);
        // Byte/word accesses to the address register are not config cycles.
        pio.write(0xcf8, &0x8000_2000u32.to_le_bytes());
        pio.write(0xcf9, &[0x06]);
        pio.write(0xcf8, &[0x00, 0x00]);
        assert_eq!(v.root.config_address(), 0x8000_2000);
        pio.read(0xcfa, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        // The capability list is visible.
        assert_ne!(
            cfg_read32(pio, 4, 4) & (u32::from(STATUS_CAPABILITIES_LIST) << 16),
            0
        );
        let cap = cfg_read32(pio, 4, 0x34) & 0xff;
        assert_eq!(
            cfg_read32(pio, 4, cap) & 0xff,
            u32::from(MSIX_CAPABILITY_ID)
        );
    }

    #[test]
    fn no_reference_cycle() {
        let v = vm();
        cfg_write32(&v.pio, 4, 0x10, 0xfebf_0000);
        cfg_write32(&v.pio, 4, 0x04, 0x2);
        let root = Arc::downgrade(&v.root);
        let dev = Arc::downgrade(&v.dev);
        drop(v);
        assert!(root.upgrade().is_none(), "the PIO bus kept the root alive");
        assert!(
            dev.upgrade().is_none(),
            "the MMIO bus kept the function alive"
        );
        // A root whose buses are gone cannot register and does not panic.
        let pio = Arc::new(Bus::new(AddressSpace::Pio));
        let root = Arc::new(PciRoot::new(pio.clone(), pio.clone()));
        drop(pio);
        assert_eq!(root.register(), Err(PciError::BusGone));
        root.add_function(PciAddress::new(0, 4, 0).unwrap(), dev_fn())
            .unwrap();
        root.write(0, &0x8000_2004u32.to_le_bytes());
        root.write(4, &[0x03, 0x00]);
    }

    fn dev_fn() -> Dev {
        dev(Arc::new(RecordingMsiSink::new()))
    }

    #[test]
    fn errors_on_add() {
        let v = vm();
        let s = Arc::new(RecordingMsiSink::new());
        let a = PciAddress::new(0, 4, 0).unwrap();
        assert_eq!(
            v.root.add_function(a, dev(s.clone())).unwrap_err(),
            PciError::AddressInUse(a)
        );
        let b1 = PciAddress {
            bus: 1,
            device: 0,
            function: 0,
        };
        assert_eq!(
            v.root.add_function(b1, dev(s.clone())).unwrap_err(),
            PciError::UnsupportedBus(b1)
        );
        assert!(PciAddress::new(0, 32, 0).is_err());
        let bad = PciAddress {
            bus: 0,
            device: 0,
            function: 8,
        };
        assert_eq!(
            v.root.add_function(bad, dev(s)).unwrap_err(),
            PciError::InvalidAddress(bad)
        );
        assert_eq!(v.root.functions(), vec![a]);
        assert_eq!(a.to_string(), "00:04.0");
    }

    #[test]
    fn bar_relocation_registers_on_buses() {
        let v = vm();
        let (pio, mmio) = (&v.pio, &v.mmio);
        // Program while decode is off: nothing registered.
        cfg_write32(pio, 4, 0x10, 0xfebf_0000);
        cfg_write32(pio, 4, 0x14, 0xc000);
        cfg_write32(pio, 4, 0x18, 0x0000_0000);
        cfg_write32(pio, 4, 0x1c, 0x1);
        assert!(mmio.ranges().is_empty());
        assert_eq!(pio.ranges().len(), 1);
        // Turn decode on.
        cfg_write32(pio, 4, 0x04, 0x3);
        let names: Vec<_> = mmio
            .ranges()
            .into_iter()
            .map(|r| (r.name, r.base, r.len))
            .collect();
        assert_eq!(
            names,
            vec![
                ("00:04.0-bar0".to_string(), 0xfebf_0000, 0x1000),
                ("00:04.0-bar2".to_string(), 0x1_0000_0000, 0x4000),
            ]
        );
        assert!(pio
            .ranges()
            .iter()
            .any(|r| r.name == "00:04.0-bar1" && r.base == 0xc000));
        // BAR accesses reach the function with the right BAR and offset.
        let mut b = [0u8; 2];
        assert!(pio.read(0xc002, &mut b));
        assert_eq!(b, [1, 1]);
        assert!(mmio.write(0xfebf_0008, &[9, 8, 7, 6]));
        assert_eq!(
            v.dev.lock().unwrap().last_write,
            Some((0, 8, vec![9, 8, 7, 6]))
        );
        // Move BAR0: relocated, counters kept, old address unclaimed.
        cfg_write32(pio, 4, 0x10, 0xfebe_0000);
        assert!(!mmio.read(0xfebf_0000, &mut b));
        assert!(mmio.read(0xfebe_0000, &mut b));
        assert_eq!(mmio.stats("00:04.0-bar0").unwrap().traps(), 2);
        // Sizing BAR0 unregisters it; restoring re-registers.
        cfg_write32(pio, 4, 0x10, 0xffff_ffff);
        assert_eq!(cfg_read32(pio, 4, 0x10), 0xffff_f000);
        assert!(!mmio.read(0xfebe_0000, &mut b));
        cfg_write32(pio, 4, 0x10, 0xfebe_0000);
        assert!(mmio.read(0xfebe_0000, &mut b));
        // A 64-bit move is not registered halfway.
        cfg_write32(pio, 4, 0x18, 0x2000_0000);
        assert!(!mmio.ranges().iter().any(|r| r.name == "00:04.0-bar2"));
        cfg_write32(pio, 4, 0x1c, 0x0);
        assert!(mmio
            .ranges()
            .iter()
            .any(|r| r.name == "00:04.0-bar2" && r.base == 0x2000_0000));
        // Memory decode off removes the memory BARs, leaves the I/O BAR.
        cfg_write32(pio, 4, 0x04, 0x1);
        assert!(mmio.ranges().is_empty());
        assert!(pio.ranges().iter().any(|r| r.name == "00:04.0-bar1"));
        // A BAR placed over another device is not registered (and not a panic).
        cfg_write32(pio, 4, 0x14, 0xcf8 & !0x1f);
        assert!(!pio.ranges().iter().any(|r| r.name == "00:04.0-bar1"));
        assert_eq!(cfg_read32(pio, 4, 0), 0x1041_1af4, "root still answers");

        let ev = v.events.0.lock().unwrap().clone();
        let bar0: Vec<_> = ev
            .iter()
            .filter(|e| e.bar == 0)
            .map(|e| (e.old, e.new))
            .collect();
        assert_eq!(
            bar0,
            vec![
                (None, Some(0xfebf_0000)),
                (Some(0xfebf_0000), Some(0xfebe_0000)),
                (Some(0xfebe_0000), None),
                (None, Some(0xfebe_0000)),
                (Some(0xfebe_0000), None),
            ]
        );
        assert!(ev
            .iter()
            .all(|e| e.function == PciAddress::new(0, 4, 0).unwrap()));
        let bar1_last = ev.iter().rev().find(|e| e.bar == 1).unwrap();
        assert_eq!(
            (bar1_last.space, bar1_last.old, bar1_last.new),
            (AddressSpace::Pio, Some(0xc000), None)
        );
    }

    #[test]
    fn msix_through_the_root() {
        let v = vm();
        let (pio, mmio) = (&v.pio, &v.mmio);
        cfg_write32(pio, 4, 0x18, 0xe000_0000);
        cfg_write32(pio, 4, 0x1c, 0);
        cfg_write32(pio, 4, 0x04, 0x6);
        // Program vector 1 (masked by default) through MMIO.
        mmio.write(0xe000_0010, &0xfee0_0000u64.to_le_bytes());
        mmio.write(0xe000_0018, &0x45u32.to_le_bytes());
        let cap = cfg_read32(pio, 4, 0x34) & 0xff;
        // Enable MSI-X with a dword write of the capability header.
        let hdr = cfg_read32(pio, 4, cap);
        cfg_write32(pio, 4, cap, hdr | (u32::from(MSIX_CONTROL_ENABLE) << 16));
        assert!(!v.dev.lock().unwrap().msix.notify(1).unwrap());
        let mut pba = [0u8; 8];
        mmio.read(0xe000_2000, &mut pba);
        assert_eq!(pba[0], 0b10);
        mmio.write(0xe000_001c, &0u32.to_le_bytes());
        assert_eq!(
            v.sink.messages(),
            vec![crate::MsiMessage {
                address: 0xfee0_0000,
                data: 0x45
            }]
        );
        // Misaligned table access: ignored.
        mmio.write(0xe000_0011, &[1, 2, 3, 4]);
        assert_eq!(
            v.dev.lock().unwrap().msix.entry(1).unwrap().address,
            0xfee0_0000
        );
    }

    proptest! {
        /// Random config-port traffic never panics, and every registered BAR range matches its BAR.
        #[test]
        fn random_config_traffic(ops in proptest::collection::vec((0u64..8, 0usize..3, any::<u32>()), 0..400)) {
            let v = vm();
            for (port, size, val) in ops {
                let len = [1usize, 2, 4][size];
                let port = 0xcf8 + port;
                if val & 1 == 0 {
                    let mut b = vec![0u8; len];
                    v.pio.read(port, &mut b);
                } else {
                    // Bias towards our device's registers.
                    let val = if port == 0xcf8 { 0x8000_2000 | (val & 0xfc) } else { val };
                    v.pio.write(port, &val.to_le_bytes()[..len]);
                }
            }
            let dev = v.dev.lock().unwrap();
            for r in v.mmio.ranges().into_iter().chain(v.pio.ranges()) {
                if r.name == "pci-root" { continue; }
                let i: u8 = r.name.trim_start_matches("00:04.0-bar").parse().unwrap();
                let m = dev.cfg.bar_mapping(i).unwrap();
                prop_assert_eq!((m.base, m.size), (r.base, r.len));
            }
        }
    }
}
