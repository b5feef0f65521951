//! The library's error type. Every variant names what was wrong (file, tensor, key, line)
//! and, where there is one, what to do about it.
//!
//! Which variant a loader returns follows one rule (the C API's status codes are this rule):
//! - [`Error::Io`]: the OS could not open or read a file or directory: it is missing
//!   (including a required file of a model or adapter directory), unreadable, or not a
//!   directory where one is needed.
//! - [`Error::Format`], [`Error::Config`], [`Error::Tensor`]: a file was read but its content is
//!   malformed: invalid JSON, a wrong type or out-of-range value, a truncated or lying
//!   safetensors header, a missing tensor, shapes that disagree with `config.json`.
//! - [`Error::Unsupported`]: well-formed input that uses a feature peftrt does not run (another
//!   architecture, rope type, quantisation method, PEFT method or option, tensor dtype, or an
//!   adapter only in the pickle format).

use std::path::PathBuf;

/// Errors from loading, importing and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are malformed (truncated, lying header, bad JSON...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// `config.json` (or GGUF metadata) lacks a key or has a value we cannot use.
    #[error("{path}: key `{key}`: {msg}")]
    Config { path: PathBuf, key: String, msg: String },

    /// A tensor is missing, has the wrong shape or an unsupported dtype.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    /// A feature of the input that this version does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// Tokenizer or chat-template failure.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A JSON schema, regular expression or grammar that cannot constrain decoding: the
    /// compiler's message, with the keyword or position it stopped at.
    #[error("constraint: {0}")]
    Constraint(String),

    /// Invalid request: empty prompt, invalid UTF-8, bad sampling parameters.
    #[error("{0}")]
    Input(String),

    /// The forward pass produced NaN or infinite values (corrupt weights, an extreme adapter
    /// scale): reported instead of sampling garbage.
    #[error("non-finite output: {0}")]
    NonFinite(String),

    /// The tokens to evaluate do not fit in the session's context.
    #[error(
        "context overflow: {cached} cached + {new} new tokens exceed the context of {n_ctx} tokens \
         (shorten the prompt, lower --max-tokens, or raise the context size)"
    )]
    ContextFull { cached: usize, new: usize, n_ctx: usize },

    /// An allocation sized by the input (a session's KV cache for a long context) failed.
    #[error("out of memory: cannot allocate {what} ({bytes} bytes); ask for a shorter context (n_ctx / --ctx-size)")]
    OutOfMemory { what: String, bytes: u64 },

    /// An adapter that does not fit the model it is loaded for: made for another base model
    /// (its recorded fingerprint or `base_model_name_or_path`), another architecture, or with
    /// other shapes. `overridable` names the option that would load it anyway, if there is
    /// one; the message ends with that option's CLI and Rust spelling, and front ends with
    /// other spellings (the C API) build their own message from `msg` and `overridable`.
    #[error("{msg}{}", .overridable.map_or(String::new(), |o| format!("; {}", o.hint())))]
    AdapterMismatch { msg: String, overridable: Option<MismatchOverride> },

    /// A session's cancel flag was set ([`crate::Session::set_cancel_flag`]) while it evaluated.
    #[error(
        "cancelled: a cancel request stopped the evaluation; the session keeps the tokens evaluated before the call"
    )]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The option that loads an adapter despite an [`Error::AdapterMismatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MismatchOverride {
    /// `AdapterOptions::allow_base_mismatch` (CLI `--allow-base-mismatch`).
    AllowBaseMismatch,
    /// Leaving `AdapterOptions::strict_base` unset (CLI: without `--strict-base`).
    NotStrictBase,
}

impl MismatchOverride {
    /// What to do, in the CLI's and the Rust API's words.
    pub fn hint(self) -> &'static str {
        match self {
            MismatchOverride::AllowBaseMismatch => {
                "load it on its own base, or allow the mismatch explicitly \
                 (--allow-base-mismatch; AdapterOptions::allow_base_mismatch)"
            }
            MismatchOverride::NotStrictBase => {
                "load it on the model it names, or leave the strict check off \
                 (without --strict-base; AdapterOptions::strict_base)"
            }
        }
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
    pub fn config(path: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.into(), key: key.into(), msg: msg.into() }
    }
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { name: name.into(), msg: msg.into() }
    }
    /// A required file or directory that is not there: an [`Error::Io`] (`NotFound`) with
    /// `msg` as its cause.
    pub fn missing(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, msg.into()))
    }
    /// A path that must be a directory and is not: an [`Error::Io`] (`NotADirectory`).
    pub fn not_a_directory(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::io(path, std::io::Error::new(std::io::ErrorKind::NotADirectory, msg.into()))
    }
    /// A well-formed config value naming a feature peftrt does not run.
    pub fn unsupported_key(path: impl Into<PathBuf>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        let (path, key, msg) = (path.into(), key.into(), msg.into());
        Error::Unsupported(format!("{}: key `{key}`: {msg}", path.display()))
    }
    /// A well-formed tensor that peftrt cannot use (its dtype, or what it adapts).
    pub fn unsupported_tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Unsupported(format!("tensor `{}`: {}", name.into(), msg.into()))
    }
    /// An allocation of `count` elements of `T` for `what`, failed or impossible.
    pub fn out_of_memory<T>(what: impl Into<String>, count: usize) -> Self {
        let bytes = (count as u64).saturating_mul(std::mem::size_of::<T>() as u64);
        Error::OutOfMemory { what: what.into(), bytes }
    }
}
