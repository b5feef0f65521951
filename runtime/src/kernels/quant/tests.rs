//! The integer-dot kernels three ways: every instruction set against the scalar reference
//! [`dot_ref`], the reference against an f64 dot of ggml's dequantised values (`gguf::quants`,
//! bit-exact against gguf-py) with the same quantised activation, and the whole decode path
//! against the f64 dot with the unquantised `x`, within the 8-bit rounding bound. And the
//! batching invariant: a token's outputs do not depend on the other tokens of the call.
//!
//! Error budgets: SIMD vs reference, |Δ| ≤ 1e-5 · Σ|ŵ_k·x̂_k| (only the f32 summation order
//! differs: the integer sums are exact); decode vs the unquantised dot, |Δ| ≤ Σ_b d_b/2 ·
//! Σ_{k∈b} |ŵ_k| · 1.001 + 1e-5 · Σ|ŵ_k·x_k| (each x̂ is within half a step `d_b = max_b|x|/127`
//! of `x`).

use super::*;
use crate::gguf::quants;
use crate::kernels::{matmul_many_isa_path, matvec_isa, matvec_local, MatRef, Path, Weights};
use crate::threadpool::ThreadPool;

struct Rng(u64);
impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn byte(&mut self) -> u8 {
        self.u32() as u8
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
    fn f16(&mut self, lo: f32, hi: f32) -> [u8; 2] {
        half::f16::from_f32(lo + (hi - lo) * (self.f32() + 1.0) / 2.0).to_le_bytes()
    }
}

const TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// `n` valid random blocks of `ty`: finite f16 scales (mins of either sign), random codes.
fn blocks(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * ty.type_size());
    for _ in 0..n {
        let mut b: Vec<u8> = (0..ty.type_size()).map(|_| rng.byte()).collect();
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => b[..2].copy_from_slice(&rng.f16(1e-3, 2e-2)),
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                b[..2].copy_from_slice(&rng.f16(1e-3, 2e-2));
                b[2..4].copy_from_slice(&rng.f16(-0.2, 0.1));
            }
            GgmlType::Q2_K => {
                b[80..82].copy_from_slice(&rng.f16(1e-4, 2e-3));
                b[82..84].copy_from_slice(&rng.f16(1e-4, 2e-3));
            }
            GgmlType::Q3_K => b[108..110].copy_from_slice(&rng.f16(1e-4, 2e-3)),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                b[..2].copy_from_slice(&rng.f16(1e-4, 2e-3));
                b[2..4].copy_from_slice(&rng.f16(1e-4, 2e-3));
            }
            GgmlType::Q6_K => b[208..210].copy_from_slice(&rng.f16(1e-4, 2e-3)),
            _ => unreachable!(),
        }
        out.extend(b);
    }
    out
}

/// Activations with a spread of magnitudes per block (and one all-zero block).
fn activations(len: usize, rng: &mut Rng) -> Vec<f32> {
    let mut x: Vec<f32> = (0..len).map(|i| rng.f32() * [1.0, 0.01, 30.0][i / 32 % 3]).collect();
    if len >= 64 {
        x[32..64].fill(0.0);
    }
    x
}

fn dequant(ty: GgmlType, data: &[u8], len: usize) -> Vec<f32> {
    let mut w = vec![0.0; len];
    quants::dequantize(ty, data, &mut w).unwrap();
    w
}

fn unquant(xq: &[QBlock]) -> Vec<f32> {
    xq.iter().flat_map(|b| b.qs.map(|q| b.d * f32::from(q))).collect()
}

/// Σ ŵ·v in f64 and Σ|ŵ·v| (the error scale).
fn dot64(w: &[f32], v: &[f32]) -> (f64, f64) {
    w.iter().zip(v).fold((0.0, 0.0), |(s, a), (&w, &v)| {
        let p = f64::from(w) * f64::from(v);
        (s + p, a + p.abs())
    })
}

fn shapes(ty: GgmlType) -> Vec<(usize, usize)> {
    let k = ty.block_size();
    vec![(1, k), (3, 2 * k), (7, 3 * k), (9, 5 * k), (16, 1536 / k * k), (5, 576 / k.max(64) * k.max(64))]
}

/// The scalar reference is ggml's dequantised weights dotted with the quantised activation.
#[test]
fn reference_matches_dequantised_weights_times_quantised_x() {
    let mut rng = Rng(1);
    for ty in TYPES {
        for (rows, cols) in shapes(ty) {
            let data = blocks(ty, rows * cols / ty.block_size(), &mut rng);
            let w = dequant(ty, &data, rows * cols);
            let x = activations(cols, &mut rng);
            let mut xq = vec![QBlock::default(); cols / QK];
            quantize_x(&x, &mut xq);
            let xh = unquant(&xq);
            let rb = data.len() / rows;
            for r in 0..rows {
                let got = dot_ref(ty, &data[r * rb..(r + 1) * rb], &xq);
                let (want, scale) = dot64(&w[r * cols..(r + 1) * cols], &xh);
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * scale + 1e-30,
                    "{ty} {rows}x{cols} row {r}: {got} vs {want}"
                );
            }
        }
    }
}

