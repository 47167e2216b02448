//! Server-side steps of a promotion and a reload: the recovery state, `pg_promote`,
//! `CHECKPOINT`, and the configuration load time that shows a reload took effect.

use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("failed to read the recovery state: {source}")]
    RecoveryState {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to call pg_promote: {source}")]
    Promote {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to run CHECKPOINT: {source}")]
    Checkpoint {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to read the configuration load time: {source}")]
    ConfLoadTime {
        #[source]
        source: tokio_postgres::Error,
    },
}

/// `pg_is_in_recovery()`: `true` on a standby.
pub async fn in_recovery(client: &Client) -> Result<bool, PromoteError> {
    client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map(|row| row.get::<_, bool>(0))
        .map_err(|source| PromoteError::RecoveryState { source })
}

/// Signals the promotion without waiting for it (`pg_promote(false)`): the caller watches
/// [`in_recovery`] itself, more often than `pg_promote`'s own wait polls. `false` when the
/// startup process could not be signalled.
pub async fn promote_no_wait(client: &Client) -> Result<bool, PromoteError> {
    client
        .query_one("SELECT pg_promote(false)", &[])
        .await
        .map(|row| row.get::<_, bool>(0))
        .map_err(|source| PromoteError::Promote { source })
}

/// Runs a `CHECKPOINT` (after a promotion, the control file shows the new timeline only then).
pub async fn checkpoint(client: &Client) -> Result<(), PromoteError> {
    client
        .batch_execute("CHECKPOINT")
        .await
        .map_err(|source| PromoteError::Checkpoint { source })
}

/// `pg_conf_load_time()` as text: when the server last (re)read its configuration files.
pub async fn conf_load_time(client: &Client) -> Result<String, PromoteError> {
    client
        .query_one("SELECT pg_conf_load_time()::text", &[])
        .await
        .map(|row| row.get::<_, String>(0))
        .map_err(|source| PromoteError::ConfLoadTime { source })
}
