//! The replication role and the application's owner role and database: roles created or
//! updated with a SCRAM-SHA-256 verifier computed here, so the password itself never travels in
//! SQL text (server logs, `pg_stat_activity`).

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
    #[error("failed to create or alter the application role {role}: {source}")]
    AppRole {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to change the password of role {role}: {source}")]
    Password {
        role: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to look up the application database {database}: {source}")]
    DatabaseLookup {
        database: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to create the application database {database}: {source}")]
    CreateDatabase {
        database: String,
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

/// The functions `pg_rewind` runs on its source server, granted to the replication role so
/// that a former primary is rewound without a superuser login to the new primary (PostgreSQL's
/// documented minimum for a non-superuser `pg_rewind` source).
pub const REWIND_FUNCTIONS: [&str; 4] = [
    "pg_catalog.pg_ls_dir(text, boolean, boolean)",
    "pg_catalog.pg_stat_file(text, boolean)",
    "pg_catalog.pg_read_binary_file(text)",
    "pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean)",
];

/// The grants of the replication role besides `REPLICATION`: [`REWIND_FUNCTIONS`], and
/// `pg_checkpoint` where it exists (PostgreSQL 15 and later): a rejoining former primary runs
/// a CHECKPOINT on the new primary before `pg_rewind`. One `DO` block, idempotent; a function
/// a major does not have is skipped rather than failing the primary's start.
pub fn replication_grants(identifier: &str) -> String {
    let functions: Vec<String> = REWIND_FUNCTIONS
        .iter()
        .map(|f| postgres_protocol::escape::escape_literal(f))
        .collect();
    let role = postgres_protocol::escape::escape_literal(identifier);
    format!(
        "DO $pgrs$ DECLARE f text; BEGIN \
         FOREACH f IN ARRAY ARRAY[{functions}] LOOP \
         IF to_regprocedure(f) IS NOT NULL THEN \
         EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, {role}); END IF; END LOOP; \
         IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pg_checkpoint') THEN \
         EXECUTE format('GRANT pg_checkpoint TO %s', {role}); END IF; END $pgrs$",
        functions = functions.join(", ")
    )
}

/// Creates `role` (or alters it when it exists) with `REPLICATION LOGIN` and `password`, sent
/// as a SCRAM verifier, and grants it what a `pg_rewind` source needs
/// ([`replication_grants`]). Needs a superuser session on a primary.
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
    let grants = replication_grants(&identifier);
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = local; {statement}; {grants}; COMMIT"
        ))
        .await
        .map_err(|source| RoleError::Write {
            role: role.to_string(),
            source,
        })?;
    tracing::debug!(role, ?change, "replication role in place");
    Ok(change)
}

/// Sets the password of the existing `role` (a rotation), sent as a SCRAM verifier and
/// committed locally (as [`ensure_replication_role`]). Needs a superuser session on a primary.
pub async fn set_password(client: &Client, role: &str, password: &str) -> Result<(), RoleError> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let identifier = postgres_protocol::escape::escape_identifier(role);
    let literal = postgres_protocol::escape::escape_literal(&verifier);
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = local; ALTER ROLE {identifier} WITH PASSWORD {literal}; COMMIT"
        ))
        .await
        .map_err(|source| RoleError::Password {
            role: role.to_string(),
            source,
        })?;
    tracing::info!(role, "role password changed");
    Ok(())
}

/// What [`ensure_app_access`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppChange {
    pub role: RoleChange,
    /// The database did not exist and was created.
    pub database_created: bool,
}

/// Creates the application's `owner` role (`LOGIN`, `password` sent as a SCRAM verifier; an
/// existing role gets `LOGIN` and the password again) and the database `database` it owns,
/// unless it exists (its owner is then left as it is). Needs a superuser session on a primary.
pub async fn ensure_app_access(
    client: &Client,
    owner: &str,
    database: &str,
    password: &str,
) -> Result<AppChange, RoleError> {
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let role_identifier = postgres_protocol::escape::escape_identifier(owner);
    let literal = postgres_protocol::escape::escape_literal(&verifier);
    let role_exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&owner])
        .await
        .map_err(|source| RoleError::Lookup {
            role: owner.to_string(),
            source,
        })?
        .is_some();
    let (statement, role) = if role_exists {
        (
            format!("ALTER ROLE {role_identifier} WITH LOGIN PASSWORD {literal}"),
            RoleChange::Updated,
        )
    } else {
        (
            format!("CREATE ROLE {role_identifier} WITH LOGIN PASSWORD {literal}"),
            RoleChange::Created,
        )
    };
    // Committed locally, as the replication role (see there).
    client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL synchronous_commit = local; {statement}; COMMIT"
        ))
        .await
        .map_err(|source| RoleError::AppRole {
            role: owner.to_string(),
            source,
        })?;
    let database_exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await
        .map_err(|source| RoleError::DatabaseLookup {
            database: database.to_string(),
            source,
        })?
        .is_some();
    if !database_exists {
        create_database(client, database, &role_identifier).await?;
    }
    let change = AppChange {
        role,
        database_created: !database_exists,
    };
    tracing::info!(
        owner,
        database,
        ?change,
        "application role and database in place"
    );
    Ok(change)
}

/// `CREATE DATABASE` cannot run in a transaction block: the session's `synchronous_commit` is
/// set around it, and reset even when it fails (the session may serve status probes after).
async fn create_database(
    client: &Client,
    database: &str,
    owner_identifier: &str,
) -> Result<(), RoleError> {
    let identifier = postgres_protocol::escape::escape_identifier(database);
    let error = |source| RoleError::CreateDatabase {
        database: database.to_string(),
        source,
    };
    client
        .batch_execute("SET synchronous_commit = local")
        .await
        .map_err(error)?;
    let created = client
        .batch_execute(&format!(
            "CREATE DATABASE {identifier} OWNER {owner_identifier}"
        ))
        .await
        .map_err(error);
    client
        .batch_execute("RESET synchronous_commit")
        .await
        .map_err(error)?;
    created
}
