//! x86-64 vector types for [`super::simd`]: AVX2+FMA+F16C (8 lanes) and AVX-512F/BW (16 lanes),
//! the latter also with AVX512-BF16, whose BF16 matvecs are `bf16.rs`'s `vdpbf16ps` kernels.
//!
//! Every method is a thin wrapper over one or two intrinsics; callers guarantee (via run-time
//! detection in `super::isa`) that the CPU supports them.

pub(crate) mod bf16;
mod nf4;
pub(crate) mod quant;

pub(crate) use super::simd::simd_entries;
use super::simd::Simd;
use super::Nf4;
use half::bf16 as Bf16;
pub(crate) use nf4::reserve_strided;
use nf4::{nf4_strided, nf4_strided_multi};
use std::arch::x86_64::*;
use std::ops::Range;

/// Asks for the cache lines of `bytes` to be brought into L1 (no effect on any value): the
/// multi-token matvecs read a row group from memory once for their first tokens and from cache
/// after, and prefetch the next group meanwhile so that its loads do not wait on memory.
#[inline(always)]
pub(crate) fn prefetch(bytes: &[u8]) {
    for i in (0..bytes.len()).step_by(64) {
        // SAFETY: the address is inside `bytes`; a prefetch never faults and reads nothing the
        // program sees. SSE (all of x86-64).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(i).cast()) };
    }
}

/// AVX2 + FMA + F16C, `__m256` (8 × f32).
pub(crate) struct Avx2;

impl Simd for Avx2 {
    type V = __m256;
    const LANES: usize = 8;
    // 6 rows × 16 tokens = 12 accumulators of the 16 ymm registers.
    const MR: usize = 6;
    const NV: usize = 2;
    #[inline(always)]
    unsafe fn zero() -> __m256 {
        // SAFETY: AVX available (trait contract).
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: `p` valid for 8 f32 (trait contract); unaligned load.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        // SAFETY: `p` valid for 8 u16; F16C available.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        // SAFETY: `p` valid for 8 u16; zero-extend to 32 bits and shift into the high half.
        unsafe { _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())))) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: `p` valid for 8 f32 writes.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: FMA available.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn round(a: __m256) -> __m256 {
        // SAFETY: AVX available.
        unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    #[inline(always)]
    unsafe fn pow2i(n: __m256) -> __m256 {
        // SAFETY: AVX2 available; (n + 127) << 23 is the f32 bit pattern of 2^n.
        unsafe {
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
        }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX available.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn hmax(v: __m256) -> f32 {
        // SAFETY: AVX available.
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn dequantize_native(ty: crate::gguf::quants::GgmlType, data: &[u8], out: &mut [f32]) -> bool {
        // SAFETY: AVX2 and F16C available (trait contract).
        unsafe { quant::dequantize(ty, data, out) }
    }
    type Lut = (__m256, __m256);
    #[inline(always)]
    unsafe fn lut(t: &[f32; 16]) -> (__m256, __m256) {
        // SAFETY: `t` holds 16 f32.
        unsafe { (_mm256_loadu_ps(t.as_ptr()), _mm256_loadu_ps(t.as_ptr().add(8))) }
    }
    #[inline(always)]
    unsafe fn load_nf4(p: *const u8, (lo8, hi8): (__m256, __m256)) -> __m256 {
        // SAFETY: `p` valid for 4 bytes. Codes interleaved high-nibble-first, widened to 8
        // lanes; entries 0–7 and 8–15 each looked up by one permute, chosen by bit 3.
        unsafe {
            let b = _mm_cvtsi32_si128(p.cast::<i32>().read_unaligned());
            let m = _mm_set1_epi8(15);
            let codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16::<4>(b), m), _mm_and_si128(b, m));
            let idx = _mm256_cvtepu8_epi32(codes);
            let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo8, idx), _mm256_permutevar8x32_ps(hi8, idx), high)
        }
    }
}

/// AVX-512F (+BW for the bf16 widening), `__m512` (16 × f32); with `BF16_DOT`, BF16 weights go to
/// the AVX512-BF16 kernels of `bf16.rs` instead of being widened ([`Avx512Bf16`]).
pub(crate) struct Avx512Of<const BF16_DOT: bool>;

/// AVX-512F/BW, BF16 weights widened to f32 ([`super::Isa::Avx512`]).
pub(crate) type Avx512 = Avx512Of<false>;
/// AVX-512F/BW with AVX512-BF16: BF16 weights by `vdpbf16ps` ([`super::Isa::Avx512Bf16`]).
pub(crate) type Avx512Bf16 = Avx512Of<true>;

