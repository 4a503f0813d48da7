//! deploy/ checked with real tools: the manifests against the Kubernetes API schemas
//! (kubernetes-validate), the alert rules with promtool (syntax and unit tests), the series
//! the rules use against a real scrape of the agent, and the DaemonSet's capability set by
//! running the agent with exactly that set, and with each capability removed.
//!
//! A missing tool fails the test with the package to install; nothing is skipped.
mod deploy_support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use deploy_support::*;
use observer_tests::deploy_files::{
    alert_rules, deploy_dir, document_of_kind, prometheus_rule, require_tool, yaml_documents,
};
use observer_tests::{
    CLOSED_PORT, Family, PodSpec,
    agent::{Agent, AgentExited, AgentSpec},
    plan,
    story::{DB_NAME, Outside, outside_resolver, service_db, story_pod, testbed},
};
use serde_json::Value;

/// Kubernetes minor versions the manifests are claimed (and checked) to work with.
const KUBERNETES_VERSIONS: [&str; 6] = ["1.30.0", "1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0"];
/// Labels Prometheus puts on every scraped series of the agent (the ServiceMonitor adds
/// `node`; `instance` and `job` come with every target).
const TARGET_LABELS: [&str; 3] = ["instance", "job", "node"];
/// Hang guard for records that must come (guests under TCG run ~10x slower).
const WAIT: Duration = Duration::from_secs(120);

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn daemonset() -> Value {
    document_of_kind(
        &deploy_dir().join("manifests/40-daemonset.yaml"),
        "DaemonSet",
    )
}

#[test]
fn manifests_and_examples_validate_against_the_kubernetes_schemas() {
    let validator = require_tool(
        "kubernetes-validate",
        "the PyPI package kubernetes-validate",
    );
    let mut files = yaml_files(&deploy_dir().join("manifests"));
    files.extend(yaml_files(&deploy_dir().join("examples")));
    // The Grafana dashboard's ConfigMap; the operator kinds beside it are checked below.
    files.push(deploy_dir().join("monitoring/grafana-dashboard.yaml"));
    assert!(files.len() >= 9, "manifests and examples found: {files:?}");
    let documents: usize = files.iter().map(|f| yaml_documents(f).len()).sum();
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files)
            .output()
            .expect("running kubernetes-validate");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !report.contains("ERROR"),
            "Kubernetes {version}: {report}"
        );
        // Every document was checked against a schema, none passed for want of one.
        assert!(
            !report.contains("Couldn't find schema"),
            "{version}: {report}"
        );
        assert_eq!(
            report.matches(" passed for resource ").count(),
            documents,
            "{version}: every document passed: {report}"
        );
    }
}

#[test]
fn kubernetes_validate_cannot_check_the_operator_kinds_so_promtool_and_wiring_checks_do() {
    // If kubernetes-validate ever learns these kinds, validate them there instead.
    let validator = require_tool(
        "kubernetes-validate",
        "the PyPI package kubernetes-validate",
    );
    for file in ["servicemonitor.yaml", "prometheusrule.yaml"]
        .map(|f| deploy_dir().join("monitoring").join(f))
    {
        let out = Command::new(&validator)
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .arg(&file)
            .output()
            .expect("running kubernetes-validate");
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(report.contains("Couldn't find schema"), "{report}");
    }
    // The ServiceMonitor selects the Service, whose port reaches the agent's metrics port.
    let monitor = document_of_kind(
        &deploy_dir().join("monitoring/servicemonitor.yaml"),
        "ServiceMonitor",
    );
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let service = document_of_kind(&deploy_dir().join("manifests/50-service.yaml"), "Service");
    let ds = daemonset();
    let labels_match = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .expect("selector labels")
            .iter()
            .all(|(k, v)| &labels[k] == v)
    };
    assert!(labels_match(
        &monitor["spec"]["selector"]["matchLabels"],
        &service["metadata"]["labels"]
    ));
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"][0],
        service["metadata"]["namespace"]
    );
    assert!(labels_match(
        &service["spec"]["selector"],
        &ds["spec"]["template"]["metadata"]["labels"]
    ));
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(
        endpoint["honorLabels"], true,
        "series keep the observed pod's namespace"
    );
    let port = &service["spec"]["ports"][0];
    assert_eq!(endpoint["port"], port["name"]);
    let container_port = &agent_container(&ds)["ports"][0];
    assert_eq!(port["targetPort"], container_port["name"]);
    assert_eq!(container_port["containerPort"], 9464);
    // The PrometheusRule envelope; its spec is checked by promtool below.
    let rule = prometheus_rule();
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["spec"]
            .as_object()
            .expect("spec")
            .keys()
            .collect::<Vec<_>>(),
        vec!["groups"]
    );
}

