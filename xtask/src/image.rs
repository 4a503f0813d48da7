//! `cargo xtask image`: the agent's OCI image, built without a container engine's daemon and
//! without pulling anything. The release binary (stripped), the shared libraries it links
//! (found by ldd, copied from this machine's Debian) and the CA certificates (for https OTLP
//! endpoints) are laid out in a staging root, which buildah commits as the one layer of an
//! image from scratch: no shell, no package manager. The Dockerfile lays out the same files.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, executable, run};

/// Where the agent lives in the image; the DaemonSet runs it through the entrypoint.
const AGENT_PATH: &str = "usr/local/bin/observer";
/// The CA bundle rustls' native roots read (Debian's ca-certificates).
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// The agent's metrics, health and readiness port (the DaemonSet's `metrics` port).
const METRICS_PORT: &str = "9464/tcp";
/// The image's name; its tag is the agent's version.
const IMAGE_NAME: &str = "observer";

/// What `cargo xtask image` made.
pub struct Image {
    pub archive: PathBuf,
    pub reference: String,
    pub version: String,
    pub commit: String,
    /// Bytes of every file in the image, as a runtime unpacks it.
    pub unpacked_bytes: u64,
}

/// Builds the release agent and its image; writes `target/image/observer-<version>.oci.tar`.
pub fn build(workspace: &Path) -> Result<Image> {
    let agent = release_agent()?;
    let (version, commit) = agent_version(&agent)?;
    let dir = workspace.join("target/image");
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    }
    let unpacked_bytes = stage_rootfs(&agent, &rootfs)?;

    let reference = format!("{IMAGE_NAME}:{version}");
    let archive = dir.join(format!("{IMAGE_NAME}-{version}.oci.tar"));
    if archive.exists() {
        fs::remove_file(&archive).with_context(|| format!("removing {}", archive.display()))?;
    }
    // A store of its own, removed afterwards: building leaves nothing in the machine's
    // container storage, and needs no storage configuration (vfs works on any filesystem).
    let store = dir.join("buildah-store");
    let buildah = Buildah::new(&store);
    let result = buildah.commit_rootfs(&rootfs, &archive, &reference, &version, &commit);
    if store.exists() {
        fs::remove_dir_all(&store).with_context(|| format!("removing {}", store.display()))?;
    }
    result?;
    Ok(Image {
        archive,
        reference,
        version,
        commit,
        unpacked_bytes,
    })
}

/// `cargo build --release` of the agent; the path cargo reports.
fn release_agent() -> Result<PathBuf> {
    let out = cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "--package",
            "observer",
            "--bin",
            "observer",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo build --release")?;
    if !out.status.success() {
        bail!("building the release agent failed: {}", out.status);
    }
    executable(&String::from_utf8_lossy(&out.stdout), "observer").map(PathBuf::from)
}

/// The version and commit the agent reports (`observer 0.1.0 (commit abc)`): one source,
/// the binary itself, for the image's tag and labels.
fn agent_version(agent: &Path) -> Result<(String, String)> {
    let out = Command::new(agent)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", agent.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(text.trim())
        .with_context(|| format!("unexpected `observer --version` output: {text:?}"))
}

fn parse_version(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("observer ")?;
    let (version, commit) = rest.split_once(" (commit ")?;
    Some((version.to_owned(), commit.strip_suffix(')')?.to_owned()))
}

/// Lays out the image's files under `rootfs`; returns their total size in bytes.
fn stage_rootfs(agent: &Path, rootfs: &Path) -> Result<u64> {
    let mut files = vec![];
    let agent_in_image = rootfs.join(AGENT_PATH);
    create_parent(&agent_in_image)?;
    // Symbols only serve debugging on a build machine; the image ships without them.
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&agent_in_image)
        .arg(agent))
    .context("stripping the agent (strip comes with the Debian package binutils)")?;
    files.push(agent_in_image);
    for library in shared_libraries(agent)? {
        files.push(copy_into(rootfs, &library)?);
    }
    files.push(copy_into(rootfs, Path::new("/").join(CA_BUNDLE).as_path())?);
    let mut total = 0;
    for file in &files {
        total += fs::metadata(file)
            .with_context(|| format!("reading {}", file.display()))?
            .len();
    }
    Ok(total)
}

/// The shared libraries `binary` loads, with the dynamic loader, as ldd resolves them on
/// this machine: the image carries them at the same paths.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd (it comes with the Debian package libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = text.lines().find(|l| l.contains("not found")) {
        bail!(
            "{} needs a library this machine lacks: {}",
            binary.display(),
            missing.trim()
        );
    }
    let libraries = parse_ldd(&text);
    if !libraries
        .iter()
        .any(|l| l.to_string_lossy().contains("libc.so"))
    {
        bail!(
            "ldd found no libc for {}: is it dynamically linked?",
            binary.display()
        );
    }
    Ok(libraries)
}

/// Paths from ldd's lines `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file and is left out.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.trim(),
                None => line.trim(),
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `file` (its content, symlinks followed) to the same path under `rootfs`.
fn copy_into(rootfs: &Path, file: &Path) -> Result<PathBuf> {
    let target = rootfs.join(file.strip_prefix("/").unwrap_or(file));
    create_parent(&target)?;
    fs::copy(file, &target).with_context(|| {
        format!(
            "copying {} into the image (CA certificates come with the Debian package ca-certificates)",
            file.display()
        )
    })?;
    Ok(target)
}

fn create_parent(path: &Path) -> Result<()> {
    let parent = path.parent().context("a path in the image has a parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))
}

/// buildah on a private store.
struct Buildah {
    store: PathBuf,
}

impl Buildah {
    fn new(store: &Path) -> Self {
        Self {
            store: store.to_owned(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(self.store.join("root"))
            .arg("--runroot")
            .arg(self.store.join("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        let out = cmd
            .output()
            .context("running buildah (it comes with the Debian package buildah)")?;
        if !out.status.success() {
            bail!(
                "buildah {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn commit_rootfs(
        &self,
        rootfs: &Path,
        archive: &Path,
        reference: &str,
        version: &str,
        commit: &str,
    ) -> Result<()> {
        let container = self.output(&["from", "scratch"])?;
        let rootfs = format!("{}/", rootfs.display());
        self.output(&["copy", "--chown", "0:0", &container, &rootfs, "/"])?;
        let version_label = format!("org.opencontainers.image.version={version}");
        let revision_label = format!("org.opencontainers.image.revision={commit}");
        let entrypoint = format!(r#"["/{AGENT_PATH}"]"#);
        self.output(&[
            "config",
            "--entrypoint",
            &entrypoint,
            "--cmd",
            "run",
            // The DaemonSet's runAsUser/runAsGroup; its comments say why uid 0.
            "--user",
            "0:0",
            "--port",
            METRICS_PORT,
            "--label",
            "org.opencontainers.image.title=observer",
            "--label",
            &version_label,
            "--label",
            &revision_label,
            "--label",
            "org.opencontainers.image.licenses=MIT OR Apache-2.0",
            &container,
        ])?;
        let destination = format!("oci-archive:{}:{reference}", archive.display());
        self.output(&[
            "commit",
            "--format",
            "oci",
            "--rm",
            &container,
            &destination,
        ])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_library_and_loader_paths_without_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn version_line_gives_version_and_commit() {
        assert_eq!(
            parse_version("observer 0.1.0 (commit 0123456789ab)"),
            Some(("0.1.0".to_owned(), "0123456789ab".to_owned()))
        );
        assert_eq!(parse_version("observer 0.1.0"), None);
    }
}
