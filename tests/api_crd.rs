//! The generated CRD: committed file in sync, descriptions everywhere, and its CEL rules
//! evaluated client-side (kube-cel, with schema defaults applied first like the API server) on
//! valid and invalid manifests. Schema bounds (minimum, pattern, ...) are enforced by the API
//! server only; they are checked here for presence.

use std::path::Path;

use kube_cel::{Validator, compile_schema};
use pgrs::api::{PgReplicaSet, crd_yaml};
use serde_json::{Value, json};

const CRD_PATH: &str = "crds/pgreplicaset.yaml";
const REGENERATE: &str = "cargo run --quiet -- crd > crds/pgreplicaset.yaml";

fn schema() -> Value {
    let crd = serde_json::to_value(pgrs::api::crd().expect("CRD builds")).expect("CRD serializes");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clusters")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_yaml::from_str(&text).expect("fixture is YAML")
}

/// The failure messages of `object` (and `old`, for updates) against the CRD's CEL rules.
fn cel_failures(object: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema(), object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

/// `basic.yaml` with `patch` merged into its spec (objects merged, other values replaced).
fn basic_with(patch: Value) -> Value {
    let mut object = fixture("basic.yaml");
    merge(&mut object["spec"], patch);
    object
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

fn assert_rejected(object: &Value, old: Option<&Value>, expected: &str) {
    let failures = cel_failures(object, old);
    assert_eq!(
        failures.len(),
        1,
        "expected exactly one failure mentioning {expected:?}, got {failures:#?}"
    );
    assert!(
        failures[0].contains(expected),
        "failure {:?} does not mention {expected:?}",
        failures[0]
    );
}

#[test]
fn committed_crd_matches_the_generated_one() {
    let generated = crd_yaml().expect("CRD renders");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(CRD_PATH);
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{CRD_PATH} is out of date with src/api; regenerate it with: {REGENERATE}"
    );
}

#[test]
fn crd_names_columns_and_subresources() {
    let crd = serde_json::to_value(pgrs::api::crd().expect("CRD builds")).expect("CRD serializes");
    assert_eq!(crd["metadata"]["name"], "pgreplicasets.pgrs.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["pgrs"]));
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("printer columns")
        .iter()
        .map(|c| c["name"].as_str().expect("column name"))
        .collect();
    // kubectl upper-cases column names: PRIMARY READY MAX-LAG PHASE AGE.
    assert_eq!(columns, ["Primary", "Ready", "Max-Lag", "Phase", "Age"]);
}

/// Every property of spec and status has a description (`kubectl explain`).
#[test]
fn every_field_has_a_description() {
    fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
        if let Some(properties) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in properties {
                let child_path = format!("{path}.{name}");
                if child.get("description").is_none() {
                    missing.push(child_path.clone());
                }
                walk(&child_path, child, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let schema = schema();
    let mut missing = Vec::new();
    walk("spec", &schema["properties"]["spec"], &mut missing);
    walk("status", &schema["properties"]["status"], &mut missing);
    assert!(
        missing.is_empty(),
        "fields without description: {missing:#?}"
    );
}

#[test]
fn schema_bounds_are_present() {
    let spec = &schema()["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["minimum"].as_f64(), Some(1.0));
    assert_eq!(spec["replicas"]["maximum"].as_f64(), Some(16.0));
    assert_eq!(spec["postgresVersion"]["minimum"].as_f64(), Some(14.0));
    assert_eq!(spec["postgresVersion"]["maximum"].as_f64(), Some(18.0));
    assert_eq!(spec["groups"]["maxItems"], 8);
    assert!(spec["groups"]["items"]["properties"]["name"]["pattern"].is_string());
    assert_eq!(
        spec["failover"]["properties"]["leaseDurationSeconds"]["minimum"].as_f64(),
        Some(1.0)
    );
    assert_eq!(spec["parameters"]["maxProperties"], 256);
    assert_eq!(spec["failover"]["default"]["leaseDurationSeconds"], 8.0);
    let required = schema()["properties"]["spec"]["required"].clone();
    assert_eq!(required, json!(["replicas", "storage"]));
}

/// Only formats the API server knows (it warns on every apply about the others).
#[test]
fn integer_formats_are_kubernetes_ones() {
    let text = serde_json::to_string(&schema()).expect("schema serializes");
    assert!(!text.contains("uint32") && !text.contains("uint64"));
    let spec = &schema()["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["format"], "int32");
    assert_eq!(spec["replicas"]["minimum"].as_f64(), Some(1.0));
}

#[test]
fn every_cel_rule_compiles() {
    let compiled = compile_schema(&schema());
    let errors: Vec<String> = compiled
        .compilation_errors()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "CEL rules that do not compile: {errors:#?}"
    );
}

#[test]
fn fixtures_are_valid() {
    for name in ["basic.yaml", "geo.yaml"] {
        let object = fixture(name);
        assert_eq!(cel_failures(&object, None), Vec::<String>::new(), "{name}");
        // And they deserialize into the Rust types (defaults filled in).
        let _: PgReplicaSet = serde_json::from_value(object).expect("fixture deserializes");
    }
}

#[test]
fn sync_replicas_must_be_less_than_replicas() {
    let object = basic_with(json!({"replication": {"mode": "sync", "syncReplicas": 3}}));
    assert_rejected(
        &object,
        None,
        "spec.replication.syncReplicas must be less than spec.replicas",
    );
    let ok = basic_with(json!({"replication": {"mode": "sync", "syncReplicas": 2}}));
    assert_eq!(cel_failures(&ok, None), Vec::<String>::new());
    // Only sync mode counts: a single async instance keeps the default syncReplicas.
    let single = basic_with(json!({"replicas": 1}));
    assert_eq!(cel_failures(&single, None), Vec::<String>::new());
}

#[test]
fn sync_mode_needs_at_least_one_sync_replica() {
    let object = basic_with(json!({"replication": {"mode": "sync", "syncReplicas": 0}}));
    assert_rejected(
        &object,
        None,
        "spec.replication.syncReplicas must be at least 1",
    );
}

#[test]
fn renew_deadline_plus_shutdown_budget_must_be_below_lease_duration() {
    let object =
        basic_with(json!({"failover": {"renewDeadlineSeconds": 6, "shutdownBudgetSeconds": 2}}));
    assert_rejected(
        &object,
        None,
        "renewDeadlineSeconds + shutdownBudgetSeconds must be less than leaseDurationSeconds",
    );
    let ok =
        basic_with(json!({"failover": {"renewDeadlineSeconds": 5.5, "shutdownBudgetSeconds": 2}}));
    assert_eq!(cel_failures(&ok, None), Vec::<String>::new());
}

#[test]
fn renew_interval_must_be_below_renew_deadline() {
    let object = basic_with(json!({"failover": {"renewIntervalSeconds": 5}}));
    assert_rejected(
        &object,
        None,
        "spec.failover.renewIntervalSeconds must be less than",
    );
}

#[test]
fn group_replicas_must_add_up() {
    let object =
        basic_with(json!({"groups": [{"name": "a", "replicas": 1}, {"name": "b", "replicas": 1}]}));
    assert_rejected(
        &object,
        None,
        "spec.groups[*].replicas must add up to spec.replicas",
    );
}

#[test]
fn group_names_must_be_unique() {
    let object =
        basic_with(json!({"groups": [{"name": "a", "replicas": 2}, {"name": "a", "replicas": 1}]}));
    assert_rejected(&object, None, "spec.groups[*].name must be unique");
}

#[test]
fn some_group_must_be_promotable() {
    let object = basic_with(json!({"groups": [
        {"name": "a", "replicas": 2, "failoverPriority": 0},
        {"name": "b", "replicas": 1, "failoverPriority": 0}
    ]}));
    assert_rejected(&object, None, "needs failoverPriority > 0");
}

#[test]
fn sync_mode_needs_enough_sync_eligible_instances() {
    let object = basic_with(json!({
        "replication": {"mode": "sync", "syncReplicas": 1},
        "groups": [
            {"name": "a", "replicas": 1},
            {"name": "b", "replicas": 2, "syncEligible": false}
        ]
    }));
    assert_rejected(
        &object,
        None,
        "the syncEligible groups need more than spec.replication.syncReplicas",
    );
}

#[test]
fn agent_managed_parameters_are_refused() {
    let object = basic_with(json!({"parameters": {"port": "5433"}}));
    assert_rejected(
        &object,
        None,
        "spec.parameters: port cannot be set: the agent sets it itself",
    );
    let object = basic_with(json!({"parameters": {"synchronous_standby_names": "*"}}));
    assert_rejected(
        &object,
        None,
        "spec.parameters: synchronous_standby_names cannot be set: the agent sets it itself",
    );
}

#[test]
fn parameter_names_must_be_postgres_names() {
    let object = basic_with(json!({"parameters": {"Shared Buffers": "1GB"}}));
    assert_rejected(&object, None, "spec.parameters: names must be lowercase");
}

#[test]
fn storage_size_must_be_a_positive_quantity() {
    assert_rejected(
        &basic_with(json!({"storage": {"size": "lots"}})),
        None,
        "spec.storage.size must be a positive quantity",
    );
    assert_rejected(
        &basic_with(json!({"storage": {"size": "0"}})),
        None,
        "spec.storage.size must be a positive quantity",
    );
}

#[test]
fn storage_class_is_immutable() {
    let old = basic_with(json!({"storage": {"storageClassName": "standard"}}));
    let changed = basic_with(json!({"storage": {"storageClassName": "fast"}}));
    assert_rejected(
        &changed,
        Some(&old),
        "spec.storage.storageClassName is immutable",
    );
    let unchanged = old.clone();
    assert_eq!(cel_failures(&unchanged, Some(&old)), Vec::<String>::new());
    // Adding one after creation is a change too.
    let without = fixture("basic.yaml");
    assert_rejected(
        &old,
        Some(&without),
        "spec.storage.storageClassName is immutable",
    );
    // On creation there is no old object: any class is fine.
    assert_eq!(cel_failures(&changed, None), Vec::<String>::new());
}

#[test]
fn storage_may_grow_but_not_shrink() {
    let old = basic_with(json!({"storage": {"size": "10Gi"}}));
    let grown = basic_with(json!({"storage": {"size": "20Gi"}}));
    assert_eq!(cel_failures(&grown, Some(&old)), Vec::<String>::new());
    let shrunk = basic_with(json!({"storage": {"size": "5Gi"}}));
    assert_rejected(&shrunk, Some(&old), "spec.storage.size cannot shrink");
}

#[test]
fn refused_parameters_are_named_with_their_reason() {
    for (name, phrase) in [
        ("ssl_min_protocol_version", "TLS settings"),
        ("ssl_some_future_setting", "ssl_* cannot be set"),
        ("archive_cleanup_command", "runs a shell command"),
        ("recovery_target_lsn", "recovery target"),
        ("include_if_exists", "include directives"),
    ] {
        let object = basic_with(json!({"parameters": {name: "x"}}));
        assert_rejected(&object, None, phrase);
    }
    let object = basic_with(json!({"parameters": {"recovery_target_timeline": "latest"}}));
    assert_rejected(
        &object,
        None,
        "spec.parameters: recovery_target_timeline cannot be set: the agent sets it itself",
    );
}

#[test]
fn preload_lists_take_allow_listed_libraries() {
    let ok = basic_with(json!({"parameters": {
        "shared_preload_libraries": "pg_stat_statements, auto_explain",
        "session_preload_libraries": "",
    }}));
    assert_eq!(cel_failures(&ok, None), Vec::<String>::new());
    let object =
        basic_with(json!({"parameters": {"shared_preload_libraries": "pg_stat_statements,evil"}}));
    assert_rejected(
        &object,
        None,
        "spec.parameters.shared_preload_libraries: every comma-separated entry must be one of",
    );
}

#[test]
fn parameter_values_are_one_line() {
    let object = basic_with(json!({"parameters": {"work_mem": "1MB\nport = 5433"}}));
    assert_rejected(
        &object,
        None,
        "values must be one line without NUL characters",
    );
}

#[test]
fn cluster_names_must_fit_their_derived_names() {
    let mut object = fixture("basic.yaml");
    object["metadata"]["name"] = json!("pg.prod");
    assert_rejected(&object, None, "metadata.name must be a DNS-1035 label");
    object["metadata"]["name"] = json!("a".repeat(53));
    assert_rejected(&object, None, "metadata.name is too long: at most 52");
    object["metadata"]["name"] = json!("a".repeat(52));
    assert_eq!(cel_failures(&object, None), Vec::<String>::new());
}

#[test]
fn the_switchover_target_must_be_an_instance() {
    let object = basic_with(json!({"switchover": {"targetInstance": "other-0"}}));
    assert_rejected(&object, None, "is not an instance of this cluster");
    let name = fixture("basic.yaml")["metadata"]["name"].clone();
    let name = name.as_str().expect("fixture name");
    let object = basic_with(json!({"switchover": {"targetInstance": format!("{name}-2")}}));
    assert_eq!(cel_failures(&object, None), Vec::<String>::new());
    let object = basic_with(json!({"switchover": {"targetInstance": format!("{name}-3")}}));
    assert_rejected(&object, None, "is not an instance of this cluster");
}
