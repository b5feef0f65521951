//! `trainer export --to trl`: the same training job for the engines that run past one machine.
//!
//! From the options of `trainer train`, writes a directory with a TRL `SFTTrainer` + PEFT
//! `LoraConfig` script (`train_trl.py`, [`SCRIPT`]), the job it runs (`job.json`: paths, LoRA
//! configuration, schedule, seed, and the provenance the trainer would record — the base-model
//! fingerprint that the runtime checks, computed here), and `accelerate` configurations: DDP
//! (`accelerate_config.yaml`, the default), DeepSpeed ZeRO-2 and ZeRO-3 and FSDP. The script
//! tokenises the JSONL data as [`crate::data`] does (same chat template, prompt/response split,
//! response-only labels, EOS, truncation), so the two engines train on the same tokens; its
//! adapter directory has the trainer's provenance fields and loads in `peftrt`.
//! `trainer/tests/export.rs` runs the script on CPU against the trainer. Issue #24.

use crate::error::{Error, Result};
use crate::lora::LoraSpec;
use crate::save::trainer_version;
use crate::train::TrainOptions;
use peftrt::adapter::{AdapterConfig, AdapterFile, BaseFingerprint, Targets};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The exported training script (a real Python file in the crate, `src/export/train_trl.py`).
pub const SCRIPT: &str = include_str!("export/train_trl.py");
/// The DDP `accelerate` configuration (the default).
pub const ACCELERATE_DDP: &str = include_str!("export/accelerate_config.yaml");
pub const ACCELERATE_ZERO2: &str = include_str!("export/accelerate_deepspeed_zero2.yaml");
pub const ACCELERATE_ZERO3: &str = include_str!("export/accelerate_deepspeed_zero3.yaml");
pub const ACCELERATE_FSDP: &str = include_str!("export/accelerate_fsdp.yaml");
pub const README: &str = include_str!("export/README.md");

/// An engine `trainer export` writes a job for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// TRL's `SFTTrainer` with PEFT, launched by `accelerate`.
    Trl,
}

impl Engine {
    pub fn parse(s: &str) -> Result<Engine> {
        match s {
            "trl" => Ok(Engine::Trl),
            other => Err(Error::Input(format!("--to {other}: the one engine supported is trl"))),
        }
    }
}

/// Options of a training run that the exported job cannot reproduce, and why.
fn unsupported(opts: &TrainOptions) -> Option<&'static str> {
    if opts.pack {
        Some("--pack: TRL packs with its own strategy (bfd, padding-free), whose rows differ from the trainer's; export without it")
    } else if opts.mix_data.is_some() {
        Some("--mix-data: the trainer draws the mixed-in examples per epoch with its own generator; concatenate the files and export without it")
    } else if opts.resume.is_some() || opts.stop_after.is_some() {
        Some("--resume / --stop-after: a trainer checkpoint does not continue in TRL; export the job from the start")
    } else {
        None
    }
}

/// PEFT's `target_modules` for a configuration. `all-linear` becomes the module names of the
/// base's linear layers but the output head, as the trainer writes them (PEFT refuses the
/// string `all-linear` together with `layers_to_transform`).
fn peft_targets(t: &Targets, model: &peftrt::Model) -> Value {
    match t {
        Targets::List(names) => json!(names),
        Targets::Regex(_) => json!(t.to_string()),
        Targets::AllLinear | Targets::Unspecified => {
            let mut names: Vec<&str> = model
                .linears()
                .map(|l| l.name.rsplit('.').next().unwrap_or(&l.name))
                .filter(|n| *n != "lm_head")
                .collect();
            names.sort();
            names.dedup();
            json!(names)
        }
    }
}

