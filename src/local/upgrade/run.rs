//! The IO of `pgrs local upgrade`: the steps of the plan made in [`super`].

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::local::cli::{down, fetch_status, is_healthy, up};
use crate::local::layout::{DirLock, Layout, LocalConfig};
use crate::postgres::process::{OsIdentity, detect_major, tail_lines};
use crate::protocol::names::{CLUSTER_MARKER, INITDB_OPTIONS};

use super::{
    NewBinaries, TransferMode, UPGRADE_TOOLS, UpgradeError, UpgradePlan, UpgradeReport, io_error,
};

/// The arguments of `pgrs local upgrade`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub dir: crate::local::cli::DirArg,
    /// The new major (higher than the cluster's).
    #[arg(long)]
    pub to: u32,
    /// The new major's server programs (with pg_upgrade) [default:
    /// /usr/lib/postgresql/<to>/bin if it has postgres, else
    /// ${PGRS_PG_CACHE:-/var/cache/pgrs-pg}/<to>/bin].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// Seconds to wait for the upgraded cluster to become healthy.
    #[arg(long, default_value_t = 300)]
    pub wait_secs: u64,
    /// Keep the old data directories (`data.pgrs-pg<old>`) after a verified upgrade.
    #[arg(long)]
    pub keep_old: bool,
}

/// `pgrs local upgrade`: runs the upgrade and prints what it did.
pub async fn command(args: UpgradeArgs) -> anyhow::Result<()> {
    let report = upgrade(&args).await?;
    println!(
        "upgraded from PostgreSQL {} to {} (primary {}, pg_upgrade {}): write downtime {:.1} s (pg_upgrade {:.1} s), every replica streaming after {:.1} s",
        report.from,
        report.to,
        report.primary,
        report.mode.flag(),
        report.write_downtime.as_secs_f64(),
        report.pg_upgrade.as_secs_f64(),
        report.total.as_secs_f64()
    );
    for path in &report.kept {
        println!("kept {}", path.display());
    }
    Ok(())
}

fn step(step: &'static str) -> impl FnOnce(anyhow::Error) -> UpgradeError {
    move |error| UpgradeError::Step {
        step,
        cause: format!("{error:#}"),
    }
}

