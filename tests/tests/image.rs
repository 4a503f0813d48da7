//! The image users deploy: built by `cargo xtask image` (the command users run), read as an
//! OCI archive, loaded by podman into a store of its own and run with runc under exactly what
//! deploy/manifests/40-daemonset.yaml asks for, derived from the manifest itself.
//!
//! What podman cannot take from the manifest as written, and what stands in for it here:
//! - the pod network (hostNetwork: false) is a testbed pod's network namespace;
//! - `fieldRef: spec.nodeName` is a node name of the test's own;
//! - the collector's Service address is an OTLP receiver on that pod network's loopback;
//! - seccomp RuntimeDefault is podman's own default profile with the rules containerd's
//!   default profile has for CAP_BPF and CAP_PERFMON (Debian's podman 4.3 predates them and
//!   allows bpf() only with CAP_SYS_ADMIN);
//! - podman's default rlimits are above what a process here may set: the container gets
//!   lower ones (nofile and nproc 4096).
//!
//! A missing tool fails the test with the package to install; nothing is skipped.
// deploy.rs uses the rest of the manifest helpers.
#[allow(dead_code)]
mod deploy_support;

#[path = "../../observer/build/git_commit.rs"]
mod git_commit;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
    time::{Duration, Instant},
};

use deploy_support::agent_container;
use observer_tests::deploy_files::{deploy_dir, document_of_kind, require_tool};
use observer_tests::{
    NetNs, Pod, PodSpec,
    agent::http_get,
    otlp::{OtlpReceiver, bind_loopback},
    story::{EXTERNAL_DB, Story},
    traces::{bool_attr, str_attr, wait_for_trace},
};
use serde_json::Value;

/// The goal the issue sets for the unpacked image.
const MAX_IMAGE_BYTES: u64 = 25 * 1024 * 1024;
/// Hang guards: the agent loads its kernel programs in well under a second natively; VMs
/// run ~10x slower.
const READY_WAIT: Duration = Duration::from_secs(90);
const TRACE_WAIT: Duration = Duration::from_secs(60);
/// Where the agent serves /metrics, /healthz and /readyz (the DaemonSet's `metrics` port).
const METRICS_PORT: u16 = 9464;
/// The seccomp profile podman ships (Debian's golang-github-containers-common).
const PODMAN_SECCOMP: &str = "/usr/share/containers/seccomp.json";
/// The node name the downward API would give.
const NODE_NAME: &str = "image-test-node";

fn workspace() -> PathBuf {
    deploy_dir()
        .parent()
        .expect("deploy/ lives in the workspace root")
        .to_owned()
}

