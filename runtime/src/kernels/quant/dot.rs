//! The integer-dot row kernels of [`super`], written once over [`QSimd`] (32 bytes of codes
//! dotted with 32 activation bytes into i32 partial sums, then scaled into f32 lanes) and
//! instantiated for AVX2, AVX-512 VNNI (`x86/quant.rs`) and NEON (`neon/quant.rs`).
//!
//! Every function is `#[inline(always)]` and only called from a `#[target_feature]` entry point,
//! so the intrinsics behind [`QSimd`] inline into code compiled for that instruction set.

use super::QBlock;
use crate::gguf::quants::GgmlType;
use std::ops::Range;

/// The vector operations the block dot products need.
///
/// # Safety
/// Implementations use one instruction set's intrinsics; callers run them only where it is
/// available, with pointers valid for the bytes each method reads.
pub(crate) trait QSimd {
    /// 32 bytes: a block's codes or a block of activations.
    type B: Copy;
    /// i32 partial sums of one block's 32 products (how they are spread over lanes is the
    /// implementation's).
    type I: Copy;
    /// f32 accumulator lanes.
    type F: Copy;
    /// 32 bytes at `p`.
    unsafe fn load32(p: *const u8) -> Self::B;
    /// 16 bytes at `p` as 32 4-bit codes: the low nibbles, then the high ones (ggml's order).
    unsafe fn nibbles16(p: *const u8) -> Self::B;
    /// `(b >> shift) & mask` per byte (`mask <= 0xff >> shift`).
    unsafe fn srl_and(b: Self::B, shift: u32, mask: u8) -> Self::B;
    /// `b << 4` per byte (`b < 16`).
    unsafe fn shl4(b: Self::B) -> Self::B;
    /// `b << 2` per byte (`b < 64`).
    unsafe fn shl2(b: Self::B) -> Self::B;
    /// 32 bytes of `v`.
    unsafe fn splat8(v: u8) -> Self::B;
    /// Byte `i` is `0x10` where bit `i` of `bits` is set, else 0 (Q5's fifth bits in place).
    unsafe fn bits32(bits: u32) -> Self::B;
    unsafe fn or(a: Self::B, b: Self::B) -> Self::B;
    /// `b - v` per byte (wrapping).
    unsafe fn sub(b: Self::B, v: u8) -> Self::B;
    /// Σ w·x with `w` unsigned in `0..=127`, `x` signed.
    unsafe fn dot_u(w: Self::B, x: Self::B) -> Self::I;
    /// Σ w·x with both signed (`x` in `-127..=127`).
    unsafe fn dot_s(w: Self::B, x: Self::B) -> Self::I;
    /// `sa · Σ_{i<16} w·x + sb · Σ_{i≥16} w·x` with `w` in `-32..=31` (Q6_K's two scales per 32).
    unsafe fn dot_s_scaled(w: Self::B, x: Self::B, sa: i32, sb: i32) -> Self::I;
    unsafe fn zero() -> Self::F;
    /// `acc + s · f32(i)` per lane.
    unsafe fn cvt_fma(i: Self::I, s: f32, acc: Self::F) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn hsum(a: Self::F) -> f32;
    /// The IEEE half float at `p` (2 bytes, little-endian).
    #[inline(always)]
    unsafe fn f16(p: *const u8) -> f32 {
        // SAFETY: `p` valid for 2 bytes (caller).
        unsafe { half::f16::from_le_bytes([*p, *p.add(1)]).to_f32() }
    }
}

/// One row of one block type: `Σ_blocks` of the block products with the quantised activation.
trait Kind {
    /// Weight bytes per 32 elements... of a whole block, and activation blocks per block.
    const BYTES: usize;
    const XBLOCKS: usize;
    /// Row `w` (`nb` activation blocks worth of weights) · `xq`.
    ///
    /// # Safety
    /// `Q`'s instruction set is available; `w` is valid for `nb / XBLOCKS · BYTES` bytes and `xq`
    /// for `nb` blocks.
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32;
}

