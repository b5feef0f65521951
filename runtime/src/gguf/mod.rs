//! GGUF files: parsing, dequantisation and import into a Hugging Face model directory.
//!
//! - [`GgufFile`] ([`file`](mod@file)): the container — header, metadata ([`Value`]) and tensor
//!   infos ([`TensorInfo`]), memory-mapped, every read bounds-checked.
//! - [`quants`]: the ggml tensor types ([`GgmlType`]), the quantised block structs and their
//!   dequantisation to `f32`, bit-exact with ggml's reference routines.
//! - [`import()`]: converts a GGUF model into a Hugging Face directory (`model.safetensors`,
//!   `config.json`, `tokenizer.json`, ...) that the rest of peftrt (and transformers) loads.
//! - [`vocab`]: rebuilds a `tokenizer.json` from the `tokenizer.ggml.*` metadata.
//! - [`write`](mod@write): writes GGUF files (for tests and fuzzing: valid and deliberately hostile ones).
//!
//! ```no_run
//! use peftrt::gguf::{import, DType, GgufFile, ImportOptions};
//! # fn main() -> peftrt::error::Result<()> {
//! let gguf = GgufFile::read("model.gguf")?;
//! println!("{}", gguf.describe());
//! let summary = import("model.gguf".as_ref(), "model-hf".as_ref(), &ImportOptions::new(DType::F32))?;
//! println!("{} tensors written", summary.n_tensors);
//! # Ok(()) }
//! ```

pub mod file;
pub mod import;
pub mod quants;
pub mod vocab;
pub mod write;

pub use file::{GgufFile, TensorInfo, Value, ValueType};
pub use import::{import, DType, ImportOptions, ImportSummary};
pub use quants::{dequantize, GgmlBlock, GgmlType};
