//! Text ↔ tokens with the model's own `tokenizer.json` (the `tokenizers` crate), and chat
//! prompts rendered from the model's own Jinja chat template (`minijinja`), the way
//! transformers' `apply_chat_template` renders them.

use crate::error::{Error, Result};
use crate::fsutil::{self, is_present, read_regular_file, read_text_file};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Template instructions one chat rendering may execute (minijinja's fuel). Real templates
/// spend a few hundred per message; a template that loops without end runs out instead of
/// hanging.
pub const CHAT_TEMPLATE_FUEL: u64 = 20_000_000;
/// Most bytes a rendered chat prompt may have: far more than any context holds, and a
/// template that prints without end stops here instead of exhausting memory.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

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
    /// The file the chat template came from, for error messages.
    template_source: PathBuf,
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
        if !is_present(&tok_path) {
            return Err(Error::missing(dir, "no tokenizer.json in the model directory"));
        }
        let bytes = read_regular_file(&tok_path, fsutil::MAX_TOKENIZER_BYTES)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::format(&tok_path, format!("cannot load tokenizer: {e}")))?;
        drop(bytes);
        let mut tok =
            Tokenizer { inner, chat_template: None, template_source: PathBuf::new(), bos_token: None, eos_token: None };
        release_freed_heap();

        let cfg_path = dir.join("tokenizer_config.json");
        if is_present(&cfg_path) {
            let text = read_text_file(&cfg_path, fsutil::MAX_JSON_BYTES)?;
            let cfg: Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
            tok.apply_config(&cfg, cfg_path);
        }
        let jinja = dir.join("chat_template.jinja");
        if is_present(&jinja) {
            tok.chat_template = Some(read_text_file(&jinja, fsutil::MAX_TEMPLATE_BYTES)?);
            tok.template_source = jinja;
        }
        Ok(tok)
    }

    /// A `tokenizers` tokenizer with a `tokenizer_config.json`'s settings (`origin` names the
    /// config in messages).
    pub(crate) fn from_hf(inner: tokenizers::Tokenizer, config: &Value, origin: &Path) -> Self {
        let mut tok =
            Tokenizer { inner, chat_template: None, template_source: PathBuf::new(), bos_token: None, eos_token: None };
        tok.apply_config(config, origin.to_path_buf());
        tok
    }

    /// Takes the BOS/EOS strings and the chat template from a `tokenizer_config.json`.
    fn apply_config(&mut self, cfg: &Value, source: PathBuf) {
        self.bos_token = token_string(cfg.get("bos_token"));
        self.eos_token = token_string(cfg.get("eos_token"));
        self.chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        self.template_source = source;
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

    /// The Hugging Face tokenizer itself (constrained decoding tokenizes forced text with it).
    pub(crate) fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
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
    /// Bounded: a template that runs more than [`CHAT_TEMPLATE_FUEL`] instructions or renders
    /// more than [`MAX_RENDERED_BYTES`] is an [`Error::Tokenizer`] naming the template's file.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Tokenizer(
                "this model has no chat template (tokenizer_config.json has no chat_template); use a plain prompt"
                    .into(),
            )
        })?;
        let src = self.template_source.display();
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", template)
            .map_err(|e| Error::Tokenizer(format!("the chat template of {src} does not parse: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        let mut out = CappedWriter { buf: Vec::new(), full: false };
        let rendered = env.get_template("chat").and_then(|t| t.render_captured_to(ctx, &mut out).map(drop));
        if out.full {
            return Err(Error::Tokenizer(format!(
                "the chat template of {src} renders more than {} MiB for {} message(s); the template \
                 is broken (it prints without end): fix or replace it",
                MAX_RENDERED_BYTES >> 20,
                messages.len()
            )));
        }
        match rendered {
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(Error::Tokenizer(format!(
                "the chat template of {src} ran more than {CHAT_TEMPLATE_FUEL} instructions for {} \
                 message(s) without finishing; the template is broken (a loop too long or without \
                 end): fix or replace it",
                messages.len()
            ))),
            Err(e) => Err(Error::Tokenizer(format!("the chat template of {src} failed: {e}"))),
            Ok(_) => String::from_utf8(out.buf)
                .map_err(|_| Error::Tokenizer(format!("the chat template of {src} rendered invalid UTF-8"))),
        }
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Collects rendered text up to [`MAX_RENDERED_BYTES`], then fails every write.
struct CappedWriter {
    buf: Vec<u8>,
    full: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_RENDERED_BYTES {
            self.full = true;
            return Err(std::io::Error::other("the rendered chat prompt is too long"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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
    use std::time::{Duration, Instant};

    /// A model directory holding the tiny fixture's tokenizer and `template` as its chat
    /// template, in `tokenizer_config.json` or in `chat_template.jinja`.
    fn dir_with_template(template: &str, jinja: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama/tokenizer.json");
        std::fs::copy(fixture, dir.path().join("tokenizer.json")).unwrap();
        if jinja {
            std::fs::write(dir.path().join("chat_template.jinja"), template).unwrap();
        } else {
            let cfg = serde_json::json!({"chat_template": template, "eos_token": "</s>"});
            std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        }
        dir
    }

    fn render(template: &str, jinja: bool) -> Result<String> {
        let dir = dir_with_template(template, jinja);
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        tok.apply_chat_template(&[Message::new("user", "hi")], true)
    }

    #[test]
    fn an_ordinary_template_renders() {
        let t = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}";
        assert_eq!(render(t, false).unwrap(), "<user>hi<a>");
        assert_eq!(render(t, true).unwrap(), "<user>hi<a>");
    }

    /// Regression (issue 18 row 2): three nested loops of 10⁴ used to hang.
    #[test]
    fn a_template_that_loops_too_long_runs_out_of_fuel() {
        let t = "{% for a in range(10000) %}{% for b in range(10000) %}{% for c in range(10000) %}{% endfor %}{% endfor %}{% endfor %}";
        for jinja in [false, true] {
            let start = Instant::now();
            let err = render(t, jinja).unwrap_err();
            assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
            let msg = err.to_string();
            let file = if jinja { "chat_template.jinja" } else { "tokenizer_config.json" };
            assert!(matches!(err, Error::Tokenizer(_)), "{msg}");
            assert!(msg.contains(file) && msg.contains("instructions"), "{msg}");
        }
    }

    /// Regression (issue 18 row 2): printing `'x'*1e5` 1e5 times used to abort on a 10 GB
    /// allocation.
    #[test]
    fn a_template_that_prints_too_much_is_refused() {
        let t = "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}";
        let err = render(t, false).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("MiB"), "{err}");
    }

    /// Regression (issue 18 row 10): a FIFO as tokenizer_config.json was silently ignored.
    #[cfg(unix)]
    #[test]
    fn a_fifo_tokenizer_config_is_refused() {
        let dir = dir_with_template("x", true);
        let p = dir.path().join("tokenizer_config.json");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = Tokenizer::from_dir(dir.path()).err().expect("a FIFO must be refused").to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains("FIFO"), "{err}");
    }

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
