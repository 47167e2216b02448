use std::time::Duration;

use proptest::prelude::*;

use super::*;

const SECOND: u64 = 1000;

fn replica(name: &str, upstream: &str, received: u64, replayed: u64) -> InstanceObservation {
    InstanceObservation {
        name: name.to_string(),
        reachable: true,
        postgres_up: true,
        role: ObservedRole::Replica,
        timeline: Some(1),
        received_lsn: Some(Lsn(received)),
        replayed_lsn: Some(Lsn(replayed)),
        flush_lsn: None,
        sync_state: None,
        upstream: Some(upstream.to_string()),
        applied_sync: None,
        last_report_at: Some(MonoTime::from_millis(100 * SECOND)),
        former_primary: false,
    }
}

fn primary(name: &str, flush: u64) -> InstanceObservation {
    InstanceObservation {
        name: name.to_string(),
        reachable: true,
        postgres_up: true,
        role: ObservedRole::Primary,
        timeline: Some(1),
        received_lsn: None,
        replayed_lsn: None,
        flush_lsn: Some(Lsn(flush)),
        sync_state: None,
        upstream: None,
        applied_sync: Some(SyncSet::asynchronous()),
        last_report_at: Some(MonoTime::from_millis(100 * SECOND)),
        former_primary: false,
    }
}

fn unreachable(name: &str) -> InstanceObservation {
    InstanceObservation {
        reachable: false,
        postgres_up: false,
        role: ObservedRole::Unknown,
        flush_lsn: None,
        last_report_at: Some(MonoTime::from_millis(90 * SECOND)),
        ..primary(name, 0)
    }
}

/// now = 100 s; the lease (held by `holder`) unchanged since `unchanged_since_s`.
fn cluster(
    instances: Vec<InstanceObservation>,
    holder: Option<&str>,
    unchanged_since_s: u64,
) -> EngineInput {
    EngineInput {
        now: MonoTime::from_millis(100 * SECOND),
        instances,
        lease: LeaseView {
            holder: holder.map(str::to_string),
            version: "v7".to_string(),
            unchanged_since: MonoTime::from_millis(unchanged_since_s * SECOND),
            duration: Duration::from_secs(8),
        },
        spec: EngineSpec::default(),
        memory: Memory {
            last_primary: Some(PrimaryRecord {
                name: "a".to_string(),
                timeline: Some(1),
                flush_lsn: Lsn(1000),
            }),
            ..Memory::default()
        },
    }
}

fn acquired(decision: &Decision) -> Option<&str> {
    decision.actions.iter().find_map(|a| match a {
        Action::AcquireLease { holder, .. } => Some(holder.as_str()),
        _ => None,
    })
}

fn promoted(decision: &Decision) -> Option<&str> {
    decision.actions.iter().find_map(|a| match a {
        Action::Promote { instance } => Some(instance.as_str()),
        _ => None,
    })
}

#[test]
fn a_serving_primary_keeps_the_lease_and_nothing_is_promoted() {
    let input = cluster(
        vec![
            primary("a", 1000),
            replica("b", "a", 1000, 1000),
            replica("c", "a", 990, 980),
        ],
        Some("a"),
        99,
    );
    let decision = decide(&input);
    assert_eq!(
        decision.status.phase,
        Phase::Healthy,
        "{:?}",
        decision.status
    );
    assert_eq!(decision.status.primary.as_deref(), Some("a"));
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);
}

#[test]
fn an_unreachable_holder_is_not_replaced_before_its_lease_expires() {
    // Unchanged since 93 s, now 100 s: 7 of 8 seconds.
    let input = cluster(
        vec![
            unreachable("a"),
            replica("b", "a", 1000, 1000),
            replica("c", "a", 990, 980),
        ],
        Some("a"),
        93,
    );
    let decision = decide(&input);
    assert_eq!(decision.status.phase, Phase::PrimaryUnavailable);
    assert_eq!(
        decision.status.lease_expires_in,
        Some(Duration::from_secs(1))
    );
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);
}

#[test]
fn an_expired_lease_is_taken_over_for_the_most_advanced_replica_with_its_version() {
    let input = cluster(
        vec![
            unreachable("a"),
            replica("b", "a", 990, 990),
            replica("c", "a", 1000, 900),
        ],
        Some("a"),
        92,
    );
    let decision = decide(&input);
    assert_eq!(
        decision.actions,
        vec![Action::AcquireLease {
            holder: "c".to_string(),
            expected_version: "v7".to_string()
        }]
    );
    assert_eq!(decision.status.phase, Phase::FailingOver);
    let failover = decision.status.failover.as_ref().expect("failover choice");
    assert_eq!(failover.lsn_gap_bytes, Some(0));
    assert!(!failover.data_loss_allowed);
}

