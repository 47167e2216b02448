//! The lease-store-outage failsafe (issue 13; design: "Fencing", API-server-outage failsafe).
//!
//! When the primary's keeper cannot renew because the lease store is *unreachable* (not because
//! another instance holds the lease), the primary may keep serving only while every other
//! member confirms over the agents' HTTP API that it still follows it. A member that confirmed
//! refuses any promotion (the promote gate asks [`Failsafe::admit_promotion`]) until its
//! confirmation expires, a lease duration after it answered, on its own clock. The primary
//! counts a round of confirmations from the round's start, like a renewal: it fences at the
//! round's start + `renew_deadline` (+ the shutdown budget), before any confirmation it got in
//! that round expires.
//!
//! Who "every other member" is must not be a matter of opinion: the holder writes the member
//! names it will ask into the lease ([`crate::coordination::LeaseStore::set_failsafe_members`])
//! and asks exactly those (plus any it tried to write); a candidate that the lease's list does
//! not name is refused by the promote gate (a member added while the primary could not write the
//! list would otherwise never be asked).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::api::ErrorResponse;
use crate::protocol::failsafe::{
    ConfirmRequest, ConfirmResponse, FAILSAFE_CONFIRM_PATH, FailsafeMembersRequest, FailsafeStatus,
};

use super::clock::FenceInstant;
use super::lease::{LeaseRecord, LeaseTimings};

/// A round of confirmations that did not confirm: why, naming the member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    #[error("the failsafe is off")]
    Off,
    #[error("the member list is not written in the lease yet: nothing to rely on")]
    NotArmed,
    #[error("the controller gave no address for {0}")]
    NoAddress(String),
    #[error("{member} did not confirm: {reason}")]
    Refused { member: String, reason: String },
}

#[derive(Debug, Default)]
struct Inner {
    given: FailsafeMembersRequest,
    digest: String,
    /// Primary: the names this holder knows are written in the lease.
    written: Option<BTreeSet<String>>,
    /// Primary: names of writes whose outcome is unknown (they may be in the lease).
    maybe_written: BTreeSet<String>,
    /// Primary: serving on confirmations since.
    serving_since: Option<FenceInstant>,
    last_round_error: Option<String>,
    /// Replica: the primary confirmed, and until when promotion is refused.
    confirmed: Option<(String, FenceInstant)>,
    /// Replica: when a promotion last passed the gate.
    promotion_admitted: Option<FenceInstant>,
}

/// One agent's failsafe: its part as a primary (asking) and as a replica (confirming).
pub struct Failsafe {
    identity: String,
    timings: LeaseTimings,
    http: reqwest::Client,
    /// Replaced when the token file changes ([`Failsafe::set_token`]).
    token: Mutex<String>,
    inner: Mutex<Inner>,
}

impl Failsafe {
    /// `token` is the cluster's agent token (the members' actions need it).
    pub fn new(identity: &str, timings: LeaseTimings, token: String) -> Self {
        let inner = Inner {
            digest: FailsafeMembersRequest::default().digest(),
            ..Inner::default()
        };
        Failsafe {
            identity: identity.to_string(),
            timings,
            http: reqwest::Client::new(),
            token: Mutex::new(token),
            inner: Mutex::new(inner),
        }
    }

    /// Reaches the members with `http` (e.g. pinned to the cluster CA when they serve HTTPS).
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// The agent token changed (a rotation): the next confirmations carry the new one.
    pub fn set_token(&self, token: String) {
        *self
            .token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = token;
    }

