//! Running programs: every wait is bounded, every child is killed and reaped by its guard.
use std::{
    ffi::OsStr,
    io::{Read, Write},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::error::{Result, TestbedError};

/// The exit status of a guarded child that has ended, taking it out of its guard (so that
/// Drop does not kill what is already gone); `None` while it runs.
pub fn take_if_exited(child: &mut Option<Child>) -> Option<ExitStatus> {
    let status = child.as_mut()?.try_wait().ok().flatten()?;
    *child = None;
    Some(status)
}

/// Default hang guard for one command run by the testbed or a test: it ends a command that
/// would never end, so it is generous (guests under TCG run ~10x slower than native).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// A program the testbed runs and the Debian package that provides it.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    pub name: &'static str,
    pub package: &'static str,
}

pub const IP: Program = Program {
    name: "ip",
    package: "iproute2",
};
pub const DNSMASQ: Program = Program {
    name: "dnsmasq",
    package: "dnsmasq-base",
};
pub const PYTHON3: Program = Program {
    name: "python3",
    package: "python3",
};

/// The Debian packages the testbed needs (for `cargo xtask setup`).
pub const REQUIRED_PACKAGES: &[&str] = &["iproute2", "dnsmasq-base", "python3"];

impl Program {
    /// Absolute path of the program: the system directories first (a root shell's PATH may
    /// lack /usr/sbin, and version-manager shims are slow to start), then PATH.
    pub fn path(&self) -> Result<PathBuf> {
        let system = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from);
        let from_env = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        system
            .into_iter()
            .chain(from_env)
            .map(|dir| dir.join(self.name))
            .find(|p| p.is_file())
            .ok_or(TestbedError::MissingProgram {
                program: self.name,
                package: self.package,
            })
    }
}

/// What a finished command left behind.
#[derive(Clone, Debug)]
pub struct CommandOutput {
    /// Pid of the process (after `ip netns exec` it is the program's own pid: ip execs it).
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// This output if the command succeeded, else a `CommandFailed` naming `command`.
    pub fn check(self, command: &str) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(TestbedError::CommandFailed {
                command: command.to_owned(),
                status: self.status,
                stderr: format!("{}{}", self.stderr.trim(), self.stdout.trim()),
            })
        }
    }
}

/// A running child process. Dropping it kills and reaps it.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
    shown: String,
    stdout: Option<mpsc::Receiver<Vec<u8>>>,
    stderr: Option<mpsc::Receiver<Vec<u8>>>,
}

fn drain(mut from: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

impl Process {
    /// Spawns `cmd` with stdout and stderr captured and `stdin` written then closed.
    pub(crate) fn spawn(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Self> {
        let shown = show(cmd);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            command: shown.clone(),
            source,
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // Small inputs (ip batches) fit in the pipe buffer; a failure shows up in the status.
            let _ = pipe.write_all(input);
        }
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        Ok(Self {
            child: Some(child),
            shown,
            stdout,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited (and if so, reaps it).
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) | None => true,
            Some(Ok(None)) => false,
            Some(Err(_)) => true,
        }
    }

    /// Waits at most `timeout` for the process to exit; on timeout kills it and fails.
    pub fn wait_output(mut self, timeout: Duration) -> Result<CommandOutput> {
        let deadline = Instant::now() + timeout;
        let mut child = self
            .child
            .take()
            .expect("a Process holds its child until waited");
        let pid = child.id();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TestbedError::Timeout {
                        what: self.shown.clone(),
                        after: timeout,
                    });
                }
                Err(source) => {
                    return Err(TestbedError::Spawn {
                        command: self.shown.clone(),
                        source,
                    });
                }
            }
        };
        // A grandchild that kept the pipes open must not hang us: bounded reads.
        let collect = |rx: Option<mpsc::Receiver<Vec<u8>>>| {
            rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        Ok(CommandOutput {
            pid,
            status,
            stdout: collect(self.stdout.take()),
            stderr: collect(self.stderr.take()),
        })
    }

    /// Kills (SIGKILL) and reaps the process now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion within `timeout`; fails unless it exits 0.
pub(crate) fn run_checked(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<CommandOutput> {
    let shown = show(cmd);
    Process::spawn(cmd, stdin)?
        .wait_output(timeout)?
        .check(&shown)
}

/// `ip [-n netns] args...`, checked.
pub(crate) fn ip<S: AsRef<OsStr>>(netns: Option<&str>, args: &[S]) -> Result<CommandOutput> {
    let mut cmd = Command::new(IP.path()?);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    run_checked(&mut cmd, None, DEFAULT_TIMEOUT)
}

/// Several `ip` commands in one process (`ip -batch -`), checked; stops at the first failure.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<()> {
    let mut cmd = Command::new(IP.path()?);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(["-batch", "-"]);
    let script = lines.join("\n") + "\n";
    run_checked(&mut cmd, Some(script.as_bytes()), DEFAULT_TIMEOUT)
        .map_err(|e| match e {
            TestbedError::CommandFailed {
                command,
                status,
                stderr,
            } => TestbedError::CommandFailed {
                command: format!("{command} <<{script}"),
                status,
                stderr,
            },
            other => other,
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_its_package() {
        let missing = Program {
            name: "observer-no-such-program",
            package: "observer-no-such-package",
        };
        let message = missing.path().unwrap_err().to_string();
        assert!(message.contains("`observer-no-such-package`"), "{message}");
        assert!(IP.path().is_ok(), "ip is part of the base system here");
    }

    #[test]
    fn a_command_that_hangs_is_killed_at_its_timeout() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = Process::spawn(&mut cmd, None)
            .unwrap()
            .wait_output(Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, TestbedError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
