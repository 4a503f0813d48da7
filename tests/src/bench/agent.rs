//! The real agent (`observer run`) as the benchmark runs it: standard output to /dev/null
//! (it still formats every record), its log to a file, stopped with SIGTERM.
use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use observer_tests::agent::{NotReady, free_local_port, http_get, metric_sum, wait_http_ready};

use super::util::{cpu_seconds, status_kib};

pub struct AgentProcess {
    child: Option<Child>,
    metrics: std::net::SocketAddr,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts `observer run` without Kubernetes; `extra` are more of its flags (e.g.
    /// `--ring-size-kib`).
    pub fn start(bin: &Path, extra: &[String], log: &Path) -> anyhow::Result<Self> {
        Self::spawn(bin, &["--kube".into(), "off".into()], extra, None, log)
    }

    /// Starts `observer run --kube auto` as the agent of `node`, with the API server of
    /// `kubeconfig`; `extra` are more of its flags.
    pub fn start_with_kube(
        bin: &Path,
        kubeconfig: &Path,
        node: &str,
        extra: &[String],
        log: &Path,
    ) -> anyhow::Result<Self> {
        let kube = [
            "--kube".into(),
            "auto".into(),
            "--node-name".into(),
            node.into(),
        ];
        Self::spawn(bin, &kube, extra, Some(kubeconfig), log)
    }

    fn spawn(
        bin: &Path,
        kube: &[String],
        extra: &[String],
        kubeconfig: Option<&Path>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_local_port()).parse()?;
        let log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(bin);
        match kubeconfig {
            Some(path) => command.env("KUBECONFIG", path),
            None => command.env_remove("KUBECONFIG"),
        };
        let child = command
            .arg("run")
            .args(kube)
            .args(["--output", "json", "--log-level", "warn"])
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(extra)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = Self {
            child: Some(child),
            metrics,
            log: log.to_owned(),
        };
        agent.wait_ready(Duration::from_secs(30))?;
        Ok(agent)
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let every = Duration::from_millis(50);
        match wait_http_ready(&mut self.child, self.metrics, "/readyz", within, every) {
            Ok(()) => Ok(()),
            Err(NotReady::Exited(status)) => bail!(
                "the agent exited before it was ready ({status}); its log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
            Err(NotReady::TimedOut) => bail!("the agent was not ready within {within:?}"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        Ok(cpu_seconds(self.pid())?)
    }

    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        Ok((
            status_kib(self.pid(), "VmRSS:")?,
            status_kib(self.pid(), "VmHWM:")?,
        ))
    }

    /// Kernel events lost so far, by `program/reason` (a payload cut is delivered, so it
    /// is not a loss and not listed).
    pub fn kernel_lost(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let (code, body) = http_get(self.metrics, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        let mut lost = BTreeMap::new();
        for line in body.lines() {
            let Some(rest) = line.strip_prefix("observer_kernel_events_lost_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let label = |key: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default()
            };
            if label("reason") == "dns_capture_cut" {
                continue;
            }
            let n = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            lost.insert(format!("{}/{}", label("program"), label("reason")), n);
        }
        Ok(lost)
    }

    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        self.metric_with(name, &[])
    }

    /// The sum of metric `name`'s series that carry `labels`.
    pub fn metric_with(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let (_, body) = http_get(self.metrics, "/metrics")?;
        Ok(metric_sum(&body, name, labels))
    }

    /// SIGTERM, then a bounded wait.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child with a valid signal.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the agent did not stop within 15 s of SIGTERM")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