/// `cargo xtask image`, once per test binary: the archive it printed. In the kernel
/// matrix's guests, which have no cargo, the archive the host built for them
/// (`OBSERVER_IMAGE_ARCHIVE`).
fn image_archive() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        if let Some(path) = std::env::var_os("OBSERVER_IMAGE_ARCHIVE") {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "OBSERVER_IMAGE_ARCHIVE names {path:?}, not a file"
            );
            return path;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["xtask", "image"])
            .current_dir(workspace())
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running cargo xtask image");
        assert!(
            out.status.success(),
            "cargo xtask image failed: {}",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.trim().lines().last().expect("the archive's path"));
        assert!(
            path.is_file(),
            "cargo xtask image printed {path:?}, not a file"
        );
        path
    })
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn checked(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {shown}: {e}"));
    assert!(out.status.success(), "{shown} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("observer-image-{what}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The archive unpacked: its OCI index, manifest, config and layer listing.
struct OciArchive {
    config: Value,
    /// (path, size) of every regular file in the image's layers.
    files: Vec<(String, u64)>,
    /// Paths of everything that is neither a regular file nor a directory.
    others: Vec<String>,
}

fn read_archive(archive: &Path) -> OciArchive {
    require_tool("tar", "the Debian package tar");
    let dir = TempDir::new("oci");
    checked(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&dir.0),
    );
    let json = |path: PathBuf| -> Value {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let blob = |digest: &Value| {
        let digest = digest.as_str().expect("digest");
        dir.0
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").expect("sha256 digest"))
    };
    let layout = json(dir.0.join("oci-layout"));
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index = json(dir.0.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let manifest = json(blob(&manifests[0]["digest"]));
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let config = json(blob(&manifest["config"]["digest"]));
    let mut files = Vec::new();
    let mut others = Vec::new();
    for layer in manifest["layers"].as_array().expect("layers") {
        let listing = checked(Command::new("tar").arg("-tvf").arg(blob(&layer["digest"])));
        for line in listing.lines() {
            // `-rwxr-xr-x 0/0 12345 2026-01-01 00:00 usr/local/bin/observer`
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (mode, size, path) = (fields[0], fields[2], fields[5..].join(" "));
            match mode.chars().next() {
                Some('-') => files.push((path, size.parse().expect("size"))),
                Some('d') => {}
                _ => others.push(path),
            }
        }
    }
    OciArchive {
        config,
        files,
        others,
    }
}

/// The commit the tree under test comes from, as build.rs names it.
fn expected_commit() -> String {
    git_commit::commit_of(
        &workspace().join("observer"),
        std::env::var(git_commit::OVERRIDE_VAR).ok().as_deref(),
    )
    .0
}

/// podman with a store of its own (removed on drop) and runc.
struct Podman {
    store: TempDir,
}

impl Podman {
    fn new() -> Self {
        require_tool("podman", "the Debian package podman");
        require_tool("runc", "the Debian package runc");
        Self {
            store: TempDir::new("store"),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(self.store.0.join("root"))
            .arg("--runroot")
            .arg(self.store.0.join("run"))
            // vfs works on any filesystem; crun refuses this machine's hybrid cgroups.
            .args(["--storage-driver", "vfs", "--runtime", "runc"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        checked(self.command().args(args))
    }

    /// Loads the archive; returns the image reference podman gave it.
    fn load(&self, archive: &Path) -> String {
        let out = checked(self.command().arg("load").arg("--input").arg(archive));
        out.lines()
            .find_map(|l| l.strip_prefix("Loaded image: "))
            .unwrap_or_else(|| panic!("podman load named no image: {out}"))
            .trim()
            .to_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
    }
}

/// What the DaemonSet asks of the container runtime, in podman's words.
struct Deployment {
    /// `podman run` options.
    options: Vec<String>,
    /// The container's `args` (after the image's entrypoint).
    args: Vec<String>,
    /// terminationGracePeriodSeconds: how long SIGTERM may take before SIGKILL.
    grace: Duration,
    capabilities: Vec<String>,
    /// Files the options refer to (ConfigMap contents, the seccomp profile).
    _files: TempDir,
}

/// podman's default seccomp profile, with bpf() and perf_event_open() allowed under
/// CAP_BPF and CAP_PERFMON as containerd's default profile (RuntimeDefault on containerd
/// nodes) allows them, besides CAP_SYS_ADMIN.
fn runtime_default_seccomp() -> Value {
    let gates = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let text = std::fs::read_to_string(PODMAN_SECCOMP).unwrap_or_else(|e| {
        panic!("{PODMAN_SECCOMP}: {e} (it comes with the Debian package golang-github-containers-common, a dependency of podman)")
    });
    let mut profile: Value = serde_json::from_str(&text).expect("seccomp profile JSON");
    let mut rules = Vec::new();
    for mut rule in profile["syscalls"]
        .as_array()
        .expect("syscalls")
        .iter()
        .cloned()
    {
        // Rules that refuse these calls without CAP_SYS_ADMIN must also let the new
        // capability through (a rule is left out when any of its `excludes` caps is held).
        if rule["action"] == "SCMP_ACT_ERRNO" {
            for (call, cap) in gates {
                let names = rule["names"].as_array_mut().expect("names");
                if let Some(at) = names.iter().position(|n| n == call) {
                    names.remove(at);
                    let mut refusal = rule.clone();
                    refusal["names"] = serde_json::json!([call]);
                    let excludes = refusal["excludes"]
                        .as_object_mut()
                        .expect("excludes")
                        .entry("caps")
                        .or_insert_with(|| serde_json::json!([]));
                    excludes.as_array_mut().expect("caps").push(cap.into());
                    rules.push(refusal);
                }
            }
        }
        rules.push(rule);
    }
    for (call, cap) in gates {
        rules.push(serde_json::json!({
            "names": [call], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}
        }));
    }
    profile["syscalls"] = Value::Array(rules);
    profile
}

/// `256Mi` and friends, as Kubernetes writes memory quantities, in bytes.
fn quantity_bytes(quantity: &str) -> u64 {
    let units = [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| quantity.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((quantity, 1));
    number.parse::<u64>().expect("a whole quantity") * unit
}

/// `--ulimit` options for every container: podman's defaults (nofile 1048576, nproc
/// 4194304) are above what a process may set on these machines, and so is this test's own
/// nproc limit (runc's setrlimit is refused). The agent needs far fewer of either; with
/// dropped capabilities nproc counts every process of uid 0 on the machine, which stays
/// well below this here.
const ULIMITS: [&str; 2] = ["--ulimit=nofile=4096:4096", "--ulimit=nproc=4096:4096"];

impl Deployment {
    /// The DaemonSet's pod and container settings. `pod_network` is where the pod network
    /// of a CNI would be; `env` replaces the values of the named variables.
    fn from_manifest(pod_network: &NetNs, env: &[(&str, String)]) -> Self {
        let ds = document_of_kind(
            &deploy_dir().join("manifests/40-daemonset.yaml"),
            "DaemonSet",
        );
        let pod = &ds["spec"]["template"]["spec"];
        let c = agent_container(&ds);
        let sc = &c["securityContext"];
        let files = TempDir::new("deployment");
        let mut options: Vec<String> = Vec::new();
        let mut add = |o: String| options.push(o);

        assert_eq!(
            sc["privileged"], false,
            "a privileged container needs no test"
        );
        add(format!(
            "--user={}:{}",
            sc["runAsUser"].as_u64().expect("runAsUser"),
            sc["runAsGroup"].as_u64().expect("runAsGroup")
        ));
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        add("--cap-drop=all".into());
        let capabilities: Vec<String> = sc["capabilities"]["add"]
            .as_array()
            .expect("capabilities.add")
            .iter()
            .map(|c| format!("CAP_{}", c.as_str().expect("capability")))
            .collect();
        if sc["readOnlyRootFilesystem"] == true {
            // Kubernetes mounts no tmpfs of its own on /tmp or /run: neither does podman here.
            add("--read-only".into());
            add("--read-only-tmpfs=false".into());
        }
        if sc["allowPrivilegeEscalation"] == false {
            add("--security-opt=no-new-privileges".into());
        }
        match pod["securityContext"]["seccompProfile"]["type"].as_str() {
            Some("RuntimeDefault") => {
                let path = files.0.join("seccomp.json");
                std::fs::write(&path, runtime_default_seccomp().to_string())
                    .expect("writing the seccomp profile");
                add(format!("--security-opt=seccomp={}", path.display()));
            }
            other => panic!("seccompProfile {other:?}: teach the test what it means"),
        }
        if pod["hostPID"] == true {
            add("--pid=host".into());
        }
        if pod["hostNetwork"] == true {
            add("--network=host".into());
        } else {
            add(format!("--network=ns:{}", pod_network.path().display()));
        }
        if let Some(memory) = c["resources"]["limits"]["memory"].as_str() {
            add(format!("--memory={}", quantity_bytes(memory)));
        }
        for ulimit in ULIMITS {
            add(ulimit.to_owned());
        }

        let volumes: BTreeMap<&str, &Value> = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .map(|v| (v["name"].as_str().expect("volume name"), v))
            .collect();
        for mount in c["volumeMounts"].as_array().expect("volumeMounts") {
            let name = mount["name"].as_str().expect("mount name");
            let target = mount["mountPath"].as_str().expect("mountPath");
            let mode = if mount["readOnly"] == true {
                "ro"
            } else {
                "rw"
            };
            let volume = volumes[name];
            let source = if let Some(host) = volume["hostPath"]["path"].as_str() {
                PathBuf::from(host)
            } else if let Some(map) = volume["configMap"]["name"].as_str() {
                let cm = configmap(map);
                let dir = files.0.join(name);
                std::fs::create_dir_all(&dir).expect("ConfigMap dir");
                for (key, value) in cm["data"].as_object().expect("ConfigMap data") {
                    std::fs::write(dir.join(key), value.as_str().expect("text data"))
                        .expect("writing a ConfigMap key");
                }
                dir
            } else {
                panic!("volume {volume}: teach the test this kind");
            };
            add(format!("--volume={}:{target}:{mode}", source.display()));
        }

        for var in c["env"].as_array().expect("env") {
            let name = var["name"].as_str().expect("env name");
            let value = if let Some((_, v)) = env.iter().find(|(n, _)| *n == name) {
                v.clone()
            } else if let Some(v) = var["value"].as_str() {
                v.to_owned()
            } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
                NODE_NAME.to_owned()
            } else {
                panic!("env {var}: teach the test this source");
            };
            add(format!("--env={name}={value}"));
        }
        for (name, _) in env {
            assert!(
                c["env"]
                    .as_array()
                    .expect("env")
                    .iter()
                    .any(|v| v["name"] == *name),
                "{name} is not in the manifest: nothing to replace"
            );
        }

        Deployment {
            options,
            args: c["args"]
                .as_array()
                .expect("args")
                .iter()
                .map(|a| a.as_str().expect("arg").to_owned())
                .collect(),
            grace: Duration::from_secs(
                pod["terminationGracePeriodSeconds"]
                    .as_u64()
                    .expect("terminationGracePeriodSeconds"),
            ),
            capabilities,
            _files: files,
        }
    }
}

fn configmap(name: &str) -> Value {
    let cm = document_of_kind(
        &deploy_dir().join("manifests/30-configmap.yaml"),
        "ConfigMap",
    );
    assert_eq!(cm["metadata"]["name"], name);
    cm
}

/// A container started detached; removed (killed first if need be) on drop.
struct Container<'a> {
    podman: &'a Podman,
    name: String,
}

impl<'a> Container<'a> {
    fn start(
        podman: &'a Podman,
        image: &str,
        deployment: &Deployment,
        capabilities: &[String],
    ) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "observer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let mut cmd = podman.command();
        cmd.args(["run", "--detach", "--name", &name])
            .args(&deployment.options);
        if !capabilities.is_empty() {
            cmd.arg(format!("--cap-add={}", capabilities.join(",")));
        }
        cmd.arg(image).args(&deployment.args);
        checked(&mut cmd);
        Self { podman, name }
    }

    fn inspect(&self, format: &str) -> String {
        self.podman
            .run(&["inspect", "--format", format, &self.name])
            .trim()
            .to_owned()
    }

    fn running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    fn logs(&self) -> String {
        let out = self
            .podman
            .command()
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        text(&out)
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self
            .podman
            .command()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

/// GET `path` on the agent's port, from inside the pod network.
fn get_in(netns: &NetNs, path: &str) -> std::io::Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    netns
        .run(|| http_get(addr, path))
        .map_err(std::io::Error::other)?
}

/// Waits for /readyz to answer 200; `Err` with the logs if the container exits first.
fn wait_until_ready(container: &Container<'_>, pod_network: &NetNs) -> Result<(), String> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if !container.running() {
            return Err(container.logs());
        }
        if let Ok((200, _)) = get_in(pod_network, "/readyz") {
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer 200 within {READY_WAIT:?}: {}",
            container.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_archive_holds_the_agent_its_libraries_and_ca_certificates_only() {
    let archive = image_archive();
    let image = read_archive(archive);
    assert!(
        image.others.is_empty(),
        "links or devices: {:?}",
        image.others
    );
    let paths: Vec<&str> = image.files.iter().map(|(p, _)| p.as_str()).collect();
    for path in &paths {
        let file = path.rsplit('/').next().expect("name");
        assert!(
            *path == "usr/local/bin/observer"
                || *path == "etc/ssl/certs/ca-certificates.crt"
                || file.contains(".so"),
            "{path} is neither the agent, a shared library nor the CA bundle: {paths:?}"
        );
    }
    for needed in [
        "usr/local/bin/observer",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(paths.contains(&needed), "{needed} is missing: {paths:?}");
    }
    assert!(
        paths.iter().any(|p| p.contains("libc.so")),
        "glibc is missing: {paths:?}"
    );
    let unpacked: u64 = image.files.iter().map(|(_, size)| size).sum();
    eprintln!(
        "image: {} files, {:.1} MiB unpacked",
        paths.len(),
        unpacked as f64 / (1024.0 * 1024.0)
    );
    assert!(
        unpacked <= MAX_IMAGE_BYTES,
        "the image unpacks to {unpacked} bytes, above the {MAX_IMAGE_BYTES}-byte goal: {:?}",
        image.files
    );

    // The runtime settings the manifest relies on: the entrypoint it passes `args` to.
    let config = &image.config["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/observer"])
    );
    assert_eq!(config["User"], "0:0");
    assert!(config["ExposedPorts"].get("9464/tcp").is_some(), "{config}");
    assert_eq!(image.config["os"], "linux");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.revision"],
        expected_commit()
    );

    // skopeo reads it as a registry client would.
    require_tool("skopeo", "the Debian package skopeo");
    let inspected: Value = serde_json::from_str(&checked(
        Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", archive.display())),
    ))
    .expect("skopeo inspect prints JSON");
    assert_eq!(inspected["Labels"], *labels);

    // The entrypoint reports the version and the commit, as the labels do.
    let podman = Podman::new();
    let reference = podman.load(archive);
    let version = podman.run(&[
        "run",
        "--rm",
        ULIMITS[0],
        ULIMITS[1],
        "--network=none",
        &reference,
        "--version",
    ]);
    let label_version = labels["org.opencontainers.image.version"]
        .as_str()
        .expect("version label");
    assert_eq!(
        version.trim(),
        format!("observer {label_version} (commit {})", expected_commit())
    );
    assert!(
        reference.ends_with(&format!("observer:{label_version}")),
        "{reference}"
    );
}

#[test]
fn a_tree_without_git_history_reports_commit_unknown_unless_told() {
    let outside = TempDir::new("no-git");
    assert_eq!(
        git_commit::commit_of(&outside.0, None),
        (git_commit::UNKNOWN.to_owned(), Vec::new())
    );
    assert_eq!(
        git_commit::commit_of(&outside.0, Some("0123456789ab")).0,
        "0123456789ab"
    );
    // In a checkout, HEAD's commit, and the files that change with it.
    require_tool("git", "the Debian package git");
    let (commit, watched) = git_commit::commit_of(&workspace(), None);
    let head = checked(Command::new("git").arg("-C").arg(workspace()).args([
        "rev-parse",
        "--short=12",
        "HEAD",
    ]));
    assert_eq!(commit, head.trim());
    assert!(watched.iter().any(|p| p.ends_with("HEAD")), "{watched:?}");
}

/// What a containerised agent runs in: the story's cluster, the agent's own pod network
/// (the DaemonSet is not hostNetwork), podman and the name of the image loaded into it.
fn stage() -> (Story, Pod, Podman, String) {
    let archive = image_archive();
    let story = Story::new();
    let network = story
        .tb
        .add_pod(PodSpec::new("observer"))
        .expect("the agent's pod network");
    let podman = Podman::new();
    let image = podman.load(archive);
    (story, network, podman, image)
}

/// In the testbed, the containerised agent, under the DaemonSet's own settings, becomes
/// ready, flags the story's escape in a trace carrying the node's name, and on SIGTERM
/// detaches and exits 0 within the grace period.
#[test]
fn under_the_daemonsets_security_context_the_image_flags_the_story_and_stops_cleanly() {
    let (story, network, podman, image) = stage();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime for the OTLP receiver");
    // Bound inside the pod network: the agent reaches it there, as it would a collector.
    let (grpc, http) = network
        .netns()
        .run(|| {
            (
                bind_loopback().expect("gRPC listener"),
                bind_loopback().expect("HTTP listener"),
            )
        })
        .expect("entering the agent's pod network");
    let receiver = rt
        .block_on(OtlpReceiver::start_on(grpc, http))
        .expect("OTLP receiver in the agent's pod network");
    let deployment = Deployment::from_manifest(
        network.netns(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_url())],
    );
    let container = Container::start(&podman, &image, &deployment, &deployment.capabilities);

    if let Err(logs) = wait_until_ready(&container, network.netns()) {
        panic!("the container exited before it was ready: {logs}");
    }

    story.connect("db", EXTERNAL_DB.into());
    let trace = wait_for_trace(&receiver, story.cgroup_id(), TRACE_WAIT, |t| {
        bool_attr(&t.root.attributes, "observer.flagged") == Some(true)
    });
    let a = &trace.root.attributes;
    assert_eq!(str_attr(a, "observer.resolution"), Some("search-escape"));
    assert_eq!(str_attr(a, "observer.query.name"), Some("db"));
    assert_eq!(
        str_attr(a, "observer.search_domain"),
        Some("another-lab.com")
    );
    assert_eq!(str_attr(a, "server.address"), Some("db.another-lab.com"));
    assert_eq!(
        str_attr(&trace.resource, "k8s.node.name"),
        Some(NODE_NAME),
        "NODE_NAME reaches the agent"
    );
    let (code, _) = get_in(network.netns(), "/readyz").expect("/readyz");
    assert_eq!(code, 200);

    // The kubelet's stop: SIGTERM, then SIGKILL once the grace period is over.
    podman.run(&[
        "stop",
        "--time",
        &deployment.grace.as_secs().to_string(),
        &container.name,
    ]);
    let logs = container.logs();
    assert_eq!(
        container.inspect("{{.State.ExitCode}}"),
        "0",
        "the agent did not exit 0 on SIGTERM within {:?}: {logs}",
        deployment.grace
    );
    assert!(logs.contains("kernel programs detached"), "{logs}");
    assert!(
        logs.contains(&format!("(commit {}) starting", expected_commit())),
        "the first log line names the version and commit: {logs}"
    );
}

/// Started without any one of the manifest's capabilities, the container either exits
/// naming it, or keeps running and its log names it (the part of the job it cannot do).
#[test]
fn a_container_without_one_of_the_capabilities_names_it() {
    let (story, network, podman, image) = stage();
    let deployment = Deployment::from_manifest(network.netns(), &[]);
    let mut exited = Vec::new();
    for missing in &deployment.capabilities {
        let fewer: Vec<String> = deployment
            .capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let container = Container::start(&podman, &image, &deployment, &fewer);
        match wait_until_ready(&container, network.netns()) {
            Err(logs) => {
                assert_ne!(container.inspect("{{.State.ExitCode}}"), "0");
                assert!(
                    logs.contains(missing.as_str()),
                    "without {missing} the container exited, but its log does not name it: {logs}"
                );
                exited.push(missing.clone());
            }
            Ok(()) => {
                // Still running: the capability is needed for part of the job, which a
                // pod's connect exercises; the log must say which capability would do it.
                story.connect("db", EXTERNAL_DB.into());
                let deadline = Instant::now() + TRACE_WAIT;
                while !container.logs().contains(missing.as_str()) {
                    assert!(
                        Instant::now() < deadline,
                        "without {missing} the container runs and names nothing: {}",
                        container.logs()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    assert!(
        exited.iter().any(|c| c == "CAP_BPF"),
        "without CAP_BPF the agent cannot load anything: it must exit ({exited:?})"
    );
}
