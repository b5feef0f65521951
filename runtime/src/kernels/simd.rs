//! Kernels written once over a vector abstraction ([`Simd`]) and instantiated per instruction set.
//!
//! Every function here is `#[inline(always)]` and is only called from a `#[target_feature]`
//! entry point (made by [`simd_entries!`]), so the intrinsics behind [`Simd`] inline into code
//! compiled for that instruction set. The scalar definitions they must match are in
//! [`super::scalar`].
//!
//! The prefill GEMM (packing, row widening, register tiles) is [`matmul`]. The rest stays in
//! this one file, over 500 lines: the [`Simd`] trait, the decode matvecs, the elementwise
//! kernels and [`simd_entries!`], which must name every kernel; each kernel is short and reads
//! beside the trait it is written against.

use super::{MatRef, Nf4, Weights};
use half::{bf16, f16};
use std::ops::Range;

mod matmul;
pub(crate) use matmul::{matmul_rows, pack_x, tile_tokens};

/// One vector register of f32 lanes and the operations the kernels need.
///
/// # Safety
/// Implementations use instructions of one instruction set; callers must run them only where it is
/// available (the entry points check this once at run time), and pointers must be valid for `LANES`
/// elements.
pub(crate) trait Simd {
    type V: Copy;
    const LANES: usize;
    /// Tokens per register tile of [`matmul_rows`] (`NV` vectors) and weight rows per tile.
    const NV: usize;
    const MR: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn splat(v: f32) -> Self::V;
    /// Unaligned load of `LANES` f32.
    unsafe fn load(p: *const f32) -> Self::V;
    /// Unaligned load of `LANES` IEEE half floats (as bits), widened to f32.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// Unaligned load of `LANES` bfloat16 (as bits), widened to f32.
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// `a · b + c`, fused.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Round to the nearest integer (ties to even).
    unsafe fn round(a: Self::V) -> Self::V;
    /// `2^n` for integral `n` in `-126..=127`.
    unsafe fn pow2i(n: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn hsum(v: Self::V) -> f32;
    /// Maximum of the lanes.
    unsafe fn hmax(v: Self::V) -> f32;
    /// A 16-entry f32 table held in registers, for [`Simd::load_nf4`].
    type Lut: Copy;
    unsafe fn lut(table: &[f32; 16]) -> Self::Lut;
    /// `LANES` 4-bit codes from `LANES / 2` bytes at `p` (high nibble first), each replaced by
    /// its table value.
    unsafe fn load_nf4(p: *const u8, lut: Self::Lut) -> Self::V;
    /// An NF4 matvec written for this instruction set, if it has one and takes these shapes
    /// (`w.simd_ok(cols)` holds); `false` leaves the rows to the generic kernel.
    #[inline(always)]
    unsafe fn matvec_nf4_native(_w: Nf4, _cols: usize, _rows: Range<usize>, _x: &[f32], _y: &mut [f32]) -> bool {
        false
    }
    /// [`Simd::matvec_nf4_native`] for `n` tokens (`x` is `[n, cols]`; `Y[t, r]` at
    /// `y + t·ldy + r`), each token's sums in exactly that kernel's order; `false` leaves them
    /// to be done token by token.
    #[inline(always)]
    unsafe fn matvec_nf4_native_multi(
        _w: Nf4,
        _cols: usize,
        _rows: Range<usize>,
        _x: &[f32],
        _n: usize,
        _y: *mut f32,
        _ldy: usize,
    ) -> bool {
        false
    }
    /// A BF16 matvec by the instruction set's own bf16 dot products, if it has them (AVX512-BF16:
    /// `x` rounded to bf16, [`super::scalar::matvec_rows_bf16_dot`]); `false` leaves the rows to
    /// the generic kernel, which widens the weights to f32.
    #[inline(always)]
    unsafe fn matvec_bf16_native(_w: &[bf16], _cols: usize, _rows: Range<usize>, _x: &[f32], _y: &mut [f32]) -> bool {
        false
    }
    /// [`Simd::matvec_bf16_native`] for `n` tokens (`x` is `[n, cols]`; `Y[t, r]` at
    /// `y + t·ldy + r`), each token's sums in exactly that kernel's order; `false` leaves them to
    /// the generic kernel.
    #[inline(always)]
    unsafe fn matvec_bf16_native_multi(
        _w: &[bf16],
        _cols: usize,
        _rows: Range<usize>,
        _x: &[f32],
        _n: usize,
        _y: *mut f32,
        _ldy: usize,
    ) -> bool {
        false
    }
    /// Dequantises whole ggml blocks `data` of type `ty` into `out` (exactly `gguf::quants`'
    /// values) where this instruction set has a kernel for `ty`; `false` leaves them to
    /// `gguf::quants`.
    #[inline(always)]
    unsafe fn dequantize_native(_ty: crate::gguf::quants::GgmlType, _data: &[u8], _out: &mut [f32]) -> bool {
        false
    }
    /// `4·LANES` codes from `2·LANES` bytes: [`Simd::load_nf4`] four times, or one wide load
    /// where the instruction set has one.
    #[inline(always)]
    unsafe fn load_nf4_x4(p: *const u8, lut: Self::Lut) -> [Self::V; 4] {
        let h = Self::LANES / 2;
        // SAFETY: `p` valid for `2·LANES` bytes (caller).
        unsafe { [0, 1, 2, 3].map(|i| Self::load_nf4(p.add(i * h), lut)) }
    }
}

/// A weight element type: f32, f16 or bf16.
pub(crate) trait Elem: Copy {
    /// Loads `S::LANES` elements at `p` as f32.
    ///
    /// # Safety
    /// The CPU supports `S`'s instruction set; `p` is valid for reads of `S::LANES` elements (no
    /// alignment needed: the loads are unaligned).
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
    fn f32(self) -> f32;
    /// A slice of this type as [`Weights`].
    fn weights(s: &[Self]) -> Weights<'_>;
}

impl Elem for f32 {
    #[inline(always)]
    fn weights(s: &[f32]) -> Weights<'_> {
        Weights::F32(s)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f32) -> S::V {
        // SAFETY: forwarded contract.
        unsafe { S::load(p) }
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn weights(s: &[f16]) -> Weights<'_> {
        Weights::F16(s)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f16) -> S::V {
        // SAFETY: `f16` is `repr(transparent)` over u16; forwarded contract.
        unsafe { S::load_f16(p.cast()) }
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn weights(s: &[bf16]) -> Weights<'_> {
        Weights::BF16(s)
    }
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const bf16) -> S::V {
        // SAFETY: `bf16` is `repr(transparent)` over u16; forwarded contract.
        unsafe { S::load_bf16(p.cast()) }
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

/// `Σ a[i]·b[i]` over `len` elements (a may be a weight type).
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]); `a` and `b` are valid for
/// reads of `len` elements.
#[inline(always)]
unsafe fn dot_ptr<S: Simd, E: Elem>(a: *const E, b: *const f32, len: usize) -> f32 {
    let l = S::LANES;
    // SAFETY (whole body): the caller guarantees the instruction set and that `a` and `b` are
    // valid for `len` elements, and every access below is at an index < len.
    unsafe {
        let (mut s0, mut s1, mut s2, mut s3) = (S::zero(), S::zero(), S::zero(), S::zero());
        let mut k = 0;
        while k + 4 * l <= len {
            s0 = S::fma(E::load::<S>(a.add(k)), S::load(b.add(k)), s0);
            s1 = S::fma(E::load::<S>(a.add(k + l)), S::load(b.add(k + l)), s1);
            s2 = S::fma(E::load::<S>(a.add(k + 2 * l)), S::load(b.add(k + 2 * l)), s2);
            s3 = S::fma(E::load::<S>(a.add(k + 3 * l)), S::load(b.add(k + 3 * l)), s3);
            k += 4 * l;
        }
        while k + l <= len {
            s0 = S::fma(E::load::<S>(a.add(k)), S::load(b.add(k)), s0);
            k += l;
        }
        let mut s = S::hsum(S::add(S::add(s0, s1), S::add(s2, s3)));
        while k < len {
            s += (*a.add(k)).f32() * *b.add(k);
            k += 1;
        }
        s
    }
}

