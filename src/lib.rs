//! pgrs: PostgreSQL streaming replication with split-brain-safe automatic failover.
//!
//! Layers (see `docs/architecture.md`): `engine` decides (pure: no IO, no clock), `coordination`
//! says who may be primary (the lease), `postgres` wraps PostgreSQL itself (LSNs, probes, process
//! control), `agent` supervises one instance, `local` runs a whole cluster on one machine, and
//! `cli` ties them into the single `pgrs` binary.

pub mod agent;
pub mod api;
pub mod chaos;
pub mod cli;
pub mod control;
pub mod coordination;
pub mod dashboard;
pub mod engine;
pub mod local;
pub mod metrics;
pub mod operator;
pub mod postgres;
pub mod protocol;
pub mod tls;
pub mod view;
