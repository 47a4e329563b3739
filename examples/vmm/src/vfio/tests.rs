//! The pass-through model against a VFIO test double: a fake NIC-like function
//! with a 32-bit memory BAR0 (128 KiB), an I/O BAR2 (32 bytes), a 64-bit
//! prefetchable BAR4 (16 KiB) holding the MSI-X table (4 vectors) and PBA, an
//! MSI capability at 0x50 and an MSI-X capability at 0x70. Guest accesses go
//! through a real [`PciRoot`] on PIO/MMIO buses, as the VMM wires it.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use iovirt_bus::pci::{PciAddress, PciRoot};
use iovirt_bus::{AddressSpace, Bus, MsiMessage};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const MSI_CAP: usize = 0x50;
const MSIX_CAP: usize = 0x70;
const BAR0_SIZE: u64 = 128 << 10;
const BAR4_SIZE: u64 = 16 << 10;
/// MSI-X table at BAR4 + 0, PBA at BAR4 + 0x2000.
const PBA_OFFSET: u64 = 0x2000;

#[derive(Default)]
struct FakeState {
    config: Vec<u8>,
    bars: HashMap<u32, Vec<u8>>,
    /// (region, offset, bytes) of every write that reached the device.
    writes: Vec<(u32, u64, Vec<u8>)>,
    /// (irq index, raw fds) of enable calls; disable calls as an empty list.
    irqs: Vec<(u32, Vec<i32>)>,
    intx_unmask: Option<i32>,
    /// (iova, size, host address).
    dma: Vec<(u64, u64, u64)>,
    unmapped: Vec<(u64, u64)>,
}

struct FakeVfio(Mutex<FakeState>);

impl FakeVfio {
    fn new() -> Self {
        let mut c = vec![0u8; 256];
        let put = |c: &mut Vec<u8>, o: usize, b: &[u8]| c[o..o + b.len()].copy_from_slice(b);
        put(&mut c, 0, &0x8086u16.to_le_bytes());
        put(&mut c, 2, &0x10d3u16.to_le_bytes());
        put(&mut c, 6, &0x0010u16.to_le_bytes()); // status: capability list
        put(&mut c, 0x08, &[3, 0, 0, 2]); // revision 3, class 02 (network)
        put(&mut c, 0x10, &0xfebc_0000u32.to_le_bytes()); // BAR0: host address, mem32
        put(&mut c, 0x18, &0xe001u32.to_le_bytes()); // BAR2: I/O
        put(&mut c, 0x20, &0xc_0000_000cu64.to_le_bytes()); // BAR4: mem64, prefetchable
        put(&mut c, 0x2c, &0x8086u16.to_le_bytes());
        put(&mut c, 0x2e, &0xa01fu16.to_le_bytes());
        c[0x34] = MSI_CAP as u8;
        c[0x3d] = 1; // INTA#
                     // MSI: 64-bit, 4 vectors capable (MMC = 2).
        put(&mut c, MSI_CAP, &[0x05, MSIX_CAP as u8]);
        put(&mut c, MSI_CAP + 2, &(0x0080u16 | (2 << 1)).to_le_bytes());
        // MSI-X: 4 vectors, table BIR 4 offset 0, PBA BIR 4 offset 0x2000.
        put(&mut c, MSIX_CAP, &[0x11, 0]);
        put(&mut c, MSIX_CAP + 2, &3u16.to_le_bytes());
        put(&mut c, MSIX_CAP + 4, &4u32.to_le_bytes());
        put(&mut c, MSIX_CAP + 8, &(PBA_OFFSET as u32 | 4).to_le_bytes());
        c[0x40] = 0x11; // a device-specific register
        let mut bars = HashMap::new();
        bars.insert(0, (0..BAR0_SIZE).map(|i| i as u8).collect());
        bars.insert(2, vec![0x22; 32]);
        bars.insert(4, vec![0x44; BAR4_SIZE as usize]);
        FakeVfio(Mutex::new(FakeState {
            config: c,
            bars,
            ..Default::default()
        }))
    }

    fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }
}

impl VfioOps for FakeVfio {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => BAR0_SIZE,
            2 => 32,
            4 => BAR4_SIZE,
            CONFIG_REGION => 256,
            _ => return None,
        };
        Some(RegionInfo {
            size,
            read: true,
            write: true,
            mmap: index != CONFIG_REGION,
        })
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let st = self.st();
        let src = if index == CONFIG_REGION {
            &st.config
        } else {
            st.bars
                .get(&index)
                .ok_or_else(|| io::Error::other("no region"))?
        };
        let o = offset as usize;
        let bytes = src
            .get(o..o + data.len())
            .ok_or_else(|| io::Error::other("out of range"))?;
        data.copy_from_slice(bytes);
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut st = self.st();
        st.writes.push((index, offset, data.to_vec()));
        let o = offset as usize;
        let dst = if index == CONFIG_REGION {
            &mut st.config
        } else {
            st.bars
                .get_mut(&index)
                .ok_or_else(|| io::Error::other("no region"))?
        };
        if let Some(d) = dst.get_mut(o..o + data.len()) {
            d.copy_from_slice(data);
        }
        Ok(())
    }
    fn irq_count(&self, index: u32) -> u32 {
        match index {
            IRQ_INTX => 1,
            IRQ_MSI => 4,
            IRQ_MSIX => 4,
            _ => 0,
        }
    }
    fn enable_irqs(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let fds = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.st().irqs.push((index, fds));
        Ok(())
    }
    fn disable_irqs(&self, index: u32) -> io::Result<()> {
        self.st().irqs.push((index, Vec::new()));
        Ok(())
    }
    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()> {
        self.st().intx_unmask = Some(fd.as_raw_fd());
        Ok(())
    }
    fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> io::Result<()> {
        self.st().dma.push((iova, size, host_addr));
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> io::Result<()> {
        self.st().unmapped.push((iova, size));
        Ok(())
    }
}

/// Records routes: raw fd -> current message; INTx (trigger, resample).
#[derive(Default)]
struct Routes {
    msi: Mutex<HashMap<i32, Option<MsiMessage>>>,
    calls: Mutex<usize>,
    intx: Mutex<Option<(i32, i32)>>,
}

impl IrqRoutes for Routes {
    fn set_msi_route(&self, fd: &Arc<EventFd>, msg: Option<MsiMessage>) -> io::Result<()> {
        self.msi.lock().unwrap().insert(fd.as_raw_fd(), msg);
        *self.calls.lock().unwrap() += 1;
        Ok(())
    }
    fn route_intx(&self, trigger: &Arc<EventFd>, resample: &Arc<EventFd>) -> io::Result<()> {
        *self.intx.lock().unwrap() = Some((trigger.as_raw_fd(), resample.as_raw_fd()));
        Ok(())
    }
}

struct Machine {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    _pci: Arc<PciRoot>,
    fake: Arc<FakeVfio>,
    routes: Arc<Routes>,
    ram: GuestMemoryMmap,
}

const SLOT: u8 = 5;

fn machine() -> Machine {
    let pio = Arc::new(Bus::new(AddressSpace::Pio));
    let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
    let pci = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
    pci.register().unwrap();
    let ram = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(1 << 32), 1 << 20),
    ])
    .unwrap();
    let fake = Arc::new(FakeVfio::new());
    let routes = Arc::new(Routes::default());
    let dev = VfioPciDevice::new(fake.clone(), routes.clone(), &ram).unwrap();
    pci.add_function(PciAddress::new(0, SLOT, 0).unwrap(), dev)
        .unwrap();
    Machine {
        pio,
        mmio,
        _pci: pci,
        fake,
        routes,
        ram,
    }
}

