//! The kernel matrix: the privileged test binaries, run inside Debian's kernels booted in
//! QEMU with virtme-ng (the guest shares this machine's filesystem over 9p, so the same
//! binaries, dnsmasq and python run inside, with pure cgroup2 at /sys/fs/cgroup).
//!
//! Nested KVM hangs on the machines this runs on, so guests run under TCG (about ten times
//! slower than native). The guest writes each binary's result and output to files in the
//! checkout; the host reads them, so neither vng's exit status nor its console matter.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run, setup, workspace_root};

/// A Debian kernel the matrix boots.
pub struct VmKernel {
    /// What the table calls it.
    pub name: &'static str,
    /// The Debian binary package holding vmlinuz and the modules (pinned ABI).
    pub package: &'static str,
    /// `uname -r` of that package.
    pub release: &'static str,
    /// The test binaries (tests/tests/<name>.rs) run on this kernel.
    pub tests: &'static [&'static str],
}

/// Every privileged test binary the matrix knows. New privileged binaries run on the host
/// only until they are added here and to a kernel below.
const ALL_PRIVILEGED: &[&str] = &[
    "kernel_probes",
    "testbed",
    "pod_identity",
    "scenarios_dns",
    "scenarios_pods",
    "agent_run",
    "demo",
    "hardening",
    "deploy",
    "alerts_live",
    "image",
];

/// The binaries that load and exercise the kernel programs end to end: what differs
/// between kernels.
const END_TO_END: &[&str] = &[
    "kernel_probes",
    "scenarios_dns",
    "scenarios_pods",
    "agent_run",
    "demo",
    "hardening",
];

/// What runs where: the one place that says it. 6.1 (Debian 12's own kernel) runs every
/// privileged binary; the oldest and newest kernels run the ones that load and exercise
/// the kernel programs end to end, which is what differs between kernels.
pub const KERNELS: &[VmKernel] = &[
    VmKernel {
        name: "5.10",
        package: "linux-image-5.10.0-32-amd64",
        release: "5.10.0-32-amd64",
        tests: END_TO_END,
    },
    VmKernel {
        name: "6.1",
        package: "linux-image-6.1.0-57-amd64",
        release: "6.1.0-57-amd64",
        tests: ALL_PRIVILEGED,
    },
    VmKernel {
        name: "6.12",
        package: "linux-image-6.12.118+deb12-amd64",
        release: "6.12.118+deb12-amd64",
        tests: END_TO_END,
    },
];

/// Where the kernel packages come from: a sources list used for the download only (never
/// for what this machine installs), with the archive's own keyring.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

/// Debian packages the host needs to boot the guests: QEMU, busybox for virtme-ng's
/// initramfs, depmod for the downloaded kernels' modules.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];

/// virtme-ng (PyPI), pinned: the version the matrix was proven with.
const VIRTME_NG_VERSION: &str = "1.42";

/// Names the image archive the image test uses instead of building one (read by
/// tests/tests/image.rs).
const IMAGE_ARCHIVE_VARIABLE: &str = "OBSERVER_IMAGE_ARCHIVE";

/// Guest size: two vCPUs (the machines have two cores) and room for the agent and the
/// testbed's servers.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "3G";

/// Hang guard per test binary inside the guest: far above the slowest binary under TCG,
/// so it only ends a test that would never end.
const TEST_HANG_GUARD: Duration = Duration::from_secs(25 * 60);
/// Hang guard for a guest's boot and shutdown on top of its tests' guards.
const BOOT_HANG_GUARD: Duration = Duration::from_secs(5 * 60);

/// What to run: kernels by name and test binaries by name (empty: all of the table).
#[derive(Default)]
pub struct Selection {
    pub kernels: Vec<String>,
    pub tests: Vec<String>,
}

/// One test binary's result in one guest.
struct Outcome {
    passed: bool,
    seconds: f64,
    log: PathBuf,
}

/// One kernel's run.
struct KernelRun {
    kernel: &'static VmKernel,
    /// Boot to shutdown, as the host saw it.
    wall: Duration,
    /// `uname -r` and the cgroup filesystem the guest reported.
    guest: String,
    results: BTreeMap<&'static str, Option<Outcome>>,
    boot_log: PathBuf,
}

impl KernelRun {
    fn passed(&self) -> bool {
        self.results
            .values()
            .all(|r| r.as_ref().is_some_and(|o| o.passed))
    }
}

