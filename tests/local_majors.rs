//! The local-mode scenarios on every tested PostgreSQL major, inside one test run: for each of
//! `PGRS_TEST_PG_MAJORS` (default `15 17 18`; `PGRS_TEST_PG_MAJORS="14 16" cargo test --test
//! local_majors` for the others), a synchronous cluster of that major under a write load:
//!
//! 1. hard kill of the primary (agent and postgres, SIGKILL) → failover;
//! 2. the old primary started again → rejoins by pg_rewind;
//! 3. graceful stop of the new primary, its WAL removed while it is down → it rejoins by
//!    re-clone (pg_rewind cannot read the WAL back to the divergence);
//! 4. every acknowledged write is on the final primary (sync mode: none may be lost), every
//!    node runs that major;
//! 5. after `local down`, `local up` with binaries of another major is refused at once, naming
//!    both majors, and nothing is changed.
//!
//! 15 is Debian's `/usr/lib/postgresql/15/bin`; the others come from
//! `${PGRS_PG_CACHE:-/var/cache/pgrs-pg}/<major>/bin` (`scripts/install-pg-majors`, called by
//! `scripts/setup-debian` for 17 and 18). A missing major fails the test with that command.

mod local_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use local_support::{Cluster, pgrs};
use pgrs::local::chaos::{WriteLoad, missing_acknowledged, prepare_table};

const DEFAULT_MAJORS: &str = "15 17 18";

fn majors() -> Vec<u32> {
    let text = std::env::var("PGRS_TEST_PG_MAJORS").unwrap_or_else(|_| DEFAULT_MAJORS.into());
    text.split([' ', ','])
        .filter(|m| !m.is_empty())
        .map(|m| {
            m.parse()
                .unwrap_or_else(|_| panic!("PGRS_TEST_PG_MAJORS: {m:?}"))
        })
        .collect()
}

fn pg_bin(major: u32) -> PathBuf {
    let dir = if major == 15 {
        pgrs::postgres::version::debian_bin_dir(15)
    } else {
        let cache = std::env::var("PGRS_PG_CACHE").unwrap_or_else(|_| "/var/cache/pgrs-pg".into());
        PathBuf::from(cache).join(major.to_string()).join("bin")
    };
    assert!(
        dir.join("postgres").is_file(),
        "PostgreSQL {major} is not installed in {}: run `scripts/install-pg-majors {major}`",
        dir.display()
    );
    dir
}