impl Machine {
    fn cfg_addr(&self, off: u8) {
        let a = 0x8000_0000u32 | (u32::from(SLOT) << 11) | u32::from(off & 0xfc);
        assert!(self.pio.write(0xcf8, &a.to_le_bytes()));
    }
    fn cfg_r32(&self, off: u8) -> u32 {
        self.cfg_addr(off);
        let mut b = [0u8; 4];
        assert!(self.pio.read(0xcfc, &mut b));
        u32::from_le_bytes(b)
    }
    fn cfg_r16(&self, off: u8) -> u16 {
        self.cfg_addr(off);
        let mut b = [0u8; 2];
        assert!(self.pio.read(0xcfc + u64::from(off & 2), &mut b));
        u16::from_le_bytes(b)
    }
    fn cfg_w32(&self, off: u8, v: u32) {
        self.cfg_addr(off);
        assert!(self.pio.write(0xcfc, &v.to_le_bytes()));
    }
    fn cfg_w16(&self, off: u8, v: u16) {
        self.cfg_addr(off);
        assert!(self.pio.write(0xcfc + u64::from(off & 2), &v.to_le_bytes()));
    }
    fn mmio_r32(&self, addr: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.mmio.read(addr, &mut b).then(|| u32::from_le_bytes(b))
    }
    fn mmio_w32(&self, addr: u64, v: u32) {
        assert!(
            self.mmio.write(addr, &v.to_le_bytes()),
            "{addr:#x} unclaimed"
        );
    }
    fn config_writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.fake
            .st()
            .writes
            .iter()
            .filter(|w| w.0 == CONFIG_REGION)
            .map(|w| (w.1, w.2.clone()))
            .collect()
    }
}

#[test]
fn attach_maps_every_guest_ram_region_for_dma() {
    let m = machine();
    let dma = m.fake.st().dma.clone();
    let want: Vec<(u64, u64, u64)> = [0u64, 1 << 32]
        .iter()
        .map(|&gpa| {
            let hva = m.ram.get_host_address(GuestAddress(gpa)).unwrap() as u64;
            (gpa, 1 << 20, hva)
        })
        .collect();
    assert_eq!(dma, want);
}

#[test]
fn dropping_the_device_unmaps_its_dma() {
    let fake = Arc::new(FakeVfio::new());
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let dev = VfioPciDevice::new(fake.clone(), Arc::new(Routes::default()), &ram).unwrap();
    assert_eq!(dev.dma_ranges(), &[(0, 1 << 20)]);
    drop(dev);
    assert_eq!(fake.st().unmapped, vec![(0, 1 << 20)]);
}

#[test]
fn config_space_is_forwarded_except_the_bars() {
    let m = machine();
    // Identity and device registers come from the device.
    assert_eq!(m.cfg_r32(0), 0x10d3_8086);
    assert_eq!(m.cfg_r32(0x08) >> 8, 0x02_0000);
    assert_eq!(m.cfg_r32(0x40) & 0xff, 0x11);
    m.cfg_w32(0x40, 0x5a);
    assert_eq!(m.fake.st().config[0x40], 0x5a);
    assert_eq!(m.cfg_r32(0x40) & 0xff, 0x5a);
    // BARs are emulated: the guest sees unassigned BARs of the host's sizes and
    // kinds, sizing them never reaches the device.
    assert_eq!(m.cfg_r32(0x10), 0);
    m.cfg_w32(0x10, 0xffff_ffff);
    assert_eq!(m.cfg_r32(0x10), !(BAR0_SIZE as u32 - 1));
    m.cfg_w32(0x18, 0xffff_ffff);
    assert_eq!(m.cfg_r32(0x18), !31u32 | 1, "I/O BAR of 32 bytes");
    m.cfg_w32(0x20, 0xffff_ffff);
    m.cfg_w32(0x24, 0xffff_ffff);
    assert_eq!(
        m.cfg_r32(0x20),
        !(BAR4_SIZE as u32 - 1) | 0xc,
        "64-bit prefetchable"
    );
    assert_eq!(m.cfg_r32(0x24), 0xffff_ffff);
    m.cfg_w32(0x30, 0xffff_ffff);
    assert_eq!(m.cfg_r32(0x30), 0, "no expansion ROM");
    assert!(
        m.config_writes().iter().all(|(o, _)| *o == 0x40),
        "only the device register reached the device: {:?}",
        m.config_writes()
    );
    assert_eq!(
        &m.fake.st().config[0x10..0x14],
        &0xfebc_0000u32.to_le_bytes()
    );
}