#[test]
fn ties_are_broken_by_replay_then_priority_then_name() {
    let mut input = cluster(
        vec![
            unreachable("a"),
            replica("d", "a", 1000, 900),
            replica("c", "a", 1000, 900),
            replica("b", "a", 1000, 800),
        ],
        Some("a"),
        0,
    );
    assert_eq!(
        acquired(&decide(&input)),
        Some("c"),
        "name breaks the last tie"
    );
    input.spec.priorities.insert("d".to_string(), 5);
    assert_eq!(acquired(&decide(&input)), Some("d"), "priority before name");
    input.spec.priorities.insert("d".to_string(), 0);
    input.spec.priorities.insert("c".to_string(), 0);
    assert_eq!(
        acquired(&decide(&input)),
        Some("b"),
        "priority 0 is never promoted"
    );
}

#[test]
fn the_new_holder_is_promoted_only_once_no_other_primary_is_writable() {
    let input = cluster(
        vec![unreachable("a"), replica("b", "a", 1000, 1000)],
        Some("b"),
        99,
    );
    let decision = decide(&input);
    assert_eq!(promoted(&decision), Some("b"));

    let input = cluster(
        vec![primary("a", 1000), replica("b", "a", 1000, 1000)],
        Some("b"),
        99,
    );
    let decision = decide(&input);
    assert_eq!(promoted(&decision), None);
    assert!(
        decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::Fence { instance, .. } if instance == "a"))
    );
}

#[test]
fn a_former_primary_rejoins_and_strays_follow_the_holder() {
    let mut fenced = primary("a", 900);
    fenced.role = ObservedRole::Fenced;
    fenced.postgres_up = false;
    let input = cluster(
        vec![fenced, primary("b", 1200), replica("c", "a", 1000, 1000)],
        Some("b"),
        99,
    );
    let decision = decide(&input);
    assert!(decision.actions.contains(&Action::Rejoin {
        instance: "a".to_string(),
        primary: "b".to_string()
    }));
    assert!(decision.actions.contains(&Action::Follow {
        instance: "c".to_string(),
        primary: "b".to_string()
    }));
    assert_eq!(decision.status.phase, Phase::Degraded);
    assert_eq!(
        decision
            .memory
            .last_primary
            .as_ref()
            .map(|p| p.name.as_str()),
        Some("b")
    );
}

#[test]
fn the_lag_limit_refuses_unless_data_loss_is_allowed_and_then_says_so() {
    let mut input = cluster(
        vec![unreachable("a"), replica("b", "a", 400, 400)],
        Some("a"),
        0,
    );
    input.spec.max_failover_lag_bytes = Some(100);
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None);
    assert_eq!(decision.status.phase, Phase::FailoverBlocked);
    assert!(
        decision.status.message.contains("600 bytes behind"),
        "{}",
        decision.status.message
    );

    input.spec.allow_data_loss = true;
    let decision = decide(&input);
    assert_eq!(acquired(&decision), Some("b"));
    assert!(
        decision
            .events
            .iter()
            .any(|e| e.severity == Severity::Critical && e.reason == EventReason::DataLossAllowed)
    );
    assert!(
        decision
            .status
            .failover
            .as_ref()
            .is_some_and(|f| f.data_loss_allowed)
    );
}

#[test]
fn an_unknown_primary_position_is_not_taken_as_zero_lag() {
    let mut input = cluster(
        vec![unreachable("a"), replica("b", "a", 400, 400)],
        Some("a"),
        0,
    );
    input.spec.max_failover_lag_bytes = Some(100);
    input.memory.last_primary = None;
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None);
    assert!(
        decision.status.message.contains("unknown"),
        "{}",
        decision.status.message
    );
}

#[test]
fn sync_mode_requires_a_reading_quorum() {
    // ANY 1 (b, c): an acknowledged commit is on b or c; both must report.
    let mut input = cluster(
        vec![
            unreachable("a"),
            replica("b", "a", 900, 900),
            unreachable("c"),
        ],
        Some("a"),
        0,
    );
    input.spec.mode = ReplicationMode::Sync;
    input.memory.recorded_sync = SyncSet {
        k: 1,
        members: vec!["b".to_string(), "c".to_string()],
    };
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None);
    assert!(
        decision.status.message.contains("quorum"),
        "{}",
        decision.status.message
    );

    // ANY 2 (b, c): every acknowledged commit is on both; b alone suffices.
    input.memory.recorded_sync.k = 2;
    assert_eq!(acquired(&decide(&input)), Some("b"));
}

