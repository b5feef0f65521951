//! Decode kernels for ggml block-quantised weights ([`super::Quant`]) over an 8-bit activation:
//! llama.cpp's scheme (`ggml_vec_dot_q4_1_q8_1`, `ggml_vec_dot_q8_0_q8_0`, … in
//! `ggml/src/ggml-cpu/arch/x86/quants.c`). `x` is quantised once per call to blocks of 32
//! signed bytes with one f32 scale ([`QBlock`], ggml's `block_q8_1` with f32 `d` and `s`), and
//! each weight block is dotted with it in integers; only the per-block scaling is in floats.
//!
//! - [`quantize_x`]: `d = max|x| / 127`, `q = round(x / d)` (ggml's `quantize_row_q8_1_ref`).
//! - [`dot_ref`]: the scalar reference of every type here, the definition the SIMD kernels
//!   ([`dot`], over the small integer-vector trait [`QSimd`]; AVX2 `maddubs`, AVX-512 VNNI
//!   `vpdpbusd`, NEON `smull`/`sadalp`) are tested against.
//! - [`rows_multi_isa`]: rows × tokens, every (row, token) through the same row kernel, so a
//!   token's outputs do not depend on the others in the call (the [`super::Path`] invariant).
//!
//! Types with kernels here: [`has_kernel`] (every legacy and k-quant ggml type the dequantisers
//! know). The others keep the exact scalar path (`scalar::quant_dot`), as does
//! [`super::Isa::Scalar`].
//!
//! Error of the 8-bit activation (tested in `kernels/tests.rs`): each `x` element is off by at
//! most `d/2` of its block, so `|y − W·x| ≤ Σ_blocks d_b/2 · Σ_{k∈b} |w_k|` plus f32 rounding.

pub(crate) mod dot;

use super::{Isa, Quant};
use crate::gguf::quants::{GgmlType, QK};
use std::ops::Range;

/// 32 activations quantised to bytes: `x[i] ≈ d · qs[i]`; `s = d · Σ qs` (for types with a
/// block minimum, Q4_1 and Q4_K). ggml's `block_q8_1` with f32 instead of f16 scales.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct QBlock {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}
const _: () = assert!(std::mem::size_of::<QBlock>() == 40);

/// Quantises `x` (`out.len()` blocks of 32) as ggml's `quantize_row_q8_1_ref`: `d = amax / 127`,
/// `qs = round(x / d)` (half away from zero), `s = d · Σ qs`.
pub(crate) fn quantize_x(x: &[f32], out: &mut [QBlock]) {
    for (xb, o) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in o.qs.iter_mut().zip(xb) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        o.d = d;
        o.s = sum as f32 * d;
    }
}

/// Whether the types has integer-dot decode kernels (otherwise the exact scalar path runs).
pub(crate) fn has_kernel(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(ty, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K)
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min `j` of a Q4_K block (ggml-quants.c: get_scale_min_k4).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The 16 6-bit scales of a Q3_K block, minus 32 (the kmask unpacking of
/// ggml-quants.c: dequantize_row_q3_K).
#[inline(always)]
pub(crate) fn scales_q3k(q: &[u8; 12]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let lo = if j < 8 { q[j] & 0xF } else { q[j - 8] >> 4 };
        let hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        i32::from(lo | (hi << 4)) - 32
    })
}

/// The 32 codes of sub-block `j` (0..8) of a Q6_K block, minus 32, and the sub-block's two
/// 16-element scales (ggml-quants.c: dequantize_row_q6_K's element order).
#[inline(always)]
fn q6k_sub(b: &[u8], j: usize) -> ([i8; 32], i32, i32) {
    let (n, i) = (j / 4, j % 4);
    let (ql, qh, sc) = (&b[64 * n..], &b[128 + 32 * n..], &b[192 + 8 * n..]);
    let mut q = [0i8; 32];
    for (l, q) in q.iter_mut().enumerate() {
        let lo = (ql[l + 32 * (i % 2)] >> (4 * (i / 2))) & 0xF;
        let hi = (qh[l] >> (2 * i)) & 3;
        *q = (lo | (hi << 4)) as i8 - 32;
    }
    (q, i32::from(sc[2 * i] as i8), i32::from(sc[2 * i + 1] as i8))
}

fn idot(w: impl Iterator<Item = i32>, x: &[i8]) -> i32 {
    w.zip(x).map(|(w, &x)| w * i32::from(x)).sum()
}

