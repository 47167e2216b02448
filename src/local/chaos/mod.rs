//! `pgrs local chaos`: failure rounds against a running local cluster under a continuous write
//! load, the failover report, and the write check.
//!
//! Writers ([`writers`]): one through the write endpoint, as an application, and one straight
//! to every node's postgres, so that a node still acknowledging writes after it was superseded
//! is seen. Measured per round: the write-unavailability window through the write endpoint (the
//! longest gap between two acknowledged writes around the failure), the promotion LSN gap
//! chosen by the engine, and the rejoin time of the failed node. At the end the ids on the final
//! primary are read, and the whole history (every writer), that final state and the promotions
//! the run saw go through the Jepsen-style checker [`crate::chaos::check`]: split-brain writes,
//! lost acknowledged writes, the longest window without an acknowledged write. The report holds
//! the per-round table and the checker's section; the command fails when the checker finds a
//! violation (lost acknowledged writes count only in synchronous mode).

pub mod cluster;
pub mod load;
pub mod writers;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rand::Rng;
use tokio_postgres::NoTls;

use crate::chaos::{CheckReport, FinalState, Promotion, WriteOutcome, check};
use crate::local::cli::{cluster_status, kill_node, switchover};
use crate::local::layout::{Layout, LocalConfig};

pub use cluster::{restart_and_rejoin, wait_healthy, wait_new_primary};
pub use load::{
    WriteLoad, WriteRecord, connection_string, missing_acknowledged, prepare_table, unavailability,
};
use writers::{Attempt, Writers, endpoint_records};

/// What makes `pgrs local chaos` fail once the rounds ran.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error(
        "the write check found violations ({}): {}; report in {}",
        if *.synchronous { "synchronous replication" } else { "asynchronous replication" },
        .violations.join("; "),
        .report.display()
    )]
    Violations {
        violations: Vec<String>,
        synchronous: bool,
        report: PathBuf,
    },
    #[error("no primary once the rounds were over")]
    NoFinalPrimary,
    #[error("the final primary {node} is in recovery: the final read needs the primary")]
    FinalPrimaryInRecovery { node: String },
    #[error("failed to read the ids on the final primary {node}: {source}")]
    FinalRead {
        node: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("no answer from the final primary {node} within {seconds} s for the final read")]
    FinalReadTimeout { node: String, seconds: u64 },
}

#[derive(Debug, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub dir: crate::local::cli::DirArg,
    /// Rounds per failure kind.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Where to write the report (Markdown): the per-round table and the write check. The
    /// command fails when the check finds a violation (split-brain writes; lost acknowledged
    /// writes in sync mode).
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