/// Another tested major than `major`, for the refusal (any supported one that is installed).
fn other_major(major: u32) -> u32 {
    if major == 15 { 17 } else { 15 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_rejoin_reclone_and_sync_on_every_tested_major() {
    let mut figures = Vec::new();
    for major in majors() {
        let started = Instant::now();
        let lines = scenario(major).await;
        figures.push(format!(
            "PostgreSQL {major}: {} s ({lines})",
            started.elapsed().as_secs()
        ));
    }
    eprintln!("local_majors:\n  {}", figures.join("\n  "));
}

async fn scenario(major: u32) -> String {
    let bin = pg_bin(major);
    let bin_text = bin.display().to_string();
    let cluster = Cluster::up(2, &["--sync", "--pg-bin", &bin_text]);
    cluster.wait_healthy(Duration::from_secs(90)).await;
    cluster.wait_quorum(2, Duration::from_secs(30)).await;
    prepare_table(&cluster.write_conninfo())
        .await
        .expect("table");
    let load = WriteLoad::start(cluster.write_conninfo(), 1, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(700)).await;

    // 1. Hard kill of the primary.
    let first = cluster.status().await.primary.expect("primary");
    pgrs::local::cli::kill_node(&cluster.dir, &first, true).expect("hard kill");
    let killed = Instant::now();
    let second = cluster
        .wait_new_primary(&first, Duration::from_secs(45))
        .await;
    let failover_ms = killed.elapsed().as_millis();
    cluster.assert_single_primary().await;

    // 2. The old primary rejoins by pg_rewind.
    let rewind = cluster.restart(&first).await;
    assert_rejoined(&cluster, &first, "pg_rewind", major);
    cluster.wait_healthy(Duration::from_secs(90)).await;

    // 3. Graceful stop of the new primary; without its WAL it can only be re-cloned.
    cluster.wait_quorum(2, Duration::from_secs(30)).await;
    pgrs::local::cli::kill_node(&cluster.dir, &second, false).expect("graceful stop");
    cluster
        .wait_new_primary(&second, Duration::from_secs(45))
        .await;
    wait_agent_gone(&cluster, &second).await;
    let removed = remove_wal_segments(&cluster, &second);
    assert!(removed > 0, "{major}: no WAL segment of {second} to remove");
    let reclone = cluster.restart(&second).await;
    assert_rejoined(&cluster, &second, "re-clone", major);
    let status = cluster.wait_healthy(Duration::from_secs(90)).await;
    cluster.wait_quorum(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 4. No acknowledged write lost; every node runs `major`.
    let records = load.stop().await;
    let acknowledged: Vec<i64> = (records.iter())
        .filter(|r| r.acknowledged)
        .map(|r| r.id)
        .collect();
    assert!(
        acknowledged.len() > 50,
        "{major}: too few writes: {}",
        acknowledged.len()
    );
    let missing = missing_acknowledged(&cluster.write_conninfo(), &acknowledged)
        .await
        .expect("check");
    assert!(
        missing.is_empty(),
        "PostgreSQL {major}: acknowledged writes lost in sync mode: {missing:?}"
    );
    for node in &status.nodes {
        let running = server_major(&cluster, &node.name).await;
        assert_eq!(running, major, "{} runs PostgreSQL {running}", node.name);
    }

    // 5. The same cluster with another major's binaries is refused, and left as it was.
    let dir = cluster.dir_text();
    let output = pgrs(&["local", "down", "--dir", &dir]);
    assert!(output.status.success(), "{output:?}");
    let other = other_major(major);
    let other_bin = pg_bin(other).display().to_string();
    let refused_at = Instant::now();
    let output = pgrs(&[
        "local",
        "up",
        "--dir",
        &dir,
        "--replicas",
        "2",
        "--sync",
        "--pg-bin",
        &other_bin,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{major} → {other} was accepted");
    assert!(
        refused_at.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        refused_at.elapsed()
    );
    assert!(
        stderr.contains(&format!("holds a PostgreSQL {major} cluster"))
            && stderr.contains(&format!("are PostgreSQL {other}")),
        "{stderr}"
    );
    let config = cluster.layout().read_config().expect("config");
    assert_eq!(config.pg_bin, bin, "the recorded binaries changed");
    let version = std::fs::read_to_string(cluster.layout().data_dir(&first).join("PG_VERSION"));
    assert_eq!(version.expect("PG_VERSION").trim(), major.to_string());

    format!(
        "failover {failover_ms} ms, rewind {} ms, re-clone {} ms, {} writes",
        rewind.as_millis(),
        reclone.as_millis(),
        acknowledged.len()
    )
}

/// The event of `node`'s rejoin by `path` ("pg_rewind" or "re-clone") is in the events log.
fn assert_rejoined(cluster: &Cluster, node: &str, path: &str, major: u32) {
    let found = cluster.events().iter().rev().any(|e| {
        e["reason"] == "rejoin"
            && e["message"].as_str().is_some_and(|m| {
                m.starts_with(&format!("{node}:")) && m.contains(&format!("by {path}"))
            })
    });
    assert!(
        found,
        "PostgreSQL {major}: no rejoin of {node} by {path}; events:\n{}",
        cluster.events_since(0)
    );
}

/// Waits until `node`'s agent (and so its postgres) has exited after a graceful stop.
async fn wait_agent_gone(cluster: &Cluster, node: &str) {
    let pid_file = cluster.layout().agent_pid(node);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
            .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !running {
            return;
        }
        assert!(Instant::now() < deadline, "the agent of {node} still runs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes the WAL segments of a stopped node's data directory; returns how many.
fn remove_wal_segments(cluster: &Cluster, node: &str) -> usize {
    let wal = cluster.layout().data_dir(node).join("pg_wal");
    let mut removed = 0;
    for entry in std::fs::read_dir(&wal).expect("pg_wal") {
        let path = entry.expect("entry").path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.is_file() && name.len() == 24 && name.chars().all(|c| c.is_ascii_hexdigit()) {
            std::fs::remove_file(&path).expect("remove segment");
            removed += 1;
        }
    }
    removed
}

async fn server_major(cluster: &Cluster, node: &str) -> u32 {
    let (client, connection) =
        tokio_postgres::connect(&cluster.node_conninfo(node), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {node}: {e}"));
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .expect("server_version_num");
    pgrs::postgres::version::major_of_version_num(row.get::<_, i32>(0) as u32)
}