/// ggml's `quantize_row_q8_1_ref`: round half away from zero, `s = d · Σ q`, zeros stay zero.
#[test]
fn activation_quantisation_is_ggmls() {
    let mut x = [0f32; 64];
    x[0] = 1.27;
    x[1] = -0.005; // −0.5 steps: away from zero
    x[2] = 0.015; // 1.5 steps
    let mut q = [QBlock::default(); 2];
    quantize_x(&x, &mut q);
    assert_eq!(q[0].d, 1.27 / 127.0);
    assert_eq!(&q[0].qs[..4], &[127, -1, 2, 0]);
    assert_eq!(q[0].s, 128.0 * q[0].d);
    assert_eq!(q[1], QBlock::default());
}

/// Each instruction set's kernel against the reference, every type and shape; where AVX-512
/// VNNI runs, it gives AVX2's results bit for bit (the same integer lanes, the same f32 steps).
#[test]
fn every_isa_matches_the_reference() {
    let mut rng = Rng(2);
    for ty in TYPES {
        for (rows, cols) in shapes(ty) {
            let data = blocks(ty, rows * cols / ty.block_size(), &mut rng);
            let w = dequant(ty, &data, rows * cols);
            let q = Quant { ty, data: &data, len: rows * cols };
            let n = 3;
            let x = activations(n * cols, &mut rng);
            let mut xq = vec![QBlock::default(); n * cols / QK];
            quantize_x(&x, &mut xq);
            let xh = unquant(&xq);
            let mut results = Vec::new();
            for isa in Isa::available() {
                let mut y = vec![f32::NAN; n * rows];
                // SAFETY: `isa` is available; the shapes are consistent (built above).
                unsafe { rows_multi_isa(isa, q, cols, 0..rows, &xq, n, y.as_mut_ptr(), rows) };
                let rb = data.len() / rows;
                for t in 0..n {
                    for r in 0..rows {
                        let want = dot_ref(ty, &data[r * rb..(r + 1) * rb], &xq[t * cols / QK..(t + 1) * cols / QK]);
                        let (_, scale) = dot64(&w[r * cols..(r + 1) * cols], &xh[t * cols..(t + 1) * cols]);
                        let got = y[t * rows + r];
                        assert!(
                            (f64::from(got) - f64::from(want)).abs() <= 1e-5 * scale + 1e-30,
                            "{isa:?} {ty} {rows}x{cols} token {t} row {r}: {got} vs {want}"
                        );
                    }
                }
                results.push((isa, y));
            }
            let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let of = |i: Isa| results.iter().find(|(isa, _)| *isa == i).map(|(_, y)| y);
            if let Some(a) = of(Isa::Avx2) {
                for b in [Isa::Avx512, Isa::Avx512Bf16].into_iter().filter_map(of) {
                    assert_eq!(bits(a), bits(b), "{ty} {rows}x{cols}: VNNI differs from AVX2");
                }
            }
        }
    }
}

/// The decode path (`matvec`, 1–3 threads) against the f64 dot with the unquantised `x`, within
/// the 8-bit rounding bound; `matvec_local` (the per-thread row path) gives the same bits.
#[test]
fn decode_is_within_the_activation_rounding_bound() {
    let mut rng = Rng(3);
    let pools: Vec<ThreadPool> = [1, 2, 3].map(ThreadPool::new).into();
    for ty in TYPES {
        for (rows, cols) in shapes(ty).into_iter().chain([(40, 1536 / ty.block_size() * ty.block_size())]) {
            let data = blocks(ty, rows * cols / ty.block_size(), &mut rng);
            let w = dequant(ty, &data, rows * cols);
            let m = MatRef { w: Weights::Quant(Quant { ty, data: &data, len: rows * cols }), rows, cols };
            let x = activations(cols, &mut rng);
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
                for pool in &pools {
                    let mut y = vec![f32::NAN; rows];
                    matvec_isa(isa, pool, m, &x, &mut y);
                    for r in 0..rows {
                        let wr = &w[r * cols..(r + 1) * cols];
                        let (want, scale) = dot64(wr, &x);
                        let bound: f64 = wr
                            .chunks(QK)
                            .zip(x.chunks(QK))
                            .map(|(w, x)| {
                                let d = f64::from(x.iter().fold(0f32, |a, v| a.max(v.abs()))) / 127.0;
                                d / 2.0 * w.iter().map(|w| f64::from(w.abs())).sum::<f64>()
                            })
                            .sum();
                        let err = (f64::from(y[r]) - want).abs();
                        assert!(
                            err <= bound * 1.001 + 1e-5 * scale + 1e-30,
                            "{isa:?} {ty} {rows}x{cols} row {r}: {} vs {want}, err {err:e} > bound {bound:e}",
                            y[r]
                        );
                    }
                    if isa == crate::kernels::isa() {
                        let mut local = vec![f32::NAN; rows];
                        matvec_local(m, &x, &mut local);
                        assert_eq!(
                            local.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                        );
                    }
                }
            }
        }
    }
}

