//! `pgrs local upgrade --to <major>`: a major-version upgrade of a running local cluster with
//! `pg_upgrade` (docs/postgres-versions.md, "Upgrading").
//!
//! This file is the pure part: validating the request and planning the paths and the
//! `pg_upgrade` command lines; [`run`] does the IO:
//!
//! 1. check: initdb a new data directory beside the primary's, `pg_upgrade --check` against the
//!    running primary (a failure removes the new directory again: nothing else was touched);
//! 2. stop the cluster (`local down`: replicas first, then the primary, which releases its
//!    lease);
//! 3. `pg_upgrade --link` (copy across file systems) into the new directory; a failure puts the
//!    old primary back and restarts the cluster on the old major;
//! 4. swap the directories (the old ones are kept as `data.pgrs-pg<old>`), record the new
//!    binaries in `cluster.json`, start the cluster: the primary on the new major, every replica
//!    re-cloned from it (pg_basebackup, as for a replica without a data directory);
//! 5. verify every node answers on the new major and streams, then remove the old directories.

pub mod run;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::local::layout::{Layout, LocalConfig};
pub use crate::postgres::pg_upgrade::TransferMode;
use crate::postgres::pg_upgrade::{PgUpgrade, PgUpgradeError};
use crate::postgres::version::{self, SUPPORTED_MAJORS};

/// The programs an upgrade needs from the new major's binaries: the agent's, plus pg_upgrade.
pub const UPGRADE_TOOLS: [&str; 6] = [
    "postgres",
    "initdb",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
    "pg_upgrade",
];

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(
        "refusing to upgrade to PostgreSQL {to}: the cluster runs PostgreSQL {from}; only a higher major is possible (nothing was changed)"
    )]
    NotHigher { from: u32, to: u32 },
    #[error(
        "refusing to upgrade to PostgreSQL {to}: pgrs supports {} (nothing was changed)",
        version::range_text()
    )]
    Unsupported { to: u32 },
    #[error(
        "refusing to upgrade: the PostgreSQL {to} binaries in {dir} are incomplete, missing {missing} (scripts/install-pg-majors {to} installs them; nothing was changed)"
    )]
    BinariesIncomplete {
        to: u32,
        dir: PathBuf,
        missing: String,
    },
    #[error(
        "refusing to upgrade to PostgreSQL {to}: the binaries in {dir} are PostgreSQL {found} (nothing was changed)"
    )]
    BinariesMajor { to: u32, found: u32, dir: PathBuf },
    #[error(
        "refusing to upgrade: {path} exists (left over by an earlier upgrade?); move it away or remove it first (nothing was changed)"
    )]
    Leftover { path: PathBuf },
    #[error("refusing to upgrade: the cluster is not healthy ({detail}); nothing was changed")]
    NotHealthy { detail: String },
    #[error(
        "pg_upgrade --check refuses the upgrade to PostgreSQL {to}; nothing was changed:\n{report}"
    )]
    CheckFailed { to: u32, report: String },
    #[error("failed to {step}: {cause}")]
    Step { step: &'static str, cause: String },
    #[error(transparent)]
    Files(#[from] PgUpgradeError),
    #[error("pg_upgrade failed; {rollback}:\n{report}")]
    UpgradeFailed { report: String, rollback: String },
    #[error(
        "the upgraded cluster did not come up: {cause}\nThe old data directories are kept; to roll back: {rollback}"
    )]
    NotVerified { cause: String, rollback: String },
}

pub fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let error = crate::postgres::pg_upgrade::io_error(what, path);
    move |source| UpgradeError::Files(error(source))
}

/// A node whose data directory is moved aside before the cluster starts on the new major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub node: String,
    pub data: PathBuf,
    /// `data.pgrs-pg<old major>`: kept until the new cluster is verified.
    pub aside: PathBuf,
}

/// Everything an upgrade does, decided before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradePlan {
    pub from: u32,
    pub to: u32,
    pub primary: String,
    /// The pg_upgrade of the primary's data directory (`new_data` beside it until the swap,
    /// `work_dir` removed at the end).
    pub pg_upgrade: PgUpgrade,
    /// The primary first, then the replicas (re-cloned from the upgraded primary).
    pub set_aside: Vec<SetAside>,
}

/// What the new major's binaries turned out to be (read by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBinaries {
    pub dir: PathBuf,
    /// Programs of [`UPGRADE_TOOLS`] missing from `dir`.
    pub missing: Vec<String>,
    /// `postgres --version` of `dir` (`None` when it could not be read).
    pub major: Option<u32>,
}

