//! `cargo xtask bench`: what observer costs a node, each figure measured against a baseline
//! taken in the same run. This task only prepares and builds; the measuring is done by the
//! `observer-bench` driver (package observer-tests), which needs root, a built agent and the
//! testbed. Results go to `target/bench/` of the workspace (never committed).
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
    let out = root.join("target").join("bench");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    // Release builds of what is measured: the agent and the driver.
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "observer",
        "--bin",
        "observer",
    ]))?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "observer-tests",
        "--bin",
        "observer-bench",
    ]))?;
    let release = target_dir(&root)?.join("release");
    // The build directory may be shared: measure a private copy of this tree's agent.
    let agent = out.join("observer");
    std::fs::copy(release.join("observer"), &agent)
        .with_context(|| format!("copying the agent binary to {}", agent.display()))?;

    // The correlation core's own benchmark, summary only (the criterion groups are skipped
    // by a filter that matches none of them): throughput and the 1M-answer memory peak.
    let core_log = out.join("correlate.txt");
    let log =
        File::create(&core_log).with_context(|| format!("creating {}", core_log.display()))?;
    eprintln!("[bench] correlation core replay (cargo bench -p observer --bench correlate)");
    run(cargo()
        .args([
            "bench",
            "--package",
            "observer",
            "--bench",
            "correlate",
            "--",
            "summary-only",
        ])
        .stdout(log))?;

    let mut driver = Command::new(release.join("observer-bench"));
    driver
        .arg("run")
        .arg("--agent")
        .arg(&agent)
        .arg("--core-log")
        .arg(&core_log)
        .arg("--out")
        .arg(&out);
    if quick {
        driver.arg("--quick");
    }
    run(&mut driver)
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
