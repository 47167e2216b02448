//! One StatefulSet per instance group: pods running `pgrs agent`, one volume each.
//!
//! The StatefulSet only keeps pods and volumes in place; it never decides anything about
//! PostgreSQL. Hence `OnDelete` updates (the operator restarts replicas first and switches over
//! before restarting the primary), `Parallel` pod management (order carries no meaning: roles
//! come from the Lease and the operator), and no role in the pod template (the operator labels
//! pods).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Owner;
use super::names;
use crate::api::{PgReplicaSetSpec, ResolvedGroup};
use crate::protocol::api::{HEALTHZ_PATH, READYZ_PATH};

/// Time for a stopping pod: a fast shutdown of postgres bounded by the agent's stop timeout,
/// then the Lease release.
const TERMINATION_GRACE_SECONDS: i64 = 30;
/// Secret files: readable by the `postgres` group (`fsGroup`), by no one else.
const SECRET_FILE_MODE: i32 = 0o440;

/// The `pgrs agent` arguments (after the image's `pgrs` entrypoint). The instance name comes
/// from `PGRS_NAME` (the pod name, through the downward API).
pub fn agent_args(cluster: &str, spec: &PgReplicaSetSpec) -> Vec<String> {
    let ms = |seconds: f64| crate::api::seconds_to_duration(seconds).as_millis();
    let secret_file = |key: &str| format!("{}/{key}", names::SECRET_MOUNT);
    let failover = &spec.failover;
    let mut args = vec![
        "agent".to_string(),
        format!("--role={}", names::AGENT_STARTUP_ROLE),
        format!("--cluster={cluster}"),
        // The image's /usr/lib/postgresql/<major>/bin, refused if it is another major.
        format!("--postgres-version={}", spec.postgres_version),
        format!("--data-dir={}", names::DATA_DIR),
        format!("--run-dir={}", names::RUN_DIR),
        format!("--port={}", names::POSTGRES_PORT),
        format!("--http-listen=0.0.0.0:{}", names::AGENT_PORT),
        format!("--token-file={}", secret_file(names::SECRET_AGENT_TOKEN)),
        format!(
            "--superuser-password-file={}",
            secret_file(names::SECRET_SUPERUSER_PASSWORD)
        ),
        format!(
            "--replication-password-file={}",
            secret_file(names::SECRET_REPLICATION_PASSWORD)
        ),
        // The application role and database of spec.bootstrap, ensured by the primary.
        format!("--app-owner={}", spec.bootstrap.owner),
        format!("--app-database={}", spec.bootstrap.database),
        format!(
            "--app-password-file={}/{}",
            names::APP_SECRET_MOUNT,
            names::APP_PASSWORD
        ),
        format!(
            "--lease-duration-ms={}",
            ms(failover.lease_duration_seconds)
        ),
        format!(
            "--lease-renew-interval-ms={}",
            ms(failover.renew_interval_seconds)
        ),
        format!(
            "--lease-renew-deadline-ms={}",
            ms(failover.renew_deadline_seconds)
        ),
        format!(
            "--lease-shutdown-budget-ms={}",
            ms(failover.shutdown_budget_seconds)
        ),
    ];
    if spec.enable_superuser_access {
        args.push("--superuser-access".to_string());
    }
    if spec.tls.enabled {
        // `$(PGRS_NAMESPACE)`: the kubelet expands it from the container's environment.
        args.extend([
            format!("--tls-dir={}", names::TLS_MOUNT),
            format!(
                "--tls-server-name={}.$(PGRS_NAMESPACE).svc",
                names::headless_service(cluster)
            ),
            "--https".to_string(),
        ]);
    }
    args
}

/// The Secret the instances serve their certificate from.
pub fn tls_secret_name(cluster: &str, spec: &PgReplicaSetSpec) -> String {
    spec.tls
        .server_secret
        .clone()
        .unwrap_or_else(|| names::tls_secret(cluster))
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value),
        ..EnvVar::default()
    }
}

/// Environment of the agent: its identity from the downward API, and where its Lease and
/// parameters are (the contract of the agent's Kubernetes mode).
fn agent_env(cluster: &str) -> Vec<EnvVar> {
    vec![
        field_env("PGRS_NAME", "metadata.name"),
        field_env("PGRS_POD_UID", "metadata.uid"),
        field_env("PGRS_NAMESPACE", "metadata.namespace"),
        field_env("PGRS_POD_IP", "status.podIP"),
        value_env("PGRS_LEASE_NAME", names::lease(cluster)),
        value_env(
            "PGRS_PARAMETERS_FILE",
            format!("{}/{}", names::CONFIG_MOUNT, names::CONFIG_PARAMETERS),
        ),
    ]
}

