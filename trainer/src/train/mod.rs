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
//!
//! [`train`] prepares a `Run` (base, data, LoRA layers, optimiser, caches, restored state),
//! takes its steps (`Run::step`, then `Run::checkpoint_or_stop`) and finishes it (loss curve,
//! adapter directory). The options are in `train/options.rs`, the micro-batch order in
//! `train/stream.rs`.

use crate::base::Base;
use crate::checkpoint::{self, RunState};
use crate::data::{split_eval, Batch, Dataset, Encoder, EpochPlan, Example};
use crate::error::{Error, Result};
use crate::eval::eval_loss;
use crate::lora::{LoraOptions, LoraSet, LoraSpec};
use crate::loss::{micro_batch, Cached};
use crate::metrics::{progress_bar, MetricsFile, OverfitWatch, StepMetrics, StepSpeed};
use crate::model::{BaseModel, BaseStorage};
use crate::optim::{clip_grad_norm, zero_grad, AdamW};
use crate::prefix::PrefixCache;
use crate::save::{check_output, save_adapter, Provenance};
use indicatif::ProgressBar;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use stream::Stream;
use tch::Tensor;

mod options;
mod stream;

pub use options::{TrainOptions, PREFIX_CACHE_MAX_BYTES};

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

/// Runs in one process share libtorch's global random generator (initialisation, dropout):
/// they take turns, so that each stays a function of its own seed.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Trains an adapter and writes it to `opts.output`.
pub fn train(opts: &TrainOptions) -> Result<TrainReport> {
    let _turn = GENERATOR.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut run = Run::prepare(opts)?;
    for step in run.state.step..run.total_steps {
        run.step(step)?;
        run.checkpoint_or_stop()?;
    }
    run.finish()
}

/// The examples of a run.
struct Examples {
    /// The training data file (its hash, format and counts).
    data: Dataset,
    /// The training examples, then the mixed-in ones (indices `data.examples.len()..`).
    train: Vec<Example>,
    eval: Vec<Example>,
    /// Which examples each epoch takes.
    plan: EpochPlan,
    /// sha256 of the `--mix-data` file.
    mix_sha256: Option<String>,
}

impl Examples {
    /// The training data, the evaluation data (`--eval-data`, or `--eval-split` of the
    /// training data) and the mixed-in data, tokenised by `enc`.
    fn load(opts: &TrainOptions, enc: &Encoder) -> Result<Examples> {
        let data = Dataset::load(&opts.data, opts.format, enc)?;
        let (examples, eval): (Vec<Example>, Vec<Example>) = match (&opts.eval_data, opts.eval_split) {
            (Some(_), Some(_)) => return Err(Error::Input("give --eval-data or --eval-split, not both".into())),
            (Some(path), None) => (data.examples.clone(), Dataset::load(path, Some(data.format), enc)?.examples),
            (None, Some(f)) => split_eval(data.examples.clone(), f, opts.seed)?,
            (None, None) => (data.examples.clone(), Vec::new()),
        };
        // Mixed-in examples follow the training ones: indices n.. of `examples`.
        let (train, plan, mix_sha256) = match &opts.mix_data {
            None => {
                let n = examples.len();
                (examples, EpochPlan::plain(n), None)
            }
            Some(path) => {
                let mix = Dataset::load(path, None, enc)?;
                let plan = EpochPlan::mixed(examples.len(), mix.examples.len(), opts.mix_ratio)?;
                let mut all = examples;
                all.extend(mix.examples);
                (all, plan, Some(mix.sha256))
            }
        };
        Ok(Examples { data, train, eval, plan, mix_sha256 })
    }
}

