//! `peftrt`: generate, score, benchmark, inspect and import models from the command line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use peftrt::adapter::{AdapterFile, AdapterOptions};
use peftrt::gguf::{import, DType, GgufFile, ImportOptions};
use peftrt::merge::MergeOptions;
use peftrt::{generate, Adapter, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "peftrt", version, about = "Fast CPU inference for Llama-family models with LoRA adapters")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streaming it to stdout (timings go to stderr).
    Generate(GenerateArgs),
    /// Write the logits of every position of a prompt to a safetensors file.
    Score(ScoreArgs),
    /// Measure prefill and decode speed and peak memory.
    Bench(BenchArgs),
    /// Show a model directory's or GGUF file's architecture, tensors, dtypes and sizes, or a
    /// PEFT adapter directory's targets, ranks, scales and size.
    Inspect { path: PathBuf },
    /// Convert a GGUF file into a Hugging Face model directory (tensors dequantised).
    Import(ImportArgs),
    /// Merge LoRA adapters into a model: W + Σ scale·ΔW, written as a new model directory.
    Merge(MergeArgs),
    /// Quantise a model's decoder linear layers to NF4 (bitsandbytes' exact layout and bytes).
    Quantize(QuantizeArgs),
    /// Perplexity of a model (with adapters) over a text file, in sliding windows.
    Perplexity(PerplexityArgs),
    /// Generate a reply to every request of a JSON Lines file, one after another in one session,
    /// recording tokens, latency and speed per request.
    Batch(BatchArgs),
}

#[derive(Args)]
struct QuantizeArgs {
    /// The float model directory.
    #[arg(long)]
    model: PathBuf,
    /// The model directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Elements per scale (bitsandbytes: 32, 64, ..., 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Keep the per-block scales in f32 instead of quantising them to 8 bits.
    #[arg(long)]
    no_double_quant: bool,
    /// Decoder linear layers to keep in float, by name or suffix (e.g. down_proj,layers.0.mlp.up_proj).
    #[arg(long, value_delimiter = ',')]
    keep: Vec<String>,
    /// Quantise a model that `peftrt merge` made from an NF4 base (rounds its weights again).
    #[arg(long)]
    requantize_merged: bool,
    /// Quantise the output head too (a tied head gets its own NF4 copy): fewer bytes per
    /// decoded token, some accuracy lost.
    #[arg(long)]
    quantize_head: bool,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The UTF-8 text file to score.
    #[arg(long)]
    text: PathBuf,
    /// Tokens per window (default: the context size).
    #[arg(long, default_value_t = 0)]
    window: usize,
    /// Tokens between window starts (default: half a window).
    #[arg(long, default_value_t = 0)]
    stride: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// The base model directory.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory, optionally with a scale: DIR or DIR:0.5 (repeatable).
    #[arg(long = "adapter", value_name = "DIR[:SCALE]", required = true)]
    adapters: Vec<String>,
    /// The model directory to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Merge adapters even if they record a different base model.
    #[arg(long)]
    allow_base_mismatch: bool,
    /// Weight dtype of the output (default: the base's).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
}

#[derive(Args)]
struct ImportArgs {
    /// The GGUF file (v2 or v3).
    gguf: PathBuf,
    /// The model directory to write (must not exist or be empty, unless --force).
    out_dir: PathBuf,
    /// Weight dtype of the output.
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DTypeArg,
    /// Replace a non-empty output directory (never one that holds the GGUF).
    #[arg(long)]
    force: bool,
    /// With --dtype f16/bf16: clamp weights beyond that dtype's range to its largest finite
    /// value, instead of refusing the import (f16 holds at most ±65504).
    #[arg(long)]
    saturate: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Args)]
struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long = "ctx-size", default_value_t = 0)]
    ctx_size: usize,
    /// A PEFT LoRA adapter directory, optionally with a scale (default 1): DIR or DIR:0.5.
    /// Repeatable: the adapters' effects add up.
    #[arg(long = "adapter", value_name = "DIR[:SCALE]")]
    adapters: Vec<String>,
    /// Load adapters even if they record a different base model than --model.
    #[arg(long)]
    allow_base_mismatch: bool,
    /// Refuse adapters without a base-model fingerprint whose base_model_name_or_path names
    /// another model than --model (by default they load with a warning).
    #[arg(long)]
    strict_base: bool,
}

