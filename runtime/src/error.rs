//! The library's error type. Every variant names what was wrong (file, tensor, key, line)
//! and, where there is one, what to do about it.

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

    /// Invalid request: empty prompt, context overflow, invalid UTF-8, bad sampling parameters.
    #[error("{0}")]
    Input(String),

    /// The forward pass produced NaN or infinite values (corrupt weights, an extreme adapter
    /// scale): reported instead of sampling garbage.
    #[error("non-finite output: {0}")]
    NonFinite(String),

    /// A session's cancel flag was set ([`crate::Session::set_cancel_flag`]) while it evaluated.
    #[error(
        "cancelled: a cancel request stopped the evaluation; the session keeps the tokens evaluated before the call"
    )]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
}