/// `Σ a[i]·b[i]` over the shorter slice's length.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). Any slice lengths.
#[inline(always)]
pub(crate) unsafe fn dot<S: Simd>(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: both slices hold at least `min(len)` elements.
    unsafe { dot_ptr::<S, f32>(a.as_ptr(), b.as_ptr(), a.len().min(b.len())) }
}

/// `y[j] = W[rows.start + j, :] · x` for the rows of `m` in `rows`.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]); `rows.end <= m.rows`; `m.w`
/// backs `m.rows × m.cols` elements (for NF4 also its `packed` codes and `absmax` scales); `x`
/// holds at least `m.cols` and `y` at least `rows.len()` elements. `super::matvec_rows_isa` asserts
/// all of it (release builds too).
#[inline(always)]
pub(crate) unsafe fn matvec_rows<S: Simd>(m: MatRef, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    // SAFETY: forwarded; the public API checked the shapes.
    unsafe {
        match m.w {
            Weights::F32(w) => matvec_typed::<S, f32>(w, m.cols, rows, x, y),
            Weights::F16(w) => matvec_typed::<S, f16>(w, m.cols, rows, x, y),
            Weights::BF16(w) => {
                if !S::matvec_bf16_native(w, m.cols, rows.clone(), x, y) {
                    matvec_typed::<S, bf16>(w, m.cols, rows, x, y)
                }
            }
            Weights::Nf4(w) if w.simd_ok(m.cols) => {
                if !S::matvec_nf4_native(w, m.cols, rows.clone(), x, y) {
                    matvec_nf4::<S>(w, m.cols, rows, x, y)
                }
            }
            Weights::Nf4(_) | Weights::Quant(_) => super::scalar::matvec_rows(m, rows, x, y),
        }
    }
}

