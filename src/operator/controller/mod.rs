//! The reconcile loop. `reconcile` only sets up the span and the metrics; the work is a
//! pipeline ([`pipeline`]): validate (pure) → secrets → apply (server-side apply, one field
//! manager) → the round of the shared control loop with Kubernetes as its platform ([`round`],
//! [`platform`]: observe each agent at its pod IP → engine → persist the control state in a
//! ConfigMap → act) → labels and status (server-side apply on the status subresource). The
//! failover record is a pure function ([`failover`]); Events for fencing and lag in [`events`];
//! parameter rollouts and scaling in [`rollout`]. An invalid spec gets a clear status and waits
//! for a change; other errors requeue with a growing backoff.

mod events;
mod failover;
mod pipeline;
mod platform;
mod rollout;
mod round;
mod superuser;
mod tls;
mod upgrade;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt as _};
use tokio::sync::Mutex;
use tracing::Instrument as _;

use crate::api::{PgReplicaSet, PgReplicaSetStatus};
use crate::control::{ActError, ControlLoop, MonotonicClock, RoundError};
use crate::operator::build::{BuildError, names};

use failover::FailoverTracker;
use pipeline::Reconciler;
use rollout::RolloutMemory;

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
    #[error(
        "failed to read the Secret {name}: it is missing on a bootstrapped cluster; it is not generated again (the database holds its password): recreate it with the current password"
    )]
    SecretMissing { name: String },
    #[error("failed to read or create the lease: {0}")]
    Lease(#[source] crate::coordination::LeaseError),
    #[error("failed to write the status: {source}")]
    Status {
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Act(#[from] ActError),
    #[error(transparent)]
    Relabel(#[from] crate::operator::labels::RelabelError),
    #[error(transparent)]
    Round(#[from] RoundError),
    #[error("failed to read the control state from ConfigMap {name}: {message}")]
    ControlState { name: String, message: String },
    #[error("failed to finish {what} within its bound")]
    Timeout { what: String },
    #[error("failed to set up TLS ({what}): {source}")]
    Tls {
        what: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("refusing the TLS Secret {name} of spec.tls.serverSecret: {why}")]
    TlsSecretInvalid { name: String, why: String },
}

impl ReconcileError {
    /// Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Build(_) => "BuildFailed",
            ReconcileError::Apply { .. } => "ApplyFailed",
            ReconcileError::Read { .. } => "ReadFailed",
            ReconcileError::SecretKey { .. } => "SecretInvalid",
            ReconcileError::SecretMissing { .. } => "SecretMissing",
            ReconcileError::Lease(_) => "LeaseFailed",
            ReconcileError::Status { .. } => "StatusWriteFailed",
            ReconcileError::Act(error) => error.category(),
            ReconcileError::Relabel(_) => "RelabelFailed",
            ReconcileError::Round(error) => error.category(),
            ReconcileError::ControlState { .. } => "ControlStateInvalid",
            ReconcileError::Timeout { .. } => "Timeout",
            ReconcileError::Tls { .. } => "TlsFailed",
            ReconcileError::TlsSecretInvalid { .. } => "TlsSecretInvalid",
        }
    }
}

/// Operator settings (from the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Image of the database pods when `spec.image` is unset, for the default major.
    pub default_image: String,
    /// Images of the database pods per major when `spec.image` is unset
    /// (`--postgres-image MAJOR=IMAGE`); see `build::default_image_for`.
    pub postgres_images: std::collections::BTreeMap<u32, String>,
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
    /// The shared control loop: reports, engine memory (persisted in the control ConfigMap),
    /// background actions.
    control: ControlLoop,
    applied: Option<(i64, Instant)>,
    failover: FailoverTracker,
    /// Last note per Event reason, to publish a repeated one once.
    last_events: HashMap<String, String>,
    errors_in_a_row: u32,
    /// Instances fenced by the annotation in the last round (for Fenced/Unfenced Events).
    fenced: BTreeSet<String>,
    /// Standbys whose lag was above `monitoring.lagAlertSeconds` in the last round.
    lag_high: BTreeSet<String>,
    /// Parameter rollout and scale-down bookkeeping (`rollout` module).
    rollout: RolloutMemory,
    /// Major-version upgrade bookkeeping (`upgrade` module).
    upgrade: upgrade::UpgradeMemory,
    /// The agent token as last read, with the previous one during a rotation.
    agent_token: Option<crate::agent::rotation::Rotation>,
    /// The certificates as last checked, and the clients built on them (`tls` module).
    tls: tls::TlsMemory,
}

impl ClusterRuntime {
    fn new(previous: Option<&PgReplicaSetStatus>, state: crate::control::ControlState) -> Self {
        ClusterRuntime {
            control: ControlLoop::new(Arc::new(MonotonicClock::new()), state),
            applied: None,
            failover: FailoverTracker::new(previous),
            last_events: HashMap::new(),
            errors_in_a_row: 0,
            fenced: BTreeSet::new(),
            lag_high: BTreeSet::new(),
            rollout: RolloutMemory::new(previous),
            upgrade: upgrade::UpgradeMemory::new(previous),
            agent_token: None,
            tls: tls::TlsMemory::default(),
        }
    }
}

/// Shared state of the controller and the web server.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Metrics,
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
            clusters: Mutex::new(HashMap::new()),
            ready: std::sync::atomic::AtomicBool::new(false),
        })
    }

    async fn publish(&self, cluster: &PgReplicaSet, type_: EventType, reason: &str, note: String) {
        let event = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: "Reconcile".to_string(),
            secondary: None,
        };
        // Bounded like every request of a round; a lost Event does not fail the reconcile.
        let published = pipeline::bounded(
            || format!("publishing the Event {reason}"),
            self.recorder.publish(&event, &cluster.object_ref(&())),
        )
        .await;
        match published {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, reason, "failed to publish an event"),
            Err(error) => tracing::warn!(%error, reason, "failed to publish an event"),
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

/// The cluster's runtime; on first sight (a new operator, or a new leader) its control state
/// is read back from the control ConfigMap, so that the recorded quorum and the last primary
/// position survive operator restarts.
async fn runtime_of(
    context: &Context,
    cluster: &PgReplicaSet,
) -> Result<Arc<Mutex<ClusterRuntime>>, ReconcileError> {
    if let Some(runtime) = context.clusters.lock().await.get(&key(cluster)) {
        return Ok(runtime.clone());
    }
    let state = platform::load_state(&context.client, cluster).await?;
    Ok(context
        .clusters
        .lock()
        .await
        .entry(key(cluster))
        .or_insert_with(|| {
            Arc::new(Mutex::new(ClusterRuntime::new(
                cluster.status.as_ref(),
                state,
            )))
        })
        .clone())
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
    let runtime = runtime_of(&context, &cluster).await?;
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

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}
