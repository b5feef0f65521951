//! The training loop: batches in a seeded order, the loss on response tokens only, gradient
//! accumulation, clipping, AdamW with a warm-up schedule, and the adapter written at the end.
//!
//! One optimiser step consumes `grad_accum` micro-batches of `batch_size` examples; the loss of
//! a step is the mean over all response tokens of its micro-batches (the sum of token losses
//! divided by their count, as transformers' Trainer does with `num_items_in_batch`). The
//! micro-batch stream runs through the epochs: micro-batch `m` is batch `m % per_epoch` of
//! epoch `m / per_epoch`, whose order is a permutation seeded by (`seed`, epoch). Dropout masks
//! are reseeded with (`seed`, step, micro-batch, block) before each block ([`crate::dropout`]'s
//! keys on a CPU, libtorch's generator on CUDA). A run is therefore a function of its options
//! alone: CPU runs are bit-reproducible, and a run resumed at step `k`
//! continues exactly as the uninterrupted one.

use crate::checkpoint::{self, RunState};
use crate::data::{
    group_by_length, pack_rows, split_eval, Batch, Dataset, Encoder, EpochPlan, Example, Format, SplitMix64, IGNORE,
};
use crate::error::{Error, Result};
use crate::lora::{parse_targets, Init, LoraSet, LoraSpec};
use crate::metrics::{progress_bar, MetricsFile, OverfitWatch, StepMetrics, StepSpeed};
use crate::model::{BaseModel, BaseStorage, Layout};
use crate::optim::{clip_grad_norm, zero_grad, AdamW, AdamWConfig, Schedule};
use crate::prefix::PrefixCache;
use crate::save::{check_output, save_adapter, Provenance};
use peftrt::adapter::BaseFingerprint;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::{Device, Kind, Reduction, Tensor};

/// The LoRA options of a run.
#[derive(Clone, Debug)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f32,
    pub dropout: f64,
    /// `q_proj,v_proj`, `all-linear` or a regex.
    pub target: String,
    pub rslora: bool,
    pub init: Init,
    /// Only these decoder layers (`layers_to_transform`).
    pub layers: Option<Vec<usize>>,
    /// Start from this PEFT adapter's weights and configuration.
    pub init_adapter: Option<PathBuf>,
}

impl Default for LoraOptions {
    fn default() -> Self {
        LoraOptions {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target: "q_proj,v_proj".into(),
            rslora: false,
            init: Init::Kaiming,
            layers: None,
            init_adapter: None,
        }
    }
}

/// Everything a training run needs.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub base: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    pub overwrite: bool,
    /// `None`: detect from the first record.
    pub format: Option<Format>,
    pub max_seq_len: usize,
    pub lora: LoraOptions,
    /// Quantise the frozen base to NF4 (QLoRA).
    pub qlora: bool,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: f64,
    /// Overrides `epochs`.
    pub max_steps: Option<u64>,
    pub lr: f64,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    /// Clip the gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Shuffle the examples each epoch (seeded); off: file order.
    pub shuffle: bool,
    pub device: Device,
    /// A user-given version of the dataset, recorded in the provenance.
    pub dataset_version: Option<String>,
    /// Write a checkpoint every this many steps.
    pub checkpoint_every: Option<u64>,
    /// Where checkpoints go (default: the output path with `-checkpoint` appended). One
    /// directory, replaced by each newer checkpoint.
    pub checkpoint_dir: Option<PathBuf>,
    /// Continue the run whose checkpoint this is (the other options must be the same).
    pub resume: Option<PathBuf>,
    /// Stop cleanly after this step, with a checkpoint, as an interruption does (a time-boxed
    /// job); `--resume` continues.
    pub stop_after: Option<u64>,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Evaluation data (same format rules as the training data).
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of the training data for evaluation instead.
    pub eval_split: Option<f64>,
    /// Evaluate every this many steps (default: ten times per run) and after the last.
    pub eval_every: Option<u64>,
    /// The metrics JSONL (default: the output path with `-metrics.jsonl` appended); a copy
    /// ends up in the adapter directory as `training_metrics.jsonl`, and the loss curve, drawn
    /// beside it (`.png`), as `loss_curve.png`.
    pub metrics: Option<PathBuf>,
    /// Show the progress bar on stderr.
    pub progress: bool,
    /// General instruction data mixed into the training stream (any of the formats).
    pub mix_data: Option<PathBuf>,
    /// The share of each epoch's examples drawn from `mix_data`.
    pub mix_ratio: f64,
    /// Recompute each block in the backward pass instead of keeping its activations.
    pub grad_checkpoint: bool,
    /// Pack several examples into each row of up to `max_seq_len` tokens (each still attends
    /// only to itself, positions restarting at 0); `batch_size` counts rows.
    pub pack: bool,
    /// Batch rows of similar length together (less padding; see [`group_by_length`]).
    pub group_by_length: bool,
    /// When LoRA adapts only upper blocks, compute the frozen blocks below once per example
    /// ([`PrefixCache`]; not with packing, and only up to [`PREFIX_CACHE_MAX_BYTES`]).
    pub prefix_cache: bool,
}