/// NF4 matvec, dequantising in registers: per block, `absmax · Σ table[code]·x` (one table
/// lookup per weight: a single permute on AVX-512), so only the 4-bit codes and one scale per
/// block are read from memory. Two rows at a time share the loads of `x` and give the FMA
/// units four independent chains.
///
/// # Safety
/// The CPU supports `S`'s instruction set; `w.simd_ok(cols)`; `rows` inside the matrix (`rows.end *
/// cols <= w.len`) and `w.packed`/`w.absmax` hold the codes and scales of those elements; `x` holds
/// `cols`, `y` `rows.len()` elements. Checked by `simd_ok` in [`matvec_rows`] and the `assert!` of
/// `super::matvec_rows_isa`; the `debug_assert!` below only repeats them.
#[inline(always)]
unsafe fn matvec_nf4<S: Simd>(w: Nf4, cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    debug_assert!(w.simd_ok(cols) && rows.end * cols <= w.len && x.len() >= cols && y.len() >= rows.len());
    let (l, bs) = (S::LANES, w.blocksize);
    let xp = x.as_ptr();
    let blocks = cols / bs;
    // SAFETY (whole body): `simd_ok` (tested in `matvec_rows`) makes every row whole blocks of
    // whole 2·LANES groups, so each code byte, scale and x element read lies inside the row
    // being computed; that the rows are inside the matrix, the codes and scales back it and `x`
    // holds `cols` are the `assert!` of `matvec_rows_isa` (release builds too). `y` is indexed
    // with bounds checks.
    unsafe {
        let lut = S::lut(w.table);
        let row = |r: usize| (w.packed.as_ptr().add(r * cols / 2), w.absmax.as_ptr().add(r * blocks));
        let mut r = rows.start;
        let mut out = 0;
        // Wide steps of 4·LANES codes when blocks hold whole steps (AVX-512: 64 codes from one
        // 32-byte load), else steps of 2·LANES.
        let wide = bs.is_multiple_of(4 * l);
        while r + 2 <= rows.end {
            let ((p0, a0), (p1, a1)) = (row(r), row(r + 1));
            let (mut acc0, mut acc1) = (S::zero(), S::zero());
            for b in 0..blocks {
                let (mut s0, mut s1, mut t0, mut t1) = (S::zero(), S::zero(), S::zero(), S::zero());
                let mut i = b * bs;
                if wide {
                    while i < (b + 1) * bs {
                        let x = [0, 1, 2, 3].map(|j| S::load(xp.add(i + j * l)));
                        let w0 = S::load_nf4_x4(p0.add(i / 2), lut);
                        let w1 = S::load_nf4_x4(p1.add(i / 2), lut);
                        s0 = S::fma(w0[0], x[0], s0);
                        s1 = S::fma(w0[1], x[1], s1);
                        t0 = S::fma(w1[0], x[0], t0);
                        t1 = S::fma(w1[1], x[1], t1);
                        s0 = S::fma(w0[2], x[2], s0);
                        s1 = S::fma(w0[3], x[3], s1);
                        t0 = S::fma(w1[2], x[2], t0);
                        t1 = S::fma(w1[3], x[3], t1);
                        i += 4 * l;
                    }
                } else {
                    while i < (b + 1) * bs {
                        let (x0, x1) = (S::load(xp.add(i)), S::load(xp.add(i + l)));
                        s0 = S::fma(S::load_nf4(p0.add(i / 2), lut), x0, s0);
                        s1 = S::fma(S::load_nf4(p0.add((i + l) / 2), lut), x1, s1);
                        t0 = S::fma(S::load_nf4(p1.add(i / 2), lut), x0, t0);
                        t1 = S::fma(S::load_nf4(p1.add((i + l) / 2), lut), x1, t1);
                        i += 2 * l;
                    }
                }
                acc0 = S::fma(S::splat(*a0.add(b)), S::add(s0, s1), acc0);
                acc1 = S::fma(S::splat(*a1.add(b)), S::add(t0, t1), acc1);
            }
            y[out] = S::hsum(acc0);
            y[out + 1] = S::hsum(acc1);
            r += 2;
            out += 2;
        }
        if r < rows.end {
            let (p0, a0) = row(r);
            let mut acc = S::zero();
            for b in 0..blocks {
                let (mut s0, mut s1) = (S::zero(), S::zero());
                let mut i = b * bs;
                while i < (b + 1) * bs {
                    s0 = S::fma(S::load_nf4(p0.add(i / 2), lut), S::load(xp.add(i)), s0);
                    s1 = S::fma(S::load_nf4(p0.add((i + l) / 2), lut), S::load(xp.add(i + l)), s1);
                    i += 2 * l;
                }
                acc = S::fma(S::splat(*a0.add(b)), S::add(s0, s1), acc);
            }
            y[out] = S::hsum(acc);
        }
    }
}

