//! A real Prometheus (Debian's `prometheus`) as the live alert and dashboard tests run it:
//! on a loopback port, with a data directory of its own, scraping the agents every second
//! and evaluating observer's shipped rules every second; killed and its directory removed
//! on drop, also when the test fails. Read through its own HTTP API (`/api/v1/...`).
//!
//! The one change made to the shipped rules is [`LiveRules`]: the rules of
//! `deploy/monitoring/prometheusrule.yaml` with every `for:` set to one short hold, so a test
//! sees each alert go pending, then firing, in seconds instead of the minutes a cluster
//! waits. Expressions, labels and annotations are the shipped ones, untouched.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    agent::{NotReady, free_local_port, http_get, wait_http_ready},
    deploy_files::{prometheus_rule, require_tool},
    names::RunId,
};

/// How often the test Prometheus scrapes its targets and evaluates its rules.
pub const INTERVAL: &str = "1s";

/// The shipped alert rules as a live test loads them.
///
/// In the shipped file some alerts wait (`for: 5m`, `10m`, `15m`) and the others fire at
/// their first true evaluation. Here every alert waits exactly `hold`: the long waits are
/// shortened, and the immediate ones are held long enough that the pending state can be
/// seen. Nothing else differs from the shipped file.
#[derive(Clone, Debug)]
pub struct LiveRules {
    /// The `spec` of the PrometheusRule (`{"groups": [...]}`), as Prometheus reads a rules file.
    pub groups: Value,
    pub hold: Duration,
}

impl LiveRules {
    /// The shipped rules, every `for:` set to `hold`.
    pub fn shipped_with_hold(hold: Duration) -> LiveRules {
        let mut groups = prometheus_rule()["spec"].clone();
        let hold_text = format!("{}s", hold.as_secs().max(1));
        for group in groups["groups"].as_array_mut().expect("groups") {
            group["interval"] = json!(INTERVAL);
            for rule in group["rules"].as_array_mut().expect("rules") {
                if rule.get("alert").is_some() {
                    rule["for"] = json!(hold_text);
                }
            }
        }
        LiveRules { groups, hold }
    }

    /// The `for:` each alert has in the shipped file (`None`: fires at once).
    pub fn shipped_for() -> Vec<(String, Option<String>)> {
        prometheus_rule()["spec"]["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules").clone())
            .filter_map(|r| {
                Some((
                    r["alert"].as_str()?.to_owned(),
                    r["for"].as_str().map(str::to_owned),
                ))
            })
            .collect()
    }
}

/// One agent Prometheus scrapes, and the `node` label its target carries (as the
/// ServiceMonitor's relabeling adds it in a cluster).
#[derive(Clone, Debug)]
pub struct ScrapeTarget {
    pub addr: SocketAddr,
    pub node: String,
}