/// The largest [`PrefixCache`] a run keeps (CPU memory); above it the frozen blocks run in
/// every step, as without the cache.
pub const PREFIX_CACHE_MAX_BYTES: u64 = 4 << 30;

/// The micro-batches of a run, epoch after epoch: each a list of rows, each row the indices of
/// its examples (one per row unless packing). Epochs are laid out when first needed.
struct Stream<'a> {
    plan: &'a EpochPlan,
    lens: Vec<usize>,
    opts: &'a TrainOptions,
    epochs: Vec<Vec<Vec<Vec<usize>>>>,
}

impl Stream<'_> {
    fn epoch(&mut self, e: usize) -> &Vec<Vec<Vec<usize>>> {
        let o = self.opts;
        while self.epochs.len() <= e {
            let order = self.plan.order(o.seed, self.epochs.len() as u64, o.shuffle);
            let rows = if o.pack {
                pack_rows(&order, &self.lens, o.max_seq_len)
            } else {
                order.iter().map(|&i| vec![i]).collect()
            };
            let epoch = self.epochs.len() as u64;
            self.epochs.push(if o.group_by_length {
                group_by_length(rows, &self.lens, o.batch_size, o.seed ^ epoch.wrapping_mul(SplitMix64::GAMMA))
            } else {
                rows.chunks(o.batch_size).map(<[_]>::to_vec).collect()
            });
        }
        &self.epochs[e]
    }

    /// Micro-batch `m` of the run (counting through the epochs).
    fn micro_batch(&mut self, mut m: u64) -> Vec<Vec<usize>> {
        let mut e = 0;
        loop {
            let n = self.epoch(e).len() as u64;
            if m < n {
                return self.epochs[e][m as usize].clone();
            }
            m -= n;
            e += 1;
        }
    }
}

impl TrainOptions {
    /// Defaults for everything but the paths.
    pub fn new(base: PathBuf, data: PathBuf, output: PathBuf) -> Self {
        TrainOptions {
            base,
            data,
            output,
            overwrite: false,
            format: None,
            max_seq_len: 1024,
            lora: LoraOptions::default(),
            qlora: false,
            batch_size: 4,
            grad_accum: 1,
            epochs: 1.0,
            max_steps: None,
            lr: 2e-4,
            warmup_steps: 0,
            schedule: Schedule::Cosine,
            adamw: AdamWConfig::default(),
            max_grad_norm: Some(1.0),
            seed: 42,
            shuffle: true,
            device: Device::Cpu,
            dataset_version: None,
            checkpoint_every: None,
            checkpoint_dir: None,
            resume: None,
            stop_after: None,
            interrupt: None,
            eval_data: None,
            eval_split: None,
            eval_every: None,
            metrics: None,
            progress: false,
            mix_data: None,
            mix_ratio: 0.1,
            grad_checkpoint: false,
            pack: false,
            group_by_length: false,
            prefix_cache: true,
        }
    }

