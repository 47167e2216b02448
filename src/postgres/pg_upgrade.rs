//! Running `pg_upgrade` on one data directory: the new directory initialised like the agent's
//! first primary, the check, the upgrade proper, and what pg_upgrade reported. Shared by
//! `pgrs local upgrade` (a whole local cluster) and the agent's upgrade of a pod's data
//! directory on Kubernetes (`spec.postgresVersion` raised).

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::postgres::process::{OsIdentity, tail_lines};
use crate::protocol::names::{CLUSTER_MARKER, INITDB_OPTIONS};

/// How pg_upgrade moves the data files into the new directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferMode {
    /// Hard links: seconds for any size; the old directory is unusable once the new one started.
    Link,
    /// A full copy (the new directory is on another file system than the old one).
    Copy,
}

impl TransferMode {
    /// Links when both directories are on one file system (device), else copies.
    pub fn choose(old_device: u64, new_parent_device: u64) -> Self {
        if old_device == new_parent_device {
            TransferMode::Link
        } else {
            TransferMode::Copy
        }
    }

    pub fn flag(self) -> &'static str {
        match self {
            TransferMode::Link => "--link",
            TransferMode::Copy => "--copy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgUpgradeError {
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to initialise the new data directory {path}: {cause}")]
    Initdb { path: PathBuf, cause: String },
}

pub fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PgUpgradeError {
    let path = path.to_path_buf();
    move |source| PgUpgradeError::Io { what, path, source }
}

/// One pg_upgrade of `old_data` (PostgreSQL `old_bin`) into `new_data` (`new_bin`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgUpgrade {
    pub old_bin: PathBuf,
    pub new_bin: PathBuf,
    pub old_data: PathBuf,
    /// Beside the old directory (same file system: `--link`) until the caller swaps them.
    pub new_data: PathBuf,
    /// pg_upgrade's working directory (its sockets, logs and password file).
    pub work_dir: PathBuf,
    /// The old cluster's port while pg_upgrade runs it (the running server's port for a check
    /// against a live primary).
    pub old_port: u16,
    pub superuser: String,
}

