//! The `postgres` layer shared by everything: WAL positions ([`lsn`]), running PostgreSQL
//! programs as the `postgres` user and reading `pg_controldata` ([`process`]), SQL probes of
//! roles, positions and replication state ([`probe`]), PostgreSQL's state words typed
//! ([`states`]) and the statements several layers run ([`sql`]).

pub mod lsn;
pub mod probe;
pub mod process;
pub mod sql;
pub mod states;
