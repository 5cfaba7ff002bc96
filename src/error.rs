//! The library's error type. Every variant says what went wrong and, where it can, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file {path} is not a valid E5S1 container: {reason}")]
    ModelFormat { path: PathBuf, reason: String },
    #[error("model files are missing from {home}: {what}. Run `{fetch}` first")]
    ModelMissing {
        home: PathBuf,
        what: String,
        /// The command that fetches them, e.g. `guardian models fetch`.
        fetch: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("model fetch: {0}")]
    Fetch(String),
    #[error("heads: {0}")]
    Heads(String),
    #[error("the inference engine has stopped; no more queries can be screened")]
    EngineClosed,
    #[error("training data: {0}")]
    Data(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("serve: {0}")]
    Serve(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
