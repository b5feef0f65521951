//! The HTTP API in process (the router called directly, no socket) on the tiny fixture model:
//! replies equal a lone session's, streams end with `[DONE]`, and every bad request gets its
//! status and OpenAI's error JSON (issue 22). `scripts/test_serve.py` runs the real server
//! with the `openai` client.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use peftrt::{Adapter, Message, Sampler, SamplingParams, Session, SessionOptions};
use peftrt_server::{AppState, Options};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tower::ServiceExt;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(p)
}

fn start(f: impl FnOnce(&mut Options)) -> (Arc<AppState>, Router) {
    let mut o = Options {
        model: fixture("tiny-llama"),
        adapters: vec![format!("qv={}", fixture("adapters/llama-qv").display())],
        threads: 1,
        max_sequences: 4,
        ..Options::default()
    };
    f(&mut o);
    let st = AppState::start(&o).expect("the tiny fixture serves");
    let app = peftrt_server::routes::router(st.clone());
    (st, app)
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Checks OpenAI's error shape and the status; returns the error object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        let e = self.json()["error"].clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error JSON without {k}: {}", self.text);
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        e
    }
}

async fn call(app: &Router, method: &str, uri: &str, body: impl Into<Body>, key: Option<&str>) -> Reply {
    let mut req = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = app.clone().oneshot(req.body(body.into()).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    Reply { status, headers, text: String::from_utf8(bytes.to_vec()).unwrap() }
}

async fn post(app: &Router, uri: &str, v: Value) -> Reply {
    call(app, "POST", uri, v.to_string(), None).await
}

/// The reply of a lone session with `peftrt generate`'s chat prompt, greedy.
fn alone(st: &AppState, adapters: &[(Arc<Adapter>, f32)], user: &str, max_tokens: usize) -> String {
    let tok = st.model.tokenizer().unwrap();
    let text = tok.apply_chat_template(&[Message::new("user", user)], true).unwrap();
    let tokens = tok.encode(&text, false).unwrap();
    let mut s = Session::new(st.model.clone(), &SessionOptions { n_threads: 1, ..Default::default() }).unwrap();
    s.set_adapters(adapters).unwrap();
    let params = SamplingParams { max_tokens, ..Default::default() };
    let mut sampler = Sampler::new(params, st.model.config.vocab_size).unwrap();
    peftrt::generate(&mut s, &tokens, &mut sampler, |_| true).unwrap().text
}

fn chat(model: &str, user: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": user}], "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_equal_a_lone_session_streamed_or_not() {
    let (st, app) = start(|_| {});
    let models = call(&app, "GET", "/v1/models", "", None).await.json();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny-llama", "qv"]);
    let card = call(&app, "GET", "/v1/models/qv", "", None).await.json();
    assert_eq!((card["id"].as_str(), card["parent"].as_str()), (Some("qv"), Some("tiny-llama")));
    call(&app, "GET", "/v1/models/nope", "", None).await.error(StatusCode::NOT_FOUND);
    let qv = st.adapters.get("qv").unwrap().adapter.clone();
    for (model, adapters) in [("tiny-llama", vec![]), ("qv", vec![(qv.clone(), 1.0)])] {
        let r = post(&app, "/v1/chat/completions", chat(model, "hello there", 12)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
        assert_eq!(text, alone(&st, &adapters, "hello there", 12), "model {model}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model);
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64().unwrap() + v["usage"]["prompt_tokens"].as_u64().unwrap(),
            v["usage"]["total_tokens"].as_u64().unwrap()
        );

        // The same request streamed: the deltas add up to the same text, then [DONE].
        let mut req = chat(model, "hello there", 12);
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let r = post(&app, "/v1/chat/completions", req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let data: Vec<&str> = r.text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
        let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(streamed, text);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage, &v["usage"]);
        assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()));
    }
    // A mix through the `adapters` field: the base plus qv at 0.5.
    let mut req = chat("tiny-llama", "hello there", 8);
    req["adapters"] = json!([{"name": "qv", "scale": 0.5}]);
    let r = post(&app, "/v1/chat/completions", req).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["choices"][0]["message"]["content"], alone(&st, &[(qv, 0.5)], "hello there", 8).as_str());

    // A plain completion.
    let r =
        post(&app, "/v1/completions", json!({"model": "qv", "prompt": "one two", "max_tokens": 5, "temperature": 0}))
            .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    st.worker.stop();
    // Without its engine thread the server says so, and refuses work with 503.
    assert_eq!(call(&app, "GET", "/health", "", None).await.status, StatusCode::SERVICE_UNAVAILABLE);
    post(&app, "/v1/chat/completions", chat("qv", "hi", 2)).await.error(StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_openai_errors() {
    let (st, app) = start(|o| {
        o.ctx_size = 32;
        o.max_body_bytes = 2048;
    });
    let e = call(&app, "POST", "/v1/chat/completions", "{\"model\": ", None).await.error(StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("not valid JSON"));
    post(&app, "/v1/chat/completions", json!({"messages": []})).await.error(StatusCode::BAD_REQUEST);
    let e = post(&app, "/v1/chat/completions", chat("no-such-model", "hi", 4)).await.error(StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "model_not_found");
    let mut req = chat("tiny-llama", "hi", 4);
    req["adapters"] = json!([{"name": "nope"}]);
    assert_eq!(post(&app, "/v1/chat/completions", req).await.error(StatusCode::NOT_FOUND)["param"], "adapters");
    let mut req = chat("qv", "hi", 4);
    req["adapters"] = json!([{"name": "qv"}]);
    post(&app, "/v1/chat/completions", req).await.error(StatusCode::BAD_REQUEST);
    let long = "word ".repeat(200);
    let e = post(&app, "/v1/chat/completions", chat("tiny-llama", &long, 4)).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "context_length_exceeded");
    let mut req = chat("tiny-llama", "hi", 4);
    req["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}});
    let e = post(&app, "/v1/chat/completions", req).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], "response_format");
    let mut req = chat("tiny-llama", "hi", 4);
    req["response_format"] = json!({"type": "xml"});
    post(&app, "/v1/chat/completions", req).await.error(StatusCode::BAD_REQUEST);
    for (k, v) in [
        ("n", json!(2)),
        ("temperature", json!(-1)),
        ("top_p", json!(0)),
        ("max_tokens", json!(0)),
        ("stop", json!([""])),
        ("logprobs", json!(true)),
        ("presence_penalty", json!(1.0)),
        ("temperature", json!("hot")),
    ] {
        let mut req = chat("tiny-llama", "hi", 4);
        req[k] = v;
        post(&app, "/v1/chat/completions", req).await.error(StatusCode::BAD_REQUEST);
    }
    post(&app, "/v1/completions", json!({"model": "tiny-llama", "prompt": [1, 2, 99999]}))
        .await
        .error(StatusCode::BAD_REQUEST);
    post(&app, "/v1/completions", json!({"model": "tiny-llama", "prompt": ""})).await.error(StatusCode::BAD_REQUEST);
    let big = json!({"model": "tiny-llama", "prompt": "x".repeat(4096)});
    post(&app, "/v1/completions", big).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    call(&app, "GET", "/v1/nothing", "", None).await.error(StatusCode::NOT_FOUND);
    call(&app, "GET", "/v1/chat/completions", "", None).await.error(StatusCode::METHOD_NOT_ALLOWED);
    // Without --adapter-dir nothing loads over the network.
    let r = post(&app, "/v1/load_lora_adapter", json!({"lora_name": "x", "lora_path": "/"})).await;
    r.error(StatusCode::FORBIDDEN);
    post(&app, "/v1/unload_lora_adapter", json!({"lora_name": "nope"})).await.error(StatusCode::NOT_FOUND);
    // Every failure above was refused before the engine: nothing ran.
    let m = call(&app, "GET", "/metrics", "", None).await.text;
    assert!(m.contains("peftrt_active_sequences 0"), "{m}");
    assert!(m.contains("peftrt_requests_total{outcome=\"ok\"} 0"), "{m}");
    st.worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_every_route_but_health() {
    let (st, app) = start(|o| o.api_key = Some("s3cret".into()));
    assert_eq!(call(&app, "GET", "/health", "", None).await.status, StatusCode::OK);
    assert_eq!(call(&app, "GET", "/health", "", Some("wrong")).await.status, StatusCode::OK);
    let r = call(&app, "GET", "/v1/models", "", None).await;
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert_eq!(r.error(StatusCode::UNAUTHORIZED)["code"], "invalid_api_key");
    call(&app, "GET", "/v1/models", "", Some("s3cre")).await.error(StatusCode::UNAUTHORIZED);
    call(&app, "GET", "/v1/models", "", Some("s3cret!")).await.error(StatusCode::UNAUTHORIZED);
    call(&app, "GET", "/metrics", "", None).await.error(StatusCode::UNAUTHORIZED);
    call(&app, "POST", "/v1/chat/completions", chat("qv", "hi", 2).to_string(), None)
        .await
        .error(StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "GET", "/v1/models", "", Some("s3cret")).await.status, StatusCode::OK);
    let r = call(&app, "POST", "/v1/chat/completions", chat("qv", "hi", 2).to_string(), Some("s3cret")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    st.worker.stop();
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_only_from_under_adapter_dir() {
    use std::os::unix::fs::symlink;
    let outside = fixture("adapters/llama-qv");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("adapters");
    std::fs::create_dir(&root).unwrap();
    let good = root.join("good");
    std::fs::create_dir(&good).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(outside.join(f), good.join(f)).unwrap();
    }
    // A link to a directory outside, and a directory whose weights file links outside.
    symlink(&outside, root.join("link-out")).unwrap();
    let sneaky = root.join("sneaky");
    std::fs::create_dir(&sneaky).unwrap();
    std::fs::copy(outside.join("adapter_config.json"), sneaky.join("adapter_config.json")).unwrap();
    symlink(outside.join("adapter_model.safetensors"), sneaky.join("adapter_model.safetensors")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();

    let (st, app) = start(|o| {
        o.adapter_dir = Some(root.clone());
        o.adapters.clear();
        o.max_adapters = 2;
    });
    let load = |name: &str, path: &str| json!({"lora_name": name, "lora_path": path});
    for path in [
        "link-out".to_string(),
        "sneaky".to_string(),
        "../adapters/../../".to_string(),
        "good/../..".to_string(),
        outside.display().to_string(),
        "/".to_string(),
        ".".to_string(),
    ] {
        let r = post(&app, "/v1/load_lora_adapter", load("x", &path)).await;
        assert_eq!(r.error(StatusCode::FORBIDDEN)["param"], "lora_path", "{path}");
    }
    post(&app, "/v1/load_lora_adapter", load("x", "missing")).await.error(StatusCode::NOT_FOUND);
    let e = post(&app, "/v1/load_lora_adapter", load("x", "empty")).await.error(StatusCode::NOT_FOUND);
    assert!(!e["message"].as_str().unwrap().contains(tmp.path().to_str().unwrap()), "{e}");
    post(&app, "/v1/load_lora_adapter", load("has space", "good")).await.error(StatusCode::BAD_REQUEST);
    post(&app, "/v1/load_lora_adapter", load("tiny-llama", "good")).await.error(StatusCode::CONFLICT);
    post(&app, "/v1/load_lora_adapter", json!({"lora_name": "x"})).await.error(StatusCode::BAD_REQUEST);

    // Load (by a relative path and by an absolute one under the root), use, unload.
    let r = post(&app, "/v1/load_lora_adapter", load("g", "good")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    post(&app, "/v1/load_lora_adapter", load("g", "good")).await.error(StatusCode::CONFLICT);
    let r = post(&app, "/v1/load_lora_adapter", load("g2", &good.display().to_string())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let e = post(&app, "/v1/load_lora_adapter", load("g3", "good")).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "adapter_limit");
    let models = call(&app, "GET", "/v1/models", "", None).await.json();
    assert_eq!(models["data"].as_array().unwrap().len(), 3);
    let r = post(&app, "/v1/chat/completions", chat("g", "hello there", 6)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let g = st.adapters.get("g").unwrap().adapter.clone();
    assert_eq!(r.json()["choices"][0]["message"]["content"], alone(&st, &[(g, 1.0)], "hello there", 6).as_str());
    let r = post(&app, "/v1/unload_lora_adapter", json!({"lora_name": "g"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    post(&app, "/v1/chat/completions", chat("g", "hello there", 6)).await.error(StatusCode::NOT_FOUND);
    post(&app, "/v1/unload_lora_adapter", json!({"lora_name": "g"})).await.error(StatusCode::NOT_FOUND);
    let m = call(&app, "GET", "/metrics", "", None).await.text;
    assert!(m.contains("peftrt_loaded_adapters 1"), "{m}");
    st.worker.stop();
}

/// Hostile bodies: every field with a wrong type, null, out-of-range or odd value. Each gets a
/// 4xx with OpenAI's error JSON or a reply; none a 5xx or a panic (the server keeps answering).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_never_get_a_5xx() {
    let (st, app) = start(|o| o.ctx_size = 64);
    let odd = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1e308),
        json!(18446744073709551616u128 as f64),
        json!("x"),
        json!(""),
        json!([]),
        json!([null]),
        json!({}),
        json!({"type": null}),
        json!("\u{0}\u{ffff}"),
        json!([[1, 2], [3]]),
        json!([{"name": "qv", "scale": 1e30}]),
        json!([{"name": "qv", "scale": "big"}]),
        json!({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "("}}}),
    ];
    let fields = [
        "model",
        "messages",
        "prompt",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "ignore_eos",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "n",
        "response_format",
        "adapters",
        "logprobs",
        "tools",
        "suffix",
        "echo",
        "best_of",
    ];
    let mut statuses = std::collections::BTreeMap::new();
    for (uri, base) in [
        ("/v1/chat/completions", chat("qv", "hi", 3)),
        ("/v1/completions", json!({"model": "qv", "prompt": "hi", "max_tokens": 3, "temperature": 0})),
    ] {
        for f in fields {
            for v in &odd {
                let mut req = base.clone();
                req[f] = v.clone();
                let r = post(&app, uri, req.clone()).await;
                assert!(!r.status.is_server_error(), "{uri} {req}: {} {}", r.status, r.text);
                if !r.status.is_success() {
                    r.error(r.status);
                }
                *statuses.entry(r.status.as_u16()).or_insert(0) += 1;
            }
        }
        for raw in ["", "[]", "null", "{\"model\": \"qv\", \"messages\": [", "\u{feff}{}", "{\"a\":1}{\"b\":2}"] {
            let r = call(&app, "POST", uri, raw, None).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{raw:?}: {}", r.text);
        }
    }
    for body in [json!(null), json!({"lora_name": 1, "lora_path": []}), json!({"lora_name": "", "lora_path": ""})] {
        let r = post(&app, "/v1/load_lora_adapter", body.clone()).await;
        assert!(r.status.is_client_error(), "{body}: {}", r.text);
        let r = post(&app, "/v1/unload_lora_adapter", body.clone()).await;
        assert!(r.status.is_client_error(), "{body}: {}", r.text);
    }
    // Still serving, and nothing left running.
    let r = post(&app, "/v1/chat/completions", chat("qv", "hi", 3)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    eprintln!("statuses: {statuses:?}");
    assert!(statuses.contains_key(&200) && statuses.contains_key(&400) && statuses.contains_key(&404));
    st.worker.stop();
}
