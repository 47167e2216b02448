//! Planned switchover: validate a request and turn it into a plan the rounds carry out
//! (demote the holder with a fast shutdown, it releases the lease, the target takes the lease once
//! it has received all of the old primary's WAL, then the target is promoted; no expiry wait).

use super::candidate::{best, promotable_replicas};
use super::model::{EngineInput, ObservedRole, SwitchoverPlan};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwitchoverError {
    #[error("no primary is serving: a switchover needs a healthy lease holder")]
    NoPrimary,
    #[error("unknown instance {0:?}")]
    UnknownInstance(String),
    #[error("{0} is already the primary")]
    TargetIsPrimary(String),
    #[error("{0} is not reachable or its report is stale")]
    TargetUnreachable(String),
    #[error("{name} is not a running replica (role {role:?}, postgres up: {postgres_up})")]
    TargetNotReplica {
        name: String,
        role: ObservedRole,
        postgres_up: bool,
    },
    #[error("{name} does not stream from the primary {primary}")]
    TargetNotStreaming { name: String, primary: String },
    #[error("{0} has failover priority 0 and may never be promoted")]
    TargetNotPromotable(String),
    #[error("{name} lags {lag} bytes behind the primary; the switchover limit is {limit} bytes")]
    TargetLagging { name: String, lag: u64, limit: u64 },
    #[error("{name}'s lag is unknown (no received position or no primary position)")]
    TargetLagUnknown { name: String },
    #[error("no replica is ready to take over")]
    NoCandidate,
    #[error("a switchover to {0} is already in progress")]
    InProgress(String),
    #[error(
        "once {primary} is down no replica could be proven to hold every acknowledged commit: {refusal}"
    )]
    QuorumUnprovable {
        primary: String,
        refusal: super::candidate::Refusal,
    },
}

/// Check that `target` can take over from the serving holder `primary` right now.
pub fn check_target(
    input: &EngineInput,
    primary: &str,
    target: &str,
) -> Result<(), SwitchoverError> {
    let t = input
        .instance(target)
        .ok_or_else(|| SwitchoverError::UnknownInstance(target.to_string()))?;
    if target == primary {
        return Err(SwitchoverError::TargetIsPrimary(target.to_string()));
    }
    if !input.is_fresh(t) {
        return Err(SwitchoverError::TargetUnreachable(target.to_string()));
    }
    if t.role != ObservedRole::Replica || !t.postgres_up {
        return Err(SwitchoverError::TargetNotReplica {
            name: target.to_string(),
            role: t.role,
            postgres_up: t.postgres_up,
        });
    }
    if input.spec.priority_of(target) == 0 {
        return Err(SwitchoverError::TargetNotPromotable(target.to_string()));
    }
    if t.upstream.as_deref() != Some(primary) {
        return Err(SwitchoverError::TargetNotStreaming {
            name: target.to_string(),
            primary: primary.to_string(),
        });
    }
    let primary_flush = input.instance(primary).and_then(|p| p.flush_lsn);
    let (Some(received), Some(flush)) = (t.received_lsn, primary_flush) else {
        return Err(SwitchoverError::TargetLagUnknown {
            name: target.to_string(),
        });
    };
    let lag = flush.bytes_since(received);
    let limit = input.spec.max_switchover_lag_bytes;
    if lag > limit {
        return Err(SwitchoverError::TargetLagging {
            name: target.to_string(),
            lag,
            limit,
        });
    }
    // In sync mode the takeover needs the quorum rule once the primary is down: refuse now
    // rather than demote a primary that no one could then replace.
    if input.spec.mode == super::model::ReplicationMode::Sync {
        let refusal = if input.memory.sync_record_lost {
            Some(super::candidate::Refusal::SyncRecordLost)
        } else {
            super::candidate::quorum_position(input, Some(primary), None).err()
        };
        if let Some(refusal) = refusal {
            return Err(SwitchoverError::QuorumUnprovable {
                primary: primary.to_string(),
                refusal,
            });
        }
    }
    Ok(())
}

/// Validate a switchover request (`to = None`: the best replica) into a plan.
pub fn plan_switchover(
    input: &EngineInput,
    to: Option<&str>,
) -> Result<SwitchoverPlan, SwitchoverError> {
    if let Some(plan) = &input.memory.switchover {
        return Err(SwitchoverError::InProgress(plan.to.clone()));
    }
    let primary = input
        .lease
        .holder
        .as_deref()
        .and_then(|h| input.instance(h))
        .filter(|h| input.is_fresh(h) && h.is_writable_primary())
        .ok_or(SwitchoverError::NoPrimary)?;
    let target = match to {
        Some(name) => name.to_string(),
        None => {
            let ready: Vec<_> = promotable_replicas(input, Some(&primary.name))
                .into_iter()
                .filter(|r| check_target(input, &primary.name, &r.name).is_ok())
                .collect();
            best(input, &ready)
                .map(|r| r.name.clone())
                .ok_or(SwitchoverError::NoCandidate)?
        }
    };
    check_target(input, &primary.name, &target)?;
    Ok(SwitchoverPlan {
        from: primary.name.clone(),
        to: target,
        requested_at: input.now,
    })
}

/// Once the old primary is down, may `target` take the released lease under the same rules as
/// a failover? It must be promotable (fresh, running, on the newest timeline, not a former
/// primary) and, in sync mode, hold every acknowledged commit by the recorded quorum — which
/// must not have been lost.
pub fn target_holds_every_commit(input: &EngineInput, from: &str, target: &str) -> bool {
    let promotable = promotable_replicas(input, Some(from));
    let Some(t) = promotable.iter().find(|i| i.name == target) else {
        return false;
    };
    if input.spec.mode == super::model::ReplicationMode::Sync && input.memory.sync_record_lost {
        return false;
    }
    match super::candidate::quorum_position(input, Some(from), Some(input.commits_ended_at())) {
        Ok(None) => true,
        Ok(Some(required)) => t.received_lsn.is_some_and(|lsn| lsn >= required),
        Err(_) => false,
    }
}
