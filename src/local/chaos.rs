//! `pgrs local chaos`: failure rounds against a running local cluster, under a continuous write
//! load through the write endpoint, and the failover report.
//!
//! Measured per round: the write-unavailability window (the longest gap between two acknowledged
//! writes around the failure), the promotion LSN gap chosen by the engine, and the rejoin time of
//! the failed node. At the end every acknowledged row is looked up on the final primary: the
//! number missing is the count of acknowledged writes lost (reported, never hidden).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use rand::Rng;
use tokio_postgres::NoTls;

use crate::local::cli::{cluster_status, is_healthy, kill_node, switchover};
use crate::local::layout::Layout;
use crate::local::status::LocalStatus;

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
    /// Failure kinds, comma separated: hard-kill, graceful-stop, switchover.
    #[arg(
        long,
        default_value = "hard-kill,graceful-stop,switchover",
        value_delimiter = ','
    )]
    pub kinds: Vec<FailureKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum FailureKind {
    HardKill,
    GracefulStop,
    Switchover,
}

impl FailureKind {
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::HardKill => "hard kill (SIGKILL agent + postgres)",
            FailureKind::GracefulStop => "graceful stop (SIGTERM agent)",
            FailureKind::Switchover => "planned switchover",
        }
    }
}

/// One write as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct WriteRecord {
    pub id: i64,
    pub started: Instant,
    pub finished: Instant,
    pub acknowledged: bool,
}

/// A continuous insert load through an address (the write endpoint); every acknowledged id is
/// recorded. Reconnects after any error.
pub struct WriteLoad {
    records: Arc<Mutex<Vec<WriteRecord>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn connection_string(port: u16, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres connect_timeout=2"
    )
}

/// Creates the table the load writes to (idempotent), retrying for a few seconds while the
/// write endpoint has no primary.
pub async fn prepare_table(conninfo: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
                .await
                .context("failed to connect to the write endpoint")?;
            tokio::spawn(connection);
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS pgrs_chaos (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())",
                )
                .await
                .context("failed to create table pgrs_chaos")?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl WriteLoad {
    /// Starts inserting ids from `first_id` upwards, one at a time, pausing `pause` between writes.
    pub fn start(conninfo: String, first_id: i64, pause: Duration) -> WriteLoad {
        let records = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let records = records.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut next_id = first_id;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let connected = tokio::time::timeout(
                        Duration::from_secs(3),
                        tokio_postgres::connect(&conninfo, NoTls),
                    )
                    .await;
                    let client = match connected {
                        Ok(Ok((client, connection))) => {
                            tokio::spawn(connection);
                            client
                        }
                        _ => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let id = next_id;
                        next_id += 1;
                        let started = Instant::now();
                        let result = tokio::time::timeout(
                            Duration::from_secs(5),
                            client.execute("INSERT INTO pgrs_chaos (id) VALUES ($1)", &[&id]),
                        )
                        .await;
                        let acknowledged = matches!(result, Ok(Ok(1)));
                        lock(&records).push(WriteRecord {
                            id,
                            started,
                            finished: Instant::now(),
                            acknowledged,
                        });
                        if !acknowledged {
                            break;
                        }
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        };
        WriteLoad {
            records,
            stop,
            task,
        }
    }

    pub fn records(&self) -> Vec<WriteRecord> {
        lock(&self.records).clone()
    }

    pub fn acknowledged_since(&self, since: Instant) -> usize {
        lock(&self.records)
            .iter()
            .filter(|r| r.acknowledged && r.started >= since)
            .count()
    }

    pub async fn stop(self) -> Vec<WriteRecord> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        lock(&self.records).clone()
    }
}

/// The longest gap between two consecutive acknowledged writes finishing in
/// [`from`, `to`] (plus the last one before `from`): the write-unavailability window.
pub fn unavailability(records: &[WriteRecord], from: Instant, to: Instant) -> Option<Duration> {
    let acked: Vec<Instant> = records
        .iter()
        .filter(|r| r.acknowledged)
        .map(|r| r.finished)
        .collect();
    let before = acked.iter().copied().filter(|t| *t < from).max()?;
    let mut previous = before;
    let mut widest = Duration::ZERO;
    for t in acked.into_iter().filter(|t| *t >= from && *t <= to) {
        widest = widest.max(t.saturating_duration_since(previous));
        previous = t;
    }
    Some(widest)
}

