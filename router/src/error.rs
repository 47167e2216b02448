//! Errors of the router.

use std::time::Duration;

use crate::lsn::WalToken;

/// Errors returned by [`crate::Router`].
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// No reachable primary: the router is in read-only mode and refuses writes without
    /// trying to connect. Retry after `retry_after`.
    #[error("failed to route a write: no primary is reachable (read-only mode)")]
    ReadOnly { retry_after: Duration },
    /// Neither a replica nor the primary can serve a read.
    #[error("failed to route a read: no node is reachable")]
    NoNodeAvailable,
    /// No replica has replayed up to the token within the wait and no primary is reachable.
    #[error(
        "failed to route a causal read: no replica reached {token} and no primary is reachable"
    )]
    CausalReadUnavailable { token: WalToken },
    /// Checking a connection out of a node's pool failed.
    #[error("failed to get a connection to {node}")]
    Pool {
        node: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    /// The statement itself failed.
    #[error("failed to run a statement on {node}")]
    Query {
        node: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Errors building a [`crate::Router`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("failed to build a router: no endpoint configured")]
    NoEndpoints,
    #[error("failed to parse connection string #{index}")]
    ConnectionString {
        index: usize,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to build the connection pool for {node}")]
    Pool {
        node: String,
        #[source]
        source: deadpool_postgres::BuildError,
    },
}
