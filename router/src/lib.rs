//! pgrs-router: read/write splitting for applications on a pgrs cluster.
//!
//! - [`Router`] keeps one connection pool per endpoint and probes every endpoint in the
//!   background (`pg_is_in_recovery()`, WAL positions), so it follows a promotion without a
//!   restart, takes lagging or unreachable replicas out of the read set, and enters a read-only
//!   mode (writes fail fast with [`RouterError::ReadOnly`]) while no primary is reachable.
//! - Explicit routing: [`Router::read`], [`Router::write`], [`Router::transaction`]; automatic
//!   routing of plain statements: [`Router::query`] / [`Router::execute`] with the
//!   [`Classifier`].
//! - Read-your-writes: a per-key stickiness window ([`Consistency::Key`]) or a WAL-position
//!   token ([`Consistency::Token`], [`RoutedClient::wal_token`]).
//! - Health: [`Router::health`] is the `/health/db` body; [`HealthReport::http_status`] its
//!   status code.

pub mod classify;
pub mod config;
pub mod error;
pub mod health;
pub mod lsn;
pub mod metrics;
mod router;

pub use classify::{Classification, Classifier, Reason, Route};
pub use config::RouterConfig;
pub use error::{BuildError, RouterError};
pub use health::{HealthReport, Need};
pub use lsn::{Lsn, WalToken};
pub use metrics::MetricsSnapshot;
pub use router::{Consistency, RoutedClient, Router, TxAccess};
