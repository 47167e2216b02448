//! The reconcile loop. `reconcile` only sets up the span and the metrics; the work is a
//! pipeline: validate (pure) → build (pure) → apply (server-side apply, one field manager) →
//! observe (each agent's status at its pod IP) → engine → act → status (server-side apply on the
//! status subresource). An invalid spec gets a clear status and waits for a change; other
//! errors requeue with a growing backoff.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::Instrument as _;

use crate::api::{
    self, FailoverRecord, PgReplicaSet, PgReplicaSetStatus, engine_spec, resolve_groups,
};
use crate::coordination::{KubeLeaseStore, LeaseStore as _};
use crate::engine::{self, LeaseView, MonoTime, ObservedRole, Severity, decide};
use crate::operator::act::{self, ActError, Actor, Busy, Completed};
use crate::operator::build::{self, BuildError, BuildInput, ClusterSecrets, names};
use crate::operator::observe::{self, PodView, Poll, Remembered, Report};
use crate::operator::status::{self, SeenAt, StatusInput};

/// Children are re-applied at least this often even when the spec did not change (drift).
const REAPPLY_EVERY: Duration = Duration::from_secs(30);
/// Requeue while a failover or switchover is under way.
const URGENT_REQUEUE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("failed to build the cluster's objects: {0}")]
    Build(#[from] BuildError),
    #[error("failed to apply {kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read the Secret {name}: key {key} is missing or not UTF-8")]
    SecretKey { name: String, key: &'static str },
    #[error("failed to read or create the lease: {0}")]
    Lease(#[source] crate::coordination::LeaseError),
    #[error("failed to write the status: {source}")]
    Status {
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Act(#[from] ActError),
}

impl ReconcileError {
    /// Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Build(_) => "BuildFailed",
            ReconcileError::Apply { .. } => "ApplyFailed",
            ReconcileError::Read { .. } => "ReadFailed",
            ReconcileError::SecretKey { .. } => "SecretInvalid",
            ReconcileError::Lease(_) => "LeaseFailed",
            ReconcileError::Status { .. } => "StatusWriteFailed",
            ReconcileError::Act(error) => error.category(),
        }
    }
}

/// Operator settings (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of the database pods when `spec.image` is unset.
    pub default_image: String,
    /// Drop the pods' `runAsUser`/`fsGroup` (the agent starts as root and runs postgres as the
    /// image's `postgres` user): for runtimes that ignore `fsGroup`, like the test bed.
    pub database_as_root: bool,
    /// Watch one namespace only.
    pub namespace: Option<String>,
}

/// Counters served on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reconciles: AtomicU64,
    pub failures: std::sync::Mutex<HashMap<&'static str, u64>>,
    pub failovers: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut text = String::new();
        text.push_str("# TYPE pgrs_operator_reconciles_total counter\n");
        text.push_str(&format!(
            "pgrs_operator_reconciles_total {}\n",
            self.reconciles.load(Ordering::Relaxed)
        ));
        text.push_str("# TYPE pgrs_operator_reconcile_failures_total counter\n");
        if let Ok(failures) = self.failures.lock() {
            for (category, count) in failures.iter() {
                text.push_str(&format!(
                    "pgrs_operator_reconcile_failures_total{{category=\"{category}\"}} {count}\n"
                ));
            }
        }
        text.push_str("# TYPE pgrs_operator_failovers_total counter\n");
        text.push_str(&format!(
            "pgrs_operator_failovers_total {}\n",
            self.failovers.load(Ordering::Relaxed)
        ));
        text
    }
}

/// What the controller keeps per cluster between rounds.
struct ClusterRuntime {
    remembered: Remembered,
    last_holder: Option<String>,
    /// (holder, version) of the Lease and when this observer first saw it.
    lease_seen: Option<(Option<String>, String, Instant)>,
    reports: HashMap<String, Report>,
    seen_at: SeenAt,
    busy: Busy,
    completed_tx: tokio::sync::mpsc::UnboundedSender<Completed>,
    completed_rx: tokio::sync::mpsc::UnboundedReceiver<Completed>,
    applied: Option<(i64, Instant)>,
    last_failover: Option<FailoverRecord>,
    /// When the serving primary was last lost (wall clock), for `lastFailover.detectedAt`.
    primary_lost_at: Option<Time>,
    primary_was_deleted: bool,
    /// (name, uid) of the Lease holder's pod as last seen not being deleted.
    holder_pod_uid: Option<(String, String)>,
    ever_served: bool,
    last_events: HashMap<String, String>,
    errors_in_a_row: u32,
}

