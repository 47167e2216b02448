//! Parameter changes on the test bed: a reload-only parameter (`work_mem`) reaches every pod
//! without a restart (postmaster start times unchanged); a restart parameter
//! (`shared_buffers`) reaches every pod by restarting the standbys first, one at a time, then
//! switching the primary role over and restarting the former primary; writes go on through
//! the new primary.
//!
//! A cluster of one restarts its primary in place. And the agent on its own (no operator): it
//! applies its parameters file when the file changes (as a kubelet swaps a ConfigMap volume),
//! reports what needs a restart, and restarts on `POST /v1/restart`.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`).

mod common;
mod operator_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::Client;
use operator_support::*;
use pgrs::api::{InstanceRole, PgReplicaSetStatus, Phase};
use pgrs_testbed::wait::eventually;

const CLUSTER: &str = "pg";

const PODS: [&str; 3] = ["pg-0", "pg-1", "pg-2"];

/// Healthy, 3/3, every standby streaming, and `ParametersApplied` True for the current
/// generation.
async fn wait_applied(client: &Client, ns: &str, what: &str) -> PgReplicaSetStatus {
    eventually(what, Duration::from_secs(300), || async {
        let resource = cluster(client, ns, CLUSTER).await?;
        let generation = resource.metadata.generation;
        let status = resource.status.ok_or("no status yet")?;
        let applied = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ParametersApplied")
            .ok_or("no ParametersApplied condition")?;
        let replicas_ready = status
            .instances
            .iter()
            .filter(|i| i.role == InstanceRole::Replica && i.ready)
            .count();
        if status.phase == Some(Phase::Healthy)
            && status.ready.as_deref() == Some("3/3")
            && replicas_ready == 2
            && status.observed_generation == generation
            && applied.status == "True"
        {
            Ok(status)
        } else {
            Err(format!(
                "{:?} {:?} applied={} ({}: {})",
                status.phase, status.ready, applied.status, applied.reason, applied.message
            ))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// `SHOW name` and the postmaster start time of every pod.
async fn settings(
    client: &Client,
    ns: &str,
    password: &Login,
    name: &str,
) -> Result<BTreeMap<String, (String, String)>, String> {
    let ips = pod_ips(client, ns, CLUSTER).await;
    let mut seen = BTreeMap::new();
    for pod in PODS {
        let ip = ips.get(pod).ok_or(format!("{pod} has no IP"))?;
        let db = connect(ip, password).await?;
        let row = db
            .query_one(
                &format!("SELECT current_setting('{name}'), pg_postmaster_start_time()::text"),
                &[],
            )
            .await
            .map_err(|e| format!("{pod}: {e}"))?;
        seen.insert(pod.to_string(), (row.get(0), row.get(1)));
    }
    Ok(seen)
}

async fn wait_setting(
    client: &Client,
    ns: &str,
    password: &Login,
    name: &str,
    value: &str,
) -> BTreeMap<String, (String, String)> {
    eventually(
        &format!("{name} = {value} on every pod"),
        Duration::from_secs(300),
        || async {
            let seen = settings(client, ns, password, name).await?;
            seen.values()
                .all(|(v, _)| v == value)
                .then_some(seen.clone())
                .ok_or(format!("{seen:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn patch_parameters(bed: &pgrs_testbed::TestBed, ns: &str, parameters: &str) {
    merge_patch_spec(
        bed,
        ns,
        CLUSTER,
        &format!("{{\"parameters\":{parameters}}}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_are_reloaded_or_rolled_out_replicas_first() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-params").await;
    let operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let status = wait_applied(&client, &ns_name, "basic cluster Healthy").await;
    let first_primary = status.current_primary.clone().expect("a primary");
    let password = app_login(&client, &ns_name, CLUSTER).await;
    let before = settings(&client, &ns_name, &password, "work_mem")
        .await
        .expect("read the settings");
    assert!(
        before.values().all(|(v, _)| v != "12MB"),
        "the test needs another work_mem to start from: {before:?}"
    );

    // A reload-only parameter: every pod shows it, no postmaster restarted.
    let reload_requested = Instant::now();
    patch_parameters(bed, &ns_name, r#"{"work_mem":"12MB"}"#);
    let reloaded = wait_setting(&client, &ns_name, &password, "work_mem", "12MB").await;
    let reload_took = reload_requested.elapsed();
    for pod in PODS {
        assert_eq!(
            before[pod].1, reloaded[pod].1,
            "{pod} restarted for a reload-only parameter"
        );
    }
    wait_applied(&client, &ns_name, "work_mem applied").await;

    // A restart parameter: standbys restart first, then the primary role moves.
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let db = connect(&ips[&first_primary], &password)
        .await
        .expect("connect to the primary");
    db.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, note text); INSERT INTO t VALUES (1, 'before')",
    )
    .await
    .expect("write before the rollout");
    drop(db);
    let before = settings(&client, &ns_name, &password, "shared_buffers")
        .await
        .expect("read the settings");
    assert!(
        before.values().all(|(v, _)| v != "32MB"),
        "the test needs another shared_buffers to start from: {before:?}"
    );
    let restart_requested = Instant::now();
    patch_parameters(
        bed,
        &ns_name,
        r#"{"work_mem":"12MB","shared_buffers":"32MB"}"#,
    );
    let restarted = wait_setting(&client, &ns_name, &password, "shared_buffers", "32MB").await;
    let status = wait_applied(&client, &ns_name, "shared_buffers applied").await;
    let rollout_took = restart_requested.elapsed();
    let after = settings(&client, &ns_name, &password, "shared_buffers")
        .await
        .expect("read the settings");
    for pod in PODS {
        assert_ne!(before[pod].1, after[pod].1, "{pod} was not restarted");
        assert_eq!(after[pod].0, "32MB");
    }
    assert_eq!(
        settings(&client, &ns_name, &password, "work_mem")
            .await
            .expect("read work_mem")
            .values()
            .map(|(v, _)| v.as_str())
            .collect::<Vec<_>>(),
        ["12MB"; 3],
        "the reload-only parameter survives the restarts"
    );
    // Start times on one machine (the test bed's pods share the host clock): the former
    // primary came back after every standby had restarted.
    let primary_start = &restarted[&first_primary].1;
    for pod in PODS.iter().filter(|p| **p != first_primary) {
        assert!(
            restarted[*pod].1 < *primary_start,
            "{pod} restarted at {} but the primary {first_primary} at {primary_start}",
            restarted[*pod].1
        );
    }
    let new_primary = status.current_primary.clone().expect("a primary");
    assert_ne!(
        new_primary, first_primary,
        "the primary role moved before the primary restarted"
    );
    let record = status.last_failover.expect("status.lastFailover");
    assert_eq!(record.reason, "Switchover");
    assert_eq!(record.from.as_deref(), Some(first_primary.as_str()));

    // Writes go on through the new primary and reach the standbys.
    let ips = pod_ips(&client, &ns_name, CLUSTER).await;
    let db = connect(&ips[&new_primary], &password)
        .await
        .expect("connect to the new primary");
    db.batch_execute("INSERT INTO t VALUES (2, 'after')")
        .await
        .expect("write after the switchover");
    for pod in PODS.iter().filter(|p| **p != new_primary) {
        let ip = ips[*pod].clone();
        let password = password.clone();
        eventually(
            &format!("{pod} has both rows"),
            Duration::from_secs(60),
            || async {
                let replica = connect(&ip, &password).await?;
                let rows = replica
                    .query("SELECT id FROM t ORDER BY id", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
                (ids == [1, 2]).then_some(()).ok_or(format!("{ids:?}"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    let events = event_reasons(bed, &ns_name);
    let story = kubectl(
        bed,
        &[
            "get",
            "events",
            "-n",
            &ns_name,
            "--sort-by=.metadata.creationTimestamp",
            "-o",
            "custom-columns=REASON:.reason,MESSAGE:.note,MSG:.message",
        ],
    );
    eprintln!("{story}");
    for reason in [
        "ParametersReloaded",
        "RestartingInstance",
        "InstanceRestarted",
        "SwitchoverForRestart",
        "ParametersApplied",
    ] {
        assert!(
            events.lines().any(|l| l == reason),
            "no {reason} event: {events}"
        );
    }
    eprintln!(
        "operator parameters: reload on 3 pods in {} ms; restart rollout (2 standbys, switchover, former primary) in {} ms",
        reload_took.as_millis(),
        rollout_took.as_millis()
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_primary_restarts_in_place() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-params-solo").await;
    let operator = OperatorProcess::start(bed, &ns_name);
    apply_manifest_text(
        bed,
        &ns_name,
        "apiVersion: pgrs.dev/v1alpha1\nkind: PgReplicaSet\nmetadata:\n  name: solo\nspec:\n  replicas: 1\n  storage:\n    size: 1Gi\n",
    );
    let healthy = |want_applied: bool| {
        let client = client.clone();
        let ns_name = ns_name.clone();
        async move {
            eventually("solo Healthy", Duration::from_secs(300), || async {
                let resource = cluster(&client, &ns_name, "solo").await?;
                let generation = resource.metadata.generation;
                let status = resource.status.ok_or("no status yet")?;
                let applied = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "ParametersApplied" && c.status == "True");
                (status.phase == Some(Phase::Healthy)
                    && status.ready.as_deref() == Some("1/1")
                    && status.observed_generation == generation
                    && (applied || !want_applied))
                    .then_some(status.clone())
                    .ok_or(format!("{:?} {:?}", status.phase, status.conditions))
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        }
    };
    healthy(true).await;
    let password = app_login(&client, &ns_name, "solo").await;
    let read = || async {
        let ip = pod_ips(&client, &ns_name, "solo")
            .await
            .get("solo-0")
            .cloned()
            .ok_or("solo-0 has no IP")?;
        let db = connect(&ip, &password).await?;
        let row = db
            .query_one(
                "SELECT current_setting('shared_buffers'), pg_postmaster_start_time()::text",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(String, String), String>((row.get(0), row.get(1)))
    };
    let (before, started) = read().await.expect("read shared_buffers");
    assert_ne!(before, "32MB", "the test needs another starting value");
    kubectl(
        bed,
        &[
            "patch",
            "pgrs",
            "solo",
            "-n",
            &ns_name,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"parameters":{"shared_buffers":"32MB"}}}"#,
        ],
    );
    let (_, restarted) = eventually("solo-0 runs 32MB", Duration::from_secs(300), || async {
        let (value, at) = read().await?;
        (value == "32MB")
            .then_some((value.clone(), at))
            .ok_or(value)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(started, restarted, "the postmaster restarted");
    let status = healthy(true).await;
    assert_eq!(status.current_primary.as_deref(), Some("solo-0"));
    assert!(
        status.last_failover.is_none(),
        "no switchover for a cluster of one: {:?}",
        status.last_failover
    );
    drop(operator);
}

/// `current_setting(name)` and the postmaster start time of a local agent's postgres.
async fn show(agent: &common::AgentProcess, name: &str) -> (String, String) {
    let db = agent.sql().await;
    let row = db
        .query_one(
            &format!("SELECT current_setting('{name}'), pg_postmaster_start_time()::text"),
            &[],
        )
        .await
        .expect("SHOW");
    (row.get(0), row.get(1))
}

/// Replaces `path` the way a kubelet updates a ConfigMap volume: a new file renamed over it.
fn swap_file(path: &std::path::Path, text: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, text).expect("write the new parameters file");
    std::fs::rename(&fresh, path).expect("swap the parameters file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_its_parameters_file_and_restarts_on_request() {
    use pgrs::protocol::api::{ParametersRequest, Role};
    let env = common::TestEnv::new("params-file");
    let file = env.path("parameters.conf");
    std::fs::write(&file, "work_mem = '5MB'\n").expect("write the parameters file");
    let mut agent = env
        .agent("p0")
        .arg("--parameters-file")
        .arg(file.to_string_lossy().to_string())
        .spawn();
    agent
        .wait_role(Role::Primary, Duration::from_secs(60))
        .await;
    // Read before the first start.
    let (work_mem, started) = show(&agent, "work_mem").await;
    assert_eq!(work_mem, "5MB");
    let first = agent.client.status().await.expect("status");
    let first_hash = first.parameters_hash.clone().expect("a parameters hash");
    assert_eq!(first.pending_restart, Some(Vec::new()));

    // A reload-only change of the file: applied without a restart.
    swap_file(&file, "work_mem = '7MB'\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    while show(&agent, "work_mem").await.0 != "7MB" {
        assert!(
            Instant::now() < deadline,
            "work_mem not reloaded; log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        show(&agent, "work_mem").await.1,
        started,
        "no restart for work_mem"
    );

    // A restart parameter: reported as pending until a restart.
    swap_file(&file, "work_mem = '7MB'\nshared_buffers = '24MB'\n");
    let expected = pgrs::protocol::names::parameters_hash(
        &[
            ("shared_buffers".to_string(), "24MB".to_string()),
            ("work_mem".to_string(), "7MB".to_string()),
        ]
        .into(),
    );
    assert_ne!(expected, first_hash);
    // The hash moves once the postmaster has re-read the file (never before).
    let pending = agent
        .wait_for("shared_buffers pending", Duration::from_secs(30), |s| {
            s.parameters_hash.as_deref() == Some(expected.as_str())
                && s.pending_restart
                    .as_ref()
                    .is_some_and(|p| p.iter().any(|n| n == "shared_buffers"))
        })
        .await;
    assert_eq!(
        show(&agent, "shared_buffers").await.0,
        "16MB",
        "not applied before a restart"
    );

    // Agent-owned names are refused over HTTP; the restart needs the token.
    let refused = agent
        .client
        .parameters(&ParametersRequest {
            parameters: [("port".to_string(), "1".to_string())].into(),
        })
        .await
        .expect_err("port is agent-owned");
    assert!(refused.to_string().contains("port"), "{refused}");
    let anonymous = pgrs::protocol::client::AgentClient::new(
        format!("http://127.0.0.1:{}", agent.spec.http_port),
        None,
    )
    .expect("client");
    assert!(
        anonymous.restart().await.is_err(),
        "a restart needs the token"
    );

    agent.client.restart().await.expect("restart");
    let after = agent
        .wait_for("nothing pending", Duration::from_secs(60), |s| {
            s.role == Role::Primary && s.pending_restart == Some(Vec::new())
        })
        .await;
    assert_eq!(after.parameters_hash, pending.parameters_hash);
    assert_eq!(after.parameters_hash.as_deref(), Some(expected.as_str()));
    let (shared_buffers, restarted) = show(&agent, "shared_buffers").await;
    assert_eq!(shared_buffers, "24MB");
    assert_ne!(restarted, started, "the postmaster restarted");
    assert_eq!(show(&agent, "work_mem").await.0, "7MB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_max_connections_restarts_the_primary_first() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-params-lower").await;
    let operator = OperatorProcess::start(bed, &ns_name);
    apply_manifest_text(
        bed,
        &ns_name,
        "apiVersion: pgrs.dev/v1alpha1\nkind: PgReplicaSet\nmetadata:\n  name: low\nspec:\n  replicas: 2\n  storage:\n    size: 1Gi\n",
    );
    let healthy = || async {
        eventually("low Healthy", Duration::from_secs(300), || async {
            let resource = cluster(&client, &ns_name, "low").await?;
            let generation = resource.metadata.generation;
            let status = resource.status.ok_or("no status yet")?;
            let applied = status
                .conditions
                .iter()
                .any(|c| c.type_ == "ParametersApplied" && c.status == "True");
            let all_ready = status.instances.iter().all(|i| i.ready);
            (status.phase == Some(Phase::Healthy)
                && status.ready.as_deref() == Some("2/2")
                && all_ready
                && status.observed_generation == generation
                && applied)
                .then_some(status.clone())
                .ok_or(format!("{:?} {:?}", status.phase, status.conditions))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let primary = healthy().await.current_primary.expect("a primary");
    let replica = ["low-0", "low-1"]
        .into_iter()
        .find(|p| *p != primary)
        .expect("a standby")
        .to_string();
    let password = app_login(&client, &ns_name, "low").await;
    let read = |pod: String| {
        let client = client.clone();
        let ns_name = ns_name.clone();
        let password = password.clone();
        async move {
            let ip = pod_ips(&client, &ns_name, "low")
                .await
                .get(&pod)
                .cloned()
                .ok_or(format!("{pod} has no IP"))?;
            let db = connect(&ip, &password).await?;
            let row = db
                .query_one(
                    "SELECT current_setting('max_connections'), pg_postmaster_start_time()::text",
                    &[],
                )
                .await
                .map_err(|e| e.to_string())?;
            Ok::<(String, String), String>((row.get(0), row.get(1)))
        }
    };
    let (before, primary_started) = read(primary.clone()).await.expect("read the primary");
    let (_, replica_started) = read(replica.clone()).await.expect("read the standby");
    assert_eq!(before, "100", "the test lowers the default max_connections");
    kubectl(
        bed,
        &[
            "patch",
            "pgrs",
            "low",
            "-n",
            &ns_name,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"parameters":{"max_connections":"50"}}}"#,
        ],
    );
    let mut restarted = BTreeMap::new();
    for pod in [&primary, &replica] {
        let at = eventually(
            &format!("{pod} runs max_connections 50"),
            Duration::from_secs(300),
            || async {
                let (value, at) = read(pod.clone()).await?;
                (value == "50").then_some(at).ok_or(value)
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        restarted.insert(pod.clone(), at);
    }
    let status = healthy().await;
    assert_ne!(restarted[&primary], primary_started);
    assert_ne!(restarted[&replica], replica_started);
    assert!(
        restarted[&primary] < restarted[&replica],
        "the primary restarts before the standby when lowering: {restarted:?}"
    );
    assert_eq!(
        status.current_primary.as_deref(),
        Some(primary.as_str()),
        "restarted in place, no switchover"
    );
    assert!(status.last_failover.is_none(), "{:?}", status.last_failover);
    drop(operator);
}
