//! `pgrs local chaos`: failure rounds against a running local cluster and the failover report.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub dir: crate::local::cli::DirArg,
    /// Rounds per failure kind.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Where to write the report (Markdown).
    #[arg(long)]
    pub report: PathBuf,
}

pub async fn run(_args: ChaosArgs) -> anyhow::Result<()> {
    anyhow::bail!("pgrs local chaos is not built yet")
}
