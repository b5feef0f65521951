//! `trainer`: LoRA / QLoRA fine-tuning of Llama-family models, writing PEFT adapters.

use anyhow::Result;
use clap::{Parser, Subcommand};
use peftrt_trainer::data::Format;
use peftrt_trainer::device::{device_name, parse_device};
use peftrt_trainer::eval::{evaluate, EvalOptions};
use peftrt_trainer::export::{export_trl, Engine};
use peftrt_trainer::lora::{Init, LoraOptions};
use peftrt_trainer::optim::{AdamWConfig, Schedule};
use peftrt_trainer::train::{train, TrainOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "trainer", version, about = "LoRA and QLoRA fine-tuning on libtorch; writes PEFT adapters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// CPU threads for libtorch's intra-op parallelism (default: libtorch's choice, one per
    /// physical core, or OMP_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA (or QLoRA) adapter on a JSONL data set.
    Train(Box<TrainArgs>),
    /// Loss and perplexity on JSONL data; with generation, JSON and schema validity (JSON on stdout).
    Eval(EvalArgs),
    /// Write the training job given by the train options as a TRL SFTTrainer + PEFT script with
    /// accelerate configurations (DDP; DeepSpeed ZeRO-2/3, FSDP), for training past one GPU.
    Export(Box<ExportArgs>),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The engine: trl (TRL's SFTTrainer with PEFT, launched by accelerate).
    #[arg(long)]
    to: String,
    /// Directory for the script, job.json and the accelerate configurations.
    dir: PathBuf,
    #[command(flatten)]
    train: TrainArgs,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Base model: a Hugging Face model directory.
    #[arg(long)]
    base: PathBuf,
    /// A PEFT adapter to apply (none: the base alone).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Evaluation data, JSON Lines (alpaca, chat or completion records).
    #[arg(long)]
    data: PathBuf,
    /// auto | alpaca | chat | completion.
    #[arg(long, default_value = "auto")]
    format: String,
    /// Generate a response to every prompt and report the share that parses as JSON and
    /// satisfies this JSON schema.
    #[arg(long)]
    json_schema: Option<PathBuf>,
    /// Generate responses (implied by --json-schema).
    #[arg(long)]
    generate: bool,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Score on the NF4-quantised base (how a QLoRA adapter was trained).
    #[arg(long)]
    qlora: bool,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Base model: a Hugging Face model directory (config.json, safetensors, tokenizer).
    #[arg(long)]
    base: PathBuf,
    /// Training data, JSON Lines (alpaca, chat or completion records).
    #[arg(long)]
    data: PathBuf,
    /// Output adapter directory (PEFT format); refused if it exists, unless --overwrite.
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    overwrite: bool,
    /// auto | alpaca | chat | completion.
    #[arg(long, default_value = "auto")]
    format: String,
    /// Longer examples are cut to this many tokens (and counted).
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// LoRA alpha (scale alpha/r, or alpha/sqrt(r) with --rslora).
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Dropout on the LoRA input while training.
    #[arg(long, default_value_t = 0.05)]
    dropout: f64,
    /// Modules to adapt: names (q_proj,v_proj), all-linear, or a regex matching whole module names.
    #[arg(long, default_value = "q_proj,v_proj")]
    target: String,
    /// Scale by alpha/sqrt(r) (rank-stabilised LoRA).
    #[arg(long)]
    rslora: bool,
    /// kaiming (A Kaiming-uniform, B zero) | gaussian (A normal with std 1/r, B zero).
    #[arg(long, default_value = "kaiming")]
    init: String,
    /// Adapt only these decoder layers, e.g. 0,1,5.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Start from this PEFT adapter (its adapter_config.json sets r, alpha, rsLoRA, targets
    /// and layers, so those options cannot be given with it).
    #[arg(long, conflicts_with_all = ["r", "alpha", "target", "rslora", "layers"])]
    init_adapter: Option<PathBuf>,
    /// Quantise the frozen base to NF4 (QLoRA).
    #[arg(long)]
    qlora: bool,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Stop after this many optimiser steps (overrides --epochs).
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// cosine | linear | constant (after the warm-up).
    #[arg(long, default_value = "cosine")]
    schedule: String,
    /// AdamW betas, e.g. 0.9,0.999.
    #[arg(long, value_delimiter = ',', default_value = "0.9,0.999")]
    betas: Vec<f64>,
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip the gradient norm to this; 0 disables clipping.
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep the file order instead of shuffling each epoch.
    #[arg(long)]
    no_shuffle: bool,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// A version label for the data set, recorded in the adapter's provenance.
    #[arg(long)]
    dataset_version: Option<String>,
    /// Write a checkpoint (adapter, optimiser state, position) every N steps.
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Checkpoint directory (default: the output path + "-checkpoint").
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Continue from this checkpoint (give the same options as the interrupted run).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this step with a checkpoint, as Ctrl-C does (time-boxed jobs).
    #[arg(long)]
    stop_after: Option<u64>,
    /// Evaluation data (JSONL, same format as --data).
    #[arg(long, conflicts_with = "eval_split")]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data for evaluation, e.g. 0.05.
    #[arg(long)]
    eval_split: Option<f64>,
    /// Evaluate every N steps (default: ten times per run) and after the last.
    #[arg(long)]
    eval_every: Option<u64>,
    /// Metrics JSONL (default: the output path + "-metrics.jsonl").
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// General instruction data (JSONL) mixed into the training stream.
    #[arg(long)]
    mix_data: Option<PathBuf>,
    /// The share of each epoch's examples drawn from --mix-data.
    #[arg(long, default_value_t = 0.1, requires = "mix_data")]
    mix_ratio: f64,
    /// Gradient checkpointing: recompute each block in the backward pass (less memory, ~1/3
    /// more compute).
    #[arg(long)]
    grad_checkpoint: bool,
    /// Pack several examples into each row of --max-seq-len tokens (no attention across
    /// examples); --batch-size then counts rows.
    #[arg(long)]
    pack: bool,
    /// Batch examples of similar length together (shuffled windows sorted by length, then the
    /// batches shuffled): less padding per step.
    #[arg(long)]
    group_by_length: bool,
    /// Run the frozen blocks below the lowest adapted one (see --layers) in every step,
    /// instead of computing their output once per example before training (CPU memory:
    /// hidden size × 4 bytes per token of the data, at most 4 GiB).
    #[arg(long)]
    no_prefix_cache: bool,
}

/// `resolve_device`: check `--device` here (train); an export keeps it as given for the machine
/// that runs the job.
fn train_options(a: TrainArgs, resolve_device: bool) -> Result<TrainOptions> {
    let [beta1, beta2] = a.betas[..] else {
        anyhow::bail!("--betas: expected two numbers, e.g. 0.9,0.999");
    };
    let mut o = TrainOptions::new(a.base, a.data, a.output);
    o.overwrite = a.overwrite;
    o.format = Format::parse(&a.format)?;
    o.max_seq_len = a.max_seq_len;
    o.lora = LoraOptions {
        r: a.r,
        alpha: a.alpha,
        dropout: a.dropout,
        target: a.target,
        rslora: a.rslora,
        init: Init::parse(&a.init)?,
        layers: a.layers,
        init_adapter: a.init_adapter,
    };
    o.qlora = a.qlora;
    o.batch_size = a.batch_size;
    o.grad_accum = a.grad_accum;
    o.epochs = a.epochs;
    o.max_steps = a.max_steps;
    o.lr = a.lr;
    o.warmup_steps = a.warmup_steps;
    o.schedule = Schedule::parse(&a.schedule)?;
    o.adamw = AdamWConfig { beta1, beta2, eps: a.eps, weight_decay: a.weight_decay };
    o.max_grad_norm = (a.max_grad_norm > 0.0).then_some(a.max_grad_norm);
    o.seed = a.seed;
    o.shuffle = !a.no_shuffle;
    if resolve_device {
        o.device = parse_device(&a.device)?;
    }
    o.dataset_version = a.dataset_version;
    o.checkpoint_every = a.checkpoint_every;
    o.checkpoint_dir = a.checkpoint_dir;
    o.resume = a.resume;
    o.stop_after = a.stop_after;
    o.eval_data = a.eval_data;
    o.eval_split = a.eval_split;
    o.eval_every = a.eval_every;
    o.metrics = a.metrics;
    o.progress = !a.quiet;
    o.mix_data = a.mix_data;
    o.mix_ratio = a.mix_ratio;
    o.grad_checkpoint = a.grad_checkpoint;
    o.pack = a.pack;
    o.group_by_length = a.group_by_length;
    o.prefix_cache = !a.no_prefix_cache;
    Ok(o)
}

fn eval_options(a: EvalArgs) -> Result<EvalOptions> {
    let mut o = EvalOptions::new(a.base, a.data);
    o.adapter = a.adapter;
    o.format = Format::parse(&a.format)?;
    o.json_schema = a.json_schema;
    o.generate = a.generate;
    o.max_new_tokens = a.max_new_tokens;
    o.max_seq_len = a.max_seq_len;
    o.batch_size = a.batch_size;
    o.qlora = a.qlora;
    o.device = parse_device(&a.device)?;
    Ok(o)
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        tch::set_num_threads(i32::try_from(n)?);
    }
    match cli.command {
        Command::Eval(args) => {
            let r = evaluate(&eval_options(args)?)?;
            println!("{}", serde_json::to_string_pretty(&r.to_json())?);
        }
        Command::Export(args) => {
            let ExportArgs { to, dir, train } = *args;
            let Engine::Trl = Engine::parse(&to)?;
            let device = train.device.clone();
            let opts = train_options(train, false)?;
            for p in export_trl(&opts, &device, &dir)? {
                println!("{}", p.display());
            }
            eprintln!(
                "run it: python {0}/train_trl.py, or accelerate launch --config_file {0}/accelerate_config.yaml {0}/train_trl.py",
                dir.display()
            );
        }
        Command::Train(args) => {
            let mut opts = train_options(*args, true)?;
            // Ctrl-C: finish the step, write a checkpoint, stop; a second Ctrl-C exits at once.
            let flag = Arc::new(AtomicBool::new(false));
            let handler_flag = flag.clone();
            ctrlc::set_handler(move || {
                if handler_flag.swap(true, Ordering::SeqCst) {
                    eprintln!("\ninterrupted again: exiting without a checkpoint");
                    std::process::exit(130);
                }
                eprintln!("\ninterrupt: stopping after this step with a checkpoint (Ctrl-C again to quit now)");
            })?;
            opts.interrupt = Some(flag);
            eprintln!("training on {}, {} CPU threads", device_name(opts.device), tch::get_num_threads());
            let r = train(&opts)?;
            if let (Some(first), Some(last)) = (r.losses.first(), r.losses.last()) {
                eprintln!("{} steps: loss {first:.4} → {last:.4}", r.losses.len());
            }
            if let Some((step, e)) = r.eval_losses.last() {
                eprintln!("eval loss {e:.4} (perplexity {:.2}) after step {step}", e.exp());
            }
            eprintln!("metrics: {}", opts.metrics_path().display());
            eprintln!(
                "{} examples ({} truncated to --max-seq-len, {} dropped), {} tokens; adapter written to {}",
                r.n_examples,
                r.n_truncated,
                r.n_dropped,
                r.n_tokens,
                opts.output.display()
            );
        }
    }
    Ok(())
}
