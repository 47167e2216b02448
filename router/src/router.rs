//! The router: one pool per endpoint, a background health loop, and the routing decisions.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
    TimeoutType,
};
use rustls::ClientConfig;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tracing::{info, warn};

use crate::classify::{Classification, Route};
use crate::config::RouterConfig;
use crate::error::{BuildError, RouterError};
use crate::health::{
    self, HealthReport, LagPolicy, NodeRole, PrimaryWalHistory, Probe, ProbeOutcome,
};
use crate::lsn::{Lsn, LsnParseError, WalToken};
use crate::metrics::{Metrics, MetricsSnapshot};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy)]
pub enum Consistency<'a> {
    /// Any eligible replica (bounded by `max_lag`).
    Eventual,
    /// Read-your-writes by stickiness: inside the key's window after [`Router::record_write`],
    /// the read goes to the primary.
    Key(&'a str),
    /// Read-your-writes by WAL position: a replica that has replayed the token, else the primary.
    Token(&'a WalToken),
}

/// Access mode of a transaction started with [`Router::transaction`].
#[derive(Debug, Clone, Copy)]
pub enum TxAccess<'a> {
    /// Runs on the primary.
    ReadWrite,
    /// `READ ONLY` transactions may run on a replica, with the given freshness.
    ReadOnly(Consistency<'a>),
}

/// A pooled connection chosen by the router. Dereferences to the deadpool client, so
/// `query`, `execute`, `prepare_cached` and `transaction` work as usual.
pub struct RoutedClient {
    client: Object,
    node: Arc<str>,
    index: usize,
    on_primary: bool,
}

impl RoutedClient {
    /// The endpoint this connection belongs to (`host:port`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether the connection goes to the node the router currently writes to.
    pub fn is_primary(&self) -> bool {
        self.on_primary
    }

    /// The primary's WAL insert position, to call right after a write committed on this
    /// connection: its text form is the read-your-writes token for [`Consistency::Token`].
    pub async fn wal_token(&self) -> Result<WalToken, RouterError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
            .await
            .map_err(|source| RouterError::Query {
                node: self.node.to_string(),
                source,
            })?;
        let text: String = row.try_get(0).map_err(|source| RouterError::Query {
            node: self.node.to_string(),
            source,
        })?;
        // The server always prints a valid pg_lsn; a parse failure would be a server bug.
        let lsn = Lsn::from_str(&text).unwrap_or(Lsn(u64::MAX));
        Ok(WalToken(lsn))
    }
}

impl Deref for RoutedClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl DerefMut for RoutedClient {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.client
    }
}

/// Routes reads to replicas and writes to the primary. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Node {
    name: Arc<str>,
    pg_config: tokio_postgres::Config,
    /// The connector of the probes (the pool has its own copy); `None`: plain.
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    pool: Pool,
    /// Set when a checkout failed to connect; routing skips the node until a probe answers.
    suspect: AtomicBool,
    /// Highest replay position seen (probes and causal waits); replay never moves backwards.
    replay_seen: AtomicU64,
    /// The health loop's own connection, outside the pool so a busy pool cannot starve probes.
    health_client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

struct RoutingState {
    writer: Option<usize>,
    readers: Vec<usize>,
    report: Arc<HealthReport>,
    history: PrimaryWalHistory,
    lag_alerting: bool,
    fallback_warned: bool,
    /// Completed probe rounds (the first one has no previous state to compare with).
    rounds: u64,
}

