//! What the deployment tests need besides the testbed and the deploy/ files (read through
//! `observer_tests::deploy_files`): the DaemonSet's container and capabilities, the agent
//! run under an exact capability set, and the series of a scrape.
use observer_tests::agent::{Agent, AgentExited, AgentSpec};
use observer_tests::deploy_files::require_tool;
use serde_json::Value;

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
