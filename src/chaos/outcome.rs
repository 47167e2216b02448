//! What a failed write attempt tells: the classification every writer of a chaos run uses.

use tokio_postgres::error::SqlState;

use super::WriteOutcome;

/// The classification of a failed connection attempt or INSERT: refused when the node
/// answered and definitely did not write (read-only: a replica or a fenced primary; not
/// accepting connections: starting up or shutting down; connection refused: postgres down),
/// indeterminate otherwise (it may or may not have been written).
pub fn outcome_of(error: &tokio_postgres::Error) -> WriteOutcome {
    if let Some(code) = error.code() {
        if *code == SqlState::READ_ONLY_SQL_TRANSACTION || *code == SqlState::CANNOT_CONNECT_NOW {
            return WriteOutcome::Refused;
        }
        return WriteOutcome::Indeterminate;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return WriteOutcome::Refused;
        }
        source = e.source();
    }
    WriteOutcome::Indeterminate
}
