//! Per-conversation state and the forward pass.
//!
//! A [`Session`] owns the KV cache, the activation buffers and a thread pool; the weights
//! stay in the shared [`Model`]. All buffers are sized when the session is created, so
//! evaluating a token allocates nothing.
//!
//! The forward pass follows transformers' `LlamaModel.forward` (Mistral and Qwen2 are the
//! same graph): embed → for each layer (RMSNorm → q/k/v → RoPE → causal GQA attention →
//! o_proj → residual → RMSNorm → SwiGLU MLP → residual) → RMSNorm → lm_head. The KV cache
//! (`kv_cache.rs`) and attention (`attention.rs`) have files of their own; every projection
//! goes through `linear`, which adds the active adapters (`adapter/apply.rs`).

use crate::adapter::{apply_adapters, finish_adapters, Adapter, Lora, LoraScratch};
use crate::attention::{attention, AttentionInput, AttentionScratch};
use crate::error::{Error, Result};
use crate::kernels;
use crate::kv_cache::KvCache;
use crate::model::{Linear, Model};
use crate::threadpool::ThreadPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Options for [`Session::new`].
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    /// Context length in tokens (KV cache size); 0 = the model's, capped at 4096.
    pub n_ctx: usize,
    /// Most tokens evaluated in one batch during prefill; 0 = 128.
    pub n_batch: usize,
    /// Threads; 0 = all cores.
    pub n_threads: usize,
}

/// The most threads a session may use: far above any core count we run on, low enough that
/// spawning them cannot exhaust the process.
pub const MAX_THREADS: usize = 1024;

