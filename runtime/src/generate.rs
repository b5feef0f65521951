//! The generation loop: prefill the prompt, then sample and evaluate one token at a time,
//! streaming text as it completes and stopping at EOS, a stop string, the token limit or a
//! full context.

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampler::{Sampler, SamplingParams};
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
    model.tokenizer()?;
    let params = sampler.params.clone();
    sampler.restart_constraint()?;
    let t0 = Instant::now();
    session.eval(prompt)?;
    let prefill_time = t0.elapsed();

    let t1 = Instant::now();
    let mut reply = Reply::new(params.max_tokens.min(session.n_ctx() - session.tokens().len() + 1));
    let mut stop = StopReason::MaxTokens;
    for i in 0..params.max_tokens {
        let next = sampler.next_token(session.logits(), session.tokens())?;
        if let Some(s) = reply.push(&model, &params, sampler.constraint_complete(), next, &mut on_text)? {
            stop = s;
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
    let (tokens, text) = reply.finish(&model, stop, &mut on_text)?;
    Ok(Generation { tokens, text, stop, prompt_tokens: prompt.len(), prefill_time, decode_time: t1.elapsed() })
}

/// A reply as its tokens come: the text streamed as it completes, the stop strings, EOS and a
/// completed constraint. One definition for [`generate`] and the batching engine, which must
/// end and stream a reply the same way.
pub(crate) struct Reply {
    stream: TextStream,
    tokens: Vec<u32>,
    text: String,
    /// Bytes of `text` handed to the callback so far.
    emitted: usize,
}

impl Reply {
    pub(crate) fn new(capacity: usize) -> Reply {
        Reply { stream: TextStream::new(), tokens: Vec::with_capacity(capacity), text: String::new(), emitted: 0 }
    }

    /// Takes the sampled token `next`; `Some(reason)` when the reply ends with it (EOS, a
    /// stop string, the constraint complete, or `on_text` asking to stop). The caller checks
    /// the token limit and the context.
    pub(crate) fn push(
        &mut self,
        model: &Model,
        params: &SamplingParams,
        constraint_complete: bool,
        next: u32,
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> Result<Option<StopReason>> {
        self.tokens.push(next);
        // A constraint ends only with EOS, and then nothing may follow, ignore_eos or not.
        if model.is_eos(next) && (!params.ignore_eos || constraint_complete) {
            return Ok(Some(StopReason::Eos));
        }
        let text = &mut self.text;
        if let Some(piece) = self.stream.push(model.tokenizer()?, next)? {
            text.push_str(&piece);
            let emitted = self.emitted;
            if let Some(at) = params
                .stop
                .iter()
                .filter_map(|s| text[emitted.min(text.len())..].find(s.as_str()).map(|p| p + emitted))
                .min()
            {
                text.truncate(at);
                if at > emitted && !on_text(&text[emitted..]) {
                    return Ok(Some(StopReason::Cancelled));
                }
                return Ok(Some(StopReason::StopString));
            }
            let safe = text.len() - held_back(text, &params.stop);
            if safe > emitted {
                let ok = on_text(&text[emitted..safe]);
                self.emitted = safe;
                if !ok {
                    return Ok(Some(StopReason::Cancelled));
                }
            }
        }
        if constraint_complete {
            return Ok(Some(StopReason::Eos));
        }
        Ok(None)
    }

    /// Ends the reply for `stop`: the rest of the text (a held-back start of a stop string, a
    /// partial character as U+FFFD) goes to `on_text`; returns the tokens and the text.
    pub(crate) fn finish(
        mut self,
        model: &Model,
        stop: StopReason,
        on_text: &mut impl FnMut(&str) -> bool,
    ) -> Result<(Vec<u32>, String)> {
        if stop != StopReason::StopString && stop != StopReason::Cancelled {
            if let Some(rest) = self.stream.finish(model.tokenizer()?)? {
                self.text.push_str(&rest);
            }
            if self.text.len() > self.emitted {
                on_text(&self.text[self.emitted..]);
            }
        }
        Ok((self.tokens, self.text))
    }
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
