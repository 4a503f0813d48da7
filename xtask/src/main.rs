//! observer's developer tasks. Every task runs the setup steps it needs first, so a
//! fresh machine goes from clone to green with one command.
mod bench;
mod fuzz;
mod image;
mod lint;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "observer's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every prerequisite (idempotent): nightly rust-src, LLVM 22, bpf-linker,
    /// the testbed's programs, the image tools (buildah, podman, runc, skopeo) and valgrind.
    Setup,
    /// Build the kernel programs and the agent.
    Build {
        /// Build with optimisations.
        #[arg(long)]
        release: bool,
    },
    /// Build the agent's OCI image from a release build (no daemon, nothing pulled):
    /// target/image/observer-<version>.oci.tar, for podman load, docker load or skopeo.
    /// Prints the archive's path on standard output.
    Image,
    /// The incident in one command (root): a small cluster, the real agent, a pod whose
    /// `db` escapes through a search domain, what observer saw, and the fix.
    Demo,
    /// Run the whole suite (root): formatting and clippy (host crates and the kernel
    /// crate), unit tests, the privileged integration tests on this machine's kernel, a
    /// short fuzz run and the kernel matrix (`vm-test`). Every part runs even when an
    /// earlier one failed; a summary gives each part's result and time. A filtered run
    /// (test name given) runs only the matching tests on this kernel.
    Test {
        /// Leave out the kernel matrix (a quicker local run; CI always runs it).
        #[arg(long)]
        host_only: bool,
        /// Extra arguments passed to the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// The kernel matrix (root): boots Debian's 5.10, 6.1 and 6.12 kernels in QEMU with
    /// virtme-ng and runs the privileged test binaries inside each. Prints a table (kernel x
    /// test binary) and writes it to target/vm-matrix/matrix.md.
    VmTest {
        /// Kernels to boot (5.10, 6.1, 6.12; default: all).
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Test binaries to run (default: those xtask's table gives each kernel).
        #[arg(long = "test")]
        tests: Vec<String>,
    },
    /// Formatting and clippy with warnings denied, on the host crates and on the kernel
    /// crate for its own target.
    Lint,
    /// Measure what observer costs a node (root): in-kernel cost, throughput with and
    /// without the agent, losses, agent CPU and memory, core replay, userspace instruction
    /// counts (callgrind). Writes target/bench/.
    Bench {
        /// Shorter runs and fewer alternations (about a third of the time, noisier).
        #[arg(long)]
        quick: bool,
        /// Only the userspace instruction counts (callgrind on the core replay; about a
        /// minute, no root needed). Writes target/bench/instructions.{json,md}.
        #[arg(long, conflicts_with = "quick")]
        instructions: bool,
        /// Only the large-cluster phase (root): the agent against the stand-in API server
        /// holding 5,000 nodes, 150,000 pods and 20,000 Services, and the 1/10 cluster.
        /// Writes target/bench/kube.{json,md}.
        #[arg(long, conflicts_with = "instructions")]
        kube: bool,
    },
    /// Regenerate the book's reference tables (settings, metrics, JSON fields) from the code.
    Docs,
    /// Run the fuzz targets (fuzz/): 25 s each, or 10M executions each with --long.
    Fuzz {
        /// 10 million executions per target instead of a short run.
        #[arg(long)]
        long: bool,
        /// The sanitizer to build and run with; `none` only for targets without `unsafe`.
        #[arg(long, value_enum, default_value_t = fuzz::Sanitizer::Address)]
        sanitizer: fuzz::Sanitizer,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::all(),
        Task::Build { release } => {
            setup::build_prerequisites()?;
            build(release)
        }
        Task::Image => {
            setup::image_prerequisites()?;
            let image = image::build(&workspace_root())?;
            let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
            let archive_bytes = std::fs::metadata(&image.archive)
                .with_context(|| format!("reading {}", image.archive.display()))?
                .len();
            eprintln!(
                "[image] {} (version {}, commit {}): {:.1} MiB unpacked, archive {:.1} MiB",
                image.reference,
                image.version,
                image.commit,
                mib(image.unpacked_bytes),
                mib(archive_bytes),
            );
            println!("{}", image.archive.display());
            Ok(())
        }
        Task::Demo => {
            setup::all()?;
            demo()
        }
        Task::Test { args, host_only } => {
            setup::all()?;
            if !args.is_empty() {
                return test(&args);
            }
            let mut phases = Phases::default();
            phases.run(
                "lints (fmt, clippy: host crates and the kernel crate)",
                lint::lint,
            );
            phases.run("unit and integration tests on this kernel", || test(&[]));
            // A short fuzz run of every parser of outside bytes.
            phases.run("fuzz (every target, short)", || {
                fuzz::run(
                    &[],
                    fuzz::Budget::Seconds(fuzz::SHORT_SECONDS),
                    fuzz::Sanitizer::Address,
                )
            });
            if host_only {
                eprintln!("[test] --host-only: the kernel matrix (5.10, 6.1, 6.12) was NOT run");
            } else {
                phases.run("kernel matrix (5.10, 6.1, 6.12 in QEMU)", || {
                    vm::run_matrix(&vm::Selection::default())
                });
            }
            phases.finish()
        }
        Task::VmTest { kernels, tests } => {
            setup::all()?;
            vm::run_matrix(&vm::Selection { kernels, tests })
        }
        Task::Lint => {
            setup::build_prerequisites()?;
            lint::lint()
        }
        Task::Bench {
            quick,
            instructions,
            kube,
        } => {
            if instructions {
                bench::instructions()
            } else if kube {
                bench::kube(quick)
            } else {
                bench::bench(quick)
            }
        }
        Task::Docs => {
            setup::build_prerequisites()?;
            docs()
        }
        Task::Fuzz {
            long,
            sanitizer,
            targets,
        } => fuzz::run(
            &targets,
            if long {
                fuzz::Budget::Runs(fuzz::LONG_RUNS)
            } else {
                fuzz::Budget::Seconds(fuzz::SHORT_SECONDS)
            },
            sanitizer,
        ),
    }
}

/// The workspace's root directory (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_owned()
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(is_package_variable) {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Variables cargo sets for the package it runs (here: xtask, or a test that runs xtask).
/// Passed on, they would reach build scripts that watch them (ring's does) and make cargo
/// rebuild those crates whenever the caller differs from a plain `cargo build`.
fn is_package_variable(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_MANIFEST_")
        || matches!(
            name,
            "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    build_agent(release).map(drop)
}

/// Builds the agent's binaries and returns the path of `observer`, which the integration
/// tests receive as `OBSERVER_BIN` (without it, each test executable builds the agent itself).
pub(crate) fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "observer",
        "--bins",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo build")?;
    if !out.status.success() {
        bail!("building the agent failed: {}", out.status);
    }
    executable(&String::from_utf8_lossy(&out.stdout), "observer").map(PathBuf::from)
}

/// The parts of a whole test run: each runs even when an earlier one failed, so one run
/// shows everything that is wrong; the summary gives each part's result and time.
#[derive(Default)]
struct Phases {
    done: Vec<(&'static str, Result<()>, std::time::Duration)>,
}

impl Phases {
    fn run(&mut self, name: &'static str, phase: impl FnOnce() -> Result<()>) {
        eprintln!("[test] {name}");
        let start = std::time::Instant::now();
        let result = phase();
        if let Err(e) = &result {
            eprintln!("[test] {name}: FAILED: {e:#}");
        }
        self.done.push((name, result, start.elapsed()));
    }

    fn finish(self) -> Result<()> {
        eprintln!("\n[test] summary:");
        let mut failed = Vec::new();
        for (name, result, took) in &self.done {
            let verdict = if result.is_ok() { "passed" } else { "FAILED" };
            eprintln!(
                "[test]   {verdict:<6} {:>6.0} s  {name}",
                took.as_secs_f64()
            );
            if result.is_err() {
                failed.push(*name);
            }
        }
        if !failed.is_empty() {
            bail!("failed: {}", failed.join("; "));
        }
        Ok(())
    }
}

fn test(args: &[String]) -> Result<()> {
    // The integration tests start the agent binary: build it once for all of them.
    let agent = build_agent(false)?;
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and build network namespaces: run `cargo xtask test` as root"
        );
    }
    let mut cmd = cargo();
    // Default members: the kernel crate is built by observer's build.rs, not for the host.
    cmd.args(["test", "--no-fail-fast", "--"]);
    cmd.args(args).env("OBSERVER_BIN", agent);
    run(&mut cmd)
}

/// The reference tables are snapshots of what the code produces, checked by a test of the
/// suite; rewriting them is the same test with expect-test's update switch.
fn docs() -> Result<()> {
    run(cargo()
        .args([
            "test",
            "--package",
            "observer",
            "--test",
            "reference_pages",
            "page_",
        ])
        .env("UPDATE_EXPECT", "1"))?;
    eprintln!("[docs] docs/src/reference/generated/ now matches the code (see `git status`)");
    Ok(())
}

fn demo() -> Result<()> {
    // xtask must build before bpf-linker exists, so it never links observer or its tests:
    // cargo builds them and names the executables it made.
    let out = cargo()
        .args([
            "build",
            "--package",
            "observer",
            "--bin",
            "observer",
            "--package",
            "observer-tests",
            "--bin",
            "observer-demo",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo build")?;
    if !out.status.success() {
        bail!("building the agent and the demo failed: {}", out.status);
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    let agent = executable(&messages, "observer")?;
    let demo = executable(&messages, "observer-demo")?;
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and builds network namespaces: run `cargo xtask demo` as root"
        );
    }
    // exec: the demo takes this process's place, so a Ctrl-C reaches it alone (through the
    // terminal) and it tears everything down before the shell prompt comes back.
    let err =
        std::os::unix::process::CommandExt::exec(Command::new(&demo).arg("--agent").arg(&agent));
    Err(err).with_context(|| format!("starting {demo}"))
}

/// The executable cargo reported for binary `name` in its JSON messages.
pub(crate) fn executable(messages: &str, name: &str) -> Result<String> {
    let named = format!(r#""name":"{name}""#);
    messages
        .lines()
        .filter(|l| {
            l.contains(r#""reason":"compiler-artifact""#)
                && l.contains(r#""kind":["bin"]"#)
                && l.contains(&named)
        })
        .find_map(|l| {
            let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(l[start..end].to_owned())
        })
        .with_context(|| format!("cargo did not report the `{name}` executable it built"))
}

pub(crate) fn is_root() -> bool {
    // The effective uid is what the kernel checks; /proc avoids a libc dependency.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