/// Number of cores available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A zeroed `f32` buffer of `dims` (multiplied) elements, or [`Error::OutOfMemory`] naming
/// `what` when the size overflows or the allocator refuses it. Like `vec![0.0; n]` it asks
/// for zeroed memory (the OS's zero pages), so a large cache costs nothing until it is used.
pub(crate) fn zeroed(what: &str, dims: &[usize]) -> Result<Vec<f32>> {
    let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let layout = n.and_then(|n| std::alloc::Layout::array::<f32>(n).ok());
    let (Some(n), Some(layout)) = (n, layout) else {
        let n = dims.iter().fold(1usize, |acc, &d| acc.saturating_mul(d));
        return Err(Error::out_of_memory::<f32>(what, n));
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size (n > 0 elements of 4 bytes).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
    if p.is_null() {
        return Err(Error::out_of_memory::<f32>(what, n));
    }
    // SAFETY: `p` was allocated by the global allocator with the layout of `[f32; n]` and is
    // zeroed, which is a valid f32 (0.0), so all `n` elements are initialised.
    Ok(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// Activation buffers for a batch of up to `rows` tokens, the same for a session's batch and
/// the batching engine's step.
pub(crate) struct Activations {
    /// `[rows, hidden]` residual stream
    pub(crate) x: Vec<f32>,
    /// `[rows, hidden]` normalised input of a sub-layer
    pub(crate) xb: Vec<f32>,
    /// `[rows, n_heads * head_dim]`
    pub(crate) q: Vec<f32>,
    /// `[rows, n_kv_heads * head_dim]`
    pub(crate) k: Vec<f32>,
    /// `[rows, n_kv_heads * head_dim]`
    pub(crate) v: Vec<f32>,
    /// `[rows, n_heads * head_dim]` attention output before o_proj
    pub(crate) att_out: Vec<f32>,
    /// Attention's score buffers: see [`AttentionScratch`].
    pub(crate) attention: AttentionScratch,
    /// `[rows, intermediate]`
    pub(crate) gate: Vec<f32>,
    /// `[rows, intermediate]`
    pub(crate) up: Vec<f32>,
    /// `[rows, hidden]` output of o_proj / down_proj before the residual add
    pub(crate) out: Vec<f32>,
    /// `[rows, head_dim / 2]` rotary cos and sin for the rows' positions
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

impl Activations {
    /// Every buffer for `rows` rows of model `c`, attention scores for `n_threads` threads and
    /// a context of `n_ctx`; allocated fallibly (an error, not an abort, when they do not fit).
    pub(crate) fn new(c: &crate::config::ModelConfig, rows: usize, n_threads: usize, n_ctx: usize) -> Result<Self> {
        let (h, q, kv, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let half = c.head_dim / 2;
        Ok(Activations {
            x: zeroed("activations", &[rows, h])?,
            xb: zeroed("activations", &[rows, h])?,
            q: zeroed("activations", &[rows, q])?,
            k: zeroed("activations", &[rows, kv])?,
            v: zeroed("activations", &[rows, kv])?,
            att_out: zeroed("activations", &[rows, q])?,
            attention: AttentionScratch::new(n_threads, n_ctx)?,
            gate: zeroed("activations", &[rows, inter])?,
            up: zeroed("activations", &[rows, inter])?,
            out: zeroed("activations", &[rows, h])?,
            cos: zeroed("rotary tables", &[rows, half])?,
            sin: zeroed("rotary tables", &[rows, half])?,
        })
    }
}

/// A session's buffers: activations for a batch of up to `n_batch` tokens, the logits and the
/// adapters' scratch.
struct Scratch {
    act: Activations,
    /// `[vocab]` logits of the last evaluated token
    logits: Vec<f32>,
    /// The active adapters' low-rank products, sized in [`Session::set_adapters`].
    lora: LoraScratch,
}

/// The active adapters of a session, each with its scale.
pub type ActiveAdapters = Vec<(Arc<Adapter>, f32)>;

/// What logits a forward pass produces.
enum Want<'a> {
    /// Last token's, into the session's logits buffer.
    Last,
    /// Every position's, appended to a caller's vector (`[n, vocab]`).
    All(&'a mut Vec<f32>),
}

/// A conversation with a model: KV cache, position, buffers.
pub struct Session {
    model: Arc<Model>,
    pool: ThreadPool,
    n_batch: usize,
    /// Tokens in the cache, in order.
    tokens: Vec<u32>,
    /// Keys and values of `tokens`, room for `n_ctx` positions.
    cache: KvCache,
    s: Scratch,
    /// Adapters applied unmerged on every projection they target.
    adapters: ActiveAdapters,
    /// Set by another thread to stop an evaluation between layers.
    cancel: Option<Arc<AtomicBool>>,
}

impl Session {
    /// A new, empty session over `model`.
    pub fn new(model: Arc<Model>, opts: &SessionOptions) -> Result<Session> {
        let c = &model.config;
        let n_ctx = match opts.n_ctx {
            0 => c.max_position_embeddings.min(4096),
            n if n > c.max_position_embeddings => {
                log::warn!(
                    "a context of {n} tokens was asked for, but the model was trained for {} positions \
                     (max_position_embeddings); using {}",
                    c.max_position_embeddings,
                    c.max_position_embeddings
                );
                c.max_position_embeddings
            }
            n => n,
        };
        let n_batch = match opts.n_batch {
            0 => 128,
            n => n,
        }
        .min(n_ctx);
        let n_threads = match opts.n_threads {
            0 => default_threads(),
            n if n > MAX_THREADS => {
                return Err(Error::Input(format!(
                    "{n} threads asked for; at most {MAX_THREADS} are allowed (this machine has {} cores; 0 = all)",
                    default_threads()
                )))
            }
            n => {
                if n > default_threads() {
                    log::warn!(
                        "{n} threads asked for on {} cores: more threads than cores slows evaluation down",
                        default_threads()
                    );
                }
                n
            }
        };
        // Sized by the caller's n_ctx and the config's claims: every buffer is allocated
        // fallibly, so a context that does not fit is an error, not an abort (issue #18).
        let cache = KvCache::new(c, n_ctx)?;
        let mut tokens = Vec::new();
        tokens.try_reserve_exact(n_ctx).map_err(|_| Error::out_of_memory::<u32>("the token history", n_ctx))?;
        let s = Scratch {
            act: Activations::new(c, n_batch, n_threads, n_ctx)?,
            logits: zeroed("logits", &[c.vocab_size])?,
            lora: LoraScratch::default(),
        };
        let pool = ThreadPool::new(n_threads);
        kernels::reserve_decode_scratch(&pool, c.hidden_size.max(c.q_dim()).max(c.intermediate_size));
        Ok(Session { pool, n_batch, tokens, cache, s, adapters: Vec::new(), cancel: None, model })
    }

    /// Makes `adapters` the active set, each with its scale (0 = off). Weights are shared, not
    /// copied; the cache is kept (call [`Session::reset`] to re-read a prompt with them).
    pub fn set_adapters(&mut self, adapters: &[(Arc<Adapter>, f32)]) -> Result<()> {
        if let Some((a, _)) = adapters.iter().find(|(a, _)| !a.is_for(&self.model)) {
            return Err(Error::Input(format!("adapter {} was loaded for a different model instance", a.name)));
        }
        for (a, s) in adapters {
            crate::adapter::check_scale(&a.name, *s)?;
        }
        self.s.lora.reserve(self.n_batch, adapters);
        self.adapters.clear();
        self.adapters.extend(adapters.iter().cloned());
        Ok(())
    }

    /// The active adapters and their scales.
    pub fn adapters(&self) -> &[(Arc<Adapter>, f32)] {
        &self.adapters
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Context length (KV cache capacity) in tokens.
    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Tokens evaluated so far (the cache's contents).
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets the conversation (the cache is overwritten lazily).
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Drops cached tokens after the first `n` (e.g. to reuse a common prompt prefix).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    /// Shares a flag that stops evaluation: while it is set, [`Session::eval`] and
    /// [`Session::eval_all`] (and so [`crate::generate()`]) stop before the next layer and fail
    /// with [`Error::Cancelled`], leaving the session as it was before that call. Another thread
    /// sets it; the owner clears it before the next call. `None` removes the flag.
    pub fn set_cancel_flag(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.cancel = flag;
    }

    /// Logits of the last evaluated token, `[vocab]`.
    pub fn logits(&self) -> &[f32] {
        &self.s.logits
    }

    /// Evaluates `tokens` after the cached ones; returns the last token's logits.
    ///
    /// On [`Error::Cancelled`] the cached tokens are those before the call, and the logits
    /// are not meaningful until the next successful evaluation.
    pub fn eval(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.check(tokens)?;
        let start = self.tokens.len();
        for chunk in tokens.chunks(self.n_batch) {
            if !self.forward(chunk, Want::Last) {
                self.tokens.truncate(start);
                return Err(Error::Cancelled);
            }
        }
        if let Err(e) = self.check_finite(&self.s.logits, self.tokens.len() - 1) {
            self.tokens.truncate(start);
            return Err(e);
        }
        Ok(&self.s.logits)
    }

    /// Evaluates `tokens` and appends every position's logits to `out` (`[n, vocab]`, row-major).
    /// On [`Error::Cancelled`], `out` and the cache are as they were before the call.
    pub fn eval_all(&mut self, tokens: &[u32], out: &mut Vec<f32>) -> Result<()> {
        self.check(tokens)?;
        let (start, out_len) = (self.tokens.len(), out.len());
        out.reserve(tokens.len() * self.model.config.vocab_size);
        for chunk in tokens.chunks(self.n_batch) {
            if !self.forward(chunk, Want::All(out)) {
                self.tokens.truncate(start);
                out.truncate(out_len);
                return Err(Error::Cancelled);
            }
        }
        let vocab = self.model.config.vocab_size;
        for (i, row) in out[out_len..].chunks_exact(vocab).enumerate() {
            if let Err(e) = self.check_finite(row, start + i) {
                self.tokens.truncate(start);
                out.truncate(out_len);
                return Err(e);
            }
        }
        Ok(())
    }

    /// An error if a row of logits holds NaN or ±inf: one non-finite value in a weight, a norm
    /// epsilon of 0 or an enormous adapter scale spreads to every logit, and sampling from them
    /// would return token 0 forever. One pass over `[vocab]` floats, beside a forward pass that
    /// reads every weight.
    fn check_finite(&self, logits: &[f32], position: usize) -> Result<()> {
        let bad = logits.iter().filter(|v| !v.is_finite()).count();
        if bad == 0 {
            return Ok(());
        }
        let adapters = if self.adapters.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = self.adapters.iter().map(|(a, s)| format!("{} (scale {s})", a.name)).collect();
            format!(", an active adapter's weights or scale ({})", names.join(", "))
        };
        Err(Error::NonFinite(format!(
            "{bad} of {} logits at position {position} are NaN or infinite: the model computes non-finite values; \
             likely causes: a NaN or infinite weight in {}{adapters}, or a wrong config.json value \
             (rms_norm_eps, rope settings)",
            logits.len(),
            self.model.dir.display()
        )))
    }

    fn check(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Input("nothing to evaluate: the token list is empty".into()));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!("token id {t} is out of range for this model's vocabulary of {vocab}")));
        }
        let n_ctx = self.cache.n_ctx;
        if self.tokens.len() + tokens.len() > n_ctx {
            return Err(Error::ContextFull { cached: self.tokens.len(), new: tokens.len(), n_ctx });
        }
        Ok(())
    }

    /// One batch of at most `n_batch` tokens through the network (inputs already checked).
    /// Returns `false` if the cancel flag stopped it (the batch's tokens are then in the history
    /// but the cache is incomplete: the caller truncates).
    fn forward(&mut self, tokens: &[u32], want: Want) -> bool {
        let Session { model, pool, tokens: history, cache, s, adapters, cancel, .. } = self;
        let cancelled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        let mut lora = s.lora.with(adapters);
        let c = &model.config;
        let n = tokens.len();
        let pos0 = history.len();
        let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let half = c.head_dim / 2;
        let eps = c.rms_norm_eps;

        // Embeddings.
        let emb = model.embed_tokens.weights();
        for (t, &tok) in tokens.iter().enumerate() {
            emb.to_f32(tok as usize * h, &mut s.act.x[t * h..(t + 1) * h]);
        }
        history.extend_from_slice(tokens);
        rope_tables(&model.rope_inv_freq, pos0, n, &mut s.act.cos, &mut s.act.sin);

        for (li, layer) in model.layers.iter().enumerate() {
            if cancelled() {
                return false;
            }
            // Attention block.
            rmsnorm_rows(&mut s.act.xb[..n * h], &s.act.x[..n * h], &layer.input_norm, eps);
            let qkv = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
            linear(
                pool,
                &mut lora,
                qkv,
                &s.act.xb[..n * h],
                n,
                [&mut s.act.q[..n * q_dim], &mut s.act.k[..n * kv_dim], &mut s.act.v[..n * kv_dim]],
            );
            for t in 0..n {
                let (cos, sin) = (&s.act.cos[t * half..(t + 1) * half], &s.act.sin[t * half..(t + 1) * half]);
                for head in s.act.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(c.head_dim) {
                    rope_any(head, cos, sin, c.rope_interleaved);
                }
                for head in s.act.k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(c.head_dim) {
                    rope_any(head, cos, sin, c.rope_interleaved);
                }
            }
            cache.store(c, li, pos0, n, &s.act.k, &s.act.v);
            let inp = AttentionInput { c, cache, layer: li, pos0, n, q: &s.act.q };
            attention(pool, &inp, &mut s.act.attention, &mut s.act.att_out);
            linear(pool, &mut lora, [&layer.o_proj], &s.act.att_out[..n * q_dim], n, [&mut s.act.out[..n * h]]);
            kernels::add(&mut s.act.x[..n * h], &s.act.out[..n * h]);

            // MLP block.
            rmsnorm_rows(&mut s.act.xb[..n * h], &s.act.x[..n * h], &layer.post_attention_norm, eps);
            let gate_up = [&layer.gate_proj, &layer.up_proj];
            linear(
                pool,
                &mut lora,
                gate_up,
                &s.act.xb[..n * h],
                n,
                [&mut s.act.gate[..n * inter], &mut s.act.up[..n * inter]],
            );
            act_mul_rows(c.hidden_act, &mut s.act.gate[..n * inter], &s.act.up[..n * inter], inter);
            linear(pool, &mut lora, [&layer.down_proj], &s.act.gate[..n * inter], n, [&mut s.act.out[..n * h]]);
            kernels::add(&mut s.act.x[..n * h], &s.act.out[..n * h]);
        }

        // Final norm and the output head.
        let vocab = c.vocab_size;
        match want {
            Want::Last => {
                let last = (n - 1) * h;
                kernels::rmsnorm(&mut s.act.xb[..h], &s.act.x[last..last + h], &model.norm, eps);
                linear(pool, &mut lora, [&model.lm_head], &s.act.xb[..h], 1, [&mut s.logits]);
            }
            Want::All(out) => {
                rmsnorm_rows(&mut s.act.xb[..n * h], &s.act.x[..n * h], &model.norm, eps);
                let start = out.len();
                out.resize(start + n * vocab, 0.0);
                linear(pool, &mut lora, [&model.lm_head], &s.act.xb[..n * h], n, [&mut out[start..]]);
                s.logits.copy_from_slice(&out[start + (n - 1) * vocab..]);
            }
        }
        true
    }
}

/// RMSNorm of each `w.len()`-wide row of `x`.
pub(crate) fn rmsnorm_rows(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    for (o, x) in out.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        kernels::rmsnorm(o, x, w, eps);
    }
}

/// `gate = act(gate) · up`, row by row (`width` wide): a row's values then do not depend on
/// where it sits in the batch (the kernels' vector tails round differently).
pub(crate) fn act_mul_rows(act: crate::config::Activation, gate: &mut [f32], up: &[f32], width: usize) {
    for (g, u) in gate.chunks_exact_mut(width).zip(up.chunks_exact(width)) {
        kernels::act_mul(act, g, u);
    }
}

/// `ys[i] = x·Wᵢᵀ + bᵢ` for `n` tokens, for `N` projections of the same input (q/k/v,
/// gate/up share one parallel job), plus the active adapters: the one place every projection
/// goes through.
pub(crate) fn linear<const N: usize>(
    pool: &ThreadPool,
    lora: &mut Lora,
    lins: [&Linear; N],
    x: &[f32],
    n: usize,
    ys: [&mut [f32]; N],
) {
    linear_path(pool, lora, lins, x, n, n, kernels::Path::for_tokens(n), ys)
}

/// [`linear`] for `n` tokens that sum as a session's batch of `batch` along `path` (the batching
/// engine's rows of one sequence). The adapters' down-projections `A·x` share the base
/// products' parallel pass (same input, same kernels, so the same sums as on their own); their
/// up-projections follow, per projection.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_path<const N: usize>(
    pool: &ThreadPool,
    lora: &mut Lora,
    lins: [&Linear; N],
    x: &[f32],
    n: usize,
    batch: usize,
    path: kernels::Path,
    mut ys: [&mut [f32]; N],
) {
    const { assert!(N <= crate::adapter::MAX_GROUP) };
    let mats = lins.map(Linear::mat);
    let downs: usize = lins.iter().map(|lin| crate::adapter::on_layer(lora.active(), lin).count()).sum();
    if lora.is_empty() || N + downs > kernels::MAX_MANY {
        kernels::matmul_many_path(pool, &mats, x, n, &mut ys, path);
        for (lin, y) in lins.iter().zip(ys) {
            if !lora.is_empty() {
                apply_adapters(pool, lora, lin, x, n, batch, y);
            }
            add_bias(lin, y);
        }
        return;
    }
    let active = lora.active();
    let mut u0 = [0; N];
    {
        let mut ms = [mats[0]; kernels::MAX_MANY];
        let mut outs: [&mut [f32]; kernels::MAX_MANY] = std::array::from_fn(|_| &mut [][..]);
        let mut k = 0;
        for (y, m) in ys.iter_mut().zip(&mats) {
            (ms[k], outs[k]) = (*m, &mut y[..]);
            k += 1;
        }
        let mut rest = &mut lora.down_scratch()[..];
        let mut off = 0;
        for (i, lin) in lins.iter().enumerate() {
            u0[i] = off;
            for (lw, _) in crate::adapter::on_layer(active, lin) {
                let (u, tail) = std::mem::take(&mut rest).split_at_mut(n * lw.rank);
                (ms[k], outs[k], rest) = (lw.a_mat(), u, tail);
                off += n * lw.rank;
                k += 1;
            }
        }
        kernels::matmul_many_path(pool, &ms[..k], x, n, &mut outs[..k], path);
    }
    let dora = lins.iter().any(|lin| crate::adapter::on_layer(active, lin).any(|(lw, _)| lw.dora.is_some()));
    if n == 1 && path == kernels::Path::Dot && !dora && downs <= kernels::MAX_MANY {
        // One token: every up-projection `B·u` of the group in one parallel pass too (the same
        // sums as `finish_adapters` makes), then the sums into `y` in its order.
        let (u, v) = lora.up_scratch();
        let mut ups: [(kernels::Weights, usize, &[f32], &mut [f32]); kernels::MAX_MANY] =
            std::array::from_fn(|_| (kernels::Weights::F32(&[]), 0, &[][..], &mut [][..]));
        let (mut k, mut rest, mut off) = (0, v, 0);
        for lin in &lins {
            for (lw, _) in crate::adapter::on_layer(active, lin) {
                let (vk, tail) = std::mem::take(&mut rest).split_at_mut(lin.rows);
                (ups[k], rest) = ((lw.bt(), lw.rank, &u[off..off + lw.rank], vk), tail);
                off += lw.rank;
                k += 1;
            }
        }
        kernels::lowrank_up_many(pool, 1, &mut ups[..k]);
        let mut k = 0;
        for (lin, y) in lins.iter().zip(ys) {
            for (lw, w) in crate::adapter::on_layer(active, lin) {
                kernels::axpy(y, w * lw.scale, ups[k].3);
                k += 1;
            }
            add_bias(lin, y);
        }
        return;
    }
    for ((lin, y), u0) in lins.iter().zip(ys).zip(u0) {
        finish_adapters(pool, lora, lin, u0, n, y);
        add_bias(lin, y);
    }
}