/// Runs the whole upgrade (module docs of [`super`]).
pub async fn upgrade(request: &UpgradeArgs) -> Result<UpgradeReport, UpgradeError> {
    let started = Instant::now();
    let layout = Layout::new(&request.dir.dir);
    let mut config = layout.read_config().map_err(|e| UpgradeError::NotHealthy {
        detail: e.to_string(),
    })?;
    if !DirLock::is_held(&layout) {
        return Err(UpgradeError::NotHealthy {
            detail: format!(
                "no controller runs for {}; start it with `pgrs local up --dir {}`",
                layout.dir.display(),
                layout.dir.display()
            ),
        });
    }
    let status = fetch_status(&config)
        .await
        .map_err(step("read the cluster status"))?;
    let primary = match (&status.primary, is_healthy(&status)) {
        (Some(primary), true) => primary.clone(),
        _ => {
            return Err(UpgradeError::NotHealthy {
                detail: format!("phase {:?}, primary {:?}", status.phase, status.primary),
            });
        }
    };
    let from = detect_major(&config.pg_bin).map_err(|e| UpgradeError::Step {
        step: "read the cluster's PostgreSQL major",
        cause: e.to_string(),
    })?;
    let new_dir = request.pg_bin.clone().unwrap_or_else(|| {
        let cache = std::env::var_os("PGRS_PG_CACHE")
            .map_or_else(|| PathBuf::from("/var/cache/pgrs-pg"), PathBuf::from);
        super::default_bin_dir(request.to, &cache, |dir| dir.join("postgres").is_file())
    });
    let binaries = NewBinaries {
        missing: UPGRADE_TOOLS
            .iter()
            .filter(|tool| !new_dir.join(tool).is_file())
            .map(|tool| tool.to_string())
            .collect(),
        major: detect_major(&new_dir).ok(),
        dir: new_dir,
    };
    let plan = super::plan(
        &layout,
        &config,
        &primary,
        from,
        request.to,
        &binaries,
        |p| p.exists(),
    )?;
    let identity = OsIdentity::for_postgres().map_err(|e| UpgradeError::Step {
        step: "find the postgres user",
        cause: e.to_string(),
    })?;
    tracing::info!(from, to = plan.to, primary = %plan.primary, new_bin = %plan.new_bin.display(), "upgrade planned");

    // 1. The check, against the running primary; a refusal removes what it created.
    println!(
        "checking: pg_upgrade --check ({from} → {}) on {primary}",
        plan.to
    );
    let password = std::fs::read_to_string(layout.superuser_password())
        .map_err(io_error("read", &layout.superuser_password()))?;
    if let Err(error) = prepare(&plan, &identity, &config, password.trim()).await {
        cleanup(&plan);
        return Err(error);
    }
    if let Err(report) = run_pg_upgrade(&plan, &identity, None).await {
        let details = output_reports(&plan.new_data);
        cleanup(&plan);
        return Err(UpgradeError::CheckFailed {
            to: plan.to,
            report: format!("{report}{details}"),
        });
    }
    let mode = transfer_mode(&plan)?;

    // 2. Writes stop: replicas first, then the primary (which releases its lease).
    println!("stopping the cluster (writes stop now)");
    let writes_stopped = Instant::now();
    down(&layout.dir, false)
        .await
        .map_err(step("stop the cluster"))?;

    // 3. pg_upgrade proper; a failure puts the old primary back and restarts it.
    println!("upgrading {} with pg_upgrade {}", plan.primary, mode.flag());
    let upgrade_started = Instant::now();
    if let Err(report) = run_pg_upgrade(&plan, &identity, Some(mode)).await {
        let details = output_reports(&plan.new_data);
        let rollback = roll_back_unstarted(
            &plan,
            &layout,
            &config,
            Duration::from_secs(request.wait_secs),
        )
        .await;
        return Err(UpgradeError::UpgradeFailed {
            report: format!("{report}{details}"),
            rollback,
        });
    }
    let pg_upgrade = upgrade_started.elapsed();
    tracing::info!(seconds = pg_upgrade.as_secs_f64(), "pg_upgrade done");

    // 4. The controller applies its sync quorum to the new primary again rather than trust its
    // record of having done so for the old one. Then swap the directories, record the binaries, start on the new
    // major.
    forget_applied_sync(&layout)?;
    // The agent keeps `synchronous_standby_names` of postgresql.auto.conf (and only that): carried
    // over, a sync primary is synchronous from its first write on the new major.
    let auto_conf = "postgresql.auto.conf";
    if let Ok(old_auto) = std::fs::read_to_string(plan.old_data.join(auto_conf)) {
        write_private(&identity, &plan.new_data.join(auto_conf), &old_auto)?;
    }
    for set in &plan.set_aside {
        std::fs::rename(&set.data, &set.aside).map_err(io_error("move aside", &set.data))?;
    }
    std::fs::rename(&plan.new_data, &plan.old_data)
        .map_err(io_error("move into place", &plan.new_data))?;
    config.pg_bin = plan.new_bin.clone();
    layout
        .write_config(&config)
        .map_err(|e| UpgradeError::Step {
            step: "record the new binaries in cluster.json",
            cause: e.to_string(),
        })?;
    println!(
        "starting {} on PostgreSQL {}; the replicas are re-cloned from it",
        plan.primary, plan.to
    );
    let not_verified = |cause: String| UpgradeError::NotVerified {
        cause,
        rollback: plan.rollback_text(&layout.dir),
    };
    let starting = up(
        &layout.dir,
        config.clone(),
        None,
        Duration::from_secs(request.wait_secs),
    );
    let writable = wait_writable(
        &config,
        password.trim(),
        plan.to,
        Duration::from_secs(request.wait_secs),
    );
    let (started_up, writable) = tokio::join!(starting, writable);
    let write_downtime = writable
        .map_err(|e| not_verified(format!("{e:#}")))?
        .duration_since(writes_stopped);
    started_up.map_err(|e| not_verified(format!("{e:#}")))?;

    // 5. Verify every node, then drop the old directories.
    for node in &config.nodes {
        let major = server_major(&config, node.pg_port, password.trim())
            .await
            .map_err(|e| not_verified(format!("{}: {e:#}", node.name)))?;
        if major != plan.to {
            return Err(not_verified(format!(
                "{} runs PostgreSQL {major}, not {}",
                node.name, plan.to
            )));
        }
    }
    let mut kept = Vec::new();
    for set in &plan.set_aside {
        if request.keep_old {
            kept.push(set.aside.clone());
        } else if let Err(error) = std::fs::remove_dir_all(&set.aside) {
            tracing::warn!(path = %set.aside.display(), %error, "failed to remove an old data directory");
            kept.push(set.aside.clone());
        }
    }
    let _ = std::fs::remove_dir_all(&plan.work_dir);
    Ok(UpgradeReport {
        from,
        to: plan.to,
        primary: plan.primary.clone(),
        mode,
        write_downtime,
        pg_upgrade,
        total: started.elapsed(),
        kept,
    })
}