/// One row's blocks (`blocks`, whole blocks of `ty`) · the quantised activation `xq` (one
/// [`QBlock`] per 32 elements): the scalar reference, block by block as ggml's scalar
/// `ggml_vec_dot_*` (integer sums, then `sum += (d_w·d_x)·isum [+ m_w·s_x]`).
pub(crate) fn dot_ref(ty: GgmlType, blocks: &[u8], xq: &[QBlock]) -> f32 {
    let ts = ty.type_size();
    let mut sum = 0f32;
    match ty {
        // ggml_vec_dot_q4_0_q8_0
        GgmlType::Q4_0 => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq) {
                let q = (0..32).map(|l| i32::from((b[2 + l % 16] >> (4 * (l / 16))) & 0xF) - 8);
                sum += (f16_at(b, 0) * x.d) * idot(q, &x.qs) as f32;
            }
        }
        // ggml_vec_dot_q4_1_q8_1
        GgmlType::Q4_1 => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq) {
                let q = (0..32).map(|l| i32::from((b[4 + l % 16] >> (4 * (l / 16))) & 0xF));
                sum += (f16_at(b, 0) * x.d) * idot(q, &x.qs) as f32 + f16_at(b, 2) * x.s;
            }
        }
        // ggml_vec_dot_q5_0_q8_0
        GgmlType::Q5_0 => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq) {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let q = (0..32)
                    .map(|l| i32::from((b[6 + l % 16] >> (4 * (l / 16))) & 0xF) + 16 * ((qh >> l) & 1) as i32 - 16);
                sum += (f16_at(b, 0) * x.d) * idot(q, &x.qs) as f32;
            }
        }
        // ggml_vec_dot_q5_1_q8_1
        GgmlType::Q5_1 => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq) {
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let q =
                    (0..32).map(|l| i32::from((b[8 + l % 16] >> (4 * (l / 16))) & 0xF) + 16 * ((qh >> l) & 1) as i32);
                sum += (f16_at(b, 0) * x.d) * idot(q, &x.qs) as f32 + f16_at(b, 2) * x.s;
            }
        }
        // ggml_vec_dot_q2_K_q8_K, with a scale per 32 activations: sub-block `4c + s` is bits
        // `2s` of bytes `32c..32c + 32`, with scale/min nibbles `8c + 2s` and `8c + 2s + 1`
        GgmlType::Q2_K => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq.chunks_exact(8)) {
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                for (j, x) in x.iter().enumerate() {
                    let (c, s) = (j / 4, j % 4);
                    let q: Vec<i32> = (0..32).map(|l| i32::from((b[16 + 32 * c + l] >> (2 * s)) & 3)).collect();
                    let (sa, sb) = (b[8 * c + 2 * s], b[8 * c + 2 * s + 1]);
                    let (lo, hi) =
                        (idot(q[..16].iter().copied(), &x.qs[..16]), idot(q[16..].iter().copied(), &x.qs[16..]));
                    let xs = |r: Range<usize>| x.qs[r].iter().map(|&v| i32::from(v)).sum::<i32>();
                    let isum = i32::from(sa & 15) * lo + i32::from(sb & 15) * hi;
                    let msum = i32::from(sa >> 4) * xs(0..16) + i32::from(sb >> 4) * xs(16..32);
                    sum += (d * x.d) * isum as f32 - (dmin * x.d) * msum as f32;
                }
            }
        }
        // ggml_vec_dot_q3_K_q8_K, with a scale per 32 activations (sub-block `4c + s`)
        GgmlType::Q3_K => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq.chunks_exact(8)) {
                let (d, sc) = (f16_at(b, 108), scales_q3k(b[96..108].try_into().unwrap()));
                for (j, x) in x.iter().enumerate() {
                    let (c, s) = (j / 4, j % 4);
                    let q: Vec<i32> = (0..32)
                        .map(|l| {
                            i32::from((b[32 + 32 * c + l] >> (2 * s)) & 3)
                                - if b[l] >> (4 * c + s) & 1 != 0 { 0 } else { 4 }
                        })
                        .collect();
                    let (lo, hi) =
                        (idot(q[..16].iter().copied(), &x.qs[..16]), idot(q[16..].iter().copied(), &x.qs[16..]));
                    sum += (d * x.d) * (sc[8 * c + 2 * s] * lo + sc[8 * c + 2 * s + 1] * hi) as f32;
                }
            }
        }
        // ggml_vec_dot_q5_K_q8_K, with a scale per 32 activations instead of per 256
        GgmlType::Q5_K => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq.chunks_exact(8)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                for (j, x) in x.iter().enumerate() {
                    let (sc, m) = scale_min_k4(j, &b[4..16]);
                    let qs = &b[48 + 32 * (j / 2)..];
                    let q = (0..32)
                        .map(|l| i32::from((qs[l] >> (4 * (j % 2))) & 0xF) + 16 * i32::from((b[16 + l] >> j) & 1));
                    sum += (d * f32::from(sc) * x.d) * idot(q, &x.qs) as f32 - dmin * f32::from(m) * x.s;
                }
            }
        }
        // ggml_vec_dot_q8_0_q8_0
        GgmlType::Q8_0 => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq) {
                let q = b[2..34].iter().map(|&v| i32::from(v as i8));
                sum += (f16_at(b, 0) * x.d) * idot(q, &x.qs) as f32;
            }
        }
        // ggml_vec_dot_q4_K_q8_K, with a scale per 32 activations instead of per 256
        GgmlType::Q4_K => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq.chunks_exact(8)) {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                for (j, x) in x.iter().enumerate() {
                    let (sc, m) = scale_min_k4(j, &b[4..16]);
                    let qs = &b[16 + 32 * (j / 2)..];
                    let q = (0..32).map(|l| i32::from((qs[l] >> (4 * (j % 2))) & 0xF));
                    sum += (d * f32::from(sc) * x.d) * idot(q, &x.qs) as f32 - dmin * f32::from(m) * x.s;
                }
            }
        }
        // ggml_vec_dot_q6_K_q8_K, with a scale per 32 activations instead of per 256
        GgmlType::Q6_K => {
            for (b, x) in blocks.chunks_exact(ts).zip(xq.chunks_exact(8)) {
                let d = f16_at(b, 208);
                for (j, x) in x.iter().enumerate() {
                    let (q, sa, sb) = q6k_sub(b, j);
                    let w = q.iter().map(|&v| i32::from(v));
                    let (lo, hi) = (idot(w.clone().take(16), &x.qs[..16]), idot(w.skip(16), &x.qs[16..]));
                    sum += (d * x.d) * (sa * lo + sb * hi) as f32;
                }
            }
        }
        _ => unreachable!("no integer dot for {ty}"),
    }
    sum
}

