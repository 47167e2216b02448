//! The container image: `scripts/build-image` builds it from the `Dockerfile` with podman around
//! this build's `pgrs` (the test binary's sibling), then it runs the way the operator's
//! StatefulSet runs a database pod. The container is derived from the built StatefulSet itself:
//! its arguments, environment, ports, user and group, read-only root filesystem, dropped
//! capabilities, no privilege escalation, grace period, and its volumes (the data volume and the
//! Secret and ConfigMap volumes as host directories owned by the `fsGroup`, the emptyDirs as
//! tmpfs). One deviation: there is no Kubernetes API, so the agent starts as a standalone primary
//! (`--role=primary` instead of `--role=wait`, and no `PGRS_LEASE_NAME`: no Lease at all).
//!
//! Needs podman (scripts/setup-debian installs it and its settings) and root; skipped only when
//! podman is missing. PostgreSQL 15 only: the other majors' packages come from PGDG
//! (docs/testing.md, "The image").

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use pgrs::api::PgReplicaSet;
use pgrs::operator::build::{BuildInput, ClusterObjects, ClusterSecrets, build, names};

/// One instance; a parameter from the ConfigMap, to see that the agent applies it.
const CLUSTER: &str = r#"
apiVersion: pgrs.dev/v1alpha1
kind: PgReplicaSet
metadata:
  name: img
  namespace: db
  uid: 0c6f2b7e-3a51-4c1e-9a57-2f9b1d0e7a11
spec:
  replicas: 1
  storage:
    size: 1Gi
  parameters:
    work_mem: 8MB
  # The operator's certificates are made by its reconcile, not by `build`; TLS on real
  # processes is `operator_tls`'s and `local_tls`'s. This test is about the container.
  tls:
    enabled: false
"#;

const BOOT: Duration = Duration::from_secs(120);

fn podman_present() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// False (and says why) when podman is not installed: the only reason to skip.
fn podman_or_skip(test: &str) -> bool {
    if podman_present() {
        assert_eq!(
            std::fs::metadata("/proc/self").expect("/proc").uid(),
            0,
            "{test}: the image tests run rootful podman and chown volumes to uid 999: run as root"
        );
        return true;
    }
    eprintln!(
        "SKIPPED {test}: podman is not installed (scripts/setup-debian installs podman, buildah, \
         runc and debootstrap); the container image is not tested"
    );
    false
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman runs")
}