#[test]
fn kustomization_only_lists_the_plain_manifests() {
    let path = deploy_dir().join("kustomization.yaml");
    let k = &yaml_documents(&path)[0];
    let keys: BTreeSet<&str> = k
        .as_object()
        .expect("mapping")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["apiVersion", "kind", "resources"]),
        "no patches, generators or transformers"
    );
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("path").to_owned())
        .collect();
    let on_disk: BTreeSet<String> = ["manifests", "monitoring"]
        .iter()
        .flat_map(|d| {
            yaml_files(&deploy_dir().join(d))
                .into_iter()
                .map(move |f| format!("{d}/{}", f.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    assert_eq!(listed, on_disk);
}

#[test]
fn rbac_grants_exactly_what_the_agent_uses() {
    let role = document_of_kind(
        &deploy_dir().join("manifests/20-clusterrole.yaml"),
        "ClusterRole",
    );
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .unwrap_or_else(|| panic!("rule without {k}: {rule}"))
                .iter()
                .map(|v| v.as_str().expect("string").to_owned())
                .collect()
        };
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        for group in list("apiGroups") {
            for resource in list("resources") {
                granted
                    .entry((group.clone(), resource))
                    .or_default()
                    .extend(list("verbs"));
            }
        }
    }
    // What the identity module lists, watches and gets, from its own code.
    let expected: BTreeMap<(String, String), BTreeSet<String>> =
        observer::identity::kube::api_access()
            .map(|access| {
                (
                    (access.group.to_owned(), access.resource.to_owned()),
                    access.verbs.iter().map(|v| (*v).to_owned()).collect(),
                )
            })
            .collect();
    assert_eq!(granted, expected);
    let binding = document_of_kind(
        &deploy_dir().join("manifests/21-clusterrolebinding.yaml"),
        "ClusterRoleBinding",
    );
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let ds = daemonset();
    assert_eq!(
        binding["subjects"][0]["name"],
        ds["spec"]["template"]["spec"]["serviceAccountName"]
    );
    assert_eq!(
        binding["subjects"][0]["namespace"],
        ds["metadata"]["namespace"]
    );
}

#[test]
fn daemonset_runs_with_least_privilege_and_the_agents_own_settings() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let c = agent_container(&ds);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        pod["hostPID"], true,
        "resolv.conf through /proc/<pid>/root of host pids"
    );
    assert_ne!(pod["hostNetwork"], true);
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert!(
        pod["terminationGracePeriodSeconds"]
            .as_u64()
            .is_some_and(|s| s >= 10)
    );
    // Node name from the downward API.
    let env = c["env"].as_array().expect("env");
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    assert!(
        env.iter()
            .any(|e| e["name"] == "OTEL_EXPORTER_OTLP_ENDPOINT")
    );
    // Probes on the metrics port.
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], c["ports"][0]["name"]);
    // Host paths read-only.
    let mounts = c["volumeMounts"].as_array().expect("mounts");
    for volume in pod["volumes"].as_array().expect("volumes") {
        if volume.get("hostPath").is_some() {
            let mount = mounts
                .iter()
                .find(|m| m["name"] == volume["name"])
                .expect("every host path is mounted");
            assert_eq!(mount["readOnly"], true, "{mount}");
        }
    }
    // Resources are set.
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());

    // The ConfigMap's TOML is accepted by the agent's own settings parser, at the path the
    // container passes to --config.
    let cm = document_of_kind(
        &deploy_dir().join("manifests/30-configmap.yaml"),
        "ConfigMap",
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg"))
        .collect();
    let config_path = args[args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config")
        + 1];
    let mount = mounts
        .iter()
        .find(|m| m["name"] == "config")
        .expect("config mount");
    let key = config_path
        .strip_prefix(&format!("{}/", mount["mountPath"].as_str().expect("path")))
        .expect("the config file is in the config mount");
    let toml = cm["data"][key]
        .as_str()
        .expect("the ConfigMap holds the file");
    let dir = std::env::temp_dir().join(format!("observer-deploy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(key);
    std::fs::write(&file, toml).expect("writing the config");
    let settings = observer::agent::config::Settings::resolve(observer::agent::config::RunArgs {
        config: Some(file),
        ..Default::default()
    });
    std::fs::remove_dir_all(&dir).expect("removing temp dir");
    let settings = settings.expect("the agent accepts the ConfigMap's settings");
    assert_eq!(settings.cluster_domain, "cluster.local");
    assert!(!settings.cluster_cidrs.is_empty());
}

/// The rules extracted from the PrometheusRule (the single source of truth) into a plain
/// rules file, beside a copy of the promtool unit tests.
fn extracted_rules_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("observer-deploy-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // JSON is YAML: promtool reads it as a rules file.
    std::fs::write(
        dir.join("observer-rules.yaml"),
        serde_json::to_string_pretty(&prometheus_rule()["spec"]).expect("json"),
    )
    .expect("writing rules");
    std::fs::copy(
        deploy_dir().join("tests/alerts.test.yaml"),
        dir.join("alerts.test.yaml"),
    )
    .expect("copying the unit tests");
    dir
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = require_tool("promtool", "the Debian package prometheus");
    let dir = extracted_rules_dir();
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(dir.join("observer-rules.yaml"))
        .output()
        .expect("running promtool");
    let test = Command::new(&promtool)
        .args(["test", "rules"])
        .arg(dir.join("alerts.test.yaml"))
        .output()
        .expect("running promtool");
    std::fs::remove_dir_all(&dir).expect("removing temp dir");
    let text = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        text(&check)
    );
    assert!(
        test.status.success(),
        "promtool test rules: {}",
        text(&test)
    );

    // Every alert the issue asks for exists, has on-call text, and has a unit test that
    // expects it to fire.
    let tests = yaml_documents(&deploy_dir().join("tests/alerts.test.yaml"));
    let tested: BTreeSet<String> = tests[0]["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| {
            t["alert_rule_test"]
                .as_array()
                .expect("alert tests")
                .clone()
        })
        .filter(|a| !a["exp_alerts"].as_array().expect("exp_alerts").is_empty())
        .map(|a| a["alertname"].as_str().expect("name").to_owned())
        .collect();
    let rules = alert_rules();
    for name in [
        "ObserverSearchDomainEscape",
        "ObserverNameDrift",
        "ObserverSearchListAmplification",
        "ObserverDnsUnanswered",
        "ObserverKernelEventsLost",
        "ObserverSpanExportFailing",
        "ObserverEnrichmentDegraded",
    ] {
        assert!(
            rules.iter().any(|r| r["alert"] == name),
            "{name} is missing"
        );
    }
    for rule in &rules {
        let name = rule["alert"].as_str().expect("alerting rules only");
        for key in ["summary", "description", "runbook"] {
            assert!(rule["annotations"][key].is_string(), "{name} lacks {key}");
        }
        assert!(
            rule["labels"]["severity"].is_string(),
            "{name} lacks a severity"
        );
        assert!(
            tested.contains(name),
            "{name} has no unit test that fires it"
        );
    }
}

