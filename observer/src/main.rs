use clap::{Parser, Subcommand};

/// eBPF network flow observer for Kubernetes.
#[derive(Parser)]
#[command(name = "observer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print decoded kernel events live, one line each (debugging).
    Events,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Events => Ok(()),
    }
}
