//! Names that matter, in one place: object names derived from the cluster name, label keys,
//! ports, paths inside the pod. The reconcile loop, the agent's Kubernetes mode and the tests
//! use these, never string literals.

use std::collections::BTreeMap;

/// `app.kubernetes.io/name` of every object.
pub const APP_NAME: &str = "pgrs";
/// `app.kubernetes.io/managed-by`, and the server-side apply field manager.
pub const MANAGER: &str = "pgrs-operator";

pub const LABEL_APP_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_APP_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_APP_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The owning `PgReplicaSet`.
pub const LABEL_CLUSTER: &str = "pgrs.dev/cluster";
/// The instance group (StatefulSet) of a pod.
pub const LABEL_GROUP: &str = "pgrs.dev/group";
/// Set on pods by the operator only: `primary` on the Lease holder (selected by `<name>-rw`),
/// `replica` on the others. A fenced or unreachable old primary loses it first.
pub const LABEL_ROLE: &str = "pgrs.dev/role";
pub const ROLE_PRIMARY: &str = "primary";
pub const ROLE_REPLICA: &str = "replica";
/// Set on pods by the operator only: `true` on replicas within
/// `spec.monitoring.readReplicaMaxLagBytes` (selected by `<name>-ro`).
pub const LABEL_READ_POOL: &str = "pgrs.dev/read-pool";
pub const READ_POOL_MEMBER: &str = "true";
/// Annotation requesting a planned switchover to the named instance.
pub const ANNOTATION_SWITCHOVER_TO: &str = "pgrs.dev/switchover-to";
/// Set on pods by the operator only: `true` on every instance that is not fenced (selected by
/// `<name>-r`), so that a fenced instance leaves every client Service.
pub const LABEL_IN_SERVICE: &str = "pgrs.dev/in-service";
pub const IN_SERVICE: &str = "true";

/// `app.kubernetes.io/component` of the database pods and their objects.
pub const COMPONENT_DATABASE: &str = "database";

pub const POSTGRES_PORT: u16 = 5432;
pub const POSTGRES_PORT_NAME: &str = "postgres";
pub const AGENT_PORT: u16 = 8008;
pub const AGENT_PORT_NAME: &str = "agent";

/// The container running `pgrs agent`.
pub const CONTAINER_NAME: &str = "postgres";
/// `--role` the pods start with: the agent waits for the operator's bootstrap or follow order
/// (the operator is the only one who decides roles). NOTE: the agent does not accept this value
/// yet; its Kubernetes startup mode is part of the reconcile-loop work.
pub const AGENT_STARTUP_ROLE: &str = "wait";

/// uid/gid of `postgres` in the pgrs image; `fsGroup` makes the volumes writable for it.
pub const POSTGRES_UID: i64 = 999;

pub const DATA_VOLUME: &str = "data";
pub const DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// A subdirectory: a fresh volume's root holds `lost+found`, and initdb wants an empty dir.
pub const DATA_DIR: &str = "/var/lib/postgresql/data/pgdata";
pub const SECRET_VOLUME: &str = "secrets";
pub const SECRET_MOUNT: &str = "/etc/pgrs/secrets";
pub const CONFIG_VOLUME: &str = "config";
pub const CONFIG_MOUNT: &str = "/etc/pgrs/config";
/// An emptyDir for the agent's run directory. Its root belongs to root (the kubelet creates
/// it, 0777 with the `fsGroup`), so the agent keeps its private directory below it.
pub const RUN_VOLUME: &str = "run";
pub const RUN_MOUNT: &str = "/var/run/pgrs";
/// The agent's `--run-dir` (socket, passfile; 0700, created by the agent as `postgres`).
pub const RUN_DIR: &str = "/var/run/pgrs/agent";
/// An emptyDir at `/tmp`: the root filesystem is read-only.
pub const TMP_VOLUME: &str = "tmp";
pub const TMP_MOUNT: &str = "/tmp";

/// Keys of the cluster Secret (file names under [`SECRET_MOUNT`]).
pub const SECRET_SUPERUSER_PASSWORD: &str = "superuser-password";
pub const SECRET_REPLICATION_PASSWORD: &str = "replication-password";
pub const SECRET_AGENT_TOKEN: &str = "agent-token";
/// The application Secret `<name>-app`, mounted (its password only) at [`APP_SECRET_MOUNT`].
pub const APP_SECRET_VOLUME: &str = "app";
pub const APP_SECRET_MOUNT: &str = "/etc/pgrs/app";
/// Keys of the application Secret ([`app_secret`]), CloudNativePG's names.
pub const APP_USERNAME: &str = "username";
pub const APP_PASSWORD: &str = "password";
pub const APP_DBNAME: &str = "dbname";
pub const APP_HOST: &str = "host";
pub const APP_PORT: &str = "port";
pub const APP_URI: &str = "uri";
pub const APP_JDBC_URI: &str = "jdbc-uri";
pub const APP_PGPASS: &str = "pgpass";
/// Key of the parameters ConfigMap (file name under [`CONFIG_MOUNT`]), `postgresql.conf` syntax.
/// The cluster's TLS files, mounted from `<name>-tls` (or `spec.tls.serverSecret`).
pub const TLS_VOLUME: &str = "tls";
pub const TLS_MOUNT: &str = "/etc/pgrs/tls";
/// Keys of a `kubernetes.io/tls` Secret with its CA, and of the CA Secret.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