impl ClusterRuntime {
    fn new(previous: Option<&PgReplicaSetStatus>) -> Self {
        let (completed_tx, completed_rx) = tokio::sync::mpsc::unbounded_channel();
        ClusterRuntime {
            remembered: Remembered::default(),
            last_holder: None,
            lease_seen: None,
            reports: HashMap::new(),
            seen_at: HashMap::new(),
            busy: Busy::default(),
            completed_tx,
            completed_rx,
            applied: None,
            last_failover: previous.and_then(|s| s.last_failover.clone()),
            primary_lost_at: None,
            primary_was_deleted: false,
            holder_pod_uid: None,
            ever_served: previous.is_some_and(|s| s.current_primary.is_some()),
            last_events: HashMap::new(),
            errors_in_a_row: 0,
        }
    }
}

/// Shared state of the controller and the web server.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Metrics,
    origin: Instant,
    clusters: Mutex<HashMap<String, Arc<Mutex<ClusterRuntime>>>>,
    pub ready: std::sync::atomic::AtomicBool,
}

impl Context {
    pub fn new(client: Client, settings: Settings) -> Arc<Context> {
        let reporter = Reporter {
            controller: names::MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics: Metrics::default(),
            origin: Instant::now(),
            clusters: Mutex::new(HashMap::new()),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn mono(&self, at: Instant) -> MonoTime {
        MonoTime(at.saturating_duration_since(self.origin))
    }

    async fn publish(&self, cluster: &PgReplicaSet, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        if let Err(error) = self
            .recorder
            .publish(&event, &cluster.object_ref(&()))
            .await
        {
            tracing::warn!(%error, reason, "failed to publish an event");
        }
    }
}

/// Runs the controller until a termination signal.
pub async fn run(context: Arc<Context>) {
    let client = context.client.clone();
    let ns = context.settings.namespace.as_deref();
    let clusters: Api<PgReplicaSet> = scoped(&client, ns);
    let statefulsets: Api<StatefulSet> = scoped(&client, ns);
    let services: Api<Service> = scoped(&client, ns);
    let pods: Api<Pod> = scoped(&client, ns);
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::MANAGER
    ));
    context.ready.store(true, Ordering::Relaxed);
    Controller::new(clusters, watcher::Config::default())
        .owns(statefulsets, owned.clone())
        .owns(services, owned.clone())
        // Pods belong to the StatefulSets, not to the PgReplicaSet: map them by label, so that a
        // deleted or restarted database pod starts a round at once.
        .watches(pods, owned, |pod| {
            let cluster = pod.labels().get(names::LABEL_CLUSTER).cloned();
            let namespace = pod.namespace();
            cluster.map(|cluster| {
                let reference = ObjectRef::<PgReplicaSet>::new(&cluster);
                match namespace {
                    Some(ns) => reference.within(&ns),
                    None => reference,
                }
            })
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "reconcile round ended with an error");
            }
        })
        .await;
}

/// An Api on one namespace, or on all of them.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn key(cluster: &PgReplicaSet) -> String {
    format!(
        "{}/{}",
        cluster.namespace().unwrap_or_default(),
        cluster.name_any()
    )
}

async fn runtime_of(context: &Context, cluster: &PgReplicaSet) -> Arc<Mutex<ClusterRuntime>> {
    context
        .clusters
        .lock()
        .await
        .entry(key(cluster))
        .or_insert_with(|| Arc::new(Mutex::new(ClusterRuntime::new(cluster.status.as_ref()))))
        .clone()
}

async fn reconcile(
    cluster: Arc<PgReplicaSet>,
    context: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    let span = tracing::info_span!("reconcile", cluster = %key(&cluster));
    reconcile_in_span(cluster, context).instrument(span).await
}

