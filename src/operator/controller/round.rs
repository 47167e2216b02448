//! One round of the shared control loop on Kubernetes: the Lease first, then the pods and the
//! agents; the fencing annotation and planned switchovers shape the engine's input; the
//! decision is persisted and carried out by the loop; then the pod labels that the Services
//! select, Events and the status.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt as _};

use crate::api::{PgReplicaSet, engine_spec, resolve_groups};
use crate::control::{self, Report};
use crate::coordination::KubeLeaseStore;
use crate::engine::{self, ObservedRole};
use crate::operator::build::{ClusterSecrets, names};
use crate::operator::fence::{self, FenceRequest};
use crate::operator::labels;
use crate::operator::rollout;
use crate::operator::status::{self, SeenAt, StatusInput};
use crate::protocol::api::Role;

use super::pipeline::{Reconciler, bounded};
use super::platform::KubePlatform;
use super::{ReconcileError, now_time};

/// How long a round waits for a promoting agent to report the change (bounded again by a
/// quarter of the lease duration).
const PROMOTION_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Long-polls `instance`'s agent until it reports itself primary (each answer a change of
/// its status, kept as its report; other changes, e.g. its upstream cleared, are waited
/// through) or `wait` passed; true when it is primary.
async fn wait_for_promotion(
    platform: &KubePlatform<'_>,
    shared: &crate::control::Shared,
    instance: &str,
    reports: &HashMap<String, Report>,
    wait: std::time::Duration,
) -> bool {
    let Some(last) = reports.get(instance) else {
        return false;
    };
    let Some(client) = platform
        .pods
        .get(instance)
        .and_then(crate::operator::pods::PodView::agent_url)
        .and_then(|url| {
            super::tls::agent_client(platform.tls.as_deref(), url, platform.token.to_string())
        })
        .map(|client| client.with_fallback_token(platform.previous_token.clone()))
    else {
        return false;
    };
    let started = std::time::Instant::now();
    let mut token = last.status.change_token();
    let mut role = last.status.role;
    while role != Role::Primary {
        let Some(left) = wait.checked_sub(started.elapsed()).filter(|l| !l.is_zero()) else {
            break;
        };
        let asked_at = shared.now();
        match client.status_on_change(&token, left).await {
            Ok(status) => {
                role = status.role;
                // The freshest report of the instance (as of the request, conservatively).
                shared
                    .reports()
                    .answered(instance, asked_at, status.clone());
                // Unchanged: the wait is over (or the agent does not long-poll).
                if std::mem::replace(&mut token, status.change_token()) == token {
                    break;
                }
            }
            Err(error) => {
                tracing::debug!(%instance, %error, "failed to long-poll the promoting agent");
                break;
            }
        }
    }
    tracing::info!(
        %instance,
        role = ?role,
        waited_ms = started.elapsed().as_millis() as u64,
        "promotion watched"
    );
    role == Role::Primary
}

/// A switchover request taken in by a round: its Event's note when a plan was made, and
/// whether the annotation is to be removed.
struct SwitchoverRequest {
    note: Option<String>,
    annotated: bool,
}

/// What a round tells the reconcile.
pub(super) struct RoundResult {
    /// The next round should come quickly (a failover, switchover, bootstrap or rollout is
    /// under way, or the round acted).
    pub urgent: bool,
    /// A failover or switchover step ran inline (a demotion, a Lease write): the next step
    /// can be decided at once, in the same reconcile.
    pub again: bool,
    /// The round long-polled a promoting agent (once per reconcile: it holds the reconcile).
    pub waited: bool,
    /// The long poll saw the promoted agent primary (its answer is its freshest report).
    pub promoted: bool,
}

/// How a round runs.
#[derive(Debug, Clone, Copy)]
pub(super) struct RoundMode {
    /// Run at once after the previous round of the same reconcile: the object the reconcile
    /// read is no longer fresh (its switchover annotation was already taken in).
    pub chained: bool,
    /// A promotion under way may be waited for (bounded, [`PROMOTION_WAIT`]).
    pub may_wait: bool,
    /// Ask every agent for its status (else the round decides on the reports it has, each
    /// within the engine's staleness bound: right after a long poll saw the promotion).
    pub poll: bool,
}

