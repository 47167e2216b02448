//! The pure builders against golden YAML: `tests/fixtures/clusters/<name>.yaml` (a
//! `PgReplicaSet`) builds to `tests/fixtures/build/<name>.yaml` (every object, in apply order).
//! After an intended change, re-bless the golden files with
//! `PGRS_BLESS=1 cargo test --test api_build` and review the diff.
//! The other tests assert the properties that matter, so a careless re-bless cannot hide them.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use pgrs::api::PgReplicaSet;
use pgrs::operator::build::names;
use pgrs::operator::build::{BuildError, BuildInput, ClusterObjects, ClusterSecrets, build};
use serde::Serialize;

const IMAGE: &str = "ghcr.io/pgrs-dev/pgrs:test";

fn secrets() -> ClusterSecrets {
    ClusterSecrets {
        superuser_password: "superuser-secret".to_string(),
        replication_password: "replication-secret".to_string(),
        agent_token: "agent-token-secret".to_string(),
        app_password: "app-secret".to_string(),
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cluster(name: &str) -> PgReplicaSet {
    let path = fixtures().join("clusters").join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_yaml::from_str(&text).expect("fixture is a PgReplicaSet")
}

fn built(name: &str) -> ClusterObjects {
    let cluster = cluster(name);
    let secrets = secrets();
    build(&BuildInput {
        cluster: &cluster,
        default_image: IMAGE,
        secrets: &secrets,
    })
    .expect("fixture builds")
}

fn push_doc<T: Serialize>(out: &mut String, object: &T) {
    out.push_str("---\n");
    out.push_str(&serde_yaml::to_string(object).expect("object serializes"));
}

/// All objects as one multi-document YAML, in apply order.
fn render(objects: &ClusterObjects) -> String {
    let mut out = String::new();
    push_doc(&mut out, &objects.service_account);
    push_doc(&mut out, &objects.role);
    push_doc(&mut out, &objects.role_binding);
    push_doc(&mut out, &objects.secret);
    push_doc(&mut out, &objects.app_secret);
    push_doc(&mut out, &objects.config_map);
    for service in &objects.services {
        push_doc(&mut out, service);
    }
    for statefulset in &objects.statefulsets {
        push_doc(&mut out, statefulset);
    }
    push_doc(&mut out, &objects.pod_disruption_budget);
    out
}

fn check_golden(name: &str) {
    let rendered = render(&built(name));
    let path = fixtures().join("build").join(format!("{name}.yaml"));
    if std::env::var_os("PGRS_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        std::fs::write(&path, &rendered).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != rendered {
        let first_difference = expected
            .lines()
            .zip(rendered.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("line {}: expected {a:?}, built {b:?}", i + 1))
            .unwrap_or_else(|| "one is a prefix of the other".to_string());
        panic!(
            "{} differs from the build ({first_difference}); if intended, re-bless with: \
             PGRS_BLESS=1 cargo test --test api_build",
            path.display()
        );
    }
}

#[test]
fn basic_cluster_matches_golden_yaml() {
    check_golden("basic");
}

#[test]
fn geo_cluster_matches_golden_yaml() {
    check_golden("geo");
}

fn service<'a>(objects: &'a ClusterObjects, name: &str) -> &'a Service {
    objects
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Service {name}"))
}