#[test]
fn sync_mode_promotes_an_async_replica_only_when_it_is_as_advanced_as_the_quorum() {
    let mut input = cluster(
        vec![
            unreachable("a"),
            replica("b", "a", 900, 900),
            replica("c", "a", 1000, 1000),
        ],
        Some("a"),
        0,
    );
    input.spec.mode = ReplicationMode::Sync;
    input.spec.priorities.insert("c".to_string(), 0);
    input.memory.recorded_sync = SyncSet {
        k: 1,
        members: vec!["b".to_string(), "c".to_string()],
    };
    // c holds the most but may not be promoted; b may miss commits only c acknowledged.
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None, "{:?}", decision.status);
}

#[test]
fn the_primary_gets_the_desired_synchronous_standbys_and_the_record_widens_first() {
    let mut input = cluster(
        vec![
            primary("a", 1000),
            replica("b", "a", 1000, 1000),
            replica("c", "a", 1000, 1000),
        ],
        Some("a"),
        99,
    );
    input.spec.mode = ReplicationMode::Sync;
    input.memory.recorded_sync = SyncSet {
        k: 1,
        members: vec!["b".to_string(), "x".to_string()],
    };
    let decision = decide(&input);
    let desired = SyncSet {
        k: 1,
        members: vec!["b".to_string(), "c".to_string()],
    };
    assert!(decision.actions.contains(&Action::SetSynchronousStandbys {
        primary: "a".to_string(),
        sync: desired.clone()
    }));
    assert_eq!(
        decision.memory.recorded_sync.members,
        vec!["b".to_string(), "c".to_string(), "x".to_string()]
    );

    // Once applied and caught up, the record narrows to it.
    input.instances[0].applied_sync = Some(desired.clone());
    input.memory = decision.memory;
    let decision = decide(&input);
    assert!(decision.actions.is_empty(), "{:?}", decision.actions);
    assert_eq!(decision.memory.recorded_sync, desired);
    assert_eq!(desired.to_standby_names(), "ANY 1 (\"b\", \"c\")");
}

#[test]
fn a_lone_primary_without_lease_acquires_it_and_extra_primaries_are_fenced() {
    let input = cluster(vec![primary("a", 10), replica("b", "a", 10, 10)], None, 99);
    let decision = decide(&input);
    assert_eq!(acquired(&decision), Some("a"));
    assert!(
        !decision
            .actions
            .iter()
            .any(|a| matches!(a, Action::Fence { .. }))
    );

    let input = cluster(vec![primary("a", 10), primary("b", 10)], None, 99);
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None);
    assert_eq!(
        decision
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Fence { .. }))
            .count(),
        2
    );
}

#[test]
fn switchover_demotes_then_takes_over_without_waiting_for_expiry() {
    let mut input = cluster(
        vec![
            primary("a", 1000),
            replica("b", "a", 1000, 1000),
            replica("c", "a", 990, 990),
        ],
        Some("a"),
        99,
    );
    let plan = plan_switchover(&input, Some("c")).expect("valid switchover");
    input.memory.switchover = Some(plan);
    let decision = decide(&input);
    assert!(decision.actions.contains(&Action::Demote {
        instance: "a".to_string()
    }));
    assert_eq!(decision.status.phase, Phase::SwitchingOver);

    // a shut down and released the lease; c has not yet received a's last WAL.
    input.memory = decision.memory;
    input.instances[0] = InstanceObservation {
        role: ObservedRole::Stopped,
        postgres_up: false,
        ..input.instances[0].clone()
    };
    input.lease.holder = None;
    input.lease.version = "v8".to_string();
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None);
    assert_eq!(decision.status.phase, Phase::SwitchingOver);

    input.instances[2].received_lsn = Some(Lsn(1000));
    let decision = decide(&input);
    assert_eq!(
        decision.actions,
        vec![Action::AcquireLease {
            holder: "c".to_string(),
            expected_version: "v8".to_string()
        }]
    );

    input.memory = decision.memory;
    input.lease.holder = Some("c".to_string());
    let decision = decide(&input);
    assert_eq!(promoted(&decision), Some("c"));
    input.memory = decision.memory;
    input.instances[2] = primary("c", 1100);
    let decision = decide(&input);
    assert!(decision.memory.switchover.is_none());
    assert!(
        decision
            .events
            .iter()
            .any(|e| e.reason == EventReason::SwitchoverCompleted)
    );
}

