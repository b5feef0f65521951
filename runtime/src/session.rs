//! Per-conversation state and the forward pass.
//!
//! A [`Session`] owns the KV cache, the activation buffers and a thread pool; the weights
//! stay in the shared [`Model`]. All buffers are sized when the session is created, so
//! evaluating a token allocates nothing.
//!
//! The forward pass follows transformers' `LlamaModel.forward` (Mistral and Qwen2 are the
//! same graph): embed → for each layer (RMSNorm → q/k/v → RoPE → causal GQA attention →
//! o_proj → residual → RMSNorm → SwiGLU MLP → residual) → RMSNorm → lm_head.

use crate::adapter::Adapter;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::{self, MatRef, Weights};
use crate::model::{Linear, Model};
use crate::threadpool::{split_range, SharedMut, ThreadPool};
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
fn zeroed(what: &str, dims: &[usize]) -> Result<Vec<f32>> {
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

/// Activation buffers for one batch of up to `n_batch` tokens.
struct Scratch {
    /// `[n_batch, hidden]` residual stream
    x: Vec<f32>,
    /// `[n_batch, hidden]` normalised input of a sub-layer
    xb: Vec<f32>,
    /// `[n_batch, n_heads * head_dim]`
    q: Vec<f32>,
    /// `[n_batch, n_kv_heads * head_dim]`
    k: Vec<f32>,
    /// `[n_batch, n_kv_heads * head_dim]`
    v: Vec<f32>,
    /// `[n_batch, n_heads * head_dim]` attention output before o_proj
    att_out: Vec<f32>,
    /// `[n_threads, n_ctx]` attention scores, one row per thread
    att: Vec<f32>,
    /// Batched attention (prefill), allocated on first use: see [`AttentionScratch`].
    batched: AttentionScratch,
    /// `[n_batch, intermediate]`
    gate: Vec<f32>,
    /// `[n_batch, intermediate]`
    up: Vec<f32>,
    /// `[n_batch, hidden]` output of o_proj / down_proj before the residual add
    out: Vec<f32>,
    /// `[n_batch, head_dim / 2]` rotary cos and sin for the batch's positions
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `[vocab]` logits of the last evaluated token
    logits: Vec<f32>,
    /// `[n_batch, max rank]` adapters' `A·x`
    lora_u: Vec<f32>,
    /// `[n_batch, max out]` adapters' `B·(A·x)`
    lora_y: Vec<f32>,
    /// `[max out]` DoRA's per-row gains
    lora_g: Vec<f32>,
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
    n_ctx: usize,
    n_batch: usize,
    /// Tokens in the cache, in order.
    tokens: Vec<u32>,
    /// `[layers, n_kv_heads, n_ctx, head_dim]`
    k_cache: Vec<f32>,
    /// `[layers, n_kv_heads, n_ctx, head_dim]`
    v_cache: Vec<f32>,
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
        let (layers, h, q, kv, inter) =
            (c.num_hidden_layers, c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let half = c.head_dim / 2;
        let k_cache = zeroed("the KV cache's keys", &[layers, kv, n_ctx])?;
        let v_cache = zeroed("the KV cache's values", &[layers, kv, n_ctx])?;
        let mut tokens = Vec::new();
        tokens.try_reserve_exact(n_ctx).map_err(|_| Error::out_of_memory::<u32>("the token history", n_ctx))?;
        let s = Scratch {
            x: zeroed("activations", &[n_batch, h])?,
            xb: zeroed("activations", &[n_batch, h])?,
            q: zeroed("activations", &[n_batch, q])?,
            k: zeroed("activations", &[n_batch, kv])?,
            v: zeroed("activations", &[n_batch, kv])?,
            att_out: zeroed("activations", &[n_batch, q])?,
            att: zeroed("attention scores", &[n_threads, n_ctx])?,
            batched: AttentionScratch::default(),
            gate: zeroed("activations", &[n_batch, inter])?,
            up: zeroed("activations", &[n_batch, inter])?,
            out: zeroed("activations", &[n_batch, h])?,
            cos: zeroed("rotary tables", &[n_batch, half])?,
            sin: zeroed("rotary tables", &[n_batch, half])?,
            logits: zeroed("logits", &[c.vocab_size])?,
            lora_u: Vec::new(),
            lora_y: Vec::new(),
            lora_g: Vec::new(),
        };
        let pool = ThreadPool::new(n_threads);
        kernels::reserve_decode_scratch(&pool, h.max(q).max(inter));
        Ok(Session { pool, n_ctx, n_batch, tokens, k_cache, v_cache, s, adapters: Vec::new(), cancel: None, model })
    }

    /// Makes `adapters` the active set, each with its scale (0 = off). Weights are shared, not
    /// copied; the cache is kept (call [`Session::reset`] to re-read a prompt with them).
    pub fn set_adapters(&mut self, adapters: &[(Arc<Adapter>, f32)]) -> Result<()> {
        let key = Arc::as_ptr(&self.model) as usize;
        if let Some((a, _)) = adapters.iter().find(|(a, _)| a.model_key != key) {
            return Err(Error::Input(format!("adapter {} was loaded for a different model instance", a.name)));
        }
        for (a, s) in adapters {
            crate::adapter::check_scale(&a.name, *s)?;
        }
        let rank = adapters.iter().map(|(a, _)| a.max_rank).max().unwrap_or(0);
        let out = adapters.iter().map(|(a, _)| a.max_out).max().unwrap_or(0);
        let n_batch = self.n_batch;
        if self.s.lora_u.len() < n_batch * rank {
            self.s.lora_u.resize(n_batch * rank, 0.0);
        }
        if self.s.lora_y.len() < n_batch * out {
            self.s.lora_y.resize(n_batch * out, 0.0);
        }
        if self.s.lora_g.len() < out {
            self.s.lora_g.resize(out, 0.0);
        }
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
        self.n_ctx
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
        if self.tokens.len() + tokens.len() > self.n_ctx {
            return Err(Error::ContextFull { cached: self.tokens.len(), new: tokens.len(), n_ctx: self.n_ctx });
        }
        Ok(())
    }

    /// One batch of at most `n_batch` tokens through the network (inputs already checked).
    /// Returns `false` if the cancel flag stopped it (the batch's tokens are then in the history
    /// but the cache is incomplete: the caller truncates).
    fn forward(&mut self, tokens: &[u32], want: Want) -> bool {
        let Session { model, pool, n_ctx, tokens: history, k_cache, v_cache, s, adapters, cancel, .. } = self;
        let cancelled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed));
        let mut lora = Lora { active: adapters, u: &mut s.lora_u, y: &mut s.lora_y, g: &mut s.lora_g };
        let c = &model.config;
        let n = tokens.len();
        let pos0 = history.len();
        let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let half = c.head_dim / 2;
        let eps = c.rms_norm_eps;
        let mut cache = KvCache { k: k_cache, v: v_cache, n_ctx: *n_ctx };

        // Embeddings.
        let emb = model.embed_tokens.weights();
        for (t, &tok) in tokens.iter().enumerate() {
            emb.to_f32(tok as usize * h, &mut s.x[t * h..(t + 1) * h]);
        }
        history.extend_from_slice(tokens);
        rope_tables(&model.rope_inv_freq, pos0, n, &mut s.cos, &mut s.sin);

        for (li, layer) in model.layers.iter().enumerate() {
            if cancelled() {
                return false;
            }
            // Attention block.
            rmsnorm_rows(&mut s.xb[..n * h], &s.x[..n * h], &layer.input_norm, eps);
            let qkv = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
            linear(
                pool,
                &mut lora,
                qkv,
                &s.xb[..n * h],
                n,
                [&mut s.q[..n * q_dim], &mut s.k[..n * kv_dim], &mut s.v[..n * kv_dim]],
            );
            for t in 0..n {
                let (cos, sin) = (&s.cos[t * half..(t + 1) * half], &s.sin[t * half..(t + 1) * half]);
                for head in s.q[t * q_dim..(t + 1) * q_dim].chunks_exact_mut(c.head_dim) {
                    rope(head, cos, sin);
                }
                for head in s.k[t * kv_dim..(t + 1) * kv_dim].chunks_exact_mut(c.head_dim) {
                    rope(head, cos, sin);
                }
            }
            cache.store(c, li, pos0, n, &s.k, &s.v);
            if n >= BATCHED_ATTENTION_MIN {
                attention_batched(pool, c, &cache, li, pos0, n, &s.q, &mut s.batched, &mut s.att_out);
            } else {
                attention(pool, c, &cache, li, pos0, n, &s.q, &mut s.att, &mut s.att_out);
            }
            linear(pool, &mut lora, [&layer.o_proj], &s.att_out[..n * q_dim], n, [&mut s.out[..n * h]]);
            kernels::add(&mut s.x[..n * h], &s.out[..n * h]);

            // MLP block.
            rmsnorm_rows(&mut s.xb[..n * h], &s.x[..n * h], &layer.post_attention_norm, eps);
            let gate_up = [&layer.gate_proj, &layer.up_proj];
            linear(pool, &mut lora, gate_up, &s.xb[..n * h], n, [&mut s.gate[..n * inter], &mut s.up[..n * inter]]);
            kernels::act_mul(c.hidden_act, &mut s.gate[..n * inter], &s.up[..n * inter]);
            linear(pool, &mut lora, [&layer.down_proj], &s.gate[..n * inter], n, [&mut s.out[..n * h]]);
            kernels::add(&mut s.x[..n * h], &s.out[..n * h]);
        }

        // Final norm and the output head.
        let vocab = c.vocab_size;
        match want {
            Want::Last => {
                let last = (n - 1) * h;
                kernels::rmsnorm(&mut s.xb[..h], &s.x[last..last + h], &model.norm, eps);
                linear(pool, &mut lora, [&model.lm_head], &s.xb[..h], 1, [&mut s.logits]);
            }
            Want::All(out) => {
                rmsnorm_rows(&mut s.xb[..n * h], &s.x[..n * h], &model.norm, eps);
                let start = out.len();
                out.resize(start + n * vocab, 0.0);
                linear(pool, &mut lora, [&model.lm_head], &s.xb[..n * h], n, [&mut out[start..]]);
                s.logits.copy_from_slice(&out[start + (n - 1) * vocab..]);
            }
        }
        true
    }
}