/// The work directory (with a password file for pg_upgrade's connections) and the new data
/// directory, initialised like the agent's first primary.
async fn prepare(
    plan: &UpgradePlan,
    identity: &OsIdentity,
    config: &LocalConfig,
    password: &str,
) -> Result<(), UpgradeError> {
    let work = &plan.work_dir;
    std::fs::create_dir_all(work).map_err(io_error("create", work))?;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("chmod", work))?;
    identity.chown(work).map_err(io_error("chown", work))?;
    let passfile = work.join("pgpass");
    write_private(
        identity,
        &passfile,
        &passfile_line(&plan.superuser, password),
    )?;
    let pwfile = work.join("initdb.pw");
    write_private(identity, &pwfile, &format!("{password}\n"))?;
    let data = &plan.new_data;
    std::fs::create_dir(data).map_err(io_error("create", data))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .map_err(io_error("chmod", data))?;
    identity.chown(data).map_err(io_error("chown", data))?;
    let mut command = identity.command(plan.new_bin.join("initdb"));
    command
        .arg("-D")
        .arg(&plan.new_data)
        .arg("-U")
        .arg(&plan.superuser)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args(INITDB_OPTIONS)
        .current_dir(work);
    tracing::info!(data_dir = %plan.new_data.display(), major = plan.to, "initdb of the new data directory");
    let result = crate::postgres::process::run_tool("initdb", command).await;
    let _ = std::fs::remove_file(&pwfile);
    result.map_err(|e| UpgradeError::Step {
        step: "initialise the new data directory",
        cause: e.to_string(),
    })?;
    let marker = plan.new_data.join(CLUSTER_MARKER);
    write_private(identity, &marker, &format!("cluster={}\n", config.cluster))
}

/// A libpq password file line for `user` on any host (as the agent writes its own).
fn passfile_line(user: &str, password: &str) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace(':', "\\:");
    format!("*:*:*:{}:{}\n", escape(user), escape(password))
}

fn write_private(identity: &OsIdentity, path: &Path, text: &str) -> Result<(), UpgradeError> {
    std::fs::write(path, text).map_err(io_error("write", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error("chmod", path))?;
    identity.chown(path).map_err(io_error("chown", path))
}

/// Drops the controller's record of the `synchronous_standby_names` it applied (`memory.json`),
/// so that it sets them on the upgraded primary, whose configuration starts without them.
fn forget_applied_sync(layout: &Layout) -> Result<(), UpgradeError> {
    let path = layout.memory();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_error("read", &path)(error)),
    };
    let mut state =
        crate::control::ControlState::from_json(&text).map_err(|e| UpgradeError::Step {
            step: "read the controller state memory.json",
            cause: e.to_string(),
        })?;
    state.applied_sync.clear();
    std::fs::write(&path, state.to_json()).map_err(io_error("write", &path))
}

/// Links when the new directory's parent is on the old directory's file system.
fn transfer_mode(plan: &UpgradePlan) -> Result<TransferMode, UpgradeError> {
    let old = std::fs::metadata(&plan.old_data).map_err(io_error("stat", &plan.old_data))?;
    let parent = plan.new_data.parent().unwrap_or(&plan.new_data);
    let new = std::fs::metadata(parent).map_err(io_error("stat", parent))?;
    Ok(TransferMode::choose(old.dev(), new.dev()))
}

