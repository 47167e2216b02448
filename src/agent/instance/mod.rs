//! One instance's files: the agent configuration, the data directory (inspection, identity
//! marker, rendered configuration, `standby.signal`), the run directory (socket, passfile) and
//! bootstrap (initdb for a first primary, pg_basebackup for a replica; in `bootstrap`).
//!
//! Nothing here deletes a data directory that the agent did not create in the same step: a
//! directory that holds something else is refused with an error naming what was found.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod bootstrap;

pub use bootstrap::{
    PreparedUpstream, bootstrap_primary, bootstrap_replica, clone_from, prepare_upstream,
    prepare_upstream_with,
};

use crate::agent::config::{
    self, ConfigError, PostgresSettings, StandbySettings, passfile_line, render_pg_hba,
    render_postgresql_conf,
};
use crate::agent::rotation::RotatingSecret;
use crate::postgres::probe::{ConnectTarget, ProbeError};
use crate::postgres::process::{
    ControlDataError, OsIdentity, PgBinaries, ToolError, read_controldata,
};
use crate::protocol::api::Upstream;

/// A secret read from a file; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a secret file, trimming the trailing newline.
    pub fn from_file(path: &Path) -> Result<Self, InstanceError> {
        let text = std::fs::read_to_string(path).map_err(|source| InstanceError::Io {
            what: "read secret file",
            path: path.to_path_buf(),
            source,
        })?;
        let value = text.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(InstanceError::EmptySecret(path.to_path_buf()));
        }
        Ok(Secret(value))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Whether the superuser may log in from other hosts: shared by every copy of the
/// configuration, so that a change reaches the next rendering of `pg_hba.conf` wherever it is.
#[derive(Debug, Clone, Default)]
pub struct SuperuserAccess(Arc<AtomicBool>);

impl SuperuserAccess {
    pub fn new(allowed: bool) -> Self {
        SuperuserAccess(Arc::new(AtomicBool::new(allowed)))
    }

    pub fn allowed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sets it; true when it changed.
    pub fn set(&self, allowed: bool) -> bool {
        self.0.swap(allowed, Ordering::SeqCst) != allowed
    }
}

/// The application's owner role (with its password) and database.
#[derive(Debug, Clone)]
pub struct AppAccess {
    pub owner: String,
    pub database: String,
    /// Rotated in place when its file changes ([`crate::agent::secret_watch`]).
    pub password: RotatingSecret,
}

/// Everything the agent needs to know about its instance (resolved from the command line).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub cluster: String,
    pub settings: PostgresSettings,
    pub data_dir: PathBuf,
    /// Socket, passfile; outside the data directory so that pg_rewind / pg_basebackup never
    /// copy or overwrite them.
    pub run_dir: PathBuf,
    pub binaries: PgBinaries,
    pub identity: OsIdentity,
    pub superuser: String,
    /// `--superuser-access`, changed live by `POST /v1/superuser-access`: the superuser may log
    /// in from other hosts; otherwise only over the socket and loopback.
    pub superuser_access: SuperuserAccess,
    /// Rotated in place when its file changes ([`crate::agent::secret_watch`]); connections
    /// fall back to the previous value while the role's password is being changed.
    pub superuser_password: RotatingSecret,
    pub replication_user: String,
    /// Rotated in place when its file changes; the passfile is written again then.
    pub replication_password: RotatingSecret,
    /// The application's role and database, ensured whenever this instance starts or becomes
    /// primary.
    pub app: Option<AppAccess>,
    /// Connection timeout when reaching a primary.
    pub primary_timeout: Duration,
    /// How long postgres may take to accept connections after a start.
    pub start_timeout: Duration,
    /// Bound of a fast shutdown before escalating to immediate.
    pub stop_timeout: Duration,
    /// How long a rejoined instance may take to stream before the rejoin is declared failed.
    pub verify_timeout: Duration,
    /// `--tls-dir`: where the certificate files come from (the agent serves copies of them,
    /// see [`crate::agent::tls_files`]).
    pub tls_source: Option<PathBuf>,
}

impl AgentConfig {
    pub fn name(&self) -> &str {
        &self.settings.instance_name
    }

    pub fn passfile(&self) -> PathBuf {
        self.run_dir.join("pgpass")
    }

    pub fn default_slot(&self) -> String {
        config::slot_name_for(self.name())
    }