/// A running Prometheus.
pub struct Prometheus {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` with `rules`, and waits until it is ready.
    pub fn start(targets: &[ScrapeTarget], rules: &LiveRules) -> Prometheus {
        let binary = require_tool("prometheus", "the Debian package prometheus");
        let dir =
            std::env::temp_dir().join(format!("observer-prometheus-{}", RunId::new().suffix()));
        std::fs::create_dir_all(dir.join("data")).expect("Prometheus's temporary directory");
        // JSON is YAML: Prometheus reads both files as written here.
        std::fs::write(
            dir.join("rules.yaml"),
            serde_json::to_string_pretty(&rules.groups).expect("rules as JSON"),
        )
        .expect("writing the rules file");
        let config = json!({
            "global": {
                "scrape_interval": INTERVAL,
                "scrape_timeout": INTERVAL,
                "evaluation_interval": INTERVAL,
            },
            "rule_files": [dir.join("rules.yaml")],
            "scrape_configs": [{
                "job_name": "observer",
                // As the ServiceMonitor: the series' namespace/workload are the observed pod's.
                "honor_labels": true,
                "static_configs": targets.iter().map(|t| json!({
                    "targets": [t.addr.to_string()],
                    "labels": {"node": t.node},
                })).collect::<Vec<_>>(),
            }],
        });
        std::fs::write(
            dir.join("prometheus.yml"),
            serde_json::to_string_pretty(&config).expect("config as JSON"),
        )
        .expect("writing the Prometheus configuration");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_local_port())
            .parse()
            .expect("loopback address");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("Prometheus's log file");
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let mut prometheus = Prometheus {
            child: Some(child),
            addr,
            dir,
        };
        // A hang guard: Prometheus starts in about a second natively, far slower in a
        // kernel matrix guest.
        prometheus.wait_ready(Duration::from_secs(300));
        prometheus
    }

    fn wait_ready(&mut self, within: Duration) {
        let every = Duration::from_millis(100);
        match wait_http_ready(&mut self.child, self.addr, "/-/ready", within, every) {
            Ok(()) => {}
            Err(NotReady::Exited(status)) => {
                panic!("prometheus exited ({status}); its log:\n{}", self.log())
            }
            Err(NotReady::TimedOut) => panic!(
                "prometheus was not ready within {within:?}; its log:\n{}",
                self.log()
            ),
        }
    }

    /// Prometheus's own log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/<path>` and its `data`; panics on an error answer.
    pub fn api(&self, path: &str) -> Value {
        let (code, body) = http_get(self.addr, &format!("/api/v1/{path}"))
            .unwrap_or_else(|e| panic!("GET /api/v1/{path}: {e}"));
        let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("GET /api/v1/{path} answered {code}, not JSON ({e}): {body}")
        });
        assert!(
            code == 200 && answer["status"] == "success",
            "GET /api/v1/{path} answered {code}: {body}"
        );
        answer["data"].clone()
    }

    /// An instant query: the result vector (`[{"metric": {...}, "value": [t, "v"]}, ...]`).
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let data = self.api(&format!("query?query={}", url_encode(promql)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// A range query over the last `span`, one point per `step`: the result matrix.
    pub fn query_range(&self, promql: &str, span: Duration, step: Duration) -> Vec<Value> {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        let data = self.api(&format!(
            "query_range?query={}&start={:.3}&end={end:.3}&step={}",
            url_encode(promql),
            end - span.as_secs_f64(),
            step.as_secs_f64()
        ));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The values of `label` over the series `match_selector` selects.
    pub fn label_values(&self, label: &str, match_selector: &str) -> Vec<String> {
        let data = self.api(&format!(
            "label/{label}/values?match[]={}",
            url_encode(match_selector)
        ));
        data.as_array()
            .expect("a list of values")
            .iter()
            .map(|v| v.as_str().expect("string").to_owned())
            .collect()
    }

    /// Every alert Prometheus holds now (pending and firing), as `/api/v1/alerts` lists them.
    pub fn alerts(&self) -> Vec<Value> {
        self.api("alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The rule groups with their last evaluation (`/api/v1/rules`).
    pub fn rule_groups(&self) -> Vec<Value> {
        self.api("rules")["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The scrape targets and their health (`/api/v1/targets`).
    pub fn targets(&self) -> Vec<Value> {
        self.api("targets")["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls `check` until it returns a value; panics with `what`, the alerts and the log
    /// after `guard` (a hang guard, not a timing claim).
    pub fn wait_for<T>(
        &self,
        what: &str,
        guard: Duration,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + guard;
        loop {
            if let Some(found) = check() {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {what} did not happen within the {guard:?} guard; alerts now:\n{}\nits log:\n{}",
                serde_json::to_string_pretty(&self.alerts()).unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every rule group has been evaluated `rounds` more times than now: every
    /// alert has then seen the series scraped before this call.
    pub fn wait_evaluations(&self, rounds: u32, guard: Duration) {
        let last = |groups: &[Value]| -> Vec<String> {
            groups
                .iter()
                .map(|g| g["lastEvaluation"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        for _ in 0..rounds {
            let before = last(&self.rule_groups());
            self.wait_for("a new round of rule evaluations", guard, || {
                let now = last(&self.rule_groups());
                now.iter().zip(&before).all(|(n, b)| n != b).then_some(())
            });
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
