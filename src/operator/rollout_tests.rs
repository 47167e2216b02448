//! Unit tests of the rollout and scaling plans.

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