pub const CONFIG_PARAMETERS: &str = "parameters.conf";
/// Key of the control state (JSON) in [`control_state`]'s ConfigMap.
pub const CONTROL_STATE_KEY: &str = "state.json";

/// Longest label value, and longest DNS label (Service names, pod hostnames).
pub const MAX_LABEL_LEN: usize = 63;

/// Longest StatefulSet name. The StatefulSet controller labels every pod
/// `controller-revision-hash: <statefulset>-<hash>` with a hash of up to 10 characters (a
/// 32-bit FNV hash in decimal), and a label value has at most 63: a longer StatefulSet creates
/// no pod at all. Its pods `<statefulset>-<ordinal>` (ordinals below 16) then have at most 55
/// characters, their slots `pgrs_<pod>` at most 60 (within PostgreSQL's 63).
pub const MAX_STATEFULSET_NAME_LEN: usize = MAX_LABEL_LEN - 1 - 10;

/// What a cluster name must look like: a DNS-1035 label (a letter first, then lowercase
/// letters, digits and `-`, no `-` last), since the Services `<name>-rw`, `-ro`, `-r` and
/// `-instances` must be DNS-1035 labels (the API server allows dots and a leading digit in
/// `metadata.name`).
pub const CLUSTER_NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// Whether `name` is a DNS-1035 label ([`CLUSTER_NAME_PATTERN`], at most 63 characters).
pub fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    bytes.len() <= MAX_LABEL_LEN
        && first.is_ascii_lowercase()
        && (last.is_ascii_lowercase() || last.is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Headless Service of every instance group: pod DNS `<pod>.<name>-instances.<ns>.svc`.
pub fn headless_service(cluster: &str) -> String {
    format!("{cluster}-instances")
}

/// Read-write Service: the pod labelled `pgrs.dev/role=primary`.
pub fn rw_service(cluster: &str) -> String {
    format!("{cluster}-rw")
}

/// Read-only Service: replicas within the read lag limit.
pub fn ro_service(cluster: &str) -> String {
    format!("{cluster}-ro")
}

/// Any instance.
pub fn r_service(cluster: &str) -> String {
    format!("{cluster}-r")
}

/// The `coordination.k8s.io/v1` Lease whose holder may be primary.
pub fn lease(cluster: &str) -> String {
    format!("{cluster}-primary")
}

pub fn secret(cluster: &str) -> String {
    format!("{cluster}-secrets")
}

/// The application's credentials and connection strings (role and database of
/// `spec.bootstrap`).
pub fn app_secret(cluster: &str) -> String {
    format!("{cluster}-app")
}

/// The cluster CA (`ca.crt`, `ca.key`), made by the operator.
pub fn ca_secret(cluster: &str) -> String {
    format!("{cluster}-ca")
}

/// The server certificate every instance serves (`kubernetes.io/tls` with `ca.crt`).
pub fn tls_secret(cluster: &str) -> String {
    format!("{cluster}-tls")
}

/// The name instances and the operator verify each other's certificate against when they
/// connect by pod IP: `<headless service>.<namespace>.svc` (`<name>-instances.…`).
pub fn tls_server_name(cluster: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc", headless_service(cluster))
}

/// The DNS names the cluster's server certificate must carry: the services (short, with the
/// namespace, `.svc`, `.svc.cluster.local`) and every pod by its headless name (wildcards).
pub fn tls_dns_names(cluster: &str, namespace: &str) -> Vec<String> {
    let mut names = Vec::new();
    for service in [
        rw_service(cluster),
        ro_service(cluster),
        r_service(cluster),
        headless_service(cluster),
    ] {
        names.push(service.clone());
        names.push(format!("{service}.{namespace}"));
        names.push(format!("{service}.{namespace}.svc"));
        names.push(format!("{service}.{namespace}.svc.cluster.local"));
    }
    let headless = headless_service(cluster);
    names.push(format!("*.{headless}.{namespace}.svc"));
    names.push(format!("*.{headless}.{namespace}.svc.cluster.local"));
    names.push("localhost".to_string());
    names
}

pub fn config_map(cluster: &str) -> String {
    format!("{cluster}-config")
}

/// The ConfigMap where the operator keeps the control loop's state (recorded sync quorum, last
/// primary position, former primaries), written before the actions that rely on it.
pub fn control_state(cluster: &str) -> String {
    format!("{cluster}-control")
}

pub fn pod_disruption_budget(cluster: &str) -> String {
    cluster.to_string()
}

/// ServiceAccount, Role and RoleBinding of the agents.
pub fn agent_account(cluster: &str) -> String {
    format!("{cluster}-agent")
}

/// Labels carried by every object of the cluster.
pub fn cluster_labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_APP_NAME.to_string(), APP_NAME.to_string()),
        (LABEL_APP_INSTANCE.to_string(), cluster.to_string()),
        (
            LABEL_APP_COMPONENT.to_string(),
            COMPONENT_DATABASE.to_string(),
        ),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
    ])
}

/// Selects every database pod of the cluster.
pub fn cluster_selector(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_CLUSTER.to_string(), cluster.to_string())])
}

/// Selects the pods of one group (the StatefulSet selector: immutable, so minimal).
pub fn group_selector(cluster: &str, group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
        (LABEL_GROUP.to_string(), group.to_string()),
    ])
}
