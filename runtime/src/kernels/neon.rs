//! aarch64 Advanced SIMD (NEON) vector type for [`super::simd`] (4 × f32).
//!
//! f16 is widened with integer arithmetic (stable Rust has no f16 vector type): the 15 low bits
//! shifted into f32 position and scaled by 2^112 give normals and subnormals exactly; inf/NaN
//! get the f32 all-ones exponent. bf16 is the high half of an f32 (shift left 16).

pub(crate) mod quant;

pub(crate) use super::simd::simd_entries;
use super::simd::Simd;
use std::arch::aarch64::*;

/// NEON, `float32x4_t`.
pub(crate) struct Neon;

impl Simd for Neon {
    type V = float32x4_t;
    const LANES: usize = 4;
    // 8 rows × 12 tokens = 24 accumulators of the 32 q registers.
    const MR: usize = 8;
    const NV: usize = 3;
    #[inline(always)]
    unsafe fn zero() -> float32x4_t {
        // SAFETY: NEON available (trait contract).
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vdupq_n_f32(v) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: `p` valid for 4 f32.
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        // SAFETY: `p` valid for 4 u16; integer widening as in the module docs.
        unsafe {
            let h = vmovl_u16(vld1_u16(p));
            let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
            let em = vandq_u32(h, vdupq_n_u32(0x7fff));
            let scaled = vmulq_f32(
                vreinterpretq_f32_u32(vshlq_n_u32::<13>(em)),
                vreinterpretq_f32_u32(vdupq_n_u32(0x7780_0000)), // 2^112
            );
            let special = vcgeq_u32(em, vdupq_n_u32(0x7c00));
            let bits = vorrq_u32(vreinterpretq_u32_f32(scaled), vandq_u32(special, vdupq_n_u32(0x7f80_0000)));
            vreinterpretq_f32_u32(vorrq_u32(bits, sign))
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> float32x4_t {
        // SAFETY: `p` valid for 4 u16.
        unsafe { vreinterpretq_f32_u32(vshlq_n_u32::<16>(vmovl_u16(vld1_u16(p)))) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: `p` valid for 4 f32 writes.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vdivq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vmaxq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available.
        unsafe { vminq_f32(a, b) }
    }
    #[inline(always)]
    unsafe fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available; vfmaq computes c + a·b.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    unsafe fn round(a: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available; round to nearest, ties to even.
        unsafe { vrndnq_f32(a) }
    }
    #[inline(always)]
    unsafe fn pow2i(n: float32x4_t) -> float32x4_t {
        // SAFETY: NEON available; (n + 127) << 23 is the f32 bit pattern of 2^n.
        unsafe {
            let e = vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127));
            vreinterpretq_f32_s32(vshlq_n_s32::<23>(e))
        }
    }
    #[inline(always)]
    unsafe fn hsum(v: float32x4_t) -> f32 {
        // SAFETY: NEON available.
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn hmax(v: float32x4_t) -> f32 {
        // SAFETY: NEON available.
        unsafe { vmaxvq_f32(v) }
    }
    type Lut = uint8x16x4_t;
    #[inline(always)]
    unsafe fn lut(t: &[f32; 16]) -> uint8x16x4_t {
        // SAFETY: `t` holds 64 bytes.
        unsafe { vld1q_u8_x4(t.as_ptr().cast()) }
    }
    #[inline(always)]
    unsafe fn load_nf4(p: *const u8, lut: uint8x16x4_t) -> float32x4_t {
        // SAFETY: `p` valid for 2 bytes. The 4 codes c0..c3 (high nibble first) become byte
        // indices 4c+0..4c+3 into the 64-byte table, looked up in one TBL.
        unsafe {
            let (b0, b1) = (*p, *p.add(1));
            let codes = u32::from_le_bytes([b0 >> 4, b0 & 15, b1 >> 4, b1 & 15]);
            let c = vreinterpretq_u8_u32(vdupq_n_u32(codes));
            // Each code repeated 4 times: bytes [c0 c0 c0 c0 c1 c1 c1 c1 ...].
            let rep = vqtbl1q_u8(c, vld1q_u8([0u8, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3].as_ptr()));
            let idx =
                vaddq_u8(vshlq_n_u8::<2>(rep), vld1q_u8([0u8, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3].as_ptr()));
            vreinterpretq_f32_u8(vqtbl4q_u8(lut, idx))
        }
    }
}

/// Entry points compiled for NEON.
pub(crate) mod entries {
    super::simd_entries!(super::Neon, "neon");
}
