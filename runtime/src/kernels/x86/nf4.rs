//! The AVX-512 NF4 decode kernels: one table permute per 16 weights over `x` reordered into
//! the codes' strided order ([`nf4_strided`]), and the same for several tokens at once
//! ([`nf4_strided_multi`], the batching engine's decode rows), summing alike.

use super::Avx512;
use crate::kernels::simd::Simd;
use crate::kernels::Nf4;
use std::arch::x86_64::*;
use std::ops::Range;

/// The per-lane block scale of a 128-code chunk: lane `j` covers elements `8j..8j + 7`, in
/// block `8j / bs` of the chunk; the mask loads the chunk's `128 / bs` scales (one when a block
/// spans chunks).
///
/// # Safety
/// AVX-512F available.
#[inline(always)]
unsafe fn scale_index(bs: usize) -> (__m512i, __mmask16) {
    let blocks_per_chunk = (128 / bs).max(1);
    // SAFETY: AVX-512F (caller).
    let idx = unsafe {
        _mm512_set_epi32(
            (120 / bs) as i32,
            (112 / bs) as i32,
            (104 / bs) as i32,
            (96 / bs) as i32,
            (88 / bs) as i32,
            (80 / bs) as i32,
            (72 / bs) as i32,
            (64 / bs) as i32,
            (56 / bs) as i32,
            (48 / bs) as i32,
            (40 / bs) as i32,
            (32 / bs) as i32,
            (24 / bs) as i32,
            (16 / bs) as i32,
            (8 / bs) as i32,
            0,
        )
    };
    (idx, (1u16 << blocks_per_chunk) - 1)
}

