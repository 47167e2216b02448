//! The actions on postgres other than a rejoin: start (rewinding a former primary's directory
//! first), stop, fence, promote, follow, restart, and applying parameters.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::agent::instance::{AgentConfig, InstanceError, prepare_upstream, write_configuration};
use crate::postgres::probe;
use crate::postgres::process::read_controldata;
use crate::postgres::{promote, roles, slots};
use crate::protocol::api::{Role, StopMode, Upstream};

use super::{ActionError, ActionOutcome, Phase, Supervisor, lock};

impl Supervisor {
    pub(super) async fn action_start(&mut self) -> Result<ActionOutcome, ActionError> {
        if self.phase() == Phase::Fenced {
            return Err(ActionError::Refused(
                "fenced: use follow or rejoin to restart this instance".into(),
            ));
        }
        let (role, upstream) = {
            let state = lock(&self.handle.state);
            (state.intended_role, state.upstream.clone())
        };
        let config = self.handle.config.clone();
        let upstream = if role == Role::Replica {
            upstream
        } else {
            None
        };
        // A data directory last run as a primary (crashed or shut down) may hold WAL its new
        // primary never had. Rewind it before it serves as a replica: starting it, having the
        // observer find it diverged, stopping and rewinding it then costs a second.
        if let Some(upstream) = upstream.clone()
            && self.child.is_none()
            && let Some(crashed) = self.last_ran_as_primary().await
        {
            tracing::info!(
                host = %upstream.host,
                port = upstream.port,
                crashed,
                "the data directory was last a primary's: rewinding it before it serves as a replica"
            );
            // A crashed one first completes crash recovery in a standby start (reported as
            // starting) and a fast stop: measured faster than pg_rewind's own single-user
            // recovery, whose writes its final sync then has to flush once more.
            if crashed {
                write_configuration(&config, &config.data_dir, Some(&upstream))?;
                self.restart_at = None;
                self.hold_starting = true;
                self.recovery_only = true;
                let recovered = self.start_postgres().await;
                self.hold_starting = false;
                self.recovery_only = false;
                if let Err(error) = recovered {
                    self.update(|s| s.phase = Phase::Stopped);
                    return Err(error);
                }
            }
            match self.action_rejoin(upstream).await {
                Ok(outcome) => return Ok(outcome),
                // Unreachable primary and the like: start as is; the observer rejoins it later.
                Err(error) => {
                    tracing::warn!(%error, "rewind before serving failed; starting as is")
                }
            }
        }
        write_configuration(&config, &config.data_dir, upstream.as_ref())?;
        self.restart_at = None;
        self.update(|s| s.phase = Phase::Starting);
        if let Err(error) = self.start_postgres().await {
            self.update(|s| s.phase = Phase::Stopped);
            return Err(error);
        }
        Ok(ActionOutcome::message(
            format!("postgres started as {role:?}").to_lowercase(),
        ))
    }

    /// Whether the control file says the data directory last ran as a primary: `Some(true)`
    /// crashed ("in production"), `Some(false)` cleanly stopped ("shut down"; a standby's says
    /// "... in recovery"). A fresh clone also says "in production" but carries a `backup_label`.
    async fn last_ran_as_primary(&self) -> Option<bool> {
        let config = self.config();
        if config.data_dir.join("backup_label").exists() {
            return None;
        }
        match read_controldata(&config.binaries, &config.identity, &config.data_dir).await {
            Ok(control) => match control.cluster_state.as_str() {
                "in production" => Some(true),
                "shut down" => Some(false),
                _ => None,
            },
            Err(error) => {
                tracing::warn!(%error, "failed to read the control file");
                None
            }
        }
    }

    pub(super) async fn action_stop(
        &mut self,
        mode: StopMode,
    ) -> Result<ActionOutcome, ActionError> {
        if self.phase() != Phase::Fenced {
            self.update(|s| s.phase = Phase::Stopped);
        }
        self.restart_at = None;
        self.stop_postgres(mode).await?;
        Ok(ActionOutcome::message(format!(
            "postgres stopped ({})",
            match mode {
                StopMode::Fast => "fast",
                StopMode::Immediate => "immediate",
            }
        )))
    }

    pub(super) async fn action_fence(&mut self) -> Result<ActionOutcome, ActionError> {
        self.update(|s| s.phase = Phase::Fenced);
        self.restart_at = None;
        self.stop_postgres(StopMode::Immediate).await?;
        Ok(ActionOutcome::message(
            "fenced: postgres stopped immediately",
        ))
    }

