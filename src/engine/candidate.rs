//! Failover candidate choice: the most advanced eligible replica, with the synchronous quorum rule
//! and the lag limit.
//!
//! Quorum rule: with `synchronous_standby_names = ANY k (S)`, an acknowledged commit is flushed
//! on at least `k` members of `S` (W = k). Reading R = |S| - k + 1 members guarantees R + W > |S|,
//! so the most advanced of any R reporting members holds every acknowledged commit, and so does
//! every replica at least that far. With fewer than R members reporting, no candidate is provably
//! safe.

use std::cmp::Reverse;

use super::Lsn;
use super::model::{EngineInput, InstanceObservation, MonoTime, ObservedRole, ReplicationMode};

/// Why no candidate may be promoted (without `allowDataLoss`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no eligible replica: none is reachable with a fresh report, running, and promotable")]
    NoEligibleReplica,
    #[error(
        "synchronous quorum not reachable: {reporting} of the {members} members of the sync set \
         have a usable report (fresh, and taken after the old primary could last commit), \
         {needed} are needed to be sure every acknowledged commit is kept"
    )]
    QuorumUnreachable {
        members: usize,
        needed: usize,
        reporting: usize,
    },
    #[error(
        "no promotable replica holds every acknowledged commit: the most advanced quorum member \
         is at {required}, the best promotable replica {candidate} is at {candidate_lsn}"
    )]
    BehindQuorum {
        required: Lsn,
        candidate: String,
        candidate_lsn: Lsn,
    },
    #[error(
        "best candidate {candidate} is {gap_bytes} bytes behind the last known primary position, \
         over the limit of {limit} bytes"
    )]
    TooFarBehind {
        candidate: String,
        gap_bytes: u64,
        limit: u64,
    },
    #[error(
        "the last primary position is unknown, so the lag of candidate {candidate} cannot be \
         checked against the limit of {limit} bytes"
    )]
    PrimaryPositionUnknown { candidate: String, limit: u64 },
    #[error(
        "the recorded synchronous quorum was lost with the controller's state, so no replica is \
         known to hold every acknowledged commit; restore the state, bring the old primary back, \
         or set allowDataLoss"
    )]
    SyncRecordLost,
}

/// A chosen candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub received_lsn: Lsn,
    /// Last known primary flush position minus the candidate's received position.
    pub lsn_gap_bytes: Option<u64>,
    /// Set when a safety rule refused and `allowDataLoss` overrode it; the refusal says what.
    pub overridden: Option<Refusal>,
}

/// Replicas that may be promoted at all: fresh report, postgres up, replica role, known received
/// position, priority above 0, not `excluded`, and on the newest timeline among them.
pub fn promotable_replicas<'a>(
    input: &'a EngineInput,
    excluded: Option<&str>,
) -> Vec<&'a InstanceObservation> {
    let base: Vec<&InstanceObservation> = input
        .instances
        .iter()
        .filter(|i| Some(i.name.as_str()) != excluded)
        .filter(|i| input.is_fresh(i) && i.postgres_up && i.role == ObservedRole::Replica)
        .filter(|i| i.received_lsn.is_some())
        .filter(|i| input.spec.priority_of(&i.name) > 0)
        // A former primary not yet rejoined may hold WAL the others never had: not a candidate.
        .filter(|i| !i.former_primary)
        .collect();
    let newest_timeline = base.iter().filter_map(|i| i.timeline).max();
    base.into_iter()
        .filter(|i| newest_timeline.is_none() || i.timeline == newest_timeline)
        .collect()
}

