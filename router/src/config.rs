//! Router configuration.

use std::time::Duration;

use crate::classify::Classifier;

/// How a [`crate::Router`] finds its nodes and decides where reads may go.
///
/// `endpoints` are connection strings (URL or `key=value` form). They may name nodes directly
/// or the operator's `<cluster>-rw` / `<cluster>-ro` Services. Roles are not taken from the
/// configuration: every endpoint is probed with `pg_is_in_recovery()`, so a promoted replica
/// becomes the write target without a restart.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub endpoints: Vec<String>,
    /// Connections per endpoint pool.
    pub pool_size: usize,
    /// TCP connect timeout for pooled and health connections (unless the string sets one).
    pub connect_timeout: Duration,
    /// How often the background loop probes every node.
    pub health_interval: Duration,
    /// Bound on one probe (connect + query); a slower node counts as unreachable.
    pub probe_timeout: Duration,
    /// Replicas further behind than this leave the read set (`None`: no limit).
    pub max_lag: Option<Duration>,
    /// Replicas further behind than this many WAL bytes leave the read set.
    pub max_lag_bytes: Option<u64>,
    /// Above this lag the router warns once per episode and reports `lag_alert`.
    pub lag_alert_threshold: Duration,
    /// Read-your-writes strength (a): how long a key's reads go to the primary after its write.
    pub sticky_window: Duration,
    /// Read-your-writes strength (b): how long a read with a WAL token may wait for a replica to
    /// replay up to it before going to the primary instead.
    pub causal_wait: Duration,
    /// Decides the route of plain statements in [`crate::Router::query`] and friends.
    pub classifier: Classifier,
    /// `application_name` of the router's connections (unless the string sets one).
    pub application_name: String,
    /// TLS of every connection (pools and probes), e.g. a rustls configuration trusting only
    /// the cluster CA (pgrs clusters refuse plain connections from the network). The
    /// connection string's `sslmode` decides: `require` insists on TLS, `prefer` (the default)
    /// tries it; the server name checked is the string's `host` (dial an IP with `hostaddr`
    /// while checking the name in `host`) — together `sslmode=verify-full` semantics.
    /// `None`: plain connections only.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl RouterConfig {
    /// A configuration with the defaults below for the given endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(2),
            health_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(2),
            max_lag: Some(Duration::from_secs(30)),
            max_lag_bytes: None,
            lag_alert_threshold: Duration::from_secs(10),
            sticky_window: Duration::from_secs(2),
            causal_wait: Duration::from_millis(50),
            classifier: Classifier::default(),
            application_name: "pgrs-router".to_owned(),
            tls: None,
        }
    }
}
