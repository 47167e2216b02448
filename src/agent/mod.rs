//! The instance agent: bootstraps, configures and supervises one PostgreSQL instance, and serves
//! its HTTP API ([`api`]); [`client`] is the matching client.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod instance;
pub mod kube_mode;
pub mod supervisor;
