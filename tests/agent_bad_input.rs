//! Bad input gives a clear error naming the cause, and never destroys a data directory.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{TestEnv, free_port, pg_command, run_ok};
use pgrs::protocol::api::Role;

const BOOT: Duration = Duration::from_secs(90);
const EXIT: Duration = Duration::from_secs(60);

fn system_identifier(data_dir: &Path) -> String {
    let text = run_ok(pg_command("pg_controldata").arg("-D").arg(data_dir));
    text.lines()
        .find_map(|l| l.strip_prefix("Database system identifier:"))
        .expect("system identifier line")
        .trim()
        .to_string()
}

/// A cluster made by hand with initdb: not this pgrs cluster.
fn foreign_data_dir(env: &TestEnv, name: &str) -> std::path::PathBuf {
    let dir = env.path(name);
    std::fs::create_dir(&dir).unwrap();
    common::chown_to_postgres(&dir);
    run_ok(
        pg_command("initdb")
            .arg("-D")
            .arg(&dir)
            .arg("--no-instructions"),
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_data_directory_is_refused_untouched() {
    let env = TestEnv::new("foreign");
    let foreign = foreign_data_dir(&env, "foreign");
    let id = system_identifier(&foreign);
    let conf_before = std::fs::read_to_string(foreign.join("postgresql.conf")).unwrap();

    let mut spec = env.agent("x");
    spec.data_dir = foreign.clone();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(log.contains("belongs to another cluster"), "{log}");
    assert!(log.contains("not created by pgrs"), "{log}");
    assert!(log.contains(&id), "{log}");
    assert_eq!(system_identifier(&foreign), id);
    assert_eq!(
        std::fs::read_to_string(foreign.join("postgresql.conf")).unwrap(),
        conf_before,
        "the foreign configuration must not be rewritten"
    );

    // As a replica of a real primary: the system identifiers differ.
    let mut primary = env.agent("p").spawn();
    primary.wait_role(Role::Primary, BOOT).await;
    let mut spec = env.agent("y").replica_of(&primary);
    spec.data_dir = foreign.clone();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(log.contains("belongs to another cluster"), "{log}");
    assert!(log.contains("of the primary"), "{log}");
    assert_eq!(system_identifier(&foreign), id);

    // A non-empty directory without a cluster is refused too, its files kept.
    let junk = env.path("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("precious.txt"), "keep me").unwrap();
    let mut spec = env.agent("z");
    spec.data_dir = junk.clone();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(log.contains("holds no PostgreSQL cluster"), "{log}");
    assert_eq!(
        std::fs::read_to_string(junk.join("precious.txt")).unwrap(),
        "keep me"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_bootstrap_failures_name_the_cause() {
    let env = TestEnv::new("badrepl");
    let mut primary = env.agent("p").spawn();
    primary.wait_role(Role::Primary, BOOT).await;

    // Wrong replication password.
    let mut spec = env.agent("wrongpw").replica_of(&primary);
    spec.replication_password_file = env.secret_file("wrong.pw", "not-the-password");
    let data_dir = spec.data_dir.clone();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    // The bootstrap's first remote session (the checks before pg_basebackup) logs in as the
    // replication role too: it fails there, naming the primary and the role.
    assert!(
        log.contains("failed to reach the primary 127.0.0.1:"),
        "{log}"
    );
    assert!(
        log.contains("password authentication failed for user \"replicator\""),
        "{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password must not be logged: {log}"
    );
    assert!(!data_dir.join("PG_VERSION").exists());
    // No slot is left behind by the failed clone.
    let slots: i64 = primary
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgrs_wrongpw'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);

    // Primary unreachable.
    let nobody = free_port();
    let mut spec = env.agent("orphan");
    spec.role = "replica".into();
    spec.primary = Some(("127.0.0.1".into(), nobody));
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(
        log.contains(&format!("failed to reach the primary 127.0.0.1:{nobody}")),
        "{log}"
    );
    assert!(log.to_lowercase().contains("connection refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_and_missing_binaries() {
    let env = TestEnv::new("badenv");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut spec = env.agent("busy");
    spec.pg_port = port;
    let data_dir = spec.data_dir.clone();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(
        log.contains(&format!("port {port} is not available")),
        "{log}"
    );
    // The data directory initialized before the start attempt is kept.
    assert!(data_dir.join("PG_VERSION").exists());
    drop(taken);

    // That PostgreSQL 15 directory with PostgreSQL 17 binaries: refused naming both majors,
    // never upgraded (scripts/install-pg-majors installs 17).
    let mut spec = env.agent("busy");
    spec.pg_bin = "/var/cache/pgrs-pg/17/bin".into();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(
        log.contains("holds a PostgreSQL 15 cluster")
            && log.contains("/var/cache/pgrs-pg/17/bin are PostgreSQL 17"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(data_dir.join("PG_VERSION")).unwrap(),
        "15\n"
    );
    // Binaries of another major than the operator asked for (`spec.postgresVersion`).
    let (status, log) = env
        .agent("wrongmajor")
        .arg("--postgres-version=17")
        .run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(
        log.contains("are PostgreSQL 15, but PostgreSQL 17 was asked for"),
        "{log}"
    );

    // Missing binaries: refused before anything is touched.
    let existing = env.path("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("precious.txt"), "keep me").unwrap();
    let mut spec = env.agent("nobin");
    spec.pg_bin = "/nonexistent".into();
    spec.data_dir = existing.clone();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(
        log.contains("failed to find PostgreSQL binaries in /nonexistent"),
        "{log}"
    );
    assert!(log.contains("missing postgres"), "{log}");
    assert!(existing.join("precious.txt").exists());

    // The HTTP port in use is named too.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut spec = env.agent("busyhttp");
    spec.http_port = taken.local_addr().unwrap().port();
    let (status, log) = spec.run_expecting_exit(EXIT);
    assert!(!status.success());
    assert!(log.contains("failed to listen for HTTP"), "{log}");
}
