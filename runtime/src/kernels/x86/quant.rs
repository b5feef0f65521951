//! [`QSimd`] for x86-64: AVX2 (`vpmaddubsw` + `vpmaddwd`, as llama.cpp's `mul_sum_us8_pairs_float`)
//! and AVX-512 VNNI (`vpdpbusd` on 256-bit vectors, one instruction for both), 8 i32 lanes of
//! partial sums per block (lane `j` sums bytes `4j..4j + 3`).

use crate::gguf::quants::GgmlType;
use crate::kernels::quant::dot::{self, QSimd};
use crate::kernels::quant::QBlock;
use std::arch::x86_64::*;
use std::ops::Range;

/// AVX2 + FMA + F16C.
pub(crate) struct Avx2Q;
/// AVX-512 VNNI (+VL) on 256-bit vectors.
pub(crate) struct VnniQ;

/// Whether the CPU has AVX-512 VNNI and VL (detected once).
pub(crate) fn vnni() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"))
}

macro_rules! impl_qsimd {
    ($T:ty, |$w:ident, $x:ident| $dot_u:expr) => {
        impl QSimd for $T {
            type B = __m256i;
            type I = __m256i;
            type F = __m256;
            #[inline(always)]
            unsafe fn load32(p: *const u8) -> __m256i {
                // SAFETY: `p` valid for 32 bytes (trait contract); unaligned load.
                unsafe { _mm256_loadu_si256(p.cast()) }
            }
            #[inline(always)]
            unsafe fn nibbles16(p: *const u8) -> __m256i {
                // SAFETY: `p` valid for 16 bytes; low nibbles in the low half, high in the high.
                unsafe {
                    let q = _mm_loadu_si128(p.cast());
                    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), _mm256_set1_epi8(15))
                }
            }
            #[inline(always)]
            unsafe fn srl_and(b: __m256i, shift: u32, mask: u8) -> __m256i {
                // SAFETY: AVX2; bits shifted in from the next byte are masked off.
                unsafe {
                    _mm256_and_si256(_mm256_srl_epi16(b, _mm_cvtsi32_si128(shift as i32)), _mm256_set1_epi8(mask as i8))
                }
            }
            #[inline(always)]
            unsafe fn shl4(b: __m256i) -> __m256i {
                // SAFETY: AVX2; bytes below 16 stay inside their byte.
                unsafe { _mm256_slli_epi16::<4>(b) }
            }
            #[inline(always)]
            unsafe fn shl2(b: __m256i) -> __m256i {
                // SAFETY: AVX2; bytes below 64 stay inside their byte.
                unsafe { _mm256_slli_epi16::<2>(b) }
            }
            #[inline(always)]
            unsafe fn splat8(v: u8) -> __m256i {
                // SAFETY: AVX.
                unsafe { _mm256_set1_epi8(v as i8) }
            }
            #[inline(always)]
            unsafe fn bits32(bits: u32) -> __m256i {
                // SAFETY: AVX2. llama.cpp's `bytes_from_bits_32`: byte `i` gets byte `i / 8` of
                // `bits`, all its bits but bit `i % 8` are set, and it compares equal to 0xff
                // exactly when that bit is set too.
                unsafe {
                    let b = _mm256_shuffle_epi8(
                        _mm256_set1_epi32(bits as i32),
                        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
                    );
                    let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
                    _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10))
                }
            }
            #[inline(always)]
            unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
                // SAFETY: AVX2.
                unsafe { _mm256_or_si256(a, b) }
            }
            #[inline(always)]
            unsafe fn sub(b: __m256i, v: u8) -> __m256i {
                // SAFETY: AVX2.
                unsafe { _mm256_sub_epi8(b, _mm256_set1_epi8(v as i8)) }
            }
            #[inline(always)]
            unsafe fn dot_u($w: __m256i, $x: __m256i) -> __m256i {
                // SAFETY: the instruction set of this type (trait contract). `vpmaddubsw` does not
                // saturate: two products of at most 128·127 fit i16.
                unsafe { $dot_u }
            }
            #[inline(always)]
            unsafe fn dot_s(w: __m256i, x: __m256i) -> __m256i {
                // SAFETY: AVX2. |w| (128 for −128, as unsigned) times x with w's sign.
                unsafe { Self::dot_u(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)) }
            }
            #[inline(always)]
            unsafe fn dot_s_scaled(w: __m256i, x: __m256i, sa: i32, sb: i32) -> __m256i {
                // SAFETY: AVX2; lanes 0–3 hold bytes 0–15.
                unsafe { _mm256_mullo_epi32(Self::dot_s(w, x), _mm256_setr_epi32(sa, sa, sa, sa, sb, sb, sb, sb)) }
            }
            #[inline(always)]
            unsafe fn zero() -> __m256 {
                // SAFETY: AVX.
                unsafe { _mm256_setzero_ps() }
            }
            #[inline(always)]
            unsafe fn cvt_fma(i: __m256i, s: f32, acc: __m256) -> __m256 {
                // SAFETY: AVX2 + FMA.
                unsafe { _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(s), acc) }
            }
            #[inline(always)]
            unsafe fn add(a: __m256, b: __m256) -> __m256 {
                // SAFETY: AVX.
                unsafe { _mm256_add_ps(a, b) }
            }
            #[inline(always)]
            unsafe fn hsum(v: __m256) -> f32 {
                // SAFETY: AVX; the float kernels' reduction.
                unsafe { <crate::kernels::x86::Avx2 as crate::kernels::simd::Simd>::hsum(v) }
            }
            #[inline(always)]
            unsafe fn f16(p: *const u8) -> f32 {
                // SAFETY: `p` valid for 2 bytes; F16C.
                unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(p.cast::<u16>().read_unaligned())))) }
            }
        }
    };
}

