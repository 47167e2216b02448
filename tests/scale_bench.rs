//! Scale benchmark of the operator on the test bed (issue 17) — a command, not a CI test:
//!
//! ```sh
//! cargo build --release --bin pgrs
//! PGRS_BIN=$PWD/target/release/pgrs PGRS_SCALE_CLUSTERS=10,25,50 \
//!     cargo test --test scale_bench -- --ignored --nocapture
//! ```
//!
//! One release `pgrs operator` (its own ServiceAccount, so that the API server's flow-control
//! metrics count its requests apart from the agents', the fake kubelet's and the controller
//! manager's) runs one 3-instance cluster `ha` and N single-instance background clusters
//! (`shared_buffers` 16MB, `max_connections` 20). At N = 0 and at every N of
//! `PGRS_SCALE_CLUSTERS` it measures, after the clusters settled: the operator's CPU
//! (`/proc/<pid>/stat` over a window) and RSS, the API requests per second it makes, its
//! reconciles per second and their p50/p99 (from its `/metrics` histogram), the time from a
//! `work_mem` change of `ha` to every pod of `ha` showing it, and the failover of `ha` (its
//! primary pod deleted under a write load: time to the first write acknowledged by the new
//! primary; `PGRS_SCALE_FAILOVERS` times per level, default 3: median and max). Background
//! clusters are created five at a time. The table goes to
//! `target/pgrs-reports/scale-<largest N>.md` and to stdout; `docs/scale.md` has the results.
//!
//! Not ignored: `the_dashboard_reads_nothing_while_nobody_looks` (the operator's dashboard
//! makes no API request while nobody asks for it).

#[path = "scale_bench/measure.rs"]
mod measure;
mod operator_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::{Api, Client};
use pgrs::api::{PgReplicaSet, Phase};
use pgrs_testbed::TestBed;
use pgrs_testbed::control_plane::client_from_kubeconfig;
use pgrs_testbed::wait::eventually;

use measure::{api_requests, measure_window, render};
use operator_support::{
    IMAGE, Login, WriteLoad, app_login, apply_manifest_text, connect, free_port, kubectl,
    merge_patch_spec, operator_test_namespace, pod_ips, repo_path,
};

