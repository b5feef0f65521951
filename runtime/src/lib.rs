//! # peftrt — fast CPU inference for Llama-family models with LoRA adapters
//!
//! The main types:
//! - [`Model`]: an immutable, shareable model — configuration ([`ModelConfig`]),
//!   memory-mapped weights ([`weights::WeightStore`]) and tokenizer ([`Tokenizer`]).
//! - [`Session`]: per-conversation mutable state — KV cache, activation buffers, thread pool.
//!   Many sessions may share one model across threads.
//! - [`Sampler`] and [`generate()`]: choosing tokens and the streaming generation loop.
//! - [`kernels`]: the numeric kernels, each with a scalar reference and SIMD versions.
//! - [`gguf`]: reading GGUF files and importing them as Hugging Face model directories.
//! - [`output`] and [`fsutil`]: writing outputs atomically (never replacing what a run did not
//!   create) and reading inputs defensively (regular files only, size-capped).
//! - [`batch`]: the `peftrt batch` JSON Lines request format.
//! - [`json`]: what counts as a valid JSON reply, and the JSON Schema check (one rule for
//!   `trainer eval`, `peftrt eval-json` and the demo's report).
//!
//! ```no_run
//! use peftrt::{generate, LoadOptions, Message, Model, Sampler, SamplingParams, Session, SessionOptions};
//! use std::sync::Arc;
//!
//! let model = Arc::new(Model::load("models/smollm2-135m-instruct".as_ref(), &LoadOptions::default())?);
//! let tok = model.tokenizer()?;
//! let prompt = tok.apply_chat_template(&[Message::new("user", "Name three colours.")], true)?;
//! let tokens = tok.encode(&prompt, false)?;
//! let mut session = Session::new(model.clone(), &SessionOptions::default())?;
//! let mut sampler = Sampler::new(SamplingParams { max_tokens: 32, ..Default::default() }, model.config.vocab_size)?;
//! let reply = generate(&mut session, &tokens, &mut sampler, |text| {
//!     print!("{text}");
//!     true // keep going
//! })?;
//! eprintln!("{:.1} tokens/s", reply.decode_tok_s());
//! # Ok::<(), peftrt::Error>(())
//! ```
//!
//! ## Memory-mapped files
//!
//! Weights are not read into memory: [`Model::load`] and [`Adapter::load`] map the safetensors
//! files ([`weights::WeightStore`], with `memmap2`) and the kernels read tensors in place;
//! [`gguf::import()`] and `peftrt inspect` map the GGUF file ([`gguf::GgufFile::open`]). A
//! memory map is `unsafe` to create because the bytes can change under the program: Rust
//! assumes a `&[u8]` never changes while it is borrowed, and the operating system only keeps a
//! mapping's pages as long as the file still holds them. These functions are safe to call all
//! the same, on one assumption, stated here as ripgrep and candle state theirs:
//!
//! **a mapped file is not modified or truncated, by this or any other process, while it is
//! mapped** (for a model or adapter, as long as the [`Model`] or [`Adapter`] lives; for an
//! import, until it returns).
//!
//! If it is, the behaviour is undefined: in practice results computed from whatever bytes the
//! file then holds, or the process killed by `SIGBUS` when it touches a page that truncation
//! removed. Headers are validated once, at load, and not again.
//!
//! What to do: never overwrite a model or adapter file in place (`cp new old`, or a tool that
//! truncates and rewrites) while a process serves it. Write the new version elsewhere and
//! rename it over the old path, or delete the old file first: a running reader keeps the file it
//! mapped (the old inode) until it drops it. peftrt's own writers ([`output`]: `import`,
//! `merge`, `quantize`, `batch`, `score`, and the trainer's adapters) write to a temporary and
//! rename it into place, which is safe for running readers. Where a file might change,
//! [`gguf::GgufFile::read`] reads a GGUF file into memory instead.

pub mod adapter;
mod attention;
pub mod batch;
pub mod config;
pub mod constraint;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod json;
pub mod kernels;
mod kv_cache;
pub mod merge;
pub mod model;
pub mod nf4;
pub mod output;
pub mod perplexity;
pub mod quantize;
pub mod sampler;
pub mod session;
pub mod threadpool;
pub mod tokenizer;
pub mod weights;

pub use adapter::Adapter;
pub use config::ModelConfig;
pub use engine::{Engine, EngineOptions, Event, Request, RequestId};
pub use error::{Error, Result};
pub use generate::{generate, Generation, StopReason};
pub use model::{LoadOptions, Model};
pub use sampler::{Sampler, SamplingParams};
pub use session::{Session, SessionOptions};
pub use tokenizer::{Message, Tokenizer};
