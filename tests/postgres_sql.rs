//! The agent's SQL (`pgrs::postgres::{slots, roles, promote}`) against real PostgreSQL 15
//! instances, started through `pgrs agent` by the shared support in `common`.

mod common;

use std::time::{Duration, Instant};

use common::{AgentProcess, TestEnv};
use pgrs::postgres::promote::{self, PromoteError};
use pgrs::postgres::roles::{AppChange, RoleChange, ensure_app_access, ensure_replication_role};
use pgrs::postgres::slots::{create_physical_slot, drop_inactive_slot, drop_stale_slots};
use pgrs::protocol::api::Role;

const BOOT: Duration = Duration::from_secs(90);
const SHORT: Duration = Duration::from_secs(30);

/// Names of the physical slots on `client`'s instance, sorted.
async fn slot_names(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' \
             ORDER BY slot_name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// A primary and one replica (`b`, streaming on its slot `pgrs_b`).
async fn primary_and_replica(env: &TestEnv) -> (AgentProcess, AgentProcess) {
    let mut a = env.agent("a").spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let mut b = env.agent("b").replica_of(&a).spawn();
    b.wait_streaming(BOOT).await;
    (a, b)
}

/// Connects over TCP as `user` with `password` (the error text when refused).
async fn login(port: u16, user: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    login_to(port, user, password, "postgres").await
}

/// [`login`] to the database `dbname`.
async fn login_to(
    port: u16,
    user: &str,
    password: &str,
    dbname: &str,
) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user(user)
        .password(password)
        .dbname(dbname)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        })?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_is_created_once_reserves_wal_and_is_dropped() {
    let env = TestEnv::new("sqlslot");
    let mut a = env.agent("a").spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let sql = a.sql().await;

    assert!(create_physical_slot(&sql, "pgrs_x").await.unwrap());
    assert!(
        !create_physical_slot(&sql, "pgrs_x").await.unwrap(),
        "an existing slot is not created twice"
    );
    let reserved: bool = sql
        .query_one(
            "SELECT restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'pgrs_x'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reserved, "the slot reserves WAL from its creation");
    assert_eq!(slot_names(&sql).await, vec!["pgrs_x".to_string()]);

    assert!(drop_inactive_slot(&sql, "pgrs_x").await.unwrap());
    assert!(!drop_inactive_slot(&sql, "pgrs_x").await.unwrap());
    assert!(slot_names(&sql).await.is_empty());

    // An invalid slot name is an error naming the slot.
    let error = create_physical_slot(&sql, "Not A Valid Name")
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("failed to create replication slot Not A Valid Name"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_slots_are_dropped_but_active_and_foreign_ones_kept() {
    let env = TestEnv::new("sqlstale");
    let (a, _b) = primary_and_replica(&env).await;
    let sql = a.sql().await;
    assert!(create_physical_slot(&sql, "pgrs_stale").await.unwrap());
    assert!(create_physical_slot(&sql, "manual_slot").await.unwrap());
    assert_eq!(
        slot_names(&sql).await,
        vec!["manual_slot", "pgrs_b", "pgrs_stale"]
    );

    // The replica's slot is in use: neither the stale sweep nor a targeted drop removes it.
    assert!(!drop_inactive_slot(&sql, "pgrs_b").await.unwrap());
    assert_eq!(drop_stale_slots(&sql).await.unwrap(), 1);
    assert_eq!(slot_names(&sql).await, vec!["manual_slot", "pgrs_b"]);
    assert_eq!(drop_stale_slots(&sql).await.unwrap(), 0, "nothing left");
    let active: bool = sql
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'pgrs_b'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_role_is_created_then_updated_and_logs_in() {
    let env = TestEnv::new("sqlrole");
    let mut a = env.agent("a").spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let sql = a.sql().await;
    let port = a.spec.pg_port;

    assert_eq!(
        ensure_replication_role(&sql, "sql test role", "first-pw")
            .await
            .unwrap(),
        RoleChange::Created
    );
    let row = sql
        .query_one(
            "SELECT rolreplication, rolcanlogin, rolpassword FROM pg_authid \
             WHERE rolname = 'sql test role'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    let stored: String = row.get(2);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    assert!(!stored.contains("first-pw"));
    let session = login(port, "sql test role", "first-pw").await.unwrap();
    let user: String = session
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "sql test role");

    // Again with another password: the role is updated and only the new password works.
    assert_eq!(
        ensure_replication_role(&sql, "sql test role", "second-pw")
            .await
            .unwrap(),
        RoleChange::Updated
    );
    let refused = login(port, "sql test role", "first-pw").await.unwrap_err();
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    login(port, "sql test role", "second-pw").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_role_and_database_are_created_once_and_the_owner_writes() {
    let env = TestEnv::new("sqlapp");
    let mut a = env.agent("a").spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let sql = a.sql().await;
    let port = a.spec.pg_port;

    assert_eq!(
        ensure_app_access(&sql, "shop_owner", "shop", "first-pw")
            .await
            .unwrap(),
        AppChange {
            role: RoleChange::Created,
            database_created: true
        }
    );
    let row = sql
        .query_one(
            "SELECT a.rolcanlogin, a.rolsuper, a.rolpassword, pg_get_userbyid(d.datdba)::text \
             FROM pg_authid a, pg_database d \
             WHERE a.rolname = 'shop_owner' AND d.datname = 'shop'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && !row.get::<_, bool>(1));
    let stored: String = row.get(2);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    assert_eq!(row.get::<_, String>(3), "shop_owner");
    // The owner creates and writes a table of its database over TCP (pg_hba: scram).
    let app = login_to(port, "shop_owner", "first-pw", "shop")
        .await
        .unwrap();
    app.batch_execute("CREATE TABLE orders (id int); INSERT INTO orders VALUES (1)")
        .await
        .unwrap();

    // Again (a restart, a promotion): nothing is created, the password is set again.
    assert_eq!(
        ensure_app_access(&sql, "shop_owner", "shop", "second-pw")
            .await
            .unwrap(),
        AppChange {
            role: RoleChange::Updated,
            database_created: false
        }
    );
    let refused = login_to(port, "shop_owner", "first-pw", "shop")
        .await
        .unwrap_err();
    assert!(
        refused.contains("password authentication failed"),
        "{refused}"
    );
    let app = login_to(port, "shop_owner", "second-pw", "shop")
        .await
        .unwrap();
    let count: i64 = app
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "the existing database was kept");
    // The superuser session is left as it was (it may serve status probes afterwards).
    let commit: String = sql
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(commit, "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_is_promoted_checkpointed_and_reloads() {
    let env = TestEnv::new("sqlpromote");
    let (a, b) = primary_and_replica(&env).await;
    let primary = a.sql().await;
    let standby = b.sql().await;

    assert!(!promote::in_recovery(&primary).await.unwrap());
    assert!(promote::in_recovery(&standby).await.unwrap());
    // A primary cannot be promoted: pg_promote raises an error.
    let error = promote::promote_no_wait(&primary).await.unwrap_err();
    assert!(matches!(error, PromoteError::Promote { .. }), "{error:?}");
    assert!(
        error.to_string().starts_with("failed to call pg_promote"),
        "{error}"
    );

    assert!(promote::promote_no_wait(&standby).await.unwrap());
    let deadline = Instant::now() + SHORT;
    while promote::in_recovery(&standby).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "still in recovery after pg_promote"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The checkpoint puts the new timeline into the control file.
    promote::checkpoint(&standby).await.unwrap();
    let timeline: i32 = standby
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeline, 2);

    // A reload moves the configuration load time (seen by a new session).
    let before = promote::conf_load_time(&standby).await.unwrap();
    standby
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let deadline = Instant::now() + SHORT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fresh = b.sql().await;
        if promote::conf_load_time(&fresh).await.unwrap() != before {
            break;
        }
        assert!(Instant::now() < deadline, "the load time did not move");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_standby_names_is_set_and_reloaded_and_a_bad_value_is_a_statement_error() {
    let env = TestEnv::new("sqlsync");
    let mut a = env.agent("a").spawn();
    a.wait_role(Role::Primary, BOOT).await;
    let sql = a.sql().await;
    pgrs::postgres::sql::set_synchronous_standby_names(&sql, "ANY 1 (\"b\", \"c'd\")")
        .await
        .unwrap();
    let deadline = Instant::now() + SHORT;
    loop {
        let shown: String = sql
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .unwrap()
            .get(0);
        if shown == "ANY 1 (\"b\", \"c'd\")" {
            break;
        }
        assert!(Instant::now() < deadline, "not reloaded: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = pgrs::postgres::sql::set_synchronous_standby_names(&sql, "ANY x (")
        .await
        .expect_err("a malformed value is refused");
    assert!(error.to_string().starts_with("failed to set"), "{error}");
    assert!(
        pgrs::postgres::sql::statement_failed(&error),
        "the statement failed, not the session: {error}"
    );
    // Back to asynchronous: the session is still usable.
    pgrs::postgres::sql::set_synchronous_standby_names(&sql, "")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_instances_slots_are_dropped_only_when_none_is_active() {
    let env = TestEnv::new("sqlremoved");
    let (a, _b) = primary_and_replica(&env).await;
    let sql = a.sql().await;
    assert!(create_physical_slot(&sql, "pgrs_gone").await.unwrap());
    let both = ["pgrs_gone".to_string(), "pgrs_b".to_string()];
    let error = pgrs::postgres::slots::drop_removed_slots(&sql, &both)
        .await
        .expect_err("b still streams on its slot");
    assert!(
        error.to_string().contains("1 of them are still active"),
        "{error}"
    );
    assert!(slot_names(&sql).await.contains(&"pgrs_gone".to_string()));
    let dropped = pgrs::postgres::slots::drop_removed_slots(&sql, &["pgrs_gone".to_string()])
        .await
        .unwrap();
    assert_eq!(dropped, ["pgrs_gone"]);
    assert_eq!(slot_names(&sql).await, ["pgrs_b"]);
}
