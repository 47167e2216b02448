//! Issue 14, step 2: a real node. The real kubelet (built from the control plane's Kubernetes
//! version), containerd with Debian's runc and the standard CNI plugins, registered with the
//! test bed's API server, run the pgrs image (imported into containerd from the podman build,
//! never pulled) in a namespace enforcing the `restricted` Pod Security Standard: as uid 999,
//! with a read-only root filesystem, all capabilities dropped and the runtime's default
//! seccomp profile. Checks `kubectl logs`, `kubectl exec` and `kubectl delete pod` through the
//! API server.
//!
//! Skipped, saying so, only when the node's binaries are not built (`testbed/node/build.sh`).
//! The image comes from `PGRS_REAL_NODE_IMAGE_ARCHIVE` (a `podman save`/`scripts/build-image
//! --save` archive) if set, else from `scripts/build-image --binary target/debug/pgrs --save`
//! when that binary exists, else from podman's storage (`podman save`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use pgrs_testbed::node::{NodeBinaries, NodeBinariesError, RealNode, RealNodeOptions};
use pgrs_testbed::testbed::error_chain;
use pgrs_testbed::wait::eventually;
use pgrs_testbed::{TestBed, shared};

const TIMEOUT: Duration = Duration::from_secs(120);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `ghcr.io/pgrs-dev/pgrs:<the workspace's version>`, what `scripts/build-image` tags.
fn image_name() -> String {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("a version in Cargo.toml");
    format!("ghcr.io/pgrs-dev/pgrs:{version}")
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// An archive of the pgrs image, and the image's name.
fn image_archive(dir: &Path) -> (PathBuf, String) {
    if let Some(archive) = std::env::var_os("PGRS_REAL_NODE_IMAGE_ARCHIVE") {
        return (PathBuf::from(archive), image_name());
    }
    let archive = dir.join("pgrs-image.tar");
    let started = Instant::now();
    let binary = workspace().join("target/debug/pgrs");
    let image = if binary.is_file() {
        let stdout = run(Command::new(workspace().join("scripts/build-image"))
            .arg("--binary")
            .arg(&binary)
            .arg("--save")
            .arg(&archive)
            .current_dir(workspace()));
        stdout
            .lines()
            .last()
            .expect("the image name")
            .trim()
            .to_owned()
    } else {
        let image = image_name();
        run(Command::new("podman").args(["image", "exists", &image]));
        run(Command::new("podman")
            .args(["save", "--quiet", "--format", "docker-archive", "--output"])
            .arg(&archive)
            .arg(&image));
        image
    };
    eprintln!(
        "image {image} saved to {} in {:.1?}",
        archive.display(),
        started.elapsed()
    );
    (archive, image)
}

/// The container securityContext the `restricted` standard asks for, as uid 999.
fn restricted_container(name: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "image": image,
        "imagePullPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 999,
            "runAsGroup": 999,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    })
}

