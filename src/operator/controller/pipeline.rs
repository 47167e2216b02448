//! The reconcile pipeline of one cluster: validate (pure) → secrets (read back, generated on
//! first reconcile) → apply (server-side apply of every child) → the control round
//! ([`super::round`]) → status.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::EventType;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::Serialize;

use crate::api::{self, PgReplicaSet, PgReplicaSetStatus};
use crate::coordination::KubeLeaseStore;
use crate::operator::build::{self, BuildInput, ClusterSecrets, names};
use crate::operator::pods::PodView;
use crate::operator::status;
use crate::operator::upgrade;

use super::round::RoundMode;
use super::{ClusterRuntime, Context, REAPPLY_EVERY, ReconcileError, URGENT_REQUEUE};

/// At most this many rounds follow the first one within one reconcile (after a switchover's
/// demote, Lease takeover and promote, the round that labels the new primary).
const CHAINED_ROUNDS: usize = 4;

/// How long one Kubernetes API request of a reconcile may take (kube sets no timeout): short
/// against the lease duration, like the control loop's Lease read and the control state.
pub(super) const API_TIMEOUT: Duration = Duration::from_secs(2);

/// `request` bounded by [`API_TIMEOUT`]; running out is [`ReconcileError::Timeout`] naming
/// `what` (e.g. `reading the Secret pg-secrets`).
pub(super) async fn bounded<T>(
    what: impl FnOnce() -> String,
    request: impl Future<Output = T>,
) -> Result<T, ReconcileError> {
    tokio::time::timeout(API_TIMEOUT, request)
        .await
        .map_err(|_| ReconcileError::Timeout { what: what() })
}

pub(super) struct Reconciler<'a> {
    pub(super) cluster: &'a PgReplicaSet,
    pub(super) context: &'a Context,
    pub(super) runtime: &'a mut ClusterRuntime,
}

