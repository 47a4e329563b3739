//! Fuzz VT-d second-level page walks over arbitrary guest memory: the input
//! becomes guest memory holding root, context and page tables, then DMAs are
//! translated through an emulated VT-d unit and raw walks are run with
//! arbitrary roots, levels and IOVAs. Nothing may panic or loop; every
//! successful translation must land inside its page.
#![no_main]
use std::sync::Arc;

use iovirt_bus::interrupt::test_doubles::RecordingMsiSink;
use iovirt_bus::BusDevice;
use iovirt_iommu::vtd::{regs, Vtd, VtdConfig};
use iovirt_iommu::{walk, Access, GuestTables, LargePages, RequesterId, Translator, WalkConfig};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;

fn word(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (k, x) in b.iter_mut().enumerate() {
        *x = d.get(i * 8 + k).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 64 {
        return;
    }
    let (params, image) = data.split_at(64);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&image[..image.len().min(MEM)], GuestAddress(0))
        .unwrap();

    // Raw walks: any root (in or out of memory), 3..=5 levels, any IOVA.
    let cfg = WalkConfig {
        levels: 3 + (params[0] % 3),
        haw: 39 + params[1] % 14,
        large: LargePages {
            size_2m: params[2] & 1 != 0,
            size_1g: params[2] & 2 != 0,
        },
    };
    let root = word(params, 1) % (MEM as u64 * 2);
    for i in 2..5 {
        let iova = word(params, i);
        if let Ok(m) = walk(&GuestTables(&mem), root & !0xfff, &cfg, iova) {
            assert!(m.contains(iova));
            assert!(!m.perms.is_empty());
        }
    }

    // The same memory as a guest's root/context/page tables behind a VT-d unit.
    let vtd = Vtd::new(
        VtdConfig {
            max_levels: 4 + (params[0] & 1),
            ..VtdConfig::default()
        },
        mem.clone(),
        Arc::new(RecordingMsiSink::new()),
    );
    vtd.write(regs::RTADDR, &(root & !0xfff).to_le_bytes());
    vtd.write(regs::GCMD, &regs::G_SRTP.to_le_bytes());
    vtd.write(regs::GCMD, &regs::G_TE.to_le_bytes());
    for i in 5..8 {
        let w = word(params, i);
        let rid = RequesterId((w >> 48) as u16);
        let iova = w & 0xffff_ffff_ffff;
        let access = if w & 1 != 0 {
            Access::Write
        } else {
            Access::Read
        };
        match vtd.translate(rid, iova, access) {
            Ok(m) => assert!(m.contains(iova) && m.perms.contains(access.perm())),
            Err(reason) => vtd.report_fault(iovirt_iommu::Fault {
                rid,
                iova,
                access,
                reason,
            }),
        }
    }
});
