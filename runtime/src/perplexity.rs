//! Perplexity over a token sequence with sliding windows (the usual Hugging Face recipe):
//! windows of `window` tokens start every `stride` tokens; each window scores only the tokens
//! the previous one did not, each with the full left context the window gives it.

use crate::error::{Error, Result};
use crate::session::Session;

/// The result of [`perplexity`].
#[derive(Clone, Copy, Debug)]
pub struct Perplexity {
    /// Tokens scored (every token but the first).
    pub n_scored: usize,
    /// Σ −log p(token | context), natural log.
    pub nll: f64,
    pub windows: usize,
}

impl Perplexity {
    /// `exp(mean negative log-likelihood)`.
    pub fn ppl(&self) -> f64 {
        (self.nll / self.n_scored as f64).exp()
    }
}

/// Tokens evaluated per forward call (bounds the logits buffer to this many rows).
const CHUNK: usize = 64;

/// Perplexity of `tokens` under the session's model and adapters. `progress(done, total)` is
/// called after each window. The session's cache is reset before and after.
pub fn perplexity(
    session: &mut Session,
    tokens: &[u32],
    window: usize,
    stride: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if tokens.len() < 2 {
        return Err(Error::Input("perplexity needs at least two tokens of text".into()));
    }
    if window < 2 || stride == 0 || stride > window {
        return Err(Error::Input(format!(
            "window {window} and stride {stride}: need 2 ≤ window and 0 < stride ≤ window"
        )));
    }
    let vocab = session.model().config.vocab_size;
    let mut logits = Vec::with_capacity(CHUNK * vocab);
    let mut out = Perplexity { n_scored: 0, nll: 0.0, windows: 0 };
    let mut scored_to = 1; // tokens[..scored_to] are scored already (the first never is)
    let mut begin = 0;
    let total = tokens.len().saturating_sub(window).div_ceil(stride) + 1;
    loop {
        let end = (begin + window).min(tokens.len());
        session.reset();
        for (c, chunk) in tokens[begin..end].chunks(CHUNK).enumerate() {
            logits.clear();
            session.eval_all(chunk, &mut logits)?;
            let start = begin + c * CHUNK;
            // Row i predicts tokens[start + i + 1].
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                let target = start + i + 1;
                if target >= scored_to && target < end {
                    out.nll += nll(row, tokens[target] as usize);
                    out.n_scored += 1;
                }
            }
        }
        scored_to = end;
        out.windows += 1;
        progress(out.windows, total);
        if end == tokens.len() {
            break;
        }
        begin += stride;
    }
    session.reset();
    Ok(out)
}

/// `−log softmax(logits)[target]`, in f64.
fn nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        for t in 0..3 {
            assert!((nll(&l, t) - (z.ln() - l[t] as f64)).abs() < 1e-12);
        }
    }
}
