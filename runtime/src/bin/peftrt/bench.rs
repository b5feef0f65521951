//! `peftrt bench`: prefill and decode speed, adapter load and switch times, peak memory.

use crate::common::{Loaded, ModelArgs};
use anyhow::{bail, Result};
use std::time::Instant;

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
        println!("peak RSS   {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    Ok(())
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