fn add_bias(lin: &Linear, y: &mut [f32]) {
    if let Some(b) = &lin.bias {
        for row in y.chunks_exact_mut(lin.rows) {
            kernels::add(row, b);
        }
    }
}

/// cos and sin of `pos · inv_freq` for positions `pos0..pos0 + n`, computed in f32 as transformers does.
pub(crate) fn rope_tables(inv_freq: &[f32], pos0: usize, n: usize, cos: &mut [f32], sin: &mut [f32]) {
    let half = inv_freq.len();
    for t in 0..n {
        let p = (pos0 + t) as f32;
        for (i, &f) in inv_freq.iter().enumerate() {
            let a = p * f;
            cos[t * half + i] = a.cos();
            sin[t * half + i] = a.sin();
        }
    }
}

/// Rotary embedding of one head: transformers' `rotate_half` layout (pairs `i`, `i + d/2`), or
/// with `interleaved` llama.cpp's (pairs `2i`, `2i + 1`, for Q/K rows in a GGUF's order). Pair
/// `i` gets the same arithmetic either way, so both give the same values, in their own order.
#[inline]
pub(crate) fn rope_any(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    if interleaved {
        for (p, (&c, &s)) in x.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
            let (x1, x2) = (p[0], p[1]);
            p[0] = x1 * c - x2 * s;
            p[1] = x2 * c + x1 * s;
        }
    } else {
        rope(x, cos, sin)
    }
}

