//! The HTTP routes. Handlers stay thin: they parse, check and hand work to the engine thread
//! ([`crate::worker`]) or to a blocking thread (tokenizing, compiling a schema, loading an
//! adapter); none touches model state on the async executor.

use crate::error::ApiError;
use crate::openai::{self, Kind, ReplyId};
use crate::worker::{Job, Out};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use peftrt::StopReason;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;

type Shared = Arc<AppState>;

/// Every route, behind the API key check (but `/health`) and the body size limit.
pub fn router(state: Shared) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// With `--api-key`, every route but `/health` needs `Authorization: Bearer KEY`, compared in
/// constant time.
async fn auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            let ok = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())));
            if !ok {
                let why = if given.is_some() { "the API key is wrong" } else { "no API key was given" };
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    format!("{why}: send the server's key as the header `Authorization: Bearer KEY`"),
                )
                .code("invalid_api_key")
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

/// The body as JSON: over the size limit is 413, not JSON is 400.
fn json_body(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than this server's limit of {} bytes", st.max_body_bytes),
        ),
        s => ApiError::new(s, r.body_text()),
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn stopping(st: &AppState) -> Result<(), ApiError> {
    if st.stopping.load(Relaxed) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
    }
    Ok(())
}

/// 200 while the server takes requests; 503 while it stops, or if its engine thread has died.
async fn health(State(st): State<Shared>) -> Response {
    let status = if st.stopping.load(Relaxed) {
        "stopping"
    } else if !st.worker.alive() {
        "engine stopped"
    } else {
        return Json(json!({"status": "ok"})).into_response();
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": status}))).into_response()
}

async fn metrics(State(st): State<Shared>) -> Response {
    let (n, bytes) = st.adapters.usage();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render(n, bytes)).into_response()
}

/// OpenAI's model object: the base, or an adapter whose parent is the base.
fn model_card(st: &AppState, id: &str) -> Value {
    let parent = (id != st.base_name).then_some(st.base_name.as_str());
    json!({"id": id, "object": "model", "created": st.created, "owned_by": "peftrt", "root": st.base_name, "parent": parent})
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    let mut data = vec![model_card(&st, &st.base_name)];
    data.extend(st.adapters.names().iter().map(|n| model_card(&st, n)));
    Json(json!({"object": "list", "data": data}))
}

async fn model(State(st): State<Shared>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id != st.base_name && st.adapters.get(&id).is_none() {
        return Err(openai::model_not_found(&id, "model"));
    }
    Ok(Json(model_card(&st, &id)))
}

async fn chat(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    complete(st, Kind::Chat, body).await
}

async fn completions(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    complete(st, Kind::Completion, body).await
}

/// Both generation routes: parse, prepare off the executor, queue on the engine, then reply
/// whole or as server-sent events.
async fn complete(st: Shared, kind: Kind, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    stopping(&st)?;
    let body = json_body(&st, body)?;
    let mut plan = openai::parse(kind, body, &st.base_name, &st.adapters)?;
    let model = st.model.clone();
    let (prompt, spec) =
        (std::mem::replace(&mut plan.prompt, openai::Prompt::Tokens(Vec::new())), plan.constraint.take());
    let (tokens, constraint) =
        tokio::task::spawn_blocking(move || openai::prepare(&model, kind, prompt, spec)).await.map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("preparing the request failed: {e}"))
        })??;
    if tokens.len() >= st.n_ctx {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens; this server's context holds {} (prompt and reply; --ctx-size)",
            tokens.len(),
            st.n_ctx
        ))
        .param(if kind == Kind::Chat { "messages" } else { "prompt" })
        .code("context_length_exceeded"));
    }
    let room = st.n_ctx - tokens.len();
    plan.params.max_tokens = plan.max_tokens.map_or(room, |m| m.min(room));
    if !st.reserve_slot() {
        st.metrics.rejected_queue_full.fetch_add(1, Relaxed);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the server is busy: {} requests are running or waiting, the most it queues; retry later",
                st.max_sequences + st.max_queue
            ),
        )
        .code("queue_full");
        e.retry_after = Some(1);
        return Err(e);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let request = peftrt::Request { prompt: tokens, adapters: plan.adapters, params: plan.params, constraint };
    if !st.worker.submit(Job { request, events: tx, arrived }) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped"));
    }
    let reply = ReplyId { kind, id: st.reply_id(kind), created: unix_now(), model: plan.model };
    if plan.stream {
        return Ok(stream(reply, rx, plan.include_usage));
    }
    let g = wait(rx).await?;
    Ok(Json(reply.complete(&g)).into_response())
}

