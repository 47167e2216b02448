//! One round of decisions: observed cluster + lease + spec + memory → actions, events, status.
//!
//! Safety rules (from the design's fencing section), enforced here:
//! - `AcquireLease` for a new holder only when the lease is free (released or never held) or the
//!   old holder's lease has been observed unchanged for a full lease duration, and always with the
//!   observed version as precondition.
//! - `Promote` only for the lease holder, and never while another reachable instance reports
//!   itself a writable primary (that one is fenced first).
//! - Any reachable writable primary that is not the holder is fenced.

use std::time::Duration;

use super::Lsn;
use super::actions::{Action, ClusterStatus, Decision, Event, EventReason, FailoverChoice, Phase};
use super::candidate::{Candidate, choose_failover_candidate};
use super::model::{
    EngineInput, InstanceObservation, Memory, ObservedRole, PrimaryRecord, ReplicationMode,
};
use super::sync::{desired_sync, record_after_confirmation, widen};

struct Round<'a> {
    input: &'a EngineInput,
    actions: Vec<Action>,
    events: Vec<Event>,
    memory: Memory,
}

impl<'a> Round<'a> {
    fn status(
        &self,
        phase: Phase,
        primary: Option<&str>,
        message: impl Into<String>,
    ) -> ClusterStatus {
        ClusterStatus {
            phase,
            primary: primary.map(str::to_string),
            message: message.into(),
            lease_expires_in: None,
            failover: None,
            primary_lsn: None,
        }
    }

    fn finish(self, status: ClusterStatus) -> Decision {
        Decision {
            actions: self.actions,
            events: self.events,
            status,
            memory: self.memory,
        }
    }

    /// Fence every reachable writable primary except `allowed`; true if any was found.
    fn fence_rogues(&mut self, allowed: Option<&str>) -> bool {
        let rogues: Vec<&InstanceObservation> = self
            .input
            .instances
            .iter()
            .filter(|i| {
                self.input.is_fresh(i)
                    && i.is_writable_primary()
                    && Some(i.name.as_str()) != allowed
            })
            .collect();
        for rogue in &rogues {
            let reason = match allowed {
                Some(holder) => format!("reports itself primary but the lease holder is {holder}"),
                None => "reports itself primary but holds no lease".to_string(),
            };
            self.events.push(Event::warning(
                EventReason::Fencing,
                format!("fencing {}: {reason}", rogue.name),
            ));
            self.actions.push(Action::Fence {
                instance: rogue.name.clone(),
                reason,
            });
        }
        !rogues.is_empty()
    }

    /// Events and status for a chosen failover candidate; pushes the lease takeover.
    fn take_over(
        &mut self,
        from: Option<&str>,
        candidate: Candidate,
        phase: Phase,
    ) -> ClusterStatus {
        let from_text = from.unwrap_or("(no holder)");
        if let Some(refusal) = &candidate.overridden {
            self.events.push(Event::critical(
                EventReason::DataLossAllowed,
                format!(
                    "allowDataLoss is set: promoting {} although {refusal}; acknowledged writes may be lost",
                    candidate.name
                ),
            ));
        }
        let reason = if phase == Phase::SwitchingOver {
            EventReason::SwitchoverStarted
        } else {
            EventReason::FailoverStarted
        };
        self.events.push(Event::warning(
            reason,
            format!(
                "taking over the lease from {from_text} for {} (received {}, gap {})",
                candidate.name,
                candidate.received_lsn,
                candidate
                    .lsn_gap_bytes
                    .map_or("unknown".to_string(), |g| format!("{g} bytes")),
            ),
        ));
        self.actions.push(Action::AcquireLease {
            holder: candidate.name.clone(),
            expected_version: self.input.lease.version.clone(),
        });
        let mut status = self.status(
            phase,
            None,
            format!("taking over the lease for {}", candidate.name),
        );
        status.failover = Some(FailoverChoice {
            from: from.map(str::to_string),
            to: candidate.name,
            lsn_gap_bytes: candidate.lsn_gap_bytes,
            data_loss_allowed: candidate.overridden.is_some(),
        });
        status
    }

    /// Try a failover away from `failed` (None: the lease is free and nobody serves).
    fn failover(&mut self, failed: Option<&str>) -> ClusterStatus {
        if !self.input.spec.failover_enabled {
            return self.status(
                Phase::FailoverBlocked,
                None,
                "no primary is serving and automatic failover is disabled",
            );
        }
        match choose_failover_candidate(self.input, failed) {
            Ok(candidate) => self.take_over(failed, candidate, Phase::FailingOver),
            Err(refusal) => {
                let message = format!("failover refused: {refusal}");
                self.events.push(Event::warning(
                    EventReason::FailoverRefused,
                    message.clone(),
                ));
                self.status(Phase::FailoverBlocked, None, message)
            }
        }
    }

