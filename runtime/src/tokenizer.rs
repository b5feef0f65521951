//! Text ↔ tokens with the model's own `tokenizer.json` (the `tokenizers` crate), and chat
//! prompts rendered from the model's own Jinja chat template (`minijinja`), the way
//! transformers' `apply_chat_template` renders them.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// One chat message.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A model's tokenizer and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// `tokenizer_config.json` stores special tokens as strings or as `{"content": ...}` objects.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Hands the heap pages freed so far back to the OS. Parsing `tokenizer.json` leaves ~10 MB of
/// small freed allocations (SmolLM2's 49k-entry vocabulary and merges) that glibc keeps resident
/// otherwise, on top of the tokenizer itself.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim only releases free memory; it takes no pointers.
        unsafe { malloc_trim(0) };
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json`, plus `tokenizer_config.json` and `chat_template.jinja` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::missing(dir, "no tokenizer.json in the model directory"));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::format(&tok_path, format!("cannot load tokenizer: {e}")))?;
        let mut tok = Tokenizer { inner, chat_template: None, bos_token: None, eos_token: None };
        release_freed_heap();

        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let cfg: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
            tok.bos_token = token_string(cfg.get("bos_token"));
            tok.eos_token = token_string(cfg.get("eos_token"));
            tok.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            tok.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Ok(tok)
    }

    /// Tokens of `text`; `add_special` adds what the tokenizer's post-processor adds (e.g. BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc =
            self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `tokens`; special tokens are kept unless `skip_special`.
    pub fn decode(&self, tokens: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(tokens, skip_special).map_err(|e| Error::Tokenizer(format!("cannot decode tokens: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the model's chat template, as transformers' `apply_chat_template`.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "this model has no chat template (tokenizer_config.json has no chat_template); use a plain prompt"
                    .into(),
            )
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template)
            .map_err(|e| Error::Tokenizer(format!("chat template does not parse: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        env.get_template("chat")
            .and_then(|t| t.render(ctx))
            .map_err(|e| Error::Tokenizer(format!("chat template failed: {e}")))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a stream of tokens into a stream of text, emitting only complete UTF-8.
///
/// Byte-level BPE tokens may split a character; text is released once it decodes cleanly.
pub struct TextStream {
    tokens: Vec<u32>,
    /// Length of the text already emitted.
    emitted: usize,
}

impl TextStream {
    pub fn new() -> Self {
        TextStream { tokens: Vec::new(), emitted: 0 }
    }

    /// Adds a token; returns the new text, if any complete text became available.
    pub fn push(&mut self, tok: &Tokenizer, token: u32) -> Result<Option<String>> {
        self.tokens.push(token);
        let text = tok.decode(&self.tokens, false)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(if new.is_empty() { None } else { Some(new) })
    }

    /// The text not yet emitted, at the end of the stream: what [`TextStream::push`] held back
    /// because it ended in an incomplete UTF-8 character, decoded as the tokenizer decodes it
    /// (the incomplete character as U+FFFD). So the streamed text ends up equal to
    /// [`Tokenizer::decode`] of all the pushed tokens (issue #18).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<Option<String>> {
        let text = tok.decode(&self.tokens, false)?;
        if text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return Ok(None);
        }
        let rest = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(rest))
    }

    /// Every token pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #18: a stream that ends inside a character (a byte-level token split it) ends
    /// with U+FFFD, as `decode` gives it, instead of dropping those bytes.
    #[test]
    fn a_stream_ending_inside_a_character_flushes_it_as_decode_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama");
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let ids = tok.encode("a é", false).unwrap();
        let (last, head) = ids.split_last().unwrap();
        assert!(tok.decode(&ids, false).unwrap().ends_with('é'), "{ids:?}");
        // Find the token that starts "é" without finishing it: its prefix decodes to U+FFFD.
        let cut = (1..=ids.len()).find(|&n| tok.decode(&ids[..n], false).unwrap().ends_with('\u{FFFD}'));
        let Some(cut) = cut else { panic!("\"é\" is one token here ({head:?} {last}); the test needs a split") };
        let mut stream = TextStream::new();
        let mut text = String::new();
        for &t in &ids[..cut] {
            text.extend(stream.push(&tok, t).unwrap());
        }
        assert!(!text.contains('\u{FFFD}'), "push never emits a partial character: {text:?}");
        text.extend(stream.finish(&tok).unwrap());
        assert_eq!(text, tok.decode(&ids[..cut], false).unwrap());
        assert!(text.ends_with('\u{FFFD}'));
        assert_eq!(stream.finish(&tok).unwrap(), None, "nothing is emitted twice");
    }
}
