//! Training data: JSON Lines in three formats, tokenised with the base model's tokenizer and
//! chat template (the runtime's [`peftrt::Tokenizer`]), with the loss restricted to response
//! tokens.
//!
//! - **alpaca**: `{"instruction", "input" (optional), "output"}`. With a chat template the
//!   instruction (and input, after a blank line) is the user turn and the output the assistant
//!   turn; without one, the Alpaca prompt (`### Instruction:` … `### Response:`) is used.
//! - **chat**: `{"messages": [{"role", "content"}, …]}`, rendered by the chat template; every
//!   assistant turn is trained on, everything else is prompt.
//! - **completion**: `{"prompt", "completion"}` (the completion is trained on), or `{"text"}`
//!   (every token is trained on). The end-of-sequence token is appended.
//!
//! Prompt and response are tokenised separately and concatenated, so the prompt's tokens are
//! exactly those the runtime feeds the model at inference (`apply_chat_template(…, true)` then
//! `encode`). A chat render of the conversation up to an assistant turn must extend the render
//! of the prompt before it; a template for which it does not is refused.

use crate::error::{Error, Result};
use peftrt::{Message, Tokenizer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

mod batch;
mod order;

pub use batch::{pack_rows, Batch, IGNORE};
pub use order::{group_by_length, split_eval, EpochPlan, SplitMix64, GROUP_WINDOW};

/// A data file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Alpaca,
    Chat,
    Completion,
}

impl Format {
    /// `auto` → `None` (detect from the first record).
    pub fn parse(s: &str) -> Result<Option<Format>> {
        match s {
            "auto" => Ok(None),
            "alpaca" => Ok(Some(Format::Alpaca)),
            "chat" => Ok(Some(Format::Chat)),
            "completion" => Ok(Some(Format::Completion)),
            other => Err(Error::Input(format!("--format {other}: expected auto, alpaca, chat or completion"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Alpaca => "alpaca",
            Format::Chat => "chat",
            Format::Completion => "completion",
        }
    }

    /// The format a record's fields indicate.
    fn detect(record: &serde_json::Map<String, Value>) -> Option<Format> {
        if record.contains_key("messages") {
            Some(Format::Chat)
        } else if record.contains_key("instruction") {
            Some(Format::Alpaca)
        } else if record.contains_key("prompt") || record.contains_key("completion") || record.contains_key("text") {
            Some(Format::Completion)
        } else {
            None
        }
    }
}

/// One tokenised example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<i64>,
    /// `trained[t]`: token `t` is a response token (its prediction counts in the loss).
    pub trained: Vec<bool>,
    /// 1-based line in the source file.
    pub line: usize,
}

impl Example {
    /// Number of tokens whose prediction is in the loss (the first token is never predicted).
    pub fn n_targets(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }
}

/// How examples are turned into tokens.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
    /// Appended to completion/text examples and the Alpaca prompt's response (no chat template).
    pub eos: Option<i64>,
    pub max_seq_len: usize,
}

/// A loaded, tokenised data file.
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    pub examples: Vec<Example>,
    /// Examples cut to `max_seq_len`.
    pub n_truncated: usize,
    /// Examples dropped because truncation left no response token.
    pub n_dropped: usize,
    /// sha256 of the file's bytes (hex).
    pub sha256: String,
}

impl Dataset {
    /// Reads and tokenises a JSONL file.
    pub fn load(path: &Path, format: Option<Format>, enc: &Encoder) -> Result<Dataset> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            Error::data(path, Some(line), "not valid UTF-8")
        })?;
        let mut format = format;
        let mut detected_at = 0;
        let mut examples = Vec::new();
        let (mut n_truncated, mut n_dropped) = (0, 0);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let err = |msg: String| Error::data(path, Some(line), msg);
            let v: Value = serde_json::from_str(raw).map_err(|e| err(format!("not a JSON object: {e}")))?;
            let Value::Object(record) = v else {
                return Err(err("expected a JSON object, one per line".into()));
            };
            let f = match format {
                Some(f) => f,
                None => {
                    let f = Format::detect(&record).ok_or_else(|| {
                        err("cannot tell the format from the fields: expected `messages` (chat), `instruction` \
                             (alpaca), `prompt`/`completion` or `text` (completion); or pass --format"
                            .into())
                    })?;
                    detected_at = line;
                    format = Some(f);
                    f
                }
            };
            let segments = segments(f, &record, enc.tokenizer).map_err(|msg| {
                let how = if detected_at > 0 {
                    format!("format {} (detected from line {detected_at})", f.name())
                } else {
                    format!("format {}", f.name())
                };
                err(format!("{msg} [{how}]"))
            })?;
            let mut ex = tokenize(&segments, f, enc, line).map_err(|e| match e {
                Error::Runtime(e) => err(e.to_string()),
                e => e,
            })?;
            if ex.n_targets() == 0 {
                return Err(err(format!("no response token to predict [format {}]", f.name())));
            }
            if ex.ids.len() > enc.max_seq_len {
                ex.ids.truncate(enc.max_seq_len);
                ex.trained.truncate(enc.max_seq_len);
                n_truncated += 1;
                if ex.n_targets() == 0 {
                    n_dropped += 1;
                    continue;
                }
            }
            examples.push(ex);
        }
        if examples.is_empty() {
            let why = if n_dropped > 0 {
                format!(
                    "all {n_dropped} examples lose every response token at --max-seq-len {}; raise it",
                    enc.max_seq_len
                )
            } else {
                "no examples (the file is empty or has only blank lines)".into()
            };
            return Err(Error::data(path, None, why));
        }
        let format = format.unwrap_or(Format::Completion);
        Ok(Dataset { path: path.to_path_buf(), format, examples, n_truncated, n_dropped, sha256 })
    }

    /// Total tokens whose prediction is trained on.
    pub fn n_targets(&self) -> usize {
        self.examples.iter().map(Example::n_targets).sum()
    }
}

