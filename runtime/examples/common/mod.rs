//! What the micro-benchmarks share (each example includes it with `mod common;`).

use std::time::Instant;

/// Seconds per call, averaged over `reps` calls after one warm-up call.
pub fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() / reps as f64
}
