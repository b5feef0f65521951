//! How the active adapters change a projection's output (LoRA and DoRA, unmerged), called
//! from `session::linear`, and the range of scales a session or merge accepts.

use super::{Adapter, LoraWeights};
use crate::error::{Error, Result};
use crate::kernels;
use crate::model::Linear;
use crate::threadpool::ThreadPool;
use std::sync::Arc;

/// The largest adapter scale a session or merge accepts, in magnitude. Useful scales are
/// around 0–2; far beyond this the adapted activations overflow f32 in the norms, and the
/// model answers with constant logits (token 0 forever) rather than an error.
pub const MAX_SCALE: f32 = 1000.0;

/// An error unless `scale` is a finite number within ±[`MAX_SCALE`].
pub fn check_scale(adapter: &str, scale: f32) -> Result<()> {
    if !scale.is_finite() || scale.abs() > MAX_SCALE {
        return Err(Error::Input(format!(
            "adapter {adapter}: scale {scale} is out of range; use a finite number within ±{MAX_SCALE} (1 = as trained, 0 = off)"
        )));
    }
    Ok(())
}

/// The most projections that share an input in one `session::linear` call (q, k and v).
pub(crate) const MAX_GROUP: usize = 3;

/// The scratch of [`apply_adapters`], sized for the active set by [`LoraScratch::reserve`].
#[derive(Default)]
pub(crate) struct LoraScratch {
    /// `[MAX_GROUP, n_batch, Σ ranks]` the adapters' `A·x`
    u: Vec<f32>,
    /// `[n_batch, max out]` adapters' `B·(A·x)`
    y: Vec<f32>,
    /// `[max out]` DoRA's per-row gains
    g: Vec<f32>,
    /// `[MAX_GROUP, Σ outs]` one token's `B·u` of every adapter of a group
    v: Vec<f32>,
}

impl LoraScratch {
    /// Grows the buffers (never shrinks them) for batches of `n_batch` tokens through `adapters`.
    pub(crate) fn reserve(&mut self, n_batch: usize, adapters: &[(Arc<Adapter>, f32)]) {
        // `u` holds every adapter's `A·x` for each projection of a group (`session::linear`).
        let ranks: usize = adapters.iter().map(|(a, _)| a.max_rank).sum();
        let out = adapters.iter().map(|(a, _)| a.max_out).max().unwrap_or(0);
        if self.u.len() < n_batch * ranks * MAX_GROUP {
            self.u.resize(n_batch * ranks * MAX_GROUP, 0.0);
        }
        if self.y.len() < n_batch * out {
            self.y.resize(n_batch * out, 0.0);
        }
        if self.g.len() < out {
            self.g.resize(out, 0.0);
        }
        let outs: usize = adapters.iter().map(|(a, _)| a.max_out).sum();
        if self.v.len() < outs * MAX_GROUP {
            self.v.resize(outs * MAX_GROUP, 0.0);
        }
    }

    /// What [`apply_adapters`] needs for one forward pass through `active`.
    pub(crate) fn with<'a>(&'a mut self, active: &'a [(Arc<Adapter>, f32)]) -> Lora<'a> {
        Lora { active, u: &mut self.u, y: &mut self.y, g: &mut self.g, v: &mut self.v }
    }
}

/// What `session::linear` needs to apply adapters: the active set and its scratch.
pub(crate) struct Lora<'a> {
    active: &'a [(Arc<Adapter>, f32)],
    u: &'a mut [f32],
    y: &'a mut [f32],
    g: &'a mut [f32],
    v: &'a mut [f32],
}

impl Lora<'_> {
    /// Whether no adapter is active (then a projection is the base's alone).
    pub(crate) fn is_empty(&self) -> bool {
        self.active.is_empty()
    }
}

/// Adds the active adapters' outputs to `y = x·Wᵀ` (before the bias), as PEFT sums the
/// outputs of its active adapters (llama.cpp's `build_lora_mm` likewise):
/// - LoRA: `y += s·B(A·x)`;
/// - DoRA: `y += (g − 1)⊙(x·Wᵀ) + g⊙s·B(A·x)` with `g = m / ‖W + s·B·A‖_row`
///   (PEFT's `DoraLinearLayer.forward`; every DoRA term uses the base output `x·Wᵀ`, so the
///   base-output factors are applied first, together).
///
/// `x` and `y` hold `n` tokens; the products sum as they do for a lone session's batch of
/// `batch` tokens (see [`small_matmul`]): a session passes `batch = n`, the batching engine the
/// size of the batch each token would have had in a session.
pub(crate) fn apply_adapters(
    pool: &ThreadPool,
    lora: &mut Lora,
    lin: &Linear,
    x: &[f32],
    n: usize,
    batch: usize,
    y: &mut [f32],
) {
    let mut off = 0;
    for (lw, _) in on_layer(lora.active, lin) {
        let u = &mut lora.u[off..off + n * lw.rank];
        small_matmul(pool, lw.a_mat(), x, n, batch, u);
        off += n * lw.rank;
    }
    finish_adapters(pool, lora, lin, 0, n, y);
}

