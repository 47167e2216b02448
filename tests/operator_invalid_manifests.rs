//! Invalid `PgReplicaSet` manifests are refused by the real kube-apiserver of the test bed
//! (schema bounds and CEL rules of the committed CRD), with messages that name the field.
//! No operator runs: the API server alone must refuse them.
//!
//! Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::io::Write as _;
use std::process::Stdio;

use operator_support::*;
use pgrs_testbed::TestBed;

fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: pgrs.dev/v1alpha1\nkind: PgReplicaSet\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// `kubectl apply` of `yaml`: Ok(stdout) or Err(stderr).
fn apply(bed: &TestBed, ns: &str, yaml: &str) -> Result<String, String> {
    let mut child = bed
        .kubectl()
        .args(["apply", "-n", ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write the manifest");
    let output = child.wait_with_output().expect("kubectl output");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

const VALID: &str = "  replicas: 3\n  storage: {size: 1Gi, storageClassName: fast}";

/// (what, spec, the field the message must name, a phrase of the message)
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "no instance",
        "  replicas: 0\n  storage: {size: 1Gi}",
        "spec.replicas",
        "greater than or equal to 1",
    ),
    (
        "too many instances",
        "  replicas: 17\n  storage: {size: 1Gi}",
        "spec.replicas",
        "less than or equal to 16",
    ),
    (
        "unsupported PostgreSQL version",
        "  replicas: 3\n  postgresVersion: 13\n  storage: {size: 1Gi}",
        "spec.postgresVersion",
        "14",
    ),
    (
        "storage size not a quantity",
        "  replicas: 3\n  storage: {size: lots}",
        "spec.storage.size",
        "positive quantity",
    ),
    (
        "storage missing",
        "  replicas: 3",
        "spec.storage",
        "Required value",
    ),
    (
        "more synchronous standbys than standbys",
        "  replicas: 3\n  storage: {size: 1Gi}\n  replication: {mode: sync, syncReplicas: 3}",
        "spec.replication.syncReplicas",
        "less than spec.replicas",
    ),
    (
        "unknown replication mode",
        "  replicas: 3\n  storage: {size: 1Gi}\n  replication: {mode: semi}",
        "spec.replication.mode",
        "Unsupported value",
    ),
    (
        "lease timings that allow two primaries",
        "  replicas: 3\n  storage: {size: 1Gi}\n  failover: {leaseDurationSeconds: 8, renewDeadlineSeconds: 7, shutdownBudgetSeconds: 2}",
        "spec.failover.renewDeadlineSeconds",
        "must be less than leaseDurationSeconds",
    ),
    (
        "groups that do not add up to replicas",
        "  replicas: 3\n  storage: {size: 1Gi}\n  groups: [{name: a, replicas: 1}, {name: b, replicas: 1}]",
        "spec.groups",
        "must add up to spec.replicas",
    ),
    (
        "duplicate group names",
        "  replicas: 2\n  storage: {size: 1Gi}\n  groups: [{name: a, replicas: 1}, {name: a, replicas: 1}]",
        "spec.groups",
        "must be unique",
    ),
    (
        "group name not a DNS label",
        "  replicas: 1\n  storage: {size: 1Gi}\n  groups: [{name: Zone_A, replicas: 1}]",
        "spec.groups[0].name",
        "should match",
    ),
    (
        "no group may ever be promoted",
        "  replicas: 3\n  storage: {size: 1Gi}\n  groups: [{name: a, replicas: 3, failoverPriority: 0}]",
        "spec.groups",
        "failoverPriority > 0",
    ),
    (
        "a parameter the agent manages",
        "  replicas: 3\n  storage: {size: 1Gi}\n  parameters: {port: \"5433\"}",
        "spec.parameters",
        "managed by the agent",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_are_refused_with_messages_naming_the_field() {
    let bed = bed().await;
    install_crd(bed).await;
    let ns = bed.namespace("op-invalid").await.expect("namespace");

    // The valid base is accepted: the refusals below are about the changed field only.
    apply(bed, ns.name(), &manifest("good", VALID)).expect("a valid manifest is accepted");

    let mut failures = Vec::new();
    for (what, spec, field, phrase) in CASES {
        match apply(bed, ns.name(), &manifest("bad", spec)) {
            Ok(out) => failures.push(format!("{what}: accepted ({out})")),
            Err(message) => {
                if !message.contains(&format!("{field}:")) || !message.contains(phrase) {
                    failures.push(format!(
                        "{what}: the message does not name {field} with {phrase:?}: {message}"
                    ));
                }
            }
        }
    }

    // Immutable after creation: the storage class of the accepted cluster.
    let changed = "  replicas: 3\n  storage: {size: 1Gi, storageClassName: slow}";
    match apply(bed, ns.name(), &manifest("good", changed)) {
        Ok(out) => failures.push(format!("storage class change: accepted ({out})")),
        Err(message) if !message.contains("spec.storage.storageClassName") => {
            failures.push(format!("storage class change: {message}"))
        }
        Err(_) => {}
    }
    let shrunk = "  replicas: 3\n  storage: {size: 512Mi, storageClassName: fast}";
    match apply(bed, ns.name(), &manifest("good", shrunk)) {
        Ok(out) => failures.push(format!("storage shrink: accepted ({out})")),
        Err(message) if !message.contains("cannot shrink") => {
            failures.push(format!("storage shrink: {message}"))
        }
        Err(_) => {}
    }
    assert!(CASES.len() + 2 >= 8);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
