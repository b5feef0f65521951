//! `peftrt perplexity`: perplexity over a text file, in sliding windows.

use crate::common::{Loaded, ModelArgs};
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    m: ModelArgs,
    /// The UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window (default: the context size).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Tokens between window starts (default: half a window).
    #[arg(long, default_value_t = 0)]
    stride: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let text = peftrt::fsutil::read_text_file(&a.text, peftrt::fsutil::MAX_TEXT_BYTES)?;
    let Loaded { model, mut session, .. } = a.m.load(true)?;
    let tokens = model.tokenizer()?.encode(&text, true)?;
    let window = if a.window == 0 { session.n_ctx() } else { a.window };
    if window > session.n_ctx() {
        bail!("--window {window} is larger than the context ({}); raise --ctx-size", session.n_ctx());
    }
    let stride = if a.stride == 0 { (window / 2).max(1) } else { a.stride };
    let t = Instant::now();
    // Drawn only when stderr is a terminal (indicatif hides it otherwise).
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("window {pos}/{len} {wide_bar} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let p = peftrt::perplexity::perplexity(&mut session, &tokens, window, stride, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "perplexity": p.ppl(),
            "nll_per_token": p.nll / p.n_scored as f64,
            "tokens": tokens.len(),
            "scored": p.n_scored,
            "windows": p.windows,
            "window": window,
            "stride": stride,
            "adapters": a.m.adapters,
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} windows of {window}, stride {stride}; {:.1} s)",
            p.ppl(),
            p.n_scored,
            p.windows,
            secs
        );
    }
    Ok(())
}
