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
use crate::operator::fence::{self, FenceRequest};
use crate::operator::observe::{self, PodView, Poll, Remembered, Report};
use crate::operator::rollout;
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
    /// Per-cluster series (instances, lease, failovers, reconcile durations): `crate::metrics`.
    pub clusters: crate::metrics::operator::OperatorMetrics,
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
        text.push_str(&self.clusters.render());
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
    /// Instances fenced by the annotation in the last round (for Fenced/Unfenced Events).
    fenced: BTreeSet<String>,
    /// Standbys whose lag was above `monitoring.lagAlertSeconds` in the last round.
    lag_high: BTreeSet<String>,
    /// `status.currentPrimary` when this runtime was created: the failover's `from` when the
    /// engine has not seen a primary yet (a new operator leader whose first round finds the
    /// Lease already released).
    previous_primary: Option<String>,
    /// Parameter rollout and scale-down bookkeeping (`rollout` module).
    rollout: RolloutMemory,
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
            fenced: BTreeSet::new(),
            lag_high: BTreeSet::new(),
            previous_primary: previous.and_then(|s| s.current_primary.clone()),
            rollout: RolloutMemory::new(previous),
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
        let namespace = cluster.namespace().unwrap_or_default();
        context
            .metrics
            .clusters
            .forget(&namespace, &cluster.name_any());
        return Ok(Requeue::await_change());
    }
    let started = Instant::now();
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
    context.metrics.clusters.observe_reconcile(
        &cluster.namespace().unwrap_or_default(),
        &cluster.name_any(),
        started.elapsed(),
        result.as_ref().err().map(ReconcileError::category),
    );
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
        let retained = self.retained_replicas();
        if let Some((applied, at)) = self.runtime.applied
            && applied == generation
            && at.elapsed() < REAPPLY_EVERY
            && self.runtime.rollout.applied_replicas.as_ref() == Some(&retained)
        {
            return Ok(());
        }
        let mut objects = build::build(&BuildInput {
            cluster: self.cluster,
            default_image: &self.context.settings.default_image,
            secrets,
        })?;
        // A scale-down keeps the primary's pod until a switchover moved the role away.
        for statefulset in &mut objects.statefulsets {
            let name = statefulset.metadata.name.clone().unwrap_or_default();
            if let Some(count) = retained.get(&name) {
                statefulset.spec.replicas = Some(i32::try_from(*count).unwrap_or(i32::MAX));
            }
        }
        self.runtime.rollout.applied_replicas = Some(retained);
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
        // The Lease first, then the pods and agents: what they show is at least as recent as
        // the Lease (a released Lease is never paired with a pod list from before the deletion).
        let lease = lease_store.get().await.map_err(ReconcileError::Lease)?;
        // A scale-down keeps the instances up to the primary until it moved (`rollout`).
        let spec_groups = groups;
        let groups = rollout::retained_groups(&spec_groups, lease.holder.as_deref());
        let instances: Vec<String> = groups.iter().flat_map(|g| g.instance_names()).collect();
        self.forget_removed(&instances);
        let now = Instant::now();
        let seen = match &self.runtime.lease_seen {
            Some((holder, version, at)) if *holder == lease.holder && *version == lease.version => {
                *at
            }
            _ => now,
        };
        self.runtime.lease_seen = Some((lease.holder.clone(), lease.version.clone(), seen));
        self.context.metrics.clusters.observe_lease(
            &self.namespace(),
            &name,
            lease.holder.as_deref(),
            &lease.version,
            now.saturating_duration_since(seen),
            lease.duration,
        );
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
        let fence_request = FenceRequest::parse(
            self.cluster
                .annotations()
                .get(fence::ANNOTATION_FENCE)
                .map(String::as_str),
            &instances,
        );
        fence::restrict_input(&mut input, &fence_request);
        self.request_switchover(&mut input).await?;
        let rollout_outcome = self
            .rollout(&mut input, &spec_groups, &groups, &pods, secrets)
            .await;
        let mut decision = decide(&input);
        fence::restrict_decision(&mut decision, &input, &fence_request);
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
            // A fenced instance is never made the first primary either.
            if let Some(first) =
                first.filter(|f| pods.contains_key(f) && !fence_request.is_fenced(f))
            {
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
        self.fence_events(&fence_request).await;

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
        let changes = act::desired_labels(
            &pods,
            primary.as_deref(),
            &replicas,
            &readable,
            &fence_request.fenced,
        );
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
            fenced: &fence_request.fenced,
        });
        new_status
            .conditions
            .push(rollout_outcome.condition(generation));
        if let Some(previous) = &self.cluster.status {
            status::keep_transition_times(&mut new_status.conditions, &previous.conditions);
        }
        self.lag_events(&new_status, f64::from(spec.monitoring.lag_alert_seconds))
            .await;
        self.context.metrics.clusters.observe_status(
            &self.namespace(),
            &name,
            &new_status,
            crate::metrics::operator::wal_receivers(
                self.runtime.reports.iter().map(|(n, r)| (n, &r.status)),
            ),
        );
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
        ) || !decision.actions.is_empty()
            || rollout_outcome.busy)
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
                    from: choice
                        .from
                        .clone()
                        .or_else(|| runtime.previous_primary.clone())
                        .filter(|from| *from != choice.to),
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

    /// Events when instances are fenced or unfenced by the annotation, or it names no instance.
    async fn fence_events(&mut self, request: &FenceRequest) {
        let (fenced, unfenced) = fence::changes(&self.runtime.fenced, &request.fenced);
        self.runtime.fenced = request.fenced.clone();
        for instance in fenced {
            tracing::warn!(%instance, "fencing on request");
            let note = format!(
                "{instance} fenced on request ({}): postgres stopped, removed from every Service, excluded from failover",
                fence::ANNOTATION_FENCE
            );
            self.context
                .publish(self.cluster, EventType::Warning, "Fenced", note)
                .await;
        }
        for instance in unfenced {
            tracing::info!(%instance, "unfenced on request");
            let note = format!("{instance} unfenced: it rejoins as a replica");
            self.context
                .publish(self.cluster, EventType::Normal, "Unfenced", note)
                .await;
        }
        if !request.unknown.is_empty() {
            let note = format!(
                "{} names no instance of this cluster: {}",
                fence::ANNOTATION_FENCE,
                request.unknown.join(", ")
            );
            if self.runtime.last_events.get("FenceUnknownInstance") != Some(&note) {
                self.runtime
                    .last_events
                    .insert("FenceUnknownInstance".to_string(), note.clone());
                self.context
                    .publish(
                        self.cluster,
                        EventType::Warning,
                        "FenceUnknownInstance",
                        note,
                    )
                    .await;
            }
        }
    }

    /// `LagHigh` when a standby's replay lag goes above `monitoring.lagAlertSeconds`,
    /// `LagRecovered` when it comes back under it (or stops being a standby).
    async fn lag_events(&mut self, new_status: &PgReplicaSetStatus, threshold: f64) {
        let lagging = status::lagging(new_status, threshold);
        let now: BTreeSet<String> = lagging.keys().cloned().collect();
        let (started, ended) = fence::changes(&self.runtime.lag_high, &now);
        self.runtime.lag_high = now;
        for instance in started {
            let seconds = lagging.get(&instance).copied().unwrap_or_default();
            tracing::warn!(%instance, lag_seconds = seconds, threshold, "replication lag above the alert threshold");
            let note = format!(
                "{instance} replays {seconds:.1}s behind the primary (monitoring.lagAlertSeconds: {threshold})"
            );
            self.context
                .publish(self.cluster, EventType::Warning, "LagHigh", note)
                .await;
        }
        for instance in ended {
            tracing::info!(%instance, threshold, "replication lag back under the alert threshold");
            let note = format!("{instance} is no longer more than {threshold}s behind the primary");
            self.context
                .publish(self.cluster, EventType::Normal, "LagRecovered", note)
                .await;
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

// ---- parameter rollout and scaling (planned by `rollout`, carried out here) -------------------

/// How long an agent may take to write and reload the parameters.
const PARAMETERS_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent may take to restart postgres (fast stop, start, recovery).
const RESTART_TIMEOUT: Duration = Duration::from_secs(180);
/// A restarted instance not back after this long gets a Warning (and is no longer waited for).
const RESTART_STALLED: Duration = Duration::from_secs(600);

/// What the controller remembers between rounds for rollouts and scaling.
struct RolloutMemory {
    /// The instance restarted for its parameters (and when), until it is back.
    restarting: Option<String>,
    restart_started: Option<Instant>,
    /// The parameters digest last announced as applied everywhere.
    applied_hash: Option<String>,
    /// Replica counts per StatefulSet as last applied.
    applied_replicas: Option<std::collections::BTreeMap<String, u32>>,
    /// The instances of the previous round, to notice removals.
    known: Vec<String>,
    /// Removed instances whose replication slot is still to drop on the primary.
    slots_to_drop: BTreeSet<String>,
}

impl RolloutMemory {
    fn new(previous: Option<&PgReplicaSetStatus>) -> Self {
        RolloutMemory {
            restarting: None,
            restart_started: None,
            applied_hash: None,
            applied_replicas: None,
            known: previous
                .map(|s| s.instances.iter().map(|i| i.name.clone()).collect())
                .unwrap_or_default(),
            slots_to_drop: BTreeSet::new(),
        }
    }
}

/// The rollout's share of a round: the `ParametersApplied` condition and whether to come back
/// quickly.
struct RolloutOutcome {
    condition: (bool, &'static str, String),
    busy: bool,
}

impl RolloutOutcome {
    fn condition(
        &self,
        generation: i64,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        let (ok, reason, message) = &self.condition;
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: api::condition::PARAMETERS_APPLIED.to_string(),
            status: if *ok { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            observed_generation: Some(generation),
            last_transition_time: now_time(),
        }
    }
}

impl Reconciler<'_> {
    /// Replicas per StatefulSet: the spec's, or up to the primary's ordinal during a
    /// scale-down (the Lease holder as last seen, else the status).
    fn retained_replicas(&self) -> std::collections::BTreeMap<String, u32> {
        let holder = match &self.runtime.lease_seen {
            Some((holder, _, _)) => holder.clone(),
            None => self
                .cluster
                .status
                .as_ref()
                .and_then(|s| s.current_primary.clone()),
        };
        let groups = resolve_groups(&self.name(), &self.cluster.spec);
        rollout::retained_groups(&groups, holder.as_deref())
            .into_iter()
            .map(|g| (g.statefulset, g.replicas))
            .collect()
    }

    /// Forgets instances that left the cluster (their reports, so they leave the status) and
    /// queues their replication slots for dropping.
    fn forget_removed(&mut self, instances: &[String]) {
        let memory = &mut self.runtime.rollout;
        let removed = rollout::removed(&memory.known, instances);
        if !removed.is_empty() {
            tracing::info!(?removed, "instances removed from the cluster");
        }
        memory.slots_to_drop.extend(removed);
        memory.slots_to_drop.retain(|n| !instances.contains(n));
        memory.known = instances.to_vec();
        self.runtime.reports.retain(|n, _| instances.contains(n));
        self.runtime.seen_at.retain(|n, _| instances.contains(n));
    }

    /// Scale-down switchover, slot cleanup and the parameter rollout for this round. Runs
    /// before the engine decides, so that a switchover it plans is carried out this round.
    async fn rollout(
        &mut self,
        input: &mut engine::EngineInput,
        spec_groups: &[crate::api::ResolvedGroup],
        groups: &[crate::api::ResolvedGroup],
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
    ) -> RolloutOutcome {
        let desired = crate::agent::config::parameters_hash(&self.cluster.spec.parameters);
        let names: Vec<String> = groups.iter().flat_map(|g| g.instance_names()).collect();
        let views: Vec<rollout::InstanceView> = names
            .iter()
            .filter(|name| input.instance(name).is_some_and(|i| input.is_fresh(i)))
            .filter_map(|name| {
                let status = &self.runtime.reports.get(name)?.status;
                Some(rollout::InstanceView {
                    name: name.clone(),
                    role: status.role,
                    streaming: status
                        .wal_receiver
                        .as_ref()
                        .is_some_and(|w| w.status == "streaming"),
                    parameters_hash: status.parameters_hash.clone(),
                    pending_restart: status.pending_restart.clone(),
                })
            })
            .collect();
        let primary = input.lease.holder.clone().filter(|holder| {
            views
                .iter()
                .any(|v| v.name == *holder && v.role == crate::agent::api::Role::Primary)
        });

        // Scale-down: the primary must not be among the removed instances.
        let extra = rollout::retained_extra(spec_groups, groups);
        let mut scaling = false;
        if let Some(p) = &primary
            && extra.contains(p)
        {
            scaling = true;
            if input.memory.switchover.is_none() {
                let candidates = rollout::scale_down_candidates(spec_groups, &views);
                let why = format!("{p} is removed by the scale-down");
                self.switchover_for(input, &candidates, "ScaleDownSwitchover", why)
                    .await;
            }
        }
        if let Some(p) = &primary {
            self.drop_removed_slots(p, pods, secrets).await;
        }

        // A restart that never came back stops blocking the rollout's bookkeeping (nothing else
        // restarts while that instance does not stream: the plan waits for a healthy cluster).
        if let (Some(instance), Some(started)) = (
            self.runtime.rollout.restarting.clone(),
            self.runtime.rollout.restart_started,
        ) && started.elapsed() > RESTART_STALLED
        {
            self.runtime.rollout.restarting = None;
            let note = format!(
                "{instance} is not back {} s after its restart",
                started.elapsed().as_secs()
            );
            tracing::warn!(%instance, "restart stalled");
            self.context
                .publish(self.cluster, EventType::Warning, "RestartStalled", note)
                .await;
        }
        let restarting = self.runtime.rollout.restarting.clone();
        let lowered = primary
            .as_ref()
            .and_then(|p| self.runtime.reports.get(p))
            .and_then(|r| r.status.pending_restart_running.as_ref())
            .map(|running| rollout::lowered_minimums(running, &self.cluster.spec.parameters))
            .unwrap_or_default();
        let plan = rollout::plan(&rollout::RolloutInput {
            desired_hash: &desired,
            primary: primary.as_deref(),
            instances: &views,
            desired_instances: names.len(),
            restarting: restarting.as_deref(),
            role_change_in_progress: input.memory.switchover.is_some() || scaling,
            primary_first: !lowered.is_empty(),
        });
        self.push_parameters(&plan.push, pods, secrets).await;
        if let Some(done) = &plan.restart_finished {
            self.runtime.rollout.restarting = None;
            tracing::info!(instance = %done, "restarted for its parameters");
            let note = format!("{done} is back after its restart, with nothing pending");
            self.context
                .publish(self.cluster, EventType::Normal, "InstanceRestarted", note)
                .await;
        }
        let mut busy = false;
        match &plan.step {
            rollout::RolloutStep::Restart { instance, primary } => {
                busy = true;
                self.restart_instance(instance, *primary, pods, secrets)
                    .await;
            }
            rollout::RolloutStep::Switchover { from, candidates } => {
                if input.memory.switchover.is_none() {
                    let why = format!("{from} needs a restart for its parameters");
                    self.switchover_for(input, candidates, "SwitchoverForRestart", why)
                        .await;
                }
            }
            rollout::RolloutStep::Applied => {
                if self.runtime.rollout.applied_hash.as_deref() != Some(desired.as_str()) {
                    self.runtime.rollout.applied_hash = Some(desired.clone());
                    let note = format!("every instance runs the parameters {desired}");
                    self.context
                        .publish(self.cluster, EventType::Normal, "ParametersApplied", note)
                        .await;
                }
            }
            rollout::RolloutStep::Wait { .. } => {}
        }
        RolloutOutcome {
            condition: rollout::condition(&plan.step),
            busy,
        }
    }

    fn agent(
        &self,
        instance: &str,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
        timeout: Duration,
    ) -> Option<crate::agent::client::AgentClient> {
        let url = pods.get(instance).and_then(PodView::agent_url)?;
        crate::agent::client::AgentClient::new(url, Some(secrets.agent_token.clone()))
            .ok()
            .map(|c| c.with_action_timeout(timeout))
    }

    /// Sends the spec's parameters to every agent in `instances` at once.
    async fn push_parameters(
        &mut self,
        instances: &[String],
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
    ) {
        let request = crate::agent::api::ParametersRequest {
            parameters: self.cluster.spec.parameters.clone(),
        };
        let clients: Vec<_> = instances
            .iter()
            .filter_map(|i| Some((i.clone(), self.agent(i, pods, secrets, PARAMETERS_TIMEOUT)?)))
            .collect();
        let results = futures::future::join_all(clients.into_iter().map(|(instance, client)| {
            let request = &request;
            async move { (instance, client.parameters(request).await) }
        }))
        .await;
        for (instance, result) in results {
            let (type_, reason, note) = match result {
                Ok(response) => {
                    tracing::info!(%instance, message = %response.message, "parameters sent");
                    (
                        EventType::Normal,
                        "ParametersReloaded",
                        format!("{instance}: {}", response.message),
                    )
                }
                Err(error) => {
                    tracing::warn!(%instance, %error, "failed to send the parameters");
                    (
                        EventType::Warning,
                        "ParametersFailed",
                        format!("failed to send the parameters to {instance}: {error}"),
                    )
                }
            };
            let key = format!("{reason}/{instance}");
            if self.runtime.last_events.get(&key) != Some(&note) {
                self.runtime.last_events.insert(key, note.clone());
                self.context
                    .publish(self.cluster, type_, reason, note)
                    .await;
            }
        }
    }

    /// Restarts one instance's postgres (the round waits: one restart at a time anyway).
    async fn restart_instance(
        &mut self,
        instance: &str,
        primary: bool,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
    ) {
        let pending = self
            .runtime
            .reports
            .get(instance)
            .and_then(|r| r.status.pending_restart.clone())
            .unwrap_or_default()
            .join(", ");
        let role = if primary {
            "the primary, in place"
        } else {
            "a standby"
        };
        tracing::info!(%instance, %pending, primary, "restarting for parameters");
        let note = format!("restarting {instance} ({role}) for {pending}");
        self.context
            .publish(self.cluster, EventType::Normal, "RestartingInstance", note)
            .await;
        self.runtime.rollout.restarting = Some(instance.to_string());
        self.runtime.rollout.restart_started = Some(Instant::now());
        let result = match self.agent(instance, pods, secrets, RESTART_TIMEOUT) {
            Some(client) => client.restart().await.map_err(|e| e.to_string()),
            None => Err("its pod has no IP".to_string()),
        };
        if let Err(error) = result {
            tracing::warn!(%instance, %error, "restart failed");
            self.runtime.rollout.restarting = None;
            let note = format!("restart of {instance} failed: {error}");
            self.context
                .publish(self.cluster, EventType::Warning, "RestartFailed", note)
                .await;
        }
    }

    /// Plans a switchover to the first candidate the engine accepts; an Event says why.
    async fn switchover_for(
        &mut self,
        input: &mut engine::EngineInput,
        candidates: &[String],
        reason: &'static str,
        why: String,
    ) {
        let mut refusals = Vec::new();
        for candidate in candidates {
            match engine::plan_switchover(input, Some(candidate)) {
                Ok(plan) => {
                    let note = format!("{why}: switching over from {} to {}", plan.from, plan.to);
                    tracing::info!(from = %plan.from, to = %plan.to, reason, "switchover planned");
                    input.memory.switchover = Some(plan);
                    self.context
                        .publish(self.cluster, EventType::Normal, reason, note)
                        .await;
                    return;
                }
                Err(refusal) => refusals.push(format!("{candidate}: {refusal}")),
            }
        }
        let note = if refusals.is_empty() {
            format!("{why}, but no standby is ready to take over")
        } else {
            format!(
                "{why}, but no standby can take over ({})",
                refusals.join("; ")
            )
        };
        let key = format!("{reason}Waiting");
        if self.runtime.last_events.get(&key) != Some(&note) {
            self.runtime.last_events.insert(key.clone(), note.clone());
            self.context
                .publish(self.cluster, EventType::Warning, &key, note)
                .await;
        }
    }

    /// Drops the replication slots of removed instances on the primary once their pods are
    /// gone (an active slot is left for the next round).
    async fn drop_removed_slots(
        &mut self,
        primary: &str,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
    ) {
        let gone: Vec<String> = self
            .runtime
            .rollout
            .slots_to_drop
            .iter()
            .filter(|n| !pods.contains_key(*n))
            .cloned()
            .collect();
        let Some(host) = pods.get(primary).and_then(|p| p.ip.clone()) else {
            return;
        };
        if gone.is_empty() {
            return;
        }
        let slots: Vec<String> = gone
            .iter()
            .map(|n| crate::agent::config::slot_name_for(n))
            .collect();
        match drop_slots(&host, &secrets.superuser_password, &slots).await {
            Ok(dropped) => {
                for instance in &gone {
                    self.runtime.rollout.slots_to_drop.remove(instance);
                }
                if !dropped.is_empty() {
                    tracing::info!(
                        ?dropped,
                        "dropped the replication slots of removed instances"
                    );
                    let note = format!(
                        "dropped replication slots {} on {primary}",
                        dropped.join(", ")
                    );
                    self.context
                        .publish(
                            self.cluster,
                            EventType::Normal,
                            "ReplicationSlotDropped",
                            note,
                        )
                        .await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "failed to drop the replication slots of removed instances");
            }
        }
    }
}

/// Drops the inactive physical slots among `slots` on the primary at `host`; returns those
/// dropped. An active slot (its standby still streams) fails the call, to be retried.
async fn drop_slots(host: &str, password: &str, slots: &[String]) -> Result<Vec<String>, String> {
    let target = crate::postgres::probe::ConnectTarget {
        host: host.to_string(),
        port: names::POSTGRES_PORT,
        user: "postgres".to_string(),
        password: password.to_string(),
        dbname: "postgres".to_string(),
    };
    let client = crate::postgres::probe::connect(&target, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())?;
    let active: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1) AND active",
            &[&slots],
        )
        .await
        .map_err(|e| e.to_string())?
        .get(0);
    if active > 0 {
        return Err(format!("{active} of the slots are still active"));
    }
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots \
             WHERE slot_name = ANY($1) AND slot_type = 'physical' AND NOT active \
             AND pg_drop_replication_slot(slot_name) IS NOT NULL",
            &[&slots],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
