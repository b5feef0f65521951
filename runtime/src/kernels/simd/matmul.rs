//! The prefill GEMM over [`Simd`]: X packed into token tiles ([`pack_x`]), weight rows widened
//! to f32 once per call, and a register tile of `MR` rows × `NV·LANES` tokens ([`matmul_rows`]).
//! Instantiated per instruction set with the other kernels by [`super::simd_entries!`].

use super::{Elem, Simd};
use crate::kernels::{MatRef, Nf4, Weights};
use half::{bf16, f16};
use std::ops::Range;

/// Tokens per packed tile of X for instruction set `S`.
#[inline(always)]
pub(crate) const fn tile_tokens<S: Simd>() -> usize {
    S::NV * S::LANES
}

/// Packs columns `cols` of `x` (`[n, k]`, row-major) into tiles of `nr` tokens, each `[k][nr]`
/// (token fastest), padded with zeros: the layout [`matmul_rows`] streams with vector loads.
/// `out` holds `n.div_ceil(nr) * k * nr` floats; threads may pack disjoint column ranges.
///
/// # Safety
/// `out` must be valid for those `n.div_ceil(nr) * k * nr` writes, `cols.end <= k`, and no other
/// thread may write the same columns during the call. (`x` is indexed with bounds checks: a short
/// `x` panics. No instruction-set requirement: this is plain Rust.)
pub(crate) unsafe fn pack_x(x: &[f32], n: usize, k: usize, nr: usize, cols: Range<usize>, out: *mut f32) {
    debug_assert!(x.len() >= n * k && cols.end <= k);
    for tile in 0..n.div_ceil(nr) {
        let src = &x[tile * nr * k..];
        let tokens = nr.min(n - tile * nr);
        // Written in order, read from `tokens` rows at once (their lines stay in L1): the other
        // way round every store lands on a new cache line.
        for kk in cols.clone() {
            // SAFETY: the caller's contract; `kk < k`, `t < nr`.
            unsafe {
                let dst = out.add((tile * k + kk) * nr);
                for t in 0..tokens {
                    *dst.add(t) = src[t * k + kk];
                }
                for t in tokens..nr {
                    *dst.add(t) = 0.0;
                }
            }
        }
    }
}

/// Per-thread scratch of [`matmul_rows`] (each buffer grows once, then is reused).
#[derive(Default)]
struct TileScratch {
    /// f16/bf16/NF4 weight rows widened to f32
    wide: Vec<f32>,
    /// partial sums between k chunks, `NV` vectors per row
    acc: Vec<f32>,
    /// one token tile's results, transposed (`[token][row]`)
    out: Vec<f32>,
}

thread_local! {
    static TILE_SCRATCH: std::cell::RefCell<TileScratch> = std::cell::RefCell::new(TileScratch::default());
}