/// Matvec over 4 rows at a time: the 4 rows share each load of `x`, and 8 accumulators
/// (4 rows × 2 columns blocks) keep the FMA units busy while the weights stream from memory.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]); `rows.end * cols <= w.len()`;
/// `x` holds at least `cols` elements (both read through raw pointers; `y` is indexed with bounds
/// checks). Checked by the `assert!` of `super::matvec_rows_isa`; the `debug_assert!` below only
/// repeats it.
#[inline(always)]
unsafe fn matvec_typed<S: Simd, E: Elem>(w: &[E], cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
    debug_assert!(rows.end * cols <= w.len() && x.len() >= cols && y.len() >= rows.len());
    let l = S::LANES;
    let xp = x.as_ptr();
    let mut r = rows.start;
    let mut out = 0;
    // SAFETY (whole body): rows < rows.end, so every row `r` lies in `w` (`rows.end <= m.rows`
    // and `w` holding `m.rows × cols` elements are the `assert!` of `matvec_rows_isa`, kept in
    // release builds); column indices stay < cols <= x.len() (same assert); `y` is indexed with
    // bounds checks.
    unsafe {
        while r + 4 <= rows.end {
            let p0 = w.as_ptr().add(r * cols);
            let (p1, p2, p3) = (p0.add(cols), p0.add(2 * cols), p0.add(3 * cols));
            let (mut a0, mut a1, mut a2, mut a3) = (S::zero(), S::zero(), S::zero(), S::zero());
            let (mut b0, mut b1, mut b2, mut b3) = (S::zero(), S::zero(), S::zero(), S::zero());
            let mut k = 0;
            while k + 2 * l <= cols {
                let x0 = S::load(xp.add(k));
                let x1 = S::load(xp.add(k + l));
                a0 = S::fma(E::load::<S>(p0.add(k)), x0, a0);
                a1 = S::fma(E::load::<S>(p1.add(k)), x0, a1);
                a2 = S::fma(E::load::<S>(p2.add(k)), x0, a2);
                a3 = S::fma(E::load::<S>(p3.add(k)), x0, a3);
                b0 = S::fma(E::load::<S>(p0.add(k + l)), x1, b0);
                b1 = S::fma(E::load::<S>(p1.add(k + l)), x1, b1);
                b2 = S::fma(E::load::<S>(p2.add(k + l)), x1, b2);
                b3 = S::fma(E::load::<S>(p3.add(k + l)), x1, b3);
                k += 2 * l;
            }
            if k + l <= cols {
                let x0 = S::load(xp.add(k));
                a0 = S::fma(E::load::<S>(p0.add(k)), x0, a0);
                a1 = S::fma(E::load::<S>(p1.add(k)), x0, a1);
                a2 = S::fma(E::load::<S>(p2.add(k)), x0, a2);
                a3 = S::fma(E::load::<S>(p3.add(k)), x0, a3);
                k += l;
            }
            let mut s =
                [S::hsum(S::add(a0, b0)), S::hsum(S::add(a1, b1)), S::hsum(S::add(a2, b2)), S::hsum(S::add(a3, b3))];
            while k < cols {
                let xk = *xp.add(k);
                s[0] += (*p0.add(k)).f32() * xk;
                s[1] += (*p1.add(k)).f32() * xk;
                s[2] += (*p2.add(k)).f32() * xk;
                s[3] += (*p3.add(k)).f32() * xk;
                k += 1;
            }
            y[out..out + 4].copy_from_slice(&s);
            r += 4;
            out += 4;
        }
        while r < rows.end {
            y[out] = dot_ptr::<S, E>(w.as_ptr().add(r * cols), xp, cols);
            r += 1;
            out += 1;
        }
    }
}

/// `Y[t, r] = W[r, :] · X[t, :]` for the rows in `rows` and `n` tokens (`x` is `[n, cols]`, `y`
/// points at `Y[0, 0]` with a token stride of `ldy`): every sum in exactly the order
/// [`matvec_rows`] uses for that row, so each token's outputs are bit for bit its own matvec's,
/// but each weight vector is loaded (and widened) once for up to four tokens: the batching
/// engine's decode rows. NF4 weights take the instruction set's own multi-token kernel where it
/// has one (AVX-512), else go token by token through [`matvec_rows`].
///
/// # Safety
/// As [`matvec_rows`] for each token; `x` holds `n · cols` elements and `y` is valid for writes of
/// `Y[t, r]` (at `t·ldy + r`), `t < n`, `r` in `rows`, which no other thread touches during the
/// call. `super::matvec_rows_multi_isa` asserts the shapes (release builds too).
#[inline(always)]
pub(crate) unsafe fn matvec_rows_multi<S: Simd>(
    m: MatRef,
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    let cols = m.cols;
    // SAFETY: forwarded; the shapes were checked by the caller.
    unsafe {
        match m.w {
            Weights::F32(w) => multi_typed::<S, f32>(w, cols, rows, x, n, y, ldy),
            Weights::F16(w) => multi_typed::<S, f16>(w, cols, rows, x, n, y, ldy),
            Weights::BF16(w) => {
                if !S::matvec_bf16_native_multi(w, cols, rows.clone(), x, n, y, ldy) {
                    multi_typed::<S, bf16>(w, cols, rows, x, n, y, ldy)
                }
            }
            Weights::Nf4(w) if w.simd_ok(cols) && S::matvec_nf4_native_multi(w, cols, rows.clone(), x, n, y, ldy) => {}
            Weights::Nf4(w) if w.simd_ok(cols) && n > 1 => {
                let pairs_end = rows.start + rows.len() / 2 * 2;
                let mut r = rows.start;
                while r < pairs_end {
                    let mut t = 0;
                    while t + 2 <= n {
                        nf4_pair_tokens::<S, 2>(w, cols, r, x, t, y, ldy);
                        t += 2;
                    }
                    if t < n {
                        nf4_pair_tokens::<S, 1>(w, cols, r, x, t, y, ldy);
                    }
                    r += 2;
                }
                if pairs_end < rows.end {
                    for t in 0..n {
                        let y = std::slice::from_raw_parts_mut(y.add(t * ldy + pairs_end), 1);
                        matvec_rows::<S>(m, pairs_end..rows.end, &x[t * cols..(t + 1) * cols], y);
                    }
                }
            }
            Weights::Nf4(_) | Weights::Quant(_) => {
                for t in 0..n {
                    let y = std::slice::from_raw_parts_mut(y.add(t * ldy + rows.start), rows.len());
                    matvec_rows::<S>(m, rows.clone(), &x[t * cols..(t + 1) * cols], y);
                }
            }
        }
    }
}