/// A label matcher in a PromQL expression: `name op "value"`.
struct Matcher {
    label: String,
    op: String,
    value: String,
}

/// The observer series an expression selects, with their matchers.
fn selectors(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("observer_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_owned();
        let mut matchers = Vec::new();
        let after = &tail[end..];
        if let Some(body) = after.strip_prefix('{') {
            let body = &body[..body.find('}').expect("closed matcher list")];
            for m in body.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let op_at = m.find(['=', '!']).expect("matcher operator");
                let op_len = if m[op_at..].starts_with("=~")
                    || m[op_at..].starts_with("!~")
                    || m[op_at..].starts_with("!=")
                {
                    2
                } else {
                    1
                };
                matchers.push(Matcher {
                    label: m[..op_at].trim().to_owned(),
                    op: m[op_at..op_at + op_len].to_owned(),
                    value: m[op_at + op_len..].trim().trim_matches('"').to_owned(),
                });
            }
        }
        found.push((name, matchers));
        rest = &tail[end..];
    }
    found
}

/// Labels of `by (...)` clauses, each with the series aggregated under it.
fn grouping(expr: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let tail = &rest[at + 4..];
        let close = tail.find(')').expect("closed by clause");
        let labels = tail[..close]
            .split(',')
            .map(|l| l.trim().to_owned())
            .collect();
        let body = &tail[close + 1..];
        let open = body.find('(').expect("aggregated expression");
        let mut depth = 0;
        let mut end = open;
        for (i, c) in body[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let series = selectors(&body[open..end])
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        out.push((labels, series));
        rest = &tail[close..];
    }
    out
}