/// `Y[t, r] = W[r, :] · X[t, :]` for `r` in `rows`, all `n` tokens, reading X packed by
/// [`pack_x`] with `tile_tokens::<S>()` tokens per tile. `y` points at `Y[0, 0]`, row stride `ldy`.
///
/// Register tile: `MR` weight rows × `NV·LANES` tokens; per step of k it broadcasts `MR` weights
/// and loads `NV` vectors of packed X (outer product), so no horizontal sums are needed. The rows
/// are widened to f32 once per call (f16/bf16/NF4) into per-thread scratch and stay in L2 while
/// the token tiles pass; k is cut into L1-sized chunks, and each tile's results are transposed
/// through a small buffer before they are copied to Y.
///
/// # Safety
/// The CPU supports `S`'s instruction set; `rows.end <= m.rows` and `m.w` backs `m.rows × m.cols`
/// elements (for NF4 also its codes); `y` must be valid for writes of `Y[t, r]` (at `t·ldy + r`),
/// `t < n`, `r` in `rows`, and no other thread may touch those elements during the call; `xp` holds
/// the packed tiles of `n` tokens (at least `n.div_ceil(tile_tokens::<S>()) * m.cols *
/// tile_tokens::<S>()` floats), as [`pack_x`] wrote them. `super::matmul_many_isa`, the only
/// caller, asserts the shapes in `check_mat` and builds the rest (row chunks from `0..m.rows`, `xp`
/// sized for `n` tokens) itself; the `debug_assert!` below only repeats part of it. F32/F16/BF16
/// rows are sliced with bounds checks; NF4 codes, packed X and `y` are reached through raw
/// pointers.
#[inline(always)]
pub(crate) unsafe fn matmul_rows<S: Simd>(
    m: MatRef,
    rows: Range<usize>,
    xp: &[f32],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    let k = m.cols;
    let nr = tile_tokens::<S>();
    let (mr_max, nv, l) = (S::MR, S::NV, S::LANES);
    debug_assert!(xp.len() >= n.div_ceil(nr) * k * nr && rows.end <= m.rows);
    // Take the scratch out of the thread-locals (no allocation): the kernel must not run inside
    // a `with` closure, which would be compiled without this entry point's target features.
    let TileScratch { mut wide, mut acc, mut out } = TILE_SCRATCH.with(|t| std::mem::take(&mut *t.borrow_mut()));
    // The rows go in groups of at most ROW_GROUP, so the widened copy stays small (L2-sized)
    // whatever range the caller hands over.
    let mut g0 = rows.start;
    while g0 < rows.end {
        let group = g0..(g0 + ROW_GROUP).min(rows.end);
        g0 = group.end;
        let nrows = group.len();
        // All rows of the range as f32, row-major: borrowed for F32 weights, widened into scratch
        // otherwise (once: they are reused by every token tile).
        let block: *const f32 = match m.w {
            Weights::F32(w) => w[group.start * k..group.end * k].as_ptr(),
            Weights::F16(w) => {
                // SAFETY: slices in bounds; widen writes exactly `nrows * k` elements.
                unsafe { widen::<S, f16>(&w[group.start * k..group.end * k], &mut wide) }
            }
            Weights::BF16(w) => {
                // SAFETY: as above.
                unsafe { widen::<S, bf16>(&w[group.start * k..group.end * k], &mut wide) }
            }
            Weights::Nf4(w) => {
                // SAFETY: the range lies inside the matrix (checked by the caller).
                unsafe { widen_nf4::<S>(w, group.start * k, nrows * k, k, &mut wide) }
            }
            Weights::Quant(w) => {
                if wide.len() < nrows * k {
                    wide.resize(nrows * k, 0.0);
                }
                // Rows hold whole blocks (checked by the caller).
                let (start, out) = (group.start * k, &mut wide[..nrows * k]);
                // SAFETY: the instruction set is available (this function's contract).
                if !unsafe { S::dequantize_native(w.ty, w.blocks(start, out.len()), out) } {
                    w.dequantize(start, out);
                }
                wide.as_ptr()
            }
        };
        // k is cut into chunks whose slice of the packed X tile stays in L1 while every row block
        // passes over it; partial sums wait in `acc` (`nv` vectors per row) between chunks.
        let chunks = k.div_ceil(KC_MAX);
        let kc = k.div_ceil(chunks);
        if chunks > 1 && acc.len() < nrows * nv * l {
            acc.resize(nrows * nv * l, 0.0);
        }
        // Each tile's results are transposed into `out` (`[token][nrows]`, small enough for L1)
        // and then copied to Y row by row: scattering straight into Y, whose token stride is a whole
        // matrix row, makes the 16–32 stores of one column hit the same few cache sets.
        if out.len() < nr * nrows {
            out.resize(nr * nrows, 0.0);
        }
        for tile in 0..n.div_ceil(nr) {
            let tokens = nr.min(n - tile * nr);
            let mut c0 = 0;
            while c0 < k {
                let len = kc.min(k - c0);
                let pass = Pass { first: c0 == 0, last: c0 + len == k };
                let xt = xp[tile * k * nr + c0 * nr..].as_ptr();
                let mut r = 0;
                while r < nrows {
                    let mr = mr_max.min(nrows - r);
                    // SAFETY: `block` holds `nrows` rows of `k` f32; `xt` the chunk of one packed
                    // tile; `acc` holds `nv·l` floats per row when there is more than one chunk; the
                    // output rows and tokens of this tile are ours (caller contract).
                    unsafe {
                        let ot = out.as_mut_ptr().add(r);
                        let at = acc.as_mut_ptr().add(r * nv * l);
                        let w = block.add(r * k + c0);
                        if mr == mr_max {
                            tile_kernel::<S>(mr_max, len, w, k, xt, at, pass, ot, nrows, tokens);
                        } else {
                            for i in 0..mr {
                                let (w, at, ot) = (w.add(i * k), at.add(i * nv * l), ot.add(i));
                                tile_kernel::<S>(1, len, w, k, xt, at, pass, ot, nrows, tokens);
                            }
                        }
                    }
                    r += mr;
                }
                c0 += len;
            }
            for t in 0..tokens {
                // SAFETY: token `tile·nr + t < n`, the rows `group` of it are ours (caller contract).
                unsafe {
                    let dst = y.add((tile * nr + t) * ldy + group.start);
                    std::ptr::copy_nonoverlapping(out.as_ptr().add(t * nrows), dst, nrows);
                }
            }
        }
    }
    TILE_SCRATCH.with(|t| *t.borrow_mut() = TileScratch { wide, acc, out });
}

