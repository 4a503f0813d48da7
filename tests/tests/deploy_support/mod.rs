//! What the deployment tests need besides the testbed: the repository's deploy/ files read
//! as data, the external validators (kubernetes-validate, promtool, setpriv) found or named,
//! and the agent run under an exact capability set.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use observer_tests::agent::{Agent, AgentExited, AgentSpec};
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
pub fn confined_agent(uid: u32, caps: &[String], args: &[&str]) -> Result<Agent, AgentExited> {
    let setpriv = require_tool("setpriv", "the Debian package util-linux");
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    Agent::try_start(
        AgentSpec::new()
            .launcher(
                setpriv,
                [
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_owned(),
                    format!("--inh-caps={set}"),
                    format!("--ambient-caps={set}"),
                    format!("--bounding-set={set}"),
                    "--".to_owned(),
                ],
            )
            .args(args.iter().copied())
            .env("RUST_BACKTRACE", "0"),
    )
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