    /// The holder serves as primary: keep replicas, sync settings and any switchover moving.
    /// See [`holder_renews_unobserved`]: nothing to decide about the holder; it stays the
    /// primary of the status.
    fn renewing_unobserved(&mut self, holder: &str) -> ClusterStatus {
        let input = self.input;
        let last = input
            .instance(holder)
            .and_then(|h| h.last_seen_serving_at)
            .map(|seen| input.now.saturating_since(seen).as_millis());
        self.status(
            Phase::Degraded,
            Some(holder),
            format!(
                "{holder} keeps renewing its lease but its agent does not answer (last report {} ms ago): it still serves; a failover follows only if it stops renewing",
                last.unwrap_or_default()
            ),
        )
    }

    fn serving(&mut self, holder: &InstanceObservation) -> ClusterStatus {
        let input = self.input;
        if let Some(flush) = holder.flush_lsn {
            self.memory.last_primary = Some(PrimaryRecord {
                name: holder.name.clone(),
                timeline: holder.timeline,
                flush_lsn: flush,
            });
        }

        // Synchronous replication settings.
        let desired = desired_sync(input, &holder.name);
        let applied = holder.applied_sync.clone().map(|s| s.normalized());
        if applied.as_ref() == Some(&desired) {
            self.memory.recorded_sync = record_after_confirmation(
                input,
                &self.memory.recorded_sync,
                &desired,
                holder.flush_lsn,
            );
            if self.memory.sync_record_lost {
                self.events.push(Event::info(
                    EventReason::SyncQuorumChanged,
                    format!(
                        "the synchronous quorum is known again: {} confirmed '{}'",
                        holder.name,
                        desired.to_standby_names()
                    ),
                ));
                self.memory.sync_record_lost = false;
            }
        } else {
            self.memory.recorded_sync = widen(&self.memory.recorded_sync, &desired);
            if input.spec.mode == ReplicationMode::Sync
                || applied.as_ref().is_some_and(|a| a.is_synchronous())
            {
                self.events.push(Event::info(
                    EventReason::SyncQuorumChanged,
                    format!(
                        "setting synchronous_standby_names on {} to '{}'",
                        holder.name,
                        desired.to_standby_names()
                    ),
                ));
            }
            self.actions.push(Action::SetSynchronousStandbys {
                primary: holder.name.clone(),
                sync: desired,
            });
        }

        // Planned switchover away from the holder.
        let mut phase = Phase::Healthy;
        let mut message = format!("{} is primary", holder.name);
        if let Some(plan) = self.memory.switchover.clone() {
            if plan.to == holder.name {
                self.events.push(Event::info(
                    EventReason::SwitchoverCompleted,
                    format!("switchover from {} to {} completed", plan.from, plan.to),
                ));
                self.memory.switchover = None;
            } else if plan.from == holder.name {
                match super::switchover::check_target(input, &holder.name, &plan.to) {
                    Ok(()) => {
                        self.actions.push(Action::Demote {
                            instance: holder.name.clone(),
                        });
                        phase = Phase::SwitchingOver;
                        message = format!("demoting {} for a switchover to {}", plan.from, plan.to);
                    }
                    Err(error) => {
                        self.events.push(Event::warning(
                            EventReason::SwitchoverAbandoned,
                            format!("switchover to {} abandoned: {error}", plan.to),
                        ));
                        self.memory.switchover = None;
                    }
                }
            } else {
                self.memory.switchover = None;
            }
        }

        // Other instances follow the holder's own address.
        let mut all_streaming = true;
        for other in input.instances.iter().filter(|i| i.name != holder.name) {
            if !input.is_fresh(other) {
                all_streaming = false;
                continue;
            }
            match other.role {
                ObservedRole::Replica if other.postgres_up && other.former_primary => {
                    all_streaming = false;
                    self.actions.push(Action::Rejoin {
                        instance: other.name.clone(),
                        primary: holder.name.clone(),
                    });
                }
                ObservedRole::Replica if other.postgres_up => {
                    if other.upstream.as_deref() != Some(holder.name.as_str()) {
                        all_streaming = false;
                        let diverged = match (other.timeline, holder.timeline) {
                            (Some(replica_tl), Some(primary_tl)) => replica_tl > primary_tl,
                            _ => false,
                        };
                        self.actions.push(if diverged {
                            Action::Rejoin {
                                instance: other.name.clone(),
                                primary: holder.name.clone(),
                            }
                        } else {
                            Action::Follow {
                                instance: other.name.clone(),
                                primary: holder.name.clone(),
                            }
                        });
                    }
                }
                // A former primary (fenced, stopped, or still up and being fenced this round).
                ObservedRole::Fenced | ObservedRole::Stopped => {
                    all_streaming = false;
                    self.actions.push(Action::Rejoin {
                        instance: other.name.clone(),
                        primary: holder.name.clone(),
                    });
                }
                ObservedRole::Replica if !other.postgres_up => {
                    all_streaming = false;
                    self.actions.push(Action::Rejoin {
                        instance: other.name.clone(),
                        primary: holder.name.clone(),
                    });
                }
                _ => all_streaming = false,
            }
        }
        if phase == Phase::Healthy && !all_streaming {
            phase = Phase::Degraded;
            message = format!(
                "{} is primary; not every replica streams from it",
                holder.name
            );
        }
        let mut status = self.status(phase, Some(&holder.name), message);
        status.primary_lsn = holder.flush_lsn;
        status
    }
}

