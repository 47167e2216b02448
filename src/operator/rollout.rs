//! Pure planning of parameter rollouts and of scaling. No IO, no clock: the controller feeds in
//! what the agents reported and carries out the step returned here.
//!
//! Parameters: every agent gets the current set (it writes and reloads them; most parameters
//! take effect at once). Those that report `pending_restart` for the current set are restarted
//! one at a time, replicas first, each waiting until the previous one streams again; then the
//! primary role moves to a healthy replica (a switchover, whose rejoin restarts the former
//! primary) — or, with no replica to switch to, the primary restarts in place.
//!
//! Lowering a setting a hot standby needs at least as high as its primary's
//! ([`STANDBY_MINIMUMS`]) goes the other way: the primary restarts first, in place (a short
//! write outage), then the standbys; otherwise a restarted standby would pause its recovery.
//!
//! Scaling down removes the highest ordinals (the StatefulSet does). When the primary is among
//! them, its StatefulSet keeps it until a switchover has moved the primary role to an instance
//! that stays.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::ResolvedGroup;
use crate::protocol::api::Role;

/// One instance as the rollout sees it (from its agent's last report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceView {
    pub name: String,
    pub role: Role,
    /// A replica whose WAL receiver streams.
    pub streaming: bool,
    /// Digest of the parameters the agent applied; `None`: the agent manages no parameters.
    pub parameters_hash: Option<String>,
    /// `None` when unknown (postgres down).
    pub pending_restart: Option<Vec<String>>,
}

impl InstanceView {
    fn current(&self, desired: &str) -> bool {
        self.parameters_hash.as_deref() == Some(desired)
    }

    fn needs_restart(&self, desired: &str) -> bool {
        self.current(desired)
            && self
                .pending_restart
                .as_ref()
                .is_some_and(|pending| !pending.is_empty())
    }

    fn settled(&self, desired: &str) -> bool {
        self.current(desired)
            && self
                .pending_restart
                .as_ref()
                .is_some_and(|pending| pending.is_empty())
    }

    fn healthy_replica(&self) -> bool {
        self.role == Role::Replica && self.streaming
    }
}

/// What the rollout sees this round.
#[derive(Debug, Clone)]
pub struct RolloutInput<'a> {
    /// `parameters_hash` of the spec's parameters.
    pub desired_hash: &'a str,
    /// The serving primary (Lease holder reporting as primary), if any.
    pub primary: Option<&'a str>,
    /// Every desired instance that answered; missing ones are not (yet) reachable.
    pub instances: &'a [InstanceView],
    /// Number of desired instances (answered or not).
    pub desired_instances: usize,
    /// The instance restarted by an earlier round, until it is back.
    pub restarting: Option<&'a str>,
    /// A switchover or failover is under way (the engine's memory or phase).
    pub role_change_in_progress: bool,
    /// Restart the primary first, in place (see [`lowered_minimums`]).
    pub primary_first: bool,
}

/// Settings a hot standby needs at least as high as its primary's: PostgreSQL pauses a
/// standby's recovery when one is lower (`max_wal_senders` is the agent's own).
pub const STANDBY_MINIMUMS: &[&str] = &[
    "max_connections",
    "max_locks_per_transaction",
    "max_prepared_transactions",
    "max_worker_processes",
];

/// Those of [`STANDBY_MINIMUMS`] that `desired` (the spec) sets below the value the primary
/// runs with (`running`, its pending-restart settings).
pub fn lowered_minimums(
    running: &BTreeMap<String, String>,
    desired: &BTreeMap<String, String>,
) -> Vec<String> {
    STANDBY_MINIMUMS
        .iter()
        .filter(|name| {
            let value = |map: &BTreeMap<String, String>| {
                map.get(**name).and_then(|v| v.trim().parse::<i64>().ok())
            };
            matches!((value(running), value(desired)), (Some(now), Some(next)) if next < now)
        })
        .map(|name| name.to_string())
        .collect()
}

