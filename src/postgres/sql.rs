//! Statements that more than one layer runs on an instance, in one place with their tests
//! (`tests/postgres_sql.rs`): the synchronous standby setting, the checkpoint before a
//! demotion, dropping the replication slots of removed instances.

use tokio_postgres::Client;

/// A failed statement, with PostgreSQL's own message when it gave one.
#[derive(Debug, thiserror::Error)]
#[error("failed to {what}: {message}")]
pub struct SqlError {
    pub what: &'static str,
    pub message: String,
    /// The statement itself failed (severity ERROR): retrying on a new session would not help.
    pub statement_error: bool,
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
            statement_error: source
                .as_db_error()
                .is_some_and(|db| db.severity() == "ERROR"),
            source,
        }
    }
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

/// `CHECKPOINT`: before a planned demotion, so that the shutdown checkpoint has little to write.
pub async fn checkpoint(client: &Client) -> Result<(), SqlError> {
    client
        .batch_execute("CHECKPOINT")
        .await
        .map_err(SqlError::new("checkpoint"))
}

/// Drops the inactive physical slots among `slots`; returns those dropped. While any of them is
/// active (its standby still streams) nothing is dropped and the count is returned as an error
/// message, to be retried.
pub async fn drop_inactive_slots(
    client: &Client,
    slots: &[String],
) -> Result<Result<Vec<String>, i64>, SqlError> {
    let active: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1) AND active",
            &[&slots],
        )
        .await
        .map_err(SqlError::new("count active replication slots"))?
        .get(0);
    if active > 0 {
        return Ok(Err(active));
    }
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots \
             WHERE slot_name = ANY($1) AND slot_type = 'physical' AND NOT active \
             AND pg_drop_replication_slot(slot_name) IS NOT NULL",
            &[&slots],
        )
        .await
        .map_err(SqlError::new("drop replication slots"))?;
    Ok(Ok(rows.iter().map(|row| row.get(0)).collect()))
}
