//! The options of a training run, their defaults and checks, and the hyper-parameters a run
//! records in its provenance.

use crate::data::Format;
use crate::error::{Error, Result};
use crate::lora::LoraOptions;
use crate::optim::{AdamWConfig, Schedule};
use peftrt::adapter::AdapterConfig;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tch::Device;

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
    /// Batch rows of similar length together (less padding; see [`crate::data::group_by_length`]).
    pub group_by_length: bool,
    /// When LoRA adapts only upper blocks, compute the frozen blocks below once per example
    /// ([`crate::prefix::PrefixCache`]; not with packing, and only up to [`PREFIX_CACHE_MAX_BYTES`]).
    pub prefix_cache: bool,
}

/// The largest [`crate::prefix::PrefixCache`] a run keeps (CPU memory); above it the frozen blocks run in
/// every step, as without the cache.
pub const PREFIX_CACHE_MAX_BYTES: u64 = 4 << 30;

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

    pub(crate) fn check(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::Input("--batch-size and --grad-accum must be at least 1".into()));
        }
        if self.checkpoint_every == Some(0) || self.stop_after == Some(0) {
            return Err(Error::Input("--checkpoint-every and --stop-after count steps: at least 1".into()));
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

    /// The hyper-parameters recorded in the provenance (`c`: the LoRA configuration the run
    /// trains, from the options or `--init-adapter`). `trainer export` records the same.
    pub(crate) fn hyperparameters(&self, c: &AdapterConfig, steps: u64) -> serde_json::Value {
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
