//! The `postgres` layer shared by everything: WAL positions ([`lsn`]), running PostgreSQL
//! programs as the `postgres` user and reading `pg_controldata` ([`process`]), SQL probes of
//! roles, positions and replication state ([`probe`]), PostgreSQL's state words typed
//! ([`states`]), the majors supported and detected ([`version`]), pg_upgrade of one data directory ([`pg_upgrade`]). The SQL run on instances, each file with its tests in `tests/postgres_sql.rs`:
//! replication slots ([`slots`]), the replication role ([`roles`]), promotion, checkpoints and
//! reloads ([`promote`]), the synchronous standby setting ([`sql`]).

pub mod lsn;
pub mod pg_upgrade;
pub mod probe;
pub mod process;
pub mod promote;
pub mod roles;
pub mod slots;
pub mod sql;
pub mod states;
pub mod version;
