//! Rotation of the agent's secrets without a restart: the secret files (a Secret volume in a
//! pod, `secrets/` in local mode) are read again every [`SECRETS_POLL`]. Each read opens the
//! path anew: a kubelet updates a Secret volume by swapping its `..data` symlink, and a cached
//! descriptor would keep the old file.
//!
//! On a change:
//! - the agent token: both the old and the new token are accepted for
//!   [`crate::agent::rotation::ROTATION_WINDOW`] (the operator and the other agents switch to
//!   the new one at their own pace); the failsafe's confirmations carry the new one at once;
//! - a password (superuser, replication, application): the agent's own connections use the new
//!   one and fall back to the old one while it is still the role's; the libpq passfile is
//!   written again (a replica's next `primary_conninfo` connection, pg_basebackup and
//!   pg_rewind read it); on the running primary, the role's password is changed at once
//!   (`ALTER ROLE` with a client-side SCRAM verifier, committed locally). Other instances never
//!   change a role: the primary's change replicates to them. A replica keeps the change
//!   pending and makes it itself if it becomes primary (harmless when already done).
//!
//! Order: the new password is valid from the primary's `ALTER ROLE`, that is from the moment
//! the primary's agent sees the new file. Streaming replicas stay connected throughout (a
//! password is checked only at connection). A replica that reconnects between the Secret's
//! change and the moment both its own file and the primary's show it is refused and retries
//! (the walreceiver retries every `wal_retrieve_retry_interval`, 5 s); the window is the
//! kubelets' refresh skew (up to about a minute), and in local mode, where every agent reads the
//! same file, one poll period.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::instance::{AgentConfig, Secret, write_passfile};
use crate::agent::rotation::RotatingSecret;
use crate::agent::supervisor::{Phase, SupervisorHandle};
use crate::coordination::Failsafe;
use crate::postgres::probe::{self, ProbeError};
use crate::postgres::roles::{self, RoleError};
use crate::protocol::api::Role;

/// How often the secret files are read.
pub const SECRETS_POLL: Duration = Duration::from_secs(2);

/// The files the agent's secrets come from.
#[derive(Debug, Clone)]
pub struct SecretFiles {
    pub token: PathBuf,
    pub superuser_password: PathBuf,
    pub replication_password: PathBuf,
    pub app_password: Option<PathBuf>,
}

/// The agent's rotating secrets (clones of those in the HTTP state and the configuration).
#[derive(Debug, Clone)]
pub struct Secrets {
    pub token: RotatingSecret,
    pub superuser_password: RotatingSecret,
    pub replication_password: RotatingSecret,
    pub app_password: Option<RotatingSecret>,
}

/// Which secrets changed in one read of the files.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub token: bool,
    pub superuser_password: bool,
    pub replication_password: bool,
    pub app_password: bool,
}

impl Changes {
    fn merge(&mut self, other: Changes) {
        self.token |= other.token;
        self.superuser_password |= other.superuser_password;
        self.replication_password |= other.replication_password;
        self.app_password |= other.app_password;
    }

    /// A role's password changed.
    fn any_role(&self) -> bool {
        self.superuser_password || self.replication_password || self.app_password
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("failed to connect to the primary to change the rotated passwords: {0}")]
    Connect(#[source] ProbeError),
    #[error("failed to change a rotated password on the primary: {0}")]
    Role(#[source] RoleError),
}

/// Reads every file and rotates the secrets whose value changed. An unreadable or empty file
/// changes nothing (logged): the current value stays.
pub fn reread(files: &SecretFiles, secrets: &Secrets) -> Changes {
    let rotate = |path: &PathBuf, secret: &RotatingSecret, what: &'static str| {
        match Secret::from_file(path) {
            Ok(value) => secret.rotate(value),
            Err(error) => {
                tracing::warn!(%error, what, "cannot read a secret file; keeping the current value");
                false
            }
        }
    };
    Changes {
        token: rotate(&files.token, &secrets.token, "agent token"),
        superuser_password: rotate(
            &files.superuser_password,
            &secrets.superuser_password,
            "superuser password",
        ),
        replication_password: rotate(
            &files.replication_password,
            &secrets.replication_password,
            "replication password",
        ),
        app_password: match (&files.app_password, &secrets.app_password) {
            (Some(path), Some(secret)) => rotate(path, secret, "application password"),
            _ => false,
        },
    }
}

/// The watcher's task: reads the files every [`SECRETS_POLL`] and applies what changed.
pub struct SecretWatch {
    pub files: SecretFiles,
    pub config: Arc<AgentConfig>,
    pub token: RotatingSecret,
    pub failsafe: Option<Arc<Failsafe>>,
    pub handle: SupervisorHandle,
}

impl SecretWatch {
    fn secrets(&self) -> Secrets {
        Secrets {
            token: self.token.clone(),
            superuser_password: self.config.superuser_password.clone(),
            replication_password: self.config.replication_password.clone(),
            app_password: self.config.app.as_ref().map(|app| app.password.clone()),
        }
    }

    pub async fn run(self) {
        let secrets = self.secrets();
        // Role passwords not yet changed on a primary.
        let mut pending = Changes::default();
        loop {
            tokio::time::sleep(SECRETS_POLL).await;
            let changes = reread(&self.files, &secrets);
            self.on_changes(changes);
            pending.merge(changes);
            if pending.any_role() && self.is_running_primary() {
                match change_roles(&self.config, pending).await {
                    Ok(()) => pending = Changes::default(),
                    Err(error) => {
                        tracing::warn!(%error, "failed to change the rotated passwords; retrying")
                    }
                }
            }
        }
    }

