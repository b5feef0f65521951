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

/// A padded batch of examples.
pub struct Batch {
    /// `[batch, seq]` Int64, right-padded.
    pub ids: tch::Tensor,
    /// `[batch, seq]` Int64: the token each position should predict, or −100 (prompt, padding,
    /// last position).
    pub labels: tch::Tensor,
    /// Positions counted in the loss.
    pub n_targets: i64,
    /// Real (unpadded) tokens.
    pub n_tokens: i64,
    /// For packed rows: `[batch, seq]` positions restarting at 0 with each example, and the
    /// example number of each token within its row (−1 for padding).
    pub packing: Option<(tch::Tensor, tch::Tensor)>,
}

/// The label ignored by the loss (PyTorch's `ignore_index` default).
pub const IGNORE: i64 = -100;

impl Batch {
    /// Right-pads `examples` with `pad` to the longest; labels are shifted so position `t`
    /// predicts token `t + 1` when that token is trained.
    pub fn new(examples: &[&Example], pad: i64) -> Result<Batch> {
        let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(examples.len() * len);
        let mut labels = Vec::with_capacity(examples.len() * len);
        let (mut n_targets, mut n_tokens) = (0, 0);
        for e in examples {
            let n = e.ids.len();
            ids.extend_from_slice(&e.ids);
            ids.extend(std::iter::repeat_n(pad, len - n));
            for t in 0..len {
                let label = if t + 1 < n && e.trained[t + 1] { e.ids[t + 1] } else { IGNORE };
                n_targets += i64::from(label != IGNORE);
                labels.push(label);
            }
            n_tokens += n as i64;
        }
        let shape = [examples.len() as i64, len as i64];
        Ok(Batch {
            ids: tch::Tensor::f_from_slice(&ids)?.f_reshape(shape)?,
            labels: tch::Tensor::f_from_slice(&labels)?.f_reshape(shape)?,
            n_targets,
            n_tokens,
            packing: None,
        })
    }

    /// Rows of several examples each, concatenated and right-padded to the longest row; each
    /// example keeps its own positions and labels (no prediction across examples).
    pub fn packed(rows: &[Vec<&Example>], pad: i64) -> Result<Batch> {
        let len = rows.iter().map(|r| r.iter().map(|e| e.ids.len()).sum::<usize>()).max().unwrap_or(0);
        let cap = rows.len() * len;
        let (mut ids, mut labels, mut positions, mut segments) =
            (Vec::with_capacity(cap), Vec::with_capacity(cap), Vec::with_capacity(cap), Vec::with_capacity(cap));
        let (mut n_targets, mut n_tokens) = (0, 0);
        for row in rows {
            for (k, e) in row.iter().enumerate() {
                let n = e.ids.len();
                ids.extend_from_slice(&e.ids);
                for t in 0..n {
                    let label = if t + 1 < n && e.trained[t + 1] { e.ids[t + 1] } else { IGNORE };
                    n_targets += i64::from(label != IGNORE);
                    labels.push(label);
                    positions.push(t as i64);
                    segments.push(k as i64);
                }
                n_tokens += n as i64;
            }
            let used = row.iter().map(|e| e.ids.len()).sum::<usize>();
            ids.extend(std::iter::repeat_n(pad, len - used));
            labels.extend(std::iter::repeat_n(IGNORE, len - used));
            positions.extend(0..(len - used) as i64);
            segments.extend(std::iter::repeat_n(-1, len - used));
        }
        let shape = [rows.len() as i64, len as i64];
        let t = |v: &[i64]| -> Result<tch::Tensor> { Ok(tch::Tensor::f_from_slice(v)?.f_reshape(shape)?) };
        Ok(Batch {
            ids: t(&ids)?,
            labels: t(&labels)?,
            n_targets,
            n_tokens,
            packing: Some((t(&positions)?, t(&segments)?)),
        })
    }
}

/// Packs examples, in the given order, into rows of at most `max_len` tokens: each row takes
/// examples while they fit (an example longer than `max_len` was already cut to it).
pub fn pack_rows(order: &[usize], lens: &[usize], max_len: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let mut used = 0;
    for &i in order {
        match rows.last_mut() {
            Some(row) if used + lens[i] <= max_len => {
                row.push(i);
                used += lens[i];
            }
            _ => {
                rows.push(vec![i]);
                used = lens[i];
            }
        }
    }
    rows
}