/// Writes the TRL job for `opts` into `out` (created; an existing non-empty directory is
/// refused unless `opts.overwrite`). `device` is the `--device` string as given (`auto`, `cpu`,
/// `cuda`, `cuda:N`): the job runs where it is launched, not where it was exported. Returns the
/// files written.
pub fn export_trl(opts: &TrainOptions, device: &str, out: &Path) -> Result<Vec<PathBuf>> {
    opts.check()?;
    if let Some(why) = unsupported(opts) {
        return Err(Error::Input(format!("trainer export --to trl: {why}")));
    }
    let nonempty = std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false);
    if nonempty && !opts.overwrite {
        return Err(Error::Input(format!(
            "{}: exists and is not empty; choose another directory or pass --overwrite",
            out.display()
        )));
    }
    let model = peftrt::Model::load(&opts.base, &peftrt::LoadOptions::default())?;
    let fingerprint = BaseFingerprint::of(&model);
    let eos = model.config.eos_token_ids.first().copied();
    let config: AdapterConfig = match &opts.lora.init_adapter {
        Some(dir) => AdapterFile::open(dir)?.config,
        None => LoraSpec::from_options(&opts.lora)?.config,
    };
    let mut hyper = opts.hyperparameters(&config, opts.max_steps.unwrap_or(0));
    hyper["steps"] = Value::Null; // the script records the steps it ran
                                  // Absolute, so the script runs from any directory (its --base/--data/--output override them
                                  // on another machine).
    let path = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string();
    let lora = json!({
        "r": config.r,
        // An integer when it is one, as PEFT types it (and the trainer writes it).
        "lora_alpha": if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e9 { json!(config.alpha as i64) } else { json!(config.alpha) },
        "lora_dropout": opts.lora.dropout,
        "target_modules": peft_targets(&config.target_modules, &model),
        "use_rslora": config.rslora,
        "init_lora_weights": opts.lora.init.peft_value(),
        "layers_to_transform": config.layers,
        "rank_pattern": config.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "alpha_pattern": config.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    let job = json!({
        "exported_by": trainer_version(),
        "base": path(&opts.base),
        "data": path(&opts.data),
        "output": path(&opts.output),
        "overwrite": opts.overwrite,
        "format": opts.format.map(|f| f.name()).unwrap_or("auto"),
        "max_seq_len": opts.max_seq_len,
        "eos_id": eos,
        "lora": lora,
        "init_adapter": opts.lora.init_adapter.as_deref().map(path),
        "qlora": opts.qlora,
        "batch_size": opts.batch_size,
        "grad_accum": opts.grad_accum,
        "epochs": opts.epochs,
        "max_steps": opts.max_steps,
        "lr": opts.lr,
        "warmup_steps": opts.warmup_steps,
        "schedule": opts.schedule.name(),
        "betas": [opts.adamw.beta1, opts.adamw.beta2],
        "eps": opts.adamw.eps,
        "weight_decay": opts.adamw.weight_decay,
        "max_grad_norm": opts.max_grad_norm,
        "seed": opts.seed,
        "shuffle": opts.shuffle,
        "group_by_length": opts.group_by_length,
        "grad_checkpoint": opts.grad_checkpoint,
        "device": device,
        "dataset_version": opts.dataset_version,
        "checkpoint_every": opts.checkpoint_every,
        "checkpoint_dir": path(&opts.checkpoint_path()),
        "eval_data": opts.eval_data.as_deref().map(path),
        "eval_split": opts.eval_split,
        "eval_every": opts.eval_every,
        "metrics": path(&opts.metrics_path()),
        "provenance": {
            "base_model": fingerprint.to_json(),
            "base_model_name_or_path": opts.base.display().to_string(),
            "hyperparameters": hyper,
        },
    });
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let job_text = serde_json::to_string_pretty(&job).map_err(|e| Error::Input(e.to_string()))? + "\n";
    let files: [(&str, &str); 7] = [
        ("train_trl.py", SCRIPT),
        ("job.json", &job_text),
        ("accelerate_config.yaml", ACCELERATE_DDP),
        ("accelerate_deepspeed_zero2.yaml", ACCELERATE_ZERO2),
        ("accelerate_deepspeed_zero3.yaml", ACCELERATE_ZERO3),
        ("accelerate_fsdp.yaml", ACCELERATE_FSDP),
        ("README.md", README),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
        written.push(p);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = out.join("train_trl.py");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).map_err(|e| Error::io(&p, e))?;
    }
    Ok(written)
}