/// A probe of the agent's `path`: answered from the agent's memory, no SQL, no token. Over
/// HTTPS with TLS (a kubelet does not verify the certificate of a probe).
fn agent_probe(
    https: bool,
    path: &str,
    period_seconds: i32,
    timeout_seconds: i32,
    failure_threshold: i32,
) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(names::AGENT_PORT_NAME.to_string()),
            scheme: Some(if https { "HTTPS" } else { "HTTP" }.to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(timeout_seconds),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn container(cluster: &str, spec: &PgReplicaSetSpec, image: &str) -> Container {
    let port = |name: &str, port: u16| ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(port),
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    };
    Container {
        name: names::CONTAINER_NAME.to_string(),
        image: Some(image.to_string()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        args: Some(agent_args(cluster, spec)),
        env: Some(agent_env(cluster)),
        ports: Some(vec![
            port(names::POSTGRES_PORT_NAME, names::POSTGRES_PORT),
            port(names::AGENT_PORT_NAME, names::AGENT_PORT),
        ]),
        // Ready (`/readyz`): postgres was up and serving as primary or replica at the agent's
        // last look (once a second); which pod gets `-rw` is still the operator's label.
        // Alive (`/healthz`): the agent's supervisor and its loop run; a bootstrap may take
        // long and is alive. Neither runs SQL nor needs the token, so a flood of requests on
        // the agent port cannot fail them (the status, `/v1/status`, needs the token).
        readiness_probe: Some(agent_probe(spec.tls.enabled, READYZ_PATH, 2, 1, 3)),
        liveness_probe: Some(agent_probe(spec.tls.enabled, HEALTHZ_PATH, 10, 5, 6)),
        resources: spec.resources.clone(),
        volume_mounts: Some(
            [
                mount(names::DATA_VOLUME, names::DATA_MOUNT, false),
                mount(names::SECRET_VOLUME, names::SECRET_MOUNT, true),
                mount(names::APP_SECRET_VOLUME, names::APP_SECRET_MOUNT, true),
                mount(names::CONFIG_VOLUME, names::CONFIG_MOUNT, true),
                mount(names::RUN_VOLUME, names::RUN_MOUNT, false),
                mount(names::TMP_VOLUME, names::TMP_MOUNT, false),
            ]
            .into_iter()
            .chain(
                spec.tls
                    .enabled
                    .then(|| mount(names::TLS_VOLUME, names::TLS_MOUNT, true)),
            )
            .collect(),
        ),
        // The `restricted` Pod Security Standard; everything written is on a volume.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    }
}

/// Spread a group's instances over nodes when the user gave no affinity of their own.
fn default_affinity(cluster: &str, group: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".to_string(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(names::group_selector(cluster, group)),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn volumes(cluster: &str, spec: &PgReplicaSetSpec) -> Vec<Volume> {
    let tls = spec.tls.enabled.then(|| Volume {
        name: names::TLS_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(tls_secret_name(cluster, spec)),
            default_mode: Some(SECRET_FILE_MODE),
            items: Some(
                [names::CA_CRT, names::TLS_CRT, names::TLS_KEY]
                    .into_iter()
                    .map(|key| KeyToPath {
                        key: key.to_string(),
                        path: key.to_string(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    let mut volumes = vec![
        Volume {
            name: names::SECRET_VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::secret(cluster)),
                default_mode: Some(SECRET_FILE_MODE),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        // Only the password of `<name>-app`: the agent needs nothing else from it.
        Volume {
            name: names::APP_SECRET_VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::app_secret(cluster)),
                default_mode: Some(SECRET_FILE_MODE),
                items: Some(vec![KeyToPath {
                    key: names::APP_PASSWORD.to_string(),
                    path: names::APP_PASSWORD.to_string(),
                    ..KeyToPath::default()
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: names::CONFIG_VOLUME.to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config_map(cluster),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: names::RUN_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: names::TMP_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    volumes.extend(tls);
    volumes
}

fn volume_claim(cluster: &str, spec: &PgReplicaSetSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(names::DATA_VOLUME.to_string()),
            labels: Some(names::cluster_labels(cluster)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(spec.storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

pub fn statefulset(
    owner: &Owner,
    spec: &PgReplicaSetSpec,
    group: &ResolvedGroup,
    image: &str,
) -> StatefulSet {
    let cluster = owner.name.as_str();
    let mut metadata = owner.meta(group.statefulset.clone());
    let mut pod_labels = names::cluster_labels(cluster);
    pod_labels.insert(names::LABEL_GROUP.to_string(), group.name.clone());
    metadata.labels = Some(pod_labels.clone());
    let postgres_id = Some(names::POSTGRES_UID);
    StatefulSet {
        metadata,
        spec: StatefulSetSpec {
            replicas: Some(i32::try_from(group.replicas).unwrap_or(i32::MAX)),
            service_name: Some(names::headless_service(cluster)),
            selector: LabelSelector {
                match_labels: Some(names::group_selector(cluster, &group.name)),
                ..LabelSelector::default()
            },
            pod_management_policy: Some("Parallel".to_string()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                ..StatefulSetUpdateStrategy::default()
            }),
            // Deleting the cluster deletes its data; scaling down keeps a volume for a later
            // scale-up (the instance then rejoins).
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".to_string()),
                    when_scaled: Some("Retain".to_string()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::agent_account(cluster)),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    // The pods need no Service environment variables, and a namespace with
                    // many Services would make them long.
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_user: postgres_id,
                        run_as_group: postgres_id,
                        fs_group: postgres_id,
                        run_as_non_root: Some(true),
                        fs_group_change_policy: Some("OnRootMismatch".to_string()),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_string(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    node_selector: (!group.node_selector.is_empty())
                        .then(|| group.node_selector.clone()),
                    affinity: Some(
                        group
                            .affinity
                            .clone()
                            .unwrap_or_else(|| default_affinity(cluster, &group.name)),
                    ),
                    tolerations: (!group.tolerations.is_empty()).then(|| group.tolerations.clone()),
                    containers: vec![container(cluster, spec, image)],
                    volumes: Some(volumes(cluster, spec)),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![volume_claim(cluster, spec)]),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}
