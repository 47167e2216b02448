//! Events about instances rather than decisions: fenced and unfenced by the annotation, lag
//! above and back under `monitoring.lagAlertSeconds`.

use std::collections::BTreeSet;

use kube::runtime::events::EventType;

use crate::api::PgReplicaSetStatus;
use crate::operator::fence::{self, FenceRequest};
use crate::operator::status;

use super::pipeline::Reconciler;

impl Reconciler<'_> {
    /// Events when instances are fenced or unfenced by the annotation, or it names no instance.
    pub(super) async fn fence_events(&mut self, request: &FenceRequest) {
        let (fenced, unfenced) = fence::changes(&self.runtime.fenced, &request.fenced);
        self.runtime.fenced = request.fenced.clone();
        for instance in fenced {
            tracing::warn!(%instance, "fencing on request");
            let note = format!(
                "{instance} fenced on request ({}): postgres stopped, removed from every Service, excluded from failover",
                fence::ANNOTATION_FENCE
            );
            self.context
                .publish(self.cluster, EventType::Warning, "Fenced", note)
                .await;
        }
        for instance in unfenced {
            tracing::info!(%instance, "unfenced on request");
            let note = format!("{instance} unfenced: it rejoins as a replica");
            self.context
                .publish(self.cluster, EventType::Normal, "Unfenced", note)
                .await;
        }
        if !request.unknown.is_empty() {
            let note = format!(
                "{} names no instance of this cluster: {}",
                fence::ANNOTATION_FENCE,
                request.unknown.join(", ")
            );
            self.publish_once(
                EventType::Warning,
                "FenceUnknownInstance",
                "FenceUnknownInstance",
                note,
            )
            .await;
        }
    }

    /// `LagHigh` when a standby's replay lag goes above `monitoring.lagAlertSeconds`,
    /// `LagRecovered` when it comes back under it (or stops being a standby).
    pub(super) async fn lag_events(&mut self, new_status: &PgReplicaSetStatus, threshold: f64) {
        let lagging = status::lagging(new_status, threshold);
        let now: BTreeSet<String> = lagging.keys().cloned().collect();
        let (started, ended) = fence::changes(&self.runtime.lag_high, &now);
        self.runtime.lag_high = now;
        for instance in started {
            let seconds = lagging.get(&instance).copied().unwrap_or_default();
            tracing::warn!(%instance, lag_seconds = seconds, threshold, "replication lag above the alert threshold");
            let note = format!(
                "{instance} replays {seconds:.1}s behind the primary (monitoring.lagAlertSeconds: {threshold})"
            );
            self.context
                .publish(self.cluster, EventType::Warning, "LagHigh", note)
                .await;
        }
        for instance in ended {
            tracing::info!(%instance, threshold, "replication lag back under the alert threshold");
            let note = format!("{instance} is no longer more than {threshold}s behind the primary");
            self.context
                .publish(self.cluster, EventType::Normal, "LagRecovered", note)
                .await;
        }
    }
}
