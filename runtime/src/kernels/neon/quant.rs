//! [`QSimd`] for aarch64 NEON: `smull`/`smull2` + `sadalp` (exact in i16, then i32), which every
//! NEON core has (the `sdot` of the dotprod extension would do the same in one instruction).
//! The two i8x16 halves of a block sum into one i32x4.

use crate::gguf::quants::GgmlType;
use crate::kernels::quant::dot::{self, QSimd};
use crate::kernels::quant::QBlock;
use std::arch::aarch64::*;
use std::ops::Range;

pub(crate) struct NeonQ;

/// Σ w·x of 16 byte pairs into 4 i32 lanes.
///
/// # Safety
/// NEON; |w·x| ≤ 128·127 so two products fit i16.
#[inline(always)]
unsafe fn dot16(w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: NEON (caller).
    unsafe { vpadalq_s16(vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x))), vmull_high_s8(w, x)) }
}

impl QSimd for NeonQ {
    type B = (int8x16_t, int8x16_t);
    type I = int32x4_t;
    type F = float32x4_t;
    #[inline(always)]
    unsafe fn load32(p: *const u8) -> Self::B {
        // SAFETY: `p` valid for 32 bytes (trait contract).
        unsafe { (vld1q_s8(p.cast()), vld1q_s8(p.add(16).cast())) }
    }
    #[inline(always)]
    unsafe fn nibbles16(p: *const u8) -> Self::B {
        // SAFETY: `p` valid for 16 bytes.
        unsafe {
            let q = vld1q_u8(p);
            (vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(15))), vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)))
        }
    }
    #[inline(always)]
    unsafe fn srl_and(b: Self::B, shift: u32, mask: u8) -> Self::B {
        // SAFETY: NEON; a negative shift count shifts right.
        unsafe {
            let (s, m) = (vdupq_n_s8(-(shift as i8)), vdupq_n_u8(mask));
            let f = |v: int8x16_t| vreinterpretq_s8_u8(vandq_u8(vshlq_u8(vreinterpretq_u8_s8(v), s), m));
            (f(b.0), f(b.1))
        }
    }
    #[inline(always)]
    unsafe fn shl4(b: Self::B) -> Self::B {
        // SAFETY: NEON.
        unsafe { (vshlq_n_s8::<4>(b.0), vshlq_n_s8::<4>(b.1)) }
    }
    #[inline(always)]
    unsafe fn shl2(b: Self::B) -> Self::B {
        // SAFETY: NEON.
        unsafe { (vshlq_n_s8::<2>(b.0), vshlq_n_s8::<2>(b.1)) }
    }
    #[inline(always)]
    unsafe fn splat8(v: u8) -> Self::B {
        // SAFETY: NEON.
        unsafe { (vdupq_n_s8(v as i8), vdupq_n_s8(v as i8)) }
    }
    #[inline(always)]
    unsafe fn bits32(bits: u32) -> Self::B {
        // SAFETY: NEON. Byte `i` gets byte `i / 8` of `bits` (a table lookup), tested against
        // bit `i % 8`.
        unsafe {
            let v = vreinterpretq_u8_u32(vdupq_n_u32(bits));
            let m = vreinterpretq_u8_u64(vdupq_n_u64(0x8040_2010_0804_0201));
            let f = |idx: [u8; 16]| {
                let t = vtstq_u8(vqtbl1q_u8(v, vld1q_u8(idx.as_ptr())), m);
                vreinterpretq_s8_u8(vandq_u8(t, vdupq_n_u8(0x10)))
            };
            (f([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]), f([2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]))
        }
    }
    #[inline(always)]
    unsafe fn or(a: Self::B, b: Self::B) -> Self::B {
        // SAFETY: NEON.
        unsafe { (vorrq_s8(a.0, b.0), vorrq_s8(a.1, b.1)) }
    }
    #[inline(always)]
    unsafe fn sub(b: Self::B, v: u8) -> Self::B {
        // SAFETY: NEON.
        unsafe {
            let v = vdupq_n_s8(v as i8);
            (vsubq_s8(b.0, v), vsubq_s8(b.1, v))
        }
    }
    #[inline(always)]
    unsafe fn dot_u(w: Self::B, x: Self::B) -> int32x4_t {
        // SAFETY: NEON; codes up to 127 are the same as signed bytes.
        unsafe { Self::dot_s(w, x) }
    }
    #[inline(always)]
    unsafe fn dot_s(w: Self::B, x: Self::B) -> int32x4_t {
        // SAFETY: NEON.
        unsafe { vaddq_s32(dot16(w.0, x.0), dot16(w.1, x.1)) }
    }
    #[inline(always)]
    unsafe fn dot_s_scaled(w: Self::B, x: Self::B, sa: i32, sb: i32) -> int32x4_t {
        // SAFETY: NEON.
        unsafe { vmlaq_n_s32(vmulq_n_s32(dot16(w.0, x.0), sa), dot16(w.1, x.1), sb) }
    }
    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: NEON.
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn cvt_fma(i: int32x4_t, s: f32, acc: float32x4_t) -> float32x4_t {
        // SAFETY: NEON.
        unsafe { vfmaq_n_f32(acc, vcvtq_f32_s32(i), s) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn hsum(v: float32x4_t) -> f32 {
        // SAFETY: NEON.
        unsafe { vaddvq_f32(v) }
    }
}

/// [`dot::rows`] compiled for NEON.
///
/// # Safety
/// The CPU has NEON; the rest as [`dot::rows`].
#[target_feature(enable = "neon")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows(
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
    // SAFETY: forwarded contract.
    unsafe { dot::rows::<NeonQ>(ty, w, row_bytes, rows, xq, nb, n, y, ldy) }
}
