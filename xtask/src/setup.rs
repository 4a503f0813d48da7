//! Idempotent installation of observer's prerequisites. Each step checks first and says
//! what it found, so a second run is quick and quiet about what is already there.
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run};

/// LLVM major version of the nightly toolchain; bpf-linker must be built against the same.
const LLVM_MAJOR: u32 = 22;

/// Debian packages needed to build bpf-linker against the system LLVM.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Debian packages the testbed uses: namespaces and a real DNS server.
const TESTBED_PACKAGES: &[&str] = &["iproute2", "dnsmasq-base", "python3", "bpftool"];

/// Debian packages the deployment tests use: promtool (in `prometheus`) checks and
/// unit-tests the alert rules, and the live alert tests run Prometheus itself; setpriv (in
/// `util-linux`) runs the agent with exactly the DaemonSet's capabilities; gnuplot renders
/// the dashboard's panels to a PNG (with the DejaVu font).
const DEPLOY_PACKAGES: &[&str] = &[
    "prometheus",
    "util-linux",
    "gnuplot-nox",
    "fonts-dejavu-core",
];

/// The Kubernetes schema validator (PyPI), pinned: 1.37.0 ships the schemas of
/// Kubernetes 1.25 to 1.37, and brings PyYAML, which the deployment tests read YAML with.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Everything: what building needs and what the test suite needs.
pub fn all() -> Result<()> {
    build_prerequisites()?;
    apt_install("testbed", TESTBED_PACKAGES)?;
    apt_install("deployment checks", DEPLOY_PACKAGES)?;
    kubernetes_validate()?;
    say("setup complete");
    Ok(())
}

/// What building the kernel programs needs.
pub fn build_prerequisites() -> Result<()> {
    nightly_rust_src()?;
    apt_install("LLVM for bpf-linker", BUILD_PACKAGES)?;
    bpf_linker()?;
    Ok(())
}

fn say(msg: &str) {
    eprintln!("[setup] {msg}");
}

fn nightly_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup (is Rust installed through rustup?)")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain: the kernel programs need one (rustup toolchain install nightly)"
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        say("nightly rust-src: present");
        return Ok(());
    }
    say("nightly rust-src: installing");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub(crate) fn apt_install(purpose: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        say(&format!("{purpose}: {} present", packages.join(", ")));
        return Ok(());
    }
    say(&format!("{purpose}: installing {}", missing.join(", ")));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get update (setup needs root to install Debian packages)")?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn bpf_linker() -> Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output()
        && out.status.success()
    {
        say(&format!(
            "bpf-linker: present ({})",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
        return Ok(());
    }
    say("bpf-linker: building against the system LLVM (a few minutes, once)");
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")))
}

fn kubernetes_validate() -> Result<()> {
    if let Ok(out) = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        && out.status.success()
    {
        say(&format!(
            "kubernetes-validate: present ({})",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
        return Ok(());
    }
    say(&format!(
        "kubernetes-validate: installing {KUBERNETES_VALIDATE} with pip"
    ));
    let pip = || {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--quiet", KUBERNETES_VALIDATE]);
        cmd
    };
    if run(&mut pip()).is_ok() {
        return Ok(());
    }
    // Debian's own python3 refuses pip installs outside a virtual environment (PEP 668);
    // this machine is a test machine, not a desktop: install system-wide anyway.
    say("kubernetes-validate: retrying with --break-system-packages (PEP 668 Python)");
    run(pip().arg("--break-system-packages"))
        .context("pip install kubernetes-validate (is python3-pip installed?)")
}