impl Reconciler<'_> {
    /// Observe → engine → act → status, as `mode` says.
    pub(super) async fn round(
        &mut self,
        secrets: &ClusterSecrets,
        tls: Option<Arc<super::tls::ClusterTls>>,
        lease_store: Arc<KubeLeaseStore>,
        mode: RoundMode,
    ) -> Result<RoundResult, ReconcileError> {
        let name = self.name();
        let spec = &self.cluster.spec;
        let lease = self
            .runtime
            .control
            .read_lease(lease_store.as_ref())
            .await?;
        // A scale-down keeps the instances up to the primary until it moved (`rollout`).
        let spec_groups = resolve_groups(&name, spec);
        let groups = rollout::retained_groups(&spec_groups, lease.holder.as_deref());
        let instances: Vec<String> = groups.iter().flat_map(|g| g.instance_names()).collect();
        self.forget_removed(&instances);
        let pods = self.pods().await?;
        let previous_token = self.token_fallback(&secrets.agent_token);
        let platform = KubePlatform {
            client: &self.context.client,
            cluster: self.cluster,
            pods: &pods,
            token: &secrets.agent_token,
            previous_token,
            tls,
            lease: lease_store.clone(),
            events: Mutex::new(Vec::new()),
        };
        let mut observation = self
            .runtime
            .control
            .observe(
                &platform,
                lease.clone(),
                &instances,
                engine_spec(&name, spec),
                mode.poll,
            )
            .await?;
        let unchanged_since = observation.input.lease.unchanged_since;
        self.context.metrics.clusters.observe_lease(
            &self.namespace(),
            &name,
            lease.holder.as_deref(),
            &lease.version,
            observation.input.now.saturating_since(unchanged_since),
            lease.duration,
        );
        let reports = self.runtime.control.shared().reports().snapshot();

        let fence_request = FenceRequest::parse(
            self.cluster
                .annotations()
                .get(fence::ANNOTATION_FENCE)
                .map(String::as_str),
            &instances,
        );
        fence::restrict_input(&mut observation.input, &fence_request);
        // The SwitchoverRequested Event and the annotation's removal come after the actions:
        // the demotion does not wait for them.
        let requested = if mode.chained {
            None
        } else {
            self.request_switchover(&mut observation.input).await
        };
        let rollout_outcome = self
            .rollout(
                &mut observation.input,
                &spec_groups,
                &groups,
                &pods,
                secrets,
                &reports,
            )
            .await;
        let mut decision = engine::decide(&observation.input);
        fence::restrict_decision(&mut decision, &observation.input, &fence_request);
        if let Some(first) = self.bootstrap_primary(
            &observation.input,
            &decision,
            &groups,
            &fence_request,
            &pods,
        ) {
            tracing::info!(instance = %first, "bootstrapping: taking the lease for the first primary");
            let note = format!("taking the lease for {first}, the first primary");
            self.context
                .publish(self.cluster, EventType::Normal, "Bootstrapping", note)
                .await;
            decision.actions.push(engine::Action::AcquireLease {
                holder: first,
                expected_version: lease.version.clone(),
            });
        }

        // The labels follow the observed serving primary, not the actions: they are patched
        // before the actions run, so that `-rw` does not wait for the sync setting or a rejoin.
        let switched = self
            .relabel(&decision, &reports, &pods, &fence_request)
            .await?;
        let acted = self
            .runtime
            .control
            .act(&platform, &observation, &decision)
            .await;
        let mut pending = platform.take_events();
        pending.extend(
            requested
                .as_ref()
                .and_then(|r| r.note.clone())
                .map(|note| (EventType::Normal, "SwitchoverRequested".to_string(), note)),
        );
        pending
            .extend(switched.map(|note| (EventType::Normal, "ServiceSwitched".to_string(), note)));
        // Off the failover path: the Events of the round are sent together.
        futures::future::join_all(pending.into_iter().map(|(type_, reason, note)| {
            let (context, cluster) = (self.context, self.cluster);
            async move { context.publish(cluster, type_, &reason, note).await }
        }))
        .await;
        let outcome = acted?;
        if requested.is_some_and(|r| r.annotated) {
            self.remove_switchover_annotation().await?;
        }
        let last_holder = self.runtime.control.state().last_holder.clone();
        if self.runtime.failover.track(
            &decision,
            lease.holder.is_none(),
            last_holder.as_deref(),
            &pods,
            now_time(),
        ) {
            self.context
                .metrics
                .failovers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.fence_events(&fence_request).await;

        let reports = self.runtime.control.shared().reports().snapshot();

        let generation = self.cluster.metadata.generation.unwrap_or_default();
        let seen_at = seen_at(&reports, observation.input.now);
        let mut new_status = status::cluster_status(&StatusInput {
            generation,
            groups: &groups,
            reports: &reports,
            seen_at: &seen_at,
            decision: &decision,
            never_served: !self.runtime.failover.ever_served(),
            lag_alert_seconds: f64::from(spec.monitoring.lag_alert_seconds),
            last_failover: self.runtime.failover.last().cloned(),
            fenced: &fence_request.fenced,
            unobserved: &observation
                .input
                .instances
                .iter()
                .filter(|i| !i.reachable)
                .map(|i| i.name.clone())
                .collect(),
        });
        new_status
            .conditions
            .push(rollout_outcome.condition(generation));
        if let Some(previous) = &self.cluster.status {
            status::keep_transition_times(&mut new_status.conditions, &previous.conditions);
        }
        self.lag_events(&new_status, f64::from(spec.monitoring.lag_alert_seconds))
            .await;
        self.context.metrics.clusters.observe_status(
            &self.namespace(),
            &name,
            &new_status,
            crate::metrics::operator::wal_receivers(reports.iter().map(|(n, r)| (n, &r.status))),
        );
        self.write_status(&new_status).await?;
        if let Some(error) = outcome.error {
            return Err(error.into());
        }
        // A promotion under way: wait for its agent to report the change (a long poll),
        // then the next round labels the new primary at once.
        let promoting = decision.actions.iter().find_map(|action| match action {
            engine::Action::Promote { instance } => Some(instance.clone()),
            _ => None,
        });
        let waited = promoting.is_some() && mode.may_wait;
        let promoted = match promoting {
            Some(instance) if mode.may_wait => {
                let wait = PROMOTION_WAIT.min(lease.duration / 4);
                let shared = self.runtime.control.shared().clone();
                wait_for_promotion(&platform, &shared, &instance, &reports, wait).await
            }
            _ => false,
        };
        Ok(RoundResult {
            again: (outcome.urgent && outcome.acted) || promoted,
            waited,
            promoted,
            urgent: outcome.urgent
                || decision.status.phase == engine::Phase::Bootstrapping
                || !decision.actions.is_empty()
                || rollout_outcome.busy,
        })
    }

    /// Bootstrap: nobody holds the Lease, nothing runs, the engine waits for a primary. The
    /// operator names the first primary by taking the Lease for it (`status.currentPrimary`
    /// when the cluster ran before, else the first instance of the first group that may be
    /// primary); that agent initializes (or reuses its data), the others clone from it.
    fn bootstrap_primary(
        &self,
        input: &engine::EngineInput,
        decision: &engine::Decision,
        groups: &[crate::api::ResolvedGroup],
        fence_request: &FenceRequest,
        pods: &HashMap<String, crate::operator::pods::PodView>,
    ) -> Option<String> {
        let nothing_runs = input
            .instances
            .iter()
            .all(|i| !matches!(i.role, ObservedRole::Primary | ObservedRole::Replica));
        if input.lease.holder.is_some()
            || !decision.actions.is_empty()
            || decision.status.phase != engine::Phase::Bootstrapping
            || !nothing_runs
        {
            return None;
        }
        let names: Vec<String> = groups.iter().flat_map(|g| g.instance_names()).collect();
        self.cluster
            .status
            .as_ref()
            .and_then(|s| s.current_primary.clone())
            .filter(|p| names.contains(p))
            .or_else(|| {
                groups
                    .iter()
                    .find(|g| g.failover_priority > 0 && g.replicas > 0)
                    .and_then(|g| g.instance_names().into_iter().next())
            })
            // A fenced instance is never made the first primary either.
            .filter(|f| pods.contains_key(f) && !fence_request.is_fenced(f))
    }

    /// Labels: `-rw` selects the serving holder only; `-ro` the replicas within the limit.
    /// Returns the note of a `ServiceSwitched` Event when the primary's pod gained the label.
    async fn relabel(
        &mut self,
        decision: &engine::Decision,
        reports: &HashMap<String, Report>,
        pods: &HashMap<String, crate::operator::pods::PodView>,
        fence_request: &FenceRequest,
    ) -> Result<Option<String>, ReconcileError> {
        let max_lag = self.cluster.spec.monitoring.read_replica_max_lag_bytes;
        let primary = decision.status.primary.clone();
        let primary_report = primary.as_ref().and_then(|p| reports.get(p));
        let mut replicas = BTreeSet::new();
        let mut readable = BTreeSet::new();
        for (instance, report) in reports {
            if Some(instance) == primary.as_ref() || report.status.role != Role::Replica {
                continue;
            }
            replicas.insert(instance.clone());
            let lag =
                primary_report.and_then(|p| control::standby_lag(&p.status, &report.status).0);
            if lag.is_some_and(|l| l <= max_lag) {
                readable.insert(instance.clone());
            }
        }
        let changes = labels::desired_labels(
            pods,
            primary.as_deref(),
            &replicas,
            &readable,
            &fence_request.fenced,
        );
        if changes.is_empty() {
            return Ok(None);
        }
        let api: Api<Pod> = Api::namespaced(self.context.client.clone(), &self.namespace());
        // Both groups of patches (losers first) within one bound: an interrupted relabel only
        // leaves labels missing, which the next round adds.
        bounded(
            || format!("relabelling the pods of {}", self.name()),
            labels::relabel(&api, &changes),
        )
        .await??;
        let gained = primary.as_ref().is_some_and(|p| {
            changes
                .get(p)
                .and_then(|c| c.get(names::LABEL_ROLE))
                .is_some_and(|v| v.as_deref() == Some(names::ROLE_PRIMARY))
        });
        Ok(match &primary {
            Some(p) if gained && self.runtime.failover.service_switched(p, now_time()) => Some(
                format!("{p} is selected by {}", names::rw_service(&self.name())),
            ),
            _ => None,
        })
    }

    /// A planned switchover, from the annotation `pgrs.dev/switchover-to` (removed once read)
    /// or `spec.switchover.targetInstance` (kept: the desired primary), becomes the engine's
    /// plan; the engine demotes the primary, hands the Lease over and promotes the target.
    async fn request_switchover(
        &mut self,
        input: &mut engine::EngineInput,
    ) -> Option<SwitchoverRequest> {
        let annotated = self
            .cluster
            .annotations()
            .get(names::ANNOTATION_SWITCHOVER_TO)
            .cloned();
        let target = annotated.clone().or_else(|| {
            self.cluster
                .spec
                .switchover
                .as_ref()
                .map(|s| s.target_instance.clone())
        });
        let mut note = None;
        if let Some(target) = target
            && input.lease.holder.as_deref() != Some(target.as_str())
            && input.memory.switchover.is_none()
        {
            match engine::plan_switchover(input, Some(&target)) {
                Ok(plan) => {
                    tracing::info!(from = %plan.from, to = %plan.to, "switchover requested");
                    note = Some(format!(
                        "switchover from {} to {} requested",
                        plan.from, plan.to
                    ));
                    input.memory.switchover = Some(plan);
                }
                Err(refusal) => {
                    let note = format!("switchover to {target} refused: {refusal}");
                    self.publish_once(
                        EventType::Warning,
                        "SwitchoverRefused",
                        "SwitchoverRefused",
                        note,
                    )
                    .await;
                }
            }
        }
        (annotated.is_some() || note.is_some()).then(|| SwitchoverRequest {
            note,
            annotated: annotated.is_some(),
        })
    }

    /// Removes `pgrs.dev/switchover-to` once its plan was recorded.
    async fn remove_switchover_annotation(&self) -> Result<(), ReconcileError> {
        let api: Api<PgReplicaSet> =
            Api::namespaced(self.context.client.clone(), &self.namespace());
        let body = serde_json::json!({
            "metadata": { "annotations": { names::ANNOTATION_SWITCHOVER_TO: null } }
        });
        let name = self.name();
        let (params, patch) = (PatchParams::default(), Patch::Merge(&body));
        bounded(
            || format!("removing the switchover annotation of PgReplicaSet {name}"),
            api.patch(&name, &params, &patch),
        )
        .await?
        .map_err(|source| ReconcileError::Apply {
            kind: "PgReplicaSet",
            name: self.name(),
            source,
        })?;
        Ok(())
    }

    /// Publishes an Event unless the last one under `key` had the same note.
    pub(super) async fn publish_once(
        &mut self,
        type_: EventType,
        key: &str,
        reason: &str,
        note: String,
    ) {
        if self.runtime.last_events.get(key) == Some(&note) {
            return;
        }
        self.runtime
            .last_events
            .insert(key.to_string(), note.clone());
        self.context
            .publish(self.cluster, type_, reason, note)
            .await;
    }
}

/// When each report was asked for, on the wall clock (for `lastSeen`): derived from the
/// loop's monotonic clock.
fn seen_at(reports: &HashMap<String, Report>, now: engine::MonoTime) -> SeenAt {
    let wall = chrono::Utc::now();
    reports
        .iter()
        .map(|(name, report)| {
            let age = now.saturating_since(report.asked_at);
            let age = chrono::Duration::from_std(age).unwrap_or_default();
            (name.clone(), wall - age)
        })
        .collect()
}
