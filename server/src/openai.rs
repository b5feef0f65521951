//! OpenAI's request and response shapes for `/v1/chat/completions` and `/v1/completions`:
//! parsing a request into what the engine needs (model and adapters, sampling, constraint,
//! prompt), and the JSON of replies and of streamed chunks.

use crate::adapters::Adapters;
use crate::error::ApiError;
use axum::http::StatusCode;
use peftrt::constraint::{Constraint, ConstraintSpec};
use peftrt::session::ActiveAdapters;
use peftrt::{Generation, Message, Model, SamplingParams, StopReason};
use serde::Deserialize;
use serde_json::{json, Value};

/// Which endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Chat => "messages",
            Kind::Completion => "prompt",
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// An adapter mixed in by the `adapters` extension field.
#[derive(Deserialize)]
struct AdapterRef {
    name: String,
    scale: Option<f32>,
}

/// The fields both endpoints share. Fields OpenAI defines that peftrt does not implement are
/// read so that asking for them is an error rather than silently ignored.
#[derive(Deserialize)]
struct Common {
    model: String,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    stop: Option<Stop>,
    seed: Option<i64>,
    n: Option<u64>,
    response_format: Option<Value>,
    adapters: Option<Vec<AdapterRef>>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logprobs: Option<Value>,
    top_logprobs: Option<Value>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    best_of: Option<u64>,
    echo: Option<bool>,
    suffix: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<ChatMessage>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: PromptField,
}

/// The prompt before tokenization.
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A parsed request: everything but the tokens and the compiled constraint, which
/// [`prepare`] makes (model work, off the async executor).
pub struct Plan {
    /// The `model` field, echoed in replies.
    pub model: String,
    pub adapters: ActiveAdapters,
    pub params: SamplingParams,
    /// `max_tokens` (or `max_completion_tokens`), if given.
    pub max_tokens: Option<usize>,
    pub constraint: Option<ConstraintSpec>,
    pub stream: bool,
    pub include_usage: bool,
    pub prompt: Prompt,
}

/// Most stop strings a request may give.
const MAX_STOP: usize = 16;

/// Parses a request body for `kind`, resolving its model id and adapters against the served ones.
pub fn parse(kind: Kind, body: Value, base: &str, adapters: &Adapters) -> Result<Plan, ApiError> {
    let bad = |e: serde_json::Error| ApiError::bad_request(format!("invalid request: {e}"));
    let (c, prompt) = match kind {
        Kind::Chat => {
            let r: ChatRequest = serde_json::from_value(body).map_err(bad)?;
            (r.common, chat_prompt(r.messages)?)
        }
        Kind::Completion => {
            let r: CompletionRequest = serde_json::from_value(body).map_err(bad)?;
            let p = match r.prompt {
                PromptField::Text(s) => Prompt::Text(s),
                PromptField::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
                PromptField::TokenLists(mut v) if v.len() == 1 => Prompt::Tokens(v.remove(0)),
                PromptField::Tokens(t) => Prompt::Tokens(t),
                _ => {
                    return Err(ApiError::bad_request("give one prompt per request (a string or a list of token ids)")
                        .param("prompt"))
                }
            };
            (r.common, p)
        }
    };
    let unsupported = |param: &'static str, what: &str| {
        Err(ApiError::bad_request(format!("{what} is not supported by this server")).param(param))
    };
    if c.n.is_some_and(|n| n != 1) {
        return unsupported("n", "n other than 1");
    }
    if c.best_of.is_some_and(|n| n != 1) {
        return unsupported("best_of", "best_of other than 1");
    }
    if !matches!(c.logprobs, None | Some(Value::Bool(false)) | Some(Value::Null)) || c.top_logprobs.is_some() {
        return unsupported("logprobs", "logprobs");
    }
    if c.logit_bias.as_ref().is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
        return unsupported("logit_bias", "logit_bias");
    }
    if c.tools.as_ref().is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        return unsupported("tools", "tool calling");
    }
    if c.echo == Some(true) {
        return unsupported("echo", "echo");
    }
    if c.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return unsupported("suffix", "suffix");
    }
    for (p, v) in [("frequency_penalty", c.frequency_penalty), ("presence_penalty", c.presence_penalty)] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::bad_request(format!(
                "{p} is not supported by this server; use repetition_penalty (1 = off)"
            ))
            .param(p));
        }
    }
    // The model id: the base, or a served adapter; then any adapters mixed in.
    let mut set: ActiveAdapters = Vec::new();
    if c.model != base {
        let Some(s) = adapters.get(&c.model) else {
            return Err(model_not_found(&c.model, "model"));
        };
        set.push((s.adapter.clone(), s.scale));
    }
    let mut names = vec![c.model.as_str()];
    for r in c.adapters.iter().flatten() {
        if names.contains(&r.name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "adapter {:?} is named twice (in \"model\" or \"adapters\"); give each adapter once",
                r.name
            ))
            .param("adapters"));
        }
        let Some(s) = adapters.get(&r.name) else {
            return Err(model_not_found(&r.name, "adapters"));
        };
        let scale = r.scale.unwrap_or(s.scale);
        peftrt::adapter::check_scale(&r.name, scale)
            .map_err(|e| ApiError::bad_request(e.to_string()).param("adapters"))?;
        set.push((s.adapter.clone(), scale));
        names.push(&r.name);
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad_request(format!("at most {MAX_STOP} stop strings are allowed")).param("stop"));
    }
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(ApiError::bad_request("max_tokens must be at least 1").param("max_tokens")),
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None => None,
    };
    if let Some(t) = c.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::bad_request("temperature must be between 0 and 2").param("temperature"));
        }
    }
    let params = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k: c.top_k.unwrap_or(0) as usize,
        min_p: c.min_p.unwrap_or(0.0),
        repetition_penalty: c.repetition_penalty.unwrap_or(1.0),
        seed: c.seed.map_or_else(random_seed, |s| s as u64),
        max_tokens: 0, // set once the prompt's length is known
        stop,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        ..Default::default()
    };
    params.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let constraint = match &c.response_format {
        None | Some(Value::Null) => None,
        Some(rf) => {
            peftrt::batch::response_format(rf).map_err(|e| ApiError::bad_request(e).param("response_format"))?
        }
    };
    Ok(Plan {
        model: c.model,
        adapters: set,
        params,
        max_tokens,
        constraint,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
        prompt,
    })
}

