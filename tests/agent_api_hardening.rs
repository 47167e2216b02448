//! The agent's HTTP API against bad and excessive input, on a real agent with real PostgreSQL
//! (issue 15, "Probes and the agent API"): the probes answer from memory, the status needs the
//! token, malformed requests get `400` naming the field and change nothing, and a flood of
//! requests neither fails the readiness probe nor takes the primary's writes away.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{AgentProcess, TOKEN, TestEnv};
use pgrs::protocol::api::{
    ErrorResponse, FENCE_PATH, FOLLOW_PATH, HEALTHZ_PATH, PARAMETERS_PATH, PROMOTE_PATH,
    ProbeResponse, READYZ_PATH, REJOIN_PATH, Role, START_PATH, STATUS_PATH, STOP_PATH,
};
use pgrs::protocol::failsafe::FAILSAFE_CONFIRM_PATH;

const BOOT: Duration = Duration::from_secs(90);
/// The kubelet's timeout of the readiness probe (`timeoutSeconds: 1`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

fn base(agent: &AgentProcess) -> String {
    format!("http://127.0.0.1:{}", agent.spec.http_port)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

/// The status and the `ErrorResponse` message (panics when an error reply is not one).
async fn answer(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("reply body");
    if status < 400 {
        return (status, text);
    }
    match serde_json::from_str::<ErrorResponse>(&text) {
        Ok(error) => (status, error.error),
        Err(_) => panic!("{status} reply is not an ErrorResponse: {text}"),
    }
}

async fn post(client: &reqwest::Client, url: &str, body: &str, token: bool) -> (u16, String) {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if token {
        request = request.bearer_auth(TOKEN);
    }
    answer(request.send().await.expect("POST")).await
}

async fn get(client: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request.send().await.expect("GET")).await
}

