//! `observer run` settings: flags, their environment variables, and an optional TOML file.
//!
//! One definition, [`RunArgs`], is both the command line (clap reads each flag and its
//! environment variable) and the config file (serde reads the same fields, keys as the long
//! flags with `_` for `-`). Precedence, highest first: a flag, its environment variable, the
//! config file, the built-in default. Every value is validated here, so the agent proper
//! starts from a `Settings` that cannot be wrong; `--print-config` shows each effective
//! value and where it came from.
use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{ArgMatches, Args, ValueEnum, parser::ValueSource};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::{
    export::{RedactMode, SpanSelection},
    identity::KubeMode,
};

/// Flags of `observer run`, and the keys of its config file. Options are `Option`s (lists
/// empty) so that an absent flag can fall back to the config file before the default.
#[derive(Args, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RunArgs {
    /// TOML config file (keys as the long flags, with `_` for `-`).
    #[arg(long, env = "OBSERVER_CONFIG", value_name = "PATH")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the effective settings, each with where it came from (flag, environment,
    /// config file, default), and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// A cluster network (pods, services, nodes), IPv4 or IPv6 CIDR. Repeatable; merged
    /// with what Kubernetes reports. Given, Nodes are not watched (their networks are all
    /// the agent reads of them) [default: from Kubernetes, else the private ranges].
    #[arg(
        long = "cluster-cidr",
        env = "OBSERVER_CLUSTER_CIDR",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    #[serde(rename = "cluster_cidr", default)]
    pub cluster_cidrs: Vec<IpNet>,
    /// The cluster's DNS domain [default: cluster.local].
    #[arg(long, env = "OBSERVER_CLUSTER_DOMAIN", value_name = "DOMAIN")]
    pub cluster_domain: Option<String>,
    /// The cluster's name, reported as `k8s.cluster.name`.
    #[arg(long, env = "OBSERVER_CLUSTER_NAME", value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// Ports whose traffic is DNS. Repeatable [default: 53].
    #[arg(
        long = "dns-port",
        env = "OBSERVER_DNS_PORTS",
        value_delimiter = ',',
        value_name = "PORT"
    )]
    #[serde(rename = "dns_port", default)]
    pub dns_ports: Vec<u16>,
    /// Enrich with the Kubernetes API (`auto`: when a config is found) or not [default: auto].
    #[arg(long, env = "OBSERVER_KUBE")]
    pub kube: Option<KubeMode>,
    /// This node's name (the DaemonSet passes spec.nodeName through the downward API).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,
    /// Where /metrics, /healthz and /readyz listen [default: 0.0.0.0:9464].
    #[arg(long, env = "OBSERVER_METRICS_ADDR", value_name = "ADDR:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// What to print on standard output [default: text].
    #[arg(long, env = "OBSERVER_OUTPUT")]
    pub output: Option<OutputFormat>,
    /// Which connections become spans [default: egress]. Flagged ones always do.
    #[arg(long, env = "OBSERVER_EXPORT")]
    pub export: Option<SpanSelection>,
    /// Fraction (0..=1) of the selected, unflagged connections exported as spans [default: 1].
    #[arg(long, env = "OBSERVER_SAMPLE_RATIO", value_name = "RATIO")]
    pub sample_ratio: Option<f64>,
    /// Where spans go when no OTLP endpoint is configured (JSON lines) [default: none].
    #[arg(long, env = "OBSERVER_SPANS_FILE", value_name = "PATH")]
    pub spans_file: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "OBSERVER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, in `tracing` directive syntax; `RUST_LOG`, when set, wins [default: info].
    #[arg(long, env = "OBSERVER_LOG", value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Size of the DNS kernel ring in KiB, rounded up to a power of two [default: 4096].
    #[arg(long, env = "OBSERVER_RING_SIZE_KIB", value_name = "KIB")]
    pub ring_size_kib: Option<u32>,
    /// Rewrite DNS names in spans, metrics and output: `hash` (keyed per run) or `redact`;
    /// the cluster and search domains stay visible [default: off].
    #[arg(long, env = "OBSERVER_REDACT_NAMES")]
    pub redact_names: Option<RedactMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Text,
    Json,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Effective, validated settings, serialized by `--print-config` under the config file's
