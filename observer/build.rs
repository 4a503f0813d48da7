//! Builds the kernel programs (observer-ebpf) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker, leaving the object in OUT_DIR for `include_bytes_aligned!`.
//! `AYA_BUILD_SKIP=1` skips this (host-only clippy or docs).
//!
//! Also names the git commit of the tree in `OBSERVER_GIT_COMMIT` for the binary.
use anyhow::{Context as _, anyhow};

#[path = "build/git_commit.rs"]
mod git_commit;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let override_value = std::env::var(git_commit::OVERRIDE_VAR).ok();
    let (commit, watched) = git_commit::commit_of(
        std::path::Path::new(&manifest_dir),
        override_value.as_deref(),
    );
    println!("cargo:rerun-if-env-changed={}", git_commit::OVERRIDE_VAR);
    for file in watched {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rustc-env={}={commit}", git_commit::OVERRIDE_VAR);

    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name == "observer-ebpf")
        .ok_or_else(|| anyhow!("the observer-ebpf package is not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
