//! The engine's forward pass: the same list of steps as `Session::forward`, over the rows of
//! every sequence in the step.
//!
//! Rows are laid out part by part (one part per sequence), the parts whose rows take the tiled
//! GEMM first: each base projection is then two calls, one per [`Path`], over contiguous rows,
//! reading every weight once (or twice, when both kinds are present). Each sequence's adapters
//! act on its own rows (`apply_adapters`, summing as its session batch would); norms, RoPE and
//! activations go row by row; the KV cache and attention are per sequence, the short-query
//! attention of all sequences in one parallel job.

use super::Engine;
use crate::adapter::{apply_adapters, runs_on_caller, Adapter, LoraScratch};
use crate::attention::{attention_batched, attention_per_query, AttentionInput, QueryBlock, BATCHED_ATTENTION_MIN};
use crate::error::Result;
use crate::kernels::{self, Path};
use crate::model::{Linear, Model};
use crate::session::{act_mul_rows, rmsnorm_rows, rope_any, rope_tables, zeroed, Activations};
use crate::threadpool::{split_range, SharedMut, ThreadPool};
use std::sync::Arc;

/// One sequence's rows in a step.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part {
    pub slot: usize,
    /// First row in the step's buffers.
    pub row0: usize,
    /// Rows (tokens).
    pub n: usize,
    /// Position of the first token in the sequence.
    pub pos0: usize,
    /// Size of the batch a lone session would have evaluated these tokens in: decides how
    /// every product sums.
    pub batch: usize,
    /// The last row's logits are wanted (a decoding token, or a prompt's last).
    pub logits: bool,
}

/// The step's activation buffers, sized for `rows` rows and `max_logits` rows of logits.
pub(super) struct StepScratch {
    act: Activations,
    /// `[max_logits, hidden]` the final-normed last rows of parts that want logits
    last: Vec<f32>,
    /// `[max_logits, vocab]`, in the order of the parts that want them
    pub(super) logits: Vec<f32>,
    /// The adapters' scratch: one per thread (sequences' adapters run in parallel).
    lora: Vec<LoraScratch>,
    rows: usize,
}

impl StepScratch {
    pub(super) fn new(model: &Model, pool: &ThreadPool, rows: usize, max_logits: usize, n_ctx: usize) -> Result<Self> {
        let c = &model.config;
        let s = StepScratch {
            act: Activations::new(c, rows, pool.n_threads(), n_ctx)?,
            last: zeroed("activations", &[max_logits, c.hidden_size])?,
            logits: zeroed("logits", &[max_logits, c.vocab_size])?,
            lora: (0..pool.n_threads()).map(|_| LoraScratch::default()).collect(),
            rows,
        };
        kernels::reserve_decode_scratch(pool, c.hidden_size.max(c.q_dim()).max(c.intermediate_size));
        Ok(s)
    }

    /// Grows the adapters' scratch for a request's set.
    pub(super) fn reserve_adapters(&mut self, adapters: &[(Arc<Adapter>, f32)]) {
        for l in &mut self.lora {
            l.reserve(self.rows, adapters);
        }
    }
}

