//! Errors a user can meet, each worded to say what is wrong and where.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: not a valid safetensors file: {detail}", path.display())]
    Safetensors { path: PathBuf, detail: String },

    #[error("{}: {detail}", path.display())]
    Format { path: PathBuf, detail: String },

    #[error("{}: unsupported: {detail}", path.display())]
    Unsupported { path: PathBuf, detail: String },

    #[error("{what}: shape mismatch: {detail}")]
    Shape { what: String, detail: String },

    #[error("{0}")]
    Invalid(String),

    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn format(path: &Path, detail: impl Into<String>) -> Self {
        Error::Format {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    pub fn unsupported(path: &Path, detail: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            detail: detail.into(),
        }
    }

    /// Exit status for the command line: 2 for usage and I/O problems, 1 for bad content.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { .. } | Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