async fn get_pod(pods: &Api<Pod>, name: &str) -> Result<Pod, String> {
    pods.get(name).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_restricted_on_a_real_node() {
    match NodeBinaries::locate() {
        Ok(_) => {}
        Err(e @ (NodeBinariesError::NotBuilt { .. } | NodeBinariesError::Missing { .. })) => {
            eprintln!(
                "SKIPPED the_image_runs_restricted_on_a_real_node: {e}; \
                 the real node (kubelet, containerd, CNI) is not tested"
            );
            return;
        }
        Err(e) => panic!("{}", error_chain(&e)),
    }
    let bed: &'static TestBed = shared()
        .await
        .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let scratch = tempfile::tempdir().unwrap();
    let (archive, image) = image_archive(scratch.path());

    let images = vec![archive];
    let mut node = tokio::task::spawn_blocking(move || {
        RealNode::start(
            bed,
            RealNodeOptions {
                images,
                keep_dir: std::env::var_os("PGRS_REAL_NODE_KEEP").is_some(),
                ..RealNodeOptions::default()
            },
        )
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
    let node_name = node.name().to_owned();
    eprintln!("real node {node_name} started in {}", node.timings());

    let result = exercise(bed, &node_name, &image).await;
    if let Err(message) = result {
        let tails = node.log_tails(60);
        node.stop();
        panic!("{message}\n{tails}");
    }
    let stopped = Instant::now();
    node.stop();
    eprintln!("real node stopped in {:.1?}", stopped.elapsed());
}

async fn exercise(bed: &TestBed, node_name: &str, image: &str) -> Result<(), String> {
    let client = bed.client().await.map_err(|e| error_chain(&e))?;
    let ns = bed
        .namespace("real-node")
        .await
        .map_err(|e| error_chain(&e))?;
    let namespace = ns.name().to_owned();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &namespace,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"
            }}})),
        )
        .await
        .map_err(|e| format!("labelling {namespace}: {e}"))?;
    let pods: Api<Pod> = Api::namespaced(client, &namespace);

    // Admission: the namespace really enforces `restricted`.
    let root_pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "as-root"},
        "spec": {
            "nodeName": node_name,
            "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never"}]
        }
    }))
    .unwrap();
    match pods.create(&PostParams::default(), &root_pod).await {
        Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("restricted") => {}
        other => {
            return Err(format!(
                "a pod without securityContext was not refused: {other:?}"
            ));
        }
    }

    // 1. The entrypoint: `pgrs --version`, to completion; its log through the API server.
    let mut container = restricted_container("pgrs", image);
    container["args"] = serde_json::json!(["--version"]);
    let version: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "version"},
        "spec": {"nodeName": node_name, "restartPolicy": "Never", "containers": [container]}
    }))
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    pods.create(&PostParams::default(), &version)
        .await
        .map_err(|e| format!("creating pod version: {e}"))?;
    eventually("pod version Succeeded", TIMEOUT, || async {
        let pod = get_pod(&pods, "version").await?;
        match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Succeeded") => Ok(()),
            Some("Failed") => Err(format!("failed: {:?}", pod.status)),
            other => Err(format!("phase {other:?}: {:?}", pod.status)),
        }
    })
    .await?;
    eprintln!("pod version Succeeded in {:.1?}", started.elapsed());
    let logs = run(bed.kubectl().args(["logs", "-n", &namespace, "version"]));
    if !logs.contains("pgrs") {
        return Err(format!("`pgrs --version` printed {logs:?}"));
    }

    // 2. A long-running container of the image: uid 999, fsGroup on an emptyDir, the root
    // filesystem read-only, ready by an exec probe; then `kubectl exec` and `kubectl delete`.
    let script = "set -e; [ \"$(id -u)\" = 999 ]; \
                  [ \"$(stat -c %g /data)\" = 999 ]; \
                  if touch /root-is-writable 2>/dev/null; then exit 3; fi; \
                  touch /data/ok /tmp/ready; exec sleep infinity";
    let mut container = restricted_container("shell", image);
    container["command"] = serde_json::json!(["sh", "-c", script]);
    container["readinessProbe"] = serde_json::json!({
        "exec": {"command": ["test", "-f", "/tmp/ready"]},
        "periodSeconds": 1
    });
    container["volumeMounts"] = serde_json::json!([
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "data", "mountPath": "/data"}
    ]);
    let shell: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "shell"},
        "spec": {
            "nodeName": node_name,
            "terminationGracePeriodSeconds": 5,
            "securityContext": {"fsGroup": 999, "seccompProfile": {"type": "RuntimeDefault"}},
            "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "data", "emptyDir": {}}],
            "containers": [container]
        }
    }))
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    pods.create(&PostParams::default(), &shell)
        .await
        .map_err(|e| format!("creating pod shell: {e}"))?;
    let ip = eventually("pod shell Running and Ready", TIMEOUT, || async {
        let pod = get_pod(&pods, "shell").await?;
        let status = pod.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if status.phase.as_deref() == Some("Running") && ready {
            Ok(status.pod_ip.unwrap_or_default())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await?;
    eprintln!(
        "pod shell Running and Ready at {ip} in {:.1?}",
        started.elapsed()
    );
    if !ip.starts_with("10.214.") {
        return Err(format!("pod IP {ip} is not on the node's CNI bridge"));
    }
    let id = run(bed
        .kubectl()
        .args(["exec", "-n", &namespace, "shell", "--", "id"]));
    if !id.contains("uid=999") || !id.contains("gid=999") {
        return Err(format!("`id` in the container: {id}"));
    }
    let started = Instant::now();
    run(bed
        .kubectl()
        .args(["delete", "pod", "-n", &namespace, "shell", "--timeout=60s"]));
    eprintln!("kubectl delete pod shell took {:.1?}", started.elapsed());
    eventually("pod shell gone", TIMEOUT, || async {
        match pods.get_opt("shell").await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err("still there".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await?;
    run(bed.kubectl().args([
        "delete",
        "pod",
        "-n",
        &namespace,
        "version",
        "--timeout=60s",
    ]));
    drop(ns);
    Ok(())
}
