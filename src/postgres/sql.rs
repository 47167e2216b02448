//! The synchronous standby setting, which the control loop sets on a primary, and how a
//! failed statement is told from a failed session (a kept session is reopened only for the
//! latter).

use tokio_postgres::Client;

/// A failed statement, with PostgreSQL's own message when it gave one.
#[derive(Debug, thiserror::Error)]
#[error("failed to {what}: {message}")]
pub struct SqlError {
    pub what: &'static str,
    pub message: String,
    #[source]
    pub source: tokio_postgres::Error,
}

impl SqlError {
    fn new(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SqlError {
        move |source| SqlError {
            what,
            message: source
                .as_db_error()
                .map_or_else(|| source.to_string(), |db| db.message().to_string()),
            source,
        }
    }
}

/// The statement itself failed (severity ERROR), somewhere in `error`'s source chain: running
/// it again on a new session would fail the same way. Anything else (FATAL, a closed session,
/// I/O) is the session's failure.
pub fn statement_failed(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(db) = error
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::as_db_error)
        {
            return db.severity() == "ERROR";
        }
        current = error.source();
    }
    false
}

/// `synchronous_standby_names` as a quoted SQL literal.
pub fn standby_names_literal(names: &str) -> String {
    format!("'{}'", names.replace('\'', "''"))
}

/// Sets `synchronous_standby_names` (ALTER SYSTEM, then a reload). Two statements: ALTER SYSTEM
/// refuses to run inside an (implicit) transaction block.
pub async fn set_synchronous_standby_names(client: &Client, names: &str) -> Result<(), SqlError> {
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            standby_names_literal(names)
        ))
        .await
        .map_err(SqlError::new("set synchronous_standby_names"))?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(SqlError::new("reload the configuration"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_names_are_quoted_for_sql() {
        assert_eq!(
            standby_names_literal("ANY 1 (\"a'b\", \"c\")"),
            "'ANY 1 (\"a''b\", \"c\")'"
        );
        assert_eq!(standby_names_literal(""), "''");
    }
}
