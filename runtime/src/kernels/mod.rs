//! Numeric kernels of the forward pass.
//!
//! Each kernel has a plain scalar reference in [`scalar`]; SIMD versions (AVX2/FMA and
//! AVX-512 on x86-64, NEON on aarch64) are chosen at run time and tested against it.
//! Matrix kernels split output rows across the [`ThreadPool`].
//!
//! On CPUs with AVX512-BF16 ([`Isa::Avx512Bf16`]) BF16 weights take `vdpbf16ps`: the activations
//! are rounded to bf16 and the weights are never widened (`x86/bf16.rs`; its reference is
//! [`scalar::matvec_rows_bf16_dot`]). `PEFTRT_NO_BF16_DOT=1` in the environment keeps the widening
//! kernels of [`Isa::Avx512`] (read once, at the first kernel call).
//!
//! The instruction set is detected once ([`isa`]); every public kernel dispatches on it. The
//! SIMD kernels are written once over a small vector trait (`simd.rs`) and instantiated for
//! AVX2 and AVX-512 (`x86.rs`) and NEON (`neon.rs`).
//!
//! - [`matvec`] (decode) is memory-bound: it streams 4 weight rows at a time against one `x`.
//! - [`matmul`] (prefill) is compute-bound: X is packed into tiles of tokens, and a register
//!   tile of weight rows × tokens does outer-product FMAs; each weight row block is read from
//!   memory once per call and reused for all tokens.
//! - GGUF block-quantised weights ([`Quant`]) decode through integer dot products with `x`
//!   quantised to 8 bits once per call (`quant.rs`, llama.cpp's scheme); their prefill
//!   dequantises row groups into the f32 GEMM.
//!
//! One file of about 560 lines: the safe entry point of every kernel with the shape checks the
//! unsafe ones rely on, the instruction-set dispatch, and how the two matrix paths ([`Path`])
//! share rows out over the threads; the kernels themselves are in `simd.rs` (with
//! `simd/matmul.rs`), `x86.rs` (with `x86/nf4.rs`), `neon.rs` and `scalar.rs`; the quantised
//! decode kernels in `quant.rs` (with `quant/dot.rs`, `x86/quant.rs`, `neon/quant.rs`).

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod quant;
pub mod scalar;
pub(crate) mod simd;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use crate::gguf::quants::{self, GgmlType};
use crate::threadpool::{split_range, SharedMut, ThreadPool};
use half::{bf16, f16};
use std::sync::OnceLock;

/// Row-major weight data, borrowed (usually from the memory map).
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// 4-bit NormalFloat codes with per-block scales (bitsandbytes' layout).
    Nf4(Nf4<'a>),
    /// ggml block-quantised data (a GGUF tensor used in place).
    Quant(Quant<'a>),
}

/// A GGUF tensor in one of ggml's block layouts (`Q4_0`, `Q8_0`, `Q4_K`, …), borrowed from the
/// memory map: element `i` (row-major) is in block `i / ty.block_size()`, whose
/// `ty.type_size()` bytes start at `data[(i / block_size) * type_size]`. Rows hold whole
/// blocks (`cols` a multiple of the block size), checked when the model is loaded.
#[derive(Clone, Copy, Debug)]
pub struct Quant<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    /// Number of elements.
    pub len: usize,
}

impl Quant<'_> {
    /// The bytes of the `len` elements from `start` (both multiples of the block size).
    #[inline(always)]
    pub fn blocks(&self, start: usize, len: usize) -> &[u8] {
        let (bs, ts) = (self.ty.block_size(), self.ty.type_size());
        debug_assert!(start.is_multiple_of(bs) && len.is_multiple_of(bs));
        &self.data[start / bs * ts..(start + len) / bs * ts]
    }

    /// Dequantises whole blocks (`start`, `out.len()` multiples of the block size): ggml's
    /// `dequantize_row_*` exactly ([`crate::gguf::quants`]).
    pub fn dequantize(&self, start: usize, out: &mut [f32]) {
        // The type and the byte count were checked when the model was loaded.
        let r = quants::dequantize(self.ty, self.blocks(start, out.len()), out);
        debug_assert!(r.is_ok(), "{r:?}");
    }

    /// Whether `ty` is a type the kernels take: one with a ggml dequantiser.
    pub fn supports(ty: GgmlType) -> bool {
        ty.can_dequantize()
    }
}