/// The holder's agent does not answer this observer, but the lease was written after the
/// holder last reported itself serving, recently (within the staleness window): the holder
/// renewed it, and a holder renews only while it serves. Its lease expiry still decides any
/// takeover; this only keeps the holder named as the primary (status, the write route).
fn holder_renews_unobserved(input: &EngineInput, holder: &str) -> bool {
    let Some(observation) = input.instance(holder) else {
        return false;
    };
    !input.is_fresh(observation)
        && observation
            .last_seen_serving_at
            .is_some_and(|seen| input.lease.unchanged_since > seen)
        && input.now.saturating_since(input.lease.unchanged_since) < input.spec.report_stale_after
}

/// Decide one round.
pub fn decide(input: &EngineInput) -> Decision {
    let mut round = Round {
        input,
        actions: Vec::new(),
        events: Vec::new(),
        memory: input.memory.clone(),
    };
    let holder_name = input.lease.holder.as_deref();
    let rogues = round.fence_rogues(holder_name);

    let status = match holder_name {
        Some(holder_name) => {
            let holder = input.instance(holder_name).filter(|h| input.is_fresh(h));
            match holder {
                Some(h) if h.is_writable_primary() => round.serving(h),
                Some(h) if h.role == ObservedRole::Replica && h.postgres_up => {
                    if rogues {
                        round.status(
                            Phase::FailingOver,
                            None,
                            format!("{holder_name} holds the lease; waiting for the fencing of another primary before promoting it"),
                        )
                    } else {
                        round.events.push(Event::warning(
                            EventReason::Promoting,
                            format!("promoting {holder_name}, the lease holder"),
                        ));
                        if input.spec.mode == ReplicationMode::Sync {
                            // Acknowledged commits must wait for standbys from the very first
                            // write on the new primary: set the quorum before promoting.
                            let desired = desired_sync(input, holder_name);
                            round.memory.recorded_sync =
                                widen(&round.memory.recorded_sync, &desired);
                            round.actions.push(Action::SetSynchronousStandbys {
                                primary: holder_name.to_string(),
                                sync: desired,
                            });
                        }
                        round.actions.push(Action::Promote {
                            instance: holder_name.to_string(),
                        });
                        let phase = if round.memory.switchover.is_some() {
                            Phase::SwitchingOver
                        } else {
                            Phase::FailingOver
                        };
                        round.status(phase, None, format!("promoting {holder_name}"))
                    }
                }
                _ if holder_renews_unobserved(input, holder_name) => {
                    round.renewing_unobserved(holder_name)
                }
                _ if !input.lease_expired() => {
                    let elapsed = input.now.saturating_since(input.lease.unchanged_since);
                    let remaining = input.lease_duration().saturating_sub(elapsed);
                    let mut status = round.status(
                        Phase::PrimaryUnavailable,
                        None,
                        format!(
                            "lease holder {holder_name} is not serving; its lease counts as expired in {} ms",
                            remaining.as_millis()
                        ),
                    );
                    status.lease_expires_in = Some(remaining);
                    status
                }
                _ if rogues => round.status(
                    Phase::FailingOver,
                    None,
                    "the lease expired; waiting for the fencing of a rogue primary",
                ),
                _ => {
                    // The old holder is gone for good: any planned switchover is moot.
                    if round.memory.switchover.take().is_some() {
                        round.events.push(Event::warning(
                            EventReason::SwitchoverAbandoned,
                            format!(
                                "switchover abandoned: lease holder {holder_name} stopped serving"
                            ),
                        ));
                    }
                    round.failover(Some(holder_name))
                }
            }
        }
        None => lease_free(&mut round),
    };
    round.finish(status)
}

