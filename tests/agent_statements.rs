//! The statement actions a controller without a SQL session uses, on a real agent with real
//! PostgreSQL: `POST /v1/checkpoint`, `/v1/synchronous-standby-names`, `/v1/drop-slots` need
//! the token, refuse unknown fields and bad names with `400` naming the field (nothing set),
//! and do what they say on the agent's postgres (read back over SQL); `/v1/superuser-access`
//! rewrites `pg_hba.conf` live; the replication role holds pg_rewind's grants and
//! `pg_checkpoint`, nothing more.

mod common;

use std::time::{Duration, Instant};

use common::{AgentProcess, TOKEN, TestEnv};
use pgrs::protocol::api::{ErrorResponse, Role};
use pgrs::protocol::statements::{
    CHECKPOINT_PATH, DROP_SLOTS_PATH, DropSlotsResponse, SUPERUSER_ACCESS_PATH,
    SYNCHRONOUS_STANDBY_NAMES_PATH, StatementResponse,
};

const BOOT: Duration = Duration::from_secs(90);

async fn post(agent: &AgentProcess, path: &str, body: &str, token: bool) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut request = client
        .post(format!("http://127.0.0.1:{}{path}", agent.spec.http_port))
        .header("content-type", "application/json")
        .body(body.to_string());
    if token {
        request = request.bearer_auth(TOKEN);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    let text = response.text().await.expect("reply body");
    if status >= 400 {
        let error: ErrorResponse = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{status} reply is not an ErrorResponse: {text}"));
        return (status, error.error);
    }
    (status, text)
}

async fn sync(agent: &AgentProcess, body: &str) -> (u16, String) {
    post(agent, SYNCHRONOUS_STANDBY_NAMES_PATH, body, true).await
}

/// The `pg_hba.conf` rules (as postgres parses the file) that reject the superuser.
async fn superuser_rejects(agent: &AgentProcess) -> i64 {
    agent
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM pg_hba_file_rules \
             WHERE user_name = '{postgres}' AND auth_method = 'reject' AND error IS NULL",
            &[],
        )
        .await
        .expect("pg_hba_file_rules")
        .get(0)
}

/// `SHOW synchronous_standby_names` until it is `expected` (the reload is asynchronous).
async fn wait_sync_names(agent: &AgentProcess, expected: &str) {
    let sql = agent.sql().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown: String = sql
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .expect("SHOW")
            .get(0);
        if shown == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "synchronous_standby_names is {shown:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_actions_are_checked_and_run_on_the_local_postgres() {
    let env = TestEnv::new("statements");
    let mut primary = env.agent("p").spawn();
    primary.wait_role(Role::Primary, BOOT).await;

    // The token first, whatever the body.
    for path in [
        CHECKPOINT_PATH,
        SYNCHRONOUS_STANDBY_NAMES_PATH,
        DROP_SLOTS_PATH,
    ] {
        let (status, message) = post(&primary, path, "{}", false).await;
        assert_eq!(status, 401, "{path}: {message}");
    }

    // CHECKPOINT: empty body or `{}`, nothing else.
    let (status, body) = post(&primary, CHECKPOINT_PATH, "{}", true).await;
    assert_eq!(status, 200, "{body}");
    let done: StatementResponse = serde_json::from_str(&body).expect("a StatementResponse");
    assert_eq!(done.message, "checkpoint done");
    let (status, message) = post(&primary, CHECKPOINT_PATH, r#"{"force": true}"#, true).await;
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("force"), "{message}");

    // Synchronous standbys: the quorum as data, names validated, the value quoted by the agent.
    let (status, body) = sync(&primary, r#"{"k": 1, "members": ["node-2", "node.3"]}"#).await;
    assert_eq!(status, 200, "{body}");
    wait_sync_names(&primary, r#"ANY 1 ("node-2", "node.3")"#).await;
    for (bad, field) in [
        (r#"{"k": 1, "members": ["a\", \"b"]}"#, "members[0]"),
        (
            r#"{"k": 1, "members": ["x'); DROP TABLE t; --"]}"#,
            "members[0]",
        ),
        (r#"{"k": 3, "members": ["a", "b"]}"#, "k"),
        (r#"{"k": 1, "members": ["a"], "value": "*"}"#, "value"),
        (r#"{"members": ["a"]}"#, "k"),
    ] {
        let (status, message) = sync(&primary, bad).await;
        assert_eq!(status, 400, "{bad}: {message}");
        assert!(message.contains(field), "{bad}: {message}");
    }
    // Nothing refused was set.
    wait_sync_names(&primary, r#"ANY 1 ("node-2", "node.3")"#).await;
    let (status, body) = sync(&primary, r#"{"k": 0, "members": []}"#).await;
    assert_eq!(status, 200, "{body}");
    wait_sync_names(&primary, "").await;

    // Slots of removed instances: dropped when inactive, a missing one is no error.
    let sql = primary.sql().await;
    sql.batch_execute("SELECT pg_create_physical_replication_slot('pgrs_gone')")
        .await
        .expect("create a slot");
    let (status, body) = post(
        &primary,
        DROP_SLOTS_PATH,
        r#"{"slots": ["pgrs_gone", "pgrs_never"]}"#,
        true,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let dropped: DropSlotsResponse = serde_json::from_str(&body).expect("a DropSlotsResponse");
    assert_eq!(dropped.dropped, ["pgrs_gone"]);
    let left: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgrs_gone'",
            &[],
        )
        .await
        .expect("count slots")
        .get(0);
    assert_eq!(left, 0);
    let (status, message) = post(&primary, DROP_SLOTS_PATH, r#"{"slots": ["Bad"]}"#, true).await;
    assert_eq!(status, 400, "{message}");

    // The replication role: pg_rewind's four functions and pg_checkpoint, no superuser.
    let row = sql
        .query_one(
            "SELECT rolsuper, \
                    has_function_privilege('replicator', 'pg_ls_dir(text, boolean, boolean)', 'EXECUTE'), \
                    has_function_privilege('replicator', 'pg_stat_file(text, boolean)', 'EXECUTE'), \
                    has_function_privilege('replicator', 'pg_read_binary_file(text)', 'EXECUTE'), \
                    has_function_privilege('replicator', \
                        'pg_read_binary_file(text, bigint, bigint, boolean)', 'EXECUTE'), \
                    pg_has_role('replicator', 'pg_checkpoint', 'MEMBER') \
             FROM pg_roles WHERE rolname = 'replicator'",
            &[],
        )
        .await
        .expect("the replication role's grants");
    let grants: Vec<bool> = (0..6).map(|i| row.get(i)).collect();
    assert_eq!(grants, [false, true, true, true, true, true]);

    // Remote superuser logins: refused by default (two rules, IPv4 and IPv6), allowed and
    // refused again live.
    assert_eq!(superuser_rejects(&primary).await, 2);
    let access = |enabled: bool| format!(r#"{{"enabled": {enabled}}}"#);
    let (status, body) = post(&primary, SUPERUSER_ACCESS_PATH, &access(true), true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(superuser_rejects(&primary).await, 0);
    let (status, body) = post(&primary, SUPERUSER_ACCESS_PATH, &access(false), true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(superuser_rejects(&primary).await, 2);
    let (status, message) = post(
        &primary,
        SUPERUSER_ACCESS_PATH,
        r#"{"enabled": "yes"}"#,
        true,
    )
    .await;
    assert_eq!(status, 400, "{message}");

    // The agent is still the primary it was.
    let status = primary.client.status().await.expect("status");
    assert_eq!(status.role, Role::Primary);
}