/// Runs the step `e.parts` describes; fills `e.s.logits` for the parts that want them.
pub(super) fn forward(e: &mut Engine) {
    let Engine { model, pool, slots, parts, s, .. } = e;
    let parts: &[Part] = parts;
    let c = &model.config;
    let n: usize = parts.iter().map(|p| p.n).sum();
    let tiled: usize = parts.iter().filter(|p| p.batch > 1).map(|p| p.n).sum();
    let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let half = c.head_dim / 2;
    let eps = c.rms_norm_eps;

    // Embeddings and rotary tables, row by row.
    let emb = model.embed_tokens.weights();
    for p in parts {
        let sq = slots[p.slot].seq.as_ref().expect("a planned slot holds a sequence");
        for t in 0..p.n {
            let pos = p.pos0 + t;
            let tok = match sq.pending {
                Some(tok) => tok,
                None => sq.prompt[pos],
            };
            let row = p.row0 + t;
            emb.to_f32(tok as usize * h, &mut s.act.x[row * h..(row + 1) * h]);
            rope_tables(&model.rope_inv_freq, pos, 1, &mut s.act.cos[row * half..], &mut s.act.sin[row * half..]);
        }
    }
    // The tokens join their sequences' histories (a part's tokens are all evaluated below).
    for p in parts {
        let sq = slots[p.slot].seq.as_mut().expect("a planned slot holds a sequence");
        match sq.pending.take() {
            Some(tok) => sq.history.push(tok),
            None => sq.history.extend_from_slice(&sq.prompt[p.pos0..p.pos0 + p.n]),
        }
    }

    for (li, layer) in model.layers.iter().enumerate() {
        // Attention block.
        rmsnorm_rows(&mut s.act.xb[..n * h], &s.act.x[..n * h], &layer.input_norm, eps);
        let lin = Linears { pool, slots, parts, n, tiled };
        lin.run(
            &mut s.lora,
            [&layer.q_proj, &layer.k_proj, &layer.v_proj],
            &s.act.xb[..n * h],
            [&mut s.act.q[..n * q_dim], &mut s.act.k[..n * kv_dim], &mut s.act.v[..n * kv_dim]],
        );
        for row in 0..n {
            let (cos, sin) = (&s.act.cos[row * half..(row + 1) * half], &s.act.sin[row * half..(row + 1) * half]);
            for head in s.act.q[row * q_dim..(row + 1) * q_dim].chunks_exact_mut(c.head_dim) {
                rope_any(head, cos, sin, c.rope_interleaved);
            }
            for head in s.act.k[row * kv_dim..(row + 1) * kv_dim].chunks_exact_mut(c.head_dim) {
                rope_any(head, cos, sin, c.rope_interleaved);
            }
        }
        for p in parts {
            let (a, b) = (p.row0 * kv_dim, (p.row0 + p.n) * kv_dim);
            slots[p.slot].cache.store(c, li, p.pos0, p.n, &s.act.k[a..b], &s.act.v[a..b]);
        }
        // Long prompt pieces as matrix products, one sequence at a time; every other query in
        // one job. (`attention` of a session decides by the same batch size.)
        for p in parts.iter().filter(|p| p.batch >= BATCHED_ATTENTION_MIN) {
            let (a, b) = (p.row0 * q_dim, (p.row0 + p.n) * q_dim);
            let inp =
                AttentionInput { c, cache: &slots[p.slot].cache, layer: li, pos0: p.pos0, n: p.n, q: &s.act.q[a..b] };
            attention_batched(pool, &inp, &mut s.act.attention.batched, &mut s.act.att_out[a..b]);
        }
        let blocks = parts.iter().filter(|p| p.batch < BATCHED_ATTENTION_MIN).count();
        if blocks > 0 {
            let block = |i: usize| {
                let p = parts.iter().filter(|p| p.batch < BATCHED_ATTENTION_MIN).nth(i).expect("i < blocks");
                QueryBlock { cache: &slots[p.slot].cache, pos0: p.pos0, n: p.n, row0: p.row0 }
            };
            attention_per_query(
                pool,
                c,
                li,
                blocks,
                block,
                &s.act.q[..n * q_dim],
                &mut s.act.attention.scores,
                &mut s.act.att_out,
            );
        }
        let lin = Linears { pool, slots, parts, n, tiled };
        lin.run(&mut s.lora, [&layer.o_proj], &s.act.att_out[..n * q_dim], [&mut s.act.out[..n * h]]);
        kernels::add(&mut s.act.x[..n * h], &s.act.out[..n * h]);

        // MLP block.
        rmsnorm_rows(&mut s.act.xb[..n * h], &s.act.x[..n * h], &layer.post_attention_norm, eps);
        lin.run(
            &mut s.lora,
            [&layer.gate_proj, &layer.up_proj],
            &s.act.xb[..n * h],
            [&mut s.act.gate[..n * inter], &mut s.act.up[..n * inter]],
        );
        act_mul_rows(c.hidden_act, &mut s.act.gate[..n * inter], &s.act.up[..n * inter], inter);
        lin.run(&mut s.lora, [&layer.down_proj], &s.act.gate[..n * inter], [&mut s.act.out[..n * h]]);
        kernels::add(&mut s.act.x[..n * h], &s.act.out[..n * h]);
    }

    // Final norm and the output head, for the last row of each part that wants logits: a
    // session computes them for one token, so they take the dot-product path.
    let mut m = 0;
    for p in parts.iter().filter(|p| p.logits) {
        let row = p.row0 + p.n - 1;
        kernels::rmsnorm(&mut s.last[m * h..(m + 1) * h], &s.act.x[row * h..(row + 1) * h], &model.norm, eps);
        m += 1;
    }
    if m == 0 {
        return;
    }
    // One row per part that wants logits, each "a batch of one".
    let vocab = c.vocab_size;
    let head = &model.lm_head;
    kernels::matmul_many_path(pool, &[head.mat()], &s.last[..m * h], m, &mut [&mut s.logits[..m * vocab]], Path::Dot);
    for (j, p) in parts.iter().filter(|p| p.logits).enumerate() {
        let sq = slots[p.slot].seq.as_ref().expect("a planned slot holds a sequence");
        let (x, y) = (&s.last[j * h..(j + 1) * h], &mut s.logits[j * vocab..(j + 1) * vocab]);
        add_adapters(pool, &mut s.lora[0], &sq.adapters, head, x, 1, 1, y);
        add_bias(head, y);
    }
}

/// What a step's projections need: the rows and the sequences they belong to.
struct Linears<'a> {
    pool: &'a ThreadPool,
    slots: &'a [super::Slot],
    parts: &'a [Part],
    /// All rows.
    n: usize,
    /// The first `tiled` rows take the tiled GEMM, the rest dot products.
    tiled: usize,
}

