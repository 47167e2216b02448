//! `pgrs local`: arguments and the commands that talk to a running local controller.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::coordination::LeaseTimings;
use crate::local::controller::{ApiError, SwitchoverBody};
use crate::local::layout::{DirLock, Layout, LocalConfig, read_pid};
use crate::local::status::{LocalStatus, render_table};

#[derive(Debug, Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    pub command: LocalCommand,
}

#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// Directory of the local cluster.
    #[arg(long, env = "PGRS_LOCAL_DIR", default_value = "pgrs-local")]
    pub dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Start a primary and N replicas with their agents and the failover controller, in the
    /// background; prints connection strings and the status URL.
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// Number of replicas.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// Synchronous replication (quorum ANY 1 of the replicas); no acknowledged write is
        /// lost by a failover.
        #[arg(long)]
        sync: bool,
        /// First of the ports used: write endpoint = P, controller = P+1, nodes from P+10.
        #[arg(long, default_value_t = 15432)]
        port_base: u16,
        /// Lease timing profile: default or aggressive.
        #[arg(long, default_value = "default")]
        lease_profile: String,
        /// PostgreSQL server programs, of any supported major (14 to 18; read from `postgres
        /// --version`), e.g. /var/cache/pgrs-pg/17/bin from scripts/install-pg-majors. For an
        /// existing cluster it replaces the recorded directory (a minor update); a major other
        /// than its data directories' is refused [default: /usr/lib/postgresql/15/bin, or the
        /// directory the cluster was created with].
        #[arg(long, env = "PGRS_PG_BIN")]
        pg_bin: Option<PathBuf>,
        /// Seconds to wait for the cluster to become healthy.
        #[arg(long, default_value_t = 180)]
        wait_secs: u64,
        /// Turn the failsafe off: the primary then fences itself when the lease service (the
        /// controller) cannot be reached for the renew deadline, even if every replica still
        /// follows it.
        #[arg(long)]
        no_failsafe: bool,
    },
    /// Print the cluster table: roles, timelines, LSNs, lag, sync state, lease.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// The raw JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Stop a node: gracefully (SIGTERM to its agent: fast shutdown, lease released), or with
    /// `--hard` SIGKILL to its agent and its postgres at once.
    Kill {
        #[command(flatten)]
        dir: DirArg,
        node: String,
        #[arg(long)]
        hard: bool,
    },
    /// Start a stopped node again; a former primary rejoins as a replica.
    Start {
        #[command(flatten)]
        dir: DirArg,
        node: String,
    },
    /// Planned switchover to `--to` (default: the best replica).
    Switchover {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        to: Option<String>,
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// Stop everything; keeps the data unless `--purge`.
    Down {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        purge: bool,
    },
    /// Upgrade the running cluster to a newer PostgreSQL major with pg_upgrade: `--check`
    /// first (a refusal changes nothing), then the cluster stops, the primary is upgraded
    /// (`--link`), starts on the new major and the replicas are re-cloned from it. Prints the
    /// write downtime. See docs/postgres-versions.md, "Upgrading".
    Upgrade(crate::local::upgrade::run::UpgradeArgs),
    /// Run failures against the cluster and write a failover report (see docs/failover.md).
    Chaos(crate::local::chaos::ChaosArgs),
    /// The controller process itself (started by `up`).
    #[command(hide = true)]
    RunController {
        #[command(flatten)]
        dir: DirArg,
    },
    /// The fencing watchdog process (started by agents).
    #[command(hide = true)]
    FenceWatchdog {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    match args.command {
        LocalCommand::Up {
            dir,
            replicas,
            sync,
            port_base,
            lease_profile,
            pg_bin,
            wait_secs,
            no_failsafe,
        } => {
            let timings = LeaseTimings::profile(&lease_profile)?;
            let default_bin =
                crate::postgres::version::debian_bin_dir(crate::postgres::version::DEFAULT_MAJOR);
            let mut config = LocalConfig::new(
                replicas,
                port_base,
                sync,
                timings,
                pg_bin.clone().unwrap_or(default_bin),
            );
            config.failsafe = !no_failsafe;
            let wait = Duration::from_secs(wait_secs);
            let status = up(&dir.dir, config, pg_bin, wait).await?;
            print_up(&Layout::new(&dir.dir), &status)?;
            Ok(())
        }
        LocalCommand::Status { dir, json } => {
            let status = cluster_status(&dir.dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_table(&status));
            }
            Ok(())
        }
        LocalCommand::Kill { dir, node, hard } => {
            let message = kill_node(&dir.dir, &node, hard)?;
            println!("{message}");
            Ok(())
        }
        LocalCommand::Start { dir, node } => {
            let value: serde_json::Value = post(
                &dir.dir,
                &format!("/v1/nodes/{node}/start"),
                &serde_json::json!({}),
            )
            .await?;
            println!(
                "started {node} as {}",
                value["startedAs"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        LocalCommand::Switchover { dir, to, wait_secs } => {
            let (plan, elapsed) = switchover(&dir.dir, to, Duration::from_secs(wait_secs)).await?;
            println!(
                "switched over from {} to {} in {} ms",
                plan.from,
                plan.to,
                elapsed.as_millis()
            );
            Ok(())
        }
        LocalCommand::Down { dir, purge } => {
            down(&dir.dir, purge).await?;
            println!(
                "stopped the cluster in {}{}",
                dir.dir.display(),
                if purge {
                    " and removed its data"
                } else {
                    " (data kept; `pgrs local up` restarts it)"
                }
            );
            Ok(())
        }
        LocalCommand::Upgrade(args) => crate::local::upgrade::run::command(args).await,
        LocalCommand::Chaos(args) => crate::local::chaos::run(args).await,
        LocalCommand::RunController { dir } => {
            crate::local::controller::run_controller(&dir.dir).await
        }
        LocalCommand::FenceWatchdog { data_dir } => {
            crate::coordination::run_watchdog(&data_dir).await
        }
    }
}

fn check_ports_free(config: &LocalConfig) -> anyhow::Result<()> {
    let mut ports = vec![
        (config.write_port, "write endpoint".to_string()),
        (config.controller_port, "controller".to_string()),
    ];
    for node in &config.nodes {
        ports.push((node.pg_port, format!("{} postgres", node.name)));
        ports.push((node.agent_port, format!("{} agent", node.name)));
    }
    for (port, what) in ports {
        std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
            format!("port {port} ({what}) is not free on 127.0.0.1; choose another --port-base")
        })?;
    }
    Ok(())
}

/// Creates (or reuses) the cluster directory, starts the controller in the background and waits
/// until the cluster is healthy. `pg_bin`, when given, replaces an existing cluster's binaries.
pub async fn up(
    dir: &Path,
    requested: LocalConfig,
    pg_bin: Option<PathBuf>,
    wait: Duration,
) -> anyhow::Result<LocalStatus> {
    let layout = Layout::new(dir);
    if layout.dir.exists() && DirLock::is_held(&layout) {
        // Reports the owner's pid; nothing is touched.
        DirLock::acquire(&layout)?;
    }
    let mut config = match layout.read_config() {
        Ok(existing) => {
            if existing.nodes.len() != requested.nodes.len() || existing.sync != requested.sync {
                bail!(
                    "{} already holds a cluster with {} replicas ({}); run `pgrs local down --purge --dir {}` to start over",
                    layout.dir.display(),
                    existing.nodes.len() - 1,
                    if existing.sync { "sync" } else { "async" },
                    layout.dir.display()
                );
            }
            existing
        }
        Err(crate::local::layout::LayoutError::NotACluster(_)) => {
            if layout.dir.exists() && std::fs::read_dir(&layout.dir)?.next().is_some() {
                bail!(
                    "{} exists, is not empty and holds no pgrs local cluster; refusing to use it",
                    layout.dir.display()
                );
            }
            requested
        }
        Err(other) => return Err(other.into()),
    };
    if let Some(pg_bin) = pg_bin {
        config.pg_bin = pg_bin;
    }
    layout.check_binaries(&config)?;
    check_ports_free(&config)?;
    layout.create_dirs(&config)?;
    crate::local::tls::ensure(&layout.dir, &config.cluster)?;
    layout.write_config(&config)?;

    let log_path = layout.controller_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(["local", "run-controller", "--dir"])
        .arg(&layout.dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A session of its own: the controller outlives this shell command and its terminal.
    // SAFETY: setsid is async-signal-safe and only affects the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().context("failed to start the controller")?;
    let deadline = Instant::now() + wait;
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!(
                "the controller exited ({exit}); its log {} ends with:\n{}",
                log_path.display(),
                tail(&log_path, 15)
            );
        }
        if let Ok(status) = fetch_status(&config).await
            && is_healthy(&status)
        {
            // Reap the child later from the OS' point of view: it is in its own session; we just
            // stop waiting for it.
            std::mem::forget(child);
            return Ok(status);
        }
        if Instant::now() > deadline {
            std::mem::forget(child);
            bail!(
                "the cluster did not become healthy within {} s; see `pgrs local status --dir {}` and {}",
                wait.as_secs(),
                layout.dir.display(),
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A primary serves and every other node streams from it.
pub fn is_healthy(status: &LocalStatus) -> bool {
    let Some(primary) = &status.primary else {
        return false;
    };
    status.phase == crate::engine::Phase::Healthy
        && status
            .nodes
            .iter()
            .filter(|n| &n.name != primary)
            .all(|n| n.upstream.as_ref() == Some(primary))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn print_up(layout: &Layout, status: &LocalStatus) -> anyhow::Result<()> {
    let config = layout.read_config()?;
    let password = layout.superuser_password();
    println!("pgrs local cluster is up in {}", layout.dir.display());
    match crate::postgres::process::detect_major(&config.pg_bin) {
        Ok(major) => println!("PostgreSQL {major} ({})\n", config.pg_bin.display()),
        Err(_) => println!(),
    }
    println!("write endpoint (always the primary, follows failovers):");
    println!(
        "  PGPASSWORD=$(cat {}) psql 'postgresql://{}@127.0.0.1:{}/postgres'",
        password.display(),
        config.superuser,
        config.write_port
    );
    println!(
        "  application (role app, database app): psql \"$(cat {})\"",
        layout.app_uri().display()
    );
    println!("\nnodes (direct):");
    for node in &config.nodes {
        let role = status
            .nodes
            .iter()
            .find(|n| n.name == node.name)
            .and_then(|n| n.role.clone())
            .unwrap_or_default();
        println!(
            "  {:<6} {:<8} postgresql://{}@127.0.0.1:{}/postgres",
            node.name, role, config.superuser, node.pg_port
        );
    }
    println!(
        "\nstatus:  {}/v1/cluster   or   pgrs local status --dir {}",
        config.controller_url(),
        layout.dir.display()
    );
    println!("dashboard: {}/", config.controller_url());
    println!("stop:    pgrs local down --dir {}", layout.dir.display());
    Ok(())
}

pub async fn fetch_status(config: &LocalConfig) -> anyhow::Result<LocalStatus> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let response = client
        .get(format!("{}/v1/cluster", config.controller_url()))
        .send()
        .await?;
    if !response.status().is_success() {
        let error: ApiError = response.json().await?;
        bail!("{}", error.error);
    }
    Ok(response.json().await?)
}

fn running_config(dir: &Path) -> anyhow::Result<LocalConfig> {
    let layout = Layout::new(dir);
    let config = layout.read_config()?;
    if !DirLock::is_held(&layout) {
        bail!(
            "no controller is running for {}; start it with `pgrs local up --dir {}`",
            layout.dir.display(),
            layout.dir.display()
        );
    }
    Ok(config)
}

pub async fn cluster_status(dir: &Path) -> anyhow::Result<LocalStatus> {
    let config = running_config(dir)?;
    fetch_status(&config).await
}

async fn post<T: serde::de::DeserializeOwned>(
    dir: &Path,
    path: &str,
    body: &impl serde::Serialize,
) -> anyhow::Result<T> {
    let config = running_config(dir)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let response = client
        .post(format!("{}{path}", config.controller_url()))
        .json(body)
        .send()
        .await
        .context("failed to reach the controller")?;
    if !response.status().is_success() {
        let error: ApiError = response
            .json()
            .await
            .context("unreadable controller error")?;
        bail!("{}", error.error);
    }
    Ok(response.json().await?)
}

/// Requests a switchover and waits until the target serves; returns the plan and the time from
/// the request until the write endpoint pointed at the target.
pub async fn switchover(
    dir: &Path,
    to: Option<String>,
    wait: Duration,
) -> anyhow::Result<(crate::engine::SwitchoverPlan, Duration)> {
    let started = Instant::now();
    let plan: crate::engine::SwitchoverPlan =
        post(dir, "/v1/switchover", &SwitchoverBody { to }).await?;
    let config = running_config(dir)?;
    loop {
        if let Ok(status) = fetch_status(&config).await
            && status.primary.as_ref() == Some(&plan.to)
        {
            return Ok((plan, started.elapsed()));
        }
        if started.elapsed() > wait {
            bail!(
                "switchover to {} did not complete within {} s",
                plan.to,
                wait.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alive and not a zombie: a just-killed agent stays a zombie until the controller reaps it, and
/// `kill(pid, 0)` still succeeds on zombies.
fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    // /proc/<pid>/stat: "pid (comm) state ..."; comm may contain spaces or parentheses.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = stat.rsplit_once(')')?.1;
            after_comm
                .split_whitespace()
                .next()
                .map(|state| state == "Z")
        })
        .unwrap_or(false)
}

/// The postmaster pid of a node, if postgres runs.
pub fn postmaster_pid(layout: &Layout, node: &str) -> Option<i32> {
    let text = std::fs::read_to_string(layout.data_dir(node).join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "postgres" && !is_zombie(pid)).then_some(pid)
}

/// The pid in a node's `postmaster.pid` while that process still exists, even as a zombie: a new
/// postmaster refuses to start while it does ("lock file already exists").
pub fn previous_postmaster(layout: &Layout, node: &str) -> Option<i32> {
    let text = std::fs::read_to_string(layout.data_dir(node).join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "postgres").then_some(pid)
}

pub fn kill_node(dir: &Path, node: &str, hard: bool) -> anyhow::Result<String> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let layout = Layout::new(dir);
    let config = layout.read_config()?;
    config.node(node)?;
    let agent = read_pid(&layout.agent_pid(node)).filter(|p| process_alive(*p));
    let postgres = postmaster_pid(&layout, node);
    if agent.is_none() && postgres.is_none() {
        bail!("{node} is not running (no agent, no postgres)");
    }
    if hard {
        for pid in [agent, postgres].into_iter().flatten() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        Ok(format!(
            "killed {node}: SIGKILL to agent {agent:?} and postgres {postgres:?}"
        ))
    } else {
        let Some(agent) = agent else {
            bail!("{node}'s agent is not running; use --hard to kill its postgres");
        };
        kill(Pid::from_raw(agent), Signal::SIGTERM)?;
        Ok(format!(
            "stopping {node}: SIGTERM to agent {agent} (fast shutdown, lease released)"
        ))
    }
}

pub async fn down(dir: &Path, purge: bool) -> anyhow::Result<()> {
    let layout = Layout::new(dir);
    let config = layout.read_config()?;
    if DirLock::is_held(&layout) {
        if let Some(pid) = layout.controller_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        while DirLock::is_held(&layout) {
            if Instant::now() > deadline {
                bail!(
                    "the controller of {} did not stop within 90 s",
                    layout.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Leftovers of a controller that died: agents and postgres still running.
    for node in &config.nodes {
        if let Some(pid) = read_pid(&layout.agent_pid(&node.name)).filter(|p| process_alive(*p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while config
        .nodes
        .iter()
        .any(|n| postmaster_pid(&layout, &n.name).is_some())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in &config.nodes {
        if let Some(pid) = postmaster_pid(&layout, &node.name) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
    }
    if purge {
        std::fs::remove_dir_all(&layout.dir)
            .with_context(|| format!("failed to remove {}", layout.dir.display()))?;
    }
    Ok(())
}