/// The most values of k per chunk: a chunk of a packed X tile (`KC_MAX × tile_tokens` f32,
/// 16 KiB with AVX-512) and of the MR weight rows fit in a 32 KiB L1 together.
const KC_MAX: usize = 128;

/// The most weight rows [`matmul_rows`] widens at once (a multiple of every `MR`).
const ROW_GROUP: usize = 192;

/// Which k chunk a micro-kernel call covers: the first starts from zero, the last writes Y.
#[derive(Clone, Copy)]
struct Pass {
    first: bool,
    last: bool,
}

/// Widens `src` to f32 into `dst` (resized to fit) and returns its pointer.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). Any slice lengths.
#[inline(always)]
unsafe fn widen<S: Simd, E: Elem>(src: &[E], dst: &mut Vec<f32>) -> *const f32 {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0.0);
    }
    let l = S::LANES;
    let mut i = 0;
    // SAFETY: indices < src.len() <= dst.len().
    unsafe {
        while i + l <= src.len() {
            S::store(dst.as_mut_ptr().add(i), E::load::<S>(src.as_ptr().add(i)));
            i += l;
        }
    }
    for j in i..src.len() {
        dst[j] = src[j].f32();
    }
    dst.as_ptr()
}

/// The register-tiled micro-kernel: `rows` (1 or `S::MR`) weight rows (row stride `ldw`) × one
/// packed token tile, over `kc` values of k.
///
/// # Safety
/// As [`tile_const`] with `MR = rows`; `rows` is 1 or `S::MR` (otherwise it panics).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_kernel<S: Simd>(
    rows: usize,
    kc: usize,
    w: *const f32,
    ldw: usize,
    xt: *const f32,
    acc: *mut f32,
    pass: Pass,
    y: *mut f32,
    ldy: usize,
    tokens: usize,
) {
    // Dispatch to const sizes so the accumulators live in registers.
    // SAFETY: forwarded.
    unsafe {
        match (S::MR, S::NV, rows) {
            (_, 2, 1) => tile_const::<S, 1, 2>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (4, 2, 4) => tile_const::<S, 4, 2>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (6, 2, 6) => tile_const::<S, 6, 2>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (8, 2, 8) => tile_const::<S, 8, 2>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (12, 2, 12) => tile_const::<S, 12, 2>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (_, 3, 1) => tile_const::<S, 1, 3>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (4, 3, 4) => tile_const::<S, 4, 3>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (6, 3, 6) => tile_const::<S, 6, 3>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            (8, 3, 8) => tile_const::<S, 8, 3>(kc, w, ldw, xt, acc, pass, y, ldy, tokens),
            _ => unreachable!("unsupported tile shape"),
        }
    }
}

