//! Carrying out the major-version upgrade plan ([`crate::operator::upgrade`]): pod restarts,
//! the Lease granted to the upgrading primary, Events, and whether the control round runs.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt as _};

use crate::api::{MajorUpgradeStatus, PgReplicaSetStatus};
use crate::coordination::{KubeLeaseStore, LeaseStore as _};
use crate::operator::build::names;
use crate::operator::pods::PodView;
use crate::operator::status::condition;
use crate::operator::upgrade::{self, InstanceReport, Template, Transition, UpgradeInput};
use crate::protocol::api::AgentStatus;

use super::pipeline::Reconciler;
use super::{ReconcileError, now_time};

/// How often the operator looks at an upgrading primary (and grants it the Lease again).
pub(super) const UPGRADE_POLL: Duration = Duration::from_secs(1);
/// Bound of each call the upgrade step makes.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The condition reporting a major-version upgrade.
pub(super) const CONDITION: &str = "MajorUpgrade";

/// The upgrade state the controller keeps between reconciles (and writes into every status).
#[derive(Debug, Clone, Default)]
pub(super) struct UpgradeMemory {
    pub(super) running: Option<u32>,
    pub(super) status: Option<MajorUpgradeStatus>,
    pub(super) template: Option<Template>,
}

impl UpgradeMemory {
    pub(super) fn new(previous: Option<&PgReplicaSetStatus>) -> Self {
        UpgradeMemory {
            running: previous.and_then(|s| s.postgres_version),
            status: previous.and_then(|s| s.major_upgrade.clone()),
            template: None,
        }
    }

    /// Puts the upgrade fields (and their condition) into a status about to be written.
    pub(super) fn stamp(&self, status: &mut PgReplicaSetStatus, generation: i64) {
        status.postgres_version = self.running;
        status.major_upgrade = self.status.clone();
        status.conditions.retain(|c| c.type_ != CONDITION);
        if let Some(upgrade) = &self.status {
            let phase = format!("{:?}", upgrade.phase);
            let done = upgrade.phase == crate::api::MajorUpgradePhase::Completed;
            let message = upgrade.message.clone().unwrap_or_else(|| {
                format!("PostgreSQL {} to {}: {phase}", upgrade.from, upgrade.to)
            });
            status
                .conditions
                .push(condition(CONDITION, done, &phase, message, generation));
        }
    }
}

fn instance_report(status: &AgentStatus) -> InstanceReport {
    InstanceReport {
        role: status.role,
        major: status.postgres_major,
        streaming: status
            .wal_receiver
            .as_ref()
            .is_some_and(|w| w.status.is_streaming()),
        upgrade: status.major_upgrade.clone(),
    }
}

