//! The real agent binary (`observer run`) as a test drives it: started with flags and
//! environment, its JSON lines collected as they come, its /metrics scraped over HTTP,
//! stopped with SIGTERM (and killed on Drop, so a failing test leaves nothing running).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::exec::take_if_exited;

/// The agent binary as this tree builds it: `OBSERVER_BIN` when set (xtask builds the agent
/// first and names it), else cargo builds `observer` now, in the tests' own profile, so a
/// plain `cargo test` never drives a stale agent. Built once per test executable.
pub fn observer_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("OBSERVER_BIN") {
            return PathBuf::from(path);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests crate lives in the workspace");
        let built = escargot::CargoBuild::new()
            .manifest_path(workspace.join("Cargo.toml"))
            .package("observer")
            .bin("observer")
            .current_release()
            .run()
            .unwrap_or_else(|e| panic!("building the agent (cargo build -p observer): {e}"));
        built.path().to_owned()
    })
    .clone()
}

/// A free TCP port on 127.0.0.1 for the agent's metrics server.
pub fn free_local_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port on loopback")
}

/// How to start the agent. `args` come after `observer run`; the harness adds
/// `--output json`, `--metrics-addr` and `--kube off` unless the test set them. With
/// `--output json` every stdout line must be JSON (it is parsed into [`Agent::records`]);
/// with another output the raw lines are in [`Agent::lines`].
#[derive(Clone, Debug, Default)]
pub struct AgentSpec {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A program the agent is started through (e.g. `setpriv` with its flags), the agent
    /// binary and its arguments appended.
    pub launcher: Option<(PathBuf, Vec<String>)>,
}

impl AgentSpec {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the agent as `program args... <agent binary> run ...`.
    pub fn launcher<I, S>(mut self, program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.launcher = Some((program.into(), args.into_iter().map(Into::into).collect()));
        self
    }
}

/// An agent that exited before it was ready.
#[derive(Debug)]
pub struct AgentExited {
    pub status: ExitStatus,
    /// Its whole log (standard error).
    pub stderr: String,
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    metrics_addr: SocketAddr,
    records: Arc<Mutex<Vec<Value>>>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Starts `observer run` and waits until /readyz says the probes are attached; panics
    /// with the agent's log when it exits first.
    pub fn start(spec: AgentSpec) -> Agent {
        Agent::try_start(spec).unwrap_or_else(|exited| {
            panic!(
                "the agent exited before it was ready ({}); its log:\n{}",
                exited.status, exited.stderr
            )
        })
    }

