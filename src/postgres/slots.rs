//! Physical replication slots on a primary: creating a replica's slot (reserving WAL at once),
//! dropping the slot of a failed clone, and dropping the stale `pgrs_` slots an instance carries
//! over from its earlier life as a primary, and (for the operator) the slots of instances a
//! scale-down removed.

use tokio_postgres::{Client, SimpleQueryMessage};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("failed to create replication slot {slot}: {source}")]
    Create {
        slot: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to drop replication slot {slot}: {source}")]
    Drop {
        slot: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to drop stale replication slots: {source}")]
    DropStale {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to drop the slots of removed instances: {source}")]
    DropRemoved {
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("failed to drop the slots of removed instances: {active} of them are still active")]
    StillActive { active: i64 },
}

/// Drops this agent family's inactive physical slots (names `pgrs_…`). Run in one simple-query
/// round trip; it also works on a standby.
const STALE_SLOTS_DROP: &str = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
     WHERE slot_type = 'physical' AND NOT active AND slot_name LIKE 'pgrs\\_%'";

/// Creates the physical slot `slot` unless it exists, reserving WAL now so nothing a new
/// replica needs is recycled before it connects. `true` when it was created now.
pub async fn create_physical_slot(client: &Client, slot: &str) -> Result<bool, SlotError> {
    let created = client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) \
             WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(|source| SlotError::Create {
            slot: slot.to_string(),
            source,
        })?;
    if created > 0 {
        tracing::debug!(slot, "created physical replication slot");
    }
    Ok(created > 0)
}

/// Drops the slot `slot` if it exists and no replica uses it. `true` when it was dropped.
pub async fn drop_inactive_slot(client: &Client, slot: &str) -> Result<bool, SlotError> {
    let dropped = client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await
        .map_err(|source| SlotError::Drop {
            slot: slot.to_string(),
            source,
        })?;
    Ok(dropped > 0)
}

/// Drops every inactive physical `pgrs_…` slot (an active one, and any other, stays); returns
/// how many were dropped.
pub async fn drop_stale_slots(client: &Client) -> Result<usize, SlotError> {
    let messages = client
        .simple_query(STALE_SLOTS_DROP)
        .await
        .map_err(|source| SlotError::DropStale { source })?;
    let dropped = messages
        .iter()
        .filter(|message| matches!(message, SimpleQueryMessage::Row(_)))
        .count();
    if dropped > 0 {
        tracing::debug!(dropped, "dropped stale replication slots");
    }
    Ok(dropped)
}

/// Drops the physical slots among `slots` (the slots of removed instances); returns those
/// dropped. While any of them is active (its standby still streams) none is dropped: the
/// caller retries later.
pub async fn drop_removed_slots(
    client: &Client,
    slots: &[String],
) -> Result<Vec<String>, SlotError> {
    let failed = |source| SlotError::DropRemoved { source };
    let active: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1) AND active",
            &[&slots],
        )
        .await
        .map_err(failed)?
        .get(0);
    if active > 0 {
        return Err(SlotError::StillActive { active });
    }
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots \
             WHERE slot_name = ANY($1) AND slot_type = 'physical' AND NOT active \
             AND pg_drop_replication_slot(slot_name) IS NOT NULL",
            &[&slots],
        )
        .await
        .map_err(failed)?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
