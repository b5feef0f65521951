//! Numeric kernels of the forward pass.
//!
//! Each kernel has a plain scalar reference in [`scalar`]; SIMD versions (AVX2/FMA and
//! AVX-512 on x86-64, NEON on aarch64) are chosen at run time and tested against it.
//! Matrix kernels split output rows across the [`ThreadPool`].

pub mod scalar;

use crate::threadpool::{split_range, SharedMut, ThreadPool};
use half::{bf16, f16};

/// Row-major weight data, borrowed (usually from the memory map).
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl Weights<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies elements `start..start + out.len()` into `out` as f32.
    pub fn to_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Weights::F32(w) => out.copy_from_slice(&w[start..end]),
            Weights::F16(w) => w[start..end].iter().zip(out).for_each(|(s, d)| *d = s.to_f32()),
            Weights::BF16(w) => w[start..end].iter().zip(out).for_each(|(s, d)| *d = s.to_f32()),
        }
    }
}

/// A row-major matrix `[rows, cols]`: a linear layer's weight (`out_features`, `in_features`).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub w: Weights<'a>,
    pub rows: usize,
    pub cols: usize,
}

/// `y[r] = Σ_k W[r, k] · x[k]`: one token through a linear layer (decode).
///
/// `x` is `[cols]`, `y` is `[rows]`.
pub fn matvec(pool: &ThreadPool, m: MatRef, x: &[f32], y: &mut [f32]) {
    debug_assert_eq!(x.len(), m.cols);
    debug_assert_eq!(y.len(), m.rows);
    let out = SharedMut::new(y);
    pool.run(|i, n| {
        let rows = split_range(m.rows, i, n, 16);
        // SAFETY: `split_range` gives each thread a disjoint range of rows.
        let y = unsafe { out.slice(rows.clone()) };
        scalar::matvec_rows(m, rows, x, y);
    });
}

/// `Y[t, r] = Σ_k W[r, k] · X[t, k]`: `n` tokens through a linear layer (prefill).
///
/// `x` is `[n, cols]`, `y` is `[n, rows]`.
pub fn matmul(pool: &ThreadPool, m: MatRef, x: &[f32], n: usize, y: &mut [f32]) {
    debug_assert_eq!(x.len(), n * m.cols);
    debug_assert_eq!(y.len(), n * m.rows);
    let out = SharedMut::new(y);
    pool.run(|i, nt| {
        let rows = split_range(m.rows, i, nt, 16);
        for t in 0..n {
            // SAFETY: each thread writes only its own rows of each output token.
            let yt = unsafe { out.slice(t * m.rows + rows.start..t * m.rows + rows.end) };
            scalar::matvec_rows(m, rows.clone(), &x[t * m.cols..(t + 1) * m.cols], yt);
        }
    });
}

/// `out = x / rms(x) * w`, with `rms(x) = sqrt(mean(x²) + eps)` (Llama's RMSNorm).
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    scalar::rmsnorm(out, x, w, eps)
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    scalar::softmax(x)
}

/// `gate = silu(gate) · up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    scalar::silu_mul(gate, up)
}

/// `Σ a[i] · b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    scalar::dot(a, b)
}

/// `y += a · x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    scalar::axpy(y, a, x)
}

/// `y += x`.
pub fn add(y: &mut [f32], x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
}
