//! An indexed binary min-heap of clients keyed by a tag.
//!
//! Each client is in a heap at most once; its position is tracked so that its
//! key can be changed or it can be removed in O(log n) without a search. The
//! tie-breaker is the client index, so the order is total and deterministic.

/// Position marker for a client that is not in the heap.
const ABSENT: u32 = u32::MAX;

/// A min-heap of `(key, client index)` with O(log n) update and removal by index.
#[derive(Debug, Clone)]
pub(crate) struct KeyedHeap<K> {
    heap: Vec<(K, u32)>,
    pos: Vec<u32>,
}

impl<K: Ord + Copy> KeyedHeap<K> {
    pub(crate) fn new() -> Self {
        KeyedHeap {
            heap: Vec::new(),
            pos: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, id: u32) -> bool {
        self.pos.get(id as usize).is_some_and(|&p| p != ABSENT)
    }

    pub(crate) fn peek(&self) -> Option<(K, u32)> {
        self.heap.first().copied()
    }

    /// Insert `id` with `key`, or move it to `key` if it is already present.
    pub(crate) fn set(&mut self, id: u32, key: K) {
        let i = id as usize;
        if self.pos.len() <= i {
            self.pos.resize(i + 1, ABSENT);
        }
        let p = self.pos[i];
        if p == ABSENT {
            self.heap.push((key, id));
            let at = self.heap.len() - 1;
            self.pos[i] = at as u32;
            self.sift_up(at);
        } else {
            let at = p as usize;
            let old = self.heap[at].0;
            self.heap[at].0 = key;
            if key < old {
                self.sift_up(at);
            } else {
                self.sift_down(at);
            }
        }
    }

    /// Remove `id` if present.
    pub(crate) fn remove(&mut self, id: u32) {
        let Some(&p) = self.pos.get(id as usize) else {
            return;
        };
        if p == ABSENT {
            return;
        }
        let at = p as usize;
        let last = self.heap.len() - 1;
        self.swap(at, last);
        self.heap.pop();
        self.pos[id as usize] = ABSENT;
        if at < self.heap.len() {
            self.sift_down(at);
            self.sift_up(at);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].1 as usize] = a as u32;
        self.pos[self.heap[b].1 as usize] = b as u32;
    }

    /// Move the entry at `at` up to its place, shifting parents down into the
    /// hole instead of swapping (one position write per level).
    fn sift_up(&mut self, mut at: usize) {
        let item = self.heap[at];
        while at > 0 {
            let parent = (at - 1) / 2;
            if item < self.heap[parent] {
                self.heap[at] = self.heap[parent];
                self.pos[self.heap[at].1 as usize] = at as u32;
                at = parent;
            } else {
                break;
            }
        }
        self.heap[at] = item;
        self.pos[item.1 as usize] = at as u32;
    }

    /// Move the entry at `at` down to its place, the same way.
    fn sift_down(&mut self, mut at: usize) {
        let n = self.heap.len();
        let item = self.heap[at];
        loop {
            let l = 2 * at + 1;
            if l >= n {
                break;
            }
            let r = l + 1;
            let child = if r < n && self.heap[r] < self.heap[l] {
                r
            } else {
                l
            };
            if self.heap[child] < item {
                self.heap[at] = self.heap[child];
                self.pos[self.heap[at].1 as usize] = at as u32;
                at = child;
            } else {
                break;
            }
        }
        self.heap[at] = item;
        self.pos[item.1 as usize] = at as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_sorted_set(ops in proptest::collection::vec((0u32..20, 0i64..100, any::<bool>()), 0..200)) {
            let mut h = KeyedHeap::new();
            let mut model = std::collections::BTreeMap::new();
            for (id, key, insert) in ops {
                if insert {
                    h.set(id, key);
                    model.insert(id, key);
                } else {
                    h.remove(id);
                    model.remove(&id);
                }
                prop_assert_eq!(h.len(), model.len());
                let want = model.iter().map(|(&i, &k)| (k, i)).min();
                prop_assert_eq!(h.peek(), want);
                prop_assert!(model.keys().all(|&i| h.contains(i)));
            }
        }
    }
}