    /// The metrics file.
    pub fn metrics_path(&self) -> PathBuf {
        self.metrics.clone().unwrap_or_else(|| {
            let mut p = self.output.clone().into_os_string();
            p.push("-metrics.jsonl");
            PathBuf::from(p)
        })
    }

    /// The checkpoint directory.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.checkpoint_dir.clone().unwrap_or_else(|| {
            let mut p = self.output.clone().into_os_string();
            p.push("-checkpoint");
            PathBuf::from(p)
        })
    }

    fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::Input("--batch-size and --grad-accum must be at least 1".into()));
        }
        if self.max_seq_len < 2 {
            return Err(Error::Input("--max-seq-len must be at least 2".into()));
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && !(self.epochs > 0.0 && self.epochs.is_finite())) {
            return Err(Error::Input("train for at least one step: --epochs > 0 or --max-steps ≥ 1".into()));
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(Error::Input(format!("--lr {}: must be a non-negative number", self.lr)));
        }
        if let Some(m) = self.max_grad_norm {
            if m.is_nan() || m <= 0.0 {
                return Err(Error::Input(format!(
                    "--max-grad-norm {m}: must be positive (omit it to disable clipping)"
                )));
            }
        }
        Ok(())
    }

    /// The hyper-parameters recorded in the provenance.
    fn hyperparameters(&self, lora: &LoraSet, steps: u64) -> serde_json::Value {
        let c = &lora.spec.config;
        json!({
            "r": c.r, "lora_alpha": c.alpha, "lora_dropout": self.lora.dropout, "use_rslora": c.rslora,
            "target_modules": c.target_modules.to_string(), "layers_to_transform": c.layers,
            "init": format!("{:?}", self.lora.init).to_lowercase(),
            "init_adapter": self.lora.init_adapter.as_ref().map(|p| p.display().to_string()),
            "qlora": self.qlora, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "epochs": self.epochs, "max_steps": self.max_steps, "steps": steps, "lr": self.lr,
            "warmup_steps": self.warmup_steps, "schedule": self.schedule.name(),
            "betas": [self.adamw.beta1, self.adamw.beta2], "eps": self.adamw.eps,
            "weight_decay": self.adamw.weight_decay, "max_grad_norm": self.max_grad_norm,
            "max_seq_len": self.max_seq_len, "seed": self.seed, "shuffle": self.shuffle,
            "eval_split": self.eval_split,
            "mix_data": self.mix_data.as_ref().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned()),
            "mix_ratio": self.mix_data.as_ref().map(|_| self.mix_ratio),
            "pack": self.pack,
            "group_by_length": self.group_by_length,
            "eval_data": self.eval_data.as_ref().and_then(|p| p.file_name()).map(|f| f.to_string_lossy().into_owned()),
        })
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    /// Loss of every step (mean over its response tokens).
    pub losses: Vec<f64>,
    /// Learning rate of every step.
    pub lrs: Vec<f64>,
    /// Gradient norm of every step, before clipping.
    pub grad_norms: Vec<f64>,
    /// (step, eval loss) of every evaluation.
    pub eval_losses: Vec<(u64, f64)>,
    /// Warnings raised while training (overfitting).
    pub warnings: Vec<String>,
    pub n_examples: usize,
    pub n_truncated: usize,
    pub n_dropped: usize,
    /// Tokens processed (unpadded).
    pub n_tokens: i64,
}

/// A loaded base model with its tokenizer and fingerprint.
pub struct Base {
    /// The runtime's model (tokenizer, chat template; serves generation in `trainer eval`).
    pub runtime: Arc<peftrt::Model>,
    pub model: BaseModel,
    pub fingerprint: BaseFingerprint,
}

