//! The `peftrt batch` request format: one JSON object per line, either
//! `{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the model's chat
//! template) or `{"prompt": "..."}` (plain text, special tokens added as the tokenizer does);
//! an optional `"id"` of any JSON type is copied to the result line. A request may constrain
//! its reply, in OpenAI's shape — `"response_format": {"type": "json_schema", "json_schema":
//! {"name": ..., "schema": {...}}}` or `{"type": "json_object"}` (`{"type": "text"}`: none) —
//! or with a `"grammar"` (Lark) or `"regex"` string; at most one of them. `"adapters":
//! ["DIR[:SCALE]", ...]` picks the request's adapters (the `--adapter` flag's syntax; `[]` is
//! the base alone) instead of the flags'.
//!
//! [`parse_request`] turns one line into prompt tokens. It never panics, whatever the line
//! holds (the fuzz target `batch_request` calls it on arbitrary bytes).

use crate::constraint::ConstraintSpec;
use crate::tokenizer::{Message, Tokenizer};
use serde_json::Value;

/// One parsed request: its id (JSON `null` when the line has none), its prompt tokens and the
/// constraint it asks for, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchRequest {
    pub id: Value,
    pub tokens: Vec<u32>,
    pub constraint: Option<ConstraintSpec>,
    /// The request's own adapters (`DIR` or `DIR:SCALE` each), if it names any.
    pub adapters: Option<Vec<String>>,
}

/// OpenAI's `response_format` object as a constraint: `{"type": "json_schema", "json_schema":
/// {"name": ..., "schema": {...}}}`, `{"type": "json_object"}`, or `{"type": "text"}` (none).
/// One reading for `peftrt batch` and `peftrt-server`.
pub fn response_format(rf: &Value) -> Result<Option<ConstraintSpec>, String> {
    match rf.get("type").and_then(Value::as_str) {
        Some("json_schema") => {
            let schema = rf
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or("\"response_format\" of type json_schema needs \"json_schema\": {\"schema\": {...}}")?;
            Ok(Some(ConstraintSpec::JsonSchema(schema.to_string())))
        }
        Some("json_object") => Ok(Some(ConstraintSpec::AnyJson)),
        Some("text") => Ok(None),
        _ => Err("\"response_format\" \"type\" must be \"json_schema\", \"json_object\" or \"text\"".into()),
    }
}

/// The request's own constraint: `response_format`, `grammar` or `regex` (at most one).
fn constraint(v: &Value) -> Result<Option<ConstraintSpec>, String> {
    let mut specs = Vec::new();
    if let Some(rf) = v.get("response_format") {
        specs.extend(response_format(rf)?);
    }
    for (key, make) in
        [("grammar", ConstraintSpec::Lark as fn(String) -> ConstraintSpec), ("regex", ConstraintSpec::Regex)]
    {
        if let Some(s) = v.get(key) {
            specs.push(make(s.as_str().ok_or(format!("\"{key}\" is not a string"))?.to_string()));
        }
    }
    if specs.len() > 1 {
        return Err("give at most one of \"response_format\", \"grammar\" and \"regex\"".into());
    }
    Ok(specs.pop())
}

/// Parses one request line and tokenizes its prompt. The error says what is wrong with the
/// line (the caller adds the file and line number).
pub fn parse_request(line: &str, tok: &Tokenizer) -> Result<BatchRequest, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let id = v.get("id").cloned().unwrap_or(Value::Null);
    let constraint = constraint(&v)?;
    let adapters = match v.get("adapters") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_str().map(str::to_string).filter(|s| !s.is_empty()))
                .collect::<Option<Vec<_>>>()
                .ok_or("\"adapters\" must be an array of non-empty strings, \"DIR\" or \"DIR:SCALE\"")?,
        ),
        Some(_) => return Err("\"adapters\" must be an array of strings, \"DIR\" or \"DIR:SCALE\"".into()),
    };
    let tokens = if let Some(msgs) = v.get("messages") {
        let msgs = msgs.as_array().ok_or("\"messages\" is not an array")?;
        let mut parsed = Vec::with_capacity(msgs.len());
        for m in msgs {
            let field = |k: &str| m.get(k).and_then(|x| x.as_str()).ok_or(format!("a message has no string \"{k}\""));
            parsed.push(Message::new(field("role")?, field("content")?));
        }
        let text = tok.apply_chat_template(&parsed, true).map_err(|e| e.to_string())?;
        tok.encode(&text, false).map_err(|e| e.to_string())?
    } else if let Some(p) = v.get("prompt") {
        tok.encode(p.as_str().ok_or("\"prompt\" is not a string")?, true).map_err(|e| e.to_string())?
    } else {
        return Err("no \"messages\" or \"prompt\" field".into());
    };
    if tokens.is_empty() {
        return Err("the prompt is empty".into());
    }
    Ok(BatchRequest { id, tokens, constraint, adapters })
}
