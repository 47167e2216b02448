//! A major-version upgrade of a pod's data directory (`spec.postgresVersion` raised on
//! Kubernetes; docs/postgres-versions.md, "On Kubernetes").
//!
//! The operator restarts the pods on the new major's image with an init container of the old
//! image that copies the old major's installation into an emptyDir ([`copy_binaries`], `pgrs
//! copy-binaries`), and passes `--upgrade-from <that dir>`. The agent finds its data directory
//! one major behind its binaries and, once it knows its role:
//!
//! - as the primary: `pg_upgrade --check`, then `pg_upgrade --link` into a new directory beside
//!   the old one, then swaps them (the old one kept as `data.pgrs-pg<old>` until postgres ran on
//!   the new major). A refusal or failure leaves (or puts back) the old directory as it was and
//!   runs postgres on the copied old binaries, reporting why in its status;
//! - as a replica: sets its data directory aside and is cloned from the upgraded primary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use crate::agent::instance::{AgentConfig, sibling};
use crate::postgres::pg_upgrade::{self, PgUpgrade};
use crate::postgres::process::PgBinaries;
use crate::postgres::version;
use crate::protocol::api::{MajorUpgradeOutcome, MajorUpgradeReport, Role};

/// The file of an upgrade directory that names the copied old `bin` directory.
const BINDIR_FILE: &str = "bindir";

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "the data directory {data_dir} is PostgreSQL {data_major} and the binaries are {binaries_major}, but the old binaries in {from} are PostgreSQL {old_major}: cannot upgrade"
    )]
    WrongOldMajor {
        data_dir: PathBuf,
        data_major: u32,
        binaries_major: u32,
        from: PathBuf,
        old_major: u32,
    },
    #[error("failed to read the copied old binaries named by {file}: {source}")]
    OldBinaries {
        file: PathBuf,
        #[source]
        source: anyhow::Error,
    },
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An upgrade waiting for the instance's role.
#[derive(Debug, Clone)]
pub struct Pending {
    pub from: u32,
    pub old: PgBinaries,
}

/// What to do with the data directory at startup: `None` when it is missing or already of the
/// binaries' major; refuses a directory of another major unless `upgrade_from` holds exactly its
/// major's binaries and the binaries are newer.
pub fn pending(
    config: &AgentConfig,
    upgrade_from: Option<&Path>,
) -> Result<Option<Pending>, anyhow::Error> {
    let data_dir = &config.data_dir;
    let Some(data_major) = version::read_data_dir_major(data_dir)? else {
        return Ok(None);
    };
    let binaries_major = config.binaries.major();
    match upgrade_from {
        Some(from) if data_major < binaries_major => {
            let old = old_binaries(from)?;
            if old.major() != data_major {
                return Err(UpgradeError::WrongOldMajor {
                    data_dir: data_dir.clone(),
                    data_major,
                    binaries_major,
                    from: from.to_path_buf(),
                    old_major: old.major(),
                }
                .into());
            }
            Ok(Some(Pending {
                from: data_major,
                old,
            }))
        }
        _ => {
            version::check_data_dir_major(
                data_dir,
                data_major,
                config.binaries.dir(),
                binaries_major,
            )?;
            Ok(None)
        }
    }
}

/// The old binaries `pgrs copy-binaries` left in `dir`.
fn old_binaries(dir: &Path) -> Result<PgBinaries, UpgradeError> {
    let file = dir.join(BINDIR_FILE);
    let read = || -> anyhow::Result<PgBinaries> {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("failed to read {}", file.display()))?;
        Ok(PgBinaries::locate(PathBuf::from(text.trim()))?)
    };
    read().map_err(|source| UpgradeError::OldBinaries { file, source })
}

/// Where the old data directory is kept until postgres ran on the new major.
pub fn aside_dir(data_dir: &Path, from: u32) -> PathBuf {
    sibling(data_dir, &format!("pg{from}"))
}