/// Which acknowledged ids are missing from the table on `conninfo` (the final primary).
pub async fn missing_acknowledged(
    conninfo: &str,
    acknowledged: &[i64],
) -> anyhow::Result<Vec<i64>> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .context("failed to connect to check acknowledged writes")?;
    tokio::spawn(connection);
    let rows = client
        .query("SELECT id FROM pgrs_chaos", &[])
        .await
        .context("failed to read pgrs_chaos")?;
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
    Ok(acknowledged
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect())
}

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

#[derive(Debug, Clone, Default)]
pub struct KindResult {
    pub unavailability: Vec<Duration>,
    pub lsn_gaps: Vec<Option<u64>>,
    pub rejoin: Vec<Duration>,
    pub acknowledged: usize,
    pub lost: usize,
}

fn percentile(values: &[Duration], p: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[index])
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".to_string(), |d| format!("{}", d.as_millis()))
}

pub fn render_report(results: &BTreeMap<FailureKind, KindResult>, header: &str) -> String {
    let mut out = String::new();
    out.push_str(header);
    out.push_str("\n| failure | rounds | unavailable p50 (ms) | unavailable max (ms) | acknowledged writes | acknowledged lost | promotion LSN gap max (bytes) | rejoin p50 (ms) | rejoin max (ms) |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (kind, r) in results {
        let gap = if r.lsn_gaps.iter().any(|g| g.is_none()) {
            "unknown".to_string()
        } else {
            r.lsn_gaps
                .iter()
                .flatten()
                .max()
                .map_or("-".to_string(), |g| g.to_string())
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            kind.label(),
            r.unavailability.len(),
            ms(percentile(&r.unavailability, 0.5)),
            ms(r.unavailability.iter().max().copied()),
            r.acknowledged,
            r.lost,
            gap,
            ms(percentile(&r.rejoin, 0.5)),
            ms(r.rejoin.iter().max().copied()),
        ));
    }
    out
}