/// Rows `r`, `r + 1` of NF4 weights for the `T` tokens from `t0`: each group of codes looked up
/// once for all `T`, and each (row, token) summed exactly as [`matvec_nf4`] sums it (two chains
/// per block over alternate groups of LANES codes, then `acc += absmax · (s0 + s1)`): the
/// multi-token NF4 kernel of the instruction sets without a native one (AVX2, NEON).
///
/// # Safety
/// As [`matvec_nf4`] for rows `r..r + 2` (`w.simd_ok(cols)`, inside the matrix); `x` holds
/// tokens `t0..t0 + T` of `cols` values; `y` is valid for `y[t · ldy + r + i]`, those tokens and
/// rows, and written by this call alone.
#[inline(always)]
unsafe fn nf4_pair_tokens<S: Simd, const T: usize>(
    w: Nf4,
    cols: usize,
    r: usize,
    x: &[f32],
    t0: usize,
    y: *mut f32,
    ldy: usize,
) {
    debug_assert!(w.simd_ok(cols) && (r + 2) * cols <= w.len && x.len() >= (t0 + T) * cols);
    let (l, bs) = (S::LANES, w.blocksize);
    let blocks = cols / bs;
    // SAFETY (whole body): as `matvec_nf4`, for two rows and `T` tokens of `x` (caller contract).
    unsafe {
        let lut = S::lut(w.table);
        let (p0, p1) = (w.packed.as_ptr().add(r * cols / 2), w.packed.as_ptr().add((r + 1) * cols / 2));
        let (a0, a1) = (w.absmax.as_ptr().add(r * blocks), w.absmax.as_ptr().add((r + 1) * blocks));
        let xp: [*const f32; T] = std::array::from_fn(|t| x.as_ptr().add((t0 + t) * cols));
        let (mut acc0, mut acc1) = ([S::zero(); T], [S::zero(); T]);
        for b in 0..blocks {
            let (mut s0, mut s1, mut u0, mut u1) = ([S::zero(); T], [S::zero(); T], [S::zero(); T], [S::zero(); T]);
            let mut i = b * bs;
            while i < (b + 1) * bs {
                let (w00, w01) = (S::load_nf4(p0.add(i / 2), lut), S::load_nf4(p0.add((i + l) / 2), lut));
                let (w10, w11) = (S::load_nf4(p1.add(i / 2), lut), S::load_nf4(p1.add((i + l) / 2), lut));
                for t in 0..T {
                    let (x0, x1) = (S::load(xp[t].add(i)), S::load(xp[t].add(i + l)));
                    s0[t] = S::fma(w00, x0, s0[t]);
                    s1[t] = S::fma(w01, x1, s1[t]);
                    u0[t] = S::fma(w10, x0, u0[t]);
                    u1[t] = S::fma(w11, x1, u1[t]);
                }
                i += 2 * l;
            }
            for t in 0..T {
                acc0[t] = S::fma(S::splat(*a0.add(b)), S::add(s0[t], s1[t]), acc0[t]);
                acc1[t] = S::fma(S::splat(*a1.add(b)), S::add(u0[t], u1[t]), acc1[t]);
            }
        }
        for t in 0..T {
            *y.add((t0 + t) * ldy + r) = S::hsum(acc0[t]);
            *y.add((t0 + t) * ldy + r + 1) = S::hsum(acc1[t]);
        }
    }
}

/// [`matvec_rows_multi`] for f32/f16/bf16 weights: the rows [`matvec_typed`] takes four at a time
/// go two at a time here, each with its own even/odd accumulators per token as there; the rest
/// by [`dot_ptr`], as there.
///
/// # Safety
/// As [`matvec_rows_multi`]: `rows.end * cols <= w.len()`, `x` holds `n · cols`, `y` as there.
#[inline(always)]
unsafe fn multi_typed<S: Simd, E: Elem>(
    w: &[E],
    cols: usize,
    rows: Range<usize>,
    x: &[f32],
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    debug_assert!(rows.end * cols <= w.len() && x.len() >= n * cols);
    let quads_end = rows.start + rows.len() / 4 * 4;
    // SAFETY (whole body): every row read is < rows.end, every token < n (caller contract).
    unsafe {
        let mut r = rows.start;
        while r < quads_end {
            let mut t = 0;
            while t + 4 <= n {
                pair_tokens::<S, E, 4>(w.as_ptr(), cols, r, x.as_ptr(), t, y, ldy);
                t += 4;
            }
            while t < n {
                pair_tokens::<S, E, 1>(w.as_ptr(), cols, r, x.as_ptr(), t, y, ldy);
                t += 1;
            }
            r += 2;
        }
        for r in quads_end..rows.end {
            for t in 0..n {
                *y.add(t * ldy + r) = dot_ptr::<S, E>(w.as_ptr().add(r * cols), x.as_ptr().add(t * cols), cols);
            }
        }
    }
}