async fn reconcile_in_span(
    cluster: Arc<PgReplicaSet>,
    context: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    context.metrics.reconciles.fetch_add(1, Ordering::Relaxed);
    if cluster.metadata.deletion_timestamp.is_some() {
        // Children carry owner references: the garbage collector deletes them.
        context.clusters.lock().await.remove(&key(&cluster));
        return Ok(Requeue::await_change());
    }
    let runtime = runtime_of(&context, &cluster).await;
    let mut runtime = runtime.lock().await;
    let result = Reconciler {
        cluster: &cluster,
        context: &context,
        runtime: &mut runtime,
    }
    .run()
    .await;
    match &result {
        Ok(_) => runtime.errors_in_a_row = 0,
        Err(_) => runtime.errors_in_a_row = runtime.errors_in_a_row.saturating_add(1),
    }
    result
}

fn error_policy(
    cluster: Arc<PgReplicaSet>,
    error: &ReconcileError,
    context: Arc<Context>,
) -> Requeue {
    let category = error.category();
    tracing::warn!(cluster = %key(&cluster), category, error = %error, "reconcile failed");
    if let Ok(mut failures) = context.metrics.failures.lock() {
        *failures.entry(category).or_default() += 1;
    }
    // Backoff from the number of failures in a row (read without waiting: a running round
    // holds the lock only briefly).
    let in_a_row = context
        .clusters
        .try_lock()
        .ok()
        .and_then(|clusters| clusters.get(&key(&cluster)).cloned())
        .and_then(|runtime| runtime.try_lock().ok().map(|r| r.errors_in_a_row))
        .unwrap_or(1);
    let backoff = Duration::from_millis(500)
        .saturating_mul(2u32.saturating_pow(in_a_row.min(6)))
        .min(Duration::from_secs(30));
    let note = error.to_string();
    tokio::spawn(async move {
        context
            .publish(&cluster, EventType::Warning, category, note)
            .await;
    });
    Requeue::requeue(backoff)
}

struct Reconciler<'a> {
    cluster: &'a PgReplicaSet,
    context: &'a Context,
    runtime: &'a mut ClusterRuntime,
}

