//! Pure health evaluation: from raw probes of every node to roles, lag, the read set, the write
//! target and the `/health/db` report. No IO and no clock: time is an input.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lsn::Lsn;

/// What one probe of one node returned.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub in_recovery: bool,
    pub timeline: Option<u32>,
    /// `pg_current_wal_lsn()` on a primary.
    pub current_lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
}

/// The outcome of probing one node.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeOutcome {
    Answered(Probe),
    Unreachable { error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Primary,
    Replica,
    Unknown,
}

/// One node in the health report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeHealth {
    pub name: String,
    pub reachable: bool,
    pub role: NodeRole,
    pub timeline: Option<u32>,
    pub current_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// WAL bytes between the primary's position and this replica's replay position;
    /// `None` when unknown (no primary position, or nothing replayed yet).
    pub lag_bytes: Option<u64>,
    /// Seconds this replica's replay is behind; 0 when caught up, `None` when unknown.
    pub lag_seconds: Option<f64>,
    pub serves_reads: bool,
    pub error: Option<String>,
}

/// Limits that take a replica out of the read set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LagPolicy {
    pub max_lag: Option<Duration>,
    pub max_lag_bytes: Option<u64>,
    pub alert_threshold: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryState {
    /// A node answers as primary: writes work.
    Ok,
    /// No node answers as primary: read-only mode.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    /// At least one replica serves reads.
    Ok,
    /// No replica is eligible; reads go to the primary.
    Fallback,
    /// Neither a replica nor the primary can serve reads.
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    ReadWrite,
    ReadOnly,
    Unavailable,
}

/// What a caller of `/health/db` needs to work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Writes and reads (the default).
    ReadWrite,
    /// Reads only (for read-only paths behind their own load-balancer check).
    Read,
}

/// The body of `/health/db`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    pub primary: PrimaryState,
    pub replica: ReplicaState,
    /// The largest known lag of a reachable replica; `None` when no replica lag is known.
    pub lag_seconds: Option<f64>,
    pub lag_bytes: Option<u64>,
    /// A reachable replica is further behind than the alert threshold.
    pub lag_alert: bool,
    pub mode: Mode,
    pub nodes: Vec<NodeHealth>,
}

impl HealthReport {
    /// HTTP status for `/health/db`: 200 when everything `need` requires works, else 503.
    pub fn http_status(&self, need: Need) -> u16 {
        let reads = self.replica != ReplicaState::Down;
        let writes = self.primary == PrimaryState::Ok;
        let serves = match need {
            Need::ReadWrite => reads && writes,
            Need::Read => reads,
        };
        if serves { 200 } else { 503 }
    }

    /// The report before the first probe: nothing known.
    pub fn unknown(names: &[String]) -> Self {
        Self {
            primary: PrimaryState::Down,
            replica: ReplicaState::Down,
            lag_seconds: None,
            lag_bytes: None,
            lag_alert: false,
            mode: Mode::Unavailable,
            nodes: names
                .iter()
                .map(|name| NodeHealth {
                    name: name.clone(),
                    reachable: false,
                    role: NodeRole::Unknown,
                    timeline: None,
                    current_lsn: None,
                    replay_lsn: None,
                    lag_bytes: None,
                    lag_seconds: None,
                    serves_reads: false,
                    error: Some("not probed yet".to_owned()),
                })
                .collect(),
        }
    }
}

/// Samples of the primary's WAL position over time, to turn a replica's replay position into
/// seconds of lag without the idle-primary trap: a replica that replayed everything the primary
/// has written is 0 s behind however old the last commit is, and one that is behind is as far
/// behind as the oldest sample it has not replayed yet.
#[derive(Debug, Clone, Default)]
pub struct PrimaryWalHistory {
    samples: VecDeque<(Instant, Lsn)>,
}

/// Samples older than this are dropped; a replica further behind reports at least this.
const HISTORY_HORIZON: Duration = Duration::from_secs(3600);

