//! Micro-benchmark of the decode kernels for GGUF block-quantised weights on SmolLM2-135M
//! shapes, beside F32 and BF16.
//!
//! `cargo run --release -p peftrt --example quant_bench [-- --quick]`
//!
//! For each shape and weight type, µs per `matvec` and GB/s of weight bytes streamed, with the
//! SIMD kernels (x quantised to 8 bits once per call, integer block dots) and with the scalar
//! path (each block dequantised to f32, then dotted); then the prefill GEMM (128 tokens,
//! weights dequantised into f32 row groups) in GFLOP/s. Variants run alternately, best of
//! several rounds, so a noisy shared machine affects them alike.

use half::bf16;
use peftrt::gguf::quants::GgmlType;
use peftrt::kernels::{self, Isa, MatRef, Quant, Weights};
use peftrt::threadpool::ThreadPool;

mod common;
use common::time;

/// (name, out_features, in_features)
const SHAPES: &[(&str, usize, usize)] = &[
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
    ("lm_head 49152x576", 49152, 576),
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
];

const TYPES: &[&str] = &["F32", "BF16", "Q8_0", "Q4_1", "Q4_0", "Q4_K", "Q6_K"];

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
}

fn ggml(ty: &str) -> Option<GgmlType> {
    Some(match ty {
        "Q8_0" => GgmlType::Q8_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q4_0" => GgmlType::Q4_0,
        "Q4_K" => GgmlType::Q4_K,
        "Q6_K" => GgmlType::Q6_K,
        _ => return None,
    })
}

/// Weight storage of one type: `len` elements, in copies enough to stream far more than the
/// caches (decode reads every weight from DRAM once per token).
enum Data {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    Quant(GgmlType, Vec<u8>),
}

impl Data {
    fn new(ty: &str, len: usize, copies: usize, rng: &mut Rng) -> Data {
        match ggml(ty) {
            None if ty == "F32" => {
                Data::F32((0..len * copies).map(|_| (rng.next() % 1000) as f32 * 1e-3 - 0.5).collect())
            }
            None => {
                Data::BF16((0..len * copies).map(|_| bf16::from_f32((rng.next() % 1000) as f32 * 1e-3 - 0.5)).collect())
            }
            Some(t) => {
                let (bs, ts) = (t.block_size(), t.type_size());
                let mut v: Vec<u8> = (0..len / bs * ts * copies).map(|_| rng.next() as u8).collect();
                // Finite f16 scales (0.01) where each type keeps them.
                let scales: &[usize] = match t {
                    GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
                    GgmlType::Q6_K => &[208],
                    _ => &[0],
                };
                for b in v.chunks_exact_mut(ts) {
                    for &o in scales {
                        b[o..o + 2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                    }
                }
                Data::Quant(t, v)
            }
        }
    }
    fn bytes(&self, len: usize) -> usize {
        match self {
            Data::F32(_) => 4 * len,
            Data::BF16(_) => 2 * len,
            Data::Quant(t, _) => len / t.block_size() * t.type_size(),
        }
    }
    /// Copy `c` of the `len`-element matrix.
    fn weights(&self, c: usize, len: usize) -> Weights<'_> {
        match self {
            Data::F32(v) => Weights::F32(&v[c * len..(c + 1) * len]),
            Data::BF16(v) => Weights::BF16(&v[c * len..(c + 1) * len]),
            Data::Quant(ty, v) => {
                let b = self.bytes(len);
                Weights::Quant(Quant { ty: *ty, data: &v[c * b..(c + 1) * b], len })
            }
        }
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 2 } else { 5 };
    let best_isa = kernels::isa();
    println!("kernels: {best_isa:?}");
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let mut rng = Rng(1);