    /// Superuser connection to this instance over its Unix socket.
    pub fn local_target(&self) -> ConnectTarget {
        ConnectTarget {
            host: self.run_dir.to_string_lossy().into_owned(),
            port: self.settings.port,
            user: self.superuser.clone(),
            password: self.superuser_password.current().expose().to_string(),
            fallback_password: self
                .superuser_password
                .previous()
                .map(|previous| previous.expose().to_string()),
            dbname: "postgres".into(),
            tls: None,
        }
    }

    /// How connections to other instances are verified (`--tls-dir`): against the CA copy this
    /// agent serves, read at each use (a renewed CA is used from the next connection). An
    /// unreadable copy gives an empty CA, and the connection then fails naming TLS.
    pub fn postgres_tls(&self) -> Option<crate::postgres::probe::PostgresTls> {
        self.settings
            .tls
            .as_ref()
            .map(|tls| crate::postgres::probe::PostgresTls {
                ca_pem: std::fs::read_to_string(&tls.ca_file).unwrap_or_default(),
                server_name: tls.server_name.clone(),
            })
    }

    /// Connection to another instance (its primary) as the replication role, never as the
    /// superuser: what an agent does there (read the system identifier and timeline, create or
    /// drop its slot, CHECKPOINT, `pg_rewind`'s reads) needs only the replication role's
    /// grants ([`crate::postgres::roles::replication_grants`]), so a cluster works with remote
    /// superuser logins refused (`--no-superuser-access`).
    pub fn replication_target(&self, host: &str, port: u16) -> ConnectTarget {
        ConnectTarget {
            host: host.to_string(),
            port,
            user: self.replication_user.clone(),
            password: self.replication_password.current().expose().to_string(),
            fallback_password: self
                .replication_password
                .previous()
                .map(|previous| previous.expose().to_string()),
            dbname: "postgres".into(),
            tls: self.postgres_tls(),
        }
    }
}