/// 4-bit weights as bitsandbytes stores them: element `i` (row-major) is
/// `table[code(i)] · absmax[i / blocksize]`, with `code(i)` the high nibble of `packed[i / 2]`
/// for even `i` and the low nibble for odd `i`.
#[derive(Clone, Copy, Debug)]
pub struct Nf4<'a> {
    pub packed: &'a [u8],
    /// One scale per block of `blocksize` consecutive elements (already de-double-quantised).
    pub absmax: &'a [f32],
    pub blocksize: usize,
    /// The value of each code (bitsandbytes' `quant_map`).
    pub table: &'a [f32; 16],
    /// Number of elements.
    pub len: usize,
}

impl Nf4<'_> {
    /// The 4-bit code of element `i`.
    #[inline(always)]
    pub fn code(&self, i: usize) -> usize {
        let b = self.packed[i / 2];
        usize::from(if i & 1 == 0 { b >> 4 } else { b & 15 })
    }

    /// Element `i`, dequantised (bitsandbytes' `code[q] * absmax`, in f32).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        self.table[self.code(i)] * self.absmax[i / self.blocksize]
    }

    /// Whether the SIMD kernels can take rows of `cols` elements: whole blocks per row, and
    /// blocks made of whole 32-element groups.
    pub(crate) fn simd_ok(&self, cols: usize) -> bool {
        self.blocksize.is_multiple_of(32) && cols.is_multiple_of(self.blocksize)
    }
}

impl Weights<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
            Weights::Nf4(w) => w.len,
            Weights::Quant(w) => w.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the data backs the first `n` elements: `len() >= n`, and for NF4 also the codes
    /// (`packed`) and scales (`absmax`) behind them, which the SIMD kernels read through raw
    /// pointers. [`Nf4`]'s fields are public, so a caller can claim a `len` they do not hold.
    fn backs(&self, n: usize) -> bool {
        match self {
            Weights::Nf4(w) => {
                w.len >= n
                    && w.packed.len() >= n.div_ceil(2)
                    && (n == 0 || (w.blocksize > 0 && w.absmax.len() >= n.div_ceil(w.blocksize)))
            }
            Weights::Quant(w) => {
                let bs = w.ty.block_size();
                w.len >= n && n.is_multiple_of(bs) && w.data.len() >= n / bs * w.ty.type_size()
            }
            _ => self.len() >= n,
        }
    }

    /// Copies elements `start..start + out.len()` into `out` as f32.
    pub fn to_f32(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Weights::F32(w) => out.copy_from_slice(&w[start..end]),
            Weights::F16(w) => w[start..end].iter().zip(out).for_each(|(s, d)| *d = s.to_f32()),
            Weights::BF16(w) => w[start..end].iter().zip(out).for_each(|(s, d)| *d = s.to_f32()),
            Weights::Nf4(w) => (start..end).zip(out).for_each(|(i, d)| *d = w.get(i)),
            Weights::Quant(w) => {
                // Whole blocks around the range, one at a time.
                let bs = w.ty.block_size();
                let mut block = [0f32; quants::MAX_BLOCK];
                let mut i = start;
                while i < end {
                    let b0 = i / bs * bs;
                    w.dequantize(b0, &mut block[..bs]);
                    let take = (b0 + bs).min(end) - i;
                    out[i - start..i - start + take].copy_from_slice(&block[i - b0..i - b0 + take]);
                    i += take;
                }
            }
        }
    }
}

/// A row-major matrix `[rows, cols]`: a linear layer's weight (`out_features`, `in_features`).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub w: Weights<'a>,
    pub rows: usize,
    pub cols: usize,
}

