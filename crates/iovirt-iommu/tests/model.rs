//! proptest: map, unmap and translate against a BTreeMap of 4 KiB pages, with
//! IOTLB consistency: a translation may return a stale value only if that
//! value was mapped at some point since the last invalidation covering the
//! page, and after an invalidation it matches the model exactly.

use std::collections::{BTreeMap, BTreeSet};

use iovirt_iommu::{Access, Iommu, Perms, WalkConfig};
use proptest::prelude::*;

const DID: u16 = 3;
const SPACE_PAGES: u64 = 1 << 14; // 64 MiB of IOVA space
type Val = (u64, u8); // (gpa page, perms bits)

#[derive(Clone, Debug)]
enum Op {
    /// Map through the host API (invalidates) or by editing tables (raw, no invalidation).
    Map {
        page: u64,
        gpa: u64,
        pages: u64,
        perms: u8,
        raw: bool,
    },
    Unmap {
        page: u64,
        pages: u64,
        raw: bool,
    },
    Translate {
        page: u64,
        off: u64,
        write: bool,
    },
    InvalidatePages {
        page: u64,
        am: u8,
    },
    InvalidateAll,
}

fn op() -> impl Strategy<Value = Op> {
    // Alignment choices make 2 MiB pages likely: page numbers multiple of 512.
    // Mostly a few hot pages, so that maps, translations and invalidations collide.
    let page = prop_oneof![
        3 => 0u64..16,
        2 => (0u64..4).prop_map(|p| p * 512),
        2 => (0u64..4).prop_map(|p| p * 512 + 1),
        1 => 0..SPACE_PAGES,
    ];
    let pages = prop_oneof![3 => 1u64..8, 1 => Just(512u64), 1 => Just(1024u64), 1 => 1u64..600];
    prop_oneof![
        4 => (page.clone(), prop_oneof![0u64..(1 << 20), (0u64..2048).prop_map(|p| p * 512)], pages.clone(), 1u8..4, any::<bool>())
            .prop_map(|(page, gpa, pages, perms, raw)| Op::Map { page, gpa, pages, perms, raw }),
        2 => (page.clone(), pages, any::<bool>()).prop_map(|(page, pages, raw)| Op::Unmap { page, pages, raw }),
        6 => (page.clone(), 0u64..4096, any::<bool>()).prop_map(|(page, off, write)| Op::Translate { page, off, write }),
        1 => (page, 0u8..11).prop_map(|(page, am)| Op::InvalidatePages { page, am }),
        1 => Just(Op::InvalidateAll),
    ]
}

struct Model {
    cur: BTreeMap<u64, Val>,
    /// Values each page held since the last invalidation that covered it.
    hist: BTreeMap<u64, BTreeSet<Option<Val>>>,
}

impl Model {
    fn set(&mut self, p: u64, v: Option<Val>, invalidated: bool) {
        match v {
            Some(v) => self.cur.insert(p, v),
            None => self.cur.remove(&p),
        };
        let h = self.hist.entry(p).or_default();
        if invalidated {
            h.clear();
        }
        h.insert(v);
    }
    fn invalidate(&mut self, start: u64, end: u64) {
        let pages: Vec<u64> = self.hist.range(start..end).map(|(p, _)| *p).collect();
        for p in pages {
            let v = self.cur.get(&p).copied();
            let h = self.hist.entry(p).or_default();
            h.clear();
            h.insert(v);
        }
    }
}

fn clamp(page: u64, pages: u64) -> u64 {
    pages.min(SPACE_PAGES - page).max(1)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn iommu_agrees_with_model(ops in proptest::collection::vec(op(), 1..60)) {
        let io = Iommu::new();
        io.create_domain(DID, WalkConfig::FOUR_LEVEL).unwrap();
        let mut m = Model { cur: BTreeMap::new(), hist: BTreeMap::new() };
        for op in ops {
            match op {
                Op::Map { page, gpa, pages, perms, raw } => {
                    let pages = clamp(page, pages);
                    let p = Perms::from_bits_truncate(perms);
                    let (iova, g, len) = (page << 12, gpa << 12, pages << 12);
                    if raw {
                        io.with_domain(DID, |d| d.map(iova, g, len, p)).unwrap().unwrap();
                    } else {
                        io.map(DID, iova, g, len, p).unwrap();
                    }
                    for i in 0..pages {
                        m.set(page + i, Some((gpa + i, perms)), !raw);
                    }
                }
                Op::Unmap { page, pages, raw } => {
                    let pages = clamp(page, pages);
                    if raw {
                        io.with_domain(DID, |d| d.unmap(page << 12, pages << 12)).unwrap().unwrap();
                    } else {
                        io.unmap(DID, page << 12, pages << 12).unwrap();
                    }
                    for i in 0..pages {
                        m.set(page + i, None, !raw);
                    }
                }
                Op::Translate { page, off, write } => {
                    let access = if write { Access::Write } else { Access::Read };
                    let need = if write { 2 } else { 1 };
                    let iova = (page << 12) | off;
                    let cur = m.cur.get(&page).copied();
                    match io.translate_in(DID, iova, access) {
                        Ok(t) => {
                            let got = (t.gpa_of(iova) >> 12, t.perms.bits());
                            prop_assert_eq!(t.gpa_of(iova) & 0xfff, off);
                            prop_assert!(got.1 & need != 0);
                            let allowed = m.hist.get(&page).is_some_and(|h| h.contains(&Some(got)));
                            prop_assert!(allowed || cur == Some(got),
                                "page {:#x}: got {:?}, model {:?}, since invalidation {:?}", page, got, cur, m.hist.get(&page));
                        }
                        Err(_) => prop_assert!(cur.is_none_or(|c| c.1 & need == 0),
                            "page {:#x} faulted but the model maps it {:?}", page, cur),
                    }
                }
                Op::InvalidatePages { page, am } => {
                    io.iotlb().invalidate_pages(DID, page << 12, am);
                    let start = page & !((1u64 << am) - 1);
                    m.invalidate(start, start + (1 << am));
                }
                Op::InvalidateAll => {
                    io.iotlb().invalidate_all();
                    m.invalidate(0, u64::MAX);
                }
            }
        }
        // After a global invalidation everything matches the model exactly.
        io.iotlb().invalidate_all();
        for (&p, _) in m.hist.iter() {
            let cur = m.cur.get(&p).copied();
            let r = io.translate_in(DID, p << 12, Access::Read).ok();
            let w = io.translate_in(DID, p << 12, Access::Write).ok();
            let got = r.or(w).map(|t| (t.gpa_of(p << 12) >> 12, t.perms.bits()));
            prop_assert_eq!(got, cur, "page {:#x}", p);
        }
    }
}
