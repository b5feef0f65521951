//! `trainer eval`: loss and perplexity of a base model (with an adapter or without) on JSONL
//! data, computed on the response tokens exactly as training computes them; with generation,
//! the share of responses that parse as JSON and that satisfy a JSON schema.
//!
//! Generation runs on the runtime (greedy, the adapter applied unmerged, stopping at EOS): what
//! is measured is what will be served.

use crate::base::Base;
use crate::data::{Batch, Dataset, Encoder, Example, Format};
use crate::error::{Error, Result};
use crate::lora::{Init, LoraSet};
use crate::loss::loss_from;
use crate::model::{BaseModel, BaseStorage, Pass};
use crate::prefix::PrefixCache;
use peftrt::json::{parse_reply, Schema};
use peftrt::{Adapter, Sampler, SamplingParams, Session, SessionOptions};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Device, Kind};

/// What to evaluate.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub base: PathBuf,
    pub adapter: Option<PathBuf>,
    pub data: PathBuf,
    pub format: Option<Format>,
    pub max_seq_len: usize,
    pub batch_size: usize,
    pub device: Device,
    /// Evaluate on the NF4-quantised base (as a QLoRA adapter was trained).
    pub qlora: bool,
    /// Generate a response to every prompt (implied by `json_schema`).
    pub generate: bool,
    pub json_schema: Option<PathBuf>,
    pub max_new_tokens: usize,
}

impl EvalOptions {
    pub fn new(base: PathBuf, data: PathBuf) -> Self {
        EvalOptions {
            base,
            adapter: None,
            data,
            format: None,
            max_seq_len: 1024,
            batch_size: 4,
            device: Device::Cpu,
            qlora: false,
            generate: false,
            json_schema: None,
            max_new_tokens: 256,
        }
    }
}

/// The results.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub examples: usize,
    /// Response tokens scored.
    pub targets: usize,
    /// Mean cross-entropy per response token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Responses generated (0 without generation).
    pub generated: usize,
    /// Responses that parse as JSON.
    pub json_valid: usize,
    /// Responses that parse and satisfy the schema (`None` without a schema).
    pub schema_valid: Option<usize>,
}

impl EvalReport {
    pub fn to_json(&self) -> Value {
        let rate = |n: usize| if self.generated == 0 { Value::Null } else { json!(n as f64 / self.generated as f64) };
        json!({
            "examples": self.examples, "response_tokens": self.targets, "loss": self.loss,
            "perplexity": self.perplexity, "generated": self.generated,
            "json_valid_rate": rate(self.json_valid),
            "schema_valid_rate": self.schema_valid.map(rate),
        })
    }
}

pub fn evaluate(o: &EvalOptions) -> Result<EvalReport> {
    let schema = o.json_schema.as_deref().map(Schema::load).transpose()?;
    let storage = if o.qlora { BaseStorage::Nf4 } else { BaseStorage::Float };
    let base = Base::load(&o.base, storage, o.device)?;
    let enc = Encoder { tokenizer: base.runtime.tokenizer()?, eos: base.eos(), max_seq_len: o.max_seq_len };
    let data = Dataset::load(&o.data, o.format, &enc)?;
    let lora = match &o.adapter {
        Some(dir) => {
            Some(LoraSet::from_adapter(&base.model.linear_shapes(), base.model.device, dir, 0.0, Init::Kaiming)?)
        }
        None => None,
    };
    let pad = base.eos().unwrap_or(0);
    let loss = eval_loss(&base.model, lora.as_ref(), &data.examples, o.batch_size, pad, None)?;
    let mut report = EvalReport {
        examples: data.examples.len(),
        targets: data.n_targets(),
        loss,
        perplexity: loss.exp(),
        generated: 0,
        json_valid: 0,
        schema_valid: schema.as_ref().map(|_| 0),
    };
    if !(o.generate || schema.is_some()) {
        return Ok(report);
    }
    if o.qlora {
        return Err(Error::Input(
            "--qlora with generation: generate on an NF4 copy of the base instead (peftrt quantize, then --base)"
                .into(),
        ));
    }
    let model = base.runtime.clone();
    let adapters = match &o.adapter {
        Some(dir) => vec![(Arc::new(Adapter::load(dir, &model)?), 1.0)],
        None => vec![],
    };
    for ex in &data.examples {
        // The prompt: everything before the first response token.
        let start = ex.trained.iter().position(|&t| t).unwrap_or(ex.ids.len());
        let prompt: Vec<u32> = ex.ids[..start].iter().map(|&t| t as u32).collect();
        if prompt.is_empty() {
            continue; // a plain-text example has no prompt to answer
        }
        let n_ctx = prompt.len() + o.max_new_tokens + 1;
        let mut session = Session::new(model.clone(), &SessionOptions { n_ctx, ..Default::default() })?;
        session.set_adapters(&adapters)?;
        let params = SamplingParams { max_tokens: o.max_new_tokens, ..Default::default() };
        let mut sampler = Sampler::new(params, model.config.vocab_size)?;
        let generation = peftrt::generate(&mut session, &prompt, &mut sampler, |_| true)?;
        report.generated += 1;
        if let Some(v) = parse_reply(&generation.text) {
            report.json_valid += 1;
            if let (Some(s), Some(n)) = (&schema, report.schema_valid.as_mut()) {
                *n += usize::from(s.is_valid(&v));
            }
        }
    }
    Ok(report)
}

/// Mean loss per response token of `examples` (no dropout, no gradients) with `lora` (or the
/// base alone); `prefix`, when given, is the [`PrefixCache`] of these examples.
pub fn eval_loss(
    model: &BaseModel,
    lora: Option<&LoraSet>,
    examples: &[Example],
    batch_size: usize,
    pad: i64,
    prefix: Option<&PrefixCache>,
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let (mut sum, mut count) = (0.0, 0i64);
    let batch_size = batch_size.max(1);
    for (c, chunk) in examples.chunks(batch_size).enumerate() {
        let refs: Vec<_> = chunk.iter().collect();
        let b = Batch::new(&refs, pad)?;
        let cached = match prefix {
            Some(p) => Some((
                p.start(),
                p.batch(&(c * batch_size..c * batch_size + chunk.len()).collect::<Vec<_>>(), model.device)?,
            )),
            None => None,
        };
        sum += loss_from(model, &b, cached, Pass::new(lora, false))?.f_to_kind(Kind::Double)?.f_double_value(&[])?;
        count += b.n_targets;
    }
    Ok(sum / count.max(1) as f64)
}