pub use crate::protocol::names::CLUSTER_MARKER;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("failed to {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::agent::tls_files::TlsFilesError),
    #[error("secret file {0} is empty")]
    EmptySecret(PathBuf),
    #[error(
        "refusing data directory {path}: it belongs to another cluster ({found}; expected {expected}). Nothing was changed; point --data-dir at an empty or missing directory, or remove it yourself"
    )]
    ForeignDataDir {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "refusing data directory {path}: it is not empty and holds no PostgreSQL cluster (no PG_VERSION). Nothing was changed"
    )]
    NotADataDir { path: PathBuf },
    #[error("failed to reach the primary {host}:{port} for bootstrap: {cause}")]
    PrimaryUnreachable {
        host: String,
        port: u16,
        cause: String,
    },
    #[error("failed to create the replica by pg_basebackup from {host}:{port}: {cause}")]
    BaseBackup {
        host: String,
        port: u16,
        cause: String,
    },
    #[error("failed to initialize the data directory with initdb: {0}")]
    Initdb(#[source] ToolError),
    #[error("failed to read the control data: {0}")]
    ControlData(#[from] ControlDataError),
    #[error("failed to render the configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Version(#[from] crate::postgres::version::VersionError),
    #[error("failed to query {host}:{port}: {source}")]
    Probe {
        host: String,
        port: u16,
        #[source]
        source: ProbeError,
    },
    #[error("failed to prepare the slot on {host}:{port}: {source}")]
    Slot {
        host: String,
        port: u16,
        #[source]
        source: crate::postgres::slots::SlotError,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstanceError {
    let path = path.to_path_buf();
    move |source| InstanceError::Io { what, path, source }
}

/// What a data directory path holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataDirState {
    Missing,
    Empty,
    /// Has `PG_VERSION`.
    Initialized,
    /// Has files but no `PG_VERSION`.
    NotPostgres,
}

pub fn inspect_data_dir(path: &Path) -> Result<DataDirState, InstanceError> {
    if !path.exists() {
        return Ok(DataDirState::Missing);
    }
    if path.join("PG_VERSION").is_file() {
        return Ok(DataDirState::Initialized);
    }
    let mut entries = std::fs::read_dir(path).map_err(io_error("read directory", path))?;
    Ok(if entries.next().is_none() {
        DataDirState::Empty
    } else {
        DataDirState::NotPostgres
    })
}

/// Creates `path` (0700) for the postgres user if missing.
pub fn create_private_dir(identity: &OsIdentity, path: &Path) -> Result<(), InstanceError> {
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(io_error("create directory", path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("set permissions of", path))?;
    identity.chown(path).map_err(io_error("chown", path))
}

/// Writes a file readable only by the postgres user.
pub(crate) fn write_private_file(
    identity: &OsIdentity,
    path: &Path,
    contents: &str,
) -> Result<(), InstanceError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error("write", path))?;
    file.write_all(contents.as_bytes())
        .map_err(io_error("write", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("set permissions of", path))?;
    identity.chown(path).map_err(io_error("chown", path))
}

/// Creates the run directory and the libpq passfile (both users' passwords; 0600, postgres).
pub fn prepare_run_dir(config: &AgentConfig) -> Result<(), InstanceError> {
    create_private_dir(&config.identity, &config.run_dir)?;
    if let Some(source) = &config.tls_source {
        crate::agent::tls_files::install(config, source)?;
    }
    write_passfile(config)
}

/// Writes the libpq passfile with the current passwords. libpq reads it at each connection
/// (`primary_conninfo`'s `passfile`, pg_basebackup, pg_rewind): a rotated password is used from
/// the next connection on. Written beside and renamed, so a reader never sees half a file.
pub fn write_passfile(config: &AgentConfig) -> Result<(), InstanceError> {
    let contents = format!(
        "{}{}",
        passfile_line(
            &config.superuser,
            config.superuser_password.current().expose()
        ),
        passfile_line(
            &config.replication_user,
            config.replication_password.current().expose()
        )
    );
    let path = config.passfile();
    let staged = config.run_dir.join("pgpass.new");
    write_private_file(&config.identity, &staged, &contents)?;
    std::fs::rename(&staged, &path).map_err(io_error("rename the passfile to", &path))
}

/// Renders `pg_hba.conf` into `data_dir` (postgres reads it again on a reload).
pub fn write_pg_hba(config: &AgentConfig, data_dir: &Path) -> Result<(), InstanceError> {
    write_private_file(
        &config.identity,
        &data_dir.join("pg_hba.conf"),
        &render_pg_hba(
            &config.replication_user,
            config.settings.tls.is_some(),
            (!config.superuser_access.allowed()).then_some(config.superuser.as_str()),
        ),
    )
}

/// Renders the configuration into `data_dir`: postgresql.conf, pg_hba.conf, an empty
/// postgresql.auto.conf, and `standby.signal` iff `upstream` is set.
pub fn write_configuration(
    config: &AgentConfig,
    data_dir: &Path,
    upstream: Option<&Upstream>,
) -> Result<(), InstanceError> {
    let standby = upstream.map(|upstream| StandbySettings {
        upstream: upstream.clone(),
        replication_user: config.replication_user.clone(),
        passfile: config.passfile(),
    });
    let conf = render_postgresql_conf(&config.settings, standby.as_ref())?;
    write_private_file(&config.identity, &data_dir.join("postgresql.conf"), &conf)?;
    write_pg_hba(config, data_dir)?;
    let auto_conf = data_dir.join("postgresql.auto.conf");
    write_private_file(
        &config.identity,
        &auto_conf,
        &render_auto_conf(&std::fs::read_to_string(&auto_conf).unwrap_or_default()),
    )?;
    let signal = data_dir.join("standby.signal");
    if upstream.is_some() {
        write_private_file(&config.identity, &signal, "")?;
    } else if signal.exists() {
        std::fs::remove_file(&signal).map_err(io_error("remove", &signal))?;
    }
    Ok(())
}

/// `postgresql.auto.conf` as the agent leaves it: ALTER SYSTEM settings are dropped, except
/// `synchronous_standby_names`, which the controller or operator sets with ALTER SYSTEM on the
/// primary (and on a candidate before its promotion). Emptying it on a promotion or restart
/// silently turned a synchronous primary asynchronous while the controller believed otherwise.
pub fn render_auto_conf(existing: &str) -> String {
    let mut text =
        String::from("# Rewritten by the pgrs agent: only synchronous_standby_names is kept.\n");
    for line in existing.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        if key == "synchronous_standby_names" {
            text.push_str(line.trim());
            text.push('\n');
        }
    }
    text
}

fn read_marker(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join(CLUSTER_MARKER)).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("cluster=").map(str::to_string))
}

fn write_marker(config: &AgentConfig, data_dir: &Path) -> Result<(), InstanceError> {
    write_private_file(
        &config.identity,
        &data_dir.join(CLUSTER_MARKER),
        &format!("cluster={}\n", config.cluster),
    )
}

