//! A JSON Schema validator for the keywords structured-output tasks use: `type`, `properties`,
//! `required`, `additionalProperties` (boolean or schema), `items`, `enum`, `const`,
//! `minItems`/`maxItems`, `minLength`/`maxLength`, `minimum`/`maximum`, `anyOf`/`oneOf`/
//! `allOf`, `if`/`then`/`else`, plus the annotations `title`, `description`, `default`, `examples`, `$schema`,
//! `$id`. A schema using any other keyword (`$ref`, `pattern`, `format`, …) is refused when
//! loaded, never silently half-checked. Semantics follow JSON Schema 2020-12 for these keywords.

use crate::error::{Error, Result};
use crate::fsutil;
use serde_json::Value;
use std::path::Path;

const KEYWORDS: [&str; 19] = [
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
    "if",
    "then",
    "else",
];
const ANNOTATIONS: [&str; 6] = ["title", "description", "default", "examples", "$schema", "$id"];

/// A checked schema.
#[derive(Clone, Debug)]
pub struct Schema(Value);

impl Schema {
    /// Reads and checks a schema file (size-capped like every JSON input).
    pub fn load(path: &Path) -> Result<Schema> {
        let text = fsutil::read_text_file(path, fsutil::MAX_JSON_BYTES)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not JSON: {e}")))?;
        Self::new(v).map_err(|msg| Error::format(path, msg))
    }

    /// Checks a schema value; the error names where (`#/properties/a`) and the keyword.
    pub fn new(v: Value) -> Result<Schema, String> {
        check(&v, "#")?;
        Ok(Schema(v))
    }

    /// Whether `instance` satisfies the schema.
    pub fn is_valid(&self, instance: &Value) -> bool {
        self.first_error(instance).is_none()
    }

    /// The first place where `instance` breaks the schema, or `None` when it satisfies it.
    pub fn first_error(&self, instance: &Value) -> Option<SchemaError> {
        first_error(&self.0, instance, "")
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
            "additionalProperties" | "items" | "if" | "then" | "else" => check(v, &format!("{at}/{k}"))?,
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

/// Where an instance first breaks its schema: the path to the value (object keys joined by `.`,
/// array indices folded to `[]`, as in `items[].product`) and the keyword that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaError {
    pub path: String,
    pub keyword: &'static str,
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = if self.path.is_empty() { "(top level)" } else { &self.path };
        write!(f, "{at}: {}", self.keyword)
    }
}

/// JSON Schema's equality: numbers compare by value (`1` equals `1.0`), everything else as JSON.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
            (Some(i), Some(j), _, _) => i == j,
            (_, _, Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| equal(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, a)| y.get(k).is_some_and(|b| equal(a, b)))
        }
        _ => a == b,
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn fail(path: &str, keyword: &'static str) -> Option<SchemaError> {
    Some(SchemaError { path: path.to_string(), keyword })
}

