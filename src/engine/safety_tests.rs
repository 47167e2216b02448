//! Rules that close holes found across rounds (issue 12): a lost sync record refuses failover
//! in sync mode until a primary confirms a setting again; a switchover's takeover of the
//! released lease follows the failover's quorum rule; a switchover that could not be completed
//! under that rule is refused before the primary is demoted.

use std::time::Duration;

use super::*;

const SECOND: u64 = 1000;

fn observation(name: &str, role: ObservedRole, lsn: u64) -> InstanceObservation {
    InstanceObservation {
        name: name.to_string(),
        reachable: true,
        postgres_up: true,
        role,
        timeline: Some(1),
        received_lsn: (role == ObservedRole::Replica).then_some(Lsn(lsn)),
        replayed_lsn: (role == ObservedRole::Replica).then_some(Lsn(lsn)),
        flush_lsn: (role == ObservedRole::Primary).then_some(Lsn(lsn)),
        sync_state: None,
        upstream: (role == ObservedRole::Replica).then(|| "a".to_string()),
        applied_sync: None,
        last_report_at: Some(MonoTime::from_millis(100 * SECOND)),
        former_primary: false,
        last_seen_serving_at: None,
    }
}

fn quorum() -> SyncSet {
    SyncSet {
        k: 1,
        members: vec!["b".to_string(), "c".to_string()],
    }
}

/// Sync mode, now = 100 s, the lease held by `holder` (or free) unchanged since `since_s`.
fn input(instances: Vec<InstanceObservation>, holder: Option<&str>, since_s: u64) -> EngineInput {
    EngineInput {
        now: MonoTime::from_millis(100 * SECOND),
        instances,
        lease: LeaseView {
            holder: holder.map(str::to_string),
            version: "7".to_string(),
            unchanged_since: MonoTime::from_millis(since_s * SECOND),
            duration: Duration::from_secs(8),
        },
        spec: EngineSpec {
            mode: ReplicationMode::Sync,
            ..EngineSpec::default()
        },
        memory: Memory {
            last_primary: Some(PrimaryRecord {
                name: "a".to_string(),
                timeline: Some(1),
                flush_lsn: Lsn(400),
            }),
            recorded_sync: quorum(),
            ..Memory::default()
        },
    }
}

fn takes_over(decision: &Decision) -> Option<&str> {
    decision.actions.iter().find_map(|a| match a {
        Action::AcquireLease { holder, .. } => Some(holder.as_str()),
        _ => None,
    })
}

#[test]
fn a_lost_sync_record_refuses_failover_until_a_primary_confirms_a_setting() {
    // The primary is gone, its lease expired; b and c both report.
    let mut dead = observation("a", ObservedRole::Unknown, 0);
    dead.reachable = false;
    let instances = vec![
        dead,
        observation("b", ObservedRole::Replica, 900),
        observation("c", ObservedRole::Replica, 500),
    ];
    let mut lost = input(instances.clone(), Some("a"), 80);
    lost.memory.sync_record_lost = true;
    let decision = decide(&lost);
    assert_eq!(takes_over(&decision), None, "{:?}", decision.actions);
    assert_eq!(decision.status.phase, Phase::FailoverBlocked);
    assert!(
        decision
            .status
            .message
            .contains("lost with the controller's state"),
        "{}",
        decision.status.message
    );
    // With allowDataLoss the operator may override it, loudly.
    let mut allowed = lost.clone();
    allowed.spec.allow_data_loss = true;
    let decision = decide(&allowed);
    assert_eq!(takes_over(&decision), Some("b"));
    assert!(
        decision
            .events
            .iter()
            .any(|e| e.severity == Severity::Critical)
    );
    // A known record fails over to the replica the quorum proves complete.
    let known = input(instances, Some("a"), 80);
    assert_eq!(takes_over(&decide(&known)), Some("b"));

    // A serving primary that confirms its setting makes the record known again.
    let mut primary = observation("a", ObservedRole::Primary, 1000);
    primary.applied_sync = Some(quorum());
    let mut serving = input(
        vec![
            primary,
            observation("b", ObservedRole::Replica, 1000),
            observation("c", ObservedRole::Replica, 1000),
        ],
        Some("a"),
        99,
    );
    serving.memory.sync_record_lost = true;
    let decision = decide(&serving);
    assert!(!decision.memory.sync_record_lost);
    assert_eq!(decision.memory.recorded_sync, quorum());
}