/// Rows of similar length batched together (transformers' `group_by_length`): the rows, in
/// their (shuffled) order, are cut into windows of `GROUP_WINDOW` batches; each window is
/// sorted by length, longest first, and cut into batches of `batch_size`; then the batches of
/// the epoch are shuffled with `seed`. Every row is kept exactly once, and a batch pads to a
/// length close to each of its rows' instead of to the longest of a random draw.
pub fn group_by_length(rows: Vec<Vec<usize>>, lens: &[usize], batch_size: usize, seed: u64) -> Vec<Vec<Vec<usize>>> {
    let row_len = |r: &Vec<usize>| r.iter().map(|&i| lens[i]).sum::<usize>();
    let mut batches: Vec<Vec<Vec<usize>>> = Vec::new();
    for window in rows.chunks(batch_size * GROUP_WINDOW) {
        let mut window = window.to_vec();
        // Stable: rows of equal length keep their shuffled order.
        window.sort_by_key(|r| std::cmp::Reverse(row_len(r)));
        batches.extend(window.chunks(batch_size).map(<[_]>::to_vec));
    }
    SplitMix64::new(seed ^ 0x6c65_6e67_7468).shuffle(&mut batches);
    batches
}

/// Batches per sorting window of [`group_by_length`].
pub const GROUP_WINDOW: usize = 32;

/// A small, fixed pseudo-random generator (SplitMix64) for shuffling: the order depends only
/// on the seed, on every platform and in every version.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The state's increment (2⁶⁴ / φ).
    pub const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The output function: a bijective 64-bit mix of the state.
    pub fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        Self::mix(self.0)
    }

    /// Uniform in `0..n` (n > 0), by rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// Holds out `fraction` of `examples` (at least one, at least one left to train on) for
