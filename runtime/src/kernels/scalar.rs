//! Scalar reference kernels: the definition every SIMD kernel is tested against.

use super::{MatRef, Weights};
use std::ops::Range;

/// `y[j] = Σ_k W[rows.start + j, k] · x[k]`.
pub fn matvec_rows(m: MatRef, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    let c = m.cols;
    for (r, y) in rows.zip(y) {
        let s = r * c;
        *y = match m.w {
            Weights::F32(w) => dot(&w[s..s + c], x),
            Weights::F16(w) => w[s..s + c].iter().zip(x).map(|(w, x)| w.to_f32() * x).sum(),
            Weights::BF16(w) => w[s..s + c].iter().zip(x).map(|(w, x)| w.to_f32() * x).sum(),
            Weights::Nf4(w) => (s..s + c).zip(x).map(|(i, x)| w.get(i) * x).sum(),
            Weights::Quant(w) => quant_dot(w, s, c, x),
        };
    }
}

/// Row `W[s .. s + c]` of block-quantised weights · `x`: each block dequantised (ggml's
/// values exactly) and its products summed in order.
pub fn quant_dot(w: super::Quant, s: usize, c: usize, x: &[f32]) -> f32 {
    let bs = w.ty.block_size();
    let mut block = [0f32; crate::gguf::quants::MAX_BLOCK];
    let mut sum = 0.0;
    for (b, x) in (s..s + c).step_by(bs).zip(x.chunks_exact(bs)) {
        w.dequantize(b, &mut block[..bs]);
        sum += block[..bs].iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
    }
    sum
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

pub fn add(y: &mut [f32], x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
}

pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = x * inv * w;
    }
}

pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu(gate) · up` with the exact GELU `x · Φ(x) = 0.5 x (1 + erf(x / √2))`
/// (transformers' `GELUActivation`, torch's `gelu(approximate="none")`). Computed in f64 so
/// the f32 result is correctly rounded in all but ties.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let x = f64::from(*g);
        *g = (0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32 * u;
    }
}

/// `gate = gelu_tanh(gate) · up` with the tanh approximation
/// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (torch's `gelu(approximate="tanh")`,
/// transformers' `gelu_pytorch_tanh` and `gelu_new`).
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = f64::from(*g);
        *g = (0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())) as f32 * u;
    }
}

/// `y = Σ_j p[j] · v[j]` over rows `v[j]` of `y.len()`.
pub fn weighted_sum(y: &mut [f32], p: &[f32], v: &[f32]) {
    let d = y.len();
    y.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        axpy(y, pj, &v[j * d..(j + 1) * d]);
    }
}

/// A low-rank up-projection with `B` stored transposed (`bt`, `[rank, out]`, f32, f16 or bf16):
/// for each of the `n` tokens of `u` (`[n, rank]`), `Y[t, c] = Σ_k U[t, k] · Bᵀ[k, c]` for `c` in
/// `cols`, the `rank` products (each weight exactly widened to f32) added in ascending `k`, each
/// fused into the running sum from zero (`mul_add`). Every SIMD kernel computes each element by
/// exactly these operations, so the result is the same bit for bit whatever the instruction set,
/// the token count or the columns a call covers. `y` is `[n, out]`; only `cols` of each token row
/// are written.
///
/// # Panics
/// If `bt` is not f32, f16 or bf16, or a slice is shorter than the shapes say.
pub fn lowrank_up(bt: Weights, rank: usize, u: &[f32], n: usize, cols: std::ops::Range<usize>, y: &mut [f32]) {
    let out = bt.len() / rank.max(1);
    for t in 0..n {
        for c in cols.clone() {
            y[t * out + c] = lowrank_up_one(bt, rank, out, &u[t * rank..(t + 1) * rank], c);
        }
    }
}

/// One output of [`lowrank_up`]: column `c` for the token whose `rank` values are `u`.
#[inline(always)]
pub fn lowrank_up_one(bt: Weights, rank: usize, out: usize, u: &[f32], c: usize) -> f32 {
    fn typed<E: super::simd::Elem>(bt: &[E], rank: usize, out: usize, u: &[f32], c: usize) -> f32 {
        let mut acc = 0.0f32;
        for k in 0..rank {
            acc = u[k].mul_add(bt[k * out + c].f32(), acc);
        }
        acc
    }
    match bt {
        Weights::F32(w) => typed(w, rank, out, u, c),
        Weights::F16(w) => typed(w, rank, out, u, c),
        Weights::BF16(w) => typed(w, rank, out, u, c),
        Weights::Nf4(_) | Weights::Quant(_) => panic!("lowrank_up: low-rank factors are f32, f16 or bf16"),
    }
}

/// `x` rounded to bf16 (as bits) the way AVX512-BF16's `vcvtne2ps2bf16` rounds it: to nearest,
/// ties to even; subnormal inputs become zero of the same sign; a NaN stays a (quiet) NaN.
/// Unlike `half::bf16::from_f32`, which keeps subnormals.
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        ((b >> 16) as u16) | 0x40
    } else if x.is_subnormal() {
        ((b >> 16) & 0x8000) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// `y[j] = Σ_k W[rows.start + j, k] · x̃[k]` with `x̃` = `x` rounded to bf16 ([`round_bf16`]),
/// each product exact in f32 and the sum in f32, element by element: the definition the BF16
/// kernels of `Isa::Avx512Bf16` (`vdpbf16ps`) compute, up to the order of the sum. Subnormal
/// weights count as zero there too.
pub fn matvec_rows_bf16_dot(w: &[half::bf16], cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    let daz = |v: f32| if v.is_subnormal() { 0.0 } else { v };
    let xb: Vec<f32> = x[..cols].iter().map(|&v| f32::from_bits(u32::from(round_bf16(v)) << 16)).collect();
    for (r, y) in rows.zip(y) {
        *y = w[r * cols..(r + 1) * cols].iter().zip(&xb).map(|(w, x)| daz(w.to_f32()) * x).sum();
    }
}
