//! Named network namespaces (`ip netns`) and running code or programs inside them.
use std::{
    ffi::{OsStr, OsString},
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    cgroup::CgroupDir,
    error::{Result, TestbedError, io_err},
    exec::{self, CommandOutput, DEFAULT_TIMEOUT, IP, Process},
};

/// A named network namespace created by the testbed (`/run/netns/<name>`). The handle is plain
/// data; the [`crate::Testbed`] that made it deletes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub(crate) fn create(name: String) -> Result<Self> {
        exec::ip(None, &["netns", "add", &name])?;
        let ns = Self { name };
        exec::ip(Some(&ns.name), &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub(crate) fn named(name: String) -> Self {
        Self { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file `setns(2)` opens.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The namespace's inode (what `/proc/<pid>/ns/net` links to: `net:[<inode>]`).
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.path())
            .map(|m| m.ino())
            .map_err(io_err("stat", self.path()))
    }

    /// Pids of every process inside this namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids_in(&self.name)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// Sockets made there stay in this namespace for their whole life, whichever thread uses
    /// them later. The thread stays in the test process's cgroup, and sees the host's
    /// /etc/resolv.conf: use [`NetNs::command`] for programs that must resolve names.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        let file = File::open(&path).map_err(io_err("open", &path))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a valid namespace fd that outlives it.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(TestbedError::Netns {
                        netns: self.name.clone(),
                        op: "setns",
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A program to run inside this namespace through `ip netns exec`, which also bind-mounts
    /// `/etc/netns/<name>/*` over `/etc/*` (so glibc reads this namespace's resolv.conf).
    pub fn command(&self, program: impl AsRef<OsStr>) -> TestCommand {
        TestCommand {
            netns: Some(self.name.clone()),
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cgroup: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

pub(crate) fn pids_in(netns: &str) -> Result<Vec<u32>> {
    let out = exec::ip(None, &["netns", "pids", netns])?;
    Ok(out
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// Kills every process in the namespace, then deletes it. Errors are returned for reporting;
/// the caller keeps tearing down the rest.
pub(crate) fn destroy(netns: &str) -> Result<()> {
    for _ in 0..50 {
        let pids = pids_in(netns).unwrap_or_default();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a pid found inside our own namespace.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    exec::ip(None, &["netns", "del", netns]).map(drop)
}

/// A command to run in a namespace and/or a cgroup, always with a timeout.
#[derive(Clone, Debug)]
pub struct TestCommand {
    netns: Option<String>,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cgroup: Option<PathBuf>,
    timeout: Duration,
}

impl TestCommand {
    /// A program to run in the test's own network namespace (e.g. a "host process" placed in
    /// a cgroup with [`TestCommand::in_cgroup`]).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            netns: None,
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
            cgroup: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Start the process inside this cgroup (it is moved there before `ip netns exec` runs, so
    /// the program never runs anywhere else).
    pub fn in_cgroup(mut self, cgroup: &CgroupDir) -> Self {
        self.cgroup = Some(cgroup.path().to_owned());
        self
    }

    /// Bound for [`TestCommand::output`] (default 15 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the process; the returned guard kills and reaps it when dropped.
    pub fn spawn(&self) -> Result<Process> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new(IP.path()?);
                cmd.args(["netns", "exec", ns]).arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        let procs = match &self.cgroup {
            Some(dir) => {
                let path = dir.join("cgroup.procs");
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err("open", &path))?;
                let fd = file.as_raw_fd();
                // SAFETY: between fork and exec only write(2) is called (async-signal-safe);
                // writing "0" to cgroup.procs moves the writing process itself.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                            Ok(())
                        } else {
                            Err(std::io::Error::last_os_error())
                        }
                    });
                }
                Some(file)
            }
            None => None,
        };
        let process = Process::spawn(&mut cmd, None);
        drop(procs);
        process
    }

    /// Runs to completion within the timeout and returns the output (any exit status).
    pub fn output(&self) -> Result<CommandOutput> {
        self.spawn()?.wait_output(self.timeout)
    }
}
