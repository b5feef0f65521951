//! # peftrt — fast CPU inference for Llama-family models with LoRA adapters
//!
//! The main types:
//! - [`Model`]: an immutable, shareable model — configuration ([`ModelConfig`]),
//!   memory-mapped weights ([`weights::Weights`]) and tokenizer ([`Tokenizer`]).
//! - [`Session`]: per-conversation mutable state — KV cache, scratch buffers, sampler.
//!   Many sessions may share one model across threads.
//! - [`kernels`]: the numeric kernels, each with a scalar reference and SIMD versions.
//! - [`gguf`]: reading GGUF files and importing them as Hugging Face model directories.

pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod sampler;
pub mod session;
pub mod threadpool;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use generate::{generate, Generation, StopReason};
pub use model::{LoadOptions, Model};
pub use sampler::{Sampler, SamplingParams};
pub use session::{Session, SessionOptions};
pub use tokenizer::{Message, Tokenizer};
