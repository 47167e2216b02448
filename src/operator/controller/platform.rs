//! Kubernetes as a [`Platform`] of the shared control loop, for one reconcile: agents at their
//! pod IPs, the cluster's Lease, the control state in a ConfigMap the cluster owns, and Events
//! collected during the round and published after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Client, ResourceExt as _};

use crate::api::PgReplicaSet;
use crate::control::{AgentApi, ControlEvent, ControlState, PersistError, Platform};
use crate::coordination::{KubeLeaseStore, LeaseStore};
use crate::engine::Severity;
use crate::operator::build::{self, Owner, names};
use crate::operator::pods::PodView;
use crate::protocol::api::RejoinPath;

use super::ReconcileError;

/// How long reading or writing the control state may take.
const STATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an agent action may take before its HTTP request gives up (background actions:
/// a rejoin with a re-clone; inline actions are bounded by the loop much shorter).
const ACTION_TIMEOUT: Duration = Duration::from_secs(600);

/// An Event to publish once the round is over.
pub(super) type PendingEvent = (EventType, String, String);

pub(super) struct KubePlatform<'a> {
    pub client: &'a Client,
    pub cluster: &'a PgReplicaSet,
    pub pods: &'a HashMap<String, PodView>,
    pub token: &'a str,
    /// The token before a rotation, tried on a 401.
    pub previous_token: Option<String>,
    /// The cluster's TLS clients (`None`: plain).
    pub tls: Option<Arc<super::tls::ClusterTls>>,
    pub lease: Arc<KubeLeaseStore>,
    pub events: Mutex<Vec<PendingEvent>>,
}

impl KubePlatform<'_> {
    fn push(&self, type_: EventType, reason: &str, note: String) {
        if let Ok(mut events) = self.events.lock() {
            events.push((type_, reason.to_string(), note));
        }
    }

    /// The Events of the round, in order.
    pub fn take_events(&self) -> Vec<PendingEvent> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }
}

fn action_reason(kind: &str) -> &'static str {
    match kind {
        "promote" => "Promoted",
        "follow" => "Following",
        "rejoin" => "Rejoined",
        _ => "ActionCompleted",
    }
}

