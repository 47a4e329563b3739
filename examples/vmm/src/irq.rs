//! Interrupt delivery for PCI devices: MSI through irqfds and KVM's GSI routing
//! table (with `KVM_SIGNAL_MSI` as the fallback), PCI INTx through the PIIX3's
//! PIRQ routes, and counters of every interrupt the VMM delivers.
//!
//! # MSI: one GSI route and irqfd per distinct message, made on first use
//!
//! [`KvmMsiRouter`] is the [`MsiSink`] every MSI-X capable device gets. The
//! device model's `Msix` calls it only for a message that may be delivered
//! (MSI-X enabled, vector and function unmasked) and passes the address/data
//! pair the guest programmed. The first time a pair is seen, the router
//! allocates a GSI above the 24 irqchip pins, adds a `KVM_IRQ_ROUTING_MSI`
//! entry for it to the routing table (`KVM_SET_GSI_ROUTING` replaces the
//! whole table, so the default PIC/IOAPIC entries are kept in it), creates an
//! eventfd and binds it to the GSI with `KVM_IRQFD`. From then on, delivering
//! that message is one `write(2)` on the eventfd from the device's worker
//! thread: KVM injects the interrupt in the kernel, no vCPU exits and no ioctl
//! runs on the data path.
//!
//! Why by message and not by vector: the sink sees what the guest wrote, at the
//! moment it matters, without hooking the vector table. A guest that rewrites
//! a vector's address/data (Linux does when it moves an IRQ to another CPU)
//! simply gets a new route on that message's first use; the old route stays,
//! unused. To bound the table, after [`MAX_MSI_ROUTES`] distinct messages (or
//! if KVM refuses routing or irqfds) new messages go through `KVM_SIGNAL_MSI`,
//! which needs no state at all but is an ioctl per interrupt.
//!
//! # INTx
//!
//! [`PirqLine`] is a PCI function's INTA#: on assertion it looks up the ISA IRQ
//! the PIIX3's PIRQ route register for that slot's swizzled PIRQ names (what
//! SeaBIOS programs, 10 or 11 on a PIIX machine) and raises it with
//! `KVM_IRQ_LINE`; several functions sharing an IRQ are or-ed ([`LevelMux`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iovirt_bus::{InterruptError, InterruptLine, MsiMessage, MsiSink};
use iovirt_legacy::chipset::Piix3;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs 0..23 are the IOAPIC's pins (0..15 also the PICs'); MSI routes start here.
pub const FIRST_MSI_GSI: u32 = 24;
/// Distinct MSI messages that get their own GSI and irqfd; later ones use `KVM_SIGNAL_MSI`.
pub const MAX_MSI_ROUTES: usize = 512;
/// IRQ lines counted per GSI.
const LINES: usize = 24;

/// Counters of interrupts the VMM delivered, by path.
pub struct IrqCounters {
    /// `KVM_IRQ_LINE` assertions per GSI (edges, or rising levels).
    pub line_asserts: [AtomicU64; LINES],
    /// MSIs delivered by writing an irqfd (no ioctl, no exit).
    pub msi_irqfd: AtomicU64,
    /// MSIs delivered with the `KVM_SIGNAL_MSI` ioctl.
    pub msi_signal: AtomicU64,
    /// GSI routes made for MSI messages.
    pub msi_routes: AtomicU64,
}

/// The process's interrupt counters (one VM per process).
pub static IRQ_COUNTERS: IrqCounters = IrqCounters {
    line_asserts: [const { AtomicU64::new(0) }; LINES],
    msi_irqfd: AtomicU64::new(0),
    msi_signal: AtomicU64::new(0),
    msi_routes: AtomicU64::new(0),
};

/// A snapshot of [`IRQ_COUNTERS`] for the trap-stats file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IrqSnapshot {
    /// Assertions per ISA/IOAPIC line with a non-zero count, by GSI.
    pub line_asserts: std::collections::BTreeMap<u32, u64>,
    /// MSIs delivered through irqfds.
    pub msi_irqfd: u64,
    /// MSIs delivered with `KVM_SIGNAL_MSI`.
    pub msi_signal: u64,
    /// GSI routes created for MSI messages.
    pub msi_routes: u64,
}

