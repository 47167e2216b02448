//! `pgrs agent`: the command line of the instance agent, and its main loop.
//!
//! The agent never decides roles by itself: `--role` (and later the HTTP actions) come from an
//! external controller (local mode, the operator).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};

use crate::agent::config::{PostgresSettings, check_parameters_for_major, parse_parameters};
use crate::agent::http::{HttpState, router};
use crate::agent::instance::{
    AgentConfig, AppAccess, DataDirState, Secret, bootstrap_primary, bootstrap_replica,
    inspect_data_dir, prepare_run_dir, sibling,
};
use crate::agent::rotation::RotatingSecret;
use crate::agent::supervisor;
use crate::postgres::process::{OsIdentity, PgBinaries};
use crate::postgres::version::{self, VersionError};
use crate::protocol::api::{Role, Upstream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InitialRole {
    /// Initialize (initdb) or reuse the data directory and run as a primary.
    Primary,
    /// Clone (pg_basebackup) from `--primary-host:--primary-port` or reuse, run as a standby.
    Replica,
    /// In a Kubernetes pod: wait until the Lease (`--kube-lease`) has a holder; primary if it
    /// is this instance, else a standby of the holder's pod IP (see `agent::kube_mode`).
    Wait,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Cluster name; recorded in the data directory (`pgrs.cluster`) to refuse foreign ones.
    #[arg(long, env = "PGRS_CLUSTER", default_value = "pgrs")]
    pub cluster: String,
    /// Instance name: `cluster_name`, the replication `application_name` and slot `pgrs_<name>`.
    #[arg(long, env = "PGRS_NAME")]
    pub name: String,
    /// PostgreSQL data directory (created if missing).
    #[arg(long, env = "PGRS_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Directory for the Unix socket and the libpq passfile [default: <data-dir>.pgrs-run].
    #[arg(long, env = "PGRS_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    /// Directory of the PostgreSQL server programs (postgres, initdb, pg_basebackup, pg_rewind,
    /// pg_controldata); their major (14 to 18) is read from `postgres --version`, and a data
    /// directory of another major is refused [default: /usr/lib/postgresql/<--postgres-version,
    /// else 15>/bin].
    #[arg(long, env = "PGRS_PG_BIN")]
    pub pg_bin: Option<PathBuf>,
    /// The PostgreSQL major the binaries must be (the operator passes `spec.postgresVersion`):
    /// others are refused at start.
    #[arg(long, env = "PGRS_POSTGRES_VERSION")]
    pub postgres_version: Option<u32>,
    /// Role at startup, decided by the controller.
    #[arg(long, value_enum)]
    pub role: InitialRole,
    /// Primary to clone from and stream from (`--role replica`).
    #[arg(long, required_if_eq("role", "replica"))]
    pub primary_host: Option<String>,
    #[arg(long, default_value_t = 5432)]
    pub primary_port: u16,
    /// Physical slot on the primary [default: pgrs_<name>].
    #[arg(long)]
    pub slot: Option<String>,
    /// postgres port.
    #[arg(long, env = "PGRS_PORT", default_value_t = 5432)]
    pub port: u16,
    /// postgres `listen_addresses`.
    #[arg(long, default_value = "*")]
    pub listen_addresses: String,
    /// Address of the agent's HTTP API.
    #[arg(long, env = "PGRS_HTTP_LISTEN", default_value = "0.0.0.0:8008")]
    pub http_listen: SocketAddr,
    /// File holding the bearer token required by every HTTP action.
    #[arg(long, env = "PGRS_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// File holding the password of the superuser (`--superuser`).
    #[arg(long, env = "PGRS_SUPERUSER_PASSWORD_FILE")]
    pub superuser_password_file: PathBuf,
    #[arg(long, default_value = "postgres")]
    pub superuser: String,
    /// Let the superuser log in from other hosts (password, over TLS with `--tls-dir`).
    /// Without it, `pg_hba.conf` rejects the superuser from every address but the Unix socket
    /// and loopback: the agent itself uses only those, and no controller needs a superuser
    /// login (the operator passes it for `spec.enableSuperuserAccess: true`, and changes it on
    /// a running agent with `POST /v1/superuser-access`).
    #[arg(long)]
    pub superuser_access: bool,
    /// File holding the password of the replication user.
    #[arg(long, env = "PGRS_REPLICATION_PASSWORD_FILE")]
    pub replication_password_file: PathBuf,
    #[arg(long, default_value = "replicator")]
    pub replication_user: String,
    /// Application role (`LOGIN`, owner of `--app-database`) the primary creates; its password
    /// is in `--app-password-file`.
    #[arg(long, requires_all = ["app_database", "app_password_file"])]
    pub app_owner: Option<String>,
    /// Application database the primary creates, owned by `--app-owner`.
    #[arg(long, requires = "app_owner")]
    pub app_database: Option<String>,
    /// File holding the password of `--app-owner`.
    #[arg(long, env = "PGRS_APP_PASSWORD_FILE", requires = "app_owner")]
    pub app_password_file: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub max_wal_senders: u32,
    #[arg(long, default_value_t = 10)]
    pub max_replication_slots: u32,
    #[arg(long, default_value_t = 128)]
    pub wal_keep_size_mb: u64,
    /// Cap of WAL kept for slots (a dead replica's slot cannot fill the disk); 0 = unlimited.
    #[arg(long, default_value_t = 4096)]
    pub max_slot_wal_keep_size_mb: u64,
    /// Enables `archive_mode` with this `archive_command`.
    #[arg(long)]
    pub archive_command: Option<String>,
    /// `synchronous_standby_names` (e.g. `ANY 1 (*)`); empty = asynchronous.
    #[arg(long)]
    pub synchronous_standby_names: Option<String>,
    /// Extra postgres parameter `NAME=VALUE` (repeatable); agent-owned names are refused.
    #[arg(long = "parameter", value_name = "NAME=VALUE")]
    pub parameters: Vec<String>,
    /// User parameters in postgresql.conf syntax (the operator's ConfigMap): read at start and
    /// again whenever its content changes; new values are reloaded, and the status reports
    /// those that need a restart. `POST /v1/parameters` replaces them too.
    #[arg(long, env = "PGRS_PARAMETERS_FILE")]
    pub parameters_file: Option<PathBuf>,
    /// Timeout to connect to a primary, in seconds.
    #[arg(long, default_value_t = 10)]
    pub primary_timeout_secs: u64,
    /// Time postgres may take to accept connections after a start, in seconds.
    #[arg(long, default_value_t = 120)]
    pub start_timeout_secs: u64,
    /// Bound of a fast shutdown before immediate, in seconds (SIGTERM, stop, rejoin).
    #[arg(long, default_value_t = 5)]
    pub stop_timeout_secs: u64,
    /// Time a rejoined instance may take to stream before falling back to re-clone, seconds.
    #[arg(long, default_value_t = 60)]
    pub verify_timeout_secs: u64,
    /// Kubernetes mode: the Lease naming the primary (read for `--role wait`, renewed and
    /// fenced on like `--lease-url`).
    #[arg(long, env = "PGRS_LEASE_NAME")]
    pub kube_lease: Option<String>,
    /// Namespace of `--kube-lease` and of the instances' pods.
    #[arg(long, env = "PGRS_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes mode: this pod's UID (downward API). The Lease is renewed as this incarnation
    /// of the pod name, so that a force-deleted pod still running beside its replacement
    /// cannot renew it too.
    #[arg(long, env = "PGRS_POD_UID")]
    pub pod_uid: Option<String>,
    /// Lease fencing (`--lease-url`, timings): see `coordination::LeaseArgs`.
    #[command(flatten)]
    pub lease: crate::coordination::LeaseArgs,
    /// TLS: a directory with `tls.crt`, `tls.key` (the cluster's server certificate, also served
    /// by the HTTP API) and `ca.crt` (the cluster CA), e.g. a mounted `kubernetes.io/tls`
    /// Secret. postgres then runs with `ssl = on`, remote connections must use TLS, and this
    /// agent's connections to peers verify them (`sslmode=verify-full`, channel binding). The
    /// files are read again when they change (certificate renewal).
    #[arg(long, env = "PGRS_TLS_DIR", requires = "tls_server_name")]
    pub tls_dir: Option<PathBuf>,
    /// The name in the cluster's certificate that peers are verified against when they are
    /// reached by IP (the operator passes `<cluster>-headless.<namespace>.svc`).
    #[arg(long, env = "PGRS_TLS_SERVER_NAME", requires = "tls_dir")]
    pub tls_server_name: Option<String>,
    /// Serve the HTTP API over TLS with the certificate of `--tls-dir` (the kubelet's probes
    /// too), and reach the other agents (failsafe) over HTTPS verified as
    /// `--tls-server-name`.
    #[arg(long, requires = "tls_dir")]
    pub https: bool,
    /// A major-version upgrade: the directory where `pgrs copy-binaries` put the old major's
    /// installation. A data directory of that major is upgraded with pg_upgrade (as the
    /// primary) or set aside and cloned again (as a replica); any other is refused as always.
    #[arg(long, env = "PGRS_UPGRADE_FROM")]
    pub upgrade_from: Option<PathBuf>,
}

impl AgentArgs {
    /// `--pg-bin`, else Debian's directory of `--postgres-version` (else of the default major).
    pub fn pg_bin_dir(&self) -> PathBuf {
        self.pg_bin.clone().unwrap_or_else(|| {
            version::debian_bin_dir(self.postgres_version.unwrap_or(version::DEFAULT_MAJOR))
        })
    }

    /// `--app-owner`, `--app-database` and the password of `--app-password-file` (clap
    /// requires all three together).
    fn app_access(&self) -> anyhow::Result<Option<AppAccess>> {
        let (Some(owner), Some(database), Some(password_file)) =
            (&self.app_owner, &self.app_database, &self.app_password_file)
        else {
            return Ok(None);
        };
        Ok(Some(AppAccess {
            owner: owner.clone(),
            database: database.clone(),
            password: RotatingSecret::new(Secret::from_file(password_file)?),
        }))
    }

    fn config(&self) -> anyhow::Result<AgentConfig> {
        let binaries = PgBinaries::locate(self.pg_bin_dir())?;
        if let Some(expected) = self.postgres_version
            && expected != binaries.major()
        {
            return Err(VersionError::NotTheExpected {
                bin_dir: binaries.dir().to_path_buf(),
                binaries_major: binaries.major(),
                expected,
            }
            .into());
        }
        let identity = OsIdentity::for_postgres()?;
        let parameters = parse_parameters(&self.parameters)?;
        check_parameters_for_major(binaries.major(), &parameters)?;
        let run_dir = self
            .run_dir
            .clone()
            .unwrap_or_else(|| sibling(&self.data_dir, "run"));
        Ok(AgentConfig {
            cluster: self.cluster.clone(),
            settings: PostgresSettings {
                instance_name: self.name.clone(),
                port: self.port,
                listen_addresses: self.listen_addresses.clone(),
                socket_dir: run_dir.clone(),
                max_wal_senders: self.max_wal_senders,
                max_replication_slots: self.max_replication_slots,
                wal_keep_size_mb: self.wal_keep_size_mb,
                max_slot_wal_keep_size_mb: (self.max_slot_wal_keep_size_mb > 0)
                    .then_some(self.max_slot_wal_keep_size_mb),
                archive_command: self.archive_command.clone(),
                synchronous_standby_names: self.synchronous_standby_names.clone(),
                parameters,
                parameters_include: self
                    .parameters_file
                    .as_ref()
                    .map(|_| run_dir.join(PARAMETERS_INCLUDE)),
                tls: self.tls_server_name.as_ref().map(|server_name| {
                    crate::agent::tls_files::settings(&run_dir, server_name.clone())
                }),
            },
            data_dir: self.data_dir.clone(),
            run_dir,
            binaries,
            identity,
            superuser: self.superuser.clone(),
            superuser_access: crate::agent::instance::SuperuserAccess::new(self.superuser_access),
            superuser_password: RotatingSecret::new(Secret::from_file(
                &self.superuser_password_file,
            )?),
            replication_user: self.replication_user.clone(),
            replication_password: RotatingSecret::new(Secret::from_file(
                &self.replication_password_file,
            )?),
            app: self.app_access()?,
            primary_timeout: Duration::from_secs(self.primary_timeout_secs),
            start_timeout: Duration::from_secs(self.start_timeout_secs),
            stop_timeout: Duration::from_secs(self.stop_timeout_secs),
            verify_timeout: Duration::from_secs(self.verify_timeout_secs),
            tls_source: self.tls_dir.clone(),
        })
    }
}

/// The include file of user parameters, in the run directory: pg_rewind and pg_basebackup
/// never copy or overwrite it.
const PARAMETERS_INCLUDE: &str = "parameters.conf";
/// How often the parameters file is read (kubelet swaps ConfigMap volumes atomically).
const PARAMETERS_POLL: Duration = Duration::from_millis(1500);

/// Applies the parameters file once, then every time its content changes. Only changes of the
/// file count: parameters pushed over HTTP are not undone by a file that has not moved yet
/// (a kubelet refreshes ConfigMap volumes a minute or more after the change).
async fn watch_parameters(
    path: PathBuf,
    handle: supervisor::SupervisorHandle,
    mut last: Option<String>,
) {
    loop {
        tokio::time::sleep(PARAMETERS_POLL).await;
        refresh_parameters(&path, &handle, &mut last).await;
    }
}

/// Reads the parameters file and applies it when its content differs from `last`.
async fn refresh_parameters(
    path: &std::path::Path,
    handle: &supervisor::SupervisorHandle,
    last: &mut Option<String>,
) {
    {
        // A missing file is an empty parameter set (an optional ConfigMap, or none yet).
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Some(String::new()),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot read the parameters file");
                None
            }
        };
        if let Some(text) = text
            && last.as_ref() != Some(&text)
        {
            match crate::agent::config::parse_parameters_file(&text) {
                Ok(parameters) => match handle.apply_parameters(parameters).await {
                    Ok(outcome) => {
                        tracing::info!(path = %path.display(), message = %outcome.message, "parameters file applied");
                        *last = Some(text);
                    }
                    Err(error) => {
                        tracing::warn!(%error, path = %path.display(), "failed to apply the parameters file; retrying");
                    }
                },
                Err(error) => {
                    tracing::error!(%error, path = %path.display(), "the parameters file is invalid; keeping the previous parameters");
                    *last = Some(text);
                }
            }
        }
    }
}

