//! The generation loop: prefill the prompt, then sample and evaluate one token at a time,
//! streaming text as it completes and stopping at EOS, a stop string, the token limit or a
//! full context.

use crate::error::{Error, Result};
use crate::sampler::Sampler;
use crate::session::Session;
use crate::tokenizer::TextStream;
use std::time::{Duration, Instant};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos,
    /// The text contained one of the stop strings.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The text callback asked to stop.
    Cancelled,
}

/// The result of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated tokens (including a final EOS token, if any).
    pub tokens: Vec<u32>,
    /// Generated text (without a matched stop string).
    pub text: String,
    pub stop: StopReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl Generation {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    /// Generated tokens per second (each token after the first costs one decode step).
    pub fn decode_tok_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// Generates a continuation of `prompt` after whatever the session already holds.
///
/// `on_text` receives text as soon as it is complete (never a partial UTF-8 character, never
/// text that might turn out to start a stop string); returning `false` stops generation. When
/// generation ends on a partial character (a byte-level token split it), the text ends with
/// it as U+FFFD, as [`crate::Tokenizer::decode`] of the generated tokens gives: the streamed
/// text and `Generation::text` equal the decoded tokens (without a final EOS token, and cut
/// before a stop string).
///
/// Afterwards the session holds the prompt and every generated token but the last: the last
/// sampled token is returned, not evaluated (its logits are not needed). To continue the
/// conversation without a reset, evaluate it (or pass it first in the next prompt).
pub fn generate(
    session: &mut Session,
    prompt: &[u32],
    sampler: &mut Sampler,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty: give at least one token".into()));
    }
    let model = session.model().clone();
    let tok = model.tokenizer()?;
    let params = sampler.params.clone();
    sampler.restart_constraint()?;
    let t0 = Instant::now();
    session.eval(prompt)?;
    let prefill_time = t0.elapsed();

    let t1 = Instant::now();
    let mut stream = TextStream::new();
    let mut text = String::new();
    let mut emitted = 0;
    let mut stop = StopReason::MaxTokens;
    // At most what the context can still hold: `max_tokens` may be any number.
    let mut tokens = Vec::with_capacity(params.max_tokens.min(session.n_ctx() - session.tokens().len() + 1));
    for i in 0..params.max_tokens {
        let next = sampler.next_token(session.logits(), session.tokens())?;
        tokens.push(next);
        // A constraint ends only with EOS, and then nothing may follow, ignore_eos or not.
        if model.is_eos(next) && (!params.ignore_eos || sampler.constraint_complete()) {
            stop = StopReason::Eos;
            break;
        }
        if let Some(piece) = stream.push(tok, next)? {
            text.push_str(&piece);
            if let Some(at) = params
                .stop
                .iter()
                .filter_map(|s| text[emitted.min(text.len())..].find(s.as_str()).map(|p| p + emitted))
                .min()
            {
                text.truncate(at);
                if at > emitted && !on_text(&text[emitted..]) {
                    stop = StopReason::Cancelled;
                    break;
                }
                stop = StopReason::StopString;
                break;
            }
            let safe = text.len() - held_back(&text, &params.stop);
            if safe > emitted {
                let ok = on_text(&text[emitted..safe]);
                emitted = safe;
                if !ok {
                    stop = StopReason::Cancelled;
                    break;
                }
            }
        }
        if sampler.constraint_complete() {
            stop = StopReason::Eos;
            break;
        }
        if i + 1 == params.max_tokens {
            break;
        }
        if session.tokens().len() >= session.n_ctx() {
            stop = StopReason::ContextFull;
            break;
        }
        session.eval(&[next])?;
    }
    if stop != StopReason::StopString && stop != StopReason::Cancelled {
        if let Some(rest) = stream.finish(tok)? {
            text.push_str(&rest);
        }
        if text.len() > emitted {
            on_text(&text[emitted..]);
        }
    }
    Ok(Generation { tokens, text, stop, prompt_tokens: prompt.len(), prefill_time, decode_time: t1.elapsed() })
}

/// Length of the longest end of `text` that is a proper start of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if i > keep && text.ends_with(&s[..i]) {
                keep = i;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("a <", &stops), 1);
    }
}