#[test]
fn bars_relocate_and_forward_to_the_regions() {
    let m = machine();
    m.cfg_w32(0x10, 0xe000_0000);
    m.cfg_w16(0x04, 0x0002); // memory decode on (reaches the device too)
    assert_eq!(m.mmio_r32(0xe000_0010), Some(0x1312_1110), "BAR0 + 0x10");
    m.mmio_w32(0xe000_0100, 0xdead_beef);
    assert_eq!(
        m.fake.st().writes.last().unwrap(),
        &(0, 0x100, 0xdead_beefu32.to_le_bytes().to_vec())
    );
    // The guest moves BAR0: the old window is gone, the new one reaches the device.
    m.cfg_w32(0x10, 0xe100_0000);
    assert_eq!(m.mmio_r32(0xe000_0010), None);
    assert_eq!(m.mmio_r32(0xe100_0010), Some(0x1312_1110));
    // The command register reached the device as well as our copy.
    assert!(m
        .config_writes()
        .iter()
        .any(|(o, b)| *o == 4 && b[..2] == [2, 0]));
    assert_eq!(m.cfg_r16(0x04) & 2, 2);
}

#[test]
fn msix_table_writes_become_irq_routes() {
    let m = machine();
    // BAR4 at 0x1_0000_0000 (64-bit), memory decode on.
    m.cfg_w32(0x20, 0);
    m.cfg_w32(0x24, 1);
    m.cfg_w16(0x04, 0x0006);
    let table = 1u64 << 32;
    // The capability shows the device's table size; enable reads back as ours.
    assert_eq!(m.cfg_r16(MSIX_CAP as u8 + 2), 3);
    for v in 0..4u64 {
        m.mmio_w32(table + v * 16, 0xfee0_0000 + ((v as u32) << 12));
        m.mmio_w32(table + v * 16 + 4, 0);
        m.mmio_w32(table + v * 16 + 8, 0x40 + v as u32);
        m.mmio_w32(table + v * 16 + 12, 0); // unmasked
    }
    assert_eq!(m.mmio_r32(table + 16 + 8), Some(0x41), "table reads back");
    assert!(
        m.fake.st().writes.iter().all(|w| w.0 != 4),
        "table writes never reach the device"
    );
    // Nothing routed before MSI-X is enabled.
    assert!(m.routes.msi.lock().unwrap().values().all(|r| r.is_none()));
    m.cfg_w16(MSIX_CAP as u8 + 2, 0x8000);
    assert_eq!(m.cfg_r16(MSIX_CAP as u8 + 2), 0x8003);
    assert!(
        m.config_writes().iter().all(|(o, _)| *o == 4),
        "the MSI-X control write is ours: {:?}",
        m.config_writes()
    );
    let enabled: Vec<_> = m
        .fake
        .st()
        .irqs
        .iter()
        .filter(|i| i.0 == IRQ_MSIX)
        .cloned()
        .collect();
    assert_eq!(enabled.len(), 1);
    let fds = enabled[0].1.clone();
    assert_eq!(fds.len(), 4);
    let route = |v: usize| m.routes.msi.lock().unwrap().get(&fds[v]).copied().flatten();
    for v in 0..4 {
        assert_eq!(
            route(v),
            Some(MsiMessage {
                address: 0xfee0_0000 + ((v as u64) << 12),
                data: 0x40 + v as u32
            })
        );
    }
    // The guest masks vector 1, retargets vector 2, then masks the whole function.
    m.mmio_w32(table + 16 + 12, 1);
    assert_eq!(route(1), None);
    m.mmio_w32(table + 2 * 16 + 8, 0x99);
    assert_eq!(route(2).map(|r| r.data), Some(0x99));
    m.cfg_w16(MSIX_CAP as u8 + 2, 0xc000);
    assert!((0..4).all(|v| route(v).is_none()));
    m.cfg_w16(MSIX_CAP as u8 + 2, 0x8000);
    assert_eq!(route(0).map(|r| r.data), Some(0x40));
    assert_eq!(route(1), None, "still masked per vector");
    // The PBA is the device's.
    assert_eq!(m.mmio_r32(table + PBA_OFFSET), Some(0x4444_4444));
    // Disabling turns VFIO's MSI-X off and unroutes every vector.
    m.cfg_w16(MSIX_CAP as u8 + 2, 0);
    let irqs = m.fake.st().irqs.clone();
    let n = irqs.len();
    assert_eq!(irqs[n - 2], (IRQ_MSIX, Vec::new()));
    assert_eq!(irqs[n - 1].0, IRQ_INTX, "INTx back once MSI-X is off");
    assert!((0..4).all(|v| route(v).is_none()));
}