/// A loaded model and a session with the requested adapters active.
struct Loaded {
    model: Arc<Model>,
    session: Session,
    load_ms: f64,
    adapter_load_ms: f64,
}

impl ModelArgs {
    fn load(&self, tokenizer: bool) -> Result<Loaded> {
        let t = Instant::now();
        let model = Model::load(&self.model, &LoadOptions { no_tokenizer: !tokenizer })
            .with_context(|| format!("cannot load the model in {}", self.model.display()))?;
        let load_ms = t.elapsed().as_secs_f64() * 1e3;
        let model = Arc::new(model);
        let mut session =
            Session::new(model.clone(), &SessionOptions { n_ctx: self.ctx_size, n_threads: self.threads, n_batch: 0 })?;
        let t = Instant::now();
        let mut active = Vec::new();
        for spec in &self.adapters {
            let (dir, scale) = parse_adapter_spec(spec)?;
            let opts = AdapterOptions { allow_base_mismatch: self.allow_base_mismatch, strict_base: self.strict_base };
            let adapter = Adapter::load_with(&dir, &model, &opts)
                .with_context(|| format!("cannot load the adapter in {}", dir.display()))?;
            active.push((Arc::new(adapter), scale));
        }
        let adapter_load_ms = t.elapsed().as_secs_f64() * 1e3;
        session.set_adapters(&active)?;
        Ok(Loaded { model, session, load_ms, adapter_load_ms })
    }
}

