//! The replication status dashboard: one HTML page embedded in the binary (no external assets;
//! it refreshes itself from the JSON API every second) and `GET /api/clusters`
//! ([`api`], documented in `docs/dashboard.md`).
//!
//! Served by the local controller (its cluster) and by `pgrs operator` (every `PgReplicaSet` it
//! manages). A sampler task observes the source, keeps the history in memory
//! ([`ClusterMemory`]) and publishes the latest answer; the HTTP handlers only read it. The
//! mappings from the sources ([`local`], [`operator`]) and the history ([`history`]) are pure.

pub mod api;
pub mod history;
pub mod local;
pub mod operator;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use tokio::sync::watch;

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
/// How often the operator's sampler reads the API server.
pub const OPERATOR_POLL: Duration = Duration::from_secs(2);
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

async fn clusters(State(latest): State<watch::Receiver<ClustersResponse>>) -> impl IntoResponse {
    let mut response = latest.borrow().clone();
    response.generated_at = Utc::now();
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(response))
}

/// `GET /` (the page) and `GET /api/clusters` (the latest published answer).
pub fn router(latest: watch::Receiver<ClustersResponse>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/clusters", get(clusters))
        .with_state(latest)
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
    router(latest)
}

/// The operator's dashboard: lists the `PgReplicaSet`s in `namespace` (all when `None`) and
/// their Leases every [`OPERATOR_POLL`], for as long as the router lives. Must be called inside
/// a tokio runtime.
pub fn operator_router(client: kube::Client, namespace: Option<String>) -> Router {
    let (publish, latest) = watch::channel(empty_response(Source::Operator));
    tokio::spawn(async move {
        let mut memories: BTreeMap<String, ClusterMemory> = BTreeMap::new();
        while !publish.is_closed() {
            let listed = operator::list_clusters(&client, namespace.as_deref()).await;
            let now = Utc::now();
            match listed {
                Ok(observed) => {
                    // Forget clusters that are gone.
                    memories.retain(|key, _| {
                        observed.iter().any(|o| operator::key(&o.cluster) == *key)
                    });
                    let clusters = observed
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
                        clusters,
                        error: None,
                    });
                }
                Err(error) => {
                    tracing::warn!(error = %error, "dashboard: failed to read the clusters");
                    // Keep showing the last answer, marked stale.
                    publish.send_modify(|response| response.error = Some(error.to_string()));
                }
            }
            tokio::time::sleep(OPERATOR_POLL).await;
        }
    });
    router(latest)
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