/// A run between its steps: the base, the examples and their stream, the LoRA layers and
/// their optimiser, and what the run has done so far.
struct Run<'a> {
    opts: &'a TrainOptions,
    base: Base,
    examples: Examples,
    stream: Stream<'a>,
    /// Micro-batches per epoch.
    per_epoch: u64,
    total_steps: u64,
    /// The padding id.
    pad: i64,
    lora: LoraSet,
    /// The LoRA weights, in [`LoraSet::named_parameters`]' order.
    params: Vec<Tensor>,
    opt: AdamW,
    /// The frozen blocks' output for the training and the evaluation examples.
    prefix: Option<PrefixCache>,
    eval_prefix: Option<PrefixCache>,
    prov: Provenance,
    /// What a resumed run must share with the run that wrote the checkpoint.
    agreement: Value,
    base_name: String,
    ckpt_dir: std::path::PathBuf,
    /// Steps done, their losses, learning rates, gradient norms, evaluations and tokens.
    state: RunState,
    eval_every: u64,
    metrics: MetricsFile,
    watch: OverfitWatch,
    warnings: Vec<String>,
    bar: ProgressBar,
}

impl<'a> Run<'a> {
    /// Checks the options and the output, loads base and data, sets up the LoRA layers (fresh,
    /// from `--init-adapter`, or the checkpoint's), the optimiser, the frozen-prefix caches and
    /// the metrics file, and restores the state of a resumed run.
    fn prepare(opts: &'a TrainOptions) -> Result<Run<'a>> {
        opts.check()?;
        check_output(&opts.output, opts.overwrite)?;
        let storage = if opts.qlora { BaseStorage::Nf4 } else { BaseStorage::Float };
        let base = Base::load(&opts.base, storage, opts.device)?;
        let tokenizer = base.runtime.tokenizer()?;
        let enc = Encoder { tokenizer, eos: base.eos(), max_seq_len: opts.max_seq_len };
        let examples = Examples::load(opts, &enc)?;
        let model = &base.model;
        let lora = match &opts.resume {
            Some(dir) => {
                LoraSet::from_adapter(&model.linear_shapes(), model.device, dir, opts.lora.dropout, opts.lora.init)?
            }
            None => initial_lora(model, &opts.lora, opts.seed)?,
        };
        let params: Vec<Tensor> = lora.named_parameters().into_iter().map(|(_, t)| t).collect();
        let mut opt = AdamW::new(opts.adamw.clone(), &params)?;
        let pad = base.eos().unwrap_or(0);

        let lens: Vec<usize> = examples.train.iter().map(|e| e.ids.len()).collect();
        let mut stream = Stream::new(examples.plan.clone(), lens, opts);
        let per_epoch = stream.epoch(0).len() as u64;
        let total_steps = stream.total_steps();
        // The frozen blocks' output for the examples the run will use (with --mix-data, an epoch
        // draws only some of the mixed-in ones).
        let prefix = if opts.prefix_cache && !opts.pack {
            let used = stream.examples_used(total_steps);
            frozen_prefix(opts, model, &lora, &examples.train, &used, pad, "training")?
        } else {
            None
        };
        let all_eval: Vec<usize> = (0..examples.eval.len()).collect();
        let eval_prefix = frozen_prefix(opts, model, &lora, &examples.eval, &all_eval, pad, "evaluation")?;
        let data = &examples.data;
        let prov = Provenance {
            base: base.fingerprint.clone(),
            dataset: json!({
                "sha256": data.sha256,
                "file": opts.data.file_name().map(|f| f.to_string_lossy().into_owned()),
                "version": opts.dataset_version,
                "format": data.format.name(),
                "examples": examples.plan.len(),
                "truncated": data.n_truncated,
            }),
            hyperparameters: opts.hyperparameters(&lora.spec.config, total_steps),
        };
        let agreement = json!({
            "hyperparameters": prov.hyperparameters,
            "dataset_sha256": data.sha256,
            "mix_sha256": examples.mix_sha256,
            "base_model": base.fingerprint.to_json(),
        });
        let state = match &opts.resume {
            Some(dir) => checkpoint::restore(dir, &lora, &mut opt, &agreement)?,
            None => RunState::default(),
        };
        let history: Vec<StepMetrics> = (0..state.step as usize)
            .map(|i| StepMetrics {
                step: i as u64 + 1,
                epoch: epochs_done(opts, per_epoch, i as u64 + 1),
                loss: state.losses[i],
                lr: state.lrs[i],
                grad_norm: state.grad_norms[i],
                speed: None,
                eval_loss: state.eval_losses.iter().find(|(s, _)| *s == i as u64 + 1).map(|&(_, l)| l),
            })
            .collect();
        Ok(Run {
            opts,
            base_name: opts.base.display().to_string(),
            ckpt_dir: opts.checkpoint_path(),
            eval_every: opts.eval_every.unwrap_or((total_steps / 10).max(1)),
            metrics: MetricsFile::create(&opts.metrics_path(), &history)?,
            bar: progress_bar(total_steps, state.step, opts.progress),
            base,
            examples,
            stream,
            per_epoch,
            total_steps,
            pad,
            lora,
            params,
            opt,
            prefix,
            eval_prefix,
            prov,
            agreement,
            state,
            watch: OverfitWatch::default(),
            warnings: Vec::new(),
        })
    }

    /// The `grad_accum` micro-batches of step `step`, each with its frozen blocks' output
    /// when cached.
    fn micro_batches(&mut self, step: u64) -> Result<Vec<(Batch, Cached)>> {
        let (opts, examples) = (self.opts, &self.examples.train);
        let mut batches = Vec::with_capacity(opts.grad_accum);
        for k in 0..opts.grad_accum as u64 {
            let rows = self.stream.micro_batch(step * opts.grad_accum as u64 + k);
            let refs: Vec<Vec<&Example>> = rows.iter().map(|r| r.iter().map(|&i| &examples[i]).collect()).collect();
            batches.push(if opts.pack {
                (Batch::packed(&refs, self.pad)?, None)
            } else {
                // One example per row: its frozen blocks' output, when cached.
                let firsts: Vec<usize> = rows.iter().map(|r| r[0]).collect();
                let cached = match &self.prefix {
                    Some(c) => Some((c.start(), c.batch(&firsts, self.base.model.device)?)),
                    None => None,
                };
                (Batch::new(&firsts.iter().map(|&i| &examples[i]).collect::<Vec<_>>(), self.pad)?, cached)
            });
        }
        Ok(batches)
    }

    /// Optimiser step `step` (from 0): forward and backward of its micro-batches, clipping,
    /// AdamW, the evaluation when one is due, and the step's metrics.
    fn step(&mut self, step: u64) -> Result<()> {
        let opts = self.opts;
        let started = std::time::Instant::now();
        let tokens_before = self.state.n_tokens;
        let batches = self.micro_batches(step)?;
        let n_targets: i64 = batches.iter().map(|(b, _)| b.n_targets).sum();
        zero_grad(&self.params)?;
        let mut loss = 0.0;
        for (k, (b, cached)) in batches.into_iter().enumerate() {
            // Dropout masks: a function of (seed, step, micro-batch, block).
            let dropout_seed =
                (opts.seed as i64).wrapping_add((step as i64).wrapping_mul(0x9e37_79b9)).wrapping_add((k as i64) << 16);
            let model = &self.base.model;
            loss += micro_batch(model, &self.lora, &b, n_targets, dropout_seed, opts.grad_checkpoint, cached)?;
            self.state.n_tokens += b.n_tokens;
        }
        let grad_norm = clip_grad_norm(&self.params, opts.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            let kept = if self.ckpt_dir.join(checkpoint::STATE_FILE).is_file() {
                format!("the last good checkpoint is in {}", self.ckpt_dir.display())
            } else {
                "no checkpoint was written (--checkpoint-every)".into()
            };
            return Err(Error::NonFinite(format!(
                "step {}: the loss ({loss}) or the gradient norm ({grad_norm}) is not finite; stopped without writing \
                 the adapter ({kept}). Lower --lr, or check the data",
                step + 1
            )));
        }
        let lr = opts.lr * opts.schedule.factor(step, opts.warmup_steps, self.total_steps);
        self.opt.step(&self.params, lr)?;
        let state = &mut self.state;
        state.step = step + 1;
        state.losses.push(loss);
        state.lrs.push(lr);
        state.grad_norms.push(grad_norm);
        let speed = StepSpeed {
            tokens: state.n_tokens - tokens_before,
            response_tokens: n_targets,
            seconds: started.elapsed().as_secs_f64(),
        };
        let eval_loss = self.evaluate_if_due(loss)?;
        self.metrics.write(&StepMetrics {
            step: self.state.step,
            epoch: epochs_done(opts, self.per_epoch, self.state.step),
            loss,
            lr,
            grad_norm,
            speed: Some(speed),
            eval_loss,
        })?;
        self.bar.set_position(self.state.step);
        self.bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {:.0} tok/s", speed.tokens_per_s()));
        Ok(())
    }

    /// The eval loss after the step just taken (training loss `loss`), when one is due: every
    /// `eval_every` steps and after the last; recorded, and watched for overfitting.
    fn evaluate_if_due(&mut self, loss: f64) -> Result<Option<f64>> {
        let (step, ex) = (self.state.step, &self.examples.eval);
        if ex.is_empty() || !(step % self.eval_every == 0 || step == self.total_steps) {
            return Ok(None);
        }
        let model = &self.base.model;
        let e = eval_loss(model, Some(&self.lora), ex, self.opts.batch_size, self.pad, self.eval_prefix.as_ref())?;
        self.state.eval_losses.push((step, e));
        if let Some(w) = self.watch.observe(loss, e) {
            self.bar.suspend(|| log::warn!("{w}"));
            self.warnings.push(w);
        }
        Ok(Some(e))
    }

    /// After a step: a checkpoint when one is due or the run stops early (Ctrl-C,
    /// `--stop-after`), and then the stop, as an [`Error::Interrupted`].
    fn checkpoint_or_stop(&self) -> Result<()> {
        let opts = self.opts;
        let step = self.state.step;
        let interrupted = opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
        let stop = interrupted || opts.stop_after == Some(step);
        let last = step == self.total_steps;
        if !last && (stop || opts.checkpoint_every.is_some_and(|k| step.is_multiple_of(k))) {
            let (lora, prov) = (&self.lora, &self.prov);
            checkpoint::save(&self.ckpt_dir, lora, &self.opt, &self.state, &self.agreement, &self.base_name, prov)?;
        }
        if stop && !last {
            let why = if interrupted { "interrupted" } else { "stopped as asked (--stop-after)" };
            return Err(Error::Interrupted(format!(
                "{why} after step {step} of {}; checkpoint written to {}; continue with --resume {}",
                self.total_steps,
                self.ckpt_dir.display(),
                self.ckpt_dir.display()
            )));
        }
        Ok(())
    }

    /// Draws the loss curve and writes the adapter directory (with the metrics and the curve).
    fn finish(self) -> Result<TrainReport> {
        let opts = self.opts;
        self.bar.finish_and_clear();
        let state = self.state;
        let curve = opts.metrics_path().with_extension("png");
        let train_points: Vec<(u64, f64)> = state.losses.iter().enumerate().map(|(i, &l)| (i as u64 + 1, l)).collect();
        crate::plot::loss_curve_png(&curve, &train_points, &state.eval_losses)?;
        save_adapter(
            &opts.output,
            &self.lora,
            &self.base_name,
            &self.prov,
            opts.overwrite,
            &[("training_metrics.jsonl", self.metrics.path()), ("loss_curve.png", &curve)],
        )?;
        let data = &self.examples.data;
        Ok(TrainReport {
            losses: state.losses,
            lrs: state.lrs,
            grad_norms: state.grad_norms,
            eval_losses: state.eval_losses,
            warnings: self.warnings,
            n_examples: self.examples.plan.len(),
            n_truncated: data.n_truncated,
            n_dropped: data.n_dropped,
            n_tokens: state.n_tokens,
        })
    }
}

/// Epochs done after `step` steps (micro-batches over micro-batches per epoch).
fn epochs_done(opts: &TrainOptions, per_epoch: u64, step: u64) -> f64 {
    (step * opts.grad_accum as u64) as f64 / per_epoch as f64
}

/// The LoRA layers a run starts from: `--init-adapter`'s, or fresh ones drawn from `seed`.
pub fn initial_lora(model: &BaseModel, o: &LoraOptions, seed: u64) -> Result<LoraSet> {
    match &o.init_adapter {
        Some(dir) => LoraSet::from_adapter(&model.linear_shapes(), model.device, dir, o.dropout, o.init),
        None => {
            let spec = LoraSpec::from_options(o)?;
            tch::manual_seed(seed as i64);
            LoraSet::init(&model.linear_shapes(), model.device, spec)
        }
    }
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
