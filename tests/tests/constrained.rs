//! Constrained decoding against the reference validator (issue 20): under each schema of
//! `tests/fixtures/schemas/` (nested objects, bounded arrays, enums, numeric bounds, optional
//! fields, `additionalProperties: false`, `$defs`/`$ref`, `anyOf`, string patterns and formats)
//! and the demo's order schema, every complete reply of greedy and of sampled decoding (several
//! seeds), on the tiny fixtures and on SmolLM2, is JSON that Python's `jsonschema` (formats
//! checked) accepts; and its text tokenizes back to the same text.
//!
//! The replies are written to a JSON Lines file and judged by `scripts/check_json_schema.py` with
//! the Python of `PEFTRT_PYTHON` (`make test` sets it; plain `cargo test` skips that step unless
//! `PEFTRT_REQUIRE_MODELS=1`).

use peftrt::constraint::{Constraint, ConstraintSpec};
use peftrt::{generate, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions, StopReason};
use peftrt_conformance::{fixture, real_model_path, repo_root};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The fixtures' schemas, whose strings are short enough for a random model to finish them,
/// and (for a real model) the demo's order schema.
fn schemas(with_order: bool) -> Vec<PathBuf> {
    let root = repo_root();
    let mut v = vec![
        root.join("tests/fixtures/schemas/nested.schema.json"),
        root.join("tests/fixtures/schemas/refs.schema.json"),
    ];
    if with_order {
        v.push(root.join("data/demo/order.constraint.schema.json"));
    }
    v
}

/// One reply to judge.
struct Reply {
    schema: PathBuf,
    text: String,
    what: String,
}

/// Generates under `schema` with greedy decoding and `seeds` sampled runs; returns the complete
/// replies, and how many runs were cut (a cut reply must say so: it is not judged).
fn replies(
    m: &Arc<Model>,
    what: &str,
    prompt: &[u32],
    schema: &Path,
    seeds: &[u64],
    max_tokens: usize,
) -> (Vec<Reply>, usize) {
    let spec = ConstraintSpec::JsonSchema(std::fs::read_to_string(schema).unwrap());
    let constraint = Constraint::new(m, &spec).unwrap_or_else(|e| panic!("{}: {e}", schema.display()));
    let tok = m.tokenizer().unwrap();
    let mut session = Session::new(
        m.clone(),
        &SessionOptions { n_ctx: 2048.min(m.config.max_position_embeddings), ..Default::default() },
    )
    .unwrap();
    let (mut out, mut cut) = (Vec::new(), 0);
    let runs = std::iter::once((0.0, 0)).chain(seeds.iter().map(|&s| (1.0, s)));
    for (temperature, seed) in runs {
        let params = SamplingParams { temperature, seed, max_tokens, top_p: 0.95, ..Default::default() };
        let mut sampler = Sampler::new(params, m.config.vocab_size).unwrap();
        sampler.set_constraint(Some(constraint.clone())).unwrap();
        session.reset();
        let g = generate(&mut session, prompt, &mut sampler, |_| true).unwrap();
        let label = format!("{what} {} T={temperature} seed {seed}", schema.file_name().unwrap().to_string_lossy());
        match g.stop {
            StopReason::Eos => {
                // The text the model wrote tokenizes back to itself (tokens that straddle the
                // grammar's boundaries, such as `"},` or `":"`, are allowed as they are).
                let again = tok.encode(&g.text, false).unwrap();
                assert_eq!(tok.decode(&again, false).unwrap(), g.text, "{label}");
                out.push(Reply { schema: schema.to_path_buf(), text: g.text, what: label });
            }
            StopReason::MaxTokens | StopReason::ContextFull => cut += 1,
            other => panic!("{label}: stopped by {other:?}"),
        }
    }
    (out, cut)
}

/// Runs `scripts/check_json_schema.py` on the replies; skipped without `PEFTRT_PYTHON`.
fn judge(replies: &[Reply]) {
    let python = match std::env::var_os("PEFTRT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None if std::env::var_os("PEFTRT_REQUIRE_MODELS").is_some() => panic!("PEFTRT_PYTHON is not set"),
        None => return eprintln!("skipped the jsonschema check: set PEFTRT_PYTHON to a Python with jsonschema"),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replies.jsonl");
    let lines: String = replies
        .iter()
        .map(|r| serde_json::json!({"schema": r.schema, "text": r.text, "what": r.what}).to_string() + "\n")
        .collect();
    std::fs::write(&path, lines).unwrap();
    let out = std::process::Command::new(python)
        .arg(repo_root().join("scripts/check_json_schema.py"))
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "replies that Python's jsonschema refuses:\n{report}");
}

#[test]
fn tiny_models_replies_validate_with_python_jsonschema() {
    let mut all = Vec::new();
    for name in ["tiny-llama", "tiny-qwen2"] {
        let m = Arc::new(Model::load(&fixture(name), &LoadOptions::default()).unwrap());
        let prompt = m.tokenizer().unwrap().encode("data:", true).unwrap();
        for schema in schemas(false) {
            let (r, cut) = replies(&m, name, &prompt, &schema, &[1, 2, 3], 200);
            // Random weights may wander to the token limit; most runs must still complete.
            assert!(r.len() >= 2, "{name} {}: only {} of 4 runs complete ({cut} cut)", schema.display(), r.len());
            all.extend(r);
        }
    }
    judge(&all);
}

#[test]
fn smollm2_replies_validate_with_python_jsonschema() {
    let Some(dir) = real_model_path("PEFTRT_SMOLLM2_DIR", "smollm2-135m-instruct") else { return };
    let m = Arc::new(Model::load(&dir, &LoadOptions::default()).unwrap());
    let tok = m.tokenizer().unwrap();
    let mut all = Vec::new();
    for schema in schemas(true) {
        let ask = "Reply with one JSON object for a small shop order: a customer, two items, shipping.";
        let text = tok.apply_chat_template(&[Message::new("user", ask)], true).unwrap();
        let prompt = tok.encode(&text, false).unwrap();
        let (r, cut) = replies(&m, "SmolLM2", &prompt, &schema, &[1, 2], 400);
        assert!(r.len() >= 2, "SmolLM2 {}: only {} of 3 runs complete ({cut} cut)", schema.display(), r.len());
        all.extend(r);
    }
    judge(&all);
}