/// `DIR` or `DIR:SCALE` (a trailing `:number` is the scale; directories may contain colons).
fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f32)> {
    if let Some((dir, scale)) = spec.rsplit_once(':') {
        if let Ok(s) = scale.parse::<f32>() {
            if !s.is_finite() {
                bail!("--adapter {spec}: the scale must be a finite number");
            }
            return Ok((PathBuf::from(dir), s));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// The prompt (UTF-8).
    #[arg(long)]
    prompt: std::ffi::OsString,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    s: SamplingArgs,
}

/// Decoding options shared by `generate` and `batch`.
#[derive(Args)]
struct SamplingArgs {
    #[arg(long = "max-tokens", default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// 0 = off.
    #[arg(long = "top-k", default_value_t = 0)]
    top_k: usize,
    /// 1 = off.
    #[arg(long = "top-p", default_value_t = 1.0)]
    top_p: f32,
    /// 0 = off.
    #[arg(long = "min-p", default_value_t = 0.0)]
    min_p: f32,
    /// 1 = off.
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Do not stop at end-of-sequence tokens.
    #[arg(long = "ignore-eos")]
    ignore_eos: bool,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct BatchArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Requests, JSON Lines: {"messages": [{"role": ..., "content": ...}, ...]} (rendered with the
    /// chat template) or {"prompt": "..."} (plain text); an optional "id" is copied to the output.
    #[arg(long)]
    input: PathBuf,
    /// Results, JSON Lines, one per request in input order (written atomically).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    s: SamplingArgs,
}

#[derive(Args)]
struct ScoreArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    tokens: Option<String>,
    /// Text to tokenize (special tokens such as BOS added as the tokenizer does).
    #[arg(long)]
    prompt: Option<std::ffi::OsString>,
    /// Output safetensors file: `logits` (f32 [n, vocab]) and `tokens` (i32 [n]).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    m: ModelArgs,
    #[arg(long = "prompt-tokens", default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long = "gen-tokens", default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    // `peftrt ... | head`: a closed stdout ends the process quietly, as it does `cat`, instead
    // of a panic in println!.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    install_signal_handler();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Score(a) => cmd_score(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::Inspect { path } => cmd_inspect(&path),
        Cmd::Import(a) => cmd_import(a),
        Cmd::Merge(a) => cmd_merge(a),
        Cmd::Quantize(a) => cmd_quantize(a),
        Cmd::Perplexity(a) => cmd_perplexity(a),
        Cmd::Batch(a) => cmd_batch(a),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each printed once: a library error's message often already ends
/// with its source (`path: No such file or directory (os error 2)`), which `{:#}` would repeat.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// On SIGINT/SIGTERM, removes the temporary output being written (a partial model directory
/// or results file) and exits with status 130. Temporaries of runs killed harder (SIGKILL) are
/// removed by the next run into the same place.
fn install_signal_handler() {
    let set = ctrlc::set_handler(|| {
        for p in peftrt::output::remove_live_temporaries() {
            eprintln!("interrupted: removed the unfinished {}", p.display());
        }
        eprintln!("interrupted");
        std::process::exit(130);
    });
    if let Err(e) = set {
        log::warn!("cannot install a signal handler ({e}); an interrupted run may leave a temporary output");
    }
}

fn utf8(s: std::ffi::OsString, what: &str) -> Result<String> {
    s.into_string().map_err(|_| anyhow::anyhow!("{what} is not valid UTF-8; pass UTF-8 text"))
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let Loaded { model, mut session, load_ms, .. } = a.m.load(true)?;
    let tok = model.tokenizer()?;
    let prompt = utf8(a.prompt, "--prompt")?;
    if prompt.is_empty() {
        bail!("--prompt is empty; give some text");
    }
    let tokens = if a.chat {
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &prompt));
        let text = tok.apply_chat_template(&msgs, true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&prompt, true)?
    };
    let params = a.s.params();
    let mut sampler = Sampler::new(params, model.config.vocab_size)?;
    let mut out = std::io::stdout().lock();
    let g = generate(&mut session, &tokens, &mut sampler, |text| {
        out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_ok()
    })?;
    writeln!(out)?;
    eprintln!(
        "load {:.0} ms | prompt {} tokens, {:.1} tok/s | generated {} tokens, {:.1} tok/s | stop: {:?} | {} threads",
        load_ms,
        g.prompt_tokens,
        g.prefill_tok_s(),
        g.tokens.len(),
        g.decode_tok_s(),
        g.stop,
        session.n_threads()
    );
    Ok(())
}

fn cmd_batch(a: BatchArgs) -> Result<()> {
    // Before any work: the results must have somewhere to go, and never over the input.
    peftrt::output::check_output_file(&a.out, &[&a.input])?;
    let input = peftrt::fsutil::read_text_file(&a.input, peftrt::fsutil::MAX_TEXT_BYTES)?;
    let Loaded { model, mut session, .. } = a.m.load(true)?;
    let tok = model.tokenizer()?;
    // Parse every request first: a bad line fails the run before any time is spent generating.
    let mut requests = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r = peftrt::batch::parse_request(line, tok).map_err(|e| {
            anyhow::anyhow!(
                "{} line {}: {e}; each line must be {{\"messages\": [...]}} or {{\"prompt\": \"...\"}}",
                a.input.display(),
                i + 1
            )
        })?;
        requests.push(r);
    }
    if requests.is_empty() {
        bail!("{} has no requests", a.input.display());
    }
    let params = a.s.params();
    Sampler::new(params.clone(), model.config.vocab_size)?; // checks the parameters up front
    let mut lines = String::new();
    let started = Instant::now();
    let mut too_long = 0;
    let progress = std::io::stderr().is_terminal();
    for (n, peftrt::batch::BatchRequest { id, tokens }) in requests.iter().enumerate() {
        if tokens.len() >= session.n_ctx() {
            // One request that cannot fit must not sink a long batch: it is recorded as failed.
            too_long += 1;
            let error = format!(
                "the prompt has {} tokens; the context holds {} (raise --ctx-size)",
                tokens.len(),
                session.n_ctx()
            );
            lines.push_str(&serde_json::json!({"id": id, "prompt_tokens": tokens.len(), "error": error}).to_string());
            lines.push('\n');
            continue;
        }
        session.reset();
        // A fresh sampler per request: each reply is the same whatever the order of the requests.
        let mut sampler = Sampler::new(params.clone(), model.config.vocab_size)?;
        let t = Instant::now();
        let g = generate(&mut session, tokens, &mut sampler, |_| true)?;
        let latency = t.elapsed().as_secs_f64();
        let v = serde_json::json!({
            "id": id,
            "text": g.text,
            "prompt_tokens": g.prompt_tokens,
            "generated_tokens": g.tokens.len(),
            "stop": format!("{:?}", g.stop),
            "latency_ms": latency * 1e3,
            "prefill_ms": g.prefill_time.as_secs_f64() * 1e3,
            "decode_ms": g.decode_time.as_secs_f64() * 1e3,
            "decode_tok_s": g.decode_tok_s(),
        });
        lines.push_str(&v.to_string());
        lines.push('\n');
        if progress {
            eprint!("\rbatch: {}/{} requests, {:.0} s", n + 1, requests.len(), started.elapsed().as_secs_f64());
        }
    }
    if progress {
        eprintln!();
    }
    eprintln!(
        "batch: {} requests in {:.1} s; results in {}",
        requests.len(),
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    if too_long > 0 {
        eprintln!(
            "warning: {too_long} of {} requests did not fit the context of {} tokens; their lines carry an \"error\"",
            requests.len(),
            session.n_ctx()
        );
    }
    peftrt::output::write_file_atomically(&a.out, lines.as_bytes())?;
    Ok(())
}

fn cmd_score(a: ScoreArgs) -> Result<()> {
    peftrt::output::check_output_file(&a.out, &[])?;
    let Loaded { model, mut session, .. } = a.m.load(a.prompt.is_some())?;
    let tokens: Vec<u32> = match (&a.tokens, a.prompt) {
        (Some(list), _) => list
            .split(',')
            .map(|s| s.trim().parse::<u32>().with_context(|| format!("--tokens: `{s}` is not a token id")))
            .collect::<Result<_>>()?,
        (None, Some(p)) => model.tokenizer()?.encode(&utf8(p, "--prompt")?, true)?,
        (None, None) => bail!("give --tokens or --prompt"),
    };
    let mut logits = Vec::new();
    session.eval_all(&tokens, &mut logits)?;
    let vocab = model.config.vocab_size;
    let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
    let logit_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let id_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    use safetensors::tensor::TensorView;
    let views = [
        ("logits", TensorView::new(safetensors::Dtype::F32, vec![tokens.len(), vocab], &logit_bytes)?),
        ("tokens", TensorView::new(safetensors::Dtype::I32, vec![tokens.len()], &id_bytes)?),
    ];
    peftrt::output::write_file_atomically(&a.out, &safetensors::serialize(views, None)?)?;
    eprintln!("wrote logits [{}, {}] to {}", tokens.len(), vocab, a.out.display());
    Ok(())
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let Loaded { model, mut session, load_ms, adapter_load_ms } = a.m.load(false)?;
    let vocab = model.config.vocab_size as u32;
    if a.prompt_tokens == 0 || a.repeat == 0 {
        bail!("--prompt-tokens and --repeat must be at least 1");
    }
    if a.prompt_tokens.checked_add(a.gen_tokens).is_none_or(|n| n > session.n_ctx()) {
        bail!(
            "--prompt-tokens {} + --gen-tokens {} exceed the context of {} tokens; lower them or raise --ctx-size",
            a.prompt_tokens,
            a.gen_tokens,
            session.n_ctx()
        );
    }
    // Fixed pseudo-random token ids, away from the special tokens at the start of the vocabulary.
    let pick = |i: usize, mul: usize| ((i * mul) as u32 % (vocab.saturating_sub(200).max(1))) + 100.min(vocab - 1);
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(|i| pick(i, 7919)).collect();
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    for r in 0..=a.repeat {
        session.reset();
        let t = Instant::now();
        session.eval(&prompt)?;
        let prefill = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..a.gen_tokens {
            session.eval(&[pick(i, 31)])?;
        }
        let decode = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
        if r > 0 {
            // The first run warms the page cache and the CPU caches.
            pp.push(prefill);
            tg.push(decode);
        }
    }
    let spread = |v: &[f64]| (v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(0.0, f64::max));
    let (pp_lo, pp_hi) = spread(&pp);
    let (tg_lo, tg_hi) = spread(&tg);
    let (pp_med, tg_med) = (median(&mut pp), median(&mut tg));
    let rss = peak_rss_bytes().unwrap_or(0);
    // Switching adapters: a session's active set replaced (all off, then back on), per switch.
    let active = session.adapters().to_vec();
    let switch_us = if active.is_empty() {
        0.0
    } else {
        let t = Instant::now();
        for _ in 0..500 {
            session.set_adapters(&[])?;
            session.set_adapters(&active)?;
        }
        t.elapsed().as_secs_f64() * 1e6 / 1000.0
    };
    if a.json {
        let v = serde_json::json!({
            "model": a.m.model.display().to_string(),
            "threads": session.n_threads(),
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "repeat": a.repeat,
            "load_ms": load_ms,
            "adapters": a.m.adapters,
            "adapter_load_ms": adapter_load_ms,
            "adapter_switch_us": switch_us,
            "prefill_tok_s": pp_med,
            "prefill_tok_s_min": pp_lo,
            "prefill_tok_s_max": pp_hi,
            "decode_tok_s": tg_med,
            "decode_tok_s_min": tg_lo,
            "decode_tok_s_max": tg_hi,
            "peak_rss_bytes": rss,
        });
        println!("{v}");
    } else {
        println!("model      {}", a.m.model.display());
        println!("threads    {}", session.n_threads());
        println!("load       {load_ms:.0} ms");
        if !a.m.adapters.is_empty() {
            println!("adapters   {} (load {adapter_load_ms:.2} ms, switch {switch_us:.2} µs)", a.m.adapters.join(" "));
        }
        println!(
            "prefill    {pp_med:.1} tok/s  (min {pp_lo:.1}, max {pp_hi:.1}; {} tokens, {} runs)",
            a.prompt_tokens, a.repeat
        );
        println!(
            "decode     {tg_med:.1} tok/s  (min {tg_lo:.1}, max {tg_hi:.1}; {} tokens, {} runs)",
            a.gen_tokens, a.repeat
        );
        println!("peak RSS   {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
    }
    Ok(())
}

fn cmd_inspect(path: &Path) -> Result<()> {
    if path.join("adapter_config.json").is_file() {
        inspect_adapter(path)
    } else if path.is_dir() {
        let model = Model::load(path, &LoadOptions { no_tokenizer: false })
            .with_context(|| format!("cannot load the model in {}", path.display()))?;
        let c = &model.config;
        println!("architecture       {}", c.arch.name());
        println!("layers             {}", c.num_hidden_layers);
        println!("hidden / mlp       {} / {}", c.hidden_size, c.intermediate_size);
        println!("heads (kv) × dim   {} ({}) × {}", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        println!("vocab              {}", c.vocab_size);
        println!("context            {}", c.max_position_embeddings);
        println!("rope               theta {} scaling {:?}", c.rope_theta, c.rope_scaling);
        println!("tied embeddings    {}", c.tie_word_embeddings);
        println!("chat template      {}", model.tokenizer.as_ref().is_some_and(|t| t.has_chat_template()));
        let tensors = model.store().tensors();
        let total: usize = tensors.iter().map(|t| t.numel() * t.dtype.size()).sum();
        println!("tensors            {} ({:.1} MiB)", tensors.len(), total as f64 / (1024.0 * 1024.0));
        for t in tensors {
            println!("  {:<56} {:<5} {:?}", t.name, t.dtype.name(), t.shape);
        }
        Ok(())
    } else if path.is_file() {
        // SAFETY: the file is only read while this command runs; nobody is expected to modify it.
        let gguf = unsafe { GgufFile::open(path)? };
        print!("{}", gguf.describe());
        Ok(())
    } else {
        bail!("{} is neither a model directory nor a GGUF file", path.display())
    }
}

fn inspect_adapter(dir: &Path) -> Result<()> {
    let f = AdapterFile::open(dir).with_context(|| format!("cannot read the adapter in {}", dir.display()))?;
    let c = &f.config;
    println!("adapter            {}", dir.display());
    println!("type               {}", if c.use_dora { "DoRA" } else { "LoRA" });
    println!("base model         {}", c.base_model.as_deref().unwrap_or("(not recorded)"));
    println!("base fingerprint   {}", if f.base_fingerprint.is_some() { "recorded (checked at load)" } else { "none" });
    let rs = if c.rslora { " (rsLoRA: scale alpha/√r)" } else { " (scale alpha/r)" };
    println!("r / alpha          {} / {}{rs}", c.r, c.alpha);
    for (k, v) in &c.rank_pattern {
        println!("  rank_pattern     {k} = {v}");
    }
    for (k, v) in &c.alpha_pattern {
        println!("  alpha_pattern    {k} = {v}");
    }
    println!("target_modules     {}", c.target_modules);
    if !matches!(c.exclude_modules, peftrt::adapter::Targets::Unspecified) {
        println!("exclude_modules    {}", c.exclude_modules);
    }
    if let Some(l) = &c.layers {
        println!("layers             {l:?}");
    }
    let n = f.n_params();
    println!(
        "adapted modules    {} ({} parameters, {:.2} MiB on disk)",
        f.modules.len(),
        n,
        f.file_bytes as f64 / (1024.0 * 1024.0)
    );
    for (name, t) in &f.modules {
        println!(
            "  {:<40} r {:<3} scale {:<8.4} [{} → {}] {}{}",
            name,
            t.rank(),
            f.scale_for(name),
            t.a.shape[1],
            t.b.shape[0],
            t.a.dtype.name(),
            if t.magnitude.is_some() { " +magnitude" } else { "" }
        );
    }
    Ok(())
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    let adapters = a.adapters.iter().map(|s| parse_adapter_spec(s)).collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    let opts = MergeOptions { dtype: a.dtype.map(DType::from), allow_base_mismatch: a.allow_base_mismatch };
    let s = peftrt::merge::merge(&a.model, &adapters, &a.out, &opts)?;
    eprintln!(
        "merged {} adapter(s) into {} linear layers; wrote {} tensors ({}) to {} in {:.1} s",
        adapters.len(),
        s.merged_layers,
        s.n_tensors,
        s.dtype.name(),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_import(a: ImportArgs) -> Result<()> {
    let dtype = DType::from(a.dtype);
    let t = Instant::now();
    let s = import(&a.gguf, &a.out_dir, &ImportOptions { dtype, force: a.force, saturate: a.saturate })?;
    eprintln!(
        "imported {} ({} tensors, {:.1} M parameters{}) into {} in {:.1} s",
        s.architecture,
        s.n_tensors,
        s.n_parameters as f64 / 1e6,
        if s.tied_embeddings { ", tied embeddings" } else { "" },
        s.out_dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_quantize(a: QuantizeArgs) -> Result<()> {
    let opts = peftrt::quantize::QuantizeOptions {
        blocksize: a.blocksize,
        double_quant: !a.no_double_quant,
        keep: a.keep,
        requantize_merged: a.requantize_merged,
        quantize_head: a.quantize_head,
    };
    let t = Instant::now();
    let s = peftrt::quantize::quantize_model(&a.model, &a.out, &opts)?;
    eprintln!(
        "quantised {} linear layers to NF4 (blocksize {}{}; {} kept in float); wrote {:.1} MiB to {} in {:.1} s",
        s.quantized_layers,
        opts.blocksize,
        if opts.double_quant { ", double-quantised scales" } else { "" },
        s.kept_layers,
        s.bytes as f64 / (1024.0 * 1024.0),
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_perplexity(a: PerplexityArgs) -> Result<()> {
    let text = peftrt::fsutil::read_text_file(&a.text, peftrt::fsutil::MAX_TEXT_BYTES)?;
    let Loaded { model, mut session, .. } = a.m.load(true)?;
    let tokens = model.tokenizer()?.encode(&text, true)?;
    let window = if a.window == 0 { session.n_ctx() } else { a.window };
    if window > session.n_ctx() {
        bail!("--window {window} is larger than the context ({}); raise --ctx-size", session.n_ctx());
    }
    let stride = if a.stride == 0 { (window / 2).max(1) } else { a.stride };
    let t = Instant::now();
    // Drawn only when stderr is a terminal (indicatif hides it otherwise).
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("window {pos}/{len} {wide_bar} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let p = peftrt::perplexity::perplexity(&mut session, &tokens, window, stride, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "perplexity": p.ppl(),
            "nll_per_token": p.nll / p.n_scored as f64,
            "tokens": tokens.len(),
            "scored": p.n_scored,
            "windows": p.windows,
            "window": window,
            "stride": stride,
            "adapters": a.m.adapters,
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "perplexity {:.4} over {} tokens ({} windows of {window}, stride {stride}; {:.1} s)",
            p.ppl(),
            p.n_scored,
            p.windows,
            secs
        );
    }
    Ok(())
}