impl Reconciler<'_> {
    /// Plans this reconcile's upgrade step and records it (the template the StatefulSets are
    /// applied with); [`Self::carry_out_upgrade`] does the rest after the apply.
    pub(super) async fn major_upgrade(
        &mut self,
        token: &str,
        tls: Option<&super::tls::ClusterTls>,
    ) -> Result<upgrade::UpgradePlan, ReconcileError> {
        use crate::api::MajorUpgradePhase;
        let memory = self.runtime.upgrade.clone();
        let spec = &self.cluster.spec;
        let running = memory.running.unwrap_or(spec.postgres_version);
        let phase = memory.status.as_ref().map(|u| u.phase);
        let in_progress = matches!(
            phase,
            Some(MajorUpgradePhase::UpgradingPrimary | MajorUpgradePhase::RecloningReplicas)
        );
        let starting = !in_progress && spec.postgres_version > running;
        // The plan reads pods only while an upgrade runs or may start: no extra LIST per
        // reconcile of a steady cluster (the round lists them anyway).
        let pods = if in_progress || starting {
            self.pods().await?
        } else {
            std::collections::HashMap::new()
        };
        let live: BTreeMap<String, String> = pods
            .values()
            .filter(|p| !p.deleting)
            .filter_map(|p| Some((p.name.clone(), p.uid.clone()?)))
            .collect();
        let mut reports: BTreeMap<String, InstanceReport> = self
            .runtime
            .control
            .shared()
            .reports()
            .snapshot()
            .into_iter()
            .map(|(name, report)| (name, instance_report(&report.status)))
            .collect();
        if phase == Some(MajorUpgradePhase::UpgradingPrimary)
            && let Some(upgrade) = &memory.status
        {
            // No control round polls the agents meanwhile: ask the upgrading primary directly.
            reports.remove(&upgrade.primary);
            if let Some(status) = agent_status(&pods, &upgrade.primary, token, tls).await {
                reports.insert(upgrade.primary.clone(), instance_report(&status));
            }
        }
        let current_image = if starting {
            self.current_image().await?
        } else {
            None
        };
        let instances = crate::api::resolve_groups(&self.name(), spec)
            .iter()
            .flat_map(|g| g.instance_names())
            .collect::<Vec<_>>();
        let holder = self
            .cluster
            .status
            .as_ref()
            .and_then(|s| s.current_primary.clone());
        let retry_token = self
            .cluster
            .annotations()
            .get(upgrade::ANNOTATION_RETRY)
            .cloned();
        let plan = upgrade::plan(&UpgradeInput {
            spec_major: spec.postgres_version,
            running_major: Some(running),
            current: memory.status.as_ref(),
            holder: holder.as_deref(),
            instances: &instances,
            pods: &live,
            reports: &reports,
            current_image: current_image.as_deref(),
            retry_token: retry_token.as_deref(),
        });
        let mut status = plan.status.clone();
        if let Some(upgrade) = status.as_mut() {
            match plan.transition {
                Transition::Started => upgrade.started_at = Some(now_time()),
                Transition::PrimaryUpgraded => upgrade.primary_upgraded_at = Some(now_time()),
                Transition::Completed | Transition::Failed => {
                    upgrade.finished_at = Some(now_time())
                }
                Transition::None => {}
            }
        }
        self.announce(&plan.transition, status.as_ref()).await;
        if plan.template != memory.template.clone().unwrap_or(Template::Spec) {
            // The StatefulSets change at once (before any pod restarts on them).
            self.runtime.applied = None;
        }
        self.runtime.upgrade = UpgradeMemory {
            running: Some(plan.running),
            status,
            template: Some(plan.template.clone()),
        };
        if let Some(why) = &plan.waiting {
            tracing::info!(why = %why, "major upgrade waits");
        }
        Ok(plan)
    }

    /// After the StatefulSets were applied: restarts the pods the plan names (once the
    /// StatefulSet controller saw the new template, else the pod would come back on the old
    /// one), grants the Lease; the status to write when the control round is held back.
    pub(super) async fn carry_out_upgrade(
        &mut self,
        plan: &upgrade::UpgradePlan,
        lease: &KubeLeaseStore,
        generation: i64,
    ) -> Result<Option<PgReplicaSetStatus>, ReconcileError> {
        if !plan.restart.is_empty() && self.templates_observed().await? {
            self.restart_pods(&plan.restart).await?;
        }
        if !plan.hold {
            return Ok(None);
        }
        if let Some(holder) = &plan.grant {
            let pod_uid = self
                .pods()
                .await?
                .get(holder)
                .filter(|p| !p.deleting)
                .and_then(|p| p.uid.clone());
            grant(lease, holder, pod_uid.as_deref()).await;
        }
        let mut status = self.cluster.status.clone().unwrap_or_default();
        status.phase = Some(crate::api::Phase::Degraded);
        status.observed_generation = Some(generation);
        Ok(Some(status))
    }

    /// Whether the StatefulSet controller has seen the latest template of every StatefulSet.
    async fn templates_observed(&self) -> Result<bool, ReconcileError> {
        let observed = self.statefulsets().await?.iter().all(|sts| {
            let generation = sts.metadata.generation;
            let seen = sts.status.as_ref().and_then(|s| s.observed_generation);
            generation.is_some() && seen >= generation
        });
        Ok(observed)
    }

    async fn announce(&self, transition: &Transition, status: Option<&MajorUpgradeStatus>) {
        let Some(upgrade) = status else { return };
        let (type_, reason, note) = match transition {
            Transition::None => return,
            Transition::Started => (
                EventType::Normal,
                "MajorUpgradeStarted",
                format!(
                    "upgrading PostgreSQL {} to {}: {} restarts and runs pg_upgrade (writes stop)",
                    upgrade.from, upgrade.to, upgrade.primary
                ),
            ),
            Transition::PrimaryUpgraded => (
                EventType::Normal,
                "PrimaryUpgraded",
                format!(
                    "{} serves on PostgreSQL {}; the replicas are cloned from it",
                    upgrade.primary, upgrade.to
                ),
            ),
            Transition::Completed => (
                EventType::Normal,
                "MajorUpgradeCompleted",
                format!("every instance runs PostgreSQL {}", upgrade.to),
            ),
            Transition::Failed => (
                EventType::Warning,
                "MajorUpgradeFailed",
                format!(
                    "the cluster stays on PostgreSQL {}: {}",
                    upgrade.from,
                    upgrade.message.as_deref().unwrap_or("")
                ),
            ),
        };
        self.context
            .publish(self.cluster, type_, reason, note)
            .await;
    }

    /// The image of the cluster's running StatefulSets.
    async fn current_image(&self) -> Result<Option<String>, ReconcileError> {
        Ok(self.statefulsets().await?.iter().find_map(|sts| {
            sts.spec
                .template
                .spec
                .as_ref()?
                .containers
                .first()?
                .image
                .clone()
        }))
    }

    async fn statefulsets(&self) -> Result<Vec<StatefulSet>, ReconcileError> {
        let api: Api<StatefulSet> = Api::namespaced(self.context.client.clone(), &self.namespace());
        let selector = format!("{}={}", names::LABEL_CLUSTER, self.name());
        let list = tokio::time::timeout(
            CALL_TIMEOUT,
            api.list(&ListParams::default().labels(&selector)),
        )
        .await
        .map_err(|_| timeout_error(format!("StatefulSets with {selector}")))?
        .map_err(|source| ReconcileError::Read {
            what: format!("StatefulSets with {selector}"),
            source,
        })?;
        Ok(list.items)
    }

    async fn restart_pods(&self, names: &[String]) -> Result<(), ReconcileError> {
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), &self.namespace());
        for name in names {
            tracing::info!(pod = %name, "major upgrade: restarting the pod on the new image");
            let deleted =
                tokio::time::timeout(CALL_TIMEOUT, api.delete(name, &DeleteParams::default()))
                    .await
                    .map_err(|_| timeout_error(format!("the deletion of pod {name}")))?;
            match deleted {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.is_not_found() => {}
                Err(source) => {
                    return Err(ReconcileError::Read {
                        what: format!("the deletion of pod {name}"),
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The Lease for `holder` again, dated now: its agent upgrades before it serves and must find
/// a fresh grant when it reads the Lease once more.
async fn grant(lease: &KubeLeaseStore, holder: &str, pod_uid: Option<&str>) {
    let granted = tokio::time::timeout(CALL_TIMEOUT, async {
        let current = lease.get().await?;
        if current.holder.as_deref() == Some(holder)
            && pod_uid.is_some()
            && current.incarnation.as_deref() == pod_uid
        {
            // Its new pod's agent renews it already.
            return Ok(current);
        }
        lease.acquire(holder, &current.version).await
    })
    .await;
    match granted {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, holder, "failed to grant the lease; retrying"),
        Err(_) => tracing::warn!(holder, "granting the lease timed out; retrying"),
    }
}

async fn agent_status(
    pods: &std::collections::HashMap<String, PodView>,
    name: &str,
    token: &str,
    tls: Option<&super::tls::ClusterTls>,
) -> Option<AgentStatus> {
    let pod = pods.get(name).filter(|p| !p.deleting)?;
    let client = super::tls::agent_client(tls, pod.agent_url()?, token.to_string())?;
    tokio::time::timeout(crate::operator::pods::STATUS_TIMEOUT, client.status())
        .await
        .ok()?
        .ok()
}

fn timeout_error(what: String) -> ReconcileError {
    ReconcileError::Timeout { what }
}
