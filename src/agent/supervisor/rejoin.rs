//! Rejoining a former primary (or a lost replica) to `upstream`: pg_rewind first, a fresh
//! pg_basebackup swapped into place when that fails, and the check that it then streams.

use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;

use crate::agent::instance::{
    InstanceError, clone_from, prepare_upstream_with, sibling, write_configuration,
};
use crate::postgres::probe;
use crate::postgres::process::run_tool;
use crate::postgres::promote;
use crate::protocol::api::{RejoinPath, RejoinReport, Role, StopMode, Upstream};

use super::{ActionError, ActionOutcome, Phase, Supervisor};

impl Supervisor {
    /// Rejoin: the instance reports `Starting` until it streams from `upstream` (an observer
    /// must not take a replica still being rewound, or not yet streaming, for a rejoined one);
    /// then `Running`, with the rejoin report in place. A fence that came meanwhile stays.
    pub(super) async fn action_rejoin(
        &mut self,
        upstream: Upstream,
    ) -> Result<ActionOutcome, ActionError> {
        self.hold_starting = true;
        let result = self.rejoin(upstream).await;
        self.hold_starting = false;
        let running = self.child.is_some();
        self.update(|s| {
            if running && s.phase == Phase::Starting {
                s.phase = Phase::Running;
            }
        });
        result
    }

    async fn rejoin(&mut self, upstream: Upstream) -> Result<ActionOutcome, ActionError> {
        let upstream = self.with_default_slot(upstream);
        let config = self.handle.config.clone();
        self.update(|s| {
            s.phase = Phase::Starting;
            s.fence_reason = None;
            s.intended_role = Role::Replica;
            s.upstream = Some(upstream.clone());
        });
        self.restart_at = None;

        // CHECKPOINT on the new primary first: right after a promotion its control file still
        // shows the old timeline, and pg_rewind would wrongly conclude "no rewind required".
        // One session does it, ensures the slot and reads the timeline to stream on, while the
        // local postgres stops.
        let prepare = async {
            let primary = probe::connect(
                &config.replication_target(&upstream.host, upstream.port),
                config.primary_timeout,
            )
            .await?;
            // As the replication role: `pg_checkpoint` (PostgreSQL 15+). Without it (14, or
            // grants not yet written by an older primary) the promotion's own CHECKPOINT has
            // to do; a rewind that then finds nothing to do fails to stream and is re-cloned.
            if let Err(error) = promote::checkpoint(&primary).await {
                tracing::warn!(%error, "CHECKPOINT on the new primary failed; rewinding anyway");
            }
            prepare_upstream_with(&primary, &upstream, &config.binaries).await?;
            Ok::<_, ActionError>(probe::probe_instance(&primary).await?.timeline)
        };
        let (stopped, prepared) = tokio::join!(self.stop_postgres(StopMode::Fast), prepare);
        stopped?;
        let primary_timeline = prepared?;

        let rewind_failure = match self.rejoin_by_rewind(&upstream, primary_timeline).await {
            Ok(()) => None,
            Err(error) => Some(error.to_string()),
        };
        let path = match &rewind_failure {
            None => RejoinPath::Rewind,
            Some(failure) => {
                tracing::warn!(%failure, "pg_rewind path failed; re-cloning");
                if let Err(error) = self.rejoin_by_reclone(&upstream).await {
                    return Err(ActionError::Rejoin {
                        rewind: failure.clone(),
                        reclone: error.to_string(),
                    });
                }
                RejoinPath::Reclone
            }
        };
        let report = RejoinReport {
            path,
            rewind_failure,
            upstream: upstream.clone(),
            finished_at: Utc::now(),
        };
        self.update(|s| s.last_rejoin = Some(report.clone()));
        Ok(ActionOutcome {
            message: format!(
                "rejoined {}:{} by {}",
                upstream.host,
                upstream.port,
                match path {
                    RejoinPath::Rewind => "pg_rewind",
                    RejoinPath::Reclone => "re-clone",
                }
            ),
            rejoin: Some(report),
        })
    }