/// The batching invariant for quantised weights (see `Path`), several matrices of mixed types
/// in one call: along either path a token's outputs are bit for bit the same whichever tokens
/// share the call and however many threads run it, and the `Dot` path is `matvec`.
#[test]
fn a_tokens_outputs_do_not_depend_on_the_batch() {
    let mut rng = Rng(4);
    let pools: Vec<ThreadPool> = [1, 2, 3].map(ThreadPool::new).into();
    let cols = 512;
    let rows = [33, 8, 70, 5, 16, 3, 9, 21, 4, 17];
    let datas: Vec<Vec<u8>> =
        TYPES.iter().zip(rows).map(|(&ty, r)| blocks(ty, r * cols / ty.block_size(), &mut rng)).collect();
    let f32w: Vec<f32> = (0..9 * cols).map(|_| rng.f32()).collect();
    let mut ms: Vec<MatRef> = TYPES
        .iter()
        .zip(rows)
        .zip(&datas)
        .map(|((&ty, rows), d)| MatRef { w: Weights::Quant(Quant { ty, data: d, len: rows * cols }), rows, cols })
        .collect();
    ms.push(MatRef { w: Weights::F32(&f32w), rows: 9, cols });
    let n = 37;
    let x = activations(n * cols, &mut rng);
    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for isa in Isa::available() {
        for path in [Path::Dot, Path::Tiled] {
            let mut all: Vec<Vec<f32>> = ms.iter().map(|m| vec![f32::NAN; n * m.rows]).collect();
            let mut ys: Vec<&mut [f32]> = all.iter_mut().map(|v| v.as_mut_slice()).collect();
            matmul_many_isa_path(isa, &pools[0], &ms, &x, n, &mut ys, path);
            for pool in &pools {
                for (t0, len) in [(0, 1), (5, 1), (36, 1), (3, 5), (16, 17), (0, 37)] {
                    let mut part: Vec<Vec<f32>> = ms.iter().map(|m| vec![f32::NAN; len * m.rows]).collect();
                    let mut ys: Vec<&mut [f32]> = part.iter_mut().map(|v| v.as_mut_slice()).collect();
                    matmul_many_isa_path(isa, pool, &ms, &x[t0 * cols..(t0 + len) * cols], len, &mut ys, path);
                    for ((m, p), a) in ms.iter().zip(&part).zip(&all) {
                        assert_eq!(
                            bits(p),
                            bits(&a[t0 * m.rows..(t0 + len) * m.rows]),
                            "{isa:?} {path:?} {:?}: tokens {t0}..{} alone differ from the batch",
                            m.w,
                            t0 + len
                        );
                    }
                }
            }
            if path == Path::Dot {
                for (m, a) in ms.iter().zip(&all) {
                    for t in [0, 20] {
                        let mut y = vec![f32::NAN; m.rows];
                        matvec_isa(isa, &pools[1], *m, &x[t * cols..(t + 1) * cols], &mut y);
                        assert_eq!(bits(&y), bits(&a[t * m.rows..(t + 1) * m.rows]), "{isa:?} matvec token {t}");
                    }
                }
            }
        }
    }
}

/// The prefill GEMM's SIMD dequantisers give `gguf::quants`' values bit for bit (the tiled path
/// must sum exactly ggml's dequantised weights whichever instruction set widens them).
#[test]
fn simd_dequantisers_are_bit_exact() {
    let mut rng = Rng(5);
    for ty in TYPES {
        let data = blocks(ty, 24, &mut rng);
        let len = 24 * ty.block_size();
        let want = dequant(ty, &data, len);
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx2.is_available() {
            use crate::kernels::simd::Simd;
            let mut got = vec![f32::NAN; len];
            // SAFETY: AVX2 and F16C are available (checked above).
            if unsafe { crate::kernels::x86::Avx2::dequantize_native(ty, &data, &mut got) } {
                assert_eq!(bits(&got), bits(&want), "{ty}");
            }
        }
        let _ = (&want, bits);
    }
}