#[test]
fn bad_switchover_requests_are_refused() {
    let mut lagging = replica("c", "a", 0, 0);
    lagging.received_lsn = Some(Lsn(0));
    let mut input = cluster(
        vec![
            primary("a", 100 * 1024 * 1024),
            replica("b", "a", 100 * 1024 * 1024, 0),
            lagging,
            unreachable("d"),
        ],
        Some("a"),
        99,
    );
    assert!(matches!(
        plan_switchover(&input, Some("zz")),
        Err(SwitchoverError::UnknownInstance(_))
    ));
    assert!(matches!(
        plan_switchover(&input, Some("a")),
        Err(SwitchoverError::TargetIsPrimary(_))
    ));
    assert!(matches!(
        plan_switchover(&input, Some("c")),
        Err(SwitchoverError::TargetLagging { .. })
    ));
    assert!(matches!(
        plan_switchover(&input, Some("d")),
        Err(SwitchoverError::TargetUnreachable(_))
    ));
    assert_eq!(
        plan_switchover(&input, None).map(|p| p.to),
        Ok("b".to_string())
    );
    input.instances[0] = unreachable("a");
    assert_eq!(
        plan_switchover(&input, Some("b")),
        Err(SwitchoverError::NoPrimary)
    );
}

// ---------------------------------------------------------------------------------------------
// Property tests.

#[derive(Debug, Clone)]
struct Scenario {
    input: EngineInput,
}

fn arb_role() -> impl Strategy<Value = ObservedRole> {
    prop_oneof![
        3 => Just(ObservedRole::Replica),
        2 => Just(ObservedRole::Primary),
        1 => Just(ObservedRole::Fenced),
        1 => Just(ObservedRole::Stopped),
        1 => Just(ObservedRole::Starting),
        1 => Just(ObservedRole::Unknown),
    ]
}

fn arb_instance(index: usize, names: Vec<String>) -> impl Strategy<Value = InstanceObservation> {
    (
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.85),
        arb_role(),
        1u32..=3,
        prop::option::weighted(0.9, 0u64..2000),
        0u64..2000,
        prop::option::of(0usize..names.len()),
        0u64..20,
    )
        .prop_map(
            move |(
                reachable,
                postgres_up,
                role,
                timeline,
                received,
                replay_behind,
                upstream,
                report_age_s,
            )| {
                InstanceObservation {
                    name: names[index].clone(),
                    reachable,
                    postgres_up,
                    role,
                    timeline: Some(timeline),
                    received_lsn: received.map(Lsn),
                    replayed_lsn: received.map(|r| Lsn(r.saturating_sub(replay_behind))),
                    flush_lsn: received.map(Lsn),
                    sync_state: None,
                    upstream: upstream.map(|u| names[u].clone()),
                    applied_sync: None,
                    last_report_at: Some(MonoTime::from_millis((100 - report_age_s) * SECOND)),
                    former_primary: false,
                }
            },
        )
}

fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (2usize..=5)
        .prop_flat_map(|n| {
            let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
            let instances: Vec<_> = (0..n).map(|i| arb_instance(i, names.clone())).collect();
            (
                instances,
                prop::option::of(0..n),
                0u64..=100,
                prop::sample::subsequence(names.clone(), 0..=n),
                0u32..=3,
                prop::option::of(0..n),
                prop::option::of(0u64..2500),
                any::<bool>(),
                prop::option::of(0u64..500),
                prop::collection::vec(0u32..3, n),
                any::<bool>(),
                prop::option::of((0..n, 0..n)),
            )
        })
        .prop_map(
            |(
                instances,
                holder,
                since,
                sync_members,
                k,
                last_primary,
                last_flush,
                allow,
                max_lag,
                priorities,
                sync_mode,
                plan,
            )| {
                let names: Vec<String> = instances.iter().map(|i| i.name.clone()).collect();
                let spec = EngineSpec {
                    mode: if sync_mode {
                        ReplicationMode::Sync
                    } else {
                        ReplicationMode::Async
                    },
                    allow_data_loss: allow,
                    max_failover_lag_bytes: max_lag,
                    priorities: names.iter().cloned().zip(priorities).collect(),
                    ..EngineSpec::default()
                };
                let memory = Memory {
                    last_primary: last_primary
                        .zip(last_flush)
                        .map(|(p, flush)| PrimaryRecord {
                            name: names[p].clone(),
                            timeline: Some(1),
                            flush_lsn: Lsn(flush),
                        }),
                    recorded_sync: SyncSet {
                        k,
                        members: sync_members,
                    }
                    .normalized(),
                    switchover: plan.map(|(from, to)| SwitchoverPlan {
                        from: names[from].clone(),
                        to: names[to].clone(),
                        requested_at: MonoTime::from_millis(95 * SECOND),
                    }),
                    sync_record_lost: false,
                };
                Scenario {
                    input: EngineInput {
                        now: MonoTime::from_millis(100 * SECOND),
                        lease: LeaseView {
                            holder: holder.map(|h| names[h].clone()),
                            version: "v1".to_string(),
                            unchanged_since: MonoTime::from_millis(since * SECOND),
                            duration: Duration::from_secs(8),
                        },
                        instances,
                        spec,
                        memory,
                    },
                }
            },
        )
}

/// Independent restatement of "may be promoted at all" for the oracle.
fn oracle_promotable(input: &EngineInput, i: &InstanceObservation) -> bool {
    input.is_fresh(i)
        && i.postgres_up
        && i.role == ObservedRole::Replica
        && i.received_lsn.is_some()
        && input.spec.priority_of(&i.name) > 0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Never two holders and never a second writable primary: at most one lease write and one
    /// promotion per round, never both; a promotion only of the holder and only when no other
    /// reachable instance reports itself a writable primary.
    #[test]
    fn never_two_holders_or_writable_primaries(s in arb_scenario()) {
        let input = &s.input;
        let decision = decide(input);
        let acquires: Vec<_> = decision.actions.iter().filter(|a| matches!(a, Action::AcquireLease { .. })).collect();
        let promotes: Vec<_> = decision.actions.iter().filter(|a| matches!(a, Action::Promote { .. })).collect();
        prop_assert!(acquires.len() <= 1);
        prop_assert!(promotes.len() <= 1);
        prop_assert!(acquires.is_empty() || promotes.is_empty());
        if let Some(Action::Promote { instance }) = promotes.first() {
            prop_assert_eq!(Some(instance), input.lease.holder.as_ref());
            let other_writable = input.instances.iter().any(|i| input.is_fresh(i) && i.is_writable_primary() && &i.name != instance);
            prop_assert!(!other_writable);
        }
        // Every other reachable writable primary is fenced in the same round.
        if let Some(holder) = &input.lease.holder {
            for i in input.instances.iter().filter(|i| input.is_fresh(i) && i.is_writable_primary() && &i.name != holder) {
                let fenced = decision.actions.iter().any(|a| matches!(a, Action::Fence { instance, .. } if *instance == i.name));
                prop_assert!(fenced, "{} not fenced", i.name);
            }
        }
    }

    /// A lease held by someone is only taken over after a full lease duration unchanged on the
    /// observer's clock, and always with the observed version as precondition.
    #[test]
    fn never_take_over_before_a_full_lease_duration(s in arb_scenario()) {
        let input = &s.input;
        let decision = decide(input);
        for action in &decision.actions {
            if let Action::AcquireLease { holder, expected_version } = action {
                prop_assert_eq!(expected_version, &input.lease.version);
                if let Some(old) = &input.lease.holder {
                    prop_assert_ne!(old, holder);
                    prop_assert!(input.now.saturating_since(input.lease.unchanged_since) >= input.lease_duration());
                }
            }
        }
    }

    /// The replica chosen by a failover is never behind another eligible one.
    #[test]
    fn promoted_replica_is_never_behind_another_eligible_one(s in arb_scenario()) {
        let mut input = s.input.clone();
        input.memory.switchover = None;
        let decision = decide(&input);
        let Some(chosen) = acquired(&decision) else { return Ok(()); };
        let chosen = input.instance(chosen).expect("chosen exists");
        if chosen.role == ObservedRole::Primary {
            return Ok(()); // adoption of the only running primary, not a failover
        }
        prop_assert!(oracle_promotable(&input, chosen));
        // The instance failed over from: the holder, or the last primary when the lease is free.
        let excluded = input.lease.holder.clone().or_else(|| input.memory.last_primary.as_ref().map(|p| p.name.clone()));
        let newest = input
            .instances
            .iter()
            .filter(|i| oracle_promotable(&input, i) && Some(&i.name) != excluded.as_ref())
            .filter_map(|i| i.timeline)
            .max();
        prop_assert_eq!(chosen.timeline, newest);
        for other in input.instances.iter().filter(|i| oracle_promotable(&input, i) && i.timeline == newest) {
            if Some(other.name.as_str()) == input.memory.last_primary.as_ref().map(|p| p.name.as_str()) && input.lease.holder.is_none() {
                continue;
            }
            if Some(&other.name) == input.lease.holder.as_ref() {
                continue;
            }
            prop_assert!(chosen.received_lsn >= other.received_lsn, "{} behind {}", chosen.name, other.name);
        }
    }

    /// Sync mode: with `ANY k (S)` and an acknowledged commit at `ack` present on k members of S,
    /// a promoted replica (without allowDataLoss) has it — whatever the observer can see.
    #[test]
    fn sync_mode_never_promotes_a_replica_missing_an_acknowledged_commit(
        n in 2usize..=6,
        k in 1u32..=3,
        ack in 100u64..1000,
        positions in prop::collection::vec(0u64..1200, 6),
        holders_of_ack in prop::collection::vec(any::<bool>(), 6),
        visible in prop::collection::vec(prop::bool::weighted(0.7), 6),
        priorities in prop::collection::vec(0u32..3, 6),
    ) {
        let names: Vec<String> = (1..=n).map(|i| format!("r{i}")).collect();
        let k = k.min(n as u32);
        // Truth: the first k members chosen by `holders_of_ack` (topped up in order) have ack.
        let mut has_ack: Vec<bool> = holders_of_ack[..n].to_vec();
        let mut count = has_ack.iter().filter(|b| **b).count();
        for flag in has_ack.iter_mut() {
            if count >= k as usize { break; }
            if !*flag { *flag = true; count += 1; }
        }
        let mut instances = vec![unreachable("p")];
        for (i, name) in names.iter().enumerate() {
            let received = if has_ack[i] { ack.max(positions[i]) } else { positions[i].min(ack - 1) };
            let mut r = replica(name, "p", received, received);
            if !visible[i] {
                r = unreachable(name);
            }
            instances.push(r);
        }
        let mut input = cluster(instances, Some("p"), 0);
        input.spec.mode = ReplicationMode::Sync;
        input.spec.priorities = names.iter().cloned().zip(priorities).collect();
        input.memory.recorded_sync = SyncSet { k, members: names.clone() };
        let decision = decide(&input);
        if let Some(chosen) = acquired(&decision) {
            let chosen = input.instance(chosen).expect("chosen exists");
            prop_assert!(chosen.received_lsn >= Some(Lsn(ack)), "{} at {:?} misses {}", chosen.name, chosen.received_lsn, ack);
        }
    }
}