/// Runs `rounds` failures of each kind against the cluster in `dir`.
pub async fn run_rounds(
    dir: &Path,
    kinds: &[FailureKind],
    rounds: usize,
) -> anyhow::Result<BTreeMap<FailureKind, KindResult>> {
    let layout = Layout::new(dir);
    let config = layout.read_config()?;
    let password = std::fs::read_to_string(layout.superuser_password())?;
    let conninfo = connection_string(config.write_port, &config.superuser, password.trim());
    wait_healthy(dir, Duration::from_secs(120)).await?;
    prepare_table(&conninfo).await?;
    let first_id = chrono::Utc::now().timestamp_micros();
    let load = WriteLoad::start(conninfo.clone(), first_id, Duration::from_millis(2));
    let mut results: BTreeMap<FailureKind, KindResult> = BTreeMap::new();
    let mut kind_ranges: Vec<(FailureKind, Instant, Instant)> = Vec::new();
    for &kind in kinds {
        let kind_started = Instant::now();
        for round in 0..rounds {
            let status = wait_healthy(dir, Duration::from_secs(120)).await?;
            let old = status.primary.clone().context("no primary")?;
            // A random moment, not in step with any loop of the controller or the agents.
            let delay = Duration::from_millis(rand::rng().random_range(300..2300));
            tokio::time::sleep(delay).await;
            let injected = Instant::now();
            match kind {
                FailureKind::HardKill => {
                    kill_node(dir, &old, true)?;
                }
                FailureKind::GracefulStop => {
                    kill_node(dir, &old, false)?;
                }
                FailureKind::Switchover => {
                    switchover(dir, None, Duration::from_secs(60)).await?;
                }
            }
            let new = wait_new_primary(dir, &old, Duration::from_secs(60)).await?;
            // Until a write is acknowledged by the new primary.
            let new_seen = Instant::now();
            let deadline = new_seen + Duration::from_secs(30);
            while load.acknowledged_since(new_seen) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let window = unavailability(&load.records(), injected, Instant::now());
            let status = cluster_status(dir).await?;
            let gap = status
                .last_failover
                .as_ref()
                .filter(|f| f.to == new)
                .and_then(|f| f.lsn_gap_bytes);
            let entry = results.entry(kind).or_default();
            if let Some(window) = window {
                entry.unavailability.push(window);
            }
            entry.lsn_gaps.push(if kind == FailureKind::Switchover {
                gap.or(Some(0))
            } else {
                gap
            });
            if kind != FailureKind::Switchover {
                let rejoin = restart_and_rejoin(dir, &old, Duration::from_secs(120)).await?;
                entry.rejoin.push(rejoin);
            }
            tracing::info!(?kind, round, %old, %new, window_ms = window.map(|w| w.as_millis() as u64), "chaos round done");
            eprintln!(
                "{:?} round {}: {old} -> {new}, writes unavailable {} ms",
                kind,
                round + 1,
                ms(window)
            );
        }
        kind_ranges.push((kind, kind_started, Instant::now()));
    }
    wait_healthy(dir, Duration::from_secs(120)).await?;
    let records = load.stop().await;
    let acknowledged: Vec<i64> = records
        .iter()
        .filter(|r| r.acknowledged)
        .map(|r| r.id)
        .collect();
    let missing: std::collections::HashSet<i64> = missing_acknowledged(&conninfo, &acknowledged)
        .await?
        .into_iter()
        .collect();
    for (kind, from, to) in kind_ranges {
        let in_kind = records
            .iter()
            .filter(|r| r.acknowledged && r.started >= from && r.started <= to);
        let entry = results.entry(kind).or_default();
        for record in in_kind {
            entry.acknowledged += 1;
            if missing.contains(&record.id) {
                entry.lost += 1;
            }
        }
    }
    Ok(results)
}

/// The machine's load average (`/proc/loadavg`): timing figures mean little without it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".to_string())
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.dir.dir);
    let config = layout.read_config()?;
    let mut kinds = args.kinds.clone();
    kinds.dedup();
    let started = chrono::Utc::now();
    let load_before = load_average();
    let results = run_rounds(&args.dir.dir, &kinds, args.rounds).await?;
    let load_after = load_average();
    let t = &config.timings;
    let header = format!(
        "## Failover report\n\n{} — {} replicas, {} replication, lease {} ms / renew {} ms / deadline {} ms / shutdown budget {} ms, controller round {} ms, {} CPUs, load average {load_before} before and {load_after} after (1, 5, 15 min).\n",
        started.format("%Y-%m-%d %H:%M UTC"),
        config.nodes.len() - 1,
        if config.sync {
            "synchronous (ANY 1)"
        } else {
            "asynchronous"
        },
        t.lease_duration.as_millis(),
        t.renew_interval.as_millis(),
        t.renew_deadline.as_millis(),
        t.shutdown_budget.as_millis(),
        config.interval_ms,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let report = render_report(&results, &header);
    std::fs::write(&args.report, &report)
        .with_context(|| format!("failed to write {}", args.report.display()))?;
    print!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailability_is_the_widest_gap_between_acknowledged_writes() {
        let t0 = Instant::now();
        let at = |ms: u64, ok: bool| WriteRecord {
            id: ms as i64,
            started: t0 + Duration::from_millis(ms),
            finished: t0 + Duration::from_millis(ms),
            acknowledged: ok,
        };
        let records = vec![
            at(0, true),
            at(10, true),
            at(20, false),
            at(900, false),
            at(1500, true),
            at(1510, true),
        ];
        let window = unavailability(
            &records,
            t0 + Duration::from_millis(15),
            t0 + Duration::from_millis(2000),
        );
        assert_eq!(window, Some(Duration::from_millis(1490)));
        assert_eq!(
            percentile(
                &[
                    Duration::from_millis(5),
                    Duration::from_millis(1),
                    Duration::from_millis(9)
                ],
                0.5
            ),
            Some(Duration::from_millis(5))
        );
    }
}
