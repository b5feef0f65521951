//! `peftrt batch`: every request of a JSON Lines file, one after another in one session.

use crate::common::{ConstraintArgs, Loaded, ModelArgs, SamplingArgs};
use anyhow::{bail, Result};
use peftrt::{generate, Sampler};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// Requests, JSON Lines: {"messages": [{"role": ..., "content": ...}, ...]} (rendered with the
    /// chat template) or {"prompt": "..."} (plain text); an optional "id" is copied to the output,
    /// and "response_format" (OpenAI's json_schema / json_object), "grammar" or "regex"
    /// constrain that reply instead of the flags.
    #[arg(long)]
    input: PathBuf,
    /// Results, JSON Lines, one per request in input order (written atomically).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    s: SamplingArgs,
    #[command(flatten)]
    c: ConstraintArgs,
}

pub fn run(a: Args) -> Result<()> {
    // Before any work: the results must have somewhere to go, and never over the input.
    peftrt::output::check_output_file(&a.out, &[&a.input])?;
    let input = peftrt::fsutil::read_text_file(&a.input, peftrt::fsutil::MAX_TEXT_BYTES)?;
    let Loaded { model, mut session, .. } = a.m.load(true)?;
    let tok = model.tokenizer()?;
    // Parse every request first: a bad line fails the run before any time is spent generating.
    let mut requests = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = peftrt::batch::parse_request(line, tok).map_err(|e| {
            anyhow::anyhow!(
                "{} line {}: {e}; each line must be {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}",
                a.input.display(),
                i + 1
            )
        })?;
        // A request's own constraint (which wins over the flags), compiled now: a bad schema
        // fails the run before any generation, naming its line.
        let own = r.constraint.as_ref().map(|s| peftrt::constraint::Constraint::new(&model, s)).transpose();
        let own = own.map_err(|e| anyhow::anyhow!("{} line {}: {e}", a.input.display(), i + 1))?;
        requests.push((r, own));
    }
    if requests.is_empty() {
        bail!("{} has no requests", a.input.display());
    }
    let params = a.s.params();
    Sampler::new(params.clone(), model.config.vocab_size)?; // checks the parameters up front
    let constraint = a.c.compile(&model)?; // and the constraint, compiled once
    let mut lines = String::new();
    let started = Instant::now();
    let mut too_long = 0;
    let progress = std::io::stderr().is_terminal();
    for (n, (peftrt::batch::BatchRequest { id, tokens, .. }, own)) in requests.iter().enumerate() {
        if tokens.len() >= session.n_ctx() {
            // One request that cannot fit must not sink a long batch: it is recorded as failed.
            too_long += 1;
            let error = format!(
                "the prompt has {} tokens; the context holds {} (raise --ctx-size)",
                tokens.len(),
                session.n_ctx()
            );
            lines.push_str(&serde_json::json!({"id": id, "prompt_tokens": tokens.len(), "error": error}).to_string());
            lines.push('\n');
            continue;
        }
        session.reset();
        // A fresh sampler per request: each reply is the same whatever the order of the requests.
        let mut sampler = Sampler::new(params.clone(), model.config.vocab_size)?;
        sampler.set_constraint(own.clone().or_else(|| constraint.clone()))?;
        let t = Instant::now();
        let g = generate(&mut session, tokens, &mut sampler, |_| true)?;
        let latency = t.elapsed().as_secs_f64();
        let v = serde_json::json!({
            "id": id,
            "text": g.text,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.tokens.len(),
            "stop": format!("{:?}", g.stop),
            "latency_ms": latency * 1e3,
            "prefill_ms": g.prefill_time.as_secs_f64() * 1e3,
            "decode_ms": g.decode_time.as_secs_f64() * 1e3,
            "decode_tok_s": g.decode_tok_s(),
        });
        lines.push_str(&v.to_string());
        lines.push('\n');
        if progress {
            eprint!("\rbatch: {}/{} requests, {:.0} s", n + 1, requests.len(), started.elapsed().as_secs_f64());
        }
    }
    if progress {
        eprintln!();
    }
    eprintln!(
        "batch: {} requests in {:.1} s; results in {}",
        requests.len(),
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    if too_long > 0 {
        eprintln!(
            "warning: {too_long} of {} requests did not fit the context of {} tokens; their lines carry an \"error\"",
            requests.len(),
            session.n_ctx()
        );
    }
    peftrt::output::write_file_atomically(&a.out, lines.as_bytes())?;
    Ok(())
}
