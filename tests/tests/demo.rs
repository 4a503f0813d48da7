//! `cargo xtask demo` end to end (root): the demo binary with the real agent shows the flagged
//! escape and the healthy in-cluster connection, exits 0, and leaves nothing behind; an
//! interrupted demo (SIGINT, SIGTERM) also stops its agent and removes its testbed.
use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use observer_tests::{
    agent::observer_bin,
    cgroup2_mount,
    names::{LONG_PREFIX, NETNS_PREFIX, UID_MARKER, pid_of_name, pid_of_uid},
};

// A hang guard: the demo ends by itself; a guest under TCG on a busy machine is far slower.
const DEMO_WITHIN: Duration = Duration::from_secs(600);

fn spans_file(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "observer-demo-test-{}-{test}.jsonl",
        std::process::id()
    ))
}

fn demo_command(spans: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_observer-demo"));
    cmd.arg("--agent")
        .arg(observer_bin())
        .arg("--spans-file")
        .arg(spans)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A running demo whose output is collected as it comes.
struct Demo {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    fn start(spans: &Path) -> Demo {
        let mut child = demo_command(spans).spawn().expect("starting observer-demo");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped");
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut err = child.stderr.take().expect("piped");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            sink.lock().unwrap().push_str(&text);
        });
        Demo {
            child,
            stdout,
            stderr,
        }
    }

    fn output(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    fn wait_for_output(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stdout.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the demo did not print {needle:?} within {within:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) },
            0
        );
    }

    /// Waits (bounded) for the exit; the output readers get a moment to finish.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEMO_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the demo") {
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the demo did not finish within {DEMO_WITHIN:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Namespaces, /etc/netns dirs, state dirs and cgroups whose names carry `pid`, and processes
/// whose command line names `marker` (the demo's agent is started with the spans file path).
fn leftovers(pid: u32, marker: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let listing = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    for name in String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if name.starts_with(NETNS_PREFIX) && pid_of_name(name) == Some(pid) {
            found.push(format!("network namespace {name}"));
        }
    }
    for dir in [PathBuf::from("/etc/netns"), std::env::temp_dir()] {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name.starts_with(NETNS_PREFIX) || name.starts_with(LONG_PREFIX))
                && pid_of_name(&name) == Some(pid)
            {
                found.push(format!("file {}", entry.path().display()));
            }
        }
    }
    let root = cgroup2_mount().expect("cgroup2 mount");
    for top in ["kubepods.slice", "kubepods", "system.slice"] {
        cgroups_of(&root.join(top), pid, 3, &mut found);
    }
    let marker = marker.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        // The demo itself carries the marker too; only what it started counts.
        if entry.file_name().to_string_lossy() != pid.to_string()
            && let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(&marker)
        {
            found.push(format!(
                "process {} ({})",
                entry.file_name().to_string_lossy(),
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            ));
        }
    }
    found
}

fn cgroups_of(dir: &Path, pid: u32, depth: u8, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = if let Some(at) = name.find(&format!("pod{UID_MARKER}")) {
            pid_of_uid(name[at + 3..].trim_end_matches(".slice"))
        } else if name.starts_with(LONG_PREFIX) {
            pid_of_name(&name)
        } else {
            if depth > 1 {
                cgroups_of(&entry.path(), pid, depth - 1, found);
            }
            continue;
        };
        if owner == Some(pid) {
            found.push(format!("cgroup {}", entry.path().display()));
        }
    }
}

