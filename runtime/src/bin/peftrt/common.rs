//! Options and helpers shared by several subcommands: loading a model with adapters, sampling,
//! output dtypes.

use anyhow::{Context, Result};
use clap::Args;
use peftrt::adapter::AdapterOptions;
use peftrt::constraint::{Constraint, ConstraintSpec};
use peftrt::gguf::DType;
use peftrt::{Adapter, LoadOptions, Model, SamplingParams, Session, SessionOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct ModelArgs {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or a GGUF
    /// file (used as it is: its quantised tensors run in place).
    #[arg(long)]
    pub model: PathBuf,
    /// Threads (default: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// A PEFT LoRA adapter directory, optionally with a scale (default 1): DIR or DIR:0.5.
    /// Repeatable: the adapters' effects add up.
    #[arg(long = "adapter", value_name = "DIR[:SCALE]")]
    pub adapters: Vec<String>,
    /// Load adapters even if they record a different base model than --model.
    #[arg(long)]
    pub allow_base_mismatch: bool,
    /// Refuse adapters without a base-model fingerprint whose base_model_name_or_path names
    /// another model than --model (by default they load with a warning).
    #[arg(long)]
    pub strict_base: bool,
}

/// A loaded model and a session with the requested adapters active.
pub struct Loaded {
    pub model: Arc<Model>,
    pub session: Session,
    pub load_ms: f64,
    pub adapter_load_ms: f64,
}

impl ModelArgs {
    pub fn load(&self, tokenizer: bool) -> Result<Loaded> {
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

/// `DIR` or `DIR:SCALE` ([`peftrt::adapter::parse_spec`], shared with `peftrt-server`).
pub fn parse_adapter_spec(spec: &str) -> Result<(PathBuf, f32)> {
    peftrt::adapter::parse_spec(spec).map_err(|e| anyhow::anyhow!("--adapter {e}"))
}

/// Decoding options shared by `generate` and `batch`.
#[derive(Args)]
pub struct SamplingArgs {
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
    pub fn params(&self) -> SamplingParams {
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

/// What the output must match (at most one): llguidance compiles it against the model's
/// vocabulary, and tokens that cannot continue it are never sampled.
#[derive(clap::Args)]
#[group(multiple = false)]
pub struct ConstraintArgs {
    /// The output is JSON satisfying this JSON Schema file.
    #[arg(long = "json-schema")]
    pub json_schema: Option<PathBuf>,
    /// The output is a JSON object (also `--json-object`).
    #[arg(long, alias = "json-object")]
    pub json: bool,
    /// The output matches this regular expression, whole.
    #[arg(long)]
    pub regex: Option<String>,
    /// The output follows this Lark grammar file (llguidance's dialect).
    #[arg(long)]
    pub grammar: Option<PathBuf>,
}

impl ConstraintArgs {
    pub fn spec(&self) -> Result<Option<ConstraintSpec>> {
        let read = |p: &PathBuf| peftrt::fsutil::read_text_file(p, peftrt::fsutil::MAX_JSON_BYTES);
        Ok(if let Some(p) = &self.json_schema {
            Some(ConstraintSpec::JsonSchema(read(p)?))
        } else if self.json {
            Some(ConstraintSpec::AnyJson)
        } else if let Some(rx) = &self.regex {
            Some(ConstraintSpec::Regex(rx.clone()))
        } else if let Some(p) = &self.grammar {
            Some(ConstraintSpec::Lark(read(p)?))
        } else {
            None
        })
    }

    /// The constraint compiled for `model`; the error names the flag and its file.
    pub fn compile(&self, model: &Model) -> Result<Option<Constraint>> {
        let Some(spec) = self.spec()? else { return Ok(None) };
        let what = match (&self.json_schema, &self.grammar) {
            (Some(p), _) | (_, Some(p)) => format!("{}", p.display()),
            _ if self.json => "--json".to_string(),
            _ => "--regex".to_string(),
        };
        Ok(Some(Constraint::new(model, &spec).with_context(|| what)?))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
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

pub fn utf8(s: std::ffi::OsString, what: &str) -> Result<String> {
    s.into_string().map_err(|_| anyhow::anyhow!("{what} is not valid UTF-8; pass UTF-8 text"))
}