impl Linears<'_> {
    /// `ys[i] = x·Wᵢᵀ (+ each sequence's adapters on its rows) + bᵢ`, for all rows: the engine's
    /// `session::linear`.
    fn run<const N: usize>(&self, lora: &mut [LoraScratch], lins: [&Linear; N], x: &[f32], mut ys: [&mut [f32]; N]) {
        let (n, tiled) = (self.n, self.tiled);
        let mats = lins.map(Linear::mat);
        let cols = mats[0].cols;
        if let [p] = self.parts {
            // One sequence: its rows all take one path, as in its session.
            let seq = self.slots[p.slot].seq.as_ref().expect("a planned slot holds a sequence");
            let path = if tiled > 0 { Path::Tiled } else { Path::Dot };
            let mut lora = lora[0].with(&seq.adapters);
            crate::session::linear_path(self.pool, &mut lora, lins, &x[..n * cols], n, p.batch, path, ys);
            return;
        }
        if tiled > 0 {
            let mut heads: [&mut [f32]; N] = std::array::from_fn(|_| &mut [][..]);
            for (i, (y, m)) in ys.iter_mut().zip(&mats).enumerate() {
                heads[i] = &mut y[..tiled * m.rows];
            }
            kernels::matmul_many_path(self.pool, &mats, &x[..tiled * cols], tiled, &mut heads, Path::Tiled);
        }
        if n > tiled {
            let mut tails: [&mut [f32]; N] = std::array::from_fn(|_| &mut [][..]);
            for (i, (y, m)) in ys.iter_mut().zip(&mats).enumerate() {
                tails[i] = &mut y[tiled * m.rows..n * m.rows];
            }
            kernels::matmul_many_path(self.pool, &mats, &x[tiled * cols..n * cols], n - tiled, &mut tails, Path::Dot);
        }
        // The adapters, sequence by sequence. Those whose products are small enough for one
        // thread (decode rows) run one sequence per thread, every projection of the group in
        // the same job, each thread with its own scratch; the others share the pool per product.
        let seq = |p: &Part| self.slots[p.slot].seq.as_ref().expect("a planned slot holds a sequence");
        let on_caller = |p: &Part| {
            let a = &seq(p).adapters;
            !a.is_empty() && lins.iter().all(|lin| runs_on_caller(a, lin, p.n, p.batch))
        };
        let parallel = self.parts.iter().filter(|p| on_caller(p)).count();
        let rows_of = |p: &Part, lin: &Linear| {
            (p.row0 * cols..(p.row0 + p.n) * cols, p.row0 * lin.rows..(p.row0 + p.n) * lin.rows)
        };
        if parallel > 1 {
            let outs: [SharedMut<f32>; N] = std::array::from_fn(|i| SharedMut::new(&mut ys[i][..]));
            let scratch = SharedMut::new(lora);
            self.pool.run(|ti, nt| {
                // SAFETY: thread `ti` alone uses scratch `ti` (one per pool thread).
                let lora = unsafe { &mut scratch.slice(ti..ti + 1)[0] };
                let mine = split_range(parallel, ti, nt, 1);
                for p in self.parts.iter().filter(|p| on_caller(p)).skip(mine.start).take(mine.len()) {
                    for (lin, out) in lins.iter().zip(&outs) {
                        let (xr, yr) = rows_of(p, lin);
                        // SAFETY: each part's output rows are disjoint, and each part goes to
                        // one thread.
                        let y = unsafe { out.slice(yr) };
                        add_adapters(self.pool, lora, &seq(p).adapters, lin, &x[xr], p.n, p.batch, y);
                    }
                }
            });
        }
        for (lin, y) in lins.iter().zip(ys) {
            for p in self.parts.iter().filter(|p| parallel <= 1 || !on_caller(p)) {
                let (xr, yr) = rows_of(p, lin);
                add_adapters(self.pool, &mut lora[0], &seq(p).adapters, lin, &x[xr], p.n, p.batch, &mut y[yr]);
            }
            add_bias(lin, y);
        }
    }
}

/// A sequence's adapters on its rows, summing as its session batch of `batch` tokens would.
#[allow(clippy::too_many_arguments)]
fn add_adapters(
    pool: &ThreadPool,
    lora: &mut LoraScratch,
    adapters: &[(Arc<Adapter>, f32)],
    lin: &Linear,
    x: &[f32],
    n: usize,
    batch: usize,
    y: &mut [f32],
) {
    if !adapters.is_empty() {
        apply_adapters(pool, &mut lora.with(adapters), lin, x, n, batch, y);
    }
}

fn add_bias(lin: &Linear, y: &mut [f32]) {
    if let Some(b) = &lin.bias {
        for row in y.chunks_exact_mut(lin.rows) {
            kernels::add(row, b);
        }
    }
}
