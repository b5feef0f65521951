//! # peftrt-server — the OpenAI HTTP API on peftrt's batching engine
//!
//! `peftrt serve` (this crate's `peftrt-server` binary) serves one base model and any number of
//! LoRA adapters, each adapter as a model id (vLLM's `--lora-modules` convention), over
//! `/v1/chat/completions`, `/v1/completions`, `/v1/models`, vLLM's `/v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter`, `/health` and `/metrics`.
//!
//! The parts, as vLLM and llama.cpp's server split them (HTTP apart from the batch loop):
//! - [`routes`]: the axum handlers. Thin: they parse a request ([`openai`]), tokenize it and
//!   compile its constraint on a blocking thread, and hand it to the engine thread.
//! - [`worker`]: the engine's own thread, which owns the [`peftrt::Engine`] (continuous
//!   batching, each sequence with its own adapters) and streams each request's text back over
//!   a channel; a request whose client left is cancelled.
//! - [`adapters`]: the served adapters, their limits, and `--adapter-dir` confinement.
//! - [`error`]: OpenAI's error JSON. [`metrics`]: the Prometheus text.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use peftrt_server::{AppState, Options};
//! let opts = Options { model: "models/smollm2-135m-instruct".into(), ..Options::default() };
//! let state = AppState::start(&opts)?;
//! let app = peftrt_server::routes::router(state.clone());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! This crate alone links tokio and axum: the runtime crate and libpeftrt (the C ABI) do not.

pub mod adapters;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod worker;

use adapters::{AdapterLimits, Adapters};
use anyhow::{bail, Context};
use metrics::Metrics;
use openai::Kind;
use peftrt::adapter::AdapterOptions;
use peftrt::{Engine, EngineOptions, LoadOptions, Model};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use worker::Worker;

/// What the server serves and its limits (the command-line flags).
#[derive(Clone, Debug)]
pub struct Options {
    pub model: PathBuf,
    /// The base model's id; `None`: the model directory's name.
    pub served_model_name: Option<String>,
    /// `NAME=DIR[:SCALE]` each.
    pub adapters: Vec<String>,
    pub adapter_dir: Option<PathBuf>,
    pub max_adapters: usize,
    pub max_adapter_bytes: u64,
    pub api_key: Option<String>,
    pub max_sequences: usize,
    /// Requests waiting for a slot beyond `max_sequences`, before 429.
    pub max_queue: usize,
    pub ctx_size: usize,
    pub threads: usize,
    pub max_body_bytes: usize,
    pub adapter_options: AdapterOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            model: PathBuf::new(),
            served_model_name: None,
            adapters: Vec::new(),
            adapter_dir: None,
            max_adapters: 64,
            max_adapter_bytes: 4 << 30,
            api_key: None,
            max_sequences: 8,
            max_queue: 64,
            ctx_size: 0,
            threads: 0,
            max_body_bytes: 4 << 20,
            adapter_options: AdapterOptions::default(),
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    pub model: Arc<Model>,
    pub base_name: String,
    pub adapters: Adapters,
    pub worker: Worker,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// Each sequence's context (prompt and reply), in tokens.
    pub n_ctx: usize,
    pub max_sequences: usize,
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// When the server started (Unix seconds), the `created` of its models.
    pub created: u64,
    /// Set when a shutdown began: new requests get 503.
    pub stopping: AtomicBool,
    next_id: AtomicU64,
}

impl AppState {
    /// Loads the model and the start-up adapters, makes the engine and starts its thread.
    pub fn start(opts: &Options) -> anyhow::Result<Arc<AppState>> {
        let model = Model::load(&opts.model, &LoadOptions::default())
            .with_context(|| format!("cannot load the model in {}", opts.model.display()))?;
        model.tokenizer().with_context(|| format!("{} has no usable tokenizer", opts.model.display()))?;
        let model = Arc::new(model);
        let base_name = match &opts.served_model_name {
            Some(n) => n.clone(),
            None => opts
                .model
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "base".into()),
        };
        if base_name.is_empty() {
            bail!("--served-model-name is empty; give the base model an id");
        }
        let root = match &opts.adapter_dir {
            None => None,
            Some(d) => Some(d.canonicalize().with_context(|| format!("--adapter-dir {}", d.display()))?),
        };
        if let Some(r) = &root {
            if !r.is_dir() {
                bail!("--adapter-dir {} is not a directory", r.display());
            }
        }
        let limits = AdapterLimits { max_count: opts.max_adapters, max_bytes: opts.max_adapter_bytes, root };
        let adapters = Adapters::new(limits, opts.adapter_options.clone());
        for spec in &opts.adapters {
            let Some((name, rest)) = spec.split_once('=') else {
                bail!("--adapter {spec}: expected NAME=DIR or NAME=DIR:SCALE (the name is the adapter's model id)");
            };
            adapters::check_name(name, &base_name).map_err(|e| anyhow::anyhow!("--adapter {spec}: {}", e.message))?;
            let (dir, scale) = peftrt::adapter::parse_spec(rest).map_err(|e| anyhow::anyhow!("--adapter {e}"))?;
            adapters
                .load(&model, name, &dir, scale, &dir.display().to_string())
                .map_err(|e| anyhow::anyhow!("--adapter {spec}: {}", e.message))?;
        }
        let engine_opts = EngineOptions {
            max_sequences: opts.max_sequences,
            n_ctx: opts.ctx_size,
            n_batch: 0,
            step_tokens: 0,
            n_threads: opts.threads,
        };
        let engine = Engine::new(model.clone(), &engine_opts)?;
        let (n_ctx, max_sequences) = (engine.n_ctx(), engine.max_sequences());
        let metrics = Arc::new(Metrics::default());
        let worker = Worker::start(engine, metrics.clone()).context("cannot start the engine thread")?;
        Ok(Arc::new(AppState {
            model,
            base_name,
            adapters,
            worker,
            metrics,
            api_key: opts.api_key.clone(),
            n_ctx,
            max_sequences,
            max_queue: opts.max_queue,
            max_body_bytes: opts.max_body_bytes,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        }))
    }

    /// Takes a place among the requests running or waiting; `false` when they are
    /// `max_sequences + max_queue` already (the caller answers 429).
    pub fn reserve_slot(&self) -> bool {
        let limit = self.max_sequences + self.max_queue;
        self.worker.in_flight.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1)).is_ok()
    }

    /// A reply's id, unique within this server's run.
    pub fn reply_id(&self, kind: Kind) -> String {
        let n = self.next_id.fetch_add(1, Relaxed);
        match kind {
            Kind::Chat => format!("chatcmpl-{:x}-{n}", self.created),
            Kind::Completion => format!("cmpl-{:x}-{n}", self.created),
        }
    }
}