/// Refuses an initialized data directory of another major than the binaries (never an implicit
/// upgrade); a directory without `PG_VERSION` passes.
pub fn check_data_dir_major(config: &AgentConfig, data_dir: &Path) -> Result<(), InstanceError> {
    use crate::postgres::version;
    if let Some(data_major) = version::read_data_dir_major(data_dir)? {
        version::check_data_dir_major(
            data_dir,
            data_major,
            config.binaries.dir(),
            config.binaries.major(),
        )?;
    }
    Ok(())
}

/// Checks that an initialized data directory belongs to this cluster: its major is the
/// binaries', its marker names the cluster and, when `expected_system_identifier` is known (a
/// replica asks its primary), the control file agrees. Returns the system identifier.
pub async fn check_identity(
    config: &AgentConfig,
    data_dir: &Path,
    expected_system_identifier: Option<&str>,
) -> Result<String, InstanceError> {
    check_data_dir_major(config, data_dir)?;
    let control = read_controldata(&config.binaries, &config.identity, data_dir).await?;
    if let Some(expected) = expected_system_identifier
        && control.system_identifier != expected
    {
        return Err(InstanceError::ForeignDataDir {
            path: data_dir.to_path_buf(),
            found: format!("system identifier {}", control.system_identifier),
            expected: format!("system identifier {expected} of the primary"),
        });
    }
    match read_marker(data_dir) {
        Some(cluster) if cluster == config.cluster => Ok(control.system_identifier),
        found => Err(InstanceError::ForeignDataDir {
            path: data_dir.to_path_buf(),
            found: match found {
                Some(other) => format!(
                    "pgrs cluster {other:?}, system identifier {}",
                    control.system_identifier
                ),
                None => format!(
                    "a PostgreSQL cluster not created by pgrs, system identifier {}",
                    control.system_identifier
                ),
            },
            expected: format!("pgrs cluster {:?}", config.cluster),
        }),
    }
}

/// `<data_dir>.pgrs-<suffix>`: a sibling on the same filesystem, so renames are atomic.
pub fn sibling(data_dir: &Path, suffix: &str) -> PathBuf {
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".pgrs-{suffix}"));
    data_dir.with_file_name(name)
}

/// Checks that postgres' port is free on every listen address before starting it, so a
/// conflict gets a clear error rather than a crash loop.
pub fn check_port_free(settings: &PostgresSettings) -> Result<(), String> {
    for address in settings.listen_addresses.split(',').map(str::trim) {
        let host = match address {
            "*" | "" => "0.0.0.0",
            other => other,
        };
        if let Err(error) = std::net::TcpListener::bind((host, settings.port)) {
            return Err(format!(
                "port {} is not available on {host}: {error}",
                settings.port
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        assert_eq!(
            format!("{:?}", Secret::new("hunter2")),
            "Secret(<redacted>)"
        );
    }

    #[test]
    fn inspects_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        assert_eq!(inspect_data_dir(&path).unwrap(), DataDirState::Missing);
        std::fs::create_dir(&path).unwrap();
        assert_eq!(inspect_data_dir(&path).unwrap(), DataDirState::Empty);
        std::fs::write(path.join("notes.txt"), "x").unwrap();
        assert_eq!(inspect_data_dir(&path).unwrap(), DataDirState::NotPostgres);
        std::fs::write(path.join("PG_VERSION"), "15\n").unwrap();
        assert_eq!(inspect_data_dir(&path).unwrap(), DataDirState::Initialized);
    }

    #[test]
    fn auto_conf_keeps_only_the_synchronous_standbys() {
        let existing = "# Do not edit this file manually!\n\
            primary_conninfo = 'host=old'\n\
            synchronous_standby_names = 'ANY 1 (\"b\", \"c\")'\n\
            work_mem = '64MB'\n";
        let rendered = render_auto_conf(existing);
        assert!(rendered.contains("synchronous_standby_names = 'ANY 1 (\"b\", \"c\")'\n"));
        assert!(!rendered.contains("primary_conninfo"), "{rendered}");
        assert!(!rendered.contains("work_mem"), "{rendered}");
        assert_eq!(render_auto_conf("").lines().count(), 1, "only the header");
    }

    #[test]
    fn siblings_stay_in_the_parent() {
        assert_eq!(
            sibling(Path::new("/var/lib/pg/data"), "old-1"),
            PathBuf::from("/var/lib/pg/data.pgrs-old-1")
        );
    }
}
