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
#[path = "rollout_tests.rs"]
mod tests;
