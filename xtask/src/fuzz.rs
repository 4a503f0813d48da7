//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` (one at a time: the machine
//! has two cores) and fails if any of them finds a crash, a hang or a leak.
//!
//! Each target starts from its committed seeds (`fuzz/seeds/<target>`, real samples) plus
//! what earlier runs found (`fuzz/corpus/<target>`, not committed). Crashes are left in
//! `fuzz/artifacts/<target>/` by libFuzzer; turn each into a unit test of its module.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// Every fuzz target, named as in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 7] = [
    "dns_parse",
    "dns_tcp",
    "probe_decode",
    "cgroup_path",
    "resolv_conf",
    "kube_objects",
    "correlate_core",
];

/// How long each target runs by default (`cargo xtask fuzz`, and the step of `cargo xtask test`).
pub const SHORT_SECONDS: u32 = 25;
/// Executions per target for `--long`.
pub const LONG_RUNS: u64 = 10_000_000;

/// libFuzzer's `-max_len` per target, where its default (4096 bytes) only slows a target down.
/// correlate_core reads about 8 bytes a step, and its caps (4 scopes, 12 pending queries, 24
/// answers) fill within a few dozen steps: 1024 bytes reach every bound at 2.7x the speed.
fn max_len(target: &str) -> Option<u32> {
    (target == "correlate_core").then_some(1024)
}

/// Targets whose code under test has `unsafe` blocks: they always run under AddressSanitizer.
/// (The DNS parser builds a name's text from bytes it has checked are ASCII.)
const UNSAFE_TARGETS: [&str; 3] = ["probe_decode", "dns_parse", "dns_tcp"];

/// The sanitizer the targets are built and run with (cargo fuzz's `-s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sanitizer {
    /// AddressSanitizer: the default, and the only choice for code with `unsafe` (probe_decode,
    /// dns_parse, dns_tcp).
    Address,
    /// None: for targets whose code has no `unsafe` block, where ASan finds nothing that Rust's
    /// own checks miss and costs correlate_core 7x its speed.
    None,
}

impl Sanitizer {
    fn flag(self) -> &'static str {
        match self {
            Sanitizer::Address => "address",
            Sanitizer::None => "none",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Budget {
    Seconds(u32),
    Runs(u64),
}

struct Outcome {
    target: &'static str,
    executions: Option<u64>,
    seconds: f64,
    corpus: usize,
    passed: bool,
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .join("fuzz")
}

/// Installs cargo-fuzz from crates.io when it is missing (nightly is part of setup).
pub fn setup() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        crate::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Runs the named targets (all when empty) with the given budget.
pub fn run(targets: &[String], budget: Budget, sanitizer: Sanitizer) -> Result<()> {
    setup()?;
    let chosen: Vec<&'static str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets
            .iter()
            .map(|t| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|k| k == t)
                    .with_context(|| format!("no fuzz target {t}; targets: {TARGETS:?}"))
            })
            .collect::<Result<_>>()?
    };
    if let Some(t) = chosen
        .iter()
        .find(|t| sanitizer == Sanitizer::None && UNSAFE_TARGETS.contains(t))
    {
        bail!("{t} drives code with `unsafe` blocks: it runs under AddressSanitizer only");
    }
    let dir = fuzz_dir();
    // One build for all targets, before any of them runs.
    crate::run(nightly_cargo(&dir).args(["fuzz", "build", "-O", "-a", "-s", sanitizer.flag()]))?;
    let mut outcomes = Vec::new();
    for target in chosen {
        outcomes.push(run_one(&dir, target, budget, sanitizer)?);
    }
    println!(
        "\n{:<14} {:>12} {:>9} {:>8}  result",
        "target", "executions", "seconds", "corpus"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>12} {:>9.1} {:>8}  {}",
            o.target,
            o.executions.map_or("?".to_owned(), |n| n.to_string()),
            o.seconds,
            o.corpus,
            if o.passed {
                "ok"
            } else {
                "FAILED (see fuzz/artifacts)"
            }
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.target)
        .collect();
    if !failed.is_empty() {
        bail!("fuzz targets found crashes: {failed:?}");
    }
    Ok(())
}

fn nightly_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"]).current_dir(dir);
    // cargo xtask runs under the stable toolchain; its variables would pin the nested build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "CARGO_MANIFEST_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run_one(
    dir: &Path,
    target: &'static str,
    budget: Budget,
    sanitizer: Sanitizer,
) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    let logs = dir.join("logs");
    for d in [&corpus, &logs] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let log_file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = nightly_cargo(dir);
    cmd.args(["fuzz", "run", "-O", "-a", "-s", sanitizer.flag(), target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        // A single input that takes a second, or a process over 2 GiB, is a finding.
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    match budget {
        Budget::Seconds(s) => cmd.arg(format!("-max_total_time={s}")),
        Budget::Runs(n) => cmd.arg(format!("-runs={n}")),
    };
    if let Some(len) = max_len(target) {
        cmd.arg(format!("-max_len={len}"));
    }
    cmd.stderr(log_file);
    println!(
        "fuzzing {target} ({budget:?}, sanitizer {}); log in {}",
        sanitizer.flag(),
        log.display()
    );
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log).unwrap_or_default();
    let executions = text
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|n| n.trim().parse().ok());
    let corpus_len = fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!(
            "{target} failed ({status}); end of its log:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(Outcome {
        target,
        executions,
        seconds,
        corpus: corpus_len,
        passed: status.success(),
    })
}
