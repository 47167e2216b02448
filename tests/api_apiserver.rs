//! The committed CRD and the built objects against the real kube-apiserver of the test bed:
//! the CRD installs, valid manifests are accepted and defaulted, invalid ones are rejected with
//! messages naming the field (schema bounds and CEL rules, on create and on update), and every
//! object the builders produce passes server-side validation (dry run: no pod starts).
//!
//! Needs the test-bed binaries (`testbed/build.sh`); without them every test fails.

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Resource};
use pgrs::api::PgReplicaSet;
use pgrs::operator::build::{BuildInput, ClusterSecrets, build};
use pgrs_testbed::{TestBed, shared};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const CRD_NAME: &str = "pgreplicasets.pgrs.dev";

async fn bed() -> &'static TestBed {
    match shared().await {
        Ok(bed) => bed,
        Err(e) => panic!("{}", pgrs_testbed::testbed::error_chain(&e)),
    }
}

/// Installs `crds/pgreplicaset.yaml` (the committed file, as users get it) and waits until it
/// is served. Idempotent: every test calls it.
async fn install_crd(client: &Client) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/pgreplicaset.yaml");
    let text = std::fs::read_to_string(path).expect("CRD file readable");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD file parses");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply("pgrs-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("install the CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, CRD_NAME, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watch the CRD");
}

fn fixture(name: &str, namespace: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clusters")
        .join(name);
    let text = std::fs::read_to_string(path).expect("fixture readable");
    let mut object: Value = serde_yaml::from_str(&text).expect("fixture is YAML");
    let metadata = object["metadata"].as_object_mut().expect("metadata");
    metadata.remove("uid");
    metadata.insert("namespace".into(), json!(namespace));
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

/// `basic.yaml` named `name` with `patch` merged into its spec, untyped: invalid values (an
/// unknown enum variant) must reach the API server too.
fn basic_raw(namespace: &str, name: &str, patch: Value) -> DynamicObject {
    let mut object = fixture("basic.yaml", namespace);
    object["metadata"]["name"] = json!(name);
    merge(&mut object["spec"], patch);
    serde_json::from_value(object).expect("an object")
}

fn basic_with(namespace: &str, name: &str, patch: Value) -> PgReplicaSet {
    let raw = serde_json::to_value(basic_raw(namespace, name, patch)).expect("serializes");
    serde_json::from_value(raw).expect("a PgReplicaSet")
}

fn raw_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<PgReplicaSet>(&()),
    )
}

