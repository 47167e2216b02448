//! The router: one pool per endpoint, a background health loop, and the routing decisions.

mod client;
mod probing;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use rustls::ClientConfig;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use tracing::warn;

use crate::classify::{Classification, Route};
use crate::config::RouterConfig;
use crate::error::{BuildError, RouterError};
use crate::health::{HealthReport, PrimaryWalHistory};
use crate::lsn::{Lsn, WalToken};
use crate::metrics::{Metrics, MetricsSnapshot};

pub use client::RoutedClient;
use probing::health_loop;

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