impl<const BF16_DOT: bool> Simd for Avx512Of<BF16_DOT> {
    type V = __m512;
    const LANES: usize = 16;
    // 12 rows × 32 tokens = 24 accumulators of the 32 zmm registers.
    const MR: usize = 12;
    const NV: usize = 2;
    #[inline(always)]
    unsafe fn zero() -> __m512 {
        // SAFETY: AVX-512F available (trait contract).
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_set1_ps(v) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: `p` valid for 16 f32; unaligned load.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        // SAFETY: `p` valid for 16 u16.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        // SAFETY: `p` valid for 16 u16; zero-extend and shift into the high half.
        unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())))) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: `p` valid for 16 f32 writes.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn div(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_div_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn round(a: __m512) -> __m512 {
        // SAFETY: AVX-512F available; round to integer (scale 0), nearest.
        unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    #[inline(always)]
    unsafe fn pow2i(n: __m512) -> __m512 {
        // SAFETY: AVX-512F available; (n + 127) << 23 is the f32 bit pattern of 2^n.
        unsafe {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
        }
    }
    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn hmax(v: __m512) -> f32 {
        // SAFETY: AVX-512F available.
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn dequantize_native(ty: crate::gguf::quants::GgmlType, data: &[u8], out: &mut [f32]) -> bool {
        // SAFETY: AVX2 and F16C available (trait contract).
        unsafe { quant::dequantize(ty, data, out) }
    }
    type Lut = __m512;
    #[inline(always)]
    unsafe fn lut(t: &[f32; 16]) -> __m512 {
        // SAFETY: `t` holds 16 f32.
        unsafe { _mm512_loadu_ps(t.as_ptr()) }
    }
    #[inline(always)]
    unsafe fn load_nf4(p: *const u8, lut: __m512) -> __m512 {
        // SAFETY: `p` valid for 8 bytes. Codes interleaved high-nibble-first, widened to 16
        // lanes, and one permute looks all 16 up.
        unsafe {
            let b = _mm_loadl_epi64(p.cast());
            let m = _mm_set1_epi8(15);
            let codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16::<4>(b), m), _mm_and_si128(b, m));
            _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lut)
        }
    }
    #[inline(always)]
    unsafe fn matvec_nf4_native(w: Nf4, cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) -> bool {
        // `nf4_strided` finds a lane's scale as block (8j) / bs of its 128-code chunk, which
        // holds when a block is 64 codes or a whole number of chunks (not 192: it straddles
        // chunks; such rows go to the generic kernel).
        if !(w.blocksize == 64 || w.blocksize.is_multiple_of(128)) {
            return false;
        }
        // SAFETY: AVX-512F/BW available (trait contract); shapes checked by the caller
        // (`simd_ok`: rows of whole blocks, so of whole 64-code groups).
        unsafe { nf4_strided(w, cols, rows, x, y) };
        true
    }
    #[inline(always)]
    unsafe fn matvec_nf4_native_multi(
        w: Nf4,
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) -> bool {
        if !(w.blocksize == 64 || w.blocksize.is_multiple_of(128)) {
            return false;
        }
        // SAFETY: as in `matvec_nf4_native`; `x` holds `n` tokens and `y` the caller's outputs.
        unsafe { nf4_strided_multi(w, cols, rows, x, n, y, ldy) };
        true
    }
    #[inline(always)]
    unsafe fn matvec_bf16_native(w: &[Bf16], cols: usize, rows: Range<usize>, x: &[f32], y: &mut [f32]) -> bool {
        if !BF16_DOT {
            return false;
        }
        // SAFETY: `BF16_DOT` types are only reached through `Isa::Avx512Bf16`'s entry points,
        // which run where the CPU has AVX512-BF16 (with AVX-512F/BW); shapes as the caller's.
        unsafe { bf16::matvec_rows(w, cols, rows, x, y) };
        true
    }
    #[inline(always)]
    unsafe fn matvec_bf16_native_multi(
        w: &[Bf16],
        cols: usize,
        rows: Range<usize>,
        x: &[f32],
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) -> bool {
        if !BF16_DOT {
            return false;
        }
        // SAFETY: as in `matvec_bf16_native`; `x` holds `n` tokens and `y` the caller's outputs.
        unsafe { bf16::matvec_rows_multi(w, cols, rows, x, n, y, ldy) };
        true
    }
    #[inline(always)]
    unsafe fn load_nf4_x4(p: *const u8, lut: __m512) -> [__m512; 4] {
        // SAFETY: `p` valid for 32 bytes. One load of 64 codes; the byte unpacks interleave
        // within 128-bit lanes: `lo` holds codes 0–15 | 32–47, `hi` codes 16–31 | 48–63.
        unsafe {
            let b = _mm256_loadu_si256(p.cast());
            let m = _mm256_set1_epi8(15);
            let (h, l) = (_mm256_and_si256(_mm256_srli_epi16::<4>(b), m), _mm256_and_si256(b, m));
            let (lo, hi) = (_mm256_unpacklo_epi8(h, l), _mm256_unpackhi_epi8(h, l));
            // (No closure here: it would keep the intrinsics from inlining.)
            [
                _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)), lut),
                _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)), lut),
                _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(lo)), lut),
                _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(hi)), lut),
            ]
        }
    }
}

/// Entry points compiled for AVX2 + FMA + F16C.
pub(crate) mod avx2 {
    super::simd_entries!(super::Avx2, "avx2,fma,f16c");
}

/// Entry points compiled for AVX-512F/BW (with AVX2/FMA/F16C, which every AVX-512 CPU has).
pub(crate) mod avx512 {
    super::simd_entries!(super::Avx512, "avx512f,avx512bw,avx2,fma,f16c");
}

/// The same with AVX512-BF16: every kernel as [`avx512`]'s but the BF16 matvecs (the BF16 GEMM,
/// which packs X its own way, is `bf16::matmul_rows`, called by `super::matmul_many_isa`).
pub(crate) mod avx512bf16 {
    super::simd_entries!(super::Avx512Bf16, "avx512f,avx512bw,avx512bf16,avx2,fma,f16c");
}