#[test]
fn services_select_operator_owned_labels() {
    let objects = built("basic");
    let selector = |name: &str| {
        service(&objects, name)
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .expect("selector")
    };
    let rw = selector("pg-rw");
    assert_eq!(
        rw.get(names::LABEL_ROLE).map(String::as_str),
        Some("primary")
    );
    assert_eq!(rw.get(names::LABEL_CLUSTER).map(String::as_str), Some("pg"));
    let ro = selector("pg-ro");
    assert_eq!(
        ro.get(names::LABEL_READ_POOL).map(String::as_str),
        Some("true")
    );
    assert!(!ro.contains_key(names::LABEL_ROLE));
    // `-r`: every instance of the cluster that is not fenced.
    let r = selector("pg-r");
    assert_eq!(r.len(), 2);
    assert_eq!(
        r.get(names::LABEL_IN_SERVICE).map(String::as_str),
        Some(names::IN_SERVICE)
    );
    let headless = service(&objects, "pg-instances")
        .spec
        .clone()
        .expect("spec");
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    // The StatefulSets' pod templates never carry the operator-owned labels.
    for sts in &objects.statefulsets {
        let labels = sts
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("labels");
        assert!(!labels.contains_key(names::LABEL_ROLE));
        assert!(!labels.contains_key(names::LABEL_READ_POOL));
        assert_eq!(sts.spec.service_name.as_deref(), Some("pg-instances"));
    }
}

#[test]
fn every_object_is_owned_by_the_cluster() {
    let objects = built("geo");
    let mut metas = vec![
        &objects.service_account.metadata,
        &objects.role.metadata,
        &objects.role_binding.metadata,
        &objects.secret.metadata,
        &objects.app_secret.metadata,
        &objects.config_map.metadata,
        &objects.pod_disruption_budget.metadata,
    ];
    metas.extend(objects.services.iter().map(|s| &s.metadata));
    metas.extend(objects.statefulsets.iter().map(|s| &s.metadata));
    assert_eq!(metas.len(), 7 + 4 + 3);
    for meta in metas {
        let owners = meta.owner_references.as_ref().expect("owner references");
        assert_eq!(owners.len(), 1, "{:?}", meta.name);
        assert_eq!(owners[0].kind, "PgReplicaSet");
        assert_eq!(owners[0].name, "orders");
        assert_eq!(owners[0].uid, "0d8e5b7a-9f3c-4a3e-8c61-5b3a1f2e7c02");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(
            labels.get(names::LABEL_CLUSTER).map(String::as_str),
            Some("orders")
        );
    }
}

#[test]
fn one_statefulset_per_group_with_its_placement() {
    let objects = built("geo");
    let names: Vec<&str> = objects
        .statefulsets
        .iter()
        .map(|s| s.metadata.name.as_deref().expect("name"))
        .collect();
    assert_eq!(names, ["orders-east", "orders-west", "orders-dr"]);
    let replicas: Vec<i32> = objects
        .statefulsets
        .iter()
        .map(|s| s.spec.replicas.expect("replicas"))
        .collect();
    assert_eq!(replicas, [2, 2, 1]);
    let dr = &objects.statefulsets[2].spec;
    let pod = dr.template.spec.as_ref().expect("pod spec");
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|n| n.get("topology.kubernetes.io/zone"))
            .map(String::as_str),
        Some("zone-c")
    );
    assert_eq!(
        dr.update_strategy.as_ref().and_then(|u| u.type_.as_deref()),
        Some("OnDelete")
    );
    let claim = &dr.volume_claim_templates.as_ref().expect("claims")[0];
    let claim_spec = claim.spec.as_ref().expect("claim spec");
    assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast-ssd"));
    let size = claim_spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"));
    assert_eq!(size.map(|q| q.0.as_str()), Some("20Gi"));
    // Default group: the StatefulSet is named after the cluster.
    let basic = built("basic");
    assert_eq!(basic.statefulsets.len(), 1);
    assert_eq!(basic.statefulsets[0].metadata.name.as_deref(), Some("pg"));
    assert_eq!(basic.statefulsets[0].spec.replicas, Some(3));
}

