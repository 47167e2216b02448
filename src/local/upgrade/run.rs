//! The IO of `pgrs local upgrade`: the steps of the plan made in [`super`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::local::cli::{down, fetch_status, is_healthy, up};
use crate::local::layout::{DirLock, Layout, LocalConfig};
use crate::postgres::pg_upgrade::write_private;
use crate::postgres::process::{OsIdentity, detect_major};

use super::{NewBinaries, UPGRADE_TOOLS, UpgradeError, UpgradePlan, UpgradeReport, io_error};

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
    tracing::info!(from, to = plan.to, primary = %plan.primary, new_bin = %plan.pg_upgrade.new_bin.display(), "upgrade planned");

    // 1. The check, against the running primary; a refusal removes what it created.
    println!(
        "checking: pg_upgrade --check ({from} → {}) on {primary}",
        plan.to
    );
    let password = std::fs::read_to_string(layout.superuser_password())
        .map_err(io_error("read", &layout.superuser_password()))?;
    let pg_upgrade = &plan.pg_upgrade;
    if let Err(error) = pg_upgrade
        .prepare(&identity, password.trim(), &config.cluster)
        .await
    {
        pg_upgrade.cleanup();
        return Err(error.into());
    }
    if let Err(report) = pg_upgrade.run(&identity, None).await {
        pg_upgrade.cleanup();
        return Err(UpgradeError::CheckFailed {
            to: plan.to,
            report,
        });
    }
    let mode = pg_upgrade.transfer_mode()?;

    // 2. Writes stop: replicas first, then the primary (which releases its lease).
    println!("stopping the cluster (writes stop now)");
    let writes_stopped = Instant::now();
    down(&layout.dir, false)
        .await
        .map_err(step("stop the cluster"))?;

    // 3. pg_upgrade proper; a failure puts the old primary back and restarts it.
    println!("upgrading {} with pg_upgrade {}", plan.primary, mode.flag());
    let upgrade_started = Instant::now();
    if let Err(report) = pg_upgrade.run(&identity, Some(mode)).await {
        let rollback = roll_back_unstarted(
            &plan,
            &layout,
            &config,
            Duration::from_secs(request.wait_secs),
        )
        .await;
        return Err(UpgradeError::UpgradeFailed { report, rollback });
    }
    let pg_upgrade_took = upgrade_started.elapsed();
    tracing::info!(seconds = pg_upgrade_took.as_secs_f64(), "pg_upgrade done");

    // 4. The controller applies its sync quorum to the new primary again rather than trust its
    // record of having done so for the old one. Then swap the directories, record the binaries, start on the new
    // major.
    forget_applied_sync(&layout)?;
    // The agent keeps `synchronous_standby_names` of postgresql.auto.conf (and only that): carried
    // over, a sync primary is synchronous from its first write on the new major.
    let auto_conf = "postgresql.auto.conf";
    if let Ok(old_auto) = std::fs::read_to_string(plan.pg_upgrade.old_data.join(auto_conf)) {
        write_private(
            &identity,
            &plan.pg_upgrade.new_data.join(auto_conf),
            &old_auto,
        )?;
    }
    for set in &plan.set_aside {
        std::fs::rename(&set.data, &set.aside).map_err(io_error("move aside", &set.data))?;
    }
    std::fs::rename(&plan.pg_upgrade.new_data, &plan.pg_upgrade.old_data)
        .map_err(io_error("move into place", &plan.pg_upgrade.new_data))?;
    config.pg_bin = plan.pg_upgrade.new_bin.clone();
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
    let _ = std::fs::remove_dir_all(&plan.pg_upgrade.work_dir);
    Ok(UpgradeReport {
        from,
        to: plan.to,
        primary: plan.primary.clone(),
        mode,
        write_downtime,
        pg_upgrade: pg_upgrade_took,
        total: started.elapsed(),
        kept,
    })
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

/// pg_upgrade failed before the new cluster ever started: the old primary is intact (but for
/// `pg_control` renamed in link mode), so put it back and start the cluster on the old major.
async fn roll_back_unstarted(
    plan: &UpgradePlan,
    layout: &Layout,
    config: &LocalConfig,
    wait: Duration,
) -> String {
    if let Err(error) = plan.pg_upgrade.restore_old_control() {
        return format!(
            "the old primary could not be restored ({error}); to roll back: {}",
            plan.rollback_text(&layout.dir)
        );
    }
    plan.pg_upgrade.cleanup();
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
