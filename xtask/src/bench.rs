//! `cargo xtask bench`: what observer costs a node, each figure measured against a baseline
//! taken in the same run. This task only prepares and builds; the measuring is done by the
//! `observer-bench` driver (package observer-tests), which needs root, a built agent and the
//! testbed. Results go to `target/bench/` of the workspace (never committed); every run's
//! figures are appended, with its date, to `target/bench/history.jsonl`.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, is_root, run, setup};

/// Debian packages only the benchmarks use: the DNS load generator, the plotter and the
/// font it draws with.
const BENCH_PACKAGES: &[&str] = &["dnsperf", "gnuplot-nox", "fonts-dejavu-core"];

pub fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks load eBPF programs, enable kernel.bpf_stats_enabled and build network namespaces: run `cargo xtask bench` as root"
        );
    }
    setup::all()?;
    setup::apt_install("benchmarks", BENCH_PACKAGES)?;

    let root = crate::workspace_root();
    let out = bench_dir(&root)?;

    // Release builds of what is measured: the agent and the driver.
    let agent = build_agent(&root, &out)?;
    let release = build_driver(&root)?;

    // The correlation core's own benchmark, summary only (the criterion groups are skipped
    // by a filter that matches none of them): throughput and the 1M-answer memory peak.
    let core_log = out.join("correlate.txt");
    let log =
        File::create(&core_log).with_context(|| format!("creating {}", core_log.display()))?;
    eprintln!("[bench] correlation core replay (cargo bench -p observer --bench correlate)");
    run(cargo()
        .arg("bench")
        .args(CORE_BENCH)
        .args(["--", "summary-only"])
        .stdout(log))?;

    let core_bin = build_core_replay(&root)?;
    run(driver(&release, &root, "run", &agent, &out, quick)
        .arg("--core-log")
        .arg(&core_log)
        .arg("--core-bin")
        .arg(&core_bin))
}

/// `cargo xtask bench --kube`: the large-cluster phase alone (the agent against the
/// stand-in API server; a few minutes).
pub fn kube(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the agent loads eBPF programs: run `cargo xtask bench --kube` as root");
    }
    setup::all()?;
    let root = crate::workspace_root();
    let out = bench_dir(&root)?;
    let agent = build_agent(&root, &out)?;
    let release = build_driver(&root)?;
    run(&mut driver(&release, &root, "kube", &agent, &out, quick))
}

/// Where every phase writes its report, created if need be.
fn bench_dir(root: &Path) -> Result<PathBuf> {
    let out = root.join("target").join("bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    Ok(out)
}

/// The bench driver (`observer-bench` in `release`) running `phase` against `agent`,
/// reporting into `out`.
fn driver(
    release: &Path,
    root: &Path,
    phase: &str,
    agent: &Path,
    out: &Path,
    quick: bool,
) -> Command {
    let mut driver = Command::new(release.join("observer-bench"));
    driver
        .current_dir(root)
        .arg(phase)
        .arg("--agent")
        .arg(agent)
        .arg("--out")
        .arg(out);
    if quick {
        driver.arg("--quick");
    }
    driver
}

/// Builds the agent in release and returns a private copy of it in `out`: the build
/// directory may be shared.
fn build_agent(root: &Path, out: &Path) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "observer",
        "--bin",
        "observer",
    ]))?;
    let agent = out.join("observer");
    std::fs::copy(target_dir(root)?.join("release").join("observer"), &agent)
        .with_context(|| format!("copying the agent binary to {}", agent.display()))?;
    Ok(agent)
}

/// `cargo xtask bench --instructions`: the userspace instruction counts alone.
pub fn instructions() -> Result<()> {
    setup::apt_install("instruction counts", setup::PROFILE_PACKAGES)?;
    let root = crate::workspace_root();
    let out = bench_dir(&root)?;
    let release = build_driver(&root)?;
    let core_bin = build_core_replay(&root)?;
    run(Command::new(release.join("observer-bench"))
        .current_dir(&root)
        .arg("instructions")
        .arg("--core-bin")
        .arg(&core_bin)
        .arg("--out")
        .arg(&out))
}

/// Builds the driver in release; returns the directory it is in.
fn build_driver(root: &Path) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "observer-tests",
        "--bin",
        "observer-bench",
    ]))?;
    Ok(target_dir(root)?.join("release"))
}

/// The correlation core's benchmark: the replay whose summary the report reads and whose
/// instructions callgrind counts.
const CORE_BENCH: [&str; 4] = ["--package", "observer", "--bench", "correlate"];

/// Builds the correlation core's benchmark (the replay that callgrind counts) and returns
/// its executable, as cargo reports it (the file name carries a hash).
fn build_core_replay(root: &Path) -> Result<PathBuf> {
    let out = cargo()
        .arg("bench")
        .args(CORE_BENCH)
        .args(["--no-run", "--message-format=json"])
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the correlate benchmark")?;
    if !out.status.success() {
        bail!("building the correlate benchmark failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let key = "\"executable\":\"";
    text.lines()
        // The agent's binary is built too: the benchmark target is the one of kind bench.
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"")
                && l.contains("\"kind\":[\"bench\"]")
                && l.contains("\"name\":\"correlate\"")
        })
        .find_map(|l| {
            let start = l.find(key)? + key.len();
            let len = l[start..].find('"')?;
            Some(PathBuf::from(&l[start..start + len]))
        })
        .context("cargo reported no executable for the correlate benchmark")
}

/// Cargo's target directory for this workspace (CARGO_TARGET_DIR or the config may move it).
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let key = "\"target_directory\":\"";
    let start = text
        .find(key)
        .map(|i| i + key.len())
        .context("cargo metadata names no target_directory")?;
    let len = text[start..]
        .find('"')
        .context("cargo metadata's target_directory is not a string")?;
    Ok(PathBuf::from(&text[start..start + len]))
}
