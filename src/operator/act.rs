//! Act: carry out the engine's actions against the agents (at their pod IPs) and the Lease,
//! and move the pod labels the Services select. Promote, follow and rejoin run in the
//! background, one at a time per instance, so that a slow rewind never delays a decision.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::agent::api::{
    FenceRequest, FollowRequest, PromoteRequest, RejoinRequest, StopMode, StopRequest,
};
use crate::agent::client::AgentClient;
use crate::coordination::{LeaseError, LeaseStore};
use crate::engine::{Action, SyncSet};
use crate::operator::build::names;
use crate::operator::observe::PodView;

/// How long a promotion may take before the agent answers.
const PROMOTE_WAIT_SECONDS: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum ActError {
    #[error("failed to {action} {instance}: it has no pod IP")]
    NoAddress {
        action: &'static str,
        instance: String,
    },
    #[error("failed to {action} {instance}: {message}")]
    Agent {
        action: &'static str,
        instance: String,
        message: String,
    },
    #[error("failed to write the lease: {0}")]
    Lease(#[source] LeaseError),
    #[error("failed to set synchronous_standby_names on {primary}: {message}")]
    Sync { primary: String, message: String },
    #[error("failed to relabel pod {pod}: {source}")]
    Label {
        pod: String,
        #[source]
        source: kube::Error,
    },
}

impl ActError {
    /// Event reason and metric label.
    pub fn category(&self) -> &'static str {
        match self {
            ActError::NoAddress { .. } => "NoPodAddress",
            ActError::Agent { .. } => "AgentActionFailed",
            ActError::Lease(_) => "LeaseWriteFailed",
            ActError::Sync { .. } => "SyncStandbysFailed",
            ActError::Label { .. } => "RelabelFailed",
        }
    }
}

/// Instances with a background action under way.
#[derive(Debug, Default, Clone)]
pub struct Busy(Arc<Mutex<BTreeSet<String>>>);

impl Busy {
    fn claim(&self, instance: &str) -> bool {
        match self.0.lock() {
            Ok(mut set) => set.insert(instance.to_string()),
            Err(_) => false,
        }
    }

    fn release(&self, instance: &str) {
        if let Ok(mut set) = self.0.lock() {
            set.remove(instance);
        }
    }
}

/// Result of a background action, reported back to the controller.
#[derive(Debug, Clone)]
pub struct Completed {
    pub instance: String,
    pub kind: &'static str,
    pub result: Result<String, String>,
    pub took: Duration,
}

/// What an action needs: the pods, the token, the Lease.
pub struct Actor<'a> {
    pub pods: &'a HashMap<String, PodView>,
    pub token: &'a str,
    pub superuser_password: &'a str,
    pub lease: Arc<dyn LeaseStore>,
    pub busy: Busy,
    pub completed: tokio::sync::mpsc::UnboundedSender<Completed>,
}

