//! The testbed's one error type: every variant says what was being done and on what.
use std::{io, path::PathBuf, process::ExitStatus, time::Duration};

use observer::error::{Chain, PathIoError};

#[derive(thiserror::Error)]
pub enum TestbedError {
    #[error(
        "the testbed builds network namespaces and cgroups and must run as root (effective uid {euid}); run the privileged tests as root, e.g. `cargo xtask test` from a root shell"
    )]
    NotRoot { euid: u32 },
    #[error(
        "`{program}` not found: install the Debian package `{package}` (`cargo xtask setup` does)"
    )]
    MissingProgram {
        program: &'static str,
        package: &'static str,
    },
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("starting {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("no cgroup2 mount found in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("in network namespace {netns}: {op}")]
    Netns {
        netns: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("address plan exhausted: no free {what} address")]
    AddressesExhausted { what: &'static str },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("{what}: unexpected output {output:?}")]
    UnexpectedOutput { what: String, output: String },
}

/// Tests `.expect()` testbed results, which prints Debug: make that the readable message,
/// the error and its causes (each says its part once; see `observer::error::Chain`).
impl std::fmt::Debug for TestbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", Chain(self))
    }
}

pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> TestbedError {
    let path = path.into();
    move |source| TestbedError::Io(PathIoError { op, path, source })
}