    fn token(&self) -> String {
        self.token
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn enabled(&self) -> bool {
        self.lock().given.enabled
    }

    /// The controller's member list (this agent included) and switch.
    pub fn set_members(&self, request: FailsafeMembersRequest) -> FailsafeStatus {
        let digest = request.digest();
        {
            let mut inner = self.lock();
            if inner.digest != digest {
                tracing::info!(
                    identity = %self.identity,
                    enabled = request.enabled,
                    members = ?request.members.iter().map(|m| &m.name).collect::<Vec<_>>(),
                    "failsafe members set"
                );
            }
            inner.given = request;
            inner.digest = digest;
        }
        self.status()
    }

    pub fn status(&self) -> FailsafeStatus {
        let inner = self.lock();
        let mut members: Vec<String> = inner.given.members.iter().map(|m| m.name.clone()).collect();
        members.sort();
        let confirmation = inner
            .confirmed
            .as_ref()
            .filter(|(_, until)| !until.has_passed());
        FailsafeStatus {
            enabled: inner.given.enabled,
            members,
            digest: inner.digest.clone(),
            armed: inner.given.enabled && inner.written.is_some(),
            serving_on_confirmations_ms: inner
                .serving_since
                .map(|since| since.elapsed().as_millis() as u64),
            last_round_error: inner.last_round_error.clone(),
            confirmed_primary: confirmation.map(|(primary, _)| primary.clone()),
            confirmation_remaining_ms: confirmation
                .map(|(_, until)| until.remaining().as_millis() as u64),
        }
    }

    // ---- primary side ----

    /// What the lease's member list should become, when it differs from what this holder
    /// wrote: `Some(Some(names))` to write the list, `Some(None)` to clear it (failsafe off).
    pub fn wanted_lease_members(&self) -> Option<Option<Vec<String>>> {
        let inner = self.lock();
        if !inner.given.enabled {
            return inner.written.is_some().then_some(None);
        }
        let names: BTreeSet<String> = inner.given.members.iter().map(|m| m.name.clone()).collect();
        if names.is_empty() || inner.written.as_ref() == Some(&names) {
            return None;
        }
        Some(Some(names.into_iter().collect()))
    }

    /// A write of the lease's member list ended: `Ok` with what the lease now holds, or with an
    /// unknown outcome (the names may be in the lease).
    pub fn note_lease_members(&self, attempted: Option<&[String]>, outcome: Option<&LeaseRecord>) {
        let mut inner = self.lock();
        match outcome {
            Some(record) => {
                inner.written = record
                    .failsafe_members
                    .as_ref()
                    .map(|names| names.iter().cloned().collect());
                inner.maybe_written.clear();
            }
            None => {
                if let Some(names) = attempted {
                    inner.maybe_written.extend(names.iter().cloned());
                }
            }
        }
    }

    /// The lease renewed normally: no longer serving on confirmations.
    pub fn note_renewed(&self) {
        let mut inner = self.lock();
        if let Some(since) = inner.serving_since.take() {
            tracing::info!(
                identity = %self.identity,
                served_ms = since.elapsed().as_millis() as u64,
                "lease renewed again: no longer serving on the members' confirmations"
            );
        }
        inner.last_round_error = None;
    }

    /// Not primary any more: nothing written by this holder counts for a later term.
    pub fn reset_primary(&self) {
        let mut inner = self.lock();
        inner.written = None;
        inner.maybe_written.clear();
        inner.serving_since = None;
        inner.last_round_error = None;
    }

    /// One round: asks every member the lease names (and any this holder may have written),
    /// in parallel, within `budget`. `Ok` only when every one confirmed. Each request gets a
    /// tenth less than the budget, so that a member that does not answer (frozen) is named in
    /// `last_round_error` before a caller's own bound of `budget` gives up on the round.
    pub async fn ask_members(&self, budget: Duration) -> Result<(), ConfirmError> {
        let per_request = budget - budget / 10;
        let (targets, me, given) = {
            let inner = self.lock();
            if !inner.given.enabled {
                return Err(ConfirmError::Off);
            }
            let Some(written) = &inner.written else {
                return Err(ConfirmError::NotArmed);
            };
            let targets: BTreeSet<String> = written
                .iter()
                .chain(inner.maybe_written.iter())
                .filter(|name| **name != self.identity)
                .cloned()
                .collect();
            let me = inner
                .given
                .member(&self.identity)
                .cloned()
                .ok_or_else(|| ConfirmError::NoAddress(self.identity.clone()))?;
            (targets, me, inner.given.clone())
        };
        let request = ConfirmRequest {
            primary: self.identity.clone(),
            host: me.postgres_host.clone(),
            port: me.postgres_port,
            deadline_unix_ms: Some(
                chrono::Utc::now().timestamp_millis() + budget.as_millis() as i64,
            ),
        };
        let asks = targets.iter().map(|name| {
            let url = given
                .member(name)
                .map(|m| format!("{}{FAILSAFE_CONFIRM_PATH}", m.agent_url));
            let request = &request;
            async move {
                let url = url.ok_or_else(|| ConfirmError::NoAddress(name.clone()))?;
                self.ask_one(name, &url, request, per_request).await
            }
        });
        let results = futures::future::join_all(asks).await;
        let result = results
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ());
        let mut inner = self.lock();
        match &result {
            Ok(()) => {
                if inner.serving_since.is_none() {
                    tracing::warn!(
                        identity = %self.identity,
                        members = ?targets,
                        "lease store unreachable: serving on the confirmations of every member"
                    );
                    inner.serving_since = Some(FenceInstant::now());
                }
                inner.last_round_error = None;
            }
            Err(error) => inner.last_round_error = Some(error.to_string()),
        }
        result
    }

