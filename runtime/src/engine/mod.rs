//! Many requests at once on one model: continuous batching with a different adapter set per
//! sequence.
//!
//! An [`Engine`] holds up to `max_sequences` sequences, each in a slot with its own KV cache,
//! adapters and scales, sampler (with its constraint) and stop rules. [`Engine::step`] advances
//! every active sequence by one forward pass over all their rows: each decoding sequence's next
//! token, and pieces of joining prompts (chunked prefill, at most `step_tokens` prompt tokens a
//! step, so a long prompt does not stall the others' streams). The base projections run once
//! over all rows; each sequence's adapters over its own rows (`forward.rs`). Requests join
//! ([`Engine::submit`]) and leave (finished, or [`Engine::cancel`]) between any two steps.
//!
//! **Same answers.** A sequence's tokens equal those of [`crate::generate()`] in a lone
//! [`crate::Session`] with the same `n_batch`, adapters and sampling, whatever else shares its
//! steps: every row of a step is computed the way that session would have computed it. A
//! session runs its prompt in batches of `n_batch` tokens and then one token at a time, and
//! the kernels sum differently for one token (dot products) than for several (the tiled GEMM),
//! but within either way a token's result does not depend on the others in its batch
//! ([`crate::kernels::Path`]). So each row carries the size of the batch it would have had in the
//! session, and each operation takes the path that size implies.
//!
//! **Prefix reuse.** A slot keeps its last prompt's keys and values when the request ends; a
//! new request with the same adapters and scales goes to the free slot sharing the longest
//! start with its prompt, in whole `n_batch` batches (keyed by the tokens and the adapter set; a slot's kept prefix is overwritten when
//! the slot takes a request, least recently used first among equals), and skips evaluating
//! them: a common system prompt or few-shot examples are read once per slot.
//!
//! Memory: the caches (`max_sequences × n_ctx` positions) and activation buffers are allocated
//! when the engine is made (zeroed pages, paid for as they are used); a step allocates nothing.
//! A request's sampler is allocated when it is submitted.

mod forward;

use crate::adapter::check_scale;
use crate::constraint::Constraint;
use crate::error::{Error, Result};
use crate::generate::{Generation, Reply, StopReason};
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::sampler::{Sampler, SamplingParams};
use crate::session::{default_threads, ActiveAdapters, MAX_THREADS};
use crate::threadpool::ThreadPool;
use forward::{Part, StepScratch};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options for [`Engine::new`].
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Most sequences at once; 0 = 8.
    pub max_sequences: usize,
    /// Context of each sequence in tokens (prompt and reply); 0 = the model's, capped at 2048.
    pub n_ctx: usize,
    /// The session batch size whose answers the engine reproduces
    /// ([`crate::SessionOptions::n_batch`]); 0 = 128, as a session.
    pub n_batch: usize,
    /// Most prompt tokens evaluated in one step, over all joining sequences; 0 = `n_batch`.
    pub step_tokens: usize,
    /// Threads; 0 = all cores.
    pub n_threads: usize,
}

/// One request: prompt tokens, the adapters with their scales, how to sample, and an optional
/// constraint on the reply.
pub struct Request {
    pub prompt: Vec<u32>,
    pub adapters: ActiveAdapters,
    pub params: SamplingParams,
    pub constraint: Option<Constraint>,
}

impl Request {
    /// A request for `prompt` on the base model alone.
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Request {
        Request { prompt, adapters: Vec::new(), params, constraint: None }
    }
}

/// A request's number, unique within its engine.
pub type RequestId = u64;

