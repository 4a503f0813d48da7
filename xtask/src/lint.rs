//! The static checks `cargo xtask test` runs first: formatting, clippy on the host crates,
//! on the fuzz targets (their own workspace, so the host clippy does not see them) and on
//! the kernel crate for its own target (as aya's CI does), all warnings denied.
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::{cargo, run};

pub fn lint() -> Result<()> {
    let checkout = crate::workspace_root();
    run(cargo().args(["fmt", "--all", "--check"])).context("cargo fmt --check")?;
    run(cargo()
        .args(["fmt", "--check", "--manifest-path"])
        .arg(checkout.join("fuzz/Cargo.toml")))
    .context("cargo fmt --check on the fuzz targets")?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        .context("clippy on the host crates")?;
    run(cargo()
        .args(["clippy", "--bins", "--manifest-path"])
        .arg(checkout.join("fuzz/Cargo.toml"))
        // The workspace's target directory: the observer crate they use is already checked.
        .arg("--target-dir")
        .arg(checkout.join("target"))
        .args(["--", "-D", "warnings"]))
    .context("clippy on the fuzz targets")?;
    kernel_clippy()
}

/// Clippy on observer-ebpf for bpfel-unknown-none with the nightly toolchain, the way
/// observer's build.rs builds it (core rebuilt from source). Its own target directory keeps
/// the nightly's artifacts apart from the host build.
fn kernel_clippy() -> Result<()> {
    let checkout = crate::workspace_root();
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "clippy"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .arg("--target-dir")
        .arg(checkout.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        .current_dir(checkout.join("observer-ebpf"))
        // `cargo xtask` runs under the stable toolchain: let rustup pick the nightly's own
        // cargo and rustc.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    run(&mut cmd).context("clippy on the kernel programs (bpfel-unknown-none)")
}