#[test]
fn msi_capability_is_shadowed_with_one_vector() {
    let m = machine();
    let cap = MSI_CAP as u8;
    // Multiple Message Capable reads as 0 (one vector); 64-bit stays visible.
    assert_eq!(m.cfg_r16(cap + 2), 0x0080);
    m.cfg_w32(cap + 4, 0xfee0_1000);
    m.cfg_w32(cap + 8, 0);
    m.cfg_w16(cap + 12, 0x4a);
    m.cfg_w16(cap + 2, 0x0001 | (2 << 4)); // enable, asking for 4 vectors
    assert_eq!(m.cfg_r16(cap + 2), 0x0081, "one vector enabled");
    let irqs = m.fake.st().irqs.clone();
    assert_eq!(irqs.len(), 1);
    assert_eq!((irqs[0].0, irqs[0].1.len()), (IRQ_MSI, 1));
    let fd = irqs[0].1[0];
    assert_eq!(
        m.routes.msi.lock().unwrap().get(&fd).copied().flatten(),
        Some(MsiMessage {
            address: 0xfee0_1000,
            data: 0x4a
        })
    );
    assert!(m.config_writes().is_empty(), "MSI writes are ours");
    m.cfg_w16(cap + 2, 0);
    assert_eq!(
        m.routes.msi.lock().unwrap().get(&fd).copied().flatten(),
        None
    );
    assert_eq!(m.fake.st().irqs.last().unwrap(), &(IRQ_MSI, Vec::new()));
}

#[test]
fn intx_is_routed_once_decoding_is_enabled() {
    let m = machine();
    assert!(m.routes.intx.lock().unwrap().is_none());
    m.cfg_w16(0x04, 0x0001);
    let (trigger, resample) = m.routes.intx.lock().unwrap().expect("routed");
    let st = m.fake.st();
    assert_eq!(st.irqs, vec![(IRQ_INTX, vec![trigger])]);
    assert_eq!(st.intx_unmask, Some(resample));
    drop(st);
    m.cfg_w16(0x04, 0x0007);
    assert_eq!(m.fake.st().irqs.len(), 1, "routed once");
    // MSI-X on: INTx goes off first (vfio-pci refuses MSI-X otherwise); off: INTx is back.
    m.cfg_w16(MSIX_CAP as u8 + 2, 0x8000);
    let irqs = m.fake.st().irqs.clone();
    assert_eq!(irqs[1], (IRQ_INTX, Vec::new()));
    assert_eq!(irqs[2].0, IRQ_MSIX);
    m.cfg_w16(MSIX_CAP as u8 + 2, 0);
    let irqs = m.fake.st().irqs.clone();
    assert_eq!(irqs[3], (IRQ_MSIX, Vec::new()));
    assert_eq!(irqs[4], (IRQ_INTX, vec![trigger]));
    // The same for MSI.
    m.cfg_w16(MSI_CAP as u8 + 2, 1);
    let irqs = m.fake.st().irqs.clone();
    assert_eq!(irqs[5], (IRQ_INTX, Vec::new()));
    assert_eq!(irqs[6].0, IRQ_MSI);
    m.cfg_w16(MSI_CAP as u8 + 2, 0);
    assert_eq!(m.fake.st().irqs.last().unwrap(), &(IRQ_INTX, vec![trigger]));
}