/// The API server's message when it refuses `result`; panics when it accepted it.
fn rejection<T: Debug>(result: Result<T, kube::Error>) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message.clone(),
        other => panic!("expected a rejection by the API server, got {other:?}"),
    }
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        ..PostParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_manifests_are_accepted_and_defaulted() {
    let bed = bed().await;
    let client = bed.client().await.expect("admin client");
    install_crd(&client).await;
    let ns = bed.namespace("api-valid").await.expect("namespace");
    let clusters: Api<PgReplicaSet> = Api::namespaced(client.clone(), ns.name());
    for name in ["basic.yaml", "geo.yaml"] {
        let object: PgReplicaSet =
            serde_json::from_value(fixture(name, ns.name())).expect("fixture");
        clusters
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("{name} rejected: {e}"));
    }
    // Read back raw: defaults are the API server's, not serde's.
    let raw = raw_api(&client, ns.name());
    let pg = raw.get("pg").await.expect("read back");
    let spec = &pg.data["spec"];
    assert_eq!(spec["failover"]["leaseDurationSeconds"], json!(8));
    assert_eq!(spec["failover"]["shutdownBudgetSeconds"], json!(2));
    assert_eq!(spec["replication"]["mode"], json!("async"));
    assert_eq!(spec["monitoring"]["lagAlertSeconds"], json!(10));
    assert_eq!(spec["postgresVersion"], json!(15));
    let orders = raw.get("orders").await.expect("read back");
    assert_eq!(
        orders.data["spec"]["groups"][1]["failoverPriority"],
        json!(1),
        "group defaults"
    );
    assert_eq!(
        orders.data["spec"]["failover"]["renewIntervalSeconds"],
        json!(0.5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_manifests_are_rejected_with_the_field_named() {
    let bed = bed().await;
    let client = bed.client().await.expect("admin client");
    install_crd(&client).await;
    let ns = bed.namespace("api-invalid").await.expect("namespace");
    let clusters = raw_api(&client, ns.name());
    let cases = [
        (json!({"replicas": 0}), "spec.replicas"),
        (json!({"replicas": 17}), "spec.replicas"),
        (json!({"postgresVersion": 13}), "spec.postgresVersion"),
        (json!({"postgresVersion": 19}), "spec.postgresVersion"),
        (
            json!({"replication": {"mode": "sync", "syncReplicas": 3}}),
            "spec.replication.syncReplicas must be less than spec.replicas",
        ),
        (
            json!({"replication": {"mode": "sync", "syncReplicas": 0}}),
            "spec.replication.syncReplicas must be at least 1",
        ),
        (
            json!({"replication": {"mode": "semi"}}),
            "spec.replication.mode",
        ),
        (
            json!({"failover": {"renewDeadlineSeconds": 6, "shutdownBudgetSeconds": 2}}),
            "renewDeadlineSeconds + shutdownBudgetSeconds must be less than leaseDurationSeconds",
        ),
        (
            json!({"failover": {"renewIntervalSeconds": 5}}),
            "spec.failover.renewIntervalSeconds must be less than",
        ),
        (
            json!({"failover": {"leaseDurationSeconds": 0.5}}),
            "spec.failover.leaseDurationSeconds",
        ),
        (
            json!({"groups": [{"name": "a", "replicas": 1}, {"name": "b", "replicas": 1}]}),
            "spec.groups[*].replicas must add up to spec.replicas",
        ),
        (
            json!({"groups": [{"name": "a", "replicas": 2}, {"name": "a", "replicas": 1}]}),
            "spec.groups[*].name must be unique",
        ),
        (
            json!({"groups": [{"name": "East_1", "replicas": 3}]}),
            "spec.groups[0].name",
        ),
        (
            json!({"groups": [
                {"name": "a", "replicas": 2, "failoverPriority": 0},
                {"name": "b", "replicas": 1, "failoverPriority": 0}
            ]}),
            "needs failoverPriority > 0",
        ),
        (
            json!({"parameters": {"port": "5433"}}),
            "spec.parameters: port cannot be set: the agent sets it itself",
        ),
        (
            json!({"parameters": {"Shared Buffers": "1GB"}}),
            "spec.parameters: names must be lowercase",
        ),
        (
            json!({"storage": {"size": "lots"}}),
            "spec.storage.size must be a positive quantity",
        ),
    ];
    for (index, (patch, expected)) in cases.into_iter().enumerate() {
        let object = basic_raw(ns.name(), &format!("bad-{index}"), patch.clone());
        let message = rejection(clusters.create(&dry_run(), &object).await);
        assert!(
            message.contains(expected),
            "case {patch}: message {message:?} does not contain {expected:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_is_immutable_and_size_cannot_shrink() {
    let bed = bed().await;
    let client = bed.client().await.expect("admin client");
    install_crd(&client).await;
    let ns = bed.namespace("api-update").await.expect("namespace");
    let clusters: Api<PgReplicaSet> = Api::namespaced(client.clone(), ns.name());
    let created = clusters
        .create(
            &PostParams::default(),
            &basic_with(
                ns.name(),
                "pg",
                json!({"storage": {"size": "10Gi", "storageClassName": "standard"}}),
            ),
        )
        .await
        .expect("create");
    let update = |mutate: &dyn Fn(&mut PgReplicaSet)| {
        let mut next = created.clone();
        mutate(&mut next);
        next
    };
    let changed = update(&|c| c.spec.storage.storage_class_name = Some("fast".into()));
    let message = rejection(clusters.replace("pg", &dry_run(), &changed).await);
    assert!(
        message.contains("spec.storage.storageClassName is immutable"),
        "{message}"
    );
    let removed = update(&|c| c.spec.storage.storage_class_name = None);
    let message = rejection(clusters.replace("pg", &dry_run(), &removed).await);
    assert!(message.contains("cannot be added or removed"), "{message}");
    let shrunk = update(&|c| c.spec.storage.size = "5Gi".into());
    let message = rejection(clusters.replace("pg", &dry_run(), &shrunk).await);
    assert!(
        message.contains("spec.storage.size cannot shrink"),
        "{message}"
    );
    let grown = update(&|c| c.spec.storage.size = "20Gi".into());
    clusters
        .replace("pg", &dry_run(), &grown)
        .await
        .expect("growing the volume is allowed");
    // Raising the major is an upgrade (issue 16); a data directory is never downgraded.
    let upgraded = update(&|c| c.spec.postgres_version = 17);
    clusters
        .replace("pg", &dry_run(), &upgraded)
        .await
        .expect("raising postgresVersion is an upgrade");
    let lowered = update(&|c| c.spec.postgres_version = 14);
    let message = rejection(clusters.replace("pg", &dry_run(), &lowered).await);
    assert!(
        message.contains("spec.postgresVersion cannot be lowered"),
        "{message}"
    );
    for major in [14, 16, 17, 18] {
        let name = format!("pg{major}");
        let cluster = basic_with(ns.name(), &name, json!({"postgresVersion": major}));
        clusters
            .create(&dry_run(), &cluster)
            .await
            .unwrap_or_else(|e| panic!("postgresVersion {major} refused: {e}"));
    }
}

async fn dry_create<K>(client: &Client, namespace: &str, object: &K)
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Serialize + Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    if let Err(error) = api.create(&dry_run(), object).await {
        panic!(
            "{} {:?} rejected by the API server: {error}",
            K::kind(&K::DynamicType::default()),
            object.meta().name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_objects_pass_server_side_validation() {
    let bed = bed().await;
    let client = bed.client().await.expect("admin client");
    install_crd(&client).await;
    let ns = bed.namespace("api-build").await.expect("namespace");
    let clusters: Api<PgReplicaSet> = Api::namespaced(client.clone(), ns.name());
    let secrets = ClusterSecrets {
        superuser_password: "s".repeat(24),
        replication_password: "r".repeat(24),
        agent_token: "t".repeat(32),
        app_password: "a".repeat(32),
    };
    for name in ["basic.yaml", "geo.yaml"] {
        let object: PgReplicaSet =
            serde_json::from_value(fixture(name, ns.name())).expect("fixture");
        // Created for real: the owner references carry its server-assigned uid.
        let cluster = clusters
            .create(&PostParams::default(), &object)
            .await
            .expect("create the PgReplicaSet");
        let objects = build(&BuildInput {
            cluster: &cluster,
            default_image: "ghcr.io/pgrs-dev/pgrs:test",
            secrets: &secrets,
        })
        .expect("build");
        let namespace = ns.name();
        dry_create(&client, namespace, &objects.service_account).await;
        dry_create(&client, namespace, &objects.role).await;
        dry_create(&client, namespace, &objects.role_binding).await;
        dry_create(&client, namespace, &objects.secret).await;
        dry_create(&client, namespace, &objects.app_secret).await;
        dry_create(&client, namespace, &objects.config_map).await;
        for service in &objects.services {
            dry_create(&client, namespace, service).await;
        }
        for statefulset in &objects.statefulsets {
            dry_create(&client, namespace, statefulset).await;
        }
        dry_create(&client, namespace, &objects.pod_disruption_budget).await;
    }
}
