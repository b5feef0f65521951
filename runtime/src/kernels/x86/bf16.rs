//! BF16 weights on AVX512-BF16 (`vdpbf16ps`, `_mm512_dpbf16_ps`): the activations are rounded to
//! bf16 once per call and each instruction adds the products of 32 weight/activation pairs into 16
//! f32 sums, with no widening of the weights at all (llama.cpp's `ggml_vec_dot_bf16` does the same).
//! [`super::super::Isa::Avx512Bf16`] takes these kernels for BF16 weights; everything else runs
//! as on [`super::super::Isa::Avx512`].
//!
//! Numerics (what [`crate::kernels::scalar::matvec_rows_bf16_dot`] defines, up to summation order):
//! - `x` is rounded to bf16 to nearest even, as `vcvtne2ps2bf16` does: subnormal inputs become
//!   (signed) zero ([`crate::kernels::scalar::round_bf16`]); a relative error of at most 2⁻⁸ per
//!   element, so a dot product moves by at most 2⁻⁸·Σ|w·x| from the f32 one.
//! - Each bf16 × bf16 product is exact in f32; `vdpbf16ps` adds the two products of a pair to its
//!   lane one after the other, rounding to nearest even after each add, and treats subnormal
//!   inputs as zero and flushes subnormal results (it never reads MXCSR): values below 2⁻¹²⁶
//!   ≈ 1.2·10⁻³⁸, which no activation or product of a real model reaches.
//! - Within each path (`matvec_rows`/`matvec_rows_multi`: the dot path; `matmul_rows`: the tiled
//!   path) a (row, token)'s sum runs in one fixed order whatever rows and tokens share the call,
//!   so a token's outputs do not depend on its batch (`super::super::Path`).

use half::bf16;
use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::scalar::round_bf16;

/// Tokens per packed X tile of [`matmul_rows`]: `NV` vectors of 16 lanes, as [`super::Avx512`].
pub(crate) const TILE_TOKENS: usize = NV * 16;
/// Weight rows per register tile (12 rows × 2 vectors = 24 accumulators of the 32 zmm registers).
const MR: usize = 12;
const NV: usize = 2;
/// The most k pairs per chunk of [`matmul_rows`]: a chunk of a packed X tile (128 pairs × 32
/// tokens × 4 bytes = 16 KiB) and of `MR` weight rows (6 KiB) fit a 32 KiB L1 together.
const KC_PAIRS: usize = 128;
/// The most weight rows [`matmul_rows`] takes at once (a multiple of `MR`; bounds the transpose
/// buffer and the partial sums).
const ROW_GROUP: usize = 192;

/// bf16 elements a row of `cols` takes in the converted `x` scratch: whole 32-element vectors,
/// the padding zero.
#[inline(always)]
fn padded(cols: usize) -> usize {
    cols.div_ceil(32) * 32
}

thread_local! {
    /// `x` rounded to bf16 (one padded row per token; grows once per thread, then reused).
    static X_BF16: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// [`matmul_rows`]'s partial sums between k chunks and one token tile's transposed results.
    static TILE_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Grows this thread's decode scratch to hold one token of `cols` values, so that a later decode
/// step never allocates (`super::super::reserve_decode_scratch`).
pub(crate) fn reserve(cols: usize) {
    X_BF16.with(|v| {
        let mut v = v.borrow_mut();
        if v.len() < padded(cols) {
            v.resize(padded(cols), 0);
        }
    });
}

/// Rounds `len` f32 at `x` to bf16 (`vcvtne2ps2bf16`: to nearest even, subnormals to zero) into
/// `out`, zero-padded to [`padded`]`(len)` elements.
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 available; `x` valid for reads of `len` f32 and `out` for writes of
/// `padded(len)` u16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn to_bf16(x: *const f32, len: usize, out: *mut u16) {
    let mut i = 0;
    // SAFETY: reads below `len` (masked in the last step), writes below `padded(len)`.
    unsafe {
        while i < len {
            let (m0, m1) = (lane_mask(len - i), lane_mask(len.saturating_sub(i + 16)));
            let lo = _mm512_maskz_loadu_ps(m0, x.add(i));
            let hi = _mm512_maskz_loadu_ps(m1, x.add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(out.add(i).cast(), v);
            i += 32;
        }
    }
}

/// The first `min(n, 16)` lanes.
#[inline(always)]
fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// 32 bf16 at `p` as one vector of pairs.
///
/// # Safety
/// AVX-512F; `p` valid for 64 bytes.
#[inline(always)]
unsafe fn load_bh(p: *const u16) -> __m512bh {
    // SAFETY: caller's contract; `__m512bh` is 64 bytes like `__m512i`.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
}

/// The first `n < 32` bf16 at `p`, the other lanes zero.
///
/// # Safety
/// AVX-512BW; `p` valid for reads of `n` u16 (the masked-off lanes are not read).
#[inline(always)]
unsafe fn load_bh_tail(p: *const u16, n: usize) -> __m512bh {
    // SAFETY: caller's contract (masked lanes fault-suppressed).
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16((1u32 << n) - 1, p.cast())) }
}

