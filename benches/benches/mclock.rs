//! mClock decision cost: one enqueue plus one dispatch with 1000 active
//! clients (the budget is 200 ns), backlogged and at queue depth 1
//! (every enqueue is an idle client coming back, which synchronises P tags).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use iovirt_sched::{ClientParams, MClock};

/// 1000 clients: every 4th with a reservation, every 10th with a limit, weights 1..=8.
fn scheduler(n: u32, depth: u32) -> MClock<u64> {
    let mut s = MClock::new();
    for i in 0..n {
        let reservation = if i % 4 == 0 { 50.0 } else { 0.0 };
        let limit = (i % 10 == 0).then_some(5000.0);
        let weight = f64::from(i % 8 + 1);
        let id = s.add_client(ClientParams::new(reservation, limit, weight).expect("valid"));
        for k in 0..depth {
            s.enqueue(id, u64::from(k), 1.0, 0).expect("known client");
        }
    }
    s
}

fn enqueue_dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("mclock");
    for (name, depth) in [("backlogged", 4u32), ("depth1", 1)] {
        for n in [10u32, 1000] {
            let mut s = scheduler(n, depth);
            // Each iteration is 1 µs of virtual time: a 1M IOPS device.
            let mut now = 0u64;
            g.bench_function(
                BenchmarkId::new(format!("enqueue+dispatch/{name}"), n),
                |b| {
                    b.iter(|| {
                        now += 1000;
                        let d = s.dispatch(black_box(now)).expect("work queued");
                        s.enqueue(d.client, d.item, 1.0, now).expect("known client");
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, enqueue_dispatch);
criterion_main!(benches);
