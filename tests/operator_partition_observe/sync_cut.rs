//! Scenario 3: sync mode, the primary cut from both replicas only; commits must block. Then a
//! forced failover (the primary also cut from the API server: it fences itself while its
//! clients still reach it), heal, rejoin: nothing acknowledged may be lost.
//!
//! Why "no write sent after the cut is complete is acknowledged while it lasts" is the exact
//! claim: with `ANY 1 (<both replicas>)` a commit is acknowledged once a replica reported
//! flushing its commit record. Once both cuts are in place (`cut_done`) no WAL reaches a
//! replica and no report comes back, and the commit record of a write sent after `cut_done`
//! is written after it; so no such write can be acknowledged until the primary reaches a
//! replica again, which it never does as primary (it is fenced and rejoins as a replica).
//! Writes sent before `cut_done` may still be acknowledged (a replica cut second may have
//! flushed them); the writers give up on an INSERT after 1 s, so those acknowledgements
//! arrive by `cut_done + 1 s` (the grace).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use pgrs::api::{PgReplicaSetStatus, Phase, condition};
use pgrs::chaos::{FinalState, WriteOutcome, WriteRecord, check};
use pgrs_testbed::faults::{Direction, Peer};

use crate::operator_report::{Report, Step};
use crate::operator_support::connect;
use crate::writers::{ANSWER_TIMEOUT, Healer};
use crate::{Cluster, LEASE_SECONDS, acks_between, count_outcome, ms};

/// How long the primary stays cut from its replicas alone.
const BLOCK_HOLD: Duration = Duration::from_secs(10);
/// Writing goes on this long after the status names the new primary, before the heal.
const WRITE_AFTER_FAILOVER: Duration = Duration::from_secs(3);
const SYNC_REP_WAITERS: &str = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'";

/// What the status says about replication: `maxLag`, the `ReplicationHealthy` condition and
/// each standby's sync state and lag.
fn replication_shown(status: &PgReplicaSetStatus) -> String {
    let replication = status
        .conditions
        .iter()
        .find(|c| c.type_ == condition::REPLICATION_HEALTHY)
        .map(|c| format!("{} ({})", c.status, c.message));
    let standbys: Vec<String> = status
        .instances
        .iter()
        .filter(|i| status.current_primary.as_deref() != Some(i.name.as_str()))
        .map(|i| {
            format!(
                "{} {:?} lag {:?} B / {:?} s",
                i.name, i.sync_state, i.lag_bytes, i.lag_seconds
            )
        })
        .collect();
    format!(
        "maxLag {:?}, ReplicationHealthy {}, standbys {standbys:?}",
        status.max_lag,
        replication.unwrap_or_default()
    )
}