/// Q4_0 (`HIGH_BIT` false) and Q5_0 (true): a scale, `HIGH_BIT`'s 32 fifth bits, 32 4-bit
/// codes; the value is `d · (code − 8)`, or `d · (code + 16·bit − 16)`.
struct Sym<const HIGH_BIT: bool>;
/// Q4_1 and Q5_1: as [`Sym`] with a minimum instead of the offset (`d · code + m`).
struct Min<const HIGH_BIT: bool>;
/// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and minimums, 4-bit codes and, for
/// Q5_K, a fifth bit per element.
struct KMin<const HIGH_BIT: bool>;
type Q4_0 = Sym<false>;
type Q5_0 = Sym<true>;
type Q4_1 = Min<false>;
type Q5_1 = Min<true>;
type Q4K = KMin<false>;
type Q5K = KMin<true>;
struct Q8_0;
struct Q2K;
struct Q3K;
struct Q6K;

/// Two f32 accumulators (and two scalar ones, `$mins`, for the block minimums) taken in turn,
/// blocks alternating between them, to hide the add latency; `$s` is the sum of the vector
/// ones, `$m` of the scalar ones.
macro_rules! two_acc {
    ($Q:ty, $count:expr, |$i:ident, $acc:ident, $mins:ident| $body:block) => {{
        let (mut a0, mut a1) = (<$Q>::zero(), <$Q>::zero());
        let (mut m0, mut m1) = (0f32, 0f32);
        let mut $i = 0;
        while $i + 2 <= $count {
            {
                let ($acc, $mins) = (&mut a0, &mut m0);
                $body
            }
            $i += 1;
            {
                let ($acc, $mins) = (&mut a1, &mut m1);
                $body
            }
            $i += 1;
        }
        if $i < $count {
            let ($acc, $mins) = (&mut a0, &mut m0);
            $body
        }
        (<$Q>::hsum(<$Q>::add(a0, a1)), m0 + m1)
    }};
}

impl<const HIGH_BIT: bool> Kind for Sym<HIGH_BIT> {
    const BYTES: usize = if HIGH_BIT { 22 } else { 18 };
    const XBLOCKS: usize = 1;
    // x86/quants.c: ggml_vec_dot_q4_0_q8_0, ggml_vec_dot_q5_0_q8_0 (signed × signed)
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // SAFETY: block `i < nb` of the row and of `xq` (caller).
        unsafe {
            two_acc!(Q, nb, |i, acc, _mins| {
                let (b, x) = (w.add(Self::BYTES * i), &*xq.add(i));
                let codes = Q::nibbles16(b.add(Self::BYTES - 16));
                let q = match HIGH_BIT {
                    true => Q::sub(Q::or(codes, Q::bits32(b.add(2).cast::<u32>().read_unaligned())), 16),
                    false => Q::sub(codes, 8),
                };
                let p = Q::dot_s(q, Q::load32(x.qs.as_ptr().cast()));
                *acc = Q::cvt_fma(p, Q::f16(b) * x.d, *acc);
            })
            .0
        }
    }
}

impl<const HIGH_BIT: bool> Kind for Min<HIGH_BIT> {
    const BYTES: usize = if HIGH_BIT { 24 } else { 20 };
    const XBLOCKS: usize = 1;
    // x86/quants.c: ggml_vec_dot_q4_1_q8_1, ggml_vec_dot_q5_1_q8_1 (the minimum times the
    // activation block's sum)
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // SAFETY: block `i < nb` of the row and of `xq` (caller).
        let (s, mins) = unsafe {
            two_acc!(Q, nb, |i, acc, mins| {
                let (b, x) = (w.add(Self::BYTES * i), &*xq.add(i));
                let codes = Q::nibbles16(b.add(Self::BYTES - 16));
                let q = match HIGH_BIT {
                    true => Q::or(codes, Q::bits32(b.add(4).cast::<u32>().read_unaligned())),
                    false => codes,
                };
                let p = Q::dot_u(q, Q::load32(x.qs.as_ptr().cast()));
                *acc = Q::cvt_fma(p, Q::f16(b) * x.d, *acc);
                *mins += Q::f16(b.add(2)) * x.s;
            })
        };
        s + mins
    }
}

impl Kind for Q8_0 {
    const BYTES: usize = 34;
    const XBLOCKS: usize = 1;
    // x86/quants.c: ggml_vec_dot_q8_0_q8_0
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // SAFETY: block `i < nb` of the row and of `xq` (caller).
        unsafe {
            two_acc!(Q, nb, |i, acc, _mins| {
                let (b, x) = (w.add(34 * i), &*xq.add(i));
                let p = Q::dot_s(Q::load32(b.add(2)), Q::load32(x.qs.as_ptr().cast()));
                *acc = Q::cvt_fma(p, Q::f16(b) * x.d, *acc);
            })
            .0
        }
    }
}

