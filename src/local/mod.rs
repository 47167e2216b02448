//! `pgrs local`: a whole cluster of local postgres processes, no Kubernetes.

pub mod cli;