/// `acc[i][j] (+)= Σ_k W[i, k] · Xtile[k][j]` over one k chunk; after the last chunk the sums
/// are scattered to `Y[token, row]`, before it they wait in `accp` (`MR × NV` vectors).
///
/// # Safety
/// The CPU supports `S`'s instruction set; `w` is valid for reads of `MR` rows of `kc` f32 at row
/// stride `ldw`; `xt` for `kc · NV · S::LANES` f32; `accp` for reads and writes of `MR · NV ·
/// S::LANES` f32 unless `pass` is both first and last; on the last pass `y` is valid for writes at
/// `t·ldy + i`, `t < tokens`, `i < MR`; `NV · S::LANES <= 64` (the transpose buffer; true of every
/// `Simd` here: 32 floats at most). `matmul_rows` sets these up.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_const<S: Simd, const MR: usize, const NV: usize>(
    kc: usize,
    w: *const f32,
    ldw: usize,
    xt: *const f32,
    accp: *mut f32,
    pass: Pass,
    y: *mut f32,
    ldy: usize,
    tokens: usize,
) {
    let l = S::LANES;
    let nr = NV * l;
    // SAFETY (whole body): `w` holds MR rows of `kc` (stride `ldw`), `xt` kc × nr, `accp`
    // MR·NV vectors unless this is a single pass, `y` the caller's outputs.
    unsafe {
        let mut acc = [[S::zero(); NV]; MR];
        if !pass.first {
            for (i, acc_i) in acc.iter_mut().enumerate() {
                for (j, a) in acc_i.iter_mut().enumerate() {
                    *a = S::load(accp.add((i * NV + j) * l));
                }
            }
        }
        let mut wp = [w; MR];
        for (i, p) in wp.iter_mut().enumerate() {
            *p = w.add(i * ldw);
        }
        let mut xk = xt;
        for kk in 0..kc {
            let mut xv = [S::zero(); NV];
            for (j, v) in xv.iter_mut().enumerate() {
                *v = S::load(xk.add(j * l));
            }
            for i in 0..MR {
                let b = S::splat(*wp[i].add(kk));
                for j in 0..NV {
                    acc[i][j] = S::fma(b, xv[j], acc[i][j]);
                }
            }
            xk = xk.add(nr);
        }
        if !pass.last {
            for (i, acc_i) in acc.iter().enumerate() {
                for (j, a) in acc_i.iter().enumerate() {
                    S::store(accp.add((i * NV + j) * l), *a);
                }
            }
            return;
        }
        // Transpose out: Y is [token, row].
        let mut buf = [0f32; 64];
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, a) in acc_i.iter().enumerate() {
                S::store(buf.as_mut_ptr().add(j * l), *a);
            }
            for (t, v) in buf.iter().enumerate().take(tokens) {
                *y.add(t * ldy + i) = *v;
            }
        }
    }
}

/// Dequantises NF4 elements `start..start + len` into `dst` (resized to fit) and returns its
/// pointer: exactly bitsandbytes' `table[code] * absmax` in f32.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]); `w.packed` holds the codes of
/// elements `start..start + len` (read through raw pointers on the SIMD path; the scales are
/// indexed with bounds checks). `matmul_rows` passes rows inside the matrix, whose codes
/// `super::check_mat` asserted are there.
#[inline(always)]
unsafe fn widen_nf4<S: Simd>(w: Nf4, start: usize, len: usize, cols: usize, dst: &mut Vec<f32>) -> *const f32 {
    if dst.len() < len {
        dst.resize(len, 0.0);
    }
    if w.simd_ok(cols) && start.is_multiple_of(w.blocksize) && len.is_multiple_of(w.blocksize) {
        let l = S::LANES;
        // SAFETY: whole blocks of whole LANES groups inside the matrix; `dst` holds `len`.
        unsafe {
            let lut = S::lut(w.table);
            let mut i = 0;
            while i < len {
                let scale = S::splat(w.absmax[(start + i) / w.blocksize]);
                for j in (i..i + w.blocksize).step_by(l) {
                    let v = S::load_nf4(w.packed.as_ptr().add((start + j) / 2), lut);
                    S::store(dst.as_mut_ptr().add(j), S::mul(v, scale));
                }
                i += w.blocksize;
            }
        }
    } else {
        (0..len).for_each(|j| dst[j] = w.get(start + j));
    }
    dst.as_ptr()
}
