//! # peftrt-trainer — LoRA and QLoRA fine-tuning on libtorch, writing PEFT adapters
//!
//! The main types and how they fit:
//! - [`base::Base`]: a loaded base model: the runtime's ([`peftrt::Model`]: tokenizer, chat
//!   template, generation) and [`model::BaseModel`], the frozen Llama/Mistral/Qwen2 base in
//!   libtorch copied from it; f32, or NF4 codes for QLoRA. A forward pass runs with a
//!   [`model::Pass`]: the LoRA layers (or none), training or not, the dropout seed.
//! - [`lora::LoraSet`]: the trainable LoRA layers (PEFT's configuration, initialisation and key
//!   names), in their own variable store, attached to the base's layers by their
//!   [`lora::LinearShape`]; every projection adds them in [`model::BaseModel::project`].
//! - [`data::Dataset`]: JSONL examples (alpaca, chat, completion) tokenised with the runtime's
//!   tokenizer and chat template, with response-only labels; [`data::Batch`] pads them.
//! - [`loss`]: the loss on response tokens, one micro-batch's forward and backward.
//! - [`optim`]: AdamW, warm-up schedules and gradient clipping as PyTorch computes them.
//! - [`train::train`]: the loop; [`prefix::PrefixCache`]: the output of the frozen blocks
//!   below the lowest adapted one, computed once per example; [`checkpoint`]: resumable state;
//!   [`metrics`]: the metrics JSONL, progress bar and overfitting warning; [`save`]: the PEFT
//!   adapter directory with provenance.
//! - [`eval::evaluate`]: loss, perplexity and JSON/schema validity of generated responses.
//! - [`export::export_trl`]: the same job as a TRL + PEFT script with `accelerate`
//!   configurations (DDP, DeepSpeed ZeRO, FSDP), for training past one GPU.
//!
//! ```no_run
//! use peftrt_trainer::train::{train, TrainOptions};
//!
//! let mut opts = TrainOptions::new("models/smollm2-135m-instruct".into(), "data.jsonl".into(), "out/adapter".into());
//! opts.max_steps = Some(10);
//! let report = train(&opts)?;
//! println!("final loss {:.4}", report.losses.last().unwrap());
//! # Ok::<(), peftrt_trainer::Error>(())
//! ```

pub mod base;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dropout;
pub mod error;
pub mod eval;
pub mod export;
pub mod fused;
pub mod lora;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod prefix;
pub mod save;
pub mod train;

pub use error::{Error, Result};
