//! Sync switchover while a standby's WAL receiver blips: zero acknowledged writes lost.
//!
//! A 3-node local cluster in sync mode (`ANY 1` of the two standbys) runs an insert load through
//! the write endpoint; every acknowledged insert is recorded with the primary's WAL position.
//! `pgrs local switchover --to` is requested four times while a standby's replication connection
//! is cut: its walsender is terminated where it is served (`pg_terminate_backend` on
//! `pg_stat_replication`) or its walreceiver gets SIGTERM (pid from `pg_stat_wal_receiver`);
//! postgres restarts the receiver by itself (at once after the first failure, then only
//! `wal_retrieve_retry_interval` = 5 s after the previous one).
//!
//! 1. the *other* standby blips from the request until the outcome is known (every 40 ms; the
//!    second cut as soon as the receiver is back after the first, so that it stays down);
//! 2. the *target* blips, the same way;
//! 3. the *target* blips from the controller's `Demote` action on (the old primary's CHECKPOINT,
//!    then its fast stop): meanwhile only the other standby acknowledges;
//! 4. as 3, and the other standby's *agent* is slow (SIGSTOP at the `Demote` action, at most
//!    2.5 s; its postgres keeps streaming and acknowledging): its last report stays fresh (3 s).
//!
//! Each switchover must complete (target primary, old primary rejoined as its replica) or be
//! refused/abandoned with a reason the CLI or the controller's events name; a watcher asks every
//! node `pg_is_in_recovery()` all along and no two nodes may accept writes at once; at the end
//! every acknowledged row must be on the final primary. A failure names the lost rows with their
//! WAL positions and times, which node still holds them, and keeps the logs in
//! `target/test-output/local_switchover_blip/`.

mod local_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use local_support::{Cluster, LsnWriteLoad, PGRS, PrimaryWatch, Session, Write, now_ms, wall_ms};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgrs::local::chaos::{WriteRecord, missing_acknowledged, prepare_table, unavailability};
use tokio_postgres::NoTls;

/// How often the blipper tries to cut the victim's replication connection.
const BLIP_EVERY: Duration = Duration::from_millis(40);

/// SIGTERM to the WAL receiver of the standby behind `session`, if one runs (checked against
/// /proc: the pid is a walreceiver's, not a reused one).
async fn kill_walreceiver(session: &mut Session) -> bool {
    let rows = session.rows("SELECT pid FROM pg_stat_wal_receiver", &[]);
    let Some(pid) = rows.await.and_then(|r| r.first().and_then(|r| r.get(0))) else {
        return false;
    };
    let pid: i32 = pid;
    let is_receiver = std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("walreceiver"));
    is_receiver && kill(Pid::from_raw(pid), Signal::SIGTERM).is_ok()
}

/// Terminates the walsenders serving `victim` on the node behind `session`; how many.
async fn terminate_walsenders(session: &mut Session, victim: &str) -> usize {
    let sql = "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
               FROM pg_stat_replication WHERE application_name = $1";
    let rows = session.rows(sql, &[&victim]).await;
    rows.and_then(|r| r.first().map(|r| r.get::<_, i64>(0)))
        .unwrap_or(0) as usize
}

#[derive(Debug, Default, Clone)]
struct Blips {
    walsenders_terminated: usize,
    walreceivers_killed: usize,
    /// When each blip was done, from the switchover request.
    at_ms: Vec<u128>,
}

impl Blips {
    fn total(&self) -> usize {
        self.walsenders_terminated + self.walreceivers_killed
    }
}

/// Cuts `victim`'s replication connection while `armed`, every [`BLIP_EVERY`] (every 3 ms after
/// the first cut until the second), until stopped; alternately the walsender first and the
/// walreceiver first.
struct Blipper {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Blips>,
}