pub async fn run() {
    let test = "partition-sync";
    let mut c = Cluster::start("op-part-sync", test, "examples/sync.yaml", "pg-sync", true).await;
    let old = c.primary.clone();
    let replicas: Vec<(String, Ipv4Addr)> = c
        .ips
        .iter()
        .filter(|(pod, _)| **pod != old)
        .map(|(pod, ip)| (pod.clone(), ip.parse().expect("a pod IP")))
        .collect();
    // A session of the test's own on the primary: the host still reaches it during the cut.
    let monitor = connect(&c.ips[&old], &c.password)
        .await
        .expect("connect to the primary");
    let applied: String = monitor
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .expect("read synchronous_standby_names")
        .get(0);
    let net = c
        .bed
        .pod_net(&c.ns, &old)
        .expect("the primary's network namespace");
    let healer = Healer(net.clone());
    let fault_wall = k8s_openapi::jiff::Timestamp::now();
    let cut_at = c.now();
    for (_, ip) in &replicas {
        net.cut(Peer::Ip(*ip), Direction::Both)
            .expect("cut a replica");
    }
    let cut_done = c.now();
    eprintln!(
        "cut {old} from {replicas:?} at {}–{} ms (synchronous_standby_names = {applied})",
        ms(cut_at),
        ms(cut_done)
    );

    // The primary alone with its clients, the operator and the API server.
    let mut holders = BTreeSet::new();
    let mut named = BTreeSet::new();
    let mut phases = BTreeSet::new();
    let mut most_waiting = 0i64;
    let mut block_status = None;
    while c.now() < cut_done + BLOCK_HOLD {
        if let Ok((holder, _)) = c.lease().await {
            holders.insert(holder);
        }
        if let Ok(status) = c.status().await {
            named.insert(status.current_primary.clone());
            phases.extend(status.phase.map(|p| format!("{p:?}")));
            block_status = Some(status);
        }
        let waiting = tokio::time::timeout(
            Duration::from_secs(2),
            monitor.query_one(SYNC_REP_WAITERS, &[]),
        )
        .await;
        if let Ok(Ok(row)) = waiting {
            most_waiting = most_waiting.max(row.get(0));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(monitor);

    // Force a failover: the primary also loses the API server, so it can no longer renew and
    // fences itself, while its writers still reach it.
    let force_at = c.now();
    net.cut(Peer::ApiServer, Direction::Both)
        .expect("cut the API server");
    eprintln!("cut {old} from the API server too at {} ms", ms(force_at));
    let mut detected = None;
    let new_primary = loop {
        let since = c.now() - force_at;
        assert!(
            since < Duration::from_secs(60),
            "no new primary 60 s after cutting {old} from the API server"
        );
        let status = c.status().await.unwrap_or_default();
        if detected.is_none() && !matches!(status.phase, Some(Phase::Healthy | Phase::Degraded)) {
            detected = Some(since);
        }
        if let Some(current) = status.current_primary
            && current != old
        {
            break current;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let promoted_at = c.now();
    eprintln!(
        "status names {new_primary} primary {} ms after the forced failover",
        ms(promoted_at - force_at)
    );
    tokio::time::sleep(WRITE_AFTER_FAILOVER).await;
    let healed_at = c.now();
    drop(healer);
    let status = c.wait_back(&old, false, Duration::from_secs(180)).await;
    let rejoined_at = c.now();
    let final_primary = status
        .current_primary
        .clone()
        .expect("status.currentPrimary");
    let (writes, ids) = c.finish(&final_primary).await;
    let report = check(
        &writes,
        &FinalState {
            primary: final_primary.clone(),
            ids: ids.clone(),
        },
        &[],
    );
    eprintln!("{}", report.to_markdown());

    // Figures, on the writers' clock.
    let old_acks: Vec<&WriteRecord> = writes
        .iter()
        .filter(|w| w.node == old && w.outcome == WriteOutcome::Acknowledged)
        .collect();
    let during = acks_between(&writes, &old, cut_at, force_at);
    let sent_after_cut: Vec<&&WriteRecord> =
        old_acks.iter().filter(|w| w.sent >= cut_done).collect();
    let after_grace: Vec<&&WriteRecord> = old_acks
        .iter()
        .filter(|w| w.answered > cut_done + ANSWER_TIMEOUT)
        .collect();
    let blocked = count_outcome(
        &writes,
        &old,
        WriteOutcome::Indeterminate,
        cut_done,
        force_at,
    );
    let blocked_present = writes
        .iter()
        .filter(|w| w.node == old && w.outcome == WriteOutcome::Indeterminate)
        .filter(|w| w.sent >= cut_done && ids.contains(&w.id))
        .count();
    let old_last = old_acks.iter().map(|w| w.answered).max();
    let new_first = acks_between(&writes, &new_primary, force_at, rejoined_at)
        .first()
        .copied();
    let since = |at: Duration| at.saturating_sub(cut_at);
    let figures = vec![
        format!(
            "Cut from both replicas for {} ms (`synchronous_standby_names` = `{applied}`): \
             `{old}` acknowledged {} writes, all sent before the cut was complete (the last \
             {} ms after the cut began); {} writes timed out (blocked), up to {most_waiting} \
             backends waited in `SyncRep`; acknowledged writes sent after the cut: {}, \
             acknowledged later than 1 s after it: {}.",
            ms(force_at - cut_done),
            during.len(),
            old_last.map_or("—".to_string(), |at| ms(since(at)).to_string()),
            blocked,
            sent_after_cut.len(),
            after_grace.len()
        ),
        format!(
            "During the cut: Lease holders {holders:?}, `currentPrimary` {named:?}, phases \
             {phases:?}; at its end {}.",
            block_status
                .as_ref()
                .map_or("no status".to_string(), replication_shown)
        ),
        format!(
            "Failover forced (API server cut too) at {} ms: `{new_primary}` named primary {} \
             ms later, its first acknowledged write {:?} ms after the force; healed {} ms \
             after the force, `{old}` back as a replica {} ms after the heal.",
            ms(since(force_at)),
            ms(promoted_at - force_at),
            new_first.map(|at| ms(at.saturating_sub(force_at))),
            ms(healed_at - force_at),
            ms(rejoined_at - healed_at)
        ),
        format!(
            "Checker: {} split-brain writes, {} acknowledged writes lost of {}; blocked commits \
             on the final primary: {blocked_present}.",
            report.split_brain.len(),
            report.lost.len(),
            report.acknowledged
        ),
    ];
    for line in &figures {
        eprintln!("{line}");
    }
    let mut notes = figures.clone();
    notes.push(report.to_markdown());
    Report {
        test,
        scenario: "sync mode (ANY 1), the primary cut from both replicas, then also from the \
                   API server",
        lease_seconds: LEASE_SECONDS,
        steps: vec![
            Step {
                name: "cut complete",
                after: Some(since(cut_done)),
                how: "both replicas cut, both directions",
            },
            Step {
                name: "old primary's last acknowledged write",
                after: old_last.map(since),
                how: "last INSERT acknowledged by the old primary (writer to its pod IP)",
            },
            Step {
                name: "failover forced",
                after: Some(since(force_at)),
                how: "the old primary also cut from the API server",
            },
            Step::detected(detected.map(|d| since(force_at + d))),
            Step::promoted(Some(since(promoted_at))),
            Step {
                name: "new primary's first acknowledged write",
                after: new_first.map(since),
                how: "first INSERT acknowledged by the new primary (writer to its pod IP)",
            },
            Step {
                name: "healed",
                after: Some(since(healed_at)),
                how: "every cut removed",
            },
            Step {
                name: "old primary rejoined",
                after: Some(since(rejoined_at)),
                how: "Healthy, 3/3 ready, the old primary a ready replica",
            },
        ],
        write_unavailable: report.longest_gap.map(|g| g.length()),
        write_how: "longest gap between acknowledged writes (any pod), from the checker",
        record: status.last_failover.clone(),
        fault_at: fault_wall,
        notes,
    }
    .write();

    // Before the forced failover: the same holder, and commits blocked rather than
    // acknowledged without a standby.
    assert_eq!(
        holders,
        BTreeSet::from([Some(old.clone())]),
        "the Lease changed hands while only the replicas were cut"
    );
    assert!(
        named.iter().flatten().all(|p| *p == old),
        "another primary was named before the forced failover: {named:?}"
    );
    assert!(
        sent_after_cut.is_empty(),
        "{old} acknowledged writes sent after it was cut from both replicas: {sent_after_cut:#?}"
    );
    assert!(
        after_grace.is_empty(),
        "{old} acknowledged writes more than 1 s after the cut: {after_grace:#?}"
    );
    assert!(
        blocked >= 3 && most_waiting >= 1,
        "commits did not block: {blocked} timed out, {most_waiting} waited in SyncRep"
    );
    // The failover: a replica, every acknowledged write kept, no split brain.
    assert_ne!(new_primary, old);
    assert!(
        new_first.is_some(),
        "the new primary acknowledged no write (is its standby synchronous?)"
    );
    assert_eq!(
        final_primary, new_primary,
        "the new primary stays primary after the rejoin"
    );
    let violations = report.violations(true);
    assert!(violations.is_empty(), "checker violations: {violations:?}");
}
