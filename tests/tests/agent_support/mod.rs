//! Helpers for the end-to-end tests of `observer run`: a strict reader of the /metrics
//! exposition, RFC 3339 times, and running the agent binary to its exit.
use std::{
    collections::HashMap,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// One sample of the exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a Prometheus / OpenMetrics text exposition, read strictly: every line is a
/// `# HELP`, `# TYPE`, `# UNIT` or final `# EOF` comment, or `name{labels} value`; a sample's
/// family must have had its TYPE line before it, and a family is typed once.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (n, line) in text.lines().enumerate() {
        let at = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        if eof {
            return Err(at("content after # EOF"));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
            match words.as_slice() {
                ["EOF"] => eof = true,
                ["TYPE", family, kind] => {
                    if !valid_name(family) {
                        return Err(at("bad family name"));
                    }
                    let known = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "gaugehistogram",
                        "unknown",
                    ];
                    if !known.contains(kind) {
                        return Err(at("unknown metric type"));
                    }
                    if types
                        .insert((*family).to_owned(), (*kind).to_owned())
                        .is_some()
                    {
                        return Err(at("family typed twice"));
                    }
                }
                ["HELP", family, ..] | ["UNIT", family, ..] if valid_name(family) => {}
                _ => return Err(at("unexpected comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| at("value is not a number"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| at("labels not closed"))?;
                (name, parse_labels(body).map_err(|e| at(&e))?)
            }
            None => (series, Vec::new()),
        };
        if !valid_name(name) {
            return Err(at("bad metric name"));
        }
        let typed = family_of(name, &types);
        if typed.is_none() {
            return Err(at("sample before its family's TYPE line"));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(samples)
}

fn family_of<'a>(name: &str, types: &'a HashMap<String, String>) -> Option<&'a str> {
    if let Some(kind) = types.get(name) {
        return Some(kind);
    }
    let suffixes: &[(&str, &[&str])] = &[
        ("_total", &["counter"]),
        ("_created", &["counter", "histogram", "summary"]),
        ("_bucket", &["histogram", "gaugehistogram"]),
        ("_sum", &["histogram", "summary"]),
        ("_count", &["histogram", "summary"]),
        ("_info", &["info"]),
    ];
    suffixes.iter().find_map(|(suffix, kinds)| {
        let kind = types.get(name.strip_suffix(suffix)?)?;
        kinds.contains(&kind.as_str()).then_some(kind.as_str())
    })
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(body: &str) -> Result<Vec<(String, String)>, String> {
    let mut labels = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").ok_or("a label without =\"value\"")?;
        if !valid_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => return Err("bad escape in a label value".into()),
                },
                Some((_, c)) => value.push(c),
                None => return Err("label value not closed".into()),
            }
        };
        if labels.iter().any(|(k, _)| k == key) {
            return Err(format!("label {key} twice"));
        }
        labels.push((key.to_owned(), value));
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.is_empty() {
            return Err("labels not separated by ,".into());
        }
    }
    Ok(labels)
}

/// Sum of the samples named `name` whose labels include every given pair.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(samples, name, labels).map(|s| s.value).sum()
}

pub fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples
        .iter()
        .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (RFC 3339 in UTC, as the agent writes it) to Unix ns.
pub fn parse_rfc3339_utc(text: &str) -> Result<u64, String> {
    let bad = || format!("not an RFC 3339 UTC time: {text:?}");
    let body = text.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = body.split_once('T').ok_or_else(bad)?;
    let num = |s: &str, len: usize| -> Result<i64, String> {
        if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let d: Vec<&str> = date.split('-').collect();
    let [y, mo, da] = d.as_slice() else {
        return Err(bad());
    };
    let (y, mo, da) = (num(y, 4)?, num(mo, 2)?, num(da, 2)?);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let t: Vec<&str> = hms.split(':').collect();
    let [h, mi, s] = t.as_slice() else {
        return Err(bad());
    };
    let (h, mi, s) = (num(h, 2)?, num(mi, 2)?, num(s, 2)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || s > 60 {
        return Err(bad());
    }
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let nanos: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().map_err(|_| bad())?
    };
    // Days since 1970-01-01 in the proleptic Gregorian calendar.
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + s;
    u64::try_from(secs * 1_000_000_000 + nanos).map_err(|_| bad())
}

pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos() as u64
}

/// How a run of the agent binary that must end by itself ended.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

/// Runs `program args` (e.g. the agent through setpriv) and waits at most `within` for it to
/// exit; panics (after killing it) when it does not.
pub fn run_to_exit(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    within: Duration,
) -> Exited {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("starting the program");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} {args:?} still ran after {within:?}; stderr:\n{}",
                program.display(),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Exited {
        status,
        took: started.elapsed(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_parse_to_unix_nanoseconds() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_rfc3339_utc("2025-06-15T15:06:40.008123456Z"),
            Ok(1_750_000_000_008_123_456)
        );
        assert_eq!(
            parse_rfc3339_utc("2000-03-01T00:00:01.5Z"),
            Ok(951_868_801_500_000_000)
        );
        assert!(parse_rfc3339_utc("2025-06-15 15:06:40Z").is_err());
        assert!(parse_rfc3339_utc("2025-06-15T15:06:40+02:00").is_err());
    }

    #[test]
    fn the_exposition_reader_is_strict() {
        let good = "# HELP a_seconds x\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\na_seconds_bucket{le=\"+Inf\"} 1\na_seconds_sum 0.5\na_seconds_count 1\n# TYPE b counter\nb_total{k=\"v\\\"w\",j=\"\"} 3\n# EOF\n";
        let samples = parse_exposition(good).unwrap();
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[3].label("k"), Some("v\"w"));
        assert!(parse_exposition("b_total 1\n# TYPE b counter\n").is_err());
        assert!(parse_exposition("# TYPE b counter\nb_total{k=v} 1\n").is_err());
        assert!(parse_exposition("# TYPE b counter\nb_total{k=\"v\"}\n").is_err());
        assert!(parse_exposition("# TYPE b counter\nb_total 1\n# EOF\nb_total 2\n").is_err());
    }
}
