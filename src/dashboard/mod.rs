//! The replication status dashboard: one HTML page embedded in the binary (no external assets;
//! it refreshes itself from the JSON API every second) and `GET /api/clusters`
//! ([`api`], documented in `docs/dashboard.md`).
//!
//! Served by the local controller (its cluster) and by `pgrs operator` (every `PgReplicaSet` it
//! manages). A sampler task observes the source (the operator's: a watch cache, and the Leases
//! only while someone looks), keeps the history in memory
//! ([`ClusterMemory`]) and publishes the latest answer; the HTTP handlers only read it. The
//! mappings from the sources ([`local`], [`operator`]) and the history ([`history`]) are pure.

pub mod api;
pub mod history;
pub mod local;
pub mod operator;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use futures::StreamExt as _;
use kube::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::watcher::{self, watcher};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::api::PgReplicaSet;
use crate::dashboard::api::{API_VERSION, ClustersResponse, LagHistoryView, Source};
use crate::dashboard::history::{FailoverTracker, LagHistory, LastSeen};
use crate::view::local::LocalStatus;

/// The page, embedded at build time.
pub const PAGE: &str = include_str!("page.html");

/// How far back the lag chart goes.
pub const LAG_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Lag samples kept per cluster (one per second over the window at most).
pub const LAG_SAMPLES: usize = 300;
/// Failovers kept per cluster.
pub const FAILOVERS_KEPT: usize = 10;
/// How often the operator's sampler publishes (from its watch cache; the Leases are read only
/// while someone looks: [`DEMAND_WINDOW`]).
pub const OPERATOR_POLL: Duration = Duration::from_secs(2);
/// How long after the last `GET /api/clusters` the operator's sampler goes on reading the
/// Leases (the page asks every second).
pub const DEMAND_WINDOW: Duration = Duration::from_secs(10);
/// How long the first request after an idle time waits for a fresh answer.
const FRESH_WAIT: Duration = Duration::from_secs(1);
/// How often the local sampler looks for a new controller round.
const LOCAL_POLL: Duration = Duration::from_millis(200);

/// What the dashboard remembers about one cluster between observations.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterMemory {
    pub lag: LagHistory,
    pub failovers: FailoverTracker,
    pub last_seen: LastSeen,
}

impl Default for ClusterMemory {
    fn default() -> Self {
        ClusterMemory {
            lag: LagHistory::new(
                LAG_SAMPLES,
                chrono::Duration::from_std(LAG_WINDOW).unwrap_or(chrono::Duration::minutes(5)),
            )
            .with_min_spacing(chrono::Duration::milliseconds(
                (LAG_WINDOW.as_millis() / LAG_SAMPLES as u128) as i64,
            )),
            failovers: FailoverTracker::new(FAILOVERS_KEPT),
            last_seen: LastSeen::default(),
        }
    }
}

impl ClusterMemory {
    pub fn lag_history(&self) -> LagHistoryView {
        LagHistoryView {
            window_seconds: self.lag.window_seconds(),
            series: self.lag.series(),
        }
    }
}

fn empty_response(source: Source) -> ClustersResponse {
    ClustersResponse {
        api_version: API_VERSION.to_string(),
        source,
        generated_at: Utc::now(),
        clusters: Vec::new(),
        error: Some("no observation yet".to_string()),
    }
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

/// When `GET /api/clusters` was last asked: the operator's sampler reads the API server only
/// while someone looks ([`DEMAND_WINDOW`]).
#[derive(Debug, Default)]
pub struct Demand {
    last: std::sync::Mutex<Option<Instant>>,
    wake: Notify,
}

impl Demand {
    /// Records a request at `now`; true when the sampler was idle (it is woken).
    pub fn touch(&self, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let was_idle = !is_active(*last, now);
        *last = Some(now);
        if was_idle {
            self.wake.notify_one();
        }
        was_idle
    }

    /// Whether a request came within the last [`DEMAND_WINDOW`] before `now`.
    pub fn active(&self, now: Instant) -> bool {
        is_active(*self.last.lock().unwrap_or_else(|p| p.into_inner()), now)
    }
}

fn is_active(last: Option<Instant>, now: Instant) -> bool {
    last.is_some_and(|at| now.saturating_duration_since(at) < DEMAND_WINDOW)
}

#[derive(Clone)]
struct Served {
    latest: watch::Receiver<ClustersResponse>,
    demand: Arc<Demand>,
}

async fn clusters(State(served): State<Served>) -> impl IntoResponse {
    if served.demand.touch(Instant::now()) {
        // The sampler was idle (its Leases are old): wait a moment for a fresh answer.
        let mut latest = served.latest.clone();
        latest.mark_unchanged();
        let _ = tokio::time::timeout(FRESH_WAIT, latest.changed()).await;
    }
    let mut response = served.latest.borrow().clone();
    response.generated_at = Utc::now();
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(response))
}