impl IrqCounters {
    /// The current counts.
    pub fn snapshot(&self) -> IrqSnapshot {
        IrqSnapshot {
            line_asserts: self
                .line_asserts
                .iter()
                .enumerate()
                .map(|(g, c)| (g as u32, c.load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            msi_irqfd: self.msi_irqfd.load(Ordering::Relaxed),
            msi_signal: self.msi_signal.load(Ordering::Relaxed),
            msi_routes: self.msi_routes.load(Ordering::Relaxed),
        }
    }
}

/// Count an assertion of `gsi`.
pub fn count_line_assert(gsi: u32) {
    if let Some(c) = IRQ_COUNTERS.line_asserts.get(gsi as usize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn io_err(e: kvm_ioctls::Error) -> InterruptError {
    InterruptError::Io(std::io::Error::from_raw_os_error(e.errno()))
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routes `KVM_CREATE_IRQCHIP` sets up: GSI n to IOAPIC pin n (0..23) and,
/// for 0..15, to the master or slave PIC's pin n mod 8.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..LINES as u32 {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

struct RouterInner {
    routes: Vec<kvm_irq_routing_entry>,
    irqfds: HashMap<(u64, u32), Arc<EventFd>>,
    next_gsi: u32,
    /// Why new messages no longer get routes (they use `KVM_SIGNAL_MSI`).
    fallback: Option<String>,
    /// Pass-through vectors, by their eventfd's raw fd.
    passthrough: HashMap<RawFd, PassRoute>,
}

/// One pass-through vector's route.
struct PassRoute {
    gsi: u32,
    /// Whether the eventfd is registered as the GSI's irqfd (unmasked).
    registered: bool,
    /// The message KVM's routing table has for the GSI.
    routed: Option<MsiMessage>,
}

/// An [`MsiSink`] over KVM: irqfd + GSI route per message, `KVM_SIGNAL_MSI` fallback.
pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
    inner: Mutex<RouterInner>,
}

impl KvmMsiRouter {
    /// A router for `vm`; `routing` false (KVM lacks irqfd or GSI routing)
    /// sends every message with `KVM_SIGNAL_MSI`.
    pub fn new(vm: Arc<VmFd>, routing: bool) -> Self {
        KvmMsiRouter {
            vm,
            inner: Mutex::new(RouterInner {
                routes: default_routes(),
                irqfds: HashMap::new(),
                next_gsi: FIRST_MSI_GSI,
                fallback: (!routing).then(|| "KVM lacks irqfd or GSI routing".to_string()),
                passthrough: HashMap::new(),
            }),
        }
    }

    /// Make a GSI route and irqfd for `msg`.
    fn add_route(&self, inner: &mut RouterInner, msg: MsiMessage) -> Result<Arc<EventFd>, String> {
        if inner.irqfds.len() >= MAX_MSI_ROUTES {
            return Err(format!("more than {MAX_MSI_ROUTES} distinct MSI messages"));
        }
        let gsi = inner.next_gsi;
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        self.route_msi(inner, gsi, msg)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))?;
        self.vm
            .register_irqfd(&fd, gsi)
            .map_err(|e| format!("KVM_IRQFD for GSI {gsi}: {e}"))?;
        inner.next_gsi += 1;
        let fd = Arc::new(fd);
        inner.irqfds.insert((msg.address, msg.data), fd.clone());
        IRQ_COUNTERS.msi_routes.fetch_add(1, Ordering::Relaxed);
        log::debug!(
            "MSI {:#x}/{:#x}: GSI {gsi} via irqfd",
            msg.address,
            msg.data
        );
        Ok(fd)
    }

    fn signal(&self, msg: MsiMessage) -> Result<(), InterruptError> {
        let m = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        IRQ_COUNTERS.msi_signal.fetch_add(1, Ordering::Relaxed);
        match self.vm.signal_msi(m).map_err(io_err)? {
            0 => Err(InterruptError::NotRouted(format!(
                "MSI {:#x}/{:#x} was blocked by the guest",
                msg.address, msg.data
            ))),
            _ => Ok(()),
        }
    }
}

impl MsiSink for KvmMsiRouter {
    fn send(&self, msg: MsiMessage) -> Result<(), InterruptError> {
        let fd = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            match inner.irqfds.get(&(msg.address, msg.data)) {
                Some(fd) => Some(fd.clone()),
                None if inner.fallback.is_none() => match self.add_route(&mut inner, msg) {
                    Ok(fd) => Some(fd),
                    Err(why) => {
                        log::warn!("MSI routing off, using KVM_SIGNAL_MSI from now on: {why}");
                        inner.fallback = Some(why);
                        None
                    }
                },
                None => None,
            }
        };
        match fd {
            Some(fd) => {
                IRQ_COUNTERS.msi_irqfd.fetch_add(1, Ordering::Relaxed);
                fd.write(1).map_err(InterruptError::Io)
            }
            None => self.signal(msg),
        }
    }
}

impl KvmMsiRouter {
    /// Route a pass-through vector: signals of `fd` (written by the host
    /// device through VFIO) become MSI `msg` inside KVM (its own GSI route and
    /// irqfd); `None` unregisters the irqfd so signals stay pending in `fd`.
    pub fn set_fd_route(&self, fd: &EventFd, msg: Option<MsiMessage>) -> std::io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = fd.as_raw_fd();
        let Some(msg) = msg else {
            if let Some(p) = inner.passthrough.get_mut(&key) {
                if p.registered {
                    self.vm
                        .unregister_irqfd(fd, p.gsi)
                        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                    p.registered = false;
                }
            }
            return Ok(());
        };
        let (gsi, routed) = match inner.passthrough.get(&key) {
            Some(p) => (p.gsi, p.routed),
            None => {
                if inner.irqfds.len() + inner.passthrough.len() >= MAX_MSI_ROUTES {
                    return Err(std::io::Error::other(format!(
                        "more than {MAX_MSI_ROUTES} MSI routes"
                    )));
                }
                let gsi = inner.next_gsi;
                inner.next_gsi += 1;
                inner.passthrough.insert(
                    key,
                    PassRoute {
                        gsi,
                        registered: false,
                        routed: None,
                    },
                );
                (gsi, None)
            }
        };
        // Unmasking a vector (or the whole function) with the message it had
        // needs only the irqfd, not a new routing table for the whole VM.
        if routed != Some(msg) {
            self.route_msi(&mut inner, gsi, msg)?;
            IRQ_COUNTERS.msi_routes.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "pass-through MSI {:#x}/{:#x}: GSI {gsi}",
                msg.address,
                msg.data
            );
            if let Some(p) = inner.passthrough.get_mut(&key) {
                p.routed = Some(msg);
            }
        }
        if let Some(p) = inner.passthrough.get_mut(&key) {
            if !p.registered {
                // A signal that arrived while unrouted is delivered now.
                self.vm
                    .register_irqfd(fd, gsi)
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                p.registered = true;
            }
        }
        Ok(())
    }

    /// Point `gsi` at `msg` in KVM's routing table (added, or replacing
    /// the GSI's entry); `inner.routes` changes only if KVM took the table.
    fn route_msi(&self, inner: &mut RouterInner, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = msg.address as u32;
        e.u.msi.address_hi = (msg.address >> 32) as u32;
        e.u.msi.data = msg.data;
        let mut routes: Vec<kvm_irq_routing_entry> = inner
            .routes
            .iter()
            .filter(|r| r.gsi != gsi)
            .copied()
            .collect();
        routes.push(e);
        let table = KvmIrqRouting::from_entries(&routes)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        inner.routes = routes;
        Ok(())
    }
}