impl Blipper {
    /// Returns, with the origin of the blip times, once the blipper's sessions are open.
    async fn start(cluster: &Cluster, victim: &str, armed: Arc<AtomicBool>) -> (Blipper, Instant) {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let (origin_tx, origin_rx) = tokio::sync::oneshot::channel::<Instant>();
        let mut receiver = Session::new(cluster.node_conninfo(victim));
        let config = cluster.layout().read_config().expect("config");
        let mut senders: Vec<Session> = (config.nodes.iter())
            .filter(|n| n.name != victim)
            .map(|n| Session::new(cluster.node_conninfo(&n.name)))
            .collect();
        let (victim, flag) = (victim.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let mut blips = Blips::default();
            // Sessions first, so that a blip is not a handshake late.
            let _ = receiver.rows("SELECT 1", &[]).await;
            for session in senders.iter_mut() {
                let _ = session.rows("SELECT 1", &[]).await;
            }
            let _ = ready_tx.send(());
            let origin = origin_rx.await.expect("origin");
            let mut round = 1usize;
            while !flag.load(Ordering::SeqCst) {
                if !armed.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                let receiver_first = round.is_multiple_of(2);
                round += 1;
                let mut done = receiver_first && kill_walreceiver(&mut receiver).await;
                blips.walreceivers_killed += usize::from(done);
                for session in senders.iter_mut() {
                    if !done {
                        let n = terminate_walsenders(session, &victim).await;
                        blips.walsenders_terminated += n;
                        done = n > 0;
                    }
                }
                if !done && !receiver_first && kill_walreceiver(&mut receiver).await {
                    blips.walreceivers_killed += 1;
                    done = true;
                }
                if done {
                    blips.at_ms.push(origin.elapsed().as_millis());
                }
                // The first cut's receiver comes back at once: cut it again as soon as it does.
                let first = blips.total() == 1;
                tokio::time::sleep(if first {
                    Duration::from_millis(3)
                } else {
                    BLIP_EVERY
                })
                .await;
            }
            blips
        });
        ready_rx.await.expect("blipper sessions");
        let origin = Instant::now();
        origin_tx.send(origin).expect("blipper running");
        (Blipper { stop, task }, origin)
    }

    async fn stop(self) -> Blips {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("blipper task")
    }
}

/// When the cuts come (see the phases above).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Aim {
    AtRequest,
    OnDemote,
}

/// Sets `armed` once `events.jsonl` holds the action `Demote` from `since_ms` on; first, when
/// `freeze` names an agent's pid, stops that agent (SIGSTOP) for at most 2.5 s: a slow agent
/// whose last report stays fresh (3 s) while its postgres keeps streaming and acknowledging.
fn arm_on_demote(cluster: &Cluster, since_ms: i64, armed: Arc<AtomicBool>, freeze: Option<i32>) {
    let path = cluster.dir.join("events.jsonl");
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !armed.load(Ordering::SeqCst) {
            let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
            let accepted = (text.lines())
                .filter(|l| l.contains("Demote {"))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|e| wall_ms(&e["at"]) >= since_ms - 50);
            if accepted && let Some(pid) = freeze {
                kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP");
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
                });
            }
            armed.store(accepted, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
}

/// SIGCONT to an agent when dropped (the agent may have been stopped by [`arm_on_demote`]).
struct Thaw(Option<i32>);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
        }
    }
}

#[derive(Debug)]
enum Outcome {
    /// The CLI reported the switchover done (its own line).
    Completed { cli: String },
    /// The CLI refused it (its error).
    Refused { reason: String },
    /// The controller abandoned it after accepting it; `primary` serves instead.
    Abandoned { reason: String, primary: String },
}

struct Phase {
    label: &'static str,
    from: String,
    target: String,
    victim: String,
    outcome: Outcome,
    /// From the request until the outcome was known.
    took: Duration,
    blips: Blips,
    origin: Instant,
    origin_ms: i64,
    end: Instant,
}

impl Phase {
    /// Whether the victim's replication was cut at least once (a refused request counts: it
    /// was refused because of the cut).
    fn cut_something(&self) -> bool {
        self.blips.total() > 0 || matches!(self.outcome, Outcome::Refused { .. })
    }
}