/// Runs pg_upgrade as the postgres user in the work directory; `Err` carries its output.
async fn run_pg_upgrade(
    plan: &UpgradePlan,
    identity: &OsIdentity,
    mode: Option<TransferMode>,
) -> Result<(), String> {
    let new_port = free_port().map_err(|e| format!("no free port for pg_upgrade: {e}"))?;
    let mut command = identity.command(plan.new_bin.join("pg_upgrade"));
    command
        .args(plan.pg_upgrade_args(mode, new_port))
        .env("PGPASSFILE", plan.work_dir.join("pgpass"))
        .current_dir(&plan.work_dir)
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
    Err(text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .rev()
        .take(25)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The reports pg_upgrade wrote (e.g. `tables_using_reg.txt`), which go away with the new
/// directory: their first lines, for the error message.
fn output_reports(new_data: &Path) -> String {
    let mut text = String::new();
    let header =
        "\n(pg_upgrade's report files are removed with the new directory; what they said:)";
    let mut stack = vec![new_data.join("pg_upgrade_output.d")];
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
fn cleanup(plan: &UpgradePlan) {
    for path in [&plan.new_data, &plan.work_dir] {
        if path.exists()
            && let Err(error) = std::fs::remove_dir_all(path)
        {
            tracing::warn!(path = %path.display(), %error, "failed to remove");
        }
    }
}

/// pg_upgrade failed before the new cluster ever started: the old primary is intact (but for
/// `pg_control` renamed in link mode), so put it back and start the cluster on the old major.
async fn roll_back_unstarted(
    plan: &UpgradePlan,
    layout: &Layout,
    config: &LocalConfig,
    wait: Duration,
) -> String {
    let global = plan.old_data.join("global");
    let (control, renamed) = (global.join("pg_control"), global.join("pg_control.old"));
    if !control.exists()
        && renamed.exists()
        && let Err(error) = std::fs::rename(&renamed, &control)
    {
        return format!(
            "the old primary could not be restored ({error}); to roll back: {}",
            plan.rollback_text(&layout.dir)
        );
    }
    cleanup(plan);
    match up(&layout.dir, config.clone(), None, wait).await {
        Ok(_) => format!(
            "rolled back: the cluster runs PostgreSQL {} again, nothing was changed",
            plan.from
        ),
        Err(error) => format!(
            "the old data directories are unchanged but the cluster did not come back ({error:#}); start it with `pgrs local up --dir {}`",
            layout.dir.display()
        ),
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

async fn connect(port: u16, user: &str, password: &str) -> anyhow::Result<tokio_postgres::Client> {
    let conninfo = crate::local::chaos::connection_string(port, user, password);
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(3),
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
    )
    .await??;
    tokio::spawn(connection);
    Ok(client)
}

/// The major `server_version_num` of the postgres on `port`.
async fn server_major(config: &LocalConfig, port: u16, password: &str) -> anyhow::Result<u32> {
    let client = connect(port, &config.superuser, password).await?;
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    let num: i32 = row.get(0);
    Ok(crate::postgres::version::major_of_version_num(num as u32))
}

/// Waits until the write endpoint commits a transaction that wrote WAL (a transactional logical
/// message: no table is touched; in sync mode the commit waits for a standby) on `major`; the
/// instant it did.
async fn wait_writable(
    config: &LocalConfig,
    password: &str,
    major: u32,
    wait: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + wait;
    loop {
        let attempt = async {
            let client = connect(config.write_port, &config.superuser, password).await?;
            let row = tokio::time::timeout(
                Duration::from_secs(3),
                client.query_one(
                    "SELECT current_setting('server_version_num')::int, pg_logical_emit_message(true, 'pgrs', 'upgraded')::text",
                    &[],
                ),
            )
            .await??;
            let num: i32 = row.get(0);
            anyhow::Ok(crate::postgres::version::major_of_version_num(num as u32))
        };
        if let Ok(found) = attempt.await
            && found == major
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the write endpoint accepted no write on PostgreSQL {major} within {} s",
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
