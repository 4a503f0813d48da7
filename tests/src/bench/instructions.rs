//! Userspace instructions per DNS message and per connect, counted by callgrind on the
//! correlation core's replay (`observer/benches/correlate.rs`). Instruction counts do not
//! depend on what else the machine runs, so unlike the timed figures they compare from run
//! to run and machine to machine (of the same kind).
//!
//! One round of the replay runs under `valgrind --tool=callgrind`, collecting only inside
//! the two phases measured (`--toggle-collect`): building the stream, the warm-up and the
//! binary's start-up are not counted. Each phase's inclusive count is divided by what it
//! fed the core: every message of the stream for `steady_replay` (the warm core parses and
//! indexes each query and response), every pod's first connect of a chain for
//! `steady_connects_first` (open + outcome + the record built).
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde::Serialize;

/// The replay's phases, as the benchmark names its never-inlined functions.
const DNS_PHASE: &str = "correlate::steady_replay";
const CONNECT_PHASE: &str = "correlate::steady_connects_first";
/// Inside the DNS phase only (connects parse nothing): the parser's share.
const PARSE_FN: &str = "observer::dns::parse";
/// How many of the phases' costliest functions (own instructions) the report names.
const TOP_FUNCTIONS: usize = 8;

#[derive(Debug, Serialize)]
pub struct Instructions {
    pub per_dns_message: f64,
    /// Of which `dns::parse`.
    pub parse_per_dns_message: f64,
    pub per_first_connect: f64,
    pub messages: u64,
    pub connects: u64,
    pub scopes: u64,
    /// Instructions counted in both phases together.
    pub collected: u64,
    /// The two phases' costliest functions by their own instructions: (function, count).
    pub top_functions: Vec<(String, u64)>,
    /// Where callgrind's profile was left, for `callgrind_annotate`.
    pub profile: String,
}

/// Runs the correlate benchmark binary `core_bin` under callgrind; the profile goes to `out`.
pub fn measure(core_bin: &Path, out: &Path) -> anyhow::Result<Instructions> {
    let profile = out.join("callgrind.out");
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", profile.display()))
        .arg(format!("--toggle-collect={DNS_PHASE}"))
        .arg(format!("--toggle-collect={CONNECT_PHASE}"))
        .arg(core_bin)
        // A filter no criterion group matches: the summary only.
        .arg("summary-only")
        .env("CORRELATE_ROUNDS", "1")
        .env("CORRELATE_MEMORY", "0")
        .output()
        .context("running valgrind (Debian package valgrind; `cargo xtask setup` installs it)")?;
    let summary = String::from_utf8_lossy(&run.stdout);
    if !run.status.success() {
        bail!(
            "the replay under callgrind failed ({}): {}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let stream = summary
        .lines()
        .find_map(|l| l.strip_prefix("stream: "))
        .with_context(|| format!("no `stream:` line in the replay's summary:\n{summary}"))?;
    let (scopes, messages, connects) = stream_sizes(stream)
        .with_context(|| format!("the replay's `stream:` line changed: {stream}"))?;

    let inclusive = annotate(&profile, true)?;
    let own = annotate(&profile, false)?;
    let cost = |name: &str| -> anyhow::Result<u64> {
        inclusive
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, n)| *n)
            .with_context(|| format!("callgrind's profile has no function {name}"))
    };
    Ok(Instructions {
        per_dns_message: cost(DNS_PHASE)? as f64 / messages as f64,
        parse_per_dns_message: cost(PARSE_FN)? as f64 / messages as f64,
        per_first_connect: cost(CONNECT_PHASE)? as f64 / connects as f64,
        messages,
        connects,
        scopes,
        collected: own.iter().map(|(_, n)| n).sum(),
        top_functions: own.into_iter().take(TOP_FUNCTIONS).collect(),
        profile: profile.display().to_string(),
    })
}

/// (scopes, messages, connects) from "10000 scopes, 240000 messages (120000 responses),
/// 30000 connects (30000 joined), ...".
fn stream_sizes(line: &str) -> Option<(u64, u64, u64)> {
    let before = |unit: &str| -> Option<u64> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| w.trim_end_matches(',') == unit)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    Some((before("scopes")?, before("messages")?, before("connects")?))
}

/// Every function of the profile with its count, costliest first: inclusive (the function
/// and what it called) or its own instructions only.
fn annotate(profile: &Path, inclusive: bool) -> anyhow::Result<Vec<(String, u64)>> {
    let out = Command::new("callgrind_annotate")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg("--threshold=100")
        .arg(profile)
        .output()
        .context("running callgrind_annotate (Debian package valgrind)")?;
    if !out.status.success() {
        bail!(
            "callgrind_annotate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(function_line)
        .collect())
}

/// "  630,481,327 ( 9.16%)  ???:correlate::steady_replay [/path/to/binary]" -> the function
/// and its count; other lines (headers, totals) -> None.
fn function_line(line: &str) -> Option<(String, u64)> {
    let line = line.trim();
    let (count, rest) = line.split_once(' ')?;
    let count: u64 = count.replace(',', "").parse().ok()?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('(')?.split_once(')')?.1.trim();
    // "file:function [object]": the file part has no spaces; `???` when unknown.
    let location = rest.rsplit_once(" [").map_or(rest, |(l, _)| l);
    let function = location.split_once(':')?.1;
    Some((function.to_owned(), count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_callgrind_annotate_lines() {
        assert_eq!(
            function_line(
                "  630,481,327 ( 9.16%)  ???:correlate::steady_replay [/t/release/deps/correlate-1]"
            ),
            Some(("correlate::steady_replay".into(), 630_481_327))
        );
        assert_eq!(
            function_line(
                "1,234 ( 0.01%)  ./string/../sysdeps/x86_64/memmove.S:__memcpy_avx_unaligned_erms [/usr/lib/libc.so.6]"
            ),
            Some(("__memcpy_avx_unaligned_erms".into(), 1234))
        );
        assert_eq!(
            function_line("6,879,594,757 (100.0%)  PROGRAM TOTALS"),
            None
        );
        assert_eq!(function_line("Ir  file:function"), None);
    }

    #[test]
    fn reads_the_stream_sizes() {
        assert_eq!(
            stream_sizes(
                "10000 scopes, 240000 messages (120000 responses), 30000 connects (30000 joined), 60000 answers cached"
            ),
            Some((10_000, 240_000, 30_000))
        );
    }
}
