//! Invalid `PgReplicaSet` manifests are refused by the real kube-apiserver of the test bed
//! (schema bounds and CEL rules of the committed CRD), with messages that name the field.
//! No operator runs: the API server alone must refuse them.
//!
//! Needs the test-bed binaries (`testbed/build.sh`).

mod operator_support;

use std::io::Write as _;
use std::process::Stdio;

use operator_support::*;
use pgrs::api::names::MAX_STATEFULSET_NAME_LEN;
use pgrs::api::parameters::MAX_VALUE_LEN;
use pgrs_testbed::TestBed;

fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: pgrs.dev/v1alpha1\nkind: PgReplicaSet\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// The test bed with the CRD installed, once for the tests of this binary (they run
/// concurrently, and two concurrent first applies of the CRD race).
async fn bed_with_crd() -> &'static TestBed {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let bed = bed().await;
    INSTALLED.get_or_init(|| install_crd(bed)).await;
    bed
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
        "port cannot be set: the agent sets it itself",
    ),
    (
        "a switchover to an instance the cluster does not have",
        "  replicas: 3\n  storage: {size: 1Gi}\n  switchover: {targetInstance: bad-3}",
        "spec.switchover.targetInstance",
        "is not an instance of this cluster",
    ),
];

/// One manifest per class of refused parameter: (parameter, value, a phrase of the reason).
/// Each message must name the parameter: `spec.parameters: <name> cannot be set: <why>`.
const REFUSED_PARAMETERS: &[(&str, &str, &str)] = &[
    (
        "archive_cleanup_command",
        "rm -rf /",
        "runs a shell command",
    ),
    ("recovery_end_command", "true", "runs a shell command"),
    ("ssl", "on", "TLS settings"),
    ("ssl_ciphers", "HIGH", "TLS settings"),
    ("full_page_writes", "off", "crash safety"),
    (
        "restart_after_crash",
        "on",
        "restarts a crashed postgres itself",
    ),
    ("recovery_target_time", "2025-01-01", "recovery target"),
    ("dynamic_library_path", "/tmp", "loads server code"),
    (
        "local_preload_libraries",
        "auto_explain",
        "loads server code",
    ),
    ("external_pid_file", "/tmp/pid", "file, directory or socket"),
    ("log_directory", "/tmp", "file, directory or socket"),
    (
        "unix_socket_permissions",
        "0777",
        "file, directory or socket",
    ),
    ("include_dir", "/etc", "include directives"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_are_refused_with_messages_naming_the_field() {
    let bed = bed_with_crd().await;
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

    for (parameter, value, phrase) in REFUSED_PARAMETERS {
        let spec = format!(
            "  replicas: 3\n  storage: {{size: 1Gi}}\n  parameters: {{{parameter}: {value:?}}}"
        );
        let expected = format!("spec.parameters: {parameter} cannot be set: ");
        match apply(bed, ns.name(), &manifest("bad", &spec)) {
            Ok(out) => failures.push(format!("{parameter}: accepted ({out})")),
            Err(message) if !message.contains(&expected) || !message.contains(phrase) => failures
                .push(format!(
                    "{parameter}: expected {expected:?} and {phrase:?}: {message}"
                )),
            Err(_) => {}
        }
    }
    for (what, body, phrases) in refused_bodies() {
        match apply(bed, ns.name(), &body) {
            Ok(out) => failures.push(format!("{what}: accepted ({out})")),
            Err(message) if !phrases.iter().all(|p| message.contains(p)) => failures.push(format!(
                "{what}: the message lacks one of {phrases:?}: {message}"
            )),
            Err(_) => {}
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

/// A `PgReplicaSet` as JSON (a NUL is no YAML).
fn json_manifest(name: &str, spec: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "pgrs.dev/v1alpha1",
        "kind": "PgReplicaSet",
        "metadata": {"name": name},
        "spec": spec,
    })
    .to_string()
}

fn with_parameters(parameters: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"replicas": 3, "storage": {"size": "1Gi"}, "parameters": parameters})
}

/// Manifests refused for their values, preload lists and names: (what, manifest, phrases the
/// message must all contain).
fn refused_bodies() -> Vec<(String, String, Vec<String>)> {
    let mut bodies = Vec::new();
    let mut refused = |what: &str, name: &str, spec: serde_json::Value, phrases: &[&str]| {
        let phrases = phrases.iter().map(|p| p.to_string()).collect();
        bodies.push((what.to_string(), json_manifest(name, spec), phrases));
    };
    let one_line = "values must be one line without NUL characters";
    for (what, value) in [
        ("a value with a newline", "1MB\nport = 5433"),
        ("a value with a carriage return", "1MB\rport = 5433"),
        ("a value with a NUL", "1MB\u{0}"),
    ] {
        let spec = with_parameters(serde_json::json!({ "work_mem": value }));
        refused(what, "bad", spec, &["work_mem", one_line]);
    }
    let long = "x".repeat(MAX_VALUE_LEN + 1);
    let spec = with_parameters(serde_json::json!({ "application_name": long }));
    refused(
        "a value too long",
        "bad",
        spec,
        &["application_name", "4096"],
    );
    for (parameter, value) in [
        (
            "shared_preload_libraries",
            "pg_stat_statements, /tmp/evil.so",
        ),
        ("session_preload_libraries", "timescaledb"),
    ] {
        let spec = with_parameters(serde_json::json!({ parameter: value }));
        let phrase = format!(
            "spec.parameters.{parameter}: every comma-separated entry must be one of pg_stat_statements, auto_explain, pg_prewarm"
        );
        refused(&format!("{parameter}: {value}"), "bad", spec, &[&phrase]);
    }
    let base = serde_json::json!({"replicas": 3, "storage": {"size": "1Gi"}});
    let label = "metadata.name must be a DNS-1035 label";
    refused("a name with a dot", "pg.prod", base.clone(), &[label]);
    refused(
        "a name starting with a digit",
        "1pg",
        base.clone(),
        &[label],
    );
    let too_long = "a".repeat(MAX_STATEFULSET_NAME_LEN + 1);
    let phrase = "metadata.name is too long: at most 52 characters";
    refused("a name too long", &too_long, base, &[phrase]);
    // `<name>-longest-zone-15` is 53 characters.
    let too_long_for_groups = "a".repeat(MAX_STATEFULSET_NAME_LEN - 15);
    let phrase = "metadata.name is too long for spec.groups";
    refused(
        "a name too long for its groups",
        &too_long_for_groups,
        grouped(),
        &[phrase],
    );
    bodies
}

/// Two groups, the second with the longest group name (15 characters).
fn grouped() -> serde_json::Value {
    serde_json::json!({
        "replicas": 2,
        "storage": {"size": "1Gi"},
        "groups": [{"name": "a", "replicas": 1}, {"name": "longest-zone-15", "replicas": 1}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_listed_preloads_and_the_longest_names_are_accepted() {
    let bed = bed_with_crd().await;
    let ns = bed.namespace("op-accepted").await.expect("namespace");
    let preload = with_parameters(serde_json::json!({
        "shared_preload_libraries": "pg_stat_statements",
        "session_preload_libraries": "auto_explain, pg_prewarm",
        "pg_stat_statements.track": "all",
        "work_mem": "x".repeat(MAX_VALUE_LEN),
    }));
    apply(bed, ns.name(), &json_manifest("preload", preload))
        .expect("allow-listed preload libraries are accepted");
    let longest = "a".repeat(MAX_STATEFULSET_NAME_LEN);
    let base = serde_json::json!({"replicas": 3, "storage": {"size": "1Gi"}});
    apply(bed, ns.name(), &json_manifest(&longest, base)).expect("a 52-character name is accepted");
    // `<name>-longest-zone-15` is 52 characters; the switchover names its pod.
    let name = "b".repeat(MAX_STATEFULSET_NAME_LEN - 16);
    let mut spec = grouped();
    spec["switchover"] = serde_json::json!({"targetInstance": format!("{name}-longest-zone-15-0")});
    apply(bed, ns.name(), &json_manifest(&name, spec))
        .expect("a name that leaves room for its longest group is accepted");
}

/// A refused update changes nothing: the stored object keeps its spec and resourceVersion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_leaves_the_stored_object_unchanged() {
    let bed = bed_with_crd().await;
    let ns = bed.namespace("op-unchanged").await.expect("namespace");
    let good = with_parameters(serde_json::json!({"work_mem": "4MB"}));
    apply(bed, ns.name(), &json_manifest("keep", good)).expect("a valid manifest is accepted");
    let get = || {
        let out = kubectl(bed, &["get", "-n", ns.name(), "pgrs", "keep", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")
    };
    let before = get();
    let bad = with_parameters(serde_json::json!({"work_mem": "8MB", "ssl": "on"}));
    let message = apply(bed, ns.name(), &json_manifest("keep", bad)).expect_err("refused");
    assert!(
        message.contains("spec.parameters: ssl cannot be set"),
        "{message}"
    );
    let patch = r#"{"spec":{"parameters":{"shared_preload_libraries":"evil"}}}"#;
    let output = bed
        .kubectl()
        .args([
            "patch",
            "-n",
            ns.name(),
            "pgrs",
            "keep",
            "--type",
            "merge",
            "-p",
            patch,
        ])
        .output()
        .expect("run kubectl");
    assert!(!output.status.success(), "the patch was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("spec.parameters.shared_preload_libraries"),
        "{stderr}"
    );
    let after = get();
    assert_eq!(after["spec"], before["spec"]);
    assert_eq!(
        after["spec"]["parameters"],
        serde_json::json!({"work_mem": "4MB"})
    );
    assert_eq!(
        after["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
}