/// The first violation of `s` by `x` (at `path`); keywords are checked in a fixed order.
fn first_error(s: &Value, x: &Value, path: &str) -> Option<SchemaError> {
    let obj = match s {
        Value::Bool(true) => return None,
        Value::Bool(false) => return fail(path, "false"),
        Value::Object(o) => o,
        _ => return fail(path, "schema"),
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
            return fail(path, "type");
        }
    }
    if obj.get("enum").and_then(Value::as_array).is_some_and(|e| !e.iter().any(|v| equal(v, x))) {
        return fail(path, "enum");
    }
    if obj.get("const").is_some_and(|c| !equal(c, x)) {
        return fail(path, "const");
    }
    if let Value::Object(o) = x {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            if req.iter().filter_map(Value::as_str).any(|k| !o.contains_key(k)) {
                return fail(path, "required");
            }
        }
        for (k, v) in o {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => {
                    if let Some(e) = first_error(sub, v, &join(path, k)) {
                        return Some(e);
                    }
                }
                None => {
                    if obj.get("additionalProperties").is_some_and(|a| first_error(a, v, path).is_some()) {
                        return fail(path, "additionalProperties");
                    }
                }
            }
        }
    }
    if let Value::Array(a) = x {
        if let Some(items) = obj.get("items") {
            let at = format!("{path}[]");
            if let Some(e) = a.iter().find_map(|v| first_error(items, v, &at)) {
                return Some(e);
            }
        }
        if count("minItems").is_some_and(|m| a.len() < m) {
            return fail(path, "minItems");
        }
        if count("maxItems").is_some_and(|m| a.len() > m) {
            return fail(path, "maxItems");
        }
    }
    if let Value::String(st) = x {
        let n = st.chars().count();
        if count("minLength").is_some_and(|m| n < m) {
            return fail(path, "minLength");
        }
        if count("maxLength").is_some_and(|m| n > m) {
            return fail(path, "maxLength");
        }
    }
    if let Some(f) = x.as_f64() {
        if num("minimum").is_some_and(|m| f < m) {
            return fail(path, "minimum");
        }
        if num("maximum").is_some_and(|m| f > m) {
            return fail(path, "maximum");
        }
    }
    let subs = |k: &str| obj.get(k).and_then(Value::as_array);
    let valid = |s: &Value| first_error(s, x, path).is_none();
    if let Some(e) = subs("allOf").and_then(|l| l.iter().find_map(|s| first_error(s, x, path))) {
        return Some(e);
    }
    if subs("anyOf").is_some_and(|l| !l.iter().any(valid)) {
        return fail(path, "anyOf");
    }
    if subs("oneOf").is_some_and(|l| l.iter().filter(|s| valid(s)).count() != 1) {
        return fail(path, "oneOf");
    }
    if let Some(cond) = obj.get("if") {
        let branch = if valid(cond) { obj.get("then") } else { obj.get("else") };
        if let Some(e) = branch.and_then(|b| first_error(b, x, path)) {
            return Some(e);
        }
    }
    None
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
    fn if_then_else_picks_the_branch_by_the_condition() {
        let s = Schema::new(json!({
            "type": "object",
            "if": {"properties": {"method": {"const": "pickup"}}},
            "then": {"properties": {"address": {"type": "null"}}},
            "else": {"properties": {"address": {"type": "object"}}}
        }))
        .unwrap();
        assert!(s.is_valid(&json!({"method": "pickup", "address": null})));
        assert!(s.is_valid(&json!({"method": "post", "address": {}})));
        assert_eq!(s.first_error(&json!({"method": "pickup", "address": {}})).unwrap().to_string(), "address: type");
        assert_eq!(s.first_error(&json!({"method": "post", "address": null})).unwrap().to_string(), "address: type");
        // Without `then`/`else`, `if` alone constrains nothing.
        assert!(Schema::new(json!({"if": {"type": "string"}})).unwrap().is_valid(&json!(1)));
    }

    #[test]
    fn numbers_compare_by_value_in_enum_and_const() {
        let s = Schema::new(json!({"enum": [1, "a"]})).unwrap();
        assert!(s.is_valid(&json!(1.0)) && s.is_valid(&json!(1)) && !s.is_valid(&json!(2)));
        let s = Schema::new(json!({"const": {"n": [2.0]}})).unwrap();
        assert!(s.is_valid(&json!({"n": [2]})) && !s.is_valid(&json!({"n": [2, 3]})));
        assert!(!Schema::new(json!({"const": true})).unwrap().is_valid(&json!(1)), "true is not 1");
    }

    #[test]
    fn the_first_error_names_the_path_and_keyword() {
        let s = Schema::new(json!({
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "items": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["product"],
                    "properties": {"product": {"enum": ["tea", "coffee"]}}}}
            }
        }))
        .unwrap();
        let err = |v: Value| s.first_error(&v).map(|e| e.to_string());
        assert_eq!(err(json!({"items": [{"product": "tea"}]})), None);
        assert_eq!(err(json!({"items": [{"product": "tea"}, {"product": "milk"}]})).unwrap(), "items[].product: enum");
        assert_eq!(err(json!({"items": [{}]})).unwrap(), "items[]: required");
        assert_eq!(err(json!({"items": []})).unwrap(), "items: minItems");
        assert_eq!(err(json!({"x": 1})).unwrap(), "(top level): additionalProperties");
        assert_eq!(err(json!([])).unwrap(), "(top level): type");
    }
}