#[test]
fn agent_container_runs_with_the_spec_timings_and_probes() {
    let objects = built("geo");
    let pod = objects.statefulsets[0]
        .spec
        .template
        .spec
        .clone()
        .expect("pod spec");
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/pgrs:1.2.3")
    );
    let args = container.args.clone().expect("args");
    assert_eq!(args[0], "agent");
    for expected in [
        "--cluster=orders",
        "--lease-duration-ms=3000",
        "--lease-renew-interval-ms=500",
        "--lease-renew-deadline-ms=1500",
        "--lease-shutdown-budget-ms=1000",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} missing from {args:?}"
        );
    }
    // No secret and no parameter on the command line: they are files.
    assert!(!args.iter().any(|a| a.contains("secret")
        && !a.contains(names::SECRET_MOUNT)
        && !a.contains(names::APP_SECRET_MOUNT)));
    assert!(!args.iter().any(|a| a.starts_with("--parameter")));
    let readiness = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("readiness");
    assert_eq!(
        readiness.path.as_deref(),
        Some(pgrs::protocol::api::READYZ_PATH)
    );
    let liveness = container
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("liveness");
    assert_eq!(
        liveness.path.as_deref(),
        Some(pgrs::protocol::api::HEALTHZ_PATH)
    );
    let env = container.env.clone().expect("env");
    let pod_name = env
        .iter()
        .find(|e| e.name == "PGRS_NAME")
        .expect("PGRS_NAME");
    assert_eq!(
        pod_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("metadata.name")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("orders-agent"));
    // Default image when spec.image is unset.
    let basic = built("basic");
    let image = basic.statefulsets[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod")
        .containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some(IMAGE));
}

#[test]
fn agent_role_is_limited_to_its_lease_and_pods() {
    let objects = built("geo");
    let rules = objects.role.rules.clone().expect("rules");
    assert_eq!(rules.len(), 2);
    let lease = &rules[0];
    assert_eq!(
        lease.resources.as_deref(),
        Some(&["leases".to_string()][..])
    );
    assert_eq!(
        lease.resource_names.as_deref(),
        Some(&["orders-primary".to_string()][..])
    );
    assert!(
        !lease
            .verbs
            .iter()
            .any(|v| v == "create" || v == "delete" || v == "list")
    );
    let pods = &rules[1];
    assert_eq!(
        pods.resource_names.clone().expect("pod names"),
        [
            "orders-east-0",
            "orders-east-1",
            "orders-west-0",
            "orders-west-1",
            "orders-dr-0"
        ]
    );
    assert_eq!(pods.verbs, ["get"]);
    let binding = &objects.role_binding;
    assert_eq!(binding.role_ref.name, "orders-agent");
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "orders-agent")
    );
}

#[test]
fn secret_holds_the_given_credentials_and_config_map_the_parameters() {
    let objects = built("basic");
    let data = objects.secret.data.clone().expect("data");
    assert_eq!(
        data.get(names::SECRET_SUPERUSER_PASSWORD)
            .map(|b| b.0.as_slice()),
        Some(&b"superuser-secret"[..])
    );
    assert_eq!(
        data.get(names::SECRET_REPLICATION_PASSWORD)
            .map(|b| b.0.as_slice()),
        Some(&b"replication-secret"[..])
    );
    assert_eq!(
        data.get(names::SECRET_AGENT_TOKEN).map(|b| b.0.as_slice()),
        Some(&b"agent-token-secret"[..])
    );
    let config = objects.config_map.data.clone().expect("data");
    let parameters = config
        .get(names::CONFIG_PARAMETERS)
        .expect("parameters.conf");
    assert!(
        parameters.contains("shared_buffers = '128MB'\n"),
        "{parameters}"
    );
    assert!(
        parameters.contains("max_connections = '200'\n"),
        "{parameters}"
    );
    // Credentials appear in the Secret only.
    let rendered = render(&objects);
    assert!(!rendered.contains("superuser-secret"));
    assert!(!format!("{:?}", secrets()).contains("superuser-secret"));
}

#[test]
fn pod_disruption_budget_allows_one_pod_at_a_time() {
    let objects = built("basic");
    let spec = objects.pod_disruption_budget.spec.clone().expect("spec");
    assert_eq!(
        spec.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        spec.selector
            .and_then(|s| s.match_labels)
            .expect("selector"),
        names::cluster_selector("pg")
    );
}