#[test]
fn a_switchover_target_behind_the_quorum_does_not_take_the_released_lease() {
    // The old primary a stopped and released the lease. b received everything a was last
    // *observed* at (400) but c holds more (900): a commit acknowledged by c alone after the
    // last observation is not on b.
    let mut stopped = observation("a", ObservedRole::Stopped, 0);
    stopped.postgres_up = false;
    let mut released = input(
        vec![
            stopped,
            observation("b", ObservedRole::Replica, 500),
            observation("c", ObservedRole::Replica, 900),
        ],
        None,
        99,
    );
    released.memory.switchover = Some(SwitchoverPlan {
        from: "a".to_string(),
        to: "b".to_string(),
        requested_at: MonoTime::from_millis(99 * SECOND),
    });
    let decision = decide(&released);
    assert_eq!(takes_over(&decision), None, "{:?}", decision.actions);
    assert_eq!(decision.status.phase, Phase::SwitchingOver);
    // Once b has caught up with the quorum's position, it takes over.
    let mut caught_up = released.clone();
    caught_up.instances[1] = observation("b", ObservedRole::Replica, 900);
    assert_eq!(takes_over(&decide(&caught_up)), Some("b"));
    // Past the switchover's patience the usual failover rules choose, with the quorum.
    let mut late = released;
    late.now = MonoTime::from_millis(120 * SECOND);
    for instance in &mut late.instances {
        instance.last_report_at = Some(late.now);
    }
    assert_eq!(takes_over(&decide(&late)), Some("c"));
}

/// Found by `tests/local_switchover_blip.rs`: c's last report (400) predates commits it
/// acknowledged during the old primary's checkpoint and stop; b's receiver was cut meanwhile.
/// Both look fresh, both say "400", the takeover of b lost what c alone held. Only reports taken
/// after the old primary could last commit may prove the quorum's position.
#[test]
fn a_takeover_counts_only_reports_taken_after_the_old_primary_stopped_committing() {
    let mut stopped = observation("a", ObservedRole::Stopped, 0);
    stopped.postgres_up = false;
    let before_release = MonoTime::from_millis(98 * SECOND);
    let mut b = observation("b", ObservedRole::Replica, 400);
    let mut c = observation("c", ObservedRole::Replica, 400);
    (b.last_report_at, c.last_report_at) = (Some(before_release), Some(before_release));
    // The lease was released at 99 s; now = 100 s: both reports are fresh, and older.
    let mut released = input(vec![stopped.clone(), b.clone(), c.clone()], None, 99);
    released.memory.switchover = Some(SwitchoverPlan {
        from: "a".to_string(),
        to: "b".to_string(),
        requested_at: MonoTime::from_millis(97 * SECOND),
    });
    let decision = decide(&released);
    assert_eq!(takes_over(&decision), None, "{:?}", decision.actions);
    // Once c reports again, after the release, its position proves what b must have.
    let mut reported = released.clone();
    reported.instances[2] = observation("c", ObservedRole::Replica, 900);
    assert_eq!(takes_over(&decide(&reported)), None, "b is behind c");
    reported.instances[1] = observation("b", ObservedRole::Replica, 900);
    assert_eq!(takes_over(&decide(&reported)), Some("b"));

    // The same after an expiry: a report taken before the lease expired may predate the old
    // primary's last commits (it fences itself only by then).
    let mut dead = observation("a", ObservedRole::Unknown, 0);
    dead.reachable = false;
    let mut expired = input(vec![dead, b, c], Some("a"), 91);
    expired.instances[1].last_report_at = Some(MonoTime::from_millis(98 * SECOND));
    expired.instances[2].last_report_at = Some(MonoTime::from_millis(98 * SECOND));
    let decision = decide(&expired);
    assert_eq!(takes_over(&decision), None, "{:?}", decision.actions);
    assert!(
        decision
            .status
            .message
            .contains("taken after the old primary could last commit"),
        "{}",
        decision.status.message
    );
    expired.instances[1].last_report_at = Some(expired.now);
    expired.instances[2].last_report_at = Some(expired.now);
    assert_eq!(takes_over(&decide(&expired)), Some("b"));
}

#[test]
fn a_sync_switchover_that_could_not_complete_under_the_quorum_rule_is_refused_up_front() {
    let mut primary = observation("a", ObservedRole::Primary, 1000);
    primary.applied_sync = Some(quorum());
    let mut down = observation("c", ObservedRole::Unknown, 0);
    down.reachable = false;
    let serving = input(
        vec![primary, observation("b", ObservedRole::Replica, 1000), down],
        Some("a"),
        99,
    );
    let refused = plan_switchover(&serving, Some("b")).expect_err("c does not report");
    assert!(
        matches!(refused, SwitchoverError::QuorumUnprovable { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("2 are needed"), "{refused}");
}