/// The reply of a request that is not streamed.
async fn wait(mut rx: mpsc::UnboundedReceiver<Out>) -> Result<peftrt::Generation, ApiError> {
    loop {
        match rx.recv().await {
            Some(Out::Text(_)) => {}
            Some(Out::Done(Ok(g))) if g.stop == StopReason::Cancelled => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled: the server is shutting down"))
            }
            Some(Out::Done(r)) => return Ok(r?),
            None => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped unexpectedly")),
        }
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. When the client
/// goes away, the stream (and with it the request's receiver) is dropped, and the engine
/// thread cancels the sequence.
fn stream(reply: ReplyId, rx: mpsc::UnboundedReceiver<Out>, include_usage: bool) -> Response {
    struct S {
        reply: ReplyId,
        rx: mpsc::UnboundedReceiver<Out>,
        queue: VecDeque<String>,
        done: bool,
        include_usage: bool,
    }
    let mut queue = VecDeque::new();
    if reply.kind == Kind::Chat {
        queue.push_back(reply.chunk(Some(""), true, None, include_usage).to_string());
    }
    let s = S { reply, rx, queue, done: false, include_usage };
    let events = futures_util::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), s));
            }
            if s.done {
                return None;
            }
            let fail = |e: ApiError| e.body().to_string();
            match s.rx.recv().await {
                Some(Out::Text(t)) => {
                    s.queue.push_back(s.reply.chunk(Some(&t), false, None, s.include_usage).to_string())
                }
                Some(Out::Done(Ok(g))) if g.stop == StopReason::Cancelled => {
                    s.queue.push_back(fail(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "cancelled: the server is shutting down",
                    )));
                    s.done = true;
                }
                Some(Out::Done(Ok(g))) => {
                    s.queue.push_back(s.reply.chunk(None, false, Some(g.stop), s.include_usage).to_string());
                    if s.include_usage {
                        s.queue.push_back(s.reply.usage_chunk(&g).to_string());
                    }
                    s.done = true;
                }
                Some(Out::Done(Err(e))) => {
                    s.queue.push_back(fail(e.into()));
                    s.done = true;
                }
                None => {
                    s.queue.push_back(fail(ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the engine stopped unexpectedly",
                    )));
                    s.done = true;
                }
            }
            if s.done {
                s.queue.push_back("[DONE]".into());
            }
        }
    });
    Sse::new(events).into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A string field of a JSON object body.
fn field<'a>(v: &'a Value, key: &'static str) -> Result<&'a str, ApiError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("the body needs a string \"{key}\"")).param(key))
}

/// vLLM's `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` (and peftrt's optional
/// default `"scale"`): only from under `--adapter-dir`.
async fn load_adapter(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    stopping(&st)?;
    let v = json_body(&st, body)?;
    let name = field(&v, "lora_name")?.to_string();
    let path = field(&v, "lora_path")?.to_string();
    let scale = match v.get("scale") {
        None | Some(Value::Null) => 1.0,
        Some(s) => s
            .as_f64()
            .map(|s| s as f32)
            .ok_or_else(|| ApiError::bad_request("\"scale\" must be a number").param("scale"))?,
    };
    crate::adapters::check_name(&name, &st.base_name)?;
    let dir = st.adapters.confine(&path)?;
    let st2 = st.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || st2.adapters.load(&st2.model, &n, &dir, scale, &path))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("loading the adapter failed: {e}")))??;
    log::info!("loaded adapter {name}");
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

/// vLLM's `POST /v1/unload_lora_adapter` `{"lora_name"}`. Requests already running keep it.
async fn unload_adapter(State(st): State<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let v = json_body(&st, body)?;
    let name = field(&v, "lora_name")?;
    st.adapters.unload(name)?;
    log::info!("unloaded adapter {name}");
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}
