//! A JSON Schema validator for the keywords structured-output tasks use: `type`, `properties`,
//! `required`, `additionalProperties` (boolean or schema), `items`, `enum`, `const`,
//! `minItems`/`maxItems`, `minLength`/`maxLength`, `minimum`/`maximum`, `anyOf`/`oneOf`/
//! `allOf`, plus the annotations `title`, `description`, `default`, `examples`, `$schema`,
//! `$id`. A schema using any other keyword (`$ref`, `pattern`, `format`, …) is refused when
//! loaded, never silently half-checked. Semantics follow JSON Schema 2020-12 for these keywords.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

const KEYWORDS: [&str; 16] = [
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "anyOf",
    "oneOf",
    "allOf",
];
const ANNOTATIONS: [&str; 6] = ["title", "description", "default", "examples", "$schema", "$id"];

/// A checked schema.
#[derive(Clone, Debug)]
pub struct Schema(Value);

impl Schema {
    pub fn load(path: &Path) -> Result<Schema> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::data(path, None, format!("not JSON: {e}")))?;
        Self::new(v).map_err(|msg| Error::data(path, None, msg))
    }

    pub fn new(v: Value) -> Result<Schema, String> {
        check(&v, "#")?;
        Ok(Schema(v))
    }

    /// Whether `instance` satisfies the schema.
    pub fn is_valid(&self, instance: &Value) -> bool {
        valid(&self.0, instance)
    }
}

/// Refuses keywords this validator does not implement, recursively.
fn check(s: &Value, at: &str) -> Result<(), String> {
    let obj = match s {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("{at}: a schema must be an object or a boolean")),
    };
    for (k, v) in obj {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!(
                "{at}: keyword `{k}` is not supported (supported: {}); simplify the schema",
                KEYWORDS.join(", ")
            ));
        }
        match k.as_str() {
            "properties" => {
                for (name, sub) in v.as_object().ok_or(format!("{at}/properties: expected an object"))? {
                    check(sub, &format!("{at}/properties/{name}"))?;
                }
            }
            "additionalProperties" | "items" => check(v, &format!("{at}/{k}"))?,
            "anyOf" | "oneOf" | "allOf" => {
                for (i, sub) in v.as_array().ok_or(format!("{at}/{k}: expected an array"))?.iter().enumerate() {
                    check(sub, &format!("{at}/{k}/{i}"))?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn has_type(t: &str, x: &Value) -> bool {
    match t {
        "null" => x.is_null(),
        "boolean" => x.is_boolean(),
        "object" => x.is_object(),
        "array" => x.is_array(),
        "string" => x.is_string(),
        "number" => x.is_number(),
        "integer" => x.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => false,
    }
}

fn valid(s: &Value, x: &Value) -> bool {
    let obj = match s {
        Value::Bool(b) => return *b,
        Value::Object(o) => o,
        _ => return false,
    };
    let num = |k: &str| obj.get(k).and_then(Value::as_f64);
    let count = |k: &str| obj.get(k).and_then(Value::as_u64).map(|n| n as usize);
    if let Some(t) = obj.get("type") {
        let ok = match t {
            Value::String(t) => has_type(t, x),
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(|t| has_type(t, x)),
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    if obj.get("enum").and_then(Value::as_array).is_some_and(|e| !e.contains(x)) {
        return false;
    }
    if obj.get("const").is_some_and(|c| c != x) {
        return false;
    }
    if let Value::Object(o) = x {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            if req.iter().filter_map(Value::as_str).any(|k| !o.contains_key(k)) {
                return false;
            }
        }
        for (k, v) in o {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => {
                    if !valid(sub, v) {
                        return false;
                    }
                }
                None => {
                    if obj.get("additionalProperties").is_some_and(|a| !valid(a, v)) {
                        return false;
                    }
                }
            }
        }
    }
    if let Value::Array(a) = x {
        if obj.get("items").is_some_and(|items| !a.iter().all(|v| valid(items, v))) {
            return false;
        }
        if count("minItems").is_some_and(|m| a.len() < m) || count("maxItems").is_some_and(|m| a.len() > m) {
            return false;
        }
    }
    if let Value::String(st) = x {
        let n = st.chars().count();
        if count("minLength").is_some_and(|m| n < m) || count("maxLength").is_some_and(|m| n > m) {
            return false;
        }
    }
    if let Some(f) = x.as_f64() {
        if num("minimum").is_some_and(|m| f < m) || num("maximum").is_some_and(|m| f > m) {
            return false;
        }
    }
    let subs = |k: &str| obj.get(k).and_then(Value::as_array);
    if subs("allOf").is_some_and(|l| !l.iter().all(|s| valid(s, x))) {
        return false;
    }
    if subs("anyOf").is_some_and(|l| !l.iter().any(|s| valid(s, x))) {
        return false;
    }
    if subs("oneOf").is_some_and(|l| l.iter().filter(|s| valid(s, x)).count() != 1) {
        return false;
    }
    true
}

/// The JSON value in a model's response: the whole trimmed text, or the body of a fenced
/// ```` ```json ```` block.
pub fn parse_response(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Some(v);
    }
    let body = t.strip_prefix("```json").or_else(|| t.strip_prefix("```"))?;
    let body = body.trim_end().strip_suffix("```")?;
    serde_json::from_str(body.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn validates_the_supported_keywords() {
        let s = Schema::new(json!({
            "type": "object",
            "required": ["name", "tags"],
            "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "age": {"type": "integer", "minimum": 0},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
                "kind": {"anyOf": [{"const": "x"}, {"type": "null"}]}
            }
        }))
        .unwrap();
        assert!(s.is_valid(&json!({"name": "n", "tags": ["a"], "age": 3, "kind": null})));
        assert!(!s.is_valid(&json!({"name": "n"})), "required");
        assert!(!s.is_valid(&json!({"name": "", "tags": []})), "minLength");
        assert!(!s.is_valid(&json!({"name": "n", "tags": ["c"]})), "enum");
        assert!(!s.is_valid(&json!({"name": "n", "tags": [], "age": 1.5})), "integer");
        assert!(!s.is_valid(&json!({"name": "n", "tags": [], "extra": 1})), "additionalProperties");
        assert!(!s.is_valid(&json!({"name": "n", "tags": ["a", "b", "a"]})), "maxItems");
        assert!(!s.is_valid(&json!({"name": "n", "tags": [], "kind": "y"})), "anyOf");
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        let e = Schema::new(json!({"type": "object", "properties": {"a": {"$ref": "#/x"}}})).unwrap_err();
        assert!(e.contains("#/properties/a") && e.contains("$ref"), "{e}");
        assert!(Schema::new(json!({"type": "string", "pattern": "^a"})).is_err());
    }

    #[test]
    fn responses_parse_plain_or_fenced() {
        assert_eq!(parse_response(" {\"a\": 1}\n"), Some(json!({"a": 1})));
        assert_eq!(parse_response("```json\n[1, 2]\n```"), Some(json!([1, 2])));
        assert_eq!(parse_response("The answer is {\"a\": 1}"), None);
    }
}
