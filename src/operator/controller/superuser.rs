//! `spec.enableSuperuserAccess` on running pods: each agent is told the setting
//! (`POST /v1/superuser-access`: `pg_hba.conf` rendered again and reloaded, no restart) once per
//! postgres run. A pod created after a change already has it from its arguments; one created
//! before, or whose agent restarted with its pod's older arguments (a new postmaster pid), gets
//! it here, from a background task bounded like the other pushes (a round never waits for it);
//! a failure is retried next round.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::control::Report;
use crate::operator::build::ClusterSecrets;
use crate::operator::pods::PodView;
use crate::protocol::statements::SuperuserAccessRequest;

use super::pipeline::Reconciler;

/// How long an agent may take to write `pg_hba.conf` and signal postgres.
const PUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// What each instance was told: (its postmaster's pid then, the setting).
pub(super) type Told = HashMap<String, (u32, bool)>;

/// The pushes' memory, shared with their background tasks.
#[derive(Default)]
pub(super) struct Pushes {
    told: Arc<Mutex<Told>>,
    /// Instances with a push under way (a frozen agent holds one until its timeout, never a
    /// round).
    busy: Arc<Mutex<BTreeSet<String>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The instances to tell `desired`: running postgres whose current run was not told it yet.
pub(super) fn to_tell(
    told: &Told,
    reports: &HashMap<String, Report>,
    desired: bool,
) -> Vec<String> {
    let mut names: Vec<String> = reports
        .iter()
        .filter_map(|(name, report)| {
            let pid = report.status.postgres_pid?;
            (told.get(name) != Some(&(pid, desired))).then(|| name.clone())
        })
        .collect();
    names.sort();
    names
}

impl Reconciler<'_> {
    /// Tells every agent whose postgres run has not heard it `spec.enableSuperuserAccess`, in
    /// the background (the round does not wait; a failure is retried next round).
    pub(super) fn push_superuser_access(
        &mut self,
        pods: &HashMap<String, PodView>,
        secrets: &ClusterSecrets,
        reports: &HashMap<String, Report>,
    ) {
        let desired = self.cluster.spec.enable_superuser_access;
        let pushes = &self.runtime.rollout.superuser;
        let pending = to_tell(&lock(&pushes.told), reports, desired);
        for name in pending {
            let Some(pid) = reports.get(&name).and_then(|r| r.status.postgres_pid) else {
                continue;
            };
            let Some(url) = pods.get(&name).and_then(PodView::agent_url) else {
                continue;
            };
            let tls = self.runtime.tls.current();
            let Some(client) =
                super::tls::agent_client(tls.as_deref(), url, secrets.agent_token.clone())
            else {
                continue;
            };
            if !lock(&pushes.busy).insert(name.clone()) {
                continue;
            }
            let (told, busy) = (pushes.told.clone(), pushes.busy.clone());
            tokio::spawn(async move {
                let request = SuperuserAccessRequest { enabled: desired };
                match client.superuser_access(&request, PUSH_TIMEOUT).await {
                    Ok(answer) => {
                        tracing::info!(instance = %name, message = %answer.message, "superuser access applied");
                        lock(&told).insert(name.clone(), (pid, desired));
                    }
                    Err(error) => {
                        tracing::warn!(instance = %name, %error, "failed to tell the agent the superuser access");
                    }
                }
                lock(&busy).remove(&name);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::api::AgentStatus;

    fn report(pid: Option<u32>) -> Report {
        let mut status: AgentStatus = serde_json::from_value(serde_json::json!({
            "name": "x", "cluster": "c", "role": "primary", "intended_role": "primary",
            "postgres_up": true, "postgres_pid": pid, "postgres_port": 5432,
            "system_identifier": null, "timeline": null, "in_recovery": null,
            "current_lsn": null, "receive_lsn": null, "replay_lsn": null,
            "last_replay_timestamp": null, "replication": [], "wal_receiver": null,
            "upstream": null,
            "data_dir": {"path": "/d", "exists": true, "initialized": true,
                         "pg_version": null, "standby_signal": false, "free_bytes": null},
            "crash_restarts": 0, "last_rejoin": null, "fence_reason": null,
            "last_error": null, "probe_error": null,
            "observed_at": "2026-01-01T00:00:00Z"
        }))
        .expect("a status");
        status.postgres_pid = pid;
        Report {
            asked_at: crate::engine::MonoTime(Duration::ZERO),
            status,
        }
    }

    #[test]
    fn each_postgres_run_is_told_once_per_value() {
        let reports = HashMap::from([
            ("a".to_string(), report(Some(10))),
            ("b".to_string(), report(Some(20))),
            ("down".to_string(), report(None)),
        ]);
        let mut told = Told::new();
        assert_eq!(to_tell(&told, &reports, false), ["a", "b"]);
        told.insert("a".into(), (10, false));
        told.insert("b".into(), (19, false));
        // b restarted since (another pid): told again; a not.
        assert_eq!(to_tell(&told, &reports, false), ["b"]);
        told.insert("b".into(), (20, false));
        assert!(to_tell(&told, &reports, false).is_empty());
        // The spec changed: everyone running.
        assert_eq!(to_tell(&told, &reports, true), ["a", "b"]);
    }
}