#[test]
fn build_refuses_a_cluster_without_namespace_or_uid() {
    let secrets = secrets();
    let mut cluster = cluster("basic");
    cluster.metadata.uid = None;
    let error = build(&BuildInput {
        cluster: &cluster,
        default_image: IMAGE,
        secrets: &secrets,
    });
    assert_eq!(error, Err(BuildError::MissingMetadata("uid")));
    cluster.metadata.namespace = None;
    let error = build(&BuildInput {
        cluster: &cluster,
        default_image: IMAGE,
        secrets: &secrets,
    });
    assert_eq!(error, Err(BuildError::MissingMetadata("namespace")));
}

/// The built container arguments are ones `pgrs agent` parses, so a renamed agent flag fails
/// here rather than in a crash-looping pod. `--role` is swapped for one the agent knows until
/// it gains its Kubernetes startup mode (`names::AGENT_STARTUP_ROLE`); the name comes from
/// `PGRS_NAME` in the pod.
#[test]
fn agent_parses_the_built_arguments() {
    use clap::Parser as _;
    let startup_role = format!("--role={}", names::AGENT_STARTUP_ROLE);
    for fixture in ["basic", "geo"] {
        let cluster = cluster(fixture);
        let name = cluster.metadata.name.clone().expect("name");
        let mut argv = vec!["pgrs".to_string()];
        argv.extend(
            pgrs::operator::build::agent_args(&name, &cluster.spec)
                .into_iter()
                .map(|arg| {
                    if arg == startup_role {
                        "--role=replica".to_string()
                    } else {
                        arg
                    }
                }),
        );
        argv.push(format!("--name={name}-0"));
        argv.push(format!("--primary-host={name}-1.{name}-instances"));
        if let Err(error) = pgrs::cli::Cli::try_parse_from(&argv) {
            panic!("pgrs agent refuses {argv:?}: {error}");
        }
    }
}

#[test]
fn app_secret_holds_the_connection_strings_of_the_rw_service() {
    let objects = built("basic");
    let secret = &objects.app_secret;
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/basic-auth"));
    let data = secret.data.clone().expect("data");
    let name = secret.metadata.name.clone().expect("name");
    let namespace = secret.metadata.namespace.clone().expect("namespace");
    let cluster = name.strip_suffix("-app").expect("named <cluster>-app");
    let value = |key: &str| String::from_utf8(data.get(key).expect(key).0.clone()).expect("UTF-8");
    assert_eq!(value(names::APP_USERNAME), "app");
    assert_eq!(value(names::APP_PASSWORD), "app-secret");
    assert_eq!(value(names::APP_DBNAME), "app");
    assert_eq!(value(names::APP_HOST), format!("{cluster}-rw"));
    assert_eq!(value(names::APP_PORT), "5432");
    let host = format!("{cluster}-rw.{namespace}");
    assert_eq!(
        value(names::APP_URI),
        format!("postgresql://app:app-secret@{host}:5432/app")
    );
    assert_eq!(
        value(names::APP_JDBC_URI),
        format!("jdbc:postgresql://{host}:5432/app?password=app-secret&user=app")
    );
    assert_eq!(
        value(names::APP_PGPASS),
        format!("{host}:5432:app:app:app-secret\n")
    );
    // The pods mount its password only, and the agent is told where.
    let template = objects.statefulsets[0]
        .spec
        .template
        .spec
        .as_ref()
        .expect("pod spec");
    let volume = template
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == names::APP_SECRET_VOLUME)
        .and_then(|v| v.secret.as_ref())
        .expect("app secret volume");
    assert_eq!(volume.secret_name.as_deref(), Some(name.as_str()));
    let args = template.containers[0].args.clone().expect("args");
    for expected in [
        "--app-owner=app".to_string(),
        "--app-database=app".to_string(),
        format!("--app-password-file={}/password", names::APP_SECRET_MOUNT),
    ] {
        assert!(args.contains(&expected), "{expected} missing from {args:?}");
    }
}
