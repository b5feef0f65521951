//! AdamW, learning-rate schedules and gradient clipping, computed as PyTorch and transformers
//! compute them, so that a run matches `torch.optim.AdamW` + `get_*_schedule_with_warmup` +
//! `clip_grad_norm_` step for step.
//!
//! The optimiser state (moments and step count) is plain tensors owned here, so a checkpoint
//! can save and restore it exactly.

use crate::error::{Error, Result};
use tch::Tensor;

/// AdamW hyper-parameters (`torch.optim.AdamW`'s defaults but the learning rate).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW with decoupled weight decay: torch's `_single_tensor_adam` (the CPU path) with
/// `decoupled_weight_decay=True`, `amsgrad=False`.
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken.
    pub step: i64,
    /// First moments, one per parameter.
    pub exp_avg: Vec<Tensor>,
    /// Second moments, one per parameter.
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Result<AdamW> {
        if !(0.0..1.0).contains(&config.beta1) || !(0.0..1.0).contains(&config.beta2) {
            return Err(Error::Input(format!("--betas {},{}: each must be in [0, 1)", config.beta1, config.beta2)));
        }
        if config.eps <= 0.0 || config.weight_decay < 0.0 {
            return Err(Error::Input("--eps must be positive and --weight-decay non-negative".into()));
        }
        let zeros = |p: &Tensor| Tensor::f_zeros_like(p);
        Ok(AdamW {
            config,
            step: 0,
            exp_avg: params.iter().map(zeros).collect::<Result<_, _>>()?,
            exp_avg_sq: params.iter().map(zeros).collect::<Result<_, _>>()?,
        })
    }

    /// One update of `params` (whose `.grad()` holds the gradients) at learning rate `lr`.
    pub fn step(&mut self, params: &[Tensor], lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        self.step += 1;
        let step = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(step);
        let bias_correction2 = 1.0 - c.beta2.powf(step);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        for ((p, m), v) in params.iter().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            let mut p = p.shallow_clone();
            if c.weight_decay != 0.0 {
                let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let _ = m.f_lerp_(&grad, 1.0 - c.beta1)?;
            let _ = v.f_mul_scalar_(c.beta2)?.f_add_(&grad.f_mul(&grad)?.f_mul_scalar(1.0 - c.beta2)?)?;
            let denom = v.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?.f_add_scalar(c.eps)?;
            let _ = p.f_sub_(&m.f_div(&denom)?.f_mul_scalar(step_size)?)?;
        }
        Ok(())
    }
}

/// Zeroes the gradients of `params` (before a step's first micro-batch).
pub fn zero_grad(params: &[Tensor]) -> Result<()> {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _guard = tch::no_grad_guard();
            let _ = g.f_zero_()?;
        }
    }
    Ok(())
}

/// `torch.nn.utils.clip_grad_norm_`: the L2 norm of all gradients together; when `max_norm`
/// is given, every gradient is multiplied by `min(1, max_norm / (norm + 1e-6))`. Returns the
/// norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: Option<f64>) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params.iter().map(Tensor::grad).filter(Tensor::defined).collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    // `Tensor::norm()` is the 2-norm over all elements (`linalg.vector_norm(g, 2)`).
    let norms: Vec<Tensor> = grads.iter().map(Tensor::f_norm).collect::<Result<_, _>>()?;
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?;
    if let Some(max_norm) = max_norm {
        let coef = total.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?;
        for mut g in grads {
            let _ = g.f_mul_(&coef)?;
        }
    }
    Ok(total.f_double_value(&[])?)
}

/// The learning-rate schedule after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule> {
        match s {
            "cosine" => Ok(Schedule::Cosine),
            "linear" => Ok(Schedule::Linear),
            "constant" => Ok(Schedule::Constant),
            other => Err(Error::Input(format!("--schedule {other}: expected cosine, linear or constant"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Cosine => "cosine",
            Schedule::Linear => "linear",
            Schedule::Constant => "constant",
        }
    }

    /// The learning-rate multiplier of (0-based) step `step` of `total`, after `warmup` linear
    /// warm-up steps: transformers' `get_{cosine,linear,constant}_schedule_with_warmup` (the
    /// first step of a warm-up has multiplier 0, as there).
    pub fn factor(self, step: u64, warmup: u64, total: u64) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn schedules_follow_transformers() {
        // get_cosine_schedule_with_warmup(opt, 2, 5): 0, 0.5, 1, 0.75, 0.25
        let c: Vec<f64> = (0..5).map(|s| Schedule::Cosine.factor(s, 2, 5)).collect();
        for (a, b) in c.iter().zip([0.0, 0.5, 1.0, 0.75, 0.25]) {
            assert!((a - b).abs() < 1e-12, "{c:?}");
        }
        assert_eq!(Schedule::Linear.factor(3, 1, 5), 0.5);
        assert_eq!(Schedule::Constant.factor(0, 0, 5), 1.0);
        assert_eq!(Schedule::Constant.factor(1, 4, 5), 0.25);
    }

    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        // After one step from zero moments: p ← p(1 − lr·wd) − lr · g / (|g| + eps·…) ≈ p − lr·sign(g).
        let p = Tensor::from_slice(&[1.0f32, -2.0, 0.5]).set_requires_grad(true);
        let loss = (&p * Tensor::from_slice(&[3.0f32, -1.0, 0.0])).sum(Kind::Float);
        loss.backward();
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::new(cfg, &[p.shallow_clone()]).unwrap();
        opt.step(&[p.shallow_clone()], 0.01).unwrap();
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01, 0.5 * (1.0 - 0.001)];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let p = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let norm = clip_grad_norm(&[p.shallow_clone()], Some(1.0)).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(&p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    }
}