/// `GET /` (the page) and `GET /api/clusters` (the latest published answer).
fn router(latest: watch::Receiver<ClustersResponse>, demand: Arc<Demand>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/clusters", get(clusters))
        .with_state(Served { latest, demand })
}

/// The local controller's dashboard: samples `status` (the controller's latest round) in the
/// background for as long as the router lives. Must be called inside a tokio runtime.
pub fn local_router<F>(status: F) -> Router
where
    F: Fn() -> Option<LocalStatus> + Send + Sync + 'static,
{
    let (publish, latest) = watch::channel(empty_response(Source::Local));
    tokio::spawn(async move {
        let mut memory = ClusterMemory::default();
        let mut last_round = None;
        // Ends with the last receiver: the router is gone.
        while !publish.is_closed() {
            if let Some(current) = status()
                && last_round != Some(current.updated_at)
            {
                last_round = Some(current.updated_at);
                local::observe(&mut memory, &current);
                let view = local::cluster_view(&memory, &current);
                publish.send_replace(ClustersResponse {
                    api_version: API_VERSION.to_string(),
                    source: Source::Local,
                    generated_at: Utc::now(),
                    clusters: vec![view],
                    error: None,
                });
            }
            tokio::time::sleep(LOCAL_POLL).await;
        }
    });
    router(latest, Arc::new(Demand::default()))
}

