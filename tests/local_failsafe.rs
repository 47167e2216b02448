//! The lease-store-outage failsafe (issue 13) on real processes. In local mode the lease
//! service lives in the controller process: freezing the controller (SIGSTOP) makes the lease
//! store unreachable for every agent — the local equivalent of an API-server outage. Each
//! scenario runs on its own async cluster (2 replicas, default lease profile: 8 s lease, renew
//! every 1 s, 5 s renew deadline, 2 s shutdown budget) under the chaos writers (one straight to
//! each node's postgres every 20 ms, unique ids, acknowledgement instants on the test's clock,
//! plus one through the write endpoint):
//!
//! 1. `a_primary_serves_through_a_controller_freeze_on_its_replicas_confirmations`: the
//!    controller is frozen for 20 s (4× the renew deadline). The primary keeps acknowledging
//!    writes (no gap over 2 s), its status shows `serving_on_confirmations_ms`, the replicas'
//!    show `confirmed_primary`; after SIGCONT the cluster is healthy with the same primary (no
//!    lease takeover, no promotion) and `serving_on_confirmations_ms` is null again.
//! 2. `a_primary_fences_when_one_replica_cannot_confirm`: the controller and one replica's agent
//!    are frozen together for 20 s. The frozen member cannot confirm, so the primary fences: no
//!    write acknowledged later than renew deadline + shutdown budget + 1 s after the freeze.
//!    After SIGCONT of both a replica takes over, the fenced node rejoins, and the write history
//!    passes the checker (`pgrs::chaos::check`: no write acknowledged by a superseded primary).
//! 3. `without_the_failsafe_a_primary_fences_when_the_controller_freezes`: `--no-failsafe`, the
//!    controller alone frozen: the primary fences within the renew deadline (+ a margin), as
//!    before issue 13; the cluster recovers after SIGCONT.
//!
//! One test function per scenario rather than phases on one cluster: the scenarios end in
//! different states (same primary; a failover; a failsafe-off cluster), bringing a cluster up
//! takes ~10 s against 40–60 s per scenario, and a failure in one must not mask the others.
//! The three run one after the other (a lock): each runs 3 postgres and 3 agents on a 2-core
//! machine. Every measured figure is printed (`--nocapture`), with the controller's events
//! since the freeze; the logs are kept in `target/test-output/local_failsafe_<scenario>/`.
//! After a thaw the controller first serves the status it computed before the freeze: the
//! tests wait for a healthy status computed after the thaw (`updated_at`).

mod local_support;
#[path = "local_failsafe/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgrs::chaos::{FinalState, check};
use pgrs::protocol::api::Role;
use pgrs::protocol::failsafe::FailsafeStatus;
use support::*;

const RENEW_DEADLINE: Duration = Duration::from_secs(5);
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(2);
/// Scheduling slack on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_secs(1);
/// 4× the renew deadline.
const FREEZE: Duration = Duration::from_secs(20);
/// Longest acceptable stretch without an acknowledged write while serving on confirmations.
const MAX_GAP: Duration = Duration::from_secs(2);
/// From the freeze on, by then the first round of confirmations has answered (a renewal times
/// out after the 1 s renew interval, then the round).
const CONFIRMED_BY: Duration = Duration::from_secs(4);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One look at an agent during the freeze.
struct Sample {
    /// Since the freeze.
    at: Duration,
    node: String,
    /// Role, postgres up, failsafe; `None` when the agent did not answer.
    status: Option<(Role, bool, Option<FailsafeStatus>)>,
}