/// Runs podman and returns its trimmed stdout; panics with its stderr when it fails.
fn podman_ok(args: &[&str]) -> String {
    let output = podman(args);
    assert!(
        output.status.success(),
        "podman {args:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The image of this build's `pgrs` (built once per test binary; `scripts/build-image` skips
/// the build when the image exists for the same binary).
fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let started = Instant::now();
        let output = Command::new(root.join("scripts/build-image"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_pgrs"))
            .current_dir(root)
            .output()
            .expect("scripts/build-image runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        eprint!("{stderr}");
        assert!(
            output.status.success(),
            "scripts/build-image failed ({}): {stderr}",
            output.status
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let image = stdout.lines().last().expect("the image name").to_string();
        eprintln!("image {image} ready in {:.1?}", started.elapsed());
        image
    })
}

fn cluster_objects(image: &str) -> ClusterObjects {
    let cluster: PgReplicaSet = serde_yaml::from_str(CLUSTER).expect("a PgReplicaSet");
    build(&BuildInput {
        cluster: &cluster,
        default_image: image,
        secrets: &ClusterSecrets {
            superuser_password: "image-superuser".to_string(),
            replication_password: "image-replication".to_string(),
            agent_token: "image-agent-token".to_string(),
            app_password: "image-app".to_string(),
        },
    })
    .expect("the cluster builds")
}

/// A directory on the host owned by root and `group`, like a volume with `fsGroup`.
fn volume_dir(path: &Path, group: u32, mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    chown(path, Some(0), Some(group)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Files of a Secret or ConfigMap volume: `mode`, owned by root and `group`.
fn volume_files(path: &Path, files: &BTreeMap<String, Vec<u8>>, group: u32, mode: u32) {
    volume_dir(path, group, 0o755);
    for (name, content) in files {
        let file = path.join(name);
        std::fs::write(&file, content).unwrap();
        chown(&file, Some(0), Some(group)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

/// A running container; removed (with SIGKILL) when dropped.
struct Pod {
    name: String,
    /// The host side of its volumes.
    dir: tempfile::TempDir,
    grace: Duration,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
    }
}

impl Pod {
    fn exec(&self, script: &str) -> Output {
        podman(&["exec", &self.name, "sh", "-c", script])
    }

    fn exec_ok(&self, script: &str) -> String {
        podman_ok(&["exec", &self.name, "sh", "-c", script])
    }

    fn logs(&self) -> String {
        let output = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    fn running(&self) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]) == "true"
    }

    /// The host address the container's `port` is published on.
    fn published(&self, port: u16) -> String {
        let line = podman_ok(&["port", &self.name, &format!("{port}/tcp")]);
        line.lines().next().expect("a published port").to_string()
    }

    /// Until postgres accepts connections (`pg_isready` of the image, over TCP in the
    /// container).
    fn wait_ready(&self) {
        let deadline = Instant::now() + BOOT;
        loop {
            let ready = self.exec(&format!(
                "pg_isready --quiet --host=127.0.0.1 --port={}",
                names::POSTGRES_PORT
            ));
            if ready.status.success() {
                return;
            }
            assert!(
                self.running(),
                "the container exited before postgres was ready:\n{}",
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "postgres not ready after {BOOT:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Runs `objects`' first StatefulSet's pod 0 with podman, as the kubelet would (see the module
/// documentation for the one deviation). Asserts on the way that the pod template still asks
/// for what the podman options give.
fn run_pod(objects: &ClusterObjects, image: &str) -> Pod {
    let statefulset = &objects.statefulsets[0];
    let sts_name = statefulset.metadata.name.clone().expect("a name");
    let namespace = statefulset.metadata.namespace.clone().expect("a namespace");
    let sts_spec = &statefulset.spec;
    let template: &PodSpec = sts_spec.template.spec.as_ref().expect("a pod spec");
    let container: &Container = &template.containers[0];
    assert_eq!(container.image.as_deref(), Some(image));
    let pod_security = template
        .security_context
        .as_ref()
        .expect("pod securityContext");
    let user = pod_security.run_as_user.expect("runAsUser");
    let group = pod_security.run_as_group.expect("runAsGroup");
    let fs_group = u32::try_from(pod_security.fs_group.expect("fsGroup")).unwrap();
    assert_eq!(user, names::POSTGRES_UID);
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let drop = security.capabilities.as_ref().and_then(|c| c.drop.clone());
    assert_eq!(drop, Some(vec!["ALL".to_string()]));
    let grace = template
        .termination_grace_period_seconds
        .expect("a grace period");

    let pod_name = format!("{sts_name}-0");
    let name = format!("pgrs-image-test-{}-{pod_name}", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix("pgrs-image-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--pull=never",
        "--name",
        &name,
        "--hostname",
        &pod_name,
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--user={user}:{group}"));
    args.push(format!("--group-add={fs_group}"));
    args.push(format!("--stop-timeout={grace}"));
    for port in container.ports.iter().flatten() {
        args.push(format!("--publish=127.0.0.1::{}", port.container_port));
    }

    let volumes = template.volumes.clone().unwrap_or_default();
    for mount in container.volume_mounts.iter().flatten() {
        let read_only = if mount.read_only == Some(true) {
            ":ro"
        } else {
            ""
        };
        let host: PathBuf = dir.path().join(&mount.name);
        let volume = volumes.iter().find(|v| v.name == mount.name);
        match volume {
            // The data volume (a volumeClaimTemplate): fsGroup-owned and setgid, like a fresh
            // PersistentVolume after the kubelet applied fsGroup.
            None => {
                assert_eq!(mount.name, names::DATA_VOLUME, "a volume without a source");
                volume_dir(&host, fs_group, 0o2770);
                args.push(format!("--volume={}:{}", host.display(), mount.mount_path));
            }
            Some(volume) if volume.empty_dir.is_some() => {
                args.push(format!("--tmpfs={}", mount.mount_path));
            }
            Some(volume) if volume.secret.is_some() => {
                let source = volume.secret.as_ref().unwrap();
                let secret_name = source.secret_name.as_deref().unwrap();
                let secret = [&objects.secret, &objects.app_secret]
                    .into_iter()
                    .find(|s| s.metadata.name.as_deref() == Some(secret_name))
                    .expect("the Secret of the volume");
                let mut files: BTreeMap<String, Vec<u8>> = secret
                    .data
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.0))
                    .collect();
                if let Some(items) = &source.items {
                    files = items
                        .iter()
                        .map(|item| (item.path.clone(), files[&item.key].clone()))
                        .collect();
                }
                let mode = u32::try_from(source.default_mode.unwrap_or(0o644)).unwrap();
                volume_files(&host, &files, fs_group, mode);
                args.push(format!(
                    "--volume={}:{}{read_only}",
                    host.display(),
                    mount.mount_path
                ));
            }
            Some(volume) if volume.config_map.is_some() => {
                let map_name = &volume.config_map.as_ref().unwrap().name;
                assert_eq!(objects.config_map.metadata.name.as_ref(), Some(map_name));
                let files = objects
                    .config_map
                    .data
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.into_bytes()))
                    .collect();
                volume_files(&host, &files, fs_group, 0o644);
                args.push(format!(
                    "--volume={}:{}{read_only}",
                    host.display(),
                    mount.mount_path
                ));
            }
            Some(volume) => panic!("no podman equivalent for the volume {volume:?}"),
        }
    }

    for env in container.env.iter().flatten() {
        if env.name == "PGRS_LEASE_NAME" {
            continue; // no Kubernetes API here: a standalone primary, no Lease
        }
        let value = match (&env.value, &env.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .expect("a fieldRef")
                    .field_path
                    .as_str();
                match field {
                    "metadata.name" => pod_name.clone(),
                    "metadata.namespace" => namespace.clone(),
                    "metadata.uid" => "5d0c9a1e-6f7b-4d2a-8c3e-1b2a3c4d5e6f".to_string(),
                    // Read by nothing in the agent without the API (kube mode reads the pod).
                    "status.podIP" => continue,
                    other => panic!("no value for the downward API field {other}"),
                }
            }
            (None, None) => String::new(),
        };
        args.push(format!("--env={}={value}", env.name));
    }

    args.push(image.to_string());
    let agent_args = container.args.clone().expect("the agent's arguments");
    let wait_role = format!("--role={}", names::AGENT_STARTUP_ROLE);
    assert!(agent_args.contains(&wait_role), "{agent_args:?}");
    for arg in agent_args {
        args.push(if arg == wait_role {
            "--role=primary".to_string()
        } else {
            arg
        });
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eprintln!("podman {}", args.join(" "));
    podman_ok(&args);
    Pod {
        name,
        dir,
        grace: Duration::from_secs(u64::try_from(grace).unwrap()),
    }
}

/// Connects through the published postgres port as the application owner, retrying while the
/// agent creates the role and database after postgres is up.
async fn app_client(pod: &Pod) -> tokio_postgres::Client {
    let address = pod.published(names::POSTGRES_PORT);
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse().unwrap())
        .user("app")
        .password("image-app")
        .dbname("app")
        .connect_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + BOOT;
    loop {
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                return client;
            }
            Err(error) if Instant::now() < deadline => {
                eprintln!("connecting to {address} as app: {error}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!(
                "no connection to {address} as app after {BOOT:?}: {error}\n{}",
                pod.logs()
            ),
        }
    }
}

/// A plain HTTP/1.1 GET: the response's status line, headers and body.
fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// `podman stop` (SIGTERM to PID 1, the agent; SIGKILL after the grace period): returns the
/// time it took and the exit code.
fn stop(pod: &Pod) -> (Duration, String) {
    let started = Instant::now();
    podman_ok(&["stop", &pod.name]);
    let took = started.elapsed();
    let code = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &pod.name]);
    (took, code)
}

#[test]
fn the_image_runs_pgrs_as_its_entrypoint_and_as_postgres() {
    if !podman_or_skip("the_image_runs_pgrs_as_its_entrypoint_and_as_postgres") {
        return;
    }
    let image = image();
    let config = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{.Config.User}}",
        image,
    ]);
    assert_eq!(config, r#"["/usr/local/bin/pgrs"] postgres"#);
    let version = podman_ok(&["run", "--rm", "--pull=never", image, "--version"]);
    assert_eq!(version, format!("pgrs {}", env!("CARGO_PKG_VERSION")));
    // The uid the pods' securityContext (runAsUser, fsGroup) and the test bed rely on.
    let id = podman_ok(&[
        "run",
        "--rm",
        "--pull=never",
        "--entrypoint=sh",
        image,
        "-c",
        "echo $(id -un) $(id -u) $(id -g)",
    ]);
    assert_eq!(id, "postgres 999 999");
}

#[tokio::test]
async fn a_database_pod_of_the_image_serves_sql_read_only_as_uid_999_and_stops_cleanly() {
    if !podman_or_skip(
        "a_database_pod_of_the_image_serves_sql_read_only_as_uid_999_and_stops_cleanly",
    ) {
        return;
    }
    let image = image();
    let objects = cluster_objects(image);
    let pod = run_pod(&objects, image);
    pod.wait_ready();

    // PID 1 is the agent, by the image's entrypoint; every process is uid 999.
    let cmdline = pod.exec_ok("tr '\\0' ' ' </proc/1/cmdline");
    assert!(
        cmdline.starts_with("/usr/local/bin/pgrs agent "),
        "PID 1: {cmdline}"
    );
    // (Processes may end while listed: the agent's probes connect every second.)
    let processes = pod.exec_ok(
        "for p in /proc/[0-9]*; do \
           s=$(cat $p/status 2>/dev/null) && [ -n \"$s\" ] || continue; \
           echo \"$s\" | awk '/^Name:/ {n = $2} /^Uid:/ {u = $2} END {print u, n}'; \
         done",
    );
    let postgres: Vec<&str> = processes
        .lines()
        .filter(|line| line.ends_with(" postgres"))
        .collect();
    assert!(!postgres.is_empty(), "no postgres process: {processes}");
    for line in processes.lines() {
        assert!(line.starts_with("999 "), "a process not of uid 999: {line}");
    }
    // The postmaster, by its pid file, is uid 999.
    let data_dir = pod.dir.path().join(names::DATA_VOLUME).join("pgdata");
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    let postmaster = pid_file.lines().next().unwrap().trim();
    let owner = pod.exec_ok(&format!("stat -c '%u %g' /proc/{postmaster}"));
    assert_eq!(owner, "999 999", "postmaster {postmaster}");
    // The data directory belongs to 999, seen from inside and from the host.
    let owner = pod.exec_ok(&format!("stat -c '%u:%g %a' {}", names::DATA_DIR));
    assert_eq!(owner, "999:999 700");
    assert_eq!(std::fs::metadata(&data_dir).unwrap().uid(), 999);
    // No capabilities, no privilege escalation.
    let status = pod.exec_ok("grep -E '^(CapEff|CapPrm|NoNewPrivs):' /proc/1/status");
    assert_eq!(
        status.split_whitespace().collect::<Vec<_>>(),
        [
            "CapPrm:",
            "0000000000000000",
            "CapEff:",
            "0000000000000000",
            "NoNewPrivs:",
            "1"
        ]
    );
    // A read-only root filesystem; the volumes are writable.
    let write = pod.exec("touch /usr/pgrs-image-test");
    assert!(!write.status.success(), "wrote to /usr");
    let error = String::from_utf8_lossy(&write.stderr);
    assert!(error.contains("Read-only file system"), "{error}");
    pod.exec_ok("touch /tmp/pgrs-image-test /var/run/pgrs/pgrs-image-test");

    // SQL through the published port, as the application owner the agent created, with the
    // ConfigMap's parameter applied.
    let client = app_client(&pod).await;
    let row = client
        .query_one(
            "SELECT current_user::text, current_setting('work_mem')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app");
    assert_eq!(row.get::<_, String>(1), "8MB");
    client
        .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        .await
        .unwrap();
    drop(client);
    // The agent answers its probes on the published agent port.
    let ready = http_get(&pod.published(names::AGENT_PORT), "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // SIGTERM to PID 1: the agent stops postgres (fast) and exits 0 well within the grace
    // period. (143 would be PID 1 killed by the signal, 137 a SIGKILL after the grace period.)
    let (took, code) = stop(&pod);
    let logs = pod.logs();
    assert_eq!(code, "0", "exit code after SIGTERM:\n{logs}");
    assert!(took < pod.grace, "podman stop took {took:?}:\n{logs}");
    assert!(
        logs.contains("received fast shutdown request")
            && logs.contains("database system is shut down"),
        "no clean shutdown of postgres:\n{logs}"
    );
    eprintln!("stopped in {took:.1?}, exit code {code}");

    // Started again on the same volume: no crash recovery (the shutdown was clean), the data
    // is there.
    podman_ok(&["start", &pod.name]);
    pod.wait_ready();
    let logs = pod.logs();
    assert!(
        !logs.contains("was interrupted") && !logs.contains("not properly shut down"),
        "crash recovery after the clean stop:\n{logs}"
    );
    let client = app_client(&pod).await;
    let row = client.query_one("SELECT v FROM kept", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    drop(client);
    let (_, code) = stop(&pod);
    assert_eq!(code, "0", "exit code after the second SIGTERM");
}