    async fn ask_one(
        &self,
        member: &str,
        url: &str,
        request: &ConfirmRequest,
        budget: Duration,
    ) -> Result<(), ConfirmError> {
        let refused = |reason: String| ConfirmError::Refused {
            member: member.to_string(),
            reason,
        };
        let response = self
            .http
            .post(url)
            .bearer_auth(self.token())
            .timeout(budget)
            .json(request)
            .send()
            .await
            .map_err(|e| refused(e.to_string()))?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            let reason = serde_json::from_str::<ErrorResponse>(&text)
                .map(|body| body.error)
                .unwrap_or(text);
            return Err(refused(format!("{status}: {reason}")));
        }
        let answer: ConfirmResponse = response.json().await.map_err(|e| refused(e.to_string()))?;
        // A confirmation shorter than what this primary relies on is no confirmation.
        let needed = self.timings.renew_deadline + self.timings.shutdown_budget;
        if answer.member != member || Duration::from_millis(answer.valid_ms) <= needed {
            return Err(refused(format!(
                "answered as {} for {} ms, {} ms are needed",
                answer.member,
                answer.valid_ms,
                needed.as_millis()
            )));
        }
        Ok(())
    }

    // ---- replica side ----

    /// A primary asks; `follows` is the supervisor's verdict (a replica configured to stream
    /// from `request.host:port`, no promotion under way). Records the confirmation: promotion
    /// is refused for a lease duration from now.
    pub fn confirm(
        &self,
        request: &ConfirmRequest,
        follows: Result<(), String>,
    ) -> Result<ConfirmResponse, String> {
        let mut inner = self.lock();
        if !inner.given.enabled {
            return Err("the failsafe is off on this member".into());
        }
        follows?;
        // Clocks of different nodes may differ: only a request late by more than the renew
        // deadline on top of its own budget counts as abandoned (safety never depends on this).
        if let Some(deadline) = request.deadline_unix_ms {
            let late = chrono::Utc::now().timestamp_millis() - deadline;
            if late > self.timings.renew_deadline.as_millis() as i64 {
                return Err(format!(
                    "the question of {} arrived {late} ms after it gave up on it",
                    request.primary
                ));
            }
        }
        if let Some(admitted) = inner.promotion_admitted
            && admitted.elapsed() < self.timings.lease_duration
        {
            return Err(format!(
                "a promotion of {} passed the gate {} ms ago",
                self.identity,
                admitted.elapsed().as_millis()
            ));
        }
        let valid = self.timings.lease_duration;
        inner.confirmed = Some((request.primary.clone(), FenceInstant::now() + valid));
        Ok(ConfirmResponse {
            member: self.identity.clone(),
            valid_ms: valid.as_millis() as u64,
        })
    }

    /// The promote gate: refused while a confirmation is unexpired; otherwise recorded, so that
    /// no confirmation is given while the promotion may still happen.
    pub fn admit_promotion(&self) -> Result<(), String> {
        let mut inner = self.lock();
        if let Some((primary, until)) = &inner.confirmed
            && !until.has_passed()
        {
            return Err(format!(
                "refusing to promote: confirmed to {primary} (serving while the lease store is unreachable) that it follows it; the confirmation expires in {} ms",
                until.remaining().as_millis()
            ));
        }
        inner.promotion_admitted = Some(FenceInstant::now());
        Ok(())
    }
}

/// The promote gate's membership rule: the lease's member list (written by the holder that may
/// serve on confirmations) must name the candidate, else that holder would never ask it.
pub fn membership_refusal(record: &LeaseRecord, candidate: &str) -> Option<String> {
    let members = record.failsafe_members.as_ref()?;
    (!members.iter().any(|m| m == candidate)).then(|| {
        format!(
            "refusing to promote: the lease's failsafe member list ({}) does not name {candidate}; a primary serving on its members' confirmations would not ask it",
            members.join(", ")
        )
    })
}

#[cfg(test)]
#[path = "failsafe_tests.rs"]
mod tests;