#[test]
fn the_demo_shows_the_escape_and_the_fix_and_leaves_nothing_behind() {
    let spans = spans_file("full");
    let mut demo = Demo::start(&spans);
    let pid = demo.child.id();
    let status = demo.wait();
    let stdout = demo.stdout.lock().unwrap().clone();
    assert!(
        status.success(),
        "the demo failed ({status}):\n{}",
        demo.output()
    );

    // The agent's own text line for the pod's connection, as the agent printed it.
    let agent_line = stdout
        .lines()
        .skip_while(|l| !l.contains("observer printed:"))
        .nth(1)
        .unwrap_or_else(|| panic!("no agent line after `observer printed:`:\n{stdout}"));
    assert!(
        agent_line.contains(
            " db -> db.another-lab.com (via search domain another-lab.com, 3 NXDOMAIN) -> 203.0.113.10:5432 established EGRESS FLAGGED"
        ),
        "{agent_line}"
    );
    assert!(agent_line.contains("pod/0b5e77e5-"), "{agent_line}");
    assert!(
        stdout.contains(
            "db resolved through search domain another-lab.com to 203.0.113.10, outside the cluster"
        ),
        "{stdout}"
    );
    // The chain observer rebuilt: three NXDOMAIN pairs, then the answer from another-lab.com.
    for name in [
        "db.simple-web-app.svc.cluster.local",
        "db.svc.cluster.local",
        "db.cluster.local",
    ] {
        for qtype in ["A", "AAAA"] {
            assert!(
                stdout.lines().any(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w == [qtype, name, "NXDOMAIN"]
                }),
                "no {qtype} {name} NXDOMAIN in:\n{stdout}"
            );
        }
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["A", "db.another-lab.com", "NOERROR", "203.0.113.10"]),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "  FLAGGED  db -> db.another-lab.com -> 203.0.113.10:5432 outside the cluster, flagged"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "  healthy  db -> db.simple-web-app.svc.cluster.local -> 198.18.2.1:5432 in the cluster, not flagged"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("spans go to {}", spans.display())),
        "{stdout}"
    );
    // Piped output: no colour.
    assert!(
        !stdout.contains('\x1b'),
        "colour codes on a pipe:\n{stdout}"
    );
    assert!(
        std::fs::metadata(&spans).is_ok_and(|m| m.len() > 0),
        "the spans file {} is empty",
        spans.display()
    );
    let left = leftovers(pid, &spans);
    let _ = std::fs::remove_file(&spans);
    assert!(left.is_empty(), "the demo left behind: {left:#?}");
}

fn interrupted_demo_cleans_up(signal: libc::c_int, at: &str, test: &str) {
    let spans = spans_file(test);
    let mut demo = Demo::start(&spans);
    let pid = demo.child.id();
    demo.wait_for_output(at, DEMO_WITHIN);
    // The check below must be able to fail: while the demo runs, it sees the demo's objects.
    let live = leftovers(pid, &spans);
    assert!(
        live.iter().any(|l| l.starts_with("network namespace"))
            && live.iter().any(|l| l.starts_with("cgroup")),
        "the running demo's namespaces and cgroups were not found: {live:#?}"
    );
    demo.signal(signal);
    let status = demo.wait();
    let output = demo.output();
    assert_eq!(status.code(), Some(130), "{output}");
    assert!(output.contains("Interrupted"), "{output}");
    let left = leftovers(pid, &spans);
    let _ = std::fs::remove_file(&spans);
    assert!(
        left.is_empty(),
        "the interrupted demo left behind: {left:#?}\n{output}"
    );
}

#[test]
fn ctrl_c_mid_demo_stops_the_agent_and_removes_the_testbed() {
    // After the agent started and while the pod connects: agent, testbed, listeners all live.
    interrupted_demo_cleans_up(libc::SIGINT, "[3/4]", "sigint");
}

#[test]
fn ctrl_c_while_the_agent_runs_stops_it() {
    let spans = spans_file("agent");
    let mut demo = Demo::start(&spans);
    let pid = demo.child.id();
    demo.wait_for_output("ready in", DEMO_WITHIN);
    let live = leftovers(pid, &spans);
    assert!(
        live.iter().any(|l| l.starts_with("process")),
        "the running agent was not found: {live:#?}"
    );
    demo.signal(libc::SIGINT);
    assert_eq!(demo.wait().code(), Some(130), "{}", demo.output());
    let left = leftovers(pid, &spans);
    let _ = std::fs::remove_file(&spans);
    assert!(
        left.is_empty(),
        "the interrupted demo left behind: {left:#?}"
    );
}

#[test]
fn sigterm_while_the_cluster_is_built_removes_it() {
    interrupted_demo_cleans_up(libc::SIGTERM, "the pod's /etc/resolv.conf", "sigterm");
}
