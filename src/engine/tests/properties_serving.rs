//! Property tests of a serving primary's settings and of switchovers, checked against the
//! oracles of `oracle.rs` like those of `properties.rs` (same coverage goals).

use proptest::prelude::*;

use super::super::*;
use super::generators::*;
use super::oracle::*;

const CASES: u32 = 4000;

/// A serving holder gets exactly the desired `synchronous_standby_names` (all other instances
/// for `Required`, the fresh replicas streaming from it for `Preferred`, k capped), and the
/// recorded quorum stays sound: it follows from what is applied and what is being applied, and
/// it narrows below the previous record only when k of its members already hold the primary's
/// flush position. Former primaries and diverged replicas rejoin, strays follow, a planned
/// switchover demotes the holder only for a ready target.
#[test]
fn a_serving_primary_gets_sound_sync_settings_and_followers() {
    let coverage = Coverage::new(
        "a_serving_primary_gets_sound_sync_settings_and_followers",
        &[
            ("synchronous standbys set", 0.20),
            ("applied set confirmed", 0.05),
            ("record narrowed on evidence", 0.01),
            ("record widened", 0.02),
            ("durability preferred", 0.10),
            ("applied set unknown", 0.20),
            ("former primary rejoins", 0.05),
            ("diverged replica rejoins", 0.03),
            ("stray follows", 0.10),
            ("switchover: demoted", 0.01),
            ("switchover: abandoned", 0.05),
            ("switchover: completed", 0.01),
        ],
    );
    run(CASES, arb_serving_world(), &coverage, |input| {
        let decision = decide(&input);
        let holder = &input.instances[0];
        let others: Vec<&InstanceObservation> = input.instances[1..].iter().collect();
        // The desired set, from the rules.
        let mut members: Vec<String> = match (input.spec.mode, input.spec.durability) {
            (ReplicationMode::Async, _) => Vec::new(),
            (ReplicationMode::Sync, DataDurability::Required) => {
                others.iter().map(|i| i.name.clone()).collect()
            }
            (ReplicationMode::Sync, DataDurability::Preferred) => {
                coverage.hit("durability preferred");
                others
                    .iter()
                    .filter(|i| running_replica(&input, i))
                    .filter(|i| i.upstream.as_deref() == Some(holder.name.as_str()))
                    .map(|i| i.name.clone())
                    .collect()
            }
        };
        members.sort();
        let k = input.spec.sync_replicas.min(members.len() as u32);
        let desired = if k == 0 {
            SyncSet::asynchronous()
        } else {
            SyncSet { k, members }
        };
        let applied = holder.applied_sync.as_ref().map(|a| {
            let mut m = a.members.clone();
            m.sort();
            m.dedup();
            let k = a.k.min(m.len() as u32);
            if k == 0 {
                SyncSet::asynchronous()
            } else {
                SyncSet { k, members: m }
            }
        });
        let sets: Vec<&SyncSet> = decision
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::SetSynchronousStandbys { primary, sync } => {
                    assert_eq!(primary, &holder.name);
                    Some(sync)
                }
                _ => None,
            })
            .collect();
        if applied.as_ref() == Some(&desired) {
            coverage.hit("applied set confirmed");
            prop_assert!(sets.is_empty(), "{:?}", sets);
        } else {
            coverage.hit("synchronous standbys set");
            prop_assert_eq!(sets, vec![&desired]);
        }
        let before = &input.memory.recorded_sync;
        let after = &decision.memory.recorded_sync;
        prop_assert!(
            implied_by(after, &desired),
            "{:?} vs desired {:?}",
            after,
            desired
        );
        match &applied {
            Some(applied) => {
                prop_assert!(
                    implied_by(after, applied),
                    "{:?} vs applied {:?}",
                    after,
                    applied
                )
            }
            None => coverage.hit("applied set unknown"),
        }
        if implied_by(after, before) {
            if after != before && claim(after).is_some() {
                coverage.hit("record widened");
            }
        } else {
            coverage.hit("record narrowed on evidence");
            let (k, members) = claim(after).expect("only a synchronous record can narrow");
            let flush = holder.flush_lsn.expect("generated");
            let holding = input
                .instances
                .iter()
                .filter(|i| members.contains(&i.name) && fresh(&input, i))
                .filter(|i| i.received_lsn >= Some(flush))
                .count();
            prop_assert!(
                holding >= k as usize,
                "narrowed to {:?} on {} holders",
                after,
                holding
            );
        }
        // Followers.
        let mut all_streaming = true;
        for other in &others {
            let rejoin = decision.actions.contains(&Action::Rejoin {
                instance: other.name.clone(),
                primary: holder.name.clone(),
            });
            let follow = decision.actions.contains(&Action::Follow {
                instance: other.name.clone(),
                primary: holder.name.clone(),
            });
            let streaming = other.upstream.as_deref() == Some(holder.name.as_str());
            let diverged = matches!((other.timeline, holder.timeline), (Some(r), Some(p)) if r > p);
            let (want_rejoin, want_follow) = if !fresh(&input, other) {
                (false, false)
            } else {
                match (other.role, other.postgres_up) {
                    (ObservedRole::Replica, true) if other.former_primary => {
                        coverage.hit("former primary rejoins");
                        (true, false)
                    }
                    (ObservedRole::Replica, true) if streaming => (false, false),
                    (ObservedRole::Replica, true) if diverged => {
                        coverage.hit("diverged replica rejoins");
                        (true, false)
                    }
                    (ObservedRole::Replica, true) => {
                        coverage.hit("stray follows");
                        (false, true)
                    }
                    (ObservedRole::Replica, false)
                    | (ObservedRole::Fenced, _)
                    | (ObservedRole::Stopped, _) => (true, false),
                    _ => (false, false),
                }
            };
            prop_assert_eq!(
                (rejoin, follow),
                (want_rejoin, want_follow),
                "{}",
                other.name
            );
            all_streaming &= fresh(&input, other)
                && other.role == ObservedRole::Replica
                && other.postgres_up
                && !other.former_primary
                && streaming;
        }
        // Switchover.
        let demoted = decision.actions.contains(&Action::Demote {
            instance: holder.name.clone(),
        });
        let mut phase = if all_streaming {
            Phase::Healthy
        } else {
            Phase::Degraded
        };
        match &input.memory.switchover {
            Some(plan) if plan.to == holder.name => {
                coverage.hit("switchover: completed");
                prop_assert!(!demoted);
                prop_assert!(decision.memory.switchover.is_none());
            }
            Some(plan) if plan.from == holder.name => {
                let ready = others.iter().find(|t| t.name == plan.to).is_some_and(|t| {
                    running_replica(&input, t)
                        && priority(&input, &t.name) > 0
                        && t.upstream.as_deref() == Some(holder.name.as_str())
                        && match (t.received_lsn, holder.flush_lsn) {
                            (Some(r), Some(f)) => {
                                f.0.saturating_sub(r.0) <= input.spec.max_switchover_lag_bytes
                            }
                            _ => false,
                        }
                        // In sync mode, the takeover after the demotion must be provable.
                        && (input.spec.mode != ReplicationMode::Sync
                            || quorum(&input, Some(&holder.name), false) != Quorum::Unreachable)
                });
                prop_assert_eq!(demoted, ready);
                if ready {
                    coverage.hit("switchover: demoted");
                    phase = Phase::SwitchingOver;
                    prop_assert_eq!(decision.memory.switchover.as_ref(), Some(plan));
                } else {
                    coverage.hit("switchover: abandoned");
                    prop_assert!(decision.memory.switchover.is_none());
                }
            }
            _ => prop_assert!(!demoted),
        }
        prop_assert_eq!(decision.status.phase, phase);
        prop_assert_eq!(
            decision.status.primary.as_deref(),
            Some(holder.name.as_str())
        );
        prop_assert!(acquired(&decision).is_empty() && promoted(&decision).is_empty());
        Ok(())
    });
}