/// The default binaries of `major`: Debian's (or PGDG's) `/usr/lib/postgresql/<major>/bin` when
/// it has a postgres, else the cache of scripts/install-pg-majors.
pub fn default_bin_dir(major: u32, cache: &Path, has_postgres: impl Fn(&Path) -> bool) -> PathBuf {
    let debian = version::debian_bin_dir(major);
    if has_postgres(&debian) {
        debian
    } else {
        cache.join(major.to_string()).join("bin")
    }
}

/// Validates the request and plans the upgrade; refuses before anything is touched.
pub fn plan(
    layout: &Layout,
    config: &LocalConfig,
    primary: &str,
    from: u32,
    to: u32,
    binaries: &NewBinaries,
    exists: impl Fn(&Path) -> bool,
) -> Result<UpgradePlan, UpgradeError> {
    if to <= from {
        return Err(UpgradeError::NotHigher { from, to });
    }
    if !SUPPORTED_MAJORS.contains(&to) {
        return Err(UpgradeError::Unsupported { to });
    }
    if !binaries.missing.is_empty() {
        return Err(UpgradeError::BinariesIncomplete {
            to,
            dir: binaries.dir.clone(),
            missing: binaries.missing.join(", "),
        });
    }
    match binaries.major {
        Some(found) if found == to => {}
        found => {
            return Err(UpgradeError::BinariesMajor {
                to,
                found: found.unwrap_or(0),
                dir: binaries.dir.clone(),
            });
        }
    }
    let old_port = config
        .node(primary)
        .map_err(|e| UpgradeError::NotHealthy {
            detail: e.to_string(),
        })?
        .pg_port;
    let mut names = vec![primary.to_string()];
    names.extend(
        config
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| n != primary),
    );
    let set_aside: Vec<SetAside> = names
        .into_iter()
        .map(|node| {
            let data = layout.data_dir(&node);
            let aside = data.with_file_name(format!("data.pgrs-pg{from}"));
            SetAside { node, data, aside }
        })
        .collect();
    let old_data = layout.data_dir(primary);
    let new_data = old_data.with_file_name(format!("data.pgrs-upgrade-{to}"));
    let work_dir = layout
        .node_dir(primary)
        .join(format!("pg_upgrade-{from}-{to}"));
    let leftovers = [new_data.clone(), work_dir.clone()]
        .into_iter()
        .chain(set_aside.iter().map(|s| s.aside.clone()));
    for path in leftovers {
        if exists(&path) {
            return Err(UpgradeError::Leftover { path });
        }
    }
    Ok(UpgradePlan {
        from,
        to,
        primary: primary.to_string(),
        pg_upgrade: PgUpgrade {
            old_bin: config.pg_bin.clone(),
            new_bin: binaries.dir.clone(),
            old_data,
            new_data,
            work_dir,
            old_port,
            superuser: config.superuser.clone(),
        },
        set_aside,
    })
}

impl UpgradePlan {
    /// The arguments of `pg_upgrade`: `--check` alone (against the running old primary), or
    /// the upgrade with `mode`. Sockets go to the work directory (pg_upgrade's servers listen on
    /// no TCP address); `new_port` is a free port for the new cluster's temporary server.
    pub fn pg_upgrade_args(&self, mode: Option<TransferMode>, new_port: u16) -> Vec<OsString> {
        self.pg_upgrade.args(mode, new_port)
    }

    /// How to roll back by hand once the directories were swapped.
    pub fn rollback_text(&self, dir: &Path) -> String {
        let mut steps = vec![format!("pgrs local down --dir {}", dir.display())];
        for set in &self.set_aside {
            steps.push(format!(
                "rm -rf {data} && mv {aside} {data}",
                data = set.data.display(),
                aside = set.aside.display()
            ));
        }
        steps.push(format!(
            "mv {d}/global/pg_control.old {d}/global/pg_control (only if it exists)",
            d = self.pg_upgrade.old_data.display()
        ));
        steps.push(format!(
            "pgrs local up --dir {} --pg-bin {}",
            dir.display(),
            self.pg_upgrade.old_bin.display()
        ));
        steps.join("; ")
    }
}

