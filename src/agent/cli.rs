//! `pgrs agent` arguments.

use clap::Args;

#[derive(Debug, Args)]
pub struct AgentArgs {}

pub async fn run(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("pgrs agent is not built yet")
}