    /// As [`Agent::start`]; an agent that exits before it is ready is returned as such.
    pub fn try_start(spec: AgentSpec) -> Result<Agent, AgentExited> {
        let has = |flag: &str| {
            spec.args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut args = vec!["run".to_owned()];
        let metrics_addr: SocketAddr = if has("--metrics-addr") {
            let i = spec
                .args
                .iter()
                .position(|a| a == "--metrics-addr")
                .expect("flag present");
            spec.args[i + 1]
                .parse()
                .expect("--metrics-addr takes host:port")
        } else {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_local_port())
                .parse()
                .expect("addr");
            args.extend(["--metrics-addr".to_owned(), addr.to_string()]);
            addr
        };
        let json_output = match spec.args.iter().position(|a| a == "--output") {
            Some(i) => spec.args.get(i + 1).is_some_and(|v| v == "json"),
            None => match spec.args.iter().find_map(|a| a.strip_prefix("--output=")) {
                Some(v) => v == "json",
                None => {
                    args.extend(["--output".to_owned(), "json".to_owned()]);
                    true
                }
            },
        };
        if !has("--kube") {
            args.extend(["--kube".to_owned(), "off".to_owned()]);
        }
        args.extend(spec.args.iter().cloned());
        let mut cmd = match &spec.launcher {
            Some((program, launcher_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(launcher_args).arg(observer_bin());
                cmd
            }
            None => Command::new(observer_bin()),
        };
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The agent must not pick up an exporter from the developer's shell.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("NO_COLOR", "1");
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("starting the observer agent");
        let records = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let out_records = Arc::clone(&records);
        let out_lines = Arc::clone(&lines);
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if json_output {
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) => out_records.lock().expect("records lock").push(v),
                        Err(e) => {
                            panic!("the agent printed a line that is not JSON ({e}): {line}")
                        }
                    }
                }
                out_lines.lock().expect("lines lock").push(line);
            }
        });
        let err_text = Arc::clone(&stderr);
        let err_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(err);
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err_text
                    .lock()
                    .expect("stderr lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut agent = Agent {
            child: Some(child),
            metrics_addr,
            records,
            lines,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        // A hang guard: readiness is the agent's own signal; loading the programs takes
        // tens of seconds in a guest under TCG on a busy machine.
        agent.wait_ready(Duration::from_secs(180))?;
        Ok(agent)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), AgentExited> {
        let every = Duration::from_millis(50);
        match wait_http_ready(&mut self.child, self.metrics_addr, "/readyz", within, every) {
            Ok(()) => Ok(()),
            Err(NotReady::Exited(status)) => {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                Err(AgentExited {
                    status,
                    stderr: self.stderr(),
                })
            }
            Err(NotReady::TimedOut) => panic!(
                "the agent was not ready within {within:?}; its log:\n{}",
                self.stderr()
            ),
        }
    }

    /// Every JSON record printed so far.
    pub fn records(&self) -> Vec<Value> {
        self.records.lock().expect("records lock").clone()
    }

    /// Every line printed on standard output so far, as printed (any `--output`).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    /// Waits for a stdout line matching `pred`; panics with what was seen when none comes.
    pub fn wait_for_line(&self, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(found) = self.lines().into_iter().find(|l| pred(l)) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no matching line within {within:?}; lines seen:\n{}\nagent log:\n{}",
                self.lines().join("\n"),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a record matching `pred`; panics with what was seen when none comes.
    pub fn wait_for_record(&self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.poll_for_record(within, pred).unwrap_or_else(|| {
            panic!(
                "no matching record within {within:?}; records seen:\n{}\nagent log:\n{}",
                self.records()
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
                self.stderr()
            )
        })
    }

    /// Waits at most `within` for a record matching `pred`; None when none came.
    pub fn poll_for_record(
        &self,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(found) = self.records().into_iter().find(|r| pred(r)) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Records of one cgroup (tests filter on their own pods: the agent sees the machine).
    pub fn records_of_cgroup(&self, cgroup_id: u64) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["cgroup_id"].as_u64() == Some(cgroup_id))
            .collect()
    }

    /// The Prometheus text of /metrics.
    pub fn metrics(&self) -> String {
        let (code, body) = http_get(self.metrics_addr, "/metrics").expect("scraping /metrics");
        assert_eq!(code, 200, "/metrics answered {code}: {body}");
        body
    }

    /// Scrapes /metrics until `done` holds, for at most `within`; returns that scrape. Some
    /// series are added at the agent's next tick, not with the record they count.
    pub fn metrics_when(&self, within: Duration, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let text = self.metrics();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the metrics did not reach the expected state within {within:?}:\n{text}\nthe agent's log:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far (standard error).
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("the agent runs until stopped once")
            .id()
    }

    /// SIGKILL: no handler runs, nothing is detached by the agent itself.
    pub fn kill(mut self) {
        let mut child = self
            .child
            .take()
            .expect("the agent runs until stopped once");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaping the agent");
    }

    /// SIGTERM, then waits (bounded) for a clean exit; returns its status.
    pub fn stop(self) -> ExitStatus {
        self.stop_with_log().0
    }

    /// As [`Agent::stop`], with the agent's whole log (standard error), up to its exit.
    pub fn stop_with_log(self) -> (ExitStatus, String) {
        self.signal_with_log(libc::SIGTERM)
    }

    /// As [`Agent::stop_with_log`], with another signal (SIGINT: Ctrl-C in a terminal).
    pub fn signal_with_log(mut self, signal: libc::c_int) -> (ExitStatus, String) {
        let status = self.terminate(Duration::from_secs(15), signal);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        (status, self.stderr())
    }

    fn terminate(&mut self, within: Duration, signal: libc::c_int) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("the agent runs until stopped once");
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the agent") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not exit within {within:?} of signal {signal}; its log:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a wait for a child's HTTP readiness ended without it.
#[derive(Debug)]
pub enum NotReady {
    /// The child exited first.
    Exited(ExitStatus),
    /// The wait's hang guard passed.
    TimedOut,
}

/// Polls `GET path` on `addr` every `every` until it answers 200, `child` exits, or
/// `within` passes: how the agent and Prometheus are waited for.
pub fn wait_http_ready(
    child: &mut Option<Child>,
    addr: SocketAddr,
    path: &str,
    within: Duration,
    every: Duration,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = take_if_exited(child) {
            return Err(NotReady::Exited(status));
        }
        if http_get(addr, path).is_ok_and(|(code, _)| code == 200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut);
        }
        std::thread::sleep(every);
    }
}

/// A plain HTTP/1.1 GET on loopback: status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    // Hang guards: a scrape is answered, if slowly by an agent in a guest under TCG.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(30))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header/body separator"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One sample of a Prometheus text exposition: the value of `name{labels}` where every
/// given label matches; sums over the other labels.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let label_text = rest.trim_end_matches('}');
            let ok = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Every series of metric `name` in a scrape, one per line: what a failed count shows.
pub fn series_of(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each field of `expected` has that value in `record` (`null`: absent or null), so a test
/// states what a JSON line says about its connection in one place.
pub fn assert_fields(record: &Value, expected: Value) {
    let fields = expected
        .as_object()
        .expect("the expected fields are a JSON object");
    let found: serde_json::Map<String, Value> = fields
        .keys()
        .map(|key| (key.clone(), record[key].clone()))
        .collect();
    assert_eq!(Value::Object(found), expected, "{record:#}");
}
