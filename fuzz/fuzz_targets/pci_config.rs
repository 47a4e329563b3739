//! Fuzz the PCI root: arbitrary 0xCF8/0xCFC traffic of sizes 1/2/4 and BAR accesses
//! against a function with 32-bit, 64-bit and I/O BARs and MSI-X. Must never panic.
#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
use iovirt_bus::pci::{
    BarSpec, ClassCode, ConfigSpace, Msix, MsixLocation, PciAddress, PciFunction, PciIdentity,
    PciRoot,
};
use iovirt_bus::{AddressSpace, Bus};
use iovirt_legacy::chipset::{I440fx, Piix3, I440FX_ADDRESS, PIIX3_ADDRESS};
use libfuzzer_sys::fuzz_target;

struct Dev {
    cfg: ConfigSpace,
    msix: Msix,
    scratch: [u8; 64],
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
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at
                .and_then(|a| self.scratch.get(a))
                .copied()
                .unwrap_or(0xff);
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        for (i, v) in data.iter().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(b) = at.and_then(|a| self.scratch.get_mut(a)) {
                *b = *v;
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Size {
    B,
    W,
    D,
}

impl Size {
    fn len(&self) -> usize {
        match self {
            Size::B => 1,
            Size::W => 2,
            Size::D => 4,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// Write the address register (function chosen among a few, register free).
    Select {
        devfn: u8,
        reg: u8,
        enable: bool,
    },
    /// Raw access to 0xCF8 + port (0..8).
    PortRead {
        port: u8,
        size: Size,
    },
    PortWrite {
        port: u8,
        size: Size,
        value: u32,
    },
    /// Access into whatever is registered on the MMIO or PIO bus near our BARs.
    MmioRead {
        addr: u32,
        hi: bool,
        size: u8,
    },
    MmioWrite {
        addr: u32,
        hi: bool,
        size: u8,
        value: u64,
    },
    PioRead {
        addr: u16,
        size: Size,
    },
    PioWrite {
        addr: u16,
        size: Size,
        value: u32,
    },
    /// Raise an MSI-X vector from the device side.
    Notify {
        vector: u16,
    },
}

fuzz_target!(|ops: Vec<Op>| {
    let pio = Arc::new(Bus::new(AddressSpace::Pio));
    let mmio = Arc::new(Bus::new(AddressSpace::Mmio));
    let root = Arc::new(PciRoot::new(pio.clone(), mmio.clone()));
    if root.register().is_err() {
        return;
    }
    let mut cfg = ConfigSpace::new(&PciIdentity {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        class: ClassCode {
            class: 0x02,
            subclass: 0,
            prog_if: 0,
        },
        revision: 1,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        multi_function: false,
    });
    let sink = Arc::new(RecordingMsiSink::new());
    let setup = (|| {
        cfg.add_bar(0, BarSpec::memory32(0x1000)).ok()?;
        cfg.add_bar(1, BarSpec::io(0x40)).ok()?;
        cfg.add_bar(2, BarSpec::memory64(0x4000).prefetchable())
            .ok()?;
        let mut msix = Msix::new(
            8,
            MsixLocation { bar: 2, offset: 0 },
            MsixLocation {
                bar: 2,
                offset: 0x2000,
            },
            sink.clone(),
        )
        .ok()?;
        msix.add_capability(&mut cfg).ok()?;
        Some(msix)
    })();
    let Some(msix) = setup else { return };
    let dev: Arc<Mutex<Dev>> = match root.add_function(
        PciAddress {
            bus: 0,
            device: 4,
            function: 0,
        },
        Dev {
            cfg,
            msix,
            scratch: [0; 64],
        },
    ) {
        Ok(d) => d,
        Err(_) => return,
    };
    let _ = root.add_function(I440FX_ADDRESS, I440fx::new());
    let _ = root.add_function(PIIX3_ADDRESS, Piix3::new());

    let mut buf = [0u8; 8];
    for op in ops.into_iter().take(2000) {
        match op {
            Op::Select { devfn, reg, enable } => {
                // Mostly hit the three real functions.
                let devfn = [0x20u8, 0x00, 0x08, devfn][usize::from(devfn & 3)];
                let v = (u32::from(enable) << 31) | (u32::from(devfn) << 8) | u32::from(reg);
                pio.write(0xcf8, &v.to_le_bytes());
            }
            Op::PortRead { port, size } => {
                pio.read(0xcf8 + u64::from(port & 7), &mut buf[..size.len()]);
            }
            Op::PortWrite { port, size, value } => {
                pio.write(
                    0xcf8 + u64::from(port & 7),
                    &value.to_le_bytes()[..size.len()],
                );
            }
            Op::MmioRead { addr, hi, size } => {
                let a = u64::from(addr) | (u64::from(hi) << 32);
                let n = usize::from(size % 9);
                mmio.read(a, &mut buf[..n]);
            }
            Op::MmioWrite {
                addr,
                hi,
                size,
                value,
            } => {
                let a = u64::from(addr) | (u64::from(hi) << 32);
                let n = usize::from(size % 9);
                mmio.write(a, &value.to_le_bytes()[..n]);
            }
            Op::PioRead { addr, size } => {
                pio.read(u64::from(addr), &mut buf[..size.len()]);
            }
            Op::PioWrite { addr, size, value } => {
                pio.write(u64::from(addr), &value.to_le_bytes()[..size.len()]);
            }
            Op::Notify { vector } => {
                let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
                let _ = d.msix.notify(vector % 10);
            }
        }
    }
    // Every registered BAR range must match what the BAR registers say.
    let d = dev.lock().unwrap_or_else(|e| e.into_inner());
    for r in mmio.ranges().into_iter().chain(pio.ranges()) {
        if let Some(i) = r.name.strip_prefix("00:04.0-bar") {
            let i: u8 = i.parse().expect("BAR index in range name");
            let m = d.cfg.bar_mapping(i).expect("registered BAR decodes");
            assert_eq!((m.base, m.size), (r.base, r.len));
        }
    }
});
