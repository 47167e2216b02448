//! Generators for the property tests. Every rule's inputs vary: former primaries, applied and
//! recorded synchronous sets, both durabilities, switchover plans, flush ≠ received, spec and
//! recorded lease durations that differ, report ages around the staleness limit and lease ages
//! around both durations. WAL positions come from a small set so that ties are common.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::super::*;

pub const NOW_MS: u64 = 100_000;

pub fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("n{i}")).collect()
}

fn at_age(age_ms: u64) -> MonoTime {
    MonoTime::from_millis(NOW_MS.saturating_sub(age_ms))
}

/// WAL positions: mostly a few round values (ties), sometimes anything.
pub fn arb_lsn() -> impl Strategy<Value = u64> {
    prop_oneof![3 => (1u64..=5).prop_map(|x| x * 100), 1 => 0u64..600]
}

fn arb_role() -> impl Strategy<Value = ObservedRole> {
    prop_oneof![
        6 => Just(ObservedRole::Replica),
        2 => Just(ObservedRole::Primary),
        1 => Just(ObservedRole::Fenced),
        1 => Just(ObservedRole::Stopped),
        1 => Just(ObservedRole::Starting),
        1 => Just(ObservedRole::Unknown),
    ]
}

/// A report age in ms: mostly well within a 3–5 s staleness limit, sometimes around or past it.
fn arb_report_age() -> impl Strategy<Value = u64> {
    prop_oneof![6 => 0u64..2500, 1 => 2500u64..7000]
}

fn arb_sync_set(names: Vec<String>) -> impl Strategy<Value = SyncSet> {
    let n = names.len();
    (prop::sample::subsequence(names, 0..=n), 0u32..=3)
        .prop_map(|(members, k)| SyncSet { k, members }.normalized())
}

/// One instance; `role` lets a generator constrain it.
pub fn arb_instance(
    name: String,
    names: Vec<String>,
    role: BoxedStrategy<ObservedRole>,
) -> impl Strategy<Value = InstanceObservation> {
    let n = names.len();
    (
        (prop::bool::weighted(0.9), prop::bool::weighted(0.9), role),
        prop_oneof![8 => Just(Some(2u32)), 1 => Just(Some(1)), 1 => Just(Some(3)), 1 => Just(None)],
        prop::option::weighted(0.92, arb_lsn()),
        prop_oneof![Just(0u64), 0u64..150],
        prop::option::weighted(0.7, arb_lsn()),
        prop::option::weighted(0.85, 0..n),
        prop::option::weighted(0.6, arb_sync_set(names.clone())),
        arb_report_age(),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            move |(
                (reachable, postgres_up, role),
                timeline,
                received,
                replay_behind,
                flush,
                upstream,
                applied_sync,
                age,
                former_primary,
            )| InstanceObservation {
                name: name.clone(),
                reachable,
                postgres_up,
                role,
                timeline,
                received_lsn: received.map(Lsn),
                replayed_lsn: received.map(|r| Lsn(r.saturating_sub(replay_behind))),
                // Independent of the received position: flush ≠ received in most cases.
                flush_lsn: flush.map(Lsn),
                sync_state: None,
                upstream: upstream.map(|u| names[u].clone()),
                applied_sync,
                last_report_at: Some(at_age(age)),
                former_primary,
                last_seen_serving_at: None,
            },
        )
}

pub fn arb_spec(names: Vec<String>) -> impl Strategy<Value = EngineSpec> {
    let n = names.len();
    (
        (
            prop::bool::weighted(0.9),
            any::<bool>(),
            0u32..=3,
            any::<bool>(),
        ),
        prop::option::weighted(0.4, 0u64..300),
        prop_oneof![Just(0u64), Just(100), Just(16 * 1024 * 1024)],
        prop::collection::vec(prop_oneof![1 => Just(0u32), 6 => Just(1), 3 => Just(2)], n),
        prop::bool::weighted(0.25),
        prop_oneof![Just(3u64), Just(5), Just(8), Just(12)],
        prop_oneof![Just(3u64), Just(5)],
    )
        .prop_map(
            move |(
                (enabled, sync, sync_replicas, preferred),
                lag,
                sw_lag,
                prios,
                allow,
                lease,
                stale,
            )| {
                EngineSpec {
                    failover_enabled: enabled,
                    mode: if sync {
                        ReplicationMode::Sync
                    } else {
                        ReplicationMode::Async
                    },
                    sync_replicas,
                    durability: if preferred {
                        DataDurability::Preferred
                    } else {
                        DataDurability::Required
                    },
                    max_failover_lag_bytes: lag,
                    max_switchover_lag_bytes: sw_lag,
                    priorities: names.iter().cloned().zip(prios).collect::<BTreeMap<_, _>>(),
                    allow_data_loss: allow,
                    lease_duration: Duration::from_secs(lease),
                    report_stale_after: Duration::from_secs(stale),
                    failsafe: true,
                }
            },
        )
}

