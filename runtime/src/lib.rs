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

pub mod adapter;
pub mod batch;
pub mod config;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod kernels;
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
pub use error::{Error, Result};
pub use generate::{generate, Generation, StopReason};
pub use model::{LoadOptions, Model};
pub use sampler::{Sampler, SamplingParams};
pub use session::{Session, SessionOptions};
pub use tokenizer::{Message, Tokenizer};