/// A planned switchover: while the old primary serves, it is demoted only for a ready target;
/// once it released the lease, the lease goes to the target only when the target has received
/// the old primary's last flushed position (or none is known); before the lease duration has
/// passed nobody else gets it; after it, the usual failover rules apply.
#[test]
fn a_switchover_hands_over_only_to_a_caught_up_target() {
    let coverage = Coverage::new(
        "a_switchover_hands_over_only_to_a_caught_up_target",
        &[
            ("released: target takes over", 0.02),
            (
                "released: caught up but not provable under the quorum",
                0.01,
            ),
            ("released: waiting for the target", 0.05),
            ("released: abandoned for a failover", 0.03),
            ("serving: demoted", 0.01),
        ],
    );
    run(CASES, arb_switchover_world(), &coverage, |input| {
        let decision = decide(&input);
        let plan = input.memory.switchover.clone().expect("generated");
        let got = acquired(&decision);
        let expected = expected_acquire(&input);
        prop_assert_eq!(got.first().copied(), expected.as_deref());
        if input.lease.holder.is_some() {
            if decision
                .actions
                .iter()
                .any(|a| matches!(a, Action::Demote { .. }))
            {
                coverage.hit("serving: demoted");
            }
            return Ok(());
        }
        if !rogues(&input).is_empty() {
            return Ok(());
        }
        let reference = input
            .memory
            .last_primary
            .as_ref()
            .filter(|p| p.name == plan.from)
            .map(|p| p.flush_lsn);
        let waited = age_ms(input.now, plan.requested_at);
        let target = input
            .instance(&plan.to)
            .filter(|t| running_replica(&input, t));
        let caught_up = target
            .and_then(|t| t.received_lsn)
            .is_some_and(|received| reference.is_none_or(|r| received >= r));
        // ...and takes over only under the failover's rules (candidate, quorum in sync mode).
        let provable = target.is_some_and(|t| provable_takeover(&input, &plan.from, t));
        if caught_up && !provable && waited < effective_lease_ms(&input) {
            coverage.hit("released: caught up but not provable under the quorum");
            prop_assert!(got.is_empty(), "{:?}", got);
        }
        if caught_up && provable {
            coverage.hit("released: target takes over");
            prop_assert_eq!(got, vec![plan.to.as_str()]);
            prop_assert_eq!(decision.status.phase, Phase::SwitchingOver);
        } else if waited < effective_lease_ms(&input) {
            coverage.hit("released: waiting for the target");
            prop_assert!(got.is_empty(), "{:?}", got);
            prop_assert_eq!(decision.status.phase, Phase::SwitchingOver);
            prop_assert_eq!(decision.memory.switchover.as_ref(), Some(&plan));
        } else {
            // Abandoned: the usual failover rules (checked by `expected_acquire` above).
            coverage.hit("released: abandoned for a failover");
            prop_assert!(decision.memory.switchover.is_none());
        }
        Ok(())
    });
}