/// The one step of this round (pushes of the parameters come on top, see [`RolloutPlan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutStep {
    /// Every instance runs the current parameters.
    Applied,
    /// Nothing to start now; the reason is for the condition.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// Restart this instance (`primary`: in place, there is no replica to switch to).
    Restart { instance: String, primary: bool },
    /// Move the primary role off `from` so that it can restart (as a rejoining replica).
    Switchover {
        from: String,
        candidates: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutPlan {
    /// Agents whose applied parameters differ from the spec's: send them the current set.
    pub push: Vec<String>,
    /// The instance of `restarting` is back (streaming again, or serving as primary) with
    /// nothing pending.
    pub restart_finished: Option<String>,
    pub step: RolloutStep,
}

/// Plans this round of the parameter rollout.
pub fn plan(input: &RolloutInput<'_>) -> RolloutPlan {
    let desired = input.desired_hash;
    let push: Vec<String> = input
        .instances
        .iter()
        .filter(|i| i.parameters_hash.is_some() && !i.current(desired))
        .map(|i| i.name.clone())
        .collect();
    let find = |name: &str| input.instances.iter().find(|i| i.name == name);
    let mut restart_finished = None;
    if let Some(restarting) = input.restarting {
        let back = find(restarting).is_some_and(|i| {
            i.settled(desired)
                && (i.healthy_replica()
                    || (i.role == Role::Primary && input.primary == Some(&i.name)))
        });
        if !back {
            return RolloutPlan {
                push,
                restart_finished: None,
                step: RolloutStep::Wait {
                    reason: "Restarting",
                    message: format!("waiting for {restarting} to be back after its restart"),
                },
            };
        }
        restart_finished = Some(restarting.to_string());
    }
    let wait = |reason: &'static str, message: String| RolloutPlan {
        push: push.clone(),
        restart_finished: restart_finished.clone(),
        step: RolloutStep::Wait { reason, message },
    };
    let managed: Vec<&InstanceView> = input
        .instances
        .iter()
        .filter(|i| i.parameters_hash.is_some())
        .collect();
    if !push.is_empty() {
        return wait(
            "Reloading",
            format!("sending the parameters to {}", push.join(", ")),
        );
    }
    let pending: Vec<&InstanceView> = managed
        .iter()
        .copied()
        .filter(|i| i.needs_restart(desired))
        .collect();
    if pending.is_empty() {
        let unknown: Vec<&str> = managed
            .iter()
            .filter(|i| i.pending_restart.is_none())
            .map(|i| i.name.as_str())
            .collect();
        if !unknown.is_empty() {
            return wait(
                "Unknown",
                format!("pending restarts unknown on {}", unknown.join(", ")),
            );
        }
        return RolloutPlan {
            push,
            restart_finished,
            step: RolloutStep::Applied,
        };
    }
    let describe = |i: &InstanceView| {
        format!(
            "{} ({})",
            i.name,
            i.pending_restart.clone().unwrap_or_default().join(", ")
        )
    };
    let waiting_for: Vec<String> = pending.iter().map(|i| describe(i)).collect();
    // Restarts only from a healthy cluster: every desired instance answered, a primary
    // serves, every other instance streams, and no role change is under way.
    let all_streaming = input.instances.len() == input.desired_instances
        && input
            .instances
            .iter()
            .all(|i| Some(i.name.as_str()) == input.primary || i.healthy_replica());
    if input.primary.is_none() || input.role_change_in_progress || !all_streaming {
        return wait(
            "WaitingForHealthy",
            format!(
                "restart pending on {}; waiting for a serving primary and every standby streaming",
                waiting_for.join(", ")
            ),
        );
    }
    if input.primary_first
        && let Some(primary) = input.primary
        && pending.iter().any(|i| i.name == primary)
    {
        return RolloutPlan {
            push,
            restart_finished,
            step: RolloutStep::Restart {
                instance: primary.to_string(),
                primary: true,
            },
        };
    }
    if let Some(replica) = pending
        .iter()
        .find(|i| Some(i.name.as_str()) != input.primary)
    {
        return RolloutPlan {
            push,
            restart_finished,
            step: RolloutStep::Restart {
                instance: replica.name.clone(),
                primary: false,
            },
        };
    }
    // Only the primary is left.
    let Some(primary) = input.primary else {
        return wait("WaitingForHealthy", "no serving primary".to_string());
    };
    let replicas: Vec<&InstanceView> = input
        .instances
        .iter()
        .filter(|i| i.name != primary)
        .collect();
    if input.desired_instances <= 1 && replicas.is_empty() {
        return RolloutPlan {
            push,
            restart_finished,
            step: RolloutStep::Restart {
                instance: primary.to_string(),
                primary: true,
            },
        };
    }
    let candidates: Vec<String> = replicas
        .iter()
        .filter(|i| i.healthy_replica() && i.settled(desired))
        .map(|i| i.name.clone())
        .collect();
    if candidates.is_empty() {
        return wait(
            "WaitingForHealthy",
            format!("restart pending on the primary {primary}; no standby ready to take over"),
        );
    }
    RolloutPlan {
        push,
        restart_finished,
        step: RolloutStep::Switchover {
            from: primary.to_string(),
            candidates,
        },
    }
}

