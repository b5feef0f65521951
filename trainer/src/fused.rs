//! Fused CPU kernels for RMSNorm (with or without the residual add before it), the rotary
//! embedding, the SiLU-gated product and LoRA dropout: one pass forward and one backward each,
//! as libtorch autograd functions written in C++ (`csrc/fused.cpp`, built by `build.rs` against
//! the same libtorch); and the frozen base's matrix products on oneDNN where that beats
//! libtorch's MKL. [`crate::model::BaseModel`] uses them for f32 tensors on a CPU and
//! libtorch's operators everywhere else; the tests below hold them to those operators.
//!
//! On the CPU these element-wise operators were about a sixth of a LoRA step on SmolLM2 (each a
//! separate pass over memory with its own saved tensors: RMSNorm is six operators forward, the
//! rotary embedding a `cat` and four more); see BENCHMARKS.md.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, CStr};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn peftrt_fused_error() -> *const c_char;
    fn peftrt_fused_rms_norm(x: *const C_tensor, w: *const C_tensor, eps: f64, out: *mut *mut C_tensor) -> c_int;
    fn peftrt_fused_add_rms_norm(
        x: *const C_tensor,
        r: *const C_tensor,
        w: *const C_tensor,
        eps: f64,
        sum: *mut *mut C_tensor,
        out: *mut *mut C_tensor,
    ) -> c_int;
    fn peftrt_fused_rope(
        x: *const C_tensor,
        cos: *const C_tensor,
        signed_sin: *const C_tensor,
        out: *mut *mut C_tensor,
    ) -> c_int;
    fn peftrt_fused_swiglu(g: *const C_tensor, u: *const C_tensor, out: *mut *mut C_tensor) -> c_int;
    fn peftrt_fused_dropout(x: *const C_tensor, key: u64, p: f64, out: *mut *mut C_tensor) -> c_int;
    fn peftrt_fused_frozen_linear(x: *const C_tensor, w: *const C_tensor, out: *mut *mut C_tensor) -> c_int;
    fn peftrt_fused_onednn_probe() -> c_int;
    #[cfg(test)]
    fn peftrt_fused_exp(x: f32) -> f32;
}

/// Whether the fused kernels take `t`: f32 on a CPU, unless the environment sets
/// `PEFTRT_FUSED=0` (libtorch's operators throughout: for comparisons and bisecting).
pub fn applies(t: &Tensor) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("PEFTRT_FUSED").map_or(true, |v| v != "0"))
        && t.device() == Device::Cpu
        && t.kind() == Kind::Float
}

/// Whether [`frozen_linear`] takes `x` (and an f32 weight): f32 on a CPU where oneDNN's f32
/// product runs (x86-64 with AVX-512), unless the environment sets `PEFTRT_ONEDNN=0` (libtorch's
/// own `linear`, on MKL).
pub fn onednn_applies(x: &Tensor) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && *ENABLED.get_or_init(|| {
            if std::env::var("PEFTRT_ONEDNN").is_ok_and(|v| v == "0") {
                return false;
            }
            // SAFETY: no arguments; the C++ side catches its own exceptions. Probed once, here.
            let available = unsafe { peftrt_fused_onednn_probe() } == 0;
            if !available {
                log::info!("{}; the frozen products use libtorch's linear", last_error("oneDNN probe"));
            }
            available
        })
}

/// The error of a failed call (the C++ side's message, kept per thread).
fn last_error(what: &str) -> Error {
    // SAFETY: the C++ side returns a pointer to its thread-local string, valid until the next
    // call on this thread; it is copied at once.
    let mut msg = unsafe { CStr::from_ptr(peftrt_fused_error()) }.to_string_lossy().into_owned();
    if msg.is_empty() {
        msg = "failed, and the reason could not be kept (out of memory?)".into();
    }
    Error::Torch(tch::TchError::Torch(format!("fused {what}: {msg}")))
}

/// Wraps a tensor the C++ side allocated for us.
fn owned(ptr: *mut C_tensor) -> Tensor {
    // SAFETY: `ptr` is a fresh `new at::Tensor` from a successful call, owned by nobody else;
    // tch frees it with the matching `delete`.
    unsafe { Tensor::from_ptr(ptr) }
}

/// transformers' `LlamaRMSNorm` of `x` `[.., hidden]` with weight `w` `[hidden]`:
/// `w · x / √(mean(x²) + eps)`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: valid tensor handles; `out` is written only on success.
    match unsafe { peftrt_fused_rms_norm(x.as_ptr(), w.as_ptr(), eps, &mut out) } {
        0 => Ok(owned(out)),
        _ => Err(last_error("rms_norm")),
    }
}

