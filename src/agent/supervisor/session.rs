//! The supervisor's kept session to the local postgres: status probes, the recovery state for
//! readiness, the timeline a standby last received, and the settings waiting for a restart.

use std::sync::Arc;
use std::time::Duration;

use crate::postgres::probe::{self, InstanceProbe, ProbeError};

use super::{SupervisorHandle, lock};

impl SupervisorHandle {
    /// Parameters whose new value waits for a restart (`pg_settings.pending_restart`).
    /// Asked on the kept session (it is part of every status): the backend re-reads the
    /// configuration files on the postmaster's SIGHUP before it runs its next query.
    /// Each with the value the server still runs with.
    pub async fn pending_restart(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, ProbeError> {
        let (client, _) = self.session(timeout).await?;
        let query = client.query(
            "SELECT name, setting FROM pg_settings WHERE pending_restart ORDER BY name",
            &[],
        );
        let rows = match tokio::time::timeout(timeout, query).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(source)) => {
                self.forget_session(&client).await;
                return Err(ProbeError::Query {
                    what: "pending restart settings",
                    source,
                });
            }
            Err(_) => {
                self.forget_session(&client).await;
                return Err(ProbeError::QueryTimeout { timeout });
            }
        };
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    /// `pg_is_in_recovery()` on the kept session (retried once on a fresh one when the kept one
    /// failed): the one query of the agent's readiness loop (`agent::http::health`), so that
    /// the kubelet's probes never run SQL themselves.
    pub async fn in_recovery(&self, timeout: Duration) -> Result<bool, ProbeError> {
        match self.in_recovery_once(timeout).await {
            Err((error, false)) => {
                tracing::debug!(%error, "kept postgres session failed; reconnecting");
                self.in_recovery_once(timeout).await.map_err(|(e, _)| e)
            }
            result => result.map_err(|(e, _)| e),
        }
    }

    /// Also says whether a failure was on a just-connected session.
    async fn in_recovery_once(&self, timeout: Duration) -> Result<bool, (ProbeError, bool)> {
        let (client, fresh) = self.session(timeout).await.map_err(|e| (e, true))?;
        let query = client.query_one("SELECT pg_is_in_recovery()", &[]);
        let error = match tokio::time::timeout(timeout, query).await {
            Ok(Ok(row)) => return Ok(row.get(0)),
            Ok(Err(source)) => ProbeError::Query {
                what: "recovery state",
                source,
            },
            // A hung postgres would hang a new session too: no retry.
            Err(_) => {
                self.forget_session(&client).await;
                return Err((ProbeError::QueryTimeout { timeout }, true));
            }
        };
        self.forget_session(&client).await;
        Err((error, fresh))
    }

    pub(super) async fn probe_client(
        &self,
        timeout: Duration,
    ) -> Result<tokio_postgres::Client, ProbeError> {
        probe::connect(&self.config.local_target(), timeout).await
    }

    /// The kept session to the local postgres, connected anew when there is none or it closed
    /// (postgres restarted); `true` when it was just connected.
    pub(super) async fn session(
        &self,
        timeout: Duration,
    ) -> Result<(Arc<tokio_postgres::Client>, bool), ProbeError> {
        let mut session = self.status_session.lock().await;
        if let Some(client) = session.as_ref().filter(|c| !c.is_closed()) {
            return Ok((client.clone(), false));
        }
        *session = None;
        let client = Arc::new(probe::connect(&self.config.local_target(), timeout).await?);
        *session = Some(client.clone());
        Ok((client, true))
    }

    /// Drops the kept session if it is still `client` (after a failed query on it).
    async fn forget_session(&self, client: &Arc<tokio_postgres::Client>) {
        let mut session = self.status_session.lock().await;
        if session.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            *session = None;
        }
    }

    /// Probes the local postgres (superuser over the Unix socket) on the kept session; a session
    /// that fails (backend terminated, postgres restarted) is dropped and the probe retried once
    /// on a fresh one. Every probe queries live: nothing is cached but the session.
    pub async fn probe(&self, timeout: Duration) -> Result<InstanceProbe, ProbeError> {
        let mut probe = self.probe_live(timeout).await?;
        self.remember_timeline(&mut probe);
        self.report_dialed_upstream(&mut probe);
        Ok(probe)
    }

    /// With TLS, `primary_conninfo` names the upstream by the cluster's certificate name and
    /// dials its IP through `hostaddr`; `pg_stat_wal_receiver.sender_host` then shows the name.
    /// Controllers match a receiver to its upstream by address, so report the address dialed.
    fn report_dialed_upstream(&self, probe: &mut InstanceProbe) {
        let Some(tls) = &self.config.settings.tls else {
            return;
        };
        let Some(receiver) = probe.wal_receiver.as_mut() else {
            return;
        };
        if receiver.sender_host.as_deref() == Some(tls.server_name.as_str())
            && let Some(upstream) = lock(&self.state).upstream.clone()
        {
            receiver.sender_host = Some(upstream.host);
        }
    }

    /// A standby whose WAL receiver stopped (its primary died) would report the timeline of
    /// its last restartpoint, which can be older than the WAL it holds; a peer rewound since
    /// would then look newer and the more advanced standby ineligible for promotion. So a
    /// standby reports the newest timeline it received WAL on since postgres started.
    fn remember_timeline(&self, probe: &mut InstanceProbe) {
        if !probe.in_recovery {
            return;
        }
        let mut remembered = lock(&self.received_timeline);
        if let Some(received) = probe
            .wal_receiver
            .as_ref()
            .and_then(|w| w.received_tli)
            .filter(|t| *t > 0)
        {
            *remembered = Some(remembered.map_or(received, |t| t.max(received)));
        }
        if let Some(received) = *remembered {
            probe.timeline = Some(probe.timeline.map_or(received, |t| t.max(received)));
        }
    }

    async fn probe_live(&self, timeout: Duration) -> Result<InstanceProbe, ProbeError> {
        let (client, fresh) = self.session(timeout).await?;
        match tokio::time::timeout(timeout, probe::probe_instance(&client)).await {
            Ok(Ok(probe)) => return Ok(probe),
            Ok(Err(error)) => {
                self.forget_session(&client).await;
                if fresh {
                    return Err(error);
                }
                tracing::debug!(%error, "kept postgres session failed; reconnecting");
            }
            // A hung postgres would hang a new session too: report it rather than wait twice.
            Err(_) => {
                self.forget_session(&client).await;
                return Err(ProbeError::QueryTimeout { timeout });
            }
        }
        let (client, _) = self.session(timeout).await?;
        let result = tokio::time::timeout(timeout, probe::probe_instance(&client))
            .await
            .map_err(|_| ProbeError::QueryTimeout { timeout })
            .and_then(|result| result);
        if result.is_err() {
            self.forget_session(&client).await;
        }
        result
    }
}