impl Kind for Q2K {
    const BYTES: usize = 84;
    const XBLOCKS: usize = 8;
    // x86/quants.c: ggml_vec_dot_q2_K_q8_K, one activation scale per 32 (sub-block `4c + s`:
    // bits `2s` of bytes `32c..32c + 32`, two 4-bit scale/min pairs per 32)
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // SAFETY: sub-block `jj < nb` (block `jj / 8`) of the row and of `xq` (caller).
        unsafe {
            two_acc!(Q, nb, |jj, acc, _mins| {
                let (b, j, x) = (w.add(84 * (jj / 8)), jj % 8, &*xq.add(jj));
                let (c, s) = (j / 4, j % 4);
                let q = Q::srl_and(Q::load32(b.add(16 + 32 * c)), 2 * s as u32, 3);
                let (sa, sb) = (*b.add(8 * c + 2 * s), *b.add(8 * c + 2 * s + 1));
                let xv = Q::load32(x.qs.as_ptr().cast());
                let p = Q::dot_s_scaled(q, xv, i32::from(sa & 15), i32::from(sb & 15));
                let pm = Q::dot_s_scaled(Q::splat8(1), xv, i32::from(sa >> 4), i32::from(sb >> 4));
                *acc = Q::cvt_fma(p, Q::f16(b.add(80)) * x.d, *acc);
                *acc = Q::cvt_fma(pm, -(Q::f16(b.add(82)) * x.d), *acc);
            })
            .0
        }
    }
}

impl Kind for Q3K {
    const BYTES: usize = 110;
    const XBLOCKS: usize = 8;
    // x86/quants.c: ggml_vec_dot_q3_K_q8_K, one activation scale per 32 (sub-block `4c + s`)
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // SAFETY: sub-block `jj < nb` (block `jj / 8`) of the row and of `xq` (caller).
        unsafe {
            let mut sc = [0i32; 16];
            two_acc!(Q, nb, |jj, acc, _mins| {
                let (b, j, x) = (w.add(110 * (jj / 8)), jj % 8, &*xq.add(jj));
                if j == 0 {
                    sc = super::scales_q3k(&*b.add(96).cast::<[u8; 12]>());
                }
                let (c, s) = (j / 4, j % 4);
                let low = Q::srl_and(Q::load32(b.add(32 + 32 * c)), 2 * s as u32, 3);
                let high = Q::srl_and(Q::load32(b), (4 * c + s) as u32, 1);
                let q = Q::sub(Q::or(low, Q::shl2(high)), 4);
                let (sa, sb) = (sc[8 * c + 2 * s], sc[8 * c + 2 * s + 1]);
                let p = Q::dot_s_scaled(q, Q::load32(x.qs.as_ptr().cast()), sa, sb);
                *acc = Q::cvt_fma(p, Q::f16(b.add(108)) * x.d, *acc);
            })
            .0
        }
    }
}

impl<const HIGH_BIT: bool> Kind for KMin<HIGH_BIT> {
    const BYTES: usize = if HIGH_BIT { 176 } else { 144 };
    const XBLOCKS: usize = 8;
    // x86/quants.c: ggml_vec_dot_q4_K_q8_K, ggml_vec_dot_q5_K_q8_K, one activation scale per
    // 32 (sub-block)
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // The codes follow d, dmin, the 12 scale bytes and (Q5_K) the 32 bytes of fifth bits.
        let codes_at = if HIGH_BIT { 48 } else { 16 };
        // SAFETY: sub-block `j < nb` (block `j / 8`) of the row and of `xq` (caller).
        let (s, mins) = unsafe {
            let (mut d, mut dmin, mut sc) = (0f32, 0f32, [0u8; 12]);
            two_acc!(Q, nb, |j, acc, mins| {
                let b = w.add(Self::BYTES * (j / 8));
                if j % 8 == 0 {
                    (d, dmin) = (Q::f16(b), Q::f16(b.add(2)));
                    sc = *b.add(4).cast::<[u8; 12]>();
                }
                let x = &*xq.add(j);
                let (s, m) = super::scale_min_k4(j % 8, &sc);
                let low = Q::srl_and(Q::load32(b.add(codes_at + 32 * (j % 8 / 2))), 4 * (j % 2) as u32, 0xF);
                let q = match HIGH_BIT {
                    true => Q::or(low, Q::shl4(Q::srl_and(Q::load32(b.add(16)), (j % 8) as u32, 1))),
                    false => low,
                };
                let p = Q::dot_u(q, Q::load32(x.qs.as_ptr().cast()));
                *acc = Q::cvt_fma(p, d * f32::from(s) * x.d, *acc);
                *mins += dmin * f32::from(m) * x.s;
            })
        };
        s - mins
    }
}

