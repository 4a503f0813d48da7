//! The repository's `deploy/` files read as data, and the external tools the tests run on
//! them found or named: shared by the manifest checks and the live alert tests.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

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

/// The shipped PrometheusRule (`deploy/monitoring/prometheusrule.yaml`), the single source
/// of truth of observer's alerts.
pub fn prometheus_rule() -> Value {
    document_of_kind(
        &deploy_dir().join("monitoring/prometheusrule.yaml"),
        "PrometheusRule",
    )
}

/// Every alerting rule of the shipped PrometheusRule, across its groups.
pub fn alert_rules() -> Vec<Value> {
    prometheus_rule()["spec"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}