/// [`crate::vfio::IrqRoutes`] for a pass-through function in `slot`: MSI and
/// MSI-X through the VM's [`KvmMsiRouter`], INTx as an irqfd with a resample
/// eventfd on the ISA IRQ the PIIX3 routes the slot's INTA# to.
pub struct KvmVfioRoutes {
    router: Arc<KvmMsiRouter>,
    piix3: Arc<Mutex<Piix3>>,
    slot: u8,
}

impl KvmVfioRoutes {
    /// Routes for the function in `slot`.
    pub fn new(router: Arc<KvmMsiRouter>, piix3: Arc<Mutex<Piix3>>, slot: u8) -> Self {
        KvmVfioRoutes {
            router,
            piix3,
            slot,
        }
    }
}

impl crate::vfio::IrqRoutes for KvmVfioRoutes {
    fn set_msi_route(&self, fd: &Arc<EventFd>, msg: Option<MsiMessage>) -> std::io::Result<()> {
        self.router.set_fd_route(fd, msg)
    }

    fn route_intx(&self, trigger: &Arc<EventFd>, resample: &Arc<EventFd>) -> std::io::Result<()> {
        let irq = self
            .piix3
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .intx_route(self.slot, 1)
            .ok_or_else(|| std::io::Error::other("INTA# has no PIRQ route yet"))?;
        self.router
            .vm
            .register_irqfd_with_resample(trigger, resample, u32::from(irq))
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        log::info!(
            "pass-through INTx of slot {}: IRQ {irq} via irqfd",
            self.slot
        );
        Ok(())
    }
}