/// What an upgrade did, for the command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeReport {
    pub from: u32,
    pub to: u32,
    pub primary: String,
    pub mode: TransferMode,
    /// From the moment writes stopped (the cluster was being stopped) until the primary
    /// accepted a write on the new major.
    pub write_downtime: Duration,
    /// pg_upgrade itself (part of the downtime).
    pub pg_upgrade: Duration,
    /// Until every replica streamed again.
    pub total: Duration,
    /// The old directories, when kept (`--keep-old`).
    pub kept: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::LeaseTimings;

    fn cluster() -> (Layout, LocalConfig) {
        let layout = Layout::new(Path::new("/c"));
        let config = LocalConfig::new(
            2,
            20000,
            false,
            LeaseTimings::default(),
            PathBuf::from("/old/bin"),
        );
        (layout, config)
    }

    fn binaries(missing: &[&str], major: Option<u32>) -> NewBinaries {
        NewBinaries {
            dir: PathBuf::from("/new/bin"),
            missing: missing.iter().map(|m| m.to_string()).collect(),
            major,
        }
    }

    #[test]
    fn plans_the_primary_first_and_keeps_every_old_directory() {
        let (layout, config) = cluster();
        let plan = plan(
            &layout,
            &config,
            "node1",
            15,
            17,
            &binaries(&[], Some(17)),
            |_| false,
        )
        .expect("plan");
        assert_eq!(
            plan.pg_upgrade.old_data,
            PathBuf::from("/c/nodes/node1/data")
        );
        assert_eq!(
            plan.pg_upgrade.new_data,
            PathBuf::from("/c/nodes/node1/data.pgrs-upgrade-17")
        );
        assert_eq!(plan.pg_upgrade.old_port, 20012);
        let order: Vec<&str> = plan.set_aside.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(order, ["node1", "node0", "node2"]);
        assert_eq!(
            plan.set_aside[1].aside,
            PathBuf::from("/c/nodes/node0/data.pgrs-pg15")
        );
        let check = plan.pg_upgrade_args(None, 40000);
        assert!(check.contains(&"--check".into()));
        assert!(!check.contains(&"--link".into()));
        let run = plan.pg_upgrade_args(Some(TransferMode::Link), 40000);
        assert!(run.contains(&"--link".into()) && !run.contains(&"--check".into()));
        assert!(
            plan.rollback_text(&layout.dir)
                .contains("--pg-bin /old/bin")
        );
    }

    #[test]
    fn refuses_lower_equal_unsupported_and_incomplete() {
        let (layout, config) = cluster();
        let attempt = |from, to, bins: NewBinaries| {
            plan(&layout, &config, "node0", from, to, &bins, |_| false)
                .expect_err("refused")
                .to_string()
        };
        let lower = attempt(17, 15, binaries(&[], Some(15)));
        assert!(lower.contains("only a higher major"), "{lower}");
        let equal = attempt(15, 15, binaries(&[], Some(15)));
        assert!(equal.contains("runs PostgreSQL 15"), "{equal}");
        let unsupported = attempt(15, 19, binaries(&[], Some(19)));
        assert!(unsupported.contains("14 to 18"), "{unsupported}");
        let missing = attempt(15, 17, binaries(&["pg_upgrade", "pg_rewind"], Some(17)));
        assert!(
            missing.contains("missing pg_upgrade, pg_rewind"),
            "{missing}"
        );
        let wrong = attempt(15, 17, binaries(&[], Some(16)));
        assert!(wrong.contains("are PostgreSQL 16"), "{wrong}");
    }

    #[test]
    fn refuses_leftovers_of_an_earlier_attempt() {
        let (layout, config) = cluster();
        let err = plan(
            &layout,
            &config,
            "node0",
            15,
            17,
            &binaries(&[], Some(17)),
            |p| p.ends_with("node2/data.pgrs-pg15"),
        )
        .expect_err("leftover");
        assert!(err.to_string().contains("node2/data.pgrs-pg15"), "{err}");
    }

    #[test]
    fn links_on_one_file_system_and_picks_the_default_binaries() {
        assert_eq!(TransferMode::choose(1, 1), TransferMode::Link);
        assert_eq!(TransferMode::choose(1, 2), TransferMode::Copy);
        let cache = Path::new("/var/cache/pgrs-pg");
        assert_eq!(
            default_bin_dir(17, cache, |_| false),
            PathBuf::from("/var/cache/pgrs-pg/17/bin")
        );
        assert_eq!(
            default_bin_dir(15, cache, |p| p.starts_with("/usr/lib")),
            PathBuf::from("/usr/lib/postgresql/15/bin")
        );
    }
}
