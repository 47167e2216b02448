//! Waiting on a local cluster during a chaos run (and in the `pgrs local` end-to-end tests):
//! healthy, a new primary, a stopped node started again and rejoined.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::local::cli::{cluster_status, is_healthy};
use crate::local::layout::Layout;
use crate::local::status::LocalStatus;

/// Waits until the cluster is healthy (a primary, every replica streaming from it).
pub async fn wait_healthy(dir: &Path, timeout: Duration) -> anyhow::Result<LocalStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(status) = cluster_status(dir).await
            && is_healthy(&status)
        {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not become healthy within {} s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a primary other than `old` serves.
pub async fn wait_new_primary(dir: &Path, old: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(status) = cluster_status(dir).await
            && let Some(primary) = status.primary
            && primary != old
        {
            return Ok(primary);
        }
        if Instant::now() > deadline {
            bail!("no new primary within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `node` through the controller (a former primary rejoins) and waits until it streams
/// from the primary; returns how long that took.
pub async fn restart_and_rejoin(
    dir: &Path,
    node: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let layout = Layout::new(dir);
    let config = layout.read_config()?;
    // The agent of a stopped node may still be exiting: retry the start for a while.
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    loop {
        let response = client
            .post(format!("{}/v1/nodes/{node}/start", config.controller_url()))
            .json(&serde_json::json!({}))
            .send()
            .await?;
        if response.status().is_success() {
            break;
        }
        if started.elapsed() > timeout {
            bail!(
                "could not start {node}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    loop {
        if let Ok(status) = cluster_status(dir).await
            && let Some(primary) = &status.primary
            && status.nodes.iter().any(|n| {
                n.name == node
                    && n.upstream.as_ref() == Some(primary)
                    && n.role.as_deref() == Some("replica")
            })
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{node} did not rejoin within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