impl PgUpgrade {
    /// The arguments of `pg_upgrade`: `--check` alone, or the upgrade with `mode`. Sockets go
    /// to the work directory (pg_upgrade's servers listen on no TCP address); `new_port` is a
    /// free port for the new cluster's temporary server.
    pub fn args(&self, mode: Option<TransferMode>, new_port: u16) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--old-bindir".into(),
            self.old_bin.clone().into(),
            "--new-bindir".into(),
            self.new_bin.clone().into(),
            "--old-datadir".into(),
            self.old_data.clone().into(),
            "--new-datadir".into(),
            self.new_data.clone().into(),
            "--old-port".into(),
            self.old_port.to_string().into(),
            "--new-port".into(),
            new_port.to_string().into(),
            "--username".into(),
            self.superuser.clone().into(),
            "--socketdir".into(),
            self.work_dir.clone().into(),
        ];
        match mode {
            None => args.push("--check".into()),
            Some(mode) => args.push(mode.flag().into()),
        }
        args
    }

    /// The work directory (with a password file for pg_upgrade's connections) and the new data
    /// directory, initialised like the agent's first primary and marked as `cluster`'s.
    pub async fn prepare(
        &self,
        identity: &OsIdentity,
        password: &str,
        cluster: &str,
    ) -> Result<(), PgUpgradeError> {
        let work = &self.work_dir;
        std::fs::create_dir_all(work).map_err(io_error("create", work))?;
        std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod", work))?;
        identity.chown(work).map_err(io_error("chown", work))?;
        let passfile = work.join("pgpass");
        write_private(
            identity,
            &passfile,
            &passfile_line(&self.superuser, password),
        )?;
        let pwfile = work.join("initdb.pw");
        write_private(identity, &pwfile, &format!("{password}\n"))?;
        let data = &self.new_data;
        std::fs::create_dir(data).map_err(io_error("create", data))?;
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("chmod", data))?;
        identity.chown(data).map_err(io_error("chown", data))?;
        let mut command = identity.command(self.new_bin.join("initdb"));
        command
            .arg("-D")
            .arg(data)
            .arg("-U")
            .arg(&self.superuser)
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(INITDB_OPTIONS)
            .current_dir(work);
        tracing::info!(data_dir = %data.display(), "initdb of the new data directory");
        let result = crate::postgres::process::run_tool("initdb", command).await;
        let _ = std::fs::remove_file(&pwfile);
        result.map_err(|e| PgUpgradeError::Initdb {
            path: data.clone(),
            cause: e.to_string(),
        })?;
        let marker = data.join(CLUSTER_MARKER);
        write_private(identity, &marker, &format!("cluster={cluster}\n"))
    }

    /// Runs pg_upgrade as the postgres user in the work directory; `Err` carries the end of its
    /// output and what its report files said.
    pub async fn run(
        &self,
        identity: &OsIdentity,
        mode: Option<TransferMode>,
    ) -> Result<(), String> {
        let new_port = free_port().map_err(|e| format!("no free port for pg_upgrade: {e}"))?;
        let mut command = identity.command(self.new_bin.join("pg_upgrade"));
        command
            .args(self.args(mode, new_port))
            .env("PGPASSFILE", self.work_dir.join("pgpass"))
            .current_dir(&self.work_dir)
            .kill_on_drop(true);
        tracing::info!(check = mode.is_none(), new_port, "running pg_upgrade");
        let output = command
            .output()
            .await
            .map_err(|e| format!("failed to run pg_upgrade: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        Err(format!("{tail}{}", self.reports()))
    }

    /// Links when the new directory's parent is on the old directory's file system.
    pub fn transfer_mode(&self) -> Result<TransferMode, PgUpgradeError> {
        let old = std::fs::metadata(&self.old_data).map_err(io_error("stat", &self.old_data))?;
        let parent = self.new_data.parent().unwrap_or(&self.new_data);
        let new = std::fs::metadata(parent).map_err(io_error("stat", parent))?;
        Ok(TransferMode::choose(old.dev(), new.dev()))
    }

    /// The reports pg_upgrade wrote (e.g. `tables_using_reg.txt`), which go away with the new
    /// directory: their first lines, for the error message.
    fn reports(&self) -> String {
        let mut text = String::new();
        let header =
            "\n(pg_upgrade's report files are removed with the new directory; what they said:)";
        let mut stack = vec![self.new_data.join("pg_upgrade_output.d")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "txt") {
                    if text.is_empty() {
                        text.push_str(header);
                    }
                    let content = std::fs::read_to_string(&path).unwrap_or_default();
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    text.push_str(&format!(
                        "\n{}: {}",
                        name.unwrap_or_default(),
                        tail_lines(&content, 10)
                    ));
                }
            }
        }
        text
    }

    /// Removes what the check created (the new data directory and the work directory).
    pub fn cleanup(&self) {
        for path in [&self.new_data, &self.work_dir] {
            if path.exists()
                && let Err(error) = std::fs::remove_dir_all(path)
            {
                tracing::warn!(path = %path.display(), %error, "failed to remove");
            }
        }
    }

    /// pg_upgrade failed before the new cluster ever started: the old directory is intact but
    /// for `pg_control`, which link mode renames; put it back.
    pub fn restore_old_control(&self) -> Result<(), PgUpgradeError> {
        let global = self.old_data.join("global");
        let (control, renamed) = (global.join("pg_control"), global.join("pg_control.old"));
        if !control.exists() && renamed.exists() {
            std::fs::rename(&renamed, &control).map_err(io_error("restore", &control))?;
        }
        Ok(())
    }
}

/// A libpq password file line for `user` on any host (as the agent writes its own).
pub fn passfile_line(user: &str, password: &str) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", escape(user), escape(password))
}

/// Writes `text` readable by the postgres user only.
pub fn write_private(identity: &OsIdentity, path: &Path, text: &str) -> Result<(), PgUpgradeError> {
    std::fs::write(path, text).map_err(io_error("write", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("chmod", path))?;
    identity.chown(path).map_err(io_error("chown", path))
}

/// A free TCP port on loopback (for pg_upgrade's temporary servers).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade() -> PgUpgrade {
        PgUpgrade {
            old_bin: PathBuf::from("/old/bin"),
            new_bin: PathBuf::from("/new/bin"),
            old_data: PathBuf::from("/d/data"),
            new_data: PathBuf::from("/d/data.pgrs-upgrade-17"),
            work_dir: PathBuf::from("/d/work"),
            old_port: 5432,
            superuser: "postgres".into(),
        }
    }

    #[test]
    fn check_and_upgrade_arguments() {
        let check = upgrade().args(None, 40000);
        assert!(check.contains(&"--check".into()));
        assert!(!check.contains(&"--link".into()));
        let run = upgrade().args(Some(TransferMode::Link), 40000);
        assert!(run.contains(&"--link".into()) && !run.contains(&"--check".into()));
        assert!(run.contains(&"/old/bin".into()) && run.contains(&"40000".into()));
    }

    #[test]
    fn links_on_one_file_system() {
        assert_eq!(TransferMode::choose(1, 1), TransferMode::Link);
        assert_eq!(TransferMode::choose(1, 2), TransferMode::Copy);
    }

    #[test]
    fn passfile_lines_escape_separators() {
        assert_eq!(passfile_line("a:b", "p\\w"), "*:*:*:a\\:b:p\\\\w\n");
    }
}
