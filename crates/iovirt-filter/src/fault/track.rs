//! Write tracking for the power cut: per sector, the content it had at the
//! last durable point and every write since, so a power cut can put back
//! exactly the content covered by completed flushes.
//!
//! A write becomes *durable* when it completed (to the layer above) with FUA,
//! or completed before a flush was submitted and that flush then completed
//! successfully. After a power cut each tracked sector holds the data of the
//! last durable write to it, in the order the filter passed writes to the
//! child (the filter passes at most one write at a time while tracking), or
//! the data it had before any write since tracking began.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A write, discard or write-zeroes as the tracker sees it.
#[derive(Debug, Default)]
pub(crate) struct WriteState {
    /// Completion order (1, 2, ...) once completed; 0 before.
    ack: AtomicU64,
    fua: bool,
    /// Counted as durable whatever happens (the sectors of a torn write before a crash).
    forced: AtomicBool,
}

impl WriteState {
    pub(crate) fn new(fua: bool) -> Arc<Self> {
        Arc::new(WriteState {
            fua,
            ..WriteState::default()
        })
    }

    pub(crate) fn force_durable(&self) {
        self.forced.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone, Debug)]
struct Chunk {
    data: Arc<[u8]>,
    off: usize,
}

#[derive(Debug)]
struct SectorHist {
    base: Chunk,
    versions: Vec<(Arc<WriteState>, Chunk)>,
}

/// What a power cut must write back.
#[derive(Debug, Default)]
pub(crate) struct RestorePlan {
    /// (byte offset, data) runs of contiguous sectors.
    pub(crate) runs: Vec<(u64, Vec<u8>)>,
    /// Sectors whose content goes back to an older state.
    pub(crate) rolled_back: u64,
}

#[derive(Debug)]
pub(crate) struct Tracker {
    bs: usize,
    hist: BTreeMap<u64, SectorHist>,
    acks: u64,
    durable_upto: u64,
}

impl Tracker {
    pub(crate) fn new(block_size: u32) -> Self {
        Tracker {
            bs: block_size.max(1) as usize,
            hist: BTreeMap::new(),
            acks: 0,
            durable_upto: 0,
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.bs
    }

    fn durable(&self, w: &WriteState) -> bool {
        if w.forced.load(Ordering::SeqCst) {
            return true;
        }
        let ack = w.ack.load(Ordering::SeqCst);
        ack != 0 && (w.fua || ack <= self.durable_upto)
    }

    /// The child's content of `data.len()` bytes from sector `first`, read
    /// while no tracked write was in flight: the base of untracked sectors.
    pub(crate) fn set_base(&mut self, first: u64, data: &Arc<[u8]>) {
        for i in 0..(data.len() / self.bs) {
            self.hist
                .entry(first + i as u64)
                .or_insert_with(|| SectorHist {
                    base: Chunk {
                        data: data.clone(),
                        off: i * self.bs,
                    },
                    versions: Vec::new(),
                });
        }
    }

    /// `w` puts `data` into the sectors from `first` (their base is set).
    pub(crate) fn record(&mut self, w: &Arc<WriteState>, first: u64, data: &Arc<[u8]>) {
        for i in 0..(data.len() / self.bs) {
            let chunk = Chunk {
                data: data.clone(),
                off: i * self.bs,
            };
            if let Some(h) = self.hist.get_mut(&(first + i as u64)) {
                match h.versions.iter_mut().find(|(v, _)| Arc::ptr_eq(v, w)) {
                    Some(slot) => slot.1 = chunk,
                    None => h.versions.push((w.clone(), chunk)),
                }
            }
        }
    }

    /// `w` completed (successfully or not).
    pub(crate) fn completed(&mut self, w: &WriteState) {
        self.acks += 1;
        w.ack.store(self.acks, Ordering::SeqCst);
    }

    /// A flush is being submitted: what it covers.
    pub(crate) fn flush_mark(&self) -> u64 {
        self.acks
    }

    /// A flush submitted at `mark` completed successfully.
    pub(crate) fn flushed(&mut self, mark: u64) {
        self.durable_upto = self.durable_upto.max(mark);
        self.collect();
    }

    /// Forget what no power cut can need: versions older than the last durable one.
    fn collect(&mut self) {
        let mut hist = std::mem::take(&mut self.hist);
        hist.retain(|_, h| {
            if let Some(k) = h.versions.iter().rposition(|(w, _)| self.durable(w)) {
                h.base = h.versions[k].1.clone();
                h.versions.drain(..=k);
            }
            !h.versions.is_empty()
        });
        self.hist = hist;
    }

    /// Stop tracking and say what to write back to reach the last durable state.
    pub(crate) fn take_restore_plan(&mut self) -> RestorePlan {
        let hist = std::mem::take(&mut self.hist);
        let mut plan = RestorePlan::default();
        let mut run: Option<(u64, u64, Vec<u8>)> = None; // (first sector, next sector, data)
        for (sector, h) in hist {
            let k = h.versions.iter().rposition(|(w, _)| self.durable(w));
            let chunk = match k {
                Some(k) => &h.versions[k].1,
                None => &h.base,
            };
            if k.map_or(0, |k| k + 1) != h.versions.len() {
                plan.rolled_back += 1;
            }
            let bytes = chunk
                .data
                .get(chunk.off..chunk.off + self.bs)
                .unwrap_or(&[]);
            match &mut run {
                Some((_, next, data)) if *next == sector => {
                    data.extend_from_slice(bytes);
                    *next += 1;
                }
                _ => {
                    if let Some((first, _, data)) = run.take() {
                        plan.runs.push((first * self.bs as u64, data));
                    }
                    run = Some((sector, sector + 1, bytes.to_vec()));
                }
            }
        }
        if let Some((first, _, data)) = run {
            plan.runs.push((first * self.bs as u64, data));
        }
        self.acks = 0;
        self.durable_upto = 0;
        plan
    }

    /// Sectors with history (for tests and statistics).
    pub(crate) fn tracked_sectors(&self) -> usize {
        self.hist.len()
    }
}

pub(crate) use crate::aggregate::parts::Scratch;