/// The figures of one failure kind over its rounds.
#[derive(Debug, Clone, Default)]
pub struct KindResult {
    /// Per round: the longest gap between acknowledged writes through the write endpoint.
    pub unavailability: Vec<Duration>,
    pub lsn_gaps: Vec<Option<u64>>,
    pub rejoin: Vec<Duration>,
    /// Writes acknowledged (any writer) that were sent during this kind's rounds.
    pub acknowledged: usize,
    /// Of those, the ones missing from the final primary.
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

/// What a chaos run produced: the per-kind figures and the checker's verdict on the history.
#[derive(Debug, Clone)]
pub struct ChaosRun {
    pub results: BTreeMap<FailureKind, KindResult>,
    pub check: CheckReport,
    /// The promotions the run saw (one per round), on the writers' clock.
    pub promotions: Vec<Promotion>,
    /// Writers: the one through the write endpoint plus one per node.
    pub writers: usize,
}

/// How long the final read on the final primary may take.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Every id of this run (`>= first_id`) on the final primary `node`, read straight from its
/// postgres; retried while it does not answer, refused if it is in recovery.
async fn final_ids(
    config: &LocalConfig,
    node: &str,
    password: &str,
    first_id: i64,
) -> anyhow::Result<BTreeSet<i64>> {
    let port = config.node(node)?.pg_port;
    let conninfo = connection_string(port, &config.superuser, password);
    let deadline = Instant::now() + FINAL_READ_TIMEOUT;
    loop {
        let attempt = async {
            let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let in_recovery: bool = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await?
                .get(0);
            let rows = client
                .query("SELECT id FROM pgrs_chaos WHERE id >= $1", &[&first_id])
                .await?;
            Ok::<_, tokio_postgres::Error>((in_recovery, rows))
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok((true, _))) => {
                return Err(ChaosError::FinalPrimaryInRecovery {
                    node: node.to_string(),
                }
                .into());
            }
            Ok(Ok((false, rows))) => {
                return Ok(rows.iter().map(|row| row.get::<_, i64>(0)).collect());
            }
            Ok(Err(source)) if Instant::now() > deadline => {
                return Err(ChaosError::FinalRead {
                    node: node.to_string(),
                    source,
                }
                .into());
            }
            Err(_) if Instant::now() > deadline => {
                return Err(ChaosError::FinalReadTimeout {
                    node: node.to_string(),
                    seconds: FINAL_READ_TIMEOUT.as_secs(),
                }
                .into());
            }
            Ok(Err(error)) => {
                tracing::warn!(%node, %error, "final read failed, retrying");
            }
            Err(_) => tracing::warn!(%node, "final read timed out, retrying"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The per-kind counts of acknowledged writes (any writer) sent during each kind's rounds, and
/// of those the ones the checker found missing from the final primary.
fn count_per_kind(
    results: &mut BTreeMap<FailureKind, KindResult>,
    kind_ranges: &[(FailureKind, Duration, Duration)],
    attempts: &[Attempt],
    lost: &BTreeSet<i64>,
) {
    for &(kind, from, to) in kind_ranges {
        let entry = results.entry(kind).or_default();
        for attempt in attempts.iter().filter(|a| {
            a.write.outcome == WriteOutcome::Acknowledged
                && a.write.sent >= from
                && a.write.sent <= to
        }) {
            entry.acknowledged += 1;
            if lost.contains(&attempt.write.id) {
                entry.lost += 1;
            }
        }
    }
}

/// When the run knew `new` had taken over after the failure injected at `injected`: its first
/// acknowledged write since then, or the instant the status named it primary (`seen`: the lease
/// holder), whichever came first. Never before it held the lease (it was a replica refusing
/// writes when the failure was injected, and the status names the holder), and the old primary
/// must have stopped acknowledging before that; a term opened at the first acknowledgement is
/// not split in two by a later observation.
fn known_promotion(
    attempts: &[Attempt],
    new: &str,
    injected: Duration,
    seen: Duration,
) -> Promotion {
    let first_ack = attempts
        .iter()
        .filter(|a| a.write.node == new && a.write.answered >= injected)
        .filter_map(|a| a.write.acknowledged_at())
        .min();
    Promotion {
        node: new.to_string(),
        at: first_ack.map_or(seen, |ack| ack.min(seen)),
    }
}

/// Runs `rounds` failures of each kind against the cluster in `dir` under the writers, then
/// checks the history.
pub async fn run_rounds(
    dir: &Path,
    kinds: &[FailureKind],
    rounds: usize,
) -> anyhow::Result<ChaosRun> {
    let layout = Layout::new(dir);
    let config = layout.read_config()?;
    let password_path = layout.superuser_password();
    let password = std::fs::read_to_string(&password_path)
        .with_context(|| format!("failed to read {}", password_path.display()))?;
    let password = password.trim();
    let conninfo = connection_string(config.write_port, &config.superuser, password);
    wait_healthy(dir, Duration::from_secs(120)).await?;
    prepare_table(&conninfo).await?;
    // Ids from the wall clock in µs: unique across runs on the same table.
    let first_id = chrono::Utc::now().timestamp_micros();
    let start = Instant::now();
    let writers = Writers::start(&config, password, first_id, start);
    let writer_count = config.nodes.len() + 1;
    let mut promotions: Vec<Promotion> = Vec::new();
    let mut results: BTreeMap<FailureKind, KindResult> = BTreeMap::new();
    let mut kind_ranges: Vec<(FailureKind, Duration, Duration)> = Vec::new();
    for &kind in kinds {
        let kind_started = start.elapsed();
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
            let new_seen = Instant::now();
            // Until a write is acknowledged through the write endpoint by the new primary.
            let deadline = new_seen + Duration::from_secs(30);
            while writers.endpoint_acknowledged_since(new_seen) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let attempts = writers.attempts();
            let promotion = known_promotion(
                &attempts,
                &new,
                injected.saturating_duration_since(start),
                new_seen.saturating_duration_since(start),
            );
            promotions.push(promotion);
            let window = unavailability(
                &endpoint_records(&attempts, start),
                injected,
                Instant::now(),
            );
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
        kind_ranges.push((kind, kind_started, start.elapsed()));
    }
    let status = wait_healthy(dir, Duration::from_secs(120)).await?;
    let final_primary = status.primary.ok_or(ChaosError::NoFinalPrimary)?;
    let attempts = writers.stop().await;
    let ids = final_ids(&config, &final_primary, password, first_id).await?;
    let writes: Vec<crate::chaos::WriteRecord> = attempts.iter().map(|a| a.write.clone()).collect();
    let report = check(
        &writes,
        &FinalState {
            primary: final_primary,
            ids,
        },
        &promotions,
    );
    let lost: BTreeSet<i64> = report.lost.iter().copied().collect();
    count_per_kind(&mut results, &kind_ranges, &attempts, &lost);
    tracing::info!(
        writes = report.writes,
        acknowledged = report.acknowledged,
        refused = report.refused,
        indeterminate = report.indeterminate,
        terms = report.succession.len(),
        split_brain = report.split_brain.len(),
        lost = report.lost.len(),
        longest_gap_ms = report.longest_gap.map(|g| g.length().as_millis() as u64),
        "write check done"
    );
    Ok(ChaosRun {
        results,
        check: report,
        promotions,
        writers: writer_count,
    })
}

/// The command's verdict: an error naming every violation the checker found (lost
/// acknowledged writes count only with `synchronous` replication).
pub fn verdict(report: &CheckReport, synchronous: bool, path: &Path) -> Result<(), ChaosError> {
    let violations = report.violations(synchronous);
    if violations.is_empty() {
        return Ok(());
    }
    Err(ChaosError::Violations {
        violations,
        synchronous,
        report: path.to_path_buf(),
    })
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

/// The writers paragraph between the per-round table and the checker's section.
fn writers_note(run: &ChaosRun) -> String {
    format!(
        "\nWriters: one through the write endpoint (pausing {} ms between writes) and one \
         straight to each node's postgres (an attempt every {} ms), {} in all, ids unique over \
         the run, instants on one monotonic clock. Unavailable = the longest gap between two \
         writes acknowledged through the write endpoint around the failure; acknowledged writes \
         and lost = any writer, sent during the kind's rounds. The {} promotions of the run go \
         to the checker with the history, each at the new primary's first acknowledged write or \
         when the status named it, whichever came first.\n\n",
        writers::ENDPOINT_PAUSE.as_millis(),
        writers::DIRECT_PERIOD.as_millis(),
        run.writers,
        run.promotions.len(),
    )
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.dir.dir);
    let config = layout.read_config()?;
    let mut kinds = args.kinds.clone();
    kinds.dedup();
    let started = chrono::Utc::now();
    let load_before = load_average();
    let run = run_rounds(&args.dir.dir, &kinds, args.rounds).await?;
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
    let mut report = render_report(&run.results, &header);
    report.push_str(&writers_note(&run));
    report.push_str(&run.check.to_markdown());
    std::fs::write(&args.report, &report)
        .with_context(|| format!("failed to write {}", args.report.display()))?;
    print!("{report}");
    let checked = verdict(&run.check, config.sync, &args.report);
    if let Err(error) = &checked {
        tracing::error!(%error, synchronous = config.sync, "the write check failed");
    }
    Ok(checked?)
}

#[cfg(test)]
mod tests;