struct Inner {
    config: RouterConfig,
    names: Vec<String>,
    nodes: Vec<Node>,
    state: RwLock<RoutingState>,
    sticky_until: Mutex<HashMap<String, Instant>>,
    next_reader: AtomicUsize,
    metrics: Metrics,
    wake_health: Arc<Notify>,
    health_task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let task = self
            .health_task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     pg_last_wal_receive_lsn()::text, \
     pg_last_wal_replay_lsn()::text, \
     (SELECT timeline_id FROM pg_control_checkpoint())";

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("failed to connect")]
    Connect(#[source] tokio_postgres::Error),
    #[error("failed to run the probe query")]
    Query(#[source] tokio_postgres::Error),
    #[error("failed to read the probe result")]
    Lsn(#[source] LsnParseError),
    #[error("probe timed out after {0:?}")]
    Timeout(Duration),
}

impl Router {
    /// Build the pools, probe every node once, and start the health loop. Connections are
    /// opened lazily; an unreachable node does not fail the build.
    pub async fn connect(config: RouterConfig) -> Result<Router, BuildError> {
        if config.endpoints.is_empty() {
            return Err(BuildError::NoEndpoints);
        }
        let mut nodes = Vec::with_capacity(config.endpoints.len());
        for (index, endpoint) in config.endpoints.iter().enumerate() {
            let mut pg_config = tokio_postgres::Config::from_str(endpoint)
                .map_err(|source| BuildError::ConnectionString { index, source })?;
            if pg_config.get_connect_timeout().is_none() {
                pg_config.connect_timeout(config.connect_timeout);
            }
            if pg_config.get_application_name().is_none() {
                pg_config.application_name(&config.application_name);
            }
            let name = node_name(&pg_config, index);
            let manager_config = ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            };
            let tls = config
                .tls
                .as_ref()
                .map(|tls| tokio_postgres_rustls::MakeRustlsConnect::new(ClientConfig::clone(tls)));
            let manager = match &tls {
                Some(tls) => Manager::from_config(pg_config.clone(), tls.clone(), manager_config),
                None => Manager::from_config(pg_config.clone(), NoTls, manager_config),
            };
            let pool = Pool::builder(manager)
                .max_size(config.pool_size)
                .runtime(Runtime::Tokio1)
                .create_timeout(Some(config.connect_timeout))
                .build()
                .map_err(|source| BuildError::Pool {
                    node: name.clone(),
                    source,
                })?;
            nodes.push(Node {
                name: Arc::from(name.as_str()),
                pg_config,
                tls,
                pool,
                suspect: AtomicBool::new(false),
                replay_seen: AtomicU64::new(0),
                health_client: tokio::sync::Mutex::new(None),
            });
        }
        let names: Vec<String> = nodes.iter().map(|node| node.name.to_string()).collect();
        let inner = Arc::new(Inner {
            state: RwLock::new(RoutingState {
                writer: None,
                readers: Vec::new(),
                report: Arc::new(HealthReport::unknown(&names)),
                history: PrimaryWalHistory::default(),
                lag_alerting: false,
                fallback_warned: false,
                rounds: 0,
            }),
            names,
            nodes,
            config,
            sticky_until: Mutex::new(HashMap::new()),
            next_reader: AtomicUsize::new(0),
            metrics: Metrics::default(),
            wake_health: Arc::new(Notify::new()),
            health_task: Mutex::new(None),
        });
        inner.probe_round().await;
        let task = tokio::spawn(health_loop(
            Arc::downgrade(&inner),
            Arc::clone(&inner.wake_health),
            inner.config.health_interval,
        ));
        *inner
            .health_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(Router { inner })
    }

    /// A connection to the primary. Fails at once with [`RouterError::ReadOnly`] when no
    /// primary is reachable, without trying to connect.
    pub async fn write(&self) -> Result<RoutedClient, RouterError> {
        self.inner.write().await
    }

    /// A connection for reading with the given freshness.
    pub async fn read(&self, consistency: Consistency<'_>) -> Result<RoutedClient, RouterError> {
        self.inner.read(consistency).await
    }

    /// A connection on the node that must run a transaction of this access mode: the primary,
    /// unless the transaction is declared READ ONLY. Start it with
    /// `client.build_transaction().read_only(true).start()` for [`TxAccess::ReadOnly`].
    pub async fn transaction(&self, access: TxAccess<'_>) -> Result<RoutedClient, RouterError> {
        match access {
            TxAccess::ReadWrite => self.write().await,
            TxAccess::ReadOnly(consistency) => self.read(consistency).await,
        }
    }

    /// Start (or extend) `key`'s stickiness window: its [`Consistency::Key`] reads go to the
    /// primary for `sticky_window`.
    pub fn record_write(&self, key: &str) {
        let now = Instant::now();
        let until = now + self.inner.config.sticky_window;
        let mut sticky = self
            .inner
            .sticky_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if sticky.len() >= 4096 {
            sticky.retain(|_, deadline| *deadline > now);
        }
        sticky.insert(key.to_owned(), until);
    }

    /// Run a plain statement where the classifier sends it, returning its rows. A replica that
    /// answers SQLSTATE 25006 (read-only transaction) gets the statement retried once on the
    /// primary.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        consistency: Consistency<'_>,
    ) -> Result<Vec<Row>, RouterError> {
        let classification = self.inner.config.classifier.classify(sql);
        let client = self.routed(classification, consistency).await?;
        let result = run_query(&client, sql, params).await;
        self.inner.note_broken_connection(&client, &result);
        match result {
            Err(RouterError::Query { source, .. }) if retry_on_primary(&client, &source) => {
                Metrics::bump(&self.inner.metrics.read_only_retries);
                warn!(node = %client.node, sql, "replica refused a statement as read-only; retrying on the primary");
                let primary = self.write().await?;
                run_query(&primary, sql, params).await
            }
            other => other,
        }
    }

    /// Like [`Router::query`] for statements whose row count matters.
    pub async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        consistency: Consistency<'_>,
    ) -> Result<u64, RouterError> {
        let classification = self.inner.config.classifier.classify(sql);
        let client = self.routed(classification, consistency).await?;
        let result = run_execute(&client, sql, params).await;
        self.inner.note_broken_connection(&client, &result);
        match result {
            Err(RouterError::Query { source, .. }) if retry_on_primary(&client, &source) => {
                Metrics::bump(&self.inner.metrics.read_only_retries);
                warn!(node = %client.node, sql, "replica refused a statement as read-only; retrying on the primary");
                let primary = self.write().await?;
                run_execute(&primary, sql, params).await
            }
            other => other,
        }
    }

    /// The classification [`Router::query`] would use for `sql`.
    pub fn classify(&self, sql: &str) -> Classification {
        self.inner.config.classifier.classify(sql)
    }

    /// The latest health report (as of the last probe round).
    pub fn health(&self) -> Arc<HealthReport> {
        Arc::clone(&self.inner.read_state().report)
    }

    /// Probe every node now instead of waiting for the next round.
    pub async fn refresh_health(&self) -> Arc<HealthReport> {
        self.inner.probe_round().await;
        self.health()
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    /// How long a client should wait before retrying a write refused in read-only mode.
    pub fn retry_after(&self) -> Duration {
        self.inner.retry_after()
    }

    async fn routed(
        &self,
        classification: Classification,
        consistency: Consistency<'_>,
    ) -> Result<RoutedClient, RouterError> {
        match classification.route {
            Route::Primary => self.write().await,
            Route::Replica => self.read(consistency).await,
        }
    }
}