#[test]
fn alert_annotations_only_use_labels_the_alert_keeps() {
    for rule in alert_rules() {
        let name = rule["alert"].as_str().expect("alert");
        let expr = rule["expr"].as_str().expect("expr");
        let kept: BTreeSet<String> = grouping(expr)
            .into_iter()
            .flat_map(|(labels, _)| labels)
            .collect();
        assert!(!kept.is_empty(), "{name} aggregates with by (...)");
        for (key, text) in rule["annotations"].as_object().expect("annotations") {
            let text = text.as_str().expect("text");
            for part in text.split("$labels.").skip(1) {
                let label: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    kept.contains(&label),
                    "{name} {key} uses {label}, dropped by aggregation"
                );
            }
        }
    }
}

/// Drives the seed story (search-domain escape), a drift, a CNAME escape, unanswered DNS
/// and a failing span export through the real agent, scrapes /metrics, and checks every
/// series, label and matched value the rules use against it.
#[test]
fn rules_use_series_and_labels_the_agent_really_exports() {
    let tb = testbed();
    let (in_cluster, _svc_listener) = service_db(&tb);
    let outside = Outside::with(&tb, |db, zone| {
        zone.record(DB_NAME, db.ipv4())
            .record("db.simple-web-app.svc.cluster.local", in_cluster.ipv4())
            .cname("ledger.simple-web-app.svc.cluster.local", DB_NAME)
    });
    let (db, dns) = (&outside.db, &outside.dns);
    let web = story_pod(&tb, "web");
    let lonely = tb
        .add_pod(
            PodSpec::new("lonely")
                .nameserver(plan::UNANSWERED_CLUSTER_V4)
                .option("timeout:1")
                .option("attempts:1"),
        )
        .expect("pod with a DNS server that never answers");
    let agent = Agent::start(
        AgentSpec::new()
            .args([
                "--cluster-cidr",
                "198.18.0.0/15",
                "--cluster-cidr",
                "198.19.0.0/16",
            ])
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{CLOSED_PORT}"),
            )
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    );
    let web_cgroup = web.cgroup().container.id();

    // In the cluster first, then the Service's record goes and the name escapes: a
    // flagged search-domain escape that is also a drift.
    web.connect_tcp("db", 5432, Family::V4, Duration::from_secs(3))
        .expect("connect");
    agent.wait_for_record(WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(web_cgroup) && r["resolution"] == "in-cluster"
    });
    dns.remove_record("db.simple-web-app.svc.cluster.local")
        .expect("remove record");
    web.connect_tcp("db", 5432, Family::V4, Duration::from_secs(3))
        .expect("connect");
    let escaped = agent.wait_for_record(WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(web_cgroup) && r["flagged"] == true
    });
    assert_eq!(escaped["resolution"], "search-escape");
    assert_eq!(escaped["drift"], true, "{escaped}");
    // An in-cluster name that is a CNAME to the outside.
    web.connect_tcp("ledger", 5432, Family::V4, Duration::from_secs(3))
        .expect("connect");
    agent.wait_for_record(WAIT, |r| {
        r["cgroup_id"].as_u64() == Some(web_cgroup) && r["resolution"] == "cname-escape"
    });

    let _ = lonely.resolve("ghost", Family::V4);
    // A pod whose nameserver is outside the cluster.
    let (resolver_host, _outside) = outside_resolver(&tb, db.ipv4().into());
    let hardcoded = tb
        .add_pod(PodSpec::new("hardcoded").nameserver(resolver_host.ipv4()))
        .expect("pod with an outside nameserver");
    let _ = hardcoded.resolve("www.outside.example", Family::V4);
    // Unanswered queries are counted when the core gives up on them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut metrics = agent.metrics();
    while !metrics.contains("observer_dns_unanswered_queries_total{")
        || !metrics.contains("observer_drift_connections_total{")
        || !metrics.contains("observer_dns_external_server_responses_total{")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no unanswered, drift or outside-DNS series within 30 s:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(500));
        metrics = agent.metrics();
    }
    let scraped = scraped_series(&metrics);

    let mut labels_of: BTreeMap<&str, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (name, labels) in &scraped {
        let entry = labels_of.entry(name).or_default();
        for (k, v) in labels {
            entry.entry(k).or_default().insert(v);
        }
    }
    for rule in alert_rules() {
        let alert = rule["alert"].as_str().expect("alert");
        let expr = rule["expr"].as_str().expect("expr");
        for (series, matchers) in selectors(expr) {
            let labels = labels_of
                .get(series.as_str())
                .unwrap_or_else(|| panic!("{alert}: {series} is not in the scrape:\n{metrics}"));
            for m in matchers {
                let values = labels.get(m.label.as_str()).unwrap_or_else(|| {
                    panic!("{alert}: {series} has no label {} in the scrape", m.label)
                });
                let wanted: Vec<&str> = match m.op.as_str() {
                    "=~" | "!~" => m.value.split('|').collect(),
                    _ => vec![m.value.as_str()],
                };
                for w in wanted {
                    assert!(
                        values.contains(w),
                        "{alert}: {series}{{{}{}\"{w}\"}} matches no value the agent exports: {values:?}",
                        m.label,
                        m.op
                    );
                }
            }
        }
        for (by, series) in grouping(expr) {
            for s in &series {
                let labels = &labels_of[s.as_str()];
                for l in &by {
                    assert!(
                        labels.contains_key(l.as_str()) || TARGET_LABELS.contains(&l.as_str()),
                        "{alert}: {s} has no label {l} (has {:?})",
                        labels.keys()
                    );
                }
            }
        }
    }
    // The seed story's labels, as the escape alert's summary will show them.
    assert!(metrics.lines().any(|l| {
        l.starts_with("observer_flagged_connections_total{")
            && l.contains("resolution=\"search-escape\"")
            && l.contains("query_name=\"db\"")
            && l.contains("search_domain=\"another-lab.com\"")
            && l.contains("server_address=\"db.another-lab.com\"")
    }));
    assert!(agent.stop().success());
}

