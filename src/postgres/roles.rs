//! The replication role: created or updated with a SCRAM-SHA-256 verifier computed here, so the
//! password itself never travels in SQL text (server logs, `pg_stat_activity`).

use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error("failed to look up role {role}: {source}")]
    Lookup {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to create or alter replication role {role}: {source}")]
    Write {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// What [`ensure_replication_role`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleChange {
    Created,
    /// The role existed: attributes and password set again.
    Updated,
}

/// Creates `role` (or alters it when it exists) with `REPLICATION LOGIN` and `password`, sent
/// as a SCRAM verifier. Needs a superuser session on a primary.
pub async fn ensure_replication_role(
    client: &Client,
    role: &str,
    password: &str,
) -> Result<RoleChange, RoleError> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let identifier = postgres_protocol::escape::escape_identifier(role);
    let literal = postgres_protocol::escape::escape_literal(&verifier);
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .map_err(|source| RoleError::Lookup {
            role: role.to_string(),
            source,
        })?
        .is_some();
    let (statement, change) = if exists {
        (
            format!("ALTER ROLE {identifier} WITH REPLICATION LOGIN PASSWORD {literal}"),
            RoleChange::Updated,
        )
    } else {
        (
            format!("CREATE ROLE {identifier} WITH REPLICATION LOGIN PASSWORD {literal}"),
            RoleChange::Created,
        )
    };
    // Committed locally: on a sync primary whose standbys are not started yet (a stopped sync
    // cluster started again, an upgraded primary) waiting for one would hold the agent's start,
    // and with it the start of those standbys. The next primary start writes it again anyway.
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = local; {statement}; COMMIT"
        ))
        .await
        .map_err(|source| RoleError::Write {
            role: role.to_string(),
            source,
        })?;
    tracing::debug!(role, ?change, "replication role in place");
    Ok(change)
}