/// The session's key/value cache, each `[layers, n_kv_heads, n_ctx, head_dim]`.
struct KvCache<'a> {
    k: &'a mut Vec<f32>,
    v: &'a mut Vec<f32>,
    n_ctx: usize,
}

impl KvCache<'_> {
    /// Offset of `(layer, kv_head, pos)`.
    fn at(&self, c: &ModelConfig, layer: usize, kv_head: usize, pos: usize) -> usize {
        ((layer * c.num_key_value_heads + kv_head) * self.n_ctx + pos) * c.head_dim
    }

    /// Copies a batch's keys and values (`[n, kv_dim]`) to positions `pos0..pos0 + n`.
    fn store(&mut self, c: &ModelConfig, layer: usize, pos0: usize, n: usize, k: &[f32], v: &[f32]) {
        let (hd, kv_dim) = (c.head_dim, c.kv_dim());
        for t in 0..n {
            for kvh in 0..c.num_key_value_heads {
                let dst = self.at(c, layer, kvh, pos0 + t);
                let src = t * kv_dim + kvh * hd;
                self.k[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                self.v[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }
}

/// Causal grouped-query attention of a batch's queries (`q`: `[n, q_dim]`) over the cache,
/// into `out` (`[n, q_dim]`); `att` holds one `[n_ctx]` score row per thread.
#[allow(clippy::too_many_arguments)]
fn attention(
    pool: &ThreadPool,
    c: &ModelConfig,
    cache: &KvCache,
    layer: usize,
    pos0: usize,
    n: usize,
    q: &[f32],
    att: &mut [f32],
    out: &mut [f32],
) {
    let (hd, nh, q_dim, n_ctx) = (c.head_dim, c.num_attention_heads, c.q_dim(), cache.n_ctx);
    let group = nh / c.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (kc, vc) = (&cache.k[..], &cache.v[..]);
    let att = SharedMut::new(att);
    let out = SharedMut::new(out);
    pool.run(|ti, nt| {
        // SAFETY: row `ti` of the score buffer belongs to this thread alone.
        let scores_row = unsafe { att.slice(ti * n_ctx..(ti + 1) * n_ctx) };
        for item in split_range(n * nh, ti, nt, 1) {
            let (t, head) = (item / nh, item % nh);
            let pos = pos0 + t;
            let lo = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let base = cache.at(c, layer, head / group, 0);
            let qv = &q[t * q_dim + head * hd..t * q_dim + (head + 1) * hd];
            let (keys, values) =
                (&kc[base + lo * hd..base + (pos + 1) * hd], &vc[base + lo * hd..base + (pos + 1) * hd]);
            let scores = &mut scores_row[lo..=pos];
            kernels::matvec_local(MatRef { w: Weights::F32(keys), rows: pos + 1 - lo, cols: hd }, qv, scores);
            scores.iter_mut().for_each(|s| *s *= scale);
            kernels::softmax(scores);
            // SAFETY: each (token, head) item belongs to one thread; its output slice is disjoint.
            let o = unsafe { out.slice(t * q_dim + head * hd..t * q_dim + (head + 1) * hd) };
            kernels::weighted_sum(o, scores, values);
        }
    });
}

/// Batches of at least this many tokens take [`attention_batched`].
const BATCHED_ATTENTION_MIN: usize = 16;

/// Buffers of [`attention_batched`] for one KV head: rows are `(token, query head of the group)`.
#[derive(Default)]
struct AttentionScratch {
    /// `[rows, head_dim]` the group's queries, gathered
    q: Vec<f32>,
    /// `[rows, keys]` scores, then probabilities
    p: Vec<f32>,
    /// `[head_dim, keys]` the values, transposed
    vt: Vec<f32>,
    /// `[rows, head_dim]` outputs
    o: Vec<f32>,
}

/// Attention for a batch of `n` tokens as two matrix products per KV head: scores `Q·Kᵀ` over all
/// `pos0 + n` keys (the causal and sliding-window masks are applied before the softmax) and
/// `P·V`. Same result as [`attention`], but at the matmul kernel's speed: one score per query
/// and key costs a dot product of `head_dim` either way, and the products waste at most the
/// masked half.
#[allow(clippy::too_many_arguments)]
fn attention_batched(
    pool: &ThreadPool,
    c: &ModelConfig,
    cache: &KvCache,
    layer: usize,
    pos0: usize,
    n: usize,
    q: &[f32],
    s: &mut AttentionScratch,
    out: &mut [f32],
) {
    let (hd, q_dim) = (c.head_dim, c.q_dim());
    let group = c.num_attention_heads / c.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let (keys_n, rows, width) = (pos0 + n, group * n, group * hd);
    for buf in [&mut s.q, &mut s.o] {
        buf.resize(rows * hd, 0.0);
    }
    s.p.resize(rows * keys_n, 0.0);
    s.vt.resize(hd * keys_n, 0.0);
    for g in 0..c.num_key_value_heads {
        let base = cache.at(c, layer, g, 0);
        let (keys, values) = (&cache.k[base..base + keys_n * hd], &cache.v[base..base + keys_n * hd]);
        // The group's query heads are adjacent in each token's q: one copy per token.
        for t in 0..n {
            let src = t * q_dim + g * width;
            s.q[t * width..(t + 1) * width].copy_from_slice(&q[src..src + width]);
        }
        let k_mat = MatRef { w: Weights::F32(keys), rows: keys_n, cols: hd };
        kernels::matmul(pool, k_mat, &s.q[..rows * hd], rows, &mut s.p[..rows * keys_n]);
        let p = SharedMut::new(&mut s.p[..rows * keys_n]);
        pool.run(|ti, nt| {
            for row in split_range(rows, ti, nt, 1) {
                let pos = pos0 + row / group;
                let lo = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
                // SAFETY: each row belongs to one thread.
                let scores = unsafe { p.slice(row * keys_n..(row + 1) * keys_n) };
                scores[lo..=pos].iter_mut().for_each(|x| *x *= scale);
                kernels::softmax(&mut scores[lo..=pos]);
                scores[..lo].fill(0.0);
                scores[pos + 1..].fill(0.0);
            }
        });
        for (pos, v) in values.chunks_exact(hd).enumerate() {
            for (d, x) in v.iter().enumerate() {
                s.vt[d * keys_n + pos] = *x;
            }
        }
        let v_mat = MatRef { w: Weights::F32(&s.vt[..hd * keys_n]), rows: hd, cols: keys_n };
        kernels::matmul(pool, v_mat, &s.p[..rows * keys_n], rows, &mut s.o[..rows * hd]);
        for t in 0..n {
            let dst = t * q_dim + g * width;
            out[dst..dst + width].copy_from_slice(&s.o[t * width..(t + 1) * width]);
        }
    }
}

/// RMSNorm of each `w.len()`-wide row of `x`.
fn rmsnorm_rows(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    for (o, x) in out.chunks_exact_mut(w.len()).zip(x.chunks_exact(w.len())) {
        kernels::rmsnorm(o, x, w, eps);
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
    mut ys: [&mut [f32]; N],
) {
    let mats = lins.map(Linear::mat);
    kernels::matmul_many(pool, &mats, x, n, &mut ys);
    for (lin, y) in lins.iter().zip(ys) {
        if !lora.active.is_empty() {
            apply_adapters(pool, lora, lin, x, n, y);
        }
        if let Some(b) = &lin.bias {
            for row in y.chunks_exact_mut(lin.rows) {
                kernels::add(row, b);
            }
        }
    }
}

/// Adds the active adapters' outputs to `y = x·Wᵀ` (before the bias), as PEFT sums the
/// outputs of its active adapters (llama.cpp's `build_lora_mm` likewise):
/// - LoRA: `y += s·B(A·x)`;
/// - DoRA: `y += (g − 1)⊙(x·Wᵀ) + g⊙s·B(A·x)` with `g = m / ‖W + s·B·A‖_row`
///   (PEFT's `DoraLinearLayer.forward`; every DoRA term uses the base output `x·Wᵀ`, so the
///   base-output factors are applied first, together).
fn apply_adapters(pool: &ThreadPool, lora: &mut Lora, lin: &Linear, x: &[f32], n: usize, y: &mut [f32]) {
    let rows = lin.rows;
    let active = lora.active;
    let on_layer = || active.iter().filter_map(|(a, w)| a.for_layer(lin).filter(|_| *w != 0.0).map(|lw| (lw, *w)));
    if on_layer().any(|(lw, _)| lw.dora.is_some()) {
        // factor = 1 + Σ (g − 1) over the DoRA adapters, built in `y`'s scratch row `lora.y[..rows]`.
        let (f, g) = (&mut lora.y[..rows], &mut lora.g[..rows]);
        f.fill(1.0);
        for (lw, w) in on_layer() {
            if let Some(d) = &lw.dora {
                d.gains(w * lw.scale, g);
                f.iter_mut().zip(g.iter()).for_each(|(f, g)| *f += g - 1.0);
            }
        }
        for row in y.chunks_exact_mut(rows) {
            row.iter_mut().zip(f.iter()).for_each(|(y, f)| *y *= f);
        }
    }
    for (lw, weight) in on_layer() {
        let s = weight * lw.scale;
        let (u, v) = (&mut lora.u[..n * lw.rank], &mut lora.y[..n * rows]);
        small_matmul(pool, lw.a_mat(), x, n, u);
        small_matmul(pool, lw.b_mat(), u, n, v);
        match &lw.dora {
            None => kernels::axpy(y, s, v),
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

/// `y = x·Wᵀ` for a low-rank factor: on the calling thread when the work is smaller than a
/// thread-pool dispatch costs (decode: an r=16 `A·x` is ~10k multiply-adds, a few µs), else
/// shared out like any projection.
fn small_matmul(pool: &ThreadPool, m: kernels::MatRef, x: &[f32], n: usize, y: &mut [f32]) {
    const LOCAL_MAX_MACS: usize = 1 << 16;
    if n * m.rows * m.cols <= LOCAL_MAX_MACS {
        for (x, y) in x.chunks_exact(m.cols).zip(y.chunks_exact_mut(m.rows)) {
            kernels::matvec_local(m, x, y);
        }
    } else {
        kernels::matmul(pool, m, x, n, y);
    }
}

/// What [`linear`] needs to apply adapters: the active set and its scratch.
pub(crate) struct Lora<'a> {
    active: &'a [(Arc<Adapter>, f32)],
    u: &'a mut [f32],
    y: &'a mut [f32],
    g: &'a mut [f32],
}

/// cos and sin of `pos · inv_freq` for positions `pos0..pos0 + n`, computed in f32 as transformers does.
fn rope_tables(inv_freq: &[f32], pos0: usize, n: usize, cos: &mut [f32], sin: &mut [f32]) {
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

/// Rotary embedding of one head, transformers' `rotate_half` layout (pairs `i`, `i + d/2`).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
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

    /// The batched (prefill) attention equals the per-query one, with GQA, a cache that already
    /// holds earlier positions, and with and without a sliding window.
    #[test]
    fn batched_attention_matches_per_query() {
        let json = serde_json::json!({"model_type": "mistral", "hidden_size": 48, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 10,
            "sliding_window": 7});
        let windowed = ModelConfig::from_json(&json, std::path::Path::new("config.json")).unwrap();
        let mut full = windowed.clone();
        full.sliding_window = None;
        let mut seed = 7u64;
        let mut rand = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for c in [&full, &windowed] {
            let n_ctx = 64;
            let (pos0, n, layer) = (11, 29, 1);
            let size = c.num_hidden_layers * c.kv_dim() * n_ctx;
            let mut k: Vec<f32> = (0..size).map(|_| rand()).collect();
            let mut v: Vec<f32> = (0..size).map(|_| rand()).collect();
            let cache = KvCache { k: &mut k, v: &mut v, n_ctx };
            let q: Vec<f32> = (0..n * c.q_dim()).map(|_| rand() * 3.0).collect();
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let mut want = vec![0.0; n * c.q_dim()];
                let mut att = vec![0.0; threads * n_ctx];
                attention(&pool, c, &cache, layer, pos0, n, &q, &mut att, &mut want);
                let mut got = vec![f32::NAN; n * c.q_dim()];
                let mut s = AttentionScratch::default();
                attention_batched(&pool, c, &cache, layer, pos0, n, &q, &mut s, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5,
                        "window {:?}, {threads} threads, [{i}]: {g} vs {w}",
                        c.sliding_window
                    );
                }
            }
        }
    }
}