/// `Σ_k w_i[k] · x_j[k]` for `R` weight rows and `T` converted tokens, every (row, token) summed in
/// the one order of this function whatever `R` and `T` are: even 32-element steps into one chain
/// and odd ones into another (so a lone step of 32 and the masked tail go to the first and second),
/// then the two added and reduced.
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 available; each `w[i]` valid for reads of `cols` u16, each `x[j]`
/// of `padded(cols)` u16 (the padding zero).
#[inline(always)]
unsafe fn dots<const R: usize, const T: usize>(w: [*const u16; R], x: [*const u16; T], cols: usize) -> [[f32; T]; R] {
    // SAFETY (whole body): indices below `cols` of the weight rows (masked tail), below
    // `padded(cols)` of the tokens (caller's contract).
    unsafe {
        let mut a = [[_mm512_setzero_ps(); T]; R];
        let mut b = [[_mm512_setzero_ps(); T]; R];
        let mut k = 0;
        while k + 64 <= cols {
            let x0: [__m512bh; T] = std::array::from_fn(|j| load_bh(x[j].add(k)));
            let x1: [__m512bh; T] = std::array::from_fn(|j| load_bh(x[j].add(k + 32)));
            for i in 0..R {
                let (w0, w1) = (load_bh(w[i].add(k)), load_bh(w[i].add(k + 32)));
                for j in 0..T {
                    a[i][j] = _mm512_dpbf16_ps(a[i][j], w0, x0[j]);
                    b[i][j] = _mm512_dpbf16_ps(b[i][j], w1, x1[j]);
                }
            }
            k += 64;
        }
        if k + 32 <= cols {
            for i in 0..R {
                let w0 = load_bh(w[i].add(k));
                for j in 0..T {
                    a[i][j] = _mm512_dpbf16_ps(a[i][j], w0, load_bh(x[j].add(k)));
                }
            }
            k += 32;
        }
        if k < cols {
            for i in 0..R {
                let w1 = load_bh_tail(w[i].add(k), cols - k);
                for j in 0..T {
                    b[i][j] = _mm512_dpbf16_ps(b[i][j], w1, load_bh(x[j].add(k)));
                }
            }
        }
        let mut s = [[0.0; T]; R];
        for i in 0..R {
            for j in 0..T {
                s[i][j] = _mm512_reduce_add_ps(_mm512_add_ps(a[i][j], b[i][j]));
            }
        }
        s
    }
}

/// `y[j] = W[rows.start + j, :] · x`, `x` rounded to bf16: four rows at a time share each vector
/// of `x` (eight chains of `vdpbf16ps` while the weights stream from memory).
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 available; `rows.end * cols <= w.len()`; `x` holds `cols` and `y`
/// `rows.len()` elements (`super::super::matvec_rows_isa` asserts them, release builds too).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn matvec_rows(w: &[bf16], cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    debug_assert!(rows.end * cols <= w.len() && x.len() >= cols && y.len() >= rows.len());
    // Out of the thread-local (no allocation once grown): the kernel does not run in a closure.
    let mut xb = X_BF16.with(|v| std::mem::take(&mut *v.borrow_mut()));
    if xb.len() < padded(cols) {
        xb.resize(padded(cols), 0);
    }
    // SAFETY: `xb` holds `padded(cols)`; every row read is below `rows.end` (caller's contract);
    // `y` is indexed with bounds checks.
    unsafe {
        to_bf16(x.as_ptr(), cols, xb.as_mut_ptr());
        let row = |r: usize| w.as_ptr().add(r * cols).cast::<u16>();
        let xp = [xb.as_ptr()];
        let (mut r, mut out) = (rows.start, 0);
        while r + 4 <= rows.end {
            let s = dots::<4, 1>([row(r), row(r + 1), row(r + 2), row(r + 3)], xp, cols);
            y[out..out + 4].copy_from_slice(&s.map(|v| v[0]));
            r += 4;
            out += 4;
        }
        while r < rows.end {
            y[out] = dots::<1, 1>([row(r)], xp, cols)[0][0];
            r += 1;
            out += 1;
        }
    }
    X_BF16.with(|v| *v.borrow_mut() = xb);
}

