//! `PgReplicaSet.spec`: what the user asks for. Doc comments become the CRD descriptions
//! (`kubectl explain pgrs.spec...`); bounds and CEL rules become server-side validation, with
//! messages that name the field. Cross-field rules sit on the struct that holds both fields.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::status::PgReplicaSetStatus;

/// Desired state of a PostgreSQL streaming-replication cluster: one primary and hot standbys,
/// with automatic, split-brain-safe failover through the Lease `<name>-primary`.
// Each `printcolumn(...)` repeats `type_ = "string"`: distinct columns, not duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "pgrs.dev",
    version = "v1alpha1",
    kind = "PgReplicaSet",
    plural = "pgreplicasets",
    shortname = "pgrs",
    namespaced,
    status = "PgReplicaSetStatus",
    derive = "PartialEq",
    // Rules relating metadata.name to the spec: only the root sees both.
    validation = crate::api::validation::name_is_a_label_rule(),
    validation = crate::api::validation::name_length_rule(),
    validation = crate::api::validation::name_and_group_length_rule(),
    validation = crate::api::validation::switchover_target_rule(),
    validation = crate::api::validation::switchover_target_in_groups_rule(),
    doc = "A PostgreSQL streaming-replication cluster (one primary, hot standbys) with automatic, split-brain-safe failover.",
    printcolumn(
        name = "Primary",
        type_ = "string",
        json_path = ".status.currentPrimary",
        description = "The instance allowed to accept writes (the Lease holder)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready instances / desired instances"
    ),
    printcolumn(
        name = "Max-Lag",
        type_ = "string",
        json_path = ".status.maxLag",
        description = "Largest replication lag among the standbys"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Cluster phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.replication.mode != 'sync' || self.replication.syncReplicas < self.replicas",
        "message": "spec.replication.syncReplicas must be less than spec.replicas: the primary is not its own synchronous standby",
        "fieldPath": ".replication.syncReplicas"
    },
    {
        "rule": "!has(self.groups) || size(self.groups) == 0 || self.groups.map(g, g.replicas).sum() == self.replicas",
        "message": "spec.groups[*].replicas must add up to spec.replicas",
        "fieldPath": ".groups"
    },
    {
        "rule": "self.postgresVersion >= oldSelf.postgresVersion",
        "message": "spec.postgresVersion cannot be lowered: a data directory is never downgraded (raise it to upgrade with pg_upgrade)",
        "fieldPath": ".postgresVersion"
    },
    {
        "rule": "!has(self.groups) || self.groups.all(g, self.groups.exists_one(h, h.name == g.name))",
        "message": "spec.groups[*].name must be unique",
        "fieldPath": ".groups"
    },
    {
        "rule": "!has(self.groups) || size(self.groups) == 0 || self.groups.exists(g, g.replicas > 0 && g.failoverPriority > 0)",
        "message": "spec.groups: at least one group with replicas > 0 needs failoverPriority > 0, or no instance could ever be promoted",
        "fieldPath": ".groups"
    },
    {
        "rule": "self.replication.mode != 'sync' || !has(self.groups) || size(self.groups) == 0 || self.groups.filter(g, g.syncEligible).map(g, g.replicas).sum() > self.replication.syncReplicas",
        "message": "spec.groups: in sync mode, the syncEligible groups need more than spec.replication.syncReplicas instances (one of them may be the primary)",
        "fieldPath": ".groups"
    }
]))]
pub struct PgReplicaSetSpec {
    /// Major version of PostgreSQL: 14 to 18 (default 15). The agent runs the image's
    /// `/usr/lib/postgresql/<postgresVersion>/bin` and refuses binaries or a data directory of
    /// another major. Raising it upgrades the running cluster with pg_upgrade
    /// (`status.majorUpgrade`); lowering it is refused.
    #[serde(default = "default_postgres_version")]
    #[schemars(range(min = 14, max = 18))]
    pub postgres_version: u32,

    /// Container image with the `pgrs` binary and the PostgreSQL server binaries of
    /// `postgresVersion`. Default: the operator's image for that major (its
    /// `--postgres-image MAJOR=IMAGE`; else its own image for 15 and that image's tag with
    /// `-pg<major>` appended for the others, e.g. `ghcr.io/pgrs-dev/pgrs:0.1.0-pg17`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Number of PostgreSQL instances (pods), the primary included: 3 means one primary and two
    /// standbys. With `groups`, their `replicas` must add up to this number.
    #[schemars(range(min = 1, max = 16))]
    pub replicas: u32,

