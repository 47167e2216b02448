//! The `PgReplicaSet` operator. Reconcile pipeline: validate (pure, [`crate::api::validate`]) →
//! build (pure, [`build`]) → apply → observe → engine → act → status. Only the pure build step
//! exists so far.

pub mod build;
