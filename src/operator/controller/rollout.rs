//! Parameter rollouts and scaling, planned by [`crate::operator::rollout`] and carried out
//! here: pushing parameters, restarting one instance at a time (in the background), switching
//! over before the primary restarts or is removed, dropping removed instances' slots.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::runtime::events::EventType;

use crate::api::{self, PgReplicaSetStatus, resolve_groups};
use crate::control::Report;
use crate::engine;
use crate::operator::build::ClusterSecrets;
use crate::operator::pods::PodView;
use crate::operator::rollout;

use super::now_time;
use super::pipeline::Reconciler;

/// How long an agent may take to write and reload the parameters.
const PARAMETERS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an agent may take to restart postgres (fast stop, start, recovery).
const RESTART_TIMEOUT: Duration = Duration::from_secs(180);
/// A restarted instance not back after this long gets a Warning (and is no longer waited for).
const RESTART_STALLED: Duration = Duration::from_secs(600);

/// What the controller remembers between rounds for rollouts and scaling.
pub(super) struct RolloutMemory {
    /// The instance restarted for its parameters (and when), until it is back.
    restarting: Option<String>,
    restart_started: Option<Instant>,
    /// The parameters digest last announced as applied everywhere.
    applied_hash: Option<String>,
    /// Replica counts per StatefulSet as last applied.
    pub(super) applied_replicas: Option<std::collections::BTreeMap<String, u32>>,
    /// The instances of the previous round, to notice removals.
    known: Vec<String>,
    /// Removed instances whose replication slot is still to drop on the primary.
    slots_to_drop: BTreeSet<String>,
    /// Background restarts that failed: (instance, error).
    restart_failures: Arc<Mutex<Vec<(String, String)>>>,
    /// What each agent was told of `spec.enableSuperuserAccess` (`superuser` module).
    pub(super) superuser: super::superuser::Pushes,
}

impl RolloutMemory {
    pub(super) fn new(previous: Option<&PgReplicaSetStatus>) -> Self {
        RolloutMemory {
            restarting: None,
            restart_started: None,
            applied_hash: None,
            applied_replicas: None,
            known: previous
                .map(|s| s.instances.iter().map(|i| i.name.clone()).collect())
                .unwrap_or_default(),
            slots_to_drop: BTreeSet::new(),
            restart_failures: Arc::default(),
            superuser: super::superuser::Pushes::default(),
        }
    }
}

/// The rollout's share of a round: the `ParametersApplied` condition and whether to come back
/// quickly.
pub(super) struct RolloutOutcome {
    condition: (bool, &'static str, String),
    pub(super) busy: bool,
}

impl RolloutOutcome {
    pub(super) fn condition(
        &self,
        generation: i64,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        let (ok, reason, message) = &self.condition;
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: api::condition::PARAMETERS_APPLIED.to_string(),
            status: if *ok { "True" } else { "False" }.to_string(),
            reason: reason.to_string(),
            message: message.clone(),
            observed_generation: Some(generation),
            last_transition_time: now_time(),
        }
    }
}

