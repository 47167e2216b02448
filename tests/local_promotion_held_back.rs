//! Issue 12 ("a promotion is fenced from its signal"), on real processes: a planned switchover
//! whose target cannot finish its promotion because replay is held back by a conflicting
//! standby query (`max_standby_streaming_delay = -1` on the target, a transaction reading a table
//! the primary then drops: the startup process waits for the AccessExclusiveLock forever, and
//! `pg_promote` only takes effect once replay reaches the end of the WAL). While the promotion is
//! held back, the local controller — and with it the lease service — is SIGKILLed. Then:
//!
//! * `a_held_back_promotion_finished_after_the_controller_died_is_fenced_by_its_deadline`: the
//!   conflicting transaction ends 1 s after the kill, the target finishes its promotion with
//!   nobody left to renew the lease with, and accepts writes until its keeper (or its watchdog)
//!   stops it;
//! * `a_held_back_promotion_whose_conflict_is_kept_is_fenced_without_ever_serving`: the
//!   transaction stays open; the target never leaves recovery, and its keeper fences it anyway
//!   (it is a primary for fencing from the signal on).
//!
//! The two tests run one after the other (a lock), each on its own 3-node async cluster with the
//! default timings; together about 40 s. After a controller crash nothing elects a new primary
//! (the lease service died with it): this test is about safety, not about recovering from that.
//!
//! Every ~100 ms the test opens fresh connections to all three nodes (`pg_is_in_recovery()`, and
//! an INSERT where it is false) and reads the persisted lease (`lease.json`, written before every
//! answer of the lease service) before and after. Asserted on every sample: never two writable
//! nodes; a writable node is the lease holder (a keeper that renews: the lease's version moves
//! while the controller lives); after the kill, nothing is writable (nor, for the target, up at
//! all) later than renew deadline + shutdown budget (5 s + 2 s) after the last lease write, which
//! is no earlier than the start of the last successful renewal the deadline counts from.

mod local_support;
#[path = "local_promotion_held_back/sampler.rs"]
mod sampler;
#[path = "local_promotion_held_back/verdict.rs"]
mod verdict;

use std::time::{Duration, Instant};

use local_support::{Cluster, now_ms};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgrs::protocol::api::{AgentStatus, Role};
use pgrs::protocol::client::AgentClient;
use sampler::*;
use tokio_postgres::NoTls;
use verdict::*;

