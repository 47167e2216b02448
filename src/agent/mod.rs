//! The instance agent: bootstraps, configures and supervises one PostgreSQL instance, and serves
//! its HTTP API (types and client in [`crate::protocol`]).

pub mod cli;
pub mod config;
pub mod fencing;
pub mod http;
pub mod instance;
pub mod kube_mode;
pub mod rotation;
pub mod secret_watch;
pub mod supervisor;
pub mod tls_files;
pub mod upgrade;