/// Or-ing of level-triggered sources that share an ISA IRQ: KVM_IRQ_LINE from
/// user space has one source, so the last writer would otherwise win.
pub struct LevelMux {
    vm: Arc<VmFd>,
    count: Mutex<[u32; LINES]>,
}

impl LevelMux {
    /// A mux with every line deasserted.
    pub fn new(vm: Arc<VmFd>) -> Self {
        LevelMux {
            vm,
            count: Mutex::new([0; LINES]),
        }
    }

    /// One source asserts (`true`) or deasserts `gsi`.
    fn set(&self, gsi: u8, asserted: bool) -> Result<(), InterruptError> {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let Some(c) = count.get_mut(usize::from(gsi)) else {
            return Err(InterruptError::NotRouted(format!("IRQ {gsi}")));
        };
        let was = *c > 0;
        *c = if asserted {
            c.saturating_add(1)
        } else {
            c.saturating_sub(1)
        };
        let now = *c > 0;
        if was != now {
            if now {
                count_line_assert(u32::from(gsi));
            }
            self.vm.set_irq_line(u32::from(gsi), now).map_err(io_err)?;
        }
        Ok(())
    }
}

/// INTx pin `pin` of the PCI device in `slot`, routed through the PIIX3's PIRQ registers.
pub struct PirqLine {
    mux: Arc<LevelMux>,
    piix3: Arc<Mutex<Piix3>>,
    slot: u8,
    pin: u8,
    /// The IRQ this line currently holds asserted.
    held: Mutex<Option<u8>>,
}

impl PirqLine {
    /// INTx `pin` (1 = INTA#) of the device at `slot`.
    pub fn new(mux: Arc<LevelMux>, piix3: Arc<Mutex<Piix3>>, slot: u8, pin: u8) -> Self {
        PirqLine {
            mux,
            piix3,
            slot,
            pin,
            held: Mutex::new(None),
        }
    }
}

impl InterruptLine for PirqLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.set_level(true)?;
        self.set_level(false)
    }

    fn set_level(&self, asserted: bool) -> Result<(), InterruptError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if asserted {
            if held.is_some() {
                return Ok(());
            }
            let route = self
                .piix3
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .intx_route(self.slot, self.pin);
            let Some(irq) = route else {
                // Firmware has not routed this PIRQ (yet): nowhere to deliver.
                return Err(InterruptError::NotRouted(format!(
                    "INTx of slot {} pin {}: PIRQ route disabled",
                    self.slot, self.pin
                )));
            };
            self.mux.set(irq, true)?;
            *held = Some(irq);
        } else if let Some(irq) = held.take() {
            self.mux.set(irq, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_routes();
        assert_eq!(r.len(), 24 + 16);
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }

    /// With KVM present: the first use of a message makes a GSI route and an
    /// irqfd, the second reuses it; a second message gets the next GSI.
    #[test]
    fn msi_messages_get_irqfd_routes() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("SKIPPED msi_messages_get_irqfd_routes: no /dev/kvm");
            return;
        };
        let vm = Arc::new(kvm.create_vm().expect("create VM"));
        vm.create_irq_chip().expect("irqchip");
        let router = KvmMsiRouter::new(vm, true);
        let m1 = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        let m2 = MsiMessage {
            address: 0xfee0_0000,
            data: 0x42,
        };
        router.send(m1).expect("first send");
        router.send(m1).expect("second send");
        router.send(m2).expect("other message");
        let inner = router.inner.lock().unwrap();
        assert!(inner.fallback.is_none(), "{:?}", inner.fallback);
        assert_eq!(inner.irqfds.len(), 2);
        assert_eq!(inner.next_gsi, FIRST_MSI_GSI + 2);
        assert_eq!(inner.routes.len(), 24 + 16 + 2);
    }
}
