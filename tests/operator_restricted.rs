//! Issue 15, acceptance 4: `examples/basic.yaml` becomes Healthy in a namespace enforcing the
//! `restricted` Pod Security Standard, enforced by the real kube-apiserver's PodSecurity
//! admission. The fake kubelet applies the pods' securityContext the way a kubelet does, so
//! the agents and postgres run as uid/gid 999 with `fsGroup` 999 as a supplementary group,
//! `no_new_privs`, on a read-only root filesystem, and the data directory belongs to 999 on a
//! volume given to group 999. The old root spec (the StatefulSet's pod template without its
//! pod securityContext, what `--database-as-root` used to apply) is refused by admission.
//!
//! The operator runs as a process with the admin kubeconfig. Needs the test-bed binaries
//! (`testbed/build.sh`) and a user with uid 999 on the host (`scripts/setup-debian`).

mod operator_support;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, Pod, Volume};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use operator_support::faults::agent_pid;
use operator_support::*;

const CLUSTER: &str = "pg";
const POSTGRES_ID: u32 = 999;

/// `Key:` of `/proc/<pid>/status`, split on whitespace.
fn status_field(pid: i32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The postmaster: the agent's child named `postgres`.
fn postmaster_of(agent: i32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let parent = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse::<i32>()
            .ok()?;
        (comm.trim() == "postgres" && parent == agent).then_some(pid)
    })
}

/// Mount options of the mount at `path` in the mount namespace of `pid` (the last one
/// mounted there: the one the process sees).
fn mount_options(pid: i32, path: &str) -> Option<String> {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(4) == Some(&path)).then(|| fields.get(5).map(|o| (*o).to_owned()))?
        })
        .next_back()
}

/// Checks one database pod's processes and files; returns a description for the log.
fn check_pod(ns: &str, pod: &str) -> String {
    let agent = agent_pid(ns, pod).unwrap_or_else(|| panic!("no agent process for pod {pod}"));
    let id = POSTGRES_ID.to_string();
    for pid in [Some(agent), postmaster_of(agent)] {
        let pid = pid.unwrap_or_else(|| panic!("pod {pod}: no postmaster under agent {agent}"));
        // Real, effective, saved and filesystem ids.
        assert_eq!(
            status_field(pid, "Uid"),
            vec![id.clone(); 4],
            "pod {pod}: uid of {pid}"
        );
        assert_eq!(
            status_field(pid, "Gid"),
            vec![id.clone(); 4],
            "pod {pod}: gid of {pid}"
        );
        assert!(
            status_field(pid, "Groups").contains(&id),
            "pod {pod}: fsGroup 999 is not among the groups of {pid}"
        );
        assert_eq!(
            status_field(pid, "NoNewPrivs"),
            ["1"],
            "pod {pod}: allowPrivilegeEscalation: false"
        );
        assert_eq!(
            status_field(pid, "CapEff"),
            ["0000000000000000"],
            "pod {pod}: capabilities of {pid}"
        );
    }
    let postmaster = postmaster_of(agent).unwrap_or_else(|| panic!("pod {pod}: no postmaster"));
    // postgres runs in its data directory: owned by 999, private.
    let data = std::fs::metadata(format!("/proc/{postmaster}/cwd"))
        .unwrap_or_else(|e| panic!("pod {pod}: stat the data directory: {e}"));
    assert_eq!(data.uid(), POSTGRES_ID, "pod {pod}: owner of the data dir");
    assert_eq!(
        data.mode() & 0o077,
        0,
        "pod {pod}: data dir mode {:o}",
        data.mode()
    );
    // The volume's root, given to the fsGroup by the kubelet: group 999, rwx, setgid.
    let volume = std::fs::metadata(PathBuf::from(format!("/proc/{postmaster}/cwd/..")))
        .unwrap_or_else(|e| panic!("pod {pod}: stat the volume root: {e}"));
    assert_eq!(volume.gid(), POSTGRES_ID, "pod {pod}: group of the volume");
    assert_eq!(
        volume.mode() & 0o2070,
        0o2070,
        "pod {pod}: volume mode {:o}",
        volume.mode()
    );
    // readOnlyRootFilesystem: `/` is read-only in the pod; the volumes are writable.
    let root = mount_options(agent, "/").unwrap_or_default();
    assert!(
        root.split(',').any(|o| o == "ro"),
        "pod {pod}: / is mounted {root}"
    );
    for writable in ["/tmp", "/var/run/pgrs", "/var/lib/postgresql/data"] {
        // As mountinfo shows it (`/var/run` is a symlink to `/run` on Debian).
        let resolved = std::fs::canonicalize(writable)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| writable.to_owned());
        let options = mount_options(agent, &resolved)
            .unwrap_or_else(|| panic!("pod {pod}: nothing mounted at {writable}"));
        assert!(
            options.split(',').any(|o| o == "rw"),
            "pod {pod}: {writable} is mounted {options}"
        );
    }
    format!("{pod}: agent {agent} and postmaster {postmaster} run as 999, / read-only")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_example_is_healthy_in_a_restricted_namespace_with_pods_running_as_999() {
    let (bed, _ns, ns_name, client) = operator_test_namespace("op-restricted").await;
    kubectl(
        bed,
        &[
            "label",
            "namespace",
            &ns_name,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        ],
    );
    let _operator = OperatorProcess::start(bed, &ns_name);

    apply_repo_manifest(bed, &ns_name, "examples/basic.yaml");
    let primary = wait_three_ready_healthy(
        &client,
        &ns_name,
        CLUSTER,
        "basic cluster Healthy in a restricted namespace",
    )
    .await;
    eprintln!("primary {primary}");

    let pods = pod_ips(&client, &ns_name, CLUSTER).await;
    assert_eq!(pods.len(), 3, "{pods:?}");
    for pod in pods.keys() {
        eprintln!("{}", check_pod(&ns_name, pod));
    }

    // The old root spec: the pods' template without its pod securityContext.
    let statefulset = Api::<StatefulSet>::namespaced(client.clone(), &ns_name)
        .get(CLUSTER)
        .await
        .expect("read the StatefulSet");
    let mut spec = statefulset.spec.template.spec.expect("a pod template");
    spec.security_context = None;
    // The claim template's volume, so that only admission can refuse the pod.
    spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: "data".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });
    let root_pod = Pod {
        metadata: ObjectMeta {
            name: Some("root-spec".to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        ..Pod::default()
    };
    let refused = Api::<Pod>::namespaced(client.clone(), &ns_name)
        .create(&PostParams::default(), &root_pod)
        .await;
    match refused {
        Err(kube::Error::Api(status)) => {
            eprintln!("the old root spec is refused: {}", status.message);
            assert_eq!(status.code, 403, "{status:?}");
            assert!(
                status
                    .message
                    .contains("violates PodSecurity \"restricted:latest\""),
                "{}",
                status.message
            );
            assert!(
                status.message.contains("runAsNonRoot")
                    && status.message.contains("seccompProfile"),
                "{}",
                status.message
            );
        }
        other => panic!("a root pod was not refused by admission: {other:?}"),
    }
}
