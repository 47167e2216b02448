//! Manual fencing: `kubectl annotate pgrs NAME pgrs.dev/fence=pg-1[,pg-2...]`. Pure: which
//! instances are fenced, how the engine's input and decision change for them, what Events say.
//!
//! A fenced instance has postgres stopped by its agent (`POST /v1/fence`: immediate stop, and no
//! restart until an operator order), carries no role, read-pool or in-service label (so no
//! Service selects it), is never a failover or switchover candidate (priority 0 for the engine)
//! and receives no follow/rejoin order. Removing it from the annotation lets the engine rejoin
//! it as a replica of the current primary (rewind, else re-clone).
//!
//! Fencing the primary leaves the cluster without a writable primary: like CloudNativePG, the
//! operator does not fail over a fenced primary (fencing is a request to freeze an instance for
//! inspection, not a failure). When it is unfenced, its Lease has expired while it was down, so
//! the engine fails over to the most advanced replica as after any primary loss, and the old
//! primary rejoins as a replica (the agent only leaves fencing through follow or rejoin). A
//! planned switchover away from the primary before fencing it avoids the write outage.

use std::collections::BTreeSet;

use crate::engine::{self, Action, EngineInput, ObservedRole};

/// The annotation: instance names separated by commas (or whitespace).
pub const ANNOTATION_FENCE: &str = "pgrs.dev/fence";
/// Why the agent is fenced (its status shows it as `fence_reason`).
pub const FENCE_REASON: &str = "fenced on request (annotation pgrs.dev/fence)";

/// The fence request read from the annotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceRequest {
    /// Instances of this cluster to fence.
    pub fenced: BTreeSet<String>,
    /// Names in the annotation that are no instance of this cluster.
    pub unknown: Vec<String>,
}

impl FenceRequest {
    pub fn parse(annotation: Option<&str>, instances: &[String]) -> FenceRequest {
        let mut request = FenceRequest::default();
        for name in annotation
            .unwrap_or_default()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|n| !n.is_empty())
        {
            if instances.iter().any(|i| i == name) {
                request.fenced.insert(name.to_string());
            } else if !request.unknown.iter().any(|u| u == name) {
                request.unknown.push(name.to_string());
            }
        }
        request
    }

    pub fn is_fenced(&self, instance: &str) -> bool {
        self.fenced.contains(instance)
    }
}

/// The fenced instance that is (or, with a free Lease, last was) the primary, if any.
pub fn fenced_primary(input: &EngineInput, request: &FenceRequest) -> Option<String> {
    let primary = input
        .lease
        .holder
        .clone()
        .or_else(|| input.memory.last_primary.as_ref().map(|p| p.name.clone()))?;
    request.is_fenced(&primary).then_some(primary)
}

/// Fenced instances are never promoted; a fenced primary is not failed over.
pub fn restrict_input(input: &mut EngineInput, request: &FenceRequest) {
    for name in &request.fenced {
        input.spec.priorities.insert(name.clone(), 0);
    }
    if fenced_primary(input, request).is_some() {
        input.spec.failover_enabled = false;
    }
}

/// Drops the engine's orders for fenced instances, adds the fence orders, and makes the status
/// say that a fenced primary does not serve.
pub fn restrict_decision(
    decision: &mut engine::Decision,
    input: &EngineInput,
    request: &FenceRequest,
) {
    if request.fenced.is_empty() {
        return;
    }
    decision.actions.retain(|action| match action {
        Action::AcquireLease { holder, .. } => !request.is_fenced(holder),
        Action::Promote { instance }
        | Action::Demote { instance }
        | Action::Follow { instance, .. }
        | Action::Rejoin { instance, .. } => !request.is_fenced(instance),
        Action::SetSynchronousStandbys { primary, .. } => !request.is_fenced(primary),
        Action::Fence { .. } => true,
    });
    for instance in &input.instances {
        let ordered = decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::Fence { instance: i, .. } if *i == instance.name));
        if request.is_fenced(&instance.name)
            && instance.reachable
            && instance.role != ObservedRole::Fenced
            && !ordered
        {
            decision.actions.push(Action::Fence {
                instance: instance.name.clone(),
                reason: FENCE_REASON.to_string(),
            });
        }
    }
    if let Some(primary) = fenced_primary(input, request) {
        decision.status.primary = None;
        decision.status.failover = None;
        if decision.status.phase != engine::Phase::FailoverBlocked {
            decision.status.phase = engine::Phase::PrimaryUnavailable;
        }
        decision.status.message = format!(
            "the primary {primary} is fenced ({ANNOTATION_FENCE}): no instance accepts writes until it is unfenced; a fenced primary is not failed over"
        );
        decision
            .events
            .retain(|e| e.reason != engine::EventReason::FailoverRefused);
    }
}