/// Installs what booting guests needs (idempotent), fetches the kernels (cached), builds
/// the test binaries and runs them in each selected kernel.
pub fn run_matrix(selection: &Selection) -> Result<()> {
    let plan = plan(selection)?;
    if !crate::is_root() {
        bail!("the kernel matrix boots guests that load eBPF programs: run it as root");
    }
    prerequisites()?;
    let checkout = workspace_root();
    let cache = checkout.join("target/vm-kernels");
    let mut images = Vec::new();
    for (kernel, _) in &plan {
        images.push(kernel_image(&cache, kernel)?);
    }
    // The tests run this agent, built once here, rather than build one in the guest.
    let agent = crate::build_agent(false)?;
    let executables = build_tests()?;
    // The guest has no cargo: the image test runs the archive built here (the image is the
    // same on every kernel; what the matrix tests is the runtime starting it on each).
    let mut guest_env = vec![("OBSERVER_BIN", agent.display().to_string())];
    // The guest sees this machine's filesystem: the tools setup installed outside the
    // system directories (PyPI's kubernetes-validate, cargo's binaries) are found there by
    // the same search path.
    if let Some(path) = std::env::var_os("PATH") {
        guest_env.push(("PATH", path.to_string_lossy().into_owned()));
    }
    if plan.iter().any(|(_, tests)| tests.contains(&"image")) {
        setup::image_prerequisites()?;
        let image = crate::image::build(&checkout)?;
        guest_env.push((IMAGE_ARCHIVE_VARIABLE, image.archive.display().to_string()));
    }
    let out_dir = checkout.join("target/vm-matrix");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    let mut runs = Vec::new();
    for ((kernel, tests), image) in plan.iter().zip(&images) {
        let mut binaries = Vec::new();
        for name in tests {
            let exe = executables.get(*name).with_context(|| {
                format!("cargo built no test binary `{name}` (named in xtask's kernel table)")
            })?;
            binaries.push((*name, exe.as_path()));
        }
        runs.push(run_kernel(
            &checkout, &out_dir, kernel, image, &guest_env, &binaries,
        )?);
        // The table so far, so a long run shows progress.
        eprintln!("{}", table(&runs));
    }

    let table = table(&runs);
    let table_file = out_dir.join("matrix.md");
    fs::write(&table_file, &table).with_context(|| format!("writing {}", table_file.display()))?;
    println!(
        "\nKernel matrix (also in {}):\n\n{table}",
        table_file.display()
    );

    let failed: Vec<&KernelRun> = runs.iter().filter(|r| !r.passed()).collect();
    for run in &failed {
        show_failures(run);
    }
    if !failed.is_empty() {
        let names: Vec<String> = failed
            .iter()
            .map(|r| format!("{} ({})", r.kernel.name, r.kernel.release))
            .collect();
        bail!("the kernel matrix failed on {}", names.join(", "));
    }
    Ok(())
}

/// The kernels and, for each, the test binaries to run, from the table and the selection.
fn plan(selection: &Selection) -> Result<Vec<(&'static VmKernel, Vec<&'static str>)>> {
    for name in &selection.kernels {
        if !KERNELS.iter().any(|k| k.name == name) {
            let known: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            bail!(
                "no kernel `{name}` in the matrix (known: {})",
                known.join(", ")
            );
        }
    }
    for name in &selection.tests {
        if !ALL_PRIVILEGED.contains(&name.as_str()) {
            bail!(
                "no test binary `{name}` in the matrix (known: {})",
                ALL_PRIVILEGED.join(", ")
            );
        }
    }
    let plan: Vec<_> = KERNELS
        .iter()
        .filter(|k| selection.kernels.is_empty() || selection.kernels.iter().any(|n| n == k.name))
        .map(|k| {
            let tests: Vec<&'static str> = k
                .tests
                .iter()
                .copied()
                .filter(|t| selection.tests.is_empty() || selection.tests.iter().any(|n| n == t))
                .collect();
            (k, tests)
        })
        .filter(|(_, tests)| !tests.is_empty())
        .collect();
    if plan.is_empty() {
        bail!("the selection names no test binary that the table runs on the selected kernels");
    }
    Ok(plan)
}

fn say(msg: &str) {
    eprintln!("[vm-test] {msg}");
}

/// QEMU, busybox and kmod from Debian; virtme-ng from PyPI.
pub fn prerequisites() -> Result<()> {
    setup::apt_install("kernel matrix", VM_PACKAGES)?;
    let wanted = format!("virtme-ng {VIRTME_NG_VERSION}");
    if let Ok(out) = Command::new("vng").arg("--version").output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).trim() == wanted
    {
        setup::say(&format!("virtme-ng: present ({wanted})"));
        return Ok(());
    }
    setup::pip_install("virtme-ng", &format!("virtme-ng=={VIRTME_NG_VERSION}"))
}