/// The connect script of the capability test: one connect by address (so the agent learns
/// a pid of the pod while it lives, and reads its resolv.conf), then `db` by name.
const WARM_THEN_DB: &str = "import socket, time\n\
s = socket.create_connection(('203.0.113.10', 5432), timeout=3)\n\
time.sleep(1)\n\
t = socket.create_connection(('db', 5432), timeout=3)\n\
time.sleep(0.5)\n";

/// With exactly the DaemonSet's capabilities (and its uid) the agent observes the seed
/// story; with any one of them removed it fails or warns, naming the capability.
#[test]
fn the_manifests_capability_set_is_enough_and_each_capability_is_needed() {
    let ds = daemonset();
    let caps = manifest_capabilities(&ds);
    let uid = agent_container(&ds)["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser is set") as u32;
    assert!(
        caps.iter().all(|c| c != "SYS_ADMIN"),
        "no CAP_SYS_ADMIN: {caps:?}"
    );

    let tb = testbed();
    let _outside = Outside::new(&tb);
    let story = story_pod(&tb, "web");
    // A search list Kubernetes did not write (dnsConfig.searches): only the pod's own
    // resolv.conf tells the agent it is one.
    let custom = tb
        .add_pod(
            PodSpec::new("custom")
                .search(["svc.cluster.local", "cluster.local", "another-lab.com"])
                .ndots(5),
        )
        .expect("pod");
    // The agent must be tracing the process while it is alive to read its resolv.conf.
    let run_in = |pod: &observer_tests::Pod| {
        pod.command("python3")
            .args(["-c", WARM_THEN_DB])
            .timeout(Duration::from_secs(120))
            .output()
            .expect("connect script")
            .check("connect script")
            .expect("the pod connected");
    };
    let flagged_db = |r: &Value| r["query_name"] == "db" && r["flagged"] == true;
    let args = ["--cluster-cidr", "198.18.0.0/15"];

    let agent =
        confined_agent(uid, &caps, &args).unwrap_or_else(|AgentExited { status, stderr }| {
            panic!(
                "with the manifest's capabilities {caps:?} the agent exited ({status}):\n{stderr}"
            )
        });
    let flagged_in = |cgroup: u64, within: Duration| {
        agent.poll_for_record(within, |r| {
            r["cgroup_id"].as_u64() == Some(cgroup) && flagged_db(r)
        })
    };
    run_in(&story);
    run_in(&custom);
    for pod in [&story, &custom] {
        let record = flagged_in(pod.cgroup().container.id(), WAIT).unwrap_or_else(|| {
            panic!(
                "with {caps:?} the escape of pod {} was not flagged: {:#?}\n{}",
                pod.name(),
                agent.records_of_cgroup(pod.cgroup().container.id()),
                agent.stderr()
            )
        });
        assert_eq!(record["search_domain"], "another-lab.com");
        assert_eq!(record["server_address"], "db.another-lab.com");
    }
    drop(agent);

    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let name = format!("CAP_{missing}");
        match confined_agent(uid, &fewer, &args) {
            Err(AgentExited { status, stderr }) => {
                assert!(!status.success());
                assert!(
                    stderr.contains(&name),
                    "without {name} the agent exited, but its message does not name it:\n{stderr}"
                );
            }
            Ok(agent) => {
                // Still running: the capability is needed for part of the job. That part
                // must be missing and the log must say which capability would give it.
                run_in(&custom);
                let cgroup = custom.cgroup().container.id();
                let flagged = agent.poll_for_record(Duration::from_secs(3), |r| {
                    r["cgroup_id"].as_u64() == Some(cgroup) && flagged_db(r)
                });
                assert!(
                    flagged.is_none(),
                    "without {name} the agent still did everything: is {name} needed at all?"
                );
                assert!(
                    agent.stderr().contains(&name),
                    "without {name} the custom search list escaped unseen and nothing named {name}:\n{}",
                    agent.stderr()
                );
            }
        }
    }
}