impl Reconciler<'_> {
    fn namespace(&self) -> String {
        self.cluster.namespace().unwrap_or_default()
    }

    fn name(&self) -> String {
        self.cluster.name_any()
    }

    async fn run(&mut self) -> Result<Requeue, ReconcileError> {
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
        self.apply(&secrets, generation).await?;
        let lease = Arc::new(KubeLeaseStore::new(
            self.context.client.clone(),
            &self.namespace(),
            &self.name(),
            api::seconds_to_duration(self.cluster.spec.failover.lease_duration_seconds),
        ));
        lease
            .create_if_absent()
            .await
            .map_err(ReconcileError::Lease)?;
        let urgent = self.round(&secrets, lease).await?;
        let interval = Duration::from_secs(u64::from(
            self.cluster.spec.monitoring.status_interval_seconds,
        ));
        Ok(Requeue::requeue(if urgent {
            URGENT_REQUEUE
        } else {
            interval
        }))
    }

    /// The cluster's credentials: read back from its Secret, generated on first reconcile.
    async fn secrets(&self) -> Result<ClusterSecrets, ReconcileError> {
        let name = names::secret(&self.name());
        let api: Api<Secret> = Api::namespaced(self.context.client.clone(), &self.namespace());
        let existing = api
            .get_opt(&name)
            .await
            .map_err(|source| ReconcileError::Read {
                what: format!("Secret {name}"),
                source,
            })?;
        let Some(secret) = existing else {
            return Ok(ClusterSecrets {
                superuser_password: random_secret(),
                replication_password: random_secret(),
                agent_token: random_secret(),
            });
        };
        let data = secret.data.unwrap_or_default();
        let read = |key: &'static str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .ok_or(ReconcileError::SecretKey {
                    name: name.clone(),
                    key,
                })
        };
        Ok(ClusterSecrets {
            superuser_password: read(names::SECRET_SUPERUSER_PASSWORD)?,
            replication_password: read(names::SECRET_REPLICATION_PASSWORD)?,
            agent_token: read(names::SECRET_AGENT_TOKEN)?,
        })
    }

    /// Server-side apply of every child, when the spec changed or every [`REAPPLY_EVERY`].
    async fn apply(
        &mut self,
        secrets: &ClusterSecrets,
        generation: i64,
    ) -> Result<(), ReconcileError> {
        if let Some((applied, at)) = self.runtime.applied
            && applied == generation
            && at.elapsed() < REAPPLY_EVERY
        {
            return Ok(());
        }
        let mut objects = build::build(&BuildInput {
            cluster: self.cluster,
            default_image: &self.context.settings.default_image,
            secrets,
        })?;
        if self.context.settings.database_as_root {
            for statefulset in &mut objects.statefulsets {
                if let Some(pod) = statefulset.spec.template.spec.as_mut() {
                    pod.security_context = None;
                }
            }
        }
        let ns = self.namespace();
        let client = &self.context.client;
        apply_one(client, &ns, &objects.service_account).await?;
        apply_one(client, &ns, &objects.role).await?;
        apply_one(client, &ns, &objects.role_binding).await?;
        apply_one(client, &ns, &objects.secret).await?;
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

    async fn pods(&self) -> Result<HashMap<String, PodView>, ReconcileError> {
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), &self.namespace());
        let selector = format!("{}={}", names::LABEL_CLUSTER, self.name());
        let list = api
            .list(&ListParams::default().labels(&selector))
            .await
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

    /// Observe → engine → act → status. Returns whether the next round should come quickly.
    async fn round(
        &mut self,
        secrets: &ClusterSecrets,
        lease_store: Arc<KubeLeaseStore>,
    ) -> Result<bool, ReconcileError> {
        let name = self.name();
        let spec = &self.cluster.spec;
        let groups = resolve_groups(&name, spec);
        let instances: Vec<String> = groups.iter().flat_map(|g| g.instance_names()).collect();
        // The Lease first, then the pods and agents: what they show is at least as recent as
        // the Lease (a released Lease is never paired with a pod list from before the deletion).
        let lease = lease_store.get().await.map_err(ReconcileError::Lease)?;
        let now = Instant::now();
        let seen = match &self.runtime.lease_seen {
            Some((holder, version, at)) if *holder == lease.holder && *version == lease.version => {
                *at
            }
            _ => now,
        };
        self.runtime.lease_seen = Some((lease.holder.clone(), lease.version.clone(), seen));
        let pods = self.pods().await?;

        // Observe every agent at once.
        let polls = futures::future::join_all(instances.iter().map(|instance| {
            let pod = pods.get(instance).cloned();
            async move {
                let asked_at = Instant::now();
                let poll = match &pod {
                    Some(pod) => observe::poll(pod).await,
                    None => Poll::Gone("no pod".to_string()),
                };
                (instance.clone(), asked_at, poll)
            }
        }))
        .await;
        for (instance, asked_at, poll) in polls {
            match poll {
                Poll::Answered(status) => {
                    self.runtime.reports.insert(
                        instance.clone(),
                        Report {
                            asked_at: self.context.mono(asked_at),
                            status: *status,
                        },
                    );
                    self.runtime.seen_at.insert(instance, chrono::Utc::now());
                }
                Poll::Gone(_) => {
                    self.runtime.reports.remove(&instance);
                }
                Poll::Failed(error) => {
                    tracing::debug!(%instance, %error, "status request failed");
                }
            }
        }
        while let Ok(done) = self.runtime.completed_rx.try_recv() {
            self.completed(&done).await;
        }

        let mut input = observe::engine_input(
            self.context.mono(Instant::now()),
            &instances,
            &pods,
            &self.runtime.reports,
            LeaseView {
                holder: lease.holder.clone(),
                version: lease.version.clone(),
                unchanged_since: self.context.mono(seen),
                duration: lease.duration,
            },
            engine_spec(&name, spec),
            &self.runtime.remembered,
        );
        self.request_switchover(&mut input).await?;
        let mut decision = decide(&input);
        crate::engine::track_former_primaries(
            &mut self.runtime.remembered.former_primaries,
            &mut self.runtime.last_holder,
            &input,
        );
        self.runtime.remembered.memory = decision.memory.clone();

        // Bootstrap: nobody holds the Lease, nothing runs, the engine waits for a primary. The
        // operator names the first primary by taking the Lease for it; that agent initializes
        // (or reuses its data), the others clone from it.
        let nothing_runs = input
            .instances
            .iter()
            .all(|i| !matches!(i.role, ObservedRole::Primary | ObservedRole::Replica));
        if lease.holder.is_none()
            && decision.actions.is_empty()
            && decision.status.phase == engine::Phase::Bootstrapping
            && nothing_runs
        {
            let first = self
                .cluster
                .status
                .as_ref()
                .and_then(|s| s.current_primary.clone())
                .filter(|p| instances.contains(p))
                .or_else(|| {
                    groups
                        .iter()
                        .find(|g| g.failover_priority > 0 && g.replicas > 0)
                        .and_then(|g| g.instance_names().into_iter().next())
                });
            if let Some(first) = first.filter(|f| pods.contains_key(f)) {
                tracing::info!(instance = %first, "bootstrapping: taking the lease for the first primary");
                let note = format!("taking the lease for {first}, the first primary");
                self.context
                    .publish(self.cluster, EventType::Normal, "Bootstrapping", note)
                    .await;
                decision.actions.push(engine::Action::AcquireLease {
                    holder: first,
                    expected_version: lease.version.clone(),
                });
            }
        }

        self.track_failover(&decision, &lease, &pods);
        self.record_events(&decision.events).await;

        let actor = Actor {
            pods: &pods,
            token: &secrets.agent_token,
            superuser_password: &secrets.superuser_password,
            lease: lease_store.clone(),
            busy: self.runtime.busy.clone(),
            completed: self.runtime.completed_tx.clone(),
        };
        let mut action_error = None;
        for action in &decision.actions {
            tracing::info!(action = ?action, "action");
            match actor.execute(action).await {
                Ok(_) => {
                    if let engine::Action::SetSynchronousStandbys { primary, sync } = action {
                        self.runtime
                            .remembered
                            .applied_sync
                            .insert(primary.clone(), sync.clone());
                    }
                }
                Err(error) => {
                    action_error = Some(error);
                    break;
                }
            }
        }

        // Labels: `-rw` selects the serving holder only; `-ro` the replicas within the limit.
        let primary = decision.status.primary.clone();
        let primary_report = primary.as_ref().and_then(|p| self.runtime.reports.get(p));
        let mut replicas = BTreeSet::new();
        let mut readable = BTreeSet::new();
        for (instance, report) in &self.runtime.reports {
            if Some(instance) == primary.as_ref()
                || report.status.role != crate::agent::api::Role::Replica
            {
                continue;
            }
            replicas.insert(instance.clone());
            let lag = primary_report.and_then(|p| status::standby_lag(&p.status, &report.status).0);
            if lag.is_some_and(|l| l <= spec.monitoring.read_replica_max_lag_bytes) {
                readable.insert(instance.clone());
            }
        }
        let changes = act::desired_labels(&pods, primary.as_deref(), &replicas, &readable);
        if !changes.is_empty() {
            let api: Api<Pod> = Api::namespaced(self.context.client.clone(), &self.namespace());
            act::relabel(&api, &changes).await?;
            let gained = primary.as_ref().is_some_and(|p| {
                changes
                    .get(p)
                    .and_then(|c| c.get(names::LABEL_ROLE))
                    .is_some_and(|v| v.as_deref() == Some(names::ROLE_PRIMARY))
            });
            if gained
                && let (Some(p), Some(record)) = (&primary, self.runtime.last_failover.as_mut())
                && record.to == *p
                && record.service_switched_at.is_none()
            {
                record.service_switched_at = Some(now_time());
                let note = format!("{p} is selected by {}", names::rw_service(&name));
                self.context
                    .publish(self.cluster, EventType::Normal, "ServiceSwitched", note)
                    .await;
            }
        }

        let generation = self.cluster.metadata.generation.unwrap_or_default();
        let mut new_status = status::cluster_status(&StatusInput {
            generation,
            groups: &groups,
            reports: &self.runtime.reports,
            seen_at: &self.runtime.seen_at,
            decision: &decision,
            never_served: !self.runtime.ever_served,
            lag_alert_seconds: f64::from(spec.monitoring.lag_alert_seconds),
            last_failover: self.runtime.last_failover.clone(),
        });
        if let Some(previous) = &self.cluster.status {
            status::keep_transition_times(&mut new_status.conditions, &previous.conditions);
        }
        self.write_status(&new_status).await?;
        if let Some(error) = action_error {
            return Err(error.into());
        }
        Ok(matches!(
            decision.status.phase,
            engine::Phase::FailingOver
                | engine::Phase::SwitchingOver
                | engine::Phase::PrimaryUnavailable
                | engine::Phase::Bootstrapping
        ) || !decision.actions.is_empty())
    }

    /// A planned switchover, from the annotation `pgrs.dev/switchover-to` (removed once read)
    /// or `spec.switchover.targetInstance` (kept: the desired primary), becomes the engine's
    /// plan; the engine demotes the primary, hands the Lease over and promotes the target.
    async fn request_switchover(
        &mut self,
        input: &mut engine::EngineInput,
    ) -> Result<(), ReconcileError> {
        let annotated = self
            .cluster
            .annotations()
            .get(names::ANNOTATION_SWITCHOVER_TO)
            .cloned();
        let target = annotated.clone().or_else(|| {
            self.cluster
                .spec
                .switchover
                .as_ref()
                .map(|s| s.target_instance.clone())
        });
        if let Some(target) = target
            && input.lease.holder.as_deref() != Some(target.as_str())
            && input.memory.switchover.is_none()
        {
            match engine::plan_switchover(input, Some(&target)) {
                Ok(plan) => {
                    let note = format!("switchover from {} to {} requested", plan.from, plan.to);
                    input.memory.switchover = Some(plan);
                    self.context
                        .publish(self.cluster, EventType::Normal, "SwitchoverRequested", note)
                        .await;
                }
                Err(refusal) => {
                    let note = format!("switchover to {target} refused: {refusal}");
                    if self.runtime.last_events.get("SwitchoverRefused") != Some(&note) {
                        self.runtime
                            .last_events
                            .insert("SwitchoverRefused".to_string(), note.clone());
                        self.context
                            .publish(self.cluster, EventType::Warning, "SwitchoverRefused", note)
                            .await;
                    }
                }
            }
        }
        if annotated.is_some() {
            let api: Api<PgReplicaSet> =
                Api::namespaced(self.context.client.clone(), &self.namespace());
            let body = serde_json::json!({
                "metadata": { "annotations": { names::ANNOTATION_SWITCHOVER_TO: null } }
            });
            api.patch(&self.name(), &PatchParams::default(), &Patch::Merge(&body))
                .await
                .map_err(|source| ReconcileError::Apply {
                    kind: "PgReplicaSet",
                    name: self.name(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Fills `lastFailover` as the steps happen.
    fn track_failover(
        &mut self,
        decision: &engine::Decision,
        lease: &crate::coordination::LeaseRecord,
        pods: &HashMap<String, PodView>,
    ) {
        let runtime = &mut *self.runtime;
        // The holder's pod is being deleted (or gone): remembered until a failover consumes it
        // or the holder serves again from a pod that is not being deleted.
        // Deleted: stopping, gone, or recreated under the same name (another uid) before any
        // round saw it stopping.
        let holder_pod = runtime.last_holder.as_ref().map(|holder| pods.get(holder));
        let holder_pod_deleted = match holder_pod {
            Some(None) => true,
            Some(Some(pod)) => {
                let recreated = matches!(
                    (&runtime.holder_pod_uid, &pod.uid),
                    (Some((name, old)), Some(new)) if *name == pod.name && old != new
                );
                if !pod.deleting {
                    runtime.holder_pod_uid = pod.uid.clone().map(|uid| (pod.name.clone(), uid));
                }
                pod.deleting || recreated
            }
            None => false,
        };
        if holder_pod_deleted {
            runtime.primary_was_deleted = true;
        }
        match &decision.status.primary {
            Some(primary) => {
                runtime.ever_served = true;
                runtime.primary_lost_at = None;
                if !holder_pod_deleted {
                    runtime.primary_was_deleted = false;
                }
                if let Some(record) = runtime.last_failover.as_mut()
                    && record.to == *primary
                    && record.promoted_at.is_none()
                {
                    record.promoted_at = Some(now_time());
                }
            }
            None if runtime.ever_served && runtime.primary_lost_at.is_none() => {
                runtime.primary_lost_at = Some(now_time());
            }
            None => {}
        }
        if let Some(choice) = &decision.status.failover {
            let is_new = runtime
                .last_failover
                .as_ref()
                .is_none_or(|r| r.to != choice.to || r.promoted_at.is_some());
            if is_new {
                self.context
                    .metrics
                    .failovers
                    .fetch_add(1, Ordering::Relaxed);
                let reason = if decision.status.phase == engine::Phase::SwitchingOver {
                    "Switchover"
                } else if runtime.primary_was_deleted {
                    "PrimaryPodDeleted"
                } else if lease.holder.is_none() {
                    "PrimaryStopped"
                } else {
                    "PrimaryUnreachable"
                };
                runtime.primary_was_deleted = false;
                runtime.last_failover = Some(FailoverRecord {
                    reason: reason.to_string(),
                    detected_at: runtime.primary_lost_at.clone().or_else(|| Some(now_time())),
                    // The takeover needs the old holder's lease released or expired: from
                    // here on it no longer accepts writes.
                    fenced_at: Some(now_time()),
                    promoted_at: None,
                    service_switched_at: None,
                    from: choice.from.clone(),
                    to: choice.to.clone(),
                    lsn_gap_bytes: choice.lsn_gap_bytes,
                });
            }
        }
    }

    async fn completed(&mut self, done: &Completed) {
        match &done.result {
            Ok(message) => {
                if done.kind == "rejoin" {
                    self.runtime
                        .remembered
                        .former_primaries
                        .remove(&done.instance);
                }
                let note = format!(
                    "{} {}: {message} in {} ms",
                    done.kind,
                    done.instance,
                    done.took.as_millis()
                );
                tracing::info!(instance = %done.instance, kind = done.kind, took_ms = done.took.as_millis() as u64, "action completed");
                self.context
                    .publish(
                        self.cluster,
                        EventType::Normal,
                        action_reason(done.kind),
                        note,
                    )
                    .await;
            }
            Err(error) => {
                tracing::warn!(instance = %done.instance, kind = done.kind, %error, "action failed");
                let note = format!("{} {} failed: {error}", done.kind, done.instance);
                self.context
                    .publish(self.cluster, EventType::Warning, "ActionFailed", note)
                    .await;
            }
        }
    }

    /// Engine events as Kubernetes Events, without repeating the same message.
    async fn record_events(&mut self, events: &[engine::Event]) {
        for event in events {
            if event.reason == engine::EventReason::SwitchoverWaiting {
                continue;
            }
            let reason = format!("{:?}", event.reason);
            if self.runtime.last_events.get(&reason) == Some(&event.message) {
                continue;
            }
            self.runtime
                .last_events
                .insert(reason.clone(), event.message.clone());
            let type_ = match event.severity {
                Severity::Info => EventType::Normal,
                Severity::Warning | Severity::Critical => EventType::Warning,
            };
            tracing::info!(reason = %reason, message = %event.message, "event");
            self.context
                .publish(self.cluster, type_, &reason, event.message.clone())
                .await;
        }
    }

    async fn write_status(&self, status: &PgReplicaSetStatus) -> Result<(), ReconcileError> {
        if self.cluster.status.as_ref() == Some(status) {
            return Ok(());
        }
        let api: Api<PgReplicaSet> =
            Api::namespaced(self.context.client.clone(), &self.namespace());
        let body = serde_json::json!({
            "apiVersion": api::API_VERSION,
            "kind": api::KIND,
            "status": status,
        });
        api.patch_status(
            &self.name(),
            &PatchParams::apply(names::MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|source| ReconcileError::Status { source })?;
        Ok(())
    }
}

fn action_reason(kind: &str) -> &'static str {
    match kind {
        "promote" => "Promoted",
        "follow" => "Following",
        "rejoin" => "Rejoined",
        _ => "ActionCompleted",
    }
}

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
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
    api.patch(
        &name,
        &PatchParams::apply(names::MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
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