/// Nobody holds the lease: it was released by a graceful stop or a switchover demotion, or has
/// never been taken.
fn lease_free(round: &mut Round<'_>) -> ClusterStatus {
    let input = round.input;
    let writable: Vec<&InstanceObservation> = input
        .instances
        .iter()
        .filter(|i| input.is_fresh(i) && i.is_writable_primary())
        .collect();
    // `fence_rogues(None)` has fenced all of them; adopt one only when it is the only one, and
    // only on a report taken after the lease last changed: an older one may predate a release
    // by a primary that has stopped since.
    if let [only] = writable.as_slice()
        && only.last_report_at > Some(input.lease.unchanged_since)
    {
        round
            .actions
            .retain(|a| !matches!(a, Action::Fence { instance, .. } if *instance == only.name));
        round.events.retain(|e| e.reason != EventReason::Fencing);
        round.events.push(Event::info(
            EventReason::LeaseAcquired,
            format!(
                "{} runs as the only primary and holds no lease: acquiring it",
                only.name
            ),
        ));
        round.actions.push(Action::AcquireLease {
            holder: only.name.clone(),
            expected_version: input.lease.version.clone(),
        });
        return round.status(
            Phase::Bootstrapping,
            None,
            format!("acquiring the lease for {}", only.name),
        );
    }
    if let [only] = writable.as_slice() {
        round
            .actions
            .retain(|a| !matches!(a, Action::Fence { instance, .. } if *instance == only.name));
        round.events.retain(|e| e.reason != EventReason::Fencing);
        return round.status(
            Phase::Bootstrapping,
            None,
            format!(
                "waiting for a fresh report from {} before granting it the lease",
                only.name
            ),
        );
    }
    if !writable.is_empty() {
        return round.status(
            Phase::FailingOver,
            None,
            "several primaries without a lease: fencing them",
        );
    }

    if let Some(plan) = round.memory.switchover.clone() {
        let target = input
            .instance(&plan.to)
            .filter(|t| input.is_fresh(t) && t.postgres_up && t.role == ObservedRole::Replica);
        let reference = round
            .memory
            .last_primary
            .as_ref()
            .filter(|p| p.name == plan.from)
            .map(|p| p.flush_lsn);
        let waited = input.now.saturating_since(plan.requested_at);
        match target {
            Some(t)
                if caught_up(t.received_lsn, reference)
                    && super::switchover::target_holds_every_commit(input, &plan.from, &t.name) =>
            {
                let candidate = Candidate {
                    name: t.name.clone(),
                    received_lsn: t.received_lsn.unwrap_or_default(),
                    lsn_gap_bytes: reference
                        .map(|r| r.bytes_since(t.received_lsn.unwrap_or_default())),
                    overridden: None,
                };
                return round.take_over(Some(&plan.from), candidate, Phase::SwitchingOver);
            }
            Some(_) | None if waited < switchover_patience(input) => {
                round.events.push(Event::info(
                    EventReason::SwitchoverWaiting,
                    format!(
                        "waiting for {} to receive all WAL of {}",
                        plan.to, plan.from
                    ),
                ));
                return round.status(
                    Phase::SwitchingOver,
                    None,
                    format!("waiting for {} to catch up with {}", plan.to, plan.from),
                );
            }
            _ => {
                round.events.push(Event::warning(
                    EventReason::SwitchoverAbandoned,
                    format!(
                        "switchover to {} abandoned: not caught up and ready after {} ms; failing over by the usual rules",
                        plan.to,
                        waited.as_millis()
                    ),
                ));
                round.memory.switchover = None;
            }
        }
    }

    let any_replica = input
        .instances
        .iter()
        .any(|i| input.is_fresh(i) && i.role == ObservedRole::Replica);
    if round.memory.last_primary.is_none() && !any_replica {
        return round.status(
            Phase::Bootstrapping,
            None,
            "waiting for a primary to come up",
        );
    }
    let failed = round.memory.last_primary.as_ref().map(|p| p.name.clone());
    // A released lease means a clean shutdown, whose last WAL reaches the streaming replicas:
    // give the best one a moment to report it rather than promote it short of it.
    if let Some(reference) = round.memory.last_primary.as_ref().map(|p| p.flush_lsn)
        && let Ok(candidate) = choose_failover_candidate(input, failed.as_deref())
        && candidate.received_lsn < reference
        && input.now.saturating_since(input.lease.unchanged_since) < switchover_patience(input)
    {
        return round.status(
            Phase::FailingOver,
            None,
            format!(
                "waiting for {} to receive all WAL of the released primary (at {}, needs {})",
                candidate.name, candidate.received_lsn, reference
            ),
        );
    }
    round.failover(failed.as_deref())
}

fn caught_up(received: Option<Lsn>, reference: Option<Lsn>) -> bool {
    match (received, reference) {
        (Some(received), Some(reference)) => received >= reference,
        // Without a reference position there is nothing to wait for.
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// How long a planned switchover may wait for its target to catch up once the old primary is
/// down before falling back to an ordinary failover.
fn switchover_patience(input: &EngineInput) -> Duration {
    input.lease_duration()
}