/// The vmlinuz of `kernel`, downloaded and unpacked under `cache` once. The modules sit
/// beside it (`lib/modules/<release>`), where virtme-ng looks for them.
fn kernel_image(cache: &Path, kernel: &VmKernel) -> Result<PathBuf> {
    let root = cache.join(kernel.release);
    let image = root
        .join("boot")
        .join(format!("vmlinuz-{}", kernel.release));
    if image.is_file() {
        say(&format!(
            "kernel {}: cached ({})",
            kernel.name, kernel.release
        ));
        return Ok(image);
    }
    let debs = cache.join("debs");
    let deb = find_deb(&debs, kernel.package)?;
    let deb = match deb {
        Some(deb) => deb,
        None => {
            say(&format!(
                "kernel {}: downloading {}",
                kernel.name, kernel.package
            ));
            download(cache, &debs, kernel.package)?;
            find_deb(&debs, kernel.package)?.with_context(|| {
                format!(
                    "apt-get download left no {}_*.deb in {}",
                    kernel.package,
                    debs.display()
                )
            })?
        }
    };
    // Unpack beside the final place and rename, so an interrupted unpack is never taken
    // for a cached kernel.
    let partial = cache.join(format!("{}.partial", kernel.release));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::rename(&partial, &root).with_context(|| format!("renaming {}", partial.display()))?;
    if !image.is_file() {
        bail!("{} holds no {}", deb.display(), image.display());
    }
    Ok(image)
}

