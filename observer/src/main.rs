use std::{collections::HashSet, process::ExitCode};

use anyhow::Context as _;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use observer::{
    agent::config::{LogFormat, RunArgs, Settings},
    cli::{Cli, Command, EventsArgs, VERSION},
    error::Chain,
    export::color_on,
    probes::{self, BootClock, ProbeOptions, Probes},
};
use tokio::signal::unix::{SignalKind, signal};

/// Every DNS message and connect allocates and frees a few small values (names, answer
/// lists, records); mimalloc serves them at a fraction of glibc malloc's cost (see the
/// book's Performance page, "The correlation core").
#[global_allocator]
static ALLOCATOR: observer::agent::memory::Allocator = observer::agent::memory::Allocator;

fn main() -> ExitCode {
    // The matches, not only the parsed values: `--print-config` tells a flag from its
    // environment variable.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Run(args) => run_agent(args, matches.subcommand_matches("run")),
        Command::Events(args) => {
            init_logging(LogFormat::Text, "warn");
            run_events(args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // What the user has to fix, never a backtrace (anyhow prints one from `main`'s
            // `Err` when RUST_BACKTRACE is set).
            eprintln!("Error: {}", Chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Logs go to standard error: standard output carries the connections.
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color_on(std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run_agent(args: RunArgs, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
    let print_config = args.print_config;
    let (settings, origins) = Settings::resolve_with_origins(args, matches)?;
    if print_config {
        print!("{}", settings.describe(&origins));
        return Ok(());
    }
    init_logging(settings.log_format, &settings.log_level);
    tracing::info!("observer {VERSION} starting");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(observer::agent::run(settings))
}

fn run_events(args: EventsArgs) -> anyhow::Result<()> {
    let mut options = ProbeOptions {
        dns_ports: args.dns_ports,
        // Every packet is shown, the DNS server's side included.
        dns_server_side: true,
        ..ProbeOptions::default()
    };
    if let Some(kib) = args.ring_size_kib {
        let bytes = kib
            .checked_mul(1024)
            .context("--ring-size-kib is too large")?;
        options.dns_ring_bytes = bytes;
        options.connect_ring_bytes = bytes;
    }
    let filter: HashSet<u64> = args.cgroup_ids.into_iter().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let mut probes = Probes::load(&options).context("loading the kernel programs")?;
        let mut events = probes.events().context("reading the kernel rings")?;
        let clock = BootClock::new().context("reading the clocks")?;
        let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        eprintln!(
            "observer: DNS and connect programs attached to {}; Ctrl-C to stop",
            probes.cgroup().display()
        );
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                batch = events.recv() => {
                    let Some(batch) = batch else { break };
                    for event in batch {
                        if filter.is_empty() || filter.contains(&event.cgroup_id()) {
                            println!("{}", probes::describe(&event, &clock));
                        }
                    }
                }
            }
        }
        let losses = probes.loss_counters().context("reading loss counters")?;
        let summary: Vec<String> = losses
            .iter()
            .map(|(counter, n)| format!("{}={n}", counter.name()))
            .collect();
        eprintln!(
            "observer: loss counters: {} decode_errors={}",
            summary.join(" "),
            probes.decode_errors()
        );
        drop(probes);
        Ok(())
    })
}
