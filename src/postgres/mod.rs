//! The `postgres` layer shared by everything: WAL positions ([`lsn`]), running PostgreSQL
//! programs as the `postgres` user and reading `pg_controldata` ([`process`]), SQL probes of
//! roles, positions and replication state ([`probe`]).
//! The SQL the agent runs: replication slots ([`slots`]), the replication role ([`roles`]),
//! promotion, checkpoints and reloads ([`promote`]).

pub mod lsn;
pub mod probe;
pub mod process;
pub mod promote;
pub mod roles;
pub mod slots;
