//! `pgrs local` arguments.

use clap::Args;

#[derive(Debug, Args)]
pub struct LocalArgs {}

pub async fn run(_args: LocalArgs) -> anyhow::Result<()> {
    anyhow::bail!("pgrs local is not built yet")
}
