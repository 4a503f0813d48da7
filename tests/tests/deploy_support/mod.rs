//! What the deployment tests need besides the testbed: the repository's deploy/ files read
//! as data, the external validators (kubernetes-validate, promtool, setpriv) found or named,
//! and the agent run under an exact capability set.
use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use observer_tests::agent::{free_local_port, http_get, observer_bin};
use serde_json::Value;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .join("deploy")
}

/// A tool the tests need: its path, or a failure naming the package that provides it.
pub fn require_tool(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{program}` is not installed: it comes with {package} (`cargo xtask setup` installs it)")
    })
}

/// Every YAML document of `path`, as JSON values. PyYAML (a dependency of
/// kubernetes-validate) parses it, so the tests read YAML the way the validators do.
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    require_tool("python3", "the Debian package python3");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml\n\
             print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
        ])
        .arg(path)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "parsing {} as YAML failed (PyYAML comes with the PyPI package kubernetes-validate): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

/// The one document of `path` of the given kind.
pub fn document_of_kind(path: &Path, kind: &str) -> Value {
    let mut docs: Vec<Value> = yaml_documents(path)
        .into_iter()
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(docs.len(), 1, "{} has one {kind}", path.display());
    docs.remove(0)
}

/// The agent's only container in the DaemonSet.
pub fn agent_container(daemonset: &Value) -> &Value {
    let containers = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "the DaemonSet runs the agent only");
    &containers[0]
}

/// The DaemonSet's `capabilities.add`, as the manifest spells them (`BPF`, ...).
pub fn manifest_capabilities(daemonset: &Value) -> Vec<String> {
    agent_container(daemonset)["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add is a list")
        .iter()
        .map(|c| c.as_str().expect("capability names are strings").to_owned())
        .collect()
}

/// The agent started through `setpriv` with exactly `caps` (Kubernetes spelling) as its
/// permitted, effective, inheritable, ambient and bounding sets, as user `uid`.
pub struct ConfinedAgent {
    child: Option<Child>,
    records: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// How a confined start ended.
pub enum Start {
    Ready(ConfinedAgent),
    Exited { status: ExitStatus, stderr: String },
}

impl ConfinedAgent {
    pub fn start(uid: u32, caps: &[String], args: &[&str]) -> Start {
        let setpriv = require_tool("setpriv", "the Debian package util-linux");
        let set = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_local_port())
            .parse()
            .expect("loopback address");
        let mut child = Command::new(setpriv)
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(format!("--inh-caps={set}"))
            .arg(format!("--ambient-caps={set}"))
            .arg(format!("--bounding-set={set}"))
            .arg("--")
            .arg(observer_bin())
            .args(["run", "--kube", "off", "--output", "json", "--metrics-addr"])
            .arg(metrics_addr.to_string())
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the agent through setpriv");
        let records = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let into = Arc::clone(&records);
        let out_reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    into.lock().expect("records lock").push(v);
                }
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
        let mut agent = ConfinedAgent {
            child: Some(child),
            records,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("waiting for the agent"));
            if let Some(status) = exited {
                agent.child = None;
                for r in agent.readers.drain(..) {
                    let _ = r.join();
                }
                return Start::Exited {
                    status,
                    stderr: agent.stderr(),
                };
            }
            if http_get(metrics_addr, "/readyz").is_ok_and(|(code, _)| code == 200) {
                return Start::Ready(agent);
            }
            assert!(
                Instant::now() < deadline,
                "the confined agent neither got ready nor exited within 30 s; its log:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    pub fn records_of_cgroup(&self, cgroup_id: u64) -> Vec<Value> {
        self.records
            .lock()
            .expect("records lock")
            .iter()
            .filter(|r| r["cgroup_id"].as_u64() == Some(cgroup_id))
            .cloned()
            .collect()
    }

    /// Waits for a record of `cgroup_id` matching `pred`; None when none came.
    pub fn wait_for_record(
        &self,
        cgroup_id: u64,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(r) = self.records_of_cgroup(cgroup_id).into_iter().find(&pred) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ConfinedAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) with a pid we own and a valid signal number.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The sample lines of a Prometheus text exposition: (metric name, labels).
pub fn scraped_series(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, _value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let labels = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|kv| !kv.is_empty())
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect();
            Some((name.to_owned(), labels))
        })
        .collect()
}