/// Rows `r` and `r + 1` for tokens `t0..t0 + T`, in [`matvec_typed`]'s order per (row, token).
///
/// # Safety
/// The rows and tokens lie inside `w` (`cols` per row), `x` (`cols` per token) and `y`.
#[inline(always)]
unsafe fn pair_tokens<S: Simd, E: Elem, const T: usize>(
    w: *const E,
    cols: usize,
    r: usize,
    x: *const f32,
    t0: usize,
    y: *mut f32,
    ldy: usize,
) {
    let l = S::LANES;
    // SAFETY (whole body): indices below `cols` of rows `r`, `r + 1` and tokens `t0..t0 + T`.
    unsafe {
        let p = [w.add(r * cols), w.add((r + 1) * cols)];
        let xs: [*const f32; T] = std::array::from_fn(|j| x.add((t0 + j) * cols));
        let mut a = [[S::zero(); T]; 2];
        let mut b = [[S::zero(); T]; 2];
        let mut k = 0;
        while k + 2 * l <= cols {
            for i in 0..2 {
                let w0 = E::load::<S>(p[i].add(k));
                let w1 = E::load::<S>(p[i].add(k + l));
                for j in 0..T {
                    a[i][j] = S::fma(w0, S::load(xs[j].add(k)), a[i][j]);
                    b[i][j] = S::fma(w1, S::load(xs[j].add(k + l)), b[i][j]);
                }
            }
            k += 2 * l;
        }
        if k + l <= cols {
            for i in 0..2 {
                let w0 = E::load::<S>(p[i].add(k));
                for j in 0..T {
                    a[i][j] = S::fma(w0, S::load(xs[j].add(k)), a[i][j]);
                }
            }
            k += l;
        }
        for i in 0..2 {
            for j in 0..T {
                let mut s = S::hsum(S::add(a[i][j], b[i][j]));
                for kk in k..cols {
                    s += (*p[i].add(kk)).f32() * *xs[j].add(kk);
                }
                *y.add((t0 + j) * ldy + r + i) = s;
            }
        }
    }
}

/// `y += a · x` over the shorter slice's length.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). Any slice lengths.
#[inline(always)]
pub(crate) unsafe fn axpy<S: Simd>(y: &mut [f32], a: f32, x: &[f32]) {
    let len = y.len().min(x.len());
    let l = S::LANES;
    let mut i = 0;
    // SAFETY: indices < len.
    unsafe {
        let av = S::splat(a);
        while i + l <= len {
            let p = y.as_mut_ptr().add(i);
            S::store(p, S::fma(av, S::load(x.as_ptr().add(i)), S::load(p)));
            i += l;
        }
    }
    for j in i..len {
        y[j] += a * x[j];
    }
}

/// `y += x` over the shorter slice's length.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). Any slice lengths.
#[inline(always)]
pub(crate) unsafe fn add<S: Simd>(y: &mut [f32], x: &[f32]) {
    let len = y.len().min(x.len());
    let l = S::LANES;
    let mut i = 0;
    // SAFETY: indices < len.
    unsafe {
        while i + l <= len {
            let p = y.as_mut_ptr().add(i);
            S::store(p, S::add(S::load(p), S::load(x.as_ptr().add(i))));
            i += l;
        }
    }
    for j in i..len {
        y[j] += x[j];
    }
}

/// `out = x / sqrt(mean(x²) + eps) · w` over the shortest slice's length.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). Any slice lengths.
#[inline(always)]
pub(crate) unsafe fn rmsnorm<S: Simd>(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let len = out.len().min(x.len()).min(w.len());
    // SAFETY: x has `len` elements.
    let ss = unsafe { dot_ptr::<S, f32>(x.as_ptr(), x.as_ptr(), len) } / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    let l = S::LANES;
    let mut i = 0;
    // SAFETY: indices < len.
    unsafe {
        let iv = S::splat(inv);
        while i + l <= len {
            let v = S::mul(S::mul(S::load(x.as_ptr().add(i)), iv), S::load(w.as_ptr().add(i)));
            S::store(out.as_mut_ptr().add(i), v);
            i += l;
        }
    }
    for j in i..len {
        out[j] = x[j] * inv * w[j];
    }
}

/// `e^x` per lane: Cephes-style range reduction `x = n·ln2 + r`, degree-6 polynomial for `e^r`
/// (|r| ≤ ln2/2), times `2^n`. Max relative error ≈ 2 ulp; inputs are clamped to [-87.3, 88.7]
/// (so `e^-inf` gives ~1e-38, not 0).
///
/// # Safety
/// The CPU supports `S`'s instruction set.
#[inline(always)]
unsafe fn exp<S: Simd>(x: S::V) -> S::V {
    // SAFETY: plain lane arithmetic.
    unsafe {
        let x = S::min(S::max(x, S::splat(-87.3)), S::splat(88.7));
        let n = S::round(S::mul(x, S::splat(std::f32::consts::LOG2_E)));
        let r = S::fma(n, S::splat(-0.693_359_4), x);
        let r = S::fma(n, S::splat(2.121_944_4e-4), r);
        let mut p = S::splat(1.987_569_1e-4);
        p = S::fma(p, r, S::splat(1.398_199_9e-3));
        p = S::fma(p, r, S::splat(8.333_452e-3));
        p = S::fma(p, r, S::splat(4.166_579_6e-2));
        p = S::fma(p, r, S::splat(1.666_666_5e-1));
        p = S::fma(p, r, S::splat(0.5));
        p = S::fma(p, S::mul(r, r), S::add(r, S::splat(1.0)));
        S::mul(p, S::pow2i(n))
    }
}

