//! `status.lastFailover` as the steps happen: detected (the serving primary was lost), fenced
//! (the old holder's Lease was released or expired: the takeover needs it), promoted (the
//! new holder serves), Service switched (its pod gained the primary label). Pure: the wall
//! clock is an argument.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{FailoverRecord, PgReplicaSetStatus};
use crate::engine::{Decision, Phase};
use crate::operator::pods::PodView;

/// What the failover record is built from, kept between rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct FailoverTracker {
    last: Option<FailoverRecord>,
    /// When the serving primary was last lost, for `detectedAt`.
    primary_lost_at: Option<Time>,
    primary_was_deleted: bool,
    /// (name, uid) of the Lease holder's pod as last seen not being deleted.
    holder_pod_uid: Option<(String, String)>,
    ever_served: bool,
    /// `status.currentPrimary` when the tracker was created: the failover's `from` when the
    /// engine has not seen a primary yet (a new operator leader whose first round finds the
    /// Lease already released).
    previous_primary: Option<String>,
}

impl FailoverTracker {
    pub fn new(previous: Option<&PgReplicaSetStatus>) -> Self {
        FailoverTracker {
            last: previous.and_then(|s| s.last_failover.clone()),
            ever_served: previous.is_some_and(|s| s.current_primary.is_some()),
            previous_primary: previous.and_then(|s| s.current_primary.clone()),
            ..FailoverTracker::default()
        }
    }

    pub fn last(&self) -> Option<&FailoverRecord> {
        self.last.as_ref()
    }

    pub fn ever_served(&self) -> bool {
        self.ever_served
    }

    /// Takes in one round's decision. `last_holder` is the holder as last seen, `lease_free`
    /// whether nobody holds the Lease now. Returns whether a new failover (or switchover) began.
    pub fn track(
        &mut self,
        decision: &Decision,
        lease_free: bool,
        last_holder: Option<&str>,
        pods: &HashMap<String, PodView>,
        now: Time,
    ) -> bool {
        // The holder's pod is being deleted (or gone): remembered until a failover consumes it
        // or the holder serves again from a pod that is not being deleted. Deleted: stopping,
        // gone, or recreated under the same name (another uid) before any round saw it
        // stopping.
        let holder_pod_deleted = match last_holder.map(|holder| pods.get(holder)) {
            Some(None) => true,
            Some(Some(pod)) => {
                let recreated = matches!(
                    (&self.holder_pod_uid, &pod.uid),
                    (Some((name, old)), Some(new)) if *name == pod.name && old != new
                );
                if !pod.deleting {
                    self.holder_pod_uid = pod.uid.clone().map(|uid| (pod.name.clone(), uid));
                }
                pod.deleting || recreated
            }
            None => false,
        };
        if holder_pod_deleted {
            self.primary_was_deleted = true;
        }
        match &decision.status.primary {
            Some(primary) => {
                self.ever_served = true;
                self.primary_lost_at = None;
                if !holder_pod_deleted {
                    self.primary_was_deleted = false;
                }
                if let Some(record) = self.last.as_mut()
                    && record.to == *primary
                    && record.promoted_at.is_none()
                {
                    record.promoted_at = Some(now.clone());
                }
            }
            None if self.ever_served && self.primary_lost_at.is_none() => {
                self.primary_lost_at = Some(now.clone());
            }
            None => {}
        }
        let Some(choice) = &decision.status.failover else {
            return false;
        };
        let is_new = self
            .last
            .as_ref()
            .is_none_or(|r| r.to != choice.to || r.promoted_at.is_some());
        if !is_new {
            return false;
        }
        let reason = if decision.status.phase == Phase::SwitchingOver {
            "Switchover"
        } else if self.primary_was_deleted {
            "PrimaryPodDeleted"
        } else if lease_free {
            "PrimaryStopped"
        } else {
            "PrimaryUnreachable"
        };
        self.primary_was_deleted = false;
        self.last = Some(FailoverRecord {
            reason: reason.to_string(),
            detected_at: self.primary_lost_at.clone().or_else(|| Some(now.clone())),
            // The takeover needs the old holder's lease released or expired: from here on it
            // no longer accepts writes.
            fenced_at: Some(now),
            promoted_at: None,
            service_switched_at: None,
            from: choice
                .from
                .clone()
                .or_else(|| self.previous_primary.clone())
                .filter(|from| *from != choice.to),
            to: choice.to.clone(),
            lsn_gap_bytes: choice.lsn_gap_bytes,
        });
        true
    }

    /// `primary`'s pod just gained the primary label: returns whether that completes the last
    /// failover's record.
    pub fn service_switched(&mut self, primary: &str, now: Time) -> bool {
        match self.last.as_mut() {
            Some(record) if record.to == primary && record.service_switched_at.is_none() => {
                record.service_switched_at = Some(now);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ClusterStatus, FailoverChoice, Memory};

    fn decision(phase: Phase, primary: Option<&str>, failover_to: Option<&str>) -> Decision {
        Decision {
            actions: Vec::new(),
            events: Vec::new(),
            status: ClusterStatus {
                phase,
                primary: primary.map(str::to_string),
                message: String::new(),
                lease_expires_in: None,
                failover: failover_to.map(|to| FailoverChoice {
                    from: Some("pg-0".to_string()),
                    to: to.to_string(),
                    lsn_gap_bytes: Some(0),
                    data_loss_allowed: false,
                }),
                primary_lsn: None,
            },
            memory: Memory::default(),
        }
    }

    fn at(second: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(second).expect("time"))
    }

    #[test]
    fn a_deleted_primary_pod_gives_a_record_with_every_step() {
        let mut tracker = FailoverTracker::default();
        let pods = HashMap::new();
        assert!(!tracker.track(
            &decision(Phase::Healthy, Some("pg-0"), None),
            false,
            Some("pg-0"),
            &HashMap::from([(
                "pg-0".to_string(),
                PodView {
                    name: "pg-0".into(),
                    ip: None,
                    labels: Default::default(),
                    deleting: false,
                    uid: Some("u1".into()),
                    https: false,
                }
            )]),
            at(1)
        ));
        // The pod is gone; nobody serves.
        assert!(!tracker.track(
            &decision(Phase::PrimaryUnavailable, None, None),
            false,
            Some("pg-0"),
            &pods,
            at(2)
        ));
        assert!(tracker.track(
            &decision(Phase::FailingOver, None, Some("pg-1")),
            true,
            Some("pg-0"),
            &pods,
            at(3)
        ));
        let record = tracker.last().expect("record").clone();
        assert_eq!(record.reason, "PrimaryPodDeleted");
        assert_eq!(record.detected_at, Some(at(2)));
        assert_eq!(record.fenced_at, Some(at(3)));
        assert_eq!(record.from.as_deref(), Some("pg-0"));
        // The same failover seen again is not a new one; the promotion completes it.
        assert!(!tracker.track(
            &decision(Phase::FailingOver, None, Some("pg-1")),
            true,
            Some("pg-1"),
            &pods,
            at(4)
        ));
        tracker.track(
            &decision(Phase::Healthy, Some("pg-1"), None),
            false,
            Some("pg-1"),
            &pods,
            at(5),
        );
        assert_eq!(
            tracker.last().and_then(|r| r.promoted_at.clone()),
            Some(at(5))
        );
        assert!(tracker.service_switched("pg-1", at(6)));
        assert!(!tracker.service_switched("pg-1", at(7)), "recorded once");
    }
}