fn retry_on_primary(client: &RoutedClient, error: &tokio_postgres::Error) -> bool {
    !client.on_primary && error.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION)
}

async fn run_query(
    client: &RoutedClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, RouterError> {
    let result = match client.prepare_cached(sql).await {
        Ok(statement) => client.query(&statement, params).await,
        Err(error) => Err(error),
    };
    result.map_err(|source| RouterError::Query {
        node: client.node.to_string(),
        source,
    })
}

async fn run_execute(
    client: &RoutedClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, RouterError> {
    let result = match client.prepare_cached(sql).await {
        Ok(statement) => client.execute(&statement, params).await,
        Err(error) => Err(error),
    };
    result.map_err(|source| RouterError::Query {
        node: client.node.to_string(),
        source,
    })
}

impl Inner {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, RoutingState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn retry_after(&self) -> Duration {
        self.config.health_interval.max(Duration::from_secs(1))
    }

    fn current_writer(&self) -> Option<usize> {
        self.read_state()
            .writer
            .filter(|&index| !self.nodes[index].suspect.load(Ordering::Relaxed))
    }

    /// Round-robin over eligible replicas, optionally only those that replayed `token`.
    fn pick_reader(&self, token: Option<&WalToken>) -> Option<usize> {
        let state = self.read_state();
        let usable = |index: &&usize| {
            let node = &self.nodes[**index];
            !node.suspect.load(Ordering::Relaxed)
                && token.is_none_or(|t| node.replay_seen.load(Ordering::Relaxed) >= (t.0).0)
        };
        let count = state.readers.iter().filter(usable).count();
        if count == 0 {
            return None;
        }
        let nth = self.next_reader.fetch_add(1, Ordering::Relaxed) % count;
        state.readers.iter().filter(usable).nth(nth).copied()
    }

    async fn checkout(&self, index: usize, on_primary: bool) -> Result<RoutedClient, RouterError> {
        let node = &self.nodes[index];
        match node.pool.get().await {
            Ok(client) => Ok(RoutedClient {
                client,
                node: Arc::clone(&node.name),
                index,
                on_primary,
            }),
            Err(source) => {
                if matches!(
                    source,
                    PoolError::Backend(_) | PoolError::Timeout(TimeoutType::Create)
                ) {
                    self.mark_suspect(index, &source);
                }
                Err(RouterError::Pool {
                    node: node.name.to_string(),
                    source,
                })
            }
        }
    }

    /// A statement that failed because its connection died means the node may be gone: skip it
    /// until it answers a probe, and probe now.
    fn note_broken_connection<T>(&self, client: &RoutedClient, result: &Result<T, RouterError>) {
        if let Err(RouterError::Query { source, .. }) = result
            && source.is_closed()
        {
            self.mark_suspect(client.index, source);
        }
    }

    fn mark_suspect(&self, index: usize, error: &dyn std::error::Error) {
        let node = &self.nodes[index];
        if !node.suspect.swap(true, Ordering::Relaxed) {
            Metrics::bump(&self.metrics.node_failures);
            warn!(node = %node.name, error = %error_chain(error), "connection failed; node skipped until it answers a probe");
        }
        self.wake_health.notify_one();
    }

    async fn write(&self) -> Result<RoutedClient, RouterError> {
        let read_only = || {
            Metrics::bump(&self.metrics.writes_rejected_read_only);
            RouterError::ReadOnly {
                retry_after: self.retry_after(),
            }
        };
        let Some(index) = self.current_writer() else {
            return Err(read_only());
        };
        match self.checkout(index, true).await {
            Ok(client) => {
                Metrics::bump(&self.metrics.writes);
                Ok(client)
            }
            Err(_) if self.nodes[index].suspect.load(Ordering::Relaxed) => Err(read_only()),
            Err(error) => Err(error),
        }
    }

    async fn read(&self, consistency: Consistency<'_>) -> Result<RoutedClient, RouterError> {
        match consistency {
            Consistency::Eventual => self.read_eventual().await,
            Consistency::Key(key) => {
                // In read-only mode a sticky key can only be served by a replica (best effort).
                if self.is_sticky(key)
                    && let Some(index) = self.current_writer()
                {
                    Metrics::bump(&self.metrics.reads_sticky);
                    if let Ok(client) = self.checkout(index, true).await {
                        Metrics::bump(&self.metrics.reads_primary);
                        return Ok(client);
                    }
                }
                self.read_eventual().await
            }
            Consistency::Token(token) => self.read_causal(token).await,
        }
    }

    fn is_sticky(&self, key: &str) -> bool {
        let sticky = self
            .sticky_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        sticky
            .get(key)
            .is_some_and(|deadline| *deadline > Instant::now())
    }

    async fn read_eventual(&self) -> Result<RoutedClient, RouterError> {
        // A second replica is tried when the first fails to connect (it is then marked down).
        for _ in 0..2 {
            let Some(index) = self.pick_reader(None) else {
                break;
            };
            if let Ok(client) = self.checkout(index, false).await {
                Metrics::bump(&self.metrics.reads_replica);
                return Ok(client);
            }
        }
        let Some(index) = self.current_writer() else {
            return Err(RouterError::NoNodeAvailable);
        };
        Metrics::bump(&self.metrics.reads_fallback_no_replica);
        self.warn_fallback_once(index);
        let client = self
            .checkout(index, true)
            .await
            .map_err(|_| RouterError::NoNodeAvailable)?;
        Metrics::bump(&self.metrics.reads_primary);
        Ok(client)
    }

    fn warn_fallback_once(&self, primary: usize) {
        let first = {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            !std::mem::replace(&mut state.fallback_warned, true)
        };
        if first {
            warn!(primary = %self.nodes[primary].name, "no replica eligible for reads; reads fall back to the primary");
        }
    }

    async fn read_causal(&self, token: &WalToken) -> Result<RoutedClient, RouterError> {
        if let Some(index) = self.pick_reader(Some(token))
            && let Ok(client) = self.checkout(index, false).await
        {
            Metrics::bump(&self.metrics.reads_causal_replica);
            Metrics::bump(&self.metrics.reads_replica);
            return Ok(client);
        }
        if !self.config.causal_wait.is_zero()
            && let Some(client) = self.wait_for_replay(token).await
        {
            Metrics::bump(&self.metrics.reads_causal_replica);
            Metrics::bump(&self.metrics.reads_replica);
            return Ok(client);
        }
        let Some(index) = self.current_writer() else {
            return Err(RouterError::CausalReadUnavailable { token: *token });
        };
        Metrics::bump(&self.metrics.reads_causal_primary);
        let client = self
            .checkout(index, true)
            .await
            .map_err(|_| RouterError::CausalReadUnavailable { token: *token })?;
        Metrics::bump(&self.metrics.reads_primary);
        Ok(client)
    }

    /// Poll one replica's replay position until it reaches `token` or `causal_wait` passes.
    async fn wait_for_replay(&self, token: &WalToken) -> Option<RoutedClient> {
        let index = self.pick_reader(None)?;
        let client = self.checkout(index, false).await.ok()?;
        let deadline = Instant::now() + self.config.causal_wait;
        loop {
            let row = client
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
                .ok()?;
            let replay = row
                .get::<_, Option<String>>(0)
                .and_then(|text| Lsn::from_str(&text).ok())?;
            self.nodes[index]
                .replay_seen
                .fetch_max(replay.0, Ordering::Relaxed);
            if replay >= token.0 {
                return Some(client);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn probe_round(&self) {
        let timeout = self.config.probe_timeout;
        let outcomes: Vec<ProbeOutcome> =
            futures::future::join_all(self.nodes.iter().map(|node| probe(node, timeout))).await;
        let policy = LagPolicy {
            max_lag: self.config.max_lag,
            max_lag_bytes: self.config.max_lag_bytes,
            alert_threshold: self.config.lag_alert_threshold,
        };
        for (node, outcome) in self.nodes.iter().zip(&outcomes) {
            if let ProbeOutcome::Answered(probe) = outcome {
                node.suspect.store(false, Ordering::Relaxed);
                if let Some(replay) = probe.replay_lsn {
                    node.replay_seen.fetch_max(replay.0, Ordering::Relaxed);
                }
            }
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let evaluation = health::evaluate(
            &self.names,
            &outcomes,
            &mut state.history,
            &policy,
            Instant::now(),
        );
        self.log_transitions(&state, &evaluation);
        let report = evaluation.report;
        if report.lag_alert && !state.lag_alerting {
            Metrics::bump(&self.metrics.lag_alert_episodes);
        }
        state.lag_alerting = report.lag_alert;
        if !evaluation.readers.is_empty() || evaluation.writer.is_none() {
            state.fallback_warned = false;
        }
        state.writer = evaluation.writer;
        state.readers = evaluation.readers;
        state.rounds += 1;
        state.report = Arc::new(report);
    }

    fn log_transitions(&self, before: &RoutingState, after: &health::Evaluation) {
        let report = &after.report;
        for (old, new) in before.report.nodes.iter().zip(&report.nodes) {
            if old.reachable && !new.reachable {
                warn!(node = %new.name, error = new.error.as_deref().unwrap_or(""), "node unreachable");
            } else if !old.reachable && new.reachable {
                info!(node = %new.name, role = ?new.role, "node reachable");
            }
            if old.role == NodeRole::Replica && new.role == NodeRole::Primary {
                info!(node = %new.name, "replica promoted: now writable");
            }
        }
        if before.rounds == 0 {
            match after.writer {
                Some(index) => {
                    info!(primary = %self.nodes[index].name, mode = ?report.mode, "router ready")
                }
                None => {
                    Metrics::bump(&self.metrics.read_only_mode_entered);
                    warn!(mode = ?report.mode, "no primary reachable at start: read-only mode, writes fail fast");
                }
            }
        }
        match (before.writer, after.writer) {
            _ if before.rounds == 0 => {}
            (Some(_), None) => {
                Metrics::bump(&self.metrics.read_only_mode_entered);
                warn!(mode = ?report.mode, "no primary reachable: read-only mode, writes fail fast");
            }
            (None, Some(index)) => {
                info!(primary = %self.nodes[index].name, "primary reachable: leaving read-only mode");
            }
            (Some(old), Some(new)) if old != new => {
                info!(from = %self.nodes[old].name, to = %self.nodes[new].name, "write target changed");
            }
            _ => {}
        }
        if report.lag_alert && !before.lag_alerting {
            warn!(
                lag_seconds = report.lag_seconds,
                threshold_seconds = self.config.lag_alert_threshold.as_secs_f64(),
                "replica lag above the alert threshold"
            );
        } else if !report.lag_alert && before.lag_alerting {
            info!(
                lag_seconds = report.lag_seconds,
                "replica lag back under the alert threshold"
            );
        }
    }
}

async fn health_loop(inner: Weak<Inner>, wake: Arc<Notify>, interval: Duration) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = wake.notified() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.probe_round().await;
    }
}

async fn probe(node: &Node, timeout: Duration) -> ProbeOutcome {
    let mut slot = node.health_client.lock().await;
    let result = match tokio::time::timeout(timeout, probe_once(node, &mut slot)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    };
    match result {
        Ok(probe) => ProbeOutcome::Answered(probe),
        Err(error) => {
            *slot = None;
            ProbeOutcome::Unreachable {
                error: error_chain(&error),
            }
        }
    }
}

async fn probe_once(
    node: &Node,
    slot: &mut Option<tokio_postgres::Client>,
) -> Result<Probe, ProbeError> {
    let client = match slot.take() {
        Some(client) if !client.is_closed() => slot.insert(client),
        _ => {
            let client = match &node.tls {
                Some(tls) => {
                    let (client, connection) = node
                        .pg_config
                        .connect(tls.clone())
                        .await
                        .map_err(ProbeError::Connect)?;
                    tokio::spawn(connection);
                    client
                }
                None => {
                    let (client, connection) = node
                        .pg_config
                        .connect(NoTls)
                        .await
                        .map_err(ProbeError::Connect)?;
                    tokio::spawn(connection);
                    client
                }
            };
            slot.insert(client)
        }
    };
    let row = client
        .query_one(PROBE_SQL, &[])
        .await
        .map_err(ProbeError::Query)?;
    let lsn = |column: usize| -> Result<Option<Lsn>, ProbeError> {
        let text: Option<String> = row.try_get(column).map_err(ProbeError::Query)?;
        text.map(|text| Lsn::from_str(&text))
            .transpose()
            .map_err(ProbeError::Lsn)
    };
    let timeline: Option<i32> = row.try_get(4).map_err(ProbeError::Query)?;
    Ok(Probe {
        in_recovery: row.try_get(0).map_err(ProbeError::Query)?,
        current_lsn: lsn(1)?,
        receive_lsn: lsn(2)?,
        replay_lsn: lsn(3)?,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()),
    })
}

fn node_name(config: &tokio_postgres::Config, index: usize) -> String {
    let host = config.get_hosts().first().map(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => name.clone(),
        tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
    });
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match host {
        Some(host) => format!("{host}:{port}"),
        None => format!("endpoint-{index}"),
    }
}

/// `error: cause: cause` on one line, for logs and the health report.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