/// The lease record's duration and its age: around the spec's duration, around the record's,
/// or anywhere up to 30 s.
fn arb_lease_timing() -> impl Strategy<Value = (u64, u8, i64, u64)> {
    (
        prop_oneof![Just(3u64), Just(5), Just(8), Just(12), Just(20)],
        0u8..3,
        -1500i64..1500,
        0u64..30_000,
    )
}

fn lease(holder: Option<String>, spec: &EngineSpec, timing: (u64, u8, i64, u64)) -> LeaseView {
    let (record_s, anchor, offset, uniform) = timing;
    let anchor_ms = match anchor {
        0 => spec.lease_duration.as_millis() as i64,
        1 => (record_s * 1000) as i64,
        _ => uniform as i64,
    };
    let age = if anchor < 2 {
        anchor_ms + offset
    } else {
        anchor_ms
    };
    LeaseView {
        holder,
        version: "v1".to_string(),
        unchanged_since: at_age(age.max(0) as u64),
        duration: Duration::from_secs(record_s),
    }
}

fn arb_memory(names: Vec<String>) -> impl Strategy<Value = Memory> {
    let n = names.len();
    (
        prop::option::weighted(0.8, (0..n, arb_lsn(), prop::option::of(1u32..=3))),
        arb_sync_set(names.clone()),
        prop::option::weighted(0.25, (0..n, 0..n, 0u64..25_000)),
    )
        .prop_map(move |(last, recorded_sync, plan)| Memory {
            last_primary: last.map(|(p, flush, timeline)| PrimaryRecord {
                name: names[p].clone(),
                timeline,
                flush_lsn: Lsn(flush),
            }),
            recorded_sync,
            switchover: plan.map(|(from, to, age)| SwitchoverPlan {
                from: names[from].clone(),
                to: names[to].clone(),
                requested_at: at_age(age),
            }),
            sync_record_lost: false,
        })
}

/// Anything: every role anywhere, any holder, any memory.
pub fn arb_world() -> impl Strategy<Value = EngineInput> {
    (2usize..=5).prop_flat_map(|n| {
        let names = names(n);
        let instances: Vec<_> = names
            .iter()
            .map(|name| arb_instance(name.clone(), names.clone(), arb_role().boxed()))
            .collect();
        (
            instances,
            arb_spec(names.clone()),
            prop::option::weighted(0.75, 0..n),
            arb_lease_timing(),
            arb_memory(names.clone()),
        )
            .prop_map(
                move |(instances, spec, holder, timing, memory)| EngineInput {
                    now: MonoTime::from_millis(NOW_MS),
                    lease: lease(holder.map(|h| names[h].clone()), &spec, timing),
                    instances,
                    spec,
                    memory,
                },
            )
    })
}

/// A failover is due or nearly due: instance n0 (the lease holder, or the last primary of a
/// released lease) is gone, nobody else runs as primary, and the others are mostly running
/// replicas on one timeline with positions drawn from a few values, so that two or more
/// comparable candidates are the common case.
pub fn arb_failover_world() -> impl Strategy<Value = EngineInput> {
    (3usize..=5).prop_flat_map(|n| {
        let names = names(n);
        let gone = prop_oneof![
            Just(ObservedRole::Stopped),
            Just(ObservedRole::Fenced),
            Just(ObservedRole::Unknown),
            Just(ObservedRole::Replica),
        ]
        .boxed();
        let mut instances = vec![arb_instance(names[0].clone(), names.clone(), gone)];
        for name in &names[1..] {
            let role = prop_oneof![
                12 => Just(ObservedRole::Replica),
                1 => Just(ObservedRole::Starting),
                1 => Just(ObservedRole::Stopped),
            ]
            .boxed();
            instances.push(arb_instance(name.clone(), names.clone(), role));
        }
        (
            instances,
            arb_spec(names.clone()),
            prop::bool::weighted(0.7),
            any::<bool>(),
            arb_lease_timing(),
            arb_memory(names.clone()),
            (0u64..3, 0..n),
            prop::collection::vec(
                (
                    0u64..3,
                    0u64..3,
                    prop::bool::weighted(0.8),
                    prop::bool::weighted(0.5),
                ),
                n,
            ),
        )
            .prop_map(
                move |(
                    mut instances,
                    spec,
                    held,
                    n0_reachable,
                    timing,
                    mut memory,
                    (lp, lp_at),
                    positions,
                )| {
                    // Few distinct positions: ties on received and on replayed are common.
                    for (i, (received, behind, tied, healthy)) in
                        instances.iter_mut().zip(positions).skip(1)
                    {
                        // Half of them plainly healthy: reachable, running, fresh, timeline 2.
                        if healthy {
                            i.reachable = true;
                            i.postgres_up = true;
                            i.last_report_at = Some(at_age(200));
                            i.timeline = Some(2);
                        }
                        if tied && i.received_lsn.is_some() {
                            let received = 200 + received * 100;
                            i.received_lsn = Some(Lsn(received));
                            i.replayed_lsn = Some(Lsn(received - behind * 50));
                        }
                    }
                    // n0 is not serving: unreachable, or reachable but neither a running
                    // replica (that would be promoted as holder) nor a primary.
                    instances[0].reachable = n0_reachable && held;
                    if instances[0].role == ObservedRole::Replica {
                        instances[0].postgres_up = !held;
                    }
                    let last = if held { 0 } else { lp_at };
                    memory.last_primary = (lp > 0).then(|| PrimaryRecord {
                        name: names[last].clone(),
                        timeline: Some(2),
                        flush_lsn: Lsn(200 + lp * 100),
                    });
                    memory.switchover = None;
                    let holder = held.then(|| names[0].clone());
                    EngineInput {
                        now: MonoTime::from_millis(NOW_MS),
                        lease: lease(holder, &spec, timing),
                        instances,
                        spec,
                        memory,
                    }
                },
            )
    })
}