/// The instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512F/BW (+ AVX2, FMA, F16C).
    Avx512,
    /// [`Isa::Avx512`] with AVX512-BF16: BF16 weights by `vdpbf16ps`, the activations rounded to
    /// bf16 ([`scalar::matvec_rows_bf16_dot`] is the reference); all else as [`Isa::Avx512`].
    /// Detected unless the environment sets `PEFTRT_NO_BF16_DOT=1`.
    Avx512Bf16,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Isa {
    /// The best instruction set this CPU supports ([`Isa::Avx512`], not [`Isa::Avx512Bf16`], when
    /// the environment sets `PEFTRT_NO_BF16_DOT` to anything but `0` or nothing).
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                let no_bf16_dot = std::env::var("PEFTRT_NO_BF16_DOT").is_ok_and(|v| !v.is_empty() && v != "0");
                if is_x86_feature_detected!("avx512bf16") && !no_bf16_dot {
                    return Isa::Avx512Bf16;
                }
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                return Isa::Neon;
            }
        }
        Isa::Scalar
    }

    /// Every instruction set usable here, scalar first and the best last (for tests and
    /// benchmarks).
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    /// Whether the kernels can run with this instruction set on this CPU: scalar, the best one
    /// ([`isa`]), AVX2 where AVX-512 is (every AVX-512 CPU has AVX2, FMA and F16C), and AVX-512
    /// where AVX512-BF16 is. With `PEFTRT_NO_BF16_DOT=1`, [`Isa::Avx512Bf16`] is not available.
    pub fn is_available(self) -> bool {
        let best = isa();
        self == Isa::Scalar
            || self == best
            || (self == Isa::Avx2 && matches!(best, Isa::Avx512 | Isa::Avx512Bf16))
            || (self == Isa::Avx512 && best == Isa::Avx512Bf16)
    }

    /// Whether BF16 weights take native bf16 dot products with this instruction set, the
    /// activations rounded to bf16 ([`scalar::matvec_rows_bf16_dot`]), rather than being widened
    /// to f32 ([`scalar::matvec_rows`]).
    pub fn bf16_dot(self) -> bool {
        self == Isa::Avx512Bf16
    }
}

/// The instruction set the kernels use, detected on first call and cached.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(Isa::detect)
}