/// In-place softmax: `x = e^(x - max) / Σ e^(x - max)`.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]).
#[inline(always)]
pub(crate) unsafe fn softmax<S: Simd>(x: &mut [f32]) {
    let len = x.len();
    if len == 0 {
        return;
    }
    let l = S::LANES;
    let p = x.as_mut_ptr();
    // SAFETY: indices < len.
    unsafe {
        let mut i = 0;
        let mut mv = S::splat(f32::NEG_INFINITY);
        while i + l <= len {
            mv = S::max(mv, S::load(p.add(i)));
            i += l;
        }
        let mut max = S::hmax(mv);
        for j in i..len {
            max = max.max(*p.add(j));
        }
        let neg_max = S::splat(-max);
        let mut sv = S::zero();
        i = 0;
        while i + l <= len {
            let e = exp::<S>(S::add(S::load(p.add(i)), neg_max));
            S::store(p.add(i), e);
            sv = S::add(sv, e);
            i += l;
        }
        let mut sum = S::hsum(sv);
        for j in i..len {
            let e = (*p.add(j) - max).exp();
            *p.add(j) = e;
            sum += e;
        }
        let inv = S::splat(1.0 / sum);
        i = 0;
        while i + l <= len {
            S::store(p.add(i), S::mul(S::load(p.add(i)), inv));
            i += l;
        }
        for j in i..len {
            *p.add(j) *= 1.0 / sum;
        }
    }
}

/// `gate = gate / (1 + e^-gate) · up` (SwiGLU) over the shorter slice's length.
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). Any slice lengths.
#[inline(always)]
pub(crate) unsafe fn silu_mul<S: Simd>(gate: &mut [f32], up: &[f32]) {
    let len = gate.len().min(up.len());
    let l = S::LANES;
    let mut i = 0;
    // SAFETY: indices < len.
    unsafe {
        let one = S::splat(1.0);
        let neg = S::splat(-1.0);
        while i + l <= len {
            let p = gate.as_mut_ptr().add(i);
            let g = S::load(p);
            let s = S::div(g, S::add(one, exp::<S>(S::mul(g, neg))));
            S::store(p, S::mul(s, S::load(up.as_ptr().add(i))));
            i += l;
        }
    }
    for j in i..len {
        let g = gate[j];
        gate[j] = g / (1.0 + (-g).exp()) * up[j];
    }
}

/// `y = Σ_j p[j] · v[j]` over rows `v[j]` of `y.len()` (attention's weighted sum of values).
///
/// # Safety
/// The CPU supports `S`'s instruction set (every caller is a `#[target_feature]` entry point of
/// [`simd_entries!`], reached only for an available [`super::Isa`]). The rows of `v` are sliced
/// with bounds checks (a short `v` panics; `super::weighted_sum_isa` asserts its length first for a
/// clearer message).
#[inline(always)]
pub(crate) unsafe fn weighted_sum<S: Simd>(y: &mut [f32], p: &[f32], v: &[f32]) {
    let d = y.len();
    y.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        // SAFETY: forwarded contract (the CPU supports S); the slice is bounds-checked.
        unsafe { axpy::<S>(y, pj, &v[j * d..(j + 1) * d]) }
    }
}

/// [`super::scalar::lowrank_up`]: each output is the same chain of fused multiply-adds over
/// `k`, lane by lane (no lane crosses another, so the result equals the scalar one bit for bit).
/// Register tile: up to four tokens × four vectors of columns, sharing each loaded vector of
/// `Bᵀ` across the tokens; the columns past the last whole vector go through `mul_add`.
///
/// # Safety
/// The CPU supports `S`'s instruction set; `bt` holds `rank · out` values, `u` `n · rank`, and `y`
/// is valid for writes of `Y[t, c]` (at `t·out + c`), `t < n`, `c` in `cols ⊆ 0..out`, which no
/// other thread touches during the call (`super::lowrank_up_isa` asserts the shapes).
#[inline(always)]
pub(crate) unsafe fn lowrank_up<S: Simd>(
    bt: Weights,
    rank: usize,
    out: usize,
    u: &[f32],
    n: usize,
    cols: Range<usize>,
    y: *mut f32,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match bt {
            Weights::F32(w) => lowrank_up_typed::<S, f32>(w, rank, out, u, n, cols, y),
            Weights::F16(w) => lowrank_up_typed::<S, f16>(w, rank, out, u, n, cols, y),
            Weights::BF16(w) => lowrank_up_typed::<S, bf16>(w, rank, out, u, n, cols, y),
            Weights::Nf4(_) | Weights::Quant(_) => panic!("lowrank_up: low-rank factors are f32, f16 or bf16"),
        }
    }
}

/// [`lowrank_up`] for one element type.
///
/// # Safety
/// As [`lowrank_up`].
#[inline(always)]
unsafe fn lowrank_up_typed<S: Simd, E: Elem>(
    bt: &[E],
    rank: usize,
    out: usize,
    u: &[f32],
    n: usize,
    cols: Range<usize>,
    y: *mut f32,
) {
    let mut t = 0;
    // SAFETY (all calls): forwarded contract.
    unsafe {
        while t + 4 <= n {
            lowrank_up_tokens::<S, E, 4>(bt, rank, out, u, t, cols.clone(), y);
            t += 4;
        }
        while t < n {
            lowrank_up_tokens::<S, E, 1>(bt, rank, out, u, t, cols.clone(), y);
            t += 1;
        }
    }
}