/// keys.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Settings {
    #[serde(rename = "cluster_cidr")]
    pub cluster_cidrs: Vec<IpNet>,
    pub cluster_domain: String,
    pub cluster_name: Option<String>,
    #[serde(rename = "dns_port")]
    pub dns_ports: Vec<u16>,
    pub kube: KubeMode,
    pub node_name: Option<String>,
    pub metrics_addr: SocketAddr,
    pub output: OutputFormat,
    pub export: SpanSelection,
    pub sample_ratio: f64,
    pub spans_file: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub ring_size_kib: Option<u32>,
    pub redact_names: RedactMode,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";

/// Where an effective setting came from, by precedence (highest last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File,
    Environment,
    Flag,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::File => "config file",
            Origin::Environment => "environment",
            Origin::Flag => "flag",
        }
    }
}

/// Each setting's origin, by config file key, in the order of [`RunArgs`].
pub type Origins = Vec<(&'static str, Origin)>;

/// Picks each setting from the highest layer that has it and notes which one did.
struct Layers<'a> {
    /// The parsed command line, to tell a flag from its environment variable; without it
    /// (a library caller's `RunArgs`) a value given there counts as a flag.
    matches: Option<&'a ArgMatches>,
    origins: Origins,
}

impl Layers<'_> {
    /// `id` is the field of [`RunArgs`] (clap's argument id), `key` the config file key.
    fn pick<T>(
        &mut self,
        id: &str,
        key: &'static str,
        given: Option<T>,
        file: Option<T>,
    ) -> Option<T> {
        let (value, origin) = match (given, file) {
            (Some(value), _) => {
                let origin = match self.matches.and_then(|m| m.value_source(id)) {
                    Some(ValueSource::EnvVariable) => Origin::Environment,
                    _ => Origin::Flag,
                };
                (Some(value), origin)
            }
            (None, Some(value)) => (Some(value), Origin::File),
            (None, None) => (None, Origin::Default),
        };
        self.origins.push((key, origin));
        value
    }
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    if v.is_empty() { None } else { Some(v) }
}

impl Settings {
    /// Merge flags (and their environment variables) over the config file over defaults.
    pub fn resolve(args: RunArgs) -> Result<Settings, ConfigError> {
        Settings::resolve_with_origins(args, None).map(|(settings, _)| settings)
    }