fn find_deb(debs: &Path, package: &str) -> Result<Option<PathBuf>> {
    if !debs.is_dir() {
        return Ok(None);
    }
    let prefix = format!("{package}_");
    for entry in fs::read_dir(debs).with_context(|| format!("reading {}", debs.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `apt-get download` through a sources list, package lists and cache of the matrix's own:
/// this machine's apt configuration and state stay as they are.
fn download(cache: &Path, debs: &Path, package: &str) -> Result<()> {
    let apt = cache.join("apt");
    let lists = apt.join("lists");
    let archives = apt.join("archives");
    for dir in [
        lists.join("partial"),
        archives.join("partial"),
        debs.to_path_buf(),
    ] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let sources = apt.join("sources.list");
    fs::write(&sources, SOURCES).with_context(|| format!("writing {}", sources.display()))?;
    let options = [
        format!("Dir::Etc::sourcelist={}", sources.display()),
        "Dir::Etc::sourceparts=-".to_owned(),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", apt.display()),
        format!("Dir::Cache::archives={}", archives.display()),
        // The files land in the checkout, which apt's unprivileged download user may not
        // be able to write: download as root rather than warn about it.
        "APT::Sandbox::User=root".to_owned(),
    ];
    let apt_get = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        for option in &options {
            cmd.arg("-o").arg(option);
        }
        cmd.args(args).current_dir(debs);
        cmd
    };
    run(&mut apt_get(&["update", "-qq"]))
        .context("apt-get update of the kernel matrix's own sources list")?;
    run(&mut apt_get(&["download", "-qq", package])).with_context(|| {
        format!(
            "downloading {package} (if Debian has dropped this ABI, update xtask's kernel table)"
        )
    })
}

/// Builds the integration test binaries; returns each test binary's path.
fn build_tests() -> Result<BTreeMap<String, PathBuf>> {
    let out = cargo()
        .args([
            "test",
            "--package",
            "observer-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the integration tests failed: {}", out.status);
    }
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains(r#""reason":"compiler-artifact""#) || !line.contains(r#""kind":["test"]"#)
        {
            continue;
        }
        let field = |key: &str| {
            let tag = format!("\"{key}\":\"");
            let start = line.find(&tag)? + tag.len();
            let end = start + line[start..].find('"')?;
            Some(line[start..end].to_owned())
        };
        if let (Some(name), Some(exe)) = (field("name"), field("executable")) {
            executables.insert(name, PathBuf::from(exe));
        }
    }
    Ok(executables)
}

/// The script the guest runs: every binary in turn, each with a hang guard, its output and
/// result written to `dir`.
fn guest_script(
    checkout: &Path,
    dir: &Path,
    env: &[(&str, String)],
    binaries: &[(&str, &Path)],
) -> String {
    let mut script = format!(
        "#!/bin/bash\n\
         # Written by `cargo xtask vm-test`; run inside the guest.\n\
         cd '{checkout}' || exit 1\n\
         echo \"$(uname -r) $(stat -fc %T /sys/fs/cgroup)\" > '{dir}/guest'\n\
         : > '{dir}/results'\n",
        checkout = checkout.display(),
        dir = dir.display(),
    );
    for (name, value) in env {
        let _ = writeln!(script, "export {name}='{value}'");
    }
    for (name, exe) in binaries {
        let _ = write!(
            script,
            "start=$(date +%s%N)\n\
             timeout --kill-after=30 {guard} '{exe}' > '{dir}/{name}.log' 2>&1\n\
             status=$?\n\
             echo \"{name} $status $(( ($(date +%s%N) - start) / 1000000 ))\" >> '{dir}/results'\n",
            guard = TEST_HANG_GUARD.as_secs(),
            exe = exe.display(),
            dir = dir.display(),
        );
    }
    script.push_str("sync\n");
    script
}

fn run_kernel(
    checkout: &Path,
    out_dir: &Path,
    kernel: &'static VmKernel,
    image: &Path,
    env: &[(&str, String)],
    binaries: &[(&'static str, &Path)],
) -> Result<KernelRun> {
    let dir = out_dir.join(kernel.name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("run.sh");
    fs::write(&script, guest_script(checkout, &dir, env, binaries))
        .with_context(|| format!("writing {}", script.display()))?;
    let boot_log = dir.join("boot.log");
    let log =
        fs::File::create(&boot_log).with_context(|| format!("creating {}", boot_log.display()))?;
    say(&format!(
        "kernel {} ({}): booting under QEMU (TCG) to run {}",
        kernel.name,
        kernel.release,
        binaries
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let started = Instant::now();
    let mut vng = Command::new("vng");
    vng.args(["--verbose", "--disable-kvm", "--force-9p"])
        .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
        .arg("--run")
        .arg(image)
        .arg("--rwdir")
        .arg(checkout)
        .arg("--exec")
        .arg(format!("bash '{}'", script.display()))
        .current_dir(checkout)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("sharing the boot log")?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut vng, 0);
    let mut child = vng.spawn().context("starting vng (virtme-ng)")?;
    let guard =
        TEST_HANG_GUARD * u32::try_from(binaries.len()).unwrap_or(u32::MAX) + BOOT_HANG_GUARD;
    loop {
        if child.try_wait().context("waiting for vng")?.is_some() {
            break;
        }
        if started.elapsed() > guard {
            say(&format!(
                "kernel {}: the guest did not finish within {} s; stopping it",
                kernel.name,
                guard.as_secs()
            ));
            // vng started QEMU in its own process group: end the whole group.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let wall = started.elapsed();
    let guest = fs::read_to_string(dir.join("guest"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "did not start the tests".to_owned());
    let results_text = fs::read_to_string(dir.join("results")).unwrap_or_default();
    let mut results = BTreeMap::new();
    for (name, _) in binaries {
        let outcome = results_text.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            if fields.next() != Some(*name) {
                return None;
            }
            let status: i32 = fields.next()?.parse().ok()?;
            let millis: f64 = fields.next()?.parse().ok()?;
            Some(Outcome {
                passed: status == 0,
                seconds: millis / 1000.0,
                log: dir.join(format!("{name}.log")),
            })
        });
        results.insert(*name, outcome);
    }
    let run = KernelRun {
        kernel,
        wall,
        guest,
        results,
        boot_log,
    };
    say(&format!(
        "kernel {}: {} in {:.0} s (guest: {})",
        kernel.name,
        if run.passed() { "passed" } else { "FAILED" },
        wall.as_secs_f64(),
        run.guest
    ));
    Ok(run)
}

/// Markdown: a row per test binary, a column per kernel.
fn table(runs: &[KernelRun]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for run in runs {
        for name in run.results.keys() {
            if !names.contains(name) {
                names.push(name);
            }
        }
    }
    names.sort_by_key(|n| ALL_PRIVILEGED.iter().position(|a| a == n));
    let mut out = String::from("| test binary |");
    for run in runs {
        let _ = write!(out, " {} ({}) |", run.kernel.name, run.kernel.release);
    }
    out.push_str("\n|---|");
    for _ in runs {
        out.push_str("---|");
    }
    out.push('\n');
    for name in names {
        let _ = write!(out, "| {name} |");
        for run in runs {
            let cell = match run.results.get(name) {
                None => "-".to_owned(),
                Some(None) => "**no result**".to_owned(),
                Some(Some(o)) if o.passed => format!("passed {:.0} s", o.seconds),
                Some(Some(o)) => format!("**FAILED** {:.0} s", o.seconds),
            };
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out.push_str("| whole guest (boot to shutdown) |");
    for run in runs {
        let _ = write!(out, " {:.0} s |", run.wall.as_secs_f64());
    }
    out.push_str("\n| guest kernel, /sys/fs/cgroup |");
    for run in runs {
        let _ = write!(out, " {} |", run.guest);
    }
    out.push('\n');
    out
}

/// The output of each failing binary of a kernel (its end, where the failure is), or the
/// boot log when the guest gave no result.
fn show_failures(run: &KernelRun) {
    for (name, outcome) in &run.results {
        let (what, file) = match outcome {
            Some(o) if o.passed => continue,
            Some(o) => (format!("{name} FAILED"), &o.log),
            None => (format!("{name} gave no result"), &run.boot_log),
        };
        eprintln!(
            "\n===== kernel {} ({}): {what}; the end of {} =====",
            run.kernel.name,
            run.kernel.release,
            file.display()
        );
        let text = fs::read_to_string(file).unwrap_or_else(|e| format!("(unreadable: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(150)..] {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What issue 15 requires of the oldest and newest kernels.
    const REQUIRED_EVERYWHERE: &[&str] = &[
        "kernel_probes",
        "scenarios_dns",
        "scenarios_pods",
        "agent_run",
        "demo",
        "hardening",
    ];

    #[test]
    fn every_listed_binary_is_a_test_of_the_tests_crate() {
        let tests_dir = workspace_root().join("tests/tests");
        for name in ALL_PRIVILEGED {
            let file = tests_dir.join(format!("{name}.rs"));
            assert!(file.is_file(), "{} is missing", file.display());
        }
    }

    #[test]
    fn six_one_runs_every_privileged_binary_and_the_others_the_required_ones() {
        for kernel in KERNELS {
            for test in REQUIRED_EVERYWHERE {
                assert!(kernel.tests.contains(test), "{} lacks {test}", kernel.name);
            }
            for test in kernel.tests {
                assert!(
                    ALL_PRIVILEGED.contains(test),
                    "{} runs unknown {test}",
                    kernel.name
                );
            }
        }
        let six_one = KERNELS.iter().find(|k| k.name == "6.1").unwrap();
        assert_eq!(six_one.tests, ALL_PRIVILEGED);
    }

    #[test]
    fn a_selection_picks_kernels_and_binaries_and_rejects_unknown_names() {
        let all = plan(&Selection::default()).unwrap();
        assert_eq!(all.len(), KERNELS.len());
        let one = plan(&Selection {
            kernels: vec!["5.10".into()],
            tests: vec!["demo".into(), "deploy".into()],
        })
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].0.name, "5.10");
        // deploy is not in 5.10's list: only demo runs there.
        assert_eq!(one[0].1, vec!["demo"]);
        assert!(
            plan(&Selection {
                kernels: vec!["4.19".into()],
                ..Selection::default()
            })
            .is_err()
        );
        assert!(
            plan(&Selection {
                tests: vec!["no_such_test".into()],
                ..Selection::default()
            })
            .is_err()
        );
    }

    #[test]
    fn the_table_marks_failures_and_missing_results() {
        let kernel = &KERNELS[0];
        let mut results = BTreeMap::new();
        results.insert(
            "kernel_probes",
            Some(Outcome {
                passed: true,
                seconds: 61.4,
                log: PathBuf::new(),
            }),
        );
        results.insert(
            "demo",
            Some(Outcome {
                passed: false,
                seconds: 20.0,
                log: PathBuf::new(),
            }),
        );
        results.insert("hardening", None);
        let run = KernelRun {
            kernel,
            wall: Duration::from_secs(300),
            guest: "5.10.0-32-amd64 cgroup2fs".into(),
            results,
            boot_log: PathBuf::new(),
        };
        assert!(!run.passed());
        let table = table(&[run]);
        assert!(table.contains("| kernel_probes | passed 61 s |"), "{table}");
        assert!(table.contains("| demo | **FAILED** 20 s |"), "{table}");
        assert!(table.contains("| hardening | **no result** |"), "{table}");
        assert!(
            table.contains("| whole guest (boot to shutdown) | 300 s |"),
            "{table}"
        );
    }
}