impl Base {
    /// Loads a Hugging Face model directory with the runtime's loader, then into libtorch.
    pub fn load(dir: &std::path::Path, storage: BaseStorage, device: Device) -> Result<Base> {
        if dir.is_dir() && !dir.join("config.json").is_file() {
            let hint = if dir.join("adapter_config.json").is_file() {
                "; it is a PEFT adapter: pass it with --init-adapter, and the model it was trained on with --base"
            } else {
                "; pass the base model's directory (config.json, *.safetensors, tokenizer.json)"
            };
            return Err(Error::Input(format!(
                "{}: not a Hugging Face model directory (no config.json){hint}",
                dir.display()
            )));
        }
        let runtime = Arc::new(peftrt::Model::load(dir, &peftrt::LoadOptions::default())?);
        let model = BaseModel::from_runtime(&runtime, storage, device)?;
        let fingerprint = BaseFingerprint::of(&runtime);
        Ok(Base { runtime, model, fingerprint })
    }

    /// The end-of-sequence id appended to plain-text examples, and the padding id.
    pub fn eos(&self) -> Option<i64> {
        self.runtime.config.eos_token_ids.first().map(|&t| i64::from(t))
    }
}

/// The positions of a batch that carry a loss: `rows` indexes the flattened `[batch * seq]`
/// positions whose label is not −100, `labels` holds their labels (both on the model's device).
struct Targets {
    rows: Tensor,
    labels: Tensor,
}

impl Targets {
    fn of(model: &BaseModel, labels: &Tensor) -> Result<Targets> {
        // On the CPU, where the batch is built: no device synchronisation for `nonzero`.
        let labels = labels.f_reshape([-1])?;
        let rows = labels.f_ne(IGNORE)?.f_nonzero()?.f_reshape([-1])?;
        Ok(Targets { labels: labels.f_index_select(0, &rows)?.f_to(model.device)?, rows: rows.f_to(model.device)? })
    }
}

/// The summed cross-entropy of the labelled positions of the last block's output `h`
/// `[batch, seq, hidden]`. The final norm and the head run at those positions only: with a
/// vocabulary of 49152 the head is a fifth of a small model's multiply-adds, and the f32
/// logits of prompt and padding positions would only be thrown away.
fn loss_sum(model: &BaseModel, lora: &LoraSet, h: &Tensor, targets: &Targets, train: bool) -> Result<Tensor> {
    let hidden = h.size()[2];
    let h = h.f_reshape([-1, hidden])?.f_index_select(0, &targets.rows)?;
    let logits = model.head(&h, lora, train)?;
    Ok(logits.f_cross_entropy_loss::<Tensor>(&targets.labels, None, Reduction::Sum, IGNORE, 0.0)?)
}

/// The layout of a batch: packed rows, or plain sequences from position 0.
fn layout_of(model: &BaseModel, b: &Batch) -> Result<Layout> {
    match &b.packing {
        Some((positions, segments)) => model.packed_layout(positions, segments),
        None => model.causal_layout(b.ids.size()[1]),
    }
}

/// The output of the frozen blocks for a batch, cached: the first block to run and its input.
type Cached = Option<(usize, Tensor)>;

/// The first block to run for `b` and its input: `cached`, or block 0 and the embeddings.
fn block_input(model: &BaseModel, b: &Batch, cached: Cached) -> Result<(usize, Tensor)> {
    match cached {
        Some(c) => Ok(c),
        None => Ok((0, model.embed(&b.ids.f_to(model.device)?)?)),
    }
}

/// The summed cross-entropy of `batch`'s labelled positions (f32 logits), from `cached` on.
fn loss_from(model: &BaseModel, lora: &LoraSet, batch: &Batch, cached: Cached, train: bool) -> Result<Tensor> {
    let (start, h0) = block_input(model, batch, cached)?;
    let h = model.hidden_from(start, h0, &layout_of(model, batch)?, lora, train, None)?;
    loss_sum(model, lora, &h, &Targets::of(model, &batch.labels)?, train)
}