async fn termination_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("failed to install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let config = Arc::new(args.config()?);
    // At once, before waiting for a role: a data directory of another major never starts,
    // unless this start is the upgrade from exactly that major.
    let upgrade = crate::agent::upgrade::pending(&config, args.upgrade_from.as_deref())?;
    tracing::info!(
        major = config.binaries.major(),
        pg_bin = %config.binaries.dir().display(),
        "PostgreSQL binaries"
    );
    let token = RotatingSecret::new(Secret::from_file(&args.token_file)?);
    prepare_run_dir(&config)?;
    let listener = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("failed to listen for HTTP on {}", args.http_listen))?;

    let kube = match (args.role, &args.kube_lease) {
        (InitialRole::Wait, _) | (_, Some(_)) if args.lease.lease_url.is_none() => Some(
            crate::agent::kube_mode::KubeMode::connect(
                args.namespace.as_deref(),
                args.kube_lease.as_deref(),
                args.pod_uid.as_deref(),
            )
            .await?,
        ),
        _ => None,
    };
    let kube_store = match &kube {
        Some(kube) => {
            let timings = args.lease.timings()?;
            Some(kube.store(timings.lease_duration, timings.renew_interval))
        }
        None => None,
    };
    let (mut intended_role, mut upstream) = match args.role {
        InitialRole::Wait => match (&kube, &kube_store) {
            (Some(kube), Some(store)) => {
                kube.wait_for_role(
                    store.as_ref(),
                    config.name(),
                    args.primary_port,
                    args.slot.clone().unwrap_or_else(|| config.default_slot()),
                    !config.data_dir.join("PG_VERSION").exists() || upgrade.is_some(),
                )
                .await
            }
            _ => anyhow::bail!("--role wait cannot be combined with --lease-url"),
        },
        InitialRole::Primary => (Role::Primary, None),
        InitialRole::Replica => {
            let host = args
                .primary_host
                .clone()
                .context("--role replica needs --primary-host")?;
            let upstream = Upstream {
                host,
                port: args.primary_port,
                slot: Some(args.slot.clone().unwrap_or_else(|| config.default_slot())),
            };
            (Role::Replica, Some(upstream))
        }
    };
    let (config, upgraded) = match upgrade {
        Some(pending) => {
            let (config, report) =
                crate::agent::upgrade::run(config, pending, intended_role).await?;
            (config, Some(report))
        }
        None => (config, None),
    };
    if upgraded.is_some()
        && intended_role == Role::Primary
        && let (Some(kube), Some(store)) = (&kube, &kube_store)
    {
        // pg_upgrade took its time: the lease proof must come from a fresh read (the operator
        // grants the lease again while it waits for the upgraded primary).
        (intended_role, upstream) = kube
            .wait_for_role(
                store.as_ref(),
                config.name(),
                args.primary_port,
                args.slot.clone().unwrap_or_else(|| config.default_slot()),
                false,
            )
            .await;
    }
    let (handle, supervisor_task) =
        supervisor::spawn(config.clone(), intended_role, upstream.clone());
    if let Some(report) = &upgraded {
        supervisor::set_major_upgrade(&handle, report.clone());
    }
    // The first read is written before postgres starts, so that restart-only parameters
    // count from the first start.
    let parameters_watch = match args.parameters_file.clone() {
        Some(path) => {
            let mut last = None;
            refresh_parameters(&path, &handle, &mut last).await;
            Some(tokio::spawn(watch_parameters(path, handle.clone(), last)))
        }
        None => None,
    };
    let fencing =
        crate::agent::fencing::start_fencing(&args.lease, &config, &handle, kube_store.zip(kube))?;
    let https = match (&args.tls_dir, &args.tls_server_name) {
        (Some(dir), Some(server_name)) if args.https => {
            Some(crate::agent::tls_files::Https::load(dir, server_name)?)
        }
        _ => None,
    };
    let failsafe = fencing.as_ref().map(|fencing| {
        fencing.enable_failsafe(
            token.current().expose().to_string(),
            https.as_ref().map(|h| h.peers.clone()),
        )
    });
    let tls_watch = args.tls_dir.clone().map(|source| {
        let resolver = https.as_ref().map(|h| h.resolver.clone());
        let copies = config.run_dir.join("tls");
        tokio::spawn(crate::agent::tls_files::watch(
            config.clone(),
            source,
            handle.clone(),
            move || {
                if let Some(resolver) = &resolver
                    && let Err(error) = crate::agent::tls_files::reload_resolver(resolver, &copies)
                {
                    tracing::warn!(%error, "the HTTP API keeps its previous certificate");
                }
            },
        ))
    });
    // Rotation: the secret files are read again every few seconds (see `secret_watch`).
    let secret_watch = tokio::spawn(
        crate::agent::secret_watch::SecretWatch {
            files: crate::agent::secret_watch::SecretFiles {
                token: args.token_file.clone(),
                superuser_password: args.superuser_password_file.clone(),
                replication_password: args.replication_password_file.clone(),
                app_password: args.app_password_file.clone(),
            },
            config: config.clone(),
            token: token.clone(),
            failsafe: failsafe.clone(),
            handle: handle.clone(),
        }
        .run(),
    );
    let (health, health_task) = crate::agent::http::health::spawn(handle.clone());
    let state = HttpState {
        supervisor: handle.clone(),
        token,
        failsafe,
        health,
    };
    let app = router(state, |actions| match &fencing {
        Some(fencing) => fencing.gate_promote(actions, crate::protocol::api::PROMOTE_PATH),
        None => actions,
    });
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        let stopped = async {
            let _ = http_stopped.await;
        };
        match https {
            Some(https) => {
                crate::tls::serve_https(listener, https.server_config, app, stopped).await
            }
            None => {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        }
    });
    tracing::info!(name = config.name(), http = %args.http_listen, role = ?args.role, "agent starting");

    if upstream.is_none()
        && matches!(
            inspect_data_dir(&config.data_dir),
            Ok(DataDirState::Missing | DataDirState::Empty)
        )
    {
        supervisor::set_new_data_dir(&handle);
    }
    let bootstrap = async {
        let system_identifier = match &upstream {
            None => bootstrap_primary(&config).await?,
            Some(upstream) => bootstrap_replica(&config, upstream).await?,
        };
        supervisor::set_system_identifier(&handle, system_identifier);
        handle.start().await?;
        anyhow::Ok(())
    };
    let signal = termination_signal();
    tokio::pin!(signal);
    tokio::select! {
        result = bootstrap => result.context("failed to bootstrap the instance")?,
        received = &mut signal => {
            tracing::info!(signal = received?, "terminated during bootstrap");
            let _ = handle.shutdown().await;
            return Ok(());
        }
    }
    tracing::info!(name = config.name(), "instance is up");
    if let Some(report) = &upgraded {
        crate::agent::upgrade::forget_old(&config.data_dir, report);
    }

    let received = signal.await?;
    tracing::info!(signal = received, "shutting down: fast stop of postgres");
    let result = handle.shutdown().await;
    if let (Some(fencing), Ok(_)) = (&fencing, &result) {
        if handle.state().clean_stop {
            fencing.release_after_stop().await;
        } else {
            tracing::warn!("postgres did not stop cleanly: keeping the lease until it expires");
        }
    }
    if let Some(watch) = &parameters_watch {
        watch.abort();
    }
    if let Some(watch) = &tls_watch {
        watch.abort();
    }
    secret_watch.abort();
    let _ = stop_http.send(());
    let _ = http_task.await;
    health_task.abort();
    let _ = supervisor_task.await;
    result.context("failed to stop postgres")?;
    Ok(())
}
