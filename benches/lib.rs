//! Criterion benchmarks of iovirt's hot paths; the benches are in `benches/`.
//! Run them with `cargo bench -p iovirt-benches`; numbers go to docs/PERFORMANCE.md.
