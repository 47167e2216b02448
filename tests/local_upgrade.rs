//! `pgrs local upgrade --to <major>` (issue 16): major-version upgrades of a running local
//! cluster with pg_upgrade, one scenario after the other:
//!
//! 1. an async cluster on 15 with rows: a lower major, incomplete binaries and a
//!    `pg_upgrade --check` failure (a `regproc` column in a user table) are refused and leave
//!    everything as it was (still 15, healthy, rows intact, no new directory); then 15 → 17:
//!    every row on every node, every node on 17, every replica streaming, the old directories
//!    removed, the new binaries recorded;
//! 2. a synchronous cluster on 17: 17 → 18, the same checks.
//!
//! 15 is Debian's `/usr/lib/postgresql/15/bin`; 17 and 18 come from
//! `${PGRS_PG_CACHE:-/var/cache/pgrs-pg}/<major>/bin` (`scripts/install-pg-majors 17 18`).

mod local_support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use local_support::{Cluster, pgrs};

const ROWS: i64 = 20_000;

fn pg_bin(major: u32) -> PathBuf {
    let dir = if major == 15 {
        pgrs::postgres::version::debian_bin_dir(15)
    } else {
        let cache = std::env::var("PGRS_PG_CACHE").unwrap_or_else(|_| "/var/cache/pgrs-pg".into());
        PathBuf::from(cache).join(major.to_string()).join("bin")
    };
    assert!(
        dir.join("pg_upgrade").is_file(),
        "PostgreSQL {major} is not installed in {}: run `scripts/install-pg-majors {major}`",
        dir.display()
    );
    dir
}

async fn client(conninfo: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {conninfo}: {e}"));
    tokio::spawn(connection);
    client
}

/// `(major, rows, sum of ids)` of `items` on `node`.
async fn node_state(cluster: &Cluster, node: &str) -> (u32, i64, i64) {
    let client = client(&cluster.node_conninfo(node)).await;
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, count(*), coalesce(sum(id), 0)::bigint FROM items",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("read items on {node}: {e}"));
    let major = pgrs::postgres::version::major_of_version_num(row.get::<_, i32>(0) as u32);
    (major, row.get(1), row.get(2))
}

