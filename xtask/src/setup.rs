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
const TESTBED_PACKAGES: &[&str] = &["iproute2", "dnsmasq-base", "python3"];

/// Everything: what building needs and what the test suite needs.
pub fn all() -> Result<()> {
    build_prerequisites()?;
    apt_install("testbed", TESTBED_PACKAGES)?;
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
