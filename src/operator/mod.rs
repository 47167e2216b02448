//! The `PgReplicaSet` operator: Kubernetes as a platform of the shared control loop
//! ([`crate::control`]). Reconcile pipeline: validate (pure, [`crate::api::validate`]) → build
//! (pure, [`build`]) → apply → the control round (observe → engine → persist → act) → labels
//! ([`labels`]) and status ([`status`]), in [`controller`]; major-version upgrades
//! planned in [`upgrade`].

pub mod build;
pub mod cli;
pub mod controller;
pub mod fence;
pub mod labels;
pub mod leader;
pub mod pods;
pub mod rollout;
pub mod status;
pub mod upgrade;