/// [`lowrank_up`] for the `T` tokens from `t0`.
///
/// # Safety
/// As [`lowrank_up`], with `t0 + T <= n`.
#[inline(always)]
unsafe fn lowrank_up_tokens<S: Simd, E: Elem, const T: usize>(
    bt: &[E],
    rank: usize,
    out: usize,
    u: &[f32],
    t0: usize,
    cols: Range<usize>,
    y: *mut f32,
) {
    const V: usize = 4;
    let l = S::LANES;
    let b = bt.as_ptr();
    let mut c = cols.start;
    // SAFETY (whole body): `k < rank` and `c + width <= cols.end <= out` keep the reads of `bt`
    // inside `rank · out`; the writes are the caller's (`t0 + j < n`, `c` in `cols`).
    unsafe {
        while c + V * l <= cols.end {
            let mut acc = [[S::zero(); V]; T];
            for k in 0..rank {
                let w: [S::V; V] = std::array::from_fn(|v| E::load::<S>(b.add(k * out + c + v * l)));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let uk = S::splat(u[(t0 + j) * rank + k]);
                    for v in 0..V {
                        acc[v] = S::fma(uk, w[v], acc[v]);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                for (v, &a) in acc.iter().enumerate() {
                    S::store(y.add((t0 + j) * out + c + v * l), a);
                }
            }
            c += V * l;
        }
        while c + l <= cols.end {
            let mut acc = [S::zero(); T];
            for k in 0..rank {
                let w = E::load::<S>(b.add(k * out + c));
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = S::fma(S::splat(u[(t0 + j) * rank + k]), w, *acc);
                }
            }
            for (j, &a) in acc.iter().enumerate() {
                S::store(y.add((t0 + j) * out + c), a);
            }
            c += l;
        }
        for c in c..cols.end {
            for j in 0..T {
                let uj = &u[(t0 + j) * rank..(t0 + j + 1) * rank];
                *y.add((t0 + j) * out + c) = super::scalar::lowrank_up_one(E::weights(bt), rank, out, uj, c);
            }
        }
    }
}

/// Defines the `#[target_feature]` entry points of every kernel for one [`Simd`] type.
macro_rules! simd_entries {
    ($S:ty, $features:literal) => {
        use crate::kernels::{simd, MatRef};
        use std::ops::Range;

        /// See [`simd::matvec_rows`].
        ///
        /// # Safety
        /// The CPU supports the features; the shapes are as [`simd::matvec_rows`] requires.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn matvec_rows(m: MatRef, rows: Range<usize>, x: &[f32], y: &mut [f32]) {
            // SAFETY: forwarded contract.
            unsafe { simd::matvec_rows::<$S>(m, rows, x, y) }
        }

        /// See [`simd::matvec_rows_multi`].
        ///
        /// # Safety
        /// The CPU supports the features; the pointers and shapes are as
        /// [`simd::matvec_rows_multi`] requires.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn matvec_rows_multi(
            m: MatRef,
            rows: Range<usize>,
            x: &[f32],
            n: usize,
            y: *mut f32,
            ldy: usize,
        ) {
            // SAFETY: forwarded contract.
            unsafe { simd::matvec_rows_multi::<$S>(m, rows, x, n, y, ldy) }
        }

        /// See [`simd::matmul_rows`].
        ///
        /// # Safety
        /// The CPU supports the features; the pointers and shapes are as [`simd::matmul_rows`]
        /// requires.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn matmul_rows(m: MatRef, rows: Range<usize>, xp: &[f32], n: usize, y: *mut f32, ldy: usize) {
            // SAFETY: forwarded contract.
            unsafe { simd::matmul_rows::<$S>(m, rows, xp, n, y, ldy) }
        }

        /// Tokens per packed X tile.
        pub(crate) const TILE_TOKENS: usize = simd::tile_tokens::<$S>();

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            // SAFETY: forwarded contract.
            unsafe { simd::dot::<$S>(a, b) }
        }

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
            // SAFETY: forwarded contract.
            unsafe { simd::axpy::<$S>(y, a, x) }
        }

        /// See [`simd::lowrank_up`].
        ///
        /// # Safety
        /// The CPU supports the features; the shapes and `y` are as [`simd::lowrank_up`] requires.
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn lowrank_up(
            bt: crate::kernels::Weights,
            rank: usize,
            out: usize,
            u: &[f32],
            n: usize,
            cols: Range<usize>,
            y: *mut f32,
        ) {
            // SAFETY: forwarded contract.
            unsafe { simd::lowrank_up::<$S>(bt, rank, out, u, n, cols, y) }
        }

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn weighted_sum(y: &mut [f32], p: &[f32], v: &[f32]) {
            // SAFETY: forwarded contract.
            unsafe { simd::weighted_sum::<$S>(y, p, v) }
        }

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn add(y: &mut [f32], x: &[f32]) {
            // SAFETY: forwarded contract.
            unsafe { simd::add::<$S>(y, x) }
        }

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
            // SAFETY: forwarded contract.
            unsafe { simd::rmsnorm::<$S>(out, x, w, eps) }
        }

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn softmax(x: &mut [f32]) {
            // SAFETY: forwarded contract.
            unsafe { simd::softmax::<$S>(x) }
        }

        /// # Safety
        /// The CPU supports the features (any slice lengths).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
            // SAFETY: forwarded contract.
            unsafe { simd::silu_mul::<$S>(gate, up) }
        }
    };
}
pub(crate) use simd_entries;