/// [`matvec_rows`] for `n` tokens (`x` is `[n, cols]`; `Y[t, r]` at `y + t·ldy + r`): each token
/// rounded to bf16 once, then two rows × four tokens per register tile, every (row, token) summed
/// exactly as [`matvec_rows`] sums it (the batching engine's decode rows).
///
/// # Safety
/// As [`matvec_rows`] for each token; `x` holds `n · cols` elements; `y` is valid for writes of
/// `Y[t, r]`, `t < n`, `r` in `rows`, which no other thread touches during the call.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn matvec_rows_multi(
    w: &[bf16],
    cols: usize,
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    debug_assert!(rows.end * cols <= w.len() && x.len() >= n * cols);
    let pc = padded(cols);
    let mut xb = X_BF16.with(|v| std::mem::take(&mut *v.borrow_mut()));
    if xb.len() < n * pc {
        xb.resize(n * pc, 0);
    }
    // SAFETY: `xb` holds `n` padded tokens; rows below `rows.end`, tokens below `n`, and the
    // outputs are the caller's.
    unsafe {
        for t in 0..n {
            to_bf16(x.as_ptr().add(t * cols), cols, xb.as_mut_ptr().add(t * pc));
        }
        let row = |r: usize| w.as_ptr().add(r * cols).cast::<u16>();
        let tok = |t: usize| xb.as_ptr().add(t * pc);
        let put = |r: usize, t: usize, v: f32| *y.add(t * ldy + r) = v;
        let mut r = rows.start;
        while r + 2 <= rows.end {
            // The next pair's rows, into L1 while this pair's tokens are summed (without it the
            // weight loads wait on memory for half the kernel's time at N = 8; with it SmolLM2
            // BF16 N = 8 decodes ~10% faster).
            let next = (r + 2) * cols..((r + 4) * cols).min(w.len());
            super::prefetch(bytes_of(w.get(next).unwrap_or_default()));
            let mut t = 0;
            while t + 4 <= n {
                let s = dots::<2, 4>([row(r), row(r + 1)], [tok(t), tok(t + 1), tok(t + 2), tok(t + 3)], cols);
                for (i, si) in s.iter().enumerate() {
                    for (j, &v) in si.iter().enumerate() {
                        put(r + i, t + j, v);
                    }
                }
                t += 4;
            }
            while t < n {
                let s = dots::<2, 1>([row(r), row(r + 1)], [tok(t)], cols);
                put(r, t, s[0][0]);
                put(r + 1, t, s[1][0]);
                t += 1;
            }
            r += 2;
        }
        if r < rows.end {
            for t in 0..n {
                put(r, t, dots::<1, 1>([row(r)], [tok(t)], cols)[0][0]);
            }
        }
    }
    X_BF16.with(|v| *v.borrow_mut() = xb);
}

/// A slice of bf16 as its bytes.
fn bytes_of(w: &[bf16]) -> &[u8] {
    // SAFETY: bf16 is two plain bytes; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts(w.as_ptr().cast(), std::mem::size_of_val(w)) }
}

