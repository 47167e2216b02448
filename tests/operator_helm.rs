//! The chart on the test bed: `helm install charts/pgrs` runs the operator as a pod under the
//! chart's ServiceAccount (so the chart's RBAC is what is tested), and `examples/basic.yaml`
//! becomes Healthy with one primary, two streaming standbys and `-rw` on the primary's pod IP.
//! The install is the namespaced mode (`watchNamespace`: a Role, no ClusterRole, so no
//! cluster-scoped call is possible) with the NetworkPolicy on (the API server accepts it; the
//! bed's network does not enforce NetworkPolicies).
//!
//! Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use operator_support::*;
use pgrs::api::{InstanceRole, Phase};
use pgrs_testbed::wait::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installed_operator_runs_the_basic_example_under_its_service_account() {
    let bed = bed().await;
    let ns = bed.namespace("op-helm").await.expect("namespace");
    let ns_name = ns.name().to_string();
    let client = bed.client().await.expect("admin client");
    let chart = repo_path("charts/pgrs");
    let release = ns_name.clone();

    // The chart's CRD is the generated one, and the chart lints clean.
    let chart_crd =
        std::fs::read_to_string(chart.join("crds/pgreplicaset.yaml")).expect("chart CRD");
    assert_eq!(
        chart_crd,
        pgrs::api::crd_yaml().expect("generate the CRD"),
        "charts/pgrs/crds/pgreplicaset.yaml differs from `pgrs crd`: cp crds/pgreplicaset.yaml charts/pgrs/crds/"
    );
    let lint = bed
        .helm()
        .args(["lint", "--strict", &chart.to_string_lossy()])
        .output()
        .expect("run helm lint");
    assert!(
        lint.status.success(),
        "helm lint --strict failed: {}",
        String::from_utf8_lossy(&lint.stdout)
    );

    // The operator's pod and the database pods pass the `restricted` Pod Security Standard
    // (the API server's PodSecurity admission refuses them otherwise).
    kubectl(
        bed,
        &[
            "label",
            "namespace",
            &ns_name,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
    );
    let install = bed
        .helm()
        .args([
            "install",
            &release,
            &chart.to_string_lossy(),
            "-n",
            &ns_name,
            "--set",
            &format!("watchNamespace={ns_name}"),
            "--set",
            "image.tag=dev",
            "--set",
            "logFormat=text",
            "--set",
            "networkPolicy.enabled=true",
            "--wait",
            "--timeout",
            "120s",
        ])
        .output()
        .expect("run helm");
    assert!(
        install.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );

    // The operator runs as a pod of the bed under the chart's ServiceAccount.
    let operator_pods = Api::<Pod>::namespaced(client.clone(), &ns_name)
        .list(&ListParams::default().labels("app.kubernetes.io/name=pgrs-operator"))
        .await
        .expect("list operator pods");
    let [operator_pod] = operator_pods.items.as_slice() else {
        panic!(
            "expected one operator pod, found {}",
            operator_pods.items.len()
        );
    };
    let account = operator_pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone());
    assert_eq!(account.as_deref(), Some(format!("{release}-pgrs").as_str()));

    // Namespaced mode: the operator's rules are a Role in the watched namespace, no ClusterRole.
    let fullname = format!("{release}-pgrs");
    let roles = kubectl(
        bed,
        &["get", "role,rolebinding", "-n", &ns_name, "-o", "name"],
    );
    for expected in [
        format!("role.rbac.authorization.k8s.io/{fullname}"),
        format!("rolebinding.rbac.authorization.k8s.io/{fullname}"),
    ] {
        assert!(roles.contains(&expected), "{expected} missing:\n{roles}");
    }
    let cluster_roles = kubectl(
        bed,
        &["get", "clusterrole,clusterrolebinding", "-o", "name"],
    );
    assert!(
        !cluster_roles.contains(&format!("/{fullname}\n")),
        "a ClusterRole or ClusterRoleBinding {fullname} exists in namespaced mode"
    );
    kubectl(
        bed,
        &[
            "get",
            "networkpolicy",
            &format!("{fullname}-database"),
            "-n",
            &ns_name,
        ],
    );
    // A policy with configured clients is accepted by the API server too.
    let rendered = bed
        .helm()
        .args([
            "template",
            &release,
            &chart.to_string_lossy(),
            "-n",
            &ns_name,
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "networkPolicy.clients[0].podSelector.matchLabels.app=shop",
            "--set",
            "networkPolicy.clients[1].namespaceSelector.matchLabels.team=shop",
            "--show-only",
            "templates/networkpolicy.yaml",
        ])
        .output()
        .expect("run helm template");
    assert!(rendered.status.success(), "helm template failed");
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, &rendered.stdout).expect("write the policy");
    kubectl(
        bed,
        &["apply", "--dry-run=server", "-f", &policy.to_string_lossy()],
    );

    let example = repo_path("examples/basic.yaml");
    kubectl(
        bed,
        &["apply", "-n", &ns_name, "-f", &example.to_string_lossy()],
    );
    let (status, primary) = eventually(
        "basic cluster Healthy",
        Duration::from_secs(180),
        || async {
            let status = cluster(&client, &ns_name, "pg")
                .await?
                .status
                .ok_or("no status yet")?;
            let streaming = status
                .instances
                .iter()
                .filter(|i| i.role == InstanceRole::Replica && i.ready && i.lag_bytes.is_some())
                .count();
            match (&status.phase, &status.current_primary) {
                (Some(Phase::Healthy), Some(primary)) if streaming == 2 => {
                    Ok((status.clone(), primary.clone()))
                }
                _ => Err(format!("{:?} {streaming} streaming", status.phase)),
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.ready.as_deref(), Some("3/3"));

    let primary_ip = pod_ips(&client, &ns_name, "pg").await[&primary].clone();
    eventually(
        "-rw points at the primary",
        Duration::from_secs(30),
        || async {
            let rw = endpoint_addresses(&client, &ns_name, "pg-rw").await;
            (rw == [primary_ip.clone()])
                .then_some(())
                .ok_or(format!("{rw:?}"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // Events are written under the chart's RBAC.
    let events = kubectl(bed, &["get", "events", "-n", &ns_name, "-o", "name"]);
    let described = kubectl(bed, &["get", "events", "-n", &ns_name]);
    assert!(!events.is_empty());
    assert!(
        described.contains("Bootstrapping"),
        "the operator's Bootstrapping event is missing:\n{described}"
    );

    let uninstall = bed
        .helm()
        .args(["uninstall", &release, "-n", &ns_name, "--wait"])
        .output()
        .expect("run helm uninstall");
    assert!(uninstall.status.success(), "helm uninstall failed");
}
