//! A lazily started timer thread that runs jobs at their deadlines (slow
//! requests, stalls with a duration, rate limits).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Instant;

type Job = Box<dyn FnOnce() + Send>;

struct Entry {
    at: Instant,
    seq: u64,
    job: Job,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // Reversed: the earliest deadline is the greatest, so it tops the max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Entry>,
    seq: u64,
    running: bool,
    shutdown: bool,
}

#[derive(Default)]
struct Inner {
    q: Mutex<Queue>,
    cv: Condvar,
}

/// Runs jobs on one background thread at their deadlines, in deadline order.
/// Dropping the timer lets the thread finish the queued jobs and exit.
#[derive(Default)]
pub(crate) struct Timer {
    inner: Arc<Inner>,
}

impl Timer {
    /// Run `job` at `at` (at once on the timer thread if `at` has passed).
    pub(crate) fn schedule(&self, at: Instant, job: impl FnOnce() + Send + 'static) {
        let mut q = self.inner.q.lock().unwrap_or_else(|e| e.into_inner());
        q.seq += 1;
        let seq = q.seq;
        q.heap.push(Entry {
            at,
            seq,
            job: Box::new(job),
        });
        if !q.running {
            let inner = self.inner.clone();
            let spawned = thread::Builder::new()
                .name("iovirt-fault-timer".into())
                .spawn(move || run(inner));
            match spawned {
                Ok(_) => q.running = true,
                Err(e) => {
                    // No thread: run what is due-or-not now rather than never.
                    log::warn!("fault filter: cannot start its timer thread ({e}); running delayed jobs at once");
                    let jobs: Vec<Entry> = std::mem::take(&mut q.heap).into_sorted_vec();
                    drop(q);
                    for e in jobs.into_iter().rev() {
                        (e.job)();
                    }
                    return;
                }
            }
        }
        drop(q);
        self.inner.cv.notify_one();
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let mut q = self.inner.q.lock().unwrap_or_else(|e| e.into_inner());
        q.shutdown = true;
        drop(q);
        self.inner.cv.notify_one();
    }
}

fn run(inner: Arc<Inner>) {
    let mut q = inner.q.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let now = Instant::now();
        match q.heap.peek().map(|e| e.at) {
            Some(at) if at <= now => {
                if let Some(e) = q.heap.pop() {
                    drop(q);
                    (e.job)();
                    q = inner.q.lock().unwrap_or_else(|e| e.into_inner());
                }
            }
            Some(at) => {
                q = inner
                    .cv
                    .wait_timeout(q, at - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            None if q.shutdown => {
                q.running = false;
                return;
            }
            None => {
                q = inner.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}