    pub(super) async fn action_promote(
        &mut self,
        wait: Duration,
    ) -> Result<ActionOutcome, ActionError> {
        if self.phase() != Phase::Running {
            return Err(ActionError::Refused(format!(
                "cannot promote: postgres is not running (phase {:?})",
                self.phase()
            )));
        }
        // On the kept session: a new (SCRAM) session would delay the promotion itself.
        let (session, _) = self.handle.session(Duration::from_secs(5)).await?;
        let pending = lock(&self.handle.state).promotion_pending;
        let in_recovery = promote::in_recovery(&session).await?;
        if !in_recovery && !pending {
            return Err(ActionError::Refused(
                "cannot promote: already a primary".into(),
            ));
        }
        let mut stale_dropped = false;
        if in_recovery {
            // Slots carried over from this instance's earlier life as a primary are stale: every
            // replica re-creates its own when it follows; left alone they would pin WAL. Dropped
            // while still a standby: nobody follows it yet, whereas after the promotion a replica
            // rejoining at once may already have found its slot here and be about to use it.
            stale_dropped = slots::drop_stale_slots(&session)
                .await
                .inspect_err(|error| {
                    tracing::debug!(%error, "could not drop stale slots as a standby; after promotion then")
                })
                .is_ok();
            // From the signal on, this instance is a primary for fencing (keeper renewing,
            // watchdog armed), whatever happens to the post-promotion work.
            self.update(|s| {
                s.intended_role = Role::Primary;
                s.promotion_pending = true;
            });
            self.handle.promotion_signalling();
            // Signal without waiting and watch every 10 ms: pg_promote's own wait polls every
            // 100 ms. An error leaves it unknown whether the signal went out: stay fenced.
            let signalled = promote::promote_no_wait(&session)
                .await
                .map_err(|e| ActionError::Promote(e.to_string()))?;
            if !signalled {
                self.update(|s| {
                    s.intended_role = Role::Replica;
                    s.promotion_pending = false;
                });
                return Err(ActionError::Promote(
                    "pg_promote could not signal the startup process".into(),
                ));
            }
            let deadline = Instant::now() + wait.max(Duration::from_secs(1));
            while promote::in_recovery(&session).await? {
                if Instant::now() >= deadline {
                    return Err(ActionError::Promote(format!(
                        "still in recovery {} s after pg_promote (a retried promote waits again)",
                        wait.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tracing::info!("promoted: out of recovery");
        } else {
            tracing::info!("promotion signalled earlier: finishing its post-promotion work");
        }
        drop(session);
        self.finish_promotion(stale_dropped).await?;
        self.update(|s| {
            s.upstream = None;
            s.promotion_pending = false;
        });
        Ok(ActionOutcome::message("promoted to primary"))
    }

    /// The work after a promotion; may fail and be retried (a retried promote runs it again),
    /// fencing never waits for it.
    async fn finish_promotion(&mut self, stale_dropped: bool) -> Result<(), ActionError> {
        let config = self.handle.config.clone();
        // A rejoin report describes this instance as a replica; as a primary it has none (an
        // observer may take a current report as proof that a former primary was rewound).
        self.update(|s| s.last_rejoin = None);
        // The rest takes its own session: a CHECKPOINT on the kept one would hold up status
        // probes queued behind it.
        let client = probe::connect(&config.local_target(), Duration::from_secs(5)).await?;
        // The control file shows the new timeline only after a checkpoint; pg_rewind and
        // followers read it from there.
        promote::checkpoint(&client)
            .await
            .map_err(|e| ActionError::Promote(format!("after promotion: {e}")))?;
        if !stale_dropped && let Err(error) = slots::drop_stale_slots(&client).await {
            tracing::warn!(%error, "failed to drop stale replication slots after promotion");
        }
        // The configuration on disk must no longer point at the old primary.
        write_configuration(&config, &config.data_dir, None)?;
        self.reload()?;
        roles::ensure_replication_role(
            &client,
            &config.replication_user,
            config.replication_password.current().expose(),
        )
        .await?;
        super::ensure_app_access(&client, &config).await?;
        Ok(())
    }

    pub(super) async fn action_restart(&mut self) -> Result<ActionOutcome, ActionError> {
        if self.phase() != Phase::Running || self.child.is_none() {
            return Err(ActionError::Refused(format!(
                "cannot restart: postgres is not running (phase {:?})",
                self.phase()
            )));
        }
        let (role, upstream) = {
            let state = lock(&self.handle.state);
            (state.intended_role, state.upstream.clone())
        };
        let config = self.handle.config.clone();
        let upstream = if role == Role::Replica {
            upstream
        } else {
            None
        };
        // Starting (not Running) while down: the lease keeper of a primary sees a restart, not
        // a stop, and keeps renewing.
        self.update(|s| s.phase = Phase::Starting);
        self.restart_at = None;
        if let Err(error) = self.stop_postgres(StopMode::Fast).await {
            self.schedule_restart();
            return Err(error);
        }
        if let Err(error) = write_configuration(&config, &config.data_dir, upstream.as_ref()) {
            self.schedule_restart();
            return Err(error.into());
        }
        if let Err(error) = self.start_postgres().await {
            // As after a crash: keep trying with backoff rather than stay down.
            if self.phase() == Phase::Starting {
                self.schedule_restart();
            }
            return Err(error);
        }
        Ok(ActionOutcome::message(
            format!("postgres restarted as {role:?}").to_lowercase(),
        ))
    }

    pub(super) async fn action_parameters(
        &mut self,
        parameters: std::collections::BTreeMap<String, String>,
    ) -> Result<ActionOutcome, ActionError> {
        use crate::agent::config::{
            parameters_hash, parse_parameters_file, render_parameters_include,
        };
        let config = self.handle.config.clone();
        let Some(path) = config.settings.parameters_include.clone() else {
            return Err(ActionError::Refused(
                "this agent has no parameters file (--parameters-file)".into(),
            ));
        };
        let text = render_parameters_include(&parameters);
        // The rendering round-trips through the parser: refuses agent-owned or malformed names.
        parse_parameters_file(&text).map_err(|e| ActionError::Refused(e.to_string()))?;
        crate::agent::config::check_parameters_for_major(config.binaries.major(), &parameters)
            .map_err(|e| ActionError::Refused(e.to_string()))?;
        let hash = parameters_hash(&parameters);
        let unchanged = std::fs::read_to_string(&path).is_ok_and(|current| current == text);
        if !unchanged {
            write_include(&config, &path, &text)?;
        }
        let running = self.phase() == Phase::Running && self.child.is_some();
        if unchanged || !running {
            self.update(|s| s.parameters_hash = Some(hash.clone()));
            return Ok(ActionOutcome::message(format!(
                "parameters {hash} written{}",
                if running {
                    ""
                } else {
                    " (used at the next start)"
                }
            )));
        }
        let before = {
            let client = self.handle.probe_client(Duration::from_secs(5)).await?;
            promote::conf_load_time(&client).await?
        };
        self.reload()?;
        // A new session inherits the postmaster's configuration: once its load time moved,
        // the postmaster has re-read the files and `pending_restart` is meaningful.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = {
                let client = self.handle.probe_client(Duration::from_secs(5)).await?;
                promote::conf_load_time(&client).await?
            };
            if now != before {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ActionError::Start(
                    "postgres did not reload its configuration within 10 s".into(),
                ));
            }
        }
        self.update(|s| s.parameters_hash = Some(hash.clone()));
        let pending: Vec<String> = self
            .handle
            .pending_restart(Duration::from_secs(5))
            .await?
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        tracing::info!(%hash, ?pending, "parameters reloaded");
        Ok(ActionOutcome::message(if pending.is_empty() {
            format!("parameters {hash} reloaded")
        } else {
            format!(
                "parameters {hash} reloaded; waiting for a restart: {}",
                pending.join(", ")
            )
        }))
    }

    pub(super) fn with_default_slot(&self, mut upstream: Upstream) -> Upstream {
        if upstream.slot.is_none() {
            upstream.slot = Some(self.config().default_slot());
        }
        upstream
    }

    pub(super) async fn action_follow(
        &mut self,
        upstream: Upstream,
    ) -> Result<ActionOutcome, ActionError> {
        let upstream = self.with_default_slot(upstream);
        let config = self.handle.config.clone();
        if self.child.is_some() {
            let probe = self.probe_local().await?;
            if !probe.in_recovery {
                return Err(ActionError::Refused(
                    "cannot follow: this instance is a running primary; use rejoin".into(),
                ));
            }
        }
        prepare_upstream(&config, &upstream).await?;
        write_configuration(&config, &config.data_dir, Some(&upstream))?;
        self.update(|s| {
            s.intended_role = Role::Replica;
            s.upstream = Some(upstream.clone());
        });
        if self.child.is_some() {
            self.reload()?;
            return Ok(ActionOutcome::message(format!(
                "following {}:{} (configuration reloaded)",
                upstream.host, upstream.port
            )));
        }
        self.update(|s| {
            s.phase = Phase::Starting;
            s.fence_reason = None;
        });
        self.restart_at = None;
        self.start_postgres().await?;
        Ok(ActionOutcome::message(format!(
            "following {}:{} (started as a standby)",
            upstream.host, upstream.port
        )))
    }
}

/// Writes the parameters include atomically (a reload never reads half a file), readable by
/// the postgres user only.
fn write_include(config: &AgentConfig, path: &Path, text: &str) -> Result<(), ActionError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ActionError::Instance(InstanceError::Io { what, path, source })
    };
    let temporary = path.with_extension("conf.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io("write", &temporary))?;
    file.write_all(text.as_bytes())
        .map_err(io("write", &temporary))?;
    config
        .identity
        .chown(&temporary)
        .map_err(io("chown", &temporary))?;
    std::fs::rename(&temporary, path).map_err(io("rename parameters file to", path))
}
