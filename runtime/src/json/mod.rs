//! What "the model answered in valid JSON" means, once for the whole project: the trainer's
//! `trainer eval`, `peftrt eval-json` and the demo's report (which calls `peftrt eval-json`) all
//! count with [`parse_reply`] and [`Schema`].
//!
//! The rule, in [`parse_reply`]: the reply with surrounding whitespace removed is one JSON value
//! (RFC 8259: no `NaN`, no comments, no trailing commas), or it is one JSON value inside a
//! Markdown code fence. The fence opens with ```` ``` ```` and an optional info string that ends
//! at the first newline (on a single line, only the tag `json` may follow the backticks), and
//! closes with ```` ``` ```` at the very end; a missing closing fence is tolerated (a reply that
//! stopped right after the value). Text before or after the value or the fence makes the reply
//! invalid: an API client would choke on it.

mod schema;

pub use schema::{Schema, SchemaError};

use crate::error::{Error, Result};
use crate::fsutil;
use serde_json::Value;
use std::path::Path;

/// The JSON value a model's reply holds under the project's rule (module docs), or `None`.
pub fn parse_reply(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    let rest = t.strip_prefix("```")?;
    let body = match rest.split_once('\n') {
        Some((_info, body)) => body,
        None => rest.strip_prefix("json").unwrap_or(rest),
    };
    let body = body.trim_end();
    let body = body.strip_suffix("```").unwrap_or(body);
    serde_json::from_str(body.trim()).ok()
}

/// One reply judged: its value when it parses, and with a schema, the first place it breaks it.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub value: Option<Value>,
    /// `None` when the reply is not JSON or no schema was given.
    pub schema_error: Option<SchemaError>,
}

impl Verdict {
    pub fn judge(text: &str, schema: Option<&Schema>) -> Verdict {
        let value = parse_reply(text);
        let schema_error = match (&value, schema) {
            (Some(v), Some(s)) => s.first_error(v),
            _ => None,
        };
        Verdict { value, schema_error }
    }

    pub fn is_json(&self) -> bool {
        self.value.is_some()
    }

    /// Parses and satisfies the schema (with no schema: parses).
    pub fn is_valid(&self) -> bool {
        self.value.is_some() && self.schema_error.is_none()
    }
}

impl Verdict {
    /// The verdict as one line of `peftrt eval-json`'s output: `json` (parses), `value` (or
    /// null), and with a schema `schema_valid` and `schema_error` (`"items[].product: enum"`).
    pub fn to_json(&self, with_schema: bool) -> Value {
        let mut line = serde_json::json!({"json": self.is_json(), "value": self.value.clone().unwrap_or(Value::Null)});
        if with_schema {
            line["schema_valid"] = Value::Bool(self.is_valid());
            line["schema_error"] = self.schema_error.as_ref().map_or(Value::Null, |e| Value::String(e.to_string()));
        }
        line
    }
}