/// The first `SwitchoverAbandoned` event since `since_ms`, once some primary serves again.
async fn abandonment(cluster: &Cluster, since_ms: i64) -> (String, String) {
    loop {
        let abandoned = cluster
            .events()
            .into_iter()
            .find(|e| e["reason"] == "SwitchoverAbandoned" && wall_ms(&e["at"]) >= since_ms - 50);
        if let Some(event) = abandoned
            && let Ok(status) = pgrs::local::cli::cluster_status(&cluster.dir).await
            && let Some(primary) = status.primary
        {
            let reason = event["message"].as_str().unwrap_or_default().to_string();
            return (reason, primary);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status once the controller has seen a healthy cluster with both standbys in the quorum
/// for 800 ms on end (a switchover to a standby that just reconnected would be refused), or the
/// last one after `timeout`.
async fn steady(cluster: &Cluster, timeout: Duration) -> pgrs::local::status::LocalStatus {
    let (started, mut since) = (Instant::now(), Instant::now());
    loop {
        let status = cluster.status().await;
        let quorum = (status.nodes.iter())
            .filter(|n| n.sync_state.as_deref() == Some("quorum"))
            .count();
        if !pgrs::local::cli::is_healthy(&status) || quorum < 2 {
            since = Instant::now();
        }
        if since.elapsed() >= Duration::from_millis(800) || started.elapsed() > timeout {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One switchover to `target` while `victim`'s replication connection is cut as `aim` says;
/// checks the outcome and waits for the cluster to heal (every replica streaming from one
/// primary, both standbys in its quorum): `Err` when it does not within 30 s.
async fn switchover_while_blipping(
    cluster: &Cluster,
    label: &'static str,
    target: &str,
    victim: &str,
    aim: Aim,
    freeze: Option<&str>,
) -> (Phase, Result<(), String>) {
    let before = steady(cluster, Duration::from_secs(20)).await;
    let from = before.primary.clone().expect("primary");
    let armed = Arc::new(AtomicBool::new(aim == Aim::AtRequest));
    let (blipper, origin) = Blipper::start(cluster, victim, armed.clone()).await;
    let origin_ms = now_ms();
    let agent_pid = |node| pgrs::local::layout::read_pid(&cluster.layout().agent_pid(node));
    let thaw = Thaw(freeze.map(|node| agent_pid(node).expect("agent pid")));
    match aim {
        Aim::AtRequest => {}
        Aim::OnDemote => arm_on_demote(cluster, origin_ms, armed.clone(), thaw.0),
    }
    let child = tokio::process::Command::new(PGRS)
        .args(["local", "switchover", "--dir", &cluster.dir_text()])
        .args(["--to", target, "--wait-secs", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run pgrs local switchover");
    let outcome = tokio::select! {
        output = child.wait_with_output() => {
            let output = output.expect("pgrs local switchover");
            let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_string();
            if output.status.success() {
                Outcome::Completed { cli: text(&output.stdout) }
            } else {
                Outcome::Refused { reason: text(&output.stderr) }
            }
        }
        (reason, primary) = abandonment(cluster, origin_ms) => {
            Outcome::Abandoned { reason, primary }
        }
    };
    let took = origin.elapsed();
    // Ends `arm_on_demote`'s watch (a refused request has no Demote), then thaws the agent.
    armed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(thaw);
    let blips = blipper.stop().await;
    let end = Instant::now();
    eprintln!(
        "[{label}] {from} -> {target}, {victim} cut: {outcome:?} after {} ms; blips at {:?} ms; \
         events:\n{}",
        took.as_millis(),
        blips.at_ms,
        cluster.events_since(origin_ms)
    );
    if blips.total() == 0 && !matches!(outcome, Outcome::Refused { .. }) {
        eprintln!("[{label}] no blip: {victim} had nothing to cut");
    }

    let after = cluster.wait_healthy(Duration::from_secs(30)).await;
    cluster.assert_single_primary().await;
    let primary = after.primary.clone().expect("primary after the switchover");
    let abandoned = cluster
        .events()
        .into_iter()
        .any(|e| e["reason"] == "SwitchoverAbandoned" && wall_ms(&e["at"]) >= origin_ms - 50);
    let old = after.nodes.iter().find(|n| n.name == from).expect("node");
    match &outcome {
        Outcome::Completed { cli } => {
            let done = format!("switched over from {from} to {target}");
            assert!(cli.contains(&done), "[{label}] CLI said: {cli}");
            assert_eq!(primary, target, "[{label}] completed, yet {primary} serves");
            assert_eq!(old.role.as_deref(), Some("replica"), "[{label}] {old:?}");
            assert_eq!(old.upstream.as_deref(), Some(target), "[{label}] {old:?}");
        }
        Outcome::Refused { reason } => {
            assert!(
                !reason.is_empty() && (!reason.contains("did not complete within") || abandoned),
                "[{label}] neither completed nor refused with a reason: {reason:?}\n{}",
                cluster.controller_log_tail()
            );
            if !abandoned {
                assert_eq!(primary, from, "[{label}] refused, yet the primary changed");
            }
        }
        Outcome::Abandoned { reason, primary: p } => {
            assert!(reason.contains("abandoned"), "[{label}] {reason}");
            assert_eq!(&primary, p, "[{label}] the primary changed again");
            if primary != from {
                assert_eq!(old.upstream.as_deref(), Some(p.as_str()), "{old:?}");
            }
        }
    }
    let healed = cluster.try_wait_quorum(2, Duration::from_secs(30)).await;
    let phase = Phase {
        label,
        from,
        target: target.to_string(),
        victim: victim.to_string(),
        outcome,
        took,
        blips,
        origin,
        origin_ms,
        end,
    };
    (phase, healed)
}

/// Where a lost write sits: its WAL position and times from the request of the phase it fell in.
fn describe_write(write: &Write, phases: &[Phase]) -> String {
    let record = &write.record;
    let lsn = write.lsn.as_deref().unwrap_or("?");
    let Some(p) = phases.iter().rev().find(|p| p.origin <= record.started) else {
        return format!("  id {} at {lsn}: before the first switchover", record.id);
    };
    let ms = |at: Instant| at.saturating_duration_since(p.origin).as_millis();
    format!(
        "  id {} at {lsn}: [{}] sent +{} ms, acknowledged +{} ms after the request",
        record.id,
        p.label,
        ms(record.started),
        ms(record.finished)
    )
}

/// Which node still holds which of the `missing` rows, and its WAL positions and timeline.
async fn where_are(cluster: &Cluster, nodes: &[String], missing: &[i64]) -> String {
    let sql = "SELECT (SELECT array_agg(id ORDER BY id) FROM pgrs_chaos WHERE id = ANY($1)), \
               pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, \
               pg_last_wal_replay_lsn()::text, (SELECT timeline_id FROM pg_control_checkpoint())";
    let mut lines = Vec::new();
    for node in nodes {
        let rows = Session::new(cluster.node_conninfo(node))
            .rows(sql, &[&missing])
            .await;
        let line = match rows.as_ref().and_then(|r| r.first()) {
            Some(r) => format!(
                "  {node}: holds {:?}; in recovery {}; received {:?}, replayed {:?}; \
                 checkpoint TL {}",
                r.get::<_, Option<Vec<i64>>>(0),
                r.get::<_, bool>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, i32>(4)
            ),
            None => format!("  {node}: no answer"),
        };
        lines.push(line);
    }
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_switchover_while_a_wal_receiver_blips_loses_no_acknowledged_write() {
    let test_started = Instant::now();
    let cluster = Cluster::up(2, &["--sync"]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    assert!(status.sync, "the cluster does not run in sync mode");
    cluster.wait_quorum(2, Duration::from_secs(20)).await;
    let nodes: Vec<String> = status.nodes.iter().map(|n| n.name.clone()).collect();
    prepare_table(&cluster.write_conninfo())
        .await
        .expect("table");
    // Four clients; each commit waits for a standby's flush.
    let writers = LsnWriteLoad::start(cluster.write_conninfo(), 4);
    let warm = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        writers.acknowledged_since(warm) >= 4,
        "no write got through"
    );
    let watch = PrimaryWatch::start(&cluster, &nodes);

    // (label, whether the target itself is cut, when, whether the other standby's agent is
    // slow); the target is a standby of the moment.
    let plans = [
        ("other standby blips", false, Aim::AtRequest, false),
        ("target blips", true, Aim::AtRequest, false),
        ("target cut once demoting", true, Aim::OnDemote, false),
        (
            "target cut once demoting, other agent slow",
            true,
            Aim::OnDemote,
            true,
        ),
    ];
    let (mut phases, mut unhealed) = (Vec::new(), None);
    for (i, (label, target_blips, aim, slow_other)) in plans.into_iter().enumerate() {
        let mut attempt = 0;
        let (phase, healed) = loop {
            let status = cluster.wait_healthy(Duration::from_secs(30)).await;
            let primary = status.primary.clone().expect("primary");
            let mut standbys: Vec<String> =
                nodes.iter().filter(|n| **n != primary).cloned().collect();
            standbys.rotate_left(i % 2);
            let victim = &standbys[usize::from(!target_blips)];
            let frozen = slow_other.then_some(standbys[1].as_str());
            let (phase, healed) =
                switchover_while_blipping(&cluster, label, &standbys[0], victim, aim, frozen).await;
            attempt += 1;
            // A switchover over before the victim had anything to cut tested nothing: once
            // more (a loaded machine shifts the timing either way).
            if phase.cut_something() || healed.is_err() || attempt == 2 {
                break (phase, healed);
            }
            phases.push(phase);
        };
        assert!(
            phase.cut_something() || healed.is_err(),
            "[{label}] no blip in two attempts: the victim had nothing to cut"
        );
        phases.push(phase);
        if let Err(error) = healed {
            // Check the rows before failing on this: a lost row is the bigger finding.
            unhealed = Some(format!("after [{label}]: {error}"));
            break;
        }
    }

    let resumed = Instant::now();
    while writers.acknowledged_since(resumed) < 4 && resumed.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resumed = writers.acknowledged_since(resumed) >= 4;
    let (samples, violations) = watch.stop().await;
    let writes = writers.stop().await;
    let records: Vec<WriteRecord> = writes.iter().map(|w| w.record).collect();
    let acknowledged: Vec<i64> = (records.iter())
        .filter(|r| r.acknowledged)
        .map(|r| r.id)
        .collect();
    let status = cluster.status().await;
    let (client, connection) = tokio_postgres::connect(&cluster.write_conninfo(), NoTls)
        .await
        .expect("connect through the write endpoint");
    tokio::spawn(connection);
    let sql = "SELECT count(*), pg_is_in_recovery(), current_setting('cluster_name') \
               FROM pgrs_chaos";
    let row = client.query_one(sql, &[]).await.expect("count rows");
    let (rows_present, in_recovery, served_by): (i64, bool, String) =
        (row.get(0), row.get(1), row.get(2));
    assert!(!in_recovery, "the write endpoint leads to a standby");
    assert_eq!(
        Some(&served_by),
        status.primary.as_ref(),
        "endpoint vs status"
    );
    let missing = missing_acknowledged(&cluster.write_conninfo(), &acknowledged)
        .await
        .expect("check acknowledged writes");

    for p in &phases {
        let acked = (records.iter())
            .filter(|r| r.acknowledged && r.finished >= p.origin && r.finished <= p.end)
            .count();
        let gap = unavailability(&records, p.origin, p.end + Duration::from_secs(2));
        eprintln!(
            "FIGURES [{}] {} -> {} ({} cut): {:?}; took {} ms; blips {} ({} walsender \
             terminations, {} walreceiver SIGTERMs) at {:?} ms; {acked} writes acknowledged in \
             the window; longest gap between acknowledgements {:?} ms",
            p.label,
            p.from,
            p.target,
            p.victim,
            p.outcome,
            p.took.as_millis(),
            p.blips.total(),
            p.blips.walsenders_terminated,
            p.blips.walreceivers_killed,
            p.blips.at_ms,
            gap.map(|g| g.as_millis())
        );
    }
    eprintln!(
        "FIGURES total: {} writes acknowledged ({} attempted), {rows_present} rows on the final \
         primary {served_by}, {} acknowledged missing; {samples} single-primary samples, {} \
         violations; healed: {}; wall time {} ms",
        acknowledged.len(),
        records.len(),
        missing.len(),
        violations.len(),
        unhealed.as_deref().unwrap_or("yes"),
        test_started.elapsed().as_millis()
    );

    let since = phases[0].origin_ms;
    assert!(
        violations.is_empty(),
        "two nodes accepted writes at once: {violations:?}\n{}",
        cluster.events_since(since)
    );
    assert!(
        acknowledged.len() > 100,
        "too few writes: {}",
        acknowledged.len()
    );
    if !missing.is_empty() {
        let lost: Vec<String> = (writes.iter())
            .filter(|w| missing.contains(&w.record.id))
            .map(|w| describe_write(w, &phases))
            .collect();
        panic!(
            "{} acknowledged writes lost in sync mode:\n{}\nnodes now:\n{}\nlogs kept in {}\n\
             events:\n{}",
            missing.len(),
            lost.join("\n"),
            where_are(&cluster, &nodes, &missing).await,
            cluster.keep_logs("local_switchover_blip").display(),
            cluster.events_since(since)
        );
    }
    if let Some(unhealed) = unhealed {
        let kept = cluster.keep_logs("local_switchover_blip");
        panic!(
            "the cluster did not heal {unhealed}\nlogs kept in {}",
            kept.display()
        );
    }
    assert!(resumed, "writes did not resume after the switchovers");
    assert!(
        rows_present >= acknowledged.len() as i64,
        "fewer rows than acknowledged writes"
    );
}