const OPERATOR_ACCOUNT: &str = "pgrs-scale-operator";
const HA: &str = "ha";
/// Quiet time after the clusters are healthy, before the window.
const SETTLE: Duration = Duration::from_secs(20);
/// Background clusters created at once.
const BATCH: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: minutes and up to 50 clusters; run it by hand (see the module doc)"]
async fn scale_bench() {
    let pods_binary = std::env::var("PGRS_BIN").unwrap_or_default();
    assert!(
        pods_binary.contains("release"),
        "set PGRS_BIN to a release pgrs (cargo build --release --bin pgrs; PGRS_BIN=$PWD/target/release/pgrs): the pods and the operator must be release builds"
    );
    let levels: Vec<usize> = std::env::var("PGRS_SCALE_CLUSTERS")
        .unwrap_or_else(|_| "10,25,50".to_string())
        .split(',')
        .map(|n| n.trim().parse().expect("PGRS_SCALE_CLUSTERS: numbers"))
        .collect();
    let failovers: usize = std::env::var("PGRS_SCALE_FAILOVERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
        .max(1);
    bench(PathBuf::from(pods_binary), levels, failovers).await;
}

/// The operator's dashboard makes no API request while nobody looks (its clusters come from a
/// watch, not a LIST per refresh), and while someone looks, only its Lease reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_reads_nothing_while_nobody_looks() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("dash-idle").await;
    let account = "pgrs-dashboard";
    let schema = flow_schema(account, &ns_name);
    let kubeconfig = identity(bed, &client, &ns_name, account).await;
    let as_account =
        client_from_kubeconfig(kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("yaml"))
            .await
            .expect("token client");
    let clusters: Vec<String> = (1..=4)
        .map(|i| cluster_yaml(&format!("db-{i}"), 1))
        .collect();
    // No operator: the clusters have no status and no Lease; the dashboard lists them all.
    apply_manifest_text(bed, &ns_name, &clusters.join("---\n"));
    let app = pgrs::dashboard::operator_router(as_account, Some(ns_name.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    // The watch is set up (a LIST and a WATCH), then nothing while nobody asks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = api_requests(&client, &schema).await;
    tokio::time::sleep(pgrs::dashboard::OPERATOR_POLL * 4).await;
    let idle = api_requests(&client, &schema).await - before;
    assert!(
        idle <= 1.0,
        "{idle} API requests in {:?} with nobody looking at the dashboard",
        pgrs::dashboard::OPERATOR_POLL * 4
    );

    // Someone looks (the page asks every second): all four clusters, a Lease GET per cluster
    // per refresh (no cluster LIST).
    let before = api_requests(&client, &schema).await;
    let started = Instant::now();
    let mut answers = 0;
    while started.elapsed() < pgrs::dashboard::OPERATOR_POLL * 3 {
        let answer: serde_json::Value = reqwest::get(format!("http://{address}/api/clusters"))
            .await
            .expect("GET /api/clusters")
            .json()
            .await
            .expect("JSON");
        let names: Vec<&str> = answer["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["db-1", "db-2", "db-3", "db-4"], "{answer}");
        answers += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let looked = api_requests(&client, &schema).await - before;
    let refreshes =
        (started.elapsed().as_secs_f64() / pgrs::dashboard::OPERATOR_POLL.as_secs_f64()).ceil()
            + 1.0;
    assert!(
        looked >= 4.0 && looked <= 4.0 * (refreshes + 1.0),
        "{looked} API requests for {answers} answers over {:?} (one Lease GET per cluster per refresh, {refreshes} refreshes)",
        started.elapsed()
    );
    server.abort();
}

async fn bench(operator_binary: PathBuf, levels: Vec<usize>, failovers: usize) {
    let (bed, ns, ns_name, client) = operator_test_namespace("scale").await;
    let kubeconfig_dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = kubeconfig_dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        identity(bed, &client, &ns_name, OPERATOR_ACCOUNT).await,
    )
    .expect("write the kubeconfig");
    let schema = flow_schema(OPERATOR_ACCOUNT, &ns_name);
    let mut operator = Operator::start(&operator_binary, &kubeconfig, &ns_name);
    apply_manifest_text(bed, &ns_name, &cluster_yaml(HA, 3));
    wait_healthy(&client, &ns_name, 0).await;
    let password = app_login(&client, &ns_name, HA).await;
    let primary_ip = primary_ip(&client, &ns_name).await;
    connect(&primary_ip, &password)
        .await
        .expect("connect to the primary of ha")
        .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
        .await
        .expect("create the write table");

    let mut rows = Vec::new();
    let mut created = 0;
    for (round, background) in std::iter::once(0).chain(levels.iter().copied()).enumerate() {
        // In batches: N initdbs at once on two cores would time the API server out.
        let started = Instant::now();
        while background > created {
            let batch = (background - created).min(BATCH);
            let yaml: Vec<String> = (created + 1..=created + batch)
                .map(|i| background_yaml(&format!("bg-{i:03}")))
                .collect();
            apply_manifest_text(bed, &ns_name, &yaml.join("---\n"));
            created += batch;
            wait_healthy(&client, &ns_name, created).await;
        }
        wait_healthy(&client, &ns_name, background).await;
        eprintln!(
            "scale: {background} background clusters healthy ({:?})",
            started.elapsed()
        );
        tokio::time::sleep(SETTLE).await;
        let mut row =
            measure_window(&client, &schema, operator.pid(), operator.port, background).await;
        row.spec_change = spec_change(bed, &client, &ns_name, &password, round).await;
        let mut times = Vec::new();
        for attempt in 0..failovers {
            if attempt > 0 {
                wait_healthy(&client, &ns_name, background).await;
            }
            let (time, gap) = failover(&client, &ns_name, &password, round * 10 + attempt).await;
            times.push(time);
            row.write_gap = row.write_gap.max(gap);
        }
        times.sort();
        row.failover = times[times.len() / 2];
        row.failover_max = times.last().copied().unwrap_or_default();
        eprintln!("scale: {row:?}");
        rows.push(row);
        wait_healthy(&client, &ns_name, background).await;
    }
    let report = render(&rows);
    let largest = levels.iter().max().copied().unwrap_or(0);
    let path = repo_path(&format!("target/pgrs-reports/scale-{largest}.md"));
    std::fs::create_dir_all(path.parent().expect("reports dir")).expect("create the reports dir");
    std::fs::write(&path, &report).expect("write the report");
    println!("{report}\n(written to {})", path.display());
    operator.stop();
    drop(ns);
}

/// A ServiceAccount `account` bound to cluster-admin and a FlowSchema (named
/// [`flow_schema`]) that puts its requests, and only them, under its own name in the API
/// server's flow-control metrics; returns a kubeconfig (YAML) with its token.
async fn identity(bed: &TestBed, client: &Client, ns: &str, account: &str) -> String {
    let schema = flow_schema(account, ns);
    let manifest = format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: {account}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {schema}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}}
subjects: [{{kind: ServiceAccount, name: {account}, namespace: {ns}}}]
---
apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata: {{name: {schema}}}
spec:
  matchingPrecedence: 50
  priorityLevelConfiguration: {{name: workload-high}}
  distinguisherMethod: {{type: ByUser}}
  rules:
  - subjects: [{{kind: ServiceAccount, serviceAccount: {{name: {account}, namespace: {ns}}}}}]
    resourceRules: [{{verbs: ["*"], apiGroups: ["*"], resources: ["*"], clusterScope: true, namespaces: ["*"]}}]
    nonResourceRules: [{{verbs: ["*"], nonResourceURLs: ["*"]}}]
"#
    );
    apply_manifest_text(bed, ns, &manifest);
    let request = serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 7200}}))
        .expect("TokenRequest");
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .and_then(|s| s.token)
        .expect("a token");
    let kubeconfig = bed.token_kubeconfig(account, &token);
    // The FlowSchema reaches the API server's dispatcher a moment after it is created: wait
    // until a request of the account is counted under it.
    let as_account = client_from_kubeconfig(
        kube::config::Kubeconfig::from_yaml(&kubeconfig).expect("token kubeconfig"),
    )
    .await
    .expect("token client");
    eventually(
        "the account's requests are counted under its FlowSchema",
        Duration::from_secs(30),
        || async {
            let _ = Api::<ServiceAccount>::namespaced(as_account.clone(), ns)
                .get_opt(account)
                .await;
            let counted = api_requests(client, &schema).await;
            (counted > 0.0).then_some(()).ok_or(format!("{counted}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    kubeconfig
}

fn flow_schema(account: &str, ns: &str) -> String {
    format!("{account}-{ns}")
}

/// A background cluster: one instance, small, and a Lease of 30 s (renewal deadline 20 s), so
/// that the shared machine's load spikes do not fence it (the operator's cost is the same).
fn background_yaml(name: &str) -> String {
    format!(
        "{}  failover: {{leaseDurationSeconds: 30, renewDeadlineSeconds: 20}}\n",
        cluster_yaml(name, 1)
    )
}

fn cluster_yaml(name: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: pgrs.dev/v1alpha1
kind: PgReplicaSet
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  storage: {{size: 1Gi}}
  parameters: {{shared_buffers: "16MB", max_connections: "20"}}
"#
    )
}

/// The release operator as a process (log in a temp dir, shown at the end on failure).
struct Operator {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Operator {
    fn start(binary: &Path, kubeconfig: &Path, ns: &str) -> Operator {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).expect("create the operator log");
        let port = free_port();
        let child = Command::new(binary)
            .args(["operator", "--namespace", ns, "--default-image", IMAGE])
            .args(["--health-listen", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", kubeconfig)
            .env("PGRS_LOG", "info,kube=warn")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file)
            .spawn()
            .expect("start the operator");
        Operator {
            child,
            port,
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Waits until `ha` is Healthy 3/3 and `background` clusters are Healthy 1/1.
async fn wait_healthy(client: &Client, ns: &str, background: usize) -> Duration {
    let started = Instant::now();
    let api: Api<PgReplicaSet> = Api::namespaced(client.clone(), ns);
    let deadline = started + Duration::from_secs(180);
    loop {
        let list = api.list(&Default::default()).await.expect("list clusters");
        let healthy = |c: &PgReplicaSet, ready: &str| {
            c.status.as_ref().is_some_and(|s| {
                s.phase == Some(Phase::Healthy) && s.ready.as_deref() == Some(ready)
            })
        };
        let ha = list
            .items
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some(HA) && healthy(c, "3/3"));
        let others = list
            .items
            .iter()
            .filter(|c| c.metadata.name.as_deref() != Some(HA) && healthy(c, "1/1"))
            .count();
        if ha && others >= background {
            return started.elapsed();
        }
        if Instant::now() > deadline {
            let unhealthy: Vec<String> = list
                .items
                .iter()
                .filter(|c| !healthy(c, "1/1") && !healthy(c, "3/3"))
                .map(|c| {
                    let status = c.status.clone().unwrap_or_default();
                    format!(
                        "{}: {:?} {:?} {:?}",
                        c.metadata.name.clone().unwrap_or_default(),
                        status.phase,
                        status.ready,
                        status.instances.iter().map(|i| i.role).collect::<Vec<_>>()
                    )
                })
                .collect();
            panic!(
                "not healthy after {:?}: ha {ha}, {others}/{background} background; {unhealthy:?}",
                started.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn primary_ip(client: &Client, ns: &str) -> String {
    let status = operator_support::cluster_status(client, ns, HA)
        .await
        .expect("status of ha");
    let primary = status.current_primary.expect("ha has a primary");
    pod_ips(client, ns, HA)
        .await
        .remove(&primary)
        .expect("the primary's IP")
}

/// Sets `work_mem` of `ha` to a value of its own; the time until every pod of `ha` shows it.
async fn spec_change(
    bed: &TestBed,
    client: &Client,
    ns: &str,
    password: &Login,
    round: usize,
) -> Duration {
    let value = format!("{}kB", 4097 + 2 * round);
    let ips: Vec<String> = pod_ips(client, ns, HA).await.into_values().collect();
    let started = Instant::now();
    merge_patch_spec(
        bed,
        ns,
        HA,
        &format!(r#"{{"parameters":{{"work_mem":"{value}"}}}}"#),
    );
    let mut pending = ips;
    while !pending.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "work_mem {value} not on {pending:?} after 120 s"
        );
        let mut still = Vec::new();
        for ip in pending {
            let shown = match connect(&ip, password).await {
                Ok(db) => db
                    .query_one("SELECT current_setting('work_mem')", &[])
                    .await
                    .map(|row| row.get::<_, String>(0))
                    .unwrap_or_default(),
                Err(_) => String::new(),
            };
            if shown != value {
                still.push(ip);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    started.elapsed()
}

/// Deletes the primary pod of `ha` under a write load; the time to the first write
/// acknowledged by another pod, and the longest gap between acknowledged writes.
async fn failover(
    client: &Client,
    ns: &str,
    password: &Login,
    round: usize,
) -> (Duration, Duration) {
    let old = primary_ip(client, ns).await;
    let primary = operator_support::cluster_status(client, ns, HA)
        .await
        .expect("status")
        .current_primary
        .expect("primary");
    let writes = WriteLoad::start(
        client.clone(),
        ns.to_string(),
        HA,
        password.clone(),
        1 + 1_000_000 * round as i64,
        "INSERT INTO t (id) VALUES ($1)",
    );
    writes.wait_writes_flow().await;
    let deleted_at = Instant::now();
    // Not `kubectl()` of the bed: the admin kubeconfig, from this process.
    let bed = operator_support::bed().await;
    kubectl(bed, &["delete", "pod", &primary, "-n", ns, "--wait=false"]);
    let first = loop {
        let acked = writes.acked().await;
        if let Some((_, _, at)) = acked
            .iter()
            .find(|(_, host, at)| *host != old && *at > deleted_at)
        {
            break at.duration_since(deleted_at);
        }
        assert!(
            deleted_at.elapsed() < Duration::from_secs(60),
            "no write on a new primary 60 s after the primary pod was deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let acked = writes.finish().await;
    let gap = acked
        .windows(2)
        .map(|w| w[1].2.duration_since(w[0].2))
        .max()
        .unwrap_or_default();
    (first, gap)
}
