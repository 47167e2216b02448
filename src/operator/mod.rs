//! The `PgReplicaSet` operator. Reconcile pipeline: validate (pure, [`crate::api::validate`]) →
//! build (pure, [`build`]) → apply → observe → engine → act → status ([`controller`]).

pub mod act;
pub mod build;
pub mod cli;
pub mod controller;
pub mod fence;
pub mod leader;
pub mod observe;
pub mod rollout;
pub mod status;