impl Reconciler<'_> {
    pub(super) fn namespace(&self) -> String {
        self.cluster.namespace().unwrap_or_default()
    }

    pub(super) fn name(&self) -> String {
        self.cluster.name_any()
    }

    pub(super) async fn run(&mut self) -> Result<Requeue, ReconcileError> {
        let started = Instant::now();
        let generation = self.cluster.metadata.generation.unwrap_or_default();
        if let Err(invalid) = api::validate(self.cluster) {
            let message = format!("invalid spec: {invalid}");
            let status =
                status::invalid_status(self.cluster.status.as_ref(), generation, message.clone());
            self.write_status(&status).await?;
            self.context
                .publish(self.cluster, EventType::Warning, "InvalidSpec", message)
                .await;
            return Ok(Requeue::await_change());
        }
        let secrets = self.secrets().await?;
        let tls = self.tls().await?;
        let lease = Arc::new(
            KubeLeaseStore::new(
                self.context.client.clone(),
                &self.namespace(),
                &self.name(),
                api::seconds_to_duration(self.cluster.spec.failover.lease_duration_seconds),
            )
            // Every Lease request of the reconcile (create, the round's read, the loop's writes).
            .with_request_timeout(API_TIMEOUT),
        );
        // A major-version upgrade may change the pod template and hold the round back.
        let upgrade = self
            .major_upgrade(&secrets.agent_token, tls.as_deref())
            .await?;
        self.apply(&secrets, generation).await?;
        let held = self.carry_out_upgrade(&upgrade, &lease, generation).await?;
        if let Some(status) = held {
            self.write_status(&status).await?;
            return Ok(Requeue::requeue(super::upgrade::UPGRADE_POLL));
        }
        lease
            .create_if_absent()
            .await
            .map_err(ReconcileError::Lease)?;
        let before_round = started.elapsed();
        let mut result = self
            .round(
                &secrets,
                tls.clone(),
                lease.clone(),
                RoundMode {
                    chained: false,
                    may_wait: true,
                    poll: true,
                },
            )
            .await?;
        // A failover or switchover step that ran inline (demote, a Lease write) or a promotion
        // seen finished is followed by the next round at once, without the reconcile's reads
        // and the requeue in between. A promotion is waited for once per reconcile.
        let (mut chained, mut waited) = (0, result.waited);
        while result.again && chained < CHAINED_ROUNDS {
            chained += 1;
            result = self
                .round(
                    &secrets,
                    tls.clone(),
                    lease.clone(),
                    RoundMode {
                        chained: true,
                        may_wait: !waited,
                        // The long poll just brought the promoted agent's status.
                        poll: !result.promoted,
                    },
                )
                .await?;
            waited |= result.waited;
        }
        let urgent = result.urgent;
        if chained > 0 {
            // Where a failover's or switchover's reconcile spends its time (docs/failover.md).
            tracing::info!(
                before_round_ms = before_round.as_millis() as u64,
                rounds = chained + 1,
                total_ms = started.elapsed().as_millis() as u64,
                "chained reconcile"
            );
        }
        let interval = Duration::from_secs(u64::from(
            self.cluster.spec.monitoring.status_interval_seconds,
        ));
        Ok(Requeue::requeue(if urgent {
            URGENT_REQUEUE
        } else {
            interval
        }))
    }

    /// The cluster's credentials: read back from its Secrets (every reconcile: a rotated
    /// password or token is used from the next reconcile on, nothing is cached), generated
    /// before the first bootstrap only. Missing once a primary ran, `<name>-secrets` is an
    /// error, never regenerated: the database holds its passwords and the running agents its
    /// token.
    async fn secrets(&self) -> Result<ClusterSecrets, ReconcileError> {
        let name = names::secret(&self.name());
        let app_password = self.app_password().await?;
        let Some(data) = self.read_secret(&name).await? else {
            if self.bootstrapped() {
                return Err(ReconcileError::SecretMissing { name });
            }
            return Ok(ClusterSecrets {
                superuser_password: random_secret(),
                replication_password: random_secret(),
                agent_token: random_secret(),
                app_password,
            });
        };
        Ok(ClusterSecrets {
            superuser_password: secret_key(&data, &name, names::SECRET_SUPERUSER_PASSWORD)?,
            replication_password: secret_key(&data, &name, names::SECRET_REPLICATION_PASSWORD)?,
            agent_token: secret_key(&data, &name, names::SECRET_AGENT_TOKEN)?,
            app_password,
        })
    }

    /// The application owner's password from `<name>-app`, generated before the first
    /// bootstrap only: once a primary ran, the role has a password, and a new one would
    /// silently lock the application out.
    async fn app_password(&self) -> Result<String, ReconcileError> {
        let name = names::app_secret(&self.name());
        match self.read_secret(&name).await? {
            Some(data) => secret_key(&data, &name, names::APP_PASSWORD),
            None if self.bootstrapped() => Err(ReconcileError::SecretMissing { name }),
            None => Ok(random_secret()),
        }
    }

    /// Whether a primary has run: the roles and passwords exist in PostgreSQL.
    fn bootstrapped(&self) -> bool {
        self.cluster
            .status
            .as_ref()
            .is_some_and(|status| status.current_primary.is_some())
    }

    /// The same for the agent token: an agent whose Secret volume is not refreshed yet answers
    /// the new token 401, the previous one is tried then.
    pub(super) fn token_fallback(&mut self, token: &str) -> Option<String> {
        let cluster = self.name();
        fallback(
            &mut self.runtime.agent_token,
            token,
            &cluster,
            "agent token",
        )
    }

    /// The data of the Secret `name`, `None` when it does not exist.
    pub(super) async fn read_secret(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, ByteString>>, ReconcileError> {
        let api: Api<Secret> = Api::namespaced(self.context.client.clone(), &self.namespace());
        let existing = bounded(|| format!("reading the Secret {name}"), api.get_opt(name))
            .await?
            .map_err(|source| ReconcileError::Read {
                what: format!("Secret {name}"),
                source,
            })?;
        Ok(existing.map(|secret| secret.data.unwrap_or_default()))
    }

    /// Server-side apply of every child, when the spec changed or every [`REAPPLY_EVERY`].
    async fn apply(
        &mut self,
        secrets: &ClusterSecrets,
        generation: i64,
    ) -> Result<(), ReconcileError> {
        let retained = self.retained_replicas();
        if let Some((applied, at)) = self.runtime.applied
            && applied == generation
            && at.elapsed() < REAPPLY_EVERY
            && self.runtime.rollout.applied_replicas.as_ref() == Some(&retained)
        {
            return Ok(());
        }
        let settings = &self.context.settings;
        let default_image = build::default_image_for(
            self.cluster.spec.postgres_version,
            &settings.default_image,
            &settings.postgres_images,
        );
        let template = self.runtime.upgrade.template.clone();
        let mut objects = match &template {
            Some(upgrade::Template::Old { major, image }) => {
                // A failed upgrade: the old major and its image, whatever the spec says.
                let mut old = self.cluster.clone();
                old.spec.postgres_version = *major;
                old.spec.image = Some(image.clone());
                build::build(&BuildInput {
                    cluster: &old,
                    default_image: &default_image,
                    secrets,
                })?
            }
            _ => build::build(&BuildInput {
                cluster: self.cluster,
                default_image: &default_image,
                secrets,
            })?,
        };
        if let Some(upgrade::Template::Upgrade { from_image }) = &template {
            for statefulset in &mut objects.statefulsets {
                build::with_upgrade_from(statefulset, from_image);
            }
        }
        // A scale-down keeps the primary's pod until a switchover moved the role away.
        for statefulset in &mut objects.statefulsets {
            let name = statefulset.metadata.name.clone().unwrap_or_default();
            if let Some(count) = retained.get(&name) {
                statefulset.spec.replicas = Some(i32::try_from(*count).unwrap_or(i32::MAX));
            }
        }
        self.runtime.rollout.applied_replicas = Some(retained);
        let ns = self.namespace();
        let client = &self.context.client;
        apply_one(client, &ns, &objects.service_account).await?;
        apply_one(client, &ns, &objects.role).await?;
        apply_one(client, &ns, &objects.role_binding).await?;
        apply_one(client, &ns, &objects.secret).await?;
        apply_one(client, &ns, &objects.app_secret).await?;
        apply_one(client, &ns, &objects.config_map).await?;
        for service in &objects.services {
            apply_one(client, &ns, service).await?;
        }
        for statefulset in &objects.statefulsets {
            apply_one(client, &ns, statefulset).await?;
        }
        apply_one(client, &ns, &objects.pod_disruption_budget).await?;
        self.runtime.applied = Some((generation, Instant::now()));
        Ok(())
    }

    pub(super) async fn pods(&self) -> Result<HashMap<String, PodView>, ReconcileError> {
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), &self.namespace());
        let selector = format!("{}={}", names::LABEL_CLUSTER, self.name());
        let list = bounded(
            || format!("listing the pods with {selector}"),
            api.list(&ListParams::default().labels(&selector)),
        )
        .await?
        .map_err(|source| ReconcileError::Read {
            what: format!("pods with {selector}"),
            source,
        })?;
        Ok(list
            .items
            .iter()
            .filter_map(PodView::of)
            .map(|p| (p.name.clone(), p))
            .collect())
    }

    pub(super) async fn write_status(
        &self,
        status: &PgReplicaSetStatus,
    ) -> Result<(), ReconcileError> {
        let mut status = status.clone();
        let generation = self.cluster.metadata.generation.unwrap_or_default();
        self.runtime.upgrade.stamp(&mut status, generation);
        let previous = self.cluster.status.as_ref();
        if let Some(previous) = previous {
            status::keep_transition_times(&mut status.conditions, &previous.conditions);
        }
        // Not for the heartbeat (`lastSeen`) alone: every write costs a request and, through
        // the operator's own watch, another reconcile.
        if !status::should_write(previous, &status, status::HEARTBEAT) {
            return Ok(());
        }
        let api: Api<PgReplicaSet> =
            Api::namespaced(self.context.client.clone(), &self.namespace());
        let body = serde_json::json!({
            "apiVersion": api::API_VERSION,
            "kind": api::KIND,
            "status": status,
        });
        let name = self.name();
        let params = PatchParams::apply(names::MANAGER).force();
        let patch = Patch::Apply(&body);
        bounded(
            || format!("writing the status of PgReplicaSet {name}"),
            api.patch_status(&name, &params, &patch),
        )
        .await?
        .map_err(|source| ReconcileError::Status { source })?;
        Ok(())
    }
}

