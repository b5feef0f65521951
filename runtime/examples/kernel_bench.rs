//! Micro-benchmark of the matrix kernels on SmolLM2-135M shapes.
//!
//! `cargo run --release -p peftrt --example kernel_bench [-- --quick] [--matmul]`
//!
//! Prints GB/s of weight bytes streamed by `matvec` (decode) and GFLOP/s of `matmul` with 128
//! tokens (prefill), for F32/F16/BF16 weights on 1 and 2 threads. Variants are measured
//! alternately (round-robin, best of several rounds) so a noisy shared machine affects them alike.

use half::{bf16, f16};
use peftrt::kernels::{self, MatRef, Weights};
use peftrt::threadpool::ThreadPool;

mod common;
use common::time;

/// (name, out_features, in_features)
const SHAPES: &[(&str, usize, usize)] = &[
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("lm_head 49152x576", 49152, 576),
];

struct Data {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}

/// Copy `c` (of `len` elements) of the weights in `dtype`.
fn weights<'a>(d: &'a Data, dtype: &str, c: usize, len: usize) -> Weights<'a> {
    let r = c * len..(c + 1) * len;
    match dtype {
        "f32" => Weights::F32(&d.f32[r]),
        "f16" => Weights::F16(&d.f16[r]),
        _ => Weights::BF16(&d.bf16[r]),
    }
}

/// Enough copies of a `len`-element matrix that cycling through them streams ≥ 128 MB of f32,
/// far more than the caches: decode reads every weight from DRAM once per token.
fn copies(len: usize) -> usize {
    (128_000_000 / (4 * len)).max(1)
}

fn data(len: usize, copies: usize) -> Data {
    let v: Vec<f32> = (0..len * copies).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
    Data {
        f16: v.iter().map(|&x| f16::from_f32(x)).collect(),
        bf16: v.iter().map(|&x| bf16::from_f32(x)).collect(),
        f32: v,
    }
}

fn bytes_per(dtype: &str) -> usize {
    if dtype == "f32" {
        4
    } else {
        2
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let only_matmul = std::env::args().any(|a| a == "--matmul");
    let rounds = if quick { 2 } else { 5 };
    println!("kernels: {:?}", kernels::isa());
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let dtypes = ["f32", "f16", "bf16"];

    println!("\nmatvec (decode), GB/s of weights streamed; best of {rounds} rounds");
    println!("{:<20} {:>6} {:>9} {:>9}", "shape", "dtype", "1 thread", "2 threads");
    // Seconds per call of each shape, [shape][dtype][threads].
    let mut secs = Vec::new();
    for &(name, rows, cols) in SHAPES.iter().filter(|_| !only_matmul) {
        let nc = copies(rows * cols);
        let d = data(rows * cols, nc);
        let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut y = vec![0.0; rows];
        let mut best = [[f64::MAX; 2]; 3];
        // Enough calls per round to stream ~200 MB.
        let reps = (200_000_000 / (rows * cols * 4)).max(3) / if quick { 4 } else { 1 };
        for _ in 0..rounds {
            for (di, dt) in dtypes.iter().enumerate() {
                for (pi, pool) in pools.iter().enumerate() {
                    let mut c = 0;
                    let s = time(reps.max(1), || {
                        c = (c + 1) % nc;
                        let m = MatRef { w: weights(&d, dt, c, rows * cols), rows, cols };
                        kernels::matvec(pool, m, &x, &mut y)
                    });
                    best[di][pi] = best[di][pi].min(s);
                }
            }
        }
        for (di, dt) in dtypes.iter().enumerate() {
            let gb = (rows * cols * bytes_per(dt)) as f64 / 1e9;
            println!("{name:<20} {dt:>6} {:>9.1} {:>9.1}", gb / best[di][0], gb / best[di][1]);
        }
        secs.push(best);
    }

    // One decode step's projections: 30 layers × (q, k, v, o, gate, up, down) + lm_head.
    // One decode step's projections: 30 × (q, o: 576x576; k, v: 192x576; gate, up: 1536x576;
    // down: 576x1536) + lm_head.
    println!("\nall projections of one SmolLM2-135M decode step, tokens/s (upper bound of decode):");
    for (di, dt) in dtypes.iter().enumerate().filter(|_| !only_matmul) {
        let step = |pi: usize| {
            let s = |i: usize| secs[i][di][pi];
            30.0 * (2.0 * s(0) + 2.0 * s(1) + 2.0 * s(2) + s(3)) + s(4)
        };
        println!("{dt:>6}: 1 thread {:>6.1} tok/s, 2 threads {:>6.1} tok/s", 1.0 / step(0), 1.0 / step(1));
    }

    println!("\nmatmul (prefill, 128 tokens), GFLOP/s; best of {rounds} rounds");
    println!("{:<20} {:>6} {:>9} {:>9}", "shape", "dtype", "1 thread", "2 threads");
    let n = 128;
    for &(name, rows, cols) in SHAPES.iter().filter(|s| s.1 <= 1536) {
        let d = data(rows * cols, 1);
        let x: Vec<f32> = (0..n * cols).map(|i| (i % 13) as f32 * 0.1).collect();
        let mut y = vec![0.0; n * rows];
        let flop = 2.0 * (n * rows * cols) as f64;
        let reps = ((2e9 / flop) as usize).max(2) / if quick { 4 } else { 1 };
        let mut best = [[f64::MAX; 2]; 3];
        for _ in 0..rounds {
            for (di, dt) in dtypes.iter().enumerate() {
                for (pi, pool) in pools.iter().enumerate() {
                    let m = MatRef { w: weights(&d, dt, 0, rows * cols), rows, cols };
                    let s = time(reps.max(1), || kernels::matmul(pool, m, &x, n, &mut y));
                    best[di][pi] = best[di][pi].min(s);
                }
            }
        }
        for (di, dt) in dtypes.iter().enumerate() {
            println!("{name:<20} {dt:>6} {:>9.1} {:>9.1}", flop / best[di][0] / 1e9, flop / best[di][1] / 1e9);
        }
    }
}
