//! The `postgres` layer shared by everything: WAL positions ([`lsn`]), running PostgreSQL tools
//! as the `postgres` user ([`process`]), SQL probes ([`probe`]).

pub mod lsn;
pub mod probe;
pub mod process;