/// The lease holder n0 serves as primary; the others are anything. The recorded quorum covers
/// what n0 applies (the engine's invariant on its input), or n0's applied set is unknown.
pub fn arb_serving_world() -> impl Strategy<Value = EngineInput> {
    (2usize..=5).prop_flat_map(|n| {
        let names = names(n);
        let mut instances = vec![arb_instance(
            names[0].clone(),
            names.clone(),
            Just(ObservedRole::Primary).boxed(),
        )];
        for name in &names[1..] {
            instances.push(arb_instance(
                name.clone(),
                names.clone(),
                arb_role().boxed(),
            ));
        }
        (
            instances,
            arb_spec(names.clone()),
            arb_lease_timing(),
            arb_memory(names.clone()),
            (
                prop::sample::subsequence(names.clone(), 0..=n),
                0u32..=2,
                prop::bool::weighted(0.2),
            ),
            prop::option::weighted(0.5, (1..n, 0u64..25_000)),
            (prop::bool::weighted(0.3), any::<bool>()),
        )
            .prop_map(
                move |(
                    mut instances,
                    spec,
                    timing,
                    mut memory,
                    (extra, lower, reset),
                    plan,
                    (confirmed, low_flush),
                )| {
                    let others: Vec<String> = names[1..].to_vec();
                    let holder = &mut instances[0];
                    // Sometimes it already applies what `Required` durability asks for.
                    if confirmed
                        && spec.mode == ReplicationMode::Sync
                        && spec.durability == DataDurability::Required
                    {
                        holder.applied_sync = Some(
                            SyncSet {
                                k: spec.sync_replicas,
                                members: others,
                            }
                            .normalized(),
                        );
                    }
                    if low_flush {
                        holder.flush_lsn = Some(Lsn(100));
                    }
                    holder.reachable = true;
                    holder.postgres_up = true;
                    holder.last_report_at = Some(at_age(500));
                    holder.flush_lsn = Some(holder.flush_lsn.unwrap_or(Lsn(300)));
                    // Recorded ⊇ applied, k(recorded) ≤ k(applied); asynchronous when applied is.
                    if let Some(applied) = holder.applied_sync.clone() {
                        memory.recorded_sync = if applied.is_synchronous() && !reset {
                            let mut members = applied.members.clone();
                            members.extend(extra);
                            SyncSet {
                                k: applied.k.saturating_sub(lower).max(1),
                                members,
                            }
                            .normalized()
                        } else {
                            SyncSet::asynchronous()
                        };
                    }
                    memory.switchover = plan.map(|(to, age)| SwitchoverPlan {
                        from: if age % 7 == 0 {
                            names[to].clone()
                        } else {
                            names[0].clone()
                        },
                        to: names[if age % 11 == 0 { 0 } else { to }].clone(),
                        requested_at: at_age(age),
                    });
                    EngineInput {
                        now: MonoTime::from_millis(NOW_MS),
                        lease: lease(Some(names[0].clone()), &spec, timing),
                        instances,
                        spec,
                        memory,
                    }
                },
            )
    })
}

/// A planned switchover from n0 to another instance: n0 still serves and holds the lease, or
/// it shut down and released the lease and the target is catching up.
pub fn arb_switchover_world() -> impl Strategy<Value = EngineInput> {
    (
        arb_serving_world(),
        any::<bool>(),
        arb_lsn(),
        prop::bool::weighted(0.7),
    )
        .prop_map(|(mut input, released, reference, recorded)| {
            let names: Vec<String> = input.instances.iter().map(|i| i.name.clone()).collect();
            let to = 1 + (reference as usize) % (names.len() - 1);
            let plan = input.memory.switchover.get_or_insert(SwitchoverPlan {
                from: names[0].clone(),
                to: names[to].clone(),
                requested_at: at_age(reference * 20),
            });
            plan.from = names[0].clone();
            if released {
                input.lease.holder = None;
                input.instances[0].role = ObservedRole::Stopped;
                input.instances[0].postgres_up = false;
                input.memory.last_primary = recorded.then(|| PrimaryRecord {
                    name: names[0].clone(),
                    timeline: input.instances[0].timeline,
                    flush_lsn: Lsn(reference),
                });
            }
            input
        })
}