/// `(x + r, rms_norm(x + r, w, eps))`: a residual add and the norm after it, in one pass.
pub fn add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let (mut sum, mut out) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: as in `rms_norm`; both outputs are written on success.
    match unsafe { peftrt_fused_add_rms_norm(x.as_ptr(), r.as_ptr(), w.as_ptr(), eps, &mut sum, &mut out) } {
        0 => Ok((owned(sum), owned(out))),
        _ => Err(last_error("add_rms_norm")),
    }
}

/// `x·cos + rotate_half(x)·sin` for `x` `[batch, seq, heads, head_dim]` (heads not yet moved
/// before the sequence), with tables `[1 or batch, seq, head_dim]`: `cos` = `[cos, cos]` and
/// `signed_sin` = `[-sin, sin]` of the half-angles. Returns `[batch, seq, heads, head_dim]`.
pub fn rope(x: &Tensor, cos: &Tensor, signed_sin: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `rms_norm`.
    match unsafe { peftrt_fused_rope(x.as_ptr(), cos.as_ptr(), signed_sin.as_ptr(), &mut out) } {
        0 => Ok(owned(out)),
        _ => Err(last_error("rope")),
    }
}

/// `silu(g) · u` (the gated MLP's product), `g` and `u` of one shape.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `rms_norm`.
    match unsafe { peftrt_fused_swiglu(g.as_ptr(), u.as_ptr(), &mut out) } {
        0 => Ok(owned(out)),
        _ => Err(last_error("swiglu")),
    }
}

/// `x` times the dropout mask of `key` ([`crate::dropout::mask`]'s, bit for bit), drawn as the
/// kernel goes and drawn again for the backward (no mask tensor is kept).
pub fn dropout(x: &Tensor, key: u64, p: f64) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `rms_norm`.
    match unsafe { peftrt_fused_dropout(x.as_ptr(), key, p, &mut out) } {
        0 => Ok(owned(out)),
        _ => Err(last_error("dropout")),
    }
}

