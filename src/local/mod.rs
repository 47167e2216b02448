//! `pgrs local`: a whole cluster of local postgres processes, no Kubernetes. A background
//! controller runs the agents, the lease service, the failover loop (the same engine as the
//! operator) and a stable write endpoint.

pub mod chaos;
pub mod cli;
pub mod controller;
pub mod forwarder;
pub mod layout;
pub mod status;
pub mod tls;
pub mod upgrade;
