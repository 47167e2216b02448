//! Running PostgreSQL programs: locating the binaries, dropping to the `postgres` OS user when
//! running as root (postgres, initdb, pg_basebackup and pg_rewind refuse root), capturing their
//! output for error messages, and reading `pg_controldata`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid, User};

/// Programs the agent needs.
pub const REQUIRED_TOOLS: [&str; 5] = [
    "postgres",
    "initdb",
    "pg_basebackup",
    "pg_rewind",
    "pg_controldata",
];

#[derive(Debug, thiserror::Error)]
pub enum BinariesError {
    #[error(
        "failed to find PostgreSQL binaries in {dir}: missing {missing} (pass --pg-bin with the server programs of PostgreSQL {}; scripts/install-pg-majors installs 17 and 18)",
        crate::postgres::version::range_text()
    )]
    Missing { dir: PathBuf, missing: String },
    #[error("failed to tell the PostgreSQL version of {program}: {cause}")]
    Version { program: PathBuf, cause: String },
    #[error(transparent)]
    Unsupported(#[from] crate::postgres::version::VersionError),
}

/// The directory of the PostgreSQL binaries, checked to contain every required program, and
/// their major version.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    dir: PathBuf,
    major: u32,
}

impl PgBinaries {
    /// Checks that `dir` has every program in [`REQUIRED_TOOLS`] and that they are of a
    /// supported major (`postgres --version`).
    pub fn locate(dir: impl Into<PathBuf>) -> Result<Self, BinariesError> {
        let dir = dir.into();
        let missing = missing_tools(&dir);
        if !missing.is_empty() {
            return Err(BinariesError::Missing {
                dir,
                missing: missing.join(", "),
            });
        }
        let major = detect_major(&dir)?;
        crate::postgres::version::check_supported(major, &dir)?;
        Ok(PgBinaries { dir, major })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The major version of these binaries (e.g. 17).
    pub fn major(&self) -> u32 {
        self.major
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The programs of [`REQUIRED_TOOLS`] that `dir` lacks.
pub fn missing_tools(dir: &Path) -> Vec<&'static str> {
    REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|tool| !dir.join(tool).is_file())
        .collect()
}

/// The major of the `postgres` in `dir`, from `postgres --version` (allowed as root; it runs
/// nothing else).
pub fn detect_major(dir: &Path) -> Result<u32, BinariesError> {
    let program = dir.join("postgres");
    let failed = |cause: String| BinariesError::Version {
        program: program.clone(),
        cause,
    };
    let output = std::process::Command::new(&program)
        .arg("--version")
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .output()
        .map_err(|error| failed(error.to_string()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(failed(format!(
            "{} {}",
            output.status,
            tail_lines(&String::from_utf8_lossy(&output.stderr), 3)
        )));
    }
    crate::postgres::version::parse_version_output(&stdout)
        .ok_or_else(|| failed(format!("unexpected output {:?}", stdout.trim())))
}

/// The OS identity PostgreSQL programs run as: `postgres` when we are root, else ourselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsIdentity {
    pub uid: u32,
    pub gid: u32,
    /// We are root and switch to `uid`/`gid` for every child.
    pub switch: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "failed to find the `postgres` OS user (running as root, PostgreSQL must run as another user): {0}"
    )]
    NoPostgresUser(String),
}

impl OsIdentity {
    pub fn for_postgres() -> Result<Self, IdentityError> {
        if !Uid::effective().is_root() {
            return Ok(OsIdentity {
                uid: Uid::effective().as_raw(),
                gid: Gid::effective().as_raw(),
                switch: false,
            });
        }
        match User::from_name("postgres") {
            Ok(Some(user)) => Ok(OsIdentity {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
                switch: true,
            }),
            Ok(None) => Err(IdentityError::NoPostgresUser("no such user".into())),
            Err(error) => Err(IdentityError::NoPostgresUser(error.to_string())),
        }
    }