/// The summed cross-entropy of `batch`'s labelled positions (f32 logits).
pub fn batch_loss_sum(model: &BaseModel, lora: &LoraSet, batch: &Batch, train: bool) -> Result<Tensor> {
    loss_from(model, lora, batch, None, train)
}

/// Forward and backward of one micro-batch, its loss scaled by `1 / n_targets` (the step's
/// response tokens); gradients accumulate into the LoRA weights. Returns the scaled loss.
/// With `cached`, the frozen blocks below the cache's start are not run: their output for the
/// batch is the given tensor.
///
/// With `checkpoint`, only the blocks' inputs are kept from a gradient-free forward pass; the
/// backward pass then recomputes one block at a time with gradients, from the last to the
/// first, feeding each the gradient of its output (activation memory of one block instead of
/// all). Both ways draw the same dropout masks (seeded per block) and give the same gradients.
fn micro_batch(
    model: &BaseModel,
    lora: &LoraSet,
    b: &Batch,
    n_targets: i64,
    dropout_seed: i64,
    checkpoint: bool,
    cached: Cached,
) -> Result<f64> {
    let targets = Targets::of(model, &b.labels)?;
    let seed = Some(dropout_seed);
    let layout = layout_of(model, b)?;
    let (start, h0) = block_input(model, b, cached)?;
    if !checkpoint {
        let h = model.hidden_from(start, h0, &layout, lora, true, seed)?;
        let loss = loss_sum(model, lora, &h, &targets, true)?.f_div_scalar(n_targets as f64)?;
        loss.f_backward()?;
        return Ok(loss.f_double_value(&[])?);
    }
    let mut inputs = Vec::with_capacity(model.n_blocks() - start);
    let last = tch::no_grad(|| -> Result<Tensor> {
        let mut h = h0;
        for i in start..model.n_blocks() {
            let next = model.block_at(i, &h, &layout, lora, true, seed)?;
            inputs.push(h);
            h = next;
        }
        Ok(h)
    })?;
    let last = last.f_detach()?.set_requires_grad(true);
    let loss = loss_sum(model, lora, &last, &targets, true)?.f_div_scalar(n_targets as f64)?;
    loss.f_backward()?;
    let mut grad = last.grad();
    for (i, input) in inputs.iter().enumerate().map(|(k, x)| (start + k, x)).rev() {
        let x = input.f_detach()?.set_requires_grad(true);
        let y = model.block_at(i, &x, &layout, lora, true, seed)?;
        y.f_mul(&grad)?.f_sum(y.kind())?.f_backward()?;
        grad = x.grad();
    }
    Ok(loss.f_double_value(&[])?)
}

/// The LoRA layers a run starts from: `--init-adapter`'s, or fresh ones drawn from `seed`.
pub fn initial_lora(model: &BaseModel, o: &LoraOptions, seed: u64) -> Result<LoraSet> {
    match &o.init_adapter {
        Some(dir) => LoraSet::from_adapter(model, dir, o.dropout, o.init),
        None => {
            let targets = parse_targets(&o.target)?;
            let spec = LoraSpec::new(o.r, o.alpha, targets, o.rslora, o.layers.clone(), o.dropout, o.init)?;
            tch::manual_seed(seed as i64);
            LoraSet::init(model, spec)
        }
    }
}