/// `Y[t, r] = W[r, :] · x̂_t` for `r` in `rows` and `n` tokens, `x̂_t` the quantised activation
/// of token `t` (`xq` holds `n · cols / 32` blocks); `Y[t, r]` at `y + t·ldy + r`. Every (row,
/// token) goes through one row kernel, so a token's outputs are what it gets alone.
///
/// # Safety
/// `isa` is available on this CPU; `has_kernel(w.ty)`; `cols` a multiple of the block size,
/// `rows.end · cols` elements backed by `w.data`; `xq.len() >= n · cols / 32`; `y` valid for
/// writes of `Y[t, r]`, those tokens and rows, which no other thread touches during the call.
/// `super::check_mat` (and `matvec_rows_isa`) assert the shapes in release builds too.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows_multi_isa(
    isa: Isa,
    w: Quant,
    cols: usize,
    rows: Range<usize>,
    xq: &[QBlock],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    debug_assert!(
        has_kernel(w.ty)
            && xq.len() >= n * cols / QK
            && w.data.len() >= rows.end * cols / w.ty.block_size() * w.ty.type_size()
    );
    let row_bytes = cols / w.ty.block_size() * w.ty.type_size();
    let nb = cols / QK;
    // SAFETY: the caller's contract; the kernels read row `r`'s `row_bytes` and token `t`'s `nb`
    // blocks, both inside the slices.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 if super::x86::quant::vnni() => {
                super::x86::quant::rows_vnni(w.ty, w.data.as_ptr(), row_bytes, rows, xq.as_ptr(), nb, n, y, ldy)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Avx2 => {
                super::x86::quant::rows_avx2(w.ty, w.data.as_ptr(), row_bytes, rows, xq.as_ptr(), nb, n, y, ldy)
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => super::neon::quant::rows(w.ty, w.data.as_ptr(), row_bytes, rows, xq.as_ptr(), nb, n, y, ldy),
            _ => {
                for r in rows {
                    let b = &w.data[r * row_bytes..(r + 1) * row_bytes];
                    for t in 0..n {
                        *y.add(t * ldy + r) = dot_ref(w.ty, b, &xq[t * nb..(t + 1) * nb]);
                    }
                }
            }
        }
    }
}

thread_local! {
    /// The caller's quantised activations of one `matmul_many` call (grows once, then reused).
    static QX_CALL: std::cell::Cell<Vec<QBlock>> = const { std::cell::Cell::new(Vec::new()) };
    /// A thread's quantised `x` for `matvec_rows_isa` (single-threaded row ranges).
    static QX_ROWS: std::cell::Cell<Vec<QBlock>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Takes the thread's scratch (`call`: the `matmul_many` caller's, else the row kernels'),
/// quantises `x` (`[n, cols]`) into it, runs `f` on it and puts it back: no allocation once it
/// has grown to the widest call.
pub(crate) fn with_quantized<R>(call: bool, x: &[f32], f: impl FnOnce(&[QBlock]) -> R) -> R {
    let key = if call { &QX_CALL } else { &QX_ROWS };
    let mut v = key.with(|c| c.take());
    let nb = x.len() / QK;
    if v.len() < nb {
        v.resize(nb, QBlock::default());
    }
    quantize_x(x, &mut v[..nb]);
    let r = f(&v[..nb]);
    key.with(|c| c.set(v));
    r
}

/// Grows this thread's scratch for `n` tokens of `cols` values (see `reserve_decode_scratch`).
pub(crate) fn reserve(cols: usize) {
    for key in [&QX_CALL, &QX_ROWS] {
        let mut v = key.with(|c| c.take());
        if v.len() < cols / QK {
            v.resize(cols / QK, QBlock::default());
        }
        key.with(|c| c.set(v));
    }
}

#[cfg(test)]
mod tests;