/// Calls the `$f` entry point of the instruction set `$isa`, or `$scalar` for [`Isa::Scalar`].
///
/// `Isa` is a public enum, so a value of it says nothing about the CPU: every `$isa` given here
/// is [`isa()`] (detected), checked with [`Isa::is_available`] (`matmul_many_isa`, the public
/// entry that takes one), or, in the crate-internal `*_isa` functions, one of
/// [`Isa::available`] (their only other callers are the tests).
macro_rules! dispatch {
    ($isa:expr, $f:ident($($arg:expr),*), $scalar:expr) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `$isa` is available (see above): the CPU has AVX-512F/BW, AVX2, FMA, F16C.
            // The kernel's other preconditions are the shape checks its caller made.
            Isa::Avx512 => unsafe { x86::avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `$isa` is available (see above): as `Avx512`, and the CPU has AVX512-BF16.
            Isa::Avx512Bf16 => unsafe { x86::avx512bf16::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `$isa` is available (see above): the CPU has AVX2, FMA and F16C.
            Isa::Avx2 => unsafe { x86::avx2::$f($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: `$isa` is available (see above): the CPU has NEON.
            Isa::Neon => unsafe { neon::entries::$f($($arg),*) },
            _ => $scalar,
        }
    };
}

/// Panics with a clear message when a kernel is called with inconsistent shapes (a bug in the
/// caller); the SIMD kernels rely on these checks for memory safety (they are `assert!`s, kept
/// in release builds): the weights back `rows × cols` elements (NF4: codes and scales too),
/// `x` is `[n, cols]` and `y` `[n, rows]`, none of the products overflowing.
fn check_mat(m: &MatRef, x_len: usize, n: usize, y_len: usize) {
    assert!(
        m.rows.checked_mul(m.cols).is_some_and(|len| m.w.len() >= len),
        "weights hold {} elements, shape needs {}x{}",
        m.w.len(),
        m.rows,
        m.cols
    );
    if let Weights::Quant(w) = &m.w {
        assert!(
            m.cols.is_multiple_of(w.ty.block_size()) && m.w.backs(m.rows * m.cols),
            "{} weights: {} bytes do not back {}x{} elements in whole blocks per row",
            w.ty,
            w.data.len(),
            m.rows,
            m.cols
        );
    }
    if let Weights::Nf4(w) = &m.w {
        assert!(
            m.w.backs(m.rows * m.cols),
            "NF4 weights: {} code bytes and {} scales (blocksize {}) do not back {}x{} elements",
            w.packed.len(),
            w.absmax.len(),
            w.blocksize,
            m.rows,
            m.cols
        );
    }
    assert!(n.checked_mul(m.cols) == Some(x_len), "x has {x_len} elements, expected {n}x{}", m.cols);
    assert!(n.checked_mul(m.rows) == Some(y_len), "y has {y_len} elements, expected {n}x{}", m.rows);
}

/// `y[j] = W[rows.start + j, :] · x` with instruction set `isa` (single-threaded building block;
/// `isa` one of [`Isa::available`]).
///
/// The `assert!` is what the SIMD `matvec_rows` kernels rely on for memory safety, in release
/// builds too: the rows lie inside the matrix, the weights back the whole matrix (NF4: codes
/// and scales too), `x` holds a row's `cols` and `y` one value per row.
pub(crate) fn matvec_rows_isa(isa: Isa, m: MatRef, rows: std::ops::Range<usize>, x: &[f32], y: &mut [f32]) {
    assert!(
        rows.end <= m.rows
            && y.len() >= rows.len()
            && x.len() >= m.cols
            && m.rows.checked_mul(m.cols).is_some_and(|len| m.w.backs(len))
    );
    if let Weights::Quant(w) = m.w {
        if isa != Isa::Scalar && quant::has_kernel(w.ty) && m.cols.is_multiple_of(w.ty.block_size()) {
            // The rows as a matrix of their own, so that row `j` is written at `y[j]`.
            let row_bytes = m.cols / w.ty.block_size() * w.ty.type_size();
            let data = &w.data[rows.start * row_bytes..rows.end * row_bytes];
            let w = Quant { data, len: rows.len() * m.cols, ..w };
            return quant::with_quantized(false, &x[..m.cols], |xq| {
                // SAFETY: `isa` is one of `Isa::available` (this function's contract) and
                // `has_kernel(w.ty)`; `data` holds the whole blocks of `rows.len()` rows of
                // `m.cols` (sliced with bounds checks); `xq` is `x` quantised; `y` holds
                // `rows.len()` values (asserted above).
                unsafe { quant::rows_multi_isa(isa, w, m.cols, 0..rows.len(), xq, 1, y.as_mut_ptr(), 0) }
            });
        }
    }
    dispatch!(isa, matvec_rows(m, rows.clone(), x, y), scalar::matvec_rows(m, rows, x, y))
}

/// `y[r] = Σ_k W[r, k] · x[k]`: one token through a linear layer (decode).
///
/// `x` is `[cols]`, `y` is `[rows]`.
///
/// # Panics
/// If the slice lengths do not match the shape.
pub fn matvec(pool: &ThreadPool, m: MatRef, x: &[f32], y: &mut [f32]) {
    matvec_isa(isa(), pool, m, x, y)
}

/// [`matvec`] with an explicit instruction set (tests, benchmarks).
///
/// # Panics
/// As [`matvec`], and if `isa` is not [available](Isa::is_available) on this CPU.
pub fn matvec_isa(isa: Isa, pool: &ThreadPool, m: MatRef, x: &[f32], y: &mut [f32]) {
    matmul_many_isa(isa, pool, &[m], x, 1, &mut [y])
}

/// The most matrices one [`matmul_many`] call takes.
pub const MAX_MANY: usize = 12;

/// Rows of up to [`MAX_MANY`] matrices handed out in chunks on demand (one atomic counter),
/// about 4 per thread and matrix: a thread that was descheduled (a busy machine, or a slow
/// core on big.LITTLE) does less, instead of every other thread waiting for its fixed share.
struct RowChunks {
    rows: [usize; MAX_MANY],
    chunk: [usize; MAX_MANY],
    count: [usize; MAX_MANY],
    next: std::sync::atomic::AtomicUsize,
}

impl RowChunks {
    fn new(ms: &[MatRef], threads: usize, align: usize) -> Self {
        let mut c = RowChunks { rows: [0; MAX_MANY], chunk: [1; MAX_MANY], count: [0; MAX_MANY], next: 0.into() };
        for (i, m) in ms.iter().enumerate() {
            c.rows[i] = m.rows;
            c.chunk[i] = m.rows.div_ceil(4 * threads).div_ceil(align).max(1) * align;
            c.count[i] = m.rows.div_ceil(c.chunk[i]);
        }
        c
    }

    /// The next `(matrix, rows)` to compute, or `None` when all are handed out.
    fn next(&self) -> Option<(usize, std::ops::Range<usize>)> {
        let mut c = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..MAX_MANY {
            if c < self.count[i] {
                let start = c * self.chunk[i];
                return Some((i, start..(start + self.chunk[i]).min(self.rows[i])));
            }
            c -= self.count[i];
        }
        None
    }
}

/// Sizes every thread's decode scratch for matrices of up to `max_cols` columns, on each of
/// the pool's threads: called when a session is built, so that decoding allocates nothing even
/// when a thread first meets the widest matrix late (rows are shared out dynamically).
pub fn reserve_decode_scratch(pool: &ThreadPool, max_cols: usize) {
    #[cfg(target_arch = "x86_64")]
    pool.run(|_, _| {
        x86::reserve_strided(max_cols);
        if isa().bf16_dot() {
            x86::bf16::reserve(max_cols);
        }
    });
    pool.run(|_, _| quant::reserve(max_cols));
    quant::reserve(max_cols);
}

thread_local! {
    /// The caller's scratch for X packed into token tiles (grows once, then reused).
    static PACKED_X: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The same as bf16 pairs, for BF16 weights with [`Isa::Avx512Bf16`] (`x86::bf16::pack_x`).
    static PACKED_X_BF16: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `Y[t, r] = Σ_k W[r, k] · X[t, k]`: `n` tokens through a linear layer (prefill).
///
/// `x` is `[n, cols]`, `y` is `[n, rows]`.
///
/// # Panics
/// If the slice lengths do not match the shape.
pub fn matmul(pool: &ThreadPool, m: MatRef, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_isa(isa(), pool, m, x, n, y)
}

/// [`matmul`] with an explicit instruction set (tests, benchmarks).
///
/// # Panics
/// As [`matmul`], and if `isa` is not [available](Isa::is_available) on this CPU.
pub fn matmul_isa(isa: Isa, pool: &ThreadPool, m: MatRef, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_many_isa(isa, pool, &[m], x, n, &mut [y])
}

/// Several linear layers on the same input (q/k/v; gate/up): `ys[i] = X · msᵢᵀ`, with X packed
/// once and all rows of all matrices shared out in one parallel job.
///
/// # Panics
/// If more than [`MAX_MANY`] matrices are given, or a slice length does not match its shape.
pub fn matmul_many(pool: &ThreadPool, ms: &[MatRef], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    matmul_many_isa(isa(), pool, ms, x, n, ys)
}

/// How a matrix product sums: each token's row of Y as a dot product per output (the decode
/// kernel, [`matvec`]) or through the tiled GEMM (the prefill kernel, [`matmul`]). Each sums in
/// its own order, so their results differ in the last bits; within one path, a token's outputs do
/// not depend on which or how many other tokens share the call. [`matmul_many`] takes `Dot` for
/// one token and `Tiled` for more; the batching engine picks per token what a lone session would
/// have used, so that both give the same answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Dot,
    Tiled,
}

impl Path {
    /// The path [`matmul_many`] takes for `n` tokens.
    pub fn for_tokens(n: usize) -> Path {
        if n == 1 {
            Path::Dot
        } else {
            Path::Tiled
        }
    }
}

/// [`matmul_many`] along a given [`Path`] whatever the number of tokens.
///
/// # Panics
/// As [`matmul_many`].
pub fn matmul_many_path(pool: &ThreadPool, ms: &[MatRef], x: &[f32], n: usize, ys: &mut [&mut [f32]], path: Path) {
    matmul_many_isa_path(isa(), pool, ms, x, n, ys, path)
}

/// [`matmul_many`] with an explicit instruction set.
///
/// # Panics
/// As [`matmul_many`], and if `isa` is not [available](Isa::is_available) on this CPU.
pub fn matmul_many_isa(isa: Isa, pool: &ThreadPool, ms: &[MatRef], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    matmul_many_isa_path(isa, pool, ms, x, n, ys, Path::for_tokens(n))
}

fn matmul_many_isa_path(
    isa: Isa,
    pool: &ThreadPool,
    ms: &[MatRef],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
    path: Path,
) {
    assert!(isa.is_available(), "matmul_many: {isa:?} is not available on this CPU ({:?} is)", crate::kernels::isa());
    assert!(ms.len() <= MAX_MANY && ms.len() == ys.len(), "matmul_many: {} matrices, {} outputs", ms.len(), ys.len());
    let mut outs = [SharedMut(std::ptr::null_mut()); MAX_MANY];
    for ((m, y), o) in ms.iter().zip(ys.iter_mut()).zip(outs.iter_mut()) {
        check_mat(m, x.len(), n, y.len());
        *o = SharedMut::new(y);
    }
    let (tile_tokens, mr) = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => (x86::avx512::TILE_TOKENS, <x86::Avx512 as simd::Simd>::MR),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 => (x86::avx512bf16::TILE_TOKENS, <x86::Avx512Bf16 as simd::Simd>::MR),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => (x86::avx2::TILE_TOKENS, <x86::Avx2 as simd::Simd>::MR),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => (neon::entries::TILE_TOKENS, <neon::Neon as simd::Simd>::MR),
        _ => (0, 1),
    };
    if n == 0 {
        return;
    }
    if path == Path::Dot || tile_tokens == 0 {
        // One token (decode), or no SIMD: row-by-row dot products. Block-quantised weights with
        // integer kernels take `x` quantised to 8 bits, once for all matrices and rows.
        let int_dot = |m: &MatRef| isa != Isa::Scalar && matches!(m.w, Weights::Quant(w) if quant::has_kernel(w.ty));
        let xq_needed = ms.iter().any(int_dot);
        let chunks = RowChunks::new(ms, pool.n_threads(), 16);
        let job = |xq: &[quant::QBlock]| {
            pool.run(|_, _| {
                while let Some((i, rows)) = chunks.next() {
                    let m = ms[i];
                    if let (true, Weights::Quant(w)) = (int_dot(&m), m.w) {
                        // SAFETY: `isa` is available (asserted above) and `has_kernel(w.ty)`; the
                        // chunk's rows lie inside the matrix, whose blocks `w.data` backs and whose
                        // rows hold whole blocks (`check_mat`); `xq` is all `n` tokens of `x`
                        // quantised; the chunk's elements of every token row of `ys[i]` are ours.
                        unsafe { quant::rows_multi_isa(isa, w, m.cols, rows, xq, n, outs[i].ptr(), m.rows) }
                    } else if n == 1 || isa == Isa::Scalar {
                        for t in 0..n {
                            // SAFETY: each chunk of rows goes to exactly one thread and lies inside `ys[i]`.
                            let y = unsafe { outs[i].slice(t * m.rows + rows.start..t * m.rows + rows.end) };
                            matvec_rows_isa(isa, m, rows.clone(), &x[t * m.cols..(t + 1) * m.cols], y);
                        }
                    } else {
                        // SAFETY: `isa` is available (asserted above); the chunk's rows lie inside
                        // the matrix, `x` is `[n, m.cols]` and `ys[i]` `[n, m.rows]` (`check_mat`);
                        // the chunk's elements of every token row are this thread's alone.
                        dispatch!(isa, matvec_rows_multi(m, rows, x, n, outs[i].ptr(), m.rows), unreachable!())
                    }
                }
            })
        };
        if xq_needed {
            quant::with_quantized(true, x, job);
        } else {
            job(&[]);
        }
        return;
    }
    // BF16 matrices with AVX512-BF16 read X packed as bf16 pairs (`x86::bf16`), the others as f32.
    let bf16_dot = |m: &MatRef| isa.bf16_dot() && matches!(m.w, Weights::BF16(_));
    let (want_f32, want_pairs) = (!ms.iter().all(bf16_dot), ms.iter().any(bf16_dot));
    #[cfg(target_arch = "x86_64")]
    debug_assert_eq!(x86::bf16::TILE_TOKENS, tile_tokens);
    PACKED_X.with(|packed| {
        PACKED_X_BF16.with(|packed_bf16| {
            let (mut packed, mut packed_bf16) = (packed.borrow_mut(), packed_bf16.borrow_mut());
            let k = ms[0].cols;
            let tiles = n.div_ceil(tile_tokens);
            let len = if want_f32 { tiles * k * tile_tokens } else { 0 };
            let len_bf16 = if want_pairs { tiles * k.div_ceil(2) * tile_tokens } else { 0 };
            if packed.len() < len {
                packed.resize(len, 0.0);
            }
            if packed_bf16.len() < len_bf16 {
                packed_bf16.resize(len_bf16, 0);
            }
            // Packing is a transpose of all of X: the threads share it out by columns (pairs).
            let dst = SharedMut::new(&mut packed[..len]);
            let dst_bf16 = SharedMut::new(&mut packed_bf16[..len_bf16]);
            pool.run(|ti, nt| {
                if want_f32 {
                    // SAFETY: each thread packs its own columns (`split_range` of `0..k`) into
                    // `packed`, which holds `len` floats, the size `pack_x` writes for `n` tokens of
                    // `x` (`[n, k]`, checked by `check_mat` for every matrix, so all have `k`
                    // columns).
                    unsafe { simd::pack_x(x, n, k, tile_tokens, split_range(k, ti, nt, 1), dst.ptr()) }
                }
                #[cfg(target_arch = "x86_64")]
                if want_pairs {
                    // SAFETY: as above, each thread its own pairs of columns, `len_bf16` u32 being
                    // what `bf16::pack_x` writes for `n` tokens of `k` columns.
                    unsafe { x86::bf16::pack_x(x, n, k, split_range(k.div_ceil(2), ti, nt, 1), dst_bf16.ptr()) }
                }
            });
            let (xp, xp_bf16): (&[f32], &[u32]) = (&packed[..len], &packed_bf16[..len_bf16]);
            // Only x86-64 has bf16 pairs to pack and read (`want_pairs` is false elsewhere).
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (&dst_bf16, xp_bf16, want_pairs);
            let chunks = RowChunks::new(ms, pool.n_threads(), mr);
            pool.run(|_, _| {
                while let Some((i, rows)) = chunks.next() {
                    let m = ms[i];
                    match m.w {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `isa` is available (asserted above) and has AVX512-BF16; the chunk's
                        // rows lie inside the matrix, whose weights back `m.rows × m.cols` (`check_mat`);
                        // `xp_bf16` is `x` packed by `bf16::pack_x`; `ys[i]` is `[n, m.rows]` and the
                        // chunk's elements of it are this thread's alone.
                        Weights::BF16(w) if isa.bf16_dot() => unsafe {
                            x86::bf16::matmul_rows(w, m.cols, rows, xp_bf16, n, outs[i].ptr(), m.rows)
                        },
                        // SAFETY: `isa` is available (asserted above); each chunk of rows (inside
                        // `0..m.rows`) goes to one thread; `ys[i]` is `[n, m.rows]` and the weights
                        // back `m.rows × m.cols` elements (`check_mat`); `xp` is `x` packed for this
                        // `isa`'s `tile_tokens`.
                        _ => dispatch!(isa, matmul_rows(m, rows, xp, n, outs[i].ptr(), m.rows), unreachable!()),
                    }
                }
            });
        })
    });
}

/// `out = x / rms(x) * w`, with `rms(x) = sqrt(mean(x²) + eps)` (Llama's RMSNorm).
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    rmsnorm_isa(isa(), out, x, w, eps)
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    softmax_isa(isa(), x)
}