impl Kind for Q6K {
    const BYTES: usize = 210;
    const XBLOCKS: usize = 8;
    // x86/quants.c: ggml_vec_dot_q6_K_q8_K, one activation scale per 32 (sub-block)
    #[inline(always)]
    unsafe fn row<Q: QSimd>(w: *const u8, xq: *const QBlock, nb: usize) -> f32 {
        // SAFETY: sub-block `jj < nb` (block `jj / 8`) of the row and of `xq` (caller).
        unsafe {
            two_acc!(Q, nb, |jj, acc, _mins| {
                let (b, j, x) = (w.add(210 * (jj / 8)), jj % 8, &*xq.add(jj));
                let (n, i) = (j / 4, j % 4);
                let lo = Q::srl_and(Q::load32(b.add(64 * n + 32 * (i % 2))), 4 * (i / 2) as u32, 0xF);
                let hi = Q::srl_and(Q::load32(b.add(128 + 32 * n)), 2 * i as u32, 3);
                let q = Q::sub(Q::or(lo, Q::shl4(hi)), 32);
                let sc = b.add(192 + 8 * n + 2 * i);
                let p = Q::dot_s_scaled(
                    q,
                    Q::load32(x.qs.as_ptr().cast()),
                    i32::from(*sc as i8),
                    i32::from(*sc.add(1) as i8),
                );
                *acc = Q::cvt_fma(p, Q::f16(b.add(208)) * x.d, *acc);
            })
            .0
        }
    }
}

/// Rows per group: a group's weight bytes stay in L1 while every token passes over them.
const ROW_GROUP: usize = 4;

/// Rows × tokens with kind `K`, each (row, token) by `K::row`.
///
/// # Safety
/// As [`rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_kind<Q: QSimd, K: Kind>(
    w: *const u8,
    row_bytes: usize,
    rows: Range<usize>,
    xq: *const QBlock,
    nb: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    debug_assert_eq!(row_bytes, nb / K::XBLOCKS * K::BYTES);
    let mut g = rows.start;
    // SAFETY: rows < rows.end and tokens < n (caller contract).
    unsafe {
        while g < rows.end {
            let end = (g + ROW_GROUP).min(rows.end);
            for t in 0..n {
                for r in g..end {
                    *y.add(t * ldy + r) = K::row::<Q>(w.add(r * row_bytes), xq.add(t * nb), nb);
                }
            }
            g = end;
        }
    }
}

/// `Y[t, r] = row r · x̂_t` for `r` in `rows`, `t < n` (see [`super::rows_multi_isa`]).
///
/// # Safety
/// `Q`'s instruction set is available; `super::has_kernel(ty)`; `w` holds rows of `row_bytes`
/// (`nb` activation blocks' worth) up to `rows.end`; `xq` holds `n · nb` blocks; `y` is valid for
/// writes at `t·ldy + r`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows<Q: QSimd>(
    ty: GgmlType,
    w: *const u8,
    row_bytes: usize,
    rows: Range<usize>,
    xq: *const QBlock,
    nb: usize,
    n: usize,
    y: *mut f32,
    ldy: usize,
) {
    // SAFETY: forwarded.
    unsafe {
        match ty {
            GgmlType::Q4_0 => rows_kind::<Q, Q4_0>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q4_1 => rows_kind::<Q, Q4_1>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q8_0 => rows_kind::<Q, Q8_0>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q5_0 => rows_kind::<Q, Q5_0>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q5_1 => rows_kind::<Q, Q5_1>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q2_K => rows_kind::<Q, Q2K>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q3_K => rows_kind::<Q, Q3K>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q4_K => rows_kind::<Q, Q4K>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q5_K => rows_kind::<Q, Q5K>(w, row_bytes, rows, xq, nb, n, y, ldy),
            GgmlType::Q6_K => rows_kind::<Q, Q6K>(w, row_bytes, rows, xq, nb, n, y, ldy),
            _ => unreachable!("no integer dot for {ty}"),
        }
    }
}