impl Reconciler<'_> {
    /// Replicas per StatefulSet: the spec's, or up to the primary's ordinal during a
    /// scale-down (the Lease holder as last seen, else the status).
    pub(super) fn retained_replicas(&self) -> std::collections::BTreeMap<String, u32> {
        let holder = match self.runtime.control.lease_unchanged_since() {
            Some(_) => self.runtime.control.state().last_holder.clone(),
            None => self
                .cluster
                .status
                .as_ref()
                .and_then(|s| s.current_primary.clone()),
        };
        let groups = resolve_groups(&self.name(), &self.cluster.spec);
        rollout::retained_groups(&groups, holder.as_deref())
            .into_iter()
            .map(|g| (g.statefulset, g.replicas))
            .collect()
    }

    /// Forgets instances that left the cluster (their reports, so they leave the status) and
    /// queues their replication slots for dropping.
    pub(super) fn forget_removed(&mut self, instances: &[String]) {
        let memory = &mut self.runtime.rollout;
        let removed = rollout::removed(&memory.known, instances);
        if !removed.is_empty() {
            tracing::info!(?removed, "instances removed from the cluster");
        }
        memory.slots_to_drop.extend(removed);
        memory.slots_to_drop.retain(|n| !instances.contains(n));
        memory.known = instances.to_vec();
    }

    /// Scale-down switchover, slot cleanup and the parameter rollout for this round. Runs
    /// before the engine decides, so that a switchover it plans is carried out this round.
    pub(super) async fn rollout(
        &mut self,
        input: &mut engine::EngineInput,
        spec_groups: &[crate::api::ResolvedGroup],
        groups: &[crate::api::ResolvedGroup],
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
        reports: &HashMap<String, Report>,
    ) -> RolloutOutcome {
        self.restart_failures().await;
        self.push_superuser_access(pods, secrets, reports);
        let desired = crate::protocol::names::parameters_hash(&self.cluster.spec.parameters);
        let names: Vec<String> = groups.iter().flat_map(|g| g.instance_names()).collect();
        let views: Vec<rollout::InstanceView> = names
            .iter()
            .filter(|name| input.instance(name).is_some_and(|i| input.is_fresh(i)))
            .filter_map(|name| {
                let status = &reports.get(name)?.status;
                Some(rollout::InstanceView {
                    name: name.clone(),
                    role: status.role,
                    streaming: status
                        .wal_receiver
                        .as_ref()
                        .is_some_and(|w| w.status.is_streaming()),
                    parameters_hash: status.parameters_hash.clone(),
                    pending_restart: status.pending_restart.clone(),
                })
            })
            .collect();
        let primary = input.lease.holder.clone().filter(|holder| {
            views
                .iter()
                .any(|v| v.name == *holder && v.role == crate::protocol::api::Role::Primary)
        });

        // Scale-down: the primary must not be among the removed instances.
        let extra = rollout::retained_extra(spec_groups, groups);
        let mut scaling = false;
        if let Some(p) = &primary
            && extra.contains(p)
        {
            scaling = true;
            if input.memory.switchover.is_none() {
                let candidates = rollout::scale_down_candidates(spec_groups, &views);
                let why = format!("{p} is removed by the scale-down");
                self.switchover_for(input, &candidates, "ScaleDownSwitchover", why)
                    .await;
            }
        }
        if let Some(p) = &primary {
            self.drop_removed_slots(p, pods, secrets).await;
        }

        // A restart that never came back stops blocking the rollout's bookkeeping (nothing else
        // restarts while that instance does not stream: the plan waits for a healthy cluster).
        if let (Some(instance), Some(started)) = (
            self.runtime.rollout.restarting.clone(),
            self.runtime.rollout.restart_started,
        ) && started.elapsed() > RESTART_STALLED
        {
            self.runtime.rollout.restarting = None;
            let note = format!(
                "{instance} is not back {} s after its restart",
                started.elapsed().as_secs()
            );
            tracing::warn!(%instance, "restart stalled");
            self.context
                .publish(self.cluster, EventType::Warning, "RestartStalled", note)
                .await;
        }
        let restarting = self.runtime.rollout.restarting.clone();
        let lowered = primary
            .as_ref()
            .and_then(|p| reports.get(p))
            .and_then(|r| r.status.pending_restart_running.as_ref())
            .map(|running| rollout::lowered_minimums(running, &self.cluster.spec.parameters))
            .unwrap_or_default();
        let plan = rollout::plan(&rollout::RolloutInput {
            desired_hash: &desired,
            primary: primary.as_deref(),
            instances: &views,
            desired_instances: names.len(),
            restarting: restarting.as_deref(),
            role_change_in_progress: input.memory.switchover.is_some() || scaling,
            primary_first: !lowered.is_empty(),
        });
        self.push_parameters(&plan.push, pods, secrets).await;
        if let Some(done) = &plan.restart_finished {
            self.runtime.rollout.restarting = None;
            tracing::info!(instance = %done, "restarted for its parameters");
            let note = format!("{done} is back after its restart, with nothing pending");
            self.context
                .publish(self.cluster, EventType::Normal, "InstanceRestarted", note)
                .await;
        }
        let mut busy = false;
        match &plan.step {
            rollout::RolloutStep::Restart { instance, primary } => {
                busy = true;
                self.restart_instance(instance, *primary, pods, secrets, reports)
                    .await;
            }
            rollout::RolloutStep::Switchover { from, candidates } => {
                if input.memory.switchover.is_none() {
                    let why = format!("{from} needs a restart for its parameters");
                    self.switchover_for(input, candidates, "SwitchoverForRestart", why)
                        .await;
                }
            }
            rollout::RolloutStep::Applied => {
                if self.runtime.rollout.applied_hash.as_deref() != Some(desired.as_str()) {
                    self.runtime.rollout.applied_hash = Some(desired.clone());
                    let note = format!("every instance runs the parameters {desired}");
                    self.context
                        .publish(self.cluster, EventType::Normal, "ParametersApplied", note)
                        .await;
                }
            }
            rollout::RolloutStep::Wait { .. } => {}
        }
        RolloutOutcome {
            condition: rollout::condition(&plan.step),
            busy,
        }
    }

    fn agent(
        &self,
        instance: &str,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
        timeout: Duration,
    ) -> Option<crate::protocol::client::AgentClient> {
        let url = pods.get(instance).and_then(PodView::agent_url)?;
        let tls = self.runtime.tls.current();
        super::tls::agent_client(tls.as_deref(), url, secrets.agent_token.clone())
            .map(|c| c.with_action_timeout(timeout))
    }

    /// Sends the spec's parameters to every agent in `instances` at once.
    async fn push_parameters(
        &mut self,
        instances: &[String],
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
    ) {
        let request = crate::protocol::api::ParametersRequest {
            parameters: self.cluster.spec.parameters.clone(),
        };
        let clients: Vec<_> = instances
            .iter()
            .filter_map(|i| Some((i.clone(), self.agent(i, pods, secrets, PARAMETERS_TIMEOUT)?)))
            .collect();
        let results = futures::future::join_all(clients.into_iter().map(|(instance, client)| {
            let request = &request;
            async move { (instance, client.parameters(request).await) }
        }))
        .await;
        for (instance, result) in results {
            let (type_, reason, note) = match result {
                Ok(response) => {
                    tracing::info!(%instance, message = %response.message, "parameters sent");
                    (
                        EventType::Normal,
                        "ParametersReloaded",
                        format!("{instance}: {}", response.message),
                    )
                }
                Err(error) => {
                    tracing::warn!(%instance, %error, "failed to send the parameters");
                    (
                        EventType::Warning,
                        "ParametersFailed",
                        format!("failed to send the parameters to {instance}: {error}"),
                    )
                }
            };
            let key = format!("{reason}/{instance}");
            if self.runtime.last_events.get(&key) != Some(&note) {
                self.runtime.last_events.insert(key, note.clone());
                self.context
                    .publish(self.cluster, type_, reason, note)
                    .await;
            }
        }
    }

    /// Restarts one instance's postgres (the round waits: one restart at a time anyway).
    async fn restart_instance(
        &mut self,
        instance: &str,
        primary: bool,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
        reports: &HashMap<String, Report>,
    ) {
        let pending = reports
            .get(instance)
            .and_then(|r| r.status.pending_restart.clone())
            .unwrap_or_default()
            .join(", ");
        let role = if primary {
            "the primary, in place"
        } else {
            "a standby"
        };
        tracing::info!(%instance, %pending, primary, "restarting for parameters");
        let note = format!("restarting {instance} ({role}) for {pending}");
        self.context
            .publish(self.cluster, EventType::Normal, "RestartingInstance", note)
            .await;
        self.runtime.rollout.restarting = Some(instance.to_string());
        self.runtime.rollout.restart_started = Some(Instant::now());
        // In the background: a restart (stop, start, recovery) may take minutes and must not
        // hold the cluster's round; a failure is taken in by the next round.
        let client = self.agent(instance, pods, secrets, RESTART_TIMEOUT);
        let failures = self.runtime.rollout.restart_failures.clone();
        let instance = instance.to_string();
        tokio::spawn(async move {
            let result = match client {
                Some(client) => client.restart().await.map_err(|e| e.to_string()),
                None => Err("its pod has no IP".to_string()),
            };
            if let Err(error) = result {
                tracing::warn!(%instance, %error, "restart failed");
                if let Ok(mut failures) = failures.lock() {
                    failures.push((instance, error));
                }
            }
        });
    }

    /// Restarts that failed since the last round: the rollout no longer waits for them.
    async fn restart_failures(&mut self) {
        let failed = self
            .runtime
            .rollout
            .restart_failures
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        for (instance, error) in failed {
            if self.runtime.rollout.restarting.as_deref() == Some(instance.as_str()) {
                self.runtime.rollout.restarting = None;
            }
            let note = format!("restart of {instance} failed: {error}");
            self.context
                .publish(self.cluster, EventType::Warning, "RestartFailed", note)
                .await;
        }
    }

    /// Plans a switchover to the first candidate the engine accepts; an Event says why.
    async fn switchover_for(
        &mut self,
        input: &mut engine::EngineInput,
        candidates: &[String],
        reason: &'static str,
        why: String,
    ) {
        let mut refusals = Vec::new();
        for candidate in candidates {
            match engine::plan_switchover(input, Some(candidate)) {
                Ok(plan) => {
                    let note = format!("{why}: switching over from {} to {}", plan.from, plan.to);
                    tracing::info!(from = %plan.from, to = %plan.to, reason, "switchover planned");
                    input.memory.switchover = Some(plan);
                    self.context
                        .publish(self.cluster, EventType::Normal, reason, note)
                        .await;
                    return;
                }
                Err(refusal) => refusals.push(format!("{candidate}: {refusal}")),
            }
        }
        let note = if refusals.is_empty() {
            format!("{why}, but no standby is ready to take over")
        } else {
            format!(
                "{why}, but no standby can take over ({})",
                refusals.join("; ")
            )
        };
        let key = format!("{reason}Waiting");
        if self.runtime.last_events.get(&key) != Some(&note) {
            self.runtime.last_events.insert(key.clone(), note.clone());
            self.context
                .publish(self.cluster, EventType::Warning, &key, note)
                .await;
        }
    }

    /// Drops the replication slots of removed instances on the primary once their pods are
    /// gone (an active slot is left for the next round).
    async fn drop_removed_slots(
        &mut self,
        primary: &str,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
    ) {
        let gone: Vec<String> = self
            .runtime
            .rollout
            .slots_to_drop
            .iter()
            .filter(|n| !pods.contains_key(*n))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        let slots: Vec<String> = gone
            .iter()
            .map(|n| crate::protocol::names::slot_name_for(n))
            .collect();
        let Some(agent) = self.agent(primary, pods, secrets, DROP_SLOTS_TIMEOUT) else {
            return;
        };
        match drop_slots(&agent, &slots).await {
            Ok(dropped) => {
                for instance in &gone {
                    self.runtime.rollout.slots_to_drop.remove(instance);
                }
                if !dropped.is_empty() {
                    tracing::info!(
                        ?dropped,
                        "dropped the replication slots of removed instances"
                    );
                    let note = format!(
                        "dropped replication slots {} on {primary}",
                        dropped.join(", ")
                    );
                    self.context
                        .publish(
                            self.cluster,
                            EventType::Normal,
                            "ReplicationSlotDropped",
                            note,
                        )
                        .await;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "failed to drop the replication slots of removed instances");
            }
        }
    }
}

/// How long dropping the slots of removed instances may take.
const DROP_SLOTS_TIMEOUT: Duration = Duration::from_secs(3);

/// Drops the slots of removed instances through the primary's agent; returns those dropped.
/// An active slot (its standby still streams) fails the call, to be retried.
async fn drop_slots(
    agent: &crate::protocol::client::AgentClient,
    slots: &[String],
) -> Result<Vec<String>, String> {
    let request = crate::protocol::statements::DropSlotsRequest {
        slots: slots.to_vec(),
    };
    agent
        .drop_slots(&request, DROP_SLOTS_TIMEOUT)
        .await
        .map(|response| response.dropped)
        .map_err(|e| e.to_string())
}
