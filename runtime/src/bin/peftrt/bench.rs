//! `peftrt bench`: prefill and decode speed, adapter load and switch times, peak memory; with a
//! constraint, what it costs (compile time, and greedy decode with and without it).

use crate::common::{ConstraintArgs, Loaded, ModelArgs};
use anyhow::{bail, Result};
use peftrt::constraint::Constraint;
use peftrt::{Sampler, SamplingParams, Session};
use std::path::PathBuf;
use std::time::Instant;

/// The constraint to measure: `generate`'s flags, but `--json-object` for any JSON object
/// (`--json` here prints the results as JSON).
#[derive(clap::Args)]
#[group(multiple = false)]
struct BenchConstraint {
    /// Measure decoding constrained to this JSON Schema file.
    #[arg(long = "json-schema")]
    json_schema: Option<PathBuf>,
    /// Measure decoding constrained to any JSON object.
    #[arg(long = "json-object")]
    json_object: bool,
    /// Measure decoding constrained to this regular expression.
    #[arg(long)]
    regex: Option<String>,
    /// Measure decoding constrained to this Lark grammar file.
    #[arg(long)]
    grammar: Option<PathBuf>,
}

impl BenchConstraint {
    fn args(&self) -> ConstraintArgs {
        ConstraintArgs {
            json_schema: self.json_schema.clone(),
            json: self.json_object,
            regex: self.regex.clone(),
            grammar: self.grammar.clone(),
        }
    }
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(long = "prompt-tokens", default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long = "gen-tokens", default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    c: BenchConstraint,
    /// Also time the batching engine with N sequences at once (each its own prompt of
    /// --prompt-tokens, then --gen-tokens greedy tokens): aggregate decode tok/s, time to first
    /// token (p50/p99) and per-stream decode tok/s. The --adapter flags apply to every sequence.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: Option<u64>,
    /// With --parallel: adapters dealt out to the sequences in turn (sequence i takes the
    /// (i mod count)-th), instead of the --adapter flags for all.
    #[arg(long = "adapters-per-sequence", value_name = "DIR[:SCALE]", num_args = 1.., requires = "parallel")]
    adapters_per_sequence: Vec<String>,
}

/// The batching engine's speed with `--parallel` sequences (medians over `--repeat` runs).
struct ParallelCost {
    sequences: usize,
    /// Tokens decoded per second over all sequences, once every sequence has its first token.
    aggregate_tok_s: f64,
    ttft_ms_p50: f64,
    ttft_ms_p99: f64,
    /// The median sequence's decode tok/s.
    per_stream_tok_s: f64,
    /// One session decoding the first sequence's request (its prompt and adapters), timed in
    /// alternation with the engine's rounds.
    session_tok_s: f64,
}

/// Greedy decode speed with and without a constraint, measured in alternating runs.
struct ConstraintCost {
    /// The first compile, which also builds the model's token trie.
    first_compile_ms: f64,
    /// A compile once the trie exists (what each request with a new schema pays).
    compile_ms: f64,
    free_tok_s: f64,
    constrained_tok_s: f64,
    /// Steps where the model's own choice broke the grammar and the full mask was computed.
    masked_steps: usize,
    steps: usize,
}

pub fn run(a: Args) -> Result<()> {
    // The engine streams text, so it needs the tokenizer; the rest of bench does not.
    let Loaded { model, mut session, load_ms, adapter_load_ms } = a.m.load(a.parallel.is_some())?;
    let vocab = model.config.vocab_size as u32;
    if a.prompt_tokens == 0 || a.repeat == 0 {
        bail!("--prompt-tokens and --repeat must be at least 1");
    }
    if a.prompt_tokens.checked_add(a.gen_tokens).is_none_or(|n| n > session.n_ctx()) {
        bail!(
            "--prompt-tokens {} + --gen-tokens {} exceed the context of {} tokens; lower them or raise --ctx-size",
            a.prompt_tokens,
            a.gen_tokens,
            session.n_ctx()
        );
    }
    // Fixed pseudo-random token ids, away from the special tokens at the start of the vocabulary.
    let pick = |i: usize, mul: usize| ((i * mul) as u32 % (vocab.saturating_sub(200).max(1))) + 100.min(vocab - 1);
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(|i| pick(i, 7919)).collect();
    // With adapters, each round also runs without them (the order alternating between rounds),
    // in this process: the adapters' overhead from pairs that saw the same state of the machine.
    let active = session.adapters().to_vec();
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    let (mut pp_off, mut tg_off) = (Vec::new(), Vec::new());
    let timed = |session: &mut Session| -> Result<(f64, f64)> {
        session.reset();
        let t = Instant::now();
        session.eval(&prompt)?;
        let prefill = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..a.gen_tokens {
            session.eval(&[pick(i, 31)])?;
        }
        Ok((prefill, a.gen_tokens as f64 / t.elapsed().as_secs_f64()))
    };
    for r in 0..=a.repeat {
        let off_first = r % 2 == 1;
        let mut off = None;
        if !active.is_empty() && off_first {
            session.set_adapters(&[])?;
            off = Some(timed(&mut session)?);
            session.set_adapters(&active)?;
        }
        let (prefill, decode) = timed(&mut session)?;
        if !active.is_empty() && !off_first {
            session.set_adapters(&[])?;
            off = Some(timed(&mut session)?);
            session.set_adapters(&active)?;
        }
        if r > 0 {
            // The first run warms the page cache and the CPU caches.
            pp.push(prefill);
            tg.push(decode);
            if let Some((p, d)) = off {
                pp_off.push(p);
                tg_off.push(d);
            }
        }
    }
    // Per round, time per token with the adapters over time per token without; the median.
    let overhead = |on: &[f64], off: &[f64]| {
        let mut r: Vec<f64> = on.iter().zip(off).map(|(on, off)| off / on - 1.0).collect();
        median(&mut r)
    };
    let adapter_cost = (!active.is_empty()).then(|| (overhead(&pp, &pp_off), overhead(&tg, &tg_off)));
    let cost = match a.c.args().spec()? {
        Some(_) => Some(constraint_cost(&a, &model, &mut session, &prompt)?),
        None => None,
    };
    let parallel = match a.parallel {
        Some(n) => Some(parallel_cost(&a, &model, &mut session, n as usize, &pick)?),
        None => None,
    };
    let spread = |v: &[f64]| (v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(0.0, f64::max));
    let (pp_lo, pp_hi) = spread(&pp);
    let (tg_lo, tg_hi) = spread(&tg);
    let (pp_med, tg_med) = (median(&mut pp), median(&mut tg));
    let rss = peak_rss_bytes().unwrap_or(0);
    // Switching adapters: a session's active set replaced (all off, then back on), per switch.
    let switch_us = if active.is_empty() {
        0.0
    } else {
        let t = Instant::now();
        for _ in 0..500 {
            session.set_adapters(&[])?;
            session.set_adapters(&active)?;
        }
        t.elapsed().as_secs_f64() * 1e6 / 1000.0
    };
    if a.json {
        let v = serde_json::json!({
            "model": a.m.model.display().to_string(),
            "threads": session.n_threads(),
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "repeat": a.repeat,
            "load_ms": load_ms,
            "adapters": a.m.adapters,
            "adapter_load_ms": adapter_load_ms,
            "adapter_switch_us": switch_us,
            "prefill_tok_s": pp_med,
            "prefill_tok_s_min": pp_lo,
            "prefill_tok_s_max": pp_hi,
            "decode_tok_s": tg_med,
            "decode_tok_s_min": tg_lo,
            "decode_tok_s_max": tg_hi,
            "peak_rss_bytes": rss,
        });
        let mut v = v;
        if let Some((prefill, decode)) = adapter_cost {
            v["adapter_overhead"] = serde_json::json!({
                "prefill": prefill,
                "decode": decode,
                "no_adapter_prefill_tok_s": median(&mut pp_off.clone()),
                "no_adapter_decode_tok_s": median(&mut tg_off.clone()),
            });
        }
        if let Some(c) = &cost {
            v["constraint"] = serde_json::json!({
                "first_compile_ms": c.first_compile_ms,
                "compile_ms": c.compile_ms,
                "greedy_decode_tok_s": c.free_tok_s,
                "constrained_decode_tok_s": c.constrained_tok_s,
                "ratio": c.constrained_tok_s / c.free_tok_s,
                "masked_steps": c.masked_steps,
                "steps": c.steps,
            });
        }
        if let Some(p) = &parallel {
            v["parallel"] = serde_json::json!({
                "sequences": p.sequences,
                "adapters_per_sequence": a.adapters_per_sequence,
                "aggregate_decode_tok_s": p.aggregate_tok_s,
                "ttft_ms_p50": p.ttft_ms_p50,
                "ttft_ms_p99": p.ttft_ms_p99,
                "per_stream_decode_tok_s": p.per_stream_tok_s,
                "session_decode_tok_s": p.session_tok_s,
                "vs_session_decode": p.aggregate_tok_s / p.session_tok_s,
            });
        }
        println!("{v}");
    } else {
        println!("model      {}", a.m.model.display());
        println!("threads    {}", session.n_threads());
        println!("load       {load_ms:.0} ms");
        if !a.m.adapters.is_empty() {
            println!("adapters   {} (load {adapter_load_ms:.2} ms, switch {switch_us:.2} µs)", a.m.adapters.join(" "));
        }
        println!(
            "prefill    {pp_med:.1} tok/s  (min {pp_lo:.1}, max {pp_hi:.1}; {} tokens, {} runs)",
            a.prompt_tokens, a.repeat
        );
        println!(
            "decode     {tg_med:.1} tok/s  (min {tg_lo:.1}, max {tg_hi:.1}; {} tokens, {} runs)",
            a.gen_tokens, a.repeat
        );
        if let Some((prefill, decode)) = adapter_cost {
            println!(
                "overhead   prefill {:+.1}%, decode {:+.1}% against no adapter ({:.1} / {:.1} tok/s; \
                 alternating in this process, median per round)",
                prefill * 100.0,
                decode * 100.0,
                median(&mut pp_off.clone()),
                median(&mut tg_off.clone())
            );
        }
        if let Some(c) = &cost {
            println!(
                "constraint compile {:.2} ms (first, with the token trie: {:.1} ms)",
                c.compile_ms, c.first_compile_ms
            );
            println!(
                "greedy     {:.1} tok/s free, {:.1} tok/s constrained ({:.3}x; full mask on {} of {} steps)",
                c.free_tok_s,
                c.constrained_tok_s,
                c.constrained_tok_s / c.free_tok_s,
                c.masked_steps,
                c.steps
            );
        }
        if let Some(p) = &parallel {
            println!(
                "engine     {} sequences: {:.1} tok/s decoded in all ({:.2}x one session's {:.1}, alternating), \
                 {:.1} tok/s per stream; first token p50 {:.0} ms, p99 {:.0} ms",
                p.sequences,
                p.aggregate_tok_s,
                p.aggregate_tok_s / p.session_tok_s,
                p.session_tok_s,
                p.per_stream_tok_s,
                p.ttft_ms_p50,
                p.ttft_ms_p99
            );
        }
        println!("peak RSS   {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}

/// Compiles the constraint (twice: the first also builds the token trie), then times greedy
/// decoding after `prompt` without and with it, alternating, `--repeat` times each (after one
/// warm-up each); medians. A grammar that completes starts over, so every run decodes
/// `--gen-tokens` tokens.
fn constraint_cost(a: &Args, model: &peftrt::Model, session: &mut Session, prompt: &[u32]) -> Result<ConstraintCost> {
    let args = a.c.args();
    let t = Instant::now();
    args.compile(model)?;
    let first_compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let constraint = args.compile(model)?;
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let params = SamplingParams { temperature: 0.0, max_tokens: a.gen_tokens, ..Default::default() };
    let (mut free, mut constrained) = (Vec::new(), Vec::new());
    let (mut masked_steps, mut steps) = (0, 0);
    for r in 0..=a.repeat {
        for with in [false, true] {
            let mut sampler = Sampler::new(params.clone(), model.config.vocab_size)?;
            sampler.set_constraint(if with { constraint.clone() } else { None })?;
            session.reset();
            session.eval(prompt)?;
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                let next = sampler.next_token(session.logits(), session.tokens())?;
                if sampler.constraint_complete() {
                    sampler.restart_constraint()?;
                }
                session.eval(&[next])?;
            }
            let tok_s = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
            if r > 0 {
                if with {
                    constrained.push(tok_s);
                    masked_steps += sampler.constraint().map_or(0, Constraint::masks_computed);
                    steps += a.gen_tokens;
                } else {
                    free.push(tok_s);
                }
            }
        }
    }
    Ok(ConstraintCost {
        first_compile_ms,
        compile_ms,
        free_tok_s: median(&mut free),
        constrained_tok_s: median(&mut constrained),
        masked_steps,
        steps,
    })
}

/// Runs `n` sequences through the batching engine, all submitted at once, `--repeat` times after
/// a warm-up: each has its own pseudo-random prompt and decodes `--gen-tokens` greedy tokens
/// (EOS ignored). Aggregate decode speed counts the tokens sampled after the last sequence got its
/// first one, over the time from then to the end. Before each round, one session decodes the
/// first sequence's request (same prompt, adapters and token count), so that the two are timed
/// in alternation on the same machine state.
fn parallel_cost(
    a: &Args,
    model: &std::sync::Arc<peftrt::Model>,
    session: &mut Session,
    n: usize,
    pick: &dyn Fn(usize, usize) -> u32,
) -> Result<ParallelCost> {
    use peftrt::engine::{Engine, EngineOptions, Event, Request};
    let mut per_seq = Vec::new();
    for spec in &a.adapters_per_sequence {
        let (dir, scale) = crate::common::parse_adapter_spec(spec)?;
        let opts = peftrt::adapter::AdapterOptions {
            allow_base_mismatch: a.m.allow_base_mismatch,
            strict_base: a.m.strict_base,
        };
        let adapter = peftrt::Adapter::load_with(&dir, model, &opts)
            .map_err(|e| anyhow::anyhow!("cannot load the adapter in {}: {e}", dir.display()))?;
        per_seq.push(vec![(std::sync::Arc::new(adapter), scale)]);
    }
    let opts = EngineOptions {
        max_sequences: n,
        n_ctx: a.prompt_tokens + a.gen_tokens,
        n_batch: 0,
        step_tokens: 0,
        n_threads: a.m.threads,
    };
    let flag_adapters = session.adapters().to_vec();
    let flag_adapters = flag_adapters.as_slice();
    let mut engine = Engine::new(model.clone(), &opts)?;
    let mut lone = Vec::new();
    let params = SamplingParams { max_tokens: a.gen_tokens, ignore_eos: true, ..Default::default() };
    let (mut agg, mut ttft, mut streams) = (Vec::new(), Vec::new(), Vec::new());
    // Each round its own prompts, so that no round reuses the KV blocks of the one before
    // (prefix reuse would otherwise skip the prefill the first-token times are meant to show).
    let prompt_of = |r: usize, i: usize| -> Vec<u32> {
        (0..a.prompt_tokens).map(|j| pick(j + 1000 * i + 100_000 * r, 7919 + 2 * i)).collect()
    };
    let adapters_of =
        |i: usize| if per_seq.is_empty() { flag_adapters.to_vec() } else { per_seq[i % per_seq.len()].clone() };
    for r in 0..=a.repeat {
        // The first request alone in a session, decoded as the engine does it.
        session.set_adapters(&adapters_of(0))?;
        session.reset();
        let mut sampler = peftrt::Sampler::new(params.clone(), model.config.vocab_size)?;
        session.eval(&prompt_of(r, 0))?;
        let t = Instant::now();
        for _ in 1..a.gen_tokens {
            let next = sampler.next_token(session.logits(), session.tokens())?;
            session.eval(&[next])?;
        }
        if r > 0 && a.gen_tokens > 1 {
            lone.push((a.gen_tokens - 1) as f64 / t.elapsed().as_secs_f64());
        }
        for i in 0..n {
            let prompt = prompt_of(r, i);
            let adapters = adapters_of(i);
            engine.submit(Request { prompt, adapters, params: params.clone(), constraint: None })?;
        }
        let (mut firsts, mut after, mut all_started) = (0, 0usize, None::<Instant>);
        let mut seen = std::collections::HashSet::new();
        let mut failed = None;
        engine.run(|ev| {
            match ev {
                Event::Logits { id, .. } => {
                    if all_started.is_some() {
                        after += 1;
                    } else if seen.insert(id) {
                        firsts += 1;
                        if firsts == n {
                            all_started = Some(Instant::now());
                        }
                    }
                }
                Event::Done { result, .. } => match result {
                    Ok(g) => {
                        if r > 0 {
                            ttft.push(g.prefill_time.as_secs_f64() * 1e3);
                            streams.push(g.decode_tok_s());
                        }
                    }
                    Err(e) => failed = Some(e),
                },
                Event::Text { .. } => {}
            }
            true
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        let since = all_started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        if r > 0 && since > 0.0 {
            agg.push(after as f64 / since);
        }
    }
    session.set_adapters(flag_adapters)?;
    ttft.sort_by(|x, y| x.total_cmp(y));
    let p99 = ttft[((ttft.len() as f64 * 0.99).ceil() as usize).clamp(1, ttft.len()) - 1];
    Ok(ParallelCost {
        sequences: n,
        aggregate_tok_s: median(&mut agg),
        ttft_ms_p50: median(&mut ttft),
        ttft_ms_p99: p99,
        per_stream_tok_s: median(&mut streams),
        session_tok_s: median(&mut lone),
    })
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
