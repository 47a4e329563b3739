//! IOTLB hit and miss costs of iovirt-iommu: a hit must stay within 10 ns; a
//! miss walks a 4-level VT-d table (host-built and guest-owned) and is measured.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use iovirt_iommu::{
    walk, Access, Attachment, GuestTables, Iommu, Iotlb, Mapping, PageSize, Perms, RequesterId,
    SlEntry, Translator, WalkConfig,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn iotlb(c: &mut Criterion) {
    let tlb = Iotlb::new();
    tlb.insert(
        1,
        &Mapping {
            iova: 0x1234_5000,
            gpa: 0x9000,
            size: PageSize::Size4K,
            perms: Perms::all(),
        },
    );
    c.bench_function("iotlb_hit_4k", |b| {
        b.iter(|| tlb.lookup(black_box(1), black_box(0x1234_5678)))
    });

    // The full translate path of the host-programmed IOMMU on a hit: device
    // table (ArcSwap), IOTLB, permission check.
    let io = Iommu::new();
    io.create_domain(1, WalkConfig::FOUR_LEVEL).unwrap();
    let rid = RequesterId::new(0, 4, 0);
    io.attach(rid, Attachment::Domain(1)).unwrap();
    io.map(1, 0x1234_5000, 0x9000, 0x1000, Perms::all())
        .unwrap();
    io.translate(rid, 0x1234_5000, Access::Read).unwrap();
    c.bench_function("iommu_translate_hit", |b| {
        b.iter(|| io.translate(black_box(rid), black_box(0x1234_5678), Access::Read))
    });

    // Miss: invalidate, then translate (4-level walk of host-built tables + fill).
    c.bench_function("iommu_translate_miss_4level_host", |b| {
        b.iter(|| {
            io.iotlb().invalidate_pages(1, 0x1234_5000, 0);
            io.translate(black_box(rid), black_box(0x1234_5678), Access::Read)
        })
    });

    // A 4-level walk of guest-owned tables in guest memory (no cache).
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let put = |t: u64, i: u64, e: SlEntry| mem.write_obj(e.0, GuestAddress(t + i * 8)).unwrap();
    put(0x1000, 0, SlEntry::table(0x2000));
    put(0x2000, 0, SlEntry::table(0x3000));
    put(0x3000, 0x91, SlEntry::table(0x4000));
    put(
        0x4000,
        0x145,
        SlEntry::page(0x9000, PageSize::Size4K, Perms::all()),
    );
    let g = GuestTables(&mem);
    assert!(walk(&g, 0x1000, &WalkConfig::FOUR_LEVEL, 0x1234_5678).is_ok());
    c.bench_function("walk_4level_guest_memory", |b| {
        b.iter(|| {
            walk(
                &g,
                black_box(0x1000),
                &WalkConfig::FOUR_LEVEL,
                black_box(0x1234_5678),
            )
        })
    });
}

criterion_group!(benches, iotlb);
criterion_main!(benches);
