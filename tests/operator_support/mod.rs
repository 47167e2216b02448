//! Shared by the operator tests: the CRD, the operator as a process, and reading the cluster
//! through the API (pod IPs only: the test bed has no Service routing).

#![allow(dead_code)]

pub mod faults;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use pgrs::api::{InstanceStatus, PgReplicaSet, PgReplicaSetStatus, Phase};
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, TestNamespace};

pub const IMAGE: &str = "ghcr.io/pgrs-dev/pgrs:dev";

pub async fn bed() -> &'static TestBed {
    match pgrs_testbed::shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Runs `kubectl args...`, panicking with its output on failure; returns stdout.
pub fn kubectl(bed: &TestBed, args: &[&str]) -> String {
    let output = bed
        .kubectl()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run kubectl {args:?}: {e}"));
    assert!(
        output.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Installs the committed CRD (idempotent: one control plane per test binary) and waits until
/// it is served.
pub async fn install_crd(bed: &TestBed) {
    let crd = repo_path("crds/pgreplicaset.yaml");
    kubectl(bed, &["apply", "-f", &crd.to_string_lossy()]);
    // Polled: `kubectl wait` fails outright while the CRD has no conditions yet.
    pgrs_testbed::wait::eventually(
        "the CRD is established",
        Duration::from_secs(60),
        || async {
            // Not `kubectl()`: right after the apply the CRD may have no conditions at all,
            // and the jsonpath filter then fails; that is "not yet", not an error.
            let output = bed
                .kubectl()
                .args([
                    "get",
                    "crd/pgreplicasets.pgrs.dev",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                ])
                .output()
                .map_err(|e| format!("run kubectl: {e}"))?;
            let established = String::from_utf8_lossy(&output.stdout).into_owned();
            (output.status.success() && established.trim() == "True")
                .then_some(())
                .ok_or_else(|| format!("{established}{}", String::from_utf8_lossy(&output.stderr)))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// `pgrs operator` as a process with the admin kubeconfig, watching one namespace. Killed on
/// drop; its log is printed when the test fails.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
    health_port: u16,
    _dir: tempfile::TempDir,
}

impl OperatorProcess {
    pub fn start(bed: &TestBed, namespace: &str) -> OperatorProcess {
        OperatorProcess::start_with(bed, namespace, free_port(), &[])
    }

    /// Like `start`, with the health/metrics endpoint on `health_port` and `extra_args` after
    /// the common ones.
    pub fn start_with(
        bed: &TestBed,
        namespace: &str,
        health_port: u16,
        extra_args: &[&str],
    ) -> OperatorProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("operator.log");
        let file = std::fs::File::create(&log).expect("create the operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_pgrs"))
            .args([
                "operator",
                "--namespace",
                namespace,
                "--default-image",
                IMAGE,
                "--health-listen",
                &format!("127.0.0.1:{health_port}"),
            ])
            .args(extra_args)
            .env("KUBECONFIG", bed.admin_kubeconfig())
            .env("PGRS_LOG", "info,kube=warn")
            // Not in a pod: the operator must not take its identity from the test's environment.
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone the log handle"))
            .stderr(file)
            .spawn()
            .expect("start pgrs operator");
        OperatorProcess {
            child,
            log,
            health_port,
            _dir: dir,
        }
    }

    /// The loopback port of the health/metrics endpoint.
    pub fn health_port(&self) -> u16 {
        self.health_port
    }

    /// SIGKILLs the operator (no Lease release) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- operator log (last 80 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The usual start of an operator test: the shared bed with the CRD installed, a fresh
/// namespace (deleted when the returned guard drops), its name and an admin client.
pub async fn operator_test_namespace(
    prefix: &str,
) -> (&'static TestBed, TestNamespace<'static>, String, Client) {
    // Once per binary: its tests may run in parallel on one control plane.
    static CRD_INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let bed = bed().await;
    CRD_INSTALLED.get_or_init(|| install_crd(bed)).await;
    let ns = bed.namespace(prefix).await.expect("namespace");
    let ns_name = ns.name().to_string();
    let client = bed.client().await.expect("admin client");
    (bed, ns, ns_name, client)
}

/// `kubectl apply -n ns -f <repo>/relative` (e.g. `examples/basic.yaml`).
pub fn apply_repo_manifest(bed: &TestBed, ns: &str, relative: &str) {
    let manifest = repo_path(relative);
    kubectl(bed, &["apply", "-n", ns, "-f", &manifest.to_string_lossy()]);
}

/// Writes `yaml` to a temporary file and `kubectl apply -n ns -f` it.
pub fn apply_manifest_text(bed: &TestBed, ns: &str, yaml: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("manifest.yaml");
    std::fs::write(&manifest, yaml).expect("write the manifest");
    kubectl(bed, &["apply", "-n", ns, "-f", &manifest.to_string_lossy()]);
}

/// `kubectl patch pgrs <cluster> --type merge` with `{"spec": spec}`; `spec` is a JSON object.
pub fn merge_patch_spec(bed: &TestBed, ns: &str, cluster: &str, spec: &str) {
    kubectl(
        bed,
        &[
            "patch",
            "pgrs",
            cluster,
            "-n",
            ns,
            "--type",
            "merge",
            "-p",
            &format!("{{\"spec\":{spec}}}"),
        ],
    );
}

/// The status of PgReplicaSet `name`; an error while it has none yet.
pub async fn cluster_status(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<PgReplicaSetStatus, String> {
    cluster(client, ns, name)
        .await?
        .status
        .ok_or_else(|| "no status yet".to_string())
}

/// Waits until the 3-instance cluster `name` is Healthy with 3/3 ready (up to 180 s); returns
/// the current primary.
pub async fn wait_three_ready_healthy(client: &Client, ns: &str, name: &str, what: &str) -> String {
    eventually(what, Duration::from_secs(180), || async {
        let status = cluster_status(client, ns, name).await?;
        match (
            &status.phase,
            &status.current_primary,
            status.ready.as_deref(),
        ) {
            (Some(Phase::Healthy), Some(primary), Some("3/3")) => Ok(primary.clone()),
            _ => Err(format!(
                "{:?} {:?}: {:?}",
                status.phase, status.ready, status.instances
            )),
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until Service `service` selects exactly `address`; returns the time since `since`.
pub async fn wait_service_selects_only(
    client: &Client,
    ns: &str,
    service: &str,
    address: &str,
    what: &str,
    timeout: Duration,
    since: Instant,
) -> Duration {
    eventually(what, timeout, || async {
        let selected = endpoint_addresses(client, ns, service).await;
        (selected == [address])
            .then(|| since.elapsed())
            .ok_or(format!("{selected:?}"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The instance `name` of the status; an error while it is not listed.
pub fn listed_instance<'a>(
    status: &'a PgReplicaSetStatus,
    name: &str,
) -> Result<&'a InstanceStatus, String> {
    status
        .instances
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| format!("{name} is not listed"))
}

/// `reason: message` of every Event of the namespace, one a line.
pub fn event_lines(bed: &TestBed, ns: &str) -> String {
    kubectl(
        bed,
        &[
            "get",
            "events",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ],
    )
}

/// The reason of every Event of the namespace, one a line.
pub fn event_reasons(bed: &TestBed, ns: &str) -> String {
    kubectl(
        bed,
        &[
            "get",
            "events",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
        ],
    )
}

/// Asks for a planned switchover of `cluster` to `target` (the `pgrs.dev/switchover-to`
/// annotation).
pub fn request_switchover(bed: &TestBed, ns: &str, cluster: &str, target: &str) {
    kubectl(
        bed,
        &[
            "annotate",
            "pgrs",
            cluster,
            "-n",
            ns,
            &format!("pgrs.dev/switchover-to={target}"),
        ],
    );
}

/// Waits (up to 30 s) for an Event with `reason` whose line mentions `mentions`.
pub async fn wait_event(bed: &TestBed, ns: &str, reason: &str, mentions: &str) {
    eventually(
        &format!("an Event {reason} about {mentions}"),
        Duration::from_secs(30),
        || async {
            let events = event_lines(bed, ns);
            events
                .lines()
                .any(|l| l.starts_with(&format!("{reason}:")) && l.contains(mentions))
                .then_some(())
                .ok_or(events)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// An acknowledged write of a `WriteLoad`: its id, the `-rw` address and when it was acked.
pub type AckedWrite = (i64, String, Instant);

/// Runs `insert` (one `$1` bigint parameter) every 20 ms through whatever `<cluster>-rw`
/// points at, with ids counting up from `first_id`; remembers the acknowledged ones.
pub struct WriteLoad {
    acked: Arc<tokio::sync::Mutex<Vec<AckedWrite>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl WriteLoad {
    /// Creates `t (id bigint PRIMARY KEY)` on the primary at `primary_ip`, then starts one
    /// writer inserting ids 1, 2, … through `<cluster>-rw`; returns once writes flow.
    pub async fn start_on_new_table(
        client: &Client,
        ns: &str,
        cluster: &str,
        primary_ip: &str,
        login: &Login,
    ) -> WriteLoad {
        connect(primary_ip, login)
            .await
            .expect("connect to the primary")
            .batch_execute("CREATE TABLE t (id bigint PRIMARY KEY)")
            .await
            .expect("create a table");
        let writer = WriteLoad::start(
            client.clone(),
            ns.to_string(),
            cluster,
            login.clone(),
            1,
            "INSERT INTO t (id) VALUES ($1)",
        );
        writer.wait_writes_flow().await;
        writer
    }

    pub fn start(
        client: Client,
        ns: String,
        cluster: &str,
        login: Login,
        first_id: i64,
        insert: &'static str,
    ) -> WriteLoad {
        let acked = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let service = format!("{cluster}-rw");
        let task = {
            let acked = acked.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut next_id = first_id;
                let mut connection: Option<(String, tokio_postgres::Client)> = None;
                while !stop.load(Ordering::Relaxed) {
                    if connection.is_none() {
                        let addresses = endpoint_addresses(&client, &ns, &service).await;
                        if let [address] = addresses.as_slice()
                            && let Ok(db) = connect(address, &login).await
                        {
                            connection = Some((address.clone(), db));
                        }
                    }
                    if let Some((address, db)) = &connection {
                        let id = next_id;
                        next_id += 1;
                        let result = tokio::time::timeout(
                            Duration::from_secs(2),
                            db.execute(insert, &[&id]),
                        )
                        .await;
                        match result {
                            Ok(Ok(_)) => {
                                acked
                                    .lock()
                                    .await
                                    .push((id, address.clone(), Instant::now()))
                            }
                            _ => connection = None,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        WriteLoad { acked, stop, task }
    }

    /// The writes acknowledged so far, in order.
    pub async fn acked(&self) -> Vec<AckedWrite> {
        self.acked.lock().await.clone()
    }

    /// Waits (up to 30 s) until at least 20 writes were acknowledged.
    pub async fn wait_writes_flow(&self) {
        eventually("writes flow", Duration::from_secs(30), || async {
            let count = self.acked().await.len();
            (count >= 20)
                .then_some(())
                .ok_or(format!("{count} acknowledged"))
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits (up to 30 s) until at least 10 writes were acknowledged by `address`.
    pub async fn wait_writes_resume_on(&self, address: &str) {
        eventually(
            "writes resume on the new primary",
            Duration::from_secs(30),
            || async {
                let acked = self.acked().await;
                let on_new = acked.iter().filter(|(_, host, _)| host == address).count();
                (on_new >= 10)
                    .then_some(())
                    .ok_or(format!("{on_new} on the new primary"))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Stops the load; returns the acknowledged writes in order.
    pub async fn finish(self) -> Vec<AckedWrite> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.acked.lock().await.clone()
    }
}

pub async fn cluster(client: &Client, ns: &str, name: &str) -> Result<PgReplicaSet, String> {
    Api::<PgReplicaSet>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| e.to_string())
}

/// Pod name → pod IP of the cluster's pods.
pub async fn pod_ips(client: &Client, ns: &str, cluster: &str) -> BTreeMap<String, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("pgrs.dev/cluster={cluster}")))
        .await
        .expect("list pods");
    list.items
        .into_iter()
        .filter_map(|p| {
            let ip = p.status.and_then(|s| s.pod_ip)?;
            Some((p.metadata.name?, ip))
        })
        .collect()
}

/// Ready addresses of the EndpointSlices of Service `service`.
pub async fn endpoint_addresses(client: &Client, ns: &str, service: &str) -> Vec<String> {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await
        .expect("list endpoint slices");
    let mut addresses: Vec<String> = list
        .items
        .into_iter()
        .flat_map(|s| s.endpoints.unwrap_or_default())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .flat_map(|e| e.addresses)
        .collect();
    addresses.sort();
    addresses
}

/// Who a test logs in as to a pod's postgres, from the pod network.
#[derive(Clone, Debug)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub dbname: String,
}

async fn secret_data(client: &Client, ns: &str, name: &str) -> BTreeMap<String, String> {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("read the Secret {name}: {e}"));
    secret
        .data
        .expect("Secret data")
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v.0).expect("UTF-8 value")))
        .collect()
}

/// The application owner of `<cluster>-app` to its database: what the tests write and read
/// with (remote superuser logins are refused unless `enableSuperuserAccess: true`).
pub async fn app_login(client: &Client, ns: &str, cluster: &str) -> Login {
    let app = secret_data(client, ns, &format!("{cluster}-app")).await;
    Login {
        user: app["username"].clone(),
        password: app["password"].clone(),
        dbname: app["dbname"].clone(),
    }
}

/// The superuser (`<cluster>-secrets`): logs in from the pod network only with
/// `enableSuperuserAccess: true`.
pub async fn superuser_login(client: &Client, ns: &str, cluster: &str) -> Login {
    let data = secret_data(client, ns, &format!("{cluster}-secrets")).await;
    Login {
        user: "postgres".to_string(),
        password: data["superuser-password"].clone(),
        dbname: "postgres".to_string(),
    }
}

/// A session to `host`'s postgres as `login`, over TLS (not verified: the test reaches pods by
/// IP); the error is PostgreSQL's message when it gave one.
pub async fn connect(host: &str, login: &Login) -> Result<tokio_postgres::Client, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(5432)
        .user(&login.user)
        .password(&login.password)
        .dbname(&login.dbname)
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(2));
    // Pods refuse plain connections from the pod network (`hostnossl ... reject`).
    let tls = pgrs::tls::encrypt_only_connector().map_err(|e| e.to_string())?;
    let (client, connection) = config.connect(tls).await.map_err(|e| {
        let message = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_string());
        format!("connect to {host} as {}: {message}", login.user)
    })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