thread_local! {
    /// `x` reordered for [`nf4_strided`] (grows once per thread, then reused).
    static X_STRIDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Grows this thread's [`nf4_strided`] scratch to hold `cols` values, so that a later decode
/// step never allocates (whichever rows the pool's dynamic chunking hands this thread).
pub(crate) fn reserve_strided(cols: usize) {
    X_STRIDED.with(|v| {
        let mut v = v.borrow_mut();
        let (want, len) = (cols / 128 * 128, v.len());
        if v.capacity() < want {
            v.reserve(want - len);
        }
    });
}

/// NF4 matvec on AVX-512 with one table permute per 16 weights and nothing else on the shuffle
/// port: a 64-byte load holds 128 codes, 8 per 32-bit lane; `vpermps` reads only the low 4 bits
/// of each index, so the lane shifted right by `4c` looks up code `c` of each lane (elements
/// `8j + e(c)`, `e = 1, 0, 3, 2, 5, 4, 7, 6`) with no unpacking. `x` is reordered once into that
/// strided order, so the products are the same as element by element, summed in another order.
/// Block scales (64 codes = 8 lanes) are applied per lane once per 128 codes. A row's last
/// 64 codes, when it has an odd number of 64-code groups, go through the unpacking path.
///
/// # Safety
/// AVX-512F/BW; `w.blocksize` a multiple of 64 dividing `cols`; `rows` inside the matrix;
/// `x` holds `cols` and `y` `rows.len()` elements.
#[inline(always)]
pub(super) unsafe fn nf4_strided(w: Nf4, cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    let (bs, chunks, tail) = (w.blocksize, cols / 128, cols % 128);
    debug_assert!(bs.is_multiple_of(64) && cols.is_multiple_of(bs) && (tail == 0 || (tail == 64 && bs == 64)));
    let mut xs = X_STRIDED.with(|v| std::mem::take(&mut *v.borrow_mut()));
    xs.resize(chunks * 128, 0.0);
    const E: [usize; 8] = [1, 0, 3, 2, 5, 4, 7, 6];
    for ch in 0..chunks {
        for (c, e) in E.iter().enumerate() {
            for j in 0..16 {
                xs[ch * 128 + c * 16 + j] = x[ch * 128 + 8 * j + e];
            }
        }
    }
    // SAFETY (whole block): AVX-512F/BW are available (the `avx512` entry points are reached
    // only for an available `Isa`: `kernels::isa()` or `Isa::is_available`, asserted in
    // `matmul_many_isa`). Every code byte, scale and x element read lies in the row being
    // computed: `rows.end <= m.rows`, `x.len() >= cols`, `y.len() >= rows.len()` and the codes
    // and scales backing all `rows × cols` elements are the `assert!`s of `matvec_rows_isa` (and
    // `check_mat`), kept in release builds; rows of whole blocks of whole 64-code groups are
    // `simd_ok` in `simd::matvec_rows` and the multiple-of-64 test in `matvec_nf4_native`, so
    // `tail` is 0 or 64. `xs` holds `chunks * 128` values (resized above). The `debug_assert!`
    // only repeats these.
    unsafe {
        let lut = _mm512_loadu_ps(w.table.as_ptr());
        let (scale_idx, scale_mask) = scale_index(bs);
        let xp = xs.as_ptr();
        macro_rules! look {
            ($d:expr, $k:literal) => {
                _mm512_permutexvar_ps(_mm512_srli_epi32::<$k>($d), lut)
            };
        }
        let mut rr = rows.start;
        let mut o = 0;
        // Two rows at a time share each load of the strided x.
        while rr + 2 <= rows.end {
            let (p0, p1) = (w.packed.as_ptr().add(rr * cols / 2), w.packed.as_ptr().add((rr + 1) * cols / 2));
            let (a0, a1) = (w.absmax.as_ptr().add(rr * cols / bs), w.absmax.as_ptr().add((rr + 1) * cols / bs));
            let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for ch in 0..chunks {
                let d0 = _mm512_loadu_si512(p0.add(ch * 64).cast());
                let d1 = _mm512_loadu_si512(p1.add(ch * 64).cast());
                let xc = xp.add(ch * 128);
                let x0 = _mm512_loadu_ps(xc);
                let x1 = _mm512_loadu_ps(xc.add(16));
                let mut s0 = _mm512_mul_ps(look!(d0, 0), x0);
                let mut t0 = _mm512_mul_ps(look!(d1, 0), x0);
                let mut s1 = _mm512_mul_ps(look!(d0, 4), x1);
                let mut t1 = _mm512_mul_ps(look!(d1, 4), x1);
                let x2 = _mm512_loadu_ps(xc.add(32));
                s0 = _mm512_fmadd_ps(look!(d0, 8), x2, s0);
                t0 = _mm512_fmadd_ps(look!(d1, 8), x2, t0);
                let x3 = _mm512_loadu_ps(xc.add(48));
                s1 = _mm512_fmadd_ps(look!(d0, 12), x3, s1);
                t1 = _mm512_fmadd_ps(look!(d1, 12), x3, t1);
                let x4 = _mm512_loadu_ps(xc.add(64));
                s0 = _mm512_fmadd_ps(look!(d0, 16), x4, s0);
                t0 = _mm512_fmadd_ps(look!(d1, 16), x4, t0);
                let x5 = _mm512_loadu_ps(xc.add(80));
                s1 = _mm512_fmadd_ps(look!(d0, 20), x5, s1);
                t1 = _mm512_fmadd_ps(look!(d1, 20), x5, t1);
                let x6 = _mm512_loadu_ps(xc.add(96));
                s0 = _mm512_fmadd_ps(look!(d0, 24), x6, s0);
                t0 = _mm512_fmadd_ps(look!(d1, 24), x6, t0);
                let x7 = _mm512_loadu_ps(xc.add(112));
                s1 = _mm512_fmadd_ps(look!(d0, 28), x7, s1);
                t1 = _mm512_fmadd_ps(look!(d1, 28), x7, t1);
                let sc0 = _mm512_permutexvar_ps(scale_idx, _mm512_maskz_loadu_ps(scale_mask, a0.add(ch * 128 / bs)));
                let sc1 = _mm512_permutexvar_ps(scale_idx, _mm512_maskz_loadu_ps(scale_mask, a1.add(ch * 128 / bs)));
                acc0 = _mm512_fmadd_ps(_mm512_add_ps(s0, s1), sc0, acc0);
                acc1 = _mm512_fmadd_ps(_mm512_add_ps(t0, t1), sc1, acc1);
            }
            if tail == 64 {
                let base = chunks * 128;
                let xt = x.as_ptr().add(base);
                let v0 = Avx512::load_nf4_x4(p0.add(base / 2), lut);
                let v1 = Avx512::load_nf4_x4(p1.add(base / 2), lut);
                let (mut s, mut t) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for k in 0..4 {
                    let xv = _mm512_loadu_ps(xt.add(16 * k));
                    s = _mm512_fmadd_ps(v0[k], xv, s);
                    t = _mm512_fmadd_ps(v1[k], xv, t);
                }
                acc0 = _mm512_fmadd_ps(s, _mm512_set1_ps(*a0.add(base / bs)), acc0);
                acc1 = _mm512_fmadd_ps(t, _mm512_set1_ps(*a1.add(base / bs)), acc1);
            }
            y[o] = _mm512_reduce_add_ps(acc0);
            y[o + 1] = _mm512_reduce_add_ps(acc1);
            rr += 2;
            o += 2;
        }
        for (out, r) in (rr..rows.end).enumerate().map(|(i, r)| (o + i, r)) {
            let p = w.packed.as_ptr().add(r * cols / 2);
            let a = w.absmax.as_ptr().add(r * cols / bs);
            let mut acc = _mm512_setzero_ps();
            for ch in 0..chunks {
                let d = _mm512_loadu_si512(p.add(ch * 64).cast());
                let xc = xp.add(ch * 128);
                let mut s0 = _mm512_mul_ps(look!(d, 0), _mm512_loadu_ps(xc));
                let mut s1 = _mm512_mul_ps(look!(d, 4), _mm512_loadu_ps(xc.add(16)));
                let mut s2 = _mm512_mul_ps(look!(d, 8), _mm512_loadu_ps(xc.add(32)));
                let mut s3 = _mm512_mul_ps(look!(d, 12), _mm512_loadu_ps(xc.add(48)));
                s0 = _mm512_fmadd_ps(look!(d, 16), _mm512_loadu_ps(xc.add(64)), s0);
                s1 = _mm512_fmadd_ps(look!(d, 20), _mm512_loadu_ps(xc.add(80)), s1);
                s2 = _mm512_fmadd_ps(look!(d, 24), _mm512_loadu_ps(xc.add(96)), s2);
                s3 = _mm512_fmadd_ps(look!(d, 28), _mm512_loadu_ps(xc.add(112)), s3);
                let scales = _mm512_maskz_loadu_ps(scale_mask, a.add(ch * 128 / bs));
                let sum = _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3));
                acc = _mm512_fmadd_ps(sum, _mm512_permutexvar_ps(scale_idx, scales), acc);
            }
            if tail == 64 {
                let base = chunks * 128;
                let v = Avx512::load_nf4_x4(p.add(base / 2), lut);
                let xt = x.as_ptr().add(base);
                let mut s = _mm512_mul_ps(v[0], _mm512_loadu_ps(xt));
                s = _mm512_fmadd_ps(v[1], _mm512_loadu_ps(xt.add(16)), s);
                s = _mm512_fmadd_ps(v[2], _mm512_loadu_ps(xt.add(32)), s);
                s = _mm512_fmadd_ps(v[3], _mm512_loadu_ps(xt.add(48)), s);
                acc = _mm512_fmadd_ps(s, _mm512_set1_ps(*a.add(base / bs)), acc);
            }
            y[out] = _mm512_reduce_add_ps(acc);
        }
    }
    X_STRIDED.with(|v| *v.borrow_mut() = xs);
}

