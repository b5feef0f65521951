//! The `peftrt` command line on a tiny fixture model: every subcommand runs, output formats
//! are what they say, and bad input exits with a clear message instead of a panic.

use serde_json::json;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn peftrt(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peftrt")).args(args).output().expect("run peftrt")
}

fn run(args: &[&str]) -> Output {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    peftrt(&args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn model() -> String {
    fixture("tiny-llama").display().to_string()
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let out =
        run(&["generate", "--model", &model(), "--chat", "--prompt", "Hello", "--max-tokens", "8", "--ignore-eos"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).trim().is_empty());
    let err = text(&out.stderr);
    assert!(err.contains("tok/s") && err.contains("load"), "{err}");
}

#[test]
fn stop_string_ends_the_output_before_it() {
    let greedy = |extra: &[&str]| {
        let mut args =
            vec!["generate", "--model", "", "--prompt", "The quick brown", "--max-tokens", "16", "--ignore-eos"];
        let m = model();
        args[2] = &m;
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim_end_matches('\n').to_string()
    };
    let full = greedy(&[]);
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "too little output to test: {full:?}");
    // A stop string from the middle of the greedy output.
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = greedy(&["--stop", &stop]);
    let at = full.find(&stop).unwrap();
    assert_eq!(cut, full[..at], "stop string {stop:?}");
}

#[test]
fn score_writes_logits_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("s.safetensors");
    let out = run(&["score", "--model", &model(), "--tokens", "3,4,5", "--out", out_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bytes = std::fs::read(&out_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), &[3, 400]);
    assert_eq!(st.tensor("tokens").unwrap().data(), &[3, 0, 0, 0, 4, 0, 0, 0, 5, 0, 0, 0]);
}

#[test]
fn bench_json_has_the_documented_fields() {
    let out =
        run(&["bench", "--model", &model(), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["prefill_tok_s", "decode_tok_s", "load_ms", "peak_rss_bytes"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
}

/// With an adapter, each round also runs without it: the overhead measured in one process.
#[test]
fn bench_with_an_adapter_reports_its_overhead() {
    let adapter = fixture("adapters/llama-qv");
    let args = ["bench", "--model", &model(), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "3"];
    let out = run(&[&args[..], &["--json", "--adapter", adapter.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &v["adapter_overhead"];
    for key in ["prefill", "decode"] {
        assert!(o[key].as_f64().is_some_and(f64::is_finite), "{key} in {v}");
    }
    for key in ["no_adapter_prefill_tok_s", "no_adapter_decode_tok_s"] {
        assert!(o[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v}");
    }
    // Without an adapter there is nothing to compare.
    let out = run(&args);
    assert!(out.status.success() && !text(&out.stdout).contains("overhead"), "{}", text(&out.stdout));
}

#[test]
fn inspect_lists_tensors() {
    let out = run(&["inspect", &model()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("llama") && s.contains("model.layers.1.mlp.down_proj.weight"), "{s}");
}

#[test]
fn inspect_shows_an_adapter() {
    let out = run(&["inspect", fixture("adapters/llama-patterns").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for want in [
        "type               LoRA",
        "r / alpha          8 / 16",
        "rank_pattern     k_proj = 2",
        "target_modules     down_proj,gate_proj,k_proj",
        "adapted modules    14",
        "model.layers.0.self_attn.k_proj          r 2   scale 8.0000",
    ] {
        assert!(s.contains(want), "`{want}` missing from:\n{s}");
    }
    let out = run(&["inspect", fixture("adapters/llama-dora").to_str().unwrap()]);
    assert!(text(&out.stdout).contains("DoRA") && text(&out.stdout).contains("+magnitude"));
}

#[test]
fn bad_prompts_are_refused_clearly() {
    let m = model();
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let out = peftrt(&["generate".as_ref(), "--model".as_ref(), m.as_ref(), "--prompt".as_ref(), bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("UTF-8"), "{}", text(&out.stderr));

    let out = run(&["generate", "--model", &m, "--prompt", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("empty"), "{}", text(&out.stderr));

    let long = "word ".repeat(400);
    let out = run(&["generate", "--model", &m, "--prompt", &long, "--ctx-size", "64"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("context") && !err.contains("panicked"), "{err}");

    let out = run(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/model"), "{}", text(&out.stderr));
}

#[test]
fn import_of_a_broken_gguf_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("broken.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let out_dir = dir.path().join("out");
    let out = run(&["import", gguf.to_str().unwrap(), out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("broken.gguf"), "{}", text(&out.stderr));
    assert!(!out_dir.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary directory was left behind");
}

#[test]
fn adapters_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixture("adapters/llama-qv").display().to_string();
    let score = |extra: &[&str], name: &str| -> Vec<u8> {
        let path = dir.path().join(name);
        let mut args = vec!["score", "--model", "", "--tokens", "3,4,5", "--out", path.to_str().unwrap()];
        let m = model();
        args[2] = &m;
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        std::fs::read(path).unwrap()
    };
    let base = score(&[], "base.safetensors");
    let off = score(&["--adapter", &format!("{adapter}:0")], "off.safetensors");
    let on = score(&["--adapter", &adapter], "on.safetensors");
    assert_eq!(base, off, "scale 0 is exactly off");
    assert_ne!(base, on, "the adapter changes the logits");

    let out = run(&[
        "bench",
        "--model",
        &model(),
        "--adapter",
        &adapter,
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "2",
        "--repeat",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["adapter_load_ms"].as_f64().unwrap() > 0.0 && v["adapter_switch_us"].as_f64().unwrap() > 0.0, "{v}");

    let out = run(&["generate", "--model", &model(), "--prompt", "hi", "--adapter", "/nonexistent/adapter:0.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/adapter"), "{}", text(&out.stderr));
}

/// `batch` on a temporary JSONL file; returns the process output and the result lines.
fn batch(lines: &str, extra: &[&str]) -> (Output, Option<Vec<serde_json::Value>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("requests.jsonl");
    let out_path = dir.path().join("replies.jsonl");
    std::fs::write(&input, lines).unwrap();
    let (i, o, m) = (input.display().to_string(), out_path.display().to_string(), model());
    let mut args = vec!["batch", "--model", &m, "--input", &i, "--out", &o];
    args.extend_from_slice(extra);
    let out = run(&args);
    let results =
        std::fs::read_to_string(&out_path).ok().map(|s| s.lines().map(|l| serde_json::from_str(l).unwrap()).collect());
    (out, results, dir)
}

#[test]
fn batch_replies_equal_generate_per_request() {
    let requests = concat!(
        r#"{"id": "chat", "messages": [{"role": "user", "content": "Hello"}]}"#,
        "\n\n",
        r#"{"id": 7, "prompt": "The quick brown"}"#,
        "\n"
    );
    let (out, results, _dir) = batch(requests, &["--max-tokens", "8", "--ignore-eos"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results = results.expect("an output file");
    assert_eq!(results.len(), 2, "one line per request, blank lines skipped");
    assert_eq!(results[0]["id"], "chat");
    assert_eq!(results[1]["id"], 7);
    for (r, args) in results.iter().zip([&["--chat", "--prompt", "Hello"][..], &["--prompt", "The quick brown"][..]]) {
        let m = model();
        let mut a = vec!["generate", "--model", &m, "--max-tokens", "8", "--ignore-eos"];
        a.extend_from_slice(args);
        let g = run(&a);
        assert!(g.status.success(), "{}", text(&g.stderr));
        assert_eq!(r["text"].as_str().unwrap(), text(&g.stdout).strip_suffix('\n').unwrap(), "{args:?}");
        assert_eq!(r["generated_tokens"], 8);
        assert_eq!(r["stop"], "MaxTokens");
        for key in ["prompt_tokens", "latency_ms", "prefill_ms", "decode_ms", "decode_tok_s"] {
            assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key} in {r}");
        }
    }
}

/// Issue 21: a line picks its own adapters ("adapters", the --adapter syntax; [] = the base
/// alone), lines without the field take the flags', and `--parallel N` gives the same lines for
/// any N, each equal to `generate` with those adapters.
#[test]
fn batch_lines_pick_adapters_and_parallel_changes_nothing() {
    let (qv, dora, rs) = (
        fixture("adapters/llama-qv").display().to_string(),
        fixture("adapters/llama-dora").display().to_string(),
        fixture("adapters/llama-all-rslora").display().to_string(),
    );
    let sets: Vec<Vec<String>> =
        vec![vec![qv.clone()], vec![], vec![format!("{dora}:0.7")], vec![format!("{qv}:0.5"), format!("{rs}:0.5")]];
    let mut requests = String::new();
    let mut want_adapters: Vec<Vec<String>> = Vec::new();
    for i in 0..9 {
        let prompt = ["Hello", "The quick brown", "a", "Once upon a time there was", "x y z"][i % 5];
        if i % 5 == 4 {
            // No field: the flag's adapter.
            requests.push_str(&format!("{{\"id\": {i}, \"prompt\": \"{prompt}\"}}\n"));
            want_adapters.push(vec![rs.clone()]);
        } else {
            let set = &sets[i % sets.len()];
            let v = serde_json::json!({"id": i, "prompt": prompt, "adapters": set});
            requests.push_str(&format!("{v}\n"));
            want_adapters.push(set.clone());
        }
    }
    let flags = ["--max-tokens", "6", "--ignore-eos", "--adapter", rs.as_str()];
    let mut runs = Vec::new();
    for parallel in ["1", "4", "16"] {
        let mut extra = flags.to_vec();
        extra.extend_from_slice(&["--parallel", parallel]);
        let (out, results, _dir) = batch(&requests, &extra);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let results = results.unwrap();
        let strip = |r: &serde_json::Value| {
            (r["id"].clone(), r["text"].clone(), r["generated_tokens"].clone(), r["stop"].clone())
        };
        runs.push(results.iter().map(strip).collect::<Vec<_>>());
    }
    assert_eq!(runs[0], runs[1], "--parallel 4 changed the results");
    assert_eq!(runs[0], runs[2], "--parallel 16 changed the results");
    for (i, (id, reply, ..)) in runs[0].iter().enumerate() {
        assert_eq!(id, &serde_json::json!(i));
        let prompt = ["Hello", "The quick brown", "a", "Once upon a time there was", "x y z"][i % 5];
        let m = model();
        let mut a = vec!["generate", "--model", &m, "--max-tokens", "6", "--ignore-eos", "--prompt", prompt];
        for spec in &want_adapters[i] {
            a.extend_from_slice(&["--adapter", spec]);
        }
        let g = run(&a);
        assert!(g.status.success(), "{}", text(&g.stderr));
        assert_eq!(
            reply.as_str().unwrap(),
            text(&g.stdout).strip_suffix('\n').unwrap(),
            "request {i}: {:?}",
            want_adapters[i]
        );
    }
    // A bad "adapters" field or directory fails the run before any generation, naming the line.
    for (field, what) in [
        (r#""adapters": "x""#.to_string(), "array of strings"),
        (r#""adapters": [3]"#.to_string(), "non-empty strings"),
        (r#""adapters": ["/nonexistent/adapter"]"#.to_string(), "/nonexistent/adapter"),
    ] {
        let requests = format!("{{\"prompt\": \"fine\"}}\n{{\"prompt\": \"hi\", {field}}}\n");
        let (out, results, _dir) = batch(&requests, &["--parallel", "2"]);
        assert!(!out.status.success(), "{field}");
        let err = text(&out.stderr);
        assert!(err.contains("requests.jsonl line 2") && err.contains(what), "{field}: {err}");
        assert!(results.is_none(), "{field}: an output file was left");
    }
}

#[test]
fn batch_refuses_a_bad_line_by_number_and_writes_nothing() {
    for (line, what) in [
        ("not json", "not JSON"),
        (r#"{"id": 1}"#, "no \"messages\" or \"prompt\""),
        (r#"{"messages": [{"role": "user"}]}"#, "no string \"content\""),
        (r#"{"prompt": 5}"#, "\"prompt\" is not a string"),
    ] {
        let requests = format!("{}\n{line}\n", r#"{"prompt": "fine"}"#);
        let (out, results, _dir) = batch(&requests, &[]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("requests.jsonl line 2") && err.contains(what), "{line}: {err}");
        assert!(results.is_none(), "{line}: an output file was left");
    }
}

#[test]
fn batch_records_a_prompt_too_long_for_the_context_and_goes_on() {
    let long = "word ".repeat(400);
    let requests = format!("{{\"id\": 1, \"prompt\": \"{long}\"}}\n{{\"id\": 2, \"prompt\": \"Hello\"}}\n");
    let (out, results, _dir) = batch(&requests, &["--ctx-size", "64", "--max-tokens", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("1 of 2 requests did not fit"), "{}", text(&out.stderr));
    let results = results.unwrap();
    assert!(results[0]["error"].as_str().unwrap().contains("context holds 64"), "{}", results[0]);
    assert!(results[1]["text"].is_string() && results[1].get("error").is_none());
}

#[test]
fn eval_json_judges_batch_results_by_the_one_rule() {
    let dir = tempfile::tempdir().unwrap();
    let replies = dir.path().join("results.jsonl");
    let lines = [
        json!({"id": 1, "text": " {\"n\": 2, \"tags\": [\"a\"]}\n"}),
        json!({"id": 2, "text": "```json\n{\"n\": \"two\"}\n```"}),
        json!({"id": 3, "text": "Sure! {\"n\": 2}"}),
        json!({"id": 4, "error": "the prompt does not fit the context"}),
    ];
    std::fs::write(&replies, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, r#"{"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}"#)
        .unwrap();
    let out = run(&["eval-json", replies.to_str().unwrap(), "--schema", schema.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: Vec<serde_json::Value> = text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        got,
        [
            json!({"json": true, "value": {"n": 2, "tags": ["a"]}, "schema_valid": true, "schema_error": null}),
            json!({"json": true, "value": {"n": "two"}, "schema_valid": false, "schema_error": "n: type"}),
            json!({"json": false, "value": null, "schema_valid": false, "schema_error": null}),
            json!({"json": false, "value": null, "schema_valid": false, "schema_error": null}),
        ]
    );
    assert!(text(&out.stderr).contains("4 replies: 2 JSON (50.0%), 1 schema-valid (25.0%)"), "{}", text(&out.stderr));
    // Without a schema: only `json` and `value`.
    let out = run(&["eval-json", replies.to_str().unwrap()]);
    assert_eq!(text(&out.stdout).lines().next().unwrap(), r#"{"json":true,"value":{"n":2,"tags":["a"]}}"#);
    // A schema keyword the validator does not implement is refused, naming the file and keyword.
    std::fs::write(&schema, r#"{"type": "string", "pattern": "^a"}"#).unwrap();
    let out = run(&["eval-json", replies.to_str().unwrap(), "--schema", schema.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("schema.json") && text(&out.stderr).contains("pattern"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn generate_and_batch_follow_a_constraint() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, r#"{"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}, "additionalProperties": false}"#).unwrap();
    let s = schema.display().to_string();
    let m = model();
    // generate: the reply is the schema's JSON (the tiny model finishes it within 200 tokens).
    let out = run(&["generate", "--model", &m, "--prompt", "n is", "--max-tokens", "200", "--json-schema", &s]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).expect("JSON");
    assert!(v["n"].is_i64() && v.as_object().unwrap().len() == 1, "{v}");
    let out = run(&["generate", "--model", &m, "--prompt", "code", "--max-tokens", "20", "--regex", "[0-9]{3}"]);
    assert!(out.status.success());
    assert!(regex::Regex::new("^[0-9]{3}\n$").unwrap().is_match(&text(&out.stdout)), "{:?}", text(&out.stdout));
    // Bad constraints: named before anything is generated; two at once is a usage error.
    let out = run(&["generate", "--model", &m, "--prompt", "x", "--regex", "("]);
    assert!(!out.status.success() && text(&out.stderr).contains("--regex") && text(&out.stderr).contains("unclosed"));
    let out = run(&["generate", "--model", &m, "--prompt", "x", "--regex", "a", "--json"]);
    assert!(!out.status.success() && text(&out.stderr).contains("cannot be used with"), "{}", text(&out.stderr));
    // batch: a request's own constraint wins over the flag's; the others follow the flag.
    let lines = [
        json!({"id": 1, "prompt": "n is", "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}, "additionalProperties": false}}}}),
        json!({"id": 2, "prompt": "code", "regex": "[a-c]{4}"}),
        json!({"id": 3, "prompt": "code"}),
    ]
    .iter()
    .map(|l| format!("{l}\n"))
    .collect::<String>();
    let (out, results, _d) = batch(&lines, &["--max-tokens", "200", "--regex", "[0-9]{2}"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = results.unwrap();
    let v: serde_json::Value = serde_json::from_str(r[0]["text"].as_str().unwrap()).unwrap();
    assert!(v["n"].is_i64(), "{}", r[0]);
    assert!(regex::Regex::new("^[a-c]{4}$").unwrap().is_match(r[1]["text"].as_str().unwrap()), "{}", r[1]);
    assert!(regex::Regex::new("^[0-9]{2}$").unwrap().is_match(r[2]["text"].as_str().unwrap()), "{}", r[2]);
    assert!(r.iter().all(|x| x["stop"] == "Eos"), "{r:?}");
    // A request with a bad constraint fails the run before any generation, naming its line.
    let (out, results, _d) = batch("{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"regex\": \"(\"}\n", &[]);
    assert!(!out.status.success() && results.is_none());
    assert!(text(&out.stderr).contains("line 2") && text(&out.stderr).contains("regex"), "{}", text(&out.stderr));
    let (out, _, _d) = batch("{\"prompt\": \"b\", \"regex\": \"a\", \"grammar\": \"start: \\\"a\\\"\"}\n", &[]);
    assert!(!out.status.success() && text(&out.stderr).contains("at most one"), "{}", text(&out.stderr));
}
