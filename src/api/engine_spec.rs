//! The engine's view of a `PgReplicaSet`: the failover and replication parts of the spec, with
//! group settings expanded to one entry per instance. Pure.

use std::time::Duration;

use super::groups::resolve_groups;
use super::spec::{DataDurability, PgReplicaSetSpec, ReplicationMode};
use crate::engine;

/// Reports older than this many status polls are not used for decisions.
const STALE_AFTER_POLLS: u32 = 3;

/// The [`engine::EngineSpec`] of cluster `name`. Instances of a group with `failoverPriority: 0`
/// are never promoted; `syncEligible` is not an engine input yet (see `docs/architecture.md`).
pub fn engine_spec(name: &str, spec: &PgReplicaSetSpec) -> engine::EngineSpec {
    let defaults = engine::EngineSpec::default();
    let priorities = resolve_groups(name, spec)
        .iter()
        .flat_map(|group| {
            group
                .instance_names()
                .into_iter()
                .map(|instance| (instance, group.failover_priority))
        })
        .collect();
    let poll = Duration::from_secs(u64::from(spec.monitoring.status_interval_seconds));
    engine::EngineSpec {
        failover_enabled: spec.failover.enabled,
        mode: match spec.replication.mode {
            ReplicationMode::Async => engine::ReplicationMode::Async,
            ReplicationMode::Sync => engine::ReplicationMode::Sync,
        },
        sync_replicas: spec.replication.sync_replicas,
        durability: match spec.replication.data_durability {
            DataDurability::Required => engine::DataDurability::Required,
            DataDurability::Preferred => engine::DataDurability::Preferred,
        },
        max_failover_lag_bytes: spec.replication.max_failover_lag_bytes,
        max_switchover_lag_bytes: defaults.max_switchover_lag_bytes,
        priorities,
        allow_data_loss: spec.failover.allow_data_loss,
        lease_duration: seconds_to_duration(spec.failover.lease_duration_seconds),
        report_stale_after: defaults.report_stale_after.max(poll * STALE_AFTER_POLLS),
        failsafe: spec.failover.failsafe,
    }
}

/// A duration from the spec's (schema-bounded, positive) fractional seconds, at millisecond
/// precision.
pub fn seconds_to_duration(value: f64) -> Duration {
    Duration::from_millis((value.max(0.0) * 1000.0).round() as u64)
}