    /// The persistent volume of every instance.
    pub storage: StorageSpec,

    /// CPU and memory of the PostgreSQL container (the agent and postgres share it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// PostgreSQL parameters (`postgresql.conf`), name to value, for example
    /// `shared_buffers: 256MB`. Refused: parameters the agent manages itself (ports, paths,
    /// replication, archiving), shell commands, `ssl` and `ssl_*`, `full_page_writes`,
    /// `recovery_target*`, `restart_after_crash`, library paths, file paths, `include*`, and
    /// preload lists naming a library other than pg_stat_statements, auto_explain and
    /// pg_prewarm (docs/kubernetes.md). Values are one line of at most 4096 characters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = super::parameters::parameters_rules)]
    pub parameters: BTreeMap<String, String>,

    /// Streaming replication: asynchronous or synchronous, and how much data a failover may
    /// lose.
    #[serde(default)]
    pub replication: ReplicationSpec,

    /// Automatic failover and the Lease timings that make it split-brain safe.
    #[serde(default)]
    pub failover: FailoverSpec,

    /// Instance groups (for example one per zone), each its own StatefulSet. Empty: one group
    /// of `replicas` instances, every one eligible for failover and synchronous replication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub groups: Vec<InstanceGroup>,

    /// Lag alerts and how often the operator polls the agents.
    #[serde(default)]
    pub monitoring: MonitoringSpec,

    /// A planned switchover: set `targetInstance` to move the primary role to that instance
    /// (no data loss, no Lease expiry to wait for). The annotation
    /// `pgrs.dev/switchover-to=<instance>` does the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<SwitchoverSpec>,

    /// Application access, created on the primary at bootstrap: a `LOGIN` role `owner` and a
    /// database `database` it owns, with their credentials and connection strings in the
    /// Secret `<name>-app`. Immutable after creation.
    #[serde(default)]
    pub bootstrap: BootstrapSpec,

    /// TLS of every connection (on by default, with a CA per cluster).
    #[serde(default)]
    pub tls: super::TlsSpec,

    /// Let the superuser (`postgres`, password: key `superuser-password` of the Secret
    /// `<name>-secrets`) log in to the instances over the network (TLS and SCRAM like every
    /// login). Default false: the instances' `pg_hba.conf` rejects it from every address but
    /// the pod's own socket and loopback (`kubectl exec`), as CloudNativePG's
    /// `enableSuperuserAccess`; applications use the role of `<name>-app`, and neither the
    /// operator nor the agents need a superuser login. A change applies without a restart
    /// (`pg_hba.conf` rendered again and reloaded on every instance within a round or two).
    #[serde(default)]
    pub enable_superuser_access: bool,
}

/// The application's role and database (CloudNativePG's `initdb.database`/`initdb.owner`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self == oldSelf",
        "message": "spec.bootstrap is immutable: the role and database exist already (rename them in PostgreSQL instead)"
    },
    {
        "rule": "!(self.owner in ['postgres', 'replicator']) && !self.owner.startsWith('pg_')",
        "message": "spec.bootstrap.owner must not be the superuser (postgres), the replication role (replicator) or a reserved pg_* name",
        "fieldPath": ".owner"
    },
    {
        "rule": "!(self.database in ['postgres', 'template0', 'template1'])",
        "message": "spec.bootstrap.database must not be postgres, template0 or template1",
        "fieldPath": ".database"
    }
]))]
pub struct BootstrapSpec {
    /// Name of the application database (default `app`): a lowercase PostgreSQL identifier
    /// (a letter or `_` first, then lowercase letters, digits and `_`; at most 63 characters),
    /// not `postgres`, `template0` or `template1`.
    #[serde(default = "default_app_name")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z_][a-z0-9_]*$"))]
    pub database: String,

    /// Name of the role owning it, with `LOGIN` and the password of the Secret `<name>-app`
    /// (default `app`): a lowercase PostgreSQL identifier, not `postgres`, `replicator` or
    /// `pg_*`.
    #[serde(default = "default_app_name")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z_][a-z0-9_]*$"))]
    pub owner: String,
}

impl Default for BootstrapSpec {
    fn default() -> Self {
        BootstrapSpec {
            database: default_app_name(),
            owner: default_app_name(),
        }
    }
}

fn default_app_name() -> String {
    "app".to_string()
}