/// Judges every reply in a JSON Lines file such as `peftrt batch --out` writes: the string in
/// each line's `field` (usually `text`) is the reply; a line without it (a request that failed,
/// `{"error": ...}`) counts as no JSON. A line that is not a JSON object is an error naming the
/// file and line.
pub fn judge_replies(path: &Path, field: &str, schema: Option<&Schema>) -> Result<Vec<Verdict>> {
    let text = fsutil::read_text_file(path, fsutil::MAX_TEXT_BYTES)?;
    let mut verdicts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::format(path, format!("line {}: not a JSON object: {e}", i + 1)))?;
        let obj = v.as_object().ok_or_else(|| Error::format(path, format!("line {}: not a JSON object", i + 1)))?;
        verdicts.push(match obj.get(field) {
            Some(Value::String(reply)) => Verdict::judge(reply, schema),
            None => Verdict { value: None, schema_error: None },
            Some(_) => return Err(Error::format(path, format!("line {}: `{field}` is not a string", i + 1))),
        });
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_values_parse_after_trimming() {
        assert_eq!(parse_reply(" {\"a\": 1}\n"), Some(json!({"a": 1})));
        assert_eq!(parse_reply("[1, 2]"), Some(json!([1, 2])));
        assert_eq!(parse_reply("\"s\""), Some(json!("s")));
        assert_eq!(parse_reply(""), None);
        assert_eq!(parse_reply("   "), None);
    }

    #[test]
    fn fenced_values_parse_with_or_without_the_closing_fence() {
        assert_eq!(parse_reply("```json\n[1, 2]\n```"), Some(json!([1, 2])));
        assert_eq!(parse_reply("```\n{\"a\": 1}\n```\n"), Some(json!({"a": 1})));
        assert_eq!(parse_reply("```JSON\n{\"a\": 1}\n```"), Some(json!({"a": 1})), "any info string");
        // The two cases the trainer's and the demo's old rules disagreed on: both parse now.
        assert_eq!(parse_reply("```json\n{\"a\": 1}\n"), Some(json!({"a": 1})), "unterminated fence");
        assert_eq!(parse_reply("```json {\"a\": 1}```"), Some(json!({"a": 1})), "one-line fence");
        assert_eq!(parse_reply("```{\"a\": 1}```"), Some(json!({"a": 1})), "one-line fence, no tag");
    }

    #[test]
    fn anything_around_the_value_makes_it_invalid() {
        assert_eq!(parse_reply("The answer is {\"a\": 1}"), None);
        assert_eq!(parse_reply("{\"a\": 1} and more"), None);
        assert_eq!(parse_reply("{\"a\": 1}\n{\"b\": 2}"), None, "two values");
        assert_eq!(parse_reply("```json\n{\"a\": 1}\n```\nHope this helps!"), None);
        assert_eq!(parse_reply("Here:\n```json\n{\"a\": 1}\n```"), None);
        assert_eq!(parse_reply("```json\n{\"a\": 1"), None, "cut inside the value");
        assert_eq!(parse_reply("```jsonx {\"a\": 1}```"), None, "an unknown one-line tag");
    }

    #[test]
    fn only_rfc_8259_json_counts() {
        assert_eq!(parse_reply("{\"a\": NaN}"), None);
        assert_eq!(parse_reply("{\"a\": 1,}"), None);
        assert_eq!(parse_reply("{'a': 1}"), None);
        assert_eq!(parse_reply("// note\n{\"a\": 1}"), None);
    }

    #[test]
    fn a_verdict_names_the_first_schema_violation() {
        let s = Schema::new(json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}))
            .unwrap();
        assert!(Verdict::judge("{\"a\": 1}", Some(&s)).is_valid());
        let v = Verdict::judge("{\"a\": \"x\"}", Some(&s));
        assert!(v.is_json() && !v.is_valid());
        assert_eq!(v.schema_error.unwrap().to_string(), "a: type");
        let v = Verdict::judge("nope", Some(&s));
        assert!(!v.is_json() && v.schema_error.is_none());
        assert!(Verdict::judge("[1]", None).is_valid());
    }

    #[test]
    fn reply_files_are_judged_line_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("results.jsonl");
        let lines = [
            "{\"id\": 1, \"text\": \"{\\\"a\\\": 1}\"}",
            "",
            "{\"id\": 2, \"error\": \"too long\"}",
            "{\"text\": \"no\"}",
        ];
        std::fs::write(&f, lines.join("\n")).unwrap();
        let v = judge_replies(&f, "text", None).unwrap();
        assert_eq!(v.iter().map(Verdict::is_json).collect::<Vec<_>>(), [true, false, false]);
        assert_eq!(v[0].to_json(false), json!({"json": true, "value": {"a": 1}}));
        std::fs::write(&f, "{\"text\": 3}\n").unwrap();
        let e = judge_replies(&f, "text", None).unwrap_err().to_string();
        assert!(e.contains("results.jsonl") && e.contains("line 1") && e.contains("`text`"), "{e}");
        std::fs::write(&f, "{\"text\": \"x\"}\nnot json\n").unwrap();
        let e = judge_replies(&f, "text", None).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