#[test]
fn a_report_older_than_a_release_is_not_taken_for_a_running_primary() {
    // a released the lease (observed at 99.5 s); its last report (99 s) predates the release.
    let mut stale = primary("a", 1000);
    stale.last_report_at = Some(MonoTime::from_millis(99 * SECOND));
    let mut input = cluster(vec![stale, replica("b", "a", 1000, 1000)], None, 0);
    input.lease.unchanged_since = MonoTime::from_millis(99_500);
    let decision = decide(&input);
    assert_eq!(acquired(&decision), None, "{:?}", decision.status);
    assert!(
        decision.status.message.contains("fresh report"),
        "{}",
        decision.status.message
    );
}

#[test]
fn after_a_release_the_best_replica_gets_a_moment_to_receive_the_last_wal() {
    let mut stopped = primary("a", 1000);
    stopped.role = ObservedRole::Stopped;
    stopped.postgres_up = false;
    let mut input = cluster(vec![stopped, replica("b", "a", 900, 900)], None, 99);
    assert_eq!(
        acquired(&decide(&input)),
        None,
        "released 1 s ago, b is 100 bytes short"
    );
    input.instances[1].received_lsn = Some(Lsn(1000));
    assert_eq!(acquired(&decide(&input)), Some("b"));
    // Never forever: after a lease duration the usual rules apply.
    input.instances[1].received_lsn = Some(Lsn(900));
    input.lease.unchanged_since = MonoTime::from_millis(90 * SECOND);
    assert_eq!(acquired(&decide(&input)), Some("b"));
}
