//! The trainer's error type. Every variant names what was wrong (file, line, field, option) and,
//! where there is one, what to do about it.

use std::path::PathBuf;

/// Errors from loading, training and saving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the runtime: config, tokenizer, chat template, safetensors, adapter files.
    #[error(transparent)]
    Runtime(#[from] peftrt::Error),

    /// From libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),

    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A training or evaluation data file is malformed (`line` is 1-based; `None` for the
    /// file as a whole).
    #[error("{}{}: {msg}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data { path: PathBuf, line: Option<usize>, msg: String },

    /// An invalid option or combination of options.
    #[error("{0}")]
    Input(String),

    /// The loss or a gradient became NaN or infinite.
    #[error("{0}")]
    NonFinite(String),

    /// Training was interrupted (Ctrl-C); a checkpoint was written where possible.
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn data(path: impl Into<PathBuf>, line: Option<usize>, msg: impl Into<String>) -> Self {
        Error::Data { path: path.into(), line, msg: msg.into() }
    }
}