/// Every node runs `major` and has every row (replicas: once replayed).
async fn assert_everywhere(cluster: &Cluster, major: u32, rows: i64) {
    let expected_sum = rows * (rows + 1) / 2;
    let status = cluster.wait_healthy(Duration::from_secs(60)).await;
    for node in &status.nodes {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let state = node_state(cluster, &node.name).await;
            if state == (major, rows, expected_sum) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: (major, rows, sum) = {state:?}, expected ({major}, {rows}, {expected_sum})",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn upgrade(cluster: &Cluster, args: &[&str]) -> (bool, String) {
    let dir = cluster.dir_text();
    let mut all = vec!["local", "upgrade", "--dir", &dir];
    all.extend_from_slice(args);
    let output = pgrs(&all);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn recorded_bin(cluster: &Cluster) -> PathBuf {
    cluster.layout().read_config().expect("config").pg_bin
}

/// No directory but `data` (and the agent's run directory) in any node's directory.
fn assert_no_leftovers(cluster: &Cluster) {
    for node in ["node0", "node1", "node2"] {
        let dir = cluster.layout().node_dir(node);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .expect("node dir")
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "data" && n != "data.pgrs-run")
            .collect();
        assert!(names.is_empty(), "{node}: left over: {names:?}");
    }
}

/// Upgrades to `to` and checks the result; returns the reported line.
async fn upgrade_and_verify(cluster: &Cluster, to: u32) -> String {
    let bin = pg_bin(to);
    let (ok, text) = upgrade(
        cluster,
        &[
            "--to",
            &to.to_string(),
            "--pg-bin",
            &bin.display().to_string(),
        ],
    );
    assert!(
        ok,
        "upgrade to {to} failed:\n{text}\n{}",
        cluster.controller_log_tail()
    );
    let line = text
        .lines()
        .find(|l| l.contains("write downtime"))
        .unwrap_or_else(|| panic!("no downtime in:\n{text}"))
        .to_string();
    assert_eq!(recorded_bin(cluster), bin);
    assert_everywhere(cluster, to, ROWS).await;
    assert_no_leftovers(cluster);
    line
}

async fn create_rows(cluster: &Cluster) {
    let writer = client(&cluster.write_conninfo()).await;
    writer
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, payload text);
             INSERT INTO items SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;"
        ))
        .await
        .expect("create rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_15_to_17_after_refusals_then_sync_17_to_18() {
    let started = Instant::now();
    let mut figures = Vec::new();

    // 1. Async on 15.
    let bin15 = pg_bin(15).display().to_string();
    let cluster = Cluster::up(2, &["--pg-bin", &bin15]);
    cluster.wait_healthy(Duration::from_secs(90)).await;
    create_rows(&cluster).await;
    assert_everywhere(&cluster, 15, ROWS).await;

    let (ok, text) = upgrade(&cluster, &["--to", "15"]);
    assert!(!ok && text.contains("only a higher major"), "{text}");
    let empty = tempfile::tempdir().expect("tempdir");
    let empty_text = empty.path().display().to_string();
    let (ok, text) = upgrade(&cluster, &["--to", "17", "--pg-bin", &empty_text]);
    assert!(!ok && text.contains("missing postgres"), "{text}");

    // A reg* column: pg_upgrade --check refuses; nothing changes.
    let writer = client(&cluster.write_conninfo()).await;
    writer
        .batch_execute("CREATE TABLE blocker (f regproc); INSERT INTO blocker VALUES ('now');")
        .await
        .expect("regproc table");
    let bin17 = pg_bin(17).display().to_string();
    let (ok, text) = upgrade(&cluster, &["--to", "17", "--pg-bin", &bin17]);
    assert!(!ok, "the upgrade passed despite a regproc column:\n{text}");
    assert!(
        text.contains("pg_upgrade --check refuses") && text.contains("public.blocker.f"),
        "{text}"
    );
    assert_eq!(recorded_bin(&cluster), pg_bin(15));
    assert_everywhere(&cluster, 15, ROWS).await;
    assert_no_leftovers(&cluster);
    writer
        .batch_execute("DROP TABLE blocker")
        .await
        .expect("drop");

    let upgrade_started = Instant::now();
    let line = upgrade_and_verify(&cluster, 17).await;
    figures.push(format!(
        "async 15 → 17 in {:.1} s: {line}",
        upgrade_started.elapsed().as_secs_f64()
    ));
    // Writes go on through the write endpoint and reach the replicas.
    let writer = client(&cluster.write_conninfo()).await;
    writer
        .batch_execute(&format!("INSERT INTO items VALUES ({}, 'after')", ROWS + 1))
        .await
        .expect("write after the upgrade");
    assert_everywhere(&cluster, 17, ROWS + 1).await;
    drop(cluster);

    // 2. Sync on 17 → 18.
    let cluster = Cluster::up(2, &["--sync", "--pg-bin", &bin17]);
    cluster.wait_healthy(Duration::from_secs(90)).await;
    cluster.wait_quorum(2, Duration::from_secs(30)).await;
    create_rows(&cluster).await;
    let upgrade_started = Instant::now();
    let line = upgrade_and_verify(&cluster, 18).await;
    cluster.wait_quorum(2, Duration::from_secs(30)).await;
    figures.push(format!(
        "sync 17 → 18 in {:.1} s: {line}",
        upgrade_started.elapsed().as_secs_f64()
    ));
    eprintln!(
        "local_upgrade ({} s):\n  {}",
        started.elapsed().as_secs(),
        figures.join("\n  ")
    );
}
