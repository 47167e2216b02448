//! The instance agent: bootstraps, configures and supervises one PostgreSQL instance.

pub mod cli;