/// [`nf4_strided`] for `n` tokens: the row pairs' codes are loaded and looked up once for two
/// tokens, and each (row, token) is summed in exactly [`nf4_strided`]'s order (a pair's
/// rows as its pair path, a last odd row as its single-row path), so every token's outputs are
/// bit for bit its own matvec's.
///
/// # Safety
/// As [`nf4_strided`] for each token; `x` holds `n · cols` elements; `y` is valid for writes of
/// `Y[t, r]` at `t·ldy + r`, `t < n`, `r` in `rows`, which no other thread touches meanwhile.
#[inline(always)]
pub(super) unsafe fn nf4_strided_multi(
    w: Nf4,
    cols: usize,
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    let (bs, chunks, tail) = (w.blocksize, cols / 128, cols % 128);
    debug_assert!(bs.is_multiple_of(64) && cols.is_multiple_of(bs) && (tail == 0 || (tail == 64 && bs == 64)));
    debug_assert!(x.len() >= n * cols);
    let stride = chunks * 128;
    let mut xs = X_STRIDED.with(|v| std::mem::take(&mut *v.borrow_mut()));
    xs.resize(n * stride, 0.0);
    const E: [usize; 8] = [1, 0, 3, 2, 5, 4, 7, 6];
    for t in 0..n {
        for ch in 0..chunks {
            for (c, e) in E.iter().enumerate() {
                for j in 0..16 {
                    xs[t * stride + ch * 128 + c * 16 + j] = x[t * cols + ch * 128 + 8 * j + e];
                }
            }
        }
    }
    // SAFETY (whole block): as in `nf4_strided` (AVX-512F/BW available; codes, scales and x of
    // the rows and tokens computed lie in their buffers: the `assert!`s of
    // `matvec_rows_multi_isa` and `check_mat`); `xs` holds `n · stride` values; `y` per the
    // caller's contract.
    unsafe {
        let lut = _mm512_loadu_ps(w.table.as_ptr());
        let (scale_idx, scale_mask) = scale_index(bs);
        let mut rr = rows.start;
        while rr + 2 <= rows.end {
            let mut t = 0;
            // Two tokens at a time: the 12 accumulators, 4 looked-up vectors and x stay in the
            // 32 registers (four tokens spill).
            while t + 2 <= n {
                nf4_pair_tokens::<2>(w, cols, rr, x, &xs, stride, t, y, ldy, lut, scale_idx, scale_mask);
                t += 2;
            }
            while t < n {
                nf4_pair_tokens::<1>(w, cols, rr, x, &xs, stride, t, y, ldy, lut, scale_idx, scale_mask);
                t += 1;
            }
            rr += 2;
        }
        X_STRIDED.with(|v| *v.borrow_mut() = std::mem::take(&mut xs));
        // A last odd row: the single-row path of `nf4_strided`, token by token.
        for r in rr..rows.end {
            for t in 0..n {
                let mut out = [0.0f32];
                nf4_strided(w, cols, r..r + 1, &x[t * cols..(t + 1) * cols], &mut out);
                *y.add(t * ldy + r) = out[0];
            }
        }
    }
    if !xs.is_empty() {
        X_STRIDED.with(|v| *v.borrow_mut() = xs);
    }
}