#[test]
fn hostile_config_and_bar_accesses_do_not_panic() {
    let m = machine();
    for off in (0..=255u8).step_by(1) {
        m.cfg_addr(off);
        let _ = m.pio.write(0xcfc + u64::from(off & 3), &[0xff]);
        let mut b = [0u8; 1];
        let _ = m.pio.read(0xcfc + u64::from(off & 3), &mut b);
    }
    m.cfg_w32(0x20, 0);
    m.cfg_w32(0x24, 1);
    m.cfg_w16(0x04, 0x0006);
    for off in [0u64, 13, 15, 63, 64, 0x1fff, BAR4_SIZE - 1] {
        let _ = m.mmio.write((1 << 32) + off, &[0xff]);
        let mut b = [0u8; 8];
        let _ = m.mmio.read((1 << 32) + off, &mut b[..1]);
    }
}

#[test]
fn a_device_that_does_not_answer_is_refused() {
    let fake = Arc::new(FakeVfio::new());
    fake.st().config[..4].copy_from_slice(&[0xff; 4]);
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let e = VfioPciDevice::new(fake.clone(), Arc::new(Routes::default()), &ram).unwrap_err();
    assert!(e.to_string().contains("no device answers"), "{e}");
    assert!(
        fake.st().dma.is_empty(),
        "nothing mapped for a refused device"
    );
}

#[test]
fn random_guest_accesses_never_panic() {
    // A cheap stand-in for a fuzz target (the model lives in a binary crate):
    // 20000 random config and BAR accesses of random sizes from a fixed seed.
    let m = machine();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Give the BARs addresses so BAR accesses reach the model.
    m.cfg_w32(0x10, 0xe000_0000);
    m.cfg_w32(0x18, 0xc000);
    m.cfg_w32(0x20, 0);
    m.cfg_w32(0x24, 1);
    m.cfg_w16(0x04, 0x0007);
    for _ in 0..20_000 {
        let r = next();
        let len = [1usize, 2, 4, 8][(r & 3) as usize];
        let v = next().to_le_bytes();
        match (r >> 2) % 4 {
            0 => {
                let off = (r >> 8) as u8;
                m.cfg_addr(off);
                let port = 0xcfc + u64::from(off & 3);
                let _ = m.pio.write(port, &v[..len.min(4)]);
            }
            1 => {
                let off = (r >> 8) as u8;
                m.cfg_addr(off);
                let mut b = [0u8; 4];
                let _ = m.pio.read(0xcfc + u64::from(off & 3), &mut b[..len.min(4)]);
            }
            2 => {
                let base = [0xe000_0000u64, 1 << 32][((r >> 8) & 1) as usize];
                let _ = m.mmio.write(base + ((r >> 16) % BAR4_SIZE), &v[..len]);
            }
            _ => {
                let mut b = [0u8; 8];
                let _ = m
                    .mmio
                    .read((1 << 32) + ((r >> 16) % BAR4_SIZE), &mut b[..len]);
            }
        }
    }
}
