//! Synchronous replication settings: what `synchronous_standby_names` should be, and how the
//! recorded quorum (used at failover time) may change without ever under-stating what an
//! acknowledged commit is guaranteed to be on.
//!
//! Invariant: the recorded set R and the applied set P satisfy members(P) ⊆ members(R) and
//! k(R) ≤ k(P). Then any |R| - k(R) + 1 members of R meet any k(P) members of P, so the quorum
//! rule over R is sound. Hence: widen R before applying a new P, narrow R only to a P that the
//! primary confirmed it applies.

use super::model::{DataDurability, EngineInput, ObservedRole, ReplicationMode, SyncSet};

/// The `synchronous_standby_names` quorum `primary` should apply.
pub fn desired_sync(input: &EngineInput, primary: &str) -> SyncSet {
    if input.spec.mode == ReplicationMode::Async || input.spec.sync_replicas == 0 {
        return SyncSet::asynchronous();
    }
    let members: Vec<String> = match input.spec.durability {
        // Every other instance may acknowledge: postgres only counts the connected ones, so
        // writes wait rather than silently degrade.
        DataDurability::Required => input
            .instances
            .iter()
            .filter(|i| i.name != primary)
            .map(|i| i.name.clone())
            .collect(),
        // Only the replicas streaming from the primary right now.
        DataDurability::Preferred => input
            .instances
            .iter()
            .filter(|i| i.name != primary)
            .filter(|i| input.is_fresh(i) && i.postgres_up && i.role == ObservedRole::Replica)
            .filter(|i| i.upstream.as_deref() == Some(primary))
            .map(|i| i.name.clone())
            .collect(),
    };
    SyncSet {
        k: input.spec.sync_replicas,
        members,
    }
    .normalized()
}

/// The recorded quorum to hold while `applying` is being applied: members united, smallest k.
pub fn widen(recorded: &SyncSet, applying: &SyncSet) -> SyncSet {
    if !applying.is_synchronous() && !recorded.is_synchronous() {
        return SyncSet::asynchronous();
    }
    // An asynchronous side acknowledges with no standby at all (k = 0): the quorum rule cannot
    // help for commits acknowledged under it, so the widened record is asynchronous too.
    if !applying.is_synchronous() || !recorded.is_synchronous() {
        return SyncSet::asynchronous();
    }
    let mut members = recorded.members.clone();
    members.extend(applying.members.iter().cloned());
    SyncSet {
        k: recorded.k.min(applying.k),
        members,
    }
    .normalized()
}

/// The recorded quorum once `primary` confirmed it applies `applied`: narrowed to it when that is
/// sound, else the widened record. Narrowing to a synchronous set additionally needs `k` of its
/// members to have received the primary's flush position observed with it, so that commits
/// acknowledged before the set took effect are covered too.
pub fn record_after_confirmation(
    input: &EngineInput,
    recorded: &SyncSet,
    applied: &SyncSet,
    primary_flush: Option<super::Lsn>,
) -> SyncSet {
    if !applied.is_synchronous() {
        return SyncSet::asynchronous();
    }
    let caught_up = primary_flush.is_some_and(|flush| {
        applied
            .members
            .iter()
            .filter_map(|m| input.instance(m))
            .filter(|i| input.is_fresh(i) && i.received_lsn.is_some_and(|lsn| lsn >= flush))
            .count()
            >= applied.k as usize
    });
    if caught_up {
        applied.clone()
    } else {
        widen(recorded, applied)
    }
}