/// Samples every agent in `nodes` every ~500 ms until `until` (writers' clock).
async fn sample_agents(
    run: &Run,
    nodes: &[String],
    from: Duration,
    until: Duration,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    while run.now() < until {
        let started = Instant::now();
        let at = run.now() - from;
        let statuses = futures::future::join_all(nodes.iter().map(|n| run.agent_status(n))).await;
        for (node, status) in nodes.iter().zip(statuses) {
            samples.push(Sample {
                at,
                node: node.clone(),
                status: status.map(|s| (s.role, s.postgres_up, s.failsafe)),
            });
        }
        tokio::time::sleep(Duration::from_millis(500).saturating_sub(started.elapsed())).await;
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_serves_through_a_controller_freeze_on_its_replicas_confirmations() {
    let _serial = SERIAL.lock().await;
    let name = "serves";
    let mut run = Run::up(name, &[]).await;
    let primary = run.primary.clone();
    let nodes: Vec<String> = std::iter::once(primary.clone())
        .chain(run.replicas.iter().cloned())
        .collect();

    let frozen_wall = wall_now();
    let frozen_at = run.now();
    let mut controller = Frozen::freeze(run.controller_pid(), "the controller");
    let samples = sample_agents(&run, &nodes, frozen_at, frozen_at + FREEZE).await;
    controller.thaw();
    let thawed_at = run.now();
    let thawed_wall = wall_now();

    let healthy = run
        .wait_healthy_after(thawed_wall, Duration::from_secs(60))
        .await;
    let healthy_after = run.now() - thawed_at;
    let renewed = run
        .wait_agent(
            &primary,
            "serving_on_confirmations_ms back to null",
            Duration::from_secs(15),
            |s| {
                s.role == Role::Primary
                    && s.postgres_up
                    && s.failsafe
                        .as_ref()
                        .is_some_and(|f| f.serving_on_confirmations_ms.is_none())
            },
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = run.now();
    let attempts = run.stop_writers().await;

    // Figures.
    let primary_acks = acks(&attempts, &primary);
    let during = (primary_acks.iter())
        .filter(|a| **a >= frozen_at && **a <= thawed_at)
        .count();
    let (gap, gap_from) = longest_gap(&primary_acks, frozen_at, end);
    let answered = |node: &str| {
        (samples.iter())
            .filter(|s| s.node == node && s.status.is_some())
            .count()
    };
    let failsafe_of = |s: &Sample| s.status.as_ref().and_then(|(_, _, f)| f.clone());
    let serving_ms = (samples.iter())
        .filter(|s| s.node == primary)
        .filter_map(|s| failsafe_of(s)?.serving_on_confirmations_ms)
        .max();
    let remaining: Vec<u64> = (samples.iter())
        .filter(|s| s.node != primary)
        .filter_map(|s| failsafe_of(s)?.confirmation_remaining_ms)
        .collect();
    let takeovers = run.actions_since(frozen_wall, "AcquireLease");
    let promotions = run.actions_since(frozen_wall, "Promote");
    eprintln!(
        "[{name}] controller frozen {}: {primary} acknowledged {during} writes straight to it during the freeze ({}); longest gap without an acknowledgement from the freeze to {} after the thaw: {} (from {} after the freeze)",
        secs(FREEZE),
        outcomes(&attempts, &primary, frozen_at, thawed_at),
        secs(end - thawed_at),
        secs(gap),
        secs(gap_from.saturating_sub(frozen_at)),
    );
    eprintln!(
        "[{name}] {primary}'s status: serving_on_confirmations_ms up to {serving_ms:?}; replicas' confirmation_remaining_ms {:?}..{:?}; agent statuses answered during the freeze: {:?}",
        remaining.iter().min(),
        remaining.iter().max(),
        nodes.iter().map(|n| (n, answered(n))).collect::<Vec<_>>()
    );
    eprintln!(
        "[{name}] after SIGCONT: healthy with {:?} after {}; lease takeovers {takeovers:?}, promotions {promotions:?}; {primary}'s failsafe now {:?}",
        healthy.primary,
        secs(healthy_after),
        renewed.failsafe
    );
    eprintln!(
        "[{name}] controller events since the freeze (thawed at +{}):\n{}",
        secs(thawed_at - frozen_at),
        run.cluster.events_since(frozen_wall)
    );

    // Every answer from CONFIRMED_BY on shows the primary serving on confirmations and every
    // replica having confirmed it.
    let context = || {
        format!(
            "{}\n{}",
            run.keeper_log(&primary, frozen_wall).join("\n"),
            run.cluster.events_since(frozen_wall)
        )
    };
    for sample in samples.iter().filter(|s| s.at >= CONFIRMED_BY) {
        let Some((role, up, failsafe)) = &sample.status else {
            continue;
        };
        let failsafe = failsafe.as_ref().expect("failsafe in the status");
        if sample.node == primary {
            assert!(
                *role == Role::Primary && *up && failsafe.serving_on_confirmations_ms.is_some(),
                "[{name}] {primary} at +{}: {role:?}, up {up}, {failsafe:?}\n{}",
                secs(sample.at),
                context()
            );
        } else {
            assert_eq!(
                failsafe.confirmed_primary.as_deref(),
                Some(primary.as_str()),
                "[{name}] {} at +{}: {failsafe:?}\n{}",
                sample.node,
                secs(sample.at),
                context()
            );
        }
    }
    for node in &nodes {
        assert!(
            answered(node) >= 10,
            "[{name}] {node}'s agent answered only {} status requests during the freeze",
            answered(node)
        );
    }
    assert!(
        serving_ms.is_some_and(|ms| ms >= (FREEZE - CONFIRMED_BY - MARGIN).as_millis() as u64),
        "[{name}] {primary} served on confirmations only {serving_ms:?} ms"
    );
    assert!(
        gap <= MAX_GAP,
        "[{name}] {primary} acknowledged nothing for {} from {} after the freeze\n{}",
        secs(gap),
        secs(gap_from.saturating_sub(frozen_at)),
        context()
    );
    assert!(
        during as u64 >= FREEZE.as_secs() * 10,
        "[{name}] only {during} writes acknowledged during the freeze"
    );
    assert_eq!(healthy.primary.as_deref(), Some(primary.as_str()));
    assert!(
        takeovers.is_empty() && promotions.is_empty(),
        "[{name}] the controller moved the lease after the thaw: {takeovers:?} {promotions:?}\n{}",
        context()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_fences_when_one_replica_cannot_confirm() {
    let _serial = SERIAL.lock().await;
    let name = "fences";
    let mut run = Run::up(name, &[]).await;
    let old = run.primary.clone();
    let silent = run.replicas[0].clone();

    let mut agent = Frozen::freeze(run.agent_pid(&silent), "a replica's agent");
    let mut controller = Frozen::freeze(run.controller_pid(), "the controller");
    let frozen_wall = wall_now();
    let frozen_at = run.now();
    let watched = [old.clone()];
    let samples = sample_agents(&run, &watched, frozen_at, frozen_at + FREEZE).await;
    let lease_before = run.lease_line();
    controller.thaw();
    agent.thaw();
    let thawed_at = run.now();
    let thawed_wall = wall_now();
    // What the thawed member answers first: the confirmation requests the primary sent while it
    // was frozen wait in its listen queue and are answered now.
    let silent_after = (run.agent_status(&silent).await).and_then(|s| s.failsafe);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lease_after = run.lease_line();

    // Recovery: a primary, every replica (the fenced node rejoined) streaming from it, and
    // writes acknowledged by the new primary.
    let healthy = run
        .wait_healthy_after(thawed_wall, Duration::from_secs(120))
        .await;
    let new = healthy.primary.clone().expect("a primary");
    let recovered_after = run.now() - thawed_at;
    let resumed = Instant::now();
    while acks(&run.attempts(), &new).iter().all(|a| *a < thawed_at) {
        assert!(
            resumed.elapsed() < Duration::from_secs(30),
            "[{name}] {new} acknowledged no write after the thaw"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let attempts = run.stop_writers().await;
    let ids = final_ids(&run, &new).await;
    let history: Vec<_> = attempts.iter().map(|a| a.write.clone()).collect();
    let final_state = FinalState {
        primary: new.clone(),
        ids,
    };
    let report = check(&history, &final_state, &[]);

    // Figures.
    let last_old_ack = (acks(&attempts, &old).into_iter())
        .filter(|a| *a >= frozen_at && *a <= thawed_at)
        .max();
    let fenced_log = run.fenced_after(&old, frozen_wall);
    let fenced_status = (samples.iter())
        .find(|s| {
            s.status
                .as_ref()
                .is_some_and(|(role, ..)| *role == Role::Fenced)
        })
        .map(|s| s.at);
    let round_errors: BTreeSet<String> = (samples.iter())
        .filter_map(|s| s.status.as_ref()?.2.as_ref()?.last_round_error.clone())
        .collect();
    let first_new_ack = acks(&attempts, &new).into_iter().find(|a| *a >= thawed_at);
    let keeper_log = run.keeper_log(&old, frozen_wall);
    eprintln!(
        "[{name}] controller and {silent}'s agent frozen {}: {old}'s last acknowledged write +{} after the freeze; fence logged +{} ms, status fenced by +{}; direct writes to {old} during the freeze: {}",
        secs(FREEZE),
        last_old_ack.map_or("none".into(), |a| secs(a - frozen_at)),
        fenced_log.map_or("never".into(), |ms| ms.to_string()),
        fenced_status.map_or("never".into(), secs),
        outcomes(&attempts, &old, frozen_at, thawed_at)
    );
    eprintln!("[{name}] {old}'s round errors: {round_errors:?}");
    eprintln!(
        "[{name}] lease before the thaw: {lease_before}; 0.5 s after it ({} wall ms): {lease_after}",
        thawed_wall
    );
    eprintln!(
        "[{name}] {silent} right after the thaw: confirmed_primary {:?}, confirmation_remaining_ms {:?}",
        silent_after
            .as_ref()
            .and_then(|f| f.confirmed_primary.clone()),
        silent_after
            .as_ref()
            .and_then(|f| f.confirmation_remaining_ms)
    );
    eprintln!(
        "[{name}] controller events since the freeze (thawed at +{}):\n{}",
        secs(thawed_at - frozen_at),
        run.cluster.events_since(frozen_wall)
    );
    for replica in &run.replicas {
        for line in run.keeper_log(replica, frozen_wall) {
            eprintln!("[{name}] {replica}: {line}");
        }
    }
    eprintln!(
        "[{name}] after SIGCONT: healthy with {new} after {}, its first acknowledged write +{} after the thaw; check: {} writes, {} acknowledged, {} split-brain, {} lost (async), longest gap {:?}",
        secs(recovered_after),
        first_new_ack.map_or("none".into(), |a| secs(a - thawed_at)),
        report.writes,
        report.acknowledged,
        report.split_brain.len(),
        report.lost.len(),
        report.longest_gap.map(|g| secs(g.length()))
    );
    let context = || {
        format!(
            "{}\n{}",
            keeper_log.join("\n"),
            run.cluster.events_since(frozen_wall)
        )
    };

    let bound = RENEW_DEADLINE + SHUTDOWN_BUDGET + MARGIN;
    assert!(
        last_old_ack.is_none_or(|a| a - frozen_at <= bound),
        "[{name}] {old} acknowledged a write {} after the freeze (bound {})\n{}",
        secs(last_old_ack.unwrap_or_default() - frozen_at),
        secs(bound),
        context()
    );
    assert!(
        fenced_log.is_some_and(|ms| ms <= (RENEW_DEADLINE + MARGIN).as_millis() as i64),
        "[{name}] {old} did not log its fence within the renew deadline: {fenced_log:?}\n{}",
        context()
    );
    assert!(
        round_errors.iter().any(|e| e.contains(&silent)),
        "[{name}] no round error names the frozen {silent}: {round_errors:?}"
    );
    assert!(
        report.violations(false).is_empty(),
        "[{name}] the write check failed: {:?}\n{}\n{}",
        report.violations(false),
        report.to_markdown(),
        context()
    );
    let rejoined = healthy.nodes.iter().find(|n| n.name == old).expect("node");
    assert!(
        rejoined.role.as_deref() == Some("replica") && rejoined.upstream.as_deref() == Some(&new),
        "[{name}] {old} did not rejoin: {rejoined:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_failsafe_a_primary_fences_when_the_controller_freezes() {
    let _serial = SERIAL.lock().await;
    let name = "off";
    let mut run = Run::up(name, &["--no-failsafe"]).await;
    let old = run.primary.clone();
    let before = run.agent_status(&old).await.expect("status");
    assert!(
        before.failsafe.as_ref().is_some_and(|f| !f.enabled),
        "[{name}] --no-failsafe: {:?}",
        before.failsafe
    );
    let nodes: Vec<String> = std::iter::once(old.clone())
        .chain(run.replicas.iter().cloned())
        .collect();

    let frozen_wall = wall_now();
    let frozen_at = run.now();
    let mut controller = Frozen::freeze(run.controller_pid(), "the controller");
    let frozen_for = RENEW_DEADLINE + SHUTDOWN_BUDGET + 3 * MARGIN;
    let samples = sample_agents(&run, &nodes, frozen_at, frozen_at + frozen_for).await;
    controller.thaw();
    let thawed_at = run.now();
    let thawed_wall = wall_now();
    let healthy = run
        .wait_healthy_after(thawed_wall, Duration::from_secs(120))
        .await;
    let recovered_after = run.now() - thawed_at;
    let attempts = run.stop_writers().await;

    let last_old_ack = (acks(&attempts, &old).into_iter())
        .filter(|a| *a >= frozen_at && *a <= thawed_at)
        .max();
    let fenced_log = run.fenced_after(&old, frozen_wall);
    let confirmations: Vec<String> = (samples.iter())
        .filter_map(|s| s.status.as_ref()?.2.as_ref()?.confirmed_primary.clone())
        .collect();
    eprintln!(
        "[{name}] controller frozen {} with --no-failsafe: {old}'s last acknowledged write +{} after the freeze, fence logged +{} ms; direct writes to {old} during the freeze: {}; after SIGCONT healthy with {:?} after {}",
        secs(frozen_for),
        last_old_ack.map_or("none".into(), |a| secs(a - frozen_at)),
        fenced_log.map_or("never".into(), |ms| ms.to_string()),
        outcomes(&attempts, &old, frozen_at, thawed_at),
        healthy.primary,
        secs(recovered_after)
    );
    let context = || {
        format!(
            "{}\n{}",
            run.keeper_log(&old, frozen_wall).join("\n"),
            run.cluster.events_since(frozen_wall)
        )
    };
    assert!(
        fenced_log.is_some_and(|ms| ms <= (RENEW_DEADLINE + MARGIN).as_millis() as i64),
        "[{name}] {old} did not fence within the renew deadline: {fenced_log:?}\n{}",
        context()
    );
    let bound = RENEW_DEADLINE + SHUTDOWN_BUDGET + MARGIN;
    assert!(
        last_old_ack.is_none_or(|a| a - frozen_at <= bound),
        "[{name}] {old} acknowledged a write {} after the freeze\n{}",
        secs(last_old_ack.unwrap_or_default() - frozen_at),
        context()
    );
    assert!(
        confirmations.is_empty(),
        "[{name}] replicas confirmed although the failsafe is off: {confirmations:?}"
    );
}

/// Every id on the final primary, read straight from its postgres.
async fn final_ids(run: &Run, node: &str) -> BTreeSet<i64> {
    let (client, connection) =
        tokio_postgres::connect(&run.cluster.node_conninfo(node), tokio_postgres::NoTls)
            .await
            .expect("connect to the final primary");
    tokio::spawn(connection);
    let rows = client
        .query("SELECT id FROM pgrs_chaos", &[])
        .await
        .expect("read the ids");
    rows.iter().map(|r| r.get::<_, i64>(0)).collect()
}
