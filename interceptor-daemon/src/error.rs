//! The daemon's error type. Loader errors pass through unchanged (they already name the input
//! and the fix); the daemon adds its config file's and the Kubernetes API's.
use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file error: where it is, which field, what is wrong, what to do.
    #[error("{file}: line {line}, column {column}: {field}: {problem}; {fix}")]
    Config {
        file: PathBuf,
        line: usize,
        column: usize,
        field: String,
        problem: String,
        fix: String,
    },

    #[error("Kubernetes API: {context}: {cause}")]
    Kubernetes { context: String, cause: String },

    #[error("{context}: {cause}")]
    Io { context: String, cause: io::Error },

    #[error(transparent)]
    Loader(#[from] interceptor::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            cause: source,
        }
    }
}