fn default_postgres_version() -> u32 {
    crate::postgres::version::DEFAULT_MAJOR
}

/// The persistent volume of every instance (one PersistentVolumeClaim per pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.storageClassName) == has(oldSelf.storageClassName)",
        "message": "spec.storage.storageClassName is immutable: it cannot be added or removed after creation",
        "fieldPath": ".storageClassName"
    },
    {
        "rule": "!isQuantity(self.size) || !isQuantity(oldSelf.size) || quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
        "message": "spec.storage.size cannot shrink",
        "fieldPath": ".size"
    }
]))]
pub struct StorageSpec {
    /// Size of each instance's volume, as a Kubernetes quantity (for example `10Gi`). It may
    /// grow (when the storage class allows volume expansion), never shrink.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))", "message": "spec.storage.size must be a positive quantity such as 10Gi" }
    ]))]
    pub size: String,

    /// StorageClass of the volumes. Default: the cluster's default StorageClass. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [
        { "rule": "self == oldSelf", "message": "spec.storage.storageClassName is immutable" }
    ]))]
    pub storage_class_name: Option<String>,
}

/// Whether the primary waits for standbys before acknowledging a commit.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationMode {
    /// Commits are acknowledged once flushed on the primary; a failover may lose the most recent
    /// ones (bounded by `maxFailoverLagBytes`).
    #[default]
    Async,
    /// Commits are acknowledged once `syncReplicas` standbys have flushed them.
    Sync,
}

/// What happens in sync mode when fewer than `syncReplicas` standbys are healthy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataDurability {
    /// Keep requiring `syncReplicas` acknowledgements: writes wait rather than lose safety.
    #[default]
    Required,
    /// Lower the quorum to the healthy standbys (down to asynchronous) so writes keep going.
    Preferred,
}

/// Streaming replication settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.mode != 'sync' || self.syncReplicas >= 1",
        "message": "spec.replication.syncReplicas must be at least 1 when spec.replication.mode is sync",
        "fieldPath": ".syncReplicas"
    }
]))]
pub struct ReplicationSpec {
    /// `async` (default) or `sync`.
    #[serde(default)]
    pub mode: ReplicationMode,

    /// In sync mode, how many standbys must confirm each commit (`ANY n (...)` quorum).
    #[serde(default = "default_sync_replicas")]
    #[schemars(range(max = 15))]
    pub sync_replicas: u32,

    /// In sync mode, `required` (default: writes wait for the quorum) or `preferred` (the
    /// quorum shrinks to the healthy standbys).
    #[serde(default)]
    pub data_durability: DataDurability,

    /// Refuse an automatic failover whose candidate is more than this many bytes of WAL behind
    /// the last known primary position. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failover_lag_bytes: Option<u64>,

    /// Each standby streams through a physical replication slot on the primary, so the WAL it
    /// still needs is kept (bounded by the agent's `max_slot_wal_keep_size`).
    #[serde(default = "default_true")]
    pub slots: bool,
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        ReplicationSpec {
            mode: ReplicationMode::Async,
            sync_replicas: default_sync_replicas(),
            data_durability: DataDurability::Required,
            max_failover_lag_bytes: None,
            slots: true,
        }
    }
}

fn default_sync_replicas() -> u32 {
    1
}

fn default_true() -> bool {
    true
}

/// Automatic failover. The primary renews the Lease `<name>-primary` every
/// `renewIntervalSeconds`; if it could not renew for `renewDeadlineSeconds` it stops postgres
/// at once (within `shutdownBudgetSeconds`). A standby is promoted only after the Lease was seen
/// unchanged for `leaseDurationSeconds`, so the old primary has always stopped first.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// `double(...)`: an integer written in YAML for a `number` field must compare as a double.
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "double(self.renewDeadlineSeconds) + double(self.shutdownBudgetSeconds) < double(self.leaseDurationSeconds)",
        "message": "spec.failover: renewDeadlineSeconds + shutdownBudgetSeconds must be less than leaseDurationSeconds, so that a cut-off primary has stopped before its Lease can expire",
        "fieldPath": ".renewDeadlineSeconds"
    },
    {
        "rule": "double(self.renewIntervalSeconds) < double(self.renewDeadlineSeconds)",
        "message": "spec.failover.renewIntervalSeconds must be less than spec.failover.renewDeadlineSeconds, or one slow renewal fences the primary",
        "fieldPath": ".renewIntervalSeconds"
    }
]))]
pub struct FailoverSpec {
    /// Promote a standby automatically when the primary is lost. Planned switchovers work
    /// either way.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// How long a Lease must stay unchanged (on the observer's own clock) before another
    /// instance may take it. A hard-killed primary is replaced after about this long.
    #[serde(default = "default_lease_duration")]
    #[schemars(range(min = 1.0, max = 300.0))]
    pub lease_duration_seconds: f64,