/// Runs in one process share libtorch's global random generator (initialisation, dropout):
/// they take turns, so that each stays a function of its own seed.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Trains an adapter and writes it to `opts.output`.
pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    let _turn = GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    opts.check()?;
    check_output(&opts.output, opts.overwrite)?;
    let storage = if opts.qlora { BaseStorage::Nf4 } else { BaseStorage::Float };
    let base = Base::load(&opts.base, storage, opts.device)?;
    let tokenizer = base.runtime.tokenizer()?;
    let enc = Encoder { tokenizer, eos: base.eos(), max_seq_len: opts.max_seq_len };
    let data = Dataset::load(&opts.data, opts.format, &enc)?;
    let (examples, eval_examples): (Vec<Example>, Vec<Example>) = match (&opts.eval_data, opts.eval_split) {
        (Some(_), Some(_)) => return Err(Error::Input("give --eval-data or --eval-split, not both".into())),
        (Some(path), None) => (data.examples.clone(), Dataset::load(path, Some(data.format), &enc)?.examples),
        (None, Some(f)) => split_eval(data.examples.clone(), f, opts.seed)?,
        (None, None) => (data.examples.clone(), Vec::new()),
    };
    // Mixed-in examples follow the training ones: indices n.. of `examples`.
    let (examples, plan, mix_sha256) = match &opts.mix_data {
        None => {
            let n = examples.len();
            (examples, EpochPlan::plain(n), None)
        }
        Some(path) => {
            let mix = Dataset::load(path, None, &enc)?;
            let plan = EpochPlan::mixed(examples.len(), mix.examples.len(), opts.mix_ratio)?;
            let mut all = examples;
            all.extend(mix.examples);
            (all, plan, Some(mix.sha256))
        }
    };
    let lora = match &opts.resume {
        Some(dir) => LoraSet::from_adapter(&base.model, dir, opts.lora.dropout, opts.lora.init)?,
        None => initial_lora(&base.model, &opts.lora, opts.seed)?,
    };
    let params: Vec<Tensor> = lora.named_parameters().into_iter().map(|(_, t)| t).collect();
    let mut opt = AdamW::new(opts.adamw.clone(), &params)?;
    let pad = base.eos().unwrap_or(0);

    let n = plan.len();
    let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mut stream = Stream { plan: &plan, lens, opts, epochs: Vec::new() };
    let per_epoch = stream.epoch(0).len() as u64;
    let total_steps = match opts.max_steps {
        Some(s) => s,
        None => {
            let full = opts.epochs.floor() as usize;
            let mut micro: f64 = (0..full).map(|e| stream.epoch(e).len() as f64).sum();
            micro += opts.epochs.fract() * stream.epoch(full).len() as f64;
            (micro / opts.grad_accum as f64).ceil().max(1.0) as u64
        }
    };
    // The frozen blocks' output for the examples the run will use (with --mix-data, an epoch
    // draws only some of the mixed-in ones).
    let prefix = if opts.prefix_cache && !opts.pack {
        let used: std::collections::BTreeSet<usize> =
            (0..total_steps * opts.grad_accum as u64).flat_map(|m| stream.micro_batch(m).concat()).collect();
        frozen_prefix(opts, &base.model, &lora, &examples, &used.into_iter().collect::<Vec<_>>(), pad, "training")?
    } else {
        None
    };
    let all_eval: Vec<usize> = (0..eval_examples.len()).collect();
    let eval_prefix = frozen_prefix(opts, &base.model, &lora, &eval_examples, &all_eval, pad, "evaluation")?;
    let prov = Provenance {
        base: base.fingerprint.clone(),
        dataset: json!({
            "sha256": data.sha256,
            "file": opts.data.file_name().map(|f| f.to_string_lossy().into_owned()),
            "version": opts.dataset_version,
            "format": data.format.name(),
            "examples": n,
            "truncated": data.n_truncated,
        }),
        hyperparameters: opts.hyperparameters(&lora, total_steps),
    };
    // What a resumed run must share with the run that wrote the checkpoint.
    let agreement = json!({
        "hyperparameters": prov.hyperparameters,
        "dataset_sha256": data.sha256,
        "mix_sha256": mix_sha256,
        "base_model": base.fingerprint.to_json(),
    });
    let base_name = opts.base.display().to_string();
    let mut state = match &opts.resume {
        Some(dir) => checkpoint::restore(dir, &lora, &mut opt, &agreement)?,
        None => RunState::default(),
    };
    let ckpt_dir = opts.checkpoint_path();
    let save_checkpoint = |state: &RunState, opt: &AdamW| -> Result<()> {
        checkpoint::save(&ckpt_dir, &lora, opt, state, &agreement, &base_name, &prov)
    };

    let eval_every = opts.eval_every.unwrap_or((total_steps / 10).max(1));
    let epoch_of = |step: u64| (step * opts.grad_accum as u64) as f64 / per_epoch as f64;
    let history: Vec<StepMetrics> = (0..state.step as usize)
        .map(|i| StepMetrics {
            step: i as u64 + 1,
            epoch: epoch_of(i as u64 + 1),
            loss: state.losses[i],
            lr: state.lrs[i],
            grad_norm: state.grad_norms[i],
            speed: None,
            eval_loss: state.eval_losses.iter().find(|(s, _)| *s == i as u64 + 1).map(|&(_, l)| l),
        })
        .collect();
    let mut metrics = MetricsFile::create(&opts.metrics_path(), &history)?;
    let mut watch = OverfitWatch::default();
    let mut warnings = Vec::new();
    let bar = progress_bar(total_steps, state.step, opts.progress);

    for step in state.step..total_steps {
        let started = std::time::Instant::now();
        let tokens_before = state.n_tokens;
        let mut batches = Vec::with_capacity(opts.grad_accum);
        for k in 0..opts.grad_accum as u64 {
            let rows = stream.micro_batch(step * opts.grad_accum as u64 + k);
            let refs: Vec<Vec<&Example>> = rows.iter().map(|r| r.iter().map(|&i| &examples[i]).collect()).collect();
            batches.push(if opts.pack {
                (Batch::packed(&refs, pad)?, None)
            } else {
                // One example per row: its frozen blocks' output, when cached.
                let firsts: Vec<usize> = rows.iter().map(|r| r[0]).collect();
                let cached = match &prefix {
                    Some(c) => Some((c.start(), c.batch(&firsts, base.model.device)?)),
                    None => None,
                };
                (Batch::new(&firsts.iter().map(|&i| &examples[i]).collect::<Vec<_>>(), pad)?, cached)
            });
        }
        let n_targets: i64 = batches.iter().map(|(b, _)| b.n_targets).sum();
        zero_grad(&params)?;
        let mut loss = 0.0;
        for (k, (b, cached)) in batches.into_iter().enumerate() {
            // Dropout masks: a function of (seed, step, micro-batch, block).
            let dropout_seed =
                (opts.seed as i64).wrapping_add((step as i64).wrapping_mul(0x9e37_79b9)).wrapping_add((k as i64) << 16);
            loss += micro_batch(&base.model, &lora, &b, n_targets, dropout_seed, opts.grad_checkpoint, cached)?;
            state.n_tokens += b.n_tokens;
        }
        let grad_norm = clip_grad_norm(&params, opts.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            let kept = if ckpt_dir.join(checkpoint::STATE_FILE).is_file() {
                format!("the last good checkpoint is in {}", ckpt_dir.display())
            } else {
                "no checkpoint was written (--checkpoint-every)".into()
            };
            return Err(Error::NonFinite(format!(
                "step {}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; stopped without writing \
                 the adapter ({kept}). Lower --lr, or check the data",
                step + 1
            )));
        }
        let lr = opts.lr * opts.schedule.factor(step, opts.warmup_steps, total_steps);
        opt.step(&params, lr)?;
        state.step = step + 1;
        state.losses.push(loss);
        state.lrs.push(lr);
        state.grad_norms.push(grad_norm);
        let speed = StepSpeed {
            tokens: state.n_tokens - tokens_before,
            response_tokens: n_targets,
            seconds: started.elapsed().as_secs_f64(),
        };
        let eval_loss = if !eval_examples.is_empty() && (state.step % eval_every == 0 || state.step == total_steps) {
            let e = eval_loss(&base.model, &lora, &eval_examples, opts.batch_size, pad, eval_prefix.as_ref())?;
            state.eval_losses.push((state.step, e));
            if let Some(w) = watch.observe(loss, e) {
                bar.suspend(|| log::warn!("{w}"));
                warnings.push(w);
            }
            Some(e)
        } else {
            None
        };
        metrics.write(&StepMetrics {
            step: state.step,
            epoch: epoch_of(state.step),
            loss,
            lr,
            grad_norm,
            speed: Some(speed),
            eval_loss,
        })?;
        bar.set_position(state.step);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {:.0} tok/s", speed.tokens_per_s()));

        let interrupted = opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        let stop = interrupted || opts.stop_after == Some(state.step);
        let last = state.step == total_steps;
        if !last && (stop || opts.checkpoint_every.is_some_and(|k| state.step % k == 0)) {
            save_checkpoint(&state, &opt)?;
        }
        if stop && !last {
            let why = if interrupted { "interrupted" } else { "stopped as asked (--stop-after)" };
            return Err(Error::Interrupted(format!(
                "{why} after step {} of {total_steps}; checkpoint written to {}; continue with --resume {}",
                state.step,
                ckpt_dir.display(),
                ckpt_dir.display()
            )));
        }
    }

    bar.finish_and_clear();
    let curve = opts.metrics_path().with_extension("png");
    let train_points: Vec<(u64, f64)> = state.losses.iter().enumerate().map(|(i, &l)| (i as u64 + 1, l)).collect();
    crate::plot::loss_curve_png(&curve, &train_points, &state.eval_losses)?;
    save_adapter(
        &opts.output,
        &lora,
        &base_name,
        &prov,
        opts.overwrite,
        &[("training_metrics.jsonl", metrics.path()), ("loss_curve.png", &curve)],
    )?;
    Ok(TrainReport {
        losses: state.losses,
        lrs: state.lrs,
        grad_norms: state.grad_norms,
        eval_losses: state.eval_losses,
        warnings,
        n_examples: n,
        n_truncated: data.n_truncated,
        n_dropped: data.n_dropped,
        n_tokens: state.n_tokens,
    })
}