/// `x · wᵀ` for `x` `[.., in]` and a frozen f32 weight `w` `[out, in]` (one that requires no
/// gradient), by oneDNN; the backward gives `x` its gradient only. See [`onednn_applies`].
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let mut out = std::ptr::null_mut();
    // SAFETY: as in `rms_norm`.
    match unsafe { peftrt_fused_frozen_linear(x.as_ptr(), w.as_ptr(), &mut out) } {
        0 => Ok(owned(out)),
        _ => Err(last_error("frozen_linear")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    /// The largest |a − b| relative to the largest |b| (absolute when b is all zero).
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]).max(1e-30);
        (a - b).abs().max().double_value(&[]) / scale
    }

    /// Runs `f` on leaf copies of `inputs` and back-propagates `upstream`: (output, input grads).
    fn forward_backward(
        inputs: &[&Tensor],
        upstream: &Tensor,
        f: impl Fn(&[Tensor]) -> Tensor,
    ) -> (Tensor, Vec<Tensor>) {
        let leaves: Vec<Tensor> = inputs.iter().map(|t| t.detach().copy().set_requires_grad(true)).collect();
        let y = f(&leaves);
        (y.shallow_clone() * upstream).sum(Kind::Float).backward();
        (y.detach(), leaves.iter().map(Tensor::grad).collect())
    }

    /// The trainer's libtorch path, which the kernel replaces.
    fn composite_rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        crate::model::rms_norm_ops(x, w, eps).unwrap()
    }

    #[test]
    fn rms_norm_matches_libtorch_forward_and_backward() {
        // Rows shorter than, equal to and longer than 16, widths that are not multiples of 16.
        for (rows, h) in [(1, 5), (7, 16), (33, 576), (300, 1000)] {
            let x = randn(&[rows, h], 1) * 3.0;
            let w = randn(&[h], 2);
            let dy = randn(&[rows, h], 3);
            let (want, want_g) = forward_backward(&[&x, &w], &dy, |t| composite_rms(&t[0], &t[1], 1e-5));
            let (got, got_g) = forward_backward(&[&x, &w], &dy, |t| rms_norm(&t[0], &t[1], 1e-5).unwrap());
            assert!(rel_err(&got, &want) < 1e-6, "{rows}×{h} forward {}", rel_err(&got, &want));
            for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
                assert!(rel_err(g, w) < 2e-6, "{rows}×{h} grad {i}: {}", rel_err(g, w));
            }
        }
    }

    #[test]
    fn add_rms_norm_matches_an_add_then_the_norm() {
        let (x, r, w) = (randn(&[2, 9, 576], 4), randn(&[2, 9, 576], 5), randn(&[576], 6));
        let (ds, dy) = (randn(&[2, 9, 576], 7), randn(&[2, 9, 576], 8));
        let run = |fused: bool| {
            let leaves: Vec<Tensor> = [&x, &r, &w].iter().map(|t| t.copy().set_requires_grad(true)).collect();
            let (s, y) = if fused {
                add_rms_norm(&leaves[0], &leaves[1], &leaves[2], 1e-6).unwrap()
            } else {
                let s = &leaves[0] + &leaves[1];
                let y = composite_rms(&s, &leaves[2], 1e-6);
                (s, y)
            };
            ((&s * &ds).sum(Kind::Float) + (&y * &dy).sum(Kind::Float)).backward();
            (s.detach(), y.detach(), leaves.iter().map(Tensor::grad).collect::<Vec<_>>())
        };
        let (s0, y0, g0) = run(false);
        let (s1, y1, g1) = run(true);
        assert!(s1.equal(&s0));
        assert!(rel_err(&y1, &y0) < 1e-6);
        for (a, b) in g1.iter().zip(&g0) {
            assert!(rel_err(a, b) < 2e-6, "{}", rel_err(a, b));
        }
    }

    #[test]
    fn rope_matches_libtorch_for_shared_and_per_row_tables() {
        let (b, t, heads, d) = (3, 11, 4, 64);
        let angles = randn(&[b, t, d / 2], 9);
        let cos = Tensor::cat(&[angles.cos(), angles.cos()], -1);
        let signed_sin = Tensor::cat(&[-angles.sin(), angles.sin()], -1);
        for (cos, signed_sin) in [(cos.narrow(0, 0, 1), signed_sin.narrow(0, 0, 1)), (cos, signed_sin)] {
            let x = randn(&[b, t, heads, d], 10);
            let dy = randn(&[b, t, heads, d], 11);
            // The trainer's libtorch path, on [batch, heads, seq, head_dim].
            let composite = |x: &Tensor| {
                let (c, s) = (cos.unsqueeze(1), signed_sin.unsqueeze(1));
                crate::model::rope_ops(&x.transpose(1, 2), &c, &s).unwrap().transpose(1, 2)
            };
            let (want, want_g) = forward_backward(&[&x], &dy, |t| composite(&t[0]));
            let (got, got_g) = forward_backward(&[&x], &dy, |t| rope(&t[0], &cos, &signed_sin).unwrap());
            assert!(rel_err(&got, &want) < 1e-6, "forward {}", rel_err(&got, &want));
            assert!(rel_err(&got_g[0], &want_g[0]) < 1e-6, "grad {}", rel_err(&got_g[0], &want_g[0]));
        }
    }

    #[test]
    fn swiglu_matches_libtorch_forward_and_backward() {
        // Gates far into both tails of the sigmoid, and a length that is not a multiple of 16.
        let g = randn(&[5, 1537], 12) * 12.0;
        let u = randn(&[5, 1537], 13);
        let dz = randn(&[5, 1537], 14);
        let (want, want_g) = forward_backward(&[&g, &u], &dz, |t| t[0].silu() * &t[1]);
        let (got, got_g) = forward_backward(&[&g, &u], &dz, |t| swiglu(&t[0], &t[1]).unwrap());
        assert!(rel_err(&got, &want) < 1e-6, "forward {}", rel_err(&got, &want));
        for (i, (a, b)) in got_g.iter().zip(&want_g).enumerate() {
            assert!(rel_err(a, b) < 1e-6, "grad {i}: {}", rel_err(a, b));
        }
    }

    #[test]
    fn dropout_applies_the_masks_of_dropout_mask_bit_for_bit() {
        // Odd and even lengths (the last element of an odd one takes a draw's low half), sizes
        // that share out among threads, and a key with its top bit set.
        for (shape, key, p) in [(vec![7_i64], 3_u64, 0.3), (vec![4, 128, 576], 0x8000_0000_0000_0001, 0.05)] {
            let x = randn(&shape, 18);
            let dy = randn(&shape, 19);
            let mask = crate::dropout::mask(key, &shape, p, Kind::Float).unwrap();
            let (want, want_g) = forward_backward(&[&x], &dy, |t| &t[0] * &mask);
            let (got, got_g) = forward_backward(&[&x], &dy, |t| dropout(&t[0], key, p).unwrap());
            assert!(got.equal(&want), "{shape:?} forward");
            assert!(got_g[0].equal(&want_g[0]), "{shape:?} backward");
        }
        // An odd length shared out among threads: only the last chunk holds the lone element.
        let threads = tch::get_num_threads();
        tch::set_num_threads(2);
        let n = 2 * 2 * 16384 + 3;
        let x = randn(&[n], 21);
        let got = dropout(&x, 5, 0.5).unwrap();
        tch::set_num_threads(threads);
        assert!(got.equal(&(&x * crate::dropout::mask(5, &[n], 0.5, Kind::Float).unwrap())));
        assert!(dropout(&randn(&[3], 20), 1, 1.0).is_err());
    }

    #[test]
    fn frozen_linear_matches_libtorch_linear_forward_and_backward() {
        if !onednn_applies(&randn(&[1], 0)) {
            eprintln!("skipped: oneDNN's f32 product does not run on this CPU (or PEFTRT_ONEDNN=0)");
            return;
        }
        let w = randn(&[96, 72], 22) * 0.1;
        // 3-d, 2-d and a single row, widths that are not multiples of 16; and a transposed
        // (non-contiguous) input.
        let inputs = [randn(&[3, 17, 72], 23), randn(&[40, 72], 24), randn(&[1, 72], 25), randn(&[72, 9], 26).tr()];
        for x in &inputs {
            let mut out = x.size();
            *out.last_mut().unwrap() = 96;
            let dy = randn(&out, 27);
            let (want, want_g) = forward_backward(&[x], &dy, |t| t[0].linear::<Tensor>(&w, None));
            let (got, got_g) = forward_backward(&[x], &dy, |t| frozen_linear(&t[0], &w).unwrap());
            assert_eq!(got.size(), want.size());
            assert!(rel_err(&got, &want) < 1e-6, "{:?} forward {}", x.size(), rel_err(&got, &want));
            assert!(
                rel_err(&got_g[0], &want_g[0]) < 1e-6,
                "{:?} backward {}",
                x.size(),
                rel_err(&got_g[0], &want_g[0])
            );
        }
        // No rows: an empty product, not an error.
        assert_eq!(frozen_linear(&randn(&[0, 72], 28), &w).unwrap().size(), [0, 96]);
        // Without grad mode (the frozen prefix, evaluation): the same values.
        let y = tch::no_grad(|| frozen_linear(&inputs[1], &w).unwrap());
        assert!(rel_err(&y, &inputs[1].linear::<Tensor>(&w, None)) < 1e-6);
        let err = frozen_linear(&randn(&[4, 71], 29), &w).unwrap_err().to_string();
        assert!(err.contains("does not fit"), "{err}");
        let err = frozen_linear(&inputs[1], &w.copy().set_requires_grad(true)).unwrap_err().to_string();
        assert!(err.contains("requires a gradient"), "{err}");
    }

    #[test]
    fn the_kernels_exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        for i in -87_000..88_000 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (got, want) = (unsafe { peftrt_fused_exp(x) } as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        // An f32 ulp is 2⁻²³ ≈ 1.2e-7 relative at most.
        assert!(worst < 4.0 * 1.2e-7, "worst relative error {worst:e}");
        // Clamped, not overflowing or going subnormal.
        assert!(unsafe { peftrt_fused_exp(1000.0) }.is_finite());
        assert!(unsafe { peftrt_fused_exp(-1000.0) } >= 0.0);
    }

    #[test]
    fn bad_inputs_are_errors_not_crashes() {
        let x = randn(&[4, 8], 15);
        let err = rms_norm(&x, &randn(&[7], 16), 1e-5).unwrap_err().to_string();
        assert!(err.contains("weight"), "{err}");
        let err = rms_norm(&x.to_kind(Kind::Double), &randn(&[8], 16), 1e-5).unwrap_err().to_string();
        assert!(err.contains("f32"), "{err}");
        let err = swiglu(&x, &randn(&[4, 9], 17)).unwrap_err().to_string();
        assert!(err.contains("differ"), "{err}");
        let err = rope(&x, &x, &x).unwrap_err().to_string();
        assert!(err.contains("rotary"), "{err}");
    }
}