/// `gate = silu(gate) · up` (SwiGLU).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_isa(isa(), gate, up)
}

/// `gate = act(gate) · up` for a gated MLP's activation (SwiGLU, GeGLU): SiLU has SIMD
/// versions; the GELUs, which no model peftrt ships today uses, run the scalar reference.
pub fn act_mul(act: crate::config::Activation, gate: &mut [f32], up: &[f32]) {
    use crate::config::Activation;
    match act {
        Activation::Silu => silu_mul(gate, up),
        Activation::Gelu => scalar::gelu_mul(gate, up),
        Activation::GeluTanh => scalar::gelu_tanh_mul(gate, up),
    }
}

/// `Σ a[i] · b[i]`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_isa(isa(), a, b)
}

/// `y += a · x`.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_isa(isa(), y, a, x)
}

/// `y = Σ_j p[j] · v[j]`, the rows `v[j]` of `y.len()` elements (attention: probabilities
/// times values), with one dispatch for all rows.
///
/// # Panics
/// If `v` holds fewer than `p.len()` rows.
pub fn weighted_sum(y: &mut [f32], p: &[f32], v: &[f32]) {
    weighted_sum_isa(isa(), y, p, v)
}

/// A LoRA up-projection `Y = U · B` with `B` stored transposed (`bt`, `[rank, out]`), for the `n` tokens of `u` (`[n, rank]`), on the calling thread. Each
/// output is `rank` fused multiply-adds in ascending `k` ([`scalar::lowrank_up`]): the same bits
/// whatever the instruction set, the token count and however the columns are shared out, so a
/// token's result never depends on its batch.
///
/// # Panics
/// If the slice lengths do not match the shapes.
pub fn lowrank_up(bt: Weights, rank: usize, u: &[f32], n: usize, y: &mut [f32]) {
    let out = bt.len() / rank.max(1);
    check_lowrank(bt, rank, out, u, n, y.len());
    // SAFETY: shapes checked; `y` is ours alone.
    unsafe { lowrank_up_isa(isa(), bt, rank, out, u, n, 0..out, y.as_mut_ptr()) }
}

