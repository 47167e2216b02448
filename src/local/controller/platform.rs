//! Local mode as a [`Platform`] of the shared control loop: agents and postgres on loopback
//! ports, the in-process lease store, `memory.json` for the loop's state, the events log, and
//! the write endpoint pointed at the serving primary once a round has decided.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::control::{AgentApi, ControlEvent, ControlState, PersistError, Platform};
use crate::coordination::LeaseStore;
use crate::engine::{Decision, EngineInput, Severity};
use crate::protocol::api::RejoinPath;

use super::{Shared, lock};

impl Platform for Shared {
    fn lease(&self) -> &dyn LeaseStore {
        self.store.as_ref()
    }

    fn agent(&self, instance: &str) -> Option<Arc<dyn AgentApi>> {
        lock(&self.clients)
            .get(instance)
            .map(|c| c.clone() as Arc<dyn AgentApi>)
    }

    fn agent_url(&self, instance: &str) -> Option<String> {
        lock(&self.clients)
            .get(instance)
            .map(|c| c.base_url().to_string())
    }

    fn postgres_address(&self, instance: &str) -> Option<(String, u16)> {
        self.node(instance)
            .map(|n| ("127.0.0.1".to_string(), n.pg_port))
    }

    fn emit(&self, event: ControlEvent<'_>) {
        match event {
            ControlEvent::Engine(event) => {
                let severity = match event.severity {
                    Severity::Info => "info",
                    Severity::Warning => "warning",
                    Severity::Critical => "critical",
                };
                self.record(
                    severity,
                    &format!("{:?}", event.reason),
                    event.message.clone(),
                );
            }
            ControlEvent::ActionStarted(action) => {
                self.record("info", "Action", format!("{action:?}"));
            }
            ControlEvent::ActionFailed { action, error } => {
                self.record(
                    "warning",
                    "ActionFailed",
                    format!("{}: {error}", action.kind()),
                );
            }
            ControlEvent::Completed(done) => match &done.result {
                Ok(_) if done.kind == "promote" => self.record(
                    "info",
                    done.kind,
                    format!(
                        "{}: promoted in {} ms",
                        done.instance,
                        done.took.as_millis()
                    ),
                ),
                Ok(message) => self.record(
                    "info",
                    done.kind,
                    format!(
                        "{}: {message} in {} ms",
                        done.instance,
                        done.took.as_millis()
                    ),
                ),
                Err(error) => {
                    self.record("warning", done.kind, format!("{}: {error}", done.instance))
                }
            },
            ControlEvent::Rejoined {
                instance,
                path,
                upstream: (host, port),
            } => self.record(
                "info",
                "rejoin",
                format!(
                    "{instance}: rejoined {host}:{port} by {} when its agent started",
                    match path {
                        RejoinPath::Rewind => "pg_rewind",
                        RejoinPath::Reclone => "re-clone",
                    }
                ),
            ),
        }
    }

    fn persist<'a>(&'a self, state: &'a ControlState) -> BoxFuture<'a, Result<(), PersistError>> {
        Box::pin(async move {
            let path = self.layout.memory();
            let failed = |e: std::io::Error| PersistError {
                place: path.display().to_string(),
                message: e.to_string(),
            };
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, state.to_json()).map_err(failed)?;
            std::fs::rename(&tmp, &path).map_err(failed)?;
            *lock(&self.last_state) = state.clone();
            Ok(())
        })
    }

    fn decided(&self, _input: &EngineInput, decision: &Decision, urgent: bool) {
        self.urgent
            .store(urgent, std::sync::atomic::Ordering::Relaxed);
        // During a handover the write endpoint holds new connections for the next primary.
        self.forwarder.hold.send_if_modified(|hold| {
            let modified = *hold != urgent;
            *hold = urgent;
            modified
        });
        // The write endpoint follows the serving holder only.
        let serving = decision
            .status
            .primary
            .as_ref()
            .and_then(|p| self.node(p))
            .map(|n| SocketAddr::from(([127, 0, 0, 1], n.pg_port)));
        self.forwarder.target.send_if_modified(|target| {
            if *target != serving {
                *target = serving;
                true
            } else {
                false
            }
        });
    }
}
