//! `peftrt batch`: every request of a JSON Lines file through the batching engine,
//! `--parallel` sequences at a time (one by default); the results do not depend on how many.

use crate::common::{parse_adapter_spec, ConstraintArgs, Loaded, ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use peftrt::adapter::AdapterOptions;
use peftrt::engine::{Engine, EngineOptions, Event, Request, RequestId};
use peftrt::session::ActiveAdapters;
use peftrt::{Adapter, Sampler};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// Requests, JSON Lines: {"messages": [{"role": ..., "content": ...}, ...]} (rendered with the
    /// chat template) or {"prompt": "..."} (plain text); an optional "id" is copied to the output,
    /// and "response_format" (OpenAI's json_schema / json_object), "grammar" or "regex"
    /// constrain that reply instead of the flags; "adapters": ["DIR[:SCALE]", ...] picks its
    /// adapters instead of the --adapter flags ([] = the base alone; each directory is loaded once).
    #[arg(long)]
    input: PathBuf,
    /// Results, JSON Lines, one per request in input order (written atomically).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    s: SamplingArgs,
    #[command(flatten)]
    c: ConstraintArgs,
    /// Requests evaluated together, each with its own adapters (continuous batching: one
    /// forward pass a step for all of them). The results are the same for any number.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    parallel: u64,
}

pub fn run(a: Args) -> Result<()> {
    // Before any work: the results must have somewhere to go, and never over the input.
    peftrt::output::check_output_file(&a.out, &[&a.input])?;
    let input = peftrt::fsutil::read_text_file(&a.input, peftrt::fsutil::MAX_TEXT_BYTES)?;
    let Loaded { model, session, .. } = a.m.load(true)?;
    let tok = model.tokenizer()?;
    let n_ctx = session.n_ctx();
    let flag_adapters: ActiveAdapters = session.adapters().to_vec();
    drop(session);
    let adapter_opts = AdapterOptions { allow_base_mismatch: a.m.allow_base_mismatch, strict_base: a.m.strict_base };
    // Each adapter directory named by a line is loaded once for the whole run.
    let mut loaded: HashMap<PathBuf, Arc<Adapter>> = HashMap::new();
    // Parse every request first: a bad line fails the run before any time is spent generating.
    let mut requests = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", a.input.display(), i + 1);
        let r = peftrt::batch::parse_request(line, tok).map_err(|e| {
            anyhow::anyhow!("{}: {e}; each line must be {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}", at())
        })?;
        // A request's own constraint (which wins over the flags), compiled now: a bad schema
        // fails the run before any generation, naming its line.
        let own = r.constraint.as_ref().map(|s| peftrt::constraint::Constraint::new(&model, s)).transpose();
        let own = own.map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let adapters = match &r.adapters {
            None => flag_adapters.clone(),
            Some(specs) => {
                let mut set = Vec::with_capacity(specs.len());
                for spec in specs {
                    let (dir, scale) = parse_adapter_spec(spec).with_context(at)?;
                    peftrt::adapter::check_scale(&dir.display().to_string(), scale).with_context(at)?;
                    let adapter = match loaded.get(&dir) {
                        Some(x) => x.clone(),
                        None => {
                            let x = Adapter::load_with(&dir, &model, &adapter_opts)
                                .with_context(|| format!("{}: cannot load the adapter in {}", at(), dir.display()))?;
                            loaded.entry(dir).or_insert(Arc::new(x)).clone()
                        }
                    };
                    set.push((adapter, scale));
                }
                set
            }
        };
        requests.push((r, own, adapters));
    }
    if requests.is_empty() {
        bail!("{} has no requests", a.input.display());
    }
    let params = a.s.params();
    Sampler::new(params.clone(), model.config.vocab_size)?; // checks the parameters up front
    let constraint = a.c.compile(&model)?; // and the constraint, compiled once
    let opts = EngineOptions {
        max_sequences: a.parallel as usize,
        n_ctx,
        n_batch: 0,
        step_tokens: 0,
        n_threads: a.m.threads,
    };
    let mut engine = Engine::new(model.clone(), &opts)?;
    let started = Instant::now();
    let progress = std::io::stderr().is_terminal();
    let mut results: Vec<Option<serde_json::Value>> = vec![None; requests.len()];
    let (mut too_long, mut failed, mut finished) = (0, 0, 0);
    let mut ids: HashMap<RequestId, (usize, Instant)> = HashMap::new();
    let mut next = 0;
    while next < requests.len() || engine.active() > 0 {
        while next < requests.len() && engine.active() < engine.max_sequences() {
            let (peftrt::batch::BatchRequest { id, tokens, .. }, own, adapters) = &requests[next];
            if tokens.len() >= n_ctx {
                // One request that cannot fit must not sink a long batch: it is recorded as failed.
                too_long += 1;
                let error =
                    format!("the prompt has {} tokens; the context holds {n_ctx} (raise --ctx-size)", tokens.len());
                results[next] = Some(serde_json::json!({"id": id, "prompt_tokens": tokens.len(), "error": error}));
                finished += 1;
                next += 1;
                continue;
            }
            let req = Request {
                prompt: tokens.clone(),
                adapters: adapters.clone(),
                params: params.clone(),
                constraint: own.clone().or_else(|| constraint.clone()),
            };
            ids.insert(engine.submit(req)?, (next, Instant::now()));
            next += 1;
        }
        engine.step(|ev| {
            if let Event::Done { id, result } = ev {
                let (n, submitted) = ids.remove(&id).expect("a submitted request");
                let rid = &requests[n].0.id;
                results[n] = Some(match result {
                    Ok(g) => serde_json::json!({
                        "id": rid,
                        "text": g.text,
                        "prompt_tokens": g.prompt_tokens,
                        "generated_tokens": g.tokens.len(),
                        "stop": format!("{:?}", g.stop),
                        "latency_ms": submitted.elapsed().as_secs_f64() * 1e3,
                        "prefill_ms": g.prefill_time.as_secs_f64() * 1e3,
                        "decode_ms": g.decode_time.as_secs_f64() * 1e3,
                        "decode_tok_s": g.decode_tok_s(),
                    }),
                    Err(e) => {
                        failed += 1;
                        serde_json::json!({"id": rid, "prompt_tokens": requests[n].0.tokens.len(), "error": e.to_string()})
                    }
                });
                finished += 1;
            }
            true
        });
        if progress {
            eprint!("\rbatch: {finished}/{} requests, {:.0} s", requests.len(), started.elapsed().as_secs_f64());
        }
    }
    if progress {
        eprintln!();
    }
    let mut lines = String::new();
    for v in results {
        lines.push_str(&v.expect("every request has a result").to_string());
        lines.push('\n');
    }
    eprintln!(
        "batch: {} requests in {:.1} s ({} at a time); results in {}",
        requests.len(),
        started.elapsed().as_secs_f64(),
        a.parallel,
        a.out.display()
    );
    if too_long > 0 {
        eprintln!(
            "warning: {too_long} of {} requests did not fit the context of {n_ctx} tokens; their lines carry an \"error\"",
            requests.len(),
        );
    }
    if failed > 0 {
        eprintln!("warning: {failed} of {} requests failed; their lines carry an \"error\"", requests.len());
    }
    peftrt::output::write_file_atomically(&a.out, lines.as_bytes())?;
    Ok(())
}