impl PrimaryWalHistory {
    pub fn record(&mut self, at: Instant, lsn: Lsn) {
        if self.samples.back().is_some_and(|&(_, last)| last == lsn) {
            // Unchanged position: the earlier sample already dates it.
            return;
        }
        self.samples.push_back((at, lsn));
        while self
            .samples
            .front()
            .is_some_and(|&(sampled, _)| at.saturating_duration_since(sampled) > HISTORY_HORIZON)
        {
            self.samples.pop_front();
        }
    }

    /// Seconds `replay` is behind at `now`, or `None` without any sample.
    pub fn lag_seconds(&self, replay: Lsn, now: Instant) -> Option<f64> {
        let &(_, latest) = self.samples.back()?;
        if replay >= latest {
            return Some(0.0);
        }
        // The first sample beyond `replay` existed at its time and is not replayed yet.
        self.samples
            .iter()
            .find(|&&(_, lsn)| lsn > replay)
            .map(|&(at, _)| now.saturating_duration_since(at).as_secs_f64())
    }
}

/// The result of one health round.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Index of the node that takes writes.
    pub writer: Option<usize>,
    /// Indexes of the replicas that take reads.
    pub readers: Vec<usize>,
    pub report: HealthReport,
}

/// Turn one round of probes into roles, lag, read set, write target and report.
///
/// The write target is the node that answers `pg_is_in_recovery() = false`; if several do
/// (an old primary came back unfenced), the highest timeline wins, then configuration order.
/// Replicas serve reads when reachable and within the lag limits; with no primary reachable
/// their lag cannot be measured and they keep serving reads (nothing fresher exists).
pub fn evaluate(
    names: &[String],
    outcomes: &[ProbeOutcome],
    history: &mut PrimaryWalHistory,
    policy: &LagPolicy,
    now: Instant,
) -> Evaluation {
    let writer = outcomes
        .iter()
        .enumerate()
        .filter_map(|(index, outcome)| match outcome {
            ProbeOutcome::Answered(probe) if !probe.in_recovery => Some((index, probe)),
            _ => None,
        })
        .max_by_key(|(index, probe)| (probe.timeline.unwrap_or(0), std::cmp::Reverse(*index)))
        .map(|(index, _)| index);
    let primary_lsn = writer.and_then(|index| match &outcomes[index] {
        ProbeOutcome::Answered(probe) => probe.current_lsn,
        ProbeOutcome::Unreachable { .. } => None,
    });
    match primary_lsn {
        Some(lsn) => history.record(now, lsn),
        // Without a primary the samples would date WAL from an old timeline: start afresh.
        None => *history = PrimaryWalHistory::default(),
    }

    let mut nodes = Vec::with_capacity(outcomes.len());
    let mut readers = Vec::new();
    for (index, (name, outcome)) in names.iter().zip(outcomes).enumerate() {
        let node = match outcome {
            ProbeOutcome::Unreachable { error } => NodeHealth {
                name: name.clone(),
                reachable: false,
                role: NodeRole::Unknown,
                timeline: None,
                current_lsn: None,
                replay_lsn: None,
                lag_bytes: None,
                lag_seconds: None,
                serves_reads: false,
                error: Some(error.clone()),
            },
            ProbeOutcome::Answered(probe) if !probe.in_recovery => NodeHealth {
                name: name.clone(),
                reachable: true,
                role: NodeRole::Primary,
                timeline: probe.timeline,
                current_lsn: probe.current_lsn,
                replay_lsn: None,
                lag_bytes: None,
                lag_seconds: None,
                serves_reads: false,
                error: (Some(index) != writer)
                    .then(|| "another writable node was chosen as primary".to_owned()),
            },
            ProbeOutcome::Answered(probe) => {
                let lag_bytes = primary_lsn
                    .zip(probe.replay_lsn)
                    .map(|(primary, replay)| primary.bytes_after(replay));
                let lag_seconds = probe
                    .replay_lsn
                    .filter(|_| primary_lsn.is_some())
                    .and_then(|replay| history.lag_seconds(replay, now));
                let within_limits = if writer.is_none() {
                    true
                } else {
                    let seconds_ok = match (policy.max_lag, lag_seconds) {
                        (None, _) => true,
                        (Some(max), Some(lag)) => lag <= max.as_secs_f64(),
                        (Some(_), None) => false,
                    };
                    let bytes_ok = match (policy.max_lag_bytes, lag_bytes) {
                        (None, _) => true,
                        (Some(max), Some(lag)) => lag <= max,
                        (Some(_), None) => false,
                    };
                    seconds_ok && bytes_ok
                };
                if within_limits {
                    readers.push(index);
                }
                NodeHealth {
                    name: name.clone(),
                    reachable: true,
                    role: NodeRole::Replica,
                    timeline: probe.timeline,
                    current_lsn: probe.receive_lsn,
                    replay_lsn: probe.replay_lsn,
                    lag_bytes,
                    lag_seconds,
                    serves_reads: within_limits,
                    error: None,
                }
            }
        };
        nodes.push(node);
    }

    let lag_seconds = nodes
        .iter()
        .filter(|node| node.role == NodeRole::Replica)
        .filter_map(|node| node.lag_seconds)
        .reduce(f64::max);
    let lag_bytes = nodes
        .iter()
        .filter(|node| node.role == NodeRole::Replica)
        .filter_map(|node| node.lag_bytes)
        .max();
    let lag_alert = lag_seconds.is_some_and(|lag| lag > policy.alert_threshold.as_secs_f64());
    let primary = if writer.is_some() {
        PrimaryState::Ok
    } else {
        PrimaryState::Down
    };
    let replica = match (readers.is_empty(), writer.is_some()) {
        (false, _) => ReplicaState::Ok,
        (true, true) => ReplicaState::Fallback,
        (true, false) => ReplicaState::Down,
    };
    let mode = match (primary, replica) {
        (PrimaryState::Ok, _) => Mode::ReadWrite,
        (PrimaryState::Down, ReplicaState::Down) => Mode::Unavailable,
        (PrimaryState::Down, _) => Mode::ReadOnly,
    };
    Evaluation {
        writer,
        readers,
        report: HealthReport {
            primary,
            replica,
            lag_seconds,
            lag_bytes,
            lag_alert,
            mode,
            nodes,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["p".to_owned(), "r".to_owned()]
    }

    fn primary(lsn: u64) -> ProbeOutcome {
        ProbeOutcome::Answered(Probe {
            in_recovery: false,
            timeline: Some(1),
            current_lsn: Some(Lsn(lsn)),
            receive_lsn: None,
            replay_lsn: None,
        })
    }

    fn replica(replay: u64) -> ProbeOutcome {
        ProbeOutcome::Answered(Probe {
            in_recovery: true,
            timeline: Some(1),
            current_lsn: None,
            receive_lsn: Some(Lsn(replay)),
            replay_lsn: Some(Lsn(replay)),
        })
    }

    fn down() -> ProbeOutcome {
        ProbeOutcome::Unreachable {
            error: "connection refused".to_owned(),
        }
    }

    fn policy() -> LagPolicy {
        LagPolicy {
            max_lag: Some(Duration::from_secs(5)),
            max_lag_bytes: None,
            alert_threshold: Duration::from_secs(3),
        }
    }

    #[test]
    fn idle_primary_caught_up_replica_is_zero_seconds_behind() {
        let mut history = PrimaryWalHistory::default();
        let start = Instant::now();
        // The primary's position has not moved for an hour: still 0 s, not "an hour".
        evaluate(
            &names(),
            &[primary(100), replica(100)],
            &mut history,
            &policy(),
            start,
        );
        let later = start + Duration::from_secs(3000);
        let eval = evaluate(
            &names(),
            &[primary(100), replica(100)],
            &mut history,
            &policy(),
            later,
        );
        assert_eq!(eval.report.nodes[1].lag_seconds, Some(0.0));
        assert_eq!(eval.report.lag_seconds, Some(0.0));
        assert_eq!(eval.readers, vec![1]);
        assert_eq!(eval.report.http_status(Need::ReadWrite), 200);
    }

    #[test]
    fn lag_is_dated_by_the_first_unreplayed_sample() {
        let mut history = PrimaryWalHistory::default();
        let start = Instant::now();
        evaluate(
            &names(),
            &[primary(100), replica(100)],
            &mut history,
            &policy(),
            start,
        );
        let write_seen = start + Duration::from_secs(10);
        evaluate(
            &names(),
            &[primary(200), replica(100)],
            &mut history,
            &policy(),
            write_seen,
        );
        let now = write_seen + Duration::from_secs(4);
        let eval = evaluate(
            &names(),
            &[primary(300), replica(100)],
            &mut history,
            &policy(),
            now,
        );
        let lag = eval.report.nodes[1].lag_seconds.unwrap();
        assert!((lag - 4.0).abs() < 1e-9, "lag {lag}");
        assert!(eval.report.lag_alert);
        assert_eq!(eval.report.nodes[1].lag_bytes, Some(200));
        assert!(eval.report.nodes[1].serves_reads);
    }

    #[test]
    fn replica_beyond_max_lag_leaves_read_set_and_reads_fall_back() {
        let mut history = PrimaryWalHistory::default();
        let start = Instant::now();
        evaluate(
            &names(),
            &[primary(200), replica(100)],
            &mut history,
            &policy(),
            start,
        );
        let now = start + Duration::from_secs(6);
        let eval = evaluate(
            &names(),
            &[primary(200), replica(100)],
            &mut history,
            &policy(),
            now,
        );
        assert!(eval.readers.is_empty());
        assert_eq!(eval.report.replica, ReplicaState::Fallback);
        assert_eq!(eval.report.http_status(Need::ReadWrite), 200);
    }

    #[test]
    fn unknown_lag_is_not_zero_and_is_not_eligible_under_a_limit() {
        let mut history = PrimaryWalHistory::default();
        let never_replayed = ProbeOutcome::Answered(Probe {
            in_recovery: true,
            timeline: Some(1),
            current_lsn: None,
            receive_lsn: None,
            replay_lsn: None,
        });
        let eval = evaluate(
            &names(),
            &[primary(100), never_replayed],
            &mut history,
            &policy(),
            Instant::now(),
        );
        assert_eq!(eval.report.nodes[1].lag_seconds, None);
        assert_eq!(eval.report.lag_seconds, None);
        assert!(eval.readers.is_empty());
    }

    #[test]
    fn primary_down_is_read_only_and_replicas_keep_serving() {
        let mut history = PrimaryWalHistory::default();
        let eval = evaluate(
            &names(),
            &[down(), replica(100)],
            &mut history,
            &policy(),
            Instant::now(),
        );
        assert_eq!(eval.writer, None);
        assert_eq!(eval.readers, vec![1]);
        assert_eq!(eval.report.mode, Mode::ReadOnly);
        assert_eq!(eval.report.nodes[1].lag_seconds, None);
        assert_eq!(eval.report.http_status(Need::ReadWrite), 503);
        assert_eq!(eval.report.http_status(Need::Read), 200);
    }

    #[test]
    fn everything_down_is_unavailable() {
        let mut history = PrimaryWalHistory::default();
        let eval = evaluate(
            &names(),
            &[down(), down()],
            &mut history,
            &policy(),
            Instant::now(),
        );
        assert_eq!(eval.report.mode, Mode::Unavailable);
        assert_eq!(eval.report.http_status(Need::Read), 503);
    }

    #[test]
    fn promoted_replica_becomes_the_writer() {
        let mut history = PrimaryWalHistory::default();
        let eval = evaluate(
            &names(),
            &[down(), primary(500)],
            &mut history,
            &policy(),
            Instant::now(),
        );
        assert_eq!(eval.writer, Some(1));
        assert_eq!(eval.report.replica, ReplicaState::Fallback);
        assert_eq!(eval.report.http_status(Need::ReadWrite), 200);
    }

    #[test]
    fn two_writable_nodes_prefer_the_higher_timeline() {
        let mut history = PrimaryWalHistory::default();
        let newer = ProbeOutcome::Answered(Probe {
            in_recovery: false,
            timeline: Some(2),
            current_lsn: Some(Lsn(50)),
            receive_lsn: None,
            replay_lsn: None,
        });
        let eval = evaluate(
            &names(),
            &[primary(900), newer],
            &mut history,
            &policy(),
            Instant::now(),
        );
        assert_eq!(eval.writer, Some(1));
        assert!(eval.report.nodes[0].error.is_some());
    }
}
