//! `peftrt-server` (also `peftrt serve`): the OpenAI-compatible HTTP server. See the library's
//! documentation for the parts; this file is the command line, the listener and the signals.

use anyhow::{Context, Result};
use clap::Parser;
use peftrt::adapter::AdapterOptions;
use peftrt_server::{AppState, Options};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// Serve a model over the OpenAI HTTP API, each LoRA adapter as a model id.
#[derive(Parser)]
#[command(name = "peftrt serve", version)]
struct Args {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// The base model's id in the API (default: the model directory's name).
    #[arg(long = "served-model-name")]
    served_model_name: Option<String>,
    /// A PEFT LoRA adapter served as model id NAME, with a default scale (1 without one).
    /// Repeatable.
    #[arg(long = "adapter", value_name = "NAME=DIR[:SCALE]")]
    adapters: Vec<String>,
    /// Address to listen on. The default is reachable from this machine only; give 0.0.0.0
    /// to accept other machines (then also give --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 = any free port (the one taken is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health (also from the
    /// environment variable PEFTRT_API_KEY, which other users cannot read in `ps`).
    #[arg(long = "api-key", env = "PEFTRT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Most sequences generated at once (each in its own slot of --ctx-size tokens).
    #[arg(long = "max-sequences", default_value_t = 8)]
    max_sequences: usize,
    /// Requests that may wait for a slot; beyond them a request gets 429 with Retry-After.
    #[arg(long = "max-queue", default_value_t = 64)]
    max_queue: usize,
    /// Context of each sequence in tokens, prompt and reply (default: the model's, at most 2048).
    #[arg(long = "ctx-size", default_value_t = 0)]
    ctx_size: usize,
    /// Threads of the engine (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The only directory POST /v1/load_lora_adapter may load adapters from (paths in requests
    /// are taken under it; links out of it are refused). Without it, loading over the network
    /// is off.
    #[arg(long = "adapter-dir")]
    adapter_dir: Option<PathBuf>,
    /// Most adapters loaded at once.
    #[arg(long = "max-adapters", default_value_t = 64)]
    max_adapters: usize,
    /// Most bytes of adapter weights loaded at once.
    #[arg(long = "max-adapter-bytes", default_value_t = 4 << 30)]
    max_adapter_bytes: u64,
    /// Largest request body in bytes; a larger one gets 413.
    #[arg(long = "max-body-bytes", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Seconds that running requests may take to finish after SIGINT/SIGTERM; then they are
    /// cancelled and the server exits.
    #[arg(long = "shutdown-timeout", default_value_t = 10)]
    shutdown_timeout: u64,
    /// Load adapters even if they record a different base model than --model.
    #[arg(long)]
    allow_base_mismatch: bool,
    /// Refuse adapters without a base-model fingerprint whose base_model_name_or_path names
    /// another model than --model.
    #[arg(long)]
    strict_base: bool,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // Loading cannot be interrupted half-way: on a signal during it, do not wait for it.
    rt.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}

/// SIGINT and SIGTERM, watched from the moment this is made (the handlers are installed here,
/// not when first awaited, so that a Ctrl-C during loading is caught).
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
                term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Resolves when SIGINT or SIGTERM arrives.
    async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    }
}

async fn run(a: Args) -> Result<()> {
    let opts = Options {
        model: a.model.clone(),
        served_model_name: a.served_model_name,
        adapters: a.adapters,
        adapter_dir: a.adapter_dir,
        max_adapters: a.max_adapters,
        max_adapter_bytes: a.max_adapter_bytes,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        max_sequences: a.max_sequences,
        max_queue: a.max_queue,
        ctx_size: a.ctx_size,
        threads: a.threads,
        max_body_bytes: a.max_body_bytes,
        adapter_options: AdapterOptions { allow_base_mismatch: a.allow_base_mismatch, strict_base: a.strict_base },
    };
    // Signals are watched from the start: Ctrl-C while the model loads ends the process at once.
    let mut stop = Box::pin(Signals::new()?.recv());
    eprintln!("peftrt-server: loading {}", a.model.display());
    let load = tokio::task::spawn_blocking(move || AppState::start(&opts));
    let state = tokio::select! {
        r = load => r.context("loading stopped unexpectedly")??,
        _ = &mut stop => {
            eprintln!("peftrt-server: interrupted while loading; stopped");
            return Ok(());
        }
    };
    let addr = format!("{}:{}", a.host, a.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().context("the listener has no address")?;
    let adapters = state.adapters.names();
    eprintln!(
        "peftrt-server: serving {} (adapters: {}) with {} sequences of {} tokens",
        state.base_name,
        if adapters.is_empty() { "none".to_string() } else { adapters.join(", ") },
        state.max_sequences,
        state.n_ctx
    );
    if state.api_key.is_none() && !local.ip().is_loopback() {
        log::warn!("listening on {local} without --api-key: anyone who can reach this address can use the server");
    }
    eprintln!("peftrt-server: listening on http://{local}");
    let app = peftrt_server::routes::router(state.clone());
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let grace = Duration::from_secs(a.shutdown_timeout);
    let st = state.clone();
    let shutdown = async move {
        stop.await;
        eprintln!("peftrt-server: stopping: no new requests; running ones get {}s to finish", grace.as_secs());
        st.stopping.store(true, Relaxed);
        let _ = stopped_tx.send(());
        // Past the grace period, what still runs is cancelled; its streams end with an error.
        let st = st.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            st.worker.cancel_all();
        });
    };
    let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let bounded = async {
        // Connections that stay open after every request was cancelled (a client that reads
        // nothing) cannot hold the process: it exits a few seconds past the grace period.
        let _ = stopped_rx.await;
        tokio::time::sleep(grace + Duration::from_secs(5)).await;
    };
    tokio::select! {
        r = serve => r.context("the server failed")?,
        _ = bounded => log::warn!("connections still open past the shutdown timeout; closing them"),
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || st.worker.stop()).await.ok();
    eprintln!("peftrt-server: stopped");
    Ok(())
}