/// evaluation, chosen by a permutation seeded with `seed`; both parts keep file order.
pub fn split_eval(examples: Vec<Example>, fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = examples.len();
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::Input(format!("--eval-split {fraction}: expected a fraction between 0 and 1")));
    }
    let k = ((n as f64 * fraction).round() as usize).max(1);
    if k >= n {
        return Err(Error::Input(format!(
            "--eval-split {fraction}: the data has {n} example(s), too few to hold out {k} and train on the rest"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed ^ 0x5eed_e7a1).shuffle(&mut order);
    let mut held = vec![false; n];
    for &i in &order[..k] {
        held[i] = true;
    }
    let (eval, train): (Vec<_>, Vec<_>) = examples.into_iter().zip(held).partition(|(_, h)| *h);
    Ok((train.into_iter().map(|(e, _)| e).collect(), eval.into_iter().map(|(e, _)| e).collect()))
}

/// Which examples each epoch trains on: all `n_main` training examples, plus `per_epoch_mix`
/// of the `n_mix` general-instruction examples of `--mix-data` (indices `n_main..`), taken in
/// turn from a seeded permutation so that successive epochs see different ones.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochPlan {
    pub n_main: usize,
    pub n_mix: usize,
    pub per_epoch_mix: usize,
}

impl EpochPlan {
    /// Without mixed-in data.
    pub fn plain(n_main: usize) -> Self {
        EpochPlan { n_main, n_mix: 0, per_epoch_mix: 0 }
    }

    /// `ratio` of every epoch's examples drawn from the `n_mix` mixed-in ones.
    pub fn mixed(n_main: usize, n_mix: usize, ratio: f64) -> Result<Self> {
        if !(ratio > 0.0 && ratio < 1.0) {
            return Err(Error::Input(format!("--mix-ratio {ratio}: expected a fraction between 0 and 1")));
        }
        let per_epoch_mix = ((n_main as f64 * ratio / (1.0 - ratio)).round() as usize).max(1);
        Ok(EpochPlan { n_main, n_mix, per_epoch_mix })
    }

    /// Examples per epoch.
    pub fn len(&self) -> usize {
        self.n_main + self.per_epoch_mix
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples of `epoch`, in training order: shuffled together (seeded), or without
    /// shuffling the training examples in file order followed by the mixed-in ones.
    pub fn order(&self, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_main).collect();
        if self.per_epoch_mix > 0 {
            let mut mix: Vec<usize> = (0..self.n_mix).collect();
            SplitMix64::new(seed ^ 0x0417_a11c).shuffle(&mut mix);
            let start = epoch as usize * self.per_epoch_mix;
            order.extend((0..self.per_epoch_mix).map(|j| self.n_main + mix[(start + j) % self.n_mix]));
        }
        if shuffle {
            SplitMix64::new(seed ^ epoch.wrapping_mul(0xa076_1d64_78bd_642f)).shuffle(&mut order);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_seeded_permutations() {
        let p = EpochPlan::plain(50);
        let a = p.order(7, 0, true);
        assert_eq!(a, p.order(7, 0, true));
        assert_ne!(a, p.order(7, 1, true));
        assert_ne!(a, p.order(8, 0, true));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(EpochPlan::plain(5).order(7, 0, false), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn length_groups_keep_every_row_once_and_pad_less() {
        let mut rng = SplitMix64::new(5);
        let lens: Vec<usize> = (0..1000).map(|_| 20 + rng.below(400) as usize).collect();
        let rows: Vec<Vec<usize>> = (0..1000).map(|i| vec![i]).collect();
        let padded = |batches: &[Vec<Vec<usize>>]| -> usize {
            batches.iter().map(|b| b.len() * b.iter().map(|r| lens[r[0]]).max().unwrap()).sum()
        };
        let plain: Vec<Vec<Vec<usize>>> = rows.chunks(4).map(<[_]>::to_vec).collect();
        let grouped = group_by_length(rows.clone(), &lens, 4, 9);
        let mut seen: Vec<usize> = grouped.iter().flatten().map(|r| r[0]).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert!(grouped.iter().all(|b| b.len() == 4));
        let real: usize = lens.iter().sum();
        assert!(padded(&grouped) - real < (padded(&plain) - real) / 5, "grouping must cut padding");
        // A function of the seed; the batch order changes with it.
        assert_eq!(grouped, group_by_length(rows.clone(), &lens, 4, 9));
        assert_ne!(grouped, group_by_length(rows, &lens, 4, 10));
    }

    #[test]
    fn mixed_epochs_take_turns_through_the_mix_data() {
        // 10 examples, ratio 1/6: 2 mixed-in examples per epoch out of 5.
        let p = EpochPlan::mixed(10, 5, 1.0 / 6.0).unwrap();
        assert_eq!((p.per_epoch_mix, p.len()), (2, 12));
        let e0 = p.order(1, 0, false);
        assert_eq!(&e0[..10], &(0..10).collect::<Vec<_>>()[..]);
        let mut seen: Vec<usize> = (0..3).flat_map(|e| p.order(1, e, false)[10..].to_vec()).collect();
        assert!(seen.iter().all(|&i| (10..15).contains(&i)));
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 5, "three epochs of two cover all five mixed-in examples");
        let mut shuffled = p.order(1, 0, true);
        shuffled.sort();
        let mut plain = e0.clone();
        plain.sort();
        assert_eq!(shuffled, plain, "shuffling permutes the same epoch");
        assert!(EpochPlan::mixed(10, 5, 1.0).is_err());
    }

    #[test]
    fn eval_split_is_seeded_and_disjoint() {
        let ex = |i: usize| Example { ids: vec![i as i64, 1], trained: vec![false, true], line: i + 1 };
        let all: Vec<Example> = (0..20).map(ex).collect();
        let (train, eval) = split_eval(all.clone(), 0.25, 3).unwrap();
        assert_eq!((train.len(), eval.len()), (15, 5));
        let (_, again) = split_eval(all.clone(), 0.25, 3).unwrap();
        assert_eq!(eval, again);
        assert!(eval.iter().all(|e| !train.contains(e)));
        assert!(train.windows(2).all(|w| w[0].line < w[1].line), "file order kept");
        assert!(split_eval(all[..1].to_vec(), 0.5, 3).is_err());
        assert!(split_eval(all, 1.5, 3).is_err());
    }

    #[test]
    fn packing_fills_rows_in_order() {
        assert_eq!(pack_rows(&[0, 1, 2, 3], &[3, 4, 2, 6], 8), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(pack_rows(&[2, 0], &[3, 4, 8], 8), vec![vec![2], vec![0]]);
        let e = Example { ids: vec![10, 11, 12], trained: vec![false, true, true], line: 1 };
        let f = Example { ids: vec![20, 21], trained: vec![false, true], line: 2 };
        let b = Batch::packed(&[vec![&e, &f], vec![&f]], 0).unwrap();
        let v = |t: &tch::Tensor| Vec::<i64>::try_from(&t.reshape([-1])).unwrap();
        assert_eq!(v(&b.ids), [10, 11, 12, 20, 21, 20, 21, 0, 0, 0]);
        assert_eq!(v(&b.labels), [11, 12, IGNORE, 21, IGNORE, 21, IGNORE, IGNORE, IGNORE, IGNORE]);
        let (pos, seg) = b.packing.as_ref().unwrap();
        assert_eq!(v(pos), [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]);
        assert_eq!(v(seg), [0, 0, 0, 1, 1, 0, 0, -1, -1, -1]);
        assert_eq!((b.n_targets, b.n_tokens), (4, 7));
    }

    #[test]
    fn labels_predict_the_next_trained_token() {
        let e = Example { ids: vec![10, 11, 12, 13], trained: vec![false, false, true, true], line: 1 };
        let f = Example { ids: vec![20, 21], trained: vec![false, true], line: 2 };
        let b = Batch::new(&[&e, &f], 0).unwrap();
        assert_eq!(Vec::<i64>::try_from(&b.ids.reshape([-1])).unwrap(), vec![10, 11, 12, 13, 20, 21, 0, 0]);
        assert_eq!(
            Vec::<i64>::try_from(&b.labels.reshape([-1])).unwrap(),
            vec![IGNORE, 12, 13, IGNORE, 21, IGNORE, IGNORE, IGNORE]
        );
        assert_eq!((b.n_targets, b.n_tokens), (3, 6));
        assert_eq!(e.n_targets() + f.n_targets(), 3);
    }
}
