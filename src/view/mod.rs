//! The views the platforms publish and presentation reads: local mode's status document
//! ([`local`]); the operator publishes `PgReplicaSet.status` ([`crate::api`]). `dashboard` and
//! `metrics` depend on these, never on the controllers that fill them.

pub mod local;