/// [`lowrank_up`] for several products at once, their columns shared out over the pool:
/// `(bt, rank, u, y)` each, all for `n` tokens.
///
/// # Panics
/// As [`lowrank_up`], for each product.
pub fn lowrank_up_many(pool: &ThreadPool, n: usize, products: &mut [(Weights, usize, &[f32], &mut [f32])]) {
    let isa = isa();
    let mut outs = [(SharedMut(std::ptr::null_mut()), 0usize); MAX_MANY];
    assert!(products.len() <= MAX_MANY, "lowrank_up_many: {} products", products.len());
    for ((bt, rank, u, y), o) in products.iter_mut().zip(outs.iter_mut()) {
        let out = bt.len() / (*rank).max(1);
        check_lowrank(*bt, *rank, out, u, n, y.len());
        *o = (SharedMut::new(y), out);
    }
    let total: usize = outs[..products.len()].iter().map(|o| o.1).sum();
    // Columns in whole 16-lane groups (no two threads share a cache line of `y` in the middle).
    let products = &*products;
    pool.run(|ti, nt| {
        let mine = split_range(total, ti, nt, 16);
        let mut first = 0;
        for ((bt, rank, u, _), (y, out)) in products.iter().zip(&outs) {
            let cols = mine.start.clamp(first, first + out) - first..mine.end.clamp(first, first + out) - first;
            if !cols.is_empty() {
                // SAFETY: shapes checked above; each column of each `y` lies in exactly one
                // thread's range.
                unsafe { lowrank_up_isa(isa, *bt, *rank, *out, u, n, cols, y.ptr()) }
            }
            first += out;
        }
    });
}