/// 404 for a model id that is neither the base nor a served adapter.
pub fn model_not_found(name: &str, param: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("the model {name:?} does not exist on this server; GET /v1/models lists the base model and adapters"),
    )
    .param(param)
    .code("model_not_found")
}

/// A seed for a request that gives none (sampled replies then differ from run to run).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

fn chat_prompt(messages: Vec<ChatMessage>) -> Result<Prompt, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("\"messages\" is empty; give at least one message").param("messages"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let text = match m.content {
            Some(Content::Text(s)) => s,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "content parts of type {:?} are not supported; send text",
                                p.kind
                            ))
                            .param("messages"))
                        }
                    }
                }
                s
            }
            None if m.role == "assistant" => String::new(),
            None => {
                return Err(
                    ApiError::bad_request(format!("a {:?} message has no \"content\"", m.role)).param("messages")
                )
            }
        };
        // OpenAI's newer name for the system role.
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        out.push(Message::new(role, &text));
    }
    Ok(Prompt::Chat(out))
}

/// Tokenizes the prompt (the chat template for messages, as `peftrt generate --chat` does) and
/// compiles the constraint. Model work: run it off the async executor.
pub fn prepare(
    model: &Model,
    kind: Kind,
    prompt: Prompt,
    spec: Option<ConstraintSpec>,
) -> Result<(Vec<u32>, Option<Constraint>), ApiError> {
    let tok = model.tokenizer()?;
    let param = kind.prompt_param();
    let in_prompt = |e: peftrt::Error| ApiError::bad_request(e.to_string()).param(param);
    let tokens = match prompt {
        Prompt::Chat(msgs) => {
            let text = tok.apply_chat_template(&msgs, true).map_err(in_prompt)?;
            tok.encode(&text, false).map_err(in_prompt)?
        }
        Prompt::Text(s) => tok.encode(&s, true).map_err(in_prompt)?,
        Prompt::Tokens(t) => {
            let vocab = model.config.vocab_size;
            if let Some(&bad) = t.iter().find(|&&x| x as usize >= vocab) {
                return Err(ApiError::bad_request(format!(
                    "token id {bad} is out of range for this model's vocabulary of {vocab}"
                ))
                .param(param));
            }
            t
        }
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param(param));
    }
    let constraint = spec.map(|s| Constraint::new(model, &s)).transpose()?;
    Ok((tokens, constraint))
}

/// OpenAI's `finish_reason`.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

pub fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens.len(),
        "total_tokens": g.prompt_tokens + g.tokens.len(),
    })
}

/// Identity of one reply, shared by its chunks.
pub struct ReplyId {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ReplyId {
    /// The whole reply (not streamed).
    pub fn complete(&self, g: &Generation) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": null,
                "finish_reason": finish_reason(g.stop),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": g.text,
                "logprobs": null,
                "finish_reason": finish_reason(g.stop),
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
            "usage": usage(g),
        })
    }

    /// One streamed chunk: `text` (for chat, the delta's content; `role` too on the first),
    /// `finish` on the last; `usage: null` on every chunk when the client asked for usage.
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<StopReason>, include_usage: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(finish_reason)})
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish.map(finish_reason),
            }),
        };
        let mut v = self.envelope(vec![choice]);
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The last chunk of a stream with `include_usage`: no choices, the token counts.
    pub fn usage_chunk(&self, g: &Generation) -> Value {
        let mut v = self.envelope(Vec::new());
        v["usage"] = usage(g);
        v
    }

    fn envelope(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Completion => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }
}