    async fn rejoin_by_rewind(
        &mut self,
        upstream: &Upstream,
        primary_timeline: Option<u32>,
    ) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        let source = crate::agent::config::conninfo(
            &upstream.host,
            upstream.port,
            &config.replication_user,
            &config.passfile(),
            config.name(),
            Some("postgres"),
            config.settings.tls.as_ref(),
        );
        let mut command = config.identity.command(config.binaries.tool("pg_rewind"));
        command
            .arg("--target-pgdata")
            .arg(&config.data_dir)
            .arg(format!("--source-server={source}"))
            .arg("--progress");
        tracing::info!(host = %upstream.host, port = upstream.port, "running pg_rewind");
        let started = Instant::now();
        run_tool("pg_rewind", command)
            .await
            .map_err(|e| ActionError::Rewind(e.to_string()))?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pg_rewind done"
        );
        // pg_rewind copied the source's configuration files: render ours again.
        write_configuration(&config, &config.data_dir, Some(upstream))?;
        let started = Instant::now();
        self.start_postgres().await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "postgres up after pg_rewind"
        );
        self.verify_streaming(upstream, primary_timeline).await
    }

    async fn rejoin_by_reclone(&mut self, upstream: &Upstream) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        self.stop_postgres(StopMode::Fast).await?;
        let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3f").to_string();
        let fresh = sibling(&config.data_dir, &format!("reclone-{stamp}"));
        if let Err(error) = clone_from(&config, upstream, &fresh).await {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(error.into());
        }
        let old = sibling(&config.data_dir, &format!("old-{stamp}"));
        rename(&config.data_dir, &old)?;
        if let Err(error) = rename(&fresh, &config.data_dir) {
            // Put the old directory back rather than leave nothing in place.
            let _ = std::fs::rename(&old, &config.data_dir);
            return Err(error);
        }
        tracing::info!(old = %old.display(), "swapped in the re-cloned data directory");
        self.start_postgres().await?;
        self.verify_streaming(upstream, None).await?;
        // Only now is the old data directory no longer needed.
        if let Err(error) = std::fs::remove_dir_all(&old) {
            tracing::warn!(%error, old = %old.display(), "failed to remove the replaced data directory");
        }
        Ok(())
    }

    /// A rejoin counts only when the instance streams from `upstream` on its timeline (read from
    /// the primary unless the caller just did).
    async fn verify_streaming(
        &mut self,
        upstream: &Upstream,
        primary_timeline: Option<u32>,
    ) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        let primary_timeline = match primary_timeline {
            Some(timeline) => Some(timeline),
            None => {
                let primary = probe::connect(
                    &config.replication_target(&upstream.host, upstream.port),
                    config.primary_timeout,
                )
                .await?;
                probe::probe_instance(&primary).await?.timeline
            }
        };
        let deadline = Instant::now() + config.verify_timeout;
        let mut last_seen = String::from("no probe yet");
        while Instant::now() < deadline {
            if self.child.is_none() {
                return Err(ActionError::Start(format!(
                    "postgres exited while verifying replication: {}",
                    self.handle.log_tail().join("; ")
                )));
            }
            match self.probe_local().await {
                Ok(probe) => {
                    let receiver = probe.wal_receiver.as_ref();
                    let streaming = receiver.is_some_and(|r| r.status.is_streaming());
                    let on_timeline = receiver.and_then(|r| r.received_tli) == primary_timeline;
                    if probe.in_recovery && streaming && on_timeline {
                        return Ok(());
                    }
                    last_seen = format!(
                        "in_recovery={}, receiver={:?}, primary timeline {:?}",
                        probe.in_recovery,
                        receiver.map(|r| (&r.status, r.received_tli)),
                        primary_timeline
                    );
                }
                Err(error) => last_seen = error.to_string(),
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                self.update(|s| s.pid = None);
                return Err(ActionError::Start(format!(
                    "postgres exited ({status}) while verifying replication: {}",
                    self.handle.log_tail().join("; ")
                )));
            }
            // Cheap on the kept session; the rejoin is done the moment it streams.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(ActionError::Start(format!(
            "not streaming from {}:{} after {:?} ({last_seen}); postgres log: {}",
            upstream.host,
            upstream.port,
            config.verify_timeout,
            self.handle.log_tail().join("; ")
        )))
    }
}

fn rename(from: &Path, to: &Path) -> Result<(), ActionError> {
    std::fs::rename(from, to).map_err(|source| {
        ActionError::Instance(InstanceError::Io {
            what: "rename data directory to",
            path: to.to_path_buf(),
            source,
        })
    })
}