/// A piece of an example's text and whether it is response (trained) text.
#[derive(Debug, PartialEq)]
struct Segment {
    text: String,
    trained: bool,
    /// Tokenise with the tokenizer's special tokens (BOS) added: the first prompt of a plain
    /// completion example.
    add_special: bool,
}

fn string_field<'a>(record: &'a serde_json::Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match record.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("field `{key}` must be a string, found {}", kind_of(other))),
    }
}

fn required<'a>(record: &'a serde_json::Map<String, Value>, key: &str) -> Result<&'a str, String> {
    string_field(record, key)?.ok_or_else(|| format!("missing field `{key}`"))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn nonempty<'a>(s: &'a str, key: &str) -> Result<&'a str, String> {
    if s.is_empty() {
        Err(format!("field `{key}` is empty: the example has no response tokens to train on"))
    } else {
        Ok(s)
    }
}

/// The prompt and response text of one record.
fn segments(f: Format, record: &serde_json::Map<String, Value>, tok: &Tokenizer) -> Result<Vec<Segment>, String> {
    let seg = |text: String, trained: bool, add_special: bool| Segment { text, trained, add_special };
    match f {
        Format::Alpaca => {
            let instruction = required(record, "instruction")?;
            let input = string_field(record, "input")?.unwrap_or("");
            let output = nonempty(required(record, "output")?, "output")?;
            if tok.has_chat_template() {
                let user = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
                chat_segments(&[Message::new("user", &user), Message::new("assistant", output)], tok)
            } else {
                let mut prompt = format!("### Instruction:\n{instruction}\n\n");
                if !input.is_empty() {
                    prompt.push_str(&format!("### Input:\n{input}\n\n"));
                }
                prompt.push_str("### Response:\n");
                Ok(vec![seg(prompt, false, true), seg(output.to_string(), true, false)])
            }
        }
        Format::Chat => {
            let list = match record.get("messages") {
                Some(Value::Array(a)) => a,
                Some(other) => return Err(format!("field `messages` must be an array, found {}", kind_of(other))),
                None => return Err("missing field `messages`".into()),
            };
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let Value::Object(m) = m else {
                    return Err(format!("messages[{i}] must be an object with `role` and `content`"));
                };
                let role = required(m, "role").map_err(|e| format!("messages[{i}]: {e}"))?;
                let content = required(m, "content").map_err(|e| format!("messages[{i}]: {e}"))?;
                if role == "assistant" {
                    nonempty(content, "content").map_err(|e| format!("messages[{i}] (assistant): {e}"))?;
                }
                messages.push(Message::new(role, content));
            }
            if !tok.has_chat_template() {
                return Err("chat records need the base model's chat template, and this model has none".into());
            }
            chat_segments(&messages, tok)
        }
        Format::Completion => {
            if let Some(text) = string_field(record, "text")? {
                if record.contains_key("prompt") || record.contains_key("completion") {
                    return Err("has both `text` and `prompt`/`completion`; use one form".into());
                }
                return Ok(vec![seg(nonempty(text, "text")?.to_string(), true, true)]);
            }
            let prompt = required(record, "prompt")?;
            let completion = nonempty(required(record, "completion")?, "completion")?;
            Ok(vec![seg(prompt.to_string(), false, true), seg(completion.to_string(), true, false)])
        }
    }
}

/// Splits a rendered conversation into prompt and assistant segments: for each assistant turn,
/// the render up to it with the generation prompt (prompt) and the render including it.
fn chat_segments(messages: &[Message], tok: &Tokenizer) -> Result<Vec<Segment>, String> {
    let render = |m: &[Message], gen: bool| tok.apply_chat_template(m, gen).map_err(|e| e.to_string());
    let full = render(messages, false)?;
    let mut out = Vec::new();
    let mut done = 0; // bytes of `full` already in segments
    for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let prompt = render(&messages[..i], true)?;
        let upto = render(&messages[..=i], false)?;
        if !upto.starts_with(&prompt) || !full.starts_with(&upto) || prompt.len() < done {
            return Err(format!(
                "the chat template does not render messages[{i}] as a continuation of the conversation before it; \
                 cannot tell prompt from response (use the completion format for this model)"
            ));
        }
        out.push(Segment { text: full[done..prompt.len()].to_string(), trained: false, add_special: false });
        out.push(Segment { text: full[prompt.len()..upto.len()].to_string(), trained: true, add_special: false });
        done = upto.len();
    }
    if out.is_empty() {
        return Err("no assistant message: nothing to train on".into());
    }
    if done < full.len() {
        out.push(Segment { text: full[done..].to_string(), trained: false, add_special: false });
    }
    Ok(out)
}

fn tokenize(segments: &[Segment], f: Format, enc: &Encoder, line: usize) -> Result<Example> {
    let mut ids = Vec::new();
    let mut trained = Vec::new();
    for s in segments.iter().filter(|s| !s.text.is_empty() || s.add_special) {
        let t = enc.tokenizer.encode(&s.text, s.add_special)?;
        trained.extend(std::iter::repeat_n(s.trained, t.len()));
        ids.extend(t.into_iter().map(i64::from));
    }
    // Plain text ends with EOS so the model learns to stop (chat templates end turns themselves).
    let plain = f == Format::Completion || (f == Format::Alpaca && !enc.tokenizer.has_chat_template());
    if plain {
        if let Some(eos) = enc.eos {
            ids.push(eos);
            trained.push(true);
        }
    }
    Ok(Example { ids, trained, line })
}