fn check_lowrank(bt: Weights, rank: usize, out: usize, u: &[f32], n: usize, y_len: usize) {
    assert!(
        matches!(bt, Weights::F32(_) | Weights::F16(_) | Weights::BF16(_)),
        "lowrank_up: low-rank factors are f32, f16 or bf16"
    );
    assert!(
        rank > 0 && bt.len() == rank * out && u.len() == n * rank && y_len == n * out,
        "lowrank_up: Bᵀ of {} values for rank {rank} × {out} outputs, {} values of U for {n} tokens, {y_len} of Y",
        bt.len(),
        u.len()
    );
}

/// # Safety
/// `isa` available; shapes as [`check_lowrank`] checks them; `cols ⊆ 0..out`; `y` valid for
/// writes of those columns of `n` token rows of `out`, which no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn lowrank_up_isa(
    isa: Isa,
    bt: Weights,
    rank: usize,
    out: usize,
    u: &[f32],
    n: usize,
    cols: std::ops::Range<usize>,
    y: *mut f32,
) {
    debug_assert!(cols.end <= out && bt.len() >= rank * out && u.len() >= n * rank);
    dispatch!(isa, lowrank_up(bt, rank, out, u, n, cols, y), {
        for t in 0..n {
            for c in cols.clone() {
                let v = scalar::lowrank_up_one(bt, rank, out, &u[t * rank..(t + 1) * rank], c);
                // SAFETY: the caller's contract (`t < n`, `c < out`).
                unsafe { *y.add(t * out + c) = v };
            }
        }
    })
}