    println!("\nmatvec (decode): µs per call and GB/s of weight bytes; best of {rounds} rounds");
    println!(
        "{:<19} {:>5} {:>19} {:>19} {:>19}",
        "shape", "type", "SIMD 1 thread", "SIMD 2 threads", "scalar 1 thread"
    );
    // Seconds per call: (shape, type) -> [SIMD 1, SIMD 2, scalar 1].
    let mut secs = std::collections::HashMap::new();
    for &(name, rows, cols) in SHAPES {
        let len = rows * cols;
        // K-quants need rows of whole 256-element blocks (llama.cpp gives 576-wide rows other types).
        let types: Vec<&str> =
            TYPES.iter().copied().filter(|t| ggml(t).is_none_or(|g| cols % g.block_size() == 0)).collect();
        let datas: Vec<Data> = types
            .iter()
            .map(|ty| {
                let bytes = Data::new(ty, len, 1, &mut rng).bytes(len);
                Data::new(ty, len, (256_000_000 / bytes).clamp(1, 64), &mut rng)
            })
            .collect();
        let x: Vec<f32> = (0..cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
        let mut y = vec![0.0; rows];
        // [type][SIMD 1, SIMD 2, scalar 1]
        let mut best = vec![[f64::MAX; 3]; types.len()];
        for _ in 0..rounds {
            for (ti, d) in datas.iter().enumerate() {
                let copies = match d {
                    Data::F32(v) => v.len() / len,
                    Data::BF16(v) => v.len() / len,
                    Data::Quant(_, v) => v.len() / d.bytes(len),
                };
                let reps = (100_000_000 / d.bytes(len)).max(3) / if quick { 4 } else { 1 };
                for (vi, (isa, pool)) in
                    [(best_isa, &pools[0]), (best_isa, &pools[1]), (Isa::Scalar, &pools[0])].into_iter().enumerate()
                {
                    // The scalar path of a large matrix is slow: fewer calls.
                    let reps = if isa == Isa::Scalar { (reps / 8).max(1) } else { reps.max(1) };
                    let mut c = 0;
                    let s = time(reps, || {
                        c = (c + 1) % copies;
                        let m = MatRef { w: d.weights(c, len), rows, cols };
                        kernels::matvec_isa(isa, pool, m, &x, &mut y)
                    });
                    best[ti][vi] = best[ti][vi].min(s);
                }
            }
        }
        for (ti, d) in datas.iter().enumerate() {
            let gb = d.bytes(len) as f64 / 1e9;
            let cell = |s: f64| format!("{:>8.1} µs {:>5.1} GB/s", s * 1e6, gb / s);
            println!("{name:<19} {:>5} {} {} {}", types[ti], cell(best[ti][0]), cell(best[ti][1]), cell(best[ti][2]));
            secs.insert((rows, cols, types[ti]), best[ti]);
        }
    }

    // One decode step's projections: 30 × (q, o: 576x576; k, v: 192x576; gate, up: 1536x576;
    // down: 576x1536) + lm_head, as SmolLM2-135M-Instruct.Q4_1.gguf stores them (layers Q4_1,
    // the tied embedding Q8_0) beside all-F32 and all-BF16.
    println!("\nall projections of one SmolLM2-135M decode step, tokens/s (an upper bound of decode):");
    for (label, layer, head) in [("F32", "F32", "F32"), ("BF16", "BF16", "BF16"), ("Q4_1 + Q8_0 head", "Q4_1", "Q8_0")]
    {
        let step = |v: usize| {
            let s = |r: usize, c: usize, t: &str| secs[&(r, c, t)][v];
            30.0 * (2.0 * s(576, 576, layer)
                + 2.0 * s(192, 576, layer)
                + 2.0 * s(1536, 576, layer)
                + s(576, 1536, layer))
                + s(49152, 576, head)
        };
        println!(
            "{label:>17}: SIMD 1 thread {:>6.1}, SIMD 2 threads {:>6.1}, scalar 1 thread {:>6.1}",
            1.0 / step(0),
            1.0 / step(1),
            1.0 / step(2)
        );
    }

    for n in [16, 128] {
        println!("\nmatmul (prefill, {n} tokens), GFLOP/s, 1 thread; best of {rounds} rounds");
        for &(name, rows, cols) in &SHAPES[..2] {
            let len = rows * cols;
            let types: Vec<&str> =
                TYPES.iter().copied().filter(|t| ggml(t).is_none_or(|g| cols % g.block_size() == 0)).collect();
            let datas: Vec<Data> = types.iter().map(|ty| Data::new(ty, len, 1, &mut rng)).collect();
            let x: Vec<f32> = (0..n * cols).map(|i| (i % 13) as f32 * 0.1 - 0.6).collect();
            let mut y = vec![0.0; n * rows];
            let flop = 2.0 * (n * len) as f64;
            let reps = ((1e9 / flop) as usize).max(2) / if quick { 4 } else { 1 };
            let mut best = vec![f64::MAX; types.len()];
            for _ in 0..rounds {
                for (ti, d) in datas.iter().enumerate() {
                    let m = MatRef { w: d.weights(0, len), rows, cols };
                    best[ti] = best[ti].min(time(reps.max(1), || kernels::matmul(&pools[0], m, &x, n, &mut y)));
                }
            }
            let row: Vec<String> = types.iter().zip(&best).map(|(t, s)| format!("{t} {:.1}", flop / s / 1e9)).collect();
            println!("{name:<19} {}", row.join("  "));
        }
    }
}
