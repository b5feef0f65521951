//! Every SIMD kernel against its scalar reference, and the scalar reference against f64.
//!
//! Error budget for reductions of length K: |got − want| ≤ 1e-5 · Σ|w_k · x_k| (f32 summation
//! in any order stays well inside this for K ≤ 8192: the typical error grows like √K · 2^-24).
//! Element-wise kernels: relative 1e-5 plus an absolute 1e-30 floor.
//!
//! BF16 weights on [`Isa::Avx512Bf16`] multiply `x` rounded to bf16: their reference is
//! [`scalar::matvec_rows_bf16_dot`], and the f64 sums they are held to use that rounded `x`
//! ([`x_seen`]); the same budget applies. `bf16_dot_*` below states how far that is from the f32 path.

use super::*;
use crate::threadpool::ThreadPool;

/// xorshift64*: deterministic test data in [-1, 1).
struct Rng(u64);
impl Rng {
    fn f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        v as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

const REL: f64 = 1e-5;

/// Weight storage of all three dtypes holding the same (f16/bf16-rounded) values.
struct AllDtypes {
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
}

impl AllDtypes {
    fn new(v: &[f32]) -> Self {
        AllDtypes {
            f32: v.to_vec(),
            f16: v.iter().map(|&x| f16::from_f32(x)).collect(),
            bf16: v.iter().map(|&x| bf16::from_f32(x)).collect(),
        }
    }
    /// The three views, each starting at element `offset` (to test unaligned data).
    fn views(&self, offset: usize) -> [Weights<'_>; 3] {
        [Weights::F32(&self.f32[offset..]), Weights::F16(&self.f16[offset..]), Weights::BF16(&self.bf16[offset..])]
    }
}

fn weight(w: &Weights, i: usize) -> f64 {
    match w {
        Weights::F32(w) => w[i] as f64,
        Weights::F16(w) => w[i].to_f64(),
        Weights::BF16(w) => w[i].to_f64(),
        Weights::Nf4(w) => w.get(i) as f64,
        Weights::Quant(_) => {
            let mut v = [0f32];
            w.to_f32(i, &mut v);
            v[0] as f64
        }
    }
}

/// f64 dot of row `r` with `x`, and Σ|w·x| (the error scale).
fn row_f64(m: &MatRef, r: usize, x: &[f32]) -> (f64, f64) {
    (0..m.cols).fold((0.0, 0.0), |(s, a), k| {
        let p = weight(&m.w, r * m.cols + k) * x[k] as f64;
        (s + p, a + p.abs())
    })
}

/// `x` as the kernels of `isa` see it for weights `w`: rounded to bf16 for BF16 weights with
/// native bf16 dot products, else as it is.
fn x_seen(isa: Isa, w: &Weights, x: &[f32]) -> Vec<f32> {
    if isa.bf16_dot() && matches!(w, Weights::BF16(_)) {
        x.iter().map(|&v| f32::from_bits(u32::from(scalar::round_bf16(v)) << 16)).collect()
    } else {
        x.to_vec()
    }
}

/// The scalar reference of `isa`'s matvec on `m`.
fn reference_rows(isa: Isa, m: MatRef, rows: std::ops::Range<usize>, x: &[f32], y: &mut [f32]) {
    match m.w {
        Weights::BF16(w) if isa.bf16_dot() => scalar::matvec_rows_bf16_dot(w, m.cols, rows, x, y),
        _ => scalar::matvec_rows(m, rows, x, y),
    }
}

fn assert_close(got: f32, want: f64, scale: f64, what: &str) {
    let err = (got as f64 - want).abs();
    assert!(err <= REL * scale + 1e-30, "{what}: got {got}, want {want}, err {err:e}, scale {scale:e}");
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (3, 15),
    (4, 16),
    (5, 17),
    (7, 31),
    (8, 32),
    (9, 33),
    (13, 64),
    (16, 100),
    (17, 129),
    (33, 255),
    (40, 576),
    (37, 1000),
];

#[test]
fn scalar_matvec_matches_f64() {
    let mut rng = Rng(1);
    for &(rows, cols) in SHAPES.iter().chain(&[(4, 4096), (2, 8191)]) {
        let data = AllDtypes::new(&rng.vec(rows * cols));
        let x = rng.vec(cols);
        for m in data.views(0).map(|w| MatRef { w, rows, cols }) {
            let mut y = vec![0.0; rows];
            scalar::matvec_rows(m, 0..rows, &x, &mut y);
            for (r, &got) in y.iter().enumerate() {
                let (want, scale) = row_f64(&m, r, &x);
                assert_close(got, want, scale, &format!("scalar {rows}x{cols} row {r}"));
            }
        }
    }
}

#[test]
fn matvec_matches_scalar_every_isa_dtype_and_thread_count() {
    let mut rng = Rng(2);
    let pools: Vec<ThreadPool> = (1..=3).map(ThreadPool::new).collect();
    for &(rows, cols) in SHAPES {
        for offset in [0, 1] {
            let data = AllDtypes::new(&rng.vec(rows * cols + offset));
            let x = rng.vec(cols + offset);
            let x = &x[offset..];
            for m in data.views(offset).map(|w| MatRef { w, rows, cols }) {
                for isa in Isa::available() {
                    let mut want = vec![0.0; rows];
                    reference_rows(isa, m, 0..rows, x, &mut want);
                    for pool in &pools {
                        let mut y = vec![f32::NAN; rows];
                        matvec_isa(isa, pool, m, x, &mut y);
                        for r in 0..rows {
                            let (_, scale) = row_f64(&m, r, &x_seen(isa, &m.w, x));
                            let what = format!(
                                "{isa:?} {:?} {rows}x{cols} off {offset} threads {} row {r}",
                                std::mem::discriminant(&m.w),
                                pool.n_threads()
                            );
                            assert_close(y[r], want[r] as f64, scale, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_matches_scalar_every_isa_dtype() {
    let mut rng = Rng(3);
    let pools: Vec<ThreadPool> = [1, 2].map(ThreadPool::new).into();
    let shapes: &[(usize, usize)] = &[(1, 3), (5, 17), (8, 32), (13, 33), (33, 64), (67, 129), (25, 300), (130, 140)];
    for &(rows, cols) in shapes {
        for n in [1, 2, 3, 5, 12, 13, 16, 17, 33, 40] {
            let offset = n % 2;
            let data = AllDtypes::new(&rng.vec(rows * cols + offset));
            let x = rng.vec(n * cols + offset);
            let x = &x[offset..];
            for m in data.views(offset).map(|w| MatRef { w, rows, cols }) {
                for isa in Isa::available() {
                    for pool in &pools {
                        let mut y = vec![f32::NAN; n * rows];
                        matmul_isa(isa, pool, m, x, n, &mut y);
                        for t in 0..n {
                            let xt = &x_seen(isa, &m.w, &x[t * cols..(t + 1) * cols]);
                            for r in 0..rows {
                                let (want, scale) = row_f64(&m, r, xt);
                                let what = format!("{isa:?} {rows}x{cols} n {n} token {t} row {r}");
                                assert_close(y[t * rows + r], want, scale, &what);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn f16_special_values_widen_exactly() {
    // Subnormals, the largest finite value, signed zeros, tiny and large normals.
    let specials = [0.0f32, -0.0, 6.0e-8, -6.0e-8, 3.0e-5, 6.1e-5, 65504.0, -65504.0, 1.0, -2.5];
    let cols = 64;
    let vals: Vec<f16> = (0..cols).map(|i| f16::from_f32(specials[i % specials.len()])).collect();
    let pool = ThreadPool::new(1);
    for k in 0..cols {
        let mut x = vec![0.0; cols];
        x[k] = 1.0;
        for isa in Isa::available() {
            let mut y = [0.0f32];
            matvec_isa(isa, &pool, MatRef { w: Weights::F16(&vals), rows: 1, cols }, &x, &mut y);
            assert_eq!(y[0], vals[k].to_f32(), "{isa:?} element {k}");
        }
    }
}

#[test]
fn vector_kernels_match_scalar() {
    let mut rng = Rng(4);
    for len in (0..70).chain([127, 128, 129, 576, 1000, 1536]) {
        for offset in [0, 1] {
            let a = rng.vec(len + offset);
            let b = rng.vec(len + offset);
            let (a, b) = (&a[offset..], &b[offset..]);
            let scale: f64 = a.iter().zip(b).map(|(a, b)| (a * b).abs() as f64).sum();
            let want64: f64 = a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert_close(scalar::dot(a, b), want64, scale, "scalar dot");
            for isa in Isa::available() {
                let what = format!("{isa:?} len {len} off {offset}");
                assert_close(dot_isa(isa, a, b), want64, scale, &format!("dot {what}"));

                let mut want = a.to_vec();
                scalar::axpy(&mut want, 0.75, b);
                let mut got = a.to_vec();
                axpy_isa(isa, &mut got, 0.75, b);
                // FMA rounds once: compare relative to |y| + |a·x|, not to the (cancelling) sum.
                let scale: Vec<f32> = a.iter().zip(b).map(|(y, x)| y.abs() + (0.75 * x).abs()).collect();
                close_scaled(&got, &want, &scale, &format!("axpy {what}"));

                let mut want = a.to_vec();
                scalar::add(&mut want, b);
                let mut got = a.to_vec();
                add_isa(isa, &mut got, b);
                close_elementwise(&got, &want, &format!("add {what}"));

                let mut want = vec![0.0; len];
                scalar::rmsnorm(&mut want, a, b, 1e-5);
                let mut got = vec![0.0; len];
                rmsnorm_isa(isa, &mut got, a, b, 1e-5);
                close_elementwise(&got, &want, &format!("rmsnorm {what}"));

                // Logits-like range, including a -inf (masked) entry.
                let mut want: Vec<f32> = a.iter().map(|v| v * 30.0).collect();
                if len > 3 {
                    want[len / 2] = f32::NEG_INFINITY;
                }
                let mut got = want.clone();
                scalar::softmax(&mut want);
                softmax_isa(isa, &mut got);
                close_elementwise(&got, &want, &format!("softmax {what}"));

                let mut want: Vec<f32> = a.iter().map(|v| v * 20.0).collect();
                let mut got = want.clone();
                scalar::silu_mul(&mut want, b);
                silu_mul_isa(isa, &mut got, b);
                close_elementwise(&got, &want, &format!("silu_mul {what}"));
            }
        }
    }
}

fn close_elementwise(got: &[f32], want: &[f32], what: &str) {
    close_scaled(got, want, want, what)
}

/// |got − want| ≤ 2·REL·|scale| + 1e-30 element-wise.
fn close_scaled(got: &[f32], want: &[f32], scale: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g - w).abs() as f64;
        let tol = 2.0 * REL * (s.abs() as f64) + 1e-30;
        assert!(err <= tol, "{what} [{i}]: got {g}, want {w}");
    }
}

/// The kernels run with the best instruction set the CPU has: `isa()` (cached) is what
/// detection picks, the last of `Isa::available()` (scalar first, best last), and every set
/// listed there is one `matmul_many_isa` accepts.
#[test]
fn isa_is_the_best_available() {
    let available = Isa::available();
    assert_eq!(isa(), Isa::detect());
    assert_eq!(available.first(), Some(&Isa::Scalar));
    assert_eq!(available.last(), Some(&isa()));
    assert!(available.iter().all(|i| i.is_available()));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
    {
        let no_bf16_dot = std::env::var("PEFTRT_NO_BF16_DOT").is_ok_and(|v| !v.is_empty() && v != "0");
        let want = if is_x86_feature_detected!("avx512bf16") && !no_bf16_dot { Isa::Avx512Bf16 } else { Isa::Avx512 };
        assert_eq!(isa(), want);
        assert!(Isa::Avx512.is_available() && Isa::Avx2.is_available());
    }
}

/// An `Isa` is a plain public value: one the CPU lacks is refused before any SIMD code runs.
#[test]
#[should_panic(expected = "is not available on this CPU")]
fn unavailable_isa_is_refused() {
    let lacking = [Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon].into_iter().find(|i| !i.is_available()).unwrap();
    let w = [1.0f32; 4];
    let mut y = [0.0f32; 2];
    matvec_isa(lacking, &ThreadPool::new(1), MatRef { w: Weights::F32(&w), rows: 2, cols: 2 }, &[1.0, 1.0], &mut y);
}

/// NF4 weights whose codes or scales do not back the shape they claim are refused (the SIMD
/// kernels read both through raw pointers).
#[test]
fn nf4_weights_short_of_codes_or_scales_are_refused() {
    let (rows, cols) = (4, 128);
    let mut rng = Rng(17);
    let (packed, absmax) = nf4_data(&mut rng, rows * cols, 64);
    let x = vec![1.0f32; cols];
    let pool = ThreadPool::new(1);
    let run = |packed: &[u8], absmax: &[f32]| {
        let w = Nf4 { packed, absmax, blocksize: 64, table: &NF4_TABLE, len: rows * cols };
        let mut y = vec![0.0f32; rows];
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            matvec(&pool, MatRef { w: Weights::Nf4(w), rows, cols }, &x, &mut y)
        }))
        .is_ok()
    };
    assert!(run(&packed, &absmax));
    assert!(!run(&packed[..packed.len() - 1], &absmax), "one code byte short");
    assert!(!run(&packed, &absmax[..absmax.len() - 1]), "one scale short");
}

/// Several matrices on one input in one job (q/k/v, gate/up) give what each gives alone, for
/// one token (decode) and many (prefill), every instruction set and thread count.
#[test]
fn matmul_many_matches_separate_matrices() {
    let mut rng = Rng(7);
    let cols = 67;
    let rows = [40, 9, 9];
    let data: Vec<Vec<f32>> = rows.iter().map(|&r| rng.vec(r * cols)).collect();
    for n in [1, 5, 37] {
        let x = rng.vec(n * cols);
        for isa in Isa::available() {
            for threads in [1, 2, 3] {
                let pool = ThreadPool::new(threads);
                let ms: Vec<MatRef> =
                    data.iter().zip(rows).map(|(d, r)| MatRef { w: Weights::F32(d), rows: r, cols }).collect();
                let mut outs: Vec<Vec<f32>> = rows.iter().map(|&r| vec![0.0; n * r]).collect();
                let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
                matmul_many_isa(isa, &pool, &ms, &x, n, &mut ys);
                for (m, out) in ms.iter().zip(&outs) {
                    for t in 0..n {
                        for r in 0..m.rows {
                            let (want, scale) = row_f64(m, r, &x[t * cols..(t + 1) * cols]);
                            assert_close(out[t * m.rows + r], want, scale, &format!("{isa:?} n={n} threads={threads}"));
                        }
                    }
                }
            }
        }
    }
}

/// Attention's weighted sum of value rows, every instruction set against the scalar reference.
#[test]
fn weighted_sum_matches_scalar() {
    let mut rng = Rng(11);
    for (rows, d) in [(1, 1), (3, 7), (17, 64), (100, 33), (5, 128)] {
        let p = rng.vec(rows);
        let v = rng.vec(rows * d);
        let mut want = vec![0.0; d];
        scalar::weighted_sum(&mut want, &p, &v);
        let scale: Vec<f32> = (0..d).map(|i| (0..rows).map(|j| (p[j] * v[j * d + i]).abs()).sum()).collect();
        for isa in Isa::available() {
            let mut got = vec![f32::NAN; d];
            weighted_sum_isa(isa, &mut got, &p, &v);
            close_scaled(&got, &want, &scale, &format!("{isa:?} weighted_sum {rows}x{d}"));
        }
    }
}

use crate::nf4::NF4_TABLE;

/// Random NF4 data for `len` elements: packed codes and one positive scale per block.
fn nf4_data(rng: &mut Rng, len: usize, blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let packed = (0..len.div_ceil(2)).map(|_| ((rng.f32() + 1.0) * 128.0) as u8).collect();
    let absmax = (0..len.div_ceil(blocksize)).map(|_| rng.f32().abs() * 0.1 + 1e-3).collect();
    (packed, absmax)
}

#[test]
fn nf4_codes_are_high_nibble_first() {
    let (packed, absmax) = ([0x1f_u8, 0x70], [2.0f32]);
    let w = Nf4 { packed: &packed, absmax: &absmax, blocksize: 64, table: &NF4_TABLE, len: 4 };
    assert_eq!([w.get(0), w.get(1), w.get(2), w.get(3)], [2.0 * NF4_TABLE[1], 2.0, 0.0, -2.0]);
}

/// NF4 matvec (fused SIMD) and matmul (dequantise then f32 tiles) against f64, every
/// instruction set, for shapes the SIMD path takes and ones it leaves to the scalar code
/// (blocks straddling rows).
#[test]
fn nf4_matvec_and_matmul_match_f64_every_isa() {
    let mut rng = Rng(13);
    let pools: Vec<ThreadPool> = [1, 2, 3].map(ThreadPool::new).into();
    for (rows, cols, bs) in [
        (1, 64, 64),
        (7, 64, 64),
        (9, 128, 32),
        (16, 576, 64),
        (5, 256, 128),
        (3, 96, 64),
        (4, 48, 32),
        (3, 384, 192),
        (2, 512, 256),
    ] {
        let (packed, absmax) = nf4_data(&mut rng, rows * cols, bs);
        let w = Nf4 { packed: &packed, absmax: &absmax, blocksize: bs, table: &NF4_TABLE, len: rows * cols };
        let m = MatRef { w: Weights::Nf4(w), rows, cols };
        // Dequantisation is exact: table value × scale.
        let mut deq = vec![0.0; rows * cols];
        m.w.to_f32(0, &mut deq);
        for (i, d) in deq.iter().enumerate() {
            assert_eq!(*d, NF4_TABLE[w.code(i)] * absmax[i / bs]);
        }
        for n in [1, 3, 17] {
            let x = rng.vec(n * cols);
            for isa in Isa::available() {
                for pool in &pools {
                    let mut y = vec![f32::NAN; n * rows];
                    matmul_isa(isa, pool, m, &x, n, &mut y);
                    for t in 0..n {
                        for r in 0..rows {
                            let (want, scale) = row_f64(&m, r, &x[t * cols..(t + 1) * cols]);
                            let what = format!("nf4 {isa:?} {rows}x{cols} bs {bs} n {n} token {t} row {r}");
                            assert_close(y[t * rows + r], want, scale, &what);
                        }
                    }
                }
            }
        }
    }
}

/// The GELUs against torch (float64): `torch.nn.functional.gelu(x)` and
/// `gelu(x, approximate="tanh")` at these points. The two differ by ~4e-4 at x = -3, so the
/// test tells them apart (issue 18, row 7: `hidden_act` must not silently run another
/// activation).
#[test]
fn gelus_match_torch() {
    let x = [-3.0f32, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0];
    let exact = [
        -0.00404969409489031,
        -0.15865525393145702,
        -0.15426876936299344,
        0.0,
        0.34573123063700656,
        0.841344746068543,
        2.99595030590511,
    ];
    let tanh = [
        -0.0036373920817729943,
        -0.15880800939172324,
        -0.15428599017485606,
        0.0,
        0.34571400982514394,
        0.8411919906082768,
        2.996362607918227,
    ];
    let ones = [1.0f32; 7];
    for (f, want, what) in
        [(scalar::gelu_mul as fn(&mut [f32], &[f32]), exact, "gelu"), (scalar::gelu_tanh_mul, tanh, "gelu_tanh")]
    {
        let mut got = x;
        f(&mut got, &ones);
        for ((g, w), x) in got.iter().zip(want).zip(x) {
            assert!((f64::from(*g) - w).abs() <= 1e-7 * w.abs().max(1e-3), "{what}({x}) = {g}, torch {w}");
        }
    }
    // The up projection multiplies.
    let mut g = [1.0f32];
    scalar::gelu_mul(&mut g, &[2.0]);
    assert!((g[0] - 2.0 * 0.841_344_7).abs() < 1e-6);
}

/// What the batching engine relies on for its answers to equal a lone session's: along either
/// [`Path`], a token's outputs are bit-for-bit the same whichever tokens share the call, how many
/// there are (one included) and how many threads run it; and the `Dot` path is `matvec`.
#[test]
fn a_tokens_outputs_do_not_depend_on_the_batch_along_either_path() {
    let mut rng = Rng(29);
    let pools: Vec<ThreadPool> = [1, 2, 3].map(ThreadPool::new).into();
    for (rows, cols) in [(33, 64), (96, 576), (7, 48), (200, 130)] {
        let vals = rng.vec(rows * cols);
        let dts = AllDtypes::new(&vals);
        let (packed, absmax) = nf4_data(&mut rng, rows * cols, 64);
        let nf4 = Nf4 { packed: &packed, absmax: &absmax, blocksize: 64, table: &NF4_TABLE, len: rows * cols };
        let mut ws = dts.views(0).to_vec();
        ws.push(Weights::Nf4(nf4));
        let n = 37;
        let x = rng.vec(n * cols);
        for w in ws {
            let m = MatRef { w, rows, cols };
            for isa in Isa::available() {
                for path in [Path::Dot, Path::Tiled] {
                    let mut all = vec![f32::NAN; n * rows];
                    matmul_many_isa_path(isa, &pools[0], &[m], &x, n, &mut [&mut all], path);
                    for pool in &pools {
                        for (t0, len) in [(0, 1), (5, 1), (36, 1), (3, 5), (16, 17), (0, 37)] {
                            let mut part = vec![f32::NAN; len * rows];
                            let xs = &x[t0 * cols..(t0 + len) * cols];
                            matmul_many_isa_path(isa, pool, &[m], xs, len, &mut [&mut part], path);
                            let want = &all[t0 * rows..(t0 + len) * rows];
                            assert!(
                                part.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                                "{isa:?} {path:?} {rows}x{cols} {}: tokens {t0}..{} alone differ from the batch",
                                dtype_name(&m.w),
                                t0 + len
                            );
                        }
                    }
                    if path == Path::Dot {
                        for t in [0, 20] {
                            let mut y = vec![f32::NAN; rows];
                            matvec_isa(isa, &pools[1], m, &x[t * cols..(t + 1) * cols], &mut y);
                            assert!(y.iter().zip(&all[t * rows..]).all(|(a, b)| a.to_bits() == b.to_bits()));
                        }
                    }
                }
            }
        }
    }
}

fn dtype_name(w: &Weights) -> &'static str {
    match w {
        Weights::F32(_) => "f32",
        Weights::F16(_) => "f16",
        Weights::BF16(_) => "bf16",
        Weights::Nf4(_) => "nf4",
        Weights::Quant(_) => "quant",
    }
}

/// Q8_0 blocks (an f16 scale, then 32 signed bytes) of pseudo-random values.
fn q8_0_blocks(n_blocks: usize, seed: u64) -> Vec<u8> {
    let mut rng = seed;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (rng >> 33) as u32
    };
    let mut out = Vec::with_capacity(n_blocks * 34);
    for _ in 0..n_blocks {
        let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
        out.extend_from_slice(&d.to_le_bytes());
        out.extend((0..32).map(|_| next() as u8));
    }
    out
}

#[test]
fn quant_weights_matvec_and_matmul_match_their_dequantised_values() {
    let pool = ThreadPool::new(2);
    let (rows, cols) = (37, 96);
    let data = q8_0_blocks(rows * cols / 32, 7);
    let q = Weights::Quant(super::Quant { ty: crate::gguf::quants::GgmlType::Q8_0, data: &data, len: rows * cols });
    let m = MatRef { w: q, rows, cols };
    let x: Vec<f32> = (0..cols * 3).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    // One token on SIMD takes `x` quantised to 8 bits (within its rounding bound:
    // `quant/tests.rs`); the scalar path and the tiled GEMM use the dequantised weights exactly.
    for (isa, n) in [(Isa::Scalar, 1), (isa(), 3)] {
        let mut y = vec![0.0; rows * n];
        matmul_isa(isa, &pool, m, &x[..cols * n], n, &mut y);
        for t in 0..n {
            for r in 0..rows {
                let (want, scale) = row_f64(&m, r, &x[t * cols..(t + 1) * cols]);
                assert_close(y[t * rows + r], want, scale, &format!("Q8_0 n={n} token {t} row {r}"));
            }
        }
    }
    // Elementwise reads agree with whole-row dequantisation, also from inside a block.
    let mut row = vec![0.0; cols];
    q.to_f32(cols, &mut row);
    let mut part = vec![0.0; 40];
    q.to_f32(cols + 5, &mut part);
    assert_eq!(&row[5..45], &part[..]);
}

/// AVX512-BF16's rounding of `x` (`vcvtne2ps2bf16`, in `x86::bf16::to_bf16`) is bit for bit
/// [`scalar::round_bf16`]: ties to even, subnormals to zero, overflow to infinity, NaN kept, and
/// the pack of the tiled path uses the scalar one.
#[test]
#[cfg(target_arch = "x86_64")]
fn bf16_rounding_is_the_hardwares() {
    if !Isa::Avx512Bf16.is_available() {
        return;
    }
    let mut vals: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::from_bits(0x3f80_8000), // a tie, to even (down)
        f32::from_bits(0x3f81_8000), // a tie, to even (up)
        f32::from_bits(0x3f80_8001),
        f32::from_bits(0x3f80_7fff),
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::MIN_POSITIVE / 2.0, // subnormal
        -1e-40,
        f32::MAX, // rounds up to infinity
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3.0e38,
    ];
    let mut rng = Rng(31);
    vals.extend((0..1000).map(|_| rng.f32() * 10f32.powi((rng.f32() * 30.0) as i32)));
    for len in [vals.len(), 1, 17, 33] {
        let mut out = vec![0u16; len.div_ceil(32) * 32];
        // SAFETY: AVX512-BF16 is available (checked above); `vals` holds `len`, `out` the padding.
        unsafe { x86::bf16::to_bf16(vals.as_ptr(), len, out.as_mut_ptr()) };
        for (i, (&v, &got)) in vals.iter().zip(&out).take(len).enumerate() {
            assert_eq!(got, scalar::round_bf16(v), "element {i}: {v:e} ({:#x})", v.to_bits());
        }
        assert!(out[len..].iter().all(|&p| p == 0), "padding");
    }
}

/// The scalar reference of the bf16 dot product against f64 on `x` rounded to bf16 (the usual
/// budget), and against f64 on `x` itself within the rounding's own bound: |x̃ − x| ≤ 2⁻⁸·|x|,
/// so |Σw·x̃ − Σw·x| ≤ 2⁻⁸·Σ|w·x|.
#[test]
fn scalar_bf16_dot_matches_f64() {
    let mut rng = Rng(37);
    for &(rows, cols) in SHAPES.iter().chain(&[(4, 4096), (2, 8191)]) {
        let w: Vec<bf16> = rng.vec(rows * cols).iter().map(|&v| bf16::from_f32(v)).collect();
        let x = rng.vec(cols);
        let m = MatRef { w: Weights::BF16(&w), rows, cols };
        let mut y = vec![0.0; rows];
        scalar::matvec_rows_bf16_dot(&w, cols, 0..rows, &x, &mut y);
        let xb = x_seen(Isa::Avx512Bf16, &m.w, &x);
        for (r, &got) in y.iter().enumerate() {
            let (want, scale) = row_f64(&m, r, &xb);
            assert_close(got, want, scale, &format!("bf16 dot {rows}x{cols} row {r}"));
            let (want, scale) = row_f64(&m, r, &x);
            let err = (got as f64 - want).abs();
            assert!(err <= (2f64.powi(-8) + REL) * scale, "bf16 dot vs f32 x {rows}x{cols} row {r}: err {err:e}");
        }
    }
}

/// BF16 weights along both x86 variants run explicitly, decode (one token and several) and
/// prefill: `Avx512Bf16` within the usual budget of its reference (x rounded to bf16), `Avx512`
/// of the f32 one, and the two within 2⁻⁸·Σ|w·x| (+ the budget) of each other. (The other tests
/// run every available ISA too; this one says what switching `PEFTRT_NO_BF16_DOT` changes.)
#[test]
#[cfg(target_arch = "x86_64")]
fn bf16_dot_and_widening_paths_agree_within_the_rounding_of_x() {
    if !Isa::Avx512Bf16.is_available() {
        return;
    }
    let mut rng = Rng(41);
    let pool = ThreadPool::new(2);
    for (rows, cols) in [(1, 1), (5, 31), (13, 64), (40, 576), (37, 1000), (130, 1537), (25, 2048)] {
        let w: Vec<bf16> = rng.vec(rows * cols).iter().map(|&v| bf16::from_f32(v)).collect();
        let m = MatRef { w: Weights::BF16(&w), rows, cols };
        for (n, path) in [(1, Path::Dot), (6, Path::Dot), (1, Path::Tiled), (45, Path::Tiled)] {
            let x = rng.vec(n * cols);
            let run = |isa| {
                let mut y = vec![f32::NAN; n * rows];
                matmul_many_isa_path(isa, &pool, &[m], &x, n, &mut [&mut y], path);
                y
            };
            let (dot, wide) = (run(Isa::Avx512Bf16), run(Isa::Avx512));
            for t in 0..n {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut want = vec![0.0; rows];
                scalar::matvec_rows_bf16_dot(&w, cols, 0..rows, xt, &mut want);
                let xb = x_seen(Isa::Avx512Bf16, &m.w, xt);
                for r in 0..rows {
                    let what = format!("{rows}x{cols} n {n} {path:?} token {t} row {r}");
                    let (d, wd) = (dot[t * rows + r], wide[t * rows + r]);
                    let (_, scale_b) = row_f64(&m, r, &xb);
                    assert_close(d, want[r] as f64, scale_b, &format!("bf16 dot vs its reference, {what}"));
                    let (want32, scale) = row_f64(&m, r, xt);
                    assert_close(wd, want32, scale, &format!("widening vs f64, {what}"));
                    let err = (d as f64 - wd as f64).abs();
                    assert!(err <= (2f64.powi(-8) + 2.0 * REL) * scale, "bf16 dot vs widening, {what}: {d} vs {wd}");
                }
            }
        }
    }
}

/// The LoRA up-projection: every instruction set bit-identical to the scalar reference, for
/// any token count and any split of the columns (a token's outputs never depend on its batch),
/// and the reference within the f32 budget of the f64 sums.
#[test]
fn lowrank_up_is_bit_identical_everywhere() {
    let mut rng = Rng(23);
    let pool = ThreadPool::new(3);
    for (rank, out, n) in [(1, 1, 1), (16, 576, 1), (16, 192, 5), (8, 1536, 9), (7, 33, 4), (64, 100, 2), (3, 17, 0)] {
        let all = AllDtypes::new(&rng.vec(rank * out));
        let u = rng.vec(n * rank);
        for (bt, dtype) in all.views(0).into_iter().zip(["f32", "f16", "bf16"]) {
            let mut want = vec![f32::NAN; n * out];
            scalar::lowrank_up(bt, rank, &u, n, 0..out, &mut want);
            for t in 0..n {
                for c in 0..out {
                    let (s, a) = (0..rank).fold((0.0f64, 0.0f64), |(s, a), k| {
                        let p = f64::from(u[t * rank + k]) * weight(&bt, k * out + c);
                        (s + p, a + p.abs())
                    });
                    assert_close(want[t * out + c], s, a, &format!("scalar lowrank_up {rank}x{out}"));
                }
            }
            for isa in Isa::available() {
                let what = format!("{isa:?} lowrank_up {dtype}: rank {rank}, {out} outputs, {n} tokens");
                let mut got = vec![f32::NAN; n * out];
                // Columns in uneven pieces (one empty when out is small), the tokens all at once.
                let (a, b) = (out.min(5), out.min(5).max(out / 2));
                for cols in [0..a, a..b, b..out] {
                    // SAFETY: `isa` is available; shapes as built; `got` is ours.
                    unsafe { lowrank_up_isa(isa, bt, rank, out, &u, n, cols, got.as_mut_ptr()) };
                }
                assert!(bits_equal(&got, &want), "{what}: differs from the scalar reference");
                // Token by token: the same bits.
                for t in 0..n {
                    let mut one = vec![f32::NAN; out];
                    let ut = &u[t * rank..(t + 1) * rank];
                    // SAFETY: as above, one token.
                    unsafe { lowrank_up_isa(isa, bt, rank, out, ut, 1, 0..out, one.as_mut_ptr()) };
                    assert!(bits_equal(&one, &want[t * out..(t + 1) * out]), "{what}: token {t} alone differs");
                }
            }
            // The pool's split of several products' columns: the same bits too.
            let bt2 = rng.vec(rank * 40);
            let u2 = rng.vec(n * rank);
            let (mut y1, mut y2) = (vec![f32::NAN; n * out], vec![f32::NAN; n * 40]);
            lowrank_up_many(
                &pool,
                n,
                &mut [(bt, rank, &u[..], &mut y1[..]), (Weights::F32(&bt2), rank, &u2[..], &mut y2[..])],
            );
            let mut want2 = vec![f32::NAN; n * 40];
            lowrank_up(Weights::F32(&bt2), rank, &u2, n, &mut want2);
            assert!(
                bits_equal(&y1, &want) && bits_equal(&y2, &want2),
                "lowrank_up_many {dtype} rank {rank}, {out} outputs"
            );
        }
    }
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
