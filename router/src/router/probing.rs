//! The health loop: probe every node, evaluate the routing state, log what changed.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use super::{Inner, Node, RoutingState, error_chain};
use crate::health::{self, LagPolicy, NodeRole, Probe, ProbeOutcome};
use crate::lsn::{Lsn, LsnParseError};
use crate::metrics::Metrics;

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     pg_last_wal_receive_lsn()::text, \
     pg_last_wal_replay_lsn()::text, \
     (SELECT timeline_id FROM pg_control_checkpoint())";

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("failed to connect")]
    Connect(#[source] tokio_postgres::Error),
    #[error("failed to run the probe query")]
    Query(#[source] tokio_postgres::Error),
    #[error("failed to read the probe result")]
    Lsn(#[source] LsnParseError),
    #[error("probe timed out after {0:?}")]
    Timeout(Duration),
}

impl Inner {
    pub(super) async fn probe_round(&self) {
        let timeout = self.config.probe_timeout;
        let outcomes: Vec<ProbeOutcome> =
            futures::future::join_all(self.nodes.iter().map(|node| probe(node, timeout))).await;
        let policy = LagPolicy {
            max_lag: self.config.max_lag,
            max_lag_bytes: self.config.max_lag_bytes,
            alert_threshold: self.config.lag_alert_threshold,
        };
        for (node, outcome) in self.nodes.iter().zip(&outcomes) {
            if let ProbeOutcome::Answered(probe) = outcome {
                node.suspect.store(false, Ordering::Relaxed);
                if let Some(replay) = probe.replay_lsn {
                    node.replay_seen.fetch_max(replay.0, Ordering::Relaxed);
                }
            }
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let evaluation = health::evaluate(
            &self.names,
            &outcomes,
            &mut state.history,
            &policy,
            Instant::now(),
        );
        self.log_transitions(&state, &evaluation);
        let report = evaluation.report;
        if report.lag_alert && !state.lag_alerting {
            Metrics::bump(&self.metrics.lag_alert_episodes);
        }
        state.lag_alerting = report.lag_alert;
        if !evaluation.readers.is_empty() || evaluation.writer.is_none() {
            state.fallback_warned = false;
        }
        state.writer = evaluation.writer;
        state.readers = evaluation.readers;
        state.rounds += 1;
        state.report = Arc::new(report);
    }

    fn log_transitions(&self, before: &RoutingState, after: &health::Evaluation) {
        let report = &after.report;
        for (old, new) in before.report.nodes.iter().zip(&report.nodes) {
            if old.reachable && !new.reachable {
                warn!(node = %new.name, error = new.error.as_deref().unwrap_or(""), "node unreachable");
            } else if !old.reachable && new.reachable {
                info!(node = %new.name, role = ?new.role, "node reachable");
            }
            if old.role == NodeRole::Replica && new.role == NodeRole::Primary {
                info!(node = %new.name, "replica promoted: now writable");
            }
        }
        if before.rounds == 0 {
            match after.writer {
                Some(index) => {
                    info!(primary = %self.nodes[index].name, mode = ?report.mode, "router ready")
                }
                None => {
                    Metrics::bump(&self.metrics.read_only_mode_entered);
                    warn!(mode = ?report.mode, "no primary reachable at start: read-only mode, writes fail fast");
                }
            }
        }
        match (before.writer, after.writer) {
            _ if before.rounds == 0 => {}
            (Some(_), None) => {
                Metrics::bump(&self.metrics.read_only_mode_entered);
                warn!(mode = ?report.mode, "no primary reachable: read-only mode, writes fail fast");
            }
            (None, Some(index)) => {
                info!(primary = %self.nodes[index].name, "primary reachable: leaving read-only mode");
            }
            (Some(old), Some(new)) if old != new => {
                info!(from = %self.nodes[old].name, to = %self.nodes[new].name, "write target changed");
            }
            _ => {}
        }
        if report.lag_alert && !before.lag_alerting {
            warn!(
                lag_seconds = report.lag_seconds,
                threshold_seconds = self.config.lag_alert_threshold.as_secs_f64(),
                "replica lag above the alert threshold"
            );
        } else if !report.lag_alert && before.lag_alerting {
            info!(
                lag_seconds = report.lag_seconds,
                "replica lag back under the alert threshold"
            );
        }
    }
}

pub(super) async fn health_loop(inner: Weak<Inner>, wake: Arc<Notify>, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = wake.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.probe_round().await;
    }
}

async fn probe(node: &Node, timeout: Duration) -> ProbeOutcome {
    let mut slot = node.health_client.lock().await;
    let result = match tokio::time::timeout(timeout, probe_once(node, &mut slot)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    };
    match result {
        Ok(probe) => ProbeOutcome::Answered(probe),
        Err(error) => {
            *slot = None;
            ProbeOutcome::Unreachable {
                error: error_chain(&error),
            }
        }
    }
}

async fn probe_once(
    node: &Node,
    slot: &mut Option<tokio_postgres::Client>,
) -> Result<Probe, ProbeError> {
    let client = match slot.take() {
        Some(client) if !client.is_closed() => slot.insert(client),
        _ => {
            let client = match &node.tls {
                Some(tls) => {
                    let (client, connection) = node
                        .pg_config
                        .connect(tls.clone())
                        .await
                        .map_err(ProbeError::Connect)?;
                    tokio::spawn(connection);
                    client
                }
                None => {
                    let (client, connection) = node
                        .pg_config
                        .connect(NoTls)
                        .await
                        .map_err(ProbeError::Connect)?;
                    tokio::spawn(connection);
                    client
                }
            };
            slot.insert(client)
        }
    };
    let row = client
        .query_one(PROBE_SQL, &[])
        .await
        .map_err(ProbeError::Query)?;
    let lsn = |column: usize| -> Result<Option<Lsn>, ProbeError> {
        let text: Option<String> = row.try_get(column).map_err(ProbeError::Query)?;
        text.map(|text| Lsn::from_str(&text))
            .transpose()
            .map_err(ProbeError::Lsn)
    };
    let timeline: Option<i32> = row.try_get(4).map_err(ProbeError::Query)?;
    Ok(Probe {
        in_recovery: row.try_get(0).map_err(ProbeError::Query)?,
        current_lsn: lsn(1)?,
        receive_lsn: lsn(2)?,
        replay_lsn: lsn(3)?,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()),
    })
}
