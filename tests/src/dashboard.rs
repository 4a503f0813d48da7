//! observer's Grafana dashboard (`deploy/monitoring/dashboards/observer-egress-dns.json`) as
//! the live tests use it: its variables and panel queries run against a real Prometheus
//! with Grafana's variables filled in, and each panel's data rendered to a PNG with
//! gnuplot, since no Grafana runs here.
use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    deploy_files::{deploy_dir, document_of_kind, require_tool},
    prometheus::Prometheus,
};

/// One panel: its title and its PromQL as written in the dashboard.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub kind: String,
    pub expr: String,
}

impl Panel {
    /// The labels the query groups by (`by (...)`, without `le`): every series it returns
    /// must carry them, or the legend shows nothing.
    pub fn grouping_labels(&self) -> Vec<String> {
        self.expr
            .split("by (")
            .skip(1)
            .flat_map(|rest| {
                rest.split(')')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty() && l != "le")
                    .collect::<Vec<_>>()
            })
            .fold(Vec::new(), |mut labels, l| {
                if !labels.contains(&l) {
                    labels.push(l);
                }
                labels
            })
    }
}

/// The shipped dashboard JSON.
pub fn shipped() -> Value {
    let path = deploy_dir().join("monitoring/dashboards/observer-egress-dns.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The dashboard as its ConfigMap (for the Grafana sidecar) carries it, and the ConfigMap.
pub fn from_configmap() -> (Value, Value) {
    let cm = document_of_kind(
        &deploy_dir().join("monitoring/grafana-dashboard.yaml"),
        "ConfigMap",
    );
    let data = cm["data"].as_object().expect("ConfigMap data");
    assert_eq!(data.len(), 1, "one dashboard in the ConfigMap");
    let (_, json) = data.iter().next().expect("one key");
    let dashboard =
        serde_json::from_str(json.as_str().expect("text")).expect("the ConfigMap holds JSON");
    (dashboard, cm)
}

/// Every panel's query.
pub fn panels(dashboard: &Value) -> Vec<Panel> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|t| Panel {
                    title: p["title"].as_str().expect("title").to_owned(),
                    kind: p["type"].as_str().expect("type").to_owned(),
                    expr: t["expr"].as_str().expect("expr").to_owned(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A query variable's PromQL: the selector of its `label_values(selector, label)` and the label.
pub fn variable_query(dashboard: &Value, name: &str) -> (String, String) {
    let var = dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no variable {name}"));
    let query = var["query"]["query"].as_str().expect("variable query");
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{name}: not label_values(...): {query}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .expect("label_values(selector, label)");
    (selector.trim().to_owned(), label.trim().to_owned())
}

/// Grafana's variables filled in as a user's choice would fill them.
pub fn fill(expr: &str, namespace: &str, workload: &str, rate_interval: &str) -> String {
    expr.replace("$namespace", namespace)
        .replace("$workload", workload)
        .replace("$__rate_interval", rate_interval)
}

/// Renders `panels` (variables already filled) over the last `span` from `prometheus` into
/// one PNG at `out`, a plot per panel, with gnuplot.
pub fn render_png(prometheus: &Prometheus, panels: &[Panel], span: Duration, out: &Path) {
    let gnuplot = require_tool("gnuplot", "the Debian package gnuplot-nox");
    let columns = 2;
    let rows = panels.len().div_ceil(columns);
    let mut script = String::new();
    let _ = writeln!(
        script,
        "set terminal pngcairo size 1600,{} font 'DejaVu Sans,9' noenhanced\n\
         set output '{}'\n\
         set datafile missing 'NaN'\n\
         set key below font ',8'\n\
         set xlabel 'seconds'\n\
         set grid\n\
         set multiplot layout {rows},{columns}",
        rows * 420,
        out.display()
    );
    for (i, panel) in panels.iter().enumerate() {
        let step = Duration::from_secs(2);
        let series = prometheus.query_range(&panel.expr, span, step);
        let start = series
            .iter()
            .filter_map(|s| s["values"][0][0].as_f64())
            .fold(f64::INFINITY, f64::min);
        let labels = panel.grouping_labels();
        let mut plots = Vec::new();
        for (j, s) in series.iter().enumerate() {
            let block = format!("$p{i}s{j}");
            let _ = writeln!(script, "{block} << EOD");
            for point in s["values"].as_array().expect("values") {
                let t = point[0].as_f64().expect("time") - start;
                let v = point[1].as_str().expect("value");
                let _ = writeln!(script, "{t:.0} {v}");
            }
            let _ = writeln!(script, "EOD");
            let legend: Vec<&str> = labels
                .iter()
                .map(|l| s["metric"][l].as_str().unwrap_or("?"))
                .collect();
            plots.push(format!(
                "{block} using 1:2 with lines lw 2 title '{}'",
                legend.join("/").replace('\'', "")
            ));
        }
        let _ = writeln!(script, "set title '{}'", panel.title.replace('\'', ""));
        if plots.is_empty() {
            let _ = writeln!(script, "plot NaN title 'no data'");
        } else {
            let _ = writeln!(script, "plot {}", plots.join(", "));
        }
    }
    let _ = writeln!(script, "unset multiplot");
    let mut child = Command::new(gnuplot)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting gnuplot");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes())
        .expect("writing the gnuplot script");
    let result = child.wait_with_output().expect("waiting for gnuplot");
    assert!(
        result.status.success(),
        "gnuplot failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let png = std::fs::read(out).expect("gnuplot wrote the PNG");
    assert!(png.starts_with(b"\x89PNG"), "{} is a PNG", out.display());
}
