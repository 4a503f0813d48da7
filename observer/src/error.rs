//! How errors are shown. Each error says what was being done and on what; its cause is
//! its `source()`, never repeated in its message, so the whole story is the chain walked.
use std::{error::Error, fmt, io, path::PathBuf};

/// Displays an error and its causes, `: `-separated: `reading config file x.toml: No such
/// file or directory (os error 2)`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

/// An I/O operation on a path that failed: the operation and the path; the cause is its
/// source. The one shape of every "doing X on file Y failed" error, agent and tests alike.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}")]
pub struct PathIoError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl PathIoError {
    /// For `map_err`: the failure of `op` on `path`.
    pub fn at(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| PathIoError { op, path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading config file {path}")]
    struct Read {
        path: &'static str,
        source: io::Error,
    }

    #[test]
    fn the_chain_names_each_cause_once() {
        let error = Read {
            path: "x.toml",
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(
            Chain(&error).to_string(),
            "reading config file x.toml: no such file"
        );
    }
}