/// Rows `r`, `r + 1` for tokens `t0..t0 + T`: [`nf4_strided`]'s pair path, each look-up shared
/// by the `T` tokens.
///
/// # Safety
/// As [`nf4_strided_multi`]; `xs` holds the tokens' strided x at `stride` per token.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn nf4_pair_tokens<const T: usize>(
    w: Nf4,
    cols: usize,
    r: usize,
    x: &[f32],
    xs: &[f32],
    stride: usize,
    t0: usize,
    y: *mut f32,
    ldy: usize,
    lut: __m512,
    scale_idx: __m512i,
    scale_mask: __mmask16,
) {
    let (bs, chunks, tail) = (w.blocksize, cols / 128, cols % 128);
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let (p0, p1) = (w.packed.as_ptr().add(r * cols / 2), w.packed.as_ptr().add((r + 1) * cols / 2));
        let (a0, a1) = (w.absmax.as_ptr().add(r * cols / bs), w.absmax.as_ptr().add((r + 1) * cols / bs));
        let mut acc0 = [_mm512_setzero_ps(); T];
        let mut acc1 = [_mm512_setzero_ps(); T];
        macro_rules! look {
            ($d:expr, $k:literal) => {
                _mm512_permutexvar_ps(_mm512_srli_epi32::<$k>($d), lut)
            };
        }
        for ch in 0..chunks {
            let d0 = _mm512_loadu_si512(p0.add(ch * 64).cast());
            let d1 = _mm512_loadu_si512(p1.add(ch * 64).cast());
            let xc: [*const f32; T] = std::array::from_fn(|j| xs.as_ptr().add((t0 + j) * stride + ch * 128));
            let (mut s0, mut s1) = ([_mm512_setzero_ps(); T], [_mm512_setzero_ps(); T]);
            let (mut u0, mut u1) = ([_mm512_setzero_ps(); T], [_mm512_setzero_ps(); T]);
            // The order of `nf4_strided` per row and token: s0 = l0·x0, s1 = l4·x1, then
            // s0 += l8·x2, s1 += l12·x3, ... (u for the second row).
            let (l0, m0) = (look!(d0, 0), look!(d1, 0));
            let (l1, m1) = (look!(d0, 4), look!(d1, 4));
            for j in 0..T {
                let x0 = _mm512_loadu_ps(xc[j]);
                let x1 = _mm512_loadu_ps(xc[j].add(16));
                s0[j] = _mm512_mul_ps(l0, x0);
                u0[j] = _mm512_mul_ps(m0, x0);
                s1[j] = _mm512_mul_ps(l1, x1);
                u1[j] = _mm512_mul_ps(m1, x1);
            }
            macro_rules! step {
                ($k0:literal, $k1:literal, $off0:literal, $off1:literal) => {
                    let (l0, m0) = (look!(d0, $k0), look!(d1, $k0));
                    let (l1, m1) = (look!(d0, $k1), look!(d1, $k1));
                    for j in 0..T {
                        let x0 = _mm512_loadu_ps(xc[j].add($off0));
                        let x1 = _mm512_loadu_ps(xc[j].add($off1));
                        s0[j] = _mm512_fmadd_ps(l0, x0, s0[j]);
                        u0[j] = _mm512_fmadd_ps(m0, x0, u0[j]);
                        s1[j] = _mm512_fmadd_ps(l1, x1, s1[j]);
                        u1[j] = _mm512_fmadd_ps(m1, x1, u1[j]);
                    }
                };
            }
            step!(8, 12, 32, 48);
            step!(16, 20, 64, 80);
            step!(24, 28, 96, 112);
            let sc0 = _mm512_permutexvar_ps(scale_idx, _mm512_maskz_loadu_ps(scale_mask, a0.add(ch * 128 / bs)));
            let sc1 = _mm512_permutexvar_ps(scale_idx, _mm512_maskz_loadu_ps(scale_mask, a1.add(ch * 128 / bs)));
            for j in 0..T {
                acc0[j] = _mm512_fmadd_ps(_mm512_add_ps(s0[j], s1[j]), sc0, acc0[j]);
                acc1[j] = _mm512_fmadd_ps(_mm512_add_ps(u0[j], u1[j]), sc1, acc1[j]);
            }
        }
        if tail == 64 {
            let base = chunks * 128;
            let v0 = Avx512::load_nf4_x4(p0.add(base / 2), lut);
            let v1 = Avx512::load_nf4_x4(p1.add(base / 2), lut);
            let (sa0, sa1) = (_mm512_set1_ps(*a0.add(base / bs)), _mm512_set1_ps(*a1.add(base / bs)));
            for j in 0..T {
                let xt = x.as_ptr().add((t0 + j) * cols + base);
                let (mut s, mut u) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for (k, (v0k, v1k)) in v0.iter().zip(&v1).enumerate() {
                    let xv = _mm512_loadu_ps(xt.add(16 * k));
                    s = _mm512_fmadd_ps(*v0k, xv, s);
                    u = _mm512_fmadd_ps(*v1k, xv, u);
                }
                acc0[j] = _mm512_fmadd_ps(s, sa0, acc0[j]);
                acc1[j] = _mm512_fmadd_ps(u, sa1, acc1[j]);
            }
        }
        for j in 0..T {
            *y.add((t0 + j) * ldy + r) = _mm512_reduce_add_ps(acc0[j]);
            *y.add((t0 + j) * ldy + r + 1) = _mm512_reduce_add_ps(acc1[j]);
        }
    }
}