/// The active adapters that act on `lin`, with their weights in the active set, in the order
/// [`finish_adapters`] reads their `A·x`.
pub(crate) fn on_layer<'a>(
    active: &'a [(Arc<Adapter>, f32)],
    lin: &'a Linear,
) -> impl Iterator<Item = (&'a LoraWeights, f32)> + 'a {
    active.iter().filter_map(|(a, w)| a.for_layer(lin).filter(|_| *w != 0.0).map(|lw| (lw, *w)))
}

impl<'a> Lora<'a> {
    /// The active set.
    pub(crate) fn active(&self) -> &'a [(Arc<Adapter>, f32)] {
        self.active
    }

    /// The scratch for the adapters' `A·x` (see [`finish_adapters`] for its layout).
    pub(crate) fn down_scratch(&mut self) -> &mut [f32] {
        self.u
    }

    /// The adapters' `A·x` (read) and the scratch for one token's `B·u` of a group (written).
    pub(crate) fn up_scratch(&mut self) -> (&[f32], &mut [f32]) {
        (self.u, self.v)
    }
}

/// The rest of [`apply_adapters`] once every active adapter's `A·x` on `lin` is in the down
/// scratch from float `u0` on, one after the other in [`on_layer`] order (`[n, rank]` each) —
/// which lets `session::linear` compute them in the same pass as the base products.
pub(crate) fn finish_adapters(pool: &ThreadPool, lora: &mut Lora, lin: &Linear, u0: usize, n: usize, y: &mut [f32]) {
    let rows = lin.rows;
    let active = lora.active;
    if on_layer(active, lin).any(|(lw, _)| lw.dora.is_some()) {
        // factor = 1 + Σ (g − 1) over the DoRA adapters, built in `y`'s scratch row `lora.y[..rows]`.
        let (f, g) = (&mut lora.y[..rows], &mut lora.g[..rows]);
        f.fill(1.0);
        for (lw, w) in on_layer(active, lin) {
            if let Some(d) = &lw.dora {
                d.gains(w * lw.scale, g);
                f.iter_mut().zip(g.iter()).for_each(|(f, g)| *f += g - 1.0);
            }
        }
        for row in y.chunks_exact_mut(rows) {
            row.iter_mut().zip(f.iter()).for_each(|(y, f)| *y *= f);
        }
    }
    let mut off = u0;
    for (lw, weight) in on_layer(active, lin) {
        let s = weight * lw.scale;
        let (u, v) = (&lora.u[off..off + n * lw.rank], &mut lora.y[..n * rows]);
        off += n * lw.rank;
        up(pool, lw, u, n, v);
        match &lw.dora {
            // Row by row: a row's sums then do not depend on where it sits in the batch.
            None => y.chunks_exact_mut(rows).zip(v.chunks_exact(rows)).for_each(|(y, v)| kernels::axpy(y, s, v)),
            Some(d) => {
                let g = &mut lora.g[..rows];
                d.gains(s, g);
                for (y, v) in y.chunks_exact_mut(rows).zip(v.chunks_exact(rows)) {
                    for ((y, v), g) in y.iter_mut().zip(v).zip(g.iter()) {
                        *y += g * s * v;
                    }
                }
            }
        }
    }
}

/// The most multiply-adds of a low-rank product [`small_matmul`] runs on the calling thread.
const LOCAL_MAX_MACS: usize = 1 << 16;

/// Whether [`apply_adapters`] for `n` tokens summed as a batch of `batch` runs every product of
/// `active`'s adapters on `lin` on the calling thread (it then never uses the pool, and may run
/// inside a pool job, one sequence per thread).
pub(crate) fn runs_on_caller(active: &[(Arc<Adapter>, f32)], lin: &Linear, n: usize, batch: usize) -> bool {
    kernels::Path::for_tokens(batch) == kernels::Path::Dot
        && on_layer(active, lin).all(|(lw, _)| {
            let am = lw.a_mat();
            n * am.rows * am.cols <= LOCAL_MAX_MACS && n * lw.rank * lw.out() <= LOCAL_MAX_MACS
        })
}

/// `v = B·u` for `n` tokens (`[n, rank]` → `[n, out]`): on the calling thread when it is small
/// (as [`small_matmul`]), else its columns shared out over the pool; the same sums either way,
/// whatever `n` ([`kernels::lowrank_up`]).
fn up(pool: &ThreadPool, lw: &LoraWeights, u: &[f32], n: usize, v: &mut [f32]) {
    if n * lw.rank * lw.out() <= LOCAL_MAX_MACS {
        kernels::lowrank_up(lw.bt(), lw.rank, u, n, v);
    } else {
        kernels::lowrank_up_many(pool, n, &mut [(lw.bt(), lw.rank, u, v)]);
    }
}

/// `y = x·Wᵀ` for a low-rank factor and `n` tokens, summed as for a batch of `batch` tokens,
/// along the [`Path`](kernels::Path) the base products of that batch take (so that a product
/// sums the same here as beside them in `session::linear`'s single pass): on the calling thread
/// when the batch's work is smaller than a thread-pool dispatch costs (decode: an r=16 `A·x` is
/// ~10k multiply-adds, a few µs), else shared out like any projection. Either way each token's
/// result depends only on `batch`, not on `n`.
fn small_matmul(pool: &ThreadPool, m: kernels::MatRef, x: &[f32], n: usize, batch: usize, y: &mut [f32]) {
    let path = kernels::Path::for_tokens(batch);
    if path == kernels::Path::Dot && n * m.rows * m.cols <= LOCAL_MAX_MACS {
        for (x, y) in x.chunks_exact(m.cols).zip(y.chunks_exact_mut(m.rows)) {
            kernels::matvec_local(m, x, y);
        }
    } else {
        kernels::matmul_many_path(pool, &[m], x, n, &mut [y], path);
    }
}
