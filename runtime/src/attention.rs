//! Causal grouped-query attention of a batch's queries over the KV cache (sliding window when
//! configured): per (token, head) for decode and short batches, as two matrix products per KV
//! head for prefill; both give the same result.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::kernels::{self, MatRef, Path::Tiled, Weights};
use crate::kv_cache::KvCache;
use crate::session::zeroed;
use crate::threadpool::{split_range, SharedMut, ThreadPool};

/// One layer's attention problem: the model's geometry, the cache (this batch's keys and
/// values already stored), which layer, and the batch's queries at positions `pos0..pos0 + n`.
#[derive(Clone, Copy)]
pub(crate) struct AttentionInput<'a> {
    pub c: &'a ModelConfig,
    pub cache: &'a KvCache,
    pub layer: usize,
    /// Position of the batch's first token.
    pub pos0: usize,
    /// Tokens in the batch.
    pub n: usize,
    /// `[n, q_dim]` the batch's queries, RoPE applied
    pub q: &'a [f32],
}

/// Buffers of both attention implementations, sized for a session's threads and context.
pub(crate) struct AttentionScratch {
    /// `[n_threads, n_ctx]` scores of [`attention_per_query`], one row per thread
    pub(crate) scores: Vec<f32>,
    /// [`attention_batched`]'s buffers for one KV head, allocated on first use
    pub(crate) batched: BatchedScratch,
}

impl AttentionScratch {
    pub(crate) fn new(n_threads: usize, n_ctx: usize) -> Result<AttentionScratch> {
        Ok(AttentionScratch {
            scores: zeroed("attention scores", &[n_threads, n_ctx])?,
            batched: BatchedScratch::default(),
        })
    }
}

/// Batches of at least this many tokens take [`attention_batched`].
pub(crate) const BATCHED_ATTENTION_MIN: usize = 16;

/// Attention of `inp`'s queries into `out` (`[n, q_dim]`), by whichever implementation is
/// faster for the batch's size.
pub(crate) fn attention(pool: &ThreadPool, inp: &AttentionInput, s: &mut AttentionScratch, out: &mut [f32]) {
    if inp.n >= BATCHED_ATTENTION_MIN {
        attention_batched(pool, inp, &mut s.batched, out);
    } else {
        let block = QueryBlock { cache: inp.cache, pos0: inp.pos0, n: inp.n, row0: 0 };
        attention_per_query(pool, inp.c, inp.layer, 1, |_| block, inp.q, &mut s.scores, out);
    }
}

/// Consecutive queries of one sequence: rows `row0..row0 + n` of the batch, at positions
/// `pos0..pos0 + n` of `cache`.
#[derive(Clone, Copy)]
pub(crate) struct QueryBlock<'a> {
    pub cache: &'a KvCache,
    pub pos0: usize,
    pub n: usize,
    pub row0: usize,
}

/// Causal grouped-query attention of `blocks` blocks of queries (`block(i)`; a session has one,
/// the batching engine one per sequence) over their caches, into `out` (`[rows, q_dim]`, the
/// rows of `q`), one dispatch for all; `att` holds one `[n_ctx]` score row per thread. A query's
/// result depends only on itself and its cache.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_per_query<'a>(
    pool: &ThreadPool,
    c: &ModelConfig,
    layer: usize,
    blocks: usize,
    block: impl Fn(usize) -> QueryBlock<'a> + Sync,
    q: &[f32],
    att: &mut [f32],
    out: &mut [f32],
) {
    let (hd, nh, q_dim) = (c.head_dim, c.num_attention_heads, c.q_dim());
    let group = nh / c.num_key_value_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let items: usize = (0..blocks).map(|b| block(b).n * nh).sum();
    let n_ctx = att.len() / pool.n_threads().max(1);
    let att = SharedMut::new(att);
    let out = SharedMut::new(out);
    pool.run(|ti, nt| {
        // SAFETY: row `ti` of the score buffer belongs to this thread alone.
        let scores_row = unsafe { att.slice(ti * n_ctx..(ti + 1) * n_ctx) };
        let range = split_range(items, ti, nt, 1);
        let (mut b, mut first) = (0, 0);
        for item in range {
            // The block holding `item` (blocks are in order; items only grow).
            while item >= first + block(b).n * nh {
                first += block(b).n * nh;
                b += 1;
            }
            let QueryBlock { cache, pos0, row0, .. } = block(b);
            let (t, head) = ((item - first) / nh, (item - first) % nh);
            let pos = pos0 + t;
            let row = row0 + t;
            let lo = c.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let base = cache.at(c, layer, head / group, 0);
            let qv = &q[row * q_dim + head * hd..row * q_dim + (head + 1) * hd];
            let (keys, values) =
                (&cache.k[base + lo * hd..base + (pos + 1) * hd], &cache.v[base + lo * hd..base + (pos + 1) * hd]);
            let scores = &mut scores_row[lo..=pos];
            kernels::matvec_local(MatRef { w: Weights::F32(keys), rows: pos + 1 - lo, cols: hd }, qv, scores);
            scores.iter_mut().for_each(|s| *s *= scale);
            kernels::softmax(scores);
            // SAFETY: each (row, head) item belongs to one thread; its output slice is disjoint.
            let o = unsafe { out.slice(row * q_dim + head * hd..row * q_dim + (head + 1) * hd) };
            kernels::weighted_sum(o, scores, values);
        }
    });
}

/// Buffers of [`attention_batched`] for one KV head: rows are `(token, query head of the group)`.
#[derive(Default)]
pub(crate) struct BatchedScratch {
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
/// `P·V`. Same result as [`attention_per_query`], but at the matmul kernel's speed: one score per
/// query and key costs a dot product of `head_dim` either way, and the products waste at most the
/// masked half.
pub(crate) fn attention_batched(pool: &ThreadPool, inp: &AttentionInput, s: &mut BatchedScratch, out: &mut [f32]) {
    let AttentionInput { c, cache, layer, pos0, n, q } = *inp;
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
        // Tiled whatever the rows (the engine may pass a single query): a query's result then
        // depends only on its own position.
        kernels::matmul_many_path(pool, &[k_mat], &s.q[..rows * hd], rows, &mut [&mut s.p[..rows * keys_n]], Tiled);
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
        kernels::matmul_many_path(pool, &[v_mat], &s.p[..rows * keys_n], rows, &mut [&mut s.o[..rows * hd]], Tiled);
        for t in 0..n {
            let dst = t * q_dim + g * width;
            out[dst..dst + width].copy_from_slice(&s.o[t * width..(t + 1) * width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let k: Vec<f32> = (0..size).map(|_| rand()).collect();
            let v: Vec<f32> = (0..size).map(|_| rand()).collect();
            let cache = KvCache { k, v, n_ctx };
            let q: Vec<f32> = (0..n * c.q_dim()).map(|_| rand() * 3.0).collect();
            let inp = AttentionInput { c, cache: &cache, layer, pos0, n, q: &q };
            for threads in [1, 2] {
                let pool = ThreadPool::new(threads);
                let mut want = vec![0.0; n * c.q_dim()];
                let mut att = vec![0.0; threads * n_ctx];
                let block = QueryBlock { cache: &cache, pos0, n, row0: 0 };
                attention_per_query(&pool, c, layer, 1, |_| block, &q, &mut att, &mut want);
                let mut got = vec![f32::NAN; n * c.q_dim()];
                let mut s = BatchedScratch::default();
                attention_batched(&pool, &inp, &mut s, &mut got);
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