impl_qsimd!(Avx2Q, |w, x| _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
impl_qsimd!(VnniQ, |w, x| _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x));

/// [`dot::rows`] compiled for AVX2 + FMA + F16C.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; the rest as [`dot::rows`].
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows_avx2(
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
    unsafe { dot::rows::<Avx2Q>(ty, w, row_bytes, rows, xq, nb, n, y, ldy) }
}

/// [`dot::rows`] compiled for AVX-512 VNNI.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C, AVX-512F/VL/VNNI ([`vnni`] and `Isa::Avx512`); the rest as
/// [`dot::rows`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn rows_vnni(
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
    unsafe { dot::rows::<VnniQ>(ty, w, row_bytes, rows, xq, nb, n, y, ldy) }
}

/// Dequantises whole Q4_0/Q4_1/Q8_0 blocks (`data`) into `out` 8 values at a time, bit for bit
/// ggml's `dequantize_row_*` (the same multiply, then add, in f32; no FMA); `false` for other
/// types, left to `gguf::quants`. The prefill GEMM's widening of quantised row groups.
///
/// # Safety
/// AVX2 and F16C available (the caller is inlined into an AVX2 or AVX-512 entry point).
#[inline(always)]
pub(crate) unsafe fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> bool {
    let (off, min) = match ty {
        GgmlType::Q4_0 => (2, false),
        GgmlType::Q4_1 => (4, true),
        GgmlType::Q8_0 => (2, false),
        _ => return false,
    };
    let ts = ty.type_size();
    // SAFETY: each block's `ts` bytes are a chunk of `data`, its 32 values a chunk of `out`.
    unsafe {
        for (b, y) in data.chunks_exact(ts).zip(out.chunks_exact_mut(32)) {
            let (b, y) = (b.as_ptr(), y.as_mut_ptr());
            let d = splat_f16(b);
            // The 32 codes as 4 × 8 i32, in element order.
            let q: [__m256i; 4] = if ty == GgmlType::Q8_0 {
                let v = _mm256_loadu_si256(b.add(off).cast());
                let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                [
                    _mm256_cvtepi8_epi32(lo),
                    _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo)),
                    _mm256_cvtepi8_epi32(hi),
                    _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi)),
                ]
            } else {
                let v = _mm_loadu_si128(b.add(off).cast());
                let m = _mm_set1_epi8(15);
                let (lo, hi) = (_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16::<4>(v), m));
                let q4_0 = ty == GgmlType::Q4_0;
                [
                    widen4(lo, q4_0),
                    widen4(_mm_srli_si128::<8>(lo), q4_0),
                    widen4(hi, q4_0),
                    widen4(_mm_srli_si128::<8>(hi), q4_0),
                ]
            };
            let m = if min { splat_f16(b.add(2)) } else { _mm256_setzero_ps() };
            for (k, q) in q.into_iter().enumerate() {
                let v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                _mm256_storeu_ps(y.add(8 * k), if min { _mm256_add_ps(v, m) } else { v });
            }
        }
    }
    true
}

/// The f16 at `p`, in all 8 lanes.
///
/// # Safety
/// F16C and AVX; `p` valid for 2 bytes. (Functions, not closures, so that the intrinsics inline.)
#[inline(always)]
unsafe fn splat_f16(p: *const u8) -> __m256 {
    // SAFETY: the caller's contract.
    unsafe {
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(p.cast::<u16>().read_unaligned())))))
    }
}

/// The 8 low bytes of `v` (4-bit codes) as i32, minus 8 for Q4_0.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn widen4(v: __m128i, minus8: bool) -> __m256i {
    // SAFETY: AVX2 (caller).
    unsafe {
        let q = _mm256_cvtepu8_epi32(v);
        if minus8 {
            _mm256_sub_epi32(q, _mm256_set1_epi32(8))
        } else {
            q
        }
    }
}