/// Carries out the upgrade for `role`. Returns the configuration to run postgres with (the old
/// binaries when the upgrade was refused or failed) and what happened.
pub async fn run(
    config: Arc<AgentConfig>,
    pending: Pending,
    role: Role,
) -> Result<(Arc<AgentConfig>, MajorUpgradeReport), UpgradeError> {
    let (from, to) = (pending.from, config.binaries.major());
    let data = config.data_dir.clone();
    let aside = aside_dir(&data, from);
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| UpgradeError::Io { what, path, source }
    };
    if aside.exists() {
        // An earlier attempt set a directory aside and did not finish: the current one is the
        // one to keep (an upgraded primary swaps before it starts; a replica is re-cloned).
        std::fs::remove_dir_all(&aside).map_err(io("remove", &aside))?;
    }
    if role != Role::Primary {
        tracing::info!(from, to, aside = %aside.display(), "major upgrade: setting the replica's data directory aside; it is cloned from the upgraded primary");
        std::fs::rename(&data, &aside).map_err(io("move aside", &data))?;
        let report = MajorUpgradeReport {
            from,
            to,
            outcome: MajorUpgradeOutcome::Recloned,
            message: None,
            seconds: None,
        };
        return Ok((config, report));
    }
    let started = Instant::now();
    let upgrade = PgUpgrade {
        old_bin: pending.old.dir().to_path_buf(),
        new_bin: config.binaries.dir().to_path_buf(),
        old_data: data.clone(),
        new_data: sibling(&data, &format!("upgrade-{to}")),
        work_dir: sibling(&data, &format!("pg_upgrade-{from}-{to}")),
        old_port: pg_upgrade::free_port().map_err(io("find a free port for", &data))?,
        superuser: config.superuser.clone(),
    };
    // Leftovers of an attempt cut short (the pod restarted): the old directory is whole again.
    if let Err(error) = upgrade.restore_old_control() {
        tracing::warn!(%error, "failed to restore pg_control of an earlier attempt");
    }
    upgrade.cleanup();
    let report = |outcome, message: Option<String>| MajorUpgradeReport {
        from,
        to,
        outcome,
        message,
        seconds: Some(started.elapsed().as_secs_f64()),
    };
    let on_old = |config: &AgentConfig| {
        Arc::new(AgentConfig {
            binaries: pending.old.clone(),
            ..config.clone()
        })
    };
    tracing::info!(
        from,
        to,
        "major upgrade: pg_upgrade --check of the primary's data directory"
    );
    let checked = async {
        upgrade
            .prepare(
                &config.identity,
                config.superuser_password.current().expose(),
                &config.cluster,
            )
            .await
            .map_err(|e| e.to_string())?;
        upgrade.run(&config.identity, None).await
    }
    .await;
    if let Err(message) = checked {
        upgrade.cleanup();
        tracing::error!(from, to, %message, "pg_upgrade --check refused the upgrade: running on the old major, nothing was changed");
        let report = report(MajorUpgradeOutcome::CheckFailed, Some(message));
        return Ok((on_old(&config), report));
    }
    let upgraded = async {
        let mode = upgrade.transfer_mode().map_err(|e| e.to_string())?;
        tracing::info!(from, to, mode = mode.flag(), "major upgrade: pg_upgrade");
        upgrade.run(&config.identity, Some(mode)).await
    }
    .await;
    if let Err(message) = upgraded {
        let restored = upgrade.restore_old_control();
        upgrade.cleanup();
        tracing::error!(from, to, %message, ?restored, "pg_upgrade failed: running on the old major");
        let report = report(MajorUpgradeOutcome::Failed, Some(message));
        return Ok((on_old(&config), report));
    }
    // `synchronous_standby_names` lives in postgresql.auto.conf: carried over, a sync primary
    // is synchronous from its first write on the new major.
    let auto_conf = "postgresql.auto.conf";
    if let Ok(old_auto) = std::fs::read_to_string(data.join(auto_conf)) {
        pg_upgrade::write_private(
            &config.identity,
            &upgrade.new_data.join(auto_conf),
            &old_auto,
        )
        .map_err(|e| UpgradeError::Io {
            what: "carry over",
            path: data.join(auto_conf),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    std::fs::rename(&data, &aside).map_err(io("move aside", &data))?;
    std::fs::rename(&upgrade.new_data, &data).map_err(io("move into place", &upgrade.new_data))?;
    let _ = std::fs::remove_dir_all(&upgrade.work_dir);
    tracing::info!(
        from,
        to,
        seconds = started.elapsed().as_secs_f64(),
        "major upgrade of the primary done"
    );
    Ok((config, report(MajorUpgradeOutcome::Upgraded, None)))
}

/// Drops the old data directory once postgres ran on the new major.
pub fn forget_old(data_dir: &Path, report: &MajorUpgradeReport) {
    if !matches!(
        report.outcome,
        MajorUpgradeOutcome::Upgraded | MajorUpgradeOutcome::Recloned
    ) {
        return;
    }
    let aside = aside_dir(data_dir, report.from);
    if aside.exists()
        && let Err(error) = std::fs::remove_dir_all(&aside)
    {
        tracing::warn!(path = %aside.display(), %error, "failed to remove the old data directory");
    }
}

/// `pgrs copy-binaries`: the init container of an upgrade, run from the OLD image.
#[derive(Debug, clap::Args)]
pub struct CopyBinariesArgs {
    /// The directory to copy the PostgreSQL installation into (an emptyDir shared with the
    /// agent's container, which gets it as `--upgrade-from`).
    #[arg(long)]
    pub to: PathBuf,
    /// The PostgreSQL programs to copy [default: the image's `PGRS_PG_BIN`].
    #[arg(long, env = "PGRS_PG_BIN")]
    pub pg_bin: PathBuf,
}

/// Copies the installation of `--pg-bin` (its parent directory, and `pg_config --sharedir` when
/// it lies elsewhere) under `--to` at the same absolute paths, so that the copied programs find
/// their libraries and share files by the same relative paths, and names the copied `bin` in
/// `<to>/bindir`.
pub async fn copy_binaries(args: CopyBinariesArgs) -> anyhow::Result<()> {
    let binaries = PgBinaries::locate(&args.pg_bin)?;
    let bin = binaries
        .dir()
        .canonicalize()
        .with_context(|| format!("failed to resolve {}", binaries.dir().display()))?;
    let root = bin
        .parent()
        .context("the PostgreSQL bin directory has no parent")?
        .to_path_buf();
    let output = tokio::process::Command::new(bin.join("pg_config"))
        .arg("--sharedir")
        .output()
        .await
        .with_context(|| format!("failed to run {}/pg_config", bin.display()))?;
    let share = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let mut sources = vec![root.clone()];
    if output.status.success() && share.is_dir() && !share.starts_with(&root) {
        sources.push(share);
    }
    for source in &sources {
        let target = under(&args.to, source);
        let parent = target.parent().unwrap_or(&args.to);
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
        let status = tokio::process::Command::new("cp")
            .arg("-a")
            .arg(source)
            .arg(parent)
            .status()
            .await
            .context("failed to run cp")?;
        anyhow::ensure!(
            status.success(),
            "failed to copy {} to {} ({status})",
            source.display(),
            parent.display()
        );
    }
    let copied_bin = under(&args.to, &bin);
    std::fs::write(
        args.to.join(BINDIR_FILE),
        format!("{}\n", copied_bin.display()),
    )
    .with_context(|| format!("failed to write {}", args.to.join(BINDIR_FILE).display()))?;
    tracing::info!(major = binaries.major(), bin = %copied_bin.display(), "copied the PostgreSQL binaries for an upgrade");
    Ok(())
}

/// `path` (absolute) re-rooted under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_absolute_paths_under_the_target() {
        assert_eq!(
            under(
                Path::new("/upgrade"),
                Path::new("/usr/lib/postgresql/15/bin")
            ),
            PathBuf::from("/upgrade/usr/lib/postgresql/15/bin")
        );
        assert_eq!(
            aside_dir(Path::new("/var/lib/postgresql/data"), 15),
            PathBuf::from("/var/lib/postgresql/data.pgrs-pg15")
        );
    }
}