/// Instances fenced now that were not before, and the other way round.
pub fn changes(before: &BTreeSet<String>, now: &BTreeSet<String>) -> (Vec<String>, Vec<String>) {
    (
        now.difference(before).cloned().collect(),
        before.difference(now).cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::{
        EngineSpec, InstanceObservation, LeaseView, Lsn, Memory, MonoTime, decide,
    };

    fn instance(name: &str, role: ObservedRole, lsn: u64) -> InstanceObservation {
        InstanceObservation {
            name: name.to_string(),
            reachable: true,
            postgres_up: role != ObservedRole::Fenced,
            role,
            timeline: Some(1),
            received_lsn: (role == ObservedRole::Replica).then_some(Lsn(lsn)),
            replayed_lsn: (role == ObservedRole::Replica).then_some(Lsn(lsn)),
            flush_lsn: (role == ObservedRole::Primary).then_some(Lsn(lsn)),
            sync_state: None,
            upstream: (role == ObservedRole::Replica).then(|| "pg-0".to_string()),
            applied_sync: None,
            last_report_at: Some(MonoTime::from_millis(100_000)),
            former_primary: false,
            last_seen_serving_at: None,
        }
    }

    fn input(holder: Option<&str>, instances: Vec<InstanceObservation>) -> EngineInput {
        EngineInput {
            now: MonoTime::from_millis(100_000),
            instances,
            lease: LeaseView {
                holder: holder.map(str::to_string),
                version: "5".to_string(),
                // Unchanged for long: expired.
                unchanged_since: MonoTime::from_millis(0),
                duration: Duration::from_secs(8),
            },
            spec: EngineSpec::default(),
            memory: Memory::default(),
        }
    }

    #[test]
    fn the_annotation_lists_instances_and_reports_unknown_names() {
        let instances = vec!["pg-0".to_string(), "pg-1".to_string()];
        let request = FenceRequest::parse(Some("pg-1, nope,pg-1"), &instances);
        assert_eq!(request.fenced, BTreeSet::from(["pg-1".to_string()]));
        assert_eq!(request.unknown, ["nope"]);
        assert!(FenceRequest::parse(None, &instances).fenced.is_empty());
    }

    #[test]
    fn a_fenced_replica_is_fenced_never_promoted_and_not_rejoined() {
        let request = FenceRequest::parse(Some("pg-1"), &["pg-1".to_string()]);
        // The primary is gone; pg-1 is the most advanced replica but fenced.
        let mut observed = input(
            Some("pg-0"),
            vec![
                InstanceObservation {
                    reachable: false,
                    ..instance("pg-0", ObservedRole::Unknown, 0)
                },
                instance("pg-1", ObservedRole::Replica, 200),
                instance("pg-2", ObservedRole::Replica, 100),
            ],
        );
        restrict_input(&mut observed, &request);
        let mut decision = decide(&observed);
        restrict_decision(&mut decision, &observed, &request);
        assert!(
            decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::AcquireLease { holder, .. } if holder == "pg-2"))
        );
        assert!(
            decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::Fence { instance, .. } if instance == "pg-1"))
        );
        // Once fenced, the engine's rejoin order for it is dropped.
        let mut serving = input(
            Some("pg-0"),
            vec![
                instance("pg-0", ObservedRole::Primary, 300),
                instance("pg-1", ObservedRole::Fenced, 0),
            ],
        );
        serving.lease.unchanged_since = MonoTime::from_millis(99_000);
        restrict_input(&mut serving, &request);
        let mut decision = decide(&serving);
        restrict_decision(&mut decision, &serving, &request);
        assert!(decision.actions.iter().all(|a| !matches!(
            a,
            Action::Rejoin { instance, .. } | Action::Follow { instance, .. } | Action::Fence { instance, .. }
                if instance == "pg-1"
        )));
        assert_eq!(decision.status.primary.as_deref(), Some("pg-0"));
    }

    #[test]
    fn a_fenced_primary_is_not_failed_over() {
        let request = FenceRequest::parse(Some("pg-0"), &["pg-0".to_string()]);
        let mut observed = input(
            Some("pg-0"),
            vec![
                instance("pg-0", ObservedRole::Fenced, 0),
                instance("pg-1", ObservedRole::Replica, 100),
            ],
        );
        restrict_input(&mut observed, &request);
        let mut decision = decide(&observed);
        restrict_decision(&mut decision, &observed, &request);
        assert!(
            decision
                .actions
                .iter()
                .all(|a| !matches!(a, Action::AcquireLease { .. } | Action::Promote { .. })),
            "{:?}",
            decision.actions
        );
        assert_eq!(decision.status.primary, None);
        assert!(decision.status.message.contains("fenced"));
        // Unfenced: the usual failover to the replica.
        let unfenced = FenceRequest::default();
        let mut observed = input(
            Some("pg-0"),
            vec![
                instance("pg-0", ObservedRole::Fenced, 0),
                instance("pg-1", ObservedRole::Replica, 100),
            ],
        );
        restrict_input(&mut observed, &unfenced);
        let decision = decide(&observed);
        assert!(
            decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::AcquireLease { holder, .. } if holder == "pg-1"))
        );
    }

    #[test]
    fn changes_name_newly_fenced_and_unfenced() {
        let before = BTreeSet::from(["a".to_string(), "b".to_string()]);
        let now = BTreeSet::from(["b".to_string(), "c".to_string()]);
        assert_eq!(
            changes(&before, &now),
            (vec!["c".to_string()], vec!["a".to_string()])
        );
    }
}
