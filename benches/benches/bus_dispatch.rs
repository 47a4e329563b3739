//! Trap dispatch cost: how long `Bus::read`/`Bus::write` take to find the device
//! and call it, with a realistic number of registered ranges.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use iovirt_bus::{AddressSpace, Bus, BusDevice};

struct Nop;
impl BusDevice for Nop {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
}

fn bus_with(n: u64) -> Bus {
    let bus = Bus::new(AddressSpace::Mmio);
    for i in 0..n {
        bus.insert(
            &format!("dev{i}"),
            0x1000_0000 + i * 0x1000,
            0x1000,
            Arc::new(Nop),
        )
        .expect("disjoint ranges");
    }
    bus
}

fn dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("bus_dispatch");
    for n in [8u64, 64, 1024] {
        let bus = bus_with(n);
        let addr = 0x1000_0000 + (n / 2) * 0x1000 + 0x10;
        g.bench_with_input(BenchmarkId::new("read4", n), &addr, |b, &a| {
            let mut buf = [0u8; 4];
            b.iter(|| bus.read(black_box(a), &mut buf))
        });
        g.bench_with_input(BenchmarkId::new("write4", n), &addr, |b, &a| {
            b.iter(|| bus.write(black_box(a), &[1, 2, 3, 4]))
        });
        g.bench_with_input(BenchmarkId::new("unclaimed_read4", n), &addr, |b, _| {
            let mut buf = [0u8; 4];
            b.iter(|| bus.read(black_box(0x10), &mut buf))
        });
    }
    g.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
