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
    let Loaded { model, mut session, load_ms, adapter_load_ms } = a.m.load(false)?;
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
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for r in 0..=a.repeat {
        session.reset();
        let t = Instant::now();
        session.eval(&prompt)?;
        let prefill = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..a.gen_tokens {
            session.eval(&[pick(i, 31)])?;
        }
        let decode = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        if r > 0 {
            // The first run warms the page cache and the CPU caches.
            pp.push(prefill);
            tg.push(decode);
        }
    }
    let cost = match a.c.args().spec()? {
        Some(_) => Some(constraint_cost(&a, &model, &mut session, &prompt)?),
        None => None,
    };
    let spread = |v: &[f64]| (v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(0.0, f64::max));
    let (pp_lo, pp_hi) = spread(&pp);
    let (tg_lo, tg_hi) = spread(&tg);
    let (pp_med, tg_med) = (median(&mut pp), median(&mut tg));
    let rss = peak_rss_bytes().unwrap_or(0);
    // Switching adapters: a session's active set replaced (all off, then back on), per switch.
    let active = session.adapters().to_vec();
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
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
