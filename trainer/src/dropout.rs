//! LoRA dropout masks on the CPU from a counter-based hash.
//!
//! libtorch's CPU dropout draws one Bernoulli sample per element from its Mersenne Twister,
//! about 10 ns an element: with dropout before every adapted projection that was 8% of a
//! training step on q/v of SmolLM2 and about a fifth with every linear layer adapted. Here
//! element `j` of a mask is kept when a 32-bit draw of SplitMix64's output function, applied to
//! `key + j·γ`, is at least `p · 2³²` (two draws per 64-bit output), and the kept elements
//! carry `1 / (1 − p)` as PyTorch's dropout scales them. The masks are therefore pure functions
//! of a key: a block recomputed for gradient checkpointing, or a run resumed at a step, draws
//! the same masks without any generator state to save.
//!
//! A [`DropoutStream`] hands out one key per dropout call: the trainer reseeds it before each
//! decoder block, and every projection of the block takes the next key in call order.

use crate::data::SplitMix64;
use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Kind, Tensor};

/// The keys of one training pass's dropout calls: `(seed, call)` mixed into a mask key.
#[derive(Debug, Default)]
pub struct DropoutStream {
    seed: AtomicU64,
    call: AtomicU64,
}

impl DropoutStream {
    /// Starts the calls of a new scope (one decoder block) at `seed`.
    pub fn reseed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
        self.call.store(0, Ordering::Relaxed);
    }

    /// The key of the next dropout call.
    pub fn next_key(&self) -> u64 {
        let call = self.call.fetch_add(1, Ordering::Relaxed);
        SplitMix64::mix(SplitMix64::mix(self.seed.load(Ordering::Relaxed)) ^ call.wrapping_mul(SplitMix64::GAMMA))
    }

    /// `x` with dropout `p` applied (elements zeroed with probability `p`, the rest scaled by
    /// `1 / (1 − p)`), drawn with the next key. `x` must be on the CPU.
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let key = self.next_key();
        if crate::fused::applies(x) {
            // The same mask, drawn inside one fused pass (and again for the backward).
            return crate::fused::dropout(x, key, p);
        }
        let mask = mask(key, &x.size(), p, x.kind())?;
        Ok(x.f_mul(&mask)?)
    }
}

/// The dropout mask of `key`: `shape`, kind `kind` (f32 or f64), each element 0 with
/// probability `p` and `1 / (1 − p)` otherwise.
pub fn mask(key: u64, shape: &[i64], p: f64, kind: Kind) -> Result<Tensor> {
    assert!((0.0..1.0).contains(&p), "dropout probability {p} outside [0, 1)");
    let n: usize = shape.iter().map(|&d| d as usize).product();
    // Drop when the 32-bit draw is below p · 2³² (exact to 2⁻³² in probability).
    let threshold = (p * 4_294_967_296.0).round() as u64;
    let mut values = vec![0f32; n];
    let keep = (1.0 / (1.0 - p)) as f32;
    let draw = |u: u64| if u < threshold { 0.0 } else { keep };
    for (j, pair) in values.chunks_mut(2).enumerate() {
        let z = SplitMix64::mix(key.wrapping_add((j as u64).wrapping_mul(SplitMix64::GAMMA)));
        pair[0] = draw(z & 0xffff_ffff);
        if let Some(second) = pair.get_mut(1) {
            *second = draw(z >> 32);
        }
    }
    let mask = Tensor::f_from_slice(&values)?.f_reshape(shape)?;
    Ok(if kind == Kind::Float { mask } else { mask.f_to_kind(kind)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn masks_drop_at_the_rate_and_scale_the_rest() {
        let p = 0.05;
        let m = mask(7, &[64, 1000], p, Kind::Float).unwrap();
        let values = Vec::<f32>::try_from(m.flatten(0, -1)).unwrap();
        let keep = (1.0 / (1.0 - p)) as f32;
        assert!(values.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
        // 64 000 draws: the standard error of the rate is ~0.0009.
        assert!((dropped - p).abs() < 0.004, "dropped {dropped}");
        // Both halves of each 64-bit draw are used, and drop independently.
        let (even, odd): (Vec<_>, Vec<_>) = values.chunks(2).map(|c| (c[0] == 0.0, c[1] == 0.0)).unzip();
        let both = even.iter().zip(&odd).filter(|(a, b)| **a && **b).count() as f64 / even.len() as f64;
        assert!(both < 0.01, "both halves dropped together {both}");
    }

    #[test]
    fn a_mask_is_a_function_of_its_key() {
        let a = mask(1, &[3, 5, 7], 0.3, Kind::Float).unwrap();
        assert!(a.equal(&mask(1, &[3, 5, 7], 0.3, Kind::Float).unwrap()));
        assert!(!a.equal(&mask(2, &[3, 5, 7], 0.3, Kind::Float).unwrap()));
        assert_eq!(a.size(), [3, 5, 7]);
    }

    #[test]
    fn a_stream_repeats_after_a_reseed_and_not_between_calls() {
        let s = DropoutStream::default();
        s.reseed(11);
        let (k1, k2) = (s.next_key(), s.next_key());
        assert_ne!(k1, k2);
        s.reseed(11);
        assert_eq!((s.next_key(), s.next_key()), (k1, k2));
        s.reseed(12);
        assert_ne!(s.next_key(), k1);
    }

    #[test]
    fn p_zero_keeps_everything() {
        let m = mask(3, &[100], 0.0, Kind::Float).unwrap();
        assert!(m.equal(&Tensor::ones([100], (Kind::Float, Device::Cpu))));
    }
}
