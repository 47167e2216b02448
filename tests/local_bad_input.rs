//! Bad input to `pgrs local`: clear errors, and the running cluster is not disturbed.

mod local_support;

use std::time::Duration;

use local_support::{Cluster, pgrs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_nothing_is_disturbed() {
    let cluster = Cluster::up(2, &[]);
    let before = cluster.wait_healthy(Duration::from_secs(60)).await;
    let primary = before.primary.clone().expect("primary");
    let dir = cluster.dir_text();

    // `up` on a directory in use.
    let output = pgrs(&[
        "local",
        "up",
        "--dir",
        &dir,
        "--replicas",
        "2",
        "--port-base",
        "20000",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("in use by a running controller"),
        "{stderr}"
    );

    // Unknown nodes.
    let output = pgrs(&["local", "kill", "--dir", &dir, "node7"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("unknown node \"node7\"") && stderr.contains("node0, node1, node2"),
        "{stderr}"
    );
    let output = pgrs(&["local", "switchover", "--dir", &dir, "--to", "node7"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown node"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Switchover to the primary itself.
    let output = pgrs(&["local", "switchover", "--dir", &dir, "--to", &primary]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("already the primary"));

    // A lagging replica: its WAL receiver is frozen while the primary writes 32 MB.
    let replicas: Vec<String> = before
        .nodes
        .iter()
        .filter(|n| n.name != primary)
        .map(|n| n.name.clone())
        .collect();
    let lagging = &replicas[0];
    let down = &replicas[1];
    let receiver = find_walreceiver(&dir, lagging).expect("walreceiver process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(receiver),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("freeze receiver");
    let (client, connection) =
        tokio_postgres::connect(&cluster.write_conninfo(), tokio_postgres::NoTls)
            .await
            .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 150000) g")
        .await
        .expect("write 32 MB");
    // Until the controller's view shows the lag (reports arrive every few hundred ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster.status().await;
        let node = status
            .nodes
            .iter()
            .find(|n| &n.name == lagging)
            .expect("node");
        if node.lag_bytes.is_some_and(|lag| lag > 20 * 1024 * 1024) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag never showed: {node:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refusal = loop {
        let output = pgrs(&["local", "switchover", "--dir", &dir, "--to", lagging]);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(
            !output.status.success(),
            "switchover to a lagging replica was accepted"
        );
        if stderr.contains("lags") {
            break stderr;
        }
        assert!(std::time::Instant::now() < deadline, "{stderr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refusal.contains("bytes behind the primary"), "{refusal}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(receiver),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("thaw receiver");

    // A down replica.
    pgrs::local::cli::kill_node(&cluster.dir, down, true).expect("kill replica");
    // A failed call does not make an agent's last answer stale: for the 3 s of
    // `report_stale_after` the killed replica may still look eligible, and a switchover to it
    // would be accepted (and then wait out its patience). Ask once that answer is stale.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let output = pgrs(&["local", "switchover", "--dir", &dir, "--to", down]);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(
            !output.status.success(),
            "switchover to a down replica was accepted"
        );
        if stderr.contains("not reachable") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stderr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let output = pgrs(&["local", "kill", "--dir", &dir, down]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not running"));

    // Nothing was disturbed: same primary throughout, the frozen replica catches up.
    let status = cluster.status().await;
    assert_eq!(status.primary.as_deref(), Some(primary.as_str()));
    cluster.restart(down).await;
    let after = cluster.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(after.primary.as_deref(), Some(primary.as_str()));
}

/// The pid of `node`'s WAL receiver (its process title names the instance as cluster_name).
/// The WAL receiver of `node`'s postgres in the cluster at `dir`: a child of the postmaster
/// whose pid its data directory's `postmaster.pid` names (another cluster on this machine may
/// have a node of the same name).
fn find_walreceiver(dir: &str, node: &str) -> Option<i32> {
    let data_dir = pgrs::local::layout::Layout::new(std::path::Path::new(dir)).data_dir(node);
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let postmaster: i32 = pid_file.lines().next()?.trim().parse().ok()?;
    for entry in std::fs::read_dir("/proc").ok()? {
        let entry = entry.ok()?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the fields after the last ')'.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<i32>().ok());
        let text = String::from_utf8_lossy(&cmdline);
        if text.contains("walreceiver") && parent == Some(postmaster) {
            return Some(pid);
        }
    }
    None
}

/// `--pg-bin` without the programs the agents need fails `up` at once, naming them, before
/// anything is created or started (it used to wait `--wait-secs` for a cluster whose agents had
/// already exited).
#[test]
fn up_with_incomplete_binaries_fails_at_once_naming_the_missing_programs() {
    let temp = tempfile::tempdir().expect("tempdir");
    let bin = temp.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    let debian = pgrs::postgres::version::debian_bin_dir(15);
    for program in ["postgres", "initdb", "pg_ctl", "psql"] {
        std::os::unix::fs::symlink(debian.join(program), bin.join(program)).expect("symlink");
    }
    let dir = temp.path().join("cluster");
    let started = std::time::Instant::now();
    let output = pgrs(&[
        "local",
        "up",
        "--dir",
        &dir.display().to_string(),
        "--pg-bin",
        &bin.display().to_string(),
        "--port-base",
        &local_support::free_port_base(3).to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!(
            "failed to find PostgreSQL binaries in {}: missing pg_basebackup, pg_rewind, pg_controldata",
            bin.display()
        )),
        "{stderr}"
    );
    assert!(!dir.exists(), "up created {} anyway", dir.display());

    // A directory with no PostgreSQL at all names every program.
    let empty = temp.path().join("empty");
    std::fs::create_dir(&empty).expect("empty dir");
    let output = pgrs(&[
        "local",
        "up",
        "--dir",
        &dir.display().to_string(),
        "--pg-bin",
        &empty.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("missing postgres, initdb, pg_basebackup, pg_rewind, pg_controldata"),
        "{stderr}"
    );
}