    /// Gives `path` to the postgres user (no-op when not root).
    pub fn chown(&self, path: &Path) -> std::io::Result<()> {
        if self.switch {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))?;
        }
        Ok(())
    }

    /// Recursively gives a tree to the postgres user (no-op when not root).
    pub fn chown_tree(&self, path: &Path) -> std::io::Result<()> {
        if !self.switch {
            return Ok(());
        }
        self.chown(path)?;
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(path)? {
                self.chown_tree(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// A command for `program` that runs as the postgres user, with a clean PostgreSQL
    /// environment: inherited `PG*` variables (a stray `PGPASSWORD`, `PGHOST`) are removed and
    /// messages are in English for parsing and logs.
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command.env("LC_ALL", "C.UTF-8").env("LANG", "C.UTF-8");
        command.stdin(Stdio::null());
        if self.switch {
            command.uid(self.uid).gid(self.gid);
        }
        command
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("failed to run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    Failed {
        tool: String,
        status: String,
        stderr: String,
    },
}

impl ToolError {
    pub fn stderr(&self) -> &str {
        match self {
            ToolError::Failed { stderr, .. } => stderr,
            ToolError::Spawn { .. } => "",
        }
    }
}

/// Runs a command to completion, capturing output. A non-zero exit becomes
/// [`ToolError::Failed`] with the (trimmed) stderr, so the cause is in the message.
pub async fn run_tool(
    tool: &str,
    mut command: tokio::process::Command,
) -> Result<String, ToolError> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command.kill_on_drop(true);
    tracing::debug!(tool, "running");
    let output = command.output().await.map_err(|source| ToolError::Spawn {
        tool: tool.to_string(),
        source,
    })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(ToolError::Failed {
            tool: tool.to_string(),
            status: output.status.to_string(),
            stderr: tail_lines(&stderr, 12),
        })
    }
}

/// The last `count` non-empty lines of `text`, joined with `; ` (for one-line error messages).
pub fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..].join("; ")
}

/// The fields of `pg_controldata` the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlData {
    pub system_identifier: String,
    /// "in production", "shut down", "shut down in recovery", "in archive recovery", ...
    pub cluster_state: String,
    pub checkpoint_timeline: Option<u32>,
    pub data_checksums: bool,
}

/// Parses `pg_controldata` output (English messages).
pub fn parse_controldata(text: &str) -> Option<ControlData> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().to_string())
        })
    };
    Some(ControlData {
        system_identifier: field("Database system identifier")?,
        cluster_state: field("Database cluster state").unwrap_or_default(),
        checkpoint_timeline: field("Latest checkpoint's TimeLineID").and_then(|v| v.parse().ok()),
        data_checksums: field("Data page checksum version").is_some_and(|v| v != "0"),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ControlDataError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("failed to parse pg_controldata output for {0}")]
    Parse(PathBuf),
}

pub async fn read_controldata(
    binaries: &PgBinaries,
    identity: &OsIdentity,
    data_dir: &Path,
) -> Result<ControlData, ControlDataError> {
    let mut command = identity.command(binaries.tool("pg_controldata"));
    command.arg("-D").arg(data_dir);
    let output = run_tool("pg_controldata", command).await?;
    parse_controldata(&output).ok_or_else(|| ControlDataError::Parse(data_dir.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_controldata() {
        let text = "pg_control version number:            1300\n\
            Database system identifier:           7441234567890123456\n\
            Database cluster state:               shut down in recovery\n\
            Latest checkpoint's TimeLineID:       3\n\
            Data page checksum version:           1\n";
        let data = parse_controldata(text).unwrap();
        assert_eq!(data.system_identifier, "7441234567890123456");
        assert_eq!(data.cluster_state, "shut down in recovery");
        assert_eq!(data.checkpoint_timeline, Some(3));
        assert!(data.data_checksums);
        assert!(parse_controldata("garbage").is_none());
    }

    #[test]
    fn missing_binaries_are_named() {
        let error = PgBinaries::locate("/nonexistent").unwrap_err().to_string();
        assert!(error.contains("/nonexistent"), "{error}");
        assert!(error.contains("postgres, initdb"), "{error}");
    }

    #[test]
    fn the_major_is_read_from_the_binaries() {
        // Debian's PostgreSQL 15, which every machine running the suite has (scripts/setup-debian).
        let binaries = PgBinaries::locate(crate::postgres::version::debian_bin_dir(15)).unwrap();
        assert_eq!(binaries.major(), 15);
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\n\nb\nc\n", 2), "b; c");
    }
}