/// What [`Engine::step`] reports.
pub enum Event<'a> {
    /// More of a request's reply (complete characters, never the start of a stop string).
    Text { id: RequestId, text: &'a str },
    /// The logits a request's next token is about to be sampled from (`[vocab]`), for
    /// log-probabilities or checks; ignore it otherwise.
    Logits { id: RequestId, logits: &'a [f32] },
    /// A request has ended: its reply, or the error that ended it. Its slot is free again.
    Done { id: RequestId, result: Result<Generation> },
}

/// A sequence in a slot.
struct Seq {
    id: RequestId,
    prompt: Vec<u32>,
    /// Tokens evaluated into the slot's cache, in order (the prompt first).
    history: Vec<u32>,
    adapters: ActiveAdapters,
    sampler: Sampler,
    reply: Reply,
    /// Sampled and not yet evaluated: the next step's row.
    pending: Option<u32>,
    /// Tokens sampled so far.
    sampled: usize,
    cancelled: bool,
    submitted: Instant,
    first_token: Option<Instant>,
}

struct Slot {
    cache: KvCache,
    seq: Option<Seq>,
    /// While the slot is free: the prompt tokens at the start of its cache whose keys and
    /// values a new request with the same start may keep (whole `n_batch` batches only).
    cached: Vec<u32>,
    /// The adapters and scales those keys and values were computed with (they change them).
    cached_adapters: ActiveAdapters,
    /// When the slot last took a request (a step count), to pick the least recently used.
    last_used: u64,
}

/// The batching engine: see the module documentation.
pub struct Engine {
    model: Arc<Model>,
    pool: ThreadPool,
    n_ctx: usize,
    n_batch: usize,
    step_tokens: usize,
    slots: Vec<Slot>,
    next_id: RequestId,
    /// Steps run so far.
    steps: u64,
    /// Prompt tokens whose keys and values were kept from an earlier request.
    reused_tokens: u64,
    /// This step's rows, one part per sequence (reused).
    parts: Vec<Part>,
    /// Slot numbers in the order their requests came (reused).
    order: Vec<usize>,
    s: StepScratch,
}

impl Engine {
    pub fn new(model: Arc<Model>, opts: &EngineOptions) -> Result<Engine> {
        let c = &model.config;
        let max_sequences = match opts.max_sequences {
            0 => 8,
            n if n > 4096 => {
                return Err(Error::Input(format!("max_sequences {n} is too many; at most 4096 sequences at once")))
            }
            n => n,
        };
        let n_ctx = match opts.n_ctx {
            0 => c.max_position_embeddings.min(2048),
            n => n.min(c.max_position_embeddings),
        };
        let n_batch = match opts.n_batch {
            0 => 128,
            n => n,
        }
        .min(n_ctx);
        let step_tokens = match opts.step_tokens {
            0 => n_batch,
            n => n,
        };
        let n_threads = match opts.n_threads {
            0 => default_threads(),
            n if n > MAX_THREADS => {
                return Err(Error::Input(format!("{n} threads asked for; at most {MAX_THREADS} are allowed (0 = all)")))
            }
            n => n,
        };
        let mut slots = Vec::with_capacity(max_sequences);
        for _ in 0..max_sequences {
            slots.push(Slot {
                cache: KvCache::new(c, n_ctx)?,
                seq: None,
                cached: Vec::new(),
                cached_adapters: Vec::new(),
                last_used: 0,
            });
        }
        let pool = ThreadPool::new(n_threads);
        let s = StepScratch::new(&model, &pool, step_tokens + max_sequences, max_sequences, n_ctx)?;
        Ok(Engine {
            model,
            pool,
            n_ctx,
            n_batch,
            step_tokens,
            slots,
            next_id: 1,
            steps: 0,
            reused_tokens: 0,
            parts: Vec::with_capacity(max_sequences),
            order: Vec::with_capacity(max_sequences),
            s,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Most sequences at once.
    pub fn max_sequences(&self) -> usize {
        self.slots.len()
    }

    /// Context of each sequence, in tokens.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// Prompt tokens so far whose keys and values were kept from an earlier request instead of
    /// evaluated (prefix reuse).
    pub fn reused_tokens(&self) -> u64 {
        self.reused_tokens
    }

    /// Requests in progress (submitted, not yet reported done).
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    /// Starts a request; it joins the next step. Errors (and nothing changes) when every slot is
    /// taken, the prompt is empty, holds a token outside the vocabulary or does not fit the
    /// context, an adapter was loaded for another model or has a scale out of range, or a
    /// sampling parameter is invalid.
    pub fn submit(&mut self, req: Request) -> Result<RequestId> {
        let vocab = self.model.config.vocab_size;
        if req.prompt.is_empty() {
            return Err(Error::Input("the prompt is empty: give at least one token".into()));
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!("token id {t} is out of range for this model's vocabulary of {vocab}")));
        }
        if req.prompt.len() > self.n_ctx {
            return Err(Error::ContextFull { cached: 0, new: req.prompt.len(), n_ctx: self.n_ctx });
        }
        for (a, scale) in &req.adapters {
            if !a.is_for(&self.model) {
                return Err(Error::AdapterMismatch {
                    msg: format!(
                        "adapter {} was loaded for a different model instance; load it for this engine's model",
                        a.name
                    ),
                    overridable: None,
                });
            }
            check_scale(&a.name, *scale)?;
        }
        self.model.tokenizer()?;
        // Prefix reuse: a free slot keeps the keys and values of its last prompt's whole
        // `n_batch` batches; the request goes to the free slot that shares the longest such
        // start with its prompt (then the least recently used), and those positions are not
        // evaluated again. They hold what a lone session computes for them (a whole batch of
        // `n_batch` tokens from position 0 sums the same way whatever follows), so the answers
        // stay the same. At least the prompt's last batch is evaluated, for its logits.
        let nb = self.n_batch;
        let same_adapters = |kept: &ActiveAdapters| {
            kept.len() == req.adapters.len()
                && kept
                    .iter()
                    .zip(&req.adapters)
                    .all(|((a, s), (b, t))| Arc::ptr_eq(a, b) && s.to_bits() == t.to_bits())
        };
        let reusable = |slot: &Slot| {
            if !same_adapters(&slot.cached_adapters) {
                return 0;
            }
            let common = slot.cached.iter().zip(&req.prompt).take_while(|(a, b)| a == b).count();
            (common / nb * nb).min((req.prompt.len() - 1) / nb * nb)
        };
        let slot = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.seq.is_none())
            .max_by_key(|(_, s)| (reusable(s), std::cmp::Reverse(s.last_used)))
            .map(|(i, _)| i);
        let Some(slot) = slot else {
            return Err(Error::Input(format!(
                "too many sequences: all {} of the engine's slots are busy; wait for a request to finish \
                 or make the engine with a larger max_sequences",
                self.slots.len()
            )));
        };
        let mut sampler = Sampler::new(req.params, vocab)?;
        sampler.set_constraint(req.constraint)?;
        self.s.reserve_adapters(&req.adapters);
        let max_tokens = sampler.params.max_tokens;
        let id = self.next_id;
        self.next_id += 1;
        let mut history = Vec::new();
        history
            .try_reserve_exact(self.n_ctx)
            .map_err(|_| Error::out_of_memory::<u32>("the token history", self.n_ctx))?;
        let reuse = reusable(&self.slots[slot]);
        history.extend_from_slice(&req.prompt[..reuse]);
        self.reused_tokens += reuse as u64;
        self.slots[slot].cached.clear();
        self.slots[slot].cached_adapters.clear();
        self.slots[slot].last_used = self.steps;
        self.slots[slot].seq = Some(Seq {
            id,
            reply: Reply::new(max_tokens.min(self.n_ctx - req.prompt.len() + 1)),
            prompt: req.prompt,
            history,
            adapters: req.adapters,
            sampler,
            pending: None,
            sampled: 0,
            cancelled: false,
            submitted: Instant::now(),
            first_token: None,
        });
        Ok(id)
    }

    /// Ends request `id` at the next step (reported there as done, [`StopReason::Cancelled`]).
    /// Errors if no request in progress has that id.
    pub fn cancel(&mut self, id: RequestId) -> Result<()> {
        match self.slots.iter_mut().filter_map(|s| s.seq.as_mut()).find(|s| s.id == id) {
            Some(seq) => {
                seq.cancelled = true;
                Ok(())
            }
            None => Err(Error::Input(format!("no request {id} is in progress (finished, cancelled or never made)"))),
        }
    }

    /// One forward pass over every active sequence: each decoding sequence's next token, and up
    /// to `step_tokens` tokens of joining prompts (oldest request first). `on_event` gets the new
    /// text of each request (returning `false` cancels that request) and every request that
    /// ended. Returns the number of requests still in progress.
    pub fn step(&mut self, mut on_event: impl FnMut(Event) -> bool) -> usize {
        self.steps += 1;
        // Cancelled requests leave first.
        for slot in &mut self.slots {
            if slot.seq.as_ref().is_some_and(|s| s.cancelled) {
                let seq = slot.seq.take().expect("checked");
                keep_prefix(slot, &seq, self.n_batch);
                finish(&self.model, seq, StopReason::Cancelled, &mut on_event);
            }
        }
        self.plan();
        if self.parts.is_empty() {
            return self.active();
        }
        forward::forward(self);
        // Sample for every part that ends with its logits.
        for (j, p) in self.parts.iter().filter(|p| p.logits).enumerate() {
            let slot = &mut self.slots[p.slot];
            let mut seq = slot.seq.take().expect("a planned slot holds a sequence");
            let logits = &self.s.logits[j * self.model.config.vocab_size..(j + 1) * self.model.config.vocab_size];
            match sample(&self.model, &mut seq, logits, self.n_ctx, &mut on_event) {
                Ok(None) => slot.seq = Some(seq),
                Ok(Some(stop)) => {
                    keep_prefix(slot, &seq, self.n_batch);
                    finish(&self.model, seq, stop, &mut on_event)
                }
                Err(e) => {
                    on_event(Event::Done { id: seq.id, result: Err(e) });
                }
            }
        }
        self.active()
    }

    /// Steps until every request has ended.
    pub fn run(&mut self, mut on_event: impl FnMut(Event) -> bool) {
        while self.active() > 0 {
            self.step(&mut on_event);
        }
    }

    /// This step's rows: a decoding sequence's pending token, and pieces of prompts in request
    /// order while the step's prompt budget lasts. A piece never crosses the boundary of the
    /// `n_batch` batch the session would have read its tokens in, so each part's rows share
    /// that batch's size. Parts whose rows take the tiled GEMM come first.
    fn plan(&mut self) {
        self.parts.clear();
        self.order.clear();
        self.order.extend((0..self.slots.len()).filter(|&i| self.slots[i].seq.is_some()));
        let slots = &self.slots;
        self.order.sort_by_key(|&i| slots[i].seq.as_ref().map_or(0, |s| s.id));
        let mut budget = self.step_tokens;
        for &i in &self.order {
            let seq = self.slots[i].seq.as_ref().expect("ordered slots hold sequences");
            let done = seq.history.len();
            if seq.pending.is_some() {
                self.parts.push(Part { slot: i, row0: 0, n: 1, pos0: done, batch: 1, logits: true });
            } else if done < seq.prompt.len() && budget > 0 {
                let len = seq.prompt.len();
                let start = done / self.n_batch * self.n_batch;
                let end = (start + self.n_batch).min(len);
                let n = (end - done).min(budget);
                budget -= n;
                self.parts.push(Part { slot: i, row0: 0, n, pos0: done, batch: end - start, logits: done + n == len });
            }
        }
        self.parts.sort_by_key(|p| p.batch == 1);
        let mut row = 0;
        for p in &mut self.parts {
            p.row0 = row;
            row += p.n;
        }
    }
}

/// Samples a sequence's next token from its logits and takes it into the reply, as
/// [`crate::generate()`]'s loop does: `Some(reason)` when the reply ends.
fn sample(
    model: &Model,
    seq: &mut Seq,
    logits: &[f32],
    n_ctx: usize,
    on_event: &mut impl FnMut(Event) -> bool,
) -> Result<Option<StopReason>> {
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "{} of {} logits at position {} are NaN or infinite: the model computes non-finite values; likely \
             causes: a NaN or infinite weight in {} or an active adapter's weights or scale, or a wrong \
             config.json value (rms_norm_eps, rope settings)",
            logits.iter().filter(|v| !v.is_finite()).count(),
            logits.len(),
            seq.history.len() - 1,
            model.dir.display()
        )));
    }
    on_event(Event::Logits { id: seq.id, logits });
    let params = seq.sampler.params.clone();
    if seq.first_token.is_none() {
        seq.first_token = Some(Instant::now());
    }
    if params.max_tokens == 0 {
        return Ok(Some(StopReason::MaxTokens));
    }
    let next = seq.sampler.next_token(logits, &seq.history)?;
    seq.sampled += 1;
    let id = seq.id;
    let mut on_text = |text: &str| on_event(Event::Text { id, text });
    if let Some(stop) = seq.reply.push(model, &params, seq.sampler.constraint_complete(), next, &mut on_text)? {
        return Ok(Some(stop));
    }
    if seq.sampled == params.max_tokens {
        return Ok(Some(StopReason::MaxTokens));
    }
    if seq.history.len() >= n_ctx {
        return Ok(Some(StopReason::ContextFull));
    }
    seq.pending = Some(next);
    Ok(None)
}

/// What a freed slot keeps for prefix reuse: the prompt's whole `n_batch` batches that were
/// evaluated (a batch cut short by the prompt's end sums differently, and is not kept).
fn keep_prefix(slot: &mut Slot, seq: &Seq, n_batch: usize) {
    let evaluated = seq.history.len().min(seq.prompt.len());
    slot.cached.clear();
    slot.cached.extend_from_slice(&seq.prompt[..evaluated / n_batch * n_batch]);
    slot.cached_adapters.clone_from(&seq.adapters);
}

/// Reports a sequence's end.
fn finish(model: &Model, seq: Seq, stop: StopReason, on_event: &mut impl FnMut(Event) -> bool) {
    let Seq { id, reply, prompt, submitted, first_token, .. } = seq;
    let mut on_text = |text: &str| on_event(Event::Text { id, text });
    let result = reply.finish(model, stop, &mut on_text).map(|(tokens, text)| {
        let first = first_token.unwrap_or_else(Instant::now);
        Generation {
            tokens,
            text,
            stop,
            prompt_tokens: prompt.len(),
            prefill_time: first.duration_since(submitted),
            decode_time: first.elapsed().max(Duration::ZERO),
        }
    });
    on_event(Event::Done { id, result });
}
