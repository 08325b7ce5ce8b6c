//! The one library error type. Every variant says where (file, field, tensor) and what was expected.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the library, with enough context to fix the input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {err}", .path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: field `{field}`: {reason}", .path.display())]
    Config { path: PathBuf, field: String, reason: String },
    #[error("{}: {reason}", .path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: tensor `{name}` is missing (expected shape {expected:?})", .path.display())]
    MissingTensor { path: PathBuf, name: String, expected: Vec<usize> },
    #[error("{}: tensor `{name}` has shape {got:?}, expected {expected:?}", .path.display())]
    TensorShape { path: PathBuf, name: String, expected: Vec<usize>, got: Vec<usize> },
    #[error("{}: tensor `{name}` has dtype {got}, expected one of bf16, f16, f32, or FP8 e4m3 with block scales", .path.display())]
    TensorDtype { path: PathBuf, name: String, got: String },
    #[error("tensor `{name}` is stored in both {} and {}; a checkpoint must hold each tensor once", .first.display(), .second.display())]
    DuplicateTensor { name: String, first: PathBuf, second: PathBuf },
    #[error("{}: {reason}", .path.display())]
    Gguf { path: PathBuf, reason: String },
    #[error("{}: {reason}", .path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt has {n_tokens} tokens but the context holds {max} (max_position_embeddings)")]
    PromptTooLong { n_tokens: usize, max: usize },
    #[error("{0}")]
    InvalidArgument(String),
    /// A failure of latent itself, not of what it was given (a kernel met a layout it does not
    /// take, a tensor op failed).
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Whose fault an [`Error`] is: what a server answers it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request: a bad parameter or token, a prompt longer than the context (HTTP 400).
    Request,
    /// The files a model or tokenizer was loaded from, or a file a command was given.
    Input,
    /// latent itself (HTTP 500).
    Internal,
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whose fault this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument(_) | Error::PromptTooLong { .. } | Error::Template(_) => ErrorKind::Request,
            Error::Internal(_) | Error::Tensor(_) => ErrorKind::Internal,
            Error::Io { .. }
            | Error::Config { .. }
            | Error::Safetensors { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::TensorDtype { .. }
            | Error::DuplicateTensor { .. }
            | Error::Gguf { .. }
            | Error::Tokenizer { .. } => ErrorKind::Input,
        }
    }

    /// A failure of latent itself ([`ErrorKind::Internal`]).
    pub fn internal(reason: impl Into<String>) -> Self {
        Error::Internal(reason.into())
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), err: source }
    }

    /// A config error on `field` of the file at `path`.
    pub fn config(path: &Path, field: &str, reason: impl Into<String>) -> Self {
        Error::Config { path: path.to_path_buf(), field: field.to_string(), reason: reason.into() }
    }

    /// A malformed or unsupported GGUF file.
    pub fn gguf(path: &Path, reason: impl Into<String>) -> Self {
        Error::Gguf { path: path.to_path_buf(), reason: reason.into() }
    }

    /// A malformed safetensors file or index.
    pub fn safetensors(path: &Path, reason: impl Into<String>) -> Self {
        Error::Safetensors { path: path.to_path_buf(), reason: reason.into() }
    }
}
