//! The pod's status as the kubelet writes it: phase, conditions, container statuses, and
//! the reason a pod cannot start (with a Warning Event).

use k8s_openapi::api::core::v1::{Event, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use super::{FIELD_MANAGER, PodRun, StartFailure};
use crate::kubelet::runner::{Runner, now};

impl PodRun {
    /// Writes the status when it differs from what was last written.
    pub(super) async fn patch_status(&mut self, phase: &str) {
        let ip = self.iface.as_ref().map(|i| i.ip.to_string());
        let node_ip = self.ctx.config.node_ip.to_string();
        let main: Vec<&Runner> = self.runners.iter().filter(|r| !r.init).collect();
        let initialized = self
            .runners
            .iter()
            .filter(|r| r.init)
            .all(|r| r.terminated.as_ref().is_some_and(|t| t["exitCode"] == 0));
        let ready = !main.is_empty() && main.iter().all(|r| r.is_ready()) && phase == "Running";
        if ready != self.last_ready {
            self.last_ready = ready;
            self.ready_since = now();
        }
        let bool_str = |b: bool| if b { "True" } else { "False" };
        let conditions = vec![
            json!({"type": "PodReadyToStartContainers", "status": bool_str(ip.is_some()), "lastTransitionTime": self.start_time}),
            json!({"type": "Initialized", "status": bool_str(initialized), "lastTransitionTime": self.start_time}),
            json!({"type": "ContainersReady", "status": bool_str(ready), "lastTransitionTime": self.ready_since}),
            json!({"type": "Ready", "status": bool_str(ready), "lastTransitionTime": self.ready_since}),
        ];
        let mut status = json!({
            "phase": phase,
            "hostIP": node_ip,
            "hostIPs": [{"ip": node_ip}],
            "startTime": self.start_time,
            "conditions": conditions,
            "containerStatuses": main.iter().map(|r| r.status()).collect::<Vec<_>>(),
            // Clear a start failure reported earlier.
            "reason": null,
            "message": null,
        });
        if let Some(ip) = &ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        let init: Vec<Value> = self
            .runners
            .iter()
            .filter(|r| r.init)
            .map(Runner::status)
            .collect();
        if !init.is_empty() {
            status["initContainerStatuses"] = json!(init);
        }
        if status == self.last_patch {
            return;
        }
        let patch = json!({ "status": status });
        match self
            .api
            .patch_status(
                &self.name(),
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => self.last_patch = status,
            Err(e) => tracing::warn!(pod = %self.key, error = %e, "failed to write pod status"),
        }
    }

    pub(super) async fn report_failure(&mut self, failure: &StartFailure) {
        let waiting: Vec<Value> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| {
                json!({
                    "name": c.name,
                    "image": c.image,
                    "imageID": "",
                    "ready": false,
                    "restartCount": 0,
                    "state": {"waiting": {"reason": failure.reason, "message": failure.message}},
                })
            })
            .collect();
        let patch = json!({"status": {
            "phase": "Pending",
            "startTime": self.start_time,
            "message": failure.message,
            "reason": failure.reason,
            "containerStatuses": waiting,
        }});
        if let Err(e) = self
            .api
            .patch_status(
                &self.name(),
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Strategic(&patch),
            )
            .await
        {
            tracing::warn!(pod = %self.key, error = %e, "failed to write pod status");
        }
        let events: Api<Event> = Api::namespaced(self.ctx.client.clone(), &self.namespace());
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", self.name())),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: Some(self.name()),
                namespace: Some(self.namespace()),
                uid: self.pod.metadata.uid.clone(),
                ..Default::default()
            },
            reason: Some(failure.reason.to_owned()),
            message: Some(failure.message.clone()),
            type_: Some("Warning".to_owned()),
            reporting_component: Some(FIELD_MANAGER.to_owned()),
            reporting_instance: Some(self.ctx.config.node_name.clone()),
            event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            action: Some("StartPod".to_owned()),
            ..Default::default()
        };
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            tracing::warn!(pod = %self.key, error = %e, "failed to record event");
        }
    }
}