    /// As [`Settings::resolve`], also saying where each setting came from; `matches` (the
    /// `run` subcommand's) tells flags from environment variables.
    pub fn resolve_with_origins(
        args: RunArgs,
        matches: Option<&ArgMatches>,
    ) -> Result<(Settings, Origins), ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => RunArgs::default(),
        };
        let mut l = Layers {
            matches,
            origins: Vec::new(),
        };
        let settings = Settings {
            cluster_cidrs: l
                .pick(
                    "cluster_cidrs",
                    "cluster_cidr",
                    non_empty(args.cluster_cidrs),
                    non_empty(file.cluster_cidrs),
                )
                .unwrap_or_default(),
            cluster_domain: l
                .pick(
                    "cluster_domain",
                    "cluster_domain",
                    args.cluster_domain,
                    file.cluster_domain,
                )
                .unwrap_or_else(|| "cluster.local".into())
                .trim_end_matches('.')
                .to_ascii_lowercase(),
            cluster_name: l.pick(
                "cluster_name",
                "cluster_name",
                args.cluster_name,
                file.cluster_name,
            ),
            dns_ports: l
                .pick(
                    "dns_ports",
                    "dns_port",
                    non_empty(args.dns_ports),
                    non_empty(file.dns_ports),
                )
                .unwrap_or_else(|| vec![53]),
            kube: l
                .pick("kube", "kube", args.kube, file.kube)
                .unwrap_or(KubeMode::Auto),
            node_name: l.pick("node_name", "node_name", args.node_name, file.node_name),
            metrics_addr: l
                .pick(
                    "metrics_addr",
                    "metrics_addr",
                    args.metrics_addr,
                    file.metrics_addr,
                )
                .unwrap_or_else(|| {
                    DEFAULT_METRICS_ADDR
                        .parse()
                        .expect("the default metrics address is a valid socket address")
                }),
            output: l
                .pick("output", "output", args.output, file.output)
                .unwrap_or(OutputFormat::Text),
            export: l
                .pick("export", "export", args.export, file.export)
                .unwrap_or(SpanSelection::Egress),
            sample_ratio: l
                .pick(
                    "sample_ratio",
                    "sample_ratio",
                    args.sample_ratio,
                    file.sample_ratio,
                )
                .unwrap_or(1.0),
            spans_file: l.pick("spans_file", "spans_file", args.spans_file, file.spans_file),
            log_format: l
                .pick("log_format", "log_format", args.log_format, file.log_format)
                .unwrap_or(LogFormat::Text),
            log_level: l
                .pick("log_level", "log_level", args.log_level, file.log_level)
                .unwrap_or_else(|| "info".into()),
            ring_size_kib: l.pick(
                "ring_size_kib",
                "ring_size_kib",
                args.ring_size_kib,
                file.ring_size_kib,
            ),
            redact_names: l
                .pick(
                    "redact_names",
                    "redact_names",
                    args.redact_names,
                    file.redact_names,
                )
                .unwrap_or(RedactMode::Off),
        };
        settings.validate()?;
        Ok((settings, l.origins))
    }

    /// The effective settings as a config file would say them, each line followed by its
    /// origin; a setting without a value is a comment.
    pub fn describe(&self, origins: &Origins) -> String {
        let table = toml::Table::try_from(self).expect("settings serialize to a TOML table");
        let mut text = String::new();
        for (key, origin) in origins {
            let origin = origin.name();
            let _ = match table.get(*key) {
                Some(value) => writeln!(text, "{key} = {value}  # {origin}"),
                None => writeln!(text, "# {key} is not set  # {origin}"),
            };
        }
        text
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| {
            Err(ConfigError::Invalid {
                name,
                reason: reason.to_owned(),
            })
        };
        if !(0.0..=1.0).contains(&self.sample_ratio) || self.sample_ratio.is_nan() {
            return invalid("sample-ratio", "must be between 0 and 1");
        }
        if self.dns_ports.contains(&0) {
            return invalid("dns-port", "port 0 is not a port");
        }
        if self.cluster_domain.is_empty()
            || self.cluster_domain.len() > 253
            || self
                .cluster_domain
                .split('.')
                .any(|l| l.is_empty() || l.len() > 63)
        {
            return invalid("cluster-domain", "must be a DNS name such as cluster.local");
        }
        if let Some(kib) = self.ring_size_kib
            && !(4..=1 << 20).contains(&kib)
        {
            return invalid("ring-size-kib", "must be between 4 KiB and 1 GiB");
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<RunArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let cli = Cli::try_parse_from(std::iter::once("observer").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Settings::resolve(cli.run).map_err(|e| crate::error::Chain(&e).to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.cluster_domain, "cluster.local");
        assert_eq!(s.dns_ports, vec![53]);
        assert_eq!(s.kube, KubeMode::Auto);
        assert_eq!(s.metrics_addr, DEFAULT_METRICS_ADDR.parse().unwrap());
        assert_eq!(s.output, OutputFormat::Text);
        assert_eq!(s.export, SpanSelection::Egress);
        assert_eq!(s.sample_ratio, 1.0);
        assert_eq!(s.redact_names, RedactMode::Off);
    }

    #[test]
    fn redact_names_from_flag_variable_and_file() {
        let dir =
            std::env::temp_dir().join(format!("observer-config-redact-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("observer.toml");
        std::fs::write(&file, "redact_names = \"redact\"\n").unwrap();
        let f = file.to_str().unwrap();
        assert_eq!(
            parse(&["--config", f]).unwrap().redact_names,
            RedactMode::Redact
        );
        assert_eq!(
            parse(&["--config", f, "--redact-names", "hash"])
                .unwrap()
                .redact_names,
            RedactMode::Hash
        );
        let err = parse(&["--redact-names", "maybe"]).unwrap_err();
        assert!(err.contains("possible values"), "{err}");
        std::fs::write(&file, "redact_names = \"sometimes\"\n").unwrap();
        let err = parse(&["--config", f]).unwrap_err();
        assert!(
            err.contains("redact_names") || err.contains("sometimes"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("observer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("observer.toml");
        std::fs::write(
            &file,
            "cluster_cidr = [\"10.0.0.0/8\", \"fd00::/48\"]\ncluster_domain = \"corp.local\"\noutput = \"json\"\ndns_port = [53, 5353]\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let s = parse(&["--config", f]).unwrap();
        assert_eq!(s.cluster_cidrs.len(), 2);
        assert_eq!(s.cluster_domain, "corp.local");
        assert_eq!(s.output, OutputFormat::Json);
        assert_eq!(s.dns_ports, vec![53, 5353]);
        let s = parse(&[
            "--config",
            f,
            "--output",
            "none",
            "--cluster-cidr",
            "198.18.0.0/15",
        ])
        .unwrap();
        assert_eq!(s.output, OutputFormat::None);
        assert_eq!(
            s.cluster_cidrs,
            vec!["198.18.0.0/15".parse::<IpNet>().unwrap()]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn origins_name_the_layer_each_setting_came_from() {
        let dir =
            std::env::temp_dir().join(format!("observer-config-origin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("observer.toml");
        std::fs::write(
            &file,
            "cluster_domain = \"corp.local\"\noutput = \"json\"\n",
        )
        .unwrap();
        let argv = [
            "observer",
            "--config",
            file.to_str().unwrap(),
            "--output",
            "none",
        ];
        let matches = <Cli as clap::CommandFactory>::command().get_matches_from(argv);
        let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
        let (settings, origins) = Settings::resolve_with_origins(cli.run, Some(&matches)).unwrap();
        let origin = |key| origins.iter().find(|(k, _)| *k == key).unwrap().1;
        assert_eq!(origin("output"), Origin::Flag);
        assert_eq!(origin("cluster_domain"), Origin::File);
        assert_eq!(origin("dns_port"), Origin::Default);
        let text = settings.describe(&origins);
        assert!(text.contains("output = \"none\"  # flag\n"), "{text}");
        assert!(
            text.contains("cluster_domain = \"corp.local\"  # config file\n"),
            "{text}"
        );
        assert!(text.contains("dns_port = [53]  # default\n"), "{text}");
        assert!(
            text.contains("# node_name is not set  # default\n"),
            "{text}"
        );
        // What it prints, less the comments, is a config file the agent accepts as it is.
        std::fs::write(&file, &text).unwrap();
        assert_eq!(
            parse(&["--config", file.to_str().unwrap()]).unwrap(),
            settings
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_values_are_clear_errors() {
        let err = parse(&["--cluster-cidr", "10.0.0.0/33"]).unwrap_err();
        assert!(err.contains("cluster-cidr"), "{err}");
        let err = parse(&["--output", "yaml"]).unwrap_err();
        assert!(err.contains("possible values"), "{err}");
        let err = parse(&["--sample-ratio", "1.5"]).unwrap_err();
        assert!(err.contains("sample-ratio"), "{err}");
        let err = parse(&["--dns-port", "0"]).unwrap_err();
        assert!(err.contains("dns-port"), "{err}");
        let err = parse(&["--cluster-domain", "a..b"]).unwrap_err();
        assert!(err.contains("cluster-domain"), "{err}");
    }

    #[test]
    fn unknown_and_malformed_config_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("observer-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("observer.toml");
        std::fs::write(&file, "cluster_domian = \"x\"\n").unwrap();
        let err = parse(&["--config", file.to_str().unwrap()]).unwrap_err();
        assert!(err.contains("cluster_domian"), "{err}");
        let err = parse(&["--config", dir.join("missing.toml").to_str().unwrap()]).unwrap_err();
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