/// `y = W · x` on the calling thread alone (small matrices inside an already parallel job,
/// e.g. attention scores `K · q`).
///
/// # Panics
/// If the slice lengths do not match the shape.
pub fn matvec_local(m: MatRef, x: &[f32], y: &mut [f32]) {
    check_mat(&m, x.len(), 1, y.len());
    matvec_rows_isa(isa(), m, 0..m.rows, x, y)
}

/// `y += x`.
pub fn add(y: &mut [f32], x: &[f32]) {
    add_isa(isa(), y, x)
}

pub(crate) fn rmsnorm_isa(isa: Isa, out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    dispatch!(isa, rmsnorm(out, x, w, eps), scalar::rmsnorm(out, x, w, eps))
}

pub(crate) fn softmax_isa(isa: Isa, x: &mut [f32]) {
    dispatch!(isa, softmax(x), scalar::softmax(x))
}

pub(crate) fn silu_mul_isa(isa: Isa, gate: &mut [f32], up: &[f32]) {
    dispatch!(isa, silu_mul(gate, up), scalar::silu_mul(gate, up))
}

pub(crate) fn dot_isa(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    dispatch!(isa, dot(a, b), scalar::dot(a, b))
}

pub(crate) fn axpy_isa(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) {
    dispatch!(isa, axpy(y, a, x), scalar::axpy(y, a, x))
}

pub(crate) fn weighted_sum_isa(isa: Isa, y: &mut [f32], p: &[f32], v: &[f32]) {
    assert!(
        v.len() >= p.len() * y.len(),
        "weighted_sum: {} rows of {} need {} values, got {}",
        p.len(),
        y.len(),
        p.len() * y.len(),
        v.len()
    );
    dispatch!(isa, weighted_sum(y, p, v), scalar::weighted_sum(y, p, v))
}

pub(crate) fn add_isa(isa: Isa, y: &mut [f32], x: &[f32]) {
    dispatch!(isa, add(y, x), scalar::add(y, x))
}
