//! The `pgrs` command line: one binary, one subcommand per role. Each layer owns its own
//! arguments (`agent::cli`, `local::cli`); this file only dispatches.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "pgrs",
    version,
    about = "PostgreSQL streaming replication with split-brain-safe failover"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the agent's arguments does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the instance agent: bootstrap, configure and supervise one PostgreSQL instance.
    Agent(crate::agent::cli::AgentArgs),
    /// Run a whole cluster of local postgres processes (no Kubernetes).
    Local(crate::local::cli::LocalArgs),
    /// Print the PgReplicaSet CustomResourceDefinition (YAML) to stdout.
    Crd,
    /// Copy this image's PostgreSQL installation for a major-version upgrade (the init
    /// container the operator adds while it upgrades a cluster).
    CopyBinaries(crate::agent::upgrade::CopyBinariesArgs),
    /// Run the PgReplicaSet operator (the Kubernetes controller).
    Operator(crate::operator::cli::OperatorArgs),
}

/// Logs go to stderr; `PGRS_LOG` takes an `EnvFilter` directive, `PGRS_LOG_FORMAT=json` switches
/// to JSON lines.
pub fn init_tracing() {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("PGRS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: agents' logs usually go to files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if std::env::var("PGRS_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => crate::agent::cli::run(args).await,
        Command::Local(args) => crate::local::cli::run(args).await,
        Command::Crd => Ok(crate::api::print_crd()?),
        Command::CopyBinaries(args) => crate::agent::upgrade::copy_binaries(args).await,
        Command::Operator(args) => crate::operator::cli::run(args).await,
    }
}