/// Mean loss per response token of `examples` (no dropout, no gradients); `prefix`, when
/// given, is the [`PrefixCache`] of these examples.
pub fn eval_loss(
    model: &BaseModel,
    lora: &LoraSet,
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
        sum += loss_from(model, lora, &b, cached, false)?.f_to_kind(Kind::Double)?.f_double_value(&[])?;
        count += b.n_targets;
    }
    Ok(sum / count.max(1) as f64)
}

/// The [`PrefixCache`] of the `used` `examples` (the `what` examples, for the log) when the
/// options allow one, LoRA leaves blocks frozen at the bottom and the cache fits
/// [`PREFIX_CACHE_MAX_BYTES`].
fn frozen_prefix(
    opts: &TrainOptions,
    model: &BaseModel,
    lora: &LoraSet,
    examples: &[Example],
    used: &[usize],
    pad: i64,
    what: &str,
) -> Result<Option<PrefixCache>> {
    let start = model.first_adapted_block(lora);
    if !opts.prefix_cache || opts.pack || start == 0 || used.is_empty() {
        return Ok(None);
    }
    let mib = PrefixCache::bytes(model, examples, used) as f64 / (1u64 << 20) as f64;
    if mib > (PREFIX_CACHE_MAX_BYTES >> 20) as f64 {
        log::warn!(
            "blocks 0..{start} are frozen, but their output for the {} {what} examples would take {mib:.0} MiB \
             (more than {} MiB): every step runs them",
            used.len(),
            PREFIX_CACHE_MAX_BYTES >> 20
        );
        return Ok(None);
    }
    let started = std::time::Instant::now();
    log::info!("blocks 0..{start} are frozen: computing their output for the {} {what} examples once", used.len());
    let cache = PrefixCache::build(model, lora, examples, used, pad)?;
    log::info!("frozen blocks' output for the {what} examples: {mib:.0} MiB, {:.1} s", started.elapsed().as_secs_f64());
    Ok(cache)
}