impl Actor<'_> {
    fn client(&self, action: &'static str, instance: &str) -> Result<AgentClient, ActError> {
        let url = self
            .pods
            .get(instance)
            .and_then(PodView::agent_url)
            .ok_or_else(|| ActError::NoAddress {
                action,
                instance: instance.to_string(),
            })?;
        AgentClient::new(url, Some(self.token.to_string())).map_err(|e| ActError::Agent {
            action,
            instance: instance.to_string(),
            message: e.to_string(),
        })
    }

    fn ip(&self, action: &'static str, instance: &str) -> Result<String, ActError> {
        self.pods
            .get(instance)
            .and_then(|p| p.ip.clone())
            .ok_or_else(|| ActError::NoAddress {
                action,
                instance: instance.to_string(),
            })
    }

    /// Carries out one action; `Ok(true)` when it ran in the foreground.
    pub async fn execute(&self, action: &Action) -> Result<bool, ActError> {
        let kind = action.kind();
        let agent_error = |instance: &str, e: crate::agent::client::ClientError| ActError::Agent {
            action: kind,
            instance: instance.to_string(),
            message: e.to_string(),
        };
        match action {
            Action::AcquireLease {
                holder,
                expected_version,
            } => {
                self.lease
                    .acquire(holder, expected_version)
                    .await
                    .map_err(ActError::Lease)?;
                Ok(true)
            }
            Action::Demote { instance } => {
                let client = self.client(kind, instance)?;
                client
                    .stop(&StopRequest {
                        mode: StopMode::Fast,
                    })
                    .await
                    .map_err(|e| agent_error(instance, e))?;
                // postgres is down: give the lease up at once (the agent would too).
                match self.lease.release(instance).await {
                    Ok(_) | Err(LeaseError::NotHolder { .. }) => Ok(true),
                    Err(e) => Err(ActError::Lease(e)),
                }
            }
            Action::Fence { instance, reason } => {
                let client = self.client(kind, instance)?;
                client
                    .fence(&FenceRequest {
                        reason: Some(reason.clone()),
                    })
                    .await
                    .map_err(|e| agent_error(instance, e))?;
                Ok(true)
            }
            Action::SetSynchronousStandbys { primary, sync } => {
                let host = self.ip(kind, primary)?;
                set_synchronous_standbys(&host, self.superuser_password, sync)
                    .await
                    .map_err(|message| ActError::Sync {
                        primary: primary.clone(),
                        message,
                    })?;
                Ok(true)
            }
            Action::Promote { instance } => {
                let client = self.client(kind, instance)?;
                self.background(instance, kind, async move {
                    client
                        .promote(&PromoteRequest {
                            wait_seconds: Some(PROMOTE_WAIT_SECONDS),
                        })
                        .await
                        .map(|r| r.message)
                        .map_err(|e| e.to_string())
                });
                Ok(false)
            }
            Action::Follow { instance, primary } | Action::Rejoin { instance, primary } => {
                let client = self.client(kind, instance)?;
                let host = self.ip(kind, primary)?;
                let port = names::POSTGRES_PORT;
                let rejoin = matches!(action, Action::Rejoin { .. });
                self.background(instance, kind, async move {
                    let result = if rejoin {
                        client
                            .rejoin(&RejoinRequest {
                                host,
                                port,
                                slot: None,
                            })
                            .await
                    } else {
                        client
                            .follow(&FollowRequest {
                                host,
                                port,
                                slot: None,
                            })
                            .await
                    };
                    result.map(|r| r.message).map_err(|e| e.to_string())
                });
                Ok(false)
            }
        }
    }

    fn background(
        &self,
        instance: &str,
        kind: &'static str,
        work: impl Future<Output = Result<String, String>> + Send + 'static,
    ) {
        if !self.busy.claim(instance) {
            return;
        }
        let busy = self.busy.clone();
        let completed = self.completed.clone();
        let instance = instance.to_string();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = work.await;
            busy.release(&instance);
            let _ = completed.send(Completed {
                instance,
                kind,
                result,
                took: started.elapsed(),
            });
        });
    }
}

async fn set_synchronous_standbys(
    host: &str,
    password: &str,
    sync: &SyncSet,
) -> Result<(), String> {
    let target = crate::postgres::probe::ConnectTarget {
        host: host.to_string(),
        port: names::POSTGRES_PORT,
        user: "postgres".to_string(),
        password: password.to_string(),
        dbname: "postgres".to_string(),
    };
    let client = crate::postgres::probe::connect(&target, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())?;
    let standby_names = sync.to_standby_names().replace('\'', "''");
    let describe = |e: tokio_postgres::Error| {
        e.as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_string())
    };
    // Separate statements: ALTER SYSTEM refuses to run inside an (implicit) transaction block.
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{standby_names}'"
        ))
        .await
        .map_err(describe)?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(describe)?;
    Ok(())
}