/// Polls `/readyz` until it gives `status`; returns the last reply.
async fn wait_readyz(agent: &AgentProcess, status: u16, timeout: Duration) -> (u16, String) {
    let client = http();
    let url = format!("{}{READYZ_PATH}", base(agent));
    let deadline = Instant::now() + timeout;
    loop {
        let reply = get(&client, &url, None).await;
        if reply.0 == status {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not turn {status} within {timeout:?}; last: {reply:?}\nlog:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A write on the instance, over a fresh session (so that a refused connection shows).
async fn write(agent: &AgentProcess, value: i64) {
    agent
        .sql()
        .await
        .execute("INSERT INTO hardening (v) VALUES ($1)", &[&value])
        .await
        .unwrap_or_else(|e| panic!("write {value}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_tokens_bad_bodies_and_a_flood() {
    let env = TestEnv::new("hardening");
    let mut primary = env.agent("p").spawn();
    primary.wait_role(Role::Primary, BOOT).await;
    primary
        .sql()
        .await
        .batch_execute("CREATE TABLE hardening (v bigint NOT NULL)")
        .await
        .expect("create table");
    let client = http();
    let url = |path: &str| format!("{}{path}", base(&primary));

    // The probes: open, answered from the agent's last look.
    let (status, body) = wait_readyz(&primary, 200, Duration::from_secs(10)).await;
    let ready: ProbeResponse = serde_json::from_str(&body).expect("readyz body");
    assert_eq!((status, ready.role), (200, Role::Primary));
    let (status, body) = get(&client, &url(HEALTHZ_PATH), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<ProbeResponse>(&body).expect("healthz body");

    // The status needs the token.
    let (status, message) = get(&client, &url(STATUS_PATH), None).await;
    assert_eq!(status, 401, "{message}");
    assert!(message.contains("bearer token"), "{message}");
    assert_eq!(get(&client, &url(STATUS_PATH), Some("wrong")).await.0, 401);
    assert_eq!(get(&client, &url(STATUS_PATH), Some(TOKEN)).await.0, 200);
    let (status, message) = get(&client, &url("/v1/nope"), None).await;
    assert_eq!(status, 404, "{message}");

    bad_bodies(&primary, &client).await;
    let status = primary.client.status().await.expect("status");
    assert_eq!(status.role, Role::Primary);
    assert_eq!(status.fence_reason, None, "a refused fence fenced");
    write(&primary, 1).await;

    flood(&primary).await;
    let status = primary
        .client
        .status()
        .await
        .expect("status after the flood");
    assert_eq!(status.role, Role::Primary);
    write(&primary, 2).await;

    // Readiness follows postgres: stopped → 503 naming why; started → 200. Alive throughout.
    primary
        .client
        .stop(&Default::default())
        .await
        .expect("stop");
    let (_, why) = wait_readyz(&primary, 503, Duration::from_secs(10)).await;
    assert!(why.contains("not up"), "{why}");
    assert_eq!(get(&client, &url(HEALTHZ_PATH), None).await.0, 200);
    primary.client.start().await.expect("start");
    wait_readyz(&primary, 200, Duration::from_secs(30)).await;
    write(&primary, 3).await;
}

/// Every refusal is a `400` (or `401`, `413`, `415`) naming what is wrong, and nothing runs.
async fn bad_bodies(agent: &AgentProcess, client: &reqwest::Client) {
    let url = |path: &str| format!("{}{path}", base(agent));
    let cases: &[(&str, &str, u16, &str)] = &[
        (
            PROMOTE_PATH,
            r#"{"wait_seconds": 5"#,
            400,
            "malformed request body",
        ),
        (PROMOTE_PATH, r#"{"wait_secs": 5}"#, 400, "wait_secs"),
        (
            PROMOTE_PATH,
            r#"{"wait_seconds": "5"}"#,
            400,
            "wait_seconds",
        ),
        (
            PROMOTE_PATH,
            r#"{"wait_seconds": 18446744073709551615}"#,
            400,
            "wait_seconds",
        ),
        (
            PROMOTE_PATH,
            r#"{"wait_seconds": 99999999999999999999999999}"#,
            400,
            "wait_seconds",
        ),
        (PROMOTE_PATH, r#"{"wait_seconds": -1}"#, 400, "wait_seconds"),
        (PROMOTE_PATH, r#"[1, 2]"#, 400, "request body"),
        (FENCE_PATH, r#"{"reason": "x", "now": true}"#, 400, "now"),
        (FENCE_PATH, r#"{"reason": 7}"#, 400, "reason"),
        (STOP_PATH, r#"{"mode": "slow"}"#, 400, "mode"),
        (FOLLOW_PATH, r#"{"host": "h", "port": 0}"#, 400, "port"),
        (FOLLOW_PATH, r#"{"host": "h", "port": 70000}"#, 400, "port"),
        (FOLLOW_PATH, r#"{"port": 5432}"#, 400, "host"),
        (
            REJOIN_PATH,
            r#"{"host": "h\nx", "port": 5432}"#,
            400,
            "host",
        ),
        (
            REJOIN_PATH,
            r#"{"host": "h", "port": 5432, "slot": "No-Slot"}"#,
            400,
            "slot",
        ),
        (
            PARAMETERS_PATH,
            r#"{"parameters": {"work_mem": "4MB\nport = 1"}}"#,
            400,
            "parameters.work_mem",
        ),
        (START_PATH, r#"{"force": true}"#, 400, "force"),
        (
            FAILSAFE_CONFIRM_PATH,
            r#"{"primary": "q", "host": "h", "port": 5432, "deadline_unix_ms": -9223372036854775808}"#,
            400,
            "deadline_unix_ms",
        ),
    ];
    for (path, body, expected, named) in cases {
        let (status, message) = post(client, &url(path), body, true).await;
        eprintln!("POST {path} {body:?} → {status}: {message}");
        assert_eq!(status, *expected, "POST {path} {body}: {message}");
        assert!(
            message.contains(named),
            "POST {path} {body}: the error does not name {named:?}: {message}"
        );
        // Without the token, the body is never looked at.
        let (status, message) = post(client, &url(path), body, false).await;
        assert_eq!(status, 401, "POST {path} {body} without a token: {message}");
    }
    let (status, message) = answer(
        client
            .post(url(PROMOTE_PATH))
            .bearer_auth(TOKEN)
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_eq!(status, 415, "{message}");
    let big = format!(r#"{{"reason": "{}"}}"#, "x".repeat(100_000));
    let (status, message) = post(client, &url(FENCE_PATH), &big, true).await;
    assert_eq!(status, 413, "{message}");
}

/// Read by the flood's tasks: how each class of request fared.
#[derive(Debug, Default)]
struct Tally {
    statuses: std::collections::BTreeMap<u16, usize>,
    errors: usize,
}

async fn hammer(url: String, token: Option<&'static str>, count: usize, tasks: usize) -> Tally {
    let client = http();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                for _ in (i..count).step_by(tasks) {
                    let mut request = client.get(&url);
                    if let Some(token) = token {
                        request = request.bearer_auth(token);
                    }
                    match request.send().await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let _ = response.bytes().await;
                            *tally.statuses.entry(status).or_default() += 1;
                        }
                        Err(_) => tally.errors += 1,
                    }
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for handle in handles {
        let tally = handle.await.expect("flood task");
        for (status, n) in tally.statuses {
            *total.statuses.entry(status).or_default() += n;
        }
        total.errors += tally.errors;
    }
    total
}

/// 2000 status requests without a token and 500 with it, from 64 tasks each, while `/readyz`
/// is asked every 100 ms (as a kubelet would, with its 1 s timeout) and a writer writes.
async fn flood(agent: &AgentProcess) {
    let stop = Arc::new(AtomicBool::new(false));
    let readyz = {
        let stop = stop.clone();
        let url = format!("{}{READYZ_PATH}", base(agent));
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .timeout(PROBE_TIMEOUT * 5)
                .build()
                .expect("probe client");
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let status = match client.get(&url).send().await {
                    Ok(response) => response.status().as_u16(),
                    Err(_) => 0,
                };
                answers.push((status, sent.elapsed()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
    };
    let writer = {
        let stop = stop.clone();
        let session = agent.sql().await;
        tokio::spawn(async move {
            let mut written = 0i64;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                session
                    .execute(
                        "INSERT INTO hardening (v) VALUES ($1)",
                        &[&(1000 + written)],
                    )
                    .await
                    .unwrap_or_else(|e| panic!("write during the flood: {e}"));
                slowest = slowest.max(sent.elapsed());
                written += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (written, slowest)
        })
    };
    let started = Instant::now();
    let status_url = format!("{}{STATUS_PATH}", base(agent));
    let (anonymous, authorized) = tokio::join!(
        hammer(status_url.clone(), None, 2000, 64),
        hammer(status_url, Some(TOKEN), 500, 64),
    );
    let took = started.elapsed();
    // A few more probes after the flood, then stop.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = readyz.await.expect("readyz task");
    let (written, slowest_write) = writer.await.expect("writer task");
    let slowest = answers.iter().map(|(_, d)| *d).max().unwrap_or_default();
    eprintln!(
        "flood: {took:?}; without token {anonymous:?}; with token {authorized:?}; \
         {} /readyz answers, slowest {slowest:?}; {written} writes, slowest {slowest_write:?}",
        answers.len()
    );
    assert_eq!(
        anonymous.statuses.get(&401).copied(),
        Some(2000),
        "every request without the token is refused: {anonymous:?}"
    );
    assert_eq!(anonymous.errors, 0, "{anonymous:?}");
    let served = authorized.statuses.get(&200).copied().unwrap_or(0);
    let busy = authorized.statuses.get(&503).copied().unwrap_or(0);
    assert!(served > 0, "{authorized:?}");
    assert_eq!(served + busy, 500, "only 200 or 503 (busy): {authorized:?}");
    assert!(answers.len() >= 5, "{answers:?}");
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "/readyz failed during the flood: {answers:?}"
    );
    // The kubelet marks a pod unready after 3 failures in a row (here: 3 answers over its
    // 1 s timeout in a row); none may come close.
    let late_runs = answers
        .windows(3)
        .filter(|w| w.iter().all(|(_, d)| *d > PROBE_TIMEOUT))
        .count();
    assert_eq!(late_runs, 0, "/readyz too slow: {answers:?}");
    assert!(written > 0, "no write during the flood");
}
