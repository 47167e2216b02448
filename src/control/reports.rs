//! The agents' latest reports, as the loop keeps them: a poll's answer or an action's answer,
//! whichever was asked later; a failure keeps the last answer (it ages out by the freshness
//! rule) unless nothing listens any more (the agent is gone).

use std::collections::HashMap;

use crate::engine::MonoTime;
use crate::protocol::api::{AgentStatus, Role};

use super::platform::CallError;

/// The last answer of one agent, with the observer's clock when it was asked (what it says is
/// at least that recent).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub asked_at: MonoTime,
    pub status: AgentStatus,
}

#[derive(Debug, Default)]
struct Entry {
    ok: Option<Report>,
    error: Option<String>,
    gone: bool,
}

/// Reports per instance.
#[derive(Debug, Default)]
pub struct Reports {
    entries: HashMap<String, Entry>,
}

/// What a round acts on in a report: when it changes, the next round should run at once.
fn key(status: &AgentStatus) -> impl PartialEq + use<> {
    let receiver = status.wal_receiver.as_ref();
    (
        status.role,
        status.postgres_up,
        receiver.and_then(|w| w.sender_port),
        status.timeline,
        receiver.is_some_and(|w| w.status.is_streaming()),
    )
}

impl Reports {
    /// Stores an answer asked for at `asked_at`, unless a later one is stored already (an
    /// action's answer may arrive before a poll sent earlier). Returns whether it changes what
    /// the engine sees.
    pub fn answered(&mut self, name: &str, asked_at: MonoTime, status: AgentStatus) -> bool {
        let entry = self.entries.entry(name.to_string()).or_default();
        if entry.ok.as_ref().is_some_and(|r| r.asked_at > asked_at) {
            return false;
        }
        // A running postgres that could not be probed says nothing new about its role.
        if status.role == Role::Starting
            && status.probe_error.is_some()
            && entry
                .ok
                .as_ref()
                .is_some_and(|r| r.status.role == Role::Primary)
        {
            entry.error = status.probe_error;
            return false;
        }
        let changed = entry.gone
            || entry
                .ok
                .as_ref()
                .is_none_or(|r| key(&r.status) != key(&status));
        entry.ok = Some(Report { asked_at, status });
        entry.error = None;
        entry.gone = false;
        changed
    }

    /// Notes a failed status request. Returns whether the agent just became gone.
    pub fn failed(&mut self, name: &str, error: &CallError) -> bool {
        let entry = self.entries.entry(name.to_string()).or_default();
        let gone = matches!(error, CallError::Gone(_));
        let became_gone = gone && !entry.gone;
        entry.gone = gone;
        entry.error = Some(error.to_string());
        became_gone
    }

    /// The latest answer of an agent that is not gone, however old.
    pub fn latest(&self, name: &str) -> Option<&Report> {
        self.entries
            .get(name)
            .filter(|e| !e.gone)
            .and_then(|e| e.ok.as_ref())
    }

    /// The latest answer when it is at most `stale_after` old at `now`.
    pub fn fresh(
        &self,
        name: &str,
        now: MonoTime,
        stale_after: std::time::Duration,
    ) -> Option<&Report> {
        self.latest(name)
            .filter(|r| now.saturating_since(r.asked_at) <= stale_after)
    }

    /// The last error of this agent, if more recent than its last answer.
    pub fn error(&self, name: &str) -> Option<&str> {
        self.entries.get(name).and_then(|e| e.error.as_deref())
    }

    pub fn is_gone(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.gone)
    }

    /// Every latest answer of an agent that is not gone.
    pub fn snapshot(&self) -> HashMap<String, Report> {
        self.entries
            .keys()
            .filter_map(|name| Some((name.clone(), self.latest(name)?.clone())))
            .collect()
    }

    /// Forgets instances that left the cluster.
    pub fn retain(&mut self, instances: &[String]) {
        self.entries.retain(|n, _| instances.contains(n));
    }

    /// Serving as a primary or streaming as a replica (or gone: nothing to follow closely).
    pub fn settled(&self, name: &str) -> bool {
        let Some(entry) = self.entries.get(name) else {
            return false;
        };
        if entry.gone {
            return true;
        }
        entry.ok.as_ref().is_some_and(|r| {
            r.status.postgres_up
                && match r.status.role {
                    Role::Primary => true,
                    Role::Replica => r
                        .status
                        .wal_receiver
                        .as_ref()
                        .is_some_and(|w| w.status.is_streaming()),
                    _ => false,
                }
        })
    }
}