/// The operator's dashboard of the `PgReplicaSet`s in `namespace` (all when `None`), for as long
/// as the router lives. Must be called inside a tokio runtime.
///
/// The clusters come from a watch (a reflector cache: no LIST per refresh, one event per
/// change); every [`OPERATOR_POLL`] the sampler records them in memory (lag history) and
/// publishes the answer. The fencing Leases are read (a GET each: the operator's RBAC has no
/// `list` on Leases) only while someone asked for `/api/clusters` within [`DEMAND_WINDOW`]: an
/// operator nobody looks at makes no dashboard requests at all, whatever the number of clusters.
pub fn operator_router(client: kube::Client, namespace: Option<String>) -> Router {
    let (publish, latest) = watch::channel(empty_response(Source::Operator));
    let demand = Arc::new(Demand::default());
    let api: Api<PgReplicaSet> = match namespace.as_deref() {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = reflector::store();
    let events = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    tokio::spawn(sample_operator(
        client,
        store,
        events,
        publish,
        demand.clone(),
    ));
    router(latest, demand)
}

/// The operator's sampler: drives the watch, publishes every [`OPERATOR_POLL`] (and at once
/// when a viewer arrives); ends with the last receiver (the router is gone).
async fn sample_operator<S>(
    client: kube::Client,
    store: reflector::Store<PgReplicaSet>,
    events: S,
    publish: watch::Sender<ClustersResponse>,
    demand: Arc<Demand>,
) where
    S: futures::Stream<Item = Result<watcher::Event<PgReplicaSet>, watcher::Error>>,
{
    let mut events = std::pin::pin!(events);
    let mut memories: BTreeMap<String, ClusterMemory> = BTreeMap::new();
    let mut leases = BTreeMap::new();
    let mut synced = false;
    let mut watch_error: Option<String> = None;
    let mut tick = tokio::time::interval(OPERATOR_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !publish.is_closed() {
        tokio::select! {
            event = events.next() => {
                match event {
                    Some(Ok(watcher::Event::InitDone)) => {
                        synced = true;
                        watch_error = None;
                    }
                    Some(Ok(_)) => watch_error = None,
                    Some(Err(error)) => {
                        tracing::warn!(error = %error, "dashboard: the watch of the clusters failed (retried)");
                        watch_error = Some(format!("failed to watch the PgReplicaSets: {error}"));
                    }
                    None => return,
                }
                continue;
            }
            _ = tick.tick() => {}
            () = demand.wake.notified() => {}
        }
        if !synced {
            continue;
        }
        let clusters = store.state();
        let mut error = watch_error.clone();
        if demand.active(Instant::now()) {
            match operator::read_leases(&client, &clusters).await {
                Ok(read) => leases = read,
                Err(lease_error) => {
                    tracing::warn!(error = %lease_error, "dashboard: failed to read the Leases");
                    error = Some(lease_error.to_string());
                }
            }
        }
        let observed = operator::pair(clusters, &leases);
        let now = Utc::now();
        memories.retain(|key, _| observed.iter().any(|o| operator::key(&o.cluster) == *key));
        let views = observed
            .iter()
            .map(|o| {
                let memory = memories.entry(operator::key(&o.cluster)).or_default();
                operator::observe(memory, &o.cluster, now);
                operator::cluster_view(memory, o, now)
            })
            .collect();
        publish.send_replace(ClustersResponse {
            api_version: API_VERSION.to_string(),
            source: Source::Operator,
            generated_at: now,
            clusters: views,
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.contains("api/clusters"));
        for external in ["http://", "https://", "<link", "src=\"/", "@import"] {
            assert!(!PAGE.contains(external), "the page loads {external}");
        }
    }

    /// The example in `docs/dashboard.md` is a valid answer of this version, field for field.
    #[test]
    fn the_documented_example_matches_the_api_types() {
        let doc = include_str!("../../docs/dashboard.md");
        let example = doc
            .split("```json\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a ```json block in docs/dashboard.md");
        let parsed: ClustersResponse = serde_json::from_str(example).expect("the example parses");
        assert_eq!(parsed.api_version, API_VERSION);
        // Nothing in the example is unknown to the types (a renamed field would be dropped).
        let original: serde_json::Value = serde_json::from_str(example).expect("JSON");
        let round_trip = serde_json::to_value(&parsed).expect("serialize");
        assert_eq!(
            normalize(original),
            normalize(round_trip),
            "docs/dashboard.md and src/dashboard/api.rs disagree"
        );
    }

    /// Times as instants (the docs write milliseconds, serde nanoseconds).
    fn normalize(value: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, normalize(v))).collect())
            }
            Value::Array(items) => Value::Array(items.into_iter().map(normalize).collect()),
            Value::String(text) => match chrono::DateTime::parse_from_rfc3339(&text) {
                Ok(at) => Value::from(at.timestamp_millis()),
                Err(_) => Value::String(text),
            },
            Value::Number(n) if n.is_f64() && n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
                Value::from(n.as_f64().map_or(0, |f| f as i64))
            }
            other => other,
        }
    }

    #[test]
    fn the_default_memory_spaces_samples_over_the_window() {
        let mut memory = ClusterMemory::default();
        let start = chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        // Ten minutes of observations four times a second.
        for i in 0..2400 {
            memory.lag.record(
                start + chrono::Duration::milliseconds(i * 250),
                BTreeMap::new(),
            );
        }
        assert!(memory.lag.len() <= LAG_SAMPLES, "{}", memory.lag.len());
        assert!(memory.lag.len() >= LAG_SAMPLES - 2, "{}", memory.lag.len());
        assert_eq!(memory.lag_history().window_seconds, 300);
    }
}