/// Packs k pairs `pairs` of `x` (`[n, k]`, row-major) into tiles of [`TILE_TOKENS`] tokens, each
/// `[k.div_ceil(2)][TILE_TOKENS]` u32 (token fastest): the bf16 of `X[t, 2p]` in the low half and of
/// `X[t, 2p + 1]` (zero past an odd `k`) in the high half, as `vdpbf16ps` pairs them; tokens past
/// `n` are zero. `out` holds `n.div_ceil(TILE_TOKENS) * k.div_ceil(2) * TILE_TOKENS` u32; threads
/// may pack disjoint pair ranges.
///
/// # Safety
/// `out` valid for those writes, `pairs.end <= k.div_ceil(2)`, and no other thread writes the same
/// pairs during the call (`x` is indexed with bounds checks; plain Rust).
pub(crate) unsafe fn pack_x(x: &[f32], n: usize, k: usize, pairs: Range<usize>, out: *mut u32) {
    let (nr, kp) = (TILE_TOKENS, k.div_ceil(2));
    debug_assert!(x.len() >= n * k && pairs.end <= kp);
    for tile in 0..n.div_ceil(nr) {
        let src = &x[tile * nr * k..];
        let tokens = nr.min(n - tile * nr);
        for p in pairs.clone() {
            // SAFETY: the caller's contract; `p < kp`, `t < nr`.
            unsafe {
                let dst = out.add((tile * kp + p) * nr);
                for t in 0..tokens {
                    let lo = round_bf16(src[t * k + 2 * p]);
                    let hi = if 2 * p + 1 < k { round_bf16(src[t * k + 2 * p + 1]) } else { 0 };
                    *dst.add(t) = u32::from(lo) | u32::from(hi) << 16;
                }
                for t in tokens..nr {
                    *dst.add(t) = 0;
                }
            }
        }
    }
}

/// `Y[t, r] = W[r, :] · X[t, :]` for `r` in `rows`, all `n` tokens, X packed by [`pack_x`]: the
/// prefill GEMM of `simd/matmul.rs` with the weights read in place (no widened copy) and
/// `vdpbf16ps` for the FMAs. Register tile: `MR` rows × `NV·16` tokens; per k pair it broadcasts
/// each row's pair of weights and adds into `NV` vectors of packed X (outer product); k is cut
/// into L1-sized chunks of at most [`KC_PAIRS`] pairs (the partial sums wait in scratch between
/// them, exactly), and each tile's results are transposed through a small buffer into Y.
///
/// # Safety
/// AVX-512F/BW and AVX512-BF16 available; `rows.end * k <= w.len()`; `y` valid for writes of
/// `Y[t, r]` (at `t·ldy + r`), `t < n`, `r` in `rows`, which no other thread touches during the
/// call; `xp` holds `n` tokens as [`pack_x`] packs them for this `k`. `super::super::matmul_many_isa`
/// asserts the shapes (`check_mat`) and builds the rest.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn matmul_rows(
    w: &[bf16],
    k: usize,
    rows: Range<usize>,
    xp: &[u32],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    let (nr, kp) = (TILE_TOKENS, k.div_ceil(2));
    assert!(rows.end * k <= w.len() && xp.len() >= n.div_ceil(nr) * kp * nr, "bf16 matmul_rows: shapes");
    let chunks = kp.div_ceil(KC_PAIRS);
    let kc = kp.div_ceil(chunks.max(1));
    let (mut acc, mut out) = TILE_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let group_max = ROW_GROUP.min(rows.len());
    if chunks > 1 && acc.len() < group_max * NV * 16 {
        acc.resize(group_max * NV * 16, 0.0);
    }
    if out.len() < nr * group_max {
        out.resize(nr * group_max, 0.0);
    }
    let w = w.as_ptr().cast::<u16>();
    let mut g0 = rows.start;
    while g0 < rows.end {
        let group = g0..(g0 + ROW_GROUP).min(rows.end);
        g0 = group.end;
        let nrows = group.len();
        for tile in 0..n.div_ceil(nr) {
            let tokens = nr.min(n - tile * nr);
            let mut c0 = 0;
            while c0 < kp {
                let len = kc.min(kp - c0);
                let (first, last) = (c0 == 0, c0 + len == kp);
                // The last pair of an odd k holds one weight: the next u16 is the next row's.
                let single_last = last && k % 2 == 1;
                // SAFETY: the packed chunk lies in `xp` (asserted above); the rows of the group lie
                // in `w`, pairs below `kp` of them (a lone last weight read alone); `acc` holds
                // `NV·16` floats per row of the group when there is more than one chunk; `out`
                // `nr` tokens of `nrows`; the outputs are the caller's.
                unsafe {
                    let xt = xp.as_ptr().add(tile * kp * nr + c0 * nr);
                    let mut r = 0;
                    while r < nrows {
                        let mr = MR.min(nrows - r);
                        let wr = w.add((group.start + r) * k + 2 * c0);
                        // (`acc` may be empty with one chunk: `tile_const` then never touches it.)
                        let (at, ot) = (acc.as_mut_ptr().wrapping_add(r * NV * 16), out.as_mut_ptr().add(r));
                        let p = Pass { len, first, last, single_last };
                        if mr == MR {
                            tile_const::<MR>(p, wr, k, xt, at, ot, nrows, tokens);
                        } else {
                            for i in 0..mr {
                                let at = at.wrapping_add(i * NV * 16);
                                tile_const::<1>(p, wr.add(i * k), k, xt, at, ot.add(i), nrows, tokens);
                            }
                        }
                        r += mr;
                    }
                }
                c0 += len;
            }
            for t in 0..tokens {
                // SAFETY: token `tile·nr + t < n`; the rows `group` of it are ours (caller).
                unsafe {
                    let dst = y.add((tile * nr + t) * ldy + group.start);
                    std::ptr::copy_nonoverlapping(out.as_ptr().add(t * nrows), dst, nrows);
                }
            }
        }
    }
    TILE_SCRATCH.with(|s| *s.borrow_mut() = (acc, out));
}