impl Platform for KubePlatform<'_> {
    fn lease(&self) -> &dyn LeaseStore {
        self.lease.as_ref()
    }

    fn agent(&self, instance: &str) -> Option<Arc<dyn AgentApi>> {
        let url = self.pods.get(instance).and_then(PodView::agent_url)?;
        let client = super::tls::agent_client(self.tls.as_deref(), url, self.token.to_string())?
            .with_fallback_token(self.previous_token.clone());
        Some(Arc::new(client.with_action_timeout(ACTION_TIMEOUT)))
    }

    fn agent_url(&self, instance: &str) -> Option<String> {
        self.pods.get(instance).and_then(PodView::agent_url)
    }

    /// A stopping pod's address disappears with it: it may not slow down every round.
    fn poll_bound(&self, instance: &str) -> Duration {
        match self.pods.get(instance) {
            Some(pod) if pod.deleting => crate::operator::pods::DELETING_STATUS_TIMEOUT,
            _ => crate::operator::pods::STATUS_TIMEOUT,
        }
    }

    fn postgres_address(&self, instance: &str) -> Option<(String, u16)> {
        let ip = self.pods.get(instance)?.ip.clone()?;
        Some((ip, names::POSTGRES_PORT))
    }

    fn emit(&self, event: ControlEvent<'_>) {
        match event {
            ControlEvent::Engine(event) => {
                let type_ = match event.severity {
                    Severity::Info => EventType::Normal,
                    Severity::Warning | Severity::Critical => EventType::Warning,
                };
                let reason = format!("{:?}", event.reason);
                tracing::info!(reason = %reason, message = %event.message, "event");
                self.push(type_, &reason, event.message.clone());
            }
            // Inline failures end the reconcile with an error: `error_policy` publishes them.
            ControlEvent::ActionStarted(_) | ControlEvent::ActionFailed { .. } => {}
            ControlEvent::Completed(done) => match &done.result {
                Ok(message) => {
                    tracing::info!(instance = %done.instance, kind = done.kind, took_ms = done.took.as_millis() as u64, "action completed");
                    let note = format!(
                        "{} {}: {message} in {} ms",
                        done.kind,
                        done.instance,
                        done.took.as_millis()
                    );
                    self.push(EventType::Normal, action_reason(done.kind), note);
                }
                Err(error) => {
                    tracing::warn!(instance = %done.instance, kind = done.kind, %error, "action failed");
                    let note = format!("{} {} failed: {error}", done.kind, done.instance);
                    self.push(EventType::Warning, "ActionFailed", note);
                }
            },
            ControlEvent::Rejoined {
                instance,
                path,
                upstream: (host, port),
            } => {
                let path = match path {
                    RejoinPath::Rewind => "pg_rewind",
                    RejoinPath::Reclone => "re-clone",
                };
                let note =
                    format!("{instance} rejoined {host}:{port} by {path} when its agent started");
                self.push(EventType::Normal, "Rejoined", note);
            }
        }
    }

    fn persist<'a>(&'a self, state: &'a ControlState) -> BoxFuture<'a, Result<(), PersistError>> {
        Box::pin(async move {
            let name = names::control_state(&self.cluster.name_any());
            let failed = |message: String| PersistError {
                place: format!("ConfigMap {name}"),
                message,
            };
            let owner = Owner::of(self.cluster).map_err(|e| failed(e.to_string()))?;
            let config_map = build::control_state_config_map(&owner, &state.to_json());
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &owner.namespace);
            let params = PatchParams::apply(names::MANAGER).force();
            let patch = Patch::Apply(&config_map);
            let write = api.patch(&name, &params, &patch);
            tokio::time::timeout(STATE_TIMEOUT, write)
                .await
                .map_err(|_| failed(format!("no answer within {STATE_TIMEOUT:?}")))?
                .map_err(|e| failed(e.to_string()))?;
            tracing::debug!(configmap = %name, "control state persisted");
            Ok(())
        })
    }
}

/// Reads the control state back from the cluster's ConfigMap; none yet is a fresh state.
pub(super) async fn load_state(
    client: &Client,
    cluster: &PgReplicaSet,
) -> Result<ControlState, ReconcileError> {
    let name = names::control_state(&cluster.name_any());
    let failed = |message: String| ReconcileError::ControlState {
        name: name.clone(),
        message,
    };
    let api: Api<ConfigMap> =
        Api::namespaced(client.clone(), &cluster.namespace().unwrap_or_default());
    let found = tokio::time::timeout(STATE_TIMEOUT, api.get_opt(&name))
        .await
        .map_err(|_| failed(format!("no answer within {STATE_TIMEOUT:?}")))?
        .map_err(|e| failed(e.to_string()))?;
    let Some(config_map) = found else {
        let mut state = ControlState::default();
        // A cluster that has served before had a record: it is lost, not empty.
        if cluster
            .status
            .as_ref()
            .is_some_and(|s| s.current_primary.is_some())
        {
            tracing::warn!(configmap = %name, "the control state is missing for a cluster that has run: the synchronous quorum is unknown until the primary confirms it");
            state.memory.sync_record_lost = true;
        }
        return Ok(state);
    };
    let text = config_map
        .data
        .as_ref()
        .and_then(|d| d.get(names::CONTROL_STATE_KEY))
        .ok_or_else(|| failed(format!("key {} is missing", names::CONTROL_STATE_KEY)))?;
    let state = ControlState::from_json(text).map_err(|e| failed(e.to_string()))?;
    tracing::info!(
        configmap = %name,
        recorded_sync = %state.memory.recorded_sync.to_standby_names(),
        "control state read back"
    );
    Ok(state)
}