    /// How often the primary renews the Lease.
    #[serde(default = "default_renew_interval")]
    #[schemars(range(min = 0.1, max = 60.0))]
    pub renew_interval_seconds: f64,

    /// The primary fences itself (stops postgres at once) when it could not renew the Lease
    /// for this long.
    #[serde(default = "default_renew_deadline")]
    #[schemars(range(min = 0.2, max = 290.0))]
    pub renew_deadline_seconds: f64,

    /// Time allowed for the immediate shutdown of a fencing primary.
    #[serde(default = "default_shutdown_budget")]
    #[schemars(range(min = 0.1, max = 60.0))]
    pub shutdown_budget_seconds: f64,

    /// Promote even when the best candidate may miss acknowledged commits (no synchronous
    /// standby caught up, or beyond `maxFailoverLagBytes`). Said loudly in a Warning event.
    #[serde(default)]
    pub allow_data_loss: bool,

    /// Keep the primary writable while the Kubernetes API server is unreachable for it, as long
    /// as every other instance confirms over the agents' API that it still follows it (like
    /// Patroni's `failsafe_mode`). An instance that confirmed refuses promotion until its
    /// confirmation expires (a lease duration). Any instance unreachable or refusing: the
    /// primary fences itself after `renewDeadlineSeconds`, as without the failsafe.
    #[serde(default = "default_true")]
    pub failsafe: bool,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        FailoverSpec {
            enabled: true,
            failsafe: true,
            lease_duration_seconds: default_lease_duration(),
            renew_interval_seconds: default_renew_interval(),
            renew_deadline_seconds: default_renew_deadline(),
            shutdown_budget_seconds: default_shutdown_budget(),
            allow_data_loss: false,
        }
    }
}

fn default_lease_duration() -> f64 {
    8.0
}

fn default_renew_interval() -> f64 {
    1.0
}

fn default_renew_deadline() -> f64 {
    5.0
}

fn default_shutdown_budget() -> f64 {
    2.0
}

/// A set of instances with the same placement and failover role (for example one zone or
/// region). Each group is its own StatefulSet `<name>-<group>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceGroup {
    /// Group name, part of the StatefulSet and pod names (a DNS label of at most 15
    /// characters).
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// Number of instances in this group.
    #[schemars(range(max = 16))]
    pub replicas: u32,

    /// Node labels the group's pods must match (for example a zone label).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Affinity rules of the group's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Tolerations of the group's pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Preference when choosing a failover candidate among equally advanced standbys: higher
    /// wins. 0: never promote an instance of this group.
    #[serde(default = "default_failover_priority")]
    #[schemars(range(max = 100))]
    pub failover_priority: u32,

    /// Whether instances of this group may be synchronous standbys (sync mode).
    #[serde(default = "default_true")]
    pub sync_eligible: bool,
}

fn default_failover_priority() -> u32 {
    1
}

/// Monitoring settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// A standby further behind than this raises the `LagHigh` condition and a Warning event.
    #[serde(default = "default_lag_alert")]
    #[schemars(range(min = 1, max = 86400))]
    pub lag_alert_seconds: u32,

    /// How often the operator reads each agent's status.
    #[serde(default = "default_status_interval")]
    #[schemars(range(min = 1, max = 300))]
    pub status_interval_seconds: u32,

    /// A standby more than this many bytes behind the primary leaves the `<name>-ro` Service
    /// (it stays eligible for failover).
    #[serde(default = "default_read_max_lag")]
    pub read_replica_max_lag_bytes: u64,
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        MonitoringSpec {
            lag_alert_seconds: default_lag_alert(),
            status_interval_seconds: default_status_interval(),
            read_replica_max_lag_bytes: default_read_max_lag(),
        }
    }
}

fn default_lag_alert() -> u32 {
    10
}

fn default_status_interval() -> u32 {
    1
}

fn default_read_max_lag() -> u64 {
    16 * 1024 * 1024
}

/// A planned switchover request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverSpec {
    /// The instance (pod name) that should become the primary.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub target_instance: String,
}