/// Rotary embedding of one head, transformers' `rotate_half` layout (pairs `i`, `i + d/2`).
pub(crate) fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = x.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #18: a KV cache the allocator refuses, or whose size overflows, is an error
    /// naming it, not an abort.
    #[test]
    fn impossible_buffers_are_out_of_memory_errors() {
        // 2^60 floats = 4 EiB, beyond any address space (57-bit paging included): the allocator
        // refuses it whatever the overcommit policy. 2^61 floats (8 EiB) do not even make a
        // valid layout.
        for (dims, want) in [([1usize << 20, 1 << 20, 1 << 20], 1u64 << 62), ([1 << 20, 1 << 20, 1 << 21], 1 << 63)] {
            // black_box: an allocation never used may be optimised away, as if it succeeded.
            match std::hint::black_box(zeroed("the KV cache's keys", &dims)) {
                Err(Error::OutOfMemory { what, bytes }) => {
                    assert_eq!(what, "the KV cache's keys");
                    assert_eq!(bytes, want);
                }
                other => panic!("expected OutOfMemory, got {:?}", other.map(|v| v.len())),
            }
        }
        let e = zeroed("activations", &[usize::MAX, 3]).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { bytes: u64::MAX, .. }), "{e}");
        assert!(e.to_string().contains("activations") && e.to_string().contains("shorter context"), "{e}");
        let v = zeroed("logits", &[3, 5]).unwrap();
        assert_eq!(v, vec![0.0; 15]);
        assert!(zeroed("nothing", &[0, 7]).unwrap().is_empty());
    }
}