    fn on_changes(&self, changes: Changes) {
        if changes.token {
            tracing::info!(
                window_seconds = crate::agent::rotation::ROTATION_WINDOW.as_secs(),
                "agent token changed: the previous one stays accepted for the window"
            );
            if let Some(failsafe) = &self.failsafe {
                failsafe.set_token(self.token.current().expose().to_string());
            }
        }
        if changes.superuser_password || changes.replication_password {
            tracing::info!(
                superuser = changes.superuser_password,
                replication = changes.replication_password,
                "password changed: writing the passfile again"
            );
            if let Err(error) = write_passfile(&self.config) {
                tracing::error!(%error, "failed to write the passfile with the rotated passwords");
            }
        }
        if changes.app_password {
            tracing::info!("application password changed");
        }
    }

    fn is_running_primary(&self) -> bool {
        let state = self.handle.state();
        state.intended_role == Role::Primary && state.phase == Phase::Running
    }
}

/// Sets the changed roles' passwords on this primary (a session that falls back to the old
/// superuser password, which is the role's until the first statement here changes it).
async fn change_roles(config: &AgentConfig, changes: Changes) -> Result<(), RotationError> {
    let client = probe::connect(&config.local_target(), Duration::from_secs(5))
        .await
        .map_err(RotationError::Connect)?;
    if changes.superuser_password {
        roles::set_password(
            &client,
            &config.superuser,
            config.superuser_password.current().expose(),
        )
        .await
        .map_err(RotationError::Role)?;
    }
    if changes.replication_password {
        roles::ensure_replication_role(
            &client,
            &config.replication_user,
            config.replication_password.current().expose(),
        )
        .await
        .map_err(RotationError::Role)?;
    }
    if changes.app_password
        && let Some(app) = &config.app
    {
        roles::ensure_app_access(
            &client,
            &app.owner,
            &app.database,
            app.password.current().expose(),
        )
        .await
        .map_err(RotationError::Role)?;
    }
    tracing::info!(
        superuser = changes.superuser_password,
        replication = changes.replication_password,
        app = changes.app_password,
        "rotated passwords in place on the primary"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Secret volume as a kubelet writes it: `..data` points at a timestamped directory and
    /// each key is a symlink through `..data`; an update swaps `..data`.
    fn kubelet_volume(dir: &std::path::Path, generation: u32, values: &[(&str, &str)]) {
        let target = dir.join(format!("..{generation}"));
        std::fs::create_dir(&target).unwrap();
        for (key, value) in values {
            std::fs::write(target.join(key), value).unwrap();
            let link = dir.join(key);
            if !link.exists() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &link).unwrap();
            }
        }
        let staged = dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{generation}"), &staged).unwrap();
        std::fs::rename(&staged, dir.join("..data")).unwrap();
    }

    fn setup(dir: &std::path::Path) -> (SecretFiles, Secrets) {
        let files = SecretFiles {
            token: dir.join("agent-token"),
            superuser_password: dir.join("superuser-password"),
            replication_password: dir.join("replication-password"),
            app_password: None,
        };
        let secret = |value: &str| RotatingSecret::new(Secret::new(value));
        let secrets = Secrets {
            token: secret("t1"),
            superuser_password: secret("s1"),
            replication_password: secret("r1"),
            app_password: None,
        };
        (files, secrets)
    }

    #[test]
    fn detects_a_symlink_swap_and_only_real_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (files, secrets) = setup(dir.path());
        kubelet_volume(
            dir.path(),
            1,
            &[
                ("agent-token", "t1\n"),
                ("superuser-password", "s1"),
                ("replication-password", "r1"),
            ],
        );
        assert_eq!(reread(&files, &secrets), Changes::default());
        kubelet_volume(
            dir.path(),
            2,
            &[
                ("agent-token", "t2"),
                ("superuser-password", "s1"),
                ("replication-password", "r2"),
            ],
        );
        let changes = reread(&files, &secrets);
        assert_eq!(
            changes,
            Changes {
                token: true,
                replication_password: true,
                ..Changes::default()
            }
        );
        assert!(secrets.token.accepts(b"t1") && secrets.token.accepts(b"t2"));
        assert_eq!(secrets.replication_password.current().expose(), "r2");
        assert_eq!(
            secrets
                .replication_password
                .previous()
                .map(|p| p.expose().to_string()),
            Some("r1".to_string())
        );
        assert_eq!(reread(&files, &secrets), Changes::default(), "seen once");
    }

    #[test]
    fn an_unreadable_or_empty_file_keeps_the_current_value() {
        let dir = tempfile::tempdir().unwrap();
        let (files, secrets) = setup(dir.path());
        std::fs::write(&files.token, "\n").unwrap();
        assert_eq!(reread(&files, &secrets), Changes::default());
        assert_eq!(secrets.token.current().expose(), "t1");
        assert_eq!(secrets.superuser_password.current().expose(), "s1");
    }

    #[test]
    fn changes_merge_until_applied() {
        let mut pending = Changes::default();
        assert!(!pending.any_role());
        pending.merge(Changes {
            token: true,
            ..Changes::default()
        });
        assert!(!pending.any_role(), "a token needs no role change");
        pending.merge(Changes {
            app_password: true,
            ..Changes::default()
        });
        assert!(pending.any_role() && pending.token);
    }
}