/// The position every acknowledged commit is guaranteed to be at or before, proven by the
/// recorded synchronous quorum; `Ok(None)` when replication is asynchronous.
///
/// `reported_after`: count only reports taken after this instant. A takeover passes the instant
/// after which the old primary can no longer have committed ([`EngineInput::commits_ended_at`]):
/// a member's earlier report may predate commits it acknowledged since (during the old
/// primary's checkpoint and stop, or its last seconds before fencing).
pub fn quorum_position(
    input: &EngineInput,
    excluded: Option<&str>,
    reported_after: Option<MonoTime>,
) -> Result<Option<Lsn>, Refusal> {
    let sync = &input.memory.recorded_sync;
    if !sync.is_synchronous() {
        return Ok(None);
    }
    let members = sync.members.len();
    let needed = members - sync.k as usize + 1;
    let reporting: Vec<Lsn> = sync
        .members
        .iter()
        .filter(|m| Some(m.as_str()) != excluded)
        .filter_map(|m| input.instance(m))
        .filter(|i| input.is_fresh(i) && i.postgres_up && i.role == ObservedRole::Replica)
        .filter(|i| reported_after.is_none_or(|after| i.last_report_at > Some(after)))
        .filter_map(|i| i.received_lsn)
        .collect();
    if reporting.len() < needed {
        return Err(Refusal::QuorumUnreachable {
            members,
            needed,
            reporting: reporting.len(),
        });
    }
    Ok(reporting.into_iter().max())
}

/// Order: received LSN, then replayed LSN, then priority (higher first), then name.
fn rank<'a>(input: &EngineInput, i: &'a InstanceObservation) -> impl Ord + 'a {
    (
        i.received_lsn,
        i.replayed_lsn,
        input.spec.priority_of(&i.name),
        Reverse(i.name.as_str()),
    )
}

/// The best of `replicas` by [`rank`].
pub fn best<'a>(
    input: &EngineInput,
    replicas: &[&'a InstanceObservation],
) -> Option<&'a InstanceObservation> {
    replicas
        .iter()
        .copied()
        .max_by(|a, b| rank(input, a).cmp(&rank(input, b)))
}

/// Choose whom to promote in place of `failed` (the old holder, if any).
pub fn choose_failover_candidate(
    input: &EngineInput,
    failed: Option<&str>,
) -> Result<Candidate, Refusal> {
    let promotable = promotable_replicas(input, failed);
    let fallback = best(input, &promotable).ok_or(Refusal::NoEligibleReplica)?;
    let allow = input.spec.allow_data_loss;
    let reference = input.memory.last_primary.as_ref().map(|p| p.flush_lsn);
    let gap_of = |lsn: Lsn| reference.map(|r| r.bytes_since(lsn));
    let candidate = |i: &InstanceObservation, overridden: Option<Refusal>| Candidate {
        name: i.name.clone(),
        received_lsn: i.received_lsn.unwrap_or_default(),
        lsn_gap_bytes: gap_of(i.received_lsn.unwrap_or_default()),
        overridden,
    };

    if input.spec.mode == ReplicationMode::Sync && input.memory.sync_record_lost {
        return if allow {
            Ok(candidate(fallback, Some(Refusal::SyncRecordLost)))
        } else {
            Err(Refusal::SyncRecordLost)
        };
    }
    match quorum_position(input, failed, Some(input.commits_ended_at())) {
        Ok(Some(required)) => {
            let safe: Vec<&InstanceObservation> = promotable
                .iter()
                .copied()
                .filter(|i| i.received_lsn.is_some_and(|lsn| lsn >= required))
                .collect();
            match best(input, &safe) {
                // The quorum proves this one holds every acknowledged commit: no lag check.
                Some(chosen) => Ok(candidate(chosen, None)),
                None => {
                    let refusal = Refusal::BehindQuorum {
                        required,
                        candidate: fallback.name.clone(),
                        candidate_lsn: fallback.received_lsn.unwrap_or_default(),
                    };
                    if allow {
                        Ok(candidate(fallback, Some(refusal)))
                    } else {
                        Err(refusal)
                    }
                }
            }
        }
        Err(refusal) if allow => Ok(candidate(fallback, Some(refusal))),
        Err(refusal) => Err(refusal),
        Ok(None) => {
            let chosen = candidate(fallback, None);
            let Some(limit) = input.spec.max_failover_lag_bytes else {
                return Ok(chosen);
            };
            let refusal = match chosen.lsn_gap_bytes {
                None => Refusal::PrimaryPositionUnknown {
                    candidate: chosen.name.clone(),
                    limit,
                },
                Some(gap) if gap > limit => Refusal::TooFarBehind {
                    candidate: chosen.name.clone(),
                    gap_bytes: gap,
                    limit,
                },
                Some(_) => return Ok(chosen),
            };
            if allow {
                Ok(Candidate {
                    overridden: Some(refusal),
                    ..chosen
                })
            } else {
                Err(refusal)
            }
        }
    }
}