/// `ParametersApplied` condition of a step: (status, reason, message).
pub fn condition(step: &RolloutStep) -> (bool, &'static str, String) {
    match step {
        RolloutStep::Applied => (
            true,
            "Applied",
            "every instance runs the current parameters".to_string(),
        ),
        RolloutStep::Wait { reason, message } => (false, reason, message.clone()),
        RolloutStep::Restart { instance, primary } => (
            false,
            if *primary {
                "RestartingPrimary"
            } else {
                "RestartingReplica"
            },
            format!("restarting {instance} for parameters that need a server restart"),
        ),
        RolloutStep::Switchover { from, .. } => (
            false,
            "SwitchingOver",
            format!("switching the primary role off {from} so that it can restart"),
        ),
    }
}

/// Ordinal of `instance` in `group` (`<statefulset>-<ordinal>`).
fn ordinal(group: &ResolvedGroup, instance: &str) -> Option<u32> {
    instance
        .strip_prefix(group.statefulset.as_str())?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// The groups as their StatefulSets must run now: the spec's counts, except that a group
/// keeps every ordinal up to the primary (`holder`) while it is above the spec's count, so a
/// scale-down never deletes the primary's pod before a switchover.
pub fn retained_groups(groups: &[ResolvedGroup], holder: Option<&str>) -> Vec<ResolvedGroup> {
    groups
        .iter()
        .map(|group| {
            let mut group = group.clone();
            if let Some(ordinal) = holder.and_then(|h| ordinal(&group, h))
                && ordinal >= group.replicas
            {
                group.replicas = ordinal + 1;
            }
            group
        })
        .collect()
}

/// Instances a scale-down is removing but still runs (the primary and the ordinals below it).
pub fn retained_extra(spec: &[ResolvedGroup], retained: &[ResolvedGroup]) -> Vec<String> {
    let wanted: BTreeSet<String> = spec.iter().flat_map(|g| g.instance_names()).collect();
    retained
        .iter()
        .flat_map(|g| g.instance_names())
        .filter(|name| !wanted.contains(name))
        .collect()
}

/// Switchover targets when the primary must leave: healthy replicas that stay, eligible for
/// promotion, by name.
pub fn scale_down_candidates(spec: &[ResolvedGroup], instances: &[InstanceView]) -> Vec<String> {
    let eligible: BTreeSet<String> = spec
        .iter()
        .filter(|g| g.failover_priority > 0)
        .flat_map(|g| g.instance_names())
        .collect();
    instances
        .iter()
        .filter(|i| i.healthy_replica() && eligible.contains(&i.name))
        .map(|i| i.name.clone())
        .collect()
}

/// Instances that left the cluster since `previous` (their replication slots are dropped).
pub fn removed(previous: &[String], current: &[String]) -> Vec<String> {
    previous
        .iter()
        .filter(|name| !current.contains(name))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "new";

    fn view(name: &str, role: Role, hash: &str, pending: &[&str]) -> InstanceView {
        InstanceView {
            name: name.to_string(),
            role,
            streaming: role == Role::Replica,
            parameters_hash: Some(hash.to_string()),
            pending_restart: Some(pending.iter().map(|p| p.to_string()).collect()),
        }
    }

    fn input<'a>(instances: &'a [InstanceView], primary: &'a str) -> RolloutInput<'a> {
        RolloutInput {
            desired_hash: NEW,
            primary: Some(primary),
            instances,
            desired_instances: instances.len(),
            restarting: None,
            role_change_in_progress: false,
            primary_first: false,
        }
    }

    #[test]
    fn agents_with_other_parameters_get_them_first() {
        let instances = [
            view("pg-0", Role::Primary, "old", &[]),
            view("pg-1", Role::Replica, NEW, &[]),
            view("pg-2", Role::Replica, "old", &[]),
        ];
        let plan = plan(&input(&instances, "pg-0"));
        assert_eq!(plan.push, ["pg-0", "pg-2"]);
        assert!(matches!(
            plan.step,
            RolloutStep::Wait {
                reason: "Reloading",
                ..
            }
        ));
    }

    #[test]
    fn reload_only_changes_are_applied_without_restarts() {
        let instances = [
            view("pg-0", Role::Primary, NEW, &[]),
            view("pg-1", Role::Replica, NEW, &[]),
        ];
        let plan = plan(&input(&instances, "pg-0"));
        assert!(plan.push.is_empty());
        assert_eq!(plan.step, RolloutStep::Applied);
        assert!(condition(&plan.step).0);
    }

    #[test]
    fn replicas_restart_first_one_at_a_time() {
        let instances = [
            view("pg-0", Role::Primary, NEW, &["max_connections"]),
            view("pg-1", Role::Replica, NEW, &["max_connections"]),
            view("pg-2", Role::Replica, NEW, &["max_connections"]),
        ];
        let first = plan(&input(&instances, "pg-0"));
        assert_eq!(
            first.step,
            RolloutStep::Restart {
                instance: "pg-1".into(),
                primary: false
            }
        );
        // While pg-1 restarts (not streaming yet), nothing else starts.
        let mut during = instances.clone();
        during[1].streaming = false;
        during[1].role = Role::Starting;
        during[1].pending_restart = None;
        let mut waiting = input(&during, "pg-0");
        waiting.restarting = Some("pg-1");
        let second = plan(&waiting);
        assert!(matches!(
            second.step,
            RolloutStep::Wait {
                reason: "Restarting",
                ..
            }
        ));
        // Back and streaming: done with pg-1, pg-2 is next.
        let mut after = instances.clone();
        after[1].pending_restart = Some(Vec::new());
        let mut next = input(&after, "pg-0");
        next.restarting = Some("pg-1");
        let third = plan(&next);
        assert_eq!(third.restart_finished.as_deref(), Some("pg-1"));
        assert_eq!(
            third.step,
            RolloutStep::Restart {
                instance: "pg-2".into(),
                primary: false
            }
        );
    }

    #[test]
    fn the_primary_is_switched_over_once_the_replicas_are_done() {
        let instances = [
            view("pg-0", Role::Primary, NEW, &["shared_buffers"]),
            view("pg-1", Role::Replica, NEW, &[]),
            view("pg-2", Role::Replica, NEW, &[]),
        ];
        let plan = plan(&input(&instances, "pg-0"));
        assert_eq!(
            plan.step,
            RolloutStep::Switchover {
                from: "pg-0".into(),
                candidates: vec!["pg-1".into(), "pg-2".into()]
            }
        );
    }

    #[test]
    fn lowering_a_standby_minimum_restarts_the_primary_first() {
        let running = BTreeMap::from([
            ("max_connections".to_string(), "100".to_string()),
            ("shared_buffers".to_string(), "16384".to_string()),
        ]);
        let lower = BTreeMap::from([("max_connections".to_string(), "50".to_string())]);
        let higher = BTreeMap::from([("max_connections".to_string(), "200".to_string())]);
        assert_eq!(lowered_minimums(&running, &lower), ["max_connections"]);
        assert!(lowered_minimums(&running, &higher).is_empty());
        assert!(lowered_minimums(&BTreeMap::new(), &lower).is_empty());
        let instances = [
            view("pg-0", Role::Primary, NEW, &["max_connections"]),
            view("pg-1", Role::Replica, NEW, &["max_connections"]),
        ];
        let mut first = input(&instances, "pg-0");
        first.primary_first = true;
        assert_eq!(
            plan(&first).step,
            RolloutStep::Restart {
                instance: "pg-0".into(),
                primary: true
            }
        );
        // Once the primary runs the lower value, the standbys follow as usual.
        let mut after = instances.clone();
        after[0].pending_restart = Some(Vec::new());
        let mut next = input(&after, "pg-0");
        next.primary_first = false;
        assert_eq!(
            plan(&next).step,
            RolloutStep::Restart {
                instance: "pg-1".into(),
                primary: false
            }
        );
    }

    #[test]
    fn a_lone_primary_restarts_in_place() {
        let instances = [view("pg-0", Role::Primary, NEW, &["shared_buffers"])];
        let plan = plan(&input(&instances, "pg-0"));
        assert_eq!(
            plan.step,
            RolloutStep::Restart {
                instance: "pg-0".into(),
                primary: true
            }
        );
    }

    #[test]
    fn nothing_restarts_while_the_cluster_is_not_healthy() {
        let mut instances = vec![
            view("pg-0", Role::Primary, NEW, &["max_connections"]),
            view("pg-1", Role::Replica, NEW, &["max_connections"]),
            view("pg-2", Role::Replica, NEW, &[]),
        ];
        instances[2].streaming = false;
        let plan_not_streaming = plan(&input(&instances, "pg-0"));
        assert!(matches!(
            plan_not_streaming.step,
            RolloutStep::Wait {
                reason: "WaitingForHealthy",
                ..
            }
        ));
        instances[2].streaming = true;
        let mut missing = input(&instances, "pg-0");
        missing.desired_instances = 4;
        assert!(matches!(plan(&missing).step, RolloutStep::Wait { .. }));
        let mut changing = input(&instances, "pg-0");
        changing.role_change_in_progress = true;
        assert!(matches!(plan(&changing).step, RolloutStep::Wait { .. }));
    }

    #[test]
    fn the_primary_waits_when_no_replica_is_ready_to_take_over() {
        let instances = [
            view("pg-0", Role::Primary, NEW, &["shared_buffers"]),
            view("pg-1", Role::Replica, NEW, &[]),
        ];
        let mut lagging = instances.clone();
        lagging[1].pending_restart = None;
        let plan = plan(&input(&lagging, "pg-0"));
        assert!(matches!(plan.step, RolloutStep::Wait { .. }), "{plan:?}");
    }

    #[test]
    fn agents_without_a_parameters_file_are_left_alone() {
        let mut instances = vec![view("pg-0", Role::Primary, NEW, &[])];
        instances[0].parameters_hash = None;
        let plan = plan(&input(&instances, "pg-0"));
        assert!(plan.push.is_empty());
        assert_eq!(plan.step, RolloutStep::Applied);
    }

    fn group(statefulset: &str, replicas: u32) -> ResolvedGroup {
        ResolvedGroup {
            name: "default".into(),
            statefulset: statefulset.into(),
            replicas,
            failover_priority: 1,
            sync_eligible: true,
            node_selector: Default::default(),
            affinity: None,
            tolerations: Vec::new(),
        }
    }

    #[test]
    fn a_scale_down_keeps_the_primary_until_it_moved() {
        let spec = [group("pg", 2)];
        let kept = retained_groups(&spec, Some("pg-3"));
        assert_eq!(kept[0].replicas, 4);
        assert_eq!(retained_extra(&spec, &kept), ["pg-2", "pg-3"]);
        assert_eq!(retained_groups(&spec, Some("pg-1"))[0].replicas, 2);
        assert_eq!(retained_groups(&spec, None)[0].replicas, 2);
        // A name of another StatefulSet with the same prefix is not an ordinal of this one.
        assert_eq!(retained_groups(&spec, Some("pg-east-3"))[0].replicas, 2);
        let instances = [
            view("pg-0", Role::Replica, NEW, &[]),
            view("pg-1", Role::Replica, NEW, &[]),
            view("pg-2", Role::Replica, NEW, &[]),
            view("pg-3", Role::Primary, NEW, &[]),
        ];
        assert_eq!(scale_down_candidates(&spec, &instances), ["pg-0", "pg-1"]);
    }

    #[test]
    fn removed_instances_are_those_no_longer_listed() {
        let previous = ["pg-0".to_string(), "pg-1".into(), "pg-2".into()];
        assert_eq!(removed(&previous, &["pg-0".into()]), ["pg-1", "pg-2"]);
        assert!(removed(&previous, &previous).is_empty());
    }
}
