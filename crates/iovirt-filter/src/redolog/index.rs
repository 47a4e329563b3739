//! The in-memory extent index: disk ranges → where their newest data is.
//! One entry per distinct extent, split where a later write overlaps, so
//! memory follows the number of distinct extents, not of writes.

use std::collections::BTreeMap;

/// Where an extent's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    /// In the log file, starting at this file offset (for the extent's first byte).
    Log(u64),
    /// Zeroes (write-zeroes or discard).
    Zero,
}

impl Src {
    fn advance(self, by: u64) -> Src {
        match self {
            Src::Log(p) => Src::Log(p + by),
            Src::Zero => Src::Zero,
        }
    }
}

/// A piece of a lookup: `[start, end)` comes from `src`, or from the base when `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) src: Option<Src>,
}

/// Non-overlapping extents keyed by their first byte.
#[derive(Clone, Debug, Default)]
pub(crate) struct ExtentMap {
    map: BTreeMap<u64, (u64, Src)>,
}

impl ExtentMap {
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// `[start, end)` now comes from `src`.
    pub(crate) fn insert(&mut self, start: u64, end: u64, src: Src) {
        if start >= end {
            return;
        }
        let mut hit = Vec::new();
        if let Some((&s, &(e, _))) = self.map.range(..start).next_back() {
            if e > start {
                hit.push(s);
            }
        }
        hit.extend(self.map.range(start..end).map(|(&s, _)| s));
        for s in hit {
            let Some((e, v)) = self.map.remove(&s) else {
                continue;
            };
            if s < start {
                self.map.insert(s, (start, v));
            }
            if e > end {
                self.map.insert(end, (e, v.advance(end - s)));
            }
        }
        // Coalesce with a neighbour holding contiguous data.
        let mut start = start;
        let mut src = src;
        if let Some((&s, &(e, v))) = self.map.range(..start).next_back() {
            if e == start && v.advance(start - s) == src {
                self.map.remove(&s);
                start = s;
                src = v;
            }
        }
        let mut end = end;
        if let Some(&(e, v)) = self.map.get(&end) {
            if src.advance(end - start) == v {
                self.map.remove(&end);
                end = e;
            }
        }
        self.map.insert(start, (end, src));
    }

    /// Cover `[start, end)` with pieces in order.
    pub(crate) fn lookup(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let first = match self.map.range(..=start).next_back() {
            Some((&s, &(e, _))) if e > start => s,
            _ => start,
        };
        let mut pos = start;
        for (&s, &(e, v)) in self.map.range(first..end) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push(Piece {
                    start: pos,
                    end: s,
                    src: None,
                });
                pos = s;
            }
            let pe = e.min(end);
            out.push(Piece {
                start: pos,
                end: pe,
                src: Some(v.advance(pos - s)),
            });
            pos = pe;
        }
        if pos < end {
            out.push(Piece {
                start: pos,
                end,
                src: None,
            });
        }
        out
    }

    /// Every extent, in disk order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, Src)> + '_ {
        self.map.iter().map(|(&s, &(e, v))| (s, e, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlaps_split_and_lookups_cover() {
        let mut m = ExtentMap::default();
        m.insert(0, 100, Src::Log(1000));
        m.insert(40, 60, Src::Log(5000));
        assert_eq!(m.len(), 3);
        let p = m.lookup(30, 120);
        assert_eq!(
            p,
            vec![
                Piece {
                    start: 30,
                    end: 40,
                    src: Some(Src::Log(1030))
                },
                Piece {
                    start: 40,
                    end: 60,
                    src: Some(Src::Log(5000))
                },
                Piece {
                    start: 60,
                    end: 100,
                    src: Some(Src::Log(1060))
                },
                Piece {
                    start: 100,
                    end: 120,
                    src: None
                },
            ]
        );
        m.insert(0, 200, Src::Zero);
        assert_eq!(m.len(), 1);
        for i in 0..1000u64 {
            m.insert((i % 10) * 1000, (i % 10) * 1000 + 512, Src::Log(i * 600));
        }
        assert_eq!(m.len(), 10);
    }
}