/// The role, read-pool and in-service labels every pod should carry. Pure: `primary` is the
/// serving lease holder (the only pod `<name>-rw` may select); `readable` the replicas within
/// the read lag limit; `fenced` pods carry none of them (no Service selects them).
pub fn desired_labels(
    pods: &HashMap<String, PodView>,
    primary: Option<&str>,
    replicas: &BTreeSet<String>,
    readable: &BTreeSet<String>,
    fenced: &BTreeSet<String>,
) -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let mut changes = BTreeMap::new();
    for pod in pods.values() {
        let is_fenced = fenced.contains(&pod.name);
        let role = if is_fenced {
            None
        } else if Some(pod.name.as_str()) == primary {
            Some(names::ROLE_PRIMARY)
        } else if replicas.contains(&pod.name) {
            Some(names::ROLE_REPLICA)
        } else {
            None
        };
        let read_pool =
            (readable.contains(&pod.name) && !is_fenced).then_some(names::READ_POOL_MEMBER);
        let in_service = (!is_fenced).then_some(names::IN_SERVICE);
        let mut patch = BTreeMap::new();
        for (key, want) in [
            (names::LABEL_ROLE, role),
            (names::LABEL_READ_POOL, read_pool),
            (names::LABEL_IN_SERVICE, in_service),
        ] {
            if pod.labels.get(key).map(String::as_str) != want {
                patch.insert(key.to_string(), want.map(str::to_string));
            }
        }
        if !patch.is_empty() {
            changes.insert(pod.name.clone(), patch);
        }
    }
    changes
}

/// Applies label changes: first the pods that lose the primary label, then the others, so
/// that `<name>-rw` never selects two pods.
pub async fn relabel(
    api: &Api<Pod>,
    changes: &BTreeMap<String, BTreeMap<String, Option<String>>>,
) -> Result<(), ActError> {
    let loses_primary = |patch: &BTreeMap<String, Option<String>>| {
        patch
            .get(names::LABEL_ROLE)
            .is_some_and(|v| v.as_deref() != Some(names::ROLE_PRIMARY))
    };
    let (first, then): (Vec<_>, Vec<_>) = changes.iter().partition(|(_, p)| loses_primary(p));
    for (pod, labels) in first.into_iter().chain(then) {
        let body = serde_json::json!({ "metadata": { "labels": labels } });
        api.patch(pod, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map_err(|source| ActError::Label {
                pod: pod.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> (String, PodView) {
        (
            name.to_string(),
            PodView {
                name: name.to_string(),
                ip: Some("10.0.0.1".to_string()),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                deleting: false,
                uid: None,
            },
        )
    }

    #[test]
    fn the_old_primary_loses_its_label_and_the_new_one_gains_it() {
        let pods = HashMap::from([
            pod("pg-0", &[(names::LABEL_ROLE, names::ROLE_PRIMARY)]),
            pod("pg-1", &[(names::LABEL_ROLE, names::ROLE_REPLICA)]),
        ]);
        let none_fenced = BTreeSet::new();
        let changes = desired_labels(
            &pods,
            Some("pg-1"),
            &BTreeSet::new(),
            &BTreeSet::new(),
            &none_fenced,
        );
        assert_eq!(changes["pg-0"][names::LABEL_ROLE], None);
        assert_eq!(
            changes["pg-1"][names::LABEL_ROLE].as_deref(),
            Some(names::ROLE_PRIMARY)
        );
        // Without a serving primary nobody carries the primary label.
        let none = desired_labels(
            &pods,
            None,
            &BTreeSet::new(),
            &BTreeSet::new(),
            &none_fenced,
        );
        assert_eq!(none["pg-0"][names::LABEL_ROLE], None);
        assert!(!none.contains_key("pg-1") || none["pg-1"][names::LABEL_ROLE].is_none());
    }

    #[test]
    fn a_fenced_pod_leaves_every_service() {
        let pods = HashMap::from([
            pod(
                "pg-0",
                &[
                    (names::LABEL_ROLE, names::ROLE_PRIMARY),
                    (names::LABEL_IN_SERVICE, names::IN_SERVICE),
                ],
            ),
            pod(
                "pg-1",
                &[
                    (names::LABEL_ROLE, names::ROLE_REPLICA),
                    (names::LABEL_READ_POOL, names::READ_POOL_MEMBER),
                    (names::LABEL_IN_SERVICE, names::IN_SERVICE),
                ],
            ),
        ]);
        let replicas = BTreeSet::from(["pg-1".to_string()]);
        let fenced = BTreeSet::from(["pg-1".to_string()]);
        let changes = desired_labels(&pods, Some("pg-0"), &replicas, &replicas, &fenced);
        for key in [
            names::LABEL_ROLE,
            names::LABEL_READ_POOL,
            names::LABEL_IN_SERVICE,
        ] {
            assert_eq!(changes["pg-1"][key], None, "{key}");
        }
        assert!(!changes.contains_key("pg-0"));
    }
}