/// One k chunk of a register tile: `len` pairs, whether it is the first (sums start at zero) and
/// the last (sums go to Y), and whether its last pair is a lone weight (odd k).
#[derive(Clone, Copy)]
struct Pass {
    len: usize,
    first: bool,
    last: bool,
    single_last: bool,
}

/// `acc[i][j] (+)= Σ_p W[i, 2p..2p+2] · Xtile[p][j]` over one chunk of pairs; after the last
/// chunk the sums go to `y[t·ldy + i]` (`t < tokens`), before it they wait in `accp`.
///
/// # Safety
/// AVX512-BF16 available; `w` valid for reads of `ROWS` rows (stride `ldw` u16) of `2·len` u16
/// (`2·len − 1` when `single_last`); `xt` of `len · NV · 16` u32; `accp` for `ROWS · NV · 16` f32
/// unless the chunk is both first and last; `y` as above on the last chunk.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_const<const ROWS: usize>(
    p: Pass,
    w: *const u16,
    ldw: usize,
    xt: *const u32,
    accp: *mut f32,
    y: *mut f32,
    ldy: usize,
    tokens: usize,
) {
    let nr = NV * 16;
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; ROWS];
        if !p.first {
            for (i, acc_i) in acc.iter_mut().enumerate() {
                for (j, a) in acc_i.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(accp.add((i * NV + j) * 16));
                }
            }
        }
        let wp: [*const u16; ROWS] = std::array::from_fn(|i| w.add(i * ldw));
        let full = p.len - usize::from(p.single_last);
        let mut xk = xt;
        for kk in 0..full {
            let xv: [__m512bh; NV] = std::array::from_fn(|j| load_bh(xk.add(j * 16).cast()));
            for i in 0..ROWS {
                let pair = wp[i].add(2 * kk).cast::<i32>().read_unaligned();
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for j in 0..NV {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], b, xv[j]);
                }
            }
            xk = xk.add(nr);
        }
        if p.single_last {
            let xv: [__m512bh; NV] = std::array::from_fn(|j| load_bh(xk.add(j * 16).cast()));
            for i in 0..ROWS {
                let lone = i32::from(*wp[i].add(2 * full));
                let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(lone));
                for j in 0..NV {
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], b, xv[j]);
                }
            }
        }
        if !p.last {
            for (i, acc_i) in acc.iter().enumerate() {
                for (j, a) in acc_i.iter().enumerate() {
                    _mm512_storeu_ps(accp.add((i * NV + j) * 16), *a);
                }
            }
            return;
        }
        let mut buf = [0f32; NV * 16];
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, a) in acc_i.iter().enumerate() {
                _mm512_storeu_ps(buf.as_mut_ptr().add(j * 16), *a);
            }
            for (t, v) in buf.iter().enumerate().take(tokens) {
                *y.add(t * ldy + i) = *v;
            }
        }
    }
}