/// The UTF-8 value of `key` in the Secret `name`.
fn secret_key(
    data: &BTreeMap<String, ByteString>,
    name: &str,
    key: &'static str,
) -> Result<String, ReconcileError> {
    data.get(key)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .ok_or(ReconcileError::SecretKey {
            name: name.to_string(),
            key,
        })
}

fn random_secret() -> String {
    use rand::Rng as _;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

/// Server-side apply of one child with the operator's field manager.
async fn apply_one<K>(client: &Client, namespace: &str, object: &K) -> Result<(), ReconcileError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(names::MANAGER).force();
    let patch = Patch::Apply(object);
    bounded(
        || format!("applying {} {name}", kind_of::<K>()),
        api.patch(&name, &params, &patch),
    )
    .await?
    .map_err(|source| ReconcileError::Apply {
        kind: kind_of::<K>(),
        name,
        source,
    })?;
    Ok(())
}

fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    // `Resource::kind` returns a Cow of a static string for typed resources.
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(kind) => kind,
        std::borrow::Cow::Owned(_) => "object",
    }
}

/// Notes `value` in `slot` and returns the previous value while its rotation is recent.
fn fallback(
    slot: &mut Option<crate::agent::rotation::Rotation>,
    value: &str,
    cluster: &str,
    what: &str,
) -> Option<String> {
    use crate::agent::instance::Secret;
    let now = Instant::now();
    let rotation =
        slot.get_or_insert_with(|| crate::agent::rotation::Rotation::new(Secret::new(value)));
    if rotation.rotate(Secret::new(value), now) {
        tracing::info!(
            %cluster,
            what,
            "changed in the Secret: the previous value is kept as a fallback for the rotation window"
        );
    }
    rotation
        .previous(now)
        .map(|previous| previous.expose().to_string())
}
