//! The wire protocol between controllers and agents, at the bottom of the layers: the agent's
//! HTTP API types ([`api`]) and the bounds of its request bodies ([`validate`]), its client
//! ([`client`]) and the names several layers share ([`names`]). It depends on nothing but
//! `postgres` value types, so `local`, `operator`, `api` and the shared control loop talk to
//! agents without importing the agent.

pub mod api;
pub mod client;
pub mod failsafe;
pub mod names;
pub mod statements;
pub mod validate;