/// Default timings: renew deadline 5 s + shutdown budget 2 s.
const RENEW_DEADLINE_PLUS_SHUTDOWN_MS: i64 = 5000 + 2000;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Both tests start a 3-node cluster; on a 2-core machine they run one after the other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Marks {
    /// The switchover was requested.
    requested: i64,
    /// The target's agent was first seen with the promotion signalled and still in recovery.
    held: i64,
    /// The controller was SIGKILLed.
    killed: i64,
    /// The conflicting transaction ended (`None`: kept until the target was fenced).
    released: Option<i64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Conflict {
    ReleasedAfterTheKill,
    KeptUntilFenced,
}

async fn run(name: &str, conflict: Conflict) {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::up(2, &[]);
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    let old = status.primary.clone().expect("primary");
    let names: Vec<String> = status.nodes.iter().map(|n| n.name.clone()).collect();
    let target = names.iter().find(|n| **n != old).expect("replica").clone();
    let third = names
        .iter()
        .find(|n| **n != old && **n != target)
        .expect("second replica")
        .clone();
    let target_agent = cluster.agent_client(&target);

    // The probe table (replicated everywhere) and the table the conflict is about.
    let primary = connect(&cluster.node_conninfo(&old)).await;
    primary
        .batch_execute(
            "CREATE TABLE held_back_probe (node text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
             CREATE TABLE held_back_conflict AS SELECT g AS id FROM generate_series(1, 1000) g;",
        )
        .await
        .expect("create tables");

    // The target waits forever for conflicting standby queries instead of cancelling them.
    let standby = connect(&cluster.node_conninfo(&target)).await;
    standby
        .batch_execute("ALTER SYSTEM SET max_standby_streaming_delay = -1")
        .await
        .expect("ALTER SYSTEM on the target");
    // A statement of its own: a multi-statement query is one implicit transaction, and ALTER
    // SYSTEM refuses to run inside one.
    standby
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload the target's configuration");
    let target_conninfo = cluster.node_conninfo(&target);
    wait_for(
        "the target's reload of max_standby_streaming_delay and replay of the tables",
        Duration::from_secs(10),
        &cluster,
        || {
            let conninfo = target_conninfo.clone();
            async move {
                let client = connect(&conninfo).await;
                let delay = client
                    .query_one("SHOW max_standby_streaming_delay", &[])
                    .await
                    .map(|r| r.get::<_, String>(0))
                    .unwrap_or_default();
                let replayed = client
                    .query_one("SELECT count(*) FROM held_back_conflict", &[])
                    .await
                    .is_ok();
                delay == "-1" && replayed
            }
        },
    )
    .await;
    // The conflicting query: an open transaction holding AccessShareLock on the table.
    let blocker = connect(&cluster.node_conninfo(&target)).await;
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM held_back_conflict;")
        .await
        .expect("open the conflicting transaction");
    primary
        .batch_execute("DROP TABLE held_back_conflict")
        .await
        .expect("drop the table on the primary");
    drop(primary);
    // The startup process now waits for the AccessExclusiveLock: replay is held back.
    wait_for(
        "the target's replay waiting on the lock",
        Duration::from_secs(10),
        &cluster,
        || async {
            standby
                .query_one(
                    "SELECT coalesce(wait_event_type, '') FROM pg_stat_activity WHERE backend_type = 'startup'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, String>(0) == "Lock")
        },
    )
    .await;
    drop(standby);
    eprintln!("[{name}] {old} primary, {target} switchover target (replay held back), {third}");

    let (stop_sampling, stop) = tokio::sync::watch::channel(false);
    let sampler = start_sampler(
        &cluster,
        vec![old.clone(), target.clone(), third.clone()],
        cluster.agent_client(&target),
        stop,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let requested = now_ms();
    let switching = {
        let dir = cluster.dir.clone();
        let to = target.clone();
        tokio::spawn(async move {
            pgrs::local::cli::switchover(&dir, Some(to), Duration::from_secs(60)).await
        })
    };
    // Held back: the agent has signalled the promotion (intended primary) but postgres is still
    // in recovery.
    wait_for(
        "the target's promotion signal",
        Duration::from_secs(30),
        &cluster,
        || async {
            agent_view(&target_agent)
                .await
                .is_some_and(|a| a.intended_role == Role::Primary && a.in_recovery == Some(true))
        },
    )
    .await;
    let held = now_ms();
    assert_eq!(
        read_lease(&cluster).and_then(|l| l.holder).as_deref(),
        Some(target.as_str()),
        "the target promotes only as the lease holder"
    );
    // Let the keeper renew (every second) while the promotion is held back.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let still_held = agent_view(&target_agent).await;
    assert!(
        still_held
            .as_ref()
            .is_some_and(|a| a.in_recovery == Some(true)),
        "the promotion was not held back by the conflicting query: {still_held:?}"
    );

    let controller = cluster.layout().controller_pid().expect("controller pid");
    kill(Pid::from_raw(controller), Signal::SIGKILL).expect("SIGKILL the controller");
    let killed = now_ms();
    switching.abort();

    let released = match conflict {
        Conflict::ReleasedAfterTheKill => {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let at = now_ms();
            blocker
                .batch_execute("COMMIT")
                .await
                .expect("end the conflicting transaction");
            Some(at)
        }
        Conflict::KeptUntilFenced => None,
    };
    // Watch well past renew deadline + shutdown budget after the kill.
    let watch_until = killed + 11_000;
    while now_ms() < watch_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if conflict == Conflict::KeptUntilFenced {
        // The fence killed the transaction's backend with postgres.
        let ended = blocker.batch_execute("COMMIT").await;
        eprintln!("[{name}] the kept transaction after the fence: {ended:?}");
    }
    stop_sampling.send_replace(true);
    let ticks = sampler.await.expect("sampler");
    let marks = Marks {
        requested,
        held,
        killed,
        released,
    };
    let final_lease = read_lease(&cluster).expect("lease.json");
    let final_agent = agent_view(&target_agent).await;
    report(
        name,
        &cluster,
        &target,
        &ticks,
        &marks,
        &final_lease,
        &final_agent,
    );
    let out = cluster.keep_logs(&format!("local_promotion_held_back-{name}"));
    eprintln!("[{name}] logs kept in {}", out.display());
    check(
        name,
        &cluster,
        conflict,
        &target,
        &ticks,
        &marks,
        &final_lease,
        &final_agent,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_promotion_finished_after_the_controller_died_is_fenced_by_its_deadline() {
    run("released", Conflict::ReleasedAfterTheKill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_back_promotion_whose_conflict_is_kept_is_fenced_without_ever_serving() {
    run("kept", Conflict::KeptUntilFenced).await;
}
